//! The Bulkhead node agent, CLI and lab.
//!
//! The agent is a pipeline; each stage is a module and depends only on the stages before
//! it: [`source`] → [`model`] → [`policy`] → [`datapath`], with [`flows`] and [`metrics`]
//! reading what the datapath reports; [`routing`] makes other nodes' pod CIDRs reachable
//! (natively or over VXLAN); [`services`] turns the model's Services and EndpointSlices into
//! the service table the datapath translates ClusterIPs from. [`agent`] wires them together; [`cli`] and [`lab`]
//! talk to agents through their socket (`bulkhead_api`). ARCHITECTURE.md at the root of
//! the repository has the map.

pub mod advisor;
pub mod agent;
pub mod baseline;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod flows;
pub mod lab;
pub mod metrics;
pub mod model;
pub mod nat;
pub mod policy;
pub mod relay;
pub mod routing;
pub mod services;
pub mod source;

/// The error and its causes, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
