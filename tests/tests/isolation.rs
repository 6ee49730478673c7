//! Isolation from the first instant and established flows across policy changes, end to end.
//!
//! The traffic generators run in this process on threads that entered a pod's network
//! namespace, so they can hammer a pod before its CNI ADD finished and count every outcome.
//! Needs `cargo build` at the workspace root first; runs as root.
#![expect(clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bulkhead_e2e::{echo_server, Lab};
use nix::sched::{setns, CloneFlags};

/// Namespaces with one pod each serving TCP 80: `ns/pod` pairs.
fn pods_yaml(pods: &[(&str, &str)]) -> String {
    let mut namespaces: Vec<&str> = pods.iter().map(|(ns, _)| *ns).collect();
    namespaces.dedup();
    let mut out = String::new();
    for ns in namespaces {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
        ));
    }
    for (ns, pod) in pods {
        out.push_str(&pod_yaml(ns, pod));
    }
    out
}

fn pod_yaml(ns: &str, pod: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\nspec:\n  containers:\n  - name: c\n    image: agnhost\n    ports:\n    - {{containerPort: 80, protocol: TCP}}\n"
    )
}

fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")
}

fn pod_ips(lab: &Lab) -> Vec<(String, Ipv4Addr)> {
    let pods: serde_json::Value = serde_json::from_str(&lab.ok(&["pods", "-o", "json"])).expect("pods json");
    pods.as_array()
        .expect("array")
        .iter()
        .filter_map(|p| {
            let key = format!("{}/{}", p["namespace"].as_str()?, p["name"].as_str()?);
            Some((key, p["ip"].as_str()?.parse().ok()?))
        })
        .collect()
}

fn pod_ip(lab: &Lab, pod: &str) -> Ipv4Addr {
    pod_ips(lab)
        .into_iter()
        .find(|(k, _)| k == pod)
        .map(|(_, ip)| ip)
        .unwrap_or_else(|| panic!("{pod} has no ip"))
}

/// The lab's netns name of a pod (lab/pod.rs `pod_netns_name`, short names only).
fn netns_name(lab: &Lab, pod: &str) -> String {
    let (ns, name) = pod.split_once('/').expect("ns/pod");
    assert!(!ns.contains('-'), "only short plain names here");
    format!("bh{}-{ns}-{name}", lab.id())
}

/// Moves this thread into a named network namespace; `false` while it does not exist yet
/// (the file exists before its bind mount does, and then setns says EINVAL).
fn try_enter(netns: &str) -> bool {
    let Ok(file) = std::fs::File::open(format!("/run/netns/{netns}")) else {
        return false;
    };
    setns(&file, CloneFlags::CLONE_NEWNET).is_ok()
}

fn enter(netns: &str) {
    assert!(try_enter(netns), "cannot enter netns {netns}");
}

/// What a hammer saw: attempts, handshakes completed, resets (a reset also means the
/// packet reached the pod).
#[derive(Default)]
struct Tally {
    attempts: AtomicU64,
    connected: AtomicU64,
    refused: AtomicU64,
    /// When the first attempt was made (after entering the netns).
    first: Mutex<Option<Instant>>,
    /// Where the connections went, for the failure message.
    hits: Mutex<Vec<String>>,
}

impl Tally {
    fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.attempts.load(Ordering::SeqCst),
            self.connected.load(Ordering::SeqCst),
            self.refused.load(Ordering::SeqCst),
        )
    }
}

/// Time since the hammer's first attempt.
fn first_at(tally: &Tally) -> Duration {
    tally.first.lock().expect("lock").map(|t| t.elapsed()).unwrap_or_default()
}

/// Connects to `targets` over and over until `stop`, from inside `netns` (waiting for it to
/// appear first when `wait`), and tallies the outcomes.
fn hammer(netns: &str, wait: bool, targets: &[SocketAddr], stop: &AtomicBool, tally: &Tally) {
    let give_up = Instant::now() + Duration::from_secs(120);
    if wait {
        while !try_enter(netns) {
            assert!(Instant::now() < give_up, "netns {netns} never appeared");
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    } else {
        enter(netns);
    }
    tally.first.lock().expect("lock").get_or_insert_with(Instant::now);
    while !stop.load(Ordering::SeqCst) && Instant::now() < give_up {
        for target in targets {
            let started = Instant::now();
            tally.attempts.fetch_add(1, Ordering::SeqCst);
            match TcpStream::connect_timeout(target, Duration::from_millis(5)) {
                Ok(_) => {
                    tally.connected.fetch_add(1, Ordering::SeqCst);
                    tally
                        .hits
                        .lock()
                        .expect("lock")
                        .push(format!("connected to {target} after {:?}", first_at(tally)));
                }
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    tally.refused.fetch_add(1, Ordering::SeqCst);
                    tally
                        .hits
                        .lock()
                        .expect("lock")
                        .push(format!("reset by {target} after {:?}", first_at(tally)));
                }
                Err(_) => {
                    // No route yet fails at once: do not spin a core (the machine is shared).
                    if started.elapsed() < Duration::from_millis(1) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
    }
}

/// Hammers `targets` from `netns` on `threads` threads while `during` runs, then for
/// `after` more; returns the tallies before, during and after `during`.
fn hammer_around(
    netns: &str,
    wait: bool,
    targets: &[SocketAddr],
    threads: usize,
    lead: Duration,
    after: Duration,
    during: impl FnOnce(),
) -> [(u64, u64, u64); 3] {
    let stop = AtomicBool::new(false);
    let tally = Tally::default();
    // Stops the hammers even when `during` panics, so the scope can join them.
    let marks = std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        for _ in 0..threads {
            scope.spawn(|| hammer(netns, wait, targets, &stop, &tally));
        }
        std::thread::sleep(lead);
        let before = tally.snapshot();
        during();
        let during_done = tally.snapshot();
        std::thread::sleep(after);
        stop.store(true, Ordering::SeqCst);
        [before, during_done]
    });
    let hits: Vec<String> = tally.hits.lock().expect("lock").iter().take(5).cloned().collect();
    let end = tally.snapshot();
    eprintln!(
        "hammer {netns}: before {:?}, after ADD {:?}, end {end:?}; hits {hits:?}",
        marks[0], marks[1]
    );
    [marks[0], marks[1], end]
}

/// A default-deny-ingress policy is in force before x/new exists; y/a hammers the
/// addresses x/new can get from before its ADD until well after: not one handshake
/// completes. Then an allow policy opens it, which proves the hammer sees connections.
#[test]
fn new_pod_is_isolated_for_ingress_from_the_first_instant() {
    let lab = Lab::new("first-ingress");
    lab.ok(&["up", "-f", &lab.file("pods.yaml", &pods_yaml(&[("x", "a"), ("y", "a")]))]);
    lab.ok(&[
        "apply",
        "-f",
        &lab.file(
            "deny.yaml",
            &policy("x", "deny-in", "  podSelector: {}\n  policyTypes: [Ingress]\n"),
        ),
    ]);
    // The lab's IPAM hands out the address after the last one reserved; hammer the next few
    // so a change of that order cannot make the test vacuous (checked below).
    let last = pod_ips(&lab).into_iter().map(|(_, ip)| u32::from(ip)).max().expect("pods have ips");
    let targets: Vec<SocketAddr> = (1..=3).map(|i| SocketAddr::from((Ipv4Addr::from(last + i), 80))).collect();
    let new_pod = lab.file("new.yaml", &pods_yaml(&[("x", "new")]));
    let hammer_ns = netns_name(&lab, "y/a");
    let [before, added, end] = hammer_around(
        &hammer_ns,
        false,
        &targets,
        6,
        Duration::from_millis(500),
        Duration::from_secs(2),
        || {
            lab.ok(&["apply", "-f", &new_pod]);
        },
    );
    let new_ip = pod_ip(&lab, "x/new");
    assert!(
        targets.contains(&SocketAddr::from((new_ip, 80))),
        "x/new got {new_ip}, not one of {targets:?}"
    );
    assert!(
        before.0 > 0 && added.0 > before.0 && end.0 > added.0,
        "the hammer did not run throughout: {before:?} {added:?} {end:?}"
    );
    assert_eq!(
        (end.1, end.2),
        (0, 0),
        "packets reached x/new although a policy denies all its ingress"
    );

    // Positive control: the same hammer does see connections once they are allowed.
    lab.ok(&[
        "apply",
        "-f",
        &lab.file("allow.yaml", &policy("x", "allow-in", "  podSelector: {}\n  ingress:\n  - {}\n")),
    ]);
    let target = [SocketAddr::from((new_ip, 80))];
    let [_, _, open] = hammer_around(&hammer_ns, false, &target, 1, Duration::ZERO, Duration::from_millis(500), || {});
    assert!(open.1 > 0, "the hammer never connected to an allowed pod: {open:?}");
}

/// A default-deny-egress policy is in force before x/new exists; from the moment its
/// network namespace exists, x/new hammers y/a: not one handshake completes.
#[test]
fn new_pod_is_isolated_for_egress_from_the_first_instant() {
    let lab = Lab::new("first-egress");
    lab.ok(&["up", "-f", &lab.file("pods.yaml", &pods_yaml(&[("x", "a"), ("y", "a")]))]);
    lab.ok(&[
        "apply",
        "-f",
        &lab.file(
            "deny.yaml",
            &policy("x", "deny-out", "  podSelector: {}\n  policyTypes: [Egress]\n"),
        ),
    ]);
    let targets = [SocketAddr::from((pod_ip(&lab, "y/a"), 80))];
    let new_pod = lab.file("new.yaml", &pods_yaml(&[("x", "new")]));
    let new_ns = netns_name(&lab, "x/new");
    let [_, added, end] = hammer_around(&new_ns, true, &targets, 4, Duration::ZERO, Duration::from_secs(2), || {
        lab.ok(&["apply", "-f", &new_pod]);
    });
    assert!(
        added.0 > 0 && end.0 > added.0,
        "the hammer did not run throughout: {added:?} {end:?}"
    );
    assert_eq!((end.1, end.2), (0, 0), "x/new reached y/a although a policy denies all its egress");

    lab.ok(&[
        "apply",
        "-f",
        &lab.file("allow.yaml", &policy("x", "allow-out", "  podSelector: {}\n  egress:\n  - {}\n")),
    ]);
    let [_, _, open] = hammer_around(&new_ns, false, &targets, 1, Duration::ZERO, Duration::from_millis(500), || {});
    assert!(open.1 > 0, "the hammer never connected once egress was allowed: {open:?}");
}

/// Sets the flag when dropped: stops the threads of a scope even when its body panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Waits up to 10 s for `flag`.
fn wait_for(flag: &AtomicBool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !flag.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What [`hold_echo_connection`] saw.
#[derive(Default)]
struct EchoSession {
    round_trips: AtomicU64,
    /// The longest time between two round trips, pause included (ms).
    longest_gap_ms: AtomicU64,
    /// Why the connection broke, if it did.
    broken: Mutex<Option<String>>,
}

/// From `netns`, holds one TCP connection to an echo server and sends a byte every
/// `pause` until `stop`, checking each comes back within a second (longer than any agent
/// reload: a stall of a second is a break, not a hiccup).
fn hold_echo_connection(netns: &str, target: SocketAddr, pause: Duration, stop: &AtomicBool, session: &EchoSession) {
    enter(netns);
    let fail = |why: String| {
        session.broken.lock().expect("lock").get_or_insert(why);
    };
    let mut stream = match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return fail(format!("connect: {e}")),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let (mut n, mut last) = (0u8, Instant::now());
    while !stop.load(Ordering::SeqCst) {
        n = n.wrapping_add(1);
        let mut back = [0u8; 1];
        if let Err(e) = stream.write_all(&[n]).and_then(|()| stream.read_exact(&mut back)) {
            return fail(format!("after {} round trips: {e}", session.round_trips.load(Ordering::SeqCst)));
        }
        if back[0] != n {
            return fail(format!("echo {} for {n}", back[0]));
        }
        let gap = u64::try_from(last.elapsed().as_millis()).unwrap_or(u64::MAX);
        session.longest_gap_ms.fetch_max(gap, Ordering::SeqCst);
        last = Instant::now();
        session.round_trips.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(pause);
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

/// x/a holds a TCP connection to y/b and exchanges a byte every 50 ms while policies come
/// and go: ones about other pods, one selecting y/b that still allows x, and one that
/// denies new connections from x/a to y/b. The connection never breaks: conntrack keeps
/// established flows (as Cilium does); only new connections are denied.
#[test]
fn established_flow_survives_policy_changes() {
    const PORT: u16 = 9000;
    let lab = Lab::new("established");
    lab.ok(&[
        "up",
        "-f",
        &lab.file("pods.yaml", &pods_yaml(&[("x", "a"), ("y", "b"), ("z", "c")])),
    ]);
    let server_ns = netns_name(&lab, "y/b");
    let client_ns = netns_name(&lab, "x/a");
    let target = SocketAddr::from((pod_ip(&lab, "y/b"), PORT));
    let stop = AtomicBool::new(false);
    let ready = AtomicBool::new(false);
    let session = EchoSession::default();
    let (round_trips, broken) = (&session.round_trips, &session.broken);
    let steps: &[(&str, &str, String)] = &[
        ("apply", "z-deny", policy("z", "deny-all", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n")),
        (
            "apply",
            "z-update",
            policy("z", "deny-all", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: x}}\n"),
        ),
        ("apply", "x-other", policy("x", "only-a-out-to-z", "  podSelector: {matchLabels: {pod: other}}\n  policyTypes: [Egress]\n")),
        ("delete", "z-delete", policy("z", "deny-all", "  podSelector: {}\n")),
        (
            "apply",
            "y-allow-x",
            policy("y", "allow-x", "  podSelector: {matchLabels: {pod: b}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: x}}\n"),
        ),
        ("delete", "y-allow-x-delete", policy("y", "allow-x", "  podSelector: {}\n")),
        ("apply", "y-deny", policy("y", "deny-in", "  podSelector: {}\n  policyTypes: [Ingress]\n")),
    ];
    let mut new_while_denied = None;
    std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        scope.spawn(|| echo_server(&server_ns, PORT, &stop, &ready));
        wait_for(&ready, "echo server did not start");
        scope.spawn(|| hold_echo_connection(&client_ns, target, Duration::from_millis(50), &stop, &session));
        let wait_trips = |min: u64| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while round_trips.load(Ordering::SeqCst) < min && broken.lock().expect("lock").is_none() {
                assert!(Instant::now() < deadline, "no round trips");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        wait_trips(5);
        assert!(connects(&client_ns, target), "a new connection works before any policy");
        for (verb, name, yaml) in steps {
            let before = round_trips.load(Ordering::SeqCst);
            lab.ok(&[verb, "-f", &lab.file(&format!("{name}.yaml"), yaml)]);
            // A few round trips after every change, so each one is proven survived.
            wait_trips(before + 5);
            assert!(broken.lock().expect("lock").is_none(), "connection broke at step {name}");
        }
        new_while_denied = Some(connects(&client_ns, target));
        let before = round_trips.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            round_trips.load(Ordering::SeqCst) >= before + 10,
            "the connection stalled while denied for new flows"
        );
        stop.store(true, Ordering::SeqCst);
    });
    if let Some(why) = broken.lock().expect("lock").take() {
        panic!("the established connection broke: {why}");
    }
    assert_eq!(new_while_denied, Some(false), "a new connection must be denied by y/deny-in");
    assert!(round_trips.load(Ordering::SeqCst) > 40, "too few round trips to prove anything");
}

/// The datapath enforces on its own while the agent is gone, and a restarted agent adopts
/// the pinned maps without flushing conntrack: x/a holds an echo connection to y/b
/// (round trip every 20 ms) and z/c hammers y/b, which admits only namespace x, while the
/// agent is SIGKILLed and left down, then restarted by SIGKILL and by SIGTERM as a rollout
/// does. Not one round trip fails, not one of z/c's handshakes completes, and a new
/// connection from x/a succeeds while the agent is down (the last policy holds).
#[test]
fn enforcement_holds_while_the_agent_is_down_and_across_restarts() {
    const PORT: u16 = 9100;
    let lab = Lab::new("agentdown");
    lab.ok(&[
        "up",
        "-f",
        &lab.file("pods.yaml", &pods_yaml(&[("x", "a"), ("y", "b"), ("z", "c")])),
    ]);
    lab.ok(&[
        "apply",
        "-f",
        &lab.file(
            "allow-x.yaml",
            &policy(
                "y",
                "allow-x",
                "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: x}}\n",
            ),
        ),
    ]);
    let (server_ns, client_ns, denied_ns) = (netns_name(&lab, "y/b"), netns_name(&lab, "x/a"), netns_name(&lab, "z/c"));
    let target = SocketAddr::from((pod_ip(&lab, "y/b"), PORT));
    let (stop, ready) = (AtomicBool::new(false), AtomicBool::new(false));
    let session = EchoSession::default();
    let (round_trips, broken, longest_gap_ms) = (&session.round_trips, &session.broken, &session.longest_gap_ms);
    let tally = Tally::default();
    let mut new_while_down = None;
    let node_ns = format!("bh{}-node0", lab.id());
    let mut programs_before = Vec::new();
    std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        scope.spawn(|| echo_server(&server_ns, PORT, &stop, &ready));
        wait_for(&ready, "echo server did not start");
        scope.spawn(|| hold_echo_connection(&client_ns, target, Duration::from_millis(20), &stop, &session));
        scope.spawn(|| hammer(&denied_ns, false, &[target], &stop, &tally));
        let wait_trips = |more: u64| {
            let want = round_trips.load(Ordering::SeqCst) + more;
            let deadline = Instant::now() + Duration::from_secs(10);
            while round_trips.load(Ordering::SeqCst) < want && broken.lock().expect("lock").is_none() {
                assert!(Instant::now() < deadline, "no round trips");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait_trips(10);
        programs_before = bulkhead_filters(&node_ns);
        // Down: SIGKILL, and nobody restarts it for two seconds.
        let pid = lab.status()["nodes"][0]["agentPid"].as_u64().expect("agent pid");
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(killed.success());
        wait_trips(20);
        new_while_down = Some(connects(&client_ns, target));
        std::thread::sleep(Duration::from_secs(1));
        lab.ok(&["restart-agent", "--signal", "KILL"]);
        wait_trips(20);
        // Rollouts: the running agent ends by SIGTERM, then by SIGKILL.
        for signal in ["TERM", "KILL"] {
            lab.ok(&["restart-agent", "--signal", signal]);
            wait_trips(20);
        }
        stop.store(true, Ordering::SeqCst);
    });
    if let Some(why) = broken.lock().expect("lock").take() {
        panic!("the established connection broke: {why}");
    }
    let (attempts, connected, refused) = tally.snapshot();
    eprintln!(
        "round trips {}, longest gap {} ms; z/c: {attempts} attempts, {connected} connected, {refused} reset",
        round_trips.load(Ordering::SeqCst),
        longest_gap_ms.load(Ordering::SeqCst)
    );
    assert_eq!(
        new_while_down,
        Some(true),
        "a new allowed connection failed while the agent was down"
    );
    assert!(attempts > 100, "the hammer did not run: {attempts}");
    assert_eq!(
        (connected, refused),
        (0, 0),
        "z/c reached y/b while the agent was down or restarting"
    );
    // Each restart put its own programs on the veths, in place: one filter per direction at
    // Bulkhead's priority, with a program other than the first agent's.
    let programs_after = bulkhead_filters(&node_ns);
    assert_eq!(programs_after.len(), 3 * 2, "{programs_after:?}");
    for (veth, dir, pref, id) in &programs_after {
        assert_eq!(*pref, 1, "{veth} {dir}: {programs_after:?}");
        assert!(
            !programs_before.iter().any(|(v, d, _, old)| v == veth && d == dir && old == id),
            "{veth} {dir} still runs the first agent's program {id}"
        );
    }
    // A lost packet costs TCP at least its 200 ms minimum retransmission timeout.
    assert!(
        longest_gap_ms.load(Ordering::SeqCst) < 200,
        "a round trip stalled {} ms: packets were lost",
        longest_gap_ms.load(Ordering::SeqCst)
    );
}

/// Bulkhead's tc filters on the pod veths of a node netns: (veth, direction, priority,
/// program id).
fn bulkhead_filters(node_ns: &str) -> Vec<(String, &'static str, u32, u32)> {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", node_ns])
            .args(args)
            .output()
            .expect("ip netns exec");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let veths: Vec<String> = run(&["ip", "-o", "link", "show", "type", "veth"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect();
    let mut out = Vec::new();
    for veth in veths {
        for dir in ["ingress", "egress"] {
            for line in run(&["tc", "filter", "show", "dev", &veth, dir]).lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                let after = |key: &str| {
                    words
                        .iter()
                        .position(|w| *w == key)
                        .and_then(|i| words.get(i + 1))
                        .and_then(|v| v.parse().ok())
                };
                if let (Some(pref), Some(id)) = (after("pref"), after("id")) {
                    out.push((veth.clone(), dir, pref, id));
                }
            }
        }
    }
    out
}
