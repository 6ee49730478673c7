//! `bulkhead forensics NS/POD`: everything kept about one pod, live or deleted — its labels,
//! address, node and the policies that selected it, its flows from every node's agent
//! (merged by time), and its anomalies from the lab's relay when one answers.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulkhead_api::{code, Anomaly, AnomalyRequest, Envelope, ForensicsBundle, NamespacedName, Request, Response};

use crate::cli::observe::{agent_targets, table_row, ObserveError, Target};
use crate::cli::{AgentSelect, Output};

/// How long one agent may take to answer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the relay may take for each line of anomalies.
const RELAY_TIMEOUT: Duration = Duration::from_secs(10);

fn namespaced(text: &str) -> Result<NamespacedName, String> {
    text.parse().map_err(|e: bulkhead_api::name::ParseNameError| e.to_string())
}

/// `bulkhead forensics` flags.
#[derive(Debug, clap::Args)]
pub struct ForensicsArgs {
    /// The pod, NAMESPACE/NAME (live, quarantined or deleted).
    #[arg(value_parser = namespaced)]
    pub pod: NamespacedName,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Which agents to ask (every lab node's, merged).
    #[command(flatten)]
    pub agents: AgentSelect,
}

/// Why `bulkhead forensics` failed.
#[derive(Debug, thiserror::Error)]
pub enum ForensicsError {
    /// Finding the agents failed.
    #[error(transparent)]
    Targets(#[from] ObserveError),
    /// An agent could not be asked.
    #[error("node {node}")]
    Agent {
        /// The node (or socket).
        node: String,
        /// Cause.
        #[source]
        source: bulkhead_api::ApiError,
    },
    /// An agent refused (other than not knowing the pod).
    #[error("node {node}: {message} (code {code})")]
    Refused {
        /// The node (or socket).
        node: String,
        /// The error code.
        code: u32,
        /// The agent's message.
        message: String,
    },
    /// An agent answered something else.
    #[error("node {node}: unexpected answer {answer}")]
    Unexpected {
        /// The node (or socket).
        node: String,
        /// What it said.
        answer: String,
    },
    /// No agent knows the pod.
    #[error("pod {pod} is unknown: no agent has it in its model or kept anything of it ({asked})")]
    Unknown {
        /// The pod.
        pod: NamespacedName,
        /// The agents asked.
        asked: String,
    },
    /// Writing the output failed.
    #[error("write output")]
    Output(#[source] std::io::Error),
}

/// What one agent said.
enum Answer {
    Bundle(Box<ForensicsBundle>),
    Unknown,
}

fn ask(target: &Target, pod: &NamespacedName) -> Result<Answer, ForensicsError> {
    let request = Request::Forensics { pod: pod.clone() };
    let node = || target.node.clone();
    match bulkhead_api::call(&target.socket, &request, AGENT_TIMEOUT) {
        Ok(Response::Forensics(b)) => Ok(Answer::Bundle(b)),
        Ok(Response::Error {
            code: code::UNKNOWN_POD, ..
        }) => Ok(Answer::Unknown),
        Ok(Response::Error { code, message }) => Err(ForensicsError::Refused {
            node: node(),
            code,
            message,
        }),
        Ok(other) => Err(ForensicsError::Unexpected {
            node: node(),
            answer: format!("{other:?}"),
        }),
        Err(source) => Err(ForensicsError::Agent { node: node(), source }),
    }
}

/// Merges the agents' bundles of one pod: every node's flows, time-ordered, each once; the
/// record (labels, address, node, policies, deletion, quarantine) from the pod's own node's
/// agent when it answered, else from the one that saw the pod last. `None` when empty.
pub fn merge(pod: &NamespacedName, bundles: Vec<(String, ForensicsBundle)>) -> Option<ForensicsBundle> {
    if bundles.is_empty() {
        return None;
    }
    let own = bundles
        .iter()
        .position(|(node, b)| b.node.as_deref() == Some(node.as_str()))
        .or_else(|| {
            // Freshest: a live record (no deletion time) first, then the latest deletion.
            bundles
                .iter()
                .enumerate()
                .max_by_key(|(_, (_, b))| b.deleted.map_or(i128::MAX, |t| t.as_nanosecond()))
                .map(|(i, _)| i)
        })
        .unwrap_or(0);
    let mut flows = Vec::new();
    let mut seen = BTreeSet::new();
    let mut record = None;
    for (i, (_, b)) in bundles.into_iter().enumerate() {
        for f in &b.flows {
            // Each agent's flows are its own (the node is in them) and already deduplicated;
            // the same line twice across answers is one flow.
            if seen.insert(serde_json::to_string(f).unwrap_or_default()) {
                flows.push(f.clone());
            }
        }
        if i == own {
            record = Some(b);
        }
    }
    let mut record = record?;
    flows.sort_by_key(|f| f.time);
    record.pod = pod.clone();
    record.flows = flows;
    Some(record)
}

/// The anomalies of `pod` from the lab's relay; `Err` says why there are none to show
/// (no lab relay, unreachable, or it refused).
fn anomalies(lab_dir: &Path, pod: &NamespacedName) -> Result<Vec<Anomaly>, String> {
    let paths = crate::lab::LabPaths::new(lab_dir).map_err(|e| crate::error_chain(&e))?;
    if paths.load().map_err(|e| crate::error_chain(&e))?.is_none() {
        return Err("no lab relay to ask".into());
    }
    let socket: PathBuf = crate::lab::relay_socket(&paths);
    let request = Request::Anomalies(Box::new(AnomalyRequest {
        pod: Some(pod.clone()),
        follow: false,
        ..AnomalyRequest::default()
    }));
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).map_err(|e| format!("relay {}: {e}", socket.display()))?;
    stream.set_read_timeout(Some(RELAY_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(&Envelope::new(request)).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| format!("relay {}: {e}", socket.display()))?;
    let mut out = Vec::new();
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(|e| format!("relay {}: {e}", socket.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        if let Ok(a) = serde_json::from_str::<Anomaly>(&line) {
            out.push(a);
            continue;
        }
        return Err(match serde_json::from_str::<Response>(&line) {
            Ok(Response::Error { message, .. }) => format!("the relay refused: {message}"),
            _ => format!("the relay answered something else: {line}"),
        });
    }
    Ok(out)
}

/// Runs `bulkhead forensics`; the exit code.
pub fn run(args: ForensicsArgs) -> Result<i32, ForensicsError> {
    let targets = agent_targets(&args.agents)?;
    let answers: Vec<Result<Answer, ForensicsError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = targets.iter().map(|t| scope.spawn(|| ask(t, &args.pod))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ForensicsError::Unexpected {
                        node: "?".into(),
                        answer: "the asking thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut bundles = Vec::new();
    for (t, answer) in targets.iter().zip(answers) {
        // An agent that fails is an error, never a silent gap in the bundle.
        if let Answer::Bundle(b) = answer? {
            bundles.push((t.node.clone(), *b));
        }
    }
    let asked: Vec<&str> = targets.iter().map(|t| t.node.as_str()).collect();
    let mut bundle = merge(&args.pod, bundles).ok_or_else(|| ForensicsError::Unknown {
        pod: args.pod.clone(),
        asked: asked.join(", "),
    })?;
    let anomalies = match args.agents.socket {
        Some(_) => Err("asked one agent's socket, no relay".to_string()),
        None => anomalies(&args.agents.lab_dir, &args.pod),
    };
    let unavailable = match anomalies {
        Ok(a) => {
            bundle.anomalies = a;
            None
        }
        Err(why) => Some(why),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let written = match args.output {
        Output::Json => {
            if let Some(why) = &unavailable {
                // The bundle has no field for it: said on stderr, so stdout stays the bundle.
                eprintln!("bulkhead: anomalies not available: {why}");
            }
            let text = serde_json::to_string_pretty(&bundle).map_err(|e| ForensicsError::Output(e.into()))?;
            writeln!(out, "{text}")
        }
        Output::Table => write!(out, "{}", table(&bundle, unavailable.as_deref())),
    };
    match written.and_then(|()| out.flush()) {
        // stdout closed (piped into head): not an error, as for `observe`.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(ForensicsError::Output(e)),
        Ok(()) => Ok(0),
    }
}

/// The human-readable bundle.
pub fn table(b: &ForensicsBundle, anomalies_unavailable: Option<&str>) -> String {
    let mut s = String::new();
    let none = || "-".to_string();
    let labels: Vec<String> = b.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let policies: Vec<String> = b.policies.iter().map(ToString::to_string).collect();
    let line = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k:<12} {v}\n"));
    line(&mut s, "POD", b.pod.to_string());
    line(&mut s, "NODE", b.node.clone().unwrap_or_else(none));
    line(&mut s, "IP", b.ip.map_or_else(none, |ip| ip.to_string()));
    line(&mut s, "LABELS", if labels.is_empty() { none() } else { labels.join(",") });
    line(&mut s, "POLICIES", if policies.is_empty() { none() } else { policies.join(", ") });
    line(&mut s, "DELETED", b.deleted.map_or_else(|| "no".to_string(), |t| t.to_string()));
    line(
        &mut s,
        "QUARANTINE",
        b.quarantine
            .as_ref()
            .map_or_else(|| "no".to_string(), |q| format!("since {} by {}: {}", q.since, q.by, q.reason)),
    );
    s.push_str(&format!("\nFLOWS ({})\n", b.flows.len()));
    for f in &b.flows {
        s.push_str(&table_row(f));
        s.push('\n');
    }
    match anomalies_unavailable {
        Some(why) => s.push_str(&format!("\nANOMALIES: not available ({why})\n")),
        None => {
            s.push_str(&format!("\nANOMALIES ({})\n", b.anomalies.len()));
            for a in &b.anomalies {
                s.push_str(&format!("{} {:<13} {:>6.2} {}\n", a.time, a.kind, a.score, a.explanation));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_api::{Direction, Flow, FlowPeer, FlowVerdict, Protocol};

    fn flow(node: &str, t: &str, port: u16) -> Flow {
        let peer = |pod: &str| FlowPeer {
            namespace: Some("x".into()),
            pod: Some(pod.into()),
            labels: Default::default(),
            ip: [10, 0, 0, 1].into(),
            port,
            identity: 256,
            services: vec![],
        };
        Flow {
            time: t.parse().unwrap(),
            node: node.into(),
            verdict: FlowVerdict::Forwarded,
            drop_reason: None,
            direction: Direction::Egress,
            protocol: Protocol::TCP,
            tcp_flags: None,
            source: peer("a"),
            destination: peer("b"),
            allowed_by: vec![],
            isolated_by: vec![],
            is_reply: false,
            service: None,
            kind: Default::default(),
            bytes: None,
        }
    }

    fn bundle(node: Option<&str>, labels: &[(&str, &str)], flows: Vec<Flow>) -> ForensicsBundle {
        ForensicsBundle {
            pod: NamespacedName::new("x", "a"),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ip: None,
            node: node.map(str::to_string),
            deleted: Some("2026-11-30T05:00:00Z".parse().unwrap()),
            quarantine: None,
            policies: vec![],
            flows,
            anomalies: vec![],
        }
    }

    #[test]
    fn bundles_merge_by_time_once_with_the_own_nodes_record() {
        let pod = NamespacedName::new("x", "a");
        let a1 = flow("n0", "2026-11-30T05:00:01Z", 1);
        let a3 = flow("n0", "2026-11-30T05:00:03Z", 3);
        let b2 = flow("n1", "2026-11-30T05:00:02Z", 2);
        let merged = merge(
            &pod,
            vec![
                ("n1".into(), bundle(Some("n0"), &[("from", "n1")], vec![b2.clone(), a1.clone()])),
                ("n0".into(), bundle(Some("n0"), &[("from", "n0")], vec![a1.clone(), a3.clone()])),
            ],
        )
        .unwrap();
        assert_eq!(merged.flows, vec![a1, b2, a3], "time-ordered, each flow once");
        assert_eq!(
            merged.labels.get("from").map(String::as_str),
            Some("n0"),
            "the pod's own node's record"
        );
        assert!(merge(&pod, vec![]).is_none());
        // No answer from the pod's node: the freshest record (a live one over a deleted one).
        let mut live = bundle(Some("n9"), &[("from", "live")], vec![]);
        live.deleted = None;
        let merged = merge(
            &pod,
            vec![("n1".into(), bundle(Some("n9"), &[("from", "old")], vec![])), ("n2".into(), live)],
        )
        .unwrap();
        assert_eq!(merged.labels.get("from").map(String::as_str), Some("live"));
        let text = table(&merged, Some("the relay refused: not yet"));
        assert!(text.contains("ANOMALIES: not available (the relay refused: not yet)"), "{text}");
        assert!(text.contains("LABELS       from=live"), "{text}");
    }
}
