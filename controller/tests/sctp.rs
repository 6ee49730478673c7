//! SCTP through the real compiler and the real datapath programs (`BPF_PROG_TEST_RUN`).
//!
//! The lab's kernel has no SCTP sockets, so the conformance suite cannot probe SCTP; here
//! the SCTP conformance cases' truth tables (plus named-port, protocol-only and endPort
//! cases) are checked on crafted packets instead. Test runs put the packet on `lo`
//! (ifindex 1), so the pod under test is compiled as the local endpoint at ifindex 1, one
//! pod at a time.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

mod testrun;

use bulkhead::model::{self, Cluster};
use bulkhead::policy::{evaluate, Compiler, LocalEndpoint};
use bulkhead_common::program_names;
use serde_yaml_ng::Value;
use testrun::{protocol_number, Addr, PinnedDatapath, LO};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const N: usize = 9;

fn pod_name(i: usize) -> String {
    format!("{}/{}", NAMESPACES[i / 3], PODS[i % 3])
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 9, 0, 10 + i as u8)
}

fn pod_mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 1, i as u8]
}

fn addr(i: usize) -> Addr {
    Addr {
        ip: pod_ip(i),
        mac: pod_mac(i),
    }
}

/// Upstream's 3×3 cluster with its port names, SCTP included, and fixed pod IPs.
fn base_yaml() -> String {
    let mut out = String::new();
    for ns in NAMESPACES {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}, kubernetes.io/metadata.name: {ns}}}}}\n"
        ));
    }
    for i in 0..N {
        let (ns, pod) = (NAMESPACES[i / 3], PODS[i % 3]);
        let mut ports = String::new();
        for port in [80, 81] {
            for protocol in ["TCP", "UDP", "SCTP"] {
                let lower = protocol.to_ascii_lowercase();
                ports.push_str(&format!(
                    "    - {{name: serve-{port}-{lower}, containerPort: {port}, protocol: {protocol}}}\n"
                ));
            }
        }
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\nspec:\n  containers:\n  - name: cont-80-81\n    image: agnhost\n    ports:\n{ports}status: {{podIP: {}}}\n",
            pod_ip(i)
        ));
    }
    out
}

/// One side of a `FROM->TO` pattern: `None` is `*`.
fn side(s: &str) -> (Option<usize>, Option<usize>) {
    if s == "*" {
        return (None, None);
    }
    let (ns, pod) = s.split_once('/').unwrap_or_else(|| panic!("pattern side {s:?}"));
    let pick = |v: &str, all: &[&str; 3]| (v != "*").then(|| all.iter().position(|x| *x == v).unwrap_or_else(|| panic!("unknown {v:?}")));
    (pick(ns, &NAMESPACES), pick(pod, &PODS))
}

/// A probe of a case: port, protocol, expected `[from][to]`.
struct Probe {
    port: u16,
    protocol: String,
    expected: [[bool; N]; N],
}

/// The conformance case format (tests/conformance/README): `apply` and `probes` only.
struct Case {
    name: String,
    apply: String,
    probes: Vec<Probe>,
}

fn parse_case(text: &str) -> Case {
    let v: Value = serde_yaml_ng::from_str(text).unwrap();
    let m = v.as_mapping().unwrap();
    for k in m.keys() {
        let k = k.as_str().unwrap();
        assert!(
            ["name", "upstream", "requires", "apply", "probes"].contains(&k),
            "key {k:?} is not handled here"
        );
    }
    let probes = v["probes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            let default = p["default"].as_str() == Some("allow");
            let mut expected = [[default; N]; N];
            for (key, allow) in [("deny", false), ("allow", true)] {
                // Deny patterns, then allow ones: how every case used here is written.
                for pat in p.get(key).and_then(Value::as_sequence).into_iter().flatten() {
                    let (from, to) = pat.as_str().unwrap().split_once("->").unwrap();
                    let (from, to) = (side(from.trim()), side(to.trim()));
                    for (f, row) in expected.iter_mut().enumerate() {
                        for (d, cell) in row.iter_mut().enumerate() {
                            let hit = |(ns, pod): (Option<usize>, Option<usize>), i: usize| {
                                ns.is_none_or(|n| n == i / 3) && pod.is_none_or(|p| p == i % 3)
                            };
                            if hit(from, f) && hit(to, d) {
                                *cell = allow;
                            }
                        }
                    }
                }
            }
            Probe {
                port: u16::try_from(p["port"].as_u64().unwrap()).unwrap(),
                protocol: p["protocol"].as_str().unwrap().to_string(),
                expected,
            }
        })
        .collect();
    Case {
        name: v["name"].as_str().unwrap().to_string(),
        apply: v["apply"].as_str().unwrap().to_string(),
        probes,
    }
}

fn case_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance")
}

/// Every conformance case about SCTP (the file name says so).
fn conformance_sctp_cases() -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(case_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains("sctp") && n.ends_with(".yaml"))
        })
        .collect();
    files.sort();
    assert!(files.len() >= 3, "sctp conformance cases: {files:?}");
    files.iter().map(|f| parse_case(&std::fs::read_to_string(f).unwrap())).collect()
}

/// Named port, protocol-only and endPort, each also probed with TCP to the same port.
const EXTRA_CASES: &str = r#"
name: sctp-named-port
apply: |
  apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: allow-named-sctp, namespace: x}
  spec:
    podSelector: {matchLabels: {pod: a}}
    ingress:
    - from:
      - namespaceSelector: {matchLabels: {ns: y}}
      ports:
      - {port: serve-81-sctp, protocol: SCTP}
probes:
  - {port: 81, protocol: SCTP, default: allow, deny: ["*->x/a"], allow: ["y/*->x/a"]}
  - {port: 80, protocol: SCTP, default: allow, deny: ["*->x/a"]}
  - {port: 81, protocol: TCP, default: allow, deny: ["*->x/a"]}
---
name: sctp-protocol-only-egress
apply: |
  apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: egress-sctp-only, namespace: y}
  spec:
    podSelector: {matchLabels: {pod: b}}
    policyTypes: [Egress]
    egress:
    - ports:
      - {protocol: SCTP}
probes:
  - {port: 80, protocol: SCTP, default: allow}
  - {port: 81, protocol: SCTP, default: allow}
  - {port: 80, protocol: TCP, default: allow, deny: ["y/b->*"]}
  - {port: 80, protocol: UDP, default: allow, deny: ["y/b->*"]}
---
name: sctp-end-port
apply: |
  apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: sctp-range, namespace: z}
  spec:
    podSelector: {}
    ingress:
    - ports:
      - {port: 79, endPort: 80, protocol: SCTP}
probes:
  - {port: 80, protocol: SCTP, default: allow}
  - {port: 81, protocol: SCTP, default: allow, deny: ["*->z/*"]}
  - {port: 80, protocol: TCP, default: allow, deny: ["*->z/*"]}
"#;

fn extra_cases() -> Vec<Case> {
    EXTRA_CASES.split("\n---\n").map(parse_case).collect()
}

fn cluster_for(case: &Case) -> Cluster {
    let mut cluster = Cluster::from_objects(model::parse_documents(&base_yaml(), "base").unwrap());
    for object in model::parse_documents(&case.apply, &case.name).unwrap() {
        cluster.apply(object);
    }
    cluster
}

fn endpoint(i: usize) -> LocalEndpoint {
    LocalEndpoint {
        endpoint_id: 100 + i as u32,
        host_ifindex: LO,
        namespace: NAMESPACES[i / 3].to_string(),
        pod: PODS[i % 3].to_string(),
        ipv4: pod_ip(i),
        mac: pod_mac(i),
    }
}

/// Checks every probe of `case` on packets: a flow passes when the sender's egress program
/// and the receiver's ingress program both forward its first packet. Also checks that the
/// spec evaluator agrees with the truth table. Returns the mismatches.
fn check_case(case: &Case) -> Vec<String> {
    let cluster = cluster_for(case);
    let mut f = PinnedDatapath::new(&format!("sctp-{}", case.name));
    let mut compiler = Compiler::new();
    let mut errors = Vec::new();
    for probe in &case.probes {
        let protocol = protocol_number(&probe.protocol);
        let mut egress = [[false; N]; N];
        let mut ingress = [[false; N]; N];
        for local in 0..N {
            f.install(compiler.compile(&cluster, &[endpoint(local)]));
            for other in (0..N).filter(|o| *o != local) {
                egress[local][other] = f.passes(program_names::FROM_POD, addr(local), addr(other), protocol, probe.port);
                ingress[other][local] = f.passes(program_names::TO_POD, addr(other), addr(local), protocol, probe.port);
            }
        }
        for from in 0..N {
            for to in (0..N).filter(|t| *t != from) {
                let want = probe.expected[from][to];
                let got = egress[from][to] && ingress[from][to];
                let (fname, tname) = (pod_name(from), pod_name(to));
                if got != want {
                    errors.push(format!(
                        "{}: {fname}->{tname} {}/{}: datapath {got} (egress {}, ingress {}), expected {want}",
                        case.name, probe.port, probe.protocol, egress[from][to], ingress[from][to]
                    ));
                }
                let spec = evaluate(
                    &cluster,
                    fname.split_once('/').unwrap(),
                    tname.split_once('/').unwrap(),
                    &probe.protocol,
                    probe.port,
                );
                if spec.allowed != want {
                    errors.push(format!(
                        "{}: {fname}->{tname} {}/{}: evaluate {spec:?}, expected {want}",
                        case.name, probe.port, probe.protocol
                    ));
                }
            }
        }
    }
    errors
}

#[test]
fn sctp_conformance_cases_hold_on_packets() {
    let cases = conformance_sctp_cases();
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    for must in ["default-deny-ingress-sctp", "pod-in-other-namespace-sctp", "ports-numeric-sctp"] {
        assert!(names.contains(&must), "{must} missing from {names:?}");
    }
    let errors: Vec<String> = cases.iter().flat_map(check_case).collect();
    assert!(errors.is_empty(), "{} mismatches:\n{}", errors.len(), errors.join("\n"));
}

#[test]
fn sctp_named_port_protocol_only_and_end_port_hold_on_packets() {
    let errors: Vec<String> = extra_cases().iter().flat_map(check_case).collect();
    assert!(errors.is_empty(), "{} mismatches:\n{}", errors.len(), errors.join("\n"));
}

/// The check itself can fail: a truth table that contradicts the policy is reported.
#[test]
fn a_wrong_truth_table_is_caught() {
    let mut case = extra_cases().remove(0);
    // Claim TCP/81 to x/a is allowed from y although the policy only admits SCTP.
    case.probes.truncate(3);
    let tcp = &mut case.probes[2];
    for from in 3..6 {
        tcp.expected[from][0] = true;
    }
    let errors = check_case(&case);
    assert_eq!(errors.len(), 6, "3 datapath and 3 evaluator mismatches: {errors:#?}");
    assert!(errors.iter().all(|e| e.contains("->x/a 81/TCP")), "{errors:#?}");
}
