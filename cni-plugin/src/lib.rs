//! Bulkhead's CNI plugin, and the pieces the agent and lab share with it.

pub mod agent_api;
pub mod netns;
