//! ADD: allocate an address, wire a veth into the pod, register with the agent, open the host side.
//!
//! Every step registers its undo with a [`Rollback`]; any failure unwinds what was done.

use std::net::Ipv4Addr;
use std::path::Path;

use netlink_packet_route::route::RouteScope;

use super::{call_agent, CommandError, Rollback};
use crate::config::{ConfigError, Env, NetConf};
use crate::ipam::{Owner, Store};
use crate::spec::{AddResult, Interface, GATEWAY};
use bulkhead_api::{EndpointRef, EndpointSpec, Request};
use bulkhead_hostnet::netlink::{self, with_handle, LinkInfo, NetlinkError};

/// Both ends of a pod's veth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VethPair {
    /// The host side, in the node's namespace.
    pub host: LinkInfo,
    /// The pod side, in the pod's namespace.
    pub pod: LinkInfo,
    /// False when a previous ADD already made this pair.
    pub created: bool,
}

/// Runs ADD.
pub fn run(env: &Env, conf: &NetConf) -> Result<AddResult, CommandError> {
    let pod_ns = env.netns.as_deref().ok_or(ConfigError::MissingEnv { var: "CNI_NETNS" })?;
    let pod_namespace = env
        .pod_namespace
        .clone()
        .or_else(|| conf.default_namespace.clone())
        .ok_or(ConfigError::InvalidEnv {
            var: "CNI_ARGS",
            reason: "K8S_POD_NAMESPACE is missing and the config sets no defaultNamespace".into(),
        })?;
    let pod_name = env.pod_name_or_fallback();
    if !pod_ns.exists() {
        return Err(ConfigError::InvalidEnv {
            var: "CNI_NETNS",
            reason: format!("{} does not exist", pod_ns.display()),
        }
        .into());
    }
    let owner = Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let host_ifname = netlink::host_veth_name(&env.container_id, &env.ifname);
    let mut rollback = Rollback::default();

    let store = Store::open(&conf.data_dir, &conf.name, conf.pod_cidr()?)?;
    let allocation = store.allocate(&owner)?;
    let ip = allocation.ip;
    tracing::info!(%ip, container = %env.container_id, created = allocation.created, "ipam: address allocated");
    super::kill_point("ipam");
    if allocation.created {
        let (store, owner) = (store.clone(), owner.clone());
        rollback.push("ipam allocation", move || store.release(&owner).map(drop).map_err(Into::into));
    }

    let mtu = conf.pod_mtu();
    let pair = ensure_veth(&host_ifname, &env.ifname, pod_ns, mtu, &mut rollback)?;
    super::kill_point("veth");
    configure_pod(pod_ns, &pair, ip)?;
    super::kill_point("pod");

    let spec = EndpointSpec {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: pod_ns.display().to_string(),
        pod_namespace,
        pod_name,
        host_ifname: host_ifname.clone(),
        host_ifindex: pair.host.index,
        ipv4: ip,
        mac: pair.pod.mac,
        network: conf.name.clone(),
    };
    call_agent(&conf.agent_socket, &Request::AddEndpoint(spec), "add_endpoint", conf.agent_timeout)?;
    super::kill_point("agent");
    {
        let (socket, timeout) = (conf.agent_socket.clone(), conf.agent_timeout);
        let endpoint = EndpointRef {
            container_id: env.container_id.clone(),
            ifname: env.ifname.clone(),
        };
        rollback.push("agent endpoint", move || {
            call_agent(&socket, &Request::DelEndpoint(endpoint), "del_endpoint", timeout)
        });
    }

    // Only now that the agent has the endpoint (and its programs) in place does the host
    // side come up: no packet can pass un-enforced.
    configure_host(&pair, ip)?;
    super::kill_point("host");

    rollback.disarm();
    Ok(AddResult {
        host: Interface {
            name: pair.host.name.clone(),
            mac: pair.host.mac,
            sandbox: None,
            mtu,
        },
        pod: Interface {
            name: env.ifname.clone(),
            mac: pair.pod.mac,
            sandbox: Some(pod_ns.display().to_string()),
            mtu,
        },
        ip,
    })
}

/// Returns the pod's veth pair, creating it unless a previous ADD already did.
fn ensure_veth(
    host_ifname: &str,
    ifname: &str,
    pod_ns: &Path,
    mtu: Option<u32>,
    rollback: &mut Rollback,
) -> Result<VethPair, CommandError> {
    let pod_label = pod_ns.display().to_string();
    let host = with_handle(None, |h| async move { netlink::link_by_name(&h, host_ifname).await })?;
    let pod = with_handle(Some(pod_ns), |h| async move { netlink::link_by_name(&h, ifname).await })?;
    match (host, pod) {
        (Some(host), Some(pod)) if host.peer_index == Some(pod.index) && pod.peer_index == Some(host.index) => {
            tracing::info!(host = %host.name, "veth already exists; reusing it");
            return Ok(VethPair { host, pod, created: false });
        }
        (_, Some(_)) => {
            return Err(NetlinkError::LinkConflict {
                ifname: ifname.to_string(),
                netns: pod_label,
                host_ifname: host_ifname.to_string(),
            }
            .into());
        }
        (Some(stale), None) => {
            // Our name, but its peer is not in this pod: left over from an earlier sandbox.
            tracing::warn!(host = %stale.name, "removing stale host veth");
            with_handle(None, |h| async move { netlink::delete_link(&h, host_ifname).await })?;
        }
        (None, None) => {}
    }
    with_handle(
        None,
        |h| async move { netlink::create_veth(&h, host_ifname, ifname, pod_ns, mtu).await },
    )?;
    {
        // Deleting one end of a veth deletes both.
        let name = host_ifname.to_string();
        rollback.push("veth", move || {
            with_handle(None, |h| async move { netlink::delete_link(&h, &name).await.map(drop) }).map_err(Into::into)
        });
    }
    let host = with_handle(None, |h| async move { netlink::require_link(&h, host_ifname, "node").await })?;
    let pod = with_handle(Some(pod_ns), |h| async move { netlink::require_link(&h, ifname, &pod_label).await })?;
    tracing::info!(host = %host.name, pod_if = %pod.name, "veth created");
    Ok(VethPair { host, pod, created: true })
}

/// Inside the pod: the /32 address, links up, a link route to the gateway, the default route
/// through it, and a permanent neighbour so the pod never ARPs for the gateway.
fn configure_pod(pod_ns: &Path, pair: &VethPair, ip: Ipv4Addr) -> Result<(), CommandError> {
    let label = pod_ns.display().to_string();
    let (pod, host_mac) = (&pair.pod, pair.host.mac.as_bytes());
    with_handle(Some(pod_ns), |h| async move {
        // Before the link is up, so it never sends router solicitations or DAD probes.
        netlink::disable_ipv6(&pod.name)?;
        let lo = netlink::require_link(&h, "lo", &label).await?;
        netlink::set_up(&h, lo.index, "lo").await?;
        netlink::ensure_address(&h, pod.index, ip, 32).await?;
        // The kernel refuses routes through a link that is down.
        netlink::set_up(&h, pod.index, &pod.name).await?;
        netlink::ensure_route(&h, GATEWAY, 32, pod.index, None, RouteScope::Link).await?;
        netlink::ensure_route(&h, Ipv4Addr::UNSPECIFIED, 0, pod.index, Some(GATEWAY), RouteScope::Universe).await?;
        netlink::ensure_neighbour(&h, pod.index, GATEWAY, host_mac).await
    })?;
    Ok(())
}

/// In the node: host veth up (IPv6 off, no ARP learning, strict reverse path), the pod's /32
/// route and a permanent neighbour for the pod.
fn configure_host(pair: &VethPair, ip: Ipv4Addr) -> Result<(), CommandError> {
    let (host, pod_mac) = (&pair.host, pair.pod.mac.as_bytes());
    with_handle(None, |h| async move {
        // Bulkhead is IPv4 only: without this the host end sends router solicitations and
        // MLD reports into the pod, which the datapath counts as unsupported_ethertype drops.
        netlink::disable_ipv6(&host.name)?;
        netlink::harden_host_veth(&host.name)?;
        netlink::set_up(&h, host.index, &host.name).await?;
        netlink::ensure_route(&h, ip, 32, host.index, None, RouteScope::Link).await?;
        netlink::ensure_neighbour(&h, host.index, ip, pod_mac).await
    })?;
    Ok(())
}
