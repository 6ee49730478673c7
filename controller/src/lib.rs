//! The Bulkhead node agent, CLI and lab.

pub mod lab;
pub mod netlink;
