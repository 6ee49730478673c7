//! The endpoint registry: every endpoint the agent admitted, persisted in its state
//! directory so a restarted agent knows them.

use std::collections::BTreeMap;
use std::path::Path;

use bulkhead_api::EndpointSpec;
use serde::{Deserialize, Serialize};

use super::AgentError;

/// A registered endpoint, as persisted in the state directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct EndpointRecord {
    pub(super) endpoint_id: u32,
    pub(super) spec: EndpointSpec,
}

/// Registered endpoints by (container id, ifname).
pub(super) type Endpoints = BTreeMap<(String, String), EndpointRecord>;

/// Reads the registry at `path`; a missing file is an empty registry.
///
/// Any other failure is an error: read as empty, the agent would program no endpoints and
/// its next save would forget every pod on the node.
pub(super) fn load_registry(path: &Path) -> Result<Endpoints, AgentError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Endpoints::new()),
        Err(source) => {
            return Err(AgentError::Registry {
                path: path.to_path_buf(),
                source: Box::new(source),
            })
        }
    };
    let records: Vec<EndpointRecord> = serde_json::from_slice(&bytes).map_err(|e| AgentError::Registry {
        path: path.to_path_buf(),
        source: Box::new(e),
    })?;
    Ok(records
        .into_iter()
        .map(|r| ((r.spec.container_id.clone(), r.spec.ifname.clone()), r))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory of its own under the system's temporary directory.
    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("bulkhead-registry-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn record(container: &str) -> EndpointRecord {
        EndpointRecord {
            endpoint_id: 1,
            spec: EndpointSpec {
                container_id: container.into(),
                ifname: "eth0".into(),
                netns: "/var/run/netns/x".into(),
                pod_namespace: "x".into(),
                pod_name: "a".into(),
                host_ifname: "bh1".into(),
                host_ifindex: 7,
                ipv4: "10.9.0.1".parse().unwrap(),
                mac: "02:00:00:00:00:01".parse().unwrap(),
                network: String::new(),
            },
        }
    }

    #[test]
    fn a_missing_registry_is_empty() {
        let dir = scratch("missing");
        assert!(load_registry(&dir.join("endpoints.json")).unwrap().is_empty());
    }

    #[test]
    fn a_registry_round_trips() {
        let dir = scratch("round");
        let path = dir.join("endpoints.json");
        std::fs::write(&path, serde_json::to_vec(&[record("c1")]).unwrap()).unwrap();
        let loaded = load_registry(&path).unwrap();
        assert_eq!(loaded.get(&("c1".into(), "eth0".into())), Some(&record("c1")));
    }

    #[test]
    fn an_unparsable_registry_is_an_error_not_empty() {
        let dir = scratch("unparsable");
        let path = dir.join("endpoints.json");
        std::fs::write(&path, b"[{\"endpoint_id\": 1,").unwrap();
        let e = load_registry(&path).unwrap_err();
        assert!(matches!(e, AgentError::Registry { .. }), "{e:?}");
        assert!(e.to_string().contains("endpoints.json"), "{e}");
    }

    #[test]
    fn an_unreadable_registry_is_an_error_not_empty() {
        let dir = scratch("unreadable");
        // A directory where the file should be: reading fails with something else than
        // "not found", whoever runs the test (root reads any file).
        let path = dir.join("endpoints.json");
        std::fs::create_dir(&path).unwrap();
        assert!(matches!(load_registry(&path), Err(AgentError::Registry { .. })));
    }
}
