//! `bulkhead observe` end to end: flow records from the real datapath, named by the agents
//! of every lab node, and followers that never read do not hold anything up.
//!
//! Needs `cargo build` at the workspace root first; runs as root.
#![expect(clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bulkhead_e2e::{binary, flow_pod, json_lines, policy_names, three_by_three, Lab, PAIRS, X_A_FROM_B};
use serde_json::Value;

/// Runs `bulkhead observe --lab-dir DIR ARGS...`.
fn observe(lab: &Lab, args: &[&str]) -> Output {
    Command::new(binary("bulkhead"))
        .arg("observe")
        .arg("--lab-dir")
        .arg(&lab.dir)
        .args(args)
        .output()
        .expect("run bulkhead observe")
}

/// `observe ARGS -o json`, which must succeed, as one value per line.
fn flows(lab: &Lab, args: &[&str]) -> Vec<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = observe(lab, &all);
    assert!(
        out.status.success(),
        "observe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&out.stdout)
}

/// Polls `check` (flows arrive through a ring buffer and a reader task) for up to 5 s.
fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The "done when": after a default deny and an allow, `observe --verdict dropped`
/// lists every denied probe with its drop reason and the isolating policy, and each allowed
/// flow into the isolated pod names the policy that allowed it — across two nodes.
#[test]
fn dropped_flows_name_isolating_policies_and_allowed_flows_their_policy() {
    let lab = Lab::new("observe");
    lab.ok(&["up", "--nodes", "2", "-f", &lab.file("pods.yaml", &three_by_three())]);
    lab.ok(&["apply", "-f", &lab.file("policy.yaml", X_A_FROM_B)]);
    let probe = lab.probe(80, "TCP");
    assert_eq!(probe.len(), PAIRS);
    let denied: Vec<&(String, String)> = probe.iter().filter(|(_, ok)| !**ok).map(|(k, _)| k).collect();
    let allowed_into_xa: Vec<&(String, String)> = probe.iter().filter(|((_, to), ok)| **ok && to == "x/a").map(|(k, _)| k).collect();
    // x/b and x/c admit nothing (16 pairs), x/a admits only the pods labelled pod=b (5 denied).
    assert_eq!(denied.len(), 21, "{probe:?}");
    assert_eq!(allowed_into_xa.len(), 3, "{probe:?}");

    eventually("every denied probe is reported", || {
        let dropped = flows(&lab, &["--verdict", "dropped"]);
        for (from, to) in &denied {
            let hit = dropped
                .iter()
                .find(|f| flow_pod(&f["source"]) == *from && flow_pod(&f["destination"]) == *to);
            let Some(f) = hit else {
                return Err(format!("no dropped flow {from} -> {to} among {} flows", dropped.len()));
            };
            assert_eq!(f["verdict"], "DROPPED", "{f}");
            assert_eq!(f["drop_reason"], "policy_denied", "{f}");
            assert_eq!(f["direction"], "ingress", "{f}");
            assert_eq!(f["protocol"], "TCP", "{f}");
            assert_eq!(f["destination"]["port"], 80, "{f}");
            assert!(
                policy_names(&f["isolated_by"]).contains(&"x/default-deny-ingress".to_string()),
                "{from} -> {to} does not name the default deny: {f}"
            );
            assert!(f.get("allowed_by").is_none(), "{f}");
            assert!(f["node"].as_str().is_some_and(|n| n.starts_with("node")), "{f}");
        }
        // Policy dropped nothing else: every such flow is one of the denied probes.
        for f in dropped.iter().filter(|f| f["drop_reason"] == "policy_denied") {
            let pair = (flow_pod(&f["source"]), flow_pod(&f["destination"]));
            assert!(denied.contains(&&pair), "unexpected drop {f}");
        }
        Ok(())
    });

    eventually("every allowed flow into x/a names allow-b", || {
        let into_xa = flows(&lab, &["--verdict", "forwarded", "--to-pod", "x/a", "--direction", "ingress"]);
        for (from, to) in &allowed_into_xa {
            let Some(f) = into_xa.iter().find(|f| flow_pod(&f["source"]) == *from) else {
                return Err(format!("no forwarded flow {from} -> {to} among {into_xa:?}"));
            };
            let rules = f["allowed_by"].as_array().cloned().unwrap_or_default();
            assert!(
                rules
                    .iter()
                    .any(|r| r["namespace"] == "x" && r["name"] == "allow-b" && r["direction"] == "ingress"),
                "{from} -> {to} does not name allow-b: {f}"
            );
            assert!(f.get("isolated_by").is_none(), "{f}");
        }
        Ok(())
    });

    // The policy filter finds the same flows from the policy's side.
    let by_policy = flows(&lab, &["--policy", "x/allow-b", "--verdict", "forwarded"]);
    assert!(by_policy.len() >= allowed_into_xa.len(), "{by_policy:?}");
    // Each node answers for its own pods only; together they cover both nodes.
    let nodes: std::collections::BTreeSet<String> = flows(&lab, &[])
        .iter()
        .filter_map(|f| f["node"].as_str().map(str::to_string))
        .collect();
    assert_eq!(nodes.len(), 2, "flows from both nodes: {nodes:?}");
    let node0 = flows(&lab, &["--node", "node0"]);
    assert!(node0.iter().all(|f| f["node"] == "node0"));
    // --last counts across nodes, oldest first.
    let last = flows(&lab, &["--last", "3"]);
    assert_eq!(last.len(), 3);
    assert!(last.windows(2).all(|w| w[0]["time"].as_str() <= w[1]["time"].as_str()), "{last:?}");
    // The table has a header and one line per flow.
    let table = observe(&lab, &["--verdict", "dropped", "--to-pod", "x/b"]);
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("TIME"), "{text}");
    assert!(text.contains("policy_denied; isolated by x/default-deny-ingress"), "{text}");
}

/// Filters naming an unknown verdict, reason or a malformed pod fail before any agent is
/// asked, with a message naming the bad value.
#[test]
fn bad_filters_are_refused_clearly() {
    let lab = Lab::new("observebad");
    let cases: [(&[&str], &str); 5] = [
        (&["--verdict", "maybe"], "maybe"),
        (&["--drop-reason", "cosmic_rays"], "policy_denied"),
        (&["--pod", "just-a-name"], "NAMESPACE/NAME"),
        (&["--to-pod", "x/a/b"], "NAMESPACE/NAME"),
        (&["--node", "node9"], "node9"),
    ];
    for (args, needle) in cases {
        let out = observe(&lab, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr.contains(needle), "{args:?}: error does not name {needle:?}: {stderr}");
    }
}

/// Followers that connect and never read do not slow the datapath, the agent or other
/// clients: probes, status and a second observe still answer promptly while flows pour in.
#[test]
fn stalled_followers_do_not_block_the_agent() {
    let lab = Lab::new("observestall");
    lab.ok(&["up", "-f", &lab.file("pods.yaml", &three_by_three())]);
    lab.ok(&["apply", "-f", &lab.file("policy.yaml", X_A_FROM_B)]);
    let socket = lab.dir.join("nodes").join("node0").join("agent.sock");
    let stalled: Vec<UnixStream> = (0..3)
        .map(|_| {
            let mut s = UnixStream::connect(&socket).expect("connect agent");
            s.write_all(b"{\"op\":\"observe\",\"follow\":true}\n").expect("send observe");
            s
        })
        .collect();
    let mut slowest = Duration::ZERO;
    // About 10 × 2 × 72 flow records, far more than the sockets buffer.
    for round in 0..10 {
        let started = Instant::now();
        let probe = lab.probe(if round % 2 == 0 { 80 } else { 81 }, "TCP");
        slowest = slowest.max(started.elapsed());
        assert_eq!(probe.len(), PAIRS);
        assert!(!probe[&("y/a".to_string(), "x/b".to_string())], "policy still enforced");
    }
    assert!(slowest < Duration::from_secs(10), "a probe round took {slowest:?}");
    let started = Instant::now();
    lab.ok(&["status"]);
    let recent = flows(&lab, &["--last", "5"]);
    assert_eq!(recent.len(), 5);
    lab.ok(&["apply", "-f", &lab.file("policy.yaml", X_A_FROM_B)]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "agent slow with stalled followers: {:?}",
        started.elapsed()
    );
    let counts: BTreeMap<String, usize> = flows(&lab, &[]).iter().fold(BTreeMap::new(), |mut m, f| {
        *m.entry(f["verdict"].as_str().unwrap_or("?").to_string()).or_default() += 1;
        m
    });
    assert!(counts.get("FORWARDED").copied().unwrap_or(0) > 500, "flows kept coming: {counts:?}");
    drop(stalled);
}
