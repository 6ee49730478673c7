//! The incremental compiler: [`Compiler::update`] recompiles only what the objects changed
//! since the last call affect, and returns the map changes as a [`DatapathDelta`].
//!
//! [`Compiler::compile`] stays the reference: `update` must leave [`Compiler::state`] equal
//! to what `compile` gives for the same cluster and endpoints, with the same identity and
//! rule ids (the property test in `tests.rs` checks it after every event).
//!
//! # Indexes ([`Indexes`])
//! - **Pods**: one record per pod (labels interned per identity as `Arc`, address, identity)
//!   and an address → pods index for the ipcache (`/32` of the last pod in name order, as a
//!   full compile writes them).
//! - **Identities** are reference-counted by their pods: one appears with its first pod and
//!   is released with its last (releases wait for the end of the event, so a relabel that
//!   empties and refills an identity keeps its id, as a full compile would).
//! - **Selectors**: every rule peer, canonicalised (its `Debug` form; a pod-selector-only
//!   peer with its policy's namespace) and shared between the policies that use it, caches
//!   the identities it matches. A new identity is evaluated against every cached selector
//!   (O(selectors) per *new identity*, not per pod), a new selector against every identity;
//!   a policy whose selector gained or lost an identity is dirty.
//! - **Entries**: cached per (policy, local endpoint). A dirty policy recomputes only its
//!   entries for the endpoints it decides for; an endpoint's slice of the policy map
//!   (contiguous: the key starts with the big-endian endpoint id) is rebuilt from its
//!   cached per-policy entries, merged with the smallest rule id. A policy's entry count is
//!   summed over endpoints, so the over-cap rule is exact.
//! - **Endpoints** keep the policies that isolate them per direction (enforcing and audit):
//!   a policy change re-evaluates only that policy for the endpoints of its namespace; an
//!   endpoint ADD or DEL costs the policies of its namespace and its own entries.
//!
//! # What falls back to a full rebuild
//! - The first call, and the first after a [`Compiler::compile`].
//! - A change to the set of ipBlock networks (a policy adds or removes a CIDR or except
//!   that no other policy names): every pod's identity key includes the networks its
//!   address is in, so every identity may change. The rebuild runs the same indexing from
//!   scratch, keeps the identity and rule ids of what is unchanged, and diffs the state.
//! - Local endpoints that repeat an endpoint id, an ifindex or a pod: the full compiler's
//!   first-one-wins and last-one-wins rules are reproduced by running it (`compile`).
//!
//! # What still costs more than the change
//! - Egress rules with named ports resolve the name on every destination pod of the rule,
//!   as the full compiler does: a dirty such policy costs the pods its peers match (every
//!   pod for an empty peer list), and every touched pod dirties the named-port policies
//!   whose peers match its identity.
//! - A new selector is evaluated against every identity; a namespace touch touches every
//!   pod and policy of the namespace (a relabel relabels them all).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use bulkhead_common::{
    endpoint_flags, identity, proto, PolicyKey, PolicyValue, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL,
};
use ipnetwork::Ipv4Network;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::datapath::state::{DatapathDelta, DatapathState};
use crate::model::{self, selector, Cluster, Kind, ObjectRef};

use super::compile::{
    block_networks, endpoint_info, insert_entry, ip_blocks, net_within, policy_types, port_prefixes, port_spec, selector_or_all, PortSpec,
};
use super::identity::{Direction, IdentityKey, LabelSet, RuleRef};
use super::{Compiler, LocalEndpoint, OverCap};

type Labels = BTreeMap<String, String>;
/// (namespace, name) of a Pod or NetworkPolicy.
type Name = (String, String);
/// Policy map entries.
type Entries = BTreeMap<(PolicyKey, u32), PolicyValue>;
/// An ipBlock network: (address, prefix length).
type Net = (Ipv4Addr, u8);

fn d(dir: Direction) -> usize {
    match dir {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// What the incremental compiler keeps between calls (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct Indexes {
    /// Labels of every namespace that has pods, as the pods' identities were built with.
    namespaces: BTreeMap<String, Arc<Labels>>,
    pods: BTreeMap<Name, PodRec>,
    /// Pod address → pods with it (the ipcache `/32` goes to the last).
    by_ip: BTreeMap<Ipv4Addr, BTreeSet<Name>>,
    /// Pod identities.
    identities: BTreeMap<u32, IdentityRec>,
    /// ipBlock network → its identity.
    cidrs: BTreeMap<Net, u32>,
    /// ipBlock network → how many policy blocks name it.
    networks: BTreeMap<Net, usize>,
    policies: BTreeMap<Name, PolicyRec>,
    selectors: BTreeMap<u32, Selector>,
    selector_ids: HashMap<String, u32>,
    next_selector: u32,
    /// Policies with a named port in an egress rule.
    named_egress: BTreeSet<Name>,
    /// Local endpoints by endpoint id.
    endpoints: BTreeMap<u32, EndpointRec>,
    /// Pods with a local endpoint → the endpoint's address (authoritative for the pod).
    local_ip: BTreeMap<Name, Ipv4Addr>,
    /// (policy, endpoint id) → the policy's entries for that endpoint.
    entries: BTreeMap<(Name, u32), Entries>,
    /// Policy → the endpoints it decides for (has entries for).
    effective_for: BTreeMap<Name, BTreeSet<u32>>,
    /// Policy → its entry count summed over endpoints.
    totals: BTreeMap<Name, usize>,
    /// Policies over the cap → their entry count.
    over_cap: BTreeMap<Name, usize>,
}

#[derive(Clone, Debug)]
struct PodRec {
    ip: Option<Ipv4Addr>,
    identity: u32,
    /// Shared with the identity record.
    labels: Arc<Labels>,
}

#[derive(Clone, Debug)]
struct IdentityRec {
    namespace: String,
    labels: Arc<Labels>,
    namespace_labels: Arc<Labels>,
    /// The ipBlock networks its pods' address is in (empty for a `Labels` identity).
    cidrs: Vec<Net>,
    pods: BTreeSet<Name>,
}

/// A rule peer as the selector index keys it.
#[derive(Clone, Debug)]
enum Peer {
    /// `podSelector` (in `namespace`, the policy's, when alone) and/or `namespaceSelector`.
    Labels {
        namespace: Option<String>,
        pod: Option<LabelSelector>,
        ns: Option<LabelSelector>,
    },
    /// An ipBlock, parsed.
    Block { cidr: Ipv4Network, except: Vec<Ipv4Network> },
}

impl Peer {
    /// Whether the peer matches the pods of a pod identity: all of them or none, since
    /// identities share namespace, labels and ipBlock networks.
    fn matches(&self, id: &IdentityRec) -> bool {
        match self {
            Peer::Labels { namespace, pod, ns } => {
                namespace.as_ref().is_none_or(|n| *n == id.namespace)
                    && ns.as_ref().is_none_or(|s| selector::matches(s, &id.namespace_labels))
                    && pod.as_ref().is_none_or(|s| selector::matches(s, &id.labels))
            }
            Peer::Block { cidr, except } => {
                let has = |n: &Ipv4Network| id.cidrs.contains(&(n.network(), n.prefix()));
                has(cidr) && !except.iter().any(has)
            }
        }
    }

    /// Whether the peer matches a CIDR identity (see `compile`'s `ip_block_matches`).
    fn matches_cidr(&self, (addr, prefix): Net) -> bool {
        match self {
            Peer::Labels { .. } => false,
            Peer::Block { cidr, except } => {
                Ipv4Network::new(addr, prefix).is_ok_and(|net| net_within(net, *cidr) && !except.iter().any(|&e| net_within(net, e)))
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Selector {
    peer: Peer,
    /// Identities (pod and CIDR) the peer matches.
    matched: BTreeSet<u32>,
    /// Policies using it, with how many of their peers are it.
    users: BTreeMap<Name, usize>,
}

#[derive(Clone, Debug)]
struct PolicyRec {
    pod_selector: LabelSelector,
    /// Whether it isolates, per direction.
    isolates: [bool; 2],
    audited: bool,
    /// Rules per direction.
    rules: [Vec<RuleRec>; 2],
    networks: BTreeSet<Net>,
    /// Every selector its peers use, once per use.
    selectors: Vec<u32>,
}

#[derive(Clone, Debug)]
struct RuleRec {
    id: u32,
    /// `None`: any remote; else the selectors of its peers (peers that match nothing left out).
    remotes: Option<Vec<u32>>,
    ports: Vec<PortSpec>,
}

impl RuleRec {
    fn has_named_port(&self) -> bool {
        self.ports.iter().any(|p| matches!(p, PortSpec::Named { .. }))
    }
}

#[derive(Clone, Debug, Default)]
struct EndpointRec {
    ep: Option<LocalEndpoint>,
    /// Policies isolating the endpoint's pod, per direction: enforcing and audit-mode.
    enforcing: [BTreeSet<Name>; 2],
    audit: [BTreeSet<Name>; 2],
}

impl EndpointRec {
    /// Per direction, the policies whose rules decide (enforcing ones if any).
    fn effective(&self) -> [&BTreeSet<Name>; 2] {
        [0, 1].map(|i| {
            if self.enforcing[i].is_empty() {
                &self.audit[i]
            } else {
                &self.enforcing[i]
            }
        })
    }

    /// Policy → in which directions it decides.
    fn effective_dirs(&self) -> BTreeMap<Name, [bool; 2]> {
        let mut out: BTreeMap<Name, [bool; 2]> = BTreeMap::new();
        for (i, set) in self.effective().into_iter().enumerate() {
            for p in set {
                out.entry(p.clone()).or_default()[i] = true;
            }
        }
        out
    }

    fn flags(&self) -> u32 {
        let mut flags = 0;
        for (i, (iso, audit)) in [
            (endpoint_flags::ISOLATED_INGRESS, endpoint_flags::AUDIT_INGRESS),
            (endpoint_flags::ISOLATED_EGRESS, endpoint_flags::AUDIT_EGRESS),
        ]
        .into_iter()
        .enumerate()
        {
            if !self.enforcing[i].is_empty() {
                flags |= iso;
            } else if !self.audit[i].is_empty() {
                flags |= audit;
            }
        }
        flags
    }

    /// Files policy `name` per direction as `rec` isolates a pod with `labels`.
    fn file(&mut self, name: &Name, rec: Option<&PolicyRec>, labels: &Labels) {
        for i in 0..2 {
            self.enforcing[i].remove(name);
            self.audit[i].remove(name);
        }
        let Some(rec) = rec else { return };
        if !selector::matches(&rec.pod_selector, labels) {
            return;
        }
        for i in 0..2 {
            if rec.isolates[i] {
                let list = if rec.audited { &mut self.audit[i] } else { &mut self.enforcing[i] };
                list.insert(name.clone());
            }
        }
    }
}

/// The objects an update looks at.
#[derive(Default)]
struct Touched {
    namespaces: BTreeSet<String>,
    pods: BTreeSet<Name>,
    policies: BTreeSet<Name>,
}

/// The set of ipBlock networks changed: identity keys change, rebuild.
struct NetworksChanged;

/// The original value of every key an update wrote, to emit only real changes.
#[derive(Default)]
struct Tracker {
    endpoints: BTreeMap<u32, Option<bulkhead_common::EndpointInfo>>,
    ipcache: BTreeMap<Net, Option<bulkhead_common::IpcacheValue>>,
    policy: BTreeMap<(PolicyKey, u32), Option<PolicyValue>>,
}

fn put<K: Ord + Clone, V: Clone>(map: &mut BTreeMap<K, V>, orig: &mut BTreeMap<K, Option<V>>, k: K, v: Option<V>) {
    if !orig.contains_key(&k) {
        orig.insert(k.clone(), map.get(&k).cloned());
    }
    match v {
        Some(v) => map.insert(k, v),
        None => map.remove(&k),
    };
}

fn changes<K: Ord, V: Clone + PartialEq>(map: &BTreeMap<K, V>, orig: BTreeMap<K, Option<V>>) -> BTreeMap<K, Option<V>> {
    orig.into_iter()
        .filter_map(|(k, old)| {
            let new = map.get(&k).cloned();
            (new != old).then_some((k, new))
        })
        .collect()
}

impl Tracker {
    fn finish(self, state: &DatapathState) -> DatapathDelta {
        DatapathDelta {
            endpoints: changes(&state.endpoints, self.endpoints),
            ipcache: changes(&state.ipcache, self.ipcache),
            policy: changes(&state.policy, self.policy),
            ..DatapathDelta::default()
        }
    }
}

/// The keys of `map` in namespace `ns`.
fn in_namespace<'a, V>(map: &'a BTreeMap<Name, V>, ns: &'a str) -> impl Iterator<Item = &'a Name> + 'a {
    map.range((ns.to_string(), String::new())..)
        .take_while(move |((n, _), _)| n == ns)
        .map(|(k, _)| k)
}

/// The policy map range of one endpoint's entries.
fn endpoint_range(id: u32) -> std::ops::RangeInclusive<(PolicyKey, u32)> {
    let lo = PolicyKey::new(id, 0, 0, 0, 0);
    let hi = PolicyKey {
        endpoint_id: id.to_be_bytes(),
        remote_identity: [0xff; 4],
        direction: 0xff,
        protocol: 0xff,
        dport: [0xff; 2],
    };
    (lo, 0)..=(hi, u32::MAX)
}

fn networks_of(np: &NetworkPolicy) -> BTreeSet<Net> {
    ip_blocks(np).flat_map(block_networks).map(|n| (n.network(), n.prefix())).collect()
}

impl Compiler {
    /// Recompiles what the objects in `touched` affect and returns the changes to the
    /// endpoint, ipcache and policy maps since the last [`Self::compile`] or
    /// [`Self::update`] ([`Self::state`] holds the result).
    ///
    /// `touched` names every Pod, Namespace and NetworkPolicy added, changed or deleted
    /// since the last call (other kinds are ignored; a Namespace covers its pods and
    /// policies); `cluster` is the model after those changes; `local` the current local
    /// endpoints, diffed against the last call's, so adding or removing one costs that
    /// endpoint's work. The first call, and some rare changes (see the module docs), fall
    /// back to a full rebuild; the result is always what [`Self::compile`] would give.
    pub fn update(&mut self, cluster: &Cluster, touched: &[ObjectRef], local: &[LocalEndpoint]) -> DatapathDelta {
        if !distinct(local) {
            return self.full_fallback(cluster, local);
        }
        let Some(mut ix) = self.incremental.take() else {
            return self.rebuild(cluster, local);
        };
        let mut t = Touched::default();
        for r in touched {
            let ns = || r.namespace.clone().unwrap_or_else(|| model::DEFAULT_NAMESPACE.to_string());
            match r.kind {
                Kind::Namespace => {
                    t.namespaces.insert(r.name.clone());
                }
                Kind::Pod => {
                    t.pods.insert((ns(), r.name.clone()));
                }
                Kind::NetworkPolicy => {
                    t.policies.insert((ns(), r.name.clone()));
                }
                _ => {}
            }
        }
        let mut tracker = Tracker::default();
        match self.apply(&mut ix, cluster, t, local, &mut tracker) {
            Ok(()) => {
                self.incremental = Some(ix);
                tracker.finish(&self.state)
            }
            Err(NetworksChanged) => self.rebuild(cluster, local),
        }
    }

    /// A full compile as the new baseline, for inputs the indexes do not model.
    fn full_fallback(&mut self, cluster: &Cluster, local: &[LocalEndpoint]) -> DatapathDelta {
        let new = self.compile_full(cluster, local);
        self.incremental = None;
        let delta = DatapathDelta::between(&self.state, &new);
        self.state = new;
        delta
    }

    /// Indexes the whole cluster from scratch (keeping the ids of unchanged identities and
    /// rules) and diffs the result against the last state.
    fn rebuild(&mut self, cluster: &Cluster, local: &[LocalEndpoint]) -> DatapathDelta {
        let mut ix = Box::<Indexes>::default();
        let networks: BTreeSet<Net> = cluster.policies().values().flat_map(networks_of).collect();
        for &(addr, prefix) in &networks {
            let id = self.identities.allocate(IdentityKey::Cidr { addr, prefix });
            ix.cidrs.insert((addr, prefix), id);
        }
        let t = Touched {
            namespaces: cluster.namespaces().keys().cloned().collect(),
            pods: BTreeSet::new(),
            policies: BTreeSet::new(),
        };
        let old = std::mem::take(&mut self.state);
        // Pods' `/32`s, written by the pod phase, take precedence over these.
        for (&net, &identity) in &ix.cidrs {
            self.state.ipcache.insert(net, bulkhead_common::IpcacheValue { identity, flags: 0 });
        }
        if self.apply(&mut ix, cluster, t, local, &mut Tracker::default()).is_err() {
            // Cannot happen (the networks were taken from the same cluster); should it,
            // the full compiler gives the right answer.
            self.state = old;
            return self.full_fallback(cluster, local);
        }
        let used_ids: BTreeSet<u32> = ix.identities.keys().chain(ix.cidrs.values()).copied().collect();
        self.identities.retain_only(&used_ids);
        let used_rules: BTreeSet<u32> = ix.policies.values().flat_map(|p| p.rules.iter().flatten().map(|r| r.id)).collect();
        self.rules.retain_only(&used_rules);
        self.incremental = Some(ix);
        DatapathDelta::between(&old, &self.state)
    }

    /// The incremental step: every phase looks only at what `t` and the endpoint diff reach.
    fn apply(
        &mut self,
        ix: &mut Indexes,
        cluster: &Cluster,
        mut t: Touched,
        local: &[LocalEndpoint],
        tr: &mut Tracker,
    ) -> Result<(), NetworksChanged> {
        // A pod applied into a missing namespace creates it (with its name label) without
        // the Namespace being listed.
        for (ns, _) in &t.pods {
            let recorded = ix.namespaces.get(ns).map(|l| &**l);
            if recorded != Some(&cluster.namespace_labels(ns)) && (recorded.is_some() || cluster.namespace(ns).is_some()) {
                t.namespaces.insert(ns.clone());
            }
        }
        // Local endpoints: the diff, and the pods whose authoritative address changes.
        let new_eps: BTreeMap<u32, &LocalEndpoint> = local.iter().map(|e| (e.endpoint_id, e)).collect();
        let new_local_ip: BTreeMap<Name, Ipv4Addr> = local.iter().map(|e| ((e.namespace.clone(), e.pod.clone()), e.ipv4)).collect();
        let mut eps_gone = Vec::new();
        let mut eps_new = BTreeSet::new();
        for (id, rec) in &ix.endpoints {
            if new_eps.get(id).copied() != rec.ep.as_ref() {
                eps_gone.push(*id);
            }
        }
        for (id, ep) in &new_eps {
            if ix.endpoints.get(id).and_then(|r| r.ep.as_ref()) != Some(*ep) {
                eps_new.insert(*id);
            }
        }
        for (name, ip) in &ix.local_ip {
            if new_local_ip.get(name) != Some(ip) {
                t.pods.insert(name.clone());
            }
        }
        for (name, ip) in &new_local_ip {
            if ix.local_ip.get(name) != Some(ip) {
                t.pods.insert(name.clone());
            }
        }
        // Namespaces: a relabel relabels every pod; an annotation may flip the audit mode of
        // every policy; a deletion takes both with it.
        for ns in &t.namespaces {
            match cluster.namespace(ns) {
                Some(_) => {
                    let labels = cluster.namespace_labels(ns);
                    if ix.namespaces.get(ns).is_none_or(|l| **l != labels) {
                        ix.namespaces.insert(ns.clone(), Arc::new(labels));
                    }
                }
                None => {
                    ix.namespaces.remove(ns);
                }
            }
            t.pods.extend(in_namespace(&ix.pods, ns).cloned());
            t.pods.extend(in_namespace(cluster.pods(), ns).cloned());
            t.policies.extend(in_namespace(&ix.policies, ns).cloned());
            t.policies.extend(in_namespace(cluster.policies(), ns).cloned());
        }

        // Policies. First whether the set of ipBlock networks stays (nothing is changed yet).
        let mut adjust: BTreeMap<Net, isize> = BTreeMap::new();
        for name in &t.policies {
            if let Some(rec) = ix.policies.get(name) {
                for n in &rec.networks {
                    *adjust.entry(*n).or_default() -= 1;
                }
            }
            if let Some(np) = cluster.policy(&name.0, &name.1) {
                for n in networks_of(np) {
                    *adjust.entry(n).or_default() += 1;
                }
            }
        }
        for (n, by) in &adjust {
            let count = ix.networks.get(n).copied().unwrap_or(0).cast_signed() + by;
            if (count > 0) != ix.cidrs.contains_key(n) {
                return Err(NetworksChanged);
            }
        }
        for (n, by) in adjust {
            let count = ix.networks.get(&n).copied().unwrap_or(0).cast_signed() + by;
            match usize::try_from(count) {
                Ok(c) if c > 0 => ix.networks.insert(n, c),
                _ => ix.networks.remove(&n),
            };
        }
        let mut dirty: BTreeSet<Name> = BTreeSet::new();
        for name in &t.policies {
            let new = cluster.policy(&name.0, &name.1).map(|np| self.index_policy(ix, cluster, name, np));
            let old = match new {
                Some(rec) => ix.policies.insert(name.clone(), rec),
                None => ix.policies.remove(name),
            };
            if let Some(old) = old {
                for sid in old.selectors {
                    ix.release_selector(sid, name);
                }
                let kept: BTreeSet<u32> = ix
                    .policies
                    .get(name)
                    .into_iter()
                    .flat_map(|p| p.rules.iter().flatten().map(|r| r.id))
                    .collect();
                for r in old.rules.iter().flatten() {
                    if !kept.contains(&r.id) {
                        self.rules.release(r.id);
                    }
                }
            }
            if ix
                .policies
                .get(name)
                .is_some_and(|p| p.rules[1].iter().any(RuleRec::has_named_port))
            {
                ix.named_egress.insert(name.clone());
            } else {
                ix.named_egress.remove(name);
            }
            dirty.insert(name.clone());
        }

        // Pods: records, identities (released at the end, so one emptied and refilled by
        // the same event keeps its id), ipcache.
        let pod_to_ep: BTreeMap<Name, u32> = local
            .iter()
            .map(|e| ((e.namespace.clone(), e.pod.clone()), e.endpoint_id))
            .collect();
        let mut full_eps: BTreeSet<u32> = eps_new.clone();
        let mut touched_ids = BTreeSet::new();
        let mut maybe_empty = BTreeSet::new();
        let mut ips = BTreeSet::new();
        for name in &t.pods {
            let old = ix.pods.remove(name);
            if let Some(pod) = cluster.pods().get(name) {
                let ns_labels = ix
                    .namespaces
                    .entry(name.0.clone())
                    .or_insert_with(|| Arc::new(cluster.namespace_labels(&name.0)))
                    .clone();
                let labels = model::pod_labels(pod);
                let ip = new_local_ip.get(name).copied().or_else(|| model::pod_ipv4(pod));
                let inside: Vec<Net> = match ip {
                    Some(ip) => ix
                        .cidrs
                        .keys()
                        .filter(|(addr, prefix)| Ipv4Network::new(*addr, *prefix).is_ok_and(|n| n.contains(ip)))
                        .copied()
                        .collect(),
                    None => Vec::new(),
                };
                let label_set = LabelSet::for_pod(&name.0, &ns_labels, &labels);
                let key = if inside.is_empty() {
                    IdentityKey::Labels(label_set)
                } else {
                    IdentityKey::LabelsInCidrs {
                        labels: label_set,
                        cidrs: inside.clone(),
                    }
                };
                let id = self.identities.allocate(key);
                let id_rec = match ix.identities.entry(id) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        let rec = IdentityRec {
                            namespace: name.0.clone(),
                            labels: Arc::new(labels),
                            namespace_labels: ns_labels,
                            cidrs: inside,
                            pods: BTreeSet::new(),
                        };
                        for sel in ix.selectors.values_mut() {
                            if sel.peer.matches(&rec) {
                                sel.matched.insert(id);
                                dirty.extend(sel.users.keys().cloned());
                            }
                        }
                        e.insert(rec)
                    }
                };
                id_rec.pods.insert(name.clone());
                let rec = PodRec {
                    ip,
                    identity: id,
                    labels: id_rec.labels.clone(),
                };
                if let Some(ip) = ip {
                    ix.by_ip.entry(ip).or_default().insert(name.clone());
                    ips.insert(ip);
                }
                touched_ids.insert(id);
                ix.pods.insert(name.clone(), rec);
            }
            if let Some(old) = old {
                if let Some(ip) = old.ip {
                    let stays = ix.pods.get(name).is_some_and(|p| p.ip == Some(ip));
                    if !stays {
                        if let Some(set) = ix.by_ip.get_mut(&ip) {
                            set.remove(name);
                            if set.is_empty() {
                                ix.by_ip.remove(&ip);
                            }
                        }
                    }
                    ips.insert(ip);
                }
                let stays = ix.pods.get(name).is_some_and(|p| p.identity == old.identity);
                if !stays {
                    if let Some(rec) = ix.identities.get_mut(&old.identity) {
                        rec.pods.remove(name);
                        if rec.pods.is_empty() {
                            maybe_empty.insert(old.identity);
                        }
                    }
                }
                touched_ids.insert(old.identity);
            }
            if let Some(&ep) = pod_to_ep.get(name) {
                full_eps.insert(ep);
            }
        }
        for id in maybe_empty {
            if ix.identities.get(&id).is_some_and(|r| r.pods.is_empty()) {
                ix.identities.remove(&id);
                for sel in ix.selectors.values_mut() {
                    if sel.matched.remove(&id) {
                        dirty.extend(sel.users.keys().cloned());
                    }
                }
                self.identities.release(id);
            }
        }
        // Named egress ports resolve per destination pod: a pod change may change them.
        if !touched_ids.is_empty() {
            for name in &ix.named_egress {
                let Some(rec) = ix.policies.get(name) else { continue };
                let hit = rec.rules[1].iter().filter(|r| r.has_named_port()).any(|r| match &r.remotes {
                    None => true,
                    Some(sels) => sels.iter().any(|s| {
                        ix.selectors
                            .get(s)
                            .is_some_and(|s| touched_ids.iter().any(|i| s.matched.contains(i)))
                    }),
                });
                if hit {
                    dirty.insert(name.clone());
                }
            }
        }
        for ip in ips {
            let value = match ix.by_ip.get(&ip).and_then(|s| s.last()).and_then(|n| ix.pods.get(n)) {
                Some(p) => Some(p.identity),
                None => ix.cidrs.get(&(ip, 32)).copied(),
            };
            let value = value.map(|identity| bulkhead_common::IpcacheValue { identity, flags: 0 });
            put(&mut self.state.ipcache, &mut tr.ipcache, (ip, 32), value);
        }

        // Endpoints that left (or changed: they come back below).
        let mut recompute: BTreeMap<u32, BTreeSet<Name>> = BTreeMap::new();
        let mut slices: BTreeSet<u32> = BTreeSet::new();
        let mut count_changed: BTreeSet<Name> = BTreeSet::new();
        for id in eps_gone {
            let Some(rec) = ix.endpoints.remove(&id) else { continue };
            for pol in rec.effective_dirs().into_keys() {
                ix.drop_entries(&pol, id, &mut count_changed);
            }
            let keys: Vec<(PolicyKey, u32)> = self.state.policy.range(endpoint_range(id)).map(|(k, _)| *k).collect();
            for k in keys {
                put(&mut self.state.policy, &mut tr.policy, k, None);
            }
            if let Some(ep) = rec.ep {
                put(&mut self.state.endpoints, &mut tr.endpoints, ep.host_ifindex, None);
            }
        }
        // Endpoints to re-evaluate: new ones and those whose pod changed, in full; those
        // of a touched policy's namespace, for that policy.
        let mut partial: BTreeMap<u32, Vec<&Name>> = BTreeMap::new();
        for name in &t.policies {
            for (id, rec) in &ix.endpoints {
                if rec.ep.as_ref().is_some_and(|e| e.namespace == name.0) && !full_eps.contains(id) {
                    partial.entry(*id).or_default().push(name);
                }
            }
        }
        let reeval = full_eps
            .iter()
            .map(|id| (*id, None))
            .chain(partial.into_iter().map(|(id, p)| (id, Some(p))));
        for (id, policies) in reeval {
            let Some(&ep) = new_eps.get(&id) else { continue };
            let pod_name = (ep.namespace.clone(), ep.pod.clone());
            let pod = ix.pods.get(&pod_name).map(|p| (p.identity, p.labels.clone()));
            let mut rec = ix.endpoints.remove(&id).unwrap_or_default();
            let before = rec.effective_dirs();
            match (&pod, &policies) {
                (None, _) => rec = EndpointRec::default(),
                (Some((_, labels)), None) => {
                    rec = EndpointRec::default();
                    for name in in_namespace(&ix.policies, &ep.namespace) {
                        rec.file(name, ix.policies.get(name), labels);
                    }
                }
                (Some((_, labels)), Some(names)) => {
                    for name in names {
                        rec.file(name, ix.policies.get(*name), labels);
                    }
                }
            }
            rec.ep = Some(ep.clone());
            let after = rec.effective_dirs();
            for pol in before.keys() {
                if !after.contains_key(pol) {
                    ix.drop_entries(pol, id, &mut count_changed);
                    slices.insert(id);
                }
            }
            for (pol, dirs) in &after {
                ix.effective_for.entry(pol.clone()).or_default().insert(id);
                if policies.is_none() || before.get(pol) != Some(dirs) {
                    recompute.entry(id).or_default().insert(pol.clone());
                }
            }
            let (identity, flags) = match pod {
                Some((identity, _)) => (identity, rec.flags()),
                None => (identity::WORLD, endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS),
            };
            put(
                &mut self.state.endpoints,
                &mut tr.endpoints,
                ep.host_ifindex,
                Some(endpoint_info(ep, identity, flags)),
            );
            ix.endpoints.insert(id, rec);
            slices.insert(id);
        }
        ix.local_ip = new_local_ip;

        // Entries of dirty policies, for the endpoints they decide for.
        for pol in &dirty {
            for id in ix.effective_for.get(pol).into_iter().flatten() {
                recompute.entry(*id).or_default().insert(pol.clone());
            }
        }
        for (id, pols) in recompute {
            let Some(rec) = ix.endpoints.get(&id) else { continue };
            let all_dirs = rec.effective_dirs();
            let Some(ep) = rec.ep.clone() else { continue };
            for pol in pols {
                let dirs = all_dirs.get(&pol).copied().unwrap_or_default();
                let entries = match ix.policies.get(&pol) {
                    Some(p) => ix.entries_for(cluster, p, &ep, dirs),
                    None => Entries::new(),
                };
                let old = ix.entries.get(&(pol.clone(), id));
                if old != Some(&entries) {
                    let (was, now) = (old.map_or(0, BTreeMap::len), entries.len());
                    let total = ix.totals.entry(pol.clone()).or_default();
                    *total = *total - was + now;
                    ix.entries.insert((pol.clone(), id), entries);
                    count_changed.insert(pol.clone());
                    slices.insert(id);
                }
            }
        }
        // The cap, per policy over every endpoint.
        for pol in count_changed {
            let total = ix.totals.get(&pol).copied().unwrap_or(0);
            if total == 0 {
                ix.totals.remove(&pol);
            }
            let was = ix.over_cap.contains_key(&pol);
            if total > self.policy_cap {
                ix.over_cap.insert(pol.clone(), total);
            } else {
                ix.over_cap.remove(&pol);
            }
            if was != (total > self.policy_cap) {
                slices.extend(ix.effective_for.get(&pol).into_iter().flatten());
            }
        }
        self.over_cap = ix
            .over_cap
            .iter()
            .map(|((namespace, name), &entries)| OverCap {
                namespace: namespace.clone(),
                name: name.clone(),
                entries,
                cap: self.policy_cap,
            })
            .collect();
        // Each touched endpoint's slice of the policy map, merged from its policies' entries.
        for id in slices {
            let Some(rec) = ix.endpoints.get(&id) else { continue };
            let mut merged = Entries::new();
            for pol in rec.effective_dirs().keys() {
                if ix.over_cap.contains_key(pol) {
                    continue;
                }
                for (k, v) in ix.entries.get(&(pol.clone(), id)).into_iter().flatten() {
                    merged.entry(*k).and_modify(|m| m.rule_id = m.rule_id.min(v.rule_id)).or_insert(*v);
                }
            }
            let stale: Vec<(PolicyKey, u32)> = self
                .state
                .policy
                .range(endpoint_range(id))
                .filter(|(k, v)| merged.get(k) != Some(v))
                .map(|(k, _)| *k)
                .collect();
            for k in stale {
                put(&mut self.state.policy, &mut tr.policy, k, None);
            }
            for (k, v) in merged {
                if self.state.policy.get(&k) != Some(&v) {
                    put(&mut self.state.policy, &mut tr.policy, k, Some(v));
                }
            }
        }
        Ok(())
    }

    /// A policy's record, acquiring its selectors and rule ids.
    fn index_policy(&mut self, ix: &mut Indexes, cluster: &Cluster, name: &Name, np: &NetworkPolicy) -> PolicyRec {
        let default = NetworkPolicySpec::default();
        let spec = np.spec.as_ref().unwrap_or(&default);
        let (ingress, egress) = policy_types(spec);
        let mut rec = PolicyRec {
            pod_selector: selector_or_all(spec.pod_selector.as_ref()),
            isolates: [ingress, egress],
            audited: cluster.policy_audited(&name.0, np),
            rules: [Vec::new(), Vec::new()],
            networks: networks_of(np),
            selectors: Vec::new(),
        };
        let ingress = spec.ingress.iter().flatten().map(|r| (r.from.as_deref(), r.ports.as_deref()));
        let egress = spec.egress.iter().flatten().map(|r| (r.to.as_deref(), r.ports.as_deref()));
        for (dir, rules) in [
            (Direction::Ingress, ingress.collect::<Vec<_>>()),
            (Direction::Egress, egress.collect::<Vec<_>>()),
        ] {
            for (index, (peers, ports)) in rules.into_iter().enumerate() {
                let id = self.rules.id(RuleRef {
                    namespace: name.0.clone(),
                    policy: name.1.clone(),
                    direction: dir,
                    index,
                });
                let remotes = match peers {
                    None | Some([]) => None,
                    Some(peers) => Some(peers.iter().filter_map(|p| ix.acquire_selector(name, p)).collect::<Vec<_>>()),
                };
                rec.selectors.extend(remotes.iter().flatten());
                let ports = match ports {
                    None | Some([]) => vec![PortSpec::Any],
                    Some(ports) => ports.iter().filter_map(port_spec).collect(),
                };
                rec.rules[d(dir)].push(RuleRec { id, remotes, ports });
            }
        }
        rec
    }
}

/// Whether no two endpoints share an endpoint id, an ifindex or a pod.
fn distinct(local: &[LocalEndpoint]) -> bool {
    let ids: BTreeSet<u32> = local.iter().map(|e| e.endpoint_id).collect();
    let ifindexes: BTreeSet<u32> = local.iter().map(|e| e.host_ifindex).collect();
    let pods: BTreeSet<(&str, &str)> = local.iter().map(|e| (e.namespace.as_str(), e.pod.as_str())).collect();
    ids.len() == local.len() && ifindexes.len() == local.len() && pods.len() == local.len()
}

impl Indexes {
    /// The selector for `peer` of policy `user`, created (and evaluated against every
    /// identity) if new; `None` for a peer that matches nothing.
    fn acquire_selector(&mut self, user: &Name, peer: &NetworkPolicyPeer) -> Option<u32> {
        let peer = match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
            (Some(block), _, _) => {
                // A block that does not parse (validation rejects it) matches nothing.
                let cidr = model::parse_cidr(&block.cidr).ok()?;
                let except = block
                    .except
                    .iter()
                    .flatten()
                    .map(|e| model::parse_cidr(e))
                    .collect::<Result<Vec<_>, _>>()
                    .ok()?;
                Peer::Block { cidr, except }
            }
            (None, None, None) => return None,
            (None, Some(pod), None) => Peer::Labels {
                namespace: Some(user.0.clone()),
                pod: Some(pod.clone()),
                ns: None,
            },
            (None, pod, Some(ns)) => Peer::Labels {
                namespace: None,
                pod: pod.clone(),
                ns: Some(ns.clone()),
            },
        };
        let key = format!("{peer:?}");
        let sid = match self.selector_ids.get(&key) {
            Some(&sid) => sid,
            None => {
                let sid = self.next_selector;
                self.next_selector = self.next_selector.wrapping_add(1);
                let mut matched: BTreeSet<u32> = self
                    .identities
                    .iter()
                    .filter(|(_, rec)| peer.matches(rec))
                    .map(|(id, _)| *id)
                    .collect();
                matched.extend(self.cidrs.iter().filter(|(net, _)| peer.matches_cidr(**net)).map(|(_, id)| *id));
                self.selectors.insert(
                    sid,
                    Selector {
                        peer,
                        matched,
                        users: BTreeMap::new(),
                    },
                );
                self.selector_ids.insert(key, sid);
                sid
            }
        };
        if let Some(sel) = self.selectors.get_mut(&sid) {
            *sel.users.entry(user.clone()).or_default() += 1;
        }
        Some(sid)
    }

    /// Drops one use of a selector by `user`; the last use removes it.
    fn release_selector(&mut self, sid: u32, user: &Name) {
        let Some(sel) = self.selectors.get_mut(&sid) else { return };
        if let Some(n) = sel.users.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                sel.users.remove(user);
            }
        }
        if sel.users.is_empty() {
            let key = format!("{:?}", sel.peer);
            self.selectors.remove(&sid);
            self.selector_ids.remove(&key);
        }
    }

    /// Forgets policy `pol`'s entries for endpoint `id`.
    fn drop_entries(&mut self, pol: &Name, id: u32, count_changed: &mut BTreeSet<Name>) {
        if let Some(old) = self.entries.remove(&(pol.clone(), id)) {
            if let Some(total) = self.totals.get_mut(pol) {
                *total -= old.len();
            }
            count_changed.insert(pol.clone());
        }
        if let Some(set) = self.effective_for.get_mut(pol) {
            set.remove(&id);
            if set.is_empty() {
                self.effective_for.remove(pol);
            }
        }
    }

    /// The remote identities of a rule: `None` for any.
    fn remote_ids(&self, rule: &RuleRec) -> Option<BTreeSet<u32>> {
        let sels = rule.remotes.as_ref()?;
        let mut ids = BTreeSet::new();
        for s in sels {
            if let Some(sel) = self.selectors.get(s) {
                ids.extend(sel.matched.iter().copied());
            }
        }
        Some(ids)
    }

    /// Policy `pol`'s entries for endpoint `ep` in the directions `dirs` (as `compile`'s
    /// `Ctx::emit` makes them).
    fn entries_for(&self, cluster: &Cluster, rec: &PolicyRec, ep: &LocalEndpoint, dirs: [bool; 2]) -> Entries {
        let mut out = Entries::new();
        let me = cluster.pods().get(&(ep.namespace.clone(), ep.pod.clone()));
        for dir in Direction::ALL {
            if !dirs[d(dir)] {
                continue;
            }
            let dn = dir.number();
            for rule in &rec.rules[d(dir)] {
                let remotes = self.remote_ids(rule);
                let any = BTreeSet::from([identity::ANY]);
                let ids = remotes.as_ref().unwrap_or(&any);
                let emit = |out: &mut Entries, r: u32, protocol: u8, port: u16, prefix: u32| {
                    insert_entry(out, PolicyKey::new(ep.endpoint_id, r, dn, protocol, port), prefix, rule.id);
                };
                for spec in &rule.ports {
                    match spec {
                        PortSpec::Any => {
                            for &r in ids {
                                emit(&mut out, r, proto::ANY, 0, POLICY_PREFIX_ANY_PROTO);
                            }
                        }
                        PortSpec::Protocol(protocol) => {
                            for &r in ids {
                                emit(&mut out, r, *protocol, 0, POLICY_PREFIX_ANY_PORT);
                            }
                        }
                        PortSpec::Range { protocol, lo, hi } => {
                            for (port, prefix) in port_prefixes(*lo, *hi) {
                                for &r in ids {
                                    emit(&mut out, r, *protocol, port, prefix);
                                }
                            }
                        }
                        PortSpec::Named {
                            protocol,
                            protocol_name,
                            name,
                        } => match dir {
                            Direction::Ingress => {
                                for port in me.map(|p| model::named_ports(p, name, protocol_name)).unwrap_or_default() {
                                    for &r in ids {
                                        emit(&mut out, r, *protocol, port, POLICY_PREFIX_FULL);
                                    }
                                }
                            }
                            Direction::Egress => {
                                let mut resolve = |pod_name: &Name| {
                                    let (Some(p), Some(rec)) = (cluster.pods().get(pod_name), self.pods.get(pod_name)) else {
                                        return;
                                    };
                                    for port in model::named_ports(p, name, protocol_name) {
                                        emit(&mut out, rec.identity, *protocol, port, POLICY_PREFIX_FULL);
                                    }
                                };
                                match &remotes {
                                    None => self.pods.keys().for_each(&mut resolve),
                                    Some(ids) => ids
                                        .iter()
                                        .filter_map(|id| self.identities.get(id))
                                        .flat_map(|r| r.pods.iter())
                                        .for_each(&mut resolve),
                                }
                            }
                        },
                    }
                }
            }
        }
        out
    }
}
