//! Integration tests against the real kernel: a private network namespace
//! holding a known set of sockets (`crates/testkit/src/lib.rs`), dumped through
//! netlink by the library and by the `xtcp` binary (`--dest stdout`). Needs
//! root for `ip netns`. The pipeline at scale is in `tests/it/pipeline.rs`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use crate::common::{self, can_run_in_netns, serial, workspace_bin, Need};
use prost::Message;
use serde_json::Value;
use xtcp::export::record::{PollStamp, RecordEncoder, SCHEMA_VERSION};
use xtcp::identity::Identity;
use xtcp::pipeline::kernel_release;
use xtcp::pipeline::sock_diag::{SockDiagSocket, DUMP_DATAGRAM_MAX};
use xtcp::wire::bytecode::{compile, Expr, Side};
use xtcp::wire::request::{
    both_families_request, dump_request, filtered_dump_request, AF_INET, AF_INET6, AF_UNSPEC,
    ALL_EXTENSIONS, ALL_STATES,
};
use xtcp::wire::{decode_socket, TailLayout};
use xtcp_feed::proto::Record;
use xtcp_testkit::{ExpectedSocket, Netns, STATE_ESTABLISHED, STATE_TIME_WAIT};

type Key = (u32, u32, u16, u16);

/// Creates a namespace, opens the IPv4 and IPv6 scenarios inside it on a
/// thread that stays in it, and runs `check` on that thread; unless this
/// machine lacks root, `ip` or any of `more` (said by `can_run`).
fn with_scenario(tag: &str, more: &[Need], check: impl FnOnce(&Netns, &[ExpectedSocket]) + Send) {
    if !can_run_in_netns(more) {
        return;
    }
    let _serial = serial();
    let ns = Netns::create(tag).expect("create network namespace (run the tests as root)");
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter().expect("enter namespace");
            let v4 = xtcp_testkit::open(false, 41000).expect("open IPv4 sockets");
            let v6 = xtcp_testkit::open(true, 42000).expect("open IPv6 sockets");
            let expected: Vec<_> = v4.expected.iter().chain(&v6.expected).cloned().collect();
            check(&ns, &expected);
        })
        .join()
        .unwrap();
    });
}

/// Dumps both families from the calling thread's namespace with the
/// library's reader, decoder and encoder, and decodes each record with prost.
fn library_dump() -> Vec<Value> {
    library_dump_of(
        &[AF_INET, AF_INET6].map(|family| {
            move |seq| dump_request(family, ALL_STATES, ALL_EXTENSIONS, seq).to_vec()
        }),
    )
}

/// [`library_dump`] of the dumps `requests` build (each given its sequence
/// number), read one after the other.
fn library_dump_of(requests: &[impl Fn(u32) -> Vec<u8>]) -> Vec<Value> {
    let socket = SockDiagSocket::open(Duration::from_secs(5)).unwrap();
    let tail = TailLayout::for_release(&kernel_release());
    let mut encoder = RecordEncoder::new(Identity::new("test-host", 1));
    let mut record = vec![0; encoder.max_record_len()];
    let stamp = PollStamp {
        poll_id: 1,
        timestamp_ns: 1,
        ..Default::default()
    };
    let mut buf = vec![0; DUMP_DATAGRAM_MAX];
    let mut out = Vec::new();
    for request in requests {
        let mut reader = socket.dump_with(request).unwrap();
        while let Some(len) = reader.recv(&mut buf).unwrap() {
            reader
                .scan(&buf[..len], |payload| {
                    let socket = decode_socket(payload, tail).expect("real sockets decode");
                    let n = encoder.encode(&socket, &stamp, &mut record).unwrap();
                    let r = Record::decode(&record[..n]).expect("the exporter's bytes decode");
                    out.push(serde_json::to_value(r).unwrap());
                })
                .unwrap();
        }
    }
    out
}

fn key(r: &Value) -> Key {
    let n = |f: &str| {
        r[f].as_u64()
            .unwrap_or_else(|| panic!("{f} missing in {r}"))
    };
    (
        n("inet_diag_msg_family") as u32,
        n("inet_diag_msg_state") as u32,
        n("inet_diag_msg_socket_source_port") as u16,
        n("inet_diag_msg_socket_destination_port") as u16,
    )
}

/// Asserts the dump holds exactly the expected sockets with the values the
/// scenario caused.
fn assert_exactly(records: &[Value], expected: &[ExpectedSocket]) {
    let got: BTreeMap<Key, &Value> = records.iter().map(|r| (key(r), r)).collect();
    assert_eq!(got.len(), records.len(), "a socket was reported twice");
    let want: BTreeMap<Key, &ExpectedSocket> = expected.iter().map(|e| (e.key(), e)).collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "(family, state, sport, dport) of the dump vs the sockets opened"
    );
    for (k, e) in want {
        let r = got[&k];
        let v6 = e.family == u32::from(AF_INET6);
        let lo = if v6 { "::1" } else { "127.0.0.1" };
        assert_eq!(r["inet_diag_msg_socket_source"], lo, "{k:?}");
        let peer = match (e.state, v6) {
            (xtcp_testkit::STATE_LISTEN, true) => "::",
            (xtcp_testkit::STATE_LISTEN, false) => "0.0.0.0",
            _ => lo,
        };
        assert_eq!(r["inet_diag_msg_socket_destination"], peer, "{k:?}");
        assert_eq!(r["hostname"].as_str().map(str::is_empty), Some(false));

        let congestion = e.congestion.clone().unwrap_or_default();
        assert_eq!(
            r["congestion_algorithm_string"],
            congestion.as_str(),
            "{k:?}"
        );
        let enum_name = if congestion.is_empty() {
            "CONGESTION_ALGORITHM_UNSPECIFIED".to_string()
        } else {
            format!("CONGESTION_ALGORITHM_{}", congestion.to_uppercase())
        };
        assert_eq!(r["congestion_algorithm_enum"], enum_name.as_str(), "{k:?}");
        // BBRINFO arrives only because the request sets the VEGASINFO bit.
        assert_eq!(
            r.get("bbr_info_bw").is_some(),
            congestion == "bbr" && e.state == STATE_ESTABLISHED,
            "{k:?}: BBR info on established bbr sockets only"
        );

        let tos_field = if v6 {
            "traffic_class"
        } else {
            "type_of_service"
        };
        assert_eq!(
            r.get(tos_field).and_then(Value::as_u64),
            e.tos.map(u64::from),
            "{k:?}"
        );

        if e.state == STATE_TIME_WAIT {
            // A TIME_WAIT minisock carries the base message only.
            assert_eq!(r["tcp_info_len"], 0, "{k:?}");
            assert!(r.get("tcp_info_state").is_none(), "{k:?}");
            assert!(r.get("mem_info_rmem").is_none(), "{k:?}");
            continue;
        }
        assert!(r["tcp_info_len"].as_u64().unwrap() >= 104, "{k:?}");
        assert_eq!(
            r["tcp_info_state"].as_u64(),
            Some(u64::from(e.state)),
            "{k:?}"
        );
        assert!(r.get("sk_mem_info_rcvbuf").is_some(), "{k:?}");
        if let Some((sent, received)) = e.bytes {
            assert_eq!(r["tcp_info_bytes_sent"].as_u64(), Some(sent), "{k:?}");
            assert_eq!(
                r["tcp_info_bytes_received"].as_u64(),
                Some(received),
                "{k:?}"
            );
            assert_eq!(
                r["tcp_info_data_segs_out"].as_u64().map(|n| n > 0),
                Some(true)
            );
            assert_eq!(
                r["tcp_info_unacked"].as_u64(),
                Some(0),
                "{k:?}: all data acked"
            );
        }
    }
}

#[test]
fn library_dump_sees_exactly_the_opened_sockets() {
    with_scenario("lib", &[], |_, expected| {
        let records = library_dump();
        assert_exactly(&records, expected);
        // As root, MARK (CAP_NET_ADMIN only) comes with every socket.
        assert!(records.iter().all(|r| r.get("socket_mark").is_some()));
    });
}

#[test]
fn one_old_style_dump_returns_both_families_whole() {
    // The exporter's combined layout (and xtcp-dump-floor's `--layout
    // all-families`): a single TCPDIAG_GETSOCK dump carries every socket of
    // both families with every attribute.
    with_scenario("all", &[], |_, expected| {
        let records = library_dump_of(&[|seq| {
            both_families_request(ALL_STATES, ALL_EXTENSIONS, seq).to_vec()
        }]);
        assert_exactly(&records, expected);
    });
}

#[test]
fn source_port_filters_return_exactly_their_range() {
    // xtcp-dump-floor's `--split-at`: disjoint bytecode filters that cover
    // every port split a dump without losing or repeating a socket; the
    // one-walk dump of both families runs the same programs (`--filter` in
    // the combined layout).
    with_scenario("bc", &[], |_, expected| {
        let mut ports: Vec<u16> = expected.iter().map(|e| e.source_port).collect();
        ports.sort_unstable();
        // Below and from the median port: both halves hold sockets.
        let split = ports[ports.len() / 2];
        let mut union = Vec::new();
        for (low, high) in [(0, split - 1), (split, u16::MAX)] {
            let filtered = |family| {
                move |seq| {
                    let side = Side::Local;
                    let program = compile(&Expr::Port { side, low, high }).unwrap();
                    filtered_dump_request(family, ALL_STATES, ALL_EXTENSIONS, &program, seq)
                }
            };
            let records = library_dump_of(&[filtered(AF_INET), filtered(AF_INET6)]);
            let inside: Vec<ExpectedSocket> = expected
                .iter()
                .filter(|e| (low..=high).contains(&e.source_port))
                .cloned()
                .collect();
            assert!(!inside.is_empty() && inside.len() < expected.len());
            assert_exactly(&records, &inside);
            assert_exactly(&library_dump_of(&[filtered(AF_UNSPEC)]), &inside);
            union.extend(records);
        }
        assert_exactly(&union, expected);
    });
}

/// Runs `xtcp --max-loops 1 --dest stdout` inside the namespace, optionally
/// through `setpriv` as nobody, and parses its JSON lines.
fn cli_dump(ns: &Netns, unprivileged: bool) -> Vec<Value> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()]);
    if unprivileged {
        cmd.args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ]);
    }
    cmd.arg(workspace_bin("xtcp")).args([
        "--max-loops",
        "1",
        "--dest",
        "stdout",
        // Its listener would be one more socket than the scenario's.
        "--no-prom",
    ]);
    // `ip netns exec` hides the cgroup2 mount, which the exporter would
    // warn about (tests/it/cgroups.rs enters with nsenter instead).
    cmd.arg("--no-cgroup-paths");
    let out = cmd.output().expect("run xtcp");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "xtcp failed: {stderr}");
    assert!(
        stderr.lines().count() == 1 && stderr.starts_with("xtcp: stopped: hostname "),
        "a clean poll prints only the totals on stderr: {stderr}"
    );
    assert_eq!(common::total(&stderr, "", "polls"), 1, "{stderr}");
    // Every record carries the run's instance, which the exit line names.
    let instance = common::total(&stderr, "", "instance");
    let records: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        records.iter().all(|r| r["instance"] == instance),
        "{stderr}"
    );
    records
}

#[test]
fn cli_one_shot_prints_exactly_the_opened_sockets() {
    with_scenario("cli", &[], |ns, expected| {
        let records = cli_dump(ns, false);
        assert_exactly(&records, expected);
        // The two families' inetdiagers share one gapless sequence.
        let mut counters: Vec<u64> = records
            .iter()
            .map(|r| r["record_counter"].as_u64().unwrap())
            .collect();
        counters.sort_unstable();
        assert_eq!(counters, (1..=records.len() as u64).collect::<Vec<_>>());
        assert!(records
            .iter()
            .all(|r| r["poll_id"] == 1 && r["schema_version"] == SCHEMA_VERSION));
        // Run inside the namespace without --netns: its own, unnamed.
        let inode = ns.inode().unwrap();
        assert!(records
            .iter()
            .all(|r| r["netns_inode"] == inode && r["netns_name"] == ""));
    });
}

#[test]
fn cli_works_unprivileged_without_mark() {
    with_scenario("nobody", &[Need::Tool("setpriv")], |ns, expected| {
        let records = cli_dump(ns, true);
        assert_exactly(&records, expected);
        // MARK needs CAP_NET_ADMIN: absent, not zero.
        assert!(records.iter().all(|r| r.get("socket_mark").is_none()));
    });
}

#[test]
fn cli_bad_flag_exits_2_with_one_line() {
    let out = Command::new(workspace_bin("xtcp"))
        .args(["--max-loops", "1", "--dest", "kafka"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("unknown destination 'kafka'"), "{stderr}");
}

#[test]
fn cli_takes_every_flag_from_the_environment() {
    let xtcp = || {
        let mut cmd = Command::new(workspace_bin("xtcp"));
        cmd.env_clear();
        cmd
    };
    let out = xtcp()
        .args(["--print-config", "--no6"])
        .env("XTCP_SAMPLING_MODULUS", "5")
        .env("XTCP_DEST", "udp:[::1]:9999")
        .env("XTCP_SINGLE", "true")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for line in [
        "XTCP_SAMPLING_MODULUS=5",
        "XTCP_DEST=udp:[::1]:9999",
        "XTCP_SINGLE=true",
        "XTCP_NO6=true",
        "XTCP_FREQUENCY=30s",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
    // The instance is the printing process's own, drawn fresh, not a setting.
    let instance = text
        .lines()
        .find_map(|l| l.strip_prefix("# this process: hostname "))
        .and_then(|l| l.split(" instance ").nth(1))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok());
    assert!(instance.is_some_and(|i| i != 0), "{text}");
    // A bad value from the environment is as clear as one from a flag.
    let out = xtcp().env("XTCP_FREQUENCY", "soon").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--frequency"), "{stderr}");
}

/// A taken port, an address that is not this host's and a malformed one:
/// each stops the start with one line, before any poll.
#[test]
fn cli_prom_listen_errors_are_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let xtcp = |listen: &str| {
        let mut cmd = Command::new(workspace_bin("xtcp"));
        // No output at all: nothing polled.
        cmd.args(["--max-loops", "1", "--dest", "stdout", "--no-statsd"])
            .args(["--prom-listen", listen])
            .stdout(std::process::Stdio::null());
        common::one_line_exit(cmd)
    };
    let (code, stderr) = xtcp(&format!("127.0.0.1:{port}"));
    assert_eq!(code, Some(1));
    assert!(
        stderr.starts_with(&format!(
            "error: serving metrics on --prom-listen 127.0.0.1:{port}: Address already in use"
        )),
        "{stderr}"
    );
    // TEST-NET-1 (RFC 5737) is never a local address.
    let (code, stderr) = xtcp("192.0.2.1:9000");
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("192.0.2.1:9000: Cannot assign requested address"),
        "{stderr}"
    );
    let (code, stderr) = xtcp("localhost:http-alt:9");
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--prom-listen"), "{stderr}");
}

/// `--prom-path` moves the metrics, `/healthz` answers, and `--no-statsd`
/// sends nothing where the default would.
#[test]
fn cli_prom_path_and_statsd_switch() {
    use std::io::{BufRead, BufReader, Read, Write};

    let statsd = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    statsd
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let statsd_dst = statsd.local_addr().unwrap().to_string();
    let get = |addr: &str, path: &str| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        response
    };
    for no_statsd in [true, false] {
        let mut cmd = Command::new(workspace_bin("xtcp"));
        cmd.args(["--frequency", "1h", "-v", "--dest", "udp:127.0.0.1:9"])
            .args(["--prom-listen", "127.0.0.1:0", "--prom-path", "/x/metrics"])
            .args(["--statsd-dst", &statsd_dst])
            .stderr(std::process::Stdio::piped());
        if no_statsd {
            cmd.arg("--no-statsd");
        }
        let mut child = cmd.spawn().unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let mut addr = None;
        while !line.starts_with("poll 1:") {
            line.clear();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "exited early");
            if let Some(rest) = line.strip_prefix("xtcp: metrics at http://") {
                assert!(rest.contains("/x/metrics, health at /healthz"), "{line}");
                addr = rest.split('/').next().map(str::to_string);
            }
        }
        let addr = addr.expect("the metrics address is announced");
        let scrape = get(&addr, "/x/metrics");
        assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
        assert!(scrape.contains("# TYPE xtcp_polls_total counter"));
        assert!(get(&addr, "/metrics").starts_with("HTTP/1.1 404"));
        let health = get(&addr, "/healthz");
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let mut buf = [0u8; 2048];
        let got = statsd.recv(&mut buf).ok();
        assert_eq!(got.is_none(), no_statsd, "statsd datagram: {got:?}");
        // Anything later (the other run's lines) must not be mistaken.
        while statsd.recv(&mut buf).is_ok() {}
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert!(child.wait().unwrap().success());
    }
}
