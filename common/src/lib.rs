//! The ABI between the Bulkhead eBPF datapath and the agent.
//!
//! Every map key and value, map name, capacity and verdict constant lives here and
//! nowhere else. Structs are `#[repr(C)]` with explicit padding so that kernel and user
//! space agree byte for byte; each has a compile-time size assertion.
#![no_std]

/// Layout version carried in every pinned map name; bump it when a layout changes.
pub const LAYOUT_VERSION: u32 = 1;

/// Pinned map names (at most 15 bytes, the kernel's `BPF_OBJ_NAME_LEN` less the NUL).
pub mod map_names {
    /// Host-side ifindex → [`EndpointInfo`](super::EndpointInfo).
    pub const ENDPOINTS: &str = "bh_endp_v1";
    /// LPM trie IPv4 → [`IpcacheValue`](super::IpcacheValue).
    pub const IPCACHE: &str = "bh_ipc_v1";
    /// LPM trie [`PolicyKey`](super::PolicyKey) → [`PolicyValue`](super::PolicyValue).
    pub const POLICY: &str = "bh_pol_v1";
    /// Hash of maps: endpoint id (`u32`, host order) → that endpoint's own conntrack table,
    /// an LRU hash [`CtKey`](super::CtKey) → [`CtEntry`](super::CtEntry) of
    /// [`capacity::CONNTRACK_PER_ENDPOINT`](super::capacity::CONNTRACK_PER_ENDPOINT) entries:
    /// a pod churning new flows evicts only its own entries. The agent creates an endpoint's
    /// table before it writes the endpoint and removes it after the endpoint. Layout 3: the
    /// entries carry byte counts.
    pub const CONNTRACK: &str = "bh_ct_v3";
    /// Layout 2 of [`CONNTRACK`]: the same hash of per-endpoint tables, of
    /// [`CtEntryV2`](super::CtEntryV2) entries (no byte counts); a starting agent copies
    /// them into the layout-3 tables and unpins it.
    pub const CONNTRACK_V2: &str = "bh_ct_v2";
    /// The one shared LRU hash [`CtKey`](super::CtKey) → [`CtEntryV2`](super::CtEntryV2) of
    /// layout 1: programs attached before an upgrade keep using it; a starting agent copies its
    /// entries into the endpoints' tables.
    pub const CONNTRACK_V1: &str = "bh_ct_v1";
    /// Per-CPU array of [`Counter`](super::Counter), indexed by [`counter_index`](super::counter_index).
    pub const COUNTERS: &str = "bh_cnt_v1";
    /// Ring buffer of [`FlowEvent`](crate::FlowEvent)s.
    pub const FLOWS: &str = "bh_flow_v1";
    /// Per-CPU array, one `u64` slot: flow events the ring buffer could not take.
    pub const FLOWS_LOST: &str = "bh_flost_v1";
    /// LRU per-CPU hash endpoint id (`u32`, host order; 0 for packets of no known endpoint)
    /// → [`FlowBudget`](super::FlowBudget): each endpoint's flow-record token bucket and
    /// the records it suppressed (issue 12.5).
    pub const FLOW_BUDGET: &str = "bh_fbudget_v1";
    /// Hash [`ServiceKey`](super::ServiceKey) → [`ServiceValue`](super::ServiceValue):
    /// slot 0 is a Service port's header, slots 1..=count its backends.
    pub const SERVICES: &str = "bh_svc_v1";
    /// Hash backend id (`u32`, host order) → [`Backend`](super::Backend).
    pub const BACKENDS: &str = "bh_be_v1";
    /// LRU hash [`CtKey`](super::CtKey) (the client→VIP tuple, egress) →
    /// [`LbNat`](super::LbNat): the backend each Service connection was given.
    pub const LB_NAT: &str = "bh_lbnat_v1";
    /// Hash reverse-NAT index (`u32`, host order: a [`ServiceValue::service_id`](super::ServiceValue))
    /// → [`RevNat`](super::RevNat): the VIP and port replies get back as their source.
    pub const REV_NAT: &str = "bh_lbrev_v1";
    /// LRU hash [`AffinityKey`](super::AffinityKey) → [`AffinityValue`](super::AffinityValue)
    /// for `sessionAffinity: ClientIP`.
    pub const AFFINITY: &str = "bh_lbaff_v1";
    /// LRU hash [`FragKey`](super::FragKey) → [`FragEntry`](super::FragEntry): the IP
    /// datagrams whose first fragment was admitted, so that their later fragments (which
    /// carry no ports) follow it.
    pub const FRAGMENTS: &str = "bh_frag_v1";
    /// LPM trie [`Ipv4Key`](super::Ipv4Key) → `u32` (reserved, 0): the uplink prefilter's
    /// deny list. An IPv4 packet whose source it holds is dropped at XDP on the uplink,
    /// unless [`PREFILTER_KEEP`] holds the source too.
    pub const PREFILTER_DENY: &str = "bh_pfdeny_v1";
    /// LPM trie [`Ipv4Key`](super::Ipv4Key) → `u32` (reserved, 0): sources the prefilter
    /// never drops, whatever the deny list says (this node's addresses and underlay subnets,
    /// the cluster and pod CIDRs). Looked up only for a source the deny list holds.
    pub const PREFILTER_KEEP: &str = "bh_pfkeep_v1";
    /// Per-CPU array, one [`Counter`](super::Counter) slot: packets the prefilter dropped.
    pub const PREFILTER_COUNTERS: &str = "bh_pfcnt_v1";
    /// Per-CPU array of [`Counter`](super::Counter) indexed by [`DropReason`](super::DropReason)
    /// number: pod packets `xdp_from_pod` dropped before TC (also counted in [`COUNTERS`] as
    /// TC would have counted them, direction egress).
    pub const XDP_COUNTERS: &str = "bh_xdpcnt_v1";
    /// Hash [`Ipv4Key`](super::Ipv4Key) → `u32` (reserved, 0): the address of every
    /// quarantined pod in the cluster, whatever its node. A packet whose remote end it holds
    /// is dropped with [`DropReason::Quarantined`](super::DropReason::Quarantined), so that a
    /// node's own pods cannot reach a quarantined pod elsewhere, nor it them.
    pub const QUARANTINE: &str = "bh_quar_v1";
    /// Array of one `u32`: how many addresses [`QUARANTINE`] holds, at least when there are
    /// any. While it is 0 the datapath skips the [`QUARANTINE`] lookup (one array read per
    /// packet when nothing is quarantined). The agent writes it after adding addresses and
    /// after removing them.
    pub const QUARANTINE_COUNT: &str = "bh_quarn_v1";
}

/// Program names in the eBPF object.
pub mod program_names {
    /// TC ingress of the host-side veth: packets the pod sends (its egress).
    pub const FROM_POD: &str = "from_pod";
    /// TC egress of the host-side veth: packets the pod receives (its ingress).
    pub const TO_POD: &str = "to_pod";
    /// XDP on the host-side veth: drops what `from_pod` would certainly drop (a spoofed
    /// source, a new flow policy denies) before an skb exists; passes everything else to TC.
    pub const XDP_FROM_POD: &str = "xdp_from_pod";
    /// XDP on the node's uplink device(s): drops IPv4 packets from the prefilter's deny list.
    pub const PREFILTER: &str = "xdp_prefilter";
}

/// Map capacities.
pub mod capacity {
    /// Local endpoints per node.
    pub const ENDPOINTS: u32 = 4096;
    /// Cluster-wide IPs and CIDRs known to a node.
    pub const IPCACHE: u32 = 65536;
    /// Policy entries per node (all local endpoints, both directions).
    pub const POLICY: u32 = 262_144;
    /// Tracked connections per node of the shared layout-1 table, and the size of the
    /// Service translation records ([`LB_NAT`]).
    pub const CONNTRACK: u32 = 262_144;
    /// Tracked connections per endpoint (its own LRU: about 96 bytes an entry, 0.8 MB a
    /// pod, allocated when the endpoint is written). Past it a pod evicts its own least
    /// recently used entries, never another pod's.
    pub const CONNTRACK_PER_ENDPOINT: u32 = 8192;
    /// Conntrack tables: one per endpoint.
    pub const CONNTRACK_TABLES: u32 = ENDPOINTS;
    /// Bytes of the flow ring buffer (a power of two, a multiple of the page size).
    pub const FLOW_RING_BYTES: u32 = 1 << 22;
    /// Unread bytes in the flow ring from which a record wakes the agent's reader at once:
    /// 1/16 of the ring, about 4000 records. Below it records go in without a wakeup
    /// (`BPF_RB_NO_WAKEUP`: a wakeup per record cost 3% of a core at a high new-flow rate)
    /// and wait for the reader's timer, [`FLOW_READ_INTERVAL_MS`](super::FLOW_READ_INTERVAL_MS).
    pub const FLOW_RING_WAKEUP_BYTES: u64 = FLOW_RING_BYTES as u64 / 16;
    /// Service map entries: one header per Service port plus one per backend slot.
    pub const SERVICES: u32 = 65536;
    /// Backends per node (every backend of every Service, shared between Services).
    pub const BACKENDS: u32 = 65536;
    /// Translation records: one per tracked Service connection.
    pub const LB_NAT: u32 = CONNTRACK;
    /// Reverse-NAT entries: one per Service port ([`MAX_SERVICE_ID`](super::MAX_SERVICE_ID)).
    pub const REV_NAT: u32 = 65536;
    /// Clients remembered per Service with `sessionAffinity: ClientIP`.
    pub const AFFINITY: u32 = 65536;
    /// Flow-record budgets: one per endpoint, and one for packets of no known endpoint.
    pub const FLOW_BUDGET: u32 = ENDPOINTS + 1;
    /// Fragmented datagrams in flight per node (Cilium's `CILIUM_IPV4_FRAG_MAP_MAX_ENTRIES`
    /// is 8192). An entry matters for milliseconds; an evicted one costs its datagram's later
    /// fragments (they drop as `fragment`), never an allow.
    pub const FRAGMENTS: u32 = 16384;
    /// Entries of the prefilter's deny list.
    pub const PREFILTER_DENY: u32 = 65536;
    /// Entries of the prefilter's never-drop list.
    pub const PREFILTER_KEEP: u32 = 4096;
    /// Quarantined pod addresses, cluster-wide.
    pub const QUARANTINE: u32 = 4096;
}

/// How often the agent reads the flow ring without being woken: records below
/// [`capacity::FLOW_RING_WAKEUP_BYTES`] wait at most this long.
pub const FLOW_READ_INTERVAL_MS: u64 = 50;

/// Flow records one endpoint may put on the ring per second, per CPU, once its burst is
/// spent; past it records are counted as suppressed instead ([`FlowBudget`]).
pub const FLOW_RECORDS_PER_SEC: u64 = 1000;
/// Flow records one endpoint may put on the ring at once, per CPU (the bucket's depth).
/// With 110 pods on 2 CPUs all bursting at once: 440 000 records, several ring buffers'
/// worth; one pod alone: 4000, about 5 % of the ring (75 000 records).
pub const FLOW_RECORDS_BURST: u64 = 2000;
/// One record's worth of credit, in nanoseconds of refill.
pub const FLOW_RECORD_COST_NS: u64 = 1_000_000_000 / FLOW_RECORDS_PER_SEC;

/// One endpoint's flow-record token bucket on one CPU, credit counted in nanoseconds of
/// refill (no division on the packet path). The all-zero value is a full bucket (its last
/// refill was at boot), which is what the kernel gives the other CPUs of a new entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBudget {
    /// Credit left, at most `FLOW_RECORDS_BURST * FLOW_RECORD_COST_NS`.
    pub credit_ns: u64,
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
    /// Records not put on the ring for want of credit, since the entry was made.
    pub suppressed: u64,
}

impl FlowBudget {
    /// Most credit a bucket holds.
    pub const MAX_CREDIT_NS: u64 = FLOW_RECORDS_BURST * FLOW_RECORD_COST_NS;
    /// Credit byte reports leave in the bucket: half of it is only ever spent on packet
    /// records (drops, new flows), so that a pod's busy connections cannot silence its drops.
    pub const REPORT_RESERVE_NS: u64 = Self::MAX_CREDIT_NS / 2;

    /// Refills the bucket to `now` and takes one record's worth: `true` when the record
    /// may go on the ring, `false` when it is suppressed (and counted).
    pub fn take(&mut self, now: u64) -> bool {
        self.take_above(now, 0)
    }

    /// [`FlowBudget::take`] for a byte report ([`flow_kind::UPDATE`], [`flow_kind::END`]):
    /// only out of the credit above [`FlowBudget::REPORT_RESERVE_NS`].
    pub fn take_report(&mut self, now: u64) -> bool {
        self.take_above(now, Self::REPORT_RESERVE_NS)
    }

    /// Takes one record's worth when that leaves at least `reserve` credit.
    #[inline(always)]
    fn take_above(&mut self, now: u64, reserve: u64) -> bool {
        let refilled = self.credit_ns.saturating_add(now.saturating_sub(self.last_ns));
        let credit = if refilled > Self::MAX_CREDIT_NS {
            Self::MAX_CREDIT_NS
        } else {
            refilled
        };
        if now > self.last_ns {
            self.last_ns = now;
        }
        if credit >= FLOW_RECORD_COST_NS + reserve {
            self.credit_ns = credit - FLOW_RECORD_COST_NS;
            true
        } else {
            self.credit_ns = credit;
            self.suppressed += 1;
            false
        }
    }
}

/// Most backends one Service port can have (slots 1..=this); the agent keeps to it.
pub const MAX_SERVICE_BACKENDS: u16 = 0xfffe;

/// Largest [`ServiceValue::service_id`]: it travels in the upper 16 bits of
/// [`CtEntry::flags`] as the reverse-NAT index (Cilium's `rev_nat_index` is 16 bits too).
/// 0 is not a Service.
pub const MAX_SERVICE_ID: u32 = 0xffff;

/// Reserved identities; allocated identities start at [`identity::FIRST_ALLOCATED`].
pub mod identity {
    /// Wildcard: in a policy key, any remote identity.
    pub const ANY: u32 = 0;
    /// The node itself.
    pub const HOST: u32 = 1;
    /// Any address the ipcache does not know.
    pub const WORLD: u32 = 2;
    /// First identity handed out for a label set.
    pub const FIRST_ALLOCATED: u32 = 256;
}

/// The skb mark bit kube-proxy sets (chain `KUBE-MARK-MASQ`) on packets it will masquerade
/// to the node's address: NodePort and `externalTrafficPolicy: Cluster` traffic the node
/// forwards for a client elsewhere. kube-proxy's `--iptables-masquerade-bit` defaults to 14:
/// <https://kubernetes.io/docs/reference/command-line-tools-reference/kube-proxy/>.
pub const KUBE_PROXY_MASQ_MARK: u32 = 1 << 14;

/// The skb mark bit the agent's nftables table sets on every packet the node source-NATed
/// (conntrack `snat` status, original direction), after all srcnat chains have run.
///
/// kube-proxy clears [`KUBE_PROXY_MASQ_MARK`] in `KUBE-POSTROUTING` just before it
/// masquerades (so that a re-traversing packet is not masqueraded twice), and sets it only
/// on a connection's first packet: at TC egress of a pod's veth, after POSTROUTING, it is
/// gone. This bit says the same thing on every packet of such a connection, whoever
/// masqueraded it. Bit 12: clear of kube-proxy's 14 and 15, Cilium's 0x0f00 and
/// Calico's upper half.
pub const SNAT_MARK: u32 = 1 << 12;

/// The skb mark bit `from_pod` sets on a reply it crafts itself and sends back to the pod
/// (the TCP RST or ICMP port unreachable a Service port that cannot take a packet answers
/// with): `to_pod` delivers exactly such a reply without conntrack or policy. Pods cannot
/// forge it: the kernel clears the mark when a packet crosses network namespaces
/// (`skb_scrub_packet`). Bit 13: clear of the other marks above.
pub const GENERATED_REPLY_MARK: u32 = 1 << 13;

/// Mark bits that say the node forwarded the packet for someone else under its own address.
pub const MASQUERADED_MARKS: u32 = KUBE_PROXY_MASQ_MARK | SNAT_MARK;

/// IPv4 prefix length of the ipcache lookup that names a packet's remote end.
///
/// A packet the node forwards and masquerades for someone else ([`MASQUERADED_MARKS`] on
/// a packet to the pod) carries a node address that is not its real source, so it must not
/// resolve to [`identity::HOST`]: it is an unknown remote. Looking it up with prefix length
/// 0 gives exactly what an unknown address gets: the identity of an ipBlock `0.0.0.0/0`
/// when a policy names one, else [`identity::WORLD`]. Everything else resolves its address
/// in full (32).
pub const fn remote_lookup_prefix(dir: u8, mark: u32) -> u32 {
    if dir == direction::INGRESS && mark & MASQUERADED_MARKS != 0 {
        0
    } else {
        32
    }
}

/// Traffic direction, from the local endpoint's point of view.
pub mod direction {
    /// Packets the endpoint receives.
    pub const INGRESS: u8 = 0;
    /// Packets the endpoint sends.
    pub const EGRESS: u8 = 1;
    /// Number of directions.
    pub const COUNT: u32 = 2;
}

/// Isolation flags of an endpoint ([`EndpointInfo::flags`]).
pub mod endpoint_flags {
    /// Some policy selects the endpoint for ingress: unmatched inbound flows drop.
    pub const ISOLATED_INGRESS: u32 = 1 << 0;
    /// Some policy selects the endpoint for egress: unmatched outbound flows drop.
    pub const ISOLATED_EGRESS: u32 = 1 << 1;
    /// Ingress is isolated only by policies in audit mode: what they would drop is
    /// forwarded and reported with [`verdict::AUDIT`](crate::verdict::AUDIT).
    pub const AUDIT_INGRESS: u32 = 1 << 2;
    /// As [`AUDIT_INGRESS`], for egress.
    pub const AUDIT_EGRESS: u32 = 1 << 3;
    /// The endpoint is quarantined: every IPv4 packet it sends or receives is dropped with
    /// [`DropReason::Quarantined`](crate::DropReason::Quarantined), ahead of Service
    /// translation, conntrack and policy (so established connections stop too), except
    /// with its own node when [`QUARANTINE_ALLOW_HOST`] is set too.
    pub const QUARANTINED: u32 = 1 << 4;
    /// With [`QUARANTINED`]: packets whose remote end resolves to
    /// [`identity::HOST`](crate::identity::HOST) (with
    /// [`remote_lookup_prefix`](crate::remote_lookup_prefix), as policy resolves it) still
    /// pass, so that probes and forensics from the node reach the pod. Without it, the node
    /// is cut off too (the stricter default of a missing bit).
    pub const QUARANTINE_ALLOW_HOST: u32 = 1 << 5;
}

/// IP protocol numbers the datapath parses.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// SCTP.
    pub const SCTP: u8 = 132;
    /// Wildcard in a policy key (covered by the prefix length, so never compared).
    pub const ANY: u8 = 0;
}

/// Why a packet was dropped; `Forwarded` (0) is the verdict for passed packets.
///
/// Numbers are stable: they appear in metrics and flow records. Never reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not dropped.
    Forwarded = 0,
    /// The interface is not a known endpoint (fail closed).
    UnknownEndpoint = 1,
    /// An ethertype other than IPv4 or ARP.
    UnsupportedEthertype = 2,
    /// A header shorter than it claims, or a bad IHL.
    Malformed = 3,
    /// Source MAC is not the endpoint's.
    SpoofedMac = 4,
    /// Source IP is not the endpoint's.
    SpoofedIp = 5,
    /// No policy entry allows the flow while the endpoint is isolated.
    PolicyDenied = 6,
    /// A non-first IP fragment whose datagram's first fragment was not admitted here within
    /// [`FRAG_LIFETIME_NS`]: denied, not seen yet (out of order) or never sent. It carries no
    /// ports of its own to check.
    Fragment = 7,
    /// The conntrack map refused a new entry.
    CtInsertFailed = 8,
    /// A packet to the endpoint with another destination address.
    WrongDestination = 9,
    /// A packet to a Service port that has no backend for it: none at all, the connection's
    /// backend is gone, or (SCTP) the backend's port differs from the Service port.
    NoServiceBackend = 10,
    /// An ICMP error (destination unreachable, time exceeded, parameter problem) that quotes
    /// no flow the endpoint's conntrack holds in the direction the quote implies, or quotes
    /// nothing it can parse.
    IcmpUnrelated = 11,
    /// The local endpoint is quarantined ([`endpoint_flags::QUARANTINED`]), or the packet's
    /// remote end is a quarantined pod ([`map_names::QUARANTINE`]).
    Quarantined = 12,
}

impl DropReason {
    /// Every reason, in number order.
    pub const ALL: [DropReason; 13] = [
        DropReason::Forwarded,
        DropReason::UnknownEndpoint,
        DropReason::UnsupportedEthertype,
        DropReason::Malformed,
        DropReason::SpoofedMac,
        DropReason::SpoofedIp,
        DropReason::PolicyDenied,
        DropReason::Fragment,
        DropReason::CtInsertFailed,
        DropReason::WrongDestination,
        DropReason::NoServiceBackend,
        DropReason::IcmpUnrelated,
        DropReason::Quarantined,
    ];
    /// Number of counter slots per direction (room for reasons to come).
    pub const SLOTS: u32 = 32;

    /// The stable snake_case name used in metrics and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Forwarded => "forwarded",
            DropReason::UnknownEndpoint => "unknown_endpoint",
            DropReason::UnsupportedEthertype => "unsupported_ethertype",
            DropReason::Malformed => "malformed",
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::SpoofedIp => "spoofed_ip",
            DropReason::PolicyDenied => "policy_denied",
            DropReason::Fragment => "fragment",
            DropReason::CtInsertFailed => "ct_insert_failed",
            DropReason::WrongDestination => "wrong_destination",
            DropReason::NoServiceBackend => "no_service_backend",
            DropReason::IcmpUnrelated => "icmp_unrelated",
            DropReason::Quarantined => "quarantined",
        }
    }
}

/// Index into the counters map for a (reason, direction) pair.
pub const fn counter_index(reason: DropReason, direction: u8) -> u32 {
    (direction as u32) * DropReason::SLOTS + reason as u32
}

/// Size of the counters map.
pub const COUNTER_SLOTS: u32 = DropReason::SLOTS * direction::COUNT;

/// A local endpoint, keyed by the host-side veth's ifindex (host byte order `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointInfo {
    /// Agent-assigned endpoint id, the first field of its policy keys.
    pub endpoint_id: u32,
    /// Security identity of the pod.
    pub identity: u32,
    /// Pod IPv4 address, network byte order (as it sits in the packet).
    pub ipv4: [u8; 4],
    /// [`endpoint_flags`] bits.
    pub flags: u32,
    /// Pod-side MAC address.
    pub mac: [u8; 6],
    /// Explicit padding; zero.
    pub _pad: [u8; 2],
}

/// An IPv4 LPM key body for the ipcache; the prefix length is carried by the LPM key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Key {
    /// Address, network byte order.
    pub addr: [u8; 4],
}

/// What the ipcache knows about an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpcacheValue {
    /// Security identity of the address.
    pub identity: u32,
    /// Reserved; zero.
    pub flags: u32,
}

/// Policy LPM key body. All fields are big-endian so that the LPM prefix runs over
/// endpoint, identity, direction, protocol and then the port's high bits.
///
/// Prefix lengths: [`POLICY_PREFIX_ANY_PROTO`] matches every protocol and port,
/// [`POLICY_PREFIX_ANY_PORT`] one protocol and every port, and
/// `POLICY_PREFIX_ANY_PORT + n` the ports sharing their top `n` bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// Endpoint id, big-endian.
    pub endpoint_id: [u8; 4],
    /// Remote identity or [`identity::ANY`], big-endian.
    pub remote_identity: [u8; 4],
    /// [`direction`] of the flow relative to the endpoint.
    pub direction: u8,
    /// IP protocol, [`proto::ANY`] under a wildcard prefix.
    pub protocol: u8,
    /// Destination port, big-endian.
    pub dport: [u8; 2],
}

/// Prefix length that ends after the direction: any protocol, any port.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;
/// Prefix length that ends after the protocol: any port of that protocol.
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
/// Prefix length of an exact key.
pub const POLICY_PREFIX_FULL: u32 = 96;

impl PolicyKey {
    /// Builds a key from host-order values.
    pub const fn new(endpoint_id: u32, remote_identity: u32, direction: u8, protocol: u8, dport: u16) -> Self {
        PolicyKey {
            endpoint_id: endpoint_id.to_be_bytes(),
            remote_identity: remote_identity.to_be_bytes(),
            direction,
            protocol,
            dport: dport.to_be_bytes(),
        }
    }
}

/// The verdict a policy entry gives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyValue {
    /// The agent's id of the rule that allows the flow (names its NetworkPolicy).
    pub rule_id: u32,
    /// Reserved; zero.
    pub flags: u32,
}

/// A conntrack key: the 5-tuple as seen on the wire, plus the direction of the local
/// endpoint that created it. Addresses and ports are network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtKey {
    /// Source address of the flow's first packet.
    pub saddr: [u8; 4],
    /// Destination address of the flow's first packet.
    pub daddr: [u8; 4],
    /// Source port. ICMP: a query (echo, timestamp, information, address mask request) has
    /// its identifier here and its kind in `dport` (`[type, 0]`, echo `[0, 0]`), a reply the
    /// other way round; any other type but an error is `[type, code]` in both ports.
    pub sport: [u8; 2],
    /// Destination port.
    pub dport: [u8; 2],
    /// IP protocol.
    pub protocol: u8,
    /// [`direction`] at the endpoint that admitted the flow.
    pub direction: u8,
    /// Explicit padding; zero.
    pub _pad: [u8; 2],
}

impl CtKey {
    /// The key a reply packet's reverse tuple has, in the opposite direction.
    pub const fn reversed(&self, direction: u8) -> CtKey {
        CtKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            protocol: self.protocol,
            direction,
            _pad: [0; 2],
        }
    }
}

/// State of a tracked connection (layout 3, [`map_names::CONNTRACK`]).
///
/// The byte counts are those of the connection from the point of view of the side that
/// opened it (the key's source): `to_destination` counts the packets that matched the key
/// itself, `to_source` the replies that matched its reverse. A packet counts its bytes past
/// the Ethernet header (the IP header and everything after it; a GSO packet its whole
/// payload), added atomically, so that CPUs racing on one connection lose nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns` of the last packet that refreshed the entry.
    pub last_seen_ns: u64,
    /// The rule that admitted the flow (0: the endpoint was not isolated).
    pub rule_id: u32,
    /// [`ct_flags`] bits: the admitting verdict and whether the flow is closing.
    pub flags: u32,
    /// Bytes from the opener to its destination, since the entry was made.
    pub to_destination: u64,
    /// Bytes back from the destination to the opener, since the entry was made.
    pub to_source: u64,
    /// `bpf_ktime_get_ns` (coarse) of the last byte report ([`flow_kind::UPDATE`]), or of
    /// the entry's making: the next report is due [`FLOW_BYTES_REPORT_NS`] after it.
    pub reported_ns: u64,
}

impl CtEntry {
    /// A layout-1 or layout-2 entry in layout 3: its counts start at 0 and its next byte
    /// report is due one interval after `now` (the upgrade).
    pub const fn from_v2(old: CtEntryV2, now: u64) -> CtEntry {
        CtEntry {
            last_seen_ns: old.last_seen_ns,
            rule_id: old.rule_id,
            flags: old.flags,
            to_destination: 0,
            to_source: 0,
            reported_ns: now,
        }
    }
}

/// A conntrack entry of layouts 1 and 2 ([`map_names::CONNTRACK_V1`],
/// [`map_names::CONNTRACK_V2`]), read only to adopt it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtEntryV2 {
    /// As [`CtEntry::last_seen_ns`].
    pub last_seen_ns: u64,
    /// As [`CtEntry::rule_id`].
    pub rule_id: u32,
    /// As [`CtEntry::flags`].
    pub flags: u32,
}

/// A busy connection reports its byte counts ([`flow_kind::UPDATE`]) at most this often:
/// the first packet past this long since the last report (or since the entry was made)
/// writes one record. Two seconds keep an upload visible within a few seconds (issue 15:
/// an exfiltration must be flagged within 10 s) at one record per connection per interval.
pub const FLOW_BYTES_REPORT_NS: u64 = 2_000_000_000;

/// What a [`FlowEvent`] reports ([`FlowEvent::kind`]).
pub mod flow_kind {
    /// One packet: a new flow's first, or a dropped one. Records of programs older than the
    /// byte counts have 0 here (it was padding).
    pub const PACKET: u8 = 0;
    /// A tracked connection's byte counts so far, at most once per
    /// [`FLOW_BYTES_REPORT_NS`](crate::FLOW_BYTES_REPORT_NS) while packets flow.
    pub const UPDATE: u8 = 1;
    /// A TCP connection's byte counts when a FIN or RST first marked it closing.
    pub const END: u8 = 2;
}

/// Idle time after which a conntrack entry no longer admits packets, by protocol.
pub const fn ct_lifetime_ns(protocol: u8) -> u64 {
    const SEC: u64 = 1_000_000_000;
    match protocol {
        proto::TCP | proto::SCTP => 6 * 3600 * SEC,
        _ => 60 * SEC,
    }
}

/// A conntrack entry is refreshed at most this often, to keep map writes off most packets.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Idle lifetime of a TCP conntrack entry once a FIN or RST was seen on it: the close
/// handshake finishes in milliseconds, and the table should not hold dead connections
/// for the established lifetime (Cilium uses the same 10 s).
pub const CT_CLOSING_LIFETIME_NS: u64 = 10_000_000_000;

/// A fragmented IP datagram as its fragments carry it (Cilium's `ipv4_frag_id`): addresses
/// and IP id in network byte order, as on the wire before any translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FragKey {
    /// Source address.
    pub saddr: [u8; 4],
    /// Destination address.
    pub daddr: [u8; 4],
    /// The IP identification field, network byte order.
    pub id: [u8; 2],
    /// IP protocol.
    pub protocol: u8,
    /// [`direction`] at the endpoint that admitted the first fragment.
    pub direction: u8,
}

/// What a datagram's later fragments get: its first fragment was admitted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FragEntry {
    /// `bpf_ktime_get_ns` when the first fragment was admitted.
    pub first_ns: u64,
    /// With [`frag_flags::NAT`]: the address the first fragment's Service translation wrote
    /// (the backend in `from_pod`, the VIP in `to_pod`), network byte order.
    pub nat_addr: [u8; 4],
    /// [`frag_flags`] bits.
    pub flags: u32,
}

/// Bits of [`FragEntry::flags`].
pub mod frag_flags {
    /// The first fragment was translated: later fragments get `nat_addr` as their destination
    /// (`from_pod`) or source (`to_pod`). Their ports and L4 checksum are in the first fragment.
    pub const NAT: u32 = 1 << 0;
}

/// How long after its first fragment a datagram's later fragments are let through. Linux gives
/// up reassembling after `ipfrag_time` (30 s); a datagram's fragments leave its sender
/// back to back, so 10 s is ample and bounds how long an IP id is honoured.
pub const FRAG_LIFETIME_NS: u64 = 10_000_000_000;

/// Bits of [`CtEntry::flags`].
pub mod ct_flags {
    /// The low byte: the [`verdict`](crate::verdict) the flow was admitted with.
    pub const VERDICT_MASK: u32 = 0xff;
    /// A FIN or RST was seen: the entry ages out after `CT_CLOSING_LIFETIME_NS` idle.
    pub const CLOSING: u32 = 1 << 8;
    /// The flow is a translated Service connection: its replies look up the reverse-NAT
    /// index (bits [`REV_NAT_SHIFT`]..) in [`map_names::REV_NAT`](crate::map_names::REV_NAT)
    /// to restore the VIP.
    pub const SERVICE: u32 = 1 << 9;
    /// Where the reverse-NAT index (a `service_id`, at most 16 bits) sits in the flags.
    pub const REV_NAT_SHIFT: u32 = 16;

    /// The flags a translated flow's conntrack entry carries for Service port `service_id`.
    pub const fn service(service_id: u32) -> u32 {
        SERVICE | (service_id & crate::MAX_SERVICE_ID) << REV_NAT_SHIFT
    }

    /// The reverse-NAT index in `flags`, 0 when the flow is no Service connection.
    pub const fn rev_nat_index(flags: u32) -> u32 {
        if flags & SERVICE == 0 {
            0
        } else {
            flags >> REV_NAT_SHIFT
        }
    }
}

/// What happened to the packet a [`FlowEvent`] reports.
pub mod verdict {
    /// Forwarded: allowed by policy, or the endpoint is not isolated that way.
    pub const FORWARDED: u8 = 0;
    /// Dropped; [`FlowEvent::reason`](crate::FlowEvent::reason) says why.
    pub const DROPPED: u8 = 1;
    /// Forwarded, but an audit-mode policy would have dropped it.
    pub const AUDIT: u8 = 2;
}

/// Rule ids with a fixed meaning; the compiler allocates real rules from
/// [`rule_id::FIRST_ALLOCATED`].
pub mod rule_id {
    /// No rule decided: the endpoint is not isolated in that direction, or the packet was
    /// dropped before policy (spoofing, parse errors). With `PolicyDenied`: default deny.
    pub const NONE: u32 = 0;
    /// The first id the compiler hands out.
    pub const FIRST_ALLOCATED: u32 = 1;
}

/// One flow record, sent through the [`map_names::FLOWS`] ring buffer for the first
/// packet of every new flow (conntrack miss) and for every dropped packet — never for
/// packets of an established flow, except a tracked connection's byte reports
/// ([`flow_kind::UPDATE`], [`flow_kind::END`]): at most one per connection per
/// [`FLOW_BYTES_REPORT_NS`] while packets flow, and one when a FIN or RST first marks it
/// closing. A byte report carries the conntrack key's tuple (`saddr`/`sport`: the opener),
/// its direction, the entry's rule, `verdict` `FORWARDED`, and the packet that triggered it
/// only in `tcp_flags`, `packet_len` and `timestamp_ns`.
///
/// Addresses and ports are in network byte order, as on the wire; `saddr`/`sport` are
/// the packet's source. For ICMP, the ports are the conntrack tuple's ([`CtKey::sport`]):
/// an echo request has its id in `sport` and 0 in `dport`; an ICMP error has 0 in both.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns()` when the packet was seen.
    pub timestamp_ns: u64,
    /// The local endpoint the program runs for (0 when unknown).
    pub endpoint_id: u32,
    /// The local endpoint's identity (0 when unknown).
    pub identity: u32,
    /// The remote address's identity from the ipcache (0 when not looked up).
    pub remote_identity: u32,
    /// The rule that allowed the flow, or [`rule_id::NONE`].
    pub rule_id: u32,
    /// Packet source address.
    pub saddr: [u8; 4],
    /// Packet destination address.
    pub daddr: [u8; 4],
    /// Packet source port.
    pub sport: [u8; 2],
    /// Packet destination port.
    pub dport: [u8; 2],
    /// Length of the packet in bytes.
    pub packet_len: u32,
    /// IP protocol number, 0 when not IPv4.
    pub protocol: u8,
    /// [`direction`] from the endpoint's point of view.
    pub direction: u8,
    /// A [`verdict`] value.
    pub verdict: u8,
    /// A [`DropReason`] value (`Forwarded` unless dropped).
    pub reason: u8,
    /// TCP flags of the packet (0 for other protocols).
    pub tcp_flags: u8,
    /// A [`flow_kind`] value. (Was padding: records of older programs read as packets.)
    pub kind: u8,
    /// The Service port ([`ServiceValue::service_id`]) the packet was sent to before it was
    /// translated to a backend; 0 when it was not. The agent names the Service and the
    /// original VIP:port from it. (Was padding: older records read as "no Service".)
    pub service_id: u16,
    /// [`flow_kind::UPDATE`] and [`flow_kind::END`]: [`CtEntry::to_destination`] (the
    /// record's source is the connection's opener); 0 in packet records.
    pub to_destination: u64,
    /// [`flow_kind::UPDATE`] and [`flow_kind::END`]: [`CtEntry::to_source`]; 0 in packet
    /// records.
    pub to_source: u64,
}

/// Size of a [`FlowEvent`] as programs before the byte counts wrote it (no `to_destination`,
/// `to_source`): programs attached by an older agent keep writing these into the shared
/// ring until they are replaced, so readers take both sizes.
pub const FLOW_EVENT_V1_SIZE: usize = 48;

/// A Service map key: a Service port (`vip`, `dport`, `protocol`) and a slot. Slot 0 is
/// the port's header; slots `1..=backend_count` name its backends (Cilium's lb4 layout), so
/// a backend is chosen with one computed index and one lookup, never a loop.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// The ClusterIP, network byte order.
    pub vip: [u8; 4],
    /// The Service port, network byte order.
    pub dport: [u8; 2],
    /// IP protocol ([`proto::TCP`], [`proto::UDP`], [`proto::SCTP`]: the datapath
    /// translates SCTP only to backends whose port is the Service port).
    pub protocol: u8,
    /// Explicit padding; zero.
    pub _pad: u8,
    /// 0: the header; 1..=`backend_count`: a backend slot. Host byte order.
    pub slot: u16,
    /// Explicit padding; zero.
    pub _pad2: [u8; 2],
}

impl ServiceKey {
    /// The key of `slot` of a Service port; `vip` and `port` as on the wire.
    pub const fn new(vip: [u8; 4], port: u16, protocol: u8, slot: u16) -> Self {
        ServiceKey {
            vip,
            dport: port.to_be_bytes(),
            protocol,
            _pad: 0,
            slot,
            _pad2: [0; 2],
        }
    }
}

/// A Service map value. In the header (slot 0): `backend_count`, `flags`,
/// `affinity_timeout_s` and `service_id`; in a backend slot: `backend_id` (and the same
/// `service_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceValue {
    /// Backend slots only: the [`map_names::BACKENDS`] key. Host byte order.
    pub backend_id: u32,
    /// Header only: backends in slots `1..=backend_count` (0: every connection is
    /// dropped with [`DropReason::NoServiceBackend`]). Host byte order.
    pub backend_count: u16,
    /// Header only: [`service_flags`] bits.
    pub flags: u8,
    /// Explicit padding; zero.
    pub _pad: u8,
    /// Header only: idle seconds after which a client's affinity lapses. Host byte order.
    pub affinity_timeout_s: u32,
    /// The agent's id of the Service port, 1..=[`MAX_SERVICE_ID`]: its reverse-NAT index
    /// ([`map_names::REV_NAT`]), its name in affinity keys and translation records. Host byte
    /// order.
    pub service_id: u32,
}

/// What a reply on a Service connection gets back as its source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RevNat {
    /// The ClusterIP, network byte order.
    pub vip: [u8; 4],
    /// The Service port, network byte order.
    pub port: [u8; 2],
    /// Explicit padding; zero.
    pub _pad: [u8; 2],
}

/// Bits of [`ServiceValue::flags`].
pub mod service_flags {
    /// `sessionAffinity: ClientIP`: a client keeps its backend while it stays active.
    pub const AFFINITY_CLIENT_IP: u8 = 1 << 0;
}

/// A backend: where a Service connection is translated to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// Backend address, network byte order.
    pub ip: [u8; 4],
    /// Backend (target) port, network byte order.
    pub port: [u8; 2],
    /// Reserved ([`Backend`] state such as terminating); zero.
    pub flags: u8,
    /// Explicit padding; zero.
    pub _pad: u8,
}

/// A Service connection's translation, keyed by its client→VIP [`CtKey`]
/// ([`direction::EGRESS`]): the backend every packet of it goes to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LbNat {
    /// Backend address, network byte order.
    pub addr: [u8; 4],
    /// Backend port, network byte order.
    pub port: [u8; 2],
    /// Explicit padding; zero.
    pub _pad: [u8; 2],
    /// The backend chosen. Host byte order.
    pub backend_id: u32,
    /// The Service port ([`ServiceValue::service_id`]). Host byte order.
    pub service_id: u32,
}

/// A client of a Service with `sessionAffinity: ClientIP`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityKey {
    /// Client address, network byte order.
    pub client: [u8; 4],
    /// [`ServiceValue::service_id`]. Host byte order.
    pub service_id: u32,
}

/// The backend a client is held to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns` of the client's last new connection.
    pub last_used_ns: u64,
    /// The backend. Host byte order.
    pub backend_id: u32,
    /// Explicit padding; zero.
    pub _pad: u32,
}

/// The backend slot (1..=`count`) a new connection takes for a random or hashed `pick`;
/// `None` when there is no backend. A pure function so the host can test the spread.
pub const fn backend_slot(pick: u32, count: u16) -> Option<u16> {
    if count == 0 {
        None
    } else {
        Some((pick % count as u32) as u16 + 1)
    }
}

/// Packets and bytes for one (reason, direction) slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen (whole frames).
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 24);
const _: () = assert!(core::mem::size_of::<Ipv4Key>() == 4);
const _: () = assert!(core::mem::size_of::<IpcacheValue>() == 8);
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtEntry>() == 40);
const _: () = assert!(core::mem::size_of::<CtEntryV2>() == 16);
// The datapath sets `CLOSING` by a compare-and-swap of the u64 at `rule_id`, `flags` its
// high half (little-endian BPF).
const _: () = assert!(core::mem::offset_of!(CtEntry, rule_id) == 8 && core::mem::offset_of!(CtEntry, flags) == 12);
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 64);
const _: () = assert!(core::mem::offset_of!(FlowEvent, to_destination) == FLOW_EVENT_V1_SIZE);
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);
const _: () = assert!(core::mem::size_of::<Backend>() == 8);
const _: () = assert!(core::mem::size_of::<LbNat>() == 16);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);
const _: () = assert!(core::mem::size_of::<RevNat>() == 8);
const _: () = assert!(core::mem::size_of::<FlowBudget>() == 24);
const _: () = assert!(core::mem::size_of::<FragKey>() == 12);
const _: () = assert!(core::mem::size_of::<FragEntry>() == 16);
const _: () = assert!(POLICY_PREFIX_FULL as usize == core::mem::size_of::<PolicyKey>() * 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], Copy, has no padding bytes (asserted by size above)
    // and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::EndpointInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Ipv4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IpcacheValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtEntryV2 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LbNat {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNat {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowBudget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_slots_do_not_overlap() {
        for r in DropReason::ALL {
            assert!((r as u32) < DropReason::SLOTS);
            assert_ne!(counter_index(r, direction::INGRESS), counter_index(r, direction::EGRESS));
            assert!(counter_index(r, direction::EGRESS) < COUNTER_SLOTS);
        }
    }

    #[test]
    fn reason_numbers_are_dense_and_named() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(!r.name().is_empty());
        }
    }

    #[test]
    fn policy_key_is_big_endian_for_lpm() {
        let k = PolicyKey::new(0x0102_0304, 0x0a0b_0c0d, direction::EGRESS, proto::TCP, 0x1f90);
        assert_eq!(k.endpoint_id, [1, 2, 3, 4]);
        assert_eq!(k.remote_identity, [0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(k.dport, [0x1f, 0x90]);
    }

    #[test]
    fn reversed_ct_key_swaps_ends() {
        let k = CtKey {
            saddr: [1; 4],
            daddr: [2; 4],
            sport: [0, 1],
            dport: [0, 2],
            protocol: proto::UDP,
            direction: 1,
            _pad: [0; 2],
        };
        let r = k.reversed(direction::INGRESS);
        assert_eq!(
            (r.saddr, r.daddr, r.sport, r.dport, r.direction),
            ([2; 4], [1; 4], [0, 2], [0, 1], 0)
        );
        assert_eq!(r.reversed(1), k);
    }

    #[test]
    fn backend_slots_cover_every_backend_and_skip_the_header() {
        assert_eq!(backend_slot(7, 0), None);
        let mut seen = [0u32; 4];
        for pick in 0..300u32 {
            let slot = backend_slot(pick.wrapping_mul(2_654_435_761), 3).unwrap();
            assert!((1..=3).contains(&slot));
            seen[usize::from(slot)] += 1;
        }
        assert_eq!(seen[0], 0);
        assert!(seen[1..].iter().all(|&n| n >= 60), "{seen:?}");
        assert_eq!(backend_slot(u32::MAX, MAX_SERVICE_BACKENDS), Some((u32::MAX % 0xfffe) as u16 + 1));
    }

    #[test]
    fn the_reverse_nat_index_rides_in_the_conntrack_flags() {
        let flags = u32::from(verdict::AUDIT) | ct_flags::CLOSING | ct_flags::service(MAX_SERVICE_ID);
        assert_eq!(ct_flags::rev_nat_index(flags), MAX_SERVICE_ID);
        assert_eq!(flags & ct_flags::VERDICT_MASK, u32::from(verdict::AUDIT));
        assert_ne!(flags & ct_flags::CLOSING, 0);
        assert_eq!(ct_flags::rev_nat_index(ct_flags::service(7)), 7);
        assert_eq!(ct_flags::rev_nat_index(7 << ct_flags::REV_NAT_SHIFT), 0, "no SERVICE bit, no index");
        assert_eq!(ct_flags::REV_NAT_SHIFT, 16, "verdict and flag bits end below it");
    }

    #[test]
    fn a_flow_budget_passes_its_burst_then_its_rate_and_counts_the_rest() {
        const SEC: u64 = 1_000_000_000;
        let start = 1000 * SEC;
        // A new bucket (all zero) is full: exactly the burst passes at one instant.
        let mut b = FlowBudget::default();
        let passed = (0..FLOW_RECORDS_BURST + 500).filter(|_| b.take(start)).count() as u64;
        assert_eq!((passed, b.suppressed), (FLOW_RECORDS_BURST, 500));
        // Then the rate: half a second refills half a second's worth, no more.
        let passed = (0..FLOW_RECORDS_PER_SEC).filter(|_| b.take(start + SEC / 2)).count() as u64;
        assert_eq!(passed, FLOW_RECORDS_PER_SEC / 2);
        assert_eq!(b.suppressed, 500 + FLOW_RECORDS_PER_SEC / 2);
        // An idle hour refills to the burst, not beyond.
        let passed = (0..3 * FLOW_RECORDS_BURST).filter(|_| b.take(start + 3600 * SEC)).count() as u64;
        assert_eq!(passed, FLOW_RECORDS_BURST);
        // A clock that seems to go back (another CPU's timestamp) takes nothing extra.
        let mut b = FlowBudget {
            credit_ns: 0,
            last_ns: start,
            suppressed: 0,
        };
        assert!(!b.take(start - SEC));
        assert_eq!((b.suppressed, b.last_ns), (1, start));
    }

    #[test]
    fn byte_reports_leave_half_the_budget_to_packet_records() {
        const SEC: u64 = 1_000_000_000;
        let start = 100 * SEC;
        let mut b = FlowBudget::default();
        let reports = (0..FLOW_RECORDS_BURST).filter(|_| b.take_report(start)).count() as u64;
        assert_eq!(reports, FLOW_RECORDS_BURST / 2);
        assert_eq!(b.suppressed, FLOW_RECORDS_BURST / 2);
        // The reserve is still there for drops.
        let drops = (0..FLOW_RECORDS_BURST).filter(|_| b.take(start)).count() as u64;
        assert_eq!(drops, FLOW_RECORDS_BURST / 2);
        assert!(!b.take_report(start));
    }

    #[test]
    fn an_adopted_entry_keeps_its_state_and_counts_from_zero() {
        let old = CtEntryV2 {
            last_seen_ns: 5,
            rule_id: 7,
            flags: ct_flags::CLOSING | 1,
        };
        let e = CtEntry::from_v2(old, 99);
        assert_eq!((e.last_seen_ns, e.rule_id, e.flags), (5, 7, ct_flags::CLOSING | 1));
        assert_eq!((e.to_destination, e.to_source, e.reported_ns), (0, 0, 99));
    }

    #[test]
    fn only_inbound_masqueraded_packets_are_unknown_remotes() {
        assert_eq!(KUBE_PROXY_MASQ_MARK, 0x4000);
        assert_eq!(remote_lookup_prefix(direction::INGRESS, 0x4000), 0);
        // Other bits (kube-proxy's drop mark 0x8000, anyone's) do not matter.
        assert_eq!(remote_lookup_prefix(direction::INGRESS, 0xc001), 0);
        assert_eq!(remote_lookup_prefix(direction::INGRESS, SNAT_MARK), 0);
        assert_eq!(MASQUERADED_MARKS & 0x8f00, 0, "kube-proxy's drop bit, Cilium's magic marks");
        assert_eq!(remote_lookup_prefix(direction::INGRESS, 0), 32);
        assert_eq!(remote_lookup_prefix(direction::INGRESS, 0x8000), 32);
        // A pod's own packets are never forwarded-for-someone-else at its veth.
        assert_eq!(remote_lookup_prefix(direction::EGRESS, 0x4000), 32);
    }
}
