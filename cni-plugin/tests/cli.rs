//! Bad input through the real binary: the spec's error JSON, a non-zero exit, nothing created.
#![expect(clippy::unwrap_used, reason = "test fixtures assert by panicking")]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead-cni");
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A data directory that must never come into existence; removed on drop if it does.
struct DataDir(PathBuf);

impl DataDir {
    fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        Self(std::env::temp_dir().join(format!("bh-cni-cli-{}-{n}", std::process::id())))
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(data_dir: &DataDir, version: &str, subnet: Option<&str>) -> String {
    let mut c = serde_json::json!({
        "cniVersion": version, "name": "bhtest", "type": "bulkhead-cni",
        "dataDir": data_dir.0, "agentSocket": data_dir.0.join("agent.sock"),
    });
    if let Some(s) = subnet {
        c["subnet"] = Value::from(s);
    }
    c.to_string()
}

fn add_env() -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", "ADD".into()),
        ("CNI_CONTAINERID", "cli-test".into()),
        ("CNI_NETNS", "/run/netns/bh-cni-cli-does-not-exist".into()),
        ("CNI_IFNAME", "eth0".into()),
        ("CNI_PATH", "/opt/cni/bin".into()),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod".into()),
    ]
}

/// Runs the plugin with exactly `env` and `stdin`; returns exit success and parsed stdout.
fn run(env: &[(&'static str, String)], stdin: &str) -> (bool, Value) {
    let mut child = Command::new(BIN)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The plugin may reject its environment before reading stdin: a broken pipe is fine.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("stdout is not one json value ({e}): {stdout:?}"));
    (out.status.success(), value)
}

/// Asserts a failure with `code` in the spec's error format and that no data dir appeared.
fn assert_error(env: &[(&'static str, String)], stdin: &str, data_dir: &DataDir, code: u64) -> Value {
    let (ok, v) = run(env, stdin);
    assert!(!ok, "expected failure, got {v}");
    assert_eq!(v["code"], code, "{v}");
    assert!(v["cniVersion"].is_string(), "{v}");
    assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(v["details"].is_string(), "{v}");
    assert!(!data_dir.0.exists(), "bad input must not create {}", data_dir.0.display());
    v
}

#[test]
fn bad_json_is_code_6() {
    let d = DataDir::new();
    assert_error(&add_env(), "{not json", &d, 6);
    assert_error(&add_env(), "", &d, 6);
}

#[test]
fn missing_environment_is_code_4() {
    let d = DataDir::new();
    let conf = config(&d, "1.1.0", Some("10.251.0.0/24"));
    for var in ["CNI_COMMAND", "CNI_NETNS", "CNI_IFNAME", "CNI_CONTAINERID"] {
        let env: Vec<_> = add_env().into_iter().filter(|(k, _)| *k != var).collect();
        let v = assert_error(&env, &conf, &d, 4);
        assert!(v["msg"].as_str().unwrap().contains(var), "{v}");
    }
    let mut env = add_env();
    env[0].1 = "FROB".into();
    assert_error(&env, &conf, &d, 4);
    // Without K8S_POD_NAME (a runtime that is not Kubernetes) ADD goes on with a name from
    // the container ID: here it stops at the missing netns, not at CNI_ARGS.
    let mut env = add_env();
    env[5].1 = "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns".into();
    let v = assert_error(&env, &conf, &d, 4);
    assert!(v["msg"].as_str().unwrap().contains("CNI_NETNS"), "{v}");
    // A container ID that could name a path.
    let mut env = add_env();
    env[1].1 = "../../etc".into();
    let v = assert_error(&env, &conf, &d, 4);
    assert!(v["msg"].as_str().unwrap().contains("CNI_CONTAINERID"), "{v}");
    // Unknown CNI_ARGS keys need IgnoreUnknown.
    let mut env = add_env();
    env[5].1 = "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;FOO=1".into();
    assert_error(&env, &conf, &d, 4);
}

#[test]
fn generic_errors_come_before_plugin_arguments() {
    let d = DataDir::new();
    // Bad CNI_ARGS (an unknown key without IgnoreUnknown, no pod name).
    let mut env = add_env();
    env[5].1 = "FOO=1".into();
    assert_error(&env, "{not json", &d, 6);
    assert_error(&env, &config(&d, "0.2.0", Some("10.251.0.0/24")), &d, 1);
    assert_error(&env, &config(&d, "1.0.0", Some("10.251.0.0/24")), &d, 4);
}

#[test]
fn unsupported_version_is_code_1() {
    let d = DataDir::new();
    let v = assert_error(&add_env(), &config(&d, "0.2.0", Some("10.251.0.0/24")), &d, 1);
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_error(&add_env(), &config(&d, "9.9.9", Some("10.251.0.0/24")), &d, 1);
}

#[test]
fn bad_network_config_is_refused_with_its_code() {
    let d = DataDir::new();
    let v = assert_error(&add_env(), &config(&d, "0.4.0", Some("not-a-cidr")), &d, 7);
    assert_eq!(v["cniVersion"], "0.4.0", "errors use the config's version");
    for bad in ["10.251.0.0", "10.251.0.0/40", "not-a-cidr", "fd00::/64", "10.251.0.0/31"] {
        assert_error(&add_env(), &config(&d, "1.0.0", Some(bad)), &d, 7);
    }
    let mut c: Value = serde_json::from_str(&config(&d, "1.0.0", Some("10.251.0.0/24"))).unwrap();
    c["mtu"] = Value::from("big");
    assert_error(&add_env(), &c.to_string(), &d, 7);
}

#[test]
fn version_reports_supported_versions() {
    let (ok, v) = run(&[("CNI_COMMAND", "VERSION".into())], "");
    assert!(ok);
    assert_eq!(
        v,
        serde_json::json!({"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]})
    );
}
