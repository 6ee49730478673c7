//! The Kubernetes source: kube-rs watchers on Pods (all namespaces), Namespaces,
//! NetworkPolicies, Nodes, Services and EndpointSlices feed stores that [`KubeSource::poll`] turns into a [`Cluster`];
//! this node's own Node also gives its pod CIDR ([`Source::pod_cidr`]).
//!
//! Each watcher lists, then watches from the list's resourceVersion with bookmarks; on a
//! `410 Gone` it re-lists by itself, on any other error it backs off (client-go's schedule:
//! 0.8 s doubling to 30 s, with jitter) and resumes. Stores are replaced only by a completed
//! list and are never cleared on error, so while the API server is unreachable the agent
//! keeps enforcing the last model it had.
//!
//! Watchers receive `DynamicObject`s and decode each object on its own: one object the agent
//! cannot decode is logged with its name and skipped, and never fails a whole list.
//!
//! The first poll after the first sync delivers the whole model; after that each watch event
//! that changes a store queues a change (a re-list queues the difference it found), so the
//! agent updates its model in place instead of rebuilding it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::model::selector::FieldError;
use crate::model::{self, Change, Cluster, Interner, Kind, Object, ObjectRef, PodInfo};
use crate::source::{Source, SourceError, SourceUpdate};

/// Builds a client from `kubeconfig`, or else as `kubectl` would: `KUBECONFIG` or
/// `~/.kube/config`, then the in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, SourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| config_error(Some(path), e))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| config_error(Some(path), e))?
        }
        None => kube::Config::infer().await.map_err(|e| config_error(None, e))?,
    };
    kube::Client::try_from(config).map_err(SourceError::KubeClient)
}

fn config_error(path: Option<&Path>, e: impl std::error::Error + Send + Sync + 'static) -> SourceError {
    SourceError::KubeConfig {
        kubeconfig: path.map(Path::to_path_buf),
        source: Box::new(e),
    }
}

/// Tuning for the watchers; the defaults suit a real API server.
#[derive(Clone, Debug)]
pub struct KubeSourceOptions {
    /// Server-side watch timeout; the client also gives up on a watch that stays silent
    /// 5 s longer than this (a stalled stream) and resumes it from the last resourceVersion.
    pub watch_timeout: Duration,
}

impl Default for KubeSourceOptions {
    fn default() -> Self {
        // client-go's default range is 5-10 minutes; kube-rs uses 290 s.
        KubeSourceOptions {
            watch_timeout: Duration::from_secs(290),
        }
    }
}

/// The kinds this source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Watched {
    Namespace,
    Pod,
    NetworkPolicy,
    Node,
    Service,
    EndpointSlice,
}

const WATCHED: [Watched; 6] = [
    Watched::Namespace,
    Watched::Pod,
    Watched::NetworkPolicy,
    Watched::Node,
    Watched::Service,
    Watched::EndpointSlice,
];

impl Watched {
    fn api_resource(self) -> ApiResource {
        match self {
            Watched::Namespace => ApiResource::erase::<Namespace>(&()),
            Watched::Pod => ApiResource::erase::<Pod>(&()),
            Watched::NetworkPolicy => ApiResource::erase::<NetworkPolicy>(&()),
            Watched::Node => ApiResource::erase::<Node>(&()),
            Watched::Service => ApiResource::erase::<Service>(&()),
            Watched::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
        }
    }
}

impl Watched {
    fn kind(self) -> Kind {
        match self {
            Watched::Namespace => Kind::Namespace,
            Watched::Pod => Kind::Pod,
            Watched::NetworkPolicy => Kind::NetworkPolicy,
            Watched::Node => Kind::Node,
            Watched::Service => Kind::Service,
            Watched::EndpointSlice => Kind::EndpointSlice,
        }
    }

    /// The model's name for the object stored under `key`.
    fn object_ref(self, (namespace, name): &Key) -> ObjectRef {
        ObjectRef {
            kind: self.kind(),
            namespace: match self {
                Watched::Namespace | Watched::Node => None,
                _ => Some(namespace.clone()),
            },
            name: name.clone(),
        }
    }
}

impl fmt::Display for Watched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Watched::Namespace => "Namespace",
            Watched::Pod => "Pod",
            Watched::NetworkPolicy => "NetworkPolicy",
            Watched::Node => "Node",
            Watched::Service => "Service",
            Watched::EndpointSlice => "EndpointSlice",
        })
    }
}

/// Why one API object was left out of the model.
#[derive(Debug, thiserror::Error)]
enum ObjectError {
    /// The object does not decode as its kind.
    #[error("{object}: {field}: cannot decode")]
    Decode {
        object: String,
        field: String,
        #[source]
        source: serde_json::Error,
    },
    /// The object decodes but fails validation even without its rules.
    #[error("{object}: {source}")]
    Invalid {
        object: String,
        #[source]
        source: FieldError,
    },
}

/// (namespace, name); the namespace is empty for cluster-scoped kinds.
type Key = (String, String);

#[derive(Debug, Default)]
struct KindStore {
    /// Objects reduced to the fields the model reads.
    items: BTreeMap<Key, Object>,
    /// Objects of a list in progress; they replace `items` only once the list completes.
    listing: Option<BTreeMap<Key, Object>>,
    synced: bool,
}

#[derive(Debug, Default)]
struct Stores {
    kinds: BTreeMap<Watched, KindStore>,
    /// Bumped on every change of the model.
    generation: u64,
    /// What changed since the last poll, the last change of each object only (the model
    /// treats objects one by one, so their order does not matter).
    pending: BTreeMap<ObjectRef, Option<Object>>,
    /// Shares the stored pods' label sets, node names and port lists.
    interner: Interner,
}

impl Stores {
    /// Applies one watch event; true when the model or the sync state changed.
    fn apply(&mut self, kind: Watched, event: Event<DynamicObject>) -> bool {
        let store = self.kinds.entry(kind).or_default();
        let interner = &mut self.interner;
        let mut changes: Vec<(Key, Option<Object>)> = Vec::new();
        let changed = match event {
            Event::Init => {
                store.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(obj) => {
                let key = key_of(&obj);
                if let Some(mut item) = convert(kind, obj) {
                    intern(interner, &mut item);
                    store.listing.get_or_insert_with(BTreeMap::new).insert(key, item);
                }
                false
            }
            Event::InitDone => {
                let listed = store.listing.take().unwrap_or_default();
                // A re-list delivers what it found different, as changes.
                for key in store.items.keys() {
                    if !listed.contains_key(key) {
                        changes.push((key.clone(), None));
                    }
                }
                for (key, item) in &listed {
                    if store.items.get(key) != Some(item) {
                        changes.push((key.clone(), Some(item.clone())));
                    }
                }
                let changed = !store.synced || !changes.is_empty();
                for old in std::mem::replace(&mut store.items, listed).into_values() {
                    release(interner, old);
                }
                store.synced = true;
                changed
            }
            Event::Apply(obj) => {
                let key = key_of(&obj);
                match convert(kind, obj) {
                    Some(item) if store.items.get(&key) == Some(&item) => false,
                    Some(mut item) => {
                        intern(interner, &mut item);
                        changes.push((key.clone(), Some(item.clone())));
                        if let Some(old) = store.items.insert(key, item) {
                            release(interner, old);
                        }
                        true
                    }
                    None => remove(store, interner, &key, &mut changes),
                }
            }
            Event::Delete(obj) => remove(store, interner, &key_of(&obj), &mut changes),
        };
        for (key, item) in changes {
            self.pending.insert(kind.object_ref(&key), item);
        }
        if changed {
            self.generation += 1;
        }
        changed
    }

    /// The changes queued since the last call.
    fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(r, item)| match item {
                Some(object) => Change::Apply(Box::new(object)),
                None => Change::Delete(r),
            })
            .collect()
    }

    fn synced(&self) -> bool {
        WATCHED.iter().all(|k| self.kinds.get(k).is_some_and(|s| s.synced))
    }

    fn cluster(&self) -> Cluster {
        // Namespaces first, so a pod never creates a label-less stand-in for its namespace.
        let objects = [
            Watched::Namespace,
            Watched::Node,
            Watched::Pod,
            Watched::NetworkPolicy,
            Watched::Service,
            Watched::EndpointSlice,
        ]
        .iter()
        .filter_map(|k| self.kinds.get(k))
        .flat_map(|s| s.items.values())
        .cloned();
        Cluster::from_objects(objects)
    }

    /// The pod CIDR of the Node named `node_name`.
    fn pod_cidr(&self, node_name: &str) -> Option<Ipv4Network> {
        match self.kinds.get(&Watched::Node)?.items.get(&(String::new(), node_name.to_string()))? {
            Object::Node(node) => model::node_pod_cidr(node),
            _ => None,
        }
    }
}

/// Removes the object stored under `key`, queueing its deletion; true when it was there.
fn remove(store: &mut KindStore, interner: &mut Interner, key: &Key, changes: &mut Vec<(Key, Option<Object>)>) -> bool {
    match store.items.remove(key) {
        Some(old) => {
            release(interner, old);
            changes.push((key.clone(), None));
            true
        }
        None => false,
    }
}

fn intern(interner: &mut Interner, item: &mut Object) {
    if let Object::Pod(pod) = item {
        interner.intern(pod);
    }
}

fn release(interner: &mut Interner, item: Object) {
    if let Object::Pod(pod) = item {
        interner.release(pod);
    }
}

fn key_of(obj: &DynamicObject) -> Key {
    (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

/// Decodes and reduces one object; `None` (logged when it is an error) leaves it out.
fn convert(kind: Watched, obj: DynamicObject) -> Option<Object> {
    let object = match &obj.metadata.namespace {
        Some(ns) => format!("{kind} {ns}/{}", obj.metadata.name.as_deref().unwrap_or("<unnamed>")),
        None => format!("{kind} {}", obj.metadata.name.as_deref().unwrap_or("<unnamed>")),
    };
    match decode(kind, obj, &object) {
        Ok(item) => item,
        Err(e) => {
            tracing::warn!(object = %object, error = %crate::error_chain(&e), "skipping an api object the agent cannot use");
            None
        }
    }
}

fn decode(kind: Watched, obj: DynamicObject, object: &str) -> Result<Option<Object>, ObjectError> {
    let decode_err = |field: String, source| ObjectError::Decode {
        object: object.to_string(),
        field,
        source,
    };
    let value = serde_json::to_value(&obj).map_err(|e| decode_err(".".into(), e))?;
    fn typed<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, serde_path_to_error::Error<serde_json::Error>> {
        serde_path_to_error::deserialize(value)
    }
    let path_err = |e: serde_path_to_error::Error<serde_json::Error>| decode_err(e.path().to_string(), e.into_inner());
    Ok(match kind {
        Watched::Namespace => {
            let ns: Namespace = typed(value).map_err(path_err)?;
            Some(Object::Namespace(Namespace {
                metadata: slim_meta(ns.metadata),
                ..Namespace::default()
            }))
        }
        Watched::Pod => slim_pod(&typed(value).map_err(path_err)?).map(Object::Pod),
        Watched::NetworkPolicy => Some(Object::NetworkPolicy(enforceable_policy(typed(value).map_err(path_err)?, object)?)),
        Watched::Node => Some(Object::Node(slim_node(&typed(value).map_err(path_err)?))),
        Watched::Service => Some(Object::Service(slim_service(&typed(value).map_err(path_err)?))),
        Watched::EndpointSlice => slim_endpoint_slice(&typed(value).map_err(path_err)?).map(Object::EndpointSlice),
    })
}

/// Name, namespace, labels and Bulkhead's own annotations (audit mode): what identities,
/// selectors and the compiler read. Dropping the rest (resourceVersion, managedFields, other
/// annotations) makes a no-op update compare equal.
fn slim_meta(meta: ObjectMeta) -> ObjectMeta {
    let annotations: BTreeMap<String, String> = meta
        .annotations
        .into_iter()
        .flatten()
        .filter(|(k, _)| k == model::POLICY_AUDIT_ANNOTATION || k == model::NAMESPACE_AUDIT_ANNOTATION)
        .collect();
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        labels: meta.labels,
        annotations: (!annotations.is_empty()).then_some(annotations),
        ..ObjectMeta::default()
    }
}

/// A pod reduced to labels, node, container ports and its IPv4 address (the model's
/// [`PodInfo`]); `None` for pods that are no endpoint: finished pods (their IP may already
/// belong to a new pod) and host-network pods (their IP is the node's; NetworkPolicy leaves
/// them undefined).
fn slim_pod(pod: &Pod) -> Option<PodInfo> {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    if spec.and_then(|s| s.host_network) == Some(true) || matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    // Dual-stack pods list both families; the datapath is IPv4.
    let ipv4 = status
        .into_iter()
        .flat_map(|s| s.pod_ips.iter().flatten().map(|p| p.ip.as_str()).chain(s.pod_ip.as_deref()))
        .find_map(|ip| ip.parse::<std::net::Ipv4Addr>().ok());
    let mut info = PodInfo::from_pod(pod);
    info.ipv4 = ipv4;
    Some(info)
}

/// The policy as is when the agent can enforce all of it; otherwise (an IPv6 ipBlock, a
/// protocol the datapath lacks) the policy without its rules, so the pods it selects stay
/// isolated for its policy types and none of its rules is half-applied. Skipping the policy
/// instead would open those pods: failing closed is the datapath's rule everywhere.
fn enforceable_policy(np: NetworkPolicy, object: &str) -> Result<NetworkPolicy, ObjectError> {
    let np = NetworkPolicy {
        metadata: slim_meta(np.metadata),
        spec: np.spec,
    };
    let Err(error) = model::validate_network_policy(&np) else {
        return Ok(np);
    };
    let spec = np.spec.clone().unwrap_or_default();
    let policy_types = match spec.policy_types.clone().filter(|t| !t.is_empty()) {
        Some(types) => types,
        None => {
            let mut types = vec!["Ingress".to_string()];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                types.push("Egress".to_string());
            }
            types
        }
    };
    let isolating = NetworkPolicy {
        metadata: np.metadata.clone(),
        spec: Some(NetworkPolicySpec {
            pod_selector: spec.pod_selector,
            policy_types: Some(policy_types),
            ingress: None,
            egress: None,
        }),
    };
    match model::validate_network_policy(&isolating) {
        Ok(()) => {
            tracing::warn!(
                object = %object,
                error = %error,
                "cannot enforce this policy's rules; the pods it selects are isolated without them"
            );
            Ok(isolating)
        }
        Err(_) => Err(ObjectError::Invalid {
            object: object.to_string(),
            source: error,
        }),
    }
}

/// A node reduced to its name, first IPv4 pod CIDR and first IPv4 InternalIP: what routing
/// and this node's IPAM read. Dropping the rest (conditions, heartbeats, images, labels)
/// makes the frequent status updates compare equal, so they wake nothing.
fn slim_node(node: &Node) -> Node {
    model::NodeInfo::from_node(node).to_node()
}

/// A Service reduced to its ClusterIP, selector, ports and session affinity: what the
/// service table reads. Status (load balancer ingress) and metadata churn compare equal.
fn slim_service(svc: &Service) -> Service {
    model::ServiceInfo::from_service(svc).to_service()
}

/// An EndpointSlice reduced to its Service, endpoints (first address, conditions, node,
/// pod) and ports; `None` for IPv6 and FQDN slices, which the IPv4 datapath has no use for
/// (a dual-stack Service has one slice per family, so this is no error).
fn slim_endpoint_slice(slice: &EndpointSlice) -> Option<EndpointSlice> {
    model::EndpointSliceInfo::from_slice(slice).map(|s| s.to_endpoint_slice())
}

/// A [`Source`] fed by Kubernetes watchers running on the agent's tokio runtime.
pub struct KubeSource {
    /// This node's name: whose pod CIDR [`Source::pod_cidr`] reports.
    node_name: String,
    stores: Arc<Mutex<Stores>>,
    failures: Arc<AtomicU64>,
    /// Signalled by the watchers on every change of the stores.
    changes: Arc<Notify>,
    /// The generation `poll` last returned.
    served: Option<u64>,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSource")
            .field("synced", &self.synced())
            .field("served", &self.served)
            .finish_non_exhaustive()
    }
}

fn lock(stores: &Mutex<Stores>) -> MutexGuard<'_, Stores> {
    // A panicking event handler leaves the stores consistent (each event is applied whole).
    stores.lock().unwrap_or_else(PoisonError::into_inner)
}

impl KubeSource {
    /// Starts the watchers (every node's included) for the agent of `node_name` on the
    /// current tokio runtime.
    ///
    /// Must be called from within a runtime (`Runtime::enter` or an async context).
    pub fn start(client: kube::Client, node_name: &str, options: KubeSourceOptions) -> Self {
        let stores = Arc::new(Mutex::new(Stores::default()));
        let failures = Arc::new(AtomicU64::new(0));
        let changes = Arc::new(Notify::new());
        let timeout = u32::try_from(options.watch_timeout.as_secs()).unwrap_or(u32::MAX).max(1);
        let tasks = WATCHED
            .iter()
            .map(|&kind| {
                let api = Api::<DynamicObject>::all_with(client.clone(), &kind.api_resource());
                let config = watcher::Config::default().timeout(timeout);
                tokio::spawn(watch(kind, api, config, stores.clone(), failures.clone(), changes.clone()))
            })
            .collect();
        KubeSource {
            node_name: node_name.to_string(),
            stores,
            failures,
            changes,
            served: None,
            tasks,
        }
    }

    /// Watch errors so far (each one is followed by a backoff and a retry).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

async fn watch(
    kind: Watched,
    api: Api<DynamicObject>,
    config: watcher::Config,
    stores: Arc<Mutex<Stores>>,
    failures: Arc<AtomicU64>,
    changes: Arc<Notify>,
) {
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                let changed = lock(&stores).apply(kind, event);
                if changed {
                    // A stored permit when the agent is busy: a change is never missed.
                    changes.notify_one();
                }
            }
            Err(e) => {
                failures.fetch_add(1, Ordering::Relaxed);
                // The watcher recovers by itself (re-list on 410, resume otherwise) after
                // the backoff; the stores keep the last state meanwhile.
                tracing::warn!(kind = %kind, error = %crate::error_chain(&e), "kubernetes watch failed; retrying");
            }
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Source for KubeSource {
    fn poll(&mut self, _force: bool) -> Result<Option<SourceUpdate>, SourceError> {
        let mut stores = lock(&self.stores);
        if !stores.synced() {
            return Ok(None);
        }
        let first = self.served.is_none();
        self.served = Some(stores.generation);
        let changes = stores.take_changes();
        if first {
            return Ok(Some(SourceUpdate::Snapshot(Box::new(stores.cluster()))));
        }
        Ok((!changes.is_empty()).then_some(SourceUpdate::Changes(changes)))
    }

    fn synced(&self) -> bool {
        lock(&self.stores).synced()
    }

    fn pod_cidr(&self) -> Option<Ipv4Network> {
        lock(&self.stores).pod_cidr(&self.node_name)
    }

    fn failures(&self) -> u64 {
        KubeSource::failures(self)
    }

    fn changes(&self) -> Option<Arc<Notify>> {
        Some(self.changes.clone())
    }
}

/// Where the agent publishes this node's pod CIDR for the CNI plugin's IPAM: one line, the
/// CIDR, in the state directory.
pub fn pod_cidr_path(state_dir: &Path) -> PathBuf {
    state_dir.join(bulkhead_cni::config::POD_CIDR_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(name: &str, labels: &[(&str, &str)]) -> DynamicObject {
        let mut o = DynamicObject::new(name, &Watched::Namespace.api_resource());
        o.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        o
    }

    /// What `apply` reports is what wakes the agent: every change, and nothing else.
    #[test]
    fn the_stores_report_every_change_of_the_model_and_only_those() {
        let mut s = Stores::default();
        let kind = Watched::Namespace;
        assert!(!s.apply(kind, Event::Init));
        assert!(!s.apply(kind, Event::InitApply(namespace("x", &[]))));
        assert!(s.apply(kind, Event::InitDone), "the first listing is a change");
        assert!(!s.apply(kind, Event::Apply(namespace("x", &[]))));
        assert!(s.apply(kind, Event::Apply(namespace("x", &[("team", "a")]))));
        assert!(s.apply(kind, Event::Delete(namespace("x", &[]))));
        assert!(!s.apply(kind, Event::Delete(namespace("x", &[]))));
        // A relist that finds what the store holds changes nothing.
        assert!(!s.apply(kind, Event::Init));
        assert!(!s.apply(kind, Event::InitDone));
    }

    /// Watch events queue changes, the last one of each object; a re-list queues what it
    /// found different.
    #[test]
    fn watch_events_become_changes() {
        let mut s = Stores::default();
        let kind = Watched::Namespace;
        let ns = |name: &str| {
            Some(ObjectRef {
                kind: Kind::Namespace,
                namespace: None,
                name: name.into(),
            })
        };
        let refs = |s: &mut Stores| -> Vec<(String, bool)> {
            s.take_changes()
                .iter()
                .map(|c| (c.object_ref().name, matches!(c, Change::Apply(_))))
                .collect()
        };
        s.apply(kind, Event::Init);
        s.apply(kind, Event::InitApply(namespace("x", &[])));
        s.apply(kind, Event::InitApply(namespace("y", &[])));
        s.apply(kind, Event::InitDone);
        assert_eq!(refs(&mut s), [("x".to_string(), true), ("y".to_string(), true)]);
        s.apply(kind, Event::Apply(namespace("x", &[])));
        assert!(refs(&mut s).is_empty(), "no change, nothing queued");
        s.apply(kind, Event::Apply(namespace("x", &[("team", "a")])));
        s.apply(kind, Event::Apply(namespace("x", &[("team", "b")])));
        s.apply(kind, Event::Delete(namespace("y", &[])));
        let changes = s.take_changes();
        assert_eq!(changes.len(), 2);
        let Change::Apply(object) = &changes[0] else {
            panic!("{changes:?}");
        };
        let Object::Namespace(x) = &**object else {
            panic!("{object:?}");
        };
        assert_eq!(
            x.metadata.labels.as_ref().and_then(|l| l.get("team")).map(String::as_str),
            Some("b")
        );
        assert_eq!(changes[1], Change::Delete(ns("y").expect("ref")));
        // A re-list that lost x and found z.
        s.apply(kind, Event::Init);
        s.apply(kind, Event::InitApply(namespace("z", &[])));
        s.apply(kind, Event::InitDone);
        assert_eq!(refs(&mut s), [("x".to_string(), false), ("z".to_string(), true)]);
    }

    /// Pods reach the model slimmed to [`PodInfo`]; finished and host-network pods are none.
    #[test]
    fn pods_are_slimmed_and_finished_ones_left_out() {
        let pod = |phase: &str, host: bool| {
            object(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "a", "namespace": "x", "labels": {"app": "web"}, "resourceVersion": "7"},
                "spec": {"nodeName": "n1", "hostNetwork": host, "containers": [{"name": "c", "image": "i",
                         "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"phase": phase, "podIP": "fd00::5", "podIPs": [{"ip": "fd00::5"}, {"ip": "10.244.1.5"}]},
            }))
        };
        let mut s = Stores::default();
        s.apply(Watched::Pod, Event::Init);
        s.apply(Watched::Pod, Event::InitDone);
        assert!(s.apply(Watched::Pod, Event::Apply(pod("Running", false))));
        let Some(Change::Apply(object)) = s.take_changes().pop() else {
            panic!("a pod change");
        };
        let Object::Pod(info) = *object else {
            panic!("a pod change");
        };
        assert_eq!(info.ipv4, Some(std::net::Ipv4Addr::new(10, 244, 1, 5)));
        assert_eq!(model::named_ports(&info, "http", "TCP"), [8080]);
        assert_eq!(info.node.as_deref(), Some("n1"));
        assert!(
            s.apply(Watched::Pod, Event::Apply(pod("Succeeded", false))),
            "a finished pod is gone"
        );
        assert!(
            !s.apply(Watched::Pod, Event::Apply(pod("Running", true))),
            "host network: no endpoint"
        );
    }

    /// A Node as the API server sends it; `version` (a digit) moves its resourceVersion and
    /// heartbeat.
    fn node(name: &str, cidrs: &[&str], addresses: &[(&str, &str)], version: &str) -> DynamicObject {
        let value = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "resourceVersion": version, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"podCIDRs": cidrs},
            "status": {
                "addresses": addresses.iter().map(|(t, a)| serde_json::json!({"type": t, "address": a})).collect::<Vec<_>>(),
                "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": format!("2026-01-10T09:0{version}:00Z")}],
            },
        });
        serde_json::from_value(value).expect("a node object")
    }

    /// Every node reaches the model slimmed to its routing view, and this node's pod CIDR is
    /// found by name among them.
    #[test]
    fn nodes_reach_the_model_and_give_this_nodes_pod_cidr() {
        let mut s = Stores::default();
        let kind = Watched::Node;
        let a = |t: &str| node("node-a", &["fd00:1::/64", "10.244.1.0/24"], &[("InternalIP", "192.168.0.1")], t);
        let b = |cidr: &str, t: &str| node("node-b", &[cidr], &[("InternalIP", "fd00::2"), ("InternalIP", "192.168.0.2")], t);
        assert!(!s.apply(kind, Event::Init));
        assert!(!s.apply(kind, Event::InitApply(b("10.244.2.0/24", "1"))));
        assert!(!s.apply(kind, Event::InitApply(a("1"))));
        assert!(s.apply(kind, Event::InitDone));
        assert_eq!(s.pod_cidr("node-a"), "10.244.1.0/24".parse().ok());
        assert_eq!(s.pod_cidr("node-b"), "10.244.2.0/24".parse().ok());
        assert_eq!(s.pod_cidr("node-z"), None);
        let nodes: Vec<model::NodeInfo> = s.cluster().nodes().cloned().collect();
        let info = |name: &str, cidr: &str, ip: [u8; 4]| model::NodeInfo {
            name: name.into(),
            pod_cidr: cidr.parse().ok(),
            internal_ip: Some(ip.into()),
        };
        assert_eq!(
            nodes,
            [
                info("node-a", "10.244.1.0/24", [192, 168, 0, 1]),
                info("node-b", "10.244.2.0/24", [192, 168, 0, 2])
            ]
        );
        // A heartbeat (status and resourceVersion only) is no change; a new pod CIDR is.
        assert!(!s.apply(kind, Event::Apply(b("10.244.2.0/24", "2"))));
        assert!(s.apply(kind, Event::Apply(b("10.244.9.0/24", "3"))));
        assert_eq!(s.cluster().node("node-b").and_then(|n| n.pod_cidr), "10.244.9.0/24".parse().ok());
        assert!(s.apply(kind, Event::Delete(b("10.244.9.0/24", "4"))));
        assert!(s.cluster().node("node-b").is_none());
        assert_eq!(s.pod_cidr("node-a"), "10.244.1.0/24".parse().ok());
    }

    fn object(value: serde_json::Value) -> DynamicObject {
        serde_json::from_value(value).expect("an api object")
    }

    /// Services and IPv4 EndpointSlices reach the model slimmed: a new resourceVersion or
    /// status is no change, a new endpoint condition is; an IPv6 slice is no object at all.
    #[test]
    fn services_and_endpoint_slices_are_slimmed_and_ipv6_slices_left_out() {
        let svc = |version: &str, affinity: &str| {
            object(serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "x", "resourceVersion": version},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}], "sessionAffinity": affinity},
                "status": {"loadBalancer": {"ingress": [{"ip": format!("203.0.113.{version}")}]}},
            }))
        };
        let slice = |name: &str, family: &str, version: &str, ready: bool| {
            object(serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": "x", "resourceVersion": version,
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": family,
                "endpoints": [{"addresses": ["10.244.1.2"], "conditions": {"ready": ready}}],
                "ports": [{"port": 8080}],
            }))
        };
        let mut s = Stores::default();
        for kind in [Watched::Service, Watched::EndpointSlice] {
            assert!(!s.apply(kind, Event::Init));
            assert!(s.apply(kind, Event::InitDone));
        }
        assert!(s.apply(Watched::Service, Event::Apply(svc("1", "None"))));
        assert!(!s.apply(Watched::Service, Event::Apply(svc("2", "None"))));
        assert!(s.apply(Watched::Service, Event::Apply(svc("3", "ClientIP"))));
        assert!(s.apply(Watched::EndpointSlice, Event::Apply(slice("web-1", "IPv4", "1", true))));
        assert!(!s.apply(Watched::EndpointSlice, Event::Apply(slice("web-1", "IPv4", "2", true))));
        assert!(s.apply(Watched::EndpointSlice, Event::Apply(slice("web-1", "IPv4", "3", false))));
        assert!(!s.apply(Watched::EndpointSlice, Event::Apply(slice("web-2", "IPv6", "1", true))));
        let c = s.cluster();
        assert_eq!(
            c.service("x", "web").map(|s| s.session_affinity),
            Some(model::SessionAffinity::ClientIp { timeout_seconds: 10_800 })
        );
        let slices: Vec<_> = c
            .endpoint_slices_of("x", "web")
            .map(|s| (s.name.as_str(), s.endpoints[0].ready))
            .collect();
        assert_eq!(slices, [("web-1", false)]);
    }
}
