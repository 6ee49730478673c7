//! The Kubernetes source against a fake API server replaying recorded responses
//! (`tests/kube-recorded/`): the real kube client, watcher and backoff, over HTTP/1.1 on
//! loopback; and the real `bulkhead agent` binary against the same server (runs as root:
//! it pins maps under /sys/fs/bpf), once in a network namespace of its own where its routes
//! to the other nodes are read back from the kernel.
#![expect(clippy::unwrap_used, reason = "tests assert by panicking (STYLE 14)")]

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead::datapath::sync::{self, MemoryMaps};
use bulkhead::datapath::Datapath;
use bulkhead::datapath::DatapathState;
use bulkhead::model::{self, Cluster};
use bulkhead::policy::{Compiler, LocalEndpoint};
use bulkhead::services::ServiceTable;
use bulkhead::source::kubernetes::{KubeSource, KubeSourceOptions};
use bulkhead::source::{Source, SourceUpdate};
use bulkhead_api::{AgentStatus, Request, Response};
use bulkhead_common::{direction, endpoint_flags, identity, proto, PolicyKey, POLICY_PREFIX_FULL};
use bulkhead_hostnet::netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
const POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";
const NODES: &str = "/api/v1/nodes";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";

fn recorded(name: &str) -> String {
    let path = format!("{}/tests/kube-recorded/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// One scripted answer of the fake API server.
#[derive(Clone)]
enum Reply {
    /// A complete JSON response.
    Json(u16, String),
    /// A watch stream: these event lines, then the stream stays open and silent (as a
    /// quiet or stalled watch does) until the server goes down.
    Stream(Vec<String>),
    /// The reply, held back until [`FakeApi::release`].
    Held(Box<Reply>),
}

fn list(name: &str) -> Reply {
    Reply::Json(200, recorded(name))
}

fn events(name: &str) -> Reply {
    Reply::Stream(recorded(name).lines().map(str::to_string).collect())
}

fn quiet_watch() -> Reply {
    Reply::Stream(Vec::new())
}

/// The one event of the recorded watch stream `name` of type `kind` about the object
/// `object`, as a stream of its own: to deliver a recording's events one at a time.
fn event(name: &str, kind: &str, object: &str) -> Reply {
    let matching: Vec<String> = recorded(name)
        .lines()
        .filter(|line| {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            event["type"] == kind && event["object"]["metadata"]["name"] == object
        })
        .map(str::to_string)
        .collect();
    assert_eq!(matching.len(), 1, "{kind} {object} in {name}: {matching:?}");
    Reply::Stream(matching)
}

/// Runs `f` on a thread in the network namespace at `netns`, or right here when `None`.
/// Sockets and processes `f` creates stay in that namespace.
fn in_netns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> T + Send) -> T {
    match netns {
        None => f(),
        Some(path) => netns::run_in(path, f).unwrap_or_else(|e| panic!("entering {}: {e}", path.display())),
    }
}

#[derive(Default)]
struct Script {
    /// (path, is watch) → replies; the last one repeats.
    routes: HashMap<(String, bool), (Vec<Reply>, usize)>,
    /// Every request, `list PATH?QUERY` or `watch PATH?QUERY`.
    log: Vec<String>,
}

struct FakeApi {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    down: watch::Sender<bool>,
    released: watch::Sender<bool>,
    /// Bumped to end the open watch streams.
    watches_ended: watch::Sender<u32>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApi {
    /// A server answering the six resources: lists from `lists`, quiet watches, unless
    /// scripted otherwise with [`FakeApi::script`].
    async fn start() -> FakeApi {
        FakeApi::start_in(None).await
    }

    /// As [`FakeApi::start`], listening on loopback in the network namespace at `netns`
    /// (the host's when `None`): a socket keeps the namespace it was created in, so only
    /// clients in that namespace reach it.
    async fn start_in(netns: Option<&Path>) -> FakeApi {
        let listener = in_netns(netns, || std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(Script::default()));
        let (down, _) = watch::channel(false);
        let (released, _) = watch::channel(false);
        let (watches_ended, _) = watch::channel(0);
        let task = {
            let script = script.clone();
            let down = down.clone();
            let released = released.clone();
            let watches_ended = watches_ended.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    let signals = (down.subscribe(), released.subscribe(), watches_ended.subscribe());
                    tokio::spawn(serve(stream, script.clone(), signals));
                }
            })
        };
        let api = FakeApi {
            addr,
            script,
            down,
            released,
            watches_ended,
            task,
        };
        api.script(NAMESPACES, false, vec![list("namespaces-list.json")]);
        api.script(PODS, false, vec![list("pods-list.json")]);
        api.script(POLICIES, false, vec![list("networkpolicies-list.json")]);
        api.script(NODES, false, vec![list("nodes-list.json")]);
        api.script(SERVICES, false, vec![list("services-list.json")]);
        api.script(SLICES, false, vec![list("endpointslices-list.json")]);
        for path in [NAMESPACES, PODS, POLICIES, NODES, SERVICES, SLICES] {
            api.script(path, true, vec![quiet_watch()]);
        }
        api
    }

    fn script(&self, path: &str, watch: bool, replies: Vec<Reply>) {
        self.script.lock().unwrap().routes.insert((path.to_string(), watch), (replies, 0));
    }

    fn requests(&self, prefix: &str) -> Vec<String> {
        let script = self.script.lock().unwrap();
        script.log.iter().filter(|l| l.starts_with(prefix)).cloned().collect()
    }

    fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    fn release(&self) {
        self.released.send_replace(true);
    }

    /// Ends every open watch stream, as an API server does at its watch timeout: clients
    /// watch again from the last resourceVersion they saw, and get what is scripted now.
    fn end_watches(&self) {
        self.watches_ended.send_modify(|n| *n += 1);
    }

    fn source(&self, options: KubeSourceOptions) -> Tracked {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        Tracked {
            source: KubeSource::start(client, "node-a", options),
            cluster: Cluster::new(),
        }
    }
}

/// The source and the model built from what it delivers, as the agent keeps it: the first
/// snapshot, then each change applied in place.
struct Tracked {
    source: KubeSource,
    cluster: Cluster,
}

impl Tracked {
    /// The model after the source's update, when it delivered one.
    fn poll(&mut self, force: bool) -> Result<Option<Cluster>, bulkhead::source::SourceError> {
        Ok(self.source.poll(force)?.map(|update| {
            match update {
                SourceUpdate::Snapshot(cluster) => self.cluster = *cluster,
                SourceUpdate::Changes(changes) => {
                    for change in changes {
                        self.cluster.apply_change(change);
                    }
                }
            }
            self.cluster.clone()
        }))
    }
}

impl std::ops::Deref for Tracked {
    type Target = KubeSource;
    fn deref(&self) -> &KubeSource {
        &self.source
    }
}

/// What a connection waits for: the server going down, held replies released, watch
/// streams ended.
type Signals = (watch::Receiver<bool>, watch::Receiver<bool>, watch::Receiver<u32>);

async fn serve(mut stream: TcpStream, script: Arc<Mutex<Script>>, (mut down, mut released, mut watches_ended): Signals) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    if *down.borrow() {
        // A lost API server: the connection closes without an answer.
        return;
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let target = head.split_whitespace().nth(1).unwrap_or_default().to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let watch = query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
    let mut reply = {
        let mut s = script.lock().unwrap();
        s.log.push(format!("{} {target}", if watch { "watch" } else { "list" }));
        match s.routes.get_mut(&(path.to_string(), watch)) {
            Some((replies, next)) => {
                let r = replies[(*next).min(replies.len() - 1)].clone();
                *next += 1;
                r
            }
            None => Reply::Json(
                404,
                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","reason":"NotFound","code":404}"#.into(),
            ),
        }
    };
    while let Reply::Held(inner) = reply {
        let _ = released.wait_for(|r| *r).await;
        reply = *inner;
    }
    match reply {
        Reply::Json(code, body) => {
            let reason = if code == 200 { "OK" } else { "Error" };
            let text = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(text.as_bytes()).await;
        }
        Reply::Stream(lines) => {
            let header = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
            if stream.write_all(header.as_bytes()).await.is_err() {
                return;
            }
            for line in lines {
                let chunk = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
                if stream.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
            }
            let _ = stream.flush().await;
            // Open and silent until the server goes down (the connection drops) or ends its
            // watches (the stream ends cleanly, with the last chunk).
            let ended = tokio::select! {
                _ = down.wait_for(|d| *d) => false,
                _ = watches_ended.changed() => true,
            };
            if ended {
                let _ = stream.write_all(b"0\r\n\r\n").await;
            }
        }
        Reply::Held(_) => unreachable!("unwrapped above"),
    }
}

/// Polls `f` until it returns `Some`, failing after `secs` seconds.
async fn until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the watcher's next watch request to start at `version`: the model can show a
/// re-list before the watcher has sent the watch that follows it.
async fn watch_resumes_at(api: &FakeApi, requests: &str, version: &str) {
    until(&format!("a {requests} at {version}"), 15, || {
        api.requests(requests).iter().any(|w| w.contains(version)).then_some(())
    })
    .await;
}

fn labels(cluster: &Cluster, ns: &str, pod: &str) -> Vec<(String, String)> {
    let p = cluster.pod(ns, pod).unwrap_or_else(|| panic!("pod {ns}/{pod} missing"));
    model::pod_labels(p).into_iter().collect()
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn pod_names(cluster: &Cluster) -> Vec<String> {
    cluster.pods().keys().map(|(ns, n)| format!("{ns}/{n}")).collect()
}

/// The model's nodes as a table, one `name pod-cidr internal-ip` row each in name order
/// (`-` for what a node lacks): what routing turns into routes.
fn node_table(cluster: &Cluster) -> Vec<String> {
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    cluster
        .nodes()
        .map(|n| {
            format!(
                "{} {} {}",
                n.name,
                or_dash(n.pod_cidr.map(|c| c.to_string())),
                or_dash(n.internal_ip.map(|ip| ip.to_string()))
            )
        })
        .collect()
}

/// The node table of `nodes-list.json`: node-c has no pod CIDR yet (kept, not routable).
const LISTED_NODES: [&str; 3] = [
    "node-a 10.244.1.0/24 192.168.0.1",
    "node-b 10.244.2.0/24 192.168.0.2",
    "node-c - 192.168.0.3",
];

/// The first watch on `path` resumes from the recorded list's resourceVersion (100), with
/// bookmarks.
fn assert_watch_resumes_the_list(api: &FakeApi, path: &str) {
    let watch = &api.requests(&format!("watch {path}"))[0];
    assert!(
        watch.contains("resourceVersion=100") && watch.contains("allowWatchBookmarks=true"),
        "{watch}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_lists_build_the_model_and_nothing_is_served_before() {
    let api = FakeApi::start().await;
    api.script(PODS, false, vec![Reply::Held(Box::new(list("pods-list.json")))]);
    let mut source = api.source(KubeSourceOptions::default());

    until("the other lists", 10, || (api.requests("list").len() >= 6).then_some(())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!source.synced(), "synced before the pod list arrived");
    assert!(source.poll(true).unwrap().is_none(), "served a model before the first full sync");

    api.release();
    let cluster = until("the first sync", 10, || source.poll(false).unwrap()).await;
    assert!(source.synced());
    // Finished, host-network and undecodable pods are left out; the rest are all there.
    assert_eq!(pod_names(&cluster), ["dev/client", "prod/db", "prod/web"]);
    assert_eq!(labels(&cluster, "prod", "web"), kv(&[("app", "web")]));
    let web = cluster.pod("prod", "web").unwrap();
    assert_eq!(model::pod_ipv4(web), Some(Ipv4Addr::new(10, 244, 1, 5)));
    assert_eq!(model::pod_node(web), Some("node-a"));
    assert_eq!(model::named_ports(web, "http", "TCP"), [8080]);
    // Pods are kept as `PodInfo`, what the compiler reads: status-only updates change nothing.
    assert_eq!(
        cluster.namespace_labels("prod").into_iter().collect::<Vec<_>>(),
        kv(&[("kubernetes.io/metadata.name", "prod"), ("team", "shop")])
    );
    assert_eq!(cluster.namespaces().keys().collect::<Vec<_>>(), ["dev", "prod"]);
    // Of the annotations, only Bulkhead's audit-mode ones are kept.
    let kept = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.annotations.clone().unwrap_or_default().into_iter().collect::<Vec<_>>()
    };
    assert_eq!(
        kept(&cluster.namespace("dev").unwrap().metadata),
        kv(&[("bulkhead.io/policy-audit", "true")])
    );
    assert_eq!(kept(&cluster.namespace("prod").unwrap().metadata), kv(&[]));
    assert_eq!(
        kept(&cluster.policy("prod", "db-from-v6").unwrap().metadata),
        kv(&[("bulkhead.io/audit", "false")])
    );
    // The undecodable policy is skipped; the one with an IPv6 ipBlock keeps only its
    // selector, so the pods it selects stay isolated instead of opening up.
    assert_eq!(
        cluster.policies().keys().map(|(ns, n)| format!("{ns}/{n}")).collect::<Vec<_>>(),
        ["prod/db-from-v6", "prod/web-from-dev"]
    );
    let v6 = cluster.policy("prod", "db-from-v6").unwrap().spec.clone().unwrap();
    assert!(v6.ingress.is_none());
    assert_eq!(v6.policy_types.as_deref(), Some(&["Ingress".to_string()][..]));
    let web_policy = cluster.policy("prod", "web-from-dev").unwrap().spec.clone().unwrap();
    assert_eq!(web_policy.ingress.unwrap().len(), 1);
    assert_eq!(source.pod_cidr(), Some("10.244.1.0/24".parse().unwrap()));
    // Every Node is watched, reduced to its first IPv4 pod CIDR and InternalIP.
    assert!(!api.requests("list /api/v1/nodes")[0].contains("fieldSelector"));
    assert_eq!(node_table(&cluster), LISTED_NODES);
    assert!(cluster.node("node-c").unwrap().route().is_none());
    // Nothing changed since: no new model.
    assert!(source.poll(false).unwrap().is_none());
}

/// The service table, one line per `{vip, port, protocol}`: the Service and port name,
/// session affinity, every backend (`ip:port`, `R` ready, `S` serving, `T` terminating, its
/// pod) and, after `|`, the backends new connections go to.
fn service_table(cluster: &Cluster) -> Vec<String> {
    ServiceTable::from_cluster(cluster)
        .iter()
        .map(|(k, e)| {
            let flag = |on: bool, c: char| if on { c } else { '-' };
            let all: Vec<String> = e
                .backends
                .iter()
                .map(|b| {
                    let pod = b.pod.as_ref().map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                    format!(
                        "{}:{} {}{}{} {pod}",
                        b.ip,
                        b.port,
                        flag(b.ready, 'R'),
                        flag(b.serving, 'S'),
                        flag(b.terminating, 'T')
                    )
                })
                .collect();
            let selected: Vec<String> = e.selected().iter().map(|b| format!("{}:{}", b.ip, b.port)).collect();
            format!(
                "{}:{}/{} {}[{}] {:?} -> {} | {}",
                k.vip,
                k.port,
                k.protocol,
                e.service,
                e.port_name,
                e.affinity,
                all.join(", "),
                selected.join(" ")
            )
        })
        .collect()
}

/// The service table of the recorded lists: `web`'s named targetPort resolves to 8080 in one
/// slice (with a terminating pod, not selected while others are ready) and 8081 in another;
/// `dns`'s two slices merge; the hand-written slice of `external` has no pod; the headless
/// `db` has no entry.
const LISTED_SERVICES: [&str; 4] = [
    "10.96.0.10:53/TCP prod/dns[dns-tcp] ClientIp { timeout_seconds: 10800 } -> \
     10.244.1.20:53 RS- prod/dns-1, 10.244.2.20:53 RS- prod/dns-2 | 10.244.1.20:53 10.244.2.20:53",
    "10.96.0.10:53/UDP prod/dns[dns] ClientIp { timeout_seconds: 10800 } -> \
     10.244.1.20:53 RS- prod/dns-1, 10.244.2.20:53 RS- prod/dns-2 | 10.244.1.20:53 10.244.2.20:53",
    "10.96.0.20:80/TCP prod/web[http] None -> \
     10.244.1.5:8080 RS- prod/web, 10.244.2.5:8080 -ST prod/web-old, 10.244.2.8:8081 RS- prod/web-canary \
     | 10.244.1.5:8080 10.244.2.8:8081",
    "10.96.0.30:5432/TCP prod/external[] None -> 192.0.2.10:5432 RS- - | 192.0.2.10:5432",
];

fn slice_names(cluster: &Cluster) -> Vec<String> {
    cluster.endpoint_slices().map(|s| format!("{}/{}", s.namespace, s.name)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_endpoint_slices_reach_the_model_and_the_service_table() {
    let api = FakeApi::start().await;
    api.script(SLICES, false, vec![Reply::Held(Box::new(list("endpointslices-list.json")))]);
    let mut source = api.source(KubeSourceOptions::default());
    until("the other lists", 10, || (api.requests("list").len() >= 6).then_some(())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(source.poll(true).unwrap().is_none(), "served a model before the slices were listed");
    api.release();
    let cluster = until("the first sync", 10, || source.poll(false).unwrap()).await;
    let services: Vec<String> = cluster.services().map(|s| s.namespaced_name().to_string()).collect();
    assert_eq!(services, ["prod/db", "prod/dns", "prod/external", "prod/web"]);
    // The IPv6 slice is not for the IPv4 datapath; the undecodable one is skipped.
    assert_eq!(
        slice_names(&cluster),
        [
            "prod/db-m3n8v",
            "prod/dns-k2x7p",
            "prod/dns-q9w4z",
            "prod/external-1",
            "prod/web-abcde",
            "prod/web-fghij"
        ]
    );
    let web = cluster.service("prod", "web").unwrap();
    assert_eq!(web.cluster_ip, model::ClusterIp::Ipv4(Ipv4Addr::new(10, 96, 0, 20)));
    assert_eq!(web.ports[0].target_port, model::TargetPort::Name("http".into()));
    assert_eq!(cluster.service("prod", "db").unwrap().cluster_ip, model::ClusterIp::Headless);
    assert!(cluster.service("prod", "external").unwrap().selector.is_none());
    assert_eq!(cluster.endpoint_slices_of("prod", "web").count(), 2);
    assert_eq!(
        service_table(&cluster),
        LISTED_SERVICES.map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    );
    // And the service maps written from them: web's two selected backends on their own
    // resolved ports, a header per Service port, one reverse-NAT entry each.
    let mut state = bulkhead::datapath::DatapathState::default();
    let left = bulkhead::datapath::services::ServiceIds::default().write(&ServiceTable::from_cluster(&cluster), &mut state);
    assert!(left.is_empty(), "{left:?}");
    let web_header = bulkhead_common::ServiceKey::new([10, 96, 0, 20], 80, 6, 0);
    assert_eq!(state.services[&web_header].backend_count, 2);
    let web_backends: Vec<(Ipv4Addr, u16)> = (1..=2)
        .map(|slot| {
            let id = state.services[&bulkhead_common::ServiceKey::new([10, 96, 0, 20], 80, 6, slot)].backend_id;
            (Ipv4Addr::from(state.backends[&id].ip), u16::from_be_bytes(state.backends[&id].port))
        })
        .collect();
    assert_eq!(
        web_backends,
        [(Ipv4Addr::new(10, 244, 1, 5), 8080), (Ipv4Addr::new(10, 244, 2, 8), 8081)]
    );
    assert_eq!((state.services.keys().filter(|k| k.slot == 0).count(), state.rev_nat.len()), (4, 4));
    // Services and slices do not invent namespaces the namespace list lacks.
    assert_eq!(cluster.namespaces().keys().collect::<Vec<_>>(), ["dev", "prod"]);
    for path in [SERVICES, SLICES] {
        assert!(
            !api.requests(&format!("list {path}"))[0].contains("Selector"),
            "all of them are watched"
        );
    }
    assert!(source.poll(false).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_and_endpoint_slice_watch_events_update_the_service_table() {
    let api = FakeApi::start().await;
    api.script(SLICES, true, vec![events("endpointslices-watch-events.jsonl"), quiet_watch()]);
    api.script(SERVICES, true, vec![events("services-watch-events.jsonl"), quiet_watch()]);
    let mut source = api.source(KubeSourceOptions::default());
    // The last events delete dns-q9w4z and the external Service.
    let cluster = until("the watch events", 10, || {
        source
            .poll(false)
            .unwrap()
            .filter(|c| c.endpoint_slices_of("prod", "dns").count() == 1 && c.service("prod", "external").is_none())
    })
    .await;
    let want = [
        "10.96.0.10:53/TCP prod/dns[dns-tcp] ClientIp { timeout_seconds: 10800 } -> 10.244.1.20:53 RS- prod/dns-1 | 10.244.1.20:53",
        "10.96.0.10:53/UDP prod/dns[dns] ClientIp { timeout_seconds: 10800 } -> 10.244.1.20:53 RS- prod/dns-1 | 10.244.1.20:53",
        // The terminating pod is gone, the new one is not ready yet; affinity came by watch.
        "10.96.0.20:80/TCP prod/web[http] ClientIp { timeout_seconds: 60 } -> \
         10.244.1.5:8080 RS- prod/web, 10.244.1.6:8080 --- prod/web-new, 10.244.2.8:8081 RS- prod/web-canary \
         | 10.244.1.5:8080 10.244.2.8:8081",
    ];
    assert_eq!(
        service_table(&cluster),
        want.map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    );
    for path in [SERVICES, SLICES] {
        assert_watch_resumes_the_list(&api, path);
    }
    assert_eq!(source.failures(), 0);
    assert!(source.poll(false).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_relists_the_endpoint_slices() {
    let api = FakeApi::start().await;
    api.script(
        SLICES,
        false,
        vec![list("endpointslices-list.json"), list("endpointslices-list-relisted.json")],
    );
    api.script(SLICES, true, vec![events("endpointslices-watch-gone.jsonl"), quiet_watch()]);
    let mut source = api.source(KubeSourceOptions::default());
    let cluster = until("the re-list", 15, || {
        source
            .poll(false)
            .unwrap()
            .filter(|c| c.endpoint_slices_of("prod", "dns").count() == 1)
    })
    .await;
    assert_eq!(
        slice_names(&cluster),
        [
            "prod/db-m3n8v",
            "prod/dns-k2x7p",
            "prod/external-1",
            "prod/web-abcde",
            "prod/web-fghij"
        ]
    );
    let table = service_table(&cluster);
    assert_eq!(
        table[2],
        "10.96.0.20:80/TCP prod/web[http] None -> 10.244.1.5:8080 RS- prod/web, 10.244.2.8:8081 RS- prod/web-canary \
         | 10.244.1.5:8080 10.244.2.8:8081"
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert_eq!(api.requests(&format!("list {SLICES}")).len(), 2);
    watch_resumes_at(&api, &format!("watch {SLICES}"), "resourceVersion=300").await;
    assert!(source.failures() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_and_bookmarks_update_the_model() {
    let api = FakeApi::start().await;
    api.script(PODS, true, vec![events("pods-watch-events.jsonl"), quiet_watch()]);
    let mut source = api.source(KubeSourceOptions::default());
    let cluster = until("the watch events", 10, || {
        // The last event deletes dev/client: wait for it, not just for the ADDED before it.
        source
            .poll(false)
            .unwrap()
            .filter(|c| c.pod("dev", "client2").is_some() && c.pod("dev", "client").is_none())
    })
    .await;
    assert_eq!(pod_names(&cluster), ["dev/client2", "prod/db", "prod/web"]);
    assert_eq!(labels(&cluster, "prod", "web"), kv(&[("app", "web"), ("tier", "front")]));
    // The watch started at the list's resourceVersion, with bookmarks on.
    assert_watch_resumes_the_list(&api, PODS);
    assert_eq!(source.failures(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_relists() {
    let api = FakeApi::start().await;
    api.script(PODS, false, vec![list("pods-list.json"), list("pods-list-relisted.json")]);
    api.script(PODS, true, vec![events("pods-watch-gone.jsonl"), quiet_watch()]);
    let mut source = api.source(KubeSourceOptions::default());
    let cluster = until("the re-list", 15, || {
        source.poll(false).unwrap().filter(|c| c.pod("prod", "db").is_none())
    })
    .await;
    assert_eq!(pod_names(&cluster), ["dev/client", "prod/web"]);
    assert_eq!(labels(&cluster, "prod", "web"), kv(&[("app", "web"), ("version", "v2")]));
    assert_eq!(api.requests("list /api/v1/pods").len(), 2);
    // After the re-list the watch resumes from the new list's resourceVersion.
    watch_resumes_at(&api, "watch /api/v1/pods", "resourceVersion=300").await;
    assert!(source.failures() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_backs_off_and_recovers() {
    let api = FakeApi::start().await;
    let error = Reply::Json(500, recorded("status-500.json"));
    api.script(PODS, false, vec![error.clone(), error, list("pods-list.json")]);
    let started = Instant::now();
    let mut source = api.source(KubeSourceOptions::default());
    until("the first failure", 10, || (source.failures() >= 1).then_some(())).await;
    assert!(source.poll(true).unwrap().is_none(), "synced with a failed pod list");
    let cluster = until("recovery", 20, || source.poll(false).unwrap()).await;
    assert_eq!(pod_names(&cluster), ["dev/client", "prod/db", "prod/web"]);
    assert_eq!(api.requests("list /api/v1/pods").len(), 3);
    assert!(source.failures() >= 2);
    // Two backoffs of at least 0.8 s each (client-go's schedule, with jitter).
    assert!(started.elapsed() >= Duration::from_millis(1600), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_api_server_keeps_the_last_model_and_recovers() {
    let api = FakeApi::start().await;
    let mut source = api.source(KubeSourceOptions::default());
    let first = until("the first sync", 10, || source.poll(false).unwrap()).await;

    api.set_down(true);
    until("watch failures", 10, || (source.failures() >= 4).then_some(())).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(source.synced(), "a lost connection must not un-sync the source");
    assert!(source.poll(true).unwrap().is_none(), "a lost connection is no change");
    assert_eq!(source.cluster, first, "the last model is kept");

    // The server returns with new state (its resourceVersion moved on: a re-list).
    api.script(PODS, false, vec![list("pods-list-relisted.json")]);
    api.script(PODS, true, vec![events("pods-watch-gone.jsonl"), quiet_watch()]);
    api.set_down(false);
    let recovered = until("recovery", 40, || {
        source.poll(false).unwrap().filter(|c| c.pod("prod", "db").is_none())
    })
    .await;
    assert_eq!(pod_names(&recovered), ["dev/client", "prod/web"]);
    assert_eq!(recovered.namespaces(), first.namespaces());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watch_is_resumed_from_the_last_resource_version() {
    let api = FakeApi::start().await;
    // The first pod watch never says anything: after the watch timeout plus the client's
    // 5 s margin the watcher gives up on it and watches again from where it was.
    api.script(PODS, true, vec![quiet_watch(), events("pods-watch-events.jsonl"), quiet_watch()]);
    let mut source = api.source(KubeSourceOptions {
        watch_timeout: Duration::from_secs(1),
    });
    let first = until("the first sync", 10, || source.poll(false).unwrap()).await;
    assert!(first.pod("dev", "client2").is_none());
    let cluster = until("the resumed watch", 20, || {
        source
            .poll(false)
            .unwrap()
            .filter(|c| c.pod("dev", "client2").is_some() && c.pod("dev", "client").is_none())
    })
    .await;
    assert_eq!(pod_names(&cluster), ["dev/client2", "prod/db", "prod/web"]);
    let watches = api.requests("watch /api/v1/pods");
    assert!(watches.len() >= 2 && watches[1].contains("resourceVersion=100"), "{watches:?}");
    assert_eq!(api.requests("list /api/v1/pods").len(), 1, "a stall must not cost a re-list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_watch_events_update_the_model() {
    let api = FakeApi::start().await;
    api.script(NODES, true, vec![events("nodes-watch-events.jsonl"), quiet_watch()]);
    let mut source = api.source(KubeSourceOptions::default());
    // node-d added, node-a's heartbeat, node-b's pod CIDR changed, node-c deleted (last).
    let cluster = until("the node watch events", 10, || {
        source.poll(false).unwrap().filter(|c| c.node("node-c").is_none())
    })
    .await;
    assert_eq!(
        node_table(&cluster),
        [
            "node-a 10.244.1.0/24 192.168.0.1",
            "node-b 10.244.12.0/24 192.168.0.2",
            "node-d 10.244.4.0/24 192.168.0.4",
        ]
    );
    // This node's pod CIDR is still its own.
    assert_eq!(source.pod_cidr(), Some("10.244.1.0/24".parse().unwrap()));
    assert_watch_resumes_the_list(&api, NODES);
    assert_eq!(source.failures(), 0);
    // Nothing changed since.
    assert!(source.poll(false).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_relists_the_nodes() {
    let api = FakeApi::start().await;
    api.script(NODES, false, vec![list("nodes-list.json"), list("nodes-list-relisted.json")]);
    api.script(NODES, true, vec![events("nodes-watch-gone.jsonl"), quiet_watch()]);
    let mut source = api.source(KubeSourceOptions::default());
    // The re-list lacks node-b and gives node-c its pod CIDR.
    let cluster = until("the node re-list", 15, || {
        source.poll(false).unwrap().filter(|c| c.node("node-b").is_none())
    })
    .await;
    assert_eq!(
        node_table(&cluster),
        ["node-a 10.244.1.0/24 192.168.0.1", "node-c 10.244.3.0/24 192.168.0.3"]
    );
    assert_eq!(api.requests("list /api/v1/nodes").len(), 2);
    watch_resumes_at(&api, "watch /api/v1/nodes", "resourceVersion=300").await;
    assert!(source.failures() >= 1);
    assert_eq!(source.pod_cidr(), Some("10.244.1.0/24".parse().unwrap()));
    // The other kinds were not re-listed.
    assert_eq!(api.requests("list /api/v1/pods").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_synced_model_compiles_into_map_entries() {
    let api = FakeApi::start().await;
    let mut source = api.source(KubeSourceOptions::default());
    let cluster = until("the first sync", 10, || source.poll(false).unwrap()).await;

    let local = |id: u32, ns: &str, pod: &str, ip: [u8; 4]| LocalEndpoint {
        endpoint_id: id,
        host_ifindex: 100 + id,
        namespace: ns.into(),
        pod: pod.into(),
        ipv4: Ipv4Addr::from(ip),
        mac: [2, 0, 0, 0, 0, id as u8],
    };
    let locals = [local(1, "prod", "web", [10, 244, 1, 5]), local(2, "dev", "client", [10, 244, 1, 9])];
    let mut compiler = Compiler::new();
    let state = compiler.compile(&cluster, &locals);
    let mut maps = MemoryMaps::default();
    sync::sync(&mut maps, &DatapathState::default(), &state).unwrap();

    let identity_of = |ip: [u8; 4]| {
        maps.state
            .ipcache
            .get(&(Ipv4Addr::from(ip), 32))
            .unwrap_or_else(|| panic!("no ipcache entry for {ip:?}"))
            .identity
    };
    let (web, client) = (identity_of([10, 244, 1, 5]), identity_of([10, 244, 1, 9]));
    identity_of([10, 244, 2, 7]);
    assert!(
        !maps.state.ipcache.contains_key(&(Ipv4Addr::new(10, 244, 1, 10), 32)),
        "finished pod in ipcache"
    );
    assert_ne!(web, client);

    let web_ep = maps.state.endpoints[&101];
    assert_eq!(web_ep.identity, web);
    assert_ne!(web_ep.flags & endpoint_flags::ISOLATED_INGRESS, 0);
    assert_eq!(maps.state.endpoints[&102].flags & endpoint_flags::ISOLATED_INGRESS, 0);
    let allow = PolicyKey::new(1, client, direction::INGRESS, proto::TCP, 8080);
    let entry = maps.state.policy.get(&(allow, POLICY_PREFIX_FULL));
    assert!(
        entry.is_some(),
        "no ingress entry client -> web:8080 in {:?}",
        maps.state.policy.keys()
    );
    // Nothing else may reach web.
    let web_ingress: Vec<_> = maps
        .state
        .policy
        .keys()
        .filter(|(k, _)| k.endpoint_id == 1u32.to_be_bytes() && k.direction == direction::INGRESS)
        .collect();
    assert_eq!(web_ingress.len(), 1, "{web_ingress:?}");
}

/// The real `bulkhead agent` binary with the Kubernetes source pointed at a [`FakeApi`],
/// in its own temp and pin directories. Dropping it stops the agent (SIGTERM, then SIGKILL)
/// and removes both, whether the test passed or not.
///
/// It runs in the network namespace the [`FakeApi`] listens in: the host's, with routing
/// off so the host's routes stay untouched, or a [`TestNetns`].
struct AgentProcess {
    child: Child,
    dir: PathBuf,
    pin_dir: PathBuf,
    metrics: SocketAddr,
}

impl AgentProcess {
    /// Starts `bulkhead agent --routing ROUTING` in the network namespace at `netns` (the
    /// host's when `None`).
    fn start(api: &FakeApi, routing: &str, netns: Option<&Path>) -> AgentProcess {
        // Tests run in parallel in one process: the pid alone does not tell agents apart.
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "bulkhead-kubeagent-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&name);
        let pin_dir = Path::new("/sys/fs/bpf").join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&pin_dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
                 users:\n- name: anonymous\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: anonymous\n\
                 current-context: fake\n",
                api.addr
            ),
        )
        .unwrap();
        // The agent wants an address, not a socket: take a port free in its namespace.
        let metrics = in_netns(netns, || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap());
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_bulkhead"));
        command
            .arg("agent")
            .args(["--source", "kubernetes", "--node-name", "node-a", "--routing", routing])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--bpffs")
            .arg(&pin_dir)
            .arg("--metrics-address")
            .arg(metrics.to_string())
            // No BULKHEAD_*, KUBECONFIG, KUBERNETES_SERVICE_HOST or proxy settings from the
            // test's environment: the flags alone configure the agent.
            .env_clear()
            .env("BULKHEAD_LOG", "info")
            // A log file, not a terminal: no colour codes in the failure messages.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Spawned from a thread in the namespace, the agent starts in it; unlike
        // `ip netns exec` this keeps the mount namespace, where the pin directory is.
        let child = in_netns(netns, || command.spawn()).unwrap();
        AgentProcess {
            child,
            dir,
            pin_dir,
            metrics,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Polls `f` until it returns `Some`, failing with the agent's log after `secs` seconds.
    async fn until<T>(&mut self, what: &str, secs: u64, mut f: impl FnMut(&mut Self) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; agent log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails the test at once, with the agent's log, when the agent has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the agent exited ({status}):\n{}", self.log());
        }
    }

    /// The agent's Status over its socket; `None` while it does not answer.
    fn status(&mut self) -> Option<AgentStatus> {
        self.assert_running();
        let socket = self.dir.join("state/agent.sock");
        let response = tokio::task::block_in_place(|| bulkhead_api::call(&socket, &Request::Status, Duration::from_secs(5)));
        match response {
            Ok(Response::Status(status)) => Some(status),
            Ok(other) => panic!("status answered {other:?}"),
            Err(_) => None,
        }
    }

    /// The HTTP status code of `GET /healthz`; `None` while nothing answers. From this
    /// thread's namespace: an agent in the host's only.
    fn healthz(&mut self) -> Option<u16> {
        self.assert_running();
        tokio::task::block_in_place(|| {
            let mut stream = std::net::TcpStream::connect(self.metrics).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).ok()?;
            response.split_whitespace().nth(1)?.parse().ok()
        })
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The ipcache's pod entries (all but this node's own addresses, which carry HOST).
fn pod_ipcache(datapath: &Datapath) -> BTreeMap<(Ipv4Addr, u8), u32> {
    let state = datapath.maps.read_state().unwrap();
    state
        .ipcache
        .iter()
        .filter(|(_, v)| v.identity != identity::HOST)
        .map(|(k, v)| (*k, v.identity))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_programs_the_recorded_cluster_and_outlives_the_api_server() {
    let api = FakeApi::start().await;
    api.script(PODS, false, vec![Reply::Held(Box::new(list("pods-list.json")))]);
    let mut agent = AgentProcess::start(&api, "none", None);

    // Up and serving, but the pod list has not come: not ready, and nothing written.
    agent.until("the agent socket", 30, AgentProcess::status).await;
    until("the agent's other lists", 10, || (api.requests("list").len() >= 4).then_some(())).await;
    // A few poll intervals, so an agent that marks itself ready too early has done so.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = agent.status().unwrap();
    assert!(!status.ready, "ready before the pod list: {status:?}");
    assert_eq!(status.generation, 0, "maps written before the first sync: {status:?}");
    assert_eq!(agent.healthz(), Some(503), "healthz before the first sync");
    let datapath = Datapath::load(&agent.pin_dir).unwrap();
    assert_eq!(
        datapath.maps.read_state().unwrap(),
        Default::default(),
        "maps written before the first sync"
    );

    api.release();
    let status = agent
        .until("the agent to become ready", 20, |a| a.status().filter(|s| s.ready))
        .await;
    assert_eq!(status.node_name, "node-a");
    // prod/db-from-v6 and prod/web-from-dev (the undecodable policy is skipped); one identity
    // per label set of the three running pod-network pods; no local endpoints yet.
    assert_eq!(
        (status.policies, status.identities, status.endpoints, status.policy_entries),
        (2, 3, 0, 0),
        "{status:?}"
    );
    assert!(status.generation >= 1, "{status:?}");
    agent
        .until("/healthz to turn 200", 5, |a| (a.healthz() == Some(200)).then_some(()))
        .await;
    let pod_cidr = std::fs::read_to_string(agent.dir.join("state/pod-cidr")).unwrap();
    assert_eq!(pod_cidr.trim(), "10.244.1.0/24");

    // Every running pod-network pod, this node's or not, by its /32; the finished pod, the
    // host-network pod and the pod without an IP are not there.
    let pods = pod_ipcache(&datapath);
    let ips: Vec<_> = pods.keys().copied().collect();
    let slash32 = |ip: [u8; 4]| (Ipv4Addr::from(ip), 32);
    assert_eq!(
        ips,
        [slash32([10, 244, 1, 5]), slash32([10, 244, 1, 9]), slash32([10, 244, 2, 7])],
        "{pods:?}"
    );
    let mut identities: Vec<u32> = pods.values().copied().collect();
    identities.sort_unstable();
    identities.dedup();
    assert_eq!(identities.len(), 3, "pods with different labels share an identity: {pods:?}");
    assert!(identities.iter().all(|&i| i >= identity::FIRST_ALLOCATED), "{pods:?}");
    let state = datapath.maps.read_state().unwrap();
    assert!(state.endpoints.is_empty() && state.policy.is_empty(), "{state:?}");

    // The API server goes away: first its connections drop, then it refuses them.
    api.set_down(true);
    agent
        .until("the agent to notice the lost api server", 20, |a| {
            a.log().contains("kubernetes watch failed").then_some(())
        })
        .await;
    drop(api);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = agent.status().unwrap();
    assert!(after.ready, "a lost api server un-readied the agent: {after:?}");
    assert_eq!((after.policies, after.identities), (2, 3), "{after:?}");
    assert_eq!(agent.healthz(), Some(200), "healthz with the api server gone");
    assert_eq!(pod_ipcache(&datapath), pods, "the pod entries changed with the api server gone");
    let state = datapath.maps.read_state().unwrap();
    assert!(state.endpoints.is_empty() && state.policy.is_empty(), "{state:?}");
    agent.assert_running();
}

/// A fresh network namespace, deleted on drop whether the test passed or not (declare it
/// before what runs in it, so it is dropped after): `lo` up and the bridge `ul0` holding
/// node-a's InternalIP, 192.168.0.1/24, so routes via the other nodes' InternalIPs are valid.
struct TestNetns {
    name: String,
    path: PathBuf,
}

impl TestNetns {
    fn create(tag: &str) -> TestNetns {
        let name = format!("bhkube-{}-{tag}", std::process::id());
        // A namespace of an earlier run with this pid would not be fresh.
        netns::delete(&netns::named_path(&name)).unwrap();
        let path = netns::create_named(&name).unwrap();
        let ns = TestNetns { name, path };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["link", "add", "ul0", "type", "bridge"]);
        ns.ip(&["addr", "add", "192.168.0.1/24", "dev", "ul0"]);
        ns.ip(&["link", "set", "ul0", "up"]);
        ns
    }

    /// `ip -n NAME ARGS`, which must succeed; its output.
    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip").arg("-n").arg(&self.name).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The main table's routes with `args` (`ip route show ARGS`), one trimmed line each,
    /// sorted.
    fn routes(&self, args: &[&str]) -> Vec<String> {
        let out = self.ip(&[&["route", "show"], args].concat());
        let mut routes: Vec<String> = out.lines().map(|l| l.trim().to_string()).collect();
        routes.sort();
        routes
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if let Err(e) = netns::delete(&self.path) {
            eprintln!("removing netns {}: {e}", self.name);
        }
    }
}

/// Polls until the agent's routes (protocol 181) in `ns` are exactly `want`, failing after
/// 10 s with what they were and the agent's log. A foreign route must never be touched.
async fn routes_reach(agent: &mut AgentProcess, ns: &TestNetns, what: &str, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let routes = ns.routes(&["proto", "181"]);
        if routes == want {
            break;
        }
        agent.assert_running();
        assert!(
            Instant::now() < deadline,
            "{what}: the agent's routes are {routes:#?}, not {want:#?}; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ns.routes(&["10.99.0.0/24"]),
        [FOREIGN_ROUTE],
        "{what}: the foreign route was touched"
    );
}

/// A route the agent does not own (`proto static`), as `ip route` shows it.
const FOREIGN_ROUTE: &str = "10.99.0.0/24 via 192.168.0.9 dev ul0 proto static";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_changes_reach_the_agents_routes() {
    let ns = TestNetns::create("routes");
    ns.ip(&["route", "add", "10.99.0.0/24", "via", "192.168.0.9", "proto", "static"]);
    let api = FakeApi::start_in(Some(&ns.path)).await;
    let mut agent = AgentProcess::start(&api, "native", Some(&ns.path));

    // The first sync: node-b's pod CIDR via its InternalIP; node-c has no pod CIDR yet, and
    // node-a is this node.
    agent
        .until("the agent to become ready", 30, |a| a.status().filter(|s| s.ready))
        .await;
    routes_reach(&mut agent, &ns, "the first sync", &["10.244.2.0/24 via 192.168.0.2 dev ul0"]).await;

    // Each change comes as a watch event on a new watch (the server ends the open one).
    api.script(
        NODES,
        true,
        vec![event("nodes-watch-events.jsonl", "ADDED", "node-d"), quiet_watch()],
    );
    api.end_watches();
    routes_reach(
        &mut agent,
        &ns,
        "node-d added",
        &["10.244.2.0/24 via 192.168.0.2 dev ul0", "10.244.4.0/24 via 192.168.0.4 dev ul0"],
    )
    .await;

    api.script(
        NODES,
        true,
        vec![event("nodes-watch-events.jsonl", "MODIFIED", "node-b"), quiet_watch()],
    );
    api.end_watches();
    routes_reach(
        &mut agent,
        &ns,
        "node-b's pod CIDR changed",
        &["10.244.12.0/24 via 192.168.0.2 dev ul0", "10.244.4.0/24 via 192.168.0.4 dev ul0"],
    )
    .await;

    api.script(
        NODES,
        true,
        vec![event("nodes-watch-deleted.jsonl", "DELETED", "node-d"), quiet_watch()],
    );
    api.end_watches();
    routes_reach(&mut agent, &ns, "node-d deleted", &["10.244.12.0/24 via 192.168.0.2 dev ul0"]).await;
    // All of it came by watch events: no re-list so far.
    assert_eq!(api.requests("list /api/v1/nodes").len(), 1);

    // 410 Gone: the re-list lacks node-b and gives node-c its pod CIDR.
    api.script(NODES, false, vec![list("nodes-list-relisted.json")]);
    api.script(NODES, true, vec![events("nodes-watch-gone.jsonl"), quiet_watch()]);
    api.end_watches();
    routes_reach(
        &mut agent,
        &ns,
        "the re-list without node-b",
        &["10.244.3.0/24 via 192.168.0.3 dev ul0"],
    )
    .await;
    assert_eq!(api.requests("list /api/v1/nodes").len(), 2);
    agent.assert_running();
}
