//! `--filter` and `--states` against the real kernel: the farm of
//! the test kit's harness (listeners on 127.0.0.1:40001 and [::1]:40001, 2500
//! connections each), one poll per filter, and the records received compared
//! with the farm's sockets selected by the same condition written in Rust.
//! Needs root.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;

use crate::common::*;

/// Addresses are not in [`Key`]; on this farm they follow from the family
/// and whether the socket listens (remote port 0, address unspecified).
fn is_listener(k: &Key) -> bool {
    k.2 == 0
}

const V4: u32 = libc::AF_INET as u32;
const V6: u32 = libc::AF_INET6 as u32;

/// One poll with these flags: the keys received, each exactly once, and
/// the totals line.
fn poll(farm: &Farm, flags: &[&str]) -> (BTreeSet<Key>, String) {
    let receiver = Receiver::start(&farm.ns);
    let dest = format!("udp:127.0.0.1:{PORT}");
    let mut args = vec!["--max-loops", "1", "--dest", &dest];
    args.extend_from_slice(flags);
    let (_, stderr) = run(farm.xtcp(&args));
    let records = receiver.finish().records;
    let keys: BTreeSet<Key> = records.iter().map(key).collect();
    assert_eq!(keys.len(), records.len(), "{flags:?}: a socket twice");
    (keys, stderr)
}

#[test]
fn the_kernel_returns_exactly_the_matching_sockets() {
    let Some(farm) = Farm::new("filter") else {
        return;
    };
    type Select = fn(&Key) -> bool;
    let cases: [(&str, Select); 7] = [
        ("sport 40001", |k| k.1 == 40001),
        ("dport = 40001", |k| k.2 == 40001),
        ("not sport 40001 and dport >= 40001", |k| {
            k.1 != 40001 && k.2 >= 40001
        }),
        ("sport 40001 and not dport 0-40000", |k| {
            k.1 == 40001 && k.2 > 40000
        }),
        ("src 127.0.0.0/8", |k| k.0 == V4),
        ("dst ::1 or (sport < 40001 && src 127.0.0.1)", |k| {
            (k.0 == V6 && !is_listener(k)) || (k.0 == V4 && k.1 < 40001)
        }),
        ("dst 0.0.0.0/0 and not dst 127.0.0.2/31", |k| k.0 == V4),
    ];
    for (filter, select) in cases {
        let want: BTreeSet<Key> = farm.keys.iter().copied().filter(select).collect();
        assert!(
            !want.is_empty() && want.len() < farm.keys.len(),
            "{filter}: a case that selects everything or nothing proves little"
        );
        let (got, stderr) = poll(&farm, &["--filter", filter]);
        assert_eq!(got.len(), want.len(), "{filter}");
        assert_eq!(got, want, "{filter}");
        // The kernel built no message for the others: counted sockets are
        // the selected ones.
        let sockets = dumps_total(&stderr, "sockets");
        assert_eq!(sockets, want.len() as u64, "{filter}: {stderr}");
    }
}

#[test]
fn states_are_selected_in_the_request() {
    let Some(farm) = Farm::new("states") else {
        return;
    };
    let (got, stderr) = poll(&farm, &["--states", "listen"]);
    let listeners: BTreeSet<Key> = farm.keys.iter().copied().filter(is_listener).collect();
    assert_eq!(listeners.len(), 2);
    assert_eq!(got, listeners);
    assert_eq!(dumps_total(&stderr, "sockets"), 2, "{stderr}");
    // With a filter too: both apply.
    let (got, _) = poll(
        &farm,
        &["--states", "established", "--filter", "dport 40001"],
    );
    let clients: BTreeSet<Key> = farm.keys.iter().copied().filter(|k| k.2 == 40001).collect();
    assert_eq!(got, clients);
}

/// A socket bound to a port but neither listening nor connecting is in the
/// bind table only: `all` leaves it out (asking for it walks that table on
/// every dump), naming the state brings it, reported as CLOSE (7).
#[test]
fn bound_inactive_sockets_only_when_named() {
    let Some(farm) = Farm::new("bound") else {
        return;
    };
    let bound = in_ns(&farm.ns, || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 40999)).into())?;
        Ok::<_, std::io::Error>(socket)
    })
    .unwrap();
    let inactive: Key = (V4, 40999, 0);
    let (got, _) = poll(&farm, &[]);
    assert_eq!(
        got, farm.keys,
        "the default is every socket of the connection tables"
    );
    let (got, _) = poll(&farm, &["--states", "all,bound-inactive"]);
    let mut want = farm.keys.clone();
    want.insert(inactive);
    assert_eq!(got, want);
    let receiver = Receiver::start(&farm.ns);
    let dest = format!("udp:127.0.0.1:{PORT}");
    run(farm.xtcp(&[
        "--max-loops",
        "1",
        "--dest",
        &dest,
        "--states",
        "bound-inactive",
    ]));
    let records = receiver.finish().records;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        (key(&records[0]), records[0].inet_diag_msg_state),
        (inactive, 7)
    );
    drop(bound);
}

#[test]
fn a_bad_filter_exits_2_naming_the_position() {
    let out = Command::new(workspace_bin("xtcp"))
        .args([
            "--max-loops",
            "1",
            "--filter",
            "sport 22 and (dst 10.0.0.0/8",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("at character 29: ended where ')' was expected"),
        "{stderr}"
    );
}
