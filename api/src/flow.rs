//! Flow records as the agent serves them, and the filters `bulkhead observe` sends.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::name::{self, NamespacedName};
use crate::protocol::Protocol;

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
    /// Also send the gaps a relay saw, as `{"gap":{…}}` lines in time order (agents have
    /// none; old clients never ask, so they never meet such a line).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gaps: bool,
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

/// Direction of traffic (or of a policy rule list) from the local endpoint's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The endpoint receives the packet (a `spec.ingress` rule).
    Ingress,
    /// The endpoint sends the packet (a `spec.egress` rule).
    Egress,
}

impl Direction {
    /// Both directions.
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// `ingress` or `egress` (also the field name in a NetworkPolicy spec).
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    /// The datapath's [`bulkhead_common::direction`] number.
    pub const fn number(self) -> u8 {
        match self {
            Direction::Ingress => bulkhead_common::direction::INGRESS,
            Direction::Egress => bulkhead_common::direction::EGRESS,
        }
    }

    /// The direction with datapath number `n`; `None` for a number the datapath does not use.
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            bulkhead_common::direction::INGRESS => Some(Direction::Ingress),
            bulkhead_common::direction::EGRESS => Some(Direction::Egress),
            _ => None,
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(feature = "clap")]
impl clap::ValueEnum for Direction {
    fn value_variants<'a>() -> &'a [Self] {
        &Direction::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
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
    /// The Services this address is a backend of (their EndpointSlices list it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<NamespacedName>,
}

/// The Service a connection was addressed to, before the datapath translated its ClusterIP
/// to the backend the flow's destination shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowService {
    /// The Service (JSON: its `namespace` and `name` fields inline).
    #[serde(flatten)]
    pub service: NamespacedName,
    /// The Service port's name (absent for a single unnamed port).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub port_name: String,
    /// The ClusterIP the client dialled.
    pub vip: Ipv4Addr,
    /// The Service port the client dialled.
    pub port: u16,
}

impl FlowPeer {
    /// The pod, when known.
    pub fn pod_name(&self) -> Option<NamespacedName> {
        Some(NamespacedName::new(self.namespace.as_deref()?, self.pod.as_deref()?))
    }

    /// Whether the address is the pod `wanted`.
    pub fn is(&self, wanted: &NamespacedName) -> bool {
        self.namespace.as_deref() == Some(wanted.namespace.as_str()) && self.pod.as_deref() == Some(wanted.name.as_str())
    }
}

/// The policy rule that allowed a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRule {
    /// The policy (JSON: its `namespace` and `name` fields inline).
    #[serde(flatten)]
    pub policy: NamespacedName,
    /// `ingress` or `egress`: the rule list.
    pub direction: Direction,
    /// Index of the rule in that list.
    pub rule: usize,
}

/// A policy, by name; JSON `{"namespace":…,"name":…}`.
pub type PolicyName = NamespacedName;

/// Serde for flow times: RFC 3339 in UTC with all nine fractional digits, e.g.
/// `2026-11-28T13:46:31.533538165Z` (a user-visible format: `observe -o json`).
pub mod time_text {
    use serde::{Deserialize, Deserializer, Serializer};

    /// The format of [`time_text`](self).
    pub fn format(t: &jiff::Timestamp) -> impl std::fmt::Display + '_ {
        t.strftime("%Y-%m-%dT%H:%M:%S.%NZ")
    }

    /// Writes the time with nine fractional digits.
    pub fn serialize<S: Serializer>(t: &jiff::Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format(t))
    }

    /// Reads any RFC 3339 time.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<jiff::Timestamp, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One flow record, as `bulkhead observe -o json` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// When the packet was seen; RFC 3339 in UTC with nine fractional digits on the wire.
    #[serde(with = "time_text")]
    pub time: jiff::Timestamp,
    /// The node whose agent reported it.
    pub node: String,
    /// What happened.
    pub verdict: FlowVerdict,
    /// Why it was dropped (or, under audit, would have been): a stable drop reason name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    /// Direction at the local endpoint.
    pub direction: Direction,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, or the protocol number.
    pub protocol: Protocol,
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
    /// The Service the client dialled, when the destination was translated from its
    /// ClusterIP (reported by the client's node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<FlowService>,
    /// What the record reports: a packet (absent in JSON), or a tracked connection's byte
    /// counts (`update`: periodically while it lasts, `end`: when it closes).
    #[serde(default, skip_serializing_if = "FlowKind::is_packet")]
    pub kind: FlowKind,
    /// For `update` and `end` records: the bytes the connection carried so far, counted
    /// from its first packet, in each direction (`source` is the side that opened it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<FlowBytes>,
}

/// What a flow record reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowKind {
    /// One packet: a new flow's first (its verdict), or a dropped one.
    #[default]
    Packet,
    /// A tracked connection's byte counts so far, while it lasts.
    Update,
    /// A tracked connection's final byte counts, when it closed.
    End,
}

impl FlowKind {
    /// Whether this is a packet record (the default, not written in JSON).
    pub fn is_packet(&self) -> bool {
        *self == FlowKind::Packet
    }
}

/// A connection's byte counts, as `update` and `end` records carry them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowBytes {
    /// Bytes (IP packets' lengths) from the record's source to its destination.
    pub to_destination: u64,
    /// Bytes from the destination back to the source.
    pub to_source: u64,
}

impl Flow {
    /// Whether the flow went to `service`: addressed to its ClusterIP, or to one of its
    /// backends.
    pub fn to_service(&self, service: &NamespacedName) -> bool {
        self.service.as_ref().is_some_and(|s| s.service == *service) || self.destination.services.contains(service)
    }

    /// Whether `service` is on either side: [`Flow::to_service`], or sent by one of its
    /// backends.
    pub fn has_service(&self, service: &NamespacedName) -> bool {
        self.to_service(service) || self.source.services.contains(service)
    }
}

/// Which flows to return. Every set field must match (AND); an unset field matches all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowFilter {
    /// The node whose agent reported the flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `namespace/pod` on either side.
    #[serde(default, with = "name::opt_text", skip_serializing_if = "Option::is_none")]
    pub pod: Option<NamespacedName>,
    /// `namespace/pod` of the source.
    #[serde(default, with = "name::opt_text", skip_serializing_if = "Option::is_none")]
    pub from_pod: Option<NamespacedName>,
    /// `namespace/pod` of the destination.
    #[serde(default, with = "name::opt_text", skip_serializing_if = "Option::is_none")]
    pub to_pod: Option<NamespacedName>,
    /// Namespace of either side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `key=value` (or `key`: present) labels that one side must all carry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<FlowVerdict>,
    /// `namespace/name` of a Service on either side: the one dialled, or one that the
    /// source or destination backs.
    #[serde(default, with = "name::opt_text", skip_serializing_if = "Option::is_none")]
    pub service: Option<NamespacedName>,
    /// `namespace/name` of a Service the flow went to: its ClusterIP, or one of its backends.
    #[serde(default, with = "name::opt_text", skip_serializing_if = "Option::is_none")]
    pub to_service: Option<NamespacedName>,
    /// Drop reason name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    /// Protocol (its name in any case on the wire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Port on either side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Direction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// `namespace/name` of a policy that allowed or isolated the flow.
    #[serde(default, with = "name::opt_text", skip_serializing_if = "Option::is_none")]
    pub policy: Option<NamespacedName>,
    /// What the record reports: packets only, or one kind of byte report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<FlowKind>,
}

fn peer_has_labels(peer: &FlowPeer, labels: &[String]) -> bool {
    labels.iter().all(|l| match l.split_once('=') {
        Some((k, v)) => peer.labels.get(k).is_some_and(|have| have == v),
        None => peer.labels.contains_key(l),
    })
}

impl FlowFilter {
    /// Checks the fields that have a syntax the types do not: label keys are not empty.
    /// (Drop reason names are checked by the agent, which knows them.)
    pub fn validate(&self) -> Result<(), String> {
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
        self.node.as_deref().is_none_or(|n| n == flow.node)
            && self.pod.as_ref().is_none_or(|p| either(&|x| x.is(p)))
            && self.from_pod.as_ref().is_none_or(|p| src.is(p))
            && self.to_pod.as_ref().is_none_or(|p| dst.is(p))
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| either(&|x| x.namespace.as_deref() == Some(ns)))
            && (self.labels.is_empty() || either(&|x| peer_has_labels(x, &self.labels)))
            && self.service.as_ref().is_none_or(|s| flow.has_service(s))
            && self.to_service.as_ref().is_none_or(|s| flow.to_service(s))
            && self.verdict.is_none_or(|v| v == flow.verdict)
            && self.drop_reason.as_deref().is_none_or(|r| flow.drop_reason.as_deref() == Some(r))
            && self.protocol.is_none_or(|p| p == flow.protocol)
            && self.port.is_none_or(|p| src.port == p || dst.port == p)
            && self.direction.is_none_or(|d| d == flow.direction)
            && self
                .policy
                .as_ref()
                .is_none_or(|p| flow.allowed_by.iter().any(|r| r.policy == *p) || flow.isolated_by.contains(p))
            && self.kind.is_none_or(|k| k == flow.kind)
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
            services: vec![],
        }
    }

    fn denied() -> Flow {
        Flow {
            time: "2026-11-28T12:00:00.000000001Z".parse().unwrap(),
            node: "node0".into(),
            verdict: FlowVerdict::Dropped,
            drop_reason: Some("policy_denied".into()),
            direction: Direction::Ingress,
            protocol: Protocol::TCP,
            tcp_flags: Some("SYN".into()),
            source: peer("y", "b", [10, 0, 0, 5], 40000, &[("pod", "b")]),
            destination: peer("x", "c", [10, 0, 0, 3], 80, &[("pod", "c")]),
            allowed_by: vec![],
            isolated_by: vec![PolicyName::new("x", "default-deny-ingress")],
            is_reply: false,
            service: None,
            kind: Default::default(),
            bytes: None,
        }
    }

    fn nn(text: &str) -> NamespacedName {
        text.parse().unwrap()
    }

    #[test]
    fn service_filters_match_the_dialled_service_and_the_services_a_peer_backs() {
        let mut to_vip = denied();
        to_vip.service = Some(FlowService {
            service: nn("x/web"),
            port_name: "http".into(),
            vip: Ipv4Addr::new(10, 96, 0, 20),
            port: 80,
        });
        let mut from_backend = denied();
        from_backend.source.services = vec![nn("y/api")];
        let mut to_backend = denied();
        to_backend.destination.services = vec![nn("x/web")];
        let filter = |service: Option<&str>, to_service: Option<&str>| FlowFilter {
            service: service.map(nn),
            to_service: to_service.map(nn),
            ..FlowFilter::default()
        };
        let matching = |f: &FlowFilter| [&to_vip, &from_backend, &to_backend, &denied()].map(|x| f.matches(x));
        let mut update = denied();
        update.kind = FlowKind::Update;
        let by_kind = |k: Option<FlowKind>| {
            let f = FlowFilter {
                kind: k,
                ..FlowFilter::default()
            };
            [f.matches(&denied()), f.matches(&update)]
        };
        assert_eq!(by_kind(None), [true, true]);
        assert_eq!(by_kind(Some(FlowKind::Packet)), [true, false]);
        assert_eq!(by_kind(Some(FlowKind::Update)), [false, true]);
        assert_eq!(by_kind(Some(FlowKind::End)), [false, false]);
        let json: FlowFilter = serde_json::from_str(r#"{"kind":"update"}"#).unwrap();
        assert_eq!(json.kind, Some(FlowKind::Update));
        assert_eq!(matching(&filter(Some("x/web"), None)), [true, false, true, false]);
        assert_eq!(matching(&filter(Some("y/api"), None)), [false, true, false, false]);
        assert_eq!(matching(&filter(None, Some("x/web"))), [true, false, true, false]);
        assert_eq!(matching(&filter(None, Some("y/api"))), [false, false, false, false]);
        // On the wire: the Service inline, with the VIP and port the client dialled.
        let json = serde_json::to_value(&to_vip).unwrap();
        assert_eq!(
            json["service"],
            serde_json::json!({"namespace": "x", "name": "web", "port_name": "http", "vip": "10.96.0.20", "port": 80})
        );
        let text = serde_json::to_string(&filter(Some("x/web"), Some("x/web"))).unwrap();
        assert_eq!(text, r#"{"service":"x/web","to_service":"x/web"}"#);
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
            f(|x| x.pod = Some(nn("x/c"))),
            f(|x| x.pod = Some(nn("y/b"))),
            f(|x| x.from_pod = Some(nn("y/b"))),
            f(|x| x.to_pod = Some(nn("x/c"))),
            f(|x| x.namespace = Some("y".into())),
            f(|x| x.labels = vec!["pod=c".into()]),
            f(|x| x.labels = vec!["pod".into()]),
            f(|x| x.verdict = Some(FlowVerdict::Dropped)),
            f(|x| x.drop_reason = Some("policy_denied".into())),
            f(|x| x.protocol = Some(Protocol::TCP)),
            f(|x| x.port = Some(80)),
            f(|x| x.port = Some(40000)),
            f(|x| x.direction = Some(Direction::Ingress)),
            f(|x| x.policy = Some(nn("x/default-deny-ingress"))),
            f(|x| x.node = Some("node0".into())),
        ];
        for h in hits {
            assert!(h.matches(&flow), "{h:?} should match");
        }
        let misses = [
            f(|x| x.pod = Some(nn("x/a"))),
            f(|x| x.from_pod = Some(nn("x/c"))),
            f(|x| x.to_pod = Some(nn("y/b"))),
            f(|x| x.namespace = Some("z".into())),
            // Both labels must be on one side.
            f(|x| x.labels = vec!["pod=c".into(), "pod=b".into()]),
            f(|x| x.verdict = Some(FlowVerdict::Forwarded)),
            f(|x| x.drop_reason = Some("spoofed_ip".into())),
            f(|x| x.protocol = Some(Protocol::UDP)),
            f(|x| x.port = Some(81)),
            f(|x| x.direction = Some(Direction::Egress)),
            f(|x| x.policy = Some(nn("x/allow-b"))),
            f(|x| x.node = Some("node1".into())),
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
            policy: nn("x/allow-b"),
            direction: Direction::Ingress,
            rule: 0,
        });
        assert_eq!(
            serde_json::to_string(&flow.allowed_by).unwrap(),
            r#"[{"namespace":"x","name":"allow-b","direction":"ingress","rule":0}]"#
        );
        assert!(f(|x| x.policy = Some(nn("x/allow-b"))).matches(&flow));
        assert!(!f(|x| x.drop_reason = Some("policy_denied".into())).matches(&flow));
    }

    #[test]
    fn filter_validation_checks_labels() {
        assert!(f(|x| x.labels = vec!["k=v".into()]).validate().is_ok());
        let e = f(|x| x.labels = vec!["=v".into()]).validate().unwrap_err();
        assert!(e.starts_with("--label"), "{e}");
        for bad in [
            r#"{"pod":"xa"}"#,
            r#"{"from_pod":"/a"}"#,
            r#"{"to_pod":"x/"}"#,
            r#"{"policy":"x/a/b"}"#,
        ] {
            let e = serde_json::from_str::<FlowFilter>(bad).unwrap_err();
            assert!(e.to_string().contains("NAMESPACE/NAME"), "{bad}: {e}");
        }
    }

    #[test]
    fn flows_order_by_time_not_text() {
        let mut a = denied();
        let mut b = denied();
        a.node = "a".into();
        // As text "…:00.5+…" would not compare; as times a is earlier.
        a.time = "2026-11-28T12:00:00.900000000Z".parse().unwrap();
        b.time = "2026-11-28T13:00:00.100000000+01:00".parse().unwrap();
        let mut flows = [a.clone(), b.clone()];
        flows.sort_by_key(|f| f.time);
        assert_eq!(flows, [b.clone(), a.clone()], "13:00+01:00 is 12:00Z, before 12:00:00.9Z");
        let s = serde_json::to_value(&b).unwrap();
        assert_eq!(s["time"], "2026-11-28T12:00:00.100000000Z", "written in UTC with nine digits");
        let mut whole = denied();
        whole.time = "2026-11-28T12:00:00Z".parse().unwrap();
        assert_eq!(serde_json::to_value(&whole).unwrap()["time"], "2026-11-28T12:00:00.000000000Z");
    }

    #[test]
    fn flow_json_is_stable() {
        let mut flow = denied();
        flow.time = "2026-11-28T13:46:31.533538165Z".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&flow).unwrap(),
            concat!(
                r#"{"time":"2026-11-28T13:46:31.533538165Z","node":"node0","verdict":"DROPPED","#,
                r#""drop_reason":"policy_denied","direction":"ingress","protocol":"TCP","tcp_flags":"SYN","#,
                r#""source":{"namespace":"y","pod":"b","labels":{"pod":"b"},"ip":"10.0.0.5","port":40000,"identity":256},"#,
                r#""destination":{"namespace":"x","pod":"c","labels":{"pod":"c"},"ip":"10.0.0.3","port":80,"identity":256},"#,
                r#""isolated_by":[{"namespace":"x","name":"default-deny-ingress"}],"is_reply":false}"#
            )
        );
        let v: serde_json::Value = serde_json::to_value(&flow).unwrap();
        assert_eq!(v["verdict"], "DROPPED");
        assert_eq!(v["direction"], "ingress");
        assert_eq!(v["source"]["ip"], "10.0.0.5");
        assert_eq!(v["isolated_by"][0]["name"], "default-deny-ingress");
        assert!(v.get("allowed_by").is_none(), "empty lists are omitted");
        assert_eq!(v["is_reply"], false);
        assert_eq!(serde_json::from_value::<Flow>(v).unwrap(), flow);
        let req = Request::Observe(Box::new(ObserveRequest {
            filter: f(|x| x.verdict = Some(FlowVerdict::Dropped)),
            since: None,
            last: Some(3),
            follow: false,
            gaps: false,
        }));
        let s = serde_json::to_string(&req).unwrap();
        assert_eq!(s, r#"{"op":"observe","filter":{"verdict":"DROPPED"},"last":3,"follow":false}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), req);
        let filter = f(|x| {
            x.pod = Some(nn("x/a"));
            x.protocol = Some(Protocol::UDP);
            x.direction = Some(Direction::Egress);
            x.policy = Some(nn("x/p"));
        });
        let s = serde_json::to_string(&filter).unwrap();
        assert_eq!(s, r#"{"pod":"x/a","protocol":"UDP","direction":"egress","policy":"x/p"}"#);
        assert_eq!(serde_json::from_str::<FlowFilter>(&s).unwrap(), filter);
        let old: FlowFilter = serde_json::from_str(r#"{"protocol":"udp"}"#).unwrap();
        assert_eq!(old.protocol, Some(Protocol::UDP), "old clients sent any case");
    }
}
