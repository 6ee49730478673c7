//! The relay's baselines: every released flow through the [`Engine`], the anomalies in a
//! bounded history streamed to `bulkhead observe --anomalies`, their metrics, the saved
//! baselines, and the optional automatic response (quarantine the pod).
//!
//! The engine has a lock of its own and is fed from the store's follower broadcast (the
//! records already merged and released in time order), so ingest never waits on it; a
//! feed that falls behind skips records and counts them.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bulkhead_api::{Anomaly, AnomalyKind, AnomalyRequest, NamespacedName, Request, Response};
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Registry, TextEncoder};
use tokio::sync::{broadcast, mpsc};

use super::discover::Discovery;
use super::store::Record;
use super::Shared;
use crate::baseline::{BaselineError, Engine};
use crate::metrics::{Exposition, MetricsError};

/// Anomalies kept for clients.
pub const ANOMALY_HISTORY: usize = 4096;
/// Anomalies a follower may fall behind by.
const ANOMALY_FOLLOW_BUFFER: usize = 1024;
/// How often baselines are saved.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(60);
/// Pods waiting for their quarantine to be accepted (beyond: counted as failed).
const MAX_PENDING: usize = 256;
/// Pods remembered as quarantined (once per pod).
const MAX_DONE: usize = 16_384;
/// How long one agent may take to answer a quarantine request.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Retry backoff for a refused or failed quarantine, from…
const RETRY_MIN: Duration = Duration::from_secs(2);
/// …to.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// `--auto-quarantine` and its companions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResponseConfig {
    /// Kinds that quarantine (empty: off).
    pub kinds: Vec<AnomalyKind>,
    /// The score at or above which they do.
    pub score: f64,
    /// Only report what would be done.
    pub dry_run: bool,
}

/// What the automatic response decided for one anomaly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing (not a configured kind, below the score, no pod, or already done).
    Nothing,
    /// Quarantine this pod.
    Quarantine(NamespacedName),
    /// Dry run: it would quarantine this pod.
    WouldQuarantine(NamespacedName),
}

/// The automatic response's decisions: pure, once per pod.
#[derive(Debug, Default)]
pub struct AutoQuarantine {
    config: ResponseConfig,
    done: HashSet<NamespacedName>,
}

impl AutoQuarantine {
    /// A decider for `config`.
    pub fn new(config: ResponseConfig) -> Self {
        AutoQuarantine {
            config,
            done: HashSet::new(),
        }
    }

    /// What to do about `a`; a pod is decided on once.
    pub fn decide(&mut self, a: &Anomaly) -> Decision {
        let Some(pod) = &a.pod else { return Decision::Nothing };
        if !self.config.kinds.contains(&a.kind) || a.score < self.config.score || self.done.contains(pod) {
            return Decision::Nothing;
        }
        if self.done.len() >= MAX_DONE {
            // Bounded: forgetting only risks a second request for an old pod.
            self.done.clear();
        }
        self.done.insert(pod.clone());
        if self.config.dry_run {
            Decision::WouldQuarantine(pod.clone())
        } else {
            Decision::Quarantine(pod.clone())
        }
    }
}

/// The reason an automatic quarantine carries.
pub fn reason(a: &Anomaly) -> String {
    format!("auto: {}: {}", a.kind, a.explanation)
}

/// Whether `a` is what `request` asks for.
pub fn wanted(request: &AnomalyRequest, a: &Anomaly) -> bool {
    request.namespace.as_deref().is_none_or(|ns| a.namespace == ns)
        && request.pod.as_ref().is_none_or(|p| a.pod.as_ref() == Some(p))
        && (request.kinds.is_empty() || request.kinds.contains(&a.kind))
        && request.since.is_none_or(|s| a.time.as_nanosecond() >= i128::from(s))
}

/// The anomalies kept for clients, and their followers.
pub struct AnomalyLog {
    history: VecDeque<Arc<Anomaly>>,
    capacity: usize,
    followers: broadcast::Sender<Arc<Anomaly>>,
    total: u64,
}

impl AnomalyLog {
    /// A log keeping the last `capacity` anomalies.
    pub fn new(capacity: usize) -> Self {
        let (followers, _) = broadcast::channel(ANOMALY_FOLLOW_BUFFER);
        AnomalyLog {
            history: VecDeque::new(),
            capacity,
            followers,
            total: 0,
        }
    }

    /// Keeps `a` and sends it to followers.
    pub fn push(&mut self, a: Anomaly) {
        let a = Arc::new(a);
        if self.history.len() >= self.capacity {
            self.history.pop_front();
        }
        self.history.push_back(a.clone());
        self.total += 1;
        let _ = self.followers.send(a);
    }

    /// The kept anomalies `request` asks for, and for `follow` a receiver of new ones.
    pub fn query(&self, request: &AnomalyRequest) -> (Vec<Arc<Anomaly>>, Option<broadcast::Receiver<Arc<Anomaly>>>) {
        let history = self.history.iter().filter(|a| wanted(request, a)).cloned().collect();
        (history, request.follow.then(|| self.followers.subscribe()))
    }

    /// Anomalies raised since the relay started.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// The relay's metrics (`--metrics-address`).
pub struct RelayMetrics {
    registry: Registry,
    anomalies: IntCounterVec,
    responses: IntCounterVec,
    workloads: IntGaugeVec,
    flows_missed: IntCounter,
    baseline_errors: IntCounterVec,
    refused: IntCounter,
}

impl RelayMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, MetricsError> {
        use crate::metrics::{counter_vec, gauge_vec};
        let counter =
            |name: &'static str, help: &str| IntCounter::new(name, help).map_err(|source| MetricsError::Register { name, source });
        let m = RelayMetrics {
            registry: Registry::new(),
            anomalies: counter_vec(
                "bulkhead_anomalies_total",
                "Anomalies the relay's baselines raised, by kind and workload.",
                &["kind", "namespace", "workload"],
            )?,
            responses: counter_vec(
                "bulkhead_auto_quarantine_total",
                "The automatic response's actions, by result.",
                &["result"],
            )?,
            workloads: gauge_vec("bulkhead_baseline_workloads", "Workloads with a baseline, by state.", &["state"])?,
            flows_missed: counter(
                "bulkhead_baseline_flows_missed_total",
                "Flow records the baseline engine skipped because it fell behind.",
            )?,
            baseline_errors: counter_vec(
                "bulkhead_baseline_errors_total",
                "Errors reading or saving the baseline file, by operation.",
                &["op"],
            )?,
            refused: counter(
                "bulkhead_relay_metrics_connections_refused_total",
                "Connections to the relay's metrics port closed at once: every slot was taken.",
            )?,
        };
        let register = |c: Box<dyn prometheus::core::Collector>, name: &'static str| {
            m.registry.register(c).map_err(|source| MetricsError::Register { name, source })
        };
        register(Box::new(m.anomalies.clone()), "bulkhead_anomalies_total")?;
        register(Box::new(m.responses.clone()), "bulkhead_auto_quarantine_total")?;
        register(Box::new(m.workloads.clone()), "bulkhead_baseline_workloads")?;
        register(Box::new(m.flows_missed.clone()), "bulkhead_baseline_flows_missed_total")?;
        register(Box::new(m.baseline_errors.clone()), "bulkhead_baseline_errors_total")?;
        register(Box::new(m.refused.clone()), "bulkhead_relay_metrics_connections_refused_total")?;
        // Every series exists from the start, so a rate over it is 0, not absent.
        for r in ["requested", "accepted", "refused", "would_quarantine", "dropped"] {
            m.responses.with_label_values(&[r]);
        }
        for s in ["learning", "learnt"] {
            m.workloads.with_label_values(&[s]);
        }
        for op in ["load", "save"] {
            m.baseline_errors.with_label_values(&[op]);
        }
        Ok(m)
    }

    /// Counts an automatic response result.
    pub fn response(&self, result: &str) {
        self.responses.with_label_values(&[result]).inc();
    }

    /// Counts an anomaly (what [`Detection::observe`] does), for tests.
    #[cfg(test)]
    pub fn anomalies_for_tests(&self, a: &Anomaly) {
        self.anomalies
            .with_label_values(&[a.kind.as_str(), &a.namespace, &a.workload])
            .inc();
    }

    /// Counts a baseline file error.
    pub fn baseline_error(&self, op: &str) {
        self.baseline_errors.with_label_values(&[op]).inc();
    }
}

impl Exposition for RelayMetrics {
    fn encode(&self) -> Result<String, MetricsError> {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .map_err(|source| MetricsError::Encode { source })
    }

    fn health(&self) -> Result<(), String> {
        Ok(())
    }

    fn refused(&self) {
        self.refused.inc();
    }
}

/// Everything the relay's detection shares.
pub struct Detection {
    engine: Mutex<Engine>,
    log: Mutex<AnomalyLog>,
    response: Mutex<AutoQuarantine>,
    quarantine: Option<mpsc::Sender<(NamespacedName, String)>>,
    /// Its metrics.
    pub metrics: Arc<RelayMetrics>,
    file: Option<PathBuf>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind, still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Detection {
    /// Detection with `engine`, saving to `file`, responding as `response` says through
    /// `quarantine` (the sender task's queue; `None`: requests are dropped and counted).
    pub fn new(
        engine: Engine,
        file: Option<PathBuf>,
        response: ResponseConfig,
        quarantine: Option<mpsc::Sender<(NamespacedName, String)>>,
        metrics: Arc<RelayMetrics>,
    ) -> Self {
        Detection {
            engine: Mutex::new(engine),
            log: Mutex::new(AnomalyLog::new(ANOMALY_HISTORY)),
            response: Mutex::new(AutoQuarantine::new(response)),
            quarantine,
            metrics,
            file,
        }
    }

    /// The anomaly log, locked.
    pub fn log(&self) -> MutexGuard<'_, AnomalyLog> {
        lock(&self.log)
    }

    /// One released flow through the engine; its anomalies responded to and kept.
    pub fn observe(&self, flow: &bulkhead_api::Flow) {
        let anomalies = lock(&self.engine).observe(flow, jiff::Timestamp::now());
        for mut a in anomalies {
            let decision = lock(&self.response).decide(&a);
            match decision {
                Decision::Nothing => {}
                Decision::WouldQuarantine(pod) => {
                    tracing::warn!(%pod, kind = %a.kind, score = a.score, "would quarantine (dry run)");
                    self.metrics.response("would_quarantine");
                    a.response = Some(format!("would quarantine {pod} (dry run)"));
                }
                Decision::Quarantine(pod) => {
                    let queued = self
                        .quarantine
                        .as_ref()
                        .is_some_and(|q| q.try_send((pod.clone(), reason(&a))).is_ok());
                    if queued {
                        tracing::warn!(%pod, kind = %a.kind, score = a.score, "quarantine requested");
                        self.metrics.response("requested");
                        a.response = Some(format!("quarantine requested for {pod}"));
                    } else {
                        tracing::error!(%pod, "quarantine queue full or closed: request dropped");
                        self.metrics.response("dropped");
                        a.response = Some(format!("quarantine of {pod} dropped (queue full)"));
                    }
                }
            }
            self.metrics
                .anomalies
                .with_label_values(&[a.kind.as_str(), &a.namespace, &a.workload])
                .inc();
            tracing::info!(kind = %a.kind, score = a.score, namespace = %a.namespace, workload = %a.workload, explanation = %a.explanation, "anomaly");
            self.log().push(a);
        }
    }

    /// Forgets what went unseen for long and refreshes the workload gauges.
    pub fn refresh(&self) {
        let now = jiff::Timestamp::now();
        let (all, learning) = {
            let mut engine = lock(&self.engine);
            let forgotten = engine.prune(now);
            if forgotten > 0 {
                tracing::info!(forgotten, "baseline entries unseen for long forgotten");
            }
            engine.workloads(now)
        };
        let gauge = |s: &str, n: usize| {
            self.metrics
                .workloads
                .with_label_values(&[s])
                .set(i64::try_from(n).unwrap_or(i64::MAX))
        };
        gauge("learning", learning);
        gauge("learnt", all - learning);
    }

    /// Saves the baselines to the file, if there is one; errors are logged, counted and
    /// returned (the next period retries).
    pub fn save(&self) -> Result<(), BaselineError> {
        let Some(path) = &self.file else { return Ok(()) };
        // Encoded under the lock, written outside it.
        let result = lock(&self.engine).save().and_then(|bytes| Engine::save_to(&bytes, path));
        if let Err(e) = &result {
            tracing::error!(path = %path.display(), error = %crate::error_chain(e), "saving baselines");
            self.metrics.baseline_error("save");
        }
        result
    }
}

/// Feeds every released flow to the engine until the store goes away.
pub async fn feed(shared: Arc<Shared>, detection: Arc<Detection>) {
    let mut rx = shared.lock().store.subscribe();
    loop {
        match rx.recv().await {
            Ok(e) => {
                if let Record::Flow(f) = &e.record {
                    detection.observe(f);
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "baseline engine fell behind");
                detection.metrics.flows_missed.inc_by(n);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Saves the baselines every [`SAVE_INTERVAL`] and refreshes the gauges.
pub async fn keep(detection: Arc<Detection>) {
    let mut tick = tokio::time::interval(SAVE_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        // Pruning walks every baseline and saving writes a file: off the async workers.
        let d = detection.clone();
        let _ = tokio::task::spawn_blocking(move || {
            d.refresh();
            d.save()
        })
        .await;
    }
}

/// A pod waiting for every agent to accept its quarantine.
struct Pending {
    reason: String,
    accepted: HashSet<String>,
    attempts: u32,
    next: tokio::time::Instant,
}

/// Sends each queued pod's quarantine to every agent the relay can reach, retrying
/// refusals and failures with backoff until each accepted.
pub async fn respond(mut queue: mpsc::Receiver<(NamespacedName, String)>, discovery: Arc<Discovery>, metrics: Arc<RelayMetrics>) {
    let mut pending: BTreeMap<NamespacedName, Pending> = BTreeMap::new();
    let mut warned = false;
    loop {
        let wait = tokio::time::sleep(Duration::from_secs(1));
        tokio::select! {
            got = queue.recv() => match got {
                Some((pod, reason)) => {
                    if pending.len() >= MAX_PENDING {
                        tracing::error!(%pod, "too many quarantines pending: dropped");
                        metrics.response("dropped");
                    } else {
                        pending.insert(pod, Pending { reason, accepted: HashSet::new(), attempts: 0, next: tokio::time::Instant::now() });
                    }
                }
                None => return,
            },
            () = wait => {}
        }
        if pending.is_empty() {
            continue;
        }
        let now = tokio::time::Instant::now();
        let mut finished = Vec::new();
        if discovery.is_kubernetes() {
            // In a cluster: the pod's label, which every agent watches.
            for (pod, p) in pending.iter_mut().filter(|(_, p)| p.next <= now) {
                match discovery.quarantine_by_label(pod, &p.reason).await {
                    Ok(()) => {
                        tracing::warn!(%pod, "quarantine label set");
                        metrics.response("accepted");
                        finished.push(pod.clone());
                    }
                    Err(e) => {
                        tracing::warn!(%pod, error = %e, "labelling the pod for quarantine failed; retrying later");
                        metrics.response("refused");
                        p.attempts = p.attempts.saturating_add(1);
                        p.next = now + RETRY_MIN.saturating_mul(1u32 << p.attempts.min(5)).min(RETRY_MAX);
                    }
                }
            }
            for pod in finished {
                pending.remove(&pod);
            }
            continue;
        }
        let agents = discovery.agent_apis().await;
        if agents.is_empty() {
            if !warned {
                tracing::error!("no agent API this relay can reach (--agent flags give only flow ports): quarantines wait");
                warned = true;
            }
            continue;
        }
        for (pod, p) in pending.iter_mut().filter(|(_, p)| p.next <= now) {
            let mut failed = false;
            let todo: Vec<&(String, PathBuf)> = agents.iter().filter(|(n, _)| !p.accepted.contains(n)).collect();
            for (node, socket) in todo {
                let request = Request::Quarantine {
                    pod: pod.clone(),
                    reason: Some(p.reason.clone()),
                    release: false,
                };
                let socket = socket.clone();
                let answer = tokio::task::spawn_blocking(move || bulkhead_api::call(&socket, &request, AGENT_TIMEOUT)).await;
                match answer {
                    Ok(Ok(Response::Ok)) => {
                        tracing::warn!(%pod, %node, "quarantine accepted");
                        p.accepted.insert(node.clone());
                    }
                    Ok(Ok(Response::Error { code, message })) => {
                        tracing::warn!(%pod, %node, code, %message, "quarantine refused; retrying later");
                        metrics.response("refused");
                        failed = true;
                    }
                    Ok(Ok(other)) => {
                        tracing::warn!(%pod, %node, answer = ?other, "unexpected answer to quarantine; retrying later");
                        metrics.response("refused");
                        failed = true;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%pod, %node, error = %crate::error_chain(&e), "quarantine request failed; retrying later");
                        metrics.response("refused");
                        failed = true;
                    }
                    Err(e) => {
                        tracing::warn!(%pod, %node, error = %e, "quarantine task failed; retrying later");
                        failed = true;
                    }
                }
            }
            if failed {
                p.attempts = p.attempts.saturating_add(1);
                let backoff = RETRY_MIN.saturating_mul(1u32 << p.attempts.min(5)).min(RETRY_MAX);
                p.next = now + backoff;
            } else {
                metrics.response("accepted");
                finished.push(pod.clone());
            }
        }
        for pod in finished {
            pending.remove(&pod);
        }
    }
}
