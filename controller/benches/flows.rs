//! The agent's cost per flow record: what the ring-buffer reader's task spends naming,
//! counting and storing one record (`FlowStore::record`), against naming it into a full
//! `Flow` (`Resolver::resolve`, what a reader of the history pays per record it reads).
//! Both run in the same process on the same events; ratios are what to compare.
//! Run with `cargo bench -p bulkhead --bench flows` (no root needed).
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "a benchmark aborts on setup errors")]

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Instant;

use bulkhead::flows::{Clock, FlowStore, Resolver};
use bulkhead::model::{parse_documents, Cluster};
use bulkhead::policy::{Compiler, LocalEndpoint};
use bulkhead_common::{direction, proto, rule_id, verdict, DropReason, FlowEvent};

/// Pods in the cluster; the first `LOCAL` are on this node.
const PODS: usize = 200;
const LOCAL: usize = 20;
/// Events per `record` call, as the reader drains them.
const BATCH: usize = 1024;
/// Batches per measurement; the median of `ROUNDS` measurements is reported.
const BATCHES: usize = 50;
const ROUNDS: usize = 9;

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, (i / 250) as u8, (i % 250) as u8 + 1)
}

/// `PODS` pods with three labels each; a default-deny in both directions and an allow rule
/// from every `client` to every `server` on port 80.
fn cluster() -> Cluster {
    let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n");
    for i in 0..PODS {
        let role = if i % 2 == 0 { "server" } else { "client" };
        writeln!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: b, labels: \
             {{app: app-{i}, role: {role}, tier: backend}}}}\nspec: {{containers: [{{name: c, image: x}}]}}\n\
             status: {{podIP: {}}}",
            pod_ip(i)
        )
        .unwrap();
    }
    y.push_str(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: b}\n\
         spec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n\
         ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow, namespace: b}\n\
         spec: {podSelector: {matchLabels: {role: server}}, ingress: [{from: [{podSelector: {matchLabels: \
         {role: client}}}], ports: [{protocol: TCP, port: 80}]}]}\n",
    );
    Cluster::from_objects(parse_documents(&y, "bench").expect("generated manifests parse"))
}

fn locals() -> Vec<LocalEndpoint> {
    (0..LOCAL)
        .map(|i| LocalEndpoint {
            endpoint_id: i as u32 + 1,
            host_ifindex: i as u32 + 100,
            namespace: "b".into(),
            pod: format!("pod-{i}"),
            ipv4: pod_ip(i),
            mac: [2, 0, 0, 0, 0, i as u8],
        })
        .collect()
}

/// A mix of what a busy node reports: allowed new flows into local servers, default-deny
/// drops, and egress to addresses outside the cluster.
fn events(allow_id: u32) -> Vec<FlowEvent> {
    (0..BATCH)
        .map(|n| {
            let local = n % LOCAL;
            let peer = LOCAL + n % (PODS - LOCAL);
            let (saddr, daddr, dir, v, reason, rule) = match n % 4 {
                0 | 1 => (
                    pod_ip(peer),
                    pod_ip(local),
                    direction::INGRESS,
                    verdict::FORWARDED,
                    DropReason::Forwarded,
                    allow_id,
                ),
                2 => (
                    pod_ip(peer),
                    pod_ip(local),
                    direction::INGRESS,
                    verdict::DROPPED,
                    DropReason::PolicyDenied,
                    rule_id::NONE,
                ),
                _ => (
                    pod_ip(local),
                    Ipv4Addr::new(192, 0, 2, 1),
                    direction::EGRESS,
                    verdict::DROPPED,
                    DropReason::PolicyDenied,
                    rule_id::NONE,
                ),
            };
            FlowEvent {
                timestamp_ns: 1_000_000_000 + n as u64,
                endpoint_id: local as u32 + 1,
                identity: 300,
                remote_identity: 301,
                rule_id: rule,
                saddr: saddr.octets(),
                daddr: daddr.octets(),
                sport: (40000 + n as u16).to_be_bytes(),
                dport: 80u16.to_be_bytes(),
                packet_len: 60,
                protocol: proto::TCP,
                direction: dir,
                verdict: v,
                reason: reason as u8,
                tcp_flags: 0x02,
                ..FlowEvent::default()
            }
        })
        .collect()
}

/// The median over `ROUNDS` of `f`'s time per event, in microseconds.
fn median_us(mut f: impl FnMut()) -> f64 {
    f();
    let mut samples: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..BATCHES {
                f();
            }
            start.elapsed().as_secs_f64() * 1e6 / (BATCHES * BATCH) as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[ROUNDS / 2]
}

fn main() {
    let cluster = cluster();
    let mut compiler = Compiler::new();
    compiler.compile(&cluster, &locals());
    let (allow_id, _) = compiler
        .rules()
        .iter()
        .find(|(_, r)| r.policy == "allow")
        .expect("allow has a rule");
    let resolver = Resolver::build("node0", &cluster, compiler.rules(), &locals());
    let events = events(allow_id);
    let clock = Clock::with_offset(1_700_000_000_000_000_000);

    let store = FlowStore::new("node0", bulkhead::flows::DEFAULT_HISTORY, clock);
    store.set_resolver(resolver.clone());
    let record = median_us(|| store.record(&events));
    let resolve = median_us(|| {
        for ev in &events {
            std::hint::black_box(resolver.resolve(ev, clock.unix_ns(ev.timestamp_ns)));
        }
    });
    println!("flow records: {PODS} pods ({LOCAL} local), batches of {BATCH}, median of {ROUNDS} x {BATCHES} batches");
    println!("  FlowStore::record (the reader's cost)    {record:8.3} us/record");
    println!("  Resolver::resolve (a full Flow)          {resolve:8.3} us/record");
    println!("  record / resolve                         {:8.3}", record / resolve);
}
