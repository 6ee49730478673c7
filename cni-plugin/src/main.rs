//! `bulkhead-cni`: the CNI plugin executable.
//!
//! Only this file writes stdout: the result, or the spec's error JSON with exit status 1.
//! Logs go to stderr (`BULKHEAD_CNI_LOG` sets the filter, default `warn`).

use std::io::{Read, Write};
use std::process::ExitCode;

use bulkhead_cni::commands::{self, CommandError};
use bulkhead_cni::config::{self, Command, ConfigError, Env, NetConf};
use bulkhead_cni::spec::{self, CniVersion};
use serde_json::Value;

fn main() -> ExitCode {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_CNI_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();

    let (output, status) = match run() {
        Ok(Some(result)) => (Some(result), ExitCode::SUCCESS),
        Ok(None) => (None, ExitCode::SUCCESS),
        Err(Failure { version, error: err }) => {
            let details = err.describe();
            tracing::error!(code = err.code(), error = %details, "command failed");
            (
                Some(spec::error_json(version, err.code(), &err.to_string(), &details)),
                ExitCode::FAILURE,
            )
        }
    };
    if let Some(value) = output {
        let mut stdout = std::io::stdout().lock();
        if writeln!(stdout, "{value}").and_then(|()| stdout.flush()).is_err() {
            // The runtime went away; nothing left to tell it.
            return ExitCode::FAILURE;
        }
    }
    status
}

/// A failed command, with the spec version to report it in.
struct Failure {
    version: &'static str,
    error: Box<CommandError>,
}

/// Wraps errors of any subsystem into a [`Failure`] reported in `version`.
fn fail<E: Into<CommandError>>(version: &'static str) -> impl FnOnce(E) -> Failure {
    move |e| Failure {
        version,
        error: Box::new(e.into()),
    }
}

/// Runs the verb; prints nothing itself.
fn run() -> Result<Option<Value>, Failure> {
    let latest = spec::LATEST_VERSION;
    let raw_command = std::env::var("CNI_COMMAND")
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or(ConfigError::MissingEnv { var: "CNI_COMMAND" })
        .map_err(fail(latest))?;
    let command = Command::parse(&raw_command).map_err(fail(latest))?;
    if command == Command::Version {
        return Ok(Some(commands::version::run()));
    }

    let mut stdin = Vec::new();
    std::io::stdin()
        .read_to_end(&mut stdin)
        .map_err(|source| fail(latest)(ConfigError::Stdin { source }))?;
    // Errors are reported in the caller's version when it is one we speak.
    let version = config::sniff_version(&stdin)
        .and_then(|v| CniVersion::parse(&v))
        .map_or(latest, CniVersion::as_str);

    let var = |k: &str| std::env::var(k).ok();
    let outcome = match command {
        Command::Status => {
            let conf = NetConf::parse(&stdin).map_err(fail(version))?;
            commands::status::run(&conf).map(|()| None)
        }
        Command::Gc => {
            let conf = NetConf::parse(&stdin).map_err(fail(version))?;
            commands::gc::run(&conf).map(|()| None)
        }
        Command::Add | Command::Del | Command::Check => {
            // The spec's order (libcni's skel): the generic environment, then stdin and its
            // version, then the plugin's own CNI_ARGS.
            let env = match Env::load(command, var) {
                Err(e) if !e.is_cni_args() => return Err(fail(version)(e)),
                env => env,
            };
            let conf = NetConf::parse(&stdin).map_err(fail(version))?;
            let env = env.map_err(fail(version))?;
            tracing::info!(?command, container = %env.container_id, ifname = %env.ifname, "invoked");
            match command {
                // In a chain, our result extends the previous plugins' (spec: "Chained plugins").
                Command::Add => commands::add::run(&env, &conf)
                    .map(|r| Some(spec::chain_result(conf.prev_result.as_ref(), r.to_json(conf.cni_version)))),
                Command::Del => commands::del::run(&env, &conf).map(|()| None),
                _ => commands::check::run(&env, &conf).map(|()| None),
            }
        }
        Command::Version => Ok(Some(commands::version::run())),
    };
    outcome.map_err(fail(version))
}
