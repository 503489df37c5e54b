//! Prometheus metrics declared as tables: [`metrics_table!`] makes a struct
//! of metrics and their [`Definition`]s from one row per metric (name, type,
//! labels, help), which every xtcp program uses for its own; [`undocumented`]
//! is the test that the program's docs describe each; [`Health`] is what
//! `/healthz` reports.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::{
    CounterVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

/// Bucket bounds (seconds) for poll and dump durations: a poll of a few
/// sockets takes well under a millisecond, a million sockets a few seconds,
/// and anything near a minute is a stuck kernel or destination.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Metric types as Prometheus names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric of the table.
#[derive(Debug, Clone, Copy)]
pub struct Definition {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

/// How each metric type is built from its table row.
pub trait Make: Collector + Clone + Sized + 'static {
    const KIND: Kind;
    fn make(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<Self>;
}

impl Make for IntCounter {
    const KIND: Kind = Kind::Counter;
    fn make(name: &str, help: &str, _: &[&str]) -> prometheus::Result<Self> {
        IntCounter::new(name, help)
    }
}

impl Make for IntCounterVec {
    const KIND: Kind = Kind::Counter;
    fn make(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<Self> {
        IntCounterVec::new(Opts::new(name, help), labels)
    }
}

impl Make for IntGauge {
    const KIND: Kind = Kind::Gauge;
    fn make(name: &str, help: &str, _: &[&str]) -> prometheus::Result<Self> {
        IntGauge::new(name, help)
    }
}

impl Make for IntGaugeVec {
    const KIND: Kind = Kind::Gauge;
    fn make(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<Self> {
        IntGaugeVec::new(Opts::new(name, help), labels)
    }
}

impl Make for CounterVec {
    const KIND: Kind = Kind::Counter;
    fn make(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<Self> {
        CounterVec::new(Opts::new(name, help), labels)
    }
}

impl Make for HistogramVec {
    const KIND: Kind = Kind::Histogram;
    fn make(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<Self> {
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec()),
            labels,
        )
    }
}

/// Declares a set of metrics: a struct holding each one and its registry,
/// and a table of their definitions (for docs and tests). Every xtcp
/// program declares its own with it; the caller depends on `prometheus`.
#[macro_export]
macro_rules! metrics_table {
    (
        $(#[$doc:meta])* pub struct $name:ident;
        pub const $defs:ident;
        $($field:ident: $ty:ident $metric:literal [$($label:literal),*] $help:literal;)*
    ) => {
        $(#[$doc])*
        pub struct $name {
            registry: ::prometheus::Registry,
            $(pub $field: $ty,)*
        }

        /// Every metric, in the order of the table.
        pub const $defs: &[$crate::metrics::Definition] = &[$($crate::metrics::Definition {
            name: $metric,
            kind: <$ty as $crate::metrics::Make>::KIND,
            labels: &[$($label),*],
            help: $help,
        },)*];

        impl $name {
            /// Registers every metric of the table in a new registry.
            fn register() -> ::prometheus::Result<Self> {
                let registry = ::prometheus::Registry::new();
                $(
                    let $field = <$ty as $crate::metrics::Make>::make($metric, $help, &[$($label),*])?;
                    registry.register(Box::new($field.clone()))?;
                )*
                Ok($name { registry, $($field,)* })
            }

            pub fn registry(&self) -> &::prometheus::Registry {
                &self.registry
            }
        }
    };
}

/// The metrics of `definitions` that `doc` has no table row for (a row
/// starts with the metric's name in backquotes), or whose row does not name
/// each of its labels.
pub fn undocumented(definitions: &[Definition], doc: &str) -> Vec<String> {
    definitions
        .iter()
        .filter(|d| {
            let row = doc_row(doc, d.name);
            row.is_none_or(|row| !d.labels.iter().all(|l| row.contains(&format!("`{l}`"))))
        })
        .map(|d| d.name.to_string())
        .collect()
}

/// The table row of `doc` describing `metric`.
pub fn doc_row<'a>(doc: &'a str, metric: &str) -> Option<&'a str> {
    doc.lines()
        .find(|l| l.starts_with(&format!("| `{metric}` ")))
}

/// Whether something keeps happening (polls completing, messages
/// delivered), for `/healthz`.
pub struct Health {
    /// What happens, as in "last poll completed".
    what: &'static str,
    started: Instant,
    /// Nanoseconds after `started` of the last time it happened; 0 before
    /// the first.
    last_ns: AtomicU64,
}

impl Health {
    pub fn new(what: &'static str) -> Self {
        Health {
            what,
            started: Instant::now(),
            last_ns: AtomicU64::new(0),
        }
    }

    pub fn happened(&self) {
        let ns = self.started.elapsed().as_nanos() as u64;
        self.last_ns.store(ns.max(1), Relaxed);
    }

    /// `Ok` with a status line while the last time it happened (or the
    /// start, before the first) is at most `stale_after` ago, `Err` once it
    /// is older.
    pub fn check(&self, stale_after: Duration) -> Result<String, String> {
        let now = self.started.elapsed();
        let last = self.last_ns.load(Relaxed);
        let line = if last == 0 {
            format!("no {} yet, started", self.what)
        } else {
            format!("last {}", self.what)
        };
        let since = now.saturating_sub(Duration::from_nanos(last));
        let line = format!("{line} {:.1} s ago", since.as_secs_f64());
        if since <= stale_after {
            Ok(format!("ok: {line}"))
        } else {
            Err(format!(
                "stale: {line} (limit {})",
                humantime::format_duration(stale_after)
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_goes_stale_when_nothing_happens() {
        let health = Health::new("poll completed");
        let fresh = health.check(Duration::from_secs(60)).unwrap();
        assert!(
            fresh.starts_with("ok: no poll completed yet, started"),
            "{fresh}"
        );
        health.happened();
        std::thread::sleep(Duration::from_millis(5));
        let ok = health.check(Duration::from_secs(60)).unwrap();
        assert!(ok.starts_with("ok: last poll completed 0.0 s ago"), "{ok}");
        let stale = health.check(Duration::from_millis(1)).unwrap_err();
        assert!(stale.starts_with("stale: last poll completed"), "{stale}");
        assert!(stale.ends_with("(limit 1ms)"), "{stale}");
    }
}
