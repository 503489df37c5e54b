//! The last counters of every connection, by namespace and cookie, so a
//! poll (or the close) adds what moved since the look before.
//!
//! One look per socket per poll, in no order the table can use: with a
//! hash map each look was a cache miss or two (three quarters of the
//! aggregates' CPU at 100k sockets, `perf annotate`). So the table is laid
//! out for misses: open addressing with linear probing, one cache line per
//! connection, and the looks of a datagram's sockets made in two passes.
//! The first only loads each socket's home slot; those loads do not depend
//! on each other, so the processor has them all in flight at once. The
//! second finds and updates the slots, mostly in cache by then.

use std::sync::Mutex;

use super::socket::SocketKey;
use super::sums::Counters;
use crate::pipeline::sample::mix;

/// A connection's slot: 63 bytes, one cache line. `cookie` 0 is empty (the
/// kernel's cookies start at 1).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Slot {
    cookie: u64,
    netns: u64,
    bytes_sent: u64,
    bytes_received: u64,
    /// Close messages carry none: a close is counted where its connection
    /// was.
    cgroup: u64,
    /// The last poll that saw it.
    poll: u32,
    segments_sent: u32,
    retransmits: u32,
    /// The low 32 bits of the microseconds (`Counters::since` wraps them).
    rwnd_limited_us: u32,
    sndbuf_limited_us: u32,
    rto: u16,
    /// Its close was counted: a dump that still lists it adds nothing.
    closed: bool,
}

impl Slot {
    fn counters(&self) -> Counters {
        Counters {
            bytes_sent: self.bytes_sent,
            bytes_received: self.bytes_received,
            segments_sent: u64::from(self.segments_sent),
            retransmits: u64::from(self.retransmits),
            rto: u64::from(self.rto),
            rwnd_limited_us: u64::from(self.rwnd_limited_us),
            sndbuf_limited_us: u64::from(self.sndbuf_limited_us),
        }
    }

    fn keep(&mut self, c: &Counters) {
        self.bytes_sent = c.bytes_sent;
        self.bytes_received = c.bytes_received;
        // Narrow by design: tcp_info's fields are this wide (the times
        // limited: see Counters::BITS).
        self.segments_sent = c.segments_sent as u32;
        self.retransmits = c.retransmits as u32;
        self.rto = c.rto as u16;
        self.rwnd_limited_us = c.rwnd_limited_us as u32;
        self.sndbuf_limited_us = c.sndbuf_limited_us as u32;
    }
}

/// One connection a datagram asks about.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub key: SocketKey,
    pub cookie: u64,
    pub now: Counters,
}

/// What the table says of a look at a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Its counters moved by this since the last look.
    Moved(Counters),
    /// First seen in its namespace's first poll: its past is not this run's.
    Baseline,
}

/// Linear probing over a power-of-two array, at most 3/4 full.
struct Slots {
    slots: Vec<Slot>,
    len: usize,
}

impl Slots {
    /// Room for `n` connections.
    fn with_capacity(n: usize) -> Self {
        Slots::with_slots((n * 4 / 3 + 1).next_power_of_two().max(64))
    }

    fn with_slots(slots: usize) -> Self {
        Slots {
            slots: vec![Slot::default(); slots],
            len: 0,
        }
    }

    fn home(&self, netns: u64, cookie: u64) -> usize {
        (mix(netns ^ cookie.rotate_left(32)) as usize) & (self.slots.len() - 1)
    }

    /// The first pass: the home slots of `asks`, loaded. Returns something
    /// of them so the loads are made.
    fn touch(&self, asks: &[Ask]) -> u64 {
        asks.iter()
            .map(|a| self.slots[self.home(a.key.netns, a.cookie)].cookie)
            .fold(0, u64::wrapping_add)
    }

    /// The slot of a connection, made (empty of counters) if new; whether
    /// it was.
    fn slot(&mut self, netns: u64, cookie: u64) -> (&mut Slot, bool) {
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(netns, cookie);
        loop {
            let s = &self.slots[i];
            if s.cookie == 0 {
                self.len += 1;
                let s = &mut self.slots[i];
                *s = Slot {
                    cookie,
                    netns,
                    ..Slot::default()
                };
                return (s, true);
            }
            if s.cookie == cookie && s.netns == netns {
                return (&mut self.slots[i], false);
            }
            i = (i + 1) & mask;
        }
    }

    fn grow(&mut self) {
        let mut bigger = Slots::with_slots(self.slots.len() * 2);
        bigger.insert_all(self.slots.iter().filter(|s| s.cookie != 0));
        *self = bigger;
    }

    fn insert_all<'a>(&mut self, slots: impl Iterator<Item = &'a Slot>) {
        let mask = self.slots.len() - 1;
        for s in slots {
            let mut i = self.home(s.netns, s.cookie);
            while self.slots[i].cookie != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = *s;
            self.len += 1;
        }
    }
}

/// The table, under one lock taken once per datagram.
pub struct CookieTable {
    slots: Mutex<Slots>,
}

impl Default for CookieTable {
    fn default() -> Self {
        CookieTable {
            slots: Mutex::new(Slots::with_capacity(0)),
        }
    }
}

impl CookieTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A poll's looks at the connections `asks` of one namespace, answered
    /// in order through `answer`. `baseline`: the poll is the namespace's
    /// first, so a connection not tracked yet moved by nothing.
    pub fn look(
        &self,
        asks: &[Ask],
        poll: u64,
        baseline: bool,
        mut answer: impl FnMut(&Ask, Look),
    ) {
        let mut slots = self.lock();
        std::hint::black_box(slots.touch(asks));
        for ask in asks {
            let (slot, new) = slots.slot(ask.key.netns, ask.cookie);
            slot.poll = poll as u32;
            // A closed slot is never new: its close counted the rest.
            let look = if slot.closed {
                Look::Moved(Counters::default())
            } else {
                let look = if new && baseline {
                    Look::Baseline
                } else {
                    Look::Moved(ask.now.since(&slot.counters()))
                };
                slot.keep(&ask.now);
                slot.cgroup = ask.key.cgroup;
                look
            };
            answer(ask, look);
        }
    }

    /// The closes `asks` with their final counters: what moved since each
    /// one's last look (all of it for one never polled), answered with the
    /// key it is counted under: the ask's, with the cgroup it was polled in.
    pub fn close(&self, asks: &[Ask], poll: u64, mut answer: impl FnMut(SocketKey, Counters)) {
        let mut slots = self.lock();
        std::hint::black_box(slots.touch(asks));
        for ask in asks {
            let (slot, new) = slots.slot(ask.key.netns, ask.cookie);
            if new {
                slot.cgroup = ask.key.cgroup;
            }
            let key = SocketKey {
                cgroup: slot.cgroup,
                ..ask.key
            };
            if slot.closed {
                answer(key, Counters::default());
                continue;
            }
            let moved = ask.now.since(&slot.counters());
            // Kept as closed until a poll after this one: the dump in flight
            // may still list the connection.
            slot.closed = true;
            slot.poll = poll as u32;
            answer(key, moved);
        }
    }

    /// After poll `poll`: forgets the connections it did not see (and the
    /// closes counted before it), in a table sized again for the rest
    /// (linear probing cannot just empty a slot; when every connection
    /// stays, nothing is rebuilt). Returns the connections tracked and the
    /// bytes the table takes.
    pub fn sweep(&self, poll: u64) -> (usize, usize) {
        let mut slots = self.lock();
        let poll = poll as u32;
        let live = |s: &&Slot| s.cookie != 0 && s.poll >= poll;
        let n = slots.slots.iter().filter(live).count();
        if n < slots.len {
            let mut kept = Slots::with_capacity(n);
            kept.insert_all(slots.slots.iter().filter(live));
            *slots = kept;
        }
        (n, slots.slots.len() * std::mem::size_of::<Slot>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(netns: u64, cookie: u64, cgroup: u64, bytes: u64) -> Ask {
        Ask {
            key: SocketKey {
                netns,
                cgroup,
                ..SocketKey::default()
            },
            cookie,
            now: Counters {
                bytes_sent: bytes,
                ..Counters::default()
            },
        }
    }

    fn looks(t: &CookieTable, asks: &[Ask], poll: u64, baseline: bool) -> Vec<Option<u64>> {
        let mut out = Vec::new();
        t.look(asks, poll, baseline, |_, look| {
            out.push(match look {
                Look::Moved(c) => Some(c.bytes_sent),
                Look::Baseline => None,
            })
        });
        out
    }

    fn closes(t: &CookieTable, asks: &[Ask], poll: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        t.close(asks, poll, |key, c| out.push((key.cgroup, c.bytes_sent)));
        out
    }

    #[test]
    fn a_connection_counts_what_moved_between_looks_and_at_close() {
        let t = CookieTable::default();
        // There before the run: its past is not counted.
        assert_eq!(looks(&t, &[ask(1, 9, 5, 100)], 1, true), [None]);
        // New after the first poll: all of it. The same cookie in another
        // namespace is another connection.
        let second = [ask(1, 10, 5, 40), ask(1, 9, 5, 150), ask(2, 9, 5, 3)];
        assert_eq!(looks(&t, &second, 2, false), [Some(40), Some(50), Some(3)]);
        assert_eq!(t.sweep(2).0, 3);
        // Closed: the rest, under the cgroup it was polled in.
        assert_eq!(closes(&t, &[ask(1, 9, 0, 170)], 3), [(5, 20)]);
        // A dump in flight that still lists it adds nothing; nor does a
        // second close message.
        assert_eq!(looks(&t, &[ask(1, 9, 5, 170)], 3, false), [Some(0)]);
        assert_eq!(closes(&t, &[ask(1, 9, 0, 170)], 3), [(5, 0)]);
        // Never polled: counted whole, without a cgroup.
        assert_eq!(closes(&t, &[ask(1, 11, 0, 7)], 3), [(0, 7)]);
        assert_eq!(t.sweep(3).0, 2, "10 and namespace 2's 9 not seen by poll 3");
        assert_eq!(t.sweep(4).0, 0, "the closes go after the next poll");
    }

    /// Thousands of connections through growth, sweeps that keep half, and
    /// probing chains cut by removals: every one keeps its own counters.
    #[test]
    fn every_connection_keeps_its_counters_through_growth_and_sweeps() {
        let t = CookieTable::default();
        let asks = |poll: u64, cookies: &mut dyn Iterator<Item = u64>| -> Vec<Ask> {
            cookies.map(|c| ask(7, c, 1, c * 10 + poll)).collect()
        };
        let first = asks(1, &mut (1..=5000));
        assert!(looks(&t, &first, 1, true).iter().all(Option::is_none));
        // Grown by doubling from 64 slots: 8192 hold 6144.
        assert_eq!(t.sweep(1), (5000, 8192 * 64));
        // Poll 2: the even ones and 2000 new.
        let second = asks(2, &mut (2..=5000).step_by(2).chain(10_001..=12_000));
        let moved = looks(&t, &second, 2, false);
        for (a, m) in second.iter().zip(&moved) {
            let want = if a.cookie > 10_000 {
                a.now.bytes_sent
            } else {
                1
            };
            assert_eq!(*m, Some(want), "cookie {}", a.cookie);
        }
        let (n, bytes) = t.sweep(2);
        assert_eq!(n, 4500);
        assert!(bytes <= 8192 * 64, "sized again for what is left: {bytes}");
        let third = asks(3, &mut (2..=5000).step_by(2).chain(10_001..=12_000));
        assert!(looks(&t, &third, 3, false).iter().all(|m| *m == Some(1)));
    }
}
