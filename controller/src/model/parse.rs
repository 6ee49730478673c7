//! Manifests to objects: multi-document YAML parsed and validated field by field, with
//! the field path in every error.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

use super::pod::PodInfo;
use super::selector::{self, FieldError};
use super::service::{validate_endpoint_slice, validate_service};
use super::DEFAULT_NAMESPACE;

/// Errors from parsing and validating manifests.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The text is not YAML.
    #[error("{origin}: document {document}: invalid yaml")]
    Yaml {
        /// File or source the text came from.
        origin: String,
        /// 1-based document index in the stream.
        document: usize,
        /// The parser's error.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A document is not a supported kind.
    #[error(
        "{origin}: document {document}: unsupported object kind {kind:?} apiVersion {api_version:?} \
         (expected v1 Namespace, v1 Node, v1 Pod, v1 Service, discovery.k8s.io/v1 EndpointSlice \
         or networking.k8s.io/v1 NetworkPolicy)"
    )]
    UnknownKind {
        /// File or source the text came from.
        origin: String,
        /// 1-based document index in the stream.
        document: usize,
        /// The document's `kind`, empty if missing.
        kind: String,
        /// The document's `apiVersion`, empty if missing.
        api_version: String,
    },
    /// A field has the wrong type or shape.
    #[error("{origin}: document {document}: {object}: {field}: cannot decode")]
    Decode {
        /// File or source the text came from.
        origin: String,
        /// 1-based document index in the stream.
        document: usize,
        /// The object, e.g. `Pod x/a` (name may be missing).
        object: String,
        /// Path of the field that failed.
        field: String,
        /// The decoder's error.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A field fails the API server's validation.
    // The field error is the source, so a cause chain prints it once.
    #[error("{origin}: document {document}: {object}")]
    Invalid {
        /// File or source the text came from.
        origin: String,
        /// 1-based document index in the stream.
        document: usize,
        /// The object, e.g. `NetworkPolicy x/allow-b`.
        object: String,
        /// The offending field and what is wrong with it.
        #[source]
        source: FieldError,
    },
}

/// The object kinds the model holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1 Namespace`.
    Namespace,
    /// `v1 Pod`.
    Pod,
    /// `networking.k8s.io/v1 NetworkPolicy`.
    NetworkPolicy,
    /// `v1 Node`.
    Node,
    /// `v1 Service`.
    Service,
    /// `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlice,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Node => "Node",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        })
    }
}

/// One Kubernetes object of a supported kind.
#[derive(Clone, Debug, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "objects are few and short-lived; unboxed variants keep matching and building plain"
)]
pub enum Object {
    /// A Namespace.
    Namespace(Namespace),
    /// A Pod, validated then reduced to what the model keeps.
    Pod(PodInfo),
    /// A NetworkPolicy.
    NetworkPolicy(NetworkPolicy),
    /// A Node (the model keeps what routing reads: see [`super::NodeInfo`]).
    Node(Node),
    /// A Service (the model keeps what the service table reads: see [`super::ServiceInfo`]).
    Service(Service),
    /// An EndpointSlice (the model keeps the IPv4 ones, as [`super::EndpointSliceInfo`]).
    EndpointSlice(EndpointSlice),
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
            Object::Node(_) => Kind::Node,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
        }
    }

    fn metadata(&self) -> Option<&ObjectMeta> {
        match self {
            Object::Namespace(o) => Some(&o.metadata),
            Object::Pod(_) => None,
            Object::NetworkPolicy(o) => Some(&o.metadata),
            Object::Node(o) => Some(&o.metadata),
            Object::Service(o) => Some(&o.metadata),
            Object::EndpointSlice(o) => Some(&o.metadata),
        }
    }

    /// The namespace of a namespaced object (`None` for a Namespace or Node).
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Object::Namespace(_) | Object::Node(_) => None,
            Object::Pod(pod) => Some(&pod.namespace),
            _ => Some(self.metadata().and_then(|m| m.namespace.as_deref()).unwrap_or(DEFAULT_NAMESPACE)),
        }
    }

    /// The object's name (empty only if built by hand without one).
    pub fn name(&self) -> &str {
        match self {
            Object::Pod(pod) => &pod.name,
            _ => self.metadata().and_then(|m| m.name.as_deref()).unwrap_or_default(),
        }
    }

    /// The object as one YAML document (`---` first) that [`parse_documents`] reads back.
    ///
    /// Serialising these types cannot fail in practice (all map keys are strings); should it,
    /// the document is a YAML comment carrying the error, never silently empty.
    pub fn to_yaml(&self) -> String {
        let doc = match self {
            Object::Namespace(x) => serde_yaml_ng::to_string(x),
            Object::Pod(x) => serde_yaml_ng::to_string(&x.to_pod()),
            Object::NetworkPolicy(x) => serde_yaml_ng::to_string(x),
            Object::Node(x) => serde_yaml_ng::to_string(x),
            Object::Service(x) => serde_yaml_ng::to_string(x),
            Object::EndpointSlice(x) => serde_yaml_ng::to_string(x),
        };
        match doc {
            Ok(text) => format!("---\n{text}"),
            Err(e) => format!("---\n# cannot serialise {}: {e}\n", self.to_ref()),
        }
    }

    /// A reference naming this object.
    pub fn to_ref(&self) -> ObjectRef {
        ObjectRef {
            kind: self.kind(),
            namespace: self.namespace().map(str::to_string),
            name: self.name().to_string(),
        }
    }
}

/// Names one object: kind, namespace (none for a Namespace) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// The kind.
    pub kind: Kind,
    /// The namespace of a namespaced object (none for a Namespace or Node).
    pub namespace: Option<String>,
    /// The name.
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// Parses a multi-document YAML stream into objects, validating each as the API server would.
///
/// Empty documents are skipped. Any error fails the whole text, so nothing is half-applied.
pub fn parse_documents(text: &str, origin: &str) -> Result<Vec<Object>, ModelError> {
    let mut objects = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = serde_yaml_ng::Value::deserialize(doc).map_err(|source| ModelError::Yaml {
            origin: origin.to_string(),
            document,
            source,
        })?;
        if value.is_null() {
            continue;
        }
        objects.push(parse_value(value, origin, document)?);
    }
    Ok(objects)
}

fn parse_value(value: serde_yaml_ng::Value, origin: &str, document: usize) -> Result<Object, ModelError> {
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let (kind, api_version) = (field("kind"), field("apiVersion"));
    let meta_str = |name: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let (name, namespace) = (meta_str("name"), meta_str("namespace"));
    let kind_enum = match (kind.as_str(), api_version.as_str()) {
        ("Namespace", "v1") => Kind::Namespace,
        ("Pod", "v1") => Kind::Pod,
        ("NetworkPolicy", "networking.k8s.io/v1") => Kind::NetworkPolicy,
        ("Node", "v1") => Kind::Node,
        ("Service", "v1") => Kind::Service,
        ("EndpointSlice", "discovery.k8s.io/v1") => Kind::EndpointSlice,
        _ => {
            return Err(ModelError::UnknownKind {
                origin: origin.to_string(),
                document,
                kind,
                api_version,
            });
        }
    };
    let object_name = {
        let n = name.as_deref().unwrap_or("<unnamed>");
        match (kind_enum, namespace.as_deref()) {
            (Kind::Namespace | Kind::Node, _) => format!("{kind_enum} {n}"),
            (_, ns) => format!("{kind_enum} {}/{n}", ns.unwrap_or(DEFAULT_NAMESPACE)),
        }
    };
    let decode_err = |e: serde_path_to_error::Error<serde_yaml_ng::Error>| ModelError::Decode {
        origin: origin.to_string(),
        document,
        object: object_name.clone(),
        field: e.path().to_string(),
        source: e.into_inner(),
    };
    let invalid = |source: FieldError| ModelError::Invalid {
        origin: origin.to_string(),
        document,
        object: object_name.clone(),
        source,
    };
    let mut object = match kind_enum {
        Kind::Namespace => Object::Namespace(serde_path_to_error::deserialize(value).map_err(decode_err)?),
        Kind::Pod => {
            let mut pod: Pod = serde_path_to_error::deserialize(value).map_err(decode_err)?;
            if name.as_deref().is_none_or(str::is_empty) {
                return Err(invalid(FieldError::new("metadata.name", "required")));
            }
            pod.metadata.namespace.get_or_insert_with(|| DEFAULT_NAMESPACE.to_string());
            validate_meta(&pod.metadata).map_err(invalid)?;
            validate_pod(&pod).map_err(invalid)?;
            // Validated as parsed; the model keeps the compact view.
            return Ok(Object::Pod(PodInfo::from_pod(&pod)));
        }
        Kind::NetworkPolicy => Object::NetworkPolicy(serde_path_to_error::deserialize(value).map_err(decode_err)?),
        Kind::Node => Object::Node(serde_path_to_error::deserialize(value).map_err(decode_err)?),
        Kind::Service => Object::Service(serde_path_to_error::deserialize(value).map_err(decode_err)?),
        Kind::EndpointSlice => Object::EndpointSlice(serde_path_to_error::deserialize(value).map_err(decode_err)?),
    };
    if name.as_deref().is_none_or(str::is_empty) {
        return Err(invalid(FieldError::new("metadata.name", "required")));
    }
    match &mut object {
        Object::Namespace(ns) => {
            // Namespaces are cluster-scoped; the API server ignores a namespace here.
            ns.metadata.namespace = None;
            validate_namespace_name(name.as_deref().unwrap_or_default(), "metadata.name").map_err(invalid)?;
            validate_meta(&ns.metadata).map_err(invalid)?;
        }
        // Validated above, before the reduction.
        Object::Pod(_) => {}
        Object::NetworkPolicy(np) => {
            np.metadata.namespace.get_or_insert_with(|| DEFAULT_NAMESPACE.to_string());
            validate_meta(&np.metadata).map_err(invalid)?;
            validate_network_policy(np).map_err(invalid)?;
        }
        Object::Node(node) => {
            // Nodes are cluster-scoped, like Namespaces.
            node.metadata.namespace = None;
            validate_meta(&node.metadata).map_err(invalid)?;
            validate_node(node).map_err(invalid)?;
        }
        Object::Service(svc) => {
            svc.metadata.namespace.get_or_insert_with(|| DEFAULT_NAMESPACE.to_string());
            validate_meta(&svc.metadata).map_err(invalid)?;
            validate_service(svc).map_err(invalid)?;
        }
        Object::EndpointSlice(slice) => {
            slice.metadata.namespace.get_or_insert_with(|| DEFAULT_NAMESPACE.to_string());
            validate_meta(&slice.metadata).map_err(invalid)?;
            validate_endpoint_slice(slice).map_err(invalid)?;
        }
    }
    Ok(object)
}

fn validate_meta(meta: &ObjectMeta) -> Result<(), FieldError> {
    if let Some(ns) = &meta.namespace {
        validate_namespace_name(ns, "metadata.namespace")?;
    }
    match &meta.labels {
        Some(labels) => selector::validate_labels(labels, "metadata.labels"),
        None => Ok(()),
    }
}

/// Checks a namespace name as the API server does (a DNS-1123 label): the model creates the
/// Namespace of a namespaced object, and the name becomes its `kubernetes.io/metadata.name`
/// label, so a name that is no label value would leave the model holding what it refuses.
fn validate_namespace_name(name: &str, field: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        return Ok(());
    }
    Err(FieldError::new(
        field,
        format!("{name:?} is not a namespace name (at most 63 lowercase letters, digits and '-', alphanumeric at both ends)"),
    ))
}

fn validate_pod(pod: &Pod) -> Result<(), FieldError> {
    if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
        ip.parse::<IpAddr>()
            .map_err(|e| FieldError::new("status.podIP", format!("{ip:?} is not an ip address: {e}")))?;
    }
    for (c, container) in pod.spec.iter().flat_map(|s| &s.containers).enumerate() {
        for (p, port) in container.ports.iter().flatten().enumerate() {
            let at = format!("spec.containers[{c}].ports[{p}]");
            if !(1..=65535).contains(&port.container_port) {
                return Err(FieldError::new(format!("{at}.containerPort"), "must be between 1 and 65535"));
            }
            if let Some(proto) = &port.protocol {
                check_protocol(proto).map_err(|m| FieldError::new(format!("{at}.protocol"), m))?;
            }
        }
    }
    Ok(())
}

/// Checks the fields of a Node the model reads, as the API server does: every pod CIDR is
/// a CIDR, at most one per IP family, and `spec.podCIDR` is `spec.podCIDRs[0]` when both
/// are set; an InternalIP or ExternalIP is an IP address. IPv6 values are valid (the model
/// ignores them).
pub fn validate_node(node: &Node) -> Result<(), FieldError> {
    let any_cidr = |field: &str, text: &str| {
        if parse_cidr(text).is_ok() || (text.contains('/') && text.parse::<IpNetwork>().is_ok_and(|n| n.is_ipv6())) {
            Ok(())
        } else {
            Err(FieldError::new(field, format!("{text:?} is not an IPv4 or IPv6 CIDR")))
        }
    };
    if let Some(spec) = &node.spec {
        if let Some(cidr) = &spec.pod_cidr {
            any_cidr("spec.podCIDR", cidr)?;
        }
        let cidrs = spec.pod_cidrs.as_deref().unwrap_or_default();
        for (i, cidr) in cidrs.iter().enumerate() {
            any_cidr(&format!("spec.podCIDRs[{i}]"), cidr)?;
        }
        let v4 = cidrs.iter().filter(|c| parse_cidr(c).is_ok()).count();
        if v4 > 1 || cidrs.len() - v4 > 1 {
            return Err(FieldError::new(
                "spec.podCIDRs",
                "may specify no more than one CIDR for each IP family",
            ));
        }
        if let (Some(single), Some(first)) = (&spec.pod_cidr, cidrs.first()) {
            if single != first {
                return Err(FieldError::new(
                    "spec.podCIDRs[0]",
                    format!("{first:?} must equal spec.podCIDR {single:?}"),
                ));
            }
        }
    }
    for (i, address) in node.status.iter().flat_map(|s| s.addresses.iter().flatten()).enumerate() {
        if matches!(address.type_.as_str(), "InternalIP" | "ExternalIP") {
            let ip = &address.address;
            ip.parse::<IpAddr>().map_err(|e| {
                FieldError::new(
                    format!("status.addresses[{i}].address"),
                    format!("{ip:?} is not an ip address: {e}"),
                )
            })?;
        }
    }
    Ok(())
}

/// Checks a NetworkPolicy as the API server does; the error names the field.
pub fn validate_network_policy(np: &NetworkPolicy) -> Result<(), FieldError> {
    let Some(spec) = &np.spec else {
        return Ok(());
    };
    if let Some(sel) = &spec.pod_selector {
        selector::validate(sel, "spec.podSelector")?;
    }
    for (i, t) in spec.policy_types.iter().flatten().enumerate() {
        if t != "Ingress" && t != "Egress" {
            return Err(FieldError::new(
                format!("spec.policyTypes[{i}]"),
                format!("unsupported value {t:?} (expected Ingress or Egress)"),
            ));
        }
    }
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        validate_rule(&format!("spec.ingress[{i}]"), "from", rule.from.as_deref(), rule.ports.as_deref())?;
    }
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        validate_rule(&format!("spec.egress[{i}]"), "to", rule.to.as_deref(), rule.ports.as_deref())?;
    }
    Ok(())
}

fn validate_rule(
    at: &str,
    peers_field: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> Result<(), FieldError> {
    for (j, peer) in peers.unwrap_or_default().iter().enumerate() {
        validate_peer(peer, &format!("{at}.{peers_field}[{j}]"))?;
    }
    for (j, port) in ports.unwrap_or_default().iter().enumerate() {
        validate_port(port, &format!("{at}.ports[{j}]"))?;
    }
    Ok(())
}

fn validate_peer(peer: &NetworkPolicyPeer, at: &str) -> Result<(), FieldError> {
    if let Some(sel) = &peer.pod_selector {
        selector::validate(sel, &format!("{at}.podSelector"))?;
    }
    if let Some(sel) = &peer.namespace_selector {
        selector::validate(sel, &format!("{at}.namespaceSelector"))?;
    }
    if peer.ip_block.is_none() && peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
        return Err(FieldError::new(
            at,
            "must specify a peer (podSelector, namespaceSelector or ipBlock)",
        ));
    }
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            return Err(FieldError::new(
                at,
                "may not specify more than 1 peer type: ipBlock excludes podSelector and namespaceSelector",
            ));
        }
        let cidr = parse_cidr(&block.cidr).map_err(|m| FieldError::new(format!("{at}.ipBlock.cidr"), m))?;
        for (k, except) in block.except.iter().flatten().enumerate() {
            let field = format!("{at}.ipBlock.except[{k}]");
            let e = parse_cidr(except).map_err(|m| FieldError::new(&field, m))?;
            if e.prefix() <= cidr.prefix() || !cidr.contains(e.network()) {
                return Err(FieldError::new(
                    field,
                    format!("{except:?} must be strictly within {:?}", block.cidr),
                ));
            }
        }
    }
    Ok(())
}

/// Parses an IPv4 CIDR whose host bits may be set (the API accepts `10.0.0.1/8`);
/// the result is normalised to its network address.
pub fn parse_cidr(text: &str) -> Result<Ipv4Network, String> {
    let (addr, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a cidr (missing /prefix)"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|e| format!("{text:?} is not an ipv4 cidr: {e}"))?;
    let prefix: u8 = prefix.parse().map_err(|e| format!("{text:?} has a bad prefix length: {e}"))?;
    let net = Ipv4Network::new(addr, prefix).map_err(|e| format!("{text:?} is not an ipv4 cidr: {e}"))?;
    Ipv4Network::new(net.network(), prefix).map_err(|e| format!("{text:?} is not an ipv4 cidr: {e}"))
}

fn check_protocol(proto: &str) -> Result<(), String> {
    match proto {
        "TCP" | "UDP" | "SCTP" => Ok(()),
        other => Err(format!("unsupported value {other:?} (expected TCP, UDP or SCTP)")),
    }
}

fn validate_port(port: &NetworkPolicyPort, at: &str) -> Result<(), FieldError> {
    if let Some(proto) = &port.protocol {
        check_protocol(proto).map_err(|m| FieldError::new(format!("{at}.protocol"), m))?;
    }
    match (&port.port, port.end_port) {
        (Some(IntOrString::Int(p)), end) => {
            if !(1..=65535).contains(p) {
                return Err(FieldError::new(format!("{at}.port"), format!("{p} must be between 1 and 65535")));
            }
            if let Some(e) = end {
                if !(1..=65535).contains(&e) {
                    return Err(FieldError::new(format!("{at}.endPort"), format!("{e} must be between 1 and 65535")));
                }
                if e < *p {
                    return Err(FieldError::new(
                        format!("{at}.endPort"),
                        format!("{e} must be greater than or equal to port {p}"),
                    ));
                }
            }
        }
        (Some(IntOrString::String(name)), end) => {
            validate_port_name(name).map_err(|m| FieldError::new(format!("{at}.port"), m))?;
            if end.is_some() {
                return Err(FieldError::new(format!("{at}.endPort"), "may not be used with a named port"));
            }
        }
        (None, Some(_)) => {
            return Err(FieldError::new(format!("{at}.endPort"), "may not be used without a numeric port"));
        }
        (None, None) => {}
    }
    Ok(())
}

/// An IANA service name: 1-15 lowercase alphanumerics or `-`, a letter among them, no `--`,
/// not starting or ending with `-`.
pub(super) fn validate_port_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is neither a port number nor a valid port name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Cluster;

    /// Found by fuzzing (fuzz/fuzz_targets/manifests.rs): a policy in a namespace whose name
    /// is no DNS label was accepted, the model created that Namespace, and its own
    /// `to_yaml` then failed to parse back (the name is its metadata.name label).
    #[test]
    fn namespace_names_are_dns_labels() {
        let policy = |ns: &str| {
            format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: {ns:?}}}\nspec: {{podSelector: {{}}}}\n")
        };
        let long = "x".repeat(64);
        for bad in [long.as_str(), "X", "a_b", "-a", "a-", "a.b", "\u{fffd}x"] {
            let err = crate::error_chain(&parse_documents(&policy(bad), "t.yaml").unwrap_err());
            assert!(err.contains("metadata.namespace"), "{bad}: {err}");
            let ns = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {bad:?}}}\n");
            let err = crate::error_chain(&parse_documents(&ns, "t.yaml").unwrap_err());
            assert!(err.contains("metadata.name"), "{bad}: {err}");
        }
        let ok = parse_documents(&policy(&"a-1".repeat(21)), "t.yaml").unwrap();
        let yaml = Cluster::from_objects(ok).to_yaml();
        parse_documents(&yaml, "to_yaml").unwrap();
    }
}
