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
//! `--netns NAME` (repeated) makes the dumps in each of these namespaces
//! (under /run/netns) in turn, on sockets opened in each once at the start,
//! as the exporter keeps them.
//!
//! Prints one line per dump: `floor <dump> sockets N datagrams N bytes N`
//! (`floor <namespace>/<dump> ...` with `--netns`).

use std::process::ExitCode;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

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
    /// Dump in this namespace (a name under /run/netns) instead of this
    /// one; repeated, in each in turn.
    #[arg(long = "netns", value_name = "NAME")]
    namespaces: Vec<String>,
}

/// The sockets of one namespace: one per dump of the plan, in its order.
struct Namespace {
    /// Empty: the floor's own namespace.
    name: String,
    sockets: Vec<SockDiagSocket>,
}

/// Opens `count` sockets in each namespace of `names` (or, with none, in
/// this one), entering each on a thread of its own.
fn open_namespaces(names: &[String], count: usize) -> Result<Vec<Namespace>, String> {
    let open = || {
        (0..count)
            .map(|_| SockDiagSocket::open(Duration::from_secs(5)))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| e.to_string())
    };
    if names.is_empty() {
        return Ok(vec![Namespace {
            name: String::new(),
            sockets: open()?,
        }]);
    }
    names
        .iter()
        .map(|name| {
            let path = format!("/run/netns/{name}");
            let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            let sockets = std::thread::scope(|s| {
                s.spawn(|| {
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .map_err(|e| format!("entering {path}: {e}"))?;
                    open()
                })
                .join()
                .unwrap_or_else(|_| Err("the namespace thread panicked".into()))
            })?;
            Ok(Namespace {
                name: name.clone(),
                sockets,
            })
        })
        .collect()
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

fn drain(dump: &Dump, socket: &SockDiagSocket) -> Result<Drained, DumpError> {
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
    let count = threads.iter().map(Vec::len).sum();
    let namespaces = match open_namespaces(&args.namespaces, count) {
        Ok(namespaces) => namespaces,
        Err(e) => {
            xtcp_service::say!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut whole = true;
    for _ in 0..args.repeat {
        whole &= round(&threads, &namespaces);
    }
    if whole {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Drains every dump once in every namespace, each thread its own dumps in
/// parallel (namespace after namespace), and prints them; `false` if a
/// dump failed.
fn round(threads: &[Vec<Dump>], namespaces: &[Namespace]) -> bool {
    let results: Vec<(String, Result<Drained, String>)> = std::thread::scope(|s| {
        let mut first = 0;
        let handles: Vec<_> = threads
            .iter()
            .map(|dumps| {
                // This thread's dumps' sockets are at `first..` in each
                // namespace.
                let at = first;
                first += dumps.len();
                let names: Vec<String> = namespaces
                    .iter()
                    .flat_map(|ns| {
                        dumps.iter().map(move |d| match &*ns.name {
                            "" => d.name.clone(),
                            netns => format!("{netns}/{}", d.name),
                        })
                    })
                    .collect();
                let handle = s.spawn(move || {
                    namespaces
                        .iter()
                        .flat_map(|ns| {
                            dumps.iter().enumerate().map(move |(i, d)| {
                                drain(d, &ns.sockets[at + i]).map_err(|e| e.to_string())
                            })
                        })
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
