//! The Bulkhead node agent, CLI and lab.
pub mod identity;
pub mod model;
pub mod policy;
pub mod selector;
