//! The cluster model: Namespace, Pod, NetworkPolicy, Node, Service and EndpointSlice
//! objects parsed from YAML.

mod parse;
mod pod;
pub mod selector;
mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::{Namespace, Node, NodeAddress, NodeSpec, NodeStatus};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub use parse::{parse_cidr, parse_documents, validate_network_policy, validate_node, Kind, ModelError, Object, ObjectRef};
pub use pod::{named_ports, pod_ipv4, pod_labels, pod_node, Interner, Labels, PodInfo, PodPort};
pub use service::{
    validate_endpoint_slice, validate_service, ClusterIp, EndpointInfo, EndpointPortInfo, EndpointSliceInfo, ServiceInfo, ServicePortInfo,
    SessionAffinity, TargetPort, ADDRESS_TYPE_IPV4, DEFAULT_AFFINITY_TIMEOUT_SECONDS, HEADLESS, MAX_AFFINITY_TIMEOUT_SECONDS,
    SERVICE_NAME_LABEL,
};

/// Namespace of a Pod or NetworkPolicy that names none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Label the API server puts on every Namespace, holding its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// NetworkPolicy annotation: `"true"` puts the policy in audit mode, `"false"` keeps it
/// enforcing even in an audit-mode namespace.
pub const POLICY_AUDIT_ANNOTATION: &str = "bulkhead.io/audit";
/// Namespace annotation: `"true"` puts every policy of the namespace in audit mode.
pub const NAMESPACE_AUDIT_ANNOTATION: &str = "bulkhead.io/policy-audit";

/// Every object of the cluster, as the API server would store them, reduced to what the
/// agent reads (pods as [`PodInfo`], sharing their label sets).
///
/// Equality compares the objects (a stand-in namespace equals a Namespace object with the
/// same labels).
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    namespaces: BTreeMap<String, Namespace>,
    /// Namespaces no Namespace object defines: stand-ins for the namespace of the objects in
    /// them, gone with the last of those (as a full rebuild from the objects would have them).
    implicit: BTreeSet<String>,
    pods: BTreeMap<(String, String), PodInfo>,
    policies: BTreeMap<(String, String), NetworkPolicy>,
    nodes: BTreeMap<String, NodeInfo>,
    services: BTreeMap<(String, String), ServiceInfo>,
    endpoint_slices: BTreeMap<(String, String), EndpointSliceInfo>,
    interner: Interner,
}

impl PartialEq for Cluster {
    fn eq(&self, other: &Self) -> bool {
        self.namespaces == other.namespaces
            && self.pods == other.pods
            && self.policies == other.policies
            && self.nodes == other.nodes
            && self.services == other.services
            && self.endpoint_slices == other.endpoint_slices
    }
}

/// One change of the cluster, as a source delivers it.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// The object was created or replaced (boxed: objects are large, deletions small).
    Apply(Box<Object>),
    /// The object is gone (a Namespace's members go by their own deletes: see
    /// [`Cluster::delete`]).
    Delete(ObjectRef),
}

impl Change {
    /// The object changed.
    pub fn object_ref(&self) -> ObjectRef {
        match self {
            Change::Apply(o) => o.to_ref(),
            Change::Delete(r) => r.clone(),
        }
    }
}

/// Inserts `value` under `key` unless it is there already; true when the map changed.
fn put<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, key: K, value: V) -> bool {
    if map.get(&key) == Some(&value) {
        return false;
    }
    map.insert(key, value);
    true
}

/// The keys whose values differ between `a` and `b` (present in one only, or unequal).
fn differing<'a, K: Ord + Clone, V: PartialEq>(a: &'a BTreeMap<K, V>, b: &'a BTreeMap<K, V>) -> impl Iterator<Item = K> + 'a {
    let gone = a.keys().filter(|k| !b.contains_key(k));
    let changed = b.iter().filter(|(k, v)| a.get(k) != Some(v)).map(|(k, _)| k);
    gone.chain(changed).cloned()
}

/// What routing needs of one Node: where its pods live and how to reach it.
///
/// A node lacking either address is kept (so it is known, and can be reported) but is not
/// routable: see [`NodeInfo::route`] and [`NodeInfo::unroutable`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeInfo {
    /// The Node's name.
    pub name: String,
    /// Its first IPv4 pod CIDR, from `spec.podCIDRs` or else `spec.podCIDR`.
    pub pod_cidr: Option<Ipv4Network>,
    /// Its first IPv4 `InternalIP` from `status.addresses`.
    pub internal_ip: Option<Ipv4Addr>,
}

impl NodeInfo {
    /// The routing view of a Node (unparsable or IPv6 values count as absent).
    pub fn from_node(node: &Node) -> NodeInfo {
        NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            pod_cidr: node_pod_cidr(node),
            internal_ip: node_internal_ip(node),
        }
    }

    /// The node's pod CIDR and the address to reach it by, when it has both.
    pub fn route(&self) -> Option<(Ipv4Network, Ipv4Addr)> {
        Some((self.pod_cidr?, self.internal_ip?))
    }

    /// Why the node cannot be routed to, for a log line; `None` when it can.
    pub fn unroutable(&self) -> Option<&'static str> {
        match (self.pod_cidr, self.internal_ip) {
            (Some(_), Some(_)) => None,
            (None, Some(_)) => Some("no IPv4 pod CIDR"),
            (Some(_), None) => Some("no IPv4 InternalIP"),
            (None, None) => Some("no IPv4 pod CIDR and no IPv4 InternalIP"),
        }
    }

    /// The smallest Node object carrying this view (what [`Cluster::objects`] returns).
    pub fn to_node(&self) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..ObjectMeta::default()
            },
            spec: self.pod_cidr.map(|cidr| NodeSpec {
                pod_cidr: Some(cidr.to_string()),
                pod_cidrs: Some(vec![cidr.to_string()]),
                ..NodeSpec::default()
            }),
            status: self.internal_ip.map(|ip| NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: NODE_INTERNAL_IP.to_string(),
                    address: ip.to_string(),
                }]),
                ..NodeStatus::default()
            }),
        }
    }
}

/// The `status.addresses[].type` of a node's address inside the cluster network.
pub const NODE_INTERNAL_IP: &str = "InternalIP";

/// A node's first IPv4 pod CIDR, from `spec.podCIDRs` or the older `spec.podCIDR`
/// (normalised to its network address).
pub fn node_pod_cidr(node: &Node) -> Option<Ipv4Network> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidrs
        .iter()
        .flatten()
        .chain(spec.pod_cidr.as_ref())
        .find_map(|c| parse_cidr(c).ok())
}

/// A node's first IPv4 `InternalIP` from `status.addresses` (dual-stack nodes list one per
/// family).
pub fn node_internal_ip(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .iter()
        .flatten()
        .filter(|a| a.type_ == NODE_INTERNAL_IP)
        .find_map(|a| a.address.parse().ok())
}

fn namespace_object(name: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

impl Cluster {
    /// An empty cluster.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a cluster by applying `objects` in order.
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut c = Self::new();
        for o in objects {
            c.apply(o);
        }
        c
    }

    /// Inserts or replaces an object; a namespaced object in a missing namespace creates a
    /// stand-in for it. An EndpointSlice whose address type is not IPv4 is left out (the
    /// datapath is IPv4), and replaces an IPv4 one of the same name.
    ///
    /// Returns whether the model changed: re-applying an object as it is changes nothing.
    pub fn apply(&mut self, object: Object) -> bool {
        match object {
            Object::Namespace(mut ns) => {
                let name = ns.metadata.name.clone().unwrap_or_default();
                ns.metadata.namespace = None;
                // The API server adds this label to every namespace, and policies select on it.
                ns.metadata
                    .labels
                    .get_or_insert_with(BTreeMap::new)
                    .insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
                self.implicit.remove(&name);
                put(&mut self.namespaces, name, ns)
            }
            Object::Pod(mut pod) => {
                let created = self.ensure_namespace(&pod.namespace);
                let key = (pod.namespace.clone(), pod.name.clone());
                if self.pods.get(&key) == Some(&pod) {
                    return created;
                }
                self.interner.intern(&mut pod);
                if let Some(old) = self.pods.insert(key, pod) {
                    self.interner.release(old);
                }
                true
            }
            Object::NetworkPolicy(mut np) => {
                let ns = np.metadata.namespace.get_or_insert_with(|| DEFAULT_NAMESPACE.to_string()).clone();
                let created = self.ensure_namespace(&ns);
                let name = np.metadata.name.clone().unwrap_or_default();
                put(&mut self.policies, (ns, name), np) || created
            }
            Object::Node(node) => {
                let info = NodeInfo::from_node(&node);
                put(&mut self.nodes, info.name.clone(), info)
            }
            Object::Service(svc) => {
                let info = ServiceInfo::from_service(&svc);
                let created = self.ensure_namespace(&info.namespace);
                put(&mut self.services, (info.namespace.clone(), info.name.clone()), info) || created
            }
            Object::EndpointSlice(slice) => match EndpointSliceInfo::from_slice(&slice) {
                Some(info) => {
                    let created = self.ensure_namespace(&info.namespace);
                    put(&mut self.endpoint_slices, (info.namespace.clone(), info.name.clone()), info) || created
                }
                None => {
                    let r = Object::EndpointSlice(slice).to_ref();
                    self.delete(&r)
                }
            },
        }
    }

    /// Applies one change; returns whether the model changed.
    pub fn apply_change(&mut self, change: Change) -> bool {
        match change {
            Change::Apply(object) => self.apply(*object),
            Change::Delete(r) => self.delete(&r),
        }
    }

    /// Creates a stand-in for a namespace no object defined yet; true when it did.
    fn ensure_namespace(&mut self, name: &str) -> bool {
        if self.namespaces.contains_key(name) {
            return false;
        }
        self.apply(Object::Namespace(namespace_object(name)));
        self.implicit.insert(name.to_string());
        true
    }

    /// Whether any namespaced object is in namespace `ns`.
    fn has_members(&self, ns: &str) -> bool {
        fn any<V>(map: &BTreeMap<(String, String), V>, ns: &str) -> bool {
            map.range((ns.to_string(), String::new())..)
                .next()
                .is_some_and(|((n, _), _)| n == ns)
        }
        any(&self.pods, ns) || any(&self.policies, ns) || any(&self.services, ns) || any(&self.endpoint_slices, ns)
    }

    /// Drops the stand-in namespace `ns` once nothing is in it.
    fn drop_stand_in(&mut self, ns: &str) {
        if self.implicit.contains(ns) && !self.has_members(ns) {
            self.implicit.remove(ns);
            self.namespaces.remove(ns);
        }
    }

    /// Removes an object, as its deletion in the API server does; returns whether the model
    /// changed.
    ///
    /// A Namespace's members are deleted one by one (the API server's namespace controller
    /// does so, and a manifests directory lists them apart): while any remain, a deleted
    /// Namespace leaves a stand-in with only its name label, and a stand-in goes with its
    /// last member. [`Cluster::delete_namespace`] removes a namespace with everything in it.
    pub fn delete(&mut self, r: &ObjectRef) -> bool {
        let ns = r.namespace.clone().unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
        let key = || (ns.clone(), r.name.clone());
        let removed = match r.kind {
            Kind::Namespace => {
                if !self.namespaces.contains_key(&r.name) || self.implicit.contains(&r.name) {
                    return false;
                }
                if !self.has_members(&r.name) {
                    self.namespaces.remove(&r.name);
                    return true;
                }
                let stand_in = namespace_object(&r.name);
                let changed = self.apply(Object::Namespace(stand_in));
                self.implicit.insert(r.name.clone());
                return changed;
            }
            Kind::Pod => match self.pods.remove(&key()) {
                Some(old) => {
                    self.interner.release(old);
                    true
                }
                None => false,
            },
            Kind::NetworkPolicy => self.policies.remove(&key()).is_some(),
            Kind::Node => return self.nodes.remove(&r.name).is_some(),
            Kind::Service => self.services.remove(&key()).is_some(),
            Kind::EndpointSlice => self.endpoint_slices.remove(&key()).is_some(),
        };
        if removed {
            self.drop_stand_in(&ns);
        }
        removed
    }

    /// Removes a namespace and every object in it (`lab delete` of a Namespace); returns
    /// whether it existed.
    pub fn delete_namespace(&mut self, name: &str) -> bool {
        let mut gone = Vec::new();
        self.pods.retain(|(ns, _), pod| {
            let keep = ns != name;
            if !keep {
                gone.push(pod.clone());
            }
            keep
        });
        for pod in gone {
            self.interner.release(pod);
        }
        self.policies.retain(|(ns, _), _| ns != name);
        self.services.retain(|(ns, _), _| ns != name);
        self.endpoint_slices.retain(|(ns, _), _| ns != name);
        self.implicit.remove(name);
        self.namespaces.remove(name).is_some()
    }

    /// Replaces the whole model (a source's resync); returns every object that changed.
    pub fn replace(&mut self, new: Cluster) -> BTreeSet<ObjectRef> {
        let namespaced = |kind: Kind| {
            move |(ns, name): (String, String)| ObjectRef {
                kind,
                namespace: Some(ns),
                name,
            }
        };
        let global = |kind: Kind| {
            move |name: String| ObjectRef {
                kind,
                namespace: None,
                name,
            }
        };
        let touched = differing(&self.namespaces, &new.namespaces)
            .map(global(Kind::Namespace))
            .chain(differing(&self.nodes, &new.nodes).map(global(Kind::Node)))
            .chain(differing(&self.pods, &new.pods).map(namespaced(Kind::Pod)))
            .chain(differing(&self.policies, &new.policies).map(namespaced(Kind::NetworkPolicy)))
            .chain(differing(&self.services, &new.services).map(namespaced(Kind::Service)))
            .chain(differing(&self.endpoint_slices, &new.endpoint_slices).map(namespaced(Kind::EndpointSlice)))
            .collect();
        *self = new;
        touched
    }

    /// Every object: namespaces first, then nodes (as [`NodeInfo::to_node`]), pods,
    /// policies, Services ([`ServiceInfo::to_service`]) and EndpointSlices
    /// ([`EndpointSliceInfo::to_endpoint_slice`]): an order that applies cleanly.
    pub fn objects(&self) -> Vec<Object> {
        self.namespaces
            .values()
            .cloned()
            .map(Object::Namespace)
            .chain(self.nodes.values().map(|n| Object::Node(n.to_node())))
            .chain(self.pods.values().cloned().map(Object::Pod))
            .chain(self.policies.values().cloned().map(Object::NetworkPolicy))
            .chain(self.services.values().map(|s| Object::Service(s.to_service())))
            .chain(self.endpoint_slices.values().map(|s| Object::EndpointSlice(s.to_endpoint_slice())))
            .collect()
    }

    /// The cluster as a multi-document YAML stream that [`parse_documents`] reads back.
    ///
    /// Serialising these types cannot fail in practice (all map keys are strings); should it,
    /// the object is written as a YAML comment carrying the error, never silently dropped.
    pub fn to_yaml(&self) -> String {
        self.objects().iter().map(Object::to_yaml).collect()
    }

    /// Namespaces by name.
    pub fn namespaces(&self) -> &BTreeMap<String, Namespace> {
        &self.namespaces
    }

    /// Pods by (namespace, name).
    pub fn pods(&self) -> &BTreeMap<(String, String), PodInfo> {
        &self.pods
    }

    /// NetworkPolicies by (namespace, name).
    pub fn policies(&self) -> &BTreeMap<(String, String), NetworkPolicy> {
        &self.policies
    }

    /// Every node, routable or not, in name order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    /// Every Service, by namespace then name.
    pub fn services(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.services.values()
    }

    /// A Service by namespace and name.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceInfo> {
        self.services.get(&(namespace.to_string(), name.to_string()))
    }

    /// Every IPv4 EndpointSlice, by namespace then name.
    pub fn endpoint_slices(&self) -> impl Iterator<Item = &EndpointSliceInfo> {
        self.endpoint_slices.values()
    }

    /// The EndpointSlices of the Service `namespace`/`service`: those in its namespace
    /// labelled [`SERVICE_NAME_LABEL`] with its name, in name order.
    pub fn endpoint_slices_of<'a>(&'a self, namespace: &'a str, service: &'a str) -> impl Iterator<Item = &'a EndpointSliceInfo> + 'a {
        self.endpoint_slices
            .range((namespace.to_string(), String::new())..)
            .take_while(move |((ns, _), _)| ns == namespace)
            .map(|(_, s)| s)
            .filter(move |s| s.service.as_deref() == Some(service))
    }

    /// A namespace by name.
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(name)
    }

    /// A pod by namespace and name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }

    /// A policy by namespace and name.
    pub fn policy(&self, namespace: &str, name: &str) -> Option<&NetworkPolicy> {
        self.policies.get(&(namespace.to_string(), name.to_string()))
    }

    /// Whether the policy `namespace`/`np` is in audit mode: its own
    /// [`POLICY_AUDIT_ANNOTATION`] when set, else its namespace's
    /// [`NAMESPACE_AUDIT_ANNOTATION`]. Any value but `true`/`false` (any case) counts as
    /// unset, so a typo never turns enforcement off.
    pub fn policy_audited(&self, namespace: &str, np: &NetworkPolicy) -> bool {
        let flag = |meta: &ObjectMeta, key: &str| {
            meta.annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .and_then(|v| match v.trim().to_ascii_lowercase().as_str() {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => None,
                })
        };
        flag(&np.metadata, POLICY_AUDIT_ANNOTATION)
            .or_else(|| {
                self.namespaces
                    .get(namespace)
                    .and_then(|ns| flag(&ns.metadata, NAMESPACE_AUDIT_ANNOTATION))
            })
            .unwrap_or(false)
    }

    /// A namespace's labels (empty if the namespace is unknown).
    pub fn namespace_labels(&self, name: &str) -> BTreeMap<String, String> {
        self.namespaces
            .get(name)
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: x
  labels: {ns: x}
---
apiVersion: v1
kind: Pod
metadata:
  name: a
  namespace: x
  labels: {pod: a}
spec:
  nodeName: node-1
  containers:
  - name: c
    image: busybox
    ports:
    - {name: http, containerPort: 80}
    - {name: dns, containerPort: 53, protocol: UDP}
status:
  podIP: 10.244.1.5
---
---
apiVersion: v1
kind: Pod
metadata: {name: lonely, labels: {pod: l}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector:
        matchExpressions: [{key: pod, operator: In, values: [b]}]
      namespaceSelector: {}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports:
    - {port: 80}
    - {port: http, protocol: TCP}
    - {port: 1000, endPort: 2000, protocol: UDP}
  egress:
  - {}
"#;

    #[test]
    fn parses_good_documents_and_defaults_namespaces() {
        let objs = parse_documents(GOOD, "good.yaml").expect("parses");
        let refs: Vec<String> = objs.iter().map(|o| o.to_ref().to_string()).collect();
        assert_eq!(refs, ["Namespace x", "Pod x/a", "Pod default/lonely", "NetworkPolicy y/allow-b"]);
        let Object::Pod(a) = &objs[1] else { panic!("not a pod") };
        assert_eq!(pod_ipv4(a), Some(Ipv4Addr::new(10, 244, 1, 5)));
        assert_eq!(pod_node(a), Some("node-1"));
        assert_eq!(named_ports(a, "http", "TCP"), [80]);
        assert_eq!(named_ports(a, "dns", "UDP"), [53]);
        assert!(named_ports(a, "dns", "TCP").is_empty());
    }

    #[test]
    fn cluster_applies_deletes_and_round_trips() {
        let mut c = Cluster::from_objects(parse_documents(GOOD, "good.yaml").expect("parses"));
        assert_eq!(c.namespaces().keys().collect::<Vec<_>>(), ["default", "x", "y"]);
        assert_eq!(c.namespace_labels("y").get(NAMESPACE_NAME_LABEL).map(String::as_str), Some("y"));
        assert_eq!(c.namespace_labels("x").get("ns").map(String::as_str), Some("x"));
        let text = c.to_yaml();
        let back = Cluster::from_objects(parse_documents(&text, "dump.yaml").expect("round trip parses"));
        assert_eq!(back, c);

        // Re-applying replaces in place.
        let relabel = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: z}}\n";
        for o in parse_documents(relabel, "r.yaml").expect("parses") {
            c.apply(o);
        }
        assert_eq!(c.pods().len(), 2);
        assert_eq!(
            c.pod("x", "a").map(pod_labels).and_then(|l| l.get("pod").cloned()).as_deref(),
            Some("z")
        );

        let ns_ref = ObjectRef {
            kind: Kind::Namespace,
            namespace: None,
            name: "x".into(),
        };
        assert!(c.delete_namespace("x"));
        assert!(c.pod("x", "a").is_none());
        assert!(!c.delete_namespace("x"));
        assert!(!c.delete(&ns_ref));
        let np = ObjectRef {
            kind: Kind::NetworkPolicy,
            namespace: Some("y".into()),
            name: "allow-b".into(),
        };
        assert!(c.delete(&np));
        assert!(c.policies().is_empty());
    }

    fn apply_text(c: &mut Cluster, text: &str) -> Vec<bool> {
        parse_documents(text, "t.yaml")
            .expect("parses")
            .into_iter()
            .map(|o| c.apply(o))
            .collect()
    }

    fn r(kind: Kind, namespace: Option<&str>, name: &str) -> ObjectRef {
        ObjectRef {
            kind,
            namespace: namespace.map(str::to_string),
            name: name.into(),
        }
    }

    /// `apply` and `delete` say whether the model changed: an identical re-apply does not.
    #[test]
    fn apply_and_delete_report_real_changes_only() {
        let mut c = Cluster::new();
        assert_eq!(apply_text(&mut c, GOOD), [true, true, true, true]);
        assert_eq!(apply_text(&mut c, GOOD), [false, false, false, false]);
        let relabel = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: z}}\n";
        assert_eq!(apply_text(&mut c, relabel), [true]);
        assert_eq!(apply_text(&mut c, relabel), [false]);
        let node = "apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {podCIDR: 10.244.1.0/24}\n";
        assert_eq!(apply_text(&mut c, node), [true]);
        assert_eq!(apply_text(&mut c, node), [false]);
        assert!(c.delete(&r(Kind::Node, None, "n")));
        assert!(!c.delete(&r(Kind::Node, None, "n")));
        assert!(c.delete(&r(Kind::Pod, Some("x"), "a")));
        assert!(!c.delete(&r(Kind::Pod, Some("x"), "a")));
        // An IPv6 slice replaces the IPv4 one of its name, as a full rebuild would leave it out.
        let slice = |family: &str, ip: &str| {
            format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s, namespace: x}}\naddressType: {family}\nendpoints: [{{addresses: [\"{ip}\"]}}]\n")
        };
        assert_eq!(apply_text(&mut c, &slice("IPv4", "10.0.0.1")), [true]);
        assert_eq!(apply_text(&mut c, &slice("IPv6", "fd00::1")), [true]);
        assert_eq!(c.endpoint_slices().count(), 0);
        assert_eq!(apply_text(&mut c, &slice("IPv6", "fd00::1")), [false]);
    }

    /// A deleted Namespace whose members remain turns into a stand-in (only its name label);
    /// a stand-in goes with its last member: the model a rebuild from the objects gives.
    #[test]
    fn namespaces_outlive_their_object_while_members_remain() {
        let mut c = Cluster::new();
        apply_text(&mut c, GOOD);
        assert!(c.delete(&r(Kind::Namespace, None, "x")), "labels {{ns: x}} are gone");
        assert_eq!(
            c.namespace_labels("x"),
            BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), "x".to_string())])
        );
        assert!(c.pod("x", "a").is_some());
        assert!(!c.delete(&r(Kind::Namespace, None, "x")), "a stand-in has no object to delete");
        assert!(c.delete(&r(Kind::Pod, Some("x"), "a")));
        assert!(c.namespace("x").is_none(), "the stand-in went with its last member");
        // `y` only exists for its policy.
        assert!(c.delete(&r(Kind::NetworkPolicy, Some("y"), "allow-b")));
        assert!(c.namespace("y").is_none());
        // A Namespace object with no members goes at once; an explicit one outlives its members.
        apply_text(&mut c, "apiVersion: v1\nkind: Namespace\nmetadata: {name: e}\n");
        apply_text(&mut c, "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: e}\n");
        assert!(c.delete(&r(Kind::Pod, Some("e"), "p")));
        assert!(c.namespace("e").is_some());
        assert!(c.delete(&r(Kind::Namespace, None, "e")));
        assert!(c.namespace("e").is_none());
        let rebuilt = Cluster::from_objects(c.objects());
        assert_eq!(rebuilt, c);
    }

    /// Pods of one template share their label set, and a set no pod uses is forgotten.
    #[test]
    fn equal_label_sets_are_shared() {
        let mut c = Cluster::new();
        let pods: String = (0..50)
            .map(|i| {
                format!(
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, labels: {{app: a{}}}}}\nspec: {{nodeName: n1}}\n",
                    i % 2
                )
            })
            .collect();
        apply_text(&mut c, &pods);
        assert_eq!(c.interner.label_sets(), 2);
        let (p0, p2) = (c.pod("default", "p0").expect("p0"), c.pod("default", "p2").expect("p2"));
        assert!(Arc::ptr_eq(&p0.labels, &p2.labels));
        assert!(Arc::ptr_eq(p0.node.as_ref().expect("node"), p2.node.as_ref().expect("node")));
        for i in (1..50).step_by(2) {
            assert!(c.delete(&r(Kind::Pod, Some("default"), &format!("p{i}"))));
        }
        assert_eq!(c.interner.label_sets(), 1);
        assert_eq!(c.replace(Cluster::new()).len(), 26, "25 pods and the default namespace");
    }

    fn policy_doc(spec: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-b, namespace: x}}\nspec:\n{spec}"
        )
    }

    #[test]
    fn errors_name_origin_document_object_and_field() {
        let ing = |peer_or_port: &str| format!("  podSelector: {{}}\n  ingress:\n  - {peer_or_port}\n");
        let cases: Vec<(String, &str)> = vec![
            (policy_doc(&ing("from: [{podSelector: {matchExpressions: [{key: pod, operator: Foo, values: [a]}]}}]")),
             "demo.yaml: document 2: NetworkPolicy x/allow-b: spec.ingress[0].from[0].podSelector.matchExpressions[0].operator: unknown operator \"Foo\" (expected In, NotIn, Exists or DoesNotExist)"),
            (policy_doc(&ing("from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: In}]}}]")),
             "demo.yaml: document 2: NetworkPolicy x/allow-b: spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values: must be non-empty"),
            (policy_doc(&ing("from: [{podSelector: {matchExpressions: [{key: ns, operator: Exists, values: [a]}]}}]")),
             "spec.ingress[0].from[0].podSelector.matchExpressions[0].values: must be empty"),
            (policy_doc(&ing("from: [{podSelector: {matchLabels: {\"bad key\": a}}}]")),
             "spec.ingress[0].from[0].podSelector.matchLabels: key \"bad key\""),
            (policy_doc(&ing("from: [{podSelector: {matchLabels: {pod: \"-a\"}}}]")),
             "spec.ingress[0].from[0].podSelector.matchLabels: value \"-a\""),
            (policy_doc(&ing("ports: [{protocol: ICMP, port: 1}]")), "spec.ingress[0].ports[0].protocol: unsupported value \"ICMP\""),
            (policy_doc(&ing("ports: [{port: 0}]")), "spec.ingress[0].ports[0].port: 0 must be between 1 and 65535"),
            (policy_doc(&ing("ports: [{port: 65536}]")), "spec.ingress[0].ports[0].port: 65536 must be between"),
            (policy_doc(&ing("ports: [{port: 80, endPort: 79}]")), "spec.ingress[0].ports[0].endPort: 79 must be greater than or equal to port 80"),
            (policy_doc(&ing("ports: [{port: http, endPort: 90}]")), "spec.ingress[0].ports[0].endPort: may not be used with a named port"),
            (policy_doc(&ing("ports: [{endPort: 90}]")), "spec.ingress[0].ports[0].endPort: may not be used without a numeric port"),
            (policy_doc(&ing("ports: [{port: \"Not_A_Name\"}]")), "spec.ingress[0].ports[0].port: \"Not_A_Name\" is neither"),
            (policy_doc(&ing("from: [{ipBlock: {cidr: 10.0.0.0/33}}]")), "spec.ingress[0].from[0].ipBlock.cidr:"),
            (policy_doc(&ing("from: [{ipBlock: {cidr: banana}}]")), "spec.ingress[0].from[0].ipBlock.cidr:"),
            (policy_doc(&ing("from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]")),
             "spec.ingress[0].from[0].ipBlock.except[0]: \"11.0.0.0/16\" must be strictly within \"10.0.0.0/8\""),
            (policy_doc(&ing("from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]")), "spec.ingress[0].from[0].ipBlock.except[0]:"),
            (policy_doc(&ing("from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]")), "spec.ingress[0].from[0]: may not specify more than 1 peer type"),
            (policy_doc(&ing("from: [{}]")), "spec.ingress[0].from[0]: must specify a peer"),
            (policy_doc("  podSelector: {}\n  policyTypes: [Ingress, Sideways]\n"), "spec.policyTypes[1]: unsupported value \"Sideways\""),
            (policy_doc("  podSelector: {}\n  egress:\n  - to: [{podSelector: {matchExpressions: [{key: k, operator: NotIn}]}}]\n"),
             "spec.egress[0].to[0].podSelector.matchExpressions[0].values: must be non-empty"),
            (policy_doc("  podSelector: {matchExpressions: [{key: k, operator: bad}]}\n"), "spec.podSelector.matchExpressions[0].operator: unknown operator"),
            ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: s}\n".into(), "demo.yaml: document 1: unsupported object kind \"ConfigMap\""),
            ("apiVersion: v1\nkind: EndpointSlice\nmetadata: {name: s}\n".into(), "unsupported object kind \"EndpointSlice\" apiVersion \"v1\""),
            ("apiVersion: v2\nkind: Pod\nmetadata: {name: s}\n".into(), "demo.yaml: document 1: unsupported object kind \"Pod\" apiVersion \"v2\""),
            ("metadata: {name: s}\n".into(), "demo.yaml: document 1: unsupported object kind \"\""),
            ("apiVersion: v1\nkind: Pod\nmetadata: {namespace: x}\n".into(), "demo.yaml: document 1: Pod x/<unnamed>: metadata.name: required"),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {\"a b\": c}}\n".into(), "Pod default/a: metadata.labels: key \"a b\""),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.300}\n".into(), "Pod default/a: status.podIP:"),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c, ports: [{containerPort: 0}]}]}\n".into(),
             "Pod default/a: spec.containers[0].ports[0].containerPort: must be between"),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c, ports: [{containerPort: abc}]}]}\n".into(),
             "demo.yaml: document 1: Pod default/a: spec.containers[0].ports[0].containerPort: cannot decode"),
            ("a: [\n".into(), "demo.yaml: document 1: invalid yaml"),
        ];
        for (text, want) in cases {
            let err = parse_documents(&text, "demo.yaml").expect_err(want);
            // As the CLI and the agent print it: the error and its causes.
            let msg = crate::error_chain(&err);
            assert!(msg.contains(want), "got {msg:?}\nwant it to contain {want:?}");
        }
    }

    #[test]
    fn an_error_anywhere_fails_the_whole_file() {
        let text = format!("{GOOD}---\napiVersion: v1\nkind: Widget\nmetadata: {{name: w}}\n");
        let err = parse_documents(&text, "f.yaml").expect_err("widget is unknown");
        assert!(err.to_string().starts_with("f.yaml: document 6: "), "{err}");
    }

    const NODES: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-b, labels: {kubernetes.io/hostname: node-b}}
spec: {podCIDR: 10.244.2.0/24}
status:
  addresses:
  - {type: Hostname, address: node-b}
  - {type: InternalIP, address: "fd00::2"}
  - {type: InternalIP, address: 192.168.0.2}
---
apiVersion: v1
kind: Node
metadata: {name: node-a, namespace: ignored}
spec: {podCIDR: "fd00:1::/64", podCIDRs: ["fd00:1::/64", 10.244.1.7/24]}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: no-cidr}
status: {addresses: [{type: InternalIP, address: 192.168.0.3}]}
---
apiVersion: v1
kind: Node
metadata: {name: v6-only}
spec: {podCIDR: "fd00:4::/64"}
status: {addresses: [{type: InternalIP, address: "fd00::4"}, {type: ExternalIP, address: 203.0.113.4}]}
"#;

    fn node(name: &str, cidr: Option<&str>, ip: Option<[u8; 4]>) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            pod_cidr: cidr.map(|c| c.parse().expect("test cidr")),
            internal_ip: ip.map(Ipv4Addr::from),
        }
    }

    #[test]
    fn nodes_parse_into_their_routing_view() {
        let objs = parse_documents(NODES, "nodes.yaml").expect("parses");
        let refs: Vec<String> = objs.iter().map(|o| o.to_ref().to_string()).collect();
        assert_eq!(refs, ["Node node-b", "Node node-a", "Node no-cidr", "Node v6-only"]);
        assert!(objs.iter().all(|o| o.kind() == Kind::Node && o.namespace().is_none()));
        let c = Cluster::from_objects(objs);
        // In name order; the first IPv4 of each list, host bits cleared; IPv6 ignored.
        assert_eq!(
            c.nodes().cloned().collect::<Vec<_>>(),
            [
                node("no-cidr", None, Some([192, 168, 0, 3])),
                node("node-a", Some("10.244.1.0/24"), Some([192, 168, 0, 1])),
                node("node-b", Some("10.244.2.0/24"), Some([192, 168, 0, 2])),
                node("v6-only", None, None),
            ]
        );
        // Nodes without both addresses are kept, flagged for routing to skip.
        let routes: Vec<_> = c.nodes().filter_map(|n| Some((n.name.as_str(), n.route()?))).collect();
        assert_eq!(
            routes,
            [
                ("node-a", ("10.244.1.0/24".parse().expect("cidr"), Ipv4Addr::new(192, 168, 0, 1))),
                ("node-b", ("10.244.2.0/24".parse().expect("cidr"), Ipv4Addr::new(192, 168, 0, 2))),
            ]
        );
        assert_eq!(c.node("no-cidr").and_then(NodeInfo::unroutable), Some("no IPv4 pod CIDR"));
        assert_eq!(
            c.node("v6-only").and_then(NodeInfo::unroutable),
            Some("no IPv4 pod CIDR and no IPv4 InternalIP")
        );
        assert_eq!(node("x", Some("10.0.0.0/24"), None).unroutable(), Some("no IPv4 InternalIP"));
        assert_eq!(c.node("node-a").and_then(NodeInfo::unroutable), None);
    }

    #[test]
    fn nodes_round_trip_apply_replace_and_delete() {
        let mut c = Cluster::from_objects(parse_documents(&format!("{GOOD}---\n{NODES}"), "all.yaml").expect("parses"));
        let text = c.to_yaml();
        let back = Cluster::from_objects(parse_documents(&text, "dump.yaml").expect("round trip parses"));
        assert_eq!(back, c);
        assert_eq!(back.nodes().count(), 4);

        // A new pod CIDR replaces the old in place.
        let moved = "apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\nspec: {podCIDR: 10.244.9.0/24}\n";
        for o in parse_documents(moved, "m.yaml").expect("parses") {
            c.apply(o);
        }
        assert_eq!(c.node("node-b"), Some(&node("node-b", Some("10.244.9.0/24"), None)));
        // Nodes are not namespaced: they neither create nor follow a namespace.
        assert_eq!(c.namespaces().keys().collect::<Vec<_>>(), ["default", "x", "y"]);
        let node_ref = ObjectRef {
            kind: Kind::Node,
            namespace: None,
            name: "node-b".into(),
        };
        assert_eq!(node_ref.to_string(), "Node node-b");
        assert!(c.delete(&node_ref));
        assert!(!c.delete(&node_ref));
        assert!(c.node("node-b").is_none());
        assert_eq!(c.nodes().count(), 3);
        assert_eq!(c.pods().len(), 2, "deleting a node leaves pods alone");
    }

    #[test]
    fn node_errors_name_the_field() {
        let doc = |body: &str| format!("apiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\n{body}");
        let cases: Vec<(String, &str)> = vec![
            (
                doc("spec: {podCIDR: x}\n"),
                "demo.yaml: document 1: Node n1: spec.podCIDR: \"x\" is not an IPv4 or IPv6 CIDR",
            ),
            (
                doc("spec: {podCIDR: 10.0.0.0/33}\n"),
                "Node n1: spec.podCIDR: \"10.0.0.0/33\" is not an IPv4 or IPv6 CIDR",
            ),
            (
                doc("spec: {podCIDR: 10.0.0.0}\n"),
                "Node n1: spec.podCIDR: \"10.0.0.0\" is not an IPv4 or IPv6 CIDR",
            ),
            (
                doc("spec: {podCIDR: \"fd00::\"}\n"),
                "Node n1: spec.podCIDR: \"fd00::\" is not an IPv4 or IPv6 CIDR",
            ),
            (
                doc("spec: {podCIDRs: [10.0.0.0/24, banana]}\n"),
                "Node n1: spec.podCIDRs[1]: \"banana\" is not an IPv4 or IPv6 CIDR",
            ),
            (
                doc("spec: {podCIDRs: [10.0.0.0/24, 10.1.0.0/24]}\n"),
                "Node n1: spec.podCIDRs: may specify no more than one CIDR for each IP family",
            ),
            (
                doc("spec: {podCIDR: 10.0.0.0/24, podCIDRs: [10.1.0.0/24]}\n"),
                "Node n1: spec.podCIDRs[0]: \"10.1.0.0/24\" must equal spec.podCIDR \"10.0.0.0/24\"",
            ),
            (
                doc("status: {addresses: [{type: Hostname, address: n1}, {type: InternalIP, address: 10.0.0.300}]}\n"),
                "Node n1: status.addresses[1].address: \"10.0.0.300\" is not an ip address",
            ),
            (
                doc("status: {addresses: [{type: ExternalIP, address: nope}]}\n"),
                "Node n1: status.addresses[0].address: \"nope\"",
            ),
            (
                doc("status: {addresses: [{type: InternalIP}]}\n"),
                "Node n1: status.addresses[0].address: \"\" is not an ip address",
            ),
            (doc("spec: {podCIDR: [a]}\n"), "Node n1: spec.podCIDR: cannot decode"),
            (
                "apiVersion: v1\nkind: Node\nmetadata: {labels: {a: b}}\n".into(),
                "Node <unnamed>: metadata.name: required",
            ),
            (
                "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {\"a b\": c}}\n".into(),
                "Node n1: metadata.labels: key \"a b\"",
            ),
            (
                "apiVersion: v2\nkind: Node\nmetadata: {name: s}\n".into(),
                "unsupported object kind \"Node\" apiVersion \"v2\" (expected v1 Namespace, v1 Node,",
            ),
        ];
        for (text, want) in cases {
            let err = parse_documents(&text, "demo.yaml").expect_err(want);
            let msg = crate::error_chain(&err);
            assert!(msg.contains(want), "got {msg:?}\nwant it to contain {want:?}");
        }
    }

    #[test]
    fn empty_text_has_no_objects() {
        assert!(parse_documents("", "e").expect("empty is fine").is_empty());
        assert!(parse_documents("---\n---\n", "e").expect("empty docs are fine").is_empty());
    }
}
