//! A protobuf writer over a borrowed buffer: bounds-checked, no allocation.
//!
//! Scalar fields take one bounds check each: the writer claims a fixed window
//! of [`FIELD_WINDOW`] bytes (the longest key plus the longest varint) in
//! which every index is provably in range, so the varint loop has no checks.
//! Every method returns `None` instead of panicking when the buffer is full.

/// Bytes a scalar field may need: a 2-byte key and a 10-byte varint.
pub const FIELD_WINDOW: usize = 12;

pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    #[inline(always)]
    pub fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, pos: 0 }
    }

    /// Bytes written so far.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.pos
    }

    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// A varint field, always written: key (1 or 2 bytes) then the value.
    #[inline(always)]
    pub fn field<const K: usize>(&mut self, key: [u8; K], mut v: u64) -> Option<()> {
        const { assert!(K >= 1 && K <= 2, "keys of field numbers < 2048") };
        let dst = self
            .buf
            .get_mut(self.pos..)?
            .first_chunk_mut::<FIELD_WINDOW>()?;
        dst[..K].copy_from_slice(&key);
        let mut i = K;
        for _ in 0..9 {
            if v < 0x80 {
                break;
            }
            dst[i] = (v as u8) | 0x80;
            v >>= 7;
            i += 1;
        }
        dst[i] = v as u8;
        self.pos += i + 1;
        Some(())
    }

    /// A proto3 scalar without presence: omitted when zero, as prost does.
    #[inline(always)]
    pub fn uint<const K: usize>(&mut self, key: [u8; K], v: impl Into<u64>) -> Option<()> {
        match v.into() {
            0 => Some(()),
            v => self.field(key, v),
        }
    }

    /// A proto3 `optional` scalar: written whenever present, even if zero.
    #[inline(always)]
    pub fn opt<const K: usize, T: Into<u64>>(&mut self, key: [u8; K], v: Option<T>) -> Option<()> {
        match v {
            Some(v) => self.field(key, v.into()),
            None => Some(()),
        }
    }

    /// A `bytes` or `string` field: omitted when empty.
    #[inline(always)]
    pub fn bytes<const K: usize>(&mut self, key: [u8; K], b: &[u8]) -> Option<()> {
        if b.is_empty() {
            return Some(());
        }
        self.field(key, b.len() as u64)?;
        let end = self.pos.checked_add(b.len())?;
        self.buf.get_mut(self.pos..end)?.copy_from_slice(b);
        self.pos = end;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::Writer;

    #[test]
    fn fields_and_presence() {
        let mut buf = [0u8; 64];
        let mut w = Writer::new(&mut buf);
        assert!(w.is_empty());
        w.uint([0x08], 0u32).unwrap(); // omitted
        w.uint([0x08], 150u32).unwrap();
        w.opt([0x10], Some(0u8)).unwrap(); // present zero is written
        w.opt::<1, u8>([0x18], None).unwrap();
        w.field([0x90, 0x04], u64::MAX).unwrap();
        w.bytes([0x22], b"").unwrap();
        w.bytes([0x22], b"ab").unwrap();
        let n = w.len();
        assert_eq!(n, 3 + 2 + 12 + 4);
        assert_eq!(&buf[..5], &[0x08, 0x96, 0x01, 0x10, 0x00]);
        assert_eq!(&buf[5..8], &[0x90, 0x04, 0xff]);
        assert_eq!(buf[16], 0x01);
        assert_eq!(&buf[17..21], &[0x22, 2, b'a', b'b']);
    }

    #[test]
    fn full_buffer_is_none_not_panic() {
        // The window must fit even when the value is short.
        assert_eq!(Writer::new(&mut [0u8; 11]).field([0x08], 0), None);
        assert_eq!(Writer::new(&mut [0u8; 11]).bytes([0x0a], &[1, 2, 3]), None);
        assert_eq!(
            Writer::new(&mut [0u8; 12]).bytes([0x0a], &[1, 2, 3]),
            Some(())
        );
        assert_eq!(Writer::new(&mut [0u8; 12]).bytes([0x0a], &[0; 11]), None);
    }
}
