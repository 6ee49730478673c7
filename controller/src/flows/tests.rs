//! Flow store, resolver and stream tests.

use std::net::Ipv4Addr;
use std::sync::Arc;

use bulkhead_api::{Direction, Flow, FlowVerdict, ObserveRequest, PolicyName, PolicyRule, Protocol};
use bulkhead_common::{direction, proto, rule_id, verdict, DropReason, FlowEvent};

use super::resolve::tcp_flags;
use super::*;
use crate::model::parse_documents;
use crate::model::Cluster;
use crate::policy::{self, LocalEndpoint};
use bulkhead_api::FlowFilter;
use std::time::Duration;

const MODEL: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
status: {podIP: 10.9.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x, labels: {pod: c}}
status: {podIP: 10.9.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: y, labels: {pod: b}}
status: {podIP: 10.9.1.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {}
      podSelector: {matchLabels: {pod: b}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: audit-ingress, namespace: x, annotations: {bulkhead.io/audit: \"true\"}}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: audit-egress-c, namespace: x, annotations: {bulkhead.io/audit: \"true\"}}
spec:
  podSelector: {matchLabels: {pod: c}}
  policyTypes: [Egress]
";

fn locals() -> Vec<LocalEndpoint> {
    vec![
        LocalEndpoint {
            endpoint_id: 1,
            host_ifindex: 11,
            namespace: "x".into(),
            pod: "a".into(),
            ipv4: Ipv4Addr::new(10, 9, 0, 1),
            mac: [2, 0, 0, 0, 0, 1],
        },
        LocalEndpoint {
            endpoint_id: 3,
            host_ifindex: 13,
            namespace: "x".into(),
            pod: "c".into(),
            ipv4: Ipv4Addr::new(10, 9, 0, 3),
            mac: [2, 0, 0, 0, 0, 3],
        },
    ]
}

/// A resolver over MODEL compiled as the agent does, and the allow-b rule's id.
fn resolver() -> (Resolver, u32) {
    let cluster = Cluster::from_objects(parse_documents(MODEL, "test").unwrap());
    let mut compiler = policy::Compiler::new();
    compiler.compile(&cluster, &locals());
    let (allow_id, _) = compiler
        .rules()
        .iter()
        .find(|(_, r)| r.policy == "allow-b")
        .expect("allow-b has a rule");
    (Resolver::build("node0", &cluster, compiler.rules(), &locals()), allow_id)
}

fn event(endpoint_id: u32, from: [u8; 4], to: [u8; 4], dir: u8, verdict: u8, reason: DropReason, rule: u32) -> FlowEvent {
    FlowEvent {
        timestamp_ns: 5_000_000_000,
        endpoint_id,
        identity: 300,
        remote_identity: 301,
        rule_id: rule,
        saddr: from,
        daddr: to,
        sport: 40000u16.to_be_bytes(),
        dport: 80u16.to_be_bytes(),
        packet_len: 60,
        protocol: proto::TCP,
        direction: dir,
        verdict,
        reason: reason as u8,
        tcp_flags: 0x02,
        kind: bulkhead_common::flow_kind::PACKET,
        service_id: 0,
        to_destination: 0,
        to_source: 0,
    }
}

const B: [u8; 4] = [10, 9, 1, 2];
const XA: [u8; 4] = [10, 9, 0, 1];
const XC: [u8; 4] = [10, 9, 0, 3];

#[test]
fn default_deny_drop_names_the_isolating_policy() {
    let (r, _) = resolver();
    let ev = event(
        3,
        B,
        XC,
        direction::INGRESS,
        verdict::DROPPED,
        DropReason::PolicyDenied,
        rule_id::NONE,
    );
    let f = r.resolve(&ev, 1_700_000_000_000_000_007).unwrap();
    assert_eq!(serde_json::to_value(&f).unwrap()["time"], "2023-11-14T22:13:20.000000007Z");
    assert_eq!(f.node, "node0");
    assert_eq!(f.verdict, FlowVerdict::Dropped);
    assert_eq!(f.drop_reason.as_deref(), Some("policy_denied"));
    assert_eq!(f.direction, Direction::Ingress);
    assert_eq!(f.protocol, Protocol::TCP);
    assert_eq!(f.tcp_flags.as_deref(), Some("SYN"));
    assert_eq!(f.source.pod_name().map(|p| p.to_string()).as_deref(), Some("y/b"));
    assert_eq!((f.source.port, f.source.identity), (40000, 301));
    assert_eq!(f.source.labels.get("pod").map(String::as_str), Some("b"));
    assert_eq!(f.destination.pod_name().map(|p| p.to_string()).as_deref(), Some("x/c"));
    assert_eq!((f.destination.port, f.destination.identity), (80, 300));
    assert!(f.allowed_by.is_empty());
    assert_eq!(
        f.isolated_by,
        vec![PolicyName {
            namespace: "x".into(),
            name: "default-deny-ingress".into()
        }]
    );
}

#[test]
fn allowed_flow_names_its_rule_and_an_egress_flow_is_local_on_the_source_side() {
    let (r, allow_id) = resolver();
    let ev = event(1, B, XA, direction::INGRESS, verdict::FORWARDED, DropReason::Forwarded, allow_id);
    let f = r.resolve(&ev, 0).unwrap();
    assert_eq!(f.verdict, FlowVerdict::Forwarded);
    assert_eq!(f.drop_reason, None);
    assert_eq!(
        f.allowed_by,
        vec![PolicyRule {
            policy: PolicyName::new("x", "allow-b"),
            direction: Direction::Ingress,
            rule: 0
        }]
    );
    assert!(f.isolated_by.is_empty());
    // x/a not isolated for egress: forwarded with no rule, and names nothing.
    let ev = event(
        1,
        XA,
        [192, 0, 2, 1],
        direction::EGRESS,
        verdict::FORWARDED,
        DropReason::Forwarded,
        0,
    );
    let f = r.resolve(&ev, 0).unwrap();
    assert_eq!(f.source.pod_name().map(|p| p.to_string()).as_deref(), Some("x/a"));
    assert_eq!(f.source.identity, 300, "the local side carries the endpoint's identity");
    assert_eq!(f.destination.pod, None, "an outside address is not a pod");
    assert!(f.destination.labels.is_empty(), "identity 301 is not a reserved one");
    assert_eq!(f.destination.ip, Ipv4Addr::new(192, 0, 2, 1));
    assert!(f.allowed_by.is_empty() && f.isolated_by.is_empty());
    let mut from_host = event(
        1,
        [10, 9, 0, 254],
        XA,
        direction::INGRESS,
        verdict::FORWARDED,
        DropReason::Forwarded,
        0,
    );
    from_host.remote_identity = bulkhead_common::identity::HOST;
    let f = r.resolve(&from_host, 0).unwrap();
    assert!(f.source.labels.contains_key("reserved:host"), "{:?}", f.source);
}

#[test]
fn other_drops_and_unknown_numbers() {
    let (r, _) = resolver();
    let ev = event(3, [10, 9, 9, 9], XA, direction::EGRESS, verdict::DROPPED, DropReason::SpoofedIp, 0);
    let f = r.resolve(&ev, 0).unwrap();
    assert_eq!(f.drop_reason.as_deref(), Some("spoofed_ip"));
    assert!(f.isolated_by.is_empty(), "not a policy drop");
    assert_eq!(
        f.source.pod_name().map(|p| p.to_string()).as_deref(),
        Some("x/c"),
        "endpoint id names the local side"
    );
    let mut ev = event(9, B, XC, direction::INGRESS, verdict::DROPPED, DropReason::PolicyDenied, 0);
    ev.reason = 200;
    let f = r.resolve(&ev, 0).unwrap();
    assert_eq!(f.drop_reason.as_deref(), Some("unknown_200"));
    assert_eq!(
        f.destination.pod_name().map(|p| p.to_string()).as_deref(),
        Some("x/c"),
        "unknown endpoint id: by address"
    );
    ev.verdict = 9;
    assert!(r.resolve(&ev, 0).is_none());
    let mut udp = event(3, B, XC, direction::INGRESS, verdict::FORWARDED, DropReason::Forwarded, 0);
    udp.protocol = proto::UDP;
    let f = r.resolve(&udp, 0).unwrap();
    assert_eq!((f.protocol, f.tcp_flags.as_deref()), (Protocol::UDP, None));
    udp.protocol = 47;
    assert_eq!(serde_json::to_value(r.resolve(&udp, 0).unwrap()).unwrap()["protocol"], "47");
    udp.protocol = 0;
    assert_eq!(serde_json::to_value(r.resolve(&udp, 0).unwrap()).unwrap()["protocol"], "non-IPv4");
    assert_eq!(tcp_flags(0x12), "SYN|ACK");
}

#[test]
fn audit_names_the_would_be_isolating_policies() {
    let (r, _) = resolver();
    // x/c's egress is isolated only by an audit-mode policy: the AUDIT flow names it.
    let ev = event(3, XC, B, direction::EGRESS, verdict::AUDIT, DropReason::Forwarded, 0);
    let f = r.resolve(&ev, 0).unwrap();
    assert_eq!(f.verdict, FlowVerdict::Audit);
    assert_eq!(
        f.isolated_by,
        vec![PolicyName {
            namespace: "x".into(),
            name: "audit-egress-c".into()
        }]
    );
    // x/c's ingress is enforced (default-deny) as well as audited: a drop names only
    // the enforcing policy, which alone decides.
    let ev = event(3, B, XC, direction::INGRESS, verdict::DROPPED, DropReason::PolicyDenied, 0);
    let names: Vec<String> = r.resolve(&ev, 0).unwrap().isolated_by.into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["default-deny-ingress"]);
}

#[test]
fn decode_reads_a_record_and_rejects_a_short_one() {
    let ev = event(3, B, XC, direction::INGRESS, verdict::DROPPED, DropReason::PolicyDenied, 0);
    // SAFETY: reading a Pod struct's bytes.
    let bytes = unsafe { std::slice::from_raw_parts((&ev as *const FlowEvent).cast::<u8>(), size_of::<FlowEvent>()) };
    let mut unaligned = vec![0u8];
    unaligned.extend_from_slice(bytes);
    assert_eq!(decode(&unaligned[1..]), Some(ev));
    assert_eq!(decode(&bytes[..47]), None);
}

fn store(capacity: usize) -> FlowStore {
    let s = FlowStore::new("node0", capacity, Clock::with_offset(1_000));
    s.set_resolver(resolver().0);
    s
}

fn numbered(n: u64) -> FlowEvent {
    let mut ev = event(3, B, XC, direction::INGRESS, verdict::DROPPED, DropReason::PolicyDenied, 0);
    ev.timestamp_ns = n;
    ev.sport = u16::try_from(n).unwrap().to_be_bytes();
    ev
}

fn sports(flows: &[Flow]) -> Vec<u16> {
    flows.iter().map(|f| f.source.port).collect()
}

#[test]
fn history_is_bounded_and_answers_since_last_and_filters() {
    let s = store(4);
    s.record(&(1..=6).map(numbered).collect::<Vec<_>>());
    let all = s.snapshot(&ObserveRequest::default());
    assert_eq!(sports(&all), vec![3, 4, 5, 6], "the oldest flows fall out");
    let last2 = s.snapshot(&ObserveRequest {
        last: Some(2),
        ..ObserveRequest::default()
    });
    assert_eq!(sports(&last2), vec![5, 6]);
    // Times are monotonic readings plus the clock offset (1000 ns).
    let since = s.snapshot(&ObserveRequest {
        since: Some(1_004),
        ..ObserveRequest::default()
    });
    assert_eq!(sports(&since), vec![4, 5, 6]);
    let none = s.snapshot(&ObserveRequest {
        filter: FlowFilter {
            verdict: Some(FlowVerdict::Forwarded),
            ..FlowFilter::default()
        },
        ..ObserveRequest::default()
    });
    assert!(none.is_empty());
    let stats = s.stats();
    assert_eq!(stats.stored, 4);
    assert_eq!(stats.flows.get(&(FlowVerdict::Dropped, Direction::Ingress)), Some(&6));
    assert_eq!(
        stats
            .by_policy
            .get(&(PolicyName::new("x", "default-deny-ingress"), FlowVerdict::Dropped)),
        Some(&6)
    );
    let zero = store(0);
    zero.record(&[numbered(1)]);
    assert!(zero.snapshot(&ObserveRequest::default()).is_empty());
}

#[test]
fn unknown_drop_reason_is_refused() {
    let mut req = ObserveRequest::default();
    req.filter.drop_reason = Some("policy_denied".into());
    assert!(validate(&req).is_ok());
    req.filter.drop_reason = Some("nope".into());
    let e = validate(&req).unwrap_err();
    assert!(e.contains("unknown drop reason \"nope\"") && e.contains("policy_denied"), "{e}");
}

fn lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn serve_streams_history_then_follows_until_the_client_leaves() {
    let s = Arc::new(store(16));
    s.record(&[numbered(1)]);
    let (client, server) = tokio::io::duplex(1 << 16);
    let (server_read, server_write) = tokio::io::split(server);
    let req = ObserveRequest {
        follow: true,
        ..ObserveRequest::default()
    };
    let task = tokio::spawn(serve(s.clone(), req, server_read, server_write));
    let (mut client_read, client_write) = tokio::io::split(client);
    let mut buf = vec![0u8; 1 << 16];
    let n = client_read.read(&mut buf).await.unwrap();
    assert_eq!(lines(&buf[..n])[0]["source"]["port"], 1);
    s.record(&[numbered(2)]);
    let n = client_read.read(&mut buf).await.unwrap();
    assert_eq!(lines(&buf[..n])[0]["source"]["port"], 2);
    drop(client_write);
    drop(client_read);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve ends when the client leaves")
        .unwrap();
}

#[tokio::test]
async fn serve_refuses_a_bad_filter_with_an_error_line() {
    let s = Arc::new(store(16));
    let mut req = ObserveRequest::default();
    req.filter.labels = vec!["=v".into()];
    let mut out = Vec::new();
    serve(s, req, tokio::io::empty(), &mut out).await;
    let got = lines(&out);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["result"], "error");
    assert!(got[0]["message"].as_str().unwrap().contains("--label"));
}

#[tokio::test]
async fn a_stalled_follower_never_blocks_recording() {
    let s = Arc::new(store(8));
    // A 64-byte pipe the client never reads: the server's first write blocks.
    let (_client, server) = tokio::io::duplex(64);
    let (server_read, server_write) = tokio::io::split(server);
    let req = ObserveRequest {
        follow: true,
        ..ObserveRequest::default()
    };
    let task = tokio::spawn(serve(s.clone(), req, server_read, server_write));
    tokio::task::yield_now().await;
    let started = std::time::Instant::now();
    for round in 0..(FOLLOW_BUFFER as u64 * 2 / 64 + 2) {
        s.record(&(0..64).map(|i| numbered(round * 64 + i % 60 + 1)).collect::<Vec<_>>());
        tokio::task::yield_now().await;
    }
    assert!(started.elapsed() < Duration::from_secs(2), "recording waited on the follower");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.stats().stored, 8);
    task.abort();
}

#[test]
fn a_translated_flow_names_the_service_and_peers_name_the_services_they_back() {
    let yaml = format!(
        "{MODEL}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: x}}\n\
         spec: {{clusterIP: 10.96.0.20, ports: [{{name: http, port: 80}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: x, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 80, protocol: TCP}}]\n\
         endpoints: [{{addresses: [10.9.0.3]}}]\n"
    );
    let cluster = Cluster::from_objects(parse_documents(&yaml, "test").unwrap());
    let mut compiler = policy::Compiler::new();
    compiler.compile(&cluster, &locals());
    let table = crate::services::ServiceTable::from_cluster(&cluster);
    let mut ids = crate::datapath::services::ServiceIds::default();
    ids.write(&table, &mut crate::datapath::DatapathState::default());
    let r = Resolver::build("node0", &cluster, compiler.rules(), &locals()).with_services(&table, &ids.by_id());

    // a dialled 10.96.0.20:80 and was sent to c (the record shows the backend).
    let mut ev = event(
        1,
        XA,
        XC,
        direction::EGRESS,
        verdict::FORWARDED,
        DropReason::Forwarded,
        rule_id::NONE,
    );
    ev.service_id = 1;
    let f = r.resolve(&ev, 1).unwrap();
    let svc = f.service.as_ref().expect("the Service is named");
    assert_eq!(svc.service.to_string(), "x/web");
    assert_eq!(
        (svc.port_name.as_str(), svc.vip, svc.port),
        ("http", Ipv4Addr::new(10, 96, 0, 20), 80)
    );
    assert_eq!(
        f.destination.services.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["x/web"]
    );
    assert!(f.source.services.is_empty());
    // Without an id the flow was not translated; an unknown id names nothing.
    ev.service_id = 0;
    assert_eq!(r.resolve(&ev, 1).unwrap().service, None);
    ev.service_id = 9;
    assert_eq!(r.resolve(&ev, 1).unwrap().service, None);
}

/// The agent's pod index, updated from what each change touched, names every address as
/// one built from the whole model does — through adds, relabels, moves to another address,
/// deletes, and two pods claiming one address.
#[test]
fn the_pod_index_updated_from_changes_equals_one_rebuilt_from_the_model() {
    use crate::flows::PodIndex;
    use crate::model::{parse_documents, Kind, ObjectRef};
    let pod = |ns: &str, name: &str, ip: &str, app: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\nstatus: {{podIP: {ip}}}\n")
    };
    let r = |ns: &str, name: &str| ObjectRef {
        kind: Kind::Pod,
        namespace: Some(ns.into()),
        name: name.into(),
    };
    let mut cluster = Cluster::default();
    let mut index = PodIndex::default();
    let step = |cluster: &mut Cluster, index: &mut PodIndex, apply: &[String], delete: &[ObjectRef], what: &str| {
        let mut touched = Vec::new();
        for text in apply {
            for object in parse_documents(text, "test").unwrap() {
                touched.push(object.to_ref());
                cluster.apply(object);
            }
        }
        for d in delete {
            cluster.delete(d);
            touched.push(d.clone());
        }
        index.update(cluster, &touched);
        assert_eq!(index.snapshot(), PodIndex::new(cluster).snapshot(), "after {what}");
    };
    step(
        &mut cluster,
        &mut index,
        &[pod("a", "p1", "10.0.0.1", "x"), pod("a", "p2", "10.0.0.2", "y")],
        &[],
        "the first pods",
    );
    assert_eq!(index.snapshot().len(), 2);
    step(&mut cluster, &mut index, &[pod("b", "p3", "10.0.0.3", "z")], &[], "an add");
    step(&mut cluster, &mut index, &[pod("a", "p1", "10.0.0.1", "x2")], &[], "a relabel");
    step(&mut cluster, &mut index, &[pod("a", "p2", "10.0.0.9", "y")], &[], "a new address");
    // Two pods on one address: the later one by (namespace, name) is named; then either goes.
    step(
        &mut cluster,
        &mut index,
        &[pod("c", "p4", "10.0.0.1", "w")],
        &[],
        "a second claim (later)",
    );
    step(
        &mut cluster,
        &mut index,
        &[pod("aa", "p5", "10.0.0.1", "v")],
        &[],
        "a third claim (earlier)",
    );
    step(&mut cluster, &mut index, &[], &[r("c", "p4")], "the named claimant's delete");
    step(&mut cluster, &mut index, &[], &[r("aa", "p5")], "an unnamed claimant's delete");
    step(
        &mut cluster,
        &mut index,
        &[],
        &[r("a", "p1"), r("b", "p3"), r("x", "never")],
        "deletes",
    );
    assert_eq!(index.snapshot().len(), 1);
}

/// A byte report as the datapath writes it: the connection's tuple (x/a opened it to y/b's
/// port 80, seen at x/a's egress), its rule, FORWARDED, and the counts.
fn byte_report(kind: u8, rule: u32) -> FlowEvent {
    let mut ev = event(1, XA, B, direction::EGRESS, verdict::FORWARDED, DropReason::Forwarded, rule);
    ev.kind = kind;
    ev.tcp_flags = 0x11;
    ev.to_destination = 5_000;
    ev.to_source = 70_000;
    ev
}

#[test]
fn byte_reports_name_the_opener_and_its_peer_and_carry_the_counts() {
    use bulkhead_api::{FlowBytes, FlowKind};
    use bulkhead_common::flow_kind;
    let (r, allow_id) = resolver();
    let f = r.resolve(&byte_report(flow_kind::END, allow_id), 0).unwrap();
    assert_eq!(f.kind, FlowKind::End);
    assert_eq!(
        f.bytes,
        Some(FlowBytes {
            to_destination: 5_000,
            to_source: 70_000
        })
    );
    assert_eq!(f.verdict, FlowVerdict::Forwarded);
    assert_eq!(f.direction, Direction::Egress);
    assert_eq!(f.source.pod_name().map(|p| p.to_string()).as_deref(), Some("x/a"));
    assert_eq!(f.destination.pod_name().map(|p| p.to_string()).as_deref(), Some("y/b"));
    assert_eq!((f.source.port, f.destination.port), (40000, 80));
    assert_eq!(f.allowed_by.len(), 1);
    assert_eq!(f.tcp_flags.as_deref(), Some("FIN|ACK"), "the end's FIN or RST is shown");
    let u = r.resolve(&byte_report(flow_kind::UPDATE, allow_id), 0).unwrap();
    assert_eq!(u.kind, FlowKind::Update);
    assert_eq!(u.tcp_flags, None, "an update's packet is any packet");
    // A packet record has no counts; an unknown kind is not named.
    let p = r.resolve(&byte_report(flow_kind::PACKET, allow_id), 0).unwrap();
    assert_eq!((p.kind, p.bytes), (FlowKind::Packet, None));
    assert!(r.resolve(&byte_report(9, allow_id), 0).is_none());
}

#[test]
fn byte_reports_are_stored_but_counted_apart_from_flows() {
    use bulkhead_api::FlowKind;
    use bulkhead_common::flow_kind;
    let metrics = Arc::new(crate::metrics::Metrics::new().unwrap());
    let s = store(16).with_metrics(metrics.clone());
    s.record(&[
        numbered(1),
        byte_report(flow_kind::UPDATE, 0),
        byte_report(flow_kind::UPDATE, 0),
        byte_report(flow_kind::END, 0),
        byte_report(7, 0),
    ]);
    let stats = s.stats();
    assert_eq!(stats.flows.values().sum::<u64>(), 1, "only the packet record is a flow");
    assert_eq!(stats.byte_reports, [2, 1]);
    assert_eq!(stats.undecodable, 1, "the unknown kind");
    let all = s.snapshot(&ObserveRequest::default());
    assert_eq!(all.len(), 4);
    let ends = s.snapshot(&ObserveRequest {
        filter: FlowFilter {
            kind: Some(FlowKind::End),
            ..FlowFilter::default()
        },
        ..ObserveRequest::default()
    });
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].kind, FlowKind::End);
    let text = metrics.encode().unwrap();
    assert!(text.contains("bulkhead_flow_byte_reports_total{kind=\"update\"} 2"), "{text}");
    assert!(text.contains("bulkhead_flow_byte_reports_total{kind=\"end\"} 1"), "{text}");
    let flows: u64 = text
        .lines()
        .filter(|l| l.starts_with("bulkhead_flows_processed_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(flows, 1, "{text}");
}
