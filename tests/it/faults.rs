//! Faults against the real kernel and real sockets, each in the farm of
//! the test kit's harness (10002 sockets in a private namespace): what goes wrong is
//! counted and said, nothing is lost that need not be, and the next poll is
//! whole. Needs root.
//!
//! Most tests stall the exporter on purpose: with `--dest stdout` into a
//! pipe nobody reads, the inetdiagers block, the channel (one buffer)
//! fills, the netlinker waits, and the kernel's dump waits with it, until
//! the test reads again.
//!
//! They run the per-family layout (`xtcp` below): two dumps at once, each
//! of its own socket, so that a fault in one is seen beside the other going
//! on. The combined layout's one dump runs the same netlinker, dump and
//! poller code.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::process::{ChildStdout, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::*;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag};
use nix::sys::socket::{SockProtocol, SockType};
use nix::unistd::Pid;
use serde_json::Value;
use xtcp::wire::message::{NLMSG_NOOP, NLM_F_DUMP_INTR, NLM_F_MULTI};
use xtcp_testkit::Netns;

/// `xtcp` in the farm with these flags and `--dump-layout per-family`.
fn xtcp(farm: &Farm, args: &[&str]) -> std::process::Command {
    let mut cmd = farm.xtcp(args);
    cmd.args(["--dump-layout", "per-family"]);
    cmd
}

/// Reads JSON records until the pipe closes: records per poll id.
fn drain(stdout: ChildStdout) -> JoinHandle<BTreeMap<u64, u64>> {
    std::thread::spawn(move || {
        let mut polls = BTreeMap::new();
        for line in BufReader::new(stdout).lines() {
            let r: Value = serde_json::from_str(&line.unwrap()).unwrap();
            *polls.entry(r["poll_id"].as_u64().unwrap()).or_default() += 1;
        }
        polls
    })
}

/// Starts the exporter writing JSON into a pipe that is not read yet.
fn stalled(farm: &Farm, flags: &[&str]) -> Running {
    let mut args = vec!["--dest", "stdout", "--channel-size", "1", "-v"];
    args.extend_from_slice(flags);
    let mut cmd = xtcp(farm, &args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    Running(Some(cmd.spawn().unwrap()))
}

/// Portids and `Dump` flags (a dump in progress) of the exporter's
/// `NETLINK_SOCK_DIAG` sockets, from /proc/PID/net/netlink (its namespace).
fn sock_diag_sockets(pid: u32) -> Vec<(u32, bool)> {
    let inodes: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/netlink")).unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            // sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1] == "4" && inodes.contains(f[9])).then(|| (f[2].parse().unwrap(), f[6] == "1"))
        })
        .collect()
}

/// Waits until both families' dumps are in progress (stalled).
fn wait_stalled(pid: u32) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sockets = sock_diag_sockets(pid);
        if sockets.len() == 2 && sockets.iter().all(|s| s.1) {
            return sockets.into_iter().map(|s| s.0).collect();
        }
        assert!(Instant::now() < deadline, "no stalled dumps: {sockets:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn header(len: u32, msg_type: u16, flags: u16, seq: u32) -> Vec<u8> {
    [
        &len.to_ne_bytes()[..],
        &msg_type.to_ne_bytes(),
        &flags.to_ne_bytes(),
        &seq.to_ne_bytes(),
        &0u32.to_ne_bytes(),
    ]
    .concat()
}

/// The stderr line of each poll (`-v`) and each warning, after the exit.
fn finish(
    mut running: Running,
    stdout: JoinHandle<BTreeMap<u64, u64>>,
) -> (String, BTreeMap<u64, u64>) {
    let mut stderr = String::new();
    let child = running.child();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    running.0 = None;
    assert!(status.success(), "{status:?}: {stderr}");
    (stderr, stdout.join().unwrap())
}

/// The warnings about what a poll's dumps lost or skipped (not the ones
/// about its length: JSON through a pipe makes every poll long).
fn warnings_of(stderr: &str, poll: u64) -> Vec<&str> {
    let family = |f| format!("warning: poll {poll} {f}: ");
    stderr
        .lines()
        .filter(|l| l.starts_with(&family("v4")) || l.starts_with(&family("v6")))
        .collect()
}

#[test]
fn dump_intr_and_malformed_datagrams_are_counted_and_the_next_poll_is_whole() {
    let Some(farm) = Farm::new("intr") else {
        return;
    };
    let mut running = stalled(&farm, &["--frequency", "300ms", "--max-loops", "2"]);
    let pid = running.child().id();
    let portids = wait_stalled(pid);
    // The kernel never flags sock_diag dumps NLM_F_DUMP_INTR (inet_diag
    // has no consistency check), so the flag, and a datagram that cannot
    // be framed, are sent to the exporter's sockets from user space (root
    // may send netlink unicasts) with the running dump's sequence number:
    // each socket numbers its dumps from 1.
    let interrupted = header(16, NLMSG_NOOP, NLM_F_MULTI | NLM_F_DUMP_INTR, 1);
    let malformed = header(64, NLMSG_NOOP, NLM_F_MULTI, 1);
    in_ns(&farm.ns, || {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )
        .unwrap();
        for &portid in &portids {
            for datagram in [&interrupted, &malformed] {
                sendto(
                    fd.as_raw_fd(),
                    datagram,
                    &NetlinkAddr::new(portid, 0),
                    MsgFlags::empty(),
                )
                .unwrap();
            }
        }
    });
    // Still the same dumps: the datagrams are part of them.
    assert!(sock_diag_sockets(pid).iter().all(|s| s.1));
    let stdout = drain(running.child().stdout.take().unwrap());
    let (stderr, polls) = finish(running, stdout);

    for family in ["v4", "v6"] {
        assert_eq!(total(&stderr, family, "interrupted"), 1, "{stderr}");
        assert_eq!(total(&stderr, family, "netlink_errors"), 1, "{stderr}");
    }
    let first = warnings_of(&stderr, 1);
    assert_eq!(first.len(), 2, "{stderr}");
    for w in first {
        assert!(w.contains("1 datagrams flagged NLM_F_DUMP_INTR"), "{w}");
        assert!(w.contains("1 netlink datagrams lost"), "{w}");
    }
    assert!(warnings_of(&stderr, 2).is_empty(), "{stderr}");
    // No socket was lost: the injected datagrams held none.
    let sockets = farm.keys.len() as u64;
    assert_eq!(polls, [(1, sockets), (2, sockets)].into(), "{stderr}");
}

/// A reader that stalls for 1.5 s, five times `--netlink-timeout`: the
/// netlinkers wait on the full channel and the kernel waits with them, which
/// is a slow output, not a silent kernel. The poll is slow but whole: no
/// dump is abandoned, nothing is stale, and memory stays at the pool's bound.
/// A second namespace's dumps, requested while the farm's stall, wait their
/// turn that long and are not abandoned either.
#[test]
fn a_slow_output_makes_a_poll_slow_but_whole() {
    let Some(farm) = Farm::new("stall") else {
        return;
    };
    let queued = Netns::create("stallqueued").unwrap();
    let _listener = in_ns(&queued, || {
        std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 40001)).unwrap()
    });
    let mut running = stalled(
        &farm,
        &[
            "--netlink-timeout",
            "300ms",
            "--frequency",
            "500ms",
            "--max-loops",
            "3",
            // The farm's namespace first, so that the other's dumps queue.
            "--netns",
            "/proc/self/ns/net",
            "--netns",
            queued.name(),
        ],
    );
    wait_stalled(running.child().id());
    std::thread::sleep(Duration::from_millis(1500));
    let stdout = drain(running.child().stdout.take().unwrap());
    let (stderr, polls) = finish(running, stdout);

    let sockets = farm.keys.len() as u64 + 1;
    assert_eq!(
        polls,
        [(1, sockets), (2, sockets), (3, sockets)].into(),
        "{stderr}"
    );
    for poll in 1..=3 {
        assert!(warnings_of(&stderr, poll).is_empty(), "{stderr}");
    }
    for family in ["v4", "v6"] {
        assert_eq!(total(&stderr, family, "timeouts"), 0, "{stderr}");
        assert!(total(&stderr, family, "channel_full") > 0, "{stderr}");
        assert!(
            total(&stderr, family, "channel_blocked_ms") >= 1000,
            "{stderr}"
        );
    }
    assert_eq!(total(&stderr, "", "stale_datagrams"), 0, "{stderr}");
    // Memory stayed bounded while stalled: each family's pool never grew
    // past its capacity, a batch of 8 for the channel's one slot, the
    // netlinker and the inetdiager; and the stall filled it.
    let line = stderr.lines().find(|l| l.starts_with("poll 1: ")).unwrap();
    assert_eq!(line.matches(", 24 buffers;").count(), 2, "{line}");
}

/// Nobody reads the dump: the netlinker threads are stopped (ptrace) across
/// two polls, so each dump is truly silent. Both are abandoned and counted;
/// the abandoned dumps' sockets are replaced, so once the netlinkers run
/// again the next request is not refused (`EBUSY`: a netlink socket runs
/// one dump at a time) and that poll is whole.
#[test]
fn a_dump_nobody_reads_is_abandoned_and_the_next_poll_is_whole() {
    let Some(farm) = Farm::new("silent") else {
        return;
    };
    let receiver = Receiver::start(&farm.ns);
    // Built before the clock starts (the first test to ask builds it).
    let mut exporter = xtcp(
        &farm,
        &[
            "--netlink-timeout",
            "1s",
            "--frequency",
            "2s",
            "--max-loops",
            "4",
            "--no-statsd",
            "-v",
        ],
    );
    exporter.stderr(Stdio::piped());
    let started = Instant::now();
    let mut running = Running(Some(exporter.spawn().unwrap()));
    let pid = running.child().id();
    // Poll 1 at 0 s is whole. Stopped from 1 s: poll 2 (2 s) and poll 3
    // (4 s, on the old sockets it would be refused) hear nothing until the
    // threads run again at 4.4 s, well before poll 3's 5 s timeout.
    sleep_until(started + Duration::from_secs(1));
    let stopped = StoppedThreads::stop(pid, "netlinker-");
    assert_eq!(stopped.count(), 2, "one netlinker per family");
    sleep_until(started + Duration::from_millis(4400));
    drop(stopped);
    let mut stderr_pipe = running.child().stderr.take().unwrap();
    let status = running.wait_at_most(Duration::from_secs(15));
    let mut stderr = String::new();
    stderr_pipe.read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    let polls = by_poll(&receiver.finish().records)
        .into_iter()
        .map(|(id, records)| (id, records.len() as u64))
        .collect::<BTreeMap<u64, u64>>();
    let sockets = farm.keys.len() as u64;
    assert_eq!(polls.get(&1), Some(&sockets), "{polls:?}: {stderr}");
    let abandoned = warnings_of(&stderr, 2);
    assert_eq!(abandoned.len(), 2, "both families: {stderr}");
    assert!(
        abandoned.iter().all(|w| w.contains("1 dumps abandoned")),
        "{stderr}"
    );
    for whole in [3, 4] {
        assert_eq!(polls.get(&whole), Some(&sockets), "{polls:?}: {stderr}");
        assert!(warnings_of(&stderr, whole).is_empty(), "{stderr}");
    }
    for family in ["v4", "v6"] {
        assert_eq!(total(&stderr, family, "timeouts"), 1, "{stderr}");
        assert_eq!(
            total(&stderr, family, "netlink_errors"),
            0,
            "no EBUSY: {stderr}"
        );
    }
}

/// One poll whose dumps are stalled (the exporter's stdout is not read),
/// with no second poll in sight.
fn stalled_for_good(farm: &Farm) -> (Running, Pid) {
    let mut running = stalled(farm, &["--frequency", "1h"]);
    let pid = running.child().id();
    wait_stalled(pid);
    (running, Pid::from_raw(pid as i32))
}

fn sleep_until(when: Instant) {
    std::thread::sleep(when.saturating_duration_since(Instant::now()));
}

#[test]
fn sigterm_mid_poll_finishes_the_poll_in_flight() {
    let Some(farm) = Farm::new("midpoll") else {
        return;
    };
    let (mut running, pid) = stalled_for_good(&farm);
    kill(pid, Signal::SIGTERM).unwrap();
    // The stop is noted; the poll goes on once its records can be written.
    std::thread::sleep(Duration::from_millis(300));
    let stdout = drain(running.child().stdout.take().unwrap());
    let (stderr, polls) = finish(running, stdout);
    assert_eq!(polls, [(1, farm.keys.len() as u64)].into(), "{stderr}");
    assert_eq!(total(&stderr, "", "polls"), 1, "{stderr}");
    assert!(warnings_of(&stderr, 1).is_empty(), "{stderr}");
}

/// `xtcp --dest stdout | less`, paused: the inetdiagers block in `write(2)`,
/// which no signal ends. The first SIGTERM waits for the poll in flight;
/// the second ends the process within a second (exit 1, the reason said).
#[test]
fn a_second_signal_exits_even_with_stdout_blocked() {
    let Some(farm) = Farm::new("blocked") else {
        return;
    };
    let (mut running, pid) = stalled_for_good(&farm);
    let signal = || kill(pid, Signal::SIGTERM).unwrap();
    signal();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        running.child().try_wait().unwrap().is_none(),
        "stopped before the poll ended"
    );
    let mut stderr_pipe = running.child().stderr.take().unwrap();
    signal();
    let sent = Instant::now();
    let status = running.wait_at_most(Duration::from_secs(3));
    let took = sent.elapsed();
    let mut stderr = String::new();
    stderr_pipe.read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert!(
        stderr.contains("error: second signal (15) while stopping"),
        "{stderr}"
    );
}

/// Records per poll id that a UDP socket bound now receives until `until`.
fn receive(farm: &Farm, until: impl Fn(&BTreeMap<u64, u64>) -> bool) -> BTreeMap<u64, u64> {
    let socket = bind_receiver(&farm.ns);
    let mut polls = BTreeMap::new();
    let mut buf = vec![0; 65536];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !until(&polls) {
        assert!(Instant::now() < deadline, "received {polls:?}");
        if let Ok(n) = socket.recv(&mut buf) {
            count_by_poll(&mut polls, &buf[..n]);
        }
    }
    polls
}

#[test]
fn destination_gone_and_back() {
    let Some(farm) = Farm::new("gone") else {
        return;
    };
    let sockets = farm.keys.len() as u64;
    let dest = format!("udp:127.0.0.1:{PORT}");
    let mut cmd = xtcp(&farm, &["--frequency", "400ms", "-v", "--dest", &dest]);
    cmd.stderr(Stdio::piped());
    let mut running = Running(Some(cmd.spawn().unwrap()));
    // There, for one whole poll: not the first received (it may have begun
    // before the bind), and not necessarily the second (a test starved on a
    // loaded machine lets its receive buffer overflow).
    let whole_poll = |p: &BTreeMap<u64, u64>| {
        p.iter()
            .skip(1)
            .find(|&(_, &n)| n == sockets)
            .map(|(&poll, _)| poll)
    };
    let whole = whole_poll(&receive(&farm, |p| whole_poll(p).is_some())).unwrap();
    // Gone (the socket is closed) for a second: sends fail and are counted.
    std::thread::sleep(Duration::from_secs(1));
    // Back: whole polls again.
    let back = whole_poll(&receive(&farm, |p| whole_poll(p).is_some())).unwrap();
    assert!(
        back > whole + 1,
        "polls {whole} and {back} should have a gap"
    );
    let pid = running.child().id();
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let (stderr, _) = finish(running, std::thread::spawn(BTreeMap::new));
    let lost = dumps_total(&stderr, "records_lost");
    assert!(lost > 0, "{stderr}");
    assert!(
        stderr.contains("first send: Connection refused"),
        "{stderr}"
    );
    // The polls while it was gone warn, the whole ones around them do not.
    assert!(warnings_of(&stderr, whole).is_empty(), "{stderr}");
    assert!(warnings_of(&stderr, back).is_empty(), "{stderr}");
    assert!(
        (whole + 1..back).any(|p| !warnings_of(&stderr, p).is_empty()),
        "{stderr}"
    );
}
