//! The advice as NetworkPolicy objects (k8s-openapi types) and as YAML with comments saying
//! what each rule was learnt from, applyable as is.
//!
//! YAML serializers write no comments, so each policy is serialized in parts — the object
//! without its rules, then each rule — and the parts are joined with comments between
//! them. The joined text is parsed back and compared with the object, so a comment can
//! never change what is applied.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use bulkhead_api::Direction;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Advice, Evidence, Peer, PortKey, WorkloadAdvice};
use crate::model::{NAMESPACE_NAME_LABEL, POLICY_AUDIT_ANNOTATION};

/// The prefix of every proposed policy's name.
pub const NAME_PREFIX: &str = "advised-";
/// Label on every proposed policy, so they can be listed and removed together.
pub const ADVISED_LABEL: &str = "bulkhead.io/advised";

/// How to write the policies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenderOptions {
    /// Mark every policy with Bulkhead's audit annotation.
    pub audit: bool,
}

/// Why the YAML could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// Serializing failed.
    #[error("cannot write policy {policy} as yaml")]
    Yaml {
        /// `namespace/name`.
        policy: String,
        /// Cause.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// The commented text does not read back as the policy (a bug, never applied).
    #[error("policy {policy}: the commented yaml does not read back as the policy")]
    RoundTrip {
        /// `namespace/name`.
        policy: String,
    },
}

/// A proposed policy and the comments that go with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    /// The policy.
    pub policy: NetworkPolicy,
    /// Lines above the object.
    pub header: Vec<String>,
    /// Per ingress rule, lines above it.
    pub ingress_notes: Vec<Vec<String>>,
    /// Per egress rule, lines above it.
    pub egress_notes: Vec<Vec<String>>,
}

fn time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn seen(e: &Evidence) -> String {
    let audited = if e.audited > 0 {
        format!(" ({} audited)", e.audited)
    } else {
        String::new()
    };
    format!(
        "{} connection{}{audited}, first seen {}, last seen {}",
        e.connections,
        if e.connections == 1 { "" } else { "s" },
        time(e.first),
        time(e.last)
    )
}

/// A DNS label from `text`: lowercase alphanumerics and `-`, at most `max` characters.
fn dns_label(text: &str, max: usize) -> String {
    let mut out: String = text
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out.truncate(max);
    let trimmed = out.trim_matches('-');
    if trimmed.is_empty() {
        "workload".into()
    } else {
        trimmed.to_string()
    }
}

fn selector(labels: &BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels.clone()),
        match_expressions: None,
    }
}

fn peer(local_namespace: &str, remote: &Peer) -> NetworkPolicyPeer {
    match remote {
        Peer::Workload(w) => NetworkPolicyPeer {
            // A podSelector alone selects in the policy's own namespace.
            namespace_selector: (w.namespace != local_namespace)
                .then(|| selector(&BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), w.namespace.clone())]))),
            pod_selector: Some(selector(&w.selector)),
            ip_block: None,
        },
        Peer::Cidr(net) => NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: net.to_string(),
                except: None,
            }),
            ..Default::default()
        },
    }
}

fn ports(ports: &BTreeMap<PortKey, Evidence>) -> Vec<NetworkPolicyPort> {
    ports
        .keys()
        .map(|p| NetworkPolicyPort {
            protocol: Some(p.protocol.to_string()),
            port: Some(IntOrString::Int(i32::from(p.port))),
            end_port: None,
        })
        .collect()
}

fn peer_name(remote: &Peer) -> String {
    match remote {
        Peer::Workload(w) => format!("{} ({})", w.display(), w.selector_text()),
        Peer::Cidr(net) => format!("{net} (outside the cluster's pods)"),
    }
}

/// Comment lines for the rule of one peer.
fn notes(direction: Direction, remote: &Peer, by_port: &BTreeMap<PortKey, Evidence>) -> Vec<String> {
    let word = match direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let mut lines = vec![format!("{word} {}", peer_name(remote))];
    for (port, e) in by_port {
        let mut line = format!("  {port}: {}", seen(e));
        let dns = port.port == 53 && direction == Direction::Egress;
        if !e.services.is_empty() {
            let via: Vec<&str> = e.services.iter().map(String::as_str).collect();
            line.push_str(&format!(", via Service {}", via.join(", ")));
        }
        if dns {
            line.push_str(" (DNS)");
        }
        lines.push(line);
    }
    lines
}

/// FNV-1a, for a short stable suffix.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// The policies the advice proposes, one per workload, ordered by namespace and name.
pub fn proposals(advice: &Advice, options: RenderOptions) -> Vec<Proposal> {
    let mut taken: BTreeSet<(String, String)> = BTreeSet::new();
    advice
        .workloads
        .values()
        .map(|a| {
            let base = format!("{NAME_PREFIX}{}", dns_label(&a.workload.short_name(), 63 - NAME_PREFIX.len() - 9));
            let mut name = base.clone();
            if !taken.insert((a.workload.namespace.clone(), name.clone())) {
                // Two workloads with the same short name (e.g. app=x and k8s-app=x).
                name = format!("{base}-{:08x}", fnv1a(&a.workload.selector_text()));
                taken.insert((a.workload.namespace.clone(), name.clone()));
            }
            proposal(a, name, options, advice.cidr_prefix)
        })
        .collect()
}

fn proposal(a: &WorkloadAdvice, name: String, options: RenderOptions, prefix: u8) -> Proposal {
    let ns = a.workload.namespace.as_str();
    let ingress: Vec<NetworkPolicyIngressRule> = a
        .ingress
        .iter()
        .map(|(remote, by_port)| NetworkPolicyIngressRule {
            from: Some(vec![peer(ns, remote)]),
            ports: Some(ports(by_port)),
        })
        .collect();
    let egress: Vec<NetworkPolicyEgressRule> = a
        .egress
        .iter()
        .map(|(remote, by_port)| NetworkPolicyEgressRule {
            to: Some(vec![peer(ns, remote)]),
            ports: Some(ports(by_port)),
        })
        .collect();
    let annotations = options
        .audit
        .then(|| BTreeMap::from([(POLICY_AUDIT_ANNOTATION.to_string(), "true".to_string())]));
    let policy = NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(ns.to_string()),
            labels: Some(BTreeMap::from([(ADVISED_LABEL.to_string(), "true".to_string())])),
            annotations,
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selector(&a.workload.selector)),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(ingress),
            egress: Some(egress),
        }),
    };
    let mut header = vec![format!(
        "{} ({}): {} pod{} seen",
        a.workload.display(),
        a.workload.selector_text(),
        a.pods,
        if a.pods == 1 { "" } else { "s" }
    )];
    if let Some(total) = a.total() {
        header.push(format!("learnt from {}", seen(&total)));
    }
    if a.ingress.is_empty() {
        header.push("no connection to it was seen: all ingress denied".into());
    }
    if a.egress.is_empty() {
        header.push("no connection from it was seen: all egress denied".into());
    }
    if a.egress.keys().any(|p| matches!(p, Peer::Cidr(_))) || a.ingress.keys().any(|p| matches!(p, Peer::Cidr(_))) {
        header.push(format!("outside addresses are allowed as /{prefix} blocks (--cidr-prefix)"));
    }
    if options.audit {
        header.push(format!(
            "{POLICY_AUDIT_ANNOTATION}: what it would deny is forwarded and reported as AUDIT"
        ));
    }
    Proposal {
        policy,
        header,
        ingress_notes: a.ingress.iter().map(|(r, p)| notes(Direction::Ingress, r, p)).collect(),
        egress_notes: a.egress.iter().map(|(r, p)| notes(Direction::Egress, r, p)).collect(),
    }
}

fn yaml<T: serde::Serialize>(value: &T, policy: &str) -> Result<String, RenderError> {
    serde_yaml_ng::to_string(value).map_err(|source| RenderError::Yaml {
        policy: policy.to_string(),
        source,
    })
}

/// `text` as a list item indented by `indent` spaces.
fn list_item(text: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        let lead = if i == 0 { "- " } else { "  " };
        let _ = writeln!(out, "{pad}{lead}{line}");
    }
    out
}

fn comments(lines: &[String], indent: usize) -> String {
    let pad = " ".repeat(indent);
    lines.iter().map(|l| format!("{pad}# {l}\n")).collect()
}

fn rules<R: serde::Serialize>(key: &str, rules: &[R], notes: &[Vec<String>], policy: &str) -> Result<String, RenderError> {
    if rules.is_empty() {
        return Ok(format!("  {key}: []\n"));
    }
    let mut out = format!("  {key}:\n");
    for (rule, note) in rules.iter().zip(notes) {
        out.push_str(&comments(note, 2));
        out.push_str(&list_item(&yaml(rule, policy)?, 2));
    }
    Ok(out)
}

/// One policy as a YAML document (without the `---` separator), comments included.
pub fn render_one(p: &Proposal) -> Result<String, RenderError> {
    let id = format!(
        "{}/{}",
        p.policy.metadata.namespace.as_deref().unwrap_or_default(),
        p.policy.metadata.name.as_deref().unwrap_or_default()
    );
    let spec = p.policy.spec.clone().unwrap_or_default();
    let bare = NetworkPolicy {
        metadata: p.policy.metadata.clone(),
        spec: Some(NetworkPolicySpec {
            ingress: None,
            egress: None,
            ..spec.clone()
        }),
    };
    let mut out = comments(&p.header, 0);
    // `spec` is the object's last key, so the rules appended below land inside it.
    out.push_str(&yaml(&bare, &id)?);
    out.push_str(&rules(
        "ingress",
        spec.ingress.as_deref().unwrap_or_default(),
        &p.ingress_notes,
        &id,
    )?);
    out.push_str(&rules("egress", spec.egress.as_deref().unwrap_or_default(), &p.egress_notes, &id)?);
    let back: NetworkPolicy = serde_yaml_ng::from_str(&out).map_err(|_| RenderError::RoundTrip { policy: id.clone() })?;
    if back != p.policy {
        return Err(RenderError::RoundTrip { policy: id });
    }
    Ok(out)
}

/// Every policy as one multi-document YAML stream.
pub fn render(proposals: &[Proposal]) -> Result<String, RenderError> {
    let mut out = String::new();
    for p in proposals {
        out.push_str("---\n");
        out.push_str(&render_one(p)?);
    }
    Ok(out)
}
