//! The agent's configuration: flags, `BULKHEAD_*` environment variables and a YAML file.
//!
//! Precedence, highest first: a command-line flag, its `BULKHEAD_*` environment variable
//! (clap reads both into [`crate::agent::AgentArgs`]), the `--config` file, the default.
//! The file's keys are the long flag names: `node-name`, `source`, `kubeconfig`, `manifests`,
//! `state-dir`, `bpffs`, `pod-cidr`, `metrics-address`, `flow-history`. In a DaemonSet the node name comes from the downward API
//! (`BULKHEAD_NODE_NAME` from `spec.nodeName`) and the rest from a ConfigMap file.

use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use serde::Deserialize;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/run/bulkhead";
/// Default bpffs pin directory.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/bulkhead";

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
    /// The config file is not valid YAML of the expected shape.
    #[error("config file {path}: invalid")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Cause.
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

/// The `--config` file: every key optional, the same names as the flags.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentFile {
    /// This node's name.
    pub node_name: Option<String>,
    /// Where the model comes from.
    pub source: Option<SourceKind>,
    /// Kubeconfig file for the Kubernetes source.
    pub kubeconfig: Option<PathBuf>,
    /// Manifests directory for the files source.
    pub manifests: Option<PathBuf>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// bpffs pin directory.
    pub bpffs: Option<PathBuf>,
    /// This node's pod CIDR.
    #[serde(default, deserialize_with = "optional_cidr")]
    pub pod_cidr: Option<Ipv4Network>,
    /// Where `/metrics` and `/healthz` are served (`none` disables).
    pub metrics_address: Option<String>,
    /// Flow records kept in memory.
    pub flow_history: Option<usize>,
}

fn optional_cidr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Ipv4Network>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    text.map(|t| {
        t.parse()
            .map_err(|e| serde::de::Error::custom(format!("{t:?} is not an ipv4 cidr: {e}")))
    })
    .transpose()
}

impl AgentFile {
    /// Reads a config file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if text.trim().is_empty() {
            return Ok(AgentFile::default());
        }
        serde_yaml_ng::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
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
}

/// The settings given by flags or environment (`None`: not given).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--node-name` / `BULKHEAD_NODE_NAME`.
    pub node_name: Option<String>,
    /// `--source` / `BULKHEAD_SOURCE`.
    pub source: Option<SourceKind>,
    /// `--kubeconfig` / `BULKHEAD_KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// `--manifests` / `BULKHEAD_MANIFESTS`.
    pub manifests: Option<PathBuf>,
    /// `--state-dir` / `BULKHEAD_STATE_DIR`.
    pub state_dir: Option<PathBuf>,
    /// `--bpffs` / `BULKHEAD_BPFFS`.
    pub bpffs: Option<PathBuf>,
    /// `--pod-cidr` / `BULKHEAD_POD_CIDR`.
    pub pod_cidr: Option<Ipv4Network>,
    /// `--metrics-address` / `BULKHEAD_METRICS_ADDRESS`.
    pub metrics_address: Option<String>,
    /// `--flow-history` / `BULKHEAD_FLOW_HISTORY`.
    pub flow_history: Option<usize>,
}

/// Applies precedence. Without an explicit source: `files` when a manifests directory is
/// set, `kubernetes` when a kubeconfig is set or the agent runs in a pod
/// (`KUBERNETES_SERVICE_HOST`), else `none`.
pub fn resolve(flags: Overrides, file: AgentFile, in_cluster: bool) -> Result<AgentConfig, ConfigError> {
    let node_name = flags
        .node_name
        .or(file.node_name)
        .filter(|n| !n.is_empty())
        .ok_or(ConfigError::Missing {
            setting: "node-name",
            env: "BULKHEAD_NODE_NAME",
        })?;
    let kubeconfig = flags.kubeconfig.or(file.kubeconfig);
    let manifests = flags.manifests.or(file.manifests);
    let source = match flags.source.or(file.source) {
        Some(s) => s,
        None if manifests.is_some() => SourceKind::Files,
        None if kubeconfig.is_some() || in_cluster => SourceKind::Kubernetes,
        None => SourceKind::None,
    };
    if source == SourceKind::Files && manifests.is_none() {
        return Err(ConfigError::NoManifests);
    }
    Ok(AgentConfig {
        node_name,
        source,
        kubeconfig,
        manifests,
        state_dir: flags.state_dir.or(file.state_dir).unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        bpffs: flags.bpffs.or(file.bpffs).unwrap_or_else(|| DEFAULT_BPFFS.into()),
        pod_cidr: flags.pod_cidr.or(file.pod_cidr),
        metrics_address: flags
            .metrics_address
            .or(file.metrics_address)
            .unwrap_or_else(|| crate::metrics::DEFAULT_ADDRESS.into()),
        flow_history: flags.flow_history.or(file.flow_history).unwrap_or(crate::flows::DEFAULT_HISTORY),
    })
}

/// `bulkhead agent` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// This node's name (in a DaemonSet: the downward API's `spec.nodeName`).
    #[arg(long, env = "BULKHEAD_NODE_NAME")]
    pub node_name: Option<String>,
    /// YAML file with the same keys as these flags; flags and `BULKHEAD_*` override it.
    #[arg(long, env = "BULKHEAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the model comes from [default: files with --manifests, kubernetes in a pod or
    /// with --kubeconfig, else none].
    #[arg(long, env = "BULKHEAD_SOURCE", value_enum)]
    pub source: Option<SourceKind>,
    /// Kubeconfig for the kubernetes source [default: KUBECONFIG, ~/.kube/config, in-cluster].
    #[arg(long, env = "BULKHEAD_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// A directory of Namespace, Pod and NetworkPolicy manifests (local-files source).
    #[arg(long, env = "BULKHEAD_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// State directory: the endpoint socket (`agent.sock`), the endpoint registry and
    /// `pod-cidr` [default: /run/bulkhead].
    #[arg(long, env = "BULKHEAD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// bpffs directory where maps are pinned [default: /sys/fs/bpf/bulkhead].
    #[arg(long, env = "BULKHEAD_BPFFS")]
    pub bpffs: Option<PathBuf>,
    /// This node's pod CIDR; the kubernetes source learns it from the Node otherwise.
    #[arg(long, env = "BULKHEAD_POD_CIDR")]
    pub pod_cidr: Option<ipnetwork::Ipv4Network>,
    /// Flow records kept in memory for `bulkhead observe`; the oldest fall out [default: 8192].
    #[arg(long, env = "BULKHEAD_FLOW_HISTORY")]
    pub flow_history: Option<usize>,
    /// Address to serve `/metrics` and `/healthz` on; `none` disables [default: 0.0.0.0:9962].
    #[arg(long, env = "BULKHEAD_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,
    /// Serve metrics on this inherited listening socket instead (overrides the address).
    #[arg(long)]
    pub metrics_fd: Option<i32>,
}

impl AgentArgs {
    /// Applies the config file and the defaults (see [`resolve`] for precedence).
    pub fn resolve(&self) -> Result<AgentConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => AgentFile::read(path)?,
            None => AgentFile::default(),
        };
        let flags = Overrides {
            node_name: self.node_name.clone(),
            source: self.source,
            kubeconfig: self.kubeconfig.clone(),
            manifests: self.manifests.clone(),
            state_dir: self.state_dir.clone(),
            bpffs: self.bpffs.clone(),
            pod_cidr: self.pod_cidr,
            metrics_address: self.metrics_address.clone(),
            flow_history: self.flow_history,
        };
        resolve(flags, file, std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(yaml: &str) -> AgentFile {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let f = file("node-name: from-file\nstate-dir: /file/state\nsource: kubernetes\npod-cidr: 10.1.0.0/24\n");
        let flags = Overrides {
            node_name: Some("from-flag".into()),
            ..Overrides::default()
        };
        let c = resolve(flags, f, false).unwrap();
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
        let f = file(config);
        let flags = Overrides {
            node_name: Some("node-a".into()),
            ..Overrides::default()
        };
        let c = resolve(flags, f, true).unwrap();
        assert_eq!(c.source, SourceKind::Kubernetes);
        assert_eq!(c.metrics_address, "0.0.0.0:9962");
    }

    #[test]
    fn the_source_is_inferred() {
        let named = |flags: Overrides| Overrides {
            node_name: Some("n".into()),
            ..flags
        };
        let with_manifests = named(Overrides {
            manifests: Some("/m".into()),
            ..Overrides::default()
        });
        assert_eq!(
            resolve(with_manifests, AgentFile::default(), true).unwrap().source,
            SourceKind::Files
        );
        assert_eq!(
            resolve(named(Overrides::default()), AgentFile::default(), true).unwrap().source,
            SourceKind::Kubernetes
        );
        assert_eq!(
            resolve(named(Overrides::default()), AgentFile::default(), false).unwrap().source,
            SourceKind::None
        );
    }

    #[test]
    fn a_missing_node_name_and_unknown_keys_are_errors() {
        let e = resolve(Overrides::default(), AgentFile::default(), false).unwrap_err();
        assert!(e.to_string().contains("BULKHEAD_NODE_NAME"), "{e}");
        assert!(serde_yaml_ng::from_str::<AgentFile>("node_name: x\n").is_err());
        let files_without_dir = Overrides {
            node_name: Some("n".into()),
            source: Some(SourceKind::Files),
            ..Overrides::default()
        };
        assert!(matches!(
            resolve(files_without_dir, AgentFile::default(), false),
            Err(ConfigError::NoManifests)
        ));
    }
}
