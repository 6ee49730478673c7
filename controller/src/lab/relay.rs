//! The lab's relay: the agents serve their flow streams on their underlay addresses with a
//! token the lab makes, and one `bulkhead relay` runs in the first node's namespace (as a
//! Deployment's pod would on some node), found by `bulkhead observe --relay` through its
//! Unix socket in the lab dir.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_api::{RelayAddr, Request, Response};
use bulkhead_hostnet::netns;

use super::node::{agent_exe, is_lab_process, is_zombie, signal};
use super::state::{create_dir, LabPaths, LabState, NodeState};
use super::{LabError, StopSignal};
use crate::relay::AGENT_FLOW_PORT;

/// How long the relay may take to answer after starting.
const RELAY_READY_TIMEOUT: Duration = Duration::from_secs(20);

fn relay_dir(paths: &LabPaths) -> PathBuf {
    paths.dir.join("relay")
}

/// The token the agents and the relay share.
pub fn token_file(paths: &LabPaths) -> PathBuf {
    relay_dir(paths).join("token")
}

/// The lab relay's socket.
pub fn relay_socket(paths: &LabPaths) -> PathBuf {
    relay_dir(paths).join("relay.sock")
}

/// The relay's append-only store.
fn store_file(paths: &LabPaths) -> PathBuf {
    relay_dir(paths).join("flows.jsonl")
}

/// Writes a new random token (mode 0600).
pub fn write_token(paths: &LabPaths) -> Result<(), LabError> {
    create_dir(&relay_dir(paths))?;
    let path = token_file(paths);
    let mut bytes = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| LabError::Io {
            op: "read random token for",
            path: path.clone(),
            source,
        })?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    bulkhead_hostnet::fs::write_atomic(&path, format!("{hex}\n").as_bytes(), 0o600).map_err(|e| LabError::Io {
        op: e.op,
        path: e.path,
        source: e.source,
    })
}

/// Where a node's agent serves its flow stream: its underlay address.
pub fn flow_address(node: &NodeState) -> Option<String> {
    node.underlay_ip.as_ref().map(|ip| format!("{ip}:{AGENT_FLOW_PORT}"))
}

/// The agent flags for its flow port.
pub fn agent_flags(paths: &LabPaths, node: &NodeState) -> Vec<String> {
    match &node.flow_address {
        Some(addr) => vec![
            "--flow-address".into(),
            addr.clone(),
            "--flow-token-file".into(),
            token_file(paths).display().to_string(),
        ],
        None => Vec::new(),
    }
}

/// Starts the relay in the first node's namespace and waits until it answers.
pub fn start(paths: &LabPaths, state: &mut LabState) -> Result<(), LabError> {
    let Some(node) = state.nodes.first() else { return Ok(()) };
    let exe = agent_exe()?;
    let log_path = relay_dir(paths).join("relay.log");
    let (log, log2) = super::node::log_files(&log_path, true)?;
    let mut cmd = Command::new(&exe);
    cmd.arg("relay")
        .arg("--lab-dir")
        .arg(&paths.dir)
        .arg("--socket")
        .arg(relay_socket(paths))
        .arg("--token-file")
        .arg(token_file(paths))
        .arg("--store")
        .arg(store_file(paths))
        .args(&state.relay_args)
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
            what: format!("relay {}", exe.display()),
            source,
        })?;
    let pid = child.id();
    state.relay_pid = Some(pid);
    paths.save(state)?;
    let socket = RelayAddr::Unix(relay_socket(paths));
    let deadline = Instant::now() + RELAY_READY_TIMEOUT;
    loop {
        if let Ok(Response::RelayStatus(_)) = bulkhead_api::call_relay(&socket, None, &Request::RelayStatus, Duration::from_secs(2)) {
            return Ok(());
        }
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid);
        if !alive || Instant::now() > deadline {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
            return Err(LabError::AgentFailed {
                node: format!("{} (relay)", node.name),
                message: format!(
                    "{}; last log lines:\n{}",
                    if alive { "not answering in time" } else { "exited" },
                    tail.join("\n")
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `bulkhead lab restart-relay`; `args` replaces the relay's extra arguments when given.
pub fn restart(paths: &LabPaths, how: StopSignal, args: Option<Vec<String>>) -> Result<i32, LabError> {
    use nix::sys::signal::Signal;
    let _lock = paths.lock()?;
    let mut state = paths.load_up()?;
    if let Some(args) = args {
        state.relay_args = args;
    }
    if let Some(pid) = state.relay_pid {
        let sig = match how {
            StopSignal::Term => Signal::SIGTERM,
            StopSignal::Kill => Signal::SIGKILL,
        };
        signal(pid, &paths.dir, sig);
        let deadline = Instant::now() + Duration::from_secs(3);
        while is_lab_process(pid, &paths.dir) && !is_zombie(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        signal(pid, &paths.dir, Signal::SIGKILL);
    }
    start(paths, &mut state)?;
    Ok(0)
}
