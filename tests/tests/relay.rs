//! `bulkhead relay` end to end: a 3-node lab whose agents serve their flow streams to the
//! lab's relay; `observe --relay` shows every node's flows in time order, and killing an
//! agent or the relay loses no record an agent still held, duplicates none, and a real
//! gap (the relay down while an agent's history moved on) is reported with its size.
//!
//! Needs `cargo build` at the workspace root first; runs as root.
#![expect(clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bulkhead_e2e::{binary, json_lines, three_by_three, Lab, PAIRS};
use serde_json::Value;

/// Each agent keeps this many flows, so a relay that is away for one probe round misses some.
const HISTORY: usize = 64;

fn bulkhead(lab: &Lab, args: &[&str]) -> Output {
    Command::new(binary("bulkhead"))
        .args(args)
        .env("BULKHEAD_LAB_DIR", &lab.dir)
        .output()
        .expect("run bulkhead")
}

fn ok(lab: &Lab, args: &[&str]) -> String {
    let out = bulkhead(lab, args);
    assert!(
        out.status.success(),
        "bulkhead {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `observe --relay -o json`: (flows, gaps).
fn relay_lines(lab: &Lab) -> (Vec<Value>, Vec<Value>) {
    let out = bulkhead(lab, &["observe", "--relay", "-o", "json"]);
    assert!(out.status.success(), "observe --relay: {}", String::from_utf8_lossy(&out.stderr));
    json_lines(&out.stdout).into_iter().partition(|v| v.get("gap").is_none())
}

/// What names one record: its node, time, 5-tuple and direction.
fn key(f: &Value) -> String {
    format!(
        "{} {} {}:{}>{}:{} {} {}",
        f["node"],
        f["time"],
        f["source"]["ip"],
        f["source"]["port"],
        f["destination"]["ip"],
        f["destination"]["port"],
        f["protocol"],
        f["direction"]
    )
}

fn status(lab: &Lab) -> BTreeMap<String, Value> {
    let v: Value = serde_json::from_str(&ok(lab, &["relay", "status", "-o", "json"])).expect("status json");
    v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| (n["node"].as_str().expect("node").to_string(), n.clone()))
        .collect()
}

fn last_seq(n: &Value) -> u64 {
    n["cursor"]["seq"].as_u64().unwrap_or(0)
}

/// Polls until the relay is connected to every node and has caught up with what the
/// agents hold (every record the agents serve is in the relay), for up to 15 s.
fn caught_up(lab: &Lab) -> (Vec<Value>, Vec<Value>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = status(lab);
        let connected = s.len() == 3 && s.values().all(|n| n["connected"] == true);
        let held: BTreeSet<String> = json_lines(&bulkhead(lab, &["observe", "-o", "json"]).stdout)
            .iter()
            .map(key)
            .collect();
        let (flows, gaps) = relay_lines(lab);
        let relayed: BTreeSet<String> = flows.iter().map(key).collect();
        let missing: Vec<&String> = held.difference(&relayed).collect();
        if connected && missing.is_empty() {
            return (flows, gaps);
        }
        assert!(
            Instant::now() < deadline,
            "relay did not catch up: connected {connected}, {} held records missing, e.g. {:?}; status {s:?}",
            missing.len(),
            missing.first()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Every gap the relay counted is shown, with its size, per node (never silent).
fn assert_gaps_shown(lab: &Lab) -> u64 {
    let (_, gaps) = relay_lines(lab);
    let mut total = 0;
    for (node, n) in status(lab) {
        let mine: Vec<&Value> = gaps.iter().filter(|g| g["gap"]["node"] == node.as_str()).collect();
        let shown: u64 = mine.iter().map(|g| g["gap"]["missing"].as_u64().unwrap_or(0)).sum();
        assert_eq!(Some(shown), n["missing"].as_u64(), "{node}: {gaps:?} {n}");
        assert_eq!(Some(mine.len() as u64), n["gaps"].as_u64(), "{node}: {gaps:?} {n}");
        total += shown;
    }
    total
}

/// No record twice, and in time order.
fn assert_merged(flows: &[Value]) {
    let mut seen = BTreeSet::new();
    for f in flows {
        assert!(seen.insert(key(f)), "duplicate record {f}");
    }
    let times: Vec<&str> = flows.iter().map(|f| f["time"].as_str().expect("time")).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "not in time order");
}

fn relay_pid(lab: &Lab) -> i32 {
    let state: Value = serde_json::from_slice(&std::fs::read(lab.dir.join("lab.json")).expect("lab.json")).expect("lab json");
    i32::try_from(state["relayPid"].as_u64().expect("relay pid")).expect("pid")
}

#[test]
fn relay_merges_every_node_and_survives_agent_and_relay_kills_with_exact_gaps() {
    let started = Instant::now();
    let mut lab = Lab::new("relay");
    lab.env.push(("BULKHEAD_FLOW_HISTORY".into(), PathBuf::from(HISTORY.to_string())));
    lab.ok(&["up", "--nodes", "3", "-f", &lab.file("pods.yaml", &three_by_three())]);
    assert_eq!(lab.probe(80, "TCP").len(), PAIRS);

    // Every node's flows, merged in time order, none twice.
    let (flows, gaps) = caught_up(&lab);
    let nodes: BTreeSet<&str> = flows.iter().filter_map(|f| f["node"].as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["node0", "node1", "node2"]), "flows from every node");
    assert_merged(&flows);
    // A burst larger than an agent's tiny history can outrun the relay: that is a gap too,
    // and it is shown with its size.
    let early = assert_gaps_shown(&lab);
    eprintln!("first probe round: {early} records missed ({gaps:?})");
    // Every observe filter works through the relay (the agents' own filter code).
    let one: Vec<Value> = json_lines(
        &bulkhead(
            &lab,
            &["observe", "--relay", "--node", "node1", "--direction", "ingress", "-o", "json"],
        )
        .stdout,
    );
    // Gaps are shown in place whatever the filters; every flow matches them.
    let one: Vec<Value> = one.into_iter().filter(|v| v.get("gap").is_none()).collect();
    assert!(!one.is_empty() && one.iter().all(|f| f["node"] == "node1" && f["direction"] == "ingress"));
    let last = json_lines(&bulkhead(&lab, &["observe", "--relay", "--last", "3", "--to-pod", "x/a", "-o", "json"]).stdout);
    let last: Vec<Value> = last.into_iter().filter(|v| v.get("gap").is_none()).collect();
    assert!(
        last.len() == 3
            && last
                .iter()
                .all(|f| f["destination"]["pod"] == "a" && f["destination"]["namespace"] == "x"),
        "{last:?}"
    );

    // An agent killed (SIGKILL) while traffic flows: its successor continues the node's
    // sequence; nothing it or the ring buffer held is lost, nothing arrives twice.
    let before = status(&lab);
    let probing = {
        let dir = lab.dir.clone();
        std::thread::spawn(move || {
            Command::new(binary("bulkhead"))
                .args(["lab", "--lab-dir"])
                .arg(&dir)
                .args(["probe", "--port", "81", "-o", "json"])
                .output()
                .expect("probe")
        })
    };
    lab.ok(&["restart-agent", "--node", "node1", "--signal", "KILL"]);
    assert!(probing.join().expect("probe thread").status.success());
    let (flows, _) = caught_up(&lab);
    assert_merged(&flows);
    let after = status(&lab);
    // Records the killed agent had numbered but not yet sent died with it: they are a
    // gap, counted and shown with its size, never silent.
    let shown = assert_gaps_shown(&lab);
    eprintln!("agent kill mid-traffic: {} records missed", shown - early);
    assert_eq!(after["node1"]["resets"], 0, "a restarted agent keeps its epoch: {after:?}");
    assert_eq!(after["node1"]["cursor"]["epoch"], before["node1"]["cursor"]["epoch"]);

    // The relay killed (SIGKILL) while idle: it resumes from its file, no duplicates.
    let count = flows.len();
    let dup_before: u64 = after.values().map(|n| n["duplicates"].as_u64().unwrap_or(0)).sum();
    lab.ok(&["restart-relay", "--signal", "KILL"]);
    let (flows, _) = caught_up(&lab);
    assert_eq!(flows.len(), count, "the restarted relay has the same records");
    assert_merged(&flows);
    let resumed = status(&lab);
    let dup_after: u64 = resumed.values().map(|n| n["duplicates"].as_u64().unwrap_or(0)).sum();
    assert_eq!(dup_after, 0, "resumed exactly after its cursor (was {dup_before} before)");

    // A real gap: the relay is away while every node makes more records than its agent
    // keeps. Each node's gap is exactly what it made minus what its agent still holds.
    let away = status(&lab);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(relay_pid(&lab)), nix::sys::signal::Signal::SIGKILL).expect("kill relay");
    for _ in 0..2 {
        assert_eq!(lab.probe(80, "TCP").len(), PAIRS);
    }
    lab.ok(&["restart-relay"]);
    let (flows, gaps) = caught_up(&lab);
    assert_merged(&flows);
    let back = status(&lab);
    for (node, n) in &back {
        let made = last_seq(n) - last_seq(&away[node]);
        let want = made.saturating_sub(HISTORY as u64);
        let missing = n["missing"].as_u64().unwrap_or(0) - away[node]["missing"].as_u64().unwrap_or(0);
        assert_eq!(missing, want, "{node}: made {made} while the relay was away: {n}");
        let shown: u64 = gaps
            .iter()
            .filter(|g| g["gap"]["node"] == node.as_str() && g["gap"]["from"].as_u64() > Some(last_seq(&away[node])))
            .map(|g| g["gap"]["missing"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(shown, want, "{node}: the gap is shown with its size: {gaps:?}");
        if want > 0 {
            assert_eq!(
                n["gaps"].as_u64(),
                away[node]["gaps"].as_u64().map(|g| g + 1),
                "{node}: one gap: {n}"
            );
        }
    }
    assert!(
        back.iter().any(|(node, n)| n["missing"].as_u64() > away[node]["missing"].as_u64()),
        "the test made a real gap: {back:?}"
    );
    assert_gaps_shown(&lab);
    // The table shows it too.
    let table = ok(&lab, &["observe", "--relay"]);
    assert!(table.contains("GAP:") && table.contains("records never received"), "{table}");
    eprintln!("relay e2e took {:?}", started.elapsed());
}

/// The agent's flow port refuses a client without the token and sends it nothing else.
#[test]
fn the_flow_port_refuses_readers_without_the_token() {
    use std::io::{BufRead, BufReader, Write};
    let lab = Lab::new("relayauth");
    lab.ok(&["up", "-f", &lab.file("pods.yaml", &three_by_three())]);
    assert_eq!(lab.probe(80, "TCP").len(), PAIRS);
    let state: Value = serde_json::from_slice(&std::fs::read(lab.dir.join("lab.json")).expect("lab.json")).expect("lab json");
    let node = &state["nodes"][0];
    let addr = node["flowAddress"].as_str().expect("flow address").to_string();
    let netns = node["netns"].as_str().expect("netns").to_string();
    // From inside the node namespace (where the port is), as a pod or a stranger would.
    let hello = "{\"token\":\"guess\"}";
    let out = Command::new("ip")
        .args(["netns", "exec", &netns, "timeout", "5", "bash", "-c"])
        .arg(format!(
            "exec 3<>/dev/tcp/{}/{}; echo '{hello}' >&3; cat <&3",
            addr.split(':').next().expect("ip"),
            addr.split(':').nth(1).expect("port")
        ))
        .output()
        .expect("connect");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "only the refusal: {text}");
    assert!(lines[0].contains("unauthorized") && lines[0].contains("106"), "{text}");
    // The lab's token works (the relay's view proves it); an observe client on the relay's
    // Unix socket needs none.
    let mut s = std::os::unix::net::UnixStream::connect(lab.dir.join("relay").join("relay.sock")).expect("relay socket");
    s.write_all(b"{\"op\":\"relay_status\"}\n").expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read");
    assert!(line.contains("\"connected\":true"), "{line}");
}
