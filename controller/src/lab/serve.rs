//! The lab's server, for pods and the outside host: answers on every declared port so probes
//! can tell connected from dropped from refused.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use bulkhead_hostnet::netns;

use super::state::{create_dir, LabPaths};
use super::LabError;

/// How long an echo connection may stay idle before the server closes it.
const ECHO_IDLE: Duration = Duration::from_secs(10);

/// What a server serves, and how each TCP port answers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ports {
    /// TCP ports that write the server's name, then echo until the client closes (the pods'
    /// ports: a client learns which pod answered and may keep the connection established).
    pub tcp: Vec<u16>,
    /// TCP ports that echo what they read until the client closes.
    pub tcp_echo: Vec<u16>,
    /// TCP ports that write the client's address as `a.b.c.d\n` and close.
    pub tcp_peer: Vec<u16>,
    /// UDP ports that echo each datagram.
    pub udp: Vec<u16>,
    /// Where to keep the bytes received over TCP, per local address and client address.
    pub count_file: Option<PathBuf>,
}

/// Bytes a server received from one client address on one of its addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Received {
    /// The server's address and port the client connected to (`IP:PORT`).
    pub address: String,
    /// The client's address as the server saw it.
    pub from: String,
    /// TCP payload bytes received.
    pub bytes: u64,
    /// Connections accepted.
    pub connections: u64,
}

/// What `--count-file` holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedFile {
    /// Per (address, client), sorted.
    pub received: Vec<Received>,
}

/// Reads a count file; empty when the server has received nothing yet.
pub fn read_received(path: &Path) -> ReceivedFile {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// How often the counts are written while they change.
const COUNT_FLUSH: Duration = Duration::from_millis(100);

/// (local address, client address) → (bytes, connections).
type Counts = BTreeMap<(String, String), (u64, u64)>;

/// The server's counters, and whether they changed since the last write.
#[derive(Debug, Default)]
struct Counter {
    counts: Mutex<(Counts, bool)>,
}

impl Counter {
    /// The key of a connection: (local address, client address).
    fn key(stream: &TcpStream) -> Option<(String, String)> {
        Some((stream.local_addr().ok()?.to_string(), stream.peer_addr().ok()?.ip().to_string()))
    }

    fn add(&self, key: &(String, String), bytes: u64, connections: u64) {
        if let Ok(mut c) = self.counts.lock() {
            let e = c.0.entry(key.clone()).or_default();
            e.0 += bytes;
            e.1 += connections;
            c.1 = true;
        }
    }

    /// Writes the counts when they changed since the last write.
    fn flush(&self, path: &Path) {
        let file = match self.counts.lock() {
            Ok(mut c) if c.1 => {
                c.1 = false;
                ReceivedFile {
                    received: c
                        .0
                        .iter()
                        .map(|((address, from), (bytes, connections))| Received {
                            address: address.clone(),
                            from: from.clone(),
                            bytes: *bytes,
                            connections: *connections,
                        })
                        .collect(),
                }
            }
            _ => return,
        };
        if let Ok(bytes) = serde_json::to_vec_pretty(&file) {
            let _ = bulkhead_hostnet::fs::write_atomic(path, &bytes, 0o644);
        }
    }
}

impl Ports {
    /// True when nothing is served.
    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.tcp_echo.is_empty() && self.tcp_peer.is_empty() && self.udp.is_empty()
    }
}

/// How a TCP listener answers a connection.
#[derive(Clone, Copy, Debug)]
enum TcpMode {
    /// Write the name, then echo until EOF.
    Name,
    /// Echo until EOF.
    Echo,
    /// Write the peer address, close.
    Peer,
}

/// Starts `bulkhead lab serve` inside `netns`, detached; returns its pid once every socket
/// is bound. `name` is what named TCP ports write; stderr goes to `log_path`.
pub fn spawn(paths: &LabPaths, netns_name: &str, name: &str, ports: &Ports, log_path: &Path) -> Result<u32, LabError> {
    let what = || format!("server for {name}");
    let exe = std::env::current_exe().map_err(|source| LabError::Spawn { what: what(), source })?;
    create_dir(log_path.parent().unwrap_or(&paths.dir))?;
    let log = std::fs::File::create(log_path).map_err(|source| LabError::Io {
        op: "create",
        path: log_path.to_path_buf(),
        source,
    })?;
    let mut cmd = Command::new(&exe);
    cmd.arg("lab").arg("--lab-dir").arg(&paths.dir).arg("serve").arg("--name").arg(name);
    let flags: [(&str, &[u16]); 4] = [
        ("--tcp", &ports.tcp),
        ("--tcp-echo", &ports.tcp_echo),
        ("--tcp-peer", &ports.tcp_peer),
        ("--udp", &ports.udp),
    ];
    for (flag, list) in flags {
        for p in list {
            cmd.arg(flag).arg(p.to_string());
        }
    }
    if let Some(f) = &ports.count_file {
        cmd.arg("--count-file").arg(f);
    }
    // The server says "ready" on stdout once every socket is bound.
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log).process_group(0);
    let mut child = netns::run_in(&netns::named_path(netns_name), move || cmd.spawn())
        .map_err(|source| LabError::Netns {
            netns: netns_name.to_string(),
            source,
        })?
        .map_err(|source| LabError::Spawn { what: what(), source })?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out)
            .read_line(&mut line)
            .map_err(|source| LabError::Spawn { what: what(), source })?;
    }
    if line.trim() != "ready" {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        return Err(LabError::Spawn {
            what: what(),
            source: std::io::Error::other(format!("server did not start: {}", log.trim())),
        });
    }
    Ok(child.id())
}

/// Serves `ports` until killed.
pub fn run(name: &str, ports: &Ports) -> Result<i32, LabError> {
    let bind_err = |proto: &str, port: u16, source| LabError::Io {
        op: "bind",
        path: format!("{proto}/{port}").into(),
        source,
    };
    let mut tcp_listeners = Vec::new();
    let modes = [
        (TcpMode::Name, &ports.tcp),
        (TcpMode::Echo, &ports.tcp_echo),
        (TcpMode::Peer, &ports.tcp_peer),
    ];
    for (mode, list) in modes {
        for &port in list {
            let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).map_err(|e| bind_err("tcp", port, e))?;
            tcp_listeners.push((mode, listener));
        }
    }
    let mut udp_sockets = Vec::new();
    for &port in &ports.udp {
        udp_sockets.push(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).map_err(|e| bind_err("udp", port, e))?);
    }
    // The lab waits for this line before wiring the pod, so no probe races the bind.
    println!("ready");
    let _ = std::io::stdout().flush();
    let reply = format!("{name}\n");
    let counter = std::sync::Arc::new(Counter::default());
    std::thread::scope(|scope| {
        if let Some(path) = &ports.count_file {
            let counter = &counter;
            scope.spawn(move || loop {
                counter.flush(path);
                std::thread::sleep(COUNT_FLUSH);
            });
        }
        for (mode, listener) in &tcp_listeners {
            let reply = reply.as_bytes();
            let mode = *mode;
            let counter = ports.count_file.as_ref().map(|_| std::sync::Arc::clone(&counter));
            scope.spawn(move || {
                for stream in listener.incoming().flatten() {
                    if let (Some(c), Some(key)) = (&counter, Counter::key(&stream)) {
                        c.add(&key, 0, 1);
                    }
                    answer(mode, stream, reply, counter.clone());
                }
            });
        }
        for socket in &udp_sockets {
            scope.spawn(move || {
                let mut buf = [0u8; 2048];
                loop {
                    match socket.recv_from(&mut buf) {
                        Ok((n, peer)) => {
                            let _ = socket.send_to(&buf[..n], peer);
                        }
                        // An ICMP error for an earlier reply surfaces here; keep serving.
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                        Err(_) => break,
                    }
                }
            });
        }
    });
    Ok(0)
}

/// Answers one TCP connection. A client that went away is no concern of the server.
fn answer(mode: TcpMode, mut stream: TcpStream, name: &[u8], counter: Option<std::sync::Arc<Counter>>) {
    match mode {
        TcpMode::Name => {
            let name = name.to_vec();
            std::thread::spawn(move || {
                if stream.write_all(&name).is_ok() {
                    echo(stream, counter);
                }
            });
        }
        TcpMode::Peer => {
            if let Ok(peer) = stream.peer_addr() {
                let _ = stream.write_all(format!("{}\n", peer.ip()).as_bytes());
            }
        }
        // One thread per connection, so a silent client does not hold up the others.
        TcpMode::Echo => {
            std::thread::spawn(move || echo(stream, counter));
        }
    }
}

/// Echoes what the client sends until it closes or stays silent for [`ECHO_IDLE`].
fn echo(mut stream: TcpStream, counter: Option<std::sync::Arc<Counter>>) {
    let _ = stream.set_read_timeout(Some(ECHO_IDLE));
    let mut buf = [0u8; 16384];
    let counter = counter.and_then(|c| Some((c, Counter::key(&stream)?)));
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        if let Some((c, key)) = &counter {
            c.add(key, n as u64, 0);
        }
        if stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}
