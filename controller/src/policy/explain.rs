//! Explaining a connection from the model: its verdict, which policies isolate each side
//! and which rule allows it. The agent answers `bulkhead explain` with it.
//!
//! It uses [`evaluate`], the spec evaluator that the compiler is tested against, and
//! [`isolation`], which the compiler itself uses to choose between enforcing and
//! audit-mode policies.

use bulkhead_api::{code, Direction, ExplainSide, ExplainVerdict, Explanation, NamespacedName, PolicyName, PolicyRule, Protocol, Response};

use super::evaluate::{evaluate, isolation, Decision};
use super::identity::RuleRef;
use crate::model::{self, Cluster};

/// Why a connection cannot be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// A pod argument is not `NAMESPACE/NAME`.
    #[error("{arg}: {reason}")]
    BadPod {
        /// `FROM` or `TO`.
        arg: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The model has no such pod.
    #[error("{arg}: unknown pod {pod}")]
    UnknownPod {
        /// `FROM` or `TO`.
        arg: &'static str,
        /// The pod asked for.
        pod: String,
    },
    /// `PORT/PROTO` does not parse.
    #[error("PORT/PROTO: {reason}")]
    BadPort {
        /// What is wrong.
        reason: String,
    },
}

/// Parses the `arg` (`FROM` or `TO`) pod, `NAMESPACE/NAME`.
pub fn pod_ref(arg: &'static str, text: &str) -> Result<NamespacedName, ExplainError> {
    text.parse().map_err(|e: bulkhead_api::name::ParseNameError| ExplainError::BadPod {
        arg,
        reason: e.to_string(),
    })
}

/// A protocol NetworkPolicy ports can name (TCP, UDP, SCTP), or why `text` is not one.
pub fn parse_protocol(text: &str) -> Result<Protocol, ExplainError> {
    text.parse().ok().and_then(policy_protocol).ok_or_else(|| ExplainError::BadPort {
        reason: format!("unknown protocol {text:?} (expected TCP, UDP or SCTP)"),
    })
}

fn policy_protocol(p: Protocol) -> Option<Protocol> {
    [Protocol::TCP, Protocol::UDP, Protocol::SCTP].contains(&p).then_some(p)
}

fn names(list: &[(String, String)]) -> Vec<PolicyName> {
    list.iter().map(|(namespace, name)| PolicyName::new(namespace, name)).collect()
}

fn rule(r: &RuleRef) -> PolicyRule {
    PolicyRule {
        policy: PolicyName::new(&*r.namespace, &*r.policy),
        direction: r.direction,
        rule: r.index,
    }
}

/// One side: `pod`'s policies for `dir`, and what `decision` says.
fn side(cluster: &Cluster, pod: &NamespacedName, dir: Direction, decision: &Decision) -> ExplainSide {
    let labels = cluster.pod(&pod.namespace, &pod.name).map(model::pod_labels).unwrap_or_default();
    let iso = isolation(cluster, &pod.namespace, &labels, dir);
    let (verdict, allowed_by) = match decision {
        Decision::NotIsolated => (ExplainVerdict::Allowed, None),
        Decision::Allowed(r) => (ExplainVerdict::Allowed, Some(rule(r))),
        Decision::Audited(_) => (ExplainVerdict::Audit, None),
        Decision::Denied(_) | Decision::UnknownPod => (ExplainVerdict::Denied, None),
    };
    ExplainSide {
        pod: pod.clone(),
        direction: dir,
        isolated: iso.isolated() || iso.audited(),
        audit_mode: iso.audited(),
        isolated_by: names(iso.effective()),
        allowed_by,
        verdict,
    }
}

/// Explains a connection from pod `from` to pod `to` on `port`/`protocol` against
/// `cluster`, as the datapath compiled from it decides.
pub fn explain(
    cluster: &Cluster,
    from: &NamespacedName,
    to: &NamespacedName,
    port: u16,
    protocol: Protocol,
) -> Result<Explanation, ExplainError> {
    for (arg, pod) in [("FROM", from), ("TO", to)] {
        if cluster.pod(&pod.namespace, &pod.name).is_none() {
            return Err(ExplainError::UnknownPod { arg, pod: pod.to_string() });
        }
    }
    if port == 0 {
        return Err(ExplainError::BadPort {
            reason: "port 0 is not a destination port (1-65535)".into(),
        });
    }
    let protocol = policy_protocol(protocol).ok_or_else(|| ExplainError::BadPort {
        reason: format!("unknown protocol \"{protocol}\" (expected TCP, UDP or SCTP)"),
    })?;
    let (f, t) = (
        (from.namespace.as_str(), from.name.as_str()),
        (to.namespace.as_str(), to.name.as_str()),
    );
    let v = evaluate(cluster, f, t, &protocol.to_string(), port);
    let verdict = if !v.allowed {
        ExplainVerdict::Denied
    } else if v.audited() {
        ExplainVerdict::Audit
    } else {
        ExplainVerdict::Allowed
    };
    Ok(Explanation {
        from: from.clone(),
        to: to.clone(),
        port,
        protocol,
        verdict,
        egress: side(cluster, from, Direction::Egress, &v.egress),
        ingress: side(cluster, to, Direction::Ingress, &v.ingress),
    })
}

/// The agent's answer to [`Request::Explain`] against its current model.
pub fn respond(cluster: &Cluster, from: &NamespacedName, to: &NamespacedName, port: u16, protocol: &Protocol) -> Response {
    match explain(cluster, from, to, port, *protocol) {
        Ok(e) => Response::Explain(Box::new(e)),
        Err(e) => Response::Error {
            code: code::INVALID_REQUEST,
            message: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::explain::{parse_port, policy_list, table};
    use crate::model::parse_documents;

    const MODEL: &str = "
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
status: {podIP: 10.9.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
status: {podIP: 10.9.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: y, labels: {pod: b}}
status: {podIP: 10.9.1.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}, namespaceSelector: {}}]
    ports: [{port: 80}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: audit-egress, namespace: y, annotations: {bulkhead.io/audit: \"true\"}}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{ports: [{port: 53, protocol: UDP}]}]
";

    fn cluster() -> Cluster {
        Cluster::from_objects(parse_documents(MODEL, "test").unwrap())
    }

    /// What the CLI and the agent do together: parse the arguments, then explain.
    fn explain(c: &Cluster, from: &str, to: &str, port: u16, protocol: &str) -> Result<Explanation, ExplainError> {
        let (from, to) = (pod_ref("FROM", from)?, pod_ref("TO", to)?);
        super::explain(c, &from, &to, port, parse_protocol(protocol)?)
    }

    #[test]
    fn allowed_names_the_rule_and_denied_names_the_isolating_policy() {
        let c = cluster();
        let e = explain(&c, "x/b", "x/a", 80, "tcp").unwrap();
        assert_eq!((e.verdict, e.protocol), (ExplainVerdict::Allowed, Protocol::TCP));
        assert_eq!((e.egress.isolated, e.egress.verdict), (false, ExplainVerdict::Allowed));
        assert!(e.egress.isolated_by.is_empty() && e.egress.allowed_by.is_none());
        let allowed = e.ingress.allowed_by.clone().unwrap();
        assert_eq!((allowed.policy.name.as_str(), allowed.rule), ("allow-b", 0));
        assert_eq!(policy_list(&e.ingress.isolated_by), "x/allow-b");

        let e = explain(&c, "x/b", "x/a", 81, "TCP").unwrap();
        assert_eq!(e.verdict, ExplainVerdict::Denied);
        assert_eq!((e.ingress.isolated, e.ingress.audit_mode), (true, false));
        assert_eq!(e.ingress.verdict, ExplainVerdict::Denied);
        let text = table(&e);
        assert!(text.starts_with("x/b -> x/a 81/TCP: DENIED\n"), "{text}");
        assert!(text.contains("ingress  x/a  x/allow-b"), "{text}");
    }

    #[test]
    fn audit_mode_side_says_audit_and_a_deny_on_the_other_side_wins() {
        let c = cluster();
        let e = explain(&c, "y/b", "x/b", 80, "TCP").unwrap();
        assert_eq!(e.verdict, ExplainVerdict::Audit);
        assert_eq!((e.egress.isolated, e.egress.audit_mode), (true, true));
        assert_eq!(policy_list(&e.egress.isolated_by), "y/audit-egress");
        assert_eq!(e.egress.verdict, ExplainVerdict::Audit);
        // Allowed by the audit policy's own rule: no audit there.
        let e = explain(&c, "y/b", "x/b", 53, "UDP").unwrap();
        assert_eq!(e.verdict, ExplainVerdict::Allowed);
        assert_eq!(e.egress.allowed_by.map(|r| r.policy.name).as_deref(), Some("audit-egress"));
        // Egress audited, ingress denied: denied.
        let e = explain(&c, "y/b", "x/a", 81, "TCP").unwrap();
        assert_eq!(e.verdict, ExplainVerdict::Denied);
        assert!(table(&e).contains("audit"), "{}", table(&e));
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let c = cluster();
        let err = |from: &str, to: &str, port, proto: &str| explain(&c, from, to, port, proto).unwrap_err().to_string();
        assert_eq!(err("x/zz", "x/a", 80, "TCP"), "FROM: unknown pod x/zz");
        assert_eq!(err("x/a", "q/a", 80, "TCP"), "TO: unknown pod q/a");
        assert!(err("xa", "x/a", 80, "TCP").starts_with("FROM: \"xa\" is not NAMESPACE/NAME"));
        assert!(err("x/a", "x/b", 80, "ICMP").contains("unknown protocol \"ICMP\""));
        assert!(err("x/a", "x/b", 0, "TCP").contains("port 0"));
        assert!(matches!(
            respond(
                &c,
                &NamespacedName::new("x", "a"),
                &NamespacedName::new("x", "zz"),
                80,
                &Protocol::TCP
            ),
            Response::Error {
                code: code::INVALID_REQUEST,
                ..
            }
        ));

        let icmp = super::explain(
            &c,
            &NamespacedName::new("x", "a"),
            &NamespacedName::new("x", "b"),
            80,
            Protocol::ICMP,
        );
        assert!(icmp.unwrap_err().to_string().contains("unknown protocol \"ICMP\""));
        assert_eq!(parse_port("80/TCP").unwrap(), (80, Protocol::TCP));
        assert_eq!(parse_port("53/udp").unwrap(), (53, Protocol::UDP));
        assert_eq!(parse_port("8080").unwrap(), (8080, Protocol::TCP));
        for bad in ["http/TCP", "70000/TCP", "0/TCP", "80/ICMP", "80/", "/TCP", ""] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
        assert!(parse_port("http")
            .unwrap_err()
            .to_string()
            .contains("named ports are not supported"));
    }
}
