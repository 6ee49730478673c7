//! The refusals the datapath answers with itself, as a closed port would (kube-proxy's
//! REJECT): a TCP RST, or an ICMP port unreachable for UDP and SCTP, from the Service port
//! the client dialled. The packet is rewritten into its refusal in place (shrunk or grown to
//! a fixed size with `bpf_skb_change_tail`, every header written whole with its checksums
//! computed here) and the caller sends it back out of the veth towards the pod with
//! `GENERATED_REPLY_MARK`; `to_pod` lets through exactly these ([`is_generated`]).
//!
//! Only packets without IP options are answered (any pod's stack sends none): every offset
//! is then fixed, and so is every length the verifier sees.
//!
//! Checksums: the packets are written whole, so both checksums are computed over fixed
//! bytes. A pod's packet may be `CHECKSUM_PARTIAL` (veth offloads); the receiving stack
//! trusts such a packet without verifying (`skb_csum_unnecessary`), and a refusal is only
//! ever delivered to the pod it came from, so the full checksums written here serve the
//! packets that are checked.

use aya_ebpf::{bindings::BPF_F_RECOMPUTE_CSUM, helpers::bpf_skb_change_tail, programs::TcContext};
use bulkhead_common::proto;

use crate::packet::{ETH_HLEN, L3, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::service;

/// IPv4 header without options.
const IP_HLEN: usize = 20;
/// Where the L4 header starts in a packet without IP options.
const L4_OFF: usize = ETH_HLEN + IP_HLEN;
/// TCP header without options.
const TCP_HLEN: usize = 20;
/// An RST: Ethernet, IPv4 and a bare TCP header.
const RST_LEN: usize = L4_OFF + TCP_HLEN;
/// ICMP header (type, code, checksum, 4 unused bytes).
const ICMP_HLEN: usize = 8;
/// What an ICMP error quotes (RFC 792): the IP header and the first 8 bytes of its payload.
const QUOTE_LEN: usize = IP_HLEN + 8;
/// An ICMP port unreachable: Ethernet, IPv4, ICMP and the quote.
const UNREACH_LEN: usize = L4_OFF + ICMP_HLEN + QUOTE_LEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// Version 4, IHL 5.
const IPV4_NO_OPTIONS: u8 = 0x45;
const TTL: u8 = 64;

/// Rewrites `l3`, a packet from the pod to a Service port that cannot take it, into the
/// refusal its client expects (TCP RST; ICMP port unreachable for UDP and SCTP). False when
/// it gets none and is simply dropped: an RST (never answered, RFC 9293 3.10.7.1), another
/// protocol, IP options, or a helper that failed.
#[inline(always)]
pub fn answer(ctx: &TcContext, l3: &L3) -> bool {
    if l3.l4_off != L4_OFF {
        return false;
    }
    let done = match l3.protocol {
        proto::TCP if l3.tcp_flags & TCP_RST == 0 => reset(ctx, l3),
        proto::UDP | proto::SCTP => port_unreachable(ctx, l3),
        _ => Err(()),
    };
    done.is_ok()
}

/// Whether a packet `to_pod` sees with `GENERATED_REPLY_MARK` is exactly one of our
/// refusals to pod address `pod`: a TCP RST from a Service port, or an ICMP port
/// unreachable from a Service VIP quoting a UDP or SCTP packet this pod sent to that
/// Service port. A mark set by anyone else on the node thus opens nothing else.
#[inline(always)]
pub fn is_generated(ctx: &TcContext, l3: &L3, pod: [u8; 4]) -> bool {
    match l3.protocol {
        proto::TCP => l3.tcp_flags & TCP_RST != 0 && service::is_service_port(l3.saddr, u16::from_be_bytes(l3.sport), l3.protocol),
        proto::ICMP => {
            let Ok(m) = ctx.load::<[u8; ICMP_HLEN + QUOTE_LEN]>(l3.l4_off) else {
                return false;
            };
            // The quoted header at 8, its payload (the ports) at 28.
            let q = ICMP_HLEN;
            let protocol = m[q + 9];
            m[0] == ICMP_DEST_UNREACH
                && m[1] == ICMP_PORT_UNREACH
                && m[q] == IPV4_NO_OPTIONS
                && (protocol == proto::UDP || protocol == proto::SCTP)
                && m[q + 12..q + 16] == pod
                && m[q + 16..q + 20] == l3.saddr
                && service::is_service_port(l3.saddr, u16::from_be_bytes([m[q + 22], m[q + 23]]), protocol)
        }
        _ => false,
    }
}

/// The TCP RST a closed port answers a segment with (RFC 9293 3.10.7.1): with ACK set,
/// `seq` = its ack number and no ACK; else `seq` 0, RST|ACK, ack = its seq + its length (a
/// SYN and a FIN count one each). No options, no data.
#[inline(always)]
fn reset(ctx: &TcContext, l3: &L3) -> Result<(), ()> {
    // Ethernet, IPv4 and the TCP header up to its flags.
    let head: [u8; L4_OFF + 14] = ctx.load(0).map_err(|_| ())?;
    let t = L4_OFF;
    let flags = head[t + 13];
    let (seq, ack, reply_flags) = if flags & TCP_ACK != 0 {
        ([head[t + 8], head[t + 9], head[t + 10], head[t + 11]], [0; 4], TCP_RST)
    } else {
        let tot_len = usize::from(u16::from_be_bytes([head[ETH_HLEN + 2], head[ETH_HLEN + 3]]));
        let doff = usize::from(head[t + 12] >> 4) * 4;
        let data = tot_len.saturating_sub(IP_HLEN + doff) as u32;
        let syn_fin = u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        let seg_seq = u32::from_be_bytes([head[t + 4], head[t + 5], head[t + 6], head[t + 7]]);
        (
            [0; 4],
            seg_seq.wrapping_add(data).wrapping_add(syn_fin).to_be_bytes(),
            TCP_RST | TCP_ACK,
        )
    };
    let mut p = [0u8; RST_LEN];
    reply_l2_l3(&mut p, &head, (RST_LEN - ETH_HLEN) as u16, proto::TCP, l3);
    p[t..t + 2].copy_from_slice(&l3.dport);
    p[t + 2..t + 4].copy_from_slice(&l3.sport);
    p[t + 4..t + 8].copy_from_slice(&seq);
    p[t + 8..t + 12].copy_from_slice(&ack);
    p[t + 12] = (TCP_HLEN as u8 / 4) << 4;
    p[t + 13] = reply_flags;
    // Window, checksum, urgent pointer: 0 until the checksum below.
    let mut sum = sum16(&p[ETH_HLEN + 12..ETH_HLEN + 20], 0);
    sum += u32::from(proto::TCP) + TCP_HLEN as u32;
    let check = fold(sum16(&p[t..t + TCP_HLEN], sum));
    p[t + 16..t + 18].copy_from_slice(&check.to_be_bytes());
    write(ctx, &p)
}

/// ICMP destination unreachable, port unreachable (RFC 792, RFC 1122 3.2.2.1), quoting the
/// packet's IP header and first 8 bytes of UDP or SCTP (SCTP's ports and verification tag,
/// which the client's stack matches, RFC 9260 10).
#[inline(always)]
fn port_unreachable(ctx: &TcContext, l3: &L3) -> Result<(), ()> {
    let head: [u8; L4_OFF + 8] = ctx.load(0).map_err(|_| ())?;
    let mut p = [0u8; UNREACH_LEN];
    reply_l2_l3(&mut p, &head, (UNREACH_LEN - ETH_HLEN) as u16, proto::ICMP, l3);
    let icmp = L4_OFF;
    p[icmp] = ICMP_DEST_UNREACH;
    p[icmp + 1] = ICMP_PORT_UNREACH;
    p[icmp + ICMP_HLEN..].copy_from_slice(&head[ETH_HLEN..]);
    let check = fold(sum16(&p[icmp..], 0));
    p[icmp + 2..icmp + 4].copy_from_slice(&check.to_be_bytes());
    write(ctx, &p)
}

/// Ethernet (ends swapped) and a fresh IPv4 header from the Service port back to the client,
/// checksummed, into `p`.
#[inline(always)]
fn reply_l2_l3(p: &mut [u8], head: &[u8], ip_total: u16, protocol: u8, l3: &L3) {
    p[..6].copy_from_slice(&head[6..12]);
    p[6..12].copy_from_slice(&head[..6]);
    p[12..14].copy_from_slice(&head[12..14]);
    let ip = ETH_HLEN;
    p[ip] = IPV4_NO_OPTIONS;
    p[ip + 2..ip + 4].copy_from_slice(&ip_total.to_be_bytes());
    // Id 0 with Don't Fragment (RFC 6864 4.1: an atomic datagram's id is meaningless).
    p[ip + 6] = 0x40;
    p[ip + 8] = TTL;
    p[ip + 9] = protocol;
    p[ip + 12..ip + 16].copy_from_slice(&l3.daddr);
    p[ip + 16..ip + 20].copy_from_slice(&l3.saddr);
    let check = fold(sum16(&p[ip..ip + IP_HLEN], 0));
    p[ip + 10..ip + 12].copy_from_slice(&check.to_be_bytes());
}

/// Makes the packet exactly `p`: its length first (a slow-path helper meant for control
/// replies; it also linearizes and drops GSO state), then every byte.
#[inline(always)]
fn write<const N: usize>(ctx: &TcContext, p: &[u8; N]) -> Result<(), ()> {
    // SAFETY: the context's skb pointer is valid for the program's whole run; the helper
    // invalidates direct packet pointers, and none is used after it (stores go through
    // helpers).
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, N as u32, 0) } != 0 {
        return Err(());
    }
    // BPF_F_RECOMPUTE_CSUM keeps a CHECKSUM_COMPLETE skb's sum true to the new bytes.
    ctx.store(0, p, u64::from(BPF_F_RECOMPUTE_CSUM)).map_err(|_| ())
}

/// The ones' complement sum of `data` as 16-bit big-endian words (RFC 1071), added to
/// `acc`, not folded. `data` has an even, fixed length here, so the loop unrolls.
#[inline(always)]
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for w in data.chunks_exact(2) {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    acc
}

/// A sum from [`sum16`] folded to 16 bits and inverted: the checksum field's value.
#[inline(always)]
fn fold(acc: u32) -> u16 {
    let acc = (acc & 0xffff) + (acc >> 16);
    let acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}
