//! Relay tests: merge order, cursors, duplicates, gaps, the file, and the agent's flow port.

use std::net::Ipv4Addr;
use std::sync::Arc;

use bulkhead_api::{Direction, Flow, FlowFilter, FlowPeer, FlowVerdict, GapReason, ObserveRequest, Protocol, StreamCursor, StreamHeader};

use super::file::RelayFile;
use super::store::{Ingested, Record, RelayStore};

fn flow(node: &str, ns: i64) -> Flow {
    let peer = |ip: [u8; 4], port| FlowPeer {
        namespace: Some("x".into()),
        pod: Some("a".into()),
        labels: Default::default(),
        ip: Ipv4Addr::from(ip),
        port,
        identity: 256,
        services: vec![],
    };
    Flow {
        time: jiff::Timestamp::from_nanosecond(1_800_000_000_000_000_000 + i128::from(ns)).unwrap(),
        node: node.into(),
        verdict: FlowVerdict::Forwarded,
        drop_reason: None,
        direction: Direction::Egress,
        protocol: Protocol::TCP,
        tcp_flags: None,
        source: peer([10, 0, 0, 1], 40000),
        destination: peer([10, 0, 0, 2], 80),
        allowed_by: vec![],
        isolated_by: vec![],
        is_reply: false,
        service: None,
        kind: Default::default(),
        bytes: None,
    }
}

fn header(node: &str, epoch: u64, first: u64, next: u64) -> StreamHeader {
    StreamHeader {
        node: node.into(),
        epoch,
        first,
        next,
    }
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

fn all(follow: bool) -> ObserveRequest {
    ObserveRequest {
        follow,
        gaps: true,
        ..ObserveRequest::default()
    }
}

/// (node, seq) of flows and ("gap", missing) of gaps, in history order.
fn listing(store: &RelayStore) -> Vec<(String, u64)> {
    store
        .query(&all(false))
        .0
        .iter()
        .map(|e| match &e.record {
            Record::Flow(f) => (f.node.clone(), e.key.seq),
            Record::Gap(g) => (format!("gap {}", g.node), g.missing),
        })
        .collect()
}

#[test]
fn records_of_several_nodes_merge_in_time_order() {
    let mut s = RelayStore::new(100);
    assert!(s.on_header(&header("n0", 1, 0, 0), now()).is_none());
    assert!(s.on_header(&header("n1", 2, 0, 0), now()).is_none());
    // Each node's stream is in its own order; together they interleave.
    for (seq, t) in [(0, 10), (1, 30), (2, 50)] {
        s.on_record("n0", seq, flow("n0", t), now());
    }
    for (seq, t) in [(0, 20), (1, 40), (2, 45)] {
        s.on_record("n1", seq, flow("n1", t), now());
    }
    let got: Vec<String> = listing(&s).iter().map(|(n, q)| format!("{n}:{q}")).collect();
    assert_eq!(got, ["n0:0", "n1:0", "n0:1", "n1:1", "n1:2", "n0:2"]);
    // A follower sees them released in the same order.
    let (_, rx) = s.query(&all(true));
    let mut rx = rx.unwrap();
    s.release(1_800_000_000_000_000_000 + 45);
    s.release(1_800_000_000_000_000_000 + 100);
    let mut seen = Vec::new();
    while let Ok(e) = rx.try_recv() {
        seen.push(e.key.unix_ns - 1_800_000_000_000_000_000);
    }
    assert_eq!(seen, [10, 20, 30, 40, 45, 50]);
    // Late: older than what was released goes out at once and is counted.
    s.on_record("n1", 3, flow("n1", 5), now());
    assert_eq!(rx.try_recv().unwrap().key.seq, 3);
    assert_eq!(s.status().late, 1);
}

#[test]
fn a_reconnect_resumes_after_the_cursor_and_drops_duplicates() {
    let mut s = RelayStore::new(100);
    s.on_header(&header("n0", 7, 0, 3), now());
    for seq in 0..3 {
        s.on_record("n0", seq, flow("n0", seq as i64), now());
    }
    assert_eq!(s.cursor("n0"), Some(StreamCursor { epoch: 7, seq: 2 }));
    s.set_connection("n0", "a:1", false, Some("reset".into()));
    // The agent re-sends from before the cursor (it may): nothing is stored twice.
    assert!(s.on_header(&header("n0", 7, 0, 5), now()).is_none());
    assert_eq!(s.on_record("n0", 1, flow("n0", 1), now()), vec![Ingested::Duplicate]);
    assert_eq!(s.on_record("n0", 2, flow("n0", 2), now()), vec![Ingested::Duplicate]);
    assert!(matches!(s.on_record("n0", 3, flow("n0", 3), now())[..], [Ingested::Stored(_)]));
    let st = s.status();
    assert_eq!((st.nodes[0].duplicates, st.nodes[0].gaps, st.nodes[0].received), (2, 0, 4));
    assert_eq!(listing(&s).len(), 4);
}

/// A first connection: records the agent dropped before the relay read its first one (the
/// header said 0 comes first, the first record is 32) are a counted gap, not silence.
#[test]
fn records_lost_before_a_first_connections_first_record_are_a_counted_gap() {
    let mut s = RelayStore::new(100);
    assert!(s.on_header(&header("n0", 7, 0, 0), now()).is_none());
    let out = s.on_record("n0", 32, flow("n0", 1), now());
    assert_eq!(out.len(), 2, "the gap, then the record: {out:?}");
    let status = s.status();
    let n = &status.nodes[0];
    assert_eq!((n.gaps, n.missing, n.received), (1, 32, 1));
    // The next records follow on; nothing more is missing.
    s.on_record("n0", 33, flow("n0", 2), now());
    assert_eq!(s.status().nodes[0].missing, 32);
    // A header whose first record is the first one read: no gap.
    let mut s = RelayStore::new(100);
    s.on_header(&header("n0", 7, 5, 9), now());
    assert_eq!(s.on_record("n0", 5, flow("n0", 1), now()).len(), 1);
    assert_eq!(s.status().nodes[0].gaps, 0);
}

#[test]
fn records_no_longer_held_are_a_counted_gap_of_their_size() {
    let mut s = RelayStore::new(100);
    s.on_header(&header("n0", 7, 0, 2), now());
    s.on_record("n0", 0, flow("n0", 0), now());
    s.on_record("n0", 1, flow("n0", 1), now());
    // Reconnect: the agent's history moved on to 10 (8 records never sent to us).
    let gap = s.on_header(&header("n0", 7, 10, 12), now()).expect("a gap");
    match &gap.record {
        Record::Gap(g) => {
            assert_eq!((g.from, g.to, g.missing, g.reason), (2, 9, 8, GapReason::NotHeld));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.cursor("n0"), Some(StreamCursor { epoch: 7, seq: 9 }));
    s.on_record("n0", 10, flow("n0", 10), now());
    // A jump inside a stream (the agent's history wrapped under a slow reader) too.
    let out = s.on_record("n0", 14, flow("n0", 14), now());
    assert_eq!(out.len(), 2, "the gap, then the record");
    let st = &s.status().nodes[0];
    assert_eq!((st.gaps, st.missing), (2, 11));
    // A new epoch (the agent's sequence file was lost) is a reset, not a silent restart.
    let reset = s.on_header(&header("n0", 8, 0, 1), now()).expect("reset");
    assert!(matches!(&reset.record, Record::Gap(g) if g.reason == GapReason::Reset));
    assert!(matches!(s.on_record("n0", 0, flow("n0", 20), now())[..], [Ingested::Stored(_)]));
    assert_eq!(s.status().nodes[0].resets, 1);
    assert_eq!(s.cursor("n0"), Some(StreamCursor { epoch: 8, seq: 0 }));
}

#[test]
fn history_is_bounded_and_queries_filter_window_and_last() {
    let mut s = RelayStore::new(5);
    s.on_header(&header("n0", 1, 0, 0), now());
    s.on_header(&header("n1", 1, 0, 0), now());
    for seq in 0..6u64 {
        s.on_record(
            if seq % 2 == 0 { "n0" } else { "n1" },
            seq / 2,
            flow(if seq % 2 == 0 { "n0" } else { "n1" }, seq as i64),
            now(),
        );
    }
    assert_eq!(s.status().stored, 5, "the oldest fell out");
    let only_n1 = ObserveRequest {
        filter: FlowFilter {
            node: Some("n1".into()),
            ..FlowFilter::default()
        },
        ..ObserveRequest::default()
    };
    assert_eq!(s.query(&only_n1).0.len(), 3);
    let last2 = ObserveRequest {
        last: Some(2),
        ..ObserveRequest::default()
    };
    let got: Vec<i128> = s
        .query(&last2)
        .0
        .iter()
        .map(|e| e.key.unix_ns - 1_800_000_000_000_000_000)
        .collect();
    assert_eq!(got, [4, 5]);
    let since = ObserveRequest {
        since: Some(1_800_000_000_000_000_003),
        ..ObserveRequest::default()
    };
    assert_eq!(s.query(&since).0.len(), 3);
    let zero = ObserveRequest {
        last: Some(0),
        ..ObserveRequest::default()
    };
    assert!(s.query(&zero).0.is_empty());
}

#[test]
fn the_file_brings_back_history_and_cursors_so_a_restart_resumes_exactly() {
    let dir = std::env::temp_dir().join(format!("bulkhead-relay-file-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flows.jsonl");
    {
        let mut s = RelayStore::new(10);
        let (mut f, skipped) = RelayFile::open(&path, &mut s, 10).unwrap();
        assert_eq!(skipped, 0);
        s.on_header(&header("n0", 5, 0, 0), now());
        for seq in 0..4 {
            for out in s.on_record("n0", seq, flow("n0", seq as i64), now()) {
                if let Ingested::Stored(e) = out {
                    f.append(&s, &e).unwrap();
                }
            }
        }
        let gap = s.on_header(&header("n0", 5, 9, 9), now()).unwrap();
        f.append(&s, &gap).unwrap();
        f.flush(&s).unwrap();
    }
    // A torn line from a kill mid-write is skipped.
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"node\":\"n0\",\"ep");
    std::fs::write(&path, text).unwrap();
    let mut s = RelayStore::new(10);
    let (mut f, skipped) = RelayFile::open(&path, &mut s, 10).unwrap();
    assert_eq!(skipped, 1);
    assert_eq!(s.cursor("n0"), Some(StreamCursor { epoch: 5, seq: 8 }), "past the recorded gap");
    assert_eq!(listing(&s).len(), 5);
    // The restarted relay counts the gap its file holds, as it shows it.
    let n = &s.status().nodes[0];
    assert_eq!((n.gaps, n.missing), (1, 5), "{n:?}");
    // Resuming: the agent sends from 9; nothing is a duplicate or a new gap.
    assert!(s.on_header(&header("n0", 5, 9, 10), now()).is_none());
    let out = s.on_record("n0", 9, flow("n0", 9), now());
    assert!(matches!(out[..], [Ingested::Stored(_)]));
    if let Ingested::Stored(e) = &out[0] {
        f.append(&s, e).unwrap();
    }
    f.flush(&s).unwrap();
    // Compaction keeps the file near the history's size and the cursors.
    for seq in 10..2100u64 {
        for out in s.on_record("n0", seq, flow("n0", seq as i64), now()) {
            if let Ingested::Stored(e) = out {
                f.append(&s, &e).unwrap();
            }
        }
        f.flush(&s).unwrap();
    }
    let lines = std::fs::read_to_string(&path).unwrap().lines().count();
    assert!(lines < 1100, "{lines} lines");
    let mut again = RelayStore::new(10);
    RelayFile::open(&path, &mut again, 10).unwrap();
    assert_eq!(again.cursor("n0"), Some(StreamCursor { epoch: 5, seq: 2099 }));
    std::fs::remove_dir_all(&dir).unwrap();
}

mod port {
    use super::*;
    use crate::flows::stream::{serve_reader, Token};
    use crate::flows::{Clock, FlowStore};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    async fn talk(store: Arc<FlowStore>, hello: &str, lines: usize) -> Vec<String> {
        let (client, server) = tokio::io::duplex(1 << 20);
        let token = Arc::new(Token::from_text("s3cret"));
        let task = tokio::spawn(serve_reader(store, token, server, "test".into()));
        let (read, mut write) = tokio::io::split(client);
        write.write_all(hello.as_bytes()).await.unwrap();
        let mut read = BufReader::new(read);
        let mut out = Vec::new();
        for _ in 0..lines {
            let mut line = String::new();
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), read.read_line(&mut line))
                .await
                .unwrap()
                .unwrap();
            if n == 0 {
                break;
            }
            out.push(line.trim().to_string());
        }
        drop(write);
        drop(read);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        out
    }

    fn store_with(n: usize, capacity: usize) -> Arc<FlowStore> {
        let store = Arc::new(FlowStore::new("n0", capacity, Clock::with_offset(0)));
        store.record_flows_for_tests((0..n).map(|i| flow("n0", i as i64)).collect());
        store
    }

    #[tokio::test]
    async fn a_reader_without_the_token_gets_a_refusal_and_nothing_else() {
        let store = store_with(3, 10);
        for hello in [
            "{\"token\":\"wrong\"}\n",
            "{\"token\":\"s3cre\"}\n",
            "{\"token\":\"\"}\n",
            "not json\n",
            "{\"op\":\"observe\",\"follow\":true}\n",
        ] {
            let got = talk(store.clone(), hello, 5).await;
            assert_eq!(got.len(), 1, "{hello}: {got:?}");
            assert!(
                got[0].contains("\"code\":106") && got[0].contains("unauthorized"),
                "{hello}: {got:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_reader_with_the_token_gets_the_header_then_records_after_its_cursor() {
        let store = store_with(5, 10);
        let epoch: u64 = store.stream_header().epoch;
        let got = talk(store.clone(), "{\"token\":\"s3cret\"}\n", 6).await;
        assert_eq!(got.len(), 6);
        let h: StreamHeader = serde_json::from_str(&got[0]).unwrap();
        assert_eq!((h.node.as_str(), h.first, h.next), ("n0", 0, 5));
        let seqs: Vec<u64> = got[1..]
            .iter()
            .map(|l| serde_json::from_str::<bulkhead_api::SeqFlow>(l).unwrap().seq)
            .collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
        let hello = format!("{{\"token\":\"s3cret\",\"resume\":{{\"epoch\":{epoch},\"seq\":2}}}}\n");
        let got = talk(store.clone(), &hello, 3).await;
        let seqs: Vec<u64> = got[1..]
            .iter()
            .map(|l| serde_json::from_str::<bulkhead_api::SeqFlow>(l).unwrap().seq)
            .collect();
        assert_eq!(seqs, [3, 4]);
        // A history that moved past the cursor starts at its oldest record (the reader
        // sees the jump: a gap).
        let small = store_with(8, 3);
        let hello = format!(
            "{{\"token\":\"s3cret\",\"resume\":{{\"epoch\":{},\"seq\":1}}}}\n",
            small.stream_header().epoch
        );
        let got = talk(small, &hello, 4).await;
        let h: StreamHeader = serde_json::from_str(&got[0]).unwrap();
        assert_eq!((h.first, h.next), (5, 8));
        assert_eq!(serde_json::from_str::<bulkhead_api::SeqFlow>(&got[1]).unwrap().seq, 5);
    }
}
