//! Arbitrary frames through the real `from_pod` and `to_pod` programs (`BPF_PROG_TEST_RUN`)
//! with a fixed compiled policy in the maps: **no wrong allow**. Every frame the programs
//! forward must be ARP, or a well-formed, unfragmented IPv4 packet from (to) the local pod's
//! own addresses whose flow the spec evaluator (`policy::evaluate`) allows in that
//! direction, or one conntrack may pass: the reply to, or a later packet of, a flow an
//! earlier frame of the same input opened. The converse is checked too (no wrong deny): a
//! well-formed opening packet the evaluator allows is forwarded.
//!
//! An input is up to `MAX_FRAMES` frames, each behind a five-byte header that can repair
//! parts of it (Ethernet, IPv4 version, addresses from the cluster, protocol, port, mark),
//! so that the fuzzer reaches policy as well as the parser's corners. Conntrack is emptied
//! before each input, so an input's verdicts depend on nothing but itself.
//!
//! Needs root and BPF; maps are pinned under `/sys/fs/bpf/bulkhead-fuzz-<pid>`, removed at
//! exit (scripts/fuzz.sh also removes what a crashed run leaves).
#![no_main]

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use aya::programs::{ProgramError, TestRun, TestRunOptions};
use bulkhead::datapath::sync::sync;
use bulkhead::datapath::{Datapath, DatapathState};
use bulkhead::model::{parse_documents, Cluster, Object};
use bulkhead::policy::{evaluate, Compiler, Decision, LocalEndpoint};
use bulkhead_common::{
    direction, map_names, program_names, proto, CtEntry, CtKey, GENERATED_REPLY_MARK, KUBE_PROXY_MASQ_MARK, MASQUERADED_MARKS, SNAT_MARK,
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
    conntrack: BpfHashMap<MapData, CtKey, CtEntry>,
    states: Vec<DatapathState>,
    installed: usize,
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
    if let Some(h) = harness().try_lock().ok() {
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
        let ct = MapData::from_pin(pin_dir.join(map_names::CONNTRACK)).expect("pinned conntrack map");
        let conntrack = BpfHashMap::try_from(Map::from_map_data(ct).expect("conntrack map type")).expect("conntrack map");
        let objects = parse_documents(CLUSTER, "cluster").expect("fixed cluster parses");
        let cluster = Cluster::from_objects(objects);
        let mut compiler = Compiler::new();
        let states: Vec<DatapathState> = LOCALS
            .iter()
            .enumerate()
            .map(|(i, (ns, pod, ip))| {
                let ep = LocalEndpoint {
                    endpoint_id: 10 + u32::try_from(i).expect("few locals"),
                    host_ifindex: LO,
                    namespace: (*ns).into(),
                    pod: (*pod).into(),
                    ipv4: Ipv4Addr::from(*ip),
                    mac: local_mac(i),
                };
                compiler.compile(&cluster, &[ep])
            })
            .collect();
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
            conntrack,
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
        }
    }

    fn clear_conntrack(&mut self) {
        let keys: Vec<CtKey> = self.conntrack.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.conntrack.remove(&k);
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

/// A frame's IPv4 facts as the datapath reads them.
#[derive(Debug)]
struct Parsed {
    eth_src: [u8; 6],
    saddr: [u8; 4],
    daddr: [u8; 4],
    protocol: u8,
    id: u16,
    more_fragments: bool,
    fragment_offset: u16,
    sport: u16,
    dport: u16,
    /// TCP SYN without ACK.
    syn: bool,
}

/// What the datapath's parser (datapath-ebpf/src/packet.rs) makes of a frame, written
/// from the protocols' layouts: `Err` for a frame it must drop as malformed or unsupported.
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
    let mut p = Parsed {
        eth_src: eth[6..12].try_into().expect("six bytes"),
        saddr: ip[12..16].try_into().expect("four bytes"),
        daddr: ip[16..20].try_into().expect("four bytes"),
        protocol: ip[9],
        id: u16::from_be_bytes([ip[4], ip[5]]),
        more_fragments: frag & 0x2000 != 0,
        fragment_offset: frag & 0x1fff,
        sport: 0,
        dport: 0,
        syn: false,
    };
    if p.fragment_offset != 0 {
        return Ok(Some(p));
    }
    let l4 = ETH_HLEN + ihl;
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
        frame.get(l4..l4 + need).ok_or("l4 header cut short")?
    };
    match p.protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            p.sport = u16::from_be_bytes([h[0], h[1]]);
            p.dport = u16::from_be_bytes([h[2], h[3]]);
            if p.protocol == proto::TCP {
                p.syn = h[13] & 0x12 == 0x02;
            }
        }
        proto::ICMP => {
            let id = u16::from_be_bytes([h[4], h[5]]);
            match h[0] {
                8 => p.sport = id,
                0 => p.dport = id,
                _ => {}
            }
        }
        _ => {}
    }
    Ok(Some(p))
}

fn passes(d: &Decision) -> bool {
    matches!(d, Decision::NotIsolated | Decision::Allowed(_) | Decision::Audited(_))
}

/// Applies a frame header's repairs.
fn repair(frame: &mut Vec<u8>, flags: u8, addr: u8, port_sel: u8, local: usize) {
    let (_, _, local_ip) = LOCALS[local];
    if flags & (flag::FIX_VERSION | flag::FIX_ADDRS | flag::FIX_PROTO | flag::FIX_PORT | flag::FIX_FRAG | flag::FIX_SYN) != 0 {
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
}

/// Conntrack as the oracle knows it: the keys of every flow the datapath may have opened
/// in this input (a superset of what it holds, so it never excuses too little).
type Tracked = HashSet<([u8; 4], [u8; 4], u16, u16, u8, u8)>;

fn check_frame(
    h: &mut Harness,
    local: usize,
    flags: u8,
    mark: u32,
    frame: &[u8],
    tracked: &mut Tracked,
    fragments: &mut HashSet<([u8; 4], [u8; 4], u16, u8)>,
) {
    let to_pod = flags & flag::TO_POD != 0;
    let (program, dir) = if to_pod {
        (program_names::TO_POD, direction::INGRESS)
    } else {
        (program_names::FROM_POD, direction::EGRESS)
    };
    let Some(action) = h.run(program, frame, mark) else {
        return;
    };
    assert!(
        action == TC_ACT_OK || action == TC_ACT_SHOT,
        "{program}: action {action} (no Service is configured)"
    );
    let forwarded = action == TC_ACT_OK;
    let what = || format!("{program} mark {mark:#x} local {:?} frame {frame:02x?}", LOCALS[local]);
    let parsed = match reference_parse(frame) {
        Err(why) => {
            assert!(
                !forwarded,
                "wrong allow: a frame the parser must drop ({why}) was forwarded: {}",
                what()
            );
            return;
        }
        Ok(None) => return, // ARP passes; dropping it is no wrong allow either.
        Ok(Some(p)) => p,
    };
    let (_, _, local_ip) = LOCALS[local];
    let own = if to_pod {
        parsed.daddr == local_ip
    } else {
        parsed.eth_src == local_mac(local) && parsed.saddr == local_ip
    };
    if !own {
        assert!(
            !forwarded,
            "wrong allow: spoofed or misdelivered packet forwarded: {parsed:?} {}",
            what()
        );
        return;
    }
    let frag_key = (parsed.saddr, parsed.daddr, parsed.id, parsed.protocol);
    if parsed.fragment_offset != 0 {
        assert!(
            !forwarded || fragments.contains(&frag_key),
            "wrong allow: a non-first fragment without an admitted first fragment was forwarded: {parsed:?} {}",
            what()
        );
        return;
    }
    let remote = if to_pod {
        // A masqueraded packet's source is the node's, not the client's: an unknown remote.
        if mark & MASQUERADED_MARKS != 0 {
            UNKNOWN
        } else {
            parsed.saddr
        }
    } else {
        parsed.daddr
    };
    let policy_port = match parsed.protocol {
        proto::TCP | proto::UDP | proto::SCTP => parsed.dport,
        _ => 0,
    };
    let decision = h.decide(local, remote, dir, parsed.protocol, policy_port);
    let key = (parsed.saddr, parsed.daddr, parsed.sport, parsed.dport, parsed.protocol, dir);
    let reply_dir = if dir == direction::EGRESS {
        direction::INGRESS
    } else {
        direction::EGRESS
    };
    let reverse = (parsed.daddr, parsed.saddr, parsed.dport, parsed.sport, parsed.protocol, reply_dir);
    let tracked_hit = !parsed.syn && (tracked.contains(&key) || tracked.contains(&reverse));
    if passes(&decision) {
        if !tracked_hit {
            assert!(forwarded, "wrong deny: the spec allows ({decision:?}) {parsed:?} {}", what());
        }
        if forwarded {
            tracked.insert(key);
            if parsed.more_fragments {
                fragments.insert(frag_key);
            }
        }
    } else {
        assert!(
            !forwarded || tracked_hit,
            "wrong allow: the spec denies ({decision:?}) and no earlier flow explains it: {parsed:?} {}",
            what()
        );
        if forwarded && parsed.more_fragments {
            fragments.insert(frag_key);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let mut h = harness().lock().unwrap_or_else(|e| e.into_inner());
    let local = usize::from(first) % LOCALS.len();
    h.install(local);
    h.clear_conntrack();
    let mut tracked = Tracked::new();
    let mut fragments = HashSet::new();
    for _ in 0..MAX_FRAMES {
        let Some((header, body)) = rest.split_first_chunk::<HEADER>() else {
            break;
        };
        let [flags, addr, port_sel, mark_sel, len] = *header;
        let len = usize::from(len).min(body.len());
        let mut frame = body[..len].to_vec();
        rest = &body[len..];
        repair(&mut frame, flags, addr, port_sel, local);
        // The kernel refuses test runs on less than an Ethernet header.
        frame.resize(frame.len().max(ETH_HLEN), 0);
        let mark = match mark_sel >> 6 {
            0 => 0,
            3 => u32::from_be_bytes([mark_sel, addr, port_sel, flags]),
            _ => MARKS[usize::from(mark_sel) % MARKS.len()],
        };
        check_frame(&mut h, local, flags, mark, &frame, &mut tracked, &mut fragments);
    }
});
