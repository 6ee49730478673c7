//! The user-facing commands besides the agent and the lab: `observe`, `explain`,
//! `forensics`, `advise`, `quarantine` and `install-cni`, and what they share (output format, finding
//! the agents to ask).

pub mod advise;
pub mod explain;
pub mod forensics;
pub mod install;
pub mod observe;
pub mod quarantine;

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable.
    Table,
    /// JSON.
    Json,
}

/// Which agents a command asks: `--socket`, else a lab's nodes' agents when a lab is up
/// (`--node` for one), else `/run/bulkhead/agent.sock`.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentSelect {
    /// The agent socket (default: the lab's agents when a lab is up, else
    /// /run/bulkhead/agent.sock).
    #[arg(long, conflicts_with = "node")]
    pub socket: Option<std::path::PathBuf>,
    /// Lab state dir, to find the nodes' agents.
    #[arg(long, env = "BULKHEAD_LAB_DIR", default_value = "/run/bulkhead/lab")]
    pub lab_dir: std::path::PathBuf,
    /// Only this lab node's agent.
    #[arg(long)]
    pub node: Option<String>,
}
