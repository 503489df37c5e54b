//! What every stage did, as Prometheus metrics and statsd lines.
//!
//! Every metric is declared once, in the table of [`metrics!`] below: name,
//! type, labels and help. That table builds the one [`prometheus::Registry`]
//! both backends read: [`prom`] serves it over HTTP, and [`statsd`] sends
//! what changed in it after every poll. [`DEFINITIONS`] lists the table for
//! the docs test (docs/metrics.md must describe every metric).
//!
//! The threads of a poll count in their [`DumpCounters`](crate::pipeline::dump::DumpCounters);
//! the poller moves each finished dump's totals here ([`Metrics::observe_poll`]),
//! so the hot path pays nothing for metrics and a scrape always sees whole
//! polls.

pub mod prom;
pub mod statsd;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::{
    CounterVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

use crate::config::Family;
use crate::pipeline::dump::DumpReport;

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
pub(crate) trait Make: Collector + Clone + Sized + 'static {
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
/// and a table of their definitions (for docs and tests).
macro_rules! metrics {
    (
        $(#[$doc:meta])* pub struct $name:ident;
        pub const $defs:ident;
        $($field:ident: $ty:ident $metric:literal [$($label:literal),*] $help:literal;)*
    ) => {
        $(#[$doc])*
        pub struct $name {
            registry: prometheus::Registry,
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
            fn register() -> prometheus::Result<Self> {
                let registry = prometheus::Registry::new();
                $(
                    let $field = <$ty as $crate::metrics::Make>::make($metric, $help, &[$($label),*])?;
                    registry.register(Box::new($field.clone()))?;
                )*
                Ok($name { registry, $($field,)* })
            }

            pub fn registry(&self) -> &prometheus::Registry {
                &self.registry
            }
        }
    };
}
pub(crate) use metrics;

metrics! {
    /// The exporter's metrics.
    pub struct Metrics;
    pub const DEFINITIONS;
    // Poller.
    polls: IntCounter "xtcp_polls_total" []
        "Polls completed (every enabled family dumped and every record sent).";
    long_polls: IntCounter "xtcp_long_polls_total" []
        "Polls longer than --polling-safety-buffer x --frequency.";
    last_poll: IntGauge "xtcp_last_poll_timestamp_seconds" []
        "Unix time at which the last poll completed.";
    poll_duration: HistogramVec "xtcp_poll_duration_seconds" ["family"]
        "Time from a family's dump request to its last record sent (summed over the namespaces polled).";
    netns: IntGauge "xtcp_netns" []
        "Network namespaces the last poll dumped (1 without --netns and --all-netns).";
    netns_errors: IntCounter "xtcp_netns_errors_total" []
        "Selected namespaces a poll could not dump (gone, not a namespace, no permission), counted at every poll that misses them.";
    // Netlinkers.
    dump_duration: HistogramVec "xtcp_netlink_dump_duration_seconds" ["family"]
        "Time from a family's dump request to the kernel's NLMSG_DONE (summed over the namespaces polled).";
    datagrams: IntCounterVec "xtcp_netlink_datagrams_total" ["family"]
        "Netlink reply datagrams received for the dumps.";
    bytes: IntCounterVec "xtcp_netlink_bytes_total" ["family"]
        "Bytes of those datagrams.";
    messages: IntCounterVec "xtcp_netlink_messages_total" ["family"]
        "Netlink messages in those datagrams (sockets, NLMSG_DONE, errors).";
    netlink_errors: IntCounterVec "xtcp_netlink_errors_total" ["family", "kind"]
        "Netlink failures: receive and malformed (a datagram lost), kernel (the kernel ended the dump with an error), timeout (the kernel went silent for --netlink-timeout), request (the request could not be sent).";
    interrupted: IntCounterVec "xtcp_netlink_interrupted_dumps_total" ["family"]
        "Dumps with datagrams flagged NLM_F_DUMP_INTR: the socket table changed mid-dump, so sockets may be missing or repeated.";
    stale: IntCounterVec "xtcp_netlink_stale_datagrams_total" ["family"]
        "Datagrams of no current dump (the tail of an abandoned one), dropped.";
    channel_full: IntCounterVec "xtcp_channel_full_total" ["family"]
        "Times a netlinker found the channel to the inetdiagers full and waited.";
    channel_blocked: CounterVec "xtcp_channel_blocked_seconds_total" ["family"]
        "Time netlinkers spent waiting on a full channel.";
    pool_capacity: IntGaugeVec "xtcp_buffer_pool_capacity_buffers" ["family"]
        "Receive buffers the family may allocate (--channel-size + netlinkers + inetdiagers).";
    pool_allocated: IntGaugeVec "xtcp_buffer_pool_allocated_bytes" ["family"]
        "Memory of the receive buffers allocated so far (they are kept for reuse).";
    pool_peak: IntGaugeVec "xtcp_buffer_pool_peak_in_use_buffers" ["family"]
        "Most receive buffers in use at once during the last poll.";
    // Inetdiagers.
    sockets: IntCounterVec "xtcp_sockets_total" ["family"]
        "Sockets the kernel reported.";
    sampled: IntCounterVec "xtcp_sockets_sampled_total" ["family"]
        "Sockets kept by --sampling-modulus.";
    skipped: IntCounterVec "xtcp_sockets_skipped_total" ["family", "reason"]
        "Sockets reported but not exported: sampling (left out by --sampling-modulus), undecodable (malformed message), too_long (record over the buffer), output_closed (stdout closed or failed).";
    records: IntCounterVec "xtcp_records_total" ["family"]
        "Records encoded and handed to the output.";
    tcp_info_lengths: IntCounterVec "xtcp_tcp_info_length_sockets_total" ["family", "length"]
        "Decoded sockets by the byte length of their tcp_info (none: no tcp_info, as for TIME_WAIT; other: more distinct lengths than tracked).";
    unknown_attributes: IntCounterVec "xtcp_unknown_attributes_total" ["family"]
        "Socket attributes of kinds this version does not decode (a newer kernel).";
    // Output.
    sent_datagrams: IntCounterVec "xtcp_output_datagrams_total" ["family"]
        "UDP datagrams sent (with --dest stdout: writes).";
    sent_bytes: IntCounterVec "xtcp_output_bytes_total" ["family"]
        "Bytes of those datagrams or writes.";
    send_errors: IntCounterVec "xtcp_output_send_errors_total" ["family"]
        "UDP sends that failed (e.g. nobody listening).";
    records_lost: IntCounterVec "xtcp_output_records_lost_total" ["family"]
        "Records in datagrams whose send failed.";
    // The exporter itself.
    statsd_errors: IntCounter "xtcp_statsd_errors_total" []
        "statsd lines that could not be sent.";
    build_info: IntGaugeVec "xtcp_build_info" ["version", "kernel"]
        "Always 1: the xtcp version and the kernel release it runs on.";
}

/// Every `kind` label value of `xtcp_netlink_errors_total`.
const NETLINK_ERROR_KINDS: [&str; 5] = ["receive", "malformed", "kernel", "timeout", "request"];
/// Every `reason` label value of `xtcp_sockets_skipped_total`.
const SKIP_REASONS: [&str; 4] = ["sampling", "undecodable", "too_long", "output_closed"];

/// A family's receive buffers as the poller sees them after a poll.
#[derive(Debug, Clone, Copy)]
pub struct PoolState {
    pub allocated_bytes: u64,
    pub peak_in_use: u64,
    /// Stale datagrams of the family so far (a running total).
    pub stale_datagrams: u64,
}

impl Metrics {
    /// Registers every metric and creates the series of `families` at zero,
    /// so a scrape before the first poll shows them.
    pub fn new(
        families: &[Family],
        pool_capacity: impl Fn(&Family) -> usize,
        kernel: &str,
    ) -> prometheus::Result<Self> {
        let metrics = Self::register()?;
        // process_cpu_seconds_total, process_resident_memory_bytes, open
        // fds...: what the exporter costs the host, read from /proc.
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), kernel])
            .set(1);
        for family in families {
            let f = family.name();
            for counter in metrics.per_family_counters() {
                counter.with_label_values(&[f]);
            }
            for kind in NETLINK_ERROR_KINDS {
                metrics.netlink_errors.with_label_values(&[f, kind]);
            }
            for reason in SKIP_REASONS {
                metrics.skipped.with_label_values(&[f, reason]);
            }
            metrics.channel_blocked.with_label_values(&[f]);
            for h in [&metrics.poll_duration, &metrics.dump_duration] {
                h.with_label_values(&[f]);
            }
            metrics
                .pool_capacity
                .with_label_values(&[f])
                .set(pool_capacity(family) as i64);
            for g in [&metrics.pool_allocated, &metrics.pool_peak] {
                g.with_label_values(&[f]);
            }
        }
        Ok(metrics)
    }

    fn per_family_counters(&self) -> [&IntCounterVec; 14] {
        [
            &self.datagrams,
            &self.bytes,
            &self.messages,
            &self.interrupted,
            &self.stale,
            &self.channel_full,
            &self.sockets,
            &self.sampled,
            &self.records,
            &self.unknown_attributes,
            &self.sent_datagrams,
            &self.sent_bytes,
            &self.send_errors,
            &self.records_lost,
        ]
    }

    /// Records a completed poll: its dump reports and each family's buffers
    /// (`pools`, in the order of `reports`).
    pub fn observe_poll(&self, reports: &[DumpReport], pools: &[PoolState], long: bool) {
        for (r, pool) in reports.iter().zip(pools) {
            self.observe_dump(r, pool);
        }
        self.polls.inc();
        if long {
            self.long_polls.inc();
        }
        self.last_poll.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        );
    }

    fn observe_dump(&self, r: &DumpReport, pool: &PoolState) {
        let f = r.family.name();
        let t = &r.totals;
        let add = |c: &IntCounterVec, n: u64| c.with_label_values(&[f]).inc_by(n);
        self.poll_duration
            .with_label_values(&[f])
            .observe(r.finished_after.as_secs_f64());
        if let Some(done) = r.done_after {
            self.dump_duration
                .with_label_values(&[f])
                .observe(done.as_secs_f64());
        }
        add(&self.datagrams, t.datagrams);
        add(&self.bytes, t.bytes);
        add(&self.messages, t.messages);
        for (kind, n) in NETLINK_ERROR_KINDS.into_iter().zip([
            t.receive_errors,
            t.malformed,
            t.kernel_errors,
            t.timeouts,
            t.request_errors,
        ]) {
            self.netlink_errors.with_label_values(&[f, kind]).inc_by(n);
        }
        add(&self.interrupted, u64::from(t.interrupted > 0));
        let stale = self.stale.with_label_values(&[f]);
        stale.inc_by(pool.stale_datagrams.saturating_sub(stale.get()));
        add(&self.channel_full, t.channel_full);
        self.channel_blocked
            .with_label_values(&[f])
            .inc_by(t.channel_blocked_ns as f64 / 1e9);
        add(&self.sockets, t.sockets);
        add(&self.sampled, t.sampled);
        for (reason, n) in SKIP_REASONS.into_iter().zip([
            t.sockets.saturating_sub(t.sampled),
            t.decode_errors,
            t.encode_errors,
            t.output_closed,
        ]) {
            self.skipped.with_label_values(&[f, reason]).inc_by(n);
        }
        add(&self.records, t.records);
        for (len, n) in r.tcp_info_lengths.iter() {
            let label = len.map_or_else(|| "none".to_string(), |l| l.to_string());
            self.tcp_info_lengths
                .with_label_values(&[f, &label])
                .inc_by(n);
        }
        if r.tcp_info_lengths.other() > 0 {
            self.tcp_info_lengths
                .with_label_values(&[f, "other"])
                .inc_by(r.tcp_info_lengths.other());
        }
        add(&self.unknown_attributes, t.unknown_attributes);
        add(&self.sent_datagrams, t.sent_datagrams);
        add(&self.sent_bytes, t.sent_bytes);
        add(&self.send_errors, t.send_errors);
        add(&self.records_lost, t.records_lost);
        self.pool_allocated
            .with_label_values(&[f])
            .set(pool.allocated_bytes as i64);
        self.pool_peak
            .with_label_values(&[f])
            .set(pool.peak_in_use as i64);
    }
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
pub(crate) mod tests {
    use super::*;
    use crate::pipeline::dump::{DumpTotals, TcpInfoLengths};
    use crate::wire::request::{AF_INET, AF_INET6};

    pub(crate) fn family(af: u8) -> Family {
        Family {
            af,
            netlinkers: 1,
            inetdiagers: 2,
        }
    }

    pub(crate) fn metrics() -> Metrics {
        Metrics::new(&[family(AF_INET), family(AF_INET6)], |_| 103, "6.1.0-test").unwrap()
    }

    /// A v4 dump of 10 sockets: 3 left out by sampling, 1 undecodable, 6
    /// records, 2 of them lost in a failed send.
    pub(crate) fn report() -> DumpReport {
        let mut tcp_info_lengths = TcpInfoLengths::default();
        tcp_info_lengths.add(Some(280), 5);
        tcp_info_lengths.add(None, 1);
        DumpReport {
            family: family(AF_INET),
            totals: DumpTotals {
                datagrams: 2,
                bytes: 9000,
                messages: 11,
                sockets: 10,
                sampled: 7,
                records: 6,
                decode_errors: 1,
                unknown_attributes: 4,
                sent_datagrams: 3,
                sent_bytes: 1500,
                send_errors: 1,
                records_lost: 2,
                channel_full: 1,
                channel_blocked_ns: 1_500_000_000,
                interrupted: 2,
                timeouts: 1,
                ..DumpTotals::default()
            },
            tcp_info_lengths,
            done_after: Some(Duration::from_millis(125)),
            finished_after: Duration::from_millis(250),
            first_errors: Vec::new(),
        }
    }

    pub(crate) fn pool(stale_datagrams: u64) -> PoolState {
        PoolState {
            allocated_bytes: 65536,
            peak_in_use: 2,
            stale_datagrams,
        }
    }

    #[test]
    fn the_table_follows_prometheus_conventions() {
        let mut names: Vec<&str> = DEFINITIONS.iter().map(|d| d.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DEFINITIONS.len(), "a name is declared twice");
        for d in DEFINITIONS {
            assert!(d.name.starts_with("xtcp_"), "{}", d.name);
            let total = d.name.ends_with("_total");
            assert_eq!(total, d.kind == Kind::Counter, "{}: _total", d.name);
            if d.kind == Kind::Histogram {
                assert!(d.name.ends_with("_seconds"), "{}: base unit", d.name);
            }
            assert!(d.help.ends_with('.'), "{}: help is a sentence", d.name);
        }
        // Every family series exists before the first poll.
        let text = scrape(&metrics());
        assert!(
            text.contains("xtcp_sockets_total{family=\"v6\"} 0"),
            "{text}"
        );
        assert!(text.contains("xtcp_netlink_errors_total{family=\"v4\",kind=\"request\"} 0"));
        assert!(text.contains("xtcp_buffer_pool_capacity_buffers{family=\"v4\"} 103"));
        assert!(text.contains("xtcp_build_info{kernel=\"6.1.0-test\",version="));
    }

    fn scrape(m: &Metrics) -> String {
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &m.registry().gather(),
            &mut out,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_poll_moves_into_the_metrics() {
        let m = metrics();
        m.observe_poll(&[report()], &[pool(2)], false);
        m.observe_poll(&[report()], &[pool(5)], true);
        let v4 = |c: &IntCounterVec| c.with_label_values(&["v4"]).get();
        assert_eq!((m.polls.get(), m.long_polls.get()), (2, 1));
        assert_eq!(v4(&m.sockets), 20);
        assert_eq!(v4(&m.sampled), 14);
        assert_eq!(v4(&m.records), 12);
        assert_eq!(v4(&m.messages), 22);
        assert_eq!(v4(&m.unknown_attributes), 8);
        assert_eq!(v4(&m.records_lost), 4);
        assert_eq!(v4(&m.interrupted), 2, "dumps, not datagrams");
        assert_eq!(v4(&m.stale), 5, "a running total, not added twice");
        let skipped = |reason| m.skipped.with_label_values(&["v4", reason]).get();
        assert_eq!(
            [
                skipped("sampling"),
                skipped("undecodable"),
                skipped("too_long"),
                skipped("output_closed")
            ],
            [6, 2, 0, 0]
        );
        // Every socket reported is a record or skipped for a reason.
        let all_skipped: u64 = SKIP_REASONS.iter().map(|r| skipped(r)).sum();
        assert_eq!(v4(&m.records) + all_skipped, v4(&m.sockets));
        let errors = |kind| m.netlink_errors.with_label_values(&["v4", kind]).get();
        assert_eq!((errors("timeout"), errors("receive")), (2, 0));
        let lengths = |l| m.tcp_info_lengths.with_label_values(&["v4", l]).get();
        assert_eq!((lengths("280"), lengths("none")), (10, 2));
        assert_eq!(m.channel_blocked.with_label_values(&["v4"]).get(), 3.0);
        let poll = m.poll_duration.with_label_values(&["v4"]);
        assert_eq!((poll.get_sample_count(), poll.get_sample_sum()), (2, 0.5));
        assert_eq!(
            m.dump_duration.with_label_values(&["v4"]).get_sample_sum(),
            0.25
        );
        assert_eq!(m.pool_peak.with_label_values(&["v4"]).get(), 2);
        assert_eq!(m.sockets.with_label_values(&["v6"]).get(), 0);
        assert!(m.last_poll.get() > 1_700_000_000);
    }

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

    /// `doc` (the text of `doc_name`) has a table row for every metric of
    /// `definitions`, naming each of its labels.
    pub(crate) fn assert_documented(definitions: &[Definition], doc: &str, doc_name: &str) {
        for d in definitions {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` ", d.name)))
                .unwrap_or_else(|| panic!("{doc_name} has no row for {}", d.name));
            for label in d.labels {
                assert!(row.contains(&format!("`{label}`")), "{}: {label}", d.name);
            }
        }
    }

    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../docs/metrics.md");
        assert_documented(DEFINITIONS, doc, "docs/metrics.md");
    }
}
