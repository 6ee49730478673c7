//! `bulkhead-cni`: the CNI spec's verbs, the plugin's configuration and its IPAM. The
//! library half lets the agent's `install-cni` validate a conflist with the same parser.

pub mod commands;
pub mod config;
pub mod ipam;
pub mod spec;
