//! The install manifests, offline: every file validated against the Kubernetes schema
//! (`kubernetes-validate`, strict), the kustomization rendered (`kubectl kustomize`), the
//! security posture asserted (read-only RBAC, an unprivileged DaemonSet with exactly the
//! documented capabilities), and the ConfigMap's conflist installed by the real
//! `bulkhead install-cni` into a temporary directory.
//!
//! Needs `kubernetes-validate` and `kubectl` (scripts/setup.sh installs or checks them) and
//! `cargo build` at the workspace root.
#![expect(clippy::unwrap_used, reason = "tests and their helpers assert by panicking (STYLE 14)")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;
use serde_yaml_ng::Value;

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.37.0";
/// The pinned kubernetes-validate (scripts/setup.sh installs it).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// The capabilities the agent container asks for; the README explains each one.
const AGENT_CAPABILITIES: [&str; 4] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifests_dir() -> PathBuf {
    root().join("manifests")
}

/// Runs a tool; a missing tool fails the test with what to do.
fn tool(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): run `bash scripts/setup.sh` as root, which installs or checks it"))
}

/// Every manifest kubernetes-validate should check: all `*.yaml` but the kustomization,
/// which is not a Kubernetes object (rendering it is checked instead).
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifests_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 6,
        "expected the manifests in {}, found {files:?}",
        manifests_dir().display()
    );
    files
}

fn validate(files: &[PathBuf]) -> Output {
    let version = tool("kubernetes-validate", &["--version"]);
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    assert_eq!(
        version, KUBERNETES_VALIDATE_VERSION,
        "kubernetes-validate {version} on PATH; run `bash scripts/setup.sh` for the pinned {KUBERNETES_VALIDATE_VERSION}"
    );
    let mut args = vec!["--kubernetes-version", KUBERNETES_VERSION, "--strict", "--quiet"];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    tool("kubernetes-validate", &args)
}

fn render() -> String {
    let dir = manifests_dir();
    let out = tool("kubectl", &["kustomize", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "kubectl kustomize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap()
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn rendered_object<'a>(objects: &'a [Value], k: &str) -> &'a Value {
    let mut found = objects.iter().filter(|o| kind(o) == k);
    let first = found.next().unwrap_or_else(|| panic!("no {k} rendered"));
    assert!(found.next().is_none(), "more than one {k}");
    first
}

/// A unique temporary directory, removed on drop even when the test fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("bulkhead-manifests-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schema() {
    let files = manifest_files();
    let out = validate(&files);
    assert!(
        out.status.success(),
        "kubernetes-validate rejected the manifests:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The rendered kustomization too (namespace and image rewritten by kustomize).
    let tmp = TempDir::new("rendered");
    let rendered = tmp.0.join("rendered.yaml");
    std::fs::write(&rendered, render()).unwrap();
    let out = validate(&[rendered]);
    assert!(
        out.status.success(),
        "the rendered kustomization does not validate:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_validator_rejects_a_broken_manifest() {
    // Proves the strict check has teeth: a misspelt field must fail.
    let tmp = TempDir::new("broken");
    let text = std::fs::read_to_string(manifests_dir().join("daemonset.yaml")).unwrap();
    assert!(text.contains("hostNetwork: true"));
    let broken = tmp.0.join("daemonset.yaml");
    std::fs::write(&broken, text.replace("hostNetwork: true", "hostNetwrk: true")).unwrap();
    let out = validate(&[broken]);
    assert!(!out.status.success(), "kubernetes-validate accepted a misspelt field");
    assert!(String::from_utf8_lossy(&out.stdout).contains("hostNetwrk"));
}

#[test]
fn kustomization_renders_the_expected_objects() {
    let objects = documents(&render());
    let kinds: Vec<&str> = objects.iter().map(kind).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet"
        ],
        "rendered kinds"
    );
    for o in &objects {
        let namespaced = !matches!(kind(o), "Namespace" | "ClusterRole" | "ClusterRoleBinding");
        if namespaced {
            assert_eq!(o["metadata"]["namespace"].as_str(), Some("bulkhead-system"), "{}", kind(o));
        }
        assert_eq!(
            o["metadata"]["labels"]["app.kubernetes.io/part-of"].as_str(),
            Some("bulkhead"),
            "{}",
            kind(o)
        );
    }
    let binding = rendered_object(&objects, "ClusterRoleBinding");
    assert_eq!(binding["subjects"][0]["namespace"].as_str(), Some("bulkhead-system"));
    assert_eq!(
        binding["subjects"][0]["name"],
        rendered_object(&objects, "ServiceAccount")["metadata"]["name"]
    );
    let ds = rendered_object(&objects, "DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    let image = spec["containers"][0]["image"].as_str().unwrap();
    assert!(
        image.starts_with("ghcr.io/") && image.contains(':'),
        "image not set by kustomize: {image}"
    );
    assert_eq!(spec["initContainers"][0]["image"].as_str(), Some(image));
    assert_eq!(spec["serviceAccountName"], binding["subjects"][0]["name"]);
}

#[test]
fn rbac_is_read_only_on_exactly_the_watched_resources() {
    let objects = documents(&render());
    let role = rendered_object(&objects, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().unwrap() {
        let verbs = strings(&rule["verbs"]);
        assert_eq!(
            verbs,
            BTreeSet::from(["get".into(), "list".into(), "watch".into()]),
            "verbs of {rule:?}"
        );
        assert!(rule.get("nonResourceURLs").is_none() && rule.get("resourceNames").is_none());
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                assert!(!group.contains('*') && !resource.contains('*'), "wildcard in {rule:?}");
                granted.insert(format!("{group}/{resource}"));
            }
        }
    }
    let expected: BTreeSet<String> = [
        "/pods",
        "/namespaces",
        "/nodes",
        "/services",
        "discovery.k8s.io/endpointslices",
        "networking.k8s.io/networkpolicies",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(granted, expected);
    // No other RBAC object grants anything.
    let rbac_kinds = objects
        .iter()
        .filter(|o| kind(o).starts_with("Role") || kind(o).starts_with("ClusterRole"))
        .count();
    assert_eq!(rbac_kinds, 2, "one ClusterRole and its binding");
}

#[test]
fn daemonset_is_unprivileged_with_the_documented_capabilities() {
    let objects = documents(&render());
    let ds = rendered_object(&objects, "DaemonSet");
    let template = &ds["spec"]["template"];
    let spec = &template["spec"];
    assert_eq!(spec["hostNetwork"].as_bool(), Some(true));
    assert_eq!(spec["dnsPolicy"].as_str(), Some("ClusterFirstWithHostNet"));
    assert!(
        spec.get("hostPID").is_none() && spec.get("hostIPC").is_none(),
        "no host PID/IPC namespace"
    );
    assert_eq!(spec["priorityClassName"].as_str(), Some("system-node-critical"));
    let tolerations = spec["tolerations"].as_sequence().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t["operator"].as_str() == Some("Exists") && t.get("key").is_none() && t.get("effect").is_none()),
        "a toleration for every taint: {tolerations:?}"
    );
    let strategy = &ds["spec"]["updateStrategy"];
    assert_eq!(strategy["type"].as_str(), Some("RollingUpdate"));
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"].as_u64(), Some(1));
    assert_eq!(strategy["rollingUpdate"]["maxSurge"].as_u64(), Some(0));
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some("9962"));

    let all: Vec<&Value> = spec["initContainers"]
        .as_sequence()
        .unwrap()
        .iter()
        .chain(spec["containers"].as_sequence().unwrap())
        .collect();
    for c in &all {
        let sc = &c["securityContext"];
        assert_ne!(
            sc["privileged"].as_bool(),
            Some(true),
            "{} is privileged",
            c["name"].as_str().unwrap()
        );
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert_eq!(strings(&sc["capabilities"]["drop"]), BTreeSet::from(["ALL".to_string()]));
        for m in c["volumeMounts"].as_sequence().unwrap() {
            // Bidirectional propagation is only allowed in privileged containers.
            assert_ne!(m["mountPropagation"].as_str(), Some("Bidirectional"));
        }
    }

    let init = all[0];
    let command = strings(&init["command"]);
    assert!(command.contains("install-cni"), "{command:?}");
    let mounts: BTreeSet<String> = init["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().into())
        .collect();
    assert!(mounts.contains("cni-bin-dir") && mounts.contains("cni-conf-dir"));
    assert!(
        init["securityContext"]["capabilities"].get("add").is_none(),
        "install-cni needs no capability"
    );

    let agent = all[1];
    assert_eq!(agent["command"][1].as_str(), Some("agent"));
    let caps = strings(&agent["securityContext"]["capabilities"]["add"]);
    assert_eq!(caps, AGENT_CAPABILITIES.iter().map(|c| c.to_string()).collect::<BTreeSet<_>>());
    let env = agent["env"].as_sequence().unwrap();
    let node_name = env.iter().find(|e| e["name"].as_str() == Some("BULKHEAD_NODE_NAME")).unwrap();
    assert_eq!(node_name["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("spec.nodeName"));
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/livez"),
        ("readinessProbe", "/healthz"),
    ] {
        assert_eq!(agent[probe]["httpGet"]["path"].as_str(), Some(path), "{probe}");
        assert_eq!(agent[probe]["httpGet"]["port"].as_u64(), Some(9962), "{probe}");
    }
    assert_eq!(agent["resources"]["requests"]["cpu"].as_str(), Some("100m"));
    assert_eq!(agent["resources"]["requests"]["memory"].as_str(), Some("128Mi"));
    assert_eq!(agent["resources"]["limits"]["memory"].as_str(), Some("512Mi"));
    let bpffs = agent["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/sys/fs/bpf"));
    assert!(bpffs.is_some(), "pinned maps must live on the host's bpffs to outlive the pod");

    // The README documents every capability the agent asks for.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for cap in AGENT_CAPABILITIES {
        assert!(
            readme.contains(&format!("| `CAP_{cap}` |")),
            "README's permissions table lacks CAP_{cap}"
        );
    }
}

#[test]
fn configmap_conflist_installs_with_the_real_install_cni() {
    let objects = documents(&render());
    let cm = rendered_object(&objects, "ConfigMap");
    let conflist = cm["data"]["cni-conflist.json"].as_str().unwrap();
    let config: Value = serde_yaml_ng::from_str(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(config["source"].as_str(), Some("kubernetes"));

    let tmp = TempDir::new("install");
    let template = tmp.0.join("cni-conflist.json");
    std::fs::write(&template, conflist).unwrap();
    let out = Command::new(bulkhead_e2e::binary("bulkhead"))
        .arg("install-cni")
        .arg("--bin-dir")
        .arg(tmp.0.join("opt/cni/bin"))
        .arg("--conf-dir")
        .arg(tmp.0.join("etc/cni/net.d"))
        .arg("--conflist-template")
        .arg(&template)
        .arg("--pod-cidr")
        .arg("10.244.1.0/24")
        .output()
        .unwrap();
    assert!(out.status.success(), "install-cni: {}", String::from_utf8_lossy(&out.stderr));
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.0.join("etc/cni/net.d/10-bulkhead.conflist")).unwrap()).unwrap();
    assert_eq!(written["plugins"][0]["type"], "bulkhead-cni");
    assert_eq!(written["plugins"][0]["subnet"], "10.244.1.0/24");
    assert_eq!(written["plugins"][1]["type"], "portmap");

    // The installed plugin runs and speaks the conflist's version.
    let out = Command::new(tmp.0.join("opt/cni/bin/bulkhead-cni"))
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "installed plugin: {}", String::from_utf8_lossy(&out.stdout));
    let version: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let supported = version["supportedVersions"].as_array().unwrap();
    assert!(supported.contains(&written["cniVersion"]), "{version}");
}

/// The relay's PrometheusRule (a CRD kubernetes-validate has no schema for, so it lives in
/// `manifests/monitoring/`, outside the validated set): its rule groups pass the real
/// `promtool check rules`, it alerts on the anomalies by kind, namespace and workload, and
/// it uses only metrics the README's relay table lists.
#[test]
fn the_prometheus_rule_alerts_on_anomalies_and_passes_promtool() {
    let path = manifests_dir().join("monitoring/prometheus-rule.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs = documents(&text);
    assert_eq!(docs.len(), 1, "one object");
    let rule = &docs[0];
    assert_eq!(rule["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(kind(rule), "PrometheusRule");
    assert_eq!(rule["metadata"]["namespace"].as_str(), Some("bulkhead-system"));
    let exprs: Vec<String> = rule["spec"]["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .map(|r| r["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(
        exprs.iter().any(|e| e.contains("increase(bulkhead_anomalies_total[5m])")
            && e.contains("by (kind, namespace, workload)")
            && e.ends_with("> 0")),
        "{exprs:?}"
    );
    // The README's relay metrics table names every metric the rules use.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let (_, relay) = readme.split_once("### The relay's metrics").unwrap();
    for e in &exprs {
        let metric = e.split(['(', '{', '[', ' ']).find(|w| w.starts_with("bulkhead_")).unwrap();
        assert!(
            relay.contains(&format!("| `{metric}` |")),
            "{metric} is not in the README's relay metrics table"
        );
    }
    // promtool reads the plain rule-file format: the spec.
    let dir = TempDir::new("prometheus-rule");
    let spec = dir.0.join("rules.yaml");
    std::fs::write(&spec, serde_yaml_ng::to_string(&rule["spec"]).unwrap()).unwrap();
    let out = tool("promtool", &["check", "rules", spec.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
