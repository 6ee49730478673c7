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
