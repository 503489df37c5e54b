//! Counters declared as tables: the one way every xtcp program declares what
//! it counts.
//!
//! A [`counters!`](crate::counters) table has one entry per counter. The
//! entry says what it counts and where it is shown, and everything else
//! follows from it:
//! - the table's struct of totals (a [`Tally`]) gets a `u64` field, which
//!   the code counting it adds to; [`Shared`] holds the same fields as
//!   atomics for threads that count together;
//! - Prometheus gets a series ([`CounterMetrics`] registers them): a metric of
//!   its own, or one label value of a metric several entries share, whose
//!   help then lists each value's; statsd, which sends what changed in the
//!   registry, follows;
//! - the exit line gets a `key value` pair ([`Tally::exit_fields`]), entries
//!   with the same key summed;
//! - a warning names it when it is not zero ([`Tally::problems`]);
//! - the docs must have a row for its metric ([`undocumented`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus::core::{AtomicF64, GenericCounter};
use prometheus::{CounterVec, IntCounter, IntCounterVec, Opts, Registry};

/// How a counter's value becomes its Prometheus series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// As counted.
    Count,
    /// Counted in nanoseconds, shown in seconds (Prometheus) and
    /// milliseconds (exit line, whose key ends in `_ms`).
    Nanos,
    /// Counted per event, shown as the number of tallies (dumps) where any
    /// happened.
    Dumps,
}

/// One entry of a table.
#[derive(Debug, Clone, Copy)]
pub struct Counter {
    /// Its field of the table's struct.
    pub name: &'static str,
    /// What it counts: a sentence, or for a counter that shares its metric,
    /// a phrase that follows its label value.
    pub help: &'static str,
    /// Its Prometheus metric, if it has one; several counters may share
    /// one, told apart by `label`.
    pub metric: Option<&'static str>,
    /// The metric's own label (after any the program adds, such as
    /// `family`) and this counter's value of it.
    pub label: Option<(&'static str, &'static str)>,
    pub unit: Unit,
    /// Key on the exit line.
    pub exit: Option<&'static str>,
    /// Words of the warning, after the number.
    pub warning: Option<&'static str>,
}

/// A table: its entries and the opening words of each metric that several
/// entries share.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub counters: &'static [Counter],
    pub shared: &'static [(&'static str, &'static str)],
}

impl Counter {
    /// The value Prometheus shows for `value` counted.
    pub fn metric_value(&self, value: u64) -> f64 {
        match self.unit {
            Unit::Count => value as f64,
            Unit::Nanos => value as f64 / 1e9,
            Unit::Dumps => f64::from(u8::from(value > 0)),
        }
    }

    /// The value the exit line shows for `value` counted.
    pub fn exit_value(&self, value: u64) -> u64 {
        match self.unit {
            Unit::Nanos => value / 1_000_000,
            Unit::Count | Unit::Dumps => value,
        }
    }
}

impl Table {
    /// The entries that have a metric, each metric once (at its first
    /// entry), with every entry of that metric.
    pub fn metrics(&self) -> impl Iterator<Item = (&'static str, Vec<&'static Counter>)> + '_ {
        let counters = self.counters;
        counters.iter().enumerate().filter_map(move |(i, c)| {
            let metric = c.metric?;
            let first = counters.iter().position(|o| o.metric == Some(metric));
            (first == Some(i)).then(|| {
                let all = counters.iter().filter(|o| o.metric == Some(metric));
                (metric, all.collect())
            })
        })
    }

    /// The help of `metric`: its entry's own, or for a metric several
    /// entries share, its opening words and each label value (written by
    /// `value`) with the help of the entries that have it.
    pub fn metric_help(&self, metric: &str, value: impl Fn(&str) -> String) -> String {
        let entries: Vec<&Counter> = self
            .counters
            .iter()
            .filter(|c| c.metric == Some(metric))
            .collect();
        let Some((_, lead)) = self.shared.iter().find(|(m, _)| *m == metric) else {
            return entries
                .first()
                .map_or_else(String::new, |c| c.help.to_string());
        };
        let mut parts: Vec<(&str, Vec<&str>)> = Vec::new();
        for c in entries {
            let v = c.label.map_or("", |(_, v)| v);
            match parts.iter_mut().find(|(p, _)| *p == v) {
                Some((_, helps)) => helps.push(c.help),
                None => parts.push((v, vec![c.help])),
            }
        }
        let parts: Vec<String> = parts
            .iter()
            .map(|(v, helps)| format!("{}: {}", value(v), helps.join(", or ")))
            .collect();
        format!("{lead} {}.", parts.join("; "))
    }
}

/// A table's struct of totals: what a thread counted, or a sum of such.
/// [`counters!`](crate::counters) implements it.
pub trait Tally: Default + Copy + PartialEq + std::fmt::Debug + 'static {
    const TABLE: Table;

    /// Every field, in table order.
    fn values(&self) -> impl Iterator<Item = u64>;

    /// Every field, in table order, to write.
    fn values_mut(&mut self) -> impl Iterator<Item = &mut u64>;

    fn add(&mut self, other: &Self) {
        for (sum, v) in self.values_mut().zip(other.values()) {
            *sum += v;
        }
    }

    /// What was counted since `before`, a tally of the same counts taken
    /// earlier.
    fn since(&self, before: &Self) -> Self {
        let mut delta = *self;
        for (d, b) in delta.values_mut().zip(before.values()) {
            *d -= b;
        }
        delta
    }

    /// Sets the field of entry `index`.
    fn set(&mut self, index: usize, value: u64) {
        if let Some(field) = self.values_mut().nth(index) {
            *field = value;
        }
    }

    /// The exit line's `(key, value)` pairs, in table order, entries with
    /// the same key summed.
    fn exit_fields(&self) -> Vec<(&'static str, u64)> {
        group(
            Self::TABLE
                .counters
                .iter()
                .zip(self.values())
                .filter_map(|(c, v)| Some((c.exit?, c.exit_value(v)))),
        )
    }

    /// `(number, words)` of what went wrong, for a warning; empty when
    /// nothing did.
    fn problems(&self) -> Vec<(u64, &'static str)> {
        group(
            Self::TABLE
                .counters
                .iter()
                .zip(self.values())
                .filter_map(|(c, v)| Some((c.warning?, v))),
        )
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(words, n)| (n, words))
        .collect()
    }
}

/// `" key value"` for each pair of every part, pairs with the same key
/// summed (an exit line made of several tables' fields).
pub fn exit_line(parts: &[Vec<(&'static str, u64)>]) -> String {
    group(parts.iter().flatten().copied())
        .iter()
        .map(|(k, v)| format!(" {k} {v}"))
        .collect()
}

/// Sums `(key, value)` pairs by key, keeping the order of first appearance.
fn group(keyed: impl Iterator<Item = (&'static str, u64)>) -> Vec<(&'static str, u64)> {
    let mut groups: Vec<(&str, u64)> = Vec::new();
    for (key, value) in keyed {
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, sum)) => *sum += value,
            None => groups.push((key, value)),
        }
    }
    groups
}

/// A tally's fields as atomics, for threads that count together.
#[derive(Debug)]
pub struct Shared<T: Tally> {
    values: Box<[AtomicU64]>,
    _tally: std::marker::PhantomData<T>,
}

impl<T: Tally> Default for Shared<T> {
    fn default() -> Self {
        Shared {
            values: T::TABLE
                .counters
                .iter()
                .map(|_| AtomicU64::new(0))
                .collect(),
            _tally: std::marker::PhantomData,
        }
    }
}

impl<T: Tally> Shared<T> {
    /// Adds a thread's tally (one atomic add per non-zero field).
    pub fn add(&self, tally: &T) {
        for (a, v) in self.values.iter().zip(tally.values()) {
            if v != 0 {
                a.fetch_add(v, Relaxed);
            }
        }
    }

    /// Adds one event to a single counter: `field` picks it.
    pub fn count(&self, field: impl FnOnce(&mut T) -> &mut u64) {
        let mut tally = T::default();
        *field(&mut tally) += 1;
        self.add(&tally);
    }

    pub fn snapshot(&self) -> T {
        let mut tally = T::default();
        for (v, a) in tally.values_mut().zip(self.values.iter()) {
            *v = a.load(Relaxed);
        }
        tally
    }
}

/// The Prometheus metric behind an entry.
#[derive(Clone)]
enum Series {
    Whole(IntCounterVec),
    Seconds(CounterVec),
}

/// A series of an entry, its label values given.
#[derive(Clone)]
enum Child {
    Whole(IntCounter),
    Seconds(GenericCounter<AtomicF64>),
}

impl Child {
    fn add(&self, value: f64) {
        match self {
            Child::Whole(c) => c.inc_by(value as u64),
            Child::Seconds(c) => c.inc_by(value),
        }
    }
}

impl Series {
    fn child(&self, values: &[&str]) -> Child {
        match self {
            Series::Whole(c) => Child::Whole(c.with_label_values(values)),
            Series::Seconds(c) => Child::Seconds(c.with_label_values(values)),
        }
    }
}

/// A table's metrics in a registry. Each series carries first the labels
/// the program gives (`leading`, such as `family`), then the entry's own.
pub struct CounterMetrics<T: Tally> {
    /// One per entry (`None`: no metric), in table order.
    series: Vec<Option<Series>>,
    /// The series of each entry for a table without leading labels, so
    /// adding is an atomic add per field.
    children: Vec<Option<Child>>,
    /// Everything added, whatever the leading label values, per entry
    /// (entries sharing a series stay apart here).
    totals: Shared<T>,
}

impl<T: Tally> CounterMetrics<T> {
    /// Registers a metric per distinct metric of the table; without
    /// `leading` labels every series exists (at zero) from the start.
    pub fn register(registry: &Registry, leading: &[&str]) -> prometheus::Result<Self> {
        let counters = T::TABLE.counters;
        let mut series: Vec<Option<Series>> = Vec::with_capacity(counters.len());
        for (i, counter) in counters.iter().enumerate() {
            let Some(metric) = counter.metric else {
                series.push(None);
                continue;
            };
            if let Some(j) = counters[..i].iter().position(|c| c.metric == Some(metric)) {
                series.push(series[j].clone());
                continue;
            }
            let labels: Vec<&str> = leading
                .iter()
                .copied()
                .chain(counter.label.map(|(l, _)| l))
                .collect();
            let opts = Opts::new(metric, T::TABLE.metric_help(metric, str::to_string));
            let made = match counter.unit {
                Unit::Nanos => {
                    let c = CounterVec::new(opts, &labels)?;
                    registry.register(Box::new(c.clone()))?;
                    Series::Seconds(c)
                }
                Unit::Count | Unit::Dumps => {
                    let c = IntCounterVec::new(opts, &labels)?;
                    registry.register(Box::new(c.clone()))?;
                    Series::Whole(c)
                }
            };
            series.push(Some(made));
        }
        let mut metrics = CounterMetrics {
            series,
            children: Vec::new(),
            totals: Shared::default(),
        };
        if leading.is_empty() {
            metrics.children = metrics.children_of(&[]);
        }
        Ok(metrics)
    }

    fn children_of(&self, leading: &[&str]) -> Vec<Option<Child>> {
        T::TABLE
            .counters
            .iter()
            .zip(&self.series)
            .map(|(c, s)| {
                let values: Vec<&str> = leading
                    .iter()
                    .copied()
                    .chain(c.label.map(|(_, v)| v))
                    .collect();
                s.as_ref().map(|s| s.child(&values))
            })
            .collect()
    }

    /// Creates the series of `leading` label values at zero, so a scrape
    /// before anything was counted shows them.
    pub fn touch(&self, leading: &[&str]) {
        self.children_of(leading);
    }

    /// Adds a tally to the series of `leading` label values (none for a
    /// table registered without).
    pub fn add(&self, leading: &[&str], tally: &T) {
        self.totals.add(tally);
        let made;
        let children = if leading.is_empty() {
            &self.children
        } else {
            made = self.children_of(leading);
            &made
        };
        for ((c, child), v) in T::TABLE.counters.iter().zip(children).zip(tally.values()) {
            if let (Some(child), true) = (child, v != 0) {
                child.add(c.metric_value(v));
            }
        }
    }

    /// Everything added so far, summed over the leading label values.
    pub fn totals(&self) -> T {
        self.totals.snapshot()
    }
}

/// The metrics of `T`'s table that `doc` has no table row for, or whose row
/// does not name each label (`leading` and the entry's own) and label value.
pub fn undocumented<T: Tally>(doc: &str, leading: &[&str]) -> Vec<String> {
    T::TABLE
        .metrics()
        .filter(|(metric, entries)| {
            let Some(row) = crate::metrics::doc_row(doc, metric) else {
                return true;
            };
            let named = |w: &str| row.contains(&format!("`{w}`"));
            let own = entries.iter().filter_map(|c| c.label);
            !(leading.iter().all(|l| named(l))
                && own.into_iter().all(|(l, v)| named(l) && named(v)))
        })
        .map(|(metric, _)| metric.to_string())
        .collect()
}

/// `None` or `Some(x)`, for the table's optional parts.
#[doc(hidden)]
#[macro_export]
macro_rules! __counter_some {
    () => {
        None
    };
    ($x:expr) => {
        Some($x)
    };
}

/// `Unit::Count` unless the entry names another.
#[doc(hidden)]
#[macro_export]
macro_rules! __counter_unit {
    () => {
        $crate::counters::Unit::Count
    };
    ($u:ident) => {
        $crate::counters::Unit::$u
    };
}

/// Declares a table of counters: a struct of totals with a field per entry,
/// implementing [`Tally`], and the table. An entry is
///
/// `name "help" => "metric" ["label" = "value"], unit Nanos, exit "key", warn "words";`
///
/// where everything after the help is optional (the label only after a
/// metric). `"metric" shared "opening words";` lines before the entries give
/// the help of each metric several entries share.
#[macro_export]
macro_rules! counters {
    (
        $(#[$doc:meta])* pub struct $totals:ident;
        $($shared:literal shared $lead:literal;)*
        $(
            $name:ident $help:literal
                $(=> $metric:literal $([$label:literal = $value:literal])?)?
                $(, unit $unit:ident)?
                $(, exit $exit:literal)?
                $(, warn $warn:literal)?;
        )*
    ) => {
        $(#[$doc])*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct $totals {
            $(#[doc = $help] pub $name: u64,)*
        }

        impl $crate::counters::Tally for $totals {
            const TABLE: $crate::counters::Table = $crate::counters::Table {
                counters: &[$($crate::counters::Counter {
                    name: stringify!($name),
                    help: $help,
                    metric: $crate::__counter_some!($($metric)?),
                    label: $crate::__counter_some!($($(($label, $value))?)?),
                    unit: $crate::__counter_unit!($($unit)?),
                    exit: $crate::__counter_some!($($exit)?),
                    warning: $crate::__counter_some!($($warn)?),
                },)*],
                shared: &[$(($shared, $lead),)*],
            };

            fn values(&self) -> impl Iterator<Item = u64> {
                [$(self.$name,)*].into_iter()
            }

            fn values_mut(&mut self) -> impl Iterator<Item = &mut u64> {
                [$(&mut self.$name,)*].into_iter()
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::counters! {
        /// A table with every kind of entry.
        pub struct Trial;
        "t_skipped_total" shared "Things skipped, by reason:";
        seen "Things seen." => "t_seen_total", exit "seen";
        slow "left for later" => "t_skipped_total" ["reason" = "slow"], exit "skipped", warn "things skipped";
        odd "not understood" => "t_skipped_total" ["reason" = "odd"], exit "skipped", warn "things skipped";
        strange "seen strangely" => "t_skipped_total" ["reason" = "odd"];
        waited_ns "Time spent waiting." => "t_waited_seconds_total", unit Nanos, exit "waited_ms";
        local "Only on the exit line.", exit "local";
    }

    fn scrape(registry: &Registry) -> String {
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut out,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn one_entry_reaches_the_metric_the_exit_line_and_the_warning() {
        let t = Trial {
            seen: 5,
            slow: 1,
            odd: 2,
            strange: 4,
            waited_ns: 3_500_000_000,
            local: 7,
        };
        assert_eq!(
            t.exit_fields(),
            [
                ("seen", 5),
                ("skipped", 3),
                ("waited_ms", 3500),
                ("local", 7)
            ]
        );
        assert_eq!(t.problems(), [(3, "things skipped")]);
        assert_eq!(Trial::default().problems(), []);
        assert_eq!(
            exit_line(&[t.exit_fields(), vec![("seen", 1), ("more", 2)]]),
            " seen 6 skipped 3 waited_ms 3500 local 7 more 2"
        );

        let registry = Registry::new();
        let m = CounterMetrics::<Trial>::register(&registry, &[]).unwrap();
        let before = scrape(&registry);
        assert!(
            before.contains("t_skipped_total{reason=\"slow\"} 0\n"),
            "{before}"
        );
        m.add(&[], &t);
        m.add(&[], &t.since(&Trial { seen: 4, ..t }));
        let mut twice = t;
        twice.add(&t.since(&Trial { seen: 4, ..t }));
        assert_eq!(m.totals(), twice);
        assert_eq!((twice.seen, twice.odd, twice.strange), (6, 2, 4));
        let text = scrape(&registry);
        for line in [
            "t_seen_total 6\n",
            "t_skipped_total{reason=\"slow\"} 1\n",
            "t_skipped_total{reason=\"odd\"} 6\n",
            "t_waited_seconds_total 3.5\n",
            "# HELP t_skipped_total Things skipped, by reason: slow: left for later; \
             odd: not understood, or seen strangely.\n",
        ] {
            assert!(text.contains(line), "{line} not in {text}");
        }
        assert!(!text.contains("local"), "{text}");

        let doc = "| `t_seen_total` | counter | | |\n\
                   | `t_skipped_total` | counter | `reason` | `slow` |\n";
        assert_eq!(
            undocumented::<Trial>(doc, &[]),
            ["t_skipped_total", "t_waited_seconds_total"]
        );
    }

    #[test]
    fn leading_labels_and_shared_atomics() {
        let registry = Registry::new();
        let m = CounterMetrics::<Trial>::register(&registry, &["family"]).unwrap();
        m.touch(&["v6"]);
        let shared = Shared::<Trial>::default();
        shared.add(&Trial {
            seen: 2,
            ..Trial::default()
        });
        shared.count(|t| &mut t.odd);
        let mut sum = shared.snapshot();
        assert_eq!((sum.seen, sum.odd), (2, 1));
        sum.add(&shared.snapshot());
        sum.set(0, 9);
        m.add(&["v4"], &sum);
        let text = scrape(&registry);
        assert!(text.contains("t_seen_total{family=\"v4\"} 9\n"), "{text}");
        assert!(text.contains("t_seen_total{family=\"v6\"} 0\n"), "{text}");
        assert!(
            text.contains("t_skipped_total{family=\"v4\",reason=\"odd\"} 2\n"),
            "{text}"
        );
    }
}
