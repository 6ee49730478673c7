//! ClusterIP translation in the real TC programs on crafted packets (`BPF_PROG_TEST_RUN`):
//! the packet that comes out, its checksums, conntrack and the translation records, egress
//! policy on the backend, the spread over backends, affinity and the no-backend drop.
//!
//! Test runs put the packet on `lo` (ifindex 1), so the client pod is the endpoint keyed 1.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use aya::maps::{HashMap, Map, MapData, RingBuf};
use aya::programs::{TestRun, TestRunOptions};
use bulkhead::datapath::{Datapath, DatapathState};
use bulkhead_common::{
    ct_flags, direction, endpoint_flags, map_names, program_names, proto, service_flags, verdict, Backend, CtEntry, CtKey, DropReason,
    EndpointInfo, FlowEvent, IpcacheValue, LbNat, PolicyKey, PolicyValue, RevNat, ServiceKey, ServiceValue, POLICY_PREFIX_FULL,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const LO: u32 = 1;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT_EP: u32 = 10;
/// Backends 1..=3: 10.0.1.<id>, identity 400 + id, target port 8080 (TCP) or 5353 (UDP).
const TARGET_PORT: u16 = 8080;
const UDP_TARGET_PORT: u16 = 5353;
/// A TCP Service port on one backend (1), allowed by egress policy.
const VIP_ONE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A TCP Service port on one backend (2), which egress policy does not allow.
const VIP_DENIED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
/// A TCP Service port on backends 1, 2, 3.
const VIP_THREE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
/// As VIP_THREE, with ClientIP affinity.
const VIP_STICKY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
/// A TCP and a UDP Service port without backends.
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const SERVICE_PORT: u16 = 80;
const DNS_PORT: u16 = 53;
/// SCTP (Diameter): VIP_ONE's goes to backend 1 on the same port; VIP_THREE's names a
/// backend whose port differs, which the datapath cannot translate.
const SCTP_PORT: u16 = 3868;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn backend_ip(id: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, id as u8)
}

/// The Service table the agent would compile: header and slots per Service port.
fn services() -> DatapathState {
    let mut s = DatapathState::default();
    let mut port = |vip: Ipv4Addr, port: u16, protocol: u8, id: u32, backends: &[u32], flags: u8| {
        let header = ServiceValue {
            backend_count: backends.len() as u16,
            flags,
            affinity_timeout_s: 10_800,
            service_id: id,
            ..Default::default()
        };
        s.services.insert(ServiceKey::new(vip.octets(), port, protocol, 0), header);
        let rev = RevNat {
            vip: vip.octets(),
            port: port.to_be_bytes(),
            _pad: [0; 2],
        };
        s.rev_nat.insert(id, rev);
        for (i, &b) in backends.iter().enumerate() {
            let slot = ServiceValue {
                backend_id: b,
                service_id: id,
                ..Default::default()
            };
            s.services.insert(ServiceKey::new(vip.octets(), port, protocol, i as u16 + 1), slot);
        }
    };
    port(VIP_ONE, SERVICE_PORT, proto::TCP, 1, &[1], 0);
    port(VIP_EMPTY, SERVICE_PORT, proto::TCP, 2, &[], 0);
    port(VIP_DENIED, SERVICE_PORT, proto::TCP, 3, &[2], 0);
    port(VIP_THREE, SERVICE_PORT, proto::TCP, 4, &[1, 2, 3], 0);
    port(
        VIP_STICKY,
        SERVICE_PORT,
        proto::TCP,
        5,
        &[1, 2, 3],
        service_flags::AFFINITY_CLIENT_IP,
    );
    // UDP on the same VIP as TCP: the protocol is part of the key. Backends 11.. are the UDP
    // target ports of the same pods.
    port(VIP_ONE, DNS_PORT, proto::UDP, 6, &[11], 0);
    port(VIP_EMPTY, DNS_PORT, proto::UDP, 7, &[], 0);
    port(VIP_ONE, SCTP_PORT, proto::SCTP, 8, &[21], 0);
    port(VIP_THREE, SCTP_PORT, proto::SCTP, 9, &[22], 0);
    for id in 1..=3u32 {
        let tcp = Backend {
            ip: backend_ip(id).octets(),
            port: TARGET_PORT.to_be_bytes(),
            ..Default::default()
        };
        s.backends.insert(id, tcp);
        let udp = Backend {
            port: UDP_TARGET_PORT.to_be_bytes(),
            ..tcp
        };
        s.backends.insert(10 + id, udp);
    }
    for (id, port) in [(21, SCTP_PORT), (22, SCTP_PORT + 1)] {
        let sctp = Backend {
            ip: backend_ip(id - 20).octets(),
            port: port.to_be_bytes(),
            ..Default::default()
        };
        s.backends.insert(id, sctp);
    }
    s
}

/// A loaded datapath with its maps pinned in a directory of its own, removed on drop.
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

/// The client pod at `lo` with `flags`, backends 1..=3 in the ipcache, egress to backend 1
/// on TCP/8080, UDP/5353 and SCTP/3868 allowed (rules 7, 8, 9), and [`services`].
fn fixture(name: &str, flags: u32) -> Fixture {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bulkhead-test-{}-svc-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let mut dp = Datapath::load(&pin_dir).unwrap_or_else(|e| {
        let _ = std::fs::remove_dir_all(&pin_dir);
        panic!("load datapath (needs root and BPF): {e:?}")
    });
    let flows = dp.take_flow_ring().expect("flow ring");
    let mut f = Fixture { dp, flows, pin_dir };
    let mut state = services();
    for id in 1..=3u32 {
        state.ipcache.insert(
            (backend_ip(id), 32),
            IpcacheValue {
                identity: 400 + id,
                flags: 0,
            },
        );
    }
    for (protocol, port, rule) in [
        (proto::TCP, TARGET_PORT, 7),
        (proto::UDP, UDP_TARGET_PORT, 8),
        (proto::SCTP, SCTP_PORT, 9),
    ] {
        state.policy.insert(
            (
                PolicyKey::new(CLIENT_EP, 401, direction::EGRESS, protocol, port),
                POLICY_PREFIX_FULL,
            ),
            PolicyValue { rule_id: rule, flags: 0 },
        );
    }
    state.endpoints.insert(
        LO,
        EndpointInfo {
            endpoint_id: CLIENT_EP,
            identity: 300,
            ipv4: CLIENT.octets(),
            flags,
            mac: CLIENT_MAC,
            _pad: [0; 2],
        },
    );
    bulkhead::datapath::sync::sync(&mut f.dp.maps, &DatapathState::default(), &state).unwrap();
    assert_eq!(f.dp.maps.read_state().unwrap(), state, "read back");
    f
}

/// The ones' complement sum of `data` (RFC 1071), folded, not inverted.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        acc += u32::from(word);
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4_len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, protocol]);
    p.extend_from_slice(&(l4_len as u16).to_be_bytes());
    sum16(&p, 0)
}

/// An Ethernet + IPv4 frame with valid IP and L4 checksums; `l4` with its checksum field
/// zero at `check_off` (None: leave the L4 checksum as given).
fn frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    mut l4: Vec<u8>,
    check_off: Option<usize>,
) -> Vec<u8> {
    if let Some(off) = check_off {
        let sum = sum16(&l4, pseudo_sum(src, dst, protocol, l4.len()));
        l4[off..off + 2].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    }
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let check = !(sum16(&ip, 0) as u16);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    let mut p = Vec::new();
    p.extend_from_slice(&dst_mac);
    p.extend_from_slice(&src_mac);
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&l4);
    p.resize(p.len().max(60), 0);
    p
}

fn tcp_l4(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    tcp_segment(sport, dport, flags, 0x1234, 0)
}

/// A TCP header with sequence number `seq`, acknowledgment number `ack`, then 5 bytes of data.
fn tcp_segment(sport: u16, dport: u16, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(&ack.to_be_bytes());
    l4.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    l4.extend_from_slice(b"hello");
    l4
}

/// A TCP segment the client sends (at its `from_pod`).
fn client_tcp(sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    frame(HOST_MAC, CLIENT_MAC, CLIENT, dst, proto::TCP, tcp_l4(sport, dport, flags), Some(16))
}

/// A TCP segment from `src` to the client (at its `to_pod`).
fn to_client_tcp(src: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    frame(CLIENT_MAC, HOST_MAC, src, CLIENT, proto::TCP, tcp_l4(sport, dport, flags), Some(16))
}

fn udp_l4(sport: u16, dport: u16) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&[0, 13, 0, 0]);
    l4.extend_from_slice(b"query");
    l4
}

/// What a test run did to a packet.
struct Out {
    packet: Vec<u8>,
    duration: Duration,
}

impl Out {
    fn ip(&self) -> &[u8] {
        let total = usize::from(u16::from_be_bytes([self.packet[16], self.packet[17]]));
        &self.packet[14..14 + total]
    }
    fn src(&self) -> (Ipv4Addr, u16) {
        let ip = self.ip();
        (Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), u16::from_be_bytes([ip[20], ip[21]]))
    }
    fn dst(&self) -> (Ipv4Addr, u16) {
        let ip = self.ip();
        (Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]), u16::from_be_bytes([ip[22], ip[23]]))
    }
    /// Recomputes the IPv4 header checksum and the L4 checksum over the pseudo-header: both
    /// must sum to 0xffff. A UDP checksum of 0 (none) is reported as such.
    fn assert_checksums(&self) {
        let ip = self.ip();
        assert_eq!(sum16(&ip[..20], 0), 0xffff, "IPv4 header checksum of {:02x?}", &ip[..20]);
        let (src, dst) = (self.src().0, self.dst().0);
        let l4 = &ip[20..];
        assert_eq!(
            sum16(l4, pseudo_sum(src, dst, ip[9], l4.len())),
            0xffff,
            "L4 checksum (protocol {}) of {:02x?}",
            ip[9],
            l4
        );
    }
}

impl Fixture {
    /// Runs `program` on `packet` `repeat` times; checks that exactly the counter of `reason`
    /// moved, by `repeat` packets.
    fn run_n(&mut self, program: &'static str, packet: &[u8], reason: DropReason, repeat: u32) -> Out {
        let want = if reason == DropReason::Forwarded { TC_ACT_OK } else { TC_ACT_SHOT };
        self.run_full(program, packet, reason, repeat, want, 0)
    }

    /// As [`Fixture::run_n`], expecting TC action `want`, with the skb mark set to `mark`.
    fn run_full(&mut self, program: &'static str, packet: &[u8], reason: DropReason, repeat: u32, want: u32, mark: u32) -> Out {
        // struct __sk_buff { __u32 len; __u32 pkt_type; __u32 mark; ... }: only mark set
        // (test runs reject non-zero fields they do not copy; mark is copied).
        let mut ctx = [0u8; 12];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        let dir = if program == program_names::FROM_POD {
            direction::EGRESS
        } else {
            direction::INGRESS
        };
        let before = self.dp.counters().unwrap();
        let mut out = vec![0u8; packet.len() + 256];
        let result = self
            .dp
            .program(program)
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: (mark != 0).then_some(&ctx[..]),
                repeat,
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        let after = self.dp.counters().unwrap();
        let moved: Vec<_> = after
            .iter()
            .filter_map(|(r, d, c)| {
                let b = before
                    .iter()
                    .find(|(br, bd, _)| br == r && bd == d)
                    .map_or(0, |(_, _, b)| b.packets);
                (c.packets != b).then_some((*r, *d, c.packets - b))
            })
            .collect();
        assert_eq!(moved, vec![(reason, dir, u64::from(repeat))], "{program}: counters that moved");
        assert_eq!(result.return_value, want, "{program}: action");
        Out {
            packet: out,
            duration: result.duration,
        }
    }

    fn run(&mut self, program: &'static str, packet: &[u8], reason: DropReason) -> Out {
        self.run_n(program, packet, reason, 1)
    }

    fn drain(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.flows.next() {
            assert_eq!(item.len(), std::mem::size_of::<FlowEvent>(), "record size");
            // SAFETY: FlowEvent is plain old data and the length was checked above.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
        }
        out
    }

    /// A pinned map of the running datapath, opened as the agent's readers do.
    fn pinned<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> HashMap<MapData, K, V> {
        let map = Map::from_map_data(MapData::from_pin(self.pin_dir.join(name)).unwrap()).unwrap();
        HashMap::try_from(map).unwrap()
    }

    /// The client endpoint's conntrack table (each endpoint has its own: issue 12.4).
    fn conntrack(&self) -> HashMap<MapData, CtKey, CtEntry> {
        let outer = Map::from_map_data(MapData::from_pin(self.pin_dir.join(map_names::CONNTRACK)).unwrap()).unwrap();
        let tables = bulkhead::datapath::conntrack::Tables::try_from(outer).unwrap();
        bulkhead::datapath::conntrack::table(&tables, CLIENT_EP).unwrap()
    }
}

fn ct_key(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16, protocol: u8, dir: u8) -> CtKey {
    CtKey {
        saddr: saddr.octets(),
        daddr: daddr.octets(),
        sport: sport.to_be_bytes(),
        dport: dport.to_be_bytes(),
        protocol,
        direction: dir,
        _pad: [0; 2],
    }
}

const ISOLATED: u32 = endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS;

#[test]
fn a_syn_to_a_vip_goes_to_its_backend_and_the_reply_comes_back_from_the_vip() {
    let mut f = fixture("tcp", ISOLATED);
    let out = f.run(
        program_names::FROM_POD,
        &client_tcp(40000, VIP_ONE, SERVICE_PORT, SYN),
        DropReason::Forwarded,
    );
    assert_eq!(out.dst(), (backend_ip(1), TARGET_PORT), "translated destination");
    assert_eq!(out.src(), (CLIENT, 40000), "source untouched");
    out.assert_checksums();
    // Egress policy decided on the backend: its identity and target port, rule 7.
    let records = f.drain();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        (records[0].remote_identity, records[0].rule_id, records[0].verdict),
        (401, 7, verdict::FORWARDED)
    );
    assert_eq!(
        (records[0].daddr, records[0].dport),
        (backend_ip(1).octets(), TARGET_PORT.to_be_bytes())
    );

    // Conntrack holds the backend tuple, marked as a Service flow with the Service port's
    // reverse-NAT index; the translation record holds the backend, keyed by the VIP tuple;
    // no per-connection reverse record exists.
    let ct = f.conntrack();
    let fwd = ct_key(CLIENT, 40000, backend_ip(1), TARGET_PORT, proto::TCP, direction::EGRESS);
    let entry = ct.get(&fwd, 0).expect("conntrack entry on the backend tuple");
    assert_eq!(entry.rule_id, 7);
    assert_ne!(entry.flags & ct_flags::SERVICE, 0, "service flag");
    assert_eq!(ct_flags::rev_nat_index(entry.flags), 1, "reverse-NAT index: service id 1");
    let nat = f.pinned::<CtKey, LbNat>(map_names::LB_NAT);
    let to_backend = nat
        .get(&ct_key(CLIENT, 40000, VIP_ONE, SERVICE_PORT, proto::TCP, direction::EGRESS), 0)
        .unwrap();
    assert_eq!(
        (to_backend.addr, to_backend.port, to_backend.backend_id, to_backend.service_id),
        (backend_ip(1).octets(), TARGET_PORT.to_be_bytes(), 1, 1)
    );
    assert_eq!(nat.keys().count(), 1, "one translation record per connection");

    // The next packet of the flow: same backend, no new flow record.
    let out = f.run(
        program_names::FROM_POD,
        &client_tcp(40000, VIP_ONE, SERVICE_PORT, ACK),
        DropReason::Forwarded,
    );
    assert_eq!(out.dst(), (backend_ip(1), TARGET_PORT));
    out.assert_checksums();

    // The backend's reply at the client's to_pod: source back to VIP:port, checksums valid,
    // admitted as a reply (no ingress rule allows backend 1 in).
    let out = f.run(
        program_names::TO_POD,
        &to_client_tcp(backend_ip(1), TARGET_PORT, 40000, SYN | ACK),
        DropReason::Forwarded,
    );
    assert_eq!(out.src(), (VIP_ONE, SERVICE_PORT), "reply source restored");
    assert_eq!(out.dst(), (CLIENT, 40000));
    out.assert_checksums();
    assert!(f.drain().is_empty(), "established packets make no records");

    // A packet from the backend that belongs to no connection is not rewritten (and is
    // decided by ingress policy: denied).
    f.run(
        program_names::TO_POD,
        &to_client_tcp(backend_ip(1), TARGET_PORT, 40001, SYN | ACK),
        DropReason::PolicyDenied,
    );
}

/// The id the fixture's Service table gives the Service port `vip:port/protocol`.
fn service_id(vip: Ipv4Addr, port: u16, protocol: u8) -> u16 {
    let id = services().services[&ServiceKey::new(vip.octets(), port, protocol, 0)].service_id;
    u16::try_from(id).unwrap()
}

#[test]
fn flow_records_name_the_service_port_a_translated_flow_was_sent_to() {
    let mut f = fixture("flow-service", ISOLATED);
    f.run(
        program_names::FROM_POD,
        &client_tcp(40000, VIP_ONE, SERVICE_PORT, SYN),
        DropReason::Forwarded,
    );
    f.run(
        program_names::FROM_POD,
        &client_tcp(40001, VIP_DENIED, SERVICE_PORT, SYN),
        DropReason::PolicyDenied,
    );
    f.run_full(
        program_names::FROM_POD,
        &client_tcp(40002, VIP_EMPTY, SERVICE_PORT, SYN),
        DropReason::NoServiceBackend,
        1,
        TC_ACT_REDIRECT,
        0,
    );
    let query = frame(HOST_MAC, CLIENT_MAC, CLIENT, VIP_ONE, proto::UDP, udp_l4(41000, DNS_PORT), Some(6));
    f.run(program_names::FROM_POD, &query, DropReason::Forwarded);
    // The same backend dialled directly is no Service flow.
    f.run(
        program_names::FROM_POD,
        &client_tcp(40003, backend_ip(1), TARGET_PORT, SYN),
        DropReason::Forwarded,
    );
    let got: Vec<_> = f
        .drain()
        .iter()
        .map(|r| (u16::from_be_bytes(r.sport), r.reason, Ipv4Addr::from(r.daddr), r.service_id))
        .collect();
    let (forwarded, denied, no_backend) = (
        DropReason::Forwarded as u8,
        DropReason::PolicyDenied as u8,
        DropReason::NoServiceBackend as u8,
    );
    assert_eq!(
        got,
        [
            (40000, forwarded, backend_ip(1), service_id(VIP_ONE, SERVICE_PORT, proto::TCP)),
            (40001, denied, backend_ip(2), service_id(VIP_DENIED, SERVICE_PORT, proto::TCP)),
            (40002, no_backend, VIP_EMPTY, service_id(VIP_EMPTY, SERVICE_PORT, proto::TCP)),
            (41000, forwarded, backend_ip(1), service_id(VIP_ONE, DNS_PORT, proto::UDP)),
            (40003, forwarded, backend_ip(1), 0),
        ]
    );
    assert!(got[..4].iter().all(|r| r.3 != 0), "every Service port has an id");
}

#[test]
fn egress_policy_that_allows_another_pod_drops_the_connection_to_the_backend() {
    let mut f = fixture("denied", ISOLATED);
    f.run(
        program_names::FROM_POD,
        &client_tcp(40000, VIP_DENIED, SERVICE_PORT, SYN),
        DropReason::PolicyDenied,
    );
    let records = f.drain();
    assert_eq!(records.len(), 1);
    let r = records[0];
    assert_eq!(
        (r.reason, r.remote_identity),
        (DropReason::PolicyDenied as u8, 402),
        "decided on backend 2"
    );
    assert_eq!((r.daddr, r.dport), (backend_ip(2).octets(), TARGET_PORT.to_be_bytes()));
    // Nothing recorded for a denied connection.
    assert_eq!(f.conntrack().keys().count(), 0);
    let nat = f.pinned::<CtKey, LbNat>(map_names::LB_NAT);
    assert!(nat
        .get(&ct_key(CLIENT, 40000, VIP_DENIED, SERVICE_PORT, proto::TCP, direction::EGRESS), 0)
        .is_err());
}

#[test]
fn new_connections_spread_over_every_backend_and_each_keeps_its_own() {
    let mut f = fixture("spread", 0);
    let mut hits: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
    let mut chosen = Vec::new();
    for sport in 30000..30300u16 {
        let out = f.run(
            program_names::FROM_POD,
            &client_tcp(sport, VIP_THREE, SERVICE_PORT, SYN),
            DropReason::Forwarded,
        );
        out.assert_checksums();
        let (ip, port) = out.dst();
        assert_eq!(port, TARGET_PORT);
        *hits.entry(ip).or_default() += 1;
        chosen.push((sport, ip));
    }
    assert_eq!(
        hits.keys().copied().collect::<Vec<_>>(),
        [backend_ip(1), backend_ip(2), backend_ip(3)]
    );
    assert!(hits.values().all(|&n| n >= 60), "300 connections over 3 backends: {hits:?}");
    // Later packets of each connection go where its first one went.
    for &(sport, ip) in chosen.iter().step_by(7) {
        let out = f.run(
            program_names::FROM_POD,
            &client_tcp(sport, VIP_THREE, SERVICE_PORT, ACK),
            DropReason::Forwarded,
        );
        assert_eq!(out.dst().0, ip, "connection from port {sport}");
    }
}

/// Opens connections to VIP_THREE from source ports `first..first + 300` until each of its
/// three backends has one: backend address → the source port of its first connection.
fn one_connection_per_backend(f: &mut Fixture, first: u16) -> BTreeMap<Ipv4Addr, u16> {
    let mut open: BTreeMap<Ipv4Addr, u16> = BTreeMap::new();
    for sport in first..first + 300 {
        let out = f.run(
            program_names::FROM_POD,
            &client_tcp(sport, VIP_THREE, SERVICE_PORT, SYN),
            DropReason::Forwarded,
        );
        open.entry(out.dst().0).or_insert(sport);
    }
    assert_eq!(open.len(), 3);
    open
}

#[test]
fn a_removed_backend_gets_no_new_connection_and_the_others_keep_theirs() {
    let mut f = fixture("churn", 0);
    let before = f.dp.maps.read_state().unwrap();
    // Open connections until each backend has one.
    let open = one_connection_per_backend(&mut f, 32000);
    // Backend 2 leaves VIP_THREE as the compiler would write it: backend 3 moves into slot
    // 2, the count drops to 2 (backend 2 stays: VIP_DENIED still names it).
    let mut after = before.clone();
    let three = |slot| ServiceKey::new(VIP_THREE.octets(), SERVICE_PORT, proto::TCP, slot);
    after.services.get_mut(&three(0)).unwrap().backend_count = 2;
    after.services.get_mut(&three(2)).unwrap().backend_id = 3;
    after.services.remove(&three(3));
    bulkhead::datapath::sync::sync(&mut f.dp.maps, &before, &after).unwrap();
    assert_eq!(f.dp.maps.read_state().unwrap(), after);
    for sport in 33000..33200u16 {
        let out = f.run(
            program_names::FROM_POD,
            &client_tcp(sport, VIP_THREE, SERVICE_PORT, SYN),
            DropReason::Forwarded,
        );
        assert_ne!(
            out.dst().0,
            backend_ip(2),
            "new connection from port {sport} to the removed backend"
        );
    }
    // Established connections to the remaining backends keep them.
    for ip in [backend_ip(1), backend_ip(3)] {
        let out = f.run(
            program_names::FROM_POD,
            &client_tcp(open[&ip], VIP_THREE, SERVICE_PORT, ACK),
            DropReason::Forwarded,
        );
        assert_eq!(out.dst().0, ip);
    }
}

#[test]
fn client_ip_affinity_holds_a_client_to_one_backend() {
    let mut f = fixture("sticky", 0);
    let mut seen = std::collections::BTreeSet::new();
    for sport in 31000..31050u16 {
        let out = f.run(
            program_names::FROM_POD,
            &client_tcp(sport, VIP_STICKY, SERVICE_PORT, SYN),
            DropReason::Forwarded,
        );
        seen.insert(out.dst());
    }
    assert_eq!(seen.len(), 1, "50 connections with ClientIP affinity: {seen:?}");
}

#[test]
fn a_service_port_without_backends_refuses_with_an_rst_counted_as_no_service_backend() {
    let mut f = fixture("empty", ISOLATED);
    let syn = client_tcp(40000, VIP_EMPTY, SERVICE_PORT, SYN);
    let out = f.run_full(program_names::FROM_POD, &syn, DropReason::NoServiceBackend, 1, TC_ACT_REDIRECT, 0);
    let records = f.drain();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].reason, records[0].verdict),
        (DropReason::NoServiceBackend as u8, verdict::DROPPED)
    );
    assert_eq!(
        (records[0].daddr, records[0].dport),
        (VIP_EMPTY.octets(), SERVICE_PORT.to_be_bytes())
    );
    assert_eq!(DropReason::NoServiceBackend as u32, 10);
    assert_eq!(DropReason::NoServiceBackend.name(), "no_service_backend");
    // What goes back to the pod: the VIP's RST|ACK for the SYN (seq 0, ack = the SYN's
    // seq 0x1234 + 1 + 5 bytes of payload), to the pod's MAC, checksums valid.
    assert_eq!(&out.packet[..6], &CLIENT_MAC, "to the pod");
    assert_eq!(&out.packet[6..12], &HOST_MAC);
    assert_eq!(out.src(), (VIP_EMPTY, SERVICE_PORT));
    assert_eq!(out.dst(), (CLIENT, 40000));
    let tcp = &out.ip()[20..];
    assert_eq!(&tcp[4..8], &[0, 0, 0, 0], "seq");
    assert_eq!(u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]), 0x1234 + 1 + 5, "ack");
    assert_eq!(tcp[13], 0x14, "RST|ACK");
    out.assert_checksums();
    // Redirected out of the veth towards the pod, it passes the pod's to_pod quietly
    // (isolated ingress would otherwise deny a packet from the VIP).
    let marked = f.run_full(
        program_names::TO_POD,
        &out.packet,
        DropReason::Forwarded,
        1,
        TC_ACT_OK,
        bulkhead_common::GENERATED_REPLY_MARK,
    );
    assert_eq!(marked.packet, out.packet);
    assert!(f.drain().is_empty());
    // Without the mark (a forged RST from the VIP) it is policy's to decide: denied.
    f.run(program_names::TO_POD, &out.packet, DropReason::PolicyDenied);
    // The mark opens nothing else: the same RST from an address that is no Service port, or
    // a marked packet that is no RST, meets policy like any other.
    let mut not_a_vip = out.packet.clone();
    not_a_vip[26..30].copy_from_slice(&[10, 9, 9, 9]);
    f.run_full(
        program_names::TO_POD,
        &not_a_vip,
        DropReason::PolicyDenied,
        1,
        TC_ACT_SHOT,
        bulkhead_common::GENERATED_REPLY_MARK,
    );
    let mut not_a_reset = out.packet.clone();
    not_a_reset[14 + 20 + 13] = 0x10;
    f.run_full(
        program_names::TO_POD,
        &not_a_reset,
        DropReason::PolicyDenied,
        1,
        TC_ACT_SHOT,
        bulkhead_common::GENERATED_REPLY_MARK,
    );
    // A non-SYN of no connection to the empty port is dropped, not answered.
    f.run(
        program_names::FROM_POD,
        &client_tcp(40000, VIP_EMPTY, SERVICE_PORT, ACK),
        DropReason::NoServiceBackend,
    );
    // Another port of the same address is no Service: the packet goes to policy as before.
    f.run(
        program_names::FROM_POD,
        &client_tcp(40001, VIP_EMPTY, 81, SYN),
        DropReason::PolicyDenied,
    );
}

#[test]
fn udp_services_translate_and_zero_checksums_stay_zero() {
    let mut f = fixture("udp", ISOLATED);
    let query = frame(HOST_MAC, CLIENT_MAC, CLIENT, VIP_ONE, proto::UDP, udp_l4(41000, DNS_PORT), Some(6));
    let out = f.run(program_names::FROM_POD, &query, DropReason::Forwarded);
    assert_eq!(out.dst(), (backend_ip(1), UDP_TARGET_PORT));
    out.assert_checksums();
    let records = f.drain();
    assert_eq!((records[0].remote_identity, records[0].rule_id), (401, 8));
    let mut answer_l4 = udp_l4(UDP_TARGET_PORT, 41000);
    answer_l4.extend_from_slice(b"!");
    answer_l4[5] = 14;
    let answer = frame(CLIENT_MAC, HOST_MAC, backend_ip(1), CLIENT, proto::UDP, answer_l4, Some(6));
    let out = f.run(program_names::TO_POD, &answer, DropReason::Forwarded);
    assert_eq!(out.src(), (VIP_ONE, DNS_PORT));
    out.assert_checksums();

    // A datagram sent without a checksum (0) keeps none.
    let bare = frame(HOST_MAC, CLIENT_MAC, CLIENT, VIP_ONE, proto::UDP, udp_l4(41001, DNS_PORT), None);
    let out = f.run(program_names::FROM_POD, &bare, DropReason::Forwarded);
    assert_eq!(out.dst(), (backend_ip(1), UDP_TARGET_PORT));
    assert_eq!(&out.ip()[26..28], &[0, 0], "UDP checksum stays 'none'");
    assert_eq!(sum16(&out.ip()[..20], 0), 0xffff, "IPv4 header checksum");
}

/// Not a benchmark (those live in bench/), but the per-packet cost the translation adds is
/// worth seeing next to the direct path: `cargo test --test services -- --nocapture cost`.
///
/// One packet per test run: `BPF_PROG_TEST_RUN` runs its repetitions on the same skb, so a
/// repeated translated packet would be the backend's packet from the second run on.
#[test]
fn translation_cost_next_to_the_direct_path() {
    const N: u16 = 2000;
    let mut f = fixture("cost", ISOLATED);
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (mut syn_direct, mut syn_via, mut ack_direct, mut ack_via, mut reply_direct, mut reply_via) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    // Interleaved, so that both paths see the same machine. Every SYN opens a new flow.
    for i in 0..N {
        let (direct, via) = (20000 + i, 40000 + i);
        let run = |f: &mut Fixture, program, packet: Vec<u8>| f.run(program, &packet, DropReason::Forwarded).duration;
        syn_direct.push(run(
            &mut f,
            program_names::FROM_POD,
            client_tcp(direct, backend_ip(1), TARGET_PORT, SYN),
        ));
        syn_via.push(run(&mut f, program_names::FROM_POD, client_tcp(via, VIP_ONE, SERVICE_PORT, SYN)));
        ack_direct.push(run(
            &mut f,
            program_names::FROM_POD,
            client_tcp(direct, backend_ip(1), TARGET_PORT, ACK),
        ));
        ack_via.push(run(&mut f, program_names::FROM_POD, client_tcp(via, VIP_ONE, SERVICE_PORT, ACK)));
        let to_direct = to_client_tcp(backend_ip(1), TARGET_PORT, direct, ACK);
        reply_direct.push(run(&mut f, program_names::TO_POD, to_direct));
        let to_via = to_client_tcp(backend_ip(1), TARGET_PORT, via, ACK);
        let out = f.run(program_names::TO_POD, &to_via, DropReason::Forwarded);
        assert_eq!(out.src(), (VIP_ONE, SERVICE_PORT));
        reply_via.push(out.duration);
    }
    eprintln!(
        "median per packet (one run each, n={N}): new flow direct {:?} / via VIP {:?}; established direct {:?} / via VIP {:?}; reply direct {:?} / restored to VIP {:?}",
        median(syn_direct),
        median(syn_via),
        median(ack_direct),
        median(ack_via),
        median(reply_direct),
        median(reply_via)
    );
}

const TC_ACT_REDIRECT: u32 = 7;

/// A UDP datagram the client sends with `payload` bytes of data and a valid checksum.
fn client_udp(sport: u16, dst: Ipv4Addr, dport: u16, payload: usize) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend((0..payload).map(|i| i as u8));
    frame(HOST_MAC, CLIENT_MAC, CLIENT, dst, proto::UDP, l4, Some(6))
}

impl Out {
    /// Checks that the packet is the VIP's ICMP port unreachable for `original` (a frame the
    /// client sent to `vip`): to the client's MAC, IPv4 without options, type 3 code 3,
    /// quoting the original IP header and 8 bytes, both checksums valid.
    fn assert_port_unreachable(&self, original: &[u8], vip: Ipv4Addr) {
        assert_eq!(self.packet.len(), 14 + 20 + 8 + 28, "frame length: {:02x?}", self.packet);
        assert_eq!(&self.packet[..6], &CLIENT_MAC, "to the pod");
        assert_eq!(&self.packet[6..12], &HOST_MAC);
        assert_eq!(&self.packet[12..14], &[0x08, 0x00]);
        let ip = self.ip();
        assert_eq!((ip[0], ip.len(), ip[9]), (0x45, 56, proto::ICMP), "IPv4 header {:02x?}", &ip[..20]);
        assert_eq!(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), vip, "from the VIP");
        assert_eq!(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]), CLIENT);
        assert!(ip[8] > 0, "TTL");
        assert_eq!(sum16(&ip[..20], 0), 0xffff, "IPv4 header checksum of {:02x?}", &ip[..20]);
        let icmp = &ip[20..];
        assert_eq!((icmp[0], icmp[1]), (3, 3), "destination unreachable, port unreachable");
        assert_eq!(&icmp[4..8], &[0; 4], "unused");
        assert_eq!(sum16(icmp, 0), 0xffff, "ICMP checksum of {icmp:02x?}");
        assert_eq!(&icmp[8..], &original[14..14 + 28], "quotes the IP header and 8 bytes");
    }
}

/// Runs `packet` through `to_pod` as the redirected refusal (marked): passed, no record.
fn delivered_to_the_pod(f: &mut Fixture, packet: &[u8]) {
    let out = f.run_full(
        program_names::TO_POD,
        packet,
        DropReason::Forwarded,
        1,
        TC_ACT_OK,
        bulkhead_common::GENERATED_REPLY_MARK,
    );
    assert_eq!(out.packet, packet);
    assert!(f.drain().is_empty(), "a refusal delivered makes no record");
}

#[test]
fn udp_to_a_service_port_without_backends_gets_the_vips_icmp_port_unreachable() {
    let mut f = fixture("unreachable", ISOLATED);
    // A short datagram (the frame grows to the error) and a long one (it shrinks).
    for (sport, payload) in [(42000, 5), (42001, 300)] {
        let query = client_udp(sport, VIP_EMPTY, DNS_PORT, payload);
        let before = f.dp.counter(DropReason::NoServiceBackend, direction::EGRESS).unwrap();
        let out = f.run_full(program_names::FROM_POD, &query, DropReason::NoServiceBackend, 1, TC_ACT_REDIRECT, 0);
        out.assert_port_unreachable(&query, VIP_EMPTY);
        let after = f.dp.counter(DropReason::NoServiceBackend, direction::EGRESS).unwrap();
        assert_eq!(after.bytes - before.bytes, query.len() as u64, "the datagram's bytes are counted");
        let records = f.drain();
        assert_eq!(records.len(), 1);
        let r = records[0];
        assert_eq!(
            (r.reason, r.verdict, r.service_id, r.packet_len as usize),
            (
                DropReason::NoServiceBackend as u8,
                verdict::DROPPED,
                service_id(VIP_EMPTY, DNS_PORT, proto::UDP),
                query.len()
            )
        );
        assert_eq!(
            (r.daddr, r.dport, r.sport),
            (VIP_EMPTY.octets(), DNS_PORT.to_be_bytes(), sport.to_be_bytes())
        );

        // Sent back out of the veth, it reaches the pod past isolated ingress, marked only
        // (unmarked, it is an ICMP error quoting no flow the pod's conntrack holds).
        delivered_to_the_pod(&mut f, &out.packet);
        f.run(program_names::TO_POD, &out.packet, DropReason::IcmpUnrelated);
        f.drain();
    }

    // The mark opens nothing but exactly this error: not another ICMP code, not one quoting
    // another pod's packet or a port that is no Service, not one from an address whose
    // quoted destination it is not.
    let query = client_udp(42002, VIP_EMPTY, DNS_PORT, 5);
    let error = f
        .run_full(program_names::FROM_POD, &query, DropReason::NoServiceBackend, 1, TC_ACT_REDIRECT, 0)
        .packet;
    f.drain();
    const ICMP: usize = 14 + 20;
    const QUOTED: usize = ICMP + 8;
    // (what, byte offset, new value)
    let edits = [
        ("host unreachable", ICMP + 1, 1),
        ("another pod's datagram", QUOTED + 15, 99),
        ("a port that is no Service", QUOTED + 23, 54),
        ("from another address", 14 + 15, 99),
    ];
    for (what, offset, value) in edits {
        let mut forged = error.clone();
        forged[offset] = value;
        let out = f.run_full(
            program_names::TO_POD,
            &forged,
            DropReason::IcmpUnrelated,
            1,
            TC_ACT_SHOT,
            bulkhead_common::GENERATED_REPLY_MARK,
        );
        assert_eq!(out.packet.len(), forged.len(), "{what}");
    }
}

#[test]
fn a_removed_backends_connections_end_with_a_reset_or_port_unreachable_and_the_others_keep_theirs() {
    let mut f = fixture("gone", 0);
    let before = f.dp.maps.read_state().unwrap();
    let open = one_connection_per_backend(&mut f, 34000);
    let dns = client_udp(43000, VIP_ONE, DNS_PORT, 5);
    assert_eq!(
        f.run(program_names::FROM_POD, &dns, DropReason::Forwarded).dst(),
        (backend_ip(1), UDP_TARGET_PORT)
    );
    f.drain();

    // Backend 2 (TCP) leaves every Service and the backend map; backend 11 (UDP) is
    // replaced by 12, as the compiler would write it.
    let mut after = before.clone();
    let key = |vip: Ipv4Addr, port, protocol, slot| ServiceKey::new(vip.octets(), port, protocol, slot);
    after
        .services
        .get_mut(&key(VIP_THREE, SERVICE_PORT, proto::TCP, 0))
        .unwrap()
        .backend_count = 2;
    after
        .services
        .get_mut(&key(VIP_THREE, SERVICE_PORT, proto::TCP, 2))
        .unwrap()
        .backend_id = 3;
    after.services.remove(&key(VIP_THREE, SERVICE_PORT, proto::TCP, 3));
    after
        .services
        .get_mut(&key(VIP_DENIED, SERVICE_PORT, proto::TCP, 0))
        .unwrap()
        .backend_count = 0;
    after.services.remove(&key(VIP_DENIED, SERVICE_PORT, proto::TCP, 1));
    after.backends.remove(&2);
    after.services.get_mut(&key(VIP_ONE, DNS_PORT, proto::UDP, 1)).unwrap().backend_id = 12;
    after.backends.remove(&11);
    bulkhead::datapath::sync::sync(&mut f.dp.maps, &before, &after).unwrap();
    assert_eq!(f.dp.maps.read_state().unwrap(), after);

    // The next segment of the connection to backend 2 gets the VIP's RST (RFC 9293: seq =
    // the segment's ack, RST alone, no data), is counted and reported.
    let dead = open[&backend_ip(2)];
    let segment = frame(
        HOST_MAC,
        CLIENT_MAC,
        CLIENT,
        VIP_THREE,
        proto::TCP,
        tcp_segment(dead, SERVICE_PORT, ACK, 0x1000, 0xabcd_0123),
        Some(16),
    );
    for _ in 0..2 {
        let out = f.run_full(
            program_names::FROM_POD,
            &segment,
            DropReason::NoServiceBackend,
            1,
            TC_ACT_REDIRECT,
            0,
        );
        assert_eq!(out.packet.len(), 14 + 20 + 20, "no options, no data");
        assert_eq!(&out.packet[..6], &CLIENT_MAC);
        assert_eq!(out.src(), (VIP_THREE, SERVICE_PORT));
        assert_eq!(out.dst(), (CLIENT, dead));
        let tcp = &out.ip()[20..];
        assert_eq!(u32::from_be_bytes(tcp[4..8].try_into().unwrap()), 0xabcd_0123, "seq = SEG.ACK");
        assert_eq!((tcp[12], tcp[13]), (0x50, 0x04), "data offset 5, RST alone");
        out.assert_checksums();
        let records = f.drain();
        assert_eq!(records.len(), 1);
        assert_eq!(
            (records[0].reason, records[0].service_id, Ipv4Addr::from(records[0].daddr)),
            (
                DropReason::NoServiceBackend as u8,
                service_id(VIP_THREE, SERVICE_PORT, proto::TCP),
                VIP_THREE
            )
        );
        delivered_to_the_pod(&mut f, &out.packet);
    }
    // The client's own RST on it is dropped, never answered.
    let rst = client_tcp(dead, VIP_THREE, SERVICE_PORT, 0x04);
    f.run(program_names::FROM_POD, &rst, DropReason::NoServiceBackend);

    // The connections to the remaining backends keep them.
    for ip in [backend_ip(1), backend_ip(3)] {
        let out = f.run(
            program_names::FROM_POD,
            &client_tcp(open[&ip], VIP_THREE, SERVICE_PORT, ACK),
            DropReason::Forwarded,
        );
        assert_eq!(out.dst().0, ip);
    }
    // A new SYN on the dead connection's tuple is a new connection: a live backend, kept.
    let out = f.run(
        program_names::FROM_POD,
        &client_tcp(dead, VIP_THREE, SERVICE_PORT, SYN),
        DropReason::Forwarded,
    );
    let fresh = out.dst().0;
    assert!(fresh == backend_ip(1) || fresh == backend_ip(3), "{fresh}");
    let out = f.run(
        program_names::FROM_POD,
        &client_tcp(dead, VIP_THREE, SERVICE_PORT, ACK),
        DropReason::Forwarded,
    );
    assert_eq!(out.dst().0, fresh);

    // UDP: the flow to backend 11 is told once (ICMP port unreachable from the VIP), then
    // its next datagram goes to the live backend.
    f.drain();
    let out = f.run_full(program_names::FROM_POD, &dns, DropReason::NoServiceBackend, 1, TC_ACT_REDIRECT, 0);
    out.assert_port_unreachable(&dns, VIP_ONE);
    assert_eq!(f.drain()[0].service_id, service_id(VIP_ONE, DNS_PORT, proto::UDP));
    delivered_to_the_pod(&mut f, &out.packet);
    let out = f.run(program_names::FROM_POD, &dns, DropReason::Forwarded);
    assert_eq!(out.dst(), (backend_ip(2), UDP_TARGET_PORT));

    // A backend id given to another {ip, port} is gone for the connections made to the old
    // one too.
    let mut moved = after.clone();
    moved.backends.get_mut(&3).unwrap().ip = [10, 0, 1, 9];
    bulkhead::datapath::sync::sync(&mut f.dp.maps, &after, &moved).unwrap();
    f.run_full(
        program_names::FROM_POD,
        &client_tcp(open[&backend_ip(3)], VIP_THREE, SERVICE_PORT, ACK),
        DropReason::NoServiceBackend,
        1,
        TC_ACT_REDIRECT,
        0,
    );
    let out = f.run(
        program_names::FROM_POD,
        &client_tcp(open[&backend_ip(1)], VIP_THREE, SERVICE_PORT, ACK),
        DropReason::Forwarded,
    );
    assert_eq!(out.dst().0, backend_ip(1));
}

/// CRC32c (Castagnoli, reflected), as SCTP computes it over its packet (RFC 9260 B).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

/// An SCTP packet: common header (ports, verification tag, CRC32c) and one INIT chunk.
fn sctp_l4(sport: u16, dport: u16, tag: u32) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&tag.to_be_bytes());
    l4.extend_from_slice(&[0; 4]);
    l4.extend_from_slice(&[1, 0, 0, 20, 0xde, 0xad, 0xbe, 0xef, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
    // Stored as the Linux stack does (sctp_compute_cksum: little-endian).
    let crc = crc32c(&l4);
    l4[8..12].copy_from_slice(&crc.to_le_bytes());
    l4
}

/// The SCTP packet in `ip` (an IPv4 packet without options) checks against its CRC32c.
fn sctp_crc_valid(ip: &[u8]) -> bool {
    let mut l4 = ip[20..].to_vec();
    let stored = u32::from_le_bytes(l4[8..12].try_into().unwrap());
    l4[8..12].fill(0);
    crc32c(&l4) == stored
}

#[test]
fn sctp_services_translate_the_address_only_and_replies_come_back_from_the_vip() {
    let mut f = fixture("sctp", ISOLATED);
    let l4 = sctp_l4(45000, SCTP_PORT, 0);
    let init = frame(HOST_MAC, CLIENT_MAC, CLIENT, VIP_ONE, proto::SCTP, l4.clone(), None);
    let out = f.run(program_names::FROM_POD, &init, DropReason::Forwarded);
    assert_eq!(out.dst(), (backend_ip(1), SCTP_PORT), "to backend 1, same port");
    assert_eq!(out.src(), (CLIENT, 45000));
    assert_eq!(sum16(&out.ip()[..20], 0), 0xffff, "IPv4 header checksum");
    assert_eq!(&out.ip()[20..], &l4[..], "the SCTP packet is untouched");
    assert!(sctp_crc_valid(out.ip()), "CRC32c still valid: it does not cover addresses");
    let records = f.drain();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].remote_identity, records[0].rule_id, records[0].service_id),
        (401, 9, service_id(VIP_ONE, SCTP_PORT, proto::SCTP)),
        "egress policy decided on the backend"
    );
    let ct = f.conntrack();
    let entry = ct
        .get(&ct_key(CLIENT, 45000, backend_ip(1), SCTP_PORT, proto::SCTP, direction::EGRESS), 0)
        .unwrap();
    assert_eq!(
        ct_flags::rev_nat_index(entry.flags),
        u32::from(service_id(VIP_ONE, SCTP_PORT, proto::SCTP))
    );

    // Later packets of the association go to the same backend.
    let data = frame(
        HOST_MAC,
        CLIENT_MAC,
        CLIENT,
        VIP_ONE,
        proto::SCTP,
        sctp_l4(45000, SCTP_PORT, 0x1111),
        None,
    );
    let out = f.run(program_names::FROM_POD, &data, DropReason::Forwarded);
    assert_eq!(out.dst(), (backend_ip(1), SCTP_PORT));
    assert!(f.drain().is_empty());

    // The backend's INIT-ACK comes back from the VIP, its CRC32c still valid.
    let reply_l4 = sctp_l4(SCTP_PORT, 45000, 0xdead_beef);
    let reply = frame(CLIENT_MAC, HOST_MAC, backend_ip(1), CLIENT, proto::SCTP, reply_l4.clone(), None);
    let out = f.run(program_names::TO_POD, &reply, DropReason::Forwarded);
    assert_eq!(out.src(), (VIP_ONE, SCTP_PORT), "reply source restored");
    assert_eq!(sum16(&out.ip()[..20], 0), 0xffff, "IPv4 header checksum");
    assert_eq!(&out.ip()[20..], &reply_l4[..]);
    assert!(sctp_crc_valid(out.ip()));

    // A backend whose port differs cannot be reached without recomputing the CRC32c: never
    // translated, refused like a port without backends (ICMP port unreachable).
    let init = frame(
        HOST_MAC,
        CLIENT_MAC,
        CLIENT,
        VIP_THREE,
        proto::SCTP,
        sctp_l4(45001, SCTP_PORT, 0),
        None,
    );
    let out = f.run_full(program_names::FROM_POD, &init, DropReason::NoServiceBackend, 1, TC_ACT_REDIRECT, 0);
    out.assert_port_unreachable(&init, VIP_THREE);
    assert_eq!(f.drain()[0].service_id, service_id(VIP_THREE, SCTP_PORT, proto::SCTP));
    delivered_to_the_pod(&mut f, &out.packet);
    let nat = f.pinned::<CtKey, LbNat>(map_names::LB_NAT);
    assert!(nat
        .get(&ct_key(CLIENT, 45001, VIP_THREE, SCTP_PORT, proto::SCTP, direction::EGRESS), 0)
        .is_err());
}

/// `packet` (a frame from [`frame`]) as a fragment of IP datagram `id`: `frag_off` holds the
/// More Fragments bit (0x2000) and the offset in 8-byte units; the IPv4 checksum redone.
fn as_fragment(mut packet: Vec<u8>, id: u16, frag_off: u16) -> Vec<u8> {
    packet[18..20].copy_from_slice(&id.to_be_bytes());
    packet[20..22].copy_from_slice(&frag_off.to_be_bytes());
    packet[24..26].copy_from_slice(&[0, 0]);
    let check = !(sum16(&packet[14..34], 0) as u16);
    packet[24..26].copy_from_slice(&check.to_be_bytes());
    packet
}

#[test]
fn a_fragmented_datagram_to_a_vip_goes_whole_to_its_backend_and_its_answer_comes_back_from_the_vip() {
    let mut f = fixture("fragments", ISOLATED);
    const MF: u16 = 0x2000;
    let first = as_fragment(
        frame(HOST_MAC, CLIENT_MAC, CLIENT, VIP_ONE, proto::UDP, udp_l4(41500, DNS_PORT), None),
        0x99,
        MF,
    );
    let out = f.run(program_names::FROM_POD, &first, DropReason::Forwarded);
    assert_eq!(out.dst(), (backend_ip(1), UDP_TARGET_PORT));
    // The later fragment has no ports: it gets the first one's backend address.
    let later = as_fragment(frame(HOST_MAC, CLIENT_MAC, CLIENT, VIP_ONE, proto::UDP, vec![7; 16], None), 0x99, 2);
    let out = f.run(program_names::FROM_POD, &later, DropReason::Forwarded);
    let ip = out.ip();
    assert_eq!(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]), backend_ip(1));
    assert_eq!(sum16(&ip[..20], 0), 0xffff, "IPv4 header checksum");
    assert_eq!(&ip[20..], &[7; 16], "payload untouched");
    // A later fragment of another datagram (id) to the VIP follows nothing.
    let stray = as_fragment(later.clone(), 0x9a, 2);
    f.run_full(program_names::FROM_POD, &stray, DropReason::Fragment, 1, TC_ACT_SHOT, 0);

    // The backend's fragmented answer: both fragments come from the VIP.
    let first = as_fragment(
        frame(
            CLIENT_MAC,
            HOST_MAC,
            backend_ip(1),
            CLIENT,
            proto::UDP,
            udp_l4(UDP_TARGET_PORT, 41500),
            None,
        ),
        0x55,
        MF,
    );
    let out = f.run(program_names::TO_POD, &first, DropReason::Forwarded);
    assert_eq!(out.src(), (VIP_ONE, DNS_PORT));
    let later = as_fragment(
        frame(CLIENT_MAC, HOST_MAC, backend_ip(1), CLIENT, proto::UDP, vec![8; 16], None),
        0x55,
        2,
    );
    let out = f.run(program_names::TO_POD, &later, DropReason::Forwarded);
    let ip = out.ip();
    assert_eq!(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), VIP_ONE);
    assert_eq!(sum16(&ip[..20], 0), 0xffff, "IPv4 header checksum");
}

/// An ICMP error from `src` to the client quoting `quoted` (a frame), with valid checksums.
fn icmp_error_to_client(src: Ipv4Addr, kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut l4 = vec![kind, code, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(&quoted[14..14 + 28]);
    let check = !(sum16(&l4, 0) as u16);
    l4[2..4].copy_from_slice(&check.to_be_bytes());
    frame(CLIENT_MAC, HOST_MAC, src, CLIENT, proto::ICMP, l4, None)
}

#[test]
fn an_icmp_error_about_a_service_connection_reaches_the_client_naming_the_vip() {
    let mut f = fixture("icmp-vip", ISOLATED);
    let query = frame(HOST_MAC, CLIENT_MAC, CLIENT, VIP_ONE, proto::UDP, udp_l4(41600, DNS_PORT), Some(6));
    let sent = f.run(program_names::FROM_POD, &query, DropReason::Forwarded).packet;
    // What the backend (or a router on the way) quotes is the translated datagram.
    for (from, outer) in [(backend_ip(1), VIP_ONE), (Ipv4Addr::new(10, 0, 9, 9), Ipv4Addr::new(10, 0, 9, 9))] {
        for (kind, code) in [(3, 3), (3, 4), (11, 0)] {
            let error = icmp_error_to_client(from, kind, code, &sent);
            let out = f.run(program_names::TO_POD, &error, DropReason::Forwarded);
            let ip = out.ip();
            assert_eq!(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), outer, "outer source");
            assert_eq!(sum16(&ip[..20], 0), 0xffff, "IPv4 header checksum");
            assert_eq!(sum16(&ip[20..], 0), 0xffff, "ICMP checksum");
            let q = &ip[28..];
            assert_eq!(Ipv4Addr::new(q[16], q[17], q[18], q[19]), VIP_ONE, "quoted destination");
            assert_eq!(u16::from_be_bytes([q[22], q[23]]), DNS_PORT, "quoted port");
            assert_eq!(u16::from_be_bytes([q[20], q[21]]), 41600);
            assert_eq!(sum16(&q[..20], 0), 0xffff, "quoted IPv4 header checksum");
        }
    }
    // One quoting a datagram the client never sent is dropped.
    let other = frame(
        HOST_MAC,
        CLIENT_MAC,
        CLIENT,
        backend_ip(1),
        proto::UDP,
        udp_l4(41601, UDP_TARGET_PORT),
        Some(6),
    );
    let error = icmp_error_to_client(backend_ip(1), 3, 3, &other);
    f.run_full(program_names::TO_POD, &error, DropReason::IcmpUnrelated, 1, TC_ACT_SHOT, 0);
}

/// The per-packet cost of the fragment and ICMP-error paths, next to a whole datagram:
/// `cargo test --test services -- --nocapture fragment_and_icmp_error_cost`.
#[test]
fn fragment_and_icmp_error_cost() {
    const N: u16 = 2000;
    const MF: u16 = 0x2000;
    let mut f = fixture("cost-frag", ISOLATED);
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (mut whole, mut first, mut later, mut error, mut error_vip) = (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..N {
        let sport = 20000 + i;
        let udp = |sport, dst, dport| frame(HOST_MAC, CLIENT_MAC, CLIENT, dst, proto::UDP, udp_l4(sport, dport), Some(6));
        let run = |f: &mut Fixture, program, packet: &[u8]| f.run(program, packet, DropReason::Forwarded);
        // The flow's first datagram opens it; the measured one is established.
        run(&mut f, program_names::FROM_POD, &udp(sport, backend_ip(1), UDP_TARGET_PORT));
        whole.push(run(&mut f, program_names::FROM_POD, &udp(sport, backend_ip(1), UDP_TARGET_PORT)).duration);
        let head = as_fragment(udp(sport, backend_ip(1), UDP_TARGET_PORT), i, MF);
        first.push(run(&mut f, program_names::FROM_POD, &head).duration);
        let tail = as_fragment(
            frame(HOST_MAC, CLIENT_MAC, CLIENT, backend_ip(1), proto::UDP, vec![7; 16], None),
            i,
            2,
        );
        later.push(run(&mut f, program_names::FROM_POD, &tail).duration);
        let sent = udp(sport, backend_ip(1), UDP_TARGET_PORT);
        error.push(run(&mut f, program_names::TO_POD, &icmp_error_to_client(backend_ip(1), 3, 3, &sent)).duration);
        let sent = run(&mut f, program_names::FROM_POD, &udp(40000 + i, VIP_ONE, DNS_PORT)).packet;
        error_vip.push(run(&mut f, program_names::TO_POD, &icmp_error_to_client(backend_ip(1), 3, 3, &sent)).duration);
    }
    eprintln!(
        "median per packet (one run each, n={N}): whole datagram (established) {:?}; first fragment (established, records) {:?}; later fragment {:?}; ICMP error related {:?}; related and restored to the VIP {:?}",
        median(whole),
        median(first),
        median(later),
        median(error),
        median(error_vip)
    );
}

/// A Service whose backend is a quarantined pod: the client's connection to the VIP is
/// dropped as `quarantined` on the backend address the VIP became, and its reply too.
#[test]
fn a_quarantined_backend_is_dropped_after_translation() {
    use bulkhead::datapath::sync::MapWriter;
    let mut f = fixture("quarantine", ISOLATED);
    f.run(
        program_names::FROM_POD,
        &client_tcp(40000, VIP_ONE, SERVICE_PORT, SYN),
        DropReason::Forwarded,
    );
    f.drain();
    f.dp.maps.set_quarantine(backend_ip(1), 0).unwrap();
    f.dp.maps.set_quarantine_count(1).unwrap();
    // The established connection and a new one, both through the VIP.
    for sport in [40000, 40001] {
        f.run(
            program_names::FROM_POD,
            &client_tcp(sport, VIP_ONE, SERVICE_PORT, if sport == 40000 { ACK } else { SYN }),
            DropReason::Quarantined,
        );
    }
    f.run(
        program_names::TO_POD,
        &to_client_tcp(backend_ip(1), TARGET_PORT, 40000, ACK),
        DropReason::Quarantined,
    );
    let records = f.drain();
    assert_eq!(records.len(), 3, "{records:?}");
    assert!(records.iter().all(|r| r.reason == DropReason::Quarantined as u8), "{records:?}");
    assert_eq!(
        (records[0].daddr, records[0].service_id),
        (backend_ip(1).octets(), 1),
        "{records:?}"
    );
    // Released: the VIP works again.
    f.dp.maps.remove_quarantine(backend_ip(1)).unwrap();
    f.dp.maps.set_quarantine_count(0).unwrap();
    f.run(
        program_names::FROM_POD,
        &client_tcp(40002, VIP_ONE, SERVICE_PORT, SYN),
        DropReason::Forwarded,
    );
}

/// Issue 15: a Service connection's bytes count on its conntrack entry, the translated
/// (client → backend) tuple, both ways; its End record names the backend and the Service
/// port it was dialled on.
#[test]
fn a_service_connection_counts_its_bytes_on_the_backend_tuple() {
    use bulkhead_common::flow_kind;
    let mut f = fixture("bytes-service", ISOLATED);
    let sent = [
        client_tcp(40500, VIP_ONE, SERVICE_PORT, SYN),
        client_tcp(40500, VIP_ONE, SERVICE_PORT, ACK),
        client_tcp(40500, VIP_ONE, SERVICE_PORT, ACK),
    ];
    for p in &sent {
        f.run(program_names::FROM_POD, p, DropReason::Forwarded);
    }
    let got = [
        to_client_tcp(backend_ip(1), TARGET_PORT, 40500, SYN | ACK),
        to_client_tcp(backend_ip(1), TARGET_PORT, 40500, ACK),
    ];
    for p in &got {
        f.run(program_names::TO_POD, p, DropReason::Forwarded);
    }
    let bytes = |packets: &[Vec<u8>]| packets.iter().map(|p| p.len() as u64 - 14).sum::<u64>();
    let key = ct_key(CLIENT, 40500, backend_ip(1), TARGET_PORT, proto::TCP, direction::EGRESS);
    let entry = f.conntrack().get(&key, 0).expect("the backend tuple is tracked");
    assert_eq!((entry.to_destination, entry.to_source), (bytes(&sent), bytes(&got)));
    assert_eq!(f.drain().len(), 1, "the new flow's record only");
    let fin = client_tcp(40500, VIP_ONE, SERVICE_PORT, ACK | 0x01);
    f.run(program_names::FROM_POD, &fin, DropReason::Forwarded);
    let records = f.drain();
    assert_eq!(records.len(), 1, "{records:?}");
    let end = records[0];
    assert_eq!(end.kind, flow_kind::END);
    assert_eq!(
        (end.to_destination, end.to_source),
        (bytes(&sent) + fin.len() as u64 - 14, bytes(&got))
    );
    assert_eq!((end.daddr, end.dport), (backend_ip(1).octets(), TARGET_PORT.to_be_bytes()));
    assert_eq!(end.service_id, service_id(VIP_ONE, SERVICE_PORT, proto::TCP));
    assert_eq!(end.rule_id, 7);
}
