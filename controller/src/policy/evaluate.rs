//! The NetworkPolicy spec, evaluated directly on the model: which policies isolate a pod
//! and whether one of their rules allows a connection. `explain` and flow naming use it;
//! the compiler is tested against it.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::selector;
use crate::model::PodInfo as Pod;
use crate::model::{self, Cluster};
use crate::policy::identity::{Direction, RuleRef};

use super::compile::{block_contains, policy_types, selector_or_all};

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
pub(super) type RuleParts<'s> = (Option<&'s Vec<NetworkPolicyPeer>>, Option<&'s Vec<NetworkPolicyPort>>);

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
