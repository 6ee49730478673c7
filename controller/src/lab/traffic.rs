//! `bulkhead lab traffic`: a small shop of services across namespaces and nodes, and the
//! requests its users make, on a seedable random schedule, with scaling and restarts.
//!
//! The shop: a load generator calls the `frontend` Service; the front-end resolves names
//! through the `kube-dns` Service (UDP) and calls the `catalog` and `orders` APIs; these use
//! a cache (`redis`) and a database (`postgres`), and `orders` calls a payment provider on
//! the outside host (`world`, TCP 80) when the lab has one. Every call is a real connection
//! from a replica of the calling workload to a Service's ClusterIP (or the outside host), so
//! the agents see and name it as any cluster traffic. Churn events scale workloads up and
//! down and roll them (new pods, new IPs, a new `pod-template-hash`, same workload labels).
//! Every request's outcome is counted per edge; `status.json` in the lab's `traffic/` dir
//! holds the counts while it runs and after.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bulkhead_hostnet::netns;
use serde::{Deserialize, Serialize};

use super::model::{self, ClusterIp};
use super::state::{self, LabPaths, LabState};
use super::{pod, LabError, Output};

/// How long one call may take to connect or answer.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Workers executing requests concurrently.
const WORKERS: usize = 6;
/// At most this many replicas of a scalable workload.
const MAX_REPLICAS: usize = 3;
/// Failures kept in the status, beyond the counts.
const KEPT_FAILURES: usize = 20;

/// Protocol of a call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CallProtocol {
    /// A connection that exchanges a request and a reply.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// A datagram and its answer.
    #[serde(rename = "UDP")]
    Udp,
}

/// One workload of the shop.
#[derive(Debug)]
struct WorkloadSpec {
    namespace: &'static str,
    name: &'static str,
    /// The labels that make it a workload (its Service selects them).
    labels: &'static [(&'static str, &'static str)],
    tcp: &'static [u16],
    udp: &'static [u16],
    replicas: usize,
    /// Deployment-like: scaled and rolled, with a `pod-template-hash` per revision.
    scalable: bool,
}

const LOADGEN: usize = 0;
const FRONTEND: usize = 1;
const CATALOG: usize = 2;
const ORDERS: usize = 3;
const POSTGRES: usize = 4;
const REDIS: usize = 5;
const DNS: usize = 6;

/// The shop's workloads; indices are the constants above. Label styles differ on purpose
/// (`app`, `app.kubernetes.io/*`, `k8s-app`), as in real clusters.
const WORKLOADS: [WorkloadSpec; 7] = [
    WorkloadSpec {
        namespace: "shop-web",
        name: "loadgen",
        labels: &[("app", "loadgen")],
        tcp: &[],
        udp: &[],
        replicas: 1,
        scalable: false,
    },
    WorkloadSpec {
        namespace: "shop-web",
        name: "frontend",
        labels: &[("app.kubernetes.io/name", "frontend"), ("app.kubernetes.io/component", "web")],
        tcp: &[8080, 9090],
        udp: &[],
        replicas: 2,
        scalable: true,
    },
    WorkloadSpec {
        namespace: "shop-api",
        name: "catalog",
        labels: &[("app", "catalog")],
        tcp: &[8080, 9090],
        udp: &[],
        replicas: 2,
        scalable: true,
    },
    WorkloadSpec {
        namespace: "shop-api",
        name: "orders",
        labels: &[("app", "orders")],
        tcp: &[8080, 9090],
        udp: &[],
        replicas: 1,
        scalable: true,
    },
    WorkloadSpec {
        namespace: "shop-data",
        name: "postgres",
        labels: &[("app", "postgres")],
        tcp: &[5432],
        udp: &[],
        replicas: 1,
        scalable: false,
    },
    WorkloadSpec {
        namespace: "shop-data",
        name: "redis",
        labels: &[("app", "redis")],
        tcp: &[6379],
        udp: &[],
        replicas: 1,
        scalable: false,
    },
    WorkloadSpec {
        namespace: "kube-system",
        name: "coredns",
        labels: &[("k8s-app", "kube-dns")],
        tcp: &[53],
        udp: &[53],
        replicas: 1,
        scalable: false,
    },
];

/// A Service of the shop: (workload, name, port, targetPort, protocol).
const SERVICES: [(usize, &str, u16, u16, CallProtocol); 6] = [
    (FRONTEND, "frontend", 80, 8080, CallProtocol::Tcp),
    (CATALOG, "catalog", 8080, 8080, CallProtocol::Tcp),
    (ORDERS, "orders", 8080, 8080, CallProtocol::Tcp),
    (POSTGRES, "postgres", 5432, 5432, CallProtocol::Tcp),
    (REDIS, "redis", 6379, 6379, CallProtocol::Tcp),
    (DNS, "kube-dns", 53, 53, CallProtocol::Udp),
];

/// The payment provider on the outside host.
const WORLD_PORT: u16 = 80;

/// What a call goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Callee {
    /// A shop Service, by index in [`SERVICES`].
    Service(usize),
    /// The outside host.
    World,
}

/// One call of a request: from a replica of a workload to a callee.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    from: usize,
    to: Callee,
}

const fn svc(from: usize, service: usize) -> Call {
    Call {
        from,
        to: Callee::Service(service),
    }
}

/// Request kinds and their calls, in order. `browse` reads through the cache, `search`
/// goes to the database, `checkout` writes an order and pays outside.
const KINDS: [(&str, u32, &[Call]); 3] = [
    (
        "browse",
        6,
        &[
            svc(LOADGEN, 0),
            svc(FRONTEND, 5),
            svc(FRONTEND, 1),
            svc(CATALOG, 5),
            svc(CATALOG, 4),
        ],
    ),
    ("search", 2, &[svc(LOADGEN, 0), svc(FRONTEND, 1), svc(CATALOG, 3)]),
    (
        "checkout",
        2,
        &[
            svc(LOADGEN, 0),
            svc(FRONTEND, 5),
            svc(FRONTEND, 2),
            svc(ORDERS, 5),
            svc(ORDERS, 3),
            Call {
                from: ORDERS,
                to: Callee::World,
            },
        ],
    ),
];

/// SplitMix64: a tiny, seedable generator; the same seed gives the same decisions.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        // 53 bits: exactly representable.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n); 0 when n is 0.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    /// Five hex digits, for pod names and revisions.
    fn suffix(&mut self) -> String {
        format!("{:05x}", self.next_u64() & 0xf_ffff)
    }
}

/// `bulkhead lab traffic` settings.
#[derive(Clone, Debug, clap::Args)]
pub struct TrafficArgs {
    /// Seed of every random choice: request mix, replicas, timing, churn.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Stop after this long (30s, 2m); without it, until `lab traffic stop`.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Mean user requests per second (the rate swings ±50% over a 20 s cycle, with bursts).
    #[arg(long, default_value_t = 6.0)]
    pub rate: f64,
    /// Mean time between churn events (scale up, scale down, rolling restart).
    #[arg(long, value_parser = parse_duration, default_value = "6s")]
    pub churn_every: Duration,
    /// No churn: the replicas stay as they are (`lab traffic scale`/`roll` still work).
    #[arg(long)]
    pub no_churn: bool,
    /// Bytes of each upload `orders` sends the payment provider (TCP 80 on the outside
    /// host), steadily, whatever the load: the shop's known outside byte rate. 0: none.
    #[arg(long, default_value_t = 4096)]
    pub upload_bytes: u64,
    /// Time between two uploads.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub upload_every: Duration,
}

/// `lab traffic` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TrafficCommand {
    /// Deploy the shop if needed, then make traffic in the foreground; prints the summary.
    Run {
        /// Settings.
        #[command(flatten)]
        args: TrafficArgs,
        /// Output format of the summary.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Print `ready` on stdout once the shop is deployed (for `start`).
        #[arg(long, hide = true)]
        notify_ready: bool,
    },
    /// Like `run`, in the background; returns once the shop is deployed and traffic flows.
    Start {
        /// Settings.
        #[command(flatten)]
        args: TrafficArgs,
    },
    /// Stop the generator; prints its final summary.
    Stop {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Whether it runs, and its counts so far.
    Status {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Deploy the shop (namespaces, pods, Services) without traffic.
    Deploy {
        /// Seed of the pod names.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Multiply the running generator's request rate by FACTOR (1 is the `--rate` given);
    /// the steady uploads stay as they are.
    Rate {
        /// The factor, above 0.
        factor: f64,
    },
    /// Scale a workload (`frontend`, `catalog`, `orders`, or `NAMESPACE/NAME`) to N replicas;
    /// through the running generator when there is one, so no request is in flight.
    Scale {
        /// The workload.
        workload: String,
        /// Replicas wanted, 1 to 5.
        #[arg(value_parser = clap::value_parser!(u8).range(1..=5))]
        replicas: u8,
        /// Output format of the event.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Roll a workload: every replica replaced by one of a new revision (new pods, new IPs).
    Roll {
        /// The workload.
        workload: String,
        /// Output format of the event.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print the shop's manifests (for `lab up -f` or `lab apply -f`).
    Manifests {
        /// Seed of the pod names.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// `30s`, `2m`, `1m30s`, `500ms`.
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    let span: jiff::Span = text
        .parse()
        .map_err(|e| format!("{text:?} is not a duration like 30s or 2m: {e}"))?;
    let d = span
        .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|e| format!("{text:?}: {e}"))?;
    Duration::try_from(d).map_err(|_| format!("{text:?} is negative"))
}

/// One edge of the shop's call graph, as counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeStats {
    /// The calling workload, `namespace/name`.
    pub from: String,
    /// The called workload, `namespace/name`, or `world`.
    pub to: String,
    /// The Service dialled (`namespace/name`), when the call went through one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The port the server listens on (a Service's targetPort).
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: CallProtocol,
    /// Calls answered.
    pub ok: u64,
    /// Calls that failed.
    pub failed: u64,
}

/// A churn event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Seconds since the start.
    pub at: f64,
    /// `scale-up`, `scale-down`, `restart`, or `rate` (the workload is then `-`).
    pub kind: String,
    /// `namespace/name` of the workload.
    pub workload: String,
    /// Pods added (`namespace/name ip`).
    pub added: Vec<String>,
    /// Pods removed.
    pub removed: Vec<String>,
    /// The new factor on the request rate, for `rate` events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
}

/// A failed call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// Seconds since the start.
    pub at: f64,
    /// The calling pod.
    pub from: String,
    /// What it called (`ip:port/proto`).
    pub to: String,
    /// What went wrong.
    pub error: String,
}

/// A workload of the shop and its pods now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    /// `namespace/name`.
    pub workload: String,
    /// Its Service's and policies' selector.
    pub selector: BTreeMap<String, String>,
    /// Its pods, `namespace/name`.
    pub pods: Vec<String>,
}

/// The generator's counts: `status.json`, `status -o json`, and the summary of `run`/`stop`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrafficStatus {
    /// Whether the generator is running.
    pub running: bool,
    /// Its pid.
    pub pid: u32,
    /// The seed.
    pub seed: u64,
    /// Seconds it has run.
    pub elapsed: f64,
    /// User requests started.
    pub requests: u64,
    /// Calls answered, all edges.
    pub ok: u64,
    /// Calls failed, all edges.
    pub failed: u64,
    /// Per edge of the call graph.
    pub edges: Vec<EdgeStats>,
    /// Churn events, in order.
    pub events: Vec<Event>,
    /// The first failures.
    pub failures: Vec<Failure>,
    /// The shop's workloads and their pods at the last update.
    pub workloads: Vec<WorkloadStatus>,
    /// The steady uploads, when there are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadStatus>,
    /// The factor on the request rate (`lab traffic rate`).
    #[serde(default = "one")]
    pub rate_factor: f64,
}

fn one() -> f64 {
    1.0
}

/// The steady uploads of one workload to the outside host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UploadStatus {
    /// The uploading workload, `namespace/name`.
    pub workload: String,
    /// Where to, `IP:PORT`.
    pub to: String,
    /// Bytes of each upload.
    pub bytes: u64,
    /// Seconds between uploads.
    pub every: f64,
    /// The resulting byte rate, bytes per second.
    pub bytes_per_sec: f64,
    /// Uploads answered.
    pub ok: u64,
    /// Uploads that failed.
    pub failed: u64,
}

fn workload_key(w: &WorkloadSpec) -> String {
    format!("{}/{}", w.namespace, w.name)
}

fn labels_yaml(labels: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = labels.iter().map(|(k, v)| format!("\"{k}\": \"{v}\"")).collect();
    format!("{{{}}}", parts.join(", "))
}

/// A pod of `w` named `name`, with revision `hash` when the workload has revisions.
fn pod_yaml(w: &WorkloadSpec, name: &str, hash: Option<&str>) -> String {
    let mut labels: BTreeMap<String, String> = w.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    if let Some(h) = hash {
        labels.insert("pod-template-hash".into(), h.to_string());
    }
    let mut ports = String::new();
    for p in w.tcp {
        ports.push_str(&format!("    - {{containerPort: {p}, protocol: TCP}}\n"));
    }
    for p in w.udp {
        ports.push_str(&format!("    - {{containerPort: {p}, protocol: UDP}}\n"));
    }
    let ports = if ports.is_empty() {
        String::new()
    } else {
        format!("    ports:\n{ports}")
    };
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {}, labels: {}}}\nspec:\n  containers:\n  - name: {}\n    image: shop/{}\n{ports}",
        w.namespace,
        labels_yaml(&labels),
        w.name,
        w.name
    )
}

fn namespaces_yaml() -> String {
    let mut names: Vec<&str> = WORKLOADS.iter().map(|w| w.namespace).collect();
    names.dedup();
    names
        .iter()
        .map(|n| format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}, labels: {{shop: \"true\"}}}}\n"))
        .collect()
}

fn service_yaml(i: usize) -> String {
    let (w, name, port, target, proto) = SERVICES[i];
    let w = &WORKLOADS[w];
    let selector: BTreeMap<String, String> = w.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let proto = match proto {
        CallProtocol::Tcp => "TCP",
        CallProtocol::Udp => "UDP",
    };
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {}}}\nspec:\n  selector: {}\n  ports:\n  - {{name: {}, port: {port}, targetPort: {target}, protocol: {proto}}}\n",
        w.namespace,
        labels_yaml(&selector),
        proto.to_ascii_lowercase()
    )
}

/// The whole shop as first deployed: namespaces, Services, and each workload's replicas.
pub fn manifests(seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut out = namespaces_yaml();
    for i in 0..SERVICES.len() {
        out.push_str(&service_yaml(i));
    }
    for w in &WORKLOADS {
        let hash = w.scalable.then(|| rng.suffix());
        for r in 0..w.replicas {
            let name = if w.scalable {
                format!("{}-{}-{}", w.name, hash.as_deref().unwrap_or_default(), rng.suffix())
            } else {
                format!("{}-{r}", w.name)
            };
            out.push_str(&pod_yaml(w, &name, hash.as_deref()));
        }
    }
    out
}

/// A replica the generator can call from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Replica {
    key: String,
    netns: String,
}

/// Where calls go and come from, as of the last change.
#[derive(Clone, Debug, Default)]
struct Shop {
    /// Per workload, its replicas with an address.
    replicas: Vec<Vec<Replica>>,
    /// Per workload, its current revision (`pod-template-hash`).
    revisions: Vec<Option<String>>,
    /// Per Service, its ClusterIP.
    service_ips: Vec<Option<Ipv4Addr>>,
    /// The outside host.
    world: Option<Ipv4Addr>,
}

fn matches(w: &WorkloadSpec, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
    namespace == w.namespace && w.labels.iter().all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
}

/// The shop as the lab has it now.
fn discover(paths: &LabPaths, state: &LabState) -> Result<Shop, LabError> {
    let cluster = super::load_cluster(paths)?;
    let mut shop = Shop {
        replicas: vec![Vec::new(); WORKLOADS.len()],
        revisions: vec![None; WORKLOADS.len()],
        service_ips: Vec::new(),
        world: state.world.as_ref().and_then(|w| w.ip.parse().ok()),
    };
    for ((namespace, name), p) in cluster.pods() {
        let labels = model::pod_labels(p);
        let Some(i) = WORKLOADS.iter().position(|w| matches(w, namespace, &labels)) else {
            continue;
        };
        let Some(lab) = state.pod(namespace, name).filter(|l| l.ip.is_some()) else {
            continue;
        };
        shop.replicas[i].push(Replica {
            key: lab.key(),
            netns: lab.netns.clone(),
        });
        if let Some(h) = labels.get("pod-template-hash") {
            shop.revisions[i] = Some(h.clone());
        }
    }
    for (w, name, ..) in SERVICES {
        let ip = cluster.service(WORKLOADS[w].namespace, name).and_then(|s| match s.cluster_ip {
            ClusterIp::Ipv4(ip) => Some(ip),
            _ => None,
        });
        shop.service_ips.push(ip);
    }
    Ok(shop)
}

/// Applies YAML text to the lab as `lab apply -f` does.
fn apply_text(paths: &LabPaths, text: &str) -> Result<(), LabError> {
    let objects = model::parse_documents(text, "lab traffic").map_err(|source| LabError::Model { source })?;
    let _lock = paths.lock()?;
    let mut state = paths.load_up()?;
    pod::apply(paths, &mut state, objects)
}

/// Deletes pods as `lab delete -f` does.
fn delete_pods(paths: &LabPaths, keys: &[String]) -> Result<(), LabError> {
    let mut text = String::new();
    for key in keys {
        let (ns, name) = key.split_once('/').unwrap_or(("default", key));
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\n"
        ));
    }
    let objects = model::parse_documents(&text, "lab traffic").map_err(|source| LabError::Model { source })?;
    let _lock = paths.lock()?;
    let mut state = paths.load_up()?;
    pod::delete(paths, &mut state, &objects)
}

/// Deploys what of the shop is missing: namespaces, Services, and the replicas of a
/// workload that has none. Returns the shop as it is afterwards.
fn deploy(paths: &LabPaths, seed: u64) -> Result<Shop, LabError> {
    let state = paths.load_up()?;
    let shop = discover(paths, &state)?;
    let cluster = super::load_cluster(paths)?;
    let mut text = namespaces_yaml();
    for (i, (w, name, ..)) in SERVICES.iter().enumerate() {
        // A Service's ClusterIP is immutable: only create the missing ones.
        if cluster.service(WORKLOADS[*w].namespace, name).is_none() {
            text.push_str(&service_yaml(i));
        }
    }
    let mut rng = Rng::new(seed ^ 0x5eed);
    for (i, w) in WORKLOADS.iter().enumerate() {
        if !shop.replicas[i].is_empty() {
            continue;
        }
        let hash = w.scalable.then(|| rng.suffix());
        for r in 0..w.replicas {
            let name = if w.scalable {
                format!("{}-{}-{}", w.name, hash.as_deref().unwrap_or_default(), rng.suffix())
            } else {
                format!("{}-{r}", w.name)
            };
            text.push_str(&pod_yaml(w, &name, hash.as_deref()));
        }
    }
    apply_text(paths, &text)?;
    discover(paths, &paths.load_up()?)
}

/// One call, from the calling thread's namespace.
fn call(addr: SocketAddr, protocol: CallProtocol) -> Result<(), String> {
    match protocol {
        CallProtocol::Tcp => {
            let mut s = TcpStream::connect_timeout(&addr, CALL_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(CALL_TIMEOUT)).map_err(|e| e.to_string())?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").map_err(|e| format!("send: {e}"))?;
            let mut buf = [0u8; 256];
            match s.read(&mut buf) {
                Ok(n) if n > 0 => Ok(()),
                Ok(_) => Err("closed without an answer".into()),
                Err(e) => Err(format!("receive: {e}")),
            }
        }
        CallProtocol::Udp => {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
            s.connect(addr).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_millis(700))).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 512];
            let mut last = String::from("no answer");
            // A datagram may be lost: ask again, as a resolver does.
            for _ in 0..3 {
                s.send(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04shop\x03svc\x00\x00\x01\x00\x01")
                    .map_err(|e| format!("send: {e}"))?;
                match s.recv(&mut buf) {
                    Ok(n) if n > 0 => return Ok(()),
                    Ok(_) => {}
                    Err(e) => last = format!("receive: {e}"),
                }
            }
            Err(last)
        }
    }
}

/// Sends `bytes` bytes of payload over one TCP connection to an echo server, from the
/// calling thread's namespace, reading the echo meanwhile (so neither side blocks on a full
/// buffer); returns the bytes echoed back. The payload starts like an HTTP upload.
pub(super) fn upload(addr: SocketAddr, bytes: u64, timeout: Duration) -> Result<u64, String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut reader = s.try_clone().map_err(|e| e.to_string())?;
    std::thread::scope(|scope| {
        let echoed = scope.spawn(move || {
            let mut buf = [0u8; 16384];
            let mut total = 0u64;
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return Ok(total),
                    Ok(n) => total += n as u64,
                    Err(e) => return Err(format!("receive: {e}")),
                }
            }
        });
        let header = format!("POST /pay HTTP/1.0\r\nContent-Length: {bytes}\r\n\r\n");
        let mut chunk = [b'x'; 16384];
        let head = header.len().min(chunk.len());
        let mut left = bytes;
        let mut first = true;
        let sent: Result<(), String> = loop {
            if left == 0 {
                break Ok(());
            }
            if first {
                chunk[..head].copy_from_slice(&header.as_bytes()[..head]);
            }
            let n = left.min(chunk.len() as u64) as usize;
            if let Err(e) = s.write_all(&chunk[..n]) {
                break Err(format!("send: {e}"));
            }
            if first {
                chunk[..head].fill(b'x');
                first = false;
            }
            left -= n as u64;
        };
        let _ = s.shutdown(std::net::Shutdown::Write);
        let echoed = echoed.join().unwrap_or_else(|_| Err("reader panicked".into()));
        sent?;
        match echoed? {
            n if n == bytes => Ok(n),
            n => Err(format!("{n} of {bytes} bytes echoed")),
        }
    })
}

/// What a request does: its kind and one random number per call to pick the replica.
#[derive(Clone, Debug)]
struct Plan {
    kind: usize,
    picks: Vec<u64>,
}

/// Counters shared by the workers.
#[derive(Debug, Default)]
struct Tally {
    status: TrafficStatus,
}

fn edge_index(status: &mut TrafficStatus, c: &Call) -> usize {
    let (to, service, port, protocol) = match c.to {
        Callee::Service(s) => {
            let (w, name, _, target, proto) = SERVICES[s];
            (
                workload_key(&WORKLOADS[w]),
                Some(format!("{}/{name}", WORKLOADS[w].namespace)),
                target,
                proto,
            )
        }
        Callee::World => (super::world::WORLD.to_string(), None, WORLD_PORT, CallProtocol::Tcp),
    };
    let from = workload_key(&WORKLOADS[c.from]);
    if let Some(i) = status
        .edges
        .iter()
        .position(|e| e.from == from && e.to == to && e.port == port && e.protocol == protocol)
    {
        return i;
    }
    status.edges.push(EdgeStats {
        from,
        to,
        service,
        port,
        protocol,
        ok: 0,
        failed: 0,
    });
    status.edges.len() - 1
}

/// Runs one request's calls in order; a failed call ends the request, as in an app.
fn execute(plan: &Plan, shop: &RwLock<Shop>, tally: &Mutex<Tally>, started: Instant) {
    let Ok(shop) = shop.read() else {
        return;
    };
    let calls = KINDS[plan.kind].2;
    for (c, pick) in calls.iter().zip(&plan.picks) {
        let (addr, protocol) = match c.to {
            Callee::Service(s) => {
                let (_, _, port, _, proto) = SERVICES[s];
                (shop.service_ips[s].map(|ip| SocketAddr::from((ip, port))), proto)
            }
            Callee::World => (shop.world.map(|ip| SocketAddr::from((ip, WORLD_PORT))), CallProtocol::Tcp),
        };
        let Some(addr) = addr else {
            continue; // no outside host in this lab: the shop pays nobody
        };
        let replicas = &shop.replicas[c.from];
        if replicas.is_empty() {
            return;
        }
        let from = &replicas[(*pick % replicas.len() as u64) as usize];
        let result = netns::run_in(&netns::named_path(&from.netns), || call(addr, protocol)).unwrap_or_else(|e| Err(e.to_string()));
        let Ok(mut t) = tally.lock() else {
            return;
        };
        let i = edge_index(&mut t.status, c);
        match result {
            Ok(()) => {
                t.status.edges[i].ok += 1;
                t.status.ok += 1;
            }
            Err(error) => {
                t.status.edges[i].failed += 1;
                t.status.failed += 1;
                if t.status.failures.len() < KEPT_FAILURES {
                    let proto = match protocol {
                        CallProtocol::Tcp => "TCP",
                        CallProtocol::Udp => "UDP",
                    };
                    t.status.failures.push(Failure {
                        at: started.elapsed().as_secs_f64(),
                        from: from.key.clone(),
                        to: format!("{addr}/{proto}"),
                        error,
                    });
                }
                return;
            }
        }
    }
}

/// The `traffic/` dir of the lab.
fn dir(paths: &LabPaths) -> PathBuf {
    paths.dir.join("traffic")
}

fn status_path(paths: &LabPaths) -> PathBuf {
    dir(paths).join("status.json")
}

fn stop_path(paths: &LabPaths) -> PathBuf {
    dir(paths).join("stop")
}

fn save_status(paths: &LabPaths, status: &TrafficStatus) -> Result<(), LabError> {
    let bytes = serde_json::to_vec_pretty(status).map_err(|source| LabError::State {
        path: status_path(paths),
        source,
    })?;
    state::write_atomic(&status_path(paths), &bytes)
}

/// The steady uploads of the generator running or last run: (bytes per second, interval).
pub(super) fn upload_settings(paths: &LabPaths) -> Option<(f64, Duration)> {
    let u = load_status(paths)?.upload?;
    Some((u.bytes_per_sec, Duration::from_secs_f64(u.every.max(0.0))))
}

fn load_status(paths: &LabPaths) -> Option<TrafficStatus> {
    serde_json::from_slice(&std::fs::read(status_path(paths)).ok()?).ok()
}

fn workloads_status(shop: &Shop) -> Vec<WorkloadStatus> {
    WORKLOADS
        .iter()
        .zip(&shop.replicas)
        .map(|(w, r)| WorkloadStatus {
            workload: workload_key(w),
            selector: w.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            pods: r.iter().map(|p| p.key.clone()).collect(),
        })
        .collect()
}

/// A change of a workload's pods: pods to add (name, revision) and pods to remove.
#[derive(Clone, Debug, Default)]
struct Change {
    kind: &'static str,
    added: Vec<(String, String)>,
    removed: Vec<String>,
}

fn poisoned() -> LabError {
    LabError::AgentFailed {
        node: "-".into(),
        message: "traffic state poisoned".into(),
    }
}

/// Applies a change to workload `i` while no request is in flight (the caller holds the
/// shop's write lock) and reads the shop back.
fn apply_change(paths: &LabPaths, shop: &mut Shop, i: usize, change: Change, started: Instant) -> Result<Event, LabError> {
    let w = &WORKLOADS[i];
    let mut text = String::new();
    for (name, hash) in &change.added {
        text.push_str(&pod_yaml(w, name, Some(hash)));
    }
    if !text.is_empty() {
        apply_text(paths, &text)?;
    }
    if !change.removed.is_empty() {
        delete_pods(paths, &change.removed)?;
    }
    let state = paths.load_up()?;
    *shop = discover(paths, &state)?;
    let added = change
        .added
        .iter()
        .map(|(name, _)| {
            let ip = state.pod(w.namespace, name).and_then(|p| p.ip.clone()).unwrap_or_default();
            format!("{}/{name} {ip}", w.namespace)
        })
        .collect();
    Ok(Event {
        at: started.elapsed().as_secs_f64(),
        kind: change.kind.into(),
        workload: workload_key(w),
        added,
        removed: change.removed,
        factor: None,
    })
}

/// A rollout of workload `i`: every replica replaced by one of a new revision.
fn roll_change(shop: &Shop, i: usize, rng: &mut Rng) -> Change {
    let w = &WORKLOADS[i];
    let revision = rng.suffix();
    let current = &shop.replicas[i];
    Change {
        kind: "restart",
        added: (0..current.len().max(1))
            .map(|_| (format!("{}-{revision}-{}", w.name, rng.suffix()), revision.clone()))
            .collect(),
        removed: current.iter().map(|r| r.key.clone()).collect(),
    }
}

/// Workload `i` scaled to `n` replicas: new ones of its current revision, or the last ones
/// removed.
fn scale_change(shop: &Shop, i: usize, n: usize, rng: &mut Rng) -> Change {
    let w = &WORKLOADS[i];
    let current = &shop.replicas[i];
    let revision = shop.revisions[i].clone().unwrap_or_else(|| rng.suffix());
    if n >= current.len() {
        Change {
            kind: "scale-up",
            added: (current.len()..n)
                .map(|_| (format!("{}-{revision}-{}", w.name, rng.suffix()), revision.clone()))
                .collect(),
            removed: Vec::new(),
        }
    } else {
        Change {
            kind: "scale-down",
            added: Vec::new(),
            removed: current[n..].iter().map(|r| r.key.clone()).collect(),
        }
    }
}

/// A churn event: scale a workload up or down, or roll it; runs while no request is in flight.
/// The first event of a run always adds pods (a scale-up, or a rollout at the maximum), so
/// every run with churn meets new pod addresses.
fn churn(paths: &LabPaths, shop: &RwLock<Shop>, rng: &mut Rng, started: Instant, first: bool) -> Result<Option<Event>, LabError> {
    let scalable: Vec<usize> = (0..WORKLOADS.len()).filter(|i| WORKLOADS[*i].scalable).collect();
    let i = scalable[rng.below(scalable.len())];
    let roll = rng.unit();
    let name_suffix = rng.suffix();
    let new_revision = rng.suffix();
    let w = &WORKLOADS[i];
    // Waits for the requests in flight; new ones wait for the change.
    let mut guard = shop.write().map_err(|_| poisoned())?;
    let current = guard.replicas[i].clone();
    let revision = guard.revisions[i].clone().unwrap_or_else(|| new_revision.clone());
    let change = if current.len() < MAX_REPLICAS && (first || roll < 0.4 || (current.len() <= 1 && roll < 0.7)) {
        Change {
            kind: "scale-up",
            added: vec![(format!("{}-{revision}-{name_suffix}", w.name), revision)],
            removed: Vec::new(),
        }
    } else if !first && roll < 0.7 && current.len() > 1 {
        Change {
            kind: "scale-down",
            added: Vec::new(),
            removed: vec![current[rng.below(current.len())].key.clone()],
        }
    } else {
        // A rollout: every replica replaced by one of the new revision.
        let mut suffix = Rng::new(rng.next_u64());
        Change {
            kind: "restart",
            added: current
                .iter()
                .map(|_| (format!("{}-{new_revision}-{}", w.name, suffix.suffix()), new_revision.clone()))
                .collect(),
            removed: current.iter().map(|r| r.key.clone()).collect(),
        }
    };
    apply_change(paths, &mut guard, i, change, started).map(Some)
}

/// Whether the generator should stop: asked to, or the lab went away.
fn should_stop(paths: &LabPaths) -> bool {
    stop_path(paths).exists() || !paths.state().exists()
}

/// A request to the running generator (`lab traffic rate|scale|roll`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Control {
    /// Set the factor on the request rate.
    Rate { factor: f64 },
    /// Scale a workload.
    Scale { workload: usize, replicas: usize },
    /// Roll a workload.
    Roll { workload: usize },
}

/// The generator's answer to a [`Control`].
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ControlDone {
    event: Option<Event>,
    error: Option<String>,
}

fn control_dir(paths: &LabPaths) -> PathBuf {
    dir(paths).join("control")
}

/// The requests waiting, oldest first: (id, request).
fn pending_controls(paths: &LabPaths) -> Vec<(String, Control)> {
    let Ok(entries) = std::fs::read_dir(control_dir(paths)) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Control)> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let id = name.strip_prefix("req-")?.strip_suffix(".json")?.to_string();
            let bytes = std::fs::read(control_dir(paths).join(&name)).ok()?;
            Some((id, serde_json::from_slice(&bytes).ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Carries out one request on the shop; the event it made.
fn do_control(paths: &LabPaths, shop: &RwLock<Shop>, control: &Control, rng: &mut Rng, started: Instant) -> Result<Event, LabError> {
    match *control {
        Control::Rate { factor } => Ok(Event {
            at: started.elapsed().as_secs_f64(),
            kind: "rate".into(),
            workload: "-".into(),
            added: Vec::new(),
            removed: Vec::new(),
            factor: Some(factor),
        }),
        Control::Scale { workload, replicas } => {
            let mut guard = shop.write().map_err(|_| poisoned())?;
            let change = scale_change(&guard, workload, replicas, rng);
            apply_change(paths, &mut guard, workload, change, started)
        }
        Control::Roll { workload } => {
            let mut guard = shop.write().map_err(|_| poisoned())?;
            let change = roll_change(&guard, workload, rng);
            apply_change(paths, &mut guard, workload, change, started)
        }
    }
}

/// Sends a request to the running generator and waits for its answer; without a running
/// generator, carries it out here (a rate needs a generator).
fn send_control(paths: &LabPaths, control: Control) -> Result<Event, LabError> {
    let unsupported = |message: String| LabError::Unsupported {
        object: "lab traffic".into(),
        message,
    };
    let running = load_status(paths).is_some_and(|s| s.running && alive(s.pid));
    if !running {
        if matches!(control, Control::Rate { .. }) {
            return Err(unsupported("no generator is running: `bulkhead lab traffic start` first".into()));
        }
        let shop = RwLock::new(discover(paths, &paths.load_up()?)?);
        let mut rng = Rng::new(u64::from(std::process::id()) ^ now_nanos());
        return do_control(paths, &shop, &control, &mut rng, Instant::now());
    }
    state::create_dir(&control_dir(paths))?;
    let id = format!("{:020}-{}", now_nanos(), std::process::id());
    let req = control_dir(paths).join(format!("req-{id}.json"));
    let done = control_dir(paths).join(format!("done-{id}.json"));
    let bytes = serde_json::to_vec(&control).map_err(|source| LabError::State { path: req.clone(), source })?;
    state::write_atomic(&req, &bytes)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(answer) = std::fs::read(&done)
            .ok()
            .and_then(|b| serde_json::from_slice::<ControlDone>(&b).ok())
        {
            let _ = std::fs::remove_file(&done);
            return match (answer.event, answer.error) {
                (Some(event), _) => Ok(event),
                (None, e) => Err(unsupported(e.unwrap_or_else(|| "the generator gave no answer".into()))),
            };
        }
        let gone = !load_status(paths).is_some_and(|s| s.running && alive(s.pid));
        if gone || Instant::now() > deadline {
            let _ = std::fs::remove_file(&req);
            return Err(unsupported(format!(
                "the generator {} before carrying out the request",
                if gone { "stopped" } else { "did not answer in 120 s" }
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

/// The workload named `text` (`orders` or `shop-api/orders`), when it can be scaled.
fn scalable_workload(text: &str) -> Result<usize, LabError> {
    WORKLOADS
        .iter()
        .position(|w| w.scalable && (text == w.name || text == workload_key(w)))
        .ok_or_else(|| LabError::Unsupported {
            object: format!("workload {text}"),
            message: format!(
                "not a scalable workload of the shop (one of {})",
                WORKLOADS
                    .iter()
                    .filter(|w| w.scalable)
                    .map(workload_key)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

/// The steady uploads: one every `args.upload_every`, from the `orders` replicas in turn to
/// the payment provider, until `stop` is set.
fn uploader(args: &TrafficArgs, shop: &RwLock<Shop>, tally: &Mutex<Tally>, stop: &std::sync::atomic::AtomicBool, started: Instant) {
    let every = args.upload_every.max(Duration::from_millis(10));
    let mut next = Instant::now();
    let mut turn = 0usize;
    let call = Call {
        from: ORDERS,
        to: Callee::World,
    };
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(100)));
            continue;
        }
        next += every;
        let Ok(s) = shop.read() else { return };
        let (Some(world), false) = (s.world, s.replicas[ORDERS].is_empty()) else {
            continue;
        };
        let from = &s.replicas[ORDERS][turn % s.replicas[ORDERS].len()];
        turn += 1;
        let addr = SocketAddr::from((world, WORLD_PORT));
        let result = netns::run_in(&netns::named_path(&from.netns), || upload(addr, args.upload_bytes, CALL_TIMEOUT))
            .unwrap_or_else(|e| Err(e.to_string()));
        let Ok(mut t) = tally.lock() else { return };
        let i = edge_index(&mut t.status, &call);
        let ok = result.is_ok();
        if let Some(u) = t.status.upload.as_mut() {
            if ok {
                u.ok += 1;
            } else {
                u.failed += 1;
            }
        }
        match result {
            Ok(_) => {
                t.status.edges[i].ok += 1;
                t.status.ok += 1;
            }
            Err(error) => {
                t.status.edges[i].failed += 1;
                t.status.failed += 1;
                if t.status.failures.len() < KEPT_FAILURES {
                    t.status.failures.push(Failure {
                        at: started.elapsed().as_secs_f64(),
                        from: from.key.clone(),
                        to: format!("{addr}/TCP (upload)"),
                        error,
                    });
                }
            }
        }
    }
}

/// The foreground generator: deploys, makes traffic until the deadline or a stop, returns
/// the final counts (also saved in `status.json`).
pub fn generate(paths: &LabPaths, args: &TrafficArgs, notify_ready: bool) -> Result<TrafficStatus, LabError> {
    state::create_dir(&dir(paths))?;
    let _ = std::fs::remove_dir_all(control_dir(paths));
    let shop = deploy(paths, args.seed)?;
    let started = Instant::now();
    let mut rng = Rng::new(args.seed);
    let upload = (args.upload_bytes > 0).then_some(shop.world).flatten().map(|world| UploadStatus {
        workload: workload_key(&WORKLOADS[ORDERS]),
        to: SocketAddr::from((world, WORLD_PORT)).to_string(),
        bytes: args.upload_bytes,
        every: args.upload_every.as_secs_f64(),
        bytes_per_sec: args.upload_bytes as f64 / args.upload_every.as_secs_f64().max(0.01),
        ok: 0,
        failed: 0,
    });
    let uploading = upload.is_some();
    let tally = Arc::new(Mutex::new(Tally {
        status: TrafficStatus {
            running: true,
            pid: std::process::id(),
            seed: args.seed,
            workloads: workloads_status(&shop),
            upload,
            rate_factor: 1.0,
            ..TrafficStatus::default()
        },
    }));
    let shop = Arc::new(RwLock::new(shop));
    if let Ok(t) = tally.lock() {
        save_status(paths, &t.status)?;
    }
    if notify_ready {
        println!("ready");
        let _ = std::io::stdout().flush();
    }
    let (tx, rx) = mpsc::channel::<Plan>();
    let rx = Arc::new(Mutex::new(rx));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (rx, shop, tally) = (Arc::clone(&rx), Arc::clone(&shop), Arc::clone(&tally));
            std::thread::spawn(move || loop {
                let next = match rx.lock() {
                    Ok(r) => r.recv(),
                    Err(_) => return,
                };
                match next {
                    Ok(plan) => execute(&plan, &shop, &tally, started),
                    Err(_) => return,
                }
            })
        })
        .collect();
    let stop_uploads = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let upload_thread = uploading.then(|| {
        let (shop, tally, stop, args) = (Arc::clone(&shop), Arc::clone(&tally), Arc::clone(&stop_uploads), args.clone());
        std::thread::spawn(move || uploader(&args, &shop, &tally, &stop, started))
    });
    let deadline = args.duration.map(|d| started + d);
    let churn_mean = args.churn_every.as_secs_f64().max(0.5);
    // Churn has its own generator: the same seed gives the same events, however many
    // requests the timing let through before each.
    let mut churn_rng = Rng::new(args.seed.rotate_left(17) ^ 0xc4e5);
    let mut control_rng = Rng::new(args.seed.rotate_left(29) ^ 0xc0de);
    let mut next_churn = started + Duration::from_secs_f64(churn_mean * (0.5 + churn_rng.unit()));
    let mut churned = 0usize;
    let mut next_save = Instant::now() + Duration::from_secs(1);
    let mut next_request = Instant::now();
    let mut rate_factor = 1.0f64;
    let mut sent: u64 = 0;
    let mut churn_error = None;
    loop {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) || should_stop(paths) {
            break;
        }
        for (id, control) in pending_controls(paths) {
            let _ = std::fs::remove_file(control_dir(paths).join(format!("req-{id}.json")));
            let result = do_control(paths, &shop, &control, &mut control_rng, started);
            if let (Ok(_), Control::Rate { factor }) = (&result, &control) {
                rate_factor = *factor;
            }
            let done = match result {
                Ok(event) => {
                    if let (Ok(mut t), Ok(s)) = (tally.lock(), shop.read()) {
                        t.status.events.push(event.clone());
                        t.status.workloads = workloads_status(&s);
                        t.status.rate_factor = rate_factor;
                        // Saved before the answer, so the caller reads the shop it asked for.
                        t.status.elapsed = started.elapsed().as_secs_f64();
                        let _ = save_status(paths, &t.status);
                    }
                    ControlDone {
                        event: Some(event),
                        error: None,
                    }
                }
                Err(e) => ControlDone {
                    event: None,
                    error: Some(crate::error_chain(&e)),
                },
            };
            if let Ok(bytes) = serde_json::to_vec(&done) {
                let _ = state::write_atomic(&control_dir(paths).join(format!("done-{id}.json")), &bytes);
            }
        }
        if !args.no_churn && now >= next_churn {
            churned += 1;
            match churn(paths, &shop, &mut churn_rng, started, churned == 1) {
                Ok(Some(event)) => {
                    if let (Ok(mut t), Ok(s)) = (tally.lock(), shop.read()) {
                        t.status.events.push(event);
                        t.status.workloads = workloads_status(&s);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    churn_error = Some(e);
                    break;
                }
            }
            next_churn = Instant::now() + Duration::from_secs_f64(churn_mean * (0.5 + churn_rng.unit()));
        }
        if Instant::now() >= next_request {
            // The first requests are one of each kind, so every edge is exercised early.
            let burst = if rng.unit() < 0.05 { 3 + rng.below(4) } else { 1 };
            for _ in 0..burst {
                let kind = if (sent as usize) < KINDS.len() {
                    sent as usize
                } else {
                    pick_kind(&mut rng)
                };
                let picks = (0..KINDS[kind].2.len()).map(|_| rng.next_u64()).collect();
                if tx.send(Plan { kind, picks }).is_err() {
                    break;
                }
                sent += 1;
            }
            // A day in 20 s: the rate swings between half and one and a half of the mean.
            let phase = started.elapsed().as_secs_f64() / 20.0 * std::f64::consts::TAU;
            let rate = (args.rate * rate_factor * (1.0 + 0.5 * phase.sin())).max(0.1);
            let wait = -(1.0 - rng.unit()).ln() / rate;
            next_request = Instant::now() + Duration::from_secs_f64(wait.min(2.0));
        }
        if let Ok(mut t) = tally.lock() {
            t.status.requests = sent;
            if Instant::now() >= next_save {
                t.status.elapsed = started.elapsed().as_secs_f64();
                let _ = save_status(paths, &t.status);
                next_save = Instant::now() + Duration::from_secs(1);
            }
        }
        // Wake for the next request, and at least every 100 ms for requests and a stop.
        let now = Instant::now();
        std::thread::sleep(next_request.saturating_duration_since(now).min(Duration::from_millis(100)));
    }
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    stop_uploads.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(t) = upload_thread {
        let _ = t.join();
    }
    let mut status = tally.lock().map(|t| t.status.clone()).unwrap_or_default();
    status.running = false;
    status.requests = sent;
    status.elapsed = started.elapsed().as_secs_f64();
    status.edges.sort_by(|a, b| (&a.from, &a.to, a.port).cmp(&(&b.from, &b.to, b.port)));
    if paths.state().exists() {
        save_status(paths, &status)?;
    }
    let _ = std::fs::remove_file(stop_path(paths));
    churn_error.map_or(Ok(status), Err)
}

fn pick_kind(rng: &mut Rng) -> usize {
    let total: u32 = KINDS.iter().map(|k| k.1).sum();
    let mut x = rng.below(total as usize) as u32;
    for (i, k) in KINDS.iter().enumerate() {
        if x < k.1 {
            return i;
        }
        x -= k.1;
    }
    0
}

fn alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("traffic"))
        .unwrap_or(false)
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
            .unwrap_or(true)
}

fn print_status(status: &TrafficStatus, output: Output) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(status).unwrap_or_default()),
        Output::Table => {
            println!(
                "traffic {} (seed {}, pid {}): {:.1}s, {} requests, {} calls ok, {} failed, {} churn events",
                if status.running { "running" } else { "stopped" },
                status.seed,
                status.pid,
                status.elapsed,
                status.requests,
                status.ok,
                status.failed,
                status.events.len()
            );
            if let Some(u) = &status.upload {
                println!(
                    "uploads {} -> {}: {} bytes every {:.2}s ({:.0} B/s), {} ok, {} failed; rate x{}",
                    u.workload, u.to, u.bytes, u.every, u.bytes_per_sec, u.ok, u.failed, status.rate_factor
                );
            }
            println!("{:<20} {:<20} {:<10} {:>7} {:>7}", "FROM", "TO", "PORT", "OK", "FAILED");
            for e in &status.edges {
                let proto = match e.protocol {
                    CallProtocol::Tcp => "TCP",
                    CallProtocol::Udp => "UDP",
                };
                println!(
                    "{:<20} {:<20} {:<10} {:>7} {:>7}",
                    e.from,
                    e.to,
                    format!("{}/{proto}", e.port),
                    e.ok,
                    e.failed
                );
            }
            for ev in &status.events {
                println!("{:>6.1}s {:<10} {} +{:?} -{:?}", ev.at, ev.kind, ev.workload, ev.added, ev.removed);
            }
            for f in &status.failures {
                println!("{:>6.1}s failed {} -> {}: {}", f.at, f.from, f.to, f.error);
            }
        }
    }
}

fn print_event(event: &Event, output: Output) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(event).unwrap_or_default()),
        Output::Table => println!("{} {}: +{:?} -{:?}", event.kind, event.workload, event.added, event.removed),
    }
}

/// Starts the generator in the background; returns once it has deployed the shop.
fn start(paths: &LabPaths, args: &TrafficArgs) -> Result<u32, LabError> {
    if let Some(s) = load_status(paths).filter(|s| s.running && alive(s.pid)) {
        return Err(LabError::Unsupported {
            object: "lab traffic".into(),
            message: format!("already running (pid {}): `bulkhead lab traffic stop` first", s.pid),
        });
    }
    state::create_dir(&dir(paths))?;
    let _ = std::fs::remove_file(stop_path(paths));
    let exe = std::env::current_exe().map_err(|source| LabError::Spawn {
        what: "lab traffic".into(),
        source,
    })?;
    let log_path = dir(paths).join("traffic.log");
    let log = std::fs::File::create(&log_path).map_err(|source| LabError::Io {
        op: "create",
        path: log_path.clone(),
        source,
    })?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("lab")
        .arg("--lab-dir")
        .arg(&paths.dir)
        .args(["traffic", "run", "--notify-ready", "-o", "json", "--seed"])
        .arg(args.seed.to_string())
        .arg("--rate")
        .arg(args.rate.to_string())
        .arg("--churn-every")
        .arg(format!("{}ms", args.churn_every.as_millis()));
    if let Some(d) = args.duration {
        cmd.arg("--duration").arg(format!("{}ms", d.as_millis()));
    }
    if args.no_churn {
        cmd.arg("--no-churn");
    }
    cmd.arg("--upload-bytes")
        .arg(args.upload_bytes.to_string())
        .arg("--upload-every")
        .arg(format!("{}ms", args.upload_every.as_millis()));
    use std::os::unix::process::CommandExt;
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .process_group(0);
    let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
        what: "lab traffic".into(),
        source,
    })?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let mut reader = std::io::BufReader::new(out);
        let _ = std::io::BufRead::read_line(&mut reader, &mut line);
        // The summary goes nowhere once we are gone; keep the pipe drained meanwhile.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    }
    if line.trim() != "ready" {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        return Err(LabError::Spawn {
            what: "lab traffic".into(),
            source: std::io::Error::other(format!("generator did not start: {}", log.trim())),
        });
    }
    Ok(child.id())
}

/// Stops a running generator and returns its final counts.
fn stop(paths: &LabPaths) -> Result<Option<TrafficStatus>, LabError> {
    let Some(status) = load_status(paths) else {
        return Ok(None);
    };
    if status.running && alive(status.pid) {
        state::write_atomic(&stop_path(paths), b"stop\n")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive(status.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if alive(status.pid) {
            super::node::terminate(&[status.pid], &paths.dir);
        }
    }
    let _ = std::fs::remove_file(stop_path(paths));
    let mut last = load_status(paths).unwrap_or(status);
    last.running = false;
    Ok(Some(last))
}

/// Runs one `lab traffic` command; the exit code.
pub fn run(paths: &LabPaths, command: TrafficCommand) -> Result<i32, LabError> {
    match command {
        TrafficCommand::Run {
            args,
            output,
            notify_ready,
        } => {
            let status = generate(paths, &args, notify_ready)?;
            // Started by `start`, nobody reads stdout any more: the counts are in status.json.
            if !notify_ready {
                print_status(&status, output);
            }
            Ok(0)
        }
        TrafficCommand::Start { args } => {
            paths.load_up()?;
            let pid = start(paths, &args)?;
            println!("traffic started (pid {pid}, seed {})", args.seed);
            Ok(0)
        }
        TrafficCommand::Stop { output } => match stop(paths)? {
            Some(status) => {
                print_status(&status, output);
                Ok(0)
            }
            None => {
                eprintln!("bulkhead lab traffic: no generator has run in this lab");
                Ok(1)
            }
        },
        TrafficCommand::Status { output } => {
            paths.load_up()?;
            match load_status(paths) {
                Some(mut status) => {
                    status.running = status.running && alive(status.pid);
                    print_status(&status, output);
                    Ok(0)
                }
                None => {
                    eprintln!("bulkhead lab traffic: no generator has run in this lab");
                    Ok(1)
                }
            }
        }
        TrafficCommand::Deploy { seed } => {
            let shop = deploy(paths, seed)?;
            for w in workloads_status(&shop) {
                println!("{:<20} {}", w.workload, w.pods.join(" "));
            }
            Ok(0)
        }
        TrafficCommand::Rate { factor } => {
            if !(factor.is_finite() && factor > 0.0) {
                return Err(LabError::Unsupported {
                    object: "lab traffic rate".into(),
                    message: format!("{factor} is not a factor above 0"),
                });
            }
            paths.load_up()?;
            send_control(paths, Control::Rate { factor })?;
            println!("traffic rate x{factor}");
            Ok(0)
        }
        TrafficCommand::Scale {
            workload,
            replicas,
            output,
        } => {
            paths.load_up()?;
            let workload = scalable_workload(&workload)?;
            let event = send_control(
                paths,
                Control::Scale {
                    workload,
                    replicas: usize::from(replicas),
                },
            )?;
            print_event(&event, output);
            Ok(0)
        }
        TrafficCommand::Roll { workload, output } => {
            paths.load_up()?;
            let workload = scalable_workload(&workload)?;
            let event = send_control(paths, Control::Roll { workload })?;
            print_event(&event, output);
            Ok(0)
        }
        TrafficCommand::Manifests { seed } => {
            print!("{}", manifests(seed));
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_makes_the_same_choices() {
        let a: Vec<u64> = (0..5)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..5)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        let mut r = Rng::new(8);
        assert_ne!(a[0], r.next_u64());
        for _ in 0..1000 {
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
            assert!(r.below(3) < 3);
        }
        assert_eq!(manifests(3), manifests(3));
        assert_ne!(manifests(3), manifests(4));
    }

    #[test]
    fn the_shop_parses_and_every_service_selects_its_workload() {
        let objects = model::parse_documents(&manifests(1), "shop").unwrap();
        let cluster = model::Cluster::from_objects(objects);
        assert_eq!(cluster.pods().len(), WORKLOADS.iter().map(|w| w.replicas).sum::<usize>());
        for (w, name, _, target, _) in SERVICES {
            let s = cluster.service(WORKLOADS[w].namespace, name).unwrap();
            let selector = s.selector.clone().unwrap();
            let selected = cluster
                .pods()
                .iter()
                .filter(|((ns, _), p)| {
                    let labels = model::pod_labels(p);
                    ns == WORKLOADS[w].namespace && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                })
                .count();
            assert_eq!(selected, WORKLOADS[w].replicas, "{name}");
            assert!(
                WORKLOADS[w].tcp.contains(&target) || WORKLOADS[w].udp.contains(&target),
                "{name} serves {target}"
            );
        }
        // Every request kind only calls Services a workload serves.
        for (_, _, calls) in KINDS {
            assert_eq!(calls[0].from, LOADGEN);
        }
    }

    #[test]
    fn scale_and_roll_make_the_pods_they_say() {
        let mut shop = Shop {
            replicas: vec![Vec::new(); WORKLOADS.len()],
            revisions: vec![None; WORKLOADS.len()],
            ..Shop::default()
        };
        shop.replicas[FRONTEND] = ["shop-web/frontend-aaaaa-00001", "shop-web/frontend-aaaaa-00002"]
            .iter()
            .map(|k| Replica {
                key: k.to_string(),
                netns: "n".into(),
            })
            .collect();
        shop.revisions[FRONTEND] = Some("aaaaa".into());
        let mut rng = Rng::new(1);
        let up = scale_change(&shop, FRONTEND, 4, &mut rng);
        assert_eq!(up.kind, "scale-up");
        assert_eq!(up.added.len(), 2);
        assert!(
            up.added.iter().all(|(n, h)| n.starts_with("frontend-aaaaa-") && h == "aaaaa"),
            "{up:?}"
        );
        assert!(up.removed.is_empty());
        let down = scale_change(&shop, FRONTEND, 1, &mut rng);
        assert_eq!(down.kind, "scale-down");
        assert!(down.added.is_empty());
        assert_eq!(down.removed, ["shop-web/frontend-aaaaa-00002"]);
        assert!(scale_change(&shop, FRONTEND, 2, &mut rng).added.is_empty());
        let roll = roll_change(&shop, FRONTEND, &mut rng);
        assert_eq!(roll.kind, "restart");
        assert_eq!(roll.removed.len(), 2);
        assert_eq!(roll.added.len(), 2);
        assert!(
            roll.added
                .iter()
                .all(|(n, h)| h != "aaaaa" && n.starts_with(&format!("frontend-{h}-"))),
            "{roll:?}"
        );
        assert_ne!(roll.added[0].0, roll.added[1].0);

        assert_eq!(scalable_workload("orders").unwrap(), ORDERS);
        assert_eq!(scalable_workload("shop-web/frontend").unwrap(), FRONTEND);
        assert!(scalable_workload("postgres").is_err());
        assert!(scalable_workload("shop-api/frontend").is_err());
        let c = Control::Scale { workload: 1, replicas: 3 };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(text, r#"{"op":"scale","workload":1,"replicas":3}"#);
        assert_eq!(serde_json::from_str::<Control>(&text).unwrap(), c);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").is_err());
    }
}
