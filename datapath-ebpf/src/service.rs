//! ClusterIP translation (Cilium's lb4 is the model): a Service port's header and backend
//! slots in one hash map, backends in another, and each connection's choice in an LRU map
//! beside conntrack, so that every later packet goes to the same backend. Replies find the
//! VIP through the reverse-NAT index their conntrack entry carries (one static entry per
//! Service port, no per-connection record). Per packet: one header lookup, one translation
//! lookup and, on a hit, one backend lookup (is the connection's backend still there?); a
//! new connection adds one slot and one backend lookup (two more with ClientIP affinity) and
//! one LRU insert. See datapath-ebpf/SERVICES.md.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::{HashMap, LruHashMap},
    programs::TcContext,
};
use bulkhead_common::{
    backend_slot, capacity, direction, proto, service_flags, AffinityKey, AffinityValue, Backend, CtKey, DropReason, LbNat, RevNat,
    ServiceKey, ServiceValue,
};

use crate::packet::{Quoted, IP_CHECK_OFF, IP_DADDR_OFF, IP_SADDR_OFF, L3, TCP_CHECK_OFF, UDP_CHECK_OFF};

// Map names must equal bulkhead_common::map_names (the agent looks them up by those).
#[map(name = "bh_svc_v1")]
pub(crate) static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(capacity::SERVICES, 0);

#[map(name = "bh_be_v1")]
static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(capacity::BACKENDS, 0);

#[map(name = "bh_lbnat_v1")]
static LB_NAT: LruHashMap<CtKey, LbNat> = LruHashMap::pinned(capacity::LB_NAT, 0);

#[map(name = "bh_lbrev_v1")]
static REV_NAT: HashMap<u32, RevNat> = HashMap::pinned(capacity::REV_NAT, 0);

#[map(name = "bh_lbaff_v1")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(capacity::AFFINITY, 0);

const NS_PER_SEC: u64 = 1_000_000_000;

/// Where a packet to a Service port goes.
pub struct Translation {
    /// The backend's address and port, the backend and the Service port.
    pub nat: LbNat,
    /// The client→VIP tuple, the forward record's key.
    pub key: CtKey,
    /// Chosen now (no record yet): [`record`] must store it once the flow is admitted.
    pub new: bool,
}

/// What a packet from a pod to a possible Service port becomes.
pub enum Forward {
    /// Not a Service port: the packet goes on as sent.
    Direct,
    /// Service port traffic, translated to a backend.
    To(Translation),
    /// Service port `service_id` cannot take the packet: it has no backend, the
    /// connection's backend is gone, or (SCTP) its backend's port differs. Dropped and
    /// counted as `no_service_backend`; `answer`: the client is told (`reject`).
    Refused {
        /// The Service port ([`ServiceValue::service_id`]).
        service_id: u32,
        /// Whether the client gets a refusal back rather than silence.
        answer: bool,
    },
}

/// The translation of a packet from a pod when its destination is a Service port. TCP, UDP,
/// and SCTP when the backend's port is the Service port (SCTP's CRC32c covers the ports but
/// not the addresses: an address-only rewrite keeps it valid, a port rewrite would need it
/// recomputed over the whole packet, which eBPF cannot afford; the agent writes no such
/// SCTP backend, and one found anyway is refused, never sent with a stale checksum).
///
/// An established connection whose backend is gone (removed, or its id given to another
/// `{ip, port}`) ends: refused and answered (TCP RST, ICMP port unreachable), one backend
/// lookup per translated packet. A TCP SYN on its tuple is a new connection and picks anew.
#[inline(always)]
pub fn forward(l3: &L3, now: u64) -> Forward {
    if l3.protocol != proto::TCP && l3.protocol != proto::UDP && l3.protocol != proto::SCTP {
        return Forward::Direct;
    }
    let mut skey = ServiceKey::new(l3.daddr, u16::from_be_bytes(l3.dport), l3.protocol, 0);
    // SAFETY: the value is copied out at once; a concurrent update gives the old or the new one.
    let Some(header) = (unsafe { SERVICES.get(skey) }).copied() else {
        return Forward::Direct;
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
    // SAFETY: as above.
    if let Some(nat) = unsafe { LB_NAT.get(key) }.copied() {
        // A record left by an earlier Service on this VIP:port is not this one's.
        if nat.service_id == header.service_id {
            // SAFETY: as above.
            let alive = unsafe { BACKENDS.get(nat.backend_id) }.is_some_and(|b| b.ip == nat.addr && b.port == nat.port);
            if alive {
                return Forward::To(Translation { nat, key, new: false });
            }
            if !l3.tcp_syn {
                if l3.protocol != proto::TCP {
                    // Datagrams have no handshake to start over with: once told, the
                    // client's next datagram on this tuple picks a live backend. (A TCP
                    // record stays, so every late segment gets its RST, until a SYN.)
                    let _ = LB_NAT.remove(key);
                }
                return Forward::Refused {
                    service_id: header.service_id,
                    answer: true,
                };
            }
        }
    }
    let refused = Forward::Refused {
        service_id: header.service_id,
        // A connect fails at once, as kube-proxy's REJECT makes it; a stray segment of no
        // connection gets nothing.
        answer: l3.protocol != proto::TCP || l3.tcp_syn,
    };
    let Ok(backend_id) = pick(&header, &mut skey, l3, now) else {
        return refused;
    };
    // SAFETY: as above.
    let Some(backend) = unsafe { BACKENDS.get(backend_id) }.copied() else {
        return refused;
    };
    if l3.protocol == proto::SCTP && backend.port != l3.dport {
        return refused;
    }
    let nat = LbNat {
        addr: backend.ip,
        port: backend.port,
        _pad: [0; 2],
        backend_id,
        service_id: header.service_id,
    };
    Forward::To(Translation { nat, key, new: true })
}

/// Whether `addr:port`/`protocol` is a Service port (its header exists): the only source a
/// generated refusal may carry.
#[inline(always)]
pub fn is_service_port(addr: [u8; 4], port: u16, protocol: u8) -> bool {
    // SAFETY: only presence is read.
    unsafe { SERVICES.get(ServiceKey::new(addr, port, protocol, 0)) }.is_some()
}

/// The backend for a new connection: the client's affinity when the Service has one and it
/// is fresh, else a random slot (one computed index, one lookup).
#[inline(always)]
fn pick(header: &ServiceValue, skey: &mut ServiceKey, l3: &L3, now: u64) -> Result<u32, DropReason> {
    let affinity = header.flags & service_flags::AFFINITY_CLIENT_IP != 0;
    let akey = AffinityKey {
        client: l3.saddr,
        service_id: header.service_id,
    };
    if affinity {
        if let Some(a) = AFFINITY.get_ptr_mut(akey) {
            // SAFETY: the pointer is valid until the program ends; a racing writer stores
            // the same kind of value.
            unsafe {
                let timeout = u64::from(header.affinity_timeout_s) * NS_PER_SEC;
                let id = (*a).backend_id;
                // A backend since removed frees the client to pick again.
                let alive = BACKENDS.get(id).is_some();
                if alive && now.saturating_sub((*a).last_used_ns) <= timeout {
                    (*a).last_used_ns = now;
                    return Ok(id);
                }
            }
        }
    }
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let pick = unsafe { bpf_get_prandom_u32() };
    skey.slot = backend_slot(pick, header.backend_count).ok_or(DropReason::NoServiceBackend)?;
    // SAFETY: copied out at once, as above.
    let id = unsafe { SERVICES.get(*skey) }
        .map(|v| v.backend_id)
        .ok_or(DropReason::NoServiceBackend)?;
    if affinity {
        let value = AffinityValue {
            last_used_ns: now,
            backend_id: id,
            _pad: 0,
        };
        // A full LRU evicts; failing to remember affinity must not fail the connection.
        let _ = AFFINITY.insert(akey, value, 0);
    }
    Ok(id)
}

/// Stores a new connection's translation, for its later packets.
#[inline(always)]
pub fn record(t: &Translation) -> Result<(), DropReason> {
    LB_NAT.insert(t.key, t.nat, 0).map_err(|_| DropReason::CtInsertFailed)
}

/// The VIP and port a reply on a connection with reverse-NAT index `index` gets back.
#[inline(always)]
pub fn reverse(index: u32) -> Option<RevNat> {
    // SAFETY: copied out at once.
    unsafe { REV_NAT.get(index) }.copied()
}

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The destination (forward translation).
    Destination,
    /// The source (a reply's reverse translation).
    Source,
}

/// Rewrites one end's address and port to `addr`/`port`, fixing the IPv4 and the TCP/UDP
/// checksums incrementally (the address is in the L4 pseudo-header, hence
/// `BPF_F_PSEUDO_HDR`). SCTP: the address only; its CRC32c covers its header and chunks, not
/// the addresses (RFC 9260 6.8), and [`forward`] never changes an SCTP port.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, l3: &L3, end: End, addr: [u8; 4], port: [u8; 2]) -> Result<(), DropReason> {
    let (addr_off, port_off, old_addr, old_port) = match end {
        End::Destination => (IP_DADDR_OFF, l3.l4_off + 2, l3.daddr, l3.dport),
        End::Source => (IP_SADDR_OFF, l3.l4_off, l3.saddr, l3.sport),
    };
    let l4_check = match l3.protocol {
        proto::TCP => Some((l3.l4_off + TCP_CHECK_OFF, 0)),
        // A zero UDP checksum means "none" and must stay zero; a result of zero is sent as
        // 0xffff (RFC 768). BPF_F_MARK_MANGLED_0 does both.
        proto::UDP => Some((l3.l4_off + UDP_CHECK_OFF, u64::from(BPF_F_MARK_MANGLED_0))),
        _ if old_port != port => return Err(DropReason::NoServiceBackend),
        _ => None,
    };
    let from_addr = u64::from(u32::from_ne_bytes(old_addr));
    let to_addr = u64::from(u32::from_ne_bytes(addr));
    let fail = |_| DropReason::Malformed;
    if let Some((check_off, mangled)) = l4_check {
        ctx.l4_csum_replace(check_off, from_addr, to_addr, u64::from(BPF_F_PSEUDO_HDR) | mangled | 4)
            .map_err(fail)?;
        if old_port != port {
            let from_port = u64::from(u16::from_ne_bytes(old_port));
            let to_port = u64::from(u16::from_ne_bytes(port));
            ctx.l4_csum_replace(check_off, from_port, to_port, mangled | 2).map_err(fail)?;
            ctx.store(port_off, &port, 0).map_err(fail)?;
        }
    }
    ctx.l3_csum_replace(IP_CHECK_OFF, from_addr, to_addr, 4).map_err(fail)?;
    ctx.store(addr_off, &addr, 0).map_err(fail)
}

/// Rewrites only one end's address and the IPv4 checksum: a later fragment of a translated
/// datagram, whose ports and L4 checksum (which covers the addresses) travel in its first
/// fragment, rewritten there by [`rewrite`].
#[inline(always)]
pub fn rewrite_address(ctx: &TcContext, l3: &L3, end: End, addr: [u8; 4]) -> Result<(), DropReason> {
    let (addr_off, old_addr) = match end {
        End::Destination => (IP_DADDR_OFF, l3.daddr),
        End::Source => (IP_SADDR_OFF, l3.saddr),
    };
    let fail = |_| DropReason::Malformed;
    let from_addr = u64::from(u32::from_ne_bytes(old_addr));
    let to_addr = u64::from(u32::from_ne_bytes(addr));
    ctx.l3_csum_replace(IP_CHECK_OFF, from_addr, to_addr, 4).map_err(fail)?;
    ctx.store(addr_off, &addr, 0).map_err(fail)
}

/// Gives an ICMP error to a client (`l3`) about its translated Service connection (the
/// quote `q`, client → backend) the VIP back, so that the client's stack matches it to its
/// socket: the quoted destination address and port become `vip`'s, and the error's own
/// source too when the backend sent it (a router's address is left as it is). The quoted
/// IP header's checksum is updated with its address, so the header still sums to the same
/// value and only the quoted port changes the ICMP checksum (which has no pseudo-header).
#[inline(always)]
pub fn restore_quote(ctx: &TcContext, l3: &L3, q: &Quoted, vip: &RevNat) -> Result<(), DropReason> {
    // The ICMP checksum at 2, the quoted header at 8: its checksum at 10, destination at 16;
    // the quoted destination port at 8 + 20 + 2.
    let icmp_check = l3.l4_off + 2;
    let quote = l3.l4_off + 8;
    let fail = |_| DropReason::Malformed;
    let from_addr = u64::from(u32::from_ne_bytes(q.daddr));
    let to_addr = u64::from(u32::from_ne_bytes(vip.vip));
    ctx.l3_csum_replace(quote + 10, from_addr, to_addr, 4).map_err(fail)?;
    ctx.store(quote + 16, &vip.vip, 0).map_err(fail)?;
    if q.dport != vip.port {
        let from_port = u64::from(u16::from_ne_bytes(q.dport));
        let to_port = u64::from(u16::from_ne_bytes(vip.port));
        ctx.l4_csum_replace(icmp_check, from_port, to_port, 2).map_err(fail)?;
        ctx.store(quote + 22, &vip.port, 0).map_err(fail)?;
    }
    if l3.saddr == q.daddr {
        ctx.l3_csum_replace(IP_CHECK_OFF, from_addr, to_addr, 4).map_err(fail)?;
        ctx.store(IP_SADDR_OFF, &vip.vip, 0).map_err(fail)?;
    }
    Ok(())
}
