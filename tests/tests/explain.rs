//! `bulkhead explain` end to end: over every ordered pair of the 3×3 lab (two nodes), with
//! enforcing and audit-mode policies, explain's verdict agrees with a real probe (DENIED ⇔
//! the probe fails; AUDIT is let through), and bad input fails clearly with exit 1.
//!
//! Needs `cargo build` at the workspace root first; runs as root.
#![expect(clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::collections::BTreeMap;
use std::process::{Command, Output};

use bulkhead_e2e::{binary, policy_names, three_by_three, Lab, PAIRS, X_A_FROM_B};
use serde_json::Value;

/// y's egress is audited: only namespace z would be allowed. z/c admits only z/a on 80.
const MORE: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-to-z, namespace: y, annotations: {bulkhead.io/audit: \"true\"}}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: z}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c-from-a, namespace: z}
spec:
  podSelector: {matchLabels: {pod: c}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: a}}}]
    ports: [{port: 80}]
";

/// Runs `bulkhead explain --lab-dir DIR ARGS...`.
fn explain(lab: &Lab, args: &[&str]) -> Output {
    Command::new(binary("bulkhead"))
        .arg("explain")
        .arg("--lab-dir")
        .arg(&lab.dir)
        .args(args)
        .output()
        .expect("run bulkhead explain")
}

/// `explain FROM TO PORT -o json`, which must succeed.
fn explain_json(lab: &Lab, from: &str, to: &str, port: &str) -> Value {
    let out = explain(lab, &[from, to, port, "-o", "json"]);
    assert!(
        out.status.success(),
        "explain {from} {to} {port} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("explain json")
}

#[test]
fn explain_agrees_with_probes_over_every_pair() {
    let lab = Lab::new("explain");
    lab.ok(&["up", "--nodes", "2", "-f", &lab.file("pods.yaml", &three_by_three())]);
    lab.ok(&["apply", "-f", &lab.file("policies.yaml", &format!("{X_A_FROM_B}{MORE}"))]);
    for (port, protocol) in [(80, "TCP"), (81, "TCP")] {
        let probe = lab.probe(port, protocol);
        assert_eq!(probe.len(), PAIRS);
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for ((from, to), allowed) in &probe {
            let e = explain_json(&lab, from, to, &format!("{port}/{protocol}"));
            let verdict = e["verdict"].as_str().expect("verdict").to_string();
            assert_eq!(
                verdict != "DENIED",
                *allowed,
                "{from} -> {to} {port}/{protocol}: explain says {verdict}, the probe {}:\n{e:#}",
                if *allowed { "got through" } else { "was dropped" }
            );
            // AUDIT comes only from y's audit-mode egress.
            assert_eq!(
                e["egress"]["verdict"] == "AUDIT",
                from.starts_with("y/") && !to.starts_with("z/"),
                "{e:#}"
            );
            *counts.entry(verdict).or_default() += 1;
        }
        for v in ["ALLOWED", "DENIED", "AUDIT"] {
            assert!(counts.get(v).is_some_and(|n| *n > 0), "no {v} on {port}/{protocol}: {counts:?}");
        }
    }

    // One of each, in detail.
    let e = explain_json(&lab, "y/b", "x/a", "80/TCP");
    assert_eq!(e["verdict"], "AUDIT", "{e:#}");
    assert_eq!((&e["egress"]["pod"], &e["egress"]["direction"]), (&"y/b".into(), &"egress".into()));
    assert_eq!((&e["egress"]["isolated"], &e["egress"]["audit_mode"]), (&true.into(), &true.into()));
    assert_eq!(policy_names(&e["egress"]["isolated_by"]), ["y/egress-to-z"]);
    assert_eq!(e["ingress"]["verdict"], "ALLOWED");
    assert_eq!(e["ingress"]["audit_mode"], false);
    assert_eq!(policy_names(&e["ingress"]["isolated_by"]), ["x/allow-b", "x/default-deny-ingress"]);
    let rule = &e["ingress"]["allowed_by"];
    assert_eq!(
        (&rule["namespace"], &rule["name"], &rule["rule"]),
        (&"x".into(), &"allow-b".into(), &0.into())
    );

    let e = explain_json(&lab, "x/c", "x/a", "80/tcp");
    assert_eq!((&e["verdict"], &e["protocol"]), (&"DENIED".into(), &"TCP".into()));
    assert_eq!(e["egress"]["isolated"], false);
    assert_eq!(e["ingress"]["verdict"], "DENIED");
    assert!(e["ingress"].get("allowed_by").is_none(), "{e:#}");

    // The table names the same things; --node asks another node's agent, same answer.
    let out = explain(&lab, &["y/b", "x/a", "80/TCP", "--node", "node1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("y/b -> x/a 80/TCP: AUDIT\n"), "{table}");
    assert!(table.contains("y/egress-to-z") && table.contains("x/allow-b ingress[0]"), "{table}");

    // Bad input: a clear message and exit 1, before or after asking the agent.
    for (args, needle) in [
        (vec!["xa", "x/b", "80/TCP"], "FROM: \"xa\" is not NAMESPACE/NAME"),
        (vec!["x/a", "x/", "80/TCP"], "TO: \"x/\" is not NAMESPACE/NAME"),
        (vec!["x/zz", "x/b", "80/TCP"], "FROM: unknown pod x/zz"),
        (vec!["x/a", "q/b", "80/TCP"], "TO: unknown pod q/b"),
        (vec!["x/a", "x/b", "http/TCP"], "named ports are not supported"),
        (vec!["x/a", "x/b", "99999/TCP"], "is not a port number"),
        (vec!["x/a", "x/b", "80/ICMP"], "unknown protocol \"ICMP\""),
        (vec!["x/a", "x/b", "80/TCP", "--node", "nope"], "no such lab node"),
    ] {
        let out = explain(&lab, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr:?} does not say {needle:?}");
        assert!(out.stdout.is_empty(), "{args:?} printed {}", String::from_utf8_lossy(&out.stdout));
    }
}
