//! The relay's cluster-wide history: every node's records merged by time, the per-node
//! cursors that make resuming exact, and the gap and duplicate accounting.
//!
//! Pure and synchronous: the connection tasks feed it under one lock; tests drive it
//! directly. Followers get records through a bounded broadcast once they are older than
//! the merge delay (so records of several nodes come out in time order); a record that
//! arrives later than that is sent at once and counted as late.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use bulkhead_api::{Flow, Gap, GapReason, ObserveRequest, RelayNodeStatus, RelayStatus, StreamCursor, StreamHeader};
use tokio::sync::broadcast;

/// Records a follower may fall behind by before it starts missing some.
const FOLLOW_BUFFER: usize = 8192;

/// Where an entry sorts: by time, then node, sequence number, and a gap before the record
/// that revealed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// Unix time, nanoseconds.
    pub unix_ns: i128,
    /// Index of the node's name.
    pub node: u32,
    /// Sequence number (for a gap: its first missing number).
    pub seq: u64,
    /// 0 for a gap, 1 for a record.
    pub order: u8,
}

/// What an entry holds.
#[derive(Clone, Debug, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "almost every entry is a flow, and each entry is behind an Arc already"
)]
pub enum Record {
    /// A flow record.
    Flow(Flow),
    /// Records never received.
    Gap(Gap),
}

/// One entry of the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its place.
    pub key: Key,
    /// The node's epoch.
    pub epoch: u64,
    /// The record.
    pub record: Record,
}

/// What happened to an incoming record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// Stored.
    Stored(Arc<Entry>),
    /// Already had it (a reconnect re-sent it): dropped.
    Duplicate,
}

#[derive(Debug, Default)]
struct NodeState {
    status: RelayNodeStatus,
    /// The epoch of the current connection (from its header).
    epoch: Option<u64>,
    /// Without a cursor (a first connection, or after a reset): the number the header said
    /// comes first, so that records the agent dropped before the relay read its first one
    /// are a counted gap like any other.
    expected: Option<u64>,
}

/// The history and every node's accounting.
pub struct RelayStore {
    capacity: usize,
    history: BTreeMap<Key, Arc<Entry>>,
    nodes: Vec<NodeState>,
    index: HashMap<String, u32>,
    followers: broadcast::Sender<Arc<Entry>>,
    /// Everything at or before this key has been sent to followers.
    released: Option<Key>,
    late: u64,
    lagged: u64,
}

fn unix_ns(t: jiff::Timestamp) -> i128 {
    t.as_nanosecond()
}

impl RelayStore {
    /// A store keeping the last `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        let (followers, _) = broadcast::channel(FOLLOW_BUFFER);
        RelayStore {
            capacity,
            history: BTreeMap::new(),
            nodes: Vec::new(),
            index: HashMap::new(),
            followers,
            released: None,
            late: 0,
            lagged: 0,
        }
    }

    /// The index of `node`, adding it when new.
    pub fn node_index(&mut self, node: &str) -> u32 {
        if let Some(i) = self.index.get(node) {
            return *i;
        }
        let i = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        self.nodes.push(NodeState {
            status: RelayNodeStatus {
                node: node.to_string(),
                ..RelayNodeStatus::default()
            },
            epoch: None,
            expected: None,
        });
        self.index.insert(node.to_string(), i);
        i
    }

    fn node(&mut self, node: &str) -> &mut NodeState {
        let i = self.node_index(node) as usize;
        &mut self.nodes[i]
    }

    /// The cursor to resume `node` from.
    pub fn cursor(&self, node: &str) -> Option<StreamCursor> {
        let i = *self.index.get(node)?;
        self.nodes.get(i as usize)?.status.cursor
    }

    /// Every node's cursor (for compacting the file).
    pub fn cursors(&self) -> Vec<(String, StreamCursor)> {
        self.nodes
            .iter()
            .filter_map(|n| Some((n.status.node.clone(), n.status.cursor?)))
            .collect()
    }

    /// Records where `node`'s agent is and whether the relay is connected to it.
    pub fn set_connection(&mut self, node: &str, address: &str, connected: bool, error: Option<String>) {
        let n = self.node(node);
        n.status.address = address.to_string();
        n.status.connected = connected;
        n.status.error = error;
        if !connected {
            n.epoch = None;
        }
    }

    /// A new connection's header: a reset, or records the agent no longer holds, is a gap
    /// (returned, already stored).
    pub fn on_header(&mut self, header: &StreamHeader, now: jiff::Timestamp) -> Option<Arc<Entry>> {
        let n = self.node(&header.node);
        n.epoch = Some(header.epoch);
        n.expected = None;
        let Some(cursor) = n.status.cursor else {
            n.expected = Some(header.first);
            return None;
        };
        let gap = if cursor.epoch != header.epoch {
            n.status.resets += 1;
            n.status.cursor = None;
            n.expected = Some(header.first);
            Gap {
                time: now,
                node: header.node.clone(),
                epoch: header.epoch,
                from: header.first,
                to: header.first,
                missing: 0,
                reason: GapReason::Reset,
            }
        } else if header.first > cursor.seq.saturating_add(1) {
            let (from, to) = (cursor.seq + 1, header.first - 1);
            n.status.cursor = Some(StreamCursor {
                epoch: header.epoch,
                seq: to,
            });
            n.status.gaps += 1;
            n.status.missing += to - from + 1;
            Gap {
                time: now,
                node: header.node.clone(),
                epoch: header.epoch,
                from,
                to,
                missing: to - from + 1,
                reason: GapReason::NotHeld,
            }
        } else {
            return None;
        };
        Some(self.insert_gap(gap))
    }

    fn insert_gap(&mut self, gap: Gap) -> Arc<Entry> {
        let node = self.node_index(&gap.node);
        let entry = Arc::new(Entry {
            key: Key {
                unix_ns: unix_ns(gap.time),
                node,
                seq: gap.from,
                order: 0,
            },
            epoch: gap.epoch,
            record: Record::Gap(gap),
        });
        self.insert(entry.clone());
        entry
    }

    /// A record from `node`'s current connection. A jump past the next expected number is
    /// a gap (stored before the record; both returned in order).
    pub fn on_record(&mut self, node: &str, seq: u64, flow: Flow, now: jiff::Timestamp) -> Vec<Ingested> {
        let i = self.node_index(node);
        let n = &mut self.nodes[i as usize];
        let Some(epoch) = n.epoch else {
            // Only a connection that sent its header streams records.
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut gap = None;
        let expected = n.expected.take();
        if let (None, Some(first)) = (n.status.cursor.filter(|c| c.epoch == epoch), expected) {
            if seq > first {
                n.status.gaps += 1;
                n.status.missing += seq - first;
                gap = Some(Gap {
                    time: now,
                    node: node.to_string(),
                    epoch,
                    from: first,
                    to: seq - 1,
                    missing: seq - first,
                    reason: GapReason::NotHeld,
                });
            }
        }
        if let Some(c) = n.status.cursor.filter(|c| c.epoch == epoch) {
            if seq <= c.seq {
                n.status.duplicates += 1;
                return vec![Ingested::Duplicate];
            }
            if seq > c.seq + 1 {
                let (from, to) = (c.seq + 1, seq - 1);
                n.status.gaps += 1;
                n.status.missing += to - from + 1;
                gap = Some(Gap {
                    time: now,
                    node: node.to_string(),
                    epoch,
                    from,
                    to,
                    missing: to - from + 1,
                    reason: GapReason::NotHeld,
                });
            }
        }
        n.status.cursor = Some(StreamCursor { epoch, seq });
        n.status.received += 1;
        if let Some(g) = gap {
            out.push(Ingested::Stored(self.insert_gap(g)));
        }
        let entry = Arc::new(Entry {
            key: Key {
                unix_ns: unix_ns(flow.time),
                node: i,
                seq,
                order: 1,
            },
            epoch,
            record: Record::Flow(flow),
        });
        self.insert(entry.clone());
        out.push(Ingested::Stored(entry));
        out
    }

    /// Puts back an entry read from the relay's file: history and cursor, no followers.
    pub fn restore(&mut self, node: &str, epoch: u64, seq: u64, record: Record) {
        let i = self.node_index(node);
        let n = &mut self.nodes[i as usize];
        let (unix_ns, order) = match &record {
            Record::Flow(f) => {
                if n.status.cursor.is_none_or(|c| c.epoch != epoch || c.seq < seq) {
                    n.status.cursor = Some(StreamCursor { epoch, seq });
                }
                (unix_ns(f.time), 1)
            }
            Record::Gap(g) => {
                // A restarted relay's status counts the gaps its file holds, as the one
                // that saw them did: what it shows and what it counts stay equal.
                match g.reason {
                    // The cursor moved past the gap when it was seen.
                    GapReason::NotHeld => {
                        n.status.gaps += 1;
                        n.status.missing += g.missing;
                        if n.status.cursor.is_none_or(|c| c.epoch != epoch || c.seq < g.to) {
                            n.status.cursor = Some(StreamCursor { epoch, seq: g.to });
                        }
                    }
                    GapReason::Reset => {
                        n.status.resets += 1;
                        n.status.cursor = None;
                    }
                }
                (unix_ns(g.time), 0)
            }
        };
        let entry = Arc::new(Entry {
            key: Key {
                unix_ns,
                node: i,
                seq,
                order,
            },
            epoch,
            record,
        });
        self.released = self.released.max(Some(entry.key));
        self.history.insert(entry.key, entry);
        self.evict();
    }

    /// Sets `node`'s cursor (a cursor line of the file).
    pub fn restore_cursor(&mut self, node: &str, cursor: StreamCursor) {
        self.node(node).status.cursor = Some(cursor);
    }

    fn insert(&mut self, entry: Arc<Entry>) {
        if self.released.is_some_and(|r| entry.key <= r) {
            // Older than what followers already got: send now, out of order.
            self.late += 1;
            let _ = self.followers.send(entry.clone());
        }
        self.history.insert(entry.key, entry);
        self.evict();
    }

    fn evict(&mut self) {
        while self.history.len() > self.capacity {
            self.history.pop_first();
        }
    }

    /// Sends followers every entry up to `until_ns` not sent yet, in time order.
    pub fn release(&mut self, until_ns: i128) {
        let until = Key {
            unix_ns: until_ns,
            node: u32::MAX,
            seq: u64::MAX,
            order: u8::MAX,
        };
        if self.released.is_some_and(|r| r >= until) {
            return;
        }
        let lower = match self.released {
            Some(r) => Bound::Excluded(r),
            None => Bound::Unbounded,
        };
        if self.followers.receiver_count() > 0 {
            for e in self.history.range((lower, Bound::Included(until))).map(|(_, e)| e) {
                let _ = self.followers.send(e.clone());
            }
        }
        self.released = Some(until);
    }

    /// A receiver of every entry released from now on (the baseline engine's feed).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Entry>> {
        self.followers.subscribe()
    }

    /// Counts records a follower skipped.
    pub fn note_lagged(&mut self, missed: u64) {
        self.lagged += missed;
    }

    /// The history `request` asks for (flows by its filter and window, gaps when asked),
    /// in time order, and for `follow` a receiver of everything released after it.
    pub fn query(&self, request: &ObserveRequest) -> (Vec<Arc<Entry>>, Option<broadcast::Receiver<Arc<Entry>>>) {
        let upper = match (request.follow, self.released) {
            (true, Some(r)) => Bound::Included(r),
            (true, None) => Bound::Excluded(Key {
                unix_ns: i128::MIN,
                node: 0,
                seq: 0,
                order: 0,
            }),
            (false, _) => Bound::Unbounded,
        };
        let since = request.since.map(i128::from);
        let mut flows: Vec<Arc<Entry>> = self
            .history
            .range((Bound::Unbounded, upper))
            .map(|(_, e)| e)
            .filter(|e| since.is_none_or(|s| e.key.unix_ns >= s))
            .filter(|e| match &e.record {
                Record::Flow(f) => request.filter.matches(f),
                Record::Gap(_) => request.gaps,
            })
            .cloned()
            .collect();
        if let Some(n) = request.last {
            // `last` counts flows; gaps inside the window they span stay.
            let mut kept = 0;
            let mut cut = 0;
            for (i, e) in flows.iter().enumerate().rev() {
                if matches!(e.record, Record::Flow(_)) {
                    if kept == n {
                        cut = i + 1;
                        break;
                    }
                    kept += 1;
                }
            }
            flows.drain(..cut);
            if n == 0 {
                flows.clear();
            }
        }
        let rx = request.follow.then(|| self.followers.subscribe());
        (flows, rx)
    }

    /// Every node's accounting and the history's size.
    pub fn status(&self) -> RelayStatus {
        let mut nodes: Vec<RelayNodeStatus> = self.nodes.iter().map(|n| n.status.clone()).collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        RelayStatus {
            nodes,
            stored: self.history.len(),
            capacity: self.capacity,
            follower_lag_drops: self.lagged,
            late: self.late,
            anomalies: 0,
        }
    }

    /// Every entry, oldest first (for compacting the file).
    pub fn entries(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.history.values()
    }

    /// The name of node index `i`.
    pub fn node_name(&self, i: u32) -> &str {
        self.nodes.get(i as usize).map_or("", |n| n.status.node.as_str())
    }
}
