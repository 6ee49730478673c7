//! Requests and responses on the agent's socket.

use serde::{Deserialize, Serialize};

use crate::endpoint::{EndpointRef, EndpointSpec};
use crate::explain::{Explanation, ServiceExplanation};
use crate::flow::ObserveRequest;
use crate::name::{self, NamespacedName};
use crate::protocol::Protocol;
use crate::relay::RelayStatus;

/// A request to the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Register a pod's interface; answered once its endpoint and policy are in the maps.
    AddEndpoint(EndpointSpec),
    /// Forget an endpoint; succeeds when it is unknown.
    DelEndpoint(EndpointRef),
    /// Check that the agent knows and enforces this endpoint.
    CheckEndpoint(EndpointRef),
    /// Forget every endpoint not in `valid` (CNI GC), deleting its host veth if still present.
    Gc {
        /// The CNI network collected; endpoints of other networks are left alone.
        #[serde(default)]
        network: String,
        /// The attachments the runtime still knows (`cni.dev/valid-attachments`).
        valid: Vec<EndpointRef>,
    },
    /// Re-read the manifests source; answered once the result is in the maps.
    Reload,
    /// The agent's status.
    Status,
    /// Stream flow records: one JSON [`Flow`] per line, closed after the history unless
    /// `follow` is set.
    Observe(Box<ObserveRequest>),
    /// What the agent's current model decides for a connection, and why; answered with
    /// [`Response::Explain`].
    Explain {
        /// Client pod, `namespace/name`.
        #[serde(with = "name::text")]
        from: NamespacedName,
        /// Server pod, `namespace/name`.
        #[serde(with = "name::text")]
        to: NamespacedName,
        /// Destination port (numbers only: named ports are not resolved here).
        port: u16,
        /// `TCP`, `UDP` or `SCTP` (any case on the wire; the agent refuses others).
        protocol: Protocol,
    },
    /// What the model decides for a connection to a Service, for each of its backends;
    /// answered with [`Response::ExplainService`].
    ExplainService {
        /// Client pod, `namespace/name`.
        #[serde(with = "name::text")]
        from: NamespacedName,
        /// The Service, `namespace/name`.
        #[serde(with = "name::text")]
        service: NamespacedName,
        /// The Service port the client dials.
        port: u16,
        /// `TCP`, `UDP` or `SCTP`.
        protocol: Protocol,
    },
    /// A relay's view of every node's stream; answered with [`Response::RelayStatus`]
    /// (agents refuse it).
    RelayStatus,
    /// Isolate a pod in both directions in the datapath, ahead of policy and conntrack
    /// (traffic with its own node excepted), or lift that (`release`). Every agent accepts
    /// it: the pod's own node isolates it, the others drop their pods' traffic to it too.
    /// Answered with [`Response::Ok`] once the maps hold it.
    Quarantine {
        /// The pod, `namespace/name`.
        #[serde(with = "name::text")]
        pod: NamespacedName,
        /// Why (shown in status, flows and forensics).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Lift a quarantine set by this request (a pod's `bulkhead.io/quarantine` label
        /// keeps it quarantined regardless).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        release: bool,
    },
    /// Stream anomalies as JSON [`Anomaly`](crate::anomaly::Anomaly) lines (a relay: the
    /// cluster's baselines; agents refuse it), closed after the history unless `follow`.
    Anomalies(Box<crate::anomaly::AnomalyRequest>),
    /// Everything kept about one pod, live or deleted; answered with
    /// [`Response::Forensics`].
    Forensics {
        /// The pod, `namespace/name`.
        #[serde(with = "name::text")]
        pod: NamespacedName,
    },
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Done.
    Ok,
    /// The agent's status.
    Status(AgentStatus),
    /// The answer to [`Request::Explain`].
    Explain(Box<Explanation>),
    /// The answer to [`Request::ExplainService`].
    ExplainService(Box<ServiceExplanation>),
    /// The answer to [`Request::RelayStatus`].
    RelayStatus(Box<RelayStatus>),
    /// The answer to [`Request::Forensics`].
    Forensics(Box<crate::anomaly::ForensicsBundle>),
    /// Failed; `code` follows the CNI error codes (11: try again later; ours from 100).
    Error {
        /// CNI-style error code.
        code: u32,
        /// What went wrong, lowercase.
        message: String,
    },
}

/// What `Request::Status` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The node this agent runs on.
    pub node_name: String,
    /// True once the first full sync is in the maps.
    pub ready: bool,
    /// Local endpoints.
    pub endpoints: usize,
    /// Allocated identities.
    pub identities: usize,
    /// NetworkPolicies in the model.
    pub policies: usize,
    /// Policy entries in the datapath.
    pub policy_entries: usize,
    /// Bumped each time the maps are reprogrammed.
    pub generation: u64,
    /// Quarantined pods (`namespace/name`), by request or label, on any node.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub quarantined: std::collections::BTreeMap<String, crate::anomaly::QuarantineInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::{ExplainSide, ExplainVerdict};
    use crate::flow::Direction;

    #[test]
    fn requests_are_tagged_json() {
        let r = Request::DelEndpoint(EndpointRef {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        });
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"del_endpoint","container_id":"c1","ifname":"eth0"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let gc = Request::Gc {
            network: "bh".into(),
            valid: vec![EndpointRef {
                container_id: "c2".into(),
                ifname: "eth0".into(),
            }],
        };
        let s = serde_json::to_string(&gc).unwrap();
        assert_eq!(s, r#"{"op":"gc","network":"bh","valid":[{"container_id":"c2","ifname":"eth0"}]}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), gc);
        // A request from before networks were named still parses, matching any network.
        let old: Request = serde_json::from_str(r#"{"op":"gc","valid":[]}"#).unwrap();
        assert_eq!(
            old,
            Request::Gc {
                network: String::new(),
                valid: vec![]
            }
        );
        let explain = Request::Explain {
            from: NamespacedName::new("x", "a"),
            to: NamespacedName::new("y", "b"),
            port: 80,
            protocol: Protocol::TCP,
        };
        let s = serde_json::to_string(&explain).unwrap();
        assert_eq!(s, r#"{"op":"explain","from":"x/a","to":"y/b","port":80,"protocol":"TCP"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), explain);
        let side = |pod: &str, direction| ExplainSide {
            pod: pod.parse().unwrap(),
            direction,
            isolated: false,
            audit_mode: false,
            isolated_by: Vec::new(),
            allowed_by: None,
            verdict: ExplainVerdict::Allowed,
        };
        let answer = Response::Explain(Box::new(Explanation {
            from: NamespacedName::new("x", "a"),
            to: NamespacedName::new("y", "b"),
            port: 80,
            protocol: Protocol::TCP,
            verdict: ExplainVerdict::Audit,
            egress: side("x/a", Direction::Egress),
            ingress: side("y/b", Direction::Ingress),
        }));
        let s = serde_json::to_string(&answer).unwrap();
        assert!(s.starts_with(r#"{"result":"explain","from":"x/a""#), "{s}");
        assert!(s.contains(r#""verdict":"AUDIT""#), "{s}");
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), answer);
        let e: Response = serde_json::from_str(r#"{"result":"error","code":11,"message":"pod unknown"}"#).unwrap();
        assert_eq!(
            e,
            Response::Error {
                code: 11,
                message: "pod unknown".into()
            }
        );
    }
}
