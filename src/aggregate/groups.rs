//! The poll's end: the keys the threads counted under become groups of
//! service and peer, added to the run's series, bounded in number and
//! forgotten when unseen for long enough.
//!
//! A key with a local port is the server side of a connection when that
//! port had a listener in the key's namespace in this poll: its group is
//! that port's. Every other key is a client's, grouped by its remote port
//! (0: not a service port, "ephemeral"). Keys, not sockets, are resolved,
//! so the order in which the threads saw listeners and connections does
//! not matter.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::socket::{Listeners, SocketKey, Tally};
use super::sums::{Counters, Histogram, Sums, LISTEN, STATES};

/// Which end of its connections a group's sockets are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// Listeners and the connections accepted on them.
    Server,
    Client,
    /// The groups past the cap, folded together.
    Other,
}

impl Side {
    pub fn label(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
            Side::Other => "other",
        }
    }
}

/// A group: whose sockets, which end, which port, which named network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupLabels {
    pub service: Arc<str>,
    pub side: Side,
    /// The listening port (server), the remote service port (client); 0
    /// for a client of an ephemeral port, and for the folded group.
    pub port: u16,
    /// 1 + the index of the named network; 0 for none.
    pub network: u8,
}

impl GroupLabels {
    /// The group every group past the cap is folded into.
    pub fn other() -> Self {
        GroupLabels {
            service: Arc::from("other"),
            side: Side::Other,
            port: 0,
            network: 0,
        }
    }
}

/// A group's series: the last poll's sockets by state, and the run's
/// histograms and counters.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// States the group has had a socket in: their series stay (at 0)
    /// while the group lives.
    pub states_seen: u32,
    pub states: [u64; STATES],
    pub rtt: Histogram,
    pub min_rtt: Histogram,
    pub delivery_rate: Histogram,
    pub counters: Counters,
    /// The last poll with a socket or a counted change in the group.
    pub last_poll: u64,
    /// When its series began, ns since the Unix epoch (OTLP's start time).
    pub start_ns: u64,
}

impl Group {
    fn new(start_ns: u64) -> Self {
        Group {
            states_seen: 0,
            states: [0; STATES],
            rtt: Histogram::default(),
            min_rtt: Histogram::default(),
            delivery_rate: Histogram::default(),
            counters: Counters::default(),
            last_poll: 0,
            start_ns,
        }
    }

    fn add(&mut self, sums: &Sums, poll: u64) {
        for (state, n) in sums.states.iter().enumerate() {
            if *n > 0 {
                self.states[state] += n;
                self.states_seen |= 1 << state;
            }
        }
        self.rtt.add(&sums.rtt);
        self.min_rtt.add(&sums.min_rtt);
        self.delivery_rate.add(&sums.delivery_rate);
        self.counters.add(&sums.counters);
        if sums.sockets() > 0 || !sums.counters.is_zero() {
            self.last_poll = poll;
        }
    }
}

/// What a publication hands to the exposition: every live group, sorted.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The poll the series are of; 0 before the first.
    pub poll: u64,
    /// When it ended, ns since the Unix epoch.
    pub time_ns: u64,
    pub groups: Vec<(GroupLabels, Group)>,
}

/// What one publication did, for the bookkeeping metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    pub groups: usize,
    /// Groups that had sockets or changes this poll but found no room
    /// under the cap, and went to the folded group.
    pub folded: usize,
    /// Groups forgotten, unseen for the TTL.
    pub expired: usize,
}

/// The run's groups, at most `cap` of them besides the folded one.
pub struct Groups {
    cap: usize,
    /// Polls a group may go unseen before it is forgotten.
    ttl: u64,
    groups: HashMap<GroupLabels, Group>,
}

impl Groups {
    pub fn new(cap: usize, ttl: u64) -> Self {
        Groups {
            cap,
            ttl: ttl.max(1),
            groups: HashMap::new(),
        }
    }

    /// Adds the poll's `tally` as poll `poll`, ended at `now_ns`; `service`
    /// names a cgroup id's owner. Returns the listening ports per namespace
    /// (for the next poll's keys), and what it did.
    pub fn publish(
        &mut self,
        tally: &Tally,
        poll: u64,
        now_ns: u64,
        mut service: impl FnMut(u64) -> Arc<str>,
    ) -> (Listeners, Published) {
        let mut listeners: HashMap<(u64, u16), u64> = HashMap::new();
        for (key, sums) in &tally.entries {
            if key.local != 0 && sums.states[usize::from(LISTEN)] > 0 {
                let cgroup = listeners.entry((key.netns, key.local)).or_insert(0);
                if *cgroup == 0 {
                    *cgroup = key.cgroup;
                }
            }
        }
        for group in self.groups.values_mut() {
            group.states = [0; STATES];
        }
        let mut folded = HashSet::new();
        let mut own = self.groups.keys().filter(|l| l.side != Side::Other).count();
        let mut services: HashMap<u64, Arc<str>> = HashMap::new();
        for (key, sums) in &tally.entries {
            let labels = labels(key, &listeners, |id| {
                Arc::clone(services.entry(id).or_insert_with(|| service(id)))
            });
            let known = self.groups.contains_key(&labels);
            // A close that moved nothing makes no group (nor takes a place).
            if !known && sums.sockets() == 0 && sums.counters.is_zero() {
                continue;
            }
            let labels = if known {
                labels
            } else if own < self.cap {
                own += 1;
                labels
            } else {
                folded.insert(labels);
                GroupLabels::other()
            };
            self.groups
                .entry(labels)
                .or_insert_with(|| Group::new(now_ns))
                .add(sums, poll);
        }
        let before = self.groups.len();
        let ttl = self.ttl;
        self.groups.retain(|_, g| g.last_poll + ttl > poll);
        let published = Published {
            groups: self.groups.len(),
            folded: folded.len(),
            expired: before - self.groups.len(),
        };
        (listeners.into_keys().collect(), published)
    }

    /// The live groups, sorted, as of poll `poll` ended at `time_ns`.
    pub fn snapshot(&self, poll: u64, time_ns: u64) -> Snapshot {
        let sorted: BTreeMap<&GroupLabels, &Group> = self.groups.iter().collect();
        Snapshot {
            poll,
            time_ns,
            groups: sorted
                .into_iter()
                .map(|(l, g)| (l.clone(), g.clone()))
                .collect(),
        }
    }
}

/// The group of `key`: a server's when its local port had a listener
/// in its namespace this poll (sockets without a cgroup, TIME_WAIT and
/// request sockets, take the listener's), else a client's.
fn labels(
    key: &SocketKey,
    listeners: &HashMap<(u64, u16), u64>,
    mut service: impl FnMut(u64) -> Arc<str>,
) -> GroupLabels {
    let listener = (key.local != 0)
        .then(|| listeners.get(&(key.netns, key.local)))
        .flatten();
    let (side, port, cgroup) = match listener {
        Some(&listener_cgroup) => {
            let cgroup = if key.cgroup != 0 {
                key.cgroup
            } else {
                listener_cgroup
            };
            (Side::Server, key.local, cgroup)
        }
        None => (Side::Client, key.remote, key.cgroup),
    };
    GroupLabels {
        service: service(cgroup),
        side,
        port,
        network: key.network,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::sums::ESTABLISHED;

    fn key(netns: u64, cgroup: u64, local: u16, remote: u16) -> SocketKey {
        SocketKey {
            netns,
            cgroup,
            local,
            remote,
            network: 0,
        }
    }

    fn add(tally: &mut Tally, key: SocketKey, state: u8, n: u64) {
        tally.sums(key).states[usize::from(state)] += n;
    }

    fn service(id: u64) -> Arc<str> {
        Arc::from(format!("s{id}").as_str())
    }

    fn find<'a>(s: &'a Snapshot, service: &str, side: Side, port: u16) -> &'a Group {
        let found = s
            .groups
            .iter()
            .find(|(l, _)| &*l.service == service && l.side == side && l.port == port);
        &found
            .unwrap_or_else(|| panic!("no {service} {side:?} {port} in {s:?}"))
            .1
    }

    #[test]
    fn a_local_port_is_a_server_only_where_it_listens() {
        let mut groups = Groups::new(10, 3);
        let mut t = Tally::default();
        // Namespace 1: a listener on 8080 and two accepted connections, one
        // TIME_WAIT (no cgroup). Namespace 2: a socket on local port 8080
        // but no listener there: a client of port 5432.
        add(&mut t, key(1, 7, 8080, 0), LISTEN, 1);
        add(&mut t, key(1, 7, 8080, 0), ESTABLISHED, 2);
        add(&mut t, key(1, 0, 8080, 0), 6, 1);
        add(&mut t, key(2, 9, 8080, 5432), ESTABLISHED, 1);
        add(&mut t, key(1, 9, 0, 0), ESTABLISHED, 4);
        let (listeners, published) = groups.publish(&t, 1, 0, service);
        assert_eq!(listeners.into_iter().collect::<Vec<_>>(), [(1, 8080)]);
        assert_eq!((published.groups, published.folded), (3, 0));
        let s = groups.snapshot(1, 0);
        let server = find(&s, "s7", Side::Server, 8080);
        assert_eq!(
            (server.states[1], server.states[6], server.states[10]),
            (2, 1, 1)
        );
        assert_eq!(find(&s, "s9", Side::Client, 5432).states[1], 1);
        assert_eq!(find(&s, "s9", Side::Client, 0).states[1], 4);
    }

    #[test]
    fn past_the_cap_groups_fold_and_unseen_ones_expire() {
        let mut groups = Groups::new(2, 2);
        let mut t = Tally::default();
        for port in [1, 2, 3, 4] {
            add(&mut t, key(1, 1, 0, port), ESTABLISHED, 1);
        }
        let (_, p) = groups.publish(&t, 1, 0, service);
        assert_eq!(
            (p.groups, p.folded),
            (3, 2),
            "two of their own, the folded one"
        );
        let s = groups.snapshot(1, 0);
        assert_eq!(find(&s, "other", Side::Other, 0).states[1], 2);
        // Poll 2: only port 1 is seen; poll 3 forgets the others (TTL 2).
        let mut t = Tally::default();
        add(&mut t, key(1, 1, 0, 1), ESTABLISHED, 1);
        assert_eq!(groups.publish(&t, 2, 0, service).1.expired, 0);
        let (_, p) = groups.publish(&t, 3, 0, service);
        assert_eq!((p.groups, p.expired), (1, 2));
        // Room again: port 4 gets a group of its own.
        add(&mut t, key(1, 1, 0, 4), ESTABLISHED, 1);
        let (_, p) = groups.publish(&t, 4, 0, service);
        assert_eq!((p.groups, p.folded), (2, 0));
        // A key with nothing in it (a close that moved nothing) is no group.
        let mut empty = Tally::default();
        empty.sums(key(1, 1, 0, 5));
        assert_eq!(groups.publish(&empty, 5, 0, service).1.groups, 2);
    }
}
