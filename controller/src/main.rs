//! `bulkhead`: the node agent, the lab and the CLI.

use clap::{Parser, Subcommand};

/// Label-based network segmentation for Kubernetes, enforced in eBPF.
#[derive(Parser)]
#[command(name = "bulkhead", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Agent(bulkhead::config::AgentArgs),
    /// A cluster on this machine made of network namespaces.
    Lab(bulkhead::lab::LabArgs),
    /// Show flow records: what the datapath forwarded and dropped, and which policy decided.
    Observe(Box<bulkhead::cli::observe::ObserveArgs>),
    /// Explain a connection FROM TO PORT/PROTO: its verdict, which policies isolate each
    /// side and which rule allows it, from the agent's current model.
    Explain(bulkhead::cli::explain::ExplainArgs),
    /// Everything kept about one pod NS/POD, live or deleted: labels, policies, flows of
    /// every node, anomalies.
    Forensics(Box<bulkhead::cli::forensics::ForensicsArgs>),
    /// Merge every node's flow stream into one cluster-wide, time-ordered history and serve
    /// it to `bulkhead observe --relay`.
    Relay(Box<bulkhead::relay::RelayArgs>),
    /// Propose NetworkPolicies, one per workload, from observed flows (the agents' history
    /// or a saved `observe -o json` file).
    Advise(Box<bulkhead::cli::advise::AdviseArgs>),
    /// Isolate a pod NAMESPACE/NAME in the datapath, both directions, established connections
    /// included (its own node excepted), or lift that with --release; the label
    /// `bulkhead.io/quarantine: "true"` does the same through the API.
    Quarantine(Box<bulkhead::cli::quarantine::QuarantineArgs>),
    /// Install the bulkhead-cni binary and its conflist on this node (the DaemonSet's init container).
    InstallCni(bulkhead::cli::install::InstallArgs),
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let result: anyhow::Result<i32> = match cli.command {
        Command::Agent(args) => bulkhead::agent::run(args).map(|()| 0).map_err(Into::into),
        Command::Lab(args) => bulkhead::lab::run(args).map_err(Into::into),
        Command::Observe(args) => bulkhead::cli::observe::run(*args).map_err(Into::into),
        Command::Explain(args) => bulkhead::cli::explain::run(args).map_err(Into::into),
        Command::Forensics(args) => bulkhead::cli::forensics::run(*args).map_err(Into::into),
        Command::Relay(args) => bulkhead::relay::run(*args).map_err(Into::into),
        Command::Advise(args) => bulkhead::cli::advise::run(*args).map_err(Into::into),
        Command::Quarantine(args) => bulkhead::cli::quarantine::run(*args).map_err(Into::into),
        Command::InstallCni(args) => bulkhead::cli::install::run(args).map(|()| 0).map_err(Into::into),
    };
    let code = result.unwrap_or_else(|e| {
        // `{:#}` prints the cause chain on one line.
        eprintln!("bulkhead: {e:#}");
        1
    });
    std::process::exit(code)
}
