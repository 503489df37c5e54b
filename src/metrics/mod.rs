//! What every stage did, as Prometheus metrics and statsd lines.
//!
//! Every metric is declared once: the dump and close counters in the
//! counter tables of [`crate::counting`], everything else (poll counts,
//! durations, buffers, gauges) in the table of
//! [`metrics_table!`](xtcp_service::metrics_table) below: name, type, labels
//! and help. Both build the one [`prometheus::Registry`] both backends read:
//! the service's endpoint ([`xtcp_service::prom`]) serves it over HTTP, and
//! [`statsd`] sends what changed in it after every poll. The tables list
//! them for the docs tests (docs/metrics.md must describe every metric).
//!
//! The threads of a poll count in their
//! [`DumpCounters`](crate::counting::DumpCounters); the poller moves each
//! finished dump's totals here ([`Metrics::observe_poll`]), so the hot path
//! pays nothing for metrics and a scrape always sees whole polls.

pub mod statsd;

use prometheus::{CounterVec, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use xtcp_service::counters::CounterMetrics;

use crate::config::Family;
use crate::counting::{CloseTotals, DumpReport, DumpTotals};
use crate::identity::Identity;

xtcp_service::metrics_table! {
    /// The exporter's metrics other than the dump counters.
    pub struct Table;
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
        "Network namespaces the last poll covered (1 without --netns and --all-netns), empty ones included.";
    netns_empty: IntGauge "xtcp_netns_empty" []
        "Namespaces the last poll did not dump because their socket counts said they had no TCP socket.";
    netns_tables: IntGaugeVec "xtcp_netns_tables" ["table"]
        "Namespaces covered by the last poll, by their TCP table: own, shared (the host's, walked whole by every dump of each), unknown (kernels before 6.1).";
    netns_dump_seconds: CounterVec "xtcp_netns_dump_seconds_total" ["table"]
        "Time the kernel spent walking socket tables for dumps (in the requests' send and the replies' recv), summed over the dumps of namespaces that share the host's TCP table (shared) and of the others (other).";
    netns_errors: IntCounter "xtcp_netns_errors_total" []
        "Selected namespaces a poll could not dump (gone, not a namespace, no permission), counted at every poll that misses them.";
    // Netlinkers (their dump counters are in crate::counting).
    dump_duration: HistogramVec "xtcp_netlink_dump_duration_seconds" ["family"]
        "Time from a family's dump request to the kernel's NLMSG_DONE (summed over the namespaces polled).";
    stale: IntCounterVec "xtcp_netlink_stale_datagrams_total" ["family"]
        "Datagrams of no current dump (the tail of an abandoned one), dropped.";
    pool_capacity: IntGaugeVec "xtcp_buffer_pool_capacity_buffers" ["family"]
        "Receive buffers the dump may allocate ((ceil(--channel-size / 8) + netlinkers + inetdiagers) x 8).";
    pool_allocated: IntGaugeVec "xtcp_buffer_pool_allocated_bytes" ["family"]
        "Memory of the receive buffers allocated so far (they are kept for reuse).";
    pool_peak: IntGaugeVec "xtcp_buffer_pool_peak_in_use_buffers" ["family"]
        "Most receive buffers in use at once during the last poll.";
    // Inetdiagers.
    tcp_info_lengths: IntCounterVec "xtcp_tcp_info_length_sockets_total" ["family", "length"]
        "Decoded sockets by the byte length of their tcp_info (none: no tcp_info, as for TIME_WAIT; other: more distinct lengths than tracked).";
    // Change-only export (--changes-only).
    changes_tracked: IntGauge "xtcp_changes_tracked_sockets" []
        "Sockets whose last export the change tracker remembers (those the last poll saw).";
    changes_bytes: IntGauge "xtcp_changes_table_bytes" []
        "Memory of the change tracker's table (its allocated slots).";
    // The poller's watermarks (--dest udp:...).
    watermarks: IntCounterVec "xtcp_output_watermarks_total" ["result"]
        "Watermarks sent to the UDP destination after every poll and at the stop, so receivers count a lost tail (docs/metrics.md): sent, or failed (the send returned an error).";
    // Close records (--close-records).
    close_buffer: IntGauge "xtcp_close_receive_buffer_bytes" []
        "The receive buffer of the close sockets, as the kernel granted it.";
    // Whose connection (the cgroup tree, crate::attribution).
    cgroups_known: IntGauge "xtcp_cgroups" []
        "Control groups the last walk of the cgroup2 tree mapped from id to path.";
    cgroups_left_out: IntGauge "xtcp_cgroups_left_out" []
        "Control groups the last walk left out: beyond --cgroup-cache (the shallowest are kept; a left-out cgroup's subtree is not walked) or a path over 4096 bytes.";
    cgroup_walks: IntCounter "xtcp_cgroup_walks_total" []
        "Walks of the cgroup2 tree: one at start, then one for a socket's unknown cgroup id at most every --cgroup-rescan.";
    cgroup_misses: IntCounter "xtcp_cgroup_misses_total" []
        "Records whose socket's cgroup id was not in the map (their cgroup_path is empty).";
    // --processes (crate::attribution::processes).
    process_sockets: IntGauge "xtcp_process_sockets" []
        "With --processes: socket inodes the process table holds (those some process's descriptors point to).";
    process_scans: IntCounter "xtcp_process_scans_total" []
        "With --processes: scans of /proc: one at start, then at most one per poll that has a socket the table lacks.";
    process_descriptors_read: IntCounter "xtcp_process_descriptors_read_total" []
        "With --processes: descriptors looked at (stat of /proc/PID/fd/N) by the scans: new ones, or all after an inode no scan explained.";
    process_not_found: IntCounter "xtcp_process_not_found_total" []
        "With --processes: records whose socket has an inode no visible process holds (process_owner NOT_FOUND).";
    // Per-service aggregates (crate::aggregate; their series are built from
    // each poll's snapshot by crate::aggregate::prom).
    aggregate_groups: IntGauge "xtcp_aggregate_groups" []
        "Service and peer groups with series after the last poll, the folded group (service=\"other\") included.";
    aggregate_folded: IntGauge "xtcp_aggregate_folded_groups" []
        "Groups the last poll saw that found no room under --aggregate-groups: their sockets are counted in the folded group.";
    aggregate_expired: IntCounter "xtcp_aggregate_expired_groups_total" []
        "Groups whose series were removed after --aggregate-ttl polls without a socket.";
    aggregate_tracked: IntGauge "xtcp_aggregate_tracked_connections" []
        "Connections whose counters are kept for their change at the next poll or close (the last poll's, and closes not yet past a poll).";
    aggregate_tracked_bytes: IntGauge "xtcp_aggregate_tracked_bytes" []
        "Memory of the table of tracked connections (its allocated slots).";
    otlp_exports: IntCounterVec "xtcp_otlp_exports_total" ["result"]
        "Pushes of the aggregates to --otlp-url, by result: delivered, or failed (after the tries).";
    otlp_retries: IntCounter "xtcp_otlp_retries_total" []
        "Pushes to --otlp-url tried again after a failure that may pass (no connection, a timeout, 429, 502, 503, 504).";
    otlp_rejected: IntCounter "xtcp_otlp_rejected_points_total" []
        "Data points the collector answered it rejected (an OTLP partial success).";
    // The exporter itself.
    statsd_errors: IntCounter "xtcp_statsd_errors_total" []
        "statsd lines that could not be sent.";
    build_info: IntGaugeVec "xtcp_build_info" ["version", "kernel"]
        "Always 1: the xtcp version and the kernel release it runs on.";
    instance_info: IntGaugeVec "xtcp_instance_info" ["hostname", "instance"]
        "Always 1: the hostname and instance this run stamps on its records.";
}

/// A family's receive buffers as the poller sees them after a poll.
#[derive(Debug, Clone, Copy)]
pub struct PoolState {
    pub allocated_bytes: u64,
    pub peak_in_use: u64,
    /// Stale datagrams of the family so far (a running total).
    pub stale_datagrams: u64,
}

/// The exporter's metrics: the table above and the series of the dump and
/// close counters.
pub struct Metrics {
    pub table: Table,
    /// `family`-labelled.
    dumps: CounterMetrics<DumpTotals>,
    pub closes: CounterMetrics<CloseTotals>,
}

impl Metrics {
    /// Registers every metric and creates the series of `families` at zero,
    /// so a scrape before the first poll shows them.
    pub fn new(
        families: &[Family],
        pool_capacity: impl Fn(&Family) -> usize,
        kernel: &str,
        identity: &Identity,
    ) -> prometheus::Result<Self> {
        let table = Table::register()?;
        // process_cpu_seconds_total, process_resident_memory_bytes, open
        // fds...: what the exporter costs the host, read from /proc.
        table.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        table
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), kernel])
            .set(1);
        table
            .instance_info
            .with_label_values(&[&identity.hostname, &identity.instance.to_string()])
            .set(1);
        let dumps = CounterMetrics::register(&table.registry, &["family"])?;
        let closes = CounterMetrics::register(&table.registry, &[])?;
        for family in families {
            let f = family.name();
            dumps.touch(&[f]);
            table.stale.with_label_values(&[f]);
            for h in [&table.poll_duration, &table.dump_duration] {
                h.with_label_values(&[f]);
            }
            table
                .pool_capacity
                .with_label_values(&[f])
                .set(pool_capacity(family) as i64);
            for g in [&table.pool_allocated, &table.pool_peak] {
                g.with_label_values(&[f]);
            }
        }
        Ok(Metrics {
            table,
            dumps,
            closes,
        })
    }

    pub fn registry(&self) -> &prometheus::Registry {
        self.table.registry()
    }

    /// Records a completed poll: its dump reports and each family's buffers
    /// (`pools`, in the order of `reports`).
    pub fn observe_poll(&self, reports: &[DumpReport], pools: &[PoolState], long: bool) {
        for (r, pool) in reports.iter().zip(pools) {
            self.observe_dump(r, pool);
        }
        let t = &self.table;
        t.polls.inc();
        if long {
            t.long_polls.inc();
        }
        t.last_poll.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        );
    }

    fn observe_dump(&self, r: &DumpReport, pool: &PoolState) {
        let f = r.family.name();
        let t = &self.table;
        self.dumps.add(&[f], &r.totals);
        t.poll_duration
            .with_label_values(&[f])
            .observe(r.finished_after.as_secs_f64());
        if let Some(done) = r.done_after {
            t.dump_duration
                .with_label_values(&[f])
                .observe(done.as_secs_f64());
        }
        let stale = t.stale.with_label_values(&[f]);
        stale.inc_by(pool.stale_datagrams.saturating_sub(stale.get()));
        for (len, n) in r.tcp_info_lengths.iter() {
            let label = len.map_or_else(|| "none".to_string(), |l| l.to_string());
            t.tcp_info_lengths.with_label_values(&[f, &label]).inc_by(n);
        }
        if r.tcp_info_lengths.other() > 0 {
            t.tcp_info_lengths
                .with_label_values(&[f, "other"])
                .inc_by(r.tcp_info_lengths.other());
        }
        t.pool_allocated
            .with_label_values(&[f])
            .set(pool.allocated_bytes as i64);
        t.pool_peak
            .with_label_values(&[f])
            .set(pool.peak_in_use as i64);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::counting::TcpInfoLengths;
    use crate::wire::request::{AF_INET, AF_INET6};
    use std::time::Duration;
    use xtcp_service::counters::{Tally, Unit};
    use xtcp_service::metrics::{undocumented, Kind};

    pub(crate) fn family(af: u8) -> Family {
        Family {
            af,
            netlinkers: 1,
            inetdiagers: 2,
        }
    }

    pub(crate) fn metrics() -> Metrics {
        Metrics::new(
            &[family(AF_INET), family(AF_INET6)],
            |_| 103,
            "6.1.0-test",
            &Identity::new("test-host", 77),
        )
        .unwrap()
    }

    /// A v4 dump of 10 sockets: 3 left out by sampling, 1 undecodable, 6
    /// records, 2 of them lost in a failed send.
    pub(crate) fn report() -> DumpReport {
        let mut tcp_info_lengths = TcpInfoLengths::default();
        tcp_info_lengths.add(Some(280), 5);
        tcp_info_lengths.add(None, 1);
        DumpReport {
            family: family(AF_INET),
            netns_inode: 0,
            totals: DumpTotals {
                datagrams: 2,
                bytes: 9000,
                messages: 11,
                sockets: 10,
                sampled: 7,
                unsampled: 3,
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
            kernel_time: Duration::from_millis(100),
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

    pub(crate) fn scrape(m: &Metrics) -> String {
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &m.registry().gather(),
            &mut out,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The value of one series in a scrape, `name{labels}` as written there.
    pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn the_tables_follow_prometheus_conventions() {
        let mut names: Vec<&str> = DEFINITIONS.iter().map(|d| d.name).collect();
        let counters = [DumpTotals::TABLE, CloseTotals::TABLE];
        for table in counters {
            // Once per metric, however many counters share it.
            names.extend(table.metrics().map(|(metric, _)| metric));
        }
        let declared = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), declared, "a name is declared twice");
        for d in DEFINITIONS {
            assert!(d.name.starts_with("xtcp_"), "{}", d.name);
            let total = d.name.ends_with("_total");
            assert_eq!(total, d.kind == Kind::Counter, "{}: _total", d.name);
            if d.kind == Kind::Histogram {
                assert!(d.name.ends_with("_seconds"), "{}: base unit", d.name);
            }
            assert!(d.help.ends_with('.'), "{}: help is a sentence", d.name);
        }
        for table in counters {
            for (metric, entries) in table.metrics() {
                assert!(metric.starts_with("xtcp_") && metric.ends_with("_total"));
                for c in &entries {
                    assert_eq!(c.unit == Unit::Nanos, metric.ends_with("_seconds_total"));
                    // A metric shared by several counters says so, with a lead.
                    assert_eq!(entries.len() > 1, c.label.is_some(), "{}: label", c.name);
                }
                let help = table.metric_help(metric, str::to_string);
                assert!(help.ends_with('.'), "{metric}: help is a sentence");
                let lead = table.shared.iter().any(|(m, _)| *m == metric);
                assert_eq!(entries.len() > 1, lead, "{metric}: lead");
            }
        }
        // Every family series exists before the first poll.
        let text = scrape(&metrics());
        assert_eq!(
            sample(&text, "xtcp_sockets_total{family=\"v6\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                "xtcp_netlink_errors_total{family=\"v4\",kind=\"request\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "xtcp_buffer_pool_capacity_buffers{family=\"v4\"}"),
            Some(103.0)
        );
        assert!(text.contains("xtcp_build_info{kernel=\"6.1.0-test\",version="));
        assert_eq!(
            sample(
                &text,
                "xtcp_instance_info{hostname=\"test-host\",instance=\"77\"}"
            ),
            Some(1.0)
        );
    }

    #[test]
    fn a_poll_moves_into_the_metrics() {
        let m = metrics();
        m.observe_poll(&[report()], &[pool(2)], false);
        m.observe_poll(&[report()], &[pool(5)], true);
        let text = scrape(&m);
        let v4 = |metric: &str| sample(&text, &format!("{metric}{{family=\"v4\"}}")).unwrap();
        assert_eq!((m.table.polls.get(), m.table.long_polls.get()), (2, 1));
        assert_eq!(v4("xtcp_sockets_total"), 20.0);
        assert_eq!(v4("xtcp_sockets_sampled_total"), 14.0);
        assert_eq!(v4("xtcp_records_total"), 12.0);
        assert_eq!(v4("xtcp_netlink_messages_total"), 22.0);
        assert_eq!(v4("xtcp_unknown_attributes_total"), 8.0);
        assert_eq!(v4("xtcp_output_records_lost_total"), 4.0);
        assert_eq!(
            v4("xtcp_netlink_interrupted_dumps_total"),
            2.0,
            "dumps, not datagrams"
        );
        assert_eq!(
            v4("xtcp_netlink_stale_datagrams_total"),
            5.0,
            "a running total, not added twice"
        );
        assert_eq!(v4("xtcp_channel_blocked_seconds_total"), 3.0);
        let labelled = |metric: &str, label: &str, value: &str| {
            let series = format!("{metric}{{family=\"v4\",{label}=\"{value}\"}}");
            sample(&text, &series).unwrap()
        };
        let skipped = |reason| labelled("xtcp_sockets_skipped_total", "reason", reason);
        let reasons = ["sampling", "undecodable", "too_long", "output_closed"];
        assert_eq!(reasons.map(skipped), [6.0, 2.0, 0.0, 0.0]);
        // Every socket reported is a record or skipped for a reason.
        let all_skipped: f64 = reasons.into_iter().map(skipped).sum();
        assert_eq!(
            v4("xtcp_records_total") + all_skipped,
            v4("xtcp_sockets_total")
        );
        let errors = |kind| labelled("xtcp_netlink_errors_total", "kind", kind);
        assert_eq!((errors("timeout"), errors("receive")), (2.0, 0.0));
        let lengths = |l| labelled("xtcp_tcp_info_length_sockets_total", "length", l);
        assert_eq!((lengths("280"), lengths("none")), (10.0, 2.0));
        let poll = m.table.poll_duration.with_label_values(&["v4"]);
        assert_eq!((poll.get_sample_count(), poll.get_sample_sum()), (2, 0.5));
        assert_eq!(
            m.table
                .dump_duration
                .with_label_values(&["v4"])
                .get_sample_sum(),
            0.25
        );
        assert_eq!(m.table.pool_peak.with_label_values(&["v4"]).get(), 2);
        assert_eq!(
            sample(&text, "xtcp_sockets_total{family=\"v6\"}"),
            Some(0.0)
        );
        assert!(m.table.last_poll.get() > 1_700_000_000);
    }

    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../docs/metrics.md");
        let mut missing = undocumented(DEFINITIONS, doc);
        missing.extend(xtcp_service::counters::undocumented::<CloseTotals>(
            doc,
            &[],
        ));
        assert!(missing.is_empty(), "docs/metrics.md lacks {missing:?}");
    }
}
