//! The UDP leg, as `xtcp-debug-server` sees it: a receiver with a small
//! buffer, stopped while a burst arrives, drops datagrams in the kernel, and
//! its totals must say exactly how many records never arrived; a feed
//! signed with a shared key arrives whole. (`crates/forwarder/tests/kafka.rs`
//! does the same to the forwarder.)

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{
    dumps_total, key_file, one_line_exit, overflow_receiver, run, serial, stopped_value,
    udp_queued, workspace_bin, Running,
};

const PROGRAM: &str = "xtcp-debug-server";

/// The debug server on a free port of 127.0.0.1 with `args`, once bound.
fn start_receiver(args: &[&str]) -> (Running, u16) {
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Running(Some(
        Command::new(workspace_bin(PROGRAM))
            .args(["--format", "none"])
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let mut tries = 0;
    while udp_queued(port).is_none() {
        tries += 1;
        assert!(tries < 500, "{PROGRAM} did not bind");
        assert!(
            server.child().try_wait().unwrap().is_none(),
            "{PROGRAM} exited"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (server, port)
}

#[test]
fn debug_server_counts_exactly_what_the_kernel_dropped() {
    let _serial = serial();
    // The smallest receive buffer the kernel grants.
    let (mut server, port) = start_receiver(&["--recv-buffer", "4096"]);
    let pid = server.child().id();
    let (datagrams, per) = (400, 5);
    let sent = overflow_receiver(pid, port, 0xfeed, datagrams, per);
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    let total = |name| stopped_value(&stderr, PROGRAM, "", name);
    let received = total("records");
    assert!(received < sent / 2, "no overflow: {stderr}");
    eprintln!(
        "{PROGRAM}: sent {sent} received {received} lost {} kernel_drops {} (x{per} records)",
        total("lost"),
        total("kernel_drops")
    );
    assert_eq!(total("lost"), sent - received, "{stderr}");
    // Every loss was a whole datagram the kernel dropped.
    assert_eq!(total("kernel_drops") * per, sent - received, "{stderr}");
    assert_eq!(total("duplicated") + total("untracked"), 0, "{stderr}");
}

/// An exporter and a debug server sharing a key: every record passes. A
/// bad key file, or a key with nothing to sign, stops the start in one line.
#[test]
fn a_signed_feed_reaches_a_receiver_with_the_key() {
    let _serial = serial();
    let key = key_file("it", format!("{}\n", "ab".repeat(32)).as_bytes());
    let key_arg = key.to_str().unwrap();
    let (server, port) = start_receiver(&["--feed-key", key_arg]);
    // At least one socket to export, on any host.
    let _listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (_, exporter) = run({
        let mut cmd = Command::new(workspace_bin("xtcp"));
        cmd.args([
            "--max-loops",
            "1",
            "--no-prom",
            "--no-statsd",
            "--feed-key",
            key_arg,
        ])
        .args(["--dest", &format!("udp:127.0.0.1:{port}")]);
        cmd
    });
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    let sent = dumps_total(&exporter, "records");
    let received = |name| stopped_value(&stderr, PROGRAM, "", name);
    assert!(sent > 0, "{exporter}");
    assert_eq!(received("records"), sent, "{stderr}");
    for counter in ["unauthenticated", "undecodable", "lost"] {
        assert_eq!(received(counter), 0, "{stderr}");
    }

    let xtcp = |args: &[&str]| {
        let mut cmd = Command::new(workspace_bin("xtcp"));
        cmd.args(["--max-loops", "1", "--no-prom", "--no-statsd"])
            .args(args);
        one_line_exit(cmd)
    };
    let (code, said) = xtcp(&["--feed-key", "/nonexistent/feed.key"]);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("--feed-key: reading the feed key /nonexistent/feed.key"),
        "{said}"
    );
    std::fs::write(&key, "short").unwrap();
    let (code, said) = xtcp(&["--feed-key", key_arg]);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("too short"), "{said}");
    let (code, said) = xtcp(&["--feed-key", key_arg, "--dest", "stdout"]);
    assert_eq!(code, Some(2), "{said}");
    std::fs::remove_file(&key).unwrap();
}
