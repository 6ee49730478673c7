//! Writing compiled state into the datapath maps: one trait, a BPF implementation and an
//! in-memory one for tests, and the diff that decides what to write.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuHashMap};
use bulkhead_common::{Backend, EndpointInfo, FlowBudget, IpcacheValue, Ipv4Key, PolicyKey, PolicyValue, RevNat, ServiceKey, ServiceValue};

use crate::datapath::state::DatapathDelta;
use crate::datapath::{conntrack, DatapathState};

/// Why a map write failed.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// A kernel map operation failed (a full map lands here too).
    #[error("{op} on map {map} failed")]
    Map {
        /// What was attempted.
        op: &'static str,
        /// Which map.
        map: &'static str,
        /// Cause.
        #[source]
        source: MapError,
    },
    /// The writer has no such map (an implementation that predates it).
    #[error("map {map} is not supported by this writer")]
    Unsupported {
        /// Which map.
        map: &'static str,
    },
}

/// The writes a sync can make; implemented by the BPF maps and by [`MemoryMaps`].
pub trait MapWriter {
    /// Inserts or replaces an endpoint.
    fn set_endpoint(&mut self, ifindex: u32, value: &EndpointInfo) -> Result<(), MapsError>;
    /// Removes an endpoint.
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), MapsError>;
    /// Readies what the endpoints about to be written need (their conntrack tables), all
    /// at once; [`MapWriter::set_endpoint`] still makes sure of it for each.
    fn prepare_endpoints(&mut self, values: &[EndpointInfo]) -> Result<(), MapsError> {
        let _ = values;
        Ok(())
    }
    /// Gives the endpoint ids `ids` conntrack tables ahead of need (the agent's reserve for
    /// its next endpoints), so that an ADD waits neither for a table's creation nor for the
    /// RCU grace period the kernel waits out after storing one. A table no endpoint entry
    /// names is never looked up.
    fn reserve_conntrack(&mut self, ids: RangeInclusive<u32>) -> Result<(), MapsError> {
        let _ = ids;
        Ok(())
    }
    /// Inserts or replaces an ipcache prefix.
    fn set_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8, value: &IpcacheValue) -> Result<(), MapsError>;
    /// Removes an ipcache prefix.
    fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8) -> Result<(), MapsError>;
    /// Inserts or replaces a policy entry.
    fn set_policy(&mut self, key: &PolicyKey, prefix_len: u32, value: &PolicyValue) -> Result<(), MapsError>;
    /// Removes a policy entry.
    fn remove_policy(&mut self, key: &PolicyKey, prefix_len: u32) -> Result<(), MapsError>;
    /// What the maps hold now: after a failed sync, the only trustworthy baseline.
    fn read_state(&self) -> Result<DatapathState, MapsError>;
    /// Inserts or replaces a Service header or backend slot.
    ///
    /// The default fails loudly: a writer that forgets the Service maps must not look as
    /// if it had written them.
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapsError> {
        let _ = (key, value);
        Err(MapsError::Unsupported { map: "services" })
    }
    /// Removes a Service header or backend slot.
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapsError> {
        let _ = key;
        Err(MapsError::Unsupported { map: "services" })
    }
    /// Inserts or replaces a backend.
    fn set_backend(&mut self, id: u32, value: &Backend) -> Result<(), MapsError> {
        let _ = (id, value);
        Err(MapsError::Unsupported { map: "backends" })
    }
    /// Removes a backend.
    fn remove_backend(&mut self, id: u32) -> Result<(), MapsError> {
        let _ = id;
        Err(MapsError::Unsupported { map: "backends" })
    }
    /// Inserts or replaces a reverse-NAT entry.
    fn set_rev_nat(&mut self, id: u32, value: &RevNat) -> Result<(), MapsError> {
        let _ = (id, value);
        Err(MapsError::Unsupported { map: "rev_nat" })
    }
    /// Removes a reverse-NAT entry.
    fn remove_rev_nat(&mut self, id: u32) -> Result<(), MapsError> {
        let _ = id;
        Err(MapsError::Unsupported { map: "rev_nat" })
    }
    /// Adds a quarantined pod's address. The default fails loudly, as for Services.
    fn set_quarantine(&mut self, addr: Ipv4Addr, value: u32) -> Result<(), MapsError> {
        let _ = (addr, value);
        Err(MapsError::Unsupported { map: "quarantine" })
    }
    /// Removes a quarantined pod's address.
    fn remove_quarantine(&mut self, addr: Ipv4Addr) -> Result<(), MapsError> {
        let _ = addr;
        Err(MapsError::Unsupported { map: "quarantine" })
    }
    /// Writes the quarantine count, which gates the datapath's address lookup.
    fn set_quarantine_count(&mut self, count: u32) -> Result<(), MapsError> {
        let _ = count;
        Err(MapsError::Unsupported { map: "quarantine_count" })
    }
}

/// How many writes a sync made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Entries inserted or changed.
    pub upserts: usize,
    /// Entries removed.
    pub removals: usize,
}

impl std::ops::Add for SyncStats {
    type Output = SyncStats;

    fn add(self, other: SyncStats) -> SyncStats {
        SyncStats {
            upserts: self.upserts + other.upserts,
            removals: self.removals + other.removals,
        }
    }
}

/// Writes the difference between `old` (what the maps hold) and `new`.
///
/// Order keeps the datapath fail-closed and consistent at every step: quarantined addresses
/// go in before anything else and out after everything else; identities and
/// policy entries go in before the endpoint that uses them, and an endpoint goes out
/// before its entries. Services: backends and reverse-NAT entries go in before the slots
/// that name them, slots before the header that counts them, and out in the reverse order, so a new connection
/// is never sent to a slot not yet written or a backend already removed. On error `old`
/// no longer describes the maps; callers resync.
pub fn sync(w: &mut (impl MapWriter + ?Sized), old: &DatapathState, new: &DatapathState) -> Result<SyncStats, MapsError> {
    let quarantine = DatapathDelta::between_quarantine(old, new);
    let mut stats = quarantine_in(w, &quarantine)?;
    for (ifindex, _) in removed(&old.endpoints, &new.endpoints) {
        w.remove_endpoint(*ifindex)?;
        stats.removals += 1;
    }
    for ((addr, len), v) in upserted(&old.ipcache, &new.ipcache) {
        w.set_ipcache(*addr, *len, v)?;
        stats.upserts += 1;
    }
    for ((key, len), v) in upserted(&old.policy, &new.policy) {
        w.set_policy(key, *len, v)?;
        stats.upserts += 1;
    }
    let endpoints: Vec<EndpointInfo> = upserted(&old.endpoints, &new.endpoints).map(|(_, v)| *v).collect();
    w.prepare_endpoints(&endpoints)?;
    for (ifindex, v) in upserted(&old.endpoints, &new.endpoints) {
        w.set_endpoint(*ifindex, v)?;
        stats.upserts += 1;
    }
    for ((key, len), _) in removed(&old.policy, &new.policy) {
        w.remove_policy(key, *len)?;
        stats.removals += 1;
    }
    for ((addr, len), _) in removed(&old.ipcache, &new.ipcache) {
        w.remove_ipcache(*addr, *len)?;
        stats.removals += 1;
    }
    stats = stats + quarantine_out(w, &quarantine)?;
    Ok(stats + sync_services(w, old, new)?)
}

/// The quarantine's first half, before anything else is written (a quarantine takes effect
/// first): new addresses, then the count that opens their lookup when it grows.
fn quarantine_in(w: &mut (impl MapWriter + ?Sized), delta: &DatapathDelta) -> Result<SyncStats, MapsError> {
    let mut stats = SyncStats::default();
    for (addr, v) in delta.quarantine.iter().filter_map(|(k, v)| Some((k, v.as_ref()?))) {
        w.set_quarantine(*addr, *v)?;
        stats.upserts += 1;
    }
    if let Some(n) = delta.quarantine_count.filter(|&n| n != 0) {
        w.set_quarantine_count(n)?;
        stats.upserts += 1;
    }
    Ok(stats)
}

/// The quarantine's second half, after everything else (a release takes effect last):
/// addresses removed, then the count when it falls to 0.
fn quarantine_out(w: &mut (impl MapWriter + ?Sized), delta: &DatapathDelta) -> Result<SyncStats, MapsError> {
    let mut stats = SyncStats::default();
    for (addr, _) in delta.quarantine.iter().filter(|(_, v)| v.is_none()) {
        w.remove_quarantine(*addr)?;
        stats.removals += 1;
    }
    if delta.quarantine_count == Some(0) {
        w.set_quarantine_count(0)?;
        stats.upserts += 1;
    }
    Ok(stats)
}

/// Writes a compiler delta: only the keys it lists, in [`sync`]'s order (quarantined
/// addresses added, endpoint removals, ipcache and policy upserts, endpoint upserts, policy
/// and ipcache removals, quarantined addresses removed), so the
/// datapath stays fail-closed and consistent at every step just as with a full diff.
///
/// On error some writes happened and others did not: callers read the maps back
/// ([`MapWriter::read_state`]) and resync from what they hold, as after a failed [`sync`].
pub fn sync_delta(w: &mut (impl MapWriter + ?Sized), delta: &DatapathDelta) -> Result<SyncStats, MapsError> {
    let mut stats = quarantine_in(w, delta)?;
    for (ifindex, _) in delta.endpoints.iter().filter(|(_, v)| v.is_none()) {
        w.remove_endpoint(*ifindex)?;
        stats.removals += 1;
    }
    for ((addr, len), v) in delta.ipcache.iter().filter_map(|(k, v)| Some((k, v.as_ref()?))) {
        w.set_ipcache(*addr, *len, v)?;
        stats.upserts += 1;
    }
    for ((key, len), v) in delta.policy.iter().filter_map(|(k, v)| Some((k, v.as_ref()?))) {
        w.set_policy(key, *len, v)?;
        stats.upserts += 1;
    }
    let endpoints: Vec<EndpointInfo> = delta.endpoints.values().flatten().copied().collect();
    w.prepare_endpoints(&endpoints)?;
    for (ifindex, v) in delta.endpoints.iter().filter_map(|(k, v)| Some((k, v.as_ref()?))) {
        w.set_endpoint(*ifindex, v)?;
        stats.upserts += 1;
    }
    for ((key, len), _) in delta.policy.iter().filter(|(_, v)| v.is_none()) {
        w.remove_policy(key, *len)?;
        stats.removals += 1;
    }
    for ((addr, len), _) in delta.ipcache.iter().filter(|(_, v)| v.is_none()) {
        w.remove_ipcache(*addr, *len)?;
        stats.removals += 1;
    }
    Ok(stats + quarantine_out(w, delta)?)
}

/// The Service half of [`sync`]: writes the difference between `old`'s Service maps
/// (services, backends, reverse NAT) and `new`'s, ignoring the other maps; what
/// [`sync_delta`] leaves out.
pub fn sync_services(w: &mut (impl MapWriter + ?Sized), old: &DatapathState, new: &DatapathState) -> Result<SyncStats, MapsError> {
    let mut stats = SyncStats::default();
    for (id, v) in upserted(&old.backends, &new.backends) {
        w.set_backend(*id, v)?;
        stats.upserts += 1;
    }
    for (id, v) in upserted(&old.rev_nat, &new.rev_nat) {
        w.set_rev_nat(*id, v)?;
        stats.upserts += 1;
    }
    // Slots, then headers: a header's count never covers a slot not yet written.
    for header in [false, true] {
        for (k, v) in upserted(&old.services, &new.services).filter(|(k, _)| (k.slot == 0) == header) {
            w.set_service(k, v)?;
            stats.upserts += 1;
        }
    }
    // Headers, then slots: a shrunk count stops covering a slot before it goes.
    for header in [true, false] {
        for (k, _) in removed(&old.services, &new.services).filter(|(k, _)| (k.slot == 0) == header) {
            w.remove_service(k)?;
            stats.removals += 1;
        }
    }
    for (id, _) in removed(&old.backends, &new.backends) {
        w.remove_backend(*id)?;
        stats.removals += 1;
    }
    // Last: replies of connections still open to a removed Service keep their VIP as long
    // as anything else of it is left.
    for (id, _) in removed(&old.rev_nat, &new.rev_nat) {
        w.remove_rev_nat(*id)?;
        stats.removals += 1;
    }
    Ok(stats)
}

fn upserted<'a, K: Ord, V: PartialEq>(old: &'a BTreeMap<K, V>, new: &'a BTreeMap<K, V>) -> impl Iterator<Item = (&'a K, &'a V)> {
    new.iter().filter(move |(k, v)| old.get(k) != Some(v))
}

fn removed<'a, K: Ord, V>(old: &'a BTreeMap<K, V>, new: &'a BTreeMap<K, V>) -> impl Iterator<Item = (&'a K, &'a V)> {
    old.iter().filter(move |(k, _)| !new.contains_key(k))
}

/// The datapath's maps, as the agent writes them.
pub struct BpfMaps {
    /// `bh_endp_v1`.
    pub endpoints: HashMap<MapData, u32, EndpointInfo>,
    /// `bh_ipc_v1`.
    pub ipcache: LpmTrie<MapData, Ipv4Key, IpcacheValue>,
    /// `bh_pol_v1`.
    pub policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    /// `bh_svc_v1`.
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// `bh_be_v1`.
    pub backends: HashMap<MapData, u32, Backend>,
    /// `bh_lbrev_v1`.
    pub rev_nat: HashMap<MapData, u32, RevNat>,
    /// `bh_ct_v3`: each endpoint's conntrack table, created with its endpoint entry.
    pub conntrack: conntrack::Tables,
    /// Another descriptor of `conntrack`'s map, for batch updates (aya has none).
    pub conntrack_fd: std::os::fd::OwnedFd,
    /// `bh_fbudget_v1`: each endpoint's flow-record budget (made by the datapath, removed
    /// with the endpoint so that a reused id starts afresh).
    pub flow_budget: PerCpuHashMap<MapData, u32, FlowBudget>,
    /// `bh_quar_v1`: every quarantined pod's address.
    pub quarantine: HashMap<MapData, Ipv4Key, u32>,
    /// `bh_quarn_v1`: how many addresses `quarantine` holds (gates its lookup).
    pub quarantine_count: Array<MapData, u32>,
}

impl BpfMaps {
    /// What the maps hold now: the baseline a restarted agent syncs against, so entries
    /// an earlier run left behind are removed.
    pub fn read_state(&self) -> Result<DatapathState, MapsError> {
        let mut s = DatapathState::default();
        for item in self.endpoints.iter() {
            let (k, v) = item.map_err(map_err("iterate", "endpoints"))?;
            s.endpoints.insert(k, v);
        }
        for item in self.ipcache.iter() {
            let (k, v) = item.map_err(map_err("iterate", "ipcache"))?;
            s.ipcache.insert((Ipv4Addr::from(k.data().addr), k.prefix_len() as u8), v);
        }
        for item in self.policy.iter() {
            let (k, v) = item.map_err(map_err("iterate", "policy"))?;
            s.policy.insert((k.data(), k.prefix_len()), v);
        }
        for item in self.services.iter() {
            let (k, v) = item.map_err(map_err("iterate", "services"))?;
            s.services.insert(k, v);
        }
        for item in self.backends.iter() {
            let (k, v) = item.map_err(map_err("iterate", "backends"))?;
            s.backends.insert(k, v);
        }
        for item in self.rev_nat.iter() {
            let (k, v) = item.map_err(map_err("iterate", "rev_nat"))?;
            s.rev_nat.insert(k, v);
        }
        for item in self.quarantine.iter() {
            let (k, v) = item.map_err(map_err("iterate", "quarantine"))?;
            s.quarantine.insert(Ipv4Addr::from(k.addr), v);
        }
        s.quarantine_count = self.quarantine_count.get(&0, 0).map_err(map_err("lookup", "quarantine_count"))?;
        Ok(s)
    }
}

fn map_err(op: &'static str, map: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Map { op, map, source }
}

/// Removal of an absent key is success: the state wanted is reached.
fn absent_ok(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl MapWriter for BpfMaps {
    /// The endpoint's conntrack table first (fail closed: without one no flow of it is
    /// tracked), then the endpoint.
    fn prepare_endpoints(&mut self, values: &[EndpointInfo]) -> Result<(), MapsError> {
        let ids: Vec<u32> = values.iter().map(|v| v.endpoint_id).collect();
        conntrack::ensure_tables(&mut self.conntrack, std::os::fd::AsFd::as_fd(&self.conntrack_fd), &ids)
            .map_err(map_err("insert", "conntrack"))
    }
    fn reserve_conntrack(&mut self, ids: RangeInclusive<u32>) -> Result<(), MapsError> {
        let ids: Vec<u32> = ids.collect();
        conntrack::ensure_tables(&mut self.conntrack, std::os::fd::AsFd::as_fd(&self.conntrack_fd), &ids)
            .map_err(map_err("insert", "conntrack"))
    }
    fn set_endpoint(&mut self, ifindex: u32, value: &EndpointInfo) -> Result<(), MapsError> {
        conntrack::ensure_table(&mut self.conntrack, value.endpoint_id).map_err(map_err("insert", "conntrack"))?;
        self.endpoints.insert(ifindex, value, 0).map_err(map_err("insert", "endpoints"))
    }
    /// The endpoint, then its conntrack table: its connections end with it (issue 12.9).
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), MapsError> {
        let id = match self.endpoints.get(&ifindex, 0) {
            Ok(ep) => Some(ep.endpoint_id),
            Err(MapError::KeyNotFound) => None,
            Err(e) => return Err(map_err("lookup", "endpoints")(e)),
        };
        absent_ok(self.endpoints.remove(&ifindex)).map_err(map_err("remove", "endpoints"))?;
        match id {
            // Another interface still carrying the same endpoint id keeps the table.
            Some(id) if !self.endpoints.iter().any(|e| e.is_ok_and(|(_, v)| v.endpoint_id == id)) => {
                conntrack::remove_table(&mut self.conntrack, id).map_err(map_err("remove", "conntrack"))?;
                absent_ok(self.flow_budget.remove(&id)).map_err(map_err("remove", "flow_budget"))
            }
            _ => Ok(()),
        }
    }
    fn set_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8, value: &IpcacheValue) -> Result<(), MapsError> {
        let key = Key::new(u32::from(prefix_len), Ipv4Key { addr: addr.octets() });
        self.ipcache.insert(&key, value, 0).map_err(map_err("insert", "ipcache"))
    }
    fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8) -> Result<(), MapsError> {
        let key = Key::new(u32::from(prefix_len), Ipv4Key { addr: addr.octets() });
        absent_ok(self.ipcache.remove(&key)).map_err(map_err("remove", "ipcache"))
    }
    fn set_policy(&mut self, key: &PolicyKey, prefix_len: u32, value: &PolicyValue) -> Result<(), MapsError> {
        self.policy
            .insert(&Key::new(prefix_len, *key), value, 0)
            .map_err(map_err("insert", "policy"))
    }
    fn remove_policy(&mut self, key: &PolicyKey, prefix_len: u32) -> Result<(), MapsError> {
        absent_ok(self.policy.remove(&Key::new(prefix_len, *key))).map_err(map_err("remove", "policy"))
    }
    fn read_state(&self) -> Result<DatapathState, MapsError> {
        BpfMaps::read_state(self)
    }
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapsError> {
        self.services.insert(key, value, 0).map_err(map_err("insert", "services"))
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapsError> {
        absent_ok(self.services.remove(key)).map_err(map_err("remove", "services"))
    }
    fn set_backend(&mut self, id: u32, value: &Backend) -> Result<(), MapsError> {
        self.backends.insert(id, value, 0).map_err(map_err("insert", "backends"))
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), MapsError> {
        absent_ok(self.backends.remove(&id)).map_err(map_err("remove", "backends"))
    }
    fn set_rev_nat(&mut self, id: u32, value: &RevNat) -> Result<(), MapsError> {
        self.rev_nat.insert(id, value, 0).map_err(map_err("insert", "rev_nat"))
    }
    fn remove_rev_nat(&mut self, id: u32) -> Result<(), MapsError> {
        absent_ok(self.rev_nat.remove(&id)).map_err(map_err("remove", "rev_nat"))
    }
    fn set_quarantine(&mut self, addr: Ipv4Addr, value: u32) -> Result<(), MapsError> {
        let key = Ipv4Key { addr: addr.octets() };
        self.quarantine.insert(key, value, 0).map_err(map_err("insert", "quarantine"))
    }
    fn remove_quarantine(&mut self, addr: Ipv4Addr) -> Result<(), MapsError> {
        let key = Ipv4Key { addr: addr.octets() };
        absent_ok(self.quarantine.remove(&key)).map_err(map_err("remove", "quarantine"))
    }
    fn set_quarantine_count(&mut self, count: u32) -> Result<(), MapsError> {
        self.quarantine_count
            .set(0, count, 0)
            .map_err(map_err("update", "quarantine_count"))
    }
}

/// An in-memory [`MapWriter`] that records what the maps would hold.
#[derive(Debug, Default)]
pub struct MemoryMaps {
    /// The maps' contents.
    pub state: DatapathState,
    /// Every write, in order, for tests of ordering.
    pub log: Vec<String>,
}

impl MapWriter for MemoryMaps {
    fn reserve_conntrack(&mut self, ids: RangeInclusive<u32>) -> Result<(), MapsError> {
        self.log.push(format!("reserve conntrack {}..={}", ids.start(), ids.end()));
        Ok(())
    }
    fn set_endpoint(&mut self, ifindex: u32, value: &EndpointInfo) -> Result<(), MapsError> {
        self.log.push(format!("set endpoint {ifindex}"));
        self.state.endpoints.insert(ifindex, *value);
        Ok(())
    }
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), MapsError> {
        self.log.push(format!("remove endpoint {ifindex}"));
        self.state.endpoints.remove(&ifindex);
        Ok(())
    }
    fn set_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8, value: &IpcacheValue) -> Result<(), MapsError> {
        self.log.push(format!("set ipcache {addr}/{prefix_len}"));
        self.state.ipcache.insert((addr, prefix_len), *value);
        Ok(())
    }
    fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8) -> Result<(), MapsError> {
        self.log.push(format!("remove ipcache {addr}/{prefix_len}"));
        self.state.ipcache.remove(&(addr, prefix_len));
        Ok(())
    }
    fn set_policy(&mut self, key: &PolicyKey, prefix_len: u32, value: &PolicyValue) -> Result<(), MapsError> {
        self.log.push(format!("set policy {key:?}/{prefix_len}"));
        self.state.policy.insert((*key, prefix_len), *value);
        Ok(())
    }
    fn remove_policy(&mut self, key: &PolicyKey, prefix_len: u32) -> Result<(), MapsError> {
        self.log.push(format!("remove policy {key:?}/{prefix_len}"));
        self.state.policy.remove(&(*key, prefix_len));
        Ok(())
    }
    fn read_state(&self) -> Result<DatapathState, MapsError> {
        Ok(self.state.clone())
    }
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapsError> {
        self.log.push(format!(
            "set service {}:{}/{} slot {}",
            Ipv4Addr::from(key.vip),
            u16::from_be_bytes(key.dport),
            key.protocol,
            key.slot
        ));
        self.state.services.insert(*key, *value);
        Ok(())
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapsError> {
        self.log.push(format!(
            "remove service {}:{}/{} slot {}",
            Ipv4Addr::from(key.vip),
            u16::from_be_bytes(key.dport),
            key.protocol,
            key.slot
        ));
        self.state.services.remove(key);
        Ok(())
    }
    fn set_backend(&mut self, id: u32, value: &Backend) -> Result<(), MapsError> {
        self.log.push(format!("set backend {id}"));
        self.state.backends.insert(id, *value);
        Ok(())
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), MapsError> {
        self.log.push(format!("remove backend {id}"));
        self.state.backends.remove(&id);
        Ok(())
    }
    fn set_rev_nat(&mut self, id: u32, value: &RevNat) -> Result<(), MapsError> {
        self.log.push(format!("set rev_nat {id}"));
        self.state.rev_nat.insert(id, *value);
        Ok(())
    }
    fn remove_rev_nat(&mut self, id: u32) -> Result<(), MapsError> {
        self.log.push(format!("remove rev_nat {id}"));
        self.state.rev_nat.remove(&id);
        Ok(())
    }
    fn set_quarantine(&mut self, addr: Ipv4Addr, value: u32) -> Result<(), MapsError> {
        self.log.push(format!("set quarantine {addr}"));
        self.state.quarantine.insert(addr, value);
        Ok(())
    }
    fn remove_quarantine(&mut self, addr: Ipv4Addr) -> Result<(), MapsError> {
        self.log.push(format!("remove quarantine {addr}"));
        self.state.quarantine.remove(&addr);
        Ok(())
    }
    fn set_quarantine_count(&mut self, count: u32) -> Result<(), MapsError> {
        self.log.push(format!("set quarantine count {count}"));
        self.state.quarantine_count = count;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_common::{direction, proto, POLICY_PREFIX_FULL};

    fn state(endpoints: &[(u32, u32)], policies: &[(u32, u16, u32)]) -> DatapathState {
        let mut s = DatapathState::default();
        for &(ifindex, identity) in endpoints {
            s.endpoints.insert(
                ifindex,
                EndpointInfo {
                    endpoint_id: ifindex,
                    identity,
                    ..Default::default()
                },
            );
            s.ipcache
                .insert((Ipv4Addr::new(10, 0, 0, ifindex as u8), 32), IpcacheValue { identity, flags: 0 });
        }
        for &(ep, port, rule) in policies {
            let k = PolicyKey::new(ep, 0, direction::INGRESS, proto::TCP, port);
            s.policy.insert((k, POLICY_PREFIX_FULL), PolicyValue { rule_id: rule, flags: 0 });
        }
        s
    }

    #[test]
    fn sync_reaches_the_new_state_writing_only_the_difference() {
        let old = state(&[(1, 300), (2, 301)], &[(1, 80, 1), (1, 81, 2), (2, 80, 3)]);
        let new = state(&[(1, 300), (3, 302)], &[(1, 80, 1), (1, 81, 9), (3, 80, 4)]);
        let mut m = MemoryMaps {
            state: old.clone(),
            log: vec![],
        };
        let stats = sync(&mut m, &old, &new).unwrap();
        assert_eq!(m.state, new);
        // endpoint 3 + its ipcache, policy 1:81 changed, policy 3:80 new.
        assert_eq!(stats.upserts, 4);
        // endpoint 2 + its ipcache + its policy.
        assert_eq!(stats.removals, 3);
        assert_eq!(sync(&mut m, &new, &new).unwrap(), SyncStats::default());
    }

    /// One Service port 10.96.0.10:53/UDP with `backends` (ids) in slots 1.., each backend
    /// 10.0.1.<id>:5353.
    fn service(backends: &[u32]) -> DatapathState {
        let mut s = DatapathState::default();
        let vip = [10, 96, 0, 10];
        let header = ServiceValue {
            backend_count: backends.len() as u16,
            service_id: 5,
            ..Default::default()
        };
        s.services.insert(ServiceKey::new(vip, 53, proto::UDP, 0), header);
        let rev = RevNat {
            vip,
            port: 53u16.to_be_bytes(),
            _pad: [0; 2],
        };
        s.rev_nat.insert(5, rev);
        for (i, &id) in backends.iter().enumerate() {
            let slot = ServiceValue {
                backend_id: id,
                service_id: 5,
                ..Default::default()
            };
            s.services.insert(ServiceKey::new(vip, 53, proto::UDP, i as u16 + 1), slot);
            let b = Backend {
                ip: [10, 0, 1, id as u8],
                port: 5353u16.to_be_bytes(),
                ..Default::default()
            };
            s.backends.insert(id, b);
        }
        s
    }

    #[test]
    fn service_slots_are_written_before_their_header_and_backends_removed_last() {
        let three = service(&[1, 2, 3]);
        let mut m = MemoryMaps::default();
        sync(&mut m, &DatapathState::default(), &three).unwrap();
        assert_eq!(
            m.log,
            [
                "set backend 1",
                "set backend 2",
                "set backend 3",
                "set rev_nat 5",
                "set service 10.96.0.10:53/17 slot 1",
                "set service 10.96.0.10:53/17 slot 2",
                "set service 10.96.0.10:53/17 slot 3",
                "set service 10.96.0.10:53/17 slot 0",
            ]
        );
        // Backend 2 goes: 3 moves into slot 2 before the count shrinks, slot 3 and backend 2
        // go after it.
        let two = service(&[1, 3]);
        m.log.clear();
        sync(&mut m, &three, &two).unwrap();
        assert_eq!(
            m.log,
            [
                "set service 10.96.0.10:53/17 slot 2",
                "set service 10.96.0.10:53/17 slot 0",
                "remove service 10.96.0.10:53/17 slot 3",
                "remove backend 2",
            ]
        );
        assert_eq!(m.state, two);
        m.log.clear();
        sync(&mut m, &two, &DatapathState::default()).unwrap();
        assert_eq!(m.log.first().map(String::as_str), Some("remove service 10.96.0.10:53/17 slot 0"));
        assert_eq!(m.log.last().map(String::as_str), Some("remove rev_nat 5"));
    }

    #[test]
    fn writers_without_service_maps_fail_loudly() {
        struct Old;
        impl MapWriter for Old {
            fn set_endpoint(&mut self, _: u32, _: &EndpointInfo) -> Result<(), MapsError> {
                Ok(())
            }
            fn remove_endpoint(&mut self, _: u32) -> Result<(), MapsError> {
                Ok(())
            }
            fn set_ipcache(&mut self, _: Ipv4Addr, _: u8, _: &IpcacheValue) -> Result<(), MapsError> {
                Ok(())
            }
            fn remove_ipcache(&mut self, _: Ipv4Addr, _: u8) -> Result<(), MapsError> {
                Ok(())
            }
            fn set_policy(&mut self, _: &PolicyKey, _: u32, _: &PolicyValue) -> Result<(), MapsError> {
                Ok(())
            }
            fn remove_policy(&mut self, _: &PolicyKey, _: u32) -> Result<(), MapsError> {
                Ok(())
            }
            fn read_state(&self) -> Result<DatapathState, MapsError> {
                Ok(DatapathState::default())
            }
        }
        let err = sync(&mut Old, &DatapathState::default(), &service(&[1])).unwrap_err();
        assert!(matches!(err, MapsError::Unsupported { map: "backends" }), "{err}");
    }

    /// A writer that fails every write after the first `ok` ones.
    struct FailAfter {
        inner: MemoryMaps,
        ok: usize,
    }

    impl FailAfter {
        fn step(&mut self) -> Result<(), MapsError> {
            if self.ok == 0 {
                return Err(MapsError::Unsupported { map: "test" });
            }
            self.ok -= 1;
            Ok(())
        }
    }

    impl MapWriter for FailAfter {
        fn set_endpoint(&mut self, i: u32, v: &EndpointInfo) -> Result<(), MapsError> {
            self.step()?;
            self.inner.set_endpoint(i, v)
        }
        fn remove_endpoint(&mut self, i: u32) -> Result<(), MapsError> {
            self.step()?;
            self.inner.remove_endpoint(i)
        }
        fn set_ipcache(&mut self, a: Ipv4Addr, l: u8, v: &IpcacheValue) -> Result<(), MapsError> {
            self.step()?;
            self.inner.set_ipcache(a, l, v)
        }
        fn remove_ipcache(&mut self, a: Ipv4Addr, l: u8) -> Result<(), MapsError> {
            self.step()?;
            self.inner.remove_ipcache(a, l)
        }
        fn set_policy(&mut self, k: &PolicyKey, l: u32, v: &PolicyValue) -> Result<(), MapsError> {
            self.step()?;
            self.inner.set_policy(k, l, v)
        }
        fn remove_policy(&mut self, k: &PolicyKey, l: u32) -> Result<(), MapsError> {
            self.step()?;
            self.inner.remove_policy(k, l)
        }
        fn read_state(&self) -> Result<DatapathState, MapsError> {
            self.inner.read_state()
        }
    }

    #[test]
    fn a_delta_writes_only_its_keys_in_the_full_syncs_order() {
        let old = state(&[(1, 300), (2, 301)], &[(1, 80, 1), (1, 81, 2), (2, 80, 3)]);
        let new = state(&[(1, 300), (3, 302)], &[(1, 80, 1), (1, 81, 9), (3, 80, 4)]);
        let delta = DatapathDelta::between(&old, &new);
        let mut full = MemoryMaps {
            state: old.clone(),
            log: vec![],
        };
        let full_stats = sync(&mut full, &old, &new).unwrap();
        let mut m = MemoryMaps {
            state: old.clone(),
            log: vec![],
        };
        let stats = sync_delta(&mut m, &delta).unwrap();
        assert_eq!(m.state, new);
        assert_eq!(stats, full_stats);
        assert_eq!(m.log, full.log, "same writes in the same order as the full diff");
        assert_eq!(m.log.first().map(String::as_str), Some("remove endpoint 2"));
        let set_3 = m.log.iter().position(|l| l == "set endpoint 3").unwrap();
        assert!(m.log[..set_3].iter().any(|l| l.starts_with("set policy")), "{:?}", m.log);
        // An empty delta writes nothing.
        m.log.clear();
        assert_eq!(sync_delta(&mut m, &DatapathDelta::default()).unwrap(), SyncStats::default());
        assert!(m.log.is_empty());
    }

    #[test]
    fn a_failed_delta_write_stops_and_the_maps_tell_what_they_hold() {
        let old = state(&[(1, 300)], &[(1, 80, 1)]);
        let new = state(&[(1, 300), (3, 302)], &[(1, 80, 1), (3, 80, 4)]);
        let delta = DatapathDelta::between(&old, &new);
        let mut w = FailAfter {
            inner: MemoryMaps {
                state: old.clone(),
                log: vec![],
            },
            ok: 1,
        };
        sync_delta(&mut w, &delta).unwrap_err();
        assert_eq!(w.inner.log.len(), 1, "no write after the failed one: {:?}", w.inner.log);
        let held = w.read_state().unwrap();
        assert_ne!(held, new);
        assert!(
            !held.endpoints.contains_key(&3),
            "the endpoint is written last, so it is not in yet"
        );
        // Resyncing from what the maps hold reaches the new state.
        w.ok = usize::MAX;
        sync(&mut w, &held, &new).unwrap();
        assert_eq!(w.inner.state, new);
    }

    #[test]
    fn endpoints_appear_after_their_policy_and_leave_before_it() {
        let empty = DatapathState::default();
        let full = state(&[(7, 300)], &[(7, 80, 1)]);
        let mut m = MemoryMaps::default();
        sync(&mut m, &empty, &full).unwrap();
        assert_eq!(m.log.last().map(String::as_str), Some("set endpoint 7"));
        m.log.clear();
        sync(&mut m, &full, &empty).unwrap();
        assert_eq!(m.log.first().map(String::as_str), Some("remove endpoint 7"));
    }
}
