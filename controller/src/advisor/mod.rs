//! The policy advisor: NetworkPolicies learnt from observed flows.
//!
//! Pure: flow records in, one proposed policy per workload out. [`learn`] groups the pods of
//! each flow into workloads ([`workload`]), outside addresses into CIDRs of a chosen prefix,
//! and keeps, per workload and direction, every peer and port a connection was seen on with
//! its evidence (connections, first and last seen, Services dialled); [`render`] writes the
//! policies as YAML with that evidence in comments. Forwarded and audited flows are
//! observed traffic; drops are not (they are what a policy already refuses), nor are replies
//! (the policy allows a connection, its replies follow).

pub mod render;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use bulkhead_api::{Direction, Flow, FlowPeer, FlowVerdict, Protocol};
use ipnetwork::Ipv4Network;

pub use workload::Workload;

/// Two records of one 5-tuple closer in time than this are the same connection (the
/// sender's egress and the receiver's ingress record it once each).
const SAME_CONNECTION_NS: i128 = 5_000_000_000;

/// What to learn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Only propose policies for workloads of this namespace (peers may be anywhere).
    pub namespace: Option<String>,
    /// Outside addresses are allowed as CIDRs of this prefix length (32: one address each).
    pub cidr_prefix: u8,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            namespace: None,
            cidr_prefix: 24,
        }
    }
}

/// Why nothing could be learnt.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdviseError {
    /// No forwarded or audited flow to learn from.
    #[error("no observed traffic to learn from: {detail}")]
    NoFlows {
        /// What was there instead.
        detail: String,
    },
    /// `--namespace` names a namespace no observed flow has a pod in.
    #[error("unknown namespace {namespace:?}: no observed flow has a pod in it (namespaces seen: {known})")]
    UnknownNamespace {
        /// The namespace asked for.
        namespace: String,
        /// The namespaces the flows have pods in.
        known: String,
    },
    /// `--cidr-prefix` out of range.
    #[error("cidr prefix {0} is not between 1 and 32")]
    BadPrefix(u8),
}

/// The other end of a rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Pods of a workload.
    Workload(Workload),
    /// Addresses outside the cluster's pods, aggregated.
    Cidr(Ipv4Network),
}

/// A port a connection went to: the server's (after Service translation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    /// TCP, UDP or SCTP.
    pub protocol: Protocol,
    /// The destination port.
    pub port: u16,
}

impl std::fmt::Display for PortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// What a rule was learnt from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evidence {
    /// Distinct connections (5-tuples) seen.
    pub connections: u64,
    /// Flow records that showed them.
    pub records: u64,
    /// Connections that were audited (an audit-mode policy would have denied them).
    pub audited: u64,
    /// The first record's time.
    pub first: jiff::Timestamp,
    /// The last record's time.
    pub last: jiff::Timestamp,
    /// The Services the clients dialled (`namespace/name`), when they went through one.
    pub services: BTreeSet<String>,
}

impl Evidence {
    fn new(at: jiff::Timestamp) -> Self {
        Evidence {
            connections: 0,
            records: 0,
            audited: 0,
            first: at,
            last: at,
            services: BTreeSet::new(),
        }
    }

    fn add(&mut self, flow: &Flow, new_connection: bool) {
        self.records += 1;
        self.connections += u64::from(new_connection);
        self.audited += u64::from(new_connection && flow.verdict == FlowVerdict::Audit);
        self.first = self.first.min(flow.time);
        self.last = self.last.max(flow.time);
        if let Some(s) = &flow.service {
            self.services.insert(s.service.to_string());
        }
    }

    fn merge(&mut self, other: &Evidence) {
        self.connections += other.connections;
        self.records += other.records;
        self.audited += other.audited;
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
        self.services.extend(other.services.iter().cloned());
    }
}

/// Per peer, per port: the evidence.
pub type Rules = BTreeMap<Peer, BTreeMap<PortKey, Evidence>>;

/// What was learnt about one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadAdvice {
    /// The workload.
    pub workload: Workload,
    /// How many distinct pods of it the flows showed.
    pub pods: usize,
    /// Who connected to it, on which ports.
    pub ingress: Rules,
    /// What it connected to, on which ports.
    pub egress: Rules,
}

impl WorkloadAdvice {
    /// The rules of one direction.
    pub fn rules(&self, direction: Direction) -> &Rules {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// Everything learnt about it, summed.
    pub fn total(&self) -> Option<Evidence> {
        let mut all = self.ingress.values().chain(self.egress.values()).flat_map(|p| p.values());
        let mut total = all.next()?.clone();
        for e in all {
            total.merge(e);
        }
        Some(total)
    }
}

/// Flows set aside, by why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ignored {
    /// DROPPED: traffic a policy already refuses.
    pub dropped: usize,
    /// Replies of established connections.
    pub replies: usize,
    /// Not TCP, UDP or SCTP (a NetworkPolicy cannot name ICMP), or not IPv4.
    pub protocol: usize,
    /// Outside the namespace asked for.
    pub other_namespace: usize,
    /// Pods with no label to group them by (`namespace/name`), whose flows were left out.
    pub unlabelled_pods: BTreeSet<String>,
}

/// The advice: one entry per workload, and what was left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advice {
    /// Per workload, what it was seen doing.
    pub workloads: BTreeMap<Workload, WorkloadAdvice>,
    /// Flow records learnt from.
    pub used: usize,
    /// Flow records set aside.
    pub ignored: Ignored,
    /// The prefix outside addresses were aggregated to.
    pub cidr_prefix: u8,
}

/// A flow end as a rule peer: a workload, an outside CIDR, or nothing usable.
enum End {
    Pod(Workload, String),
    Outside(Ipv4Network),
    Unusable,
}

fn end(peer: &FlowPeer, prefix: u8, ignored: &mut Ignored) -> End {
    if let Some(pod) = peer.pod_name() {
        let namespace = pod.namespace.clone();
        return match Workload::of(&namespace, &peer.labels) {
            Some(w) => End::Pod(w, pod.to_string()),
            None => {
                ignored.unlabelled_pods.insert(pod.to_string());
                End::Unusable
            }
        };
    }
    if peer.ip.is_unspecified() {
        return End::Unusable;
    }
    match Ipv4Network::new(peer.ip, prefix).and_then(|n| Ipv4Network::new(n.network(), prefix)) {
        Ok(net) => End::Outside(net),
        Err(_) => End::Unusable,
    }
}

/// The 5-tuple of a flow, direction-free.
type Tuple = (Ipv4Addr, u16, Ipv4Addr, u16, Protocol);

/// Learns one policy per workload from `flows` (any order).
pub fn learn(flows: &[Flow], options: &Options) -> Result<Advice, AdviseError> {
    if !(1..=32).contains(&options.cidr_prefix) {
        return Err(AdviseError::BadPrefix(options.cidr_prefix));
    }
    // Byte reports (kind update, end) are no flows: a connection's packet record already
    // showed it, and counting them would make one long connection look like many.
    let mut sorted: Vec<&Flow> = flows.iter().filter(|f| f.kind.is_packet()).collect();
    sorted.sort_by_key(|f| f.time);
    let mut ignored = Ignored::default();
    let mut used = 0;
    let mut namespaces_seen = BTreeSet::new();
    let mut workloads: BTreeMap<Workload, WorkloadAdvice> = BTreeMap::new();
    let mut pods: BTreeMap<Workload, BTreeSet<String>> = BTreeMap::new();
    // Per side and 5-tuple: when it was last seen, to count connections, not records.
    let mut last_seen: HashMap<(Direction, Tuple), jiff::Timestamp> = HashMap::new();
    for flow in sorted {
        if flow.verdict == FlowVerdict::Dropped {
            ignored.dropped += 1;
            continue;
        }
        if flow.is_reply {
            ignored.replies += 1;
            continue;
        }
        if ![Protocol::TCP, Protocol::UDP, Protocol::SCTP].contains(&flow.protocol) {
            ignored.protocol += 1;
            continue;
        }
        for peer in [&flow.source, &flow.destination] {
            if let Some(ns) = &peer.namespace {
                namespaces_seen.insert(ns.clone());
            }
        }
        let src = end(&flow.source, options.cidr_prefix, &mut ignored);
        let dst = end(&flow.destination, options.cidr_prefix, &mut ignored);
        let port = PortKey {
            protocol: flow.protocol,
            port: flow.destination.port,
        };
        let tuple = (
            flow.source.ip,
            flow.source.port,
            flow.destination.ip,
            flow.destination.port,
            flow.protocol,
        );
        let wanted = |w: &Workload| options.namespace.as_deref().is_none_or(|ns| ns == w.namespace);
        let mut learnt = false;
        // The sender's egress rule and the receiver's ingress rule: both must allow it.
        let sides = [(Direction::Egress, &src, &dst), (Direction::Ingress, &dst, &src)];
        for (direction, local, remote) in sides {
            let End::Pod(workload, pod) = local else {
                continue;
            };
            if !wanted(workload) {
                continue;
            }
            let remote = match remote {
                End::Pod(w, _) => Peer::Workload(w.clone()),
                End::Outside(net) => Peer::Cidr(*net),
                End::Unusable => continue,
            };
            let new_connection = match last_seen.insert((direction, tuple), flow.time) {
                Some(before) => flow.time.as_nanosecond() - before.as_nanosecond() > SAME_CONNECTION_NS,
                None => true,
            };
            pods.entry(workload.clone()).or_default().insert(pod.clone());
            let advice = workloads.entry(workload.clone()).or_insert_with(|| WorkloadAdvice {
                workload: workload.clone(),
                pods: 0,
                ingress: Rules::new(),
                egress: Rules::new(),
            });
            let rules = match direction {
                Direction::Ingress => &mut advice.ingress,
                Direction::Egress => &mut advice.egress,
            };
            rules
                .entry(remote)
                .or_default()
                .entry(port)
                .or_insert_with(|| Evidence::new(flow.time))
                .add(flow, new_connection);
            learnt = true;
        }
        if learnt {
            used += 1;
        } else if options.namespace.is_some() {
            ignored.other_namespace += 1;
        }
    }
    for (w, names) in pods {
        if let Some(a) = workloads.get_mut(&w) {
            a.pods = names.len();
        }
    }
    if let Some(ns) = &options.namespace {
        if !namespaces_seen.contains(ns) {
            return Err(AdviseError::UnknownNamespace {
                namespace: ns.clone(),
                known: if namespaces_seen.is_empty() {
                    "none".into()
                } else {
                    namespaces_seen.into_iter().collect::<Vec<_>>().join(", ")
                },
            });
        }
    }
    if workloads.is_empty() {
        return Err(AdviseError::NoFlows {
            detail: describe_empty(flows.len(), &ignored),
        });
    }
    Ok(Advice {
        workloads,
        used,
        ignored,
        cidr_prefix: options.cidr_prefix,
    })
}

fn describe_empty(total: usize, ignored: &Ignored) -> String {
    if total == 0 {
        return "the flow history is empty (run some traffic first, or widen --since)".into();
    }
    let mut parts = vec![format!("{total} flow records")];
    for (n, what) in [
        (ignored.dropped, "dropped"),
        (ignored.replies, "replies"),
        (ignored.protocol, "not TCP, UDP or SCTP"),
        (ignored.other_namespace, "outside the namespace"),
        (ignored.unlabelled_pods.len(), "unlabelled pods"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    format!("{}, none forwarded or audited between labelled pods", parts.join(", "))
}

#[cfg(test)]
mod tests;
