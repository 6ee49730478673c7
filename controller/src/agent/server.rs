//! The endpoint socket: one request per connection, answered from the agent's state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_api::{Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use crate::flows::{self, FlowStore};
use crate::metrics::Metrics;

use super::core::Agent;
use super::POD_WAIT;
use crate::error_chain;
use bulkhead_api::code;

/// Serves one request and counts it in `bulkhead_cni_requests_total`.
pub(super) async fn handle(agent: &Mutex<Agent>, metrics: &Metrics, request: Request) -> Response {
    let verb = match &request {
        Request::AddEndpoint(_) => "add",
        Request::DelEndpoint(_) => "del",
        Request::CheckEndpoint(_) => "check",
        Request::Reload => "reload",
        Request::Status => "status",
        Request::Gc { .. } => "gc",
        Request::Observe(_) => "observe",
        Request::Explain { .. } => "explain",
    };
    let response = dispatch(agent, request).await;
    metrics.cni_request(verb, !matches!(response, Response::Error { .. }));
    response
}

pub(super) async fn dispatch(agent: &Mutex<Agent>, request: Request) -> Response {
    match request {
        Request::AddEndpoint(spec) => {
            let deadline = Instant::now() + POD_WAIT;
            loop {
                {
                    let mut a = agent.lock().await;
                    // The pod may have been written after the last poll: re-read before waiting.
                    if a.cluster.pod(&spec.pod_namespace, &spec.pod_name).is_none() {
                        if let Err(e) = a.refresh(true) {
                            a.metrics.error(e.kind());
                            tracing::warn!(error = %error_chain(&e), "reloading the model");
                        }
                    }
                    if a.ready && a.cluster.pod(&spec.pod_namespace, &spec.pod_name).is_some() {
                        return a.add_endpoint(spec);
                    }
                    if Instant::now() > deadline {
                        let message = if a.ready {
                            format!("pod {}/{} is not known to the agent yet", spec.pod_namespace, spec.pod_name)
                        } else {
                            "the agent has not finished its first sync with the cluster".to_string()
                        };
                        return Response::Error {
                            code: code::TRY_AGAIN_LATER,
                            message,
                        };
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Request::DelEndpoint(r) => agent.lock().await.del_endpoint(&r),
        Request::CheckEndpoint(r) => agent.lock().await.check_endpoint(&r),
        Request::Gc { network, valid } => agent.lock().await.gc(&network, &valid),
        Request::Reload => {
            let mut a = agent.lock().await;
            match a.refresh(true) {
                Ok(()) => Response::Ok,
                Err(e) => {
                    a.metrics.error(e.kind());
                    Response::Error {
                        code: code::AGENT_REJECTED,
                        message: error_chain(&e),
                    }
                }
            }
        }
        Request::Status => Response::Status(agent.lock().await.status()),
        Request::Explain { from, to, port, protocol } => {
            crate::policy::explain::respond(&agent.lock().await.cluster, &from, &to, port, &protocol)
        }
        // Streams are answered by `serve_connection`, which never gets here with one.
        Request::Observe(_) => Response::Error {
            code: code::DECODING_FAILURE,
            message: "observe is a stream request".into(),
        },
    }
}

pub(super) async fn serve_connection(agent: Arc<Mutex<Agent>>, flows: Arc<FlowStore>, metrics: Arc<Metrics>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut read = BufReader::new(read);
    let response = match read.read_line(&mut line).await {
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            // Needs no agent lock: the flow store has its own, held only briefly.
            Ok(Request::Observe(request)) => return flows::serve(flows, request, read, write).await,
            Ok(request) => handle(&agent, &metrics, request).await,
            Err(e) => Response::Error {
                code: code::DECODING_FAILURE,
                message: format!("malformed request: {e}"),
            },
        },
        Err(e) => Response::Error {
            code: code::DECODING_FAILURE,
            message: format!("reading request: {e}"),
        },
    };
    let Ok(mut out) = serde_json::to_vec(&response) else { return };
    out.push(b'\n');
    if let Err(e) = write.write_all(&out).await {
        tracing::debug!(error = %e, "client went away");
    }
}
