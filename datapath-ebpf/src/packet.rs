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
const ICMP_ECHO_REQUEST: u8 = 8;

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
    let (version_ihl, frag_off, protocol, saddr, daddr) =
        unsafe { ((*ip).version_ihl, (*ip).frag_off, (*ip).protocol, (*ip).saddr, (*ip).daddr) };
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return Err(DropReason::Malformed);
    }
    // A non-first fragment has no L4 header; its ports are unknown.
    if u16::from_be_bytes(frag_off) & 0x1fff != 0 {
        return Err(DropReason::Fragment);
    }
    let l4 = ETH_HLEN + ihl;
    let mut tcp_syn = false;
    let mut tcp_flags = 0;
    let (sport, dport) = match protocol {
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
            let (kind, id) = unsafe { ((*p).kind, (*p).id) };
            match kind {
                ICMP_ECHO_REQUEST => (id, [0; 2]),
                ICMP_ECHO_REPLY => ([0; 2], id),
                _ => ([0; 2], [0; 2]),
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
        },
    })
}
