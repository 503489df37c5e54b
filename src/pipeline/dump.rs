//! One family's dump within one poll, shared by the threads that work on it.
//!
//! The poller creates a [`Dump`] and publishes it in its family's
//! [`FamilyState::current`](crate::pipeline::family::FamilyState::current)
//! before sending the request. Netlinkers clone the `Arc` for every datagram
//! they receive and send it along with the buffer; inetdiagers drop it when
//! the buffer is done. The last drop sends the [`DumpReport`] to the poller,
//! so "the poll is finished" means every socket of it was sent, with no extra
//! bookkeeping.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::config::Family;
use crate::counting::{DumpCounters, DumpReport, TcpInfoLengths};
use crate::export::record::PollStamp;
use crate::pipeline::sock_diag::SockDiagSocket;

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
    /// Netlinkers waiting to hand a datagram of this dump to a full channel:
    /// the output is slow, not the kernel, so the clock does not run.
    blocked_on_output: AtomicU32,
    done_ns: AtomicU64,
    kernel_ns: AtomicU64,
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
            blocked_on_output: AtomicU32::new(0),
            done_ns: AtomicU64::new(0),
            kernel_ns: AtomicU64::new(0),
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

    /// How long the kernel has sent nothing for this dump while a netlinker
    /// was free to receive it (zero while one waits on the output).
    pub fn idle_for(&self) -> Duration {
        if self.blocked_on_output.load(Relaxed) > 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(
            self.now_ns()
                .saturating_sub(self.last_progress_ns.load(Relaxed)),
        )
    }

    /// Stops the timeout clock until the guard is dropped (the datagram was
    /// handed over, or the wait given up), which counts as progress.
    pub fn blocked_on_output(&self) -> OutputBlocked<'_> {
        self.blocked_on_output.fetch_add(1, Relaxed);
        OutputBlocked(self)
    }

    /// Adds time spent in a syscall of this dump's where the kernel walks
    /// its table (the request's `send`, a reply's `recv`).
    pub fn add_kernel_time(&self, took: Duration) {
        self.kernel_ns.fetch_add(took.as_nanos() as u64, Relaxed);
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

/// A netlinker waiting on a full channel ([`Dump::blocked_on_output`]).
pub struct OutputBlocked<'a>(&'a Dump);

impl Drop for OutputBlocked<'_> {
    fn drop(&mut self) {
        self.0.progressed();
        self.0.blocked_on_output.fetch_sub(1, Relaxed);
    }
}

impl Drop for Dump {
    fn drop(&mut self) {
        let done_ns = self.done_ns.load(Relaxed);
        let report = DumpReport {
            family: self.family,
            netns_inode: self.stamp.netns_inode,
            totals: self.counters.snapshot(),
            tcp_info_lengths: *self
                .tcp_info_lengths
                .get_mut()
                .unwrap_or_else(|e| e.into_inner()),
            done_after: (done_ns != 0).then(|| Duration::from_nanos(done_ns)),
            finished_after: self.started.elapsed(),
            kernel_time: Duration::from_nanos(*self.kernel_ns.get_mut()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counting::DumpTotals;
    use crate::wire::request::AF_INET;

    /// A v4 dump whose report goes to `tx`.
    fn dump(tx: Sender<DumpReport>) -> Dump {
        let family = Family {
            af: AF_INET,
            netlinkers: 1,
            inetdiagers: 1,
        };
        let socket = SockDiagSocket::open(Duration::from_secs(1)).unwrap();
        Dump::new(family, Arc::new(socket), 7, PollStamp::default(), tx)
    }

    #[test]
    fn waiting_on_the_output_is_not_kernel_silence() {
        let (tx, _rx) = crossbeam_channel::bounded(1);
        let dump = dump(tx);
        std::thread::sleep(Duration::from_millis(20));
        assert!(dump.idle_for() >= Duration::from_millis(20));
        let blocked = dump.blocked_on_output();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(dump.idle_for(), Duration::ZERO, "the clock stops");
        drop(blocked);
        assert!(dump.idle_for() < Duration::from_millis(20), "and restarts");
    }

    #[test]
    fn last_drop_reports_the_counters() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let dump = Arc::new(dump(tx));
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
}
