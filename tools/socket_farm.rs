//! `xtcp-socket-farm`: holds established loopback connections in a private
//! network namespace for benchmarks and manual runs.
//!
//! Usage: `xtcp-socket-farm --netns NAME --pairs N` (root). Creates the
//! namespace `xtcp-NAME-<pid>`, opens N connections per family (2N sockets
//! each, plus a listener), prints `ready <namespace> <sockets>` on stdout and
//! holds them until stdin closes or SIGINT/SIGTERM; then it deletes the
//! namespace. One process holds at most about 9000 connections (open-file
//! limit 20000 here).

#[path = "scenario.rs"]
mod scenario;

use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};

/// Hold N established loopback connections per family in a private
/// network namespace.
#[derive(Debug, Parser)]
#[command(name = "xtcp-socket-farm", about, long_about = None)]
struct Cli {
    /// Tag of the namespace to create (xtcp-TAG-PID).
    #[arg(long, default_value = "farm")]
    netns: String,
    /// Connections per family.
    #[arg(long, default_value_t = 1000)]
    pairs: usize,
    /// Send 100 bytes both ways on each connection (non-zero counters).
    #[arg(long)]
    traffic: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match farm(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn farm(cli: &Cli) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    let ns = scenario::Netns::create(&cli.netns)?;
    let pairs = std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<Vec<scenario::Pairs>> {
            ns.enter()?;
            [
                SocketAddr::from((Ipv4Addr::LOCALHOST, 40001)),
                SocketAddr::from((Ipv6Addr::LOCALHOST, 40001)),
            ]
            .into_iter()
            .map(|addr| scenario::established_pairs(addr, cli.pairs, cli.traffic))
            .collect()
        })
        .join()
        .map_err(|_| "opening connections panicked")
    })??;
    let sockets: usize = pairs.iter().map(|p| p.streams.len() + 1).sum();
    println!("ready {} {sockets}", ns.name());

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    // stdin closing (the parent went away) also ends the farm.
    let stdin_closed = Arc::new(AtomicBool::new(false));
    std::thread::spawn({
        let closed = Arc::clone(&stdin_closed);
        move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            closed.store(true, Ordering::Relaxed);
        }
    });
    while !stop.load(Ordering::Relaxed) && !stdin_closed.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(pairs);
    drop(ns);
    Ok(())
}
