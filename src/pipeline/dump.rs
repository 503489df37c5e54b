//! One family's dump within one poll, shared by the threads that work on it.
//!
//! The poller creates a [`Dump`] and publishes it in its family's
//! [`FamilyState::current`] before sending the request. Netlinkers clone the
//! `Arc` for every datagram they receive and send it along with the buffer;
//! inetdiagers drop it when the buffer is done. The last drop sends the
//! [`DumpReport`] to the poller, so "the poll is finished" means every socket
//! of it was sent, with no extra bookkeeping.

use std::collections::HashMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::config::Family;
use crate::export::record::PollStamp;
use crate::pipeline::netlink::SockDiagSocket;
use crate::pipeline::pool::BufferPool;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// What a dump did, counted by the threads that did it.
        #[derive(Debug, Default)]
        pub struct DumpCounters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A [`DumpCounters`] snapshot, or a sum of them.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct DumpTotals {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl DumpCounters {
            pub fn snapshot(&self) -> DumpTotals {
                DumpTotals { $($name: self.$name.load(Relaxed),)* }
            }

            /// Adds a thread's local tally (one atomic add per non-zero field).
            pub fn add(&self, t: &DumpTotals) {
                $(if t.$name != 0 {
                    self.$name.fetch_add(t.$name, Relaxed);
                })*
            }
        }

        impl DumpTotals {
            pub fn add(&mut self, t: &DumpTotals) {
                $(self.$name += t.$name;)*
            }
        }
    };
}

counters! {
    /// Reply datagrams of this dump.
    datagrams,
    /// Bytes of those datagrams.
    bytes,
    /// Netlink messages in them (sockets, `NLMSG_DONE`, errors).
    messages,
    /// Socket messages in them.
    sockets,
    /// Sockets the sampling kept.
    sampled,
    /// Records built.
    records,
    /// Sampled socket messages that failed to decode (skipped).
    decode_errors,
    /// Records longer than the record buffer (never expected; skipped).
    encode_errors,
    /// Sampled sockets not written because the output was closed (stdout).
    output_closed,
    /// Attributes of kinds this version does not decode.
    unknown_attributes,
    /// Datagrams sent to the destination (UDP), or flushes (stdout).
    sent_datagrams,
    /// Bytes sent.
    sent_bytes,
    /// Sends that failed (e.g. nobody listening).
    send_errors,
    /// Records in datagrams whose send failed.
    records_lost,
    /// Times a netlinker found the channel full and had to wait.
    channel_full,
    /// Nanoseconds netlinkers waited on a full channel.
    channel_blocked_ns,
    /// Reply datagrams flagged `NLM_F_DUMP_INTR` (sockets may be missing or repeated).
    interrupted,
    /// The kernel ended the dump with an error.
    kernel_errors,
    /// Datagrams that could not be received (lost).
    receive_errors,
    /// Datagrams that could not be framed (lost).
    malformed,
    /// The kernel sent nothing for --netlink-timeout; the dump was abandoned.
    timeouts,
    /// The request could not be sent.
    request_errors,
}

impl DumpTotals {
    /// Datagrams lost between the kernel and the inetdiagers.
    pub fn netlink_errors(&self) -> u64 {
        self.receive_errors + self.malformed
    }
}

/// Sockets counted by the length of the `tcp_info` the kernel sent with
/// them. A kernel sends one length (its `sizeof(struct tcp_info)`), and none
/// for sockets without one (`TIME_WAIT`, `SYN_RECV`), so a few slots are
/// enough; lengths beyond them are counted together as `other`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfoLengths {
    /// `(key, sockets)`; key 0 is no `tcp_info`, otherwise length + 1.
    /// Slots with no sockets are free.
    slots: [(u32, u64); 4],
    other: u64,
}

impl TcpInfoLengths {
    /// Counts `n` sockets whose `tcp_info` was `len` bytes (`None`: absent).
    #[inline]
    pub fn add(&mut self, len: Option<usize>, n: u64) {
        let key = len.map_or(0, |l| l as u32 + 1);
        for slot in &mut self.slots {
            if slot.1 == 0 || slot.0 == key {
                *slot = (key, slot.1 + n);
                return;
            }
        }
        self.other += n;
    }

    pub fn merge(&mut self, other: &TcpInfoLengths) {
        for (len, n) in other.iter() {
            self.add(len, n);
        }
        self.other += other.other;
    }

    /// `(length, sockets)` per length seen; `None` is no `tcp_info`.
    pub fn iter(&self) -> impl Iterator<Item = (Option<usize>, u64)> + '_ {
        self.slots
            .iter()
            .filter(|s| s.1 != 0)
            .map(|&(key, n)| ((key != 0).then(|| key as usize - 1), n))
    }

    /// Sockets whose length found no free slot.
    pub fn other(&self) -> u64 {
        self.other
    }
}

/// What the poller learns when a dump is finished.
#[derive(Debug, Clone)]
pub struct DumpReport {
    pub family: Family,
    pub totals: DumpTotals,
    pub tcp_info_lengths: TcpInfoLengths,
    /// From the request to `NLMSG_DONE`; `None` if it never came.
    pub done_after: Option<Duration>,
    /// From the request to the last record sent.
    pub finished_after: Duration,
    /// The first problem of each kind, to say what went wrong.
    pub first_errors: Vec<String>,
}

impl DumpReport {
    /// A family's report of a poll that dumped no namespace yet.
    pub fn empty(family: Family) -> Self {
        DumpReport {
            family,
            totals: DumpTotals::default(),
            tcp_info_lengths: TcpInfoLengths::default(),
            done_after: Some(Duration::ZERO),
            finished_after: Duration::ZERO,
            first_errors: Vec::new(),
        }
    }

    /// Adds the dump of the same family in another namespace: namespaces
    /// are dumped one after the other, so times add up, and `NLMSG_DONE`
    /// counts as having come only if it came in every one.
    pub fn merge(&mut self, other: &DumpReport) {
        self.totals.add(&other.totals);
        self.tcp_info_lengths.merge(&other.tcp_info_lengths);
        self.done_after = self.done_after.zip(other.done_after).map(|(a, b)| a + b);
        self.finished_after += other.finished_after;
        self.first_errors.extend(other.first_errors.iter().cloned());
    }
}

pub struct Dump {
    pub family: Family,
    /// The socket of the namespace dumped: replies come only on it.
    pub socket: Arc<SockDiagSocket>,
    pub seq: u32,
    pub stamp: PollStamp,
    pub counters: DumpCounters,
    tcp_info_lengths: Mutex<TcpInfoLengths>,
    started: Instant,
    /// Nanoseconds after `started` of the last progress (datagram received
    /// or handed over): the timeout clock.
    last_progress_ns: AtomicU64,
    done_ns: AtomicU64,
    first_errors: Mutex<Vec<String>>,
    report_tx: Sender<DumpReport>,
}

impl Dump {
    /// A dump of `family` in the namespace of `socket`, whose request will
    /// carry `seq`.
    pub fn new(
        family: Family,
        socket: Arc<SockDiagSocket>,
        seq: u32,
        stamp: PollStamp,
        report_tx: Sender<DumpReport>,
    ) -> Self {
        Dump {
            family,
            socket,
            seq,
            stamp,
            counters: DumpCounters::default(),
            tcp_info_lengths: Mutex::default(),
            started: Instant::now(),
            last_progress_ns: AtomicU64::new(0),
            done_ns: AtomicU64::new(0),
            first_errors: Mutex::new(Vec::new()),
            report_tx,
        }
    }

    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    pub fn progressed(&self) {
        self.last_progress_ns.store(self.now_ns(), Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        Duration::from_nanos(
            self.now_ns()
                .saturating_sub(self.last_progress_ns.load(Relaxed)),
        )
    }

    pub fn mark_done(&self) {
        self.done_ns.store(self.now_ns().max(1), Relaxed);
    }

    /// Adds an inetdiager's tally of one buffer.
    pub fn add_tcp_info_lengths(&self, lengths: &TcpInfoLengths) {
        self.tcp_info_lengths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .merge(lengths);
    }

    /// Keeps the first message of each kind (`kind` is the prefix), naming
    /// the namespace when it is not the exporter's own.
    pub fn note_error(&self, kind: &str, detail: impl std::fmt::Display) {
        let kind = match &*self.stamp.netns_name {
            "" => kind.to_string(),
            netns => format!("netns {netns}: {kind}"),
        };
        let mut errors = self.first_errors.lock().unwrap_or_else(|e| e.into_inner());
        if !errors.iter().any(|e| e.starts_with(&kind)) {
            errors.push(format!("{kind}: {detail}"));
        }
    }
}

impl Drop for Dump {
    fn drop(&mut self) {
        let done_ns = self.done_ns.load(Relaxed);
        let report = DumpReport {
            family: self.family,
            totals: self.counters.snapshot(),
            tcp_info_lengths: *self
                .tcp_info_lengths
                .get_mut()
                .unwrap_or_else(|e| e.into_inner()),
            done_after: (done_ns != 0).then(|| Duration::from_nanos(done_ns)),
            finished_after: self.started.elapsed(),
            first_errors: std::mem::take(
                self.first_errors
                    .get_mut()
                    .unwrap_or_else(|e| e.into_inner()),
            ),
        };
        // The poller is gone only on abort, when nobody wants the report.
        let _ = self.report_tx.send(report);
    }
}

/// One family's sockets (one per namespace), buffers and current dump,
/// shared by the poller and the family's netlinkers.
pub struct FamilyState {
    pub family: Family,
    /// Every socket of the family, and the release fd: what the netlinkers
    /// wait on. Socket events carry the namespace's inode,
    /// [`RELEASE_TOKEN`] is the release fd.
    pub epoll: Epoll,
    sockets: Mutex<HashMap<u64, Arc<SockDiagSocket>>>,
    pub pool: Arc<BufferPool>,
    /// The dump replies are currently expected for.
    pub current: Mutex<Option<Arc<Dump>>>,
    /// Datagrams of no current dump (the tail of an abandoned one).
    pub stale_datagrams: AtomicU64,
}

/// The epoll token of the shutdown release fd (no inode is `u64::MAX`).
pub const RELEASE_TOKEN: u64 = u64::MAX;

impl FamilyState {
    /// A family with no namespace yet; `release` wakes its netlinkers for
    /// good (`Shutdown::release_fd`).
    pub fn new(family: Family, pool: Arc<BufferPool>, release: BorrowedFd<'_>) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(release, EpollEvent::new(EpollFlags::EPOLLIN, RELEASE_TOKEN))?;
        Ok(FamilyState {
            family,
            epoll,
            sockets: Mutex::default(),
            pool,
            current: Mutex::new(None),
            stale_datagrams: AtomicU64::new(0),
        })
    }

    fn sockets(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<SockDiagSocket>>> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts watching the socket of the namespace with this inode.
    pub fn add_socket(&self, inode: u64, socket: Arc<SockDiagSocket>) -> io::Result<()> {
        self.epoll
            .add(&*socket, EpollEvent::new(EpollFlags::EPOLLIN, inode))?;
        self.sockets().insert(inode, socket);
        Ok(())
    }

    /// Stops watching a namespace's socket; it closes when the last dump
    /// holding it ends.
    pub fn remove_socket(&self, inode: u64) {
        if let Some(socket) = self.sockets().remove(&inode) {
            // Fails only if it was never added, which the map rules out.
            let _ = self.epoll.delete(&*socket);
        }
    }

    /// The socket an epoll event names; `None` once removed.
    pub fn socket(&self, token: u64) -> Option<Arc<SockDiagSocket>> {
        self.sockets().get(&token).cloned()
    }

    pub fn current(&self) -> std::sync::MutexGuard<'_, Option<Arc<Dump>>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends `dump` as the current one (if it still is): no more replies are
    /// expected for it.
    pub fn retire(&self, dump: &Arc<Dump>) {
        let mut current = self.current();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, dump)) {
            *current = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::request::AF_INET;

    #[test]
    fn last_drop_reports_the_counters() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let family = Family {
            af: AF_INET,
            netlinkers: 1,
            inetdiagers: 1,
        };
        let socket = SockDiagSocket::open(Duration::from_secs(1)).unwrap();
        let dump = Arc::new(Dump::new(
            family,
            Arc::new(socket),
            7,
            PollStamp::default(),
            tx,
        ));
        let in_flight = Arc::clone(&dump);
        dump.counters.add(&DumpTotals {
            sockets: 3,
            ..Default::default()
        });
        dump.note_error("decode", "bad");
        dump.note_error("decode", "worse");
        dump.mark_done();
        drop(dump);
        assert!(rx.try_recv().is_err(), "a buffer still holds the dump");
        in_flight.counters.add(&DumpTotals {
            records: 2,
            ..Default::default()
        });
        drop(in_flight);
        let report = rx.try_recv().unwrap();
        assert_eq!((report.totals.sockets, report.totals.records), (3, 2));
        assert_eq!(report.first_errors, vec!["decode: bad".to_string()]);
        assert!(report.done_after.is_some());
    }

    #[test]
    fn reports_of_namespaces_add_up() {
        let family = Family {
            af: AF_INET,
            netlinkers: 1,
            inetdiagers: 1,
        };
        let dump = |sockets, done_ms: Option<u64>| DumpReport {
            totals: DumpTotals {
                sockets,
                ..Default::default()
            },
            done_after: done_ms.map(Duration::from_millis),
            finished_after: Duration::from_millis(10),
            first_errors: vec![format!("e{sockets}")],
            ..DumpReport::empty(family)
        };
        let mut poll = DumpReport::empty(family);
        poll.merge(&dump(3, Some(4)));
        poll.merge(&dump(5, Some(6)));
        assert_eq!(poll.totals.sockets, 8);
        assert_eq!(poll.done_after, Some(Duration::from_millis(10)));
        assert_eq!(poll.finished_after, Duration::from_millis(20));
        assert_eq!(poll.first_errors, ["e3", "e5"]);
        // One namespace without NLMSG_DONE: the poll's dump never finished.
        poll.merge(&dump(1, None));
        assert_eq!(poll.done_after, None);
    }

    #[test]
    fn tcp_info_lengths_fill_slots_then_other() {
        let mut a = TcpInfoLengths::default();
        a.add(Some(280), 3);
        a.add(None, 2);
        a.add(Some(280), 1);
        assert_eq!(a.iter().collect::<Vec<_>>(), [(Some(280), 4), (None, 2)]);
        let mut b = TcpInfoLengths::default();
        for len in [0, 104, 232, 248, 256] {
            b.add(Some(len), 1);
        }
        a.merge(&b);
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            [(Some(280), 4), (None, 2), (Some(0), 1), (Some(104), 1)]
        );
        assert_eq!(a.other(), 3, "232, 248 and 256 found no slot");
    }
}
