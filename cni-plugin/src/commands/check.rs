//! CHECK: the allocation, both veth ends and the agent's endpoint are as ADD left them.

use super::{call_agent, CommandError};
use crate::agent_api::{EndpointRef, Request};
use crate::config::{ConfigError, Env, NetConf};
use crate::ipam::{Owner, Store};
use crate::netlink::{self, with_handle};

/// Runs CHECK.
pub fn run(env: &Env, conf: &NetConf) -> Result<(), CommandError> {
    if !conf.cni_version.supports_check() {
        return Err(CommandError::VersionTooOld {
            command: "CHECK",
            version: conf.cni_version.as_str(),
        });
    }
    let pod_ns = env.netns.as_deref().ok_or(ConfigError::MissingEnv { var: "CNI_NETNS" })?;
    let failed = |what: String| CommandError::CheckFailed { what };
    let owner = Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let store = Store::open(&conf.data_dir, &conf.name, conf.subnet)?;
    let ip = store
        .find(&owner)?
        .ok_or_else(|| failed(format!("no address allocated to {}/{}", env.container_id, env.ifname)))?;

    if let Some(prev) = &conf.prev_result {
        let want = format!("{ip}/32");
        let listed = prev
            .get("ips")
            .and_then(|v| v.as_array())
            .is_some_and(|ips| ips.iter().any(|i| i.get("address").and_then(|a| a.as_str()) == Some(want.as_str())));
        if !listed {
            return Err(failed(format!("prevResult does not list {want}")));
        }
    }

    if !pod_ns.exists() {
        return Err(failed(format!("netns {} does not exist", pod_ns.display())));
    }
    let label = pod_ns.display().to_string();
    let ifname = env.ifname.as_str();
    let addresses = with_handle(Some(pod_ns), |h| async move {
        let link = netlink::require_link(&h, ifname, &label).await?;
        netlink::ipv4_addresses(&h, link.index).await
    })?;
    if !addresses.contains(&(ip, 32)) {
        return Err(failed(format!("{ifname} in {} lacks {ip}/32", pod_ns.display())));
    }

    let host_ifname = netlink::host_veth_name(&env.container_id, &env.ifname);
    let host = host_ifname.as_str();
    let host_link = with_handle(None, |h| async move { netlink::link_by_name(&h, host).await })?;
    match host_link {
        Some(link) if link.up => {}
        Some(_) => return Err(failed(format!("host veth {host_ifname} is down"))),
        None => return Err(failed(format!("host veth {host_ifname} is missing"))),
    }

    let endpoint = EndpointRef {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    call_agent(
        &conf.agent_socket,
        &Request::CheckEndpoint(endpoint),
        "check_endpoint",
        conf.agent_timeout,
    )
}
