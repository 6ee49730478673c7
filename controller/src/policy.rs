//! The policy compiler (cluster model → datapath map contents), a datapath-equivalent
//! lookup over its output, and an evaluator written straight from the NetworkPolicy spec.
//!
//! The evaluator exists to check the compiler: tests compare `lookup(compile(..))` with
//! `evaluate(..)` over whole clusters.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use bulkhead_common::{
    direction, endpoint_flags, identity, proto, verdict, EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, POLICY_PREFIX_ANY_PORT,
    POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL,
};
use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::identity::{Direction, IdentityAllocator, IdentityKey, LabelSet, RuleRef, RuleTable};
use crate::model::{self, Cluster};
use crate::selector;

/// A pod with a veth on this node, as the endpoint manager knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// Agent-assigned endpoint id.
    pub endpoint_id: u32,
    /// Ifindex of the host-side veth.
    pub host_ifindex: u32,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod IPv4 address (authoritative for local pods: the CNI plugin assigned it).
    pub ipv4: Ipv4Addr,
    /// Pod-side MAC address.
    pub mac: [u8; 6],
}

/// Exactly what the eBPF maps must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathState {
    /// Host-side ifindex → endpoint.
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    /// (address, prefix length) → identity; address host bits are zero.
    pub ipcache: BTreeMap<(Ipv4Addr, u8), IpcacheValue>,
    /// (key, LPM prefix length) → verdict; key bits past the prefix are zero.
    pub policy: BTreeMap<(PolicyKey, u32), PolicyValue>,
}

/// Turns the cluster model into [`DatapathState`], keeping identity and rule ids stable
/// across compiles.
#[derive(Clone, Debug, Default)]
pub struct Compiler {
    identities: IdentityAllocator,
    rules: RuleTable,
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
enum PortSpec {
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

    /// Computes the map contents for `local` endpoints given the whole cluster.
    pub fn compile(&mut self, cluster: &Cluster, local: &[LocalEndpoint]) -> DatapathState {
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
        for ep in local {
            let Some(me) = pods
                .iter()
                .find(|p| p.namespace == ep.namespace && p.pod.metadata.name.as_deref() == Some(&ep.pod))
            else {
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
                    for (i, (peers, ports)) in rules.into_iter().enumerate() {
                        let rule_id = self.rule_id(ns, name, dir, i);
                        let remotes = ctx.remotes(ns, peers.map(Vec::as_slice));
                        ctx.emit(
                            &mut state.policy,
                            ep.endpoint_id,
                            me,
                            dir,
                            &remotes,
                            ports.map(Vec::as_slice),
                            rule_id,
                        );
                    }
                }
            }
            state.endpoints.insert(ep.host_ifindex, endpoint_info(ep, me.identity, flags));
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

fn endpoint_info(ep: &LocalEndpoint, identity: u32, flags: u32) -> EndpointInfo {
    EndpointInfo {
        endpoint_id: ep.endpoint_id,
        identity,
        ipv4: ep.ipv4.octets(),
        flags,
        mac: ep.mac,
        _pad: [0; 2],
    }
}

fn selector_or_all(sel: Option<&LabelSelector>) -> LabelSelector {
    sel.cloned().unwrap_or_default()
}

/// (isolates ingress, isolates egress): `policyTypes`, or by default Ingress always and
/// Egress iff the policy has egress rules.
fn policy_types(spec: &NetworkPolicySpec) -> (bool, bool) {
    match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => (types.iter().any(|t| t == "Ingress"), types.iter().any(|t| t == "Egress")),
        _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

/// How the policies of a pod's namespace isolate it for one direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Isolation {
    /// Enforcing policies (namespace, name) that select the pod for the direction.
    pub enforcing: Vec<(String, String)>,
    /// Audit-mode policies that select it.
    pub audit: Vec<(String, String)>,
}

impl Isolation {
    /// Whether an enforcing policy isolates the pod: what none of them allows is dropped.
    pub fn isolated(&self) -> bool {
        !self.enforcing.is_empty()
    }

    /// Whether only audit-mode policies isolate the pod: what none of them allows is
    /// forwarded and reported as AUDIT.
    pub fn audited(&self) -> bool {
        self.enforcing.is_empty() && !self.audit.is_empty()
    }

    /// The policies whose rules decide: the enforcing ones if any (audit-mode policies are
    /// then ignored), else the audit-mode ones.
    pub fn effective(&self) -> &[(String, String)] {
        if self.enforcing.is_empty() {
            &self.audit
        } else {
            &self.enforcing
        }
    }
}

/// The policies of `namespace` that select a pod with `labels` for `dir`, split into
/// enforcing and audit-mode ones.
pub fn isolation(cluster: &Cluster, namespace: &str, labels: &BTreeMap<String, String>, dir: Direction) -> Isolation {
    let mut out = Isolation::default();
    for ((ns, name), np) in cluster.policies() {
        if ns != namespace {
            continue;
        }
        let spec = np.spec.clone().unwrap_or_default();
        if !selector::matches(&selector_or_all(spec.pod_selector.as_ref()), labels) {
            continue;
        }
        let (ingress, egress) = policy_types(&spec);
        let isolates = match dir {
            Direction::Ingress => ingress,
            Direction::Egress => egress,
        };
        if !isolates {
            continue;
        }
        let list = if cluster.policy_audited(ns, np) {
            &mut out.audit
        } else {
            &mut out.enforcing
        };
        list.push((ns.clone(), name.clone()));
    }
    out
}

/// The policies (namespace, name) whose rules decide for a pod with `labels` in
/// `namespace` for `dir` (see [`Isolation::effective`]): those that isolate it, so that
/// what none of them allows is dropped, or under audit mode reported.
pub fn isolating_policies(cluster: &Cluster, namespace: &str, labels: &BTreeMap<String, String>, dir: Direction) -> Vec<(String, String)> {
    isolation(cluster, namespace, labels, dir).effective().to_vec()
}

fn ip_blocks(np: &NetworkPolicy) -> impl Iterator<Item = &IPBlock> {
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
fn block_networks(block: &IPBlock) -> impl Iterator<Item = Ipv4Network> + '_ {
    std::iter::once(&block.cidr)
        .chain(block.except.iter().flatten())
        .filter_map(|c| model::parse_cidr(c).ok())
}

/// Whether `inner` lies entirely within `outer`.
fn net_within(inner: Ipv4Network, outer: Ipv4Network) -> bool {
    inner.prefix() >= outer.prefix() && outer.contains(inner.network())
}

/// Whether `ip` is in the block's CIDR and outside every except.
fn block_contains(block: &IPBlock, ip: Ipv4Addr) -> bool {
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

fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(proto::TCP),
        "UDP" => Some(proto::UDP),
        "SCTP" => Some(proto::SCTP),
        _ => None,
    }
}

/// Decodes one `ports` element; `None` for what validation rejects (skipped: fail closed).
fn port_spec(p: &NetworkPolicyPort) -> Option<PortSpec> {
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
fn insert_entry(policy: &mut BTreeMap<(PolicyKey, u32), PolicyValue>, key: PolicyKey, prefix: u32, rule_id: u32) {
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
        let d = dir.as_u8();
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

/// The identity the datapath's ipcache gives `ip`: longest prefix, else [`identity::WORLD`].
pub fn ipcache_lookup(state: &DatapathState, ip: Ipv4Addr) -> u32 {
    (0..=32u8)
        .rev()
        .find_map(|len| {
            let net = Ipv4Network::new(ip, len).ok()?;
            state.ipcache.get(&(net.network(), len)).map(|v| v.identity)
        })
        .unwrap_or(identity::WORLD)
}

fn key_bytes(k: &PolicyKey) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&k.endpoint_id);
    b[4..8].copy_from_slice(&k.remote_identity);
    b[8] = k.direction;
    b[9] = k.protocol;
    b[10..12].copy_from_slice(&k.dport);
    b
}

fn key_from_bytes(b: [u8; 12]) -> PolicyKey {
    PolicyKey {
        endpoint_id: [b[0], b[1], b[2], b[3]],
        remote_identity: [b[4], b[5], b[6], b[7]],
        direction: b[8],
        protocol: b[9],
        dport: [b[10], b[11]],
    }
}

/// `key` with every bit past the first `prefix` bits cleared, as an LPM trie compares it.
fn masked(key: &PolicyKey, prefix: u32) -> PolicyKey {
    let mut b = key_bytes(key);
    for (i, byte) in b.iter_mut().enumerate() {
        let start = u32::try_from(i).unwrap_or(u32::MAX).saturating_mul(8);
        if start >= prefix {
            *byte = 0;
        } else if prefix - start < 8 {
            *byte &= 0xffu8 << (8 - (prefix - start));
        }
    }
    key_from_bytes(b)
}

/// What the datapath decides for one flow at one endpoint: `None` drops it, `Some` allows it
/// naming the rule (0 when the endpoint is not isolated in that direction, or when an
/// audit-mode direction lets through what no rule allows).
pub fn lookup(state: &DatapathState, ifindex: u32, dir: u8, remote_ip: Ipv4Addr, protocol: u8, port: u16) -> Option<PolicyValue> {
    lookup_verdict(state, ifindex, dir, remote_ip, protocol, port).map(|(_, v)| v)
}

/// As [`lookup`], with the flow verdict the datapath reports: `None` drops it, else
/// ([`verdict::FORWARDED`] or [`verdict::AUDIT`], the matching entry or a default one).
///
/// Mirrors the programs: endpoint by ifindex, isolation and audit flags, ipcache longest
/// prefix, then a policy LPM lookup with the exact remote identity and, failing that, with
/// `ANY`; a miss drops on an isolated direction and is audited on an audit-only one.
pub fn lookup_verdict(
    state: &DatapathState,
    ifindex: u32,
    dir: u8,
    remote_ip: Ipv4Addr,
    protocol: u8,
    port: u16,
) -> Option<(u8, PolicyValue)> {
    let ep = state.endpoints.get(&ifindex)?;
    let (isolated, audit) = if dir == direction::INGRESS {
        (endpoint_flags::ISOLATED_INGRESS, endpoint_flags::AUDIT_INGRESS)
    } else {
        (endpoint_flags::ISOLATED_EGRESS, endpoint_flags::AUDIT_EGRESS)
    };
    if ep.flags & (isolated | audit) == 0 {
        return Some((verdict::FORWARDED, PolicyValue::default()));
    }
    let remote = ipcache_lookup(state, remote_ip);
    let found = [remote, identity::ANY].into_iter().find_map(|r| {
        let key = PolicyKey::new(ep.endpoint_id, r, dir, protocol, port);
        (POLICY_PREFIX_ANY_PROTO..=POLICY_PREFIX_FULL)
            .rev()
            .find_map(|prefix| state.policy.get(&(masked(&key, prefix), prefix)).copied())
    });
    match found {
        Some(v) => Some((verdict::FORWARDED, v)),
        None if ep.flags & isolated == 0 => Some((verdict::AUDIT, PolicyValue::default())),
        None => None,
    }
}

/// The outcome of one direction of a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No policy of the pod's namespace selects it for this direction.
    NotIsolated,
    /// Allowed by this rule (the first in policy and rule order that allows it).
    Allowed(RuleRef),
    /// Isolated by these policies (namespace, name), none of which allows the flow.
    Denied(Vec<(String, String)>),
    /// Isolated only by these audit-mode policies, none of which allows the flow: it would
    /// be denied, so it is forwarded and reported as audited.
    Audited(Vec<(String, String)>),
    /// The pod or its peer is not in the cluster, so the spec cannot say.
    UnknownPod,
}

impl Decision {
    /// Whether this direction lets the flow through.
    pub fn allows(&self) -> bool {
        matches!(self, Decision::NotIsolated | Decision::Allowed(_) | Decision::Audited(_))
    }
}

/// The spec's answer for a connection: both the sender's egress and the receiver's
/// ingress must allow it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the connection is allowed.
    pub allowed: bool,
    /// The sender's egress decision.
    pub egress: Decision,
    /// The receiver's ingress decision.
    pub ingress: Decision,
}

impl Verdict {
    /// Whether the connection is let through only because a direction is in audit mode.
    pub fn audited(&self) -> bool {
        self.allowed && (matches!(self.egress, Decision::Audited(_)) || matches!(self.ingress, Decision::Audited(_)))
    }
}

/// Evaluates a connection from pod `from` to pod `to` (each `(namespace, name)`) on
/// `protocol` (`TCP`, `UDP`, `SCTP`) and destination `port`, straight from the
/// NetworkPolicy spec. Pod addresses (for ipBlock) come from `status.podIP`.
pub fn evaluate(cluster: &Cluster, from: (&str, &str), to: (&str, &str), protocol: &str, port: u16) -> Verdict {
    let src = cluster.pod(from.0, from.1);
    let dst = cluster.pod(to.0, to.1);
    let (Some(src), Some(dst)) = (src, dst) else {
        return Verdict {
            allowed: false,
            egress: Decision::UnknownPod,
            ingress: Decision::UnknownPod,
        };
    };
    let protocol = protocol.to_ascii_uppercase();
    let src = (from.0, src);
    let dst = (to.0, dst);
    let egress = decide(cluster, Direction::Egress, src, dst, dst, &protocol, port);
    let ingress = decide(cluster, Direction::Ingress, dst, src, dst, &protocol, port);
    Verdict {
        allowed: egress.allows() && ingress.allows(),
        egress,
        ingress,
    }
}

/// A rule's peers (`from` or `to`) and ports.
type RuleParts<'s> = (Option<&'s Vec<NetworkPolicyPeer>>, Option<&'s Vec<NetworkPolicyPort>>);

/// One direction of [`evaluate`]: does `subject`'s namespace isolate it, and if so does
/// some rule admit `peer`? Named ports resolve against `destination`.
fn decide(
    cluster: &Cluster,
    dir: Direction,
    subject: (&str, &Pod),
    peer: (&str, &Pod),
    destination: (&str, &Pod),
    protocol: &str,
    port: u16,
) -> Decision {
    let subject_labels = model::pod_labels(subject.1);
    // (namespace, name, spec, audit mode) of every policy isolating the subject.
    let mut isolating = Vec::new();
    for ((ns, name), np) in cluster.policies() {
        if ns != subject.0 {
            continue;
        }
        let spec = np.spec.clone().unwrap_or_default();
        let selects = spec.pod_selector.as_ref().is_none_or(|s| selector::matches(s, &subject_labels));
        if !selects {
            continue;
        }
        // policyTypes, defaulted as the API server does.
        let types = match spec.policy_types.clone().filter(|t| !t.is_empty()) {
            Some(t) => t,
            None => {
                let mut t = vec!["Ingress".to_string()];
                if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                    t.push("Egress".to_string());
                }
                t
            }
        };
        let wanted = match dir {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        };
        if !types.iter().any(|t| t == wanted) {
            continue;
        }
        isolating.push((ns, name, spec, cluster.policy_audited(ns, np)));
    }
    // Audit mode: enforcing policies alone decide when there is one; audit-mode policies
    // decide only when nothing enforces, and what they deny is audited, not dropped.
    let enforcing = isolating.iter().any(|(_, _, _, audit)| !audit);
    for (ns, name, spec, _) in isolating.iter().filter(|(_, _, _, audit)| *audit != enforcing) {
        let rules: Vec<RuleParts<'_>> = match dir {
            Direction::Ingress => spec.ingress.iter().flatten().map(|r| (r.from.as_ref(), r.ports.as_ref())).collect(),
            Direction::Egress => spec.egress.iter().flatten().map(|r| (r.to.as_ref(), r.ports.as_ref())).collect(),
        };
        for (index, (peers, ports)) in rules.into_iter().enumerate() {
            let peer_ok = match peers {
                None => true,
                Some(list) if list.is_empty() => true,
                Some(list) => list.iter().any(|p| peer_admits(cluster, ns, p, peer)),
            };
            let port_ok = match ports {
                None => true,
                Some(list) if list.is_empty() => true,
                Some(list) => list.iter().any(|p| port_admits(p, destination.1, protocol, port)),
            };
            if peer_ok && port_ok {
                return Decision::Allowed(RuleRef {
                    namespace: (*ns).clone(),
                    policy: (*name).clone(),
                    direction: dir,
                    index,
                });
            }
        }
    }
    let names = isolating
        .iter()
        .filter(|(_, _, _, audit)| *audit != enforcing)
        .map(|(ns, name, _, _)| ((*ns).clone(), (*name).clone()))
        .collect();
    match (isolating.is_empty(), enforcing) {
        (true, _) => Decision::NotIsolated,
        (false, true) => Decision::Denied(names),
        (false, false) => Decision::Audited(names),
    }
}

/// Whether a `from`/`to` element selects the pod `(namespace, pod)`.
fn peer_admits(cluster: &Cluster, policy_ns: &str, peer: &NetworkPolicyPeer, pod: (&str, &Pod)) -> bool {
    if let Some(block) = &peer.ip_block {
        return model::pod_ipv4(pod.1).is_some_and(|ip| block_contains(block, ip));
    }
    let labels = model::pod_labels(pod.1);
    let ns_ok = match &peer.namespace_selector {
        Some(sel) => selector::matches(sel, &cluster.namespace_labels(pod.0)),
        // Without a namespaceSelector, a podSelector looks only in the policy's namespace.
        None => pod.0 == policy_ns,
    };
    let pod_ok = match &peer.pod_selector {
        Some(sel) => selector::matches(sel, &labels),
        None => true,
    };
    // A peer with neither selector nor ipBlock is invalid; it admits nothing.
    (peer.namespace_selector.is_some() || peer.pod_selector.is_some()) && ns_ok && pod_ok
}

/// Whether a `ports` element admits `protocol`/`port` to `destination`.
fn port_admits(p: &NetworkPolicyPort, destination: &Pod, protocol: &str, port: u16) -> bool {
    let rule_protocol = p.protocol.as_deref().unwrap_or("TCP");
    if rule_protocol != protocol {
        return false;
    }
    match &p.port {
        None => true,
        Some(IntOrString::Int(n)) => {
            let end = p.end_port.unwrap_or(*n);
            *n <= i32::from(port) && i32::from(port) <= end
        }
        Some(IntOrString::String(name)) => model::named_ports(destination, name, protocol).contains(&port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_documents;

    const NAMESPACES: [&str; 3] = ["x", "y", "z"];
    const PODS: [&str; 3] = ["a", "b", "c"];

    fn pod_ip(ns: usize, pod: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, u8::try_from(ns + 1).unwrap(), u8::try_from(pod + 1).unwrap())
    }

    /// Namespaces x, y, z (label ns=<name>), each with pods a, b, c (label pod=<name>).
    /// Named port `http` is 80 on a and c but 8080 on b; `dns` is UDP 53 everywhere.
    fn base_yaml() -> String {
        let mut out = String::new();
        for (i, ns) in NAMESPACES.iter().enumerate() {
            out.push_str(&format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
            ));
            for (j, pod) in PODS.iter().enumerate() {
                let http = if *pod == "b" { 8080 } else { 80 };
                out.push_str(&format!(
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\n\
                     spec:\n  nodeName: n1\n  containers:\n  - name: c\n    ports:\n    - {{name: http, containerPort: {http}}}\n\
                     \x20   - {{name: dns, containerPort: 53, protocol: UDP}}\nstatus: {{podIP: {}}}\n",
                    pod_ip(i, j)
                ));
            }
        }
        out
    }

    fn cluster(policies: &str) -> Cluster {
        let mut objects = parse_documents(&base_yaml(), "base.yaml").expect("base parses");
        objects.extend(parse_documents(policies, "policies.yaml").expect("policies parse"));
        Cluster::from_objects(objects)
    }

    fn locals() -> Vec<LocalEndpoint> {
        let mut out = Vec::new();
        for (i, ns) in NAMESPACES.iter().enumerate() {
            for (j, pod) in PODS.iter().enumerate() {
                let n = u32::try_from(i * 3 + j).unwrap();
                out.push(LocalEndpoint {
                    endpoint_id: 1 + n,
                    host_ifindex: 100 + n,
                    namespace: ns.to_string(),
                    pod: pod.to_string(),
                    ipv4: pod_ip(i, j),
                    mac: [2, 0, 0, 0, 0, u8::try_from(n).unwrap()],
                });
            }
        }
        out
    }

    fn ep<'l>(locals: &'l [LocalEndpoint], name: &str) -> &'l LocalEndpoint {
        let (ns, pod) = name.split_once('/').unwrap();
        locals.iter().find(|e| e.namespace == ns && e.pod == pod).unwrap()
    }

    fn np(ns: &str, name: &str, spec: &str) -> String {
        format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")
    }

    /// A policy with `bulkhead.io/audit` set to `audit`.
    fn np_audit(ns: &str, name: &str, audit: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: {name}, namespace: {ns}, annotations: {{bulkhead.io/audit: \"{audit}\"}}}}\nspec:\n{spec}"
        )
    }

    /// Namespace `ns` (label ns=<name>) re-applied with `bulkhead.io/policy-audit: "true"`.
    fn audit_namespace(ns: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Namespace\n\
             metadata: {{name: {ns}, labels: {{ns: {ns}}}, annotations: {{bulkhead.io/policy-audit: \"true\"}}}}\n"
        )
    }

    fn proto_num(p: &str) -> u8 {
        protocol_number(p).unwrap()
    }

    /// (egress allowed, ingress allowed) as the datapath would decide.
    fn datapath(state: &DatapathState, locals: &[LocalEndpoint], from: &str, to: &str, protocol: &str, port: u16) -> (bool, bool) {
        let (f, t) = (ep(locals, from), ep(locals, to));
        let p = proto_num(protocol);
        (
            lookup(state, f.host_ifindex, direction::EGRESS, t.ipv4, p, port).is_some(),
            lookup(state, t.host_ifindex, direction::INGRESS, f.ipv4, p, port).is_some(),
        )
    }

    /// (egress, ingress) flow verdicts as the datapath would report them; `None`: dropped.
    fn datapath_verdicts(
        state: &DatapathState,
        locals: &[LocalEndpoint],
        from: &str,
        to: &str,
        protocol: &str,
        port: u16,
    ) -> (Option<u8>, Option<u8>) {
        let (f, t) = (ep(locals, from), ep(locals, to));
        let p = proto_num(protocol);
        (
            lookup_verdict(state, f.host_ifindex, direction::EGRESS, t.ipv4, p, port).map(|(v, _)| v),
            lookup_verdict(state, t.host_ifindex, direction::INGRESS, f.ipv4, p, port).map(|(v, _)| v),
        )
    }

    /// The flow verdict a decision stands for; `None`: dropped.
    fn flow_verdict(d: &Decision) -> Option<u8> {
        match d {
            Decision::NotIsolated | Decision::Allowed(_) => Some(verdict::FORWARDED),
            Decision::Audited(_) => Some(verdict::AUDIT),
            Decision::Denied(_) | Decision::UnknownPod => None,
        }
    }

    fn spec_says(c: &Cluster, from: &str, to: &str, protocol: &str, port: u16) -> Verdict {
        let f = from.split_once('/').unwrap();
        let t = to.split_once('/').unwrap();
        evaluate(c, f, t, protocol, port)
    }

    fn all_pods() -> Vec<String> {
        NAMESPACES
            .iter()
            .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
            .collect()
    }

    /// Asserts, for every case, the datapath verdict and the spec verdict.
    fn check(policies: &str, cases: &[(&str, &str, &str, u16, bool)]) {
        let c = cluster(policies);
        let l = locals();
        let state = Compiler::new().compile(&c, &l);
        for &(from, to, protocol, port, want) in cases {
            let (e, i) = datapath(&state, &l, from, to, protocol, port);
            assert_eq!(
                e && i,
                want,
                "datapath {from} -> {to} {protocol}/{port} (egress {e}, ingress {i})\n{policies}"
            );
            let v = spec_says(&c, from, to, protocol, port);
            assert_eq!(v.allowed, want, "evaluate {from} -> {to} {protocol}/{port}: {v:?}\n{policies}");
        }
    }

    const DENY_X: &str = "  podSelector: {}\n";

    #[test]
    fn no_policy_allows_everything() {
        let c = cluster("");
        let l = locals();
        let state = Compiler::new().compile(&c, &l);
        assert!(state.policy.is_empty());
        assert!(state.endpoints.values().all(|e| e.flags == 0));
        assert_eq!(state.ipcache.len(), 9);
        check("", &[("x/a", "y/b", "TCP", 80, true)]);
    }

    #[test]
    fn default_deny_ingress_isolates_only_its_namespace() {
        let policies = np("x", "deny", DENY_X);
        let c = cluster(&policies);
        let l = locals();
        let state = Compiler::new().compile(&c, &l);
        let xa = state.endpoints[&ep(&l, "x/a").host_ifindex];
        assert_eq!(xa.flags, endpoint_flags::ISOLATED_INGRESS);
        assert_eq!(state.endpoints[&ep(&l, "y/a").host_ifindex].flags, 0);
        assert!(state.policy.is_empty());
        check(
            &policies,
            &[
                ("y/a", "x/a", "TCP", 80, false),
                ("x/b", "x/a", "UDP", 53, false),
                ("x/a", "y/a", "TCP", 80, true),
            ],
        );
    }

    #[test]
    fn endpoint_entry_carries_identity_address_mac_and_flags() {
        let c = cluster("");
        let l = locals();
        let mut comp = Compiler::new();
        let state = comp.compile(&c, &l);
        let e = ep(&l, "y/c");
        let info = state.endpoints[&e.host_ifindex];
        assert_eq!((info.endpoint_id, info.ipv4, info.mac), (e.endpoint_id, e.ipv4.octets(), e.mac));
        assert_eq!(state.ipcache[&(e.ipv4, 32)].identity, info.identity);
        assert!(info.identity >= identity::FIRST_ALLOCATED);
        let key = comp.identities().key(info.identity).unwrap();
        assert!(key.to_string().contains("pod:pod=c"), "{key}");
    }

    #[test]
    fn allow_from_pod_b_in_any_namespace() {
        let policies = np("x", "allow-b", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n      namespaceSelector: {}\n");
        let c = cluster(&policies);
        let l = locals();
        let mut comp = Compiler::new();
        let state = comp.compile(&c, &l);
        let xa = ep(&l, "x/a");
        let ids: BTreeSet<u32> = ["x/b", "y/b", "z/b"]
            .iter()
            .map(|p| state.endpoints[&ep(&l, p).host_ifindex].identity)
            .collect();
        let rule = comp
            .rules()
            .get(&RuleRef {
                namespace: "x".into(),
                policy: "allow-b".into(),
                direction: Direction::Ingress,
                index: 0,
            })
            .unwrap();
        let want: BTreeMap<(PolicyKey, u32), PolicyValue> = ids
            .iter()
            .map(|&id| {
                (
                    (
                        PolicyKey::new(xa.endpoint_id, id, direction::INGRESS, 0, 0),
                        POLICY_PREFIX_ANY_PROTO,
                    ),
                    PolicyValue { rule_id: rule, flags: 0 },
                )
            })
            .collect();
        assert_eq!(state.policy, want);
        assert_eq!(
            lookup(&state, xa.host_ifindex, direction::INGRESS, ep(&l, "z/b").ipv4, proto::UDP, 9),
            Some(PolicyValue { rule_id: rule, flags: 0 })
        );
        assert_eq!(
            lookup(
                &state,
                xa.host_ifindex,
                direction::INGRESS,
                Ipv4Addr::new(192, 0, 2, 1),
                proto::TCP,
                80
            ),
            None
        );
        check(
            &policies,
            &[
                ("z/b", "x/a", "TCP", 80, true),
                ("x/c", "x/a", "TCP", 80, false),
                ("z/b", "x/b", "TCP", 80, true),
            ],
        );
    }

    #[test]
    fn namespace_and_pod_selector_and_versus_or() {
        let and = np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n");
        let or = np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n    - podSelector: {matchLabels: {pod: b}}\n");
        check(
            &and,
            &[
                ("y/b", "x/a", "TCP", 80, true),
                ("y/c", "x/a", "TCP", 80, false),
                ("x/b", "x/a", "TCP", 80, false),
                ("z/b", "x/a", "TCP", 80, false),
            ],
        );
        check(
            &or,
            &[
                ("y/b", "x/a", "TCP", 80, true),
                ("y/c", "x/a", "TCP", 80, true),
                ("x/b", "x/a", "TCP", 80, true),
                ("z/b", "x/a", "TCP", 80, false),
                ("x/c", "x/a", "TCP", 80, false),
            ],
        );
    }

    #[test]
    fn empty_rule_and_empty_peer_lists_versus_missing_rules() {
        // (spec, allowed from another namespace, allowed from the same namespace)
        let table: Vec<(&str, bool, bool)> = vec![
            ("  podSelector: {}\n  ingress: [{}]\n", true, true),
            ("  podSelector: {}\n  ingress: [{from: []}]\n", true, true),
            ("  podSelector: {}\n  ingress: [{from: [], ports: []}]\n", true, true),
            ("  podSelector: {}\n  ingress: []\n", false, false),
            ("  podSelector: {}\n", false, false),
            ("  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]\n", false, true),
            ("  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n", true, true),
        ];
        for (spec, other_ns, same_ns) in table {
            let cases = [("y/a", "x/a", "TCP", 80, other_ns), ("x/b", "x/a", "TCP", 80, same_ns)];
            check(&np("x", "p", spec), &cases);
        }
        let c = cluster(&np("x", "p", "  podSelector: {}\n  ingress: [{}]\n"));
        let state = Compiler::new().compile(&c, &locals());
        assert!(state
            .policy
            .keys()
            .all(|(k, len)| k.remote_identity == identity::ANY.to_be_bytes() && *len == POLICY_PREFIX_ANY_PROTO));
        // Empty rule allows traffic from outside the cluster too; namespaceSelector: {} does not.
        let xa = ep(&locals(), "x/a").clone();
        assert!(lookup(
            &state,
            xa.host_ifindex,
            direction::INGRESS,
            Ipv4Addr::new(192, 0, 2, 7),
            proto::TCP,
            1
        )
        .is_some());
        let c = cluster(&np("x", "p", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n"));
        let state = Compiler::new().compile(&c, &locals());
        assert!(lookup(
            &state,
            xa.host_ifindex,
            direction::INGRESS,
            Ipv4Addr::new(192, 0, 2, 7),
            proto::TCP,
            1
        )
        .is_none());
    }

    #[test]
    fn policy_types_inference() {
        let l = locals();
        let flags = |spec: &str| {
            let state = Compiler::new().compile(&cluster(&np("x", "p", spec)), &l);
            state.endpoints[&ep(&l, "x/a").host_ifindex].flags
        };
        let (i, e) = (endpoint_flags::ISOLATED_INGRESS, endpoint_flags::ISOLATED_EGRESS);
        assert_eq!(flags("  podSelector: {}\n"), i);
        assert_eq!(flags("  podSelector: {}\n  egress: []\n"), i);
        assert_eq!(flags("  podSelector: {}\n  egress: [{}]\n"), i | e);
        assert_eq!(flags("  podSelector: {}\n  policyTypes: [Egress]\n"), e);
        assert_eq!(flags("  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n"), e);
        assert_eq!(flags("  podSelector: {}\n  policyTypes: [Ingress, Egress]\n"), i | e);
        assert_eq!(
            flags("  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Ingress, Egress]\n"),
            0
        );
        // policyTypes [Egress] ignores the ingress rules: ingress stays open.
        check(
            &np("x", "p", "  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n"),
            &[("y/a", "x/a", "TCP", 80, true), ("x/a", "y/a", "TCP", 80, false)],
        );
    }

    #[test]
    fn egress_isolation_with_ports() {
        let policies = np("y", "out", "  podSelector: {matchLabels: {pod: a}}\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {ns: z}}}]\n    ports: [{port: 80}, {protocol: UDP}]\n");
        check(
            &policies,
            &[
                ("y/a", "z/b", "TCP", 80, true),
                ("y/a", "z/b", "TCP", 81, false),
                ("y/a", "z/b", "UDP", 5353, true),
                ("y/a", "z/b", "SCTP", 80, false),
                ("y/a", "x/b", "TCP", 80, false),
                ("y/b", "x/b", "TCP", 80, true),
                ("x/a", "y/a", "TCP", 80, false), // egress rules imply Ingress too
                ("x/a", "y/b", "TCP", 80, true),
            ],
        );
    }

    #[test]
    fn named_ports_resolve_against_the_destination_pod() {
        let ingress = np(
            "x",
            "in",
            "  podSelector: {}\n  ingress: [{ports: [{port: http}, {port: dns, protocol: UDP}]}]\n",
        );
        check(
            &ingress,
            &[
                ("y/a", "x/a", "TCP", 80, true),
                ("y/a", "x/b", "TCP", 80, false),
                ("y/a", "x/b", "TCP", 8080, true),
                ("y/a", "x/c", "TCP", 8080, false),
                ("y/a", "x/c", "UDP", 53, true),
                ("y/a", "x/c", "TCP", 53, false),
            ],
        );
        let egress = np(
            "x",
            "out",
            "  podSelector: {matchLabels: {pod: a}}\n  egress: [{ports: [{port: http}]}]\n",
        );
        check(
            &egress,
            &[
                ("x/a", "y/a", "TCP", 80, true),
                ("x/a", "y/b", "TCP", 80, false),
                ("x/a", "y/b", "TCP", 8080, true),
                ("x/a", "y/c", "TCP", 8080, false),
            ],
        );
        // Egress by name to a non-pod address resolves to nothing.
        let c = cluster(&egress);
        let l = locals();
        let state = Compiler::new().compile(&c, &l);
        assert!(lookup(
            &state,
            ep(&l, "x/a").host_ifindex,
            direction::EGRESS,
            Ipv4Addr::new(192, 0, 2, 1),
            proto::TCP,
            80
        )
        .is_none());
    }

    #[test]
    fn end_port_prefixes_are_minimal() {
        type Case = (u16, u16, Vec<(u16, u32)>);
        let table: Vec<Case> = vec![
            (80, 80, vec![(80, 96)]),
            (80, 81, vec![(80, 95)]),
            (79, 81, vec![(79, 96), (80, 95)]),
            (0, 65535, vec![(0, 80)]),
            (1024, 2047, vec![(1024, 86)]),
            (65535, 65535, vec![(65535, 96)]),
        ];
        for (lo, hi, want) in table {
            assert_eq!(port_prefixes(lo, hi), want, "{lo}..={hi}");
        }
        let all = port_prefixes(1, 65535);
        assert_eq!(all.len(), 16);
        assert_eq!(all.first(), Some(&(1, 96)));
        assert_eq!(all.last(), Some(&(32768, 81)));
        // Exhaustive: the blocks cover exactly the range for a few awkward ranges.
        for (lo, hi) in [(1u16, 65535u16), (3, 1000), (8000, 8080), (443, 444), (65000, 65535)] {
            let blocks = port_prefixes(lo, hi);
            for port in 0..=u16::MAX {
                let n = blocks
                    .iter()
                    .filter(|(start, len)| {
                        let bits = len - POLICY_PREFIX_ANY_PORT;
                        let mask = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
                        port & mask == *start
                    })
                    .count();
                assert_eq!(n, usize::from((lo..=hi).contains(&port)), "{lo}..={hi} port {port}");
            }
        }
        let policies = np(
            "x",
            "range",
            "  podSelector: {}\n  ingress: [{ports: [{port: 79, endPort: 81, protocol: UDP}]}]\n",
        );
        let c = cluster(&policies);
        let state = Compiler::new().compile(&c, &locals());
        assert_eq!(state.policy.len(), 3 * 2, "two blocks per endpoint of x");
        check(
            &policies,
            &[
                ("y/a", "x/a", "UDP", 78, false),
                ("y/a", "x/a", "UDP", 79, true),
                ("y/a", "x/a", "UDP", 81, true),
                ("y/a", "x/a", "UDP", 82, false),
                ("y/a", "x/a", "TCP", 80, false),
            ],
        );
    }

    #[test]
    fn multiple_policies_union_and_keep_the_lowest_rule_id() {
        let policies = format!(
            "{}{}",
            np("x", "p1", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n"),
            np("x", "p2", "  podSelector: {}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: c}}}]\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n"),
        );
        check(
            &policies,
            &[
                ("x/b", "x/a", "TCP", 80, true),
                ("x/c", "x/a", "TCP", 80, true),
                ("x/c", "x/b", "TCP", 80, true),
                ("x/b", "x/c", "TCP", 80, true),
                ("x/a", "x/b", "TCP", 80, false),
            ],
        );
        let c = cluster(&policies);
        let l = locals();
        let mut comp = Compiler::new();
        let state = comp.compile(&c, &l);
        let v = lookup(
            &state,
            ep(&l, "x/a").host_ifindex,
            direction::INGRESS,
            ep(&l, "x/b").ipv4,
            proto::TCP,
            80,
        )
        .unwrap();
        assert_eq!(
            comp.rules().rule(v.rule_id).map(ToString::to_string).as_deref(),
            Some("x/p1 ingress[0]")
        );
        let v = lookup(
            &state,
            ep(&l, "x/c").host_ifindex,
            direction::INGRESS,
            ep(&l, "x/b").ipv4,
            proto::TCP,
            80,
        )
        .unwrap();
        assert_eq!(
            comp.rules().rule(v.rule_id).map(ToString::to_string).as_deref(),
            Some("x/p2 ingress[1]")
        );
        let verdict = spec_says(&c, "x/a", "x/b", "TCP", 80);
        assert_eq!(verdict.ingress, Decision::Denied(vec![("x".into(), "p2".into())]));
        assert_eq!(verdict.egress, Decision::NotIsolated);
    }

    #[test]
    fn ids_are_stable_across_recompiles() {
        let l = locals();
        let mut comp = Compiler::new();
        let p1 = np("x", "p1", "  podSelector: {}\n  ingress: [{}]\n");
        let first = comp.compile(&cluster(&p1), &l);
        let p0 = np("a-first", "p0", "  podSelector: {}\n  ingress: [{}]\n");
        let second = comp.compile(&cluster(&format!("{p0}{p1}")), &l);
        assert_eq!(first.endpoints, second.endpoints, "identities unchanged");
        assert_eq!(first.policy, second.policy, "rule ids unchanged");
        // Relabel x/a: it gets a fresh identity, and its old one is released for good.
        let old = first.endpoints[&ep(&l, "x/a").host_ifindex].identity;
        let mut c = cluster(&p1);
        c.apply(
            parse_documents(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: q}}\n",
                "r",
            )
            .unwrap()
            .remove(0),
        );
        let third = comp.compile(&c, &l);
        let new = third.endpoints[&ep(&l, "x/a").host_ifindex].identity;
        assert!(new > old);
        assert!(comp.identities().key(old).is_none());
    }

    #[test]
    fn unknown_local_pod_fails_closed() {
        let mut l = locals();
        l.push(LocalEndpoint {
            endpoint_id: 99,
            host_ifindex: 999,
            namespace: "x".into(),
            pod: "ghost".into(),
            ipv4: Ipv4Addr::new(10, 0, 9, 9),
            mac: [2; 6],
        });
        let state = Compiler::new().compile(&cluster(""), &l);
        let ghost = state.endpoints[&999];
        assert_eq!(ghost.identity, identity::WORLD);
        assert_eq!(ghost.flags, endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS);
        assert!(state.policy.keys().all(|(k, _)| k.endpoint_id != 99u32.to_be_bytes()));
        assert!(lookup(&state, 999, direction::EGRESS, ep(&l, "x/a").ipv4, proto::TCP, 80).is_none());
        assert!(lookup(&state, 12345, direction::EGRESS, ep(&l, "x/a").ipv4, proto::TCP, 80).is_none());
    }

    #[test]
    fn remote_pods_come_from_status_pod_ip() {
        let c = cluster("---\napiVersion: v1\nkind: Pod\nmetadata: {name: far, namespace: y, labels: {pod: far}}\nspec: {nodeName: n2}\nstatus: {podIP: 10.9.0.7}\n");
        let state = Compiler::new().compile(&c, &locals());
        assert!(state.ipcache.contains_key(&(Ipv4Addr::new(10, 9, 0, 7), 32)));
        assert_eq!(state.endpoints.len(), 9);
    }

    #[test]
    fn ip_blocks_match_addresses_and_pods_with_excepts() {
        // y's pods are 10.0.2.1-3; the except removes y/b (10.0.2.2).
        let policies = np("x", "cidr", "  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.2.0/24, except: [10.0.2.2/32]}}]\n  - from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]\n    ports: [{port: 443}]\n");
        check(
            &policies,
            &[
                ("y/a", "x/a", "TCP", 80, true),
                ("y/b", "x/a", "TCP", 80, false),
                ("y/c", "x/a", "TCP", 80, true),
                ("z/a", "x/a", "TCP", 80, false),
            ],
        );
        let c = cluster(&policies);
        let l = locals();
        let state = Compiler::new().compile(&c, &l);
        let xa = ep(&l, "x/a").host_ifindex;
        let ing = |ip: [u8; 4], port| lookup(&state, xa, direction::INGRESS, Ipv4Addr::from(ip), proto::TCP, port).is_some();
        assert!(ing([10, 0, 2, 200], 80), "non-pod address inside the block");
        assert!(!ing([10, 0, 3, 200], 80), "outside the block");
        assert!(ing([192, 168, 7, 1], 443));
        assert!(!ing([192, 168, 7, 1], 80));
        assert!(!ing([192, 168, 1, 1], 443), "inside the except");
        assert!(state.ipcache.contains_key(&(Ipv4Addr::new(192, 168, 1, 0), 24)));
    }

    /// Two pods with equal labels on either side of an ipBlock edge: the block admits
    /// exactly the one inside, on ingress and on egress, in the datapath and in the spec.
    #[test]
    fn ip_block_edge_splits_pods_with_equal_labels() {
        let twins = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: w}\n\
                     ---\napiVersion: v1\nkind: Pod\nmetadata: {name: in, namespace: w, labels: {app: web}}\nstatus: {podIP: 10.0.9.127}\n\
                     ---\napiVersion: v1\nkind: Pod\nmetadata: {name: out, namespace: w, labels: {app: web}}\nstatus: {podIP: 10.0.9.128}\n";
        let policies = format!(
            "{twins}{}",
            np(
                "x",
                "edge",
                "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{ipBlock: {cidr: 10.0.9.0/25}}]}]\n  egress: [{to: [{ipBlock: {cidr: 10.0.9.0/24, except: [10.0.9.128/25]}}]}]\n"
            )
        );
        let c = cluster(&policies);
        let l = locals();
        let mut compiler = Compiler::new();
        let state = compiler.compile(&c, &l);
        let xa = ep(&l, "x/a").host_ifindex;
        let (inside, outside) = (Ipv4Addr::new(10, 0, 9, 127), Ipv4Addr::new(10, 0, 9, 128));
        let id = |ip| ipcache_lookup(&state, ip);
        assert_ne!(id(inside), id(outside), "equal labels, different sides: different identities");
        for (dir, peer, want) in [
            (direction::INGRESS, inside, true),
            (direction::INGRESS, outside, false),
            (direction::EGRESS, inside, true),
            (direction::EGRESS, outside, false),
        ] {
            assert_eq!(
                lookup(&state, xa, dir, peer, proto::TCP, 80).is_some(),
                want,
                "dir {dir} peer {peer}"
            );
        }
        assert!(spec_says(&c, "w/in", "x/a", "TCP", 80).ingress.allows());
        assert!(!spec_says(&c, "w/out", "x/a", "TCP", 80).ingress.allows());
        assert!(spec_says(&c, "x/a", "w/in", "TCP", 80).egress.allows());
        assert!(!spec_says(&c, "x/a", "w/out", "TCP", 80).egress.allows());
        // Without ipBlocks the twins share one identity again (no needless identities).
        let plain = compiler.compile(&cluster(twins), &l);
        assert_eq!(ipcache_lookup(&plain, inside), ipcache_lookup(&plain, outside));
    }

    #[test]
    fn overlapping_blocks_of_different_policies() {
        let policies = format!(
            "{}{}",
            np(
                "x",
                "wide",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{ipBlock: {cidr: 172.16.0.0/12}}]}]\n"
            ),
            np(
                "x",
                "narrow",
                "  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{ipBlock: {cidr: 172.16.5.0/24}}]}]\n"
            ),
        );
        let c = cluster(&policies);
        let l = locals();
        let state = Compiler::new().compile(&c, &l);
        let ing = |pod, ip: [u8; 4]| {
            lookup(
                &state,
                ep(&l, pod).host_ifindex,
                direction::INGRESS,
                Ipv4Addr::from(ip),
                proto::TCP,
                1,
            )
            .is_some()
        };
        assert!(
            ing("x/a", [172, 16, 5, 9]),
            "the narrower block's identity is inside the wide block"
        );
        assert!(ing("x/a", [172, 17, 0, 1]));
        assert!(ing("x/b", [172, 16, 5, 9]));
        assert!(!ing("x/b", [172, 17, 0, 1]));
    }

    /// Policy sets for the matrix; each is checked over every ordered pod pair and probe.
    fn policy_sets() -> Vec<String> {
        vec![
            String::new(),
            np("x", "deny", DENY_X),
            np("x", "allow-b", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}, namespaceSelector: {}}]}]\n"),
            np("y", "and", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}, podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}}]}]\n"),
            np("y", "or", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}, {podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [a]}]}}]}]\n"),
            np("z", "egress", "  podSelector: {matchExpressions: [{key: pod, operator: Exists}]}\n  egress: [{to: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}}], ports: [{port: 80}, {port: 53, protocol: UDP}]}]\n"),
            np("x", "named", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{ports: [{port: http}]}]\n  egress: [{ports: [{port: http}, {port: dns, protocol: UDP}]}]\n"),
            np("y", "range", "  podSelector: {matchLabels: {pod: c}}\n  ingress: [{ports: [{port: 79, endPort: 8080}]}]\n"),
            format!(
                "{}{}{}",
                np("x", "one", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]\n"),
                np("x", "two", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]\n"),
                np("y", "eg", "  podSelector: {}\n  egress: [{to: [{podSelector: {}}]}, {to: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: a}}}]}]\n"),
            ),
            np("z", "cidr", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24, 10.0.2.3/32]}}]}]\n  egress: [{to: [{ipBlock: {cidr: 10.0.1.0/30}}]}]\n"),
            np("x", "egress-types", "  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n"),
            np("y", "empty-rules", "  podSelector: {}\n  ingress: [{}]\n  egress: [{}]\n"),
            np_audit("x", "deny-audit", "true", DENY_X),
            format!(
                "{}{}{}",
                np_audit("x", "audit-a", "true", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n  egress: [{ports: [{port: 80}]}]\n"),
                np("x", "enforce-a", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]\n"),
                np_audit("z", "not-audit", "false", "  podSelector: {matchLabels: {pod: c}}\n  policyTypes: [Egress]\n"),
            ),
            format!(
                "{}{}{}",
                audit_namespace("y"),
                np("y", "or", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}, {podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [a]}]}}]}]\n"),
                np_audit("y", "opt-out", "false", "  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: 53, protocol: UDP}]}]\n"),
            ),
        ]
    }

    #[test]
    fn audit_policy_alone_flags_audit_and_compiles_its_allows() {
        let policies = np_audit(
            "x",
            "audit",
            "true",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
        );
        let c = cluster(&policies);
        let l = locals();
        let state = Compiler::new().compile(&c, &l);
        let xa = ep(&l, "x/a");
        assert_eq!(state.endpoints[&xa.host_ifindex].flags, endpoint_flags::AUDIT_INGRESS);
        assert!(!state.policy.is_empty(), "the audit policy's allow rule is compiled");
        let v = |from| lookup_verdict(&state, xa.host_ifindex, direction::INGRESS, ep(&l, from).ipv4, proto::TCP, 80);
        assert_eq!(v("x/b").map(|(v, r)| (v, r.rule_id != 0)), Some((verdict::FORWARDED, true)));
        assert_eq!(v("x/c").map(|(v, r)| (v, r.rule_id)), Some((verdict::AUDIT, 0)));
        let audit = vec![("x".to_string(), "audit".to_string())];
        assert_eq!(spec_says(&c, "x/c", "x/a", "TCP", 80).ingress, Decision::Audited(audit.clone()));
        assert!(spec_says(&c, "x/c", "x/a", "TCP", 80).audited());
        assert!(matches!(spec_says(&c, "x/b", "x/a", "TCP", 80).ingress, Decision::Allowed(_)));
        assert!(!spec_says(&c, "x/b", "x/a", "TCP", 80).audited());
        check(&policies, &[("x/c", "x/a", "TCP", 80, true), ("y/a", "x/a", "UDP", 53, true)]);
        assert_eq!(
            isolating_policies(&c, "x", &model::pod_labels(c.pod("x", "a").unwrap()), Direction::Ingress),
            audit
        );
    }

    #[test]
    fn an_enforcing_policy_on_the_same_pod_wins_and_audit_allows_are_ignored() {
        // The audit policy allows x/c; the enforcing one allows only x/b. Enforcement decides.
        let policies = format!(
            "{}{}",
            np_audit(
                "x",
                "audit",
                "true",
                "  podSelector: {}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]\n"
            ),
            np(
                "x",
                "enforce",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n"
            ),
        );
        let c = cluster(&policies);
        let l = locals();
        let mut comp = Compiler::new();
        let state = comp.compile(&c, &l);
        let (xa, xb) = (ep(&l, "x/a"), ep(&l, "x/b"));
        assert_eq!(state.endpoints[&xa.host_ifindex].flags, endpoint_flags::ISOLATED_INGRESS);
        assert_eq!(state.endpoints[&xb.host_ifindex].flags, endpoint_flags::AUDIT_INGRESS);
        let v = |to: &LocalEndpoint, from| lookup_verdict(&state, to.host_ifindex, direction::INGRESS, ep(&l, from).ipv4, proto::TCP, 80);
        assert_eq!(v(xa, "x/c"), None, "the audit policy's allow does not open the enforced pod");
        let (_, allowed) = v(xa, "x/b").unwrap();
        assert_eq!(comp.rules().rule(allowed.rule_id).map(|r| r.policy.as_str()), Some("enforce"));
        assert_eq!(v(xb, "x/a").map(|(v, _)| v), Some(verdict::AUDIT));
        assert_eq!(v(xb, "x/c").map(|(v, _)| v), Some(verdict::FORWARDED));
        assert_eq!(
            spec_says(&c, "x/c", "x/a", "TCP", 80).ingress,
            Decision::Denied(vec![("x".into(), "enforce".into())]),
            "a drop names only the enforcing policy"
        );
        assert_eq!(
            spec_says(&c, "x/a", "x/b", "TCP", 80).ingress,
            Decision::Audited(vec![("x".into(), "audit".into())])
        );
        let labels = |p| model::pod_labels(c.pod("x", p).unwrap());
        let iso = isolation(&c, "x", &labels("a"), Direction::Ingress);
        assert_eq!((iso.isolated(), iso.audited(), iso.audit.len()), (true, false, 1));
        assert_eq!(iso.effective(), [("x".to_string(), "enforce".to_string())]);
        check(
            &policies,
            &[
                ("x/c", "x/a", "TCP", 80, false),
                ("x/b", "x/a", "TCP", 80, true),
                ("x/a", "x/b", "TCP", 80, true),
            ],
        );
    }

    #[test]
    fn namespace_annotation_audits_all_its_policies_unless_a_policy_opts_out() {
        let policies = format!(
            "{}{}{}",
            audit_namespace("x"),
            np("x", "deny", DENY_X),
            np_audit(
                "x",
                "deny-egress-of-c",
                "false",
                "  podSelector: {matchLabels: {pod: c}}\n  policyTypes: [Egress]\n"
            ),
        );
        let c = cluster(&policies);
        let l = locals();
        let state = Compiler::new().compile(&c, &l);
        for pod in ["x/a", "x/b"] {
            assert_eq!(
                state.endpoints[&ep(&l, pod).host_ifindex].flags,
                endpoint_flags::AUDIT_INGRESS,
                "{pod}"
            );
        }
        assert_eq!(
            state.endpoints[&ep(&l, "x/c").host_ifindex].flags,
            endpoint_flags::AUDIT_INGRESS | endpoint_flags::ISOLATED_EGRESS
        );
        assert_eq!(state.endpoints[&ep(&l, "y/a").host_ifindex].flags, 0);
        assert_eq!(
            datapath_verdicts(&state, &l, "y/a", "x/a", "TCP", 80),
            (Some(verdict::FORWARDED), Some(verdict::AUDIT))
        );
        assert_eq!(
            datapath_verdicts(&state, &l, "x/c", "y/a", "TCP", 80),
            (None, Some(verdict::FORWARDED))
        );
        check(
            &policies,
            &[
                ("y/a", "x/a", "TCP", 80, true),
                ("x/a", "x/b", "UDP", 53, true),
                ("x/c", "y/a", "TCP", 80, false),
            ],
        );
        let annotations_only = format!("{}{}", audit_namespace("x"), np("x", "deny", DENY_X));
        assert!(cluster(&annotations_only).policy_audited("x", cluster(&annotations_only).policy("x", "deny").unwrap()));
        // Without the namespace annotation the same policy enforces.
        let plain = cluster(&np("x", "deny", DENY_X));
        assert!(!plain.policy_audited("x", plain.policy("x", "deny").unwrap()));
        let other = cluster(&np_audit("x", "deny", "yes please", DENY_X));
        assert!(!other.policy_audited("x", other.policy("x", "deny").unwrap()), "only true audits");
    }

    const PROBES: [(&str, u16); 7] = [
        ("TCP", 80),
        ("TCP", 81),
        ("TCP", 8080),
        ("UDP", 53),
        ("TCP", 443),
        ("SCTP", 80),
        ("UDP", 80),
    ];

    fn compare_everywhere(c: &Cluster, context: &str) {
        let l = locals();
        let state = Compiler::new().compile(c, &l);
        for from in all_pods() {
            for to in all_pods() {
                if from == to {
                    continue;
                }
                for (protocol, port) in PROBES {
                    let (e, i) = datapath_verdicts(&state, &l, &from, &to, protocol, port);
                    let v = spec_says(c, &from, &to, protocol, port);
                    assert_eq!(
                        (e, i),
                        (flow_verdict(&v.egress), flow_verdict(&v.ingress)),
                        "{from} -> {to} {protocol}/{port}: datapath (egress, ingress) vs spec {v:?}\n{context}"
                    );
                }
            }
        }
    }

    #[test]
    fn datapath_lookup_agrees_with_the_spec_over_the_matrix() {
        for (i, set) in policy_sets().iter().enumerate() {
            compare_everywhere(&cluster(set), &format!("policy set {i}:\n{set}"));
        }
        let all: String = policy_sets().concat();
        compare_everywhere(&cluster(&all), "all policy sets together");
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        fn selector_yaml() -> impl Strategy<Value = String> {
            let value = prop::sample::select(vec!["a", "b", "c", "x", "y", "z"]);
            let key = prop::sample::select(vec!["pod", "ns", "tier"]);
            let op = prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist"]);
            prop_oneof![
                Just("{}".to_string()),
                (key.clone(), value.clone()).prop_map(|(k, v)| format!("{{matchLabels: {{{k}: {v}}}}}")),
                (key, op, prop::collection::vec(value, 1..3)).prop_map(|(k, op, vs)| match op {
                    "Exists" | "DoesNotExist" => format!("{{matchExpressions: [{{key: {k}, operator: {op}}}]}}"),
                    _ => format!("{{matchExpressions: [{{key: {k}, operator: {op}, values: [{}]}}]}}", vs.join(", ")),
                }),
            ]
        }

        fn peer_yaml() -> impl Strategy<Value = String> {
            prop_oneof![
                selector_yaml().prop_map(|s| format!("{{podSelector: {s}}}")),
                selector_yaml().prop_map(|s| format!("{{namespaceSelector: {s}}}")),
                (selector_yaml(), selector_yaml()).prop_map(|(p, n)| format!("{{podSelector: {p}, namespaceSelector: {n}}}")),
                (1u8..=3, 0u8..=3).prop_map(|(n, m)| format!("{{ipBlock: {{cidr: 10.0.{n}.0/24, except: [10.0.{n}.{m}/32]}}}}")),
            ]
        }

        fn port_yaml() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("{port: 80}".to_string()),
                Just("{port: http}".to_string()),
                Just("{port: dns, protocol: UDP}".to_string()),
                Just("{protocol: UDP}".to_string()),
                Just("{port: 80, endPort: 8080}".to_string()),
                Just("{port: 53, protocol: SCTP}".to_string()),
            ]
        }

        fn rule_yaml(peers_field: &'static str) -> impl Strategy<Value = String> {
            (
                prop::option::of(prop::collection::vec(peer_yaml(), 0..3)),
                prop::option::of(prop::collection::vec(port_yaml(), 0..3)),
            )
                .prop_map(move |(peers, ports)| {
                    let mut fields = Vec::new();
                    if let Some(p) = peers {
                        fields.push(format!("{peers_field}: [{}]", p.join(", ")));
                    }
                    if let Some(p) = ports {
                        fields.push(format!("ports: [{}]", p.join(", ")));
                    }
                    format!("{{{}}}", fields.join(", "))
                })
        }

        fn policy_yaml(index: usize) -> impl Strategy<Value = String> {
            (
                prop::sample::select(vec!["x", "y", "z"]),
                selector_yaml(),
                prop::sample::select(vec![
                    "",
                    "  policyTypes: [Ingress]\n",
                    "  policyTypes: [Egress]\n",
                    "  policyTypes: [Ingress, Egress]\n",
                ]),
                prop::option::of(prop::collection::vec(rule_yaml("from"), 0..3)),
                prop::option::of(prop::collection::vec(rule_yaml("to"), 0..3)),
                prop::option::of(prop::sample::select(vec!["true", "false"])),
            )
                .prop_map(move |(ns, sel, types, ingress, egress, audit)| {
                    let mut spec = format!("  podSelector: {sel}\n{types}");
                    if let Some(r) = ingress {
                        spec.push_str(&format!("  ingress: [{}]\n", r.join(", ")));
                    }
                    if let Some(r) = egress {
                        spec.push_str(&format!("  egress: [{}]\n", r.join(", ")));
                    }
                    match audit {
                        Some(value) => np_audit(ns, &format!("p{index}"), value, &spec),
                        None => np(ns, &format!("p{index}"), &spec),
                    }
                })
        }

        fn policies_yaml() -> impl Strategy<Value = String> {
            (policy_yaml(0), policy_yaml(1), policy_yaml(2), 1usize..=3).prop_map(|(a, b, c, n)| [a, b, c][..n].concat())
        }

        /// Random extra labels on pods and namespaces, so that selectors cut across the grid.
        fn tiers() -> impl Strategy<Value = Vec<Option<&'static str>>> {
            prop::collection::vec(prop::option::of(prop::sample::select(vec!["a", "b"])), 12)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
            #[test]
            fn compiled_lookup_agrees_with_the_spec(
                policies in policies_yaml(),
                tiers in tiers(),
                audit_namespaces in prop::collection::vec(any::<bool>(), 3),
            ) {
                let mut c = cluster(&policies);
                let mut objects = c.objects();
                let mut n = 0;
                for o in &mut objects {
                    let (meta, is_namespace) = match o {
                        crate::model::Object::Namespace(x) => (&mut x.metadata, true),
                        crate::model::Object::Pod(x) => (&mut x.metadata, false),
                        crate::model::Object::NetworkPolicy(_) => continue,
                    };
                    if let Some(Some(t)) = tiers.get(n) {
                        meta.labels.get_or_insert_with(BTreeMap::new).insert("tier".into(), (*t).into());
                    }
                    // Namespaces come first: the first three objects are x, y and z.
                    if is_namespace && audit_namespaces.get(n) == Some(&true) {
                        meta.annotations
                            .get_or_insert_with(BTreeMap::new)
                            .insert(crate::model::NAMESPACE_AUDIT_ANNOTATION.into(), "true".into());
                    }
                    n += 1;
                }
                c = Cluster::from_objects(objects);
                compare_everywhere(&c, &policies);
            }
        }
    }
}
