//! `struct inet_diag_msg` and its `rtattr` attributes
//! (`include/uapi/linux/inet_diag.h`, `sock_diag.h`).
//!
//! [`decode_socket`] turns one `SOCK_DIAG_BY_FAMILY` payload into a
//! [`DiagSocket`] of borrowed views: nothing is copied or allocated, and each
//! value is read only when asked for. Attributes this module does not decode
//! are skipped and counted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::bytes::{align4, u16_be_at, u16_ne_at, u32_ne_at, NeInt};
use super::error::WireError;
use super::request::{AF_INET, AF_INET6};
use super::tcp_info::{TailLayout, TcpInfo};

/// Size of `struct inet_diag_msg`.
pub const INET_DIAG_MSG_LEN: usize = 72;

// Response attribute types (`enum { INET_DIAG_NONE, INET_DIAG_MEMINFO, ... }`).
pub const INET_DIAG_MEMINFO: u16 = 1;
pub const INET_DIAG_INFO: u16 = 2;
pub const INET_DIAG_VEGASINFO: u16 = 3;
pub const INET_DIAG_CONG: u16 = 4;
pub const INET_DIAG_TOS: u16 = 5;
pub const INET_DIAG_TCLASS: u16 = 6;
pub const INET_DIAG_SKMEMINFO: u16 = 7;
pub const INET_DIAG_SHUTDOWN: u16 = 8;
pub const INET_DIAG_DCTCPINFO: u16 = 9;
/// The socket's IP protocol (a u8): always TCP here, so not recorded. The
/// kernel sends it with close messages.
pub const INET_DIAG_PROTOCOL: u16 = 10;
pub const INET_DIAG_SKV6ONLY: u16 = 11;
pub const INET_DIAG_PAD: u16 = 14;
pub const INET_DIAG_MARK: u16 = 15;
pub const INET_DIAG_BBRINFO: u16 = 16;
pub const INET_DIAG_CLASS_ID: u16 = 17;
pub const INET_DIAG_CGROUP_ID: u16 = 21;
pub const INET_DIAG_SOCKOPT: u16 = 22;

/// `NLA_TYPE_MASK`: the type without the NESTED / NET_BYTEORDER flag bits.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// A borrowed `struct inet_diag_msg` whose family was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InetDiagMsg<'a>(&'a [u8; INET_DIAG_MSG_LEN]);

impl<'a> InetDiagMsg<'a> {
    /// Checks the length and the address family.
    pub fn new(payload: &'a [u8]) -> Result<Self, WireError> {
        let bytes = payload
            .first_chunk::<INET_DIAG_MSG_LEN>()
            .ok_or(WireError::ShortInetDiagMsg { len: payload.len() })?;
        match bytes[0] {
            AF_INET | AF_INET6 => Ok(InetDiagMsg(bytes)),
            family => Err(WireError::BadFamily { family }),
        }
    }

    /// AF_INET (2) or AF_INET6 (10).
    pub fn family(&self) -> u8 {
        self.0[0]
    }
    pub fn state(&self) -> u8 {
        self.0[1]
    }
    pub fn timer(&self) -> u8 {
        self.0[2]
    }
    pub fn retrans(&self) -> u8 {
        self.0[3]
    }
    /// Host-order port (the kernel sends it big-endian).
    pub fn source_port(&self) -> u16 {
        u16_be_at::<4, INET_DIAG_MSG_LEN>(self.0)
    }
    pub fn destination_port(&self) -> u16 {
        u16_be_at::<6, INET_DIAG_MSG_LEN>(self.0)
    }
    /// Network-order source address: 4 bytes for IPv4, 16 for IPv6.
    pub fn source(&self) -> &'a [u8] {
        self.address(8)
    }
    pub fn destination(&self) -> &'a [u8] {
        self.address(24)
    }
    pub fn source_ip(&self) -> IpAddr {
        to_ip(self.source())
    }
    pub fn interface(&self) -> u32 {
        u32_ne_at::<40, INET_DIAG_MSG_LEN>(self.0)
    }
    /// The socket cookie (`idiag_cookie[0] | idiag_cookie[1] << 32`), stable for
    /// the socket's lifetime.
    pub fn cookie(&self) -> u64 {
        let lo = u32_ne_at::<44, INET_DIAG_MSG_LEN>(self.0);
        let hi = u32_ne_at::<48, INET_DIAG_MSG_LEN>(self.0);
        u64::from(lo) | (u64::from(hi) << 32)
    }
    /// msec until the timer fires.
    pub fn expires(&self) -> u32 {
        u32_ne_at::<52, INET_DIAG_MSG_LEN>(self.0)
    }
    pub fn rqueue(&self) -> u32 {
        u32_ne_at::<56, INET_DIAG_MSG_LEN>(self.0)
    }
    pub fn wqueue(&self) -> u32 {
        u32_ne_at::<60, INET_DIAG_MSG_LEN>(self.0)
    }
    pub fn uid(&self) -> u32 {
        u32_ne_at::<64, INET_DIAG_MSG_LEN>(self.0)
    }
    pub fn inode(&self) -> u32 {
        u32_ne_at::<68, INET_DIAG_MSG_LEN>(self.0)
    }

    fn address(&self, off: usize) -> &'a [u8] {
        let len = if self.family() == AF_INET { 4 } else { 16 };
        &self.0[off..off + len]
    }
}

fn to_ip(addr: &[u8]) -> IpAddr {
    if let Ok(v4) = <[u8; 4]>::try_from(addr) {
        IpAddr::V4(Ipv4Addr::from(v4))
    } else if let Ok(v6) = <[u8; 16]>::try_from(addr) {
        IpAddr::V6(Ipv6Addr::from(v6))
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

/// Declares a fixed-size attribute struct viewed in place.
macro_rules! fixed_view {
    ($(#[$doc:meta])* $name:ident, $attr:literal, $len:literal, { $($(#[$fdoc:meta])* $field:ident: $ty:ty = $read:ident<$off:literal>;)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $name<'a>(&'a [u8; $len]);

        impl<'a> $name<'a> {
            pub const LEN: usize = $len;

            fn new(payload: &'a [u8]) -> Result<Self, WireError> {
                payload.first_chunk::<$len>().map($name).ok_or(WireError::ShortAttribute {
                    name: $attr,
                    len: payload.len(),
                    need: $len,
                })
            }

            $(
                $(#[$fdoc])*
                #[inline]
                pub fn $field(&self) -> $ty {
                    $read::<$off, $len>(self.0).into()
                }
            )*
        }
    };
}

fixed_view!(
    /// `struct inet_diag_meminfo` (INET_DIAG_MEMINFO), bytes.
    MemInfo, "MEMINFO", 16, {
    rmem: u32 = u32_ne_at<0>;
    wmem: u32 = u32_ne_at<4>;
    fmem: u32 = u32_ne_at<8>;
    tmem: u32 = u32_ne_at<12>;
});

fixed_view!(
    /// `struct tcpvegas_info` (INET_DIAG_VEGASINFO).
    VegasInfo, "VEGASINFO", 16, {
    enabled: u32 = u32_ne_at<0>;
    rtt_cnt: u32 = u32_ne_at<4>;
    /// usec
    rtt: u32 = u32_ne_at<8>;
    /// usec
    min_rtt: u32 = u32_ne_at<12>;
});

fixed_view!(
    /// `struct tcp_dctcp_info` (INET_DIAG_DCTCPINFO).
    DctcpInfo, "DCTCPINFO", 16, {
    enabled: u32 = u16_ne_at<0>;
    ce_state: u32 = u16_ne_at<2>;
    alpha: u32 = u32_ne_at<4>;
    ab_ecn: u32 = u32_ne_at<8>;
    ab_tot: u32 = u32_ne_at<12>;
});

fixed_view!(
    /// `struct tcp_bbr_info` (INET_DIAG_BBRINFO). Out-of-tree BBRv3 kernels
    /// append fields; those extra bytes are ignored.
    BbrInfo, "BBRINFO", 20, {
    bw_lo: u32 = u32_ne_at<0>;
    bw_hi: u32 = u32_ne_at<4>;
    /// usec
    min_rtt: u32 = u32_ne_at<8>;
    /// fixed point, 256 = 1.0
    pacing_gain: u32 = u32_ne_at<12>;
    /// fixed point, 256 = 1.0
    cwnd_gain: u32 = u32_ne_at<16>;
});

impl BbrInfo<'_> {
    /// Bandwidth estimate, bytes/s.
    pub fn bw(&self) -> u64 {
        u64::from(self.bw_lo()) | (u64::from(self.bw_hi()) << 32)
    }
}

/// The `SK_MEMINFO_*` u32 array (INET_DIAG_SKMEMINFO). Like `tcp_info` it grew
/// over time (backlog 3.6, drops 4.7): entries past the end are absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkMemInfo<'a>(&'a [u8]);

impl<'a> SkMemInfo<'a> {
    /// The array as the kernel wrote it (also what `SO_MEMINFO` returns).
    pub fn new(bytes: &'a [u8]) -> Self {
        SkMemInfo(bytes)
    }

    fn at(&self, idx: usize) -> Option<u32> {
        u32::read(self.0, idx * 4)
    }
    pub fn rmem_alloc(&self) -> Option<u32> {
        self.at(0)
    }
    pub fn rcvbuf(&self) -> Option<u32> {
        self.at(1)
    }
    pub fn wmem_alloc(&self) -> Option<u32> {
        self.at(2)
    }
    pub fn sndbuf(&self) -> Option<u32> {
        self.at(3)
    }
    pub fn fwd_alloc(&self) -> Option<u32> {
        self.at(4)
    }
    pub fn wmem_queued(&self) -> Option<u32> {
        self.at(5)
    }
    pub fn optmem(&self) -> Option<u32> {
        self.at(6)
    }
    pub fn backlog(&self) -> Option<u32> {
        self.at(7)
    }
    pub fn drops(&self) -> Option<u32> {
        self.at(8)
    }
}

/// One socket of a dump: the base message plus every attribute that came with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiagSocket<'a> {
    pub msg: InetDiagMsg<'a>,
    pub meminfo: Option<MemInfo<'a>>,
    pub tcp_info: Option<TcpInfo<'a>>,
    pub vegas: Option<VegasInfo<'a>>,
    /// INET_DIAG_CONG without its NUL terminator.
    pub congestion: Option<&'a str>,
    pub tos: Option<u8>,
    pub tclass: Option<u8>,
    pub skmeminfo: Option<SkMemInfo<'a>>,
    pub shutdown: Option<u8>,
    pub dctcp: Option<DctcpInfo<'a>>,
    pub skv6only: Option<bool>,
    pub mark: Option<u32>,
    pub bbr: Option<BbrInfo<'a>>,
    pub class_id: Option<u32>,
    pub cgroup_id: Option<u64>,
    /// `struct inet_diag_sockopt` as [`sockopt_bits`] numbers its members.
    pub sockopt: Option<u16>,
    /// Attributes present but not decoded here (PAD not counted).
    pub unknown_attributes: u16,
}

/// `struct inet_diag_sockopt`'s two bytes of one-bit members as a u16 whose
/// bit N is the Nth member declared (recverr 1, is_icsk 2, ... defer_connect
/// 1024), the same on every host. The C ABI allocates bitfields from the
/// least significant bit of each byte on little-endian hosts and from the
/// most significant on big-endian ones (`big_endian`), so the kernel's bytes
/// differ between the two for the same socket.
pub fn sockopt_bits(bytes: [u8; 2], big_endian: bool) -> u16 {
    let member_order = |b: u8| if big_endian { b.reverse_bits() } else { b };
    u16::from(member_order(bytes[0])) | u16::from(member_order(bytes[1])) << 8
}

/// Decodes one `SOCK_DIAG_BY_FAMILY` payload. `tail` picks how the last four
/// bytes of a 280-byte `tcp_info` are read (see [`TailLayout`]).
pub fn decode_socket(payload: &[u8], tail: TailLayout) -> Result<DiagSocket<'_>, WireError> {
    let msg = InetDiagMsg::new(payload)?;
    let mut s = DiagSocket {
        msg,
        meminfo: None,
        tcp_info: None,
        vegas: None,
        congestion: None,
        tos: None,
        tclass: None,
        skmeminfo: None,
        shutdown: None,
        dctcp: None,
        skv6only: None,
        mark: None,
        bbr: None,
        class_id: None,
        cgroup_id: None,
        sockopt: None,
        unknown_attributes: 0,
    };
    for attr in attributes(payload) {
        let Attribute { kind, value, .. } = attr?;
        match kind {
            INET_DIAG_MEMINFO => s.meminfo = Some(MemInfo::new(value)?),
            INET_DIAG_INFO => s.tcp_info = Some(TcpInfo::new(value, tail)),
            INET_DIAG_VEGASINFO => s.vegas = Some(VegasInfo::new(value)?),
            INET_DIAG_CONG => s.congestion = Some(congestion_name(value)?),
            INET_DIAG_TOS => s.tos = Some(scalar(value, "TOS")?),
            INET_DIAG_TCLASS => s.tclass = Some(scalar(value, "TCLASS")?),
            INET_DIAG_SKMEMINFO => s.skmeminfo = Some(SkMemInfo(value)),
            INET_DIAG_SHUTDOWN => s.shutdown = Some(scalar(value, "SHUTDOWN")?),
            INET_DIAG_DCTCPINFO => s.dctcp = Some(DctcpInfo::new(value)?),
            INET_DIAG_SKV6ONLY => s.skv6only = Some(scalar::<u8>(value, "SKV6ONLY")? != 0),
            INET_DIAG_MARK => s.mark = Some(scalar(value, "MARK")?),
            INET_DIAG_BBRINFO => s.bbr = Some(BbrInfo::new(value)?),
            INET_DIAG_CLASS_ID => s.class_id = Some(scalar(value, "CLASS_ID")?),
            INET_DIAG_CGROUP_ID => s.cgroup_id = Some(scalar(value, "CGROUP_ID")?),
            INET_DIAG_SOCKOPT => {
                let b = value.first_chunk::<2>().ok_or(WireError::ShortAttribute {
                    name: "SOCKOPT",
                    len: value.len(),
                    need: 2,
                })?;
                s.sockopt = Some(sockopt_bits(*b, cfg!(target_endian = "big")));
            }
            INET_DIAG_PAD | INET_DIAG_PROTOCOL => {}
            _ => s.unknown_attributes = s.unknown_attributes.saturating_add(1),
        }
    }
    Ok(s)
}

/// One `rtattr` of a socket message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attribute<'a> {
    /// Attribute type with the NESTED / NET_BYTEORDER flag bits cleared.
    pub kind: u16,
    /// Offset of the attribute header from the start of the payload.
    pub offset: usize,
    pub value: &'a [u8],
}

/// Iterator over the attributes after the `inet_diag_msg`; stops after the
/// first malformed one.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    payload: &'a [u8],
    offset: usize,
}

/// Walks the attributes of a socket message payload (which must already have
/// passed [`InetDiagMsg::new`]; a shorter payload yields nothing).
pub fn attributes(payload: &[u8]) -> Attributes<'_> {
    Attributes {
        payload,
        offset: INET_DIAG_MSG_LEN,
    }
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<Attribute<'a>, WireError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.payload.get(self.offset..).filter(|r| !r.is_empty())?;
        let offset = self.offset;
        // Any error ends the walk: after a bad length nothing can be trusted.
        self.offset = self.payload.len();
        let Some(hdr) = rest.first_chunk::<4>() else {
            return Some(Err(WireError::TruncatedAttribute {
                offset,
                remaining: rest.len(),
            }));
        };
        let len = u16_ne_at::<0, 4>(hdr);
        let kind = u16_ne_at::<2, 4>(hdr) & NLA_TYPE_MASK;
        if len < 4 {
            return Some(Err(WireError::AttributeTooShort { kind, offset, len }));
        }
        let Some(value) = rest.get(4..usize::from(len)) else {
            return Some(Err(WireError::AttributeOverrun {
                kind,
                offset,
                len,
                remaining: rest.len(),
            }));
        };
        self.offset = offset + align4(usize::from(len));
        Some(Ok(Attribute {
            kind,
            offset,
            value,
        }))
    }
}

fn scalar<T: NeInt>(value: &[u8], name: &'static str) -> Result<T, WireError> {
    T::read(value, 0).ok_or(WireError::ShortAttribute {
        name,
        len: value.len(),
        need: size_of::<T>(),
    })
}

/// `TCP_CA_NAME_MAX` (`include/net/tcp.h`): names are at most 15 bytes + NUL.
pub const TCP_CA_NAME_MAX: usize = 16;

/// The kernel sends the name NUL-terminated (`nla_put_string`); accept it
/// without too. Longer than the kernel allows, or not UTF-8, is an error.
fn congestion_name(value: &[u8]) -> Result<&str, WireError> {
    let name = value.split(|&b| b == 0).next().unwrap_or_default();
    if name.len() >= TCP_CA_NAME_MAX {
        return Err(WireError::LongCongestionName { len: name.len() });
    }
    std::str::from_utf8(name).map_err(|_| WireError::BadCongestionName { len: name.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockopt_members_keep_their_numbers_on_either_byte_order() {
        // recverr (1st member of byte 0), mc_all (7th) and recverr_rfc4884
        // (2nd of byte 1) set: where each ABI puts them.
        let little = [0b0100_0001, 0b0000_0010];
        let big = [0b1000_0010, 0b0100_0000];
        let want = 1 | 64 | 512;
        assert_eq!(sockopt_bits(little, false), want);
        assert_eq!(sockopt_bits(big, true), want);
    }
}
