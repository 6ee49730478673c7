//! DEL: tell the agent, remove the veth, free the address.
//!
//! Absence is success at every step; a failing step does not stop the others, and every
//! failure is reported.

use super::{call_agent, CommandError};
use crate::config::{Env, NetConf};
use crate::ipam::{Owner, Store};
use bulkhead_api::{EndpointRef, Request};
use bulkhead_hostnet::netlink::{self, with_handle};

/// Runs DEL.
pub fn run(env: &Env, conf: &NetConf) -> Result<(), CommandError> {
    let mut errors = Vec::new();

    let endpoint = EndpointRef {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    match call_agent(
        &conf.agent_socket,
        &Request::DelEndpoint(endpoint),
        "del_endpoint",
        conf.agent_timeout,
    ) {
        Ok(()) => {}
        // The agent reconciles its endpoints against the host's veths when it comes back.
        Err(e @ CommandError::AgentUnreachable { .. }) => {
            tracing::warn!(error = %e.describe(), "agent unreachable; continuing")
        }
        Err(e) => errors.push(e),
    }

    // A netns that is gone (or only a leftover file) has nothing left to delete.
    // Deleting the pod end removes the pair, and with it the host routes and neighbours.
    if let Some(pod_ns) = env.netns.as_deref().filter(|p| bulkhead_hostnet::netns::is_netns_mount(p)) {
        let ifname = env.ifname.as_str();
        match with_handle(Some(pod_ns), |h| async move { netlink::delete_link(&h, ifname).await }) {
            Ok(deleted) => {
                tracing::info!(deleted, netns = %pod_ns.display(), "pod interface removed")
            }
            Err(e) => errors.push(e.into()),
        }
    }
    // Also by the host name: the netns may be gone, or its end moved elsewhere.
    let host_ifname = netlink::host_veth_name(&env.container_id, &env.ifname);
    let host = host_ifname.as_str();
    match with_handle(None, |h| async move { netlink::delete_link(&h, host).await }) {
        Ok(deleted) => tracing::info!(deleted, host = %host_ifname, "host veth removed"),
        Err(e) => errors.push(e.into()),
    }

    let owner = Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    match Store::open_without_pool(&conf.data_dir, &conf.name).and_then(|s| s.release(&owner)) {
        Ok(freed) => tracing::info!(?freed, "ipam: address released"),
        Err(e) => errors.push(e.into()),
    }

    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(CommandError::Multiple(errors)),
    }
}
