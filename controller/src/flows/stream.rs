//! The agent's flow port: this node's records with their sequence numbers, for
//! `bulkhead relay`, over TCP.
//!
//! A reader must present the token (compared in constant time) in its first line before
//! the agent writes anything but a refusal; pods can reach a node's addresses, so the token
//! is what keeps the port closed to them. Each reader's task reads the history by sequence
//! number and waits on a watch of the next number: the flow reader never waits for it. A
//! reader that falls behind by more than the history holds skips ahead to the oldest record
//! held, which it sees as a jump in the sequence (a counted gap), never as silence.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_api::{code, relay::token_eq, Flow, Response, StreamHello};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpListener;

use super::FlowStore;

/// How long a reader may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest hello line read.
const HELLO_MAX_BYTES: u64 = 4096;
/// Records written between two looks at the history.
const BATCH: usize = 512;

/// The shared secret readers must present.
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Why the token file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// It could not be read.
    #[error("cannot read token file {path}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// It holds nothing but whitespace.
    #[error("token file {path} is empty")]
    Empty {
        /// The file.
        path: std::path::PathBuf,
    },
}

impl Token {
    /// Reads a token file (surrounding whitespace, e.g. a trailing newline, is not part of it).
    pub fn read(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenError::Empty { path: path.to_path_buf() });
        }
        Ok(Token(token.as_bytes().to_vec()))
    }

    /// A token from its text (tests, the relay's client side).
    pub fn from_text(text: &str) -> Self {
        Token(text.trim().as_bytes().to_vec())
    }

    /// The token's text, to present to a server.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// Whether `given` is this token, in constant time.
    pub fn matches(&self, given: &str) -> bool {
        token_eq(&self.0, given.as_bytes())
    }
}

#[derive(Serialize)]
struct SeqFlowRef<'a> {
    seq: u64,
    flow: &'a Flow,
}

/// Accepts readers on `listener` until the runtime stops.
pub async fn serve(store: Arc<FlowStore>, listener: TcpListener, token: Arc<Token>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_reader(store.clone(), token.clone(), stream, peer.to_string()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "flow port accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn refuse<W: AsyncWrite + Unpin>(out: &mut W, code: u32, message: &str) {
    let answer = Response::Error {
        code,
        message: message.to_string(),
    };
    if let Ok(mut line) = serde_json::to_vec(&answer) {
        line.push(b'\n');
        let _ = out.write_all(&line).await;
        let _ = out.flush().await;
    }
}

/// Reads the hello; `None` (after answering a refusal) when it is missing, malformed or
/// carries the wrong token.
async fn hello<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    read: &mut BufReader<R>,
    out: &mut W,
    token: &Token,
    peer: &str,
) -> Option<StreamHello> {
    let mut line = String::new();
    let got = tokio::time::timeout(HELLO_TIMEOUT, (&mut *read).take(HELLO_MAX_BYTES).read_line(&mut line)).await;
    let hello = match got {
        Ok(Ok(n)) if n > 0 => serde_json::from_str::<StreamHello>(&line).ok(),
        _ => None,
    };
    match hello {
        Some(h) if token.matches(&h.token) && h.v <= bulkhead_api::PROTOCOL_VERSION => Some(h),
        Some(h) if token.matches(&h.token) => {
            refuse(
                out,
                code::INCOMPATIBLE_VERSION,
                &format!("stream version {} is newer than this agent's", h.v),
            )
            .await;
            None
        }
        _ => {
            // The same answer for a bad token and a bad line: nothing to learn from it.
            tracing::warn!(%peer, "flow port: refused a reader without a valid token");
            refuse(out, code::UNAUTHORIZED, "unauthorized").await;
            None
        }
    }
}

/// Serves one reader: the hello, then the header, then records from after its cursor,
/// following new ones until it goes away.
pub async fn serve_reader<S: AsyncRead + AsyncWrite + Unpin>(store: Arc<FlowStore>, token: Arc<Token>, stream: S, peer: String) {
    let (read, write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    let mut out = BufWriter::new(write);
    let Some(hello) = hello(&mut read, &mut out, &token, &peer).await else {
        return;
    };
    // Subscribed before the header: no record can slip between the two.
    let mut next = store.watch_next();
    let header = store.stream_header();
    let mut from = match hello.resume {
        Some(c) if c.epoch == header.epoch => c.seq.saturating_add(1),
        _ => header.first,
    };
    tracing::info!(%peer, resume = ?hello.resume, first = header.first, next = header.next, "flow reader connected");
    let Ok(mut line) = serde_json::to_vec(&header) else { return };
    line.push(b'\n');
    if out.write_all(&line).await.is_err() {
        return;
    }
    let mut scratch = [0u8; 64];
    loop {
        let batch = store.records_from(from, BATCH);
        for s in &batch {
            let flow = s.flow(store.node());
            let Ok(mut line) = serde_json::to_vec(&SeqFlowRef { seq: s.seq, flow: &flow }) else {
                continue;
            };
            line.push(b'\n');
            if out.write_all(&line).await.is_err() {
                return;
            }
            from = s.seq + 1;
        }
        if batch.len() == BATCH {
            continue;
        }
        if out.flush().await.is_err() {
            return;
        }
        tokio::select! {
            changed = next.changed() => if changed.is_err() { return },
            // The reader sends nothing after its hello: EOF or an error means it left.
            r = read.read(&mut scratch) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}
