//! The model's compact pod: what identities, selectors, named ports, routing and the lab read
//! of a `v1 Pod`, with label sets, node names and port lists shared between pods.
//!
//! A parsed `k8s_openapi` Pod costs kilobytes (every optional field of the spec, owned strings
//! for each label); the model holds tens of thousands of pods, most of them copies of a few
//! templates (a Deployment's pods share their labels and ports), so the model keeps this
//! instead and an [`Interner`] lets equal parts share one allocation.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;
use std::net::Ipv4Addr;
use std::sync::Arc;

use bulkhead_api::Protocol;
use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::DEFAULT_NAMESPACE;

/// A label set, shared by every pod (and object) that has the same one.
pub type Labels = Arc<BTreeMap<String, String>>;

/// One declared container port: what named ports resolve against and what the lab serves.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodPort {
    /// `name`, when the port has one.
    pub name: Option<String>,
    /// `containerPort`.
    pub port: u16,
    /// `protocol` (default TCP).
    pub protocol: Protocol,
}

/// A pod as the model keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// `metadata.namespace` (the default namespace when the manifest names none).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: Labels,
    /// `spec.nodeName`, when scheduled.
    pub node: Option<Arc<str>>,
    /// The IPv4 address of `status.podIP` (an IPv6 one counts as none: the datapath is IPv4).
    pub ipv4: Option<Ipv4Addr>,
    /// Every container's declared ports, in declaration order.
    pub ports: Arc<[PodPort]>,
}

impl PodInfo {
    /// The model's view of a (validated) Pod. Ports with a protocol other than TCP, UDP or
    /// SCTP, or a number out of range, are left out: no named port could resolve to them.
    pub fn from_pod(pod: &Pod) -> PodInfo {
        let ports: Vec<PodPort> = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => Protocol::TCP,
                    "UDP" => Protocol::UDP,
                    "SCTP" => Protocol::SCTP,
                    _ => return None,
                };
                Some(PodPort {
                    name: p.name.clone(),
                    port: u16::try_from(p.container_port).ok()?,
                    protocol,
                })
            })
            .collect();
        PodInfo {
            namespace: pod.metadata.namespace.clone().unwrap_or_else(|| DEFAULT_NAMESPACE.to_string()),
            name: pod.metadata.name.clone().unwrap_or_default(),
            labels: Arc::new(pod.metadata.labels.clone().unwrap_or_default()),
            node: pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).map(Arc::from),
            ipv4: pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok()),
            ports: ports.into(),
        }
    }

    /// The smallest Pod object carrying this view (what [`super::Cluster::objects`] returns):
    /// one container holding every port.
    pub fn to_pod(&self) -> Pod {
        let ports: Vec<ContainerPort> = self
            .ports
            .iter()
            .map(|p| ContainerPort {
                name: p.name.clone(),
                container_port: i32::from(p.port),
                protocol: Some(p.protocol.to_string()),
                ..ContainerPort::default()
            })
            .collect();
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: (!self.labels.is_empty()).then(|| (*self.labels).clone()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: self.node.as_deref().map(str::to_string),
                containers: vec![Container {
                    name: "c".to_string(),
                    ports: (!ports.is_empty()).then_some(ports),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: self.ipv4.map(|ip| PodStatus {
                pod_ip: Some(ip.to_string()),
                ..PodStatus::default()
            }),
        }
    }

    /// The declared ports as (TCP ports, UDP ports), each sorted and without duplicates.
    pub fn declared_ports(&self) -> (Vec<u16>, Vec<u16>) {
        let of = |protocol: Protocol| {
            let mut v: Vec<u16> = self.ports.iter().filter(|p| p.protocol == protocol).map(|p| p.port).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        (of(Protocol::TCP), of(Protocol::UDP))
    }
}

/// Shares equal label sets, node names and port lists between the pods of one holder (the
/// model, a source's store), so N pods of one template cost one copy of each.
///
/// Entries no pod uses any more are dropped by [`Interner::release`].
#[derive(Clone, Debug, Default)]
pub struct Interner {
    labels: HashSet<Labels>,
    nodes: HashSet<Arc<str>>,
    ports: HashSet<Arc<[PodPort]>>,
}

fn share<T: ?Sized + Eq + Hash>(set: &mut HashSet<Arc<T>>, value: &mut Arc<T>) {
    match set.get(value) {
        Some(shared) => *value = shared.clone(),
        None => {
            set.insert(value.clone());
        }
    }
}

fn unshare<T: ?Sized + Eq + Hash>(set: &mut HashSet<Arc<T>>, value: Arc<T>) {
    // Two holders left: the set and `value`; once `value` goes, nothing uses the entry.
    if Arc::strong_count(&value) == 2 {
        set.remove(&value);
    }
}

impl Interner {
    /// Replaces the pod's parts by the shared copies, adding those not seen yet.
    pub fn intern(&mut self, pod: &mut PodInfo) {
        share(&mut self.labels, &mut pod.labels);
        share(&mut self.ports, &mut pod.ports);
        if let Some(node) = pod.node.as_mut() {
            share(&mut self.nodes, node);
        }
    }

    /// Forgets the pod's parts when it was their last user (call with a pod leaving its holder).
    pub fn release(&mut self, pod: PodInfo) {
        unshare(&mut self.labels, pod.labels);
        unshare(&mut self.ports, pod.ports);
        if let Some(node) = pod.node {
            unshare(&mut self.nodes, node);
        }
    }

    /// Distinct label sets held (for tests and metrics).
    pub fn label_sets(&self) -> usize {
        self.labels.len()
    }
}

/// A pod's labels (empty if none).
pub fn pod_labels(pod: &PodInfo) -> BTreeMap<String, String> {
    (*pod.labels).clone()
}

/// A pod's IPv4 address from `status.podIP`, if it has one.
pub fn pod_ipv4(pod: &PodInfo) -> Option<Ipv4Addr> {
    pod.ipv4
}

/// A pod's node from `spec.nodeName`, if scheduled.
pub fn pod_node(pod: &PodInfo) -> Option<&str> {
    pod.node.as_deref()
}

/// The port numbers a pod declares under `name` for `protocol` (default TCP).
pub fn named_ports(pod: &PodInfo, name: &str, protocol: &str) -> Vec<u16> {
    let mut out: Vec<u16> = pod
        .ports
        .iter()
        .filter(|p| p.name.as_deref() == Some(name) && p.protocol.name() == Some(protocol))
        .map(|p| p.port)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}
