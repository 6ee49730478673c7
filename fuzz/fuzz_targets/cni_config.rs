//! The plugin's inputs: the network configuration on stdin (`NetConf::parse`) and the
//! `CNI_*` environment (`Env::load`) from arbitrary bytes. Nothing panics, every error
//! carries one of the spec's codes in the spec's order (not JSON: 6; a cniVersion we do
//! not speak: 1; the rest of the config: 7; the environment: 4), and what is accepted
//! keeps the rules the rest of the plugin relies on (names safe as file names, bounded
//! values).
#![no_main]

use bulkhead_cni::commands::CommandError;
use bulkhead_cni::config::{sniff_version, Command, ConfigError, Env, NetConf};
use bulkhead_cni::spec::{self, code, CniVersion};
use libfuzzer_sys::fuzz_target;

const VERBS: [&str; 6] = ["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"];
/// The variables `Env::load` reads, in the order the input's fields fill them.
const VARS: [&str; 5] = ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"];

/// The error as `main` prints it must be the spec's JSON with the same code.
fn check_reported(e: ConfigError, version: &str) {
    let expected = e.code();
    let err = CommandError::from(e);
    assert_eq!(err.code(), expected);
    let json = spec::error_json(version, err.code(), &err.to_string(), &err.describe());
    let text = json.to_string();
    let back: serde_json::Value = serde_json::from_str(&text).expect("error JSON parses");
    assert_eq!(back["code"], expected, "{text}");
}

fn stdin(data: &[u8]) {
    let sniffed = sniff_version(data);
    match NetConf::parse(data) {
        Ok(conf) => {
            assert_eq!(sniffed.as_deref(), Some(conf.cni_version.as_str()));
            let name_ok = conf.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            assert!(
                name_ok && !conf.name.is_empty() && conf.name != "." && conf.name != "..",
                "{:?}",
                conf.name
            );
            if let Some(subnet) = conf.subnet {
                assert!(subnet.prefix() <= 30, "{subnet}");
                assert_eq!(subnet.ip(), subnet.network(), "host bits of {subnet}");
            }
            assert!(conf.mtu.is_none_or(|m| (68..=65535).contains(&m)));
            assert!(!conf.agent_timeout.is_zero());
            assert!(conf.default_namespace.as_ref().is_none_or(|n| !n.is_empty()));
        }
        Err(e) => {
            let json = serde_json::from_slice::<serde_json::Value>(data);
            let want = match &json {
                Err(_) => code::DECODING_FAILURE,
                Ok(v) => match v.get("cniVersion").and_then(|v| v.as_str()) {
                    Some(version) if CniVersion::parse(version).is_none() => code::INCOMPATIBLE_VERSION,
                    _ => code::INVALID_NETWORK_CONFIG,
                },
            };
            assert_eq!(e.code(), want, "{e}");
            let version = sniffed
                .as_deref()
                .and_then(CniVersion::parse)
                .map_or(spec::LATEST_VERSION, CniVersion::as_str);
            check_reported(e, version);
        }
    }
}

fn environment(selector: u8, data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // Fields separated by NUL; an empty field is an unset variable, as `Env::load` sees it.
    let fields: Vec<&str> = text.split('\0').collect();
    let value = |name: &str| {
        let i = VARS.iter().position(|v| *v == name)?;
        fields.get(i).filter(|f| !f.is_empty()).map(|f| (*f).to_string())
    };
    let verb = fields
        .get(VARS.len())
        .copied()
        .unwrap_or(VERBS[usize::from(selector) % VERBS.len()]);
    let command = match Command::parse(verb) {
        Ok(c) => {
            assert!(VERBS.contains(&verb));
            c
        }
        Err(e) => {
            assert_eq!(e.code(), code::INVALID_ENVIRONMENT, "{e}");
            return check_reported(e, spec::LATEST_VERSION);
        }
    };
    match Env::load(command, value) {
        Ok(env) => {
            let id = &env.container_id;
            assert!(id.starts_with(|c: char| c.is_ascii_alphanumeric()), "{id:?}");
            assert!(
                id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')),
                "{id:?}"
            );
            assert!(
                !env.ifname.is_empty() && env.ifname.len() <= 15 && !env.ifname.contains(['/', ':']),
                "{:?}",
                env.ifname
            );
            assert!(command == Command::Del || env.netns.is_some());
            let pod = env.pod_name_or_fallback();
            if env.pod_name.is_none() {
                assert!(
                    !pod.is_empty() && pod.len() <= 63 && !pod.chars().any(|c| c.is_ascii_uppercase()),
                    "{pod:?}"
                );
            }
        }
        Err(e) => {
            assert_eq!(e.code(), code::INVALID_ENVIRONMENT, "{e}");
            check_reported(e, spec::LATEST_VERSION);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        stdin(rest);
    } else {
        environment(selector >> 1, rest);
    }
});
