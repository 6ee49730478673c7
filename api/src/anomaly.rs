//! Behavioural anomalies (a relay learns each workload's baseline and reports what deviates
//! from it), quarantine, and the forensics bundle of one pod.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::flow::{time_text, Flow, PolicyName};
use crate::name::{self, NamespacedName};

/// What kind of deviation from a workload's baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// The workload talked to a peer workload (or namespace) it never talked to.
    NewPeer,
    /// The workload used a port/protocol with a known peer it never used.
    NewPort,
    /// An outside destination outside every learnt aggregate.
    NewExternal,
    /// Fan-out (distinct peers and ports per minute) far above the baseline.
    Scan,
    /// Bytes to the outside far above the baseline.
    Exfiltration,
}

impl AnomalyKind {
    /// Every kind.
    pub const ALL: [AnomalyKind; 5] = [
        AnomalyKind::NewPeer,
        AnomalyKind::NewPort,
        AnomalyKind::NewExternal,
        AnomalyKind::Scan,
        AnomalyKind::Exfiltration,
    ];

    /// The stable name (metrics label, CLI, JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::NewPeer => "new_peer",
            AnomalyKind::NewPort => "new_port",
            AnomalyKind::NewExternal => "new_external",
            AnomalyKind::Scan => "scan",
            AnomalyKind::Exfiltration => "exfiltration",
        }
    }
}

impl std::fmt::Display for AnomalyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AnomalyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AnomalyKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown anomaly kind {s:?} (one of new_peer, new_port, new_external, scan, exfiltration)"))
    }
}

/// One anomaly, as `bulkhead observe --anomalies -o json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Anomaly {
    /// When it was detected.
    #[serde(with = "time_text")]
    pub time: jiff::Timestamp,
    /// What kind.
    pub kind: AnomalyKind,
    /// How far from the baseline: 1.0 is the reporting threshold, higher is worse.
    pub score: f64,
    /// The workload's namespace.
    pub namespace: String,
    /// The workload (the advisor's grouping by owner labels).
    pub workload: String,
    /// The pod that did it, when one did.
    #[serde(default, with = "name::opt_text", skip_serializing_if = "Option::is_none")]
    pub pod: Option<NamespacedName>,
    /// A sentence for a person: what was seen against what was learnt.
    pub explanation: String,
    /// The flows that triggered it (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flows: Vec<Flow>,
    /// What the relay's automatic response did about it, e.g. `quarantine requested for
    /// x/a` or `would quarantine x/a (dry run)`; absent when it did nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
}

/// What `Request::Anomalies` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnomalyRequest {
    /// Only this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Only anomalies of this pod.
    #[serde(default, with = "name::opt_text", skip_serializing_if = "Option::is_none")]
    pub pod: Option<NamespacedName>,
    /// Only these kinds (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<AnomalyKind>,
    /// Only anomalies at or after this Unix time, in nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Keep the connection open and stream new anomalies as they come.
    #[serde(default)]
    pub follow: bool,
}

/// A pod's quarantine, as an agent holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineInfo {
    /// Since when.
    #[serde(with = "time_text")]
    pub since: jiff::Timestamp,
    /// Why (the command's `--reason`, the label, or the automatic response's anomaly).
    pub reason: String,
    /// Who set it: `command`, `label` or `auto`.
    pub by: String,
}

/// Everything kept about one pod: `bulkhead forensics NS/POD -o json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForensicsBundle {
    /// The pod.
    #[serde(with = "name::text")]
    pub pod: NamespacedName,
    /// Its labels when last seen.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its address when last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::Ipv4Addr>,
    /// The node it ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When it was deleted, if it was.
    #[serde(default, with = "opt_time", skip_serializing_if = "Option::is_none")]
    pub deleted: Option<jiff::Timestamp>,
    /// Its quarantine, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<QuarantineInfo>,
    /// The policies that selected it (ingress or egress) when last seen.
    #[serde(default)]
    pub policies: Vec<PolicyName>,
    /// Its flows, oldest first (live history and what was kept on disk).
    #[serde(default)]
    pub flows: Vec<Flow>,
    /// Its anomalies (from the relay, when one was reachable).
    #[serde(default)]
    pub anomalies: Vec<Anomaly>,
}

/// Serde for an optional [`time_text`] time.
pub mod opt_time {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the time (callers skip `None`).
    pub fn serialize<S: Serializer>(t: &Option<jiff::Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::time_text::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    /// Reads an RFC 3339 time or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<jiff::Timestamp>, D::Error> {
        let text = Option::<std::borrow::Cow<str>>::deserialize(d)?;
        text.map(|t| t.parse().map_err(serde::de::Error::custom)).transpose()
    }
}
