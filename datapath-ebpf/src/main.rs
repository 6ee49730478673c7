//! TC programs on each pod's host-side veth.
//!
//! `from_pod` runs on the veth's TC ingress (what the pod sends: its egress) and `to_pod`
//! on its TC egress (what the pod receives: its ingress). Per packet: one endpoint lookup,
//! one lookup of the endpoint's conntrack table and at most two conntrack lookups in it, one
//! ipcache lookup and two policy lookups — never a loop over rules. A first fragment adds
//! one insert, a later fragment is one lookup (`fragment`); an ICMP error is two conntrack
//! lookups for the flow it quotes (`related`). See DESIGN.md "Datapath model".
#![no_std]
#![no_main]
// `atomic_xadd`/`atomic_cxchg`: the target has 64-bit atomics in BPF (`BPF_ATOMIC`) but
// declares no compare-and-swap, so core's atomic types offer loads and stores only.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core::intrinsics atomics, see above")]

mod fragment;
mod packet;
mod reject;
mod service;
mod xdp;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{HashOfMaps, LruHashMap as BtfLruHashMap},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_redirect},
    macros::{btf_map, classifier, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use bulkhead_common::{
    capacity, counter_index, ct_flags, ct_lifetime_ns, direction, endpoint_flags, flow_kind, identity, proto, remote_lookup_prefix,
    rule_id, verdict, Counter, CtEntry, CtKey, DropReason, EndpointInfo, FlowBudget, FlowEvent, IpcacheValue, Ipv4Key, PolicyKey,
    PolicyValue, COUNTER_SLOTS, CT_CLOSING_LIFETIME_NS, CT_REFRESH_NS, FLOW_BYTES_REPORT_NS, GENERATED_REPLY_MARK, POLICY_PREFIX_FULL,
};
use core::intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering::Relaxed};
use core::mem::MaybeUninit;
use core::ptr::addr_of_mut;
use packet::{Fragment, Headers, L3};

// Map names must equal bulkhead_common::map_names (the agent looks them up by those).
#[map(name = "bh_endp_v1")]
static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

#[map(name = "bh_ipc_v1")]
static IPCACHE: LpmTrie<Ipv4Key, IpcacheValue> = LpmTrie::pinned(capacity::IPCACHE, 0);

#[map(name = "bh_pol_v1")]
static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(capacity::POLICY, 0);

/// One endpoint's conntrack table: an LRU of its own, so a pod churning new flows evicts
/// only its own entries (issue 12.4).
type CtTable = BtfLruHashMap<CtKey, CtEntry, { capacity::CONNTRACK_PER_ENDPOINT as usize }>;

// A BTF map (map-in-map needs the inner map's definition in BTF); the agent pins it by name
// (`EbpfLoader::map_pin_path`) and creates each endpoint's table before the endpoint entry.
#[btf_map(name = "bh_ct_v3")]
static CONNTRACK: HashOfMaps<u32, CtTable, { capacity::CONNTRACK_TABLES as usize }> = HashOfMaps::new();

#[map(name = "bh_cnt_v1")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

// Pinned like the other maps, so records written while the agent restarts wait for it.
#[map(name = "bh_flow_v1")]
static FLOWS: RingBuf = RingBuf::pinned(capacity::FLOW_RING_BYTES, 0);

#[map(name = "bh_flost_v1")]
static FLOWS_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

// Per CPU, so a bucket is only ever touched by its own CPU (no atomics, exact counts); LRU,
// so budgets of endpoints long gone make room by themselves.
#[map(name = "bh_fbudget_v1")]
static FLOW_BUDGET: LruPerCpuHashMap<u32, FlowBudget> = LruPerCpuHashMap::pinned(capacity::FLOW_BUDGET, 0);

// Every quarantined pod's address, cluster-wide; looked up only while the count says it
// holds any (`peer_quarantined`).
#[map(name = "bh_quar_v1")]
pub(crate) static QUARANTINE: HashMap<Ipv4Key, u32> = HashMap::pinned(capacity::QUARANTINE, 0);

#[map(name = "bh_quarn_v1")]
pub(crate) static QUARANTINE_COUNT: Array<u32> = Array::pinned(1, 0);

/// What became of a packet that was not dropped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Part of a tracked flow, ARP, or otherwise not worth a record.
    Quiet,
    /// The first packet of a new flow, with its verdict (`FORWARDED` or `AUDIT`).
    NewFlow(u8),
    /// Refused for this reason, and turned into the refusal (a TCP RST, an ICMP port
    /// unreachable: `reject`) sent back to the pod through its veth: counted and reported
    /// as a drop, redirected rather than shot.
    Refused(DropReason),
}

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    // The packet's own length, before a refusal replaces it.
    let len = ctx.len();
    let mut slot = MaybeUninit::uninit();
    let flow = blank_flow(&mut slot);
    // Conntrack counts the packet's bytes from here (`admit`).
    flow.packet_len = len;
    let result = try_from_pod(&ctx, flow);
    finish(&ctx, direction::EGRESS, len, result, flow)
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    // The packet's own length, before a refusal replaces it.
    let len = ctx.len();
    let mut slot = MaybeUninit::uninit();
    let flow = blank_flow(&mut slot);
    // Conntrack counts the packet's bytes from here (`admit`).
    flow.packet_len = len;
    let result = try_to_pod(&ctx, flow);
    finish(&ctx, direction::INGRESS, len, result, flow)
}

// Whole words, so that `blank_flow` covers every byte.
const _: () = assert!(size_of::<FlowEvent>().is_multiple_of(8) && align_of::<FlowEvent>() == 8);

/// An all-zero flow record in `slot`, written in place as whole words: `FlowEvent::default()`
/// (and any zeroed value moved into place) compiles to a call of the byte-by-byte `memset`,
/// which cost more per packet than either program's own work (2% of a core against 1.2% in
/// `from_pod`, UDP profile of issue 13).
#[inline(always)]
fn blank_flow(slot: &mut MaybeUninit<FlowEvent>) -> &mut FlowEvent {
    let words = slot.as_mut_ptr().cast::<u64>();
    let mut i = 0;
    while i < size_of::<FlowEvent>() / 8 {
        // SAFETY: in bounds (checked above) and aligned; volatile so LLVM cannot fold the
        // stores back into a memset call.
        unsafe { words.add(i).write_volatile(0) };
        i += 1;
    }
    // SAFETY: every byte is written, and all-zero is a valid FlowEvent (plain integers).
    unsafe { slot.assume_init_mut() }
}

/// The time for conntrack, fragments and Services: the coarse monotonic clock (the same
/// clock as `bpf_ktime_get_ns`, at tick resolution) reads no TSC; lifetimes are seconds and
/// the refresh interval one second, so a tick's error never matters. Flow records keep the
/// precise clock.
#[inline(always)]
fn coarse_now() -> u64 {
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Counts the verdict (`len`: the packet's length as it came), reports new flows and drops,
/// and turns the verdict into a TC action.
#[inline(always)]
fn finish(ctx: &TcContext, dir: u8, len: u32, result: Result<Pass, DropReason>, flow: &mut FlowEvent) -> i32 {
    let (reason, report) = match result {
        Ok(Pass::Quiet) => (DropReason::Forwarded, None),
        Ok(Pass::NewFlow(v)) => (DropReason::Forwarded, Some(v)),
        Ok(Pass::Refused(reason)) | Err(reason) => (reason, Some(verdict::DROPPED)),
    };
    if let Some(counter) = COUNTERS.get_ptr_mut(counter_index(reason, dir)) {
        // SAFETY: a per-CPU slot is only written by this CPU, and softirq context does not
        // preempt itself on it.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(len);
        }
    }
    if let Some(v) = report {
        flow.verdict = v;
        flow.reason = reason as u8;
        flow.direction = dir;
        flow.packet_len = len;
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        flow.timestamp_ns = unsafe { bpf_ktime_get_ns() };
        if !record_allowed(flow.endpoint_id, flow.timestamp_ns) {
            // Over its budget: counted per endpoint (the agent's suppressed-records metric),
            // so that one pod flooding cannot crowd the others' records off the ring.
        } else if FLOWS.output::<FlowEvent>(&*flow, ring_wakeup()).is_err() {
            // The agent is behind (or away): count what was lost instead of blocking.
            if let Some(lost) = FLOWS_LOST.get_ptr_mut(0) {
                // SAFETY: as for the counters above.
                unsafe { *lost += 1 };
            }
        }
    }
    match (reason, result) {
        (DropReason::Forwarded, _) => TC_ACT_OK,
        (_, Ok(Pass::Refused(_))) => {
            // SAFETY: the context pointer is valid for the program's whole run.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            ctx.set_mark(GENERATED_REPLY_MARK);
            // SAFETY: bpf_redirect has no preconditions; it returns TC_ACT_REDIRECT (or
            // TC_ACT_SHOT for flags it does not know: none are passed).
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        _ => TC_ACT_SHOT,
    }
}

/// The flags for a record on the flow ring: no wakeup of the agent while the ring holds
/// less than `FLOW_RING_WAKEUP_BYTES` unread (its reader's timer picks the records up),
/// a forced one past it.
#[inline(always)]
pub(crate) fn ring_wakeup() -> u64 {
    if FLOWS.query(u64::from(BPF_RB_AVAIL_DATA)) >= capacity::FLOW_RING_WAKEUP_BYTES {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

/// Takes one flow record's worth from `endpoint_id`'s bucket on this CPU (issue 12.5): one
/// lookup, and one insert for an endpoint's first record on this CPU.
#[inline(always)]
fn record_allowed(endpoint_id: u32, now: u64) -> bool {
    budget_take(endpoint_id, now, false)
}

/// [`record_allowed`] for a byte report: the same bucket, but only above its reserve for
/// packet records ([`FlowBudget::take_report`]).
#[inline(always)]
fn budget_take(endpoint_id: u32, now: u64, report: bool) -> bool {
    let take = |b: &mut FlowBudget| if report { b.take_report(now) } else { b.take(now) };
    match FLOW_BUDGET.get_ptr_mut(endpoint_id) {
        // SAFETY: this CPU's copy of the value, valid until the program ends; per-CPU values
        // are not shared and softirq context does not preempt itself.
        Some(budget) => take(unsafe { &mut *budget }),
        None => {
            let mut budget = FlowBudget::default();
            let allowed = take(&mut budget);
            // A failed insert (it cannot fill: LRU) leaves the next record a fresh bucket.
            let _ = FLOW_BUDGET.insert(endpoint_id, budget, 0);
            allowed
        }
    }
}

/// The endpoint behind the interface the packet is on; unknown interfaces are isolated.
#[inline(always)]
fn endpoint(ctx: &TcContext, flow: &mut FlowEvent) -> Result<EndpointInfo, DropReason> {
    // SAFETY: the context pointer is valid for the program's whole run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out at once; a concurrent update at worst gives the old
    // or the new endpoint, both valid.
    let ep = unsafe { ENDPOINTS.get(ifindex) }.copied().ok_or(DropReason::UnknownEndpoint)?;
    flow.endpoint_id = ep.endpoint_id;
    flow.identity = ep.identity;
    Ok(ep)
}

/// Parses the packet and copies its 5-tuple into the flow record.
#[inline(always)]
fn parse(ctx: &TcContext, flow: &mut FlowEvent) -> Result<Headers, DropReason> {
    let headers = packet::parse(ctx)?;
    if let Headers::Ipv4 { l3, .. } = &headers {
        flow.saddr = l3.saddr;
        flow.daddr = l3.daddr;
        flow.sport = l3.sport;
        flow.dport = l3.dport;
        flow.protocol = l3.protocol;
        flow.tcp_flags = l3.tcp_flags;
    }
    Ok(headers)
}

fn try_from_pod(ctx: &TcContext, flow: &mut FlowEvent) -> Result<Pass, DropReason> {
    let ep = endpoint(ctx, flow)?;
    let (eth_src, l3) = match parse(ctx, flow)? {
        Headers::Arp => return Ok(Pass::Quiet),
        Headers::Ipv4 { eth_src, l3 } => (eth_src, l3),
    };
    if eth_src != ep.mac {
        return Err(DropReason::SpoofedMac);
    }
    if l3.saddr != ep.ipv4 {
        return Err(DropReason::SpoofedIp);
    }
    quarantine(&ep, direction::EGRESS, l3.daddr, 0, flow)?;
    let now = coarse_now();
    // An ICMP error is a few hundred bytes at most (RFC 1812 4.3.2.3: 576): one that comes
    // in fragments is no stack's, and would meet conntrack with a tuple of its own.
    if l3.icmp_error && l3.fragment == Fragment::First {
        return Err(DropReason::IcmpUnrelated);
    }
    match l3.fragment {
        Fragment::Later => {
            return fragment::follow(ctx, &l3, direction::EGRESS, service::End::Destination, now).map(|()| Pass::Quiet);
        }
        Fragment::First => {
            let key = fragment::key(&l3, direction::EGRESS);
            let result = from_pod_flow(ctx, &ep, l3, now, flow);
            let (admitted, nat) = match result {
                Ok((Pass::Quiet | Pass::NewFlow(_), nat)) => (true, nat),
                _ => (false, None),
            };
            fragment::settle(&key, admitted, nat, now);
            return result.map(|(pass, _)| pass);
        }
        Fragment::Whole => {}
    }
    if l3.icmp_error {
        return related(ctx, &ep, direction::EGRESS, &l3, now).map(|()| Pass::Quiet);
    }
    from_pod_flow(ctx, &ep, l3, now, flow).map(|(pass, _)| pass)
}

/// Quarantine, ahead of fragments, ICMP errors, Service translation, conntrack and policy
/// (so an established connection stops at its next packet): a quarantined endpoint loses
/// every IPv4 packet except, when the agent allows it, those with its own node (the remote
/// address resolves to HOST exactly as policy resolves it); any endpoint loses packets whose
/// remote end (`remote`, as the packet carries it) is a quarantined pod. When nothing is
/// quarantined this is one flag test and one array read.
#[inline(always)]
fn quarantine(ep: &EndpointInfo, dir: u8, remote: [u8; 4], mark: u32, flow: &mut FlowEvent) -> Result<(), DropReason> {
    if ep.flags & endpoint_flags::QUARANTINED != 0 {
        let remote_identity = IPCACHE
            .get(Key::new(remote_lookup_prefix(dir, mark), Ipv4Key { addr: remote }))
            .map_or(identity::WORLD, |v| v.identity);
        flow.remote_identity = remote_identity;
        if remote_identity == identity::HOST && ep.flags & endpoint_flags::QUARANTINE_ALLOW_HOST != 0 {
            return Ok(());
        }
        return Err(DropReason::Quarantined);
    }
    if peer_quarantined(remote) {
        return Err(DropReason::Quarantined);
    }
    Ok(())
}

/// Whether `addr` is a quarantined pod's: one array read, and one hash lookup only while
/// some pod is quarantined.
#[inline(always)]
pub(crate) fn peer_quarantined(addr: [u8; 4]) -> bool {
    match QUARANTINE_COUNT.get(0) {
        Some(&n) if n != 0 => {
            // SAFETY: only the presence of the key is read.
            unsafe { QUARANTINE.get(Ipv4Key { addr }) }.is_some()
        }
        _ => false,
    }
}

/// A pod's packet through Service translation, conntrack and egress policy; also returns
/// the backend address it was translated to.
#[inline(always)]
fn from_pod_flow(
    ctx: &TcContext,
    ep: &EndpointInfo,
    l3: L3,
    now: u64,
    flow: &mut FlowEvent,
) -> Result<(Pass, Option<[u8; 4]>), DropReason> {
    let t = match service::forward(&l3, now) {
        service::Forward::Direct => {
            return admit(ep, direction::EGRESS, &l3, 0, now, flow, 0).map(|(pass, _)| (pass, None));
        }
        service::Forward::Refused { service_id, answer } => {
            flow.service_id = flow_service_id(service_id);
            if answer && reject::answer(ctx, &l3) {
                return Ok((Pass::Refused(DropReason::NoServiceBackend), None));
            }
            return Err(DropReason::NoServiceBackend);
        }
        service::Forward::To(t) => t,
    };
    flow.service_id = flow_service_id(t.nat.service_id);
    // From here the flow is the client's to the backend: conntrack keys on that tuple and
    // egress policy decides on the backend's identity and port, as if the pod dialled it.
    service::rewrite(ctx, &l3, service::End::Destination, t.nat.addr, t.nat.port)?;
    let l3 = L3 {
        daddr: t.nat.addr,
        dport: t.nat.port,
        ..l3
    };
    flow.daddr = l3.daddr;
    flow.dport = l3.dport;
    // A backend that is a quarantined pod: checked again on the address the VIP became.
    if peer_quarantined(l3.daddr) {
        return Err(DropReason::Quarantined);
    }
    let (pass, _) = admit(ep, direction::EGRESS, &l3, 0, now, flow, ct_flags::service(t.nat.service_id))?;
    if t.new {
        service::record(&t)?;
    }
    Ok((pass, Some(t.nat.addr)))
}

fn try_to_pod(ctx: &TcContext, flow: &mut FlowEvent) -> Result<Pass, DropReason> {
    let ep = endpoint(ctx, flow)?;
    let l3 = match parse(ctx, flow)? {
        Headers::Arp => return Ok(Pass::Quiet),
        Headers::Ipv4 { l3, .. } => l3,
    };
    if l3.daddr != ep.ipv4 {
        return Err(DropReason::WrongDestination);
    }
    // SAFETY: the context pointer is valid for the program's whole run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    quarantine(&ep, direction::INGRESS, l3.saddr, mark, flow)?;
    // Our own refusal, sent back by this pod's from_pod (the mark cannot come from a pod):
    // exactly a TCP RST or ICMP port unreachable from a Service port, so that a mark set by
    // anyone else on the node never opens a pod's ingress.
    if mark & GENERATED_REPLY_MARK != 0 && l3.fragment == Fragment::Whole && reject::is_generated(ctx, &l3, ep.ipv4) {
        return Ok(Pass::Quiet);
    }
    let now = coarse_now();
    // An ICMP error is a few hundred bytes at most (RFC 1812 4.3.2.3: 576): one that comes
    // in fragments is no stack's, and would meet conntrack with a tuple of its own.
    if l3.icmp_error && l3.fragment == Fragment::First {
        return Err(DropReason::IcmpUnrelated);
    }
    match l3.fragment {
        Fragment::Later => {
            return fragment::follow(ctx, &l3, direction::INGRESS, service::End::Source, now).map(|()| Pass::Quiet);
        }
        Fragment::First => {
            let key = fragment::key(&l3, direction::INGRESS);
            let result = to_pod_flow(ctx, &ep, &l3, mark, now, flow);
            let (admitted, nat) = match result {
                Ok((Pass::Quiet | Pass::NewFlow(_), nat)) => (true, nat),
                _ => (false, None),
            };
            fragment::settle(&key, admitted, nat, now);
            return result.map(|(pass, _)| pass);
        }
        Fragment::Whole => {}
    }
    if l3.icmp_error {
        return related(ctx, &ep, direction::INGRESS, &l3, now).map(|()| Pass::Quiet);
    }
    to_pod_flow(ctx, &ep, &l3, mark, now, flow).map(|(pass, _)| pass)
}

/// A packet to the pod through conntrack and ingress policy, and a reply on a Service
/// connection given its VIP back; also returns that VIP.
#[inline(always)]
fn to_pod_flow(
    ctx: &TcContext,
    ep: &EndpointInfo,
    l3: &L3,
    mark: u32,
    now: u64,
    flow: &mut FlowEvent,
) -> Result<(Pass, Option<[u8; 4]>), DropReason> {
    let (pass, reply_flags) = admit(ep, direction::INGRESS, l3, mark, now, flow, 0)?;
    // A reply on a connection this pod made to a Service: give it the VIP back.
    let index = ct_flags::rev_nat_index(reply_flags);
    if index != 0 {
        if let Some(vip) = service::reverse(index) {
            service::rewrite(ctx, l3, service::End::Source, vip.vip, vip.port)?;
            return Ok((pass, Some(vip.vip)));
        }
    }
    Ok((pass, None))
}

/// An ICMP error (`l3`, at the endpoint's `dir`) passes only as part of the flow it quotes:
/// the quoted packet went the other way, so it is either that flow's opening direction
/// (key: the quote, in the opposite direction) or its reply (key: the quote reversed, in
/// `dir`), in the endpoint's own table. Two lookups, no refresh: errors never keep a flow
/// alive. An error to the pod quoting a translated Service connection gets the VIP back.
#[inline(always)]
fn related(ctx: &TcContext, ep: &EndpointInfo, dir: u8, l3: &L3, now: u64) -> Result<(), DropReason> {
    let q = packet::quoted(ctx, l3).ok_or(DropReason::IcmpUnrelated)?;
    // SAFETY: as in `admit`.
    let table = unsafe { CONNTRACK.get(&ep.endpoint_id) }.ok_or(DropReason::IcmpUnrelated)?;
    let quoted_dir = if dir == direction::EGRESS {
        direction::INGRESS
    } else {
        direction::EGRESS
    };
    let key = CtKey {
        saddr: q.saddr,
        daddr: q.daddr,
        sport: q.sport,
        dport: q.dport,
        protocol: q.protocol,
        direction: quoted_dir,
        _pad: [0; 2],
    };
    if let Some(flags) = ct_peek(table, &key, now) {
        let index = ct_flags::rev_nat_index(flags);
        if dir == direction::INGRESS && index != 0 {
            if let Some(vip) = service::reverse(index) {
                service::restore_quote(ctx, l3, &q, &vip)?;
            }
        }
        return Ok(());
    }
    ct_peek(table, &key.reversed(dir), now).map(|_| ()).ok_or(DropReason::IcmpUnrelated)
}

/// The flags of `key`'s entry when it is tracked and not idle past its lifetime; unlike
/// [`ct_alive`] it refreshes nothing.
#[inline(always)]
fn ct_peek(table: &CtTable, key: &CtKey, now: u64) -> Option<u32> {
    // SAFETY: copied out at once; a racing refresh writes the same kind of value.
    let entry = unsafe { table.get(key) }.copied()?;
    let lifetime = if entry.flags & ct_flags::CLOSING != 0 {
        CT_CLOSING_LIFETIME_NS
    } else {
        ct_lifetime_ns(key.protocol)
    };
    (now.saturating_sub(entry.last_seen_ns) <= lifetime).then_some(entry.flags)
}

/// A Service port's id as flow records carry it (ids fit: at most `MAX_SERVICE_ID`).
#[inline(always)]
fn flow_service_id(service_id: u32) -> u16 {
    u16::try_from(service_id).unwrap_or(u16::MAX)
}

/// Conntrack, then policy for a new flow, then a conntrack entry for it (with `ct_extra`
/// flags), at time `now` (the packet's one clock reading). The remote side is the packet's
/// destination on egress, its source on ingress. `mark` is the skb mark: it tells traffic
/// the node forwards for someone else from its own. Also returns the flags of the entry a reply matched in the other direction (0
/// when none did).
#[inline(always)]
fn admit(ep: &EndpointInfo, dir: u8, l3: &L3, mark: u32, now: u64, flow: &mut FlowEvent, ct_extra: u32) -> Result<(Pass, u32), DropReason> {
    let key = CtKey {
        saddr: l3.saddr,
        daddr: l3.daddr,
        sport: l3.sport,
        dport: l3.dport,
        protocol: l3.protocol,
        direction: dir,
        _pad: [0; 2],
    };
    // SAFETY: an inner map pointer stays valid for the program's run (RCU), even if the agent
    // removes the endpoint's table meanwhile. Without a table nothing is tracked and no new
    // flow can be (fail closed): the agent writes the table before the endpoint.
    let table = unsafe { CONNTRACK.get(&ep.endpoint_id) };
    let reply_dir = if dir == direction::EGRESS {
        direction::INGRESS
    } else {
        direction::EGRESS
    };
    let closing = l3.tcp_closing();
    // A datagram flow (UDP, ICMP, anything but TCP and SCTP) has no handshake or close to
    // go by (issue 12.9): its replies never extend it, so a remote side alone cannot keep a
    // pinhole open past the lifetime; and its opener's packets, instead of refreshing it,
    // meet policy again (at most once per `CT_REFRESH_NS`), so a revoked policy ends it
    // within a second. TCP and SCTP connections outlive a revocation, as in Cilium.
    let datagram = l3.protocol != proto::TCP && l3.protocol != proto::SCTP;
    let (forward, reply) = if datagram {
        (Refresh::Recheck, Refresh::No)
    } else {
        (Refresh::Yes, Refresh::Yes)
    };
    // The bytes this packet adds to its connection's count: all but the Ethernet header.
    let bytes = u64::from(flow.packet_len.saturating_sub(ETH_HLEN));
    let mut recheck = false;
    if let (false, Some(table)) = (l3.tcp_syn, table) {
        let sent = Seen { bytes, reply: false, mark };
        match ct_alive(table, &key, now, closing, forward, &sent, flow) {
            Some(Tracked::Alive(_)) => return Ok((Pass::Quiet, 0)),
            Some(Tracked::Recheck) => recheck = true,
            None => {
                let back = Seen { bytes, reply: true, mark };
                if let Some(Tracked::Alive(flags)) = ct_alive(table, &key.reversed(reply_dir), now, closing, reply, &back, flow) {
                    return Ok((Pass::Quiet, flags));
                }
            }
        }
    }
    let remote = if dir == direction::EGRESS { l3.daddr } else { l3.saddr };
    let (rule, v) = policy_verdict(ep, dir, remote, mark, l3, flow)?;
    let table = table.ok_or(DropReason::CtInsertFailed)?;
    let flags = u32::from(v) | ct_extra;
    // A flow policy admits again (a datagram flow's recheck, a TCP SYN on a live tuple: a
    // retransmission) keeps its entry and its counts, so that nothing it sent goes
    // uncounted; a closing or expired one starts afresh (its end was reported).
    if recheck || l3.tcp_syn {
        if let Some(e) = table.get_ptr_mut(key) {
            // SAFETY: valid until the program ends; racing writers store the same kind of value.
            let live = unsafe {
                recheck || ((*e).flags & ct_flags::CLOSING == 0 && now.saturating_sub((*e).last_seen_ns) <= ct_lifetime_ns(key.protocol))
            };
            if live {
                // SAFETY: as above.
                unsafe {
                    (*e).last_seen_ns = now;
                    (*e).rule_id = rule;
                    (*e).flags = flags;
                }
                account(e, &key, now, &Seen { bytes, reply: false, mark }, flow);
                return Ok((if recheck { Pass::Quiet } else { Pass::NewFlow(v) }, 0));
            }
        }
    }
    let entry = CtEntry {
        last_seen_ns: now,
        rule_id: rule,
        flags,
        to_destination: bytes,
        to_source: 0,
        reported_ns: now,
    };
    table.insert(key, entry, 0).map_err(|_| DropReason::CtInsertFailed)?;
    // A flow that is still allowed is no new flow (no record).
    Ok((if recheck { Pass::Quiet } else { Pass::NewFlow(v) }, 0))
}

/// Ethernet header length: what a packet's byte count leaves out.
const ETH_HLEN: u32 = 14;

/// A packet on a tracked connection, as its byte count sees it.
struct Seen {
    /// Bytes past the Ethernet header.
    bytes: u64,
    /// A reply (it matched the opener's key reversed): counts to the source.
    reply: bool,
    /// The skb mark, for the remote's identity in a report.
    mark: u32,
}

/// Adds `seen`'s bytes to the entry `e` of `key` (the opener's tuple) and, when its last
/// report is older than `FLOW_BYTES_REPORT_NS`, claims the next one and reports the counts
/// ([`flow_kind::UPDATE`]).
///
/// The addition is an atomic add (`BPF_ATOMIC | BPF_ADD`, no fetch): CPUs racing on one
/// connection lose no byte. The report is claimed by a compare-and-swap on `reported_ns`
/// (`BPF_CMPXCHG`), so that exactly one of the CPUs that see it due writes it.
#[inline(always)]
fn account(e: *mut CtEntry, key: &CtKey, now: u64, seen: &Seen, flow: &FlowEvent) {
    // SAFETY: `e` points into a map value, valid until the program ends and 8-byte aligned
    // (`CtEntry` is `repr(C)` of u64s first); every CPU touches the counters atomically.
    unsafe {
        let counter = if seen.reply {
            addr_of_mut!((*e).to_source)
        } else {
            addr_of_mut!((*e).to_destination)
        };
        atomic_xadd::<u64, u64, { Relaxed }>(counter, seen.bytes);
        let reported = addr_of_mut!((*e).reported_ns);
        let last = reported.read_volatile();
        if now.saturating_sub(last) > FLOW_BYTES_REPORT_NS && atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(reported, last, now).1 {
            report(e, key, flow_kind::UPDATE, seen.mark, flow);
        }
    }
}

/// Writes a byte report of `kind` for the entry `e` of `key` onto the flow ring, within the
/// endpoint's budget above its reserve for packet records ([`FlowBudget::take_report`]). A
/// report the budget or a full ring refuses is lost, not retried: the next one carries the
/// same cumulative counts. A function of its own (a BPF-to-BPF call) so that its code is not
/// repeated at each of its callers.
#[inline(never)]
fn report(e: *const CtEntry, key: &CtKey, kind: u8, mark: u32, flow: &FlowEvent) {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let time = unsafe { bpf_ktime_get_ns() };
    if !budget_take(flow.endpoint_id, time, true) {
        return;
    }
    let Some(mut slot) = FLOWS.reserve::<FlowEvent>(0) else {
        if let Some(lost) = FLOWS_LOST.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot, only written by this CPU.
            unsafe { *lost += 1 };
        }
        return;
    };
    let remote = if key.direction == direction::EGRESS { key.daddr } else { key.saddr };
    let remote_identity = IPCACHE
        .get(Key::new(remote_lookup_prefix(key.direction, mark), Ipv4Key { addr: remote }))
        .map_or(identity::WORLD, |v| v.identity);
    let r = slot.as_mut_ptr();
    // SAFETY: `r` is the reserved record, `size_of::<FlowEvent>()` bytes, 8-byte aligned;
    // every field is written (no byte of the ring's memory is left as it was). `e` points
    // into a map value, valid until the program ends; its counters are read atomically.
    unsafe {
        let flags = (*e).flags;
        (*r).timestamp_ns = time;
        (*r).endpoint_id = flow.endpoint_id;
        (*r).identity = flow.identity;
        (*r).remote_identity = remote_identity;
        (*r).rule_id = (*e).rule_id;
        (*r).saddr = key.saddr;
        (*r).daddr = key.daddr;
        (*r).sport = key.sport;
        (*r).dport = key.dport;
        (*r).packet_len = flow.packet_len;
        (*r).protocol = key.protocol;
        (*r).direction = key.direction;
        (*r).verdict = verdict::FORWARDED;
        (*r).reason = DropReason::Forwarded as u8;
        (*r).tcp_flags = flow.tcp_flags;
        (*r).kind = kind;
        (*r).service_id = flow_service_id(ct_flags::rev_nat_index(flags));
        (*r).to_destination = core::ptr::addr_of!((*e).to_destination).read_volatile();
        (*r).to_source = core::ptr::addr_of!((*e).to_source).read_volatile();
    }
    slot.submit(ring_wakeup());
}

/// What a packet on a tracked flow does to its entry once `CT_REFRESH_NS` passed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refresh {
    /// Refreshes it.
    Yes,
    /// Leaves it as it is.
    No,
    /// Sends the packet to policy again, which writes a fresh entry if it still allows it.
    Recheck,
}

/// A tracked flow's entry as a packet finds it.
enum Tracked {
    /// Alive, with its flags.
    Alive(u32),
    /// Alive, but policy must decide again ([`Refresh::Recheck`]).
    Recheck,
}

/// Whether `key` is tracked and not idle past its lifetime; a refresh (`refresh`) happens
/// at most once per `CT_REFRESH_NS` so that most packets do no map write. `closing` (a FIN
/// or RST) marks the entry, which then ages out after `CT_CLOSING_LIFETIME_NS` idle, and
/// reports its counts ([`flow_kind::END`]) once. A packet that passes on the entry adds its
/// bytes to it ([`account`]); one sent back to policy ([`Tracked::Recheck`]) is counted by
/// `admit` if policy still allows it.
#[inline(always)]
fn ct_alive(table: &CtTable, key: &CtKey, now: u64, closing: bool, refresh: Refresh, seen: &Seen, flow: &FlowEvent) -> Option<Tracked> {
    let entry = table.get_ptr_mut(key)?;
    // SAFETY: the pointer is valid until the program ends; a racing refresh writes the same
    // kind of value, so a torn read at worst refreshes twice.
    unsafe {
        let flags = (*entry).flags;
        let lifetime = if flags & ct_flags::CLOSING != 0 {
            CT_CLOSING_LIFETIME_NS
        } else {
            ct_lifetime_ns(key.protocol)
        };
        let idle = now.saturating_sub((*entry).last_seen_ns);
        if idle > lifetime {
            return None;
        }
        if closing && flags & ct_flags::CLOSING == 0 {
            (*entry).last_seen_ns = now;
            // The CPU whose compare-and-swap sets the bit reports the end, exactly once: on
            // the 64-bit word of `rule_id` and `flags` (flags high, little-endian; asserted
            // in the ABI crate), as BPF before v3 has no 32-bit atomics.
            let word = addr_of_mut!((*entry).rule_id).cast::<u64>();
            let old = word.read_volatile();
            let closed = old | u64::from(ct_flags::CLOSING) << 32;
            let ended = old & u64::from(ct_flags::CLOSING) << 32 == 0 && atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(word, old, closed).1;
            let counter = if seen.reply {
                addr_of_mut!((*entry).to_source)
            } else {
                addr_of_mut!((*entry).to_destination)
            };
            atomic_xadd::<u64, u64, { Relaxed }>(counter, seen.bytes);
            if ended {
                report(entry, key, flow_kind::END, seen.mark, flow);
            }
            return Some(Tracked::Alive(flags));
        }
        if idle > CT_REFRESH_NS {
            match refresh {
                Refresh::Yes => (*entry).last_seen_ns = now,
                Refresh::No => {}
                Refresh::Recheck => return Some(Tracked::Recheck),
            }
        }
        account(entry, key, now, seen, flow);
        Some(Tracked::Alive(flags))
    }
}

/// The rule that allows a new flow and the verdict: `FORWARDED` with the rule (or
/// `rule_id::NONE` when the endpoint is not isolated that way), or `AUDIT` when only
/// audit-mode policies isolate it and none of their rules matched.
#[inline(always)]
fn policy_verdict(ep: &EndpointInfo, dir: u8, remote: [u8; 4], mark: u32, l3: &L3, flow: &mut FlowEvent) -> Result<(u32, u8), DropReason> {
    let (isolated, audit) = if dir == direction::EGRESS {
        (endpoint_flags::ISOLATED_EGRESS, endpoint_flags::AUDIT_EGRESS)
    } else {
        (endpoint_flags::ISOLATED_INGRESS, endpoint_flags::AUDIT_INGRESS)
    };
    // A packet the node masquerades to its own address for a client elsewhere (kube-proxy's
    // mark, or the agent's SNAT mark) resolves as an unknown address would (prefix 0),
    // never to the node's HOST identity.
    let remote_identity = IPCACHE
        .get(Key::new(remote_lookup_prefix(dir, mark), Ipv4Key { addr: remote }))
        .map_or(identity::WORLD, |v| v.identity);
    flow.remote_identity = remote_identity;
    // Traffic between a pod and its own node is always allowed (kubelet probes), as
    // Kubernetes documents for NetworkPolicy; the agent gives the node's addresses HOST.
    // Only what the node originates gets HOST (see `remote_lookup_prefix`).
    if ep.flags & (isolated | audit) == 0 || remote_identity == identity::HOST {
        return Ok((rule_id::NONE, verdict::FORWARDED));
    }
    let mut key = PolicyKey {
        endpoint_id: ep.endpoint_id.to_be_bytes(),
        remote_identity: remote_identity.to_be_bytes(),
        direction: dir,
        protocol: l3.protocol,
        dport: l3.policy_port(),
    };
    let mut found = POLICY.get(Key::new(POLICY_PREFIX_FULL, key)).map(|v| v.rule_id);
    if found.is_none() {
        key.remote_identity = identity::ANY.to_be_bytes();
        found = POLICY.get(Key::new(POLICY_PREFIX_FULL, key)).map(|v| v.rule_id);
    }
    match found {
        Some(rule) => {
            flow.rule_id = rule;
            Ok((rule, verdict::FORWARDED))
        }
        None if ep.flags & isolated == 0 => Ok((rule_id::NONE, verdict::AUDIT)),
        None => Err(DropReason::PolicyDenied),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
