//! The flow reader's path allocates nothing per record: once the history is full and every
//! policy has been counted once, recording a batch of ring-buffer events (naming them,
//! counting them, metrics, storing and broadcasting them) makes no heap allocation.
//!
//! Its own test binary, because it counts allocations with a global allocator (only those
//! made on the test's thread while it measures).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::Ipv4Addr;
use std::sync::Arc;

use bulkhead::flows::{Clock, FlowStore, Resolver};
use bulkhead::metrics::Metrics;
use bulkhead::model::{parse_documents, Cluster};
use bulkhead::policy::{Compiler, LocalEndpoint};
use bulkhead_api::ObserveRequest;
use bulkhead_common::{direction, proto, rule_id, verdict, DropReason, FlowEvent};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    // try_with: the thread's locals may already be gone while it exits.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|on| on.set(true));
    f();
    COUNTING.with(|on| on.set(false));
    ALLOCATIONS.with(Cell::get)
}

const MODEL: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a, tier: web}}
status: {podIP: 10.9.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
status: {podIP: 10.9.0.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
";

const A: [u8; 4] = [10, 9, 0, 1];
const B: [u8; 4] = [10, 9, 0, 2];

fn event(n: u64, from: [u8; 4], to: [u8; 4], dir: u8, v: u8, reason: DropReason, rule: u32) -> FlowEvent {
    FlowEvent {
        timestamp_ns: 1_000 + n,
        endpoint_id: 1,
        identity: 300,
        remote_identity: 301,
        rule_id: rule,
        saddr: from,
        daddr: to,
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
}

#[test]
fn recording_a_batch_allocates_nothing_once_warm() {
    let cluster = Cluster::from_objects(parse_documents(MODEL, "test").unwrap());
    let locals = [LocalEndpoint {
        endpoint_id: 1,
        host_ifindex: 11,
        namespace: "x".into(),
        pod: "a".into(),
        ipv4: Ipv4Addr::from(A),
        mac: [2, 0, 0, 0, 0, 1],
    }];
    let mut compiler = Compiler::new();
    compiler.compile(&cluster, &locals);
    let (allow, _) = compiler
        .rules()
        .iter()
        .find(|(_, r)| r.policy == "allow-b")
        .expect("allow-b has a rule");
    let metrics = Arc::new(Metrics::new().unwrap());
    let store = FlowStore::new("node0", 64, Clock::with_offset(0)).with_metrics(metrics);
    store.set_resolver(Resolver::build("node0", &cluster, compiler.rules(), &locals));
    // Allowed by a rule, a default-deny drop (names the isolating policy), egress to a
    // non-pod, and one with an unknown verdict (skipped, counted).
    let batch = |round: u64| {
        (0..32)
            .map(|i| {
                let n = round * 32 + i;
                match i % 4 {
                    0 => event(n, B, A, direction::INGRESS, verdict::FORWARDED, DropReason::Forwarded, allow),
                    1 => event(
                        n,
                        B,
                        A,
                        direction::EGRESS,
                        verdict::DROPPED,
                        DropReason::PolicyDenied,
                        rule_id::NONE,
                    ),
                    2 => event(
                        n,
                        A,
                        [192, 0, 2, 1],
                        direction::EGRESS,
                        verdict::DROPPED,
                        DropReason::PolicyDenied,
                        rule_id::NONE,
                    ),
                    _ => event(n, A, B, direction::EGRESS, 77, DropReason::Forwarded, rule_id::NONE),
                }
            })
            .collect::<Vec<_>>()
    };
    // Warm: the history full, every label and policy counted once.
    for round in 0..4 {
        store.record(&batch(round));
    }
    let events = batch(4);
    let made = allocations(|| store.record(&events));
    assert_eq!(made, 0, "recording 32 events allocated {made} times");

    // The records are all there, named as before.
    let stats = store.stats();
    assert_eq!(stats.undecodable, 5 * 8);
    assert_eq!(stats.stored, 64);
    let flows = store.snapshot(&ObserveRequest::default());
    let last = flows.last().expect("flows stored");
    assert_eq!(last.source.pod.as_deref(), Some("a"));
    assert_eq!(last.destination.labels.get("reserved:world"), None, "identity 301 is not reserved");
    let allowed = flows.iter().rev().find(|f| !f.allowed_by.is_empty()).expect("an allowed flow");
    assert_eq!(allowed.allowed_by[0].policy.to_string(), "x/allow-b");
    assert_eq!(allowed.source.labels.get("pod").map(String::as_str), Some("b"));
    let denied = flows.iter().rev().find(|f| !f.isolated_by.is_empty()).expect("a default-deny drop");
    assert_eq!(denied.isolated_by[0].to_string(), "x/deny");
}
