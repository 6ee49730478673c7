//! `bulkhead observe`: flow records from the local agent or, in the lab, from every node's
//! agent (merged by time), filtered, as a table or one JSON object per line.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use bulkhead_api::{
    Anomaly, AnomalyKind, AnomalyRequest, Direction, Flow, FlowFilter, FlowKind, FlowVerdict, NamespacedName, ObserveRequest, Protocol,
};
use bulkhead_common::DropReason;
use clap::builder::PossibleValuesParser;

use crate::cli::{AgentSelect, Output};
use crate::lab::{LabError, LabPaths};

/// The agent socket when neither `--socket` nor a lab is there.
pub const DEFAULT_SOCKET: &str = "/run/bulkhead/agent.sock";
/// How long a non-follow request may wait for the agent's next line.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// `--record` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// Packet records: new flows and drops.
    Packet,
    /// Periodic byte counts of tracked connections.
    Update,
    /// Final byte counts of connections at their FIN or RST.
    End,
}

/// `--verdict` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VerdictArg {
    /// Allowed.
    #[value(alias = "FORWARDED")]
    Forwarded,
    /// Dropped.
    #[value(alias = "DROPPED")]
    Dropped,
    /// Forwarded, but an audit-mode policy would have dropped it.
    #[value(alias = "AUDIT")]
    Audit,
}

fn namespaced(text: &str) -> Result<NamespacedName, String> {
    text.parse().map_err(|e: bulkhead_api::name::ParseNameError| e.to_string())
}

fn label(text: &str) -> Result<String, String> {
    let key = text.split_once('=').map_or(text, |(k, _)| k);
    if key.is_empty() {
        return Err(format!("{text:?} is not KEY=VALUE"));
    }
    crate::model::selector::validate_label_key(key).map(|()| text.to_string())
}

fn drop_reasons() -> PossibleValuesParser {
    PossibleValuesParser::new(DropReason::ALL.iter().filter(|r| **r != DropReason::Forwarded).map(|r| r.name()))
}

/// Parses `--since`: a duration back from now (`30s`, `5m`, `1h30m`, `2d`, `500ms`) or an
/// RFC 3339 time; returns Unix nanoseconds.
pub fn parse_since(text: &str) -> Result<u64, String> {
    let at = match text.parse::<jiff::Timestamp>() {
        Ok(t) => t,
        Err(_) => {
            let ago =
                parse_duration(text).ok_or_else(|| format!("{text:?} is neither a duration like 5m or 1h30m nor an RFC 3339 time"))?;
            jiff::Timestamp::now().saturating_sub(ago).map_err(|e| format!("{text:?}: {e}"))?
        }
    };
    u64::try_from(at.as_nanosecond().max(0)).map_err(|_| format!("{text:?} is out of range"))
}

/// `1h30m`, `2d`, `500ms` (jiff's friendly format; a day is 24 hours) → a positive duration.
fn parse_duration(text: &str) -> Option<jiff::SignedDuration> {
    let span: jiff::Span = text.parse().ok()?;
    let d = span.to_duration(jiff::SpanRelativeTo::days_are_24_hours()).ok()?;
    // A bare number parses as nothing useful, and "ago" is already the meaning.
    (d.is_positive() && text.starts_with(|c: char| c.is_ascii_digit())).then_some(d)
}

/// `bulkhead observe` flags.
#[derive(Debug, clap::Args)]
pub struct ObserveArgs {
    /// Flows from or to this pod (NAMESPACE/NAME).
    #[arg(long, value_parser = namespaced)]
    pub pod: Option<NamespacedName>,
    /// Flows from this pod (NAMESPACE/NAME).
    #[arg(long, value_parser = namespaced)]
    pub from_pod: Option<NamespacedName>,
    /// Flows to this pod (NAMESPACE/NAME).
    #[arg(long, value_parser = namespaced)]
    pub to_pod: Option<NamespacedName>,
    /// Flows of this Service (NAMESPACE/NAME) on either side: addressed to its ClusterIP,
    /// or to or from one of its backends.
    #[arg(long, value_parser = namespaced)]
    pub service: Option<NamespacedName>,
    /// Flows to this Service (NAMESPACE/NAME): addressed to its ClusterIP, or to one of
    /// its backends.
    #[arg(long, value_parser = namespaced)]
    pub to_service: Option<NamespacedName>,
    /// Flows from or to pods of this namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Flows from or to a pod carrying this label (KEY=VALUE, or KEY: present); repeat to
    /// require several on the same pod.
    #[arg(short = 'l', long = "label", value_parser = label)]
    pub labels: Vec<String>,
    /// Verdict.
    #[arg(long, value_enum)]
    pub verdict: Option<VerdictArg>,
    /// Only records of this kind: packet (new flows, drops), or a tracked connection's byte
    /// counts, update (every few seconds while it carries traffic) or end (at its FIN or RST).
    #[arg(long = "record", value_enum)]
    pub record: Option<KindArg>,
    /// Drop reason.
    #[arg(long, value_parser = drop_reasons())]
    pub drop_reason: Option<String>,
    /// Protocol.
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// Source or destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Direction at the pod the flow was seen at.
    #[arg(long, value_enum)]
    pub direction: Option<Direction>,
    /// Flows allowed by, or isolated by, this NetworkPolicy (NAMESPACE/NAME).
    #[arg(long, value_parser = namespaced)]
    pub policy: Option<NamespacedName>,
    /// Only flows since a time: a duration back from now (5m, 1h30m) or RFC 3339.
    #[arg(long, value_parser = parse_since)]
    pub since: Option<u64>,
    /// Only the last N matching flows (of all nodes together).
    #[arg(long)]
    pub last: Option<usize>,
    /// Keep streaming new flows (without --last or --since: only new ones).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Which agents to ask (observe merges every lab node's flows by time).
    #[command(flatten)]
    pub agents: AgentSelect,
    /// Ask a relay (`bulkhead relay`) instead of the agents: `HOST:PORT`, a socket path, or
    /// nothing for the lab's relay. Gaps it knows of are shown in place.
    #[arg(long, num_args = 0..=1, default_missing_value = "lab", conflicts_with = "socket")]
    pub relay: Option<String>,
    /// Token file for a relay reached over TCP.
    #[arg(long, env = "BULKHEAD_RELAY_TOKEN_FILE", requires = "relay")]
    pub token_file: Option<PathBuf>,
    /// Show the relay's anomalies (deviations from the workloads' learnt baselines)
    /// instead of flows; filters: --namespace, --pod, --kind, --since; with --follow.
    #[arg(long, conflicts_with_all = ["from_pod", "to_pod", "service", "to_service", "labels", "verdict", "drop_reason", "protocol", "port", "direction", "policy", "last", "record"])]
    pub anomalies: bool,
    /// With --anomalies: only these kinds (comma-separated: new_peer, new_port,
    /// new_external, scan, exfiltration).
    #[arg(long, value_delimiter = ',', value_parser = anomaly_kind, requires = "anomalies")]
    pub kind: Vec<AnomalyKind>,
}

fn anomaly_kind(text: &str) -> Result<AnomalyKind, String> {
    text.trim().parse()
}

impl ObserveArgs {
    /// The request the flags describe.
    pub fn request(&self) -> ObserveRequest {
        let filter = FlowFilter {
            // An agent reports only its own node (chosen by --node); a relay filters.
            node: self.relay.as_ref().and(self.agents.node.clone()),
            pod: self.pod.clone(),
            from_pod: self.from_pod.clone(),
            to_pod: self.to_pod.clone(),
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            service: self.service.clone(),
            to_service: self.to_service.clone(),
            verdict: self.verdict.map(|v| match v {
                VerdictArg::Forwarded => FlowVerdict::Forwarded,
                VerdictArg::Dropped => FlowVerdict::Dropped,
                VerdictArg::Audit => FlowVerdict::Audit,
            }),
            drop_reason: self.drop_reason.clone(),
            protocol: self.protocol,
            port: self.port,
            direction: self.direction,
            policy: self.policy.clone(),
            kind: self.record.map(|k| match k {
                KindArg::Packet => FlowKind::Packet,
                KindArg::Update => FlowKind::Update,
                KindArg::End => FlowKind::End,
            }),
        };
        // Following with no window asks for new flows only, as `tail -f` would after 0 lines.
        let last = match (self.last, self.follow, self.since) {
            (None, true, None) => Some(0),
            (last, _, _) => last,
        };
        ObserveRequest {
            filter,
            since: self.since,
            last,
            follow: self.follow,
            gaps: self.relay.is_some(),
        }
    }
}

/// Why `bulkhead observe` failed.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The lab state could not be read.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// `--node` without a lab.
    #[error("--node {node}: no lab in {lab_dir}")]
    NoLab {
        /// The node asked for.
        node: String,
        /// Where the lab was looked for.
        lab_dir: PathBuf,
    },
    /// `--node` names no lab node.
    #[error("--node {node}: no such lab node (nodes: {known})")]
    UnknownNode {
        /// The node asked for.
        node: String,
        /// The lab's nodes.
        known: String,
    },
    /// The relay could not be found.
    #[error(transparent)]
    Relay(#[from] crate::relay::RelayError),
    /// An agent could not be asked or refused.
    #[error("node {node}")]
    Agent {
        /// The node (or the socket path).
        node: String,
        /// Cause.
        #[source]
        source: bulkhead_api::ObserveError,
    },
}

/// An agent to ask: its node name (or socket path) and socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Node name, for messages.
    pub node: String,
    /// The agent socket.
    pub socket: PathBuf,
}

/// Which agents the flags point at.
pub fn targets(args: &ObserveArgs) -> Result<Vec<Target>, ObserveError> {
    agent_targets(&args.agents)
}

/// The agents a CLI command asks: `socket` when given; else every node's agent of the lab
/// in `lab_dir` (only `node`'s when given) when a lab is up; else [`DEFAULT_SOCKET`].
pub fn agent_targets(select: &AgentSelect) -> Result<Vec<Target>, ObserveError> {
    let (socket, lab_dir, node) = (select.socket.as_deref(), select.lab_dir.as_path(), select.node.as_deref());
    if let Some(socket) = socket {
        return Ok(vec![Target {
            node: socket.display().to_string(),
            socket: socket.to_path_buf(),
        }]);
    }
    let paths = LabPaths::new(lab_dir)?;
    let Some(state) = paths.load()? else {
        return match node {
            Some(node) => Err(ObserveError::NoLab {
                node: node.to_string(),
                lab_dir: paths.dir.clone(),
            }),
            None => Ok(vec![Target {
                node: "local".into(),
                socket: PathBuf::from(DEFAULT_SOCKET),
            }]),
        };
    };
    if let Some(node) = node {
        if state.node(node).is_none() {
            let known: Vec<&str> = state.nodes.iter().map(|n| n.name.as_str()).collect();
            return Err(ObserveError::UnknownNode {
                node: node.to_string(),
                known: known.join(", "),
            });
        }
    }
    Ok(state
        .nodes
        .iter()
        .filter(|n| node.is_none_or(|want| want == n.name))
        .map(|n| Target {
            node: n.name.clone(),
            socket: paths.agent_socket(&n.name),
        })
        .collect())
}

fn fetch(target: &Target, request: &ObserveRequest) -> Result<Vec<Flow>, ObserveError> {
    let err = |source| ObserveError::Agent {
        node: target.node.clone(),
        source,
    };
    let stream = bulkhead_api::observe(&target.socket, request, Some(IDLE_TIMEOUT)).map_err(|e| err(e.into()))?;
    stream.collect::<Result<Vec<_>, _>>().map_err(err)
}

/// `observe --relay`: one stream, already merged and filtered by the relay.
fn run_relay(args: &ObserveArgs, addr: &str) -> Result<i32, ObserveError> {
    let request = args.request();
    let (relay, token) = crate::relay::serve::client_target(addr, args.token_file.as_deref(), &args.agents.lab_dir)?;
    let err = |source| ObserveError::Agent {
        node: format!("relay {relay}"),
        source,
    };
    let timeout = (!request.follow).then_some(IDLE_TIMEOUT);
    let stream = bulkhead_api::observe_relay(&relay, token, &request, timeout).map_err(|e| err(e.into()))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.output == Output::Table && print_header(&mut out).is_err() {
        return Ok(0);
    }
    for event in stream.events() {
        let printed = match event.map_err(err)? {
            bulkhead_api::ObserveEvent::Flow(f) => print_flow(&mut out, &f, args.output),
            bulkhead_api::ObserveEvent::Gap(g) => print_gap(&mut out, &g, args.output),
        };
        if printed.is_err() {
            break; // stdout closed
        }
    }
    Ok(0)
}

fn print_gap(out: &mut impl Write, g: &bulkhead_api::Gap, output: Output) -> std::io::Result<()> {
    match output {
        Output::Json => {
            let line = serde_json::to_string(&bulkhead_api::GapLine { gap: g.clone() }).map_err(std::io::Error::other)?;
            writeln!(out, "{line}")?;
        }
        Output::Table => {
            let time = g.time.strftime("%m-%d %H:%M:%S%.3f").to_string();
            let what = match g.reason {
                bulkhead_api::GapReason::NotHeld => format!(
                    "{} records never received (seq {}..={}, no longer held by the agent)",
                    g.missing, g.from, g.to
                ),
                bulkhead_api::GapReason::Reset => "sequence reset (agent state lost): an unknown number of records missed".to_string(),
            };
            writeln!(out, "{time:<18} {:<8} GAP: {what}", g.node)?;
        }
    }
    out.flush()
}

impl ObserveArgs {
    /// The relay request `--anomalies` sends.
    pub fn anomaly_request(&self) -> AnomalyRequest {
        AnomalyRequest {
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            kinds: self.kind.clone(),
            since: self.since,
            follow: self.follow,
        }
    }
}

/// `observe --anomalies`: the relay's anomalies (the lab's relay unless --relay says).
fn run_anomalies(args: &ObserveArgs) -> Result<i32, ObserveError> {
    let addr = args.relay.as_deref().unwrap_or("lab");
    let request = args.anomaly_request();
    let (relay, token) = crate::relay::serve::client_target(addr, args.token_file.as_deref(), &args.agents.lab_dir)?;
    let err = |source| ObserveError::Agent {
        node: format!("relay {relay}"),
        source,
    };
    let timeout = (!request.follow).then_some(IDLE_TIMEOUT);
    let stream = bulkhead_api::anomalies_relay(&relay, token, &request, timeout).map_err(|e| err(e.into()))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.output == Output::Table && writeln!(out, "{}", anomaly_header()).is_err() {
        return Ok(0);
    }
    for a in stream {
        let a = a.map_err(err)?;
        let line = match args.output {
            Output::Json => serde_json::to_string(&a).unwrap_or_default(),
            Output::Table => anomaly_row(&a),
        };
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break; // stdout closed
        }
    }
    Ok(0)
}

/// The anomaly table's header.
pub fn anomaly_header() -> String {
    format!(
        "{:<18} {:<13} {:>6}  {:<28} {:<32} EXPLANATION",
        "TIME", "KIND", "SCORE", "WORKLOAD", "POD"
    )
}

/// One anomaly as a table row (the automatic response, if any, after the explanation).
pub fn anomaly_row(a: &Anomaly) -> String {
    let time = a.time.strftime("%m-%d %H:%M:%S%.3f").to_string();
    let pod = a.pod.as_ref().map_or("-".to_string(), |p| p.to_string());
    let response = a.response.as_ref().map_or(String::new(), |r| format!(" [{r}]"));
    format!(
        "{time:<18} {:<13} {:>6.2}  {:<28} {:<32} {}{response}",
        a.kind.as_str(),
        a.score,
        format!("{}/{}", a.namespace, a.workload),
        pod,
        a.explanation
    )
}

/// Runs `bulkhead observe`; the exit code.
pub fn run(args: ObserveArgs) -> Result<i32, ObserveError> {
    if args.anomalies {
        return run_anomalies(&args);
    }
    if let Some(addr) = args.relay.clone() {
        return run_relay(&args, &addr);
    }
    let request = args.request();
    let targets = targets(&args)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.output == Output::Table && print_header(&mut out).is_err() {
        return Ok(0);
    }
    if !request.follow {
        let results: Vec<Result<Vec<Flow>, ObserveError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = targets.iter().map(|t| scope.spawn(|| fetch(t, &request))).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Ok(Vec::new()) // a panicking thread already printed its message
                    })
                })
                .collect()
        });
        let mut flows = Vec::new();
        for r in results {
            flows.extend(r?);
        }
        // Stable: each node's own order stays for flows of the same nanosecond.
        flows.sort_by_key(|f| f.time);
        if let Some(n) = request.last {
            flows.drain(..flows.len().saturating_sub(n));
        }
        for f in &flows {
            if print_flow(&mut out, f, args.output).is_err() {
                break; // stdout closed (e.g. piped into head)
            }
        }
        return Ok(0);
    }
    let (tx, rx) = mpsc::channel::<Result<Flow, ObserveError>>();
    for t in targets {
        let tx = tx.clone();
        let request = request.clone();
        std::thread::spawn(move || {
            let err = |source| ObserveError::Agent {
                node: t.node.clone(),
                source,
            };
            match bulkhead_api::observe(&t.socket, &request, None) {
                Ok(stream) => {
                    for item in stream {
                        if tx.send(item.map_err(err)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(err(e.into())));
                }
            }
        });
    }
    drop(tx);
    let mut code = 0;
    for item in rx {
        match item {
            Ok(f) => {
                if print_flow(&mut out, &f, args.output).is_err() {
                    return Ok(code);
                }
            }
            Err(e) => {
                eprintln!("bulkhead: {}", crate::error_chain(&e));
                code = 1;
            }
        }
    }
    Ok(code)
}

fn print_header(out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<18} {:<8} {:<24} {:<24} {:<5} {:<8} {:<10} DETAIL",
        "TIME", "NODE", "SOURCE", "DESTINATION", "PROTO", "DIR", "VERDICT"
    )
}

fn print_flow(out: &mut impl Write, f: &Flow, output: Output) -> std::io::Result<()> {
    match output {
        Output::Json => {
            let line = serde_json::to_string(f).map_err(std::io::Error::other)?;
            writeln!(out, "{line}")?;
        }
        Output::Table => writeln!(out, "{}", table_row(f))?,
    }
    out.flush()
}

fn endpoint(p: &bulkhead_api::FlowPeer) -> String {
    match p.pod_name() {
        Some(pod) => format!("{pod}:{}", p.port),
        // A packet that is not IPv4 has no addresses to show.
        None if p.ip.is_unspecified() => "-".into(),
        None => format!("{}:{}", p.ip, p.port),
    }
}

/// One readable line for a flow.
pub fn table_row(f: &Flow) -> String {
    // `2026-11-28T12:50:08.123456789Z` → `11-28 12:50:08.123`.
    let time = f.time.strftime("%m-%d %H:%M:%S%.3f").to_string();
    let mut detail = Vec::new();
    if let Some(b) = &f.bytes {
        detail.push(format!("bytes {} to destination, {} to source", b.to_destination, b.to_source));
    }
    if let Some(svc) = &f.service {
        detail.push(format!("via service {} {}:{}", svc.service, svc.vip, svc.port));
    }
    if let Some(r) = &f.drop_reason {
        detail.push(r.clone());
    }
    for r in &f.allowed_by {
        detail.push(format!("allowed by {} {}[{}]", r.policy, r.direction, r.rule));
    }
    if !f.isolated_by.is_empty() {
        let names: Vec<String> = f.isolated_by.iter().map(ToString::to_string).collect();
        detail.push(format!("isolated by {}", names.join(", ")));
    }
    if let Some(flags) = &f.tcp_flags {
        detail.push(flags.clone());
    }
    format!(
        "{:<18} {:<8} {:<24} {:<24} {:<5} {:<8} {:<10} {}",
        time,
        f.node,
        endpoint(&f.source),
        endpoint(&f.destination),
        f.protocol,
        f.direction.as_str(),
        // A byte report is no verdict of its own: its kind instead.
        match f.kind {
            FlowKind::Packet => f.verdict.as_str(),
            FlowKind::Update => "UPDATE",
            FlowKind::End => "END",
        },
        detail.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ObserveArgs,
    }

    fn parse(args: &[&str]) -> Result<ObserveArgs, String> {
        Cli::try_parse_from(std::iter::once("observe").chain(args.iter().copied()))
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn flags_build_the_filter() {
        let a = parse(&[
            "--pod",
            "x/a",
            "--verdict",
            "dropped",
            "--drop-reason",
            "policy_denied",
            "--protocol",
            "tcp",
            "--port",
            "80",
            "--direction",
            "ingress",
            "--policy",
            "x/deny",
            "-l",
            "pod=a",
            "--last",
            "5",
        ])
        .unwrap();
        let r = a.request();
        assert_eq!(r.filter.pod, Some(NamespacedName::new("x", "a")));
        assert_eq!(r.filter.verdict, Some(FlowVerdict::Dropped));
        assert_eq!(r.filter.drop_reason.as_deref(), Some("policy_denied"));
        assert_eq!(r.filter.protocol, Some(Protocol::TCP));
        assert_eq!(parse(&["--protocol", "SCTP"]).unwrap().protocol, Some(Protocol::SCTP));
        assert_eq!(r.filter.port, Some(80));
        assert_eq!(r.filter.direction, Some(Direction::Ingress));
        assert_eq!(r.filter.policy, Some(NamespacedName::new("x", "deny")));
        assert_eq!(r.filter.labels, vec!["pod=a".to_string()]);
        assert_eq!((r.last, r.follow), (Some(5), false));
        assert_eq!(parse(&["--verdict", "DROPPED"]).unwrap().verdict, Some(VerdictArg::Dropped));
        let follow = parse(&["--follow"]).unwrap().request();
        assert_eq!((follow.last, follow.follow), (Some(0), true), "follow alone: new flows only");
    }

    #[test]
    fn anomalies_flags_build_the_relay_request_and_refuse_flow_filters() {
        let a = parse(&[
            "--anomalies",
            "-n",
            "shop",
            "--pod",
            "shop/f-1",
            "--kind",
            "scan,new_peer",
            "--follow",
        ])
        .unwrap();
        assert!(a.anomalies);
        let r = a.anomaly_request();
        assert_eq!(r.namespace.as_deref(), Some("shop"));
        assert_eq!(r.pod, Some(NamespacedName::new("shop", "f-1")));
        assert_eq!(r.kinds, [AnomalyKind::Scan, AnomalyKind::NewPeer]);
        assert!(r.follow);
        assert_eq!(
            serde_json::to_string(&bulkhead_api::Request::Anomalies(Box::new(r))).unwrap(),
            r#"{"op":"anomalies","namespace":"shop","pod":"shop/f-1","kinds":["scan","new_peer"],"follow":true}"#
        );
        let e = parse(&["--anomalies", "--kind", "portscan"]).err().unwrap();
        assert!(e.contains("unknown anomaly kind"), "{e}");
        let e = parse(&["--kind", "scan"]).err().unwrap();
        assert!(e.contains("--anomalies"), "{e}");
        let e = parse(&["--anomalies", "--verdict", "dropped"]).err().unwrap();
        assert!(e.contains("cannot be used with"), "{e}");
    }

    #[test]
    fn an_anomaly_row_reads_well() {
        let a = Anomaly {
            time: "2026-11-30T05:40:12.201Z".parse().unwrap(),
            kind: AnomalyKind::Scan,
            score: 2.345,
            namespace: "shop".into(),
            workload: "frontend".into(),
            pod: Some(NamespacedName::new("shop", "frontend-1")),
            explanation: "reached 40 distinct peer ports in 10 s".into(),
            flows: vec![],
            response: Some("would quarantine shop/frontend-1 (dry run)".into()),
        };
        let row = anomaly_row(&a);
        assert!(row.starts_with("11-30 05:40:12.201 scan            2.35  shop/frontend "), "{row}");
        assert!(
            row.ends_with(
                "shop/frontend-1                  reached 40 distinct peer ports in 10 s [would quarantine shop/frontend-1 (dry run)]"
            ),
            "{row}"
        );
        assert!(anomaly_header().starts_with("TIME "));
    }

    #[test]
    fn bad_input_is_refused_before_connecting() {
        for (args, needle) in [
            (vec!["--verdict", "maybe"], "maybe"),
            (vec!["--drop-reason", "cosmic_rays"], "cosmic_rays"),
            (vec!["--drop-reason", "forwarded"], "forwarded"),
            (vec!["--pod", "nopod"], "NAMESPACE/NAME"),
            (vec!["--from-pod", "x/"], "NAMESPACE/NAME"),
            (vec!["--policy", "a/b/c"], "NAMESPACE/NAME"),
            (vec!["--direction", "sideways"], "sideways"),
            (vec!["--protocol", "gre"], "gre"),
            (vec!["--label", "=v"], "KEY=VALUE"),
            (vec!["--since", "yesterday"], "yesterday"),
            (vec!["--socket", "/s", "--node", "node0"], "cannot be used with"),
        ] {
            let e = parse(&args).err().unwrap_or_else(|| panic!("{args:?} accepted"));
            assert!(e.contains(needle), "{args:?}: {e}");
        }
        let e = parse(&["--drop-reason", "nope"]).err().unwrap();
        assert!(e.contains("policy_denied"), "lists the known reasons: {e}");
    }

    #[test]
    fn since_takes_durations_and_times() {
        let ns = |t: &str| parse_duration(t).map(|d| d.as_nanos());
        assert_eq!(ns("90s"), Some(90_000_000_000));
        assert_eq!(ns("1h30m"), Some(5_400_000_000_000));
        assert_eq!(ns("500ms"), Some(500_000_000));
        assert_eq!(ns("2d"), Some(172_800_000_000_000));
        for bad in ["", "5", "m", "5x", "5m3", "-5m"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        assert_eq!(parse_since("2026-11-28T12:00:00Z").unwrap(), 1_795_867_200_000_000_000);
        assert_eq!(parse_since("2026-11-28T13:00:00+01:00").unwrap(), 1_795_867_200_000_000_000);
        let now = jiff::Timestamp::now().as_nanosecond();
        let five_ago = i128::from(parse_since("5m").unwrap());
        assert!((now - 300_000_000_000 - five_ago).abs() < 5_000_000_000);
    }

    #[test]
    fn targets_come_from_socket_lab_or_default() {
        let dir = std::env::temp_dir().join(format!("bulkhead-observe-targets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let lab = dir.display().to_string();
        let a = parse(&["--lab-dir", &lab]).unwrap();
        assert_eq!(
            targets(&a).unwrap()[0].socket,
            PathBuf::from(DEFAULT_SOCKET),
            "no lab: the local agent"
        );
        let a = parse(&["--lab-dir", &lab, "--node", "node1"]).unwrap();
        assert!(matches!(targets(&a), Err(ObserveError::NoLab { .. })));
        let paths = LabPaths::new(&dir).unwrap();
        let state = crate::lab::LabState {
            id: "abcd".into(),
            nodes: ["node0", "node1"]
                .iter()
                .map(|n| crate::lab::NodeState {
                    name: n.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        paths.save(&state).unwrap();
        let all = targets(&parse(&["--lab-dir", &lab]).unwrap()).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].socket, paths.agent_socket("node1"));
        let one = targets(&parse(&["--lab-dir", &lab, "--node", "node1"]).unwrap()).unwrap();
        assert_eq!(one, vec![all[1].clone()]);
        let e = targets(&parse(&["--lab-dir", &lab, "--node", "node7"]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("nodes: node0, node1"), "{e}");
        let s = targets(&parse(&["--lab-dir", &lab, "--socket", "/tmp/a.sock"]).unwrap()).unwrap();
        assert_eq!(s[0].socket, PathBuf::from("/tmp/a.sock"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn table_row_reads_well() {
        let flow: Flow = serde_json::from_str(
            r#"{"time":"2026-11-28T12:50:08.123456789Z","node":"node0","verdict":"DROPPED","drop_reason":"policy_denied",
            "direction":"ingress","protocol":"TCP","tcp_flags":"SYN",
            "source":{"namespace":"y","pod":"b","ip":"10.0.0.5","port":40000,"identity":257},
            "destination":{"ip":"10.0.0.3","port":80,"identity":0},
            "isolated_by":[{"namespace":"x","name":"default-deny-ingress"}],"is_reply":false}"#,
        )
        .unwrap();
        let row = table_row(&flow);
        for part in [
            "11-28 12:50:08.123",
            "y/b:40000",
            "10.0.0.3:80",
            "DROPPED",
            "policy_denied; isolated by x/default-deny-ingress; SYN",
        ] {
            assert!(row.contains(part), "{part:?} missing in {row}");
        }
    }

    #[test]
    fn byte_reports_show_their_kind_and_counts() {
        let json = r#"{"time":"2026-11-28T12:50:08.123456789Z","node":"node0","verdict":"FORWARDED",
            "direction":"egress","protocol":"TCP","tcp_flags":"FIN|ACK",
            "source":{"namespace":"y","pod":"b","ip":"10.0.0.5","port":40000,"identity":257},
            "destination":{"ip":"192.0.2.9","port":443,"identity":2},
            "is_reply":false,"kind":"end","bytes":{"to_destination":123456,"to_source":789}}"#;
        let flow: Flow = serde_json::from_str(json).unwrap();
        assert_eq!(flow.kind, FlowKind::End);
        let row = table_row(&flow);
        for part in [
            "y/b:40000",
            "192.0.2.9:443",
            " END ",
            "bytes 123456 to destination, 789 to source",
            "FIN|ACK",
        ] {
            assert!(row.contains(part), "{part:?} missing in {row}");
        }
        assert!(!row.contains("FORWARDED"), "{row}");
        let mut update = flow.clone();
        update.kind = FlowKind::Update;
        assert!(table_row(&update).contains(" UPDATE "), "{}", table_row(&update));
        // JSON carries the kind and both counts; a packet record carries neither.
        let mut out = Vec::new();
        print_flow(&mut out, &flow, Output::Json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["kind"], "end");
        assert_eq!(v["bytes"]["to_destination"], 123456);
        assert_eq!(v["bytes"]["to_source"], 789);
        let packet = Flow {
            kind: FlowKind::Packet,
            bytes: None,
            ..flow
        };
        let v = serde_json::to_value(&packet).unwrap();
        assert!(v.get("kind").is_none() && v.get("bytes").is_none(), "{v}");
        // --record selects them.
        let args = parse(&["--record", "update"]).unwrap();
        assert_eq!(args.request().filter.kind, Some(FlowKind::Update));
        assert_eq!(parse(&[]).unwrap().request().filter.kind, None);
    }
}
