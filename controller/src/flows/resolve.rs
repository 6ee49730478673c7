//! Naming the numbers of a flow event: pods, identities, the policy and rule that decided.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use bulkhead_api::{
    Direction, Flow, FlowBytes, FlowKind, FlowPeer, FlowService, FlowVerdict, NamespacedName, PolicyName, PolicyRule, Protocol,
};
use bulkhead_common::{flow_kind, rule_id, verdict, DropReason, FlowEvent};

use crate::model::{self, Cluster, Kind, ObjectRef};
use crate::policy::identity::RuleTable;
use crate::policy::{self, LocalEndpoint};
use crate::services::{ServiceKey, ServiceTable};

/// A pod, as flows name it; its label set is the model's own, shared, not a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodInfo {
    namespace: String,
    name: String,
    labels: model::Labels,
}

/// A rule that allows flows, with its policy's `namespace/name` as metrics label it.
#[derive(Debug)]
struct NamedRule {
    rule: PolicyRule,
    label: String,
}

/// The policies that isolate an endpoint in one direction, with the first one's
/// `namespace/name` (the metrics label of a default-deny drop).
#[derive(Debug)]
struct Isolation {
    names: Vec<PolicyName>,
    label: Option<String>,
}

/// A Service port a flow was translated from, with the Service's `namespace/name`.
#[derive(Debug)]
struct NamedService {
    service: FlowService,
    label: String,
}

/// Everything needed to name the numbers of a flow event, taken from the agent's state
/// after each reprogram so the reader never takes the agent's lock. Names are shared
/// (`Arc`), so naming an event ([`Resolver::name`]) allocates nothing.
#[derive(Clone, Debug, Default)]
pub struct Resolver {
    node: String,
    /// Local endpoint id → pod.
    endpoints: HashMap<u32, Arc<PodInfo>>,
    /// Pod IP → pod, cluster-wide (shared with the agent's [`PodIndex`]).
    pods_by_ip: Arc<HashMap<Ipv4Addr, Arc<PodInfo>>>,
    /// Local endpoints' addresses → pod: the CNI plugin assigned them, so they win over
    /// the model's.
    local_by_ip: HashMap<Ipv4Addr, Arc<PodInfo>>,
    /// Rule ids as the compiler handed them out → the rule.
    rules: HashMap<u32, Arc<NamedRule>>,
    /// (endpoint id, direction number) → the policies that isolate it.
    isolating: HashMap<(u32, u8), Arc<Isolation>>,
    /// The datapath's Service port ids → the Service and the VIP:port it stands for.
    services: HashMap<u16, Arc<NamedService>>,
    /// Backend address → the Services it backs.
    backs: HashMap<Ipv4Addr, Arc<[NamespacedName]>>,
}

/// A flow event with its numbers named: what the history keeps. Made without allocating
/// (everything it names is shared with the [`Resolver`] that made it, and outlives it);
/// the [`Flow`] users see is made from it only when someone reads it ([`Named::flow`]).
#[derive(Clone, Debug)]
pub(crate) struct Named {
    ev: FlowEvent,
    time: jiff::Timestamp,
    kind: FlowKind,
    verdict: FlowVerdict,
    direction: Direction,
    reason: Option<DropReason>,
    source: Option<Arc<PodInfo>>,
    destination: Option<Arc<PodInfo>>,
    source_services: Option<Arc<[NamespacedName]>>,
    destination_services: Option<Arc<[NamespacedName]>>,
    allowed_by: Option<Arc<NamedRule>>,
    isolated_by: Option<Arc<Isolation>>,
    service: Option<Arc<NamedService>>,
}

impl Named {
    /// What the record reports: a packet, or a connection's byte counts.
    pub(crate) fn kind(&self) -> FlowKind {
        self.kind
    }

    /// What happened.
    pub(crate) fn verdict(&self) -> FlowVerdict {
        self.verdict
    }

    /// Direction at the local endpoint.
    pub(crate) fn direction(&self) -> Direction {
        self.direction
    }

    /// The policies the flow counts for: the allowing rule's, or the isolating ones.
    pub(crate) fn policies(&self) -> impl Iterator<Item = &PolicyName> {
        let allowed = self.allowed_by.iter().map(|r| &r.rule.policy);
        allowed.chain(self.isolated_by.iter().flat_map(|i| i.names.iter()))
    }

    /// The policy that decided, as metrics label it: the allowing rule's, or for a
    /// default-deny drop the first (by name) policy isolating the pod; none when not isolated.
    pub(crate) fn policy_label(&self) -> Option<&str> {
        match (&self.allowed_by, &self.isolated_by) {
            (Some(r), _) => Some(&r.label),
            (None, Some(i)) => i.label.as_deref(),
            (None, None) => None,
        }
    }

    /// The Service dialled, as metrics label it (`namespace/name`).
    pub(crate) fn service_label(&self) -> Option<&str> {
        self.service.as_ref().map(|s| s.label.as_str())
    }

    /// The flow record users see, as node `node` reports it.
    pub(crate) fn flow(&self, node: &str) -> Flow {
        let ev = &self.ev;
        let (saddr, daddr) = (Ipv4Addr::from(ev.saddr), Ipv4Addr::from(ev.daddr));
        let (sport, dport) = (u16::from_be_bytes(ev.sport), u16::from_be_bytes(ev.dport));
        let (source_identity, destination_identity) = match self.direction {
            Direction::Egress => (ev.identity, ev.remote_identity),
            Direction::Ingress => (ev.remote_identity, ev.identity),
        };
        let drop_reason = match (self.verdict, self.reason) {
            (FlowVerdict::Forwarded, _) | (_, Some(DropReason::Forwarded)) => None,
            (_, Some(r)) => Some(r.name().to_string()),
            (_, None) => Some(format!("unknown_{}", ev.reason)),
        };
        let protocol = Protocol::from_number(ev.protocol);
        Flow {
            time: self.time,
            node: node.to_string(),
            verdict: self.verdict,
            drop_reason,
            direction: self.direction,
            protocol,
            // A byte update's packet is just the one that found the report due.
            tcp_flags: (protocol == Protocol::TCP && ev.tcp_flags != 0 && self.kind != FlowKind::Update).then(|| tcp_flags(ev.tcp_flags)),
            source: peer(
                self.source.as_deref(),
                saddr,
                sport,
                source_identity,
                self.source_services.as_deref(),
            ),
            destination: peer(
                self.destination.as_deref(),
                daddr,
                dport,
                destination_identity,
                self.destination_services.as_deref(),
            ),
            allowed_by: self.allowed_by.iter().map(|r| r.rule.clone()).collect(),
            isolated_by: self.isolated_by.as_ref().map(|i| i.names.clone()).unwrap_or_default(),
            is_reply: false,
            service: self.service.as_ref().map(|s| s.service.clone()),
            kind: self.kind,
            bytes: (self.kind != FlowKind::Packet).then_some(FlowBytes {
                to_destination: ev.to_destination,
                to_source: ev.to_source,
            }),
        }
    }
}

fn peer(pod: Option<&PodInfo>, ip: Ipv4Addr, port: u16, identity: u32, services: Option<&[NamespacedName]>) -> FlowPeer {
    // Addresses that are not pods carry their reserved identity as a label, as in Cilium.
    let reserved = match identity {
        bulkhead_common::identity::HOST => Some("reserved:host"),
        bulkhead_common::identity::WORLD => Some("reserved:world"),
        _ => None,
    };
    let labels = match (pod, reserved) {
        (Some(p), _) => (*p.labels).clone(),
        (None, Some(r)) => BTreeMap::from([(r.to_string(), String::new())]),
        (None, None) => BTreeMap::new(),
    };
    FlowPeer {
        namespace: pod.map(|p| p.namespace.clone()),
        pod: pod.map(|p| p.name.clone()),
        labels,
        ip,
        port,
        identity,
        services: services.map(<[NamespacedName]>::to_vec).unwrap_or_default(),
    }
}

/// The model's pods by IPv4 address, as flows name them, kept up to date from the objects
/// each change touched ([`PodIndex::update`]): the agent rebuilt it from every pod for each
/// reprogram, O(pods) per CNI ADD (issue 13 profile at 10k pods: `Resolver::build` and its
/// copies were the largest user-space cost of an ADD). When two pods claim one address (a
/// finished pod and the one that got its address), the last in (namespace, name) order is
/// named, as a rebuild would.
#[derive(Clone, Debug, Default)]
pub struct PodIndex {
    by_ip: Arc<HashMap<Ipv4Addr, Arc<PodInfo>>>,
    /// Each indexed pod's address.
    ips: HashMap<(String, String), Ipv4Addr>,
    /// How many pods claim each address (more than one only in the case above).
    claims: HashMap<Ipv4Addr, u32>,
    /// Built from a whole model once (the first update builds it: what came before is
    /// not in `touched`).
    built: bool,
}

impl PodIndex {
    /// Every pod of `cluster` with an address.
    pub fn new(cluster: &Cluster) -> Self {
        let mut index = PodIndex::default();
        let by_ip = Arc::make_mut(&mut index.by_ip);
        for ((ns, name), pod) in cluster.pods() {
            if let Some(ip) = model::pod_ipv4(pod) {
                by_ip.insert(ip, pod_info(ns, name, pod));
                index.ips.insert((ns.clone(), name.clone()), ip);
                *index.claims.entry(ip).or_default() += 1;
            }
        }
        index.built = true;
        index
    }

    /// Takes the pods among `touched` from `cluster` as they are now (added, changed,
    /// re-addressed or gone). Costs the touched pods, plus one copy of the address map's
    /// pointers when a resolver still shares it.
    pub fn update(&mut self, cluster: &Cluster, touched: &[ObjectRef]) {
        if !self.built {
            *self = PodIndex::new(cluster);
            return;
        }
        let mut pods = touched.iter().filter(|r| r.kind == Kind::Pod).peekable();
        if pods.peek().is_none() {
            return;
        }
        let by_ip = Arc::make_mut(&mut self.by_ip);
        for r in pods {
            let Some(ns) = &r.namespace else { continue };
            let key = (ns.clone(), r.name.clone());
            if let Some(old) = self.ips.remove(&key) {
                let left = self.claims.get_mut(&old).map_or(0, |n| {
                    *n -= 1;
                    *n
                });
                if left == 0 {
                    self.claims.remove(&old);
                    by_ip.remove(&old);
                } else if by_ip.get(&old).is_some_and(|p| p.namespace == key.0 && p.name == key.1) {
                    // Another pod claims the address too (rare): name the one a rebuild would.
                    let winner = cluster
                        .pods()
                        .iter()
                        .rev()
                        .find(|(k, p)| **k != key && model::pod_ipv4(p) == Some(old));
                    match winner {
                        Some(((wns, wname), p)) => by_ip.insert(old, pod_info(wns, wname, p)),
                        None => by_ip.remove(&old),
                    };
                }
            }
            let Some(pod) = cluster.pod(ns, &r.name) else { continue };
            let Some(ip) = model::pod_ipv4(pod) else { continue };
            self.ips.insert(key.clone(), ip);
            *self.claims.entry(ip).or_default() += 1;
            let later_claims = by_ip
                .get(&ip)
                .is_some_and(|p| (p.namespace.as_str(), p.name.as_str()) > (key.0.as_str(), key.1.as_str()));
            if !later_claims {
                by_ip.insert(ip, pod_info(&key.0, &key.1, pod));
            }
        }
    }
}

/// An index's contents as tests compare them: address → (namespace, name, labels).
#[cfg(test)]
pub(crate) type PodIndexSnapshot = BTreeMap<Ipv4Addr, (String, String, Vec<(String, String)>)>;

#[cfg(test)]
impl PodIndex {
    /// The index's contents, for comparing indexes in tests.
    pub(crate) fn snapshot(&self) -> PodIndexSnapshot {
        self.by_ip
            .iter()
            .map(|(ip, p)| {
                let labels = p.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                (*ip, (p.namespace.clone(), p.name.clone(), labels))
            })
            .collect()
    }
}

fn pod_info(namespace: &str, name: &str, pod: &model::PodInfo) -> Arc<PodInfo> {
    Arc::new(PodInfo {
        namespace: namespace.to_string(),
        name: name.to_string(),
        labels: pod.labels.clone(),
    })
}

impl Resolver {
    /// A resolver that knows nothing yet (every flow shows addresses only).
    pub fn empty(node: &str) -> Self {
        Resolver {
            node: node.to_string(),
            ..Resolver::default()
        }
    }

    /// Takes what naming flows needs from the model, the rule table and local endpoints.
    pub fn build(node: &str, cluster: &Cluster, rules: &RuleTable, locals: &[LocalEndpoint]) -> Self {
        Self::build_with(node, &PodIndex::new(cluster), cluster, rules, locals)
    }

    /// [`Resolver::build`] with the model's pods from `pods`, kept up to date by the caller
    /// (the agent's reprogram: building it afresh was O(pods) per CNI ADD).
    pub fn build_with(node: &str, pods: &PodIndex, cluster: &Cluster, rules: &RuleTable, locals: &[LocalEndpoint]) -> Self {
        let pods_by_ip = Arc::clone(&pods.by_ip);
        let mut local_by_ip = HashMap::new();
        let mut endpoints = HashMap::new();
        let mut isolating = HashMap::new();
        for ep in locals {
            let labels = cluster.pod(&ep.namespace, &ep.pod).map(|p| p.labels.clone()).unwrap_or_default();
            for dir in Direction::ALL {
                let names: Vec<PolicyName> = policy::isolating_policies(cluster, &ep.namespace, &labels, dir)
                    .into_iter()
                    .map(|(namespace, name)| PolicyName::new(namespace, name))
                    .collect();
                let label = names.first().map(ToString::to_string);
                isolating.insert((ep.endpoint_id, dir.number()), Arc::new(Isolation { names, label }));
            }
            let info = Arc::new(PodInfo {
                namespace: ep.namespace.clone(),
                name: ep.pod.clone(),
                labels,
            });
            // The CNI plugin assigned a local pod's address: it wins over the model's.
            local_by_ip.insert(ep.ipv4, info.clone());
            endpoints.insert(ep.endpoint_id, info);
        }
        let rules = rules
            .iter()
            .filter(|(id, _)| *id != rule_id::NONE)
            .map(|(id, r)| {
                let policy = PolicyName::new(&*r.namespace, &*r.policy);
                let label = policy.to_string();
                let rule = PolicyRule {
                    policy,
                    direction: r.direction,
                    rule: r.index,
                };
                (id, Arc::new(NamedRule { rule, label }))
            })
            .collect();
        Resolver {
            node: node.to_string(),
            endpoints,
            pods_by_ip,
            local_by_ip,
            rules,
            isolating,
            services: HashMap::new(),
            backs: HashMap::new(),
        }
    }

    /// Adds the Services: `ids` names the datapath's Service port ids (flow records carry
    /// them), `table` the backends.
    pub fn with_services(mut self, table: &ServiceTable, ids: &BTreeMap<u32, ServiceKey>) -> Self {
        for (id, key) in ids {
            let (Ok(id), Some(entry)) = (u16::try_from(*id), table.get(key)) else {
                continue;
            };
            let service = FlowService {
                service: entry.service.clone(),
                port_name: entry.port_name.clone(),
                vip: key.vip,
                port: key.port,
            };
            let label = entry.service.to_string();
            self.services.insert(id, Arc::new(NamedService { service, label }));
        }
        let mut backs: HashMap<Ipv4Addr, Vec<NamespacedName>> = HashMap::new();
        for (_, entry) in table.iter() {
            for b in &entry.backends {
                let list = backs.entry(b.ip).or_default();
                if !list.contains(&entry.service) {
                    list.push(entry.service.clone());
                }
            }
        }
        self.backs = backs
            .into_iter()
            .map(|(ip, mut list)| {
                list.sort();
                (ip, Arc::from(list))
            })
            .collect();
        self
    }

    /// `ev`, seen at `unix_ns`, with its numbers named; `None` when the event carries a
    /// kind, verdict or direction this agent does not know, or a time out of range.
    /// Allocates nothing: the reader's path per record.
    ///
    /// A byte report (kind update or end) carries its connection's conntrack tuple: source
    /// and destination are the side that opened it and its peer, whichever packet made it.
    pub(crate) fn name(&self, ev: &FlowEvent, unix_ns: i128) -> Option<Named> {
        let kind = match ev.kind {
            flow_kind::PACKET => FlowKind::Packet,
            flow_kind::UPDATE => FlowKind::Update,
            flow_kind::END => FlowKind::End,
            _ => return None,
        };
        let verdict = match ev.verdict {
            verdict::FORWARDED => FlowVerdict::Forwarded,
            verdict::DROPPED => FlowVerdict::Dropped,
            verdict::AUDIT => FlowVerdict::Audit,
            _ => return None,
        };
        let direction = Direction::from_number(ev.direction)?;
        let time = jiff::Timestamp::from_nanosecond(unix_ns).ok()?;
        let reason = DropReason::ALL.get(usize::from(ev.reason)).copied();
        let (saddr, daddr) = (Ipv4Addr::from(ev.saddr), Ipv4Addr::from(ev.daddr));
        let local = self.endpoints.get(&ev.endpoint_id);
        let pod = |ip: &Ipv4Addr| self.local_by_ip.get(ip).or_else(|| self.pods_by_ip.get(ip));
        let (source, destination) = match direction {
            Direction::Egress => (local.or_else(|| pod(&saddr)), pod(&daddr)),
            Direction::Ingress => (pod(&saddr), local.or_else(|| pod(&daddr))),
        };
        let allowed_by = if ev.rule_id == rule_id::NONE {
            None
        } else {
            self.rules.get(&ev.rule_id).cloned()
        };
        // Default deny: no rule decided, so the flow is explained by what isolates the pod.
        let denied_by_default = ev.rule_id == rule_id::NONE
            && match verdict {
                FlowVerdict::Dropped => reason == Some(DropReason::PolicyDenied),
                FlowVerdict::Audit => true,
                FlowVerdict::Forwarded => false,
            };
        let isolated_by = if denied_by_default {
            self.isolating
                .get(&(ev.endpoint_id, ev.direction))
                .filter(|i| !i.names.is_empty())
                .cloned()
        } else {
            None
        };
        Some(Named {
            ev: *ev,
            time,
            kind,
            verdict,
            direction,
            reason,
            source: source.cloned(),
            destination: destination.cloned(),
            source_services: self.backs.get(&saddr).cloned(),
            destination_services: self.backs.get(&daddr).cloned(),
            allowed_by,
            isolated_by,
            service: if ev.service_id == 0 {
                None
            } else {
                self.services.get(&ev.service_id).cloned()
            },
        })
    }

    /// The flow record for `ev`, seen at `unix_ns`: [`Resolver::name`], then the [`Flow`]
    /// users see.
    pub fn resolve(&self, ev: &FlowEvent, unix_ns: i128) -> Option<Flow> {
        self.name(ev, unix_ns).map(|n| n.flow(&self.node))
    }
}

pub(super) fn tcp_flags(bits: u8) -> String {
    const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
    NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join("|")
}
