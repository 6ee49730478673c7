//! The lab's server, for pods and the outside host: answers on every declared port so probes
//! can tell connected from dropped from refused.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

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
    std::thread::scope(|scope| {
        for (mode, listener) in &tcp_listeners {
            let reply = reply.as_bytes();
            let mode = *mode;
            scope.spawn(move || {
                for stream in listener.incoming().flatten() {
                    answer(mode, stream, reply);
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
fn answer(mode: TcpMode, mut stream: TcpStream, name: &[u8]) {
    match mode {
        TcpMode::Name => {
            let name = name.to_vec();
            std::thread::spawn(move || {
                if stream.write_all(&name).is_ok() {
                    echo(stream);
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
            std::thread::spawn(move || echo(stream));
        }
    }
}

/// Echoes what the client sends until it closes or stays silent for [`ECHO_IDLE`].
fn echo(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(ECHO_IDLE));
    let mut buf = [0u8; 2048];
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        if stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}
