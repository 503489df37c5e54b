//! `--capture` and `--replay` against `ss` itself, which reads and writes
//! the same files: a dump of a namespace of 10,018 sockets (both families,
//! two congestion controls, TOS and TCLASS set, TIME_WAIT sockets) captured
//! by xtcp is printed by `TCPDIAG_FILE=FILE ss -taimeoHn --tos`, and every
//! value `ss` prints that xtcp records is compared with xtcp's replay of the
//! same bytes; and a file `ss -D` wrote replays to the sockets xtcp polls.
//! Needs root (the namespace) and `ss`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Command;

use crate::common::*;
use serde_json::Value;
use xtcp_testkit::{established_pairs, Netns};

/// `xtcp ARGS` in `ns` (or outside it without one), its JSON lines parsed.
fn xtcp_records(ns: Option<&Netns>, args: &[&str]) -> Vec<Value> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns.name()])
                .arg(workspace_bin("xtcp"));
            cmd
        }
        None => Command::new(workspace_bin("xtcp")),
    };
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "xtcp {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `printf("%g")`: six significant digits, trailing zeros dropped.
fn g(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let exponent = x.abs().log10().floor() as i32;
    let decimals = (5 - exponent).max(0) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `ss`'s address column: `127.0.0.1:80`, `[::1]:80`, `*` for port 0.
fn endpoint(r: &Value, addr: &str, port: &str) -> String {
    let port = match r[port].as_u64().unwrap() {
        0 => "*".to_string(),
        p => p.to_string(),
    };
    let addr = r[addr].as_str().unwrap();
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// What `ss` prints for `key`, computed from xtcp's record, or `None` for a
/// key xtcp does not record (or `ss` derives, such as `send`).
fn expected(r: &Value, key: &str) -> Option<String> {
    let u = |f: &str| r[f].as_u64();
    let ms = |f: &str| u(f).map(|v| g(v as f64 / 1000.0));
    let field = |name: &str| u(&format!("tcp_info_{name}")).map(|v| v.to_string());
    Some(match key {
        "rto" => ms("tcp_info_rto")?,
        "ato" => ms("tcp_info_ato")?,
        "minrtt" => ms("tcp_info_min_rtt")?,
        "rcv_rtt" => ms("tcp_info_rcv_rtt")?,
        "rtt" => format!("{}/{}", ms("tcp_info_rtt")?, ms("tcp_info_rttvar")?),
        "mss" => field("snd_mss")?,
        "rcvmss" => field("rcv_mss")?,
        "cwnd" => field("snd_cwnd")?,
        "ssthresh" => field("snd_ssthresh")?,
        "lastsnd" => field("last_data_sent")?,
        "lastrcv" => field("last_data_recv")?,
        "lastack" => field("last_ack_recv")?,
        "notsent" => field("notsent_bytes")?,
        "wscale" => format!("{},{}", field("snd_wscale")?, field("rcv_wscale")?),
        "retrans" => format!("{}/{}", field("retrans")?, field("total_retrans")?),
        "busy" => format!("{}ms", u("tcp_info_busy_time")? / 1000),
        "pacing_rate" | "delivery_rate" | "max_pacing_rate" => {
            format!("{}bps", u(&format!("tcp_info_{key}"))? * 8)
        }
        "pmtu" | "advmss" | "bytes_sent" | "bytes_retrans" | "bytes_acked" | "bytes_received"
        | "segs_out" | "segs_in" | "data_segs_out" | "data_segs_in" | "delivered"
        | "delivered_ce" | "rcv_space" | "rcv_ssthresh" | "snd_wnd" | "rcv_wnd" | "unacked"
        | "lost" | "sacked" | "fackets" | "reordering" | "reord_seen" | "dsack_dups"
        | "rcv_ooopack" | "backoff" => field(key)?,
        "ino" => u("inet_diag_msg_inode")?.to_string(),
        "uid" => u("inet_diag_msg_uid")?.to_string(),
        "sk" => format!("{:x}", u("inet_diag_msg_socket_cookie")?),
        "tos" => hex(u("type_of_service")?),
        "tclass" => hex(u("traffic_class")?),
        "class_id" => hex(u("class_id")?),
        "v6only" => u64::from(r["skv6only"].as_bool()?).to_string(),
        "bbr" => {
            let gain = |f: &str| {
                u(f).filter(|&v| v != 0)
                    .map(|v| format!(",{}:{}", &f["bbr_info_".len()..], g(v as f64 / 256.0)))
                    .unwrap_or_default()
            };
            format!(
                "(bw:{}bps,mrtt:{}{}{})",
                u("bbr_info_bw")? * 8,
                ms("bbr_info_min_rtt")?,
                gain("bbr_info_pacing_gain"),
                gain("bbr_info_cwnd_gain")
            )
        }
        "skmem" => {
            let m = |f: &str| u(&format!("sk_mem_info_{f}"));
            format!(
                "(r{},rb{},t{},tb{},f{},w{},o{},bl{},d{})",
                m("rmem_alloc")?,
                m("rcvbuf")?,
                m("wmem_alloc")?,
                m("sndbuf")?,
                m("fwd_alloc")?,
                m("wmem_queued")?,
                m("optmem")?,
                m("backlog")?,
                m("drops")?
            )
        }
        _ => return None,
    })
}

/// `%#x`: `0`, or `0x` and the hex digits.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// A socket as `ss` prints it: (local, peer).
type Endpoints = (String, String);
/// Its words: the first line's (without the addresses), the next lines'.
type Words = (Vec<String>, Vec<String>);

/// The sockets `ss` printed, by their endpoints.
fn ss_sockets(text: &str) -> BTreeMap<Endpoints, Words> {
    let mut sockets = BTreeMap::new();
    let mut current: Option<(Endpoints, Words)> = None;
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) {
            if let Some((_, (_, more))) = &mut current {
                more.extend(line.split_whitespace().map(str::to_string));
            }
            continue;
        }
        if let Some((key, tokens)) = current.take() {
            assert!(sockets.insert(key, tokens).is_none(), "a socket twice");
        }
        let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        // State, Recv-Q, Send-Q, Local, Peer, then the rest.
        let key = (words[3].clone(), words[4].clone());
        let columns = words[..3].to_vec();
        let mut tokens = columns;
        tokens.extend(words[5..].iter().cloned());
        current = Some((key, (tokens, Vec::new())));
    }
    if let Some((key, tokens)) = current {
        sockets.insert(key, tokens);
    }
    sockets
}

#[test]
fn every_value_ss_prints_of_a_capture_equals_xtcps_replay() {
    if !can_run_in_netns(&[Need::Tool("ss")]) {
        return;
    }
    let _serial = serial();
    // 10,002 sockets held here, and the test's own files.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let ns = Netns::create("replay").unwrap();
    // 2500 connections per family that exchanged data, and the scenario's
    // variety: two congestion controls, TOS and TCLASS, TIME_WAIT.
    let _held = in_ns(&ns, || {
        let pairs = [
            SocketAddr::from((Ipv4Addr::LOCALHOST, 40002)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, 40002)),
        ]
        .map(|addr| established_pairs(addr, 2500, true).unwrap());
        let scenarios =
            [false, true].map(|v6| xtcp_testkit::open(v6, 30_000 + 100 * u16::from(v6)).unwrap());
        (pairs, scenarios)
    });
    let file = std::env::temp_dir().join(format!("xtcp-capture-{}.dump", std::process::id()));
    let polled = xtcp_records(Some(&ns), &["--once", "--capture", file.to_str().unwrap()]);
    let replayed = xtcp_records(None, &["--replay", file.to_str().unwrap(), "--once"]);
    let ss = Command::new("ss")
        .args(["-taimeoHn", "--tos"])
        .env("TCPDIAG_FILE", &file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(ss.status.success());
    let ss = ss_sockets(&String::from_utf8(ss.stdout).unwrap());

    // The replay holds what the poll held, socket for socket.
    let key_of = |r: &Value| {
        (
            endpoint(
                r,
                "inet_diag_msg_socket_source",
                "inet_diag_msg_socket_source_port",
            ),
            endpoint(
                r,
                "inet_diag_msg_socket_destination",
                "inet_diag_msg_socket_destination_port",
            ),
        )
    };
    let polled_keys: BTreeSet<_> = polled.iter().map(key_of).collect();
    let replayed_keys: BTreeSet<_> = replayed.iter().map(key_of).collect();
    assert_eq!(replayed_keys, polled_keys);
    assert!(replayed.len() >= 10_018, "{}", replayed.len());
    assert_eq!(
        ss.len(),
        replayed.len(),
        "ss shows every socket of the file"
    );

    let mut compared = 0u64;
    let mut states = BTreeSet::new();
    let mut not_compared = BTreeSet::new();
    for r in &replayed {
        let (columns, more) = &ss[&key_of(r)];
        let state = xtcp::wire::state::label(r["inet_diag_msg_state"].as_u64().unwrap() as u8);
        let want_columns = [
            state.unwrap().to_string(),
            r["inet_diag_msg_rqueue"].to_string(),
            r["inet_diag_msg_wqueue"].to_string(),
        ];
        assert_eq!(columns[..3], want_columns, "{r}");
        compared += 5; // state, queues and both endpoints (the key)
        states.insert(want_columns[0].clone());
        // The option words ss prints for tcp_info_options and the
        // app-limited bit: each must be printed exactly when set.
        let options = r["tcp_info_options"].as_u64().unwrap_or(0);
        let flags: Vec<&str> = [
            (options & 1 != 0, "ts"),
            (options & 2 != 0, "sack"),
            (options & 8 != 0, "ecn"),
            (options & 16 != 0, "ecnseen"),
            (options & 32 != 0, "fastopen"),
            (r["tcp_info_delivery_rate_app_limited"] == 1, "app_limited"),
        ]
        .into_iter()
        .filter_map(|(set, word)| set.then_some(word))
        .collect();
        let mut printed_flags = BTreeSet::new();
        let tokens = columns[3..].iter().chain(more);
        let mut tokens = tokens.peekable();
        while let Some(token) = tokens.next() {
            let (key, value) = match token.split_once(':') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                // `pacing_rate 123bps`: the value is the next word.
                None if matches!(
                    token.as_str(),
                    "pacing_rate" | "delivery_rate" | "max_pacing_rate"
                ) =>
                {
                    (token.clone(), tokens.next().unwrap().clone())
                }
                // Derived by ss from cwnd, mss and rtt: not a field.
                None if token == "send" => {
                    tokens.next();
                    not_compared.insert(token.clone());
                    continue;
                }
                None => {
                    let flag = ["ts", "sack", "ecn", "ecnseen", "fastopen", "app_limited"]
                        .contains(&token.as_str());
                    if flag {
                        printed_flags.insert(token.clone());
                        compared += 1;
                    } else if *token == r["congestion_algorithm_string"] {
                        compared += 1;
                    } else {
                        not_compared.insert(token.clone());
                    }
                    continue;
                }
            };
            match expected(r, &key) {
                Some(want) => {
                    assert_eq!(value, want, "{key} of {:?}: {r}", key_of(r));
                    compared += 1;
                }
                None => {
                    not_compared.insert(key);
                }
            }
        }
        let set: BTreeSet<String> = flags.iter().map(|f| f.to_string()).collect();
        assert_eq!(printed_flags, set, "option words of {:?}: {r}", key_of(r));
    }
    xtcp_service::say!(
        "ss oracle: {compared} values of {} sockets equal (states {states:?}); not compared: {not_compared:?}",
        replayed.len()
    );
    assert!(states.contains("TIME-WAIT") && states.contains("LISTEN"));
    assert!(compared > 30 * replayed.len() as u64 / 2, "{compared}");
}

/// A file `ss -D` wrote (one NLMSG_DONE per family) replays to exactly the
/// sockets xtcp's own poll of the namespace finds.
#[test]
fn a_file_ss_wrote_replays_to_the_polled_sockets() {
    if !can_run_in_netns(&[Need::Tool("ss")]) {
        return;
    }
    let _serial = serial();
    let ns = Netns::create("ssdump").unwrap();
    let _pairs = in_ns(&ns, || {
        [
            SocketAddr::from((Ipv4Addr::LOCALHOST, 40001)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, 40001)),
        ]
        .map(|addr| established_pairs(addr, 100, true).unwrap())
    });
    let file = std::env::temp_dir().join(format!("xtcp-ss-{}.dump", std::process::id()));
    let dumped = Command::new("ip")
        .args(["netns", "exec", ns.name(), "ss", "-tan", "-D"])
        .arg(&file)
        .status()
        .unwrap();
    assert!(dumped.success());
    let polled = xtcp_records(Some(&ns), &["--once"]);
    let replayed = xtcp_records(None, &["--replay", file.to_str().unwrap(), "--once"]);
    let _ = std::fs::remove_file(Path::new(&file));
    let keys = |records: &[Value]| -> BTreeSet<(u64, u64, u64)> {
        records
            .iter()
            .map(|r| {
                let u = |k: &str| r[k].as_u64().unwrap();
                (
                    u("inet_diag_msg_family"),
                    u("inet_diag_msg_socket_source_port"),
                    u("inet_diag_msg_socket_destination_port"),
                )
            })
            .collect()
    };
    assert_eq!(replayed.len(), 2 * 201);
    assert_eq!(keys(&replayed), keys(&polled));
}

/// A dump file that stops short, or claims an impossible length, ends the
/// replay where it goes wrong: what came before is exported, the rest is
/// said in one warning and counted, and the exit status is 3. A file that
/// is not there is a one-line error.
#[test]
fn a_broken_dump_file_is_said_counted_and_exit_3() {
    let whole = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/scenario-v4.bin"
    ))
    .unwrap();
    let replay = |bytes: &[u8], name: &str| {
        let file = std::env::temp_dir().join(format!("xtcp-{name}-{}.dump", std::process::id()));
        std::fs::write(&file, bytes).unwrap();
        let out = Command::new(workspace_bin("xtcp"))
            .args(["--once", "--replay"])
            .arg(&file)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&file);
        let records = String::from_utf8(out.stdout).unwrap().lines().count();
        (
            out.status.code(),
            records,
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    assert_eq!(replay(&whole, "whole").0, Some(0));
    assert_eq!(replay(&whole, "whole").1, 8);
    // Cut in the middle of the third socket message.
    let first_three: usize = xtcp::wire::message::messages(&whole)
        .take(3)
        .map(|m| 16 + m.unwrap().payload.len())
        .sum();
    let (code, records, stderr) = replay(&whole[..first_three - 10], "cut");
    assert_eq!((code, records), (Some(3), 2), "{stderr}");
    assert!(stderr.contains("cut short at byte"), "{stderr}");
    assert_eq!(total(&stderr, "v4", "netlink_errors"), 1, "{stderr}");
    // A header claiming more than a message can be.
    let mut bogus = whole.clone();
    bogus[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
    let (code, records, stderr) = replay(&bogus, "bogus");
    assert_eq!((code, records), (Some(3), 0), "{stderr}");
    assert!(
        stderr.contains("a message of 4294967295 bytes at byte 0"),
        "{stderr}"
    );
    let out = Command::new(workspace_bin("xtcp"))
        .args(["--replay", "/nonexistent.dump", "--once"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8(out.stderr).unwrap().lines().count(), 1);
}
