//! `xtcp-dump-floor`: the kernel's own cost of what one xtcp poll asks for,
//! the floor `make bench-e2e` compares the exporter with.
//!
//! Sends the exporter's dump request (every state, every extension) for
//! IPv4 and IPv6 at once, one netlink socket and one thread per family as
//! the exporter does, and only drains the replies into a 32 KiB buffer,
//! walking message headers to find `NLMSG_DONE`: no decoding, no records,
//! no sending. Prints `floor v4 sockets N datagrams N bytes N | v6 ...`.

use std::process::ExitCode;
use std::time::Duration;

use xtcp::pipeline::netlink::{SockDiagSocket, RECV_BUFFER_LEN};
use xtcp::wire::request::{AF_INET, AF_INET6, ALL_EXTENSIONS, ALL_STATES};

/// What one family's dump held.
#[derive(Debug, Default)]
struct Drained {
    sockets: u64,
    datagrams: u64,
    bytes: u64,
}

fn drain(family: u8) -> Result<Drained, String> {
    let socket = SockDiagSocket::open(Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let mut reader = socket
        .dump(family, ALL_STATES, ALL_EXTENSIONS)
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; RECV_BUFFER_LEN];
    let mut drained = Drained::default();
    while let Some(len) = reader.recv(&mut buf).map_err(|e| e.to_string())? {
        drained.datagrams += 1;
        drained.bytes += len as u64;
        reader
            .scan(&buf[..len], |_| drained.sockets += 1)
            .map_err(|e| e.to_string())?;
    }
    Ok(drained)
}

fn main() -> ExitCode {
    let results = std::thread::scope(|s| {
        let v4 = s.spawn(|| drain(AF_INET));
        let v6 = s.spawn(|| drain(AF_INET6));
        [("v4", v4.join()), ("v6", v6.join())]
    });
    let mut line = String::from("floor");
    for (i, (name, result)) in results.into_iter().enumerate() {
        match result {
            Ok(Ok(d)) => {
                let sep = if i == 0 { "" } else { " |" };
                line += &format!(
                    "{sep} {name} sockets {} datagrams {} bytes {}",
                    d.sockets, d.datagrams, d.bytes
                );
            }
            Ok(Err(e)) => {
                eprintln!("error: {name} dump: {e}");
                return ExitCode::FAILURE;
            }
            Err(_) => {
                eprintln!("error: {name} dump panicked");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("{line}");
    ExitCode::SUCCESS
}
