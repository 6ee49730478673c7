//! XDP programs: drops decided before the kernel builds an skb (issue 13.4).
//!
//! `xdp_prefilter` runs on the node's uplink device(s): an IPv4 packet whose source is in the
//! deny list (`bh_pfdeny_v1`) and not in the never-drop list (`bh_pfkeep_v1`) is dropped and
//! counted. One LPM lookup per packet; a second only for a source the deny list holds.
//!
//! `xdp_from_pod` runs on each pod's host-side veth, which receives what the pod transmits,
//! before `from_pod` (TC ingress of the same veth). It drops only what `from_pod` would
//! certainly drop, with the same reason, counter and flow record: a spoofed source MAC or IP,
//! and a new flow (no entry either way in the endpoint's conntrack table) that egress policy
//! denies. Everything it is not certain about passes to TC, which stays the one place for the
//! rest: an unknown endpoint, ARP and anything not IPv4, a packet TC's parser would reject, IP
//! fragments, ICMP errors, a Service VIP:port (TC translates it before policy), an endpoint not
//! isolated for egress or in audit mode, and any tuple conntrack holds (even an expired entry).
//! Per packet: one endpoint lookup, one Service lookup, one conntrack table lookup with two
//! lookups in it, one ipcache and two policy lookups — the same bounded set as `from_pod`.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{lpm_trie::Key, LpmTrie, PerCpuArray},
    programs::XdpContext,
};
use bulkhead_common::{
    capacity, counter_index, direction, endpoint_flags, identity, proto, verdict, Counter, CtKey, DropReason, FlowEvent, Ipv4Key,
    PolicyKey, ServiceKey, POLICY_PREFIX_FULL,
};

use crate::packet::{self, Fragment, ETH_HLEN, L3};
use crate::{peer_quarantined, CONNTRACK, COUNTERS, ENDPOINTS, FLOWS, FLOWS_LOST, IPCACHE, POLICY};

#[map(name = "bh_pfdeny_v1")]
static PREFILTER_DENY: LpmTrie<Ipv4Key, u32> = LpmTrie::pinned(capacity::PREFILTER_DENY, 0);

#[map(name = "bh_pfkeep_v1")]
static PREFILTER_KEEP: LpmTrie<Ipv4Key, u32> = LpmTrie::pinned(capacity::PREFILTER_KEEP, 0);

#[map(name = "bh_pfcnt_v1")]
static PREFILTER_COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(1, 0);

#[map(name = "bh_xdpcnt_v1")]
static XDP_COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(DropReason::SLOTS, 0);

const ETH_P_IP: [u8; 2] = [0x08, 0x00];
/// Offset of the IPv4 source address in an untagged Ethernet frame.
const IP_SADDR_OFF: usize = ETH_HLEN + 12;

/// `frags`: the program copes with multi-buffer packets (it reads only the headers in the
/// first buffer), which keeps GSO on a veth and jumbo MTUs on a NIC (veth_xdp_set in
/// drivers/net/veth.c turns the peer's GSO off for a program without it).
#[xdp(frags)]
pub fn xdp_prefilter(ctx: XdpContext) -> u32 {
    let Some(saddr) = prefilter_source(&ctx) else {
        return XDP_PASS;
    };
    let key = Key::new(32, Ipv4Key { addr: saddr });
    if PREFILTER_DENY.get(&key).is_none() || PREFILTER_KEEP.get(&key).is_some() {
        return XDP_PASS;
    }
    add(&PREFILTER_COUNTERS, 0, len(&ctx));
    XDP_DROP
}

/// The source address of an untagged IPv4 frame; `None` for anything else (ARP, IPv6, VLAN
/// tags, runts), which the prefilter passes.
#[inline(always)]
fn prefilter_source(ctx: &XdpContext) -> Option<[u8; 4]> {
    let ethertype = read::<[u8; 2]>(ctx, 12)?;
    let version = read::<u8>(ctx, ETH_HLEN)?;
    if ethertype != ETH_P_IP || version >> 4 != 4 {
        return None;
    }
    read::<[u8; 4]>(ctx, IP_SADDR_OFF)
}

#[xdp(frags)]
pub fn xdp_from_pod(ctx: XdpContext) -> u32 {
    let mut flow = FlowEvent::default();
    match try_xdp_from_pod(&ctx, &mut flow) {
        Ok(()) => XDP_PASS,
        Err(reason) => {
            drop_reported(&ctx, reason, &mut flow);
            XDP_DROP
        }
    }
}

/// `Ok`: pass to TC; `Err`: a drop `from_pod` would make, for this reason.
#[inline(always)]
fn try_xdp_from_pod(ctx: &XdpContext, flow: &mut FlowEvent) -> Result<(), DropReason> {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: the value is copied out at once; a concurrent update gives the old or the new one.
    let Some(ep) = (unsafe { ENDPOINTS.get(ifindex) }).copied() else {
        // Fail closed in TC: it drops an unknown endpoint's packets with their reason.
        return Ok(());
    };
    flow.endpoint_id = ep.endpoint_id;
    flow.identity = ep.identity;
    let Some((eth_src, l3)) = parse(ctx) else {
        return Ok(());
    };
    flow.saddr = l3.saddr;
    flow.daddr = l3.daddr;
    flow.sport = l3.sport;
    flow.dport = l3.dport;
    flow.protocol = l3.protocol;
    flow.tcp_flags = l3.tcp_flags;
    // The order of from_pod: MAC, then IP.
    if eth_src != ep.mac {
        return Err(DropReason::SpoofedMac);
    }
    if l3.saddr != ep.ipv4 {
        return Err(DropReason::SpoofedIp);
    }
    if l3.fragment != Fragment::Whole || l3.icmp_error {
        return Ok(());
    }
    // Quarantine comes before policy in from_pod, which drops these with its own reason
    // (or lets the node's traffic through): TC decides them.
    if ep.flags & endpoint_flags::QUARANTINED != 0 || peer_quarantined(l3.daddr) {
        return Ok(());
    }
    let isolated = ep.flags & endpoint_flags::ISOLATED_EGRESS != 0;
    let audit = ep.flags & endpoint_flags::AUDIT_EGRESS != 0;
    if !isolated || audit {
        return Ok(());
    }
    if l3.protocol == proto::TCP || l3.protocol == proto::UDP || l3.protocol == proto::SCTP {
        let skey = ServiceKey::new(l3.daddr, u16::from_be_bytes(l3.dport), l3.protocol, 0);
        // SAFETY: only presence is read.
        if unsafe { crate::service::SERVICES.get(skey) }.is_some() {
            return Ok(());
        }
    }
    // SAFETY: an inner map pointer stays valid for the program's run (RCU).
    let Some(table) = (unsafe { CONNTRACK.get(&ep.endpoint_id) }) else {
        return Ok(());
    };
    let key = CtKey {
        saddr: l3.saddr,
        daddr: l3.daddr,
        sport: l3.sport,
        dport: l3.dport,
        protocol: l3.protocol,
        direction: direction::EGRESS,
        _pad: [0; 2],
    };
    // SAFETY: only presence is read.
    if unsafe { table.get(key) }.is_some() || unsafe { table.get(key.reversed(direction::INGRESS)) }.is_some() {
        return Ok(());
    }
    // A pod's own packets are never masqueraded-for-someone-else: the full address (32).
    let remote_identity = IPCACHE
        .get(Key::new(32, Ipv4Key { addr: l3.daddr }))
        .map_or(identity::WORLD, |v| v.identity);
    flow.remote_identity = remote_identity;
    if remote_identity == identity::HOST {
        return Ok(());
    }
    let mut pkey = PolicyKey {
        endpoint_id: ep.endpoint_id.to_be_bytes(),
        remote_identity: remote_identity.to_be_bytes(),
        direction: direction::EGRESS,
        protocol: l3.protocol,
        dport: l3.policy_port(),
    };
    if POLICY.get(Key::new(POLICY_PREFIX_FULL, pkey)).is_some() {
        return Ok(());
    }
    pkey.remote_identity = identity::ANY.to_be_bytes();
    if POLICY.get(Key::new(POLICY_PREFIX_FULL, pkey)).is_some() {
        return Ok(());
    }
    Err(DropReason::PolicyDenied)
}

/// Counts a drop where TC would have (`bh_cnt_v1`, egress) and in the XDP counters, and
/// reports it as `from_pod` does: a flow record within the endpoint's budget.
#[inline(always)]
fn drop_reported(ctx: &XdpContext, reason: DropReason, flow: &mut FlowEvent) {
    let len = len(ctx);
    add(&COUNTERS, counter_index(reason, direction::EGRESS), len);
    add(&XDP_COUNTERS, reason as u32, len);
    flow.verdict = verdict::DROPPED;
    flow.reason = reason as u8;
    flow.direction = direction::EGRESS;
    flow.packet_len = len;
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    flow.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    if !crate::record_allowed(flow.endpoint_id, flow.timestamp_ns) {
        // Over its budget: counted as suppressed, as in TC.
    } else if FLOWS.output::<FlowEvent>(&*flow, crate::ring_wakeup()).is_err() {
        if let Some(lost) = FLOWS_LOST.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot is only written by this CPU.
            unsafe { *lost += 1 };
        }
    }
}

/// Adds one packet of `len` bytes to slot `index` of a per-CPU counter array.
#[inline(always)]
fn add(counters: &PerCpuArray<Counter>, index: u32, len: u32) {
    if let Some(c) = counters.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only written by this CPU, and the XDP/softirq context
        // does not preempt itself on it.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
    }
}

/// The bytes in the packet's first buffer (the whole frame unless it is multi-buffer).
#[inline(always)]
fn len(ctx: &XdpContext) -> u32 {
    (ctx.data_end() - ctx.data()) as u32
}

/// A copy of the `T` at `offset`, when the first buffer holds it.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: the bounds were checked against data_end just above; read_unaligned copes
    // with any alignment.
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

/// The facts `from_pod` decides on, for an IPv4 frame whose headers `packet::parse` would
/// accept; `None` for anything else (TC then decides: ARP passes, the rest drops).
#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<([u8; 6], L3)> {
    // Destination MAC (6), source MAC (6), ethertype (2); then the fixed IPv4 header.
    let eth = read::<[u8; 14]>(ctx, 0)?;
    if [eth[12], eth[13]] != ETH_P_IP {
        return None;
    }
    let eth_src = [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]];
    let ip = read::<[u8; 20]>(ctx, ETH_HLEN)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return None;
    }
    let frag_off = u16::from_be_bytes([ip[6], ip[7]]);
    let fragment = if frag_off & 0x1fff != 0 {
        Fragment::Later
    } else if frag_off & 0x2000 != 0 {
        Fragment::First
    } else {
        Fragment::Whole
    };
    let protocol = ip[9];
    let l4 = ETH_HLEN + ihl;
    let mut l3 = L3 {
        saddr: [ip[12], ip[13], ip[14], ip[15]],
        daddr: [ip[16], ip[17], ip[18], ip[19]],
        protocol,
        sport: [0; 2],
        dport: [0; 2],
        tcp_syn: false,
        tcp_flags: 0,
        l4_off: l4,
        ip_id: [ip[4], ip[5]],
        fragment,
        icmp_error: false,
    };
    if fragment == Fragment::Later {
        return Some((eth_src, l3));
    }
    match protocol {
        proto::TCP => {
            // The header up to its flags byte, as packet::parse reads it.
            let t = read::<[u8; 14]>(ctx, l4)?;
            l3.sport = [t[0], t[1]];
            l3.dport = [t[2], t[3]];
            l3.tcp_flags = t[13];
            l3.tcp_syn = t[13] & (packet::TCP_SYN | packet::TCP_ACK) == packet::TCP_SYN;
        }
        proto::UDP | proto::SCTP => {
            let p = read::<[u8; 4]>(ctx, l4)?;
            l3.sport = [p[0], p[1]];
            l3.dport = [p[2], p[3]];
        }
        proto::ICMP => {
            // Type, code, checksum, identifier: the 8 bytes packet::parse reads.
            let m = read::<[u8; 8]>(ctx, l4)?;
            match packet::icmp_ports(m[0], m[1], [m[4], m[5]]) {
                Some((sport, dport)) => {
                    l3.sport = sport;
                    l3.dport = dport;
                }
                None => l3.icmp_error = true,
            }
        }
        _ => {}
    }
    Some((eth_src, l3))
}
