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
use xtcp_service::counters::{exit_line, Tally};
use xtcp_service::metrics::Health;
use xtcp_service::prom::{PromServer, PromThread};
use xtcp_service::shutdown::Shutdown;

use crate::config::ForwarderConfig;
use crate::metrics::{ForwarderMetrics, ForwarderTotals};

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
        let counter = self.metrics.gauges.kafka_errors.with_label_values(&[&code]);
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
        let records = records as u64;
        let counted = match result {
            Ok(_) => {
                self.health.happened();
                ForwarderTotals {
                    delivered_messages: 1,
                    delivered_records: records,
                    ..ForwarderTotals::default()
                }
            }
            // Purged at exit: what --flush-timeout did not deliver.
            Err((e, _)) => match e.rdkafka_error_code() {
                Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight) => {
                    ForwarderTotals {
                        shutdown: 1,
                        shutdown_records: records,
                        ..ForwarderTotals::default()
                    }
                }
                _ => ForwarderTotals {
                    delivery_failed: 1,
                    delivery_failed_records: records,
                    ..ForwarderTotals::default()
                },
            },
        };
        self.metrics.counters.add(&[], &counted);
    }
}

/// What a run did, for the line printed at exit: what the forwarder
/// counted, and `loss`, what never reached it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunTotals {
    pub counted: ForwarderTotals,
    pub loss: Loss,
}

impl std::fmt::Display for RunTotals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let line = exit_line(&[self.counted.exit_fields(), self.loss.exit_fields()]);
        f.write_str(line.trim_start())
    }
}

fn setup(what: impl Into<String>) -> impl FnOnce(io::Error) -> ForwarderError {
    move |source| ForwarderError::Setup {
        what: what.into(),
        source,
    }
}

/// Runs until `shutdown` stops, then flushes.
pub fn run(config: &ForwarderConfig, shutdown: &Shutdown) -> Result<RunTotals, ForwarderError> {
    let metrics = Arc::new(
        ForwarderMetrics::new().map_err(|e| setup("registering metrics")(io::Error::other(e)))?,
    );
    let health = Arc::new(Health::new("delivery"));
    let keys = FeedKeys::open(&config.feed_keys, "xtcp-forwarder")
        .map_err(|e| setup("--feed-key")(io::Error::other(e)))?;
    let socket = bind_receiver(config.listen, config.recv_buffer, "xtcp-forwarder")
        .map_err(setup(format!("binding --listen {}", config.listen)))?;
    let granted = recv_buffer_len(&socket).map_err(setup("reading the receive buffer size"))?;
    metrics.gauges.receive_buffer.set(granted as i64);
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
        watch: LossWatch::new(watched, DEFAULT_RUN_LIMIT),
    };
    while !shutdown.is_stopping() {
        metrics
            .gauges
            .queued
            .set(i64::from(producer.in_flight_count()));
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
    metrics
        .gauges
        .queued
        .set(i64::from(producer.in_flight_count()));
    drop(producer);
    if let Some(prom) = prom {
        prom.stop();
    }
    Ok(RunTotals {
        counted: metrics.counters.totals(),
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
    watch: LossWatch,
}

impl Feed<'_> {
    /// Checks one datagram and produces it as one message, or counts why not.
    fn forward(&mut self, datagram: &[u8]) {
        let mut counted = ForwarderTotals {
            datagrams: 1,
            bytes: datagram.len() as u64,
            ..ForwarderTotals::default()
        };
        self.produce(datagram, &mut counted);
        self.metrics.counters.add(&[], &counted);
    }

    /// Counts into `counted` what became of the datagram.
    fn produce(&mut self, datagram: &[u8], counted: &mut ForwarderTotals) {
        let datagram = match &self.keys {
            None => datagram,
            Some(keys) => match keys.verify(datagram) {
                Some(payload) => payload,
                None => {
                    if self.metrics.counters.totals().unauthenticated == 0 {
                        xtcp_service::say!(
                            "xtcp-forwarder: dropped a datagram without a valid tag of a --feed-key"
                        );
                    }
                    counted.unauthenticated = 1;
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
                // The first of each kind is said; all are counted.
                if *self.metrics.counters.totals().malformed(&e) == 0 {
                    xtcp_service::say!("xtcp-forwarder: dropped a datagram: {e}");
                }
                *counted.malformed(&e) = 1;
                return;
            }
        };
        counted.records = records;
        self.watch.records(&self.ids);
        let record = BaseRecord::<(), [u8], usize>::with_opaque_to(self.topic, records as usize)
            .payload(&self.message[..]);
        match self.producer.send(record) {
            Ok(()) => counted.produced = 1,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                counted.queue_full = 1;
                counted.queue_full_records = records;
            }
            Err((e, _)) => {
                xtcp_service::say!("xtcp-forwarder: produce: {e}");
                counted.produce_failed = 1;
                counted.produce_failed_records = records;
            }
        }
    }

    /// Brings the loss metrics up to `loss`.
    fn count_loss(&self, loss: Loss) {
        let m = self.metrics;
        m.loss.add(&[], &loss.since(&m.loss.totals()));
        m.gauges.runs_tracked.set(self.watch.runs() as i64);
        m.gauges.runs_silent.set(self.watch.silent_runs() as i64);
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
    let queued = metrics.gauges.queued.clone();
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
