//! One pod must not starve another's datapath state (issue 12.4, 12.5): the compiled TC
//! programs on crafted packets (`BPF_PROG_TEST_RUN`).
//!
//! Test runs put the packet on `lo` (ifindex 1), so two pods are played by rewriting the
//! endpoint entry at ifindex 1 between their packets: the datapath knows a pod only through
//! that entry (its id keys its conntrack table and its flow-record budget).
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Instant;

use aya::maps::{HashMap, Map, MapData, RingBuf};
use aya::programs::{TestRun, TestRunOptions};
use bulkhead::datapath::conntrack;
use bulkhead::datapath::stats::{DatapathStats, PinnedStats};
use bulkhead::datapath::sync::MapWriter;
use bulkhead::datapath::Datapath;
use bulkhead_common::{
    capacity, direction, endpoint_flags, identity, map_names, program_names, proto, CtEntry, CtEntryV2, CtKey, DropReason, EndpointInfo,
    FlowEvent, IpcacheValue, FLOW_RECORDS_BURST, FLOW_RECORDS_PER_SEC,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const LO: u32 = 1;
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
/// The node's own address: HOST, which every pod may always reach.
const NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 1);
/// A remote pod (identity 301) the victim talks to.
const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);

/// A pod on the node: its endpoint entry.
#[derive(Clone, Copy)]
struct Pod {
    id: u32,
    ip: Ipv4Addr,
    mac: [u8; 6],
    flags: u32,
}

/// The attacker: isolated both ways, with no policy at all (only the node is allowed).
const ATTACKER: Pod = Pod {
    id: 10,
    ip: Ipv4Addr::new(10, 0, 0, 10),
    mac: [0x02, 0, 0, 0, 0, 0x0a],
    flags: endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS,
};

/// The victim: ingress isolated with no rule, so replies to its own connections pass only
/// on its conntrack entries.
const VICTIM: Pod = Pod {
    id: 11,
    ip: Ipv4Addr::new(10, 0, 0, 11),
    mac: [0x02, 0, 0, 0, 0, 0x0b],
    flags: endpoint_flags::ISOLATED_INGRESS,
};

/// A loaded datapath with its maps pinned in a directory of its own, removed on drop.
struct Fixture {
    dp: Datapath,
    pin_dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn fixture(name: &str) -> Fixture {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bulkhead-fair-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let dp = Datapath::load(&pin_dir).unwrap_or_else(|e| {
        let _ = std::fs::remove_dir_all(&pin_dir);
        panic!("load datapath (needs root and BPF): {e:?}")
    });
    let mut f = Fixture { dp, pin_dir };
    let m = &mut f.dp.maps;
    m.set_ipcache(PEER, 32, &IpcacheValue { identity: 301, flags: 0 }).unwrap();
    m.set_ipcache(
        NODE,
        32,
        &IpcacheValue {
            identity: identity::HOST,
            flags: 0,
        },
    )
    .unwrap();
    f
}

impl Fixture {
    /// Makes `pod` the endpoint the next packets are for.
    fn become_pod(&mut self, pod: Pod) {
        self.dp
            .maps
            .set_endpoint(
                LO,
                &EndpointInfo {
                    endpoint_id: pod.id,
                    identity: 300 + pod.id,
                    ipv4: pod.ip.octets(),
                    flags: pod.flags,
                    mac: pod.mac,
                    _pad: [0; 2],
                },
            )
            .unwrap();
    }

    /// Runs `program` once on `packet`; the TC action.
    fn run(&mut self, program: &'static str, packet: &[u8]) -> u32 {
        self.run_repeat(program, packet, 1)
    }

    /// Runs `program` `repeat` times on `packet` (one kernel call); the last TC action.
    fn run_repeat(&mut self, program: &'static str, packet: &[u8], repeat: u32) -> u32 {
        self.dp
            .program(program)
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(packet),
                repeat,
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN")
            .return_value
    }
}

/// An Ethernet frame carrying a UDP datagram (8 bytes of payload, no checksum).
fn udp(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&dst_mac);
    p.extend_from_slice(&src_mac);
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    p.extend_from_slice(&[0x45, 0, 0, 36, 0, 1, 0, 0, 64, proto::UDP, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&16u16.to_be_bytes());
    p.extend_from_slice(&[0; 10]);
    p.resize(p.len().max(60), 0);
    p
}

/// Victim flows: UDP from the victim's port `40000 + i` to the peer's port 53.
const VICTIM_FLOWS: u16 = 2000;

/// How many of the victim's idle UDP flows still take their replies (only conntrack admits
/// them: its ingress is isolated and allows nothing).
fn victim_replies_admitted(f: &mut Fixture) -> u16 {
    f.become_pod(VICTIM);
    let mut admitted = 0;
    for i in 0..VICTIM_FLOWS {
        let reply = udp(HOST_MAC, VICTIM.mac, PEER, 53, VICTIM.ip, 40000 + i);
        match f.run(program_names::TO_POD, &reply) {
            TC_ACT_OK => admitted += 1,
            action => assert_eq!(action, TC_ACT_SHOT),
        }
    }
    admitted
}

/// Issue 12.4. The attacker may only reach its node (always allowed), and that is enough to
/// open new UDP flows as fast as it can send. With one shared LRU for the node, more new
/// flows than its capacity evict every other pod's idle entries, and their replies drop as
/// `policy_denied`; with a table per endpoint the attacker evicts only its own.
#[test]
fn a_pod_flooding_new_flows_evicts_none_of_another_pods_connections() {
    let mut f = fixture("ct-flood");
    // The victim opens its flows (egress is not isolated), and their replies pass.
    f.become_pod(VICTIM);
    for i in 0..VICTIM_FLOWS {
        let out = udp(VICTIM.mac, HOST_MAC, VICTIM.ip, 40000 + i, PEER, 53);
        assert_eq!(f.run(program_names::FROM_POD, &out), TC_ACT_OK);
    }
    let before = victim_replies_admitted(&mut f);
    assert_eq!(before, VICTIM_FLOWS, "every reply passes before the flood");

    // The attacker opens more new flows to its node than the whole shared table held, two
    // datagrams each: a flow seen again is as recently used as any (the kernel's LRU lets
    // entries never used after their insert go first).
    f.become_pod(ATTACKER);
    let flood = capacity::CONNTRACK + capacity::CONNTRACK / 8;
    let started = Instant::now();
    for n in 0..flood {
        let (sport, dport) = (1024 + (n % 60000) as u16, 1 + (n / 60000) as u16);
        let out = udp(ATTACKER.mac, HOST_MAC, ATTACKER.ip, sport, NODE, dport);
        assert_eq!(f.run_repeat(program_names::FROM_POD, &out, 2), TC_ACT_OK, "to its node: allowed");
    }
    let elapsed = started.elapsed();
    // A stranger's datagram to the attacker is still denied (its ingress allows nothing).
    let stranger = udp(HOST_MAC, ATTACKER.mac, PEER, 9, ATTACKER.ip, 1024);
    assert_eq!(f.run(program_names::TO_POD, &stranger), TC_ACT_SHOT);

    let after = victim_replies_admitted(&mut f);
    eprintln!(
        "conntrack flood: {flood} new flows from one pod in {elapsed:?}; victim flows whose replies still pass: {before} of {VICTIM_FLOWS} before, {after} after"
    );
    assert_eq!(after, VICTIM_FLOWS, "the flood evicted the victim's connections");
}

/// Issue 12.4, after the change: the attacker's flood stayed in its own table, full to its
/// capacity, and removing an endpoint removes its table (its connections end with it).
#[test]
fn each_endpoint_has_a_table_of_its_own_which_goes_with_it() {
    let mut f = fixture("ct-tables");
    f.become_pod(ATTACKER);
    for n in 0..capacity::CONNTRACK_PER_ENDPOINT + 100 {
        let out = udp(ATTACKER.mac, HOST_MAC, ATTACKER.ip, 1024 + n as u16, NODE, 53);
        assert_eq!(f.run(program_names::FROM_POD, &out), TC_ACT_OK);
    }
    f.become_pod(VICTIM);
    let out = udp(VICTIM.mac, HOST_MAC, VICTIM.ip, 40000, PEER, 53);
    assert_eq!(f.run(program_names::FROM_POD, &out), TC_ACT_OK);
    let tables = tables(&f);
    let count = |id| conntrack::table(&tables, id).unwrap().keys().count() as u32;
    assert_eq!(count(VICTIM.id), 1);
    let attacker = count(ATTACKER.id);
    assert!(
        attacker <= capacity::CONNTRACK_PER_ENDPOINT && attacker > capacity::CONNTRACK_PER_ENDPOINT * 9 / 10,
        "the attacker's table holds {attacker}"
    );
    // The endpoint entry at LO is the victim's: removing it removes the victim's table.
    f.dp.maps.remove_endpoint(LO).unwrap();
    assert!(conntrack::table(&tables, VICTIM.id).is_err(), "the victim's table outlived it");
    assert!(conntrack::table(&tables, ATTACKER.id).is_ok());
}

fn tables(f: &Fixture) -> conntrack::Tables {
    let outer = MapData::from_pin(f.pin_dir.join(map_names::CONNTRACK)).unwrap();
    conntrack::Tables::try_from(Map::from_map_data(outer).unwrap()).unwrap()
}

/// Issue 12.4, upgrade: an agent of this version on a pin directory of the previous one (one
/// shared `bh_ct_v1` table, endpoints without a table of their own) gives every endpoint its
/// table and copies the shared entries into it, so connections open before the upgrade keep
/// passing when their pod's programs are the new ones. Nothing opens meanwhile: the shared
/// table stays as it was for the programs still attached.
#[test]
fn an_agent_on_a_previous_pin_directory_adopts_the_shared_table() {
    let mut f = fixture("ct-adopt");
    f.become_pod(VICTIM);
    // What the previous agent left: the endpoint without a table, and the shared table
    // holding the victim's connection to the peer (and one of a pod that is gone).
    let mut outer = tables(&f);
    conntrack::remove_table(&mut outer, VICTIM.id).unwrap();
    let shared = old_table();
    shared.pin(f.pin_dir.join(map_names::CONNTRACK_V1)).unwrap();
    let mut shared: HashMap<MapData, CtKey, CtEntryV2> = HashMap::try_from(Map::from_map_data(shared).unwrap()).unwrap();
    let key = |local: Ipv4Addr| CtKey {
        saddr: local.octets(),
        daddr: PEER.octets(),
        sport: 40000u16.to_be_bytes(),
        dport: 53u16.to_be_bytes(),
        protocol: proto::UDP,
        direction: direction::EGRESS,
        _pad: [0; 2],
    };
    let entry = CtEntryV2 {
        last_seen_ns: monotonic_ns(),
        rule_id: 0,
        flags: 0,
    };
    shared.insert(key(VICTIM.ip), entry, 0).unwrap();
    shared.insert(key(Ipv4Addr::new(10, 0, 0, 99)), entry, 0).unwrap();
    // Without its table, the victim's reply is not admitted: fail closed.
    let reply = udp(HOST_MAC, VICTIM.mac, PEER, 53, VICTIM.ip, 40000);
    assert_eq!(f.run(program_names::TO_POD, &reply), TC_ACT_SHOT);

    // A new agent starts on the same pins.
    f.dp = Datapath::load(&f.pin_dir).expect("a new agent on the same pins");
    let copied = conntrack::table(&tables(&f), VICTIM.id).unwrap();
    let got = copied.get(&key(VICTIM.ip), 0).unwrap();
    assert_eq!(got, CtEntry::from_v2(entry, got.reported_ns));
    assert_eq!(copied.keys().count(), 1, "only the victim's own entry");
    assert_eq!(f.run(program_names::TO_POD, &reply), TC_ACT_OK);
    assert!(f.pin_dir.join(map_names::CONNTRACK_V1).exists(), "left for the old programs");
}

/// `bpf(BPF_MAP_CREATE)` of a map an older agent would have made (aya creates no LRU or
/// map-in-map standalone): `inner_fd` is the template of a map of maps, else 0.
fn create_map(map_type: u32, key_size: u32, value_size: u32, max_entries: u32, inner_fd: u32) -> MapData {
    use std::os::fd::{FromRawFd, OwnedFd};
    #[repr(C)]
    struct Attr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
    }
    let attr = Attr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
        inner_map_fd: inner_fd,
    };
    // SAFETY: a valid prefix of `union bpf_attr` that outlives the call; its own size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, std::ptr::from_ref(&attr), size_of::<Attr>() as u32) };
    assert!(fd >= 0, "bpf_map_create: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    MapData::from_fd(unsafe { OwnedFd::from_raw_fd(fd as i32) }).unwrap()
}

/// `BPF_MAP_TYPE_LRU_HASH`, `BPF_MAP_TYPE_HASH_OF_MAPS`, `BPF_MAP_TYPE_ARRAY`.
const LRU_HASH: u32 = 9;
const HASH_OF_MAPS: u32 = 13;
const ARRAY: u32 = 2;

/// A conntrack table of layouts 1 and 2: `CtKey` → `CtEntryV2`.
fn old_table() -> MapData {
    create_map(
        LRU_HASH,
        size_of::<CtKey>() as u32,
        size_of::<CtEntryV2>() as u32,
        capacity::CONNTRACK_PER_ENDPOINT,
        0,
    )
}

/// What an agent of layout 2 left pinned at `bh_ct_v2`: endpoint id → a table of
/// `CtEntryV2` holding `entries`.
fn pin_v2(f: &Fixture, tables: &[(u32, Vec<(CtKey, CtEntryV2)>)]) {
    use std::os::fd::{AsFd, AsRawFd};
    let template = old_table();
    let outer = create_map(
        HASH_OF_MAPS,
        4,
        4,
        capacity::CONNTRACK_TABLES,
        template.fd().as_fd().as_raw_fd() as u32,
    );
    outer.pin(f.pin_dir.join(map_names::CONNTRACK_V2)).unwrap();
    let mut outer: conntrack::Tables = conntrack::Tables::try_from(Map::from_map_data(outer).unwrap()).unwrap();
    for (id, entries) in tables {
        let inner = old_table();
        outer.insert(id, &inner, 0).unwrap();
        let mut inner: HashMap<MapData, CtKey, CtEntryV2> = HashMap::try_from(Map::from_map_data(inner).unwrap()).unwrap();
        for (k, e) in entries {
            inner.insert(k, e, 0).unwrap();
        }
    }
}

/// Issue 15, upgrade from layout 2: the per-endpoint tables without byte counts are copied
/// into the layout-3 tables (counts 0, the next report one interval away), so the pod's
/// open connection keeps passing on the new programs; the old pin is removed once copied,
/// and a table of an endpoint that is gone is left out.
#[test]
fn an_agent_on_a_layout_2_pin_directory_adopts_its_tables_and_unpins_them() {
    let mut f = fixture("ct-adopt-v2");
    f.become_pod(VICTIM);
    let key = CtKey {
        saddr: VICTIM.ip.octets(),
        daddr: PEER.octets(),
        sport: 40001u16.to_be_bytes(),
        dport: 53u16.to_be_bytes(),
        protocol: proto::UDP,
        direction: direction::EGRESS,
        _pad: [0; 2],
    };
    let entry = CtEntryV2 {
        last_seen_ns: monotonic_ns(),
        rule_id: 5,
        flags: 0,
    };
    // The upgrade: the victim's layout-3 table is empty, its connection only in layout 2.
    let mut outer = tables(&f);
    conntrack::remove_table(&mut outer, VICTIM.id).unwrap();
    conntrack::ensure_table(&mut outer, VICTIM.id).unwrap();
    pin_v2(
        &f,
        &[(VICTIM.id, vec![(key, entry)]), (77, vec![(CtKey { sport: [1, 2], ..key }, entry)])],
    );
    let reply = udp(HOST_MAC, VICTIM.mac, PEER, 53, VICTIM.ip, 40001);
    assert_eq!(f.run(program_names::TO_POD, &reply), TC_ACT_SHOT, "not adopted yet: closed");

    let before = monotonic_ns();
    f.dp = Datapath::load(&f.pin_dir).expect("a new agent on the same pins");
    let copied = conntrack::table(&tables(&f), VICTIM.id).unwrap();
    let got = copied.get(&key, 0).unwrap();
    assert_eq!((got.last_seen_ns, got.rule_id, got.flags), (entry.last_seen_ns, 5, 0));
    assert_eq!((got.to_destination, got.to_source), (0, 0));
    assert!(got.reported_ns >= before && got.reported_ns <= monotonic_ns());
    assert_eq!(copied.keys().count(), 1);
    assert!(conntrack::table(&tables(&f), 77).is_err(), "no table for an endpoint that is gone");
    assert!(!f.pin_dir.join(map_names::CONNTRACK_V2).exists(), "unpinned once copied");
    // The connection passes on the adopted entry and counts from there.
    assert_eq!(f.run(program_names::TO_POD, &reply), TC_ACT_OK);
    let counted = conntrack::table(&tables(&f), VICTIM.id).unwrap().get(&key, 0).unwrap();
    assert_eq!((counted.to_destination, counted.to_source), (0, reply.len() as u64 - 14));
    // A second start finds nothing to adopt and keeps the entry.
    f.dp = Datapath::load(&f.pin_dir).expect("again");
    assert_eq!(conntrack::table(&tables(&f), VICTIM.id).unwrap().get(&key, 0).unwrap(), counted);
}

/// An old conntrack pin that is not what its name says (here an array at `bh_ct_v2`) is
/// an error: the agent does not start as if there were nothing to adopt, and leaves it.
#[test]
fn an_old_conntrack_pin_that_cannot_be_read_stops_the_agent() {
    let mut f = fixture("ct-adopt-bad");
    f.become_pod(VICTIM);
    let bogus = create_map(ARRAY, 4, 16, 4, 0);
    bogus.pin(f.pin_dir.join(map_names::CONNTRACK_V2)).unwrap();
    let e = Datapath::load(&f.pin_dir)
        .err()
        .expect("a layout-2 pin that is no table of tables is refused");
    assert!(format!("{e:?}").contains(map_names::CONNTRACK), "{e:?}");
    assert!(f.pin_dir.join(map_names::CONNTRACK_V2).exists(), "left as it was");
    // A shared layout-1 table of another entry size is refused too.
    std::fs::remove_file(f.pin_dir.join(map_names::CONNTRACK_V2)).unwrap();
    let wrong = create_map(LRU_HASH, size_of::<CtKey>() as u32, 24, 16, 0);
    wrong.pin(f.pin_dir.join(map_names::CONNTRACK_V1)).unwrap();
    assert!(
        Datapath::load(&f.pin_dir).is_err(),
        "a layout-1 table of another entry size is refused"
    );
}

/// CLOCK_MONOTONIC now, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Every record waiting on the ring, as (endpoint id, drop reason) pairs.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<(u32, u8)> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<FlowEvent>(), "record size");
        // SAFETY: FlowEvent is plain old data and the length was checked above.
        let e = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) };
        out.push((e.endpoint_id, e.reason));
    }
    out
}

/// Issue 12.5. The attacker sends more junk than the ring holds (every packet a drop, every
/// drop a record); nobody reads the ring meanwhile (the agent is busy, or restarting). The
/// victim's drop records that follow must all arrive, and what the attacker's budget kept
/// off the ring is counted, exactly, for the attacker.
#[test]
fn a_pod_flooding_drops_leaves_room_for_every_other_pods_records() {
    const FLOOD: u32 = 100_000;
    const VICTIM_DROPS: u16 = 500;
    let mut f = fixture("flow-flood");
    let mut ring = f.dp.take_flow_ring().expect("flow ring");
    f.become_pod(ATTACKER);
    // Denied: the attacker may only reach its node. One kernel call runs on one CPU.
    let junk = udp(ATTACKER.mac, HOST_MAC, ATTACKER.ip, 7, PEER, 7);
    let started = Instant::now();
    assert_eq!(f.run_repeat(program_names::FROM_POD, &junk, FLOOD), TC_ACT_SHOT);
    let elapsed = started.elapsed();
    // The victim's ingress allows nothing: each datagram is a drop with a record.
    f.become_pod(VICTIM);
    for i in 0..VICTIM_DROPS {
        let inbound = udp(HOST_MAC, VICTIM.mac, PEER, 9, VICTIM.ip, 20000 + i);
        assert_eq!(f.run(program_names::TO_POD, &inbound), TC_ACT_SHOT);
    }
    let records = drain(&mut ring);
    let of = |id| records.iter().filter(|(e, _)| *e == id).count() as u64;
    let (attacker, victim) = (of(ATTACKER.id), of(VICTIM.id));
    let suppressed = PinnedStats::open(&f.pin_dir).unwrap().flow_records_suppressed().unwrap();
    let suppressed_of = |id| suppressed.iter().find(|(e, _)| *e == id).map_or(0, |(_, n)| *n);
    let lost = f.dp.flows_lost().unwrap();
    eprintln!(
        "flow flood: attacker sent {FLOOD} drops in {elapsed:?}: {attacker} records on the ring, {} suppressed; victim {victim} of {VICTIM_DROPS} records; lost {lost}",
        suppressed_of(ATTACKER.id)
    );
    assert!(records.iter().all(|(_, r)| *r == DropReason::PolicyDenied as u8));
    assert_eq!(victim, u64::from(VICTIM_DROPS), "every victim record arrives");
    assert_eq!(lost, 0, "nothing lost");
    assert_eq!(
        attacker + suppressed_of(ATTACKER.id),
        u64::from(FLOOD),
        "each attacker drop is a record or counted"
    );
    // The budget is per CPU (a per-CPU map, no lock on the datapath): a flood the scheduler
    // moves between CPUs meets each CPU's bucket.
    let cpus = aya::util::nr_cpus().expect("possible cpus") as u64;
    let allowed = cpus * (FLOW_RECORDS_BURST + FLOW_RECORDS_PER_SEC * (elapsed.as_millis() as u64 + 1) / 1000);
    assert!(
        attacker >= FLOW_RECORDS_BURST && attacker <= allowed,
        "the attacker put {attacker} records on the ring (budget {allowed})"
    );
    assert_eq!(suppressed_of(VICTIM.id), 0);
}

/// Issue 13: a burst of endpoints gets its tables in one batch (the kernel's RCU wait after
/// a map-in-map update is paid once), each reachable and empty; endpoints that already have
/// one keep it, with its connections.
#[test]
fn a_burst_of_endpoints_gets_its_tables_in_one_batch_and_existing_ones_are_kept() {
    let mut f = fixture("ct-batch");
    f.become_pod(VICTIM);
    let out = udp(VICTIM.mac, HOST_MAC, VICTIM.ip, 40000, PEER, 53);
    assert_eq!(f.run(program_names::FROM_POD, &out), TC_ACT_OK);
    let burst: Vec<EndpointInfo> = (100..140)
        .chain([VICTIM.id])
        .map(|id| EndpointInfo {
            endpoint_id: id,
            identity: 300 + id,
            ipv4: [10, 1, 0, 1],
            flags: 0,
            mac: [2, 0, 0, 0, 0, 1],
            _pad: [0; 2],
        })
        .collect();
    let tables = tables(&f);
    assert!(conntrack::table(&tables, 100).is_err(), "no table before");
    f.dp.maps.prepare_endpoints(&burst).expect("tables for the burst");
    for id in 100..140 {
        let t = conntrack::table(&tables, id).unwrap_or_else(|e| panic!("endpoint {id} has no table: {e}"));
        assert_eq!(t.keys().count(), 0);
    }
    assert_eq!(
        conntrack::table(&tables, VICTIM.id).unwrap().keys().count(),
        1,
        "the victim's connection is kept"
    );
    // Again: nothing is missing, nothing changes.
    f.dp.maps.prepare_endpoints(&burst).expect("idempotent");
    assert_eq!(conntrack::table(&tables, VICTIM.id).unwrap().keys().count(), 1);
}

/// Issue 13: the agent's reserve — tables readied for endpoint ids no endpoint has yet — are
/// the ones those endpoints then use (writing the endpoint stores no new table), and a
/// reserve over ids in use keeps their connections.
#[test]
fn reserved_tables_are_the_ones_new_endpoints_get_and_reserving_keeps_live_tables() {
    let mut f = fixture("ct-reserve");
    f.become_pod(VICTIM);
    let out = udp(VICTIM.mac, HOST_MAC, VICTIM.ip, 40000, PEER, 53);
    assert_eq!(f.run(program_names::FROM_POD, &out), TC_ACT_OK);
    let tables = tables(&f);
    assert!(conntrack::table(&tables, 200).is_err(), "no table before");
    f.dp.maps.reserve_conntrack(200..=207).expect("reserve");
    for id in 200..=207 {
        let t = conntrack::table(&tables, id).unwrap_or_else(|e| panic!("endpoint id {id} has no table: {e}"));
        assert_eq!(t.keys().count(), 0, "empty");
    }
    // Mark the reserved table of id 200, to recognise it once an endpoint has that id.
    let mark = CtKey {
        saddr: [10, 1, 0, 9],
        daddr: [10, 9, 9, 9],
        sport: [0, 1],
        dport: [0, 2],
        protocol: 17,
        direction: 1,
        _pad: [0; 2],
    };
    conntrack::table(&tables, 200).unwrap().insert(mark, CtEntry::default(), 0).unwrap();
    f.dp.maps
        .set_endpoint(
            4242,
            &EndpointInfo {
                endpoint_id: 200,
                identity: 500,
                ipv4: [10, 1, 0, 9],
                flags: 0,
                mac: [2, 0, 0, 0, 0, 9],
                _pad: [0; 2],
            },
        )
        .unwrap();
    assert!(
        conntrack::table(&tables, 200).unwrap().get(&mark, 0).is_ok(),
        "the endpoint uses the reserved table"
    );
    // A reserve over a live endpoint's id changes nothing there.
    f.dp.maps.reserve_conntrack(VICTIM.id..=VICTIM.id + 1).expect("reserve");
    assert_eq!(
        conntrack::table(&tables, VICTIM.id).unwrap().keys().count(),
        1,
        "its connection is kept"
    );
}
