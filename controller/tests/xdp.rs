//! The compiled XDP programs on crafted packets (`BPF_PROG_TEST_RUN`): verdict and counters.
//!
//! `xdp_from_pod` must drop exactly what `from_pod` (TC) would drop for certain, with the same
//! reason, counter and flow record, and pass everything else to TC: each case below runs the
//! packet through XDP and, when XDP passes it, through TC too. Test runs put the packet on `lo`
//! (ifindex 1), so the endpoint under test is keyed 1.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use aya::maps::{MapData, RingBuf};
use aya::programs::{TestRun, TestRunOptions};
use bulkhead::datapath::prefilter::keep_list;
use bulkhead::datapath::sync::MapWriter;
use bulkhead::datapath::Datapath;
use bulkhead_common::{
    direction, endpoint_flags, program_names, proto, verdict, CtEntry, CtKey, DropReason, EndpointInfo, FlowEvent, IpcacheValue, PolicyKey,
    PolicyValue, ServiceKey, ServiceValue, POLICY_PREFIX_FULL,
};
use ipnetwork::Ipv4Network;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const LO: u32 = 1;
const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const PEER_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2); // identity 301: egress TCP/80 allowed
const PEER_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3); // identity 302: nothing allowed
const NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254); // HOST
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const ISOLATED: u32 = endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS;

struct Fixture {
    dp: Datapath,
    flows: RingBuf<MapData>,
    pin_dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn fixture(name: &str, flags: Option<u32>) -> Fixture {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bulkhead-xdp-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let mut dp = Datapath::load(&pin_dir).unwrap_or_else(|e| {
        let _ = std::fs::remove_dir_all(&pin_dir);
        panic!("load datapath (needs root and BPF): {e:?}")
    });
    let flows = dp.take_flow_ring().expect("flow ring");
    let f = Fixture { dp, flows, pin_dir };
    let mut f = f;
    let m = &mut f.dp.maps;
    m.set_ipcache(PEER_A, 32, &IpcacheValue { identity: 301, flags: 0 }).unwrap();
    m.set_ipcache(PEER_B, 32, &IpcacheValue { identity: 302, flags: 0 }).unwrap();
    m.set_ipcache(NODE, 32, &IpcacheValue { identity: 1, flags: 0 }).unwrap();
    m.set_policy(
        &PolicyKey::new(10, 301, direction::EGRESS, proto::TCP, 80),
        POLICY_PREFIX_FULL,
        &PolicyValue { rule_id: 7, flags: 0 },
    )
    .unwrap();
    // Ingress from 301: anything (so a reply to it is tracked).
    m.set_policy(
        &PolicyKey::new(10, 301, direction::INGRESS, 0, 0),
        bulkhead_common::POLICY_PREFIX_ANY_PROTO,
        &PolicyValue { rule_id: 8, flags: 0 },
    )
    .unwrap();
    if let Some(flags) = flags {
        m.set_endpoint(
            LO,
            &EndpointInfo {
                endpoint_id: 10,
                identity: 300,
                ipv4: POD.octets(),
                flags,
                mac: POD_MAC,
                _pad: [0; 2],
            },
        )
        .unwrap();
    }
    f
}

fn eth(src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&HOST_MAC);
    p.extend_from_slice(&src);
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p.resize(p.len().max(60), 0);
    p
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, frag_off: u16, l4: &[u8]) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1]);
    h.extend_from_slice(&frag_off.to_be_bytes());
    h.extend_from_slice(&[64, protocol, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(l4);
    h
}

fn l4(protocol: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.resize(20, 0);
    if protocol == proto::TCP {
        l4[12] = 0x50;
        l4[13] = 0x02; // SYN
    }
    l4
}

fn packet(mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, dport: u16) -> Vec<u8> {
    eth(mac, 0x0800, &ipv4(src, dst, protocol, 0, &l4(protocol, 40000, dport)))
}

impl Fixture {
    fn drain(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.flows.next() {
            assert_eq!(item.len(), std::mem::size_of::<FlowEvent>(), "record size");
            // SAFETY: FlowEvent is plain old data and the length was checked above.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
        }
        out
    }

    fn xdp(&mut self, program: &'static str, packet: &[u8]) -> u32 {
        let prog = self.dp.xdp_program(program).unwrap();
        prog.test_run(TestRunOptions {
            data_in: Some(packet),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN xdp")
        .return_value
    }

    fn tc(&mut self, packet: &[u8]) -> u32 {
        let prog = self.dp.program(program_names::FROM_POD).unwrap();
        prog.test_run(TestRunOptions {
            data_in: Some(packet),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN tc")
        .return_value
    }

    fn egress_drops(&self, reason: DropReason) -> u64 {
        self.dp.counter(reason, direction::EGRESS).unwrap().packets
    }

    /// XDP drops `packet` for `reason`: counted where TC counts it and in the XDP counters,
    /// with one flow record naming the reason. TC, given the same packet, drops it for the
    /// same reason (so XDP took nothing TC would have let through).
    fn assert_xdp_drops(&mut self, packet: &[u8], reason: DropReason) {
        self.drain();
        let (tc_before, xdp_before) = (self.egress_drops(reason), self.dp.xdp_counter(reason).unwrap().packets);
        assert_eq!(self.xdp(program_names::XDP_FROM_POD, packet), XDP_DROP, "{reason:?}: xdp verdict");
        assert_eq!(self.egress_drops(reason), tc_before + 1, "{reason:?}: the TC counter");
        assert_eq!(
            self.dp.xdp_counter(reason).unwrap().packets,
            xdp_before + 1,
            "{reason:?}: the XDP counter"
        );
        let records = self.drain();
        assert_eq!(records.len(), 1, "{reason:?}: one record");
        assert_eq!(
            (records[0].verdict, records[0].reason, records[0].direction, records[0].endpoint_id),
            (verdict::DROPPED, reason as u8, direction::EGRESS, 10)
        );
        assert_eq!(self.tc(packet), TC_ACT_SHOT, "{reason:?}: TC drops it too");
        assert_eq!(self.egress_drops(reason), tc_before + 2, "{reason:?}: and for the same reason");
    }

    /// XDP passes `packet` untouched by any counter; TC then gives `tc`.
    fn assert_xdp_passes(&mut self, packet: &[u8], tc: u32, what: &str) {
        let before = self.dp.counters().unwrap();
        let xdp_before: Vec<u64> = DropReason::ALL.iter().map(|r| self.dp.xdp_counter(*r).unwrap().packets).collect();
        assert_eq!(self.xdp(program_names::XDP_FROM_POD, packet), XDP_PASS, "{what}: xdp verdict");
        assert_eq!(self.dp.counters().unwrap(), before, "{what}: XDP counted nothing");
        let xdp_after: Vec<u64> = DropReason::ALL.iter().map(|r| self.dp.xdp_counter(*r).unwrap().packets).collect();
        assert_eq!(xdp_after, xdp_before, "{what}: no XDP drop counted");
        assert_eq!(self.tc(packet), tc, "{what}: TC verdict");
    }
}

#[test]
fn a_new_flow_policy_denies_is_dropped_at_xdp_as_tc_would() {
    let mut f = fixture("deny", Some(ISOLATED));
    for (dst, protocol, port) in [(PEER_B, proto::TCP, 80), (PEER_A, proto::TCP, 81), (PEER_A, proto::UDP, 80)] {
        f.assert_xdp_drops(&packet(POD_MAC, POD, dst, protocol, port), DropReason::PolicyDenied);
    }
    // An unknown destination is world: denied too.
    f.assert_xdp_drops(
        &packet(POD_MAC, POD, Ipv4Addr::new(192, 0, 2, 1), proto::UDP, 53),
        DropReason::PolicyDenied,
    );
    // An ICMP echo request to a denied peer.
    let echo = eth(POD_MAC, 0x0800, &ipv4(POD, PEER_B, proto::ICMP, 0, &[8, 0, 0, 0, 0, 7, 0, 1]));
    f.assert_xdp_drops(&echo, DropReason::PolicyDenied);
}

#[test]
fn spoofed_sources_are_dropped_at_xdp_with_their_reason() {
    let mut f = fixture("spoof", Some(ISOLATED));
    f.assert_xdp_drops(
        &packet([0x02, 0, 0, 0, 0, 0x66], POD, PEER_A, proto::TCP, 80),
        DropReason::SpoofedMac,
    );
    f.assert_xdp_drops(
        &packet(POD_MAC, Ipv4Addr::new(10, 0, 0, 66), PEER_A, proto::TCP, 80),
        DropReason::SpoofedIp,
    );
    // Spoofing is dropped even where policy would let the flow through.
    let mut open = fixture("spoof-open", Some(0));
    open.assert_xdp_drops(
        &packet(POD_MAC, Ipv4Addr::new(10, 0, 0, 66), PEER_B, proto::UDP, 9),
        DropReason::SpoofedIp,
    );
}

#[test]
fn what_xdp_cannot_be_sure_of_passes_to_tc() {
    let mut f = fixture("pass", Some(ISOLATED));
    f.assert_xdp_passes(&packet(POD_MAC, POD, PEER_A, proto::TCP, 80), TC_ACT_OK, "allowed");
    f.assert_xdp_passes(&packet(POD_MAC, POD, NODE, proto::TCP, 10250), TC_ACT_OK, "the pod's own node");
    let arp = eth(POD_MAC, 0x0806, &[0; 28]);
    f.assert_xdp_passes(&arp, TC_ACT_OK, "arp");
    let ipv6 = eth(POD_MAC, 0x86dd, &[0x60; 40]);
    f.assert_xdp_passes(&ipv6, TC_ACT_SHOT, "ipv6");
    // A TCP header cut short: TC's parser refuses it (malformed).
    let short = eth(POD_MAC, 0x0800, &ipv4(POD, PEER_B, proto::TCP, 0, &[0; 8]))[..14 + 28].to_vec();
    f.assert_xdp_passes(&short, TC_ACT_SHOT, "truncated");
    let later = eth(POD_MAC, 0x0800, &ipv4(POD, PEER_B, proto::UDP, 100, &[0; 16]));
    f.assert_xdp_passes(&later, TC_ACT_SHOT, "later fragment");
    let first = eth(POD_MAC, 0x0800, &ipv4(POD, PEER_B, proto::UDP, 0x2000, &l4(proto::UDP, 1, 2)));
    f.assert_xdp_passes(&first, TC_ACT_SHOT, "first fragment");
    let mut quote = ipv4(PEER_B, POD, proto::UDP, 0, &l4(proto::UDP, 53, 40000));
    quote.truncate(28);
    let mut error = vec![3, 3, 0, 0, 0, 0, 0, 0];
    error.extend_from_slice(&quote);
    let icmp_error = eth(POD_MAC, 0x0800, &ipv4(POD, PEER_B, proto::ICMP, 0, &error));
    f.assert_xdp_passes(&icmp_error, TC_ACT_SHOT, "icmp error");

    // A Service VIP:port: TC translates it before policy.
    f.dp.maps
        .set_service(
            &ServiceKey::new(VIP.octets(), 80, proto::TCP, 0),
            &ServiceValue {
                service_id: 3,
                ..ServiceValue::default()
            },
        )
        .unwrap();
    // No backend: TC answers the pod with a RST (redirected back to it).
    f.assert_xdp_passes(
        &packet(POD_MAC, POD, VIP, proto::TCP, 80),
        TC_ACT_REDIRECT,
        "a Service port with no backend",
    );
    f.assert_xdp_drops(&packet(POD_MAC, POD, VIP, proto::TCP, 81), DropReason::PolicyDenied);

    // A reply on a flow the pod accepted: conntrack holds it reversed.
    let pkt = packet(POD_MAC, POD, PEER_A, proto::UDP, 5000);
    f.assert_xdp_drops(&pkt, DropReason::PolicyDenied);
    let mut table = conntrack_table(&f, 10);
    let key = CtKey {
        saddr: PEER_A.octets(),
        daddr: POD.octets(),
        sport: 5000u16.to_be_bytes(),
        dport: 40000u16.to_be_bytes(),
        protocol: proto::UDP,
        direction: direction::INGRESS,
        _pad: [0; 2],
    };
    table
        .insert(
            key,
            CtEntry {
                last_seen_ns: monotonic_ns(),
                rule_id: 8,
                flags: 0,
                ..CtEntry::default()
            },
            0,
        )
        .unwrap();
    f.assert_xdp_passes(&pkt, TC_ACT_OK, "a reply conntrack holds");
}

#[test]
fn endpoints_xdp_does_not_decide_for_pass_to_tc() {
    // Unknown: TC drops it (fail closed) with its reason.
    let mut unknown = fixture("unknown", None);
    unknown.assert_xdp_passes(&packet(POD_MAC, POD, PEER_B, proto::TCP, 80), TC_ACT_SHOT, "unknown endpoint");
    // Not isolated for egress.
    let mut open = fixture("open", Some(endpoint_flags::ISOLATED_INGRESS));
    open.assert_xdp_passes(&packet(POD_MAC, POD, PEER_B, proto::TCP, 80), TC_ACT_OK, "not isolated");
    // Audit mode: TC forwards and reports what it would drop.
    let mut audit = fixture("audit", Some(endpoint_flags::AUDIT_EGRESS));
    audit.assert_xdp_passes(&packet(POD_MAC, POD, PEER_B, proto::TCP, 80), TC_ACT_OK, "audit");
    let mut both = fixture("audit-iso", Some(ISOLATED | endpoint_flags::AUDIT_EGRESS));
    both.assert_xdp_passes(
        &packet(POD_MAC, POD, PEER_A, proto::TCP, 80),
        TC_ACT_OK,
        "audit and isolated, allowed",
    );
}

fn conntrack_table(f: &Fixture, endpoint_id: u32) -> aya::maps::HashMap<MapData, CtKey, CtEntry> {
    let data = MapData::from_pin(f.pin_dir.join(bulkhead_common::map_names::CONNTRACK)).unwrap();
    let tables = bulkhead::datapath::conntrack::Tables::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap();
    bulkhead::datapath::conntrack::table(&tables, endpoint_id).expect("the endpoint's conntrack table")
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn nets(list: &[&str]) -> BTreeSet<Ipv4Network> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
fn the_prefilter_drops_denied_sources_and_never_the_keep_list() {
    let mut f = fixture("prefilter", Some(ISOLATED));
    let mut lists = f.dp.start_prefilter(&[]).unwrap();
    let from = |src: Ipv4Addr| {
        eth(
            HOST_MAC,
            0x0800,
            &ipv4(src, Ipv4Addr::new(192, 168, 7, 9), proto::UDP, 0, &l4(proto::UDP, 1, 2)),
        )
    };
    let run = |f: &mut Fixture, src: Ipv4Addr| {
        let before = f.dp.prefilter_drops().unwrap().packets;
        let verdict = f.xdp(program_names::PREFILTER, &from(src));
        (verdict, f.dp.prefilter_drops().unwrap().packets - before)
    };
    // Nothing denied yet.
    assert_eq!(run(&mut f, Ipv4Addr::new(203, 0, 113, 9)), (XDP_PASS, 0));
    lists.set_deny(&nets(&["203.0.113.0/24", "0.0.0.0/1"])).unwrap();
    // The node's own subnet and the pod range are never dropped, even inside a deny entry.
    lists
        .set_keep(&keep_list(&[(Ipv4Addr::new(10, 1, 0, 5), 24)], &["10.244.0.0/16".parse().unwrap()]))
        .unwrap();
    assert_eq!(run(&mut f, Ipv4Addr::new(203, 0, 113, 9)), (XDP_DROP, 1));
    assert_eq!(run(&mut f, Ipv4Addr::new(9, 9, 9, 9)), (XDP_DROP, 1), "0.0.0.0/1");
    assert_eq!(run(&mut f, Ipv4Addr::new(10, 1, 0, 7)), (XDP_PASS, 0), "the node's underlay subnet");
    assert_eq!(run(&mut f, Ipv4Addr::new(10, 244, 3, 4)), (XDP_PASS, 0), "the cluster's pods");
    assert_eq!(run(&mut f, Ipv4Addr::new(198, 51, 100, 1)), (XDP_PASS, 0), "not denied");
    // Only IPv4 sources are looked at.
    let arp = f.xdp(program_names::PREFILTER, &eth(HOST_MAC, 0x0806, &[0; 28]));
    assert_eq!(arp, XDP_PASS);
    // A reload replaces the list: what left it passes, what stayed still drops.
    lists.set_deny(&nets(&["0.0.0.0/1"])).unwrap();
    assert_eq!(lists.deny().unwrap(), nets(&["0.0.0.0/1"]));
    assert_eq!(run(&mut f, Ipv4Addr::new(203, 0, 113, 9)), (XDP_PASS, 0));
    assert_eq!(run(&mut f, Ipv4Addr::new(9, 9, 9, 9)), (XDP_DROP, 1));
}

/// A pod (network namespace) on a real veth whose host side carries the programs; removes
/// both on drop, also when the test fails.
struct VethPod {
    netns: String,
    host: String,
}

impl Drop for VethPod {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.host]).status();
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.netns]).status();
    }
}

fn sh(args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output().expect(args[0]);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn link_json(netns: Option<&str>, dev: &str) -> serde_json::Value {
    let mut args = vec!["ip"];
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-j", "-d", "link", "show", dev]);
    let out = sh(&args);
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()[0].clone()
}

#[test]
fn a_denied_flood_from_a_pod_on_a_real_veth_is_dropped_at_xdp_and_allowed_traffic_flows() {
    let id = std::process::id() % 200 + 20;
    let mut f = fixture("veth", None);
    let pod = VethPod {
        netns: format!("bhxdp{}", std::process::id()),
        host: format!("bhxdp{}h", std::process::id()),
    };
    let (pod_ip, gw, denied) = (
        Ipv4Addr::new(10, 199, id as u8, 1),
        Ipv4Addr::new(10, 199, id as u8, 254),
        Ipv4Addr::new(10, 199, id as u8, 77),
    );
    sh(&["ip", "netns", "add", &pod.netns]);
    sh(&[
        "ip", "link", "add", &pod.host, "type", "veth", "peer", "name", "eth0", "netns", &pod.netns,
    ]);
    sh(&["ip", "addr", "add", &format!("{gw}/32"), "dev", &pod.host]);
    sh(&["ip", "link", "set", &pod.host, "up"]);
    sh(&["ip", "route", "add", &format!("{pod_ip}/32"), "dev", &pod.host]);
    sh(&["ip", "-n", &pod.netns, "addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"]);
    sh(&["ip", "-n", &pod.netns, "link", "set", "eth0", "up"]);
    sh(&["ip", "-n", &pod.netns, "route", "add", &format!("{gw}/32"), "dev", "eth0"]);
    sh(&[
        "ip",
        "-n",
        &pod.netns,
        "route",
        "add",
        "default",
        "via",
        &gw.to_string(),
        "dev",
        "eth0",
    ]);
    sh(&["sysctl", "-qw", &format!("net.ipv4.conf.{}.proxy_arp=1", pod.host)]);
    let mac: Vec<u8> = link_json(Some(&pod.netns), "eth0")["address"]
        .as_str()
        .unwrap()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let ifindex = link_json(None, &pod.host)["ifindex"].as_u64().unwrap() as u32;
    // The node's address is HOST (always allowed); everything else is denied egress.
    f.dp.maps.set_ipcache(gw, 32, &IpcacheValue { identity: 1, flags: 0 }).unwrap();
    f.dp.maps
        .set_endpoint(
            ifindex,
            &EndpointInfo {
                endpoint_id: 10,
                identity: 300,
                ipv4: pod_ip.octets(),
                flags: ISOLATED,
                mac: mac.try_into().unwrap(),
                _pad: [0; 2],
            },
        )
        .unwrap();
    f.dp.set_pod_xdp(true);
    f.dp.attach(&pod.host).unwrap();
    let xdp = &link_json(None, &pod.host)["xdp"];
    assert_eq!(xdp["mode"], 1, "xdp_from_pod attached in native (driver) mode: {xdp}");

    // Allowed: the pod connects to its node (through XDP, which passes it, and TC).
    let node = std::net::TcpListener::bind((gw, 0)).unwrap();
    let port = node.local_addr().unwrap().port();
    let connect = format!("import socket\nsocket.create_connection(('{gw}',{port}),3).sendall(b'hello')");
    let connects = |node: &std::net::TcpListener| {
        sh(&["ip", "netns", "exec", &pod.netns, "python3", "-c", &connect]);
        let (mut conn, _) = node.accept().unwrap();
        let mut got = String::new();
        std::io::Read::read_to_string(&mut conn, &mut got).unwrap();
        assert_eq!(got, "hello");
    };
    connects(&node);

    // A denied flood: every datagram is a new flow egress policy denies.
    let (xdp_before, tc_before) = (
        f.dp.xdp_counter(DropReason::PolicyDenied).unwrap().packets,
        f.egress_drops(DropReason::PolicyDenied),
    );
    let forwarded_before = f.dp.counter(DropReason::Forwarded, direction::EGRESS).unwrap().packets;
    let script =
        format!("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor i in range(2000): s.sendto(b'x'*18,('{denied}',9))");
    sh(&["ip", "netns", "exec", &pod.netns, "python3", "-c", &script]);
    let xdp_dropped = f.dp.xdp_counter(DropReason::PolicyDenied).unwrap().packets - xdp_before;
    let tc_counted = f.egress_drops(DropReason::PolicyDenied) - tc_before;
    assert_eq!(xdp_dropped, 2000, "the flood dropped at XDP");
    assert_eq!(tc_counted, 2000, "and counted where TC counts its drops");
    assert_eq!(
        f.dp.counter(DropReason::Forwarded, direction::EGRESS).unwrap().packets,
        forwarded_before,
        "none of it reached TC's forward path"
    );
    // Still allowed afterwards.
    connects(&node);

    // With XDP off, TC alone makes the same drop.
    f.dp.set_pod_xdp(false);
    f.dp.attach(&pod.host).unwrap();
    assert!(link_json(None, &pod.host).get("xdp").is_none(), "xdp detached");
    sh(&["ip", "netns", "exec", &pod.netns, "python3", "-c", &script]);
    assert_eq!(f.dp.xdp_counter(DropReason::PolicyDenied).unwrap().packets - xdp_before, 2000);
    assert_eq!(
        f.egress_drops(DropReason::PolicyDenied) - tc_before,
        4000,
        "TC dropped the second flood"
    );
}

/// Quarantine comes before policy in `from_pod`: XDP leaves a quarantined endpoint's packets
/// and packets to a quarantined address to TC, which drops them as `quarantined` (or lets the
/// node's through) instead of XDP dropping them as `policy_denied`.
#[test]
fn quarantine_is_left_to_tc_with_its_own_reason() {
    use bulkhead::datapath::sync::MapWriter;
    let quarantined = ISOLATED | endpoint_flags::QUARANTINED | endpoint_flags::QUARANTINE_ALLOW_HOST;
    let mut f = fixture("quarantine", Some(quarantined));
    let denied = packet(POD_MAC, POD, PEER_B, proto::TCP, 80);
    let before = f.egress_drops(DropReason::Quarantined);
    f.assert_xdp_passes(&denied, TC_ACT_SHOT, "quarantined endpoint, a flow policy denies");
    assert_eq!(f.egress_drops(DropReason::Quarantined), before + 1, "TC's reason");
    f.assert_xdp_passes(
        &packet(POD_MAC, POD, NODE, proto::TCP, 10250),
        TC_ACT_OK,
        "quarantined endpoint to its node",
    );
    // Spoofing is still XDP's, ahead of quarantine in both programs.
    f.assert_xdp_drops(
        &packet(POD_MAC, Ipv4Addr::new(10, 0, 0, 66), PEER_A, proto::TCP, 80),
        DropReason::SpoofedIp,
    );

    // A quarantined destination, from a pod that is not quarantined.
    let mut f = fixture("quarantine-peer", Some(ISOLATED));
    f.dp.maps.set_quarantine(PEER_B, 0).unwrap();
    f.dp.maps.set_quarantine_count(1).unwrap();
    let before = f.egress_drops(DropReason::Quarantined);
    f.assert_xdp_passes(&denied, TC_ACT_SHOT, "to a quarantined address");
    assert_eq!(f.egress_drops(DropReason::Quarantined), before + 1, "TC's reason");
    // Anything else is still XDP's to drop.
    f.assert_xdp_drops(&packet(POD_MAC, POD, PEER_A, proto::TCP, 81), DropReason::PolicyDenied);
}
