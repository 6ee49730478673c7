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

use bulkhead_cni::agent_api::Request;
use bulkhead_cni::netlink::host_veth_name;
use bulkhead_cni::netns;
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

    fn config(&self) -> String {
        serde_json::json!({
            "cniVersion": "1.1.0", "name": "bhtest", "type": "bulkhead-cni",
            "subnet": "10.251.7.0/24", "agentSocket": self.socket(), "dataDir": self.dir,
            "mtu": 1400, "agentTimeoutSeconds": 5,
        })
        .to_string()
    }

    /// Runs the plugin inside the node netns, as a runtime on that node would.
    fn cni(&self, command: &str, netns: &str) -> (bool, Value) {
        let conf = self.config();
        let out = netns::run_in(&self.node, || {
            let mut child = Command::new(BIN)
                .env_clear()
                .env("CNI_COMMAND", command)
                .env("CNI_CONTAINERID", &self.container_id)
                .env("CNI_NETNS", netns)
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", "/opt/cni/bin")
                .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod1")
                .env("BULKHEAD_CNI_LOG", "debug")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
            child.wait_with_output().unwrap()
        })
        .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        eprintln!(
            "{command}: exit {:?}\nstdout: {stdout}\nstderr: {}",
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
                (s.host_ifname.as_str(), s.host_ifindex, s.ipv4, s.mac.as_str()),
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

    let (ok, v) = lab.cni("CHECK", &lab.pod_path());
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
    let (ok, v) = lab.cni("CHECK", &lab.pod_path());
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
