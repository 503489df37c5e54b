//! Loss on the UDP leg, as a receiver sees it.
//!
//! An exporter run (one `instance`) numbers its records 1, 2, 3... without
//! gaps (`record_counter`, docs/record.md), so a receiver that notes the
//! numbers of each run knows what never arrived. The numbers of one run do
//! not arrive in order: with several inetdiager threads each sends its own
//! blocks, interleaved. So a missing number is first a *hole*, and becomes
//! *lost* only when it is still missing [`GRACE`] after a later number
//! arrived (or when the run is evicted, or the receiver stops). A number
//! that fills a hole is *reordered*; one that arrives again, or after its
//! hole was counted lost, is *duplicated*.
//!
//! A later number shows a hole only when it arrives, so the last records of
//! a poll would wait for the next poll to be missed, and those of a run's
//! last poll forever. The exporter closes that gap with *watermarks*: after
//! every poll, and when it stops, it sends the number it has reached, and a
//! watermark opens a hole up to its number just as a record would. It also
//! says the run's poll interval: a run heard from neither by a record nor by
//! a watermark for three of its intervals (at least [`GRACE`]) without having
//! said it stopped is *silent* (killed, its host gone, or the feed cut), and
//! is counted once each time it falls silent. A stopped run leaves the
//! table once its holes are settled; a silent one after [`FORGET_SILENT`].
//!
//! Memory is bounded: at most `run_limit` runs (the one heard from longest
//! ago is evicted, its holes counted lost) and [`HOLE_LIMIT`] holes per run
//! (the oldest is counted lost early). A run is a handful of words plus its
//! holes, which are few: a hole is one range of numbers, however long.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use crate::proto::{Record, Watermark};
use crate::receiver::socket_drops;

/// How long a number may be missing after a later one arrived before it
/// counts as lost. Reordering on a host or a LAN takes microseconds; this
/// leaves room for an exporter thread that was descheduled mid-poll.
pub const GRACE: Duration = Duration::from_secs(5);

/// Open holes kept per run; beyond this the oldest is counted lost early.
pub const HOLE_LIMIT: usize = 1024;

/// Runs tracked by default: plenty for the exporters one receiver serves.
pub const DEFAULT_RUN_LIMIT: usize = 4096;

/// A run is silent after this many of its poll intervals without a word.
pub const SILENT_INTERVALS: u32 = 3;

/// How long a silent run is kept (should it come back) before it is
/// dropped from the table; it stays counted in `runs_silent`.
pub const FORGET_SILENT: Duration = Duration::from_secs(3600);

xtcp_service::counters! {
    /// What a receiver of the feed knows about loss, since it started: the
    /// kernel's drops on its socket and what the tracked numbers showed (see
    /// the module's rules). The metrics are named as the forwarder shows
    /// them; the debug server prints the exit line only.
    pub struct Loss;
    kernel_drops "Datagrams the kernel dropped on the forwarder's socket because its receive buffer was full (SO_MEMINFO drops)." => "xtcp_forwarder_kernel_drops_total", exit "kernel_drops";
    lost "Records that never arrived: numbers of an exporter run still missing 5 s after a later number or a watermark past them arrived, or at exit." => "xtcp_forwarder_records_lost_total", exit "lost";
    duplicated "Records whose number had already arrived (or had already been counted lost); still forwarded." => "xtcp_forwarder_records_duplicated_total", exit "duplicated";
    reordered "Records that arrived after a higher number of their run (expected with more than one inetdiager thread)." => "xtcp_forwarder_records_reordered_total", exit "reordered";
    untracked "Records without an instance (schema 2 or older), whose loss cannot be told." => "xtcp_forwarder_records_untracked_total", exit "untracked";
    runs_evicted "Runs dropped from the full table (the one heard from longest ago); their open holes were counted lost." => "xtcp_forwarder_runs_evicted_total", exit "runs_evicted";
    runs_heard "Exporter runs heard from for the first time (a run forgotten and heard again counts again)." => "xtcp_forwarder_runs_heard_total", exit "runs_heard";
    runs_stopped "Runs whose stop watermark arrived: they stopped and said so." => "xtcp_forwarder_runs_stopped_total", exit "runs_stopped";
    runs_silent "Times a run fell silent: nothing from it (record or watermark) for three of its poll intervals, at least 5 s, and no stop watermark. Killed, its host gone, or its feed cut; what it sent after the last number heard is not counted." => "xtcp_forwarder_runs_silent_total", exit "runs_silent";
    watermarks "Watermarks received (each exporter sends one after every poll and one when it stops); read for the loss count, never sent to Kafka." => "xtcp_forwarder_watermarks_total", exit "watermarks";
}

/// What the tracker reads of a record: its run, poll and number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordId {
    pub instance: u64,
    pub poll_id: u64,
    pub record_counter: u64,
}

impl From<&Record> for RecordId {
    fn from(r: &Record) -> Self {
        RecordId {
            instance: r.instance,
            poll_id: r.poll_id,
            record_counter: r.record_counter,
        }
    }
}

/// Numbers `start..end` not received yet, missing since `since`.
#[derive(Debug)]
struct Hole {
    start: u64,
    end: u64,
    since: Instant,
}

#[derive(Debug)]
struct Run {
    /// The highest number received, or reached by a watermark.
    top: u64,
    /// Ascending and disjoint, all below `top`. New holes open above every
    /// other, so they are also in the order they opened.
    holes: Vec<Hole>,
    last_heard: Instant,
    /// How long it may go unheard before it is silent: from its
    /// watermarks, `None` before the first (an exporter that sends none).
    quiet_limit: Option<Duration>,
    silent: bool,
    /// When its stop watermark arrived.
    stopped: Option<Instant>,
    /// Its host, from its watermarks (records are read for their numbers
    /// only).
    hostname: String,
}

impl Run {
    /// A run first heard now, at `counter` of poll `poll_id`: one heard in
    /// its first poll (or before it ended one) started while we listened,
    /// and what it numbered before is missing; one heard later was joined
    /// midway, and nothing before `counter` is known.
    fn new(poll_id: u64, counter: u64, now: Instant) -> Run {
        Run {
            top: if poll_id <= 1 { 0 } else { counter },
            holes: Vec::new(),
            last_heard: now,
            quiet_limit: None,
            silent: false,
            stopped: None,
            hostname: String::new(),
        }
    }

    /// Raises `top` to `to`, the numbers between becoming a hole.
    fn reach(&mut self, to: u64, now: Instant, totals: &mut Loss) {
        if to <= self.top {
            return;
        }
        if to > self.top + 1 {
            self.holes.push(Hole {
                start: self.top + 1,
                end: to,
                since: now,
            });
            if self.holes.len() > HOLE_LIMIT {
                let oldest = self.holes.remove(0);
                totals.lost += oldest.end - oldest.start;
            }
        }
        self.top = to;
    }

    fn heard(&mut self, now: Instant) {
        self.last_heard = now;
        self.silent = false;
    }

    /// Notes number `counter` received: above the top it may open a hole,
    /// below it fills one (reordered) or came before (duplicated).
    fn note(&mut self, counter: u64, now: Instant, totals: &mut Loss) {
        if counter > self.top {
            self.reach(counter, now, totals);
            return;
        }
        let i = self.holes.partition_point(|h| h.end <= counter);
        match self.holes.get_mut(i) {
            Some(hole) if hole.start <= counter => {
                totals.reordered += 1;
                if hole.start == counter {
                    hole.start += 1;
                } else if counter + 1 == hole.end {
                    hole.end = counter;
                } else {
                    let upper = Hole {
                        start: counter + 1,
                        end: hole.end,
                        since: hole.since,
                    };
                    hole.end = counter;
                    self.holes.insert(i + 1, upper);
                }
                if self.holes[i].start == self.holes[i].end {
                    self.holes.remove(i);
                }
            }
            _ => totals.duplicated += 1,
        }
    }
}

/// A run that fell silent, for the receiver to say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FellSilent {
    pub instance: u64,
    pub hostname: String,
    /// How long it had been unheard.
    pub quiet: Duration,
}

/// Tracks the numbers of every run a receiver hears from.
#[derive(Debug)]
pub struct SequenceTracker {
    runs: HashMap<u64, Run>,
    run_limit: usize,
    /// What the numbers showed (`kernel_drops` is the socket's, counted by
    /// [`LossWatch`]).
    totals: Loss,
    /// Runs that fell silent since the last [`Self::take_fell_silent`].
    fell_silent: Vec<FellSilent>,
}

impl SequenceTracker {
    pub fn new(run_limit: usize) -> Self {
        SequenceTracker {
            runs: HashMap::new(),
            run_limit: run_limit.max(1),
            totals: Loss::default(),
            fell_silent: Vec::new(),
        }
    }

    /// The runs that fell silent since the last call.
    pub fn take_fell_silent(&mut self) -> Vec<FellSilent> {
        std::mem::take(&mut self.fell_silent)
    }

    pub fn totals(&self) -> Loss {
        self.totals
    }

    /// Runs in the table.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// Runs in the table that are silent now.
    pub fn silent_runs(&self) -> usize {
        self.runs.values().filter(|r| r.silent).count()
    }

    /// Adds the run of `instance` if it is new (making room), heard now.
    fn admit(&mut self, instance: u64, poll_id: u64, counter: u64, now: Instant) {
        if !self.runs.contains_key(&instance) {
            if self.runs.len() >= self.run_limit {
                self.evict_oldest();
            }
            self.totals.runs_heard += 1;
            self.runs.insert(instance, Run::new(poll_id, counter, now));
        }
    }

    /// Notes one record received at `now`: its run's `instance`, its
    /// `poll_id` and its `record_counter`.
    pub fn record(&mut self, instance: u64, poll_id: u64, counter: u64, now: Instant) {
        self.records(
            &[RecordId {
                instance,
                poll_id,
                record_counter: counter,
            }],
            now,
        );
    }

    /// Notes records received at `now`, looking their run up once for each
    /// stretch of records of one run (a datagram's records are one run's).
    pub fn records(&mut self, ids: &[RecordId], now: Instant) {
        for same in ids.chunk_by(|a, b| a.instance == b.instance) {
            let tracked = |id: &&RecordId| id.instance != 0 && id.record_counter != 0;
            let Some(first) = same.iter().find(tracked) else {
                self.totals.untracked += same.len() as u64;
                continue;
            };
            // Joined midway, the record itself is the first number known.
            self.admit(first.instance, first.poll_id, first.record_counter - 1, now);
            let (Some(run), totals) = (self.runs.get_mut(&first.instance), &mut self.totals) else {
                continue;
            };
            run.heard(now);
            for id in same {
                match id.record_counter {
                    0 => totals.untracked += 1,
                    counter => run.note(counter, now, totals),
                }
            }
        }
    }

    /// Notes a watermark received at `now`: every number of the run up to
    /// its `record_counter` was sent, so those missing are a hole; a run
    /// that stopped will send nothing more.
    pub fn watermark(&mut self, mark: &Watermark, now: Instant) {
        self.totals.watermarks += 1;
        if mark.instance == 0 {
            return;
        }
        self.admit(mark.instance, mark.poll_id, mark.record_counter, now);
        let (Some(run), totals) = (self.runs.get_mut(&mark.instance), &mut self.totals) else {
            return;
        };
        run.heard(now);
        if mark.record_counter > run.top {
            // The hole takes in the watermark's number too: it was sent.
            run.reach(mark.record_counter + 1, now, totals);
            run.top = mark.record_counter;
        }
        if run.hostname != mark.hostname {
            run.hostname.clone_from(&mark.hostname);
        }
        let interval = Duration::from_millis(mark.poll_interval_ms);
        run.quiet_limit = Some((interval * SILENT_INTERVALS).max(GRACE));
        if mark.stopped && run.stopped.is_none() {
            run.stopped = Some(now);
            totals.runs_stopped += 1;
        }
    }

    /// Counts as lost every hole missing for [`GRACE`] or more at `now`;
    /// counts runs that fell silent; forgets stopped runs whose holes are
    /// settled, and runs silent for [`FORGET_SILENT`].
    pub fn settle(&mut self, now: Instant) {
        let (totals, fell_silent) = (&mut self.totals, &mut self.fell_silent);
        self.runs.retain(|&instance, run| {
            let expired = run
                .holes
                .partition_point(|h| now.saturating_duration_since(h.since) >= GRACE);
            for hole in run.holes.drain(..expired) {
                totals.lost += hole.end - hole.start;
            }
            let quiet = now.saturating_duration_since(run.last_heard);
            match (run.stopped, run.quiet_limit) {
                (Some(stopped), _) => {
                    !run.holes.is_empty() || now.saturating_duration_since(stopped) < GRACE
                }
                (None, Some(limit)) if quiet >= limit => {
                    if !run.silent {
                        run.silent = true;
                        totals.runs_silent += 1;
                        fell_silent.push(FellSilent {
                            instance,
                            hostname: run.hostname.clone(),
                            quiet,
                        });
                    }
                    quiet < FORGET_SILENT
                }
                _ => true,
            }
        });
    }

    /// At a stop: every hole still open is lost.
    pub fn finish(&mut self) {
        for run in self.runs.values_mut() {
            for hole in run.holes.drain(..) {
                self.totals.lost += hole.end - hole.start;
            }
        }
    }

    fn evict_oldest(&mut self) {
        let Some(&oldest) = self
            .runs
            .iter()
            .min_by_key(|(_, run)| run.last_heard)
            .map(|(instance, _)| instance)
        else {
            return;
        };
        if let Some(run) = self.runs.remove(&oldest) {
            self.totals.lost += run.holes.iter().map(|h| h.end - h.start).sum::<u64>();
            self.totals.runs_evicted += 1;
        }
    }
}

/// How often a receiver settles holes and reads its socket's drop counter.
const WATCH_PERIOD: Duration = Duration::from_secs(1);

/// A receiver's [`SequenceTracker`] and its socket's drop counter, brought
/// up to date at most every second ([`Self::tick`]) so a busy receive loop
/// pays one clock read per datagram for it.
pub struct LossWatch {
    tracker: SequenceTracker,
    socket: UdpSocket,
    /// The socket's counter at the last read (a u32 that wraps).
    drops_seen: u32,
    kernel_drops: u64,
    last_tick: Instant,
}

impl LossWatch {
    /// Watches `socket` (a clone of the receiving socket).
    pub fn new(socket: UdpSocket, run_limit: usize) -> Self {
        LossWatch {
            tracker: SequenceTracker::new(run_limit),
            socket,
            drops_seen: 0,
            kernel_drops: 0,
            last_tick: Instant::now(),
        }
    }

    /// Notes the records of one datagram, received now.
    pub fn records(&mut self, ids: &[RecordId]) {
        self.tracker.records(ids, Instant::now());
    }

    /// Notes a watermark, received now.
    pub fn watermark(&mut self, mark: &Watermark) {
        self.tracker.watermark(mark, Instant::now());
    }

    pub fn runs(&self) -> usize {
        self.tracker.runs()
    }

    pub fn silent_runs(&self) -> usize {
        self.tracker.silent_runs()
    }

    /// Says on stderr, behind `program`, each run that fell silent since
    /// the last call.
    pub fn say_fell_silent(&mut self, program: &str) {
        for run in self.tracker.take_fell_silent() {
            xtcp_service::say!(
                "{program}: warning: run {} of {} fell silent: nothing from it for {:.1} s, \
                 and it did not say it stopped; what it sent after its last number heard \
                 is not counted",
                run.instance,
                run.hostname,
                run.quiet.as_secs_f64()
            );
        }
    }

    /// Settles old holes and reads the drop counter, if a period passed.
    pub fn tick(&mut self) -> Loss {
        let now = Instant::now();
        if now.duration_since(self.last_tick) >= WATCH_PERIOD {
            self.last_tick = now;
            self.tracker.settle(now);
            self.read_drops();
        }
        self.loss()
    }

    /// At a stop: every open hole is lost.
    pub fn finish(&mut self) -> Loss {
        self.tracker.finish();
        self.read_drops();
        self.loss()
    }

    fn read_drops(&mut self) {
        // Unreadable (no such entry before 4.7): the count stays at zero.
        if let Ok(Some(now)) = socket_drops(&self.socket) {
            self.kernel_drops += u64::from(now.wrapping_sub(self.drops_seen));
            self.drops_seen = now;
        }
    }

    fn loss(&self) -> Loss {
        Loss {
            kernel_drops: self.kernel_drops,
            ..self.tracker.totals()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(tracker: &mut SequenceTracker, instance: u64, numbers: &[u64], now: Instant) {
        for &n in numbers {
            tracker.record(instance, 1, n, now);
        }
    }

    #[test]
    fn interleaved_blocks_are_reordered_not_lost() {
        let mut t = SequenceTracker::new(8);
        let now = Instant::now();
        // Two threads' blocks: 4..6 arrives before 1..3.
        feed(&mut t, 7, &[4, 5, 6, 1, 2, 3, 7], now);
        t.finish();
        assert_eq!(
            t.totals(),
            Loss {
                reordered: 3,
                runs_heard: 1,
                ..Default::default()
            }
        );
    }

    fn mark(instance: u64, poll_id: u64, record_counter: u64, stopped: bool) -> Watermark {
        Watermark {
            schema_version: 5,
            instance,
            poll_id,
            record_counter,
            stopped,
            poll_interval_ms: 10_000,
            ..Default::default()
        }
    }

    /// The last records of a poll, and of a run, are lost with no later
    /// number to show it: the watermark shows it, within the grace.
    #[test]
    fn a_watermark_shows_a_lost_tail() {
        let mut t = SequenceTracker::new(8);
        let now = Instant::now();
        feed(&mut t, 7, &[1, 2, 3], now);
        // Poll 1 ended at 5: 4 and 5 are missing; 4 comes late.
        t.watermark(&mark(7, 1, 5, false), now);
        t.record(7, 1, 4, now);
        t.settle(now + GRACE);
        assert_eq!((t.totals().lost, t.totals().reordered), (1, 1));
        // A repeated or older watermark changes nothing.
        t.watermark(&mark(7, 1, 5, false), now + GRACE);
        t.watermark(&mark(7, 1, 2, false), now + GRACE);
        // Poll 2 numbered 6..=9, of which only 6 arrived; then the stop.
        t.record(7, 2, 6, now + GRACE);
        t.watermark(&mark(7, 2, 9, true), now + GRACE);
        t.settle(now + GRACE * 3 / 2);
        assert_eq!(t.totals().lost, 1, "within the grace");
        assert_eq!(t.runs(), 1);
        t.settle(now + GRACE * 2);
        let totals = t.totals();
        assert_eq!((totals.lost, totals.runs_stopped), (4, 1));
        assert_eq!((totals.watermarks, totals.runs_heard), (4, 1));
        assert_eq!(t.runs(), 0, "a stopped run is forgotten once settled");
        assert_eq!(totals.runs_silent, 0);
    }

    /// A run first heard by a watermark of its first poll lost everything
    /// before it; one of a later poll was joined midway.
    #[test]
    fn a_run_first_heard_by_its_watermark() {
        let mut t = SequenceTracker::new(8);
        let now = Instant::now();
        t.watermark(&mark(1, 1, 4, false), now);
        t.watermark(&mark(2, 3, 400, false), now);
        t.finish();
        assert_eq!((t.totals().lost, t.totals().runs_heard), (4, 2));
    }

    /// A run unheard for three poll intervals (at least the grace) without
    /// a stop is silent, counted once; heard again it is live; after
    /// FORGET_SILENT it leaves the table. A run that never sent a
    /// watermark (an older exporter) is never called silent.
    #[test]
    fn a_run_that_stops_talking_is_silent() {
        let mut t = SequenceTracker::new(8);
        let now = Instant::now();
        t.record(7, 1, 1, now);
        t.watermark(&mark(7, 1, 1, false), now);
        t.record(8, 1, 1, now);
        t.settle(now + Duration::from_secs(29));
        assert_eq!((t.totals().runs_silent, t.silent_runs()), (0, 0));
        t.settle(now + Duration::from_secs(30));
        t.settle(now + Duration::from_secs(31));
        assert_eq!((t.totals().runs_silent, t.silent_runs()), (1, 1));
        let said = t.take_fell_silent();
        assert_eq!(said.len(), 1, "once: {said:?}");
        assert_eq!(
            (said[0].instance, said[0].quiet),
            (7, Duration::from_secs(30))
        );
        assert!(t.take_fell_silent().is_empty());
        t.record(7, 2, 2, now + Duration::from_secs(32));
        assert_eq!(t.silent_runs(), 0);
        t.settle(now + Duration::from_secs(62));
        assert_eq!((t.totals().runs_silent, t.silent_runs()), (2, 1));
        t.settle(now + FORGET_SILENT + Duration::from_secs(32));
        assert_eq!(t.runs(), 1, "run 8, which never said its interval");
        assert_eq!(t.totals().lost, 0);
    }

    #[test]
    fn holes_count_as_lost_after_the_grace_or_at_the_end() {
        let mut t = SequenceTracker::new(8);
        let now = Instant::now();
        feed(&mut t, 7, &[1, 2, 5, 6, 9, 10, 8], now);
        // Missing: 3, 4, 7. 8 filled part of the 7..9 hole.
        t.settle(now + GRACE / 2);
        assert_eq!(t.totals().lost, 0, "still within the grace");
        t.settle(now + GRACE);
        assert_eq!((t.totals().lost, t.totals().reordered), (3, 1));
        // A number that comes after its hole was given up is a duplicate
        // now (its loss stays counted), as is a number seen twice.
        feed(&mut t, 7, &[3, 10], now + GRACE);
        assert_eq!(t.totals().duplicated, 2);
        feed(&mut t, 7, &[13], now + GRACE);
        t.finish();
        assert_eq!(t.totals().lost, 5, "11 and 12 at the end");
    }

    #[test]
    fn a_hole_filled_in_the_middle_splits() {
        let mut t = SequenceTracker::new(8);
        let now = Instant::now();
        feed(&mut t, 7, &[1, 10, 5, 2, 9, 5], now);
        t.finish();
        // Missing 3, 4, 6, 7, 8; 5 came twice.
        let totals = t.totals();
        assert_eq!(
            (totals.lost, totals.reordered, totals.duplicated),
            (5, 3, 1)
        );
    }

    #[test]
    fn a_run_joined_midway_counts_nothing_before_it() {
        let mut t = SequenceTracker::new(8);
        let now = Instant::now();
        t.record(7, 3, 500, now);
        t.record(7, 3, 501, now);
        // Its first poll: what it numbered before is missing.
        t.record(8, 1, 3, now);
        t.finish();
        assert_eq!(t.totals().lost, 2);
        // No instance: an old exporter, not tracked.
        t.record(0, 1, 1, now);
        assert_eq!(t.totals().untracked, 1);
    }

    #[test]
    fn the_table_is_bounded_and_evicts_the_quietest_run() {
        let mut t = SequenceTracker::new(2);
        let now = Instant::now();
        feed(&mut t, 1, &[1, 3], now);
        feed(&mut t, 2, &[1], now + Duration::from_secs(1));
        feed(&mut t, 3, &[1], now + Duration::from_secs(2));
        assert_eq!(t.runs(), 2);
        let totals = t.totals();
        assert_eq!(
            (totals.runs_evicted, totals.lost),
            (1, 1),
            "run 1 and its hole"
        );
        // Heard from again, run 1 starts over: midway, so nothing before.
        t.record(1, 2, 4, now + Duration::from_secs(3));
        assert_eq!(t.totals().runs_evicted, 2);
    }

    #[test]
    fn holes_per_run_are_bounded() {
        let mut t = SequenceTracker::new(1);
        let now = Instant::now();
        let odd: Vec<u64> = (0..=HOLE_LIMIT as u64 + 1).map(|i| 2 * i + 1).collect();
        feed(&mut t, 7, &odd, now);
        assert_eq!(t.totals().lost, 1, "the oldest hole, early");
        t.finish();
        assert_eq!(t.totals().lost, HOLE_LIMIT as u64 + 1);
    }
}
