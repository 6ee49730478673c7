//! rtnetlink operations, each idempotent and named for its effect.
//!
//! A netlink socket is bound to the namespace it is created in, so [`with_handle`] opens the
//! connection on the thread that [`netns::run_in`] moved into the target namespace, and
//! drives it with a current-thread tokio runtime that lives and dies with that thread.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
/// A 6-byte MAC address, re-exported for callers of the VXLAN and FDB functions.
pub use macaddr::MacAddr6;
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteProtocol, RouteScope};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

use crate::netns::{self, NetnsError};

mod overlay;
mod xdp;
pub use overlay::*;
pub use xdp::*;

/// `ENODEV`, what the kernel answers for an unknown link.
const ENODEV: i32 = 19;
/// `ESRCH`/`ENOENT`: an absent route or neighbour.
const ESRCH: i32 = 3;
const ENOENT: i32 = 2;
/// `EEXIST`: a link created meanwhile by someone else.
const EEXIST: i32 = 17;
/// `EADDRNOTAVAIL`: an absent address.
const EADDRNOTAVAIL: i32 = 99;

/// Why a netlink operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The namespace could not be entered.
    #[error("cannot enter network namespace")]
    Netns(#[from] NetnsError),
    /// The runtime or the netlink socket could not be set up.
    #[error("cannot open a netlink connection in {netns}")]
    Connection {
        /// Namespace, or `node` for the plugin's own.
        netns: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("netlink {op} {target} failed")]
    Request {
        /// The operation.
        op: &'static str,
        /// The link, address or route it acted on.
        target: String,
        /// Cause.
        #[source]
        source: rtnetlink::Error,
    },
    /// A link we need is missing.
    #[error("link {ifname} not found in {netns}")]
    LinkNotFound {
        /// Interface name.
        ifname: String,
        /// Namespace, or `node`.
        netns: String,
    },
    /// A name is taken by a link that is not ours.
    #[error("link {ifname} in {netns} exists and is not the peer of {host_ifname}")]
    LinkConflict {
        /// The pod-side name.
        ifname: String,
        /// Namespace.
        netns: String,
        /// Our host-side veth.
        host_ifname: String,
    },
    /// A name we need is taken by a link of another kind.
    #[error("link {ifname} in {netns} exists and is not a {kind} device")]
    WrongKind {
        /// Interface name.
        ifname: String,
        /// Namespace, or `node`.
        netns: String,
        /// The kind we need.
        kind: &'static str,
    },
    /// A sysctl write failed.
    #[error("cannot write sysctl {path}")]
    Sysctl {
        /// The `/proc/sys` path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl NetlinkError {
    fn request(op: &'static str, target: impl ToString) -> impl FnOnce(rtnetlink::Error) -> Self {
        let target = target.to_string();
        move |source| Self::Request { op, target, source }
    }
}

/// The errno of a netlink error answer, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// Runs `f` with an rtnetlink handle bound to `netns` (`None`: the caller's own namespace).
pub fn with_handle<T, F, Fut>(netns: Option<&Path>, f: F) -> Result<T, NetlinkError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    let label = netns.map_or_else(|| "node".to_string(), |p| p.display().to_string());
    let work = move || -> Result<T, NetlinkError> {
        let conn_err = |source| NetlinkError::Connection {
            netns: label.clone(),
            source,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(conn_err)?;
        runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection().map_err(conn_err)?;
            let task = tokio::spawn(connection);
            let out = f(handle).await;
            task.abort();
            out
        })
    };
    match netns {
        Some(path) => netns::run_in(path, work)?,
        // A thread of our own even here: the caller may be inside a tokio runtime, where
        // starting another one on the same thread panics.
        None => std::thread::scope(|scope| scope.spawn(work).join()).map_err(|_| NetlinkError::Connection {
            netns: "node".into(),
            source: std::io::Error::other("netlink worker thread panicked"),
        })?,
    }
}

/// What we need to know about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// Ifindex in its namespace.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MAC (nil when the link has no 6-byte hardware address).
    pub mac: MacAddr6,
    /// `IFLA_LINK`: for a veth, the peer's ifindex (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// Administratively up.
    pub up: bool,
}

impl LinkInfo {
    fn from_message(m: &LinkMessage) -> Self {
        let mut info = Self {
            index: m.header.index,
            name: String::new(),
            mac: MacAddr6::nil(),
            peer_index: None,
            up: m.header.flags.contains(LinkFlags::Up),
        };
        for attr in &m.attributes {
            match attr {
                LinkAttribute::IfName(n) => info.name = n.clone(),
                LinkAttribute::Address(a) => {
                    if let Ok(bytes) = <[u8; 6]>::try_from(a.as_slice()) {
                        info.mac = MacAddr6::from(bytes);
                    }
                }
                LinkAttribute::Link(i) => info.peer_index = Some(*i),
                _ => {}
            }
        }
        info
    }
}

/// The link named `name`, if any.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
    match handle.link().get().match_name(name).execute().try_next().await {
        Ok(Some(m)) => Ok(Some(LinkInfo::from_message(&m))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(NetlinkError::request("get link", name)(e)),
    }
}

/// Like [`link_by_name`], but absence is an error.
pub async fn require_link(handle: &Handle, name: &str, netns: &str) -> Result<LinkInfo, NetlinkError> {
    link_by_name(handle, name).await?.ok_or_else(|| NetlinkError::LinkNotFound {
        ifname: name.to_string(),
        netns: netns.to_string(),
    })
}

/// Creates a veth pair: `host` here, `peer` directly inside the namespace at `peer_netns`.
///
/// Creating the peer in its namespace (`IFLA_NET_NS_FD` on the peer) avoids a rename step and
/// a name clash with the node's own interfaces (the pod's `eth0` vs the node's).
pub async fn create_veth(handle: &Handle, host: &str, peer: &str, peer_netns: &Path, mtu: Option<u32>) -> Result<(), NetlinkError> {
    let ns = std::fs::File::open(peer_netns).map_err(|source| {
        NetlinkError::Netns(NetnsError::Open {
            netns: peer_netns.to_path_buf(),
            source,
        })
    })?;
    let mut peer_msg = LinkUnspec::new_with_name(peer).setns_by_fd(ns.as_raw_fd());
    let mut builder = LinkVeth::new(host, peer);
    if let Some(mtu) = mtu {
        peer_msg = peer_msg.mtu(mtu);
        builder = builder.mtu(mtu);
    }
    let message = builder.set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build()))).build();
    let result = handle
        .link()
        .add(message)
        .execute()
        .await
        .map_err(NetlinkError::request("create veth", host));
    // The fd must stay open until the kernel has answered.
    drop(ns);
    result
}

/// Sets the link up.
pub async fn set_up(handle: &Handle, index: u32, name: &str) -> Result<(), NetlinkError> {
    handle
        .link()
        .change(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(NetlinkError::request("set up", name))
}

/// Ensures a bridge named `name` exists; returns it.
pub async fn ensure_bridge(handle: &Handle, name: &str, netns: &str) -> Result<LinkInfo, NetlinkError> {
    if let Some(link) = link_by_name(handle, name).await? {
        return Ok(link);
    }
    match handle.link().add(LinkBridge::new(name).build()).execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == Some(EEXIST) => {}
        Err(e) => return Err(NetlinkError::request("create bridge", name)(e)),
    }
    require_link(handle, name, netns).await
}

/// Ensures the link is a port of the bridge `bridge_index`.
///
/// Setting the master a link already has is a no-op in the kernel, so this needs no check.
pub async fn ensure_bridge_port(handle: &Handle, index: u32, name: &str, bridge_index: u32) -> Result<(), NetlinkError> {
    handle
        .link()
        .change(LinkUnspec::new_with_index(index).controller(bridge_index).build())
        .execute()
        .await
        .map_err(NetlinkError::request("set bridge port", name))
}

/// Deletes the link named `name`; returns false if there was none.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool, NetlinkError> {
    let Some(link) = link_by_name(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(link.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(false),
        Err(e) => Err(NetlinkError::request("delete link", name)(e)),
    }
}

/// Ensures `ip/prefix` is on the link.
pub async fn ensure_address(handle: &Handle, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
    handle
        .address()
        .add(index, IpAddr::V4(ip), prefix)
        .replace()
        .execute()
        .await
        .map_err(NetlinkError::request("add address", format!("{ip}/{prefix}")))
}

/// The IPv4 addresses on the link, with prefix lengths.
pub async fn ipv4_addresses(handle: &Handle, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
    let mut stream = handle.address().get().set_link_index_filter(index).execute();
    let mut out = Vec::new();
    while let Some(m) = stream.try_next().await.map_err(NetlinkError::request("list addresses", index))? {
        if m.header.family != AddressFamily::Inet || m.header.index != index {
            continue;
        }
        for attr in &m.attributes {
            if let netlink_packet_route::address::AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                out.push((*ip, m.header.prefix_len));
            }
        }
    }
    Ok(out)
}

/// Links whose addresses are not the node's own: kube-proxy's IPVS mode puts every Service
/// ClusterIP on `kube-ipvs0`, and those must stay subject to policy.
const NOT_NODE_ADDRESS_LINKS: &[&str] = &["kube-ipvs0"];

/// Every IPv4 address of the namespace that is the node's own: loopback and Service
/// addresses (`NOT_NODE_ADDRESS_LINKS`) excluded.
pub async fn all_ipv4_addresses(handle: &Handle) -> Result<Vec<Ipv4Addr>, NetlinkError> {
    use netlink_packet_route::address::AddressAttribute;
    let mut stream = handle.address().get().execute();
    let mut out = Vec::new();
    while let Some(m) = stream
        .try_next()
        .await
        .map_err(NetlinkError::request("list addresses", "all links"))?
    {
        if m.header.family != AddressFamily::Inet {
            continue;
        }
        let service_link = m
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Label(l) if NOT_NODE_ADDRESS_LINKS.contains(&l.as_str())));
        if service_link {
            continue;
        }
        for attr in &m.attributes {
            if let netlink_packet_route::address::AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                if !ip.is_loopback() {
                    out.push(*ip);
                }
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Ensures the route `dst/prefix` out of `oif` (through `gateway`, if any) in the main table.
pub async fn ensure_route(
    handle: &Handle,
    dst: Ipv4Addr,
    prefix: u8,
    oif: u32,
    gateway: Option<Ipv4Addr>,
    scope: RouteScope,
) -> Result<(), NetlinkError> {
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, prefix)
        .output_interface(oif)
        .scope(scope);
    if let Some(gw) = gateway {
        builder = builder.gateway(gw);
    }
    handle
        .route()
        .add(builder.build())
        .replace()
        .execute()
        .await
        .map_err(NetlinkError::request("add route", format!("{dst}/{prefix}")))
}

/// Ensures a PERMANENT neighbour entry `ip` → `mac` on the link.
pub async fn ensure_neighbour(handle: &Handle, index: u32, ip: Ipv4Addr, mac: &[u8]) -> Result<(), NetlinkError> {
    handle
        .neighbours()
        .add(index, IpAddr::V4(ip))
        .link_layer_address(mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(NetlinkError::request("add neighbour", ip))
}

/// Deletes the route `dst/prefix` from the main table; absence is success.
pub async fn delete_route(handle: &Handle, dst: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
    let message = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, prefix).build();
    match handle.route().del(message).execute().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(ESRCH | ENOENT)) => Ok(()),
        Err(e) => Err(NetlinkError::request("delete route", format!("{dst}/{prefix}"))(e)),
    }
}

/// A route of the main table tagged with a route protocol (`rtm_protocol`), the marker that
/// tells a route's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    /// Destination network.
    pub dst: Ipv4Addr,
    /// Destination prefix length.
    pub prefix: u8,
    /// Next hop, if any.
    pub gateway: Option<Ipv4Addr>,
    /// Output interface; `None` on add lets the kernel pick the link that reaches `gateway`.
    pub oif: Option<u32>,
    /// `RTNH_F_ONLINK`: the gateway is on `oif` even without a connected route to it.
    pub onlink: bool,
    /// The route protocol.
    pub protocol: u8,
}

/// Adds the route, or replaces the main-table route with the same destination (and metric).
pub async fn replace_protocol_route(handle: &Handle, route: &Route) -> Result<(), NetlinkError> {
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.dst, route.prefix)
        .protocol(RouteProtocol::from(route.protocol))
        .scope(RouteScope::Universe);
    if let Some(gw) = route.gateway {
        builder = builder.gateway(gw);
    }
    if let Some(oif) = route.oif {
        builder = builder.output_interface(oif);
    }
    if route.onlink {
        builder = builder.onlink();
    }
    handle
        .route()
        .add(builder.build())
        .replace()
        .execute()
        .await
        .map_err(NetlinkError::request("replace route", format!("{}/{}", route.dst, route.prefix)))
}

/// The IPv4 routes of the main table whose protocol is `protocol`.
pub async fn ipv4_routes_by_protocol(handle: &Handle, protocol: u8) -> Result<Vec<Route>, NetlinkError> {
    let mut routes = ipv4_routes(handle).await?;
    routes.retain(|r| r.protocol == protocol);
    Ok(routes)
}

/// The IPv4 routes of the main table.
pub async fn ipv4_routes(handle: &Handle) -> Result<Vec<Route>, NetlinkError> {
    let mut stream = handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    let mut out = Vec::new();
    while let Some(m) = stream.try_next().await.map_err(NetlinkError::request("list routes", "ipv4"))? {
        if m.header.address_family != AddressFamily::Inet {
            continue;
        }
        let protocol = u8::from(m.header.protocol);
        let mut route = Route {
            dst: Ipv4Addr::UNSPECIFIED,
            prefix: m.header.destination_prefix_length,
            gateway: None,
            oif: None,
            onlink: m.header.flags.contains(RouteFlags::Onlink),
            protocol,
        };
        let mut table = u32::from(m.header.table);
        for attr in &m.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => route.dst = *ip,
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(*ip),
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                RouteAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        if table == u32::from(RouteHeader::RT_TABLE_MAIN) {
            out.push(route);
        }
    }
    Ok(out)
}

/// Deletes the main-table route `dst/prefix` only if its protocol is `protocol` (the kernel
/// matches a non-zero `rtm_protocol` on delete); absence is success.
pub async fn delete_protocol_route(handle: &Handle, dst: Ipv4Addr, prefix: u8, protocol: u8) -> Result<(), NetlinkError> {
    let message = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, prefix)
        .protocol(RouteProtocol::from(protocol))
        .build();
    match handle.route().del(message).execute().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(ESRCH | ENOENT)) => Ok(()),
        Err(e) => Err(NetlinkError::request("delete route", format!("{dst}/{prefix}"))(e)),
    }
}

/// Disables IPv6 on `ifname` in the calling thread's namespace; call it inside [`with_handle`].
///
/// `/proc/sys/net` resolves against the netns of the thread that opens the file, which is
/// why this must run on the thread that entered the pod's namespace. A kernel without IPv6
/// has no such file, which is what we want anyway.
pub fn disable_ipv6(ifname: &str) -> Result<(), NetlinkError> {
    let path = PathBuf::from(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"));
    match std::fs::write(&path, b"1") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetlinkError::Sysctl { path, source }),
    }
}

/// Hardens a host veth against its pod (call inside [`with_handle`], like [`disable_ipv6`]):
/// `arp_ignore = 8` answers no ARP request on it and so never creates a neighbour entry
/// from one (both ends have permanent neighbours: ARP is never needed), and `rp_filter = 1`
/// drops packets whose source the node would not route back through this veth. Together
/// they keep a pod from filling the node's neighbour table with made-up senders.
pub fn harden_host_veth(ifname: &str) -> Result<(), NetlinkError> {
    for (key, value) in [("arp_ignore", "8"), ("rp_filter", "1")] {
        let path = PathBuf::from(format!("/proc/sys/net/ipv4/conf/{ifname}/{key}"));
        std::fs::write(&path, value).map_err(|source| NetlinkError::Sysctl { path, source })?;
    }
    Ok(())
}

/// Name of the host-side veth: `bh` + 11 hex digits of FNV-1a-64 over container id and ifname.
///
/// Stable, so DEL finds the veth without any state; 15 bytes is the kernel's `IFNAMSIZ` limit.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    // The NUL separator keeps ("ab","c") and ("a","bc") apart.
    let hash = container_id
        .bytes()
        .chain([0])
        .chain(ifname.bytes())
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    format!("bh{:011x}", hash & ((1 << 44) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_stable_short_and_distinct() {
        let a = host_veth_name("container-1", "eth0");
        assert_eq!(a, host_veth_name("container-1", "eth0"));
        assert_eq!(a.len(), 13);
        assert!(a.starts_with("bh") && a[2..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, host_veth_name("container-1", "eth1"));
        assert_ne!(host_veth_name("ab", "c"), host_veth_name("a", "bc"));
    }
}
