//! What `bulkhead explain` asks and the agent answers.

use serde::{Deserialize, Serialize};

use crate::flow::{Direction, PolicyName, PolicyRule};
use crate::name::{self, NamespacedName};
use crate::protocol::Protocol;

/// The verdict for a connection, or for one side of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ExplainVerdict {
    /// Let through by policy (or nothing isolates the pod that way).
    Allowed,
    /// Dropped: isolated, and no rule allows it.
    Denied,
    /// Let through, but an audit-mode policy would drop it (flows show verdict AUDIT).
    Audit,
}

impl ExplainVerdict {
    /// The name users see (`ALLOWED`, `DENIED`, `AUDIT`).
    pub fn as_str(self) -> &'static str {
        match self {
            ExplainVerdict::Allowed => "ALLOWED",
            ExplainVerdict::Denied => "DENIED",
            ExplainVerdict::Audit => "AUDIT",
        }
    }
}

/// One side of an explained connection: the client's egress or the server's ingress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainSide {
    /// The pod whose policies decide this side, `namespace/name`.
    #[serde(with = "name::text")]
    pub pod: NamespacedName,
    /// `egress` (the client's side) or `ingress` (the server's).
    pub direction: Direction,
    /// Whether any policy isolates the pod for this direction (enforcing or audit-mode).
    pub isolated: bool,
    /// Whether only audit-mode policies isolate it (what they do not allow is audited).
    pub audit_mode: bool,
    /// The policies whose rules decide: the enforcing ones when there is one, else the
    /// audit-mode ones; empty when not isolated.
    pub isolated_by: Vec<PolicyName>,
    /// The rule that allows the connection, when one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_by: Option<PolicyRule>,
    /// This side's verdict.
    pub verdict: ExplainVerdict,
}

/// What [`Request::Explain`] answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// Client pod, `namespace/name`.
    #[serde(with = "name::text")]
    pub from: NamespacedName,
    /// Server pod, `namespace/name`.
    #[serde(with = "name::text")]
    pub to: NamespacedName,
    /// Destination port.
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: Protocol,
    /// DENIED if either side denies, else AUDIT if either side audits, else ALLOWED.
    pub verdict: ExplainVerdict,
    /// The client's egress.
    pub egress: ExplainSide,
    /// The server's ingress.
    pub ingress: ExplainSide,
}

/// What [`Request::ExplainService`](crate::Request::ExplainService) answers: a connection
/// to a Service port, explained for each backend the datapath may pick.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceExplanation {
    /// Client pod, `namespace/name`.
    #[serde(with = "name::text")]
    pub from: NamespacedName,
    /// The Service, `namespace/name`.
    #[serde(with = "name::text")]
    pub service: NamespacedName,
    /// Its ClusterIP (absent for a headless Service, whose clients dial the pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<std::net::Ipv4Addr>,
    /// The Service port.
    pub port: u16,
    /// The Service port's name (absent for a single unnamed port).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub port_name: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: Protocol,
    /// Whether the agent translates the ClusterIP (`services: true`): policy is then decided
    /// on the backend, as below; otherwise on the ClusterIP.
    pub translated: bool,
    /// Every endpoint of the port; an empty list means a new connection is refused at once
    /// (drop reason `no_service_backend`).
    pub backends: Vec<BackendExplanation>,
}

/// One backend of an explained Service connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendExplanation {
    /// The endpoint's address.
    pub ip: std::net::Ipv4Addr,
    /// The port on it (the resolved targetPort).
    pub port: u16,
    /// The pod behind it, when the EndpointSlice names one the model knows.
    #[serde(default, with = "name::opt_text", skip_serializing_if = "Option::is_none")]
    pub pod: Option<NamespacedName>,
    /// Whether new connections may go there (ready, or serving while terminating when no
    /// endpoint is ready).
    pub selected: bool,
    /// The connection to this backend, when it is a known pod (an endpoint that is no pod
    /// is decided by ipBlock rules, which `explain` does not evaluate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<Explanation>,
}
