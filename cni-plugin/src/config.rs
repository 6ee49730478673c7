//! The plugin's inputs: the `CNI_*` environment and the network configuration on stdin.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde::Deserialize;

use crate::spec::{self, CniVersion};

/// Default path of the agent's Unix socket.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/bulkhead/agent.sock";
/// The file beside the agent socket where the agent publishes this node's pod CIDR.
pub const POD_CIDR_FILE: &str = "pod-cidr";
/// Beside the agent socket: the MTU pod interfaces need (an overlay's, lower than the
/// link's), written by the agent when it routes over VXLAN.
pub const POD_MTU_FILE: &str = "pod-mtu";
/// Default directory of the IPAM store.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/bulkhead/cni";
/// Default time to wait for the agent's answer.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the environment or the network configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required `CNI_*` variable is missing or empty.
    #[error("required environment variable {var} is missing")]
    MissingEnv {
        /// The variable.
        var: &'static str,
    },
    /// A `CNI_*` variable has a value we cannot use.
    #[error("environment variable {var} is invalid: {reason}")]
    InvalidEnv {
        /// The variable.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Stdin could not be read.
    #[error("cannot read the network configuration from stdin")]
    Stdin {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Stdin is not JSON.
    #[error("cannot decode the network configuration")]
    Decode {
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The configuration asks for a CNI version this plugin does not speak.
    #[error("incompatible cniVersion {version:?}; supported: {supported}", supported = spec::SUPPORTED_VERSIONS.join(", "))]
    IncompatibleVersion {
        /// The requested version.
        version: String,
    },
    /// The configuration is JSON but not a valid Bulkhead network configuration.
    #[error("invalid network configuration: {reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
        /// Cause, when a decoder produced one.
        #[source]
        source: Option<serde_json::Error>,
    },
    /// `subnet` is not an IPv4 CIDR.
    #[error("invalid network configuration: subnet {subnet:?} is not an ipv4 cidr")]
    Subnet {
        /// The configured value.
        subnet: String,
        /// Cause.
        #[source]
        source: ipnetwork::IpNetworkError,
    },
    /// No `subnet` is configured and the agent has not published this node's pod CIDR.
    #[error("no subnet in the network configuration, and the agent's pod cidr file {path} cannot be read (the agent writes it once it knows this node's pod cidr)")]
    PodCidrUnknown {
        /// `pod-cidr` beside the agent socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    /// The CNI error code for this failure.
    pub fn code(&self) -> u32 {
        match self {
            Self::MissingEnv { .. } | Self::InvalidEnv { .. } => spec::code::INVALID_ENVIRONMENT,
            Self::Stdin { .. } | Self::Decode { .. } => spec::code::DECODING_FAILURE,
            Self::IncompatibleVersion { .. } => spec::code::INCOMPATIBLE_VERSION,
            Self::Invalid { .. } | Self::Subnet { .. } => spec::code::INVALID_NETWORK_CONFIG,
            // The agent publishes it once it has synced: the runtime should retry.
            Self::PodCidrUnknown { .. } => spec::code::TRY_AGAIN_LATER,
        }
    }
}

/// A CNI verb.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Attach a container.
    Add,
    /// Detach a container.
    Del,
    /// Verify an attachment.
    Check,
    /// Report supported versions.
    Version,
    /// Report whether the plugin is ready for ADDs (spec 1.1).
    Status,
    /// Collect garbage (spec 1.1).
    Gc,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        Ok(match value {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            other => {
                return Err(ConfigError::InvalidEnv {
                    var: "CNI_COMMAND",
                    reason: format!("unknown command {other:?}"),
                })
            }
        })
    }
}

/// The `CNI_*` environment of one invocation of ADD, DEL or CHECK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`; may be absent on DEL.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub pod_name: Option<String>,
    /// `CNI_PATH`, split on `:`; we delegate to no other plugin, so it may be empty.
    pub cni_path: Vec<PathBuf>,
}

/// `CNI_ARGS` keys we understand; any other key is an error unless `IgnoreUnknown` is set,
/// as in the reference plugins.
const KNOWN_ARGS: &[&str] = &[
    "IgnoreUnknown",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
];

impl Env {
    /// Reads the environment for `command` through `var` (normally `std::env::var`).
    pub fn load(command: Command, var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &'static str| var(name).filter(|v| !v.is_empty());
        let required = |name: &'static str| get(name).ok_or(ConfigError::MissingEnv { var: name });
        let container_id = required("CNI_CONTAINERID")?;
        validate_container_id(&container_id)?;
        let netns = match command {
            // The runtime may call DEL after the sandbox is gone.
            Command::Del => get("CNI_NETNS").map(PathBuf::from),
            _ => Some(PathBuf::from(required("CNI_NETNS")?)),
        };
        let ifname = required("CNI_IFNAME")?;
        validate_ifname(&ifname)?;
        let args = parse_cni_args(get("CNI_ARGS").as_deref().unwrap_or(""))?;
        let cni_path = get("CNI_PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        let env = Self {
            container_id,
            netns,
            ifname,
            pod_namespace: args.get("K8S_POD_NAMESPACE").cloned(),
            pod_name: args.get("K8S_POD_NAME").cloned(),
            cni_path,
        };
        // K8S_POD_NAMESPACE may come from the config's `defaultNamespace` and K8S_POD_NAME
        // from the container ID (a runtime that is not Kubernetes): ADD decides.
        Ok(env)
    }

    /// The pod name: `K8S_POD_NAME`, or for a runtime that sends none (not Kubernetes) one
    /// derived from the container ID — its first 63 characters, lower-cased, so that it is a
    /// valid object name the model can hold.
    pub fn pod_name_or_fallback(&self) -> String {
        self.pod_name
            .clone()
            .unwrap_or_else(|| self.container_id.chars().take(63).collect::<String>().to_ascii_lowercase())
    }
}

/// `CNI_CONTAINERID` as libcni accepts it: an alphanumeric first character, then
/// alphanumerics, `_`, `.` and `-` (it names files and the host veth).
fn validate_container_id(id: &str) -> Result<(), ConfigError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err(ConfigError::InvalidEnv {
            var: "CNI_CONTAINERID",
            reason: format!("{id:?} has characters a container ID cannot have (letters, digits, _ . -; a letter or digit first)"),
        });
    }
    Ok(())
}

impl ConfigError {
    /// Whether this is about `CNI_ARGS`, the plugin-specific arguments: the spec's generic
    /// checks (environment, stdin, version) are reported before it, as libcni's skel does.
    pub fn is_cni_args(&self) -> bool {
        matches!(self, Self::InvalidEnv { var: "CNI_ARGS", .. })
    }
}

/// Linux interface names: 1 to 15 bytes, no `/`, whitespace or `:`, not `.` or `..`.
fn validate_ifname(name: &str) -> Result<(), ConfigError> {
    let bad = name.len() > 15 || name == "." || name == ".." || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad {
        return Err(ConfigError::InvalidEnv {
            var: "CNI_IFNAME",
            reason: format!("{name:?} is not a valid interface name"),
        });
    }
    Ok(())
}

/// Parses `CNI_ARGS`: `K=V` pairs separated by `;`.
pub fn parse_cni_args(raw: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut args = BTreeMap::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| ConfigError::InvalidEnv {
            var: "CNI_ARGS",
            reason: format!("{pair:?} is not KEY=VALUE"),
        })?;
        args.insert(key.to_string(), value.to_string());
    }
    let ignore_unknown = args
        .get("IgnoreUnknown")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true"));
    if !ignore_unknown {
        if let Some(key) = args.keys().find(|k| !KNOWN_ARGS.contains(&k.as_str())) {
            return Err(ConfigError::InvalidEnv {
                var: "CNI_ARGS",
                reason: format!("unknown key {key:?} (set IgnoreUnknown=1 to allow it)"),
            });
        }
    }
    Ok(args)
}

/// The raw JSON shape of our network configuration; unknown keys are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawNetConf {
    name: String,
    #[serde(rename = "type")]
    #[serde(default)]
    plugin_type: Option<String>,
    subnet: Option<String>,
    agent_socket: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    mtu: Option<u32>,
    agent_timeout_seconds: Option<u64>,
    prev_result: Option<serde_json::Value>,
    default_namespace: Option<String>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
}

/// One entry of `cni.dev/valid-attachments` (GC's input, spec 1.1).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// The container's id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface name in the container.
    pub ifname: String,
}

/// A validated Bulkhead network configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    /// The requested CNI version; results are printed in it.
    pub cni_version: CniVersion,
    /// Network name; also the IPAM store's directory name.
    pub name: String,
    /// The configured pod CIDR (host bits cleared); `None`: the one the agent publishes,
    /// see [`NetConf::pod_cidr`].
    pub subnet: Option<Ipv4Network>,
    /// The agent's Unix socket.
    pub agent_socket: PathBuf,
    /// The IPAM store's root.
    pub data_dir: PathBuf,
    /// MTU of both veth ends, when set.
    pub mtu: Option<u32>,
    /// How long to wait for the agent.
    pub agent_timeout: Duration,
    /// The previous plugin's result in a chain (CHECK compares against it).
    pub prev_result: Option<serde_json::Value>,
    /// GC's `cni.dev/valid-attachments`: every attachment the runtime still knows.
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The pod namespace when `CNI_ARGS` has no `K8S_POD_NAMESPACE`: runtimes outside
    /// Kubernetes (podman's CNI backend sends only `K8S_POD_NAME`, the container name).
    pub default_namespace: Option<String>,
}

/// Parses and checks a pod CIDR, clearing host bits.
fn parse_subnet(text: &str) -> Result<Ipv4Network, ConfigError> {
    let text = text.trim();
    let subnet_err = |source| ConfigError::Subnet {
        subnet: text.to_string(),
        source,
    };
    let parsed: Ipv4Network = text.parse().map_err(subnet_err)?;
    // Network, broadcast and .1 are reserved: a /30 is the smallest useful pool.
    if parsed.prefix() > 30 {
        return Err(invalid(&format!("subnet {text} is too small (at most /30)")));
    }
    Ipv4Network::new(parsed.network(), parsed.prefix()).map_err(subnet_err)
}

/// Reads just the `cniVersion` of a configuration, for error reporting before full parsing.
pub fn sniff_version(bytes: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    value.get("cniVersion")?.as_str().map(str::to_string)
}

impl NetConf {
    /// The pool ADD allocates from: the configured `subnet`, else this node's pod CIDR as the
    /// agent learnt it (from the Node object in a cluster) and wrote beside its socket, so one
    /// conflist fits every node. Only ADD needs it: DEL, CHECK and GC work without it.
    pub fn pod_cidr(&self) -> Result<Ipv4Network, ConfigError> {
        if let Some(subnet) = self.subnet {
            return Ok(subnet);
        }
        let path = self.agent_socket.with_file_name(POD_CIDR_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::PodCidrUnknown { path, source })?;
        parse_subnet(&text)
    }

    /// The pod interfaces' MTU: the configured `mtu`, else the one the agent published beside
    /// its socket (its VXLAN overlay's), else the kernel's default. A published value that
    /// does not parse is ignored (the kernel default still carries traffic, fragmented).
    pub fn pod_mtu(&self) -> Option<u32> {
        self.mtu.or_else(|| {
            let text = std::fs::read_to_string(self.agent_socket.with_file_name(POD_MTU_FILE)).ok()?;
            text.trim().parse().ok().filter(|m| (68..=65535).contains(m))
        })
    }

    /// Parses and validates the configuration bytes from stdin.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|source| ConfigError::Decode { source })?;
        let version = match value.get("cniVersion") {
            Some(serde_json::Value::String(v)) => v.clone(),
            Some(_) => return Err(invalid("cniVersion must be a string")),
            None => return Err(invalid("cniVersion is missing")),
        };
        let cni_version = CniVersion::parse(&version).ok_or(ConfigError::IncompatibleVersion { version })?;
        let raw: RawNetConf = serde_json::from_value(value).map_err(|source| ConfigError::Invalid {
            reason: "bad field".into(),
            source: Some(source),
        })?;
        validate_network_name(&raw.name)?;
        if let Some(t) = &raw.plugin_type {
            if t.is_empty() {
                return Err(invalid("type is empty"));
            }
        }
        let agent_socket = raw.agent_socket.unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET));
        let subnet = raw.subnet.as_deref().map(parse_subnet).transpose()?;
        if let Some(mtu) = raw.mtu {
            // 68 is IPv4's minimum MTU; 65535 the largest a veth takes.
            if !(68..=65535).contains(&mtu) {
                return Err(invalid(&format!("mtu {mtu} is out of range 68..=65535")));
            }
        }
        let agent_timeout = match raw.agent_timeout_seconds {
            Some(0) => return Err(invalid("agentTimeoutSeconds must be positive")),
            Some(s) => Duration::from_secs(s),
            None => DEFAULT_AGENT_TIMEOUT,
        };
        Ok(Self {
            cni_version,
            name: raw.name,
            subnet,
            agent_socket,
            data_dir: raw.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            mtu: raw.mtu,
            agent_timeout,
            prev_result: raw.prev_result,
            valid_attachments: raw.valid_attachments,
            default_namespace: match raw.default_namespace {
                Some(ns) if ns.is_empty() => return Err(invalid("defaultNamespace is empty")),
                other => other,
            },
        })
    }
}

fn invalid(reason: &str) -> ConfigError {
    ConfigError::Invalid {
        reason: reason.to_string(),
        source: None,
    }
}

/// The name becomes a directory name: keep it to a safe alphabet, as the spec's name rules do.
fn validate_network_name(name: &str) -> Result<(), ConfigError> {
    let ok =
        !name.is_empty() && name != "." && name != ".." && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(&format!(
            "network name {name:?} must be non-empty and use only [a-zA-Z0-9_.-]"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn parses_a_full_config() {
        let c = NetConf::parse(br#"{"cniVersion":"0.4.0","name":"bh","type":"bulkhead-cni","subnet":"10.244.0.7/24","mtu":1400,"agentTimeoutSeconds":5,"defaultNamespace":"podman","other":1}"#).unwrap();
        assert_eq!(c.default_namespace.as_deref(), Some("podman"));
        assert_eq!(c.cni_version, CniVersion::V0_4_0);
        assert_eq!(c.subnet.map(|s| s.to_string()).as_deref(), Some("10.244.0.0/24"));
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(c.agent_timeout, Duration::from_secs(5));
        assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
    }

    #[test]
    fn parses_gc_valid_attachments() {
        let c = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"bh","subnet":"10.244.0.0/24","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#).unwrap();
        assert_eq!(
            c.valid_attachments,
            Some(vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }])
        );
        assert_eq!(
            NetConf::parse(
                br#"{"cniVersion":"1.1.0","name":"bh","subnet":"10.244.0.0/24","cni.dev/valid-attachments":[{"ifname":"eth0"}]}"#
            )
            .unwrap_err()
            .code(),
            7
        );
    }

    #[test]
    fn config_errors_carry_their_codes() {
        let code = |s: &str| NetConf::parse(s.as_bytes()).unwrap_err().code();
        assert_eq!(code("{"), 6);
        assert_eq!(code(r#"{"cniVersion":"2.0.0","name":"a","subnet":"10.0.0.0/24"}"#), 1);
        // No subnet and no pod CIDR published by the agent: parses (DEL needs no pool), and
        // ADD's pool lookup says try again later.
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"a","agentSocket":"/nonexistent-bulkhead/agent.sock"}"#).unwrap();
        assert_eq!(conf.pod_cidr().unwrap_err().code(), 11);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","name":"a","subnet":"10.0.0.0/33"}"#), 7);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","name":"a","subnet":"10.0.0.0/31"}"#), 7);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","name":"../x","subnet":"10.0.0.0/24"}"#), 7);
        assert_eq!(code(r#"{"name":"a","subnet":"10.0.0.0/24"}"#), 7);
    }

    #[test]
    fn env_rules() {
        let full = [
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;FOO=bar"),
        ];
        let e = Env::load(Command::Add, env_of(&full)).unwrap();
        assert_eq!(e.pod_name.as_deref(), Some("p"));
        // Without K8S_POD_NAME (not Kubernetes): a name from the container ID.
        let bare = Env::load(Command::Add, env_of(&full[..3])).unwrap();
        assert_eq!(bare.pod_name_or_fallback(), "c1");
        let long = "A".repeat(64);
        let long_id = Env::load(Command::Add, env_of(&[("CNI_CONTAINERID", &long), full[1], full[2]])).unwrap();
        assert_eq!(long_id.pod_name_or_fallback(), "a".repeat(63));
        for bad in ["../x", "-x", "a b", "a/b", "é"] {
            let err = Env::load(Command::Add, env_of(&[("CNI_CONTAINERID", bad), full[1], full[2]])).unwrap_err();
            assert_eq!(err.code(), 4, "{bad}");
        }
        // The namespace may come from the config instead.
        let no_ns = [full[0], full[1], full[2], ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p")];
        assert_eq!(Env::load(Command::Add, env_of(&no_ns)).unwrap().pod_namespace, None);
        assert_eq!(Env::load(Command::Del, env_of(&[full[0], full[2]])).unwrap().netns, None);
        assert_eq!(Env::load(Command::Check, env_of(&[full[0], full[2]])).unwrap_err().code(), 4);
        assert!(parse_cni_args("FOO=bar").is_err());
        assert!(parse_cni_args("novalue").is_err());
        assert_eq!(Command::parse("NOPE").unwrap_err().code(), 4);
    }

    #[test]
    fn without_subnet_the_agents_pod_cidr_is_used() {
        let dir = std::env::temp_dir().join(format!("bh-podcidr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let conf = format!(r#"{{"cniVersion":"1.0.0","name":"bh","agentSocket":"{}"}}"#, socket.display());
        let c = NetConf::parse(conf.as_bytes()).unwrap();
        assert_eq!(c.subnet, None);
        // The agent has not published it yet: try again later.
        let err = c.pod_cidr().unwrap_err();
        assert_eq!(err.code(), spec::code::TRY_AGAIN_LATER, "{err}");
        std::fs::write(dir.join(POD_CIDR_FILE), "10.244.3.7/24\n").unwrap();
        assert_eq!(c.pod_cidr().unwrap().to_string(), "10.244.3.0/24");
        // A garbled file is an invalid configuration, not a retry.
        std::fs::write(dir.join(POD_CIDR_FILE), "10.244.3.0/31\n").unwrap();
        assert_eq!(c.pod_cidr().unwrap_err().code(), 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
