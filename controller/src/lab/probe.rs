//! `bulkhead lab probe`: every ordered pair of pods, in parallel, from inside the source pod.

use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use bulkhead_hostnet::netns;
use serde::Serialize;

use super::state::{LabState, PodState};
use super::{LabError, Output, Protocol};

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// One probed pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeResult {
    /// `namespace/pod` the connection came from.
    pub from: String,
    /// `namespace/pod` it went to.
    pub to: String,
    /// True when the handshake completed (TCP) or the request got a reply (UDP).
    pub allowed: bool,
}

/// The whole matrix, as `probe -o json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    /// Destination port.
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: Protocol,
    /// Every ordered pair of distinct pods.
    pub results: Vec<ProbeResult>,
}

/// `bulkhead lab probe`.
pub fn run(state: &LabState, port: u16, protocol: Protocol, output: Output) -> Result<i32, LabError> {
    let mut pods: Vec<&PodState> = state.pods.iter().collect();
    pods.sort_by_key(|p| p.key());
    let report = probe_all(&pods, port, protocol)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string(&report).unwrap_or_default()),
        Output::Table => print!("{}", table(&pods, &report)),
    }
    Ok(0)
}

fn probe_all(pods: &[&PodState], port: u16, protocol: Protocol) -> Result<ProbeReport, LabError> {
    let rows: Vec<Result<Vec<ProbeResult>, LabError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .map(|from| {
                scope.spawn(move || {
                    // Threads started inside run_in inherit the source pod's namespace.
                    netns::run_in(&netns::named_path(&from.netns), || {
                        std::thread::scope(|inner| {
                            let probes: Vec<_> = pods
                                .iter()
                                .filter(|to| to.key() != from.key())
                                .map(|to| {
                                    inner.spawn(move || {
                                        let ip = to.ip.as_deref().and_then(|ip| ip.parse::<Ipv4Addr>().ok());
                                        let allowed = ip.is_some_and(|ip| probe_one(SocketAddr::from((ip, port)), protocol));
                                        ProbeResult {
                                            from: from.key(),
                                            to: to.key(),
                                            allowed,
                                        }
                                    })
                                })
                                .collect();
                            probes
                                .into_iter()
                                .map(|h| {
                                    h.join().unwrap_or_else(|_| ProbeResult {
                                        from: from.key(),
                                        to: String::new(),
                                        allowed: false,
                                    })
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
fn probe_one(addr: SocketAddr, protocol: Protocol) -> bool {
    match protocol {
        Protocol::UDP => probe_udp(addr),
        // The flag admits only TCP and UDP.
        _ => TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).is_ok(),
    }
}

fn probe_udp(addr: SocketAddr) -> bool {
    let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
        return false;
    };
    if socket.connect(addr).is_err() {
        return false;
    }
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let mut buf = [0u8; 64];
    // UDP may lose a datagram; resend a few times within the timeout.
    while Instant::now() < deadline {
        if socket.send(b"bulkhead-probe").is_err() {
            return false;
        }
        let wait = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(300));
        if wait.is_zero() || socket.set_read_timeout(Some(wait)).is_err() {
            return false;
        }
        if let Ok(n) = socket.recv(&mut buf) {
            return n > 0;
        }
    }
    false
}

/// The cyclonus-style matrix: rows from, columns to, `.` allowed, `X` denied.
fn table(pods: &[&PodState], report: &ProbeReport) -> String {
    let names: Vec<String> = pods.iter().map(|p| p.key()).collect();
    let width = names
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(1)
        .max(report.protocol.to_string().len() + 6);
    let mut out = format!("{:<width$}", format!("{}/{}", report.protocol, report.port));
    for n in &names {
        out.push_str(&format!(" {n:>w$}", w = n.len().max(1)));
    }
    out.push('\n');
    for from in &names {
        out.push_str(&format!("{from:<width$}"));
        for to in &names {
            let mark = if from == to {
                "-"
            } else {
                match report.results.iter().find(|r| &r.from == from && &r.to == to) {
                    Some(r) if r.allowed => ".",
                    _ => "X",
                }
            };
            out.push_str(&format!(" {mark:>w$}", w = to.len().max(1)));
        }
        out.push('\n');
    }
    let allowed = report.results.iter().filter(|r| r.allowed).count();
    out.push_str(&format!(
        "{allowed} allowed, {} denied, of {} pairs\n",
        report.results.len() - allowed,
        report.results.len()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_and_table() {
        let pod = |ns: &str, name: &str| PodState {
            namespace: ns.into(),
            name: name.into(),
            ..Default::default()
        };
        let (a, b) = (pod("x", "a"), pod("x", "b"));
        let report = ProbeReport {
            port: 80,
            protocol: Protocol::TCP,
            results: vec![
                ProbeResult {
                    from: "x/a".into(),
                    to: "x/b".into(),
                    allowed: true,
                },
                ProbeResult {
                    from: "x/b".into(),
                    to: "x/a".into(),
                    allowed: false,
                },
            ],
        };
        assert_eq!(
            serde_json::to_string(&report).unwrap(),
            r#"{"port":80,"protocol":"TCP","results":[{"from":"x/a","to":"x/b","allowed":true},{"from":"x/b","to":"x/a","allowed":false}]}"#
        );
        let t = table(&[&a, &b], &report);
        assert_eq!(
            t,
            "TCP/80    x/a x/b\nx/a         -   .\nx/b         X   -\n1 allowed, 1 denied, of 2 pairs\n"
        );
    }
}
