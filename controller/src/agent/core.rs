//! The agent's state and what it does on each event: reprogram, add, delete, check, GC.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bulkhead_api::{AgentStatus, EndpointRef, EndpointSpec, NamespacedName, QuarantineInfo, Response};
use tokio::sync::oneshot;

use crate::datapath::state::DatapathDelta;
use crate::datapath::sync::{self};
use crate::datapath::DatapathState;
use crate::flows::{FlowStore, PodIndex, Resolver};
use crate::metrics::{ErrorKind, Metrics};
use crate::model::{Cluster, ObjectRef};
use crate::policy::{Compiler, LocalEndpoint};
use crate::source::kubernetes::{self as kube_source};
use crate::source::{Source, SourceUpdate};
use bulkhead_common::IpcacheValue;

use super::host::{Dataplane, HostLinks, RegistryStore};
use super::network::Network;
use super::quarantine::{self, Quarantine};
use super::registry::{EndpointRecord, Endpoints};
use super::services::Services;
use super::AgentError;
use crate::error_chain;
use bulkhead_api::code;

/// Endpoint ids past the highest in use that keep an empty conntrack table ready, so that
/// the next ADDs store none (`refill_conntrack_reserve`); 8 tables are about 6 MB of kernel
/// memory.
pub(super) const CONNTRACK_RESERVE: u32 = 8;

/// The agent's state; one thread owns it all, so map syncs never interleave.
pub(super) struct Agent {
    pub(super) node_name: String,
    pub(super) source: Box<dyn Source>,
    pub(super) cluster: Cluster,
    /// The objects of `cluster` that changed since the maps were last programmed, for an
    /// incremental compile (cleared by every successful reprogram).
    pub(super) touched: BTreeSet<ObjectRef>,
    /// `applied` may differ from the compiler's last state plus this agent's additions (at
    /// start, the pinned maps; after a failed write, what was read back): the next sync diffs
    /// all of it instead of writing the compiler's delta.
    pub(super) full_sync: bool,
    /// The node addresses `applied` gives the HOST identity.
    pub(super) hosts_applied: Vec<Ipv4Addr>,
    /// ADDs admitted (programs attached, endpoint registered) and not yet programmed into
    /// the maps: [`Agent::commit_adds`] answers them.
    pub(super) admitted: Vec<Admitted>,
    pub(super) compiler: Compiler,
    pub(super) endpoints: Endpoints,
    /// What the maps hold, as far as the agent knows.
    pub(super) applied: DatapathState,
    pub(super) datapath: Box<dyn Dataplane>,
    /// Host veths and addresses.
    pub(super) links: Box<dyn HostLinks>,
    /// Where the endpoint registry persists.
    pub(super) store: Box<dyn RegistryStore>,
    pub(super) generation: u64,
    /// The state directory, where the pod CIDR is published.
    pub(super) state_dir: PathBuf,
    pub(super) metrics: Arc<Metrics>,
    /// This node's own addresses, given the reserved HOST identity.
    pub(super) host_addresses: Vec<Ipv4Addr>,
    /// Flow history; its resolver is refreshed after every reprogram.
    pub(super) flows: Arc<FlowStore>,
    /// The model's pods by address for that resolver, updated from what each change touched.
    pub(super) pod_index: PodIndex,
    /// The source synced and its model reached the maps at least once.
    pub(super) ready: bool,
    /// A change seen (when) that is not in the maps yet: before the first sync, or after a
    /// failed map write.
    pub(super) pending: Option<Instant>,
    /// A map write failed and the maps could not be read back: `applied` is not trusted, the
    /// next reprogram reads them first.
    pub(super) maps_unknown: bool,
    /// The source's last error, logged once until it clears.
    pub(super) last_source_error: Option<String>,
    /// Source failures already counted in the error metric.
    pub(super) source_failures: u64,
    /// Slow ticks so far.
    pub(super) ticks: u32,
    /// The pod CIDR last published for the CNI plugin.
    pub(super) pod_cidr: Option<ipnetwork::Ipv4Network>,
    /// The operator set the pod CIDR; the Node's is not published over it.
    pub(super) pod_cidr_pinned: bool,
    /// Routes to other nodes and masquerade.
    pub(super) network: Network,
    /// The pod MTU last published for the CNI plugin (`Some(None)`: the file removed);
    /// `None` until the first publication, which also clears a previous agent's file.
    pub(super) pod_mtu_published: Option<Option<u32>>,
    /// ClusterIP translation: the service maps' ids and the switch.
    pub(super) services: Services,
    /// The over-cap policies last logged (each is logged when it appears, not on every compile).
    pub(super) over_cap_logged: Vec<crate::policy::OverCap>,
    /// This agent's programs are attached to every registered endpoint's veth. False at
    /// start: a previous agent's (perhaps older) programs are there until the first sync has
    /// filled this agent's maps, then each is replaced in place.
    pub(super) programs_replaced: bool,
    /// Quarantined pods, by request and by label, laid on top of the compiled state.
    pub(super) quarantine: Quarantine,
}

impl Agent {
    pub(super) fn locals(&self) -> Vec<LocalEndpoint> {
        self.endpoints
            .values()
            .map(|r| LocalEndpoint {
                endpoint_id: r.endpoint_id,
                host_ifindex: r.spec.host_ifindex,
                namespace: r.spec.pod_namespace.clone(),
                pod: r.spec.pod_name.clone(),
                ipv4: r.spec.ipv4,
                mac: r.spec.mac.into_array(),
            })
            .collect()
    }

    /// Recompiles and writes the difference into the maps; `seen` is when the agent learnt
    /// of the change, for the implementation delay histogram.
    pub(super) fn reprogram(&mut self, seen: Option<Instant>) -> Result<(), AgentError> {
        if !self.ready {
            // Until the source's first sync the model is empty: compiling it would wipe the
            // last known state from the pinned maps. The first synced refresh catches up.
            self.pending = self.pending.or(seen).or_else(|| Some(Instant::now()));
            return Ok(());
        }
        if self.maps_unknown {
            // A write failed and the maps could not be read back: no diff against a guess.
            match self.datapath.read_state() {
                Ok(held) => {
                    self.applied = held;
                    self.maps_unknown = false;
                }
                Err(e) => {
                    self.pending = self.pending.or(seen).or_else(|| Some(Instant::now()));
                    return Err(e.into());
                }
            }
        }
        let started = Instant::now();
        let locals = self.locals();
        // The compiler consumes what changed: from here its state follows the model, whether
        // or not the maps take the result (a failed write makes the next sync a full one).
        let touched: Vec<ObjectRef> = std::mem::take(&mut self.touched).into_iter().collect();
        let delta = self.compiler.update(&self.cluster, &touched, &locals);
        self.pod_index.update(&self.cluster, &touched);
        self.report_over_cap();
        let scope = (!self.full_sync).then_some(touched.as_slice());
        self.quarantine.note_labels(&self.cluster, scope, jiff::Timestamp::now());
        let mut services = DatapathState::default();
        self.services.add_to(&self.cluster, &mut services, &self.metrics);
        let written = match self.full_sync {
            // After a start or a failed write `applied` is what the maps hold, which the
            // compiler's last state need not be: diff the whole of it.
            true => {
                let mut new = self.compiler.state().clone();
                add_host_addresses(&mut new, &self.host_addresses);
                self.quarantine.overlay(&mut new, &self.cluster, &self.endpoints);
                new.services = services.services;
                new.backends = services.backends;
                new.rev_nat = services.rev_nat;
                sync::sync(&mut *self.datapath, &self.applied, &new).map(|stats| (stats, Written::Full(Box::new(new))))
            }
            false => {
                let delta = self.with_host_addresses(delta);
                let delta = self
                    .quarantine
                    .overlay_delta(delta, self.compiler.state(), &self.applied, &self.cluster, &self.endpoints);
                sync::sync_delta(&mut *self.datapath, &delta)
                    .and_then(|a| sync::sync_services(&mut *self.datapath, &self.applied, &services).map(|b| a + b))
                    .map(|stats| (stats, Written::Delta(delta, Box::new(services))))
            }
        };
        match written {
            Ok((stats, written)) => {
                match written {
                    Written::Full(new) => self.applied = *new,
                    Written::Delta(delta, services) => {
                        delta.apply_to(&mut self.applied);
                        self.applied.services = services.services;
                        self.applied.backends = services.backends;
                        self.applied.rev_nat = services.rev_nat;
                    }
                }
                self.metrics.set_degraded(None);
                self.full_sync = false;
                self.hosts_applied.clone_from(&self.host_addresses);
                self.generation += 1;
                self.pending = None;
                if !self.programs_replaced {
                    self.replace_programs();
                }
                self.flows.set_resolver(
                    Resolver::build_with(&self.node_name, &self.pod_index, &self.cluster, self.compiler.rules(), &locals)
                        .with_services(self.services.table(), &self.services.ids()),
                );
                self.sync_forensic_quarantine();
                self.metrics.set_state(
                    self.endpoints.len(),
                    self.compiler.identities().len(),
                    self.cluster.policies().len(),
                    &self.applied,
                );
                self.metrics.set_quarantined_pods(self.quarantine.effective().len());
                if let Some(seen) = seen {
                    self.metrics.observe_implementation_delay(seen.elapsed());
                }
                if self.ready {
                    // `/healthz` turns 200 with the first synced model in the maps (the
                    // Kubernetes source gets there after start, when it signals its first sync).
                    self.metrics.set_ready();
                }
                tracing::debug!(upserts = stats.upserts, removals = stats.removals, elapsed = ?started.elapsed(), "maps programmed");
                Ok(())
            }
            Err(e) => {
                self.metrics.set_degraded(Some(error_chain(&e)));
                self.full_sync = true;
                // Retried by the next refresh, from when the change was first seen.
                self.pending = self.pending.or(seen).or_else(|| Some(Instant::now()));
                // Some writes happened: only the maps know which, so the next sync starts
                // from what they hold.
                match self.datapath.read_state() {
                    Ok(held) => self.applied = held,
                    Err(read) => {
                        tracing::warn!(error = %error_chain(&read), "cannot read the maps back after a failed write");
                        self.maps_unknown = true;
                    }
                }
                Err(e.into())
            }
        }
    }

    /// Turns the compiler's delta into one against `applied`, which also holds this node's
    /// addresses with the HOST identity ([`add_host_addresses`]: a compiled entry wins):
    /// every ipcache key the delta or a node address (current or last written) names gets
    /// the value the maps must hold, and keys already holding it are dropped.
    fn with_host_addresses(&self, mut delta: DatapathDelta) -> DatapathDelta {
        let compiled = &self.compiler.state().ipcache;
        let host = IpcacheValue {
            identity: bulkhead_common::identity::HOST,
            flags: 0,
        };
        let keys: BTreeSet<(Ipv4Addr, u8)> = delta
            .ipcache
            .keys()
            .copied()
            .chain(self.host_addresses.iter().chain(&self.hosts_applied).map(|&a| (a, 32)))
            .collect();
        for key in keys {
            let want = compiled
                .get(&key)
                .copied()
                .or_else(|| (key.1 == 32 && self.host_addresses.contains(&key.0)).then_some(host));
            if self.applied.ipcache.get(&key) == want.as_ref() {
                delta.ipcache.remove(&key);
            } else {
                delta.ipcache.insert(key, want);
            }
        }
        delta
    }

    /// Puts this agent's programs on every registered endpoint's veth, replacing what a
    /// previous agent attached (an upgrade's new programs read the maps just written). A veth
    /// that fails keeps the previous programs, which still enforce; it is logged, counted and
    /// retried after the next sync.
    fn replace_programs(&mut self) {
        let names: Vec<String> = self.endpoints.values().map(|r| r.spec.host_ifname.clone()).collect();
        let mut failed = 0usize;
        for name in &names {
            if let Err(e) = self.datapath.attach(name) {
                failed += 1;
                self.metrics.error(ErrorKind::Datapath);
                tracing::warn!(veth = %name, error = %error_chain(&e), "cannot replace the programs on a veth; the previous ones keep enforcing");
            }
        }
        tracing::info!(
            veths = names.len(),
            failed,
            "programs of this agent attached to the registered endpoints"
        );
        self.programs_replaced = failed == 0;
    }

    /// Logs each policy the compiler left out for expanding past the cap, once, and keeps
    /// the gauge current.
    fn report_over_cap(&mut self) {
        let over = self.compiler.over_cap();
        self.metrics.set_policies_over_cap(over.len());
        if over == self.over_cap_logged.as_slice() {
            return;
        }
        for o in over.iter().filter(|o| !self.over_cap_logged.contains(o)) {
            tracing::error!(policy = %format!("{}/{}", o.namespace, o.name), entries = o.entries, cap = o.cap, "{o}");
        }
        self.over_cap_logged = over.to_vec();
    }

    /// Re-reads the source and this node's addresses; on a change, reprograms.
    pub(super) fn refresh(&mut self, force: bool) -> Result<(), AgentError> {
        let polled = self.source.poll(force);
        let polled = match polled {
            Ok(Some(update)) => {
                let changed = self.update_model(update);
                // The first synced model is written even when empty: until then the maps hold
                // what the previous agent left, which is the last known state.
                let first = !self.ready && self.source.synced();
                if first || changed {
                    self.pending.get_or_insert_with(Instant::now);
                }
                self.ready |= self.source.synced();
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        // A change seen earlier whose sync failed is retried here too, with the last good
        // model even when the source fails now.
        if let Some(seen) = self.pending {
            self.reprogram(Some(seen))?;
        }
        self.publish_pod_cidr();
        self.sync_network();
        polled.map_err(Into::into)
    }

    /// Takes a source's update into the model in place, noting what it touched; true when
    /// the model changed.
    fn update_model(&mut self, update: SourceUpdate) -> bool {
        let deleted = self.deleted_pods(&update);
        let changed = self.apply_update(update);
        self.keep_deleted(deleted);
        changed
    }

    /// The records (labels, address, node, policies) of the pods `update` deletes that the
    /// forensic store keeps (see [`FlowStore::pods_to_keep`]; this node's own pods always),
    /// taken from the model before it applies.
    fn deleted_pods(&self, update: &SourceUpdate) -> Vec<bulkhead_api::ForensicsBundle> {
        if self.flows.forensics().is_none() {
            return Vec::new();
        }
        let gone: BTreeSet<bulkhead_api::NamespacedName> = match update {
            SourceUpdate::Snapshot(new) => self
                .cluster
                .pods()
                .keys()
                .filter(|(ns, name)| new.pod(ns, name).is_none())
                .map(|(ns, name)| bulkhead_api::NamespacedName::new(ns.clone(), name.clone()))
                .collect(),
            SourceUpdate::Changes(changes) => changes
                .iter()
                .filter_map(|c| match c {
                    crate::model::Change::Delete(r) if r.kind == crate::model::Kind::Pod => {
                        let ns = r.namespace.as_deref().unwrap_or(crate::model::DEFAULT_NAMESPACE);
                        Some(bulkhead_api::NamespacedName::new(ns, r.name.clone()))
                    }
                    _ => None,
                })
                .collect(),
        };
        let mut keep = self.flows.pods_to_keep(&gone);
        keep.extend(gone.into_iter().filter(|p| {
            self.cluster
                .pod(&p.namespace, &p.name)
                .is_some_and(|info| info.node.as_deref() == Some(self.node_name.as_str()))
        }));
        keep.iter()
            .filter_map(|pod| crate::flows::forensics::describe(&self.cluster, pod))
            .collect()
    }

    /// Keeps the flows of deleted pods on disk (each node keeps those it saw; the pod's own
    /// node keeps its record even without flows). A failure is logged, counted and retried
    /// by the slow tick.
    fn keep_deleted(&self, deleted: Vec<bulkhead_api::ForensicsBundle>) {
        let now = jiff::Timestamp::now();
        let records = deleted
            .into_iter()
            .map(|mut record| {
                record.deleted = Some(now);
                let local = record.node.as_deref() == Some(self.node_name.as_str());
                (record, local)
            })
            .collect();
        for (pod, result) in self.flows.keep_deleted(records) {
            match result {
                Ok(()) => tracing::debug!(%pod, "deleted pod's flows kept"),
                Err(e) => {
                    self.metrics.error(ErrorKind::Io);
                    tracing::warn!(%pod, error = %error_chain(&e), "cannot keep a deleted pod's flows; retried");
                }
            }
        }
    }

    fn apply_update(&mut self, update: SourceUpdate) -> bool {
        match update {
            SourceUpdate::Snapshot(cluster) => {
                let touched = self.cluster.replace(*cluster);
                let changed = !touched.is_empty();
                self.touched.extend(touched);
                changed
            }
            SourceUpdate::Changes(changes) => {
                let mut changed = false;
                for change in changes {
                    let r = change.object_ref();
                    if self.cluster.apply_change(change) {
                        self.touched.insert(r);
                        changed = true;
                    }
                }
                changed
            }
        }
    }

    /// Routes and masquerade in step with the model's Nodes, once the source has synced;
    /// a failure is logged and counted, and retried by the next refresh.
    pub(super) fn sync_network(&mut self) {
        if !self.ready {
            return;
        }
        if let Err(e) = self.network.sync(&self.cluster, &self.node_name) {
            self.metrics.error(ErrorKind::Network);
            tracing::warn!(error = %e, "node network; retried");
        }
        self.publish_pod_mtu();
    }

    /// Writes the pod MTU routing needs (VXLAN) to `<state dir>/pod-mtu` for the CNI plugin,
    /// or removes the file when routing needs none.
    fn publish_pod_mtu(&mut self) {
        let mtu = self.network.pod_mtu();
        if self.pod_mtu_published == Some(mtu) {
            return;
        }
        let path = self.state_dir.join(bulkhead_cni::config::POD_MTU_FILE);
        let result = match mtu {
            Some(m) => bulkhead_hostnet::fs::write_atomic(&path, format!("{m}\n").as_bytes(), 0o644).map_err(|e| error_chain(&e)),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            },
        };
        match result {
            Ok(()) => {
                tracing::info!(pod_mtu = ?mtu, path = %path.display(), "pod mtu published");
                self.pod_mtu_published = Some(mtu);
            }
            Err(e) => {
                self.metrics.error(ErrorKind::Io);
                tracing::warn!(path = %path.display(), error = %e, "cannot publish the pod mtu");
            }
        }
    }

    /// Reads this node's addresses; on an error the last good set stays (logged, counted).
    pub(super) fn read_host_addresses(&mut self) {
        match self.links.addresses() {
            Ok(addresses) => self.note_host_addresses(addresses),
            Err(e) => {
                self.metrics.error(ErrorKind::Network);
                tracing::warn!(error = %error_chain(&e), kept = ?self.host_addresses, "cannot list node addresses; keeping the last ones");
            }
        }
    }

    /// Takes this node's current addresses; a change is programmed by the next refresh.
    pub(super) fn note_host_addresses(&mut self, addresses: Vec<Ipv4Addr>) {
        if addresses != self.host_addresses {
            tracing::info!(addresses = ?addresses, "node addresses");
            self.host_addresses = addresses;
            self.pending.get_or_insert_with(Instant::now);
        }
    }

    /// Writes the source's pod CIDR to `<state dir>/pod-cidr` for the CNI plugin's IPAM.
    pub(super) fn publish_pod_cidr(&mut self) {
        if self.pod_cidr_pinned {
            return;
        }
        let Some(cidr) = self.source.pod_cidr().filter(|c| Some(*c) != self.pod_cidr) else {
            return;
        };
        let path = kube_source::pod_cidr_path(&self.state_dir);
        // Atomically: a CNI ADD reading it meanwhile must see the old CIDR or the new one.
        match bulkhead_hostnet::fs::write_atomic(&path, format!("{cidr}\n").as_bytes(), 0o644) {
            Ok(()) => {
                tracing::info!(pod_cidr = %cidr, path = %path.display(), "node pod cidr published");
                self.pod_cidr = Some(cidr);
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot publish the pod cidr"),
        }
    }

    pub(super) fn save_registry(&mut self) -> Result<(), AgentError> {
        let records: Vec<_> = self.endpoints.values().collect();
        self.store.save(&records)
    }

    /// Adds an endpoint and programs it at once (what a lone ADD costs).
    #[cfg(test)]
    pub(super) fn add_endpoint(&mut self, spec: EndpointSpec) -> Response {
        let (reply, mut answer) = oneshot::channel();
        self.admit_endpoint(spec, reply);
        self.commit_adds();
        answer.try_recv().ok().flatten().unwrap_or_else(|| Response::Error {
            code: code::AGENT_REJECTED,
            message: "the ADD was not answered".to_string(),
        })
    }

    /// The first half of an ADD: the programs go on the veth (with no endpoint entry yet
    /// they drop everything: fail closed) and the endpoint joins the registry; `reply` is
    /// answered by [`Agent::commit_adds`], which programs every endpoint admitted since the
    /// last commit at once (the agent's thread commits whenever its queue runs dry, so a
    /// burst of ADDs costs one reprogram and one registry write).
    pub(super) fn admit_endpoint(&mut self, spec: EndpointSpec, reply: AddReply) {
        let key = (spec.container_id.clone(), spec.ifname.clone());
        let endpoint_id = match self.endpoints.get(&key) {
            Some(r) => r.endpoint_id,
            None => self.endpoints.values().map(|r| r.endpoint_id).max().unwrap_or(0) + 1,
        };
        if let Err(e) = self.datapath.attach(&spec.host_ifname) {
            self.metrics.error(ErrorKind::Datapath);
            let _ = reply.send(Some(Response::Error {
                code: code::AGENT_REJECTED,
                message: error_chain(&e),
            }));
            return;
        }
        let record = EndpointRecord { endpoint_id, spec };
        let previous = self.endpoints.insert(key.clone(), record.clone());
        self.admitted.push(Admitted {
            key,
            record,
            previous,
            seen: Instant::now(),
            reply,
        });
    }

    /// Programs the endpoints admitted since the last commit and answers their ADDs. When
    /// the maps refuse the batch, each is retried alone, so one endpoint that cannot be
    /// programmed fails only its own ADD; a failed one is taken out again (its veth keeps
    /// the programs, which drop everything until a retry or DEL).
    pub(super) fn commit_adds(&mut self) {
        let admitted = std::mem::take(&mut self.admitted);
        if admitted.is_empty() {
            return;
        }
        let seen = admitted.iter().map(|a| a.seen).min();
        if admitted.len() > 1 {
            match self.reprogram(seen) {
                Ok(()) => {
                    self.persist_registry();
                    for a in admitted {
                        let _ = a.reply.send(Some(Response::Ok));
                    }
                    self.refill_conntrack_reserve();
                    return;
                }
                Err(e) => {
                    self.metrics.error(e.kind());
                    tracing::warn!(adds = admitted.len(), error = %error_chain(&e), "a batch of ADDs failed; retrying each alone");
                    for a in admitted.iter().rev() {
                        self.restore(&a.key, a.previous.clone());
                    }
                }
            }
        }
        for a in admitted {
            self.endpoints.insert(a.key.clone(), a.record);
            let answer = match self.reprogram(Some(a.seen)) {
                Ok(()) => {
                    self.persist_registry();
                    Response::Ok
                }
                Err(e) => {
                    self.metrics.error(e.kind());
                    self.restore(&a.key, a.previous);
                    if let Err(e) = self.reprogram(None) {
                        self.metrics.error(e.kind());
                    }
                    Response::Error {
                        code: code::AGENT_REJECTED,
                        message: error_chain(&e),
                    }
                }
            };
            let _ = a.reply.send(Some(answer));
        }
        self.refill_conntrack_reserve();
    }

    /// Readies conntrack tables for the next [`CONNTRACK_RESERVE`] endpoint ids, after the
    /// ADDs are answered: storing a table in the map of tables makes the kernel wait for an
    /// RCU grace period (10–30 ms), which a single ADD would otherwise wait for. A failure
    /// costs only that wait later (the ADD's sync creates what is missing): logged, counted.
    fn refill_conntrack_reserve(&mut self) {
        let next = self.endpoints.values().map(|r| r.endpoint_id).max().unwrap_or(0) + 1;
        if let Err(e) = self.datapath.reserve_conntrack(next..=next + CONNTRACK_RESERVE - 1) {
            self.metrics.error(ErrorKind::Datapath);
            tracing::warn!(error = %error_chain(&e), "cannot ready conntrack tables for the next endpoints");
        }
    }

    /// Puts back what the registry held under `key` before an ADD.
    fn restore(&mut self, key: &(String, String), previous: Option<EndpointRecord>) {
        match previous {
            Some(p) => self.endpoints.insert(key.clone(), p),
            None => self.endpoints.remove(key),
        };
    }

    /// Saves the registry; a failure is logged and counted (the maps already hold the
    /// endpoints, and the next save writes them).
    fn persist_registry(&mut self) {
        if let Err(e) = self.save_registry() {
            self.metrics.error(e.kind());
            tracing::warn!(error = %error_chain(&e), "cannot persist endpoint registry");
        }
    }

    pub(super) fn del_endpoint(&mut self, r: &EndpointRef) -> Response {
        if self.endpoints.remove(&(r.container_id.clone(), r.ifname.clone())).is_none() {
            return Response::Ok;
        }
        // Before the first sync the model is empty: compiling it would wipe the last known
        // state from the maps. The first synced reprogram removes this endpoint.
        let result = match self.ready {
            true => self.reprogram(Some(Instant::now())).and_then(|()| self.save_registry()),
            false => self.save_registry(),
        };
        match result {
            Ok(()) => Response::Ok,
            Err(e) => {
                self.metrics.error(e.kind());
                Response::Error {
                    code: code::AGENT_REJECTED,
                    message: error_chain(&e),
                }
            }
        }
    }

    pub(super) fn check_endpoint(&self, r: &EndpointRef) -> Response {
        match self.endpoints.get(&(r.container_id.clone(), r.ifname.clone())) {
            Some(rec) if self.applied.endpoints.contains_key(&rec.spec.host_ifindex) => Response::Ok,
            Some(_) => Response::Error {
                code: code::AGENT_REJECTED,
                message: format!("endpoint {}/{} is not programmed", r.container_id, r.ifname),
            },
            None => Response::Error {
                code: code::AGENT_REJECTED,
                message: format!("endpoint {}/{} is unknown", r.container_id, r.ifname),
            },
        }
    }

    /// CNI GC: forgets every endpoint not in `valid`, then deletes its host veth if still there.
    pub(super) fn gc(&mut self, network: &str, valid: &[EndpointRef]) -> Response {
        let keep: BTreeSet<(String, String)> = valid.iter().map(|r| (r.container_id.clone(), r.ifname.clone())).collect();
        // `valid` lists one network's attachments: another network's endpoints are not stale.
        // Records (or requests) from before networks were recorded match any network.
        let ours = |r: &EndpointRecord| network.is_empty() || r.spec.network.is_empty() || r.spec.network == network;
        let stale: Vec<EndpointRecord> = self
            .endpoints
            .iter()
            .filter(|(k, r)| ours(r) && !keep.contains(*k))
            .map(|(_, r)| r.clone())
            .collect();
        if stale.is_empty() {
            return Response::Ok;
        }
        for r in &stale {
            self.endpoints.remove(&(r.spec.container_id.clone(), r.spec.ifname.clone()));
        }
        tracing::info!(removed = stale.len(), "gc: dropping endpoints the runtime no longer knows");
        // Maps first: the veth's ifindex must not be enforced as this endpoint once it is gone.
        let mut errors = Vec::new();
        if let Err(e) = self.reprogram(Some(Instant::now())).and_then(|()| self.save_registry()) {
            errors.push(error_chain(&e));
        }
        let names: Vec<String> = stale.iter().map(|r| r.spec.host_ifname.clone()).collect();
        if let Err(e) = self.links.delete(names) {
            errors.push(error_chain(&e));
        }
        if errors.is_empty() {
            Response::Ok
        } else {
            Response::Error {
                code: code::AGENT_REJECTED,
                message: errors.join("; "),
            }
        }
    }

    /// Drops endpoints whose host veth is gone or was recreated under another ifindex: a DEL
    /// that ran while the agent was down or unreachable. Returns how many were dropped.
    pub(super) fn reconcile_links(&mut self) -> Result<usize, AgentError> {
        if self.endpoints.is_empty() {
            return Ok(0);
        }
        let names: Vec<String> = self.endpoints.values().map(|r| r.spec.host_ifname.clone()).collect();
        let live = self.links.live(names)?;
        let before = self.endpoints.len();
        self.endpoints
            .retain(|_, r| live.get(&r.spec.host_ifname) == Some(&r.spec.host_ifindex));
        let dropped = before - self.endpoints.len();
        if dropped > 0 {
            tracing::info!(dropped, "dropping endpoints whose host veth is gone");
            self.reprogram(Some(Instant::now()))?;
            self.save_registry()?;
        }
        Ok(dropped)
    }

    /// `Request::Forensics`: a live pod's record from the model, or what was kept of a
    /// deleted one, with its flows (history and kept, merged).
    pub(super) fn forensics(&self, pod: &bulkhead_api::NamespacedName) -> Response {
        let live = crate::flows::forensics::describe(&self.cluster, pod);
        match self.flows.bundle(pod, live) {
            Ok(Some(bundle)) => Response::Forensics(Box::new(bundle)),
            Ok(None) => Response::Error {
                code: code::UNKNOWN_POD,
                message: format!(
                    "pod {pod} is unknown to node {}: not in the model, and nothing is kept of it",
                    self.node_name
                ),
            },
            Err(e) => {
                self.metrics.error(ErrorKind::Io);
                Response::Error {
                    code: code::AGENT_REJECTED,
                    message: error_chain(&e),
                }
            }
        }
    }

    pub(super) fn status(&self) -> AgentStatus {
        AgentStatus {
            node_name: self.node_name.clone(),
            ready: self.ready,
            endpoints: self.endpoints.len(),
            identities: self.compiler.identities().len(),
            policies: self.cluster.policies().len(),
            policy_entries: self.applied.policy.len(),
            generation: self.generation,
            quarantined: self.quarantined_pods().into_iter().map(|(p, q)| (p.to_string(), q)).collect(),
        }
    }

    /// Every pod this agent holds quarantined (by request or label, on any node), with
    /// why, since when and by whom. The forensics store keeps these pods' flows.
    pub(crate) fn quarantined_pods(&self) -> std::collections::BTreeMap<NamespacedName, QuarantineInfo> {
        self.quarantine.effective()
    }

    /// Makes the forensic store keep, as they arrive, the flows of exactly the quarantined
    /// pods the model knows (by request or label, and again after a restart: the store does
    /// not remember whom it watched), and stop for released ones; what was kept stays. A
    /// failure is logged and counted, and retried by the next reprogram.
    fn sync_forensic_quarantine(&mut self) {
        let Some(store) = self.flows.forensics() else { return };
        let want = self.quarantined_pods();
        let have = store.kept();
        for (pod, info) in &want {
            if have.contains_key(pod) {
                continue;
            }
            let Some(record) = crate::flows::forensics::describe(&self.cluster, pod) else {
                continue;
            };
            if let Err(e) = self.flows.keep_forensics(record, info.clone()) {
                self.metrics.error(ErrorKind::Io);
                tracing::warn!(pod = %pod, error = %error_chain(&e), "cannot keep a quarantined pod's flows");
            }
        }
        for pod in have.keys().filter(|p| !want.contains_key(*p)) {
            if let Err(e) = self.flows.release_forensics(pod) {
                self.metrics.error(ErrorKind::Io);
                tracing::warn!(pod = %pod, error = %error_chain(&e), "cannot stop keeping a released pod's flows");
            }
        }
    }

    /// `Request::Quarantine`: records the request (persisted), then reprograms; answered
    /// `Ok` once the maps hold it. A pod the model does not know yet is recorded too (it is
    /// isolated when it appears). A release leaves a pod labelled quarantined as it is, and
    /// says so.
    pub(super) fn quarantine_request(&mut self, pod: NamespacedName, reason: Option<String>, release: bool) -> Response {
        let recorded = match release {
            true => self.quarantine.release(&pod),
            false => self.quarantine.request(pod.clone(), reason, jiff::Timestamp::now()),
        };
        let refuse = |code: u32, message: String| Response::Error { code, message };
        // A release that cannot be persisted has not happened (the pod stays quarantined);
        // a quarantine that cannot be persisted still goes into the maps, and says so.
        let not_persisted = match recorded {
            Ok(()) => None,
            Err(e) => {
                self.metrics.error(e.kind());
                tracing::warn!(pod = %pod, release, error = %error_chain(&e), "cannot persist the quarantine");
                if release {
                    return refuse(code::AGENT_REJECTED, format!("{pod} stays quarantined: {}", error_chain(&e)));
                }
                Some(error_chain(&e))
            }
        };
        tracing::info!(pod = %pod, release, "quarantine request");
        if !self.ready {
            self.pending.get_or_insert_with(Instant::now);
            return refuse(
                code::TRY_AGAIN_LATER,
                format!("{pod}: recorded, but the agent has not synced its model yet; not in the maps"),
            );
        }
        if let Err(e) = self.reprogram(Some(Instant::now())) {
            self.metrics.error(e.kind());
            return refuse(
                code::AGENT_REJECTED,
                format!("{pod}: recorded, not in the maps yet (retried): {}", error_chain(&e)),
            );
        }
        if let Some(e) = not_persisted {
            return refuse(
                code::AGENT_REJECTED,
                format!("{pod} is quarantined in the maps but not persisted: {e}"),
            );
        }
        if release && self.quarantine.by_label(&pod) {
            return refuse(
                code::AGENT_REJECTED,
                format!("{pod} stays quarantined: its label {} is \"true\"", quarantine::LABEL),
            );
        }
        Response::Ok
    }
}

/// Where an ADD's answer goes: `None` means "pod not known yet, ask again".
pub(super) type AddReply = oneshot::Sender<Option<Response>>;

/// An ADD between [`Agent::admit_endpoint`] and [`Agent::commit_adds`].
pub(super) struct Admitted {
    key: (String, String),
    record: EndpointRecord,
    /// What the registry held under the key before (a repeated ADD).
    previous: Option<EndpointRecord>,
    seen: Instant,
    reply: AddReply,
}

/// What a successful sync wrote, for `applied` to take.
enum Written {
    /// A whole new state.
    Full(Box<DatapathState>),
    /// The compiler's delta (host addresses included) and the Service maps.
    Delta(DatapathDelta, Box<DatapathState>),
}

/// Gives this node's addresses the reserved HOST identity, which the datapath always admits:
/// Kubernetes documents that traffic between a pod and its own node is allowed whatever the
/// policy (kubelet probes depend on it). A pod's own /32 is never overridden.
fn add_host_addresses(state: &mut DatapathState, addresses: &[Ipv4Addr]) {
    for &addr in addresses {
        state.ipcache.entry((addr, 32)).or_insert(IpcacheValue {
            identity: bulkhead_common::identity::HOST,
            flags: 0,
        });
    }
}
