//! A reader/writer cursor over a popped chain: a request is read from the
//! front of the device-readable part (a header, then data), and answered
//! into the device-writable part (data, then a status written last into
//! bytes reserved at its end), the shape of virtio-blk, virtio-scsi,
//! virtio-fs and most request/response devices.
//!
//! The cursor holds offsets only; every access goes through the
//! [`Queue`] the chain was popped from ([`Queue::read`] / [`Queue::write`],
//! translated fragments within the popping section), so it is `Copy` and
//! never borrows the queue.

use vm_memory::ByteValued;

use super::iovec::Part;
use super::{Chain, Queue, Result};

/// Read and write positions in one chain. See the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    read: u64,
    read_end: u64,
    write: u64,
    write_end: u64,
}

impl Cursor {
    /// A cursor at the start of both parts of `chain`.
    pub fn new(chain: &Chain) -> Cursor {
        Cursor {
            read: 0,
            read_end: chain.readable_len(),
            write: 0,
            write_end: chain.writable_len(),
        }
    }

    /// Device-readable bytes not read yet.
    pub fn readable(&self) -> u64 {
        self.read_end - self.read
    }

    /// Device-writable bytes not written yet (reserved tail excluded).
    pub fn writable(&self) -> u64 {
        self.write_end - self.write
    }

    /// Offset of the next read in the readable part.
    pub fn read_offset(&self) -> u64 {
        self.read
    }

    /// Offset of the next write in the writable part.
    pub fn write_offset(&self) -> u64 {
        self.write
    }

    /// Reads up to `buf.len()` bytes and advances. Returns the bytes read.
    pub fn read(&mut self, q: &mut Queue<'_>, chain: &Chain, buf: &mut [u8]) -> Result<usize> {
        let want = usize::try_from(self.readable())
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = q.read(chain, self.read, &mut buf[..want])?;
        self.read += n as u64;
        Ok(n)
    }

    /// Reads a `T` (a plain `#[repr(C)]` struct, little-endian fields as
    /// the virtio spec lays them out) and advances, or returns `None`
    /// without advancing when fewer than `size_of::<T>()` bytes are left.
    pub fn read_obj<T: ByteValued + Default>(
        &mut self,
        q: &mut Queue<'_>,
        chain: &Chain,
    ) -> Result<Option<T>> {
        let size = std::mem::size_of::<T>() as u64;
        if self.readable() < size {
            return Ok(None);
        }
        let mut v = T::default();
        let n = q.read(chain, self.read, v.as_mut_slice())?;
        if (n as u64) < size {
            return Ok(None);
        }
        self.read += size;
        Ok(Some(v))
    }

    /// Skips up to `n` readable bytes; returns the bytes skipped.
    pub fn skip_read(&mut self, n: u64) -> u64 {
        let n = n.min(self.readable());
        self.read += n;
        n
    }

    /// Writes up to `data.len()` bytes (never into the reserved tail) and
    /// advances. Returns the bytes written.
    pub fn write(&mut self, q: &mut Queue<'_>, chain: &Chain, data: &[u8]) -> Result<usize> {
        let want = usize::try_from(self.writable())
            .unwrap_or(usize::MAX)
            .min(data.len());
        let n = q.write(chain, self.write, &data[..want])?;
        self.write += n as u64;
        Ok(n)
    }

    /// Skips up to `n` writable bytes (filled by someone else, say an
    /// I/O on [`Queue::iovecs`]); returns the bytes skipped.
    pub fn skip_write(&mut self, n: u64) -> u64 {
        let n = n.min(self.writable());
        self.write += n;
        n
    }

    /// Reserves the last `n` bytes of the writable part (a status byte,
    /// written after the data): later writes stop before them. Returns
    /// their offset in the writable part, or `None` (nothing reserved) when
    /// fewer than `n` writable bytes are left.
    pub fn reserve_tail(&mut self, n: u64) -> Option<u64> {
        if self.writable() < n {
            return None;
        }
        self.write_end -= n;
        Some(self.write_end)
    }
}

impl Chain {
    /// The I/O virtual address of the byte `offset` bytes into `part`, or
    /// `None` past its end (for a device that writes a status byte with a
    /// fresh translation, e.g. through a probe [`Dma`](crate::dma::Dma)).
    pub fn address_of(&self, part: Part, offset: u64) -> Option<u64> {
        let mut skip = offset;
        for d in self
            .descs
            .iter()
            .filter(|d| d.writable == (part == Part::Writable))
        {
            let len = u64::from(d.len);
            if skip < len {
                return Some(d.addr.wrapping_add(skip));
            }
            skip -= len;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::fixture::*;
    use crate::testing::Buf;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct Hdr {
        kind: u32,
        pad: u32,
        sector: u64,
    }
    // SAFETY: plain integers, no padding, any bit pattern is valid.
    unsafe impl ByteValued for Hdr {}

    #[test]
    fn test_header_data_and_status_across_descriptors() {
        let mut f = fixture(true);
        let hdr = Hdr {
            kind: 1,
            pad: 0,
            sector: 7,
        };
        // Header split over two descriptors, then 8 data bytes; writable:
        // 3 + 2 bytes, the status is the last one.
        f.buf_mem.write_at(0, &hdr.as_slice()[..10]).expect("hdr a");
        f.buf_mem
            .write_at(0x100, &hdr.as_slice()[10..])
            .expect("hdr b");
        f.buf_mem.write_at(0x106, b"DATADATA").expect("data");
        f.driver
            .add_chain(&[
                Buf {
                    addr: BUF_IOVA,
                    len: 10,
                    writable: false,
                },
                Buf {
                    addr: BUF_IOVA + 0x100,
                    len: 14,
                    writable: false,
                },
                Buf {
                    addr: BUF_IOVA + 0x1000,
                    len: 3,
                    writable: true,
                },
                Buf {
                    addr: BUF_IOVA + 0x2000,
                    len: 2,
                    writable: true,
                },
            ])
            .expect("chain");
        f.driver.publish().expect("publish");
        let mut chain = Chain::new();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert!(q.pop(&mut chain).expect("pop"));
            let mut c = Cursor::new(&chain);
            assert_eq!(c.read_obj::<Hdr>(&mut q, &chain).expect("hdr"), Some(hdr));
            assert_eq!(c.readable(), 8);
            let status = c.reserve_tail(1).expect("status");
            assert_eq!(status, 4);
            assert_eq!(
                chain.address_of(Part::Writable, status),
                Some(BUF_IOVA + 0x2001)
            );
            let mut d = [0u8; 16];
            assert_eq!(c.read(&mut q, &chain, &mut d).expect("data"), 8);
            assert_eq!(&d[..8], b"DATADATA");
            assert_eq!(c.read_obj::<Hdr>(&mut q, &chain).expect("none"), None);
            assert_eq!(c.write(&mut q, &chain, b"abcdefg").expect("write"), 4);
            assert_eq!(c.writable(), 0);
            q.write(&chain, status, &[0xee]).expect("status");
            q.add_used(chain.head(), 5).expect("used");
        });
        let mut out = [0u8; 3];
        f.buf_mem.read_at(0x1000, &mut out).expect("read");
        assert_eq!(&out, b"abc");
        let mut out = [0u8; 2];
        f.buf_mem.read_at(0x2000, &mut out).expect("read");
        assert_eq!(out, [b'd', 0xee]);
        assert!(Cursor::new(&chain).reserve_tail(9).is_none());
    }
}
