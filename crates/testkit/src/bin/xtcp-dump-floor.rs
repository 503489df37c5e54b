//! `xtcp-dump-floor`: the kernel's own cost of what one xtcp poll asks for,
//! the floor `make bench-e2e` compares the exporter with.
//!
//! By default sends the exporter's dump request (`--states all`, every
//! extension) for IPv4 and IPv6 at once, one netlink socket and one thread
//! per family as the exporter does, and only drains the replies into a
//! 32 KiB buffer, walking message headers to find `NLMSG_DONE`: no decoding,
//! no records, no sending. Other layouts of the same work, for comparing
//! how the kernel's cost can be spread:
//!
//! - `--layout sequential`: the two family dumps one after the other on one
//!   thread (what a single-threaded reader such as `ss` pays the kernel);
//! - `--layout all-families`: one old-style `TCPDIAG_GETSOCK` dump, which
//!   returns both families from a single walk of the socket tables;
//! - `--split-at PORT,...`: every dump cut into source-port ranges by
//!   `INET_DIAG_REQ_BYTECODE` filters, each range on its own netlink socket
//!   and thread, all read in parallel.
//!
//! `--filter EXPR` sends xtcp's `--filter` program with every dump (with
//! `--split-at`, together with each range's).
//!
//! `--repeat N` does it all N times, one round after the other.
//!
//! Prints one line per dump: `floor <dump> sockets N datagrams N bytes N`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use xtcp::filter::Filter;
use xtcp::pipeline::sock_diag::{DumpError, SockDiagSocket, DUMP_DATAGRAM_MAX};
use xtcp::wire::bytecode::{compile, Expr, Side};
use xtcp::wire::request::{
    filtered_dump_request, AF_INET, AF_INET6, AF_UNSPEC, ALL_EXTENSIONS, DEFAULT_STATES,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Layout {
    /// One dump per family, the two read in parallel (the exporter's).
    Families,
    /// One dump per family, one after the other on one thread.
    Sequential,
    /// One dump of both families (`TCPDIAG_GETSOCK`).
    AllFamilies,
}

#[derive(Debug, Parser)]
#[command(
    name = "xtcp-dump-floor",
    about = "Drain xtcp's dump requests; no decode, no send"
)]
struct Args {
    #[arg(long, value_enum, default_value = "families")]
    layout: Layout,
    /// Cut every dump into source-port ranges at these ports (each port
    /// starts a range), one netlink socket and thread per range.
    #[arg(long, value_delimiter = ',')]
    split_at: Vec<u16>,
    /// Only the sockets this xtcp `--filter` expression selects.
    #[arg(long, value_name = "EXPR")]
    filter: Option<Filter>,
    /// Do it all this many times, one round after the other (as the
    /// exporter polls), so that a poll's cost can be told from the start's.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
}

/// One dump to drain: what it asks for and its name in the output.
struct Dump {
    name: String,
    /// `AF_UNSPEC` for both families at once.
    family: u8,
    /// `INET_DIAG_REQ_BYTECODE`; empty: every socket.
    program: Vec<u8>,
}

/// What one dump held.
#[derive(Debug, Default, Clone)]
struct Drained {
    sockets: u64,
    datagrams: u64,
    bytes: u64,
}

fn request(dump: &Dump, seq: u32) -> Vec<u8> {
    filtered_dump_request(
        dump.family,
        DEFAULT_STATES,
        ALL_EXTENSIONS,
        &dump.program,
        seq,
    )
}

fn drain(dump: &Dump) -> Result<Drained, DumpError> {
    let socket = SockDiagSocket::open(Duration::from_secs(5))?;
    let mut reader = socket.dump_with(|seq| request(dump, seq))?;
    let mut buf = vec![0u8; DUMP_DATAGRAM_MAX];
    let mut drained = Drained::default();
    while let Some(len) = reader.recv(&mut buf)? {
        drained.datagrams += 1;
        drained.bytes += len as u64;
        reader.scan(&buf[..len], |_| drained.sockets += 1)?;
    }
    Ok(drained)
}

/// The dumps of `args`, grouped by the thread that reads them in turn.
fn plan(args: &Args) -> Result<Vec<Vec<Dump>>, String> {
    let families: Vec<(String, u8)> = match args.layout {
        Layout::AllFamilies => vec![("all".into(), AF_UNSPEC)],
        _ => vec![("v4".into(), AF_INET), ("v6".into(), AF_INET6)],
    };
    let mut starts = args.split_at.clone();
    starts.sort_unstable();
    starts.dedup();
    if args.layout != Layout::Families && !starts.is_empty() {
        return Err("--split-at needs --layout families".into());
    }
    if starts.first() == Some(&0) {
        return Err("--split-at ports start ranges after port 0: give ports > 0".into());
    }
    let mut ranges = Vec::new();
    let mut low = 0u16;
    for &start in &starts {
        ranges.push((low, start - 1));
        low = start;
    }
    ranges.push((low, u16::MAX));
    let split = !starts.is_empty();
    let mut dumps = Vec::new();
    for (name, family) in families {
        for &(low, high) in &ranges {
            let range = Expr::Port {
                side: Side::Local,
                low,
                high,
            };
            let expr = match &args.filter {
                Some(f) => Expr::And(vec![f.expr().clone(), range]),
                None => range,
            };
            let program = compile(&expr).map_err(|e| format!("--filter: {e}"))?;
            dumps.push(Dump {
                name: if split {
                    format!("{name}:{low}-{high}")
                } else {
                    name.clone()
                },
                family,
                program,
            });
        }
    }
    Ok(match args.layout {
        Layout::Sequential => vec![dumps],
        _ => dumps.into_iter().map(|d| vec![d]).collect(),
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let threads = match plan(&args) {
        Ok(threads) => threads,
        Err(e) => {
            xtcp_service::say!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut whole = true;
    for _ in 0..args.repeat {
        whole &= round(&threads);
    }
    if whole {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Drains every dump once, each thread its own in parallel, and prints
/// them; `false` if a dump failed.
fn round(threads: &[Vec<Dump>]) -> bool {
    let results: Vec<(String, Result<Drained, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = threads
            .iter()
            .map(|dumps| {
                let names: Vec<String> = dumps.iter().map(|d| d.name.clone()).collect();
                let handle = s.spawn(move || {
                    dumps
                        .iter()
                        .map(|d| drain(d).map_err(|e| e.to_string()))
                        .collect::<Vec<_>>()
                });
                (names, handle)
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(names, handle)| {
                let results = handle
                    .join()
                    .unwrap_or_else(|_| vec![Err("reader thread panicked".into()); names.len()]);
                names.into_iter().zip(results)
            })
            .collect()
    });
    let mut whole = true;
    for (name, result) in results {
        match result {
            Ok(d) => println!(
                "floor {name} sockets {} datagrams {} bytes {}",
                d.sockets, d.datagrams, d.bytes
            ),
            Err(e) => {
                xtcp_service::say!("error: {name} dump: {e}");
                whole = false;
            }
        }
    }
    whole
}
