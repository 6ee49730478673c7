//! Per-packet cost of the datapath, measured with `BPF_PROG_TEST_RUN` on the real programs
//! and maps, reported as ratios against baselines measured in the same run (this machine
//! is noisy: absolute nanoseconds mean little, ratios do).
//!
//! The policy maps are filled by the real compiler from generated NetworkPolicies, so the
//! question answered is the one users ask: does a packet get slower as policies pile up?
//! Run with `bash scripts/bench.sh` (root; it writes `bench/datapath.md`).
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "a benchmark aborts on setup errors")]

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Instant;

use aya::maps::{MapData, RingBuf};
use aya::programs::{TestRun, TestRunOptions};
use bulkhead::datapath::Datapath;
use bulkhead::datapath::DatapathState;
use bulkhead::model::{parse_documents, Cluster};
use bulkhead::policy::{Compiler, LocalEndpoint};
use bulkhead_common::{program_names, proto};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
/// Peers carry one of this many label values, so 10,000 policies mean 10,000 distinct
/// (identity, port) entries without 10,000 pods.
const PEERS: usize = 100;
/// Packets per kernel call; below the ring's capacity so new-flow records never hit a full ring.
const REPEAT: u32 = 20_000;
/// Kernel calls per measurement; the median is reported.
const ROUNDS: usize = 15;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn peer_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, 1, i as u8 + 1)
}

/// Namespace `bench`, pod `server`, `PEERS` peer pods, and `policies` NetworkPolicies, each
/// allowing one peer label value to one port of the server.
fn cluster(policies: usize) -> Cluster {
    let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n");
    y.push_str("---\napiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: bench, labels: {app: server}}\n");
    writeln!(y, "spec: {{containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: {SERVER}}}").unwrap();
    for i in 0..PEERS {
        writeln!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: peer-{i}, namespace: bench, labels: {{peer: p{i}}}}}\n\
             spec: {{containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: {}}}",
            peer_ip(i)
        )
        .unwrap();
    }
    for i in 0..policies {
        writeln!(
            y,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-{i}, namespace: bench}}\n\
             spec: {{podSelector: {{matchLabels: {{app: server}}}}, ingress: [{{from: [{{podSelector: {{matchLabels: \
             {{peer: p{}}}}}}}], ports: [{{protocol: TCP, port: {}}}]}}]}}",
            i % PEERS,
            port(i)
        )
        .unwrap();
    }
    Cluster::from_objects(parse_documents(&y, "bench").expect("generated manifests parse"))
}

fn port(i: usize) -> u16 {
    1000 + i as u16
}

struct Fixture {
    dp: Datapath,
    ring: Option<RingBuf<MapData>>,
    pin_dir: PathBuf,
    entries: usize,
    cluster: Cluster,
    compiler: Compiler,
    local: Vec<LocalEndpoint>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// The datapath with `policies` compiled policies; the server is the endpoint on `lo`
/// (ifindex 1), where test runs put their packets.
fn fixture(policies: usize) -> Fixture {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bulkhead-bench-{}-{policies}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let mut dp = Datapath::load(&pin_dir).unwrap_or_else(|e| {
        // Some maps may be pinned already: leave nothing behind.
        let _ = std::fs::remove_dir_all(&pin_dir);
        panic!("load datapath (needs root and BPF): {e:?}")
    });
    let local = vec![LocalEndpoint {
        endpoint_id: 1,
        host_ifindex: 1,
        namespace: "bench".into(),
        pod: "server".into(),
        ipv4: SERVER,
        mac: SERVER_MAC,
    }];
    let started = Instant::now();
    let cluster = cluster(policies);
    let mut compiler = Compiler::new();
    let state = compiler.compile(&cluster, &local);
    bulkhead::datapath::sync::sync(&mut dp.maps, &DatapathState::default(), &state).expect("program maps");
    eprintln!(
        "{policies} policies: {} policy entries, compiled and written in {:?}",
        state.policy.len(),
        started.elapsed()
    );
    let ring = dp.take_flow_ring().expect("flow ring");
    Fixture {
        dp,
        ring: Some(ring),
        pin_dir,
        entries: state.policy.len(),
        cluster,
        compiler,
        local,
    }
}

/// A TCP segment from a peer to the server.
fn segment(peer: usize, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&SERVER_MAC);
    p.extend_from_slice(&HOST_MAC);
    p.extend_from_slice(&[0x08, 0x00]);
    p.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0, 0, 64, proto::TCP, 0, 0]);
    p.extend_from_slice(&peer_ip(peer).octets());
    p.extend_from_slice(&SERVER.octets());
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0; 8]);
    p.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p.resize(60, 0);
    p
}

/// Median nanoseconds per packet of `to_pod` on `packet`; drains the flow ring between rounds.
fn measure(f: &mut Fixture, packet: &[u8], expect: i32) -> f64 {
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let prog = f.dp.program(program_names::TO_POD).unwrap();
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                repeat: REPEAT,
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(r.return_value as i32, expect, "verdict");
        samples.push(r.duration.as_nanos() as f64);
        if let Some(ring) = f.ring.as_mut() {
            while ring.next().is_some() {}
        }
    }
    samples.sort_by(f64::total_cmp);
    samples[ROUNDS / 2]
}

struct Row {
    policies: usize,
    entries: usize,
    syn: f64,
    established: f64,
    denied: f64,
}

fn row(policies: usize) -> Row {
    let mut f = fixture(policies);
    // The allowed flow: the last policy's peer and port (0 policies: not isolated, any port).
    let (peer, dport) = if policies == 0 {
        (0, port(0))
    } else {
        ((policies - 1) % PEERS, port(policies - 1))
    };
    // A pure SYN is always a new connection: endpoint, parse, ipcache, policy, conntrack
    // insert and a flow record, every time.
    let syn = measure(&mut f, &segment(peer, dport, SYN), 0);
    // An ACK of the same tuple is an established packet: one conntrack lookup.
    let established = measure(&mut f, &segment(peer, dport, ACK), 0);
    // A denied SYN (a port nobody allows) exercises both policy lookups and a drop record.
    let denied = if policies == 0 {
        f64::NAN
    } else {
        measure(&mut f, &segment(peer, 9, SYN), 2)
    };
    assert_eq!(f.dp.flows_lost().unwrap(), 0, "the ring was drained between rounds");
    Row {
        policies,
        entries: f.entries,
        syn,
        established,
        denied,
    }
}

/// One step of the flow-record rate test.
struct RateStep {
    target: u64,
    achieved: f64,
    sent: u64,
    recorded: u64,
    lost: u64,
}

/// Flow records per second the agent's own reader (`flows::spawn_reader` into a `FlowStore`
/// with name resolution and metrics, as in `bulkhead agent`) keeps up with: the datapath
/// emits one drop record per denied SYN, paced in 1 ms batches at rising target rates; a
/// step counts records the ring could not take (the pinned lost counter) and records read.
fn flow_rate() -> Vec<RateStep> {
    use bulkhead::flows::{self, Clock, FlowStore, Resolver};
    let mut f = fixture(10);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let metrics = std::sync::Arc::new(bulkhead::metrics::Metrics::new().expect("metrics"));
    let store = std::sync::Arc::new(FlowStore::new("bench", flows::DEFAULT_HISTORY, Clock::now()).with_metrics(metrics));
    store.set_resolver(Resolver::build("bench", &f.cluster, f.compiler.rules(), &f.local));
    let ring = f.ring.take().expect("ring");
    let reader = {
        let _entered = runtime.enter();
        flows::spawn_reader(ring, store.clone()).expect("start the flow reader")
    };
    let recorded = |s: &FlowStore| -> u64 { s.stats().flows.values().sum() };
    let denied = segment(0, 9, SYN);
    let mut steps = Vec::new();
    for target in [50_000u64, 100_000, 200_000, 400_000, 800_000, 1_600_000] {
        let (lost0, recorded0) = (f.dp.flows_lost().unwrap(), recorded(&store));
        let started = Instant::now();
        let window = std::time::Duration::from_secs(2);
        let mut sent = 0u64;
        while started.elapsed() < window {
            let due = (target as f64 * started.elapsed().as_secs_f64()) as u64;
            if due <= sent {
                std::thread::sleep(std::time::Duration::from_micros(200));
                continue;
            }
            let n = (due - sent).min(10_000) as u32;
            let prog = f.dp.program(program_names::TO_POD).unwrap();
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(&denied),
                    repeat: n,
                    ..TestRunOptions::default()
                })
                .expect("BPF_PROG_TEST_RUN");
            assert_eq!(r.return_value, 2, "denied");
            sent += u64::from(n);
        }
        let elapsed = started.elapsed().as_secs_f64();
        // Let the reader finish what is in the ring before counting.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let lost = loop {
            let lost = f.dp.flows_lost().unwrap() - lost0;
            if recorded(&store) - recorded0 + lost >= sent || Instant::now() > deadline {
                break lost;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let step = RateStep {
            target,
            achieved: sent as f64 / elapsed,
            sent,
            recorded: recorded(&store) - recorded0,
            lost,
        };
        eprintln!(
            "flow records: target {}/s, achieved {:.0}/s, sent {}, recorded {}, lost {}",
            step.target, step.achieved, step.sent, step.recorded, step.lost
        );
        let stop = step.lost > 0;
        steps.push(step);
        if stop {
            break;
        }
    }
    reader.abort();
    steps
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let rows: Vec<Row> = [0, 10, 1_000, 10_000].into_iter().map(row).collect();
    let base = &rows[1];
    let unenforced = &rows[0];
    let mut out = String::new();
    writeln!(out, "# Datapath per-packet cost\n").unwrap();
    writeln!(
        out,
        "`bash scripts/bench.sh` — `BPF_PROG_TEST_RUN` of `to_pod` (pod ingress), {REPEAT} packets per call, median of \
         {ROUNDS} calls, ns per packet. Ratios are against the 10-policy row and the unenforced row of the same run.\n"
    )
    .unwrap();
    writeln!(
        out,
        "| policies | policy entries | new flow (SYN) ns | established ns | denied SYN ns | SYN vs 10 policies | established vs 10 policies | SYN vs unenforced |"
    )
    .unwrap();
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    for r in &rows {
        writeln!(
            out,
            "| {} | {} | {:.0} | {:.0} | {} | {:.2} | {:.2} | {:.2} |",
            r.policies,
            r.entries,
            r.syn,
            r.established,
            if r.denied.is_nan() {
                "-".to_string()
            } else {
                format!("{:.0}", r.denied)
            },
            r.syn / base.syn,
            r.established / base.established,
            r.syn / unenforced.syn,
        )
        .unwrap();
    }
    let steps = flow_rate();
    writeln!(
        out,
        "\n# Flow records the agent keeps up with\n\nThe agent's own reader (`flows::spawn_reader` into a `FlowStore` with name \
         resolution and metrics) on one tokio worker, while `BPF_PROG_TEST_RUN` makes the datapath emit one drop record per \
         denied SYN, paced in 1 ms batches for 2 s per step; the ring holds {} records. `lost` is the datapath's pinned \
         lost-records counter.\n",
        bulkhead_common::capacity::FLOW_RING_BYTES as usize / (std::mem::size_of::<bulkhead_common::FlowEvent>() + 8)
    )
    .unwrap();
    writeln!(out, "| target records/s | achieved records/s | sent | recorded | lost |").unwrap();
    writeln!(out, "|---:|---:|---:|---:|---:|").unwrap();
    for s in &steps {
        writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} |",
            s.target, s.achieved, s.sent, s.recorded, s.lost
        )
        .unwrap();
    }
    let clean = steps.iter().filter(|s| s.lost == 0).map(|s| s.achieved).fold(0.0, f64::max);
    writeln!(out, "\nHighest rate with no lost record in this run: {clean:.0} records/s.").unwrap();
    print!("{out}");
    if let Ok(path) = std::env::var("BULKHEAD_BENCH_REPORT") {
        std::fs::write(&path, &out).expect("write report");
        eprintln!("report written to {path}");
    }
}
