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
//! Memory is bounded: at most `run_limit` runs (the one heard from longest
//! ago is evicted, its holes counted lost) and [`HOLE_LIMIT`] holes per run
//! (the oldest is counted lost early). A run is a handful of words plus its
//! holes, which are few: a hole is one range of numbers, however long.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use crate::export::udp::socket_drops;
use crate::proto::Record;

/// How long a number may be missing after a later one arrived before it
/// counts as lost. Reordering on a host or a LAN takes microseconds; this
/// leaves room for an exporter thread that was descheduled mid-poll.
pub const GRACE: Duration = Duration::from_secs(5);

/// Open holes kept per run; beyond this the oldest is counted lost early.
pub const HOLE_LIMIT: usize = 1024;

/// Runs tracked by default: plenty for the exporters one receiver serves.
pub const DEFAULT_RUN_LIMIT: usize = 4096;

/// What the tracked numbers showed, since the receiver started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SequenceTotals {
    /// Numbers that never arrived (see the module's rules).
    pub lost: u64,
    /// Records whose number had already arrived (or had been counted lost).
    pub duplicated: u64,
    /// Records that arrived after a higher number of their run.
    pub reordered: u64,
    /// Records without an instance or a number (schema 2 or older, or not
    /// an exporter's): not tracked.
    pub untracked: u64,
    /// Runs dropped from the table to make room; their holes were counted
    /// lost then.
    pub runs_evicted: u64,
}

impl SequenceTotals {
    /// `lost N duplicated N ...`: the words of the receivers' exit lines.
    pub fn exit_fields(&self) -> [(&'static str, u64); 5] {
        [
            ("lost", self.lost),
            ("duplicated", self.duplicated),
            ("reordered", self.reordered),
            ("untracked", self.untracked),
            ("runs_evicted", self.runs_evicted),
        ]
    }
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
    /// The highest number received.
    top: u64,
    /// Ascending and disjoint, all below `top`. New holes open above every
    /// other, so they are also in the order they opened.
    holes: Vec<Hole>,
    last_heard: Instant,
}

/// Tracks the numbers of every run a receiver hears from.
#[derive(Debug)]
pub struct SequenceTracker {
    runs: HashMap<u64, Run>,
    run_limit: usize,
    totals: SequenceTotals,
}

impl SequenceTracker {
    pub fn new(run_limit: usize) -> Self {
        SequenceTracker {
            runs: HashMap::new(),
            run_limit: run_limit.max(1),
            totals: SequenceTotals::default(),
        }
    }

    pub fn totals(&self) -> SequenceTotals {
        self.totals
    }

    /// Runs in the table.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// Notes one record received at `now`: its run's `instance`, its
    /// `poll_id` and its `record_counter`.
    pub fn record(&mut self, instance: u64, poll_id: u64, counter: u64, now: Instant) {
        if instance == 0 || counter == 0 {
            self.totals.untracked += 1;
            return;
        }
        if !self.runs.contains_key(&instance) && self.runs.len() >= self.run_limit {
            self.evict_oldest();
        }
        let totals = &mut self.totals;
        let run = self.runs.entry(instance).or_insert_with(|| Run {
            // A run first heard in its first poll started while we listened:
            // what it numbered before is missing. Later, we joined midway
            // and know nothing of the numbers before this one.
            top: if poll_id == 1 { 0 } else { counter - 1 },
            holes: Vec::new(),
            last_heard: now,
        });
        run.last_heard = now;
        if counter > run.top {
            if counter > run.top + 1 {
                run.holes.push(Hole {
                    start: run.top + 1,
                    end: counter,
                    since: now,
                });
                if run.holes.len() > HOLE_LIMIT {
                    let oldest = run.holes.remove(0);
                    totals.lost += oldest.end - oldest.start;
                }
            }
            run.top = counter;
            return;
        }
        let i = run.holes.partition_point(|h| h.end <= counter);
        match run.holes.get_mut(i) {
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
                    run.holes.insert(i + 1, upper);
                }
                if run.holes[i].start == run.holes[i].end {
                    run.holes.remove(i);
                }
            }
            _ => totals.duplicated += 1,
        }
    }

    /// Counts as lost every hole missing for [`GRACE`] or more at `now`.
    pub fn settle(&mut self, now: Instant) {
        for run in self.runs.values_mut() {
            let expired = run
                .holes
                .partition_point(|h| now.saturating_duration_since(h.since) >= GRACE);
            for hole in run.holes.drain(..expired) {
                self.totals.lost += hole.end - hole.start;
            }
        }
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

/// What a receiver of the feed knows about loss: the kernel's drops on its
/// socket and the numbers that never arrived.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Loss {
    pub sequence: SequenceTotals,
    /// Datagrams the kernel dropped on the receiver's socket (full receive
    /// buffer); their records are also among `sequence.lost`.
    pub kernel_drops: u64,
}

impl Loss {
    /// ` kernel_drops N lost N duplicated N ...` for an exit line.
    pub fn exit_fields(&self) -> String {
        let mut out = format!(" kernel_drops {}", self.kernel_drops);
        for (key, value) in self.sequence.exit_fields() {
            out.push_str(&format!(" {key} {value}"));
        }
        out
    }
}

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
    pub fn records(&mut self, records: impl IntoIterator<Item = RecordId>) {
        let now = Instant::now();
        for r in records {
            self.tracker
                .record(r.instance, r.poll_id, r.record_counter, now);
        }
    }

    /// Notes `n` records received but not read (so not tracked).
    pub fn unread(&mut self, n: u64) {
        self.tracker.totals.untracked += n;
    }

    pub fn runs(&self) -> usize {
        self.tracker.runs()
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
            sequence: self.tracker.totals(),
            kernel_drops: self.kernel_drops,
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
            SequenceTotals {
                reordered: 3,
                ..Default::default()
            }
        );
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
