//! `bulkhead`: the node agent, the CLI and the lab.

use clap::Parser;

/// Bulkhead: NetworkPolicy by labels, enforced in eBPF.
#[derive(Debug, Parser)]
#[command(name = "bulkhead", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// A whole cluster on this machine: nodes and pods as network namespaces.
    Lab(bulkhead::lab::LabArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: anyhow::Result<i32> = match cli.command {
        Command::Lab(args) => bulkhead::lab::run(args).map_err(anyhow::Error::from),
    };
    let code = result.unwrap_or_else(|e| {
        // `{:#}` prints the whole cause chain on one line: "invalid manifest: f.yaml: document 2: ...".
        eprintln!("bulkhead: {e:#}");
        1
    });
    std::process::exit(code)
}
