//! The one little-endian reader and writer of the workspace's wire formats
//! (the `/dev/iommu` protocol, the fault channel's records, the sva-accel
//! portal): bounds-checked reads that report how short the input is, and
//! appends to a byte vector.

/// A read past the end of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short {
    /// Bytes the read needed from the start of the input.
    pub need: usize,
    /// Bytes the input has.
    pub have: usize,
}

/// Bounded little-endian reader over a byte slice.
#[derive(Debug, Clone)]
pub struct LeReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> LeReader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        LeReader { buf, pos: 0 }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Short> {
        let have = self.buf.len();
        let end = self.pos.checked_add(n).ok_or(Short {
            need: usize::MAX,
            have,
        })?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(Short { need: end, have })?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    /// A `u8`.
    pub fn u8(&mut self) -> Result<u8, Short> {
        Ok(self.array::<1>()?[0])
    }
    /// A `u16`.
    pub fn u16(&mut self) -> Result<u16, Short> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    /// A `u32`.
    pub fn u32(&mut self) -> Result<u32, Short> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// An `i32`.
    pub fn i32(&mut self) -> Result<i32, Short> {
        Ok(i32::from_le_bytes(self.array()?))
    }
    /// A `u64`.
    pub fn u64(&mut self) -> Result<u64, Short> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Length of the whole input.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the whole input is empty.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Little-endian writer appending to a byte vector.
#[derive(Debug, Clone, Default)]
pub struct LeWriter {
    buf: Vec<u8>,
}

impl LeWriter {
    /// A writer over `buf` (appends after what it holds).
    pub fn from_vec(buf: Vec<u8>) -> Self {
        LeWriter { buf }
    }
    /// Appends a `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Appends a `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Appends an `i32`.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Appends a `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Appends raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    /// The bytes written (and any the vector held before).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }
    /// Bytes in the vector.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// Whether the vector is empty.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// The vector.
    pub fn into_vec(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_roundtrip_and_short_reads() {
        let mut w = LeWriter::default();
        w.u16(0x0102)
            .u32(0x0304_0506)
            .i32(-2)
            .u64(0x0708_090a_0b0c_0d0e);
        let b = w.into_vec();
        assert_eq!(&b[..2], &[0x02, 0x01]);
        let mut r = LeReader::new(&b);
        assert_eq!(r.u16(), Ok(0x0102));
        assert_eq!(r.u32(), Ok(0x0304_0506));
        assert_eq!(r.i32(), Ok(-2));
        assert_eq!(r.u64(), Ok(0x0708_090a_0b0c_0d0e));
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.u8(), Err(Short { need: 19, have: 18 }));
        assert_eq!(
            r.bytes(usize::MAX),
            Err(Short {
                need: usize::MAX,
                have: 18
            })
        );
    }
}
