//! The real plugin in a "node" netns wiring a "pod" netns, against an in-test agent.
//!
//! Needs root (netns, netlink); fails loudly without it.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "test fixtures assert by panicking")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_api::Request;
use bulkhead_hostnet::netlink::host_veth_name;
use bulkhead_hostnet::netns;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead-cni");
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Unique node and pod namespaces, data directory and agent socket; all removed on drop.
struct Lab {
    node_name: String,
    pod_name: String,
    node: PathBuf,
    pod: PathBuf,
    dir: PathBuf,
    container_id: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Lab {
    /// Sets everything up; the fake agent answers every request with `answer`.
    fn new(answer: &'static str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        let node_name = format!("bhcni-n-{id}");
        let pod_name = format!("bhcni-p-{id}");
        let dir = std::env::temp_dir().join(format!("bh-cni-priv-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let node = netns::create_named(&node_name).expect("creating a netns needs root");
        let pod = netns::create_named(&pod_name).unwrap();
        let lab = Self {
            node_name,
            pod_name,
            node,
            pod,
            dir,
            container_id: format!("ctr-{id}"),
            requests: Arc::default(),
        };
        lab.spawn_agent(answer);
        lab
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// A Unix-socket responder playing the agent: one JSON line in, `answer` out.
    fn spawn_agent(&self, answer: &'static str) {
        let listener = UnixListener::bind(self.socket()).unwrap();
        let requests = self.requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_err() {
                    continue;
                }
                if let Ok(r) = serde_json::from_str::<Request>(&line) {
                    requests.lock().unwrap().push(r);
                }
                let _ = stream.write_all(format!("{answer}\n").as_bytes());
            }
        });
    }

    fn config(&self) -> Value {
        serde_json::json!({
            "cniVersion": "1.1.0", "name": "bhtest", "type": "bulkhead-cni",
            "subnet": "10.251.7.0/24", "agentSocket": self.socket(), "dataDir": self.dir,
            "mtu": 1400, "agentTimeoutSeconds": 5,
        })
    }

    /// Runs the plugin inside the node netns, as a runtime on that node would.
    fn cni(&self, command: &str, netns: &str) -> (bool, Value) {
        self.cni_with(command, netns, &serde_json::json!({}))
    }

    /// Like [`Lab::cni`], with `extra` keys (`prevResult`, `cniVersion`, …) merged into the config.
    fn cni_with(&self, command: &str, netns: &str, extra: &Value) -> (bool, Value) {
        self.cni_as(&self.container_id, command, netns, extra)
    }

    /// Runs the plugin for `container_id`.
    fn cni_as(&self, container_id: &str, command: &str, netns: &str, extra: &Value) -> (bool, Value) {
        let mut conf = self.config();
        for (k, v) in extra.as_object().unwrap() {
            conf[k] = v.clone();
        }
        run_plugin(&self.node, BIN, command, container_id, netns, &conf)
    }

    fn pod_path(&self) -> String {
        self.pod.display().to_string()
    }

    fn host_veth(&self) -> String {
        host_veth_name(&self.container_id, "eth0")
    }

    /// Files in the IPAM store that name an address.
    fn allocations(&self) -> Vec<String> {
        let dir = self.dir.join("ipam/bhtest");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.parse::<Ipv4Addr>().is_ok())
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = netns::delete(&self.pod);
        let _ = netns::delete(&self.node);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `plugin` in `node` the way a runtime does: `CNI_*` environment, `conf` on stdin.
/// Returns whether it succeeded and its stdout as JSON (`Null` when empty).
fn run_plugin(node: &std::path::Path, plugin: &str, command: &str, container_id: &str, netns: &str, conf: &Value) -> (bool, Value) {
    run_plugin_env(node, plugin, command, container_id, netns, conf, &[])
}

/// [`run_plugin`] with `extra` environment variables.
fn run_plugin_env(
    node: &std::path::Path,
    plugin: &str,
    command: &str,
    container_id: &str,
    netns: &str,
    conf: &Value,
    extra: &[(&str, &str)],
) -> (bool, Value) {
    let conf = conf.to_string();
    let out = netns::run_in(node, || {
        let mut child = Command::new(plugin)
            .env_clear()
            .envs(extra.iter().copied())
            // portmap execs iptables.
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod1")
            .env("BULKHEAD_CNI_LOG", "debug")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {plugin}: {e}"));
        child.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    })
    .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    eprintln!(
        "{plugin} {command}: exit {:?}\nstdin: {conf}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let value = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(stdout.trim()).unwrap()
    };
    (out.status.success(), value)
}

/// `ip -n <ns> <args>`; tests may shell out, product code may not.
fn ip(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .expect("iproute2 `ip` is needed by this test");
    assert!(
        out.status.success(),
        "ip -n {ns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn link_exists(ns: &str, name: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", "dev", name])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// A `scope link` route line starting with `prefix` in `ip route` output.
fn has_link_route(routes: &str, prefix: &str) -> bool {
    routes.lines().any(|l| l.starts_with(prefix) && l.contains("scope link"))
}

#[test]
fn add_check_repeat_del() {
    let lab = Lab::new(r#"{"result":"ok"}"#);
    let (ok, result) = lab.cni("ADD", &lab.pod_path());
    assert!(ok, "{result}");
    let host = lab.host_veth();
    assert_eq!(result["cniVersion"], "1.1.0");
    assert_eq!(result["interfaces"][0]["name"], host.as_str());
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], lab.pod_path().as_str());
    assert_eq!(result["ips"][0]["address"], "10.251.7.2/32");
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(result["ips"][0]["interface"], 1);
    assert_eq!(result["routes"], serde_json::json!([{"dst":"0.0.0.0/0","gw":"169.254.1.1"}]));
    let host_mac = result["interfaces"][0]["mac"].as_str().unwrap().to_string();
    let pod_mac = result["interfaces"][1]["mac"].as_str().unwrap().to_string();

    // Pod side.
    let addr = ip(&lab.pod_name, &["-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains("inet 10.251.7.2/32"), "{addr}");
    assert!(addr.contains("mtu 1400") && addr.contains("UP"), "{addr}");
    let routes = ip(&lab.pod_name, &["-4", "route", "show"]);
    assert!(routes.contains("default via 169.254.1.1 dev eth0"), "{routes}");
    assert!(has_link_route(&routes, "169.254.1.1 dev eth0"), "{routes}");
    let neigh = ip(&lab.pod_name, &["neigh", "show", "169.254.1.1"]);
    assert!(neigh.contains(&format!("lladdr {host_mac} PERMANENT")), "{neigh}");
    assert!(ip(&lab.pod_name, &["link", "show", "dev", "lo"]).contains(",UP"));
    let v6 = netns::run_in(&lab.pod, || {
        std::fs::read_to_string("/proc/sys/net/ipv6/conf/eth0/disable_ipv6").unwrap()
    })
    .unwrap();
    assert_eq!(v6.trim(), "1");

    // Node side.
    let link = ip(&lab.node_name, &["link", "show", "dev", &host]);
    assert!(link.contains(",UP") && link.contains(&host_mac), "{link}");
    let routes = ip(&lab.node_name, &["-4", "route", "show"]);
    assert!(has_link_route(&routes, &format!("10.251.7.2 dev {host}")), "{routes}");
    let neigh = ip(&lab.node_name, &["neigh", "show", "10.251.7.2"]);
    assert!(neigh.contains(&format!("lladdr {pod_mac} PERMANENT")), "{neigh}");

    // The agent heard about the endpoint, with the host ifindex it can attach to.
    let ifindex: u32 = link.split(':').next().unwrap().trim().parse().unwrap();
    match &lab.requests.lock().unwrap()[0] {
        Request::AddEndpoint(s) => {
            assert_eq!(
                (
                    s.host_ifname.as_str(),
                    s.host_ifindex,
                    s.ipv4,
                    bulkhead_api::mac::to_text(s.mac).as_str()
                ),
                (host.as_str(), ifindex, Ipv4Addr::new(10, 251, 7, 2), pod_mac.as_str())
            );
            assert_eq!(
                (s.pod_namespace.as_str(), s.pod_name.as_str(), s.netns.as_str()),
                ("ns1", "pod1", lab.pod_path().as_str())
            );
        }
        other => panic!("first request was {other:?}"),
    }

    // The wiring carries traffic: node → pod over TCP and back.
    ip(&lab.node_name, &["link", "set", "lo", "up"]);
    ip(&lab.node_name, &["addr", "add", "10.251.7.1/32", "dev", "lo"]);
    let listener = netns::run_in(&lab.pod, || TcpListener::bind("10.251.7.2:7777").unwrap()).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.write_all(b"hi").unwrap();
        peer
    });
    let reply = netns::run_in(&lab.node, || {
        let mut s = TcpStream::connect_timeout(&"10.251.7.2:7777".parse().unwrap(), Duration::from_secs(5)).unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        buf
    })
    .unwrap();
    assert_eq!(reply, "hi");
    assert_eq!(server.join().unwrap().ip().to_string(), "10.251.7.1");

    let (ok, v) = lab.cni_with("CHECK", &lab.pod_path(), &serde_json::json!({ "prevResult": result }));
    assert!(ok, "{v}");
    assert!(matches!(lab.requests.lock().unwrap().last(), Some(Request::CheckEndpoint(_))));

    let (ok, again) = lab.cni("ADD", &lab.pod_path());
    assert!(ok, "{again}");
    assert_eq!(again["ips"], result["ips"]);
    assert_eq!(again["interfaces"], result["interfaces"]);
    assert_eq!(lab.allocations(), vec!["10.251.7.2".to_string()]);

    let (ok, v) = lab.cni("DEL", &lab.pod_path());
    assert!(ok, "{v}");
    assert!(!link_exists(&lab.node_name, &host));
    assert!(!link_exists(&lab.pod_name, "eth0"));
    assert!(lab.allocations().is_empty());
    assert!(matches!(lab.requests.lock().unwrap().last(), Some(Request::DelEndpoint(_))));
    let (ok, v) = lab.cni("DEL", &lab.pod_path());
    assert!(ok, "second DEL: {v}");

    // CHECK after DEL fails.
    let (ok, v) = lab.cni_with("CHECK", &lab.pod_path(), &serde_json::json!({ "prevResult": result }));
    assert!(!ok);
    assert_eq!(v["code"], 104);
}

#[test]
fn del_after_netns_is_gone() {
    let lab = Lab::new(r#"{"result":"ok"}"#);
    let (ok, v) = lab.cni("ADD", &lab.pod_path());
    assert!(ok, "{v}");
    netns::delete(&lab.pod).unwrap();
    let (ok, v) = lab.cni("DEL", &lab.pod_path());
    assert!(ok, "{v}");
    assert!(lab.allocations().is_empty());
    assert!(!link_exists(&lab.node_name, &lab.host_veth()));
    let (ok, v) = lab.cni("DEL", "");
    assert!(ok, "DEL without CNI_NETNS: {v}");
}

#[test]
fn del_removes_host_veth_when_the_pod_end_survives_elsewhere() {
    // No netns given: DEL must still find the pair by the host veth's computed name.
    let lab = Lab::new(r#"{"result":"ok"}"#);
    let (ok, v) = lab.cni("ADD", &lab.pod_path());
    assert!(ok, "{v}");
    let (ok, v) = lab.cni("DEL", "");
    assert!(ok, "{v}");
    assert!(!link_exists(&lab.node_name, &lab.host_veth()));
    assert!(!link_exists(&lab.pod_name, "eth0"));
    assert!(lab.allocations().is_empty());
}

fn assert_add_rolled_back(lab: &Lab, code: u64) {
    let (ok, v) = lab.cni("ADD", &lab.pod_path());
    assert!(!ok, "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["cniVersion"], "1.1.0");
    assert!(!link_exists(&lab.node_name, &lab.host_veth()), "host veth left behind");
    assert!(!link_exists(&lab.pod_name, "eth0"), "pod interface left behind");
    assert!(lab.allocations().is_empty(), "allocation left behind: {:?}", lab.allocations());
}

#[test]
fn agent_try_again_rolls_back_everything() {
    let lab = Lab::new(r#"{"result":"error","code":11,"message":"agent not ready"}"#);
    assert_add_rolled_back(&lab, 11);
}

#[test]
fn agent_rejection_is_102_and_rolls_back() {
    let lab = Lab::new(r#"{"result":"error","code":7,"message":"endpoint map full"}"#);
    assert_add_rolled_back(&lab, 102);
}

#[test]
fn missing_agent_is_try_again_later() {
    let lab = Lab::new(r#"{"result":"ok"}"#);
    std::fs::remove_file(lab.socket()).unwrap();
    assert_add_rolled_back(&lab, 11);
}

#[test]
fn pod_interfaces_only_in_the_netns_they_belong_to() {
    // The pod end is created directly in the pod netns: the node never has an `eth0` of ours.
    let lab = Lab::new(r#"{"result":"ok"}"#);
    let (ok, v) = lab.cni("ADD", &lab.pod_path());
    assert!(ok, "{v}");
    assert!(!link_exists(&lab.node_name, "eth0"));
    assert!(!link_exists(&lab.pod_name, &lab.host_veth()));
}

/// An extra pod namespace, removed on drop.
struct ExtraPod(PathBuf);

impl ExtraPod {
    fn new(tag: &str) -> Self {
        let name = format!("bhcni-x{tag}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
        Self(netns::create_named(&name).unwrap())
    }

    fn path(&self) -> String {
        self.0.display().to_string()
    }

    fn name(&self) -> String {
        self.0.file_name().unwrap().to_string_lossy().into_owned()
    }
}

impl Drop for ExtraPod {
    fn drop(&mut self) {
        let _ = netns::delete(&self.0);
    }
}

#[test]
fn check_compares_the_pod_with_prev_result() {
    let lab = Lab::new(r#"{"result":"ok"}"#);
    let (ok, result) = lab.cni("ADD", &lab.pod_path());
    assert!(ok, "{result}");
    let check = |prev: &Value| lab.cni_with("CHECK", &lab.pod_path(), &serde_json::json!({ "prevResult": prev }));
    let (ok, v) = check(&result);
    assert!(ok, "{v}");

    // No prevResult: the config is invalid for CHECK (7), as in the reference plugins.
    let (ok, v) = lab.cni("CHECK", &lab.pod_path());
    assert!(!ok);
    assert_eq!(v["code"], 7, "{v}");

    // A prevResult that disagrees with the pod: 104 with the reason.
    let mut other_ip = result.clone();
    other_ip["ips"][0]["address"] = "10.251.7.99/32".into();
    let (ok, v) = check(&other_ip);
    assert!(!ok);
    assert_eq!(v["code"], 104, "{v}");
    let mut other_mac = result.clone();
    other_mac["interfaces"][1]["mac"] = "02:de:ad:be:ef:00".into();
    let (ok, v) = check(&other_mac);
    assert!(!ok && v["details"].as_str().unwrap().contains("mac"), "{v}");
    let mut other_sandbox = result.clone();
    other_sandbox["interfaces"][1]["sandbox"] = "/run/netns/elsewhere".into();
    let (ok, v) = check(&other_sandbox);
    assert!(!ok && v["code"] == 104, "{v}");

    // The pod lost its default route: CHECK notices.
    ip(&lab.pod_name, &["route", "del", "default"]);
    let (ok, v) = check(&result);
    assert!(!ok, "{v}");
    assert!(v["details"].as_str().unwrap().contains("route 0.0.0.0/0 via 169.254.1.1"), "{v}");
    ip(&lab.pod_name, &["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]);
    let (ok, v) = check(&result);
    assert!(ok, "{v}");

    let (ok, v) = lab.cni("DEL", &lab.pod_path());
    assert!(ok, "{v}");
}

#[test]
fn every_supported_config_version_adds_checks_and_deletes() {
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let lab = Lab::new(r#"{"result":"ok"}"#);
        let v = serde_json::json!({ "cniVersion": version });
        let (ok, result) = lab.cni_with("ADD", &lab.pod_path(), &v);
        assert!(ok, "{version}: {result}");
        assert_eq!(result["cniVersion"], version);
        assert_eq!(result["ips"][0]["address"], "10.251.7.2/32");
        // 0.x results name the IP family; 1.x dropped the field; mtu is 1.1 only.
        assert_eq!(result["ips"][0].get("version").is_some(), version == "0.4.0", "{version}: {result}");
        assert_eq!(
            result["interfaces"][1].get("mtu").is_some(),
            version == "1.1.0",
            "{version}: {result}"
        );
        let (ok, out) = lab.cni_with(
            "CHECK",
            &lab.pod_path(),
            &serde_json::json!({ "cniVersion": version, "prevResult": result }),
        );
        assert!(ok, "{version}: {out}");
        let (ok, out) = lab.cni_with(
            "DEL",
            &lab.pod_path(),
            &serde_json::json!({ "cniVersion": version, "prevResult": result }),
        );
        assert!(ok, "{version}: {out}");
        assert!(lab.allocations().is_empty());
        assert!(!link_exists(&lab.node_name, &lab.host_veth()));
    }
}

#[test]
fn status_is_50_until_the_agent_is_ready() {
    let status = |ready: bool| {
        format!(
            r#"{{"result":"status","node_name":"n","ready":{ready},"endpoints":0,"identities":0,"policies":0,"policy_entries":0,"generation":1}}"#
        )
    };
    let ready = Lab::new(Box::leak(status(true).into_boxed_str()));
    let (ok, v) = ready.cni("STATUS", "");
    assert!(ok, "{v}");
    assert_eq!(v, Value::Null, "STATUS prints nothing on success");
    assert!(matches!(ready.requests.lock().unwrap().last(), Some(Request::Status)));
    let (ok, v) = ready.cni_with("STATUS", "", &serde_json::json!({ "cniVersion": "1.0.0" }));
    assert!(!ok);
    assert_eq!(v["code"], 1, "STATUS is a 1.1 verb: {v}");

    let syncing = Lab::new(Box::leak(status(false).into_boxed_str()));
    let (ok, v) = syncing.cni("STATUS", "");
    assert!(!ok);
    assert_eq!(v["code"], 50, "{v}");
    std::fs::remove_file(syncing.socket()).unwrap();
    let (ok, v) = syncing.cni("STATUS", "");
    assert!(!ok);
    assert_eq!(v["code"], 50, "no agent: {v}");
}

#[test]
fn gc_is_spec_1_1_and_needs_valid_attachments() {
    let lab = Lab::new(r#"{"result":"ok"}"#);
    let old = serde_json::json!({ "cniVersion": "1.0.0", "cni.dev/valid-attachments": [] });
    let (ok, v) = lab.cni_with("GC", "", &old);
    assert!(!ok);
    assert_eq!(v["code"], 1, "{v}");
    let (ok, v) = lab.cni_with("GC", "", &serde_json::json!({}));
    assert!(!ok, "GC without valid-attachments");
    assert_eq!(v["code"], 7, "{v}");
}

#[test]
fn gc_removes_attachments_the_runtime_no_longer_lists() {
    let lab = Lab::new(r#"{"result":"ok"}"#);
    let other = ExtraPod::new("gc");
    let stale_id = format!("{}-stale", lab.container_id);
    let (ok, kept) = lab.cni("ADD", &lab.pod_path());
    assert!(ok, "{kept}");
    let (ok, v) = lab.cni_as(&stale_id, "ADD", &other.path(), &serde_json::json!({}));
    assert!(ok, "{v}");
    let stale_host = host_veth_name(&stale_id, "eth0");
    assert!(link_exists(&lab.node_name, &stale_host));
    assert_eq!(lab.allocations().len(), 2);

    let valid = serde_json::json!({ "cni.dev/valid-attachments": [{ "containerID": lab.container_id, "ifname": "eth0" }] });
    let (ok, v) = lab.cni_with("GC", "", &valid);
    assert!(ok, "{v}");
    assert_eq!(v, Value::Null, "GC prints nothing on success");
    assert!(!link_exists(&lab.node_name, &stale_host), "stale host veth left");
    assert!(!link_exists(&other.name(), "eth0"), "stale pod end left");
    assert_eq!(lab.allocations(), vec!["10.251.7.2".to_string()]);
    assert!(link_exists(&lab.node_name, &lab.host_veth()), "valid attachment removed");
    let (ok, v) = lab.cni_with("CHECK", &lab.pod_path(), &serde_json::json!({ "prevResult": kept }));
    assert!(ok, "valid attachment broken by GC: {v}");
    match lab.requests.lock().unwrap().iter().rev().find(|r| matches!(r, Request::Gc { .. })) {
        Some(Request::Gc { network, valid }) => {
            assert_eq!(network, "bhtest");
            assert_eq!(valid.len(), 1);
            assert_eq!(
                (valid[0].container_id.as_str(), valid[0].ifname.as_str()),
                (lab.container_id.as_str(), "eth0")
            );
        }
        other => panic!("agent got no GC: {other:?}"),
    }

    // With the agent gone, GC still frees what it can locally, and succeeds.
    std::fs::remove_file(lab.socket()).unwrap();
    let (ok, v) = lab.cni_with("GC", "", &serde_json::json!({ "cni.dev/valid-attachments": [] }));
    assert!(ok, "{v}");
    assert!(lab.allocations().is_empty());
    assert!(!link_exists(&lab.node_name, &lab.host_veth()));
}

#[test]
fn del_succeeds_and_cleans_up_with_the_agent_down() {
    let lab = Lab::new(r#"{"result":"ok"}"#);
    let (ok, v) = lab.cni("ADD", &lab.pod_path());
    assert!(ok, "{v}");
    std::fs::remove_file(lab.socket()).unwrap();
    let (ok, v) = lab.cni("DEL", &lab.pod_path());
    assert!(ok, "DEL must not wedge on a missing agent: {v}");
    assert!(!link_exists(&lab.node_name, &lab.host_veth()));
    assert!(!link_exists(&lab.pod_name, "eth0"));
    assert!(lab.allocations().is_empty());
}

#[test]
fn del_succeeds_with_an_agent_that_never_answers() {
    // A socket that accepts and then says nothing: DEL times out on the agent and carries on.
    let lab = Lab::new(r#"{"result":"ok"}"#);
    let (ok, v) = lab.cni("ADD", &lab.pod_path());
    assert!(ok, "{v}");
    std::fs::remove_file(lab.socket()).unwrap();
    let mute = UnixListener::bind(lab.socket()).unwrap();
    let keep = std::thread::spawn(move || {
        let held: Vec<_> = mute.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(4));
        drop(held);
    });
    let quick = serde_json::json!({ "agentTimeoutSeconds": 1 });
    let (ok, v) = lab.cni_with("DEL", &lab.pod_path(), &quick);
    assert!(ok, "{v}");
    assert!(!link_exists(&lab.node_name, &lab.host_veth()));
    assert!(lab.allocations().is_empty());
    keep.join().unwrap();
}

/// The reference `portmap` plugin; setup.sh installs containernetworking-plugins.
const PORTMAP: &str = "/usr/lib/cni/portmap";

/// The nat table of `ns`, as `iptables -S` prints it.
fn nat_rules(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "iptables", "-t", "nat", "-S"])
        .output()
        .expect("iptables is needed by this test");
    assert!(out.status.success(), "iptables: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn chained_with_portmap_like_libcni() {
    assert!(
        std::path::Path::new(PORTMAP).is_file(),
        "{PORTMAP} is missing: run scripts/setup.sh (containernetworking-plugins)"
    );
    // portmap 1.1.1 speaks up to 1.0.0.
    for version in ["0.4.0", "1.0.0"] {
        let lab = Lab::new(r#"{"result":"ok"}"#);
        // The conflist `[bulkhead-cni, portmap]`, each plugin's config as libcni builds it:
        // the list's name and cniVersion, then prevResult from the plugin before and
        // runtimeConfig for the capabilities it declares.
        let ours = |extra: Value| {
            let mut c = lab.config();
            c["cniVersion"] = version.into();
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            c
        };
        let portmap = |prev: &Value| {
            serde_json::json!({
                "cniVersion": version, "name": "bhtest", "type": "portmap",
                "capabilities": { "portMappings": true }, "snat": false,
                "runtimeConfig": { "portMappings": [{ "hostPort": 18080, "containerPort": 80, "protocol": "tcp" }] },
                "prevResult": prev,
            })
        };
        let cid = lab.container_id.clone();
        let pod = lab.pod_path();

        let (ok, first) = run_plugin(&lab.node, BIN, "ADD", &cid, &pod, &ours(serde_json::json!({})));
        assert!(ok, "{version}: {first}");
        let (ok, last) = run_plugin(&lab.node, PORTMAP, "ADD", &cid, &pod, &portmap(&first));
        assert!(ok, "{version}: portmap ADD: {last}");
        // portmap passes our result on unchanged: it is what the runtime caches.
        assert_eq!(last["ips"], first["ips"], "{version}");
        assert_eq!(last["interfaces"], first["interfaces"], "{version}");
        let rules = nat_rules(&lab.node_name);
        assert!(
            rules.contains("--to-destination 10.251.7.2:80"),
            "{version}: no DNAT to the pod:\n{rules}"
        );
        assert!(rules.contains("--dport 18080"), "{version}:\n{rules}");

        // CHECK: every plugin, in order, with the cached result.
        let (ok, v) = run_plugin(
            &lab.node,
            BIN,
            "CHECK",
            &cid,
            &pod,
            &ours(serde_json::json!({ "prevResult": last })),
        );
        assert!(ok, "{version}: {v}");
        let (ok, v) = run_plugin(&lab.node, PORTMAP, "CHECK", &cid, &pod, &portmap(&last));
        // portmap 1.1.1 checks ip6tables rules even for an IPv4-only result and fails
        // (containernetworking/plugins#819, fixed upstream later): only that failure is allowed.
        let known_bug = v["msg"].as_str().is_some_and(|m| m.contains("could not check ipv6 dnat"));
        assert!(ok || known_bug, "{version}: portmap CHECK: {v}");

        // DEL: reverse order, each with the cached result.
        let (ok, v) = run_plugin(&lab.node, PORTMAP, "DEL", &cid, &pod, &portmap(&last));
        assert!(ok, "{version}: portmap DEL: {v}");
        let (ok, v) = run_plugin(&lab.node, BIN, "DEL", &cid, &pod, &ours(serde_json::json!({ "prevResult": last })));
        assert!(ok, "{version}: {v}");
        let rules = nat_rules(&lab.node_name);
        assert!(!rules.contains("10.251.7.2"), "{version}: DNAT left behind:\n{rules}");
        assert!(lab.allocations().is_empty());
        assert!(!link_exists(&lab.node_name, &lab.host_veth()));
    }
}

#[test]
fn add_after_another_plugin_extends_its_result() {
    // Not first in a chain: the output is prevResult plus our interfaces, with indices shifted.
    let lab = Lab::new(r#"{"result":"ok"}"#);
    let prev = serde_json::json!({
        "cniVersion": "1.0.0",
        "interfaces": [{ "name": "dummy0", "mac": "02:00:00:00:00:09" }],
        "ips": [],
        "dns": { "nameservers": ["10.96.0.10"] },
    });
    let (ok, out) = lab.cni_with(
        "ADD",
        &lab.pod_path(),
        &serde_json::json!({ "cniVersion": "1.0.0", "prevResult": prev }),
    );
    assert!(ok, "{out}");
    assert_eq!(out["interfaces"][0]["name"], "dummy0");
    assert_eq!(out["interfaces"][2]["name"], "eth0");
    assert_eq!(out["ips"][0]["interface"], 2);
    assert_eq!(out["dns"]["nameservers"][0], "10.96.0.10");
    let (ok, v) = lab.cni_with(
        "CHECK",
        &lab.pod_path(),
        &serde_json::json!({ "cniVersion": "1.0.0", "prevResult": out }),
    );
    assert!(ok, "{v}");
}

#[test]
fn bridge_and_bridge_port_are_idempotent() {
    use bulkhead_hostnet::netlink;
    let ns = ExtraPod::new("br");
    let peer_ns = ExtraPod::new("brp");
    let label = ns.name();
    let run = || {
        let (label, peer_path) = (label.as_str(), peer_ns.0.as_path());
        netlink::with_handle(Some(&ns.0), |h| async move {
            let bridge = netlink::ensure_bridge(&h, "br0", label).await?;
            if netlink::link_by_name(&h, "port0").await?.is_none() {
                netlink::create_veth(&h, "port0", "eth0", peer_path, None).await?;
            }
            let port = netlink::require_link(&h, "port0", label).await?;
            netlink::ensure_bridge_port(&h, port.index, "port0", bridge.index).await?;
            Ok(bridge.index)
        })
        .unwrap()
    };
    let first = run();
    assert_eq!(run(), first, "the second run must find the same bridge, not make another");
    assert!(ip(&ns.name(), &["-d", "link", "show", "dev", "br0"]).contains("bridge"));
    assert!(ip(&ns.name(), &["link", "show", "dev", "port0"]).contains("master br0"));
    assert!(link_exists(&peer_ns.name(), "eth0"));
}

#[test]
fn without_subnet_add_uses_the_agents_pod_cidr_and_del_needs_none() {
    let lab = Lab::new(r#"{"result":"ok"}"#);
    let no_subnet = serde_json::json!({ "subnet": null });
    let pod_cidr_file = lab.socket().with_file_name("pod-cidr");
    // Before the agent published this node's pod CIDR: try again later, nothing created.
    let (ok, v) = lab.cni_with("ADD", &lab.pod_path(), &no_subnet);
    assert!(!ok, "{v}");
    assert_eq!(v["code"], 11, "{v}");
    assert!(!link_exists(&lab.node_name, &lab.host_veth()));
    assert!(lab.allocations().is_empty());
    std::fs::write(&pod_cidr_file, "10.251.9.0/24\n").unwrap();
    let (ok, v) = lab.cni_with("ADD", &lab.pod_path(), &no_subnet);
    assert!(ok, "{v}");
    assert_eq!(lab.allocations(), vec!["10.251.9.2".to_string()]);
    // The agent and its file are gone (a node reboot empties /run): DEL still cleans up.
    std::fs::remove_file(lab.socket()).unwrap();
    std::fs::remove_file(&pod_cidr_file).unwrap();
    let (ok, v) = lab.cni_with("DEL", &lab.pod_path(), &no_subnet);
    assert!(ok, "DEL must not need the pod CIDR: {v}");
    assert!(!link_exists(&lab.node_name, &lab.host_veth()));
    assert!(lab.allocations().is_empty());
}

/// Sends `count` ARP requests for `target` out of `ifname` in the calling thread's netns,
/// each from a different made-up sender address and MAC.
fn arp_flood(ifname: &str, target: Ipv4Addr, count: u16) {
    // SAFETY: plain socket calls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from((libc::ETH_P_ARP as u16).to_be()));
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        let name = std::ffi::CString::new(ifname).unwrap();
        let index = libc::if_nametoindex(name.as_ptr());
        assert!(index > 0);
        for i in 0..count {
            let [hi, lo] = i.to_be_bytes();
            let sha = [0x02, 0x66, 0, 0, hi, lo];
            let mut frame = Vec::with_capacity(42);
            frame.extend_from_slice(&[0xff; 6]);
            frame.extend_from_slice(&sha);
            frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
            frame.extend_from_slice(&sha);
            frame.extend_from_slice(&[10, 99, hi, lo]);
            frame.extend_from_slice(&[0; 6]);
            frame.extend_from_slice(&target.octets());
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = index as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
            let sent = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(sent, 42, "sendto: {}", std::io::Error::last_os_error());
        }
        libc::close(fd);
    }
}

#[test]
fn a_pod_cannot_fill_the_node_neighbour_table_with_arp() {
    let lab = Lab::new(r#"{"result":"ok"}"#);
    let (ok, result) = lab.cni("ADD", &lab.pod_path());
    assert!(ok, "{result}");
    let host = lab.host_veth();
    for (key, want) in [("arp_ignore", "8"), ("rp_filter", "1")] {
        let value = netns::run_in(&lab.node, || {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{host}/{key}")).unwrap()
        })
        .unwrap();
        assert_eq!(value.trim(), want, "{key}");
    }
    // An address of the node's own, which a pod might ARP for.
    ip(&lab.node_name, &["link", "set", "lo", "up"]);
    ip(&lab.node_name, &["addr", "add", "10.251.7.1/32", "dev", "lo"]);
    netns::run_in(&lab.pod, || arp_flood("eth0", Ipv4Addr::new(10, 251, 7, 1), 200)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let neigh = ip(&lab.node_name, &["-4", "neigh", "show", "dev", &host]);
    let learnt: Vec<&str> = neigh.lines().filter(|l| l.starts_with("10.99.")).collect();
    assert!(
        learnt.is_empty(),
        "the node learnt {} made-up neighbours, e.g. {:?}",
        learnt.len(),
        learnt.first()
    );
    assert!(neigh.contains("10.251.7.2") && neigh.contains("PERMANENT"), "{neigh}");
}

/// Host veths of this test's node named like the plugin names them.
fn host_veths(node: &str) -> Vec<String> {
    ip(node, &["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("bh"))
        .collect()
}

/// 100 pods added at once, then deleted at once: every address distinct, and afterwards no
/// address, host veth or endpoint is left.
#[test]
fn a_hundred_parallel_adds_and_dels_leak_nothing() {
    const PODS: usize = 100;
    let lab = Lab::new(r#"{"result":"ok"}"#);
    let pods: Vec<ExtraPod> = (0..PODS).map(|_| ExtraPod::new("par")).collect();
    let ids: Vec<String> = (0..PODS).map(|i| format!("{}-par{i}", lab.container_id)).collect();
    let lab_ref = &lab;
    let run_all = |command: &'static str| -> Vec<(bool, Value)> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = pods
                .iter()
                .zip(&ids)
                .map(|(pod, id)| scope.spawn(move || lab_ref.cni_as(id, command, &pod.path(), &serde_json::json!({}))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let added = run_all("ADD");
    let mut addresses = std::collections::BTreeSet::new();
    for (ok, result) in &added {
        assert!(ok, "{result}");
        assert!(
            addresses.insert(result["ips"][0]["address"].as_str().unwrap().to_string()),
            "duplicate address {result}"
        );
    }
    assert_eq!(addresses.len(), PODS);
    assert_eq!(lab.allocations().len(), PODS);
    assert_eq!(host_veths(&lab.node_name).len(), PODS);
    for (ok, result) in run_all("DEL") {
        assert!(ok, "{result}");
    }
    assert!(lab.allocations().is_empty(), "leaked addresses: {:?}", lab.allocations());
    assert!(
        host_veths(&lab.node_name).is_empty(),
        "leaked veths: {:?}",
        host_veths(&lab.node_name)
    );
    for pod in &pods {
        assert!(!link_exists(&pod.name(), "eth0"), "a pod kept its interface");
    }
    let requests = lab.requests.lock().unwrap();
    let adds = requests.iter().filter(|r| matches!(r, Request::AddEndpoint(_))).count();
    let dels = requests.iter().filter(|r| matches!(r, Request::DelEndpoint(_))).count();
    assert_eq!((adds, dels), (PODS, PODS));
}

/// The plugin killed (SIGKILL) after each step of ADD, then DEL — or GC, which a runtime
/// runs when it lost track of the container — leaves nothing behind.
#[test]
fn a_plugin_killed_at_any_step_of_add_is_cleaned_up_by_del_or_gc() {
    for (i, step) in bulkhead_cni::commands::ADD_STEPS.iter().enumerate() {
        for cleanup in ["DEL", "GC"] {
            let lab = Lab::new(r#"{"result":"ok"}"#);
            let (ok, v) = run_plugin_env(
                &lab.node,
                BIN,
                "ADD",
                &lab.container_id,
                &lab.pod_path(),
                &lab.config(),
                &[("BULKHEAD_CNI_KILL_AT", step)],
            );
            assert!(!ok && v == Value::Null, "ADD killed after {step} printed nothing: {v}");
            // Something was left: the address from the first step on.
            assert_eq!(lab.allocations().len(), 1, "after {step}");
            let (ok, v) = match cleanup {
                "DEL" => lab.cni("DEL", &lab.pod_path()),
                _ => lab.cni_with("GC", "", &serde_json::json!({ "cni.dev/valid-attachments": [] })),
            };
            assert!(ok, "{cleanup} after a kill at {step}: {v}");
            assert!(lab.allocations().is_empty(), "{cleanup} after {step} leaked an address");
            assert!(
                !link_exists(&lab.node_name, &lab.host_veth()),
                "{cleanup} after {step} leaked the host veth"
            );
            if cleanup == "DEL" || i > 0 {
                assert!(
                    !link_exists(&lab.pod_name, "eth0"),
                    "{cleanup} after {step} left the pod's interface"
                );
            }
            // The agent is told to forget the endpoint whenever it may have heard of it.
            let requests = lab.requests.lock().unwrap();
            let forgot = requests.iter().any(|r| matches!(r, Request::DelEndpoint(_) | Request::Gc { .. }));
            assert!(forgot, "{cleanup} after {step} did not tell the agent");
        }
    }
}
