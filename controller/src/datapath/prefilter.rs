//! The uplink prefilter's lists (issue 13.4a): the deny list from the operator's file and the
//! never-drop list the agent derives from the node, written into the prefilter's two LPM
//! tries (`bh_pfdeny_v1`, `bh_pfkeep_v1`) as differences.
//!
//! What is matched: the IPv4 source address of untagged IPv4 frames received on the
//! prefilter's devices. A source in the deny list is dropped unless the never-drop list holds
//! it too (longest prefixes are not compared between the lists: any never-drop match wins), so
//! no deny entry, however narrow, drops this node's own addresses, its underlay subnets, the
//! cluster's pod range or this node's pod range. ARP, IPv6, VLAN-tagged frames and
//! destinations are never looked at.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{MapData, MapError};
use bulkhead_common::{map_names, Ipv4Key};
use ipnetwork::Ipv4Network;

/// Why a deny list was refused or the prefilter's maps could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PrefilterError {
    /// A line of the deny list is not an IPv4 address or CIDR.
    #[error("{path}:{line}: {text:?} is not an ipv4 address or cidr")]
    Invalid {
        /// The deny-list file.
        path: PathBuf,
        /// Line number, from 1.
        line: usize,
        /// The text at fault.
        text: String,
        /// Cause.
        #[source]
        source: ipnetwork::IpNetworkError,
    },
    /// A CIDR with bits set past its prefix: most likely a typo, so it is not guessed at.
    #[error("{path}:{line}: {text:?} has host bits set (the network is {network})")]
    HostBits {
        /// The deny-list file.
        path: PathBuf,
        /// Line number, from 1.
        line: usize,
        /// The text at fault.
        text: String,
        /// The network it would be.
        network: Ipv4Network,
    },
    /// The deny list could not be read.
    #[error("cannot read the prefilter deny list {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A map operation failed.
    #[error("{op} {map}")]
    Map {
        /// What was attempted.
        op: &'static str,
        /// The map.
        map: &'static str,
        /// Cause.
        #[source]
        source: Box<MapError>,
    },
}

/// Parses a deny list: one IPv4 address (taken as /32) or CIDR a line; `#` starts a comment;
/// blank lines are skipped. Any bad line refuses the whole list (the caller keeps the one it
/// has), naming the file and line.
pub fn parse_deny_list(path: &std::path::Path, text: &str) -> Result<BTreeSet<Ipv4Network>, PrefilterError> {
    let mut out = BTreeSet::new();
    for (i, raw) in text.lines().enumerate() {
        let entry = raw.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        let net: Ipv4Network = entry.parse().map_err(|source| PrefilterError::Invalid {
            path: path.to_path_buf(),
            line: i + 1,
            text: entry.to_string(),
            source,
        })?;
        let network = Ipv4Network::new(net.network(), net.prefix()).unwrap_or(net);
        if network.ip() != net.ip() {
            return Err(PrefilterError::HostBits {
                path: path.to_path_buf(),
                line: i + 1,
                text: entry.to_string(),
                network,
            });
        }
        out.insert(net);
    }
    Ok(out)
}

/// The never-drop list: each of this node's addresses and the subnet it sits on (its
/// underlay: the other nodes, the gateway), and the given ranges (the cluster's and this
/// node's pod CIDRs). Loopback addresses are left out (no uplink carries them).
pub fn keep_list(addresses: &[(Ipv4Addr, u8)], ranges: &[Ipv4Network]) -> BTreeSet<Ipv4Network> {
    let mut out: BTreeSet<Ipv4Network> = ranges.iter().copied().collect();
    for &(ip, prefix) in addresses {
        if ip.is_loopback() {
            continue;
        }
        if let Ok(host) = Ipv4Network::new(ip, 32) {
            out.insert(host);
        }
        if let Ok(net) = Ipv4Network::new(ip, prefix) {
            if let Ok(net) = Ipv4Network::new(net.network(), prefix) {
                out.insert(net);
            }
        }
    }
    out
}

/// The prefilter's two tries as the agent writes them.
pub struct PrefilterMaps {
    deny: LpmTrie<MapData, Ipv4Key, u32>,
    keep: LpmTrie<MapData, Ipv4Key, u32>,
}

impl PrefilterMaps {
    /// Wraps the tries taken from the loaded object.
    pub fn new(deny: LpmTrie<MapData, Ipv4Key, u32>, keep: LpmTrie<MapData, Ipv4Key, u32>) -> Self {
        PrefilterMaps { deny, keep }
    }

    /// Makes the deny trie hold exactly `want`: adds first, then removes, so a source in both
    /// the old and the new list is never let through in between.
    pub fn set_deny(&mut self, want: &BTreeSet<Ipv4Network>) -> Result<(), PrefilterError> {
        sync(&mut self.deny, want, map_names::PREFILTER_DENY)
    }

    /// Makes the never-drop trie hold exactly `want` (adds first, then removes).
    pub fn set_keep(&mut self, want: &BTreeSet<Ipv4Network>) -> Result<(), PrefilterError> {
        sync(&mut self.keep, want, map_names::PREFILTER_KEEP)
    }

    /// What the deny trie holds.
    pub fn deny(&self) -> Result<BTreeSet<Ipv4Network>, PrefilterError> {
        entries(&self.deny, map_names::PREFILTER_DENY)
    }
}

fn entries(trie: &LpmTrie<MapData, Ipv4Key, u32>, map: &'static str) -> Result<BTreeSet<Ipv4Network>, PrefilterError> {
    let mut out = BTreeSet::new();
    for key in trie.keys() {
        let key = key.map_err(|source| PrefilterError::Map {
            op: "iterate",
            map,
            source: Box::new(source),
        })?;
        let prefix = u8::try_from(key.prefix_len()).unwrap_or(32);
        if let Ok(net) = Ipv4Network::new(Ipv4Addr::from(key.data().addr), prefix) {
            out.insert(net);
        }
    }
    Ok(out)
}

fn sync(trie: &mut LpmTrie<MapData, Ipv4Key, u32>, want: &BTreeSet<Ipv4Network>, map: &'static str) -> Result<(), PrefilterError> {
    let have = entries(trie, map)?;
    let err = |op| {
        move |source| PrefilterError::Map {
            op,
            map,
            source: Box::new(source),
        }
    };
    let key = |n: &Ipv4Network| Key::new(u32::from(n.prefix()), Ipv4Key { addr: n.ip().octets() });
    for n in want.difference(&have) {
        trie.insert(&key(n), 0, 0).map_err(err("insert into"))?;
    }
    for n in have.difference(want) {
        match trie.remove(&key(n)) {
            Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            other => other.map_err(err("remove from"))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_deny_list_takes_addresses_cidrs_and_comments() {
        let list = parse_deny_list(Path::new("d"), "# bad actors\n203.0.113.0/24\n\n198.51.100.7  # one host\n").unwrap();
        let want: BTreeSet<Ipv4Network> = ["203.0.113.0/24", "198.51.100.7/32"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(list, want);
        assert!(parse_deny_list(Path::new("d"), "").unwrap().is_empty());
    }

    #[test]
    fn a_bad_line_refuses_the_whole_list_and_names_it() {
        let e = parse_deny_list(Path::new("/etc/deny"), "10.0.0.0/8\n10.0.0.300/32\n").unwrap_err();
        assert!(matches!(e, PrefilterError::Invalid { line: 2, .. }), "{e:?}");
        assert!(e.to_string().starts_with("/etc/deny:2: \"10.0.0.300/32\""), "{e}");
        let e = parse_deny_list(Path::new("d"), "2001:db8::/32\n").unwrap_err();
        assert!(matches!(e, PrefilterError::Invalid { line: 1, .. }), "{e:?}");
        let e = parse_deny_list(Path::new("d"), "10.1.2.3/8\n").unwrap_err();
        assert_eq!(e.to_string(), "d:1: \"10.1.2.3/8\" has host bits set (the network is 10.0.0.0/8)");
    }

    #[test]
    fn the_keep_list_holds_the_nodes_addresses_their_subnets_and_the_ranges() {
        let keep = keep_list(
            &[(Ipv4Addr::new(192, 168, 7, 9), 24), (Ipv4Addr::LOCALHOST, 8)],
            &["10.244.0.0/16".parse().unwrap()],
        );
        let want: BTreeSet<Ipv4Network> = ["192.168.7.9/32", "192.168.7.0/24", "10.244.0.0/16"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(keep, want);
    }
}
