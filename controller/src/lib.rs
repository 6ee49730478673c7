//! The Bulkhead node agent, CLI and lab.

pub mod agent;
pub mod config;
pub mod datapath;
pub mod explain;
pub mod flows;
pub mod identity;
pub mod install;
pub mod kube_source;
pub mod lab;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod observe;
pub mod policy;
pub mod selector;
pub mod source;
