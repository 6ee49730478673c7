//! The node agent: keeps the eBPF maps equal to what the cluster model and the local
//! endpoints compile to, and serves the endpoint socket for the CNI plugin.

mod actor;
mod core;
mod events;
mod host;
mod network;
mod prefilter;
mod quarantine;
mod registry;
mod server;
mod services;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bulkhead_hostnet::netlink::NetlinkError;
use tokio::net::UnixListener;
use tokio::sync::Notify;

use crate::config::{AgentArgs, ConfigError, SourceKind};
use crate::datapath::stats::PinnedStats;
use crate::datapath::sync::MapsError;
use crate::datapath::{Datapath, DatapathError};
use crate::flows::{self, Clock, FlowStore};
use crate::metrics::{self, ErrorKind, Metrics, MetricsError};
use crate::model::Cluster;
use crate::policy::Compiler;
use crate::source::kubernetes::{self as kube_source, KubeSource, KubeSourceOptions};
use crate::source::{EmptySource, FileSource, Source, SourceError};

use self::actor::AgentHandle;
use self::core::Agent;
use self::host::{NetlinkLinks, RegistryFile, RegistryStore};
use self::server::serve_connection;
use crate::error_chain;

/// How long an ADD waits for its pod to appear in the model.
const POD_WAIT: Duration = Duration::from_secs(10);
/// How often a source that cannot signal its changes (files) is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How often this node's addresses, host veths and lost flow records are checked.
const SLOW_TICK: Duration = Duration::from_secs(1);

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
    /// The endpoint registry exists but cannot be read or parsed: starting with an empty
    /// one would forget every pod on this node.
    #[error("cannot read the endpoint registry {path}; fix or remove it (pods on this node then need re-adding)")]
    Registry {
        /// The registry file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The quarantine file exists but cannot be read, parsed or written: taking it as empty
    /// would release every quarantined pod.
    #[error("quarantine state {path}")]
    Quarantine {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The thread holding the agent's state stopped (it panicked).
    #[error("the agent's state thread stopped")]
    Stopped,
    /// A state file could not be written.
    #[error(transparent)]
    Write(#[from] bulkhead_hostnet::fs::WriteError),
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
            AgentError::Datapath(_) | AgentError::Metrics(_) | AgentError::Link { .. } | AgentError::Stopped => ErrorKind::Datapath,
            AgentError::Config(_) => ErrorKind::Io,
            AgentError::Maps(_) => ErrorKind::Maps,
            AgentError::Source(_) => ErrorKind::Source,
            AgentError::Io { .. } | AgentError::Write(_) | AgentError::Registry { .. } | AgentError::Quarantine { .. } => ErrorKind::Io,
        }
    }
}

impl From<DatapathError> for AgentError {
    fn from(e: DatapathError) -> Self {
        AgentError::Datapath(Box::new(e))
    }
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
    datapath.set_pod_xdp(args.pod_xdp);
    let flow_ring = datapath.take_flow_ring();
    let metrics = Arc::new(Metrics::new()?);
    if let Some(prefilter) = prefilter::Prefilter::start(&mut datapath, &args, metrics.clone())? {
        prefilter
            .spawn(SLOW_TICK)
            .map_err(io("start the prefilter thread", &args.state_dir))?;
    }
    let sequence = flows::sequence::Sequence::open(&args.state_dir).map_err(|e| AgentError::Io {
        op: "open the flow sequence in",
        path: e.path,
        source: e.source,
    })?;
    // The flows of deleted and quarantined pods, kept beyond the history and restarts.
    let forensic_dir = args.state_dir.join(flows::forensics::DIR_NAME);
    let forensics =
        flows::forensics::ForensicStore::open(&forensic_dir, Default::default(), Some(metrics.clone())).map_err(|e| AgentError::Io {
            op: "open the forensic store in",
            path: forensic_dir.clone(),
            source: std::io::Error::other(error_chain(&e)),
        })?;
    let flow_store = Arc::new(
        FlowStore::new(&args.node_name, args.flow_history, Clock::now())
            .with_metrics(metrics.clone())
            .with_sequence(sequence)
            .with_forensics(Arc::new(forensics)),
    );
    // Read before anything changes, so a missing or empty token file fails at once.
    let flow_port = match (&args.flow_address, &args.flow_token_file) {
        (Some(addr), Some(file)) => {
            let token = flows::stream::Token::read(file).map_err(|e| AgentError::Io {
                op: "read the flow token",
                path: file.clone(),
                source: std::io::Error::other(error_chain(&e)),
            })?;
            Some((addr.clone(), Arc::new(token)))
        }
        _ => None,
    };
    metrics.set_datapath(Box::new(PinnedStats::open(datapath.pin_dir()).map_err(MetricsError::from)?));
    // Validate the flags before the maps change, so a typo fails at once.
    let listen = metrics::Listen::from_flags(&args.metrics_address, metrics_fd)?;
    // Reconcile against what the pinned maps really hold (an earlier agent's entries).
    let applied = datapath.maps.read_state()?;
    // Service ids in use stay theirs: open connections name them in conntrack.
    let services = services::Services::new(args.services, &applied);
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
        bulkhead_hostnet::fs::write_atomic(&path, format!("{cidr}\n").as_bytes(), 0o644)?;
    }
    let store = RegistryFile {
        path: args.state_dir.join("endpoints.json"),
    };
    let endpoints = store.load()?;
    let quarantine = quarantine::Quarantine::load(&args.state_dir, args.quarantine_allow_node)?;
    let changes = source.changes();
    let links = NetlinkLinks;
    let mut agent = Agent {
        node_name: args.node_name.clone(),
        source,
        cluster: Cluster::new(),
        touched: Default::default(),
        full_sync: true,
        hosts_applied: Vec::new(),
        admitted: Vec::new(),
        compiler: Compiler::new(),
        endpoints,
        applied,
        datapath: Box::new(datapath),
        links: Box::new(links),
        store: Box::new(store),
        generation: 0,
        state_dir: args.state_dir.clone(),
        metrics: metrics.clone(),
        host_addresses: Vec::new(),
        flows: flow_store.clone(),
        pod_index: Default::default(),
        ready: false,
        pending: None,
        maps_unknown: false,
        last_source_error: None,
        source_failures: 0,
        ticks: 0,
        pod_cidr: args.pod_cidr,
        pod_cidr_pinned: args.pod_cidr.is_some(),
        network: network::Network::new(&args, Box::new(network::KernelNetwork)),
        pod_mtu_published: None,
        services,
        over_cap_logged: Vec::new(),
        programs_replaced: false,
        quarantine,
    };
    agent.read_host_addresses();
    agent.refresh(true)?;
    // Endpoints deleted while the agent was away (CNI DEL carries on without it).
    match agent.reconcile_links() {
        Ok(dropped) => tracing::info!(dropped, "endpoint registry reconciled with host veths"),
        Err(e) => tracing::warn!(error = %error_chain(&e), "cannot reconcile endpoints with host veths"),
    }
    // A source that is not synced yet (Kubernetes) leaves the pinned maps as they are
    // until its first full sync; its change signal then gets the model written.
    if agent.ready {
        agent.reprogram(None)?;
        metrics.set_ready();
    }
    tracing::info!(node = %args.node_name, source = ?args.source, ready = agent.ready, endpoints = agent.endpoints.len(), pod_cidr = ?agent.pod_cidr, "datapath programmed");

    runtime.block_on(async move {
        let socket = args.state_dir.join("agent.sock");
        let listener = bind_private(&socket).map_err(io("bind", &socket))?;
        let metrics_server = match listen.bind()? {
            Some(listener) => {
                let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
                tracing::info!(address = %addr, "serving metrics");
                Some(tokio::spawn(metrics::serve(metrics.clone(), listener)))
            }
            None => None,
        };
        if let Some((addr, token)) = flow_port {
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(io("bind the flow port", Path::new(&addr)))?;
            tracing::info!(address = %addr, "serving the flow stream to relays (token required)");
            tokio::spawn(flows::stream::serve(flow_store.clone(), listener, token));
        }
        let (agent, agent_thread) = AgentHandle::spawn(agent).map_err(io("start the agent thread", &socket))?;
        match flow_ring {
            Some(ring) => match flows::spawn_reader(ring, flow_store.clone()) {
                Ok(_) => tracing::info!(history = args.flow_history, "reading flow records"),
                Err(e) => tracing::warn!(error = %error_chain(&e), "flow records disabled"),
            },
            None => tracing::warn!("the datapath has no flow ring buffer: flow records disabled"),
        }
        let mut events = tokio::spawn(wake_loop(agent.clone(), changes));
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
                // The wake loop ends only when the agent's thread is gone (a panic): without
                // it nothing is programmed any more, so the agent exits to be restarted.
                _ = &mut events => {
                    let _ = std::fs::remove_file(&socket);
                    return Err(AgentError::Stopped);
                }
            }
        }
        events.abort();
        // The last handle goes with the accept loop: the agent's thread ends its current job
        // and stops (connections still being served keep it until they finish).
        drop(agent);
        drop(agent_thread);
        if let Some(server) = metrics_server {
            server.abort();
        }
        let _ = std::fs::remove_file(&socket);
        tracing::info!("agent stopped; pinned maps and attached programs keep enforcing");
        Ok(())
    })
}

/// Wakes the agent when its source signals a change (or every [`POLL_INTERVAL`] for a
/// source that cannot), and on every [`SLOW_TICK`].
async fn wake_loop(agent: AgentHandle, changes: Option<Arc<Notify>>) {
    let mut slow = tokio::time::interval(SLOW_TICK);
    slow.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let tick = tokio::select! {
            () = changed(changes.as_deref()) => false,
            _ = slow.tick() => true,
        };
        let done = match tick {
            true => agent.call(Agent::on_tick).await,
            false => agent.call(Agent::on_change).await,
        };
        if done.is_err() {
            return;
        }
    }
}

/// Returns when `changes` is signalled, or after [`POLL_INTERVAL`] without a signal.
async fn changed(changes: Option<&Notify>) {
    match changes {
        Some(signal) => signal.notified().await,
        None => tokio::time::sleep(POLL_INTERVAL).await,
    }
}

/// Binds the endpoint socket with mode 0600 from its first instant: the socket file is
/// created under a umask that leaves only the owner's bits, so there is no window between
/// bind and chmod in which another user could connect. The umask is process-wide; this runs
/// once at start-up, before any other thread creates files. A stale socket is replaced.
fn bind_private(path: &std::path::Path) -> std::io::Result<UnixListener> {
    use nix::sys::stat::{umask, Mode};
    let _ = std::fs::remove_file(path);
    let previous = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(previous);
    bound
}

#[cfg(test)]
mod socket_tests {
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn the_endpoint_socket_is_never_more_than_owner_only() {
        let dir = std::env::temp_dir().join(format!("bulkhead-socket-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        // A stale file is replaced, and even a permissive umask gives 0600 at bind time.
        std::fs::write(&path, b"stale").unwrap();
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let listener = super::bind_private(&path);
        nix::sys::stat::umask(old);
        let _listener = listener.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(mode, 0o600);
    }
}
