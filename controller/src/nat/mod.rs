//! Masquerade for pod traffic leaving the cluster, through the kernel's NAT (nftables).
//!
//! The agent owns one nftables table, [`TABLE`] in the `inet` family, and nothing else in
//! the node's ruleset. Its `postrouting` NAT chain rewrites the source of packets from a
//! cluster CIDR to the outgoing interface's address, unless they go to the cluster itself,
//! to a `nonMasqueradeCIDRs` network or to a node's InternalIP:
//!
//! ```text
//! ip saddr @cluster ip daddr != @cluster ip daddr != @nomasq ip daddr != @nodes masquerade fully-random
//! ```
//!
//! A second chain, after every srcnat chain, sets [`SNAT_MARK`] on each packet of a
//! connection the node source-NATed (whoever did: kube-proxy for a NodePort, this table):
//!
//! ```text
//! ct direction original ct status snat meta mark set meta mark | 0x1000
//! ```
//!
//! so that the datapath can tell such traffic to a pod from what the node itself sends:
//! kube-proxy's own mark is cleared before the packet reaches TC (see `bulkhead_common`).
//!
//! Replies find their way back to the pod through the connection's conntrack entry. The
//! table is written as one `nft -j -f -` transaction that deletes and re-adds it, so a
//! reader never sees a half-written table. `nft` acts in the network namespace of the
//! thread that calls it: run these functions inside the node's namespace.
//!
//! [`masquerade_ruleset`] is the pure part (the JSON the kernel gets); [`Masquerade`] applies it.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};

use bulkhead_common::SNAT_MARK;
use ipnetwork::Ipv4Network;
use nftables::batch::Batch;
use nftables::expr::{BinaryOperation, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, CT};
use nftables::schema::{Chain, NfListObject, NfObject, Nftables, Rule, Set, SetFlag, SetType, SetTypeValue, Table};
use nftables::stmt::{Mangle, Match, NATFlag, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

#[cfg(test)]
mod tests;

/// The name of the agent's own nftables table (family `inet`).
pub const TABLE: &str = "bulkhead";
/// The table's NAT chain on the postrouting hook.
pub const CHAIN: &str = "postrouting";
/// Set of the cluster's pod CIDRs: masqueraded sources, and destinations that never are.
pub const SET_CLUSTER: &str = "cluster";
/// Set of the `nonMasqueradeCIDRs`: destinations reached with the pod's own address.
pub const SET_NON_MASQUERADE: &str = "nomasq";
/// Set of every node's InternalIP: pod → node traffic keeps the pod's address.
pub const SET_NODES: &str = "nodes";
/// The table's chain that marks source-NATed packets, after every srcnat chain.
pub const MARK_CHAIN: &str = "snat_mark";
/// `srcnat`, the priority of NAT on the postrouting hook (nft(8), "CHAINS").
const SRCNAT_PRIORITY: i32 = 100;

/// What the masquerade table should say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MasqueradeConfig {
    /// The cluster's pod CIDRs (the `clusterCIDR`, configurable).
    pub cluster_cidrs: Vec<Ipv4Network>,
    /// Destinations that are not masqueraded (the `nonMasqueradeCIDRs` list).
    pub non_masquerade_cidrs: Vec<Ipv4Network>,
    /// Every node's InternalIP.
    pub node_ips: Vec<Ipv4Addr>,
}

/// A failure to read or write the masquerade table.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// `nft` could not be started or fed its input.
    #[error("run {program} to {op} table inet {table}")]
    Spawn {
        /// The `nft` executable.
        program: String,
        /// What the call was for.
        op: &'static str,
        /// The table.
        table: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `nft` ran and refused.
    #[error("{program} failed to {op} table inet {table} ({status}): {stderr}")]
    Failed {
        /// The `nft` executable.
        program: String,
        /// What the call was for.
        op: &'static str,
        /// The table.
        table: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it said, trimmed.
        stderr: String,
    },
    /// The ruleset could not be encoded, or `nft`'s answer decoded, as JSON.
    #[error("json for {op} table inet {table}")]
    Json {
        /// What the call was for.
        op: &'static str,
        /// The table.
        table: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// The agent's masquerade table in the calling thread's network namespace.
#[derive(Clone, Debug)]
pub struct Masquerade {
    table: String,
    nft: PathBuf,
}

impl Default for Masquerade {
    fn default() -> Self {
        Masquerade::new()
    }
}

impl Masquerade {
    /// The table [`TABLE`], written with the `nft` found on `PATH`.
    pub fn new() -> Self {
        Masquerade {
            table: TABLE.to_string(),
            nft: PathBuf::from("nft"),
        }
    }

    /// The same, with another table name.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The same, with another `nft` executable.
    pub fn with_nft(mut self, nft: impl Into<PathBuf>) -> Self {
        self.nft = nft.into();
        self
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Makes the table say exactly `desired`, in one transaction.
    ///
    /// Always rewrites: the swap is atomic, the NAT of established connections lives in
    /// their conntrack entries (not in the table), so nothing in flight notices, and a
    /// rewrite also repairs a table someone else edited. Comparing with the kernel instead
    /// would mean parsing back nft's normalised listing for a saving of one `nft` run.
    /// Blocks on `nft`; call it from a blocking context.
    pub fn reconcile(&self, desired: &MasqueradeConfig) -> Result<(), NatError> {
        self.apply("replace", &masquerade_ruleset(&self.table, desired))
    }

    /// Deletes the table; done when it is already gone.
    pub fn remove(&self) -> Result<(), NatError> {
        self.apply("remove", &removal_ruleset(&self.table))
    }

    /// Whether the table exists.
    pub fn is_installed(&self) -> Result<bool, NatError> {
        let out = self.run("list", &["-j", "list", "tables"], None)?;
        let listing: Nftables<'_> = serde_json::from_str(&out).map_err(|source| NatError::Json {
            op: "list",
            table: self.table.clone(),
            source,
        })?;
        Ok(listing
            .objects
            .iter()
            .any(|o| matches!(o, NfObject::ListObject(NfListObject::Table(t)) if t.family == NfFamily::INet && t.name == self.table)))
    }

    fn apply(&self, op: &'static str, ruleset: &Nftables<'_>) -> Result<(), NatError> {
        let json = serde_json::to_string(ruleset).map_err(|source| NatError::Json {
            op,
            table: self.table.clone(),
            source,
        })?;
        self.run(op, &["-j", "-f", "-"], Some(&json)).map(drop)
    }

    /// Runs `nft args`, with `input` on its stdin; returns its stdout.
    fn run(&self, op: &'static str, args: &[&str], input: Option<&str>) -> Result<String, NatError> {
        let program = self.nft.display().to_string();
        let spawn_err = |source| NatError::Spawn {
            program: program.clone(),
            op,
            table: self.table.clone(),
            source,
        };
        let mut child = Command::new(&self.nft)
            .args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        // nft reads all of its input before it acts, so writing it first cannot deadlock
        // on a full stdout pipe. A write error (nft exited early) shows in its status below.
        let write = match (input, child.stdin.take()) {
            (Some(text), Some(mut stdin)) => stdin.write_all(text.as_bytes()),
            _ => Ok(()),
        };
        let output = child.wait_with_output().map_err(spawn_err)?;
        if !output.status.success() {
            return Err(NatError::Failed {
                program,
                op,
                table: self.table.clone(),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        write.map_err(spawn_err)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// The nft transaction that replaces `table` with one that says `config`.
///
/// `add table` first so that `delete table` cannot fail on a fresh node; then the table,
/// its three sets, the masquerade chain and the SNAT-mark chain, one rule each. CIDRs are
/// normalised (host bits cleared, duplicates and networks inside another dropped): nft
/// rejects overlapping intervals.
pub fn masquerade_ruleset(table: &str, config: &MasqueradeConfig) -> Nftables<'static> {
    let table: Cow<'static, str> = Cow::Owned(table.to_string());
    let mut batch = removal_batch(&table);
    batch.add(NfListObject::Table(Table {
        family: NfFamily::INet,
        name: table.clone(),
        handle: None,
    }));
    let node_nets: Vec<Ipv4Network> = config.node_ips.iter().map(|&ip| Ipv4Network::from(ip)).collect();
    for (name, nets) in [
        (SET_CLUSTER, &config.cluster_cidrs),
        (SET_NON_MASQUERADE, &config.non_masquerade_cidrs),
        (SET_NODES, &node_nets),
    ] {
        let elems: Vec<Expression<'static>> = normalise(nets)
            .into_iter()
            .map(|net| {
                Expression::Named(NamedExpression::Prefix(Prefix {
                    addr: Box::new(Expression::String(Cow::Owned(net.network().to_string()))),
                    len: u32::from(net.prefix()),
                }))
            })
            .collect();
        batch.add(NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: table.clone(),
            name: Cow::Borrowed(name),
            handle: None,
            set_type: SetTypeValue::Single(SetType::Ipv4Addr),
            flags: Some(HashSet::from([SetFlag::Interval])),
            elem: (!elems.is_empty()).then_some(Cow::Owned(elems)),
            ..Set::default()
        })));
    }
    batch.add(NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: table.clone(),
        name: Cow::Borrowed(CHAIN),
        _type: Some(NfChainType::NAT),
        hook: Some(NfHook::Postrouting),
        prio: Some(SRCNAT_PRIORITY),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }));
    batch.add(NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table: table.clone(),
        chain: Cow::Borrowed(CHAIN),
        expr: Cow::Owned(vec![
            in_set("saddr", Operator::EQ, SET_CLUSTER),
            in_set("daddr", Operator::NEQ, SET_CLUSTER),
            in_set("daddr", Operator::NEQ, SET_NON_MASQUERADE),
            in_set("daddr", Operator::NEQ, SET_NODES),
            // Fully random source ports, as kube-proxy asks for: two pods' connections to
            // one server cannot race for the same port (the conntrack insert-failure race).
            Statement::Masquerade(Some(NAT {
                addr: None,
                family: None,
                port: None,
                flags: Some(HashSet::from([NATFlag::FullyRandom])),
            })),
        ]),
        handle: None,
        index: None,
        comment: Some(Cow::Borrowed("bulkhead: pod traffic leaving the cluster")),
    }));
    batch.add(NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: table.clone(),
        name: Cow::Borrowed(MARK_CHAIN),
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Postrouting),
        // After kube-proxy's and our own srcnat (100): the NAT binding exists by then,
        // also on a connection's first packet.
        prio: Some(SRCNAT_PRIORITY + 1),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }));
    let ct = |key: &'static str| {
        Expression::Named(NamedExpression::CT(CT {
            key: Cow::Borrowed(key),
            family: None,
            dir: None,
        }))
    };
    let mark = || Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::Mark }));
    batch.add(NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table,
        chain: Cow::Borrowed(MARK_CHAIN),
        expr: Cow::Owned(vec![
            Statement::Match(Match {
                left: ct("direction"),
                right: Expression::String(Cow::Borrowed("original")),
                op: Operator::EQ,
            }),
            Statement::Match(Match {
                left: ct("status"),
                right: Expression::String(Cow::Borrowed("snat")),
                op: Operator::IN,
            }),
            Statement::Mangle(Mangle {
                key: mark(),
                value: Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![mark(), Expression::Number(SNAT_MARK)]))),
            }),
        ]),
        handle: None,
        index: None,
        comment: Some(Cow::Borrowed("bulkhead: traffic the node source-NATed is not the node's own")),
    }));
    batch.to_nftables()
}

/// The nft transaction that deletes `table`, and succeeds when it does not exist.
pub fn removal_ruleset(table: &str) -> Nftables<'static> {
    removal_batch(table).to_nftables()
}

fn removal_batch(table: &str) -> Batch<'static> {
    let mut batch = Batch::new();
    let t = Table {
        family: NfFamily::INet,
        name: Cow::Owned(table.to_string()),
        handle: None,
    };
    batch.add(NfListObject::Table(t.clone()));
    batch.delete(NfListObject::Table(t));
    batch
}

/// `ip <field> <op> @<set>`.
fn in_set(field: &'static str, op: Operator, set: &'static str) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
            protocol: Cow::Borrowed("ip"),
            field: Cow::Borrowed(field),
        }))),
        right: Expression::String(Cow::Owned(format!("@{set}"))),
        op,
    })
}

/// The networks with host bits cleared, sorted, without any that lies inside another.
fn normalise(nets: &[Ipv4Network]) -> Vec<Ipv4Network> {
    let canonical: BTreeSet<(Ipv4Addr, u8)> = nets.iter().map(|n| (n.network(), n.prefix())).collect();
    let all: Vec<Ipv4Network> = canonical
        .into_iter()
        .filter_map(|(addr, prefix)| Ipv4Network::new(addr, prefix).ok())
        .collect();
    all.iter()
        .filter(|n| !all.iter().any(|o| o != *n && o.prefix() < n.prefix() && o.contains(n.network())))
        .copied()
        .collect()
}
