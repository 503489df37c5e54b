//! The forwarder's metrics, declared with the table macro every xtcp
//! program uses (`xtcp_service::metrics`).

use prometheus::{IntCounter, IntCounterVec, IntGauge};
use xtcp_feed::datagram::DATAGRAM_ERROR_REASONS;

xtcp_service::metrics_table! {
    /// What the forwarder received, produced, delivered and dropped.
    pub struct ForwarderMetrics;
    pub const FORWARDER_DEFINITIONS;
    datagrams: IntCounter "xtcp_forwarder_datagrams_total" []
        "UDP datagrams received.";
    bytes: IntCounter "xtcp_forwarder_received_bytes_total" []
        "Bytes of those datagrams.";
    records: IntCounter "xtcp_forwarder_records_total" []
        "Records in the datagrams that were well formed.";
    unauthenticated: IntCounter "xtcp_forwarder_unauthenticated_datagrams_total" []
        "Datagrams dropped (never sent to Kafka) because, with --feed-key, no key made their tag: forged, signed with another key, or unsigned.";
    malformed: IntCounterVec "xtcp_forwarder_malformed_datagrams_total" ["reason"]
        "Datagrams refused (never sent to Kafka) because a record in them is not an exporter's: empty, framing (not an Envelope), undecodable (a record that is not protobuf of the Record schema), no_schema (a record without schema_version), watermark (a watermark datagram that does not decode, or has no run).";
    watermarks: IntCounter "xtcp_forwarder_watermarks_total" []
        "Watermarks received (each exporter sends one after every poll and one when it stops); read for the loss count, never sent to Kafka.";
    produced: IntCounter "xtcp_forwarder_produced_messages_total" []
        "Kafka messages (one per datagram) accepted into the producer's queue.";
    delivered_messages: IntCounter "xtcp_forwarder_delivered_messages_total" []
        "Messages the broker acknowledged.";
    delivered_records: IntCounter "xtcp_forwarder_delivered_records_total" []
        "Records in those messages.";
    dropped_messages: IntCounterVec "xtcp_forwarder_dropped_messages_total" ["reason"]
        "Messages given up: queue_full (the bounded queue was full when the datagram came), delivery_failed (not acknowledged within --delivery-timeout, or refused), shutdown (still queued when --flush-timeout ran out at exit).";
    dropped_records: IntCounterVec "xtcp_forwarder_dropped_records_total" ["reason"]
        "Records in those messages, by the same reasons.";
    receive_buffer: IntGauge "xtcp_forwarder_receive_buffer_bytes" []
        "The UDP receive buffer the kernel granted: less than --recv-buffer without CAP_NET_ADMIN (net.core.rmem_max), which the start also warns about.";
    queued: IntGauge "xtcp_forwarder_queued_messages" []
        "Messages in the producer's queue, not yet acknowledged.";
    kafka_errors: IntCounterVec "xtcp_forwarder_kafka_errors_total" ["code"]
        "Errors the Kafka client reported (broker down, transport errors...), by librdkafka error code.";
    kernel_drops: IntCounter "xtcp_forwarder_kernel_drops_total" []
        "Datagrams the kernel dropped on the forwarder's socket because its receive buffer was full (SO_MEMINFO drops).";
    records_lost: IntCounter "xtcp_forwarder_records_lost_total" []
        "Records that never arrived: numbers of an exporter run still missing 5 s after a later number or a watermark past them arrived, or at exit.";
    records_duplicated: IntCounter "xtcp_forwarder_records_duplicated_total" []
        "Records whose number had already arrived (or had already been counted lost); still forwarded.";
    records_reordered: IntCounter "xtcp_forwarder_records_reordered_total" []
        "Records that arrived after a higher number of their run (expected with more than one inetdiager thread).";
    records_untracked: IntCounter "xtcp_forwarder_records_untracked_total" []
        "Records without an instance (schema 2 or older), whose loss cannot be told.";
    runs_tracked: IntGauge "xtcp_forwarder_runs_tracked" []
        "Exporter runs (instances) whose numbers are tracked, at most 4096.";
    runs_evicted: IntCounter "xtcp_forwarder_runs_evicted_total" []
        "Runs dropped from the full table (the one heard from longest ago); their open holes were counted lost.";
    runs_heard: IntCounter "xtcp_forwarder_runs_heard_total" []
        "Exporter runs heard from for the first time (a run forgotten and heard again counts again).";
    runs_stopped: IntCounter "xtcp_forwarder_runs_stopped_total" []
        "Runs whose stop watermark arrived: they stopped and said so.";
    runs_fell_silent: IntCounter "xtcp_forwarder_runs_silent_total" []
        "Times a run fell silent: nothing from it (record or watermark) for three of its poll intervals, at least 5 s, and no stop watermark. Killed, its host gone, or its feed cut; what it sent after the last number heard is not counted.";
    runs_silent: IntGauge "xtcp_forwarder_runs_silent" []
        "Runs silent now (kept for an hour, should they come back).";
}

/// Every `reason` of the dropped counters.
pub const DROP_REASONS: [&str; 3] = ["queue_full", "delivery_failed", "shutdown"];

impl ForwarderMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let metrics = Self::register()?;
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        for reason in DROP_REASONS {
            metrics.dropped_messages.with_label_values(&[reason]);
            metrics.dropped_records.with_label_values(&[reason]);
        }
        for reason in DATAGRAM_ERROR_REASONS {
            metrics.malformed.with_label_values(&[reason]);
        }
        Ok(metrics)
    }

    /// Datagrams refused so far, all reasons.
    pub fn malformed_total(&self) -> u64 {
        DATAGRAM_ERROR_REASONS
            .iter()
            .map(|r| self.malformed.with_label_values(&[r]).get())
            .sum()
    }

    /// Counts `messages` messages holding `records` records as dropped.
    pub fn drop_messages(&self, reason: &str, messages: u64, records: u64) {
        self.dropped_messages
            .with_label_values(&[reason])
            .inc_by(messages);
        self.dropped_records
            .with_label_values(&[reason])
            .inc_by(records);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xtcp_service::metrics::undocumented;

    /// docs/kafka.md describes every metric with its labels.
    #[test]
    fn every_metric_is_documented() {
        for d in FORWARDER_DEFINITIONS {
            assert!(d.name.starts_with("xtcp_forwarder_"), "{}", d.name);
        }
        let doc = include_str!("../../../docs/kafka.md");
        let missing = undocumented(FORWARDER_DEFINITIONS, doc);
        assert!(missing.is_empty(), "docs/kafka.md lacks {missing:?}");
        ForwarderMetrics::new().unwrap();
    }
}
