//! `--statsd-dst`: after every poll, what changed in the metrics registry,
//! as statsd lines over UDP (cadence, buffered into datagrams of at most
//! [`DATAGRAM_BYTES`]).
//!
//! A metric's statsd name is its Prometheus name without `xtcp_`, followed
//! by its label values in label-name order, under the prefix `xtcp`:
//! `xtcp_netlink_errors_total{family="v4",kind="timeout"}` is
//! `xtcp.netlink_errors_total.v4.timeout`. Then:
//! - counters: `|c` with the increase since the last flush, sent when
//!   non-zero (statsd counters count per interval);
//! - gauges: `|g` with the current value, every flush;
//! - histograms: `|h` with each new observation, in the metric's unit
//!   (seconds). The poller flushes after every poll and observes each
//!   histogram series at most once per poll, so a flush sees one new
//!   observation per series and sends it exactly.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;

use cadence::ext::MetricBackend;
use cadence::prelude::*;
use cadence::{BufferedUdpMetricSink, Counter, StatsdClient};
use prometheus::proto::{Metric, MetricFamily, MetricType};
use prometheus::{IntCounter, Registry};

use crate::aggregate::prom::SERIES_PREFIX;
use crate::export::udp::bind_for;

/// Largest datagram: fits a 1500-byte MTU with IP and UDP headers.
pub const DATAGRAM_BYTES: usize = 1432;
const PREFIX: &str = "xtcp";

pub struct Statsd {
    client: StatsdClient,
    errors: IntCounter,
    /// Counter values and histogram `(count, sum)` at the last flush, by
    /// statsd name.
    counters: HashMap<String, f64>,
    histograms: HashMap<String, (u64, f64)>,
}

impl Statsd {
    /// A client sending to `dst`; failed sends are counted in `errors`.
    pub fn connect(dst: SocketAddr, errors: IntCounter) -> io::Result<Self> {
        let socket = bind_for(dst)?;
        // The poller sends these: a full socket buffer drops lines (counted)
        // rather than delaying the next poll.
        socket.set_nonblocking(true)?;
        let sink = BufferedUdpMetricSink::with_capacity(dst, socket, DATAGRAM_BYTES)
            .map_err(io::Error::other)?;
        let counted = errors.clone();
        let client = StatsdClient::builder(PREFIX, sink)
            .with_error_handler(move |_| counted.inc())
            .build();
        Ok(Statsd {
            client,
            errors,
            counters: HashMap::new(),
            histograms: HashMap::new(),
        })
    }

    /// Sends what changed in `registry` since the last flush.
    pub fn flush(&mut self, registry: &Registry) {
        let families = registry.gather().into_iter();
        // The per-service series are many, and their histograms take many
        // observations a poll: they are for Prometheus and OTLP only.
        for family in families.filter(|f| !f.name().starts_with(SERIES_PREFIX)) {
            let base = family.name().strip_prefix("xtcp_").unwrap_or(family.name());
            for metric in family.get_metric() {
                let key = key(base, metric);
                self.send(&family, metric, key);
            }
        }
        if self.client.flush().is_err() {
            self.errors.inc();
        }
    }

    fn send(&mut self, family: &MetricFamily, metric: &Metric, key: String) {
        match family.get_field_type() {
            MetricType::COUNTER => {
                let value = metric.get_counter().get_value();
                let last = self.counters.insert(key.clone(), value).unwrap_or(0.0);
                let delta = value - last;
                if delta <= 0.0 {
                    return;
                }
                if delta.fract() == 0.0 {
                    self.client.count_with_tags(&key, delta as u64).send();
                } else if self
                    .client
                    .send_metric(&Counter::from(format!("{PREFIX}.{key}:{delta}|c")))
                    .is_err()
                {
                    // cadence counts only whole numbers; seconds counters
                    // go out as the same line, written here.
                    self.errors.inc();
                }
            }
            MetricType::GAUGE => {
                self.client
                    .gauge_with_tags(&key, metric.get_gauge().get_value())
                    .send();
            }
            MetricType::HISTOGRAM => {
                let h = metric.get_histogram();
                let (count, sum) = (h.get_sample_count(), h.get_sample_sum());
                let (last_count, last_sum) = self
                    .histograms
                    .insert(key.clone(), (count, sum))
                    .unwrap_or((0, 0.0));
                let new = count.saturating_sub(last_count);
                if new > 0 {
                    // Exact when `new` is 1, as it is for the poller's
                    // histograms; otherwise each gets the mean.
                    let mean = (sum - last_sum) / new as f64;
                    for _ in 0..new {
                        self.client.histogram_with_tags(&key, mean).send();
                    }
                }
            }
            // The registry holds no summaries or untyped metrics.
            _ => {}
        }
    }
}

/// `base.value1.value2`: label values in the (name-sorted) order Prometheus
/// gives them, each one level of the statsd hierarchy: characters other than
/// letters, digits, `_` and `-` become `_`, dots included (a kernel release
/// such as `6.18.4` would otherwise add levels).
fn key(base: &str, metric: &Metric) -> String {
    let mut key = base.to_string();
    for label in metric.get_label() {
        key.push('.');
        key.extend(label.value().chars().map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-') {
                c
            } else {
                '_'
            }
        }));
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::tests::{metrics, pool, report};
    use std::net::UdpSocket;
    use std::time::Duration;

    /// The lines of every datagram that arrives within a short wait.
    fn received(socket: &UdpSocket) -> Vec<String> {
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut lines = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = socket.recv(&mut buf) {
            assert!(n <= DATAGRAM_BYTES, "{n}-byte datagram");
            let text = std::str::from_utf8(&buf[..n]).unwrap();
            lines.extend(text.lines().map(str::to_string));
        }
        lines
    }

    #[test]
    fn sends_counter_increases_gauges_and_each_observation() {
        let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
        let m = metrics();
        let mut statsd = Statsd::connect(
            listener.local_addr().unwrap(),
            m.table.statsd_errors.clone(),
        )
        .unwrap();

        m.observe_poll(&[report()], &[pool(0)], false);
        statsd.flush(m.registry());
        let first = received(&listener);
        for line in [
            "xtcp.polls_total:1|c",
            "xtcp.sockets_total.v4:10|c",
            "xtcp.sockets_skipped_total.v4.sampling:3|c",
            "xtcp.netlink_errors_total.v4.timeout:1|c",
            "xtcp.tcp_info_length_sockets_total.v4.280:5|c",
            "xtcp.tcp_info_length_sockets_total.v4.none:1|c",
            "xtcp.channel_blocked_seconds_total.v4:1.5|c",
            "xtcp.poll_duration_seconds.v4:0.25|h",
            "xtcp.netlink_dump_duration_seconds.v4:0.125|h",
            "xtcp.buffer_pool_allocated_bytes.v4:65536|g",
            "xtcp.buffer_pool_capacity_buffers.v6:103|g",
            // The kernel release is one level, its dots replaced.
            "xtcp.build_info.6_1_0-test.0_1_0:1|g",
        ] {
            assert!(first.iter().any(|l| l == line), "{line} not in {first:#?}");
        }
        // Unchanged counters and v6 (no dump) send nothing.
        assert!(!first.iter().any(|l| l.starts_with("xtcp.sockets_total.v6")));
        assert!(!first
            .iter()
            .any(|l| l.contains("netlink_errors_total.v4.receive")));

        // Without a poll: gauges only.
        statsd.flush(m.registry());
        let idle = received(&listener);
        assert!(!idle.is_empty());
        assert!(idle.iter().all(|l| l.ends_with("|g")), "{idle:#?}");

        // The next poll sends its own increase, not the running total.
        m.observe_poll(&[report()], &[pool(0)], false);
        statsd.flush(m.registry());
        let second = received(&listener);
        assert!(second.iter().any(|l| l == "xtcp.sockets_total.v4:10|c"));
        assert!(second
            .iter()
            .any(|l| l == "xtcp.poll_duration_seconds.v4:0.25|h"));
        assert_eq!(m.table.statsd_errors.get(), 0);
    }
}
