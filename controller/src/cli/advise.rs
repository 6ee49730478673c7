//! `bulkhead advise`: NetworkPolicies proposed from observed flows — the agents' history (the
//! lab's agents when a lab is up, else the local agent, as `observe` finds them) or a saved
//! flow file (`observe -o json` output, one JSON object per line).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use bulkhead_api::{Flow, FlowFilter, ObserveRequest};

use crate::advisor::{self, render, Advice, AdviseError, Options, Peer};
use crate::cli::observe::{agent_targets, parse_since, ObserveError, Target};
use crate::cli::AgentSelect;

/// How long a history request may wait for the agent's next line.
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `-o` of `advise`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AdviseOutput {
    /// The policies only, as multi-document YAML with comments (applyable as is).
    Yaml,
    /// One line per learnt rule.
    Table,
}

/// `bulkhead advise` flags.
#[derive(Debug, clap::Args)]
pub struct AdviseArgs {
    /// Only propose policies for workloads of this namespace (their peers may be anywhere).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Only flows since a time: a duration back from now (5m, 1h30m) or RFC 3339.
    #[arg(long, value_parser = parse_since)]
    pub since: Option<u64>,
    /// Learn from a saved flow file (`observe -o json` output; `-` for stdin) instead of the agents.
    #[arg(long, conflicts_with_all = ["socket", "node"])]
    pub flows: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = AdviseOutput::Yaml)]
    pub output: AdviseOutput,
    /// Emit the policies in audit mode (`bulkhead.io/audit: "true"`): what they would deny
    /// is forwarded and reported as AUDIT (`observe --verdict audit`).
    #[arg(long)]
    pub audit: bool,
    /// Allow outside addresses as CIDRs of this prefix length (32: each address alone).
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub cidr_prefix: u8,
    /// Learn from a relay's cluster-wide history (`bulkhead relay`): `HOST:PORT`, a socket
    /// path, or nothing for the lab's relay. It keeps more history than one agent.
    #[arg(long, num_args = 0..=1, default_missing_value = "lab", conflicts_with_all = ["flows", "socket"])]
    pub relay: Option<String>,
    /// Token file for a relay reached over TCP.
    #[arg(long, env = "BULKHEAD_RELAY_TOKEN_FILE", requires = "relay")]
    pub token_file: Option<PathBuf>,
    /// Which agents to ask when no --flows file is given.
    #[command(flatten)]
    pub agents: AgentSelect,
}

/// How long a relay may stay silent while it sends its history.
const RELAY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Where the flows come from.
///
/// The cluster-wide relay (`--relay ADDR`) becomes one more variant here: it serves the same
/// `ObserveRequest` and `Flow` lines as an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowSource {
    /// A saved `observe -o json` file (`-`: stdin).
    File(PathBuf),
    /// Agents' histories, merged.
    Agents(Vec<Target>),
    /// A relay's history (already merged): its address and token.
    Relay {
        /// Where it serves.
        address: bulkhead_api::RelayAddr,
        /// Its token, for TCP.
        token: Option<String>,
    },
}

/// Why `bulkhead advise` failed.
#[derive(Debug, thiserror::Error)]
pub enum AdviseCliError {
    /// Finding or asking the agents failed.
    #[error(transparent)]
    Observe(#[from] ObserveError),
    /// The flow file cannot be read.
    #[error("read flow file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A line of the flow file is not a flow record.
    #[error("flow file {path}, line {line}: not a flow record as `observe -o json` writes it")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// Nothing to learn, or a bad namespace.
    #[error(transparent)]
    Advise(#[from] AdviseError),
    /// The YAML could not be written.
    #[error(transparent)]
    Render(#[from] render::RenderError),
}

/// The source the flags name: `--flows`, else the agents `observe` would ask.
pub fn source(args: &AdviseArgs) -> Result<FlowSource, AdviseCliError> {
    if let Some(addr) = &args.relay {
        let (address, token) = crate::relay::serve::client_target(addr, args.token_file.as_deref(), &args.agents.lab_dir)
            .map_err(|e| AdviseCliError::Observe(ObserveError::Relay(e)))?;
        return Ok(FlowSource::Relay { address, token });
    }
    match &args.flows {
        Some(path) => Ok(FlowSource::File(path.clone())),
        None => Ok(FlowSource::Agents(agent_targets(&args.agents)?)),
    }
}

/// Reads flow records, one JSON object per line; blank lines are skipped.
pub fn read_flow_lines(reader: impl BufRead, path: &Path) -> Result<Vec<Flow>, AdviseCliError> {
    let mut flows = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|source| AdviseCliError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let flow = serde_json::from_str(&line).map_err(|source| AdviseCliError::Malformed {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        })?;
        flows.push(flow);
    }
    Ok(flows)
}

/// Every flow the source holds (since `since`, Unix ns).
pub fn fetch(source: &FlowSource, since: Option<u64>) -> Result<Vec<Flow>, AdviseCliError> {
    match source {
        FlowSource::File(path) => {
            let flows = if path.as_os_str() == "-" {
                read_flow_lines(std::io::stdin().lock(), path)?
            } else {
                let file = std::fs::File::open(path).map_err(|source| AdviseCliError::Read {
                    path: path.clone(),
                    source,
                })?;
                read_flow_lines(std::io::BufReader::new(file), path)?
            };
            let since = since.map(i128::from);
            Ok(flows
                .into_iter()
                .filter(|f| since.is_none_or(|s| f.time.as_nanosecond() >= s))
                .collect())
        }
        FlowSource::Relay { address, token } => {
            let request = ObserveRequest {
                filter: FlowFilter::default(),
                since,
                last: None,
                follow: false,
                gaps: false,
            };
            let err = |source: bulkhead_api::ApiError| {
                AdviseCliError::Observe(ObserveError::Agent {
                    node: format!("relay {address}"),
                    source: source.into(),
                })
            };
            let stream = bulkhead_api::observe_relay(address, token.clone(), &request, Some(RELAY_TIMEOUT)).map_err(err)?;
            let mut flows = Vec::new();
            for flow in stream {
                flows.push(flow.map_err(|e| {
                    AdviseCliError::Observe(ObserveError::Agent {
                        node: format!("relay {address}"),
                        source: e,
                    })
                })?);
            }
            Ok(flows)
        }
        FlowSource::Agents(targets) => {
            let request = ObserveRequest {
                filter: FlowFilter::default(),
                since,
                last: None,
                follow: false,
                gaps: false,
            };
            let results: Vec<Result<Vec<Flow>, AdviseCliError>> = std::thread::scope(|scope| {
                let handles: Vec<_> = targets.iter().map(|t| scope.spawn(|| fetch_agent(t, &request))).collect();
                handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Ok(Vec::new()))).collect()
            });
            let mut flows = Vec::new();
            for r in results {
                flows.extend(r?);
            }
            Ok(flows)
        }
    }
}

fn fetch_agent(target: &Target, request: &ObserveRequest) -> Result<Vec<Flow>, AdviseCliError> {
    let err = |source| ObserveError::Agent {
        node: target.node.clone(),
        source,
    };
    let stream = bulkhead_api::observe(&target.socket, request, Some(IDLE_TIMEOUT)).map_err(|e| err(e.into()))?;
    Ok(stream.collect::<Result<Vec<_>, _>>().map_err(err)?)
}

/// One line per learnt rule.
pub fn table(advice: &Advice) -> String {
    let mut out = format!(
        "{:<32} {:<7} {:<44} {:<10} {:>6} {:<20} LAST SEEN\n",
        "WORKLOAD", "DIR", "PEER", "PORT", "CONNS", "FIRST SEEN"
    );
    for a in advice.workloads.values() {
        for direction in bulkhead_api::Direction::ALL {
            for (peer, ports) in a.rules(direction) {
                let peer = match peer {
                    Peer::Workload(w) => w.display(),
                    Peer::Cidr(net) => net.to_string(),
                };
                for (port, e) in ports {
                    out.push_str(&format!(
                        "{:<32} {:<7} {:<44} {:<10} {:>6} {:<20} {}\n",
                        a.workload.display(),
                        direction.as_str(),
                        peer,
                        port.to_string(),
                        e.connections,
                        e.first.strftime("%m-%d %H:%M:%S"),
                        e.last.strftime("%m-%d %H:%M:%S")
                    ));
                }
            }
        }
    }
    out
}

/// Runs `bulkhead advise`; the exit code.
pub fn run(args: AdviseArgs) -> Result<i32, AdviseCliError> {
    let source = source(&args)?;
    let flows = fetch(&source, args.since)?;
    let options = Options {
        namespace: args.namespace.clone(),
        cidr_prefix: args.cidr_prefix,
    };
    let advice = advisor::learn(&flows, &options)?;
    if !advice.ignored.unlabelled_pods.is_empty() {
        let pods: Vec<&str> = advice.ignored.unlabelled_pods.iter().map(String::as_str).collect();
        eprintln!(
            "bulkhead advise: pods without workload labels left out (their traffic is not allowed): {}",
            pods.join(", ")
        );
    }
    let text = match args.output {
        AdviseOutput::Yaml => render::render(&render::proposals(&advice, render::RenderOptions { audit: args.audit }))?,
        AdviseOutput::Table => table(&advice),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // A closed stdout (piped into head) is not an error of ours.
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AdviseArgs,
    }

    fn parse(args: &[&str]) -> Result<AdviseArgs, String> {
        Cli::try_parse_from(std::iter::once("advise").chain(args.iter().copied()))
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn flags() {
        let a = parse(&["--flows", "f.jsonl", "-n", "x", "--audit", "-o", "table", "--cidr-prefix", "16"]).unwrap();
        assert_eq!(source(&a).unwrap(), FlowSource::File("f.jsonl".into()));
        assert_eq!(
            (a.namespace.as_deref(), a.audit, a.output, a.cidr_prefix),
            (Some("x"), true, AdviseOutput::Table, 16)
        );
        for (bad, needle) in [
            (vec!["--cidr-prefix", "33"], "33"),
            (vec!["--since", "soon"], "soon"),
            (vec!["--flows", "f", "--socket", "/s"], "cannot be used with"),
            (vec!["-o", "json"], "json"),
        ] {
            let e = parse(&bad).err().unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn table_has_one_line_per_rule() {
        let line = r#"{"time":"2026-11-28T12:50:08Z","node":"node0","verdict":"AUDIT","direction":"ingress","protocol":"UDP","source":{"namespace":"x","pod":"a-1","labels":{"app":"a"},"ip":"10.244.0.5","port":40000,"identity":257},"destination":{"namespace":"y","pod":"b-1","labels":{"app":"b"},"ip":"10.244.0.6","port":53,"identity":258},"is_reply":false}"#;
        let flows = read_flow_lines(line.as_bytes(), Path::new("f")).unwrap();
        let advice = advisor::learn(&flows, &Options::default()).unwrap();
        let t = table(&advice);
        let rows: Vec<&str> = t.lines().collect();
        assert_eq!(rows.len(), 3, "{t}");
        assert!(rows[0].starts_with("WORKLOAD"), "{t}");
        for (row, want) in rows[1..]
            .iter()
            .zip([["x/a", "egress", "y/b", "53/UDP"], ["y/b", "ingress", "x/a", "53/UDP"]])
        {
            let cols: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(&cols[..4], want, "{t}");
            assert_eq!(cols[4], "1", "{t}");
        }
    }

    #[test]
    fn flow_file_errors_name_the_line() {
        let good = r#"{"time":"2026-11-28T12:50:08.123456789Z","node":"node0","verdict":"FORWARDED","direction":"egress","protocol":"TCP","source":{"ip":"10.0.0.5","port":40000,"identity":257},"destination":{"ip":"10.0.0.3","port":80,"identity":0},"is_reply":false}"#;
        let text = format!("{good}\n\n{good}\n");
        assert_eq!(read_flow_lines(text.as_bytes(), Path::new("f")).unwrap().len(), 2);
        let bad = format!("{good}\n{{\"time\": 3}}\n");
        let e = read_flow_lines(bad.as_bytes(), Path::new("f")).unwrap_err();
        assert!(matches!(e, AdviseCliError::Malformed { line: 2, .. }), "{e:?}");
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = read_flow_lines("not json\n".as_bytes(), Path::new("f")).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }
}
