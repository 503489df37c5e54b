//! The aggregates' series, named once for both expositions: Prometheus
//! (a collector on the exporter's registry, built from the last
//! [`Snapshot`] at each scrape, so a scrape sees one whole poll) and
//! OpenTelemetry (`super::otlp`).

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};

use super::sums::STATES;
use super::{Aggregates, Group, GroupLabels, Histogram, Side, Snapshot, RATE_BOUNDS, RTT_BOUNDS};
use crate::wire::state::TCP_STATES;
use xtcp_service::metrics::{Definition, Kind};

/// What a series reads from a group.
#[derive(Clone, Copy)]
pub enum Reading {
    /// Sockets by state at the last poll (one series per state seen).
    Connections,
    Histogram(fn(&Group) -> &Histogram, &'static [f64]),
    /// A counter, scaled into its unit.
    Counter(fn(&Group) -> u64, f64),
}

/// One aggregate series: its Prometheus definition, its OpenTelemetry name
/// and unit, and what it reads.
pub struct Series {
    pub prom: Definition,
    pub otel: &'static str,
    pub unit: &'static str,
    /// OpenTelemetry attributes the series adds to the group's.
    pub otel_attributes: &'static [(&'static str, &'static str)],
    pub reading: Reading,
}

/// What every aggregate series' Prometheus name starts with.
pub const SERIES_PREFIX: &str = "xtcp_service_";

/// The labels of every group series (with `network` when named networks are
/// configured).
pub const GROUP_LABELS: [&str; 3] = ["service", "side", "port"];

const CONNECTION_LABELS: &[&str] = &["service", "side", "port", "state"];

macro_rules! series {
    ($name:literal, $kind:ident, $labels:expr, $help:literal, $otel:literal, $unit:literal, $attrs:expr, $reading:expr) => {
        Series {
            prom: Definition {
                name: $name,
                kind: Kind::$kind,
                labels: $labels,
                help: $help,
            },
            otel: $otel,
            unit: $unit,
            otel_attributes: $attrs,
            reading: $reading,
        }
    };
}

/// Every aggregate series.
pub const SERIES: [Series; 11] = [
    series!("xtcp_service_connections", Gauge, CONNECTION_LABELS,
        "Sockets of the group by TCP state at the last poll.",
        "system.network.connection.count", "{connection}", &[], Reading::Connections),
    series!("xtcp_service_rtt_seconds", Histogram, &GROUP_LABELS,
        "Smoothed RTT of the group's established connections, one observation per connection per poll.",
        "xtcp.tcp.rtt", "s", &[], Reading::Histogram(|g| &g.rtt, &RTT_BOUNDS)),
    series!("xtcp_service_min_rtt_seconds", Histogram, &GROUP_LABELS,
        "Minimum RTT seen over each established connection's life, one observation per connection per poll.",
        "xtcp.tcp.min_rtt", "s", &[], Reading::Histogram(|g| &g.min_rtt, &RTT_BOUNDS)),
    series!("xtcp_service_delivery_rate_bytes_per_second", Histogram, &GROUP_LABELS,
        "Delivery rate of the group's established connections that have delivered data, one observation per connection per poll.",
        "xtcp.tcp.delivery_rate", "By/s", &[], Reading::Histogram(|g| &g.delivery_rate, &RATE_BOUNDS)),
    series!("xtcp_service_sent_bytes_total", Counter, &GROUP_LABELS,
        "Bytes the group's connections sent, retransmissions included (tcpi_bytes_sent).",
        "system.network.io", "By", &[("network.io.direction", "transmit")],
        Reading::Counter(|g| g.counters.bytes_sent, 1.0)),
    series!("xtcp_service_received_bytes_total", Counter, &GROUP_LABELS,
        "Bytes the group's connections received (tcpi_bytes_received).",
        "system.network.io", "By", &[("network.io.direction", "receive")],
        Reading::Counter(|g| g.counters.bytes_received, 1.0)),
    series!("xtcp_service_sent_segments_total", Counter, &GROUP_LABELS,
        "Segments the group's connections sent, retransmissions included (tcpi_segs_out).",
        "xtcp.tcp.sent_segments", "{segment}", &[], Reading::Counter(|g| g.counters.segments_sent, 1.0)),
    series!("xtcp_service_retransmitted_segments_total", Counter, &GROUP_LABELS,
        "Segments the group's connections retransmitted (tcpi_total_retrans).",
        "xtcp.tcp.retransmits", "{segment}", &[], Reading::Counter(|g| g.counters.retransmits, 1.0)),
    series!("xtcp_service_rto_total", Counter, &GROUP_LABELS,
        "Retransmission timeouts of the group's connections (tcpi_total_rto, Linux 6.7+).",
        "xtcp.tcp.rto", "{timeout}", &[], Reading::Counter(|g| g.counters.rto, 1.0)),
    series!("xtcp_service_rwnd_limited_seconds_total", Counter, &GROUP_LABELS,
        "Time the group's connections could not send because the peer's receive window was full (tcpi_rwnd_limited).",
        "xtcp.tcp.rwnd_limited", "s", &[], Reading::Counter(|g| g.counters.rwnd_limited_us, 1e-6)),
    series!("xtcp_service_sndbuf_limited_seconds_total", Counter, &GROUP_LABELS,
        "Time the group's connections could not send because their send buffer was full (tcpi_sndbuf_limited).",
        "xtcp.tcp.sndbuf_limited", "s", &[], Reading::Counter(|g| g.counters.sndbuf_limited_us, 1e-6)),
];

/// The poll the series describe.
pub const POLL: Definition = Definition {
    name: "xtcp_service_poll",
    kind: Kind::Gauge,
    labels: &[],
    help: "The poll the xtcp_service_* series describe (0 before the first).",
};

/// A group's label values: service, side, port (`ephemeral` for a client
/// of no service port, `other` for the folded group) and, when networks
/// are named, the network (`other` outside them all).
pub fn label_values(labels: &GroupLabels, networks: &[&str]) -> Vec<(&'static str, String)> {
    let port = match (labels.side, labels.port) {
        (Side::Other, _) => "other".to_string(),
        (_, 0) => "ephemeral".to_string(),
        (_, p) => p.to_string(),
    };
    let mut values = vec![
        ("service", labels.service.to_string()),
        ("side", labels.side.label().to_string()),
        ("port", port),
    ];
    if !networks.is_empty() {
        let network = match labels.network {
            0 => "other",
            i => networks.get(usize::from(i) - 1).copied().unwrap_or("other"),
        };
        values.push(("network", network.to_string()));
    }
    values
}

/// The states a group has had, with their `--states` names.
pub fn states_seen(group: &Group) -> impl Iterator<Item = (&'static str, u64)> + '_ {
    TCP_STATES
        .iter()
        .filter(move |(n, _, _)| usize::from(*n) < STATES && group.states_seen & (1 << n) != 0)
        .map(move |(n, name, _)| (*name, group.states[usize::from(*n)]))
}

/// The collector on the exporter's registry.
pub struct AggregateCollector {
    aggregates: Arc<Aggregates>,
    descs: Vec<Desc>,
    networks: Vec<String>,
}

impl AggregateCollector {
    pub fn new(aggregates: Arc<Aggregates>) -> prometheus::Result<Self> {
        let networks: Vec<String> = aggregates
            .network_names()
            .into_iter()
            .map(str::to_string)
            .collect();
        let mut descs = Vec::new();
        for s in &SERIES {
            let mut labels: Vec<String> = s.prom.labels.iter().map(|l| l.to_string()).collect();
            if !networks.is_empty() {
                labels.push("network".into());
            }
            descs.push(Desc::new(
                s.prom.name.into(),
                s.prom.help.into(),
                labels,
                HashMap::new(),
            )?);
        }
        descs.push(Desc::new(
            POLL.name.into(),
            POLL.help.into(),
            vec![],
            HashMap::new(),
        )?);
        Ok(AggregateCollector {
            aggregates,
            descs,
            networks,
        })
    }
}

fn label_pairs(values: &[(&str, String)]) -> Vec<LabelPair> {
    values
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name(name.to_string());
            pair.set_value(value.clone());
            pair
        })
        .collect()
}

fn family(definition: &Definition, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(definition.name.into());
    f.set_help(definition.help.into());
    f.set_field_type(match definition.kind {
        Kind::Counter => MetricType::COUNTER,
        Kind::Gauge => MetricType::GAUGE,
        Kind::Histogram => MetricType::HISTOGRAM,
    });
    f.set_metric(metrics);
    f
}

fn gauge(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut g = proto::Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_label(labels);
    m.set_gauge(g);
    m
}

/// The Prometheus families of a snapshot.
pub fn families(snapshot: &Snapshot, networks: &[&str]) -> Vec<MetricFamily> {
    // Each group's labels, made once for all its series.
    let labelled: Vec<_> = snapshot
        .groups
        .iter()
        .map(|(labels, _)| {
            let values = label_values(labels, networks);
            let pairs = label_pairs(&values);
            (values, pairs)
        })
        .collect();
    let mut out = Vec::new();
    for s in &SERIES {
        let mut metrics = Vec::new();
        for ((_, group), (values, pairs)) in snapshot.groups.iter().zip(&labelled) {
            match s.reading {
                Reading::Connections => {
                    for (state, n) in states_seen(group) {
                        let mut v = values.clone();
                        v.insert(3, ("state", state.to_string()));
                        metrics.push(gauge(label_pairs(&v), n as f64));
                    }
                }
                Reading::Histogram(read, bounds) => {
                    let h = read(group);
                    let mut cumulative = 0;
                    let buckets = bounds
                        .iter()
                        .zip(&h.counts)
                        .map(|(bound, n)| {
                            cumulative += n;
                            let mut b = proto::Bucket::default();
                            b.set_upper_bound(*bound);
                            b.set_cumulative_count(cumulative);
                            b
                        })
                        .collect();
                    let mut p = proto::Histogram::default();
                    p.set_sample_count(h.count());
                    p.set_sample_sum(h.sum);
                    p.set_bucket(buckets);
                    let mut m = Metric::from_label(pairs.clone());
                    m.set_histogram(p);
                    metrics.push(m);
                }
                Reading::Counter(read, scale) => {
                    let mut c = proto::Counter::default();
                    c.set_value(read(group) as f64 * scale);
                    let mut m = Metric::from_label(pairs.clone());
                    m.set_counter(c);
                    metrics.push(m);
                }
            }
        }
        out.push(family(&s.prom, metrics));
    }
    out.push(family(&POLL, vec![gauge(Vec::new(), snapshot.poll as f64)]));
    out
}

impl Collector for AggregateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let networks: Vec<&str> = self.networks.iter().map(String::as_str).collect();
        families(&self.aggregates.snapshot(), &networks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::sums::ESTABLISHED;
    use xtcp_service::metrics::undocumented;

    #[test]
    fn every_series_is_documented_and_named_by_the_rules() {
        let definitions: Vec<Definition> = SERIES.iter().map(|s| s.prom).chain([POLL]).collect();
        let doc = include_str!("../../docs/metrics.md");
        let missing = undocumented(&definitions, doc);
        assert!(missing.is_empty(), "docs/metrics.md lacks {missing:?}");
        for d in &definitions {
            assert!(d.name.starts_with(SERIES_PREFIX), "{}", d.name);
            assert_eq!(
                d.name.ends_with("_total"),
                d.kind == Kind::Counter,
                "{}",
                d.name
            );
            assert!(d.help.ends_with('.'), "{}: help is a sentence", d.name);
        }
    }

    #[test]
    fn a_snapshot_becomes_whole_families() {
        let mut group = Group {
            states_seen: 1 << ESTABLISHED | 1 << 10,
            states: [0; STATES],
            rtt: Histogram::default(),
            min_rtt: Histogram::default(),
            delivery_rate: Histogram::default(),
            counters: Default::default(),
            last_poll: 3,
            start_ns: 1,
        };
        group.states[usize::from(ESTABLISHED)] = 4;
        group.rtt.observe(&RTT_BOUNDS, 0.000_02);
        group.rtt.observe(&RTT_BOUNDS, 0.003);
        group.counters.rwnd_limited_us = 1_500_000;
        let labels = GroupLabels {
            service: Arc::from("web.service"),
            side: Side::Server,
            port: 443,
            network: 1,
        };
        let snapshot = Snapshot {
            poll: 3,
            time_ns: 2,
            groups: vec![(labels, group)],
        };
        let families = families(&snapshot, &["lan"]);
        let mut text = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        let labels = r#"service="web.service",side="server",port="443",network="lan""#;
        for line in [
            r#"xtcp_service_connections{service="web.service",side="server",port="443",state="established",network="lan"} 4"#.to_string(),
            r#"xtcp_service_connections{service="web.service",side="server",port="443",state="listen",network="lan"} 0"#.to_string(),
            format!(r#"xtcp_service_rtt_seconds_bucket{{{labels},le="0.00005"}} 1"#),
            format!(r#"xtcp_service_rtt_seconds_bucket{{{labels},le="0.005"}} 2"#),
            format!(r#"xtcp_service_rtt_seconds_bucket{{{labels},le="+Inf"}} 2"#),
            format!(r#"xtcp_service_rtt_seconds_count{{{labels}}} 2"#),
            format!(r#"xtcp_service_rwnd_limited_seconds_total{{{labels}}} 1.5"#),
            "xtcp_service_poll 3".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
    }
}
