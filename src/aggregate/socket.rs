//! The record-writing threads' side of the aggregates: each socket is put
//! in a [`SocketKey`] and added to the thread's [`Tally`], and its counters
//! are compared with what the [`CookieTable`] holds of its last look. The
//! thread moves its tally into the shared one after each batch; the
//! poller resolves the keys into groups at the poll's end (`super::groups`).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use super::sums::{Counters, Sums, ESTABLISHED, LISTEN, RATE_BOUNDS, RTT_BOUNDS, STATES};
use crate::pipeline::sample::mix;
use crate::wire::request::AF_INET;
use crate::wire::{DiagSocket, TcpInfo};

/// A hasher for keys that are already spread out or small: one `mix` per
/// word written, instead of SipHash's rounds.
#[derive(Default)]
pub struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_ne_bytes(word));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = mix(self.0 ^ v);
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }
    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }
}

pub type MixMap<K, V> = HashMap<K, V, BuildHasherDefault<MixHasher>>;

/// The listening ports of each namespace, looked up for every client
/// socket.
pub type Listeners = HashSet<(u64, u16), BuildHasherDefault<MixHasher>>;

/// Where a socket is counted until the poll's end decides its group: its
/// namespace, cgroup, the local port when a server may listen on it, the
/// remote port when it names a service, and the named network of its
/// remote address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SocketKey {
    pub netns: u64,
    /// 0: the kernel gave none (TIME_WAIT and request sockets).
    pub cgroup: u64,
    /// The local port when it is outside the ephemeral range, or was a
    /// listener's in this namespace at the last poll; else 0.
    pub local: u16,
    /// The remote port when well known (1..=1023) or listed; else 0.
    pub remote: u16,
    /// 1 + the index of the named network the remote address is in; 0 for
    /// none.
    pub network: u8,
}

/// A named network (`--aggregate-network NAME=PREFIX`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub addr: IpAddr,
    pub len: u8,
}

impl Network {
    /// Whether `addr` (4 or 16 bytes, network order) is in the network. An
    /// IPv4 network also holds IPv4-mapped IPv6 addresses.
    pub fn contains(&self, addr: &[u8]) -> bool {
        let (net, addr): (Vec<u8>, &[u8]) = match (self.addr, addr.len()) {
            (IpAddr::V4(n), 4) => (n.octets().to_vec(), addr),
            (IpAddr::V4(n), 16) if addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] => {
                (n.octets().to_vec(), &addr[12..])
            }
            (IpAddr::V6(n), 16) => (n.octets().to_vec(), addr),
            _ => return false,
        };
        let (whole, rest) = (usize::from(self.len / 8), self.len % 8);
        if net[..whole] != addr[..whole] {
            return false;
        }
        rest == 0 || (net[whole] ^ addr[whole]) >> (8 - rest) == 0
    }
}

/// How sockets are put in keys: what the configuration and the host say.
#[derive(Debug, Clone)]
pub struct Classifier {
    /// `net.ipv4.ip_local_port_range` of the exporter's namespace.
    pub ephemeral: (u16, u16),
    /// Remote ports that name a service: 1..=1023 and `--aggregate-ports`,
    /// one bit each.
    pub services: Box<[u64; 1024]>,
    pub networks: Vec<Network>,
}

impl Classifier {
    pub fn new(ephemeral: (u16, u16), listed: &[u16], networks: Vec<Network>) -> Self {
        let mut services = Box::new([0u64; 1024]);
        for port in (1..=1023).chain(listed.iter().copied()) {
            services[usize::from(port / 64)] |= 1 << (port % 64);
        }
        Classifier {
            ephemeral,
            services,
            networks,
        }
    }

    fn is_service(&self, port: u16) -> bool {
        self.services[usize::from(port / 64)] & (1 << (port % 64)) != 0
    }

    fn is_ephemeral(&self, port: u16) -> bool {
        (self.ephemeral.0..=self.ephemeral.1).contains(&port)
    }

    /// The key of `socket` of namespace `netns`; `listening` says whether a
    /// port was a listener's there at the last poll.
    pub fn key(
        &self,
        netns: u64,
        socket: &DiagSocket<'_>,
        listening: impl Fn(u64, u16) -> bool,
    ) -> SocketKey {
        let m = &socket.msg;
        let local = m.source_port();
        let remote = m.destination_port();
        let keep_local = m.state() == LISTEN
            || (local != 0 && (!self.is_ephemeral(local) || listening(netns, local)));
        let destination = m.destination();
        // An IPv4 socket's address fills the first 4 of the 16 bytes.
        let destination = if m.family() == AF_INET {
            &destination[..4]
        } else {
            destination
        };
        let network = self
            .networks
            .iter()
            .position(|n| n.contains(destination))
            .map_or(0, |i| i as u8 + 1);
        SocketKey {
            netns,
            cgroup: socket.cgroup_id.unwrap_or(0),
            local: if keep_local { local } else { 0 },
            remote: if self.is_service(remote) { remote } else { 0 },
            network,
        }
    }
}

/// The counters of a socket's `tcp_info`; absent fields (older kernels)
/// read as 0.
pub fn counters(info: &TcpInfo<'_>) -> Counters {
    Counters {
        bytes_sent: info.bytes_sent().unwrap_or(0),
        bytes_received: info.bytes_received().unwrap_or(0),
        segments_sent: u64::from(info.segs_out().unwrap_or(0)),
        retransmits: u64::from(info.total_retrans().unwrap_or(0)),
        rto: u64::from(info.total_rto().unwrap_or(0)),
        rwnd_limited_us: info.rwnd_limited().unwrap_or(0),
        sndbuf_limited_us: info.sndbuf_limited().unwrap_or(0),
    }
}

/// Adds an established connection's RTTs and delivery rate. A connection
/// without an RTT sample yet (min RTT `~0`) or that delivered nothing
/// (rate 0) is left out of that histogram.
pub fn observe(sums: &mut Sums, info: &TcpInfo<'_>) {
    if let Some(rtt) = info.rtt() {
        sums.rtt.observe(&RTT_BOUNDS, f64::from(rtt) / 1e6);
    }
    if let Some(min) = info.min_rtt().filter(|&m| m != u32::MAX) {
        sums.min_rtt.observe(&RTT_BOUNDS, f64::from(min) / 1e6);
    }
    if let Some(rate) = info.delivery_rate().filter(|&r| r != 0) {
        sums.delivery_rate.observe(&RATE_BOUNDS, rate as f64);
    }
}

/// One thread's sums by key since it last handed them over.
#[derive(Debug, Default)]
pub struct Tally {
    index: MixMap<SocketKey, usize>,
    pub entries: Vec<(SocketKey, Sums)>,
    /// The last key added to: sockets come in runs of the same key.
    last: Option<(SocketKey, usize)>,
}

impl Tally {
    pub fn sums(&mut self, key: SocketKey) -> &mut Sums {
        let i = match self.last {
            Some((k, i)) if k == key => i,
            _ => {
                let next = self.entries.len();
                let i = *self.index.entry(key).or_insert(next);
                if i == next {
                    self.entries.push((key, Sums::default()));
                }
                self.last = Some((key, i));
                i
            }
        };
        &mut self.entries[i].1
    }

    /// Adds `socket` of state `state` to `key`'s sums.
    pub fn add_socket(&mut self, key: SocketKey, state: u8, info: Option<&TcpInfo<'_>>) {
        let sums = self.sums(key);
        if usize::from(state) < STATES {
            sums.states[usize::from(state)] += 1;
        }
        if let (ESTABLISHED, Some(info)) = (state, info) {
            observe(sums, info);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Moves everything into `into`, leaving this tally empty.
    pub fn drain_into(&mut self, into: &mut Tally) {
        for (key, sums) in self.entries.drain(..) {
            into.sums(key).add(&sums);
        }
        self.index.clear();
        self.last = None;
    }

    pub fn take(&mut self) -> Tally {
        std::mem::take(self)
    }
}

/// Shards of the cookie table: a power of two, several per thread.
const SHARDS: usize = 64;

/// A tracked connection: what its counters were at the last look, and its
/// key (close messages carry no cgroup: a close is counted where its
/// connection was).
#[derive(Debug, Clone, Copy)]
struct Tracked {
    last: Counters,
    key: SocketKey,
    /// The last poll that saw it.
    poll: u64,
    /// Its close was counted: a dump that still lists it adds nothing.
    closed: bool,
}

/// What the table says of a look at a connection.
pub enum Look {
    /// Its counters moved by this since the last look.
    Moved(Counters),
    /// First seen in its namespace's first poll: its past is not this run's.
    Baseline,
}

/// The last counters of every connection, by namespace and cookie, so a
/// poll (or the close) adds what moved since the one before. Sharded so
/// the writing threads rarely meet on a lock; the poller drops what a poll
/// did not see ([`CookieTable::sweep`]).
pub struct CookieTable {
    shards: Vec<Mutex<MixMap<(u64, u64), Tracked>>>,
}

impl Default for CookieTable {
    fn default() -> Self {
        CookieTable {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl CookieTable {
    fn shard(&self, key: (u64, u64)) -> MutexGuard<'_, MixMap<(u64, u64), Tracked>> {
        let i = (mix(key.0 ^ key.1.rotate_left(32)) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A poll's look at connection `cookie` of `key.netns` with counters
    /// `now`. `baseline`: the poll is its namespace's first, so a
    /// connection not tracked yet moved by nothing.
    pub fn look(
        &self,
        key: SocketKey,
        cookie: u64,
        now: Counters,
        poll: u64,
        baseline: bool,
    ) -> Look {
        let mut shard = self.shard((key.netns, cookie));
        let tracked = shard.entry((key.netns, cookie)).or_insert(Tracked {
            last: if baseline { now } else { Counters::default() },
            key,
            poll,
            closed: false,
        });
        tracked.poll = poll;
        if tracked.closed {
            return Look::Moved(Counters::default());
        }
        let moved = now.since(&tracked.last);
        tracked.last = now;
        tracked.key = key;
        if baseline && moved.is_zero() {
            Look::Baseline
        } else {
            Look::Moved(moved)
        }
    }

    /// The close of connection `cookie` with final counters `now`: what
    /// moved since its last look (all of them for one never polled), and
    /// the key it was counted under (`fallback` for one never polled).
    pub fn close(
        &self,
        fallback: SocketKey,
        cookie: u64,
        now: Counters,
        poll: u64,
    ) -> (SocketKey, Counters) {
        let mut shard = self.shard((fallback.netns, cookie));
        let tracked = shard.entry((fallback.netns, cookie)).or_insert(Tracked {
            last: Counters::default(),
            key: fallback,
            poll,
            closed: false,
        });
        if tracked.closed {
            return (tracked.key, Counters::default());
        }
        let moved = now.since(&tracked.last);
        // Kept as closed until a poll after this one: the dump in flight
        // may still list the connection.
        tracked.closed = true;
        tracked.poll = poll;
        (tracked.key, moved)
    }

    /// After poll `poll`: forgets the connections it did not see (and the
    /// closes counted before it). Returns the connections tracked and the
    /// bytes the table takes for them (its allocated slots).
    pub fn sweep(&self, poll: u64) -> (usize, usize) {
        let slot = std::mem::size_of::<((u64, u64), Tracked)>() + 1;
        self.shards.iter().fold((0, 0), |(n, bytes), shard| {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|_, t| t.poll >= poll);
            (n + shard.len(), bytes + shard.capacity() * slot)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(netns: u64) -> SocketKey {
        SocketKey {
            netns,
            cgroup: 5,
            ..SocketKey::default()
        }
    }

    fn sent(bytes: u64) -> Counters {
        Counters {
            bytes_sent: bytes,
            ..Counters::default()
        }
    }

    fn moved(look: Look) -> Option<u64> {
        match look {
            Look::Moved(c) => Some(c.bytes_sent),
            Look::Baseline => None,
        }
    }

    #[test]
    fn a_connection_counts_what_moved_between_looks_and_at_close() {
        let t = CookieTable::default();
        // There before the run: its past is not counted.
        assert_eq!(moved(t.look(key(1), 9, sent(100), 1, true)), None);
        // New after the first poll: all of it.
        assert_eq!(moved(t.look(key(1), 10, sent(40), 2, false)), Some(40));
        assert_eq!(moved(t.look(key(1), 9, sent(150), 2, false)), Some(50));
        assert_eq!(t.sweep(2).0, 2);
        // Closed: the rest, under the key it was polled with.
        let fallback = SocketKey {
            cgroup: 0,
            ..key(1)
        };
        let (k, c) = t.close(fallback, 9, sent(170), 3);
        assert_eq!((k.cgroup, c.bytes_sent), (5, 20));
        // A dump in flight that still lists it adds nothing.
        assert_eq!(moved(t.look(key(1), 9, sent(170), 3, false)), Some(0));
        // Never polled: counted whole, under the fallback.
        let (k, c) = t.close(fallback, 11, sent(7), 3);
        assert_eq!((k.cgroup, c.bytes_sent), (0, 7));
        assert_eq!(t.sweep(3).0, 2, "10 not seen by poll 3: forgotten");
        assert_eq!(t.sweep(4).0, 0, "the closes go after the next poll");
    }

    #[test]
    fn networks_hold_their_prefix_and_mapped_addresses() {
        let net = Network {
            name: "lan".into(),
            addr: "10.1.0.0".parse().unwrap(),
            len: 15,
        };
        assert!(net.contains(&[10, 1, 200, 1]));
        assert!(net.contains(&[10, 0, 0, 1]), "10.1.0.0/15 is 10.0.0.0/15");
        assert!(!net.contains(&[10, 2, 0, 1]));
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&[10, 0, 3, 4]);
        assert!(net.contains(&mapped));
        let v6 = Network {
            name: "v6".into(),
            addr: "fd00::".parse().unwrap(),
            len: 8,
        };
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        assert!(v6.contains(&a) && !v6.contains(&[10, 1, 0, 1]));
    }

    #[test]
    fn listed_and_well_known_ports_name_services() {
        let c = Classifier::new((32768, 60999), &[5432], vec![]);
        assert!(c.is_service(443) && c.is_service(5432) && c.is_service(1023));
        assert!(!c.is_service(1024) && !c.is_service(0) && !c.is_service(40000));
        assert!(c.is_ephemeral(32768) && !c.is_ephemeral(8080));
    }
}
