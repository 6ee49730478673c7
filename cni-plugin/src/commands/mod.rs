//! The CNI verbs, one module each, and the error type that carries their CNI codes.

pub mod add;
pub mod check;
pub mod del;
pub mod gc;
pub mod status;
pub mod version;

use std::error::Error as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::ConfigError;
use crate::ipam::IpamError;
use crate::spec::code;
use bulkhead_api::{ApiError, Request, Response};
use bulkhead_hostnet::netlink::NetlinkError;

/// Where ADD may be killed in tests: after each step that leaves something behind.
pub const ADD_STEPS: [&str; 5] = ["ipam", "veth", "pod", "agent", "host"];

/// Debug builds only: `BULKHEAD_CNI_KILL_AT=<step>` makes the plugin SIGKILL itself after
/// that step of ADD ([`ADD_STEPS`]), as a runtime's timeout or the OOM killer would, so tests
/// prove a later DEL or GC cleans up from any point. Release builds compile it out.
pub fn kill_point(step: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("BULKHEAD_CNI_KILL_AT").as_deref() == Ok(step) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    }
    #[cfg(not(debug_assertions))]
    let _ = step;
}

/// Why a verb failed; every variant knows its CNI error code.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Bad environment or configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// IPAM failed.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// Netlink or namespace work failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The agent could not be reached (not running yet, or too slow).
    #[error("agent unreachable at {socket}")]
    AgentUnreachable {
        /// The agent socket.
        socket: PathBuf,
        /// Cause.
        #[source]
        source: ApiError,
    },
    /// The agent answered something we cannot use.
    #[error("agent at {socket} answered badly")]
    AgentProtocol {
        /// The agent socket.
        socket: PathBuf,
        /// Cause.
        #[source]
        source: ApiError,
    },
    /// The agent refused the request.
    #[error("agent refused {op}: {message}")]
    AgentRejected {
        /// The request.
        op: &'static str,
        /// The agent's code (11 passes through; others become 102).
        code: u32,
        /// The agent's message.
        message: String,
    },
    /// CHECK found the attachment differs from what ADD left.
    #[error("check failed: {what}")]
    CheckFailed {
        /// What differs.
        what: String,
    },
    /// The verb is not implemented for this version.
    #[error("{command} is not supported {reason}")]
    Unsupported {
        /// The verb.
        command: &'static str,
        /// Why.
        reason: String,
    },
    /// STATUS: the plugin cannot take ADDs now.
    #[error("plugin not available: {reason}")]
    NotAvailable {
        /// Why.
        reason: String,
    },
    /// The verb does not exist in the requested spec version.
    #[error("{command} is not defined for cniVersion {version}")]
    VersionTooOld {
        /// The verb.
        command: &'static str,
        /// The configuration's version.
        version: &'static str,
    },
    /// Several independent steps failed (DEL keeps going and reports all of them).
    #[error("{} steps failed: {}", .0.len(), .0.iter().map(|e| e.describe()).collect::<Vec<_>>().join("; "))]
    Multiple(Vec<CommandError>),
}

impl CommandError {
    /// The CNI error code.
    pub fn code(&self) -> u32 {
        match self {
            Self::Config(e) => e.code(),
            Self::Ipam(e) => e.code(),
            Self::Netlink(_) => code::NETLINK,
            Self::AgentUnreachable { .. } => code::TRY_AGAIN_LATER,
            Self::AgentProtocol { .. } => code::AGENT_REJECTED,
            Self::AgentRejected { code: c, .. } if *c == code::TRY_AGAIN_LATER => code::TRY_AGAIN_LATER,
            Self::AgentRejected { .. } => code::AGENT_REJECTED,
            Self::CheckFailed { .. } => code::CHECK_FAILED,
            Self::Unsupported { .. } => code::INVALID_ENVIRONMENT,
            Self::NotAvailable { .. } => code::PLUGIN_NOT_AVAILABLE,
            Self::VersionTooOld { .. } => code::INCOMPATIBLE_VERSION,
            Self::Multiple(errors) => errors.first().map_or(code::NETLINK, Self::code),
        }
    }

    /// The message and its whole cause chain, for the error JSON's `details` and logs.
    pub fn describe(&self) -> String {
        let mut out = self.to_string();
        let mut source = self.source();
        while let Some(s) = source {
            let text = s.to_string();
            // `transparent` variants repeat their inner message: print it once.
            if !out.ends_with(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            source = s.source();
        }
        out
    }
}

/// Sends `request` to the agent; maps transport failures and refusals to CNI codes.
pub(crate) fn call_agent(socket: &Path, request: &Request, op: &'static str, timeout: Duration) -> Result<(), CommandError> {
    match bulkhead_api::call(socket, request, timeout) {
        Ok(Response::Ok) => Ok(()),
        Ok(Response::Error { code, message }) => Err(CommandError::AgentRejected { op, code, message }),
        Ok(other) => Err(CommandError::AgentRejected {
            op,
            code: code::AGENT_REJECTED,
            message: format!("unexpected answer {other:?}"),
        }),
        Err(source @ (ApiError::Connect { .. } | ApiError::Io { .. })) => Err(CommandError::AgentUnreachable {
            socket: socket.to_path_buf(),
            source,
        }),
        Err(source @ ApiError::Decode { .. }) => Err(CommandError::AgentProtocol {
            socket: socket.to_path_buf(),
            source,
        }),
    }
}

/// One registered undo action.
type Undo = Box<dyn FnOnce() -> Result<(), CommandError>>;

/// A stack of undo actions for ADD: unwound in reverse unless disarmed.
///
/// Unwinding runs on drop, so an early return through `?` undoes everything done so far.
#[derive(Default)]
pub struct Rollback {
    steps: Vec<(&'static str, Undo)>,
}

impl Rollback {
    /// Registers the undo of a step that just succeeded.
    pub fn push(&mut self, what: &'static str, undo: impl FnOnce() -> Result<(), CommandError> + 'static) {
        self.steps.push((what, Box::new(undo)));
    }

    /// Keeps everything: the command succeeded.
    pub fn disarm(mut self) {
        self.steps.clear();
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        while let Some((what, undo)) = self.steps.pop() {
            match undo() {
                Ok(()) => tracing::debug!(step = what, "rolled back"),
                // Nothing more we can do; DEL (which the runtime calls next) retries the cleanup.
                Err(e) => tracing::error!(step = what, error = %e.describe(), "rollback failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn rollback_unwinds_in_reverse_unless_disarmed() {
        let log = Rc::new(RefCell::new(Vec::new()));
        {
            let mut r = Rollback::default();
            for i in 0..3 {
                let log = log.clone();
                r.push("step", move || {
                    log.borrow_mut().push(i);
                    Ok(())
                });
            }
        }
        assert_eq!(*log.borrow(), vec![2, 1, 0]);
        let mut r = Rollback::default();
        let l = log.clone();
        r.push("step", move || {
            l.borrow_mut().push(9);
            Ok(())
        });
        r.disarm();
        assert_eq!(log.borrow().len(), 3);
    }

    #[test]
    fn agent_codes_map_to_cni_codes() {
        let rejected = |c| {
            CommandError::AgentRejected {
                op: "add",
                code: c,
                message: "x".into(),
            }
            .code()
        };
        assert_eq!(rejected(11), 11);
        assert_eq!(rejected(7), 102);
        assert_eq!(rejected(150), 102);
        let missing = call_agent(
            Path::new("/nonexistent/bh.sock"),
            &Request::Status,
            "status",
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert_eq!(missing.code(), 11);
    }
}
