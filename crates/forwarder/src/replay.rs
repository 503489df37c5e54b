//! What the forwarder knows of the brokers, shared by the receive loop, the
//! delivery reports and the replay thread; and the replay thread, which
//! produces the spool's entries again, in order, while the brokers accept.
//!
//! The brokers are *down* from the start (with a spool) until a metadata
//! request finds the topic's every partition led, and again after librdkafka
//! reports all brokers down or a message's delivery fails. While down, new
//! messages go straight to the spool and the producer's queue is emptied
//! into it, so that nothing waits in memory that a `kill -9` would lose;
//! once a second the replay thread tries a connection to the bootstrap
//! brokers and, when one accepts, asks for the topic's metadata.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use xtcp_service::metrics::Health;

use crate::forwarder::{Context, Sent};
use crate::metrics::{ForwarderMetrics, ForwarderTotals};
use crate::spool::{Spool, Taken, Why};

/// Replayed messages in the producer's queue at most: enough to keep a
/// broker's batches full (at most 64 MiB of them), few enough that new
/// data keeps its room.
const WINDOW: u64 = 1024;
/// A metadata request's wait while the brokers are down, and the time
/// between two requests' starts.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The replay thread's nap when there is nothing it may do.
const NAP: Duration = Duration::from_millis(20);

/// Shared state.
pub struct Shared {
    pub spool: Option<Mutex<Spool>>,
    down: AtomicBool,
    /// Set at the stop: purged messages are spooled as `shutdown`.
    stopping: AtomicBool,
    /// Replayed messages produced and not yet reported.
    replaying: AtomicU64,
    /// A replayed message's acknowledgement.
    pub replay_health: Health,
}

impl Shared {
    pub fn new(spool: Option<Spool>) -> Self {
        Shared {
            down: AtomicBool::new(spool.is_some()),
            spool: spool.map(Mutex::new),
            stopping: AtomicBool::new(false),
            replaying: AtomicU64::new(0),
            replay_health: Health::new("delivery from the spool"),
        }
    }

    /// The spool, locked; a panic elsewhere while holding it leaves it
    /// consistent enough to keep appending (each write is whole or undone).
    pub fn spool(&self) -> Option<MutexGuard<'_, Spool>> {
        self.spool
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// With a spool, whether new messages go straight to it.
    pub fn is_down(&self) -> bool {
        self.spool.is_some() && self.down.load(Relaxed)
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Relaxed);
    }

    pub fn stop(&self) {
        self.stopping.store(true, Relaxed);
    }

    /// Why a message that failed with `code` goes to the spool, or `None`
    /// when it is refused for good (counted as dropped).
    pub fn why(&self, code: Option<RDKafkaErrorCode>) -> Option<Why> {
        use RDKafkaErrorCode as C;
        match code? {
            C::PurgeQueue | C::PurgeInflight if self.stopping.load(Relaxed) => Some(Why::Shutdown),
            C::PurgeQueue | C::PurgeInflight => Some(Why::Withdrawn),
            // What a broker away or a partition without a leader gives.
            C::MessageTimedOut
            | C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::RequestTimedOut
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::UnknownTopicOrPartition
            | C::BrokerNotAvailable
            | C::NetworkException
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend => Some(Why::DeliveryFailed),
            _ => None,
        }
    }

    /// A replayed message is reported (delivered, spooled again or dropped).
    pub fn replay_reported(&self, segment: u64) {
        self.replaying.fetch_sub(1, Relaxed);
        if let Some(mut spool) = self.spool() {
            spool.resolved(segment);
        }
    }
}

/// Whether one of the bootstrap brokers (`HOST:PORT,...`) accepts a TCP
/// connection within a second.
fn reachable(brokers: &str) -> bool {
    brokers.split(',').any(|broker| {
        broker.trim().to_socket_addrs().is_ok_and(|mut addrs| {
            addrs.any(|addr| TcpStream::connect_timeout(&addr, PROBE_EVERY).is_ok())
        })
    })
}

/// Whether the topic's every partition has a leader.
fn usable(metadata: &Metadata) -> bool {
    metadata.topics().first().is_some_and(|topic| {
        topic.error().is_none()
            && !topic.partitions().is_empty()
            && topic.partitions().iter().all(|p| p.leader() >= 0)
    })
}

/// The replay thread's body: until `stop`, produces the spool's entries
/// while the brokers are up, at most [`WINDOW`] at a time.
pub fn replay(
    shared: &Shared,
    producer: &ThreadedProducer<Context>,
    brokers: &str,
    topic: &str,
    metrics: &ForwarderMetrics,
    stop: &AtomicBool,
) {
    let mut buf = Vec::new();
    // An entry taken that the full queue did not take yet.
    let mut held: Option<Taken> = None;
    while !stop.load(Relaxed) {
        if shared.down.load(Relaxed) {
            let asked = Instant::now();
            // A metadata request to brokers that refuse connections makes
            // librdkafka reconnect (and report all brokers down) many times
            // a second: it is sent once one of them accepts a connection.
            let up = reachable(brokers)
                && producer
                    .client()
                    .fetch_metadata(Some(topic), PROBE_EVERY)
                    .is_ok_and(|metadata| usable(&metadata));
            if up {
                shared.set_down(false);
            } else {
                while asked.elapsed() < PROBE_EVERY && !stop.load(Relaxed) {
                    std::thread::sleep(NAP);
                }
            }
            continue;
        }
        if shared.replaying.load(Relaxed) >= WINDOW {
            std::thread::sleep(NAP / 4);
            continue;
        }
        let taken = match held.take() {
            Some(taken) => taken,
            None => match shared.spool().and_then(|mut s| s.take(&mut buf)) {
                Some(taken) => taken,
                None => {
                    std::thread::sleep(NAP);
                    continue;
                }
            },
        };
        let sent = Box::new(Sent {
            records: taken.records,
            segment: Some(taken.segment),
        });
        shared.replaying.fetch_add(1, Relaxed);
        match producer
            .send(BaseRecord::<(), [u8], Box<Sent>>::with_opaque_to(topic, sent).payload(&buf[..]))
        {
            Ok(()) => metrics.counters.add(
                &[],
                &ForwarderTotals {
                    replayed: 1,
                    replayed_records: taken.records,
                    ..ForwarderTotals::default()
                },
            ),
            Err((e, _)) => {
                shared.replaying.fetch_sub(1, Relaxed);
                if matches!(
                    e,
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
                ) {
                    held = Some(taken);
                    std::thread::sleep(NAP / 4);
                } else {
                    xtcp_service::say!("xtcp-forwarder: producing from the spool: {e}");
                    respool(shared, &buf, taken, Why::DeliveryFailed);
                }
            }
        }
    }
    if let Some(taken) = held {
        respool(shared, &buf, taken, Why::Shutdown);
    }
}

/// Appends a taken entry again at the spool's end and resolves it.
fn respool(shared: &Shared, payload: &[u8], taken: Taken, why: Why) {
    if let Some(mut spool) = shared.spool() {
        spool.append(payload, taken.records, why);
        spool.resolved(taken.segment);
    }
}
