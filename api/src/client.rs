//! The blocking client: one request per connection, or an observe stream.

use std::io::{BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::flow::{Flow, ObserveRequest};
use crate::frame::{read_line_limited, Envelope, MAX_LINE_BYTES};
use crate::message::{Request, Response};
use crate::relay::{Gap, GapLine};

/// How long connecting to a relay over TCP may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be reached.
    #[error("cannot connect to agent socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("agent socket {path}: i/o error")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent answered something that is not a response.
    #[error("agent socket {path}: malformed response")]
    Decode {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Why an observe stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The socket failed or the agent answered garbage.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The agent refused the request.
    #[error("agent socket {path}: {message} (code {code})")]
    Refused {
        /// Socket path.
        path: PathBuf,
        /// CNI-style error code.
        code: u32,
        /// The agent's message.
        message: String,
    },
}

/// Connects to `socket`, sets the timeouts and writes `request` as one framed line.
fn send(socket: &Path, request: Request, read_timeout: Option<Duration>, write_timeout: Duration) -> Result<UnixStream, ApiError> {
    let io = |source| ApiError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ApiError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(read_timeout).map_err(io)?;
    stream.set_write_timeout(Some(write_timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(&Envelope::new(request)).map_err(|source| ApiError::Decode {
        path: socket.to_path_buf(),
        source,
    })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    Ok(stream)
}

/// Sends one request and waits up to `timeout` for the answer.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ApiError> {
    let stream = send(socket, request.clone(), Some(timeout), timeout)?;
    // The agent closing without an answer reads as an empty line: a decode error.
    let answer = read_line_limited(&mut BufReader::new(stream), MAX_LINE_BYTES)
        .map_err(|source| ApiError::Io {
            path: socket.to_path_buf(),
            source,
        })?
        .unwrap_or_default();
    serde_json::from_str(&answer).map_err(|source| ApiError::Decode {
        path: socket.to_path_buf(),
        source,
    })
}

/// One line of an observe stream: a flow, a relay's gap (when asked for), or the agent's
/// error (sent instead of any flow).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ObserveLine {
    Flow(Box<Flow>),
    Gap(GapLine),
    Response(Response),
}

/// An item of an observe stream: a flow, or records a relay knows it never received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObserveEvent {
    /// A flow record.
    Flow(Box<Flow>),
    /// A gap (only for requests with `gaps: true`).
    Gap(Gap),
}

/// The flows an agent (or a relay) streams for [`Request::Observe`]; ends when it closes.
/// As an iterator it yields flows (skipping gaps); [`ObserveStream::events`] yields both.
pub struct ObserveStream {
    path: PathBuf,
    reader: BufReader<Box<dyn Read + Send>>,
}

impl ObserveStream {
    /// Flows and gaps, in the order the server sent them.
    pub fn events(self) -> ObserveEvents {
        ObserveEvents(self)
    }

    fn next_event(&mut self) -> Option<Result<ObserveEvent, ObserveError>> {
        match read_line_limited(&mut self.reader, MAX_LINE_BYTES) {
            Ok(None) => None,
            Ok(Some(line)) => Some(match serde_json::from_str::<ObserveLine>(&line) {
                Ok(ObserveLine::Flow(f)) => Ok(ObserveEvent::Flow(f)),
                Ok(ObserveLine::Gap(g)) => Ok(ObserveEvent::Gap(g.gap)),
                Ok(ObserveLine::Response(r)) => Err(refused(&self.path, r)),
                Err(source) => Err(ApiError::Decode {
                    path: self.path.clone(),
                    source,
                }
                .into()),
            }),
            Err(source) => Some(Err(ApiError::Io {
                path: self.path.clone(),
                source,
            }
            .into())),
        }
    }
}

/// A stream's answer that is no record: the server's error, or something it should not send.
fn refused(path: &std::path::Path, response: Response) -> ObserveError {
    match response {
        Response::Error { code, message } => ObserveError::Refused {
            path: path.to_path_buf(),
            code,
            message,
        },
        other => ObserveError::Refused {
            path: path.to_path_buf(),
            code: 0,
            message: format!("unexpected answer {other:?}"),
        },
    }
}

impl Iterator for ObserveStream {
    type Item = Result<Flow, ObserveError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.next_event()? {
                Ok(ObserveEvent::Flow(f)) => return Some(Ok(*f)),
                Ok(ObserveEvent::Gap(_)) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Flows and gaps of an observe stream; see [`ObserveStream::events`].
pub struct ObserveEvents(ObserveStream);

impl Iterator for ObserveEvents {
    type Item = Result<ObserveEvent, ObserveError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next_event()
    }
}

/// Sends an observe request; the flows arrive through the returned iterator.
///
/// `idle_timeout` bounds the wait for each line (use `None` with `follow`, where the
/// agent may stay quiet for as long as nothing happens).
pub fn observe(socket: &Path, request: &ObserveRequest, idle_timeout: Option<Duration>) -> Result<ObserveStream, ApiError> {
    let stream = send(
        socket,
        Request::Observe(Box::new(request.clone())),
        idle_timeout,
        Duration::from_secs(5),
    )?;
    Ok(ObserveStream {
        path: socket.to_path_buf(),
        reader: BufReader::new(Box::new(stream)),
    })
}

/// Where a relay serves: `HOST:PORT` over TCP (the token is required there) or a Unix
/// socket path (anything with a `/`; its file mode is the authentication).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayAddr {
    /// `HOST:PORT`.
    Tcp(String),
    /// A socket path.
    Unix(PathBuf),
}

impl std::str::FromStr for RelayAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.contains('/') {
            return Ok(RelayAddr::Unix(PathBuf::from(text)));
        }
        match text.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(RelayAddr::Tcp(text.to_string())),
            _ => Err(format!("{text:?} is neither HOST:PORT nor a socket path")),
        }
    }
}

impl std::fmt::Display for RelayAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayAddr::Tcp(a) => f.write_str(a),
            RelayAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A connected stream to anything that reads and writes.
trait Duplex: Read + Write + Send {}
impl<T: Read + Write + Send> Duplex for T {}

/// Connects to a relay and writes `request` with `token` as one framed line.
fn send_relay(
    addr: &RelayAddr,
    token: Option<String>,
    request: Request,
    read_timeout: Option<Duration>,
) -> Result<Box<dyn Duplex>, ApiError> {
    let path = PathBuf::from(addr.to_string());
    let io = |source| ApiError::Io {
        path: path.clone(),
        source,
    };
    let connect = |source| ApiError::Connect {
        path: path.clone(),
        source,
    };
    let mut stream: Box<dyn Duplex> = match addr {
        RelayAddr::Unix(p) => {
            let s = UnixStream::connect(p).map_err(connect)?;
            s.set_read_timeout(read_timeout).map_err(io)?;
            s.set_write_timeout(Some(CONNECT_TIMEOUT)).map_err(io)?;
            Box::new(s)
        }
        RelayAddr::Tcp(a) => {
            let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
            let mut connected = None;
            for sa in a.to_socket_addrs().map_err(connect)? {
                match TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT) {
                    Ok(s) => {
                        connected = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = connected.ok_or_else(|| connect(last))?;
            s.set_read_timeout(read_timeout).map_err(io)?;
            s.set_write_timeout(Some(CONNECT_TIMEOUT)).map_err(io)?;
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
    };
    let mut envelope = Envelope::new(request);
    envelope.token = token;
    let mut line = serde_json::to_vec(&envelope).map_err(|source| ApiError::Decode {
        path: path.clone(),
        source,
    })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    Ok(stream)
}

/// Sends an observe request to a relay; flows (and gaps, if asked) arrive through the
/// returned stream.
pub fn observe_relay(
    addr: &RelayAddr,
    token: Option<String>,
    request: &ObserveRequest,
    idle_timeout: Option<Duration>,
) -> Result<ObserveStream, ApiError> {
    let stream = send_relay(addr, token, Request::Observe(Box::new(request.clone())), idle_timeout)?;
    Ok(ObserveStream {
        path: PathBuf::from(addr.to_string()),
        reader: BufReader::new(Box::new(stream)),
    })
}

/// The anomalies a relay streams for [`Request::Anomalies`]; ends when it closes.
pub struct AnomalyStream {
    path: PathBuf,
    reader: BufReader<Box<dyn Read + Send>>,
}

/// One line of an anomalies stream: an anomaly, or the relay's error.
#[derive(Deserialize)]
#[serde(untagged)]
enum AnomalyLine {
    Anomaly(Box<crate::anomaly::Anomaly>),
    Response(Response),
}

impl Iterator for AnomalyStream {
    type Item = Result<crate::anomaly::Anomaly, ObserveError>;

    fn next(&mut self) -> Option<Self::Item> {
        let line = match read_line_limited(&mut self.reader, MAX_LINE_BYTES) {
            Ok(None) => return None,
            Ok(Some(line)) => line,
            Err(source) => {
                return Some(Err(ApiError::Io {
                    path: self.path.clone(),
                    source,
                }
                .into()))
            }
        };
        Some(match serde_json::from_str::<AnomalyLine>(&line) {
            Ok(AnomalyLine::Anomaly(a)) => Ok(*a),
            Ok(AnomalyLine::Response(r)) => Err(refused(&self.path, r)),
            Err(source) => Err(ApiError::Decode {
                path: self.path.clone(),
                source,
            }
            .into()),
        })
    }
}

/// Asks a relay for anomalies (`Request::Anomalies`); they arrive through the returned
/// iterator, history first, then (with `follow`) new ones.
pub fn anomalies_relay(
    addr: &RelayAddr,
    token: Option<String>,
    request: &crate::anomaly::AnomalyRequest,
    idle_timeout: Option<Duration>,
) -> Result<AnomalyStream, ApiError> {
    let stream = send_relay(addr, token, Request::Anomalies(Box::new(request.clone())), idle_timeout)?;
    Ok(AnomalyStream {
        path: PathBuf::from(addr.to_string()),
        reader: BufReader::new(Box::new(stream)),
    })
}

/// Sends one request to a relay and waits up to `timeout` for the answer.
pub fn call_relay(addr: &RelayAddr, token: Option<String>, request: &Request, timeout: Duration) -> Result<Response, ApiError> {
    let path = PathBuf::from(addr.to_string());
    let stream = send_relay(addr, token, request.clone(), Some(timeout))?;
    let answer = read_line_limited(&mut BufReader::new(stream), MAX_LINE_BYTES)
        .map_err(|source| ApiError::Io {
            path: path.clone(),
            source,
        })?
        .unwrap_or_default();
    serde_json::from_str(&answer).map_err(|source| ApiError::Decode { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_line_in_an_observe_stream_is_a_response() {
        let line: ObserveLine = serde_json::from_str(r#"{"result":"error","code":6,"message":"bad"}"#).unwrap();
        assert!(matches!(line, ObserveLine::Response(Response::Error { code: 6, .. })));
    }

    #[test]
    fn call_sends_the_version_and_refuses_an_overlong_answer() {
        use std::io::{BufRead, Write};
        use std::os::unix::net::UnixListener;

        let dir = std::env::temp_dir().join(format!("bulkhead-api-call-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let mut got = Vec::new();
            for answer in [r#"{"result":"ok"}"#.to_string(), "x".repeat(MAX_LINE_BYTES + 1)] {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                got.push(line);
                // The client may hang up early on the long answer: ignore write errors.
                let _ = writeln!(reader.get_mut(), "{answer}");
            }
            got
        });
        let timeout = Duration::from_secs(5);
        assert_eq!(call(&socket, &Request::Status, timeout).unwrap(), Response::Ok);
        match call(&socket, &Request::Status, timeout) {
            Err(ApiError::Io { source, .. }) => assert!(source.to_string().contains("longer than"), "{source}"),
            other => panic!("{other:?}"),
        }
        let got = server.join().unwrap();
        assert_eq!(got[0], "{\"v\":1,\"op\":\"status\"}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
