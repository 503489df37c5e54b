//! Panic-free little readers for host-endian kernel integers.
//!
//! Two shapes: `*_at` on a fixed-size array with a compile-time offset (the
//! `const` assertion rejects an out-of-range offset at build time, so the
//! indexing cannot panic), and [`NeInt::read`] on a slice of unknown length,
//! which returns `None` when the field lies past the end (used by structs that
//! grow across kernel versions, such as `tcp_info`).

/// An integer the kernel writes in host byte order.
pub trait NeInt: Sized + Copy {
    /// Reads `Self` at `off`, or `None` when `bytes` ends before the field does.
    fn read(bytes: &[u8], off: usize) -> Option<Self>;
}

macro_rules! ne_int {
    ($($t:ty),*) => {$(
        impl NeInt for $t {
            #[inline(always)]
            fn read(bytes: &[u8], off: usize) -> Option<Self> {
                let chunk = bytes.get(off..)?.first_chunk::<{ size_of::<$t>() }>()?;
                Some(<$t>::from_ne_bytes(*chunk))
            }
        }
    )*};
}
ne_int!(u8, u16, u32, u64, i32);

#[inline(always)]
pub(crate) fn u16_ne_at<const OFF: usize, const N: usize>(b: &[u8; N]) -> u16 {
    const { assert!(OFF + 2 <= N) };
    u16::from_ne_bytes([b[OFF], b[OFF + 1]])
}

#[inline(always)]
pub(crate) fn u16_be_at<const OFF: usize, const N: usize>(b: &[u8; N]) -> u16 {
    const { assert!(OFF + 2 <= N) };
    u16::from_be_bytes([b[OFF], b[OFF + 1]])
}

#[inline(always)]
pub(crate) fn u32_ne_at<const OFF: usize, const N: usize>(b: &[u8; N]) -> u32 {
    const { assert!(OFF + 4 <= N) };
    u32::from_ne_bytes([b[OFF], b[OFF + 1], b[OFF + 2], b[OFF + 3]])
}

/// Rounds a netlink length up to the 4-byte boundary (`NLMSG_ALIGN`, `RTA_ALIGN`).
#[inline(always)]
pub(crate) const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_returns_none_past_the_end() {
        let b = 0x0102_0304u32.to_ne_bytes();
        assert_eq!(u32::read(&b, 0), Some(0x0102_0304));
        assert_eq!(u32::read(&b, 1), None);
        assert_eq!(u16::read(&b, 2), Some(u16::from_ne_bytes([b[2], b[3]])));
        assert_eq!(u8::read(&b, 4), None);
        assert_eq!(u64::read(&b, usize::MAX), None);
    }

    #[test]
    fn fixed_readers_respect_endianness() {
        let b = [0x12u8, 0x34, 0x56, 0x78];
        assert_eq!(u16_be_at::<0, 4>(&b), 0x1234);
        assert_eq!(u16_ne_at::<2, 4>(&b), u16::from_ne_bytes([0x56, 0x78]));
        assert_eq!(u32_ne_at::<0, 4>(&b), u32::from_ne_bytes(b));
    }

    #[test]
    fn align4_rounds_up() {
        assert_eq!([0, 1, 4, 5, 8].map(align4), [0, 4, 4, 8, 8]);
    }
}
