//! The record-writing threads' side of the aggregates: each socket is put
//! in a [`SocketKey`] and added to the thread's [`Tally`], and its counters
//! are compared with what the [`CookieTable`] holds of its last look. The
//! thread moves its tally into the shared one after each batch; the
//! poller resolves the keys into groups at the poll's end (`super::groups`).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

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

/// Keys remembered before the map is asked: a dump interleaves a few
/// (each listener's accepted connections with the clients of it).
const RECENT: usize = 4;

/// One thread's sums by key since it last handed them over.
#[derive(Debug, Default)]
pub struct Tally {
    index: MixMap<SocketKey, usize>,
    pub entries: Vec<(SocketKey, Sums)>,
    /// The last keys added to, and where their sums are.
    recent: [Option<(SocketKey, usize)>; RECENT],
    /// The next of `recent` to replace.
    next_recent: usize,
}

impl Tally {
    pub fn sums(&mut self, key: SocketKey) -> &mut Sums {
        let known = self.recent.iter().flatten().find(|(k, _)| *k == key);
        let i = match known {
            Some(&(_, i)) => i,
            None => {
                let next = self.entries.len();
                let i = *self.index.entry(key).or_insert(next);
                if i == next {
                    self.entries.push((key, Sums::default()));
                }
                self.recent[self.next_recent] = Some((key, i));
                self.next_recent = (self.next_recent + 1) % RECENT;
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
        self.recent = [None; RECENT];
    }

    pub fn take(&mut self) -> Tally {
        std::mem::take(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
