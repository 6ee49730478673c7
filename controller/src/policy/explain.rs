//! Explaining a connection from the model: its verdict, which policies isolate each side
//! and which rule allows it. The agent answers `bulkhead explain` with it.
//!
//! It uses [`evaluate`], the spec evaluator that the compiler is tested against, and
//! [`isolation`], which the compiler itself uses to choose between enforcing and
//! audit-mode policies.

use bulkhead_api::{
    code, BackendExplanation, Direction, ExplainSide, ExplainVerdict, Explanation, NamespacedName, PolicyName, PolicyRule, Protocol,
    Response, ServiceExplanation,
};

use super::evaluate::{evaluate, isolation, Decision};
use super::identity::RuleRef;
use crate::model::{self, Cluster, ClusterIp};
use crate::services::ServiceEntry;

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
    /// The model has no such Service.
    #[error("TO: unknown service {service}")]
    UnknownService {
        /// The Service asked for.
        service: String,
    },
    /// The Service has no such port.
    #[error("PORT/PROTO: service {service} has no port {port}/{protocol} (its ports: {ports})")]
    NoSuchServicePort {
        /// The Service.
        service: String,
        /// The port asked for.
        port: u16,
        /// Its protocol.
        protocol: Protocol,
        /// The ports it has, `PORT/PROTO` comma-separated.
        ports: String,
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

/// Explains a connection from pod `from` to Service port `port`/`protocol` of `service`:
/// one explanation per endpoint, as if the client had dialled it (which is how the datapath
/// decides once it has translated the ClusterIP; `translated` says whether it does).
pub fn explain_service(
    cluster: &Cluster,
    from: &NamespacedName,
    service: &NamespacedName,
    port: u16,
    protocol: Protocol,
    translated: bool,
) -> Result<ServiceExplanation, ExplainError> {
    if cluster.pod(&from.namespace, &from.name).is_none() {
        return Err(ExplainError::UnknownPod {
            arg: "FROM",
            pod: from.to_string(),
        });
    }
    let svc = cluster
        .services()
        .find(|s| s.namespace == service.namespace && s.name == service.name)
        .ok_or_else(|| ExplainError::UnknownService {
            service: service.to_string(),
        })?;
    let Some(svc_port) = svc.ports.iter().find(|p| p.port == port && p.protocol == protocol) else {
        let ports: Vec<String> = svc.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)).collect();
        return Err(ExplainError::NoSuchServicePort {
            service: service.to_string(),
            port,
            protocol,
            ports: if ports.is_empty() { "none".into() } else { ports.join(",") },
        });
    };
    let vip = match svc.cluster_ip {
        ClusterIp::Ipv4(vip) => Some(vip),
        ClusterIp::Headless | ClusterIp::Unallocated => None,
    };
    // A headless Service has no table entry: its endpoints resolve the same way.
    let backends = backends(cluster, from, protocol, &ServiceEntry::of_port(cluster, svc, svc_port))?;
    Ok(ServiceExplanation {
        from: from.clone(),
        service: service.clone(),
        vip,
        port,
        port_name: svc_port.name.clone(),
        protocol,
        translated,
        backends,
    })
}

fn backends(
    cluster: &Cluster,
    from: &NamespacedName,
    protocol: Protocol,
    entry: &ServiceEntry,
) -> Result<Vec<BackendExplanation>, ExplainError> {
    let selected: Vec<_> = entry.selected().into_iter().map(|b| (b.ip, b.port)).collect();
    let by_ip: std::collections::HashMap<_, _> = cluster
        .pods()
        .iter()
        .filter_map(|((ns, name), pod)| Some((model::pod_ipv4(pod)?, NamespacedName::new(ns, name))))
        .collect();
    entry
        .backends
        .iter()
        .map(|b| {
            let pod = b
                .pod
                .clone()
                .filter(|p| cluster.pod(&p.namespace, &p.name).is_some())
                .or_else(|| by_ip.get(&b.ip).cloned());
            let explanation = pod.as_ref().map(|to| explain(cluster, from, to, b.port, protocol)).transpose()?;
            Ok(BackendExplanation {
                ip: b.ip,
                port: b.port,
                pod,
                selected: selected.contains(&(b.ip, b.port)),
                explanation,
            })
        })
        .collect()
}

/// The agent's answer to [`Request::ExplainService`](bulkhead_api::Request::ExplainService).
pub fn respond_service(
    cluster: &Cluster,
    from: &NamespacedName,
    service: &NamespacedName,
    port: u16,
    protocol: &Protocol,
    translated: bool,
) -> Response {
    match explain_service(cluster, from, service, port, *protocol, translated) {
        Ok(e) => Response::ExplainService(Box::new(e)),
        Err(e) => Response::Error {
            code: code::INVALID_REQUEST,
            message: e.to_string(),
        },
    }
}
