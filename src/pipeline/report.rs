//! What the poller says about each poll and, at exit, about the whole run:
//! one line per poll with `--verbose`, a warning line for anything that went
//! wrong, and a totals line when the exporter stops. Runs on the poller thread.

use std::fmt::{self, Write as _};
use std::time::Duration;

use crate::config::Family;
use crate::counting::{CloseTotals, DumpReport, DumpTotals};
use xtcp_service::counters::Tally;

/// Sums over every poll of the run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunTotals {
    pub polls: u64,
    /// Polls longer than `--polling-safety-buffer` x `--frequency`.
    pub long_polls: u64,
    pub families: Vec<(Family, DumpTotals)>,
    /// Datagrams (all families) that belonged to no current dump.
    pub stale_datagrams: u64,
    /// Selected namespaces that could not be polled, once per poll each.
    pub netns_errors: u64,
    /// With `--close-records`: what the closer did.
    pub closes: Option<CloseTotals>,
    /// Watermarks sent (after each poll and at the stop, `--dest udp:`),
    /// and those whose send failed.
    pub watermarks: u64,
    pub watermark_errors: u64,
}

impl RunTotals {
    /// Everything lost or skipped for a fault over the run: what the poll
    /// warnings name, the namespaces that could not be polled, and stale
    /// datagrams. 0 means every poll was whole.
    pub fn losses(&self) -> u64 {
        let dumps: u64 = self
            .families
            .iter()
            .flat_map(|(_, t)| t.problems())
            .map(|(n, _)| n)
            .sum();
        dumps + self.netns_errors + self.stale_datagrams
    }

    pub fn add_poll(&mut self, reports: &[DumpReport], long: bool) {
        self.polls += 1;
        self.long_polls += u64::from(long);
        for r in reports {
            match self.families.iter_mut().find(|(f, _)| *f == r.family) {
                Some((_, t)) => t.add(&r.totals),
                None => self.families.push((r.family, r.totals)),
            }
        }
    }
}

impl fmt::Display for RunTotals {
    /// `polls 3 long_polls 0 | v4 sockets 10 sampled 10 records 10 ...`:
    /// `key value` pairs, easy to read and to grep.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "polls {} long_polls {} stale_datagrams {} netns_errors {} watermarks {} \
             watermark_errors {}",
            self.polls,
            self.long_polls,
            self.stale_datagrams,
            self.netns_errors,
            self.watermarks,
            self.watermark_errors
        )?;
        for (family, t) in &self.families {
            write!(f, " | {}", family.name())?;
            for (key, value) in t.exit_fields() {
                write!(f, " {key} {value}")?;
            }
        }
        if let Some(closes) = &self.closes {
            write!(f, " | closes")?;
            for (key, value) in closes.exit_fields() {
                write!(f, " {key} {value}")?;
            }
        }
        Ok(())
    }
}

/// Says on stderr the first error of each kind, behind `prefix`; the rest
/// are only counted, so a storm of them is one line each.
#[derive(Debug)]
pub struct FirstOfEach {
    prefix: &'static str,
    said: Vec<&'static str>,
}

impl FirstOfEach {
    pub fn new(prefix: &'static str) -> Self {
        FirstOfEach {
            prefix,
            said: Vec::new(),
        }
    }

    pub fn say(&mut self, kind: &'static str, e: &dyn fmt::Display) {
        if !self.said.contains(&kind) {
            self.said.push(kind);
            xtcp_service::say!("{}: {kind}: {e}", self.prefix);
        }
    }
}

/// The `--verbose` line of one poll; `buffers` are the receive buffers each
/// family has allocated so far.
pub fn poll_line(
    poll_id: u64,
    reports: &[DumpReport],
    buffers: &[usize],
    took: Duration,
) -> String {
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let mut line = format!("poll {poll_id}:");
    for (r, buffers) in reports.iter().zip(buffers) {
        let t = &r.totals;
        let done = r.done_after.map_or("never".into(), ms);
        let _ = write!(
            line,
            " {} {} sockets {} records {} datagrams, NLMSG_DONE {done}, sent {}, {buffers} buffers;",
            r.family.name(),
            t.sockets,
            t.records,
            t.sent_datagrams,
            ms(r.finished_after),
        );
    }
    let _ = write!(line, " poll {}", ms(took));
    line
}

/// A warning for a dump that lost or skipped anything, `None` if it was clean.
pub fn dump_warning(poll_id: u64, r: &DumpReport) -> Option<String> {
    let problems: Vec<String> = r
        .totals
        .problems()
        .into_iter()
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    if problems.is_empty() {
        return None;
    }
    let mut line = format!(
        "warning: poll {poll_id} {}: {}",
        r.family.name(),
        problems.join(", ")
    );
    if !r.first_errors.is_empty() {
        let _ = write!(line, "; first {}", r.first_errors.join("; "));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::request::AF_INET;

    fn report(totals: DumpTotals) -> DumpReport {
        DumpReport {
            family: Family {
                af: AF_INET,
                netlinkers: 1,
                inetdiagers: 1,
            },
            netns_inode: 0,
            totals,
            tcp_info_lengths: Default::default(),
            done_after: None,
            finished_after: Duration::from_millis(3),
            kernel_time: Duration::from_millis(1),
            first_errors: vec!["send: Connection refused".into()],
        }
    }

    #[test]
    fn warnings_name_what_was_lost() {
        let clean = report(DumpTotals {
            sockets: 5,
            records: 5,
            ..Default::default()
        });
        assert_eq!(dump_warning(1, &clean), None);
        let lossy = report(DumpTotals {
            send_errors: 2,
            records_lost: 2,
            ..Default::default()
        });
        let w = dump_warning(4, &lossy).unwrap();
        assert!(
            w.starts_with("warning: poll 4 v4: 2 failed sends, 2 records lost"),
            "{w}"
        );
        assert!(w.ends_with("first send: Connection refused"), "{w}");
    }

    #[test]
    fn totals_add_up_per_family() {
        let mut run = RunTotals::default();
        let r = report(DumpTotals {
            sockets: 5,
            records: 4,
            ..Default::default()
        });
        run.add_poll(std::slice::from_ref(&r), false);
        run.add_poll(std::slice::from_ref(&r), true);
        assert_eq!((run.polls, run.long_polls), (2, 1));
        assert_eq!(run.families[0].1.sockets, 10);
        let line = run.to_string();
        assert!(line.starts_with("polls 2 long_polls 1"), "{line}");
        assert!(
            line.contains("| v4 sockets 10 sampled 0 records 8 "),
            "{line}"
        );
    }
}
