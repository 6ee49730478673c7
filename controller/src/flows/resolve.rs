//! Naming the numbers of a flow event: pods, identities, the policy and rule that decided.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use bulkhead_api::{Direction, Flow, FlowPeer, FlowService, FlowVerdict, NamespacedName, PolicyName, PolicyRule, Protocol};
use bulkhead_common::{rule_id, verdict, DropReason, FlowEvent};

use crate::model::{self, Cluster};
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

/// Everything needed to name the numbers of a flow event, taken from the agent's state
/// after each reprogram so the reader never takes the agent's lock.
#[derive(Clone, Debug, Default)]
pub struct Resolver {
    node: String,
    /// Local endpoint id → pod.
    endpoints: HashMap<u32, PodInfo>,
    /// Pod IP → pod, cluster-wide.
    pods_by_ip: HashMap<Ipv4Addr, PodInfo>,
    /// Rule ids as the compiler handed them out.
    rules: RuleTable,
    /// (endpoint id, direction number) → the policies that isolate it.
    isolating: HashMap<(u32, u8), Vec<PolicyName>>,
    /// The datapath's Service port ids → the Service and the VIP:port it stands for.
    services: HashMap<u16, FlowService>,
    /// Backend address → the Services it backs.
    backs: HashMap<Ipv4Addr, Vec<NamespacedName>>,
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
        let mut pods_by_ip = HashMap::new();
        for ((ns, name), pod) in cluster.pods() {
            if let Some(ip) = model::pod_ipv4(pod) {
                pods_by_ip.insert(
                    ip,
                    PodInfo {
                        namespace: ns.clone(),
                        name: name.clone(),
                        labels: pod.labels.clone(),
                    },
                );
            }
        }
        let mut endpoints = HashMap::new();
        let mut isolating = HashMap::new();
        for ep in locals {
            let labels = cluster.pod(&ep.namespace, &ep.pod).map(|p| p.labels.clone()).unwrap_or_default();
            for dir in Direction::ALL {
                let names = policy::isolating_policies(cluster, &ep.namespace, &labels, dir)
                    .into_iter()
                    .map(|(namespace, name)| PolicyName::new(namespace, name))
                    .collect();
                isolating.insert((ep.endpoint_id, dir.number()), names);
            }
            let info = PodInfo {
                namespace: ep.namespace.clone(),
                name: ep.pod.clone(),
                labels,
            };
            // The CNI plugin assigned a local pod's address: it wins over the model's.
            pods_by_ip.insert(ep.ipv4, info.clone());
            endpoints.insert(ep.endpoint_id, info);
        }
        Resolver {
            node: node.to_string(),
            endpoints,
            pods_by_ip,
            rules: rules.clone(),
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
            self.services.insert(
                id,
                FlowService {
                    service: entry.service.clone(),
                    port_name: entry.port_name.clone(),
                    vip: key.vip,
                    port: key.port,
                },
            );
        }
        for (_, entry) in table.iter() {
            for b in &entry.backends {
                let list = self.backs.entry(b.ip).or_default();
                if !list.contains(&entry.service) {
                    list.push(entry.service.clone());
                }
            }
        }
        for list in self.backs.values_mut() {
            list.sort();
        }
        self
    }

    /// The flow record for `ev`, seen at `unix_ns`; `None` when the event carries a
    /// verdict or direction this agent does not know, or a time out of range.
    pub fn resolve(&self, ev: &FlowEvent, unix_ns: i128) -> Option<Flow> {
        let verdict = match ev.verdict {
            verdict::FORWARDED => FlowVerdict::Forwarded,
            verdict::DROPPED => FlowVerdict::Dropped,
            verdict::AUDIT => FlowVerdict::Audit,
            _ => return None,
        };
        let dir = Direction::from_number(ev.direction)?;
        let time = jiff::Timestamp::from_nanosecond(unix_ns).ok()?;
        let reason = DropReason::ALL.get(usize::from(ev.reason)).copied();
        let drop_reason = match (verdict, reason) {
            (FlowVerdict::Forwarded, _) | (_, Some(DropReason::Forwarded)) => None,
            (_, Some(r)) => Some(r.name().to_string()),
            (_, None) => Some(format!("unknown_{}", ev.reason)),
        };
        let (saddr, daddr) = (Ipv4Addr::from(ev.saddr), Ipv4Addr::from(ev.daddr));
        let (sport, dport) = (u16::from_be_bytes(ev.sport), u16::from_be_bytes(ev.dport));
        let local = self.endpoints.get(&ev.endpoint_id);
        let (source, destination) = match dir {
            Direction::Egress => (
                self.peer(local.or_else(|| self.pods_by_ip.get(&saddr)), saddr, sport, ev.identity),
                self.peer(self.pods_by_ip.get(&daddr), daddr, dport, ev.remote_identity),
            ),
            Direction::Ingress => (
                self.peer(self.pods_by_ip.get(&saddr), saddr, sport, ev.remote_identity),
                self.peer(local.or_else(|| self.pods_by_ip.get(&daddr)), daddr, dport, ev.identity),
            ),
        };
        let allowed_by = match self.rules.rule(ev.rule_id) {
            Some(r) if ev.rule_id != rule_id::NONE => vec![PolicyRule {
                policy: PolicyName::new(&*r.namespace, &*r.policy),
                direction: r.direction,
                rule: r.index,
            }],
            _ => Vec::new(),
        };
        // Default deny: no rule decided, so the flow is explained by what isolates the pod.
        let denied_by_default = ev.rule_id == rule_id::NONE
            && match verdict {
                FlowVerdict::Dropped => reason == Some(DropReason::PolicyDenied),
                FlowVerdict::Audit => true,
                FlowVerdict::Forwarded => false,
            };
        let isolated_by = if denied_by_default {
            self.isolating.get(&(ev.endpoint_id, ev.direction)).cloned().unwrap_or_default()
        } else {
            Vec::new()
        };
        Some(Flow {
            time,
            node: self.node.clone(),
            verdict,
            drop_reason,
            direction: dir,
            protocol: Protocol::from_number(ev.protocol),
            tcp_flags: (Protocol::from_number(ev.protocol) == Protocol::TCP && ev.tcp_flags != 0).then(|| tcp_flags(ev.tcp_flags)),
            source,
            destination,
            allowed_by,
            isolated_by,
            is_reply: false,
            service: (ev.service_id != 0).then(|| self.services.get(&ev.service_id).cloned()).flatten(),
        })
    }

    fn peer(&self, pod: Option<&PodInfo>, ip: Ipv4Addr, port: u16, identity: u32) -> FlowPeer {
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
            services: self.backs.get(&ip).cloned().unwrap_or_default(),
        }
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
