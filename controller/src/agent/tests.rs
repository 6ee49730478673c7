//! The agent's failure paths, against in-memory maps, links, registry and source.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_api::{code, EndpointRef, EndpointSpec, Response};
use bulkhead_common::{Backend, EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, RevNat, ServiceKey, ServiceValue};

use tokio::sync::Notify;

use super::actor::AgentHandle;
use super::core::Agent;
use super::host::{HostLinks, Programs, RegistryStore};
use super::registry::{EndpointRecord, Endpoints};
use super::AgentError;
use crate::datapath::sync::{MapWriter, MapsError, MemoryMaps};
use crate::datapath::{DatapathError, DatapathState};
use crate::flows::{Clock, FlowStore};
use crate::metrics::Metrics;
use crate::model::{parse_documents, Cluster};
use crate::policy::Compiler;
use crate::source::{Source, SourceError, SourceUpdate};

const MODEL: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
status: {podIP: 10.9.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
status: {podIP: 10.9.0.2}
";

const POLICY: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: 80}]
";

fn cluster(extra: &str) -> Cluster {
    let mut objects = parse_documents(MODEL, "model").unwrap();
    objects.extend(parse_documents(extra, "extra").unwrap());
    Cluster::from_objects(objects)
}

/// Maps in memory that fail every write once `writes_left` runs out.
#[derive(Debug, Default)]
struct Maps {
    maps: MemoryMaps,
    writes_left: Option<usize>,
    read_fails: bool,
    attach_fails: bool,
    attached: Vec<String>,
    /// The conntrack reserves asked for, in order (not map writes of the state).
    reserved: Vec<std::ops::RangeInclusive<u32>>,
}

#[derive(Clone, Debug, Default)]
struct FakeDatapath(Arc<Mutex<Maps>>);

impl FakeDatapath {
    fn write(&self, f: impl FnOnce(&mut MemoryMaps)) -> Result<(), MapsError> {
        let mut m = self.0.lock().unwrap();
        match &mut m.writes_left {
            Some(0) => {
                return Err(MapsError::Map {
                    op: "insert",
                    map: "test",
                    source: aya::maps::MapError::KeyNotFound,
                })
            }
            Some(n) => *n -= 1,
            None => {}
        }
        f(&mut m.maps);
        Ok(())
    }
    fn held(&self) -> DatapathState {
        self.0.lock().unwrap().maps.state.clone()
    }
    fn writes(&self) -> usize {
        self.0.lock().unwrap().maps.log.len()
    }
    fn set(&self, f: impl FnOnce(&mut Maps)) {
        f(&mut self.0.lock().unwrap());
    }
}

impl MapWriter for FakeDatapath {
    fn reserve_conntrack(&mut self, ids: std::ops::RangeInclusive<u32>) -> Result<(), MapsError> {
        self.0.lock().unwrap().reserved.push(ids);
        Ok(())
    }
    fn set_endpoint(&mut self, ifindex: u32, value: &EndpointInfo) -> Result<(), MapsError> {
        self.write(|m| drop(m.set_endpoint(ifindex, value)))
    }
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), MapsError> {
        self.write(|m| drop(m.remove_endpoint(ifindex)))
    }
    fn set_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8, value: &IpcacheValue) -> Result<(), MapsError> {
        self.write(|m| drop(m.set_ipcache(addr, prefix_len, value)))
    }
    fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8) -> Result<(), MapsError> {
        self.write(|m| drop(m.remove_ipcache(addr, prefix_len)))
    }
    fn set_policy(&mut self, key: &PolicyKey, prefix_len: u32, value: &PolicyValue) -> Result<(), MapsError> {
        self.write(|m| drop(m.set_policy(key, prefix_len, value)))
    }
    fn remove_policy(&mut self, key: &PolicyKey, prefix_len: u32) -> Result<(), MapsError> {
        self.write(|m| drop(m.remove_policy(key, prefix_len)))
    }
    fn read_state(&self) -> Result<DatapathState, MapsError> {
        let m = self.0.lock().unwrap();
        match m.read_fails {
            true => Err(MapsError::Map {
                op: "iterate",
                map: "test",
                source: aya::maps::MapError::KeyNotFound,
            }),
            false => Ok(m.maps.state.clone()),
        }
    }
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapsError> {
        self.write(|m| drop(m.set_service(key, value)))
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapsError> {
        self.write(|m| drop(m.remove_service(key)))
    }
    fn set_backend(&mut self, id: u32, value: &Backend) -> Result<(), MapsError> {
        self.write(|m| drop(m.set_backend(id, value)))
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), MapsError> {
        self.write(|m| drop(m.remove_backend(id)))
    }
    fn set_rev_nat(&mut self, id: u32, value: &RevNat) -> Result<(), MapsError> {
        self.write(|m| drop(m.set_rev_nat(id, value)))
    }
    fn remove_rev_nat(&mut self, id: u32) -> Result<(), MapsError> {
        self.write(|m| drop(m.remove_rev_nat(id)))
    }
    fn set_quarantine(&mut self, addr: Ipv4Addr, value: u32) -> Result<(), MapsError> {
        self.write(|m| drop(m.set_quarantine(addr, value)))
    }
    fn remove_quarantine(&mut self, addr: Ipv4Addr) -> Result<(), MapsError> {
        self.write(|m| drop(m.remove_quarantine(addr)))
    }
    fn set_quarantine_count(&mut self, count: u32) -> Result<(), MapsError> {
        self.write(|m| drop(m.set_quarantine_count(count)))
    }
}

impl Programs for FakeDatapath {
    fn attach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let mut m = self.0.lock().unwrap();
        if m.attach_fails {
            return Err(DatapathError::Object {
                what: format!("cannot attach to {ifname}"),
            });
        }
        m.attached.push(ifname.to_string());
        Ok(())
    }
    fn flows_lost(&self) -> Result<u64, DatapathError> {
        Ok(0)
    }
}

/// Host links in memory: live ones by name, and the names deleted.
#[derive(Debug, Default)]
struct Links {
    live: BTreeMap<String, u32>,
    deleted: Vec<String>,
    addresses_fail: bool,
}

#[derive(Clone, Debug, Default)]
struct FakeLinks(Arc<Mutex<Links>>);

impl HostLinks for FakeLinks {
    fn addresses(&self) -> Result<Vec<Ipv4Addr>, AgentError> {
        match self.0.lock().unwrap().addresses_fail {
            true => Err(AgentError::Link {
                op: "list addresses",
                source: Box::new(bulkhead_hostnet::netlink::NetlinkError::Connection {
                    netns: "node".into(),
                    source: std::io::Error::from_raw_os_error(libc::ENOBUFS),
                }),
            }),
            false => Ok(vec![Ipv4Addr::new(192, 168, 0, 1)]),
        }
    }
    fn live(&self, names: Vec<String>) -> Result<BTreeMap<String, u32>, AgentError> {
        let links = self.0.lock().unwrap();
        Ok(names.into_iter().filter_map(|n| Some((n.clone(), *links.live.get(&n)?))).collect())
    }
    fn delete(&self, names: Vec<String>) -> Result<(), AgentError> {
        let mut links = self.0.lock().unwrap();
        for name in names {
            links.live.remove(&name);
            links.deleted.push(name);
        }
        Ok(())
    }
}

/// The registry in memory: what was saved last.
#[derive(Clone, Debug, Default)]
struct FakeStore(Arc<Mutex<Option<Vec<EndpointRecord>>>>);

impl FakeStore {
    fn saved(&self) -> Vec<String> {
        let saved = self.0.lock().unwrap();
        saved.iter().flatten().map(|r| r.spec.container_id.clone()).collect()
    }
}

impl RegistryStore for FakeStore {
    fn load(&self) -> Result<Endpoints, AgentError> {
        Ok(Endpoints::new())
    }
    fn save(&mut self, records: &[&EndpointRecord]) -> Result<(), AgentError> {
        *self.0.lock().unwrap() = Some(records.iter().map(|r| (*r).clone()).collect());
        Ok(())
    }
}

/// A source whose model and sync state the test sets.
#[derive(Clone, Debug)]
struct FakeSource {
    cluster: Arc<Mutex<Cluster>>,
    synced: Arc<AtomicBool>,
}

impl Source for FakeSource {
    fn poll(&mut self, _force: bool) -> Result<Option<SourceUpdate>, SourceError> {
        Ok(self
            .synced()
            .then(|| SourceUpdate::Snapshot(Box::new(self.cluster.lock().unwrap().clone()))))
    }
    fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }
}

struct Fixture {
    agent: Agent,
    maps: FakeDatapath,
    links: FakeLinks,
    store: FakeStore,
    source: FakeSource,
    /// The agent's quarantine file lives here.
    dir: Arc<StateDir>,
}

/// A fresh state directory of its own, removed when dropped.
struct StateDir(std::path::PathBuf);

impl StateDir {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("bh-agent-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        StateDir(dir)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixture(synced: bool) -> Fixture {
    fixture_in(synced, Arc::new(StateDir::new()))
}

fn fixture_in(synced: bool, dir: Arc<StateDir>) -> Fixture {
    let maps = FakeDatapath::default();
    let links = FakeLinks::default();
    let store = FakeStore::default();
    let source = FakeSource {
        cluster: Arc::new(Mutex::new(cluster(""))),
        synced: Arc::new(AtomicBool::new(synced)),
    };
    let metrics = Arc::new(Metrics::new().unwrap());
    let agent = Agent {
        node_name: "node".into(),
        source: Box::new(source.clone()),
        cluster: Cluster::new(),
        touched: Default::default(),
        full_sync: true,
        hosts_applied: Vec::new(),
        admitted: Vec::new(),
        compiler: Compiler::new(),
        endpoints: Endpoints::new(),
        applied: DatapathState::default(),
        datapath: Box::new(maps.clone()),
        links: Box::new(links.clone()),
        store: Box::new(store.clone()),
        generation: 0,
        state_dir: std::env::temp_dir(),
        metrics,
        host_addresses: Vec::new(),
        flows: Arc::new(FlowStore::new("node", 16, Clock::now())),
        pod_index: Default::default(),
        ready: false,
        pending: None,
        maps_unknown: false,
        last_source_error: None,
        source_failures: 0,
        ticks: 0,
        pod_cidr: None,
        // Keeps the tests from publishing a pod CIDR file.
        pod_cidr_pinned: true,
        network: super::network::Network::off(),
        pod_mtu_published: None,
        services: super::services::Services::new(true, &DatapathState::default()),
        over_cap_logged: Vec::new(),
        programs_replaced: false,
        quarantine: super::quarantine::Quarantine::load(&dir.0, true).unwrap(),
    };
    let mut f = Fixture {
        agent,
        maps,
        links,
        store,
        source,
        dir,
    };
    f.agent.on_change();
    f
}

fn spec(container: &str, pod: &str, ifindex: u32, network: &str) -> EndpointSpec {
    EndpointSpec {
        container_id: container.into(),
        ifname: "eth0".into(),
        netns: format!("/var/run/netns/{container}"),
        pod_namespace: "x".into(),
        pod_name: pod.into(),
        host_ifname: format!("bh{ifindex}"),
        host_ifindex: ifindex,
        ipv4: if pod == "a" {
            Ipv4Addr::new(10, 9, 0, 1)
        } else {
            Ipv4Addr::new(10, 9, 0, 2)
        },
        mac: "02:00:00:00:00:01".parse().unwrap(),
        network: network.into(),
    }
}

fn reference(container: &str) -> EndpointRef {
    EndpointRef {
        container_id: container.into(),
        ifname: "eth0".into(),
    }
}

fn code_of(response: &Response) -> Option<u32> {
    match response {
        Response::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[test]
fn an_add_whose_map_write_fails_half_way_leaves_the_pod_isolated_and_is_retried() {
    let mut f = fixture(true);
    let writes = f.maps.writes();
    // The policy set compiles to several writes before the endpoint's: fail after one.
    *f.source.cluster.lock().unwrap() = cluster(POLICY);
    f.agent.on_change();
    f.maps.set(|m| m.writes_left = Some(1));
    let response = f.agent.try_add(&spec("c1", "a", 7, "net")).expect("the pod is known");
    assert_eq!(code_of(&response), Some(code::AGENT_REJECTED), "{response:?}");
    assert!(f.maps.writes() > writes, "some writes happened");
    // The endpoint entry goes last: the pod's programs keep dropping everything.
    assert!(!f.maps.held().endpoints.contains_key(&7));
    // What the agent believes is what the maps hold, not old ∪ new.
    assert_eq!(f.agent.applied, f.maps.held());
    assert!(f.agent.endpoints.is_empty() && f.store.saved().is_empty());
    assert!(f.agent.pending.is_some(), "retried by the next refresh");
    assert!(f.agent.metrics.degraded().is_some(), "/healthz reports the failing write");

    f.maps.set(|m| m.writes_left = None);
    f.agent.on_change();
    assert!(f.agent.pending.is_none());
    assert_eq!(f.agent.metrics.degraded(), None);
    assert_eq!(f.agent.applied, f.maps.held());
    assert!(!f.maps.held().endpoints.contains_key(&7));
    let response = f.agent.try_add(&spec("c1", "a", 7, "net")).expect("the pod is known");
    assert!(matches!(response, Response::Ok), "{response:?}");
    assert!(f.maps.held().endpoints.contains_key(&7));
    assert_eq!(f.store.saved(), ["c1"]);
}

#[test]
fn a_model_change_whose_write_fails_is_read_back_and_retried() {
    let mut f = fixture(true);
    assert!(matches!(f.agent.try_add(&spec("c1", "a", 7, "net")), Some(Response::Ok)));
    let before = f.maps.held();
    *f.source.cluster.lock().unwrap() = cluster(POLICY);
    f.maps.set(|m| m.writes_left = Some(1));
    f.agent.on_change();
    assert!(f.agent.pending.is_some());
    assert_ne!(f.maps.held(), before, "one write landed");
    assert_eq!(f.agent.applied, f.maps.held());
    assert!(f.agent.last_source_error.is_some(), "logged once");

    f.maps.set(|m| m.writes_left = None);
    f.agent.on_change();
    assert!(f.agent.pending.is_none() && f.agent.last_source_error.is_none());
    assert_eq!(f.agent.applied, f.maps.held());
    assert!(f.maps.held().policy.len() > before.policy.len());
}

#[test]
fn maps_that_cannot_be_read_back_are_read_before_the_next_sync() {
    let mut f = fixture(true);
    assert!(matches!(f.agent.try_add(&spec("c1", "a", 7, "net")), Some(Response::Ok)));
    *f.source.cluster.lock().unwrap() = cluster(POLICY);
    f.maps.set(|m| {
        m.writes_left = Some(1);
        m.read_fails = true;
    });
    f.agent.on_change();
    assert!(f.agent.maps_unknown && f.agent.pending.is_some());
    // Still unreadable: nothing is written against a guess.
    f.maps.set(|m| m.writes_left = None);
    let writes = f.maps.writes();
    f.agent.on_change();
    assert_eq!(f.maps.writes(), writes);
    f.maps.set(|m| m.read_fails = false);
    f.agent.on_change();
    assert!(!f.agent.maps_unknown && f.agent.pending.is_none());
    assert_eq!(f.agent.applied, f.maps.held());
}

#[test]
fn an_add_whose_attach_fails_is_rejected_and_writes_nothing() {
    let mut f = fixture(true);
    f.maps.set(|m| m.attach_fails = true);
    let writes = f.maps.writes();
    let response = f.agent.try_add(&spec("c1", "a", 7, "net")).expect("the pod is known");
    assert_eq!(code_of(&response), Some(code::AGENT_REJECTED));
    assert_eq!(f.maps.writes(), writes);
    assert!(f.agent.endpoints.is_empty());
}

#[test]
fn gc_keeps_the_endpoints_of_another_network() {
    let mut f = fixture(true);
    f.links
        .0
        .lock()
        .unwrap()
        .live
        .extend([("bh7".to_string(), 7), ("bh8".to_string(), 8)]);
    assert!(matches!(f.agent.try_add(&spec("c1", "a", 7, "one")), Some(Response::Ok)));
    assert!(matches!(f.agent.try_add(&spec("c2", "b", 8, "two")), Some(Response::Ok)));
    let response = f.agent.gc("one", &[]);
    assert!(matches!(response, Response::Ok), "{response:?}");
    assert_eq!(f.store.saved(), ["c2"]);
    assert_eq!(f.links.0.lock().unwrap().deleted, ["bh7"]);
    let held = f.maps.held();
    assert!(!held.endpoints.contains_key(&7) && held.endpoints.contains_key(&8));
    // A valid list keeps its own network's endpoints too.
    assert!(matches!(f.agent.gc("two", &[reference("c2")]), Response::Ok));
    assert_eq!(f.store.saved(), ["c2"]);
}

#[test]
fn before_the_first_sync_nothing_reaches_the_maps() {
    let mut f = fixture(false);
    // An endpoint a previous agent registered.
    f.agent.endpoints.insert(
        ("c0".into(), "eth0".into()),
        EndpointRecord {
            endpoint_id: 1,
            spec: spec("c0", "b", 6, "net"),
        },
    );
    f.agent.on_change();
    f.agent.on_tick();
    assert_eq!(f.maps.writes(), 0);
    assert!(!f.agent.ready);
    // ADD waits, then is told to try again later.
    let add = spec("c1", "a", 7, "net");
    assert!(f.agent.try_add(&add).is_none());
    assert_eq!(code_of(&f.agent.not_yet(&add)), Some(code::TRY_AGAIN_LATER));
    // DEL only updates the registry.
    assert!(matches!(f.agent.del_endpoint(&reference("c0")), Response::Ok));
    assert_eq!(f.maps.writes(), 0);
    assert!(f.store.0.lock().unwrap().as_ref().is_some_and(Vec::is_empty));

    f.source.synced.store(true, Ordering::SeqCst);
    f.agent.on_change();
    assert!(f.agent.ready && f.maps.writes() > 0);
    assert!(matches!(f.agent.try_add(&add), Some(Response::Ok)));
}

#[tokio::test]
async fn a_source_signal_wakes_the_agent_at_once() {
    let f = fixture(true);
    let (source, maps) = (f.source.clone(), f.maps.clone());
    let (agent, _thread) = AgentHandle::spawn(f.agent).unwrap();
    let changes = Arc::new(Notify::new());
    let events = tokio::spawn(super::wake_loop(agent.clone(), Some(changes.clone())));
    // Past the first slow tick, which fires at once.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = agent.call(|a| a.generation).await.unwrap();
    *source.cluster.lock().unwrap() = cluster(POLICY);
    changes.notify_one();
    // Well before the next slow tick.
    let deadline = Instant::now() + Duration::from_millis(500);
    while agent.call(|a| a.generation).await.unwrap() == before {
        assert!(Instant::now() < deadline, "the signal did not wake the agent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(agent.call(|a| a.cluster.policies().len()).await.unwrap(), 1);
    assert_eq!(agent.call(|a| a.applied.clone()).await.unwrap(), maps.held());
    events.abort();
}

#[tokio::test]
async fn requests_are_answered_from_the_agent_thread() {
    let f = fixture(true);
    let (agent, _thread) = AgentHandle::spawn(f.agent).unwrap();
    let status = super::server::dispatch(&agent, bulkhead_api::Request::Status).await;
    assert!(matches!(status, Response::Status(s) if s.ready && s.node_name == "node"));
    let del = super::server::dispatch(&agent, bulkhead_api::Request::DelEndpoint(reference("gone"))).await;
    assert!(matches!(del, Response::Ok), "DEL of an unknown endpoint is done");
    let thread = agent.call(|_| std::thread::current().name().map(str::to_string)).await.unwrap();
    assert_eq!(thread.as_deref(), Some("bulkhead-agent"));
}

const SERVICE: &str = "
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.9.0.2]}]
";

fn service_headers(state: &DatapathState) -> Vec<(Ipv4Addr, u16, u16, u32)> {
    state
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| (Ipv4Addr::from(k.vip), u16::from_be_bytes(k.dport), v.backend_count, v.service_id))
        .collect()
}

#[test]
fn services_reach_the_maps_keep_their_ids_across_a_restart_and_can_be_switched_off() {
    let mut f = fixture(true);
    *f.source.cluster.lock().unwrap() = cluster(SERVICE);
    f.agent.on_change();
    let held = f.maps.held();
    assert_eq!(service_headers(&held), [(Ipv4Addr::new(10, 96, 0, 20), 80, 1, 1)]);
    assert_eq!(held.backends.len(), 1);
    assert_eq!(held.rev_nat.len(), 1);
    assert_eq!(f.agent.applied, held);

    // A restarted agent reads the ids the maps hold: the same table writes nothing.
    f.agent.services = super::services::Services::new(true, &held);
    let writes = f.maps.writes();
    f.agent.reprogram(None).unwrap();
    assert_eq!(f.maps.writes(), writes, "a restart rewrote service entries");

    // `services: false`: the entries go, nothing is translated.
    f.agent.services = super::services::Services::new(false, &held);
    f.agent.reprogram(None).unwrap();
    let held = f.maps.held();
    assert!(held.services.is_empty() && held.backends.is_empty() && held.rev_nat.is_empty());
}

#[test]
fn a_service_write_that_fails_half_way_is_read_back_and_completed() {
    let mut f = fixture(true);
    *f.source.cluster.lock().unwrap() = cluster(SERVICE);
    f.maps.set(|m| m.writes_left = Some(2));
    f.agent.on_change();
    assert!(f.agent.pending.is_some());
    assert_eq!(f.agent.applied, f.maps.held());
    // The header goes last: a half-written Service translates nothing yet.
    assert!(service_headers(&f.maps.held()).is_empty());
    f.maps.set(|m| m.writes_left = None);
    f.agent.on_change();
    assert!(f.agent.pending.is_none());
    assert_eq!(service_headers(&f.maps.held()), [(Ipv4Addr::new(10, 96, 0, 20), 80, 1, 1)]);
}

#[test]
fn node_addresses_that_cannot_be_read_keep_the_last_good_ones() {
    let mut f = fixture(true);
    f.agent.on_tick();
    let host = (Ipv4Addr::new(192, 168, 0, 1), 32);
    assert!(f.maps.held().ipcache.contains_key(&host));
    f.links.0.lock().unwrap().addresses_fail = true;
    for _ in 0..3 {
        f.agent.on_tick();
    }
    assert_eq!(f.agent.host_addresses, [host.0]);
    assert_eq!(
        f.maps.held().ipcache.get(&host).map(|v| v.identity),
        Some(bulkhead_common::identity::HOST),
        "a failed read dropped the node's HOST entry"
    );
}

#[test]
fn a_starting_agent_replaces_the_programs_on_every_registered_veth_after_its_first_sync() {
    let mut f = fixture(true);
    assert!(matches!(f.agent.try_add(&spec("c1", "a", 7, "net")), Some(Response::Ok)));
    assert!(matches!(f.agent.try_add(&spec("c2", "b", 8, "net")), Some(Response::Ok)));
    // A new agent: the veths carry the previous agent's programs until its maps are written.
    f.agent.programs_replaced = false;
    f.maps.set(|m| m.attached.clear());
    f.maps.set(|m| m.writes_left = Some(0));
    *f.source.cluster.lock().unwrap() = cluster(POLICY);
    f.agent.on_change();
    assert!(
        f.maps.0.lock().unwrap().attached.is_empty(),
        "programs swapped before the maps were written"
    );
    f.maps.set(|m| m.writes_left = None);
    f.agent.on_change();
    let mut attached = f.maps.0.lock().unwrap().attached.clone();
    attached.sort();
    assert_eq!(attached, ["bh7", "bh8"]);
    assert!(f.agent.programs_replaced);
    // Once only.
    f.agent.reprogram(None).unwrap();
    assert_eq!(f.maps.0.lock().unwrap().attached.len(), 2);
}

/// Admits `spec` as the socket's ADD does; the receiver gets the answer at the next commit.
fn admit(f: &mut Fixture, spec: &EndpointSpec) -> tokio::sync::oneshot::Receiver<Option<Response>> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    assert!(f.agent.try_admit(spec, reply).is_ok(), "the pod is known");
    answer
}

#[test]
fn a_burst_of_adds_is_programmed_by_one_reprogram_and_answered_after_it() {
    let mut f = fixture(true);
    *f.source.cluster.lock().unwrap() = cluster(POLICY);
    f.agent.on_change();
    let generation = f.agent.generation;
    let mut a = admit(&mut f, &spec("c1", "a", 7, "net"));
    let mut b = admit(&mut f, &spec("c2", "b", 8, "net"));
    // Admitted: the programs are on the veths, nothing is answered or in the maps yet.
    assert_eq!(f.maps.0.lock().unwrap().attached, ["bh7", "bh8"]);
    assert!(a.try_recv().is_err() && b.try_recv().is_err());
    assert!(f.maps.held().endpoints.is_empty());
    f.agent.commit_adds();
    assert!(matches!(a.try_recv(), Ok(Some(Response::Ok))));
    assert!(matches!(b.try_recv(), Ok(Some(Response::Ok))));
    assert_eq!(f.agent.generation, generation + 1, "one reprogram for the burst");
    assert!(f.maps.held().endpoints.contains_key(&7) && f.maps.held().endpoints.contains_key(&8));
    assert_eq!(f.agent.applied, f.maps.held());
    assert_eq!(f.store.saved(), ["c1", "c2"]);
    // Once answered, the next endpoints' conntrack tables are readied (ids 3..=10: the
    // burst took 1 and 2), so a later ADD waits for no table.
    let next = f.agent.endpoints.values().map(|r| r.endpoint_id).max().unwrap() + 1;
    assert_eq!(next, 3);
    assert_eq!(
        f.maps.0.lock().unwrap().reserved,
        [next..=next + super::core::CONNTRACK_RESERVE - 1]
    );
    // Nothing admitted, nothing to refill.
    f.agent.commit_adds();
    assert_eq!(f.maps.0.lock().unwrap().reserved.len(), 1);
}

#[test]
fn a_burst_the_maps_refuse_is_retried_one_by_one_and_each_failure_stays_isolated() {
    let mut f = fixture(true);
    *f.source.cluster.lock().unwrap() = cluster(POLICY);
    f.agent.on_change();
    f.maps.set(|m| m.writes_left = Some(1));
    let mut a = admit(&mut f, &spec("c1", "a", 7, "net"));
    let mut b = admit(&mut f, &spec("c2", "b", 8, "net"));
    f.agent.commit_adds();
    for answer in [a.try_recv(), b.try_recv()] {
        let response = answer.expect("answered").expect("not a wait");
        assert_eq!(code_of(&response), Some(code::AGENT_REJECTED), "{response:?}");
    }
    assert!(f.maps.held().endpoints.is_empty(), "fail closed: no endpoint entry");
    assert!(f.agent.endpoints.is_empty() && f.store.saved().is_empty());
    assert_eq!(f.agent.applied, f.maps.held());

    // The maps take writes again: a retried burst goes in.
    f.maps.set(|m| m.writes_left = None);
    let mut a = admit(&mut f, &spec("c1", "a", 7, "net"));
    let mut b = admit(&mut f, &spec("c2", "b", 8, "net"));
    f.agent.commit_adds();
    assert!(matches!(a.try_recv(), Ok(Some(Response::Ok))));
    assert!(matches!(b.try_recv(), Ok(Some(Response::Ok))));
    assert_eq!(f.agent.applied, f.maps.held());
    assert_eq!(f.store.saved(), ["c1", "c2"]);
}

fn pod(name: &str) -> bulkhead_api::NamespacedName {
    bulkhead_api::NamespacedName::new("x", name)
}

fn quarantine(f: &mut Fixture, name: &str, release: bool) -> Response {
    f.agent.quarantine_request(pod(name), Some("test".into()), release)
}

/// The model, with pod b labelled quarantined when `labelled`.
fn labelled_model(labelled: bool) -> Cluster {
    let text = match labelled {
        true => MODEL.replace("labels: {pod: b}", "labels: {pod: b, bulkhead.io/quarantine: \"true\"}"),
        false => MODEL.to_string(),
    };
    Cluster::from_objects(parse_documents(&text, "model").unwrap())
}

const QUARANTINED: u32 = bulkhead_common::endpoint_flags::QUARANTINED | bulkhead_common::endpoint_flags::QUARANTINE_ALLOW_HOST;

fn quarantined_addresses(f: &Fixture) -> (Vec<Ipv4Addr>, u32) {
    let held = f.maps.held();
    (held.quarantine.keys().copied().collect(), held.quarantine_count)
}

#[test]
fn quarantine_by_command_and_by_label_reaches_the_maps_and_release_restores_them() {
    let mut f = fixture(true);
    assert!(matches!(f.agent.try_add(&spec("c1", "a", 7, "net")), Some(Response::Ok)));
    let plain = f.maps.held().endpoints[&7];
    assert_eq!(plain.flags & QUARANTINED, 0);

    // Another node's pod (b has no endpoint here): its address only.
    assert_eq!(quarantine(&mut f, "b", false), Response::Ok);
    assert_eq!(quarantined_addresses(&f), (vec![Ipv4Addr::new(10, 9, 0, 2)], 1));
    assert_eq!(f.maps.held().endpoints[&7], plain);
    // The local pod: its endpoint flag and its address, in the same answer.
    assert_eq!(quarantine(&mut f, "a", false), Response::Ok);
    assert_eq!(f.maps.held().endpoints[&7].flags, plain.flags | QUARANTINED);
    assert_eq!(
        quarantined_addresses(&f),
        (vec![Ipv4Addr::new(10, 9, 0, 1), Ipv4Addr::new(10, 9, 0, 2)], 2)
    );
    assert_eq!(f.agent.applied, f.maps.held());
    let status = f.agent.status();
    assert_eq!(status.quarantined.keys().collect::<Vec<_>>(), ["x/a", "x/b"]);
    assert_eq!(
        (status.quarantined["x/a"].by.as_str(), status.quarantined["x/a"].reason.as_str()),
        ("command", "test")
    );

    // b also labelled: released by command, it stays quarantined by its label (and says so).
    *f.source.cluster.lock().unwrap() = labelled_model(true);
    f.agent.on_change();
    let refused = quarantine(&mut f, "b", true);
    assert_eq!(code_of(&refused), Some(code::AGENT_REJECTED), "{refused:?}");
    assert!(format!("{refused:?}").contains("bulkhead.io/quarantine"), "{refused:?}");
    assert!(quarantined_addresses(&f).0.contains(&Ipv4Addr::new(10, 9, 0, 2)));
    assert_eq!(f.agent.quarantined_pods()[&pod("b")].by, "label");
    // The label gone, b is released by the next reprogram.
    *f.source.cluster.lock().unwrap() = labelled_model(false);
    f.agent.on_change();
    assert_eq!(quarantined_addresses(&f), (vec![Ipv4Addr::new(10, 9, 0, 1)], 1));

    // Release of a: policy-only enforcement again, nothing left in the quarantine maps.
    assert_eq!(quarantine(&mut f, "a", true), Response::Ok);
    assert_eq!(f.maps.held().endpoints[&7], plain);
    assert_eq!(quarantined_addresses(&f), (vec![], 0));
    assert!(f.agent.quarantined_pods().is_empty());
    assert_eq!(f.agent.applied, f.maps.held());
}

#[test]
fn a_label_alone_quarantines_a_local_pod() {
    let mut f = fixture(true);
    assert!(matches!(f.agent.try_add(&spec("c2", "b", 8, "net")), Some(Response::Ok)));
    *f.source.cluster.lock().unwrap() = labelled_model(true);
    f.agent.on_change();
    assert_eq!(f.maps.held().endpoints[&8].flags & QUARANTINED, QUARANTINED);
    assert_eq!(quarantined_addresses(&f), (vec![Ipv4Addr::new(10, 9, 0, 2)], 1));
    // Nothing was requested: nothing persisted.
    assert!(!f.dir.0.join(super::quarantine::FILE).exists());
}

#[test]
fn requested_quarantines_survive_a_restart_and_an_unreadable_file_is_an_error() {
    let dir = Arc::new(StateDir::new());
    let mut f = fixture_in(true, dir.clone());
    assert_eq!(quarantine(&mut f, "a", false), Response::Ok);
    let since = f.agent.quarantined_pods()[&pod("a")].since;
    drop(f);

    let mut f = fixture_in(true, dir.clone());
    let held = f.agent.quarantined_pods();
    assert_eq!(held.len(), 1);
    assert_eq!((held[&pod("a")].since, held[&pod("a")].reason.as_str()), (since, "test"));
    assert!(matches!(f.agent.try_add(&spec("c1", "a", 7, "net")), Some(Response::Ok)));
    assert_eq!(f.maps.held().endpoints[&7].flags & QUARANTINED, QUARANTINED);
    drop(f);

    std::fs::write(dir.0.join(super::quarantine::FILE), b"{not json").unwrap();
    let err = super::quarantine::Quarantine::load(&dir.0, true).unwrap_err();
    assert!(matches!(err, AgentError::Quarantine { .. }), "{err}");
}

#[test]
fn a_quarantine_whose_map_write_fails_stays_requested_and_is_retried() {
    let mut f = fixture(true);
    assert!(matches!(f.agent.try_add(&spec("c1", "a", 7, "net")), Some(Response::Ok)));
    f.maps.set(|m| m.writes_left = Some(0));
    let response = quarantine(&mut f, "a", false);
    assert_eq!(code_of(&response), Some(code::AGENT_REJECTED), "{response:?}");
    assert!(f.agent.quarantined_pods().contains_key(&pod("a")));
    assert!(f.agent.pending.is_some(), "retried by the next refresh");
    assert_eq!(f.maps.held().endpoints[&7].flags & QUARANTINED, 0);

    f.maps.set(|m| m.writes_left = None);
    f.agent.on_change();
    assert!(f.agent.pending.is_none());
    assert_eq!(f.maps.held().endpoints[&7].flags & QUARANTINED, QUARANTINED);
    assert_eq!(quarantined_addresses(&f), (vec![Ipv4Addr::new(10, 9, 0, 1)], 1));

    // A release the maps refuse leaves the pod quarantined in them until the retry.
    f.maps.set(|m| m.writes_left = Some(0));
    let response = quarantine(&mut f, "a", true);
    assert_eq!(code_of(&response), Some(code::AGENT_REJECTED), "{response:?}");
    assert_eq!(f.maps.held().endpoints[&7].flags & QUARANTINED, QUARANTINED);
    assert_eq!(f.agent.applied, f.maps.held());
    f.maps.set(|m| m.writes_left = None);
    f.agent.on_change();
    assert_eq!(f.maps.held().endpoints[&7].flags & QUARANTINED, 0);
    assert_eq!(quarantined_addresses(&f), (vec![], 0));
}

#[test]
fn a_quarantine_that_cannot_be_persisted_still_reaches_the_maps_and_a_release_does_not_happen() {
    let mut f = fixture(true);
    assert!(matches!(f.agent.try_add(&spec("c1", "a", 7, "net")), Some(Response::Ok)));
    assert_eq!(quarantine(&mut f, "a", false), Response::Ok);
    // The file's place taken by a directory: every atomic write fails.
    let file = f.dir.0.join(super::quarantine::FILE);
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    let response = quarantine(&mut f, "b", false);
    assert_eq!(code_of(&response), Some(code::AGENT_REJECTED), "{response:?}");
    assert!(
        quarantined_addresses(&f).0.contains(&Ipv4Addr::new(10, 9, 0, 2)),
        "in the maps all the same"
    );
    let response = quarantine(&mut f, "a", true);
    assert_eq!(code_of(&response), Some(code::AGENT_REJECTED), "{response:?}");
    assert_eq!(f.maps.held().endpoints[&7].flags & QUARANTINED, QUARANTINED, "not released");
    assert!(f.agent.quarantined_pods().contains_key(&pod("a")));
}

#[test]
fn a_quarantine_before_the_first_sync_is_recorded_and_written_by_it() {
    let mut f = fixture(false);
    let response = quarantine(&mut f, "b", false);
    assert_eq!(code_of(&response), Some(code::TRY_AGAIN_LATER), "{response:?}");
    assert_eq!(quarantined_addresses(&f), (vec![], 0));
    f.source.synced.store(true, Ordering::SeqCst);
    f.agent.on_change();
    assert_eq!(quarantined_addresses(&f), (vec![Ipv4Addr::new(10, 9, 0, 2)], 1));
}

#[test]
fn a_label_present_at_the_first_sync_quarantines_and_a_deleted_pod_leaves_the_maps() {
    let mut f = fixture(false);
    *f.source.cluster.lock().unwrap() = labelled_model(true);
    f.source.synced.store(true, Ordering::SeqCst);
    f.agent.on_change();
    assert_eq!(quarantined_addresses(&f), (vec![Ipv4Addr::new(10, 9, 0, 2)], 1));
    let metrics = f.agent.metrics.encode().unwrap();
    assert!(metrics.contains("bulkhead_quarantined_pods 1"), "{metrics}");
    // The labelled pod deleted: neither its label nor its address is held any more.
    *f.source.cluster.lock().unwrap() = Cluster::from_objects(
        parse_documents(
            &MODEL
                .replace("name: b,", "name: gone-b,")
                .replace("labels: {pod: b}", "labels: {pod: b, bulkhead.io/quarantine: \"x\"}"),
            "model",
        )
        .unwrap(),
    );
    f.agent.on_change();
    assert_eq!(quarantined_addresses(&f), (vec![], 0));
    assert!(f.agent.quarantined_pods().is_empty());
}

/// A forwarded flow from `from` to `to` (pods of x) at second `n`.
fn flow_between(from: &str, to: &str, n: u16) -> bulkhead_api::Flow {
    serde_json::from_value(serde_json::json!({
        "time": format!("2026-11-30T05:00:{n:02}Z"),
        "node": "node",
        "verdict": "FORWARDED",
        "direction": "ingress",
        "protocol": "TCP",
        "source": {"namespace": "x", "pod": from, "ip": "10.9.0.2", "port": 40000 + n, "identity": 256},
        "destination": {"namespace": "x", "pod": to, "ip": "10.9.0.1", "port": 80, "identity": 257},
        "is_reply": false
    }))
    .unwrap()
}

/// A unique directory removed when dropped (also when a test fails).
struct ScratchDir(std::path::PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn forensic_flows(dir: &std::path::Path) -> Arc<FlowStore> {
    let forensics = crate::flows::forensics::ForensicStore::open(dir, Default::default(), None).unwrap();
    Arc::new(FlowStore::new("node", 16, Clock::now()).with_forensics(Arc::new(forensics)))
}

fn bundle_of(response: Response) -> bulkhead_api::ForensicsBundle {
    match response {
        Response::Forensics(b) => *b,
        other => panic!("expected a bundle, got {other:?}"),
    }
}

#[test]
fn a_deleted_pods_flows_and_record_are_kept_and_answered_after_a_restart() {
    let dir = ScratchDir(std::env::temp_dir().join(format!("bh-agent-forensics-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let mut f = fixture(true);
    f.agent.flows = forensic_flows(&dir.0);
    *f.source.cluster.lock().unwrap() = cluster(POLICY);
    f.agent.on_change();
    f.agent
        .flows
        .record_flows_for_tests(vec![flow_between("b", "a", 1), flow_between("a", "b", 2)]);
    let pod_a = bulkhead_api::NamespacedName::new("x", "a");
    let live = bundle_of(f.agent.forensics(&pod_a));
    assert_eq!((live.deleted, live.flows.len()), (None, 2));
    assert_eq!(live.policies, vec![bulkhead_api::NamespacedName::new("x", "allow-b")]);

    // The pod is deleted from the model (a snapshot without it): its flows go to disk.
    let mut without_a = cluster(POLICY);
    without_a.delete(&crate::model::ObjectRef {
        kind: crate::model::Kind::Pod,
        namespace: Some("x".into()),
        name: "a".into(),
    });
    *f.source.cluster.lock().unwrap() = without_a;
    f.agent.on_change();
    let kept = f.agent.flows.forensics().unwrap().read(&pod_a).unwrap().expect("kept on delete");
    assert_eq!(kept.0.labels.get("pod").map(String::as_str), Some("a"));
    assert_eq!(kept.0.ip, Some(Ipv4Addr::new(10, 9, 0, 1)));
    assert_eq!(kept.0.policies, live.policies, "the policies that selected it then");
    assert!(kept.0.deleted.is_some());
    assert_eq!(kept.1.len(), 2);
    // x/b is alive and was not deleted: nothing kept of it.
    assert!(f
        .agent
        .flows
        .forensics()
        .unwrap()
        .read(&bulkhead_api::NamespacedName::new("x", "b"))
        .unwrap()
        .is_none());

    // A restarted agent: an empty history, the same state dir.
    f.agent.flows = forensic_flows(&dir.0);
    let gone = bundle_of(f.agent.forensics(&pod_a));
    assert_eq!(gone.flows, live.flows);
    assert_eq!((gone.labels, gone.policies), (live.labels, live.policies));
    assert!(gone.deleted.is_some());
    let nobody = f.agent.forensics(&bulkhead_api::NamespacedName::new("x", "nobody"));
    assert_eq!(code_of(&nobody), Some(code::UNKNOWN_POD), "{nobody:?}");
}

#[test]
fn a_deleted_pods_record_that_cannot_be_written_is_counted_and_retried_by_the_tick() {
    let dir = ScratchDir(std::env::temp_dir().join(format!("bh-agent-forensics-retry-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let mut f = fixture(true);
    f.agent.flows = forensic_flows(&dir.0);
    f.agent.flows.record_flows_for_tests(vec![flow_between("b", "a", 1)]);
    // The store's directory replaced by a file: writes fail.
    std::fs::remove_dir_all(&dir.0).unwrap();
    std::fs::write(&dir.0, b"in the way").unwrap();
    let mut without_a = cluster("");
    without_a.delete(&crate::model::ObjectRef {
        kind: crate::model::Kind::Pod,
        namespace: Some("x".into()),
        name: "a".into(),
    });
    *f.source.cluster.lock().unwrap() = without_a;
    f.agent.on_change();
    let metrics = f.agent.metrics.encode().unwrap();
    assert!(metrics.contains("bulkhead_errors_total{kind=\"io\"} 1"), "{metrics}");
    let stats = f.agent.flows.forensics().unwrap().stats();
    assert_eq!((stats.pending, stats.errors.get("write")), (1, Some(&1)));
    // Still answered from what waits for the retry.
    let pod_a = bulkhead_api::NamespacedName::new("x", "a");
    assert_eq!(bundle_of(f.agent.forensics(&pod_a)).flows.len(), 1);
    std::fs::remove_file(&dir.0).unwrap();
    f.agent.on_tick();
    assert_eq!(f.agent.flows.forensics().unwrap().stats().pending, 0);
    assert!(dir.0.join(crate::flows::forensics::file_name(&pod_a)).exists());
}

#[test]
fn a_quarantined_pods_flows_are_kept_as_they_come_until_it_is_released() {
    let dir = ScratchDir(std::env::temp_dir().join(format!("bh-agent-quarantine-forensics-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let mut f = fixture(true);
    f.agent.flows = forensic_flows(&dir.0);
    *f.source.cluster.lock().unwrap() = cluster(POLICY);
    f.agent.on_change();
    let store = Arc::clone(f.agent.flows.forensics().unwrap());
    assert!(store.kept().is_empty());
    assert!(matches!(quarantine(&mut f, "b", false), Response::Ok));
    let kept = store.kept();
    assert_eq!(kept.keys().collect::<Vec<_>>(), [&pod("b")], "watched from the quarantine on");
    assert_eq!(kept[&pod("b")].reason, "test");
    // Its flows reach the disk as they are recorded.
    f.agent.flows.record_flows_for_tests(vec![flow_between("a", "b", 3)]);
    let (_, flows) = store.read(&pod("b")).unwrap().expect("a record on disk");
    assert_eq!(flows.len(), 1);
    // A restarted agent's store knows nothing of whom it watched: the first reprogram
    // watches the quarantined pods again.
    f.agent.flows = forensic_flows(&dir.0);
    assert!(f.agent.flows.forensics().unwrap().kept().is_empty());
    f.agent.on_change();
    f.agent.reprogram(None).unwrap();
    assert!(f.agent.flows.forensics().unwrap().kept().contains_key(&pod("b")));
    // Released: no longer watched; what was kept stays.
    assert!(matches!(quarantine(&mut f, "b", true), Response::Ok));
    assert!(f.agent.flows.forensics().unwrap().kept().is_empty());
    assert!(f.agent.flows.forensics().unwrap().read(&pod("b")).unwrap().is_some());
}
