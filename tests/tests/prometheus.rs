//! A real Prometheus server (Debian's `prometheus`) scrapes the lab's agents, and the
//! datapath counters it reports move by exactly what known traffic implies.
//!
//! Needs `cargo build` at the workspace root first and `prometheus` on PATH
//! (scripts/setup.sh installs it); runs as root.
#![expect(clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_e2e::{three_by_three, Lab, X_A_FROM_B};
use bulkhead_hostnet::netns;

/// Datagrams the allowed pair exchanges (each one echoed back).
const ALLOWED: u64 = 5;
/// Datagrams the denied pair sends (each one dropped at the receiver).
const DENIED: u64 = 7;
/// The probe payload; with Ethernet (14), IPv4 (20) and UDP (8) headers a 64-byte frame.
const PAYLOAD: &[u8] = b"bulkhead-metrics-probe";
/// Frame length the datapath counts (skb->len at TC includes the Ethernet header).
const FRAME: u64 = 14 + 20 + 8 + PAYLOAD.len() as u64;

/// A Prometheus server in a temp dir, killed and removed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`) every second.
    fn start(targets: &[String]) -> Self {
        let dir = std::env::temp_dir().join(format!("bulkhead-e2e-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("create prometheus dir");
        let quoted: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n- job_name: bulkhead\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  metrics_path: /metrics\n  static_configs:\n  - targets: [{}]\n",
            quoted.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus config");
        // Prometheus wants a concrete port: take a free one from the kernel and hand it over.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("prometheus is missing: run scripts/setup.sh (Debian package prometheus)");
        Prometheus { child, dir, port }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query through the HTTP API: each series' labels and value.
    fn query(&self, promql: &str) -> Option<Vec<(BTreeMap<String, String>, f64)>> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET /api/v1/query?query={encoded} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let body = response.split_once("\r\n\r\n")?.1;
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        if v["status"] != "success" {
            return None;
        }
        let series = v["data"]["result"].as_array()?;
        Some(
            series
                .iter()
                .filter_map(|s| {
                    let labels = s["metric"]
                        .as_object()?
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect();
                    let value = s["value"][1].as_str()?.parse().ok()?;
                    Some((labels, value))
                })
                .collect(),
        )
    }

    /// Waits until `promql` yields one series of value `want`.
    fn wait_for(&self, promql: &str, want: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.query(promql);
            if let Some([(_, v)]) = got.as_deref() {
                if *v == want {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{promql}: want {want}, got {got:?}\nprometheus log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The datapath counters the test follows, summed over the lab's nodes.
#[derive(Clone, Debug, Default, PartialEq)]
struct Totals {
    /// (direction) → forwarded packets.
    forwarded: BTreeMap<String, f64>,
    /// (direction) → forwarded bytes.
    forwarded_bytes: BTreeMap<String, f64>,
    /// (reason/direction) → dropped packets.
    drops: BTreeMap<String, f64>,
}

fn totals(prom: &Prometheus) -> Option<Totals> {
    let by = |q: &str, key: &dyn Fn(&BTreeMap<String, String>) -> String| -> Option<BTreeMap<String, f64>> {
        Some(prom.query(q)?.into_iter().map(|(l, v)| (key(&l), v)).collect())
    };
    let dir = |l: &BTreeMap<String, String>| l.get("direction").cloned().unwrap_or_default();
    Some(Totals {
        forwarded: by("sum by (direction) (bulkhead_forwarded_packets_total)", &dir)?,
        forwarded_bytes: by("sum by (direction) (bulkhead_forwarded_bytes_total)", &dir)?,
        drops: by("sum by (reason, direction) (bulkhead_drops_total)", &|l| {
            format!(
                "{}/{}",
                l.get("reason").cloned().unwrap_or_default(),
                l.get("direction").cloned().unwrap_or_default()
            )
        })?,
    })
}

/// `after - before` per key, zeros left out.
fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

/// Waits until two reads `span` apart (several scrapes) agree, and returns that reading.
fn settled(prom: &Prometheus, span: Duration, timeout: Duration) -> Totals {
    let deadline = Instant::now() + timeout;
    let mut last = totals(prom);
    loop {
        std::thread::sleep(span);
        let now = totals(prom);
        if let Some(t) = now.as_ref().filter(|t| Some(*t) == last.as_ref()) {
            return t.clone();
        }
        assert!(Instant::now() < deadline, "counters never settled: {last:?} then {now:?}");
        last = now;
    }
}

/// The lab's state file, for the pods' and nodes' namespace names.
fn lab_state(lab: &Lab) -> serde_json::Value {
    let bytes = std::fs::read(lab.dir.join("lab.json")).expect("read lab.json");
    serde_json::from_slice(&bytes).expect("lab.json")
}

fn pod_field(state: &serde_json::Value, pod: &str, field: &str) -> String {
    state["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| format!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or("")) == pod)
        .and_then(|p| p[field].as_str())
        .unwrap_or_else(|| panic!("{pod} has no {field}"))
        .to_string()
}

/// Pins every resolved neighbour entry in `netns` (`nud permanent`), so that no ARP
/// request or reply — which the datapath counts as forwarded — happens while measuring.
fn pin_neighbours(netns: &str) {
    let out = Command::new("ip")
        .args(["-n", netns, "-4", "-j", "neigh", "show"])
        .output()
        .expect("run ip neigh");
    assert!(
        out.status.success(),
        "ip -n {netns} neigh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip neigh json");
    for e in entries.as_array().expect("neigh array") {
        let (Some(dst), Some(dev), Some(mac)) = (e["dst"].as_str(), e["dev"].as_str(), e["lladdr"].as_str()) else {
            continue;
        };
        let status = Command::new("ip")
            .args(["-n", netns, "neigh", "replace", dst, "lladdr", mac, "dev", dev, "nud", "permanent"])
            .status()
            .expect("run ip neigh replace");
        assert!(status.success(), "pin {dst} on {dev} in {netns}");
    }
}

/// Sends `count` datagrams from inside `netns` to `to`:80, one socket each; returns how
/// many echoes came back.
fn send_udp(netns: &str, to: Ipv4Addr, count: u64, expect_reply: bool) -> u64 {
    netns::run_in(&netns::named_path(netns), move || {
        let mut replies = 0;
        for _ in 0..count {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind udp");
            socket.connect((to, 80)).expect("connect udp");
            socket.send(PAYLOAD).expect("send udp");
            // The socket stays open until the echo arrives, so no ICMP port-unreachable
            // goes back; a denied datagram gets a short wait only.
            let wait = if expect_reply { 3000 } else { 200 };
            socket.set_read_timeout(Some(Duration::from_millis(wait))).expect("timeout");
            let mut buf = [0u8; 64];
            if let Ok(n) = socket.recv(&mut buf) {
                assert_eq!(&buf[..n], PAYLOAD, "echo");
                replies += 1;
            }
        }
        replies
    })
    .expect("enter pod netns")
}

#[test]
fn prometheus_sees_exact_forward_and_drop_counts() {
    let lab = Lab::new("prometheus");
    lab.ok(&["up", "--nodes", "3", "-f", &lab.file("pods.yaml", &three_by_three())]);
    lab.ok(&["apply", "-f", &lab.file("policy.yaml", X_A_FROM_B)]);

    let status: serde_json::Value = serde_json::from_str(&lab.ok(&["status", "-o", "json"])).expect("status json");
    let targets: Vec<String> = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            let url = n["metricsURL"].as_str().unwrap_or_else(|| panic!("node without metricsURL: {n}"));
            url.trim_start_matches("http://").trim_end_matches("/metrics").to_string()
        })
        .collect();
    assert_eq!(targets.len(), 3);

    let prom = Prometheus::start(&targets);
    let timeout = Duration::from_secs(60);
    prom.wait_for("sum(up{job=\"bulkhead\"})", 3.0, timeout);
    prom.wait_for("sum(bulkhead_map_entries{map=\"endpoints\"})", 9.0, timeout);
    prom.wait_for("sum(bulkhead_cni_requests_total{verb=\"add\",result=\"ok\"})", 9.0, timeout);

    // Every dashboard query is valid PromQL to the real server.
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../manifests/grafana-dashboard.json")).expect("dashboard json");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let promql = expr.replace("$instance", ".*").replace("$__rate_interval", "1m");
            assert!(prom.query(&promql).is_some(), "dashboard query {promql:?} fails:\n{}", prom.log());
        }
    }

    // Warm up: every pair talks once, so every neighbour entry the measured traffic needs
    // is resolved; then pin them all, pods and nodes alike.
    lab.ok(&["probe", "--port", "80", "--protocol", "UDP"]);
    let state = lab_state(&lab);
    let namespaces = state["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .chain(state["nodes"].as_array().expect("nodes"))
        .filter_map(|x| x["netns"].as_str().map(str::to_string));
    for ns in namespaces {
        pin_neighbours(&ns);
    }
    let before = settled(&prom, Duration::from_secs(3), timeout);

    // y/b may reach x/a (pod=b from any namespace); x/b takes nothing (default deny).
    let x_a: Ipv4Addr = pod_field(&state, "x/a", "ip").parse().expect("x/a ip");
    let x_b: Ipv4Addr = pod_field(&state, "x/b", "ip").parse().expect("x/b ip");
    assert_eq!(
        send_udp(&pod_field(&state, "y/b", "netns"), x_a, ALLOWED, true),
        ALLOWED,
        "echoes y/b -> x/a"
    );
    assert_eq!(
        send_udp(&pod_field(&state, "y/c", "netns"), x_b, DENIED, false),
        0,
        "echoes y/c -> x/b"
    );

    // Allowed: request out of y/b (egress) and into x/a (ingress), echo out of x/a and
    // into y/b. Denied: out of y/c (egress, not isolated), then dropped into x/b.
    let want = Totals {
        forwarded: [("egress", 2 * ALLOWED + DENIED), ("ingress", 2 * ALLOWED)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v as f64))
            .collect(),
        forwarded_bytes: [("egress", (2 * ALLOWED + DENIED) * FRAME), ("ingress", 2 * ALLOWED * FRAME)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v as f64))
            .collect(),
        drops: [("policy_denied/ingress".to_string(), DENIED as f64)].into_iter().collect(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let moved = |t: &Totals| Totals {
        forwarded: delta(&before.forwarded, &t.forwarded),
        forwarded_bytes: delta(&before.forwarded_bytes, &t.forwarded_bytes),
        drops: delta(&before.drops, &t.drops),
    };
    loop {
        let got = totals(&prom).map(|t| moved(&t));
        if got.as_ref() == Some(&want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counters moved by {got:?}, want {want:?}\nprometheus log:\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Exactly, not at least: a few more scrapes later nothing else has moved.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(totals(&prom).map(|t| moved(&t)), Some(want), "counters kept moving");
}
