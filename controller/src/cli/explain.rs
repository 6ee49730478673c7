//! `bulkhead explain FROM TO PORT/PROTO`: the verdict the agent's current model gives a
//! connection, which policies isolate each side and which rule allows it.
//!
//! The agent computes the answer with [`policy::explain`].

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use bulkhead_api::{self, ApiError, Explanation, PolicyName, Protocol, Request, Response, ServiceExplanation};

use crate::cli::observe::{self, ObserveError};
use crate::cli::{AgentSelect, Output};
use crate::policy::{self};

/// How long to wait for the agent's answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// `bulkhead explain` flags.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The client pod, NAMESPACE/NAME.
    pub from: String,
    /// The server pod, NAMESPACE/NAME, or a Service, svc:NAMESPACE/NAME (explained for
    /// each of its backends).
    pub to: String,
    /// Destination port and protocol, e.g. 80/TCP, 53/udp; the protocol defaults to TCP.
    /// Numbers only: named ports are not resolved. For a Service: the Service port.
    #[arg(value_name = "PORT/PROTO")]
    pub port: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Which agent to ask (in a lab, the first node's holds the whole model).
    #[command(flatten)]
    pub agents: AgentSelect,
}

/// Why `bulkhead explain` failed.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The connection cannot be explained (bad pod or port).
    #[error(transparent)]
    Request(#[from] policy::explain::ExplainError),
    /// The agent to ask could not be found.
    #[error("finding the agent")]
    Target(#[source] ObserveError),
    /// The lab has no nodes.
    #[error("the lab in {lab_dir} has no nodes")]
    NoNodes {
        /// Where the lab was found.
        lab_dir: PathBuf,
    },
    /// The agent could not be asked.
    #[error("node {node}")]
    Agent {
        /// The node (or socket path).
        node: String,
        /// Cause.
        #[source]
        source: ApiError,
    },
    /// The agent refused the request.
    #[error("node {node}: {message} (code {code})")]
    Refused {
        /// The node (or socket path).
        node: String,
        /// CNI-style error code.
        code: u32,
        /// The agent's message.
        message: String,
    },
    /// The agent answered something else.
    #[error("node {node}: unexpected answer {answer}")]
    Unexpected {
        /// The node (or socket path).
        node: String,
        /// The answer, debug-printed.
        answer: String,
    },
}

/// Parses `PORT/PROTO` (or `PORT`, meaning TCP): a port 1-65535 and TCP, UDP or SCTP in
/// any case.
pub fn parse_port(text: &str) -> Result<(u16, Protocol), ExplainError> {
    let bad = |reason: String| ExplainError::from(policy::explain::ExplainError::BadPort { reason });
    let (port, protocol) = text.split_once('/').unwrap_or((text, "TCP"));
    let number: u16 = port
        .parse()
        .map_err(|_| bad(format!("{port:?} is not a port number (1-65535; named ports are not supported)")))?;
    if number == 0 {
        return Err(bad("port 0 is not a destination port (1-65535)".into()));
    }
    Ok((number, policy::explain::parse_protocol(protocol)?))
}

fn policy_list(list: &[PolicyName]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    list.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The human-readable form: a verdict line, then one row per side.
pub fn table(e: &Explanation) -> String {
    let mut rows = vec![[
        "SIDE".to_string(),
        "POD".into(),
        "ISOLATED BY".into(),
        "MODE".into(),
        "ALLOWED BY".into(),
        "VERDICT".into(),
    ]];
    for s in [&e.egress, &e.ingress] {
        let mode = match (s.isolated, s.audit_mode) {
            (false, _) => "not isolated",
            (true, false) => "enforce",
            (true, true) => "audit",
        };
        let allowed_by = s
            .allowed_by
            .as_ref()
            .map_or_else(|| "-".to_string(), |r| format!("{} {}[{}]", r.policy, r.direction, r.rule));
        rows.push([
            s.direction.as_str().to_string(),
            s.pod.to_string(),
            policy_list(&s.isolated_by),
            mode.into(),
            allowed_by,
            s.verdict.as_str().into(),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = format!("{} -> {} {}/{}: {}\n", e.from, e.to, e.port, e.protocol, e.verdict.as_str());
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The prefix of a Service in `TO`.
pub const SERVICE_PREFIX: &str = "svc:";

/// What `TO` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum To {
    /// A pod.
    Pod(bulkhead_api::NamespacedName),
    /// A Service (`svc:NAMESPACE/NAME`).
    Service(bulkhead_api::NamespacedName),
}

/// Parses `TO`: `NAMESPACE/NAME` or `svc:NAMESPACE/NAME`.
pub fn parse_to(text: &str) -> Result<To, ExplainError> {
    Ok(match text.strip_prefix(SERVICE_PREFIX) {
        Some(service) => To::Service(policy::explain::pod_ref("TO", service)?),
        None => To::Pod(policy::explain::pod_ref("TO", text)?),
    })
}

/// The human-readable form of a Service explanation: the Service line, then each backend
/// with its connection's table.
pub fn service_table(e: &ServiceExplanation) -> String {
    let vip = e.vip.map_or_else(|| "headless".to_string(), |v| format!("{v}:{}", e.port));
    let mode = match e.translated {
        true => "translated: decided on each backend",
        false => "not translated (services: false): decided on the ClusterIP",
    };
    let mut out = format!("{} -> svc:{} {}/{} ({vip}; {mode})\n", e.from, e.service, e.port, e.protocol);
    if !e.backends.iter().any(|b| b.selected) {
        out.push_str("no backend: a new connection is refused at once (no_service_backend)\n");
    }
    for b in &e.backends {
        let pod = b.pod.as_ref().map_or_else(|| "not a pod".to_string(), ToString::to_string);
        let selected = if b.selected { "" } else { " (not selected: not ready)" };
        let verdict = b.explanation.as_ref().map_or("decided by ipBlock rules", |x| x.verdict.as_str());
        out.push_str(&format!("\nbackend {}:{} {pod}{selected}: {verdict}\n", b.ip, b.port));
        if let Some(x) = &b.explanation {
            out.push_str(&table(x));
        }
    }
    out
}

/// Runs `bulkhead explain`; the exit code.
pub fn run(args: ExplainArgs) -> Result<i32, ExplainError> {
    // Checked here too, so bad input fails before any agent is looked for.
    let from = policy::explain::pod_ref("FROM", &args.from)?;
    let to = parse_to(&args.to)?;
    let (port, protocol) = parse_port(&args.port)?;
    let targets = observe::agent_targets(&args.agents).map_err(ExplainError::Target)?;
    // Every lab agent holds the whole cluster's model: the first one answers for all.
    let target = targets.into_iter().next().ok_or_else(|| ExplainError::NoNodes {
        lab_dir: args.agents.lab_dir.clone(),
    })?;
    let request = match to {
        To::Pod(to) => Request::Explain { from, to, port, protocol },
        To::Service(service) => Request::ExplainService {
            from,
            service,
            port,
            protocol,
        },
    };
    let node = target.node.clone();
    let json = |value: Result<String, serde_json::Error>| match value {
        Ok(json) => json + "\n",
        Err(e) => format!("{{\"error\": {:?}}}\n", e.to_string()),
    };
    let text = match (bulkhead_api::call(&target.socket, &request, TIMEOUT), args.output) {
        (Ok(Response::Explain(e)), Output::Table) => table(&e),
        (Ok(Response::Explain(e)), Output::Json) => json(serde_json::to_string_pretty(&e)),
        (Ok(Response::ExplainService(e)), Output::Table) => service_table(&e),
        (Ok(Response::ExplainService(e)), Output::Json) => json(serde_json::to_string_pretty(&e)),
        (Ok(Response::Error { code, message }), _) => return Err(ExplainError::Refused { node, code, message }),
        (Ok(other), _) => {
            return Err(ExplainError::Unexpected {
                node,
                answer: format!("{other:?}"),
            })
        }
        (Err(source), _) => return Err(ExplainError::Agent { node, source }),
    };
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_documents, Cluster};
    use crate::policy::explain::{self as model_explain, parse_protocol, pod_ref, respond};
    use bulkhead_api::{code, ExplainVerdict, NamespacedName};

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
    fn explain(c: &Cluster, from: &str, to: &str, port: u16, protocol: &str) -> Result<Explanation, model_explain::ExplainError> {
        let (from, to) = (pod_ref("FROM", from)?, pod_ref("TO", to)?);
        model_explain::explain(c, &from, &to, port, parse_protocol(protocol)?)
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

        let icmp = model_explain::explain(
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

    const SERVICE: &str = "
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 8000, targetPort: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 80, protocol: TCP}]
endpoints:
- {addresses: [10.9.0.1], targetRef: {kind: Pod, namespace: x, name: a}}
- {addresses: [10.9.0.2], targetRef: {kind: Pod, namespace: x, name: b}, conditions: {ready: false}}
- {addresses: [192.0.2.7]}
";

    #[test]
    fn a_service_is_explained_for_each_backend_on_its_target_port() {
        let c = Cluster::from_objects(parse_documents(&format!("{MODEL}{SERVICE}"), "test").unwrap());
        let (from, web) = (NamespacedName::new("y", "b"), NamespacedName::new("x", "web"));
        let e = model_explain::explain_service(&c, &from, &web, 8000, Protocol::TCP, true).unwrap();
        assert_eq!((e.vip, e.port_name.as_str()), (Some("10.96.0.20".parse().unwrap()), "http"));
        let rows: Vec<_> = e
            .backends
            .iter()
            .map(|b| {
                (
                    b.ip.to_string(),
                    b.port,
                    b.pod.as_ref().map(ToString::to_string),
                    b.selected,
                    b.explanation.as_ref().map(|x| x.verdict),
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                // y/b's egress is audited (audit-egress allows 53/UDP only).
                ("10.9.0.1".into(), 80, Some("x/a".into()), true, Some(ExplainVerdict::Audit)),
                ("10.9.0.2".into(), 80, Some("x/b".into()), false, Some(ExplainVerdict::Audit)),
                ("192.0.2.7".into(), 80, None, true, None),
            ]
        );
        // The backend's ingress policy saw the target port, 80: allow-b's rule.
        let a = e.backends[0].explanation.as_ref().unwrap();
        assert_eq!(
            (a.port, a.ingress.allowed_by.as_ref().map(|r| r.policy.name.as_str())),
            (80, Some("allow-b"))
        );
        let text = service_table(&e);
        assert!(text.starts_with("y/b -> svc:x/web 8000/TCP (10.96.0.20:8000; translated"), "{text}");
        assert!(text.contains("backend 10.9.0.2:80 x/b (not selected: not ready): AUDIT"), "{text}");

        // Bad input: a clear error naming what exists.
        let err = model_explain::explain_service(&c, &from, &web, 80, Protocol::TCP, true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "PORT/PROTO: service x/web has no port 80/TCP (its ports: 8000/TCP)"
        );
        let err = model_explain::explain_service(&c, &from, &NamespacedName::new("x", "nope"), 80, Protocol::TCP, true).unwrap_err();
        assert_eq!(err.to_string(), "TO: unknown service x/nope");
        assert_eq!(parse_to("svc:x/web").unwrap(), To::Service(web));
        assert_eq!(parse_to("x/web").unwrap(), To::Pod(NamespacedName::new("x", "web")));
        assert!(parse_to("svc:web").is_err());
    }
}
