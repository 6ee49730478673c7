//! `bulkhead lab attack`: a compromised pod misbehaving, for the anomaly detector to find.
//!
//! Every attack runs inside the pod's network namespace, as the pod's own traffic does, so
//! the agents see it exactly as they see the shop's: a port scan of the pod's namespace, a
//! connection to a workload it never talked to, an upload to an outside address no
//! workload ever used, and a slow exfiltration to the outside address its workload already
//! talks to, at a multiple of its usual byte rate. Each is bounded in count, rate and time,
//! closes every connection it opened, and prints what it did.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bulkhead_hostnet::netns;
use serde::Serialize;

use super::model::ClusterIp;
use super::state::{LabPaths, LabState, PodState};
use super::{traffic, LabError, Output};

/// Threads making a scan's connections at once.
const SCAN_THREADS: usize = 32;
/// At most this many connection attempts in one scan.
const SCAN_LIMIT: usize = 5000;
/// At most this many bytes in one upload or exfiltration.
const BYTES_LIMIT: u64 = 1 << 30;
/// At most this long for an exfiltration.
const EXFIL_LIMIT: Duration = Duration::from_secs(600);

/// `lab attack` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AttackCommand {
    /// Connect to many ports of every other pod of the pod's namespace.
    Scan {
        /// The attacking pod, `NAMESPACE/POD`.
        #[arg(long)]
        from: String,
        /// Ports to try on each pod: `1-200`, `80,443,5432`, or both (`1-10,8080`).
        #[arg(long, default_value = "1-100", value_parser = parse_ports)]
        ports: PortList,
        /// At most this many connection attempts (pods × ports are cut to it).
        #[arg(long, default_value_t = 500)]
        max: usize,
        /// Connection attempts per second.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// How long an attempt waits for an answer (a dropped SYN gets none).
        #[arg(long, value_parser = traffic::parse_duration, default_value = "500ms")]
        timeout: Duration,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Connect to a workload the pod never talked to (default: the shop's database).
    NewPeer {
        /// The attacking pod, `NAMESPACE/POD`.
        #[arg(long)]
        from: String,
        /// The Service to reach, `NAMESPACE/NAME`, on its first port.
        #[arg(long, default_value = "shop-data/postgres", conflicts_with = "to_pod")]
        to_service: String,
        /// A pod to reach directly instead, `NAMESPACE/POD`, on `--port`.
        #[arg(long)]
        to_pod: Option<String>,
        /// The port (default: the Service's first port, or the pod's first TCP port).
        #[arg(long)]
        port: Option<u16>,
        /// Connections to make.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        count: u64,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Upload BYTES to an outside address no workload uses (default: the outside host's
    /// other address, in another /16 than any the shop talks to).
    Upload {
        /// The attacking pod, `NAMESPACE/POD`.
        #[arg(long)]
        from: String,
        /// The destination address (default: the outside host's first other address).
        #[arg(long)]
        to: Option<Ipv4Addr>,
        /// The destination port (the outside host echoes on 80 and 81).
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// Bytes to send.
        #[arg(long, default_value_t = 1 << 20)]
        bytes: u64,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Send to the outside host's known address at a multiple of the workload's usual byte
    /// rate (`lab traffic`'s steady uploads), in uploads of the same rhythm, for a while.
    Exfil {
        /// The attacking pod, `NAMESPACE/POD` (a replica of the uploading workload,
        /// `shop-api/orders`, so only the byte rate is new).
        #[arg(long)]
        from: String,
        /// The destination address (default: the outside host's address).
        #[arg(long)]
        to: Option<Ipv4Addr>,
        /// The destination port.
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// This many times the usual byte rate of `lab traffic`'s uploads.
        #[arg(long, conflicts_with = "bytes_per_sec", required_unless_present = "bytes_per_sec")]
        multiple: Option<f64>,
        /// Or this byte rate.
        #[arg(long)]
        bytes_per_sec: Option<f64>,
        /// Time between uploads (default: that of `lab traffic`'s uploads, else 1 s).
        #[arg(long, value_parser = traffic::parse_duration)]
        every: Option<Duration>,
        /// How long to go on.
        #[arg(long, value_parser = traffic::parse_duration, default_value = "10s")]
        duration: Duration,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// Ports of a scan, in order, without repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

/// `1-200`, `80,443`, `1-10,8080`.
fn parse_ports(text: &str) -> Result<PortList, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(part)?, port(part)?),
        };
        if a > b {
            return Err(format!("{part:?}: the range runs backwards"));
        }
        for p in a..=b {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    if out.is_empty() {
        return Err("no ports".into());
    }
    Ok(PortList(out))
}

/// What an attack did: `lab attack … -o json`.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AttackReport {
    /// `scan`, `new-peer`, `upload` or `exfil`.
    pub kind: String,
    /// The attacking pod.
    pub from: String,
    /// When it started, RFC 3339.
    pub started: String,
    /// When it started, Unix milliseconds (for latency sums).
    pub started_unix_ms: u64,
    /// How long it took, seconds.
    pub elapsed: f64,
    /// Connections attempted.
    pub connections: u64,
    /// Connections established.
    pub connected: u64,
    /// Connections refused (the port is closed: a reset).
    pub refused: u64,
    /// Connections with no answer in time, or that failed otherwise.
    pub failed: u64,
    /// Payload bytes sent (and echoed back by the outside host).
    pub bytes: u64,
    /// Bytes per second over the attack, for uploads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_sec: Option<f64>,
    /// The byte rate asked for (exfiltration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_bytes_per_sec: Option<f64>,
    /// Destination addresses, `IP` (scan) or `IP:PORT`.
    pub targets: Vec<String>,
    /// Destination ports.
    pub ports: Vec<u16>,
    /// The first errors.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl AttackReport {
    fn new(kind: &str, from: &PodState) -> Self {
        let now = jiff::Timestamp::now();
        AttackReport {
            kind: kind.into(),
            from: from.key(),
            started: now.to_string(),
            started_unix_ms: u64::try_from(now.as_millisecond()).unwrap_or_default(),
            ..AttackReport::default()
        }
    }

    fn error(&mut self, e: String) {
        if self.errors.len() < 10 {
            self.errors.push(e);
        }
    }
}

/// Runs one `lab attack` command; the exit code (1 when no connection of a new peer, upload
/// or exfiltration got through).
pub fn run(paths: &LabPaths, command: AttackCommand) -> Result<i32, LabError> {
    let state = paths.load_up()?;
    let (report, output) = match command {
        AttackCommand::Scan {
            from,
            ports,
            max,
            rate,
            timeout,
            output,
        } => (scan(&state, &from, &ports.0, max, rate, timeout)?, output),
        AttackCommand::NewPeer {
            from,
            to_service,
            to_pod,
            port,
            count,
            output,
        } => (new_peer(paths, &state, &from, &to_service, to_pod.as_deref(), port, count)?, output),
        AttackCommand::Upload {
            from,
            to,
            port,
            bytes,
            output,
        } => {
            let to = match to {
                Some(ip) => ip,
                None => world_address(&state, true)?,
            };
            (upload(&state, &from, SocketAddr::from((to, port)), bytes.min(BYTES_LIMIT))?, output)
        }
        AttackCommand::Exfil {
            from,
            to,
            port,
            multiple,
            bytes_per_sec,
            every,
            duration,
            output,
        } => {
            let to = match to {
                Some(ip) => ip,
                None => world_address(&state, false)?,
            };
            let usual = traffic::upload_settings(paths);
            let rate = match (bytes_per_sec, multiple) {
                (Some(r), _) => r,
                (None, Some(m)) => {
                    let (usual, _) = usual.ok_or_else(|| LabError::Unsupported {
                        object: "lab attack exfil".into(),
                        message: "--multiple needs `lab traffic` uploads to compare with (start traffic, or give --bytes-per-sec)".into(),
                    })?;
                    m * usual
                }
                (None, None) => 0.0,
            };
            if !(rate.is_finite() && rate > 0.0) {
                return Err(LabError::Unsupported {
                    object: "lab attack exfil".into(),
                    message: format!("{rate} bytes per second is not a rate"),
                });
            }
            let every = every.or(usual.map(|u| u.1)).unwrap_or(Duration::from_secs(1));
            let report = exfil(&state, &from, SocketAddr::from((to, port)), rate, every, duration.min(EXFIL_LIMIT))?;
            (report, output)
        }
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string(&report).unwrap_or_default()),
        Output::Table => {
            println!(
                "{} from {}: {} connections ({} connected, {} refused, {} failed), {} bytes{} in {:.1}s",
                report.kind,
                report.from,
                report.connections,
                report.connected,
                report.refused,
                report.failed,
                report.bytes,
                report.bytes_per_sec.map(|r| format!(" ({r:.0} B/s)")).unwrap_or_default(),
                report.elapsed
            );
            for e in &report.errors {
                println!("  {e}");
            }
        }
    }
    // A scan whose every attempt was dropped still did what it was asked; the others did
    // nothing if no connection got through.
    Ok(if report.kind == "scan" || report.connected > 0 { 0 } else { 1 })
}

/// The attacking pod, with its address.
fn attacker<'a>(state: &'a LabState, from: &str) -> Result<&'a PodState, LabError> {
    let (ns, name) = from.split_once('/').unwrap_or(("default", from));
    state.pod(ns, name).filter(|p| p.ip.is_some()).ok_or_else(|| LabError::UnknownPod {
        pod: format!("{ns}/{name}"),
    })
}

/// The outside host's address, or its first other address.
fn world_address(state: &LabState, other: bool) -> Result<Ipv4Addr, LabError> {
    let world = state.world.as_ref().ok_or_else(|| LabError::UnknownPod {
        pod: format!("{} (this lab has no outside host)", super::world::WORLD),
    })?;
    let text = if other {
        world.other_ips.first().ok_or_else(|| LabError::Unsupported {
            object: super::world::WORLD.into(),
            message:
                "the outside host has no other address (a lab made before `lab attack`, or every documentation range overlaps a host route)"
                    .into(),
        })?
    } else {
        &world.ip
    };
    text.parse().map_err(|_| LabError::Unsupported {
        object: super::world::WORLD.into(),
        message: format!("bad address {text:?}"),
    })
}

fn in_pod<T: Send>(pod: &PodState, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
    netns::run_in(&netns::named_path(&pod.netns), f).map_err(|source| LabError::Netns {
        netns: pod.netns.clone(),
        source,
    })
}

/// How one connection attempt ended.
enum Attempt {
    Connected,
    Refused,
    Failed(String),
}

fn connect(addr: SocketAddr, timeout: Duration) -> Attempt {
    match TcpStream::connect_timeout(&addr, timeout) {
        // Dropped at once: a scanner only wants to know the port is open.
        Ok(_) => Attempt::Connected,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Attempt::Refused,
        Err(e) => Attempt::Failed(format!("{addr}: {e}")),
    }
}

/// `lab attack scan`.
fn scan(state: &LabState, from: &str, ports: &[u16], max: usize, rate: f64, timeout: Duration) -> Result<AttackReport, LabError> {
    let pod = attacker(state, from)?;
    let targets: Vec<Ipv4Addr> = state
        .pods
        .iter()
        .filter(|p| p.namespace == pod.namespace && p.name != pod.name)
        .filter_map(|p| p.ip.as_deref()?.parse().ok())
        .collect();
    if targets.is_empty() {
        return Err(LabError::Unsupported {
            object: format!("scan from {}", pod.key()),
            message: "no other pod in its namespace".into(),
        });
    }
    // Port by port across the pods, as a horizontal scan goes.
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .flat_map(|port| targets.iter().map(move |ip| SocketAddr::from((*ip, *port))))
        .take(max.min(SCAN_LIMIT))
        .collect();
    let mut report = AttackReport::new("scan", pod);
    report.targets = targets.iter().map(Ipv4Addr::to_string).collect();
    let used: std::collections::BTreeSet<u16> = addrs.iter().map(SocketAddr::port).collect();
    report.ports = used.into_iter().collect();
    let rate = if rate.is_finite() && rate > 0.0 { rate } else { 1.0 };
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let (connected, refused, failed) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let errors = std::sync::Mutex::new(Vec::new());
    // Threads made in the pod's namespace stay in it.
    in_pod(pod, || {
        std::thread::scope(|scope| {
            for _ in 0..SCAN_THREADS.min(addrs.len()) {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(addr) = addrs.get(i) else { return };
                    let at = started + Duration::from_secs_f64(i as f64 / rate);
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    match connect(*addr, timeout) {
                        Attempt::Connected => connected.fetch_add(1, Ordering::Relaxed),
                        Attempt::Refused => refused.fetch_add(1, Ordering::Relaxed),
                        Attempt::Failed(e) => {
                            if let Ok(mut errs) = errors.lock() {
                                if errs.len() < 10 {
                                    errs.push(e);
                                }
                            }
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                });
            }
        });
    })?;
    report.connections = addrs.len() as u64;
    report.connected = connected.into_inner();
    report.refused = refused.into_inner();
    report.failed = failed.into_inner();
    report.errors = errors.into_inner().unwrap_or_default();
    report.elapsed = started.elapsed().as_secs_f64();
    Ok(report)
}

/// `lab attack new-peer`.
fn new_peer(
    paths: &LabPaths,
    state: &LabState,
    from: &str,
    to_service: &str,
    to_pod: Option<&str>,
    port: Option<u16>,
    count: u64,
) -> Result<AttackReport, LabError> {
    let pod = attacker(state, from)?;
    let addr = match to_pod {
        Some(target) => {
            let target = attacker(state, target)?;
            let ip: Ipv4Addr = target.ip.as_deref().and_then(|s| s.parse().ok()).unwrap_or(Ipv4Addr::UNSPECIFIED);
            let port = port.or(target.tcp_ports.first().copied()).ok_or_else(|| LabError::Unsupported {
                object: target.key(),
                message: "serves no TCP port: give --port".into(),
            })?;
            SocketAddr::from((ip, port))
        }
        None => {
            let cluster = super::load_cluster(paths)?;
            let (ns, name) = to_service.split_once('/').unwrap_or(("default", to_service));
            let unknown = |message: &str| LabError::Unsupported {
                object: format!("Service {ns}/{name}"),
                message: message.into(),
            };
            let svc = cluster
                .service(ns, name)
                .ok_or_else(|| unknown("not in the lab (deploy the shop: `lab traffic deploy`)"))?;
            let ClusterIp::Ipv4(ip) = svc.cluster_ip else {
                return Err(unknown("has no ClusterIP"));
            };
            let port = port.or(svc.ports.first().map(|p| p.port)).ok_or_else(|| unknown("has no port"))?;
            SocketAddr::from((ip, port))
        }
    };
    let mut report = AttackReport::new("new-peer", pod);
    report.targets = vec![addr.to_string()];
    report.ports = vec![addr.port()];
    let started = Instant::now();
    let results = in_pod(pod, || {
        (0..count)
            .map(|_| match TcpStream::connect_timeout(&addr, traffic::CALL_TIMEOUT) {
                Ok(mut s) => {
                    // Say something, as a client of the database would, and read the answer.
                    use std::io::{Read, Write};
                    let _ = s.set_read_timeout(Some(traffic::CALL_TIMEOUT));
                    let _ = s.write_all(b"SELECT * FROM customers;\n");
                    let mut buf = [0u8; 256];
                    let _ = s.read(&mut buf);
                    (Attempt::Connected, 24)
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => (Attempt::Refused, 0),
                Err(e) => (Attempt::Failed(format!("{addr}: {e}")), 0),
            })
            .collect::<Vec<_>>()
    })?;
    for (attempt, bytes) in results {
        report.connections += 1;
        report.bytes += bytes;
        match attempt {
            Attempt::Connected => report.connected += 1,
            Attempt::Refused => report.refused += 1,
            Attempt::Failed(e) => {
                report.failed += 1;
                report.error(e);
            }
        }
    }
    report.elapsed = started.elapsed().as_secs_f64();
    Ok(report)
}

/// `lab attack upload`.
fn upload(state: &LabState, from: &str, addr: SocketAddr, bytes: u64) -> Result<AttackReport, LabError> {
    let pod = attacker(state, from)?;
    let mut report = AttackReport::new("upload", pod);
    report.targets = vec![addr.to_string()];
    report.ports = vec![addr.port()];
    let started = Instant::now();
    let result = in_pod(pod, || traffic::upload(addr, bytes, Duration::from_secs(10)))?;
    report.connections = 1;
    match result {
        Ok(n) => {
            report.connected = 1;
            report.bytes = n;
        }
        Err(e) => {
            report.failed = 1;
            report.error(format!("{addr}: {e}"));
        }
    }
    report.elapsed = started.elapsed().as_secs_f64();
    report.bytes_per_sec = Some(report.bytes as f64 / report.elapsed.max(1e-3));
    Ok(report)
}

/// `lab attack exfil`: one upload of `rate × every` bytes every `every`, for `duration`.
fn exfil(state: &LabState, from: &str, addr: SocketAddr, rate: f64, every: Duration, duration: Duration) -> Result<AttackReport, LabError> {
    let pod = attacker(state, from)?;
    let every = every.max(Duration::from_millis(10));
    let chunk = ((rate * every.as_secs_f64()).round() as u64).clamp(1, BYTES_LIMIT);
    let mut report = AttackReport::new("exfil", pod);
    report.targets = vec![addr.to_string()];
    report.ports = vec![addr.port()];
    report.target_bytes_per_sec = Some(rate);
    let started = Instant::now();
    let ticks = (duration.as_secs_f64() / every.as_secs_f64()).round().max(1.0) as u64;
    let results = in_pod(pod, || {
        let mut out = Vec::new();
        for i in 0..ticks {
            let at = started + every.mul_f64(i as f64);
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            out.push(traffic::upload(addr, chunk, traffic::CALL_TIMEOUT.max(every)));
        }
        out
    })?;
    for r in results {
        report.connections += 1;
        match r {
            Ok(n) => {
                report.connected += 1;
                report.bytes += n;
            }
            Err(e) => {
                report.failed += 1;
                report.error(format!("{addr}: {e}"));
            }
        }
    }
    report.elapsed = started.elapsed().as_secs_f64();
    // Per tick, as the usual rate is counted (one upload's bytes per interval).
    report.bytes_per_sec = Some(report.bytes as f64 / (ticks as f64 * every.as_secs_f64()));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists() {
        assert_eq!(parse_ports("1-3").unwrap().0, vec![1, 2, 3]);
        assert_eq!(parse_ports("80,443, 80").unwrap().0, vec![80, 443]);
        assert_eq!(parse_ports("5-6,1").unwrap().0, vec![5, 6, 1]);
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("9-2").is_err());
        assert!(parse_ports("x").is_err());
        assert!(parse_ports("").is_err());
        assert_eq!(parse_ports("1-65535").unwrap().0.len(), 65535);
    }
}
