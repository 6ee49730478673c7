//! ClusterIP Services end to end: the lab allocates addresses and plays the EndpointSlice
//! controller, the agents write the service maps, and the datapath translates a ClusterIP to
//! a backend before policy.
//!
//! Needs `cargo build` at the workspace root first; runs as root.
#![expect(clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_e2e::{binary, flow_pod, json_lines, three_by_three, Lab, X_A_FROM_B};
use serde_json::Value;

/// `lab services -o json`.
fn services(lab: &Lab) -> Vec<Value> {
    let out = lab.ok(&["services", "-o", "json"]);
    serde_json::from_str::<Value>(&out)
        .expect("services json")
        .as_array()
        .expect("services: a list")
        .clone()
}

/// One Service of `lab services -o json`; panics naming what is listed when it is not.
fn service(lab: &Lab, ns: &str, name: &str) -> Value {
    let all = services(lab);
    all.iter()
        .find(|s| s["namespace"] == ns && s["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no Service {ns}/{name} in {all:?}"))
}

/// A Service's ClusterIP.
fn vip(lab: &Lab, ns: &str, name: &str) -> Ipv4Addr {
    let s = service(lab, ns, name);
    s["clusterIP"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("{ns}/{name} has no ClusterIP: {s}"))
}

/// `(pod, port)` of each backend of a Service, as listed.
fn backends(s: &Value) -> BTreeSet<(String, u64)> {
    s["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            assert_eq!(b["ready"], true, "{b}");
            (b["pod"].as_str().expect("pod").to_string(), b["port"].as_u64().expect("port"))
        })
        .collect()
}

/// The lab's service CIDR from `status -o json`.
fn service_cidr(lab: &Lab) -> (Ipv4Addr, u8) {
    let status = lab.status();
    let cidr = status["serviceCIDR"].as_str().expect("serviceCIDR in status");
    let (net, len) = cidr.split_once('/').expect("a cidr");
    (net.parse().expect("network"), len.parse().expect("prefix"))
}

/// The `n`-th address of the service CIDR.
fn nth_service_ip(lab: &Lab, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(service_cidr(lab).0) + n)
}

/// Runs `f` on a thread inside the pod's network namespace.
fn in_pod<T: Send>(lab: &Lab, pod: &str, f: impl FnOnce() -> T + Send) -> T {
    let state: Value = serde_json::from_slice(&std::fs::read(lab.dir.join("lab.json")).expect("read lab.json")).expect("lab.json");
    let netns = state["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| format!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or("")) == pod)
        .and_then(|p| p["netns"].as_str())
        .unwrap_or_else(|| panic!("no pod {pod} in lab.json"))
        .to_string();
    bulkhead_hostnet::netns::run_in(&bulkhead_hostnet::netns::named_path(&netns), f).expect("enter the pod's netns")
}

/// A TCP connection to a lab pod's port: the pod writes its name, then echoes.
struct Conn {
    reader: BufReader<TcpStream>,
    /// `namespace/pod` that answered.
    backend: String,
}

impl Conn {
    /// Connects (from the calling thread's namespace) and reads the backend's name.
    fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut reader = BufReader::new(stream);
        let mut name = String::new();
        reader.read_line(&mut name)?;
        if name.is_empty() {
            return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "closed before the name"));
        }
        Ok(Conn {
            reader,
            backend: name.trim().to_string(),
        })
    }

    /// Sends a line and reads it back: the connection still works end to end.
    fn echo(&mut self, text: &str) -> std::io::Result<()> {
        self.reader.get_mut().write_all(format!("{text}\n").as_bytes())?;
        let mut back = String::new();
        self.reader.read_line(&mut back)?;
        if back.trim() == text {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("sent {text:?}, got {back:?}")))
        }
    }
}

/// How many of `n` new connections from `pod` to `addr` each backend answered.
fn spread(lab: &Lab, pod: &str, addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    in_pod(lab, pod, || {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let conn = Conn::open(addr).unwrap_or_else(|e| panic!("{pod} -> {addr}: connection {i} of {n}: {e}"));
            *seen.entry(conn.backend).or_insert(0) += 1;
        }
        seen
    })
}

/// Sends a datagram and waits for the echo, a few times within `wait`; a fresh socket (and
/// source port) for each call, so each is a new flow.
fn udp_echo(addr: SocketAddr, payload: &str, wait: Duration) -> bool {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind udp");
    socket.connect(addr).expect("connect udp");
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        let _ = socket.send(payload.as_bytes());
        socket.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        if let Ok(n) = socket.recv(&mut buf) {
            if &buf[..n] == payload.as_bytes() {
                return true;
            }
        }
    }
    false
}

/// Runs `bulkhead observe --lab-dir DIR ARGS -o json`.
fn observe(lab: &Lab, args: &[&str]) -> Vec<Value> {
    let out = Command::new(binary("bulkhead"))
        .arg("observe")
        .arg("--lab-dir")
        .arg(&lab.dir)
        .args(args)
        .args(["-o", "json"])
        .output()
        .expect("run bulkhead observe");
    assert!(out.status.success(), "observe {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    json_lines(&out.stdout)
}

/// The sum of a counter's samples whose labels contain every `k="v"` of `labels`, from every
/// node's `/metrics`.
fn metric_sum(lab: &Lab, name: &str, labels: &[&str]) -> f64 {
    let status = lab.status();
    let mut total = 0.0;
    for node in status["nodes"].as_array().expect("nodes") {
        let url = node["metricsURL"].as_str().expect("metricsURL");
        let addr = url.trim_start_matches("http://").trim_end_matches("/metrics");
        let mut stream = TcpStream::connect(addr).expect("connect to metrics");
        stream
            .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .expect("request");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("read metrics");
        for line in text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        {
            if labels.iter().all(|l| line.contains(l)) {
                total += line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            }
        }
    }
    total
}

fn pod_yaml(ns: &str, name: &str, labels: &str, node: Option<&str>, ports: &str) -> String {
    let node = node.map(|n| format!("  nodeName: {n}\n")).unwrap_or_default();
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec:\n{node}  containers:\n  - name: c\n    image: agnhost\n    ports: [{ports}]\n"
    )
}

fn namespace_yaml(ns: &str) -> String {
    format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n")
}

/// The lab as the API server and the EndpointSlice controller: ClusterIPs from its service
/// CIDR (named ones kept, clashes and strays refused without a change, freed on delete),
/// slices that follow pods and labels with named ports resolved per pod, user slices kept for
/// a Service without a selector, and a Service of its own for every pod that relabelling does
/// not move.
#[test]
fn services_get_addresses_endpoints_and_pods_their_own_service() {
    let lab = Lab::new("svclab");
    let mut yaml = namespace_yaml("shop");
    yaml += &pod_yaml("shop", "a", "app: web", None, "{name: http, containerPort: 8080}");
    yaml += &pod_yaml(
        "shop",
        "b",
        "app: web",
        None,
        "{name: http, containerPort: 9090}, {containerPort: 53, protocol: UDP}",
    );
    yaml += &pod_yaml("shop", "c", "app: db", None, "{name: http, containerPort: 7070}");
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: http}]\n";
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: headless, namespace: shop}\nspec: {clusterIP: None, selector: {app: db}, ports: [{port: 7070}]}\n";
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: manual, namespace: shop}\nspec: {ports: [{port: 443}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: manual-1, namespace: shop, labels: {kubernetes.io/service-name: manual}}\naddressType: IPv4\nendpoints: [{addresses: [10.9.9.9]}]\nports: [{port: 8443}]\n";
    lab.ok(&["up", "-f", &lab.file("shop.yaml", &yaml)]);
    let (net, len) = service_cidr(&lab);
    assert!(len <= 24, "service cidr /{len}");
    let in_cidr = |ip: Ipv4Addr| (u32::from(ip) ^ u32::from(net)) >> (32 - len) == 0;
    let web = vip(&lab, "shop", "web");
    assert!(in_cidr(web), "{web} outside {net}/{len}");
    assert_eq!(
        backends(&service(&lab, "shop", "web")),
        BTreeSet::from([("shop/a".into(), 8080), ("shop/b".into(), 9090)]),
        "the named port resolves per pod"
    );
    let headless = service(&lab, "shop", "headless");
    assert_eq!(headless["clusterIP"], "None");
    assert_eq!(backends(&headless), BTreeSet::from([("shop/c".into(), 7070)]));
    let manual = service(&lab, "shop", "manual");
    assert_eq!(manual["selector"], Value::Null);
    assert_eq!(manual["backends"][0]["ip"], "10.9.9.9", "the user's slice is kept: {manual}");
    // Every pod has its own Service, selector-less, with its declared ports.
    let own_b = service(&lab, "shop", "bh-pod-b");
    assert_eq!(own_b["forPod"], "shop/b");
    assert_eq!(own_b["selector"], Value::Null);
    let ports: Vec<(u64, &str, u64)> = own_b["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["port"].as_u64().expect("port"),
                p["protocol"].as_str().expect("protocol"),
                p["targetPort"].as_u64().expect("numeric"),
            )
        })
        .collect();
    assert_eq!(ports, [(9090, "TCP", 9090), (53, "UDP", 53)]);
    assert_eq!(backends(&own_b), BTreeSet::from([("shop/b".into(), 9090), ("shop/b".into(), 53)]));
    let own_a_vip = vip(&lab, "shop", "bh-pod-a");
    assert!(in_cidr(own_a_vip));
    let all: BTreeSet<Ipv4Addr> = services(&lab)
        .iter()
        .filter_map(|s| s["clusterIP"].as_str()?.parse().ok())
        .collect();
    assert_eq!(all.len(), 5, "5 distinct ClusterIPs (web, manual, 3 pod Services)");

    // Labels change: a leaves web, c joins it with its own port; a's own Service stays a's.
    let relabel = pod_yaml("shop", "a", "app: gone", None, "{name: http, containerPort: 8080}")
        + &pod_yaml("shop", "c", "app: web", None, "{name: http, containerPort: 7070}");
    lab.ok(&["apply", "-f", &lab.file("relabel.yaml", &relabel)]);
    assert_eq!(
        backends(&service(&lab, "shop", "web")),
        BTreeSet::from([("shop/b".into(), 9090), ("shop/c".into(), 7070)])
    );
    assert_eq!(vip(&lab, "shop", "web"), web, "a Service keeps its address");
    assert_eq!(backends(&service(&lab, "shop", "headless")), BTreeSet::new());
    assert_eq!(vip(&lab, "shop", "bh-pod-a"), own_a_vip);
    assert_eq!(
        backends(&service(&lab, "shop", "bh-pod-a")),
        BTreeSet::from([("shop/a".into(), 8080)])
    );

    // A named address is kept; a taken one, one outside the CIDR or a changed one is refused
    // and nothing changes.
    let dns_ip = nth_service_ip(&lab, 10);
    let named = |name: &str, ip: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{clusterIP: {ip}, ports: [{{port: 53, protocol: UDP}}]}}\n")
    };
    lab.ok(&["apply", "-f", &lab.file("dns.yaml", &named("dns", &dns_ip.to_string()))]);
    assert_eq!(vip(&lab, "shop", "dns"), dns_ip);
    let before = lab.ok(&["services", "-o", "json"]);
    let outside = Ipv4Addr::from(u32::from(net).wrapping_sub(1)).to_string();
    for (file, text, needle) in [
        (
            "clash.yaml",
            named("other", &dns_ip.to_string()),
            "already allocated to Service shop/dns".to_string(),
        ),
        (
            "outside.yaml",
            named("other", &outside),
            format!("{outside} is not a usable address"),
        ),
        (
            "changed.yaml",
            named("dns", &nth_service_ip(&lab, 11).to_string()),
            "field is immutable".to_string(),
        ),
        (
            "reserved.yaml",
            named("bh-pod-x", &nth_service_ip(&lab, 12).to_string()),
            "bh-pod-".to_string(),
        ),
    ] {
        let out = lab.run(&["apply", "-f", &lab.file(file, &text)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} was accepted");
        assert!(stderr.contains(&needle), "{file}: {stderr} does not say {needle:?}");
        assert_eq!(lab.ok(&["services", "-o", "json"]), before, "{file} changed the Services");
    }
    // Deleting a Service frees its address.
    lab.ok(&["delete", "-f", &lab.file("dns-del.yaml", &named("dns", &dns_ip.to_string()))]);
    lab.ok(&["apply", "-f", &lab.file("dns2.yaml", &named("dns2", &dns_ip.to_string()))]);
    assert_eq!(vip(&lab, "shop", "dns2"), dns_ip);
    // A deleted pod takes its Service and leaves the others' slices.
    lab.ok(&["delete", "-f", &lab.file("del-b.yaml", &pod_yaml("shop", "b", "", None, ""))]);
    assert!(services(&lab).iter().all(|s| s["name"] != "bh-pod-b"), "b's Service is gone");
    assert_eq!(backends(&service(&lab, "shop", "web")), BTreeSet::from([("shop/c".into(), 7070)]));
    let table = lab.ok(&["services"]);
    assert!(table.contains("shop/web") && table.contains("shop/c="), "{table}");
}

/// `probe --via service` prints exactly what a direct probe prints, under policy, for a port
/// every pod serves (TCP and UDP) and one none serves (refused both ways, once the lab added
/// it to the pod Services).
#[test]
fn probe_via_service_matches_a_direct_probe() {
    let lab = Lab::new("svcprobe");
    lab.ok(&["up", "-f", &lab.file("pods.yaml", &three_by_three())]);
    lab.ok(&["apply", "-f", &lab.file("policy.yaml", X_A_FROM_B)]);
    for (port, protocol) in [("80", "TCP"), ("81", "UDP"), ("82", "TCP")] {
        let direct = lab.ok(&["probe", "--port", port, "--protocol", protocol, "-o", "json"]);
        let via = lab.ok(&["probe", "--port", port, "--protocol", protocol, "--via", "service", "-o", "json"]);
        let (d, v): (Value, Value) = (
            serde_json::from_str(&direct).expect("direct json"),
            serde_json::from_str(&via).expect("via json"),
        );
        assert_eq!(v, d, "{port}/{protocol}: via service differs from direct");
        let results = d["results"].as_array().expect("results");
        assert_eq!(results.len(), bulkhead_e2e::PAIRS);
        let connected = results.iter().filter(|r| r["result"] == "connected").count();
        if port == "82" {
            assert_eq!(connected, 0, "nothing serves 82");
        } else {
            assert!(
                connected > 0 && connected < results.len(),
                "{port}/{protocol}: policy decides some pairs"
            );
        }
    }
    let own = service(&lab, "x", "bh-pod-a");
    assert!(
        own["ports"].as_array().expect("ports").iter().any(|p| p["port"] == 82),
        "the probed port joined the pod Services: {own}"
    );
}

/// The DNS case: a UDP Service with two backends in kube-system. A client whose egress
/// policy allows only those backends (by pod and namespace labels, on the backend's port)
/// reaches them through the ClusterIP — decided on the backend, not on the address it dialled
/// — and a client without that allowance is dropped with `policy_denied`.
#[test]
fn dns_through_a_cluster_ip_under_egress_policy() {
    let lab = Lab::new("svcdns");
    let mut yaml = namespace_yaml("kube-system") + &namespace_yaml("app");
    let dns_pod = |i: usize| {
        pod_yaml(
            "kube-system",
            &format!("coredns-{i}"),
            "k8s-app: kube-dns",
            Some(["node0", "node1"][i]),
            "{name: dns, containerPort: 53, protocol: UDP}",
        )
    };
    for i in 0..2 {
        yaml += &dns_pod(i);
    }
    yaml += &pod_yaml("app", "allowed", "role: allowed", Some("node0"), "");
    yaml += &pod_yaml("app", "denied", "role: denied", Some("node1"), "");
    yaml += &pod_yaml("app", "peer", "role: peer", Some("node0"), "{containerPort: 80}");
    lab.ok(&["up", "--nodes", "2", "-f", &lab.file("cluster.yaml", &yaml)]);
    let dns_ip = nth_service_ip(&lab, 10);
    let services_yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: kube-dns, namespace: kube-system}}\nspec:\n  clusterIP: {dns_ip}\n  selector: {{k8s-app: kube-dns}}\n  ports: [{{name: dns, port: 53, targetPort: dns, protocol: UDP}}]\n"
    );
    lab.ok(&["apply", "-f", &lab.file("dns.yaml", &services_yaml)]);
    assert_eq!(vip(&lab, "kube-system", "kube-dns"), dns_ip);
    assert_eq!(
        backends(&service(&lab, "kube-system", "kube-dns")),
        BTreeSet::from([("kube-system/coredns-0".into(), 53), ("kube-system/coredns-1".into(), 53)])
    );
    let policies = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: dns-only, namespace: app}
spec:
  podSelector: {matchLabels: {role: allowed}}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}
      podSelector: {matchLabels: {k8s-app: kube-dns}}
    ports: [{port: 53, protocol: UDP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: own-namespace-only, namespace: app}
spec:
  podSelector: {matchLabels: {role: denied}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {}}]
";
    lab.ok(&["apply", "-f", &lab.file("policy.yaml", policies)]);
    let addr = SocketAddr::from((dns_ip, 53));
    let answered = in_pod(&lab, "app/allowed", || {
        (0..20)
            .filter(|i| udp_echo(addr, &format!("query-{i}"), Duration::from_secs(2)))
            .count()
    });
    assert_eq!(answered, 20, "the allowed client resolves through the ClusterIP");
    // Only those backends: the same client reaches no other pod.
    let peer_ip: Ipv4Addr = {
        let pods: Value = serde_json::from_str(&lab.ok(&["pods", "-o", "json"])).expect("pods");
        pods.as_array()
            .expect("pods")
            .iter()
            .find(|p| p["name"] == "peer")
            .and_then(|p| p["ip"].as_str()?.parse().ok())
            .expect("peer ip")
    };
    let reached_peer = in_pod(&lab, "app/allowed", || {
        TcpStream::connect_timeout(&SocketAddr::from((peer_ip, 80)), Duration::from_secs(1)).is_ok()
    });
    assert!(!reached_peer, "dns-only allows nothing but the DNS backends");
    let denied = in_pod(&lab, "app/denied", || {
        (0..3)
            .filter(|i| udp_echo(addr, &format!("query-{i}"), Duration::from_secs(1)))
            .count()
    });
    assert_eq!(denied, 0, "the client without the allowance gets no answer");
    // The drop, as observed: egress policy on the denied client, against a backend.
    let deadline = Instant::now() + Duration::from_secs(5);
    let flow = loop {
        let flows = observe(&lab, &["--from-pod", "app/denied", "--verdict", "dropped", "--protocol", "UDP"]);
        if let Some(f) = flows.into_iter().find(|f| f["drop_reason"] == "policy_denied") {
            break f;
        }
        assert!(Instant::now() < deadline, "no policy_denied flow from app/denied");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(flow["direction"], "egress", "{flow}");
    assert!(
        flow_pod(&flow["destination"]).starts_with("kube-system/coredns-"),
        "decided against a backend, not the ClusterIP: {flow}"
    );
    assert_eq!(flow["destination"]["port"], 53, "{flow}");
    let svc = &flow["service"];
    assert_eq!(
        (&svc["namespace"], &svc["name"], &svc["vip"], &svc["port"]),
        (
            &Value::from("kube-system"),
            &Value::from("kube-dns"),
            &Value::from(dns_ip.to_string()),
            &Value::from(53)
        ),
        "the flow names the Service and the address dialled: {flow}"
    );
    // Without backends a query is refused at once: the ClusterIP's port unreachable makes a
    // connected UDP socket fail with ECONNREFUSED instead of waiting out its timeout.
    let gone: String = (0..2).map(dns_pod).collect();
    lab.ok(&["delete", "-f", &lab.file("dns-gone.yaml", &gone)]);
    let (result, took) = in_pod(&lab, "app/allowed", || {
        let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        socket.connect(addr).expect("connect");
        socket.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        let started = Instant::now();
        socket.send(b"query").expect("send");
        let mut buf = [0u8; 64];
        (socket.recv(&mut buf).map(drop).map_err(|e| e.kind()), started.elapsed())
    });
    assert_eq!(result, Err(ErrorKind::ConnectionRefused), "after {took:?}");
    assert!(took < Duration::from_millis(500), "refused at once: {took:?}");
}

/// Three backends on two nodes: new connections from one client spread over all of them; a
/// backend removed mid-test leaves established connections to the others working and gets no
/// new one; with no backend left, a connection is refused at once (an RST, not a timeout) and
/// the drop is counted as `no_service_backend`.
#[test]
fn a_service_balances_survives_a_removed_backend_and_refuses_without_backends() {
    let lab = Lab::new("svclb");
    let mut yaml = namespace_yaml("lb");
    let backend = |name: &str, node: &str| pod_yaml("lb", name, "app: web", Some(node), "{name: http, containerPort: 8080}");
    yaml += &backend("b0", "node0");
    yaml += &backend("b1", "node1");
    yaml += &backend("b2", "node1");
    yaml += &pod_yaml("lb", "client", "role: client", Some("node0"), "");
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: lb}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: http}]\n";
    lab.ok(&["up", "--nodes", "2", "-f", &lab.file("lb.yaml", &yaml)]);
    let addr = SocketAddr::from((vip(&lab, "lb", "web"), 80));

    let seen = spread(&lab, "lb/client", addr, 300);
    println!("300 connections: {seen:?}");
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), ["lb/b0", "lb/b1", "lb/b2"], "{seen:?}");
    assert!(seen.values().all(|n| *n >= 60), "each backend gets at least 60 of 300: {seen:?}");

    // Established connections across the removal of b2. Each connection is kept by a thread
    // in the client's namespace that pings before and after; the removal happens between.
    let (removed_tx, removed_rx) = std::sync::mpsc::channel::<()>();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<Vec<String>>();
    let lab_ref = &lab;
    std::thread::scope(|scope| {
        let holder = scope.spawn(move || {
            in_pod(lab_ref, "lb/client", move || {
                let mut conns: Vec<Conn> = (0..30)
                    .map(|i| Conn::open(addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
                    .collect();
                for (i, c) in conns.iter_mut().enumerate() {
                    c.echo(&format!("before-{i}"))
                        .unwrap_or_else(|e| panic!("echo before on {}: {e}", c.backend));
                }
                opened_tx.send(conns.iter().map(|c| c.backend.clone()).collect()).expect("report");
                removed_rx.recv().expect("wait for the removal");
                conns
                    .iter_mut()
                    .enumerate()
                    .map(|(i, c)| {
                        let started = Instant::now();
                        let result = c.echo(&format!("after-{i}")).map_err(|e| e.kind());
                        (c.backend.clone(), result, started.elapsed())
                    })
                    .collect::<Vec<_>>()
            })
        });
        let opened = opened_rx.recv().expect("connections opened");
        let kept: BTreeSet<&String> = opened.iter().filter(|b| *b != "lb/b2").collect();
        assert!(kept.len() == 2, "long-lived connections to both b0 and b1: {opened:?}");
        lab.ok(&["delete", "-f", &lab.file("del-b2.yaml", &backend("b2", "node1"))]);
        removed_tx.send(()).expect("signal");
        let after = holder.join().expect("holder thread");
        let (to_removed, kept): (Vec<_>, Vec<_>) = after.iter().partition(|(b, _, _)| b == "lb/b2");
        let broken: Vec<_> = kept.iter().filter(|(_, r, _)| r.is_err()).collect();
        assert!(
            broken.is_empty(),
            "established connections to the remaining backends broke: {broken:?}"
        );
        println!("{} established connections to b0/b1 kept working", kept.len());
        // The removed backend's connections end at their next packet (an RST from the
        // ClusterIP), not after a read timeout.
        assert!(!to_removed.is_empty(), "some connections went to b2: {opened:?}");
        for (_, result, took) in &to_removed {
            assert_eq!(
                *result,
                Err(ErrorKind::ConnectionReset),
                "a connection to the removed b2 after {took:?}"
            );
            assert!(*took < Duration::from_millis(500), "ended at once, not by a timeout: {took:?}");
        }
        println!("{} connections to the removed b2 were reset", to_removed.len());
    });
    let seen = spread(&lab, "lb/client", addr, 100);
    assert!(
        !seen.contains_key("lb/b2"),
        "a new connection reached the removed backend: {seen:?}"
    );
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), ["lb/b0", "lb/b1"], "{seen:?}");

    // No backend left: refused at once.
    let drops_before = metric_sum(&lab, "bulkhead_drops_total", &["reason=\"no_service_backend\""]);
    lab.ok(&[
        "delete",
        "-f",
        &lab.file("del-rest.yaml", &(backend("b0", "node0") + &backend("b1", "node1"))),
    ]);
    assert_eq!(backends(&service(&lab, "lb", "web")), BTreeSet::new());
    let (result, took) = in_pod(&lab, "lb/client", || {
        let started = Instant::now();
        let r = TcpStream::connect_timeout(&addr, Duration::from_secs(5));
        (r.map(drop).map_err(|e| e.kind()), started.elapsed())
    });
    assert_eq!(result, Err(ErrorKind::ConnectionRefused), "refused after {took:?}");
    assert!(took < Duration::from_millis(500), "refused at once, not after a timeout: {took:?}");
    let drops_after = metric_sum(&lab, "bulkhead_drops_total", &["reason=\"no_service_backend\""]);
    assert!(
        drops_after > drops_before,
        "no_service_backend drops counted: {drops_before} -> {drops_after}"
    );
    let flows = observe(&lab, &["--from-pod", "lb/client", "--drop-reason", "no_service_backend"]);
    assert!(!flows.is_empty(), "observe shows the no_service_backend drop");
}

/// `sessionAffinity: ClientIP`: 50 new connections from one client all reach one backend,
/// while the same backends behind a Service without affinity answer the same client from more
/// than one.
#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend() {
    let lab = Lab::new("svcaff");
    let mut yaml = namespace_yaml("aff");
    for name in ["b0", "b1", "b2"] {
        yaml += &pod_yaml("aff", name, "app: web", None, "{containerPort: 8080}");
    }
    yaml += &pod_yaml("aff", "client", "role: client", None, "");
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: sticky, namespace: aff}\nspec:\n  selector: {app: web}\n  sessionAffinity: ClientIP\n  ports: [{port: 80, targetPort: 8080}]\n";
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: loose, namespace: aff}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n";
    lab.ok(&["up", "-f", &lab.file("aff.yaml", &yaml)]);
    assert_eq!(service(&lab, "aff", "sticky")["sessionAffinity"], "ClientIP");
    let sticky = spread(&lab, "aff/client", SocketAddr::from((vip(&lab, "aff", "sticky"), 80)), 50);
    assert_eq!(
        sticky.len(),
        1,
        "50 connections with ClientIP affinity reach one backend: {sticky:?}"
    );
    assert_eq!(sticky.values().sum::<usize>(), 50);
    let loose = spread(&lab, "aff/client", SocketAddr::from((vip(&lab, "aff", "loose"), 80)), 50);
    assert!(loose.len() > 1, "without affinity the same client reaches several: {loose:?}");
}
