//! Loss on the UDP leg, as `xtcp-debug-server` reports it: a receiver with
//! a small buffer, stopped while a burst arrives, drops datagrams in the
//! kernel; its totals must say exactly how many records never arrived.
//! (`crates/forwarder/tests/kafka.rs` does the same to the forwarder.)

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{overflow_receiver, serial, stopped_value, udp_queued, workspace_bin, Running};

const PROGRAM: &str = "xtcp-debug-server";

/// The debug server on a free port of 127.0.0.1 with the smallest receive
/// buffer the kernel grants, once bound.
fn start_small_receiver() -> (Running, u16) {
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Running(Some(
        Command::new(workspace_bin(PROGRAM))
            .args(["--format", "none", "--recv-buffer", "4096"])
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
    let (mut server, port) = start_small_receiver();
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
