//! VERSION: the spec versions this plugin speaks.

use serde_json::Value;

use crate::spec;

/// Runs VERSION; needs no environment beyond `CNI_COMMAND` and ignores stdin.
pub fn run() -> Value {
    spec::version_result()
}
