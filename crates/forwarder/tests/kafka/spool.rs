//! The disk spool (`--spool-dir`) against a real broker and real disks: an
//! outage with a restart and a kill, a damaged spool, the bound, a full
//! and a read-only disk; and the socket a restart hands over.

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use super::*;

/// The spool's bound in the outage test: several polls of the farm.
const BOUND: u64 = 64 << 20;

/// The forwarder's series `name` in a scrape of its metrics, 0 if absent.
fn series(ns: &Netns, name: &str) -> u64 {
    metric(&scrape(ns, FORWARDER_PROM_PORT as u16), name).unwrap_or(0)
}

/// Waits until `series(name)` reaches `at_least`.
fn wait_series(ns: &Netns, name: &str, at_least: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while series(ns, name) < at_least {
        assert!(
            Instant::now() < deadline,
            "{name} below {at_least}:\n{}",
            scrape(ns, FORWARDER_PROM_PORT as u16)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The segment files in `dir`.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "spool"))
        .collect();
    files.sort();
    files
}

fn spooled_bytes(dir: &Path) -> u64 {
    segments(dir)
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum()
}

/// The record port's socket, held by the test as a socket unit holds it
/// for systemd: each forwarder started by [`activated`] takes it over, and
/// datagrams sent while none runs wait in its buffer.
fn held_socket(ns: &Netns) -> UdpSocket {
    in_ns(ns, || {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, UDP_PORT)).unwrap();
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &(64 << 20))
            .unwrap();
        s
    })
}

/// `xtcp-forwarder args` in `ns` given `socket` by the socket-activation
/// protocol (fd 3, `LISTEN_FDS=1`, `LISTEN_PID` its own), as systemd does;
/// returns once it said it took it.
fn activated(ns: &Netns, socket: &UdpSocket, args: &[&str]) -> Running {
    let forwarder = workspace_bin("xtcp-forwarder");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name(), "sh", "-c"])
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@""#)
        .arg(&forwarder)
        .args(args)
        .stderr(Stdio::piped());
    let fd = socket.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe; fd 3 becomes the socket (without
    // close-on-exec) in the child only.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut running = Running(Some(cmd.spawn().unwrap()));
    // Its metrics listener is up once it runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_ns(ns, || {
        TcpStream::connect((Ipv4Addr::LOCALHOST, FORWARDER_PROM_PORT as u16))
    })
    .is_err()
    {
        assert!(Instant::now() < deadline, "the forwarder did not start");
        assert!(
            running.child().try_wait().unwrap().is_none(),
            "the forwarder exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    running
}

/// The done-when of the spool: an exporter polling the farm every 2 s, no
/// broker for far longer than `--delivery-timeout 2s`, the forwarder
/// stopped (SIGTERM) and started again, then killed (SIGKILL) and started
/// again during the outage, then the broker up, then one more restart with
/// the broker there: every record the exporter sent reaches the topic,
/// none is dropped, the spool stays within its bound and ends empty. The
/// forwarders take the record port's socket from the test as from a socket
/// unit, so a restart loses no datagram.
#[test]
fn nothing_is_lost_through_an_outage_a_restart_and_a_kill() {
    let Some(farm) = Farm::needing("spool", &[Need::Tool("tansu")]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let bound = BOUND.to_string();
    let brokers = format!("127.0.0.1:{BROKER_PORT}");
    let args = [
        "--brokers",
        &brokers,
        "--topic",
        TOPIC,
        "--linger",
        "5ms",
        "--delivery-timeout",
        "2s",
        "--spool-dir",
        spool_dir.to_str().unwrap(),
        "--spool-bytes",
        &bound,
    ];
    let socket = held_socket(&farm.ns);
    let first = activated(&farm.ns, &socket, &args);
    let outage_began = Instant::now();
    let exporter = Running(Some(
        farm.xtcp(&["--frequency", "2s"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let sockets = farm.keys.len() as u64;
    let outage = "xtcp_forwarder_spooled_records_total{reason=\"outage\"}";
    // Two polls spooled, then a restart.
    wait_series(&farm.ns, outage, 2 * sockets, Duration::from_secs(30));
    let (status, stderr) = first.terminate();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("the socket systemd passed"), "{stderr}");
    assert_eq!(forwarder_total(&stderr, "dropped_records"), 0, "{stderr}");
    assert_eq!(
        forwarder_total(&stderr, "spooled_records"),
        forwarder_total(&stderr, "records"),
        "{stderr}"
    );
    // Every datagram is one of these, the exit line says.
    let parts: u64 = [
        "unauthenticated",
        "malformed",
        "produced",
        "refused",
        "spooled",
        "watermarks",
    ]
    .iter()
    .map(|name| forwarder_total(&stderr, name))
    .sum();
    assert_eq!(forwarder_total(&stderr, "datagrams"), parts, "{stderr}");
    let second = activated(&farm.ns, &socket, &args);
    wait_series(&farm.ns, outage, sockets, Duration::from_secs(30));
    // Killed while idle: the exporter held between polls and the socket
    // drained, so that the kill tests what is on disk, not a datagram
    // between the socket and the disk (a torn write is tested below).
    let exporter_pid = Pid::from_raw(exporter.0.as_ref().unwrap().id() as i32);
    kill(exporter_pid, Signal::SIGSTOP).unwrap();
    let mut last = series(&farm.ns, "xtcp_forwarder_datagrams_total");
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = series(&farm.ns, "xtcp_forwarder_datagrams_total");
        if now == last && in_ns(&farm.ns, || udp_queued(UDP_PORT)) == Some(0) {
            break;
        }
        last = now;
    }
    drop(second); // SIGKILL
    kill(exporter_pid, Signal::SIGCONT).unwrap();
    let third = activated(&farm.ns, &socket, &args);
    wait_series(&farm.ns, outage, sockets, Duration::from_secs(30));
    let during = spooled_bytes(&spool_dir);
    assert!(during > 0 && during <= BOUND, "{during}");

    // The broker back after at least four delivery timeouts: the spool
    // drains, new polls flow.
    let outage = Duration::from_secs(8).max(outage_began.elapsed());
    std::thread::sleep(outage.saturating_sub(outage_began.elapsed()));
    let _broker = start_broker(&farm.ns);
    wait_series(
        &farm.ns,
        "xtcp_forwarder_delivered_records_total",
        4 * sockets,
        Duration::from_secs(60),
    );
    // One more restart, the broker there.
    let (status, stderr) = third.terminate();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("records") && stderr.contains("from an earlier run"),
        "{stderr}"
    );
    let fourth = activated(&farm.ns, &socket, &args);
    wait_series(
        &farm.ns,
        "xtcp_forwarder_delivered_records_total",
        sockets,
        Duration::from_secs(30),
    );
    let (status, exporter) = exporter.terminate();
    assert!(status.success(), "{exporter}");
    let sent = dumps_total(&exporter, "records");
    let instance = total(&exporter, "", "instance");

    let numbers = |records: &[Record]| -> BTreeSet<u64> {
        records
            .iter()
            .filter(|r| r.instance == instance)
            .map(|r| r.record_counter)
            .collect()
    };
    let (records, _) = consume(&farm.ns, Duration::from_secs(90), |r| {
        numbers(r).len() as u64 >= sent
    });
    let (status, stderr) = fourth.terminate();
    assert!(status.success(), "{stderr}");
    assert_eq!(
        numbers(&records),
        (1..=sent).collect::<BTreeSet<_>>(),
        "every record the exporter sent, in the topic"
    );
    assert_eq!(forwarder_total(&stderr, "dropped_records"), 0, "{stderr}");
    assert_eq!(forwarder_total(&stderr, "lost"), 0, "{stderr}");
    assert!(
        segments(&spool_dir).is_empty(),
        "{:?}",
        segments(&spool_dir)
    );
    let repeated = records.iter().filter(|r| r.instance == instance).count() as u64 - sent;
    println!(
        "sent {sent} records, all in the topic ({repeated} repeated); no broker for {:.1} s; the spool held {during} bytes after the kill",
        outage.as_secs_f64()
    );
}

/// Nothing listens on port 1: every connection to it is refused.
const NO_BROKER: &str = "127.0.0.1:1";

/// A forwarder alone to `brokers` with a spool in `dir`.
fn spooling(alone: &Alone, brokers: &str, dir: &Path, extra: &[&str]) -> Running {
    let mut args = vec!["--brokers", brokers, "--spool-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    alone_forwarder(alone, &args)
}

/// Sends `n` datagrams of `records` numbered records each, run `instance`.
fn send_numbered(alone: &Alone, instance: u64, n: u64, records: u64) {
    let sender = alone.sender();
    for i in 0..n {
        sender
            .send_to(
                &numbered_envelope(instance, i * records + 1, records),
                ("127.0.0.1", UDP_PORT),
            )
            .unwrap();
    }
}

/// How many lines of `stderr` contain `needle`.
fn said(stderr: &str, needle: &str) -> usize {
    stderr.lines().filter(|l| l.contains(needle)).count()
}

/// A spool damaged while no forwarder ran (a byte flipped in an entry, a
/// torn entry at the end): the next start skips and cuts both, counts them
/// and says so once; every other entry reaches the broker and the spool
/// ends empty.
#[test]
fn a_damaged_spool_is_cut_counted_said_once_and_the_rest_delivered() {
    let Some(alone) = Alone::new("spool-damage", &[Need::Tool("tansu")]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let forwarder = spooling(&alone, NO_BROKER, dir.path(), &[]);
    send_numbered(&alone, 7, 10, 3);
    wait_series(
        &alone.ns,
        "xtcp_forwarder_spooled_messages_total{reason=\"outage\"}",
        10,
        Duration::from_secs(10),
    );
    let (status, stderr) = forwarder.terminate();
    assert!(status.success(), "{stderr}");
    let files = segments(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let entry = bytes.len() / 10;
    // Entry 3's payload changed, and half an entry after the last.
    bytes[2 * entry + entry / 2] ^= 0xff;
    let torn = bytes[..entry / 2].to_vec();
    bytes.extend_from_slice(&torn);
    std::fs::write(&files[0], &bytes).unwrap();

    let _broker = start_broker(&alone.ns);
    let brokers = format!("127.0.0.1:{BROKER_PORT}");
    let forwarder = spooling(&alone, &brokers, dir.path(), &[]);
    wait_series(
        &alone.ns,
        "xtcp_forwarder_delivered_records_total",
        27,
        Duration::from_secs(30),
    );
    let scraped = scrape(&alone.ns, FORWARDER_PROM_PORT as u16);
    assert_eq!(
        metric::<u64>(&scraped, "xtcp_forwarder_spool_corrupt_total"),
        Some(2)
    );
    assert_eq!(
        metric::<u64>(&scraped, "xtcp_forwarder_spool_corrupt_bytes_total"),
        Some((entry + entry / 2) as u64)
    );
    let (records, _) = consume(&alone.ns, Duration::from_secs(30), |r| r.len() >= 27);
    let (status, stderr) = forwarder.terminate();
    assert!(status.success(), "{stderr}");
    assert_eq!(said(&stderr, "corrupt spans"), 1, "{stderr}");
    let numbers: Vec<u64> = records.iter().map(|r| r.record_counter).collect();
    let want: Vec<u64> = (1..=30).filter(|n| !(7..=9).contains(n)).collect();
    assert_eq!(numbers, want, "in order, entry 3 left out");
    assert!(segments(dir.path()).is_empty());
}

/// At `--spool-bytes` the oldest segments are dropped, counted by records
/// and said once; the spool stays within the bound and keeps the newest.
#[test]
fn at_the_bound_the_oldest_data_is_dropped_counted_and_said_once() {
    let Some(alone) = Alone::new("spool-bound", &[]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let forwarder = spooling(&alone, NO_BROKER, dir.path(), &["--spool-bytes", "1048576"]);
    // 400 datagrams of 500 records: about 4 MiB.
    send_numbered(&alone, 9, 400, 500);
    wait_series(
        &alone.ns,
        "xtcp_forwarder_records_total",
        400 * 500,
        Duration::from_secs(20),
    );
    let scraped = scrape(&alone.ns, FORWARDER_PROM_PORT as u16);
    let bytes: u64 = metric(&scraped, "xtcp_forwarder_spool_bytes").unwrap();
    assert!(bytes <= 1 << 20 && bytes > 900 << 10, "{bytes}");
    assert_eq!(spooled_bytes(dir.path()), bytes);
    let dropped: u64 = metric(
        &scraped,
        "xtcp_forwarder_dropped_records_total{reason=\"spool_bound\"}",
    )
    .unwrap();
    let kept: u64 = metric(&scraped, "xtcp_forwarder_spool_records").unwrap();
    assert_eq!(dropped + kept, 400 * 500, "{scraped}");
    assert!(dropped > 0 && kept > 0);
    // Asking for the brokers once a second does not make librdkafka
    // reconnect more than its own backoff does (it did, 25 times a second,
    // while each metadata request waited).
    let down: u64 = metric(
        &scraped,
        "xtcp_forwarder_kafka_errors_total{code=\"AllBrokersDown\"}",
    )
    .unwrap_or(0);
    let limit = 5 * started.elapsed().as_secs() + 10;
    assert!(down <= limit, "{down} reports of all brokers down");
    // /healthz says so; within 30 s of the start it is still 200.
    let health = in_ns(&alone.ns, || {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, FORWARDER_PROM_PORT as u16)).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    });
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(
        health.contains(&format!("spool growing, the brokers down: {bytes} bytes")),
        "{health}"
    );
    let (status, stderr) = forwarder.terminate();
    assert!(status.success(), "{stderr}");
    assert_eq!(said(&stderr, "--spool-bytes"), 1, "{stderr}");
    assert_eq!(forwarder_total(&stderr, "dropped_records"), dropped);
}

/// A tmpfs mounted for a test, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, options: &str) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "xtcp-test"])
            .arg(at)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs {options}");
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A disk that fills, and one mounted read-only: what cannot be written is
/// dropped, counted by records, said once; the forwarder keeps running and
/// its exit line balances.
#[test]
fn a_full_or_read_only_disk_is_counted_and_said_once() {
    let Some(alone) = Alone::new("spool-disk", &[]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (name, options) in [("full", "size=256k"), ("ro", "ro,size=1m")] {
        let at = dir.path().join(name);
        let _mount = Mount::tmpfs(&at, options);
        let forwarder = spooling(&alone, NO_BROKER, &at, &[]);
        // 40 datagrams of 500 records (about 400 KiB), then 10 more every
        // half second: new segments are tried again, once a second.
        send_numbered(&alone, 11, 40, 500);
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(500));
            send_numbered(&alone, 11, 10, 500);
        }
        let sent = 80 * 500;
        wait_series(
            &alone.ns,
            "xtcp_forwarder_records_total",
            sent,
            Duration::from_secs(20),
        );
        // No segment left empty by a failed try.
        for segment in segments(&at) {
            assert!(
                std::fs::metadata(&segment).unwrap().len() > 0,
                "{segment:?}"
            );
        }
        let scraped = scrape(&alone.ns, FORWARDER_PROM_PORT as u16);
        let failed: u64 = metric(
            &scraped,
            "xtcp_forwarder_dropped_records_total{reason=\"spool_failed\"}",
        )
        .unwrap_or(0);
        let spooled: u64 = metric(
            &scraped,
            "xtcp_forwarder_spooled_records_total{reason=\"outage\"}",
        )
        .unwrap_or(0);
        assert_eq!(failed + spooled, sent, "{name}:\n{scraped}");
        assert!(failed > 0, "{name}");
        if name == "ro" {
            assert_eq!(spooled, 0);
        } else {
            assert!(spooled > 0);
            assert_eq!(
                spooled_bytes(&at),
                metric::<u64>(&scraped, "xtcp_forwarder_spool_bytes").unwrap()
            );
        }
        let (status, stderr) = forwarder.terminate();
        assert!(status.success(), "{name}: {stderr}");
        assert_eq!(
            said(&stderr, "cannot write to the spool"),
            1,
            "{name}: {stderr}"
        );
        assert_eq!(
            forwarder_total(&stderr, "dropped_records"),
            failed,
            "{stderr}"
        );
    }
}

/// systemd's own socket-activation helper passes the socket it listens on
/// to the forwarder, which receives on it instead of `--listen`.
#[test]
fn the_socket_systemd_passes_is_the_one_received_on() {
    let Some(alone) = Alone::new("spool-activate", &[Need::Tool("systemd-socket-activate")]) else {
        return;
    };
    let listen = format!("127.0.0.1:{UDP_PORT}");
    let mut forwarder = Running(Some(
        alone
            .exec(
                "systemd-socket-activate",
                &[
                    "--datagram",
                    "--listen",
                    &listen,
                    workspace_bin("xtcp-forwarder").to_str().unwrap(),
                    "--listen",
                    "127.0.0.1:1",
                    "--brokers",
                    NO_BROKER,
                ],
            )
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    alone.wait_bound(UDP_PORT, &mut forwarder);
    // The first datagram starts it; all are received on the passed socket.
    send_numbered(&alone, 13, 5, 2);
    wait_series(
        &alone.ns,
        "xtcp_forwarder_records_total",
        10,
        Duration::from_secs(20),
    );
    let (status, stderr) = forwarder.terminate();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("receiving on {listen}, the socket systemd passed")),
        "{stderr}"
    );
}
