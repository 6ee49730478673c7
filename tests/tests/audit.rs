//! Audit mode end to end: a default deny annotated `bulkhead.io/audit: "true"` lets every
//! probe through and reports each would-be drop as an AUDIT flow naming the policy;
//! re-applied without the annotation it drops them; the namespace annotation audits again.
//!
//! Needs `cargo build` at the workspace root first; runs as root.
#![expect(clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_e2e::{binary, flow_pod, json_lines, nine_pods, three_by_three, Lab, PAIRS};
use serde_json::Value;

/// Default deny for ingress in x, `bulkhead.io/audit` set to `annotation` (or unset).
fn deny_x(annotation: Option<&str>) -> String {
    let annotations = annotation.map_or_else(String::new, |v| format!(", annotations: {{bulkhead.io/audit: \"{v}\"}}"));
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny-x, namespace: x{annotations}}}\n\
         spec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n"
    )
}

/// `observe --lab-dir DIR --verdict audit -o json`, one value per line.
fn audit_flows(lab: &Lab) -> Vec<Value> {
    let out = Command::new(binary("bulkhead"))
        .arg("observe")
        .arg("--lab-dir")
        .arg(&lab.dir)
        .args(["--verdict", "audit", "-o", "json"])
        .output()
        .expect("run bulkhead observe");
    assert!(out.status.success(), "observe failed: {}", String::from_utf8_lossy(&out.stderr));
    json_lines(&out.stdout)
}

/// Every ordered pair of distinct pods whose destination is in x: what deny-x isolates.
fn into_x() -> BTreeSet<(String, String)> {
    let pods = nine_pods();
    pods.iter()
        .flat_map(|from| pods.iter().map(move |to| (from.clone(), to.clone())))
        .filter(|(from, to)| from != to && to.starts_with("x/"))
        .collect()
}

#[test]
fn audit_mode_forwards_and_reports_then_enforces_without_the_annotation() {
    let lab = Lab::new("audit");
    lab.ok(&["up", "-f", &lab.file("pods.yaml", &three_by_three())]);
    lab.ok(&["apply", "-f", &lab.file("deny-audit.yaml", &deny_x(Some("true")))]);

    let probe = lab.probe(80, "TCP");
    assert_eq!(probe.len(), PAIRS);
    assert!(probe.values().all(|a| *a), "audit mode dropped something: {probe:?}");

    let wanted = into_x();
    assert_eq!(wanted.len(), 24);
    // Flows come through a ring buffer and a reader task: poll for a while.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let flows = audit_flows(&lab);
        let seen: BTreeSet<(String, String)> = flows
            .iter()
            .map(|f| (flow_pod(&f["source"]), flow_pod(&f["destination"])))
            .collect();
        for f in &flows {
            let pair = (flow_pod(&f["source"]), flow_pod(&f["destination"]));
            assert!(wanted.contains(&pair), "audit flow outside x's ingress: {f}");
            assert_eq!(f["verdict"], "AUDIT", "{f}");
            assert_eq!(f["direction"], "ingress", "{f}");
            assert_eq!(f["destination"]["port"], 80, "{f}");
            let isolated_by: Vec<String> = f["isolated_by"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| format!("{}/{}", p["namespace"].as_str().unwrap_or("?"), p["name"].as_str().unwrap_or("?")))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(isolated_by, ["x/deny-x"], "{f}");
        }
        if seen == wanted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "audit flows missing: {:?}",
            wanted.difference(&seen).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Re-applied without the annotation, the same policy enforces.
    lab.ok(&["apply", "-f", &lab.file("deny.yaml", &deny_x(None))]);
    let enforced = lab.probe(80, "TCP");
    assert_eq!(enforced.len(), PAIRS);
    for ((from, to), allowed) in enforced {
        assert_eq!(allowed, !to.starts_with("x/"), "{from} -> {to} with deny-x enforcing");
    }
}

/// The namespace annotation puts an enforcing policy in audit mode; `"false"` on the policy
/// wins over it. Its own lab, so a failure here does not hide the flow checks above.
#[test]
fn namespace_annotation_audits_and_a_policy_can_opt_out() {
    let lab = Lab::new("auditns");
    lab.ok(&["up", "-f", &lab.file("pods.yaml", &three_by_three())]);
    lab.ok(&["apply", "-f", &lab.file("deny.yaml", &deny_x(None))]);
    let audited_ns =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {ns: x}, annotations: {bulkhead.io/policy-audit: \"true\"}}\n";
    lab.ok(&["apply", "-f", &lab.file("ns-audit.yaml", audited_ns)]);
    let audited = lab.probe(80, "TCP");
    assert_eq!(audited.len(), PAIRS);
    assert!(audited.values().all(|a| *a), "namespace audit mode dropped something");
    lab.ok(&["apply", "-f", &lab.file("deny-false.yaml", &deny_x(Some("false")))]);
    let opted_out = lab.probe(80, "TCP");
    assert_eq!(opted_out.len(), PAIRS);
    for ((from, to), allowed) in opted_out {
        assert_eq!(allowed, !to.starts_with("x/"), "{from} -> {to}: the policy opts out of audit");
    }
}
