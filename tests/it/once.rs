//! `xtcp --once`, the one-shot an operator runs by hand like `ss`: one poll
//! to stdout in JSON or text lines, no metrics listener and no statsd
//! socket, `--filter` and `--states` applied, and an exit status that says
//! whether the poll was whole. Needs root (the namespace).

use std::process::{Command, Output};

use crate::common::*;
use xtcp_testkit::Netns;

/// `xtcp --once ARGS` inside the farm's namespace.
fn once(ns: &Netns, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(workspace_bin("xtcp"))
        .arg("--once")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn once_prints_exactly_the_sockets_and_opens_nothing_else() {
    let Some(farm) = Farm::needing("once", &[Need::Tool("strace")]) else {
        return;
    };
    // JSON: exactly the farm's sockets (a metrics listener of its own would
    // be one more), exit 0.
    let out = once(&farm.ns, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys: std::collections::BTreeSet<Key> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            let u = |k: &str| r[k].as_u64().unwrap();
            (
                u("inet_diag_msg_family") as u32,
                u("inet_diag_msg_socket_source_port") as u16,
                u("inet_diag_msg_socket_destination_port") as u16,
            )
        })
        .collect();
    assert_eq!(keys, farm.keys);

    // Text lines, one per socket; --states applies (the two listeners).
    let out = once(&farm.ns, &["--format", "text", "--states", "listen"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.lines()
            .all(|l| l.starts_with("LISTEN ") && l.contains(":40001 > ")),
        "{text}"
    );
    // --filter applies: the server's ends and the listeners.
    let out = once(&farm.ns, &["--format", "text", "--filter", "sport 40001"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let servers = farm.keys.iter().filter(|k| k.1 == 40001).count();
    assert_eq!(text.lines().count(), servers);
    assert!(text.lines().all(|l| l.contains(":40001 > ")));

    // No listener, no statsd socket: the only sockets it makes are netlink.
    let trace = std::env::temp_dir().join(format!("xtcp-once-{}.strace", std::process::id()));
    let traced = Command::new("ip")
        .args([
            "netns",
            "exec",
            farm.ns.name(),
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=socket",
            "-o",
        ])
        .arg(&trace)
        .arg(workspace_bin("xtcp"))
        .args(["--once", "--states", "listen"])
        .output()
        .unwrap();
    assert!(traced.status.success());
    let calls = std::fs::read_to_string(&trace).unwrap();
    let _ = std::fs::remove_file(&trace);
    let sockets: Vec<&str> = calls.lines().filter(|l| l.contains("socket(")).collect();
    assert!(!sockets.is_empty());
    assert!(sockets.iter().all(|l| l.contains("AF_NETLINK")), "{calls}");
}

/// A poll that could not cover what was asked exits 3, after saying why.
#[test]
fn once_exits_3_when_anything_was_lost() {
    let Some(farm) = Farm::new("oncelost") else {
        return;
    };
    let out = once(&farm.ns, &["--netns", "xtcp-no-such-namespace"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("xtcp-no-such-namespace"), "{stderr}");
    // A contradiction is a bad command line.
    let out = once(&farm.ns, &["--dest", "udp:127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(2));
}
