//! The blocking client: one request per connection, or an observe stream.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::flow::{Flow, ObserveRequest};
use crate::frame::{read_line_limited, Envelope, MAX_LINE_BYTES};
use crate::message::{Request, Response};

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

/// One line of an observe stream: a flow, or the agent's error (sent instead of any flow).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ObserveLine {
    Flow(Box<Flow>),
    Response(Response),
}

/// The flows an agent streams for [`Request::Observe`]; ends when the agent closes.
pub struct ObserveStream {
    path: PathBuf,
    reader: BufReader<UnixStream>,
}

impl Iterator for ObserveStream {
    type Item = Result<Flow, ObserveError>;

    fn next(&mut self) -> Option<Self::Item> {
        match read_line_limited(&mut self.reader, MAX_LINE_BYTES) {
            Ok(None) => None,
            Ok(Some(line)) => Some(match serde_json::from_str::<ObserveLine>(&line) {
                Ok(ObserveLine::Flow(f)) => Ok(*f),
                Ok(ObserveLine::Response(Response::Error { code, message })) => Err(ObserveError::Refused {
                    path: self.path.clone(),
                    code,
                    message,
                }),
                Ok(ObserveLine::Response(other)) => Err(ObserveError::Refused {
                    path: self.path.clone(),
                    code: 0,
                    message: format!("unexpected answer {other:?}"),
                }),
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
        reader: BufReader::new(stream),
    })
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
