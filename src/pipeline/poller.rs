//! The poller thread: every `--frequency`, stamp a poll, bring the polled
//! namespaces up to date, and for each namespace in turn publish one
//! [`Dump`] per enabled family and send its request, then wait until every
//! dump is finished (all records sent), abandoning a dump the kernel stops
//! answering for `--netlink-timeout` (time a netlinker waits on a full
//! channel does not count: that is a slow output, and the dump goes on).
//! The sockets of a namespace with an abandoned dump are replaced before
//! its next request. A family's dumps of all namespaces
//! add up to its report of the poll. It reports each poll, counts long
//! ones, and on stop lets the poll in flight finish before it releases the
//! netlinkers.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver, Sender};

use crate::config::Config;
use crate::counting::DumpReport;
use crate::export::record::PollStamp;
use crate::metrics::statsd::Statsd;
use crate::metrics::{Metrics, PoolState};
use crate::pipeline::changes::ChangeTracker;
use crate::pipeline::closes::CloseState;
use crate::pipeline::dump::Dump;
use crate::pipeline::family::FamilyState;
use crate::pipeline::netns::Namespaces;
use crate::pipeline::report::{dump_warning, poll_line, RunTotals};
use crate::pipeline::sock_diag::SockDiagSocket;
use crate::pipeline::watermark::Watermarks;
use crate::shutdown::Shutdown;
use crate::wire::request::filtered_dump_request;
use xtcp_service::metrics::Health;

/// How often the poller looks for a dump the kernel stopped answering.
const TIMEOUT_CHECK: Duration = Duration::from_millis(50);

/// What the poller dumps at every poll.
pub struct Targets {
    pub families: Vec<Arc<FamilyState>>,
    pub namespaces: Namespaces,
    /// With `--close-records`: told which poll closes come after.
    pub closes: Option<Arc<CloseState>>,
    /// With `--changes-only`: forgets, after each poll, what it did not see.
    pub changes: Option<Arc<ChangeTracker>>,
}

/// Where the poller says what each poll did.
pub struct Reporting {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub statsd: Option<Statsd>,
    /// With `--dest udp:...`: sent after every poll; handed back at the end
    /// for the stop's.
    pub watermarks: Option<Watermarks>,
}

pub struct Poller {
    families: Vec<Arc<FamilyState>>,
    namespaces: Namespaces,
    closes: Option<Arc<CloseState>>,
    changes: Option<Arc<ChangeTracker>>,
    config: Config,
    shutdown: Shutdown,
    /// Each dump's report, sent by whoever drops the dump last.
    report_tx: Sender<DumpReport>,
    report_rx: Receiver<DumpReport>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    statsd: Option<Statsd>,
    watermarks: Option<Watermarks>,
}

impl Poller {
    pub fn new(
        config: &Config,
        shutdown: &Shutdown,
        targets: Targets,
        reporting: Reporting,
    ) -> Self {
        let (report_tx, report_rx) = bounded(targets.families.len());
        Poller {
            families: targets.families,
            namespaces: targets.namespaces,
            closes: targets.closes,
            changes: targets.changes,
            config: config.clone(),
            shutdown: shutdown.clone(),
            report_tx,
            report_rx,
            metrics: reporting.metrics,
            health: reporting.health,
            statsd: reporting.statsd,
            watermarks: reporting.watermarks,
        }
    }

    /// Polls until the last poll or a stop; what the polls did, and the
    /// watermark sender for the stop's.
    pub fn run(mut self) -> (RunTotals, Option<Watermarks>) {
        let mut totals = RunTotals::default();
        let mut next = Instant::now();
        for poll_id in 1.. {
            if !self.sleep_until(next) {
                break;
            }
            let started = Instant::now();
            let stamp = PollStamp::now(poll_id);
            if let Some(closes) = &self.closes {
                closes.last_poll.store(poll_id, Relaxed);
            }
            let problems = self.namespaces.refresh(&self.families);
            for problem in &problems {
                xtcp_service::say!("warning: poll {poll_id}: {problem}");
            }
            totals.netns_errors += problems.len() as u64;
            let Some((reports, abandoned)) = self.dump_namespaces(&stamp) else {
                break; // aborted
            };
            // The kernel may still be in an abandoned dump, and a socket runs
            // one dump at a time (the next request would get EBUSY): the
            // namespace's sockets are replaced at the next refresh.
            for inode in abandoned {
                self.namespaces.reopen(inode, &self.families);
            }
            if let Some(changes) = &self.changes {
                let (sockets, bytes) = changes.sweep(poll_id);
                self.metrics.table.changes_tracked.set(sockets as i64);
                self.metrics.table.changes_bytes.set(bytes as i64);
            }
            let took = started.elapsed();
            // Every record of the poll is out: its watermark goes before the
            // poll is reported, so whoever sees the report knows it was sent.
            if let Some(w) = &mut self.watermarks {
                w.send(poll_id, false);
            }
            let long = took.as_secs_f64()
                > self.config.frequency.as_secs_f64() * self.config.polling_safety_buffer;
            self.report(poll_id, &reports, took, long);
            self.observe(&reports, long, problems.len());
            totals.add_poll(&reports, long);
            if poll_id == self.config.max_loops {
                break;
            }
            // A poll that overran starts the next one at once, without
            // trying to catch up on the missed ones.
            next = (started + self.config.frequency).max(Instant::now());
        }
        self.shutdown.stop();
        self.shutdown.release_netlinkers();
        totals.stale_datagrams = self
            .families
            .iter()
            .map(|f| f.stale_datagrams.load(Relaxed))
            .sum();
        (totals, self.watermarks)
    }

    /// `false` when asked to stop before `when`.
    fn sleep_until(&self, when: Instant) -> bool {
        let wait = when.saturating_duration_since(Instant::now());
        !self.shutdown.wait_stop(wait)
    }

    /// Dumps every family of each namespace in turn; one report per family,
    /// summed over the namespaces, and the namespaces where a dump was
    /// abandoned. `None` if the pipeline aborts.
    fn dump_namespaces(&self, stamp: &PollStamp) -> Option<(Vec<DumpReport>, Vec<u64>)> {
        let mut abandoned = Vec::new();
        let mut merged: Vec<DumpReport> = self
            .families
            .iter()
            .map(|f| DumpReport::empty(f.family))
            .collect();
        for ns in self.namespaces.iter() {
            let stamp = PollStamp {
                netns_inode: ns.inode,
                netns_name: Arc::clone(&ns.name),
                ..stamp.clone()
            };
            for (family, socket) in self.families.iter().zip(&ns.sockets) {
                self.start_dump(family, socket, stamp.clone());
            }
            let reports = self.collect(self.families.len())?;
            if reports.iter().any(|r| r.totals.timeouts > 0) {
                abandoned.push(ns.inode);
            }
            for report in reports {
                if let Some(m) = merged.iter_mut().find(|m| m.family == report.family) {
                    m.merge(&report);
                }
            }
        }
        Some((merged, abandoned))
    }

    fn start_dump(&self, family: &FamilyState, socket: &Arc<SockDiagSocket>, stamp: PollStamp) {
        let seq = socket.next_seq();
        let dump = Arc::new(Dump::new(
            family.family,
            Arc::clone(socket),
            seq,
            stamp,
            self.report_tx.clone(),
        ));
        // Published before the request goes out, so a netlinker that sees
        // the first reply finds its dump.
        *family.current() = Some(Arc::clone(&dump));
        let c = &self.config;
        let filter = c.filter.as_ref().map_or(&[][..], |f| f.program());
        let request = filtered_dump_request(family.family.af, c.states, c.extensions, filter, seq);
        if let Err(e) = socket.send(&request) {
            dump.counters.count(|t| &mut t.request_errors);
            dump.note_error("request", e);
            family.retire(&dump);
        }
    }

    /// Waits for `expected` dump reports; `None` if the pipeline aborts.
    fn collect(&self, expected: usize) -> Option<Vec<DumpReport>> {
        let mut reports = Vec::with_capacity(expected);
        while reports.len() < expected {
            select! {
                recv(self.report_rx) -> r => reports.extend(r.ok()),
                recv(self.shutdown.abort_signal()) -> _ => return None,
                default(TIMEOUT_CHECK) => self.expire_silent_dumps(),
            }
        }
        reports.sort_by_key(|r| r.family.af);
        Some(reports)
    }

    fn expire_silent_dumps(&self) {
        let timeout = self.config.netlink_timeout;
        for family in &self.families {
            let mut current = family.current();
            if let Some(dump) = current.as_ref().filter(|d| d.idle_for() > timeout) {
                dump.counters.count(|t| &mut t.timeouts);
                dump.note_error(
                    "timeout",
                    format!(
                        "no reply for {} (--netlink-timeout)",
                        humantime::format_duration(timeout)
                    ),
                );
                *current = None;
            }
        }
    }

    /// Moves the poll into the metrics and sends statsd what changed.
    fn observe(&mut self, reports: &[DumpReport], long: bool, netns_errors: usize) {
        self.metrics
            .table
            .netns
            .set(self.namespaces.iter().count() as i64);
        self.metrics.table.netns_errors.inc_by(netns_errors as u64);
        let pools: Vec<PoolState> = reports
            .iter()
            .map(|r| {
                let family = self.family_state(r);
                PoolState {
                    allocated_bytes: family
                        .map_or(0, |f| (f.pool.allocated() * f.pool.buffer_len()) as u64),
                    peak_in_use: family.map_or(0, |f| f.pool.take_peak() as u64),
                    stale_datagrams: family.map_or(0, |f| f.stale_datagrams.load(Relaxed)),
                }
            })
            .collect();
        self.metrics.observe_poll(reports, &pools, long);
        self.health.happened();
        if let Some(statsd) = &mut self.statsd {
            statsd.flush(self.metrics.registry());
        }
    }

    fn family_state(&self, report: &DumpReport) -> Option<&FamilyState> {
        self.families
            .iter()
            .find(|f| f.family == report.family)
            .map(|f| &**f)
    }

    fn report(&self, poll_id: u64, reports: &[DumpReport], took: Duration, long: bool) {
        if self.config.verbose {
            let buffers: Vec<usize> = reports
                .iter()
                .map(|r| self.family_state(r).map_or(0, |f| f.pool.allocated()))
                .collect();
            xtcp_service::say!("{}", poll_line(poll_id, reports, &buffers, took));
        }
        for warning in reports.iter().filter_map(|r| dump_warning(poll_id, r)) {
            xtcp_service::say!("{warning}");
        }
        if long {
            xtcp_service::say!(
                "warning: poll {poll_id} took {:.1} ms, more than {} of the {} --frequency",
                took.as_secs_f64() * 1e3,
                self.config.polling_safety_buffer,
                humantime::format_duration(self.config.frequency)
            );
        }
    }
}
