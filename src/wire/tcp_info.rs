//! `struct tcp_info` (`include/uapi/linux/tcp.h`) of any kernel version.
//!
//! The struct only ever grew at its end, so a field is present exactly when
//! the kernel's copy is long enough to hold it: [`TcpInfo`] borrows whatever
//! length arrived and each accessor returns `None` for a field past the end.
//! Bytes past the last field known here are ignored; [`TcpInfo::len`] keeps the
//! length seen. Offsets and the kernel that added each field are in
//! `docs/kernel.md` and `docs/record.md`.
//!
//! One change was not an append: 7.0 repacked the last 4 bytes (offset 276),
//! which 6.18/6.19 send as `u16 accecn_fail_mode, u16 accecn_opt_seen`, into a
//! `u32` bitfield `ecn_mode:2, accecn_opt_seen:2, accecn_fail_mode:4,
//! options2:24`. Both are 280 bytes long, so the bytes cannot tell them apart:
//! the caller picks a [`TailLayout`] from the running kernel's release.

use super::bytes::NeInt;

/// How to read bytes 276..280 of a 280-byte `tcp_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TailLayout {
    /// 6.18 and 6.19: `__u16 tcpi_accecn_fail_mode; __u16 tcpi_accecn_opt_seen;`.
    #[default]
    U16Pair,
    /// 7.0 and later: `__u32 tcpi_ecn_mode:2, tcpi_accecn_opt_seen:2,
    /// tcpi_accecn_fail_mode:4, tcpi_options2:24;`.
    Bitfield,
}

impl TailLayout {
    /// The layout a kernel of this `uname -r` release sends ("6.18.4-foo", "7.0.0").
    /// Unparseable releases get the 6.x layout: a wrong guess only affects the
    /// four AccECN fields.
    pub fn for_release(release: &str) -> Self {
        let major = release
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|m| m.parse::<u32>().ok());
        match major {
            Some(m) if m >= 7 => TailLayout::Bitfield,
            _ => TailLayout::U16Pair,
        }
    }
}

/// Offset of the 4 bytes whose layout changed in 7.0.
const TAIL_OFFSET: usize = 276;

/// Extracts a C bitfield member: `first` is the member's bit position counted
/// in declaration order within a `total`-bit storage unit. GCC allocates
/// members from the least significant bit on little-endian targets and from
/// the most significant bit on big-endian ones.
#[inline]
fn bitfield(word: u32, total: u32, first: u32, width: u32) -> u32 {
    let shift = if cfg!(target_endian = "little") {
        first
    } else {
        total - first - width
    };
    (word >> shift) & ((1 << width) - 1)
}

/// A borrowed `tcp_info` of whatever length the kernel sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfo<'a> {
    bytes: &'a [u8],
    tail: TailLayout,
}

macro_rules! fields {
    ($($(#[$doc:meta])* $name:ident: $ty:ty = $off:literal;)*) => {
        impl TcpInfo<'_> {
            $(
                $(#[$doc])*
                #[inline]
                pub fn $name(&self) -> Option<$ty> {
                    <$ty>::read(self.bytes, $off)
                }
            )*
        }
    };
}

fields! {
    /// TCP state (same numbering as `inet_diag_msg.idiag_state`).
    state: u8 = 0;
    ca_state: u8 = 1;
    retransmits: u8 = 2;
    probes: u8 = 3;
    backoff: u8 = 4;
    /// TCPI_OPT_* bits.
    options: u8 = 5;
    /// usec
    rto: u32 = 8;
    /// usec
    ato: u32 = 12;
    /// bytes
    snd_mss: u32 = 16;
    /// bytes
    rcv_mss: u32 = 20;
    /// segments
    unacked: u32 = 24;
    sacked: u32 = 28;
    lost: u32 = 32;
    retrans: u32 = 36;
    fackets: u32 = 40;
    /// msec
    last_data_sent: u32 = 44;
    /// msec (not maintained by the kernel, always 0)
    last_ack_sent: u32 = 48;
    /// msec
    last_data_recv: u32 = 52;
    /// msec
    last_ack_recv: u32 = 56;
    /// bytes
    pmtu: u32 = 60;
    /// bytes
    rcv_ssthresh: u32 = 64;
    /// usec
    rtt: u32 = 68;
    /// usec
    rttvar: u32 = 72;
    /// segments
    snd_ssthresh: u32 = 76;
    /// segments
    snd_cwnd: u32 = 80;
    /// bytes
    advmss: u32 = 84;
    reordering: u32 = 88;
    /// usec
    rcv_rtt: u32 = 92;
    /// bytes
    rcv_space: u32 = 96;
    total_retrans: u32 = 100;
    /// bytes/s
    pacing_rate: u64 = 104;
    /// bytes/s
    max_pacing_rate: u64 = 112;
    bytes_acked: u64 = 120;
    bytes_received: u64 = 128;
    segs_out: u32 = 136;
    segs_in: u32 = 140;
    notsent_bytes: u32 = 144;
    /// usec
    min_rtt: u32 = 148;
    data_segs_in: u32 = 152;
    data_segs_out: u32 = 156;
    /// bytes/s
    delivery_rate: u64 = 160;
    /// usec
    busy_time: u64 = 168;
    /// usec
    rwnd_limited: u64 = 176;
    /// usec
    sndbuf_limited: u64 = 184;
    delivered: u32 = 192;
    delivered_ce: u32 = 196;
    bytes_sent: u64 = 200;
    bytes_retrans: u64 = 208;
    dsack_dups: u32 = 216;
    reord_seen: u32 = 220;
    rcv_ooopack: u32 = 224;
    /// bytes
    snd_wnd: u32 = 228;
    /// bytes
    rcv_wnd: u32 = 232;
    rehash: u32 = 236;
    total_rto: u16 = 240;
    total_rto_recoveries: u16 = 242;
    /// msec
    total_rto_time: u32 = 244;
    received_ce: u32 = 248;
    delivered_e1_bytes: u32 = 252;
    delivered_e0_bytes: u32 = 256;
    delivered_ce_bytes: u32 = 260;
    received_e1_bytes: u32 = 264;
    received_e0_bytes: u32 = 268;
    received_ce_bytes: u32 = 272;
}

impl<'a> TcpInfo<'a> {
    pub fn new(bytes: &'a [u8], tail: TailLayout) -> Self {
        TcpInfo { bytes, tail }
    }

    /// Length in bytes of the `tcp_info` the kernel sent.
    #[allow(clippy::len_without_is_empty)] // a zero-length tcp_info is still "present"
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// `tcpi_snd_wscale:4`, the first field of the byte-6 bitfield.
    pub fn snd_wscale(&self) -> Option<u8> {
        self.bits8(6, 0, 4)
    }

    /// `tcpi_rcv_wscale:4`.
    pub fn rcv_wscale(&self) -> Option<u8> {
        self.bits8(6, 4, 4)
    }

    /// `tcpi_delivery_rate_app_limited:1` (4.9+; present whenever byte 7 is).
    pub fn delivery_rate_app_limited(&self) -> Option<u8> {
        self.bits8(7, 0, 1)
    }

    /// `tcpi_fastopen_client_fail:2` (5.5+; older kernels send the spare bits as 0).
    pub fn fastopen_client_fail(&self) -> Option<u8> {
        self.bits8(7, 1, 2)
    }

    fn bits8(&self, off: usize, first: u32, width: u32) -> Option<u8> {
        u8::read(self.bytes, off).map(|b| bitfield(u32::from(b), 8, first, width) as u8)
    }

    /// Member of the 7.0 tail bitfield, or `None` with the 6.x layout.
    fn tail_bits(&self, first: u32, width: u32) -> Option<u32> {
        match self.tail {
            TailLayout::U16Pair => None,
            TailLayout::Bitfield => {
                u32::read(self.bytes, TAIL_OFFSET).map(|w| bitfield(w, 32, first, width))
            }
        }
    }

    /// 6.18+: AccECN failure mode (6.x: a u16; 7.0: 4 bits).
    pub fn accecn_fail_mode(&self) -> Option<u32> {
        match self.tail {
            TailLayout::U16Pair => u16::read(self.bytes, TAIL_OFFSET).map(u32::from),
            TailLayout::Bitfield => self.tail_bits(4, 4),
        }
    }

    /// 6.18+: which AccECN options were seen (6.x: a u16; 7.0: 2 bits).
    pub fn accecn_opt_seen(&self) -> Option<u32> {
        match self.tail {
            TailLayout::U16Pair => u16::read(self.bytes, TAIL_OFFSET + 2).map(u32::from),
            TailLayout::Bitfield => self.tail_bits(2, 2),
        }
    }

    /// 7.0+: negotiated ECN mode (2 bits). Absent with the 6.x layout.
    pub fn ecn_mode(&self) -> Option<u32> {
        self.tail_bits(0, 2)
    }

    /// 7.0+: the 24-bit `tcpi_options2`. Absent with the 6.x layout.
    pub fn options2(&self) -> Option<u32> {
        self.tail_bits(8, 24)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(len: usize) -> Vec<u8> {
        (0..len).map(|i| i as u8).collect()
    }

    #[test]
    fn fields_past_the_end_are_absent() {
        let b = info(104);
        let t = TcpInfo::new(&b, TailLayout::U16Pair);
        assert_eq!(t.len(), 104);
        assert_eq!(t.state(), Some(0));
        assert_eq!(
            t.total_retrans(),
            Some(u32::from_ne_bytes([100, 101, 102, 103]))
        );
        assert_eq!(t.pacing_rate(), None);
        assert_eq!(t.accecn_fail_mode(), None);
    }

    #[test]
    fn partial_field_is_absent_not_truncated() {
        let b = info(106); // 2 bytes of the 8-byte pacing_rate
        assert_eq!(TcpInfo::new(&b, TailLayout::U16Pair).pacing_rate(), None);
    }

    #[test]
    fn extra_bytes_are_ignored() {
        let mut b = info(280);
        b.extend([0xee; 40]);
        let t = TcpInfo::new(&b, TailLayout::U16Pair);
        assert_eq!(t.len(), 320);
        assert_eq!(
            t.received_ce_bytes(),
            Some(u32::from_ne_bytes([16, 17, 18, 19]))
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn tail_layouts() {
        let mut b = vec![0u8; 280];
        // 6.18: fail_mode = 3, opt_seen = 2
        b[276..278].copy_from_slice(&3u16.to_ne_bytes());
        b[278..280].copy_from_slice(&2u16.to_ne_bytes());
        let t = TcpInfo::new(&b, TailLayout::U16Pair);
        assert_eq!(
            (t.accecn_fail_mode(), t.accecn_opt_seen()),
            (Some(3), Some(2))
        );
        assert_eq!((t.ecn_mode(), t.options2()), (None, None));
        // 7.0: ecn_mode 2, opt_seen 1, fail_mode 9, options2 0xabcdef
        let word: u32 = 2 | (1 << 2) | (9 << 4) | (0xabcdef << 8);
        b[276..280].copy_from_slice(&word.to_ne_bytes());
        let t = TcpInfo::new(&b, TailLayout::Bitfield);
        assert_eq!(t.ecn_mode(), Some(2));
        assert_eq!(t.accecn_opt_seen(), Some(1));
        assert_eq!(t.accecn_fail_mode(), Some(9));
        assert_eq!(t.options2(), Some(0xabcdef));
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn wscale_and_flag_bits() {
        let mut b = vec![0u8; 104];
        b[6] = 0x7a; // rcv 7, snd 10
        b[7] = 0b101; // app_limited 1, fastopen_client_fail 2
        let t = TcpInfo::new(&b, TailLayout::U16Pair);
        assert_eq!((t.snd_wscale(), t.rcv_wscale()), (Some(10), Some(7)));
        assert_eq!(t.delivery_rate_app_limited(), Some(1));
        assert_eq!(t.fastopen_client_fail(), Some(2));
    }

    #[test]
    fn layout_from_release() {
        assert_eq!(
            TailLayout::for_release("6.18.44-fc-v470"),
            TailLayout::U16Pair
        );
        assert_eq!(TailLayout::for_release("7.0.0-rc1"), TailLayout::Bitfield);
        assert_eq!(TailLayout::for_release("10.1"), TailLayout::Bitfield);
        assert_eq!(TailLayout::for_release("garbage"), TailLayout::U16Pair);
    }
}
