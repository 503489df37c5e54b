//! Change-only export (`--changes-only`) against the real kernel: an idle
//! farm of 10002 sockets exports everything at the first poll (a snapshot),
//! nothing at the next, exactly the sockets of the connections that carried
//! traffic at the one after, and everything again at the next snapshot.
//! Needs root (the namespace).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use xtcp_feed::proto::{Record, RecordKind};

/// Connections per family that carry traffic between the second and the
/// third poll.
const BUSY: usize = 50;

#[test]
fn an_idle_farm_exports_once_then_only_what_moved() {
    let Some(mut farm) = Farm::new("changes") else {
        return;
    };
    let receiver = Receiver::start(&farm.ns);
    let dest = format!("udp:127.0.0.1:{PORT}");
    let mut exporter = Running(Some(
        farm.xtcp(&[
            "--changes-only",
            "--snapshot-every",
            "3",
            "--max-loops",
            "4",
        ])
        .args(["--frequency", "1s", "--no-statsd", "-v", "--dest", &dest])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    ));
    let stderr = exporter.child().stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut said = Vec::new();
    // After the second poll, BUSY connections of each family send 10 bytes
    // each way.
    let mut busy: BTreeSet<Key> = BTreeSet::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        said.push(line.clone());
        if line.starts_with("poll 2:") {
            for pairs in &mut farm.pairs {
                for pair in pairs.streams.chunks_mut(2).take(BUSY) {
                    let mut buf = [9u8; 10];
                    pair[0].write_all(&buf).unwrap();
                    pair[1].read_exact(&mut buf).unwrap();
                    pair[1].write_all(&buf).unwrap();
                    pair[0].read_exact(&mut buf).unwrap();
                    for s in pair.iter() {
                        let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
                        let family = if local.is_ipv6() {
                            libc::AF_INET6
                        } else {
                            libc::AF_INET
                        };
                        busy.insert((family as u32, local.port(), peer.port()));
                    }
                }
            }
        }
    }
    let status = exporter.wait_at_most(Duration::from_secs(30));
    assert!(status.success(), "{said:?}");
    let said = said.join("\n");
    let Received { records, .. } = receiver.finish();

    let by_poll: BTreeMap<u64, Vec<&Record>> = by_poll(&records);
    let keys = |poll: u64| -> BTreeSet<Key> {
        by_poll
            .get(&poll)
            .map_or_else(BTreeSet::new, |rs| rs.iter().map(|r| key(r)).collect())
    };
    let kinds = |poll: u64| -> BTreeSet<RecordKind> {
        by_poll.get(&poll).map_or_else(BTreeSet::new, |rs| {
            rs.iter().map(|r| r.record_kind()).collect()
        })
    };
    // Polls 1 and 4: every socket, as a snapshot.
    for poll in [1, 4] {
        assert_eq!(keys(poll), farm.keys, "poll {poll}");
        assert_eq!(by_poll[&poll].len(), farm.keys.len(), "poll {poll}");
        assert_eq!(kinds(poll), BTreeSet::from([RecordKind::Snapshot]));
    }
    // Poll 2: nothing moved.
    assert_eq!(keys(2), BTreeSet::new(), "{said}");
    // Poll 3: exactly both ends of the busy connections, as changed.
    assert_eq!(busy.len(), 4 * BUSY);
    assert_eq!(keys(3), busy, "{said}");
    assert_eq!(by_poll[&3].len(), busy.len());
    assert_eq!(kinds(3), BTreeSet::from([RecordKind::Changed]));
    // What was left out is counted, per family.
    let unchanged = dumps_total(&said, "unchanged");
    assert_eq!(
        unchanged,
        (farm.keys.len() * 2 - busy.len()) as u64,
        "{said}"
    );
}
