//! The relay's detection: released flows through the engine into the anomalies stream
//! (`Request::Anomalies` on the relay's socket, history then follow), and the automatic
//! response's decisions.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_api::{
    Anomaly, AnomalyKind, AnomalyRequest, Direction, Envelope, Flow, FlowPeer, FlowVerdict, NamespacedName, Protocol, Request, Response,
    StreamHeader,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::detect::{AutoQuarantine, Decision, Detection, RelayMetrics, ResponseConfig};
use super::store::RelayStore;
use super::{Inner, Shared};
use crate::baseline::{Config, Engine};
use crate::metrics::Exposition;

const SEC: i128 = 1_000_000_000;
const T0: i128 = 1_800_000_000 * SEC;

fn pod(app: &str, name: &str, ip: [u8; 4], port: u16) -> FlowPeer {
    FlowPeer {
        namespace: Some("shop".into()),
        pod: Some(name.into()),
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
        ip: Ipv4Addr::from(ip),
        port,
        identity: 256,
        services: vec![],
    }
}

fn connection(t: i128, source: FlowPeer, destination: FlowPeer) -> Flow {
    Flow {
        time: jiff::Timestamp::from_nanosecond(t).unwrap(),
        node: "n0".into(),
        verdict: FlowVerdict::Forwarded,
        drop_reason: None,
        direction: Direction::Egress,
        protocol: Protocol::TCP,
        tcp_flags: Some("SYN".into()),
        source,
        destination,
        allowed_by: vec![],
        isolated_by: vec![],
        is_reply: false,
        service: None,
        kind: Default::default(),
        bytes: None,
    }
}

fn shared(response: ResponseConfig, queue: Option<tokio::sync::mpsc::Sender<(NamespacedName, String)>>) -> Arc<Shared> {
    let metrics = Arc::new(RelayMetrics::new().unwrap());
    let engine = Engine::new(Config { learning_secs: 60 });
    Arc::new(Shared {
        inner: Mutex::new(Inner {
            store: RelayStore::new(1000),
            file: None,
        }),
        detection: Arc::new(Detection::new(engine, None, response, queue, metrics)),
    })
}

/// Stores `flows` as node n0's records from `seq` and releases them (as the relay's tick
/// does once the merge delay passed).
fn ingest(shared: &Shared, seq: &mut u64, flows: Vec<Flow>) {
    let mut inner = shared.lock();
    if *seq == 0 {
        let header = StreamHeader {
            node: "n0".into(),
            epoch: 1,
            first: 0,
            next: 0,
        };
        inner.store.on_header(&header, jiff::Timestamp::now());
    }
    for f in flows {
        inner.store.on_record("n0", *seq, f, jiff::Timestamp::now());
        *seq += 1;
    }
    inner.store.release(i128::MAX);
}

/// The front-end talking to the api once a second for two minutes (60 s of learning).
fn learning_traffic() -> Vec<Flow> {
    (0..120)
        .map(|s| {
            connection(
                T0 + s * SEC,
                pod("frontend", "frontend-1", [10, 1, 0, 10], 40000 + s as u16),
                pod("api", "api-1", [10, 1, 0, 20], 8080),
            )
        })
        .collect()
}

async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>>) -> String {
    tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .expect("a line in time")
        .unwrap()
        .expect("the stream is open")
}

#[tokio::test]
async fn anomalies_stream_history_then_follow_with_filters() {
    let shared = shared(ResponseConfig::default(), None);
    let feed = tokio::spawn(super::detect::feed(shared.clone(), shared.detection.clone()));
    tokio::task::yield_now().await;
    let mut seq = 0;
    ingest(&shared, &mut seq, learning_traffic());
    // After learning: the front-end connects to the database.
    let db = pod("db", "db-0", [10, 1, 0, 30], 5432);
    ingest(
        &shared,
        &mut seq,
        vec![connection(T0 + 130 * SEC, pod("frontend", "frontend-1", [10, 1, 0, 10], 41000), db)],
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while shared.detection.log().total() < 1 {
        assert!(tokio::time::Instant::now() < deadline, "the engine never raised the new peer");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The client asks for scans and new externals only: the new peer is not for it…
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(super::serve::serve_client(shared.clone(), None, server));
    let (read, mut write) = tokio::io::split(client);
    let request = Request::Anomalies(Box::new(AnomalyRequest {
        kinds: vec![AnomalyKind::NewExternal],
        follow: true,
        ..AnomalyRequest::default()
    }));
    let mut line = serde_json::to_vec(&Envelope::new(request)).unwrap();
    line.push(b'\n');
    write.write_all(&line).await.unwrap();
    let mut lines = BufReader::new(read).lines();
    // …but the outside address it uploads to next is, and it arrives as it is raised.
    let outside = FlowPeer {
        namespace: None,
        pod: None,
        labels: BTreeMap::new(),
        ip: Ipv4Addr::new(198, 51, 100, 9),
        port: 443,
        identity: 2,
        services: vec![],
    };
    ingest(
        &shared,
        &mut seq,
        vec![connection(
            T0 + 131 * SEC,
            pod("frontend", "frontend-1", [10, 1, 0, 10], 41001),
            outside,
        )],
    );
    let a: Anomaly = serde_json::from_str(&next_line(&mut lines).await).unwrap();
    assert_eq!((a.kind, a.workload.as_str()), (AnomalyKind::NewExternal, "frontend"));
    assert_eq!(a.flows.len(), 1, "with the flow that triggered it");
    // Without follow: the history, filtered, then the end of the stream.
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(super::serve::serve_client(shared.clone(), None, server));
    let (read, mut write) = tokio::io::split(client);
    let request = Request::Anomalies(Box::new(AnomalyRequest {
        pod: Some(NamespacedName::new("shop", "frontend-1")),
        ..AnomalyRequest::default()
    }));
    let mut line = serde_json::to_vec(&Envelope::new(request)).unwrap();
    line.push(b'\n');
    write.write_all(&line).await.unwrap();
    let mut lines = BufReader::new(read).lines();
    let mut kinds = Vec::new();
    while let Some(l) = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .unwrap()
        .unwrap()
    {
        kinds.push(serde_json::from_str::<Anomaly>(&l).unwrap().kind);
    }
    assert_eq!(kinds, [AnomalyKind::NewPeer, AnomalyKind::NewExternal]);
    // The status and the metrics count them.
    let status = match super::serve::status_for_tests(&shared) {
        Response::RelayStatus(s) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!(status.anomalies, 2);
    let text = shared.detection.metrics.encode().unwrap();
    assert!(
        text.contains(r#"bulkhead_anomalies_total{kind="new_peer",namespace="shop",workload="frontend"} 1"#),
        "{text}"
    );
    feed.abort();
}

fn anomaly(kind: AnomalyKind, score: f64, pod: Option<&str>) -> Anomaly {
    Anomaly {
        time: jiff::Timestamp::from_nanosecond(T0).unwrap(),
        kind,
        score,
        namespace: "shop".into(),
        workload: "frontend".into(),
        pod: pod.map(|p| p.parse().unwrap()),
        explanation: "reached 40 distinct peer ports in 10 s".into(),
        flows: vec![],
        response: None,
    }
}

#[test]
fn the_automatic_response_quarantines_configured_kinds_above_the_score_once_per_pod() {
    let mut d = AutoQuarantine::new(ResponseConfig {
        kinds: vec![AnomalyKind::Scan],
        score: 2.0,
        dry_run: false,
    });
    let pod = NamespacedName::new("shop", "frontend-1");
    assert_eq!(
        d.decide(&anomaly(AnomalyKind::NewPeer, 9.0, Some("shop/frontend-1"))),
        Decision::Nothing,
        "kind not configured"
    );
    assert_eq!(
        d.decide(&anomaly(AnomalyKind::Scan, 1.9, Some("shop/frontend-1"))),
        Decision::Nothing,
        "below the score"
    );
    assert_eq!(d.decide(&anomaly(AnomalyKind::Scan, 5.0, None)), Decision::Nothing, "no pod");
    assert_eq!(
        d.decide(&anomaly(AnomalyKind::Scan, 2.0, Some("shop/frontend-1"))),
        Decision::Quarantine(pod.clone())
    );
    assert_eq!(
        d.decide(&anomaly(AnomalyKind::Scan, 8.0, Some("shop/frontend-1"))),
        Decision::Nothing,
        "once per pod"
    );
    assert_eq!(
        d.decide(&anomaly(AnomalyKind::Scan, 3.0, Some("shop/frontend-2"))),
        Decision::Quarantine(NamespacedName::new("shop", "frontend-2"))
    );
    let mut off = AutoQuarantine::new(ResponseConfig {
        kinds: vec![],
        score: 2.0,
        dry_run: false,
    });
    assert_eq!(
        off.decide(&anomaly(AnomalyKind::Scan, 50.0, Some("shop/frontend-1"))),
        Decision::Nothing,
        "off by default"
    );
    let mut dry = AutoQuarantine::new(ResponseConfig {
        kinds: vec![AnomalyKind::Scan, AnomalyKind::Exfiltration],
        score: 2.0,
        dry_run: true,
    });
    assert_eq!(
        dry.decide(&anomaly(AnomalyKind::Exfiltration, 4.0, Some("shop/frontend-1"))),
        Decision::WouldQuarantine(pod)
    );
}

/// A scan after learning, through the detection: the scanning pod is queued for
/// quarantine with an `auto:` reason (or, in a dry run, only reported), once.
#[tokio::test]
async fn a_scan_queues_the_scanning_pod_or_reports_it_in_a_dry_run() {
    for dry_run in [false, true] {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let config = ResponseConfig {
            kinds: vec![AnomalyKind::Scan],
            score: 2.0,
            dry_run,
        };
        let shared = shared(config, Some(tx));
        for f in learning_traffic() {
            shared.detection.observe(&f);
        }
        for i in 0..60u16 {
            let mut f = connection(
                T0 + 130 * SEC + i128::from(i) * SEC / 20,
                pod("frontend", "frontend-1", [10, 1, 0, 10], 42000 + i),
                pod("api", "api-1", [10, 1, 0, 20], 1 + i),
            );
            f.verdict = FlowVerdict::Dropped;
            shared.detection.observe(&f);
            // A normal request of another replica meanwhile.
            shared.detection.observe(&connection(
                T0 + 130 * SEC + i128::from(i) * SEC / 20 + 1,
                pod("frontend", "frontend-2", [10, 1, 0, 11], 43000 + i),
                pod("api", "api-1", [10, 1, 0, 20], 8080),
            ));
        }
        let (history, _) = shared.detection.log().query(&AnomalyRequest::default());
        let scans: Vec<&Anomaly> = history.iter().filter(|a| a.kind == AnomalyKind::Scan).map(|a| &**a).collect();
        assert!(scans.iter().any(|a| a.score >= 2.0), "{history:#?}");
        let responded: Vec<&String> = scans.iter().filter_map(|a| a.response.as_ref()).collect();
        let metrics = shared.detection.metrics.encode().unwrap();
        if dry_run {
            assert_eq!(responded, ["would quarantine shop/frontend-1 (dry run)"]);
            assert!(rx.try_recv().is_err(), "a dry run sends nothing");
            assert!(
                metrics.contains(r#"bulkhead_auto_quarantine_total{result="would_quarantine"} 1"#),
                "{metrics}"
            );
        } else {
            assert_eq!(responded, ["quarantine requested for shop/frontend-1"]);
            let (pod, reason) = rx.try_recv().expect("queued");
            assert_eq!(pod, NamespacedName::new("shop", "frontend-1"));
            assert!(reason.starts_with("auto: scan: "), "{reason}");
            assert!(rx.try_recv().is_err(), "once");
            assert!(
                metrics.contains(r#"bulkhead_auto_quarantine_total{result="requested"} 1"#),
                "{metrics}"
            );
        }
    }
}

#[test]
fn the_readme_lists_every_relay_metric() {
    let m = RelayMetrics::new().unwrap();
    m.anomalies_for_tests(&anomaly(AnomalyKind::Scan, 1.0, None));
    let exported: std::collections::BTreeSet<String> = m
        .encode()
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(exported.contains("bulkhead_anomalies_total"), "{exported:?}");
    let table: String = crate::metrics::tests::readme_table(true)
        .lines()
        .filter(|l| l.starts_with("| `bulkhead_"))
        .collect();
    assert_eq!(
        crate::metrics::tests::mentioned(&table),
        exported,
        "README relay metrics table vs the exposition"
    );
}

/// The real `promtool` accepts the relay's exposition, with no lint finding.
#[test]
fn promtool_check_metrics_passes_on_the_relay_exposition() {
    let m = RelayMetrics::new().unwrap();
    m.anomalies_for_tests(&anomaly(AnomalyKind::Exfiltration, 3.0, Some("shop/frontend-1")));
    crate::metrics::tests::assert_promtool_accepts(&m.encode().unwrap());
}
