//! Invalid NetworkPolicies end to end: `lab apply` refuses them naming the field and changes
//! nothing, and an agent that finds one in its manifests keeps its model and stays up.
//!
//! Needs `cargo build` at the workspace root first; runs as root.
#![expect(clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::time::{Duration, Instant};

use bulkhead_e2e::{three_by_three, Lab, PAIRS, X_A_FROM_B};

/// A policy that would change the matrix if it went in: z is cut off entirely.
const DENY_Z: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-z, namespace: z}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
";

fn bad_policy(rules: &str) -> String {
    format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: y}}\nspec:\n  podSelector: {{}}\n{rules}")
}

/// (case, policy body, the field path the error must name, a word of the reason).
fn cases() -> Vec<(&'static str, String, &'static str, &'static str)> {
    vec![
        (
            "bad-cidr",
            bad_policy("  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/33}\n"),
            "spec.ingress[0].from[0].ipBlock.cidr",
            "prefix",
        ),
        (
            "except-outside-cidr",
            bad_policy("  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}\n"),
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "within",
        ),
        (
            "end-port-below-port",
            bad_policy("  egress:\n  - ports:\n    - {port: 90, endPort: 80, protocol: TCP}\n"),
            "spec.egress[0].ports[0].endPort",
            "greater",
        ),
        (
            "end-port-with-named-port",
            bad_policy("  ingress:\n  - ports:\n    - {port: http, endPort: 90}\n"),
            "spec.ingress[0].ports[0].endPort",
            "named port",
        ),
        (
            "unknown-protocol",
            bad_policy("  ingress:\n  - ports:\n    - {port: 80, protocol: ICMP}\n"),
            "spec.ingress[0].ports[0].protocol",
            "ICMP",
        ),
    ]
}

/// Every bad policy is refused by `lab apply` with a non-zero exit and the field named;
/// the valid policy in the same file is not applied either, and the probe matrix is what
/// the policies in force give.
#[test]
fn lab_apply_refuses_invalid_policies_and_changes_nothing() {
    let lab = Lab::new("badpolicy");
    lab.ok(&["up", "-f", &lab.file("pods.yaml", &three_by_three())]);
    lab.ok(&["apply", "-f", &lab.file("policy.yaml", X_A_FROM_B)]);
    let before = lab.probe(80, "TCP");
    assert_eq!(before.len(), PAIRS);
    assert!(!before[&("y/a".into(), "x/a".into())], "x/a admits only pod=b");
    assert!(before[&("y/b".into(), "x/a".into())], "x/a admits pod=b");
    assert!(before[&("y/a".into(), "z/a".into())], "z is open");
    // Every case is checked and every failure reported: one bad case does not hide the rest.
    let mut failures = Vec::new();
    for (name, policy, field, reason) in cases() {
        let file = lab.file(&format!("{name}.yaml"), &format!("{DENY_Z}{policy}"));
        let out = lab.run(&["apply", "-f", &file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let checks = [
            (out.status.code() == Some(1), format!("exit code {:?}, not 1", out.status.code())),
            (stderr.contains(field), format!("error does not name {field}")),
            (stderr.contains(reason), format!("error does not say why ({reason:?})")),
            (stderr.contains("NetworkPolicy y/bad"), "error does not name the object".to_string()),
            (lab.probe(80, "TCP") == before, "changed what is enforced".to_string()),
        ];
        for (ok, what) in checks {
            if !ok {
                failures.push(format!("{name}: {what}; stderr: {}", stderr.trim()));
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// The agent's log of node0.
fn agent_log(lab: &Lab) -> String {
    std::fs::read_to_string(lab.dir.join("nodes/node0/agent.log")).unwrap_or_default()
}

fn agent_pid(lab: &Lab) -> u32 {
    let status: serde_json::Value = serde_json::from_str(&lab.ok(&["status", "-o", "json"])).expect("status json");
    let pid = status["nodes"][0]["agentPid"].as_u64().expect("agent pid");
    u32::try_from(pid).expect("pid")
}

/// An invalid file dropped straight into the agent's manifests dir (bypassing `lab apply`'s
/// checks): the agent logs it, keeps enforcing the previous model and stays alive; once the
/// file is gone it picks up changes again.
#[test]
fn agent_survives_an_invalid_manifest_and_keeps_its_model() {
    let lab = Lab::new("badmanifest");
    lab.ok(&["up", "-f", &lab.file("pods.yaml", &three_by_three())]);
    lab.ok(&["apply", "-f", &lab.file("policy.yaml", X_A_FROM_B)]);
    let before = lab.probe(80, "TCP");
    assert_eq!(before.len(), PAIRS);
    let pid = agent_pid(&lab);
    let manifests = lab.dir.join("manifests");
    // The lab writes one file per object there.
    assert!(
        manifests.join("lab_networkpolicy_x_allow-b.yaml").is_file(),
        "the lab's agents read {}",
        manifests.display()
    );
    for (name, policy, field, _) in cases() {
        let bad = manifests.join(format!("zz-{name}.yaml"));
        // Valid and invalid together: the agent must take neither.
        std::fs::write(&bad, format!("{DENY_Z}{policy}")).expect("write bad manifest");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent_log(&lab).contains(&format!("zz-{name}.yaml")) {
            assert!(
                Instant::now() < deadline,
                "{name}: the agent never logged the bad file:\n{}",
                agent_log(&lab)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = agent_log(&lab);
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains(&format!("zz-{name}.yaml")))
            .unwrap_or_default();
        assert!(line.contains(field), "{name}: the agent's log does not name {field}: {line}");
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{name}: the agent died:\n{log}"
        );
        assert_eq!(lab.probe(80, "TCP"), before, "{name}: the agent changed its model");
        // `lab apply` goes through the same agent reload, and reports the file in the way.
        let out = lab.run(&["apply", "-f", &lab.file("deny-z.yaml", DENY_Z)]);
        assert!(!out.status.success(), "{name}: reload succeeded with a bad manifest present");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("zz-{name}.yaml")),
            "{name}: apply error does not name the bad file: {stderr}"
        );
        std::fs::remove_file(&bad).expect("remove bad manifest");
    }
    assert_eq!(agent_pid(&lab), pid, "the agent was restarted");
    // With the bad file gone the agent follows the manifests again.
    lab.ok(&["apply", "-f", &lab.file("deny-z.yaml", DENY_Z)]);
    let after = lab.probe(80, "TCP");
    assert_eq!(after.len(), PAIRS);
    assert!(
        !after[&("y/a".into(), "z/a".into())],
        "deny-z is enforced once the bad file is gone"
    );
    eprintln!("agent log:\n{}", agent_log(&lab));
    assert!(after[&("y/b".into(), "x/a".into())], "x/a still admits pod=b");
}
