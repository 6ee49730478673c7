//! Forensic store tests: bounds and eviction, reload after a restart, torn and corrupt
//! files, write failures and retries, quarantine appends, and merging with the history.

use std::sync::Arc;

use bulkhead_api::{
    Direction, Flow, FlowFilter, FlowPeer, FlowVerdict, ForensicsBundle, NamespacedName, ObserveRequest, Protocol, QuarantineInfo,
};

use super::*;
use crate::flows::{Clock, FlowStore};

/// A unique directory removed when dropped (also when a test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("bh-forensics-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pod(name: &str) -> NamespacedName {
    NamespacedName::new("x", name)
}

fn peer(name: &str, port: u16) -> FlowPeer {
    FlowPeer {
        namespace: Some("x".into()),
        pod: Some(name.into()),
        labels: Default::default(),
        ip: [10, 9, 0, 1].into(),
        port,
        identity: 256,
        services: vec![],
    }
}

/// Flow `n` from `from` to `to`, at second `n`.
fn flow(from: &str, to: &str, n: u16) -> Flow {
    Flow {
        time: jiff::Timestamp::from_second(1_800_000_000 + i64::from(n)).unwrap(),
        node: "n0".into(),
        verdict: FlowVerdict::Forwarded,
        drop_reason: None,
        direction: Direction::Egress,
        protocol: Protocol::TCP,
        tcp_flags: None,
        source: peer(from, n),
        destination: peer(to, 80),
        allowed_by: vec![],
        isolated_by: vec![],
        is_reply: false,
        service: None,
        kind: Default::default(),
        bytes: None,
    }
}

fn kept(from: &str, to: &str, n: u16) -> KeptFlow {
    KeptFlow {
        epoch: 7,
        seq: u64::from(n),
        flow: flow(from, to, n),
    }
}

fn record(name: &str) -> ForensicsBundle {
    ForensicsBundle {
        pod: pod(name),
        labels: [("app".to_string(), name.to_string())].into(),
        ip: Some([10, 9, 0, 1].into()),
        node: Some("n0".into()),
        deleted: Some(jiff::Timestamp::from_second(1_800_000_100).unwrap()),
        quarantine: None,
        policies: vec![NamespacedName::new("x", "deny")],
        flows: vec![],
        anomalies: vec![],
    }
}

fn ports(flows: &[KeptFlow]) -> Vec<u16> {
    flows.iter().map(|f| f.flow.source.port).collect()
}

fn limits(records_per_pod: usize, pods: usize, bytes: u64) -> Limits {
    Limits {
        records_per_pod,
        pods,
        bytes,
    }
}

#[test]
fn a_pod_keeps_its_newest_flows_and_the_oldest_pod_is_evicted_first() {
    let dir = TempDir::new("bounds");
    let store = ForensicStore::open(&dir.0, limits(3, 2, 1 << 20), None).unwrap();
    let flows: Vec<KeptFlow> = (1..=5).rev().map(|n| kept("a", "z", n)).collect();
    store.save_deleted(record("a"), flows).unwrap();
    let (rec, got) = store.read(&pod("a")).unwrap().unwrap();
    assert_eq!(ports(&got), vec![3, 4, 5], "the newest three, oldest first");
    assert_eq!(rec.labels.get("app").map(String::as_str), Some("a"));
    assert!(rec.flows.is_empty(), "the record line holds no flows");
    // Saved again (a new incarnation deleted): merged, each sequence number once.
    store.save_deleted(record("a"), vec![kept("a", "z", 5), kept("a", "z", 6)]).unwrap();
    assert_eq!(ports(&store.read(&pod("a")).unwrap().unwrap().1), vec![4, 5, 6]);
    std::thread::sleep(Duration::from_millis(2));
    store.save_deleted(record("b"), vec![kept("b", "z", 1)]).unwrap();
    std::thread::sleep(Duration::from_millis(2));
    store.save_deleted(record("c"), vec![kept("c", "z", 1)]).unwrap();
    let stats = store.stats();
    assert_eq!((stats.pods, stats.evicted), (2, 1));
    assert!(store.read(&pod("a")).unwrap().is_none(), "the least recently written pod went");
    assert!(!dir.0.join(file_name(&pod("a"))).exists());
    assert!(store.read(&pod("b")).unwrap().is_some());
    // The byte bound: one pod's file alone fills it, so every other pod goes.
    let one = std::fs::metadata(dir.0.join(file_name(&pod("c")))).unwrap().len();
    drop(store);
    let store = ForensicStore::open(&dir.0, limits(3, 10, one + 10), None).unwrap();
    assert_eq!(store.stats().pods, 1, "evicted down to the byte bound at open");
    assert!(store.stats().bytes <= one + 10);
}

use std::time::Duration;

#[test]
fn kept_flows_survive_a_restart_and_a_torn_last_line_is_skipped() {
    let dir = TempDir::new("reload");
    let store = ForensicStore::open(&dir.0, Limits::default(), None).unwrap();
    store.save_deleted(record("a"), vec![kept("a", "z", 1), kept("z", "a", 2)]).unwrap();
    drop(store);
    let store = ForensicStore::open(&dir.0, Limits::default(), None).unwrap();
    let (rec, flows) = store.read(&pod("a")).unwrap().unwrap();
    assert_eq!(rec, record("a"));
    assert_eq!(ports(&flows), vec![1, 2]);
    drop(store);
    // A kill mid-append leaves a line without its newline.
    let path = dir.0.join(file_name(&pod("a")));
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(br#"{"epoch":7,"seq":3,"flow":{"ti"#).unwrap();
    drop(f);
    let store = ForensicStore::open(&dir.0, Limits::default(), None).unwrap();
    assert_eq!(store.stats().torn, 1);
    assert_eq!(ports(&store.read(&pod("a")).unwrap().unwrap().1), vec![1, 2]);
    assert!(store.stats().errors.is_empty(), "{:?}", store.stats().errors);
    // Files that are not ours, and write_atomic's temporaries, are left alone.
    std::fs::write(dir.0.join("README"), b"x").unwrap();
    std::fs::write(dir.0.join(".x_a.jsonl.123.tmp"), b"x").unwrap();
    assert_eq!(ForensicStore::open(&dir.0, Limits::default(), None).unwrap().pods(), vec![pod("a")]);
}

#[test]
fn a_corrupt_file_is_an_error_counted_never_an_empty_answer() {
    let dir = TempDir::new("corrupt");
    let metrics = Arc::new(crate::metrics::Metrics::new().unwrap());
    let store = ForensicStore::open(&dir.0, Limits::default(), Some(metrics.clone())).unwrap();
    store.save_deleted(record("a"), vec![kept("a", "z", 1)]).unwrap();
    drop(store);
    let path = dir.0.join(file_name(&pod("a")));
    let mut text = std::fs::read(&path).unwrap();
    text.extend_from_slice(b"not json\n");
    text.extend_from_slice(b"{\"epoch\":7,\"seq\":9,\"flow\":null}\n");
    std::fs::write(&path, &text).unwrap();
    let store = ForensicStore::open(&dir.0, Limits::default(), Some(metrics.clone())).unwrap();
    assert_eq!(store.stats().errors.get("corrupt"), Some(&1));
    let err = store.read(&pod("a")).unwrap_err();
    assert!(matches!(err, ForensicsError::Unreadable { .. }), "{err}");
    assert!(err.to_string().contains("line 3"), "{err}");
    let filter = FlowFilter {
        pod: Some(pod("a")),
        ..FlowFilter::default()
    };
    assert!(
        store.flows_for(&filter).is_err(),
        "observe --pod refuses rather than answer nothing"
    );
    assert_eq!(store.stats().errors.get("read"), Some(&2));
    let exposed = metrics.encode().unwrap();
    assert!(exposed.contains("bulkhead_forensics_errors_total{op=\"corrupt\"} 1"), "{exposed}");
    assert!(exposed.contains("bulkhead_forensics_pods 1"), "{exposed}");
    // The file stays on disk as it was until the pod's record is written anew.
    assert_eq!(std::fs::read(&path).unwrap(), text);
    store.save_deleted(record("a"), vec![kept("a", "z", 4)]).unwrap();
    assert_eq!(ports(&store.read(&pod("a")).unwrap().unwrap().1), vec![4]);
    // A file holding another pod's record is not taken for this one.
    std::fs::copy(&path, dir.0.join(file_name(&pod("b")))).unwrap();
    let store = ForensicStore::open(&dir.0, Limits::default(), None).unwrap();
    assert!(store.read(&pod("b")).unwrap_err().to_string().contains("holds the record of x/a"));
}

#[test]
fn a_failed_write_is_counted_kept_answered_and_retried() {
    let dir = TempDir::new("retry");
    let store = ForensicStore::open(&dir.0, Limits::default(), None).unwrap();
    // The directory replaced by a file: every write fails.
    std::fs::remove_dir_all(&dir.0).unwrap();
    std::fs::write(&dir.0, b"in the way").unwrap();
    assert!(store.save_deleted(record("a"), vec![kept("a", "z", 1)]).is_err());
    let stats = store.stats();
    assert_eq!((stats.pending, stats.errors.get("write")), (1, Some(&1)));
    assert_eq!(ports(&store.read(&pod("a")).unwrap().unwrap().1), vec![1], "answered while waiting");
    assert_eq!(store.retry(), 1, "still failing");
    std::fs::remove_file(&dir.0).unwrap();
    std::fs::create_dir_all(&dir.0).unwrap();
    assert_eq!(store.retry(), 0);
    drop(store);
    let store = ForensicStore::open(&dir.0, Limits::default(), None).unwrap();
    assert_eq!(ports(&store.read(&pod("a")).unwrap().unwrap().1), vec![1]);
}

#[test]
fn a_quarantined_pods_flows_are_appended_as_they_arrive_until_released() {
    let dir = TempDir::new("keep");
    let store = ForensicStore::open(&dir.0, limits(4, 10, 1 << 20), None).unwrap();
    assert!(!store.watching());
    let q = QuarantineInfo {
        since: jiff::Timestamp::from_second(1_800_000_000).unwrap(),
        reason: "scan".into(),
        by: "command".into(),
    };
    let mut live = record("a");
    live.deleted = None;
    store.keep(live, q.clone(), vec![kept("a", "z", 1)]).unwrap();
    assert!(store.watching());
    store.append(&[kept("a", "z", 2), kept("b", "z", 3), kept("z", "a", 4)]);
    store.append(&[kept("a", "z", 2)]);
    let (rec, flows) = store.read(&pod("a")).unwrap().unwrap();
    assert_eq!(rec.quarantine, Some(q.clone()));
    assert_eq!(ports(&flows), vec![1, 2, 4], "only its own flows, each once");
    assert!(store.read(&pod("b")).unwrap().is_none());
    // Past the limit the file is compacted to the newest flows.
    for n in 5..=12 {
        store.append(&[kept("a", "z", n)]);
    }
    let (_, flows) = store.read(&pod("a")).unwrap().unwrap();
    assert_eq!(ports(&flows), vec![9, 10, 11, 12]);
    let lines = std::fs::read_to_string(dir.0.join(file_name(&pod("a")))).unwrap().lines().count();
    assert!(lines <= 1 + 4 + 2, "compacted: {lines} lines");
    store.release(&pod("a")).unwrap();
    assert!(!store.watching());
    store.append(&[kept("a", "z", 13)]);
    let (rec, flows) = store.read(&pod("a")).unwrap().unwrap();
    assert_eq!((rec.quarantine, ports(&flows).last().copied()), (None, Some(12)));
    // Deleted while quarantined: the record carries the quarantine.
    store.keep(record("c"), q.clone(), vec![]).unwrap();
    store.save_deleted(record("c"), vec![kept("c", "z", 1)]).unwrap();
    assert_eq!(store.read(&pod("c")).unwrap().unwrap().0.quarantine, Some(q));
    assert!(!store.watching());
}

#[test]
fn merging_orders_by_time_and_keeps_each_sequence_number_once() {
    let mut flows = vec![kept("a", "z", 3), kept("a", "z", 1), kept("a", "z", 3), kept("a", "z", 2)];
    let mut other_epoch = kept("a", "z", 2);
    other_epoch.epoch = 8;
    flows.push(other_epoch);
    merge(&mut flows);
    assert_eq!(ports(&flows), vec![1, 2, 2, 3]);
    assert_eq!(flows.iter().map(|f| f.epoch).collect::<Vec<_>>(), vec![7, 7, 8, 7]);
}

#[test]
fn names_are_escaped_into_file_names_and_back() {
    for p in [
        pod("a"),
        NamespacedName::new("kube-system", "web.1"),
        NamespacedName::new("a_b", "../x%"),
    ] {
        let name = file_name(&p);
        assert!(!name.contains('/') && !name.starts_with('.'), "{name}");
        assert_eq!(pod_of(&name), Some(p));
    }
    assert_eq!(pod_of("README"), None);
}

fn flow_store(dir: &Path) -> FlowStore {
    let forensics = Arc::new(ForensicStore::open(dir, Limits::default(), None).unwrap());
    FlowStore::new("n0", 16, Clock::with_offset(0)).with_forensics(forensics)
}

fn pod_request(name: &str) -> ObserveRequest {
    ObserveRequest {
        filter: FlowFilter {
            pod: Some(pod(name)),
            ..FlowFilter::default()
        },
        ..ObserveRequest::default()
    }
}

fn sports(flows: &[Flow]) -> Vec<u16> {
    flows.iter().map(|f| f.source.port).collect()
}

#[test]
fn observe_and_bundles_answer_from_history_and_kept_flows_without_duplicates() {
    let dir = TempDir::new("observe");
    let store = flow_store(&dir.0);
    store.record_flows_for_tests(vec![flow("a", "z", 1), flow("b", "z", 2), flow("z", "a", 3)]);
    // Not deleted yet: the history answers alone.
    assert_eq!(sports(&store.snapshot_with_kept(&pod_request("a")).unwrap()), vec![1, 3]);
    assert_eq!(store.pods_to_keep(&[pod("a"), pod("q")].into()), [pod("a")].into());
    for (_, result) in store.keep_deleted(vec![(record("a"), false)]) {
        result.unwrap();
    }
    // Both hold the flows now: each once.
    assert_eq!(sports(&store.snapshot_with_kept(&pod_request("a")).unwrap()), vec![1, 3]);
    // A pod with no flows here, not local: nothing written.
    assert!(store.keep_deleted(vec![(record("q"), false)]).is_empty());
    assert!(store.forensics().unwrap().read(&pod("q")).unwrap().is_none());
    // The pod's own node keeps its record even without flows.
    assert_eq!(store.keep_deleted(vec![(record("r"), true)]).len(), 1);
    assert!(store.forensics().unwrap().read(&pod("r")).unwrap().is_some());
    drop(store);
    // A restarted agent: empty history, the kept flows answer.
    let store = flow_store(&dir.0);
    store.record_flows_for_tests(vec![flow("b", "z", 4)]);
    assert_eq!(sports(&store.snapshot_with_kept(&pod_request("a")).unwrap()), vec![1, 3]);
    let since = ObserveRequest {
        since: Some(u64::try_from(flow("a", "z", 2).time.as_nanosecond()).unwrap()),
        ..pod_request("a")
    };
    assert_eq!(sports(&store.snapshot_with_kept(&since).unwrap()), vec![3]);
    let last = ObserveRequest {
        last: Some(1),
        ..pod_request("a")
    };
    assert_eq!(sports(&store.snapshot_with_kept(&last).unwrap()), vec![3]);
    // Without a pod filter only the history answers.
    assert_eq!(sports(&store.snapshot_with_kept(&ObserveRequest::default()).unwrap()), vec![4]);
    let bundle = store.bundle(&pod("a"), None).unwrap().unwrap();
    assert_eq!((bundle.labels, sports(&bundle.flows)), (record("a").labels, vec![1, 3]));
    assert_eq!(bundle.policies, record("a").policies);
    assert!(bundle.deleted.is_some());
    // A live pod: the model's record, with the history's flows.
    let mut live = record("b");
    live.deleted = None;
    let bundle = store.bundle(&pod("b"), Some(live.clone())).unwrap().unwrap();
    assert_eq!((bundle.deleted, sports(&bundle.flows)), (None, vec![4]));
    assert!(store.bundle(&pod("nobody"), None).unwrap().is_none());
}

#[test]
fn a_live_pods_record_names_the_policies_that_select_it() {
    let cluster = Cluster::from_objects(
        crate::model::parse_documents(
            "
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: web}}
spec: {nodeName: n1}
status: {podIP: 10.9.0.7}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-in, namespace: x}
spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: all-out, namespace: x}
spec: {podSelector: {}, policyTypes: [Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-in, namespace: x}
spec: {podSelector: {matchLabels: {app: db}}, policyTypes: [Ingress]}
",
            "test",
        )
        .unwrap(),
    );
    let r = describe(&cluster, &pod("a")).unwrap();
    assert_eq!(
        r.policies,
        vec![NamespacedName::new("x", "all-out"), NamespacedName::new("x", "web-in")]
    );
    assert_eq!((r.ip, r.node.as_deref()), (Some([10, 9, 0, 7].into()), Some("n1")));
    assert_eq!(r.labels.get("app").map(String::as_str), Some("web"));
    assert!(describe(&cluster, &pod("b")).is_none());
}

#[tokio::test]
async fn observe_over_the_socket_refuses_when_a_kept_file_cannot_be_read() {
    let dir = TempDir::new("serve");
    let store = flow_store(&dir.0);
    assert_eq!(store.keep_deleted(vec![(record("a"), true)]).len(), 1);
    drop(store);
    std::fs::write(dir.0.join(file_name(&pod("a"))), b"garbage\n").unwrap();
    let store = Arc::new(flow_store(&dir.0));
    let mut out = Vec::new();
    crate::flows::serve(store.clone(), pod_request("a"), tokio::io::empty(), &mut out).await;
    let text = String::from_utf8(out).unwrap();
    let answer: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(answer["result"], "error", "{text}");
    assert!(answer["message"].as_str().unwrap().contains("cannot be read"), "{text}");
    // Other questions are still answered.
    let mut out = Vec::new();
    crate::flows::serve(store, pod_request("b"), tokio::io::empty(), &mut out).await;
    assert!(out.is_empty());
}

#[test]
fn a_kept_pods_flows_reach_its_file_as_the_history_records_them() {
    let dir = TempDir::new("record");
    let store = flow_store(&dir.0);
    let q = QuarantineInfo {
        since: jiff::Timestamp::from_second(1_800_000_000).unwrap(),
        reason: "test".into(),
        by: "command".into(),
    };
    let mut live = record("a");
    live.deleted = None;
    store.keep_forensics(live, q).unwrap();
    store.record_flows_for_tests(vec![flow("a", "z", 1), flow("b", "z", 2), flow("z", "a", 3)]);
    store.release_forensics(&pod("a")).unwrap();
    store.record_flows_for_tests(vec![flow("a", "z", 4)]);
    drop(store);
    // Read back by a restarted agent: the quarantined pod's flows, numbered, only its own.
    let store = flow_store(&dir.0);
    let (rec, flows) = store.forensics().unwrap().read(&pod("a")).unwrap().unwrap();
    assert!(rec.quarantine.is_none(), "released");
    assert_eq!(ports(&flows), vec![1, 3], "only its own, and none after the release");
    assert_eq!(flows.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![0, 2]);
}
