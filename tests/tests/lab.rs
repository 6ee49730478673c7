//! `bulkhead lab` end to end with the real agent, datapath and CNI plugin.
//!
//! Needs `cargo build` at the workspace root first; runs as root.
#![expect(clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use bulkhead_e2e::{scenario_bad_input, scenario_exec, scenario_three_by_three, scenario_up_down, three_by_three, Lab, X_A_FROM_B};

#[test]
fn up_down_leaves_nothing() {
    scenario_up_down(&Lab::new("updown"));
}

#[test]
fn three_by_three_policy_matrix() {
    scenario_three_by_three(&Lab::new("3x3"));
}

#[test]
fn bad_input_changes_nothing() {
    scenario_bad_input(&Lab::new("badinput"));
}

#[test]
fn exec_passes_exit_code() {
    scenario_exec(&Lab::new("exec"));
}

fn pod_ip(lab: &Lab, pod: &str) -> String {
    let pods: serde_json::Value = serde_json::from_str(&lab.ok(&["pods", "-o", "json"])).expect("pods json");
    let found = pods
        .as_array()
        .expect("array")
        .iter()
        .find(|p| format!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or("")) == pod);
    found
        .and_then(|p| p["ip"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{pod} not listed: {pods}"))
}

fn reaches(lab: &Lab, from: &str, to: &str) -> bool {
    lab.probe(80, "TCP")[&(from.to_string(), to.to_string())]
}

/// Re-applying a Pod with new labels changes them in place (same IP), and policy follows
/// the labels at once; deleting the allowing policy takes the access away again.
#[test]
fn relabel_in_place_and_policy_follows() {
    let lab = Lab::new("relabel");
    lab.ok(&["up", "-f", &lab.file("pods.yaml", &three_by_three())]);
    lab.ok(&["apply", "-f", &lab.file("policy.yaml", X_A_FROM_B)]);
    let ip = pod_ip(&lab, "y/c");
    assert!(!reaches(&lab, "y/c", "x/a"), "y/c is not pod=b yet");
    let relabeled = "apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: y, labels: {pod: b}}\nspec:\n  containers:\n  - name: c\n    image: agnhost\n    ports:\n    - {containerPort: 80, protocol: TCP}\n    - {containerPort: 80, protocol: UDP}\n    - {containerPort: 81, protocol: TCP}\n    - {containerPort: 81, protocol: UDP}\n";
    lab.ok(&["apply", "-f", &lab.file("relabel.yaml", relabeled)]);
    assert_eq!(pod_ip(&lab, "y/c"), ip, "relabelling must keep the IP");
    assert!(reaches(&lab, "y/c", "x/a"), "y/c now has pod=b");
    let allow = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-b, namespace: x}\n";
    lab.ok(&["delete", "-f", &lab.file("allow.yaml", allow)]);
    assert!(!reaches(&lab, "y/b", "x/a"), "allow-b is gone: default deny holds");
    assert!(reaches(&lab, "y/b", "z/a"), "z is not isolated");
}

/// `down` cleans up after a crash: every lab process killed with SIGKILL, state left as it was.
#[test]
fn down_after_crash_leaves_nothing() {
    let lab = Lab::new("crash");
    lab.ok(&["up", "-f", &lab.file("pods.yaml", &three_by_three())]);
    let id = lab.id();
    let dir = lab.dir.display().to_string();
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&dir) {
            let status = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .expect("kill");
            assert!(status.success());
            killed += 1;
        }
    }
    // One agent and nine pod servers.
    assert_eq!(killed, 10, "lab processes found");
    lab.ok(&["down"]);
    lab.assert_gone(&id);
}
