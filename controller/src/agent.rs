//! The node agent: keeps the eBPF maps equal to what the cluster model and the local
//! endpoints compile to, and serves the endpoint socket for the CNI plugin.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_cni::agent_api::{AgentStatus, EndpointRef, EndpointSpec, Request, Response};
use bulkhead_cni::netlink::{self as cni_netlink, with_handle, NetlinkError};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

use crate::config::{self, AgentConfig, AgentFile, ConfigError, Overrides, SourceKind};
use crate::datapath::{Datapath, DatapathError};
use crate::flows::{self, Clock, FlowStore, Resolver};
use crate::kube_source::{self, KubeSource, KubeSourceOptions};
use crate::maps::{self, MapsError};
use crate::metrics::{self, ErrorKind, Metrics, MetricsError, PinnedStats};
use crate::model::Cluster;
use crate::policy::{Compiler, DatapathState, LocalEndpoint};
use crate::source::{EmptySource, FileSource, Source, SourceError};
use bulkhead_common::IpcacheValue;

/// CNI "try again later".
const CODE_TRY_AGAIN: u32 = 11;
/// Our code: the agent could not program the endpoint.
const CODE_AGENT_FAILED: u32 = 102;
/// How long an ADD waits for its pod to appear in the model.
const POD_WAIT: Duration = Duration::from_secs(10);
/// How often the source is polled for changes.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Every this many polls, endpoints whose host veth is gone are dropped (a DEL the agent missed).
const RECONCILE_EVERY_POLLS: u32 = 10;

/// `bulkhead agent` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// This node's name (in a DaemonSet: the downward API's `spec.nodeName`).
    #[arg(long, env = "BULKHEAD_NODE_NAME")]
    pub node_name: Option<String>,
    /// YAML file with the same keys as these flags; flags and `BULKHEAD_*` override it.
    #[arg(long, env = "BULKHEAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the model comes from [default: files with --manifests, kubernetes in a pod or
    /// with --kubeconfig, else none].
    #[arg(long, env = "BULKHEAD_SOURCE", value_enum)]
    pub source: Option<SourceKind>,
    /// Kubeconfig for the kubernetes source [default: KUBECONFIG, ~/.kube/config, in-cluster].
    #[arg(long, env = "BULKHEAD_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// A directory of Namespace, Pod and NetworkPolicy manifests (local-files source).
    #[arg(long, env = "BULKHEAD_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// State directory: the endpoint socket (`agent.sock`), the endpoint registry and
    /// `pod-cidr` [default: /run/bulkhead].
    #[arg(long, env = "BULKHEAD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// bpffs directory where maps are pinned [default: /sys/fs/bpf/bulkhead].
    #[arg(long, env = "BULKHEAD_BPFFS")]
    pub bpffs: Option<PathBuf>,
    /// This node's pod CIDR; the kubernetes source learns it from the Node otherwise.
    #[arg(long, env = "BULKHEAD_POD_CIDR")]
    pub pod_cidr: Option<ipnetwork::Ipv4Network>,
    /// Flow records kept in memory for `bulkhead observe`; the oldest fall out [default: 8192].
    #[arg(long, env = "BULKHEAD_FLOW_HISTORY")]
    pub flow_history: Option<usize>,
    /// Address to serve `/metrics` and `/healthz` on; `none` disables [default: 0.0.0.0:9962].
    #[arg(long, env = "BULKHEAD_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,
    /// Serve metrics on this inherited listening socket instead (overrides the address).
    #[arg(long)]
    pub metrics_fd: Option<i32>,
}

impl AgentArgs {
    /// Applies the config file and the defaults (see [`crate::config`] for precedence).
    pub fn resolve(&self) -> Result<AgentConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => AgentFile::read(path)?,
            None => AgentFile::default(),
        };
        let flags = Overrides {
            node_name: self.node_name.clone(),
            source: self.source,
            kubeconfig: self.kubeconfig.clone(),
            manifests: self.manifests.clone(),
            state_dir: self.state_dir.clone(),
            bpffs: self.bpffs.clone(),
            pod_cidr: self.pod_cidr,
            metrics_address: self.metrics_address.clone(),
            flow_history: self.flow_history,
        };
        config::resolve(flags, file, std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
    }
}

/// Why the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Loading or attaching the datapath failed.
    #[error(transparent)]
    Datapath(Box<DatapathError>),
    /// Writing the maps failed.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The model source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Listing or deleting host veths failed.
    #[error("host links: {op}")]
    Link {
        /// What was attempted.
        op: &'static str,
        /// Cause (boxed: netlink errors are large).
        #[source]
        source: Box<NetlinkError>,
    },
    /// Metrics could not be set up.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// File or socket I/O failed.
    #[error("{op} {path}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// Path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// The `kind` label this error counts under in `bulkhead_errors_total`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AgentError::Datapath(_) | AgentError::Metrics(_) | AgentError::Link { .. } => ErrorKind::Datapath,
            AgentError::Config(_) => ErrorKind::Io,
            AgentError::Maps(_) => ErrorKind::Maps,
            AgentError::Source(_) => ErrorKind::Source,
            AgentError::Io { .. } => ErrorKind::Io,
        }
    }
}

impl From<DatapathError> for AgentError {
    fn from(e: DatapathError) -> Self {
        AgentError::Datapath(Box::new(e))
    }
}

/// A registered endpoint, as persisted in the state directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct EndpointRecord {
    endpoint_id: u32,
    spec: EndpointSpec,
}

/// The agent's state; one lock guards it all, so map syncs never interleave.
struct Agent {
    node_name: String,
    source: Box<dyn Source>,
    cluster: Cluster,
    compiler: Compiler,
    endpoints: BTreeMap<(String, String), EndpointRecord>,
    /// What the maps hold, as far as the agent knows.
    applied: DatapathState,
    datapath: Datapath,
    generation: u64,
    registry: PathBuf,
    metrics: Arc<Metrics>,
    /// This node's own addresses, given the reserved HOST identity.
    host_addresses: Vec<Ipv4Addr>,
    /// Flow history; its resolver is refreshed after every reprogram.
    flows: Arc<FlowStore>,
    /// The source synced and its model reached the maps at least once.
    ready: bool,
    /// A change seen (when) that is not in the maps yet: before the first sync, or after a
    /// failed map write.
    pending: Option<Instant>,
    /// The pod CIDR last published for the CNI plugin.
    pod_cidr: Option<ipnetwork::Ipv4Network>,
    /// The operator set the pod CIDR; the Node's is not published over it.
    pod_cidr_pinned: bool,
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl Agent {
    fn locals(&self) -> Vec<LocalEndpoint> {
        self.endpoints
            .values()
            .filter_map(|r| {
                Some(LocalEndpoint {
                    endpoint_id: r.endpoint_id,
                    host_ifindex: r.spec.host_ifindex,
                    namespace: r.spec.pod_namespace.clone(),
                    pod: r.spec.pod_name.clone(),
                    ipv4: r.spec.ipv4,
                    mac: parse_mac(&r.spec.mac)?,
                })
            })
            .collect()
    }

    /// Recompiles and writes the difference into the maps; `seen` is when the agent learnt
    /// of the change, for the implementation delay histogram.
    fn reprogram(&mut self, seen: Option<Instant>) -> Result<(), AgentError> {
        if !self.ready {
            // Until the source's first sync the model is empty: compiling it would wipe the
            // last known state from the pinned maps. The first synced refresh catches up.
            self.pending = self.pending.or(seen).or_else(|| Some(Instant::now()));
            return Ok(());
        }
        let started = Instant::now();
        let locals = self.locals();
        let mut new = self.compiler.compile(&self.cluster, &locals);
        add_host_addresses(&mut new, &self.host_addresses);
        match maps::sync(&mut self.datapath.maps, &self.applied, &new) {
            Ok(stats) => {
                self.applied = new;
                self.generation += 1;
                self.pending = None;
                self.flows
                    .set_resolver(Resolver::build(&self.node_name, &self.cluster, self.compiler.rules(), &locals));
                self.metrics.set_state(
                    self.endpoints.len(),
                    self.compiler.identities().len(),
                    self.cluster.policies().len(),
                    &self.applied,
                );
                if let Some(seen) = seen {
                    self.metrics.observe_implementation_delay(seen.elapsed());
                }
                if self.ready {
                    // `/healthz` turns 200 with the first synced model in the maps (the
                    // Kubernetes source gets there after start, from the poller).
                    self.metrics.set_ready();
                }
                tracing::debug!(upserts = stats.upserts, removals = stats.removals, elapsed = ?started.elapsed(), "maps programmed");
                Ok(())
            }
            Err(e) => {
                // Retried by the next refresh, from when the change was first seen.
                self.pending = self.pending.or(seen).or_else(|| Some(Instant::now()));
                // Some writes happened: treat every key of either state as possibly present,
                // so the next sync removes what should not be there.
                let mut merged = std::mem::take(&mut self.applied);
                merged.endpoints.extend(new.endpoints);
                merged.ipcache.extend(new.ipcache);
                merged.policy.extend(new.policy);
                self.applied = merged;
                Err(e.into())
            }
        }
    }

    /// Re-reads the source and this node's addresses; on a change, reprograms.
    fn refresh(&mut self, force: bool) -> Result<(), AgentError> {
        let polled = self.source.poll(force);
        if let Ok(Some(cluster)) = polled.as_ref() {
            // The first synced model is written even when empty: until then the maps hold
            // what the previous agent left, which is the last known state.
            let first = !self.ready && self.source.synced();
            if first || *cluster != self.cluster {
                self.cluster = cluster.clone();
                self.pending.get_or_insert_with(Instant::now);
            }
            self.ready |= self.source.synced();
        }
        // A change seen earlier whose sync failed is retried here too, with the last good
        // model even when the source fails now.
        if let Some(seen) = self.pending {
            self.reprogram(Some(seen))?;
        }
        self.publish_pod_cidr();
        polled.map(drop).map_err(Into::into)
    }

    /// Takes this node's current addresses; a change is programmed by the next refresh.
    fn note_host_addresses(&mut self, addresses: Vec<Ipv4Addr>) {
        if addresses != self.host_addresses {
            tracing::info!(addresses = ?addresses, "node addresses");
            self.host_addresses = addresses;
            self.pending.get_or_insert_with(Instant::now);
        }
    }

    /// Writes the source's pod CIDR to `<state dir>/pod-cidr` for the CNI plugin's IPAM.
    fn publish_pod_cidr(&mut self) {
        if self.pod_cidr_pinned {
            return;
        }
        let Some(cidr) = self.source.pod_cidr().filter(|c| Some(*c) != self.pod_cidr) else {
            return;
        };
        let path = kube_source::pod_cidr_path(self.registry.parent().unwrap_or(Path::new(".")));
        // Atomically: a CNI ADD reading it meanwhile must see the old CIDR or the new one.
        match write_atomic(&path, format!("{cidr}\n").as_bytes()) {
            Ok(()) => {
                tracing::info!(pod_cidr = %cidr, path = %path.display(), "node pod cidr published");
                self.pod_cidr = Some(cidr);
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot publish the pod cidr"),
        }
    }

    fn save_registry(&self) -> Result<(), AgentError> {
        let records: Vec<_> = self.endpoints.values().collect();
        let io = |source| AgentError::Io {
            op: "write",
            path: self.registry.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(&records).map_err(|e| io(e.into()))?;
        write_atomic(&self.registry, &text).map_err(io)
    }

    fn add_endpoint(&mut self, spec: EndpointSpec) -> Response {
        let seen = Instant::now();
        if parse_mac(&spec.mac).is_none() {
            return Response::Error {
                code: CODE_AGENT_FAILED,
                message: format!("malformed mac {:?}", spec.mac),
            };
        }
        let key = (spec.container_id.clone(), spec.ifname.clone());
        let endpoint_id = match self.endpoints.get(&key) {
            Some(r) => r.endpoint_id,
            None => self.endpoints.values().map(|r| r.endpoint_id).max().unwrap_or(0) + 1,
        };
        // Programs first: with no endpoint entry yet they drop everything (fail closed).
        if let Err(e) = self.datapath.attach(&spec.host_ifname) {
            self.metrics.error(ErrorKind::Datapath);
            return Response::Error {
                code: CODE_AGENT_FAILED,
                message: error_chain(&e),
            };
        }
        let previous = self.endpoints.insert(key.clone(), EndpointRecord { endpoint_id, spec });
        if let Err(e) = self.reprogram(Some(seen)) {
            self.metrics.error(e.kind());
            match previous {
                Some(p) => self.endpoints.insert(key, p),
                None => self.endpoints.remove(&key),
            };
            if let Err(e) = self.reprogram(None) {
                self.metrics.error(e.kind());
            }
            return Response::Error {
                code: CODE_AGENT_FAILED,
                message: error_chain(&e),
            };
        }
        if let Err(e) = self.save_registry() {
            self.metrics.error(e.kind());
            tracing::warn!(error = %error_chain(&e), "cannot persist endpoint registry");
        }
        Response::Ok
    }

    fn del_endpoint(&mut self, r: &EndpointRef) -> Response {
        if self.endpoints.remove(&(r.container_id.clone(), r.ifname.clone())).is_none() {
            return Response::Ok;
        }
        // Before the first sync the model is empty: compiling it would wipe the last known
        // state from the maps. The first synced reprogram removes this endpoint.
        let result = match self.ready {
            true => self.reprogram(Some(Instant::now())).and_then(|()| self.save_registry()),
            false => self.save_registry(),
        };
        match result {
            Ok(()) => Response::Ok,
            Err(e) => {
                self.metrics.error(e.kind());
                Response::Error {
                    code: CODE_AGENT_FAILED,
                    message: error_chain(&e),
                }
            }
        }
    }

    fn check_endpoint(&self, r: &EndpointRef) -> Response {
        match self.endpoints.get(&(r.container_id.clone(), r.ifname.clone())) {
            Some(rec) if self.applied.endpoints.contains_key(&rec.spec.host_ifindex) => Response::Ok,
            Some(_) => Response::Error {
                code: CODE_AGENT_FAILED,
                message: format!("endpoint {}/{} is not programmed", r.container_id, r.ifname),
            },
            None => Response::Error {
                code: CODE_AGENT_FAILED,
                message: format!("endpoint {}/{} is unknown", r.container_id, r.ifname),
            },
        }
    }

    /// CNI GC: forgets every endpoint not in `valid`, then deletes its host veth if still there.
    fn gc(&mut self, network: &str, valid: &[EndpointRef]) -> Response {
        let keep: BTreeSet<(String, String)> = valid.iter().map(|r| (r.container_id.clone(), r.ifname.clone())).collect();
        // `valid` lists one network's attachments: another network's endpoints are not stale.
        // Records (or requests) from before networks were recorded match any network.
        let ours = |r: &EndpointRecord| network.is_empty() || r.spec.network.is_empty() || r.spec.network == network;
        let stale: Vec<EndpointRecord> = self
            .endpoints
            .iter()
            .filter(|(k, r)| ours(r) && !keep.contains(*k))
            .map(|(_, r)| r.clone())
            .collect();
        if stale.is_empty() {
            return Response::Ok;
        }
        for r in &stale {
            self.endpoints.remove(&(r.spec.container_id.clone(), r.spec.ifname.clone()));
        }
        tracing::info!(removed = stale.len(), "gc: dropping endpoints the runtime no longer knows");
        // Maps first: the veth's ifindex must not be enforced as this endpoint once it is gone.
        let mut errors = Vec::new();
        if let Err(e) = self.reprogram(Some(Instant::now())).and_then(|()| self.save_registry()) {
            errors.push(error_chain(&e));
        }
        let names: Vec<String> = stale.iter().map(|r| r.spec.host_ifname.clone()).collect();
        if let Err(e) = delete_links(names) {
            errors.push(error_chain(&e));
        }
        if errors.is_empty() {
            Response::Ok
        } else {
            Response::Error {
                code: CODE_AGENT_FAILED,
                message: errors.join("; "),
            }
        }
    }

    /// Drops endpoints whose host veth is gone or was recreated under another ifindex: a DEL
    /// that ran while the agent was down or unreachable. Returns how many were dropped.
    fn reconcile_links(&mut self) -> Result<usize, AgentError> {
        if self.endpoints.is_empty() {
            return Ok(0);
        }
        let names: Vec<String> = self.endpoints.values().map(|r| r.spec.host_ifname.clone()).collect();
        let live = live_links(names).map_err(|e| AgentError::Link {
            op: "list",
            source: Box::new(e),
        })?;
        let before = self.endpoints.len();
        self.endpoints
            .retain(|_, r| live.get(&r.spec.host_ifname) == Some(&r.spec.host_ifindex));
        let dropped = before - self.endpoints.len();
        if dropped > 0 {
            tracing::info!(dropped, "dropping endpoints whose host veth is gone");
            self.reprogram(Some(Instant::now()))?;
            self.save_registry()?;
        }
        Ok(dropped)
    }

    fn status(&self) -> AgentStatus {
        AgentStatus {
            node_name: self.node_name.clone(),
            ready: self.ready,
            endpoints: self.endpoints.len(),
            identities: self.compiler.identities().len(),
            policies: self.cluster.policies().len(),
            policy_entries: self.applied.policy.len(),
            generation: self.generation,
        }
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// This node's own IPv4 addresses (empty when they cannot be read: the node then gets no
/// HOST allowance, which fails closed).
fn host_addresses() -> Vec<Ipv4Addr> {
    with_handle(None, |h| async move { cni_netlink::all_ipv4_addresses(&h).await }).unwrap_or_else(|e| {
        tracing::warn!(error = %error_chain(&e), "cannot list node addresses");
        Vec::new()
    })
}

/// Gives this node's addresses the reserved HOST identity, which the datapath always admits:
/// Kubernetes documents that traffic between a pod and its own node is allowed whatever the
/// policy (kubelet probes depend on it). A pod's own /32 is never overridden.
fn add_host_addresses(state: &mut DatapathState, addresses: &[Ipv4Addr]) {
    for &addr in addresses {
        state.ipcache.entry((addr, 32)).or_insert(IpcacheValue {
            identity: bulkhead_common::identity::HOST,
            flags: 0,
        });
    }
}

/// The ifindex of each of `names` that exists in the agent's network namespace.
fn live_links(names: Vec<String>) -> Result<BTreeMap<String, u32>, NetlinkError> {
    with_handle(None, |h| async move {
        let mut live = BTreeMap::new();
        for name in names {
            if let Some(link) = cni_netlink::link_by_name(&h, &name).await? {
                live.insert(name, link.index);
            }
        }
        Ok(live)
    })
}

/// Deletes each of `names` that exists; absence is success.
fn delete_links(names: Vec<String>) -> Result<(), AgentError> {
    with_handle(None, |h| async move {
        for name in &names {
            cni_netlink::delete_link(&h, name).await?;
        }
        Ok(())
    })
    .map_err(|e| AgentError::Link {
        op: "delete",
        source: Box::new(e),
    })
}

/// The error and its causes, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Serves one request and counts it in `bulkhead_cni_requests_total`.
async fn handle(agent: &Mutex<Agent>, metrics: &Metrics, request: Request) -> Response {
    let verb = match &request {
        Request::AddEndpoint(_) => "add",
        Request::DelEndpoint(_) => "del",
        Request::CheckEndpoint(_) => "check",
        Request::Reload => "reload",
        Request::Status => "status",
        Request::Gc { .. } => "gc",
        Request::Observe(_) => "observe",
        Request::Explain { .. } => "explain",
    };
    let response = dispatch(agent, request).await;
    metrics.cni_request(verb, !matches!(response, Response::Error { .. }));
    response
}

async fn dispatch(agent: &Mutex<Agent>, request: Request) -> Response {
    match request {
        Request::AddEndpoint(spec) => {
            let deadline = Instant::now() + POD_WAIT;
            loop {
                {
                    let mut a = agent.lock().await;
                    // The pod may have been written after the last poll: re-read before waiting.
                    if a.cluster.pod(&spec.pod_namespace, &spec.pod_name).is_none() {
                        if let Err(e) = a.refresh(true) {
                            a.metrics.error(e.kind());
                            tracing::warn!(error = %error_chain(&e), "reloading the model");
                        }
                    }
                    if a.ready && a.cluster.pod(&spec.pod_namespace, &spec.pod_name).is_some() {
                        return a.add_endpoint(spec);
                    }
                    if Instant::now() > deadline {
                        let message = if a.ready {
                            format!("pod {}/{} is not known to the agent yet", spec.pod_namespace, spec.pod_name)
                        } else {
                            "the agent has not finished its first sync with the cluster".to_string()
                        };
                        return Response::Error {
                            code: CODE_TRY_AGAIN,
                            message,
                        };
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Request::DelEndpoint(r) => agent.lock().await.del_endpoint(&r),
        Request::CheckEndpoint(r) => agent.lock().await.check_endpoint(&r),
        Request::Gc { network, valid } => agent.lock().await.gc(&network, &valid),
        Request::Reload => {
            let mut a = agent.lock().await;
            match a.refresh(true) {
                Ok(()) => Response::Ok,
                Err(e) => {
                    a.metrics.error(e.kind());
                    Response::Error {
                        code: CODE_AGENT_FAILED,
                        message: error_chain(&e),
                    }
                }
            }
        }
        Request::Status => Response::Status(agent.lock().await.status()),
        Request::Explain { from, to, port, protocol } => crate::explain::respond(&agent.lock().await.cluster, &from, &to, port, &protocol),
        // Streams are answered by `serve_connection`, which never gets here with one.
        Request::Observe(_) => Response::Error {
            code: 6,
            message: "observe is a stream request".into(),
        },
    }
}

async fn serve_connection(agent: Arc<Mutex<Agent>>, flows: Arc<FlowStore>, metrics: Arc<Metrics>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut read = BufReader::new(read);
    let response = match read.read_line(&mut line).await {
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            // Needs no agent lock: the flow store has its own, held only briefly.
            Ok(Request::Observe(request)) => return flows::serve(flows, request, read, write).await,
            Ok(request) => handle(&agent, &metrics, request).await,
            Err(e) => Response::Error {
                code: 6,
                message: format!("malformed request: {e}"),
            },
        },
        Err(e) => Response::Error {
            code: 6,
            message: format!("reading request: {e}"),
        },
    };
    let Ok(mut out) = serde_json::to_vec(&response) else { return };
    out.push(b'\n');
    if let Err(e) = write.write_all(&out).await {
        tracing::debug!(error = %e, "client went away");
    }
}

fn load_registry(path: &Path) -> BTreeMap<(String, String), EndpointRecord> {
    let records: Vec<EndpointRecord> = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable endpoint registry");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    };
    records
        .into_iter()
        .map(|r| ((r.spec.container_id.clone(), r.spec.ifname.clone()), r))
        .collect()
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(args: AgentArgs) -> Result<(), AgentError> {
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| AgentError::Io { op, path, source }
    };
    let metrics_fd = args.metrics_fd;
    let args = args.resolve()?;
    std::fs::create_dir_all(&args.state_dir).map_err(io("create", &args.state_dir))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io("start runtime", &args.state_dir))?;
    let mut datapath = Datapath::load(&args.bpffs)?;
    let flow_ring = datapath.take_flow_ring();
    let metrics = Arc::new(Metrics::new()?);
    let flow_store = Arc::new(FlowStore::new(&args.node_name, args.flow_history, Clock::now()).with_metrics(metrics.clone()));
    metrics.set_datapath(Box::new(PinnedStats::open(datapath.pin_dir())?));
    // Validate the flags before the maps change, so a typo fails at once.
    let listen = metrics::Listen::from_flags(&args.metrics_address, metrics_fd)?;
    // Reconcile against what the pinned maps really hold (an earlier agent's entries).
    let applied = datapath.maps.read_state()?;
    let source: Box<dyn Source> = match (args.source, &args.manifests) {
        (SourceKind::Files, Some(dir)) => Box::new(FileSource::new(dir)),
        (SourceKind::Files, None) => return Err(ConfigError::NoManifests.into()),
        (SourceKind::Kubernetes, _) => {
            let client = runtime.block_on(kube_source::client(args.kubeconfig.as_deref()))?;
            let _entered = runtime.enter();
            Box::new(KubeSource::start(client, &args.node_name, KubeSourceOptions::default()))
        }
        (SourceKind::None, _) => Box::new(EmptySource::default()),
    };
    if let Some(cidr) = args.pod_cidr {
        let path = kube_source::pod_cidr_path(&args.state_dir);
        write_atomic(&path, format!("{cidr}\n").as_bytes()).map_err(io("write", &path))?;
    }
    let registry = args.state_dir.join("endpoints.json");
    let mut agent = Agent {
        node_name: args.node_name.clone(),
        source,
        cluster: Cluster::new(),
        compiler: Compiler::new(),
        endpoints: load_registry(&registry),
        applied,
        datapath,
        generation: 0,
        registry,
        metrics: metrics.clone(),
        host_addresses: Vec::new(),
        flows: flow_store.clone(),
        ready: false,
        pending: None,
        pod_cidr: args.pod_cidr,
        pod_cidr_pinned: args.pod_cidr.is_some(),
    };
    agent.note_host_addresses(host_addresses());
    agent.refresh(true)?;
    // Endpoints deleted while the agent was away (CNI DEL carries on without it).
    match agent.reconcile_links() {
        Ok(dropped) => tracing::info!(dropped, "endpoint registry reconciled with host veths"),
        Err(e) => tracing::warn!(error = %error_chain(&e), "cannot reconcile endpoints with host veths"),
    }
    // A source that is not synced yet (Kubernetes) leaves the pinned maps as they are
    // until its first full sync; the poller then writes the model.
    if agent.ready {
        agent.reprogram(None)?;
        metrics.set_ready();
    }
    tracing::info!(node = %args.node_name, source = ?args.source, ready = agent.ready, endpoints = agent.endpoints.len(), pod_cidr = ?agent.pod_cidr, "datapath programmed");

    runtime.block_on(async move {
        let socket = args.state_dir.join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).map_err(io("bind", &socket))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(io("chmod", &socket))?;
        let metrics_server = match listen.bind()? {
            Some(listener) => {
                let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
                tracing::info!(address = %addr, "serving metrics");
                Some(tokio::spawn(metrics::serve(metrics.clone(), listener)))
            }
            None => None,
        };
        let agent = Arc::new(Mutex::new(agent));
        match flow_ring {
            Some(ring) => match flows::spawn_reader(ring, flow_store.clone()) {
                Ok(_) => tracing::info!(history = args.flow_history, "reading flow records"),
                Err(e) => tracing::warn!(error = %error_chain(&e), "flow records disabled"),
            },
            None => tracing::warn!("the datapath has no flow ring buffer: flow records disabled"),
        }
        let poller = {
            let agent = agent.clone();
            tokio::spawn(async move {
                let mut polls = 0u32;
                // A bad manifest fails every poll until it is fixed: log it once, and its end.
                let mut last_error: Option<String> = None;
                let mut source_failures = 0u64;
                loop {
                    tokio::time::sleep(POLL_INTERVAL).await;
                    // A netlink dump on a thread of its own, outside the agent lock.
                    let addresses = tokio::task::spawn_blocking(host_addresses).await.unwrap_or_default();
                    let mut a = agent.lock().await;
                    a.note_host_addresses(addresses);
                    // Watch failures the source retried by itself still count as errors.
                    let failures = a.source.failures();
                    for _ in source_failures..failures {
                        a.metrics.error(crate::metrics::ErrorKind::Source);
                    }
                    source_failures = failures;
                    match a.refresh(false) {
                        Err(e) => {
                            a.metrics.error(e.kind());
                            let text = error_chain(&e);
                            if last_error.as_deref() != Some(text.as_str()) {
                                tracing::warn!(error = %text, "model source; the previous model stays in force");
                                last_error = Some(text);
                            }
                        }
                        Ok(()) => {
                            if last_error.take().is_some() {
                                tracing::info!("model source readable again");
                            }
                        }
                    }
                    match a.datapath.flows_lost() {
                        Ok(lost) => a.flows.set_lost(lost),
                        Err(e) => tracing::debug!(error = %error_chain(&e), "reading lost flow events"),
                    }
                    polls = polls.wrapping_add(1);
                    if polls.is_multiple_of(RECONCILE_EVERY_POLLS) {
                        if let Err(e) = a.reconcile_links() {
                            tracing::warn!(error = %error_chain(&e), "reconciling endpoints with host veths");
                        }
                    }
                }
            })
        };
        tracing::info!(socket = %socket.display(), "serving endpoints");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(io("signal", &socket))?;
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => { tokio::spawn(serve_connection(agent.clone(), flow_store.clone(), metrics.clone(), stream)); }
                    Err(e) => tracing::warn!(error = %e, "accept"),
                },
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        poller.abort();
        if let Some(server) = metrics_server {
            server.abort();
        }
        let _ = std::fs::remove_file(&socket);
        tracing::info!("agent stopped; pinned maps and attached programs keep enforcing");
        Ok(())
    })
}
