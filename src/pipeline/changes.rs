//! Change-only export (`--changes-only`): a poll exports a socket only when
//! it is new, or when something that matters changed since its last
//! export; every `--snapshot-every`th poll (the first included) exports
//! every socket, so a consumer can rebuild the whole table from the last
//! snapshot and the changes after it.
//!
//! What matters is the socket's [`fingerprint`]: its states, queues and the
//! counters that move only when the connection does something (bytes,
//! segments, retransmits, losses, deliveries). Fields that move on their own
//! (`last_data_recv` and the other `last_*` ages, the RTT estimate, pacing
//! and delivery rates) are left out, so an idle connection stays quiet.
//!
//! The table holds one entry per tracked socket, keyed by namespace and
//! cookie, sharded so the inetdiager threads rarely meet on a lock; the
//! poller drops the sockets a poll did not see ([`ChangeTracker::sweep`]).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::pipeline::sample::mix;
use crate::wire::DiagSocket;
use xtcp_feed::proto::RecordKind;

/// Shards of the table: a power of two, several per inetdiager thread.
const SHARDS: usize = 64;

/// A tracked socket: its namespace's inode and its cookie.
type Key = (u64, u64);

#[derive(Debug, Clone, Copy)]
struct Seen {
    fingerprint: u64,
    /// The last poll that saw the socket.
    poll: u64,
}

pub struct ChangeTracker {
    shards: Vec<Mutex<HashMap<Key, Seen>>>,
    snapshot_every: u64,
}

impl ChangeTracker {
    pub fn new(snapshot_every: u64) -> Self {
        ChangeTracker {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            snapshot_every: snapshot_every.max(1),
        }
    }

    /// Whether poll `poll_id` exports every socket (1, 1 + N, 1 + 2N...).
    pub fn is_snapshot(&self, poll_id: u64) -> bool {
        poll_id.saturating_sub(1) % self.snapshot_every == 0
    }

    fn shard(&self, key: Key) -> MutexGuard<'_, HashMap<Key, Seen>> {
        let i = (mix(key.0 ^ key.1.rotate_left(32)) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How poll `poll_id` exports `socket` of the namespace `netns`:
    /// `Snapshot`, `New`, `Changed`, or `None` when unchanged.
    pub fn classify(
        &self,
        netns: u64,
        socket: &DiagSocket<'_>,
        poll_id: u64,
    ) -> Option<RecordKind> {
        let key = (netns, socket.msg.cookie());
        let fingerprint = fingerprint(socket);
        let seen = Seen {
            fingerprint,
            poll: poll_id,
        };
        let before = self.shard(key).insert(key, seen);
        if self.is_snapshot(poll_id) {
            return Some(RecordKind::Snapshot);
        }
        match before {
            None => Some(RecordKind::New),
            Some(b) if b.fingerprint != fingerprint => Some(RecordKind::Changed),
            Some(_) => None,
        }
    }

    /// After poll `poll_id`: forgets the sockets it did not see (closed, or
    /// in a namespace that could not be dumped: seen again, they are new).
    /// Returns the sockets still tracked, and the bytes the table takes for
    /// them (its allocated slots: key, value and one control byte each).
    pub fn sweep(&self, poll_id: u64) -> (usize, usize) {
        let slot = std::mem::size_of::<(Key, Seen)>() + 1;
        self.shards.iter().fold((0, 0), |(n, bytes), shard| {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|_, seen| seen.poll == poll_id);
            (n + shard.len(), bytes + shard.capacity() * slot)
        })
    }
}

/// What matters of a socket, hashed: its states, queues and the counters
/// that move only when the connection does something.
pub fn fingerprint(s: &DiagSocket<'_>) -> u64 {
    let m = &s.msg;
    let mut h = mix(u64::from(m.state()) | u64::from(m.rqueue()) << 8);
    h = mix(h ^ u64::from(m.wqueue()));
    if let Some(t) = &s.tcp_info {
        let small = |v: Option<u32>| u64::from(v.unwrap_or(0));
        let large = |v: Option<u64>| v.unwrap_or(0);
        for v in [
            small(t.state().map(u32::from)) | small(t.ca_state().map(u32::from)) << 8,
            large(t.bytes_acked()),
            large(t.bytes_received()),
            large(t.bytes_sent()),
            large(t.bytes_retrans()),
            small(t.segs_in()) | small(t.segs_out()) << 32,
            small(t.total_retrans()) | small(t.lost()) << 32,
            small(t.delivered()),
        ] {
            h = mix(h ^ v);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::inet_diag::{INET_DIAG_INFO, INET_DIAG_MSG_LEN};
    use crate::wire::request::AF_INET;
    use crate::wire::{decode_socket, TailLayout};

    /// A socket message: cookie, receive queue, and a 232-byte `tcp_info`
    /// whose `last_data_recv` (offset 52) and `bytes_acked` (120) are set.
    fn message(cookie: u64, rqueue: u32, last_data_recv: u32, bytes_acked: u64) -> Vec<u8> {
        let mut m = vec![0u8; INET_DIAG_MSG_LEN];
        m[0] = AF_INET;
        m[1] = 1; // ESTABLISHED
        m[44..52].copy_from_slice(&cookie.to_ne_bytes());
        m[56..60].copy_from_slice(&rqueue.to_ne_bytes());
        let mut info = vec![0u8; 232];
        info[52..56].copy_from_slice(&last_data_recv.to_ne_bytes());
        info[120..128].copy_from_slice(&bytes_acked.to_ne_bytes());
        m.extend_from_slice(&(4 + info.len() as u16).to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
        m.extend_from_slice(&info);
        m
    }

    fn classify(t: &ChangeTracker, msg: &[u8], poll: u64) -> Option<RecordKind> {
        let socket = decode_socket(msg, TailLayout::for_release("6.1.0")).unwrap();
        t.classify(7, &socket, poll)
    }

    #[test]
    fn new_changed_quiet_and_snapshots() {
        let t = ChangeTracker::new(3);
        let idle = message(1, 0, 100, 5000);
        assert_eq!(classify(&t, &idle, 1), Some(RecordKind::Snapshot));
        t.sweep(1);
        // Poll 2: only time passed for socket 1; socket 2 is new.
        let later = message(1, 0, 30_100, 5000);
        assert_eq!(classify(&t, &later, 2), None, "last_* ages do not matter");
        assert_eq!(classify(&t, &message(2, 0, 0, 0), 2), Some(RecordKind::New));
        t.sweep(2);
        // Poll 3: socket 1 moved; socket 2 is gone.
        let acked = message(1, 0, 0, 6000);
        assert_eq!(classify(&t, &acked, 3), Some(RecordKind::Changed));
        assert_eq!(t.sweep(3).0, 1, "socket 2 forgotten");
        assert_eq!(
            classify(&t, &message(1, 1, 0, 6000), 4),
            Some(RecordKind::Snapshot)
        );
        // Back after a sweep, socket 2 is new again.
        assert_eq!(classify(&t, &message(2, 0, 0, 0), 5), Some(RecordKind::New));
        assert_eq!(
            classify(&t, &message(1, 5, 0, 6000), 5),
            Some(RecordKind::Changed)
        );
        assert!(t.is_snapshot(7) && !t.is_snapshot(6));
    }
}
