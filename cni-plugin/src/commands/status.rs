//! STATUS (spec 1.1): ready for ADDs when the agent answers and reports itself ready.

use super::CommandError;
use crate::config::NetConf;
use crate::spec::CniVersion;
use bulkhead_api::{Request, Response};

/// Runs STATUS; success prints nothing.
pub fn run(conf: &NetConf) -> Result<(), CommandError> {
    if conf.cni_version < CniVersion::V1_1_0 {
        return Err(CommandError::VersionTooOld {
            command: "STATUS",
            version: conf.cni_version.as_str(),
        });
    }
    let not_ready = |reason: String| CommandError::NotAvailable { reason };
    match bulkhead_api::call(&conf.agent_socket, &Request::Status, conf.agent_timeout) {
        Ok(Response::Status(s)) if s.ready => Ok(()),
        Ok(Response::Status(_)) => Err(not_ready("agent has not finished its first sync".into())),
        Ok(other) => Err(not_ready(format!("unexpected answer {other:?}"))),
        Err(e) => Err(not_ready(format!("agent unreachable: {e}"))),
    }
}
