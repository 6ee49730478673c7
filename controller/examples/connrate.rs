//! New TCP connections per second, for `scripts/bench-dataplane.sh` (a benchmark tool, not part
//! of Bulkhead). Each connection is what a short RPC costs: connect, send a request, read the
//! reply until the server closes, close.
//!
//! ```text
//! connrate serve --port 7000 [--threads 4] [--pid-file F]   # answers every connection, then closes
//! connrate run --to 10.244.0.3:7000 [--seconds 2] [--workers 4]
//! ```
//!
//! `run` prints one line: `<connections/s> <connections> <errors>`. The server closes first,
//! so TIME_WAIT stays on its side and the client's ephemeral ports never run out.
//! Blocking sockets and one thread per worker: a connection is a handful of syscalls, and a
//! runtime would only add to what is measured on a 2-core machine.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const REQUEST: &[u8] = b"GET /bench HTTP/1.0\r\n\r\n";
const REPLY: &[u8; 64] = b"HTTP/1.0 200 OK\r\nContent-Length: 25\r\n\r\nconnrate bench reply....\n";
const TIMEOUT: Duration = Duration::from_secs(5);

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("run") => run(&args[1..]),
        _ => Err("usage: connrate serve --port P [--threads N] [--pid-file F] | run --to IP:PORT [--seconds S] [--workers N]".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("connrate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The value of `--name` in `args`, if given.
fn flag<'a>(args: &'a [String], name: &str) -> Result<Option<&'a str>, Error> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if !a.starts_with("--") {
            return Err(format!("unexpected argument {a}").into());
        }
        // Every flag takes a value.
        let value = it.next().ok_or_else(|| format!("{a} needs a value"))?;
        if a == name {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

fn parsed<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, Error> {
    match flag(args, name)? {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| format!("{name}: bad value {v}").into()),
    }
}

fn serve(args: &[String]) -> Result<(), Error> {
    let port: u16 = parsed(args, "--port", 7000)?;
    let threads: usize = parsed(args, "--threads", 4)?;
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
    // Written once the socket listens, so the script may connect as soon as the file exists.
    if let Some(path) = flag(args, "--pid-file")? {
        std::fs::write(path, format!("{}\n", std::process::id()))?;
    }
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        let listener = listener.try_clone()?;
        handles.push(std::thread::spawn(move || loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    // A client that misbehaves costs its own connection only.
                    let _ = answer(stream);
                }
                Err(e) => eprintln!("connrate: accept: {e}"),
            }
        }));
    }
    for h in handles {
        h.join().map_err(|_| "server thread panicked")?;
    }
    Ok(())
}

/// Reads the request (up to its blank line), writes the reply and closes.
fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; 256];
    let mut got = 0;
    while !buf[..got].ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut buf[got..])?;
        if n == 0 || got + n == buf.len() {
            return Ok(());
        }
        got += n;
    }
    stream.write_all(REPLY)
}

fn run(args: &[String]) -> Result<(), Error> {
    let to: SocketAddr = flag(args, "--to")?.ok_or("--to IP:PORT is required")?.parse()?;
    let seconds: f64 = parsed(args, "--seconds", 2.0)?;
    let workers: usize = parsed(args, "--workers", 4)?;
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..workers.max(1) {
        let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match one(to) {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    // Connections that finish after the stop still count, over the time they took.
    for h in handles {
        h.join().map_err(|_| "worker panicked")?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (n, e) = (done.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    println!("{:.1} {n} {e}", n as f64 / elapsed);
    // A path that drops or refuses is not a rate: fail rather than report a number.
    if e * 100 > n {
        return Err(format!("{e} of {} connections to {to} failed", n + e).into());
    }
    Ok(())
}

/// One connection: connect, request, read the whole reply, close.
fn one(to: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(REQUEST)?;
    let mut buf = [0u8; 128];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
        if got == buf.len() {
            break;
        }
    }
    if &buf[..got] != REPLY {
        return Err(std::io::Error::other("unexpected reply"));
    }
    Ok(())
}
