//! Prometheus metrics of the agent and the HTTP endpoint that serves them.
//!
//! Everything lives in one custom [`Registry`] (no process-global state). Datapath
//! counters are read from the pinned per-CPU map at scrape time by a [`Collector`], so
//! they are exactly the kernel's monotonic totals; the rest is updated by the agent as
//! things happen. Names follow Prometheus conventions: `bulkhead_` prefix, `_total` on
//! counters, seconds and bytes as base units. The README lists every metric.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bulkhead_common::{capacity, direction, DropReason};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::datapath::state::DatapathState;
use crate::datapath::stats::{DatapathStats, StatsError};

mod server;
pub use server::{serve, serve_with, Exposition, Limits, Listen};

/// Where the agent serves metrics unless told otherwise (Cilium's agent uses 9962 too).
pub const DEFAULT_ADDRESS: &str = "0.0.0.0:9962";
/// Distinct `policy` label values of `bulkhead_policy_verdicts_total` before the rest
/// are folded into [`OTHER_POLICY`]: a bound on the series a cluster can create.
pub const MAX_POLICY_LABELS: usize = 1000;
/// The `policy` label value for policies past [`MAX_POLICY_LABELS`].
pub const OTHER_POLICY: &str = "other";
/// The `policy` label value of a verdict no policy decided (not isolated, default deny).
pub const NO_POLICY: &str = "";
/// How often a scrape may walk the conntrack map to count its entries; scrapes in between
/// report the last count.
pub const CONNTRACK_REFRESH: Duration = Duration::from_secs(5);
/// Histogram buckets of the policy implementation delay, in seconds.
const DELAY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Why metrics could not be set up or served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be created or registered (a programming error: bad name, duplicate).
    #[error("cannot register metric {name}")]
    Register {
        /// Metric name.
        name: &'static str,
        /// Cause.
        #[source]
        source: prometheus::Error,
    },
    /// The exposition could not be encoded.
    #[error("cannot encode metrics")]
    Encode {
        /// Cause.
        #[source]
        source: prometheus::Error,
    },
    /// A pinned datapath map could not be opened or read.
    #[error(transparent)]
    Stats(#[from] StatsError),
    /// The listener could not be set up.
    #[error("{op} metrics listener {address}")]
    Listen {
        /// What was attempted.
        op: &'static str,
        /// Address or inherited fd.
        address: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What an agent error was about: the `kind` label of `bulkhead_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Reading the cluster model.
    Source,
    /// Writing the eBPF maps.
    Maps,
    /// Loading, attaching or reading the datapath.
    Datapath,
    /// Files and sockets.
    Io,
    /// Routes to other nodes, the VXLAN device, masquerade.
    Network,
}

impl ErrorKind {
    /// Every kind, so all series exist from the start.
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::Source,
        ErrorKind::Maps,
        ErrorKind::Datapath,
        ErrorKind::Io,
        ErrorKind::Network,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Source => "source",
            ErrorKind::Maps => "maps",
            ErrorKind::Datapath => "datapath",
            ErrorKind::Io => "io",
            ErrorKind::Network => "network",
        }
    }
}

/// The `direction` label value of a [`direction`] number.
pub const fn direction_name(dir: u8) -> &'static str {
    if dir == direction::EGRESS {
        "egress"
    } else {
        "ingress"
    }
}

/// The scrape-time collector of datapath counters.
struct DatapathCollector {
    stats: RwLock<Option<Box<dyn DatapathStats>>>,
    drops: IntCounterVec,
    dropped_bytes: IntCounterVec,
    forwarded: IntCounterVec,
    forwarded_bytes: IntCounterVec,
    suppressed: IntCounterVec,
    xdp_drops: IntCounterVec,
    prefilter_drops: IntCounterVec,
    errors: IntCounterVec,
}

impl DatapathCollector {
    fn new(errors: IntCounterVec) -> Result<Self, MetricsError> {
        let labels = &["reason", "direction"][..];
        Ok(DatapathCollector {
            stats: RwLock::new(None),
            drops: counter_vec(
                "bulkhead_drops_total",
                "Packets the datapath dropped, by drop reason and direction.",
                labels,
            )?,
            dropped_bytes: counter_vec(
                "bulkhead_dropped_bytes_total",
                "Bytes (whole frames) the datapath dropped, by drop reason and direction.",
                labels,
            )?,
            forwarded: counter_vec(
                "bulkhead_forwarded_packets_total",
                "Packets the datapath forwarded, by direction.",
                &["direction"],
            )?,
            forwarded_bytes: counter_vec(
                "bulkhead_forwarded_bytes_total",
                "Bytes (whole frames) the datapath forwarded, by direction.",
                &["direction"],
            )?,
            suppressed: counter_vec(
                "bulkhead_flow_records_suppressed_total",
                "Flow records the datapath did not report because their endpoint was over its record budget, by endpoint id (0: no known endpoint).",
                &["endpoint"],
            )?,
            xdp_drops: counter_vec(
                "bulkhead_xdp_drops_total",
                "Pod packets XDP on the host veth dropped before TC, by drop reason (also in bulkhead_drops_total).",
                &["reason"],
            )?,
            prefilter_drops: counter_vec(
                "bulkhead_prefilter_drops_total",
                "Packets the uplink XDP prefilter dropped (source in the deny list).",
                &[],
            )?,
            errors,
        })
    }

    fn templates(&self) -> [&IntCounterVec; 7] {
        [
            &self.drops,
            &self.dropped_bytes,
            &self.forwarded,
            &self.forwarded_bytes,
            &self.suppressed,
            &self.xdp_drops,
            &self.prefilter_drops,
        ]
    }
}

impl Collector for DatapathCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.templates().into_iter().flat_map(Collector::desc).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let read = match self.stats.read() {
            Ok(guard) => match guard.as_deref() {
                Some(stats) => stats
                    .counters()
                    .and_then(|c| Ok((c, stats.flow_records_suppressed()?, stats.xdp_drops()?, stats.prefilter_drops()?))),
                None => return Vec::new(),
            },
            Err(_) => return Vec::new(),
        };
        let (counters, suppressed_by_endpoint, xdp_by_reason, prefiltered) = match read {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "reading datapath counters");
                self.errors.with_label_values(&[ErrorKind::Datapath.as_str()]).inc();
                return Vec::new();
            }
        };
        // Fresh vectors per scrape carry the kernel's totals as they are, so a counter reset
        // (maps recreated) shows as a reset, which Prometheus handles.
        let fresh = self.templates().map(|t| {
            let desc = t.desc()[0];
            let opts = Opts::new(desc.fq_name.clone(), desc.help.clone());
            IntCounterVec::new(opts, &desc.variable_labels.iter().map(String::as_str).collect::<Vec<_>>())
        });
        let [Ok(drops), Ok(dropped_bytes), Ok(forwarded), Ok(forwarded_bytes), Ok(suppressed), Ok(xdp_drops), Ok(prefilter_drops)] = fresh
        else {
            return Vec::new();
        };
        for (reason, c) in xdp_by_reason {
            xdp_drops.with_label_values(&[reason.name()]).inc_by(c.packets);
        }
        prefilter_drops.with_label_values(&[] as &[&str]).inc_by(prefiltered.packets);
        // One series per endpoint that suppressed any: bounded by the endpoints on the node.
        for (endpoint, n) in suppressed_by_endpoint {
            suppressed.with_label_values(&[&endpoint.to_string()]).inc_by(n);
        }
        for (reason, dir, c) in counters {
            let d = direction_name(dir);
            if reason == DropReason::Forwarded {
                forwarded.with_label_values(&[d]).inc_by(c.packets);
                forwarded_bytes.with_label_values(&[d]).inc_by(c.bytes);
            } else {
                drops.with_label_values(&[reason.name(), d]).inc_by(c.packets);
                dropped_bytes.with_label_values(&[reason.name(), d]).inc_by(c.bytes);
            }
        }
        [
            drops,
            dropped_bytes,
            forwarded,
            forwarded_bytes,
            suppressed,
            xdp_drops,
            prefilter_drops,
        ]
        .iter()
        .flat_map(Collector::collect)
        .collect()
    }
}

pub(crate) fn counter_vec(name: &'static str, help: &str, labels: &[&str]) -> Result<IntCounterVec, MetricsError> {
    IntCounterVec::new(Opts::new(name, help), labels).map_err(|source| MetricsError::Register { name, source })
}

pub(crate) fn gauge(name: &'static str, help: &str) -> Result<IntGauge, MetricsError> {
    IntGauge::new(name, help).map_err(|source| MetricsError::Register { name, source })
}

pub(crate) fn gauge_vec(name: &'static str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, MetricsError> {
    IntGaugeVec::new(Opts::new(name, help), labels).map_err(|source| MetricsError::Register { name, source })
}

/// `value` as a label value while fewer than [`MAX_POLICY_LABELS`] distinct ones were seen,
/// else [`OTHER_POLICY`]: a bound on the series one label can create.
fn capped<'a>(seen: &Mutex<HashSet<String>>, value: &'a str) -> &'a str {
    match seen.lock() {
        Ok(seen) if seen.contains(value) => value,
        Ok(mut seen) if seen.len() < MAX_POLICY_LABELS => {
            seen.insert(value.to_string());
            value
        }
        _ => OTHER_POLICY,
    }
}

/// Every metric of one agent.
pub struct Metrics {
    registry: Registry,
    datapath: Arc<DatapathCollector>,
    flows: IntCounterVec,
    policy_verdicts: IntCounterVec,
    byte_reports: IntCounterVec,
    policy_labels: Mutex<HashSet<String>>,
    service_translations: IntCounterVec,
    service_labels: Mutex<HashSet<String>>,
    service_ports: IntGauge,
    policies_over_cap: IntGauge,
    quarantined_pods: IntGauge,
    services_left_out: IntGaugeVec,
    flow_events_lost: IntCounter,
    implementation_delay: Histogram,
    endpoints: IntGauge,
    identities: IntGauge,
    policies: IntGauge,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    cni_requests: IntCounterVec,
    errors: IntCounterVec,
    forensics_errors: IntCounterVec,
    forensics_pods: IntGauge,
    forensics_bytes: IntGauge,
    forensics_evicted: IntCounter,
    ready: AtomicBool,
    /// Why the agent is degraded (a map write failing, retried), if it is.
    degraded: Mutex<Option<String>>,
    /// Connections to the metrics port closed at once because every slot was taken.
    pub(crate) connections_refused: IntCounter,
    /// When the conntrack map was last walked (it costs up to ~0.3 s when full).
    conntrack_walked: Mutex<Option<Instant>>,
}

/// Lets an `Arc`'d collector be registered while the agent keeps a handle on it.
struct Shared(Arc<DatapathCollector>);

impl Collector for Shared {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

impl Metrics {
    /// Creates and registers every metric; datapath counters appear once
    /// [`Metrics::set_datapath`] is called.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let errors = counter_vec("bulkhead_errors_total", "Agent errors, by kind.", &["kind"])?;
        let datapath = Arc::new(DatapathCollector::new(errors.clone())?);
        let m = Metrics {
            flows: counter_vec(
                "bulkhead_flows_processed_total",
                "Flow records read from the datapath, by verdict and direction.",
                &["verdict", "direction"],
            )?,
            policy_verdicts: counter_vec(
                "bulkhead_policy_verdicts_total",
                "Policy verdicts on new flows, by direction, verdict and deciding policy (namespace/name; \"\" when none decided, \"other\" past the label cap).",
                &["direction", "verdict", "policy"],
            )?,
            byte_reports: counter_vec(
                "bulkhead_flow_byte_reports_total",
                "Byte reports of tracked connections read from the datapath, by kind (update: periodic, end: at FIN/RST); not counted as flows.",
                &["kind"],
            )?,
            policy_labels: Mutex::new(HashSet::new()),
            service_translations: counter_vec(
                "bulkhead_service_translations_total",
                "New connections to a Service's ClusterIP translated to a backend, by verdict and Service (namespace/name; \"other\" past the label cap).",
                &["verdict", "service"],
            )?,
            service_labels: Mutex::new(HashSet::new()),
            service_ports: gauge(
                "bulkhead_service_ports",
                "ClusterIP Service ports in the datapath's service map ({vip, port, protocol}).",
            )?,
            quarantined_pods: gauge(
                "bulkhead_quarantined_pods",
                "Pods this agent holds quarantined (by command, automatic response or label), on any node.",
            )?,
            policies_over_cap: gauge(
                "bulkhead_policies_over_cap",
                "NetworkPolicies left out on this node for expanding past the per-policy entry cap (they still isolate; their rules allow nothing here).",
            )?,
            services_left_out: gauge_vec(
                "bulkhead_services_left_out",
                "What the service maps could not hold, by reason: service_ports (no id left), backends (past the per-port cap), untranslatable (SCTP with a port rewrite).",
                &["reason"],
            )?,
            flow_events_lost: IntCounter::new(
                "bulkhead_flow_events_lost_total",
                "Flow events the datapath could not hand to the agent (ring buffer full).",
            )
            .map_err(|source| MetricsError::Register {
                name: "bulkhead_flow_events_lost_total",
                source,
            })?,
            implementation_delay: Histogram::with_opts(
                HistogramOpts::new(
                    "bulkhead_policy_implementation_delay_seconds",
                    "Time from the agent seeing a change (new model, endpoint add) to the maps being programmed.",
                )
                .buckets(DELAY_BUCKETS.to_vec()),
            )
            .map_err(|source| MetricsError::Register {
                name: "bulkhead_policy_implementation_delay_seconds",
                source,
            })?,
            endpoints: gauge("bulkhead_endpoints", "Local endpoints (pods) the agent manages.")?,
            identities: gauge("bulkhead_identities", "Security identities allocated.")?,
            policies: gauge("bulkhead_policies", "NetworkPolicies in the cluster model.")?,
            map_entries: gauge_vec("bulkhead_map_entries", "Entries in each datapath map.", &["map"])?,
            map_capacity: gauge_vec("bulkhead_map_capacity", "Maximum entries of each datapath map.", &["map"])?,
            cni_requests: counter_vec(
                "bulkhead_cni_requests_total",
                "Requests on the agent's endpoint socket, by verb and result.",
                &["verb", "result"],
            )?,
            errors,
            forensics_errors: counter_vec(
                "bulkhead_forensics_errors_total",
                "Forensic store errors, by op: read (a question about a kept file that cannot be read), write, corrupt (a kept file found unreadable).",
                &["op"],
            )?,
            forensics_pods: gauge("bulkhead_forensics_pods", "Pods whose flows the forensic store keeps on disk.")?,
            forensics_bytes: gauge("bulkhead_forensics_bytes", "Bytes the forensic store's files take.")?,
            forensics_evicted: IntCounter::new(
                "bulkhead_forensics_evicted_total",
                "Pods' kept flows evicted (oldest first) to stay within the forensic store's bounds.",
            )
            .map_err(|source| MetricsError::Register {
                name: "bulkhead_forensics_evicted_total",
                source,
            })?,
            datapath,
            registry,
            ready: AtomicBool::new(false),
            degraded: Mutex::new(None),
            connections_refused: IntCounter::new(
                "bulkhead_metrics_connections_refused_total",
                "Connections to the metrics port closed on accept because the connection limit was reached.",
            )
            .map_err(|source| MetricsError::Register {
                name: "bulkhead_metrics_connections_refused_total",
                source,
            })?,
            conntrack_walked: Mutex::new(None),
        };
        let reg =
            |c: Box<dyn Collector>, name: &'static str| m.registry.register(c).map_err(|source| MetricsError::Register { name, source });
        reg(Box::new(Shared(m.datapath.clone())), "bulkhead_drops_total")?;
        reg(Box::new(m.flows.clone()), "bulkhead_flows_processed_total")?;
        reg(Box::new(m.policy_verdicts.clone()), "bulkhead_policy_verdicts_total")?;
        reg(Box::new(m.byte_reports.clone()), "bulkhead_flow_byte_reports_total")?;
        reg(Box::new(m.flow_events_lost.clone()), "bulkhead_flow_events_lost_total")?;
        reg(Box::new(m.service_translations.clone()), "bulkhead_service_translations_total")?;
        reg(Box::new(m.service_ports.clone()), "bulkhead_service_ports")?;
        reg(Box::new(m.policies_over_cap.clone()), "bulkhead_policies_over_cap")?;
        reg(Box::new(m.quarantined_pods.clone()), "bulkhead_quarantined_pods")?;
        reg(Box::new(m.services_left_out.clone()), "bulkhead_services_left_out")?;
        reg(
            Box::new(m.implementation_delay.clone()),
            "bulkhead_policy_implementation_delay_seconds",
        )?;
        reg(Box::new(m.endpoints.clone()), "bulkhead_endpoints")?;
        reg(Box::new(m.identities.clone()), "bulkhead_identities")?;
        reg(Box::new(m.policies.clone()), "bulkhead_policies")?;
        reg(Box::new(m.map_entries.clone()), "bulkhead_map_entries")?;
        reg(Box::new(m.map_capacity.clone()), "bulkhead_map_capacity")?;
        reg(Box::new(m.cni_requests.clone()), "bulkhead_cni_requests_total")?;
        reg(Box::new(m.errors.clone()), "bulkhead_errors_total")?;
        reg(Box::new(m.forensics_errors.clone()), "bulkhead_forensics_errors_total")?;
        reg(Box::new(m.forensics_pods.clone()), "bulkhead_forensics_pods")?;
        reg(Box::new(m.forensics_bytes.clone()), "bulkhead_forensics_bytes")?;
        reg(Box::new(m.forensics_evicted.clone()), "bulkhead_forensics_evicted_total")?;
        reg(
            Box::new(m.connections_refused.clone()),
            "bulkhead_metrics_connections_refused_total",
        )?;
        for (map, cap) in [
            ("endpoints", capacity::ENDPOINTS),
            ("ipcache", capacity::IPCACHE),
            ("policy", capacity::POLICY),
            ("services", capacity::SERVICES),
            ("backends", capacity::BACKENDS),
            ("rev_nat", capacity::REV_NAT),
        ] {
            m.map_capacity.with_label_values(&[map]).set(i64::from(cap));
            m.map_entries.with_label_values(&[map]).set(0);
        }
        // Conntrack: one table per endpoint, so its capacity follows the endpoints (set_state).
        m.map_capacity.with_label_values(&["conntrack"]).set(0);
        m.map_entries.with_label_values(&["conntrack"]).set(0);
        for kind in ErrorKind::ALL {
            m.errors.with_label_values(&[kind.as_str()]).inc_by(0);
        }
        for op in ["read", "write", "corrupt"] {
            m.forensics_errors.with_label_values(&[op]).inc_by(0);
        }
        Ok(m)
    }

    /// Reads datapath counters and the conntrack size from `stats` at every scrape.
    pub fn set_datapath(&self, stats: Box<dyn DatapathStats>) {
        if let Ok(mut slot) = self.datapath.stats.write() {
            *slot = Some(stats);
        }
    }

    /// Counts a forensic store error (`read`, `write`, `corrupt`).
    pub fn forensics_error(&self, op: &str) {
        self.forensics_errors.with_label_values(&[op]).inc();
    }

    /// The forensic store's size.
    pub fn set_forensics(&self, pods: usize, bytes: u64) {
        self.forensics_pods.set(i64::try_from(pods).unwrap_or(i64::MAX));
        self.forensics_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Counts a pod evicted from the forensic store.
    pub fn forensics_evicted(&self) {
        self.forensics_evicted.inc();
    }

    /// Counts one flow record; `policy` is the deciding policy's `namespace/name`.
    pub fn record_flow(&self, verdict: &str, direction: &str, policy: Option<&str>) {
        self.flows.with_label_values(&[verdict, direction]).inc();
        let label = capped(&self.policy_labels, policy.unwrap_or(NO_POLICY));
        self.policy_verdicts.with_label_values(&[direction, verdict, label]).inc();
    }

    /// Counts one byte report of a tracked connection (kind update or end).
    pub fn record_byte_report(&self, kind: bulkhead_api::FlowKind) {
        let label = match kind {
            bulkhead_api::FlowKind::Packet => return,
            bulkhead_api::FlowKind::Update => "update",
            bulkhead_api::FlowKind::End => "end",
        };
        self.byte_reports.with_label_values(&[label]).inc();
    }

    /// Counts one new connection to `service` (`namespace/name`) translated to a backend.
    pub fn record_translation(&self, verdict: &str, service: &str) {
        let label = capped(&self.service_labels, service);
        self.service_translations.with_label_values(&[verdict, label]).inc();
    }

    /// How many pods the agent holds quarantined (by request or label, on any node).
    pub fn set_quarantined_pods(&self, count: usize) {
        self.quarantined_pods.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// How many policies the last compile left out for expanding past the cap.
    pub fn set_policies_over_cap(&self, count: usize) {
        self.policies_over_cap.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Updates the Service gauges after the service maps were computed.
    pub fn set_services(&self, service_ports: usize, left_out: crate::datapath::services::LeftOut) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.service_ports.set(n(service_ports));
        for (reason, count) in [
            ("service_ports", left_out.service_ports),
            ("backends", left_out.backends),
            ("untranslatable", left_out.untranslatable),
        ] {
            self.services_left_out.with_label_values(&[reason]).set(n(count));
        }
    }

    /// Sets the lost flow events to the datapath's running total (never lowers it).
    pub fn set_flow_events_lost(&self, total: u64) {
        let now = self.flow_events_lost.get();
        if total > now {
            self.flow_events_lost.inc_by(total - now);
        }
    }

    /// Records how long a change took to reach the maps.
    pub fn observe_implementation_delay(&self, delay: Duration) {
        self.implementation_delay.observe(delay.as_secs_f64());
    }

    /// Updates the model and map gauges after a sync wrote `applied`.
    pub fn set_state(&self, endpoints: usize, identities: usize, policies: usize, applied: &DatapathState) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.endpoints.set(n(endpoints));
        self.identities.set(n(identities));
        self.policies.set(n(policies));
        self.map_entries.with_label_values(&["endpoints"]).set(n(applied.endpoints.len()));
        // Each endpoint has a conntrack table of its own.
        self.map_capacity
            .with_label_values(&["conntrack"])
            .set(n(applied.endpoints.len()).saturating_mul(i64::from(capacity::CONNTRACK_PER_ENDPOINT)));
        self.map_entries.with_label_values(&["ipcache"]).set(n(applied.ipcache.len()));
        self.map_entries.with_label_values(&["policy"]).set(n(applied.policy.len()));
        self.map_entries.with_label_values(&["services"]).set(n(applied.services.len()));
        self.map_entries.with_label_values(&["backends"]).set(n(applied.backends.len()));
        self.map_entries.with_label_values(&["rev_nat"]).set(n(applied.rev_nat.len()));
    }

    /// Counts one request on the endpoint socket.
    pub fn cni_request(&self, verb: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.cni_requests.with_label_values(&[verb, result]).inc();
    }

    /// Counts one agent error.
    pub fn error(&self, kind: ErrorKind) {
        self.errors.with_label_values(&[kind.as_str()]).inc();
    }

    /// Marks the agent ready (its maps programmed): `/healthz` answers 200 from now on.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// True once [`Metrics::set_ready`] was called.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Marks the agent degraded (`Some`: why; its last change is not in the maps and is being
    /// retried) or healthy again (`None`). `/healthz` answers 503 while degraded.
    pub fn set_degraded(&self, why: Option<String>) {
        if let Ok(mut d) = self.degraded.lock() {
            *d = why;
        }
    }

    /// Why the agent is degraded, if it is.
    pub fn degraded(&self) -> Option<String> {
        self.degraded.lock().ok().and_then(|d| d.clone())
    }

    /// The exposition in the text format 0.0.4.
    pub fn encode(&self) -> Result<String, MetricsError> {
        self.refresh_from_datapath();
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .map_err(|source| MetricsError::Encode { source })
    }

    /// Scrape-time refresh of the conntrack size and the lost flow events.
    fn refresh_from_datapath(&self) {
        let Ok(guard) = self.datapath.stats.read() else { return };
        let Some(stats) = guard.as_deref() else { return };
        // The conntrack walk is the expensive part: at most once per CONNTRACK_REFRESH, so
        // a burst of scrapes (anyone on the node can send them) costs one walk.
        let walk = match self.conntrack_walked.lock() {
            Ok(mut last) if last.is_none_or(|t| t.elapsed() >= CONNTRACK_REFRESH) => {
                *last = Some(Instant::now());
                true
            }
            _ => false,
        };
        let result = (|| {
            if walk {
                let n = stats.conntrack_entries()?;
                self.map_entries
                    .with_label_values(&["conntrack"])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            // The flow reader may report the same total; the counter takes the larger.
            self.set_flow_events_lost(stats.flow_events_lost()?);
            Ok::<(), StatsError>(())
        })();
        if let Err(e) = result {
            tracing::warn!(error = %crate::error_chain(&e), "reading datapath maps");
            self.error(ErrorKind::Datapath);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bulkhead_common::Counter;

    struct Fake;

    /// Counts the conntrack walks.
    struct Walks(Arc<std::sync::atomic::AtomicUsize>);

    impl DatapathStats for Walks {
        fn counters(&self) -> Result<Vec<(DropReason, u8, Counter)>, StatsError> {
            Ok(Vec::new())
        }
        fn conntrack_entries(&self) -> Result<u64, StatsError> {
            Ok(self.0.fetch_add(1, Ordering::SeqCst) as u64 + 1)
        }
        fn flow_events_lost(&self) -> Result<u64, StatsError> {
            Ok(0)
        }
    }

    #[test]
    fn a_burst_of_scrapes_walks_conntrack_once() {
        let m = Metrics::new().unwrap();
        let walks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        m.set_datapath(Box::new(Walks(walks.clone())));
        for _ in 0..20 {
            let text = m.encode().unwrap();
            assert!(text.contains("bulkhead_map_entries{map=\"conntrack\"} 1"), "{text}");
        }
        assert_eq!(walks.load(Ordering::SeqCst), 1);
        // Once the refresh interval passed, the next scrape counts again.
        *m.conntrack_walked.lock().unwrap() = Some(Instant::now() - CONNTRACK_REFRESH);
        assert!(m.encode().unwrap().contains("bulkhead_map_entries{map=\"conntrack\"} 2"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_and_surplus_clients_are_cut_off_and_scrapes_still_answer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let m = Arc::new(sample());
        let listener = Listen::Address("127.0.0.1:0".parse().unwrap()).bind().unwrap().unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 4,
            header_timeout: Duration::from_millis(300),
            connection_lifetime: Duration::from_secs(2),
        };
        let server = tokio::spawn(serve_with(m.clone(), listener, limits));
        // Slow clients: half a request head, then nothing. They take every slot...
        let mut slow = Vec::new();
        for _ in 0..4 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
            slow.push(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ...so 20 more are closed at once, not queued, and counted.
        for _ in 0..20 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
            assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "a surplus connection was kept: {n:?}");
        }
        assert_eq!(m.connections_refused.get(), 20);
        // The header timeout ends the slow ones (hyper answers 408 or closes).
        for mut s in slow {
            let mut out = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
            assert!(read.is_ok(), "a slow client kept its connection past the header timeout");
        }
        // And an honest scrape is served again.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        // A request head over the limit is refused, not buffered.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let huge = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\n\r\n", "a".repeat(64 * 1024));
        let _ = s.write_all(huge.as_bytes()).await;
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out)).await;
        assert!(!out.starts_with("HTTP/1.1 200"), "a 64 KiB head was served");
        server.abort();
    }

    impl DatapathStats for Fake {
        fn counters(&self) -> Result<Vec<(DropReason, u8, Counter)>, StatsError> {
            Ok(vec![
                (DropReason::Forwarded, direction::EGRESS, Counter { packets: 7, bytes: 700 }),
                (DropReason::PolicyDenied, direction::INGRESS, Counter { packets: 3, bytes: 180 }),
            ])
        }

        fn conntrack_entries(&self) -> Result<u64, StatsError> {
            Ok(5)
        }

        fn xdp_drops(&self) -> Result<Vec<(DropReason, Counter)>, StatsError> {
            Ok(vec![(DropReason::PolicyDenied, Counter { packets: 2, bytes: 120 })])
        }

        fn flow_events_lost(&self) -> Result<u64, StatsError> {
            Ok(3)
        }

        fn flow_records_suppressed(&self) -> Result<Vec<(u32, u64)>, StatsError> {
            Ok(vec![(12, 9)])
        }
    }

    fn sample() -> Metrics {
        let m = Metrics::new().unwrap();
        m.set_datapath(Box::new(Fake));
        m.record_flow("forwarded", "egress", Some("x/allow-b"));
        m.record_flow("dropped", "ingress", None);
        m.set_flow_events_lost(4);
        m.set_flow_events_lost(2);
        m.observe_implementation_delay(Duration::from_millis(3));
        m.set_state(2, 3, 1, &DatapathState::default());
        m.record_translation("forwarded", "x/web");
        m.record_byte_report(bulkhead_api::FlowKind::Update);
        m.set_services(
            3,
            crate::datapath::services::LeftOut {
                untranslatable: 1,
                ..Default::default()
            },
        );
        m.cni_request("add", true);
        m.cni_request("del", false);
        m.error(ErrorKind::Source);
        m
    }

    #[test]
    fn exposition_carries_values() {
        let text = sample().encode().unwrap();
        for line in [
            "bulkhead_forwarded_packets_total{direction=\"egress\"} 7",
            "bulkhead_forwarded_bytes_total{direction=\"egress\"} 700",
            "bulkhead_drops_total{direction=\"ingress\",reason=\"policy_denied\"} 3",
            "bulkhead_dropped_bytes_total{direction=\"ingress\",reason=\"policy_denied\"} 180",
            "bulkhead_flow_events_lost_total 4",
            "bulkhead_flow_records_suppressed_total{endpoint=\"12\"} 9",
            "bulkhead_service_translations_total{service=\"x/web\",verdict=\"forwarded\"} 1",
            "bulkhead_service_ports 3",
            "bulkhead_services_left_out{reason=\"untranslatable\"} 1",
            "bulkhead_map_entries{map=\"conntrack\"} 5",
            "bulkhead_map_capacity{map=\"policy\"} 262144",
            "bulkhead_policy_verdicts_total{direction=\"egress\",policy=\"x/allow-b\",verdict=\"forwarded\"} 1",
            "bulkhead_policy_verdicts_total{direction=\"ingress\",policy=\"\",verdict=\"dropped\"} 1",
            "bulkhead_cni_requests_total{result=\"error\",verb=\"del\"} 1",
            "bulkhead_errors_total{kind=\"source\"} 1",
            "bulkhead_errors_total{kind=\"io\"} 0",
            "bulkhead_policy_implementation_delay_seconds_count 1",
            "bulkhead_endpoints 2",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn policy_label_cardinality_is_bounded() {
        let m = Metrics::new().unwrap();
        for i in 0..MAX_POLICY_LABELS + 50 {
            m.record_flow("forwarded", "ingress", Some(&format!("ns/p{i}")));
        }
        // Known labels keep counting under their own name once the cap is reached.
        m.record_flow("forwarded", "ingress", Some("ns/p0"));
        let text = m.encode().unwrap();
        let series = text.lines().filter(|l| l.starts_with("bulkhead_policy_verdicts_total{")).count();
        assert_eq!(series, MAX_POLICY_LABELS + 1);
        assert!(text.contains("policy=\"other\",verdict=\"forwarded\"} 50"), "{text}");
        assert!(text.contains("policy=\"ns/p0\",verdict=\"forwarded\"} 2"), "{text}");
    }

    /// The real `promtool` accepts the exposition (Debian package `prometheus`, installed by
    /// scripts/setup.sh).
    #[test]
    fn promtool_check_metrics_passes() {
        assert_promtool_accepts(&sample().encode().unwrap());
    }

    /// Runs the real `promtool check metrics` on `text`: it must pass with no lint finding
    /// (promtool prints findings and still exits 0 for some).
    pub(crate) fn assert_promtool_accepts(text: &str) {
        use std::io::Write;
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool is missing: run scripts/setup.sh (Debian package prometheus)");
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics:\n{}{}\n--- exposition:\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The README's agent metrics (before "### The relay's metrics"), or the relay's
    /// (that section, to the next heading of the same or a higher level).
    pub(crate) fn readme_table(relay: bool) -> &'static str {
        let readme = include_str!("../../../README.md");
        let (agent, rest) = readme
            .split_once("### The relay's metrics")
            .expect("README has the relay's metrics");
        if !relay {
            return agent;
        }
        let end = rest.find("\n## ").or_else(|| rest.find("\n### ")).unwrap_or(rest.len());
        &rest[..end]
    }

    /// Metric names a text mentions (`bulkhead_...`), histogram suffixes stripped.
    pub(crate) fn mentioned(text: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(i) = rest.find("bulkhead_") {
            let tail = &rest[i..];
            let end = tail.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(tail.len());
            let name = &tail[..end];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(name.to_string());
            rest = &tail[end..];
        }
        out
    }

    #[test]
    fn dashboard_and_readme_name_only_exported_metrics() {
        let exported: std::collections::BTreeSet<String> = sample()
            .encode()
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        let dashboard = include_str!("../../../manifests/grafana-dashboard.json");
        let _: serde_json::Value = serde_json::from_str(dashboard).unwrap();
        let unknown: Vec<_> = mentioned(dashboard).difference(&exported).cloned().collect();
        assert!(unknown.is_empty(), "dashboard uses unknown metrics {unknown:?}");
        let table: String = readme_table(false).lines().filter(|l| l.starts_with("| `bulkhead_")).collect();
        assert_eq!(mentioned(&table), exported, "README metrics table vs the exposition");
    }

    #[test]
    fn listen_flags() {
        assert_eq!(Listen::from_flags("none", None).unwrap(), Listen::Disabled);
        assert_eq!(Listen::from_flags("none", Some(3)).unwrap(), Listen::Fd(3));
        assert_eq!(
            Listen::from_flags(DEFAULT_ADDRESS, None).unwrap(),
            Listen::Address("0.0.0.0:9962".parse().unwrap())
        );
        assert!(Listen::from_flags("nonsense", None).is_err());
    }

    #[tokio::test]
    async fn serves_metrics_and_healthz() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let m = Arc::new(sample());
        let listener = Listen::Address("127.0.0.1:0".parse().unwrap()).bind().unwrap().unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(m.clone(), listener));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 503"));
        assert!(get("/livez").await.starts_with("HTTP/1.1 200"));
        m.set_ready();
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        m.set_degraded(Some("insert on map policy failed".into()));
        let degraded = get("/healthz").await;
        assert!(
            degraded.starts_with("HTTP/1.1 503") && degraded.contains("degraded: insert on map policy failed"),
            "{degraded}"
        );
        assert!(get("/livez").await.starts_with("HTTP/1.1 200"), "alive while degraded");
        m.set_degraded(None);
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        let body = get("/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("text/plain; version=0.0.4"), "{body}");
        assert!(body.contains("bulkhead_drops_total"), "{body}");
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
