//! What is learnt about one workload, as it is saved: the peers and ports it was seen with
//! (each direction), and its rates.
//!
//! Everything here is plain data with serde, so the saved file is the model itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A rate learnt from closed 10 s buckets, scaled to per minute.
///
/// While the workload learns, `mean` and `dev` are plain averages of every bucket; after,
/// an exponentially weighted average (half-life [`super::RATE_HALF_LIFE_SECS`]) of the
/// buckets that were not anomalous, so a gradual change is absorbed and one event is not.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    /// Mean per minute.
    pub mean: f64,
    /// Mean absolute deviation from `mean`, per minute.
    pub dev: f64,
    /// Buckets learnt.
    pub samples: u64,
}

impl Rate {
    /// The value per minute above which the rate is anomalous (score 1.0 there).
    pub fn threshold(&self, factor: f64, floor: f64) -> f64 {
        (factor * (self.mean + self.dev)).max(floor)
    }

    /// Learns one closed bucket's value; `alpha` is the weight of a new value once the
    /// learning window is over (`None` while learning: a plain average).
    pub fn learn(&mut self, value: f64, alpha: Option<f64>) {
        self.samples = self.samples.saturating_add(1);
        let average = 1.0 / self.samples as f64;
        let a = alpha.map_or(average, |a| a.max(average));
        let deviation = (value - self.mean).abs();
        self.mean += a * (value - self.mean);
        self.dev += a * (deviation - self.dev);
    }
}

/// When something (a peer, a port) was seen, and whether it is part of the baseline.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// First seen, Unix seconds.
    pub first: i64,
    /// Last seen, Unix seconds.
    pub last: i64,
    /// Distinct minutes it was seen in.
    pub minutes: u32,
    /// Part of the baseline: seen while learning, or since in enough distinct minutes.
    pub learnt: bool,
}

impl Seen {
    /// A first sighting at `secs`.
    pub fn new(secs: i64, learnt: bool) -> Self {
        Seen {
            first: secs,
            last: secs,
            minutes: 1,
            learnt,
        }
    }

    /// Another sighting; learnt when `learning` or once seen in `promote` distinct minutes.
    pub fn touch(&mut self, secs: i64, learning: bool, promote: u32) {
        if secs.div_euclid(60) != self.last.div_euclid(60) {
            self.minutes = self.minutes.saturating_add(1);
        }
        self.last = self.last.max(secs);
        self.learnt |= learning || self.minutes >= promote;
    }
}

/// A peer and the ports used with it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSeen {
    /// The peer itself.
    pub seen: Seen,
    /// `PORT/PROTOCOL` (the server's port) → when.
    pub ports: BTreeMap<String, Seen>,
}

/// Everything learnt about one workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// The namespace.
    pub namespace: String,
    /// The workload's selector (the advisor's grouping).
    pub selector: BTreeMap<String, String>,
    /// Its short name.
    pub name: String,
    /// When its first flow was seen, Unix seconds: it learns until `first + learning`.
    pub first: i64,
    /// Peers it opened connections to: `workload:NS/SELECTOR` or `cidr:A.B.C.0/24`.
    #[serde(default)]
    pub egress: BTreeMap<String, PeerSeen>,
    /// Peers that opened connections to it.
    #[serde(default)]
    pub ingress: BTreeMap<String, PeerSeen>,
    /// Namespaces it opened connections to.
    #[serde(default)]
    pub namespaces: BTreeMap<String, Seen>,
    /// New connections it opened per minute.
    #[serde(default)]
    pub connections: Rate,
    /// Distinct (peer, port) targets per minute, denied ones weighted.
    #[serde(default)]
    pub fanout: Rate,
    /// Bytes it sent outside the cluster per minute.
    #[serde(default)]
    pub external_bytes: Rate,
}

/// The saved file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// Format version (1).
    pub version: u32,
    /// Every workload's baseline.
    pub workloads: Vec<Baseline>,
}

/// The file format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Inserts `key` into `map` unless it is full; when full, first forgets the entry seen
/// longest ago that is not learnt (a learnt entry is never evicted by a flood of new
/// ones). Returns whether the key is (now) in the map.
pub fn insert_bounded<V>(
    map: &mut BTreeMap<String, V>,
    key: &str,
    cap: usize,
    value: impl FnOnce() -> V,
    seen: impl Fn(&V) -> &Seen,
) -> bool {
    if map.contains_key(key) {
        return true;
    }
    if map.len() >= cap {
        let victim = map
            .iter()
            .filter(|(_, v)| !seen(v).learnt)
            .min_by_key(|(_, v)| seen(v).last)
            .map(|(k, _)| k.clone());
        match victim {
            Some(k) => {
                map.remove(&k);
            }
            None => return false,
        }
    }
    map.insert(key.to_string(), value());
    true
}
