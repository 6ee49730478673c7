//! The compiler's property test: random clusters and policies compiled with
//! `Compiler::compile`, written into the real datapath's maps with `sync`, and the real
//! `from_pod`/`to_pod` programs run (`BPF_PROG_TEST_RUN`) on every ordered pod pair and a
//! few ports and protocols; each direction's verdict must be what `policy::evaluate`, the
//! spec evaluator, decides.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

mod testrun;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use bulkhead::model::{self, Cluster, Object};
use bulkhead::policy::{evaluate, Compiler, Decision, LocalEndpoint};
use bulkhead_common::program_names;
use proptest::prelude::*;
use testrun::{protocol_number, Addr, PinnedDatapath, LO};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const N: usize = 9;

/// Ports and protocols probed: what the generated port clauses name, and misses around them.
const PROBES: [(&str, u16); 6] = [("TCP", 80), ("TCP", 8080), ("TCP", 443), ("UDP", 53), ("UDP", 80), ("SCTP", 53)];

fn pod_name(i: usize) -> String {
    format!("{}/{}", NAMESPACES[i / 3], PODS[i % 3])
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, u8::try_from(i / 3 + 1).unwrap(), u8::try_from(i % 3 + 1).unwrap())
}

fn addr(i: usize) -> Addr {
    Addr {
        ip: pod_ip(i),
        mac: [2, 0, 0, 0, 0, u8::try_from(i).unwrap()],
    }
}

/// Pod `i` as the one local endpoint, on `lo` where test runs deliver packets.
fn endpoint(i: usize) -> LocalEndpoint {
    LocalEndpoint {
        endpoint_id: 1 + u32::try_from(i).unwrap(),
        host_ifindex: LO,
        namespace: NAMESPACES[i / 3].to_string(),
        pod: PODS[i % 3].to_string(),
        ipv4: pod_ip(i),
        mac: addr(i).mac,
    }
}

/// Namespaces x, y, z (label ns=<name>), each with pods a, b, c (label pod=<name>).
/// Named port `http` is 80 on a and c but 8080 on b; `dns` is UDP 53 everywhere.
fn base_yaml() -> String {
    let mut out = String::new();
    for ns in NAMESPACES {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
        ));
    }
    for i in 0..N {
        let (ns, pod) = (NAMESPACES[i / 3], PODS[i % 3]);
        let http = if pod == "b" { 8080 } else { 80 };
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\n\
             spec:\n  nodeName: n1\n  containers:\n  - name: c\n    ports:\n    - {{name: http, containerPort: {http}}}\n\
             \x20   - {{name: dns, containerPort: 53, protocol: UDP}}\nstatus: {{podIP: {}}}\n",
            pod_ip(i)
        ));
    }
    out
}

fn np(ns: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")
}

/// A policy with `bulkhead.io/audit` set to `audit`.
fn np_audit(ns: &str, name: &str, audit: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: {name}, namespace: {ns}, annotations: {{bulkhead.io/audit: \"{audit}\"}}}}\nspec:\n{spec}"
    )
}

/// The base cluster with `policies`, random `tier` labels (so selectors cut across the
/// grid) and audit annotations on some namespaces.
fn cluster(policies: &str, tiers: &[Option<&str>], audit_namespaces: &[bool]) -> Cluster {
    let mut objects = model::parse_documents(&base_yaml(), "base.yaml").expect("base parses");
    let mut n = 0;
    for o in &mut objects {
        let (meta, is_namespace) = match o {
            Object::Namespace(x) => (&mut x.metadata, true),
            Object::Pod(x) => {
                if let Some(Some(t)) = tiers.get(n) {
                    std::sync::Arc::make_mut(&mut x.labels).insert("tier".into(), (*t).into());
                }
                n += 1;
                continue;
            }
            Object::NetworkPolicy(_) | Object::Node(_) | Object::Service(_) | Object::EndpointSlice(_) => continue,
        };
        if let Some(Some(t)) = tiers.get(n) {
            meta.labels.get_or_insert_with(BTreeMap::new).insert("tier".into(), (*t).into());
        }
        // Namespaces come first: the first three objects are x, y and z.
        if is_namespace && audit_namespaces.get(n) == Some(&true) {
            meta.annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(model::NAMESPACE_AUDIT_ANNOTATION.into(), "true".into());
        }
        n += 1;
    }
    objects.extend(model::parse_documents(policies, "policies.yaml").expect("policies parse"));
    Cluster::from_objects(objects)
}

/// Whether a direction's decision lets the packet through (audit does).
fn passes(d: &Decision) -> bool {
    match d {
        Decision::NotIsolated | Decision::Allowed(_) | Decision::Audited(_) => true,
        Decision::Denied(_) | Decision::UnknownPod => false,
    }
}

/// Runs both programs, with what the compiler makes of `compiled` in the maps, for every
/// ordered pod pair and probe; returns the disagreements with what the spec evaluator
/// decides for `spec` and how many (pair, probe) cells were compared.
fn mismatches(compiled: &Cluster, spec: &Cluster, name: &str) -> (Vec<String>, usize) {
    let mut dp = PinnedDatapath::new(name);
    let mut compiler = Compiler::new();
    // [from][to][probe]: the sender's egress program, the receiver's ingress program.
    let mut egress = [[[false; PROBES.len()]; N]; N];
    let mut ingress = [[[false; PROBES.len()]; N]; N];
    for local in 0..N {
        dp.install(compiler.compile(compiled, &[endpoint(local)]));
        for other in (0..N).filter(|o| *o != local) {
            for (p, (protocol, port)) in PROBES.iter().enumerate() {
                let protocol = protocol_number(protocol);
                egress[local][other][p] = dp.passes(program_names::FROM_POD, addr(local), addr(other), protocol, *port);
                ingress[other][local][p] = dp.passes(program_names::TO_POD, addr(other), addr(local), protocol, *port);
            }
        }
    }
    let mut errors = Vec::new();
    let mut compared = 0;
    for from in 0..N {
        for to in (0..N).filter(|t| *t != from) {
            let (fname, tname) = (pod_name(from), pod_name(to));
            for (p, (protocol, port)) in PROBES.iter().enumerate() {
                let want = evaluate(
                    spec,
                    fname.split_once('/').unwrap(),
                    tname.split_once('/').unwrap(),
                    protocol,
                    *port,
                );
                let got = (egress[from][to][p], ingress[from][to][p]);
                if got != (passes(&want.egress), passes(&want.ingress)) {
                    errors.push(format!(
                        "{fname}->{tname} {protocol}/{port}: datapath (egress, ingress) {got:?}, spec {want:?}"
                    ));
                }
                compared += 1;
            }
        }
    }
    (errors, compared)
}

fn selector_yaml() -> impl Strategy<Value = String> {
    let value = prop::sample::select(vec!["a", "b", "c", "x", "y", "z"]);
    let key = prop::sample::select(vec!["pod", "ns", "tier"]);
    let op = prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist"]);
    prop_oneof![
        Just("{}".to_string()),
        (key.clone(), value.clone()).prop_map(|(k, v)| format!("{{matchLabels: {{{k}: {v}}}}}")),
        (key, op, prop::collection::vec(value, 1..3)).prop_map(|(k, op, vs)| match op {
            "Exists" | "DoesNotExist" => format!("{{matchExpressions: [{{key: {k}, operator: {op}}}]}}"),
            _ => format!("{{matchExpressions: [{{key: {k}, operator: {op}, values: [{}]}}]}}", vs.join(", ")),
        }),
    ]
}

fn peer_yaml() -> impl Strategy<Value = String> {
    prop_oneof![
        selector_yaml().prop_map(|s| format!("{{podSelector: {s}}}")),
        selector_yaml().prop_map(|s| format!("{{namespaceSelector: {s}}}")),
        (selector_yaml(), selector_yaml()).prop_map(|(p, n)| format!("{{podSelector: {p}, namespaceSelector: {n}}}")),
        (1u8..=3, 0u8..=3).prop_map(|(n, m)| format!("{{ipBlock: {{cidr: 10.0.{n}.0/24, except: [10.0.{n}.{m}/32]}}}}")),
    ]
}

fn port_yaml() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "{port: 80}",
        "{port: http}",
        "{port: dns, protocol: UDP}",
        "{protocol: UDP}",
        "{port: 80, endPort: 8080}",
        "{port: 53, protocol: SCTP}",
    ])
    .prop_map(str::to_string)
}

fn rule_yaml(peers_field: &'static str) -> impl Strategy<Value = String> {
    (
        prop::option::of(prop::collection::vec(peer_yaml(), 0..3)),
        prop::option::of(prop::collection::vec(port_yaml(), 0..3)),
    )
        .prop_map(move |(peers, ports)| {
            let mut fields = Vec::new();
            if let Some(p) = peers {
                fields.push(format!("{peers_field}: [{}]", p.join(", ")));
            }
            if let Some(p) = ports {
                fields.push(format!("ports: [{}]", p.join(", ")));
            }
            format!("{{{}}}", fields.join(", "))
        })
}

fn policy_yaml(index: usize) -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["x", "y", "z"]),
        selector_yaml(),
        prop::sample::select(vec![
            "",
            "  policyTypes: [Ingress]\n",
            "  policyTypes: [Egress]\n",
            "  policyTypes: [Ingress, Egress]\n",
        ]),
        prop::option::of(prop::collection::vec(rule_yaml("from"), 0..3)),
        prop::option::of(prop::collection::vec(rule_yaml("to"), 0..3)),
        prop::option::of(prop::sample::select(vec!["true", "false"])),
    )
        .prop_map(move |(ns, sel, types, ingress, egress, audit)| {
            let mut spec = format!("  podSelector: {sel}\n{types}");
            if let Some(r) = ingress {
                spec.push_str(&format!("  ingress: [{}]\n", r.join(", ")));
            }
            if let Some(r) = egress {
                spec.push_str(&format!("  egress: [{}]\n", r.join(", ")));
            }
            match audit {
                Some(value) => np_audit(ns, &format!("p{index}"), value, &spec),
                None => np(ns, &format!("p{index}"), &spec),
            }
        })
}

fn policies_yaml() -> impl Strategy<Value = String> {
    (policy_yaml(0), policy_yaml(1), policy_yaml(2), 1usize..=3).prop_map(|(a, b, c, n)| [a, b, c][..n].concat())
}

/// Random extra labels on namespaces and pods (3 + 9 objects).
fn tiers() -> impl Strategy<Value = Vec<Option<&'static str>>> {
    prop::collection::vec(prop::option::of(prop::sample::select(vec!["a", "b"])), 12)
}

proptest! {
    // Each case loads a datapath and runs 9 × 8 × 6 × 2 packets: keep the count small, and
    // bound shrinking, which reruns whole cases.
    #![proptest_config(ProptestConfig { cases: 32, max_shrink_iters: 64, ..ProptestConfig::default() })]
    #[test]
    fn compiled_policy_on_the_real_datapath_agrees_with_the_spec(
        policies in policies_yaml(),
        tiers in tiers(),
        audit_namespaces in prop::collection::vec(any::<bool>(), 3),
    ) {
        let c = cluster(&policies, &tiers, &audit_namespaces);
        let (errors, compared) = mismatches(&c, &c, "property");
        prop_assert_eq!(compared, N * (N - 1) * PROBES.len());
        prop_assert!(errors.is_empty(), "{} mismatches:\n{}\n{}", errors.len(), errors.join("\n"), policies);
    }
}

/// The check can fail: a datapath compiled from a default deny in x, compared with the
/// spec's answer for the cluster without it, differs on exactly the probes into x.
#[test]
fn a_datapath_that_differs_from_the_spec_is_caught() {
    let with = cluster(&np("x", "deny", "  podSelector: {}\n"), &[], &[]);
    let (errors, compared) = mismatches(&with, &with, "property-self");
    assert_eq!((errors.len(), compared), (0, N * (N - 1) * PROBES.len()), "{errors:#?}");
    let (errors, _) = mismatches(&with, &cluster("", &[], &[]), "property-self");
    assert_eq!(errors.len(), 3 * (N - 1) * PROBES.len(), "{errors:#?}");
    assert!(
        errors.iter().all(|e| e.contains("->x/") && e.contains("(true, false)")),
        "{errors:#?}"
    );
}
