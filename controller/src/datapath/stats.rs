//! Datapath counters read straight from the pinned maps, for metrics at scrape time.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray};
use bulkhead_common::{counter_index, direction, map_names, Counter, CtEntry, CtKey, DropReason};

/// A pinned datapath map could not be opened or read.
#[derive(Debug, thiserror::Error)]
#[error("{op} pinned map {path}")]
pub struct StatsError {
    /// What was attempted.
    pub op: &'static str,
    /// The pin path.
    pub path: PathBuf,
    /// Cause.
    #[source]
    pub source: Box<MapError>,
}

/// What the metrics read from the kernel at scrape time.
pub trait DatapathStats: Send + Sync {
    /// Packets and bytes of every (reason, direction) slot, summed over CPUs.
    fn counters(&self) -> Result<Vec<(DropReason, u8, Counter)>, StatsError>;
    /// Entries in the conntrack map.
    fn conntrack_entries(&self) -> Result<u64, StatsError>;
    /// Flow events the ring buffer could not take, summed over CPUs.
    fn flow_events_lost(&self) -> Result<u64, StatsError>;
}

/// [`DatapathStats`] over the maps pinned in an agent's bpffs directory.
///
/// It opens its own handles on the pins so that a scrape never waits for the agent's lock.
pub struct PinnedStats {
    counters: PerCpuArray<MapData, Counter>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    flows_lost: PerCpuArray<MapData, u64>,
}

impl PinnedStats {
    /// Opens the counters, conntrack and lost-flow-events maps pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, StatsError> {
        let open = |name: &str| {
            let path = pin_dir.join(name);
            let err = |op| {
                let path = path.clone();
                move |source| StatsError {
                    op,
                    path,
                    source: Box::new(source),
                }
            };
            MapData::from_pin(&path)
                .and_then(Map::from_map_data)
                .map_err(err("open"))
                .map(|m| (m, err("type-check")))
        };
        let (counters, err) = open(map_names::COUNTERS)?;
        let counters = PerCpuArray::try_from(counters).map_err(err)?;
        let (conntrack, err) = open(map_names::CONNTRACK)?;
        let conntrack = HashMap::try_from(conntrack).map_err(err)?;
        let (flows_lost, err) = open(map_names::FLOWS_LOST)?;
        let flows_lost = PerCpuArray::try_from(flows_lost).map_err(err)?;
        Ok(PinnedStats {
            counters,
            conntrack,
            flows_lost,
        })
    }

    fn read_err(name: &'static str) -> impl Fn(MapError) -> StatsError {
        move |source| StatsError {
            op: "read",
            path: PathBuf::from(name),
            source: Box::new(source),
        }
    }
}

impl DatapathStats for PinnedStats {
    fn counters(&self) -> Result<Vec<(DropReason, u8, Counter)>, StatsError> {
        let mut out = Vec::with_capacity(DropReason::ALL.len() * 2);
        for dir in [direction::INGRESS, direction::EGRESS] {
            for reason in DropReason::ALL {
                let per_cpu = self
                    .counters
                    .get(&counter_index(reason, dir), 0)
                    .map_err(Self::read_err(map_names::COUNTERS))?;
                let sum = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                    packets: acc.packets.wrapping_add(c.packets),
                    bytes: acc.bytes.wrapping_add(c.bytes),
                });
                out.push((reason, dir, sum));
            }
        }
        Ok(out)
    }

    /// Walks the keys: one syscall per entry, about 0.3 s for a full map of 262144, which a
    /// scrape every 15 s or more affords; the kernel keeps no element count for hash maps.
    fn conntrack_entries(&self) -> Result<u64, StatsError> {
        let mut n = 0u64;
        for key in self.conntrack.keys() {
            // An entry evicted while walking ends the walk early; the count is then a
            // slight underestimate, which a gauge tolerates.
            if key.is_err() {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    fn flow_events_lost(&self) -> Result<u64, StatsError> {
        let per_cpu = self.flows_lost.get(&0, 0).map_err(Self::read_err(map_names::FLOWS_LOST))?;
        Ok(per_cpu.iter().fold(0u64, |acc, v| acc.wrapping_add(*v)))
    }
}
