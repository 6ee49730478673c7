//! The lab's outside host: a namespace on the underlay, outside the cluster CIDR, with no
//! route to any pod CIDR, so pods reach it only as a cluster reaches the internet — through
//! their node, masqueraded.

use std::net::Ipv4Addr;

use bulkhead_hostnet::netlink;
use bulkhead_hostnet::netns;
use ipnetwork::Ipv4Network;

use netlink_packet_route::route::RouteScope;

use super::node::{in_netns, link_up, UNDERLAY_BRIDGE, UNDERLAY_IFNAME};
use super::serve::{self, Ports};
use super::state::{LabPaths, LabState, WorldState};
use super::LabError;

/// The outside host's name in `exec`, `probe --to` and its server's replies.
pub const WORLD: &str = "world";
/// Ports with TCP and UDP echo.
const ECHO_PORTS: [u16; 2] = [80, 81];
/// The TCP port that answers with the address the connection came from.
const PEER_PORT: u16 = 8080;
/// Host number of the outside host on the underlay /24 (nodes count up from 1, at most 200).
const WORLD_HOST: u32 = 254;
/// Its underlay bridge port, in the underlay namespace.
const BRIDGE_PORT: &str = "ul-world";
/// Its interface.
const IFNAME: &str = "eth0";
/// Where the outside host's other address may live: the documentation ranges (RFC 5737),
/// never routed on the internet, each in another /16 than the underlay and the cluster.
const OTHER_RANGES: [[u8; 3]; 3] = [[203, 0, 113], [198, 51, 100], [192, 0, 2]];
/// Host number of the outside host's other address in its /24.
const OTHER_HOST: u8 = 7;

/// The outside host's other address: in the first documentation /24 that overlaps no host
/// route, so a packet to it can only mean the lab's outside host. `None` when all overlap.
pub fn pick_other_ip(routes: &[Ipv4Network]) -> Option<Ipv4Addr> {
    OTHER_RANGES
        .iter()
        .filter_map(|[a, b, c]| Ipv4Network::new(Ipv4Addr::new(*a, *b, *c, 0), 24).ok())
        .find(|n| !routes.iter().any(|r| r.overlaps(*n)))
        .map(|n| {
            let [a, b, c, _] = n.network().octets();
            Ipv4Addr::new(a, b, c, OTHER_HOST)
        })
}

/// The first 10.255.N.0/24 that overlaps neither the cluster CIDR nor any host route: the
/// underlay, where nodes and the outside host live.
///
/// The cluster CIDR is one of 10.244.0.0/16 to 10.254.0.0/16, so 10.255.0.0/16 never holds
/// a pod; skipping the host's routes keeps a leaked packet from meaning anything outside.
pub fn pick_underlay(cluster: Ipv4Network, routes: &[Ipv4Network]) -> Result<Ipv4Network, LabError> {
    (0..=255u8)
        .filter_map(|n| Ipv4Network::new(Ipv4Addr::new(10, 255, n, 0), 24).ok())
        .find(|c| !c.overlaps(cluster) && !routes.iter().any(|r| r.overlaps(*c)))
        .ok_or(LabError::NoFreeUnderlay)
}

/// The address of node `i` on the underlay.
pub fn node_ip(underlay: Ipv4Network, i: usize) -> Option<Ipv4Addr> {
    underlay.nth(u32::try_from(i).ok()?.checked_add(1)?)
}

/// What the outside host of lab `id` will be, before anything is made.
pub fn plan(id: &str, underlay: Ipv4Network, other: Option<Ipv4Addr>) -> WorldState {
    WorldState {
        netns: format!("bh{id}-{WORLD}"),
        ip: underlay.nth(WORLD_HOST).map(|ip| ip.to_string()).unwrap_or_default(),
        echo_ports: ECHO_PORTS.to_vec(),
        peer_ports: vec![PEER_PORT],
        server_pid: None,
        other_ips: other.into_iter().map(|ip| ip.to_string()).collect(),
    }
}

/// The file where the outside host's server keeps the bytes it received.
pub fn received_file(paths: &LabPaths) -> std::path::PathBuf {
    paths.dir.join("world-received.json")
}

/// Creates the outside host on the underlay and starts its server; saves its pid.
///
/// Its only route is the underlay's connected /24: replies to a pod address have nowhere to
/// go, as on the internet, until the node masquerades.
pub fn setup(paths: &LabPaths, state: &mut LabState, underlay: Ipv4Network) -> Result<(), LabError> {
    let (Some(world), Some(ul)) = (state.world.clone(), state.underlay_netns.clone()) else {
        return Ok(());
    };
    let ip = underlay.nth(WORLD_HOST).ok_or(LabError::NoFreeUnderlay)?;
    let netns_name = world.netns.as_str();
    netns::create_named(netns_name).map_err(|source| LabError::Netns {
        netns: netns_name.to_string(),
        source,
    })?;
    let world_path = netns::named_path(netns_name);
    let ul = ul.as_str();
    in_netns(ul, |h| async move {
        let bridge = netlink::require_link(&h, UNDERLAY_BRIDGE, ul).await?;
        // A port left from an earlier attempt has lost its peer; recreate the pair.
        netlink::delete_link(&h, BRIDGE_PORT).await?;
        netlink::create_veth(&h, BRIDGE_PORT, IFNAME, &world_path, None).await?;
        let port = netlink::require_link(&h, BRIDGE_PORT, ul).await?;
        netlink::ensure_bridge_port(&h, port.index, BRIDGE_PORT, bridge.index).await?;
        netlink::set_up(&h, port.index, BRIDGE_PORT).await
    })?;
    in_netns(netns_name, |h| async move {
        link_up(&h, "lo", netns_name).await?;
        let link = netlink::require_link(&h, IFNAME, netns_name).await?;
        netlink::ensure_address(&h, link.index, ip, underlay.prefix()).await?;
        netlink::set_up(&h, link.index, IFNAME).await
    })?;
    let others: Vec<Ipv4Addr> = world.other_ips.iter().filter_map(|s| s.parse().ok()).collect();
    if !others.is_empty() {
        let others = others.as_slice();
        in_netns(netns_name, |h| async move {
            let lo = netlink::require_link(&h, "lo", netns_name).await?;
            for other in others {
                netlink::ensure_address(&h, lo.index, *other, 32).await?;
            }
            Ok(())
        })?;
        // Each machine's route to that part of the internet: through the outside host, its
        // gateway. Machine configuration, as a cloud's route table; the agents still own
        // every pod route and the masquerade.
        for node in &state.nodes {
            let netns_node = node.netns.as_str();
            in_netns(netns_node, |h| async move {
                let link = netlink::require_link(&h, UNDERLAY_IFNAME, netns_node).await?;
                for other in others {
                    let [a, b, c, _] = other.octets();
                    netlink::ensure_route(&h, Ipv4Addr::new(a, b, c, 0), 24, link.index, Some(ip), RouteScope::Universe).await?;
                }
                Ok(())
            })?;
        }
    }
    let ports = Ports {
        tcp_echo: world.echo_ports.clone(),
        tcp_peer: world.peer_ports.clone(),
        udp: world.echo_ports.clone(),
        count_file: Some(received_file(paths)),
        ..Ports::default()
    };
    let pid = serve::spawn(paths, netns_name, WORLD, &ports, &paths.world_log())?;
    if let Some(w) = state.world.as_mut() {
        w.server_pid = Some(pid);
    }
    paths.save(state)
}

/// `lab world -o json`.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct WorldView {
    ip: String,
    other_ips: Vec<String>,
    ports: Vec<u16>,
    received: Vec<serve::Received>,
}

/// `bulkhead lab world`: the outside host's addresses, ports and the bytes it received.
pub fn print(paths: &LabPaths, state: &LabState, output: super::Output) -> Result<i32, LabError> {
    let world = state.world.as_ref().ok_or_else(|| LabError::UnknownPod {
        pod: format!("{WORLD} (this lab has no outside host)"),
    })?;
    let view = WorldView {
        ip: world.ip.clone(),
        other_ips: world.other_ips.clone(),
        ports: world.ports(),
        received: serve::read_received(&received_file(paths)).received,
    };
    match output {
        super::Output::Json => println!("{}", serde_json::to_string_pretty(&view).unwrap_or_default()),
        super::Output::Table => {
            let ports: Vec<String> = view.ports.iter().map(u16::to_string).collect();
            println!(
                "outside host {WORLD}: {} (other addresses: {}), ports {}",
                view.ip,
                if view.other_ips.is_empty() {
                    "none".to_string()
                } else {
                    view.other_ips.join(", ")
                },
                ports.join(", ")
            );
            println!("{:<24} {:<16} {:>12} {:>11}", "ADDRESS", "FROM", "BYTES", "CONNECTIONS");
            for r in &view.received {
                println!("{:<24} {:<16} {:>12} {:>11}", r.address, r.from, r.bytes, r.connections);
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn underlay_is_outside_the_cluster_and_host_routes() {
        let r = |s: &str| s.parse::<Ipv4Network>().unwrap();
        let cluster = r("10.244.0.0/16");
        assert_eq!(pick_underlay(cluster, &[]).unwrap(), r("10.255.0.0/24"));
        assert_eq!(pick_underlay(cluster, &[r("10.255.0.0/23")]).unwrap(), r("10.255.2.0/24"));
        assert!(pick_underlay(cluster, &[r("10.0.0.0/8")]).is_err());
        let u = r("10.255.0.0/24");
        assert_eq!(node_ip(u, 0), Some(Ipv4Addr::new(10, 255, 0, 1)));
        assert_eq!(node_ip(u, 199), Some(Ipv4Addr::new(10, 255, 0, 200)));
        let w = plan("ab12", u, pick_other_ip(&[]));
        assert_eq!(w.other_ips, vec!["203.0.113.7".to_string()]);
        assert_eq!(pick_other_ip(&[r("203.0.113.0/24")]), Some(Ipv4Addr::new(198, 51, 100, 7)));
        assert_eq!(pick_other_ip(&[r("192.0.0.0/2"), r("198.0.0.0/8")]), None);
        assert_eq!(w.netns, "bhab12-world");
        assert_eq!(w.ip, "10.255.0.254");
        assert!(!cluster.contains(Ipv4Addr::new(10, 255, 0, 254)));
        assert_eq!(w.ports(), vec![80, 81, 8080]);
    }
}
