//! `bulkhead explain FROM TO PORT/PROTO`: the verdict the agent's current model gives a
//! connection, which policies isolate each side and which rule allows it.
//!
//! The agent computes the answer with [`policy::explain`].

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use bulkhead_api::{self, ApiError, Explanation, PolicyName, Protocol, Request, Response};

use crate::cli::observe::{self, ObserveError};
use crate::cli::Output;
use crate::policy::{self};

/// How long to wait for the agent's answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// `bulkhead explain` flags.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The client pod, NAMESPACE/NAME.
    pub from: String,
    /// The server pod, NAMESPACE/NAME.
    pub to: String,
    /// Destination port and protocol, e.g. 80/TCP, 53/udp; the protocol defaults to TCP.
    /// Numbers only: named ports are not resolved.
    #[arg(value_name = "PORT/PROTO")]
    pub port: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The agent socket (default: the first lab node's agent when a lab is up, else
    /// /run/bulkhead/agent.sock).
    #[arg(long, conflicts_with = "node")]
    pub socket: Option<PathBuf>,
    /// Lab state dir, to find the nodes' agents.
    #[arg(long, env = "BULKHEAD_LAB_DIR", default_value = "/run/bulkhead/lab")]
    pub lab_dir: PathBuf,
    /// Ask this lab node's agent.
    #[arg(long)]
    pub node: Option<String>,
}

/// Why `bulkhead explain` failed.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The connection cannot be explained (bad pod or port).
    #[error(transparent)]
    Request(#[from] policy::explain::ExplainError),
    /// The agent to ask could not be found.
    #[error("finding the agent")]
    Target(#[source] ObserveError),
    /// The lab has no nodes.
    #[error("the lab in {lab_dir} has no nodes")]
    NoNodes {
        /// Where the lab was found.
        lab_dir: PathBuf,
    },
    /// The agent could not be asked.
    #[error("node {node}")]
    Agent {
        /// The node (or socket path).
        node: String,
        /// Cause.
        #[source]
        source: ApiError,
    },
    /// The agent refused the request.
    #[error("node {node}: {message} (code {code})")]
    Refused {
        /// The node (or socket path).
        node: String,
        /// CNI-style error code.
        code: u32,
        /// The agent's message.
        message: String,
    },
    /// The agent answered something else.
    #[error("node {node}: unexpected answer {answer}")]
    Unexpected {
        /// The node (or socket path).
        node: String,
        /// The answer, debug-printed.
        answer: String,
    },
}

/// Parses `PORT/PROTO` (or `PORT`, meaning TCP): a port 1-65535 and TCP, UDP or SCTP in
/// any case.
pub fn parse_port(text: &str) -> Result<(u16, Protocol), ExplainError> {
    let bad = |reason: String| ExplainError::from(policy::explain::ExplainError::BadPort { reason });
    let (port, protocol) = text.split_once('/').unwrap_or((text, "TCP"));
    let number: u16 = port
        .parse()
        .map_err(|_| bad(format!("{port:?} is not a port number (1-65535; named ports are not supported)")))?;
    if number == 0 {
        return Err(bad("port 0 is not a destination port (1-65535)".into()));
    }
    Ok((number, policy::explain::parse_protocol(protocol)?))
}

pub(crate) fn policy_list(list: &[PolicyName]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    list.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The human-readable form: a verdict line, then one row per side.
pub fn table(e: &Explanation) -> String {
    let mut rows = vec![[
        "SIDE".to_string(),
        "POD".into(),
        "ISOLATED BY".into(),
        "MODE".into(),
        "ALLOWED BY".into(),
        "VERDICT".into(),
    ]];
    for s in [&e.egress, &e.ingress] {
        let mode = match (s.isolated, s.audit_mode) {
            (false, _) => "not isolated",
            (true, false) => "enforce",
            (true, true) => "audit",
        };
        let allowed_by = s
            .allowed_by
            .as_ref()
            .map_or_else(|| "-".to_string(), |r| format!("{} {}[{}]", r.policy, r.direction, r.rule));
        rows.push([
            s.direction.as_str().to_string(),
            s.pod.to_string(),
            policy_list(&s.isolated_by),
            mode.into(),
            allowed_by,
            s.verdict.as_str().into(),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = format!("{} -> {} {}/{}: {}\n", e.from, e.to, e.port, e.protocol, e.verdict.as_str());
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Runs `bulkhead explain`; the exit code.
pub fn run(args: ExplainArgs) -> Result<i32, ExplainError> {
    // Checked here too, so bad input fails before any agent is looked for.
    let from = policy::explain::pod_ref("FROM", &args.from)?;
    let to = policy::explain::pod_ref("TO", &args.to)?;
    let (port, protocol) = parse_port(&args.port)?;
    let targets = observe::agent_targets(args.socket.as_deref(), &args.lab_dir, args.node.as_deref()).map_err(ExplainError::Target)?;
    // Every lab agent holds the whole cluster's model: the first one answers for all.
    let target = targets.into_iter().next().ok_or_else(|| ExplainError::NoNodes {
        lab_dir: args.lab_dir.clone(),
    })?;
    let request = Request::Explain { from, to, port, protocol };
    let node = target.node.clone();
    let explanation = match bulkhead_api::call(&target.socket, &request, TIMEOUT) {
        Ok(Response::Explain(e)) => *e,
        Ok(Response::Error { code, message }) => return Err(ExplainError::Refused { node, code, message }),
        Ok(other) => {
            return Err(ExplainError::Unexpected {
                node,
                answer: format!("{other:?}"),
            })
        }
        Err(source) => return Err(ExplainError::Agent { node, source }),
    };
    let text = match args.output {
        Output::Table => table(&explanation),
        Output::Json => match serde_json::to_string_pretty(&explanation) {
            Ok(json) => json + "\n",
            Err(e) => format!("{{\"error\": {:?}}}\n", e.to_string()),
        },
    };
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(0)
}
