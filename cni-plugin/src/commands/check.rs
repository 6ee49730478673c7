//! CHECK: the attachment is as the chain's `prevResult` describes it, and as ADD left it.
//!
//! As in the reference plugins, `prevResult` is required: its interface (by name and sandbox)
//! must exist with the listed MAC and addresses, every listed route must be in the pod's main
//! table, the IPAM store must hold the address, the host veth must be up and paired with the
//! pod end, and the agent must be enforcing the endpoint.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde_json::Value;

use super::{call_agent, CommandError};
use crate::config::{ConfigError, Env, NetConf};
use crate::ipam::{Owner, Store};
use bulkhead_api::{EndpointRef, Request};
use bulkhead_hostnet::netlink::{self, with_handle};

/// What `prevResult` says about this plugin's attachment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    /// The pod interface's MAC, when listed.
    pub mac: Option<String>,
    /// IPv4 addresses of the pod interface.
    pub ips: Vec<(Ipv4Addr, u8)>,
    /// IPv4 routes: destination, prefix length, gateway.
    pub routes: Vec<(Ipv4Addr, u8, Option<Ipv4Addr>)>,
}

/// Reads the entries for interface `ifname` in sandbox `netns` out of a result of any version
/// from 0.4.0 on; the error says what is missing or malformed.
pub fn expected(prev: &Value, ifname: &str, netns: &str) -> Result<Expected, String> {
    let interfaces = prev.get("interfaces").and_then(Value::as_array).cloned().unwrap_or_default();
    let index = interfaces
        .iter()
        .position(|i| i.get("name").and_then(Value::as_str) == Some(ifname) && i.get("sandbox").and_then(Value::as_str) == Some(netns))
        .ok_or_else(|| format!("prevResult lists no interface {ifname} in sandbox {netns}"))?;
    let mac = interfaces[index].get("mac").and_then(Value::as_str).map(str::to_ascii_lowercase);
    let mut ips = Vec::new();
    for ip in prev.get("ips").and_then(Value::as_array).into_iter().flatten() {
        // An address without an interface index belongs to no interface in particular.
        let ours = ip.get("interface").and_then(Value::as_u64).is_none_or(|i| i == index as u64);
        let Some(address) = ip.get("address").and_then(Value::as_str) else {
            return Err(format!("prevResult ip {ip} has no address"));
        };
        if !ours || address.contains(':') {
            continue;
        }
        let net: Ipv4Network = address.parse().map_err(|e| format!("prevResult address {address:?}: {e}"))?;
        ips.push((net.ip(), net.prefix()));
    }
    if ips.is_empty() {
        return Err(format!("prevResult lists no ipv4 address for {ifname}"));
    }
    let mut routes = Vec::new();
    for route in prev.get("routes").and_then(Value::as_array).into_iter().flatten() {
        let Some(dst) = route.get("dst").and_then(Value::as_str) else {
            return Err(format!("prevResult route {route} has no dst"));
        };
        if dst.contains(':') {
            continue;
        }
        let net: Ipv4Network = dst.parse().map_err(|e| format!("prevResult route {dst:?}: {e}"))?;
        let gw = match route.get("gw").and_then(Value::as_str) {
            Some(g) => Some(g.parse::<Ipv4Addr>().map_err(|e| format!("prevResult gateway {g:?}: {e}"))?),
            None => None,
        };
        routes.push((net.network(), net.prefix(), gw));
    }
    Ok(Expected { mac, ips, routes })
}

/// Runs CHECK.
pub fn run(env: &Env, conf: &NetConf) -> Result<(), CommandError> {
    if !conf.cni_version.supports_check() {
        return Err(CommandError::VersionTooOld {
            command: "CHECK",
            version: conf.cni_version.as_str(),
        });
    }
    let pod_ns = env.netns.as_deref().ok_or(ConfigError::MissingEnv { var: "CNI_NETNS" })?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| ConfigError::Invalid {
        reason: "CHECK needs prevResult".into(),
        source: None,
    })?;
    let failed = |what: String| CommandError::CheckFailed { what };
    let label = pod_ns.display().to_string();
    let want = expected(prev, &env.ifname, &label).map_err(failed)?;

    let owner = Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let store = Store::open_without_pool(&conf.data_dir, &conf.name)?;
    let ip = store
        .find(&owner)?
        .ok_or_else(|| failed(format!("no address allocated to {}/{}", env.container_id, env.ifname)))?;
    if !want.ips.contains(&(ip, 32)) {
        return Err(failed(format!("prevResult does not list the allocated {ip}/32")));
    }

    if !pod_ns.exists() {
        return Err(failed(format!("netns {label} does not exist")));
    }
    let ifname = env.ifname.as_str();
    let netns_label = label.clone();
    let (link, addresses, routes) = with_handle(Some(pod_ns), |h| async move {
        let link = netlink::require_link(&h, ifname, &netns_label).await?;
        let addresses = netlink::ipv4_addresses(&h, link.index).await?;
        let routes = netlink::ipv4_routes(&h).await?;
        Ok((link, addresses, routes))
    })?;
    if let Some(mac) = &want.mac {
        let have = bulkhead_api::mac::to_text(link.mac);
        if &have != mac {
            return Err(failed(format!("{ifname} in {label} has mac {have}, prevResult says {mac}")));
        }
    }
    for (addr, prefix) in &want.ips {
        if !addresses.contains(&(*addr, *prefix)) {
            return Err(failed(format!("{ifname} in {label} lacks {addr}/{prefix}")));
        }
    }
    for (dst, prefix, gw) in &want.routes {
        let present = routes
            .iter()
            .any(|r| r.dst == *dst && r.prefix == *prefix && (gw.is_none() || r.gateway == *gw));
        if !present {
            let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
            return Err(failed(format!("route {dst}/{prefix}{via} is missing in {label}")));
        }
    }

    let host_ifname = netlink::host_veth_name(&env.container_id, &env.ifname);
    let host = host_ifname.as_str();
    let host_link = with_handle(None, |h| async move { netlink::link_by_name(&h, host).await })?;
    match host_link {
        Some(h) if !h.up => return Err(failed(format!("host veth {host_ifname} is down"))),
        Some(h) if h.peer_index != Some(link.index) || link.peer_index != Some(h.index) => {
            return Err(failed(format!("host veth {host_ifname} is not the peer of {ifname} in {label}")))
        }
        Some(_) => {}
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn result(version: &str) -> Value {
        json!({
            "cniVersion": version,
            "interfaces": [
                {"name": "bh0123456789a", "mac": "02:00:00:00:00:01"},
                {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/netns/p"},
            ],
            "ips": [{"address": "10.244.0.2/32", "gateway": "169.254.1.1", "interface": 1, "version": "4"}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
            "dns": {},
        })
    }

    #[test]
    fn reads_our_interface_addresses_and_routes() {
        let e = expected(&result("1.0.0"), "eth0", "/run/netns/p").unwrap();
        assert_eq!(e.mac.as_deref(), Some("02:00:00:00:00:02"));
        assert_eq!(e.ips, vec![(Ipv4Addr::new(10, 244, 0, 2), 32)]);
        assert_eq!(e.routes, vec![(Ipv4Addr::UNSPECIFIED, 0, Some(Ipv4Addr::new(169, 254, 1, 1)))]);
    }

    #[test]
    fn rejects_results_that_do_not_describe_us() {
        let r = result("0.4.0");
        assert!(expected(&r, "eth1", "/run/netns/p").unwrap_err().contains("no interface eth1"));
        assert!(expected(&r, "eth0", "/run/netns/q").is_err());
        let mut other_if = r.clone();
        other_if["ips"][0]["interface"] = json!(0);
        assert!(expected(&other_if, "eth0", "/run/netns/p").unwrap_err().contains("no ipv4 address"));
        let mut bad = r;
        bad["routes"][0]["dst"] = json!("nope");
        assert!(expected(&bad, "eth0", "/run/netns/p").is_err());
    }
}
