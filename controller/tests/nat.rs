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
