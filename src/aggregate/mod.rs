//! Per-service TCP health: the sockets of every poll summed by service and
//! peer group, for people who read Prometheus or OpenTelemetry rather than
//! the record feed (`docs/metrics.md`, "Per-service aggregates").
//!
//! - Every sampled socket of a poll is counted by its record writer
//!   ([`Accumulator`]), before `--changes-only` decides what is exported:
//!   sockets by state, and for established connections their smoothed RTT,
//!   min RTT and delivery rate into histograms.
//! - Counters (bytes, retransmitted segments, RTOs, time limited by the
//!   receive window and the send buffer) are what moved since the last look
//!   at the same connection, tracked by cookie; with `--close-records` the
//!   last look is the close, so connections shorter than a poll count too.
//! - At the poll's end the poller resolves the keys into groups
//!   ([`groups`]), names each group's service from its cgroup
//!   (`crate::attribution`), bounds the groups and publishes a
//!   [`Snapshot`] that the metrics endpoint ([`prom`]) and the OTLP push
//!   ([`otlp`]) read whole.

mod cookies;
mod groups;
pub mod otlp;
pub mod prom;
mod socket;
mod sums;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::attribution::published::{Published, Reader};
use crate::attribution::CgroupView;
use crate::export::record::PollStamp;
use crate::wire::DiagSocket;
use xtcp_feed::proto::RecordKind;

use cookies::{Ask, CookieTable, Look};
pub use groups::{Group, GroupLabels, Published as PublishedGroups, Side, Snapshot};
use socket::{counters, Listeners, Tally};
pub use socket::{Classifier, Network};
pub use sums::{Counters, Histogram, RATE_BOUNDS, RTT_BOUNDS};

/// The service of sockets whose cgroup is unknown: TIME_WAIT and request
/// sockets of clients, close messages of connections never polled, and
/// every socket with `--no-cgroup-paths`.
pub const UNATTRIBUTED: &str = "unattributed";

/// `--aggregate-*`: how sockets are grouped and how many groups are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateConfig {
    /// `--aggregate-groups`: most groups besides the folded one.
    pub groups: usize,
    /// `--aggregate-ttl`: polls a group may go unseen before it goes.
    pub ttl: u64,
    /// `--aggregate-ports`: remote ports that name a service, beyond 1..=1023.
    pub ports: Vec<u16>,
    /// `--aggregate-networks`: named networks of remote addresses.
    pub networks: Vec<Network>,
}

/// The aggregates of a run, shared by the record writers (which add), the
/// poller (which publishes) and the exposition (which reads).
pub struct Aggregates {
    classifier: Classifier,
    /// Listening ports per namespace at the last publication.
    listeners: Published<Listeners>,
    cookies: CookieTable,
    /// What the writers handed over since the last publication.
    pending: Mutex<Tally>,
    /// The poll each namespace polled now was first polled in:
    /// connections seen then were there before the exporter saw the
    /// namespace, and their past is not counted.
    first_polls: Mutex<HashMap<u64, u64>>,
    groups: Mutex<groups::Groups>,
    cgroups: Mutex<Option<CgroupView>>,
    snapshot: Mutex<Arc<Snapshot>>,
}

impl Aggregates {
    pub fn new(
        config: &AggregateConfig,
        ephemeral: (u16, u16),
        cgroups: Option<CgroupView>,
    ) -> Self {
        Aggregates {
            classifier: Classifier::new(ephemeral, &config.ports, config.networks.clone()),
            listeners: Published::default(),
            cookies: CookieTable::default(),
            pending: Mutex::default(),
            first_polls: Mutex::default(),
            groups: Mutex::new(groups::Groups::new(config.groups, config.ttl)),
            cgroups: Mutex::new(cgroups),
            snapshot: Mutex::default(),
        }
    }

    /// The names of the `--aggregate-networks`, by index.
    pub fn network_names(&self) -> Vec<&str> {
        self.classifier
            .networks
            .iter()
            .map(|n| n.name.as_str())
            .collect()
    }

    /// A record writer's accumulator.
    pub fn accumulator(self: &Arc<Self>) -> Accumulator {
        Accumulator {
            listeners: self.listeners.reader(),
            shared: Arc::clone(self),
            tally: Tally::default(),
            asks: Vec::new(),
            first: None,
        }
    }

    /// At the start of poll `poll`, the namespaces it covers (those with
    /// no socket too): a namespace new to the run has its first poll now,
    /// and one gone is forgotten.
    pub fn begin_poll(&self, poll: u64, namespaces: impl Iterator<Item = u64>) {
        let mut first = self.first_polls.lock().unwrap_or_else(|e| e.into_inner());
        let mut now: HashMap<u64, u64> = namespaces.map(|ns| (ns, poll)).collect();
        for (ns, since) in now.iter_mut() {
            if let Some(&before) = first.get(ns) {
                *since = before;
            }
        }
        *first = now;
    }

    /// Whether poll `poll` is the first of namespace `netns` (one the poll
    /// did not announce counts as new: its connections start from now).
    fn is_first_poll(&self, netns: u64, poll: u64) -> bool {
        let first = self.first_polls.lock().unwrap_or_else(|e| e.into_inner());
        first.get(&netns).is_none_or(|&f| f == poll)
    }

    /// After poll `poll`, ended at `time_ns`: resolves what the writers
    /// counted into groups, publishes them, and forgets the connections
    /// the poll did not see. Returns what it did, and the connections
    /// tracked with the bytes their table takes.
    pub fn publish(&self, poll: u64, time_ns: u64) -> (PublishedGroups, (usize, usize)) {
        let tally = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let mut cgroups = self.cgroups.lock().unwrap_or_else(|e| e.into_inner());
        let service = |id: u64| -> Arc<str> {
            let owner = (id != 0)
                .then(|| cgroups.as_mut().and_then(|c| c.owner(id)))
                .flatten();
            match owner.map(|o| o.service()).filter(|s| !s.is_empty()) {
                Some(s) => Arc::from(s),
                None => Arc::from(UNATTRIBUTED),
            }
        };
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let (listeners, published) = groups.publish(&tally, poll, time_ns, service);
        self.listeners.replace(listeners);
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(groups.snapshot(poll, time_ns));
        (published, self.cookies.sweep(poll))
    }

    /// The last publication.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A record writer's share of the aggregates: adds sockets to its own
/// tally, hands it over after each batch.
pub struct Accumulator {
    shared: Arc<Aggregates>,
    listeners: Reader<Listeners>,
    tally: Tally,
    /// The connections of the datagram being added, reused.
    asks: Vec<Ask>,
    /// The namespace and poll of the last datagram, and whether it was the
    /// namespace's first poll.
    first: Option<(u64, u64, bool)>,
}

impl Accumulator {
    /// Adds the decoded sockets of one datagram of a poll's dump or,
    /// stamped closed, of close messages.
    pub fn add<'s, 'd: 's>(
        &mut self,
        stamp: &PollStamp,
        sockets: impl IntoIterator<Item = &'s DiagSocket<'d>>,
    ) {
        let netns = stamp.netns_inode;
        let closes = stamp.kind == RecordKind::Closed;
        let Accumulator {
            shared,
            listeners,
            tally,
            asks,
            ..
        } = self;
        asks.clear();
        for socket in sockets {
            let key = shared
                .classifier
                .key(netns, socket, |ns, port| listeners.contains(&(ns, port)));
            let info = socket.tcp_info.as_ref();
            if !closes {
                tally.add_socket(key, socket.msg.state(), info);
            }
            if let Some(info) = info {
                let cookie = socket.msg.cookie();
                let now = counters(info);
                asks.push(Ask { key, cookie, now });
            }
        }
        if asks.is_empty() {
            return;
        }
        let poll = stamp.poll_id;
        if closes {
            shared.cookies.close(asks, poll, |key, moved| {
                tally.sums(key).counters.add(&moved)
            });
            return;
        }
        let baseline = match self.first {
            Some((ns, p, first)) if ns == netns && p == poll => first,
            _ => {
                let first = self.shared.is_first_poll(netns, poll);
                self.first = Some((netns, poll, first));
                first
            }
        };
        let Accumulator {
            shared,
            tally,
            asks,
            ..
        } = self;
        shared.cookies.look(asks, poll, baseline, |ask, look| {
            if let Look::Moved(moved) = look {
                tally.sums(ask.key).counters.add(&moved);
            }
        });
    }

    /// Hands what was added since the last call to the next publication.
    pub fn flush(&mut self) {
        self.listeners.refresh(&self.shared.listeners);
        if self.tally.is_empty() {
            return;
        }
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.tally.drain_into(&mut pending);
    }
}

/// `net.ipv4.ip_local_port_range` of the exporter's namespace; Linux's
/// default when it cannot be read.
pub fn ephemeral_ports() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range");
    let parsed = range.ok().and_then(|s| {
        let mut words = s.split_whitespace().map(str::parse::<u16>);
        Some((words.next()?.ok()?, words.next()?.ok()?))
    });
    parsed.unwrap_or((32768, 60999))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_is_new_at_the_first_poll_that_covers_it() {
        let config = AggregateConfig {
            groups: 10,
            ttl: 3,
            ports: vec![],
            networks: vec![],
        };
        let a = Aggregates::new(&config, (32768, 60999), None);
        a.begin_poll(1, [7].into_iter());
        assert!(a.is_first_poll(7, 1));
        // Namespace 8 appears at poll 2 (empty, say); at poll 3 its sockets
        // are new.
        a.begin_poll(2, [7, 8].into_iter());
        assert!(!a.is_first_poll(7, 2) && a.is_first_poll(8, 2));
        a.begin_poll(3, [7, 8].into_iter());
        assert!(!a.is_first_poll(8, 3));
        // Gone, then back: new again.
        a.begin_poll(4, [7].into_iter());
        a.begin_poll(5, [7, 8].into_iter());
        assert!(a.is_first_poll(8, 5));
    }
}
