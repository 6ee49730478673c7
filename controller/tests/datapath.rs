//! The compiled TC programs on crafted packets (`BPF_PROG_TEST_RUN`): verdict and counter.
//!
//! Test runs put the packet on `lo` (ifindex 1), so the endpoint under test is keyed 1.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::net::Ipv4Addr;
use std::path::PathBuf;

use aya::maps::{MapData, RingBuf};
use aya::programs::{TestRun, TestRunOptions};
use bulkhead::datapath::sync::MapWriter;
use bulkhead::datapath::Datapath;
use bulkhead_common::{
    capacity, direction, endpoint_flags, identity, program_names, proto, rule_id, verdict, DropReason, EndpointInfo, FlowEvent,
    IpcacheValue, PolicyKey, PolicyValue, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL,
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const LO: u32 = 1;
const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const PEER_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2); // identity 301
const PEER_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3); // identity 302
const UNKNOWN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77); // world

/// A loaded datapath with its maps pinned in a directory of its own, removed on drop.
struct Fixture {
    dp: Datapath,
    flows: Option<RingBuf<MapData>>,
    pin_dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn fixture(name: &str, flags: u32) -> Fixture {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bulkhead-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let dp = Datapath::load(&pin_dir).unwrap_or_else(|e| {
        // Some maps may be pinned already: leave nothing behind.
        let _ = std::fs::remove_dir_all(&pin_dir);
        panic!("load datapath (needs root and BPF): {e:?}")
    });
    // The fixture owns the pin dir from here, so a failing step below still removes it.
    let mut f = Fixture { dp, flows: None, pin_dir };
    let m = &mut f.dp.maps;
    m.set_ipcache(PEER_A, 32, &IpcacheValue { identity: 301, flags: 0 }).unwrap();
    m.set_ipcache(PEER_B, 32, &IpcacheValue { identity: 302, flags: 0 }).unwrap();
    // Egress: to identity 301 on TCP/80 (rule 7), to anyone on SCTP/80 (rule 9).
    m.set_policy(
        &PolicyKey::new(10, 301, direction::EGRESS, proto::TCP, 80),
        POLICY_PREFIX_FULL,
        &PolicyValue { rule_id: 7, flags: 0 },
    )
    .unwrap();
    m.set_policy(
        &PolicyKey::new(10, 0, direction::EGRESS, proto::SCTP, 80),
        POLICY_PREFIX_FULL,
        &PolicyValue { rule_id: 9, flags: 0 },
    )
    .unwrap();
    // Ingress: from identity 301, anything (rule 8).
    m.set_policy(
        &PolicyKey::new(10, 301, direction::INGRESS, 0, 0),
        POLICY_PREFIX_ANY_PROTO,
        &PolicyValue { rule_id: 8, flags: 0 },
    )
    .unwrap();
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
    f.flows = Some(f.dp.take_flow_ring().expect("flow ring"));
    f
}

impl Fixture {
    /// Every flow record waiting in the ring buffer.
    fn drain(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.flows.as_mut().expect("flow ring").next() {
            assert_eq!(item.len(), std::mem::size_of::<FlowEvent>(), "record size");
            // SAFETY: FlowEvent is plain old data and the length was checked above.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
        }
        out
    }
}

const ISOLATED: u32 = endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS;

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&dst);
    p.extend_from_slice(&src);
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    // Pad to the minimum frame so every test packet is a plausible one.
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

/// TCP, UDP and SCTP headers all start with the two ports; the rest does not matter here.
fn ports(sport: u16, dport: u16, len: usize) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.resize(len, 0);
    l4
}

fn tcp(src_mac: [u8; 6], src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    eth(HOST_MAC, src_mac, 0x0800, &ipv4(src, dst, proto::TCP, 0, &ports(sport, dport, 20)))
}

/// A TCP segment with `flags` in byte 13 of its header.
fn tcp_flags(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut l4 = ports(sport, dport, 20);
    l4[12] = 0x50;
    l4[13] = flags;
    eth(HOST_MAC, POD_MAC, 0x0800, &ipv4(src, dst, proto::TCP, 0, &l4))
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, id: u16) -> Vec<u8> {
    let mut l4 = vec![kind, 0, 0, 0];
    l4.extend_from_slice(&id.to_be_bytes());
    l4.extend_from_slice(&[0, 1]);
    eth(HOST_MAC, POD_MAC, 0x0800, &ipv4(src, dst, proto::ICMP, 0, &l4))
}

/// Runs `program` on `packet`; returns the TC action and checks that exactly the counter of
/// `reason` in `dir` moved, by one packet.
fn run(f: &mut Fixture, program: &'static str, packet: &[u8], reason: DropReason) -> i32 {
    run_marked(f, program, packet, 0, reason)
}

/// The `struct __sk_buff` a test run starts from, with only `mark` set: `BPF_PROG_TEST_RUN`
/// takes a prefix of it and rejects non-zero fields it does not copy into the skb
/// (`convert___skb_to_skb` in net/bpf/test_run.c; `mark` is one it copies).
fn skb_ctx_with_mark(mark: u32) -> [u8; 12] {
    // struct __sk_buff { __u32 len; __u32 pkt_type; __u32 mark; ... } (uapi/linux/bpf.h).
    let mut ctx = [0u8; 12];
    ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
    ctx
}

/// As [`run`], with the skb mark set to `mark` (0: no context passed at all).
fn run_marked(f: &mut Fixture, program: &'static str, packet: &[u8], mark: u32, reason: DropReason) -> i32 {
    let ctx = skb_ctx_with_mark(mark);
    let dir = if program == program_names::FROM_POD {
        direction::EGRESS
    } else {
        direction::INGRESS
    };
    let before = f.dp.counters().unwrap();
    let prog = f.dp.program(program).unwrap();
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(packet),
            ctx_in: (mark != 0).then_some(&ctx[..]),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    let after = f.dp.counters().unwrap();
    let moved: Vec<_> = after
        .iter()
        .filter(|(r, d, c)| before.iter().find(|(br, bd, _)| br == r && bd == d).map(|(_, _, b)| b.packets) != Some(c.packets))
        .map(|(r, d, _)| (*r, *d))
        .collect();
    assert_eq!(moved, vec![(reason, dir)], "{program}: counters that moved");
    let c = f.dp.counter(reason, dir).unwrap();
    let was = before
        .iter()
        .find(|(r, d, _)| *r == reason && *d == dir)
        .map_or(0, |(_, _, c)| c.packets);
    assert_eq!(c.packets, was + 1, "{program}: one packet counted for {reason:?}");
    result.return_value as i32
}

#[test]
fn allowed_by_policy_is_forwarded_and_counted() {
    let mut f = fixture("allowed", ISOLATED);
    let pkt = tcp(POD_MAC, POD, 40000, PEER_A, 80);
    assert_eq!(run(&mut f, program_names::FROM_POD, &pkt, DropReason::Forwarded), TC_ACT_OK);
    // Ingress rule for identity 301 covers any protocol and port.
    let pkt = tcp(HOST_MAC, PEER_A, 5555, POD, 9999);
    assert_eq!(run(&mut f, program_names::TO_POD, &pkt, DropReason::Forwarded), TC_ACT_OK);
}

#[test]
fn denied_by_policy_is_dropped_with_its_reason() {
    let mut f = fixture("denied", ISOLATED);
    // 302 has no egress entry on TCP/80, and 301 none on port 81.
    for (dst, port) in [(PEER_B, 80), (PEER_A, 81), (UNKNOWN, 80)] {
        let pkt = tcp(POD_MAC, POD, 40000, dst, port);
        assert_eq!(
            run(&mut f, program_names::FROM_POD, &pkt, DropReason::PolicyDenied),
            TC_ACT_SHOT,
            "{dst}:{port}"
        );
    }
    let pkt = tcp(HOST_MAC, PEER_B, 5555, POD, 80);
    assert_eq!(run(&mut f, program_names::TO_POD, &pkt, DropReason::PolicyDenied), TC_ACT_SHOT);
}

#[test]
fn replies_pass_through_conntrack_only() {
    let mut f = fixture("reply", ISOLATED);
    // 302 may not open connections to the pod ...
    let inbound = tcp(HOST_MAC, PEER_B, 80, POD, 40000);
    assert_eq!(run(&mut f, program_names::TO_POD, &inbound, DropReason::PolicyDenied), TC_ACT_SHOT);
    // ... but once the pod opens one to 302 (allowed on SCTP/80 to anyone), the reply passes.
    let mut sctp_out = eth(HOST_MAC, POD_MAC, 0x0800, &ipv4(POD, PEER_B, proto::SCTP, 0, &ports(40000, 80, 12)));
    assert_eq!(run(&mut f, program_names::FROM_POD, &sctp_out, DropReason::Forwarded), TC_ACT_OK);
    let sctp_reply = eth(POD_MAC, HOST_MAC, 0x0800, &ipv4(PEER_B, POD, proto::SCTP, 0, &ports(80, 40000, 12)));
    assert_eq!(run(&mut f, program_names::TO_POD, &sctp_reply, DropReason::Forwarded), TC_ACT_OK);
    // The established flow's next packet passes too; SCTP to another port does not.
    assert_eq!(run(&mut f, program_names::FROM_POD, &sctp_out, DropReason::Forwarded), TC_ACT_OK);
    sctp_out = eth(HOST_MAC, POD_MAC, 0x0800, &ipv4(POD, PEER_B, proto::SCTP, 0, &ports(40000, 81, 12)));
    assert_eq!(
        run(&mut f, program_names::FROM_POD, &sctp_out, DropReason::PolicyDenied),
        TC_ACT_SHOT
    );
    // A TCP reply from 301 after an allowed connection; its ingress rule would allow it
    // anyway, so also check a reply whose reverse flow was never admitted is dropped.
    let out = tcp(POD_MAC, POD, 40001, PEER_A, 80);
    assert_eq!(run(&mut f, program_names::FROM_POD, &out, DropReason::Forwarded), TC_ACT_OK);
    let stray = tcp(HOST_MAC, PEER_B, 80, POD, 40001);
    assert_eq!(run(&mut f, program_names::TO_POD, &stray, DropReason::PolicyDenied), TC_ACT_SHOT);
}

#[test]
fn icmp_echo_reply_matches_its_request() {
    let mut f = fixture("icmp", endpoint_flags::ISOLATED_INGRESS);
    // Egress is not isolated: the request goes out and creates the flow.
    let request = icmp_echo(POD, PEER_B, 8, 0x1234);
    assert_eq!(run(&mut f, program_names::FROM_POD, &request, DropReason::Forwarded), TC_ACT_OK);
    let reply = icmp_echo(PEER_B, POD, 0, 0x1234);
    assert_eq!(run(&mut f, program_names::TO_POD, &reply, DropReason::Forwarded), TC_ACT_OK);
    // A request from 302 is a new flow, and ingress is isolated.
    let inbound = icmp_echo(PEER_B, POD, 8, 0x4321);
    assert_eq!(run(&mut f, program_names::TO_POD, &inbound, DropReason::PolicyDenied), TC_ACT_SHOT);
}

#[test]
fn spoofed_sources_are_dropped() {
    let mut f = fixture("spoof", 0);
    let pkt = tcp(POD_MAC, Ipv4Addr::new(10, 0, 0, 99), 40000, PEER_A, 80);
    assert_eq!(run(&mut f, program_names::FROM_POD, &pkt, DropReason::SpoofedIp), TC_ACT_SHOT);
    let pkt = tcp([0x02, 9, 9, 9, 9, 9], POD, 40000, PEER_A, 80);
    assert_eq!(run(&mut f, program_names::FROM_POD, &pkt, DropReason::SpoofedMac), TC_ACT_SHOT);
}

#[test]
fn unknown_endpoint_is_isolated() {
    let mut f = fixture("unknown", 0);
    f.dp.maps.remove_endpoint(LO).unwrap();
    let pkt = tcp(POD_MAC, POD, 40000, PEER_A, 80);
    assert_eq!(run(&mut f, program_names::FROM_POD, &pkt, DropReason::UnknownEndpoint), TC_ACT_SHOT);
    let pkt = tcp(HOST_MAC, PEER_A, 80, POD, 40000);
    assert_eq!(run(&mut f, program_names::TO_POD, &pkt, DropReason::UnknownEndpoint), TC_ACT_SHOT);
}

#[test]
fn arp_passes_and_other_ethertypes_drop() {
    let mut f = fixture("ethertype", ISOLATED);
    let arp = eth([0xff; 6], POD_MAC, 0x0806, &[0, 1, 8, 0, 6, 4, 0, 1]);
    assert_eq!(run(&mut f, program_names::FROM_POD, &arp, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(run(&mut f, program_names::TO_POD, &arp, DropReason::Forwarded), TC_ACT_OK);
    for ethertype in [0x86dd, 0x88cc, 0x8100] {
        let pkt = eth(HOST_MAC, POD_MAC, ethertype, &[0; 40]);
        assert_eq!(
            run(&mut f, program_names::FROM_POD, &pkt, DropReason::UnsupportedEthertype),
            TC_ACT_SHOT,
            "{ethertype:#x}"
        );
    }
}

#[test]
fn malformed_and_fragmented_packets_drop() {
    let mut f = fixture("malformed", 0);
    // IHL of 3 words is below the minimum.
    let mut bad = ipv4(POD, PEER_A, proto::TCP, 0, &ports(1, 80, 20));
    bad[0] = 0x43;
    assert_eq!(
        run(
            &mut f,
            program_names::FROM_POD,
            &eth(HOST_MAC, POD_MAC, 0x0800, &bad),
            DropReason::Malformed
        ),
        TC_ACT_SHOT
    );
    // A non-first fragment (offset 185 × 8 bytes) carries no ports.
    let frag = ipv4(POD, PEER_A, proto::UDP, 185, &[0; 20]);
    assert_eq!(
        run(
            &mut f,
            program_names::FROM_POD,
            &eth(HOST_MAC, POD_MAC, 0x0800, &frag),
            DropReason::Fragment
        ),
        TC_ACT_SHOT
    );
    // Not isolated: anything well-formed passes, with rule 0.
    let pkt = tcp(POD_MAC, POD, 40000, UNKNOWN, 443);
    assert_eq!(run(&mut f, program_names::FROM_POD, &pkt, DropReason::Forwarded), TC_ACT_OK);
}

#[test]
fn syn_on_a_tracked_tuple_is_checked_as_a_new_connection() {
    let mut f = fixture("syn", ISOLATED);
    let syn = tcp_flags(POD, 40002, PEER_A, 80, SYN);
    assert_eq!(run(&mut f, program_names::FROM_POD, &syn, DropReason::Forwarded), TC_ACT_OK);
    // The policy that admitted the connection goes away.
    let key = PolicyKey::new(10, 301, direction::EGRESS, proto::TCP, 80);
    f.dp.maps.remove_policy(&key, POLICY_PREFIX_FULL).unwrap();
    // The established connection keeps flowing ...
    let ack = tcp_flags(POD, 40002, PEER_A, 80, ACK);
    assert_eq!(run(&mut f, program_names::FROM_POD, &ack, DropReason::Forwarded), TC_ACT_OK);
    // ... but a new connection on the same 4-tuple meets the policy as it is now.
    assert_eq!(run(&mut f, program_names::FROM_POD, &syn, DropReason::PolicyDenied), TC_ACT_SHOT);
}

/// Runs `program` on `packet` `repeat` times (one kernel call).
fn run_repeat(f: &mut Fixture, program: &'static str, packet: &[u8], repeat: u32) -> i32 {
    let prog = f.dp.program(program).unwrap();
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    result.return_value as i32
}

#[test]
fn a_new_flow_is_reported_once_with_its_rule() {
    let mut f = fixture("flow-new", ISOLATED);
    let syn = tcp_flags(POD, 40010, PEER_A, 80, SYN);
    assert_eq!(run(&mut f, program_names::FROM_POD, &syn, DropReason::Forwarded), TC_ACT_OK);
    let events = f.drain();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(
        (e.endpoint_id, e.identity, e.remote_identity, e.rule_id),
        (10, 300, 301, 7),
        "ids in {e:?}"
    );
    assert_eq!(
        (e.verdict, e.reason, e.direction),
        (verdict::FORWARDED, DropReason::Forwarded as u8, direction::EGRESS)
    );
    assert_eq!((e.saddr, e.daddr), (POD.octets(), PEER_A.octets()));
    assert_eq!(
        (u16::from_be_bytes(e.sport), u16::from_be_bytes(e.dport), e.protocol),
        (40010, 80, proto::TCP)
    );
    assert_eq!(e.tcp_flags, SYN);
    assert!(e.timestamp_ns > 0 && e.packet_len as usize == syn.len());
    // Later packets of the established flow, and its replies, are not reported.
    let ack = tcp_flags(POD, 40010, PEER_A, 80, ACK);
    assert_eq!(run_repeat(&mut f, program_names::FROM_POD, &ack, 50), TC_ACT_OK);
    let reply = eth(
        POD_MAC,
        HOST_MAC,
        0x0800,
        &ipv4(PEER_A, POD, proto::TCP, 0, &{
            let mut l4 = ports(80, 40010, 20);
            l4[12] = 0x50;
            l4[13] = SYN | ACK;
            l4
        }),
    );
    assert_eq!(run(&mut f, program_names::TO_POD, &reply, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(f.drain(), vec![], "established packets make no records");
    assert_eq!(f.dp.flows_lost().unwrap(), 0);
}

#[test]
fn every_dropped_packet_is_reported_with_its_reason() {
    let mut f = fixture("flow-drop", ISOLATED);
    let denied = tcp(HOST_MAC, PEER_B, 5555, POD, 80);
    assert_eq!(run_repeat(&mut f, program_names::TO_POD, &denied, 3), TC_ACT_SHOT);
    let spoofed = tcp(POD_MAC, Ipv4Addr::new(10, 0, 0, 99), 40000, PEER_A, 80);
    assert_eq!(run(&mut f, program_names::FROM_POD, &spoofed, DropReason::SpoofedIp), TC_ACT_SHOT);
    let events = f.drain();
    let summary: Vec<_> = events
        .iter()
        .map(|e| (e.verdict, e.reason, e.direction, e.remote_identity, e.rule_id))
        .collect();
    let denied_row = (
        verdict::DROPPED,
        DropReason::PolicyDenied as u8,
        direction::INGRESS,
        302,
        rule_id::NONE,
    );
    // A spoofed packet is dropped before policy: no remote identity was looked up.
    let spoofed_row = (verdict::DROPPED, DropReason::SpoofedIp as u8, direction::EGRESS, 0, rule_id::NONE);
    assert_eq!(summary, vec![denied_row, denied_row, denied_row, spoofed_row]);
}

#[test]
fn audit_mode_forwards_what_it_would_drop_and_says_so() {
    let mut f = fixture("flow-audit", endpoint_flags::AUDIT_EGRESS | endpoint_flags::ISOLATED_INGRESS);
    // Egress is isolated by audit-mode policies only: a flow their rules allow is FORWARDED
    // with its rule, one they do not allow is forwarded too but reported as AUDIT.
    let allowed = tcp_flags(POD, 40020, PEER_A, 80, SYN);
    assert_eq!(run(&mut f, program_names::FROM_POD, &allowed, DropReason::Forwarded), TC_ACT_OK);
    let audited = tcp_flags(POD, 40021, PEER_B, 80, SYN);
    assert_eq!(run(&mut f, program_names::FROM_POD, &audited, DropReason::Forwarded), TC_ACT_OK);
    // Ingress stays enforced.
    let denied = tcp(HOST_MAC, PEER_B, 5555, POD, 80);
    assert_eq!(run(&mut f, program_names::TO_POD, &denied, DropReason::PolicyDenied), TC_ACT_SHOT);
    let summary: Vec<_> = f.drain().iter().map(|e| (e.verdict, e.rule_id, e.remote_identity)).collect();
    assert_eq!(
        summary,
        vec![
            (verdict::FORWARDED, 7, 301),
            (verdict::AUDIT, rule_id::NONE, 302),
            (verdict::DROPPED, rule_id::NONE, 302)
        ]
    );
}

#[test]
fn records_the_ring_cannot_take_are_counted_not_blocking() {
    let mut f = fixture("flow-lost", ISOLATED);
    let denied = tcp(HOST_MAC, PEER_B, 5555, POD, 80);
    // Each record takes its size plus an 8-byte header in the ring; nobody reads here.
    let fits = capacity::FLOW_RING_BYTES as usize / (std::mem::size_of::<FlowEvent>() + 8);
    let sent = fits as u32 + 1000;
    // One endpoint alone cannot fill the ring (its record budget, tests/fairness.rs): many
    // do, each within its burst (one kernel call runs on one CPU, one bucket).
    const BATCH: u32 = 1000;
    assert!(u64::from(BATCH) <= bulkhead_common::FLOW_RECORDS_BURST);
    for k in 0..sent.div_ceil(BATCH) {
        let ep = EndpointInfo {
            endpoint_id: 100 + k,
            identity: 300,
            ipv4: POD.octets(),
            flags: ISOLATED,
            mac: POD_MAC,
            _pad: [0; 2],
        };
        f.dp.maps.set_endpoint(LO, &ep).unwrap();
        let n = BATCH.min(sent - k * BATCH);
        assert_eq!(run_repeat(&mut f, program_names::TO_POD, &denied, n), TC_ACT_SHOT);
    }
    let stored = f.drain().len() as u64;
    let lost = f.dp.flows_lost().unwrap();
    assert_eq!(stored, fits as u64, "a full ring holds exactly its capacity");
    assert_eq!(stored + lost, u64::from(sent), "every record is either stored or counted lost");
    // The drops themselves were all enforced and counted, whatever the ring did.
    assert_eq!(
        f.dp.counter(DropReason::PolicyDenied, direction::INGRESS).unwrap().packets,
        u64::from(sent)
    );
}

#[test]
fn the_pods_own_node_is_always_allowed() {
    let mut f = fixture("host", ISOLATED);
    let node = Ipv4Addr::new(10, 0, 9, 1);
    f.dp.maps
        .set_ipcache(
            node,
            32,
            &IpcacheValue {
                identity: identity::HOST,
                flags: 0,
            },
        )
        .unwrap();
    // A kubelet probe to a port no policy allows, and the pod calling its node.
    let probe = tcp(HOST_MAC, node, 5555, POD, 8080);
    assert_eq!(run(&mut f, program_names::TO_POD, &probe, DropReason::Forwarded), TC_ACT_OK);
    let out = tcp(POD_MAC, POD, 40030, node, 10250);
    assert_eq!(run(&mut f, program_names::FROM_POD, &out, DropReason::Forwarded), TC_ACT_OK);
    let summary: Vec<_> = f.drain().iter().map(|e| (e.verdict, e.remote_identity, e.rule_id)).collect();
    assert_eq!(
        summary,
        vec![
            (verdict::FORWARDED, identity::HOST, rule_id::NONE),
            (verdict::FORWARDED, identity::HOST, rule_id::NONE)
        ]
    );
}

/// Sets the ipcache entry `addr/prefix` to `id`.
fn ipcache(f: &mut Fixture, addr: Ipv4Addr, prefix: u8, id: u32) {
    f.dp.maps
        .set_ipcache(addr, prefix, &IpcacheValue { identity: id, flags: 0 })
        .unwrap();
}

/// An ingress rule on the fixture's endpoint: from `remote`, any protocol and port.
fn allow_ingress_from(f: &mut Fixture, remote: u32, rule: u32) {
    f.dp.maps
        .set_policy(
            &PolicyKey::new(10, remote, direction::INGRESS, 0, 0),
            POLICY_PREFIX_ANY_PROTO,
            &PolicyValue { rule_id: rule, flags: 0 },
        )
        .unwrap();
}

const NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 1);

/// (verdict, reason, remote identity, rule) of every waiting flow record.
fn verdicts(f: &mut Fixture) -> Vec<(u8, u8, u32, u32)> {
    f.drain()
        .iter()
        .map(|e| (e.verdict, e.reason, e.remote_identity, e.rule_id))
        .collect()
}

#[test]
fn traffic_kube_proxy_masquerades_to_the_node_address_is_world_not_host() {
    let mut f = fixture("masq-world", ISOLATED);
    ipcache(&mut f, NODE, 32, identity::HOST);
    let mark = bulkhead_common::KUBE_PROXY_MASQ_MARK;
    assert_eq!(mark, 0x4000);
    // A NodePort client, masqueraded to the node's address: the pod is default deny.
    let syn = tcp_flags(NODE, 5555, POD, 8080, SYN);
    assert_eq!(
        run_marked(&mut f, program_names::TO_POD, &syn, mark, DropReason::PolicyDenied),
        TC_ACT_SHOT
    );
    // Other mark bits (kube-proxy's 0x8000 drop bit) change nothing.
    let syn = tcp_flags(NODE, 5556, POD, 8080, SYN);
    assert_eq!(
        run_marked(&mut f, program_names::TO_POD, &syn, mark | 0x8001, DropReason::PolicyDenied),
        TC_ACT_SHOT
    );
    // The agent's own mark for connections the node source-NATed says the same.
    let syn = tcp_flags(NODE, 5558, POD, 8080, SYN);
    assert_eq!(
        run_marked(
            &mut f,
            program_names::TO_POD,
            &syn,
            bulkhead_common::SNAT_MARK,
            DropReason::PolicyDenied
        ),
        TC_ACT_SHOT
    );
    // The node itself (a kubelet probe, no mark) is still HOST and allowed.
    let probe = tcp_flags(NODE, 5557, POD, 8080, SYN);
    assert_eq!(
        run_marked(&mut f, program_names::TO_POD, &probe, 0x8000, DropReason::Forwarded),
        TC_ACT_OK
    );
    let drop = (verdict::DROPPED, DropReason::PolicyDenied as u8, identity::WORLD, rule_id::NONE);
    assert_eq!(
        verdicts(&mut f),
        vec![
            drop,
            drop,
            drop,
            (verdict::FORWARDED, DropReason::Forwarded as u8, identity::HOST, rule_id::NONE)
        ]
    );
}

#[test]
fn masqueraded_traffic_meets_ingress_policy_like_any_outside_address() {
    let mut f = fixture("masq-ipblock", ISOLATED);
    // ipBlock identities as the compiler makes them: the node's own /24 (rule 21), and
    // 0.0.0.0/0 (rule 20). The node's /32 is HOST.
    ipcache(&mut f, Ipv4Addr::UNSPECIFIED, 0, 400);
    ipcache(&mut f, Ipv4Addr::new(10, 0, 9, 0), 24, 401);
    ipcache(&mut f, NODE, 32, identity::HOST);
    let mark = bulkhead_common::KUBE_PROXY_MASQ_MARK;
    allow_ingress_from(&mut f, 401, 21);
    // The real client is unknown: an ipBlock around the node's address does not cover it.
    let syn = tcp_flags(NODE, 6000, POD, 8080, SYN);
    assert_eq!(
        run_marked(&mut f, program_names::TO_POD, &syn, mark, DropReason::PolicyDenied),
        TC_ACT_SHOT
    );
    // ipBlock 0.0.0.0/0 covers every client.
    allow_ingress_from(&mut f, 400, 20);
    let syn = tcp_flags(NODE, 6001, POD, 8080, SYN);
    assert_eq!(
        run_marked(&mut f, program_names::TO_POD, &syn, mark, DropReason::Forwarded),
        TC_ACT_OK
    );
    // kube-proxy marks only a connection's first packet (later ones skip the nat table):
    // the rest of the flow and the pod's replies pass on conntrack.
    let ack = tcp_flags(NODE, 6001, POD, 8080, ACK);
    assert_eq!(run(&mut f, program_names::TO_POD, &ack, DropReason::Forwarded), TC_ACT_OK);
    let reply = tcp_flags(POD, 8080, NODE, 6001, SYN | ACK);
    assert_eq!(run(&mut f, program_names::FROM_POD, &reply, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(
        verdicts(&mut f),
        vec![
            (verdict::DROPPED, DropReason::PolicyDenied as u8, 400, rule_id::NONE),
            (verdict::FORWARDED, DropReason::Forwarded as u8, 400, 20),
        ]
    );
}

/// The conntrack table of endpoint `endpoint_id`, opened from the pins.
fn ct_table(f: &Fixture, endpoint_id: u32) -> aya::maps::HashMap<aya::maps::MapData, bulkhead_common::CtKey, bulkhead_common::CtEntry> {
    let data = aya::maps::MapData::from_pin(f.pin_dir.join(bulkhead_common::map_names::CONNTRACK)).unwrap();
    let tables = bulkhead::datapath::conntrack::Tables::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap();
    bulkhead::datapath::conntrack::table(&tables, endpoint_id).expect("the endpoint's conntrack table")
}

/// The pinned conntrack entry of the fixture's endpoint (10) for `key`, if any.
fn ct_entry(f: &Fixture, key: &bulkhead_common::CtKey) -> Option<bulkhead_common::CtEntry> {
    ct_table(f, 10).get(key, 0).ok()
}

#[test]
fn fin_or_rst_marks_the_flow_closing() {
    use bulkhead_common::{ct_flags, CtKey};
    let mut f = fixture("closing", ISOLATED);
    let key = CtKey {
        saddr: POD.octets(),
        daddr: PEER_A.octets(),
        sport: 40040u16.to_be_bytes(),
        dport: 80u16.to_be_bytes(),
        protocol: proto::TCP,
        direction: direction::EGRESS,
        _pad: [0; 2],
    };
    let syn = tcp_flags(POD, 40040, PEER_A, 80, SYN);
    assert_eq!(run(&mut f, program_names::FROM_POD, &syn, DropReason::Forwarded), TC_ACT_OK);
    let entry = ct_entry(&f, &key).expect("tracked");
    assert_eq!(entry.flags & ct_flags::CLOSING, 0);
    assert_eq!(entry.flags & ct_flags::VERDICT_MASK, u32::from(verdict::FORWARDED));
    // Data keeps the entry open ...
    let ack = tcp_flags(POD, 40040, PEER_A, 80, ACK);
    assert_eq!(run(&mut f, program_names::FROM_POD, &ack, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(ct_entry(&f, &key).unwrap().flags & ct_flags::CLOSING, 0);
    // ... a FIN from the pod marks it closing, and the close handshake still passes.
    let fin = tcp_flags(POD, 40040, PEER_A, 80, ACK | 0x01);
    assert_eq!(run(&mut f, program_names::FROM_POD, &fin, DropReason::Forwarded), TC_ACT_OK);
    assert_ne!(ct_entry(&f, &key).unwrap().flags & ct_flags::CLOSING, 0);
    let mut l4 = ports(80, 40040, 20);
    l4[12] = 0x50;
    l4[13] = ACK | 0x01;
    let fin_reply = eth(POD_MAC, HOST_MAC, 0x0800, &ipv4(PEER_A, POD, proto::TCP, 0, &l4));
    assert_eq!(run(&mut f, program_names::TO_POD, &fin_reply, DropReason::Forwarded), TC_ACT_OK);

    // An RST arriving as a reply marks the pod's egress entry it matched.
    let key2 = CtKey {
        sport: 40041u16.to_be_bytes(),
        ..key
    };
    let syn2 = tcp_flags(POD, 40041, PEER_A, 80, SYN);
    assert_eq!(run(&mut f, program_names::FROM_POD, &syn2, DropReason::Forwarded), TC_ACT_OK);
    let mut l4 = ports(80, 40041, 20);
    l4[12] = 0x50;
    l4[13] = 0x04;
    let rst = eth(POD_MAC, HOST_MAC, 0x0800, &ipv4(PEER_A, POD, proto::TCP, 0, &l4));
    assert_eq!(run(&mut f, program_names::TO_POD, &rst, DropReason::Forwarded), TC_ACT_OK);
    assert_ne!(ct_entry(&f, &key2).unwrap().flags & ct_flags::CLOSING, 0);
}

/// CLOCK_MONOTONIC now, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn a_closing_flow_ages_out_after_ten_idle_seconds_an_open_one_does_not() {
    use bulkhead_common::{ct_flags, CtEntry, CtKey};
    let mut f = fixture("closing-age", ISOLATED);
    let key_for = |sport: u16| CtKey {
        saddr: POD.octets(),
        daddr: PEER_A.octets(),
        sport: sport.to_be_bytes(),
        dport: 80u16.to_be_bytes(),
        protocol: proto::TCP,
        direction: direction::EGRESS,
        _pad: [0; 2],
    };
    for sport in [40050, 40051] {
        let syn = tcp_flags(POD, sport, PEER_A, 80, SYN);
        assert_eq!(run(&mut f, program_names::FROM_POD, &syn, DropReason::Forwarded), TC_ACT_OK);
    }
    // Both flows last saw a packet 11 s ago; only the first is closing.
    let mut ct: aya::maps::HashMap<_, CtKey, CtEntry> = ct_table(&f, 10);
    let past = monotonic_ns() - 11_000_000_000;
    for (sport, flags) in [(40050, ct_flags::CLOSING), (40051, 0)] {
        let e = ct.get(&key_for(sport), 0).unwrap();
        ct.insert(
            key_for(sport),
            CtEntry {
                last_seen_ns: past,
                flags: e.flags | flags,
                ..e
            },
            0,
        )
        .unwrap();
    }
    // With the admitting rule gone, a packet only passes on its conntrack entry.
    f.dp.maps
        .remove_policy(&PolicyKey::new(10, 301, direction::EGRESS, proto::TCP, 80), POLICY_PREFIX_FULL)
        .unwrap();
    let late_ack = tcp_flags(POD, 40050, PEER_A, 80, ACK);
    assert_eq!(
        run(&mut f, program_names::FROM_POD, &late_ack, DropReason::PolicyDenied),
        TC_ACT_SHOT
    );
    let open_ack = tcp_flags(POD, 40051, PEER_A, 80, ACK);
    assert_eq!(run(&mut f, program_names::FROM_POD, &open_ack, DropReason::Forwarded), TC_ACT_OK);
}

#[test]
fn a_compiled_ipblock_covering_every_address_admits_masqueraded_traffic_and_a_narrower_one_does_not() {
    use bulkhead::datapath::DatapathState;
    use bulkhead::model::{self, Cluster};
    use bulkhead::policy::{Compiler, LocalEndpoint};
    // Port 8080 from anywhere; port 9090 only from the node's own /24.
    let yaml = format!(
        "---
apiVersion: v1
kind: Namespace
metadata: {{name: x, labels: {{kubernetes.io/metadata.name: x}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: a, namespace: x, labels: {{app: a}}}}
spec: {{containers: [{{name: c, image: i}}]}}
status: {{podIP: {POD}}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: outside, namespace: x}}
spec:
  podSelector: {{}}
  ingress:
  - from: [{{ipBlock: {{cidr: 0.0.0.0/0}}}}]
    ports: [{{port: 8080, protocol: TCP}}]
  - from: [{{ipBlock: {{cidr: 10.0.9.0/24}}}}]
    ports: [{{port: 9090, protocol: TCP}}]
"
    );
    let cluster = Cluster::from_objects(model::parse_documents(&yaml, "test").unwrap());
    let local = LocalEndpoint {
        endpoint_id: 77,
        host_ifindex: LO,
        namespace: "x".into(),
        pod: "a".into(),
        ipv4: POD,
        mac: POD_MAC,
    };
    let state = Compiler::new().compile(&cluster, &[local]);
    let mut f = fixture("masq-compiled", 0);
    bulkhead::datapath::sync::sync(&mut f.dp.maps, &DatapathState::default(), &state).unwrap();
    // The agent gives the node's addresses HOST.
    ipcache(&mut f, NODE, 32, identity::HOST);
    let mark = bulkhead_common::KUBE_PROXY_MASQ_MARK;
    let syn = |sport, dport| tcp_flags(NODE, sport, POD, dport, SYN);
    assert_eq!(
        run_marked(&mut f, program_names::TO_POD, &syn(7000, 8080), mark, DropReason::Forwarded),
        TC_ACT_OK
    );
    assert_eq!(
        run_marked(&mut f, program_names::TO_POD, &syn(7001, 9090), mark, DropReason::PolicyDenied),
        TC_ACT_SHOT
    );
    assert_eq!(
        run(&mut f, program_names::TO_POD, &syn(7002, 9090), DropReason::Forwarded),
        TC_ACT_OK
    );
    let records = f.drain();
    let everywhere = records[0].remote_identity;
    assert!(
        everywhere >= identity::FIRST_ALLOCATED,
        "the 0.0.0.0/0 block's identity: {everywhere}"
    );
    assert_ne!(records[0].rule_id, rule_id::NONE);
    assert_eq!(
        records.iter().map(|e| (e.verdict, e.remote_identity)).collect::<Vec<_>>(),
        vec![
            (verdict::FORWARDED, everywhere),
            (verdict::DROPPED, everywhere),
            (verdict::FORWARDED, identity::HOST)
        ]
    );
}

/// A fragment of IP datagram `id`: `frag_off` holds the More Fragments bit (0x2000) and the
/// offset in 8-byte units.
fn fragment(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, id: u16, frag_off: u16, payload: &[u8]) -> Vec<u8> {
    let mut ip = ipv4(src, dst, protocol, frag_off, payload);
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    let (dst_mac, src_mac) = if src == POD { (HOST_MAC, POD_MAC) } else { (POD_MAC, HOST_MAC) };
    eth(dst_mac, src_mac, 0x0800, &ip)
}

const MF: u16 = 0x2000;

/// A datagram's three fragments: the first (with the L4 header), a middle and a last one.
fn fragments(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, id: u16, sport: u16, dport: u16) -> [Vec<u8>; 3] {
    [
        fragment(src, dst, protocol, id, MF, &ports(sport, dport, 24)),
        fragment(src, dst, protocol, id, MF | 3, &[7; 24]),
        fragment(src, dst, protocol, id, 6, &[7; 16]),
    ]
}

#[test]
fn fragments_of_an_allowed_datagram_pass_and_of_a_denied_one_never() {
    let mut f = fixture("fragments", ISOLATED);
    // Ingress from 301 is allowed: a large UDP answer arrives whole.
    let [first, middle, last] = fragments(PEER_A, POD, proto::UDP, 7, 53, 41000);
    assert_eq!(run(&mut f, program_names::TO_POD, &first, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(run(&mut f, program_names::TO_POD, &middle, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(run(&mut f, program_names::TO_POD, &last, DropReason::Forwarded), TC_ACT_OK);
    // Egress: TCP/80 to 301 is allowed, and its fragments follow.
    let [first, middle, last] = fragments(POD, PEER_A, proto::TCP, 8, 40000, 80);
    assert_eq!(run(&mut f, program_names::FROM_POD, &first, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(run(&mut f, program_names::FROM_POD, &last, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(run(&mut f, program_names::FROM_POD, &middle, DropReason::Forwarded), TC_ACT_OK);

    // From 302 (denied), in every order: the first fragment meets policy, the rest drop.
    let [first, middle, last] = fragments(PEER_B, POD, proto::UDP, 9, 53, 41000);
    assert_eq!(run(&mut f, program_names::TO_POD, &last, DropReason::Fragment), TC_ACT_SHOT);
    assert_eq!(run(&mut f, program_names::TO_POD, &first, DropReason::PolicyDenied), TC_ACT_SHOT);
    assert_eq!(run(&mut f, program_names::TO_POD, &middle, DropReason::Fragment), TC_ACT_SHOT);
    assert_eq!(run(&mut f, program_names::TO_POD, &last, DropReason::Fragment), TC_ACT_SHOT);
    // A lone later fragment of an allowed peer, before its first: nothing to follow yet.
    let [first, middle, _] = fragments(PEER_A, POD, proto::UDP, 10, 53, 41000);
    assert_eq!(run(&mut f, program_names::TO_POD, &middle, DropReason::Fragment), TC_ACT_SHOT);
    assert_eq!(run(&mut f, program_names::TO_POD, &first, DropReason::Forwarded), TC_ACT_OK);
    // Another protocol under the same IP id is another datagram.
    let [_, middle, _] = fragments(PEER_A, POD, proto::TCP, 10, 53, 41000);
    assert_eq!(run(&mut f, program_names::TO_POD, &middle, DropReason::Fragment), TC_ACT_SHOT);

    // An IP id reused by a denied datagram (egress TCP/81) takes the allowed one's record away.
    let [first, middle, _] = fragments(POD, PEER_A, proto::TCP, 11, 40001, 80);
    assert_eq!(run(&mut f, program_names::FROM_POD, &first, DropReason::Forwarded), TC_ACT_OK);
    let [denied, _, _] = fragments(POD, PEER_A, proto::TCP, 11, 40002, 81);
    assert_eq!(run(&mut f, program_names::FROM_POD, &denied, DropReason::PolicyDenied), TC_ACT_SHOT);
    assert_eq!(run(&mut f, program_names::FROM_POD, &middle, DropReason::Fragment), TC_ACT_SHOT);
    // Overlapping: a second first fragment to a denied port drops itself; the allowed
    // datagram's own first fragment is the only one the pod's stack can reassemble.
    let [first, middle, _] = fragments(POD, PEER_A, proto::TCP, 12, 40003, 80);
    assert_eq!(run(&mut f, program_names::FROM_POD, &first, DropReason::Forwarded), TC_ACT_OK);
    let overlap = fragment(POD, PEER_A, proto::TCP, 12, MF, &ports(40003, 22, 24));
    assert_eq!(
        run(&mut f, program_names::FROM_POD, &overlap, DropReason::PolicyDenied),
        TC_ACT_SHOT
    );
    assert_eq!(run(&mut f, program_names::FROM_POD, &middle, DropReason::Fragment), TC_ACT_SHOT);
}

#[test]
fn a_fragments_record_lapses_after_its_lifetime() {
    use bulkhead_common::{FragEntry, FragKey, FRAG_LIFETIME_NS};
    let mut f = fixture("fragment-age", ISOLATED);
    let [first, middle, last] = fragments(PEER_A, POD, proto::UDP, 21, 53, 41000);
    assert_eq!(run(&mut f, program_names::TO_POD, &first, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(run(&mut f, program_names::TO_POD, &middle, DropReason::Forwarded), TC_ACT_OK);
    let data = aya::maps::MapData::from_pin(f.pin_dir.join(bulkhead_common::map_names::FRAGMENTS)).unwrap();
    let mut records: aya::maps::HashMap<_, FragKey, FragEntry> = aya::maps::Map::LruHashMap(data).try_into().unwrap();
    let key = FragKey {
        saddr: PEER_A.octets(),
        daddr: POD.octets(),
        id: 21u16.to_be_bytes(),
        protocol: proto::UDP,
        direction: direction::INGRESS,
    };
    let entry = records.get(&key, 0).expect("the first fragment's record");
    let past = monotonic_ns() - FRAG_LIFETIME_NS - 1_000_000_000;
    records.insert(key, FragEntry { first_ns: past, ..entry }, 0).unwrap();
    assert_eq!(run(&mut f, program_names::TO_POD, &last, DropReason::Fragment), TC_ACT_SHOT);
}

/// An ICMP message of `kind`/`code` from `src` to `dst` whose body (after the 4 bytes of
/// checksum... rest of header) is `rest`.
fn icmp(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8, rest: &[u8]) -> Vec<u8> {
    let mut l4 = vec![kind, code, 0, 0];
    l4.extend_from_slice(rest);
    let (dst_mac, src_mac) = if src == POD { (HOST_MAC, POD_MAC) } else { (POD_MAC, HOST_MAC) };
    eth(dst_mac, src_mac, 0x0800, &ipv4(src, dst, proto::ICMP, 0, &l4))
}

/// An ICMP error quoting the IP header and first 8 bytes of a packet `qsrc:sport` →
/// `qdst:dport` of `protocol` (for ICMP, `sport` is the quoted type and `dport` its id).
fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8, quote: (Ipv4Addr, u16, Ipv4Addr, u16, u8)) -> Vec<u8> {
    let (qsrc, sport, qdst, dport, protocol) = quote;
    let first8 = if protocol == proto::ICMP {
        let mut e = vec![sport as u8, 0, 0, 0];
        e.extend_from_slice(&dport.to_be_bytes());
        e.extend_from_slice(&[0, 1]);
        e
    } else {
        ports(sport, dport, 8)
    };
    let mut rest = vec![0; 4];
    rest.extend_from_slice(&ipv4(qsrc, qdst, protocol, 0, &first8)[..28]);
    icmp(src, dst, kind, code, &rest)
}

fn udp_to(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let (dst_mac, src_mac) = if src == POD { (HOST_MAC, POD_MAC) } else { (POD_MAC, HOST_MAC) };
    eth(dst_mac, src_mac, 0x0800, &ipv4(src, dst, proto::UDP, 0, &ports(sport, dport, 12)))
}

const UNREACH: u8 = 3;
const TIME_EXCEEDED: u8 = 11;

#[test]
fn an_icmp_error_passes_only_with_the_flow_it_quotes() {
    let mut f = fixture("icmp-errors", endpoint_flags::ISOLATED_INGRESS);
    // The pod's UDP to 302 (egress is open); 302 may not open anything to the pod.
    let out = udp_to(POD, 41000, PEER_B, 53);
    assert_eq!(run(&mut f, program_names::FROM_POD, &out, DropReason::Forwarded), TC_ACT_OK);
    // 302's port unreachable and a router's time exceeded, quoting that datagram, arrive.
    let quote = (POD, 41000, PEER_B, 53, proto::UDP);
    let refused = icmp_error(PEER_B, POD, UNREACH, 3, quote);
    assert_eq!(run(&mut f, program_names::TO_POD, &refused, DropReason::Forwarded), TC_ACT_OK);
    let expired = icmp_error(UNKNOWN, POD, TIME_EXCEEDED, 0, quote);
    assert_eq!(run(&mut f, program_names::TO_POD, &expired, DropReason::Forwarded), TC_ACT_OK);
    // Fragmentation needed (PMTU) for it too.
    let frag_needed = icmp_error(UNKNOWN, POD, UNREACH, 4, quote);
    assert_eq!(run(&mut f, program_names::TO_POD, &frag_needed, DropReason::Forwarded), TC_ACT_OK);
    // Quoting another port, another protocol, or the flow the wrong way round: unrelated.
    for quote in [
        (POD, 41001, PEER_B, 53, proto::UDP),
        (POD, 41000, PEER_B, 53, proto::TCP),
        (PEER_B, 53, POD, 41000, proto::UDP),
    ] {
        let stray = icmp_error(PEER_B, POD, UNREACH, 3, quote);
        assert_eq!(
            run(&mut f, program_names::TO_POD, &stray, DropReason::IcmpUnrelated),
            TC_ACT_SHOT,
            "{quote:?}"
        );
    }
    // A truncated quote is unrelated too, and so is an error in fragments.
    let short = icmp(PEER_B, POD, UNREACH, 3, &[0; 12]);
    assert_eq!(run(&mut f, program_names::TO_POD, &short, DropReason::IcmpUnrelated), TC_ACT_SHOT);
    let mut split = icmp_error(PEER_B, POD, UNREACH, 3, quote);
    split[20..22].copy_from_slice(&MF.to_be_bytes());
    assert_eq!(run(&mut f, program_names::TO_POD, &split, DropReason::IcmpUnrelated), TC_ACT_SHOT);
    // An error about the pod's ping.
    let ping = icmp_echo(POD, PEER_B, 8, 0x77);
    assert_eq!(run(&mut f, program_names::FROM_POD, &ping, DropReason::Forwarded), TC_ACT_OK);
    let unreachable = icmp_error(UNKNOWN, POD, UNREACH, 1, (POD, 8, PEER_B, 0x77, proto::ICMP));
    assert_eq!(run(&mut f, program_names::TO_POD, &unreachable, DropReason::Forwarded), TC_ACT_OK);
    let other_id = icmp_error(UNKNOWN, POD, UNREACH, 1, (POD, 8, PEER_B, 0x78, proto::ICMP));
    assert_eq!(
        run(&mut f, program_names::TO_POD, &other_id, DropReason::IcmpUnrelated),
        TC_ACT_SHOT
    );

    // The pod's own error about a datagram 301 sent it (ingress allowed) relates to that flow.
    let inbound = udp_to(PEER_A, 5000, POD, 9000);
    assert_eq!(run(&mut f, program_names::TO_POD, &inbound, DropReason::Forwarded), TC_ACT_OK);
    let answer = icmp_error(POD, PEER_A, UNREACH, 3, (PEER_A, 5000, POD, 9000, proto::UDP));
    assert_eq!(run(&mut f, program_names::FROM_POD, &answer, DropReason::Forwarded), TC_ACT_OK);
}

#[test]
fn one_icmp_error_opens_no_pinhole_for_other_icmp() {
    let mut f = fixture("icmp-pinhole", endpoint_flags::ISOLATED_INGRESS);
    // The old hole: the pod sends 302 an ICMP error (about nothing it holds) ...
    let lure = icmp_error(POD, PEER_B, UNREACH, 3, (PEER_B, 53, POD, 41000, proto::UDP));
    assert_eq!(run(&mut f, program_names::FROM_POD, &lure, DropReason::IcmpUnrelated), TC_ACT_SHOT);
    // ... and one it may send, about a reply on its own flow.
    let out = udp_to(POD, 41000, PEER_B, 53);
    assert_eq!(run(&mut f, program_names::FROM_POD, &out, DropReason::Forwarded), TC_ACT_OK);
    let reply = udp_to(PEER_B, 53, POD, 41000);
    assert_eq!(run(&mut f, program_names::TO_POD, &reply, DropReason::Forwarded), TC_ACT_OK);
    let error = icmp_error(POD, PEER_B, UNREACH, 3, (PEER_B, 53, POD, 41000, proto::UDP));
    assert_eq!(run(&mut f, program_names::FROM_POD, &error, DropReason::Forwarded), TC_ACT_OK);
    // None of it lets 302 send the pod ICMP of its own: errors quoting nothing, queries and
    // other types meet ingress policy (denied) as flows of their own.
    let forged = icmp_error(PEER_B, POD, UNREACH, 3, (POD, 1, PEER_B, 1, proto::UDP));
    assert_eq!(run(&mut f, program_names::TO_POD, &forged, DropReason::IcmpUnrelated), TC_ACT_SHOT);
    for (kind, code) in [(13, 0), (8, 0), (9, 0), (5, 1), (17, 0)] {
        let query = icmp(PEER_B, POD, kind, code, &[0; 16]);
        assert_eq!(
            run(&mut f, program_names::TO_POD, &query, DropReason::PolicyDenied),
            TC_ACT_SHOT,
            "type {kind}"
        );
    }
    // A timestamp reply matches the pod's own request, by id.
    let request = icmp(POD, PEER_B, 13, 0, &[0, 9, 0, 1]);
    assert_eq!(run(&mut f, program_names::FROM_POD, &request, DropReason::Forwarded), TC_ACT_OK);
    let answer = icmp(PEER_B, POD, 14, 0, &[0, 9, 0, 1]);
    assert_eq!(run(&mut f, program_names::TO_POD, &answer, DropReason::Forwarded), TC_ACT_OK);
    let other = icmp(PEER_B, POD, 14, 0, &[0, 10, 0, 1]);
    assert_eq!(run(&mut f, program_names::TO_POD, &other, DropReason::PolicyDenied), TC_ACT_SHOT);
}

#[test]
fn only_the_side_that_opened_a_datagram_flow_keeps_it_alive() {
    use bulkhead_common::{CtEntry, CtKey};
    let mut f = fixture("ct-opener", endpoint_flags::ISOLATED_INGRESS);
    let out = udp_to(POD, 42000, PEER_B, 53);
    assert_eq!(run(&mut f, program_names::FROM_POD, &out, DropReason::Forwarded), TC_ACT_OK);
    let key = CtKey {
        saddr: POD.octets(),
        daddr: PEER_B.octets(),
        sport: 42000u16.to_be_bytes(),
        dport: 53u16.to_be_bytes(),
        protocol: proto::UDP,
        direction: direction::EGRESS,
        _pad: [0; 2],
    };
    let mut ct: aya::maps::HashMap<_, CtKey, CtEntry> = ct_table(&f, 10);
    let past = monotonic_ns() - 50_000_000_000;
    let e = ct.get(&key, 0).unwrap();
    ct.insert(key, CtEntry { last_seen_ns: past, ..e }, 0).unwrap();
    // The remote's datagrams pass while the entry lives, but do not extend it ...
    let reply = udp_to(PEER_B, 53, POD, 42000);
    assert_eq!(run(&mut f, program_names::TO_POD, &reply, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(ct_entry(&f, &key).unwrap().last_seen_ns, past, "a reply refreshed a UDP entry");
    // ... the pod's do.
    assert_eq!(run(&mut f, program_names::FROM_POD, &out, DropReason::Forwarded), TC_ACT_OK);
    assert!(ct_entry(&f, &key).unwrap().last_seen_ns > past);
    // Once it lapses, the remote alone cannot reopen it.
    ct.insert(
        key,
        CtEntry {
            last_seen_ns: monotonic_ns() - 61_000_000_000,
            ..e
        },
        0,
    )
    .unwrap();
    assert_eq!(run(&mut f, program_names::TO_POD, &reply, DropReason::PolicyDenied), TC_ACT_SHOT);
}

#[test]
fn the_readme_lists_every_drop_reason_by_number_and_name() {
    let readme = include_str!("../../README.md");
    let start = readme.find("**Drop reasons**").expect("the README's drop reasons");
    let end = start + readme[start..].find("\n\n").expect("the paragraph's end");
    let text = readme[start..end].split_whitespace().collect::<Vec<_>>().join(" ");
    for r in DropReason::ALL {
        let entry = format!("{} {}", r as u32, r.name());
        assert!(text.contains(&entry), "README's drop reasons lack {entry:?}: {text}");
    }
}

#[test]
fn a_revoked_policy_ends_a_datagram_flow_within_a_second_and_leaves_tcp_connections() {
    use bulkhead_common::{CtEntry, CtKey};
    let mut f = fixture("ct-revoke", ISOLATED);
    // 301 opens a UDP flow and a TCP connection to the pod (ingress allows 301 anything).
    let udp_in = udp_to(PEER_A, 5353, POD, 9000);
    assert_eq!(run(&mut f, program_names::TO_POD, &udp_in, DropReason::Forwarded), TC_ACT_OK);
    let tcp_in = tcp(HOST_MAC, PEER_A, 5555, POD, 9001);
    assert_eq!(run(&mut f, program_names::TO_POD, &tcp_in, DropReason::Forwarded), TC_ACT_OK);
    // Still allowed after a second: the datagram passes again, with no new flow record.
    let key = |sport: u16, dport: u16, protocol| CtKey {
        saddr: PEER_A.octets(),
        daddr: POD.octets(),
        sport: sport.to_be_bytes(),
        dport: dport.to_be_bytes(),
        protocol,
        direction: direction::INGRESS,
        _pad: [0; 2],
    };
    let mut ct: aya::maps::HashMap<_, CtKey, CtEntry> = ct_table(&f, 10);
    let age = |ct: &mut aya::maps::HashMap<_, CtKey, CtEntry>, k: CtKey| {
        let e = ct.get(&k, 0).unwrap();
        ct.insert(
            k,
            CtEntry {
                last_seen_ns: monotonic_ns() - 2_000_000_000,
                ..e
            },
            0,
        )
        .unwrap();
    };
    f.drain();
    age(&mut ct, key(5353, 9000, proto::UDP));
    assert_eq!(run(&mut f, program_names::TO_POD, &udp_in, DropReason::Forwarded), TC_ACT_OK);
    assert!(f.drain().is_empty(), "a still-allowed flow is reported once");
    // The rule goes: the datagram flow ends at its next recheck, the TCP connection stays.
    f.dp.maps
        .remove_policy(&PolicyKey::new(10, 301, direction::INGRESS, 0, 0), POLICY_PREFIX_ANY_PROTO)
        .unwrap();
    age(&mut ct, key(5353, 9000, proto::UDP));
    age(&mut ct, key(5555, 9001, proto::TCP));
    assert_eq!(run(&mut f, program_names::TO_POD, &udp_in, DropReason::PolicyDenied), TC_ACT_SHOT);
    let mut ack = tcp(HOST_MAC, PEER_A, 5555, POD, 9001);
    ack[14 + 20 + 13] = ACK;
    assert_eq!(run(&mut f, program_names::TO_POD, &ack, DropReason::Forwarded), TC_ACT_OK);
}

/// Rewrites the fixture's endpoint with `flags` (what the agent does to quarantine it).
fn set_flags(f: &mut Fixture, flags: u32) {
    f.dp.maps
        .set_endpoint(
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

const QUARANTINED: u32 = endpoint_flags::QUARANTINED | endpoint_flags::QUARANTINE_ALLOW_HOST;

#[test]
fn a_quarantined_endpoint_loses_established_and_new_flows_both_ways_but_not_its_node() {
    let mut f = fixture("quarantine", ISOLATED);
    ipcache(&mut f, NODE, 32, identity::HOST);
    // An established connection to 301 (egress rule 7), and its reply.
    let out = tcp(POD_MAC, POD, 40000, PEER_A, 80);
    let back = tcp(HOST_MAC, PEER_A, 80, POD, 40000);
    assert_eq!(run(&mut f, program_names::FROM_POD, &out, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(run(&mut f, program_names::TO_POD, &back, DropReason::Forwarded), TC_ACT_OK);
    f.drain();

    set_flags(&mut f, ISOLATED | QUARANTINED);
    // Conntrack still holds the flow: the quarantine comes first.
    let key = bulkhead_common::CtKey {
        saddr: POD.octets(),
        daddr: PEER_A.octets(),
        sport: 40000u16.to_be_bytes(),
        dport: 80u16.to_be_bytes(),
        protocol: proto::TCP,
        direction: direction::EGRESS,
        _pad: [0; 2],
    };
    assert!(ct_entry(&f, &key).is_some(), "the connection is tracked");
    assert_eq!(run(&mut f, program_names::FROM_POD, &out, DropReason::Quarantined), TC_ACT_SHOT);
    assert_eq!(run(&mut f, program_names::TO_POD, &back, DropReason::Quarantined), TC_ACT_SHOT);
    // New flows policy would allow, both ways, and ICMP.
    let inbound = tcp(HOST_MAC, PEER_A, 5555, POD, 9999);
    assert_eq!(run(&mut f, program_names::TO_POD, &inbound, DropReason::Quarantined), TC_ACT_SHOT);
    let ping = icmp_echo(POD, PEER_A, 8, 7);
    assert_eq!(run(&mut f, program_names::FROM_POD, &ping, DropReason::Quarantined), TC_ACT_SHOT);
    // Each drop is reported with its reason and the remote's identity.
    let records = verdicts(&mut f);
    assert_eq!(records.len(), 4, "{records:?}");
    assert!(
        records
            .iter()
            .all(|&(v, r, id, _)| v == verdict::DROPPED && r == DropReason::Quarantined as u8 && id == 301),
        "{records:?}"
    );
    // The node still reaches the pod and the pod its node; ARP passes.
    let probe = tcp(HOST_MAC, NODE, 5555, POD, 8080);
    assert_eq!(run(&mut f, program_names::TO_POD, &probe, DropReason::Forwarded), TC_ACT_OK);
    let to_node = tcp(POD_MAC, POD, 40030, NODE, 10250);
    assert_eq!(run(&mut f, program_names::FROM_POD, &to_node, DropReason::Forwarded), TC_ACT_OK);
    let arp = eth([0xff; 6], POD_MAC, 0x0806, &[0, 1, 8, 0, 6, 4, 0, 1]);
    assert_eq!(run(&mut f, program_names::FROM_POD, &arp, DropReason::Forwarded), TC_ACT_OK);
    // Traffic the node forwards for someone else under its address is not the node's.
    let forwarded = tcp(HOST_MAC, NODE, 5556, POD, 8080);
    assert_eq!(
        run_marked(
            &mut f,
            program_names::TO_POD,
            &forwarded,
            bulkhead_common::KUBE_PROXY_MASQ_MARK,
            DropReason::Quarantined
        ),
        TC_ACT_SHOT
    );
    // Without the node exception the node is cut off too.
    set_flags(&mut f, ISOLATED | endpoint_flags::QUARANTINED);
    let probe = tcp(HOST_MAC, NODE, 5557, POD, 8080);
    assert_eq!(run(&mut f, program_names::TO_POD, &probe, DropReason::Quarantined), TC_ACT_SHOT);
    assert_eq!(run(&mut f, program_names::FROM_POD, &to_node, DropReason::Quarantined), TC_ACT_SHOT);

    // Released: policy alone decides again, and the tracked connection carries on.
    set_flags(&mut f, ISOLATED);
    assert_eq!(run(&mut f, program_names::FROM_POD, &out, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(run(&mut f, program_names::TO_POD, &back, DropReason::Forwarded), TC_ACT_OK);
    let denied = tcp(POD_MAC, POD, 40001, PEER_B, 80);
    assert_eq!(run(&mut f, program_names::FROM_POD, &denied, DropReason::PolicyDenied), TC_ACT_SHOT);
}

#[test]
fn a_quarantined_peer_address_is_dropped_both_ways_once_the_count_opens_its_lookup() {
    // Not isolated: policy would forward everything.
    let mut f = fixture("quarantine-peer", 0);
    let to_b = tcp(POD_MAC, POD, 40000, PEER_B, 80);
    let from_b = tcp(HOST_MAC, PEER_B, 5555, POD, 80);
    assert_eq!(run(&mut f, program_names::FROM_POD, &to_b, DropReason::Forwarded), TC_ACT_OK);
    // The address alone, count 0: the lookup is skipped (the agent writes the count after
    // the addresses, so this is only ever a moment).
    f.dp.maps.set_quarantine(PEER_B, 0).unwrap();
    assert_eq!(run(&mut f, program_names::FROM_POD, &to_b, DropReason::Forwarded), TC_ACT_OK);
    f.dp.maps.set_quarantine_count(1).unwrap();
    assert_eq!(f.dp.maps.read_state().unwrap().quarantine_count, 1);
    // The tracked flow stops, new ones both ways fail; others are untouched.
    assert_eq!(run(&mut f, program_names::FROM_POD, &to_b, DropReason::Quarantined), TC_ACT_SHOT);
    assert_eq!(run(&mut f, program_names::TO_POD, &from_b, DropReason::Quarantined), TC_ACT_SHOT);
    let to_a = tcp(POD_MAC, POD, 40001, PEER_A, 80);
    assert_eq!(run(&mut f, program_names::FROM_POD, &to_a, DropReason::Forwarded), TC_ACT_OK);
    let records = verdicts(&mut f);
    let dropped: Vec<_> = records.iter().filter(|r| r.0 == verdict::DROPPED).collect();
    assert_eq!(dropped.len(), 2, "{records:?}");
    assert!(dropped.iter().all(|r| r.1 == DropReason::Quarantined as u8), "{records:?}");
    // Released: forwarded again.
    f.dp.maps.remove_quarantine(PEER_B).unwrap();
    f.dp.maps.set_quarantine_count(0).unwrap();
    assert!(f.dp.maps.read_state().unwrap().quarantine.is_empty());
    assert_eq!(run(&mut f, program_names::FROM_POD, &to_b, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(run(&mut f, program_names::TO_POD, &from_b, DropReason::Forwarded), TC_ACT_OK);
}

/// A TCP segment with `flags` and `payload` bytes of data, in either direction (the MACs
/// follow the sender: the pod's own, or the host's towards it).
fn segment(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8, payload: usize) -> Vec<u8> {
    let (dst_mac, src_mac) = if src == POD { (HOST_MAC, POD_MAC) } else { (POD_MAC, HOST_MAC) };
    let mut l4 = ports(sport, dport, 20 + payload);
    l4[12] = 0x50;
    l4[13] = flags;
    eth(dst_mac, src_mac, 0x0800, &ipv4(src, dst, proto::TCP, 0, &l4))
}

/// A UDP datagram of `payload` bytes, in either direction.
fn datagram(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: usize) -> Vec<u8> {
    let (dst_mac, src_mac) = if src == POD { (HOST_MAC, POD_MAC) } else { (POD_MAC, HOST_MAC) };
    eth(
        dst_mac,
        src_mac,
        0x0800,
        &ipv4(src, dst, proto::UDP, 0, &ports(sport, dport, 8 + payload)),
    )
}

/// What a packet adds to its connection's count: its bytes past the Ethernet header.
fn counted(packet: &[u8]) -> u64 {
    packet.len() as u64 - 14
}

/// The conntrack key of a connection `from` opened to `to`, at the endpoint's `dir`.
fn opened(from: (Ipv4Addr, u16), to: (Ipv4Addr, u16), protocol: u8, dir: u8) -> bulkhead_common::CtKey {
    bulkhead_common::CtKey {
        saddr: from.0.octets(),
        daddr: to.0.octets(),
        sport: from.1.to_be_bytes(),
        dport: to.1.to_be_bytes(),
        protocol,
        direction: dir,
        _pad: [0; 2],
    }
}

/// The counts of `key`'s entry in the endpoint's table.
fn counts(f: &Fixture, key: &bulkhead_common::CtKey) -> (u64, u64) {
    let e = ct_entry(f, key).expect("tracked");
    (e.to_destination, e.to_source)
}

const FIN: u8 = 0x01;
const RST: u8 = 0x04;

#[test]
fn a_tcp_connection_counts_its_bytes_both_ways_and_reports_them_once_at_its_fin() {
    use bulkhead_common::flow_kind;
    let mut f = fixture("bytes-tcp", ISOLATED);
    let key = opened((POD, 40100), (PEER_A, 80), proto::TCP, direction::EGRESS);
    let fwd = |flags, payload| segment(POD, 40100, PEER_A, 80, flags, payload);
    let back = |flags, payload| segment(PEER_A, 80, POD, 40100, flags, payload);
    // The handshake, then data both ways in sizes of their own; the first packet counts too.
    let sent = [fwd(SYN, 0), fwd(ACK, 0), fwd(ACK, 700), fwd(ACK, 1400), fwd(ACK, 3)];
    let got = [back(SYN | ACK, 0), back(ACK, 1200), back(ACK, 90)];
    assert_eq!(run(&mut f, program_names::FROM_POD, &sent[0], DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(counts(&f, &key), (counted(&sent[0]), 0), "the SYN counts");
    assert_eq!(run(&mut f, program_names::TO_POD, &got[0], DropReason::Forwarded), TC_ACT_OK);
    for p in &sent[1..] {
        assert_eq!(run(&mut f, program_names::FROM_POD, p, DropReason::Forwarded), TC_ACT_OK);
    }
    for p in &got[1..] {
        assert_eq!(run(&mut f, program_names::TO_POD, p, DropReason::Forwarded), TC_ACT_OK);
    }
    let to_destination: u64 = sent.iter().map(|p| counted(p)).sum();
    let to_source: u64 = got.iter().map(|p| counted(p)).sum();
    assert_eq!(counts(&f, &key), (to_destination, to_source));
    // Only the new flow's record: established packets make none.
    let records = f.drain();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].kind, flow_kind::PACKET);
    assert_eq!((records[0].to_destination, records[0].to_source), (0, 0));

    // A repeated SYN on the live connection (a retransmission) keeps its counts.
    assert_eq!(run(&mut f, program_names::FROM_POD, &sent[0], DropReason::Forwarded), TC_ACT_OK);
    let to_destination = to_destination + counted(&sent[0]);
    assert_eq!(counts(&f, &key), (to_destination, to_source));
    assert_eq!(f.drain().len(), 1, "its packet record, as before");

    // The peer's FIN ends it: one End record with the final counts, FIN included, on the
    // connection's own tuple (the pod opened it) and its rule.
    let fin = back(FIN | ACK, 10);
    assert_eq!(run(&mut f, program_names::TO_POD, &fin, DropReason::Forwarded), TC_ACT_OK);
    let to_source = to_source + counted(&fin);
    let records = f.drain();
    assert_eq!(records.len(), 1, "{records:?}");
    let end = records[0];
    assert_eq!(end.kind, flow_kind::END);
    assert_eq!((end.to_destination, end.to_source), (to_destination, to_source));
    assert_eq!((end.saddr, end.daddr), (POD.octets(), PEER_A.octets()));
    assert_eq!((u16::from_be_bytes(end.sport), u16::from_be_bytes(end.dport)), (40100, 80));
    assert_eq!((end.direction, end.protocol, end.rule_id), (direction::EGRESS, proto::TCP, 7));
    assert_eq!((end.endpoint_id, end.identity, end.remote_identity), (10, 300, 301));
    assert_eq!((end.verdict, end.reason, end.service_id), (verdict::FORWARDED, 0, 0));
    assert_eq!(end.tcp_flags, FIN | ACK);
    assert_eq!(end.packet_len as usize, fin.len());
    // The rest of the close is counted, but ends nothing again.
    let last = [fwd(FIN | ACK, 0), fwd(ACK, 0)];
    for p in &last {
        assert_eq!(run(&mut f, program_names::FROM_POD, p, DropReason::Forwarded), TC_ACT_OK);
    }
    let rst = back(RST, 0);
    assert_eq!(run(&mut f, program_names::TO_POD, &rst, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(f.drain(), vec![], "one End per connection");
    assert_eq!(
        counts(&f, &key),
        (
            to_destination + last.iter().map(|p| counted(p)).sum::<u64>(),
            to_source + counted(&rst)
        )
    );
    // A SYN on the closing tuple is a new connection: counts start afresh.
    assert_eq!(run(&mut f, program_names::FROM_POD, &sent[0], DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(counts(&f, &key), (counted(&sent[0]), 0));
    assert_eq!(f.dp.flows_lost().unwrap(), 0);
}

#[test]
fn a_busy_connection_reports_its_counts_once_per_interval() {
    use bulkhead_common::{flow_kind, FLOW_BYTES_REPORT_NS};
    let mut f = fixture("bytes-update", ISOLATED);
    // UDP the peer opened to the pod (ingress, rule 8), replies from the pod.
    let key = opened((PEER_A, 5300), (POD, 53), proto::UDP, direction::INGRESS);
    let query = datagram(PEER_A, 5300, POD, 53, 40);
    let answer = datagram(POD, 53, PEER_A, 5300, 300);
    assert_eq!(run(&mut f, program_names::TO_POD, &query, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(run_repeat(&mut f, program_names::TO_POD, &query, 9), TC_ACT_OK);
    assert_eq!(run_repeat(&mut f, program_names::FROM_POD, &answer, 10), TC_ACT_OK);
    assert_eq!(counts(&f, &key), (10 * counted(&query), 10 * counted(&answer)));
    assert_eq!(f.drain().len(), 1, "the new flow's record only");

    // Past the interval, the next packet (a reply here) reports the counts, once.
    std::thread::sleep(std::time::Duration::from_nanos(FLOW_BYTES_REPORT_NS + 100_000_000));
    assert_eq!(run_repeat(&mut f, program_names::FROM_POD, &answer, 5), TC_ACT_OK);
    let records = f.drain();
    assert_eq!(records.len(), 1, "{records:?}");
    let u = records[0];
    assert_eq!(u.kind, flow_kind::UPDATE);
    assert_eq!((u.to_destination, u.to_source), (10 * counted(&query), 11 * counted(&answer)));
    assert_eq!((u.saddr, u.daddr), (PEER_A.octets(), POD.octets()), "the opener is the source");
    assert_eq!((u16::from_be_bytes(u.sport), u16::from_be_bytes(u.dport)), (5300, 53));
    assert_eq!(
        (u.direction, u.protocol, u.rule_id, u.remote_identity),
        (direction::INGRESS, proto::UDP, 8, 301)
    );
    assert_eq!(u.verdict, verdict::FORWARDED);
    let reported = ct_entry(&f, &key).unwrap().reported_ns;
    assert!(reported > 0);
    assert_eq!(counts(&f, &key), (10 * counted(&query), 15 * counted(&answer)));

    // The opener's packet after a second idle goes back to policy (a datagram flow's
    // recheck): still allowed, it keeps the entry's counts and its report time.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(run(&mut f, program_names::TO_POD, &query, DropReason::Forwarded), TC_ACT_OK);
    assert_eq!(counts(&f, &key), (11 * counted(&query), 15 * counted(&answer)));
    assert_eq!(ct_entry(&f, &key).unwrap().reported_ns, reported);
    assert_eq!(f.drain(), vec![], "no new flow, no report before the interval");
    assert_eq!(f.dp.flows_lost().unwrap(), 0);
}

/// Byte reports spend only the upper half of their endpoint's flow-record budget: with the
/// bucket down to the reserve, a connection's End is suppressed (and counted), while a drop
/// after it still gets its record.
#[test]
fn byte_reports_leave_the_budgets_reserve_to_drops() {
    use aya::maps::{PerCpuHashMap, PerCpuValues};
    use bulkhead_common::{flow_kind, map_names, FlowBudget};
    let mut f = fixture("bytes-budget", ISOLATED);
    let cpus = aya::util::nr_cpus().expect("possible cpus");
    let pin = f.pin_dir.join(map_names::FLOW_BUDGET);
    let open = || -> PerCpuHashMap<MapData, u32, FlowBudget> {
        let data = MapData::from_pin(&pin).unwrap();
        PerCpuHashMap::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap()
    };
    // Every CPU's bucket holds exactly the reserve, and its last refill lies ahead (no refill).
    let low = FlowBudget {
        credit_ns: FlowBudget::REPORT_RESERVE_NS,
        last_ns: u64::MAX / 2,
        suppressed: 0,
    };
    open().insert(10, PerCpuValues::try_from(vec![low; cpus]).unwrap(), 0).unwrap();
    let syn = segment(POD, 40200, PEER_A, 80, SYN, 0);
    assert_eq!(run(&mut f, program_names::FROM_POD, &syn, DropReason::Forwarded), TC_ACT_OK);
    let fin = segment(PEER_A, 80, POD, 40200, FIN | ACK, 0);
    assert_eq!(run(&mut f, program_names::TO_POD, &fin, DropReason::Forwarded), TC_ACT_OK);
    let denied = segment(PEER_B, 999, POD, 22, SYN, 0);
    assert_eq!(run(&mut f, program_names::TO_POD, &denied, DropReason::PolicyDenied), TC_ACT_SHOT);
    let records = f.drain();
    let kinds: Vec<(u8, u8)> = records.iter().map(|r| (r.kind, r.verdict)).collect();
    assert_eq!(
        kinds,
        [(flow_kind::PACKET, verdict::FORWARDED), (flow_kind::PACKET, verdict::DROPPED)],
        "the new flow and the drop, not the End"
    );
    let suppressed: u64 = open().get(&10, 0).unwrap().iter().map(|b| b.suppressed).sum();
    assert_eq!(suppressed, 1, "the End, counted as suppressed");
    assert_ne!(
        ct_entry(&f, &opened((POD, 40200), (PEER_A, 80), proto::TCP, direction::EGRESS))
            .unwrap()
            .flags
            & bulkhead_common::ct_flags::CLOSING,
        0,
        "closing all the same"
    );
}
