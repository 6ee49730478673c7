//! `bulkhead relay`: every node's flow stream in one place.
//!
//! The relay finds the agents (the lab's state, the DaemonSet's pods through the API, or
//! `--agent` flags), keeps one connection per node to its flow port (token-authenticated,
//! resuming after the last sequence number it has), merges what they send into one
//! time-ordered, bounded history ([`store`]), optionally mirrored in an append-only file
//! ([`file`]) so a restart resumes exactly, and serves it to `bulkhead observe --relay`
//! with the same filters an agent applies. Nothing it does can slow an agent: each agent
//! serves its own history at the relay's pace, and a relay that falls too far behind
//! sees, counts and reports the records it missed as a gap.

pub mod detect;
#[cfg(test)]
mod detect_tests;
pub mod discover;
pub mod file;
pub mod serve;
pub mod store;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bulkhead_api::{AnomalyKind, Response, SeqFlow, StreamHeader, StreamHello};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::flows::stream::Token;
use crate::lab::LabPaths;

use self::detect::{Detection, RelayMetrics, ResponseConfig};
use self::discover::Discovery;
use self::file::RelayFile;
use self::store::{Ingested, RelayStore};

/// The agents' flow port when a manifest or the lab does not say otherwise.
pub const AGENT_FLOW_PORT: u16 = 4244;
/// The relay's own port in the manifests.
pub const RELAY_PORT: u16 = 4245;
/// Entries the relay keeps when `--history` is not given.
pub const DEFAULT_HISTORY: usize = 65_536;
/// Lines read from one agent before they are stored in one go.
const INGEST_BATCH: usize = 1024;
/// How long connecting to an agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an agent may take to answer the hello.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the agents are looked up again.
const DISCOVER_INTERVAL: Duration = Duration::from_secs(5);
/// How often merged records are released to followers.
const RELEASE_TICK: Duration = Duration::from_millis(50);

/// `bulkhead relay` flags.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RelayArgs {
    /// `status`: ask a running relay instead of running one.
    #[command(subcommand)]
    pub command: Option<RelayCommand>,
    /// Serving flags.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `bulkhead relay` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum RelayCommand {
    /// Every node's connection, cursor, duplicates and gaps, from a running relay.
    Status(serve::StatusArgs),
}

/// How the relay runs.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Serve observe clients on this TCP address (`HOST:PORT`; they must present the token).
    #[arg(long, env = "BULKHEAD_RELAY_LISTEN")]
    pub listen: Option<String>,
    /// Serve observe clients on this Unix socket (mode 0600: root only, no token).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The token agents expect on their flow port and TCP clients must present here.
    #[arg(long, env = "BULKHEAD_RELAY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// An agent's flow port, `NODE=HOST:PORT` (repeat for each node).
    #[arg(long = "agent")]
    pub agents: Vec<String>,
    /// Find the agents in this lab's state.
    #[arg(long)]
    pub lab_dir: Option<PathBuf>,
    /// Find the agents as the DaemonSet's pods through the Kubernetes API.
    #[arg(long)]
    pub kubernetes: bool,
    /// The agents' namespace (with --kubernetes).
    #[arg(long, env = "BULKHEAD_AGENT_NAMESPACE", default_value = "bulkhead-system")]
    pub agent_namespace: String,
    /// The agents' pod label selector (with --kubernetes).
    #[arg(long, default_value = "app.kubernetes.io/name=bulkhead,app.kubernetes.io/component=agent")]
    pub agent_selector: String,
    /// The agents' flow port (with --kubernetes).
    #[arg(long, default_value_t = AGENT_FLOW_PORT)]
    pub agent_port: u16,
    /// Entries (flows and gaps) kept; the oldest fall out.
    #[arg(long, env = "BULKHEAD_RELAY_HISTORY", default_value_t = DEFAULT_HISTORY)]
    pub history: usize,
    /// Append every record to this file and read it back on start (survives restarts).
    #[arg(long, env = "BULKHEAD_RELAY_STORE")]
    pub store: Option<PathBuf>,
    /// How long records wait before followers get them, so that several nodes' records
    /// come out in time order (milliseconds).
    #[arg(long, default_value_t = 500)]
    pub merge_delay_ms: u64,
    /// Each workload's baseline learning window from its first flow (seconds); after it,
    /// deviations are anomalies.
    #[arg(long, default_value_t = 600)]
    pub learning_secs: u64,
    /// Save the baselines here (and read them on start); default `baselines.json` next to
    /// `--store`, else kept in memory only.
    #[arg(long, env = "BULKHEAD_RELAY_BASELINE_FILE")]
    pub baseline_file: Option<PathBuf>,
    /// Quarantine the pod of an anomaly of these kinds (`new_peer`, `new_port`,
    /// `new_external`, `scan`, `exfiltration`; comma-separated) scoring at least
    /// `--auto-quarantine-score`. Off by default.
    #[arg(long, value_delimiter = ',', value_parser = parse_kind)]
    pub auto_quarantine: Vec<AnomalyKind>,
    /// The score at or above which `--auto-quarantine` acts (1.0 is an anomaly's threshold).
    #[arg(long, default_value_t = 2.0)]
    pub auto_quarantine_score: f64,
    /// Only report what `--auto-quarantine` would do ("would quarantine NS/POD").
    #[arg(long)]
    pub auto_quarantine_dry_run: bool,
    /// Serve the relay's Prometheus metrics (`/metrics`) on this `HOST:PORT`.
    #[arg(long, env = "BULKHEAD_RELAY_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,
}

fn parse_kind(text: &str) -> Result<AnomalyKind, String> {
    text.trim().parse()
}

/// Why the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A flag is missing or wrong.
    #[error("{0}")]
    Usage(String),
    /// The token file is unusable.
    #[error(transparent)]
    Token(#[from] crate::flows::stream::TokenError),
    /// The store file is unusable.
    #[error(transparent)]
    File(#[from] file::FileError),
    /// Socket or runtime I/O failed.
    #[error("{op} {what}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On what.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The lab state is unreadable.
    #[error(transparent)]
    Lab(#[from] crate::lab::LabError),
    /// Talking to a relay failed.
    #[error("relay {addr}")]
    Client {
        /// Where.
        addr: String,
        /// Cause.
        #[source]
        source: bulkhead_api::ApiError,
    },
    /// A relay answered with an error.
    #[error("relay {addr}: {message}")]
    Refused {
        /// Where.
        addr: String,
        /// Its message.
        message: String,
    },
    /// The Kubernetes client could not be made.
    #[error("kubernetes client")]
    Kube(#[source] Box<crate::source::SourceError>),
    /// The baseline file is unreadable: the relay refuses to start rather than learn
    /// again from nothing (an attacker already present would be learnt as normal).
    #[error(transparent)]
    Baseline(#[from] crate::baseline::BaselineError),
    /// The metrics endpoint cannot be served.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// The store and its file, under one lock: what the file holds is what the store took.
pub struct Inner {
    /// The history.
    pub store: RelayStore,
    /// The append-only file, when configured.
    pub file: Option<RelayFile>,
}

/// What the relay's tasks share.
pub struct Shared {
    inner: Mutex<Inner>,
    /// The baselines and anomalies.
    pub detection: Arc<Detection>,
}

impl Shared {
    /// The store and file, locked.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind, still usable.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Runs `bulkhead relay` (or its `status`); the exit code.
pub fn run(args: RelayArgs) -> Result<i32, RelayError> {
    if let Some(RelayCommand::Status(s)) = args.command {
        return serve::status(&s);
    }
    let args = args.serve;
    let token_file = args
        .token_file
        .clone()
        .ok_or_else(|| RelayError::Usage("--token-file is required (the agents' flow token)".into()))?;
    let token = Arc::new(Token::read(&token_file)?);
    if args.listen.is_none() && args.socket.is_none() {
        return Err(RelayError::Usage(
            "nothing to serve: give --listen HOST:PORT and/or --socket PATH".into(),
        ));
    }
    let mut store = RelayStore::new(args.history.max(1));
    let file = match &args.store {
        Some(path) => {
            let (file, skipped) = RelayFile::open(path, &mut store, args.history)?;
            let status = store.status();
            tracing::info!(path = %path.display(), restored = status.stored, skipped, "relay store read");
            Some(file)
        }
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| RelayError::Io {
            op: "start",
            what: "runtime".into(),
            source,
        })?;
    let discovery = match (&args.lab_dir, args.kubernetes, args.agents.is_empty()) {
        (Some(dir), false, true) => Discovery::Lab(LabPaths::new(dir)?),
        (None, true, true) => {
            let client = runtime
                .block_on(crate::source::kubernetes::client(None))
                .map_err(|e| RelayError::Kube(Box::new(e)))?;
            Discovery::Kubernetes {
                client,
                namespace: args.agent_namespace.clone(),
                selector: args.agent_selector.clone(),
                port: args.agent_port,
            }
        }
        (None, false, false) => Discovery::Static(discover::parse_agents(&args.agents).map_err(RelayError::Usage)?),
        _ => return Err(RelayError::Usage("give exactly one of --agent, --lab-dir, --kubernetes".into())),
    };
    let baseline_file = args
        .baseline_file
        .clone()
        .or_else(|| args.store.as_ref().map(|s| s.with_file_name("baselines.json")));
    let config = crate::baseline::Config {
        learning_secs: args.learning_secs,
    };
    let metrics = Arc::new(RelayMetrics::new()?);
    let engine = match &baseline_file {
        Some(path) => match crate::baseline::Engine::load(path, config) {
            Ok(e) => e,
            Err(e) => {
                metrics.baseline_error("load");
                tracing::error!(error = %crate::error_chain(&e), "baselines unreadable: refusing to start");
                return Err(e.into());
            }
        },
        None => crate::baseline::Engine::new(config),
    };
    if !(args.auto_quarantine_score.is_finite() && args.auto_quarantine_score > 0.0) {
        return Err(RelayError::Usage("--auto-quarantine-score must be a positive number".into()));
    }
    let response = ResponseConfig {
        kinds: args.auto_quarantine.clone(),
        score: args.auto_quarantine_score,
        dry_run: args.auto_quarantine_dry_run,
    };
    let (queue, queued) = tokio::sync::mpsc::channel(64);
    let detection = Arc::new(Detection::new(
        engine,
        baseline_file.clone(),
        response,
        Some(queue),
        metrics.clone(),
    ));
    let discovery = Arc::new(discovery);
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner { store, file }),
        detection: detection.clone(),
    });
    tracing::info!(
        baseline_file = ?baseline_file,
        learning_secs = args.learning_secs,
        auto_quarantine = ?args.auto_quarantine,
        score = args.auto_quarantine_score,
        dry_run = args.auto_quarantine_dry_run,
        "baselines"
    );
    runtime.block_on(async move {
        if let Some(address) = &args.metrics_address {
            let addr = address
                .parse()
                .map_err(|_| RelayError::Usage(format!("--metrics-address {address:?} is not HOST:PORT")))?;
            if let Some(listener) = crate::metrics::Listen::Address(addr).bind()? {
                tokio::spawn(crate::metrics::serve(metrics.clone(), listener));
            }
        }
        tokio::spawn(detect::feed(shared.clone(), detection.clone()));
        tokio::spawn(detect::keep(detection.clone()));
        tokio::spawn(detect::respond(queued, discovery.clone(), metrics.clone()));
        let delay = i128::from(args.merge_delay_ms) * 1_000_000;
        let releaser = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELEASE_TICK);
            loop {
                tick.tick().await;
                releaser.lock().store.release(jiff::Timestamp::now().as_nanosecond() - delay);
            }
        });
        serve::start(shared.clone(), &args, token.clone()).await?;
        tokio::spawn(supervise(shared.clone(), discovery, token));
        tracing::info!(listen = ?args.listen, socket = ?args.socket, history = args.history, "relay serving");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|source| RelayError::Io {
            op: "install",
            what: "SIGTERM handler".into(),
            source,
        })?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let mut inner = shared.lock();
        let Inner { store, file } = &mut *inner;
        if let Some(f) = file {
            if let Err(e) = f.flush(store) {
                tracing::warn!(error = %crate::error_chain(&e), "flushing the relay store");
            }
        }
        drop(inner);
        let _ = shared.detection.save();
        if let Some(socket) = &args.socket {
            let _ = std::fs::remove_file(socket);
        }
        tracing::info!("relay stopped");
        Ok(0)
    })
}

/// Keeps one connection task per discovered node, replacing it when its address changes.
async fn supervise(shared: Arc<Shared>, discovery: Arc<Discovery>, token: Arc<Token>) {
    let mut tasks: HashMap<String, (String, tokio::task::JoinHandle<()>)> = HashMap::new();
    loop {
        match discovery.targets().await {
            Ok(targets) => {
                for (node, address) in targets {
                    if tasks.get(&node).is_some_and(|(a, _)| *a == address) {
                        continue;
                    }
                    if let Some((_, old)) = tasks.remove(&node) {
                        old.abort();
                    }
                    tracing::info!(%node, %address, "following agent");
                    let task = tokio::spawn(follow(shared.clone(), node.clone(), address.clone(), token.clone()));
                    tasks.insert(node, (address, task));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list the agents"),
        }
        tokio::time::sleep(DISCOVER_INTERVAL).await;
    }
}

/// Follows one node's agent for ever: connect, resume, read; on any end, retry with backoff.
async fn follow(shared: Arc<Shared>, node: String, address: String, token: Arc<Token>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let result = stream_once(&shared, &node, &address, &token, &mut backoff).await;
        let error = result.err();
        if let Some(e) = &error {
            tracing::debug!(%node, %address, error = %e, "agent stream ended");
        }
        shared.lock().store.set_connection(&node, &address, false, error);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn keepalive(stream: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    // A node that vanishes without a FIN is noticed in about a minute, not never.
    let _ = setsockopt(stream, sockopt::KeepAlive, &true);
    let _ = setsockopt(stream, sockopt::TcpKeepIdle, &30);
    let _ = setsockopt(stream, sockopt::TcpKeepInterval, &10);
    let _ = setsockopt(stream, sockopt::TcpKeepCount, &3);
}

/// One connection to an agent, until it ends.
async fn stream_once(shared: &Shared, node: &str, address: &str, token: &Token, backoff: &mut Duration) -> Result<(), String> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| format!("connect {address}: timed out"))?
        .map_err(|e| format!("connect {address}: {e}"))?;
    let _ = stream.set_nodelay(true);
    keepalive(&stream);
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::with_capacity(256 * 1024, read);
    let hello = StreamHello {
        v: 1,
        token: token.text(),
        resume: shared.lock().store.cursor(node),
    };
    let mut line = serde_json::to_vec(&hello).map_err(|e| e.to_string())?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(|e| format!("send hello: {e}"))?;
    let mut text = String::new();
    tokio::time::timeout(HEADER_TIMEOUT, read.read_line(&mut text))
        .await
        .map_err(|_| "no header in time".to_string())?
        .map_err(|e| format!("read header: {e}"))?;
    let header: StreamHeader = match serde_json::from_str(&text) {
        Ok(h) => h,
        Err(_) => {
            return Err(match serde_json::from_str::<Response>(&text) {
                Ok(Response::Error { code, message }) => format!("agent refused: {message} (code {code})"),
                _ => format!("malformed header {:?}", text.trim()),
            })
        }
    };
    if header.node != node {
        return Err(format!("the agent at {address} is node {:?}, not {node:?}", header.node));
    }
    {
        let now = jiff::Timestamp::now();
        let mut inner = shared.lock();
        let Inner { store, file } = &mut *inner;
        store.set_connection(node, address, true, None);
        if let Some(gap) = store.on_header(&header, now) {
            tracing::warn!(%node, ?gap.record, "records the agent no longer holds");
            if let Some(f) = file {
                let _ = f.append(store, &gap).and_then(|()| f.flush(store));
            }
        }
    }
    *backoff = Duration::from_millis(200);
    tracing::info!(%node, %address, epoch = header.epoch, first = header.first, next = header.next, "agent stream connected");
    let mut batch: Vec<SeqFlow> = Vec::with_capacity(INGEST_BATCH);
    let mut text = String::new();
    loop {
        text.clear();
        if read.read_line(&mut text).await.map_err(|e| format!("read: {e}"))? == 0 {
            return Ok(());
        }
        push_line(&mut batch, &text, node);
        // Everything already buffered goes into the same batch: one lock, one flush.
        while batch.len() < INGEST_BATCH && read.buffer().contains(&b'\n') {
            text.clear();
            if read.read_line(&mut text).await.map_err(|e| format!("read: {e}"))? == 0 {
                break;
            }
            push_line(&mut batch, &text, node);
        }
        ingest(shared, node, &mut batch);
    }
}

fn push_line(batch: &mut Vec<SeqFlow>, text: &str, node: &str) {
    match serde_json::from_str::<SeqFlow>(text) {
        Ok(r) => batch.push(r),
        Err(e) => tracing::warn!(%node, error = %e, "malformed record from agent; skipped"),
    }
}

/// Stores a batch of one node's records (and appends them to the file) under one lock.
pub fn ingest(shared: &Shared, node: &str, batch: &mut Vec<SeqFlow>) {
    let now = jiff::Timestamp::now();
    let mut inner = shared.lock();
    let Inner { store, file } = &mut *inner;
    for r in batch.drain(..) {
        for outcome in store.on_record(node, r.seq, r.flow, now) {
            if let (Ingested::Stored(e), Some(f)) = (outcome, file.as_mut()) {
                if let Err(err) = f.append(store, &e) {
                    tracing::warn!(error = %crate::error_chain(&err), "relay store write failed");
                }
            }
        }
    }
    if let Some(f) = file {
        if let Err(err) = f.flush(store) {
            tracing::warn!(error = %crate::error_chain(&err), "relay store write failed");
        }
    }
}
