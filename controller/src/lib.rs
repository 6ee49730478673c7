//! The Bulkhead node agent, CLI and lab.

pub mod datapath;
pub mod maps;
pub mod policy;
