//! `bulkhead install-cni`: puts the `bulkhead-cni` binary and its conflist on a node, the
//! way the DaemonSet's init container does it.
//!
//! Both files are written atomically (a temporary file in the destination directory,
//! fsync, rename): the container runtime watches the conf dir and may read a conflist at
//! any instant, and kubelet may exec the plugin at any instant, so neither may ever see
//! a half-written file. Writing a new binary beside the old one and renaming over it also
//! avoids `ETXTBSY` when the old binary is running.

use std::path::{Path, PathBuf};

use bulkhead_cni::config::{NetConf, DEFAULT_AGENT_SOCKET};
use ipnetwork::Ipv4Network;
use serde_json::{json, Map, Value};

/// The conflist's default file name; `10-` sorts it before most other configs, as the
/// runtime uses the first conflist in lexical order.
pub const DEFAULT_CONFLIST_NAME: &str = "10-bulkhead.conflist";
/// The CNI version of the conflist we write by default.
pub const CONFLIST_CNI_VERSION: &str = "1.0.0";
/// The network name in the default conflist (also the plugin's IPAM store directory).
pub const DEFAULT_NETWORK_NAME: &str = "bulkhead";
/// The plugin's `type`, which is also its binary name.
pub const PLUGIN_TYPE: &str = "bulkhead-cni";

/// `bulkhead install-cni` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct InstallArgs {
    /// Directory the container runtime looks for CNI binaries in (the host's /opt/cni/bin).
    #[arg(long)]
    pub bin_dir: PathBuf,
    /// Directory the container runtime reads network configs from (the host's /etc/cni/net.d).
    #[arg(long)]
    pub conf_dir: PathBuf,
    /// File name of the conflist in `--conf-dir`.
    #[arg(long, default_value = DEFAULT_CONFLIST_NAME)]
    pub conflist_name: String,
    /// The plugin binary to install; default: `bulkhead-cni` next to this executable.
    #[arg(long)]
    pub cni_bin: Option<PathBuf>,
    /// A conflist to install instead of the built-in one (e.g. from the ConfigMap); its first
    /// plugin must be `bulkhead-cni`.
    #[arg(long)]
    pub conflist_template: Option<PathBuf>,
    /// This node's pod CIDR; written as the first plugin's `subnet` (overrides the template's).
    /// Without one (and no `subnet` in the template) the plugin uses the pod CIDR the agent
    /// publishes from this Node's `spec.podCIDR`, so one conflist fits every node.
    #[arg(long, env = "BULKHEAD_POD_CIDR")]
    pub pod_cidr: Option<Ipv4Network>,
}

/// Why the installation failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// Path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written into place.
    #[error(transparent)]
    Write(#[from] bulkhead_hostnet::fs::WriteError),
    /// The conflist template is not JSON.
    #[error("conflist template {path} is not json")]
    TemplateJson {
        /// The template file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The conflist is JSON but not one the runtime and our plugin would accept.
    #[error("invalid conflist: {reason}")]
    Conflist {
        /// What is wrong.
        reason: String,
    },
    /// The conflist's bulkhead-cni entry is rejected by the plugin's own config parser.
    #[error("invalid conflist: the bulkhead-cni entry is rejected by the plugin")]
    PluginConfig {
        /// Cause.
        #[source]
        source: bulkhead_cni::config::ConfigError,
    },
}

pub use bulkhead_hostnet::fs::Outcome;

/// What `install` did to each file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The installed plugin binary.
    pub binary: PathBuf,
    /// What happened to it.
    pub binary_outcome: Outcome,
    /// The installed conflist.
    pub conflist: PathBuf,
    /// What happened to it.
    pub conflist_outcome: Outcome,
}

/// The built-in conflist: bulkhead-cni first, then the reference `portmap` plugin for
/// `hostPort`s (the runtime passes `portMappings` only to plugins declaring the capability).
pub fn default_conflist() -> Value {
    json!({
        "cniVersion": CONFLIST_CNI_VERSION,
        "name": DEFAULT_NETWORK_NAME,
        "plugins": [
            {
                "type": PLUGIN_TYPE,
                "agentSocket": DEFAULT_AGENT_SOCKET,
            },
            {
                "type": "portmap",
                "capabilities": { "portMappings": true },
            },
        ],
    })
}

/// Fills in the pod CIDR and checks the result: the shape the CNI spec requires of a
/// conflist, and the bulkhead-cni entry parsed by the plugin's own parser, so a bad
/// ConfigMap fails the init container rather than every pod sandbox later.
pub fn render_conflist(mut conflist: Value, pod_cidr: Option<Ipv4Network>) -> Result<Value, InstallError> {
    let bad = |reason: &str| InstallError::Conflist { reason: reason.into() };
    let top = conflist.as_object_mut().ok_or_else(|| bad("not a json object"))?;
    let version = top
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("cniVersion is missing or not a string"))?
        .to_string();
    let name = top
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("name is missing or not a string"))?
        .to_string();
    let plugins = top
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| bad("plugins is missing or not a list"))?;
    if plugins
        .iter()
        .any(|p| p.get("type").and_then(Value::as_str).is_none_or(str::is_empty))
    {
        return Err(bad("every plugin needs a non-empty \"type\""));
    }
    let first = plugins
        .first_mut()
        .and_then(Value::as_object_mut)
        .ok_or_else(|| bad("plugins is empty"))?;
    if first.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE) {
        // Chained plugins get our result as prevResult; only the first one creates the interface.
        return Err(bad("the first plugin must be bulkhead-cni"));
    }
    if let Some(cidr) = pod_cidr {
        first.insert("subnet".into(), Value::String(cidr.to_string()));
    }
    // The runtime hands each plugin its entry plus the list's cniVersion and name.
    // Without a subnet the plugin allocates from the pod CIDR the agent publishes.
    let mut plugin_conf: Map<String, Value> = first.clone();
    plugin_conf.insert("cniVersion".into(), Value::String(version));
    plugin_conf.insert("name".into(), Value::String(name));
    let bytes = serde_json::to_vec(&plugin_conf).map_err(|_| bad("cannot encode the plugin entry"))?;
    NetConf::parse(&bytes).map_err(|source| InstallError::PluginConfig { source })?;
    Ok(conflist)
}

/// Writes `bytes` to `dir/name` with `mode` atomically (a uniquely named dot file beside it,
/// fsynced and renamed: the runtime only reads `*.conf`, `*.conflist` and `*.json`), unless
/// it already holds exactly that.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<Outcome, InstallError> {
    Ok(bulkhead_hostnet::fs::write_atomic_if_changed(&dir.join(name), bytes, mode)?)
}

/// The plugin binary to install: `--cni-bin`, else `bulkhead-cni` next to this executable.
fn cni_binary(args: &InstallArgs) -> Result<PathBuf, InstallError> {
    if let Some(p) = &args.cni_bin {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().map_err(|source| InstallError::Io {
        op: "find own executable",
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    Ok(exe.with_file_name(PLUGIN_TYPE))
}

/// Installs the plugin binary (mode 0755) and the conflist (mode 0644); idempotent.
pub fn install(args: &InstallArgs) -> Result<Report, InstallError> {
    if args.conflist_name.contains('/') || !args.conflist_name.ends_with(".conflist") {
        return Err(InstallError::Conflist {
            reason: format!("--conflist-name {:?} must be a file name ending in .conflist", args.conflist_name),
        });
    }
    // Validate the conflist before touching the node: a bad one must not leave a new binary
    // with an old config, or any config at all.
    let template = match &args.conflist_template {
        Some(path) => {
            let text = std::fs::read(path).map_err(|source| InstallError::Io {
                op: "read",
                path: path.clone(),
                source,
            })?;
            serde_json::from_slice(&text).map_err(|source| InstallError::TemplateJson {
                path: path.clone(),
                source,
            })?
        }
        None => default_conflist(),
    };
    let conflist = render_conflist(template, args.pod_cidr)?;
    let mut conflist_bytes = serde_json::to_vec_pretty(&conflist).map_err(|_| InstallError::Conflist {
        reason: "cannot encode".into(),
    })?;
    conflist_bytes.push(b'\n');

    let source = cni_binary(args)?;
    let binary_bytes = std::fs::read(&source).map_err(|e| InstallError::Io {
        op: "read plugin binary",
        path: source.clone(),
        source: e,
    })?;
    // Binary first: a conflist naming a plugin the runtime cannot find fails every pod.
    let binary_outcome = write_atomic(&args.bin_dir, PLUGIN_TYPE, &binary_bytes, 0o755)?;
    let conflist_outcome = write_atomic(&args.conf_dir, &args.conflist_name, &conflist_bytes, 0o644)?;
    Ok(Report {
        binary: args.bin_dir.join(PLUGIN_TYPE),
        binary_outcome,
        conflist: args.conf_dir.join(&args.conflist_name),
        conflist_outcome,
    })
}

/// Entry point of `bulkhead install-cni`.
pub fn run(args: InstallArgs) -> Result<(), InstallError> {
    let report = install(&args)?;
    tracing::info!(
        binary = %report.binary.display(),
        binary_outcome = ?report.binary_outcome,
        conflist = %report.conflist.display(),
        conflist_outcome = ?report.conflist_outcome,
        "cni plugin installed"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Option<Ipv4Network> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn default_conflist_renders_with_a_pod_cidr() {
        let c = render_conflist(default_conflist(), cidr("10.244.3.0/24")).unwrap();
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(c["plugins"][0]["type"], "bulkhead-cni");
        assert_eq!(c["plugins"][0]["subnet"], "10.244.3.0/24");
        assert_eq!(c["plugins"][1]["type"], "portmap");
        assert_eq!(c["plugins"][1]["capabilities"]["portMappings"], true);
    }

    #[test]
    fn conflist_errors() {
        // No pod CIDR: the conflist has no subnet, and the plugin asks the agent's file.
        let rendered = render_conflist(default_conflist(), None).unwrap();
        assert!(rendered["plugins"][0].get("subnet").is_none());
        let err = |v: Value| render_conflist(v, cidr("10.0.0.0/24")).unwrap_err();
        assert!(matches!(err(json!([])), InstallError::Conflist { .. }));
        assert!(matches!(err(json!({"name": "a", "plugins": []})), InstallError::Conflist { .. }));
        assert!(matches!(
            err(json!({"cniVersion": "1.0.0", "name": "a", "plugins": []})),
            InstallError::Conflist { .. }
        ));
        assert!(matches!(
            err(json!({"cniVersion": "1.0.0", "name": "a", "plugins": [{"type": "portmap"}, {"type": "bulkhead-cni"}]})),
            InstallError::Conflist { .. }
        ));
        assert!(matches!(
            err(json!({"cniVersion": "1.0.0", "name": "a", "plugins": [{"type": "bulkhead-cni"}, {}]})),
            InstallError::Conflist { .. }
        ));
        // The plugin's own parser: an unsupported version, a bad network name.
        assert!(matches!(
            err(json!({"cniVersion": "9.9.9", "name": "a", "plugins": [{"type": "bulkhead-cni"}]})),
            InstallError::PluginConfig { .. }
        ));
        assert!(matches!(
            err(json!({"cniVersion": "1.0.0", "name": "../a", "plugins": [{"type": "bulkhead-cni"}]})),
            InstallError::PluginConfig { .. }
        ));
    }

    #[test]
    fn template_subnet_is_kept_unless_overridden() {
        let t = json!({"cniVersion": "1.1.0", "name": "n", "plugins": [{"type": "bulkhead-cni", "subnet": "10.9.0.0/24"}]});
        assert_eq!(render_conflist(t.clone(), None).unwrap()["plugins"][0]["subnet"], "10.9.0.0/24");
        assert_eq!(
            render_conflist(t, cidr("10.8.0.0/24")).unwrap()["plugins"][0]["subnet"],
            "10.8.0.0/24"
        );
    }
}
