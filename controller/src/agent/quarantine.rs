//! Quarantine: pods isolated in the datapath ahead of conntrack and policy, by request
//! (`bulkhead quarantine`, the automatic response; persisted in the state dir) or by the
//! label [`LABEL`] in the model.
//!
//! What the maps must hold follows from the set: every quarantined pod's address in
//! `bh_quar_v1` (every node drops its own pods' traffic to and from it) and, on the pod's own
//! node, [`endpoint_flags::QUARANTINED`] in its endpoint entry. The agent lays both on top of
//! the compiler's state ([`Quarantine::overlay`], [`Quarantine::overlay_delta`]), as it does
//! with the node's HOST addresses: the compiler stays pure and unaware of it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use bulkhead_api::{NamespacedName, QuarantineInfo};
use bulkhead_common::endpoint_flags;

use crate::datapath::state::DatapathDelta;
use crate::datapath::DatapathState;
use crate::model::{Cluster, Kind, ObjectRef, PodInfo};

use super::registry::Endpoints;
use super::AgentError;

/// The pod label that quarantines a pod while its value is `"true"`.
pub const LABEL: &str = "bulkhead.io/quarantine";
/// The file under the state dir that holds the requested quarantines.
pub(super) const FILE: &str = "quarantine.json";

/// Who set a quarantine ([`QuarantineInfo::by`]).
pub(super) mod by {
    /// `bulkhead quarantine`.
    pub const COMMAND: &str = "command";
    /// The pod's label.
    pub const LABEL: &str = "label";
    /// The automatic response (a request whose reason starts with `auto:`).
    pub const AUTO: &str = "auto";
}

/// The agent's quarantine state.
#[derive(Debug)]
pub(super) struct Quarantine {
    /// Quarantines by request, as persisted in `path`.
    requested: BTreeMap<NamespacedName, QuarantineInfo>,
    /// Pods the model labels quarantined, with when the agent first saw the label.
    labelled: BTreeMap<NamespacedName, QuarantineInfo>,
    /// Where `requested` persists.
    path: PathBuf,
    /// A quarantined pod still exchanges packets with its own node.
    allow_node: bool,
}

impl Quarantine {
    /// Reads the persisted requests from `state_dir`; a missing file is none. A file that
    /// exists but cannot be read or parsed is an error: taking it as empty would release
    /// every quarantined pod.
    pub(super) fn load(state_dir: &Path, allow_node: bool) -> Result<Self, AgentError> {
        let path = state_dir.join(FILE);
        let requested = match std::fs::read(&path) {
            Ok(bytes) => {
                let by_text: BTreeMap<String, QuarantineInfo> = serde_json::from_slice(&bytes).map_err(|e| AgentError::Quarantine {
                    path: path.clone(),
                    source: Box::new(e),
                })?;
                let mut requested = BTreeMap::new();
                for (text, info) in by_text {
                    let pod: NamespacedName = text.parse().map_err(|e| AgentError::Quarantine {
                        path: path.clone(),
                        source: Box::new(e),
                    })?;
                    requested.insert(pod, info);
                }
                requested
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(AgentError::Quarantine { path, source: Box::new(e) }),
        };
        Ok(Quarantine {
            requested,
            labelled: BTreeMap::new(),
            path,
            allow_node,
        })
    }

    /// Quarantines `pod` by request, persisted before it is answered. A pod quarantined
    /// already keeps its `since`, and takes the new reason. When the file cannot be written
    /// the pod stays quarantined in memory (and so in the maps): a failure never releases.
    pub(super) fn request(&mut self, pod: NamespacedName, reason: Option<String>, now: jiff::Timestamp) -> Result<(), AgentError> {
        let reason = reason.unwrap_or_default();
        let by = if reason.starts_with("auto:") { by::AUTO } else { by::COMMAND };
        let since = self.requested.get(&pod).map_or(now, |q| q.since);
        self.requested.insert(
            pod,
            QuarantineInfo {
                since,
                reason,
                by: by.to_string(),
            },
        );
        self.save()
    }

    /// Lifts `pod`'s requested quarantine; when the file cannot be written it stays
    /// quarantined (in memory, and so in the maps) and the error is returned.
    pub(super) fn release(&mut self, pod: &NamespacedName) -> Result<(), AgentError> {
        let Some(info) = self.requested.remove(pod) else {
            return Ok(());
        };
        if let Err(e) = self.save() {
            self.requested.insert(pod.clone(), info);
            return Err(e);
        }
        Ok(())
    }

    fn save(&self) -> Result<(), AgentError> {
        let by_text: BTreeMap<String, &QuarantineInfo> = self.requested.iter().map(|(p, q)| (p.to_string(), q)).collect();
        let text = serde_json::to_vec_pretty(&by_text).map_err(|e| AgentError::Quarantine {
            path: self.path.clone(),
            source: Box::new(e),
        })?;
        bulkhead_hostnet::fs::write_atomic(&self.path, &text, 0o600)?;
        Ok(())
    }

    /// Takes the model's labels: a pod labelled [`LABEL`]`: "true"` is quarantined (since the
    /// first time this agent saw it so), one that lost the label no longer by label. With
    /// `touched` only those objects are looked at (an incremental reprogram: every model
    /// change is in it); without, every pod (a full sync).
    pub(super) fn note_labels(&mut self, cluster: &Cluster, touched: Option<&[ObjectRef]>, now: jiff::Timestamp) {
        let labelled = |pod: &PodInfo| pod.labels.get(LABEL).map(String::as_str) == Some("true");
        let fresh = || QuarantineInfo {
            since: now,
            reason: format!("label {LABEL}=true"),
            by: by::LABEL.to_string(),
        };
        match touched {
            None => {
                let mut all = BTreeMap::new();
                for pod in cluster.pods().values().filter(|p| labelled(p)) {
                    let name = NamespacedName::new(pod.namespace.clone(), pod.name.clone());
                    let info = self.labelled.remove(&name).unwrap_or_else(fresh);
                    all.insert(name, info);
                }
                self.labelled = all;
            }
            Some(touched) => {
                for r in touched.iter().filter(|r| r.kind == Kind::Pod) {
                    let name = NamespacedName::new(r.namespace.clone().unwrap_or_default(), r.name.clone());
                    match cluster.pod(&name.namespace, &name.name).is_some_and(labelled) {
                        true => {
                            self.labelled.entry(name).or_insert_with(fresh);
                        }
                        false => {
                            self.labelled.remove(&name);
                        }
                    }
                }
            }
        }
    }

    /// Whether `pod` is quarantined by its label.
    pub(super) fn by_label(&self, pod: &NamespacedName) -> bool {
        self.labelled.contains_key(pod)
    }

    /// Every quarantined pod: the requests, then the labelled pods not requested.
    pub(super) fn effective(&self) -> BTreeMap<NamespacedName, QuarantineInfo> {
        let mut all = self.labelled.clone();
        all.extend(self.requested.iter().map(|(p, q)| (p.clone(), q.clone())));
        all
    }

    fn contains(&self, pod: &NamespacedName) -> bool {
        self.requested.contains_key(pod) || self.labelled.contains_key(pod)
    }

    /// The flags a quarantined local endpoint gets on top of its compiled ones.
    fn flags(&self) -> u32 {
        endpoint_flags::QUARANTINED
            | if self.allow_node {
                endpoint_flags::QUARANTINE_ALLOW_HOST
            } else {
                0
            }
    }

    /// The quarantine bits of each local endpoint, by host ifindex (only quarantined ones).
    fn endpoint_flags(&self, endpoints: &Endpoints) -> BTreeMap<u32, u32> {
        endpoints
            .values()
            .filter(|r| self.contains(&NamespacedName::new(r.spec.pod_namespace.clone(), r.spec.pod_name.clone())))
            .map(|r| (r.spec.host_ifindex, self.flags()))
            .collect()
    }

    /// The quarantined addresses: of every quarantined pod the model knows an address for,
    /// and of every quarantined local endpoint (its address is known before the model's).
    fn addresses(&self, cluster: &Cluster, endpoints: &Endpoints) -> BTreeMap<Ipv4Addr, u32> {
        let mut out = BTreeMap::new();
        for pod in self.requested.keys().chain(self.labelled.keys()) {
            if let Some(ip) = cluster.pod(&pod.namespace, &pod.name).and_then(|p| p.ipv4) {
                out.insert(ip, 0);
            }
        }
        for r in endpoints.values() {
            if self.contains(&NamespacedName::new(r.spec.pod_namespace.clone(), r.spec.pod_name.clone())) {
                out.insert(r.spec.ipv4, 0);
            }
        }
        out
    }

    /// Lays the quarantine on a whole state (the compiler's, about to be written in full).
    pub(super) fn overlay(&self, state: &mut DatapathState, cluster: &Cluster, endpoints: &Endpoints) {
        for (ifindex, bits) in self.endpoint_flags(endpoints) {
            if let Some(ep) = state.endpoints.get_mut(&ifindex) {
                ep.flags |= bits;
            }
        }
        state.quarantine = self.addresses(cluster, endpoints);
        state.quarantine_count = u32::try_from(state.quarantine.len()).unwrap_or(u32::MAX);
    }

    /// Turns a compiler delta into one against `applied` with the quarantine on top: every
    /// compiled endpoint whose entry in the maps differs from its compiled entry plus its
    /// quarantine bits is (re)written, entries already right are left out, and the address
    /// map and its count are diffed against `applied`. O(local endpoints + quarantined pods).
    pub(super) fn overlay_delta(
        &self,
        mut delta: DatapathDelta,
        compiled: &DatapathState,
        applied: &DatapathState,
        cluster: &Cluster,
        endpoints: &Endpoints,
    ) -> DatapathDelta {
        let bits = self.endpoint_flags(endpoints);
        for (ifindex, ep) in &compiled.endpoints {
            let mut want = *ep;
            want.flags |= bits.get(ifindex).copied().unwrap_or(0);
            if applied.endpoints.get(ifindex) == Some(&want) {
                delta.endpoints.remove(ifindex);
            } else {
                delta.endpoints.insert(*ifindex, Some(want));
            }
        }
        let mut wanted = DatapathState {
            quarantine: self.addresses(cluster, endpoints),
            ..DatapathState::default()
        };
        wanted.quarantine_count = u32::try_from(wanted.quarantine.len()).unwrap_or(u32::MAX);
        let q = DatapathDelta::between_quarantine(applied, &wanted);
        delta.quarantine = q.quarantine;
        delta.quarantine_count = q.quarantine_count;
        delta
    }
}
