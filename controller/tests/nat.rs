//! The masquerade table on real packets: a pod, a node that routes for it and an outside
//! host, each a network namespace of this test's own, wired with veths.
//!
//! ```text
//! pod (10.251.0.2/24) ── node (10.251.0.1 | 198.18.0.1, ip_forward) ── world (198.18.0.2/24)
//! ```
//!
//! The world has no route to the pod subnet, so a connection from the pod only completes
//! when the node masquerades it, unless a case gives the world a route back.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bulkhead::nat::{Masquerade, MasqueradeConfig};
use bulkhead_hostnet::netns;

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 2);
const NODE_POD_SIDE: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 1);
const NODE_WORLD_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const WORLD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// Three namespaces, removed on drop (their veths go with them).
struct Topology {
    pod: PathBuf,
    node: PathBuf,
    world: PathBuf,
    names: Vec<String>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = netns::delete(&netns::named_path(name));
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn topology(case: &str) -> Topology {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let names: Vec<String> = ["pod", "node", "world"]
        .iter()
        .map(|role| format!("bhnat-{}-{n}-{case}-{role}", std::process::id()))
        .collect();
    // The guard exists before the first namespace, so a failure below still cleans up.
    let mut t = Topology {
        pod: PathBuf::new(),
        node: PathBuf::new(),
        world: PathBuf::new(),
        names: names.clone(),
    };
    let paths: Vec<PathBuf> = names
        .iter()
        .map(|name| netns::create_named(name).expect("create netns (needs root)"))
        .collect();
    (t.pod, t.node, t.world) = (paths[0].clone(), paths[1].clone(), paths[2].clone());
    let (pod, node, world) = (names[0].as_str(), names[1].as_str(), names[2].as_str());
    ip(&[
        "-n", node, "link", "add", "topod", "type", "veth", "peer", "name", "eth0", "netns", pod,
    ]);
    ip(&[
        "-n", node, "link", "add", "toworld", "type", "veth", "peer", "name", "eth0", "netns", world,
    ]);
    for (ns, dev, addr) in [
        (pod, "eth0", format!("{POD_IP}/24")),
        (node, "topod", format!("{NODE_POD_SIDE}/24")),
        (node, "toworld", format!("{NODE_WORLD_SIDE}/24")),
        (world, "eth0", format!("{WORLD_IP}/24")),
    ] {
        ip(&["-n", ns, "addr", "add", &addr, "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
    for ns in [pod, node, world] {
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    ip(&["-n", pod, "route", "add", "default", "via", &NODE_POD_SIDE.to_string()]);
    netns::run_in(&t.node, || std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
        .unwrap()
        .expect("ip_forward in the node namespace");
    t
}

impl Topology {
    /// Lets the world reach the pod subnet through the node.
    fn route_back(&self) {
        let world = self.names[2].as_str();
        ip(&["-n", world, "route", "add", "10.251.0.0/16", "via", &NODE_WORLD_SIDE.to_string()]);
    }

    /// Connects from the pod to a server in the world; returns the source address the
    /// server saw, after a round trip (the server sends it back over the connection).
    fn connect_pod_to_world(&self) -> Result<Ipv4Addr, String> {
        let listener = netns::run_in(&self.world, || TcpListener::bind((WORLD_IP, 0)))
            .unwrap()
            .expect("bind in world");
        let port = listener.local_addr().unwrap().port();
        let client = netns::run_in(&self.pod, || {
            TcpStream::connect_timeout(&SocketAddr::from((WORLD_IP, port)), Duration::from_secs(3))
        })
        .unwrap()
        .map_err(|e| format!("connect pod -> world: {e}"))?;
        // The handshake completed, so the connection waits in the backlog.
        let (mut served, peer) = listener.accept().expect("accept");
        let SocketAddr::V4(peer) = peer else { panic!("peer {peer}") };
        served.write_all(&peer.ip().octets()).unwrap();
        let mut seen = [0u8; 4];
        let mut client = client;
        client.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        client.read_exact(&mut seen).map_err(|e| format!("reply to the pod: {e}"))?;
        assert_eq!(Ipv4Addr::from(seen), *peer.ip());
        Ok(*peer.ip())
    }

    fn in_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        netns::run_in(&self.node, f).expect("enter node netns")
    }
}

fn config(non_masquerade: &[&str]) -> MasqueradeConfig {
    MasqueradeConfig {
        cluster_cidrs: vec!["10.251.0.0/16".parse().unwrap()],
        non_masquerade_cidrs: non_masquerade.iter().map(|c| c.parse().unwrap()).collect(),
        // Another node's InternalIP, on the world's subnet only to show the set is used.
        node_ips: vec![NODE_WORLD_SIDE, Ipv4Addr::new(198, 18, 0, 3)],
    }
}

fn nft_list(t: &Topology) -> String {
    t.in_node(|| Command::new("nft").args(["list", "ruleset"]).output())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .expect("nft list ruleset (is nftables installed?)")
}

#[test]
fn pod_traffic_leaving_the_cluster_leaves_with_the_node_address() {
    let t = topology("masq");
    // Without masquerade the world cannot answer: it has no route to the pod subnet.
    assert!(t.connect_pod_to_world().is_err(), "no route back, no masquerade: must fail");

    let masq = Masquerade::new();
    t.in_node(|| masq.reconcile(&config(&[]))).expect("reconcile");
    assert!(t.in_node(|| masq.is_installed()).unwrap());
    assert_eq!(t.connect_pod_to_world(), Ok(NODE_WORLD_SIDE), "the world sees the node's address");

    // Idempotent: applying the same again (and a changed list) keeps exactly one table.
    t.in_node(|| masq.reconcile(&config(&[]))).expect("reconcile again");
    t.in_node(|| masq.reconcile(&config(&["203.0.113.0/24"])))
        .expect("reconcile changed");
    let listing = nft_list(&t);
    assert_eq!(listing.matches("table inet bulkhead").count(), 1, "{listing}");
    assert!(listing.contains("203.0.113.0/24"), "{listing}");
    assert_eq!(t.connect_pod_to_world(), Ok(NODE_WORLD_SIDE));

    t.in_node(|| masq.remove()).expect("remove");
    assert!(!t.in_node(|| masq.is_installed()).unwrap());
    assert!(!nft_list(&t).contains("bulkhead"), "remove leaves no table");
    // Done when already gone.
    t.in_node(|| masq.remove()).expect("remove again");
    assert!(t.connect_pod_to_world().is_err(), "no masquerade after remove");
}

#[test]
fn non_masquerade_destinations_see_the_pod_address() {
    let t = topology("nomasq");
    t.route_back();
    let masq = Masquerade::new();
    t.in_node(|| masq.reconcile(&config(&["198.18.0.0/24"]))).expect("reconcile");
    assert_eq!(t.connect_pod_to_world(), Ok(POD_IP), "nonMasqueradeCIDRs keep the pod's address");
    // The same world outside the list is masqueraded again.
    t.in_node(|| masq.reconcile(&config(&["203.0.113.0/24"]))).expect("reconcile");
    assert_eq!(t.connect_pod_to_world(), Ok(NODE_WORLD_SIDE));
    t.in_node(|| masq.remove()).expect("remove");
}

#[test]
fn pod_to_node_is_never_masqueraded() {
    let t = topology("tonode");
    t.route_back();
    let masq = Masquerade::new();
    // The world's address plays another node's InternalIP here: no masquerade to it.
    let mut cfg = config(&[]);
    cfg.node_ips.push(WORLD_IP);
    t.in_node(|| masq.reconcile(&cfg)).expect("reconcile");
    assert_eq!(t.connect_pod_to_world(), Ok(POD_IP), "a node's InternalIP sees the pod's address");
    t.in_node(|| masq.remove()).expect("remove");
}

/// The guard removes every namespace a topology made.
#[test]
fn topology_cleans_up_its_namespaces() {
    let names;
    {
        let t = topology("cleanup");
        names = t.names.clone();
        assert!(names.iter().all(|n| netns::named_path(n).exists()));
    }
    assert!(names.iter().all(|n| !netns::named_path(n).exists()));
}

/// Runs `iptables -t nat ARGS` in the node namespace.
fn iptables_nat(t: &Topology, args: &[&str]) {
    let mut all = vec!["netns", "exec", t.names[1].as_str(), "iptables", "-t", "nat"];
    all.extend_from_slice(args);
    ip(&all);
}

/// kube-proxy's iptables rules for one NodePort (pkg/proxy/iptables/proxier.go): mark the
/// first packet 0x4000 in the nat table, DNAT it to the pod, and in KUBE-POSTROUTING clear
/// the mark and masquerade.
fn kube_proxy_nodeport(t: &Topology, node_port: u16, pod_port: u16) {
    let (node_port, to) = (node_port.to_string(), format!("{POD_IP}:{pod_port}"));
    iptables_nat(t, &["-N", "KUBE-MARK-MASQ"]);
    iptables_nat(t, &["-A", "KUBE-MARK-MASQ", "-j", "MARK", "--or-mark", "0x4000"]);
    iptables_nat(t, &["-N", "KUBE-POSTROUTING"]);
    iptables_nat(
        t,
        &[
            "-A",
            "KUBE-POSTROUTING",
            "-m",
            "mark",
            "!",
            "--mark",
            "0x4000/0x4000",
            "-j",
            "RETURN",
        ],
    );
    iptables_nat(t, &["-A", "KUBE-POSTROUTING", "-j", "MARK", "--xor-mark", "0x4000"]);
    iptables_nat(t, &["-A", "KUBE-POSTROUTING", "-j", "MASQUERADE"]);
    iptables_nat(t, &["-A", "POSTROUTING", "-j", "KUBE-POSTROUTING"]);
    iptables_nat(t, &["-A", "PREROUTING", "-p", "tcp", "--dport", &node_port, "-j", "KUBE-MARK-MASQ"]);
    iptables_nat(
        t,
        &[
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            &node_port,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ],
    );
}

/// Packets counted by the rule commented `label` in the node's `netdev probe` table.
fn probe_count(t: &Topology, label: &str) -> u64 {
    let out = t
        .in_node(|| Command::new("nft").args(["list", "table", "netdev", "probe"]).output())
        .expect("nft list");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&format!("comment \"{label}\"")))
        .unwrap_or_else(|| panic!("no rule {label} in {text}"));
    let packets = line.split("packets ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
    packets.parse().unwrap()
}

/// One NodePort connection from the world to the pod, a few segments each way.
fn nodeport_exchange(t: &Topology, node_port: u16, listener: &TcpListener) -> Ipv4Addr {
    let mut client = netns::run_in(&t.world, || {
        TcpStream::connect_timeout(&SocketAddr::from((NODE_WORLD_SIDE, node_port)), Duration::from_secs(3))
    })
    .unwrap()
    .expect("connect to the NodePort");
    let (mut served, peer) = listener.accept().expect("accept");
    for _ in 0..3 {
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        served.read_exact(&mut buf).unwrap();
        served.write_all(b"pong").unwrap();
        client.read_exact(&mut buf).unwrap();
    }
    let SocketAddr::V4(peer) = peer else { panic!("peer {peer}") };
    *peer.ip()
}

#[test]
fn traffic_kube_proxy_masquerades_to_a_pod_carries_the_snat_mark_on_every_packet() {
    let t = topology("nodeport");
    kube_proxy_nodeport(&t, 30080, 8080);
    // What TC egress on the pod's veth would see: nft's netdev egress hook runs just before
    // it on the same device, with the same mark.
    let probe = "table netdev probe {
        chain eg {
            type filter hook egress device topod priority 0;
            meta l4proto tcp meta mark & 0x4000 == 0x4000 counter comment \"kube\"
            meta l4proto tcp meta mark & 0x1000 == 0x1000 counter comment \"snat\"
            meta l4proto tcp counter comment \"all\"
        }
    }";
    t.in_node(|| {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        child.stdin.take().unwrap().write_all(probe.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "probe table");
    });
    let listener = netns::run_in(&t.pod, || TcpListener::bind((POD_IP, 8080)))
        .unwrap()
        .expect("bind in pod");

    // kube-proxy alone: the pod sees the node's address, and no packet keeps its mark.
    assert_eq!(nodeport_exchange(&t, 30080, &listener), NODE_POD_SIDE);
    let all = probe_count(&t, "all");
    assert!(all >= 5, "handshake and data reached the pod: {all}");
    assert_eq!(probe_count(&t, "kube"), 0, "kube-proxy clears 0x4000 before the packet leaves");
    assert_eq!(probe_count(&t, "snat"), 0);

    // With the agent's table, every packet of the next connection carries the SNAT mark.
    let masq = Masquerade::new();
    t.in_node(|| masq.reconcile(&config(&[]))).expect("reconcile");
    assert_eq!(nodeport_exchange(&t, 30080, &listener), NODE_POD_SIDE);
    let (all_after, snat) = (probe_count(&t, "all"), probe_count(&t, "snat"));
    assert!(all_after - all >= 5, "second connection reached the pod");
    assert_eq!(snat, all_after - all, "every packet of the masqueraded connection is marked");
    assert_eq!(probe_count(&t, "kube"), 0);
    t.in_node(|| masq.remove()).expect("remove");
}
