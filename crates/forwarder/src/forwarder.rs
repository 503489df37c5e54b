//! The forwarder: the exporters' UDP feed into a Kafka topic.
//!
//! One thread receives datagrams, checks every record of each by walking
//! its wire format (`xtcp_feed::check`: a datagram with anything that is not
//! an exporter's record is refused whole, counted by reason), and hands it
//! to librdkafka as one message of length-delimited records
//! (`xtcp_feed::datagram::to_delimited`), which ClickHouse reads as `Protobuf`
//! (docs/kafka.md). librdkafka batches, compresses, retries and reconnects
//! on its own threads; its queue is bounded (`--queue-messages`,
//! `--queue-bytes`), and a datagram that finds it full is dropped and
//! counted. Every message ends delivered or counted as dropped, with its
//! records: the delivery report says which. On SIGTERM/SIGINT it forwards
//! what is already queued on its socket (for up to a second), then flushes
//! for up to `--flush-timeout`; what is still queued then is counted as
//! dropped. Watermarks (`xtcp_feed::sequence`) are read for the loss count and
//! not forwarded.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use xtcp_feed::auth::FeedKeys;
use xtcp_feed::datagram::{to_delimited, Datagram};
use xtcp_feed::receiver::{bind_receiver, nothing_yet, recv_buffer_len};
use xtcp_feed::sequence::{Loss, LossWatch, RecordId, DEFAULT_RUN_LIMIT};
use xtcp_service::metrics::Health;
use xtcp_service::prom::{PromServer, PromThread};
use xtcp_service::shutdown::Shutdown;

use crate::config::ForwarderConfig;
use crate::metrics::{ForwarderMetrics, DROP_REASONS};

/// Largest UDP datagram.
const MAX_DATAGRAM: usize = 65_536;
/// How often the receive loop looks at the stop flag and the queue gauge.
const TICK: Duration = Duration::from_millis(100);
/// At a stop, how long the datagrams already queued on the socket may take
/// to forward; what is left after that stays unread (the kernel counts none
/// of them as drops, so this bound is what keeps a stop prompt under load).
const DRAIN_LIMIT: Duration = Duration::from_secs(1);
/// `/healthz` fails when messages wait and none was delivered for this long.
const HEALTHY_DELIVERY_GAP: Duration = Duration::from_secs(30);

/// Why the forwarder could not start.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error("{what}: {source}")]
    Setup { what: String, source: io::Error },
    #[error("creating the Kafka producer: {0}")]
    Kafka(#[from] KafkaError),
}

/// The delivery reports and client errors, counted.
struct Context {
    metrics: Arc<ForwarderMetrics>,
    health: Arc<Health>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // syslog levels: Error (3) and more severe; errors proper come
        // through `error` below.
        if (level as i32) <= RDKafkaLogLevel::Error as i32 {
            xtcp_service::say!("xtcp-forwarder: kafka {fac}: {message}");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error
            .rdkafka_error_code()
            .map_or_else(|| "other".to_string(), |c| format!("{c:?}"));
        let counter = self.metrics.kafka_errors.with_label_values(&[&code]);
        counter.inc();
        // A broker that stays away repeats its errors every reconnect:
        // print the 1st, 2nd, 4th, 8th... of each kind.
        let n = counter.get();
        if n.is_power_of_two() {
            xtcp_service::say!("xtcp-forwarder: kafka error ({n} so far): {error}: {reason}");
        }
    }
}

impl ProducerContext for Context {
    /// Records in the message.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, records: usize) {
        match result {
            Ok(_) => {
                self.metrics.delivered_messages.inc();
                self.metrics.delivered_records.inc_by(records as u64);
                self.health.happened();
            }
            Err((e, _)) => {
                // Purged at exit: what --flush-timeout did not deliver.
                let reason = match e.rdkafka_error_code() {
                    Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight) => {
                        "shutdown"
                    }
                    _ => "delivery_failed",
                };
                self.metrics.drop_messages(reason, 1, records as u64);
            }
        }
    }
}

/// What a run did, for the line printed at exit. Every datagram received
/// is unauthenticated (with `--feed-key`), malformed, a watermark, produced
/// or refused by the producer (its queue full, or an error): `datagrams =
/// unauthenticated + malformed + watermarks + produced + refused` (the
/// watermarks are `loss.sequence.watermarks`). `loss` is what never reached
/// the forwarder.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ForwarderTotals {
    pub datagrams: u64,
    pub records: u64,
    pub unauthenticated: u64,
    pub malformed: u64,
    pub produced: u64,
    pub refused: u64,
    pub delivered_records: u64,
    pub dropped_records: u64,
    pub loss: Loss,
}

impl std::fmt::Display for ForwarderTotals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "datagrams {} records {} unauthenticated {} malformed {} produced {} refused {} \
             delivered_records {} dropped_records {}{}",
            self.datagrams,
            self.records,
            self.unauthenticated,
            self.malformed,
            self.produced,
            self.refused,
            self.delivered_records,
            self.dropped_records,
            self.loss.exit_fields()
        )
    }
}

fn setup(what: impl Into<String>) -> impl FnOnce(io::Error) -> ForwarderError {
    move |source| ForwarderError::Setup {
        what: what.into(),
        source,
    }
}

/// Runs until `shutdown` stops, then flushes.
pub fn run(
    config: &ForwarderConfig,
    shutdown: &Shutdown,
) -> Result<ForwarderTotals, ForwarderError> {
    let metrics = Arc::new(
        ForwarderMetrics::new().map_err(|e| setup("registering metrics")(io::Error::other(e)))?,
    );
    let health = Arc::new(Health::new("delivery"));
    let keys = FeedKeys::open(&config.feed_keys, "xtcp-forwarder")
        .map_err(|e| setup("--feed-key")(io::Error::other(e)))?;
    let socket = bind_receiver(config.listen, config.recv_buffer, "xtcp-forwarder")
        .map_err(setup(format!("binding --listen {}", config.listen)))?;
    let granted = recv_buffer_len(&socket).map_err(setup("reading the receive buffer size"))?;
    metrics.receive_buffer.set(granted as i64);
    socket
        .set_read_timeout(Some(TICK))
        .map_err(setup("setting the receive timeout"))?;
    let producer = create_producer(
        config,
        Context {
            metrics: Arc::clone(&metrics),
            health: Arc::clone(&health),
        },
    )?;
    let prom = config
        .prom_listen
        .map(|listen| start_metrics(listen, &metrics, &health, shutdown))
        .transpose()?;

    let watched = socket
        .try_clone()
        .map_err(setup("watching the socket's drops"))?;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut feed = Feed {
        metrics: &metrics,
        producer: &producer,
        topic: &config.topic,
        message: Vec::with_capacity(MAX_DATAGRAM),
        ids: Vec::new(),
        keys,
        refused: 0,
        watch: LossWatch::new(watched, DEFAULT_RUN_LIMIT),
        loss: Loss::default(),
    };
    while !shutdown.is_stopping() {
        metrics.queued.set(i64::from(producer.in_flight_count()));
        match socket.recv(&mut buf) {
            Ok(len) => feed.forward(&buf[..len]),
            Err(e) if nothing_yet(&e) => {}
            Err(e) => xtcp_service::say!("xtcp-forwarder: receive: {e}"),
        }
        let loss = feed.watch.tick();
        feed.watch.say_fell_silent("xtcp-forwarder");
        feed.count_loss(loss);
    }
    // What arrived before the stop is forwarded too, within DRAIN_LIMIT.
    let drain_until = Instant::now() + DRAIN_LIMIT;
    if let Err(e) = socket.set_nonblocking(true) {
        xtcp_service::say!("xtcp-forwarder: not draining the socket: {e}");
    } else {
        while Instant::now() < drain_until {
            match socket.recv(&mut buf) {
                Ok(len) => feed.forward(&buf[..len]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    xtcp_service::say!("xtcp-forwarder: receive: {e}");
                    break;
                }
            }
        }
    }
    let refused = feed.refused;
    let loss = feed.watch.finish();
    feed.count_loss(loss);

    // Stop: deliver what is queued, within the flush timeout.
    if producer.flush(config.flush_timeout).is_err() {
        let left = u64::try_from(producer.in_flight_count()).unwrap_or(0);
        xtcp_service::say!(
            "xtcp-forwarder: {left} messages still queued after --flush-timeout {}",
            humantime::format_duration(config.flush_timeout)
        );
        // Purged, their delivery reports count them (and their records) as
        // dropped at shutdown.
        producer.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
        let _ = producer.flush(Duration::from_secs(1));
    }
    metrics.queued.set(i64::from(producer.in_flight_count()));
    drop(producer);
    if let Some(prom) = prom {
        prom.stop();
    }
    let dropped: u64 = DROP_REASONS
        .iter()
        .map(|r| metrics.dropped_records.with_label_values(&[r]).get())
        .sum();
    Ok(ForwarderTotals {
        datagrams: metrics.datagrams.get(),
        records: metrics.records.get(),
        unauthenticated: metrics.unauthenticated.get(),
        malformed: metrics.malformed_total(),
        produced: metrics.produced.get(),
        refused,
        delivered_records: metrics.delivered_records.get(),
        dropped_records: dropped,
        loss,
    })
}

/// Turns received datagrams into Kafka messages, counting each one's fate.
struct Feed<'a> {
    metrics: &'a ForwarderMetrics,
    producer: &'a ThreadedProducer<Context>,
    topic: &'a str,
    /// The message being built, reused, and its records' runs and numbers.
    message: Vec<u8>,
    ids: Vec<RecordId>,
    /// With `--feed-key`: only datagrams signed with one of these pass.
    keys: Option<FeedKeys>,
    /// Datagrams the producer refused (queue full, or an error).
    refused: u64,
    watch: LossWatch,
    /// What the metrics show of the loss so far.
    loss: Loss,
}

impl Feed<'_> {
    /// Checks one datagram and produces it as one message, or counts why not.
    fn forward(&mut self, datagram: &[u8]) {
        let metrics = self.metrics;
        metrics.datagrams.inc();
        metrics.bytes.inc_by(datagram.len() as u64);
        let datagram = match &self.keys {
            None => datagram,
            Some(keys) => match keys.verify(datagram) {
                Some(payload) => payload,
                None => {
                    if metrics.unauthenticated.get() == 0 {
                        xtcp_service::say!(
                            "xtcp-forwarder: dropped a datagram without a valid tag of a --feed-key"
                        );
                    }
                    metrics.unauthenticated.inc();
                    return;
                }
            },
        };
        let records = match to_delimited(datagram, &mut self.message, &mut self.ids) {
            Ok(Datagram::Records(records)) => records,
            Ok(Datagram::Watermark(mark)) => {
                self.watch.watermark(&mark);
                return;
            }
            Err(e) => {
                let refused = metrics.malformed.with_label_values(&[e.reason()]);
                // The first of each kind is said; all are counted.
                if refused.get() == 0 {
                    xtcp_service::say!("xtcp-forwarder: dropped a datagram: {e}");
                }
                refused.inc();
                return;
            }
        };
        metrics.records.inc_by(records);
        self.watch.records(&self.ids);
        let record = BaseRecord::<(), [u8], usize>::with_opaque_to(self.topic, records as usize)
            .payload(&self.message[..]);
        match self.producer.send(record) {
            Ok(()) => metrics.produced.inc(),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                self.refused += 1;
                metrics.drop_messages("queue_full", 1, records);
            }
            Err((e, _)) => {
                xtcp_service::say!("xtcp-forwarder: produce: {e}");
                self.refused += 1;
                metrics.drop_messages("delivery_failed", 1, records);
            }
        }
    }

    /// Brings the loss metrics up to `loss`.
    fn count_loss(&mut self, loss: Loss) {
        let (m, was) = (self.metrics, self.loss);
        m.kernel_drops.inc_by(loss.kernel_drops - was.kernel_drops);
        let (now, before) = (loss.sequence, was.sequence);
        m.records_lost.inc_by(now.lost - before.lost);
        m.records_duplicated
            .inc_by(now.duplicated - before.duplicated);
        m.records_reordered.inc_by(now.reordered - before.reordered);
        m.records_untracked.inc_by(now.untracked - before.untracked);
        m.runs_evicted
            .inc_by(now.runs_evicted - before.runs_evicted);
        m.runs_heard.inc_by(now.runs_heard - before.runs_heard);
        m.runs_stopped
            .inc_by(now.runs_stopped - before.runs_stopped);
        m.runs_fell_silent
            .inc_by(now.runs_silent - before.runs_silent);
        m.watermarks.inc_by(now.watermarks - before.watermarks);
        m.runs_tracked.set(self.watch.runs() as i64);
        m.runs_silent.set(self.watch.silent_runs() as i64);
        self.loss = loss;
    }
}

/// librdkafka's producer, configured from the flags.
fn create_producer(
    config: &ForwarderConfig,
    context: Context,
) -> Result<ThreadedProducer<Context>, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("compression.codec", config.compression.name())
        .set("linger.ms", config.linger.as_millis().to_string())
        .set("batch.size", config.batch_bytes.to_string())
        .set(
            "queue.buffering.max.messages",
            config.queue_messages.to_string(),
        )
        .set("queue.buffering.max.kbytes", config.queue_kib.to_string())
        .set(
            "message.timeout.ms",
            config.delivery_timeout.as_millis().to_string(),
        )
        // A broker that comes back is found within a second (librdkafka
        // backs off up to 10 s by default), so little waits in the queue.
        .set("reconnect.backoff.max.ms", "1000")
        // At least once: a retry after a lost acknowledgement can repeat a
        // message; consumers drop repeats by (hostname, instance,
        // record_counter).
        // Idempotence would need the broker to keep producer state across
        // restarts, and makes a broker that lost it a fatal error.
        .set("enable.idempotence", "false")
        .create_with_context(context)
}

/// The metrics endpoint's thread.
fn start_metrics(
    listen: SocketAddr,
    metrics: &Arc<ForwarderMetrics>,
    health: &Arc<Health>,
    shutdown: &Shutdown,
) -> Result<PromThread, ForwarderError> {
    let queued = metrics.queued.clone();
    let health = Arc::clone(health);
    let server = PromServer::bind(
        "xtcp forwarder",
        listen,
        "/metrics".into(),
        metrics.registry().clone(),
        Box::new(move || {
            // Healthy while nothing waits, or deliveries keep coming.
            if queued.get() == 0 {
                return Ok("ok: nothing queued".into());
            }
            health.check(HEALTHY_DELIVERY_GAP)
        }),
    )
    .map_err(setup(format!("serving metrics on --prom-listen {listen}")))?;
    server
        .spawn(shutdown)
        .map_err(setup("starting the metrics thread"))
}
