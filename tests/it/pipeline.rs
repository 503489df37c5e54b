//! The exporter at scale against the real kernel: a private network namespace
//! with 5000 established loopback connections (2500 per family, 10002 TCP
//! sockets with the two listeners), the `xtcp` binary run inside it with
//! `ip netns exec`, and UDP receivers in the same namespace: this test's own,
//! or `xtcp-debug-server`. Needs root.
//!
//! Each test builds its own namespace; a lock runs them one at a time so the
//! process stays under its open-file limit.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use xtcp_testkit::Netns;

/// Two polls into a receiver: every socket exactly once per poll.
fn assert_exactly_once_per_poll(farm: &Farm, threads: &[&str]) {
    let receiver = Receiver::start(&farm.ns);
    let dest = format!("udp:127.0.0.1:{PORT}");
    let mut args = vec!["--max-loops", "2", "--frequency", "300ms", "--dest", &dest];
    args.extend_from_slice(threads);
    let (_, stderr) = run(farm.xtcp(&args));
    let Received {
        records, datagrams, ..
    } = receiver.finish();

    let polls = by_poll(&records);
    assert_eq!(
        polls.keys().copied().collect::<Vec<_>>(),
        [1, 2],
        "{threads:?}"
    );
    for (poll, records) in &polls {
        let keys: BTreeSet<Key> = records.iter().map(|r| key(r)).collect();
        assert_eq!(
            keys.len(),
            records.len(),
            "poll {poll}: a socket arrived twice"
        );
        assert_eq!(keys, farm.keys, "poll {poll}: sockets received vs opened");
    }
    // One gapless record_counter sequence over both polls and families.
    let mut counters: Vec<u64> = records.iter().map(|r| r.record_counter).collect();
    counters.sort_unstable();
    assert_eq!(counters, (1..=records.len() as u64).collect::<Vec<_>>());

    // Over two polls.
    let sockets = 2 * farm.keys.len() as u64;
    assert_eq!(dumps_total(&stderr, "sockets"), sockets, "{stderr}");
    assert_eq!(dumps_total(&stderr, "records"), sockets, "{stderr}");
    assert_eq!(dumps_total(&stderr, "send_errors"), 0, "{stderr}");
    // One dump of both families, or one per family.
    let per_family = threads.contains(&"per-family");
    assert_eq!(stderr.contains(" | all "), !per_family, "{stderr}");
    assert_eq!(stderr.contains(" | v6 "), per_family, "{stderr}");
    // Batched by default: far fewer datagrams than records.
    let sent = dumps_total(&stderr, "sent_datagrams");
    assert_eq!(sent, datagrams);
    assert!(
        datagrams * 10 < records.len() as u64,
        "{datagrams} datagrams"
    );
}

#[test]
fn every_socket_arrives_exactly_once_per_poll() {
    let Some(farm) = Farm::new("once") else {
        return;
    };
    // Several netlinkers sharing a socket and several inetdiagers sharing a
    // channel: the same sockets, still once each, in either layout.
    let threads = [
        "--netlinkers4",
        "3",
        "--netlinkers6",
        "2",
        "--inetdiagers4",
        "3",
        "--inetdiagers6",
        "2",
    ];
    for layout in ["combined", "per-family"] {
        assert_exactly_once_per_poll(&farm, &["--dump-layout", layout]);
        let mut args = vec!["--dump-layout", layout];
        args.extend_from_slice(&threads);
        assert_exactly_once_per_poll(&farm, &args);
    }
}

#[test]
fn a_full_channel_waits_and_loses_nothing() {
    let Some(farm) = Farm::new("full") else {
        return;
    };
    // JSON to stdout is far slower than the kernel: a one-buffer channel fills.
    let mut cmd = farm.xtcp(&[
        "--max-loops",
        "1",
        "--dest",
        "stdout",
        "--channel-size",
        "1",
    ]);
    cmd.stdout(Stdio::null());
    let (_, stderr) = run(cmd);
    let full = dumps_total(&stderr, "channel_full");
    assert!(full > 0, "{stderr}");
    assert_eq!(
        dumps_total(&stderr, "records"),
        farm.keys.len() as u64,
        "{stderr}"
    );
}

#[test]
fn long_polls_are_warned_and_counted() {
    let Some(farm) = Farm::new("long") else {
        return;
    };
    // 10k sockets take tens of ms, far over 0.8 x 5ms.
    let (_, stderr) = run(farm.xtcp(&[
        "--max-loops",
        "2",
        "--frequency",
        "5ms",
        "--dest",
        "udp:127.0.0.1:9",
    ]));
    assert_eq!(total(&stderr, "", "long_polls"), 2, "{stderr}");
    assert!(stderr.contains("warning: poll 1 took "), "{stderr}");
    assert!(
        stderr.contains("more than 0.8 of the 5ms --frequency"),
        "{stderr}"
    );
}

#[test]
fn sampling_keeps_the_same_sockets_every_poll() {
    let Some(farm) = Farm::new("sample") else {
        return;
    };
    let receiver = Receiver::start(&farm.ns);
    let dest = format!("udp:127.0.0.1:{PORT}");
    let modulus = 7;
    let (_, stderr) = run(farm.xtcp(&[
        "--max-loops",
        "3",
        "--frequency",
        "300ms",
        "--dest",
        &dest,
        "--sampling-modulus",
        &modulus.to_string(),
        // One record per datagram: the other layout, at scale.
        "--udp-batch-bytes",
        "0",
    ]));
    let Received {
        records, datagrams, ..
    } = receiver.finish();
    assert_eq!(datagrams, records.len() as u64);

    let polls = by_poll(&records);
    assert_eq!(polls.len(), 3);
    let sets: Vec<BTreeSet<u64>> = polls
        .values()
        .map(|rs| rs.iter().map(|r| r.inet_diag_msg_socket_cookie).collect())
        .collect();
    assert!(
        sets.iter().all(|s| *s == sets[0]),
        "a different sample on a later poll"
    );
    let want = farm.keys.len() as f64 / modulus as f64;
    let got = sets[0].len() as f64;
    assert!(
        (got - want).abs() < want * 0.15,
        "kept {got}, expected about {want}"
    );
    let keys: BTreeSet<Key> = polls[&1].iter().map(|r| key(r)).collect();
    assert!(keys.is_subset(&farm.keys));
    let sampled = dumps_total(&stderr, "sampled");
    assert_eq!(sampled, records.len() as u64, "{stderr}");
}

/// Reads lines from the child's stdout until `n` arrived or `deadline`.
fn read_lines(child: &mut Running, n: usize, deadline: Duration) -> Vec<String> {
    let stdout = child.child().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let end = Instant::now() + deadline;
    let mut lines = Vec::new();
    while lines.len() < n {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    lines
}

#[test]
fn debug_server_prints_every_record_as_json_and_counts_garbage() {
    let Some(farm) = Farm::new("debug") else {
        return;
    };
    let mut server = farm.debug_server(&["--format", "json"]);
    // Two inetdiagers per family: the run's numbers arrive interleaved.
    run(farm.xtcp(&[
        "--max-loops",
        "1",
        "--inetdiagers4",
        "2",
        "--inetdiagers6",
        "2",
    ]));
    let lines = read_lines(&mut server, farm.keys.len(), Duration::from_secs(20));
    // Garbage from another sender: counted and reported, not fatal.
    in_ns(&farm.ns, || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(b"\xffnot protobuf", ("127.0.0.1", PORT)).unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{status:?}: {stderr}");

    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let keys: BTreeSet<Key> = records
        .iter()
        .map(|r| {
            let n = |f: &str| r[f].as_u64().unwrap_or_else(|| panic!("{f} in {r}"));
            (
                n("inet_diag_msg_family") as u32,
                n("inet_diag_msg_socket_source_port") as u16,
                n("inet_diag_msg_socket_destination_port") as u16,
            )
        })
        .collect();
    assert_eq!(keys, farm.keys);
    assert_eq!(records.len(), farm.keys.len());
    for r in &records {
        let v6 = r["inet_diag_msg_family"] == libc::AF_INET6;
        let lo = if v6 { "::1" } else { "127.0.0.1" };
        assert_eq!(r["inet_diag_msg_socket_source"], lo, "{r}");
        assert_eq!(r["poll_id"], 1);
        let established = r["inet_diag_msg_state"] == 1;
        assert_eq!(r["tcp_info_state"], r["inet_diag_msg_state"], "{r}");
        assert_eq!(
            r["congestion_algorithm_string"].as_str().map(str::is_empty),
            Some(false)
        );
        if established {
            assert_eq!(r["inet_diag_msg_socket_destination"], lo, "{r}");
        }
    }
    assert!(stderr.contains("warning: undecodable datagram"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "records {} unauthenticated 0 undecodable 1",
            farm.keys.len()
        )),
        "{stderr}"
    );
    // Interleaved is not lost: every number of the run arrived once.
    for counter in ["lost", "duplicated", "untracked", "kernel_drops"] {
        assert_eq!(
            stopped_value(&stderr, "xtcp-debug-server", "", counter),
            0,
            "{stderr}"
        );
    }
}

#[test]
fn debug_server_text_format_reads_like_ss() {
    let Some(farm) = Farm::new("text") else {
        return;
    };
    let mut server = farm.debug_server(&["--format", "text"]);
    run(farm.xtcp(&["--max-loops", "1", "--no6", "--states", "established"]));
    let lines = read_lines(&mut server, 2 * PAIRS, Duration::from_secs(20));
    let (status, _) = server.terminate();
    assert!(status.success());
    assert_eq!(lines.len(), 2 * PAIRS);
    for line in &lines {
        assert!(line.starts_with("ESTAB 127.0.0.1:"), "{line}");
        assert!(
            line.contains(" > 127.0.0.1:") && line.contains(" rtt "),
            "{line}"
        );
    }
}

#[test]
fn nobody_listening_keeps_polling_and_counts_send_errors() {
    let Some(farm) = Farm::new("nobody") else {
        return;
    };
    let (_, stderr) = run(farm.xtcp(&[
        "--max-loops",
        "3",
        "--frequency",
        "200ms",
        "--dest",
        "udp:127.0.0.1:9",
    ]));
    assert_eq!(total(&stderr, "", "polls"), 3, "{stderr}");
    let sockets = 3 * 2 * (2 * PAIRS as u64 + 1);
    let records = dumps_total(&stderr, "records");
    assert_eq!(records, sockets, "records are still built: {stderr}");
    let errors = dumps_total(&stderr, "send_errors");
    let lost = dumps_total(&stderr, "records_lost");
    assert!(errors > 0 && lost > 0, "{stderr}");
    assert!(
        stderr.contains("first send: Connection refused"),
        "{stderr}"
    );
}

/// Starts a long-running exporter, waits for its first poll, signals it and
/// returns (exit status, time from the signal to the exit, stderr).
fn signal_after_first_poll(
    farm: &Farm,
    signal: Signal,
) -> (std::process::ExitStatus, Duration, String) {
    let mut running = Running(Some(
        farm.xtcp(&["--frequency", "1h", "-v"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let child = running.child();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut text = String::new();
    while !text.contains("poll 1:") {
        assert!(
            stderr.read_line(&mut text).unwrap() > 0,
            "exited early: {text}"
        );
    }
    let signalled = Instant::now();
    kill(Pid::from_raw(child.id() as i32), signal).unwrap();
    let status = child.wait().unwrap();
    let took = signalled.elapsed();
    std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
    (status, took, text)
}

#[test]
fn sigterm_and_sigint_stop_within_a_second_with_exit_0() {
    let Some(farm) = Farm::new("signal") else {
        return;
    };
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let (status, took, stderr) = signal_after_first_poll(&farm, signal);
        assert_eq!(status.code(), Some(0), "{signal}: {stderr}");
        assert!(took < Duration::from_secs(1), "{signal}: took {took:?}");
        assert_eq!(total(&stderr, "", "polls"), 1, "{stderr}");
    }
}

/// One HTTP/1.1 request to the exporter's metrics port inside the
/// namespace: `(status, body)`, or status 0 when nothing listens.
fn http(ns: &Netns, request_line: &str) -> (u16, String) {
    let Ok(mut stream) = in_ns(ns, || TcpStream::connect((Ipv4Addr::LOCALHOST, PROM_PORT))) else {
        return (0, String::new());
    };
    write!(
        stream,
        "{request_line} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

const PROM_PORT: u16 = 9000;

/// The value of one series (`name{labels}` as exposed) in a scrape.
fn series(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(s, _)| *s == name)
        .map(|(_, v)| v.parse().unwrap())
}

/// Sum over every label set of metric `name`.
fn sum(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum()
}

#[test]
fn metrics_over_http_match_the_poll() {
    let Some(farm) = Farm::needing("prom", &[Need::Tool("promtool")]) else {
        return;
    };
    // The exporter, its metrics listener, this test's scrapes and the
    // receiver live in a namespace of their own and poll the farm's
    // (--netns): the scrapes' sockets are not among those counted.
    let home = Netns::create("promhome").unwrap();
    let receiver = Receiver::start(&home);
    let dest = format!("udp:127.0.0.1:{PORT}");
    // Default --prom-listen (127.0.0.1:9000 of its namespace); one poll,
    // then nothing for an hour.
    let running = Running(Some(
        home.exec(
            workspace_bin("xtcp"),
            &[
                "--frequency",
                "1h",
                "--dest",
                &dest,
                "--netns",
                farm.ns.name(),
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    ));
    // xtcp_polls_total is updated after the rest of a poll's metrics.
    let deadline = Instant::now() + Duration::from_secs(20);
    let scrape = loop {
        let (status, body) = http(&home, "GET /metrics");
        if status == 200 && series(&body, "xtcp_polls_total") == Some(1.0) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no poll in the metrics: {status}\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    // One dump of both families (the default layout).
    let f = "all";
    {
        let get = |name: &str| {
            series(&scrape, &format!("{name}{{family=\"{f}\"}}"))
                .unwrap_or_else(|| panic!("no {name} for {f}:\n{scrape}"))
        };
        let sockets = get("xtcp_sockets_total");
        assert_eq!(sockets, farm.keys.len() as f64);
        assert_eq!(get("xtcp_sockets_sampled_total"), sockets, "{f}");
        assert_eq!(get("xtcp_records_total"), sockets, "{f}");
        // One message per socket and the NLMSG_DONE.
        assert_eq!(get("xtcp_netlink_messages_total"), sockets + 1.0, "{f}");
        assert!(get("xtcp_netlink_datagrams_total") > 1.0);
        assert_eq!(get("xtcp_poll_duration_seconds_count"), 1.0);
        assert_eq!(get("xtcp_netlink_dump_duration_seconds_count"), 1.0);
        assert!(
            get("xtcp_netlink_dump_duration_seconds_sum") <= get("xtcp_poll_duration_seconds_sum")
        );
        assert!(get("xtcp_buffer_pool_peak_in_use_buffers") >= 1.0);
        assert_eq!(get("xtcp_buffer_pool_allocated_bytes") % 4096.0, 0.0);
        assert_eq!(get("xtcp_output_send_errors_total"), 0.0);
        // Listeners and established sockets all carry one tcp_info length.
        let lengths: Vec<&str> = scrape
            .lines()
            .filter(|l| {
                l.starts_with(&format!(
                    "xtcp_tcp_info_length_sockets_total{{family=\"{f}\""
                ))
            })
            .collect();
        assert_eq!(lengths.len(), 1, "{lengths:?}");
        assert!(
            lengths[0].ends_with(&format!("\"}} {sockets}")),
            "{lengths:?}"
        );
    }
    for zero in [
        "xtcp_netlink_errors_total",
        "xtcp_sockets_skipped_total",
        "xtcp_output_records_lost_total",
        "xtcp_long_polls_total",
        "xtcp_unknown_attributes_total",
    ] {
        assert_eq!(sum(&scrape, zero), 0.0, "{zero}");
    }
    assert!(series(&scrape, "process_resident_memory_bytes").unwrap() > 0.0);

    // promtool (Debian package prometheus) lints the exposition.
    promtool_check_metrics(&scrape);

    let (status, body) = http(&home, "GET /healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ok: last poll completed "), "{body}");
    assert_eq!(http(&home, "GET /nope").0, 404);
    assert_eq!(http(&home, "POST /metrics").0, 405);
    let (status, body) = http(&home, "HEAD /metrics");
    assert_eq!((status, body.as_str()), (200, ""));

    let (status, stderr) = running.terminate();
    assert!(status.success(), "{stderr}");
    // What the exporter says it sent is what arrived: the farm's sockets,
    // each once, and the watermarks of its poll and of its stop.
    let got = receiver.finish();
    let keys: BTreeSet<Key> = got.records.iter().map(key).collect();
    assert_eq!(keys, farm.keys);
    assert_eq!(got.records.len(), farm.keys.len());
    let marks: Vec<(u64, u64, bool)> = got
        .watermarks
        .iter()
        .map(|w| (w.poll_id, w.record_counter, w.stopped))
        .collect();
    let n = farm.keys.len() as u64;
    assert_eq!(marks, [(1, n, false), (1, n, true)]);
    assert_eq!(
        series(&scrape, "xtcp_output_watermarks_total{result=\"sent\"}"),
        Some(1.0)
    );
    assert_eq!(
        sum(&scrape, "xtcp_output_datagrams_total"),
        got.datagrams as f64
    );
    assert_eq!(sum(&scrape, "xtcp_output_bytes_total"), got.bytes as f64);
}

#[test]
fn statsd_lines_carry_each_poll() {
    let Some(farm) = Farm::new("statsd") else {
        return;
    };
    // The default --statsd-dst, 127.0.0.1:8125 of the namespace.
    let listener = in_ns(&farm.ns, || {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 8125)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s
    });
    // Nobody on the record destination: send errors show up too.
    let (_, stderr) = run(farm.xtcp(&[
        "--max-loops",
        "2",
        "--frequency",
        "300ms",
        "--dest",
        "udp:127.0.0.1:9",
    ]));
    let mut lines = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = listener.recv(&mut buf) {
        lines.extend(
            std::str::from_utf8(&buf[..n])
                .unwrap()
                .lines()
                .map(str::to_string),
        );
    }
    let count = |line: &str| lines.iter().filter(|l| *l == line).count();
    // Each poll sends its own increase, not a running total.
    assert_eq!(count("xtcp.polls_total:1|c"), 2, "{lines:#?}");
    let sockets = farm.keys.len();
    let f = "all";
    {
        assert_eq!(count(&format!("xtcp.sockets_total.{f}:{sockets}|c")), 2);
        assert_eq!(count(&format!("xtcp.records_total.{f}:{sockets}|c")), 2);
        let durations: Vec<f64> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("xtcp.poll_duration_seconds.{f}:")))
            .map(|v| v.strip_suffix("|h").unwrap().parse().unwrap())
            .collect();
        assert_eq!(durations.len(), 2, "{lines:#?}");
        assert!(durations.iter().all(|d| *d > 0.0 && *d < 10.0));
        // The lost records add up to the exporter's own totals line.
        let lost: u64 = lines
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("xtcp.output_records_lost_total.{f}:")))
            .map(|v| v.strip_suffix("|c").unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(lost, total(&stderr, f, "records_lost"), "{stderr}");
    }
    assert!(lost_some(&stderr), "{stderr}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("xtcp.last_poll_timestamp_seconds:"))
            .count(),
        2
    );
    assert!(!lines
        .iter()
        .any(|l| l.starts_with("xtcp.netlink_errors_total")));
    // --no-prom: nothing listens on the metrics port.
    assert_eq!(http(&farm.ns, "GET /metrics").0, 0);
}

fn lost_some(stderr: &str) -> bool {
    dumps_total(stderr, "records_lost") > 0
}

/// `xtcp-socket-farm` spreads connections over worker processes (one
/// process may hold only about 9000): 20000 connections in 4 workers, every
/// socket seen by the exporter, the namespace gone when the farm's stdin
/// closes.
#[test]
fn socket_farm_holds_more_than_one_process_can() {
    if !can_run_in_netns(&[]) {
        return;
    }
    let _serial = serial();
    let mut farm = Running(Some(
        Command::new(workspace_bin("xtcp-socket-farm"))
            .args([
                "--netns",
                "multi",
                "--pairs",
                "10000",
                "--per-process",
                "6000",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let mut ready = String::new();
    BufReader::new(farm.child().stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    let words: Vec<&str> = ready.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"ready"), "{ready}");
    let (ns, sockets) = (words[1].to_string(), words[2]);
    // Per family 10000 pairs: workers of 6000 and 4000, a listener each.
    assert_eq!(sockets, "40004");
    let workers =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", farm.child().id())).unwrap();
    assert_eq!(workers.split_whitespace().count(), 4, "{workers}");
    let (_, stderr) = run({
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .arg(workspace_bin("xtcp"))
            .args(["--max-loops", "1", "--no-prom", "--no-statsd"])
            .args(["--dest", "udp:127.0.0.1:9"]);
        cmd
    });
    assert_eq!(total(&stderr, "all", "sockets"), 40004, "{stderr}");
    drop(farm.child().stdin.take());
    assert!(farm.child().wait().unwrap().success());
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&namespaces.stdout).contains(&ns));
}
