//! The relay's clients: `bulkhead observe --relay` (the agents' observe protocol, with gaps
//! on request) and `bulkhead relay status`, on a Unix socket (mode 0600) and/or TCP (the
//! token required in the request).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_api::{code, Envelope, Flow, Gap, ObserveRequest, RelayAddr, Request, Response, MAX_LINE_BYTES};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::broadcast;

use super::store::{Entry, Record};
use super::{RelayError, ServeArgs, Shared};
use crate::cli::Output;
use crate::flows::stream::Token;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize)]
struct GapRef<'a> {
    gap: &'a Gap,
}

/// Binds the listeners and starts their accept loops.
pub async fn start(shared: Arc<Shared>, args: &ServeArgs, token: Arc<Token>) -> Result<(), RelayError> {
    if let Some(path) = &args.socket {
        let listener = bind_private(path).map_err(|source| RelayError::Io {
            op: "bind",
            what: path.display().to_string(),
            source,
        })?;
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(serve_client(shared.clone(), None, s));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    if let Some(addr) = &args.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| RelayError::Io {
            op: "bind",
            what: addr.clone(),
            source,
        })?;
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        let _ = s.set_nodelay(true);
                        tokio::spawn(serve_client(shared.clone(), Some(token.clone()), s));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    Ok(())
}

/// Binds a Unix socket that is owner-only from its first instant (see the agent's).
fn bind_private(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use nix::sys::stat::{umask, Mode};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let previous = umask(Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    umask(previous);
    bound
}

async fn write_line<W: AsyncWrite + Unpin>(out: &mut W, value: &impl Serialize) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line).await
}

/// One client: a request line (with the token when `token` is set), then the answer.
pub(super) async fn serve_client<S: AsyncRead + AsyncWrite + Unpin>(shared: Arc<Shared>, token: Option<Arc<Token>>, stream: S) {
    let (read, write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    let mut out = BufWriter::new(write);
    let mut line = String::new();
    let limit = u64::try_from(MAX_LINE_BYTES).unwrap_or(u64::MAX);
    let got = tokio::time::timeout(REQUEST_TIMEOUT, (&mut read).take(limit).read_line(&mut line)).await;
    let envelope = match got {
        Ok(Ok(n)) if n > 0 => serde_json::from_str::<Envelope>(&line).ok(),
        _ => None,
    };
    let refuse = |code, message: &str| Response::Error {
        code,
        message: message.to_string(),
    };
    let authorized = token
        .as_ref()
        .is_none_or(|t| envelope.as_ref().and_then(|e| e.token.as_deref()).is_some_and(|g| t.matches(g)));
    let answer = match envelope {
        // Authentication first: an unauthenticated client learns nothing else.
        _ if !authorized => refuse(code::UNAUTHORIZED, "unauthorized"),
        None => refuse(code::DECODING_FAILURE, "malformed request"),
        Some(e) => match e.into_request() {
            Err(r) => r,
            Ok(Request::Observe(request)) => return observe(shared, *request, read, out).await,
            Ok(Request::Anomalies(request)) => return anomalies(shared, *request, read, out).await,
            Ok(Request::RelayStatus) => relay_status(&shared),
            Ok(_) => refuse(
                code::INVALID_REQUEST,
                "this is a relay: it answers observe, anomalies and relay_status",
            ),
        },
    };
    let _ = write_line(&mut out, &answer).await;
    let _ = out.flush().await;
}

/// The answer to `Request::RelayStatus`.
fn relay_status(shared: &Shared) -> Response {
    let mut status = shared.lock().store.status();
    status.anomalies = shared.detection.log().total();
    Response::RelayStatus(Box::new(status))
}

/// [`relay_status`], for tests.
#[cfg(test)]
pub(super) fn status_for_tests(shared: &Shared) -> Response {
    relay_status(shared)
}

fn write_entry(e: &Entry) -> Option<Vec<u8>> {
    let mut line = match &e.record {
        Record::Flow(f) => serde_json::to_vec::<Flow>(f),
        Record::Gap(gap) => serde_json::to_vec(&GapRef { gap }),
    }
    .ok()?;
    line.push(b'\n');
    Some(line)
}

fn wanted(request: &ObserveRequest, e: &Entry) -> bool {
    request.since.is_none_or(|s| e.key.unix_ns >= i128::from(s))
        && match &e.record {
            Record::Flow(f) => request.filter.matches(f),
            Record::Gap(_) => request.gaps,
        }
}

/// Answers an observe request from the merged history, then follows (same semantics as
/// an agent's). Only this task waits on this client.
async fn observe<R, W>(shared: Arc<Shared>, request: ObserveRequest, mut client: R, mut out: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if let Err(message) = crate::flows::validate(&request) {
        let _ = write_line(
            &mut out,
            &Response::Error {
                code: code::INVALID_REQUEST,
                message,
            },
        )
        .await;
        let _ = out.flush().await;
        return;
    }
    let (history, rx) = shared.lock().store.query(&request);
    for e in &history {
        if let Some(line) = write_entry(e) {
            if out.write_all(&line).await.is_err() {
                return;
            }
        }
    }
    if out.flush().await.is_err() {
        return;
    }
    let Some(mut rx) = rx else { return };
    let mut scratch = [0u8; 64];
    loop {
        tokio::select! {
            received = rx.recv() => match received {
                Ok(e) => {
                    if wanted(&request, &e) {
                        if let Some(line) = write_entry(&e) {
                            if out.write_all(&line).await.is_err() {
                                return;
                            }
                        }
                    }
                    if rx.is_empty() && out.flush().await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => shared.lock().store.note_lagged(missed),
                Err(broadcast::error::RecvError::Closed) => return,
            },
            read = client.read(&mut scratch) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

/// Answers an anomalies request: the kept anomalies it asks for, one JSON line each,
/// then (`follow`) new ones as they are raised, until the client closes.
pub async fn anomalies<R, W>(shared: Arc<Shared>, request: bulkhead_api::AnomalyRequest, mut client: R, mut out: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (history, rx) = shared.detection.log().query(&request);
    for a in &history {
        if write_line(&mut out, &**a).await.is_err() {
            return;
        }
    }
    if out.flush().await.is_err() {
        return;
    }
    let Some(mut rx) = rx else { return };
    let mut scratch = [0u8; 64];
    loop {
        tokio::select! {
            received = rx.recv() => match received {
                Ok(a) => {
                    if super::detect::wanted(&request, &a) && (write_line(&mut out, &*a).await.is_err() || out.flush().await.is_err()) {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "an anomalies follower fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            read = client.read(&mut scratch) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

/// `bulkhead relay status` flags.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The relay: `HOST:PORT` or a socket path (default: the lab's relay).
    #[arg(long)]
    pub relay: Option<String>,
    /// Token file for a TCP relay.
    #[arg(long, env = "BULKHEAD_RELAY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Lab state dir, to find the lab's relay.
    #[arg(long, env = "BULKHEAD_LAB_DIR", default_value = "/run/bulkhead/lab")]
    pub lab_dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Where a CLI finds the relay: `ADDR` (`lab`: the relay of the lab in `lab_dir`), and the
/// token to present over TCP.
pub fn client_target(
    addr: &str,
    token_file: Option<&std::path::Path>,
    lab_dir: &std::path::Path,
) -> Result<(RelayAddr, Option<String>), RelayError> {
    let relay: RelayAddr = if addr == "lab" {
        let paths = crate::lab::LabPaths::new(lab_dir)?;
        paths.load_up()?;
        RelayAddr::Unix(crate::lab::relay_socket(&paths))
    } else {
        addr.parse().map_err(RelayError::Usage)?
    };
    let token = match (&relay, token_file) {
        (RelayAddr::Tcp(_), Some(f)) => Some(Token::read(f)?.text()),
        (RelayAddr::Tcp(a), None) => return Err(RelayError::Usage(format!("relay {a} is TCP: give --token-file"))),
        (RelayAddr::Unix(_), _) => None,
    };
    Ok((relay, token))
}

/// Runs `bulkhead relay status`.
pub fn status(args: &StatusArgs) -> Result<i32, RelayError> {
    let (relay, token) = client_target(args.relay.as_deref().unwrap_or("lab"), args.token_file.as_deref(), &args.lab_dir)?;
    let answer =
        bulkhead_api::call_relay(&relay, token, &Request::RelayStatus, Duration::from_secs(10)).map_err(|source| RelayError::Client {
            addr: relay.to_string(),
            source,
        })?;
    let status = match answer {
        Response::RelayStatus(s) => s,
        Response::Error { message, .. } => {
            return Err(RelayError::Refused {
                addr: relay.to_string(),
                message,
            })
        }
        other => {
            return Err(RelayError::Refused {
                addr: relay.to_string(),
                message: format!("unexpected answer {other:?}"),
            })
        }
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status).unwrap_or_default()),
        Output::Table => {
            println!(
                "{:<10} {:<22} {:<9} {:>10} {:>10} {:>6} {:>9} {:>6}  ERROR",
                "NODE", "ADDRESS", "CONNECTED", "LAST SEQ", "RECEIVED", "DUPS", "MISSING", "RESETS"
            );
            for n in &status.nodes {
                println!(
                    "{:<10} {:<22} {:<9} {:>10} {:>10} {:>6} {:>9} {:>6}  {}",
                    n.node,
                    n.address,
                    n.connected,
                    n.cursor.map_or("-".into(), |c| c.seq.to_string()),
                    n.received,
                    n.duplicates,
                    format!("{} ({})", n.missing, n.gaps),
                    n.resets,
                    n.error.as_deref().unwrap_or("")
                );
            }
            println!(
                "history {}/{}, late {}, follower lag drops {}, anomalies {}",
                status.stored, status.capacity, status.late, status.follower_lag_drops, status.anomalies
            );
        }
    }
    Ok(0)
}
