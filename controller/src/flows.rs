//! Flow records: the reader of the datapath's ring buffer, the naming of what its numbers
//! mean (pods, policies), a bounded history and a stream for `bulkhead observe` followers.
//!
//! Nothing here waits on a client: the reader pushes into the history and a broadcast
//! channel and moves on; a follower that reads too slowly misses flows (counted in
//! [`FlowStats::follower_lag_drops`]), the datapath and the agent never wait for it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use aya::maps::{MapData, RingBuf};
use bulkhead_cni::agent_api::{Flow, FlowDirection, FlowPeer, FlowVerdict, ObserveRequest, PolicyName, PolicyRule, Response};
use bulkhead_common::{direction, proto, rule_id, verdict, DropReason, FlowEvent};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::broadcast;

use crate::identity::{Direction, RuleTable};
use crate::model::{self, Cluster};
use crate::policy::{self, LocalEndpoint};

/// Flows kept in memory when `--flow-history` is not given.
pub const DEFAULT_HISTORY: usize = 8192;
/// Flows a follower may fall behind by before it starts missing some.
const FOLLOW_BUFFER: usize = 4096;
/// Events drained from the ring in one go before other tasks get a turn.
const DRAIN_BATCH: usize = 1024;
/// Our code for a refused observe request (CNI 6 is a decoding failure; ours start at 100).
const CODE_BAD_FILTER: u32 = 103;

/// Why the flow reader failed.
#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    /// The ring buffer fd could not be registered with the runtime.
    #[error("cannot poll the flow ring buffer")]
    Poll {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Converts `bpf_ktime_get_ns` (CLOCK_MONOTONIC) readings into Unix time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    /// Realtime minus monotonic, in nanoseconds.
    offset_ns: i128,
}

impl Clock {
    /// The offset between the two clocks now.
    pub fn now() -> Self {
        let realtime = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Clock {
            offset_ns: realtime - monotonic_ns(),
        }
    }

    /// A clock with a given offset (tests).
    pub fn with_offset(offset_ns: i128) -> Self {
        Clock { offset_ns }
    }

    /// Unix time in nanoseconds of a monotonic reading.
    pub fn unix_ns(&self, monotonic_ns: u64) -> i128 {
        i128::from(monotonic_ns) + self.offset_ns
    }
}

fn monotonic_ns() -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// RFC 3339 in UTC with all nine fractional digits, so that times sort as text.
pub fn rfc3339(unix_ns: i128) -> String {
    match jiff::Timestamp::from_nanosecond(unix_ns) {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%S.%NZ").to_string(),
        Err(_) => format!("@{unix_ns}ns"),
    }
}

/// Reads one [`FlowEvent`] out of a ring buffer record; `None` when it is too short.
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: the length is checked above, FlowEvent is #[repr(C)] plain data for which every
    // bit pattern is valid (it is aya::Pod), and read_unaligned has no alignment requirement.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

/// A pod, as flows name it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodInfo {
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
}

/// Everything needed to name the numbers of a flow event, taken from the agent's state
/// after each reprogram so the reader never takes the agent's lock.
#[derive(Clone, Debug, Default)]
pub struct Resolver {
    node: String,
    /// Local endpoint id → pod.
    endpoints: HashMap<u32, PodInfo>,
    /// Pod IP → pod, cluster-wide.
    pods_by_ip: HashMap<Ipv4Addr, PodInfo>,
    /// Rule ids as the compiler handed them out.
    rules: RuleTable,
    /// (endpoint id, direction number) → the policies that isolate it.
    isolating: HashMap<(u32, u8), Vec<PolicyName>>,
}

impl Resolver {
    /// A resolver that knows nothing yet (every flow shows addresses only).
    pub fn empty(node: &str) -> Self {
        Resolver {
            node: node.to_string(),
            ..Resolver::default()
        }
    }

    /// Takes what naming flows needs from the model, the rule table and local endpoints.
    pub fn build(node: &str, cluster: &Cluster, rules: &RuleTable, locals: &[LocalEndpoint]) -> Self {
        let mut pods_by_ip = HashMap::new();
        for ((ns, name), pod) in cluster.pods() {
            if let Some(ip) = model::pod_ipv4(pod) {
                pods_by_ip.insert(
                    ip,
                    PodInfo {
                        namespace: ns.clone(),
                        name: name.clone(),
                        labels: model::pod_labels(pod),
                    },
                );
            }
        }
        let mut endpoints = HashMap::new();
        let mut isolating = HashMap::new();
        for ep in locals {
            let labels = cluster.pod(&ep.namespace, &ep.pod).map(model::pod_labels).unwrap_or_default();
            for dir in [Direction::Ingress, Direction::Egress] {
                let names = policy::isolating_policies(cluster, &ep.namespace, &labels, dir)
                    .into_iter()
                    .map(|(namespace, name)| PolicyName { namespace, name })
                    .collect();
                isolating.insert((ep.endpoint_id, dir.as_u8()), names);
            }
            let info = PodInfo {
                namespace: ep.namespace.clone(),
                name: ep.pod.clone(),
                labels,
            };
            // The CNI plugin assigned a local pod's address: it wins over the model's.
            pods_by_ip.insert(ep.ipv4, info.clone());
            endpoints.insert(ep.endpoint_id, info);
        }
        Resolver {
            node: node.to_string(),
            endpoints,
            pods_by_ip,
            rules: rules.clone(),
            isolating,
        }
    }

    /// The flow record for `ev`, seen at `unix_ns`; `None` when the event carries a
    /// verdict or direction this agent does not know.
    pub fn resolve(&self, ev: &FlowEvent, unix_ns: i128) -> Option<Flow> {
        let verdict = match ev.verdict {
            verdict::FORWARDED => FlowVerdict::Forwarded,
            verdict::DROPPED => FlowVerdict::Dropped,
            verdict::AUDIT => FlowVerdict::Audit,
            _ => return None,
        };
        let dir = match ev.direction {
            direction::INGRESS => FlowDirection::Ingress,
            direction::EGRESS => FlowDirection::Egress,
            _ => return None,
        };
        let reason = DropReason::ALL.get(usize::from(ev.reason)).copied();
        let drop_reason = match (verdict, reason) {
            (FlowVerdict::Forwarded, _) | (_, Some(DropReason::Forwarded)) => None,
            (_, Some(r)) => Some(r.name().to_string()),
            (_, None) => Some(format!("unknown_{}", ev.reason)),
        };
        let (saddr, daddr) = (Ipv4Addr::from(ev.saddr), Ipv4Addr::from(ev.daddr));
        let (sport, dport) = (u16::from_be_bytes(ev.sport), u16::from_be_bytes(ev.dport));
        let local = self.endpoints.get(&ev.endpoint_id);
        let (source, destination) = match dir {
            FlowDirection::Egress => (
                self.peer(local.or_else(|| self.pods_by_ip.get(&saddr)), saddr, sport, ev.identity),
                self.peer(self.pods_by_ip.get(&daddr), daddr, dport, ev.remote_identity),
            ),
            FlowDirection::Ingress => (
                self.peer(self.pods_by_ip.get(&saddr), saddr, sport, ev.remote_identity),
                self.peer(local.or_else(|| self.pods_by_ip.get(&daddr)), daddr, dport, ev.identity),
            ),
        };
        let allowed_by = match self.rules.rule(ev.rule_id) {
            Some(r) if ev.rule_id != rule_id::NONE => vec![PolicyRule {
                namespace: r.namespace.clone(),
                name: r.policy.clone(),
                direction: match r.direction {
                    Direction::Ingress => FlowDirection::Ingress,
                    Direction::Egress => FlowDirection::Egress,
                },
                rule: r.index,
            }],
            _ => Vec::new(),
        };
        // Default deny: no rule decided, so the flow is explained by what isolates the pod.
        let denied_by_default = ev.rule_id == rule_id::NONE
            && match verdict {
                FlowVerdict::Dropped => reason == Some(DropReason::PolicyDenied),
                FlowVerdict::Audit => true,
                FlowVerdict::Forwarded => false,
            };
        let isolated_by = if denied_by_default {
            self.isolating.get(&(ev.endpoint_id, ev.direction)).cloned().unwrap_or_default()
        } else {
            Vec::new()
        };
        Some(Flow {
            time: rfc3339(unix_ns),
            node: self.node.clone(),
            verdict,
            drop_reason,
            direction: dir,
            protocol: protocol_name(ev.protocol),
            tcp_flags: (ev.protocol == proto::TCP && ev.tcp_flags != 0).then(|| tcp_flags(ev.tcp_flags)),
            source,
            destination,
            allowed_by,
            isolated_by,
            is_reply: false,
        })
    }

    fn peer(&self, pod: Option<&PodInfo>, ip: Ipv4Addr, port: u16, identity: u32) -> FlowPeer {
        // Addresses that are not pods carry their reserved identity as a label, as in Cilium.
        let reserved = match identity {
            bulkhead_common::identity::HOST => Some("reserved:host"),
            bulkhead_common::identity::WORLD => Some("reserved:world"),
            _ => None,
        };
        let labels = match (pod, reserved) {
            (Some(p), _) => p.labels.clone(),
            (None, Some(r)) => BTreeMap::from([(r.to_string(), String::new())]),
            (None, None) => BTreeMap::new(),
        };
        FlowPeer {
            namespace: pod.map(|p| p.namespace.clone()),
            pod: pod.map(|p| p.name.clone()),
            labels,
            ip,
            port,
            identity,
        }
    }
}

/// `TCP`, `UDP`, `SCTP`, `ICMP`, `non-IPv4` (the datapath reports 0 for packets that are
/// not IPv4), or the number.
pub fn protocol_name(p: u8) -> String {
    match p {
        0 => "non-IPv4".into(),
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        proto::ICMP => "ICMP".into(),
        n => n.to_string(),
    }
}

fn tcp_flags(bits: u8) -> String {
    const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
    NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join("|")
}

/// Counts for metrics; a snapshot from [`FlowStore::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Flow records by verdict and direction.
    pub flows: BTreeMap<(FlowVerdict, FlowDirection), u64>,
    /// Flow records naming a policy: (namespace, name, verdict) → count. A forwarded flow
    /// counts for the policy that allowed it, a dropped one for each policy isolating the pod.
    pub by_policy: BTreeMap<(String, String, FlowVerdict), u64>,
    /// Events the datapath could not put into the ring buffer (it was full).
    pub lost_events: u64,
    /// Flows followers missed because they read too slowly.
    pub follower_lag_drops: u64,
    /// Events with a verdict or direction the agent does not know, skipped.
    pub undecodable: u64,
    /// Flows in the history now.
    pub stored: usize,
}

/// A flow in the history, with its time as a number for `since`.
#[derive(Debug)]
struct Stored {
    unix_ns: i128,
    flow: Flow,
}

/// The bounded history of flows and the channel followers listen on.
pub struct FlowStore {
    node: String,
    capacity: usize,
    clock: Clock,
    history: Mutex<VecDeque<Arc<Stored>>>,
    followers: broadcast::Sender<Arc<Stored>>,
    resolver: RwLock<Arc<Resolver>>,
    stats: Mutex<FlowStats>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind, still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FlowStore {
    /// A store keeping the last `capacity` flows of node `node`.
    pub fn new(node: &str, capacity: usize, clock: Clock) -> Self {
        let (followers, _) = broadcast::channel(FOLLOW_BUFFER);
        FlowStore {
            node: node.to_string(),
            capacity,
            clock,
            history: Mutex::new(VecDeque::with_capacity(capacity.min(DEFAULT_HISTORY))),
            followers,
            resolver: RwLock::new(Arc::new(Resolver::empty(node))),
            stats: Mutex::new(FlowStats::default()),
            metrics: None,
        }
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

    /// Names, stores and broadcasts a batch of events from the ring buffer.
    pub fn record(&self, events: &[FlowEvent]) {
        let resolver = self.resolver.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let flows: Vec<Arc<Stored>> = events
            .iter()
            .filter_map(|ev| {
                let unix_ns = self.clock.unix_ns(ev.timestamp_ns);
                resolver.resolve(ev, unix_ns).map(|flow| Arc::new(Stored { unix_ns, flow }))
            })
            .collect();
        {
            let mut stats = lock(&self.stats);
            stats.undecodable += (events.len() - flows.len()) as u64;
            for s in &flows {
                let f = &s.flow;
                *stats.flows.entry((f.verdict, f.direction)).or_default() += 1;
                for r in &f.allowed_by {
                    *stats.by_policy.entry((r.namespace.clone(), r.name.clone(), f.verdict)).or_default() += 1;
                }
                for p in &f.isolated_by {
                    *stats.by_policy.entry((p.namespace.clone(), p.name.clone(), f.verdict)).or_default() += 1;
                }
                if let Some(m) = &self.metrics {
                    // The policy that decided: the allowing rule's, or for a default-deny drop
                    // the first (by name) policy isolating the pod; none when not isolated.
                    let policy = f
                        .allowed_by
                        .first()
                        .map(|r| format!("{}/{}", r.namespace, r.name))
                        .or_else(|| f.isolated_by.first().map(|p| format!("{}/{}", p.namespace, p.name)));
                    let verdict = match f.verdict {
                        FlowVerdict::Forwarded => "forwarded",
                        FlowVerdict::Dropped => "dropped",
                        FlowVerdict::Audit => "audit",
                    };
                    m.record_flow(verdict, f.direction.as_str(), policy.as_deref());
                }
            }
        }
        let mut history = lock(&self.history);
        for s in flows {
            if self.capacity == 0 {
                break;
            }
            if history.len() == self.capacity {
                history.pop_front();
            }
            history.push_back(s.clone());
            // Sent under the history lock so that a new follower sees each flow exactly once
            // (in its snapshot or on its receiver). No receivers is not an error.
            let _ = self.followers.send(s);
        }
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
        let mut s = lock(&self.stats).clone();
        s.stored = lock(&self.history).len();
        s
    }

    /// The history matching `request`, and for `follow` a receiver of everything after it.
    fn query(&self, request: &ObserveRequest) -> (Vec<Flow>, Option<broadcast::Receiver<Arc<Stored>>>) {
        let history = lock(&self.history);
        let mut out: Vec<Flow> = history
            .iter()
            .filter(|s| request.since.is_none_or(|since| s.unix_ns >= i128::from(since)))
            .filter(|s| request.filter.matches(&s.flow))
            .map(|s| s.flow.clone())
            .collect();
        if let Some(n) = request.last {
            out.drain(..out.len().saturating_sub(n));
        }
        let rx = request.follow.then(|| self.followers.subscribe());
        (out, rx)
    }

    /// The flows `request` asks for, read straight from the history (no follow).
    pub fn snapshot(&self, request: &ObserveRequest) -> Vec<Flow> {
        self.query(&ObserveRequest {
            follow: false,
            ..request.clone()
        })
        .0
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
    if let Err(message) = validate(&request) {
        let answer = Response::Error {
            code: CODE_BAD_FILTER,
            message,
        };
        if let Ok(mut line) = serde_json::to_vec(&answer) {
            line.push(b'\n');
            let _ = out.write_all(&line).await;
            let _ = out.flush().await;
        }
        return;
    }
    let (history, rx) = store.query(&request);
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
                    if request.filter.matches(&s.flow) && write_flow(&mut out, &s.flow).await.is_err() {
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

/// Starts the task that drains the `bh_flow_v1` ring buffer into `store`; it runs until
/// the runtime stops. Must be called inside a tokio runtime.
pub fn spawn_reader(ring: RingBuf<MapData>, store: Arc<FlowStore>) -> Result<tokio::task::JoinHandle<()>, FlowsError> {
    // SAFETY: the RingBuf owns its map fd; it stays open, and the same fd, until the RingBuf
    // is dropped, which only happens when this AsyncFd is.
    let registered = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut ring = registered.map_err(|e| FlowsError::Poll { source: e.into() })?;
    Ok(tokio::spawn(async move {
        let mut batch = Vec::with_capacity(DRAIN_BATCH);
        loop {
            let mut guard = match ring.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "flow ring buffer poll failed; flow records stop");
                    return;
                }
            };
            let inner = guard.get_inner_mut();
            let mut drained = true;
            while let Some(item) = inner.next() {
                match decode(&item) {
                    Some(ev) => batch.push(ev),
                    None => tracing::debug!(len = item.len(), "short flow record"),
                }
                if batch.len() == DRAIN_BATCH {
                    drained = false;
                    break;
                }
            }
            // Only an empty ring may wait for the next wakeup; a full batch comes straight back.
            if drained {
                guard.clear_ready();
            }
            drop(guard);
            store.record(&batch);
            batch.clear();
            // A busy ring must not starve the socket tasks on the agent's two workers.
            tokio::task::yield_now().await;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_documents;
    use bulkhead_cni::agent_api::FlowFilter;
    use std::time::Duration;

    const MODEL: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
status: {podIP: 10.9.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x, labels: {pod: c}}
status: {podIP: 10.9.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: y, labels: {pod: b}}
status: {podIP: 10.9.1.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {}
      podSelector: {matchLabels: {pod: b}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: audit-ingress, namespace: x, annotations: {bulkhead.io/audit: \"true\"}}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: audit-egress-c, namespace: x, annotations: {bulkhead.io/audit: \"true\"}}
spec:
  podSelector: {matchLabels: {pod: c}}
  policyTypes: [Egress]
";

    fn locals() -> Vec<LocalEndpoint> {
        vec![
            LocalEndpoint {
                endpoint_id: 1,
                host_ifindex: 11,
                namespace: "x".into(),
                pod: "a".into(),
                ipv4: Ipv4Addr::new(10, 9, 0, 1),
                mac: [2, 0, 0, 0, 0, 1],
            },
            LocalEndpoint {
                endpoint_id: 3,
                host_ifindex: 13,
                namespace: "x".into(),
                pod: "c".into(),
                ipv4: Ipv4Addr::new(10, 9, 0, 3),
                mac: [2, 0, 0, 0, 0, 3],
            },
        ]
    }

    /// A resolver over MODEL compiled as the agent does, and the allow-b rule's id.
    fn resolver() -> (Resolver, u32) {
        let cluster = Cluster::from_objects(parse_documents(MODEL, "test").unwrap());
        let mut compiler = policy::Compiler::new();
        compiler.compile(&cluster, &locals());
        let (allow_id, _) = compiler
            .rules()
            .iter()
            .find(|(_, r)| r.policy == "allow-b")
            .expect("allow-b has a rule");
        (Resolver::build("node0", &cluster, compiler.rules(), &locals()), allow_id)
    }

    fn event(endpoint_id: u32, from: [u8; 4], to: [u8; 4], dir: u8, verdict: u8, reason: DropReason, rule: u32) -> FlowEvent {
        FlowEvent {
            timestamp_ns: 5_000_000_000,
            endpoint_id,
            identity: 300,
            remote_identity: 301,
            rule_id: rule,
            saddr: from,
            daddr: to,
            sport: 40000u16.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            packet_len: 60,
            protocol: proto::TCP,
            direction: dir,
            verdict,
            reason: reason as u8,
            tcp_flags: 0x02,
            _pad: [0; 3],
        }
    }

    const B: [u8; 4] = [10, 9, 1, 2];
    const XA: [u8; 4] = [10, 9, 0, 1];
    const XC: [u8; 4] = [10, 9, 0, 3];

    #[test]
    fn default_deny_drop_names_the_isolating_policy() {
        let (r, _) = resolver();
        let ev = event(
            3,
            B,
            XC,
            direction::INGRESS,
            verdict::DROPPED,
            DropReason::PolicyDenied,
            rule_id::NONE,
        );
        let f = r.resolve(&ev, 1_700_000_000_000_000_007).unwrap();
        assert_eq!(f.time, "2023-11-14T22:13:20.000000007Z");
        assert_eq!(f.node, "node0");
        assert_eq!(f.verdict, FlowVerdict::Dropped);
        assert_eq!(f.drop_reason.as_deref(), Some("policy_denied"));
        assert_eq!(f.direction, FlowDirection::Ingress);
        assert_eq!(f.protocol, "TCP");
        assert_eq!(f.tcp_flags.as_deref(), Some("SYN"));
        assert_eq!(f.source.pod_name().as_deref(), Some("y/b"));
        assert_eq!((f.source.port, f.source.identity), (40000, 301));
        assert_eq!(f.source.labels.get("pod").map(String::as_str), Some("b"));
        assert_eq!(f.destination.pod_name().as_deref(), Some("x/c"));
        assert_eq!((f.destination.port, f.destination.identity), (80, 300));
        assert!(f.allowed_by.is_empty());
        assert_eq!(
            f.isolated_by,
            vec![PolicyName {
                namespace: "x".into(),
                name: "default-deny-ingress".into()
            }]
        );
    }

    #[test]
    fn allowed_flow_names_its_rule_and_an_egress_flow_is_local_on_the_source_side() {
        let (r, allow_id) = resolver();
        let ev = event(1, B, XA, direction::INGRESS, verdict::FORWARDED, DropReason::Forwarded, allow_id);
        let f = r.resolve(&ev, 0).unwrap();
        assert_eq!(f.verdict, FlowVerdict::Forwarded);
        assert_eq!(f.drop_reason, None);
        assert_eq!(
            f.allowed_by,
            vec![PolicyRule {
                namespace: "x".into(),
                name: "allow-b".into(),
                direction: FlowDirection::Ingress,
                rule: 0
            }]
        );
        assert!(f.isolated_by.is_empty());
        // x/a not isolated for egress: forwarded with no rule, and names nothing.
        let ev = event(
            1,
            XA,
            [192, 0, 2, 1],
            direction::EGRESS,
            verdict::FORWARDED,
            DropReason::Forwarded,
            0,
        );
        let f = r.resolve(&ev, 0).unwrap();
        assert_eq!(f.source.pod_name().as_deref(), Some("x/a"));
        assert_eq!(f.source.identity, 300, "the local side carries the endpoint's identity");
        assert_eq!(f.destination.pod, None, "an outside address is not a pod");
        assert!(f.destination.labels.is_empty(), "identity 301 is not a reserved one");
        assert_eq!(f.destination.ip, Ipv4Addr::new(192, 0, 2, 1));
        assert!(f.allowed_by.is_empty() && f.isolated_by.is_empty());
        let mut from_host = event(
            1,
            [10, 9, 0, 254],
            XA,
            direction::INGRESS,
            verdict::FORWARDED,
            DropReason::Forwarded,
            0,
        );
        from_host.remote_identity = bulkhead_common::identity::HOST;
        let f = r.resolve(&from_host, 0).unwrap();
        assert!(f.source.labels.contains_key("reserved:host"), "{:?}", f.source);
    }

    #[test]
    fn other_drops_and_unknown_numbers() {
        let (r, _) = resolver();
        let ev = event(3, [10, 9, 9, 9], XA, direction::EGRESS, verdict::DROPPED, DropReason::SpoofedIp, 0);
        let f = r.resolve(&ev, 0).unwrap();
        assert_eq!(f.drop_reason.as_deref(), Some("spoofed_ip"));
        assert!(f.isolated_by.is_empty(), "not a policy drop");
        assert_eq!(f.source.pod_name().as_deref(), Some("x/c"), "endpoint id names the local side");
        let mut ev = event(9, B, XC, direction::INGRESS, verdict::DROPPED, DropReason::PolicyDenied, 0);
        ev.reason = 200;
        let f = r.resolve(&ev, 0).unwrap();
        assert_eq!(f.drop_reason.as_deref(), Some("unknown_200"));
        assert_eq!(f.destination.pod_name().as_deref(), Some("x/c"), "unknown endpoint id: by address");
        ev.verdict = 9;
        assert!(r.resolve(&ev, 0).is_none());
        let mut udp = event(3, B, XC, direction::INGRESS, verdict::FORWARDED, DropReason::Forwarded, 0);
        udp.protocol = proto::UDP;
        let f = r.resolve(&udp, 0).unwrap();
        assert_eq!((f.protocol.as_str(), f.tcp_flags.as_deref()), ("UDP", None));
        assert_eq!(protocol_name(47), "47");
        assert_eq!(protocol_name(0), "non-IPv4");
        assert_eq!(tcp_flags(0x12), "SYN|ACK");
    }

    #[test]
    fn audit_names_the_would_be_isolating_policies() {
        let (r, _) = resolver();
        // x/c's egress is isolated only by an audit-mode policy: the AUDIT flow names it.
        let ev = event(3, XC, B, direction::EGRESS, verdict::AUDIT, DropReason::Forwarded, 0);
        let f = r.resolve(&ev, 0).unwrap();
        assert_eq!(f.verdict, FlowVerdict::Audit);
        assert_eq!(
            f.isolated_by,
            vec![PolicyName {
                namespace: "x".into(),
                name: "audit-egress-c".into()
            }]
        );
        // x/c's ingress is enforced (default-deny) as well as audited: a drop names only
        // the enforcing policy, which alone decides.
        let ev = event(3, B, XC, direction::INGRESS, verdict::DROPPED, DropReason::PolicyDenied, 0);
        let names: Vec<String> = r.resolve(&ev, 0).unwrap().isolated_by.into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["default-deny-ingress"]);
    }

    #[test]
    fn decode_reads_a_record_and_rejects_a_short_one() {
        let ev = event(3, B, XC, direction::INGRESS, verdict::DROPPED, DropReason::PolicyDenied, 0);
        // SAFETY: reading a Pod struct's bytes.
        let bytes = unsafe { std::slice::from_raw_parts((&ev as *const FlowEvent).cast::<u8>(), size_of::<FlowEvent>()) };
        let mut unaligned = vec![0u8];
        unaligned.extend_from_slice(bytes);
        assert_eq!(decode(&unaligned[1..]), Some(ev));
        assert_eq!(decode(&bytes[..47]), None);
    }

    fn store(capacity: usize) -> FlowStore {
        let s = FlowStore::new("node0", capacity, Clock::with_offset(1_000));
        s.set_resolver(resolver().0);
        s
    }

    fn numbered(n: u64) -> FlowEvent {
        let mut ev = event(3, B, XC, direction::INGRESS, verdict::DROPPED, DropReason::PolicyDenied, 0);
        ev.timestamp_ns = n;
        ev.sport = u16::try_from(n).unwrap().to_be_bytes();
        ev
    }

    fn sports(flows: &[Flow]) -> Vec<u16> {
        flows.iter().map(|f| f.source.port).collect()
    }

    #[test]
    fn history_is_bounded_and_answers_since_last_and_filters() {
        let s = store(4);
        s.record(&(1..=6).map(numbered).collect::<Vec<_>>());
        let all = s.snapshot(&ObserveRequest::default());
        assert_eq!(sports(&all), vec![3, 4, 5, 6], "the oldest flows fall out");
        let last2 = s.snapshot(&ObserveRequest {
            last: Some(2),
            ..ObserveRequest::default()
        });
        assert_eq!(sports(&last2), vec![5, 6]);
        // Times are monotonic readings plus the clock offset (1000 ns).
        let since = s.snapshot(&ObserveRequest {
            since: Some(1_004),
            ..ObserveRequest::default()
        });
        assert_eq!(sports(&since), vec![4, 5, 6]);
        let none = s.snapshot(&ObserveRequest {
            filter: FlowFilter {
                verdict: Some(FlowVerdict::Forwarded),
                ..FlowFilter::default()
            },
            ..ObserveRequest::default()
        });
        assert!(none.is_empty());
        let stats = s.stats();
        assert_eq!(stats.stored, 4);
        assert_eq!(stats.flows.get(&(FlowVerdict::Dropped, FlowDirection::Ingress)), Some(&6));
        assert_eq!(
            stats
                .by_policy
                .get(&("x".to_string(), "default-deny-ingress".to_string(), FlowVerdict::Dropped)),
            Some(&6)
        );
        let zero = store(0);
        zero.record(&[numbered(1)]);
        assert!(zero.snapshot(&ObserveRequest::default()).is_empty());
    }

    #[test]
    fn unknown_drop_reason_is_refused() {
        let mut req = ObserveRequest::default();
        req.filter.drop_reason = Some("policy_denied".into());
        assert!(validate(&req).is_ok());
        req.filter.drop_reason = Some("nope".into());
        let e = validate(&req).unwrap_err();
        assert!(e.contains("unknown drop reason \"nope\"") && e.contains("policy_denied"), "{e}");
    }

    fn lines(bytes: &[u8]) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn serve_streams_history_then_follows_until_the_client_leaves() {
        let s = Arc::new(store(16));
        s.record(&[numbered(1)]);
        let (client, server) = tokio::io::duplex(1 << 16);
        let (server_read, server_write) = tokio::io::split(server);
        let req = ObserveRequest {
            follow: true,
            ..ObserveRequest::default()
        };
        let task = tokio::spawn(serve(s.clone(), req, server_read, server_write));
        let (mut client_read, client_write) = tokio::io::split(client);
        let mut buf = vec![0u8; 1 << 16];
        let n = client_read.read(&mut buf).await.unwrap();
        assert_eq!(lines(&buf[..n])[0]["source"]["port"], 1);
        s.record(&[numbered(2)]);
        let n = client_read.read(&mut buf).await.unwrap();
        assert_eq!(lines(&buf[..n])[0]["source"]["port"], 2);
        drop(client_write);
        drop(client_read);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve ends when the client leaves")
            .unwrap();
    }

    #[tokio::test]
    async fn serve_refuses_a_bad_filter_with_an_error_line() {
        let s = Arc::new(store(16));
        let mut req = ObserveRequest::default();
        req.filter.pod = Some("nopod".into());
        let mut out = Vec::new();
        serve(s, req, tokio::io::empty(), &mut out).await;
        let got = lines(&out);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["result"], "error");
        assert!(got[0]["message"].as_str().unwrap().contains("--pod"));
    }

    #[tokio::test]
    async fn a_stalled_follower_never_blocks_recording() {
        let s = Arc::new(store(8));
        // A 64-byte pipe the client never reads: the server's first write blocks.
        let (_client, server) = tokio::io::duplex(64);
        let (server_read, server_write) = tokio::io::split(server);
        let req = ObserveRequest {
            follow: true,
            ..ObserveRequest::default()
        };
        let task = tokio::spawn(serve(s.clone(), req, server_read, server_write));
        tokio::task::yield_now().await;
        let started = std::time::Instant::now();
        for round in 0..(FOLLOW_BUFFER as u64 * 2 / 64 + 2) {
            s.record(&(0..64).map(|i| numbered(round * 64 + i % 60 + 1)).collect::<Vec<_>>());
            tokio::task::yield_now().await;
        }
        assert!(started.elapsed() < Duration::from_secs(2), "recording waited on the follower");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(s.stats().stored, 8);
        task.abort();
    }
}
