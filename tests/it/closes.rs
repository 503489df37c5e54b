//! Close records (`--close-records`) against the real kernel: connections
//! that open, send a known number of bytes and close between two polls (60 s
//! apart) in a private namespace, each seen through the kernel's close
//! message, with its final counters. Needs root (the namespace).

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use xtcp_feed::proto::{Record, RecordKind};
use xtcp_testkit::{closed_connections, Closed, Netns};

/// A namespace of its own, with the exporter's receiver in it.
struct Scene {
    ns: Netns,
    receiver: Receiver,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Scene {
    fn new(tag: &str, more: &[Need]) -> Option<Scene> {
        if !can_run_in_netns(more) {
            return None;
        }
        let serial = serial();
        let ns = Netns::create(tag).expect("create network namespace");
        let receiver = Receiver::start(&ns);
        Some(Scene {
            ns,
            receiver,
            _serial: serial,
        })
    }

    /// The exporter, polling every minute with close records on, once it
    /// has joined the close groups of `polled` (its own namespace unless
    /// `args` say otherwise). `prefix` runs it (e.g. as another user).
    fn exporter(&self, prefix: &[&str], args: &[&str], polled: &Netns) -> Running {
        let dest = format!("udp:127.0.0.1:{PORT}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns.name()])
            .args(prefix)
            .arg(workspace_bin("xtcp"))
            .args(["--close-records", "--frequency", "60s", "--dest", &dest])
            .args(["--no-prom", "--no-statsd"])
            .args(args)
            .stderr(Stdio::piped());
        let mut exporter = Running(Some(cmd.spawn().unwrap()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !in_ns(polled, joined_close_groups) {
            assert!(
                exporter.child().try_wait().unwrap().is_none(),
                "the exporter exited"
            );
            assert!(std::time::Instant::now() < deadline, "never joined");
            std::thread::sleep(Duration::from_millis(20));
        }
        exporter
    }

    /// `n` connections per family opened, sent over and closed, half of
    /// them by the server first.
    fn churn(&self, n: usize) -> Vec<Closed> {
        in_ns(&self.ns, || {
            let mut done = Vec::new();
            for server in [
                SocketAddr::from((Ipv4Addr::LOCALHOST, 40001)),
                SocketAddr::from((Ipv6Addr::LOCALHOST, 40001)),
            ] {
                let bytes = |i: usize| 1 + (i as u64 * 7919) % 20_000;
                let closed = closed_connections(server, n, 20_000, bytes, |i| i % 2 == 0).unwrap();
                done.extend(closed);
            }
            done
        })
    }
}

/// Whether a `NETLINK_SOCK_DIAG` socket of this namespace is in the TCP
/// destroy groups (1 and 3: mask 5) (`/proc/net/netlink`: Eth 4, Groups).
fn joined_close_groups() -> bool {
    std::fs::read_to_string("/proc/thread-self/net/netlink")
        .unwrap()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"4")
                && f.get(3).and_then(|g| u32::from_str_radix(g, 16).ok()) == Some(5)
        })
}

/// The connections whose two close records arrived with their byte
/// counters equal to what was sent: the client's `bytes_sent`, and the
/// server's `bytes_received`, which also counts the client's FIN when it
/// came before the socket was destroyed (a server that closed first is
/// destroyed in FIN_WAIT2 when its close finds its FIN already acknowledged:
/// the kernel hands the rest of the close to a TIME_WAIT socket).
fn matched(connections: &[Closed], records: &[Record]) -> Vec<Closed> {
    let closes: HashMap<(u32, u32, u32), &Record> = records
        .iter()
        .filter(|r| r.record_kind() == RecordKind::Closed)
        .map(|r| {
            let key = (
                r.inet_diag_msg_family,
                r.inet_diag_msg_socket_source_port,
                r.inet_diag_msg_socket_destination_port,
            );
            (key, r)
        })
        .collect();
    connections
        .iter()
        .filter(|c| {
            let (client, server) = (u32::from(c.client_port), u32::from(c.server_port));
            let sent = closes.get(&(c.family, client, server));
            let read = closes.get(&(c.family, server, client));
            sent.is_some_and(|r| {
                r.tcp_info_bytes_sent == Some(c.bytes) && r.tcp_info_state == Some(7)
            }) && read.is_some_and(|r| {
                let fin = u64::from(r.tcp_info_bytes_received == Some(c.bytes + 1));
                r.tcp_info_bytes_received == Some(c.bytes + fin)
            })
        })
        .copied()
        .collect()
}

/// Close records among `records`.
fn closed(records: &[Record]) -> u64 {
    records
        .iter()
        .filter(|r| r.record_kind() == RecordKind::Closed)
        .count() as u64
}

/// Close messages [`Scene::churn`] makes: two per connection, one per
/// listener (one per family).
fn messages(connections: &[Closed]) -> u64 {
    2 * connections.len() as u64 + 2
}

#[test]
fn connections_closed_between_polls_arrive_with_their_final_counters() {
    let Some(scene) = Scene::new("closes", &[]) else {
        return;
    };
    let exporter = scene.exporter(&[], &[], &scene.ns);
    let connections = scene.churn(5000);
    let expected = messages(&connections);
    scene.receiver.wait_for(expected, Duration::from_secs(30));
    let (status, stderr) = exporter.terminate();
    assert!(status.success(), "{stderr}");
    let Received { records, .. } = scene.receiver.finish();

    // All between the two polls: the first poll found nothing.
    assert_eq!(total(&stderr, "", "polls"), 1, "{stderr}");
    let closes = |name| total(&stderr, "closes", name);
    assert_eq!(closes("messages") + closes("lost"), expected, "{stderr}");
    assert_eq!(closes("records"), closes("messages"), "{stderr}");
    assert_eq!(
        closed(&records),
        closes("records"),
        "every record sent arrived"
    );

    let good = matched(&connections, &records);
    xtcp_service::say!(
        "closes: {} connections, {} with both records and their counters, messages {} lost {}",
        connections.len(),
        good.len(),
        closes("messages"),
        closes("lost")
    );
    assert!(
        good.len() * 1000 >= connections.len() * 999,
        "{} of {}: {stderr}",
        good.len(),
        connections.len()
    );
    for family in [libc::AF_INET as u32, libc::AF_INET6 as u32] {
        for server_first in [false, true] {
            assert!(good
                .iter()
                .any(|c| c.family == family && c.server_first == server_first));
        }
    }
}

#[test]
fn a_burst_beyond_the_close_buffer_is_counted_lost() {
    let Some(scene) = Scene::new("closeburst", &[]) else {
        return;
    };
    let exporter = scene.exporter(&[], &["--close-buffer", "4096"], &scene.ns);
    let connections = scene.churn(1000);
    let expected = messages(&connections);
    // Whatever arrives, arrives within the wait; the rest was lost.
    scene.receiver.wait_for(expected, Duration::from_secs(3));
    let (status, stderr) = exporter.terminate();
    assert!(status.success(), "{stderr}");
    let Received { records, .. } = scene.receiver.finish();
    let closes = |name| total(&stderr, "closes", name);
    xtcp_service::say!(
        "burst: {expected} close messages made, {} read, {} lost, {} overruns",
        closes("messages"),
        closes("lost"),
        closes("overruns")
    );
    assert!(closes("lost") > 0 && closes("overruns") > 0, "{stderr}");
    assert_eq!(closes("messages") + closes("lost"), expected, "{stderr}");
    assert!(stderr.contains("warning: close messages lost"), "{stderr}");
    assert_eq!(
        closed(&records),
        closes("records"),
        "every record sent arrived"
    );
}

/// Joining the close groups needs no privilege: an exporter run as nobody
/// without capabilities gets every close.
#[test]
fn close_records_need_no_privilege() {
    let Some(scene) = Scene::new("closenobody", &[Need::Tool("setpriv")]) else {
        return;
    };
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ];
    let exporter = scene.exporter(&nobody, &[], &scene.ns);
    let connections = scene.churn(50);
    scene
        .receiver
        .wait_for(messages(&connections), Duration::from_secs(10));
    let (status, stderr) = exporter.terminate();
    assert!(status.success(), "{stderr}");
    let records = scene.receiver.finish().records;
    assert_eq!(matched(&connections, &records).len(), connections.len());
}

/// The closes of a namespace polled with `--netns` arrive too, named after
/// it; the exporter's own namespace, not polled then, sends none.
#[test]
fn closes_of_a_polled_namespace_carry_its_name() {
    let Some(scene) = Scene::new("closehome", &[]) else {
        return;
    };
    let other = Netns::create("closeother").expect("create network namespace");
    let exporter = scene.exporter(&[], &["--netns", other.name()], &other);
    let connections = in_ns(&other, || {
        let server = SocketAddr::from((Ipv4Addr::LOCALHOST, 40001));
        closed_connections(server, 20, 20_000, |_| 100, |i| i % 2 == 0).unwrap()
    });
    // Closes in the exporter's own namespace, which it does not poll.
    scene.churn(5);
    // Two per connection and the one listener.
    let expected = 2 * connections.len() as u64 + 1;
    scene.receiver.wait_for(expected, Duration::from_secs(10));
    let (status, stderr) = exporter.terminate();
    assert!(status.success(), "{stderr}");
    let records = scene.receiver.finish().records;
    assert_eq!(matched(&connections, &records).len(), connections.len());
    // Closes only: under load the start's poll can come after the
    // connections opened, and export some of them.
    assert_eq!(closed(&records), expected, "{stderr}");
    let inode = other.inode().unwrap();
    assert!(records
        .iter()
        .all(|r| r.netns_name == other.name() && r.netns_inode == inode));
}
