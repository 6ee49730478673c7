//! The agent's configuration: flags, `BULKHEAD_*` environment variables and a YAML file.
//!
//! Precedence, highest first: a command-line flag, its `BULKHEAD_*` environment variable
//! (clap reads both into [`AgentArgs::settings`]), the `--config` file, the default
//! ([`Settings::defaults`]). The file's keys are the long flag names: `node-name`, `source`,
//! `kubeconfig`, `manifests`, `state-dir`, `bpffs`, `pod-cidr`, `metrics-address`,
//! `flow-history`, `routing`, `vxlan-vni`, `vxlan-port`, `cluster-cidr`,
//! `non-masquerade-cidrs`, `masquerade`, `services`, `flow-address`, `flow-token-file`,
//! `pod-xdp`, `prefilter-devices`, `prefilter-deny-file`, `quarantine-allow-node`. In a DaemonSet the node name comes from the downward API
//! (`BULKHEAD_NODE_NAME` from `spec.nodeName`) and the rest from a ConfigMap file.
//!
//! Every setting is declared once, in [`Settings`]: the same struct is the flags (clap), the
//! file (serde) and the defaults, and the layers are merged by [`Settings::or`].
//! `--config` and `--metrics-fd` are not settings (no file key): they live in [`AgentArgs`].

use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use serde::Deserialize;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/run/bulkhead";
/// Default bpffs pin directory.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/bulkhead";
/// Default address for `/metrics` and `/healthz`.
pub const DEFAULT_METRICS_ADDRESS: &str = crate::metrics::DEFAULT_ADDRESS;
/// Default number of flow records kept in memory.
pub const DEFAULT_FLOW_HISTORY: usize = crate::flows::DEFAULT_HISTORY;

/// Where the cluster model comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Watch the Kubernetes API server.
    Kubernetes,
    /// Read a directory of manifests (`--manifests`).
    Files,
    /// No source: an empty cluster, every pod isolated.
    None,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid YAML of the expected shape (an unknown key, a bad value).
    /// The cause names the key (`unknown field `node_name``, `flow-history: invalid type`).
    #[error("config file {path}: invalid")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The key at fault (`node_name`, `flow-history`), when the error is not the whole file's.
        key: Option<String>,
        /// Cause (names an unknown key).
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A required setting is missing everywhere.
    #[error("{setting} is not set (flag --{setting}, env {env}, or key {setting} in the config file)")]
    Missing {
        /// The flag and file key.
        setting: &'static str,
        /// The environment variable.
        env: &'static str,
    },
    /// `source: files` without a manifests directory.
    #[error("source files needs a manifests directory (--manifests)")]
    NoManifests,
}

/// Declares [`Settings`] (every field an `Option`, the doc and attributes once) and its
/// layering, so that adding a setting is one entry here.
macro_rules! settings {
    ($($(#[$attr:meta])* $field:ident: $ty:ty,)*) => {
        /// The agent's settings, one layer of them: the flags and `BULKHEAD_*` variables
        /// (clap), the `--config` file (serde, the long flag names as keys) or the defaults.
        /// `None`: not given in this layer.
        #[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args, Deserialize)]
        #[serde(rename_all = "kebab-case", deny_unknown_fields)]
        pub struct Settings {
            $($(#[$attr])* pub $field: Option<$ty>,)*
        }

        impl Settings {
            /// This layer over `lower`: each setting not given here comes from `lower`.
            #[must_use]
            pub fn or(self, lower: Settings) -> Settings {
                Settings {
                    $($field: self.$field.or(lower.$field),)*
                }
            }
        }
    };
}

settings! {
    /// This node's name (in a DaemonSet: the downward API's `spec.nodeName`).
    #[arg(long, env = "BULKHEAD_NODE_NAME")]
    node_name: String,
    /// Where the model comes from [default: files with --manifests, kubernetes in a pod or
    /// with --kubeconfig, else none].
    #[arg(long, env = "BULKHEAD_SOURCE", value_enum)]
    source: SourceKind,
    /// Kubeconfig for the kubernetes source [default: KUBECONFIG, ~/.kube/config, in-cluster].
    #[arg(long, env = "BULKHEAD_KUBECONFIG")]
    kubeconfig: PathBuf,
    /// A directory of Namespace, Pod and NetworkPolicy manifests (local-files source).
    #[arg(long, env = "BULKHEAD_MANIFESTS")]
    manifests: PathBuf,
    /// State directory: the endpoint socket (`agent.sock`), the endpoint registry and
    /// `pod-cidr` [default: /run/bulkhead].
    #[arg(long, env = "BULKHEAD_STATE_DIR")]
    state_dir: PathBuf,
    /// bpffs directory where maps are pinned [default: /sys/fs/bpf/bulkhead].
    #[arg(long, env = "BULKHEAD_BPFFS")]
    bpffs: PathBuf,
    /// This node's pod CIDR; the kubernetes source learns it from the Node otherwise.
    #[arg(long, env = "BULKHEAD_POD_CIDR")]
    #[serde(default, deserialize_with = "optional_pod_cidr")]
    pod_cidr: Ipv4Network,
    /// Flow records kept in memory for `bulkhead observe`; the oldest fall out [default: 8192].
    #[arg(long, env = "BULKHEAD_FLOW_HISTORY")]
    flow_history: usize,
    /// Address to serve `/metrics` and `/healthz` on; `none` disables [default: 0.0.0.0:9962].
    #[arg(long, env = "BULKHEAD_METRICS_ADDRESS")]
    metrics_address: String,
    /// How pods on other nodes are reached: `native` (a route to each node's pod CIDR via
    /// its InternalIP), `vxlan` (a VXLAN overlay) or `none` (someone else routes) [default: native].
    #[arg(long, env = "BULKHEAD_ROUTING", value_enum)]
    routing: RoutingKind,
    /// The VXLAN network identifier in `vxlan` routing [default: 1].
    #[arg(long, env = "BULKHEAD_VXLAN_VNI")]
    vxlan_vni: u32,
    /// The VXLAN UDP port in `vxlan` routing [default: 4789].
    #[arg(long, env = "BULKHEAD_VXLAN_PORT")]
    vxlan_port: u16,
    /// The cluster's pod address range: traffic from it to anywhere outside it, outside
    /// `non-masquerade-cidrs` and to no node is masqueraded. Without it nothing is.
    #[arg(long, env = "BULKHEAD_CLUSTER_CIDR")]
    #[serde(default, deserialize_with = "optional_cluster_cidr")]
    cluster_cidr: Ipv4Network,
    /// Destinations pod traffic reaches with its pod address (comma-separated CIDRs).
    #[arg(long, env = "BULKHEAD_NON_MASQUERADE_CIDRS", value_delimiter = ',')]
    #[serde(default, deserialize_with = "optional_cidrs")]
    non_masquerade_cidrs: Vec<Ipv4Network>,
    /// Masquerade pod traffic leaving the cluster (`--masquerade=false` turns it off)
    /// [default: true].
    #[arg(long, env = "BULKHEAD_MASQUERADE", action = clap::ArgAction::Set)]
    masquerade: bool,
    /// Translate pod traffic to ClusterIP Services in the datapath, before egress policy
    /// (`--services=false` leaves it to kube-proxy: egress to a ClusterIP is then decided on
    /// the ClusterIP) [default: true].
    #[arg(long, env = "BULKHEAD_SERVICES", action = clap::ArgAction::Set)]
    services: bool,
    /// Serve this node's flow stream to `bulkhead relay` on this TCP address (`HOST:PORT`),
    /// token-authenticated; `none` disables [default: none].
    #[arg(long, env = "BULKHEAD_FLOW_ADDRESS")]
    flow_address: String,
    /// A file holding the token a relay must present on the flow port (e.g. a Secret
    /// mounted into the DaemonSet); required with `flow-address`.
    #[arg(long, env = "BULKHEAD_FLOW_TOKEN_FILE")]
    flow_token_file: PathBuf,
    /// Put XDP on each pod's host veth too: it drops, before an skb exists, what TC would
    /// certainly drop (a spoofed source, a new flow egress policy denies) and passes the rest
    /// to TC. Off by default: on a veth the pod's stack has built the skb already, and XDP
    /// measured no faster than TC at the same drop (bench/xdp.md) while adding a program to
    /// every pod packet [default: false].
    #[arg(long, env = "BULKHEAD_POD_XDP", action = clap::ArgAction::Set)]
    pod_xdp: bool,
    /// The node's uplink device(s) the XDP prefilter runs on (comma-separated); without them
    /// there is no prefilter.
    #[arg(long, env = "BULKHEAD_PREFILTER_DEVICES", value_delimiter = ',')]
    prefilter_devices: Vec<String>,
    /// The prefilter's deny list: a file of IPv4 addresses and CIDRs, one a line (`#`
    /// comments). Packets from them are dropped on the prefilter devices, except from this
    /// node's addresses and subnets and the cluster and pod CIDRs. Re-read when it changes;
    /// a bad line keeps the list in force.
    #[arg(long, env = "BULKHEAD_PREFILTER_DENY_FILE")]
    prefilter_deny_file: PathBuf,
    /// A quarantined pod still exchanges packets with its own node (kubelet probes,
    /// forensics from the node); `false` cuts the node off too [default: true].
    #[arg(long, env = "BULKHEAD_QUARANTINE_ALLOW_NODE", action = clap::ArgAction::Set)]
    quarantine_allow_node: bool,
}

fn optional_pod_cidr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Ipv4Network>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    text.map(|t| parse_cidr::<D::Error>("pod-cidr", &t)).transpose()
}

fn optional_cluster_cidr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Ipv4Network>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    text.map(|t| parse_cidr::<D::Error>("cluster-cidr", &t)).transpose()
}

fn optional_cidrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<Ipv4Network>>, D::Error> {
    let list: Option<Vec<String>> = Option::deserialize(d)?;
    list.map(|l| l.iter().map(|t| parse_cidr::<D::Error>("non-masquerade-cidrs", t)).collect())
        .transpose()
}

/// The file parser does not name the key of a value a custom deserializer rejects: the
/// message does.
fn parse_cidr<E: serde::de::Error>(key: &str, text: &str) -> Result<Ipv4Network, E> {
    text.parse()
        .map_err(|e| E::custom(format!("{key}: {text:?} is not an ipv4 cidr: {e}")))
}

/// How pods on other nodes are reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingKind {
    /// A route to each other node's pod CIDR via its InternalIP (nodes share a link).
    Native,
    /// A VXLAN device and a route per remote pod CIDR through it.
    Vxlan,
    /// The agent installs no routes (the network routes pod CIDRs itself).
    None,
}

impl Settings {
    /// The defaults: the one place the agent's defaults are decided. `source` has none here;
    /// [`Settings::resolve`] infers it.
    pub fn defaults() -> Settings {
        Settings {
            state_dir: Some(DEFAULT_STATE_DIR.into()),
            bpffs: Some(DEFAULT_BPFFS.into()),
            metrics_address: Some(DEFAULT_METRICS_ADDRESS.into()),
            flow_history: Some(DEFAULT_FLOW_HISTORY),
            routing: Some(RoutingKind::Native),
            vxlan_vni: Some(crate::routing::DEFAULT_VXLAN_VNI),
            vxlan_port: Some(crate::routing::DEFAULT_VXLAN_PORT),
            non_masquerade_cidrs: Some(Vec::new()),
            masquerade: Some(true),
            services: Some(true),
            flow_address: Some("none".into()),
            pod_xdp: Some(false),
            prefilter_devices: Some(Vec::new()),
            quarantine_allow_node: Some(true),
            ..Settings::default()
        }
    }

    /// Reads a `--config` file (empty: no settings).
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if text.trim().is_empty() {
            return Ok(Settings::default());
        }
        serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(&text)).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Parse {
                path: path.to_path_buf(),
                key: (key != ".").then_some(key),
                source: e.into_inner(),
            }
        })
    }

    /// Completes the merged layers: the node name is required, the defaults fill the rest.
    /// Without an explicit source: `files` when a manifests directory is set, `kubernetes`
    /// when a kubeconfig is set or the agent runs in a pod (`in_cluster`), else `none`.
    pub fn resolve(self, in_cluster: bool) -> Result<AgentConfig, ConfigError> {
        let s = self.or(Settings::defaults());
        let node_name = required(s.node_name.filter(|n| !n.is_empty()), "node-name", "BULKHEAD_NODE_NAME")?;
        let source = match s.source {
            Some(kind) => kind,
            None if s.manifests.is_some() => SourceKind::Files,
            None if s.kubeconfig.is_some() || in_cluster => SourceKind::Kubernetes,
            None => SourceKind::None,
        };
        if source == SourceKind::Files && s.manifests.is_none() {
            return Err(ConfigError::NoManifests);
        }
        let flow_address = s.flow_address.filter(|a| a != "none" && !a.is_empty());
        Ok(AgentConfig {
            node_name,
            source,
            kubeconfig: s.kubeconfig,
            manifests: s.manifests,
            state_dir: required(s.state_dir, "state-dir", "BULKHEAD_STATE_DIR")?,
            bpffs: required(s.bpffs, "bpffs", "BULKHEAD_BPFFS")?,
            pod_cidr: s.pod_cidr,
            metrics_address: required(s.metrics_address, "metrics-address", "BULKHEAD_METRICS_ADDRESS")?,
            flow_history: required(s.flow_history, "flow-history", "BULKHEAD_FLOW_HISTORY")?,
            routing: required(s.routing, "routing", "BULKHEAD_ROUTING")?,
            vxlan_vni: required(s.vxlan_vni, "vxlan-vni", "BULKHEAD_VXLAN_VNI")?,
            vxlan_port: required(s.vxlan_port, "vxlan-port", "BULKHEAD_VXLAN_PORT")?,
            cluster_cidr: s.cluster_cidr,
            non_masquerade_cidrs: s.non_masquerade_cidrs.unwrap_or_default(),
            masquerade: required(s.masquerade, "masquerade", "BULKHEAD_MASQUERADE")?,
            services: required(s.services, "services", "BULKHEAD_SERVICES")?,
            flow_token_file: match (&flow_address, s.flow_token_file) {
                (Some(_), None) => {
                    return Err(ConfigError::Missing {
                        setting: "flow-token-file",
                        env: "BULKHEAD_FLOW_TOKEN_FILE",
                    })
                }
                (_, file) => file,
            },
            flow_address,
            pod_xdp: required(s.pod_xdp, "pod-xdp", "BULKHEAD_POD_XDP")?,
            quarantine_allow_node: required(s.quarantine_allow_node, "quarantine-allow-node", "BULKHEAD_QUARANTINE_ALLOW_NODE")?,
            prefilter_devices: s
                .prefilter_devices
                .unwrap_or_default()
                .into_iter()
                .filter(|d| !d.is_empty())
                .collect(),
            prefilter_deny_file: s.prefilter_deny_file,
        })
    }
}

fn required<T>(value: Option<T>, setting: &'static str, env: &'static str) -> Result<T, ConfigError> {
    value.ok_or(ConfigError::Missing { setting, env })
}

/// The agent's settings after precedence is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// This node's name.
    pub node_name: String,
    /// Where the model comes from.
    pub source: SourceKind,
    /// Kubeconfig file (else `KUBECONFIG`, `~/.kube/config` or in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// Manifests directory for the files source.
    pub manifests: Option<PathBuf>,
    /// State directory.
    pub state_dir: PathBuf,
    /// bpffs pin directory.
    pub bpffs: PathBuf,
    /// This node's pod CIDR when set by the operator.
    pub pod_cidr: Option<Ipv4Network>,
    /// Where `/metrics` and `/healthz` are served (`none` disables).
    pub metrics_address: String,
    /// Flow records kept in memory for `bulkhead observe`.
    pub flow_history: usize,
    /// How pods on other nodes are reached.
    pub routing: RoutingKind,
    /// VXLAN network identifier.
    pub vxlan_vni: u32,
    /// VXLAN UDP port.
    pub vxlan_port: u16,
    /// The cluster's pod range, for masquerade.
    pub cluster_cidr: Option<Ipv4Network>,
    /// Destinations never masqueraded.
    pub non_masquerade_cidrs: Vec<Ipv4Network>,
    /// Whether pod traffic leaving the cluster is masqueraded.
    pub masquerade: bool,
    /// Whether the datapath translates ClusterIP Services.
    pub services: bool,
    /// Where the flow stream for the relay is served (`None`: not served).
    pub flow_address: Option<String>,
    /// The token file the flow stream's readers must match (set with `flow_address`).
    pub flow_token_file: Option<PathBuf>,
    /// Whether pods' host veths get `xdp_from_pod` as well as the TC programs.
    pub pod_xdp: bool,
    /// Whether a quarantined pod still exchanges packets with its own node.
    pub quarantine_allow_node: bool,
    /// The uplink devices the prefilter runs on (none: no prefilter).
    pub prefilter_devices: Vec<String>,
    /// The prefilter's deny-list file.
    pub prefilter_deny_file: Option<PathBuf>,
}

/// `bulkhead agent` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// YAML file with the same keys as the setting flags; flags and `BULKHEAD_*` override it.
    #[arg(long, env = "BULKHEAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// The settings given as flags or `BULKHEAD_*` variables.
    #[command(flatten)]
    pub settings: Settings,
    /// Serve metrics on this inherited listening socket instead (overrides the address).
    #[arg(long)]
    pub metrics_fd: Option<i32>,
}

impl AgentArgs {
    /// Applies the config file and the defaults (see [`Settings::resolve`]); in a pod when
    /// `KUBERNETES_SERVICE_HOST` is set.
    pub fn resolve(&self) -> Result<AgentConfig, ConfigError> {
        self.resolve_in(std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
    }

    fn resolve_in(&self, in_cluster: bool) -> Result<AgentConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => Settings::read(path)?,
            None => Settings::default(),
        };
        self.settings.clone().or(file).resolve(in_cluster)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use clap::Parser;

    use super::*;

    /// Serializes the tests that read or set `BULKHEAD_*` variables.
    static ENV: Mutex<()> = Mutex::new(());

    /// The environment variables of the settings.
    const ENVS: [&str; 10] = [
        "BULKHEAD_NODE_NAME",
        "BULKHEAD_SOURCE",
        "BULKHEAD_KUBECONFIG",
        "BULKHEAD_MANIFESTS",
        "BULKHEAD_STATE_DIR",
        "BULKHEAD_BPFFS",
        "BULKHEAD_POD_CIDR",
        "BULKHEAD_FLOW_HISTORY",
        "BULKHEAD_METRICS_ADDRESS",
        "BULKHEAD_CONFIG",
    ];

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn file(yaml: &str) -> Settings {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn named(node: &str) -> Settings {
        Settings {
            node_name: Some(node.into()),
            ..Settings::default()
        }
    }

    /// Parses `agent` flags with exactly `env` set, then resolves outside a pod.
    fn parse_with_env(flags: &[&str], env: &[(&str, &str)]) -> Result<AgentArgs, clap::Error> {
        for var in ENVS {
            std::env::remove_var(var);
        }
        for (var, value) in env {
            std::env::set_var(var, value);
        }
        let parsed = Cli::try_parse_from(std::iter::once("agent").chain(flags.iter().copied()));
        for (var, _) in env {
            std::env::remove_var(var);
        }
        parsed.map(|c| c.agent)
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("bulkhead-config-{}-{name}.yaml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let f = file("node-name: from-file\nstate-dir: /file/state\nsource: kubernetes\npod-cidr: 10.1.0.0/24\n");
        let c = named("from-flag").or(f).resolve(false).unwrap();
        assert_eq!(c.node_name, "from-flag");
        assert_eq!(c.state_dir, PathBuf::from("/file/state"));
        assert_eq!(c.bpffs, PathBuf::from(DEFAULT_BPFFS));
        assert_eq!(c.source, SourceKind::Kubernetes);
        assert_eq!(c.pod_cidr, Some("10.1.0.0/24".parse().unwrap()));
    }

    #[test]
    fn the_shipped_configmap_is_a_valid_config_file() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/configmap.yaml")).unwrap();
        let cm: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        let config = cm["data"]["config.yaml"].as_str().expect("config.yaml key");
        let c = named("node-a").or(file(config)).resolve(true).unwrap();
        assert_eq!(c.source, SourceKind::Kubernetes);
        assert_eq!(c.metrics_address, "0.0.0.0:9962");
    }

    #[test]
    fn the_source_is_inferred() {
        let with_manifests = Settings {
            manifests: Some("/m".into()),
            ..named("n")
        };
        assert_eq!(with_manifests.resolve(true).unwrap().source, SourceKind::Files);
        assert_eq!(named("n").resolve(true).unwrap().source, SourceKind::Kubernetes);
        assert_eq!(named("n").resolve(false).unwrap().source, SourceKind::None);
        let with_kubeconfig = Settings {
            kubeconfig: Some("/k".into()),
            ..named("n")
        };
        assert_eq!(with_kubeconfig.resolve(false).unwrap().source, SourceKind::Kubernetes);
    }

    #[test]
    fn a_missing_node_name_and_unknown_keys_are_errors() {
        let e = Settings::default().resolve(false).unwrap_err();
        assert!(e.to_string().contains("BULKHEAD_NODE_NAME"), "{e}");
        assert!(serde_yaml_ng::from_str::<Settings>("node_name: x\n").is_err());
        let files_without_dir = Settings {
            source: Some(SourceKind::Files),
            ..named("n")
        };
        assert!(matches!(files_without_dir.resolve(false), Err(ConfigError::NoManifests)));
    }

    #[test]
    fn file_errors_name_the_file_and_the_key() {
        let unknown = temp_file("unknown", "node-name: a\nnode_name: b\n");
        let e = Settings::read(&unknown).unwrap_err();
        let text = crate::error_chain(&e);
        assert!(
            text.contains(&unknown.display().to_string()) && text.contains("node_name"),
            "{text}"
        );
        let bad = temp_file("bad", "flow-history: lots\n");
        let e = Settings::read(&bad).unwrap_err();
        let text = crate::error_chain(&e);
        assert!(text.contains(&bad.display().to_string()) && text.contains("flow-history"), "{text}");
        let cidr = temp_file("cidr", "pod-cidr: 10.0.0.0/33\n");
        let text = crate::error_chain(&Settings::read(&cidr).unwrap_err());
        assert!(text.contains("pod-cidr") && text.contains("10.0.0.0/33"), "{text}");
        let empty = temp_file("empty", "\n");
        assert_eq!(Settings::read(&empty).unwrap(), Settings::default());
        for path in [unknown, bad, cidr, empty] {
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn bad_flag_and_env_values_name_the_flag() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let e = parse_with_env(&["--flow-history", "lots"], &[]).err().unwrap();
        assert!(e.to_string().contains("--flow-history"), "{e}");
        let e = parse_with_env(&[], &[("BULKHEAD_POD_CIDR", "nope")]).err().unwrap();
        assert!(e.to_string().contains("--pod-cidr"), "{e}");
        // --metrics-fd and --config are flags, not file keys.
        assert!(serde_yaml_ng::from_str::<Settings>("metrics-fd: 3\n").is_err());
        assert!(serde_yaml_ng::from_str::<Settings>("config: /x\n").is_err());
        let args = parse_with_env(&["--metrics-fd", "3", "--config", "/x"], &[]).unwrap();
        assert_eq!((args.metrics_fd, args.config), (Some(3), Some("/x".into())));
    }

    /// One setting in the precedence test: its flag, variable and file key, a distinct value
    /// for each of the three layers, and what the resolved config shows for each layer and
    /// for the default (`None`: no default, an error).
    struct Row {
        flag: &'static str,
        env: &'static str,
        values: [&'static str; 3],
        extra: &'static [&'static str],
        shown: [Option<&'static str>; 4],
        get: fn(&AgentConfig) -> String,
    }

    #[test]
    fn every_setting_is_flag_then_env_then_file_then_default() {
        let rows = [
            Row {
                flag: "node-name",
                env: "BULKHEAD_NODE_NAME",
                values: ["flag", "env", "file"],
                extra: &[],
                shown: [Some("flag"), Some("env"), Some("file"), None],
                get: |c| c.node_name.clone(),
            },
            Row {
                // Each layer differs from the one below it; the default is inferred (files).
                flag: "source",
                env: "BULKHEAD_SOURCE",
                values: ["files", "none", "kubernetes"],
                extra: &["--manifests", "/m"],
                shown: [Some("Files"), Some("None"), Some("Kubernetes"), Some("Files")],
                get: |c| format!("{:?}", c.source),
            },
            Row {
                flag: "kubeconfig",
                env: "BULKHEAD_KUBECONFIG",
                values: ["/flag", "/env", "/file"],
                extra: &[],
                shown: [
                    Some("Some(\"/flag\")"),
                    Some("Some(\"/env\")"),
                    Some("Some(\"/file\")"),
                    Some("None"),
                ],
                get: |c| format!("{:?}", c.kubeconfig),
            },
            Row {
                flag: "manifests",
                env: "BULKHEAD_MANIFESTS",
                values: ["/flag", "/env", "/file"],
                extra: &[],
                shown: [
                    Some("Some(\"/flag\")"),
                    Some("Some(\"/env\")"),
                    Some("Some(\"/file\")"),
                    Some("None"),
                ],
                get: |c| format!("{:?}", c.manifests),
            },
            Row {
                flag: "state-dir",
                env: "BULKHEAD_STATE_DIR",
                values: ["/flag", "/env", "/file"],
                extra: &[],
                shown: [Some("/flag"), Some("/env"), Some("/file"), Some(DEFAULT_STATE_DIR)],
                get: |c| c.state_dir.display().to_string(),
            },
            Row {
                flag: "bpffs",
                env: "BULKHEAD_BPFFS",
                values: ["/flag", "/env", "/file"],
                extra: &[],
                shown: [Some("/flag"), Some("/env"), Some("/file"), Some(DEFAULT_BPFFS)],
                get: |c| c.bpffs.display().to_string(),
            },
            Row {
                flag: "pod-cidr",
                env: "BULKHEAD_POD_CIDR",
                values: ["10.0.1.0/24", "10.0.2.0/24", "10.0.3.0/24"],
                extra: &[],
                shown: [Some("10.0.1.0/24"), Some("10.0.2.0/24"), Some("10.0.3.0/24"), Some("-")],
                get: |c| c.pod_cidr.map_or("-".into(), |n| n.to_string()),
            },
            Row {
                flag: "metrics-address",
                env: "BULKHEAD_METRICS_ADDRESS",
                values: ["127.0.0.1:1", "127.0.0.1:2", "none"],
                extra: &[],
                shown: [
                    Some("127.0.0.1:1"),
                    Some("127.0.0.1:2"),
                    Some("none"),
                    Some(DEFAULT_METRICS_ADDRESS),
                ],
                get: |c| c.metrics_address.clone(),
            },
            Row {
                flag: "flow-history",
                env: "BULKHEAD_FLOW_HISTORY",
                values: ["1", "2", "3"],
                extra: &[],
                shown: [Some("1"), Some("2"), Some("3"), Some("8192")],
                get: |c| c.flow_history.to_string(),
            },
            Row {
                flag: "flow-token-file",
                env: "BULKHEAD_FLOW_TOKEN_FILE",
                values: ["/flag", "/env", "/file"],
                extra: &[],
                shown: [
                    Some("Some(\"/flag\")"),
                    Some("Some(\"/env\")"),
                    Some("Some(\"/file\")"),
                    Some("None"),
                ],
                get: |c| format!("{:?}", c.flow_token_file),
            },
            Row {
                flag: "pod-xdp",
                env: "BULKHEAD_POD_XDP",
                values: ["false", "true", "false"],
                extra: &[],
                shown: [Some("false"), Some("true"), Some("false"), Some("false")],
                get: |c| c.pod_xdp.to_string(),
            },
            Row {
                flag: "quarantine-allow-node",
                env: "BULKHEAD_QUARANTINE_ALLOW_NODE",
                values: ["false", "true", "false"],
                extra: &[],
                shown: [Some("false"), Some("true"), Some("false"), Some("true")],
                get: |c| c.quarantine_allow_node.to_string(),
            },
            Row {
                flag: "prefilter-deny-file",
                env: "BULKHEAD_PREFILTER_DENY_FILE",
                values: ["/flag", "/env", "/file"],
                extra: &[],
                shown: [
                    Some("Some(\"/flag\")"),
                    Some("Some(\"/env\")"),
                    Some("Some(\"/file\")"),
                    Some("None"),
                ],
                get: |c| format!("{:?}", c.prefilter_deny_file),
            },
            Row {
                // A flow address needs a token file (given in `extra`).
                flag: "flow-address",
                env: "BULKHEAD_FLOW_ADDRESS",
                values: ["127.0.0.1:1", "127.0.0.1:2", "none"],
                extra: &["--flow-token-file", "/t"],
                shown: [
                    Some("Some(\"127.0.0.1:1\")"),
                    Some("Some(\"127.0.0.1:2\")"),
                    Some("None"),
                    Some("None"),
                ],
                get: |c| format!("{:?}", c.flow_address),
            },
        ];
        // Every setting has a row (the file rejects unknown keys, so a key missing here
        // would be one this test does not cover).
        let mut all = String::new();
        for row in &rows {
            all.push_str(&format!("{}: {}\n", row.flag, row.values[2]));
        }
        let everything = file(&all);
        assert!(
            everything.node_name.is_some()
                && everything.source.is_some()
                && everything.kubeconfig.is_some()
                && everything.manifests.is_some()
                && everything.state_dir.is_some()
                && everything.bpffs.is_some()
                && everything.pod_cidr.is_some()
                && everything.metrics_address.is_some()
                && everything.flow_history.is_some()
                && everything.flow_address.is_some()
                && everything.flow_token_file.is_some()
                && everything.pod_xdp.is_some()
                && everything.quarantine_allow_node.is_some()
                && everything.prefilter_deny_file.is_some()
        );

        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        for row in &rows {
            let flag = format!("--{}", row.flag);
            let config = temp_file(row.flag, &format!("{}: {}\n", row.flag, row.values[2]));
            let config_arg = config.display().to_string();
            // Layers set in each case: flag+env+file, env+file, file, none.
            for (top, shown) in row.shown.iter().enumerate() {
                let mut flags: Vec<&str> = row.extra.to_vec();
                if row.flag != "node-name" {
                    flags.extend(["--node-name", "n"]);
                }
                if top == 0 {
                    flags.extend([flag.as_str(), row.values[0]]);
                }
                if top <= 2 {
                    flags.extend(["--config", config_arg.as_str()]);
                }
                let env: &[(&str, &str)] = if top <= 1 { &[(row.env, row.values[1])] } else { &[] };
                let args = parse_with_env(&flags, env).unwrap();
                let resolved = args.resolve_in(false);
                match (shown, resolved) {
                    (Some(want), Ok(c)) => assert_eq!((row.get)(&c), *want, "{} with layer {top} on top", row.flag),
                    (None, Err(ConfigError::Missing { setting, env })) => {
                        assert_eq!((setting, env), (row.flag, row.env));
                    }
                    (want, got) => panic!("{} with layer {top} on top: want {want:?}, got {got:?}", row.flag),
                }
            }
            std::fs::remove_file(config).unwrap();
        }
    }
}
