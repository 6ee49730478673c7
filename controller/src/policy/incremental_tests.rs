//! The incremental compiler against the full one: random event sequences (pod add, delete,
//! relabel, address and named-port changes; namespace relabel, audit annotation and
//! deletion; policy add, change and delete with selectors, named ports and ipBlocks; local
//! endpoint add and delete) go through [`Compiler::update`], and after every event
//! (1) a clone of the same compiler running [`Compiler::compile`] gives the same state, ids
//! and over-cap list, and (2) the emitted delta applied to the previous state gives the new
//! one.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Container, ContainerPort, Namespace, Pod, PodSpec, PodStatus};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;

use crate::datapath::state::DatapathState;
use crate::model::{Cluster, Kind, Object, ObjectRef, PodInfo, NAMESPACE_AUDIT_ANNOTATION, POLICY_AUDIT_ANNOTATION};

use super::{Compiler, LocalEndpoint};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: usize = 4;
const POLICIES: usize = 3;
const APPS: [&str; 3] = ["web", "db", "api"];
/// Pod addresses: few, so pods share them (the ipcache `/32` goes to the last by name).
const IPS: [[u8; 4]; 6] = [
    [10, 0, 0, 1],
    [10, 0, 0, 2],
    [10, 0, 0, 3],
    [10, 0, 1, 1],
    [10, 0, 1, 2],
    [10, 1, 0, 1],
];
/// ipBlock CIDRs and excepts, overlapping the addresses above; one does not parse.
const CIDRS: [&str; 7] = [
    "10.0.0.0/16",
    "10.0.0.0/24",
    "10.0.1.0/24",
    "10.0.0.2/31",
    "10.0.1.2/32",
    "10.0.0.0/8",
    "10.0.0.0/33",
];

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn meta(ns: Option<&str>, name: &str, labels: BTreeMap<String, String>, annotations: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: ns.map(str::to_string),
        labels: Some(labels),
        annotations: Some(annotations),
        ..ObjectMeta::default()
    }
}

#[derive(Clone, Debug)]
struct PodSpecGen {
    app: usize,
    tier: Option<bool>,
    ip: Option<usize>,
    /// Container port of `http` (TCP), if declared.
    http: Option<u16>,
    dns: bool,
}

fn pod(ns: usize, i: usize, g: &PodSpecGen) -> Pod {
    let mut l = vec![("app", APPS[g.app])];
    if let Some(t) = g.tier {
        l.push(("tier", if t { "front" } else { "back" }));
    }
    let mut ports = Vec::new();
    if let Some(http) = g.http {
        ports.push(ContainerPort {
            name: Some("http".into()),
            container_port: http.into(),
            ..ContainerPort::default()
        });
    }
    if g.dns {
        ports.push(ContainerPort {
            name: Some("dns".into()),
            container_port: 53,
            protocol: Some("UDP".into()),
            ..ContainerPort::default()
        });
    }
    Pod {
        metadata: meta(Some(NAMESPACES[ns]), &format!("p{i}"), labels(&l), BTreeMap::new()),
        spec: Some(PodSpec {
            node_name: Some("n1".into()),
            containers: vec![Container {
                name: "c".into(),
                ports: Some(ports),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            pod_ip: g.ip.map(|i| Ipv4Addr::from(IPS[i]).to_string()),
            ..PodStatus::default()
        }),
    }
}

fn arb_pod() -> impl Strategy<Value = PodSpecGen> {
    (
        0..APPS.len(),
        proptest::option::of(any::<bool>()),
        proptest::option::weighted(0.85, 0..IPS.len()),
        proptest::option::of(prop_oneof![Just(80u16), Just(8080u16)]),
        any::<bool>(),
    )
        .prop_map(|(app, tier, ip, http, dns)| PodSpecGen { app, tier, ip, http, dns })
}

fn arb_selector(key: &'static str, values: &'static [&'static str]) -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::default()),
        (0..values.len()).prop_map(move |v| LabelSelector {
            match_labels: Some(labels(&[(key, values[v])])),
            ..LabelSelector::default()
        }),
        (0..values.len(), any::<bool>()).prop_map(move |(v, not_in)| LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.to_string(),
                operator: if not_in { "NotIn" } else { "In" }.to_string(),
                values: Some(vec![values[v].to_string()]),
            }]),
            ..LabelSelector::default()
        }),
        Just(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".to_string(),
                operator: "Exists".to_string(),
                values: None,
            }]),
            ..LabelSelector::default()
        }),
    ]
}

fn arb_peer() -> impl Strategy<Value = NetworkPolicyPeer> {
    let pod_sel = || arb_selector("app", &APPS);
    let ns_sel = || arb_selector("team", &["a", "b"]);
    prop_oneof![
        pod_sel().prop_map(|s| NetworkPolicyPeer {
            pod_selector: Some(s),
            ..NetworkPolicyPeer::default()
        }),
        ns_sel().prop_map(|s| NetworkPolicyPeer {
            namespace_selector: Some(s),
            ..NetworkPolicyPeer::default()
        }),
        (pod_sel(), ns_sel()).prop_map(|(p, n)| NetworkPolicyPeer {
            pod_selector: Some(p),
            namespace_selector: Some(n),
            ..NetworkPolicyPeer::default()
        }),
        (0..CIDRS.len(), proptest::collection::vec(0..CIDRS.len(), 0..2)).prop_map(|(c, ex)| NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: CIDRS[c].to_string(),
                except: Some(ex.into_iter().map(|e| CIDRS[e].to_string()).collect()),
            }),
            ..NetworkPolicyPeer::default()
        }),
    ]
}

fn arb_port() -> impl Strategy<Value = NetworkPolicyPort> {
    let p = |protocol: &str, port: Option<IntOrString>, end_port: Option<i32>| NetworkPolicyPort {
        protocol: Some(protocol.to_string()),
        port,
        end_port,
    };
    prop_oneof![
        Just(p("TCP", Some(IntOrString::Int(80)), None)),
        Just(p("UDP", Some(IntOrString::Int(53)), None)),
        Just(p("TCP", Some(IntOrString::Int(8000)), Some(8100))),
        Just(p("SCTP", None, None)),
        Just(p("TCP", Some(IntOrString::String("http".into())), None)),
        Just(p("UDP", Some(IntOrString::String("dns".into())), None)),
    ]
}

type RuleGen = (Option<Vec<NetworkPolicyPeer>>, Option<Vec<NetworkPolicyPort>>);

fn arb_rule() -> impl Strategy<Value = RuleGen> {
    (
        proptest::option::weighted(0.8, proptest::collection::vec(arb_peer(), 0..3)),
        proptest::option::of(proptest::collection::vec(arb_port(), 0..3)),
    )
}

#[derive(Clone, Debug)]
struct PolicyGen {
    pod_selector: LabelSelector,
    types: Option<Vec<String>>,
    ingress: Option<Vec<RuleGen>>,
    egress: Option<Vec<RuleGen>>,
    audit: Option<bool>,
}

fn arb_policy() -> impl Strategy<Value = PolicyGen> {
    (
        arb_selector("app", &APPS),
        prop_oneof![
            Just(None),
            Just(Some(vec!["Ingress".to_string()])),
            Just(Some(vec!["Egress".to_string()])),
            Just(Some(vec!["Ingress".to_string(), "Egress".to_string()])),
        ],
        proptest::option::of(proptest::collection::vec(arb_rule(), 0..3)),
        proptest::option::of(proptest::collection::vec(arb_rule(), 0..3)),
        proptest::option::weighted(0.3, any::<bool>()),
    )
        .prop_map(|(pod_selector, types, ingress, egress, audit)| PolicyGen {
            pod_selector,
            types,
            ingress,
            egress,
            audit,
        })
}

fn policy(ns: usize, i: usize, g: &PolicyGen) -> NetworkPolicy {
    let mut annotations = BTreeMap::new();
    if let Some(a) = g.audit {
        annotations.insert(POLICY_AUDIT_ANNOTATION.to_string(), a.to_string());
    }
    NetworkPolicy {
        metadata: meta(Some(NAMESPACES[ns]), &format!("np{i}"), BTreeMap::new(), annotations),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(g.pod_selector.clone()),
            policy_types: g.types.clone(),
            ingress: g.ingress.as_ref().map(|rules| {
                rules
                    .iter()
                    .map(|(from, ports)| NetworkPolicyIngressRule {
                        from: from.clone(),
                        ports: ports.clone(),
                    })
                    .collect()
            }),
            egress: g.egress.as_ref().map(|rules| {
                rules
                    .iter()
                    .map(|(to, ports)| NetworkPolicyEgressRule {
                        to: to.clone(),
                        ports: ports.clone(),
                    })
                    .collect()
            }),
        }),
    }
}

fn namespace(ns: usize, team: Option<bool>, audit: bool) -> Namespace {
    let mut l = BTreeMap::new();
    if let Some(t) = team {
        l.insert("team".to_string(), if t { "a" } else { "b" }.to_string());
    }
    let mut annotations = BTreeMap::new();
    if audit {
        annotations.insert(NAMESPACE_AUDIT_ANNOTATION.to_string(), "true".to_string());
    }
    Namespace {
        metadata: meta(None, NAMESPACES[ns], l, annotations),
        ..Namespace::default()
    }
}

#[derive(Clone, Debug)]
enum Event {
    Pod(usize, usize, PodSpecGen),
    DeletePod(usize, usize),
    Namespace(usize, Option<bool>, bool),
    DeleteNamespace(usize),
    Policy(usize, usize, PolicyGen),
    DeletePolicy(usize, usize),
    /// Pod (namespace, index) gets a local endpoint, with the pod's address or another.
    AddLocal(usize, usize, Option<usize>),
    DelLocal(usize, usize),
    /// A second endpoint for pod (namespace, index), with its own id and ifindex: the
    /// full-compile fallback.
    DuplicateLocal(usize, usize),
}

fn arb_event() -> impl Strategy<Value = Event> {
    let ns = || 0..NAMESPACES.len();
    prop_oneof![
        4 => (ns(), 0..PODS, arb_pod()).prop_map(|(n, i, g)| Event::Pod(n, i, g)),
        1 => (ns(), 0..PODS).prop_map(|(n, i)| Event::DeletePod(n, i)),
        1 => (ns(), proptest::option::of(any::<bool>()), proptest::bool::weighted(0.2)).prop_map(|(n, t, a)| Event::Namespace(n, t, a)),
        1 => ns().prop_map(Event::DeleteNamespace),
        4 => (ns(), 0..POLICIES, arb_policy()).prop_map(|(n, i, g)| Event::Policy(n, i, g)),
        1 => (ns(), 0..POLICIES).prop_map(|(n, i)| Event::DeletePolicy(n, i)),
        2 => (ns(), 0..PODS, proptest::option::weighted(0.3, 0..IPS.len())).prop_map(|(n, i, ip)| Event::AddLocal(n, i, ip)),
        1 => (ns(), 0..PODS).prop_map(|(n, i)| Event::DelLocal(n, i)),
        1 => (ns(), 0..PODS).prop_map(|(n, i)| Event::DuplicateLocal(n, i)),
    ]
}

/// Endpoint id and ifindex of pod (namespace, index): distinct per pod.
fn endpoint(cluster: &Cluster, ns: usize, i: usize, ip: Option<usize>) -> LocalEndpoint {
    let n = u32::try_from(ns * PODS + i).unwrap();
    let pod_ip = cluster
        .pod(NAMESPACES[ns], &format!("p{i}"))
        .and_then(crate::model::pod_ipv4)
        .unwrap_or(Ipv4Addr::new(10, 9, 9, 9));
    LocalEndpoint {
        endpoint_id: 1 + n,
        host_ifindex: 100 + n,
        namespace: NAMESPACES[ns].to_string(),
        pod: format!("p{i}"),
        ipv4: ip.map_or(pod_ip, |i| Ipv4Addr::from(IPS[i])),
        mac: [2, 0, 0, 0, 0, u8::try_from(n).unwrap()],
    }
}

fn r(kind: Kind, ns: Option<usize>, name: String) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: ns.map(|n| NAMESPACES[n].to_string()),
        name,
    }
}

/// Applies one event to the cluster and endpoints; returns the objects it touched.
fn apply(cluster: &mut Cluster, local: &mut Vec<LocalEndpoint>, e: &Event) -> Vec<ObjectRef> {
    match e {
        Event::Pod(n, i, g) => {
            cluster.apply(Object::Pod(PodInfo::from_pod(&pod(*n, *i, g))));
            vec![r(Kind::Pod, Some(*n), format!("p{i}"))]
        }
        Event::DeletePod(n, i) => {
            cluster.delete(&r(Kind::Pod, Some(*n), format!("p{i}")));
            vec![r(Kind::Pod, Some(*n), format!("p{i}"))]
        }
        Event::Namespace(n, team, audit) => {
            cluster.apply(Object::Namespace(namespace(*n, *team, *audit)));
            vec![r(Kind::Namespace, None, NAMESPACES[*n].to_string())]
        }
        Event::DeleteNamespace(n) => {
            cluster.delete(&r(Kind::Namespace, None, NAMESPACES[*n].to_string()));
            vec![r(Kind::Namespace, None, NAMESPACES[*n].to_string())]
        }
        Event::Policy(n, i, g) => {
            cluster.apply(Object::NetworkPolicy(policy(*n, *i, g)));
            vec![r(Kind::NetworkPolicy, Some(*n), format!("np{i}"))]
        }
        Event::DeletePolicy(n, i) => {
            cluster.delete(&r(Kind::NetworkPolicy, Some(*n), format!("np{i}")));
            vec![r(Kind::NetworkPolicy, Some(*n), format!("np{i}"))]
        }
        Event::AddLocal(n, i, ip) => {
            let ep = endpoint(cluster, *n, *i, *ip);
            local.retain(|e| e.endpoint_id != ep.endpoint_id);
            local.push(ep);
            // An unrelated kind is ignored.
            vec![r(Kind::Service, Some(*n), "svc".into())]
        }
        Event::DuplicateLocal(n, i) => {
            let mut ep = endpoint(cluster, *n, *i, Some(0));
            ep.endpoint_id += 1000;
            ep.host_ifindex += 1000;
            local.retain(|e| e.endpoint_id != ep.endpoint_id);
            local.push(ep);
            Vec::new()
        }
        Event::DelLocal(n, i) => {
            local.retain(|e| !(e.namespace == NAMESPACES[*n] && e.pod == format!("p{i}")));
            Vec::new()
        }
    }
}

fn check(compiler: &Compiler, cluster: &Cluster, local: &[LocalEndpoint], step: &str) {
    let mut oracle = compiler.clone();
    let full = oracle.compile(cluster, local);
    assert_eq!(compiler.state(), &full, "{step}: incremental state differs from a full compile");
    let ids = |c: &Compiler| c.identities().iter().map(|(i, k)| (i, k.clone())).collect::<Vec<_>>();
    assert_eq!(ids(compiler), ids(&oracle), "{step}: identities differ");
    let rules = |c: &Compiler| c.rules().iter().map(|(i, r)| (i, r.clone())).collect::<Vec<_>>();
    assert_eq!(rules(compiler), rules(&oracle), "{step}: rule ids differ");
    assert_eq!(compiler.over_cap(), oracle.over_cap(), "{step}: over-cap policies differ");
}

fn run(initial: &[Event], events: &[Event], cap: Option<usize>, shuffle_local: bool) {
    let mut cluster = Cluster::new();
    let mut local = Vec::new();
    for e in initial {
        apply(&mut cluster, &mut local, e);
    }
    let mut compiler = cap.map_or_else(Compiler::new, |c| Compiler::new().with_policy_cap(c));
    let mut prev = DatapathState::default();
    let delta = compiler.update(&cluster, &[], &local);
    delta.apply_to(&mut prev);
    assert_eq!(&prev, compiler.state(), "first update: delta from empty");
    check(&compiler, &cluster, &local, "first update");
    for (n, e) in events.iter().enumerate() {
        let touched = apply(&mut cluster, &mut local, e);
        if shuffle_local {
            local.reverse();
        }
        let delta = compiler.update(&cluster, &touched, &local);
        let step = format!("event {n} {e:?}");
        let mut applied = prev.clone();
        delta.apply_to(&mut applied);
        assert_eq!(&applied, compiler.state(), "{step}: delta applied to the previous state");
        for (k, v) in &delta.policy {
            assert_ne!(prev.policy.get(k), v.as_ref(), "{step}: the delta lists an unchanged policy entry");
        }
        for (k, v) in &delta.ipcache {
            assert_ne!(
                prev.ipcache.get(k),
                v.as_ref(),
                "{step}: the delta lists an unchanged ipcache entry"
            );
        }
        for (k, v) in &delta.endpoints {
            assert_ne!(prev.endpoints.get(k), v.as_ref(), "{step}: the delta lists an unchanged endpoint");
        }
        check(&compiler, &cluster, &local, &step);
        prev = applied;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn incremental_updates_equal_a_full_compile_after_every_event(
        initial in proptest::collection::vec(arb_event(), 0..25),
        events in proptest::collection::vec(arb_event(), 1..30),
        cap in proptest::option::weighted(0.3, 1usize..40),
        shuffle in proptest::bool::weighted(0.2),
    ) {
        run(&initial, &events, cap, shuffle);
    }
}

#[test]
fn a_pod_add_in_a_known_identity_writes_only_its_address() {
    let g = PodSpecGen {
        app: 0,
        tier: None,
        ip: Some(0),
        http: Some(80),
        dns: false,
    };
    let mut cluster = Cluster::new();
    let mut local = Vec::new();
    for e in [
        Event::Namespace(0, Some(true), false),
        Event::Pod(0, 0, g.clone()),
        Event::AddLocal(0, 0, None),
        Event::Policy(
            0,
            0,
            PolicyGen {
                pod_selector: LabelSelector::default(),
                types: None,
                ingress: Some(vec![(None, None)]),
                egress: None,
                audit: None,
            },
        ),
    ] {
        apply(&mut cluster, &mut local, &e);
    }
    let mut compiler = Compiler::new();
    compiler.update(&cluster, &[], &local);
    let touched = apply(&mut cluster, &mut local, &Event::Pod(0, 1, PodSpecGen { ip: Some(3), ..g }));
    let delta = compiler.update(&cluster, &touched, &local);
    assert_eq!(delta.len(), 1, "{delta:?}");
    assert_eq!(delta.ipcache.keys().next(), Some(&(Ipv4Addr::from(IPS[3]), 32)));
    check(&compiler, &cluster, &local, "pod add");
}

/// Scale fixtures for the timing run below (issue 13's control-plane shape: 20 local pods,
/// the rest remote, namespaces with a few labels, policies with pod and namespace selectors).
mod scale {
    use super::*;

    pub const NS: usize = 100;
    pub const LOCAL: usize = 20;

    fn ns_name(k: usize) -> String {
        format!("ns{k}")
    }

    pub fn pod_at(i: usize, app_shift: usize) -> Pod {
        let k = i % NS;
        let app = format!("a{}", (i / NS + app_shift) % 25);
        let tier = if (i / NS).is_multiple_of(2) { "f" } else { "b" };
        let ip = Ipv4Addr::new(
            10,
            1 + u8::try_from(i / 65536).unwrap(),
            u8::try_from((i / 256) % 256).unwrap(),
            u8::try_from(i % 256).unwrap(),
        );
        Pod {
            metadata: meta(
                Some(&ns_name(k)),
                &format!("p{i}"),
                labels(&[("app", &app), ("tier", tier)]),
                BTreeMap::new(),
            ),
            spec: Some(PodSpec {
                node_name: Some(if i < LOCAL { "local" } else { "remote" }.into()),
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: 8080,
                        ..ContainerPort::default()
                    }]),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some(ip.to_string()),
                ..PodStatus::default()
            }),
        }
    }

    fn sel(k: &str, v: String) -> LabelSelector {
        LabelSelector {
            match_labels: Some(labels(&[(k, &v)])),
            ..LabelSelector::default()
        }
    }

    pub fn policy_at(j: usize, port: i32) -> NetworkPolicy {
        let tcp = |p: i32| NetworkPolicyPort {
            protocol: Some("TCP".into()),
            port: Some(IntOrString::Int(p)),
            end_port: None,
        };
        let ingress = vec![NetworkPolicyIngressRule {
            from: Some(vec![
                NetworkPolicyPeer {
                    pod_selector: Some(sel("app", format!("a{}", (j + 1) % 25))),
                    ..NetworkPolicyPeer::default()
                },
                NetworkPolicyPeer {
                    namespace_selector: Some(sel("team", format!("t{}", j % 10))),
                    pod_selector: Some(sel("tier", "f".into())),
                    ..NetworkPolicyPeer::default()
                },
            ]),
            ports: Some(vec![tcp(port)]),
        }];
        let egress = j.is_multiple_of(4).then(|| {
            vec![NetworkPolicyEgressRule {
                to: Some(vec![NetworkPolicyPeer {
                    namespace_selector: Some(sel("env", "prod".into())),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(vec![tcp(443)]),
            }]
        });
        NetworkPolicy {
            metadata: meta(Some(&ns_name(j % NS)), &format!("np{j}"), BTreeMap::new(), BTreeMap::new()),
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(sel("app", format!("a{}", (j / NS) % 25))),
                policy_types: None,
                ingress: Some(ingress),
                egress,
            }),
        }
    }

    pub fn cluster(pods: usize, policies: usize) -> (Cluster, Vec<LocalEndpoint>) {
        let mut c = Cluster::new();
        for k in 0..NS {
            let mut m = meta(
                None,
                &ns_name(k),
                labels(&[
                    ("team", &format!("t{}", k % 10)),
                    ("env", if k.is_multiple_of(2) { "prod" } else { "dev" }),
                ]),
                BTreeMap::new(),
            );
            m.namespace = None;
            c.apply(Object::Namespace(Namespace {
                metadata: m,
                ..Namespace::default()
            }));
        }
        for i in 0..pods {
            c.apply(Object::Pod(PodInfo::from_pod(&pod_at(i, 0))));
        }
        for j in 0..policies {
            c.apply(Object::NetworkPolicy(policy_at(j, 80)));
        }
        let local = (0..LOCAL).map(|i| local_endpoint(&c, i)).collect();
        (c, local)
    }

    pub fn local_endpoint(c: &Cluster, i: usize) -> LocalEndpoint {
        let name = format!("p{i}");
        let ns = ns_name(i % NS);
        let n = u32::try_from(i).unwrap();
        LocalEndpoint {
            endpoint_id: 1 + n,
            host_ifindex: 100 + n,
            ipv4: c.pod(&ns, &name).and_then(crate::model::pod_ipv4).unwrap(),
            namespace: ns,
            pod: name,
            mac: [2, 0, 0, 0, 0, u8::try_from(i % 256).unwrap()],
        }
    }

    pub fn policy_ref(j: usize) -> ObjectRef {
        ObjectRef {
            kind: Kind::NetworkPolicy,
            namespace: Some(ns_name(j % NS)),
            name: format!("np{j}"),
        }
    }

    pub fn pod_ref(i: usize) -> ObjectRef {
        ObjectRef {
            kind: Kind::Pod,
            namespace: Some(ns_name(i % NS)),
            name: format!("p{i}"),
        }
    }
}

fn median(mut v: Vec<std::time::Duration>) -> std::time::Duration {
    v.sort();
    v[v.len() / 2]
}

/// Timing run, not a pass/fail test: `cargo test --release -p bulkhead --lib
/// policy::incremental_tests::timing -- --ignored --nocapture`. Prints, per cluster size,
/// the full path (compile + diff against the last state) and `update` for one policy
/// change, one pod add (known and new identity) and one local endpoint add, as medians
/// and ratios from the same process; still checks each update against a full compile.
#[test]
#[ignore = "timing run"]
fn timing() {
    use std::time::{Duration, Instant};
    let sizes: Vec<(usize, usize)> = std::env::var("BH_TIMING_SIZES")
        .ok()
        .map(|s| {
            s.split(',')
                .map(|p| {
                    let (a, b) = p.split_once('x').unwrap();
                    (a.parse().unwrap(), b.parse().unwrap())
                })
                .collect()
        })
        .unwrap_or_else(|| vec![(1000, 1000), (10000, 1000)]);
    let rounds: usize = std::env::var("BH_TIMING_ROUNDS").ok().map_or(11, |r| r.parse().unwrap());
    println!("| pods × policies | event | full compile + diff | update | ratio | delta keys |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (pods, policies) in sizes {
        let (mut cluster, mut local) = scale::cluster(pods, policies);
        let mut compiler = Compiler::new();
        let rss = || {
            std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                })
                .unwrap_or(0)
        };
        let before = rss();
        let t = Instant::now();
        compiler.update(&cluster, &[], &local);
        let first = t.elapsed();
        let grown = rss().saturating_sub(before);
        println!(
            "| {pods} × {policies} | first update (full rebuild; RSS +{grown} KiB = {:.2} KiB/pod for state and indexes) | | {first:.2?} | | {} |",
            grown as f64 / pods as f64,
            compiler.state().policy.len()
        );
        let full = |compiler: &Compiler, cluster: &Cluster, local: &[LocalEndpoint]| -> Duration {
            let mut c = compiler.clone();
            let before = c.state().clone();
            let t = Instant::now();
            let new = c.compile(cluster, local);
            let d = crate::datapath::state::DatapathDelta::between(&before, &new);
            let e = t.elapsed();
            assert!(d.len() < usize::MAX);
            e
        };
        type Step<'a> = Box<dyn Fn(usize, &mut Cluster, &mut Vec<LocalEndpoint>) -> Vec<ObjectRef> + 'a>;
        let events: Vec<(&str, Step<'_>)> = vec![
            (
                "one policy change (port)",
                Box::new(|r, c: &mut Cluster, _: &mut Vec<LocalEndpoint>| {
                    // A policy selecting local pods (namespace of pod 3, app of the first pods).
                    let j = 3;
                    c.apply(Object::NetworkPolicy(scale::policy_at(
                        j,
                        if r.is_multiple_of(2) { 81 } else { 80 },
                    )));
                    vec![scale::policy_ref(j)]
                }),
            ),
            (
                "one pod add/delete (known identity)",
                Box::new(move |r, c: &mut Cluster, _: &mut Vec<LocalEndpoint>| {
                    // Same namespace and labels as pod 0 (`pods` is a multiple of NS).
                    let i = pods + 2 * scale::NS;
                    if r.is_multiple_of(2) {
                        let mut p = scale::pod_at(i, 0);
                        p.metadata.labels = scale::pod_at(0, 0).metadata.labels;
                        c.apply(Object::Pod(PodInfo::from_pod(&p)));
                    } else {
                        c.delete(&scale::pod_ref(i));
                    }
                    vec![scale::pod_ref(i)]
                }),
            ),
            (
                "one pod add/delete (new identity)",
                Box::new(move |r, c: &mut Cluster, _: &mut Vec<LocalEndpoint>| {
                    let i = pods + 3;
                    if r.is_multiple_of(2) {
                        let mut p = scale::pod_at(i, 0);
                        p.metadata.labels.get_or_insert_default().insert("app".into(), "a1".into());
                        p.metadata.labels.get_or_insert_default().insert("new".into(), "yes".into());
                        c.apply(Object::Pod(PodInfo::from_pod(&p)));
                    } else {
                        c.delete(&scale::pod_ref(i));
                    }
                    vec![scale::pod_ref(i)]
                }),
            ),
            (
                "one local endpoint add/delete",
                Box::new(|r, c: &mut Cluster, l: &mut Vec<LocalEndpoint>| {
                    let i = scale::LOCAL + 5;
                    if r.is_multiple_of(2) {
                        l.push(scale::local_endpoint(c, i));
                    } else {
                        l.retain(|e| e.endpoint_id != 1 + u32::try_from(i).unwrap());
                    }
                    Vec::new()
                }),
            ),
        ];
        for (name, step) in &events {
            let mut full_times = Vec::new();
            let mut update_times = Vec::new();
            let mut keys = Vec::new();
            for r in 0..rounds {
                let touched = step(r, &mut cluster, &mut local);
                if r < 3 {
                    full_times.push(full(&compiler, &cluster, &local));
                }
                let t = Instant::now();
                let delta = compiler.update(&cluster, &touched, &local);
                update_times.push(t.elapsed());
                keys.push(delta.len());
            }
            check(&compiler, &cluster, &local, name);
            let (f, u) = (median(full_times), median(update_times));
            println!(
                "| {pods} × {policies} | {name} | {f:.2?} | {u:.2?} | {:.0}× | {:?} |",
                f.as_secs_f64() / u.as_secs_f64().max(1e-9),
                &keys[..keys.len().min(4)]
            );
        }
    }
}
