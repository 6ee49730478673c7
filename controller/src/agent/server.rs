//! The endpoint socket: one request per connection, answered from the agent's state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_api::{EndpointSpec, Envelope, Request, Response, MAX_LINE_BYTES};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::flows::{self, FlowStore};
use crate::metrics::Metrics;

use super::actor::{AgentHandle, Stopped};
use super::POD_WAIT;
use crate::error_chain;
use bulkhead_api::code;

/// Serves one request and counts it in `bulkhead_cni_requests_total`.
pub(super) async fn handle(agent: &AgentHandle, metrics: &Metrics, request: Request) -> Response {
    let verb = match &request {
        Request::AddEndpoint(_) => "add",
        Request::DelEndpoint(_) => "del",
        Request::CheckEndpoint(_) => "check",
        Request::Reload => "reload",
        Request::Status => "status",
        Request::Gc { .. } => "gc",
        Request::Observe(_) => "observe",
        Request::Explain { .. } => "explain",
        Request::ExplainService { .. } => "explain",
        Request::RelayStatus => "relay_status",
        Request::Quarantine { .. } => "quarantine",
        Request::Anomalies(_) => "anomalies",
        Request::Forensics { .. } => "forensics",
    };
    let response = dispatch(agent, request).await;
    metrics.cni_request(verb, !matches!(response, Response::Error { .. }));
    response
}

pub(super) async fn dispatch(agent: &AgentHandle, request: Request) -> Response {
    let answer = match request {
        Request::AddEndpoint(spec) => add(agent, spec).await,
        Request::DelEndpoint(r) => agent.call(move |a| a.del_endpoint(&r)).await,
        Request::CheckEndpoint(r) => agent.call(move |a| a.check_endpoint(&r)).await,
        Request::Gc { network, valid } => agent.call(move |a| a.gc(&network, &valid)).await,
        Request::Reload => {
            agent
                .call(|a| match a.refresh(true) {
                    Ok(()) => Response::Ok,
                    Err(e) => {
                        a.metrics.error(e.kind());
                        Response::Error {
                            code: code::AGENT_REJECTED,
                            message: error_chain(&e),
                        }
                    }
                })
                .await
        }
        Request::Status => agent.call(|a| Response::Status(a.status())).await,
        Request::Explain { from, to, port, protocol } => {
            agent
                .call(move |a| crate::policy::explain::respond(&a.cluster, &from, &to, port, &protocol))
                .await
        }
        Request::ExplainService {
            from,
            service,
            port,
            protocol,
        } => {
            agent
                .call(move |a| {
                    let translated = a.services.enabled();
                    crate::policy::explain::respond_service(&a.cluster, &from, &service, port, &protocol, translated)
                })
                .await
        }
        Request::RelayStatus => Ok(Response::Error {
            code: code::INVALID_REQUEST,
            message: "relay_status is a relay's request; this is an agent".into(),
        }),
        Request::Anomalies(_) => Ok(Response::Error {
            code: code::INVALID_REQUEST,
            message: "anomalies is a relay's request; this is an agent".into(),
        }),
        Request::Quarantine { pod, reason, release } => agent.call(move |a| a.quarantine_request(pod, reason, release)).await,
        Request::Forensics { pod } => agent.call(move |a| a.forensics(&pod)).await,
        // Streams are answered by `serve_connection`, which never gets here with one.
        Request::Observe(_) => Ok(Response::Error {
            code: code::DECODING_FAILURE,
            message: "observe is a stream request".into(),
        }),
    };
    answer.unwrap_or_else(|e| Response::Error {
        code: code::AGENT_REJECTED,
        message: e.to_string(),
    })
}

/// An ADD waits (off the agent's thread) for the agent's first sync and for its pod.
async fn add(agent: &AgentHandle, spec: EndpointSpec) -> Result<Response, Stopped> {
    let spec = Arc::new(spec);
    let deadline = Instant::now() + POD_WAIT;
    loop {
        let attempt = spec.clone();
        let expired = Instant::now() > deadline;
        let answer = agent
            .call_with_reply(move |a, reply| {
                if let Err(reply) = a.try_admit(&attempt, reply) {
                    let _ = reply.send(expired.then(|| a.not_yet(&attempt)));
                }
            })
            .await?;
        if let Some(response) = answer {
            return Ok(response);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads one request line: at most [`MAX_LINE_BYTES`], within [`REQUEST_TIMEOUT`], at a
/// protocol version this agent speaks.
async fn read_request<R: AsyncBufRead + Unpin>(read: &mut R) -> Result<Request, Response> {
    let refuse = |message: String| Response::Error {
        code: code::DECODING_FAILURE,
        message,
    };
    let mut line = String::new();
    let limit = u64::try_from(MAX_LINE_BYTES).unwrap_or(u64::MAX).saturating_add(1);
    match tokio::time::timeout(REQUEST_TIMEOUT, read.take(limit).read_line(&mut line)).await {
        Err(_) => return Err(refuse(format!("no request within {REQUEST_TIMEOUT:?}"))),
        Ok(Err(e)) => return Err(refuse(format!("reading request: {e}"))),
        Ok(Ok(n)) if n > MAX_LINE_BYTES => return Err(refuse(format!("request longer than {MAX_LINE_BYTES} bytes"))),
        Ok(Ok(_)) => {}
    }
    serde_json::from_str::<Envelope>(&line)
        .map_err(|e| refuse(format!("malformed request: {e}")))?
        .into_request()
}

pub(super) async fn serve_connection(agent: AgentHandle, flows: Arc<FlowStore>, metrics: Arc<Metrics>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let response = match read_request(&mut read).await {
        // Not on the agent's thread: the flow store has its own lock, held only briefly.
        Ok(Request::Observe(request)) => return flows::serve(flows, *request, read, write).await,
        Ok(request) => handle(&agent, &metrics, request).await,
        Err(refused) => refused,
    };
    let Ok(mut out) = serde_json::to_vec(&response) else { return };
    out.push(b'\n');
    if let Err(e) = write.write_all(&out).await {
        tracing::debug!(error = %e, "client went away");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(text: &[u8]) -> Result<Request, Response> {
        read_request(&mut BufReader::new(text)).await
    }

    fn code_of(r: Result<Request, Response>) -> u32 {
        match r {
            Err(Response::Error { code, .. }) => code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn requests_are_framed_versioned_and_bounded() {
        assert_eq!(read(b"{\"v\":1,\"op\":\"status\"}\n").await.unwrap(), Request::Status);
        // A client from before versions: v defaults to 1.
        assert_eq!(read(b"{\"op\":\"status\"}\n").await.unwrap(), Request::Status);
        assert_eq!(code_of(read(b"{\"v\":2,\"op\":\"status\"}\n").await), code::INCOMPATIBLE_VERSION);
        assert_eq!(code_of(read(b"{\"op\":\"nope\"}\n").await), code::DECODING_FAILURE);
        let mut long = b"{\"op\":\"status\",\"pad\":\"".to_vec();
        long.resize(MAX_LINE_BYTES + 10, b'x');
        long.extend_from_slice(b"\"}\n");
        let r = read(&long).await;
        assert_eq!(code_of(r), code::DECODING_FAILURE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_times_out() {
        let (_client, server) = tokio::io::duplex(64);
        let r = read_request(&mut BufReader::new(server)).await;
        assert_eq!(code_of(r), code::DECODING_FAILURE);
    }
}
