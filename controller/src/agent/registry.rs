//! The endpoint registry: every endpoint the agent admitted, persisted in its state
//! directory so a restarted agent knows them.

use std::collections::BTreeMap;
use std::path::Path;

use bulkhead_api::EndpointSpec;
use serde::{Deserialize, Serialize};

/// A registered endpoint, as persisted in the state directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct EndpointRecord {
    pub(super) endpoint_id: u32,
    pub(super) spec: EndpointSpec,
}

pub(super) fn load_registry(path: &Path) -> BTreeMap<(String, String), EndpointRecord> {
    let records: Vec<EndpointRecord> = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable endpoint registry");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    };
    records
        .into_iter()
        .map(|r| ((r.spec.container_id.clone(), r.spec.ifname.clone()), r))
        .collect()
}
