//! NetworkPolicy to datapath entries: identities ([`identity`]), the compiler
//! ([`compile`]: cluster model and local endpoints → exactly what the maps must hold) and
//! an evaluator written straight from the NetworkPolicy spec ([`evaluate`]), which
//! `explain` and flow naming use and against which the compiler is tested.

pub mod compile;
pub mod evaluate;
pub mod explain;
pub mod identity;
pub mod incremental;
#[cfg(test)]
mod incremental_tests;
#[cfg(test)]
mod lookup;
#[cfg(test)]
mod tests;

use std::net::Ipv4Addr;

pub use compile::{port_prefixes, Compiler, OverCap, MAX_ENTRIES_PER_POLICY};
pub use evaluate::{evaluate, isolating_policies, isolation, Decision, Isolation, Verdict};
pub use identity::{Direction, RuleRef, RuleTable};

/// A pod with a veth on this node, as the endpoint manager knows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalEndpoint {
    /// Agent-assigned endpoint id.
    pub endpoint_id: u32,
    /// Ifindex of the host-side veth.
    pub host_ifindex: u32,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod IPv4 address (authoritative for local pods: the CNI plugin assigned it).
    pub ipv4: Ipv4Addr,
    /// Pod-side MAC address.
    pub mac: [u8; 6],
}
