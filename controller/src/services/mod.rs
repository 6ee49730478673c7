//! The service table: every ClusterIP Service port of the model, `{vip, port, protocol}`,
//! with its backends resolved from the Service's EndpointSlices. Pure: the datapath's
//! service and backend maps are written from it.
//!
//! Resolution follows kube-proxy
//! (<https://github.com/kubernetes/kubernetes/blob/master/pkg/proxy/endpointslicecache.go>):
//! all slices labelled `kubernetes.io/service-name: <service>` in the Service's namespace
//! are merged; a slice port serves the Service port of the same name and protocol (the
//! port number is the slice's, which is how a named targetPort resolves per pod: the
//! EndpointSlice controller puts pods whose ports resolve differently into different
//! slices); an address listed twice is one backend.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use bulkhead_api::{NamespacedName, Protocol};

use crate::model::{Cluster, ClusterIp, ServiceInfo, ServicePortInfo, SessionAffinity};

/// What a packet's destination is looked up by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// The Service's ClusterIP.
    pub vip: Ipv4Addr,
    /// The Service port.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
}

/// One endpoint of a Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// The endpoint's address.
    pub ip: Ipv4Addr,
    /// The port on the endpoint (a named targetPort, resolved for this endpoint).
    pub port: u16,
    /// May receive new connections.
    pub ready: bool,
    /// Answers (even while terminating).
    pub serving: bool,
    /// Is shutting down.
    pub terminating: bool,
    /// The pod behind it, when the EndpointSlice names one.
    pub pod: Option<NamespacedName>,
    /// The node it runs on, when the EndpointSlice says.
    pub node: Option<String>,
}

/// One ClusterIP Service port and its backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// The Service.
    pub service: NamespacedName,
    /// The Service port's name (empty for a single unnamed port).
    pub port_name: String,
    /// The Service's session affinity.
    pub affinity: SessionAffinity,
    /// Every endpoint of the port, ready or not, in address order; the datapath uses
    /// [`ServiceEntry::selected`].
    pub backends: Vec<Backend>,
}

impl ServiceEntry {
    /// The backends new connections may go to, as kube-proxy picks them: the ready ones;
    /// when none is ready, the ones that are serving while terminating (so a rolling
    /// update's last pods still answer); otherwise none (the datapath refuses the
    /// connection at once).
    pub fn selected(&self) -> Vec<&Backend> {
        let ready: Vec<&Backend> = self.backends.iter().filter(|b| b.ready).collect();
        if !ready.is_empty() {
            return ready;
        }
        self.backends.iter().filter(|b| b.serving && b.terminating).collect()
    }
}

impl ServiceEntry {
    /// The entry of one port of `svc` (ClusterIP or headless): its endpoints merged from
    /// every EndpointSlice of the Service.
    pub fn of_port(cluster: &Cluster, svc: &ServiceInfo, port: &ServicePortInfo) -> ServiceEntry {
        let mut backends: BTreeMap<(Ipv4Addr, u16), Backend> = BTreeMap::new();
        for slice in cluster.endpoint_slices_of(&svc.namespace, &svc.name) {
            let Some(slice_port) = slice.ports.iter().find(|p| p.name == port.name && p.protocol == port.protocol) else {
                continue;
            };
            for e in &slice.endpoints {
                let backend = Backend {
                    ip: e.address,
                    port: slice_port.port,
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    pod: e.pod.clone(),
                    node: e.node_name.clone(),
                };
                // Slices overlap briefly while the controller moves an endpoint: keep the
                // most usable copy.
                backends
                    .entry((e.address, slice_port.port))
                    .and_modify(|old| {
                        if rank(&backend) > rank(old) {
                            *old = backend.clone();
                        }
                    })
                    .or_insert(backend);
            }
        }
        ServiceEntry {
            service: svc.namespaced_name(),
            port_name: port.name.clone(),
            affinity: svc.session_affinity,
            backends: backends.into_values().collect(),
        }
    }
}

/// Every ClusterIP Service port of the cluster, by `{vip, port, protocol}`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTable {
    entries: BTreeMap<ServiceKey, ServiceEntry>,
}

impl ServiceTable {
    /// The table of the model: one entry per port of every Service with an IPv4 ClusterIP
    /// (headless Services and those without a ClusterIP have none).
    pub fn from_cluster(cluster: &Cluster) -> ServiceTable {
        let mut entries = BTreeMap::new();
        for svc in cluster.services() {
            let ClusterIp::Ipv4(vip) = svc.cluster_ip else {
                continue;
            };
            for port in &svc.ports {
                let key = ServiceKey {
                    vip,
                    port: port.port,
                    protocol: port.protocol,
                };
                entries.insert(key, ServiceEntry::of_port(cluster, svc, port));
            }
        }
        ServiceTable { entries }
    }

    /// The entry for a destination.
    pub fn get(&self, key: &ServiceKey) -> Option<&ServiceEntry> {
        self.entries.get(key)
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&ServiceKey, &ServiceEntry)> {
        self.entries.iter()
    }

    /// The entries of one Service, in key order.
    pub fn of_service<'a>(&'a self, service: &'a NamespacedName) -> impl Iterator<Item = (&'a ServiceKey, &'a ServiceEntry)> + 'a {
        self.entries.iter().filter(move |(_, e)| &e.service == service)
    }

    /// How many `{vip, port, protocol}` entries there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What changed from `old` to this table: the keys whose entry is new or different, and
    /// the keys no longer present, each in key order (what a map sync writes and deletes).
    pub fn diff(&self, old: &ServiceTable) -> ServiceTableDiff {
        ServiceTableDiff {
            upserted: self
                .entries
                .iter()
                .filter(|(k, e)| old.entries.get(k) != Some(e))
                .map(|(k, _)| *k)
                .collect(),
            removed: old.entries.keys().filter(|k| !self.entries.contains_key(k)).copied().collect(),
        }
    }
}

/// The difference between two service tables ([`ServiceTable::diff`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTableDiff {
    /// Keys whose entry is new or changed.
    pub upserted: Vec<ServiceKey>,
    /// Keys that are gone.
    pub removed: Vec<ServiceKey>,
}

/// Ready beats serving beats neither; a terminating copy loses to a live one.
fn rank(b: &Backend) -> (bool, bool, bool) {
    (b.ready, b.serving, !b.terminating)
}

#[cfg(test)]
mod tests;
