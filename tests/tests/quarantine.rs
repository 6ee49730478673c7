//! Quarantine end to end in a two-node lab: `bulkhead quarantine` cuts an established TCP
//! session at once, new connections both ways fail, the pod's own node still reaches it, the
//! drops are counted as `quarantined`, `--release` gives policy back its say; the label
//! `bulkhead.io/quarantine: "true"` does the same through the model.
//! Needs `cargo build` at the workspace root first; runs as root.
#![expect(clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bulkhead_e2e::{binary, echo_server, json_lines, Lab};
use nix::sched::{setns, CloneFlags};

const PORT: u16 = 9300;

/// x/a on node0; x/b and x/c on node1; every pod serves TCP 80. b is labelled
/// quarantined when `label`.
fn pod(name: &str, node: &str, label: bool) -> String {
    let extra = if label { ", bulkhead.io/quarantine: \"true\"" } else { "" };
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{pod: {name}{extra}}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: agnhost\n    ports:\n    - {{containerPort: 80, protocol: TCP}}\n"
    )
}

/// b admits only a (any port): what policy alone decides once b is released.
const POLICY: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-from-a, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: a}}}]\n";

fn model() -> String {
    format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}{}{POLICY}",
        pod("a", "node0", false),
        pod("b", "node1", false),
        pod("c", "node1", false)
    )
}

fn pod_ip(lab: &Lab, name: &str) -> Ipv4Addr {
    let pods: serde_json::Value = serde_json::from_str(&lab.ok(&["pods", "-o", "json"])).expect("pods json");
    pods.as_array()
        .expect("array")
        .iter()
        .find(|p| p["namespace"] == "x" && p["name"] == name)
        .and_then(|p| p["ip"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("x/{name} has no ip"))
}

fn enter(netns: &str) {
    let file = std::fs::File::open(format!("/run/netns/{netns}")).unwrap_or_else(|e| panic!("netns {netns}: {e}"));
    setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Sets the flag when dropped: stops the threads of a scope even when its body panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What [`hold_echo_connection`] saw.
#[derive(Default)]
struct EchoSession {
    round_trips: AtomicU64,
    /// Why the connection broke, if it did.
    broken: Mutex<Option<String>>,
}

/// From `netns`, one TCP connection to `target`, a byte every 50 ms that must come back
/// within a second, until `stop` or the first failure.
fn hold_echo_connection(netns: &str, target: SocketAddr, stop: &AtomicBool, session: &EchoSession) {
    enter(netns);
    let fail = |why: String| {
        session.broken.lock().expect("lock").get_or_insert(why);
    };
    let mut stream = match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return fail(format!("connect: {e}")),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut n = 0u8;
    while !stop.load(Ordering::SeqCst) {
        n = n.wrapping_add(1);
        let mut back = [0u8; 1];
        if let Err(e) = stream.write_all(&[n]).and_then(|()| stream.read_exact(&mut back)) {
            return fail(format!("after {} round trips: {e}", session.round_trips.load(Ordering::SeqCst)));
        }
        session.round_trips.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a new TCP connection from `netns` to `target` completes within a second.
fn connects(netns: &str, target: SocketAddr) -> bool {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        enter(&netns);
        TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok()
    })
    .join()
    .expect("connect thread")
}

/// Waits up to 10 s for `connects(netns, target)` to be `want` (the agents pick manifest
/// changes up on their own).
fn settles(netns: &str, target: SocketAddr, want: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if connects(netns, target) == want {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `bulkhead quarantine ARGS --lab-dir DIR -o json`: exit status and the parsed report.
fn quarantine(lab: &Lab, args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new(binary("bulkhead"))
        .arg("quarantine")
        .args(args)
        .arg("--lab-dir")
        .arg(&lab.dir)
        .args(["-o", "json"])
        .output()
        .expect("run bulkhead quarantine");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), report, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Flow records dropped as `quarantined`, from every node's agent.
fn quarantined_drops(lab: &Lab) -> Vec<serde_json::Value> {
    let out = Command::new(binary("bulkhead"))
        .arg("observe")
        .arg("--lab-dir")
        .arg(&lab.dir)
        .args(["--drop-reason", "quarantined", "-o", "json"])
        .output()
        .expect("run bulkhead observe");
    assert!(out.status.success(), "observe: {}", String::from_utf8_lossy(&out.stderr));
    json_lines(&out.stdout)
}

/// Whether a TCP connection from the node namespace `netns` to `ip:80` completes.
fn node_connects(netns: &str, ip: Ipv4Addr) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "timeout",
            "3",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{ip}/80"),
        ])
        .status()
        .expect("ip netns exec")
        .success()
}

#[test]
fn quarantine_cuts_a_session_at_once_both_ways_spares_the_node_and_release_restores_policy() {
    let lab = Lab::new("quarantine");
    lab.ok(&["up", "--nodes", "2", "-f", &lab.file("model.yaml", &model())]);
    let id = lab.id();
    let ns = |pod: &str| format!("bh{id}-x-{pod}");
    let (a, b, c) = (pod_ip(&lab, "a"), pod_ip(&lab, "b"), pod_ip(&lab, "c"));
    let echo = SocketAddr::from((b, PORT));
    let stop = AtomicBool::new(false);
    let ready = AtomicBool::new(false);
    let session = EchoSession::default();
    let (round_trips, broken) = (&session.round_trips, &session.broken);
    let (server_ns, client_ns) = (ns("b"), ns("a"));
    std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        scope.spawn(|| echo_server(&server_ns, PORT, &stop, &ready));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "echo server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        scope.spawn(|| hold_echo_connection(&client_ns, echo, &stop, &session));
        let deadline = Instant::now() + Duration::from_secs(10);
        while round_trips.load(Ordering::SeqCst) < 5 {
            assert!(broken.lock().expect("lock").is_none(), "session broke early: {broken:?}");
            assert!(Instant::now() < deadline, "no round trips");
            std::thread::sleep(Duration::from_millis(20));
        }

        let (ok, report, stderr) = quarantine(&lab, &["x/b", "--reason", "e2e"]);
        let at_return = round_trips.load(Ordering::SeqCst);
        assert!(ok, "quarantine failed: {report} {stderr}");
        let nodes = report["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), 2, "every lab node's agent was asked: {report}");
        assert!(nodes.iter().all(|n| n["ok"] == true), "{report}");
        // The next send gets nothing through: the session breaks, at most the round trip
        // already under way when the command returned completes.
        let deadline = Instant::now() + Duration::from_secs(5);
        while broken.lock().expect("lock").is_none() {
            assert!(Instant::now() < deadline, "the session survived the quarantine");
            std::thread::sleep(Duration::from_millis(20));
        }
        let after = round_trips.load(Ordering::SeqCst);
        assert!(
            after <= at_return + 1,
            "{} round trips after the command returned",
            after - at_return
        );
        stop.store(true, Ordering::SeqCst);
    });

    // New connections fail both ways, from b's node mate and from the other node.
    assert!(!connects(&ns("a"), SocketAddr::from((b, 80))), "a reached b");
    assert!(!connects(&ns("b"), SocketAddr::from((a, 80))), "b reached a");
    assert!(!connects(&ns("c"), SocketAddr::from((b, 80))), "c reached b");
    assert!(!connects(&ns("b"), SocketAddr::from((c, 80))), "b reached c");
    assert!(connects(&ns("a"), SocketAddr::from((c, 80))), "a and c are not quarantined");
    // b's own node still reaches it; the other node is an ordinary remote.
    assert!(node_connects(&format!("bh{id}-node1"), b), "b's node cannot reach it");
    assert!(!node_connects(&format!("bh{id}-node0"), b), "another node reached b");
    // Counted as `quarantined` on both nodes: b's own, and a's dropping its traffic to b.
    let drops = quarantined_drops(&lab);
    let nodes: std::collections::BTreeSet<&str> = drops.iter().filter_map(|f| f["node"].as_str()).collect();
    assert!(
        nodes.contains("node0") && nodes.contains("node1"),
        "quarantined drops by node: {nodes:?}"
    );

    // Released: policy alone decides (b admits a, not c).
    let (ok, report, stderr) = quarantine(&lab, &["x/b", "--release"]);
    assert!(ok, "release failed: {report} {stderr}");
    assert!(connects(&ns("a"), SocketAddr::from((b, 80))), "a cannot reach b after the release");
    assert!(!connects(&ns("c"), SocketAddr::from((b, 80))), "policy lets c reach b");
    assert!(connects(&ns("b"), SocketAddr::from((c, 80))), "b cannot reach c after the release");

    // The label path: relabelling b quarantines it, unlabelling releases it.
    lab.ok(&["apply", "-f", &lab.file("b-label.yaml", &pod("b", "node1", true))]);
    assert!(
        settles(&ns("a"), SocketAddr::from((b, 80)), false),
        "the label did not quarantine b"
    );
    assert!(!connects(&ns("b"), SocketAddr::from((c, 80))), "a labelled b reached c");
    assert!(node_connects(&format!("bh{id}-node1"), b), "b's node cannot reach the labelled b");
    // A release by command does not lift a label's quarantine, and says so.
    let (ok, _, stderr) = quarantine(&lab, &["x/b", "--release"]);
    assert!(!ok && stderr.contains("bulkhead.io/quarantine"), "{stderr}");
    assert!(!connects(&ns("a"), SocketAddr::from((b, 80))), "a reached the labelled b");
    lab.ok(&["apply", "-f", &lab.file("b-unlabel.yaml", &pod("b", "node1", false))]);
    assert!(
        settles(&ns("a"), SocketAddr::from((b, 80)), true),
        "removing the label did not release b"
    );
}

#[test]
fn a_bad_pod_name_is_refused_before_any_agent_is_asked() {
    let out = Command::new(binary("bulkhead"))
        .args(["quarantine", "just-a-name", "--lab-dir", "/nonexistent"])
        .output()
        .expect("run bulkhead quarantine");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NAMESPACE/NAME"), "{stderr}");
}
