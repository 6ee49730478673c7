//! The VXLAN overlay's kernel state: the device, its forwarding database, permanent
//! neighbours, link MTU and MAC — what the agent's routing keeps in step with the Nodes.

use super::*;

/// What a VXLAN device is: the attributes that cannot change without recreating it, and
/// those that can.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Device name.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// Source address of the encapsulated packets.
    pub local: Ipv4Addr,
    /// Whether the device learns remote MACs from received packets.
    pub learning: bool,
    /// MTU.
    pub mtu: u32,
    /// MAC address.
    pub mac: MacAddr6,
}

/// A VXLAN device as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanLink {
    /// The link.
    pub link: LinkInfo,
    /// Its attributes (`mac` repeats `link.mac`).
    pub spec: VxlanSpec,
}

/// The VXLAN device named `name`; `Ok(None)` when there is no link of that name or it is not
/// a VXLAN device.
pub async fn vxlan_by_name(handle: &Handle, name: &str) -> Result<Option<VxlanLink>, NetlinkError> {
    use netlink_packet_route::link::{InfoKind, InfoVxlan, LinkInfo as Info};
    let message = match handle.link().get().match_name(name).execute().try_next().await {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(None),
        Err(e) if errno(&e) == Some(ENODEV) => return Ok(None),
        Err(e) => return Err(NetlinkError::request("get link", name)(e)),
    };
    let link = LinkInfo::from_message(&message);
    let mut spec = VxlanSpec {
        name: link.name.clone(),
        vni: 0,
        port: 0,
        local: Ipv4Addr::UNSPECIFIED,
        learning: true,
        mtu: 0,
        mac: link.mac,
    };
    let mut is_vxlan = false;
    for attr in &message.attributes {
        match attr {
            LinkAttribute::Mtu(m) => spec.mtu = *m,
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        Info::Kind(InfoKind::Vxlan) => is_vxlan = true,
                        Info::Data(InfoData::Vxlan(data)) => {
                            for d in data {
                                match d {
                                    InfoVxlan::Id(v) => spec.vni = *v,
                                    InfoVxlan::Port(p) => spec.port = *p,
                                    InfoVxlan::Local(ip) => spec.local = *ip,
                                    InfoVxlan::Learning(l) => spec.learning = *l,
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(is_vxlan.then_some(VxlanLink { link, spec }))
}

/// Creates the VXLAN device `spec` (up, no multicast group, no default remote: every remote
/// comes from an FDB entry); returns it.
pub async fn create_vxlan(handle: &Handle, spec: &VxlanSpec, netns: &str) -> Result<VxlanLink, NetlinkError> {
    let message = LinkVxlan::new(&spec.name, spec.vni)
        .port(spec.port)
        .local(spec.local)
        .learning(spec.learning)
        .mtu(spec.mtu)
        .address(spec.mac.as_bytes().to_vec())
        .up()
        .build();
    match handle.link().add(message).execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == Some(EEXIST) => {}
        Err(e) => return Err(NetlinkError::request("create vxlan", &spec.name)(e)),
    }
    if let Some(link) = vxlan_by_name(handle, &spec.name).await? {
        return Ok(link);
    }
    let ifname = spec.name.clone();
    let netns = netns.to_string();
    Err(match link_by_name(handle, &spec.name).await? {
        Some(_) => NetlinkError::WrongKind {
            ifname,
            netns,
            kind: "vxlan",
        },
        None => NetlinkError::LinkNotFound { ifname, netns },
    })
}

/// Sets the link's MTU.
pub async fn set_mtu(handle: &Handle, index: u32, name: &str, mtu: u32) -> Result<(), NetlinkError> {
    handle
        .link()
        .change(LinkUnspec::new_with_index(index).mtu(mtu).build())
        .execute()
        .await
        .map_err(NetlinkError::request("set mtu", name))
}

/// Sets the link's MAC address.
pub async fn set_mac(handle: &Handle, index: u32, name: &str, mac: MacAddr6) -> Result<(), NetlinkError> {
    handle
        .link()
        .change(LinkUnspec::new_with_index(index).address(mac.as_bytes().to_vec()).build())
        .execute()
        .await
        .map_err(NetlinkError::request("set mac", name))
}

/// The MTU of the link that holds the address `ip`, if any link does.
pub async fn mtu_of_address_link(handle: &Handle, ip: Ipv4Addr) -> Result<Option<u32>, NetlinkError> {
    use netlink_packet_route::address::AddressAttribute;
    let mut stream = handle.address().get().execute();
    let mut index = None;
    while let Some(m) = stream.try_next().await.map_err(NetlinkError::request("list addresses", ip))? {
        let holds = m
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(a)) if *a == ip));
        if m.header.family == AddressFamily::Inet && holds {
            index = Some(m.header.index);
        }
    }
    let Some(index) = index else {
        return Ok(None);
    };
    let mut links = handle.link().get().match_index(index).execute();
    while let Some(m) = links.try_next().await.map_err(NetlinkError::request("get link", index))? {
        for attr in &m.attributes {
            if let LinkAttribute::Mtu(mtu) = attr {
                return Ok(Some(*mtu));
            }
        }
    }
    Ok(None)
}

/// Deletes `ip/prefix` from the link; absence is success.
pub async fn delete_address(handle: &Handle, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
    use netlink_packet_route::address::{AddressAttribute, AddressMessage};
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.prefix_len = prefix;
    message.header.index = index;
    message.attributes.push(AddressAttribute::Local(IpAddr::V4(ip)));
    message.attributes.push(AddressAttribute::Address(IpAddr::V4(ip)));
    match handle.address().del(message).execute().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(EADDRNOTAVAIL | ENODEV | ENOENT | ESRCH)) => Ok(()),
        Err(e) => Err(NetlinkError::request("delete address", format!("{ip}/{prefix}"))(e)),
    }
}

/// One entry of a VXLAN device's forwarding database: frames for `mac` are sent to `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    /// The remote MAC.
    pub mac: MacAddr6,
    /// The remote VTEP's underlay address.
    pub dst: Ipv4Addr,
}

/// The FDB entries with a remote IPv4 address on the device `index` (`bridge fdb show dev`).
pub async fn fdb_entries(handle: &Handle, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
    let mut stream = handle.neighbours().get().set_address_family(AddressFamily::Bridge).execute();
    let mut out = Vec::new();
    while let Some(m) = stream.try_next().await.map_err(NetlinkError::request("list fdb", index))? {
        if m.header.ifindex != index {
            continue;
        }
        let mut mac = None;
        let mut dst = None;
        for attr in &m.attributes {
            match attr {
                NeighbourAttribute::LinkLayerAddress(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok().map(MacAddr6::from),
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
                // An AF_BRIDGE message's NDA_DST is parsed by family, so it arrives raw.
                NeighbourAttribute::Destination(NeighbourAddress::Other(raw)) => {
                    dst = <[u8; 4]>::try_from(raw.as_slice()).ok().map(Ipv4Addr::from);
                }
                _ => {}
            }
        }
        if let (Some(mac), Some(dst)) = (mac, dst) {
            out.push(FdbEntry { mac, dst });
        }
    }
    Ok(out)
}

/// Ensures the permanent FDB entry `mac` → `dst` on the VXLAN device `index`, replacing the
/// remote of an existing entry for `mac` (`bridge fdb replace … dev D dst X self permanent`).
///
/// Replace, not append: each peer has its own MAC, so one remote per MAC is what we want,
/// and replace keeps a peer's entry right when its address changes.
pub async fn ensure_fdb_entry(handle: &Handle, index: u32, entry: FdbEntry) -> Result<(), NetlinkError> {
    handle
        .neighbours()
        .add_bridge(index, entry.mac.as_bytes())
        .flags(NeighbourFlags::Own)
        .state(NeighbourState::Permanent)
        .destination(IpAddr::V4(entry.dst))
        .replace()
        .execute()
        .await
        .map_err(NetlinkError::request("replace fdb entry", entry.mac))
}

/// Deletes every FDB entry for `mac` on the VXLAN device `index`; absence is success.
pub async fn delete_fdb_entry(handle: &Handle, index: u32, mac: MacAddr6) -> Result<(), NetlinkError> {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Bridge;
    message.header.ifindex = index;
    message.header.flags = NeighbourFlags::Own;
    message
        .attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.as_bytes().to_vec()));
    match handle.neighbours().del(message).execute().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH | ENODEV)) => Ok(()),
        Err(e) => Err(NetlinkError::request("delete fdb entry", mac)(e)),
    }
}

/// The PERMANENT IPv4 neighbour entries on the link `index`, as (address, MAC).
pub async fn permanent_neighbours(handle: &Handle, index: u32) -> Result<Vec<(Ipv4Addr, MacAddr6)>, NetlinkError> {
    let mut stream = handle.neighbours().get().set_address_family(AddressFamily::Inet).execute();
    let mut out = Vec::new();
    while let Some(m) = stream.try_next().await.map_err(NetlinkError::request("list neighbours", index))? {
        if m.header.ifindex != index || m.header.state != NeighbourState::Permanent {
            continue;
        }
        let mut mac = None;
        let mut ip = None;
        for attr in &m.attributes {
            match attr {
                NeighbourAttribute::LinkLayerAddress(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok().map(MacAddr6::from),
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(*a),
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            out.push((ip, mac));
        }
    }
    Ok(out)
}

/// Deletes the IPv4 neighbour entry `ip` on the link `index`; absence is success.
pub async fn delete_neighbour(handle: &Handle, index: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.ifindex = index;
    message.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    match handle.neighbours().del(message).execute().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH | ENODEV)) => Ok(()),
        Err(e) => Err(NetlinkError::request("delete neighbour", ip)(e)),
    }
}
