//! The agent's flow stream for the relay (TCP, token-authenticated) and what the relay
//! adds to the observe protocol: sequence numbers, gaps and its status.
//!
//! On an agent's flow port the relay writes one [`StreamHello`] line; the agent checks the
//! token before it writes anything else, answers one [`StreamHeader`] line and then one
//! [`SeqFlow`] per line, from just after the relay's cursor, until either side closes.
//! Sequence numbers are per node, dense, and never reused: `(epoch, seq)` names one record.

use serde::{Deserialize, Serialize};

use crate::flow::{time_text, Flow};

fn version_one() -> u32 {
    1
}

/// Where a reader of a node's stream stands: the last record it has, by sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCursor {
    /// The node's sequence epoch (changes only when the agent's sequence file is lost).
    pub epoch: u64,
    /// The last sequence number received.
    pub seq: u64,
}

/// The first line a reader writes on an agent's flow port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHello {
    /// Protocol version (1).
    #[serde(default = "version_one")]
    pub v: u32,
    /// The shared token (compared in constant time).
    pub token: String,
    /// Resume after this record; `None`: everything the agent holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<StreamCursor>,
}

impl std::fmt::Display for StreamHello {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "hello v{} resume {:?}", self.v, self.resume)
    }
}

/// The agent's first line after an accepted hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// The agent's node.
    pub node: String,
    /// Its sequence epoch.
    pub epoch: u64,
    /// The oldest sequence number it still holds (equal to `next` when it holds none).
    pub first: u64,
    /// The sequence number its next record will get.
    pub next: u64,
}

/// One record of a node's stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqFlow {
    /// Its sequence number on its node.
    pub seq: u64,
    /// The record.
    pub flow: Flow,
}

/// Why records are missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// The agent no longer held them when the relay asked (its history had moved on, or
    /// it was restarted before they were sent).
    NotHeld,
    /// The node's sequence started over (its sequence file was lost, e.g. a reboot): how
    /// many records were missed cannot be known, `missing` is 0.
    Reset,
}

/// Records of one node the relay never received: `from..=to` of `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// When the relay noticed.
    #[serde(with = "time_text")]
    pub time: jiff::Timestamp,
    /// The node.
    pub node: String,
    /// Its sequence epoch (the new one for a reset).
    pub epoch: u64,
    /// The first missing sequence number.
    pub from: u64,
    /// The last missing sequence number.
    pub to: u64,
    /// How many records are missing (`to - from + 1`; 0 for a reset).
    pub missing: u64,
    /// Why.
    pub reason: GapReason,
}

/// A gap as one line of an observe stream (`{"gap":{…}}`), sent only to requests with
/// `gaps: true`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapLine {
    /// The gap.
    pub gap: Gap,
}

/// One node as the relay sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayNodeStatus {
    /// Node name.
    pub node: String,
    /// Where its agent's flow port is.
    pub address: String,
    /// Whether the relay is connected now.
    pub connected: bool,
    /// The last error connecting or reading, if the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last record received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<StreamCursor>,
    /// Records received from it (this relay process, not counting what its file held).
    pub received: u64,
    /// Records received twice (after a reconnect) and dropped.
    pub duplicates: u64,
    /// Gaps seen, and the records they miss.
    pub gaps: u64,
    /// Records missing in those gaps.
    pub missing: u64,
    /// Sequence resets seen.
    pub resets: u64,
}

/// What the relay reports for `Request::RelayStatus`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// Every node it knows.
    pub nodes: Vec<RelayNodeStatus>,
    /// Records in its history now.
    pub stored: usize,
    /// Its history's capacity.
    pub capacity: usize,
    /// Records followers missed because they read too slowly.
    pub follower_lag_drops: u64,
    /// Records that arrived after the merge delay, sent to followers out of time order.
    pub late: u64,
    /// Anomalies the relay's baselines raised since it started.
    #[serde(default)]
    pub anomalies: u64,
}

/// Whether two secrets are equal, in time that depends only on their lengths (so a
/// client cannot learn a token byte by byte from response times).
pub fn token_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    // Walk the expected length whatever the other's is.
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(token_eq(b"secret", b"secret"));
        assert!(!token_eq(b"secret", b"secreT"));
        assert!(!token_eq(b"secret", b"secret1"));
        assert!(!token_eq(b"secret", b"secre"));
        assert!(!token_eq(b"secret", b""));
        assert!(!token_eq(b"", b"x"));
        assert!(token_eq(b"", b""));
    }

    #[test]
    fn hello_and_gap_lines_are_stable_json() {
        let hello = StreamHello {
            v: 1,
            token: "s3cr3t".into(),
            resume: Some(StreamCursor { epoch: 7, seq: 41 }),
        };
        let s = serde_json::to_string(&hello).unwrap();
        assert_eq!(s, r#"{"v":1,"token":"s3cr3t","resume":{"epoch":7,"seq":41}}"#);
        assert!(!hello.to_string().contains("s3cr3t"), "{hello}");
        let old: StreamHello = serde_json::from_str(r#"{"token":"t"}"#).unwrap();
        assert_eq!((old.v, old.resume), (1, None));
        let gap = GapLine {
            gap: Gap {
                time: "2026-11-28T12:00:00Z".parse().unwrap(),
                node: "node1".into(),
                epoch: 7,
                from: 42,
                to: 51,
                missing: 10,
                reason: GapReason::NotHeld,
            },
        };
        assert_eq!(
            serde_json::to_string(&gap).unwrap(),
            r#"{"gap":{"time":"2026-11-28T12:00:00.000000000Z","node":"node1","epoch":7,"from":42,"to":51,"missing":10,"reason":"not_held"}}"#
        );
    }
}
