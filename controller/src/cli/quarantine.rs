//! `bulkhead quarantine NS/POD [--reason TEXT] [--release]`: isolates a pod in the datapath
//! (or lifts that) through every agent that must know: each lab node's agent when a lab is
//! up (the pod's own node isolates it, the others drop their pods' traffic to it), else the
//! local agent.

use std::time::Duration;

use bulkhead_api::{NamespacedName, Request, Response};
use serde::Serialize;

use super::observe::{agent_targets, ObserveError, Target};
use super::{AgentSelect, Output};

/// How long one agent may take to answer (it answers once its maps hold the change).
const TIMEOUT: Duration = Duration::from_secs(30);

/// `bulkhead quarantine` flags.
#[derive(Clone, Debug, clap::Args)]
#[command(after_help = "\
The pod is isolated in both directions at once, ahead of policy and conntrack (established \
connections stop too), except for traffic with its own node (agent option \
--quarantine-allow-node, default true). Drops carry the reason `quarantined`.

External tooling can do the same through the API: a pod labelled \
`bulkhead.io/quarantine: \"true\"` is quarantined while the label stays (--release does not \
lift a label's quarantine; remove the label).")]
pub struct QuarantineArgs {
    /// The pod, NAMESPACE/NAME.
    pub pod: NamespacedName,
    /// Why (shown in the agents' status and in forensics).
    #[arg(long, conflicts_with = "release")]
    pub reason: Option<String>,
    /// Lift a quarantine this command (or the automatic response) set.
    #[arg(long)]
    pub release: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
    /// Which agents to ask.
    #[command(flatten)]
    pub agents: AgentSelect,
}

/// Why `bulkhead quarantine` failed.
#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    /// The agents could not be found (a lab state that cannot be read, a bad `--node`).
    #[error(transparent)]
    Targets(#[from] ObserveError),
    /// Some agents could not be asked or refused.
    #[error("{action} {pod} failed on {failed} of {total} agent(s): {details}")]
    Refused {
        /// `quarantine` or `release`.
        action: &'static str,
        /// The pod.
        pod: NamespacedName,
        /// How many failed.
        failed: usize,
        /// How many were asked.
        total: usize,
        /// `node: why`, for each that failed.
        details: String,
    },
}

/// One agent's answer, as `-o json` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeAnswer {
    /// The node (or socket path).
    pub node: String,
    /// The agent's maps hold the change.
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `-o json`: `{"pod","release","nodes":[{"node","ok","error"}]}`.
#[derive(Clone, Debug, Serialize)]
struct Report<'a> {
    pod: String,
    release: bool,
    nodes: &'a [NodeAnswer],
}

/// Runs the command; the exit code is 0 only when every agent holds the change.
pub fn run(args: QuarantineArgs) -> Result<i32, QuarantineError> {
    let targets = agent_targets(&args.agents)?;
    let request = Request::Quarantine {
        pod: args.pod.clone(),
        reason: args.reason.clone(),
        release: args.release,
    };
    let answers: Vec<NodeAnswer> = targets.iter().map(|t| ask(t, &request)).collect();
    match args.output {
        Output::Json => {
            let report = Report {
                pod: args.pod.to_string(),
                release: args.release,
                nodes: &answers,
            };
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
        }
        Output::Table => {
            let done = if args.release { "released" } else { "quarantined" };
            for a in &answers {
                match &a.error {
                    None => println!("{}: {} {done}", a.node, args.pod),
                    Some(e) => println!("{}: failed: {e}", a.node),
                }
            }
        }
    }
    let failed: Vec<&NodeAnswer> = answers.iter().filter(|a| !a.ok).collect();
    if failed.is_empty() {
        return Ok(0);
    }
    Err(QuarantineError::Refused {
        action: if args.release { "release" } else { "quarantine" },
        pod: args.pod,
        failed: failed.len(),
        total: answers.len(),
        details: failed
            .iter()
            .map(|a| format!("{}: {}", a.node, a.error.as_deref().unwrap_or("")))
            .collect::<Vec<_>>()
            .join("; "),
    })
}

fn ask(target: &Target, request: &Request) -> NodeAnswer {
    let error = match bulkhead_api::call(&target.socket, request, TIMEOUT) {
        Ok(Response::Ok) => None,
        Ok(Response::Error { code, message }) => Some(format!("{message} (code {code})")),
        Ok(other) => Some(format!("unexpected answer {other:?}")),
        Err(e) => Some(crate::error_chain(&e)),
    };
    NodeAnswer {
        node: target.node.clone(),
        ok: error.is_none(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: QuarantineArgs,
    }

    #[test]
    fn the_pod_must_be_namespace_slash_name_and_reason_excludes_release() {
        let ok = Cli::try_parse_from(["q", "x/a", "--reason", "r"]).unwrap();
        assert_eq!(
            (ok.args.pod, ok.args.reason.as_deref(), ok.args.release),
            (NamespacedName::new("x", "a"), Some("r"), false)
        );
        let bad = Cli::try_parse_from(["q", "a"]).err().unwrap().to_string();
        assert!(bad.contains("NAMESPACE/NAME"), "{bad}");
        assert!(Cli::try_parse_from(["q", "x/a", "--reason", "r", "--release"]).is_err());
    }

    #[test]
    fn an_agent_that_cannot_be_reached_fails_the_command_and_names_itself() {
        let dir = std::env::temp_dir().join(format!("bh-quar-cli-{}", std::process::id()));
        let args = Cli::try_parse_from(["q", "x/a", "--socket", dir.join("none.sock").to_str().unwrap()])
            .unwrap()
            .args;
        let err = run(args).unwrap_err().to_string();
        assert!(
            err.contains("quarantine x/a failed on 1 of 1") && err.contains("none.sock"),
            "{err}"
        );
    }
}
