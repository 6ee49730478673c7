//! The user-facing commands besides the agent and the lab: `observe`, `explain` and
//! `install-cni`, and what they share (output format, finding the agents to ask).

pub mod explain;
pub mod install;
pub mod observe;

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable.
    Table,
    /// JSON.
    Json,
}
