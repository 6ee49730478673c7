//! Forensics end to end: a deleted pod's flows and its bundle (labels, policies, flows of
//! every node) are still served after the pod is gone, and after the agents restart.
//!
//! Needs `cargo build` at the workspace root first; runs as root.
#![expect(clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bulkhead_e2e::{binary, flow_pod, json_lines, pod_nodes, policy_names, Lab, X_A_FROM_B};
use serde_json::Value;

const PODS: &str = "---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a, tier: web}}
spec: {containers: [{name: c, image: agnhost, ports: [{containerPort: 80, protocol: TCP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
spec: {containers: [{name: c, image: agnhost, ports: [{containerPort: 80, protocol: TCP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x, labels: {pod: c}}
spec: {containers: [{name: c, image: agnhost, ports: [{containerPort: 80, protocol: TCP}]}]}
";

const POD_A: &str = "---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a, tier: web}}
spec: {containers: [{name: c, image: agnhost, ports: [{containerPort: 80, protocol: TCP}]}]}
";

/// Runs `bulkhead CMD --lab-dir DIR ARGS...`.
fn bulkhead(lab: &Lab, cmd: &str, args: &[&str]) -> Output {
    Command::new(binary("bulkhead"))
        .arg(cmd)
        .arg("--lab-dir")
        .arg(&lab.dir)
        .args(args)
        .output()
        .expect("run bulkhead")
}

fn ok(out: Output, what: &str) -> Vec<u8> {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `observe --pod x/a -o json`: each flow as a key that names it (node, time, ends).
fn observed(lab: &Lab) -> BTreeSet<String> {
    let out = ok(bulkhead(lab, "observe", &["--pod", "x/a", "-o", "json"]), "observe --pod x/a");
    json_lines(&out).iter().map(key).collect()
}

fn key(f: &Value) -> String {
    let a = flow_pod(&f["source"]);
    let b = flow_pod(&f["destination"]);
    assert!(a == "x/a" || b == "x/a", "a flow not of x/a: {f}");
    format!("{} {} {a} -> {b} {}", f["time"], f["node"], f["verdict"])
}

/// `forensics x/a -o json`.
fn bundle(lab: &Lab) -> Value {
    let out = ok(bulkhead(lab, "forensics", &["x/a", "-o", "json"]), "forensics x/a");
    serde_json::from_slice(&out).expect("forensics json")
}

/// The bundle's record: labels, policies and its flows as keys.
fn check_bundle(b: &Value, node: &str, deleted: bool) -> BTreeSet<String> {
    assert_eq!(b["pod"], "x/a", "{b}");
    assert_eq!(b["labels"]["pod"], "a", "{b}");
    assert_eq!(b["labels"]["tier"], "web", "{b}");
    assert_eq!(b["node"], node, "{b}");
    assert!(b["ip"].as_str().is_some_and(|ip| !ip.is_empty()), "{b}");
    assert_eq!(policy_names(&b["policies"]), vec!["x/allow-b", "x/default-deny-ingress"], "{b}");
    assert_eq!(b.get("deleted").is_some(), deleted, "{b}");
    let flows = b["flows"].as_array().expect("flows");
    let times: Vec<&str> = flows.iter().map(|f| f["time"].as_str().expect("time")).collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "oldest first");
    flows.iter().map(key).collect()
}

fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The "done when": a deleted pod's flows and its forensics bundle are still
/// served after the pod is gone and after an agent restart.
#[test]
fn a_deleted_pods_flows_and_bundle_outlive_the_pod_and_the_agents() {
    let lab = Lab::new("forensics");
    lab.ok(&["up", "--nodes", "2", "-f", &lab.file("pods.yaml", PODS)]);
    lab.ok(&["apply", "-f", &lab.file("policy.yaml", X_A_FROM_B)]);
    let nodes = pod_nodes(&lab);
    let node_a = nodes.get("x/a").expect("x/a placed").clone();
    let peers_elsewhere = nodes.iter().any(|(p, n)| p != "x/a" && *n != node_a);
    assert!(peers_elsewhere, "the test needs x/a's peers on both nodes: {nodes:?}");
    let probe = lab.probe(80, "TCP");
    assert_eq!(probe.get(&("x/b".into(), "x/a".into())), Some(&true), "{probe:?}");
    assert_eq!(probe.get(&("x/c".into(), "x/a".into())), Some(&false), "{probe:?}");

    // Live: every probe to and from x/a is reported, by both nodes.
    let mut before = BTreeSet::new();
    eventually("x/a's flows are observed on both nodes", || {
        before = observed(&lab);
        let from_nodes: BTreeSet<&str> = before.iter().filter_map(|k| k.split(' ').nth(1)).collect();
        (before.len() >= 4 && from_nodes.len() == 2)
            .then_some(())
            .ok_or_else(|| format!("{before:?}"))
    });
    let live = bundle(&lab);
    let live_flows = check_bundle(&live, &node_a, false);
    assert!(before.is_subset(&live_flows), "the live bundle has every observed flow");

    // Deleted: the pod is gone, its flows and record are not.
    lab.ok(&["delete", "-f", &lab.file("pod-a.yaml", POD_A)]);
    assert!(!pod_nodes(&lab).contains_key("x/a"), "x/a deleted");
    let after = observed(&lab);
    assert!(
        before.is_subset(&after),
        "observe --pod after the deletion lost flows: {before:?} vs {after:?}"
    );
    let gone = bundle(&lab);
    let gone_flows = check_bundle(&gone, &node_a, true);
    assert!(before.is_subset(&gone_flows), "the bundle after the deletion lost flows");

    // Restarted agents: nothing of x/a is in memory any more; the kept files answer.
    lab.ok(&["restart-agent"]);
    assert_eq!(observed(&lab), after, "observe --pod after the restart");
    let restarted = bundle(&lab);
    assert_eq!(check_bundle(&restarted, &node_a, true), gone_flows, "the bundle after the restart");
    assert_eq!(restarted["deleted"], gone["deleted"]);

    // The table form says the relay's anomalies are not there rather than showing none.
    let table = String::from_utf8(ok(bulkhead(&lab, "forensics", &["x/a"]), "forensics x/a (table)")).expect("utf-8");
    assert!(
        table.contains("DELETED") && table.contains("POLICIES     x/allow-b, x/default-deny-ingress"),
        "{table}"
    );
    assert!(table.contains("ANOMALIES"), "{table}");

    // A pod nobody knows is a clear error.
    let out = bulkhead(&lab, "forensics", &["x/nobody"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pod x/nobody is unknown"), "{err}");
}
