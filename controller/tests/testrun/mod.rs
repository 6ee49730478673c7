//! The real datapath programs on crafted packets through `BPF_PROG_TEST_RUN`, shared by the
//! integration tests that check compiled policy on packets (`sctp`, `policy_property`).
//!
//! Test runs put the packet on `lo` (ifindex 1), so the pod under test is compiled as the
//! local endpoint at ifindex [`LO`], one pod at a time.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use aya::programs::{TestRun, TestRunOptions};
use bulkhead::datapath::{Datapath, DatapathState};
use bulkhead_common::{direction, program_names, proto, DropReason};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
/// The ifindex test runs deliver packets on (`lo`).
pub const LO: u32 = 1;
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// A pod's addresses as they appear in packets.
#[derive(Clone, Copy, Debug)]
pub struct Addr {
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// MAC address.
    pub mac: [u8; 6],
}

fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&dst_mac);
    p.extend_from_slice(&src_mac);
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = u16::try_from(20 + l4.len()).unwrap();
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(l4);
    p.resize(p.len().max(60), 0);
    p
}

/// The first packet of a connection: an SCTP INIT chunk, a TCP SYN or a UDP datagram.
fn opening_l4(protocol: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    match protocol {
        proto::SCTP => {
            // Common header (verification tag 0 on INIT, checksum unchecked by TC), then
            // INIT: type 1, flags, length 20, initiate tag, a_rwnd, streams, initial TSN.
            l4.extend_from_slice(&[0; 8]);
            l4.extend_from_slice(&[1, 0, 0, 20, 0xde, 0xad, 0xbe, 0xef, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
        }
        proto::TCP => {
            l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        }
        _ => {
            l4.extend_from_slice(&[0, 12, 0, 0, b'p', b'i', b'n', b'g']);
        }
    }
    l4
}

/// `TCP`, `UDP` or `SCTP` as an IP protocol number.
pub fn protocol_number(name: &str) -> u8 {
    match name {
        "TCP" => proto::TCP,
        "UDP" => proto::UDP,
        "SCTP" => proto::SCTP,
        other => panic!("protocol {other}"),
    }
}

/// A loaded datapath pinned in its own directory under `/sys/fs/bpf`, removed on drop.
pub struct PinnedDatapath {
    dp: Datapath,
    pin_dir: PathBuf,
    state: DatapathState,
    sport: u16,
}

impl Drop for PinnedDatapath {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

impl PinnedDatapath {
    /// Loads the datapath; `name` goes into the pin dir's name, which is unique per process
    /// and call (tests run in parallel and may use the same name).
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bulkhead-test-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let dp = Datapath::load(&pin_dir).unwrap_or_else(|e| {
            // Some maps may be pinned already: leave nothing behind.
            let _ = std::fs::remove_dir_all(&pin_dir);
            panic!("load datapath (needs root and BPF): {e:?}")
        });
        PinnedDatapath {
            dp,
            pin_dir,
            state: DatapathState::default(),
            sport: 20000,
        }
    }

    /// Writes `new` into the maps as the agent does: the diff against what they hold.
    pub fn install(&mut self, new: DatapathState) {
        bulkhead::datapath::sync::sync(&mut self.dp.maps, &self.state, &new).unwrap();
        self.state = new;
    }

    /// Runs `program` ([`program_names::FROM_POD`] with `from` local, or
    /// [`program_names::TO_POD`] with `to` local) on a fresh flow's first packet; checks that
    /// the verdict's counter moved by one and returns whether the packet was forwarded.
    pub fn passes(&mut self, program: &'static str, from: Addr, to: Addr, protocol: u8, port: u16) -> bool {
        // A source port per packet, so no earlier packet's conntrack entry answers for it.
        self.sport = self.sport.checked_add(1).expect("fewer than 45000 packets per datapath");
        let l4 = opening_l4(protocol, self.sport, port);
        let (packet, dir) = if program == program_names::FROM_POD {
            (frame(HOST_MAC, from.mac, from.ip, to.ip, protocol, &l4), direction::EGRESS)
        } else {
            (frame(to.mac, HOST_MAC, from.ip, to.ip, protocol, &l4), direction::INGRESS)
        };
        let before = [DropReason::Forwarded, DropReason::PolicyDenied].map(|r| self.dp.counter(r, dir).unwrap().packets);
        let result = self
            .dp
            .program(program)
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        let after = [DropReason::Forwarded, DropReason::PolicyDenied].map(|r| self.dp.counter(r, dir).unwrap().packets);
        let forwarded = match result.return_value as i32 {
            TC_ACT_OK => true,
            TC_ACT_SHOT => false,
            other => panic!("{program}: action {other}"),
        };
        let want = if forwarded {
            [before[0] + 1, before[1]]
        } else {
            [before[0], before[1] + 1]
        };
        assert_eq!(
            after, want,
            "{program} {}->{} {protocol}/{port}: forwarded/denied counters",
            from.ip, to.ip
        );
        forwarded
    }
}
