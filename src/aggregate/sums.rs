//! What the aggregates add up, per socket group: sockets by state, three
//! histograms over the established connections, and the counters built
//! from each connection's change between two looks at it.

use crate::wire::state;

/// One past the highest TCP state number (`crate::wire::state`).
pub const STATES: usize = state::TCP_STATES.len() + 1;
/// `TCP_ESTABLISHED`, `TCP_LISTEN`.
pub const ESTABLISHED: u8 = 1;
pub const LISTEN: u8 = 10;

/// Upper bounds of the RTT buckets, seconds: loopback (tens of
/// microseconds), a rack, a data centre, a region (1-10 ms), a continent,
/// across an ocean (100-300 ms), a satellite hop and worse.
pub const RTT_BOUNDS: [f64; 15] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];
/// Upper bounds of the delivery-rate buckets, bytes per second: from a
/// modem's 1 kB/s to 100 Gbit/s links (12.5 GB/s) and loopback beyond.
pub const RATE_BOUNDS: [f64; 12] = [1e3, 1e4, 1e5, 1e6, 1e7, 3e7, 1e8, 3e8, 1e9, 3e9, 1e10, 3e10];
/// Buckets of the longer list, and the one past its last bound (+Inf).
const BUCKETS: usize = RTT_BOUNDS.len() + 1;

/// A histogram over one poll or, published, the run: a count per bucket
/// (not cumulative; the last is past the last bound) and the sum.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Histogram {
    pub counts: [u64; BUCKETS],
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, bounds: &[f64], value: f64) {
        let i = bounds.partition_point(|b| *b < value);
        self.counts[i] += 1;
        self.sum += value;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn add(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }
}

/// The counters of a connection whose change between two looks is summed:
/// what `tcp_info` counts over the connection's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// `tcpi_bytes_sent` (4.19+; retransmitted bytes included).
    pub bytes_sent: u64,
    /// `tcpi_bytes_received`.
    pub bytes_received: u64,
    /// `tcpi_segs_out`: segments sent, retransmissions included (32 bits).
    pub segments_sent: u64,
    /// `tcpi_total_retrans`: segments retransmitted (32 bits).
    pub retransmits: u64,
    /// `tcpi_total_rto` (6.7+): retransmission timeouts (16 bits).
    pub rto: u64,
    /// `tcpi_rwnd_limited`, `tcpi_sndbuf_limited` (4.9+): microseconds.
    pub rwnd_limited_us: u64,
    pub sndbuf_limited_us: u64,
}

impl Counters {
    pub const FIELDS: usize = 7;
    /// How wide each field is, in the order of [`Self::as_array`]: a
    /// narrow counter wraps around. The times limited are 64 bits in
    /// `tcp_info` but kept as their low 32 (the table of connections keeps
    /// one cache line per connection): that is 71 minutes, more than any
    /// connection is limited between two looks.
    const BITS: [u32; Self::FIELDS] = [64, 64, 32, 32, 16, 32, 32];

    pub fn as_array(&self) -> [u64; Self::FIELDS] {
        [
            self.bytes_sent,
            self.bytes_received,
            self.segments_sent,
            self.retransmits,
            self.rto,
            self.rwnd_limited_us,
            self.sndbuf_limited_us,
        ]
    }

    fn from_array(a: [u64; Self::FIELDS]) -> Self {
        Counters {
            bytes_sent: a[0],
            bytes_received: a[1],
            segments_sent: a[2],
            retransmits: a[3],
            rto: a[4],
            rwnd_limited_us: a[5],
            sndbuf_limited_us: a[6],
        }
    }

    /// What moved from `before` to `self`: a 32- or 16-bit counter that
    /// went back wrapped around; a 64-bit one cannot on one connection, and
    /// moved by nothing.
    pub fn since(&self, before: &Counters) -> Counters {
        let (now, then) = (self.as_array(), before.as_array());
        Counters::from_array(std::array::from_fn(|i| match Self::BITS[i] {
            64 => now[i].saturating_sub(then[i]),
            bits => now[i].wrapping_sub(then[i]) & ((1 << bits) - 1),
        }))
    }

    pub fn add(&mut self, other: &Counters) {
        let (a, b) = (self.as_array(), other.as_array());
        *self = Counters::from_array(std::array::from_fn(|i| a[i].saturating_add(b[i])));
    }

    pub fn is_zero(&self) -> bool {
        self.as_array() == [0; Self::FIELDS]
    }
}

/// What the sockets of one group added up to.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sums {
    /// Sockets by state number.
    pub states: [u64; STATES],
    /// Over the established connections: smoothed RTT, min RTT (seconds),
    /// delivery rate (bytes/s).
    pub rtt: Histogram,
    pub min_rtt: Histogram,
    pub delivery_rate: Histogram,
    pub counters: Counters,
}

impl Sums {
    pub fn add(&mut self, other: &Sums) {
        for (a, b) in self.states.iter_mut().zip(&other.states) {
            *a += b;
        }
        self.rtt.add(&other.rtt);
        self.min_rtt.add(&other.min_rtt);
        self.delivery_rate.add(&other.delivery_rate);
        self.counters.add(&other.counters);
    }

    pub fn sockets(&self) -> u64 {
        self.states.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_values_up_to_their_bound() {
        let mut h = Histogram::default();
        for v in [0.000_01, 0.000_05, 0.000_051, 2.5, 3.0] {
            h.observe(&RTT_BOUNDS, v);
        }
        assert_eq!(h.counts[0], 2, "at the bound is in");
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[RTT_BOUNDS.len() - 1], 1);
        assert_eq!(h.counts[RTT_BOUNDS.len()], 1, "past the last: +Inf");
        assert_eq!(h.count(), 5);
    }

    #[test]
    fn narrow_counters_wrap_and_wide_ones_do_not_go_back() {
        let before = Counters {
            bytes_sent: 10,
            retransmits: 3,
            ..Counters::default()
        };
        let now = Counters {
            bytes_sent: 5,
            retransmits: 2,
            rto: 1,
            ..Counters::default()
        };
        let moved = now.since(&before);
        assert_eq!(moved.bytes_sent, 0, "64 bits do not wrap");
        assert_eq!(moved.retransmits, (1 << 32) - 1, "32 bits wrapped");
        assert_eq!(moved.rto, 1);
        let limited = |us| Counters {
            rwnd_limited_us: us,
            ..Counters::default()
        };
        let low = limited(5).since(&limited(u64::from(u32::MAX)));
        assert_eq!(low.rwnd_limited_us, 6, "kept as 32 bits, wrapped");
    }
}
