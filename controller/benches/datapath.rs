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
use bulkhead::model::{parse_documents, Cluster};
use bulkhead::policy::{Compiler, DatapathState, LocalEndpoint};
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
    ring: RingBuf<MapData>,
    pin_dir: PathBuf,
    entries: usize,
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
    let mut dp = Datapath::load(&pin_dir).expect("load datapath (needs root and BPF)");
    let local = [LocalEndpoint {
        endpoint_id: 1,
        host_ifindex: 1,
        namespace: "bench".into(),
        pod: "server".into(),
        ipv4: SERVER,
        mac: SERVER_MAC,
    }];
    let started = Instant::now();
    let state = Compiler::new().compile(&cluster(policies), &local);
    bulkhead::maps::sync(&mut dp.maps, &DatapathState::default(), &state).expect("program maps");
    eprintln!(
        "{policies} policies: {} policy entries, compiled and written in {:?}",
        state.policy.len(),
        started.elapsed()
    );
    let ring = dp.take_flow_ring().expect("flow ring");
    Fixture {
        dp,
        ring,
        pin_dir,
        entries: state.policy.len(),
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
        while f.ring.next().is_some() {}
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
    print!("{out}");
    if let Ok(path) = std::env::var("BULKHEAD_BENCH_REPORT") {
        std::fs::write(&path, &out).expect("write report");
        eprintln!("report written to {path}");
    }
}
