//! The agent's socket framing on arbitrary bytes: `read_line_limited` must return exactly
//! the input's lines, refuse a line longer than its limit after reading at most the limit
//! plus one buffer (never unbounded memory), and every line must decode as an `Envelope`,
//! `Request` or `Response` or fail cleanly; what decodes must survive a round trip.
#![no_main]

use std::io::{self, BufReader, Read};

use bulkhead_api::{read_line_limited, Envelope, Request, Response, MAX_LINE_BYTES};
use libfuzzer_sys::fuzz_target;

/// A reader that counts what was taken from it.
struct Counting<'a> {
    data: &'a [u8],
    read: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.data.len() - self.read);
        buf[..n].copy_from_slice(&self.data[self.read..self.read + n]);
        self.read += n;
        Ok(n)
    }
}

/// The lines a correct reader returns: split on `\n`, the last one only when not empty.
fn expected_lines(data: &[u8]) -> Vec<&[u8]> {
    let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
}

fn round_trip<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let text = serde_json::to_string(value).expect("a decoded value encodes");
    let back: T = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text} does not decode again: {e}"));
    assert_eq!(&back, value, "round trip through {text}");
}

/// Reads every line of `data` with limit `max` through a buffer of `capacity` bytes and
/// checks each against the reference split; returns the lines read.
fn read_all(data: &[u8], max: usize, capacity: usize) -> Vec<String> {
    let mut reader = BufReader::with_capacity(capacity, Counting { data, read: 0 });
    let expected = expected_lines(data);
    let mut got = Vec::new();
    for want in expected.iter().copied().map(Some).chain([None]) {
        let before = reader.get_ref().read;
        match read_line_limited(&mut reader, max) {
            Ok(Some(line)) => {
                let want = want.expect("a line past the end of the input");
                assert_eq!(line.as_bytes(), want, "line content");
                assert!(line.len() <= max, "a line over the limit was returned");
                got.push(line);
            }
            Ok(None) => {
                assert!(want.is_none(), "end of input reported before the last line");
                return got;
            }
            Err(e) => {
                let want = want.expect("an error past the end of the input");
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
                let taken = reader.get_ref().read - before;
                assert!(
                    taken <= max + capacity,
                    "read {taken} bytes for a limit of {max} and a buffer of {capacity}"
                );
                if want.len() <= max {
                    assert!(
                        std::str::from_utf8(want).is_err(),
                        "a valid line of {} bytes refused: {e}",
                        want.len()
                    );
                }
                return got;
            }
        }
    }
    unreachable!("the loop ends at the end of input or on an error")
}

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, rest)) = data.split_first() else {
        return;
    };
    // A small limit and buffer, so that lines cross both as they do on a socket.
    let max = usize::from(knobs & 0x1f) + 1;
    let capacity = usize::from(knobs >> 5) * 5 + 1;
    read_all(rest, max, capacity);
    // The agent's and client's own limit, and every line as a message.
    for line in read_all(rest, MAX_LINE_BYTES, 8 * 1024) {
        if let Ok(envelope) = serde_json::from_str::<Envelope>(&line) {
            round_trip(&envelope);
            if let Err(answer) = envelope.into_request() {
                assert!(matches!(answer, Response::Error { .. }), "{answer:?}");
            }
        }
        if let Ok(request) = serde_json::from_str::<Request>(&line) {
            round_trip(&request);
        }
        if let Ok(response) = serde_json::from_str::<Response>(&line) {
            round_trip(&response);
        }
    }
});
