//! The compiler: cluster model and local endpoints → exactly what the maps must hold.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use bulkhead_common::{
    endpoint_flags, identity, proto, EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO,
    POLICY_PREFIX_FULL,
};
use ipnetwork::Ipv4Network;
use k8s_openapi::api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::selector;
use crate::model::PodInfo as Pod;
use crate::model::{self, Cluster};
use crate::policy::identity::{Direction, IdentityAllocator, IdentityKey, LabelSet, RuleRef, RuleTable};

use super::evaluate::{isolation, RuleParts};
use super::LocalEndpoint;
use crate::datapath::state::DatapathState;

/// Turns the cluster model into [`DatapathState`], keeping identity and rule ids stable
/// across compiles.
///
/// Two ways in: [`Compiler::compile`] recompiles the whole cluster (the reference), and
/// [`Compiler::update`] (see [`super::incremental`]) recompiles only what changed objects
/// affect and returns the delta.
#[derive(Clone, Debug)]
pub struct Compiler {
    pub(super) identities: IdentityAllocator,
    pub(super) rules: RuleTable,
    /// The most policy map entries one NetworkPolicy may expand to on this node.
    pub(super) policy_cap: usize,
    /// The policies the last compile left out for expanding past `policy_cap`.
    pub(super) over_cap: Vec<OverCap>,
    /// What the last compile or update produced: the baseline of the next delta.
    pub(super) state: DatapathState,
    /// The incremental compiler's indexes, valid for `state`; `None` until the first
    /// [`Compiler::update`] and after a [`Compiler::compile`].
    pub(super) incremental: Option<Box<super::incremental::Indexes>>,
}

impl Default for Compiler {
    fn default() -> Self {
        Compiler {
            identities: IdentityAllocator::default(),
            rules: RuleTable::default(),
            policy_cap: MAX_ENTRIES_PER_POLICY,
            over_cap: Vec::new(),
            state: DatapathState::default(),
            incremental: None,
        }
    }
}

/// The most policy map entries one NetworkPolicy may expand to on a node: a quarter of the
/// map. Tenant input can otherwise fill it (`namespaceSelector: {}` with `endPort` 1–65535
/// is 16 port prefixes × every identity × every selected local pod), and a full map fails
/// every later write, other tenants' included.
pub const MAX_ENTRIES_PER_POLICY: usize = bulkhead_common::capacity::POLICY as usize / 4;

/// A NetworkPolicy the compiler left out because it expands past the cap. Fail closed: it
/// still isolates the pods it selects, but none of its rules allows anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverCap {
    /// The policy's namespace.
    pub namespace: String,
    /// The policy's name.
    pub name: String,
    /// How many entries it would have taken on this node.
    pub entries: usize,
    /// The cap.
    pub cap: usize,
}

impl std::fmt::Display for OverCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NetworkPolicy {}/{} expands to {} policy map entries on this node, more than the {} one policy may take: \
             its rules allow nothing here (the pods it selects stay isolated); narrow its peers or port ranges",
            self.namespace, self.name, self.entries, self.cap
        )
    }
}

/// A cluster pod as the compiler sees it.
struct PodView<'a> {
    namespace: &'a str,
    pod: &'a Pod,
    labels: BTreeMap<String, String>,
    namespace_labels: BTreeMap<String, String>,
    identity: u32,
    ip: Option<Ipv4Addr>,
}

/// Which remote identities a rule admits, and for named egress ports which pods.
enum Remotes<'p, 'a> {
    /// `from`/`to` missing or empty: every remote.
    Any,
    /// The identities matched by the peers, and the matched pods.
    Some { ids: BTreeSet<u32>, pods: Vec<&'p PodView<'a>> },
}

/// One element of a rule's `ports`, decoded.
#[derive(Clone, Debug)]
pub(super) enum PortSpec {
    /// `ports` missing or empty.
    Any,
    /// A protocol, every port.
    Protocol(u8),
    /// A protocol and an inclusive port range (a single port has `lo == hi`).
    Range { protocol: u8, lo: u16, hi: u16 },
    /// A named container port of the destination pod.
    Named { protocol: u8, protocol_name: String, name: String },
}

impl Compiler {
    /// A compiler with empty identity and rule tables.
    pub fn new() -> Self {
        Self::default()
    }

    /// The identity allocator, to name identities in flows.
    pub fn identities(&self) -> &IdentityAllocator {
        &self.identities
    }

    /// The rule table, to name the rule in flows.
    pub fn rules(&self) -> &RuleTable {
        &self.rules
    }

    /// Sets how many policy map entries one NetworkPolicy may expand to (tests use small caps).
    pub fn with_policy_cap(mut self, cap: usize) -> Self {
        self.policy_cap = cap;
        self
    }

    /// The policies the last compile left out for expanding past the cap, by name.
    pub fn over_cap(&self) -> &[OverCap] {
        &self.over_cap
    }

    /// What the last [`Self::compile`] or [`Self::update`] produced.
    pub fn state(&self) -> &DatapathState {
        &self.state
    }

    /// Computes the map contents for `local` endpoints given the whole cluster.
    ///
    /// Also the baseline of the next [`Self::update`], which starts over from the cluster
    /// (its indexes may describe another cluster than this one).
    pub fn compile(&mut self, cluster: &Cluster, local: &[LocalEndpoint]) -> DatapathState {
        let state = self.compile_full(cluster, local);
        self.incremental = None;
        self.state.clone_from(&state);
        state
    }

    pub(super) fn compile_full(&mut self, cluster: &Cluster, local: &[LocalEndpoint]) -> DatapathState {
        let mut state = DatapathState::default();
        let mut local_by_pod: BTreeMap<(&str, &str), &LocalEndpoint> = BTreeMap::new();
        for ep in local {
            local_by_pod.entry((ep.namespace.as_str(), ep.pod.as_str())).or_insert(ep);
        }

        // Every network an ipBlock names (CIDRs and excepts). Each gets an identity for the
        // addresses no pod has; the ipcache's longest-prefix match then resolves an address
        // to the most specific of them.
        let mut networks: BTreeSet<(Ipv4Addr, u8)> = BTreeSet::new();
        for np in cluster.policies().values() {
            for block in ip_blocks(np) {
                networks.extend(block_networks(block).map(|net| (net.network(), net.prefix())));
            }
        }

        let mut used_ids = BTreeSet::new();
        let mut pods = Vec::new();
        for ((ns, name), pod) in cluster.pods() {
            let labels = model::pod_labels(pod);
            let namespace_labels = cluster.namespace_labels(ns);
            let ip = match local_by_pod.get(&(ns.as_str(), name.as_str())) {
                Some(ep) => Some(ep.ipv4),
                None => model::pod_ipv4(pod),
            };
            let label_set = LabelSet::for_pod(ns, &namespace_labels, &labels);
            // Membership in every ipBlock network is part of the identity, so all pods of
            // an identity are on the same side of every block edge: ipBlock peers then
            // match whole identities exactly, and a packet still costs one lookup.
            let inside: Vec<(Ipv4Addr, u8)> = match ip {
                Some(ip) => networks
                    .iter()
                    .filter(|(addr, prefix)| Ipv4Network::new(*addr, *prefix).is_ok_and(|n| n.contains(ip)))
                    .copied()
                    .collect(),
                None => Vec::new(),
            };
            let key = if inside.is_empty() {
                IdentityKey::Labels(label_set)
            } else {
                IdentityKey::LabelsInCidrs {
                    labels: label_set,
                    cidrs: inside,
                }
            };
            let identity = self.identities.allocate(key);
            used_ids.insert(identity);
            pods.push(PodView {
                namespace: ns,
                pod,
                labels,
                namespace_labels,
                identity,
                ip,
            });
        }

        let mut cidrs: BTreeMap<(Ipv4Addr, u8), u32> = BTreeMap::new();
        for &(addr, prefix) in &networks {
            let id = self.identities.allocate(IdentityKey::Cidr { addr, prefix });
            used_ids.insert(id);
            cidrs.insert((addr, prefix), id);
        }
        self.identities.retain_only(&used_ids);

        // CIDRs first so that a pod's /32 wins over an equal ipBlock /32: the pod's
        // identity then gets the block's entries below.
        for (&key, &id) in &cidrs {
            state.ipcache.insert(key, IpcacheValue { identity: id, flags: 0 });
        }
        for p in &pods {
            if let Some(ip) = p.ip {
                state.ipcache.insert(
                    (ip, 32),
                    IpcacheValue {
                        identity: p.identity,
                        flags: 0,
                    },
                );
            }
        }

        let mut used_rules = BTreeSet::new();
        for ((ns, name), np) in cluster.policies() {
            let spec = np.spec.clone().unwrap_or_default();
            let rule = |direction, index| RuleRef {
                namespace: ns.clone(),
                policy: name.clone(),
                direction,
                index,
            };
            for i in 0..spec.ingress.as_ref().map_or(0, Vec::len) {
                used_rules.insert(self.rules.id(rule(Direction::Ingress, i)));
            }
            for i in 0..spec.egress.as_ref().map_or(0, Vec::len) {
                used_rules.insert(self.rules.id(rule(Direction::Egress, i)));
            }
        }
        self.rules.retain_only(&used_rules);

        let ctx = Ctx {
            pods: &pods,
            cidrs: &cidrs,
        };
        // Each policy's entries are gathered apart first, so that one expanding past the cap
        // is left out whole (merging takes the smallest rule id, so the order is free).
        let mut by_policy: BTreeMap<(String, String), BTreeMap<(PolicyKey, u32), PolicyValue>> = BTreeMap::new();
        for ep in local {
            let Some(me) = pods.iter().find(|p| p.namespace == ep.namespace && p.pod.name == ep.pod) else {
                // Unknown pod: fail closed until the model catches up.
                state.endpoints.insert(
                    ep.host_ifindex,
                    endpoint_info(
                        ep,
                        identity::WORLD,
                        endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS,
                    ),
                );
                continue;
            };
            let mut flags = 0;
            for (dir, isolated_flag, audit_flag) in [
                (Direction::Ingress, endpoint_flags::ISOLATED_INGRESS, endpoint_flags::AUDIT_INGRESS),
                (Direction::Egress, endpoint_flags::ISOLATED_EGRESS, endpoint_flags::AUDIT_EGRESS),
            ] {
                let iso = isolation(cluster, me.namespace, &me.labels, dir);
                if iso.isolated() {
                    flags |= isolated_flag;
                } else if iso.audited() {
                    flags |= audit_flag;
                }
                // Only the deciding policies' rules become entries: with an enforcing policy
                // present, an audit policy's allow must not open what the enforcing ones deny.
                for (ns, name) in iso.effective() {
                    let Some(np) = cluster.policy(ns, name) else { continue };
                    let spec = np.spec.clone().unwrap_or_default();
                    let rules: Vec<RuleParts<'_>> = match dir {
                        Direction::Ingress => spec.ingress.iter().flatten().map(|r| (r.from.as_ref(), r.ports.as_ref())).collect(),
                        Direction::Egress => spec.egress.iter().flatten().map(|r| (r.to.as_ref(), r.ports.as_ref())).collect(),
                    };
                    let out = by_policy.entry((ns.to_string(), name.to_string())).or_default();
                    for (i, (peers, ports)) in rules.into_iter().enumerate() {
                        let rule_id = self.rule_id(ns, name, dir, i);
                        let remotes = ctx.remotes(ns, peers.map(Vec::as_slice));
                        ctx.emit(out, ep.endpoint_id, me, dir, &remotes, ports.map(Vec::as_slice), rule_id);
                    }
                }
            }
            state.endpoints.insert(ep.host_ifindex, endpoint_info(ep, me.identity, flags));
        }
        self.over_cap.clear();
        for ((namespace, name), entries) in by_policy {
            if entries.len() > self.policy_cap {
                self.over_cap.push(OverCap {
                    namespace,
                    name,
                    entries: entries.len(),
                    cap: self.policy_cap,
                });
                continue;
            }
            for ((key, prefix), value) in entries {
                state
                    .policy
                    .entry((key, prefix))
                    .and_modify(|v| v.rule_id = v.rule_id.min(value.rule_id))
                    .or_insert(value);
            }
        }
        state
    }

    fn rule_id(&mut self, namespace: &str, policy: &str, direction: Direction, index: usize) -> u32 {
        self.rules.id(RuleRef {
            namespace: namespace.to_string(),
            policy: policy.to_string(),
            direction,
            index,
        })
    }
}

pub(super) fn endpoint_info(ep: &LocalEndpoint, identity: u32, flags: u32) -> EndpointInfo {
    EndpointInfo {
        endpoint_id: ep.endpoint_id,
        identity,
        ipv4: ep.ipv4.octets(),
        flags,
        mac: ep.mac,
        _pad: [0; 2],
    }
}

pub(super) fn selector_or_all(sel: Option<&LabelSelector>) -> LabelSelector {
    sel.cloned().unwrap_or_default()
}

/// (isolates ingress, isolates egress): `policyTypes`, or by default Ingress always and
/// Egress iff the policy has egress rules.
pub(super) fn policy_types(spec: &NetworkPolicySpec) -> (bool, bool) {
    match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => (types.iter().any(|t| t == "Ingress"), types.iter().any(|t| t == "Egress")),
        _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

pub(super) fn ip_blocks(np: &NetworkPolicy) -> impl Iterator<Item = &IPBlock> {
    let spec = np.spec.as_ref();
    let from = spec
        .into_iter()
        .flat_map(|s| s.ingress.iter().flatten())
        .flat_map(|r| r.from.iter().flatten());
    let to = spec
        .into_iter()
        .flat_map(|s| s.egress.iter().flatten())
        .flat_map(|r| r.to.iter().flatten());
    from.chain(to).filter_map(|p| p.ip_block.as_ref())
}

/// The block's CIDR and its excepts; unparsable ones (rejected by validation) are skipped,
/// which only ever removes allowed traffic.
pub(super) fn block_networks(block: &IPBlock) -> impl Iterator<Item = Ipv4Network> + '_ {
    std::iter::once(&block.cidr)
        .chain(block.except.iter().flatten())
        .filter_map(|c| model::parse_cidr(c).ok())
}

/// Whether `inner` lies entirely within `outer`.
pub(super) fn net_within(inner: Ipv4Network, outer: Ipv4Network) -> bool {
    inner.prefix() >= outer.prefix() && outer.contains(inner.network())
}

/// Whether `ip` is in the block's CIDR and outside every except.
pub(super) fn block_contains(block: &IPBlock, ip: Ipv4Addr) -> bool {
    let Ok(cidr) = model::parse_cidr(&block.cidr) else {
        return false;
    };
    cidr.contains(ip)
        && block
            .except
            .iter()
            .flatten()
            .all(|e| model::parse_cidr(e).is_ok_and(|e| !e.contains(ip)))
}

pub(super) fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(proto::TCP),
        "UDP" => Some(proto::UDP),
        "SCTP" => Some(proto::SCTP),
        _ => None,
    }
}

/// Decodes one `ports` element; `None` for what validation rejects (skipped: fail closed).
pub(super) fn port_spec(p: &NetworkPolicyPort) -> Option<PortSpec> {
    let protocol_name = p.protocol.clone().unwrap_or_else(|| "TCP".to_string());
    let protocol = protocol_number(&protocol_name)?;
    Some(match &p.port {
        None => PortSpec::Protocol(protocol),
        Some(IntOrString::Int(port)) => {
            let lo = u16::try_from(*port).ok().filter(|&p| p != 0)?;
            let hi = match p.end_port {
                Some(end) => u16::try_from(end).ok().filter(|&e| e >= lo)?,
                None => lo,
            };
            PortSpec::Range { protocol, lo, hi }
        }
        Some(IntOrString::String(name)) => PortSpec::Named {
            protocol,
            protocol_name,
            name: name.clone(),
        },
    })
}

/// The minimal set of aligned port blocks covering `lo..=hi`, as (first port, LPM prefix
/// length of the policy key).
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // The largest power-of-two block starting at `lo` that stays within `hi`.
        let mut size: u32 = if lo == 0 { 1 << 16 } else { lo & lo.wrapping_neg() };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let port_bits = 16 - size.trailing_zeros();
        #[expect(clippy::cast_possible_truncation, reason = "lo <= hi <= u16::MAX inside the loop")]
        out.push((lo as u16, POLICY_PREFIX_ANY_PORT + port_bits));
        lo += size;
    }
    out
}

/// Inserts an allow entry, keeping the lowest rule id when several rules produce it.
pub(super) fn insert_entry(policy: &mut BTreeMap<(PolicyKey, u32), PolicyValue>, key: PolicyKey, prefix: u32, rule_id: u32) {
    policy
        .entry((key, prefix))
        .and_modify(|v| v.rule_id = v.rule_id.min(rule_id))
        .or_insert(PolicyValue { rule_id, flags: 0 });
}

struct Ctx<'p, 'a> {
    pods: &'p [PodView<'a>],
    cidrs: &'p BTreeMap<(Ipv4Addr, u8), u32>,
}

impl<'p, 'a> Ctx<'p, 'a> {
    /// Pods a selector peer matches (podSelector alone: the policy's namespace;
    /// namespaceSelector alone: all pods of matching namespaces; both: AND).
    fn selector_peer_matches(policy_ns: &str, peer: &NetworkPolicyPeer, p: &PodView<'_>) -> bool {
        match (&peer.pod_selector, &peer.namespace_selector) {
            (None, None) => false,
            (Some(ps), None) => p.namespace == policy_ns && selector::matches(ps, &p.labels),
            (None, Some(ns)) => selector::matches(ns, &p.namespace_labels),
            (Some(ps), Some(ns)) => selector::matches(ns, &p.namespace_labels) && selector::matches(ps, &p.labels),
        }
    }

    /// Identities (and pods) an ipBlock peer matches.
    ///
    /// Non-pod addresses resolve through the ipcache to the most specific known CIDR, so a
    /// CIDR identity matches iff its prefix lies within the block's CIDR and not within any
    /// except (any except containing the address is itself a known, longer prefix).
    ///
    /// Pod addresses resolve to the pod's identity, which may group several pods. Their
    /// membership in every ipBlock network is part of the identity key, so its pods are all
    /// inside the block or all outside: the identity matches iff they are inside (the
    /// check over every pod below is then exact, and still errs closed if it ever were not).
    fn ip_block_matches(&self, block: &IPBlock, ids: &mut BTreeSet<u32>, pods: &mut Vec<&'p PodView<'a>>) {
        // A block that does not parse (validation rejects it) matches nothing: fail closed.
        let Ok(cidr) = model::parse_cidr(&block.cidr) else {
            return;
        };
        let Ok(excepts) = block
            .except
            .iter()
            .flatten()
            .map(|e| model::parse_cidr(e))
            .collect::<Result<Vec<_>, _>>()
        else {
            return;
        };
        for (&(addr, prefix), &id) in self.cidrs {
            let Ok(net) = Ipv4Network::new(addr, prefix) else {
                continue;
            };
            if net_within(net, cidr) && !excepts.iter().any(|&e| net_within(net, e)) {
                ids.insert(id);
            }
        }
        let mut verdict: BTreeMap<u32, bool> = BTreeMap::new();
        for p in self.pods {
            if let Some(ip) = p.ip {
                let inside = block_contains(block, ip);
                verdict.entry(p.identity).and_modify(|v| *v &= inside).or_insert(inside);
            }
        }
        for p in self.pods {
            if verdict.get(&p.identity) == Some(&true) && p.ip.is_some() {
                ids.insert(p.identity);
                pods.push(p);
            }
        }
    }

    fn remotes(&self, policy_ns: &str, peers: Option<&[NetworkPolicyPeer]>) -> Remotes<'p, 'a> {
        let peers = peers.unwrap_or_default();
        if peers.is_empty() {
            return Remotes::Any;
        }
        let mut ids = BTreeSet::new();
        let mut pods = Vec::new();
        for peer in peers {
            if let Some(block) = &peer.ip_block {
                self.ip_block_matches(block, &mut ids, &mut pods);
                continue;
            }
            for p in self.pods {
                if Self::selector_peer_matches(policy_ns, peer, p) {
                    ids.insert(p.identity);
                    pods.push(p);
                }
            }
        }
        Remotes::Some { ids, pods }
    }

    /// Emits the entries of one rule for one local endpoint.
    #[expect(clippy::too_many_arguments, reason = "one call site per direction, all plain inputs")]
    fn emit(
        &self,
        out: &mut BTreeMap<(PolicyKey, u32), PolicyValue>,
        endpoint_id: u32,
        me: &PodView<'_>,
        dir: Direction,
        remotes: &Remotes<'p, 'a>,
        ports: Option<&[NetworkPolicyPort]>,
        rule_id: u32,
    ) {
        let d = dir.number();
        let any = BTreeSet::from([identity::ANY]);
        let ids = match remotes {
            Remotes::Any => &any,
            Remotes::Some { ids, .. } => ids,
        };
        let specs: Vec<PortSpec> = match ports {
            None | Some([]) => vec![PortSpec::Any],
            Some(ports) => ports.iter().filter_map(port_spec).collect(),
        };
        for spec in specs {
            match spec {
                PortSpec::Any => {
                    for &r in ids {
                        insert_entry(
                            out,
                            PolicyKey::new(endpoint_id, r, d, proto::ANY, 0),
                            POLICY_PREFIX_ANY_PROTO,
                            rule_id,
                        );
                    }
                }
                PortSpec::Protocol(protocol) => {
                    for &r in ids {
                        insert_entry(out, PolicyKey::new(endpoint_id, r, d, protocol, 0), POLICY_PREFIX_ANY_PORT, rule_id);
                    }
                }
                PortSpec::Range { protocol, lo, hi } => {
                    for (port, prefix) in port_prefixes(lo, hi) {
                        for &r in ids {
                            insert_entry(out, PolicyKey::new(endpoint_id, r, d, protocol, port), prefix, rule_id);
                        }
                    }
                }
                PortSpec::Named {
                    protocol,
                    protocol_name,
                    name,
                } => match dir {
                    // Ingress: the destination is the local pod itself, so the name resolves once.
                    Direction::Ingress => {
                        for port in model::named_ports(me.pod, &name, &protocol_name) {
                            for &r in ids {
                                insert_entry(out, PolicyKey::new(endpoint_id, r, d, protocol, port), POLICY_PREFIX_FULL, rule_id);
                            }
                        }
                    }
                    // Egress: the name resolves per destination pod and the entry is keyed by that
                    // pod's identity. An identity can group pods (same namespace and labels) that
                    // map the name to different numbers; the identity then gets every number,
                    // so one of those pods is reachable on another's port if it listens there.
                    // Non-pod destinations have no named ports and get nothing.
                    Direction::Egress => {
                        let candidates: Vec<&PodView<'_>> = match remotes {
                            Remotes::Any => self.pods.iter().collect(),
                            Remotes::Some { pods, .. } => pods.clone(),
                        };
                        for p in candidates {
                            for port in model::named_ports(p.pod, &name, &protocol_name) {
                                insert_entry(
                                    out,
                                    PolicyKey::new(endpoint_id, p.identity, d, protocol, port),
                                    POLICY_PREFIX_FULL,
                                    rule_id,
                                );
                            }
                        }
                    }
                },
            }
        }
    }
}
