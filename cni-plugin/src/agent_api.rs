//! The agent's Unix-socket API, used by the CNI plugin, the lab and the CLI.
//!
//! One request per connection: the client writes one JSON object and a newline, the
//! agent answers with one JSON object and a newline, then closes. The exception is
//! [`Request::Observe`], answered by a stream of [`Flow`] objects, one per line (see
//! [`observe`]).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    Observe(ObserveRequest),
    /// What the agent's current model decides for a connection, and why; answered with
    /// [`Response::Explain`].
    Explain {
        /// Client pod, `namespace/name`.
        from: String,
        /// Server pod, `namespace/name`.
        to: String,
        /// Destination port (numbers only: named ports are not resolved here).
        port: u16,
        /// `TCP`, `UDP` or `SCTP` (any case).
        protocol: String,
    },
}

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
    pub pod: String,
    /// `egress` (the client's side) or `ingress` (the server's).
    pub direction: FlowDirection,
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
    pub from: String,
    /// Server pod, `namespace/name`.
    pub to: String,
    /// Destination port.
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// DENIED if either side denies, else AUDIT if either side audits, else ALLOWED.
    pub verdict: ExplainVerdict,
    /// The client's egress.
    pub egress: ExplainSide,
    /// The server's ingress.
    pub ingress: ExplainSide,
}

/// What `Request::Observe` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObserveRequest {
    /// Which flows.
    #[serde(default)]
    pub filter: FlowFilter,
    /// Only flows at or after this Unix time, in nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Only the last N matching flows of the history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<usize>,
    /// Keep the connection open and stream new flows as they come.
    #[serde(default)]
    pub follow: bool,
}

/// What happened to a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FlowVerdict {
    /// Allowed by policy, or the endpoint is not isolated that way.
    Forwarded,
    /// Dropped; `drop_reason` says why.
    Dropped,
    /// Forwarded, but an audit-mode policy would have dropped it.
    Audit,
}

impl FlowVerdict {
    /// The name users see (`FORWARDED`, `DROPPED`, `AUDIT`).
    pub fn as_str(self) -> &'static str {
        match self {
            FlowVerdict::Forwarded => "FORWARDED",
            FlowVerdict::Dropped => "DROPPED",
            FlowVerdict::Audit => "AUDIT",
        }
    }
}

/// Direction of a flow from the local endpoint's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowDirection {
    /// The endpoint receives the packet.
    Ingress,
    /// The endpoint sends the packet.
    Egress,
}

impl FlowDirection {
    /// `ingress` or `egress`.
    pub fn as_str(self) -> &'static str {
        match self {
            FlowDirection::Ingress => "ingress",
            FlowDirection::Egress => "egress",
        }
    }
}

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowPeer {
    /// Pod namespace, when the address is a known pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Pod name, when the address is a known pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Pod labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Address.
    pub ip: Ipv4Addr,
    /// Port (ICMP echo: the identifier on the source side, 0 on the destination side).
    pub port: u16,
    /// Security identity the datapath saw (0 when unknown).
    pub identity: u32,
}

impl FlowPeer {
    /// `namespace/pod`, when known.
    pub fn pod_name(&self) -> Option<String> {
        Some(format!("{}/{}", self.namespace.as_deref()?, self.pod.as_deref()?))
    }
}

/// The policy rule that allowed a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRule {
    /// Policy namespace.
    pub namespace: String,
    /// Policy name.
    pub name: String,
    /// `ingress` or `egress`: the rule list.
    pub direction: FlowDirection,
    /// Index of the rule in that list.
    pub rule: usize,
}

/// A policy, by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyName {
    /// Policy namespace.
    pub namespace: String,
    /// Policy name.
    pub name: String,
}

/// One flow record, as `bulkhead observe -o json` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// When the packet was seen, RFC 3339 in UTC with nanoseconds (sorts as text).
    pub time: String,
    /// The node whose agent reported it.
    pub node: String,
    /// What happened.
    pub verdict: FlowVerdict,
    /// Why it was dropped (or, under audit, would have been): a stable drop reason name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    /// Direction at the local endpoint.
    pub direction: FlowDirection,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, or the protocol number.
    pub protocol: String,
    /// TCP flags of the packet, e.g. `SYN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<String>,
    /// The packet's sender.
    pub source: FlowPeer,
    /// The packet's receiver.
    pub destination: FlowPeer,
    /// The rule that allowed the flow at this endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_by: Vec<PolicyRule>,
    /// For a default-deny drop: the enforcing policies that isolate the endpoint in this
    /// direction; for an AUDIT flow: the audit-mode policies that would have dropped it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isolated_by: Vec<PolicyName>,
    /// Whether the packet is a reply of an established connection.
    pub is_reply: bool,
}

/// Which flows to return. Every set field must match (AND); an unset field matches all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowFilter {
    /// `namespace/pod` on either side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// `namespace/pod` of the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_pod: Option<String>,
    /// `namespace/pod` of the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_pod: Option<String>,
    /// Namespace of either side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `key=value` (or `key`: present) labels that one side must all carry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<FlowVerdict>,
    /// Drop reason name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    /// Protocol name, any case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Port on either side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Direction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<FlowDirection>,
    /// `namespace/name` of a policy that allowed or isolated the flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// Splits `namespace/name`; both parts non-empty, exactly one slash.
pub fn parse_namespaced(text: &str) -> Result<(&str, &str), String> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok((ns, name)),
        _ => Err(format!("{text:?} is not NAMESPACE/NAME")),
    }
}

fn peer_is(peer: &FlowPeer, wanted: &str) -> bool {
    parse_namespaced(wanted).is_ok_and(|(ns, name)| peer.namespace.as_deref() == Some(ns) && peer.pod.as_deref() == Some(name))
}

fn peer_has_labels(peer: &FlowPeer, labels: &[String]) -> bool {
    labels.iter().all(|l| match l.split_once('=') {
        Some((k, v)) => peer.labels.get(k).is_some_and(|have| have == v),
        None => peer.labels.contains_key(l),
    })
}

impl FlowFilter {
    /// Checks the fields that have a syntax: pods and policies are `NAMESPACE/NAME`, label
    /// keys are not empty. (Drop reason names are checked by the agent, which knows them.)
    pub fn validate(&self) -> Result<(), String> {
        for (flag, value) in [
            ("pod", &self.pod),
            ("from-pod", &self.from_pod),
            ("to-pod", &self.to_pod),
            ("policy", &self.policy),
        ] {
            if let Some(v) = value {
                parse_namespaced(v).map_err(|e| format!("--{flag}: {e}"))?;
            }
        }
        for l in &self.labels {
            let key = l.split_once('=').map_or(l.as_str(), |(k, _)| k);
            if key.is_empty() {
                return Err(format!("--label: {l:?} is not KEY=VALUE"));
            }
        }
        Ok(())
    }

    /// Whether `flow` passes every set field.
    pub fn matches(&self, flow: &Flow) -> bool {
        let (src, dst) = (&flow.source, &flow.destination);
        let either = |f: &dyn Fn(&FlowPeer) -> bool| f(src) || f(dst);
        self.pod.as_deref().is_none_or(|p| either(&|x| peer_is(x, p)))
            && self.from_pod.as_deref().is_none_or(|p| peer_is(src, p))
            && self.to_pod.as_deref().is_none_or(|p| peer_is(dst, p))
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| either(&|x| x.namespace.as_deref() == Some(ns)))
            && (self.labels.is_empty() || either(&|x| peer_has_labels(x, &self.labels)))
            && self.verdict.is_none_or(|v| v == flow.verdict)
            && self.drop_reason.as_deref().is_none_or(|r| flow.drop_reason.as_deref() == Some(r))
            && self.protocol.as_deref().is_none_or(|p| p.eq_ignore_ascii_case(&flow.protocol))
            && self.port.is_none_or(|p| src.port == p || dst.port == p)
            && self.direction.is_none_or(|d| d == flow.direction)
            && self.policy.as_deref().is_none_or(|p| {
                parse_namespaced(p).is_ok_and(|(ns, name)| {
                    flow.allowed_by.iter().any(|r| r.namespace == ns && r.name == name)
                        || flow.isolated_by.iter().any(|r| r.namespace == ns && r.name == name)
                })
            })
    }
}

/// Names one attachment: a container's interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EndpointRef {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

/// Everything the agent needs to enforce policy on a new pod interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME` inside the pod.
    pub ifname: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub pod_namespace: String,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub pod_name: String,
    /// Name of the host-side veth, in the agent's network namespace.
    pub host_ifname: String,
    /// Ifindex of the host-side veth.
    pub host_ifindex: u32,
    /// The pod's address.
    pub ipv4: Ipv4Addr,
    /// The pod-side MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The CNI network (`name` of the config) the attachment belongs to; GC of one network
    /// leaves the others' endpoints alone. Empty in records from before it existed.
    #[serde(default)]
    pub network: String,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Done.
    Ok,
    /// The agent's status.
    Status(AgentStatus),
    /// The answer to [`Request::Explain`].
    Explain(Box<Explanation>),
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
}

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be reached.
    #[error("cannot connect to agent socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("agent socket {path}: i/o error")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent answered something that is not a response.
    #[error("agent socket {path}: malformed response")]
    Decode {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Why an observe stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The socket failed or the agent answered garbage.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The agent refused the request.
    #[error("agent socket {path}: {message} (code {code})")]
    Refused {
        /// Socket path.
        path: PathBuf,
        /// CNI-style error code.
        code: u32,
        /// The agent's message.
        message: String,
    },
}

/// Sends one request and waits up to `timeout` for the answer.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ApiError> {
    let io = |source| ApiError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ApiError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(|source| ApiError::Decode {
        path: socket.to_path_buf(),
        source,
    })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|source| ApiError::Decode {
        path: socket.to_path_buf(),
        source,
    })
}

/// One line of an observe stream: a flow, or the agent's error (sent instead of any flow).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ObserveLine {
    Flow(Box<Flow>),
    Response(Response),
}

/// The flows an agent streams for [`Request::Observe`]; ends when the agent closes.
pub struct ObserveStream {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    line: String,
}

impl Iterator for ObserveStream {
    type Item = Result<Flow, ObserveError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.line.clear();
        match self.reader.read_line(&mut self.line) {
            Ok(0) => None,
            Ok(_) => Some(match serde_json::from_str::<ObserveLine>(&self.line) {
                Ok(ObserveLine::Flow(f)) => Ok(*f),
                Ok(ObserveLine::Response(Response::Error { code, message })) => Err(ObserveError::Refused {
                    path: self.path.clone(),
                    code,
                    message,
                }),
                Ok(ObserveLine::Response(other)) => Err(ObserveError::Refused {
                    path: self.path.clone(),
                    code: 0,
                    message: format!("unexpected answer {other:?}"),
                }),
                Err(source) => Err(ApiError::Decode {
                    path: self.path.clone(),
                    source,
                }
                .into()),
            }),
            Err(source) => Some(Err(ApiError::Io {
                path: self.path.clone(),
                source,
            }
            .into())),
        }
    }
}

/// Sends an observe request; the flows arrive through the returned iterator.
///
/// `idle_timeout` bounds the wait for each line (use `None` with `follow`, where the
/// agent may stay quiet for as long as nothing happens).
pub fn observe(socket: &Path, request: &ObserveRequest, idle_timeout: Option<Duration>) -> Result<ObserveStream, ApiError> {
    let io = |source| ApiError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ApiError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(idle_timeout).map_err(io)?;
    stream.set_write_timeout(Some(Duration::from_secs(5))).map_err(io)?;
    let mut line = serde_json::to_vec(&Request::Observe(request.clone())).map_err(|source| ApiError::Decode {
        path: socket.to_path_buf(),
        source,
    })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    Ok(ObserveStream {
        path: socket.to_path_buf(),
        reader: BufReader::new(stream),
        line: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
            from: "x/a".into(),
            to: "y/b".into(),
            port: 80,
            protocol: "TCP".into(),
        };
        let s = serde_json::to_string(&explain).unwrap();
        assert_eq!(s, r#"{"op":"explain","from":"x/a","to":"y/b","port":80,"protocol":"TCP"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), explain);
        let side = |pod: &str, direction| ExplainSide {
            pod: pod.into(),
            direction,
            isolated: false,
            audit_mode: false,
            isolated_by: Vec::new(),
            allowed_by: None,
            verdict: ExplainVerdict::Allowed,
        };
        let answer = Response::Explain(Box::new(Explanation {
            from: "x/a".into(),
            to: "y/b".into(),
            port: 80,
            protocol: "TCP".into(),
            verdict: ExplainVerdict::Audit,
            egress: side("x/a", FlowDirection::Egress),
            ingress: side("y/b", FlowDirection::Ingress),
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

#[cfg(test)]
mod flow_tests {
    use super::*;

    fn peer(ns: &str, pod: &str, ip: [u8; 4], port: u16, labels: &[(&str, &str)]) -> FlowPeer {
        FlowPeer {
            namespace: Some(ns.into()),
            pod: Some(pod.into()),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ip: Ipv4Addr::from(ip),
            port,
            identity: 256,
        }
    }

    fn denied() -> Flow {
        Flow {
            time: "2026-11-28T12:00:00.000000001Z".into(),
            node: "node0".into(),
            verdict: FlowVerdict::Dropped,
            drop_reason: Some("policy_denied".into()),
            direction: FlowDirection::Ingress,
            protocol: "TCP".into(),
            tcp_flags: Some("SYN".into()),
            source: peer("y", "b", [10, 0, 0, 5], 40000, &[("pod", "b")]),
            destination: peer("x", "c", [10, 0, 0, 3], 80, &[("pod", "c")]),
            allowed_by: vec![],
            isolated_by: vec![PolicyName {
                namespace: "x".into(),
                name: "default-deny-ingress".into(),
            }],
            is_reply: false,
        }
    }

    fn f(edit: impl FnOnce(&mut FlowFilter)) -> FlowFilter {
        let mut filter = FlowFilter::default();
        edit(&mut filter);
        filter
    }

    #[test]
    fn filter_fields_match_and_miss() {
        let flow = denied();
        let hits = [
            f(|_| {}),
            f(|x| x.pod = Some("x/c".into())),
            f(|x| x.pod = Some("y/b".into())),
            f(|x| x.from_pod = Some("y/b".into())),
            f(|x| x.to_pod = Some("x/c".into())),
            f(|x| x.namespace = Some("y".into())),
            f(|x| x.labels = vec!["pod=c".into()]),
            f(|x| x.labels = vec!["pod".into()]),
            f(|x| x.verdict = Some(FlowVerdict::Dropped)),
            f(|x| x.drop_reason = Some("policy_denied".into())),
            f(|x| x.protocol = Some("tcp".into())),
            f(|x| x.port = Some(80)),
            f(|x| x.port = Some(40000)),
            f(|x| x.direction = Some(FlowDirection::Ingress)),
            f(|x| x.policy = Some("x/default-deny-ingress".into())),
        ];
        for h in hits {
            assert!(h.matches(&flow), "{h:?} should match");
        }
        let misses = [
            f(|x| x.pod = Some("x/a".into())),
            f(|x| x.from_pod = Some("x/c".into())),
            f(|x| x.to_pod = Some("y/b".into())),
            f(|x| x.namespace = Some("z".into())),
            // Both labels must be on one side.
            f(|x| x.labels = vec!["pod=c".into(), "pod=b".into()]),
            f(|x| x.verdict = Some(FlowVerdict::Forwarded)),
            f(|x| x.drop_reason = Some("spoofed_ip".into())),
            f(|x| x.protocol = Some("UDP".into())),
            f(|x| x.port = Some(81)),
            f(|x| x.direction = Some(FlowDirection::Egress)),
            f(|x| x.policy = Some("x/allow-b".into())),
            // Every field must match.
            f(|x| {
                x.verdict = Some(FlowVerdict::Dropped);
                x.port = Some(81);
            }),
        ];
        for m in misses {
            assert!(!m.matches(&flow), "{m:?} should not match");
        }
    }

    #[test]
    fn filter_policy_matches_the_allowing_rule() {
        let mut flow = denied();
        flow.verdict = FlowVerdict::Forwarded;
        flow.drop_reason = None;
        flow.isolated_by.clear();
        flow.allowed_by.push(PolicyRule {
            namespace: "x".into(),
            name: "allow-b".into(),
            direction: FlowDirection::Ingress,
            rule: 0,
        });
        assert!(f(|x| x.policy = Some("x/allow-b".into())).matches(&flow));
        assert!(!f(|x| x.drop_reason = Some("policy_denied".into())).matches(&flow));
    }

    #[test]
    fn filter_validation_names_the_flag() {
        assert!(f(|x| x.pod = Some("x/a".into())).validate().is_ok());
        for (bad, flag) in [
            (f(|x| x.pod = Some("xa".into())), "--pod"),
            (f(|x| x.from_pod = Some("/a".into())), "--from-pod"),
            (f(|x| x.to_pod = Some("x/".into())), "--to-pod"),
            (f(|x| x.policy = Some("x/a/b".into())), "--policy"),
            (f(|x| x.labels = vec!["=v".into()]), "--label"),
        ] {
            let e = bad.validate().unwrap_err();
            assert!(e.starts_with(flag), "{e}");
        }
    }

    #[test]
    fn flow_json_is_stable() {
        let flow = denied();
        let v: serde_json::Value = serde_json::to_value(&flow).unwrap();
        assert_eq!(v["verdict"], "DROPPED");
        assert_eq!(v["direction"], "ingress");
        assert_eq!(v["source"]["ip"], "10.0.0.5");
        assert_eq!(v["isolated_by"][0]["name"], "default-deny-ingress");
        assert!(v.get("allowed_by").is_none(), "empty lists are omitted");
        assert_eq!(v["is_reply"], false);
        assert_eq!(serde_json::from_value::<Flow>(v).unwrap(), flow);
        let req = Request::Observe(ObserveRequest {
            filter: f(|x| x.verdict = Some(FlowVerdict::Dropped)),
            since: None,
            last: Some(3),
            follow: false,
        });
        let s = serde_json::to_string(&req).unwrap();
        assert_eq!(s, r#"{"op":"observe","filter":{"verdict":"DROPPED"},"last":3,"follow":false}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), req);
        // An error line in an observe stream is a Response, not a Flow.
        let line: ObserveLine = serde_json::from_str(r#"{"result":"error","code":6,"message":"bad"}"#).unwrap();
        assert!(matches!(line, ObserveLine::Response(Response::Error { code: 6, .. })));
    }
}
