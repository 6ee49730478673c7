//! Routes between nodes: each node's pod CIDR reachable from every other node, natively or
//! through a VXLAN overlay (issue 10).
//!
//! [`desired`] is a pure function of this node, its peers and the [`RoutingMode`]; a
//! [`Router`] reads what the kernel has through a [`RoutePlane`] (netlink in production, a
//! fake in the unit tests), and adds what is missing and deletes what is stale, touching
//! only what it owns:
//! - routes of the main table whose protocol is [`ROUTE_PROTOCOL`],
//! - the VXLAN device (recognised by name) and the FDB entries, permanent neighbours and
//!   addresses on it.
//!
//! The kernel is the state: a restarted agent finds the entries of its previous run by
//! their marker and removes those of nodes that vanished meanwhile. A route to a peer's pod
//! CIDR is ours by definition: adding it replaces a foreign route with the same destination
//! and metric (the kernel's `replace` ignores the protocol), as the lab's static routes are
//! until the lab stops installing them.
//!
//! # VXLAN layout
//! Flannel's `vxlan` backend, without its annotations:
//! - one device per node, `bulkhead.vxlan` (VNI, UDP port, `local` = the node's InternalIP,
//!   learning off: every remote is programmed, none is learnt from traffic), MTU = underlay
//!   MTU − 50 (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14);
//! - its MAC is derived from the node's InternalIP, `02:b5:a:b:c:d` ([`vtep_mac`]), so each
//!   node computes its peers' MACs and nothing has to be published;
//! - a node's overlay address is the network address (`.0`) of its pod CIDR
//!   ([`overlay_address`]), put on its own device as a /32. IPAM never hands out the network
//!   address, so it costs no pod address, and it needs no separate overlay subnet;
//! - per peer: an FDB entry (peer MAC → peer InternalIP), a permanent neighbour (peer
//!   overlay address → peer MAC, so no ARP crosses the tunnel) and the route
//!   `<peer pod CIDR> via <peer overlay address> dev bulkhead.vxlan onlink`. `onlink` because
//!   no connected route covers a peer's `.0`; traffic the node itself sends to a remote pod
//!   leaves from its own `.0`, which the peer routes back through the tunnel.

mod plane;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;

use bulkhead_hostnet::netlink::{self, FdbEntry, MacAddr6, NetlinkError, Route, VxlanSpec};
use ipnetwork::Ipv4Network;

pub use plane::{NetlinkPlane, RoutePlane};

/// The route protocol (`rtm_protocol`) that marks Bulkhead's routes: 0xb5, unused by the
/// kernel and by iproute2's `rt_protos` (routing daemons sit at 8–18, 42, 99 and 186–192).
pub const ROUTE_PROTOCOL: u8 = 0xb5;

/// The VXLAN device's default name.
pub const DEFAULT_VXLAN_DEVICE: &str = "bulkhead.vxlan";

/// The default VNI.
pub const DEFAULT_VXLAN_VNI: u32 = 1;

/// The default UDP port: IANA's VXLAN port (the kernel's default, 8472, is pre-IANA).
pub const DEFAULT_VXLAN_PORT: u16 = 4789;

/// Bytes VXLAN adds to a packet on an IPv4 underlay: outer IPv4 20, UDP 8, VXLAN 8 and
/// the inner Ethernet header 14.
pub const VXLAN_OVERHEAD: u32 = 50;

/// The smallest MTU IPv4 allows (RFC 791); a VXLAN MTU below it is a misconfiguration.
const MIN_IPV4_MTU: u32 = 68;

/// Another node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    /// Node name.
    pub name: String,
    /// Its pod CIDR.
    pub pod_cidr: Ipv4Network,
    /// Its InternalIP, on the underlay.
    pub internal_ip: Ipv4Addr,
}

/// The node the router runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalNode {
    /// Node name.
    pub name: String,
    /// Its InternalIP, on the underlay.
    pub internal_ip: Ipv4Addr,
    /// Its pod CIDR.
    pub pod_cidr: Ipv4Network,
}

/// How pod traffic reaches other nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoutingMode {
    /// A route per peer through its InternalIP: the nodes share an L2 segment.
    Native,
    /// Through a VXLAN overlay.
    Vxlan(VxlanConfig),
}

/// The VXLAN overlay's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanConfig {
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// Device name.
    pub device: String,
    /// MTU; `None`: the MTU of the link holding the InternalIP minus [`VXLAN_OVERHEAD`].
    pub mtu: Option<u32>,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        Self {
            vni: DEFAULT_VXLAN_VNI,
            port: DEFAULT_VXLAN_PORT,
            device: DEFAULT_VXLAN_DEVICE.to_string(),
            mtu: None,
        }
    }
}

/// Why routing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// A netlink operation failed.
    #[error("routing on node {node}: {op} failed")]
    Netlink {
        /// This node's name.
        node: String,
        /// The router's step.
        op: &'static str,
        /// Cause (boxed: netlink errors are large and this one is returned often).
        #[source]
        source: Box<NetlinkError>,
    },
    /// The VXLAN MTU cannot be derived: no link holds the InternalIP.
    #[error("routing on node {node}: no link holds the InternalIP {ip}, cannot derive the vxlan mtu")]
    UnderlayNotFound {
        /// This node's name.
        node: String,
        /// Its InternalIP.
        ip: Ipv4Addr,
    },
    /// The VXLAN MTU is below what IPv4 needs.
    #[error("routing on node {node}: vxlan mtu {mtu} is too small")]
    MtuTooSmall {
        /// This node's name.
        node: String,
        /// The MTU.
        mtu: u32,
    },
    /// Several operations failed (the others were done).
    #[error("routing on node {node}: {count} operations failed")]
    Incomplete {
        /// This node's name.
        node: String,
        /// How many failed.
        count: usize,
        /// The first failure.
        #[source]
        first: Box<RoutingError>,
    },
}

/// The VTEP MAC of the node whose InternalIP is `ip`: `02:b5` (locally administered,
/// unicast) and the four address bytes.
pub fn vtep_mac(ip: Ipv4Addr) -> MacAddr6 {
    let [a, b, c, d] = ip.octets();
    MacAddr6::new(0x02, ROUTE_PROTOCOL, a, b, c, d)
}

/// A node's address on the overlay: the network address of its pod CIDR.
pub fn overlay_address(pod_cidr: Ipv4Network) -> Ipv4Addr {
    pod_cidr.network()
}

/// Where a peer's pod CIDR is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextHop {
    /// Through the peer's InternalIP, out of whichever link the kernel finds reaches it.
    Underlay(Ipv4Addr),
    /// Through the peer's overlay address, on-link on the VXLAN device.
    Overlay(Ipv4Addr),
}

/// What the node should have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// The VXLAN device and its overlay address, in VXLAN mode.
    pub device: Option<(VxlanSpec, Ipv4Addr)>,
    /// One route per peer pod CIDR.
    pub routes: BTreeMap<Ipv4Network, NextHop>,
    /// FDB entries on the device: peer MAC → peer InternalIP.
    pub fdb: BTreeMap<MacAddr6, Ipv4Addr>,
    /// Permanent neighbours on the device: peer overlay address → peer MAC.
    pub neighbours: BTreeMap<Ipv4Addr, MacAddr6>,
}

/// The peers that get routes: not this node, not one claiming this node's address or pod
/// CIDR, and of two peers claiming one pod CIDR only the first by name (the model should
/// never produce either; a route flapping between two nodes would be worse than a missing
/// one).
fn usable_peers<'a>(local: &LocalNode, peers: &'a [Peer]) -> Vec<&'a Peer> {
    let mut sorted: Vec<&Peer> = peers
        .iter()
        .filter(|p| p.name != local.name && p.internal_ip != local.internal_ip && p.pod_cidr != local.pod_cidr)
        .collect();
    sorted.sort();
    let mut seen = BTreeSet::new();
    sorted.retain(|p| {
        let fresh = seen.insert(p.pod_cidr);
        if !fresh {
            tracing::warn!(peer = %p.name, pod_cidr = %p.pod_cidr, "pod cidr claimed by two nodes: peer ignored");
        }
        fresh
    });
    sorted
}

/// What `local` should have to reach `peers` in `mode`; `underlay_mtu` is the MTU of the
/// link holding the InternalIP (needed only in VXLAN mode without a configured MTU).
pub fn desired(local: &LocalNode, peers: &[Peer], mode: &RoutingMode, underlay_mtu: Option<u32>) -> Result<DesiredState, RoutingError> {
    let peers = usable_peers(local, peers);
    let mut state = DesiredState::default();
    match mode {
        RoutingMode::Native => {
            for p in peers {
                state.routes.insert(p.pod_cidr, NextHop::Underlay(p.internal_ip));
            }
        }
        RoutingMode::Vxlan(config) => {
            let mtu = match (config.mtu, underlay_mtu) {
                (Some(mtu), _) => mtu,
                (None, Some(underlay)) => underlay.saturating_sub(VXLAN_OVERHEAD),
                (None, None) => {
                    return Err(RoutingError::UnderlayNotFound {
                        node: local.name.clone(),
                        ip: local.internal_ip,
                    })
                }
            };
            if mtu < MIN_IPV4_MTU {
                return Err(RoutingError::MtuTooSmall {
                    node: local.name.clone(),
                    mtu,
                });
            }
            let spec = VxlanSpec {
                name: config.device.clone(),
                vni: config.vni,
                port: config.port,
                local: local.internal_ip,
                learning: false,
                mtu,
                mac: vtep_mac(local.internal_ip),
            };
            state.device = Some((spec, overlay_address(local.pod_cidr)));
            for p in peers {
                let mac = vtep_mac(p.internal_ip);
                let overlay = overlay_address(p.pod_cidr);
                state.fdb.insert(mac, p.internal_ip);
                state.neighbours.insert(overlay, mac);
                state.routes.insert(p.pod_cidr, NextHop::Overlay(overlay));
            }
        }
    }
    Ok(state)
}

/// One change a reconcile made, for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Created the VXLAN device.
    CreateDevice(String),
    /// Deleted a VXLAN device (stale, or to recreate it with other fixed attributes).
    DeleteDevice(String),
    /// Set the device's MTU.
    SetMtu(u32),
    /// Set the device's MAC.
    SetMac(MacAddr6),
    /// Set the device up.
    SetUp,
    /// Added an address to the device.
    AddAddress(Ipv4Addr, u8),
    /// Removed an address from the device.
    DeleteAddress(Ipv4Addr, u8),
    /// Added or corrected an FDB entry.
    ReplaceFdb(FdbEntry),
    /// Removed the FDB entries of a MAC.
    DeleteFdb(MacAddr6),
    /// Added or corrected a permanent neighbour.
    ReplaceNeighbour(Ipv4Addr, MacAddr6),
    /// Removed a neighbour.
    DeleteNeighbour(Ipv4Addr),
    /// Added or corrected the route to a pod CIDR.
    ReplaceRoute(Ipv4Network),
    /// Removed the route to a pod CIDR.
    DeleteRoute(Ipv4Network),
}

/// What a reconcile changed and which of its steps failed.
struct Outcome {
    node: String,
    changes: Vec<Change>,
    errors: Vec<RoutingError>,
}

impl Outcome {
    fn new(node: &str) -> Self {
        Self {
            node: node.to_string(),
            changes: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Notes `change` if `result` is a success, the failure of `op` otherwise.
    fn record(&mut self, op: &'static str, result: Result<(), NetlinkError>, change: Change) {
        match result {
            Ok(()) => self.changes.push(change),
            Err(source) => self.errors.push(RoutingError::Netlink {
                node: self.node.clone(),
                op,
                source: Box::new(source),
            }),
        }
    }

    /// Logs the changes; the changes, or the failures (an abort from `result` first).
    fn finish(mut self, result: Result<(), RoutingError>) -> Result<Vec<Change>, RoutingError> {
        for change in &self.changes {
            tracing::info!(node = %self.node, ?change, "routing");
        }
        if let Err(abort) = result {
            self.errors.insert(0, abort);
        }
        let count = self.errors.len();
        let mut errors = self.errors.into_iter();
        match (errors.next(), count) {
            (None, _) => Ok(self.changes),
            (Some(only), 1) => Err(only),
            (Some(first), _) => Err(RoutingError::Incomplete {
                node: self.node,
                count,
                first: Box::new(first),
            }),
        }
    }
}

/// Reconciles this node's routes to its peers; holds no state but its configuration (the
/// kernel is the state).
#[derive(Clone, Debug)]
pub struct Router {
    local: LocalNode,
    mode: RoutingMode,
    /// Device names that are ours: the default and every one configured in this run, so a
    /// mode or name change removes the old device.
    devices: BTreeSet<String>,
}

impl Router {
    /// A router for `local` in `mode`.
    pub fn new(local: LocalNode, mode: RoutingMode) -> Self {
        let mut router = Self {
            local,
            mode: RoutingMode::Native,
            devices: BTreeSet::from([DEFAULT_VXLAN_DEVICE.to_string()]),
        };
        router.set_mode(mode);
        router
    }

    /// Switches the mode; the next reconcile removes the other mode's entries.
    pub fn set_mode(&mut self, mode: RoutingMode) {
        if let RoutingMode::Vxlan(config) = &mode {
            self.devices.insert(config.device.clone());
        }
        self.mode = mode;
    }

    /// The current mode.
    pub fn mode(&self) -> &RoutingMode {
        &self.mode
    }

    /// The node this router runs on.
    pub fn local(&self) -> &LocalNode {
        &self.local
    }

    fn netlink_err(&self, op: &'static str) -> impl FnOnce(NetlinkError) -> RoutingError + '_ {
        move |source| RoutingError::Netlink {
            node: self.local.name.clone(),
            op,
            source: Box::new(source),
        }
    }

    /// Brings the plane to the desired state for `peers`; returns what it changed (nothing
    /// when already there).
    ///
    /// A failure to read the kernel's state or to set up the device stops it; a failure on
    /// one peer's entry does not stop the others (a peer the kernel cannot route to must not
    /// cut off the rest) and is reported as [`RoutingError::Incomplete`] at the end. The
    /// next reconcile retries either way.
    pub async fn reconcile<P: RoutePlane>(&self, plane: &mut P, peers: &[Peer]) -> Result<Vec<Change>, RoutingError> {
        let mut out = Outcome::new(&self.local.name);
        let result = self.reconcile_into(plane, peers, &mut out).await;
        out.finish(result)
    }

    async fn reconcile_into<P: RoutePlane>(&self, plane: &mut P, peers: &[Peer], out: &mut Outcome) -> Result<(), RoutingError> {
        let underlay_mtu = match &self.mode {
            RoutingMode::Vxlan(VxlanConfig { mtu: None, .. }) => plane
                .underlay_mtu(self.local.internal_ip)
                .await
                .map_err(self.netlink_err("find underlay mtu"))?,
            _ => None,
        };
        let want = desired(&self.local, peers, &self.mode, underlay_mtu)?;
        let device_index = match &want.device {
            Some((spec, overlay)) => Some(self.reconcile_device(plane, spec, *overlay, &want, out).await?),
            None => None,
        };
        let keep_device = want.device.as_ref().map(|(spec, _)| spec.name.as_str());

        let have = plane.routes().await.map_err(self.netlink_err("list routes"))?;
        for (cidr, hop) in &want.routes {
            let (gateway, oif, onlink) = match hop {
                // Native routes leave the link to the kernel.
                NextHop::Underlay(gw) => (*gw, None, false),
                NextHop::Overlay(gw) => (*gw, device_index, true),
            };
            let route = Route {
                dst: cidr.network(),
                prefix: cidr.prefix(),
                gateway: Some(gateway),
                oif,
                onlink,
                protocol: ROUTE_PROTOCOL,
            };
            let present = have.iter().any(|r| {
                r.dst == route.dst
                    && r.prefix == route.prefix
                    && r.gateway == route.gateway
                    && r.onlink == route.onlink
                    && (route.oif.is_none() || r.oif == route.oif)
            });
            if !present {
                out.record("replace route", plane.replace_route(&route).await, Change::ReplaceRoute(*cidr));
            }
        }
        for r in &have {
            let Ok(cidr) = Ipv4Network::new(r.dst, r.prefix) else {
                continue;
            };
            if !want.routes.contains_key(&cidr) {
                out.record("delete route", plane.delete_route(r.dst, r.prefix).await, Change::DeleteRoute(cidr));
            }
        }

        // Last, so that routes have moved off a device before it goes.
        for name in &self.devices {
            if Some(name.as_str()) != keep_device && plane.vxlan(name).await.map_err(self.netlink_err("get vxlan device"))?.is_some() {
                out.record(
                    "delete vxlan device",
                    plane.delete_link(name).await,
                    Change::DeleteDevice(name.clone()),
                );
            }
        }
        Ok(())
    }

    /// Ensures the device, its address, FDB and neighbours; returns its ifindex.
    async fn reconcile_device<P: RoutePlane>(
        &self,
        plane: &mut P,
        spec: &VxlanSpec,
        overlay: Ipv4Addr,
        want: &DesiredState,
        out: &mut Outcome,
    ) -> Result<u32, RoutingError> {
        let existing = plane.vxlan(&spec.name).await.map_err(self.netlink_err("get vxlan device"))?;
        // VNI, port, local address and learning cannot be changed on a live device.
        let existing = match existing {
            Some(dev)
                if dev.spec.vni != spec.vni
                    || dev.spec.port != spec.port
                    || dev.spec.local != spec.local
                    || dev.spec.learning != spec.learning =>
            {
                plane
                    .delete_link(&spec.name)
                    .await
                    .map_err(self.netlink_err("delete vxlan device"))?;
                out.changes.push(Change::DeleteDevice(spec.name.clone()));
                None
            }
            other => other,
        };
        let dev = match existing {
            Some(dev) => dev,
            None => {
                let dev = plane.create_vxlan(spec).await.map_err(self.netlink_err("create vxlan device"))?;
                out.changes.push(Change::CreateDevice(spec.name.clone()));
                dev
            }
        };
        let link = &dev.link;
        if dev.spec.mtu != spec.mtu {
            plane.set_mtu(link, spec.mtu).await.map_err(self.netlink_err("set vxlan mtu"))?;
            out.changes.push(Change::SetMtu(spec.mtu));
        }
        if dev.spec.mac != spec.mac {
            plane.set_mac(link, spec.mac).await.map_err(self.netlink_err("set vxlan mac"))?;
            out.changes.push(Change::SetMac(spec.mac));
        }
        if !link.up {
            plane.set_up(link).await.map_err(self.netlink_err("set vxlan up"))?;
            out.changes.push(Change::SetUp);
        }

        let addresses = plane
            .addresses(link.index)
            .await
            .map_err(self.netlink_err("list vxlan addresses"))?;
        if !addresses.contains(&(overlay, 32)) {
            plane
                .add_address(link.index, overlay, 32)
                .await
                .map_err(self.netlink_err("add overlay address"))?;
            out.changes.push(Change::AddAddress(overlay, 32));
        }
        for &(ip, prefix) in addresses.iter().filter(|a| **a != (overlay, 32)) {
            let result = plane.delete_address(link.index, ip, prefix).await;
            out.record("delete overlay address", result, Change::DeleteAddress(ip, prefix));
        }

        let fdb = plane.fdb(link.index).await.map_err(self.netlink_err("list fdb"))?;
        for (&mac, &dst) in &want.fdb {
            let mut remotes = fdb.iter().filter(|e| e.mac == mac);
            // Exactly one remote, the right one; replace collapses several into one.
            let right = matches!((remotes.next(), remotes.next()), (Some(e), None) if e.dst == dst);
            if !right {
                let entry = FdbEntry { mac, dst };
                out.record(
                    "replace fdb entry",
                    plane.replace_fdb(link.index, entry).await,
                    Change::ReplaceFdb(entry),
                );
            }
        }
        let stale: BTreeSet<MacAddr6> = fdb.iter().map(|e| e.mac).filter(|m| !want.fdb.contains_key(m)).collect();
        for mac in stale {
            out.record("delete fdb entry", plane.delete_fdb(link.index, mac).await, Change::DeleteFdb(mac));
        }

        let neighbours = plane.neighbours(link.index).await.map_err(self.netlink_err("list neighbours"))?;
        for (&ip, &mac) in &want.neighbours {
            if !neighbours.contains(&(ip, mac)) {
                let result = plane.replace_neighbour(link.index, ip, mac).await;
                out.record("replace neighbour", result, Change::ReplaceNeighbour(ip, mac));
            }
        }
        for &(ip, _) in neighbours.iter().filter(|(ip, _)| !want.neighbours.contains_key(ip)) {
            out.record(
                "delete neighbour",
                plane.delete_neighbour(link.index, ip).await,
                Change::DeleteNeighbour(ip),
            );
        }
        Ok(link.index)
    }

    /// Removes everything this router owns: its routes and its VXLAN devices (with their
    /// FDB entries, neighbours and addresses). Keeps going after a failure and reports all.
    pub async fn remove_all<P: RoutePlane>(&self, plane: &mut P) -> Result<Vec<Change>, RoutingError> {
        let mut out = Outcome::new(&self.local.name);
        match plane.routes().await {
            Ok(routes) => {
                for r in routes {
                    if let Ok(cidr) = Ipv4Network::new(r.dst, r.prefix) {
                        out.record("delete route", plane.delete_route(r.dst, r.prefix).await, Change::DeleteRoute(cidr));
                    }
                }
            }
            Err(e) => out.errors.push(self.netlink_err("list routes")(e)),
        }
        for name in &self.devices {
            match plane.vxlan(name).await {
                Ok(None) => {}
                Ok(Some(_)) => out.record(
                    "delete vxlan device",
                    plane.delete_link(name).await,
                    Change::DeleteDevice(name.clone()),
                ),
                Err(e) => out.errors.push(self.netlink_err("get vxlan device")(e)),
            }
        }
        out.finish(Ok(()))
    }

    /// [`Router::reconcile`] through netlink in the namespace at `netns` (`None`: the
    /// caller's). Blocks the calling thread: from async code, call it through `spawn_blocking`.
    pub fn reconcile_in(&self, netns: Option<&Path>, peers: &[Peer]) -> Result<Vec<Change>, RoutingError> {
        let label = netns.map_or_else(|| "node".to_string(), |p| p.display().to_string());
        netlink::with_handle(netns, |handle| async move {
            let mut plane = NetlinkPlane::new(handle, label);
            Ok(self.reconcile(&mut plane, peers).await)
        })
        .map_err(self.netlink_err("open netlink"))?
    }

    /// [`Router::remove_all`] through netlink in the namespace at `netns` (`None`: the
    /// caller's).
    pub fn remove_all_in(&self, netns: Option<&Path>) -> Result<Vec<Change>, RoutingError> {
        let label = netns.map_or_else(|| "node".to_string(), |p| p.display().to_string());
        netlink::with_handle(netns, |handle| async move {
            let mut plane = NetlinkPlane::new(handle, label);
            Ok(self.remove_all(&mut plane).await)
        })
        .map_err(self.netlink_err("open netlink"))?
    }
}
