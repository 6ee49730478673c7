//! `bulkhead lab`: a whole cluster on one machine, nodes and pods as network namespaces.
//!
//! Nodes run the real agent and pods are wired by the real `bulkhead-cni`, invoked exactly
//! as a container runtime does, so the lab exercises the product end to end.

pub mod attack;
mod demo;

mod node;
mod pod;
mod probe;
mod relay;
mod serve;
mod services;
mod state;
pub mod traffic;
mod world;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bulkhead_api::{Request, Response};
use serde::Serialize;

use crate::config::RoutingKind;
use crate::model;

pub use relay::relay_socket;
pub use state::{LabPaths, LabState, NodeState, PodState, WorldState};

pub use crate::cli::Output;

pub use bulkhead_api::Protocol;

/// `--protocol` of a probe: TCP (allowed when the handshake completes) or UDP (allowed
/// when the request gets a reply), any case.
fn probe_protocol(text: &str) -> Result<Protocol, String> {
    match text.parse() {
        Ok(p @ (Protocol::TCP | Protocol::UDP)) => Ok(p),
        _ => Err(format!("{text:?} is not a probe protocol (TCP or UDP)")),
    }
}

/// How `lab restart-agent` ends the old agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StopSignal {
    /// SIGTERM: the agent shuts down cleanly.
    #[value(name = "TERM", alias = "term")]
    Term,
    /// SIGKILL: the agent dies where it stands.
    #[value(name = "KILL", alias = "kill")]
    Kill,
}

/// `lab probe --to`: a destination other than the pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeTo {
    /// The outside host: every pod -> world.
    World,
}

/// `lab probe --via`: how a probe reaches each destination pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeVia {
    /// The pod's own IP.
    #[default]
    Pod,
    /// The ClusterIP of the pod's own Service (`bh-pod-<name>`).
    Service,
}

/// `bulkhead lab` arguments.
#[derive(Debug, clap::Args)]
pub struct LabArgs {
    /// Where the lab keeps its state.
    #[arg(long, global = true, env = "BULKHEAD_LAB_DIR", default_value = "/run/bulkhead/lab")]
    pub lab_dir: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: LabCommand,
}

/// The lab's subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Create nodes and agents, then apply FILEs (no -f: the built-in demo).
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=200))]
        nodes: u8,
        /// How the agents route between nodes (stored for the agents; native today).
        #[arg(long, value_enum, default_value_t = RoutingKind::Native)]
        routing: RoutingKind,
        /// Manifests to apply.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// An argument for the lab's relay (`bulkhead relay`), e.g.
        /// `--relay-arg=--learning-secs=20`; repeat for more. Kept for `restart-relay`.
        #[arg(long = "relay-arg", value_name = "ARG", allow_hyphen_values = true)]
        relay_args: Vec<String>,
    },
    /// Apply Namespace, Pod, NetworkPolicy, Service and EndpointSlice objects.
    Apply {
        /// Multi-document YAML files.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Delete the objects named in FILEs.
    Delete {
        /// Multi-document YAML files.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// List pods.
    Pods {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Try every ordered pair of pods (or every pod to the outside host with `--to world`).
    Probe {
        /// Probe every pod -> this instead of every pair of pods.
        #[arg(long, value_enum)]
        to: Option<ProbeTo>,
        /// Reach each destination pod by its IP, or through its own Service's ClusterIP.
        #[arg(long, value_enum, default_value_t = ProbeVia::Pod, conflicts_with = "to")]
        via: ProbeVia,
        /// Destination port.
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// Protocol.
        #[arg(long, value_parser = probe_protocol, default_value_t = Protocol::TCP)]
        protocol: Protocol,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Services with their ClusterIP, ports and backends (the lab's pod Services too).
    Services {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Nodes, pod CIDRs and agents.
    Status {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Run a command inside a pod's network namespace, or the outside host's (`world`).
    Exec {
        /// `NAMESPACE/POD`, or `world` for the outside host.
        pod: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Restart node agents as a DaemonSet rollout does: the old agent ends by SIGNAL, a new
    /// one starts on the same pinned state and socket; returns once it is ready.
    RestartAgent {
        /// Only this node's agent (default: every node's, one after the other).
        #[arg(long)]
        node: Option<String>,
        /// How the old agent ends.
        #[arg(long, value_enum, default_value_t = StopSignal::Term)]
        signal: StopSignal,
    },
    /// Restart the lab's relay (`bulkhead relay`): the old one ends by SIGNAL, a new one
    /// starts on the same store file and socket; returns once it answers.
    RestartRelay {
        /// How the old relay ends.
        #[arg(long, value_enum, default_value_t = StopSignal::Term)]
        signal: StopSignal,
        /// Replace the relay's extra arguments (all of them; repeat for more). Without it,
        /// the relay restarts with those of `up` or of the last `restart-relay`.
        #[arg(long = "relay-arg", value_name = "ARG", allow_hyphen_values = true)]
        relay_args: Vec<String>,
        /// Restart the relay without extra arguments.
        #[arg(long, conflicts_with = "relay_args")]
        no_relay_args: bool,
    },
    /// A small shop making traffic: deploy it, run it (foreground or start/stop), its counts.
    Traffic {
        /// What to do.
        #[command(subcommand)]
        command: traffic::TrafficCommand,
    },
    /// Misbehave from inside a pod, as a compromised one would: scan, a new peer, an upload
    /// to a new outside address, a slow exfiltration; prints what it did.
    Attack {
        /// What to do.
        #[command(subcommand)]
        command: attack::AttackCommand,
    },
    /// The outside host: its addresses, ports, and the bytes its server received.
    World {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Remove everything the lab made.
    Down,
    /// Serve a pod's ports (run by the lab inside the pod or the outside host).
    #[command(hide = true)]
    Serve {
        /// `namespace/pod`, written to TCP clients of `--tcp` ports.
        #[arg(long)]
        name: String,
        /// TCP ports that write the name, then echo until the client closes.
        #[arg(long)]
        tcp: Vec<u16>,
        /// TCP ports that echo.
        #[arg(long)]
        tcp_echo: Vec<u16>,
        /// TCP ports that write the client's address and close.
        #[arg(long)]
        tcp_peer: Vec<u16>,
        /// UDP echo ports.
        #[arg(long)]
        udp: Vec<u16>,
        /// Keep the bytes received over TCP in this file.
        #[arg(long)]
        count_file: Option<PathBuf>,
    },
}

/// Why a lab command failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `lab.json` is unreadable.
    #[error("lab state {path} is corrupt")]
    State {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The lab has not been brought up.
    #[error("no lab in {lab_dir}: run `bulkhead lab up` first")]
    NotUp {
        /// The lab dir.
        lab_dir: PathBuf,
    },
    /// The lab is already up.
    #[error("a lab is already up in {lab_dir}: run `bulkhead lab down` first")]
    AlreadyUp {
        /// The lab dir.
        lab_dir: PathBuf,
    },
    /// A manifest is invalid.
    #[error("invalid manifest")]
    Model {
        /// Cause.
        #[source]
        source: model::ModelError,
    },
    /// A manifest is valid Kubernetes but not usable in the lab.
    #[error("{object}: {message}")]
    Unsupported {
        /// The object.
        object: String,
        /// Why.
        message: String,
    },
    /// A namespace operation failed.
    #[error("netns {netns}")]
    Netns {
        /// The namespace.
        netns: String,
        /// Cause.
        #[source]
        source: bulkhead_hostnet::netns::NetnsError,
    },
    /// Netlink work inside a namespace failed.
    #[error("netlink in netns {netns}")]
    Netlink {
        /// The namespace.
        netns: String,
        /// Cause (boxed: netlink errors are large).
        #[source]
        source: Box<bulkhead_hostnet::netlink::NetlinkError>,
    },
    /// A process could not be started.
    #[error("cannot start {what}")]
    Spawn {
        /// Which process.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Talking to an agent failed.
    #[error("agent of {node}")]
    Agent {
        /// The node.
        node: String,
        /// Cause.
        #[source]
        source: bulkhead_api::ApiError,
    },
    /// An agent refused a request or never became ready.
    #[error("agent of {node}: {message}")]
    AgentFailed {
        /// The node.
        node: String,
        /// What happened.
        message: String,
    },
    /// The CNI plugin failed.
    #[error("cni {command} for pod {pod}: {message}")]
    Cni {
        /// ADD or DEL.
        command: &'static str,
        /// `namespace/name`.
        pod: String,
        /// The plugin's message.
        message: String,
    },
    /// No cluster CIDR is free of the host's routes.
    #[error("no free cluster cidr: 10.244.0.0/16 to 10.254.0.0/16 all overlap host routes")]
    NoFreeCidr,
    /// No /16 of 10.96.0.0/12 is free for the Services.
    #[error("no free service cidr: 10.96.0.0/16 to 10.111.0.0/16 all overlap the cluster cidr, the underlay or host routes")]
    NoFreeServiceCidr,
    /// No /24 for the underlay is free of the cluster CIDR and host routes.
    #[error("no free underlay: every 10.255.N.0/24 overlaps a host route")]
    NoFreeUnderlay,
    /// The pod is not in the lab.
    #[error("no pod {pod} in the lab")]
    UnknownPod {
        /// `namespace/name`.
        pod: String,
    },
    /// The node is not in the lab.
    #[error("no node {node} in the lab (nodes: {known})")]
    UnknownNode {
        /// The name asked for.
        node: String,
        /// The lab's nodes.
        known: String,
    },
}

/// How long to wait for an agent to reload its model into the maps.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one lab command; returns the process exit code.
pub fn run(args: LabArgs) -> Result<i32, LabError> {
    let paths = LabPaths::new(&args.lab_dir)?;
    match args.command {
        LabCommand::Up {
            nodes,
            routing,
            files,
            relay_args,
        } => node::up(&paths, usize::from(nodes), routing, &files, relay_args),
        LabCommand::Apply { files } => {
            let _lock = paths.lock()?;
            let mut state = paths.load_up()?;
            let objects = read_files(&files)?;
            pod::apply(&paths, &mut state, objects)?;
            Ok(0)
        }
        LabCommand::Delete { files } => {
            let _lock = paths.lock()?;
            let mut state = paths.load_up()?;
            let objects = read_files(&files)?;
            pod::delete(&paths, &mut state, &objects)?;
            Ok(0)
        }
        LabCommand::Pods { output } => {
            let state = paths.load_up()?;
            print_pods(&paths, &state, output)?;
            Ok(0)
        }
        LabCommand::Probe {
            to,
            via,
            port,
            protocol,
            output,
        } => match (to, via) {
            (None, ProbeVia::Pod) => probe::run(&paths, &paths.load_up()?, port, protocol, output),
            (None, ProbeVia::Service) => probe::run_via_service(&paths, port, protocol, output),
            (Some(ProbeTo::World), _) => probe::run_to_world(&paths, &paths.load_up()?, port, protocol, output),
        },
        LabCommand::Services { output } => {
            paths.load_up()?;
            let rows = services::rows(&load_cluster(&paths)?);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default()),
                Output::Table => print!("{}", services::table(&rows)),
            }
            Ok(0)
        }
        LabCommand::Status { output } => {
            let state = paths.load_up()?;
            print_status(&paths, &state, output);
            Ok(0)
        }
        LabCommand::Exec { pod, command } => pod::exec(&paths, &pod, &command),
        LabCommand::RestartAgent { node, signal } => node::restart_agents(&paths, node.as_deref(), signal),
        LabCommand::RestartRelay {
            signal,
            relay_args,
            no_relay_args,
        } => {
            let replace = (no_relay_args || !relay_args.is_empty()).then_some(relay_args);
            relay::restart(&paths, signal, replace)
        }
        LabCommand::Traffic { command } => traffic::run(&paths, command),
        LabCommand::Attack { command } => attack::run(&paths, command),
        LabCommand::World { output } => world::print(&paths, &paths.load_up()?, output),
        LabCommand::Down => node::down(&paths),
        LabCommand::Serve {
            name,
            tcp,
            tcp_echo,
            tcp_peer,
            udp,
            count_file,
        } => serve::run(
            &name,
            &serve::Ports {
                tcp,
                tcp_echo,
                tcp_peer,
                udp,
                count_file,
            },
        ),
    }
}

/// Parses and validates every file before anything changes.
fn read_files(files: &[PathBuf]) -> Result<Vec<model::Object>, LabError> {
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|source| LabError::Io {
            op: "read",
            path: file.clone(),
            source,
        })?;
        objects.extend(model::parse_documents(&text, &file.display().to_string()).map_err(|source| LabError::Model { source })?);
    }
    Ok(objects)
}

/// The model as last written for the agents: the lab's own files in the manifests directory
/// (see [`write_cluster`]), the one place the lab keeps it. Other files there (an operator's
/// or a test's) are the agents' business, not the lab's.
fn load_cluster(paths: &LabPaths) -> Result<model::Cluster, LabError> {
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| LabError::Io { op, path, source }
    };
    let mut files = vec![paths.legacy_cluster_yaml()];
    match std::fs::read_dir(paths.manifests()) {
        Ok(entries) => {
            for entry in entries {
                let path = entry.map_err(io("list", &paths.manifests()))?.path();
                if state::is_object_file(&path) {
                    files.push(path);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(io("list", &paths.manifests())(source)),
    }
    files[1..].sort();
    let mut cluster = model::Cluster::default();
    for path in files {
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(LabError::Io { op: "read", path, source }),
        };
        for object in model::parse_documents(&text, &path.display().to_string()).map_err(|source| LabError::Model { source })? {
            cluster.apply(object);
        }
    }
    Ok(cluster)
}

/// Writes the model for the agents, one file per object (so a change rewrites only the files
/// of the objects it changed, and the agents re-read only those), each atomically; files of
/// objects no longer in the model are removed last. Policies go before pods, so an agent that
/// reads the directory halfway never sees a new pod without the policies that isolate it.
fn write_cluster(paths: &LabPaths, cluster: &model::Cluster) -> Result<(), LabError> {
    let rank = |o: &model::Object| match o.kind() {
        model::Kind::Namespace => 0,
        model::Kind::Node => 1,
        model::Kind::NetworkPolicy => 2,
        model::Kind::Pod => 3,
        model::Kind::Service => 4,
        model::Kind::EndpointSlice => 5,
    };
    state::create_dir(&paths.manifests())?;
    let mut objects = cluster.objects();
    objects.sort_by_key(rank);
    let mut wanted = std::collections::BTreeSet::new();
    for object in &objects {
        let path = paths.manifests().join(state::object_file_name(&object.to_ref()));
        bulkhead_hostnet::fs::write_atomic_if_changed(&path, object.to_yaml().as_bytes(), 0o644).map_err(|e| LabError::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        })?;
        wanted.insert(path);
    }
    let stale = std::fs::read_dir(paths.manifests())
        .map_err(|source| LabError::Io {
            op: "list",
            path: paths.manifests(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| (state::is_object_file(p) && !wanted.contains(p)) || *p == paths.legacy_cluster_yaml());
    for path in stale {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(LabError::Io {
                    op: "remove",
                    path,
                    source: e,
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Plays the control plane's part for Services (ClusterIPs, EndpointSlices, pod Services),
/// saves the state, writes the model, then has every agent load it into its maps.
fn publish(paths: &LabPaths, state: &mut LabState, cluster: &mut model::Cluster) -> Result<(), LabError> {
    services::reconcile(cluster, state)?;
    paths.save(state)?;
    write_cluster(paths, cluster)?;
    reload_agents(paths, state)
}

/// Makes sure every pod's own Service has `port`/`protocol` (adding it to the lab's probe
/// ports, so the Services of later pods have it too), so a probe through the Service meets
/// what a direct probe meets: the pod's server, or the refusal of a port it does not serve.
/// Returns the state as it is afterwards.
fn ensure_pod_service_port(paths: &LabPaths, port: u16, protocol: Protocol) -> Result<LabState, LabError> {
    let _lock = paths.lock()?;
    let mut state = paths.load_up()?;
    let mut cluster = load_cluster(paths)?;
    let missing = state.pods.iter().any(|p| {
        cluster
            .service(&p.namespace, &services::pod_service_name(&p.name))
            .is_none_or(|s| !s.ports.iter().any(|sp| sp.port == port && sp.protocol == protocol))
    });
    if missing {
        let extra = services::ExtraPort { port, protocol };
        if !state.service_probe_ports.contains(&extra) {
            state.service_probe_ports.push(extra);
            state.service_probe_ports.sort();
        }
        publish(paths, &mut state, &mut cluster)?;
    }
    Ok(state)
}

/// Sends `Reload` to every agent, in parallel; waits until each has its maps updated.
fn reload_agents(paths: &LabPaths, state: &LabState) -> Result<(), LabError> {
    std::thread::scope(|scope| {
        let calls: Vec<_> = state
            .nodes
            .iter()
            .map(|node| {
                scope.spawn(
                    move || match bulkhead_api::call(&paths.agent_socket(&node.name), &Request::Reload, RELOAD_TIMEOUT) {
                        Ok(Response::Ok) => Ok(()),
                        Ok(Response::Error { code, message }) => Err(LabError::AgentFailed {
                            node: node.name.clone(),
                            message: format!("reload failed (code {code}): {message}"),
                        }),
                        Ok(other) => Err(LabError::AgentFailed {
                            node: node.name.clone(),
                            message: format!("unexpected answer to reload: {other:?}"),
                        }),
                        Err(source) => Err(LabError::Agent {
                            node: node.name.clone(),
                            source,
                        }),
                    },
                )
            })
            .collect();
        calls.into_iter().try_for_each(|c| {
            c.join().unwrap_or_else(|_| {
                Err(LabError::AgentFailed {
                    node: "?".into(),
                    message: "reload thread panicked".into(),
                })
            })
        })
    })
}

/// One row of `lab pods -o json`.
#[derive(Debug, Serialize)]
struct PodRow {
    namespace: String,
    name: String,
    ip: Option<String>,
    node: String,
    labels: std::collections::BTreeMap<String, String>,
}

fn pod_rows(paths: &LabPaths, state: &LabState) -> Result<Vec<PodRow>, LabError> {
    let cluster = load_cluster(paths)?;
    let mut rows: Vec<PodRow> = cluster
        .objects()
        .into_iter()
        .filter_map(|o| match o {
            model::Object::Pod(p) => Some(p),
            _ => None,
        })
        .map(|p| {
            let lab = state.pod(&p.namespace, &p.name);
            PodRow {
                ip: lab.and_then(|l| l.ip.clone()),
                node: lab.map(|l| l.node.clone()).unwrap_or_default(),
                labels: model::pod_labels(&p),
                namespace: p.namespace,
                name: p.name,
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(rows)
}

fn print_pods(paths: &LabPaths, state: &LabState, output: Output) -> Result<(), LabError> {
    let rows = pod_rows(paths, state)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default()),
        Output::Table => {
            println!("{:<32} {:<16} {:<8} LABELS", "POD", "IP", "NODE");
            for r in rows {
                let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!(
                    "{:<32} {:<16} {:<8} {}",
                    format!("{}/{}", r.namespace, r.name),
                    r.ip.as_deref().unwrap_or("<none>"),
                    r.node,
                    labels.join(",")
                );
            }
        }
    }
    Ok(())
}

/// One node in `lab status -o json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeStatus {
    name: String,
    netns: String,
    #[serde(rename = "podCIDR")]
    pod_cidr: String,
    #[serde(rename = "underlayIP")]
    underlay_ip: Option<String>,
    agent_socket: PathBuf,
    bpffs: PathBuf,
    agent_pid: Option<u32>,
    agent_ready: bool,
    #[serde(rename = "metricsURL")]
    metrics_url: Option<String>,
}

/// The outside host in `lab status -o json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ExternalStatus {
    ip: String,
    ports: Vec<u16>,
    /// Its addresses in other /16s, which no workload uses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    other_ips: Vec<String>,
}

/// `lab status -o json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct LabStatus {
    lab_dir: PathBuf,
    id: String,
    routing: String,
    #[serde(rename = "serviceCIDR")]
    service_cidr: Option<String>,
    nodes: Vec<NodeStatus>,
    external: Option<ExternalStatus>,
}

fn print_status(paths: &LabPaths, state: &LabState, output: Output) {
    let nodes = state
        .nodes
        .iter()
        .map(|n| {
            let socket = paths.agent_socket(&n.name);
            let ready = matches!(bulkhead_api::call(&socket, &Request::Status, Duration::from_secs(2)), Ok(Response::Status(s)) if s.ready);
            NodeStatus {
                name: n.name.clone(),
                netns: n.netns.clone(),
                pod_cidr: n.pod_cidr.clone(),
                underlay_ip: n.underlay_ip.clone(),
                agent_socket: socket,
                bpffs: node::pin_dir(&state.id, &n.name),
                agent_pid: n.agent_pid,
                agent_ready: ready,
                metrics_url: n.metrics_url(),
            }
        })
        .collect();
    let status = LabStatus {
        lab_dir: paths.dir.clone(),
        id: state.id.clone(),
        routing: state.routing.clone(),
        service_cidr: state.service_cidr.clone(),
        nodes,
        external: state.world.as_ref().map(|w| ExternalStatus {
            ip: w.ip.clone(),
            ports: w.ports(),
            other_ips: w.other_ips.clone(),
        }),
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status).unwrap_or_default()),
        Output::Table => {
            println!(
                "lab {} in {} ({} pods, {} routing)",
                status.id,
                status.lab_dir.display(),
                state.pods.len(),
                status.routing
            );
            println!(
                "{:<8} {:<16} {:<18} {:<8} {:<6} BPFFS",
                "NODE", "NETNS", "POD CIDR", "AGENT", "READY"
            );
            for n in status.nodes {
                let pid = n.agent_pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                println!(
                    "{:<8} {:<16} {:<18} {:<8} {:<6} {}",
                    n.name,
                    n.netns,
                    n.pod_cidr,
                    pid,
                    n.agent_ready,
                    n.bpffs.display()
                );
            }
            if let Some(w) = &status.external {
                let ports: Vec<String> = w.ports.iter().map(u16::to_string).collect();
                let others = if w.other_ips.is_empty() {
                    String::new()
                } else {
                    format!(" and {}", w.other_ips.join(", "))
                };
                println!("outside host {} ({}{others}), ports {}", world::WORLD, w.ip, ports.join(", "));
            }
        }
    }
}
