//! Host networking shared by the CNI plugin, the agent and the lab: network namespaces,
//! netlink (links, addresses, routes, neighbours) and atomic file writes.

pub mod fs;
pub mod netlink;
pub mod netns;
