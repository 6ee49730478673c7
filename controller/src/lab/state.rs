//! The lab's on-disk state: `lab.json`, the model file, the lock, and the paths of everything.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::LabError;

/// Everything the lab made, written before each resource is created so `down` finds it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabState {
    /// 4 hex chars used in every name.
    pub id: String,
    /// The cluster CIDR the pod CIDRs come from.
    pub cluster_cidr: String,
    /// Netns of the underlay bridge (labs made before the outside host had none with one node).
    pub underlay_netns: Option<String>,
    /// The underlay /24, outside the cluster CIDR (absent in older labs).
    #[serde(default)]
    pub underlay_cidr: Option<String>,
    /// How the agents route between nodes: `native` or `vxlan`.
    #[serde(default = "default_routing")]
    pub routing: String,
    /// The nodes.
    pub nodes: Vec<NodeState>,
    /// The outside host on the underlay (absent in older labs).
    #[serde(default)]
    pub world: Option<WorldState>,
    /// The pods.
    pub pods: Vec<PodState>,
    /// The CIDR ClusterIPs come from, outside the cluster CIDR, the underlay and host routes
    /// (absent in older labs: picked when first needed).
    #[serde(default)]
    pub service_cidr: Option<String>,
    /// `namespace/name` of every EndpointSlice the lab wrote (its pod Services' and the
    /// slice controller's), replaced on each change; the user's slices are not listed.
    #[serde(default)]
    pub managed_slices: Vec<String>,
    /// Ports `probe --via service` added to every pod Service.
    #[serde(default)]
    pub service_probe_ports: Vec<super::services::ExtraPort>,
    /// The pid of the lab's relay (absent in older labs).
    #[serde(default)]
    pub relay_pid: Option<u32>,
    /// Extra arguments of the lab's relay (`lab up --relay-arg`), kept across restarts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relay_args: Vec<String>,
}

fn default_routing() -> String {
    "native".into()
}

/// The lab's outside host: a namespace on the underlay with no route to any pod CIDR.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorldState {
    /// Its netns name under /run/netns.
    pub netns: String,
    /// Its address on the underlay, outside the cluster CIDR.
    pub ip: String,
    /// TCP and UDP echo ports.
    pub echo_ports: Vec<u16>,
    /// TCP ports that answer with the peer's address.
    pub peer_ports: Vec<u16>,
    /// Its server's pid.
    pub server_pid: Option<u32>,
    /// Addresses of the outside host in other /16s, which no workload of the lab uses: a
    /// destination that is new to every baseline (absent in older labs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_ips: Vec<String>,
}

impl WorldState {
    /// Every port it serves, sorted.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.echo_ports.iter().chain(&self.peer_ports).copied().collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// One lab node.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    /// `node0`, `node1`, ...
    pub name: String,
    /// Its netns name under /run/netns.
    pub netns: String,
    /// Its pod CIDR.
    pub pod_cidr: String,
    /// Its address on the underlay.
    pub underlay_ip: Option<String>,
    /// The agent's pid once spawned.
    pub agent_pid: Option<u32>,
    /// The host-namespace loopback port the agent serves `/metrics` on.
    #[serde(default)]
    pub metrics_port: Option<u16>,
    /// Where the agent serves its flow stream to the relay (`IP:PORT` on the underlay).
    #[serde(default)]
    pub flow_address: Option<String>,
}

impl NodeState {
    /// `http://127.0.0.1:PORT/metrics`, once the agent serves metrics.
    pub fn metrics_url(&self) -> Option<String> {
        self.metrics_port.map(|p| format!("http://127.0.0.1:{p}/metrics"))
    }
}

/// One lab pod.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodState {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Node it runs on.
    pub node: String,
    /// Its netns name under /run/netns.
    pub netns: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// Its IP once CNI ADD returned.
    pub ip: Option<String>,
    /// The pod server's pid.
    pub server_pid: Option<u32>,
    /// Served TCP ports.
    pub tcp_ports: Vec<u16>,
    /// Served UDP ports.
    pub udp_ports: Vec<u16>,
}

impl PodState {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl LabState {
    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodState> {
        self.pods.iter().find(|p| p.namespace == namespace && p.name == name)
    }

    /// The pod `namespace/name`, mutably.
    pub fn pod_mut(&mut self, namespace: &str, name: &str) -> Option<&mut PodState> {
        self.pods.iter_mut().find(|p| p.namespace == namespace && p.name == name)
    }
}

/// Paths inside the lab dir.
#[derive(Clone, Debug)]
pub struct LabPaths {
    /// The lab dir, absolute.
    pub dir: PathBuf,
}

/// Source ports the lab's UDP probes use: below the kernel's ephemeral range (32768 and up),
/// so they never meet a port the kernel handed out.
pub const PROBE_PORTS: std::ops::Range<u16> = 20_000..32_000;

impl LabPaths {
    /// Paths under `dir`, made absolute so they name the same place from any process.
    pub fn new(dir: &Path) -> Result<Self, LabError> {
        let dir = std::path::absolute(dir).map_err(|source| LabError::Io {
            op: "resolve",
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self { dir })
    }

    /// `lab.json`.
    pub fn state(&self) -> PathBuf {
        self.dir.join("lab.json")
    }

    /// The agents' manifests dir.
    pub fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Where labs before per-object files kept the whole model: read if present, removed
    /// by the next write.
    pub fn legacy_cluster_yaml(&self) -> PathBuf {
        self.manifests().join("cluster.yaml")
    }

    /// A node's agent state dir.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }

    /// A node's agent socket.
    pub fn agent_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("agent.sock")
    }

    /// Log file of the outside host's server.
    pub fn world_log(&self) -> PathBuf {
        self.dir.join("world.log")
    }

    /// Log file of a pod server.
    pub fn pod_log(&self, pod: &PodState) -> PathBuf {
        self.dir.join("pods").join(format!("{}_{}.log", pod.namespace, pod.name))
    }

    /// The lock serialising lab commands.
    pub fn lock_file(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// Takes the lab lock, creating the lab dir; released on drop.
    pub fn lock(&self) -> Result<Flock<File>, LabError> {
        create_dir(&self.dir)?;
        let path = self.lock_file();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| LabError::Io {
                op: "open",
                path: path.clone(),
                source,
            })?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| LabError::Io {
            op: "lock",
            path,
            source: e.into(),
        })
    }

    /// Reserves `count` UDP source ports for one probe run and returns the first. Successive
    /// runs take successive blocks of [`PROBE_PORTS`], wrapping around, so a probe never reuses
    /// the 5-tuple of a recent one: a conntrack entry a previous (allowed) probe left would
    /// otherwise admit a datagram the current policy denies, as any established flow is.
    pub fn take_probe_ports(&self, count: u16) -> Result<u16, LabError> {
        let _lock = self.lock()?;
        let path = self.dir.join("probe-port");
        let next = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse::<u16>().ok())
            .filter(|p| PROBE_PORTS.contains(p))
            .unwrap_or(PROBE_PORTS.start);
        let base = if next.saturating_add(count) > PROBE_PORTS.end {
            PROBE_PORTS.start
        } else {
            next
        };
        write_atomic(&path, format!("{}\n", base.saturating_add(count)).as_bytes())?;
        Ok(base)
    }

    /// Reads `lab.json`; `None` when the lab is not up.
    pub fn load(&self) -> Result<Option<LabState>, LabError> {
        let path = self.state();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| LabError::State { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LabError::Io { op: "read", path, source }),
        }
    }

    /// Reads `lab.json`, failing when the lab is not up.
    pub fn load_up(&self) -> Result<LabState, LabError> {
        self.load()?.ok_or_else(|| LabError::NotUp { lab_dir: self.dir.clone() })
    }

    /// Writes `lab.json` atomically.
    pub fn save(&self, state: &LabState) -> Result<(), LabError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|source| LabError::State {
            path: self.state(),
            source,
        })?;
        write_atomic(&self.state(), &bytes)
    }
}

/// The prefix of the lab's own files in the manifests directory.
const OBJECT_FILE_PREFIX: &str = "lab_";

/// The file of one object in the manifests directory: `lab_<kind>_<namespace>_<name>.yaml`
/// (namespace empty for Namespaces and Nodes). Kubernetes names never hold `_` or `/`, so
/// the name is unique and safe.
pub fn object_file_name(r: &crate::model::ObjectRef) -> String {
    format!(
        "{OBJECT_FILE_PREFIX}{}_{}_{}.yaml",
        r.kind.to_string().to_ascii_lowercase(),
        r.namespace.as_deref().unwrap_or_default(),
        r.name
    )
}

/// Whether `path` is one of the lab's object files.
pub fn is_object_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(OBJECT_FILE_PREFIX) && n.ends_with(".yaml"))
}

/// Creates `dir` and its parents.
pub fn create_dir(dir: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(dir).map_err(|source| LabError::Io {
        op: "create dir",
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `path` atomically (readers never see half a file).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LabError> {
    bulkhead_hostnet::fs::write_atomic(path, bytes, 0o644).map_err(|e| LabError::Io {
        op: e.op,
        path: e.path,
        source: e.source,
    })
}

#[cfg(test)]
mod probe_port_tests {
    use super::*;

    #[test]
    fn probe_port_blocks_follow_each_other_and_wrap() {
        let dir = std::env::temp_dir().join(format!("bh-probe-ports-{}", std::process::id()));
        let paths = LabPaths::new(&dir).unwrap();
        assert_eq!(paths.take_probe_ports(72).unwrap(), PROBE_PORTS.start);
        assert_eq!(paths.take_probe_ports(72).unwrap(), PROBE_PORTS.start + 72);
        assert_eq!(paths.take_probe_ports(8).unwrap(), PROBE_PORTS.start + 144);
        // A block that would run past the range starts over at its beginning.
        std::fs::write(dir.join("probe-port"), format!("{}\n", PROBE_PORTS.end - 10)).unwrap();
        assert_eq!(paths.take_probe_ports(72).unwrap(), PROBE_PORTS.start);
        // Garbage in the file restarts the sequence rather than failing the probe.
        std::fs::write(dir.join("probe-port"), "x\n").unwrap();
        assert_eq!(paths.take_probe_ports(1).unwrap(), PROBE_PORTS.start);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
