//! A user-space model of the datapath's lookups over a compiled [`DatapathState`], for
//! the compiler's table-driven unit tests. It is not the datapath (it has no HOST rule,
//! for one): `controller/tests/policy_property.rs` checks the compiler against the real
//! programs.

use std::net::Ipv4Addr;

use bulkhead_common::{direction, endpoint_flags, identity, verdict, PolicyKey, PolicyValue, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL};
use ipnetwork::Ipv4Network;

use crate::datapath::state::DatapathState;

/// The identity the datapath's ipcache gives `ip`: longest prefix, else [`identity::WORLD`].
pub fn ipcache_lookup(state: &DatapathState, ip: Ipv4Addr) -> u32 {
    (0..=32u8)
        .rev()
        .find_map(|len| {
            let net = Ipv4Network::new(ip, len).ok()?;
            state.ipcache.get(&(net.network(), len)).map(|v| v.identity)
        })
        .unwrap_or(identity::WORLD)
}

fn key_bytes(k: &PolicyKey) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&k.endpoint_id);
    b[4..8].copy_from_slice(&k.remote_identity);
    b[8] = k.direction;
    b[9] = k.protocol;
    b[10..12].copy_from_slice(&k.dport);
    b
}

fn key_from_bytes(b: [u8; 12]) -> PolicyKey {
    PolicyKey {
        endpoint_id: [b[0], b[1], b[2], b[3]],
        remote_identity: [b[4], b[5], b[6], b[7]],
        direction: b[8],
        protocol: b[9],
        dport: [b[10], b[11]],
    }
}

/// `key` with every bit past the first `prefix` bits cleared, as an LPM trie compares it.
fn masked(key: &PolicyKey, prefix: u32) -> PolicyKey {
    let mut b = key_bytes(key);
    for (i, byte) in b.iter_mut().enumerate() {
        let start = u32::try_from(i).unwrap_or(u32::MAX).saturating_mul(8);
        if start >= prefix {
            *byte = 0;
        } else if prefix - start < 8 {
            *byte &= 0xffu8 << (8 - (prefix - start));
        }
    }
    key_from_bytes(b)
}

/// What the datapath decides for one flow at one endpoint: `None` drops it, `Some` allows it
/// naming the rule (0 when the endpoint is not isolated in that direction, or when an
/// audit-mode direction lets through what no rule allows).
pub fn lookup(state: &DatapathState, ifindex: u32, dir: u8, remote_ip: Ipv4Addr, protocol: u8, port: u16) -> Option<PolicyValue> {
    lookup_verdict(state, ifindex, dir, remote_ip, protocol, port).map(|(_, v)| v)
}

/// As [`lookup`], with the flow verdict the datapath reports: `None` drops it, else
/// ([`verdict::FORWARDED`] or [`verdict::AUDIT`], the matching entry or a default one).
///
/// Mirrors the programs: endpoint by ifindex, isolation and audit flags, ipcache longest
/// prefix, then a policy LPM lookup with the exact remote identity and, failing that, with
/// `ANY`; a miss drops on an isolated direction and is audited on an audit-only one.
pub fn lookup_verdict(
    state: &DatapathState,
    ifindex: u32,
    dir: u8,
    remote_ip: Ipv4Addr,
    protocol: u8,
    port: u16,
) -> Option<(u8, PolicyValue)> {
    let ep = state.endpoints.get(&ifindex)?;
    let (isolated, audit) = if dir == direction::INGRESS {
        (endpoint_flags::ISOLATED_INGRESS, endpoint_flags::AUDIT_INGRESS)
    } else {
        (endpoint_flags::ISOLATED_EGRESS, endpoint_flags::AUDIT_EGRESS)
    };
    if ep.flags & (isolated | audit) == 0 {
        return Some((verdict::FORWARDED, PolicyValue::default()));
    }
    let remote = ipcache_lookup(state, remote_ip);
    let found = [remote, identity::ANY].into_iter().find_map(|r| {
        let key = PolicyKey::new(ep.endpoint_id, r, dir, protocol, port);
        (POLICY_PREFIX_ANY_PROTO..=POLICY_PREFIX_FULL)
            .rev()
            .find_map(|prefix| state.policy.get(&(masked(&key, prefix), prefix)).copied())
    });
    match found {
        Some(v) => Some((verdict::FORWARDED, v)),
        None if ep.flags & isolated == 0 => Some((verdict::AUDIT, PolicyValue::default())),
        None => None,
    }
}
