//! Behavioural baselines per workload and the anomalies that deviate from them.
//!
//! Pure: flow records in (in about time order, as the relay releases them), anomalies out.
//! A workload is the advisor's grouping ([`Workload`]): pods of a namespace that share
//! their owner labels, so new pods, new addresses, scaling and rolling updates are the same
//! workload. Each workload learns, for a learning window from its first flow:
//!
//! - the peers it opens connections to and that open connections to it: workloads, or for
//!   addresses outside the cluster's pods a /24 aggregate (an outside service usually
//!   answers from a few neighbouring addresses; a /24 absorbs that without admitting the
//!   rest of the Internet), with the ports used with each, and the namespaces it talks to;
//! - its rates per minute: new connections, fan-out (distinct peer and port targets, a
//!   denied one counting [`DENIED_WEIGHT`] times), bytes sent outside.
//!
//! Rates are measured in 10 s buckets scaled to per minute and checked while a bucket
//! fills (bytes: over a sliding 10 s window), so an attack is seen within seconds. After
//! learning, the rates keep learning with exponential decay from buckets that were not
//! anomalous, and a new peer or port joins the baseline once seen in [`PROMOTE_MINUTES`]
//! distinct minutes: a gradual change is absorbed, a single event is not.
//!
//! A connection is counted once: its opener's node (egress) and the receiver's node
//! (ingress) both report it, as one 5-tuple within a few seconds. Byte counts come in
//! `update`/`end` records, cumulative per connection; the last one per connection is
//! kept (bounded) to count only what is new.
//!
//! Anomalies are raised on the opener's side (the pod that did it): `new_peer`,
//! `new_port`, `new_external`, `scan`; and `exfiltration` for the pod that sent bytes out.
//! Ingress peers are learnt (and explain a `new_peer` when the peer never received from
//! the workload either) but raise nothing by themselves: the opener's anomaly names the
//! pod responsible, and outside clients of a public service are not anomalies.

pub mod model;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::Ipv4Addr;
use std::path::Path;

use bulkhead_api::{Anomaly, AnomalyKind, Flow, FlowKind, FlowPeer, FlowVerdict, Protocol};

use crate::advisor::Workload;

use self::model::{insert_bounded, Baseline, PeerSeen, Rate, Saved, Seen, FORMAT_VERSION};

/// Rates are measured in buckets of this many nanoseconds.
pub const BUCKET_NS: i128 = 10_000_000_000;
/// Buckets per minute.
const PER_MINUTE: f64 = 6.0;
/// Half-life of the rates' exponential decay once learnt.
pub const RATE_HALF_LIFE_SECS: f64 = 600.0;
/// After learning, a new peer or port joins the baseline once seen in this many minutes.
pub const PROMOTE_MINUTES: u32 = 5;
/// A denied target counts this many times in the fan-out (a scan is mostly denied).
pub const DENIED_WEIGHT: f64 = 2.0;
/// Fan-out threshold: this many times the learnt mean plus deviation…
pub const SCAN_FACTOR: f64 = 4.0;
/// …and at least this many weighted targets per minute (10 in 10 s).
pub const SCAN_FLOOR: f64 = 60.0;
/// Bytes-out threshold: this many times the learnt mean plus deviation…
pub const EXFIL_FACTOR: f64 = 4.0;
/// …and at least this many bytes per minute (a workload that sends almost nothing out
/// is not an exfiltration for every small upload).
pub const EXFIL_FLOOR: f64 = 8_192.0;
/// One anomaly per (kind, workload, peer) per this period, unless its score doubles
/// (for `scan` and `exfiltration` the "peer" is the pod, so each pod gets its own).
pub const DEDUPE_NS: i128 = 600_000_000_000;
/// Two records of one 5-tuple closer than this are one connection.
const SAME_CONNECTION_NS: i128 = 5_000_000_000;
/// Workloads kept (beyond: their flows are counted, not learnt).
pub const MAX_WORKLOADS: usize = 4096;
/// Peers kept per workload and direction.
pub const MAX_PEERS: usize = 512;
/// Ports kept per peer.
pub const MAX_PORTS: usize = 128;
/// A peer or port not part of the baseline is forgotten when unseen this long…
pub const FORGET_CANDIDATE_SECS: i64 = 86_400;
/// …and one that is, when unseen this long (a workload that stopped talking to a peer
/// for a month has to earn it again).
pub const FORGET_LEARNT_SECS: i64 = 30 * 86_400;
/// Connections whose last byte counts are kept (two generations of half each).
pub const MAX_CONNECTIONS: usize = 131_072;
/// Distinct targets counted per bucket and workload (beyond: each new one counts).
const MAX_TARGETS: usize = 4096;
/// Flows attached to an anomaly.
pub const MAX_ANOMALY_FLOWS: usize = 5;
/// An address a pod had is still that pod's workload for this long after.
const RECENT_POD_NS: i128 = 900_000_000_000;
/// /24s with pods remembered.
const MAX_SUBNETS: usize = 4096;
/// A second.
const SEC_NS: i128 = 1_000_000_000;
/// Dedupe entries kept.
const MAX_REPORTED: usize = 16_384;
/// Pods whose share of a bucket is tracked per workload.
const MAX_PODS: usize = 64;
/// Empty buckets learnt as zeros when a workload was idle (beyond: an hour is enough).
const MAX_IDLE_BUCKETS: i128 = 360;

/// How the engine learns.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Each workload's learning window from its first flow, seconds.
    pub learning_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config { learning_secs: 600 }
    }
}

/// Why baselines cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    /// The file exists but cannot be read.
    #[error("read baseline file {path}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a baseline file this build understands.
    #[error("baseline file {path} is unreadable (move it away to learn again from nothing)")]
    Parse {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The file has another format version.
    #[error("baseline file {path} has format version {version}, this build reads {FORMAT_VERSION} (move it away to learn again)")]
    Version {
        /// The file.
        path: String,
        /// Its version.
        version: u32,
    },
    /// Encoding failed.
    #[error("encode baselines")]
    Encode(#[source] serde_json::Error),
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] bulkhead_hostnet::fs::WriteError),
}

/// A connection's identity: protocol and both ends, opener first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ConnKey {
    protocol: Protocol,
    source: (Ipv4Addr, u16),
    destination: (Ipv4Addr, u16),
}

impl ConnKey {
    fn of(flow: &Flow) -> Self {
        ConnKey {
            protocol: flow.protocol,
            source: (flow.source.ip, flow.source.port),
            destination: (flow.destination.ip, flow.destination.port),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct ConnState {
    /// Last record's time.
    last_ns: i128,
    /// Last cumulative bytes opener → receiver.
    to_destination: u64,
    /// Last cumulative bytes receiver → opener.
    to_source: u64,
    /// Some record of it was a drop.
    denied: bool,
}

/// Two generations: bounded, and what was used recently survives a turnover.
#[derive(Default)]
struct Connections {
    current: HashMap<ConnKey, ConnState>,
    previous: HashMap<ConnKey, ConnState>,
}

impl Connections {
    fn get(&self, k: &ConnKey) -> Option<ConnState> {
        self.current.get(k).or_else(|| self.previous.get(k)).copied()
    }

    fn put(&mut self, k: ConnKey, v: ConnState) {
        if self.current.len() >= MAX_CONNECTIONS / 2 && !self.current.contains_key(&k) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(k, v);
    }

    fn remove(&mut self, k: &ConnKey) {
        self.current.remove(k);
        self.previous.remove(k);
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// A workload's measurements in the bucket being filled.
#[derive(Default)]
struct Live {
    bucket: i128,
    connections: u64,
    targets: HashSet<(String, Protocol, u16)>,
    denied_targets: u64,
    fanout: f64,
    bytes: u64,
    bytes_previous: u64,
    fanout_pods: HashMap<String, f64>,
    bytes_pods: HashMap<String, u64>,
    /// Each pod's bytes in the bucket before, for the same sliding window as `bytes_previous`
    /// (naming the pod from this bucket alone named whoever sent a little after a bucket
    /// boundary, not the pod whose bytes filled the window).
    bytes_pods_previous: HashMap<String, u64>,
    fanout_flows: VecDeque<Flow>,
    bytes_flows: VecDeque<Flow>,
}

impl Live {
    fn new(bucket: i128) -> Self {
        Live { bucket, ..Live::default() }
    }
}

/// What the engine has done, for metrics and status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Flow records seen.
    pub flows: u64,
    /// Connections counted (once each).
    pub connections: u64,
    /// Records of pods with no workload labels, or of workloads past [`MAX_WORKLOADS`].
    pub unattributed: u64,
    /// Anomalies raised, by kind.
    pub anomalies: BTreeMap<AnomalyKind, u64>,
    /// Anomalies suppressed as repeats.
    pub deduplicated: u64,
}

/// The engine: every workload's baseline and live measurements.
pub struct Engine {
    config: Config,
    baselines: HashMap<String, Baseline>,
    live: HashMap<String, Live>,
    connections: Connections,
    /// (kind, workload, peer) → (time reported, score reported).
    reported: HashMap<(AnomalyKind, String, String), (i128, f64)>,
    pods: RecentPods,
    stats: Stats,
}

/// Addresses pods had recently, and the /24s pods were seen in: a record whose address
/// the agent could not name (the pod just went, or is too new for the resolver) is still
/// that workload, or at least not the outside world.
#[derive(Default)]
struct RecentPods {
    current: HashMap<Ipv4Addr, (String, String, i128)>,
    previous: HashMap<Ipv4Addr, (String, String, i128)>,
    subnets: HashMap<[u8; 3], i128>,
}

impl RecentPods {
    fn note(&mut self, peer: &FlowPeer, t: i128) {
        if peer.namespace.is_none() {
            return;
        }
        let o = peer.ip.octets();
        if self.subnets.len() >= MAX_SUBNETS && !self.subnets.contains_key(&[o[0], o[1], o[2]]) {
            self.subnets.retain(|_, last| t - *last < RECENT_POD_NS);
            if self.subnets.len() >= MAX_SUBNETS {
                return;
            }
        }
        self.subnets.insert([o[0], o[1], o[2]], t);
        if self.current.get(&peer.ip).is_some_and(|(_, _, last)| t - last < SEC_NS) {
            return;
        }
        let (key, text, _) = peer_key(peer);
        if self.current.len() >= MAX_CONNECTIONS / 4 && !self.current.contains_key(&peer.ip) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(peer.ip, (key, text, t));
    }

    fn pod(&self, ip: Ipv4Addr, t: i128) -> Option<(String, String)> {
        let (key, text, last) = self.current.get(&ip).or_else(|| self.previous.get(&ip))?;
        (t - last < RECENT_POD_NS).then(|| (key.clone(), text.clone()))
    }

    fn in_pod_subnet(&self, ip: Ipv4Addr, t: i128) -> bool {
        let o = ip.octets();
        self.subnets.get(&[o[0], o[1], o[2]]).is_some_and(|last| t - last < RECENT_POD_NS)
    }
}

/// How the workload's pod side of a flow is named.
fn workload_of(peer: &FlowPeer) -> Option<Workload> {
    Workload::of(peer.namespace.as_deref()?, &peer.labels)
}

fn workload_key(w: &Workload) -> String {
    format!("{}/{}", w.namespace, w.selector_text())
}

fn aggregate(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("{}.{}.{}.0/24", o[0], o[1], o[2])
}

/// The baseline key of a peer, and how a person reads it.
fn peer_key(peer: &FlowPeer) -> (String, String, bool) {
    match (peer.namespace.as_deref(), workload_of(peer)) {
        (Some(_), Some(w)) => (format!("workload:{}", workload_key(&w)), w.display(), false),
        // A pod without workload labels: its namespace stands for it.
        (Some(ns), None) => (format!("namespace:{ns}"), format!("unlabelled pods of {ns}"), false),
        (None, _) => {
            let a = aggregate(peer.ip);
            (format!("cidr:{a}"), a, true)
        }
    }
}

fn pod_text(peer: &FlowPeer) -> Option<String> {
    peer.pod_name().map(|p| p.to_string())
}

fn secs(ns: i128) -> i64 {
    i64::try_from(ns.div_euclid(1_000_000_000)).unwrap_or(i64::MAX)
}

fn push_bounded(flows: &mut VecDeque<Flow>, flow: &Flow) {
    if flows.len() >= MAX_ANOMALY_FLOWS {
        flows.pop_front();
    }
    flows.push_back(flow.clone());
}

fn alpha() -> f64 {
    let buckets = RATE_HALF_LIFE_SECS / (BUCKET_NS as f64 / 1e9);
    1.0 - 0.5f64.powf(1.0 / buckets)
}

/// An anomaly before dedupe: its key's peer and the anomaly.
struct Raised {
    peer: String,
    anomaly: Anomaly,
}

impl Engine {
    /// An engine that has learnt nothing yet.
    pub fn new(config: Config) -> Self {
        Engine {
            config,
            baselines: HashMap::new(),
            live: HashMap::new(),
            connections: Connections::default(),
            reported: HashMap::new(),
            pods: RecentPods::default(),
            stats: Stats::default(),
        }
    }

    /// The engine with the baselines saved in `path`; a missing file is a fresh start,
    /// anything else unreadable is an error (never a silent return to learning: every
    /// attack during a new learning window would be learnt as normal).
    pub fn load(path: &Path, config: Config) -> Result<Self, BaselineError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Engine::new(config)),
            Err(source) => {
                return Err(BaselineError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let mut engine = Engine::new(config);
        engine.restore(&text).map_err(|e| match e {
            BaselineError::Parse { source, .. } => BaselineError::Parse {
                path: path.display().to_string(),
                source,
            },
            BaselineError::Version { version, .. } => BaselineError::Version {
                path: path.display().to_string(),
                version,
            },
            other => other,
        })?;
        Ok(engine)
    }

    /// Replaces the baselines with saved ones (`bytes` as [`Engine::save`] wrote them).
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), BaselineError> {
        let saved: Saved = serde_json::from_slice(bytes).map_err(|source| BaselineError::Parse {
            path: String::new(),
            source,
        })?;
        if saved.version != FORMAT_VERSION {
            return Err(BaselineError::Version {
                path: String::new(),
                version: saved.version,
            });
        }
        self.baselines = saved
            .workloads
            .into_iter()
            .take(MAX_WORKLOADS)
            .map(|b| {
                let w = Workload {
                    namespace: b.namespace.clone(),
                    selector: b.selector.clone(),
                };
                (workload_key(&w), b)
            })
            .collect();
        Ok(())
    }

    /// The baselines as the file holds them (sorted, so equal baselines are equal bytes).
    pub fn save(&self) -> Result<Vec<u8>, BaselineError> {
        let mut workloads: Vec<Baseline> = self.baselines.values().cloned().collect();
        workloads.sort_by(|a, b| (&a.namespace, &a.selector).cmp(&(&b.namespace, &b.selector)));
        let saved = Saved {
            version: FORMAT_VERSION,
            workloads,
        };
        serde_json::to_vec(&saved).map_err(BaselineError::Encode)
    }

    /// Writes [`Engine::save`]'s bytes to `path` atomically (mode 0600).
    pub fn save_to(bytes: &[u8], path: &Path) -> Result<(), BaselineError> {
        bulkhead_hostnet::fs::write_atomic(path, bytes, 0o600)?;
        Ok(())
    }

    /// What the engine has done.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Workloads known, and of those still learning at `now`.
    pub fn workloads(&self, now: jiff::Timestamp) -> (usize, usize) {
        let now = secs(now.as_nanosecond());
        let learning = self.baselines.values().filter(|b| self.learning(b, now)).count();
        (self.baselines.len(), learning)
    }

    /// Connections whose byte counts are remembered.
    pub fn tracked_connections(&self) -> usize {
        self.connections.len()
    }

    /// Forgets peers, ports and namespaces unseen for long ([`FORGET_CANDIDATE_SECS`],
    /// [`FORGET_LEARNT_SECS`]); returns how many entries went.
    pub fn prune(&mut self, now: jiff::Timestamp) -> usize {
        let now = secs(now.as_nanosecond());
        let keep = |s: &Seen| now - s.last < if s.learnt { FORGET_LEARNT_SECS } else { FORGET_CANDIDATE_SECS };
        let mut gone = 0;
        for b in self.baselines.values_mut() {
            for map in [&mut b.egress, &mut b.ingress] {
                for p in map.values_mut() {
                    let before = p.ports.len();
                    p.ports.retain(|_, s| keep(s));
                    gone += before - p.ports.len();
                }
                let before = map.len();
                map.retain(|_, p| keep(&p.seen));
                gone += before - map.len();
            }
            let before = b.namespaces.len();
            b.namespaces.retain(|_, s| keep(s));
            gone += before - b.namespaces.len();
        }
        gone
    }

    /// The baseline of the workload of pods with `labels` in `namespace`.
    pub fn baseline(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Option<&Baseline> {
        self.baselines.get(&workload_key(&Workload::of(namespace, labels)?))
    }

    fn learning(&self, b: &Baseline, now_secs: i64) -> bool {
        learning_at(self.config.learning_secs, b, now_secs)
    }

    /// Learns from one flow record; returns the anomalies it raised (deduplicated),
    /// timed `now`.
    pub fn observe(&mut self, flow: &Flow, now: jiff::Timestamp) -> Vec<Anomaly> {
        self.stats.flows += 1;
        let t = flow.time.as_nanosecond();
        self.pods.note(&flow.source, t);
        self.pods.note(&flow.destination, t);
        let raised = match flow.kind {
            FlowKind::Packet if flow.is_reply => Vec::new(),
            FlowKind::Packet => self.on_packet(flow, now),
            FlowKind::Update | FlowKind::End => self.on_bytes(flow, now),
        };
        let mut out = Vec::new();
        for r in raised {
            if self.fresh(&r) {
                *self.stats.anomalies.entry(r.anomaly.kind).or_default() += 1;
                out.push(r.anomaly);
            } else {
                self.stats.deduplicated += 1;
            }
        }
        out
    }

    /// Where `peer` is: `(baseline key, text, outside)`; `None` for an address in a pod
    /// subnet that no pod is known to have had recently.
    fn place(&self, peer: &FlowPeer, t: i128) -> Option<(String, String, bool)> {
        if peer.namespace.is_some() {
            return Some(peer_key(peer));
        }
        if let Some((key, text)) = self.pods.pod(peer.ip, t) {
            return Some((key, text, false));
        }
        if self.pods.in_pod_subnet(peer.ip, t) {
            return None;
        }
        Some(peer_key(peer))
    }

    /// Whether an anomaly is not a repeat: first for its key in [`DEDUPE_NS`], or twice
    /// the score last reported.
    fn fresh(&mut self, r: &Raised) -> bool {
        let at = r.anomaly.time.as_nanosecond();
        let key = (
            r.anomaly.kind,
            format!("{}/{}", r.anomaly.namespace, r.anomaly.workload),
            r.peer.clone(),
        );
        if let Some((t, score)) = self.reported.get(&key) {
            if at - t < DEDUPE_NS && r.anomaly.score < 2.0 * score {
                return false;
            }
        }
        if self.reported.len() >= MAX_REPORTED {
            self.reported.retain(|_, (t, _)| at - *t < DEDUPE_NS);
            if self.reported.len() >= MAX_REPORTED {
                self.reported.clear();
            }
        }
        self.reported.insert(key, (at, r.anomaly.score));
        true
    }

    /// The baseline and live bucket of `w`, rolled forward to `t_ns`; `None` past the cap.
    fn workload(&mut self, w: &Workload, t_ns: i128) -> Option<String> {
        let key = workload_key(w);
        if !self.baselines.contains_key(&key) {
            if self.baselines.len() >= MAX_WORKLOADS {
                self.stats.unattributed += 1;
                return None;
            }
            self.baselines.insert(
                key.clone(),
                Baseline {
                    namespace: w.namespace.clone(),
                    selector: w.selector.clone(),
                    name: w.short_name(),
                    first: secs(t_ns),
                    egress: BTreeMap::new(),
                    ingress: BTreeMap::new(),
                    namespaces: BTreeMap::new(),
                    connections: Rate::default(),
                    fanout: Rate::default(),
                    external_bytes: Rate::default(),
                },
            );
        }
        self.roll(&key, t_ns);
        Some(key)
    }

    /// Closes the buckets of `key` before `t_ns`'s, learning their values.
    fn roll(&mut self, key: &str, t_ns: i128) {
        let bucket = t_ns.div_euclid(BUCKET_NS);
        let live = self.live.entry(key.to_string()).or_insert_with(|| Live::new(bucket));
        if bucket <= live.bucket {
            return;
        }
        let Some(b) = self.baselines.get_mut(key) else { return };
        let learning_until = b.first.saturating_add(i64::try_from(self.config.learning_secs).unwrap_or(i64::MAX));
        let steps = (bucket - live.bucket).min(MAX_IDLE_BUCKETS);
        for i in 0..steps {
            let closed_end = secs((live.bucket + i + 1) * BUCKET_NS);
            let learning = closed_end <= learning_until;
            let alpha = (!learning).then(alpha);
            let (c, f, x) = if i == 0 {
                (live.connections as f64, live.fanout, live.bytes as f64)
            } else {
                (0.0, 0.0, 0.0)
            };
            let learn = |rate: &mut Rate, value: f64, factor: f64, floor: f64| {
                // After learning, an anomalous bucket is not absorbed.
                if learning || value * PER_MINUTE <= rate.threshold(factor, floor) {
                    rate.learn(value * PER_MINUTE, alpha);
                }
            };
            learn(&mut b.connections, c, f64::INFINITY, f64::INFINITY);
            learn(&mut b.fanout, f, SCAN_FACTOR, SCAN_FLOOR);
            learn(&mut b.external_bytes, x, EXFIL_FACTOR, EXFIL_FLOOR);
        }
        let (previous, previous_pods) = if bucket - live.bucket == 1 {
            (live.bytes, std::mem::take(&mut live.bytes_pods))
        } else {
            (0, HashMap::new())
        };
        *live = Live::new(bucket);
        live.bytes_previous = previous;
        live.bytes_pods_previous = previous_pods;
    }

    fn on_packet(&mut self, flow: &Flow, now: jiff::Timestamp) -> Vec<Raised> {
        let t = flow.time.as_nanosecond();
        let key = ConnKey::of(flow);
        if let Some(c) = self.connections.get(&key) {
            if (t - c.last_ns).abs() < SAME_CONNECTION_NS {
                // The other node's record of it, or a retransmission.
                let denied = flow.verdict == FlowVerdict::Dropped;
                self.connections.put(
                    key,
                    ConnState {
                        last_ns: t.max(c.last_ns),
                        denied: c.denied || denied,
                        ..c
                    },
                );
                if denied && !c.denied {
                    return self.denied_later(flow, now);
                }
                return Vec::new();
            }
        }
        self.connections.put(
            key,
            ConnState {
                last_ns: t,
                denied: flow.verdict == FlowVerdict::Dropped,
                ..ConnState::default()
            },
        );
        self.stats.connections += 1;
        let mut out = Vec::new();
        let now_secs = secs(t);
        // The receiver learns who opens connections to it.
        if let Some(w) = workload_of(&flow.destination) {
            let place = self.place(&flow.source, t);
            if let (Some(k), Some((peer, _, _))) = (self.workload(&w, t), place) {
                let port = format!("{}/{}", flow.destination.port, flow.protocol);
                if let Some(b) = self.baselines.get_mut(&k) {
                    let learning = learning_at(self.config.learning_secs, b, now_secs);
                    record(&mut b.ingress, &peer, &port, now_secs, learning);
                }
            }
        }
        let Some(w) = workload_of(&flow.source) else {
            if flow.source.namespace.is_some() {
                self.stats.unattributed += 1;
            }
            return out;
        };
        let Some(k) = self.workload(&w, t) else { return out };
        // An address in a pod subnet that no pod is known to have: a pod the resolver does
        // not know yet (or any more). Never an outside destination; only its fan-out counts.
        let place = self.place(&flow.destination, t);
        let unresolved = place.is_none();
        let (peer, peer_text, outside) = place.unwrap_or_else(|| (String::new(), flow.destination.ip.to_string(), true));
        let port = format!("{}/{}", flow.destination.port, flow.protocol);
        let denied = flow.verdict == FlowVerdict::Dropped;
        let pod = pod_text(&flow.source);
        let Some(b) = self.baselines.get_mut(&k) else { return out };
        let learning = learning_at(self.config.learning_secs, b, now_secs);
        let peer_learnt = b.egress.get(&peer).is_some_and(|p| p.seen.learnt);
        let port_learnt = b.egress.get(&peer).and_then(|p| p.ports.get(&port)).is_some_and(|s| s.learnt);
        let namespace = flow.destination.namespace.clone();
        let namespace_learnt = namespace.as_ref().is_none_or(|ns| b.namespaces.get(ns).is_some_and(|s| s.learnt));
        let received_before = b.ingress.contains_key(&peer);
        if !unresolved {
            record(&mut b.egress, &peer, &port, now_secs, learning);
        }
        if let Some(ns) = &namespace {
            if insert_bounded(&mut b.namespaces, ns, MAX_PEERS, || Seen::new(now_secs, learning), |s| s) {
                if let Some(s) = b.namespaces.get_mut(ns) {
                    s.touch(now_secs, learning, PROMOTE_MINUTES);
                }
            }
        }
        let anomaly = |kind: AnomalyKind, score: f64, explanation: String, flows: Vec<Flow>| Anomaly {
            time: now,
            kind,
            score,
            namespace: b.namespace.clone(),
            workload: b.name.clone(),
            pod: flow.source.pod_name(),
            explanation,
            flows,
            response: None,
        };
        let verb = if denied { "tried to connect" } else { "connected" };
        let who = pod.clone().unwrap_or_else(|| flow.source.ip.to_string());
        if !learning && !unresolved {
            if !peer_learnt && outside {
                out.push(Raised {
                    peer: peer.clone(),
                    anomaly: anomaly(
                        AnomalyKind::NewExternal,
                        1.0,
                        format!(
                            "{who} {verb} to {}:{} ({}), outside every address range {} was seen using",
                            flow.destination.ip, port, peer_text, b.name
                        ),
                        vec![flow.clone()],
                    ),
                });
            } else if !peer_learnt {
                let (score, ns_note) = if namespace_learnt {
                    (1.0, String::new())
                } else {
                    (
                        1.5,
                        format!(", in namespace {} it never talked to", namespace.as_deref().unwrap_or("")),
                    )
                };
                let reverse = if received_before { " (it was only seen the other way)" } else { "" };
                out.push(Raised {
                    peer: peer.clone(),
                    anomaly: anomaly(
                        AnomalyKind::NewPeer,
                        score,
                        format!(
                            "{who} {verb} to {peer_text} on {port}{ns_note}: a peer {} never opened a connection to{reverse}",
                            b.name
                        ),
                        vec![flow.clone()],
                    ),
                });
            } else if !port_learnt {
                out.push(Raised {
                    peer: peer.clone(),
                    anomaly: anomaly(
                        AnomalyKind::NewPort,
                        1.0,
                        format!(
                            "{who} {verb} to {peer_text} on {port}: {} talks to that peer, never on that port",
                            b.name
                        ),
                        vec![flow.clone()],
                    ),
                });
            }
        }
        // Fan-out: distinct targets in this bucket (an outside target by its address).
        let target_peer = if outside || unresolved {
            flow.destination.ip.to_string()
        } else {
            peer.clone()
        };
        let Some(live) = self.live.get_mut(&k) else { return out };
        live.connections += 1;
        let target = (target_peer, flow.protocol, flow.destination.port);
        let new_target = live.targets.len() >= MAX_TARGETS || live.targets.insert(target);
        if new_target {
            let weight = if denied { DENIED_WEIGHT } else { 1.0 };
            live.fanout += weight;
            live.denied_targets += u64::from(denied);
            if let Some(p) = &pod {
                if live.fanout_pods.len() < MAX_PODS || live.fanout_pods.contains_key(p) {
                    *live.fanout_pods.entry(p.clone()).or_default() += weight;
                }
            }
            push_bounded(&mut live.fanout_flows, flow);
            if !learning {
                out.extend(self.scan_check(&k, now));
            }
        }
        out
    }

    /// A scan when the bucket's weighted fan-out of `k` is at or above its threshold.
    fn scan_check(&self, k: &str, now: jiff::Timestamp) -> Option<Raised> {
        let (b, live) = (self.baselines.get(k)?, self.live.get(k)?);
        let value = live.fanout * PER_MINUTE;
        let threshold = b.fanout.threshold(SCAN_FACTOR, SCAN_FLOOR);
        if value < threshold {
            return None;
        }
        let top = top_pod(&live.fanout_pods);
        let explanation = format!(
            "{} reached {} distinct peer ports in 10 s ({} denied): {:.0}/min weighted, against a learnt {:.1}/min (threshold {:.0}/min)",
            top.as_deref().unwrap_or(&b.name),
            live.targets.len(),
            live.denied_targets,
            value,
            b.fanout.mean,
            threshold
        );
        Some(Raised {
            peer: top.clone().unwrap_or_default(),
            anomaly: Anomaly {
                time: now,
                kind: AnomalyKind::Scan,
                score: value / threshold,
                namespace: b.namespace.clone(),
                workload: b.name.clone(),
                pod: top.and_then(|p| p.parse().ok()),
                explanation,
                flows: live.fanout_flows.iter().cloned().collect(),
                response: None,
            },
        })
    }

    /// A connection first counted as allowed turned out denied (the receiver's node
    /// dropped it): its target weighs [`DENIED_WEIGHT`] after all.
    fn denied_later(&mut self, flow: &Flow, now: jiff::Timestamp) -> Vec<Raised> {
        let Some(w) = workload_of(&flow.source) else { return Vec::new() };
        let k = workload_key(&w);
        let learning = match self.baselines.get(&k) {
            Some(b) => learning_at(self.config.learning_secs, b, secs(flow.time.as_nanosecond())),
            None => return Vec::new(),
        };
        let Some(live) = self.live.get_mut(&k) else { return Vec::new() };
        if flow.time.as_nanosecond().div_euclid(BUCKET_NS) != live.bucket {
            return Vec::new();
        }
        live.fanout += DENIED_WEIGHT - 1.0;
        live.denied_targets += 1;
        if let Some(p) = pod_text(&flow.source) {
            if let Some(share) = live.fanout_pods.get_mut(&p) {
                *share += DENIED_WEIGHT - 1.0;
            }
        }
        push_bounded(&mut live.fanout_flows, flow);
        if learning {
            return Vec::new();
        }
        self.scan_check(&k, now).into_iter().collect()
    }

    fn on_bytes(&mut self, flow: &Flow, now: jiff::Timestamp) -> Vec<Raised> {
        let Some(bytes) = flow.bytes else { return Vec::new() };
        let t = flow.time.as_nanosecond();
        let key = ConnKey::of(flow);
        let (to_destination, to_source) = match self.connections.get(&key) {
            Some(c) => (
                bytes.to_destination.saturating_sub(c.to_destination),
                bytes.to_source.saturating_sub(c.to_source),
            ),
            // Counts of a connection opened before the engine saw it: only what follows
            // is new (else a relay restart would look like a burst).
            None => (0, 0),
        };
        if flow.kind == FlowKind::End {
            self.connections.remove(&key);
        } else {
            let previous = self.connections.get(&key).unwrap_or_default();
            self.connections.put(
                key,
                ConnState {
                    last_ns: t,
                    to_destination: bytes.to_destination.max(previous.to_destination),
                    to_source: bytes.to_source.max(previous.to_source),
                    denied: previous.denied,
                },
            );
        }
        // Bytes from a pod to an address outside the pods, whichever side opened.
        let outside = |p: &FlowPeer| p.namespace.is_none() && self.place(p, t).is_some_and(|(_, _, o)| o);
        let (pod_side, out_bytes) = if flow.source.namespace.is_some() && outside(&flow.destination) {
            (&flow.source, to_destination)
        } else if flow.destination.namespace.is_some() && outside(&flow.source) {
            (&flow.destination, to_source)
        } else {
            return Vec::new();
        };
        if out_bytes == 0 {
            return Vec::new();
        }
        let Some(w) = workload_of(pod_side) else {
            self.stats.unattributed += 1;
            return Vec::new();
        };
        let Some(k) = self.workload(&w, t) else { return Vec::new() };
        let (Some(b), Some(live)) = (self.baselines.get(&k), self.live.get_mut(&k)) else {
            return Vec::new();
        };
        live.bytes = live.bytes.saturating_add(out_bytes);
        let pod = pod_text(pod_side);
        if let Some(p) = &pod {
            if live.bytes_pods.len() < MAX_PODS || live.bytes_pods.contains_key(p) {
                *live.bytes_pods.entry(p.clone()).or_default() += out_bytes;
            }
        }
        push_bounded(&mut live.bytes_flows, flow);
        if learning_at(self.config.learning_secs, b, secs(t)) {
            return Vec::new();
        }
        // A sliding 10 s window: this bucket and the part of the last one it still covers.
        let into = (t.rem_euclid(BUCKET_NS)) as f64 / BUCKET_NS as f64;
        let window = live.bytes as f64 + live.bytes_previous as f64 * (1.0 - into);
        let value = window * PER_MINUTE;
        let threshold = b.external_bytes.threshold(EXFIL_FACTOR, EXFIL_FLOOR);
        if value < threshold {
            return Vec::new();
        }
        // The pod with the largest share of the same window.
        let mut shares: HashMap<String, f64> = live.bytes_pods.iter().map(|(p, v)| (p.clone(), *v as f64)).collect();
        for (p, v) in &live.bytes_pods_previous {
            *shares.entry(p.clone()).or_default() += *v as f64 * (1.0 - into);
        }
        let top = top_pod(&shares);
        let who = top.clone().unwrap_or_else(|| b.name.clone());
        let anomaly = Anomaly {
            time: now,
            kind: AnomalyKind::Exfiltration,
            score: value / threshold,
            namespace: b.namespace.clone(),
            workload: b.name.clone(),
            pod: top.and_then(|p| p.parse().ok()),
            explanation: format!(
                "{who} sent {:.0} bytes outside the cluster in 10 s ({:.0}/min, last to {}), against a learnt {:.0}/min (threshold {:.0}/min)",
                window,
                value,
                if pod_side == &flow.source { flow.destination.ip } else { flow.source.ip },
                b.external_bytes.mean,
                threshold
            ),
            flows: live.bytes_flows.iter().cloned().collect(),
            response: None,
        };
        vec![Raised {
            peer: anomaly.pod.as_ref().map(ToString::to_string).unwrap_or_default(),
            anomaly,
        }]
    }
}

/// Whether `b` still learns at `now_secs`.
fn learning_at(learning_secs: u64, b: &Baseline, now_secs: i64) -> bool {
    now_secs < b.first.saturating_add(i64::try_from(learning_secs).unwrap_or(i64::MAX))
}

/// Records a sighting of `peer` on `port` in a direction's map.
fn record(map: &mut BTreeMap<String, PeerSeen>, peer: &str, port: &str, now: i64, learning: bool) {
    let fresh = || PeerSeen {
        seen: Seen::new(now, learning),
        ports: BTreeMap::new(),
    };
    if !insert_bounded(map, peer, MAX_PEERS, fresh, |p| &p.seen) {
        return;
    }
    let Some(p) = map.get_mut(peer) else { return };
    p.seen.touch(now, learning, PROMOTE_MINUTES);
    if insert_bounded(&mut p.ports, port, MAX_PORTS, || Seen::new(now, learning), |s| s) {
        if let Some(s) = p.ports.get_mut(port) {
            s.touch(now, learning, PROMOTE_MINUTES);
        }
    }
}

/// The pod with the largest share, if any.
fn top_pod(shares: &HashMap<String, f64>) -> Option<String> {
    shares
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(p, _)| p.clone())
}
