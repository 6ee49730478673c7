//! Privileged: the real `Router` between network namespaces that play three nodes on one L2
//! underlay (a bridge in a fourth namespace), in both routing modes. Each node has a "pod"
//! address on `lo` in its pod CIDR; a TCP transfer between two of them proves the
//! routes (and, in VXLAN mode, the FDB entries and neighbours) work.
#![expect(clippy::unwrap_used, reason = "tests and their helpers assert by panicking (STYLE 14)")]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bulkhead::routing::{Change, LocalNode, Peer, Router, RoutingMode, VxlanConfig, DEFAULT_VXLAN_DEVICE, ROUTE_PROTOCOL};
use bulkhead_hostnet::netns;

const NODES: u8 = 3;
/// Each transfer listens on a port of its own, so a failed one cannot block the next.
static NEXT_PORT: AtomicU16 = AtomicU16::new(7700);
/// Many full-sized segments. It does not prove the VXLAN MTU (the kernel fragments outer
/// packets that exceed the underlay's, as VXLAN leaves DF clear); the test reads the MTU.
const PAYLOAD: usize = 200_000;

/// Runs `ip`/`bridge` with `args`, asserts success, returns stdout.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn ip_in(ns: &str, args: &str) -> String {
    let mut all = vec!["-n", ns];
    all.extend(args.split_whitespace());
    run("ip", &all)
}

/// Node namespaces and the underlay, deleted on drop (also when a test panics).
struct Cluster {
    underlay: String,
    nodes: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain([&self.underlay]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Cluster {
    fn new(tag: &str) -> Self {
        assert!(nix::unistd::geteuid().is_root(), "the routing tests need root (network namespaces)");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let suffix = format!("{tag}-{}-{nanos:x}", std::process::id());
        let mut cluster = Self {
            underlay: format!("bhrt-{suffix}-ul"),
            nodes: vec![],
        };
        run("ip", &["netns", "add", &cluster.underlay]);
        let ul = cluster.underlay.clone();
        ip_in(&ul, "link set lo up");
        ip_in(&ul, "link add br0 type bridge");
        ip_in(&ul, "link set br0 up");
        for i in 0..NODES {
            let ns = format!("bhrt-{suffix}-n{i}");
            run("ip", &["netns", "add", &ns]);
            cluster.nodes.push(ns.clone());
            ip_in(&ul, &format!("link add ul-n{i} type veth peer name ul0 netns {ns}"));
            ip_in(&ul, &format!("link set ul-n{i} master br0 up"));
            ip_in(&ns, "link set lo up");
            ip_in(&ns, &format!("addr add {}/24 dev ul0", internal_ip(i)));
            ip_in(&ns, "link set ul0 up");
            // On `lo`: the kernel here has no dummy links, and local delivery is all a
            // "pod" address needs.
            ip_in(&ns, &format!("addr add {}/32 dev lo", pod_ip(i)));
        }
        cluster
    }

    fn path(&self, i: u8) -> PathBuf {
        netns::named_path(&self.nodes[usize::from(i)])
    }

    fn ns(&self, i: u8) -> &str {
        &self.nodes[usize::from(i)]
    }
}

fn internal_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, 10 + i)
}

fn pod_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, i, 10)
}

fn peer(i: u8) -> Peer {
    Peer {
        name: format!("n{i}"),
        pod_cidr: format!("10.77.{i}.0/24").parse().unwrap(),
        internal_ip: internal_ip(i),
    }
}

fn router(i: u8, mode: RoutingMode) -> Router {
    let me = peer(i);
    Router::new(
        LocalNode {
            name: me.name,
            internal_ip: me.internal_ip,
            pod_cidr: me.pod_cidr,
        },
        mode,
    )
}

/// Every node but `i`.
fn peers_of(i: u8) -> Vec<Peer> {
    (0..NODES).filter(|&j| j != i).map(peer).collect()
}

/// Accepts one connection on node `i`'s pod address within 10 s, reads to the end and
/// answers the count.
fn serve(cluster: &Cluster, i: u8, port: u16) -> JoinHandle<usize> {
    let listener = netns::run_in(&cluster.path(i), || TcpListener::bind((pod_ip(i), port)))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(_) => return 0,
            }
        };
        stream.set_nonblocking(false).unwrap();
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).unwrap();
        stream.write_all(&(buf.len() as u64).to_be_bytes()).unwrap();
        buf.len()
    })
}

/// Connects from node `from`'s pod address to node `to`'s, sends `PAYLOAD` bytes and
/// returns how many the other side counted.
fn transfer(cluster: &Cluster, from: u8, to: u8) -> Result<u64, String> {
    use nix::sys::socket::{bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    use nix::sys::time::TimeVal;
    let port = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    let server = serve(cluster, to, port);
    let result = netns::run_in(&cluster.path(from), || -> Result<u64, String> {
        let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(|e| e.to_string())?;
        let timeout = TimeVal::new(5, 0);
        setsockopt(&fd, sockopt::SendTimeout, &timeout).map_err(|e| e.to_string())?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).map_err(|e| e.to_string())?;
        bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(pod_ip(from), 0))).map_err(|e| format!("bind: {e}"))?;
        connect(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(pod_ip(to), port))).map_err(|e| format!("connect: {e}"))?;
        let mut stream = TcpStream::from(fd);
        stream.write_all(&vec![7u8; PAYLOAD]).map_err(|e| format!("write: {e}"))?;
        stream.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        let mut count = [0u8; 8];
        stream.read_exact(&mut count).map_err(|e| format!("read: {e}"))?;
        Ok(u64::from_be_bytes(count))
    })
    .unwrap();
    if result.is_ok() {
        assert_eq!(server.join().unwrap(), PAYLOAD);
    }
    result
}

/// The state reconcile owns or could disturb, as `ip` prints it.
fn dump(ns: &str) -> String {
    [
        ip_in(ns, "route show table main"),
        ip_in(ns, "-d link show"),
        ip_in(ns, "addr show"),
        ip_in(ns, "neigh show nud permanent"),
        run("bridge", &["-n", ns, "fdb", "show"]),
    ]
    .join("\n")
}

fn our_routes(ns: &str) -> String {
    ip_in(ns, &format!("route show proto {ROUTE_PROTOCOL}"))
}

/// A route of someone else's: must survive every reconcile and `remove_all`.
const FOREIGN: &str = "172.31.0.0/16 via 192.168.77.1 proto boot";

fn reconcile_all(cluster: &Cluster, mode: &RoutingMode) {
    for i in 0..NODES {
        router(i, mode.clone()).reconcile_in(Some(&cluster.path(i)), &peers_of(i)).unwrap();
    }
}

#[test]
fn native_routes_carry_pod_traffic_and_reconcile_is_idempotent() {
    let cluster = Cluster::new("nat");
    ip_in(cluster.ns(0), &format!("route add {FOREIGN}"));
    assert!(transfer(&cluster, 0, 1).is_err(), "pods reachable before any route");

    // A peer off the underlay's subnet has no native route: an error, but the others get
    // theirs.
    let stray = Peer {
        name: "far".into(),
        pod_cidr: "10.77.9.0/24".parse().unwrap(),
        internal_ip: Ipv4Addr::new(10, 99, 0, 5),
    };
    let mut with_stray = peers_of(0);
    with_stray.push(stray);
    let err = router(0, RoutingMode::Native)
        .reconcile_in(Some(&cluster.path(0)), &with_stray)
        .unwrap_err();
    assert!(
        bulkhead::error_chain(&err).contains("replace route"),
        "{}",
        bulkhead::error_chain(&err)
    );

    reconcile_all(&cluster, &RoutingMode::Native);
    let routes = our_routes(cluster.ns(0));
    assert!(!routes.contains("10.77.9.0"), "{routes}");
    assert!(routes.contains("10.77.1.0/24 via 192.168.77.11 dev ul0"), "{routes}");
    assert!(routes.contains("10.77.2.0/24 via 192.168.77.12 dev ul0"), "{routes}");
    assert_eq!(transfer(&cluster, 0, 1).unwrap(), PAYLOAD as u64);
    assert_eq!(transfer(&cluster, 2, 0).unwrap(), PAYLOAD as u64);

    let r0 = router(0, RoutingMode::Native);
    let before = dump(cluster.ns(0));
    assert_eq!(r0.reconcile_in(Some(&cluster.path(0)), &peers_of(0)).unwrap(), vec![]);
    assert_eq!(dump(cluster.ns(0)), before);

    // Node 2 leaves.
    let changes = r0.reconcile_in(Some(&cluster.path(0)), &[peer(1)]).unwrap();
    assert_eq!(changes, vec![Change::DeleteRoute("10.77.2.0/24".parse().unwrap())]);
    let routes = our_routes(cluster.ns(0));
    assert!(!routes.contains("10.77.2.0"), "{routes}");
    assert!(ip_in(cluster.ns(0), "route show").contains("172.31.0.0/16 via 192.168.77.1 dev ul0"));

    r0.remove_all_in(Some(&cluster.path(0))).unwrap();
    assert_eq!(our_routes(cluster.ns(0)), "");
    assert!(ip_in(cluster.ns(0), "route show").contains("172.31.0.0/16 via 192.168.77.1"));
}

#[test]
fn vxlan_overlay_carries_pod_traffic_and_follows_peers_and_mode() {
    let cluster = Cluster::new("vx");
    ip_in(cluster.ns(0), &format!("route add {FOREIGN}"));
    let mode = RoutingMode::Vxlan(VxlanConfig::default());
    reconcile_all(&cluster, &mode);

    let n0 = cluster.ns(0);
    let link = ip_in(n0, &format!("-d link show {DEFAULT_VXLAN_DEVICE}"));
    for want in [
        "mtu 1450",
        "02:b5:c0:a8:4d:0a",
        "vxlan id 1 ",
        "local 192.168.77.10",
        "dstport 4789",
        "nolearning",
    ] {
        assert!(link.contains(want), "{want} not in {link}");
    }
    assert!(ip_in(n0, &format!("addr show dev {DEFAULT_VXLAN_DEVICE}")).contains("inet 10.77.0.0/32"));
    let fdb = run("bridge", &["-n", n0, "fdb", "show", "dev", DEFAULT_VXLAN_DEVICE]);
    assert!(fdb.contains("02:b5:c0:a8:4d:0b dst 192.168.77.11 self permanent"), "{fdb}");
    assert!(fdb.contains("02:b5:c0:a8:4d:0c dst 192.168.77.12 self permanent"), "{fdb}");
    let neigh = ip_in(n0, &format!("neigh show dev {DEFAULT_VXLAN_DEVICE}"));
    assert!(neigh.contains("10.77.1.0 lladdr 02:b5:c0:a8:4d:0b PERMANENT"), "{neigh}");
    let routes = our_routes(n0);
    assert!(
        routes.contains(&format!("10.77.1.0/24 via 10.77.1.0 dev {DEFAULT_VXLAN_DEVICE} onlink")),
        "{routes}"
    );
    assert!(!routes.contains("dev ul0"), "{routes}");

    assert_eq!(transfer(&cluster, 0, 1).unwrap(), PAYLOAD as u64);
    assert_eq!(transfer(&cluster, 1, 2).unwrap(), PAYLOAD as u64);
    assert_eq!(transfer(&cluster, 2, 0).unwrap(), PAYLOAD as u64);

    let r0 = router(0, mode.clone());
    let before = dump(n0);
    assert_eq!(r0.reconcile_in(Some(&cluster.path(0)), &peers_of(0)).unwrap(), vec![]);
    assert_eq!(dump(n0), before);

    // Node 2 leaves: its FDB entry, neighbour and route go; node 1 still works.
    r0.reconcile_in(Some(&cluster.path(0)), &[peer(1)]).unwrap();
    let fdb = run("bridge", &["-n", n0, "fdb", "show", "dev", DEFAULT_VXLAN_DEVICE]);
    assert!(!fdb.contains("02:b5:c0:a8:4d:0c"), "{fdb}");
    assert!(!ip_in(n0, &format!("neigh show dev {DEFAULT_VXLAN_DEVICE}")).contains("10.77.2.0"));
    assert!(!our_routes(n0).contains("10.77.2.0"));
    assert_eq!(transfer(&cluster, 0, 1).unwrap(), PAYLOAD as u64);

    // Every node to native: the devices go, the routes move to the underlay.
    reconcile_all(&cluster, &RoutingMode::Native);
    assert!(!ip_in(n0, "link show").contains(DEFAULT_VXLAN_DEVICE));
    assert!(our_routes(n0).contains("10.77.1.0/24 via 192.168.77.11 dev ul0"));
    assert_eq!(transfer(&cluster, 1, 0).unwrap(), PAYLOAD as u64);

    // And back, then everything removed; the foreign route stays throughout.
    reconcile_all(&cluster, &mode);
    assert_eq!(transfer(&cluster, 0, 2).unwrap(), PAYLOAD as u64);
    r0.remove_all_in(Some(&cluster.path(0))).unwrap();
    assert_eq!(our_routes(n0), "");
    assert!(!ip_in(n0, "link show").contains(DEFAULT_VXLAN_DEVICE));
    assert!(ip_in(n0, "route show").contains("172.31.0.0/16 via 192.168.77.1"));
}
