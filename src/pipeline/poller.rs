//! The poller thread: every `--frequency`, stamp a poll, bring the polled
//! namespaces up to date, and for each namespace in turn publish one
//! [`Dump`] per enabled family and send its request, then wait until every
//! dump is finished (all records sent), abandoning a dump the kernel stops
//! answering for `--netlink-timeout` (time a netlinker waits on a full
//! channel does not count: that is a slow output, and the dump goes on;
//! nor does a dump's wait for its turn while another namespace's dump of
//! the family makes progress).
//! The sockets of a namespace with an abandoned dump are replaced before
//! its next request. A family's dumps of all namespaces
//! add up to its report of the poll. It reports each poll, counts long
//! ones, and on stop lets the poll in flight finish before it releases the
//! netlinkers.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver, Sender};

use crate::aggregate::otlp::PushHandle;
use crate::aggregate::Aggregates;
use crate::config::Config;
use crate::counting::DumpReport;
use crate::export::record::{unix_ns, PollStamp};
use crate::metrics::statsd::Statsd;
use crate::metrics::{Metrics, PoolState};
use crate::pipeline::changes::ChangeTracker;
use crate::pipeline::closes::CloseState;
use crate::pipeline::dump::Dump;
use crate::pipeline::family::FamilyState;
use crate::pipeline::netns::{Namespaces, Table, TcpCounts};
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
    /// Published after each poll.
    pub aggregates: Option<Arc<Aggregates>>,
}

/// Where the poller says what each poll did.
pub struct Reporting {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub statsd: Option<Statsd>,
    /// With `--dest udp:...`: sent after every poll; handed back at the end
    /// for the stop's.
    pub watermarks: Option<Watermarks>,
    /// With `--otlp-url`: woken after each publication of the aggregates.
    pub otlp: Option<PushHandle>,
}

pub struct Poller {
    families: Vec<Arc<FamilyState>>,
    namespaces: Namespaces,
    closes: Option<Arc<CloseState>>,
    changes: Option<Arc<ChangeTracker>>,
    aggregates: Option<Arc<Aggregates>>,
    otlp: Option<PushHandle>,
    config: Config,
    shutdown: Shutdown,
    /// Each dump's report, sent by whoever drops the dump last.
    report_tx: Sender<DumpReport>,
    report_rx: Receiver<DumpReport>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    statsd: Option<Statsd>,
    watermarks: Option<Watermarks>,
    /// The shared-table warning is said once a run.
    warned_shared_table: bool,
}

/// What the dumps of one poll did.
#[derive(Default)]
struct PollDumps {
    /// One per family, summed over the namespaces.
    reports: Vec<DumpReport>,
    /// Namespaces where a dump was abandoned.
    abandoned: Vec<u64>,
    /// Namespaces not dumped: they had no TCP socket.
    empty: usize,
    /// Namespaces dumped that share the host's table.
    shared_table_namespaces: usize,
    /// Time the kernel spent walking (`DumpReport::kernel_time`), summed
    /// over every dump, and over those of namespaces that share the host's
    /// table.
    dump_time: Duration,
    shared_table_time: Duration,
}

/// Namespaces whose dumps may be in flight at once, per netlinker. One at a
/// time would leave every thread idle at each namespace's end: the poller
/// waits for the report, the netlinker for the next request, the inetdiager
/// for the next batch, and each wakes the next (three wake-ups per
/// namespace, which cost more than a small namespace's dump). A few queued
/// requests keep them busy; the kernel holds each one's replies in its
/// socket's receive buffer until a netlinker reads them.
const DUMPS_IN_FLIGHT_PER_NETLINKER: usize = 8;

/// Namespaces dumped side by side: as many netlinkers as the dumps have
/// read them in parallel, each with a few more queued.
fn dumps_at_once(families: &[Arc<FamilyState>]) -> usize {
    let netlinkers = families.iter().map(|f| f.family.netlinkers).max();
    netlinkers.unwrap_or(1) * DUMPS_IN_FLIGHT_PER_NETLINKER
}

/// A namespace whose dumps are running.
struct InFlight {
    /// Dump reports still to come.
    reports: usize,
    table: Table,
    abandoned: bool,
}

/// Above this share of a poll's dump time, namespaces that walk the host's
/// table are worth a warning (`docs/operations.md`, "Container hosts").
pub const SHARED_TABLE_WARN_SHARE: f64 = 0.5;

/// The warning for a poll of several namespaces in which those sharing the
/// host's table took more than [`SHARED_TABLE_WARN_SHARE`] of the dump time.
fn shared_table_warning(
    poll_id: u64,
    dumps: &PollDumps,
    namespaces: &Namespaces,
) -> Option<String> {
    let dumped = namespaces.iter().count() - dumps.empty;
    let share = dumps.shared_table_time.as_secs_f64() / dumps.dump_time.as_secs_f64();
    // No dump time at all makes the share NaN, which is not above it.
    if dumped < 2
        || dumps.shared_table_namespaces == 0
        || share.is_nan()
        || share <= SHARED_TABLE_WARN_SHARE
    {
        return None;
    }
    let buckets = namespaces.iter().find_map(|n| match n.table {
        Table::Shared { buckets } => Some(buckets),
        _ => None,
    })?;
    Some(format!(
        "warning: poll {poll_id}: {} of {dumped} namespaces dumped share the host's TCP table \
         ({buckets} buckets, walked whole by each of their dumps) and took {:.0}% of the kernel's \
         dump time; give them tables of their own with net.ipv4.tcp_child_ehash_entries set before \
         they are made (docs/operations.md, \"Container hosts\"). Said once.",
        dumps.shared_table_namespaces,
        share * 100.0
    ))
}

impl Poller {
    pub fn new(
        config: &Config,
        shutdown: &Shutdown,
        targets: Targets,
        reporting: Reporting,
    ) -> Self {
        let window = dumps_at_once(&targets.families);
        // Room for every report of the dumps in flight: the poller itself
        // drops a dump whose request failed or that it expires, and must
        // not wait on its own channel.
        let (report_tx, report_rx) = bounded(targets.families.len() * window);
        Poller {
            families: targets.families,
            namespaces: targets.namespaces,
            closes: targets.closes,
            changes: targets.changes,
            aggregates: targets.aggregates,
            otlp: reporting.otlp,
            config: config.clone(),
            shutdown: shutdown.clone(),
            report_tx,
            report_rx,
            metrics: reporting.metrics,
            health: reporting.health,
            statsd: reporting.statsd,
            watermarks: reporting.watermarks,
            warned_shared_table: false,
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
            if let Some(aggregates) = &self.aggregates {
                aggregates.begin_poll(poll_id, self.namespaces.iter().map(|n| n.inode));
            }
            totals.netns_errors += problems.len() as u64;
            let Some(dumps) = self.dump_namespaces(&stamp) else {
                break; // aborted
            };
            // The kernel may still be in an abandoned dump, and a socket runs
            // one dump at a time (the next request would get EBUSY): the
            // namespace's sockets are replaced at the next refresh.
            for &inode in &dumps.abandoned {
                self.namespaces.reopen(inode, &self.families);
            }
            if let Some(changes) = &self.changes {
                let (sockets, bytes) = changes.sweep(poll_id);
                self.metrics.table.changes_tracked.set(sockets as i64);
                self.metrics.table.changes_bytes.set(bytes as i64);
            }
            self.publish_aggregates(poll_id);
            let took = started.elapsed();
            // Every record of the poll is out: its watermark goes before the
            // poll is reported, so whoever sees the report knows it was sent.
            if let Some(w) = &mut self.watermarks {
                w.send(poll_id, false);
            }
            let long = took.as_secs_f64()
                > self.config.frequency.as_secs_f64() * self.config.polling_safety_buffer;
            self.report(poll_id, &dumps, took, long);
            self.observe(&dumps, long, problems.len());
            totals.add_poll(&dumps.reports, long);
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

    /// Dumps every family of each namespace with a TCP socket, up to
    /// [`dumps_at_once`] namespaces at once: the kernel walks a namespace's
    /// table in the request's `send` (as far as one reply datagram takes
    /// it) and then inside `recv`, so dumps run side by side only with more
    /// than one netlinker. `None` if the pipeline aborts.
    fn dump_namespaces(&self, stamp: &PollStamp) -> Option<PollDumps> {
        let window = dumps_at_once(&self.families);
        let mut poll = PollDumps {
            reports: self
                .families
                .iter()
                .map(|f| DumpReport::empty(f.family))
                .collect(),
            ..PollDumps::default()
        };
        let mut in_flight: HashMap<u64, InFlight> = HashMap::new();
        for ns in self.namespaces.iter() {
            let stamp = PollStamp {
                netns_inode: ns.inode,
                netns_name: Arc::clone(&ns.name),
                ..stamp.clone()
            };
            let counts = ns.counts(self.config.states);
            let mut started = 0;
            for (family, socket) in self.families.iter().zip(&ns.sockets) {
                if TcpCounts::may_have(counts.as_ref(), family.family.af) {
                    self.start_dump(family, socket, stamp.clone());
                    started += 1;
                }
            }
            if started == 0 {
                poll.empty += 1;
                continue;
            }
            let dumping = InFlight {
                reports: started,
                table: ns.table,
                abandoned: false,
            };
            in_flight.insert(ns.inode, dumping);
            while in_flight.len() >= window {
                self.collect_one(&mut in_flight, &mut poll)?;
            }
        }
        while !in_flight.is_empty() {
            self.collect_one(&mut in_flight, &mut poll)?;
        }
        Some(poll)
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
        family.publish(Arc::clone(&dump));
        let c = &self.config;
        let filter = c.filter.as_ref().map_or(&[][..], |f| f.program());
        let request = filtered_dump_request(family.family.af, c.states, c.extensions, filter, seq);
        let began = Instant::now();
        let sent = socket.send(&request);
        dump.add_kernel_time(began.elapsed());
        if let Err(e) = sent {
            dump.counters.count(|t| &mut t.request_errors);
            dump.note_error("request", e);
            family.retire(&dump);
        }
    }

    /// Waits for the next dump report and adds it to `poll`, ending its
    /// namespace's entry in `in_flight` with its last; `None` if the
    /// pipeline aborts.
    fn collect_one(
        &self,
        in_flight: &mut HashMap<u64, InFlight>,
        poll: &mut PollDumps,
    ) -> Option<()> {
        let report = loop {
            select! {
                recv(self.report_rx) -> r => if let Ok(r) = r { break r },
                recv(self.shutdown.abort_signal()) -> _ => return None,
                default(TIMEOUT_CHECK) => self.expire_silent_dumps(),
            }
        };
        let inode = report.netns_inode;
        if let Some(ns) = in_flight.get_mut(&inode) {
            ns.reports -= 1;
            ns.abandoned |= report.totals.timeouts > 0;
            let took = report.kernel_time;
            poll.dump_time += took;
            if matches!(ns.table, Table::Shared { .. }) {
                poll.shared_table_time += took;
            }
            if ns.reports == 0 {
                let ns = in_flight.remove(&inode).expect("just found");
                poll.shared_table_namespaces +=
                    usize::from(matches!(ns.table, Table::Shared { .. }));
                if ns.abandoned {
                    poll.abandoned.push(inode);
                }
            }
        }
        if let Some(m) = poll.reports.iter_mut().find(|m| m.family == report.family) {
            m.merge(&report);
        }
        Some(())
    }

    fn expire_silent_dumps(&self) {
        let timeout = self.config.netlink_timeout;
        for family in &self.families {
            family.expire(timeout, |dump| {
                let silent = dump.idle_for() > timeout;
                if silent {
                    dump.counters.count(|t| &mut t.timeouts);
                    dump.note_error(
                        "timeout",
                        format!(
                            "no reply for {} (--netlink-timeout)",
                            humantime::format_duration(timeout)
                        ),
                    );
                }
                silent
            });
        }
    }

    /// Publishes the poll's aggregates, counts what that did and wakes the
    /// OTLP push.
    fn publish_aggregates(&self, poll_id: u64) {
        let Some(aggregates) = &self.aggregates else {
            return;
        };
        let (published, (tracked, bytes)) = aggregates.publish(poll_id, unix_ns());
        let t = &self.metrics.table;
        t.aggregate_groups.set(published.groups as i64);
        t.aggregate_folded.set(published.folded as i64);
        t.aggregate_expired.inc_by(published.expired as u64);
        t.aggregate_tracked.set(tracked as i64);
        t.aggregate_tracked_bytes.set(bytes as i64);
        if let Some(otlp) = &self.otlp {
            otlp.wake();
        }
    }

    /// Moves the poll into the metrics and sends statsd what changed.
    fn observe(&mut self, dumps: &PollDumps, long: bool, netns_errors: usize) {
        let reports = &dumps.reports;
        let table = &self.metrics.table;
        table.netns.set(self.namespaces.iter().count() as i64);
        table.netns_empty.set(dumps.empty as i64);
        for label in Table::LABELS {
            let count = self
                .namespaces
                .iter()
                .filter(|n| n.table.label() == label)
                .count();
            table
                .netns_tables
                .with_label_values(&[label])
                .set(count as i64);
        }
        let shared = dumps.shared_table_time.as_secs_f64();
        let dump_seconds = &table.netns_dump_seconds;
        dump_seconds.with_label_values(&["shared"]).inc_by(shared);
        dump_seconds
            .with_label_values(&["other"])
            .inc_by(dumps.dump_time.as_secs_f64() - shared);
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

    fn report(&mut self, poll_id: u64, dumps: &PollDumps, took: Duration, long: bool) {
        let reports = &dumps.reports[..];
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
        if !self.warned_shared_table {
            if let Some(warning) = shared_table_warning(poll_id, dumps, &self.namespaces) {
                xtcp_service::say!("{warning}");
                self.warned_shared_table = true;
            }
        }
    }
}
