//! Security identities (label sets → numeric ids) and stable rule ids.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use bulkhead_common::identity;

/// Key prefix of a pod's own labels inside a [`LabelSet`].
///
/// Label keys cannot contain `:`, so the three prefixes can never collide with each other.
pub const POD_LABEL_PREFIX: &str = "pod:";
/// Key prefix of the pod's namespace's labels inside a [`LabelSet`].
pub const NAMESPACE_LABEL_PREFIX: &str = "ns:";
/// Key holding the pod's namespace name inside a [`LabelSet`].
pub const NAMESPACE_NAME_KEY: &str = "meta:namespace";

/// The labels that define a pod's security identity: its own labels, its namespace's
/// labels and its namespace's name, flattened under distinct prefixes.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSet(BTreeMap<String, String>);

impl LabelSet {
    /// Builds the identity labels of a pod in namespace `namespace`.
    pub fn for_pod(namespace: &str, namespace_labels: &BTreeMap<String, String>, pod_labels: &BTreeMap<String, String>) -> Self {
        let mut set = BTreeMap::new();
        for (k, v) in pod_labels {
            set.insert(format!("{POD_LABEL_PREFIX}{k}"), v.clone());
        }
        for (k, v) in namespace_labels {
            set.insert(format!("{NAMESPACE_LABEL_PREFIX}{k}"), v.clone());
        }
        set.insert(NAMESPACE_NAME_KEY.to_string(), namespace.to_string());
        LabelSet(set)
    }

    /// The flattened labels, prefixes included.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// The pod's namespace name.
    pub fn namespace(&self) -> Option<&str> {
        self.0.get(NAMESPACE_NAME_KEY).map(String::as_str)
    }

    /// The pod's own labels, prefix removed.
    pub fn pod_labels(&self) -> BTreeMap<String, String> {
        self.strip(POD_LABEL_PREFIX)
    }

    /// The namespace's labels, prefix removed.
    pub fn namespace_labels(&self) -> BTreeMap<String, String> {
        self.strip(NAMESPACE_LABEL_PREFIX)
    }

    fn strip(&self, prefix: &str) -> BTreeMap<String, String> {
        self.0
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
            .collect()
    }
}

impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (k, v) in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// What an allocated identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IdentityKey {
    /// Pods with exactly these identity labels.
    Labels(LabelSet),
    /// Pods with exactly these identity labels whose address lies in exactly these ipBlock
    /// networks (CIDRs and excepts of the policies, sorted): pods that share labels but sit
    /// on different sides of a block's edge get different identities, so an ipBlock peer
    /// matches whole identities exactly.
    LabelsInCidrs {
        /// The identity labels.
        labels: LabelSet,
        /// Every policy ipBlock network (address, prefix length) containing the pods.
        cidrs: Vec<(Ipv4Addr, u8)>,
    },
    /// Addresses in an ipBlock CIDR (or `except` CIDR) not covered by a longer known prefix.
    Cidr {
        /// Network address, host bits zero.
        addr: Ipv4Addr,
        /// Prefix length.
        prefix: u8,
    },
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityKey::Labels(l) => write!(f, "{l}"),
            IdentityKey::LabelsInCidrs { labels, cidrs } => {
                write!(f, "{labels} in")?;
                for (addr, prefix) in cidrs {
                    write!(f, " cidr:{addr}/{prefix}")?;
                }
                Ok(())
            }
            IdentityKey::Cidr { addr, prefix } => write!(f, "cidr:{addr}/{prefix}"),
        }
    }
}

/// Hands out node-local identity numbers: equal keys share one id, an id stays put while its
/// key is in use, and released ids are never handed out again within one run.
#[derive(Clone, Debug)]
pub struct IdentityAllocator {
    by_key: BTreeMap<IdentityKey, u32>,
    by_id: BTreeMap<u32, IdentityKey>,
    next: u32,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl IdentityAllocator {
    /// An allocator whose first id is [`identity::FIRST_ALLOCATED`].
    pub fn new() -> Self {
        IdentityAllocator {
            by_key: BTreeMap::new(),
            by_id: BTreeMap::new(),
            next: identity::FIRST_ALLOCATED,
        }
    }

    /// The id of `key`, allocating the next one if the key is new.
    ///
    /// Once the id space is exhausted (2^32 allocations in one run) new keys get
    /// [`identity::WORLD`], which no selector matches, so the failure is closed.
    pub fn allocate(&mut self, key: IdentityKey) -> u32 {
        if let Some(&id) = self.by_key.get(&key) {
            return id;
        }
        if self.next == u32::MAX {
            return identity::WORLD;
        }
        let id = self.next;
        self.next += 1;
        self.by_key.insert(key.clone(), id);
        self.by_id.insert(id, key);
        id
    }

    /// The id of `key`, if allocated.
    pub fn get(&self, key: &IdentityKey) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// What `id` stands for, if it is allocated.
    pub fn key(&self, id: u32) -> Option<&IdentityKey> {
        self.by_id.get(&id)
    }

    /// Releases every id not in `used`; released ids are not reused.
    pub fn retain_only(&mut self, used: &BTreeSet<u32>) {
        self.by_id.retain(|id, _| used.contains(id));
        self.by_key.retain(|_, id| used.contains(id));
    }

    /// Releases one id (the incremental compiler's counterpart of [`Self::retain_only`]);
    /// released ids are not reused.
    pub fn release(&mut self, id: u32) {
        if let Some(key) = self.by_id.remove(&id) {
            self.by_key.remove(&key);
        }
    }

    /// Allocated ids in increasing order with their keys.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &IdentityKey)> {
        self.by_id.iter().map(|(id, k)| (*id, k))
    }

    /// Number of allocated ids.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no id is allocated.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Direction of a NetworkPolicy rule: the API's, so flows and explanations name it as is.
pub use bulkhead_api::Direction;

/// One rule of one NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    /// Namespace of the policy.
    pub namespace: String,
    /// Name of the policy.
    pub policy: String,
    /// Which rule list the rule is in.
    pub direction: Direction,
    /// Index of the rule in that list.
    pub index: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} {}[{}]", self.namespace, self.policy, self.direction.as_str(), self.index)
    }
}

/// Stable `u32` ids for policy rules, from 1 (0 means "no rule: not isolated"), with a
/// reverse lookup so a flow record can name its policy.
#[derive(Clone, Debug)]
pub struct RuleTable {
    by_rule: BTreeMap<RuleRef, u32>,
    by_id: BTreeMap<u32, RuleRef>,
    next: u32,
}

impl Default for RuleTable {
    fn default() -> Self {
        Self::new()
    }
}

impl RuleTable {
    /// An empty table whose first id is 1.
    pub fn new() -> Self {
        RuleTable {
            by_rule: BTreeMap::new(),
            by_id: BTreeMap::new(),
            next: 1,
        }
    }

    /// The id of `rule`, allocating the next one if the rule is new.
    ///
    /// Past 2^32 - 1 rules in one run new rules share the last id; they still allow
    /// exactly what they should, only their flow records name the wrong rule.
    pub fn id(&mut self, rule: RuleRef) -> u32 {
        if let Some(&id) = self.by_rule.get(&rule) {
            return id;
        }
        let id = self.next;
        self.next = self.next.saturating_add(1);
        self.by_rule.insert(rule.clone(), id);
        self.by_id.insert(id, rule);
        id
    }

    /// The id of `rule`, if known.
    pub fn get(&self, rule: &RuleRef) -> Option<u32> {
        self.by_rule.get(rule).copied()
    }

    /// The rule an id stands for.
    pub fn rule(&self, id: u32) -> Option<&RuleRef> {
        self.by_id.get(&id)
    }

    /// Forgets every id not in `used`; forgotten ids are not reused.
    pub fn retain_only(&mut self, used: &BTreeSet<u32>) {
        self.by_id.retain(|id, _| used.contains(id));
        self.by_rule.retain(|_, id| used.contains(id));
    }

    /// Forgets one id (the incremental compiler's counterpart of [`Self::retain_only`]);
    /// forgotten ids are not reused.
    pub fn release(&mut self, id: u32) {
        if let Some(rule) = self.by_id.remove(&id) {
            self.by_rule.remove(&rule);
        }
    }

    /// Known rules in id order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &RuleRef)> {
        self.by_id.iter().map(|(id, r)| (*id, r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn pod(ns: &str, labels: &[(&str, &str)]) -> IdentityKey {
        IdentityKey::Labels(LabelSet::for_pod(ns, &l(&[("kubernetes.io/metadata.name", ns)]), &l(labels)))
    }

    #[test]
    fn equal_sets_share_an_id_and_distinct_sets_do_not() {
        let mut a = IdentityAllocator::new();
        let x = a.allocate(pod("x", &[("pod", "a")]));
        assert_eq!(x, identity::FIRST_ALLOCATED);
        assert_eq!(a.allocate(pod("x", &[("pod", "a")])), x);
        let y = a.allocate(pod("y", &[("pod", "a")]));
        assert_ne!(x, y, "namespace name is part of the identity");
        let b = a.allocate(pod("x", &[("pod", "b")]));
        assert_ne!(b, x);
        let c = a.allocate(IdentityKey::Cidr {
            addr: Ipv4Addr::new(10, 0, 0, 0),
            prefix: 8,
        });
        assert_eq!(a.len(), 4);
        assert_eq!(
            a.key(c),
            Some(&IdentityKey::Cidr {
                addr: Ipv4Addr::new(10, 0, 0, 0),
                prefix: 8
            })
        );
    }

    #[test]
    fn namespace_labels_cannot_pose_as_pod_labels() {
        let as_pod = LabelSet::for_pod("x", &l(&[]), &l(&[("team", "a")]));
        let as_ns = LabelSet::for_pod("x", &l(&[("team", "a")]), &l(&[]));
        assert_ne!(as_pod, as_ns);
        assert_eq!(as_pod.pod_labels(), l(&[("team", "a")]));
        assert_eq!(as_ns.namespace_labels(), l(&[("team", "a")]));
        assert_eq!(as_ns.namespace(), Some("x"));
    }

    #[test]
    fn ids_are_stable_while_used_and_never_reused() {
        let mut a = IdentityAllocator::new();
        let x = a.allocate(pod("x", &[("pod", "a")]));
        let y = a.allocate(pod("x", &[("pod", "b")]));
        a.retain_only(&BTreeSet::from([y]));
        assert_eq!(a.key(x), None);
        assert_eq!(a.allocate(pod("x", &[("pod", "b")])), y, "kept id is stable");
        let again = a.allocate(pod("x", &[("pod", "a")]));
        assert!(again > y, "released id {x} must not come back, got {again}");
    }

    #[test]
    fn rule_ids_start_at_one_and_reverse() {
        let mut t = RuleTable::new();
        let r = |i| RuleRef {
            namespace: "x".into(),
            policy: "p".into(),
            direction: Direction::Ingress,
            index: i,
        };
        assert_eq!(t.id(r(0)), 1);
        assert_eq!(t.id(r(1)), 2);
        assert_eq!(t.id(r(0)), 1);
        assert_eq!(t.rule(2), Some(&r(1)));
        assert_eq!(t.rule(2).map(ToString::to_string).as_deref(), Some("x/p ingress[1]"));
        t.retain_only(&BTreeSet::from([2]));
        assert_eq!(t.get(&r(0)), None);
        assert_eq!(t.id(r(0)), 3);
    }
}
