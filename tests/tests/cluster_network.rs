//! The agents carry the cluster's traffic: routes between nodes follow the Node objects
//! (native and VXLAN), pod traffic leaving the cluster is masqueraded, and traffic the node
//! forwards for someone else (kube-proxy's mark 0x4000) is not the node's own.
//!
//! Needs `cargo build` at the workspace root first; runs as root.
#![expect(clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_e2e::{assert_agent_routes, node_routes, pod_nodes, three_by_three, Lab, AGENT_ROUTE_PROTOCOL};

/// The lab's status as JSON.
fn status(lab: &Lab) -> serde_json::Value {
    serde_json::from_str(&lab.ok(&["status", "-o", "json"])).expect("status json")
}

/// (name, netns, pod CIDR, underlay IP) of every node.
fn nodes(lab: &Lab) -> Vec<(String, String, String, String)> {
    status(lab)["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            let s = |k: &str| n[k].as_str().unwrap_or_else(|| panic!("node {k}: {n}")).to_string();
            (s("name"), s("netns"), s("podCIDR"), s("underlayIP"))
        })
        .collect()
}

/// Polls `check` every 100 ms until it holds or `limit` passes; whether it held.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `bridge fdb show dev bulkhead.vxlan` in `netns`.
fn fdb(netns: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "bridge", "fdb", "show", "dev", "bulkhead.vxlan"])
        .output()
        .expect("run bridge fdb");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The VXLAN MAC the agents derive from a node's InternalIP (`02:b5:` + its four bytes).
fn vtep_mac(ip: &str) -> String {
    let bytes: Vec<u8> = ip.split('.').map(|b| b.parse().expect("ip byte")).collect();
    format!("02:b5:{:02x}:{:02x}:{:02x}:{:02x}", bytes[0], bytes[1], bytes[2], bytes[3])
}

fn node_yaml(name: &str, cidr: &str, ip: &str) -> String {
    format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDR: {cidr}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n")
}

/// VXLAN, 3 nodes: the agents' routes and FDB entries follow the Node objects — a node
/// removed from the manifests vanishes from the others, re-added it comes back — and pods
/// on different nodes reach each other through the overlay with a lowered MTU.
#[test]
fn vxlan_routes_follow_the_nodes() {
    let lab = Lab::new("vxnodes");
    lab.ok(&[
        "up",
        "--nodes",
        "3",
        "--routing",
        "vxlan",
        "-f",
        &lab.file("pods.yaml", &three_by_three()),
    ]);
    assert_eq!(status(&lab)["routing"], "vxlan");
    assert_agent_routes(&lab);
    let all = nodes(&lab);
    let (gone, gone_cidr, gone_ip) = (&all[2].0, &all[2].2, &all[2].3);
    for (_, netns, _, _) in &all[..2] {
        assert!(fdb(netns).contains(&vtep_mac(gone_ip)), "{netns} fdb lacks {gone}: {}", fdb(netns));
    }
    // Cross-node pod traffic rides the overlay: every pair connects, with no policy.
    let open = lab.probe(80, "TCP");
    assert!(open.values().all(|a| *a), "cross-node pairs blocked over vxlan: {open:?}");
    // `ip link`, not /sys: sysfs shows the namespace that mounted it, not the one entered.
    let mtu_of = |text: &str| -> u32 {
        let after = text.split(" mtu ").nth(1).unwrap_or_else(|| panic!("no mtu in {text}"));
        after.split_whitespace().next().and_then(|m| m.parse().ok()).expect("mtu number")
    };
    let out = Command::new("ip")
        .args(["-n", &all[0].1, "-o", "link", "show", "ul0"])
        .output()
        .expect("ip link ul0");
    let underlay_mtu = mtu_of(&String::from_utf8_lossy(&out.stdout));
    let pod_mtu = mtu_of(&lab.ok(&["exec", "x/a", "--", "ip", "-o", "link", "show", "eth0"]));
    assert_eq!(pod_mtu, underlay_mtu - 50, "pod MTU lowered by the VXLAN overhead");

    let node_file = lab.file("node.yaml", &node_yaml(gone, gone_cidr, gone_ip));
    lab.ok(&["delete", "-f", &node_file]);
    for (_, netns, _, _) in &all[..2] {
        let vanished = eventually(Duration::from_secs(10), || {
            !node_routes(netns).iter().any(|r| r.starts_with(&format!("{gone_cidr} "))) && !fdb(netns).contains(&vtep_mac(gone_ip))
        });
        assert!(vanished, "{netns} still routes {gone}: {:?} {}", node_routes(netns), fdb(netns));
    }
    lab.ok(&["apply", "-f", &node_file]);
    for (_, netns, _, _) in &all[..2] {
        let back = eventually(Duration::from_secs(10), || {
            node_routes(netns)
                .iter()
                .any(|r| r.starts_with(&format!("{gone_cidr} ")) && r.contains(&format!("proto {AGENT_ROUTE_PROTOCOL}")))
                && fdb(netns).contains(&vtep_mac(gone_ip))
        });
        assert!(back, "{netns} does not route {gone} again: {:?}", node_routes(netns));
    }
    assert_agent_routes(&lab);
    let id = lab.id();
    lab.ok(&["down"]);
    lab.assert_gone(&id);
}

/// Native routing, 2 nodes: every pod reaches the outside host, which sees the pod's node
/// address (masquerade); pod-to-pod traffic keeps the pod's address (the receiving agent's
/// flow record shows it).
#[test]
fn traffic_leaving_the_cluster_is_masqueraded_pod_traffic_is_not() {
    let lab = Lab::new("masq");
    lab.ok(&["up", "--nodes", "2", "-f", &lab.file("pods.yaml", &three_by_three())]);
    let world = status(&lab)["external"]["ip"].as_str().expect("world ip").to_string();
    let underlay: std::collections::BTreeMap<String, String> = nodes(&lab).into_iter().map(|(n, _, _, ip)| (n, ip)).collect();
    let on = pod_nodes(&lab);
    assert_eq!(on.len(), 9);
    for (pod, node) in &on {
        let seen = lab.ok(&[
            "exec",
            pod,
            "--",
            "timeout",
            "5",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{world}/8080; cat <&3"),
        ]);
        assert_eq!(seen.trim(), underlay[node], "{pod} on {node}: world saw {seen:?}");
    }
    let to_world = lab.probe_world(80, "TCP");
    assert_eq!(to_world.len(), 9);
    assert!(to_world.values().all(|r| r == "connected"), "pods -> world:80: {to_world:?}");

    // Pod to pod across nodes: the destination's agent sees the source pod's own address.
    let pods: serde_json::Value = serde_json::from_str(&lab.ok(&["pods", "-o", "json"])).expect("pods");
    let ip_of = |name: &str| {
        pods.as_array()
            .expect("pods")
            .iter()
            .find(|p| format!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or("")) == name)
            .and_then(|p| p["ip"].as_str())
            .expect("pod ip")
            .to_string()
    };
    let (from, to) = on
        .iter()
        .find_map(|(a, na)| on.iter().find(|(_, nb)| *nb != na).map(|(b, _)| (a.clone(), b.clone())))
        .expect("pods on two nodes");
    lab.probe(80, "TCP");
    let out = Command::new(bulkhead_e2e::binary("bulkhead"))
        .arg("observe")
        .arg("--lab-dir")
        .arg(&lab.dir)
        .args(["--from-pod", &from, "--to-pod", &to, "--direction", "ingress", "-o", "json"])
        .output()
        .expect("run bulkhead observe");
    assert!(out.status.success(), "observe: {}", String::from_utf8_lossy(&out.stderr));
    let flows = bulkhead_e2e::json_lines(&out.stdout);
    assert!(!flows.is_empty(), "no ingress flow {from} -> {to}");
    for f in &flows {
        assert_eq!(f["source"]["ip"].as_str(), Some(ip_of(&from).as_str()), "{f}");
        assert_eq!(f["destination"]["ip"].as_str(), Some(ip_of(&to).as_str()), "{f}");
    }
    let id = lab.id();
    lab.ok(&["down"]);
    lab.assert_gone(&id);
}

/// Whether a TCP connection from the node namespace `netns` to `ip:80` completes in 1 s.
fn node_connects(netns: &str, ip: &str) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "timeout",
            "1",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{ip}/80"),
        ])
        .status()
        .expect("run ip netns exec")
        .success()
}

/// Runs `nft -f -` with `rules` in `netns`.
fn nft(netns: &str, rules: &str) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run nft");
    child.stdin.take().expect("stdin").write_all(rules.as_bytes()).expect("write rules");
    assert!(child.wait().expect("nft").success(), "nft -f: {rules}");
}

/// kube-proxy marks what it masquerades for others (NodePort) with 0x4000: such traffic to
/// a default-deny pod is an unknown remote and dropped; the node's own (kubelet-like,
/// unmarked) traffic still passes.
#[test]
fn traffic_the_node_forwards_for_others_meets_ingress_policy() {
    let lab = Lab::new("nodeport");
    lab.ok(&["up", "-f", &lab.file("pods.yaml", &three_by_three())]);
    let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";
    lab.ok(&["apply", "-f", &lab.file("deny.yaml", deny)]);
    let netns = nodes(&lab)[0].1.clone();
    let pods: serde_json::Value = serde_json::from_str(&lab.ok(&["pods", "-o", "json"])).expect("pods");
    let ip = pods
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["namespace"] == "x" && p["name"] == "a")
        .and_then(|p| p["ip"].as_str())
        .expect("x/a ip")
        .to_string();
    assert!(node_connects(&netns, &ip), "the node's own traffic reaches a default-deny pod");
    // The same connection marked as kube-proxy marks NodePort traffic it masquerades.
    nft(
        &netns,
        &format!(
            "table ip bh_test_mark {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    ip daddr {ip} tcp dport 80 meta mark set 0x4000\n  }}\n}}\n"
        ),
    );
    assert!(
        !node_connects(&netns, &ip),
        "marked (forwarded, masqueraded) traffic must meet the policy"
    );
    nft(&netns, "delete table ip bh_test_mark\n");
    assert!(node_connects(&netns, &ip), "unmarked again: allowed");
    let id = lab.id();
    lab.ok(&["down"]);
    lab.assert_gone(&id);
}

/// Egress ipBlock against a real outside address, with masquerade on: a policy decides on
/// the world's own address (masquerade happens after the pod's egress is judged).
#[test]
fn egress_ip_blocks_are_enforced_against_the_outside_host() {
    let lab = Lab::new("ipblock");
    lab.ok(&["up", "-f", &lab.file("pods.yaml", &three_by_three())]);
    let world = status(&lab)["external"]["ip"].as_str().expect("world ip").to_string();
    let octets: Vec<&str> = world.split('.').collect();
    let world_24 = format!("{}.{}.{}.0/24", octets[0], octets[1], octets[2]);
    // x/a may reach only the world's /32; x/b the world's /24 except the world itself;
    // x/c 10.0.0.0/8, which holds the pods and the world alike.
    let policy = |pod: &str, to: &str| {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: egress-{pod}, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: {pod}}}}}\n  policyTypes: [Egress]\n  egress: [{{to: [{{ipBlock: {to}}}]}}]\n"
        )
    };
    let policies = [
        policy("a", &format!("{{cidr: {world}/32}}")),
        policy("b", &format!("{{cidr: {world_24}, except: [{world}/32]}}")),
        policy("c", "{cidr: 10.0.0.0/8}"),
    ]
    .concat();
    lab.ok(&["apply", "-f", &lab.file("egress.yaml", &policies)]);
    let to_world = lab.probe_world(80, "TCP");
    assert_eq!(to_world.len(), 9);
    for (from, result) in &to_world {
        let want = if from == "x/b" { "dropped" } else { "connected" };
        assert_eq!(result, want, "{from} -> world:80");
    }
    // The pods: x/a and x/b reach none (their blocks hold no pod), x/c every one.
    let pods = lab.probe(80, "TCP");
    for ((from, to), allowed) in &pods {
        let want = !matches!(from.as_str(), "x/a" | "x/b");
        assert_eq!(*allowed, want, "{from} -> {to}");
    }
    let id = lab.id();
    lab.ok(&["down"]);
    lab.assert_gone(&id);
}

/// An agent restarted (SIGKILL, as a crash or a rollout) keeps every route in place while it
/// is down and after — nothing flaps — and removes on its return the routes of a node that
/// was deleted while it was away.
#[test]
fn a_restarted_agent_keeps_its_routes_and_drops_a_node_gone_meanwhile() {
    let lab = Lab::new("rtrestart");
    lab.ok(&["up", "--nodes", "3", "-f", &lab.file("pods.yaml", &three_by_three())]);
    let all = nodes(&lab);
    let (netns, kept_cidr) = (all[0].1.clone(), all[1].2.clone());
    let (gone, gone_cidr, gone_ip) = (all[2].0.clone(), all[2].2.clone(), all[2].3.clone());
    let routes_to = |cidr: &str| {
        node_routes(&netns)
            .into_iter()
            .filter(|r| r.starts_with(&format!("{cidr} ")))
            .count()
    };
    assert_eq!((routes_to(&kept_cidr), routes_to(&gone_cidr)), (1, 1));

    // Watch node0's route to node1 all along: it must never be missing.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, netns, cidr) = (stop.clone(), netns.clone(), kept_cidr.clone());
        std::thread::spawn(move || {
            let (mut samples, mut missing) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                samples += 1;
                if !node_routes(&netns).iter().any(|r| r.starts_with(&format!("{cidr} "))) {
                    missing += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (samples, missing)
        })
    };
    let pid = status(&lab)["nodes"][0]["agentPid"].as_u64().expect("agent pid");
    let killed = Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill");
    assert!(killed.success());
    // node2 leaves while node0's agent is down: the lab records it, node0's reload fails.
    let node_file = lab.file("node.yaml", &node_yaml(&gone, &gone_cidr, &gone_ip));
    let deleted = lab.run(&["delete", "-f", &node_file]);
    assert!(!deleted.status.success(), "node0's agent is down: its reload cannot succeed");
    assert_eq!(routes_to(&gone_cidr), 1, "nobody removed node0's route while its agent was down");
    lab.ok(&["restart-agent", "--node", "node0", "--signal", "KILL"]);
    assert!(
        eventually(Duration::from_secs(10), || routes_to(&gone_cidr) == 0),
        "the restarted agent keeps the route of {gone}: {:?}",
        node_routes(&netns)
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (samples, missing) = watcher.join().expect("watcher");
    assert!(samples > 10, "the watcher ran ({samples} samples)");
    assert_eq!(missing, 0, "the route to node1 went missing in {missing} of {samples} samples");
    assert_eq!(routes_to(&kept_cidr), 1);
    // The restarted agent serves: pods on the nodes still routed connect (those on the
    // deleted node are, rightly, cut off).
    let on = pod_nodes(&lab);
    let matrix = lab.probe(80, "TCP");
    let routed: Vec<_> = matrix.iter().filter(|((f, t), _)| on[f] != gone && on[t] != gone).collect();
    assert!(!routed.is_empty());
    assert!(routed.iter().all(|(_, a)| **a), "{routed:?}");
    let id = lab.id();
    lab.ok(&["down"]);
    lab.assert_gone(&id);
}

/// The lab builds machines and an underlay, nothing more: with the agents told not to route
/// (`--routing none`) no node has any route to another node's pod CIDR, so every route the
/// other tests see is the agents' own work.
#[test]
fn the_lab_itself_installs_no_pod_route() {
    let lab = Lab::new("noroute");
    lab.ok(&[
        "up",
        "--nodes",
        "2",
        "--routing",
        "none",
        "-f",
        &lab.file("pods.yaml", &three_by_three()),
    ]);
    let all = nodes(&lab);
    for (name, netns, _, _) in &all {
        let routes = node_routes(netns);
        for (other, _, cidr, _) in all.iter().filter(|(o, ..)| o != name) {
            assert!(
                !routes.iter().any(|r| r.starts_with(&format!("{cidr} "))),
                "{netns} routes {other}'s pod CIDR though no agent routes: {routes:?}"
            );
        }
    }
    let id = lab.id();
    lab.ok(&["down"]);
    lab.assert_gone(&id);
}
