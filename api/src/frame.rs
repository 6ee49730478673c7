//! Framing of the socket protocol: one JSON object per line, a version on each request,
//! and a bound on how long a line may be.

use std::io::{self, BufRead};

use serde::{Deserialize, Serialize};

use crate::code;
use crate::message::{Request, Response};

/// The socket protocol version this crate speaks; sent as `"v"` with every request.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest line either side reads; a longer one is an error, never unbounded memory.
/// (The largest answers, explanations and flows, are a few KiB.)
pub const MAX_LINE_BYTES: usize = 1 << 20;

fn version_one() -> u32 {
    1
}

/// A request as it travels: the protocol version, then the request's own fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The client's protocol version; 1 when absent (clients from before it existed).
    #[serde(default = "version_one")]
    pub v: u32,
    /// The shared token, for a listener that asks for one (a relay's TCP port); agents'
    /// Unix sockets are authenticated by their file mode and ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The request.
    #[serde(flatten)]
    pub request: Request,
}

impl Envelope {
    /// `request` at this crate's [`PROTOCOL_VERSION`].
    pub fn new(request: Request) -> Self {
        Envelope {
            v: PROTOCOL_VERSION,
            token: None,
            request,
        }
    }

    /// The request, or the error to answer when the client speaks a newer protocol.
    pub fn into_request(self) -> Result<Request, Response> {
        if self.v > PROTOCOL_VERSION {
            return Err(Response::Error {
                code: code::INCOMPATIBLE_VERSION,
                message: format!("protocol version {} is newer than this agent's {PROTOCOL_VERSION}", self.v),
            });
        }
        Ok(self.request)
    }
}

/// Reads one line of at most `max` bytes (without its newline); `None` at end of input.
///
/// A line longer than `max` is an `InvalidData` error, after reading at most `max` bytes
/// plus one buffer of it; the last line may lack its newline.
pub fn read_line_limited(reader: &mut impl BufRead, max: usize) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            if line.is_empty() {
                return Ok(None);
            }
            break;
        }
        let newline = buf.iter().position(|&b| b == b'\n');
        let chunk = &buf[..newline.unwrap_or(buf.len())];
        if line.len() + chunk.len() > max {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("line longer than {max} bytes")));
        }
        line.extend_from_slice(chunk);
        let used = chunk.len() + usize::from(newline.is_some());
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use std::io::{BufReader, Cursor};

    use super::*;
    use crate::endpoint::EndpointRef;

    #[test]
    fn requests_carry_the_version_and_old_ones_default_to_1() {
        let e = Envelope::new(Request::Status);
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"v":1,"op":"status"}"#);
        assert_eq!(serde_json::from_str::<Envelope>(&s).unwrap(), e);
        let old: Envelope = serde_json::from_str(r#"{"op":"del_endpoint","container_id":"c1","ifname":"eth0"}"#).unwrap();
        assert_eq!(old.v, 1);
        let del = Request::DelEndpoint(EndpointRef {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        });
        assert_eq!(old.into_request().unwrap(), del);
        // An agent that still decodes a bare Request accepts a versioned one.
        for line in [
            r#"{"v":1,"op":"status"}"#,
            r#"{"v":1,"op":"del_endpoint","container_id":"c1","ifname":"eth0"}"#,
        ] {
            assert!(serde_json::from_str::<Request>(line).is_ok(), "{line}");
        }
    }

    #[test]
    fn a_newer_version_is_refused_as_incompatible() {
        let e: Envelope = serde_json::from_str(r#"{"v":2,"op":"status"}"#).unwrap();
        match e.into_request() {
            Err(Response::Error { code, message }) => {
                assert_eq!(code, code::INCOMPATIBLE_VERSION);
                assert!(message.contains("version 2"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lines_are_read_up_to_the_limit() {
        let mut r = Cursor::new(b"abc\nabcd\n\nlast".to_vec());
        assert_eq!(read_line_limited(&mut r, 4).unwrap().as_deref(), Some("abc"));
        assert_eq!(read_line_limited(&mut r, 4).unwrap().as_deref(), Some("abcd"));
        assert_eq!(read_line_limited(&mut r, 4).unwrap().as_deref(), Some(""));
        assert_eq!(read_line_limited(&mut r, 4).unwrap().as_deref(), Some("last"));
        assert_eq!(read_line_limited(&mut r, 4).unwrap(), None);
    }

    #[test]
    fn an_overlong_line_is_refused() {
        // A small buffer, so the line spans many reads.
        let mut r = BufReader::with_capacity(3, Cursor::new(b"abcdefgh\nok\n".to_vec()));
        let e = read_line_limited(&mut r, 5).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("longer than 5 bytes"), "{e}");
        let mut r = Cursor::new(vec![b'x'; MAX_LINE_BYTES + 1]);
        assert!(read_line_limited(&mut r, MAX_LINE_BYTES).is_err());
    }
}
