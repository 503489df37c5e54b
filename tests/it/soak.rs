//! Soak under socket churn: connections open and close continuously in a
//! private namespace (about 1000 a second, both families, most closed with
//! a reset and one in ten gracefully, which leaves TIME_WAIT sockets) while
//! the exporter polls every second into a UDP receiver. The exporter's RSS,
//! threads and descriptors are sampled every second. Needs root.
//!
//! `SOAK_SECS` sets the length: 30 s in `make test`, 600 s in `make soak`,
//! which prints the summary `docs/reliability.md` quotes.
//!
//! Every poll must complete and be whole (the records the receiver got for
//! it are the records the exporter built, which are the sockets the kernel
//! sent), nothing may warn, and RSS, threads and descriptors must not grow.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{
    bind_receiver, can_run_in_netns, count_by_poll, in_ns, serial, total, workspace_bin, Running,
    PORT,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{setsockopt, sockopt};
use nix::unistd::Pid;
use xtcp_testkit::Netns;

/// Connections held open at any time, per family.
const POOL: usize = 1000;

/// Opens and closes connections until `stop`; counts those opened.
fn churn(ns: &Netns, stop: &AtomicBool, opened: &AtomicU64) {
    in_ns(ns, || {
        let servers: Vec<SocketAddr> = vec![
            (Ipv4Addr::LOCALHOST, 40001).into(),
            (Ipv6Addr::LOCALHOST, 40001).into(),
        ];
        let listeners: Vec<TcpListener> = servers
            .iter()
            .map(|a| TcpListener::bind(a).unwrap())
            .collect();
        let mut held: VecDeque<(TcpStream, TcpStream)> = VecDeque::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for (server, listener) in servers.iter().zip(&listeners) {
                let client = TcpStream::connect(server).unwrap();
                let (accepted, _) = listener.accept().unwrap();
                held.push_back((client, accepted));
                n += 1;
            }
            while held.len() > 2 * POOL {
                let (client, accepted) = held.pop_front().unwrap();
                if n % 10 != 0 {
                    // A reset: no TIME_WAIT left behind.
                    let linger = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    setsockopt(&client, sockopt::Linger, &linger).unwrap();
                }
                drop(client);
                drop(accepted);
            }
            opened.store(n, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

/// Records per poll id received on the namespace's UDP port until `stop`.
fn receive(ns: &Netns, stop: &AtomicBool) -> BTreeMap<u64, u64> {
    let socket = bind_receiver(ns);
    let mut polls = BTreeMap::new();
    let mut buf = vec![0; 65536];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => count_by_poll(&mut polls, &buf[..n]),
            Err(_) if stop.load(Ordering::Relaxed) => return polls,
            Err(_) => {}
        }
    }
}

/// `(RSS KiB, threads, descriptors)` of `pid`.
fn sample(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    (field("VmRSS:"), field("Threads:"), fds)
}

/// `(sockets, records)` summed over families, from a `-v` poll line.
fn poll_line(line: &str) -> Option<(u64, (u64, u64))> {
    let rest = line.strip_prefix("poll ")?;
    let (id, families) = rest.split_once(": ")?;
    let words: Vec<&str> = families.split_whitespace().collect();
    let sum_before = |what: &str| -> u64 {
        words
            .windows(2)
            .filter(|w| w[1].trim_end_matches([',', ';']) == what)
            .map(|w| w[0].parse::<u64>().unwrap())
            .sum()
    };
    Some((
        id.parse().ok()?,
        (sum_before("sockets"), sum_before("records")),
    ))
}

#[test]
fn churn_for_soak_secs() {
    if !can_run_in_netns(&[]) {
        return;
    }
    let _serial = serial();
    let secs: u64 = std::env::var("SOAK_SECS").map_or(30, |s| s.parse().unwrap());
    let ns = Netns::create("soak").expect("create network namespace (run the tests as root)");
    let stop_churn = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let stop_receiver = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        s.spawn(|| churn(&ns, &stop_churn, &opened));
        let receiver = s.spawn(|| receive(&ns, &stop_receiver));
        let deadline = Instant::now() + Duration::from_secs(30);
        while opened.load(Ordering::Relaxed) < 2 * POOL as u64 {
            assert!(
                Instant::now() < deadline,
                "the churn opened {} connections in 30 s",
                opened.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let dest = format!("udp:127.0.0.1:{PORT}");
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", ns.name()])
            .arg(workspace_bin("xtcp"))
            .args([
                "--frequency",
                "1s",
                "-v",
                "--no-prom",
                "--no-statsd",
                "--dest",
                &dest,
            ])
            .stderr(Stdio::piped());
        let mut running = Running(Some(cmd.spawn().unwrap()));
        let pid = running.child().id();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let stderr = running.child().stderr.take().unwrap();
            let lines = Arc::clone(&lines);
            s.spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    lines.lock().unwrap().push(line.unwrap());
                }
            })
        };
        let started = Instant::now();
        let mut samples = Vec::new();
        while started.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_secs(1));
            samples.push(sample(pid));
        }
        let churned = opened.load(Ordering::Relaxed);
        kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
        // A poll takes well under a second; SIGTERM lets the one in flight end.
        let status = running.wait_at_most(Duration::from_secs(10));
        reader.join().unwrap();
        stop_churn.store(true, Ordering::Relaxed);
        stop_receiver.store(true, Ordering::Relaxed);
        let received = receiver.join().unwrap();
        let stderr = lines.lock().unwrap().join("\n");
        assert!(status.success(), "{status:?}: {stderr}");

        // Every poll complete and whole, nothing warned.
        let polls: BTreeMap<u64, (u64, u64)> = stderr.lines().filter_map(poll_line).collect();
        let n = total(&stderr, "", "polls");
        assert_eq!(
            polls.keys().copied().collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>()
        );
        assert!(n + 2 >= secs, "{n} polls in {secs} s: {stderr}");
        for (id, (sockets, records)) in &polls {
            assert_eq!(sockets, records, "poll {id}");
            assert_eq!(received.get(id), Some(records), "poll {id} received");
        }
        let warnings: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("warning"))
            .collect();
        assert!(warnings.is_empty(), "{warnings:?}");

        // Nothing grows: threads and descriptors never change, RSS over the
        // second half stays within 1 MiB of its peak over the first (the
        // buffer pool fills during the first polls).
        let (first, second) = samples.split_at(samples.len() / 2);
        let peak = |s: &[(u64, u64, u64)]| s.iter().map(|x| x.0).max().unwrap();
        assert!(peak(second) <= peak(first) + 1024, "RSS KiB {samples:?}");
        assert!(
            samples
                .iter()
                .all(|x| (x.1, x.2) == (samples[0].1, samples[0].2)),
            "{samples:?}"
        );

        let sockets: Vec<u64> = polls.values().map(|p| p.0).collect();
        let min_rss = samples.iter().map(|x| x.0).min().unwrap();
        println!(
            "soak {secs} s: {churned} connections opened; {n} polls, every one whole; \
             sockets per poll {}..{}; {} records received; RSS {min_rss}..{} KiB \
             (peak first half {}, second half {}); threads {}; descriptors {}",
            sockets.iter().min().unwrap(),
            sockets.iter().max().unwrap(),
            received.values().sum::<u64>(),
            peak(samples.as_slice()),
            peak(first),
            peak(second),
            samples[0].1,
            samples[0].2,
        );
    });
}
