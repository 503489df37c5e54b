//! Recaptures `tests/fixtures/` from this machine's kernel.
//!
//! Usage: `sudo xtcp-capture-fixtures [DIR]` (default `tests/fixtures`), or
//! `make fixtures`. In a private network namespace it opens the sockets of
//! `crates/testkit/src/lib.rs` and writes the raw netlink reply datagrams of each dump
//! exactly as `recv` returned them, then derives the fixtures for other kernel
//! versions from one captured socket message (see tests/fixtures/README.md).

use xtcp_testkit as scenario;

use std::error::Error;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use xtcp::pipeline::sock_diag::{SockDiagSocket, DUMP_DATAGRAM_MAX};
use xtcp::wire::inet_diag::{attributes, INET_DIAG_INFO};
use xtcp::wire::message::{messages, put_header, Body, NLMSG_HDRLEN};
use xtcp::wire::request::{AF_INET, AF_INET6, ALL_EXTENSIONS, ALL_STATES};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// Established pairs per family in the bench capture (2 sockets each).
const BENCH_PAIRS: usize = 128;
/// tcp_info lengths older kernels send: 4.4, 4.15, 5.4..6.1, 6.8..6.17.
pub const SHORT_LENGTHS: [usize; 5] = [104, 144, 192, 232, 248];
/// The 7.0 tail written into the `-v7` fixture: ecn_mode 1, accecn_opt_seen 2,
/// accecn_fail_mode 5, options2 0x000123.
const V7_TAIL: u32 = 1 | (2 << 2) | (5 << 4) | (0x000123 << 8);

fn main() -> Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "tests/fixtures".into()),
    );
    std::fs::create_dir_all(&dir)?;
    let ns = scenario::Netns::create("capture")?;
    std::thread::scope(|s| {
        s.spawn(|| capture(&ns, &dir))
            .join()
            .map_err(|_| "capture panicked")?
    })
}

fn capture(ns: &scenario::Netns, dir: &Path) -> Result<()> {
    ns.enter()?;
    let _v4 = scenario::open(false, 41000)?;
    let _v6 = scenario::open(true, 42000)?;
    let sock = SockDiagSocket::open(Duration::from_secs(5))?;
    let v4 = raw_dump(&sock, AF_INET)?;
    let v6 = raw_dump(&sock, AF_INET6)?;
    write(dir, "scenario-v4.bin", &v4)?;
    write(dir, "scenario-v6.bin", &v6)?;

    // One established IPv4 client with data in flight both ways (port 41001):
    // the source of the fixtures for other kernels' tcp_info lengths.
    let source = find_socket(&v4, 41001).ok_or("client 41001 not in the IPv4 dump")?;
    for len in SHORT_LENGTHS {
        write(
            dir,
            &format!("tcp_info-{len}.bin"),
            &rewrite_info(&source, |info| info.truncate(len))?,
        )?;
    }
    let v7 = rewrite_info(&source, |info| {
        info[276..280].copy_from_slice(&V7_TAIL.to_ne_bytes())
    })?;
    write(dir, "tcp_info-280-v7.bin", &v7)?;

    let _bench = open_pairs(BENCH_PAIRS)?;
    let mut bench = raw_dump(&sock, AF_INET)?;
    bench.extend(raw_dump(&sock, AF_INET6)?);
    write(dir, "bench-dump.bin", &bench)?;
    println!("kernel {}", xtcp::pipeline::kernel_release());
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    std::fs::write(dir.join(name), bytes)?;
    println!("{name}: {} bytes", bytes.len());
    Ok(())
}

/// The reply datagrams of one dump, concatenated as received.
fn raw_dump(sock: &SockDiagSocket, family: u8) -> Result<Vec<u8>> {
    let mut reader = sock.dump(family, ALL_STATES, ALL_EXTENSIONS)?;
    let mut buf = vec![0u8; DUMP_DATAGRAM_MAX];
    let mut out = Vec::new();
    while let Some(len) = reader.recv(&mut buf)? {
        out.extend_from_slice(&buf[..len]);
        reader.scan(&buf[..len], |_| {})?;
    }
    Ok(out)
}

/// The payload of the socket message whose source port is `port`.
fn find_socket(dump: &[u8], port: u16) -> Option<Vec<u8>> {
    messages(dump).flatten().find_map(|m| match m.body() {
        Ok(Body::Socket(p)) if p.len() >= 8 && u16::from_be_bytes([p[4], p[5]]) == port => {
            Some(p.to_vec())
        }
        _ => None,
    })
}

/// A whole netlink message: `payload` with its INFO attribute passed through `edit`.
fn rewrite_info(payload: &[u8], edit: impl Fn(&mut Vec<u8>)) -> Result<Vec<u8>> {
    let mut body = payload[..72].to_vec();
    for attr in attributes(payload) {
        let attr = attr?;
        let mut value = attr.value.to_vec();
        if attr.kind == INET_DIAG_INFO {
            edit(&mut value);
        }
        body.extend_from_slice(&((value.len() + 4) as u16).to_ne_bytes());
        body.extend_from_slice(&attr.kind.to_ne_bytes());
        body.extend_from_slice(&value);
        body.resize(body.len().next_multiple_of(4), 0);
    }
    let mut hdr = [0u8; NLMSG_HDRLEN];
    let len = (NLMSG_HDRLEN + body.len()) as u32;
    put_header(
        &mut hdr,
        len,
        xtcp::wire::message::SOCK_DIAG_BY_FAMILY,
        xtcp::wire::message::NLM_F_MULTI,
        1,
    );
    Ok([hdr.as_slice(), &body].concat())
}

/// `pairs` established connections per family with a little data each way.
fn open_pairs(pairs: usize) -> Result<Vec<scenario::Pairs>> {
    let open = [
        SocketAddr::from((Ipv4Addr::LOCALHOST, 40002)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, 40002)),
    ]
    .into_iter()
    .map(|addr| scenario::established_pairs(addr, pairs, true))
    .collect::<std::io::Result<_>>()?;
    // Let delayed ACKs land so the counters settle.
    std::thread::sleep(Duration::from_millis(300));
    Ok(open)
}
