//! Arbitrary frames through the real `from_pod` and `to_pod` programs (`BPF_PROG_TEST_RUN`)
//! with a fixed compiled policy in the maps, checked against a model of what the datapath
//! must do with each frame: its verdict both ways (no wrong allow, no wrong deny), and after
//! each input the endpoint's conntrack table and the fragment records key for key.
//!
//! The model ([`Model`]) takes a new flow's verdict from the spec evaluator
//! (`policy::evaluate`) for the local pod and the remote end, never from the maps, and
//! keeps its own conntrack and fragment records, written from the protocols and the
//! datapath's contract (datapath-ebpf/src/{main,packet,fragment}.rs, DESIGN.md):
//! - ARP passes; any other frame that is not well-formed IPv4 drops; a pod's frame must carry
//!   its MAC and address, a frame to a pod its address;
//! - conntrack, the endpoint's own table (`bh_ct_v3`): a packet that is not a TCP SYN passes
//!   on its flow's entry, or its reverse's in the other direction; a new flow the spec
//!   allows is tracked; every packet that passes on an entry or makes one adds its bytes
//!   past the Ethernet header to the entry's count for its way (the opener's packets to
//!   `to_destination`, the replies to `to_source`); a TCP FIN or RST marks the entry
//!   closing; a SYN the spec allows keeps the counts of its tuple's entry unless that one
//!   is closing (then it starts at the SYN's bytes);
//! - fragments (`bh_frag_v1`): a first fragment meets conntrack and policy like a whole
//!   packet; admitted, it records {source, destination, IP id, protocol, direction},
//!   refused it removes that record; a later fragment passes only on a record (one seen
//!   before its first fragment drops); an ICMP error in fragments drops;
//! - ICMP: an error (type 3, 11 or 12) passes only when the flow its quote names is tracked
//!   in the direction the quote implies (the quoted packet went the other way: the flow's
//!   opening packet or its reply), needs no policy and tracks nothing; queries pair request
//!   and reply by identifier; every other type is a flow of its own, `[type, code]` both ways.
//!
//! No Service is configured, so nothing is translated or answered. Lifetimes (a second
//! before a datagram flow meets policy again, ten before a fragment record lapses) are far
//! longer than an input takes, so the model has no clock; an input the machine stalls for
//! a second is checked up to its first unexpected drop (time only takes away).
//!
//! An input is up to `MAX_FRAMES` frames, each behind a five-byte header that can repair
//! parts of it (Ethernet, IPv4 version, addresses from the cluster, protocol, port, mark) or
//! make it an ICMP error quoting the frame before it, so that the fuzzer reaches policy,
//! conntrack and the related-error path as well as the parser's corners. The endpoint's
//! conntrack table and the fragment records are emptied before each input, so an input's
//! verdicts depend on nothing but itself. After the input, the table must hold exactly the
//! model's entries, with its byte counts.
//!
//! Needs root and BPF; maps are pinned under `/sys/fs/bpf/bulkhead-fuzz-<pid>`, removed at
//! exit (scripts/fuzz.sh also removes what a crashed run leaves).
#![no_main]

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use aya::programs::{ProgramError, TestRun, TestRunOptions};
use bulkhead::datapath::sync::sync;
use bulkhead::datapath::{conntrack, Datapath, DatapathState};
use bulkhead::model::{parse_documents, Cluster, Object};
use bulkhead::policy::{evaluate, Compiler, Decision, LocalEndpoint};
use bulkhead_common::{
    direction, map_names, program_names, proto, CtEntry, CtKey, FragEntry, FragKey, CT_REFRESH_NS, GENERATED_REPLY_MARK,
    KUBE_PROXY_MASQ_MARK, MASQUERADED_MARKS, SNAT_MARK,
};
use libfuzzer_sys::fuzz_target;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// Test runs deliver packets on `lo`: the local endpoint is compiled at this ifindex.
const LO: u32 = 1;
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const MAX_FRAMES: usize = 8;
const HEADER: usize = 5;
const ETH_HLEN: usize = 14;

/// Namespaces x, y, z; pods with ports; two policies: x/a is isolated both ways with rules
/// of every kind (pod, namespace and pod, ipBlock with except, named port, endPort, a
/// protocol without port, all protocols), y/e only on ingress, x/c not at all. No peer
/// selects every namespace, so a pod alone in an unlabelled namespace is selected only by
/// ipBlocks, as an address outside the cluster is: the oracle evaluates such addresses so.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {ns: y}}
---
apiVersion: v1
kind: Namespace
metadata: {name: z, labels: {ns: z}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec:
  nodeName: n1
  containers:
  - name: c
    ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x, labels: {app: c}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.0.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: y, labels: {app: d}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: e, namespace: y, labels: {app: e}}
spec:
  nodeName: n1
  containers:
  - name: c
    ports: [{name: http, containerPort: 80}]
status: {podIP: 10.0.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: f, namespace: z, labels: {app: f}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 192.0.2.9}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-both, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{port: 80}, {port: dns, protocol: UDP}, {port: http}]
  - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {app: d}}}]
    ports: [{protocol: SCTP, port: 1000, endPort: 2000}]
  - from: [{ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}}]
  egress:
  - to: [{podSelector: {}}]
    ports: [{port: 443}]
  - to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]
    ports: [{protocol: UDP, port: 53}]
  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: e-ingress, namespace: y}
spec:
  podSelector: {matchLabels: {app: e}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchExpressions: [{key: app, operator: In, values: [a, b]}]}}]
    ports: [{port: http}, {protocol: UDP}]
  - from: [{ipBlock: {cidr: 192.0.2.0/25}}]
    ports: [{port: 22}]
"#;

/// The stand-in for an address that is no pod: alone in a namespace without labels.
const OUTSIDE: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: remote, namespace: zz-outside}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 0.0.0.0}
"#;

/// The pods that take turns as the local endpoint: (namespace, name, address).
const LOCALS: [(&str, &str, [u8; 4]); 3] = [("x", "a", [10, 0, 1, 1]), ("y", "e", [10, 0, 2, 2]), ("x", "c", [10, 0, 1, 3])];

/// Remote addresses a frame header can pick: every pod, inside and outside the ipBlocks and
/// their excepts, and the odd ones.
const REMOTES: [[u8; 4]; 16] = [
    [10, 0, 1, 1],
    [10, 0, 1, 2],
    [10, 0, 1, 3],
    [10, 0, 2, 1],
    [10, 0, 2, 2],
    [192, 0, 2, 9],
    [192, 0, 2, 5],
    [192, 0, 2, 200],
    [198, 51, 100, 7],
    [10, 9, 9, 9],
    [0, 0, 0, 0],
    [255, 255, 255, 255],
    [127, 0, 0, 1],
    [224, 0, 0, 1],
    [192, 0, 2, 127],
    [192, 0, 2, 128],
];

/// Ports a frame header can pick: those the policies name, their range ends and misses.
const PORTS: [u16; 16] = [80, 53, 8080, 443, 22, 1000, 1500, 2000, 2001, 999, 81, 0, 65535, 54, 8081, 23];
const PROTOCOLS: [u8; 8] = [proto::TCP, proto::UDP, proto::SCTP, proto::ICMP, 0, 47, proto::TCP, proto::UDP];
const MARKS: [u32; 4] = [KUBE_PROXY_MASQ_MARK, SNAT_MARK, GENERATED_REPLY_MARK, 0];
/// An address in no ipBlock but `0.0.0.0/0`: what a masqueraded source resolves as.
const UNKNOWN: [u8; 4] = [198, 51, 100, 254];

/// Frame header flags.
mod flag {
    /// Run `to_pod` (else `from_pod`).
    pub const TO_POD: u8 = 1;
    /// Ethernet: IPv4 ethertype, the local pod's MAC where the program checks it.
    pub const FIX_ETH: u8 = 1 << 1;
    /// IPv4 version 4, header length 20.
    pub const FIX_VERSION: u8 = 1 << 2;
    /// The local pod's address on its side, a remote from `REMOTES` on the other.
    pub const FIX_ADDRS: u8 = 1 << 3;
    /// The protocol from `PROTOCOLS`.
    pub const FIX_PROTO: u8 = 1 << 4;
    /// The destination port from `PORTS`.
    pub const FIX_PORT: u8 = 1 << 5;
    /// No fragment offset (a first or only fragment).
    pub const FIX_FRAG: u8 = 1 << 6;
    /// TCP: SYN only (an opening segment); others: leave as is.
    pub const FIX_SYN: u8 = 1 << 7;
}

struct Harness {
    dp: Datapath,
    pin_dir: PathBuf,
    /// `bh_frag_v1`: the fragment records.
    fragments: BpfHashMap<MapData, FragKey, FragEntry>,
    /// The installed endpoint's conntrack table (opened on first use after a switch).
    table: Option<BpfHashMap<MapData, CtKey, CtEntry>>,
    states: Vec<DatapathState>,
    installed: usize,
    /// `BULKHEAD_FUZZ_TRACE` set: every frame's verdict and the model's reason to stderr
    /// (to see what a corpus reaches: `-runs=0 <corpus>`).
    trace: bool,
    /// The cluster the oracle asks, with the stand-in for outside addresses.
    spec: Cluster,
    outside: Object,
    pods: Vec<((String, String), [u8; 4])>,
}

fn harness() -> &'static Mutex<Harness> {
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    HARNESS.get_or_init(|| Mutex::new(Harness::new()))
}

extern "C" fn remove_pins() {
    if let Ok(h) = harness().try_lock() {
        let _ = std::fs::remove_dir_all(&h.pin_dir);
    }
}

impl Harness {
    fn new() -> Harness {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bulkhead-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let mut dp = Datapath::load(&pin_dir).unwrap_or_else(|e| {
            let _ = std::fs::remove_dir_all(&pin_dir);
            panic!("load datapath (needs root and BPF): {}", bulkhead::error_chain(&e))
        });
        let frag = MapData::from_pin(pin_dir.join(map_names::FRAGMENTS)).expect("pinned fragment map");
        let fragments = BpfHashMap::try_from(Map::from_map_data(frag).expect("fragment map type")).expect("fragment map");
        let objects = parse_documents(CLUSTER, "cluster").expect("fixed cluster parses");
        let cluster = Cluster::from_objects(objects);
        let mut compiler = Compiler::new();
        let states: Vec<DatapathState> = LOCALS
            .iter()
            .enumerate()
            .map(|(i, (ns, pod, ip))| {
                let ep = LocalEndpoint {
                    endpoint_id: endpoint_id(i),
                    host_ifindex: LO,
                    namespace: (*ns).into(),
                    pod: (*pod).into(),
                    ipv4: Ipv4Addr::from(*ip),
                    mac: local_mac(i),
                };
                compiler.compile(&cluster, &[ep])
            })
            .collect();
        // As the agent does: sync gives the endpoint its conntrack table before the endpoint.
        sync(&mut dp.maps, &DatapathState::default(), &states[0]).expect("install the compiled policy");
        let pods = cluster
            .pods()
            .iter()
            .map(|(k, p)| (k.clone(), bulkhead::model::pod_ipv4(p).expect("pods have addresses").octets()))
            .collect();
        let outside = parse_documents(OUTSIDE, "outside").expect("stand-in parses").remove(0);
        // SAFETY: registering a handler that only removes a directory.
        unsafe { libc::atexit(remove_pins) };
        Harness {
            dp,
            pin_dir,
            fragments,
            table: None,
            trace: std::env::var_os("BULKHEAD_FUZZ_TRACE").is_some(),
            states,
            installed: 0,
            spec: cluster,
            outside,
            pods,
        }
    }

    fn install(&mut self, local: usize) {
        if local != self.installed {
            sync(&mut self.dp.maps, &self.states[self.installed], &self.states[local]).expect("switch the local endpoint");
            self.installed = local;
            self.table = None;
        }
    }

    /// The installed endpoint's conntrack table, which `sync` made (`conntrack::ensure_table`).
    fn table(&mut self) -> &mut BpfHashMap<MapData, CtKey, CtEntry> {
        let id = endpoint_id(self.installed);
        let tables = &self.dp.maps.conntrack;
        self.table
            .get_or_insert_with(|| conntrack::table(tables, id).expect("the endpoint's conntrack table"))
    }

    /// What the installed endpoint's conntrack table (each entry's byte counts) and the
    /// fragment records hold.
    fn tracked(&mut self) -> (HashMap<CtKey, Counts>, HashSet<FragKey>) {
        let ct = self
            .table()
            .iter()
            .map(|item| {
                let (k, e) = item.expect("read conntrack");
                (k, (e.to_destination, e.to_source))
            })
            .collect();
        let frags = self.fragments.keys().map(|k| k.expect("read fragment records")).collect();
        (ct, frags)
    }

    /// Empties the installed endpoint's conntrack table and the fragment records.
    fn clear(&mut self) {
        let (ct, frags) = self.tracked();
        let table = self.table();
        for k in ct.into_keys() {
            table.remove(&k).expect("remove a conntrack entry");
        }
        for k in frags {
            self.fragments.remove(&k).expect("remove a fragment record");
        }
    }

    /// The program's action, or `None` when the kernel refuses to run it on `frame`.
    fn run(&mut self, program: &'static str, frame: &[u8], mark: u32) -> Option<u32> {
        // struct __sk_buff up to `mark` (len, pkt_type, mark): the kernel takes a prefix.
        let mut ctx = [0u8; 12];
        ctx[8..].copy_from_slice(&mark.to_ne_bytes());
        let result = self.dp.program(program).expect("program loaded").test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        });
        match result {
            Ok(r) => Some(r.return_value),
            // The kernel will not test-run an IPv4 (IPv6) frame too short for its header; a
            // real veth would deliver it, which the parser's bounds checks are for.
            Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) && frame.len() < ETH_HLEN + 40 => None,
            Err(e) => panic!("BPF_PROG_TEST_RUN on {} bytes {frame:02x?}: {e:?}", frame.len()),
        }
    }

    /// The spec's decision for a flow between the local pod and `remote` in `dir`.
    fn decide(&mut self, local: usize, remote: [u8; 4], dir: u8, protocol: u8, port: u16) -> Decision {
        let me = (LOCALS[local].0.to_string(), LOCALS[local].1.to_string());
        let them = match self.pods.iter().find(|(_, ip)| *ip == remote) {
            Some((name, _)) => name.clone(),
            None => {
                let mut o = self.outside.clone();
                if let Object::Pod(p) = &mut o {
                    if p.ipv4.is_some() {
                        p.ipv4 = Some(Ipv4Addr::from(remote));
                    }
                }
                self.spec.apply(o);
                ("zz-outside".to_string(), "remote".to_string())
            }
        };
        let name = match protocol {
            proto::TCP => "TCP".to_string(),
            proto::UDP => "UDP".to_string(),
            proto::SCTP => "SCTP".to_string(),
            proto::ICMP => "ICMP".to_string(),
            n => format!("IP-{n}"),
        };
        let me = (me.0.as_str(), me.1.as_str());
        let them = (them.0.as_str(), them.1.as_str());
        if dir == direction::EGRESS {
            evaluate(&self.spec, me, them, &name, port).egress
        } else {
            evaluate(&self.spec, them, me, &name, port).ingress
        }
    }
}

fn local_mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 1, u8::try_from(i).expect("few locals")]
}

fn endpoint_id(i: usize) -> u32 {
    10 + u32::try_from(i).expect("few locals")
}

fn opposite(dir: u8) -> u8 {
    if dir == direction::EGRESS {
        direction::INGRESS
    } else {
        direction::EGRESS
    }
}

/// Where a packet stands in its datagram (IPv4 flags and fragment offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// Not fragmented.
    Whole,
    /// Offset 0, More Fragments: carries the L4 header.
    First,
    /// Offset above 0: no L4 header.
    Later,
}

/// A frame's IPv4 facts as the datapath must read them.
#[derive(Debug)]
struct Parsed {
    eth_src: [u8; 6],
    saddr: [u8; 4],
    daddr: [u8; 4],
    protocol: u8,
    id: [u8; 2],
    place: Place,
    /// The flow's ports: TCP, UDP and SCTP's; an ICMP query's or message's (`icmp_ports`).
    sport: [u8; 2],
    dport: [u8; 2],
    /// Destination port for policy (TCP, UDP, SCTP; else 0).
    policy_port: u16,
    /// TCP SYN without ACK.
    syn: bool,
    /// TCP FIN or RST: the connection is closing.
    closing: bool,
    /// ICMP destination unreachable, time exceeded or parameter problem.
    icmp_error: bool,
    /// Offset of the L4 header in the frame.
    l4: usize,
}

/// The conntrack ports of an ICMP message that is not an error: a query's identifier on its
/// requester's side and its kind on the other (echo: 0), so a reply reversed is its
/// request; any other type `[type, code]` both ways. `None`: an error (RFC 792 types 3, 11,
/// 12), which belongs to the flow it quotes.
fn icmp_ports(kind: u8, code: u8, id: [u8; 2]) -> Option<([u8; 2], [u8; 2])> {
    match kind {
        3 | 11 | 12 => None,
        8 => Some((id, [0, 0])),
        0 => Some(([0, 0], id)),
        // Timestamp, information and address mask requests (13, 15, 17) and replies.
        13 | 15 | 17 => Some((id, [kind, 0])),
        14 | 16 | 18 => Some(([kind - 1, 0], id)),
        _ => Some(([kind, code], [kind, code])),
    }
}

/// What the datapath's parser must make of a frame, written from the protocols' layouts:
/// `Err` for a frame it must drop as malformed or unsupported, `None` for ARP.
fn reference_parse(frame: &[u8]) -> Result<Option<Parsed>, &'static str> {
    let eth = frame.get(..ETH_HLEN).ok_or("shorter than ethernet")?;
    match [eth[12], eth[13]] {
        [0x08, 0x06] => return Ok(None),
        [0x08, 0x00] => {}
        _ => return Err("not ipv4 or arp"),
    }
    let ip = frame.get(ETH_HLEN..ETH_HLEN + 20).ok_or("shorter than ipv4")?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Err("bad version or header length");
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let place = if frag & 0x1fff != 0 {
        Place::Later
    } else if frag & 0x2000 != 0 {
        Place::First
    } else {
        Place::Whole
    };
    let mut p = Parsed {
        eth_src: eth[6..12].try_into().expect("six bytes"),
        saddr: ip[12..16].try_into().expect("four bytes"),
        daddr: ip[16..20].try_into().expect("four bytes"),
        protocol: ip[9],
        id: [ip[4], ip[5]],
        place,
        sport: [0; 2],
        dport: [0; 2],
        policy_port: 0,
        syn: false,
        closing: false,
        icmp_error: false,
        l4: ETH_HLEN + ihl,
    };
    if place == Place::Later {
        return Ok(Some(p));
    }
    let need = match p.protocol {
        proto::TCP => 14,
        proto::UDP | proto::SCTP => 4,
        proto::ICMP => 8,
        _ => 0,
    };
    // Other protocols have no header the datapath reads (their IHL may even point past the end).
    let h = if need == 0 {
        &[][..]
    } else {
        frame.get(p.l4..p.l4 + need).ok_or("l4 header cut short")?
    };
    match p.protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            p.sport = [h[0], h[1]];
            p.dport = [h[2], h[3]];
            p.policy_port = u16::from_be_bytes(p.dport);
            if p.protocol == proto::TCP {
                p.syn = h[13] & 0x12 == 0x02;
                p.closing = h[13] & 0x05 != 0;
            }
        }
        proto::ICMP => match icmp_ports(h[0], h[1], [h[4], h[5]]) {
            Some((s, d)) => (p.sport, p.dport) = (s, d),
            None => p.icmp_error = true,
        },
        _ => {}
    }
    Ok(Some(p))
}

/// A quoted packet's flow: a conntrack tuple without direction.
struct Quote {
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
    protocol: u8,
}

/// The flow an ICMP error at `l4` quotes (RFC 792: the IP header, here without options,
/// and the first 8 bytes of its payload); `None` when the quote is cut short, has options,
/// is a later fragment or is itself an error.
fn reference_quote(frame: &[u8], l4: usize) -> Option<Quote> {
    let m = frame.get(l4 + 8..l4 + 36)?;
    if m[0] != 0x45 || u16::from_be_bytes([m[6], m[7]]) & 0x1fff != 0 {
        return None;
    }
    let protocol = m[9];
    let p = &m[20..];
    let (sport, dport) = match protocol {
        proto::TCP | proto::UDP | proto::SCTP => ([p[0], p[1]], [p[2], p[3]]),
        proto::ICMP => icmp_ports(p[0], p[1], [p[4], p[5]])?,
        _ => ([0; 2], [0; 2]),
    };
    Some(Quote {
        saddr: m[12..16].try_into().ok()?,
        daddr: m[16..20].try_into().ok()?,
        sport,
        dport,
        protocol,
    })
}

fn ct_key(saddr: [u8; 4], daddr: [u8; 4], sport: [u8; 2], dport: [u8; 2], protocol: u8, dir: u8) -> CtKey {
    CtKey {
        saddr,
        daddr,
        sport,
        dport,
        protocol,
        direction: dir,
        _pad: [0; 2],
    }
}

fn passes(d: &Decision) -> bool {
    matches!(d, Decision::NotIsolated | Decision::Allowed(_) | Decision::Audited(_))
}

/// A conntrack entry's byte counts: (to its destination, back to its source).
type Counts = (u64, u64);

/// What the model knows of a conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    counts: Counts,
    /// A FIN or RST was seen on it.
    closing: bool,
}

/// The datapath as it must be, for one input: the endpoint's conntrack entries and the
/// fragment records its frames made.
#[derive(Default)]
struct Model {
    ct: HashMap<CtKey, Entry>,
    fragments: HashSet<FragKey>,
}

impl Model {
    /// Whether the program (`to_pod`, else `from_pod`) must forward `frame` and why; updates
    /// the model with what the frame leaves behind.
    fn verdict(&mut self, h: &mut Harness, local: usize, to_pod: bool, mark: u32, frame: &[u8]) -> (bool, String) {
        let p = match reference_parse(frame) {
            Err(why) => return (false, why.into()),
            Ok(None) => return (true, "ARP".into()),
            Ok(Some(p)) => p,
        };
        let (_, _, local_ip) = LOCALS[local];
        let dir = if to_pod {
            if p.daddr != local_ip {
                return (false, "not to the pod's address".into());
            }
            direction::INGRESS
        } else {
            if p.eth_src != local_mac(local) {
                return (false, "spoofed MAC".into());
            }
            if p.saddr != local_ip {
                return (false, "spoofed address".into());
            }
            direction::EGRESS
        };
        if p.icmp_error && p.place == Place::First {
            return (false, "ICMP error in fragments".into());
        }
        let frag = FragKey {
            saddr: p.saddr,
            daddr: p.daddr,
            id: p.id,
            protocol: p.protocol,
            direction: dir,
        };
        match p.place {
            Place::Later if self.fragments.contains(&frag) => return (true, "a later fragment of an admitted datagram".into()),
            Place::Later => return (false, "a later fragment with no admitted first fragment".into()),
            Place::First => {
                let v = self.flow(h, local, dir, mark, &p, frame.len());
                if v.0 {
                    self.fragments.insert(frag);
                } else {
                    self.fragments.remove(&frag);
                }
                return v;
            }
            Place::Whole => {}
        }
        if p.icmp_error {
            return self.related(frame, &p, dir);
        }
        self.flow(h, local, dir, mark, &p, frame.len())
    }

    /// Conntrack, then the spec for a new flow; `len`: the frame's length.
    fn flow(&mut self, h: &mut Harness, local: usize, dir: u8, mark: u32, p: &Parsed, len: usize) -> (bool, String) {
        let key = ct_key(p.saddr, p.daddr, p.sport, p.dport, p.protocol, dir);
        let reply = ct_key(p.daddr, p.saddr, p.dport, p.sport, p.protocol, opposite(dir));
        let bytes = (len - ETH_HLEN) as u64;
        if !p.syn {
            if let Some(e) = self.ct.get_mut(&key) {
                e.counts.0 += bytes;
                e.closing |= p.closing;
                return (true, "a tracked flow".into());
            }
            if let Some(e) = self.ct.get_mut(&reply) {
                e.counts.1 += bytes;
                e.closing |= p.closing;
                return (true, "a tracked flow's reply".into());
            }
        }
        let remote = if dir == direction::INGRESS {
            // A masqueraded packet's source is the node's, not the client's: an unknown remote.
            if mark & MASQUERADED_MARKS != 0 {
                UNKNOWN
            } else {
                p.saddr
            }
        } else {
            p.daddr
        };
        let decision = h.decide(local, remote, dir, p.protocol, p.policy_port);
        let allowed = passes(&decision);
        if allowed {
            match self.ct.get_mut(&key) {
                // A SYN again on a live connection (a retransmission): its counts go on.
                Some(e) if !e.closing => e.counts.0 += bytes,
                _ => {
                    self.ct.insert(
                        key,
                        Entry {
                            counts: (bytes, 0),
                            closing: false,
                        },
                    );
                }
            }
        }
        (allowed, format!("a new flow, spec: {decision:?}"))
    }

    /// An ICMP error: the quoted packet went the other way, so it is either the opening
    /// packet of a flow tracked in the other direction, or the reply of one tracked in this.
    fn related(&self, frame: &[u8], p: &Parsed, dir: u8) -> (bool, String) {
        let Some(q) = reference_quote(frame, p.l4) else {
            return (false, "an ICMP error without a quote of a flow".into());
        };
        let opening = ct_key(q.saddr, q.daddr, q.sport, q.dport, q.protocol, opposite(dir));
        let reply = ct_key(q.daddr, q.saddr, q.dport, q.sport, q.protocol, dir);
        if self.ct.contains_key(&opening) || self.ct.contains_key(&reply) {
            (true, "an ICMP error quoting a tracked flow".into())
        } else {
            (false, "an ICMP error quoting no tracked flow".into())
        }
    }
}

/// Applies a frame header's repairs; `quote`: make it an ICMP error (of the kind `kind`
/// selects) quoting `prev`.
fn repair(frame: &mut Vec<u8>, flags: u8, addr: u8, port_sel: u8, local: usize, quote: Option<(&[u8], u8)>) {
    let (_, _, local_ip) = LOCALS[local];
    if flags & (flag::FIX_VERSION | flag::FIX_ADDRS | flag::FIX_PROTO | flag::FIX_PORT | flag::FIX_FRAG | flag::FIX_SYN) != 0
        || quote.is_some()
    {
        // Room for Ethernet, IPv4 and a TCP header.
        let min = ETH_HLEN + 20 + 20;
        if frame.len() < min {
            frame.resize(min, 0);
        }
    }
    let to_pod = flags & flag::TO_POD != 0;
    if flags & flag::FIX_ETH != 0 {
        frame.resize(frame.len().max(ETH_HLEN), 0);
        if to_pod {
            frame[..6].copy_from_slice(&local_mac(local));
            frame[6..12].copy_from_slice(&HOST_MAC);
        } else {
            frame[..6].copy_from_slice(&HOST_MAC);
            frame[6..12].copy_from_slice(&local_mac(local));
        }
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
    }
    if frame.len() < ETH_HLEN + 20 {
        return;
    }
    let ip = ETH_HLEN;
    if flags & flag::FIX_VERSION != 0 {
        frame[ip] = 0x45;
    }
    if flags & flag::FIX_ADDRS != 0 {
        let remote = if addr & 0x80 != 0 {
            // Keep the frame's own remote address.
            if to_pod {
                frame[ip + 12..ip + 16].try_into().expect("four bytes")
            } else {
                frame[ip + 16..ip + 20].try_into().expect("four bytes")
            }
        } else {
            REMOTES[usize::from(addr) % REMOTES.len()]
        };
        let (src, dst) = if to_pod { (remote, local_ip) } else { (local_ip, remote) };
        frame[ip + 12..ip + 16].copy_from_slice(&src);
        frame[ip + 16..ip + 20].copy_from_slice(&dst);
    }
    if flags & flag::FIX_PROTO != 0 {
        frame[ip + 9] = PROTOCOLS[usize::from(port_sel >> 4) % PROTOCOLS.len()];
    }
    if flags & flag::FIX_FRAG != 0 {
        frame[ip + 6] &= 0xe0;
        frame[ip + 7] = 0;
    }
    let l4 = ip + usize::from(frame[ip] & 0x0f) * 4;
    if flags & flag::FIX_PORT != 0 && frame.len() >= l4 + 4 {
        let port = PORTS[usize::from(port_sel & 0x0f)];
        frame[l4 + 2..l4 + 4].copy_from_slice(&port.to_be_bytes());
    }
    if flags & flag::FIX_SYN != 0 && frame[ip + 9] == proto::TCP && frame.len() >= l4 + 14 {
        frame[l4 + 13] = 0x02;
    }
    if let Some((prev, kind)) = quote {
        quote_frame(frame, l4, prev, kind);
    }
}

/// Makes `frame` (its L4 header at `l4`) an ICMP error of type 3, 11 or 12 (`kind` selects)
/// quoting `prev`'s IPv4 header, without options, and the first 8 bytes of its payload.
fn quote_frame(frame: &mut Vec<u8>, l4: usize, prev: &[u8], kind: u8) {
    let Some(header) = prev.get(ETH_HLEN..ETH_HLEN + 20) else {
        return;
    };
    let payload = ETH_HLEN + usize::from(header[0] & 0x0f) * 4;
    let mut first8 = [0u8; 8];
    if let Some(b) = prev.get(payload..) {
        let n = b.len().min(8);
        first8[..n].copy_from_slice(&b[..n]);
    }
    frame.resize(frame.len().max(l4 + 36), 0);
    frame[ETH_HLEN + 9] = proto::ICMP;
    frame[l4] = [3, 11, 12, 3][usize::from(kind & 3)];
    frame[l4 + 8..l4 + 28].copy_from_slice(header);
    frame[l4 + 8] = 0x45;
    frame[l4 + 28..l4 + 36].copy_from_slice(&first8);
}

/// Runs `frame` and checks its verdict against the model's; false when the input cannot be
/// checked further (see below).
fn check_frame(h: &mut Harness, model: &mut Model, started: Instant, local: usize, flags: u8, mark: u32, frame: &[u8]) -> bool {
    let to_pod = flags & flag::TO_POD != 0;
    let program = if to_pod { program_names::TO_POD } else { program_names::FROM_POD };
    // The kernel refused to run it: the datapath saw nothing, and neither does the model.
    let Some(action) = h.run(program, frame, mark) else {
        return true;
    };
    assert!(
        action == TC_ACT_OK || action == TC_ACT_SHOT,
        "{program}: action {action} (no Service is configured)"
    );
    let forwarded = action == TC_ACT_OK;
    let (expected, why) = model.verdict(h, local, to_pod, mark, frame);
    if h.trace {
        eprintln!("[frame] {program} {} ({why})", if forwarded { "forwarded" } else { "dropped" });
    }
    // Time only ever takes away (a datagram flow idle a second meets policy again, which may
    // resolve its remote differently under another mark): a drop the model does not expect,
    // in an input the machine stalled for that long, is no finding, and the model, which has
    // no clock, cannot follow the rest of the input.
    if !forwarded && expected && started.elapsed() >= Duration::from_nanos(CT_REFRESH_NS) {
        return false;
    }
    if forwarded != expected {
        let kind = if forwarded { "wrong allow" } else { "wrong deny" };
        panic!(
            "{kind}: {program} {} a frame the model {} ({why}); mark {mark:#x} local {:?} parsed {:?} frame {frame:02x?}",
            if forwarded { "forwarded" } else { "dropped" },
            if expected { "forwards" } else { "drops" },
            LOCALS[local],
            reference_parse(frame),
        );
    }
    true
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let mut h = harness().lock().unwrap_or_else(|e| e.into_inner());
    let local = usize::from(first) % LOCALS.len();
    h.install(local);
    h.clear();
    let mut model = Model::default();
    let mut prev: Vec<u8> = Vec::new();
    let started = Instant::now();
    for _ in 0..MAX_FRAMES {
        let Some((header, body)) = rest.split_first_chunk::<HEADER>() else {
            break;
        };
        let [flags, addr, port_sel, mark_sel, len] = *header;
        let len = usize::from(len).min(body.len());
        let mut frame = body[..len].to_vec();
        rest = &body[len..];
        // Bit 5 of the mark selector: an ICMP error quoting the frame before (bits 2-3: its type).
        let quote = (mark_sel & 0x20 != 0).then_some((prev.as_slice(), mark_sel >> 2));
        repair(&mut frame, flags, addr, port_sel, local, quote);
        // The kernel refuses test runs on less than an Ethernet header.
        frame.resize(frame.len().max(ETH_HLEN), 0);
        let mark = match mark_sel >> 6 {
            0 => 0,
            3 => u32::from_be_bytes([mark_sel, addr, port_sel, flags]),
            _ => MARKS[usize::from(mark_sel) % MARKS.len()],
        };
        if !check_frame(&mut h, &mut model, started, local, flags, mark, &frame) {
            return;
        }
        prev = frame;
    }
    // What the frames left behind: exactly the flows and datagrams the model admitted.
    let (ct, frags) = h.tracked();
    let expected: HashMap<CtKey, Counts> = model.ct.iter().map(|(k, e)| (*k, e.counts)).collect();
    assert_eq!(
        ct, expected,
        "the endpoint's conntrack table and its byte counts (left) differ from the model's (right)"
    );
    assert_eq!(
        frags, model.fragments,
        "the fragment records (left) differ from the model's (right)"
    );
});
