//! The per-endpoint conntrack tables (issue 12.4): one LRU per endpoint in a hash of maps
//! keyed by endpoint id, so a pod churning new flows evicts only its own entries.
//!
//! # Why tables of their own
//!
//! With one shared LRU for the node, any pod — even one isolated both ways, since its node is
//! always allowed — could open new UDP flows to its node faster than anything else and push
//! every other pod's idle entries out; their replies then dropped as `policy_denied`
//! (`controller/tests/fairness.rs`: 2000 of 2000 idle victim flows gone after 294 912 flows from one pod,
//! sent twice each; once each, the kernel's LRU still lets 7 go). What was weighed:
//!
//! - *Short lifetimes for unconfirmed flows* (Cilium's 60 s SYN and non-TCP lifetimes, its
//!   agent-side GC): they shorten how long garbage stays, but an LRU evicts by recency, not by
//!   expiry, and a flood refills faster than any GC; an attacker who replies to itself
//!   confirms its flows anyway.
//! - *A per-endpoint budget in the shared table*: an LRU evicts without telling anyone, so a
//!   count of each endpoint's live entries cannot be kept; a plain hash with counts needs the
//!   agent to collect garbage, so a busy pod would run out of entries while the agent is away.
//! - *A table per endpoint* (as Cilium's per-endpoint CT maps did): eviction stays inside
//!   the pod that caused it, with nothing to count and nothing for the agent to collect. The
//!   cost per packet is one more hash lookup (the endpoint's table, once per packet), and
//!   removing an endpoint's table ends its connections with it. The price is memory: LRU
//!   maps are preallocated, 8192 entries of about 120 bytes (layout 3, with byte counts),
//!   1 MB per endpoint (110 pods: 108 MB, about what Cilium's default global tables take).
//!
//! # Lifecycle and upgrades
//!
//! The agent creates an endpoint's table before it writes the endpoint entry and removes it
//! after the endpoint entry. Packets of an endpoint without a table match nothing and open
//! nothing (`ct_insert_failed`): fail closed. A starting agent gives every endpoint already in
//! the pinned endpoint map a table, and copies the entries of the layout-1 shared table
//! (`bh_ct_v1`) and of the layout-2 per-endpoint tables (`bh_ct_v2`, the same tables without
//! byte counts), if pinned, into their endpoints' tables ([`adopt`]); the copies count bytes
//! from 0. Programs attached by the older agent keep running on the old tables until theirs
//! are replaced; entries they add after the copy are not seen by the new programs: such a
//! flow meets policy again (closed, never open). The shared layout-1 table is left pinned (as
//! before); the layout-2 tables are unpinned once copied, since every entry they held is now
//! in a pinned layout-3 table and the programs still using them hold them open themselves.
//! An old table that cannot be read (another type, another entry size) is an error: the
//! agent does not start on conntrack it could not adopt.

use std::collections::HashMap as StdHashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use aya::maps::{HashMap, HashOfMaps, Map, MapData, MapError};
use aya::sys::SyscallError;
use bulkhead_common::{capacity, direction, CtEntry, CtEntryV2, CtKey, EndpointInfo};

/// The outer map: endpoint id → that endpoint's table.
pub type Tables = HashOfMaps<MapData, u32, MapData>;

/// `BPF_MAP_TYPE_LRU_HASH` (uapi/linux/bpf.h).
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
/// `BPF_MAP_CREATE` (uapi/linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
/// `BPF_NOEXIST`: insert only when the key is absent.
const BPF_NOEXIST: u64 = 1;

/// The head of `union bpf_attr` for `BPF_MAP_CREATE`; the kernel zero-fills what a shorter
/// attribute leaves out (`bpf_check_uarg_tail_zero`).
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// Creates an empty endpoint table, of the inner map's exact type, key, value and size (the
/// kernel refuses to store a map that differs from the template in the outer map).
///
/// aya 0.14 creates standalone maps of a few types only (no LRU hash), hence the syscall.
pub fn create_table() -> Result<MapData, MapError> {
    let mut map_name = [0u8; 16];
    map_name[..9].copy_from_slice(b"bh_ct_ep\0");
    let attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_LRU_HASH,
        key_size: size_of::<CtKey>() as u32,
        value_size: size_of::<CtEntry>() as u32,
        max_entries: capacity::CONNTRACK_PER_ENDPOINT,
        map_flags: 0,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
    };
    // SAFETY: `attr` is a valid, initialised prefix of `union bpf_attr` and outlives the call;
    // the size passed is its own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            std::ptr::from_ref(&attr),
            size_of::<MapCreateAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(MapError::SyscallError(SyscallError {
            call: "bpf_map_create",
            io_error: std::io::Error::last_os_error(),
        }));
    }
    let fd = i32::try_from(fd).map_err(|_| {
        MapError::SyscallError(SyscallError {
            call: "bpf_map_create",
            io_error: std::io::Error::from_raw_os_error(libc::EBADF),
        })
    })?;
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    MapData::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Gives `endpoint_id` a table unless it has one (an endpoint updated in place keeps its
/// connections).
pub fn ensure_table(tables: &mut Tables, endpoint_id: u32) -> Result<(), MapError> {
    match tables.get(&endpoint_id, 0) {
        Ok(_) => return Ok(()),
        Err(MapError::KeyNotFound) => {}
        Err(e) => return Err(e),
    }
    let table = create_table()?;
    match tables.insert(endpoint_id, &table, BPF_NOEXIST) {
        // Someone (another handle on the pins) was first: theirs is as good.
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// `BPF_MAP_UPDATE_BATCH` (uapi/linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Gives each of `endpoint_ids` that has none a table, storing them all with one
/// `BPF_MAP_UPDATE_BATCH` on `outer` (the fd of the `tables` map): the kernel waits for an
/// RCU grace period after every map-in-map update syscall (10–30 ms here), so a burst of
/// ADDs pays it once instead of once per endpoint. A kernel without batch updates for the
/// map gets them one by one.
pub fn ensure_tables(tables: &mut Tables, outer: BorrowedFd<'_>, endpoint_ids: &[u32]) -> Result<(), MapError> {
    let mut missing = Vec::new();
    for &id in endpoint_ids {
        match tables.get(&id, 0) {
            Ok(_) => {}
            Err(MapError::KeyNotFound) => missing.push(id),
            Err(e) => return Err(e),
        }
    }
    missing.sort_unstable();
    missing.dedup();
    if missing.len() < 2 {
        return missing.iter().try_for_each(|&id| ensure_table(tables, id));
    }
    let created = create_tables(missing.len())?;
    let fds: Vec<u32> = created
        .iter()
        .map(|t| u32::try_from(t.fd().as_fd().as_raw_fd()).unwrap_or(u32::MAX))
        .collect();
    let attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: missing.as_ptr() as u64,
        values: fds.as_ptr() as u64,
        count: u32::try_from(missing.len()).unwrap_or(u32::MAX),
        map_fd: u32::try_from(outer.as_raw_fd()).unwrap_or(u32::MAX),
        elem_flags: BPF_NOEXIST,
        flags: 0,
    };
    // SAFETY: `attr` is a valid `batch` member of `union bpf_attr`; `keys` and `values` point
    // at `count` u32 each, alive for the call; the size passed is the struct's own.
    let done = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            std::ptr::from_ref(&attr),
            size_of::<BatchAttr>() as u32,
        )
    };
    if done == 0 {
        return Ok(());
    }
    // Unsupported, or one key taken meanwhile: what is missing still goes in one by one
    // (`ensure_table` skips what the batch stored).
    drop(created);
    missing.iter().try_for_each(|&id| ensure_table(tables, id))
}

/// `n` empty tables. Each is a preallocated LRU (≈ 3 ms of `BPF_MAP_CREATE` here, most of a
/// burst's commit: issue 13), so a large burst creates them on as many threads as there are
/// CPUs; the kernel allocates each independently.
fn create_tables(n: usize) -> Result<Vec<MapData>, MapError> {
    const PER_THREAD_MIN: usize = 8;
    let threads = std::thread::available_parallelism()
        .map_or(1, |p| p.get())
        .min(n / PER_THREAD_MIN)
        .max(1);
    if threads == 1 {
        return (0..n).map(|_| create_table()).collect();
    }
    let chunk = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let count = chunk.min(n - (t * chunk).min(n));
                scope.spawn(move || (0..count).map(|_| create_table()).collect::<Result<Vec<MapData>, _>>())
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for w in workers {
            // A panic cannot happen in `create_table` (no unwrap); treat one as a failed create.
            let tables = w.join().unwrap_or_else(|_| {
                Err(MapError::SyscallError(SyscallError {
                    call: "bpf_map_create",
                    io_error: std::io::Error::other("table-creating thread panicked"),
                }))
            })?;
            all.extend(tables);
        }
        Ok(all)
    })
}

/// Removes `endpoint_id`'s table and with it every connection it tracked; absent is done.
pub fn remove_table(tables: &mut Tables, endpoint_id: u32) -> Result<(), MapError> {
    match tables.remove(&endpoint_id) {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// An endpoint's table, opened (a new file descriptor each call).
pub fn table(tables: &Tables, endpoint_id: u32) -> Result<HashMap<MapData, CtKey, CtEntry>, MapError> {
    let inner: MapData = tables.get(&endpoint_id, 0)?;
    HashMap::try_from(Map::from_map_data(inner)?)
}

/// Entries in every endpoint's table (one syscall per entry; tables removed meanwhile are
/// skipped).
pub fn count_entries(tables: &Tables) -> Result<u64, MapError> {
    let mut n = 0u64;
    for id in tables.keys() {
        let Ok(id) = id else { break };
        let Ok(t) = table(tables, id) else { continue };
        n += t.keys().take_while(Result::is_ok).count() as u64;
    }
    Ok(n)
}

/// What [`adopt`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    /// Tables created for endpoints that had none (pinned by an older agent).
    pub tables_created: usize,
    /// Entries copied from the layout-1 shared table and the layout-2 tables.
    pub entries_copied: usize,
    /// Entries of the shared table no local endpoint owns (left where they are), and
    /// layout-2 tables of endpoints no longer local (left to go with their pin).
    pub entries_orphaned: usize,
}

/// `CLOCK_MONOTONIC` now, the datapath's clock (`bpf_ktime_get_coarse_ns` reads it too).
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|ts| u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec()).unwrap_or(0))
        .unwrap_or(0)
}

/// Inserts `entry` under `key` unless the table holds it (a newer entry); whether it did.
fn copy_entry(t: &mut HashMap<MapData, CtKey, CtEntry>, key: CtKey, entry: CtEntry) -> Result<bool, MapError> {
    match t.insert(key, entry, BPF_NOEXIST) {
        Ok(()) => Ok(true),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives every endpoint in `endpoints` a table, then copies the layout-1 shared table pinned
/// at `v1` and the layout-2 tables pinned at `v2` (if any) into them, counts from 0: an
/// entry of the shared table belongs to the endpoint whose address is its local end (the
/// source of an egress entry, the destination of an ingress one), a layout-2 table to its
/// endpoint id. Entries a table already holds are kept (they are newer). The shared table
/// is left pinned (programs attached by an older agent still use it); the layout-2 pin is
/// removed once everything in it is copied. An old map that cannot be read as what its name
/// says is an error, never taken for empty.
pub fn adopt(tables: &mut Tables, endpoints: &[EndpointInfo], v1: &Path, v2: &Path) -> Result<Adopted, MapError> {
    let mut done = Adopted::default();
    for ep in endpoints {
        if matches!(tables.get(&ep.endpoint_id, 0), Err(MapError::KeyNotFound)) {
            ensure_table(tables, ep.endpoint_id)?;
            done.tables_created += 1;
        }
    }
    let now = monotonic_ns();
    if v2.exists() {
        adopt_v2(tables, endpoints, v2, now, &mut done)?;
    }
    if !v1.exists() {
        return Ok(done);
    }
    let old: HashMap<MapData, CtKey, CtEntryV2> = HashMap::try_from(Map::from_map_data(MapData::from_pin(v1)?)?)?;
    let by_ip: StdHashMap<[u8; 4], u32> = endpoints.iter().map(|e| (e.ipv4, e.endpoint_id)).collect();
    let mut opened: StdHashMap<u32, HashMap<MapData, CtKey, CtEntry>> = StdHashMap::new();
    for item in old.iter() {
        // An entry evicted while walking ends the walk early: what is left is still copied
        // by the next start, and a missing entry fails closed (its flow meets policy again).
        let Ok((key, entry)) = item else { break };
        let local = if key.direction == direction::EGRESS { key.saddr } else { key.daddr };
        let Some(&id) = by_ip.get(&local) else {
            done.entries_orphaned += 1;
            continue;
        };
        let t = match opened.entry(id) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(table(tables, id)?),
        };
        if copy_entry(t, key, CtEntry::from_v2(entry, now))? {
            done.entries_copied += 1;
        }
    }
    Ok(done)
}

/// Copies the layout-2 tables pinned at `v2` (endpoint id → table of [`CtEntryV2`]) into
/// the local endpoints' tables, then unpins them.
fn adopt_v2(tables: &mut Tables, endpoints: &[EndpointInfo], v2: &Path, now: u64, done: &mut Adopted) -> Result<(), MapError> {
    let old: HashOfMaps<MapData, u32, MapData> = HashOfMaps::try_from(Map::from_map_data(MapData::from_pin(v2)?)?)?;
    let ids: Vec<u32> = old.keys().collect::<Result<_, _>>()?;
    for id in ids {
        let inner: HashMap<MapData, CtKey, CtEntryV2> = match old.get(&id, 0) {
            Ok(inner) => HashMap::try_from(Map::from_map_data(inner)?)?,
            // Removed meanwhile (its endpoint went away): nothing to keep.
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(e),
        };
        if !endpoints.iter().any(|e| e.endpoint_id == id) {
            done.entries_orphaned += inner.keys().take_while(Result::is_ok).count();
            continue;
        }
        let mut t = table(tables, id)?;
        for item in inner.iter() {
            // As for the shared table: an entry evicted while walking ends the walk; a
            // missing entry fails closed.
            let Ok((key, entry)) = item else { break };
            if copy_entry(&mut t, key, CtEntry::from_v2(entry, now))? {
                done.entries_copied += 1;
            }
        }
    }
    std::fs::remove_file(v2).map_err(|io_error| {
        MapError::SyscallError(SyscallError {
            call: "unlink bh_ct_v2",
            io_error,
        })
    })
}
