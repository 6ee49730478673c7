//! Bounded, bounds-checked header parsing with direct packet access.

use aya_ebpf::programs::TcContext;
use bulkhead_common::{proto, DropReason};

pub const ETH_HLEN: usize = 14;
/// Offsets in the IPv4 header of its checksum and addresses.
pub const IP_CHECK_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;
/// Offsets of the checksum in the TCP and UDP headers.
pub const TCP_CHECK_OFF: usize = 16;
pub const UDP_CHECK_OFF: usize = 6;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_ARP: [u8; 2] = [0x08, 0x06];
/// Largest IPv4 header (IHL 15) plus the 14 bytes of TCP header we read (up to the flags).
const MAX_PARSE: u32 = (ETH_HLEN + 60 + 14) as u32;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMP_TIMESTAMP: u8 = 13;
const ICMP_ADDRESS_MASK_REPLY: u8 = 18;
/// IP flags and fragment offset: More Fragments, and the offset's 13 bits.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
/// Version 4, IHL 5: an IPv4 header without options.
const IPV4_NO_OPTIONS: u8 = 0x45;
/// The ICMP header (type, code, checksum, 4 bytes) before an error's quote.
const ICMP_HLEN: usize = 8;
/// What an ICMP error quotes that we read (RFC 792): an IP header without options and the
/// first 8 bytes of its payload.
const QUOTE_LEN: usize = 20 + 8;

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    ethertype: [u8; 2],
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    ttl: u8,
    protocol: u8,
    check: [u8; 2],
    saddr: [u8; 4],
    daddr: [u8; 4],
}

/// First four bytes of TCP, UDP and SCTP headers: the ports.
#[repr(C)]
struct Ports {
    sport: [u8; 2],
    dport: [u8; 2],
}

/// The TCP header up to its flags byte.
#[repr(C)]
struct TcpHead {
    sport: [u8; 2],
    dport: [u8; 2],
    seq: [u8; 4],
    ack: [u8; 4],
    data_offset: u8,
    flags: u8,
}

#[repr(C)]
struct IcmpEcho {
    kind: u8,
    code: u8,
    check: [u8; 2],
    id: [u8; 2],
    seq: [u8; 2],
}

/// The IPv4 facts the verdict needs, in network byte order.
pub struct L3 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub protocol: u8,
    /// Source port; ICMP echo: the identifier on requests, 0 on replies.
    pub sport: [u8; 2],
    /// Destination port; ICMP echo: 0 on requests, the identifier on replies, so that a
    /// reply's reverse tuple is its request's tuple.
    pub dport: [u8; 2],
    /// A TCP SYN without ACK: always a new connection, even on a tuple conntrack still
    /// holds (a client may reuse a 4-tuple at once when the server closed first).
    pub tcp_syn: bool,
    /// TCP flags (0 for other protocols), reported in flow records.
    pub tcp_flags: u8,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// The IP identification field, as on the wire.
    pub ip_id: [u8; 2],
    /// Which part of a fragmented datagram the packet is.
    pub fragment: Fragment,
    /// An ICMP error (destination unreachable, time exceeded, parameter problem): it belongs
    /// to the flow it quotes ([`quoted`]); its ports are 0.
    pub icmp_error: bool,
}

/// A packet's place in its datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// Offset 0 with More Fragments: it carries the ports for the rest.
    First,
    /// A later fragment: no L4 header, so its ports are 0 and unknown.
    Later,
}

/// The flow an ICMP error quotes: the quoted packet's tuple, in network byte order.
pub struct Quoted {
    /// The quoted packet's source: the receiver of the error, when it sent it.
    pub saddr: [u8; 4],
    /// The quoted packet's destination.
    pub daddr: [u8; 4],
    /// Its source port (an ICMP query: as [`L3::sport`] would be).
    pub sport: [u8; 2],
    /// Its destination port (an ICMP query: as [`L3::dport`] would be).
    pub dport: [u8; 2],
    /// Its IP protocol.
    pub protocol: u8,
}

/// An ICMP message's ports in a conntrack tuple: echo, timestamp, information and address
/// mask requests put their identifier in the source port and their kind in the destination
/// port (echo: 0, as before), replies the other way round, so that a reply's reverse tuple
/// is its request's. Every other type is a flow of its own kind: `[type, code]` both ways,
/// which no request or reply tuple equals (so no other ICMP shares its conntrack entry).
/// `None` for errors, which have no tuple of their own.
#[inline(always)]
pub(crate) fn icmp_ports(kind: u8, code: u8, id: [u8; 2]) -> Option<([u8; 2], [u8; 2])> {
    match kind {
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => None,
        ICMP_ECHO_REQUEST => Some((id, [0; 2])),
        ICMP_ECHO_REPLY => Some(([0; 2], id)),
        // 13 timestamp, 15 information, 17 address mask requests; 14, 16, 18 their replies.
        ICMP_TIMESTAMP..=ICMP_ADDRESS_MASK_REPLY if kind % 2 == 1 => Some((id, [kind, 0])),
        ICMP_TIMESTAMP..=ICMP_ADDRESS_MASK_REPLY => Some(([kind - 1, 0], id)),
        _ => Some(([kind, code], [kind, code])),
    }
}

/// The flow the ICMP error `l3` quotes: an IP header without options that is not a later
/// fragment, and its first 8 bytes (ports; for a quoted ICMP query its id). One fixed-size
/// load; `None` when the quote is short, has options, or is an error about an error.
#[inline(always)]
pub fn quoted(ctx: &TcContext, l3: &L3) -> Option<Quoted> {
    let m = ctx.load::<[u8; ICMP_HLEN + QUOTE_LEN]>(l3.l4_off).ok()?;
    // The quoted header at 8, its payload at 28.
    let q = ICMP_HLEN;
    let p = q + 20;
    if m[q] != IPV4_NO_OPTIONS || u16::from_be_bytes([m[q + 6], m[q + 7]]) & IP_OFFSET != 0 {
        return None;
    }
    let protocol = m[q + 9];
    let (sport, dport) = match protocol {
        proto::TCP | proto::UDP | proto::SCTP => ([m[p], m[p + 1]], [m[p + 2], m[p + 3]]),
        proto::ICMP => icmp_ports(m[p], m[p + 1], [m[p + 4], m[p + 5]])?,
        _ => ([0; 2], [0; 2]),
    };
    Some(Quoted {
        saddr: [m[q + 12], m[q + 13], m[q + 14], m[q + 15]],
        daddr: [m[q + 16], m[q + 17], m[q + 18], m[q + 19]],
        sport,
        dport,
        protocol,
    })
}

impl L3 {
    /// A TCP FIN or RST: the connection is closing.
    #[inline(always)]
    pub fn tcp_closing(&self) -> bool {
        self.protocol == proto::TCP && self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }

    /// Port for the policy lookup: only TCP, UDP and SCTP have one.
    #[inline(always)]
    pub fn policy_port(&self) -> [u8; 2] {
        match self.protocol {
            proto::TCP | proto::UDP | proto::SCTP => self.dport,
            _ => [0; 2],
        }
    }
}

pub enum Headers {
    Arp,
    Ipv4 { eth_src: [u8; 6], l3: L3 },
}

/// A pointer to a `T` at `offset`, checked against the end of the linear data.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*const T, DropReason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(DropReason::Malformed);
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Headers, DropReason> {
    // Headers may sit in paged data; pull what we read into the linear part once.
    let want = if ctx.len() < MAX_PARSE { ctx.len() } else { MAX_PARSE };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        ctx.pull_data(want).map_err(|_| DropReason::Malformed)?;
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at checked that the header lies inside the packet.
    let (ethertype, eth_src) = unsafe { ((*eth).ethertype, (*eth).src) };
    if ethertype == ETH_P_ARP {
        return Ok(Headers::Arp);
    }
    if ethertype != ETH_P_IP {
        return Err(DropReason::UnsupportedEthertype);
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: as above.
    let (version_ihl, ip_id, frag_off, protocol, saddr, daddr) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).id,
            (*ip).frag_off,
            (*ip).protocol,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return Err(DropReason::Malformed);
    }
    let frag_off = u16::from_be_bytes(frag_off);
    let fragment = if frag_off & IP_OFFSET != 0 {
        Fragment::Later
    } else if frag_off & IP_MF != 0 {
        Fragment::First
    } else {
        Fragment::Whole
    };
    let l4 = ETH_HLEN + ihl;
    let mut tcp_syn = false;
    let mut tcp_flags = 0;
    let mut icmp_error = false;
    let (sport, dport) = match protocol {
        // A later fragment has no L4 header: it follows its first fragment (main.rs).
        _ if fragment == Fragment::Later => ([0; 2], [0; 2]),
        proto::TCP => {
            let t = ptr_at::<TcpHead>(ctx, l4)?;
            // SAFETY: as above.
            let (sport, dport, flags) = unsafe { ((*t).sport, (*t).dport, (*t).flags) };
            tcp_syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            tcp_flags = flags;
            (sport, dport)
        }
        proto::UDP | proto::SCTP => {
            let p = ptr_at::<Ports>(ctx, l4)?;
            // SAFETY: as above.
            unsafe { ((*p).sport, (*p).dport) }
        }
        proto::ICMP => {
            let p = ptr_at::<IcmpEcho>(ctx, l4)?;
            // SAFETY: as above.
            let (kind, code, id) = unsafe { ((*p).kind, (*p).code, (*p).id) };
            match icmp_ports(kind, code, id) {
                Some(ports) => ports,
                None => {
                    icmp_error = true;
                    ([0; 2], [0; 2])
                }
            }
        }
        _ => ([0; 2], [0; 2]),
    };
    Ok(Headers::Ipv4 {
        eth_src,
        l3: L3 {
            saddr,
            daddr,
            protocol,
            sport,
            dport,
            tcp_syn,
            tcp_flags,
            l4_off: l4,
            ip_id,
            fragment,
            icmp_error,
        },
    })
}
