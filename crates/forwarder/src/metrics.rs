//! The forwarder's metrics, declared with the table macro every xtcp
//! program uses (`xtcp_service::metrics`).

use prometheus::{IntCounterVec, IntGauge};
use xtcp_feed::datagram::DatagramError;
use xtcp_feed::sequence::Loss;
use xtcp_service::counters::CounterMetrics;

xtcp_service::counters! {
    /// What the forwarder received, produced, delivered and dropped. Every
    /// datagram received is unauthenticated (with `--feed-key`), malformed,
    /// a watermark (counted in [`Loss`]), produced, refused by the
    /// producer (its queue full, or an error), or spooled on arrival (its
    /// queue full or the brokers down, with `--spool-dir`).
    pub struct ForwarderTotals;
    "xtcp_forwarder_malformed_datagrams_total" shared "Datagrams refused (never sent to Kafka) because a record in them is not an exporter's, by reason:";
    "xtcp_forwarder_dropped_messages_total" shared "Messages given up, by reason:";
    "xtcp_forwarder_dropped_records_total" shared "Records in those messages, by the same reasons:";
    "xtcp_forwarder_spooled_messages_total" shared "Messages written to the spool (--spool-dir) instead of dropped, by reason:";
    "xtcp_forwarder_spooled_records_total" shared "Records in those messages, by the same reasons:";
    // The receive loop.
    datagrams "UDP datagrams received." => "xtcp_forwarder_datagrams_total", exit "datagrams";
    bytes "Bytes of those datagrams." => "xtcp_forwarder_received_bytes_total";
    records "Records in the datagrams that were well formed." => "xtcp_forwarder_records_total", exit "records";
    unauthenticated "Datagrams dropped (never sent to Kafka) because, with --feed-key, no key made their tag: forged, signed with another key, or unsigned." => "xtcp_forwarder_unauthenticated_datagrams_total", exit "unauthenticated";
    empty "no record" => "xtcp_forwarder_malformed_datagrams_total" ["reason" = "empty"], exit "malformed";
    framing "not an Envelope" => "xtcp_forwarder_malformed_datagrams_total" ["reason" = "framing"], exit "malformed";
    undecodable "a record that is not protobuf of the Record schema" => "xtcp_forwarder_malformed_datagrams_total" ["reason" = "undecodable"], exit "malformed";
    no_schema "a record without schema_version" => "xtcp_forwarder_malformed_datagrams_total" ["reason" = "no_schema"], exit "malformed";
    bad_watermark "a watermark datagram that does not decode, or has no run" => "xtcp_forwarder_malformed_datagrams_total" ["reason" = "watermark"], exit "malformed";
    produced "Kafka messages (one per datagram) accepted into the producer's queue." => "xtcp_forwarder_produced_messages_total", exit "produced";
    queue_full "the bounded queue was full when the datagram came" => "xtcp_forwarder_dropped_messages_total" ["reason" = "queue_full"], exit "refused";
    produce_failed "the producer refused it" => "xtcp_forwarder_dropped_messages_total" ["reason" = "delivery_failed"], exit "refused";
    // The delivery reports.
    delivered_messages "Messages the broker acknowledged." => "xtcp_forwarder_delivered_messages_total";
    delivered_records "Records in those messages." => "xtcp_forwarder_delivered_records_total", exit "delivered_records";
    delivery_failed "not acknowledged within --delivery-timeout, or refused by the broker" => "xtcp_forwarder_dropped_messages_total" ["reason" = "delivery_failed"];
    shutdown "still queued when --flush-timeout ran out at exit" => "xtcp_forwarder_dropped_messages_total" ["reason" = "shutdown"];
    queue_full_records "the queue was full" => "xtcp_forwarder_dropped_records_total" ["reason" = "queue_full"], exit "dropped_records";
    produce_failed_records "refused by the producer" => "xtcp_forwarder_dropped_records_total" ["reason" = "delivery_failed"], exit "dropped_records";
    delivery_failed_records "not acknowledged, or refused by the broker" => "xtcp_forwarder_dropped_records_total" ["reason" = "delivery_failed"], exit "dropped_records";
    shutdown_records "still queued at exit" => "xtcp_forwarder_dropped_records_total" ["reason" = "shutdown"], exit "dropped_records";
    // The spool.
    spooled_queue_full "the producer's queue was full when it arrived" => "xtcp_forwarder_spooled_messages_total" ["reason" = "queue_full"], exit "spooled";
    spooled_outage "it arrived while the brokers were known to be down" => "xtcp_forwarder_spooled_messages_total" ["reason" = "outage"], exit "spooled";
    spooled_withdrawn "taken out of the producer's queue when the brokers went down" => "xtcp_forwarder_spooled_messages_total" ["reason" = "withdrawn"];
    spooled_delivery_failed "not acknowledged within --delivery-timeout (the brokers or the partition's leader away)" => "xtcp_forwarder_spooled_messages_total" ["reason" = "delivery_failed"];
    spooled_shutdown "still queued when the forwarder stopped" => "xtcp_forwarder_spooled_messages_total" ["reason" = "shutdown"];
    spooled_queue_full_records "the queue was full" => "xtcp_forwarder_spooled_records_total" ["reason" = "queue_full"], exit "spooled_records";
    spooled_outage_records "the brokers down" => "xtcp_forwarder_spooled_records_total" ["reason" = "outage"], exit "spooled_records";
    spooled_withdrawn_records "taken out of the queue" => "xtcp_forwarder_spooled_records_total" ["reason" = "withdrawn"];
    spooled_delivery_failed_records "not acknowledged" => "xtcp_forwarder_spooled_records_total" ["reason" = "delivery_failed"];
    spooled_shutdown_records "still queued at exit" => "xtcp_forwarder_spooled_records_total" ["reason" = "shutdown"];
    replayed "Messages read back from the spool and produced again." => "xtcp_forwarder_replayed_messages_total", exit "replayed";
    replayed_records "Records in those messages." => "xtcp_forwarder_replayed_records_total", exit "replayed_records";
    spool_bound "the oldest spool segment was deleted to keep the spool within --spool-bytes" => "xtcp_forwarder_dropped_messages_total" ["reason" = "spool_bound"];
    spool_bound_records "the oldest spool segment deleted at --spool-bytes" => "xtcp_forwarder_dropped_records_total" ["reason" = "spool_bound"], exit "dropped_records";
    spool_failed "the spool could not be written (a full or read-only disk)" => "xtcp_forwarder_dropped_messages_total" ["reason" = "spool_failed"];
    spool_failed_on_arrival "the spool could not be written when it arrived" => "xtcp_forwarder_dropped_messages_total" ["reason" = "spool_failed"], exit "refused";
    spool_failed_records "the spool could not be written" => "xtcp_forwarder_dropped_records_total" ["reason" = "spool_failed"], exit "dropped_records";
    spool_corrupt "Corrupt spans found in the spool (a torn write at a crash, damage on disk), skipped or cut; the entries around them are kept." => "xtcp_forwarder_spool_corrupt_total", exit "spool_corrupt";
    spool_corrupt_bytes "Bytes of those spans." => "xtcp_forwarder_spool_corrupt_bytes_total";
}

impl ForwarderTotals {
    /// The counter of datagrams refused for `e`.
    pub fn malformed(&mut self, e: &DatagramError) -> &mut u64 {
        match e {
            DatagramError::Empty => &mut self.empty,
            DatagramError::Framing { .. } => &mut self.framing,
            DatagramError::Undecodable { .. } => &mut self.undecodable,
            DatagramError::NoSchema { .. } => &mut self.no_schema,
            DatagramError::Watermark { .. } => &mut self.bad_watermark,
        }
    }
}

xtcp_service::metrics_table! {
    /// The forwarder's metrics other than its counter tables.
    pub struct Gauges;
    pub const FORWARDER_DEFINITIONS;
    receive_buffer: IntGauge "xtcp_forwarder_receive_buffer_bytes" []
        "The UDP receive buffer the kernel granted: less than --recv-buffer without CAP_NET_ADMIN (net.core.rmem_max), which the start also warns about.";
    queued: IntGauge "xtcp_forwarder_queued_messages" []
        "Messages in the producer's queue, not yet acknowledged.";
    kafka_errors: IntCounterVec "xtcp_forwarder_kafka_errors_total" ["code"]
        "Errors the Kafka client reported (broker down, transport errors...), by librdkafka error code.";
    runs_tracked: IntGauge "xtcp_forwarder_runs_tracked" []
        "Exporter runs (instances) whose numbers are tracked, at most 4096.";
    runs_silent: IntGauge "xtcp_forwarder_runs_silent" []
        "Runs silent now (kept for an hour, should they come back).";
    spool_bytes: IntGauge "xtcp_forwarder_spool_bytes" []
        "Bytes in the spool's segment files, at most --spool-bytes.";
    spool_segments: IntGauge "xtcp_forwarder_spool_segments" []
        "Segment files in the spool.";
    spool_records: IntGauge "xtcp_forwarder_spool_records" []
        "Records in the spool not yet read back.";
    spool_oldest_seconds: IntGauge "xtcp_forwarder_spool_oldest_seconds" []
        "Age of the oldest entry on disk in the spool (its segment is deleted once wholly delivered); 0 when empty.";
}

/// Everything the forwarder shows.
pub struct ForwarderMetrics {
    pub gauges: Gauges,
    pub counters: CounterMetrics<ForwarderTotals>,
    pub loss: CounterMetrics<Loss>,
}

impl ForwarderMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let gauges = Gauges::register()?;
        let registry = gauges.registry();
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(ForwarderMetrics {
            counters: CounterMetrics::register(registry, &[])?,
            loss: CounterMetrics::register(registry, &[])?,
            gauges,
        })
    }

    pub fn registry(&self) -> &prometheus::Registry {
        self.gauges.registry()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xtcp_service::counters::{self, Tally};
    use xtcp_service::metrics::undocumented;

    /// docs/kafka.md describes every metric with its labels.
    #[test]
    fn every_metric_is_documented() {
        let counted = [ForwarderTotals::TABLE, Loss::TABLE];
        let names = counted.iter().flat_map(|t| t.metrics().map(|(m, _)| m));
        for name in FORWARDER_DEFINITIONS.iter().map(|d| d.name).chain(names) {
            assert!(name.starts_with("xtcp_forwarder_"), "{name}");
        }
        let doc = include_str!("../../../docs/kafka.md");
        let mut missing = undocumented(FORWARDER_DEFINITIONS, doc);
        missing.extend(counters::undocumented::<ForwarderTotals>(doc, &[]));
        missing.extend(counters::undocumented::<Loss>(doc, &[]));
        assert!(missing.is_empty(), "docs/kafka.md lacks {missing:?}");
        ForwarderMetrics::new().unwrap();
    }
}
