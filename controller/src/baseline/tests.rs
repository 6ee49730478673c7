//! Engine tests on simulated shops: learning, normal variation, each attack, decay,
//! persistence and dedupe. Time is the flows' own (simulated); nothing sleeps.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use bulkhead_api::{Anomaly, AnomalyKind, Direction, Flow, FlowBytes, FlowKind, FlowPeer, FlowVerdict, Protocol};

use super::{Config, Engine, BUCKET_NS, EXFIL_FACTOR, EXFIL_FLOOR};

const SEC: i128 = 1_000_000_000;
const T0: i128 = 1_800_000_000 * SEC;
const LEARN: u64 = 600;
const KNOWN_OUTSIDE: [u8; 4] = [203, 0, 113, 7];

#[derive(Clone)]
struct Pod {
    ns: &'static str,
    name: String,
    ip: Ipv4Addr,
    labels: BTreeMap<String, String>,
}

fn pod(ns: &'static str, app: &str, hash: &str, i: u8, subnet: u8) -> Pod {
    Pod {
        ns,
        name: format!("{app}-{hash}-{i}"),
        ip: Ipv4Addr::new(10, 1, subnet, i),
        labels: [("app", app), ("pod-template-hash", hash)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn peer(p: &Pod, port: u16) -> FlowPeer {
    FlowPeer {
        namespace: Some(p.ns.into()),
        pod: Some(p.name.clone()),
        labels: p.labels.clone(),
        ip: p.ip,
        port,
        identity: 256,
        services: vec![],
    }
}

fn outside(ip: [u8; 4], port: u16) -> FlowPeer {
    FlowPeer {
        namespace: None,
        pod: None,
        labels: BTreeMap::new(),
        ip: Ipv4Addr::from(ip),
        port,
        identity: 2,
        services: vec![],
    }
}

fn at(t: i128) -> jiff::Timestamp {
    jiff::Timestamp::from_nanosecond(t).unwrap()
}

fn record(t: i128, source: FlowPeer, destination: FlowPeer, verdict: FlowVerdict, direction: Direction) -> Flow {
    Flow {
        time: at(t),
        node: if direction == Direction::Egress { "node0" } else { "node1" }.into(),
        verdict,
        drop_reason: (verdict == FlowVerdict::Dropped).then(|| "policy_denied".into()),
        direction,
        protocol: Protocol::TCP,
        tcp_flags: Some("SYN".into()),
        source,
        destination,
        allowed_by: vec![],
        isolated_by: vec![],
        is_reply: false,
        service: None,
        kind: FlowKind::Packet,
        bytes: None,
    }
}

/// A simulated cluster's flow records, kept in time order for the engine.
#[derive(Default)]
struct Sim {
    flows: Vec<Flow>,
    next_port: u16,
}

impl Sim {
    fn port(&mut self) -> u16 {
        self.next_port = self.next_port.wrapping_add(1).max(1);
        30000 + self.next_port % 30000
    }

    /// A pod-to-pod connection: the opener's egress and, when forwarded, the receiver's
    /// ingress record (the same connection, reported by both nodes).
    fn connect(&mut self, t: i128, from: &Pod, to: &Pod, port: u16, verdict: FlowVerdict) {
        let (s, d) = (peer(from, self.port()), peer(to, port));
        self.flows.push(record(t, s.clone(), d.clone(), verdict, Direction::Egress));
        if verdict != FlowVerdict::Dropped {
            self.flows.push(record(t + SEC / 1000, s, d, verdict, Direction::Ingress));
        }
    }

    /// A connection to an outside address carrying `bytes` out: its first packet, an
    /// update with 60 % of the bytes after 1 s, its end after 2 s.
    fn upload(&mut self, t: i128, from: &Pod, to: [u8; 4], bytes: u64) {
        let (s, d) = (peer(from, self.port()), outside(to, 443));
        self.flows
            .push(record(t, s.clone(), d.clone(), FlowVerdict::Forwarded, Direction::Egress));
        for (dt, kind, share) in [(SEC, FlowKind::Update, 6), (2 * SEC, FlowKind::End, 10)] {
            let mut f = record(t + dt, s.clone(), d.clone(), FlowVerdict::Forwarded, Direction::Egress);
            f.kind = kind;
            f.tcp_flags = None;
            f.bytes = Some(FlowBytes {
                to_destination: bytes * share / 10,
                to_source: 300,
            });
            self.flows.push(f);
        }
    }

    /// Normal shop traffic for `secs` from `start`: `load` front-end requests a second to
    /// the api (spread over the front-end pods), the api to the database, and every 5 s
    /// each front-end pod's share of an upload to the known outside service.
    fn normal(&mut self, start: i128, secs: i64, load: u32, front: &[Pod], api: &[Pod], db: &Pod) {
        for s in 0..secs {
            let t = start + i128::from(s) * SEC;
            for i in 0..load {
                let f = &front[(s as usize + i as usize) % front.len()];
                let a = &api[(s as usize + i as usize) % api.len()];
                self.connect(t + i128::from(i) * SEC / 20, f, a, 8080, FlowVerdict::Forwarded);
            }
            self.connect(t + SEC / 2, &api[s as usize % api.len()], db, 5432, FlowVerdict::Forwarded);
            if s % 5 == 0 {
                let f = &front[(s / 5) as usize % front.len()];
                self.upload(t + SEC / 3, f, KNOWN_OUTSIDE, 1000 * u64::from(load));
            }
        }
    }

    /// Runs every record through `engine` in time order; the anomalies.
    fn run(&mut self, engine: &mut Engine) -> Vec<Anomaly> {
        self.flows.sort_by_key(|f| f.time);
        let mut out = Vec::new();
        for f in self.flows.drain(..) {
            out.extend(engine.observe(&f, f.time));
        }
        out
    }
}

struct Shop {
    front: Vec<Pod>,
    api: Vec<Pod>,
    db: Pod,
}

fn shop() -> Shop {
    Shop {
        front: vec![pod("shop", "frontend", "aaa", 10, 0)],
        api: vec![pod("shop", "api", "bbb", 20, 0)],
        db: pod("shop", "db", "ccc", 30, 0),
    }
}

/// An engine that has learnt the shop for the learning window and 5 minutes more.
fn learnt() -> (Engine, Shop, i128) {
    let shop = shop();
    let mut engine = Engine::new(Config { learning_secs: LEARN });
    let mut sim = Sim::default();
    let secs = LEARN as i64 + 300;
    sim.normal(T0, secs, 1, &shop.front, &shop.api, &shop.db);
    let anomalies = sim.run(&mut engine);
    assert_eq!(anomalies, vec![], "learning and the same traffic after raise nothing");
    (engine, shop, T0 + i128::from(secs) * SEC)
}

fn kinds(anomalies: &[Anomaly]) -> Vec<AnomalyKind> {
    let mut k: Vec<AnomalyKind> = anomalies.iter().map(|a| a.kind).collect();
    k.sort();
    k.dedup();
    k
}

#[test]
fn normal_variation_raises_nothing() {
    let (mut engine, shop, mut t) = learnt();
    let mut sim = Sim::default();
    // Load ×3.
    sim.normal(t, 300, 3, &shop.front, &shop.api, &shop.db);
    t += 300 * SEC;
    // Scale the front-end and the api 1 → 3 (new pods, names and addresses)…
    let front3: Vec<Pod> = (0..3).map(|i| pod("shop", "frontend", "aaa", 11 + i, 0)).collect();
    let api3: Vec<Pod> = (0..3).map(|i| pod("shop", "api", "bbb", 21 + i, 0)).collect();
    sim.normal(t, 300, 3, &front3, &api3, &shop.db);
    t += 300 * SEC;
    // …and back to 1, at the base load.
    sim.normal(t, 300, 1, &front3[2..], &api3[..1], &shop.db);
    t += 300 * SEC;
    // A rolling update: a new pod-template-hash, new names, another subnet.
    let front_new = vec![pod("shop", "frontend", "ddd", 40, 1), pod("shop", "frontend", "ddd", 41, 1)];
    let api_new = vec![pod("shop", "api", "eee", 50, 1)];
    sim.normal(
        t,
        60,
        2,
        &[shop.front[0].clone(), front_new[0].clone()],
        &[shop.api[0].clone(), api_new[0].clone()],
        &shop.db,
    );
    t += 60 * SEC;
    sim.normal(t, 300, 2, &front_new, &api_new, &shop.db);
    let anomalies = sim.run(&mut engine);
    assert_eq!(anomalies, vec![], "load changes, scaling and a rolling update");
    assert!(engine.stats().connections > 5000, "{:?}", engine.stats());
}

#[test]
fn each_connection_counts_once_though_both_nodes_report_it() {
    let shop = shop();
    let mut engine = Engine::new(Config { learning_secs: LEARN });
    let mut sim = Sim::default();
    for i in 0..10 {
        sim.connect(T0 + i * SEC, &shop.front[0], &shop.api[0], 8080, FlowVerdict::Forwarded);
    }
    assert_eq!(sim.flows.len(), 20, "egress and ingress records");
    sim.run(&mut engine);
    assert_eq!(engine.stats().connections, 10);
    assert_eq!(engine.stats().flows, 20);
}

/// Runs `attack` (given the time it starts) after learning; the anomalies and the start.
fn attack(build: impl FnOnce(&mut Sim, &Shop, i128)) -> Vec<Anomaly> {
    let (mut engine, shop, t) = learnt();
    let mut sim = Sim::default();
    // Normal traffic goes on around the attack.
    sim.normal(t, 60, 1, &shop.front, &shop.api, &shop.db);
    build(&mut sim, &shop, t + 20 * SEC);
    sim.run(&mut engine)
}

fn first(anomalies: &[Anomaly], kind: AnomalyKind) -> &Anomaly {
    anomalies
        .iter()
        .find(|a| a.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} in {anomalies:#?}"))
}

fn within_10s(a: &Anomaly, start: i128) {
    let delay = a.time.as_nanosecond() - start;
    assert!((0..=10 * SEC).contains(&delay), "{} after {} ms", a.kind, delay / 1_000_000);
}

#[test]
fn a_port_scan_is_a_scan_by_the_scanning_pod_within_10_s() {
    let start = T0 + (LEARN as i128 + 320) * SEC;
    let anomalies = attack(|sim, shop, t| {
        assert_eq!(t, start);
        // 20 probes a second over the namespace's pods and ports 1–100, mostly denied.
        let targets = [shop.api[0].clone(), shop.db.clone()];
        for i in 0..200u16 {
            let to = &targets[usize::from(i % 2)];
            let verdict = if i % 10 == 0 {
                FlowVerdict::Forwarded
            } else {
                FlowVerdict::Dropped
            };
            sim.connect(t + i128::from(i) * SEC / 20, &shop.front[0], to, 1 + i / 2, verdict);
        }
    });
    let scan = first(&anomalies, AnomalyKind::Scan);
    within_10s(scan, start);
    assert_eq!(scan.pod.as_ref().map(|p| p.to_string()).as_deref(), Some("shop/frontend-aaa-10"));
    assert_eq!((scan.namespace.as_str(), scan.workload.as_str()), ("shop", "frontend"));
    assert!(scan.score >= 1.0 && !scan.flows.is_empty(), "{scan:?}");
    assert!(scan.explanation.contains("denied"), "{}", scan.explanation);
    // The score grows as the scan goes on: it is reported again once it has doubled.
    let scores: Vec<f64> = anomalies.iter().filter(|a| a.kind == AnomalyKind::Scan).map(|a| a.score).collect();
    assert!(scores.len() >= 2 && scores.iter().any(|s| *s >= 2.0), "{scores:?}");
    assert!(scores.windows(2).all(|w| w[1] >= 2.0 * w[0]), "{scores:?}");
    assert!(!kinds(&anomalies).contains(&AnomalyKind::Exfiltration), "{anomalies:#?}");
}

#[test]
fn a_connection_to_a_workload_never_used_is_a_new_peer() {
    let start = T0 + (LEARN as i128 + 320) * SEC;
    let anomalies = attack(|sim, shop, t| sim.connect(t, &shop.front[0], &shop.db, 5432, FlowVerdict::Forwarded));
    assert_eq!(kinds(&anomalies), [AnomalyKind::NewPeer], "{anomalies:#?}");
    let a = first(&anomalies, AnomalyKind::NewPeer);
    within_10s(a, start);
    assert_eq!(a.workload, "frontend");
    assert_eq!(a.pod.as_ref().map(|p| p.to_string()).as_deref(), Some("shop/frontend-aaa-10"));
    assert!(a.explanation.contains("shop/db"), "{}", a.explanation);
    assert_eq!(a.flows.len(), 1);
}

#[test]
fn a_known_peer_on_a_new_port_is_a_new_port() {
    let anomalies = attack(|sim, shop, t| sim.connect(t, &shop.front[0], &shop.api[0], 9090, FlowVerdict::Forwarded));
    assert_eq!(kinds(&anomalies), [AnomalyKind::NewPort], "{anomalies:#?}");
    assert!(anomalies[0].explanation.contains("9090/TCP"), "{}", anomalies[0].explanation);
}

#[test]
fn an_upload_to_a_new_outside_address_is_a_new_external() {
    let start = T0 + (LEARN as i128 + 320) * SEC;
    let anomalies = attack(|sim, shop, t| sim.upload(t, &shop.front[0], [198, 51, 100, 9], 500));
    assert_eq!(kinds(&anomalies), [AnomalyKind::NewExternal], "{anomalies:#?}");
    let a = first(&anomalies, AnomalyKind::NewExternal);
    within_10s(a, start);
    assert!(a.explanation.contains("198.51.100.0/24"), "{}", a.explanation);
    // A neighbour of the known outside address is inside its learnt /24.
    let near = attack(|sim, shop, t| sim.upload(t, &shop.front[0], [203, 0, 113, 99], 500));
    assert_eq!(near, vec![]);
}

#[test]
fn twenty_times_the_bytes_to_a_known_outside_address_is_an_exfiltration_within_10_s() {
    let start = T0 + (LEARN as i128 + 320) * SEC;
    let anomalies = attack(|sim, shop, t| {
        // A slow, steady upload: one connection a second, 20× the normal byte rate
        // (normally 1000 bytes every 5 s).
        for s in 0..30 {
            sim.upload(t + s * SEC, &shop.front[0], KNOWN_OUTSIDE, 4000);
        }
    });
    assert_eq!(kinds(&anomalies), [AnomalyKind::Exfiltration], "{anomalies:#?}");
    let a = first(&anomalies, AnomalyKind::Exfiltration);
    within_10s(a, start);
    assert_eq!(a.pod.as_ref().map(|p| p.to_string()).as_deref(), Some("shop/frontend-aaa-10"));
    assert!(a.flows.iter().all(|f| f.bytes.is_some()), "{a:?}");
    // Three times the normal rate is not one.
    let three = attack(|sim, shop, t| {
        for s in 0..30 {
            if s % 5 == 0 {
                sim.upload(t + s * SEC, &shop.front[0], KNOWN_OUTSIDE, 2000);
            }
        }
    });
    assert_eq!(three, vec![]);
}

#[test]
fn decay_absorbs_a_gradual_change_but_not_the_same_change_at_once() {
    let (mut engine, shop, mut t) = learnt();
    let before = engine.baseline("shop", &shop.front[0].labels).unwrap().external_bytes.mean;
    let mut sim = Sim::default();
    // The upload grows 5 % a minute for an hour: about 18×.
    let mut bytes = 1000.0f64;
    for _ in 0..60 {
        for s in (0..60).step_by(5) {
            sim.upload(t + s * SEC, &shop.front[0], KNOWN_OUTSIDE, bytes as u64);
        }
        t += 60 * SEC;
        bytes *= 1.05;
    }
    let gradual = sim.run(&mut engine);
    assert_eq!(gradual, vec![], "a gradual change is absorbed");
    let after = engine.baseline("shop", &shop.front[0].labels).unwrap().external_bytes.mean;
    assert!(after > 8.0 * before, "learnt {before} → {after}");
    // The same final rate at once, on a freshly learnt engine, is an exfiltration.
    let sudden = attack(|sim, shop, t| {
        for s in (0..30).step_by(5) {
            sim.upload(t + s * SEC, &shop.front[0], KNOWN_OUTSIDE, bytes as u64);
        }
    });
    assert_eq!(kinds(&sudden), [AnomalyKind::Exfiltration]);
}

#[test]
fn a_new_peer_is_reported_once_per_period_and_joins_the_baseline_when_it_lasts() {
    let (mut engine, shop, t) = learnt();
    let mut sim = Sim::default();
    // Every 10 s for 12 minutes.
    for i in 0..72 {
        sim.connect(t + i * 10 * SEC, &shop.front[0], &shop.db, 5432, FlowVerdict::Forwarded);
    }
    let anomalies = sim.run(&mut engine);
    assert_eq!(kinds(&anomalies), [AnomalyKind::NewPeer]);
    assert_eq!(anomalies.len(), 1, "deduplicated: {anomalies:#?}");
    assert!(engine.stats().deduplicated >= 4, "{:?}", engine.stats());
    // Seen in 5 distinct minutes: now part of the baseline, never reported again.
    let b = engine.baseline("shop", &shop.front[0].labels).unwrap();
    assert!(b.egress.keys().any(|k| k.contains("app=db")) && b.egress.values().all(|p| p.seen.learnt));
}

#[test]
fn baselines_survive_a_restart_and_an_unreadable_file_is_an_error() {
    let (engine, shop, t) = learnt();
    let dir = std::env::temp_dir().join(format!("bulkhead-baseline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("baselines.json");
    let bytes = engine.save().unwrap();
    Engine::save_to(&bytes, &path).unwrap();
    let mut restored = Engine::load(&path, Config { learning_secs: LEARN }).unwrap();
    assert_eq!(restored.save().unwrap(), bytes, "the same baselines");
    // Not learning again: a new peer right away is one.
    let mut sim = Sim::default();
    sim.connect(t, &shop.front[0], &shop.db, 5432, FlowVerdict::Forwarded);
    assert_eq!(kinds(&sim.run(&mut restored)), [AnomalyKind::NewPeer]);
    // A missing file: learning from nothing.
    let fresh = Engine::load(&dir.join("missing.json"), Config::default()).unwrap();
    assert_eq!(fresh.workloads(at(t)), (0, 0));
    // Garbage, a future version, a directory: errors, never an empty baseline.
    std::fs::write(&path, b"{\"version\":1,\"workloads\":[{").unwrap();
    let e = Engine::load(&path, Config::default()).err().expect("garbage is an error");
    assert!(matches!(e, super::BaselineError::Parse { .. }), "{e}");
    assert!(e.to_string().contains("move it away"), "{e}");
    std::fs::write(&path, b"{\"version\":99,\"workloads\":[]}").unwrap();
    let e = Engine::load(&path, Config::default()).err().expect("another version is an error");
    assert!(matches!(e, super::BaselineError::Version { version: 99, .. }), "{e}");
    let e = Engine::load(&dir, Config::default()).err().expect("a directory is an error");
    assert!(matches!(e, super::BaselineError::Read { .. }), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn memory_is_bounded_under_a_flood_of_workloads_and_connections() {
    let mut engine = Engine::new(Config { learning_secs: 1 });
    let mut sim = Sim::default();
    let db = pod("shop", "db", "ccc", 30, 0);
    for i in 0..(super::MAX_WORKLOADS + 100) {
        let mut p = pod("flood", "x", "h", 1, 2);
        p.labels.insert("app".into(), format!("w{i}"));
        sim.connect(T0 + i as i128 * SEC / 100, &p, &db, 5432, FlowVerdict::Dropped);
    }
    sim.run(&mut engine);
    assert_eq!(engine.workloads(at(T0)).0, super::MAX_WORKLOADS);
    assert!(engine.stats().unattributed >= 100);
    assert!(engine.tracked_connections() <= super::MAX_CONNECTIONS);
}

#[test]
fn a_gone_pod_or_one_the_resolver_does_not_know_yet_is_not_an_outside_address() {
    let anomalies = attack(|sim, shop, t| {
        // The api pod was deleted: its address no longer names a pod.
        let mut gone = peer(&shop.api[0], 8080);
        (gone.namespace, gone.pod, gone.labels) = (None, None, BTreeMap::new());
        let f = record(t, peer(&shop.front[0], 41000), gone, FlowVerdict::Forwarded, Direction::Egress);
        sim.flows.push(f);
        // A new pod of the same subnet the front-end's node cannot name yet.
        let f = record(
            t + SEC,
            peer(&shop.front[0], 41001),
            outside([10, 1, 0, 77], 8080),
            FlowVerdict::Forwarded,
            Direction::Egress,
        );
        sim.flows.push(f);
    });
    assert_eq!(anomalies, vec![], "neither is new_external");
}

#[test]
fn a_probe_the_receiver_drops_weighs_as_denied_though_the_sender_forwarded_it() {
    let probes = |ingress_drops: bool| {
        attack(|sim, shop, t| {
            for i in 0..6u16 {
                let (s, d) = (peer(&shop.front[0], 45000 + i), peer(&shop.db, 1000 + i));
                let t = t + i128::from(i) * SEC / 10;
                sim.flows
                    .push(record(t, s.clone(), d.clone(), FlowVerdict::Forwarded, Direction::Egress));
                let verdict = if ingress_drops {
                    FlowVerdict::Dropped
                } else {
                    FlowVerdict::Forwarded
                };
                sim.flows.push(record(t + SEC / 1000, s, d, verdict, Direction::Ingress));
            }
        })
    };
    assert!(
        kinds(&probes(true)).contains(&AnomalyKind::Scan),
        "6 probes dropped at the receiver: {:#?}",
        probes(true)
    );
    assert!(
        !kinds(&probes(false)).contains(&AnomalyKind::Scan),
        "6 allowed connections are no scan"
    );
}

#[test]
fn what_goes_unseen_for_long_is_forgotten_candidates_first() {
    let (mut engine, shop, t) = learnt();
    let mut sim = Sim::default();
    sim.connect(t, &shop.front[0], &shop.db, 5432, FlowVerdict::Forwarded);
    sim.run(&mut engine);
    let egress = |e: &Engine| engine_peers(e, &shop);
    assert_eq!(egress(&engine), 3, "api, the outside /24 and the db candidate");
    assert_eq!(engine.prune(at(t + 3600 * SEC)), 0, "an hour is not long");
    // A day later the candidates go: the db and its port in the front-end's egress, the
    // front-end and the port in the db's ingress (the namespace shop is learnt: it stays).
    assert_eq!(engine.prune(at(t + 2 * 86_400 * SEC)), 4, "the candidates on both sides");
    assert_eq!(egress(&engine), 2);
    // Two months later everything learnt goes too: the workload learns again by promotion.
    assert!(engine.prune(at(t + 60 * 86_400 * SEC)) > 0);
    assert_eq!(egress(&engine), 0);
}

fn engine_peers(e: &Engine, shop: &Shop) -> usize {
    e.baseline("shop", &shop.front[0].labels).unwrap().egress.len()
}

/// An exfiltration names the pod whose bytes filled the sliding window: here the attacker's
/// bytes are in the bucket before, and another replica's small upload just after the
/// boundary is what takes the window over the threshold (naming the pod from the current
/// bucket alone named that replica).
#[test]
fn an_exfiltration_names_the_pod_whose_bytes_filled_the_window_across_a_bucket_boundary() {
    let (mut engine, shop, t) = learnt();
    let replica = pod("shop", "frontend", "aaa", 11, 0);
    let rate = engine.baseline("shop", &shop.front[0].labels).unwrap().external_bytes.clone();
    // Bytes in 10 s that reach the threshold.
    let full = rate.threshold(EXFIL_FACTOR, EXFIL_FLOOR) / 6.0;
    let boundary = (t / BUCKET_NS + 3) * BUCKET_NS;
    let mut sim = Sim::default();
    // The attacker: 90 % of a window, ending 2 s before the boundary (alone: no anomaly).
    sim.upload(boundary - 4 * SEC, &shop.front[0], KNOWN_OUTSIDE, (0.9 * full) as u64);
    // The replica: half a window just after it.
    sim.upload(boundary + SEC / 10, &replica, KNOWN_OUTSIDE, (0.5 * full) as u64);
    let anomalies = sim.run(&mut engine);
    assert_eq!(kinds(&anomalies), [AnomalyKind::Exfiltration], "{anomalies:#?}");
    let named: Vec<String> = anomalies.iter().filter_map(|a| a.pod.as_ref().map(ToString::to_string)).collect();
    assert_eq!(named, ["shop/frontend-aaa-10"], "{anomalies:#?}");
}
