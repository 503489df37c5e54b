//! `xtcp-socket-farm`: holds established loopback connections in a private
//! network namespace for benchmarks, tests and manual runs.
//!
//! Usage: `xtcp-socket-farm --netns NAME --pairs N` (root). Creates the
//! namespace `xtcp-NAME-<pid>`, opens N connections per family (2N sockets
//! each, plus a listener per worker), prints `ready <namespace> <sockets>` on
//! stdout and holds them until stdin closes or SIGINT/SIGTERM; then it
//! deletes the namespace.
//!
//! One process may hold about 9000 connections here (an open-file limit of
//! 20000), so the connections are opened by worker processes, this same
//! program with `--worker`, each holding at most `--per-process` connections
//! on its own listener port (20001, 20002, ...) inside the namespace. Any
//! number of sockets fits: 200k sockets take 25 workers.
//!
//! `--namespaces N` makes a container host instead: N namespaces
//! (`xtcp-NAME0-<pid>`, ...), each with `--pairs` connections per family on
//! a listener per family (`--pairs 0`: no socket at all), all held by this
//! process; `ready` names them, comma-separated. `--own-table BUCKETS` gives
//! each its own TCP table (`net.ipv4.tcp_child_ehash_entries`, set in this
//! namespace while they are made, then put back).

use xtcp_testkit as scenario;

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use signal_hook::consts::{SIGINT, SIGTERM};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// First listener port; worker i listens on FIRST_PORT + i. Below the
/// ephemeral range (net.ipv4.ip_local_port_range, 32768..60999), where an
/// earlier worker's client sockets could already hold the port.
const FIRST_PORT: u16 = 20001;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Family {
    V4,
    V6,
}

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
    /// Most connections one worker process opens (2 descriptors each).
    #[arg(long, default_value_t = 8000, value_parser = clap::value_parser!(u64).range(1..=9000))]
    per_process: u64,
    /// Make this many namespaces, each with --pairs connections per family,
    /// all held by this process.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=2000))]
    namespaces: Option<u64>,
    /// With --namespaces: give each a TCP table of its own, of this many
    /// buckets (rounded up to a power of 2 by the kernel).
    #[arg(long, requires = "namespaces")]
    own_table: Option<u32>,
    /// Internal: be a worker in this existing namespace.
    #[arg(long, hide = true, requires_all = ["family", "port"])]
    worker: Option<String>,
    #[arg(long, hide = true)]
    family: Option<Family>,
    #[arg(long, hide = true)]
    port: Option<u16>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match (&cli.worker, cli.family, cli.port) {
        (Some(ns), Some(family), Some(port)) => worker(ns, family, port, cli.pairs, cli.traffic),
        _ => match cli.namespaces {
            Some(count) => container_host(&cli, count as usize),
            None => farm(&cli),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            xtcp_service::say!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The parent: the namespace, the workers, the total.
fn farm(cli: &Cli) -> Result<(), Error> {
    let ns = scenario::Netns::create(&cli.netns)?;
    let mut workers = Vec::new();
    let mut port = FIRST_PORT;
    for family in [Family::V4, Family::V6] {
        let mut left = cli.pairs as u64;
        while left > 0 {
            let pairs = left.min(cli.per_process);
            workers.push(spawn_worker(ns.name(), family, port, pairs, cli.traffic)?);
            left -= pairs;
            port += 1;
        }
    }
    // Workers open their connections in parallel; each says how many
    // sockets it holds once it has them all.
    let mut sockets = 0;
    for worker in &mut workers {
        let stdout = worker.stdout.take().ok_or("worker without stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        sockets += line
            .strip_prefix("ready ")
            .and_then(|n| n.trim().parse::<usize>().ok())
            .ok_or_else(|| format!("a worker failed: {line:?}"))?;
    }
    println!("ready {} {sockets}", ns.name());
    wait_for_stop()?;
    for mut worker in workers {
        drop(worker.stdin.take()); // its signal to close everything
        worker.wait()?;
    }
    drop(ns);
    Ok(())
}

/// `--namespaces`: `count` namespaces of `--pairs` connections per family.
fn container_host(cli: &Cli, count: usize) -> Result<(), Error> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    let namespaces = with_child_table(cli.own_table, || {
        (0..count)
            .map(|i| scenario::Netns::create(&format!("{}{i}", cli.netns)))
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    let mut held = Vec::new();
    for ns in &namespaces {
        if cli.pairs == 0 {
            continue;
        }
        let pairs = std::thread::scope(|s| {
            s.spawn(|| -> Result<_, Error> {
                ns.enter()?;
                let mut pairs = Vec::new();
                for host in [
                    SocketAddr::from((Ipv4Addr::LOCALHOST, FIRST_PORT)),
                    SocketAddr::from((Ipv6Addr::LOCALHOST, FIRST_PORT)),
                ] {
                    pairs.push(scenario::established_pairs(host, cli.pairs, cli.traffic)?);
                }
                Ok(pairs)
            })
            .join()
            .map_err(|_| "a namespace's thread panicked")?
        })?;
        held.extend(pairs);
    }
    let sockets: usize = held.iter().map(|p| p.streams.len() + 1).sum();
    let names: Vec<&str> = namespaces.iter().map(|n| n.name()).collect();
    println!("ready {} {sockets}", names.join(","));
    wait_for_stop()?;
    drop(held);
    drop(namespaces);
    Ok(())
}

/// Runs `make` with `net.ipv4.tcp_child_ehash_entries` set to `buckets`
/// (when given) in this namespace, then puts the old value back.
fn with_child_table<T>(buckets: Option<u32>, make: impl FnOnce() -> T) -> Result<T, Error> {
    const SYSCTL: &str = "/proc/sys/net/ipv4/tcp_child_ehash_entries";
    let Some(buckets) = buckets else {
        return Ok(make());
    };
    let old = std::fs::read_to_string(SYSCTL)
        .map_err(|e| format!("{SYSCTL}: {e} (--own-table needs Linux 6.1)"))?;
    std::fs::write(SYSCTL, buckets.to_string())?;
    let made = make();
    std::fs::write(SYSCTL, old.trim())?;
    Ok(made)
}

fn spawn_worker(
    ns: &str,
    family: Family,
    port: u16,
    pairs: u64,
    traffic: bool,
) -> Result<Child, Error> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["--worker", ns, "--port", &port.to_string()])
        .args(["--pairs", &pairs.to_string()])
        .args(["--family", if family == Family::V4 { "v4" } else { "v6" }])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if traffic {
        cmd.arg("--traffic");
    }
    Ok(cmd.spawn()?)
}

/// A worker: `pairs` connections on one listener in namespace `ns`.
fn worker(ns: &str, family: Family, port: u16, pairs: usize, traffic: bool) -> Result<(), Error> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    // Still single-threaded: the whole process moves into the namespace.
    let netns = std::fs::File::open(format!("/run/netns/{ns}"))?;
    nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let addr = match family {
        Family::V4 => SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Family::V6 => SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    };
    let held = scenario::established_pairs(addr, pairs, traffic)?;
    println!("ready {}", held.streams.len() + 1);
    wait_for_stop()?;
    drop(held);
    Ok(())
}

/// Returns on SIGINT/SIGTERM or when stdin closes (the parent went away).
fn wait_for_stop() -> Result<(), Error> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    std::thread::spawn({
        let stop = Arc::clone(&stop);
        move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            stop.store(true, Ordering::Relaxed);
        }
    });
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
