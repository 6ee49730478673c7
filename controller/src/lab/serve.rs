//! The pod server: answers on every declared port so probes can tell allowed from denied.

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};

use super::LabError;

/// Serves `tcp` and `udp` ports until killed: TCP writes `name`, UDP echoes.
pub fn run(name: &str, tcp: &[u16], udp: &[u16]) -> Result<i32, LabError> {
    let bind_err = |proto: &str, port: u16, source| LabError::Io {
        op: "bind",
        path: format!("{proto}/{port}").into(),
        source,
    };
    let mut tcp_listeners = Vec::new();
    for &port in tcp {
        tcp_listeners.push(TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).map_err(|e| bind_err("tcp", port, e))?);
    }
    let mut udp_sockets = Vec::new();
    for &port in udp {
        udp_sockets.push(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).map_err(|e| bind_err("udp", port, e))?);
    }
    // The lab waits for this line before wiring the pod, so no probe races the bind.
    println!("ready");
    let _ = std::io::stdout().flush();
    let reply = format!("{name}\n");
    std::thread::scope(|scope| {
        for listener in &tcp_listeners {
            let reply = reply.as_bytes();
            scope.spawn(move || {
                for mut stream in listener.incoming().flatten() {
                    // A client that went away is no concern of the server.
                    let _ = stream.write_all(reply);
                }
            });
        }
        for socket in &udp_sockets {
            scope.spawn(move || {
                let mut buf = [0u8; 2048];
                while let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], peer);
                }
            });
        }
    });
    Ok(0)
}
