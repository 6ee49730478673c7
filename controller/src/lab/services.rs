//! Services in the lab: ClusterIPs from the lab's service CIDR, the EndpointSlice
//! controller's work, and a Service of its own for every pod.
//!
//! The lab plays the parts of a cluster's control plane that Services need, as the API server
//! and kube-controller-manager do, and writes the result into the manifest the agents watch:
//!
//! - **ClusterIP allocation** (the API server): a Service without `clusterIP` gets the lowest
//!   free address of the upper band of the service CIDR; one that names its own keeps it when
//!   it is inside the CIDR and free. As in Kubernetes the lower band (the first
//!   `clamp(size / 16, 16, 256)` addresses) is left for Services that name their address, so
//!   a fixed address like a DNS Service's `.10` is free whatever else was created first. A
//!   re-applied Service keeps its address; naming another one is refused (the field is
//!   immutable). `clusterIP: None` is headless: no address.
//! - **EndpointSlices** (the EndpointSlice controller,
//!   <https://github.com/kubernetes/kubernetes/tree/master/pkg/controller/endpointslice>): for
//!   each Service with a selector, the pods of its namespace with an address whose labels
//!   match, grouped by how the Service's ports resolve on them (a named targetPort is looked
//!   up in each pod's container ports; a pod that does not declare it has no port for that
//!   Service port), at most 100 endpoints a slice. A Service without a selector keeps the
//!   slices the user applied.
//! - **Pod Services** (the lab's own): every pod gets a selector-less Service named
//!   [`pod_service_name`], in its namespace, whose one slice holds exactly that pod, with one
//!   port per declared container port (TCP and UDP: the lab serves no SCTP) and the ports
//!   `probe --via service` was asked for. Relabelling a pod never changes where it goes.
//!
//! Everything here is pure: [`admit`] and [`reconcile`] change a [`Cluster`] and the lab
//! state, and the caller publishes both.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use bulkhead_api::{NamespacedName, Protocol};
use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use super::model::{
    self, Cluster, ClusterIp, EndpointInfo, EndpointPortInfo, EndpointSliceInfo, Object, PodInfo as Pod, ServiceInfo, ServicePortInfo,
    SessionAffinity, TargetPort,
};
use super::state::LabState;
use super::LabError;

/// The prefix of every pod Service's name; the lab refuses user Services and slices with it.
pub const POD_SERVICE_PREFIX: &str = "bh-pod-";
/// The most endpoints the EndpointSlice controller puts in one slice (its default).
const MAX_ENDPOINTS_PER_SLICE: usize = 100;
/// Where the lab looks for a service CIDR: the /16s of Kubernetes' default 10.96.0.0/12.
const SERVICE_CIDR_CANDIDATES: std::ops::RangeInclusive<u8> = 96..=111;

/// A port `probe --via service` added to every pod Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExtraPort {
    /// The port (the same on the ClusterIP and the pod).
    pub port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

/// The first /16 of 10.96.0.0/12 that overlaps neither the cluster CIDR, the underlay nor any
/// host route: the lab's service CIDR.
pub fn pick_service_cidr(avoid: &[Ipv4Network], routes: &[Ipv4Network]) -> Result<Ipv4Network, LabError> {
    SERVICE_CIDR_CANDIDATES
        .filter_map(|b| Ipv4Network::new(Ipv4Addr::new(10, b, 0, 0), 16).ok())
        .find(|c| !avoid.iter().chain(routes).any(|r| r.overlaps(*c)))
        .ok_or(LabError::NoFreeServiceCidr)
}

/// The lab's service CIDR; a lab made before Services had none, so one is picked and
/// recorded now.
pub fn service_cidr(state: &mut LabState) -> Result<Ipv4Network, LabError> {
    if let Some(cidr) = state.service_cidr.as_deref().and_then(|c| model::parse_cidr(c).ok()) {
        return Ok(cidr);
    }
    let avoid: Vec<Ipv4Network> = [Some(state.cluster_cidr.as_str()), state.underlay_cidr.as_deref()]
        .into_iter()
        .flatten()
        .filter_map(|c| model::parse_cidr(c).ok())
        .collect();
    let cidr = pick_service_cidr(&avoid, &super::node::host_routes())?;
    state.service_cidr = Some(cidr.to_string());
    Ok(cidr)
}

/// The name of the Service of pod `name`: `bh-pod-<name>` when that is a DNS-1035 label of at
/// most 63 characters (as Service names must be), else `bh-pod-<the name, cut and cleaned>-<hash>`.
pub fn pod_service_name(name: &str) -> String {
    let plain = format!("{POD_SERVICE_PREFIX}{name}");
    let label =
        plain.len() <= 63 && plain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !plain.ends_with('-');
    if label {
        return plain;
    }
    let cleaned: String = name
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' })
        .take(40)
        .collect();
    format!(
        "{POD_SERVICE_PREFIX}{}-{:08x}",
        cleaned.trim_end_matches('-'),
        super::pod::fnv1a(name)
    )
}

fn object_name(svc: &NamespacedName) -> String {
    format!("Service {svc}")
}

fn unsupported(object: String, message: String) -> LabError {
    LabError::Unsupported { object, message }
}

/// The addresses of a CIDR a Service may have (not the network or broadcast address), as
/// offsets: the upper band first, then the lower one, which Services naming their address
/// use.
fn allocation_order(cidr: Ipv4Network) -> impl Iterator<Item = u32> {
    let size = cidr.size();
    let band = (size / 16).clamp(16, 256).min(size / 2);
    (band..size.saturating_sub(1)).chain(1..band)
}

/// The ClusterIP of every Service that has one: address → Service.
fn allocated(cluster: &Cluster) -> BTreeMap<Ipv4Addr, NamespacedName> {
    cluster
        .services()
        .filter_map(|s| match s.cluster_ip {
            ClusterIp::Ipv4(ip) => Some((ip, s.namespaced_name())),
            _ => None,
        })
        .collect()
}

/// The lowest free address in allocation order.
fn allocate(cidr: Ipv4Network, used: &BTreeMap<Ipv4Addr, NamespacedName>) -> Option<Ipv4Addr> {
    allocation_order(cidr).filter_map(|i| cidr.nth(i)).find(|ip| !used.contains_key(ip))
}

/// What a user's Service object asks of its ClusterIP.
enum Wanted {
    /// None named: allocate (or keep the one it has).
    Any,
    /// `clusterIP: None`.
    Headless,
    /// This address.
    Ip(Ipv4Addr),
}

fn wanted_ip(svc: &k8s_openapi::api::core::v1::Service) -> Wanted {
    let Some(spec) = &svc.spec else {
        return Wanted::Any;
    };
    let text = spec
        .cluster_ips
        .iter()
        .flatten()
        .next()
        .or(spec.cluster_ip.as_ref())
        .map(String::as_str)
        .unwrap_or_default();
    match text {
        "" => Wanted::Any,
        model::HEADLESS => Wanted::Headless,
        // The model's validation admits only IPv4 addresses and None.
        other => other.parse().map_or(Wanted::Any, Wanted::Ip),
    }
}

/// Checks the Services and EndpointSlices among `objects` and gives each Service its ClusterIP,
/// as the API server does on create and update, against `cluster` (the model before the
/// change). Fails, changing nothing, on a name the lab reserves, an address outside `cidr`
/// or taken, or a changed address.
pub fn admit(cluster: &Cluster, objects: &mut [Object], cidr: Ipv4Network) -> Result<(), LabError> {
    let mut used = allocated(cluster);
    for object in objects.iter_mut() {
        match object {
            Object::EndpointSlice(slice) => {
                let service = slice.metadata.labels.as_ref().and_then(|l| l.get(model::SERVICE_NAME_LABEL));
                let name = slice.metadata.name.as_deref().unwrap_or_default();
                if name.starts_with(POD_SERVICE_PREFIX) || service.is_some_and(|s| s.starts_with(POD_SERVICE_PREFIX)) {
                    return Err(unsupported(
                        format!("EndpointSlice {}/{name}", slice.metadata.namespace.as_deref().unwrap_or_default()),
                        format!("names starting with {POD_SERVICE_PREFIX:?} belong to the lab's pod Services"),
                    ));
                }
            }
            Object::Service(svc) => {
                let id = NamespacedName::new(
                    svc.metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| model::DEFAULT_NAMESPACE.to_string()),
                    svc.metadata.name.clone().unwrap_or_default(),
                );
                if id.name.starts_with(POD_SERVICE_PREFIX) {
                    return Err(unsupported(
                        object_name(&id),
                        format!("names starting with {POD_SERVICE_PREFIX:?} belong to the lab's pod Services"),
                    ));
                }
                let external = svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ExternalName");
                let immutable = |old: &str, new: &str| {
                    unsupported(
                        object_name(&id),
                        format!("spec.clusterIP: field is immutable (it is {old}, not {new})"),
                    )
                };
                let current = cluster.service(&id.namespace, &id.name).map(|s| s.cluster_ip);
                let assigned = match (current, wanted_ip(svc)) {
                    _ if external => None,
                    (Some(ClusterIp::Ipv4(old)), Wanted::Any) => Some(ClusterIp::Ipv4(old)),
                    (Some(ClusterIp::Ipv4(old)), Wanted::Ip(new)) if new == old => Some(ClusterIp::Ipv4(old)),
                    (Some(ClusterIp::Ipv4(old)), Wanted::Ip(new)) => return Err(immutable(&old.to_string(), &new.to_string())),
                    (Some(ClusterIp::Ipv4(old)), Wanted::Headless) => return Err(immutable(&old.to_string(), model::HEADLESS)),
                    (Some(ClusterIp::Headless), Wanted::Ip(new)) => return Err(immutable(model::HEADLESS, &new.to_string())),
                    (Some(ClusterIp::Headless), Wanted::Any | Wanted::Headless) | (_, Wanted::Headless) => Some(ClusterIp::Headless),
                    (None | Some(ClusterIp::Unallocated), Wanted::Ip(ip)) => {
                        let usable = allocation_order(cidr).filter_map(|i| cidr.nth(i)).any(|a| a == ip);
                        if !usable {
                            return Err(unsupported(
                                object_name(&id),
                                format!("spec.clusterIP: {ip} is not a usable address of the lab's service CIDR {cidr}"),
                            ));
                        }
                        if let Some(owner) = used.get(&ip).filter(|o| **o != id) {
                            return Err(unsupported(
                                object_name(&id),
                                format!("spec.clusterIP: {ip} is already allocated to Service {owner}"),
                            ));
                        }
                        Some(ClusterIp::Ipv4(ip))
                    }
                    (None | Some(ClusterIp::Unallocated), Wanted::Any) => {
                        Some(ClusterIp::Ipv4(allocate(cidr, &used).ok_or_else(|| {
                            unsupported(object_name(&id), format!("spec.clusterIP: the lab's service CIDR {cidr} is full"))
                        })?))
                    }
                };
                let spec = svc.spec.get_or_insert_with(Default::default);
                let text = match assigned {
                    Some(ClusterIp::Ipv4(ip)) => {
                        used.insert(ip, id);
                        ip.to_string()
                    }
                    // A re-applied headless Service that no longer says so stays headless.
                    Some(ClusterIp::Headless) => model::HEADLESS.to_string(),
                    _ => continue,
                };
                spec.cluster_ip = Some(text.clone());
                spec.cluster_ips = Some(vec![text]);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Refuses to delete a lab-owned pod Service (the lab would make it again at once).
pub fn check_delete(objects: &[Object]) -> Result<(), LabError> {
    for object in objects {
        if let Object::Service(_) = object {
            if object.name().starts_with(POD_SERVICE_PREFIX) {
                return Err(unsupported(
                    object.to_ref().to_string(),
                    "a pod's own Service goes with its pod; delete the pod".into(),
                ));
            }
        }
    }
    Ok(())
}

/// The ports of a pod's own Service: its declared TCP and UDP container ports and `extra`,
/// each `<protocol>-<port>` (every port of a multi-port Service needs a name) with the same
/// targetPort.
fn pod_service_ports(pod: &Pod, extra: &[ExtraPort]) -> Vec<ServicePortInfo> {
    let (tcp, udp) = super::pod::declared_ports(pod);
    let mut ports: BTreeSet<(Protocol, u16)> = tcp.into_iter().map(|p| (Protocol::TCP, p)).collect();
    ports.extend(udp.into_iter().map(|p| (Protocol::UDP, p)));
    ports.extend(extra.iter().map(|e| (e.protocol, e.port)));
    ports
        .into_iter()
        .map(|(protocol, port)| ServicePortInfo {
            name: format!("{}-{port}", protocol.to_string().to_ascii_lowercase()),
            port,
            target_port: TargetPort::Number(port),
            protocol,
        })
        .collect()
}

fn endpoint(pod: &Pod, ip: Ipv4Addr) -> EndpointInfo {
    EndpointInfo {
        address: ip,
        // A lab pod serves its ports before CNI ADD gives it an address: ready once it has one.
        ready: true,
        serving: true,
        terminating: false,
        node_name: model::pod_node(pod).map(str::to_string),
        pod: Some(NamespacedName::new(pod.namespace.clone(), pod.name.clone())),
    }
}

/// Where each of a Service's ports goes on `pod`, as the EndpointSlice controller resolves
/// them: a number as it is, a name from the pod's container ports of that protocol; a name
/// the pod does not declare gives no port.
fn resolve_ports(svc: &ServiceInfo, pod: &Pod) -> Vec<EndpointPortInfo> {
    let mut out: Vec<EndpointPortInfo> = svc
        .ports
        .iter()
        .filter_map(|p| {
            let port = match &p.target_port {
                TargetPort::Number(n) => *n,
                TargetPort::Name(name) => *model::named_ports(pod, name, &p.protocol.to_string()).first()?,
            };
            Some(EndpointPortInfo {
                name: p.name.clone(),
                port,
                protocol: p.protocol,
            })
        })
        .collect();
    out.sort();
    out
}

/// The slices the EndpointSlice controller keeps for a Service with a selector: its
/// namespace's pods with an address whose labels match, one slice per distinct port
/// resolution, named `<service>-bh<hash of the ports>` (`-<k>` for the k-th hundred).
fn controller_slices(cluster: &Cluster, svc: &ServiceInfo, selector: &BTreeMap<String, String>) -> Vec<EndpointSliceInfo> {
    let mut groups: BTreeMap<Vec<EndpointPortInfo>, Vec<EndpointInfo>> = BTreeMap::new();
    for ((ns, _), pod) in cluster.pods() {
        if ns != &svc.namespace {
            continue;
        }
        let labels = model::pod_labels(pod);
        if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        let Some(ip) = model::pod_ipv4(pod) else {
            continue;
        };
        groups.entry(resolve_ports(svc, pod)).or_default().push(endpoint(pod, ip));
    }
    let mut slices = Vec::new();
    for (ports, endpoints) in groups {
        let signature: String = ports.iter().map(|p| format!("{}/{}/{};", p.name, p.port, p.protocol)).collect();
        let base = format!("{}-bh{:08x}", svc.name, super::pod::fnv1a(&signature));
        for (k, chunk) in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE).enumerate() {
            slices.push(EndpointSliceInfo {
                namespace: svc.namespace.clone(),
                name: if k == 0 { base.clone() } else { format!("{base}-{k}") },
                service: Some(svc.name.clone()),
                endpoints: chunk.to_vec(),
                ports: ports.clone(),
            });
        }
    }
    slices
}

/// Brings the Services and EndpointSlices the lab owns in line with the rest of `cluster`:
/// every pod has its own Service (allocated on first sight, removed with the pod) and slice;
/// every Service with a selector has exactly the controller's slices. Records the slices it
/// wrote in `state.managed_slices`, so the next run replaces them and leaves the user's alone.
pub fn reconcile(cluster: &mut Cluster, state: &mut LabState) -> Result<(), LabError> {
    let cidr = service_cidr(state)?;
    // Pod Services: one per pod, none for pods that are gone.
    let wanted: BTreeMap<(String, String), (String, String)> = cluster
        .pods()
        .keys()
        .map(|(ns, name)| ((ns.clone(), pod_service_name(name)), (ns.clone(), name.clone())))
        .collect();
    let stale: Vec<(String, String)> = cluster
        .services()
        .filter(|s| s.name.starts_with(POD_SERVICE_PREFIX) && !wanted.contains_key(&(s.namespace.clone(), s.name.clone())))
        .map(|s| (s.namespace.clone(), s.name.clone()))
        .collect();
    for (ns, name) in stale {
        cluster.delete(&model::ObjectRef {
            kind: model::Kind::Service,
            namespace: Some(ns),
            name,
        });
    }
    let mut used = allocated(cluster);
    let mut slices: Vec<EndpointSliceInfo> = Vec::new();
    for ((ns, svc_name), (_, pod_name)) in &wanted {
        let Some(pod) = cluster.pod(ns, pod_name).cloned() else {
            continue;
        };
        let id = NamespacedName::new(ns.clone(), svc_name.clone());
        let ip = match cluster.service(ns, svc_name).map(|s| s.cluster_ip) {
            Some(ClusterIp::Ipv4(ip)) => ip,
            _ => allocate(cidr, &used).ok_or_else(|| unsupported(object_name(&id), format!("the lab's service CIDR {cidr} is full")))?,
        };
        used.insert(ip, id);
        let info = ServiceInfo {
            namespace: ns.clone(),
            name: svc_name.clone(),
            cluster_ip: ClusterIp::Ipv4(ip),
            selector: None,
            ports: pod_service_ports(&pod, &state.service_probe_ports),
            session_affinity: SessionAffinity::None,
        };
        slices.push(EndpointSliceInfo {
            namespace: ns.clone(),
            name: svc_name.clone(),
            service: Some(svc_name.clone()),
            endpoints: model::pod_ipv4(&pod).map(|ip| endpoint(&pod, ip)).into_iter().collect(),
            ports: info
                .ports
                .iter()
                .map(|p| EndpointPortInfo {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: p.protocol,
                })
                .collect(),
        });
        cluster.apply(Object::Service(info.to_service()));
    }
    // The EndpointSlice controller: Services with a selector and an address (or headless).
    let selected: Vec<ServiceInfo> = cluster
        .services()
        .filter(|s| s.selector.is_some() && s.cluster_ip != ClusterIp::Unallocated)
        .cloned()
        .collect();
    for svc in &selected {
        if let Some(selector) = &svc.selector {
            slices.extend(controller_slices(cluster, svc, selector));
        }
    }
    // Replace what the lab wrote last time; the user's slices stay.
    for key in std::mem::take(&mut state.managed_slices) {
        if let Some((ns, name)) = key.split_once('/') {
            cluster.delete(&model::ObjectRef {
                kind: model::Kind::EndpointSlice,
                namespace: Some(ns.to_string()),
                name: name.to_string(),
            });
        }
    }
    for slice in slices {
        state.managed_slices.push(format!("{}/{}", slice.namespace, slice.name));
        cluster.apply(Object::EndpointSlice(slice.to_endpoint_slice()));
    }
    state.managed_slices.sort();
    Ok(())
}

/// One port of a Service in `lab services -o json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRow {
    /// The port's name (`""` for a single unnamed port).
    pub name: String,
    /// The port on the ClusterIP.
    pub port: u16,
    /// A number, or a container port name resolved per pod.
    pub target_port: serde_json::Value,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: Protocol,
}

/// One endpoint of one Service port in `lab services -o json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRow {
    /// `namespace/pod` behind it, when the slice names one.
    pub pod: Option<String>,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The port on it (the targetPort, resolved for this pod).
    pub port: u16,
    /// The protocol of the Service port.
    pub protocol: Protocol,
    /// The name of the Service port it serves.
    pub port_name: String,
    /// May take new connections.
    pub ready: bool,
}

/// One Service in `lab services -o json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRow {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `a.b.c.d`, `None` for a headless Service, null without one.
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// `spec.selector`; null for a Service whose slices are written by hand (or by the lab).
    pub selector: Option<BTreeMap<String, String>>,
    /// `ClientIP` or `None`.
    pub session_affinity: &'static str,
    /// The pod (`namespace/name`) whose own Service this is; null for the others.
    pub for_pod: Option<String>,
    /// Its ports.
    pub ports: Vec<PortRow>,
    /// Every endpoint of every port, port by port, in address order.
    pub backends: Vec<BackendRow>,
}

/// Every Service of the model with its backends, by namespace then name.
pub fn rows(cluster: &Cluster) -> Vec<ServiceRow> {
    let pod_of: BTreeMap<(String, String), String> = cluster
        .pods()
        .keys()
        .map(|(ns, name)| ((ns.clone(), pod_service_name(name)), format!("{ns}/{name}")))
        .collect();
    cluster
        .services()
        .map(|svc| {
            let slices: Vec<&EndpointSliceInfo> = cluster.endpoint_slices_of(&svc.namespace, &svc.name).collect();
            let mut backends = Vec::new();
            for port in &svc.ports {
                let mut seen: BTreeMap<(Ipv4Addr, u16), BackendRow> = BTreeMap::new();
                for slice in &slices {
                    let Some(sp) = slice.ports.iter().find(|p| p.name == port.name && p.protocol == port.protocol) else {
                        continue;
                    };
                    for e in &slice.endpoints {
                        seen.entry((e.address, sp.port)).or_insert_with(|| BackendRow {
                            pod: e.pod.as_ref().map(ToString::to_string),
                            ip: e.address,
                            port: sp.port,
                            protocol: port.protocol,
                            port_name: port.name.clone(),
                            ready: e.ready,
                        });
                    }
                }
                backends.extend(seen.into_values());
            }
            ServiceRow {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                cluster_ip: match svc.cluster_ip {
                    ClusterIp::Ipv4(ip) => Some(ip.to_string()),
                    ClusterIp::Headless => Some(model::HEADLESS.to_string()),
                    ClusterIp::Unallocated => None,
                },
                selector: svc.selector.clone(),
                session_affinity: match svc.session_affinity {
                    SessionAffinity::None => "None",
                    SessionAffinity::ClientIp { .. } => "ClientIP",
                },
                for_pod: pod_of.get(&(svc.namespace.clone(), svc.name.clone())).cloned(),
                ports: svc
                    .ports
                    .iter()
                    .map(|p| PortRow {
                        name: p.name.clone(),
                        port: p.port,
                        target_port: match &p.target_port {
                            TargetPort::Number(n) => serde_json::Value::from(*n),
                            TargetPort::Name(s) => serde_json::Value::from(s.clone()),
                        },
                        protocol: p.protocol,
                    })
                    .collect(),
                backends,
            }
        })
        .collect()
}

/// `lab services` as a table: one line per Service port.
pub fn table(rows: &[ServiceRow]) -> String {
    let mut out = format!("{:<40} {:<15} {:<22} {}\n", "SERVICE", "CLUSTER-IP", "PORT", "BACKENDS");
    for r in rows {
        let name = format!("{}/{}", r.namespace, r.name);
        let ip = r.cluster_ip.as_deref().unwrap_or("<none>");
        if r.ports.is_empty() {
            out.push_str(&format!("{name:<40} {ip:<15} {:<22} -\n", "-"));
        }
        for p in &r.ports {
            let target = match &p.target_port {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let port = format!("{}/{}->{target}", p.port, p.protocol);
            let backends: Vec<String> = r
                .backends
                .iter()
                .filter(|b| b.port_name == p.name && b.protocol == p.protocol)
                .map(|b| {
                    let who = b.pod.clone().unwrap_or_else(|| b.ip.to_string());
                    let ready = if b.ready { "" } else { " (not ready)" };
                    format!("{who}={}:{}{ready}", b.ip, b.port)
                })
                .collect();
            let backends = if backends.is_empty() {
                "-".to_string()
            } else {
                backends.join(", ")
            };
            out.push_str(&format!("{name:<40} {ip:<15} {port:<22} {backends}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_documents;

    fn objects(yaml: &str) -> Vec<Object> {
        parse_documents(yaml, "test.yaml").expect("parses")
    }

    fn cidr() -> Ipv4Network {
        "10.96.0.0/16".parse().expect("cidr")
    }

    fn state() -> LabState {
        LabState {
            cluster_cidr: "10.244.0.0/16".into(),
            service_cidr: Some("10.96.0.0/16".into()),
            ..LabState::default()
        }
    }

    fn svc(name: &str, extra: &str) -> String {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: x}}\nspec: {{ports: [{{port: 80}}]{extra}}}\n")
    }

    fn pod(name: &str, labels: &str, ip: Option<&str>, ports: &str) -> String {
        let status = ip.map(|ip| format!("status: {{podIP: {ip}}}\n")).unwrap_or_default();
        format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{{labels}}}}}\nspec:\n  nodeName: node0\n  containers:\n  - name: c\n    ports: [{ports}]\n{status}")
    }

    /// Admits `yaml` into `cluster` as `lab apply` does.
    fn apply(cluster: &mut Cluster, yaml: &str) -> Result<(), LabError> {
        let mut objs = objects(yaml);
        admit(cluster, &mut objs, cidr())?;
        for o in objs {
            cluster.apply(o);
        }
        Ok(())
    }

    fn ip_of(cluster: &Cluster, name: &str) -> ClusterIp {
        cluster.service("x", name).expect("service").cluster_ip
    }

    #[test]
    fn service_cidr_avoids_the_cluster_underlay_and_host_routes() {
        let r = |s: &str| s.parse::<Ipv4Network>().expect("cidr");
        let avoid = [r("10.244.0.0/16"), r("10.255.0.0/24")];
        assert_eq!(pick_service_cidr(&avoid, &[]).expect("free"), r("10.96.0.0/16"));
        assert_eq!(pick_service_cidr(&avoid, &[r("10.96.5.0/24")]).expect("free"), r("10.97.0.0/16"));
        assert_eq!(pick_service_cidr(&[r("10.96.0.0/15")], &[]).expect("free"), r("10.98.0.0/16"));
        assert!(pick_service_cidr(&avoid, &[r("10.0.0.0/8")]).is_err());
        let mut s = LabState {
            cluster_cidr: "10.96.0.0/16".into(),
            ..LabState::default()
        };
        assert_eq!(service_cidr(&mut s).expect("picked"), r("10.97.0.0/16"), "an older lab gets one");
        assert_eq!(s.service_cidr.as_deref(), Some("10.97.0.0/16"), "and keeps it");
    }

    #[test]
    fn cluster_ips_are_allocated_kept_named_and_freed() {
        let mut c = Cluster::default();
        apply(&mut c, &(svc("a", "") + &svc("b", "") + &svc("dns", ", clusterIP: 10.96.0.10"))).expect("admitted");
        // Dynamic addresses come from the upper band (the lower 256 are for named ones).
        assert_eq!(ip_of(&c, "a"), ClusterIp::Ipv4(Ipv4Addr::new(10, 96, 1, 0)));
        assert_eq!(ip_of(&c, "b"), ClusterIp::Ipv4(Ipv4Addr::new(10, 96, 1, 1)));
        assert_eq!(ip_of(&c, "dns"), ClusterIp::Ipv4(Ipv4Addr::new(10, 96, 0, 10)));
        // Re-applied without an address, or with the same one: kept.
        apply(&mut c, &(svc("a", "") + &svc("dns", ", clusterIP: 10.96.0.10"))).expect("re-applied");
        assert_eq!(ip_of(&c, "a"), ClusterIp::Ipv4(Ipv4Addr::new(10, 96, 1, 0)));
        // Headless: none, and it stays so.
        apply(&mut c, &svc("h", ", clusterIP: None")).expect("headless");
        assert_eq!(ip_of(&c, "h"), ClusterIp::Headless);
        apply(&mut c, &svc("h", "")).expect("headless re-applied");
        assert_eq!(ip_of(&c, "h"), ClusterIp::Headless);
        // Deleting frees the address for the next Service.
        c.delete(&model::ObjectRef {
            kind: model::Kind::Service,
            namespace: Some("x".into()),
            name: "a".into(),
        });
        apply(&mut c, &svc("c", "")).expect("admitted");
        assert_eq!(ip_of(&c, "c"), ClusterIp::Ipv4(Ipv4Addr::new(10, 96, 1, 0)));
    }

    #[test]
    fn cluster_ip_errors_change_nothing_and_say_why() {
        let mut c = Cluster::default();
        apply(&mut c, &(svc("dns", ", clusterIP: 10.96.0.10") + &svc("h", ", clusterIP: None"))).expect("admitted");
        let before = c.clone();
        let cases = [
            (svc("e", ", clusterIP: 10.96.0.10"), "Service x/e: spec.clusterIP: 10.96.0.10 is already allocated to Service x/dns"),
            (svc("e", ", clusterIP: 10.1.2.3"), "10.1.2.3 is not a usable address of the lab's service CIDR 10.96.0.0/16"),
            (svc("e", ", clusterIP: 10.96.0.0"), "10.96.0.0 is not a usable address"),
            (svc("e", ", clusterIP: 10.96.255.255"), "10.96.255.255 is not a usable address"),
            (svc("dns", ", clusterIP: 10.96.0.11"), "spec.clusterIP: field is immutable (it is 10.96.0.10, not 10.96.0.11)"),
            (svc("dns", ", clusterIP: None"), "field is immutable (it is 10.96.0.10, not None)"),
            (svc("h", ", clusterIP: 10.96.0.12"), "field is immutable (it is None, not 10.96.0.12)"),
            (svc("bh-pod-a", ""), "Service x/bh-pod-a: names starting with \"bh-pod-\" belong to the lab's pod Services"),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, namespace: x, labels: {kubernetes.io/service-name: bh-pod-a}}\naddressType: IPv4\n".into(),
                "EndpointSlice x/s: names starting with",
            ),
            // Two in one apply: the second clashes with the first; neither is admitted.
            (svc("p", ", clusterIP: 10.96.0.20") + &svc("q", ", clusterIP: 10.96.0.20"), "10.96.0.20 is already allocated to Service x/p"),
        ];
        for (yaml, want) in cases {
            let mut c2 = c.clone();
            let err = apply(&mut c2, &yaml).expect_err(want).to_string();
            assert!(err.contains(want), "got {err:?}, want {want:?}");
            assert_eq!(c2, before, "{want}: changed the cluster");
        }
        assert!(check_delete(&objects(&svc("bh-pod-a", ""))).is_err());
        assert!(check_delete(&objects(&svc("a", ""))).is_ok());
    }

    #[test]
    fn pod_service_names_are_dns_labels() {
        assert_eq!(pod_service_name("web"), "bh-pod-web");
        let long = pod_service_name(&"p".repeat(80));
        assert!(long.len() <= 63 && long.starts_with("bh-pod-ppp"), "{long}");
        let dotted = pod_service_name("web.v1");
        assert!(
            dotted.starts_with("bh-pod-web-v1-") && dotted.len() == "bh-pod-web-v1-".len() + 8,
            "{dotted}"
        );
        assert_ne!(pod_service_name("a.b"), pod_service_name("a-b"));
        assert_ne!(pod_service_name("Web"), pod_service_name("web"));
    }

    #[test]
    fn every_pod_gets_its_own_service_and_relabelling_does_not_move_it() {
        let mut c = Cluster::default();
        let mut s = state();
        apply(
            &mut c,
            &(pod(
                "a",
                "app: web",
                Some("10.244.0.5"),
                "{containerPort: 80}, {containerPort: 53, protocol: UDP}, {containerPort: 9, protocol: SCTP}",
            ) + &pod("b", "app: web", None, "")),
        )
        .expect("admitted");
        reconcile(&mut c, &mut s).expect("reconciled");
        let a = c.service("x", "bh-pod-a").expect("a's service").clone();
        assert_eq!(a.selector, None);
        assert_eq!(
            a.ports.iter().map(|p| (p.name.as_str(), p.port, p.protocol)).collect::<Vec<_>>(),
            [("tcp-80", 80, Protocol::TCP), ("udp-53", 53, Protocol::UDP)],
            "declared TCP and UDP ports; SCTP is not served"
        );
        let slice = c.endpoint_slices_of("x", "bh-pod-a").next().expect("a's slice").clone();
        assert_eq!(slice.endpoints.len(), 1);
        assert_eq!(slice.endpoints[0].address, Ipv4Addr::new(10, 244, 0, 5));
        assert_eq!(slice.endpoints[0].pod, Some(NamespacedName::new("x", "a")));
        assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("node0"));
        assert!(
            c.endpoint_slices_of("x", "bh-pod-b")
                .next()
                .expect("b's slice")
                .endpoints
                .is_empty(),
            "no address yet"
        );
        // Relabelled and given its address: same Service, same VIP, same pod.
        apply(
            &mut c,
            &(pod("a", "app: db", Some("10.244.0.5"), "{containerPort: 80}") + &pod("b", "app: web", Some("10.244.0.6"), "")),
        )
        .expect("admitted");
        reconcile(&mut c, &mut s).expect("reconciled");
        let a2 = c.service("x", "bh-pod-a").expect("a's service");
        assert_eq!(a2.cluster_ip, a.cluster_ip, "the VIP stays");
        assert_eq!(a2.ports.len(), 1, "ports follow the spec");
        assert_eq!(
            c.endpoint_slices_of("x", "bh-pod-a").next().expect("slice").endpoints[0].address,
            Ipv4Addr::new(10, 244, 0, 5)
        );
        assert_eq!(c.endpoint_slices_of("x", "bh-pod-b").next().expect("slice").endpoints.len(), 1);
        // Probed ports join every pod Service; a deleted pod takes its Service and slice along.
        s.service_probe_ports.push(ExtraPort {
            port: 8080,
            protocol: Protocol::TCP,
        });
        c.delete(&model::ObjectRef {
            kind: model::Kind::Pod,
            namespace: Some("x".into()),
            name: "a".into(),
        });
        reconcile(&mut c, &mut s).expect("reconciled");
        assert!(c.service("x", "bh-pod-a").is_none());
        assert_eq!(c.endpoint_slices_of("x", "bh-pod-a").count(), 0);
        assert_eq!(s.managed_slices, ["x/bh-pod-b"]);
        assert!(c.service("x", "bh-pod-b").expect("b").ports.iter().any(|p| p.port == 8080));
    }

    #[test]
    fn the_slice_controller_selects_ready_pods_and_resolves_named_ports_per_pod() {
        let mut c = Cluster::default();
        let mut s = state();
        let web = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec:\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: http}\n  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}\n";
        apply(
            &mut c,
            &(web.to_string()
                + &pod("a", "app: web", Some("10.244.0.5"), "{name: http, containerPort: 8080}")
                + &pod("b", "app: web", Some("10.244.1.5"), "{name: http, containerPort: 9090}")
                + &pod("c", "app: web", Some("10.244.0.6"), "{name: http, containerPort: 8080}")
                + &pod("d", "app: web", Some("10.244.0.7"), "{name: other, containerPort: 8080}")
                + &pod("e", "app: web", None, "{name: http, containerPort: 8080}")
                + &pod("f", "app: db", Some("10.244.0.8"), "{name: http, containerPort: 8080}")),
        )
        .expect("admitted");
        // A pod of the same labels in another namespace is not selected.
        apply(
            &mut c,
            "apiVersion: v1\nkind: Pod\nmetadata: {name: g, namespace: y, labels: {app: web}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.244.0.9}\n",
        )
        .expect("admitted");
        reconcile(&mut c, &mut s).expect("reconciled");
        let rows = rows(&c);
        let row = rows.iter().find(|r| r.name == "web").expect("web listed");
        let got: Vec<(Option<&str>, u16, &str)> = row
            .backends
            .iter()
            .map(|b| (b.pod.as_deref(), b.port, b.port_name.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (Some("x/a"), 8080, "http"),
                (Some("x/c"), 8080, "http"),
                (Some("x/b"), 9090, "http"),
                (Some("x/a"), 5353, "dns"),
                (Some("x/c"), 5353, "dns"),
                (Some("x/d"), 5353, "dns"),
                (Some("x/b"), 5353, "dns"),
            ],
            "d lacks the named port; e has no address; f is not selected"
        );
        let web_slices: Vec<&EndpointSliceInfo> = c.endpoint_slices_of("x", "web").collect();
        assert_eq!(web_slices.len(), 3, "one slice per port resolution: {web_slices:?}");
        // The table the agent builds from them agrees.
        let table = crate::services::ServiceTable::from_cluster(&c);
        let vip = match ip_of(&c, "web") {
            ClusterIp::Ipv4(ip) => ip,
            other => panic!("web has {other:?}"),
        };
        let http = table
            .get(&crate::services::ServiceKey {
                vip,
                port: 80,
                protocol: Protocol::TCP,
            })
            .expect("web:80");
        let mut backends: Vec<(Ipv4Addr, u16)> = http.selected().iter().map(|b| (b.ip, b.port)).collect();
        backends.sort();
        assert_eq!(
            backends,
            [
                (Ipv4Addr::new(10, 244, 0, 5), 8080),
                (Ipv4Addr::new(10, 244, 0, 6), 8080),
                (Ipv4Addr::new(10, 244, 1, 5), 9090)
            ]
        );
        // A relabelled pod leaves; a deleted Service takes its slices; the user's slices stay.
        apply(
            &mut c,
            &(pod("c", "app: db", Some("10.244.0.6"), "{name: http, containerPort: 8080}")
                + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: manual-1, namespace: x, labels: {kubernetes.io/service-name: manual}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\nports: [{port: 80}]\n"
                + "---\napiVersion: v1\nkind: Service\nmetadata: {name: manual, namespace: x}\nspec: {ports: [{port: 80}]}\n"),
        )
        .expect("admitted");
        reconcile(&mut c, &mut s).expect("reconciled");
        let rows2 = super::rows(&c);
        let web2 = rows2.iter().find(|r| r.name == "web").expect("web");
        assert!(web2.backends.iter().all(|b| b.pod.as_deref() != Some("x/c")), "c left: {web2:?}");
        c.delete(&model::ObjectRef {
            kind: model::Kind::Service,
            namespace: Some("x".into()),
            name: "web".into(),
        });
        reconcile(&mut c, &mut s).expect("reconciled");
        assert_eq!(c.endpoint_slices_of("x", "web").count(), 0);
        assert_eq!(c.endpoint_slices_of("x", "manual").count(), 1, "the user's slice stays");
        let manual = super::rows(&c).into_iter().find(|r| r.name == "manual").expect("manual");
        assert_eq!(manual.backends.len(), 1);
        assert_eq!(manual.for_pod, None);
    }

    #[test]
    fn rows_json_shape() {
        let mut c = Cluster::default();
        let mut s = state();
        apply(
            &mut c,
            &(svc("dns", ", clusterIP: 10.96.0.10, selector: {app: a}, sessionAffinity: ClientIP")
                + &pod("a", "app: a", Some("10.244.0.5"), "{containerPort: 80}")),
        )
        .expect("admitted");
        reconcile(&mut c, &mut s).expect("reconciled");
        let json = serde_json::to_value(rows(&c)).expect("json");
        assert_eq!(
            json[0],
            serde_json::json!({
                "namespace": "x", "name": "bh-pod-a", "clusterIP": "10.96.1.0", "selector": null,
                "sessionAffinity": "None", "forPod": "x/a",
                "ports": [{"name": "tcp-80", "port": 80, "targetPort": 80, "protocol": "TCP"}],
                "backends": [{"pod": "x/a", "ip": "10.244.0.5", "port": 80, "protocol": "TCP", "portName": "tcp-80", "ready": true}]
            })
        );
        assert_eq!(json[1]["name"], "dns");
        assert_eq!(json[1]["clusterIP"], "10.96.0.10");
        assert_eq!(json[1]["selector"], serde_json::json!({"app": "a"}));
        assert_eq!(json[1]["sessionAffinity"], "ClientIP");
        assert_eq!(json[1]["backends"][0]["pod"], "x/a");
        let t = table(&rows(&c));
        assert!(
            t.contains("x/dns") && t.contains("10.96.0.10") && t.contains("80/TCP->80") && t.contains("x/a=10.244.0.5:80"),
            "{t}"
        );
    }
}
