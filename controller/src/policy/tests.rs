//! Compiler tests: table-driven cases over a user-space model of the datapath lookups
//! ([`super::lookup`]). The property test that checks compiled output on the real programs
//! against the spec evaluator is `controller/tests/policy_property.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use bulkhead_common::{
    direction, endpoint_flags, identity, proto, verdict, PolicyKey, PolicyValue, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO,
};

use crate::model::{self, Cluster};
use crate::policy::identity::{Direction, RuleRef};

use super::compile::protocol_number;
use super::lookup::*;
use super::*;
use crate::datapath::state::DatapathState;
use crate::model::parse_documents;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn pod_ip(ns: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, u8::try_from(ns + 1).unwrap(), u8::try_from(pod + 1).unwrap())
}

/// Namespaces x, y, z (label ns=<name>), each with pods a, b, c (label pod=<name>).
/// Named port `http` is 80 on a and c but 8080 on b; `dns` is UDP 53 everywhere.
fn base_yaml() -> String {
    let mut out = String::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
        ));
        for (j, pod) in PODS.iter().enumerate() {
            let http = if *pod == "b" { 8080 } else { 80 };
            out.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\n\
                 spec:\n  nodeName: n1\n  containers:\n  - name: c\n    ports:\n    - {{name: http, containerPort: {http}}}\n\
                 \x20   - {{name: dns, containerPort: 53, protocol: UDP}}\nstatus: {{podIP: {}}}\n",
                pod_ip(i, j)
            ));
        }
    }
    out
}

fn cluster(policies: &str) -> Cluster {
    let mut objects = parse_documents(&base_yaml(), "base.yaml").expect("base parses");
    objects.extend(parse_documents(policies, "policies.yaml").expect("policies parse"));
    Cluster::from_objects(objects)
}

fn locals() -> Vec<LocalEndpoint> {
    let mut out = Vec::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        for (j, pod) in PODS.iter().enumerate() {
            let n = u32::try_from(i * 3 + j).unwrap();
            out.push(LocalEndpoint {
                endpoint_id: 1 + n,
                host_ifindex: 100 + n,
                namespace: ns.to_string(),
                pod: pod.to_string(),
                ipv4: pod_ip(i, j),
                mac: [2, 0, 0, 0, 0, u8::try_from(n).unwrap()],
            });
        }
    }
    out
}

fn ep<'l>(locals: &'l [LocalEndpoint], name: &str) -> &'l LocalEndpoint {
    let (ns, pod) = name.split_once('/').unwrap();
    locals.iter().find(|e| e.namespace == ns && e.pod == pod).unwrap()
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

/// Namespace `ns` (label ns=<name>) re-applied with `bulkhead.io/policy-audit: "true"`.
fn audit_namespace(ns: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Namespace\n\
         metadata: {{name: {ns}, labels: {{ns: {ns}}}, annotations: {{bulkhead.io/policy-audit: \"true\"}}}}\n"
    )
}

fn proto_num(p: &str) -> u8 {
    protocol_number(p).unwrap()
}

/// (egress allowed, ingress allowed) as the datapath would decide.
fn datapath(state: &DatapathState, locals: &[LocalEndpoint], from: &str, to: &str, protocol: &str, port: u16) -> (bool, bool) {
    let (f, t) = (ep(locals, from), ep(locals, to));
    let p = proto_num(protocol);
    (
        lookup(state, f.host_ifindex, direction::EGRESS, t.ipv4, p, port).is_some(),
        lookup(state, t.host_ifindex, direction::INGRESS, f.ipv4, p, port).is_some(),
    )
}

/// (egress, ingress) flow verdicts as the datapath would report them; `None`: dropped.
fn datapath_verdicts(
    state: &DatapathState,
    locals: &[LocalEndpoint],
    from: &str,
    to: &str,
    protocol: &str,
    port: u16,
) -> (Option<u8>, Option<u8>) {
    let (f, t) = (ep(locals, from), ep(locals, to));
    let p = proto_num(protocol);
    (
        lookup_verdict(state, f.host_ifindex, direction::EGRESS, t.ipv4, p, port).map(|(v, _)| v),
        lookup_verdict(state, t.host_ifindex, direction::INGRESS, f.ipv4, p, port).map(|(v, _)| v),
    )
}

/// The flow verdict a decision stands for; `None`: dropped.
fn flow_verdict(d: &Decision) -> Option<u8> {
    match d {
        Decision::NotIsolated | Decision::Allowed(_) => Some(verdict::FORWARDED),
        Decision::Audited(_) => Some(verdict::AUDIT),
        Decision::Denied(_) | Decision::UnknownPod => None,
    }
}

fn spec_says(c: &Cluster, from: &str, to: &str, protocol: &str, port: u16) -> Verdict {
    let f = from.split_once('/').unwrap();
    let t = to.split_once('/').unwrap();
    evaluate(c, f, t, protocol, port)
}

fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// Asserts, for every case, the datapath verdict and the spec verdict.
fn check(policies: &str, cases: &[(&str, &str, &str, u16, bool)]) {
    let c = cluster(policies);
    let l = locals();
    let state = Compiler::new().compile(&c, &l);
    for &(from, to, protocol, port, want) in cases {
        let (e, i) = datapath(&state, &l, from, to, protocol, port);
        assert_eq!(
            e && i,
            want,
            "datapath {from} -> {to} {protocol}/{port} (egress {e}, ingress {i})\n{policies}"
        );
        let v = spec_says(&c, from, to, protocol, port);
        assert_eq!(v.allowed, want, "evaluate {from} -> {to} {protocol}/{port}: {v:?}\n{policies}");
    }
}

const DENY_X: &str = "  podSelector: {}\n";

#[test]
fn no_policy_allows_everything() {
    let c = cluster("");
    let l = locals();
    let state = Compiler::new().compile(&c, &l);
    assert!(state.policy.is_empty());
    assert!(state.endpoints.values().all(|e| e.flags == 0));
    assert_eq!(state.ipcache.len(), 9);
    check("", &[("x/a", "y/b", "TCP", 80, true)]);
}

#[test]
fn default_deny_ingress_isolates_only_its_namespace() {
    let policies = np("x", "deny", DENY_X);
    let c = cluster(&policies);
    let l = locals();
    let state = Compiler::new().compile(&c, &l);
    let xa = state.endpoints[&ep(&l, "x/a").host_ifindex];
    assert_eq!(xa.flags, endpoint_flags::ISOLATED_INGRESS);
    assert_eq!(state.endpoints[&ep(&l, "y/a").host_ifindex].flags, 0);
    assert!(state.policy.is_empty());
    check(
        &policies,
        &[
            ("y/a", "x/a", "TCP", 80, false),
            ("x/b", "x/a", "UDP", 53, false),
            ("x/a", "y/a", "TCP", 80, true),
        ],
    );
}

#[test]
fn endpoint_entry_carries_identity_address_mac_and_flags() {
    let c = cluster("");
    let l = locals();
    let mut comp = Compiler::new();
    let state = comp.compile(&c, &l);
    let e = ep(&l, "y/c");
    let info = state.endpoints[&e.host_ifindex];
    assert_eq!((info.endpoint_id, info.ipv4, info.mac), (e.endpoint_id, e.ipv4.octets(), e.mac));
    assert_eq!(state.ipcache[&(e.ipv4, 32)].identity, info.identity);
    assert!(info.identity >= identity::FIRST_ALLOCATED);
    let key = comp.identities().key(info.identity).unwrap();
    assert!(key.to_string().contains("pod:pod=c"), "{key}");
}

#[test]
fn allow_from_pod_b_in_any_namespace() {
    let policies = np("x", "allow-b", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n      namespaceSelector: {}\n");
    let c = cluster(&policies);
    let l = locals();
    let mut comp = Compiler::new();
    let state = comp.compile(&c, &l);
    let xa = ep(&l, "x/a");
    let ids: BTreeSet<u32> = ["x/b", "y/b", "z/b"]
        .iter()
        .map(|p| state.endpoints[&ep(&l, p).host_ifindex].identity)
        .collect();
    let rule = comp
        .rules()
        .get(&RuleRef {
            namespace: "x".into(),
            policy: "allow-b".into(),
            direction: Direction::Ingress,
            index: 0,
        })
        .unwrap();
    let want: BTreeMap<(PolicyKey, u32), PolicyValue> = ids
        .iter()
        .map(|&id| {
            (
                (
                    PolicyKey::new(xa.endpoint_id, id, direction::INGRESS, 0, 0),
                    POLICY_PREFIX_ANY_PROTO,
                ),
                PolicyValue { rule_id: rule, flags: 0 },
            )
        })
        .collect();
    assert_eq!(state.policy, want);
    assert_eq!(
        lookup(&state, xa.host_ifindex, direction::INGRESS, ep(&l, "z/b").ipv4, proto::UDP, 9),
        Some(PolicyValue { rule_id: rule, flags: 0 })
    );
    assert_eq!(
        lookup(
            &state,
            xa.host_ifindex,
            direction::INGRESS,
            Ipv4Addr::new(192, 0, 2, 1),
            proto::TCP,
            80
        ),
        None
    );
    check(
        &policies,
        &[
            ("z/b", "x/a", "TCP", 80, true),
            ("x/c", "x/a", "TCP", 80, false),
            ("z/b", "x/b", "TCP", 80, true),
        ],
    );
}

#[test]
fn namespace_and_pod_selector_and_versus_or() {
    let and = np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n");
    let or = np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n    - podSelector: {matchLabels: {pod: b}}\n");
    check(
        &and,
        &[
            ("y/b", "x/a", "TCP", 80, true),
            ("y/c", "x/a", "TCP", 80, false),
            ("x/b", "x/a", "TCP", 80, false),
            ("z/b", "x/a", "TCP", 80, false),
        ],
    );
    check(
        &or,
        &[
            ("y/b", "x/a", "TCP", 80, true),
            ("y/c", "x/a", "TCP", 80, true),
            ("x/b", "x/a", "TCP", 80, true),
            ("z/b", "x/a", "TCP", 80, false),
            ("x/c", "x/a", "TCP", 80, false),
        ],
    );
}

#[test]
fn empty_rule_and_empty_peer_lists_versus_missing_rules() {
    // (spec, allowed from another namespace, allowed from the same namespace)
    let table: Vec<(&str, bool, bool)> = vec![
        ("  podSelector: {}\n  ingress: [{}]\n", true, true),
        ("  podSelector: {}\n  ingress: [{from: []}]\n", true, true),
        ("  podSelector: {}\n  ingress: [{from: [], ports: []}]\n", true, true),
        ("  podSelector: {}\n  ingress: []\n", false, false),
        ("  podSelector: {}\n", false, false),
        ("  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]\n", false, true),
        ("  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n", true, true),
    ];
    for (spec, other_ns, same_ns) in table {
        let cases = [("y/a", "x/a", "TCP", 80, other_ns), ("x/b", "x/a", "TCP", 80, same_ns)];
        check(&np("x", "p", spec), &cases);
    }
    let c = cluster(&np("x", "p", "  podSelector: {}\n  ingress: [{}]\n"));
    let state = Compiler::new().compile(&c, &locals());
    assert!(state
        .policy
        .keys()
        .all(|(k, len)| k.remote_identity == identity::ANY.to_be_bytes() && *len == POLICY_PREFIX_ANY_PROTO));
    // Empty rule allows traffic from outside the cluster too; namespaceSelector: {} does not.
    let xa = ep(&locals(), "x/a").clone();
    assert!(lookup(
        &state,
        xa.host_ifindex,
        direction::INGRESS,
        Ipv4Addr::new(192, 0, 2, 7),
        proto::TCP,
        1
    )
    .is_some());
    let c = cluster(&np("x", "p", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n"));
    let state = Compiler::new().compile(&c, &locals());
    assert!(lookup(
        &state,
        xa.host_ifindex,
        direction::INGRESS,
        Ipv4Addr::new(192, 0, 2, 7),
        proto::TCP,
        1
    )
    .is_none());
}

#[test]
fn policy_types_inference() {
    let l = locals();
    let flags = |spec: &str| {
        let state = Compiler::new().compile(&cluster(&np("x", "p", spec)), &l);
        state.endpoints[&ep(&l, "x/a").host_ifindex].flags
    };
    let (i, e) = (endpoint_flags::ISOLATED_INGRESS, endpoint_flags::ISOLATED_EGRESS);
    assert_eq!(flags("  podSelector: {}\n"), i);
    assert_eq!(flags("  podSelector: {}\n  egress: []\n"), i);
    assert_eq!(flags("  podSelector: {}\n  egress: [{}]\n"), i | e);
    assert_eq!(flags("  podSelector: {}\n  policyTypes: [Egress]\n"), e);
    assert_eq!(flags("  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n"), e);
    assert_eq!(flags("  podSelector: {}\n  policyTypes: [Ingress, Egress]\n"), i | e);
    assert_eq!(
        flags("  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Ingress, Egress]\n"),
        0
    );
    // policyTypes [Egress] ignores the ingress rules: ingress stays open.
    check(
        &np("x", "p", "  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n"),
        &[("y/a", "x/a", "TCP", 80, true), ("x/a", "y/a", "TCP", 80, false)],
    );
}

#[test]
fn egress_isolation_with_ports() {
    let policies = np("y", "out", "  podSelector: {matchLabels: {pod: a}}\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {ns: z}}}]\n    ports: [{port: 80}, {protocol: UDP}]\n");
    check(
        &policies,
        &[
            ("y/a", "z/b", "TCP", 80, true),
            ("y/a", "z/b", "TCP", 81, false),
            ("y/a", "z/b", "UDP", 5353, true),
            ("y/a", "z/b", "SCTP", 80, false),
            ("y/a", "x/b", "TCP", 80, false),
            ("y/b", "x/b", "TCP", 80, true),
            ("x/a", "y/a", "TCP", 80, false), // egress rules imply Ingress too
            ("x/a", "y/b", "TCP", 80, true),
        ],
    );
}

#[test]
fn named_ports_resolve_against_the_destination_pod() {
    let ingress = np(
        "x",
        "in",
        "  podSelector: {}\n  ingress: [{ports: [{port: http}, {port: dns, protocol: UDP}]}]\n",
    );
    check(
        &ingress,
        &[
            ("y/a", "x/a", "TCP", 80, true),
            ("y/a", "x/b", "TCP", 80, false),
            ("y/a", "x/b", "TCP", 8080, true),
            ("y/a", "x/c", "TCP", 8080, false),
            ("y/a", "x/c", "UDP", 53, true),
            ("y/a", "x/c", "TCP", 53, false),
        ],
    );
    let egress = np(
        "x",
        "out",
        "  podSelector: {matchLabels: {pod: a}}\n  egress: [{ports: [{port: http}]}]\n",
    );
    check(
        &egress,
        &[
            ("x/a", "y/a", "TCP", 80, true),
            ("x/a", "y/b", "TCP", 80, false),
            ("x/a", "y/b", "TCP", 8080, true),
            ("x/a", "y/c", "TCP", 8080, false),
        ],
    );
    // Egress by name to a non-pod address resolves to nothing.
    let c = cluster(&egress);
    let l = locals();
    let state = Compiler::new().compile(&c, &l);
    assert!(lookup(
        &state,
        ep(&l, "x/a").host_ifindex,
        direction::EGRESS,
        Ipv4Addr::new(192, 0, 2, 1),
        proto::TCP,
        80
    )
    .is_none());
}

#[test]
fn end_port_prefixes_are_minimal() {
    type Case = (u16, u16, Vec<(u16, u32)>);
    let table: Vec<Case> = vec![
        (80, 80, vec![(80, 96)]),
        (80, 81, vec![(80, 95)]),
        (79, 81, vec![(79, 96), (80, 95)]),
        (0, 65535, vec![(0, 80)]),
        (1024, 2047, vec![(1024, 86)]),
        (65535, 65535, vec![(65535, 96)]),
    ];
    for (lo, hi, want) in table {
        assert_eq!(port_prefixes(lo, hi), want, "{lo}..={hi}");
    }
    let all = port_prefixes(1, 65535);
    assert_eq!(all.len(), 16);
    assert_eq!(all.first(), Some(&(1, 96)));
    assert_eq!(all.last(), Some(&(32768, 81)));
    // Exhaustive: the blocks cover exactly the range for a few awkward ranges.
    for (lo, hi) in [(1u16, 65535u16), (3, 1000), (8000, 8080), (443, 444), (65000, 65535)] {
        let blocks = port_prefixes(lo, hi);
        for port in 0..=u16::MAX {
            let n = blocks
                .iter()
                .filter(|(start, len)| {
                    let bits = len - POLICY_PREFIX_ANY_PORT;
                    let mask = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
                    port & mask == *start
                })
                .count();
            assert_eq!(n, usize::from((lo..=hi).contains(&port)), "{lo}..={hi} port {port}");
        }
    }
    let policies = np(
        "x",
        "range",
        "  podSelector: {}\n  ingress: [{ports: [{port: 79, endPort: 81, protocol: UDP}]}]\n",
    );
    let c = cluster(&policies);
    let state = Compiler::new().compile(&c, &locals());
    assert_eq!(state.policy.len(), 3 * 2, "two blocks per endpoint of x");
    check(
        &policies,
        &[
            ("y/a", "x/a", "UDP", 78, false),
            ("y/a", "x/a", "UDP", 79, true),
            ("y/a", "x/a", "UDP", 81, true),
            ("y/a", "x/a", "UDP", 82, false),
            ("y/a", "x/a", "TCP", 80, false),
        ],
    );
}

#[test]
fn multiple_policies_union_and_keep_the_lowest_rule_id() {
    let policies = format!(
        "{}{}",
        np("x", "p1", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n"),
        np("x", "p2", "  podSelector: {}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: c}}}]\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n"),
    );
    check(
        &policies,
        &[
            ("x/b", "x/a", "TCP", 80, true),
            ("x/c", "x/a", "TCP", 80, true),
            ("x/c", "x/b", "TCP", 80, true),
            ("x/b", "x/c", "TCP", 80, true),
            ("x/a", "x/b", "TCP", 80, false),
        ],
    );
    let c = cluster(&policies);
    let l = locals();
    let mut comp = Compiler::new();
    let state = comp.compile(&c, &l);
    let v = lookup(
        &state,
        ep(&l, "x/a").host_ifindex,
        direction::INGRESS,
        ep(&l, "x/b").ipv4,
        proto::TCP,
        80,
    )
    .unwrap();
    assert_eq!(
        comp.rules().rule(v.rule_id).map(ToString::to_string).as_deref(),
        Some("x/p1 ingress[0]")
    );
    let v = lookup(
        &state,
        ep(&l, "x/c").host_ifindex,
        direction::INGRESS,
        ep(&l, "x/b").ipv4,
        proto::TCP,
        80,
    )
    .unwrap();
    assert_eq!(
        comp.rules().rule(v.rule_id).map(ToString::to_string).as_deref(),
        Some("x/p2 ingress[1]")
    );
    let verdict = spec_says(&c, "x/a", "x/b", "TCP", 80);
    assert_eq!(verdict.ingress, Decision::Denied(vec![("x".into(), "p2".into())]));
    assert_eq!(verdict.egress, Decision::NotIsolated);
}

#[test]
fn ids_are_stable_across_recompiles() {
    let l = locals();
    let mut comp = Compiler::new();
    let p1 = np("x", "p1", "  podSelector: {}\n  ingress: [{}]\n");
    let first = comp.compile(&cluster(&p1), &l);
    let p0 = np("a-first", "p0", "  podSelector: {}\n  ingress: [{}]\n");
    let second = comp.compile(&cluster(&format!("{p0}{p1}")), &l);
    assert_eq!(first.endpoints, second.endpoints, "identities unchanged");
    assert_eq!(first.policy, second.policy, "rule ids unchanged");
    // Relabel x/a: it gets a fresh identity, and its old one is released for good.
    let old = first.endpoints[&ep(&l, "x/a").host_ifindex].identity;
    let mut c = cluster(&p1);
    c.apply(
        parse_documents(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: q}}\n",
            "r",
        )
        .unwrap()
        .remove(0),
    );
    let third = comp.compile(&c, &l);
    let new = third.endpoints[&ep(&l, "x/a").host_ifindex].identity;
    assert!(new > old);
    assert!(comp.identities().key(old).is_none());
}

#[test]
fn unknown_local_pod_fails_closed() {
    let mut l = locals();
    l.push(LocalEndpoint {
        endpoint_id: 99,
        host_ifindex: 999,
        namespace: "x".into(),
        pod: "ghost".into(),
        ipv4: Ipv4Addr::new(10, 0, 9, 9),
        mac: [2; 6],
    });
    let state = Compiler::new().compile(&cluster(""), &l);
    let ghost = state.endpoints[&999];
    assert_eq!(ghost.identity, identity::WORLD);
    assert_eq!(ghost.flags, endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS);
    assert!(state.policy.keys().all(|(k, _)| k.endpoint_id != 99u32.to_be_bytes()));
    assert!(lookup(&state, 999, direction::EGRESS, ep(&l, "x/a").ipv4, proto::TCP, 80).is_none());
    assert!(lookup(&state, 12345, direction::EGRESS, ep(&l, "x/a").ipv4, proto::TCP, 80).is_none());
}

#[test]
fn remote_pods_come_from_status_pod_ip() {
    let c = cluster("---\napiVersion: v1\nkind: Pod\nmetadata: {name: far, namespace: y, labels: {pod: far}}\nspec: {nodeName: n2}\nstatus: {podIP: 10.9.0.7}\n");
    let state = Compiler::new().compile(&c, &locals());
    assert!(state.ipcache.contains_key(&(Ipv4Addr::new(10, 9, 0, 7), 32)));
    assert_eq!(state.endpoints.len(), 9);
}

#[test]
fn ip_blocks_match_addresses_and_pods_with_excepts() {
    // y's pods are 10.0.2.1-3; the except removes y/b (10.0.2.2).
    let policies = np("x", "cidr", "  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.2.0/24, except: [10.0.2.2/32]}}]\n  - from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]\n    ports: [{port: 443}]\n");
    check(
        &policies,
        &[
            ("y/a", "x/a", "TCP", 80, true),
            ("y/b", "x/a", "TCP", 80, false),
            ("y/c", "x/a", "TCP", 80, true),
            ("z/a", "x/a", "TCP", 80, false),
        ],
    );
    let c = cluster(&policies);
    let l = locals();
    let state = Compiler::new().compile(&c, &l);
    let xa = ep(&l, "x/a").host_ifindex;
    let ing = |ip: [u8; 4], port| lookup(&state, xa, direction::INGRESS, Ipv4Addr::from(ip), proto::TCP, port).is_some();
    assert!(ing([10, 0, 2, 200], 80), "non-pod address inside the block");
    assert!(!ing([10, 0, 3, 200], 80), "outside the block");
    assert!(ing([192, 168, 7, 1], 443));
    assert!(!ing([192, 168, 7, 1], 80));
    assert!(!ing([192, 168, 1, 1], 443), "inside the except");
    assert!(state.ipcache.contains_key(&(Ipv4Addr::new(192, 168, 1, 0), 24)));
}

/// Two pods with equal labels on either side of an ipBlock edge: the block admits
/// exactly the one inside, on ingress and on egress, in the datapath and in the spec.
#[test]
fn ip_block_edge_splits_pods_with_equal_labels() {
    let twins = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: w}\n\
                 ---\napiVersion: v1\nkind: Pod\nmetadata: {name: in, namespace: w, labels: {app: web}}\nstatus: {podIP: 10.0.9.127}\n\
                 ---\napiVersion: v1\nkind: Pod\nmetadata: {name: out, namespace: w, labels: {app: web}}\nstatus: {podIP: 10.0.9.128}\n";
    let policies = format!(
        "{twins}{}",
        np(
            "x",
            "edge",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{ipBlock: {cidr: 10.0.9.0/25}}]}]\n  egress: [{to: [{ipBlock: {cidr: 10.0.9.0/24, except: [10.0.9.128/25]}}]}]\n"
        )
    );
    let c = cluster(&policies);
    let l = locals();
    let mut compiler = Compiler::new();
    let state = compiler.compile(&c, &l);
    let xa = ep(&l, "x/a").host_ifindex;
    let (inside, outside) = (Ipv4Addr::new(10, 0, 9, 127), Ipv4Addr::new(10, 0, 9, 128));
    let id = |ip| ipcache_lookup(&state, ip);
    assert_ne!(id(inside), id(outside), "equal labels, different sides: different identities");
    for (dir, peer, want) in [
        (direction::INGRESS, inside, true),
        (direction::INGRESS, outside, false),
        (direction::EGRESS, inside, true),
        (direction::EGRESS, outside, false),
    ] {
        assert_eq!(
            lookup(&state, xa, dir, peer, proto::TCP, 80).is_some(),
            want,
            "dir {dir} peer {peer}"
        );
    }
    assert!(spec_says(&c, "w/in", "x/a", "TCP", 80).ingress.allows());
    assert!(!spec_says(&c, "w/out", "x/a", "TCP", 80).ingress.allows());
    assert!(spec_says(&c, "x/a", "w/in", "TCP", 80).egress.allows());
    assert!(!spec_says(&c, "x/a", "w/out", "TCP", 80).egress.allows());
    // Without ipBlocks the twins share one identity again (no needless identities).
    let plain = compiler.compile(&cluster(twins), &l);
    assert_eq!(ipcache_lookup(&plain, inside), ipcache_lookup(&plain, outside));
}

#[test]
fn overlapping_blocks_of_different_policies() {
    let policies = format!(
        "{}{}",
        np(
            "x",
            "wide",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{ipBlock: {cidr: 172.16.0.0/12}}]}]\n"
        ),
        np(
            "x",
            "narrow",
            "  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{ipBlock: {cidr: 172.16.5.0/24}}]}]\n"
        ),
    );
    let c = cluster(&policies);
    let l = locals();
    let state = Compiler::new().compile(&c, &l);
    let ing = |pod, ip: [u8; 4]| {
        lookup(
            &state,
            ep(&l, pod).host_ifindex,
            direction::INGRESS,
            Ipv4Addr::from(ip),
            proto::TCP,
            1,
        )
        .is_some()
    };
    assert!(
        ing("x/a", [172, 16, 5, 9]),
        "the narrower block's identity is inside the wide block"
    );
    assert!(ing("x/a", [172, 17, 0, 1]));
    assert!(ing("x/b", [172, 16, 5, 9]));
    assert!(!ing("x/b", [172, 17, 0, 1]));
}

/// Policy sets for the matrix; each is checked over every ordered pod pair and probe.
fn policy_sets() -> Vec<String> {
    vec![
        String::new(),
        np("x", "deny", DENY_X),
        np("x", "allow-b", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}, namespaceSelector: {}}]}]\n"),
        np("y", "and", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}, podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}}]}]\n"),
        np("y", "or", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}, {podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [a]}]}}]}]\n"),
        np("z", "egress", "  podSelector: {matchExpressions: [{key: pod, operator: Exists}]}\n  egress: [{to: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}}], ports: [{port: 80}, {port: 53, protocol: UDP}]}]\n"),
        np("x", "named", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{ports: [{port: http}]}]\n  egress: [{ports: [{port: http}, {port: dns, protocol: UDP}]}]\n"),
        np("y", "range", "  podSelector: {matchLabels: {pod: c}}\n  ingress: [{ports: [{port: 79, endPort: 8080}]}]\n"),
        format!(
            "{}{}{}",
            np("x", "one", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]\n"),
            np("x", "two", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]\n"),
            np("y", "eg", "  podSelector: {}\n  egress: [{to: [{podSelector: {}}]}, {to: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: a}}}]}]\n"),
        ),
        np("z", "cidr", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24, 10.0.2.3/32]}}]}]\n  egress: [{to: [{ipBlock: {cidr: 10.0.1.0/30}}]}]\n"),
        np("x", "egress-types", "  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n"),
        np("y", "empty-rules", "  podSelector: {}\n  ingress: [{}]\n  egress: [{}]\n"),
        np_audit("x", "deny-audit", "true", DENY_X),
        format!(
            "{}{}{}",
            np_audit("x", "audit-a", "true", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n  egress: [{ports: [{port: 80}]}]\n"),
            np("x", "enforce-a", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]\n"),
            np_audit("z", "not-audit", "false", "  podSelector: {matchLabels: {pod: c}}\n  policyTypes: [Egress]\n"),
        ),
        format!(
            "{}{}{}",
            audit_namespace("y"),
            np("y", "or", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}, {podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [a]}]}}]}]\n"),
            np_audit("y", "opt-out", "false", "  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: 53, protocol: UDP}]}]\n"),
        ),
    ]
}

#[test]
fn audit_policy_alone_flags_audit_and_compiles_its_allows() {
    let policies = np_audit(
        "x",
        "audit",
        "true",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
    );
    let c = cluster(&policies);
    let l = locals();
    let state = Compiler::new().compile(&c, &l);
    let xa = ep(&l, "x/a");
    assert_eq!(state.endpoints[&xa.host_ifindex].flags, endpoint_flags::AUDIT_INGRESS);
    assert!(!state.policy.is_empty(), "the audit policy's allow rule is compiled");
    let v = |from| lookup_verdict(&state, xa.host_ifindex, direction::INGRESS, ep(&l, from).ipv4, proto::TCP, 80);
    assert_eq!(v("x/b").map(|(v, r)| (v, r.rule_id != 0)), Some((verdict::FORWARDED, true)));
    assert_eq!(v("x/c").map(|(v, r)| (v, r.rule_id)), Some((verdict::AUDIT, 0)));
    let audit = vec![("x".to_string(), "audit".to_string())];
    assert_eq!(spec_says(&c, "x/c", "x/a", "TCP", 80).ingress, Decision::Audited(audit.clone()));
    assert!(spec_says(&c, "x/c", "x/a", "TCP", 80).audited());
    assert!(matches!(spec_says(&c, "x/b", "x/a", "TCP", 80).ingress, Decision::Allowed(_)));
    assert!(!spec_says(&c, "x/b", "x/a", "TCP", 80).audited());
    check(&policies, &[("x/c", "x/a", "TCP", 80, true), ("y/a", "x/a", "UDP", 53, true)]);
    assert_eq!(
        isolating_policies(&c, "x", &model::pod_labels(c.pod("x", "a").unwrap()), Direction::Ingress),
        audit
    );
}

#[test]
fn an_enforcing_policy_on_the_same_pod_wins_and_audit_allows_are_ignored() {
    // The audit policy allows x/c; the enforcing one allows only x/b. Enforcement decides.
    let policies = format!(
        "{}{}",
        np_audit(
            "x",
            "audit",
            "true",
            "  podSelector: {}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]\n"
        ),
        np(
            "x",
            "enforce",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n"
        ),
    );
    let c = cluster(&policies);
    let l = locals();
    let mut comp = Compiler::new();
    let state = comp.compile(&c, &l);
    let (xa, xb) = (ep(&l, "x/a"), ep(&l, "x/b"));
    assert_eq!(state.endpoints[&xa.host_ifindex].flags, endpoint_flags::ISOLATED_INGRESS);
    assert_eq!(state.endpoints[&xb.host_ifindex].flags, endpoint_flags::AUDIT_INGRESS);
    let v = |to: &LocalEndpoint, from| lookup_verdict(&state, to.host_ifindex, direction::INGRESS, ep(&l, from).ipv4, proto::TCP, 80);
    assert_eq!(v(xa, "x/c"), None, "the audit policy's allow does not open the enforced pod");
    let (_, allowed) = v(xa, "x/b").unwrap();
    assert_eq!(comp.rules().rule(allowed.rule_id).map(|r| r.policy.as_str()), Some("enforce"));
    assert_eq!(v(xb, "x/a").map(|(v, _)| v), Some(verdict::AUDIT));
    assert_eq!(v(xb, "x/c").map(|(v, _)| v), Some(verdict::FORWARDED));
    assert_eq!(
        spec_says(&c, "x/c", "x/a", "TCP", 80).ingress,
        Decision::Denied(vec![("x".into(), "enforce".into())]),
        "a drop names only the enforcing policy"
    );
    assert_eq!(
        spec_says(&c, "x/a", "x/b", "TCP", 80).ingress,
        Decision::Audited(vec![("x".into(), "audit".into())])
    );
    let labels = |p| model::pod_labels(c.pod("x", p).unwrap());
    let iso = isolation(&c, "x", &labels("a"), Direction::Ingress);
    assert_eq!((iso.isolated(), iso.audited(), iso.audit.len()), (true, false, 1));
    assert_eq!(iso.effective(), [("x".to_string(), "enforce".to_string())]);
    check(
        &policies,
        &[
            ("x/c", "x/a", "TCP", 80, false),
            ("x/b", "x/a", "TCP", 80, true),
            ("x/a", "x/b", "TCP", 80, true),
        ],
    );
}

#[test]
fn namespace_annotation_audits_all_its_policies_unless_a_policy_opts_out() {
    let policies = format!(
        "{}{}{}",
        audit_namespace("x"),
        np("x", "deny", DENY_X),
        np_audit(
            "x",
            "deny-egress-of-c",
            "false",
            "  podSelector: {matchLabels: {pod: c}}\n  policyTypes: [Egress]\n"
        ),
    );
    let c = cluster(&policies);
    let l = locals();
    let state = Compiler::new().compile(&c, &l);
    for pod in ["x/a", "x/b"] {
        assert_eq!(
            state.endpoints[&ep(&l, pod).host_ifindex].flags,
            endpoint_flags::AUDIT_INGRESS,
            "{pod}"
        );
    }
    assert_eq!(
        state.endpoints[&ep(&l, "x/c").host_ifindex].flags,
        endpoint_flags::AUDIT_INGRESS | endpoint_flags::ISOLATED_EGRESS
    );
    assert_eq!(state.endpoints[&ep(&l, "y/a").host_ifindex].flags, 0);
    assert_eq!(
        datapath_verdicts(&state, &l, "y/a", "x/a", "TCP", 80),
        (Some(verdict::FORWARDED), Some(verdict::AUDIT))
    );
    assert_eq!(
        datapath_verdicts(&state, &l, "x/c", "y/a", "TCP", 80),
        (None, Some(verdict::FORWARDED))
    );
    check(
        &policies,
        &[
            ("y/a", "x/a", "TCP", 80, true),
            ("x/a", "x/b", "UDP", 53, true),
            ("x/c", "y/a", "TCP", 80, false),
        ],
    );
    let annotations_only = format!("{}{}", audit_namespace("x"), np("x", "deny", DENY_X));
    assert!(cluster(&annotations_only).policy_audited("x", cluster(&annotations_only).policy("x", "deny").unwrap()));
    // Without the namespace annotation the same policy enforces.
    let plain = cluster(&np("x", "deny", DENY_X));
    assert!(!plain.policy_audited("x", plain.policy("x", "deny").unwrap()));
    let other = cluster(&np_audit("x", "deny", "yes please", DENY_X));
    assert!(!other.policy_audited("x", other.policy("x", "deny").unwrap()), "only true audits");
}

const PROBES: [(&str, u16); 7] = [
    ("TCP", 80),
    ("TCP", 81),
    ("TCP", 8080),
    ("UDP", 53),
    ("TCP", 443),
    ("SCTP", 80),
    ("UDP", 80),
];

fn compare_everywhere(c: &Cluster, context: &str) {
    let l = locals();
    let state = Compiler::new().compile(c, &l);
    for from in all_pods() {
        for to in all_pods() {
            if from == to {
                continue;
            }
            for (protocol, port) in PROBES {
                let (e, i) = datapath_verdicts(&state, &l, &from, &to, protocol, port);
                let v = spec_says(c, &from, &to, protocol, port);
                assert_eq!(
                    (e, i),
                    (flow_verdict(&v.egress), flow_verdict(&v.ingress)),
                    "{from} -> {to} {protocol}/{port}: datapath (egress, ingress) vs spec {v:?}\n{context}"
                );
            }
        }
    }
}

#[test]
fn datapath_lookup_agrees_with_the_spec_over_the_matrix() {
    for (i, set) in policy_sets().iter().enumerate() {
        compare_everywhere(&cluster(set), &format!("policy set {i}:\n{set}"));
    }
    let all: String = policy_sets().concat();
    compare_everywhere(&cluster(&all), "all policy sets together");
}

#[test]
fn a_policy_expanding_past_the_cap_is_left_out_whole_and_still_isolates() {
    // From every namespace, every port: 16 port prefixes per identity and local pod of x.
    let wide = np(
        "x",
        "wide",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 1, endPort: 65535}]}]\n",
    );
    let narrow = np(
        "x",
        "narrow",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 80}]}]\n",
    );
    let c = cluster(&format!("{wide}{narrow}"));
    let l = locals();
    let mut unbounded = Compiler::new();
    let full = unbounded.compile(&c, &l);
    assert!(unbounded.over_cap().is_empty());
    let wide_entries = full.policy.len();
    assert!(wide_entries > 100, "{wide_entries}");

    let mut compiler = Compiler::new().with_policy_cap(100);
    let state = compiler.compile(&c, &l);
    let over = compiler.over_cap();
    assert_eq!(over.len(), 1, "{over:?}");
    assert_eq!((over[0].namespace.as_str(), over[0].name.as_str(), over[0].cap), ("x", "wide", 100));
    assert!(over[0].entries > 100);
    let text = over[0].to_string();
    assert!(
        text.starts_with("NetworkPolicy x/wide expands to ") && text.contains("allow nothing"),
        "{text}"
    );
    // Fail closed: x's pods stay isolated; only the narrow policy's rule allows anything.
    assert_eq!(datapath(&state, &l, "y/a", "x/c", "TCP", 443), (true, false));
    assert_eq!(datapath(&state, &l, "x/b", "x/a", "TCP", 80), (true, true));
    assert_eq!(datapath(&state, &l, "x/b", "x/a", "TCP", 81), (true, false));
    let endpoint = state.endpoints[&ep(&l, "x/c").host_ifindex];
    assert_ne!(endpoint.flags & bulkhead_common::endpoint_flags::ISOLATED_INGRESS, 0);
    // Under the cap again (the policy narrowed), it is back.
    let narrowed = np(
        "x",
        "wide",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 443}]}]\n",
    );
    let state = compiler.compile(&cluster(&format!("{narrowed}{narrow}")), &l);
    assert!(compiler.over_cap().is_empty());
    assert_eq!(datapath(&state, &l, "y/a", "x/c", "TCP", 443), (true, true));
}
