//! Which workload a pod belongs to, from its labels alone: the selector a policy for it uses.
//!
//! Kubernetes has no workload label, but every controller and chart sets one of a few owner
//! labels, and the per-replica labels controllers add are known. A pod's workload is its
//! namespace plus the first owner label it carries (with the `app.kubernetes.io` labels that
//! refine `app.kubernetes.io/name`), else every label but the per-replica ones. Pod names and
//! addresses never enter: they change with every replica and restart.

use std::collections::BTreeMap;

/// Owner labels, most specific first.
pub const WORKLOAD_KEYS: [&str; 4] = ["app.kubernetes.io/name", "app", "k8s-app", "name"];

/// Labels that refine `app.kubernetes.io/name` (two releases or components of one app).
const COMPANION_KEYS: [&str; 2] = ["app.kubernetes.io/instance", "app.kubernetes.io/component"];

/// Labels controllers set per replica or per revision: never part of a workload.
pub const PER_REPLICA_KEYS: [&str; 9] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-completion-index",
    "job-name",
];

/// A workload: pods of one namespace that share the selector.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Workload {
    /// The namespace.
    pub namespace: String,
    /// The labels every pod of the workload carries (a policy's `podSelector.matchLabels`).
    pub selector: BTreeMap<String, String>,
}

impl Workload {
    /// The workload of a pod with `labels` in `namespace`; `None` when no label can tell it
    /// from any other pod of the namespace but per-replica ones.
    pub fn of(namespace: &str, labels: &BTreeMap<String, String>) -> Option<Workload> {
        let selector = selector(labels)?;
        Some(Workload {
            namespace: namespace.to_string(),
            selector,
        })
    }

    /// A short name: the owner label's value (values joined by `-` for several labels).
    pub fn short_name(&self) -> String {
        let owner = WORKLOAD_KEYS.iter().find_map(|k| self.selector.get(*k));
        match owner {
            Some(v) => {
                let mut parts = vec![v.clone()];
                parts.extend(
                    COMPANION_KEYS
                        .iter()
                        .filter_map(|k| self.selector.get(*k))
                        .filter(|c| *c != v)
                        .cloned(),
                );
                parts.join("-")
            }
            None => self.selector.values().cloned().collect::<Vec<_>>().join("-"),
        }
    }

    /// `namespace/short-name`, for messages and comments.
    pub fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.short_name())
    }

    /// `k=v,k=v`, the selector as `kubectl -l` writes it.
    pub fn selector_text(&self) -> String {
        self.selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    }
}

fn selector(labels: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    if let Some((key, value)) = WORKLOAD_KEYS.iter().find_map(|k| labels.get_key_value(*k)) {
        let mut out = BTreeMap::from([(key.clone(), value.clone())]);
        if key == WORKLOAD_KEYS[0] {
            for k in COMPANION_KEYS {
                if let Some(v) = labels.get(k) {
                    out.insert(k.to_string(), v.clone());
                }
            }
        }
        return Some(out);
    }
    let rest: BTreeMap<String, String> = labels
        .iter()
        .filter(|(k, _)| !PER_REPLICA_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (!rest.is_empty()).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn owner_labels_win_and_per_replica_labels_never_count() {
        type Labels = &'static [(&'static str, &'static str)];
        let cases: &[(Labels, Option<Labels>, &str)] = &[
            (&[("app", "web"), ("pod-template-hash", "7f9c")], Some(&[("app", "web")]), "web"),
            (
                &[
                    ("app.kubernetes.io/name", "shop"),
                    ("app.kubernetes.io/component", "api"),
                    ("app", "x"),
                    ("version", "2"),
                ],
                Some(&[("app.kubernetes.io/component", "api"), ("app.kubernetes.io/name", "shop")]),
                "shop-api",
            ),
            (
                &[("k8s-app", "kube-dns"), ("pod-template-hash", "1")],
                Some(&[("k8s-app", "kube-dns")]),
                "kube-dns",
            ),
            (
                &[
                    ("tier", "db"),
                    ("controller-revision-hash", "abc"),
                    ("statefulset.kubernetes.io/pod-name", "db-0"),
                ],
                Some(&[("tier", "db")]),
                "db",
            ),
            (&[("pod-template-hash", "1")], None, ""),
            (&[], None, ""),
        ];
        for (input, want, name) in cases {
            let got = Workload::of("ns", &labels(input));
            assert_eq!(got.as_ref().map(|w| w.selector.clone()), want.map(labels), "{input:?}");
            if let Some(w) = got {
                assert_eq!(w.short_name(), *name);
            }
        }
    }

    #[test]
    fn replicas_and_restarts_are_one_workload() {
        let a = Workload::of("x", &labels(&[("app", "api"), ("pod-template-hash", "aaa")]));
        let b = Workload::of("x", &labels(&[("app", "api"), ("pod-template-hash", "bbb")]));
        assert_eq!(a, b);
        let other_ns = Workload::of("y", &labels(&[("app", "api")]));
        assert_ne!(a, other_ns);
    }
}
