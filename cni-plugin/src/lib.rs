//! Bulkhead's CNI plugin, and the pieces the agent and lab share with it.

pub mod agent_api;
pub mod commands;
pub mod config;
pub mod ipam;
pub mod netlink;
pub mod netns;
pub mod spec;
