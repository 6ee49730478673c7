//! Helpers for the end-to-end tests: the built binaries and a lab that cleans up after itself.
#![expect(clippy::expect_used, reason = "test helpers panic so the failing test shows a backtrace")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// The workspace's `target/debug` dir (or `CARGO_TARGET_DIR`'s).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d).join("debug"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
    }
}

/// A built binary; panics with the fix when it is missing.
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build` at the workspace root before these tests",
        path.display()
    );
    path
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A lab in its own dir, taken down on drop even when the test fails.
pub struct Lab {
    /// The lab dir.
    pub dir: PathBuf,
    /// Extra environment for every `bulkhead` call.
    pub env: Vec<(String, PathBuf)>,
}

impl Lab {
    /// A lab using the real agent and CNI plugin.
    pub fn new(test: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("bulkhead-e2e-{test}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        Lab {
            dir: dir.join("lab"),
            env: Vec::new(),
        }
    }

    /// Runs `bulkhead lab --lab-dir DIR ARGS...`.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(binary("bulkhead"));
        cmd.arg("lab").arg("--lab-dir").arg(&self.dir).args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().expect("run bulkhead")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "bulkhead lab {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `text` to a file in the test dir and returns its path.
    pub fn file(&self, name: &str, text: &str) -> String {
        let path = self.dir.with_file_name(name);
        std::fs::write(&path, text).expect("write manifest");
        path.display().to_string()
    }

    /// The lab id from `status -o json`.
    pub fn id(&self) -> String {
        let status: serde_json::Value = serde_json::from_str(&self.ok(&["status", "-o", "json"])).expect("status json");
        status["id"].as_str().expect("id").to_string()
    }

    /// `probe -o json` as (from, to) → allowed. Asserts the matrix is whole: one result per
    /// ordered pair of distinct pods that `pods -o json` lists (at least two pods), so a
    /// comparison over the map cannot pass on a short or empty answer.
    pub fn probe(&self, port: u16, protocol: &str) -> std::collections::BTreeMap<(String, String), bool> {
        let out = self.ok(&["probe", "--port", &port.to_string(), "--protocol", protocol, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("probe json");
        assert_eq!(v["port"], port);
        assert_eq!(v["protocol"], protocol);
        let results = v["results"].as_array().expect("results");
        let got: std::collections::BTreeMap<(String, String), bool> = results
            .iter()
            .map(|r| {
                (
                    (
                        r["from"].as_str().expect("from").to_string(),
                        r["to"].as_str().expect("to").to_string(),
                    ),
                    probe_allowed(r),
                )
            })
            .collect();
        assert_eq!(got.len(), results.len(), "probe {port}/{protocol} repeats a pair: {out}");
        let pods = self.pod_names();
        assert!(pods.len() >= 2, "probe {port}/{protocol} with pods {pods:?}");
        let want: std::collections::BTreeSet<(String, String)> = pods
            .iter()
            .flat_map(|from| pods.iter().filter(move |to| *to != from).map(move |to| (from.clone(), to.clone())))
            .collect();
        let keys: std::collections::BTreeSet<(String, String)> = got.keys().cloned().collect();
        assert_eq!(keys, want, "probe {port}/{protocol}: not every ordered pair of {} pods", pods.len());
        got
    }

    /// `probe -o json` as (from, to) → `result` (`connected`, `dropped` or `refused`), over
    /// the same whole matrix as [`Lab::probe`].
    pub fn probe_outcomes(&self, port: u16, protocol: &str) -> std::collections::BTreeMap<(String, String), String> {
        let out = self.ok(&["probe", "--port", &port.to_string(), "--protocol", protocol, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("probe json");
        let got: std::collections::BTreeMap<(String, String), String> = v["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| {
                probe_allowed(r);
                let key = (
                    r["from"].as_str().expect("from").to_string(),
                    r["to"].as_str().expect("to").to_string(),
                );
                (key, r["result"].as_str().expect("result").to_string())
            })
            .collect();
        let pods = self.pod_names();
        assert_eq!(
            got.len(),
            pods.len() * pods.len().saturating_sub(1),
            "probe {port}/{protocol}: {out}"
        );
        got
    }

    /// `probe --to world -o json` as from → `result`: one result per pod, each `"to": "world"`.
    pub fn probe_world(&self, port: u16, protocol: &str) -> std::collections::BTreeMap<String, String> {
        let out = self.ok(&[
            "probe",
            "--to",
            "world",
            "--port",
            &port.to_string(),
            "--protocol",
            protocol,
            "-o",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("probe json");
        assert_eq!(v["port"], port);
        assert_eq!(v["protocol"], protocol);
        let got: std::collections::BTreeMap<String, String> = v["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| {
                probe_allowed(r);
                assert_eq!(r["to"], "world", "{out}");
                (
                    r["from"].as_str().expect("from").to_string(),
                    r["result"].as_str().expect("result").to_string(),
                )
            })
            .collect();
        let mut pods = self.pod_names();
        pods.sort();
        assert_eq!(
            got.keys().cloned().collect::<Vec<_>>(),
            pods,
            "probe --to world: one result per pod: {out}"
        );
        got
    }

    /// `lab status -o json`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "-o", "json"])).expect("status json")
    }

    /// `namespace/name` of every pod `pods -o json` lists.
    pub fn pod_names(&self) -> Vec<String> {
        let listed: serde_json::Value = serde_json::from_str(&self.ok(&["pods", "-o", "json"])).expect("pods json");
        listed
            .as_array()
            .expect("pods: a list")
            .iter()
            .map(|p| {
                format!(
                    "{}/{}",
                    p["namespace"].as_str().expect("namespace"),
                    p["name"].as_str().expect("name")
                )
            })
            .collect()
    }

    /// Asserts that nothing of lab `id` is left.
    pub fn assert_gone(&self, id: &str) {
        let leftovers: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&format!("bh{id}-")))
                    .collect()
            })
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "netns left: {leftovers:?}");
        // Named too, so a change of prefix cannot hide the outside host.
        let world = PathBuf::from(format!("/run/netns/bh{id}-world"));
        assert!(!world.exists(), "{} left", world.display());
        let pins = PathBuf::from(format!("/sys/fs/bpf/bulkhead-lab-{id}"));
        assert!(!pins.exists(), "{} left", pins.display());
        assert!(!self.dir.exists(), "{} left", self.dir.display());
        let dir = self.dir.display().to_string();
        let procs: Vec<String> = std::fs::read_dir("/proc")
            .expect("read /proc")
            .filter_map(|e| {
                let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).ok()?).replace('\0', " ");
                let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let zombie = state.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z'));
                (cmdline.contains(&dir) && !zombie).then(|| format!("{pid}: {cmdline}"))
            })
            .collect();
        assert!(procs.is_empty(), "processes left: {procs:?}");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// Namespaces x, y, z with pods a, b, c (label pod=<name>) serving 80 and 81 on TCP and UDP.
pub fn three_by_three() -> String {
    let mut out = String::new();
    for ns in ["x", "y", "z"] {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
        ));
        for pod in ["a", "b", "c"] {
            out.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\nspec:\n  containers:\n  - name: c\n    image: agnhost\n    ports:\n    - {{containerPort: 80, protocol: TCP}}\n    - {{containerPort: 80, protocol: UDP}}\n    - {{containerPort: 81, protocol: TCP}}\n    - {{containerPort: 81, protocol: UDP}}\n"
            ));
        }
    }
    out
}

/// Default-deny ingress in x, and x/a admits pods labelled pod=b from any namespace.
pub const X_A_FROM_B: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {}
      podSelector: {matchLabels: {pod: b}}
";

/// Ordered pairs of distinct pods among [`nine_pods`]: the size of a 3×3 probe matrix.
pub const PAIRS: usize = 72;

/// Every `ns/pod` of [`three_by_three`].
pub fn nine_pods() -> Vec<String> {
    ["x", "y", "z"]
        .iter()
        .flat_map(|ns| ["a", "b", "c"].iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// `up` with the 3×3 pods; `down` removes everything; a second `down` succeeds.
pub fn scenario_up_down(lab: &Lab) {
    let pods = lab.file("pods.yaml", &three_by_three());
    lab.ok(&["up", "-f", &pods]);
    let id = lab.id();
    assert_eq!(id.len(), 4);
    assert!(PathBuf::from(format!("/run/netns/bh{id}-node0")).exists());
    assert!(PathBuf::from(format!("/run/netns/bh{id}-world")).exists());
    let listed: serde_json::Value = serde_json::from_str(&lab.ok(&["pods", "-o", "json"])).expect("pods json");
    let names: Vec<String> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|p| format!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(names, nine_pods());
    for p in listed.as_array().expect("array") {
        assert!(
            p["ip"].as_str().is_some_and(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok()),
            "pod without ip: {p}"
        );
        assert_eq!(p["node"], "node0");
        assert!(p["labels"]["pod"].is_string());
    }
    lab.ok(&["down"]);
    lab.assert_gone(&id);
    lab.ok(&["down"]);
}

/// No policy: all 72 pairs allowed on TCP/80; then x/a only admits */b and x/b, x/c nothing.
pub fn scenario_three_by_three(lab: &Lab) {
    let pods = lab.file("pods.yaml", &three_by_three());
    lab.ok(&["up", "-f", &pods]);
    let started = std::time::Instant::now();
    let open = lab.probe(80, "TCP");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "probe took {:?}",
        started.elapsed()
    );
    assert_eq!(open.len(), PAIRS);
    assert!(open.values().all(|a| *a), "denied without policy: {open:?}");
    let udp = lab.probe(81, "UDP");
    assert_eq!(udp.len(), PAIRS);
    assert!(udp.values().all(|a| *a), "udp denied without policy");
    let policy = lab.file("policy.yaml", X_A_FROM_B);
    lab.ok(&["apply", "-f", &policy]);
    let got = lab.probe(80, "TCP");
    assert_eq!(got.len(), PAIRS);
    for ((from, to), allowed) in &got {
        let want = match to.as_str() {
            "x/a" => from.ends_with("/b"),
            "x/b" | "x/c" => false,
            _ => true,
        };
        assert_eq!(*allowed, want, "{from} -> {to}");
    }
}

/// Bad input fails naming the object or field, and changes nothing.
pub fn scenario_bad_input(lab: &Lab) {
    let pods = lab.file("pods.yaml", &three_by_three());
    lab.ok(&["up", "-f", &pods]);
    let before = lab.ok(&["pods", "-o", "json"]);
    let cases = [
        ("bad-yaml.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: [oops\n", "bad-yaml.yaml"),
        ("unknown-kind.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: n, namespace: x}\n---\napiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n", "Gadget"),
        (
            "bad-operator.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - podSelector:\n        matchExpressions: [{key: pod, operator: Foo, values: [a]}]\n",
            "operator",
        ),
    ];
    for (name, text, needle) in cases {
        let file = lab.file(name, text);
        let out = lab.run(&["apply", "-f", &file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        assert!(stderr.contains(needle), "{name}: error does not name {needle:?}: {stderr}");
        assert_eq!(lab.ok(&["pods", "-o", "json"]), before, "{name} changed the pods");
    }
}

/// `exec` passes the exit code through and runs inside the pod.
pub fn scenario_exec(lab: &Lab) {
    let pods = lab.file("pods.yaml", &three_by_three());
    lab.ok(&["up", "-f", &pods]);
    let out = lab.run(&["exec", "x/a", "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    let inside = lab.ok(&["exec", "x/a", "--", "cat", "/proc/net/dev"]);
    assert!(inside.contains("eth0"), "not in the pod netns: {inside}");
}

/// `allowed` of one `probe -o json` result, checked against its `result`: a known outcome,
/// and allowed exactly when connected.
pub fn probe_allowed(r: &serde_json::Value) -> bool {
    let allowed = r["allowed"].as_bool().expect("allowed");
    let result = r["result"].as_str().expect("result");
    assert!(["connected", "dropped", "refused"].contains(&result), "unknown result: {r}");
    assert_eq!(allowed, result == "connected", "allowed must mean connected: {r}");
    allowed
}

/// `namespace/pod` of a flow end in `bulkhead observe -o json` (`?` for what is not a pod).
pub fn flow_pod(peer: &serde_json::Value) -> String {
    format!(
        "{}/{}",
        peer["namespace"].as_str().unwrap_or("?"),
        peer["pod"].as_str().unwrap_or("?")
    )
}

/// `namespace/name` of each policy in a JSON list (`isolated_by`, `allowed_by`, ...).
pub fn policy_names(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|p| format!("{}/{}", p["namespace"].as_str().unwrap_or("?"), p["name"].as_str().unwrap_or("?")))
                .collect()
        })
        .unwrap_or_default()
}

/// One JSON object per line (`bulkhead observe -o json`); panics on a line that is not one.
pub fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a json flow ({e}): {l}")))
        .collect()
}

/// Every pod's node, from `lab pods -o json`: `ns/name` → node.
pub fn pod_nodes(lab: &Lab) -> std::collections::BTreeMap<String, String> {
    let pods: serde_json::Value = serde_json::from_str(&lab.ok(&["pods", "-o", "json"])).expect("pods json");
    pods.as_array()
        .expect("pods list")
        .iter()
        .map(|p| {
            (
                format!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or("")),
                p["node"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The route protocol the agent marks its routes with (`bulkhead::routing::ROUTE_PROTOCOL`).
pub const AGENT_ROUTE_PROTOCOL: u8 = 181;

/// `ip -4 route` of a node namespace, one line per route.
pub fn node_routes(netns: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-4", "route", "show"])
        .output()
        .expect("run ip route");
    assert!(
        out.status.success(),
        "ip -n {netns} route: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Each node namespace routes every other node's pod CIDR with one route, which the agent
/// installed (its protocol); nothing else routes a pod CIDR.
pub fn assert_agent_routes(lab: &Lab) {
    let status: serde_json::Value = serde_json::from_str(&lab.ok(&["status", "-o", "json"])).expect("status json");
    let nodes = status["nodes"].as_array().expect("nodes");
    for node in nodes {
        let netns = node["netns"].as_str().expect("netns");
        let routes = node_routes(netns);
        for other in nodes.iter().filter(|o| o["name"] != node["name"]) {
            let cidr = other["podCIDR"].as_str().expect("podCIDR");
            let matching: Vec<&String> = routes.iter().filter(|r| r.starts_with(&format!("{cidr} "))).collect();
            assert_eq!(matching.len(), 1, "{netns}: one route to {cidr}: {routes:?}");
            assert!(
                matching[0].contains(&format!("proto {AGENT_ROUTE_PROTOCOL}")),
                "{netns}: the route to {cidr} is not the agent's: {}",
                matching[0]
            );
        }
    }
}

/// Echo server in network namespace `netns` (entered on the calling thread) on `port`: one thread per connection, until `stop`.
pub fn echo_server(netns: &str, port: u16, stop: &std::sync::atomic::AtomicBool, ready: &std::sync::atomic::AtomicBool) {
    let file = std::fs::File::open(format!("/run/netns/{netns}")).unwrap_or_else(|e| panic!("netns {netns}: {e}"));
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)).expect("bind echo port");
    listener.set_nonblocking(true).expect("nonblocking");
    ready.store(true, Ordering::SeqCst);
    std::thread::scope(|scope| {
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    scope.spawn(move || {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(std::time::Duration::from_millis(200)));
                        let mut buf = [0u8; 64];
                        while !stop.load(Ordering::SeqCst) {
                            match std::io::Read::read(&mut stream, &mut buf) {
                                Ok(0) => return,
                                Ok(n) => {
                                    if std::io::Write::write_all(&mut stream, &buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
    });
}
