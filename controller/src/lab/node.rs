//! Lab nodes: their namespaces, the underlay between them, their agents; and `down`.

use std::fs::File;
use std::future::Future;
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_api::{Request, Response};
use bulkhead_hostnet::netlink::{self, LinkInfo, NetlinkError};
use bulkhead_hostnet::netns;
use ipnetwork::Ipv4Network;
use rtnetlink::Handle;

use super::model;
use super::state::{create_dir, LabPaths, LabState, NodeState};
use super::{demo, pod, world, LabError};
use crate::config::RoutingKind;

/// Where bpffs lives.
const BPFFS: &str = "/sys/fs/bpf";
/// How long an agent may take to become ready.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(3);
/// The bridge in the underlay namespace.
pub(super) const UNDERLAY_BRIDGE: &str = "br0";
/// A node's interface on the underlay.
pub(super) const UNDERLAY_IFNAME: &str = "ul0";

/// The bpffs pin dir of a node's agent.
pub fn pin_dir(id: &str, node: &str) -> PathBuf {
    lab_pin_root(id).join(node)
}

fn lab_pin_root(id: &str) -> PathBuf {
    Path::new(BPFFS).join(format!("bulkhead-lab-{id}"))
}

/// `bulkhead lab up`.
pub fn up(paths: &LabPaths, nodes: usize, routing: RoutingKind, files: &[PathBuf], relay_args: Vec<String>) -> Result<i32, LabError> {
    let _lock = paths.lock()?;
    if paths.load()?.is_some() {
        return Err(LabError::AlreadyUp {
            lab_dir: paths.dir.clone(),
        });
    }
    // Validate the manifests before creating anything.
    let objects = if files.is_empty() {
        super::model::parse_documents(demo::DEMO_YAML, "demo.yaml").map_err(|source| LabError::Model { source })?
    } else {
        super::read_files(files)?
    };
    let id = random_id(&paths.dir)?;
    let routes = host_routes();
    let cluster_cidr = pick_cluster_cidr(&routes)?;
    let subnets: Vec<Ipv4Network> = (0..=255u8)
        .filter_map(|i| Ipv4Network::new(nth_24(cluster_cidr, i), 24).ok())
        .collect();
    // Nodes and the outside host meet on a /24 outside the cluster CIDR.
    let underlay = world::pick_underlay(cluster_cidr, &routes)?;
    let service_cidr = super::services::pick_service_cidr(&[cluster_cidr, underlay], &routes)?;
    let mut state = LabState {
        id: id.clone(),
        cluster_cidr: cluster_cidr.to_string(),
        underlay_netns: Some(format!("bh{id}-ul")),
        underlay_cidr: Some(underlay.to_string()),
        routing: routing_name(routing).to_string(),
        nodes: (0..nodes)
            .map(|i| NodeState {
                name: format!("node{i}"),
                netns: format!("bh{id}-node{i}"),
                pod_cidr: subnets.get(i).map(|s| s.to_string()).unwrap_or_default(),
                underlay_ip: world::node_ip(underlay, i).map(|ip| ip.to_string()),
                agent_pid: None,
                metrics_port: None,
                flow_address: None,
            })
            .collect(),
        world: Some(world::plan(&id, underlay, world::pick_other_ip(&routes))),
        pods: Vec::new(),
        service_cidr: Some(service_cidr.to_string()),
        managed_slices: Vec::new(),
        service_probe_ports: Vec::new(),
        relay_pid: None,
        relay_args,
    };
    paths.save(&state)?;
    // The lab plays the cloud and kubelet: every node is a Node object with its pod CIDR
    // and InternalIP. The agents route between them from these; the lab installs no route.
    let node_objects = state.nodes.iter().filter_map(node_object);
    super::write_cluster(paths, &model::Cluster::from_objects(node_objects))?;
    ensure_bpffs()?;
    for node in &state.nodes {
        create_dir(&paths.node_dir(&node.name))?;
        create_dir(&pin_dir(&id, &node.name))?;
        setup_node(node)?;
    }
    if let Some(ul) = &state.underlay_netns {
        setup_underlay(ul, &state.nodes)?;
    }
    world::setup(paths, &mut state, underlay)?;
    super::relay::write_token(paths)?;
    for i in 0..state.nodes.len() {
        state.nodes[i].flow_address = super::relay::flow_address(&state.nodes[i]);
        let (pid, port) = spawn_agent(paths, &state, &state.nodes[i])?;
        state.nodes[i].agent_pid = Some(pid);
        state.nodes[i].metrics_port = Some(port);
        paths.save(&state)?;
    }
    for node in &state.nodes {
        wait_ready(paths, node)?;
    }
    super::relay::start(paths, &mut state)?;
    pod::apply(paths, &mut state, objects)?;
    super::print_pods(paths, &state, super::Output::Table)?;
    println!();
    println!("lab {id} is up with {nodes} node(s). Next:");
    println!("  bulkhead lab probe --port 80          # who can reach whom");
    println!("  bulkhead lab exec NS/POD -- ip addr   # run a command in a pod");
    println!("  bulkhead lab probe --to world --port 80   # every pod -> the outside host");
    println!("  bulkhead lab services                 # Services, ClusterIPs and backends");
    println!("  bulkhead lab probe --port 80 --via service   # every pair through the pods' own Services");
    println!("  bulkhead lab apply -f policy.yaml     # change the cluster");
    println!("  bulkhead lab down                     # remove everything");
    Ok(0)
}

/// 4 random hex chars.
fn random_id(dir: &Path) -> Result<String, LabError> {
    let mut bytes = [0u8; 2];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| LabError::Io {
            op: "read random id for",
            path: dir.to_path_buf(),
            source,
        })?;
    Ok(format!("{:02x}{:02x}", bytes[0], bytes[1]))
}

/// The `i`-th /24 of a /16.
fn nth_24(cidr: Ipv4Network, i: u8) -> Ipv4Addr {
    let o = cidr.network().octets();
    Ipv4Addr::new(o[0], o[1], i, 0)
}

/// The host's IPv4 routes except the default route, from /proc/net/route.
pub(super) fn host_routes() -> Vec<Ipv4Network> {
    let text = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // The kernel prints the network-order bytes read as a native integer, so the
            // native byte order gives the octets back.
            let dst = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            let prefix = u8::try_from(mask.count_ones()).ok()?;
            let net = Ipv4Addr::from(dst.to_ne_bytes());
            (prefix > 0).then(|| Ipv4Network::new(net, prefix).ok()).flatten()
        })
        .collect()
}

/// The first of 10.244.0.0/16, 10.245.0.0/16, ... that overlaps no host route.
fn pick_cluster_cidr(routes: &[Ipv4Network]) -> Result<Ipv4Network, LabError> {
    (244..=254u8)
        .filter_map(|b| Ipv4Network::new(Ipv4Addr::new(10, b, 0, 0), 16).ok())
        .find(|c| !routes.iter().any(|r| r.overlaps(*c)))
        .ok_or(LabError::NoFreeCidr)
}

/// Mounts bpffs at /sys/fs/bpf unless it is there.
fn ensure_bpffs() -> Result<(), LabError> {
    use nix::sys::statfs::{statfs, BPF_FS_MAGIC};
    if statfs(BPFFS).map(|s| s.filesystem_type() == BPF_FS_MAGIC).unwrap_or(false) {
        return Ok(());
    }
    nix::mount::mount(Some("bpf"), BPFFS, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>).map_err(|e| LabError::Io {
        op: "mount bpffs at",
        path: PathBuf::from(BPFFS),
        source: e.into(),
    })
}

/// Runs netlink work inside the namespace `name`.
pub(super) fn in_netns<T, F, Fut>(name: &str, f: F) -> Result<T, LabError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    netlink::with_handle(Some(&netns::named_path(name)), f).map_err(|source| LabError::Netlink {
        netns: name.to_string(),
        source: Box::new(source),
    })
}

/// Sets the link `ifname` up; returns it.
pub(super) async fn link_up(handle: &Handle, ifname: &str, netns: &str) -> Result<LinkInfo, NetlinkError> {
    let link = netlink::require_link(handle, ifname, netns).await?;
    netlink::set_up(handle, link.index, ifname).await?;
    Ok(link)
}

/// Creates a node's namespace with loopback up and forwarding on.
fn setup_node(node: &NodeState) -> Result<(), LabError> {
    netns::create_named(&node.netns).map_err(|source| LabError::Netns {
        netns: node.netns.clone(),
        source,
    })?;
    in_netns(&node.netns, |h| async move { link_up(&h, "lo", &node.netns).await.map(drop) })?;
    // /proc/sys/net shows the namespace of the thread that opens it.
    let path = netns::named_path(&node.netns);
    netns::run_in(&path, || std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
        .map_err(|source| LabError::Netns {
            netns: node.netns.clone(),
            source,
        })?
        .map_err(|source| LabError::Io {
            op: "enable forwarding via",
            path: PathBuf::from("/proc/sys/net/ipv4/ip_forward"),
            source,
        })
}

/// Bridges the nodes in an underlay namespace. Routes between the nodes' pod CIDRs are
/// the agents' work, as in a cluster.
fn setup_underlay(ul: &str, nodes: &[NodeState]) -> Result<(), LabError> {
    netns::create_named(ul).map_err(|source| LabError::Netns {
        netns: ul.to_string(),
        source,
    })?;
    let bridge = in_netns(ul, |h| async move {
        link_up(&h, "lo", ul).await?;
        let bridge = netlink::ensure_bridge(&h, UNDERLAY_BRIDGE, ul).await?;
        netlink::set_up(&h, bridge.index, UNDERLAY_BRIDGE).await?;
        Ok(bridge.index)
    })?;
    for (i, node) in nodes.iter().enumerate() {
        // Borrowed, not moved, by each of the closures below.
        let port = format!("ul-n{i}");
        let port = port.as_str();
        let node_path = netns::named_path(&node.netns);
        let already = in_netns(&node.netns, |h| async move { netlink::link_by_name(&h, UNDERLAY_IFNAME).await })?.is_some();
        if !already {
            // The peer is created in the node's namespace under its final name; a port left
            // without that peer is stale and would block the creation.
            in_netns(ul, |h| async move {
                netlink::delete_link(&h, port).await?;
                netlink::create_veth(&h, port, UNDERLAY_IFNAME, &node_path, None).await
            })?;
        }
        in_netns(ul, |h| async move {
            let link = netlink::require_link(&h, port, ul).await?;
            netlink::ensure_bridge_port(&h, link.index, port, bridge).await?;
            netlink::set_up(&h, link.index, port).await
        })?;
        let ip: Ipv4Addr = node
            .underlay_ip
            .as_deref()
            .and_then(|s| s.parse().ok())
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        in_netns(&node.netns, |h| async move {
            let link = netlink::require_link(&h, UNDERLAY_IFNAME, &node.netns).await?;
            netlink::ensure_address(&h, link.index, ip, 24).await?;
            netlink::set_up(&h, link.index, UNDERLAY_IFNAME).await
        })?;
    }
    Ok(())
}

/// `--routing`'s value for a mode.
fn routing_name(kind: RoutingKind) -> &'static str {
    match kind {
        RoutingKind::Native => "native",
        RoutingKind::Vxlan => "vxlan",
        RoutingKind::None => "none",
    }
}

/// A lab node as the Node object a cluster would have: its pod CIDR and its underlay
/// address as the InternalIP.
fn node_object(node: &NodeState) -> Option<model::Object> {
    let info = model::NodeInfo {
        name: node.name.clone(),
        pod_cidr: node.pod_cidr.parse().ok(),
        internal_ip: node.underlay_ip.as_deref()?.parse().ok(),
    };
    Some(model::Object::Node(info.to_node()))
}

/// The agent executable: `BULKHEAD_AGENT` (for tests) or this binary.
pub(super) fn agent_exe() -> Result<PathBuf, LabError> {
    match std::env::var_os("BULKHEAD_AGENT") {
        Some(p) => Ok(PathBuf::from(p)),
        None => std::env::current_exe().map_err(|source| LabError::Spawn {
            what: "agent: cannot find own executable".into(),
            source,
        }),
    }
}

/// A TCP listener on 127.0.0.1 in the host namespace, inheritable across exec.
///
/// Node namespaces have no route to the host, but Prometheus runs on the host: the lab binds
/// the socket here and the agent, spawned into its node namespace, serves on the inherited
/// fd (a socket stays in the namespace it was created in).
fn metrics_listener() -> Result<(std::net::TcpListener, u16), LabError> {
    use std::os::fd::AsFd;
    let err = |op, source| LabError::Io {
        op,
        path: PathBuf::from("127.0.0.1:0 (metrics listener)"),
        source,
    };
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| err("bind", e))?;
    let port = listener.local_addr().map_err(|e| err("query", e))?.port();
    // std opens sockets close-on-exec; clear it so the agent inherits the same fd number.
    nix::fcntl::fcntl(listener.as_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))
        .map_err(|e| err("clear FD_CLOEXEC on", e.into()))?;
    Ok((listener, port))
}

/// Spawns a node's agent, detached, from a thread inside the node's namespace; returns its
/// pid and the host port of its metrics.
fn spawn_agent(paths: &LabPaths, state: &LabState, node: &NodeState) -> Result<(u32, u16), LabError> {
    let id = &state.id;
    use std::os::fd::AsRawFd;
    let exe = agent_exe()?;
    // Dropped (closed here) after the spawn: from then on only the agent holds it. Lab
    // commands spawn one process at a time, so no other child inherits it meanwhile.
    let (listener, port) = metrics_listener()?;
    let dir = paths.node_dir(&node.name);
    let log_path = dir.join("agent.log");
    let (log, log2) = log_files(&log_path, false)?;
    let mut cmd = Command::new(&exe);
    cmd.arg("agent")
        .arg("--node-name")
        .arg(&node.name)
        .arg("--manifests")
        .arg(paths.manifests())
        .arg("--state-dir")
        .arg(&dir)
        .arg("--bpffs")
        .arg(pin_dir(id, &node.name))
        .arg("--pod-cidr")
        .arg(&node.pod_cidr)
        .arg("--routing")
        .arg(&state.routing)
        .arg("--cluster-cidr")
        .arg(&state.cluster_cidr)
        .arg("--metrics-fd")
        .arg(listener.as_raw_fd().to_string())
        .args(super::relay::agent_flags(paths, node))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0);
    let child = netns::run_in(&netns::named_path(&node.netns), move || cmd.spawn())
        .map_err(|source| LabError::Netns {
            netns: node.netns.clone(),
            source,
        })?
        .map_err(|source| LabError::Spawn {
            what: format!("agent {}", exe.display()),
            source,
        })?;
    drop(listener);
    Ok((child.id(), port))
}

/// Waits until the node's agent reports ready.
fn wait_ready(paths: &LabPaths, node: &NodeState) -> Result<(), LabError> {
    let socket = paths.agent_socket(&node.name);
    let deadline = Instant::now() + AGENT_READY_TIMEOUT;
    loop {
        if let Ok(Response::Status(s)) = bulkhead_api::call(&socket, &Request::Status, Duration::from_secs(2)) {
            if s.ready {
                return Ok(());
            }
        }
        let alive = node
            .agent_pid
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid));
        if !alive || Instant::now() > deadline {
            let log = std::fs::read_to_string(paths.node_dir(&node.name).join("agent.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
            let why = if alive { "not ready in time" } else { "exited" };
            return Err(LabError::AgentFailed {
                node: node.name.clone(),
                message: format!("{why}; last log lines:\n{}", tail.join("\n")),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

/// The argv of `pid`, or `None` when it is gone.
fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// True when `pid` is a bulkhead process working for the lab in `dir`.
pub(super) fn is_lab_process(pid: u32, dir: &Path) -> bool {
    let Some(args) = cmdline(pid) else {
        return false;
    };
    let dir = dir.to_string_lossy();
    let prefix = format!("{dir}/");
    let names_bulkhead = args.iter().any(|a| a.contains("bulkhead"));
    names_bulkhead && args.iter().any(|a| a == dir.as_ref() || a.starts_with(&prefix))
}

/// Sends `signal` to `pid` if it still is one of ours.
pub(super) fn signal(pid: u32, dir: &Path, signal: nix::sys::signal::Signal) {
    if !is_lab_process(pid, dir) {
        return;
    }
    if let Ok(pid) = i32::try_from(pid) {
        // The process may have exited meanwhile; that is the goal anyway.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// Every live process whose arguments name the lab dir, except this one.
fn lab_processes(dir: &Path, known: &[u32]) -> Vec<u32> {
    let me = std::process::id();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|rd| rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).collect())
        .unwrap_or_default();
    pids.extend_from_slice(known);
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .filter(|p| *p != me && is_lab_process(*p, dir) && !is_zombie(*p))
        .collect()
}

/// Stops lab processes: SIGTERM, then SIGKILL for those still there after a grace period.
pub fn terminate(pids: &[u32], dir: &Path) {
    use nix::sys::signal::Signal;
    for pid in pids {
        signal(*pid, dir, Signal::SIGTERM);
    }
    let alive = || {
        pids.iter()
            .copied()
            .filter(|p| is_lab_process(*p, dir) && !is_zombie(*p))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + KILL_GRACE;
    while Instant::now() < deadline && !alive().is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in alive() {
        signal(pid, dir, Signal::SIGKILL);
    }
}

/// `bulkhead lab restart-agent`: for `node` (else every node in turn) the old agent ends by
/// `how`, then a new one starts with the same flags on the same pinned maps, state directory
/// and socket, as a DaemonSet rollout replaces it; returns once each new agent is ready.
pub fn restart_agents(paths: &LabPaths, node: Option<&str>, how: super::StopSignal) -> Result<i32, LabError> {
    use nix::sys::signal::Signal;
    let _lock = paths.lock()?;
    let mut state = paths.load_up()?;
    let chosen: Vec<usize> = match node {
        Some(name) => vec![state
            .nodes
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| LabError::UnknownNode {
                node: name.to_string(),
                known: state.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", "),
            })?],
        None => (0..state.nodes.len()).collect(),
    };
    let sig = match how {
        super::StopSignal::Term => Signal::SIGTERM,
        super::StopSignal::Kill => Signal::SIGKILL,
    };
    for i in chosen {
        if let Some(pid) = state.nodes[i].agent_pid {
            signal(pid, &paths.dir, sig);
            let deadline = Instant::now() + KILL_GRACE;
            while is_lab_process(pid, &paths.dir) && !is_zombie(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // A SIGTERM the agent did not honour in time: what the kubelet does next.
            signal(pid, &paths.dir, Signal::SIGKILL);
        }
        let (pid, port) = spawn_agent(paths, &state, &state.nodes[i])?;
        state.nodes[i].agent_pid = Some(pid);
        state.nodes[i].metrics_port = Some(port);
        paths.save(&state)?;
        wait_ready(paths, &state.nodes[i])?;
    }
    Ok(0)
}

/// `bulkhead lab down`: removes everything, whatever state it is in.
pub fn down(paths: &LabPaths) -> Result<i32, LabError> {
    let exists = paths.dir.exists();
    let _lock = if exists { Some(paths.lock()?) } else { None };
    // A corrupt state file must not stop the cleanup.
    let state = paths.load().ok().flatten();
    let mut known: Vec<u32> = Vec::new();
    if let Some(s) = &state {
        known.extend(s.nodes.iter().filter_map(|n| n.agent_pid));
        known.extend(s.pods.iter().filter_map(|p| p.server_pid));
        known.extend(s.world.iter().filter_map(|w| w.server_pid));
        known.extend(s.relay_pid);
    }
    terminate(&lab_processes(&paths.dir, &known), &paths.dir);
    let mut errors: Vec<String> = Vec::new();
    if let Some(s) = &state {
        let mut names: Vec<String> = s.pods.iter().map(|p| p.netns.clone()).collect();
        names.extend(s.nodes.iter().map(|n| n.netns.clone()));
        names.extend(s.underlay_netns.clone());
        names.extend(s.world.iter().map(|w| w.netns.clone()));
        if s.id.len() == 4 {
            let prefix = format!("bh{}-", s.id);
            if let Ok(rd) = std::fs::read_dir(netns::NETNS_RUN_DIR) {
                names.extend(
                    rd.filter_map(|e| e.ok()?.file_name().to_str().map(str::to_string))
                        .filter(|n| n.starts_with(&prefix)),
                );
            }
        }
        names.sort();
        names.dedup();
        for name in names {
            if let Err(e) = netns::delete(&netns::named_path(&name)) {
                errors.push(format!("delete netns {name}: {e}"));
            }
        }
        if s.id.len() == 4 {
            let root = lab_pin_root(&s.id);
            match std::fs::remove_dir_all(&root) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(format!("remove {}: {e}", root.display())),
            }
        }
    }
    if exists {
        match std::fs::remove_dir_all(&paths.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("remove {}: {e}", paths.dir.display())),
        }
    }
    if errors.is_empty() {
        Ok(0)
    } else {
        for e in &errors {
            eprintln!("bulkhead lab down: {e}");
        }
        Ok(1)
    }
}

/// A lab process's log file opened twice, for its stdout and stderr; truncated, or appended to
/// when `append` (a process restarted on the same log).
pub(super) fn log_files(path: &std::path::Path, append: bool) -> Result<(File, File), LabError> {
    let err = |op| {
        move |source| LabError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let log = File::options()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .map_err(err("open"))?;
    let log2 = log.try_clone().map_err(err("dup"))?;
    Ok((log, log2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_cidr_avoids_host_routes() {
        let r = |s: &str| s.parse::<Ipv4Network>().unwrap();
        assert_eq!(pick_cluster_cidr(&[]).unwrap(), r("10.244.0.0/16"));
        assert_eq!(pick_cluster_cidr(&[r("10.244.3.0/24")]).unwrap(), r("10.245.0.0/16"));
        assert_eq!(
            pick_cluster_cidr(&[r("10.0.0.0/8")]).unwrap_err().to_string(),
            LabError::NoFreeCidr.to_string()
        );
        assert_eq!(nth_24(r("10.245.0.0/16"), 3), Ipv4Addr::new(10, 245, 3, 0));
    }

    #[test]
    fn host_routes_parse() {
        // Whatever the host has, the default route is never among them.
        assert!(host_routes().iter().all(|r| r.prefix() > 0));
    }
}
