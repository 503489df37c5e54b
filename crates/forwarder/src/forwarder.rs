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
//!
//! With `--spool-dir`, what would be dropped for a full queue, a failed
//! delivery or the stop goes to the disk spool instead (`spool`), and
//! while the brokers are down new messages go there directly; the replay
//! thread (`replay`) produces it again when they are back.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, PurgeConfig, ThreadedProducer};
use rdkafka::ClientContext;
use xtcp_feed::auth::FeedKeys;
use xtcp_feed::datagram::{to_delimited, Datagram};
use xtcp_feed::receiver::{
    adopt_receiver, bind_receiver, inherited_socket, nothing_yet, recv_buffer_len,
};
use xtcp_feed::sequence::{Loss, LossWatch, RecordId, DEFAULT_RUN_LIMIT};
use xtcp_service::counters::{exit_line, Tally};
use xtcp_service::metrics::Health;
use xtcp_service::prom::{PromServer, PromThread};
use xtcp_service::shutdown::Shutdown;

use crate::config::{ForwarderConfig, SpoolConfig};
use crate::metrics::{ForwarderMetrics, ForwarderTotals};
use crate::replay::{replay, Shared};
use crate::spool::{Spool, Why};

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
pub struct Context {
    metrics: Arc<ForwarderMetrics>,
    health: Arc<Health>,
    shared: Arc<Shared>,
}

/// What a message carries to its delivery report.
pub struct Sent {
    pub records: u64,
    /// The spool segment it was read back from.
    pub segment: Option<u64>,
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
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.shared.set_down(true);
        }
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
    type DeliveryOpaque = Box<Sent>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Box<Sent>) {
        let records = sent.records;
        let counted = match result {
            Ok(_) => {
                self.health.happened();
                self.shared.set_down(false);
                if sent.segment.is_some() {
                    self.shared.replay_health.happened();
                }
                ForwarderTotals {
                    delivered_messages: 1,
                    delivered_records: records,
                    ..ForwarderTotals::default()
                }
            }
            Err((e, message)) if self.shared.spool.is_some() => {
                let why = self.shared.why(e.rdkafka_error_code());
                if why == Some(Why::DeliveryFailed) {
                    self.shared.set_down(true);
                }
                match (why, self.shared.spool()) {
                    (Some(why), Some(mut spool)) => {
                        spool.append(
                            rdkafka::Message::payload(message).unwrap_or_default(),
                            records,
                            why,
                        );
                        ForwarderTotals::default()
                    }
                    _ => ForwarderTotals {
                        delivery_failed: 1,
                        delivery_failed_records: records,
                        ..ForwarderTotals::default()
                    },
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
        if let Some(segment) = sent.segment {
            self.shared.replay_reported(segment);
        }
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
    let socket = receiver(config)?;
    let granted = recv_buffer_len(&socket).map_err(setup("reading the receive buffer size"))?;
    metrics.gauges.receive_buffer.set(granted as i64);
    socket
        .set_read_timeout(Some(TICK))
        .map_err(setup("setting the receive timeout"))?;
    let spool = config
        .spool
        .as_ref()
        .map(|s| open_spool(s, &metrics))
        .transpose()?;
    let shared = Arc::new(Shared::new(spool));
    let producer = create_producer(
        config,
        Context {
            metrics: Arc::clone(&metrics),
            health: Arc::clone(&health),
            shared: Arc::clone(&shared),
        },
    )?;
    let prom = config
        .prom_listen
        .map(|listen| start_metrics(listen, &metrics, &health, &shared, shutdown))
        .transpose()?;

    let watched = socket
        .try_clone()
        .map_err(setup("watching the socket's drops"))?;
    let mut feed = Feed {
        metrics: &metrics,
        producer: &producer,
        shared: &shared,
        topic: &config.topic,
        message: Vec::with_capacity(MAX_DATAGRAM),
        ids: Vec::new(),
        keys,
        watch: LossWatch::new(watched, DEFAULT_RUN_LIMIT),
    };
    let replay_stop = AtomicBool::new(false);
    let loss = std::thread::scope(|scope| {
        if shared.spool.is_some() {
            let (shared, producer, metrics, stop) = (&shared, &producer, &metrics, &replay_stop);
            let (brokers, topic) = (config.brokers.as_str(), config.topic.as_str());
            std::thread::Builder::new()
                .name("xtcp-replay".into())
                .spawn_scoped(scope, move || {
                    replay(shared, producer, brokers, topic, metrics, stop)
                })
                .map_err(setup("starting the replay thread"))?;
        }
        let loss = receive(&socket, &mut feed, shutdown);
        replay_stop.store(true, Relaxed);
        Ok::<_, ForwarderError>(loss)
    })?;
    feed.count_loss(loss);
    stop_producer(config, &producer, &shared);
    metrics
        .gauges
        .queued
        .set(i64::from(producer.in_flight_count()));
    // Dropping it reports what a last purge finds, into the spool.
    drop(producer);
    if let Some(mut spool) = shared.spool() {
        spool.close();
    }
    if let Some(prom) = prom {
        prom.stop();
    }
    Ok(RunTotals {
        counted: metrics.counters.totals(),
        loss,
    })
}

/// The socket systemd passed, or `--listen` bound with `SO_REUSEPORT`: a
/// restart loses no datagram either way (docs/kafka.md).
fn receiver(config: &ForwarderConfig) -> Result<UdpSocket, ForwarderError> {
    let program = "xtcp-forwarder";
    match inherited_socket().map_err(setup("taking the socket systemd passed"))? {
        Some(socket) => {
            if let Ok(addr) = socket.local_addr() {
                xtcp_service::say!(
                    "{program}: receiving on {addr}, the socket systemd passed (not --listen)"
                );
            }
            adopt_receiver(socket, config.recv_buffer, program)
                .map_err(setup("sizing the passed socket's receive buffer"))
        }
        None => bind_receiver(config.listen, config.recv_buffer, program, true)
            .map_err(setup(format!("binding --listen {}", config.listen))),
    }
}

/// Opens the spool, saying what an earlier run left in it.
fn open_spool(
    config: &SpoolConfig,
    metrics: &Arc<ForwarderMetrics>,
) -> Result<Spool, ForwarderError> {
    let (spool, found) = Spool::open(&config.dir, config.bytes, Arc::clone(metrics)).map_err(
        setup(format!("opening --spool-dir {}", config.dir.display())),
    )?;
    if found.entries > 0 {
        xtcp_service::say!(
            "xtcp-forwarder: the spool in {} holds {} records ({} messages, {} bytes in {} segments) from an earlier run: they are produced first, once the brokers answer",
            config.dir.display(),
            found.records,
            found.entries,
            found.bytes,
            found.segments
        );
    }
    Ok(spool)
}

/// The receive loop, until `shutdown`; then what arrived before the stop is
/// forwarded too, within DRAIN_LIMIT. Returns the loss count.
fn receive(socket: &UdpSocket, feed: &mut Feed<'_>, shutdown: &Shutdown) -> Loss {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut was_down = false;
    let mut ticked = Instant::now();
    while !shutdown.is_stopping() {
        feed.metrics
            .gauges
            .queued
            .set(i64::from(feed.producer.in_flight_count()));
        // The brokers just went: what waits in memory goes to disk.
        let down = feed.shared.is_down();
        if down && !was_down {
            feed.producer
                .purge(PurgeConfig::default().queue().inflight());
        }
        was_down = down;
        // Once a tick, not once a datagram: a burst does not take the
        // spool's lock for each.
        if ticked.elapsed() >= TICK {
            ticked = Instant::now();
            if let Some(mut spool) = feed.shared.spool() {
                spool.tick();
            }
        }
        match socket.recv(&mut buf) {
            Ok(len) => feed.forward(&buf[..len]),
            Err(e) if nothing_yet(&e) => {}
            Err(e) => xtcp_service::say!("xtcp-forwarder: receive: {e}"),
        }
        let loss = feed.watch.tick();
        feed.watch.say_fell_silent("xtcp-forwarder");
        feed.count_loss(loss);
    }
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
    feed.watch.finish()
}

/// At the stop: delivers what is queued within the flush timeout (at once
/// when the brokers are known down and a spool takes it); what is left is
/// purged, into the spool or counted as dropped at shutdown.
fn stop_producer(config: &ForwarderConfig, producer: &ThreadedProducer<Context>, shared: &Shared) {
    shared.stop();
    let flushed = !shared.is_down() && producer.flush(config.flush_timeout).is_ok();
    if !flushed {
        let left = u64::try_from(producer.in_flight_count()).unwrap_or(0);
        if left > 0 && !shared.is_down() {
            xtcp_service::say!(
                "xtcp-forwarder: {left} messages still queued after --flush-timeout {}",
                humantime::format_duration(config.flush_timeout)
            );
        }
        // Purged, their delivery reports spool them or count them (and
        // their records) as dropped at shutdown.
        producer.purge(PurgeConfig::default().queue().inflight());
        let _ = producer.flush(Duration::from_secs(1));
    }
}

/// Turns received datagrams into Kafka messages, counting each one's fate.
struct Feed<'a> {
    metrics: &'a ForwarderMetrics,
    producer: &'a ThreadedProducer<Context>,
    shared: &'a Shared,
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
        if self.shared.is_down() {
            if let Some(mut spool) = self.shared.spool() {
                spool.append(&self.message, records, Why::Outage);
                return;
            }
        }
        let sent = Box::new(Sent {
            records,
            segment: None,
        });
        let record = BaseRecord::<(), [u8], Box<Sent>>::with_opaque_to(self.topic, sent)
            .payload(&self.message[..]);
        match self.producer.send(record) {
            Ok(()) => counted.produced = 1,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                match self.shared.spool() {
                    Some(mut spool) => {
                        spool.append(&self.message, records, Why::QueueFull);
                    }
                    None => {
                        counted.queue_full = 1;
                        counted.queue_full_records = records;
                    }
                }
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
    shared: &Arc<Shared>,
    shutdown: &Shutdown,
) -> Result<PromThread, ForwarderError> {
    let queued = metrics.gauges.queued.clone();
    let (spool_bytes, spool_oldest) = (
        metrics.gauges.spool_bytes.clone(),
        metrics.gauges.spool_oldest_seconds.clone(),
    );
    let health = Arc::clone(health);
    let shared = Arc::clone(shared);
    let server = PromServer::bind(
        "xtcp forwarder",
        listen,
        "/metrics".into(),
        metrics.registry().clone(),
        Box::new(move || {
            // Unhealthy while the spool holds data and none of it was
            // delivered lately: the brokers are away and it grows.
            let spooled = spool_bytes.get();
            if spooled > 0 {
                let state = if shared.is_down() {
                    "spool growing, the brokers down"
                } else {
                    "spool draining"
                };
                let line = format!(
                    "{state}: {spooled} bytes, the oldest {} s old",
                    spool_oldest.get()
                );
                return match shared.replay_health.check(HEALTHY_DELIVERY_GAP) {
                    Ok(ok) => Ok(format!("{ok}; {line}")),
                    Err(stale) => Err(format!("{line}; {stale}")),
                };
            }
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
