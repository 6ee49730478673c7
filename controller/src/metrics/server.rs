//! The HTTP endpoint: `/metrics`, `/healthz` (ready) and `/livez` (alive), on an address or an
//! inherited socket.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};

use super::{Metrics, MetricsError};

/// Where to serve metrics: `--metrics-address` or an inherited listening socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// Do not serve.
    Disabled,
    /// Bind this address.
    Address(SocketAddr),
    /// Serve on this inherited, already listening TCP socket (the lab binds it in the host
    /// namespace, where Prometheus can reach it, and passes it to the agent).
    Fd(i32),
}

impl Listen {
    /// From the agent flags: `fd` wins; the address `none` disables.
    pub fn from_flags(address: &str, fd: Option<i32>) -> Result<Self, MetricsError> {
        if let Some(fd) = fd {
            return Ok(Listen::Fd(fd));
        }
        if address == "none" {
            return Ok(Listen::Disabled);
        }
        address.parse().map(Listen::Address).map_err(|e| MetricsError::Listen {
            op: "parse",
            address: address.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })
    }

    /// The listening socket, or `None` when disabled. Must run inside a tokio runtime.
    pub fn bind(&self) -> Result<Option<tokio::net::TcpListener>, MetricsError> {
        let std_listener = match self {
            Listen::Disabled => return Ok(None),
            Listen::Address(addr) => std::net::TcpListener::bind(addr).map_err(|source| MetricsError::Listen {
                op: "bind",
                address: addr.to_string(),
                source,
            })?,
            Listen::Fd(fd) => inherit_listener(*fd)?,
        };
        let name = format!("{self:?}");
        std_listener.set_nonblocking(true).map_err(|source| MetricsError::Listen {
            op: "set nonblocking",
            address: name.clone(),
            source,
        })?;
        tokio::net::TcpListener::from_std(std_listener)
            .map(Some)
            .map_err(|source| MetricsError::Listen {
                op: "register",
                address: name,
                source,
            })
    }
}

/// Takes ownership of an inherited listening TCP socket, after checking that it is one.
fn inherit_listener(fd: i32) -> Result<std::net::TcpListener, MetricsError> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let err = |op, source| MetricsError::Listen {
        op,
        address: format!("fd {fd}"),
        source,
    };
    let mut listening: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: getsockopt writes at most `len` bytes into `listening`; on a number that is
    // not an open socket it fails with EBADF or ENOTSOCK and touches nothing.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN, (&raw mut listening).cast(), &raw mut len) };
    if rc != 0 {
        return Err(err("check", std::io::Error::last_os_error()));
    }
    if listening == 0 {
        return Err(err(
            "check",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a listening socket"),
        ));
    }
    // SAFETY: fd is an open socket (getsockopt succeeded on it), nothing else in this
    // process owns it (it was inherited for this purpose only), and ownership moves here once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(std::net::TcpListener::from(owned))
}

/// What one scraper, or anything else that reaches the port (any pod can reach its node's
/// `:9962`), may take: the agent's memory and its runtime stay bounded whatever it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Time to send a request's head (hyper's header read timeout, with a timer).
    pub header_timeout: Duration,
    /// A connection's whole life, idle keep-alive included; the scraper reconnects.
    pub connection_lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 32,
            header_timeout: Duration::from_secs(5),
            connection_lifetime: Duration::from_secs(60),
        }
    }
}

/// The smallest read buffer hyper allows (8 KiB): a request head larger than that is refused,
/// which bounds what each connection can make the agent hold.
const MAX_REQUEST_HEAD: usize = 8192;

/// What the endpoint serves: the agent's [`Metrics`], or the relay's.
pub trait Exposition: Send + Sync + 'static {
    /// The exposition in the text format 0.0.4.
    fn encode(&self) -> Result<String, MetricsError>;
    /// `Ok` when ready, else why not (`/healthz`).
    fn health(&self) -> Result<(), String>;
    /// Counts a connection closed at once because every slot was taken.
    fn refused(&self);
}

impl Exposition for Metrics {
    fn encode(&self) -> Result<String, MetricsError> {
        Metrics::encode(self)
    }

    fn health(&self) -> Result<(), String> {
        // Ready: the maps hold the model. Degraded (a write failing, retried) is not ready.
        match (self.is_ready(), self.degraded()) {
            (false, _) => Err("maps not programmed yet".into()),
            (true, Some(why)) => Err(format!("degraded: {why}")),
            (true, None) => Ok(()),
        }
    }

    fn refused(&self) {
        self.connections_refused.inc();
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped.
pub async fn serve<M: Exposition>(metrics: Arc<M>, listener: tokio::net::TcpListener) {
    serve_with(metrics, listener, Limits::default()).await;
}

/// [`serve`] with explicit [`Limits`].
pub async fn serve_with<M: Exposition>(metrics: Arc<M>, listener: tokio::net::TcpListener, limits: Limits) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept");
                // Out of fds and similar: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Full: close at once rather than queue (a queue is memory an attacker controls).
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.refused();
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                // Encoding may walk the conntrack map (cached, see `Metrics::encode`): off
                // the runtime's workers, which also serve the CNI plugin and read flows.
                async move {
                    let response = tokio::task::spawn_blocking(move || respond(&*metrics, &req))
                        .await
                        .unwrap_or_else(|_| {
                            let mut r = Response::new(Full::new(Bytes::from("metrics encoder failed\n")));
                            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            r
                        });
                    Ok::<_, Infallible>(response)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(MAX_REQUEST_HEAD)
                .serve_connection(io, service);
            match tokio::time::timeout(limits.connection_lifetime, connection).await {
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection"),
                Err(_) => tracing::debug!("metrics connection closed at the end of its lifetime"),
                Ok(Ok(())) => {}
            }
        });
    }
}

fn respond<M: Exposition>(metrics: &M, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => match metrics.encode() {
            Ok(text) => reply(StatusCode::OK, prometheus::TEXT_FORMAT, text),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{}\n", crate::error_chain(&e)),
            ),
        },
        "/healthz" => match metrics.health() {
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n")),
            Ok(()) => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        },
        // Alive: the process serves. Restarting a degraded agent would not help (the maps are
        // pinned; it would retry the same writes), so liveness does not look at the maps.
        "/livez" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /livez\n".into(),
        ),
    }
}
