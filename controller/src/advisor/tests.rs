//! The advisor on hand-made flows: grouping, counting, aggregation, rendering.

use std::collections::BTreeMap;

use super::render::{proposals, render, RenderOptions};
use super::*;
use bulkhead_api::{FlowService, NamespacedName};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// A pod end: `ns/pod` with labels, or an outside address.
fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: &str, port: u16) -> FlowPeer {
    FlowPeer {
        namespace: Some(ns.into()),
        pod: Some(name.into()),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ip: ip.parse().unwrap(),
        port,
        identity: 300,
        services: Vec::new(),
    }
}

fn outside(ip: &str, port: u16) -> FlowPeer {
    FlowPeer {
        namespace: None,
        pod: None,
        labels: BTreeMap::new(),
        ip: ip.parse().unwrap(),
        port,
        identity: 2,
        services: Vec::new(),
    }
}

fn flow(second: i64, verdict: FlowVerdict, direction: Direction, protocol: Protocol, source: FlowPeer, destination: FlowPeer) -> Flow {
    Flow {
        time: jiff::Timestamp::from_second(1_795_867_200 + second).unwrap(),
        node: "node0".into(),
        verdict,
        drop_reason: None,
        direction,
        protocol,
        tcp_flags: None,
        source,
        destination,
        allowed_by: Vec::new(),
        isolated_by: Vec::new(),
        is_reply: false,
        service: None,
        kind: Default::default(),
        bytes: None,
    }
}

/// A connection as both nodes report it: the sender's egress and the receiver's ingress.
fn both_sides(second: i64, verdict: FlowVerdict, protocol: Protocol, source: FlowPeer, destination: FlowPeer) -> [Flow; 2] {
    [
        flow(second, verdict, Direction::Egress, protocol, source.clone(), destination.clone()),
        flow(second, verdict, Direction::Ingress, protocol, source, destination),
    ]
}

const WEB: &[(&str, &str)] = &[("app", "web"), ("pod-template-hash", "aaa")];
const WEB2: &[(&str, &str)] = &[("app", "web"), ("pod-template-hash", "bbb")];
const API: &[(&str, &str)] = &[("app.kubernetes.io/name", "api")];
const DNS: &[(&str, &str)] = &[("k8s-app", "kube-dns")];

fn workload(ns: &str, labels: &[(&str, &str)]) -> Workload {
    Workload::of(ns, &labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap()
}

/// A small shop: two web replicas (another revision each) call the api, which calls DNS
/// through its Service and an outside host; plus a drop, a reply and an ICMP flow.
fn shop() -> Vec<Flow> {
    let mut flows = Vec::new();
    flows.extend(both_sides(
        0,
        FlowVerdict::Forwarded,
        Protocol::TCP,
        pod("web", "web-1", WEB, "10.244.0.5", 40000),
        pod("api", "api-1", API, "10.244.1.7", 8080),
    ));
    // The same connection's records again a moment later: still one connection.
    flows.extend(both_sides(
        1,
        FlowVerdict::Forwarded,
        Protocol::TCP,
        pod("web", "web-1", WEB, "10.244.0.5", 40000),
        pod("api", "api-1", API, "10.244.1.7", 8080),
    ));
    flows.extend(both_sides(
        30,
        FlowVerdict::Audit,
        Protocol::TCP,
        pod("web", "web-2", WEB2, "10.244.0.9", 40001),
        pod("api", "api-2", API, "10.244.0.11", 8080),
    ));
    let mut dns = flow(
        40,
        FlowVerdict::Forwarded,
        Direction::Egress,
        Protocol::UDP,
        pod("api", "api-1", API, "10.244.1.7", 50000),
        pod("kube-system", "dns-1", DNS, "10.244.0.2", 53),
    );
    dns.service = Some(FlowService {
        service: NamespacedName::new("kube-system", "kube-dns"),
        port_name: "dns".into(),
        vip: "10.96.0.10".parse().unwrap(),
        port: 53,
    });
    flows.push(dns);
    flows.push(flow(
        50,
        FlowVerdict::Forwarded,
        Direction::Egress,
        Protocol::TCP,
        pod("api", "api-1", API, "10.244.1.7", 50001),
        outside("203.0.113.10", 443),
    ));
    flows.push(flow(
        51,
        FlowVerdict::Forwarded,
        Direction::Egress,
        Protocol::TCP,
        pod("api", "api-2", API, "10.244.0.11", 50002),
        outside("203.0.113.200", 443),
    ));
    // Not observed traffic: a drop, a reply, ICMP.
    flows.extend(both_sides(
        60,
        FlowVerdict::Dropped,
        Protocol::TCP,
        pod("web", "web-1", WEB, "10.244.0.5", 40002),
        pod("kube-system", "dns-1", DNS, "10.244.0.2", 5432),
    ));
    let mut reply = flow(
        61,
        FlowVerdict::Forwarded,
        Direction::Egress,
        Protocol::TCP,
        pod("api", "api-1", API, "10.244.1.7", 8080),
        pod("web", "web-1", WEB, "10.244.0.5", 40000),
    );
    reply.is_reply = true;
    flows.push(reply);
    flows.push(flow(
        62,
        FlowVerdict::Forwarded,
        Direction::Egress,
        Protocol::ICMP,
        pod("web", "web-1", WEB, "10.244.0.5", 1),
        pod("api", "api-1", API, "10.244.1.7", 0),
    ));
    flows
}

#[test]
fn replicas_group_into_workloads_and_only_observed_traffic_counts() {
    let advice = learn(&shop(), &Options::default()).unwrap();
    let names: Vec<String> = advice.workloads.keys().map(Workload::display).collect();
    assert_eq!(names, ["api/api", "kube-system/kube-dns", "web/web"]);
    let web = &advice.workloads[&workload("web", WEB)];
    assert_eq!(web.pods, 2, "two replicas, two revisions, one workload");
    assert!(web.ingress.is_empty(), "{:?}", web.ingress);
    let to_api = &web.egress[&Peer::Workload(workload("api", API))];
    let e = &to_api[&PortKey {
        protocol: Protocol::TCP,
        port: 8080,
    }];
    assert_eq!((e.connections, e.records, e.audited), (2, 6, 1), "{e:?}");
    assert_eq!(web.egress.len(), 1, "the dropped flow to dns:5432 is not learnt");
    let api = &advice.workloads[&workload("api", API)];
    let from_web = &api.ingress[&Peer::Workload(workload("web", WEB))];
    assert_eq!(from_web.keys().map(|p| p.port).collect::<Vec<_>>(), [8080]);
    assert_eq!(from_web.values().next().unwrap().connections, 2);
    // DNS through its Service: the rule is on the backend's port and names the Service.
    let dns = &api.egress[&Peer::Workload(workload("kube-system", DNS))];
    let e = &dns[&PortKey {
        protocol: Protocol::UDP,
        port: 53,
    }];
    assert_eq!(e.services.iter().collect::<Vec<_>>(), ["kube-system/kube-dns"]);
    // Both outside addresses fall in one /24.
    let nets: Vec<&Peer> = api.egress.keys().filter(|p| matches!(p, Peer::Cidr(_))).collect();
    assert_eq!(nets, [&Peer::Cidr("203.0.113.0/24".parse().unwrap())]);
    let dns_pods = &advice.workloads[&workload("kube-system", DNS)];
    assert!(dns_pods.egress.is_empty() && dns_pods.ingress.len() == 1);
    assert_eq!((advice.ignored.dropped, advice.ignored.replies, advice.ignored.protocol), (2, 1, 1));
}

#[test]
fn cidr_prefix_is_configurable() {
    let advice = learn(
        &shop(),
        &Options {
            cidr_prefix: 32,
            ..Options::default()
        },
    )
    .unwrap();
    let api = &advice.workloads[&workload("api", API)];
    let nets: Vec<String> = api
        .egress
        .keys()
        .filter_map(|p| match p {
            Peer::Cidr(n) => Some(n.to_string()),
            Peer::Workload(_) => None,
        })
        .collect();
    assert_eq!(nets, ["203.0.113.10/32", "203.0.113.200/32"]);
    assert_eq!(
        learn(
            &shop(),
            &Options {
                cidr_prefix: 0,
                ..Options::default()
            }
        ),
        Err(AdviseError::BadPrefix(0))
    );
}

#[test]
fn namespace_filter_and_bad_input() {
    let only_api = learn(
        &shop(),
        &Options {
            namespace: Some("api".into()),
            ..Options::default()
        },
    )
    .unwrap();
    assert_eq!(only_api.workloads.keys().map(Workload::display).collect::<Vec<_>>(), ["api/api"]);
    let e = learn(
        &shop(),
        &Options {
            namespace: Some("nope".into()),
            ..Options::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown namespace \"nope\""), "{e}");
    assert!(e.to_string().contains("api, kube-system, web"), "{e}");
    let e = learn(&[], &Options::default()).unwrap_err();
    assert!(e.to_string().contains("flow history is empty"), "{e}");
    let dropped: Vec<Flow> = shop().into_iter().filter(|f| f.verdict == FlowVerdict::Dropped).collect();
    let e = learn(&dropped, &Options::default()).unwrap_err();
    assert!(e.to_string().contains("2 dropped"), "{e}");
    // A pod with only per-replica labels cannot be grouped: named, never guessed.
    let lonely = both_sides(
        0,
        FlowVerdict::Forwarded,
        Protocol::TCP,
        pod("x", "p-1", &[("pod-template-hash", "1")], "10.0.0.1", 1),
        pod("x", "q", &[], "10.0.0.2", 80),
    );
    let e = learn(&lonely, &Options::default()).unwrap_err();
    assert!(e.to_string().contains("unlabelled pods"), "{e}");
}

#[test]
fn rendered_policies_are_exact_commented_and_applyable() {
    let advice = learn(&shop(), &Options::default()).unwrap();
    let ps = proposals(&advice, RenderOptions::default());
    let text = render(&ps).unwrap();
    // The lab (and the agent's manifest source) accepts it as is.
    let objects = crate::model::parse_documents(&text, "advised.yaml").unwrap();
    assert_eq!(objects.len(), 3);
    let api: &k8s_openapi::api::networking::v1::NetworkPolicy = &ps[0].policy;
    assert_eq!(api.metadata.name.as_deref(), Some("advised-api"));
    assert_eq!(api.metadata.namespace.as_deref(), Some("api"));
    let spec = api.spec.as_ref().unwrap();
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_string(), "Egress".to_string()][..])
    );
    let ingress = spec.ingress.as_ref().unwrap();
    assert_eq!(ingress.len(), 1, "one rule per peer");
    let from = &ingress[0].from.as_ref().unwrap()[0];
    assert_eq!(
        from.namespace_selector.as_ref().unwrap().match_labels.as_ref().unwrap()["kubernetes.io/metadata.name"],
        "web"
    );
    assert_eq!(
        from.pod_selector.as_ref().unwrap().match_labels,
        Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
        "the workload label, never the revision"
    );
    let egress = spec.egress.as_ref().unwrap();
    assert_eq!(egress.len(), 2);
    assert_eq!(egress[1].to.as_ref().unwrap()[0].ip_block.as_ref().unwrap().cidr, "203.0.113.0/24");
    let port = &egress[1].ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.protocol.as_deref(), port.port.clone()),
        (Some("TCP"), Some(IntOrString::Int(443)))
    );
    for needle in [
        "# api/api (app.kubernetes.io/name=api): 2 pods seen",
        "# from web/web (app=web)",
        "#   8080/TCP: 2 connections (1 audited), first seen 2026-11-28T12:00:00Z, last seen 2026-11-28T12:00:30Z",
        "via Service kube-system/kube-dns (DNS)",
        "# to 203.0.113.0/24 (outside the cluster's pods)",
        "# no connection from it was seen: all egress denied",
        "  egress: []",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in\n{text}");
    }
    for forbidden in ["web-1", "api-2", "10.244.", "pod-template-hash"] {
        assert!(!text.contains(forbidden), "{forbidden:?} in\n{text}");
    }
    assert!(!text.contains("bulkhead.io/audit"));
    let audited = render(&proposals(&advice, RenderOptions { audit: true })).unwrap();
    let objects = crate::model::parse_documents(&audited, "audit.yaml").unwrap();
    assert_eq!(
        audited.matches("bulkhead.io/audit: 'true'").count() + audited.matches("bulkhead.io/audit: \"true\"").count(),
        3,
        "{audited}"
    );
    assert_eq!(objects.len(), 3);
}

#[test]
fn same_namespace_peers_use_a_pod_selector_alone() {
    let flows = both_sides(
        0,
        FlowVerdict::Forwarded,
        Protocol::TCP,
        pod("x", "a-1", &[("app", "a")], "10.0.0.1", 40000),
        pod("x", "b-1", &[("app", "b")], "10.0.0.2", 80),
    );
    let advice = learn(&flows, &Options::default()).unwrap();
    let ps = proposals(&advice, RenderOptions::default());
    let b = ps.iter().find(|p| p.policy.metadata.name.as_deref() == Some("advised-b")).unwrap();
    let peer = &b.policy.spec.as_ref().unwrap().ingress.as_ref().unwrap()[0].from.as_ref().unwrap()[0];
    assert!(peer.namespace_selector.is_none());
    assert!(peer.pod_selector.is_some());
}

/// Minimal and complete, on the spec's own evaluator: in a cluster with the shop's pods, a
/// new replica of a new revision and a pod nobody saw, the rendered policies allow exactly
/// the learnt (workload, workload, port) triples, for every ordered pair of pods.
#[test]
fn rendered_policies_allow_exactly_what_was_learnt() {
    let advice = learn(&shop(), &Options::default()).unwrap();
    let policies = render(&proposals(&advice, RenderOptions::default())).unwrap();
    type Labels = &'static [(&'static str, &'static str)];
    let pods: [(&str, &str, Labels); 5] = [
        ("web", "web-1", WEB),
        ("web", "web-3", &[("app", "web"), ("pod-template-hash", "ccc")]),
        ("api", "api-1", API),
        ("api", "other", &[("app", "other")]),
        ("kube-system", "dns-1", DNS),
    ];
    let mut text = String::new();
    for ns in ["web", "api", "kube-system"] {
        text.push_str(&format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"));
    }
    for (i, (ns, name, labels)) in pods.iter().enumerate() {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("\"{k}\": \"{v}\"")).collect();
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{}}}}}\nstatus: {{podIP: 10.244.9.{}}}\n",
            labels.join(", "),
            i + 1
        ));
    }
    text.push_str(&policies);
    let cluster = crate::model::Cluster::from_objects(crate::model::parse_documents(&text, "test").unwrap());
    let workload_of = |name: &str| match name {
        "web-1" | "web-3" => "web",
        "api-1" => "api",
        "dns-1" => "dns",
        _ => "other",
    };
    let learnt = [("web", "api", "TCP", 8080), ("api", "dns", "UDP", 53)];
    let mut allowed = 0;
    for (from_ns, from, _) in &pods {
        for (to_ns, to, _) in &pods {
            if from == to {
                continue;
            }
            for (proto, port) in [("TCP", 8080), ("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 5432)] {
                let v = crate::policy::evaluate::evaluate(&cluster, (from_ns, from), (to_ns, to), proto, port);
                let want = learnt.contains(&(workload_of(from), workload_of(to), proto, port));
                assert_eq!(v.allowed, want, "{from_ns}/{from} -> {to_ns}/{to} {port}/{proto}: {v:?}");
                allowed += usize::from(want);
            }
        }
    }
    // web-1 and web-3 to api-1; api-1 to dns-1.
    assert_eq!(allowed, 3);
}

#[test]
fn byte_reports_teach_nothing_and_count_no_connection() {
    let options = Options::default();
    let base = learn(&shop(), &options).unwrap();
    // Every connection of the shop again as update and end records, at later times and
    // with other source ports, which would be new connections if they counted.
    let mut flows = shop();
    for (i, f) in shop().into_iter().enumerate() {
        for kind in [bulkhead_api::FlowKind::Update, bulkhead_api::FlowKind::End] {
            let mut r = f.clone();
            r.time = jiff::Timestamp::from_second(1_795_867_200 + 3600 + i as i64).unwrap();
            r.source.port = r.source.port.wrapping_add(7);
            r.kind = kind;
            r.bytes = Some(bulkhead_api::FlowBytes {
                to_destination: 100,
                to_source: 50,
            });
            flows.push(r);
        }
    }
    let with_reports = learn(&flows, &options).unwrap();
    assert_eq!(format!("{with_reports:?}"), format!("{base:?}"));
}
