//! The reconcile logic against an in-memory plane that behaves like the kernel where it
//! matters: replace overwrites a route of any protocol, delete matches our protocol only,
//! deleting a link takes its routes, FDB entries, neighbours and addresses with it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use bulkhead_hostnet::netlink::{FdbEntry, LinkInfo, MacAddr6, NetlinkError, Route, VxlanLink, VxlanSpec};

use super::*;

const BOOT: u8 = 3;

#[derive(Clone, Debug)]
struct FakeLink {
    vxlan: Option<VxlanSpec>,
    index: u32,
    up: bool,
    addresses: Vec<(Ipv4Addr, u8)>,
    fdb: Vec<FdbEntry>,
    neighbours: Vec<(Ipv4Addr, MacAddr6)>,
}

#[derive(Debug)]
struct FakePlane {
    links: BTreeMap<String, FakeLink>,
    routes: BTreeMap<(Ipv4Addr, u8), Route>,
    underlay: BTreeMap<Ipv4Addr, u32>,
    next_index: u32,
    /// Gateways the kernel cannot reach: a route through one fails.
    unreachable: Vec<Ipv4Addr>,
}

impl FakePlane {
    /// A node with `ul0` (MTU 1500) holding `ip`.
    fn node(ip: Ipv4Addr) -> Self {
        let mut plane = Self {
            links: BTreeMap::new(),
            routes: BTreeMap::new(),
            underlay: BTreeMap::from([(ip, 1500)]),
            next_index: 10,
            unreachable: vec![],
        };
        plane.links.insert(
            "ul0".into(),
            FakeLink {
                vxlan: None,
                index: 2,
                up: true,
                addresses: vec![(ip, 24)],
                fdb: vec![],
                neighbours: vec![],
            },
        );
        plane
    }

    fn link_mut(&mut self, index: u32) -> &mut FakeLink {
        self.links.values_mut().find(|l| l.index == index).unwrap()
    }

    fn device(&self) -> &FakeLink {
        &self.links[DEFAULT_VXLAN_DEVICE]
    }

    fn our_routes(&self) -> Vec<(Ipv4Network, Option<Ipv4Addr>)> {
        self.routes
            .values()
            .filter(|r| r.protocol == ROUTE_PROTOCOL)
            .map(|r| (Ipv4Network::new(r.dst, r.prefix).unwrap(), r.gateway))
            .collect()
    }

    fn vxlan_link(name: &str, link: &FakeLink) -> Option<VxlanLink> {
        let spec = link.vxlan.clone()?;
        Some(VxlanLink {
            link: LinkInfo {
                index: link.index,
                name: name.to_string(),
                mac: spec.mac,
                peer_index: None,
                up: link.up,
            },
            spec,
        })
    }
}

impl RoutePlane for FakePlane {
    async fn routes(&mut self) -> Result<Vec<Route>, NetlinkError> {
        Ok(self.routes.values().filter(|r| r.protocol == ROUTE_PROTOCOL).copied().collect())
    }
    async fn replace_route(&mut self, route: &Route) -> Result<(), NetlinkError> {
        if route.gateway.is_some_and(|gw| self.unreachable.contains(&gw)) {
            return Err(NetlinkError::LinkNotFound {
                ifname: "ul0".into(),
                netns: "fake".into(),
            });
        }
        let mut route = *route;
        // The kernel picks the link that reaches the gateway.
        route.oif = route.oif.or(Some(2));
        self.routes.insert((route.dst, route.prefix), route);
        Ok(())
    }
    async fn delete_route(&mut self, dst: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
        if self.routes.get(&(dst, prefix)).is_some_and(|r| r.protocol == ROUTE_PROTOCOL) {
            self.routes.remove(&(dst, prefix));
        }
        Ok(())
    }
    async fn underlay_mtu(&mut self, ip: Ipv4Addr) -> Result<Option<u32>, NetlinkError> {
        Ok(self.underlay.get(&ip).copied())
    }
    async fn vxlan(&mut self, name: &str) -> Result<Option<VxlanLink>, NetlinkError> {
        Ok(self.links.get(name).and_then(|l| Self::vxlan_link(name, l)))
    }
    async fn create_vxlan(&mut self, spec: &VxlanSpec) -> Result<VxlanLink, NetlinkError> {
        assert!(!self.links.contains_key(&spec.name), "create over an existing link");
        self.next_index += 1;
        let link = FakeLink {
            vxlan: Some(spec.clone()),
            index: self.next_index,
            up: true,
            addresses: vec![],
            fdb: vec![],
            neighbours: vec![],
        };
        let out = Self::vxlan_link(&spec.name, &link).unwrap();
        self.links.insert(spec.name.clone(), link);
        Ok(out)
    }
    async fn delete_link(&mut self, name: &str) -> Result<(), NetlinkError> {
        if let Some(link) = self.links.remove(name) {
            self.routes.retain(|_, r| r.oif != Some(link.index));
        }
        Ok(())
    }
    async fn set_mtu(&mut self, link: &LinkInfo, mtu: u32) -> Result<(), NetlinkError> {
        self.link_mut(link.index).vxlan.as_mut().unwrap().mtu = mtu;
        Ok(())
    }
    async fn set_mac(&mut self, link: &LinkInfo, mac: MacAddr6) -> Result<(), NetlinkError> {
        self.link_mut(link.index).vxlan.as_mut().unwrap().mac = mac;
        Ok(())
    }
    async fn set_up(&mut self, link: &LinkInfo) -> Result<(), NetlinkError> {
        self.link_mut(link.index).up = true;
        Ok(())
    }
    async fn addresses(&mut self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        Ok(self.link_mut(index).addresses.clone())
    }
    async fn add_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
        let link = self.link_mut(index);
        if !link.addresses.contains(&(ip, prefix)) {
            link.addresses.push((ip, prefix));
        }
        Ok(())
    }
    async fn delete_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
        self.link_mut(index).addresses.retain(|a| *a != (ip, prefix));
        Ok(())
    }
    async fn fdb(&mut self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        Ok(self.link_mut(index).fdb.clone())
    }
    async fn replace_fdb(&mut self, index: u32, entry: FdbEntry) -> Result<(), NetlinkError> {
        let link = self.link_mut(index);
        link.fdb.retain(|e| e.mac != entry.mac);
        link.fdb.push(entry);
        Ok(())
    }
    async fn delete_fdb(&mut self, index: u32, mac: MacAddr6) -> Result<(), NetlinkError> {
        self.link_mut(index).fdb.retain(|e| e.mac != mac);
        Ok(())
    }
    async fn neighbours(&mut self, index: u32) -> Result<Vec<(Ipv4Addr, MacAddr6)>, NetlinkError> {
        Ok(self.link_mut(index).neighbours.clone())
    }
    async fn replace_neighbour(&mut self, index: u32, ip: Ipv4Addr, mac: MacAddr6) -> Result<(), NetlinkError> {
        let link = self.link_mut(index);
        link.neighbours.retain(|(i, _)| *i != ip);
        link.neighbours.push((ip, mac));
        Ok(())
    }
    async fn delete_neighbour(&mut self, index: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        self.link_mut(index).neighbours.retain(|(i, _)| *i != ip);
        Ok(())
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn local() -> LocalNode {
    LocalNode {
        name: "n0".into(),
        internal_ip: ip("192.168.50.10"),
        pod_cidr: net("10.244.0.0/24"),
    }
}

fn peer(i: u8) -> Peer {
    Peer {
        name: format!("n{i}"),
        pod_cidr: net(&format!("10.244.{i}.0/24")),
        internal_ip: Ipv4Addr::new(192, 168, 50, 10 + i),
    }
}

fn vxlan() -> RoutingMode {
    RoutingMode::Vxlan(VxlanConfig::default())
}

/// Reconciles, then checks a second reconcile changes nothing.
async fn converge(router: &Router, plane: &mut FakePlane, peers: &[Peer]) -> Vec<Change> {
    let changes = router.reconcile(plane, peers).await.unwrap();
    assert_eq!(router.reconcile(plane, peers).await.unwrap(), vec![], "not idempotent");
    changes
}

#[tokio::test]
async fn native_adds_one_route_per_peer_through_its_internal_ip() {
    let router = Router::new(local(), RoutingMode::Native);
    let mut plane = FakePlane::node(local().internal_ip);
    let changes = converge(&router, &mut plane, &[peer(1), peer(2)]).await;
    assert_eq!(
        changes,
        vec![
            Change::ReplaceRoute(net("10.244.1.0/24")),
            Change::ReplaceRoute(net("10.244.2.0/24"))
        ]
    );
    assert_eq!(
        plane.our_routes(),
        vec![
            (net("10.244.1.0/24"), Some(ip("192.168.50.11"))),
            (net("10.244.2.0/24"), Some(ip("192.168.50.12")))
        ]
    );
    assert!(!plane.links.contains_key(DEFAULT_VXLAN_DEVICE));
}

#[tokio::test]
async fn a_peers_new_ip_or_cidr_moves_its_route() {
    let router = Router::new(local(), RoutingMode::Native);
    let mut plane = FakePlane::node(local().internal_ip);
    converge(&router, &mut plane, &[peer(1), peer(2)]).await;

    let mut moved = peer(1);
    moved.internal_ip = ip("192.168.50.99");
    let changes = converge(&router, &mut plane, &[moved.clone(), peer(2)]).await;
    assert_eq!(changes, vec![Change::ReplaceRoute(net("10.244.1.0/24"))]);

    moved.pod_cidr = net("10.244.9.0/24");
    let changes = converge(&router, &mut plane, &[moved, peer(2)]).await;
    assert_eq!(
        changes,
        vec![
            Change::ReplaceRoute(net("10.244.9.0/24")),
            Change::DeleteRoute(net("10.244.1.0/24"))
        ]
    );
    assert_eq!(
        plane.our_routes(),
        vec![
            (net("10.244.2.0/24"), Some(ip("192.168.50.12"))),
            (net("10.244.9.0/24"), Some(ip("192.168.50.99")))
        ]
    );
}

#[tokio::test]
async fn a_removed_peer_loses_its_route_and_foreign_routes_stay() {
    let router = Router::new(local(), RoutingMode::Native);
    let mut plane = FakePlane::node(local().internal_ip);
    let foreign = Route {
        dst: ip("172.16.0.0"),
        prefix: 16,
        gateway: Some(ip("192.168.50.1")),
        oif: Some(2),
        onlink: false,
        protocol: BOOT,
    };
    plane.routes.insert((foreign.dst, foreign.prefix), foreign);
    converge(&router, &mut plane, &[peer(1), peer(2)]).await;
    let changes = converge(&router, &mut plane, &[peer(2)]).await;
    assert_eq!(changes, vec![Change::DeleteRoute(net("10.244.1.0/24"))]);
    assert_eq!(plane.routes.get(&(foreign.dst, 16)), Some(&foreign));

    router.remove_all(&mut plane).await.unwrap();
    assert_eq!(plane.our_routes(), vec![]);
    assert_eq!(plane.routes.get(&(foreign.dst, 16)), Some(&foreign));
}

#[tokio::test]
async fn vxlan_builds_device_fdb_neighbours_and_onlink_routes() {
    let router = Router::new(local(), vxlan());
    let mut plane = FakePlane::node(local().internal_ip);
    let changes = converge(&router, &mut plane, &[peer(1), peer(2)]).await;
    assert_eq!(changes[0], Change::CreateDevice(DEFAULT_VXLAN_DEVICE.into()));

    let dev = plane.device().clone();
    let spec = dev.vxlan.clone().unwrap();
    assert_eq!(spec.mtu, 1450);
    assert_eq!(spec.mac, MacAddr6::new(0x02, 0xb5, 192, 168, 50, 10));
    assert_eq!(
        (spec.vni, spec.port, spec.local, spec.learning),
        (1, 4789, ip("192.168.50.10"), false)
    );
    assert_eq!(dev.addresses, vec![(ip("10.244.0.0"), 32)]);
    assert_eq!(
        dev.fdb,
        vec![
            FdbEntry {
                mac: vtep_mac(ip("192.168.50.11")),
                dst: ip("192.168.50.11")
            },
            FdbEntry {
                mac: vtep_mac(ip("192.168.50.12")),
                dst: ip("192.168.50.12")
            }
        ]
    );
    assert_eq!(
        dev.neighbours,
        vec![
            (ip("10.244.1.0"), vtep_mac(ip("192.168.50.11"))),
            (ip("10.244.2.0"), vtep_mac(ip("192.168.50.12")))
        ]
    );
    let route = plane.routes[&(ip("10.244.1.0"), 24)];
    assert_eq!(
        (route.gateway, route.oif, route.onlink),
        (Some(ip("10.244.1.0")), Some(dev.index), true)
    );
}

#[tokio::test]
async fn vxlan_peer_changes_update_fdb_neighbours_and_routes() {
    let router = Router::new(local(), vxlan());
    let mut plane = FakePlane::node(local().internal_ip);
    converge(&router, &mut plane, &[peer(1), peer(2)]).await;

    let mut moved = peer(1);
    moved.internal_ip = ip("192.168.50.99");
    let changes = converge(&router, &mut plane, &[moved.clone(), peer(2)]).await;
    let new_mac = vtep_mac(moved.internal_ip);
    assert_eq!(
        changes,
        vec![
            Change::ReplaceFdb(FdbEntry {
                mac: new_mac,
                dst: moved.internal_ip
            }),
            Change::DeleteFdb(vtep_mac(ip("192.168.50.11"))),
            Change::ReplaceNeighbour(ip("10.244.1.0"), new_mac),
        ]
    );

    let changes = converge(&router, &mut plane, &[peer(2)]).await;
    assert_eq!(
        changes,
        vec![
            Change::DeleteFdb(new_mac),
            Change::DeleteNeighbour(ip("10.244.1.0")),
            Change::DeleteRoute(net("10.244.1.0/24"))
        ]
    );
    assert_eq!(plane.device().fdb.len(), 1);
}

#[tokio::test]
async fn restart_removes_what_a_vanished_node_left_and_nothing_else() {
    let router = Router::new(local(), vxlan());
    let mut plane = FakePlane::node(local().internal_ip);
    converge(&router, &mut plane, &[peer(1), peer(2), peer(3)]).await;
    // Node 3 vanished while the agent was down; a foreign route and a neighbour on
    // another link are not ours.
    let foreign = Route {
        dst: ip("10.244.3.0"),
        prefix: 25,
        gateway: Some(ip("192.168.50.1")),
        oif: Some(2),
        onlink: false,
        protocol: BOOT,
    };
    plane.routes.insert((foreign.dst, foreign.prefix), foreign);
    plane
        .links
        .get_mut("ul0")
        .unwrap()
        .neighbours
        .push((ip("192.168.50.1"), MacAddr6::new(2, 0, 0, 0, 0, 1)));

    let restarted = Router::new(local(), vxlan());
    let changes = converge(&restarted, &mut plane, &[peer(1), peer(2)]).await;
    assert_eq!(
        changes,
        vec![
            Change::DeleteFdb(vtep_mac(ip("192.168.50.13"))),
            Change::DeleteNeighbour(ip("10.244.3.0")),
            Change::DeleteRoute(net("10.244.3.0/24")),
        ]
    );
    assert_eq!(plane.routes.get(&(foreign.dst, 25)), Some(&foreign));
    assert_eq!(plane.links["ul0"].neighbours.len(), 1);
}

#[tokio::test]
async fn a_device_with_other_fixed_attributes_is_recreated_others_are_set() {
    let mut plane = FakePlane::node(local().internal_ip);
    Router::new(local(), vxlan()).reconcile(&mut plane, &[peer(1)]).await.unwrap();

    // MTU, MAC and link state are changed in place.
    let dev = plane.links.get_mut(DEFAULT_VXLAN_DEVICE).unwrap();
    dev.up = false;
    dev.vxlan.as_mut().unwrap().mtu = 9000;
    let router = Router::new(local(), vxlan());
    assert_eq!(
        converge(&router, &mut plane, &[peer(1)]).await,
        vec![Change::SetMtu(1450), Change::SetUp]
    );

    // A new VNI needs a new device, which then needs everything again.
    let config = VxlanConfig {
        vni: 7,
        ..VxlanConfig::default()
    };
    let router = Router::new(local(), RoutingMode::Vxlan(config));
    let changes = converge(&router, &mut plane, &[peer(1)]).await;
    assert_eq!(
        changes[..2],
        [
            Change::DeleteDevice(DEFAULT_VXLAN_DEVICE.into()),
            Change::CreateDevice(DEFAULT_VXLAN_DEVICE.into())
        ]
    );
    assert!(changes.contains(&Change::ReplaceRoute(net("10.244.1.0/24"))));
    assert_eq!(plane.device().vxlan.as_ref().unwrap().vni, 7);
}

#[tokio::test]
async fn switching_modes_removes_the_other_modes_entries() {
    let mut router = Router::new(local(), vxlan());
    let mut plane = FakePlane::node(local().internal_ip);
    converge(&router, &mut plane, &[peer(1)]).await;

    router.set_mode(RoutingMode::Native);
    let changes = converge(&router, &mut plane, &[peer(1)]).await;
    assert_eq!(
        changes,
        vec![
            Change::ReplaceRoute(net("10.244.1.0/24")),
            Change::DeleteDevice(DEFAULT_VXLAN_DEVICE.into())
        ]
    );
    assert_eq!(plane.our_routes(), vec![(net("10.244.1.0/24"), Some(ip("192.168.50.11")))]);

    router.set_mode(vxlan());
    converge(&router, &mut plane, &[peer(1)]).await;
    assert_eq!(plane.our_routes(), vec![(net("10.244.1.0/24"), Some(ip("10.244.1.0")))]);

    // A renamed device replaces the old one.
    router.set_mode(RoutingMode::Vxlan(VxlanConfig {
        device: "bh.vx".into(),
        ..VxlanConfig::default()
    }));
    converge(&router, &mut plane, &[peer(1)]).await;
    assert!(plane.links.contains_key("bh.vx") && !plane.links.contains_key(DEFAULT_VXLAN_DEVICE));
}

#[tokio::test]
async fn remove_all_leaves_nothing_of_ours() {
    let router = Router::new(local(), vxlan());
    let mut plane = FakePlane::node(local().internal_ip);
    converge(&router, &mut plane, &[peer(1), peer(2)]).await;
    let changes = router.remove_all(&mut plane).await.unwrap();
    assert!(changes.contains(&Change::DeleteDevice(DEFAULT_VXLAN_DEVICE.into())));
    assert_eq!(plane.our_routes(), vec![]);
    assert_eq!(plane.links.keys().collect::<Vec<_>>(), vec!["ul0"]);
    assert_eq!(router.remove_all(&mut plane).await.unwrap(), vec![]);
}

#[test]
fn desired_skips_this_node_and_a_second_claim_on_a_pod_cidr() {
    let mut twin = peer(1);
    twin.name = "zz".into();
    twin.internal_ip = ip("192.168.50.77");
    let mut me = peer(0);
    me.name = "n0".into();
    let state = desired(&local(), &[twin, peer(1), me], &RoutingMode::Native, None).unwrap();
    assert_eq!(
        state.routes,
        BTreeMap::from([(net("10.244.1.0/24"), NextHop::Underlay(ip("192.168.50.11")))])
    );
}

#[test]
fn vxlan_mtu_is_derived_or_configured_and_checked() {
    let err = desired(&local(), &[], &vxlan(), None).unwrap_err();
    assert!(matches!(err, RoutingError::UnderlayNotFound { .. }), "{err}");
    let small = desired(&local(), &[], &vxlan(), Some(100)).unwrap_err();
    assert!(matches!(small, RoutingError::MtuTooSmall { mtu: 50, .. }), "{small}");
    let fixed = RoutingMode::Vxlan(VxlanConfig {
        mtu: Some(1400),
        ..VxlanConfig::default()
    });
    let state = desired(&local(), &[], &fixed, None).unwrap();
    assert_eq!(state.device.unwrap().0.mtu, 1400);
}

#[test]
fn vtep_macs_and_overlay_addresses_are_derived() {
    assert_eq!(vtep_mac(ip("10.1.2.3")).to_string(), "02:B5:0A:01:02:03");
    assert_eq!(overlay_address(net("10.244.7.0/24")), ip("10.244.7.0"));
    assert_eq!(overlay_address(net("10.244.7.128/25")), ip("10.244.7.128"));
}

#[tokio::test]
async fn a_peer_the_kernel_cannot_route_to_does_not_cut_off_the_others() {
    let router = Router::new(local(), RoutingMode::Native);
    let mut plane = FakePlane::node(local().internal_ip);
    plane.unreachable = vec![peer(1).internal_ip, peer(2).internal_ip];
    let err = router.reconcile(&mut plane, &[peer(1), peer(2), peer(3)]).await.unwrap_err();
    assert!(matches!(err, RoutingError::Incomplete { count: 2, .. }), "{err}");
    assert_eq!(plane.our_routes(), vec![(net("10.244.3.0/24"), Some(ip("192.168.50.13")))]);

    plane.unreachable = vec![peer(1).internal_ip];
    let err = router.reconcile(&mut plane, &[peer(1), peer(2), peer(3)]).await.unwrap_err();
    assert!(matches!(err, RoutingError::Netlink { op: "replace route", .. }), "{err}");
    assert_eq!(plane.our_routes().len(), 2);
}
