//! Services and EndpointSlices reduced to what the service table reads ([`ServiceInfo`],
//! [`EndpointSliceInfo`]), and their validation for manifests.
//!
//! The slim views follow the API's documented defaults, so both sources agree: a port's
//! protocol defaults to TCP and its targetPort to its port; an endpoint's `ready` and
//! `serving` conditions default to true and `terminating` to false
//! (<https://kubernetes.io/docs/reference/kubernetes-api/service-resources/endpoint-slice-v1/>).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use bulkhead_api::{NamespacedName, Protocol};
use k8s_openapi::api::core::v1::{ClientIPConfig, ObjectReference, Service, ServicePort, ServiceSpec, SessionAffinityConfig};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::selector::{self, FieldError};
use super::DEFAULT_NAMESPACE;

/// Label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// `spec.clusterIP` of a headless Service.
pub const HEADLESS: &str = "None";
/// The only EndpointSlice `addressType` the (IPv4) datapath uses.
pub const ADDRESS_TYPE_IPV4: &str = "IPv4";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset: 3 hours, as the API server
/// defaults it.
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
/// The largest `timeoutSeconds` the API server accepts: one day.
pub const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86_400;

/// A Service's IPv4 ClusterIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClusterIp {
    /// The virtual IP the datapath translates.
    Ipv4(Ipv4Addr),
    /// `clusterIP: None`: no virtual IP; clients use the endpoints directly.
    Headless,
    /// No IPv4 ClusterIP: not allocated yet, IPv6 only, or an `ExternalName` Service.
    Unallocated,
}

/// A Service port's `targetPort`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetPort {
    /// A port number on every backend.
    Number(u16),
    /// A container port name, resolved per pod (the EndpointSlice carries the result).
    Name(String),
}

/// A Service's `spec.sessionAffinity`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SessionAffinity {
    /// Every new connection picks a backend.
    #[default]
    None,
    /// Connections from one client IP stick to one backend for `timeout_seconds` after the
    /// last one.
    ClientIp {
        /// `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800).
        timeout_seconds: u32,
    },
}

/// One entry of a Service's `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortInfo {
    /// The port's name; empty when the Service has a single unnamed port.
    pub name: String,
    /// The port on the ClusterIP.
    pub port: u16,
    /// Where on the backends it goes (default: `port`).
    pub target_port: TargetPort,
    /// TCP, UDP or SCTP (default TCP).
    pub protocol: Protocol,
}

/// What the service table needs of one `v1 Service`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceInfo {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// Its IPv4 ClusterIP, from `spec.clusterIPs` or `spec.clusterIP`.
    pub cluster_ip: ClusterIp,
    /// `spec.selector`; `None` (also for an empty one) for a Service whose EndpointSlices
    /// are written by hand or by another controller.
    pub selector: Option<BTreeMap<String, String>>,
    /// Its ports with a valid number and protocol.
    pub ports: Vec<ServicePortInfo>,
    /// `spec.sessionAffinity`.
    pub session_affinity: SessionAffinity,
}

impl ServiceInfo {
    /// The slim view of a Service (entries out of range or of an unknown protocol are left
    /// out: the API server never stores them).
    pub fn from_service(svc: &Service) -> ServiceInfo {
        let spec = svc.spec.clone().unwrap_or_default();
        let ips = spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.as_ref());
        let mut cluster_ip = ClusterIp::Unallocated;
        for ip in ips {
            if ip == HEADLESS {
                cluster_ip = ClusterIp::Headless;
                break;
            }
            if let Ok(v4) = ip.parse::<Ipv4Addr>() {
                cluster_ip = ClusterIp::Ipv4(v4);
                break;
            }
        }
        if spec.type_.as_deref() == Some("ExternalName") {
            cluster_ip = ClusterIp::Unallocated;
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let port = port_number(p.port)?;
                let target_port = match &p.target_port {
                    None => TargetPort::Number(port),
                    Some(IntOrString::Int(n)) => TargetPort::Number(port_number(*n)?),
                    Some(IntOrString::String(s)) => match s.parse::<i32>() {
                        Ok(n) => TargetPort::Number(port_number(n)?),
                        Err(_) => TargetPort::Name(s.clone()),
                    },
                };
                Some(ServicePortInfo {
                    name: p.name.clone().unwrap_or_default(),
                    port,
                    target_port,
                    protocol: parse_protocol(p.protocol.as_deref()).ok()?,
                })
            })
            .collect();
        let session_affinity = match spec.session_affinity.as_deref() {
            Some("ClientIP") => SessionAffinity::ClientIp {
                timeout_seconds: spec
                    .session_affinity_config
                    .and_then(|c| c.client_ip)
                    .and_then(|c| c.timeout_seconds)
                    .and_then(|t| u32::try_from(t).ok())
                    .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(t))
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS),
            },
            _ => SessionAffinity::None,
        };
        ServiceInfo {
            namespace: svc.metadata.namespace.clone().unwrap_or_else(|| DEFAULT_NAMESPACE.to_string()),
            name: svc.metadata.name.clone().unwrap_or_default(),
            cluster_ip,
            selector: spec.selector.filter(|s| !s.is_empty()),
            ports,
            session_affinity,
        }
    }

    /// `namespace/name`.
    pub fn namespaced_name(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.name)
    }

    /// The smallest Service object carrying this view (what [`super::Cluster::objects`]
    /// returns).
    pub fn to_service(&self) -> Service {
        let (session_affinity, session_affinity_config) = match self.session_affinity {
            SessionAffinity::None => (None, None),
            SessionAffinity::ClientIp { timeout_seconds } => (
                Some("ClientIP".to_string()),
                Some(SessionAffinityConfig {
                    client_ip: Some(ClientIPConfig {
                        timeout_seconds: i32::try_from(timeout_seconds).ok(),
                    }),
                }),
            ),
        };
        Service {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: match self.cluster_ip {
                    ClusterIp::Ipv4(ip) => Some(ip.to_string()),
                    ClusterIp::Headless => Some(HEADLESS.to_string()),
                    ClusterIp::Unallocated => None,
                },
                selector: self.selector.clone(),
                ports: (!self.ports.is_empty()).then(|| {
                    self.ports
                        .iter()
                        .map(|p| ServicePort {
                            name: (!p.name.is_empty()).then(|| p.name.clone()),
                            port: i32::from(p.port),
                            target_port: Some(match &p.target_port {
                                TargetPort::Number(n) => IntOrString::Int(i32::from(*n)),
                                TargetPort::Name(s) => IntOrString::String(s.clone()),
                            }),
                            protocol: Some(p.protocol.to_string()),
                            ..ServicePort::default()
                        })
                        .collect()
                }),
                session_affinity,
                session_affinity_config,
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointInfo {
    /// Its address: the first of `addresses` (kube-proxy ignores the others).
    pub address: Ipv4Addr,
    /// `conditions.ready` (default true): may receive new connections.
    pub ready: bool,
    /// `conditions.serving` (default true): answers, even while terminating.
    pub serving: bool,
    /// `conditions.terminating` (default false).
    pub terminating: bool,
    /// `nodeName`: where it runs.
    pub node_name: Option<String>,
    /// `targetRef` when it names a Pod.
    pub pod: Option<NamespacedName>,
}

/// One entry of an EndpointSlice's `ports`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointPortInfo {
    /// The Service port's name it serves (empty for an unnamed one).
    pub name: String,
    /// The port number on this slice's endpoints (a named targetPort, resolved).
    pub port: u16,
    /// TCP, UDP or SCTP (default TCP).
    pub protocol: Protocol,
}

/// What the service table needs of one `discovery.k8s.io/v1 EndpointSlice` of address type
/// IPv4.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointSliceInfo {
    /// The slice's namespace (its Service's).
    pub namespace: String,
    /// The slice's name.
    pub name: String,
    /// Its [`SERVICE_NAME_LABEL`]: the Service it belongs to.
    pub service: Option<String>,
    /// Its endpoints with an IPv4 first address.
    pub endpoints: Vec<EndpointInfo>,
    /// Its ports with a number (a port without one serves nothing the datapath can
    /// translate to).
    pub ports: Vec<EndpointPortInfo>,
}

impl EndpointSliceInfo {
    /// The slim view of an EndpointSlice; `None` unless its address type is IPv4.
    pub fn from_slice(slice: &EndpointSlice) -> Option<EndpointSliceInfo> {
        if slice.address_type != ADDRESS_TYPE_IPV4 {
            return None;
        }
        let namespace = slice.metadata.namespace.clone().unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .filter_map(|e| {
                let address = e.addresses.first()?.parse().ok()?;
                let conditions = e.conditions.clone().unwrap_or_default();
                let pod = e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref().is_none_or(|k| k == "Pod"))
                    .and_then(|r| {
                        let name = r.name.clone()?;
                        Some(NamespacedName::new(r.namespace.clone().unwrap_or_else(|| namespace.clone()), name))
                    });
                Some(EndpointInfo {
                    address,
                    ready: conditions.ready.unwrap_or(true),
                    serving: conditions.serving.unwrap_or(true),
                    terminating: conditions.terminating.unwrap_or(false),
                    node_name: e.node_name.clone(),
                    pod,
                })
            })
            .collect();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(EndpointPortInfo {
                    name: p.name.clone().unwrap_or_default(),
                    port: port_number(p.port?)?,
                    protocol: parse_protocol(p.protocol.as_deref()).ok()?,
                })
            })
            .collect();
        Some(EndpointSliceInfo {
            service: slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).cloned(),
            name: slice.metadata.name.clone().unwrap_or_default(),
            namespace,
            endpoints,
            ports,
        })
    }

    /// The smallest EndpointSlice object carrying this view.
    pub fn to_endpoint_slice(&self) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: self
                    .service
                    .as_ref()
                    .map(|s| BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), s.clone())])),
                ..ObjectMeta::default()
            },
            address_type: ADDRESS_TYPE_IPV4.to_string(),
            endpoints: Some(
                self.endpoints
                    .iter()
                    .map(|e| Endpoint {
                        addresses: vec![e.address.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: Some(e.ready),
                            serving: Some(e.serving),
                            terminating: Some(e.terminating),
                        }),
                        node_name: e.node_name.clone(),
                        target_ref: e.pod.as_ref().map(|p| ObjectReference {
                            kind: Some("Pod".to_string()),
                            namespace: Some(p.namespace.clone()),
                            name: Some(p.name.clone()),
                            ..ObjectReference::default()
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
            ports: (!self.ports.is_empty()).then(|| {
                self.ports
                    .iter()
                    .map(|p| EndpointPort {
                        name: Some(p.name.clone()),
                        port: Some(i32::from(p.port)),
                        protocol: Some(p.protocol.to_string()),
                        ..EndpointPort::default()
                    })
                    .collect()
            }),
        }
    }
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// A Service or EndpointSlice protocol: TCP (the default), UDP or SCTP.
fn parse_protocol(text: Option<&str>) -> Result<Protocol, String> {
    match text.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::TCP),
        "UDP" => Ok(Protocol::UDP),
        "SCTP" => Ok(Protocol::SCTP),
        other => Err(format!("unsupported value {other:?} (expected TCP, UDP or SCTP)")),
    }
}

fn check_port(field: String, n: i32) -> Result<u16, FieldError> {
    port_number(n).ok_or_else(|| FieldError::new(field, format!("{n} must be between 1 and 65535")))
}

/// A DNS label (RFC 1123): 1-63 lowercase alphanumerics or `-`, starting and ending with an
/// alphanumeric; what Service and EndpointSlice port names are.
fn check_dns_label(field: String, name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(field, format!("{name:?} is not a valid port name (a DNS label)")))
    }
}

/// Checks the fields of a Service the model reads, as the API server does; the error names
/// the field.
pub fn validate_service(svc: &Service) -> Result<(), FieldError> {
    let Some(spec) = &svc.spec else {
        return Ok(());
    };
    if let Some(t) = &spec.type_ {
        if !matches!(t.as_str(), "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName") {
            return Err(FieldError::new(
                "spec.type",
                format!("unsupported value {t:?} (expected ClusterIP, NodePort, LoadBalancer or ExternalName)"),
            ));
        }
    }
    let ip_or_none = |field: String, ip: &str| {
        if ip.is_empty() || ip == HEADLESS || ip.parse::<IpAddr>().is_ok() {
            Ok(())
        } else {
            Err(FieldError::new(field, format!("{ip:?} is not an IPv4 address or None")))
        }
    };
    if let Some(ip) = &spec.cluster_ip {
        ip_or_none("spec.clusterIP".into(), ip)?;
    }
    for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        ip_or_none(format!("spec.clusterIPs[{i}]"), ip)?;
    }
    if let (Some(single), Some(first)) = (&spec.cluster_ip, spec.cluster_ips.as_ref().and_then(|l| l.first())) {
        if single != first {
            return Err(FieldError::new(
                "spec.clusterIPs[0]",
                format!("{first:?} must equal spec.clusterIP {single:?}"),
            ));
        }
    }
    if let Some(sel) = &spec.selector {
        selector::validate_labels(sel, "spec.selector")?;
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        match p.name.as_deref().unwrap_or_default() {
            "" if ports.len() > 1 => {
                return Err(FieldError::new(
                    format!("{at}.name"),
                    "required when a Service has more than one port",
                ))
            }
            "" => {}
            name => {
                check_dns_label(format!("{at}.name"), name)?;
                if !names.insert(name) {
                    return Err(FieldError::new(format!("{at}.name"), format!("duplicate value {name:?}")));
                }
            }
        }
        let port = check_port(format!("{at}.port"), p.port)?;
        let protocol = parse_protocol(p.protocol.as_deref()).map_err(|m| FieldError::new(format!("{at}.protocol"), m))?;
        if !numbers.insert((port, protocol)) {
            return Err(FieldError::new(at, format!("duplicate port {port}/{protocol}")));
        }
        match &p.target_port {
            None => {}
            Some(IntOrString::Int(n)) => {
                check_port(format!("{at}.targetPort"), *n)?;
            }
            Some(IntOrString::String(name)) => {
                super::parse::validate_port_name(name).map_err(|m| FieldError::new(format!("{at}.targetPort"), m))?;
            }
        }
    }
    match spec.session_affinity.as_deref() {
        None | Some("None") => {}
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            if let Some(t) = timeout {
                if !(1..=i64::from(MAX_AFFINITY_TIMEOUT_SECONDS)).contains(&i64::from(t)) {
                    return Err(FieldError::new(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} must be between 1 and {MAX_AFFINITY_TIMEOUT_SECONDS}"),
                    ));
                }
            }
        }
        Some(other) => {
            return Err(FieldError::new(
                "spec.sessionAffinity",
                format!("unsupported value {other:?} (expected None or ClientIP)"),
            ));
        }
    }
    Ok(())
}

/// Checks the fields of an EndpointSlice the model reads, as the API server does; the error
/// names the field.
pub fn validate_endpoint_slice(slice: &EndpointSlice) -> Result<(), FieldError> {
    let ipv4 = match slice.address_type.as_str() {
        ADDRESS_TYPE_IPV4 => true,
        "IPv6" | "FQDN" => false,
        "" => return Err(FieldError::new("addressType", "required")),
        other => {
            return Err(FieldError::new(
                "addressType",
                format!("unsupported value {other:?} (expected IPv4, IPv6 or FQDN)"),
            ));
        }
    };
    for (i, e) in slice.endpoints.iter().flatten().enumerate() {
        if e.addresses.is_empty() || e.addresses.len() > 100 {
            return Err(FieldError::new(
                format!("endpoints[{i}].addresses"),
                "must have between 1 and 100 addresses",
            ));
        }
        for (j, a) in e.addresses.iter().enumerate() {
            if ipv4 && a.parse::<Ipv4Addr>().is_err() {
                return Err(FieldError::new(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{a:?} is not an IPv4 address"),
                ));
            }
        }
    }
    let mut names = BTreeSet::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let at = format!("ports[{i}]");
        let name = p.name.as_deref().unwrap_or_default();
        if !name.is_empty() {
            check_dns_label(format!("{at}.name"), name)?;
        }
        if !names.insert(name) {
            return Err(FieldError::new(format!("{at}.name"), format!("duplicate value {name:?}")));
        }
        if let Some(n) = p.port {
            check_port(format!("{at}.port"), n)?;
        }
        parse_protocol(p.protocol.as_deref()).map_err(|m| FieldError::new(format!("{at}.protocol"), m))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{parse_documents, Cluster, Kind, Object, ObjectRef};
    use super::*;

    const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x, resourceVersion: "7"}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00::20"]
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
  - {name: sctp, port: 9, protocol: SCTP}
status: {loadBalancer: {}}
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: None, selector: {}, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: v6, namespace: x}
spec: {clusterIP: "fd00::1", ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: x}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: x, labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}, {name: none}]
endpoints:
- addresses: [10.244.1.2]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-a
  targetRef: {kind: Pod, namespace: x, name: web-0, uid: "1234"}
- addresses: [10.244.1.3]
  conditions: {ready: false, serving: true, terminating: true}
  targetRef: {kind: Pod, name: web-1}
- addresses: [10.244.1.4]
  targetRef: {kind: Node, name: node-a}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
endpoints: [{addresses: ["fd00::2"]}]
"#;

    fn tcp(name: &str, port: u16, target_port: TargetPort) -> ServicePortInfo {
        ServicePortInfo {
            name: name.into(),
            port,
            target_port,
            protocol: Protocol::TCP,
        }
    }

    #[test]
    fn services_and_slices_parse_into_their_slim_views() {
        let objects = parse_documents(SERVICES, "svc.yaml").expect("parses");
        let refs: Vec<String> = objects.iter().map(|o| o.to_ref().to_string()).collect();
        assert_eq!(
            refs,
            [
                "Service x/web",
                "Service default/db",
                "Service x/v6",
                "Service x/ext",
                "EndpointSlice x/web-abc",
                "EndpointSlice x/web-v6"
            ]
        );
        let c = Cluster::from_objects(objects);
        assert_eq!(
            c.namespaces().keys().collect::<Vec<_>>(),
            ["default", "x"],
            "services create their namespace"
        );
        let web = c.service("x", "web").expect("web");
        assert_eq!(
            web,
            &ServiceInfo {
                namespace: "x".into(),
                name: "web".into(),
                cluster_ip: ClusterIp::Ipv4(Ipv4Addr::new(10, 96, 0, 20)),
                selector: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
                ports: vec![
                    tcp("http", 80, TargetPort::Name("web".into())),
                    ServicePortInfo {
                        name: "dns".into(),
                        port: 53,
                        target_port: TargetPort::Number(5353),
                        protocol: Protocol::UDP
                    },
                    ServicePortInfo {
                        name: "sctp".into(),
                        port: 9,
                        target_port: TargetPort::Number(9),
                        protocol: Protocol::SCTP
                    },
                ],
                session_affinity: SessionAffinity::ClientIp { timeout_seconds: 60 },
            }
        );
        let db = c.service("default", "db").expect("db");
        assert_eq!(
            (db.cluster_ip, &db.selector),
            (ClusterIp::Headless, &None),
            "an empty selector is none"
        );
        assert_eq!(db.ports, [tcp("", 5432, TargetPort::Number(5432))]);
        assert_eq!(db.session_affinity, SessionAffinity::None);
        assert_eq!(c.service("x", "v6").map(|s| s.cluster_ip), Some(ClusterIp::Unallocated));
        assert_eq!(c.service("x", "ext").map(|s| s.cluster_ip), Some(ClusterIp::Unallocated));

        // The IPv6 slice is left out; the IPv4 one keeps its first address per endpoint,
        // its conditions (defaults: ready, serving, not terminating), node and pod.
        let slices: Vec<&EndpointSliceInfo> = c.endpoint_slices().collect();
        assert_eq!(slices.len(), 1);
        assert_eq!(c.endpoint_slices_of("x", "web").count(), 1);
        assert_eq!(c.endpoint_slices_of("x", "db").count(), 0);
        assert_eq!(c.endpoint_slices_of("default", "web").count(), 0);
        let s = slices[0];
        assert_eq!(s.service.as_deref(), Some("web"));
        assert_eq!(
            s.ports,
            [
                EndpointPortInfo {
                    name: "http".into(),
                    port: 8080,
                    protocol: Protocol::TCP
                },
                EndpointPortInfo {
                    name: "dns".into(),
                    port: 5353,
                    protocol: Protocol::UDP
                },
            ],
            "a port without a number is left out"
        );
        let e = |ip: [u8; 4], (ready, serving, terminating), node: Option<&str>, pod: Option<&str>| EndpointInfo {
            address: ip.into(),
            ready,
            serving,
            terminating,
            node_name: node.map(str::to_string),
            pod: pod.map(|p| NamespacedName::new("x", p)),
        };
        assert_eq!(
            s.endpoints,
            [
                e([10, 244, 1, 2], (true, true, false), Some("node-a"), Some("web-0")),
                e([10, 244, 1, 3], (false, true, true), None, Some("web-1")),
                e([10, 244, 1, 4], (true, true, false), None, None),
            ]
        );
    }

    #[test]
    fn services_and_slices_round_trip_and_go_with_their_namespace() {
        let mut c = Cluster::from_objects(parse_documents(SERVICES, "svc.yaml").expect("parses"));
        let back = Cluster::from_objects(parse_documents(&c.to_yaml(), "dump.yaml").expect("round trip parses"));
        assert_eq!(back, c);
        let svc = |kind, ns: &str, name: &str| ObjectRef {
            kind,
            namespace: Some(ns.into()),
            name: name.into(),
        };
        assert!(c.delete(&svc(Kind::Service, "default", "db")));
        assert!(!c.delete(&svc(Kind::Service, "default", "db")));
        assert!(c.delete(&svc(Kind::EndpointSlice, "x", "web-abc")));
        assert_eq!(c.endpoint_slices().count(), 0);
        c.apply(Object::EndpointSlice(
            back.endpoint_slices().next().expect("a slice").to_endpoint_slice(),
        ));
        assert!(c.delete_namespace("x"));
        assert_eq!((c.services().count(), c.endpoint_slices().count()), (0, 0));
    }

    #[test]
    fn service_and_slice_errors_name_the_field() {
        let svc = |spec: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: x}}\nspec: {spec}\n");
        let slice =
            |body: &str| format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s-1, namespace: x}}\n{body}\n");
        let cases: Vec<(String, &str)> = vec![
            (
                svc("{clusterIP: x}"),
                "demo.yaml: document 1: Service x/s: spec.clusterIP: \"x\" is not an IPv4 address or None",
            ),
            (
                svc("{clusterIPs: [10.96.0.1, y]}"),
                "Service x/s: spec.clusterIPs[1]: \"y\" is not an IPv4 address or None",
            ),
            (
                svc("{clusterIP: 10.96.0.1, clusterIPs: [10.96.0.2]}"),
                "spec.clusterIPs[0]: \"10.96.0.2\" must equal spec.clusterIP \"10.96.0.1\"",
            ),
            (svc("{type: Weird}"), "spec.type: unsupported value \"Weird\""),
            (svc("{selector: {\"a b\": c}}"), "spec.selector: key \"a b\""),
            (svc("{ports: [{port: 0}]}"), "spec.ports[0].port: 0 must be between 1 and 65535"),
            (
                svc("{ports: [{port: 80, protocol: ICMP}]}"),
                "spec.ports[0].protocol: unsupported value \"ICMP\" (expected TCP, UDP or SCTP)",
            ),
            (
                svc("{ports: [{name: a, port: 80}, {port: 81}]}"),
                "spec.ports[1].name: required when a Service has more than one port",
            ),
            (
                svc("{ports: [{name: a, port: 80}, {name: a, port: 81}]}"),
                "spec.ports[1].name: duplicate value \"a\"",
            ),
            (
                svc("{ports: [{name: a, port: 80}, {name: b, port: 80}]}"),
                "spec.ports[1]: duplicate port 80/TCP",
            ),
            (
                svc("{ports: [{name: Http, port: 80}]}"),
                "spec.ports[0].name: \"Http\" is not a valid port name",
            ),
            (
                svc("{ports: [{port: 80, targetPort: 70000}]}"),
                "spec.ports[0].targetPort: 70000 must be between 1 and 65535",
            ),
            (
                svc("{ports: [{port: 80, targetPort: Not_A_Name}]}"),
                "spec.ports[0].targetPort: \"Not_A_Name\" is neither",
            ),
            (svc("{ports: [{port: abc}]}"), "Service x/s: spec.ports[0].port: cannot decode"),
            (
                svc("{sessionAffinity: Sticky}"),
                "spec.sessionAffinity: unsupported value \"Sticky\" (expected None or ClientIP)",
            ),
            (
                svc("{sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}"),
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 must be between 1 and 86400",
            ),
            (
                slice("addressType: IPv5\nendpoints: []"),
                "EndpointSlice x/s-1: addressType: unsupported value \"IPv5\"",
            ),
            (slice("endpoints: []"), "EndpointSlice x/s-1: addressType: required"),
            (
                slice("addressType: IPv4\nendpoints: [{addresses: []}]"),
                "endpoints[0].addresses: must have between 1 and 100 addresses",
            ),
            (
                slice("addressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}, {addresses: [\"fd00::1\"]}]"),
                "endpoints[1].addresses[0]: \"fd00::1\" is not an IPv4 address",
            ),
            (
                slice("addressType: IPv4\nendpoints: []\nports: [{port: 0}]"),
                "ports[0].port: 0 must be between 1 and 65535",
            ),
            (
                slice("addressType: IPv4\nendpoints: []\nports: [{port: 1, protocol: TCPX}]"),
                "ports[0].protocol: unsupported value \"TCPX\"",
            ),
            (
                slice("addressType: IPv4\nendpoints: []\nports: [{name: a, port: 1}, {name: a, port: 2}]"),
                "ports[1].name: duplicate value \"a\"",
            ),
            (
                "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\n".into(),
                "unsupported object kind \"EndpointSlice\" apiVersion \"discovery.k8s.io/v1beta1\"",
            ),
        ];
        for (text, want) in cases {
            let err = parse_documents(&text, "demo.yaml").expect_err(want);
            let msg = crate::error_chain(&err);
            assert!(msg.contains(want), "got {msg:?}\nwant it to contain {want:?}");
        }
    }
}
