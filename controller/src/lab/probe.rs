//! `bulkhead lab probe`: every ordered pair of pods (or every pod to the outside host), in
//! parallel, from inside the source pod.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use bulkhead_hostnet::netns;
use serde::Serialize;

use super::model::ClusterIp;
use super::services;
use super::state::{LabPaths, LabState, PodState};
use super::world::WORLD;
use super::{LabError, Output, Protocol};

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What came back from one probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The handshake completed (TCP) or the request got a reply (UDP).
    Connected,
    /// Nothing came back in time: something dropped the packets.
    Dropped,
    /// A TCP RST or an ICMP port unreachable came back: the way is open, nothing listens.
    Refused,
}

impl Outcome {
    /// The matrix mark: `.` connected, `X` dropped, `r` refused.
    fn mark(self) -> &'static str {
        match self {
            Outcome::Connected => ".",
            Outcome::Dropped => "X",
            Outcome::Refused => "r",
        }
    }
}

/// One probed pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeResult {
    /// `namespace/pod` the connection came from.
    pub from: String,
    /// `namespace/pod` it went to, or `world`.
    pub to: String,
    /// True when the handshake completed (TCP) or the request got a reply (UDP): `result`
    /// is `connected`.
    pub allowed: bool,
    /// What came back.
    pub result: Outcome,
}

impl ProbeResult {
    fn new(from: String, to: String, result: Outcome) -> Self {
        Self {
            from,
            to,
            allowed: result == Outcome::Connected,
            result,
        }
    }
}

/// The whole matrix, as `probe -o json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    /// Destination port.
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: Protocol,
    /// Every ordered pair of distinct pods, or every pod to the outside host.
    pub results: Vec<ProbeResult>,
}

/// A probe destination: its name in the results and its address, if it has one yet.
struct Target {
    name: String,
    ip: Option<Ipv4Addr>,
}

/// `bulkhead lab probe`.
pub fn run(paths: &LabPaths, state: &LabState, port: u16, protocol: Protocol, output: Output) -> Result<i32, LabError> {
    let pods = sorted_pods(state);
    let targets: Vec<Target> = pods
        .iter()
        .map(|p| Target {
            name: p.key(),
            ip: p.ip.as_deref().and_then(|ip| ip.parse().ok()),
        })
        .collect();
    let report = probe_all(paths, &pods, &targets, port, protocol)?;
    print(&pods, &targets, &report, output);
    Ok(0)
}

/// `bulkhead lab probe --via service`: every ordered pair, each destination reached through
/// the ClusterIP of its own Service on the same port; the same report as a direct probe.
pub fn run_via_service(paths: &LabPaths, port: u16, protocol: Protocol, output: Output) -> Result<i32, LabError> {
    let state = super::ensure_pod_service_port(paths, port, protocol)?;
    let cluster = super::load_cluster(paths)?;
    let pods = sorted_pods(&state);
    let targets: Vec<Target> = pods
        .iter()
        .map(|p| Target {
            name: p.key(),
            // A pod without an address has no backend behind its Service: dropped, as direct.
            ip: cluster
                .service(&p.namespace, &services::pod_service_name(&p.name))
                .and_then(|s| match s.cluster_ip {
                    ClusterIp::Ipv4(ip) => Some(ip),
                    _ => None,
                })
                .filter(|_| p.ip.is_some()),
        })
        .collect();
    let report = probe_all(paths, &pods, &targets, port, protocol)?;
    print(&pods, &targets, &report, output);
    Ok(0)
}

/// `bulkhead lab probe --to world`: every pod to the outside host.
pub fn run_to_world(paths: &LabPaths, state: &LabState, port: u16, protocol: Protocol, output: Output) -> Result<i32, LabError> {
    let world = state.world.as_ref().ok_or_else(|| LabError::UnknownPod {
        pod: format!("{WORLD} (this lab has no outside host)"),
    })?;
    let pods = sorted_pods(state);
    let targets = [Target {
        name: WORLD.to_string(),
        ip: world.ip.parse().ok(),
    }];
    let report = probe_all(paths, &pods, &targets, port, protocol)?;
    print(&pods, &targets, &report, output);
    Ok(0)
}

fn sorted_pods(state: &LabState) -> Vec<&PodState> {
    let mut pods: Vec<&PodState> = state.pods.iter().collect();
    pods.sort_by_key(|p| p.key());
    pods
}

fn print(pods: &[&PodState], targets: &[Target], report: &ProbeReport, output: Output) {
    match output {
        Output::Json => println!("{}", serde_json::to_string(report).unwrap_or_default()),
        Output::Table => {
            let rows: Vec<String> = pods.iter().map(|p| p.key()).collect();
            let columns: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
            print!("{}", table(&rows, &columns, report));
        }
    }
}

/// Probes from every pod to every target but itself.
fn probe_all(paths: &LabPaths, pods: &[&PodState], targets: &[Target], port: u16, protocol: Protocol) -> Result<ProbeReport, LabError> {
    let pairs = u16::try_from(pods.len() * targets.len()).unwrap_or(u16::MAX);
    let first_port = paths.take_probe_ports(pairs)?;
    let source_port = |i: usize, j: usize| u16::try_from(i * targets.len() + j).ok().and_then(|k| first_port.checked_add(k));
    let rows: Vec<Result<Vec<ProbeResult>, LabError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, from)| {
                scope.spawn(move || {
                    // Threads started inside run_in inherit the source pod's namespace.
                    netns::run_in(&netns::named_path(&from.netns), || {
                        std::thread::scope(|inner| {
                            let probes: Vec<_> = targets
                                .iter()
                                .enumerate()
                                .filter(|(_, to)| to.name != from.key())
                                .map(|(j, to)| {
                                    let sport = source_port(i, j);
                                    inner.spawn(move || {
                                        let result = to
                                            .ip
                                            .map_or(Outcome::Dropped, |ip| probe_one(SocketAddr::from((ip, port)), protocol, sport));
                                        ProbeResult::new(from.key(), to.name.clone(), result)
                                    })
                                })
                                .collect();
                            probes
                                .into_iter()
                                .map(|h| {
                                    h.join()
                                        .unwrap_or_else(|_| ProbeResult::new(from.key(), String::new(), Outcome::Dropped))
                                })
                                .collect()
                        })
                    })
                    .map_err(|source| LabError::Netns {
                        netns: from.netns.clone(),
                        source,
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(LabError::UnknownPod {
                        pod: "probe thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut results = Vec::new();
    for row in rows {
        results.extend(row?);
    }
    Ok(ProbeReport { port, protocol, results })
}

/// Tries one connection from the calling thread's namespace.
fn probe_one(addr: SocketAddr, protocol: Protocol, udp_source_port: Option<u16>) -> Outcome {
    match protocol {
        Protocol::UDP => probe_udp(addr, udp_source_port),
        // The flag admits only TCP and UDP.
        _ => match TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
            Ok(_) => Outcome::Connected,
            // An RST (or an ICMP port unreachable) answered the SYN.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => Outcome::Refused,
            // A timeout, or an ICMP host/net unreachable: nothing got through.
            Err(_) => Outcome::Dropped,
        },
    }
}

/// TCP needs no chosen source port: the client's TIME_WAIT keeps the kernel from reusing a
/// recent 4-tuple. UDP has no such memory, so the lab hands out ports ([`LabPaths::take_probe_ports`]);
/// a port in use (the pod serves it) falls back to one the kernel picks.
fn probe_udp(addr: SocketAddr, source_port: Option<u16>) -> Outcome {
    let bound = source_port
        .and_then(|p| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, p)).ok())
        .or_else(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok());
    let Some(socket) = bound else {
        return Outcome::Dropped;
    };
    // Connected, so the kernel reports an ICMP port unreachable as ECONNREFUSED on this socket.
    if socket.connect(addr).is_err() {
        return Outcome::Dropped;
    }
    let refused = |e: &std::io::Error| e.kind() == ErrorKind::ConnectionRefused;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let mut buf = [0u8; 64];
    // UDP may lose a datagram; resend a few times within the timeout.
    while Instant::now() < deadline {
        match socket.send(b"bulkhead-probe") {
            Ok(_) => {}
            // The error of an earlier datagram surfaces on the next call.
            Err(e) if refused(&e) => return Outcome::Refused,
            Err(_) => return Outcome::Dropped,
        }
        let wait = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(300));
        if wait.is_zero() || socket.set_read_timeout(Some(wait)).is_err() {
            return Outcome::Dropped;
        }
        match socket.recv(&mut buf) {
            Ok(n) if n > 0 => return Outcome::Connected,
            Err(e) if refused(&e) => return Outcome::Refused,
            _ => {}
        }
    }
    Outcome::Dropped
}

/// The cyclonus-style matrix: rows from, columns to; `.` connected, `X` dropped, `r` refused.
fn table(rows: &[String], columns: &[String], report: &ProbeReport) -> String {
    let width = rows
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(1)
        .max(report.protocol.to_string().len() + 6);
    let mut out = format!("{:<width$}", format!("{}/{}", report.protocol, report.port));
    for n in columns {
        out.push_str(&format!(" {n:>w$}", w = n.len().max(1)));
    }
    out.push('\n');
    for from in rows {
        out.push_str(&format!("{from:<width$}"));
        for to in columns {
            let mark = if from == to {
                "-"
            } else {
                report
                    .results
                    .iter()
                    .find(|r| &r.from == from && &r.to == to)
                    .map_or(Outcome::Dropped.mark(), |r| r.result.mark())
            };
            out.push_str(&format!(" {mark:>w$}", w = to.len().max(1)));
        }
        out.push('\n');
    }
    let count = |o: Outcome| report.results.iter().filter(|r| r.result == o).count();
    out.push_str(&format!(
        "{} connected, {} dropped, {} refused, of {} pairs (. connected, X dropped, r refused)\n",
        count(Outcome::Connected),
        count(Outcome::Dropped),
        count(Outcome::Refused),
        report.results.len()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_and_table() {
        let report = ProbeReport {
            port: 80,
            protocol: Protocol::TCP,
            results: vec![
                ProbeResult::new("x/a".into(), "x/b".into(), Outcome::Connected),
                ProbeResult::new("x/b".into(), "x/a".into(), Outcome::Dropped),
            ],
        };
        assert_eq!(
            serde_json::to_string(&report).unwrap(),
            r#"{"port":80,"protocol":"TCP","results":[{"from":"x/a","to":"x/b","allowed":true,"result":"connected"},{"from":"x/b","to":"x/a","allowed":false,"result":"dropped"}]}"#
        );
        let names = ["x/a".to_string(), "x/b".to_string()];
        let t = table(&names, &names, &report);
        assert_eq!(
            t,
            "TCP/80    x/a x/b\nx/a         -   .\nx/b         X   -\n1 connected, 1 dropped, 0 refused, of 2 pairs (. connected, X dropped, r refused)\n"
        );
    }

    #[test]
    fn refused_is_not_allowed_and_marks_r() {
        let r = ProbeResult::new("x/a".into(), WORLD.into(), Outcome::Refused);
        assert!(!r.allowed);
        assert_eq!(serde_json::to_value(&r).unwrap()["result"], "refused");
        let report = ProbeReport {
            port: 9,
            protocol: Protocol::UDP,
            results: vec![r],
        };
        let t = table(&["x/a".into()], &[WORLD.into()], &report);
        assert!(t.starts_with("UDP/9     world\nx/a           r\n"), "{t}");
    }
}
