//! Flow records as the agent serves them, and the filters `bulkhead observe` sends.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Request;

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
    }
}
