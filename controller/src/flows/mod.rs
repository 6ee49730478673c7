//! Flow records: the reader of the datapath's ring buffer, the naming of what its numbers
//! mean (pods, policies), a bounded history and a stream for `bulkhead observe` followers.
//!
//! Nothing here waits on a client: the reader pushes into the history and a broadcast
//! channel and moves on; a follower that reads too slowly misses flows (counted in
//! [`FlowStats::follower_lag_drops`]), the datapath and the agent never wait for it.

pub mod forensics;
mod reader;
mod resolve;
pub mod sequence;
pub mod stream;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bulkhead_api::{Direction, Flow, FlowKind, FlowVerdict, NamespacedName, ObserveRequest, Response, StreamHeader};
use bulkhead_common::{DropReason, FlowEvent};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{broadcast, watch};

use self::forensics::{ForensicStore, ForensicsError, KeptFlow};
use self::sequence::Sequence;

pub use reader::{decode, spawn_reader, Clock, FlowsError};
use resolve::Named;
pub use resolve::{PodIndex, Resolver};

/// Flows kept in memory when `--flow-history` is not given.
pub const DEFAULT_HISTORY: usize = 8192;
/// Flows a follower may fall behind by before it starts missing some.
const FOLLOW_BUFFER: usize = 4096;
/// Events drained from the ring in one go before other tasks get a turn.
pub(crate) const DRAIN_BATCH: usize = 1024;

/// Counts for metrics; a snapshot from [`FlowStore::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Flow records by verdict and direction (packet records: new flows and drops; byte
    /// reports are in `byte_reports`).
    pub flows: BTreeMap<(FlowVerdict, Direction), u64>,
    /// Byte reports of tracked connections: `[update, end]`.
    pub byte_reports: [u64; 2],
    /// Flow records naming a policy: (policy, verdict) → count. A forwarded flow
    /// counts for the policy that allowed it, a dropped one for each policy isolating the pod.
    pub by_policy: BTreeMap<(NamespacedName, FlowVerdict), u64>,
    /// Events the datapath could not put into the ring buffer (it was full).
    pub lost_events: u64,
    /// Flows followers missed because they read too slowly.
    pub follower_lag_drops: u64,
    /// Events with a verdict or direction the agent does not know, skipped.
    pub undecodable: u64,
    /// Flows in the history now.
    pub stored: usize,
}

/// A flow in the history, with its time as a number for `since` and its sequence number
/// on this node. Cheap to clone (what it names is shared): followers get clones.
#[derive(Clone, Debug)]
struct Stored {
    unix_ns: i128,
    seq: u64,
    body: Body,
}

/// What a stored flow holds.
#[derive(Clone, Debug)]
enum Body {
    /// An event from the ring, named when it was recorded; made into a [`Flow`] only when
    /// read.
    Event(Named),
    /// A flow stored as it is (tests of the stream and the relay).
    #[cfg(test)]
    Flow(Arc<Flow>),
}

impl Stored {
    /// The flow users see, as node `node` reports it.
    fn flow(&self, node: &str) -> Cow<'_, Flow> {
        match &self.body {
            Body::Event(named) => Cow::Owned(named.flow(node)),
            #[cfg(test)]
            Body::Flow(flow) => Cow::Borrowed(flow),
        }
    }
}

/// The counters behind [`FlowStats`], kept in a shape the reader updates without
/// allocating (a policy's name is copied only the first time it is counted).
#[derive(Default)]
struct Counts {
    flows: BTreeMap<(FlowVerdict, Direction), u64>,
    byte_reports: [u64; 2],
    /// Policy → count by verdict ([`verdict_index`]).
    by_policy: BTreeMap<NamespacedName, [u64; 3]>,
    lost_events: u64,
    follower_lag_drops: u64,
    undecodable: u64,
}

const VERDICTS: [FlowVerdict; 3] = [FlowVerdict::Forwarded, FlowVerdict::Dropped, FlowVerdict::Audit];

fn verdict_index(v: FlowVerdict) -> usize {
    match v {
        FlowVerdict::Forwarded => 0,
        FlowVerdict::Dropped => 1,
        FlowVerdict::Audit => 2,
    }
}

impl Counts {
    fn count(&mut self, named: &Named) {
        // A byte report is no new flow: it counts apart, for no policy.
        match named.kind() {
            FlowKind::Packet => {}
            FlowKind::Update => return self.byte_reports[0] += 1,
            FlowKind::End => return self.byte_reports[1] += 1,
        }
        let (verdict, direction) = (named.verdict(), named.direction());
        *self.flows.entry((verdict, direction)).or_default() += 1;
        for policy in named.policies() {
            match self.by_policy.get_mut(policy) {
                Some(counts) => counts[verdict_index(verdict)] += 1,
                None => {
                    let mut counts = [0; 3];
                    counts[verdict_index(verdict)] = 1;
                    self.by_policy.insert(policy.clone(), counts);
                }
            }
        }
    }

    fn snapshot(&self) -> FlowStats {
        let by_policy = self
            .by_policy
            .iter()
            .flat_map(|(policy, counts)| {
                VERDICTS
                    .iter()
                    .zip(counts)
                    .filter(|(_, n)| **n > 0)
                    .map(|(v, n)| ((policy.clone(), *v), *n))
            })
            .collect();
        FlowStats {
            flows: self.flows.clone(),
            byte_reports: self.byte_reports,
            by_policy,
            lost_events: self.lost_events,
            follower_lag_drops: self.follower_lag_drops,
            undecodable: self.undecodable,
            stored: 0,
        }
    }
}

/// The bounded history of flows and the channel followers listen on.
pub struct FlowStore {
    node: String,
    capacity: usize,
    clock: Clock,
    /// Sequence numbers are dense: the history holds `front.seq ..= back.seq`.
    history: Mutex<VecDeque<Stored>>,
    /// Locked only inside `history`'s lock.
    sequence: Mutex<Sequence>,
    /// The next sequence number, for flow-stream readers waiting for new records.
    next_seq: watch::Sender<u64>,
    followers: broadcast::Sender<Stored>,
    resolver: RwLock<Arc<Resolver>>,
    stats: Mutex<Counts>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Where the flows of deleted and quarantined pods are kept beyond the history.
    forensics: Option<Arc<ForensicStore>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind, still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FlowStore {
    /// A store keeping the last `capacity` flows of node `node`.
    pub fn new(node: &str, capacity: usize, clock: Clock) -> Self {
        let (followers, _) = broadcast::channel(FOLLOW_BUFFER);
        let sequence = Sequence::in_memory();
        let (next_seq, _) = watch::channel(sequence.next());
        FlowStore {
            node: node.to_string(),
            capacity,
            clock,
            history: Mutex::new(VecDeque::with_capacity(capacity.min(DEFAULT_HISTORY))),
            sequence: Mutex::new(sequence),
            next_seq,
            followers,
            resolver: RwLock::new(Arc::new(Resolver::empty(node))),
            stats: Mutex::new(Counts::default()),
            metrics: None,
            forensics: None,
        }
    }

    /// Numbers records from `sequence` (the agent's persisted one) instead of memory.
    pub fn with_sequence(self, sequence: Sequence) -> Self {
        self.next_seq.send_replace(sequence.next());
        *lock(&self.sequence) = sequence;
        self
    }

    /// Keeps the flows of deleted and quarantined pods in `forensics`, and answers pod
    /// queries from it too.
    pub fn with_forensics(mut self, forensics: Arc<ForensicStore>) -> Self {
        self.forensics = Some(forensics);
        self
    }

    /// The forensic store, if any.
    pub fn forensics(&self) -> Option<&Arc<ForensicStore>> {
        self.forensics.as_ref()
    }

    /// The node this store reports for.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Replaces what flows are named with (after every reprogram).
    pub fn set_resolver(&self, resolver: Resolver) {
        let mut r = self.resolver.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *r = Arc::new(resolver);
    }

    /// Also counts every recorded flow in `metrics` (flows and policy verdicts).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Names, stores and broadcasts a batch of events from the ring buffer. Allocates
    /// nothing once the history is full: names are shared, flows are made when read.
    pub fn record(&self, events: &[FlowEvent]) {
        let resolver = self.resolver.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let name = |ev: &FlowEvent| {
            let unix_ns = self.clock.unix_ns(ev.timestamp_ns);
            resolver.name(ev, unix_ns).map(|named| (unix_ns, named))
        };
        let mut named = 0;
        {
            let mut stats = lock(&self.stats);
            for (_, n) in events.iter().filter_map(name) {
                named += 1;
                stats.count(&n);
                if n.kind() != FlowKind::Packet {
                    if let Some(m) = &self.metrics {
                        m.record_byte_report(n.kind());
                    }
                    continue;
                }
                if let Some(m) = &self.metrics {
                    let verdict = match n.verdict() {
                        FlowVerdict::Forwarded => "forwarded",
                        FlowVerdict::Dropped => "dropped",
                        FlowVerdict::Audit => "audit",
                    };
                    m.record_flow(verdict, n.direction().as_str(), n.policy_label());
                    if let Some(svc) = n.service_label() {
                        m.record_translation(verdict, svc);
                    }
                }
            }
            stats.undecodable += (events.len() - named) as u64;
        }
        if self.capacity == 0 || named == 0 {
            return;
        }
        // Named twice (cheap: a few lookups) rather than collected, so nothing is allocated.
        self.store(named, events.iter().filter_map(name).map(|(unix_ns, n)| (unix_ns, Body::Event(n))));
    }

    /// Stores flows directly (tests of the stream and the relay).
    #[cfg(test)]
    pub(crate) fn record_flows_for_tests(&self, flows: Vec<Flow>) {
        if self.capacity == 0 || flows.is_empty() {
            return;
        }
        let count = flows.len();
        self.store(count, flows.into_iter().map(|f| (f.time.as_nanosecond(), Body::Flow(Arc::new(f)))));
    }

    /// Numbers, stores and broadcasts `count` flows.
    fn store(&self, count: usize, flows: impl Iterator<Item = (i128, Body)>) {
        let watching = self.forensics.as_ref().is_some_and(|f| f.watching());
        let mut fresh = Vec::new();
        let mut history = lock(&self.history);
        // Numbered (and the numbers persisted) before anyone can see them: a successor
        // agent never reuses a number a reader may hold.
        let first = lock(&self.sequence).take(count as u64);
        for (seq, (unix_ns, body)) in (first..).zip(flows.take(count)) {
            let s = Stored { unix_ns, seq, body };
            if history.len() == self.capacity {
                history.pop_front();
            }
            // Sent under the history lock so that a new follower sees each flow exactly once
            // (in its snapshot or on its receiver). No receivers is not an error.
            let _ = self.followers.send(s.clone());
            if watching {
                fresh.push(s.clone());
            }
            history.push_back(s);
        }
        self.next_seq.send_replace(first + count as u64);
        let epoch = lock(&self.sequence).epoch();
        drop(history);
        // Quarantined pods' flows reach their files here, outside the history's lock.
        if let (Some(forensics), false) = (&self.forensics, fresh.is_empty()) {
            let kept: Vec<KeptFlow> = fresh.iter().map(|s| self.kept(epoch, s)).collect();
            forensics.append(&kept);
        }
    }

    fn kept(&self, epoch: u64, s: &Stored) -> KeptFlow {
        KeptFlow {
            epoch,
            seq: s.seq,
            flow: s.flow(&self.node).into_owned(),
        }
    }

    /// The flows of the history `filter` matches, with their sequence numbers.
    fn kept_matching(&self, filter: &bulkhead_api::FlowFilter, since: Option<u64>) -> Vec<KeptFlow> {
        self.kept_matching_then(filter, since, false).0
    }

    /// [`FlowStore::kept_matching`], and with `follow` a receiver of everything after it
    /// (subscribed under the history's lock: each flow is seen exactly once).
    fn kept_matching_then(
        &self,
        filter: &bulkhead_api::FlowFilter,
        since: Option<u64>,
        follow: bool,
    ) -> (Vec<KeptFlow>, Option<broadcast::Receiver<Stored>>) {
        let (epoch, held, rx) = {
            let history = lock(&self.history);
            let epoch = lock(&self.sequence).epoch();
            let held: Vec<Stored> = history
                .iter()
                .filter(|s| since.is_none_or(|since| s.unix_ns >= i128::from(since)))
                .cloned()
                .collect();
            (epoch, held, follow.then(|| self.followers.subscribe()))
        };
        let flows = held
            .iter()
            .map(|s| self.kept(epoch, s))
            .filter(|k| filter.matches(&k.flow))
            .collect();
        (flows, rx)
    }

    /// The history's flows of `pod`, with their sequence numbers.
    pub fn pod_flows(&self, pod: &NamespacedName) -> Vec<KeptFlow> {
        let filter = bulkhead_api::FlowFilter {
            pod: Some(pod.clone()),
            ..Default::default()
        };
        self.kept_matching(&filter, None)
    }

    /// The seam for quarantine: from now on `record.pod`'s flows (the history's first) are
    /// kept on disk as they arrive, until [`FlowStore::release_forensics`] or its deletion.
    /// Idempotent: call it when a quarantine begins and, for every pod still quarantined,
    /// when the agent starts (which pods are kept is not itself persisted). `record` is the
    /// pod's record from the model ([`forensics::describe`]). Without a forensic store,
    /// nothing.
    pub fn keep_forensics(
        &self,
        record: bulkhead_api::ForensicsBundle,
        quarantine: bulkhead_api::QuarantineInfo,
    ) -> Result<(), ForensicsError> {
        let Some(forensics) = &self.forensics else { return Ok(()) };
        let flows = self.pod_flows(&record.pod);
        forensics.keep(record, quarantine, flows)
    }

    /// The seam for quarantine: `pod`'s quarantine was lifted; what was kept stays (bounded
    /// as every record), new flows are no longer appended.
    pub fn release_forensics(&self, pod: &NamespacedName) -> Result<(), ForensicsError> {
        match &self.forensics {
            Some(forensics) => forensics.release(pod),
            None => Ok(()),
        }
    }

    /// Which of `pods` the forensic store would keep on deletion: those the history holds
    /// flows of, and those kept already (quarantined). Empty without a forensic store. One
    /// pass over the history, whatever the number of pods.
    pub fn pods_to_keep(&self, pods: &BTreeSet<NamespacedName>) -> BTreeSet<NamespacedName> {
        let Some(forensics) = &self.forensics else {
            return BTreeSet::new();
        };
        if pods.is_empty() {
            return BTreeSet::new();
        }
        let mut out: BTreeSet<NamespacedName> = forensics.kept().into_keys().filter(|p| pods.contains(p)).collect();
        for k in self.kept_matching(&bulkhead_api::FlowFilter::default(), None) {
            for peer in [&k.flow.source, &k.flow.destination] {
                if let Some(p) = peer.pod_name().filter(|p| pods.contains(p)) {
                    out.insert(p);
                }
            }
        }
        out
    }

    /// Keeps deleted pods' flows on disk, each with its record (labels, address, node and
    /// policies when it was deleted): when the history holds some of its flows, it is kept
    /// already (quarantined), or its `always` is set (the pod ran on this node). One pass
    /// over the history for all of them; each pod's outcome. Without a forensic store,
    /// nothing.
    pub fn keep_deleted(&self, records: Vec<(bulkhead_api::ForensicsBundle, bool)>) -> Vec<(NamespacedName, Result<(), ForensicsError>)> {
        let Some(forensics) = &self.forensics else {
            return Vec::new();
        };
        if records.is_empty() {
            return Vec::new();
        }
        let wanted: BTreeSet<&NamespacedName> = records.iter().map(|(r, _)| &r.pod).collect();
        let mut by_pod: BTreeMap<NamespacedName, Vec<KeptFlow>> = BTreeMap::new();
        for k in self.kept_matching(&bulkhead_api::FlowFilter::default(), None) {
            let (src, dst) = (k.flow.source.pod_name(), k.flow.destination.pod_name());
            if let Some(p) = dst.filter(|p| wanted.contains(p) && src.as_ref() != Some(p)) {
                by_pod.entry(p).or_default().push(k.clone());
            }
            if let Some(p) = src.filter(|p| wanted.contains(p)) {
                by_pod.entry(p).or_default().push(k);
            }
        }
        let kept = forensics.kept();
        let mut out = Vec::new();
        for (record, always) in records {
            let flows = by_pod.remove(&record.pod).unwrap_or_default();
            if flows.is_empty() && !always && !kept.contains_key(&record.pod) {
                continue;
            }
            let pod = record.pod.clone();
            out.push((pod, forensics.save_deleted(record, flows)));
        }
        out
    }

    /// Everything known of `pod`: `live` (its record from the model, when it exists) or what
    /// was kept of it, with the history's and the kept flows merged; `None` when nothing is
    /// known. An unreadable kept file is an error, never an empty answer.
    pub fn bundle(
        &self,
        pod: &NamespacedName,
        live: Option<bulkhead_api::ForensicsBundle>,
    ) -> Result<Option<bulkhead_api::ForensicsBundle>, ForensicsError> {
        let mut flows = self.pod_flows(pod);
        let kept = match &self.forensics {
            Some(f) => f.read(pod)?,
            None => None,
        };
        let quarantine = self.forensics.as_ref().and_then(|f| f.kept().get(pod).cloned());
        let mut bundle = match (live, kept) {
            (Some(mut live), kept) => {
                if let Some((_, kept_flows)) = kept {
                    flows.extend(kept_flows);
                }
                live.quarantine = live.quarantine.or(quarantine);
                live
            }
            (None, Some((record, kept_flows))) => {
                flows.extend(kept_flows);
                record
            }
            (None, None) if !flows.is_empty() => bulkhead_api::ForensicsBundle {
                pod: pod.clone(),
                labels: BTreeMap::new(),
                ip: None,
                node: None,
                deleted: None,
                quarantine,
                policies: Vec::new(),
                flows: Vec::new(),
                anomalies: Vec::new(),
            },
            (None, None) => return Ok(None),
        };
        forensics::merge(&mut flows);
        bundle.flows = flows.into_iter().map(|k| k.flow).collect();
        Ok(Some(bundle))
    }

    /// What a flow-stream reader is told first: the sequence numbers held and the next.
    pub fn stream_header(&self) -> StreamHeader {
        let history = lock(&self.history);
        let next = lock(&self.sequence).next();
        StreamHeader {
            node: self.node.clone(),
            epoch: lock(&self.sequence).epoch(),
            first: history.front().map_or(next, |s| s.seq),
            next,
        }
    }

    /// Up to `max` records from sequence number `from` on (from the oldest held when
    /// `from` is older), in order.
    fn records_from(&self, from: u64, max: usize) -> Vec<Stored> {
        let history = lock(&self.history);
        let Some(front) = history.front().map(|s| s.seq) else {
            return Vec::new();
        };
        let skip = usize::try_from(from.saturating_sub(front)).unwrap_or(usize::MAX).min(history.len());
        history.range(skip..).take(max).cloned().collect()
    }

    /// A receiver of the next sequence number, changed after each batch of records.
    fn watch_next(&self) -> watch::Receiver<u64> {
        self.next_seq.subscribe()
    }

    /// Records the datapath's lost-events count (a running total).
    pub fn set_lost(&self, total: u64) {
        lock(&self.stats).lost_events = total;
    }

    fn note_lagged(&self, missed: u64) {
        lock(&self.stats).follower_lag_drops += missed;
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> FlowStats {
        let mut s = lock(&self.stats).snapshot();
        s.stored = lock(&self.history).len();
        s
    }

    /// The history matching `request` (with the flows kept of the pods it names, for a pod
    /// filter), and for `follow` a receiver of everything after it.
    fn query(&self, request: &ObserveRequest) -> Result<(Vec<Flow>, Option<broadcast::Receiver<Stored>>), ForensicsError> {
        let names_pod = [&request.filter.pod, &request.filter.from_pod, &request.filter.to_pod]
            .iter()
            .any(|p| p.is_some());
        if let (Some(forensics), true) = (&self.forensics, names_pod) {
            let (mut flows, rx) = self.kept_matching_then(&request.filter, request.since, request.follow);
            let since = request.since.map_or(i128::MIN, i128::from);
            flows.extend(
                forensics
                    .flows_for(&request.filter)?
                    .into_iter()
                    .filter(|k| k.flow.time.as_nanosecond() >= since),
            );
            forensics::merge(&mut flows);
            let mut out: Vec<Flow> = flows.into_iter().map(|k| k.flow).collect();
            if let Some(n) = request.last {
                out.drain(..out.len().saturating_sub(n));
            }
            return Ok((out, rx));
        }
        Ok(self.query_history(request))
    }

    /// The history matching `request`, and for `follow` a receiver of everything after it.
    fn query_history(&self, request: &ObserveRequest) -> (Vec<Flow>, Option<broadcast::Receiver<Stored>>) {
        // Copied out (cheap clones) under the lock, named outside it: the reader never
        // waits for a query's flows to be made.
        let (held, rx) = {
            let history = lock(&self.history);
            let held: Vec<Stored> = history
                .iter()
                .filter(|s| request.since.is_none_or(|since| s.unix_ns >= i128::from(since)))
                .cloned()
                .collect();
            (held, request.follow.then(|| self.followers.subscribe()))
        };
        let mut out: Vec<Flow> = held
            .iter()
            .map(|s| s.flow(&self.node))
            .filter(|f| request.filter.matches(f))
            .map(Cow::into_owned)
            .collect();
        if let Some(n) = request.last {
            out.drain(..out.len().saturating_sub(n));
        }
        (out, rx)
    }

    /// The flows `request` asks for, read straight from the history (no follow).
    pub fn snapshot(&self, request: &ObserveRequest) -> Vec<Flow> {
        self.query_history(&ObserveRequest {
            follow: false,
            ..request.clone()
        })
        .0
    }

    /// [`FlowStore::snapshot`] with, for a pod filter, the flows kept of the pods it names
    /// (what `observe` answers); an unreadable kept file is an error.
    pub fn snapshot_with_kept(&self, request: &ObserveRequest) -> Result<Vec<Flow>, ForensicsError> {
        self.query(&ObserveRequest {
            follow: false,
            ..request.clone()
        })
        .map(|(flows, _)| flows)
    }
}

/// Checks what the socket protocol cannot: drop reason names.
pub fn validate(request: &ObserveRequest) -> Result<(), String> {
    request.filter.validate()?;
    if let Some(r) = &request.filter.drop_reason {
        if !DropReason::ALL.iter().any(|d| d.name() == r) {
            let known: Vec<&str> = DropReason::ALL.iter().map(|d| d.name()).collect();
            return Err(format!("unknown drop reason {r:?} (known: {})", known.join(", ")));
        }
    }
    Ok(())
}

async fn write_flow<W: AsyncWrite + Unpin>(out: &mut W, flow: &Flow) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(flow).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line).await
}

/// Answers an observe request on a connection: the matching history, then with `follow`
/// new flows until the client goes away. Only this connection's task ever waits on the
/// client.
pub async fn serve<R, W>(store: Arc<FlowStore>, request: ObserveRequest, mut client: R, out: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = BufWriter::new(out);
    let checked = validate(&request).map_err(|message| (bulkhead_api::code::INVALID_REQUEST, message));
    let queried = checked.and_then(|()| {
        store.query(&request).map_err(|e| {
            tracing::warn!(error = %crate::error_chain(&e), "observe: kept flows cannot be read; refused");
            (bulkhead_api::code::AGENT_REJECTED, crate::error_chain(&e))
        })
    });
    let (history, rx) = match queried {
        Ok(answer) => answer,
        Err((code, message)) => {
            let answer = Response::Error { code, message };
            if let Ok(mut line) = serde_json::to_vec(&answer) {
                line.push(b'\n');
                let _ = out.write_all(&line).await;
                let _ = out.flush().await;
            }
            return;
        }
    };
    for flow in &history {
        if write_flow(&mut out, flow).await.is_err() {
            return;
        }
    }
    if out.flush().await.is_err() {
        return;
    }
    let Some(mut rx) = rx else { return };
    let mut scratch = [0u8; 64];
    loop {
        tokio::select! {
            received = rx.recv() => match received {
                Ok(s) => {
                    let flow = s.flow(store.node());
                    if request.filter.matches(&flow) && write_flow(&mut out, &flow).await.is_err() {
                        return;
                    }
                    // Flush once the burst is written, not per line.
                    if rx.is_empty() && out.flush().await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    store.note_lagged(missed);
                    tracing::debug!(missed, "observe follower too slow; flows skipped");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            // The client sends nothing after its request: EOF or an error means it left.
            read = client.read(&mut scratch) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}
