//! IPv4 fragments follow their datagram's first fragment (Cilium's `ipv4_frag_id` map is the
//! model): a first fragment that is admitted records its {source, destination, IP id,
//! protocol} and any Service translation it got; a later fragment, which carries no ports,
//! passes only on such a record, younger than `FRAG_LIFETIME_NS`, and gets the same address
//! rewrite. A first fragment that is refused or dropped removes the record, so a later
//! fragment never passes on the verdict of another datagram that reused the IP id.
//!
//! Out of order: a later fragment seen before its first fragment drops (there is nothing to
//! follow yet), as in Cilium; the sender's datagram is lost, never let through unchecked.
//! Overlapping fragments need no check here: every fragment at offset 0 (the only place the
//! ports can be) meets conntrack and policy itself, and Linux discards an IPv4 datagram
//! whose fragments overlap (`ip_frag_queue`, since 4.19), so a later fragment cannot change
//! the ports of what is delivered. Per packet: none for whole packets, one insert or remove
//! per first fragment, one lookup per later fragment.

use aya_ebpf::{macros::map, maps::LruHashMap, programs::TcContext};
use bulkhead_common::{capacity, frag_flags, DropReason, FragEntry, FragKey, FRAG_LIFETIME_NS};

use crate::packet::L3;
use crate::service::{self, End};

// Map names must equal bulkhead_common::map_names (the agent looks them up by those).
#[map(name = "bh_frag_v1")]
static FRAGMENTS: LruHashMap<FragKey, FragEntry> = LruHashMap::pinned(capacity::FRAGMENTS, 0);

/// The record key of the datagram `l3` is a fragment of, as it arrived (before translation),
/// at an endpoint's `dir`.
#[inline(always)]
pub fn key(l3: &L3, dir: u8) -> FragKey {
    FragKey {
        saddr: l3.saddr,
        daddr: l3.daddr,
        id: l3.ip_id,
        protocol: l3.protocol,
        direction: dir,
    }
}

/// A first fragment's outcome: admitted (`nat`: the address its translation wrote at
/// `end`), it is recorded for the later fragments; otherwise any record is removed.
#[inline(always)]
pub fn settle(key: &FragKey, admitted: bool, nat: Option<[u8; 4]>, now: u64) {
    if admitted {
        let entry = FragEntry {
            first_ns: now,
            nat_addr: nat.unwrap_or([0; 4]),
            flags: if nat.is_some() { frag_flags::NAT } else { 0 },
        };
        // An LRU insert only fails without memory; the later fragments then drop (fail closed).
        let _ = FRAGMENTS.insert(key, entry, 0);
    } else {
        // Absent is the usual case.
        let _ = FRAGMENTS.remove(key);
    }
}

/// A later fragment (`l3`, at an endpoint's `dir`) passes when its first fragment was
/// admitted, and gets that fragment's translated address at `end`.
#[inline(always)]
pub fn follow(ctx: &TcContext, l3: &L3, dir: u8, end: End, now: u64) -> Result<(), DropReason> {
    // SAFETY: copied out at once; a concurrent update gives the old or the new entry.
    let entry = unsafe { FRAGMENTS.get(key(l3, dir)) }.copied().ok_or(DropReason::Fragment)?;
    if now.saturating_sub(entry.first_ns) > FRAG_LIFETIME_NS {
        return Err(DropReason::Fragment);
    }
    if entry.flags & frag_flags::NAT != 0 {
        service::rewrite_address(ctx, l3, end, entry.nat_addr)?;
    }
    Ok(())
}
