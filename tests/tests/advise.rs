//! `bulkhead advise` end to end on the shop `bulkhead lab traffic` makes: the proposed
//! policies, applied, let all of the shop's traffic through — on a new run, after scaling and
//! restarts gave its pods new addresses — and deny every pod pair and port that was not
//! observed (a full probe matrix); in audit mode, normal traffic is never reported and
//! exactly the injected unobserved connections are. Bad input exits 1 with a clear message.
//!
//! Needs `cargo build` at the workspace root first; runs as root.
#![expect(clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bulkhead_e2e::{binary, json_lines, Lab};
use serde_json::Value;

/// Runs `bulkhead ARGS...` (not `lab`).
fn bulkhead(args: &[&str]) -> Output {
    Command::new(binary("bulkhead")).args(args).output().expect("run bulkhead")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Exits 1 with `needle` in its message.
fn fails_with(out: Output, needle: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: exit {:?}, stderr {stderr}", out.status);
    assert!(stderr.contains(needle), "{what}: {needle:?} not in {stderr}");
    assert!(out.stdout.is_empty(), "{what}: printed {}", String::from_utf8_lossy(&out.stdout));
}

fn now() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // RFC 3339 by hand: the tests crate has no time library; whole seconds, one back.
    let t = t.saturating_sub(1);
    let (days, rest) = (t / 86_400, t % 86_400);
    let (y, m, d) = civil(i64::try_from(days).expect("days"));
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's civil_from_days).
fn civil(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `lab traffic run ARGS -o json`, whose every call must have been answered.
fn traffic_run(lab: &Lab, args: &[&str]) -> Value {
    let mut all = vec!["traffic", "run"];
    all.extend(args);
    all.extend(["-o", "json"]);
    let summary: Value = serde_json::from_str(&lab.ok(&all)).expect("traffic summary json");
    assert_eq!(summary["failed"], 0, "calls failed: {:#}", summary["failures"]);
    assert!(summary["ok"].as_u64().expect("ok") > 0, "{summary:#}");
    summary
}

/// (from workload, to workload or `world`, port, protocol) of every edge that was answered.
type Edge = (String, String, u16, String);

fn edges(summary: &Value) -> BTreeSet<Edge> {
    summary["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .filter(|e| e["ok"].as_u64().unwrap_or(0) > 0)
        .map(|e| {
            (
                e["from"].as_str().expect("from").to_string(),
                e["to"].as_str().expect("to").to_string(),
                u16::try_from(e["port"].as_u64().expect("port")).expect("port"),
                e["protocol"].as_str().expect("protocol").to_string(),
            )
        })
        .collect()
}

/// `ns/pod` → its workload, from the summary's workloads.
fn workloads(summary: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for w in summary["workloads"].as_array().expect("workloads") {
        for p in w["pods"].as_array().expect("pods") {
            out.insert(
                p.as_str().expect("pod").to_string(),
                w["workload"].as_str().expect("workload").to_string(),
            );
        }
    }
    out
}

/// A flow end: `ns/pod`, or its address.
fn end(peer: &Value) -> String {
    match (peer["namespace"].as_str(), peer["pod"].as_str()) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => peer["ip"].as_str().unwrap_or("?").to_string(),
    }
}

fn observe(lab: &Lab, args: &[&str]) -> Vec<Value> {
    let dir = lab.dir.display().to_string();
    let mut all = vec!["observe", "--lab-dir", &dir, "-o", "json"];
    all.extend(args);
    json_lines(ok(bulkhead(&all), "observe").as_bytes())
}

#[test]
fn advised_policies_admit_the_shop_deny_the_rest_and_audit_round_trips() {
    let started = Instant::now();
    let lab = Lab::new("advise");
    let dir = lab.dir.display().to_string();
    let shop = ok(bulkhead(&["lab", "traffic", "manifests", "--seed", "1"]), "traffic manifests");
    lab.ok(&["up", "--nodes", "2", "-f", &lab.file("shop.yaml", &shop)]);
    let world_ip = lab.status()["external"]["ip"].as_str().expect("world ip").to_string();

    // Nothing has talked yet: nothing to learn.
    fails_with(
        bulkhead(&["advise", "--lab-dir", &dir]),
        "no observed traffic",
        "advise before any traffic",
    );

    // Run 1: learn.
    let t0 = now();
    let run1 = traffic_run(&lab, &["--seed", "1", "--duration", "10s", "--churn-every", "4s"]);
    let observed = edges(&run1);
    assert_eq!(observed.len(), 10, "every edge of the shop exercised: {observed:?}");
    assert!(observed.contains(&("shop-api/orders".into(), "world".into(), 80, "TCP".into())));
    let advised = ok(bulkhead(&["advise", "--lab-dir", &dir, "--since", &t0]), "advise");
    let flows = ok(bulkhead(&["observe", "--lab-dir", &dir, "--since", &t0, "-o", "json"]), "observe");
    let flow_file = lab.file("flows.jsonl", &flows);
    let from_file = ok(bulkhead(&["advise", "--flows", &flow_file]), "advise --flows");
    assert_eq!(advised, from_file, "the agents and their saved flows give the same advice");
    // The lab's relay holds the same flows, merged (after its merge delay).
    std::thread::sleep(std::time::Duration::from_millis(700));
    let from_relay = ok(
        bulkhead(&["advise", "--lab-dir", &dir, "--relay", "--since", &t0]),
        "advise --relay",
    );
    assert_eq!(advised, from_relay, "the relay's history gives the same advice");
    // One policy per workload, by workload labels; never a pod name or address.
    assert_eq!(advised.matches("kind: NetworkPolicy").count(), 7, "{advised}");
    for pod in workloads(&run1).keys() {
        let name = pod.split('/').nth(1).expect("name");
        assert!(!advised.contains(name), "{name} in\n{advised}");
    }
    assert!(!advised.contains("pod-template-hash"), "{advised}");
    assert!(advised.contains(&format!("cidr: {}", cidr24(&world_ip))), "{advised}");
    assert!(advised.contains("(DNS)") && advised.contains("connections"), "{advised}");
    let table = ok(
        bulkhead(&["advise", "--flows", &flow_file, "-o", "table", "-n", "shop-api"]),
        "advise -o table",
    );
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert!(rows.iter().any(|r| r.starts_with("shop-api/catalog ")), "{table}");
    assert!(
        rows.iter().all(|r| r.starts_with("shop-api/")),
        "-n shop-api: only its workloads' rules: {table}"
    );

    // Enforce, then a new run with new replicas: nothing fails, nothing is dropped.
    lab.ok(&["apply", "-f", &lab.file("advised.yaml", &advised)]);
    let t1 = now();
    let run2 = traffic_run(&lab, &["--seed", "2", "--duration", "10s", "--churn-every", "3s"]);
    let added: Vec<Value> = run2["events"]
        .as_array()
        .expect("events")
        .iter()
        .flat_map(|e| e["added"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(!added.is_empty(), "no new replica in run 2: {:#}", run2["events"]);
    assert!(edges(&run2).is_subset(&observed), "run 2 did something new: {:?}", edges(&run2));
    std::thread::sleep(Duration::from_secs(1));
    let new_pods: BTreeSet<String> = added
        .iter()
        .filter_map(|a| a.as_str()?.split_whitespace().next().map(str::to_string))
        .collect();
    let since_t1 = observe(&lab, &["--since", &t1]);
    assert!(
        since_t1
            .iter()
            .any(|f| new_pods.contains(&end(&f["source"])) || new_pods.contains(&end(&f["destination"]))),
        "no traffic of the new replicas {new_pods:?}"
    );
    let drops: Vec<&Value> = since_t1.iter().filter(|f| f["verdict"] == "DROPPED").collect();
    assert!(drops.is_empty(), "{} drops under the advised policies: {drops:#?}", drops.len());

    // The full probe matrix: exactly the observed (workload, workload, port) connect.
    let wl = workloads(&run2);
    assert_eq!(wl.len(), lab.pod_names().len(), "every lab pod is a shop pod");
    let mut allowed = 0;
    let mut denied = 0;
    for (port, proto) in [(8080, "TCP"), (9090, "TCP"), (5432, "TCP"), (6379, "TCP"), (53, "TCP"), (53, "UDP")] {
        for ((from, to), result) in lab.probe_outcomes(port, proto) {
            let edge = (wl[&from].clone(), wl[&to].clone(), port, proto.to_string());
            let want = if observed.contains(&edge) { "connected" } else { "dropped" };
            assert_eq!(result, want, "{from} -> {to} {port}/{proto} ({} -> {})", edge.0, edge.1);
            if want == "connected" {
                allowed += 1;
            } else {
                denied += 1;
            }
        }
    }
    for (port, proto) in [(80, "TCP"), (81, "TCP"), (80, "UDP")] {
        for (from, result) in lab.probe_world(port, proto) {
            let edge = (wl[&from].clone(), "world".to_string(), port, proto.to_string());
            let want = if observed.contains(&edge) { "connected" } else { "dropped" };
            assert_eq!(result, want, "{from} -> world {port}/{proto}");
            if want == "connected" {
                allowed += 1;
            } else {
                denied += 1;
            }
        }
    }
    eprintln!("probe matrix: {allowed} allowed, {denied} denied, {} pods", wl.len());
    assert!(allowed >= 10 && denied > 500, "{allowed} allowed, {denied} denied");

    // Audit round trip: the same advice in audit mode (re-applied in place).
    let audit = ok(bulkhead(&["advise", "--flows", &flow_file, "--audit"]), "advise --audit");
    assert_eq!(
        audit.matches("bulkhead.io/audit").count(),
        7 * 2,
        "annotation and its comment: {audit}"
    );
    lab.ok(&["apply", "-f", &lab.file("audit.yaml", &audit)]);
    let t2 = now();
    lab.ok(&["traffic", "start", "--seed", "3", "--churn-every", "3s"]);
    let status: Value = serde_json::from_str(&lab.ok(&["traffic", "status", "-o", "json"])).expect("status json");
    assert_eq!(status["running"], true, "{status:#}");
    std::thread::sleep(Duration::from_secs(6));
    let run3: Value = serde_json::from_str(&lab.ok(&["traffic", "stop", "-o", "json"])).expect("stop json");
    assert_eq!(
        (run3["running"].as_bool(), run3["failed"].as_u64()),
        (Some(false), Some(0)),
        "{run3:#}"
    );
    assert!(run3["ok"].as_u64().expect("ok") > 0, "{run3:#}");
    std::thread::sleep(Duration::from_secs(1));
    let noise = observe(&lab, &["--since", &t2, "--verdict", "audit"]);
    assert!(noise.is_empty(), "normal traffic reported as AUDIT: {noise:#?}");

    // Inject unobserved connections: every pair on 6379, every pod to the outside host on 81.
    let t3 = now();
    let wl = workloads(&run3);
    let mut injected: BTreeSet<(String, String, u64)> = BTreeSet::new();
    for ((from, to), result) in lab.probe_outcomes(6379, "TCP") {
        assert_ne!(result, "dropped", "{from} -> {to} dropped in audit mode");
        if !observed.contains(&(wl[&from].clone(), wl[&to].clone(), 6379, "TCP".into())) {
            injected.insert((from, to, 6379));
        }
    }
    for (from, result) in lab.probe_world(81, "TCP") {
        assert_eq!(result, "connected", "{from} -> world:81 in audit mode");
        injected.insert((from, world_ip.clone(), 81));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let flows = observe(&lab, &["--since", &t3, "--verdict", "audit"]);
        let seen: BTreeSet<(String, String, u64)> = flows
            .iter()
            .map(|f| {
                (
                    end(&f["source"]),
                    end(&f["destination"]),
                    f["destination"]["port"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let extra: Vec<_> = seen.difference(&injected).collect();
        assert!(extra.is_empty(), "AUDIT flows for observed traffic: {extra:?}");
        if seen == injected {
            eprintln!("audit: {} injected connections, all reported, nothing else", injected.len());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "injected connections not reported: {:?}",
            injected.difference(&seen).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("advise e2e took {:?}", started.elapsed());
}

/// `a.b.c.d` → `a.b.c.0/24`.
fn cidr24(ip: &str) -> String {
    let parts: Vec<&str> = ip.split('.').collect();
    format!("{}.{}.{}.0/24", parts[0], parts[1], parts[2])
}

/// Bad input: a missing, empty or malformed flow file, and an unknown namespace.
#[test]
fn bad_input_exits_1_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("bulkhead-e2e-advise-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    let flow = r#"{"time":"2026-11-28T12:50:08.123456789Z","node":"node0","verdict":"FORWARDED","direction":"egress","protocol":"TCP","source":{"namespace":"x","pod":"a-1","labels":{"app":"a"},"ip":"10.244.0.5","port":40000,"identity":257},"destination":{"namespace":"y","pod":"b-1","labels":{"app":"b"},"ip":"10.244.0.6","port":80,"identity":258},"is_reply":false}"#;
    let good = file("good.jsonl", &format!("{flow}\n"));
    let out = ok(bulkhead(&["advise", "--flows", &good]), "advise good file");
    assert_eq!(out.matches("kind: NetworkPolicy").count(), 2, "{out}");
    let dropped = flow.replace("FORWARDED", "DROPPED");
    let cases: [(Vec<String>, &str); 6] = [
        (vec![file("empty.jsonl", "")], "flow history is empty"),
        (vec![file("dropped.jsonl", &format!("{dropped}\n"))], "1 dropped"),
        (vec![file("bad.jsonl", &format!("{flow}\n{{\"time\": 1}}\n"))], "line 2"),
        (vec![file("text.jsonl", "hello\n")], "line 1"),
        (vec!["/nonexistent/flows.jsonl".into()], "/nonexistent/flows.jsonl"),
        (
            vec![good.clone(), "--namespace".into(), "nope".into()],
            "unknown namespace \"nope\"",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["advise", "--flows"];
        all.extend(args.iter().map(String::as_str));
        let what = format!("{all:?}");
        fails_with(bulkhead(&all), needle, &what);
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
