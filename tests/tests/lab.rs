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
    // One agent, the relay, nine pod servers and the outside host's server.
    assert_eq!(killed, 12, "lab processes found");
    lab.ok(&["down"]);
    lab.assert_gone(&id);
}

/// Whether a TCP connection from the node namespace `netns` to `ip:port` completes within 1 s.
fn node_connects(netns: &str, ip: &str, port: u16) -> bool {
    let script = format!("exec 3<>/dev/tcp/{ip}/{port}");
    std::process::Command::new("ip")
        .args(["netns", "exec", netns, "timeout", "1", "bash", "-c", &script])
        .status()
        .expect("run ip netns exec")
        .success()
}

/// A pod's own node always reaches it (kubelet probes), whatever the policy; another node
/// is an ordinary remote address and meets the policy like any other.
#[test]
fn own_node_is_allowed_other_nodes_are_not() {
    let lab = Lab::new("hostid");
    lab.ok(&["up", "--nodes", "2", "-f", &lab.file("pods.yaml", &three_by_three())]);
    let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";
    lab.ok(&["apply", "-f", &lab.file("deny.yaml", deny)]);
    let status: serde_json::Value = serde_json::from_str(&lab.ok(&["status", "-o", "json"])).expect("status json");
    let pods: serde_json::Value = serde_json::from_str(&lab.ok(&["pods", "-o", "json"])).expect("pods json");
    let netns_of = |node: &str| -> String {
        status["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["name"] == node)
            .and_then(|n| n["netns"].as_str())
            .expect("node netns")
            .to_string()
    };
    let mut checked = 0;
    for pod in pods.as_array().expect("pods").iter().filter(|p| p["namespace"] == "x") {
        let ip = pod["ip"].as_str().expect("ip");
        let own = pod["node"].as_str().expect("node");
        let other = if own == "node0" { "node1" } else { "node0" };
        assert!(
            node_connects(&netns_of(own), ip, 80),
            "{own} → x/{} ({ip}) must be allowed",
            pod["name"]
        );
        assert!(
            !node_connects(&netns_of(other), ip, 80),
            "{other} → x/{} ({ip}) must be denied",
            pod["name"]
        );
        checked += 1;
    }
    assert_eq!(checked, 3);
    // The pods themselves stay isolated from each other.
    assert!(!reaches(&lab, "y/a", "x/a"));
}
