//! Where the agents' flow ports are: `--agent` flags, the lab's state, or the DaemonSet's
//! pods through the Kubernetes API (hostNetwork: a pod's IP is its node's).

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};

use crate::lab::LabPaths;

/// How the relay finds agents.
pub enum Discovery {
    /// Fixed `(node, HOST:PORT)` pairs.
    Static(Vec<(String, String)>),
    /// The nodes of a lab, from its `lab.json`.
    Lab(LabPaths),
    /// The agent pods in a namespace.
    Kubernetes {
        /// API client.
        client: kube::Client,
        /// The agents' namespace.
        namespace: String,
        /// Their label selector.
        selector: String,
        /// Their flow port.
        port: u16,
    },
}

/// Parses `NODE=HOST:PORT` flags.
pub fn parse_agents(flags: &[String]) -> Result<Vec<(String, String)>, String> {
    flags
        .iter()
        .map(|f| match f.split_once('=') {
            Some((node, addr))
                if !node.is_empty()
                    && addr
                        .parse::<bulkhead_api::RelayAddr>()
                        .is_ok_and(|a| matches!(a, bulkhead_api::RelayAddr::Tcp(_))) =>
            {
                Ok((node.to_string(), addr.to_string()))
            }
            _ => Err(format!("--agent {f:?} is not NODE=HOST:PORT")),
        })
        .collect()
}

/// `(node, address)` of every running agent pod with an IP, sorted by node.
pub fn from_pods(pods: &[Pod], port: u16) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let node = p.spec.as_ref()?.node_name.clone()?;
            let status = p.status.as_ref()?;
            if status.phase.as_deref() != Some("Running") {
                return None;
            }
            let ip: std::net::IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
            Some((node, std::net::SocketAddr::new(ip, port).to_string()))
        })
        .collect();
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

/// The label that quarantines a pod (every agent watches it).
pub const QUARANTINE_LABEL: &str = "bulkhead.io/quarantine";
/// The annotation the automatic response leaves with its reason.
pub const QUARANTINE_REASON_ANNOTATION: &str = "bulkhead.io/quarantine-reason";

/// The merge patch that quarantines a pod: the label, and the reason as an annotation.
pub fn quarantine_patch(reason: &str) -> serde_json::Value {
    // An annotation value may be long, but a reason is for people: keep it readable.
    let reason: String = reason.chars().take(1024).collect();
    serde_json::json!({
        "metadata": {
            "labels": { QUARANTINE_LABEL: "true" },
            "annotations": { QUARANTINE_REASON_ANNOTATION: reason },
        }
    })
}

impl Discovery {
    /// Whether the agents are found through the Kubernetes API (quarantine by label).
    pub fn is_kubernetes(&self) -> bool {
        matches!(self, Discovery::Kubernetes { .. })
    }

    /// Labels `pod` for quarantine through the Kubernetes API (needs `patch` on pods in
    /// its namespace); an error for any other discovery.
    pub async fn quarantine_by_label(&self, pod: &bulkhead_api::NamespacedName, reason: &str) -> Result<(), String> {
        let Discovery::Kubernetes { client, .. } = self else {
            return Err("not a Kubernetes relay".into());
        };
        let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
        api.patch(&pod.name, &PatchParams::default(), &Patch::Merge(quarantine_patch(reason)))
            .await
            .map(|_| ())
            .map_err(|e| format!("patch pod {pod}: {e}"))
    }

    /// The agents' API sockets the relay can reach, `(node, socket)`: the lab's (on this
    /// machine's filesystem, whatever namespace the relay runs in). `--agent` flags and
    /// Kubernetes give only flow ports: there the automatic response cannot reach agents
    /// (the pod label `bulkhead.io/quarantine` is Kubernetes' path).
    pub async fn agent_apis(&self) -> Vec<(String, std::path::PathBuf)> {
        match self {
            Discovery::Lab(paths) => match paths.load() {
                Ok(Some(state)) => state.nodes.iter().map(|n| (n.name.clone(), paths.agent_socket(&n.name))).collect(),
                Ok(None) => Vec::new(),
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "reading the lab state for the agents' sockets");
                    Vec::new()
                }
            },
            Discovery::Static(_) | Discovery::Kubernetes { .. } => Vec::new(),
        }
    }

    /// The agents now.
    pub async fn targets(&self) -> Result<Vec<(String, String)>, String> {
        match self {
            Discovery::Static(t) => Ok(t.clone()),
            Discovery::Lab(paths) => {
                let state = paths.load().map_err(|e| crate::error_chain(&e))?;
                Ok(state
                    .map(|s| {
                        s.nodes
                            .iter()
                            .filter_map(|n| Some((n.name.clone(), n.flow_address.clone()?)))
                            .collect()
                    })
                    .unwrap_or_default())
            }
            Discovery::Kubernetes {
                client,
                namespace,
                selector,
                port,
            } => {
                let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
                let list = api
                    .list(&ListParams::default().labels(selector))
                    .await
                    .map_err(|e| format!("list pods in {namespace} ({selector}): {e}"))?;
                Ok(from_pods(&list.items, *port))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quarantine_patch_sets_the_label_and_the_reason() {
        let patch = quarantine_patch("auto: scan: shop/frontend-1 reached 40 distinct peer ports");
        assert_eq!(patch["metadata"]["labels"]["bulkhead.io/quarantine"], "true");
        assert_eq!(
            patch["metadata"]["annotations"]["bulkhead.io/quarantine-reason"],
            "auto: scan: shop/frontend-1 reached 40 distinct peer ports"
        );
        let long = quarantine_patch(&"x".repeat(5000));
        assert_eq!(
            long["metadata"]["annotations"]["bulkhead.io/quarantine-reason"]
                .as_str()
                .unwrap()
                .len(),
            1024
        );
    }

    /// A recorded `GET /api/v1/namespaces/bulkhead-system/pods?labelSelector=…` during a
    /// rollout: two running agents, node-c's old one terminating and its new one pending,
    /// one not scheduled yet.
    #[test]
    fn a_recorded_pod_list_gives_the_running_agents_by_node() {
        let text = include_str!("../../tests/kube-recorded/agent-pods-list.json");
        let list: k8s_openapi::List<Pod> = serde_json::from_str(text).expect("a PodList");
        assert_eq!(
            from_pods(&list.items, 4244),
            [
                ("node-a".to_string(), "192.168.0.11:4244".to_string()),
                ("node-b".to_string(), "192.168.0.12:4244".to_string()),
            ]
        );
    }
}
