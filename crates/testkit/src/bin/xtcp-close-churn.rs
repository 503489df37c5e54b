//! `xtcp-close-churn`: opens and closes loopback connections at a given
//! rate of closed sockets, for the close-record benchmark
//! (`tools/bench/bench_closes.py`). Run it inside the namespace to churn
//! (`ip netns exec NS xtcp-close-churn ...`).
//!
//! Each thread has a listener of its own (ports 30001, 30002, ... on
//! 127.0.0.1) and repeats: connect, accept, close the server's end, close
//! the client's. Every connection destroys two sockets (two close messages);
//! the server closes first, so TIME_WAIT lands on its side and the client's
//! ephemeral ports are free again at once. Threads pace themselves to the
//! rate; a rate the machine cannot reach is run as fast as it goes. Prints
//! `closes N seconds S` (sockets destroyed, time taken) at the end.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

/// Open and close loopback connections at a rate of closed sockets.
#[derive(Debug, Parser)]
#[command(name = "xtcp-close-churn", about, long_about = None)]
struct Cli {
    /// Sockets to destroy per second (two per connection).
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// How long to churn.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Threads, each with its own listener.
    #[arg(long, default_value_t = 2)]
    threads: u16,
}

/// First listener port: below the ephemeral range, where clients could
/// already hold it.
const FIRST_PORT: u16 = 30001;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let started = Instant::now();
    let run_for = Duration::from_secs(cli.seconds);
    // Connections per second per thread.
    let per_thread = (cli.rate as f64 / 2.0 / f64::from(cli.threads)).max(1.0);
    let threads: Vec<_> = (0..cli.threads)
        .map(|t| {
            std::thread::spawn(move || {
                let server = SocketAddr::from((Ipv4Addr::LOCALHOST, FIRST_PORT + t));
                churn(server, per_thread, run_for)
            })
        })
        .collect();
    let mut connections = 0u64;
    for thread in threads {
        match thread.join() {
            Ok(Ok(n)) => connections += n,
            Ok(Err(e)) => {
                xtcp_service::say!("xtcp-close-churn: {e}");
                return ExitCode::FAILURE;
            }
            Err(_) => return ExitCode::FAILURE,
        }
    }
    // Two sockets per connection, and each listener.
    let closes = 2 * connections + u64::from(cli.threads);
    println!(
        "closes {closes} seconds {:.3}",
        started.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}

/// Connections to a listener on `server`, `per_second` of them, for
/// `run_for`; returns how many.
fn churn(server: SocketAddr, per_second: f64, run_for: Duration) -> std::io::Result<u64> {
    let listener = TcpListener::bind(server)?;
    let started = Instant::now();
    let mut done = 0u64;
    while started.elapsed() < run_for {
        let client = TcpStream::connect(server)?;
        let (accepted, _) = listener.accept()?;
        drop(accepted);
        drop(client);
        done += 1;
        let due = Duration::from_secs_f64(done as f64 / per_second);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
    Ok(done)
}
