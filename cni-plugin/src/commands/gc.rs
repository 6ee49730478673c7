//! GC (spec 1.1): free everything held by attachments not in `cni.dev/valid-attachments`.
//!
//! Like DEL, GC keeps going after a failed step and reports every failure; an unreachable
//! agent is not one, because the agent drops endpoints whose host veth is gone when it
//! comes back.

use std::collections::BTreeSet;

use super::{call_agent, CommandError};
use crate::config::{ConfigError, NetConf};
use crate::ipam::{Owner, Store};
use crate::spec::CniVersion;
use bulkhead_api::{EndpointRef, Request};
use bulkhead_hostnet::netlink::{self, with_handle};

/// Runs GC.
pub fn run(conf: &NetConf) -> Result<(), CommandError> {
    if conf.cni_version < CniVersion::V1_1_0 {
        return Err(CommandError::VersionTooOld {
            command: "GC",
            version: conf.cni_version.as_str(),
        });
    }
    let valid: BTreeSet<EndpointRef> = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| ConfigError::Invalid {
            reason: "GC needs cni.dev/valid-attachments".into(),
            source: None,
        })?
        .iter()
        .map(|a| EndpointRef {
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
        })
        .collect();
    let mut errors = Vec::new();

    // The agent first: it stops enforcing for the stale endpoints before their veths go.
    match call_agent(
        &conf.agent_socket,
        &Request::Gc {
            network: conf.name.clone(),
            valid: valid.iter().cloned().collect(),
        },
        "gc",
        conf.agent_timeout,
    ) {
        Ok(()) => {}
        Err(e @ CommandError::AgentUnreachable { .. }) => {
            tracing::warn!(error = %e.describe(), "agent unreachable; it reconciles when it comes back")
        }
        Err(e) => errors.push(e),
    }

    let store = Store::open_without_pool(&conf.data_dir, &conf.name)?;
    let stale: Vec<Owner> = store
        .allocations()?
        .into_iter()
        .map(|(_, owner)| owner)
        .filter(|o| {
            !valid.contains(&EndpointRef {
                container_id: o.container_id.clone(),
                ifname: o.ifname.clone(),
            })
        })
        .collect();
    for owner in &stale {
        // The pod end goes with the host end; a pod netns that is already gone took both.
        let host = netlink::host_veth_name(&owner.container_id, &owner.ifname);
        match with_handle(None, |h| async move { netlink::delete_link(&h, &host).await }) {
            Ok(deleted) => tracing::info!(deleted, container = %owner.container_id, "gc: host veth removed"),
            Err(e) => {
                // Keep the address while its veth may still carry it.
                errors.push(e.into());
                continue;
            }
        }
        match store.release(owner) {
            Ok(freed) => tracing::info!(?freed, container = %owner.container_id, "gc: address released"),
            Err(e) => errors.push(e.into()),
        }
    }

    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(CommandError::Multiple(errors)),
    }
}
