//! The operations a [`Router`](super::Router) needs from the kernel, and their netlink
//! implementation.

use std::net::Ipv4Addr;

use bulkhead_hostnet::netlink::{self, FdbEntry, LinkInfo, MacAddr6, NetlinkError, Route, VxlanLink, VxlanSpec};
use rtnetlink::Handle;

use super::ROUTE_PROTOCOL;

/// The kernel state a router reads and writes; every operation is idempotent and absence is
/// success on delete.
#[expect(async_fn_in_trait, reason = "used through generics on one thread, never boxed or sent")]
pub trait RoutePlane {
    /// Routes of the main table with protocol [`ROUTE_PROTOCOL`].
    async fn routes(&mut self) -> Result<Vec<Route>, NetlinkError>;
    /// Adds or replaces the route to `route.dst/route.prefix`.
    async fn replace_route(&mut self, route: &Route) -> Result<(), NetlinkError>;
    /// Deletes our route to `dst/prefix` (never one with another protocol).
    async fn delete_route(&mut self, dst: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError>;
    /// The MTU of the link holding `ip`.
    async fn underlay_mtu(&mut self, ip: Ipv4Addr) -> Result<Option<u32>, NetlinkError>;
    /// The VXLAN device named `name`, if there is one.
    async fn vxlan(&mut self, name: &str) -> Result<Option<VxlanLink>, NetlinkError>;
    /// Creates a VXLAN device, up.
    async fn create_vxlan(&mut self, spec: &VxlanSpec) -> Result<VxlanLink, NetlinkError>;
    /// Deletes the link named `name` with everything on it.
    async fn delete_link(&mut self, name: &str) -> Result<(), NetlinkError>;
    /// Sets a link's MTU.
    async fn set_mtu(&mut self, link: &LinkInfo, mtu: u32) -> Result<(), NetlinkError>;
    /// Sets a link's MAC.
    async fn set_mac(&mut self, link: &LinkInfo, mac: MacAddr6) -> Result<(), NetlinkError>;
    /// Sets a link up.
    async fn set_up(&mut self, link: &LinkInfo) -> Result<(), NetlinkError>;
    /// The IPv4 addresses of link `index`.
    async fn addresses(&mut self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError>;
    /// Adds an address to link `index`.
    async fn add_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError>;
    /// Removes an address from link `index`.
    async fn delete_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError>;
    /// The FDB entries with an IPv4 remote on link `index`.
    async fn fdb(&mut self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError>;
    /// Adds or replaces the FDB entry for `entry.mac`.
    async fn replace_fdb(&mut self, index: u32, entry: FdbEntry) -> Result<(), NetlinkError>;
    /// Removes the FDB entries for `mac`.
    async fn delete_fdb(&mut self, index: u32, mac: MacAddr6) -> Result<(), NetlinkError>;
    /// The permanent IPv4 neighbours on link `index`.
    async fn neighbours(&mut self, index: u32) -> Result<Vec<(Ipv4Addr, MacAddr6)>, NetlinkError>;
    /// Adds or replaces a permanent neighbour.
    async fn replace_neighbour(&mut self, index: u32, ip: Ipv4Addr, mac: MacAddr6) -> Result<(), NetlinkError>;
    /// Removes a neighbour.
    async fn delete_neighbour(&mut self, index: u32, ip: Ipv4Addr) -> Result<(), NetlinkError>;
}

/// [`RoutePlane`] through rtnetlink, in the namespace the handle was opened in.
pub struct NetlinkPlane {
    handle: Handle,
    netns: String,
}

impl NetlinkPlane {
    /// A plane over `handle`; `netns` names the namespace in errors.
    pub fn new(handle: Handle, netns: impl Into<String>) -> Self {
        Self {
            handle,
            netns: netns.into(),
        }
    }
}

impl RoutePlane for NetlinkPlane {
    async fn routes(&mut self) -> Result<Vec<Route>, NetlinkError> {
        netlink::ipv4_routes_by_protocol(&self.handle, ROUTE_PROTOCOL).await
    }

    async fn replace_route(&mut self, route: &Route) -> Result<(), NetlinkError> {
        netlink::replace_protocol_route(&self.handle, route).await
    }

    async fn delete_route(&mut self, dst: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
        netlink::delete_protocol_route(&self.handle, dst, prefix, ROUTE_PROTOCOL).await
    }

    async fn underlay_mtu(&mut self, ip: Ipv4Addr) -> Result<Option<u32>, NetlinkError> {
        netlink::mtu_of_address_link(&self.handle, ip).await
    }

    async fn vxlan(&mut self, name: &str) -> Result<Option<VxlanLink>, NetlinkError> {
        netlink::vxlan_by_name(&self.handle, name).await
    }

    async fn create_vxlan(&mut self, spec: &VxlanSpec) -> Result<VxlanLink, NetlinkError> {
        netlink::create_vxlan(&self.handle, spec, &self.netns).await
    }

    async fn delete_link(&mut self, name: &str) -> Result<(), NetlinkError> {
        netlink::delete_link(&self.handle, name).await.map(|_| ())
    }

    async fn set_mtu(&mut self, link: &LinkInfo, mtu: u32) -> Result<(), NetlinkError> {
        netlink::set_mtu(&self.handle, link.index, &link.name, mtu).await
    }

    async fn set_mac(&mut self, link: &LinkInfo, mac: MacAddr6) -> Result<(), NetlinkError> {
        netlink::set_mac(&self.handle, link.index, &link.name, mac).await
    }

    async fn set_up(&mut self, link: &LinkInfo) -> Result<(), NetlinkError> {
        netlink::set_up(&self.handle, link.index, &link.name).await
    }

    async fn addresses(&mut self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        netlink::ipv4_addresses(&self.handle, index).await
    }

    async fn add_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
        netlink::ensure_address(&self.handle, index, ip, prefix).await
    }

    async fn delete_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
        netlink::delete_address(&self.handle, index, ip, prefix).await
    }

    async fn fdb(&mut self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        netlink::fdb_entries(&self.handle, index).await
    }

    async fn replace_fdb(&mut self, index: u32, entry: FdbEntry) -> Result<(), NetlinkError> {
        netlink::ensure_fdb_entry(&self.handle, index, entry).await
    }

    async fn delete_fdb(&mut self, index: u32, mac: MacAddr6) -> Result<(), NetlinkError> {
        netlink::delete_fdb_entry(&self.handle, index, mac).await
    }

    async fn neighbours(&mut self, index: u32) -> Result<Vec<(Ipv4Addr, MacAddr6)>, NetlinkError> {
        netlink::permanent_neighbours(&self.handle, index).await
    }

    async fn replace_neighbour(&mut self, index: u32, ip: Ipv4Addr, mac: MacAddr6) -> Result<(), NetlinkError> {
        netlink::ensure_neighbour(&self.handle, index, ip, mac.as_bytes()).await
    }

    async fn delete_neighbour(&mut self, index: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        netlink::delete_neighbour(&self.handle, index, ip).await
    }
}
