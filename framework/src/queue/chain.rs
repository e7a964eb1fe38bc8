//! Popped chains: a [`Chain`] holds a chain's descriptors and, from the
//! fast path, its buffers' host fragments, so that [`Queue::read`] and
//! [`Queue::write`] are plain copies within the section that popped it
//! (and go through the DMA handle otherwise).

use super::{Queue, Result};

/// One descriptor of a chain: a buffer in the device's I/O address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// I/O virtual address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// True for a device-writable buffer, false for a device-readable one.
    pub writable: bool,
}

/// A popped descriptor chain. Reuse one `Chain` across pops: its storage is
/// kept, so the hot path does not allocate.
#[derive(Clone, Debug, Default)]
pub struct Chain {
    pub(super) head: u16,
    pub(super) descs: Vec<Desc>,
    pub(super) readable: u64,
    pub(super) writable: u64,
    /// Host fragments of the buffers, in chain order, translated by the
    /// fast path; usable only by the [`Queue`] whose `epoch` matches.
    pub(super) frags: Vec<Frag>,
    /// The [`Queue`] (and so the access section) the fragments belong to;
    /// 0: none.
    pub(super) epoch: u64,
}

/// One host-contiguous piece of a chain's buffer, as an address (a chain
/// must stay `Send`; the pointer is only rebuilt inside the section that
/// translated it).
#[derive(Clone, Copy, Debug)]
pub(super) struct Frag {
    pub(super) addr: usize,
    pub(super) len: usize,
    pub(super) writable: bool,
}

impl Chain {
    /// An empty chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Head index: what [`Queue::add_used`] takes.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// All descriptors in chain order (readable ones first, as the spec requires).
    pub fn descriptors(&self) -> &[Desc] {
        &self.descs
    }

    /// Total bytes in device-readable descriptors.
    pub fn readable_len(&self) -> u64 {
        self.readable
    }

    /// Total bytes in device-writable descriptors.
    pub fn writable_len(&self) -> u64 {
        self.writable
    }

    /// Makes this the chain `head` of the one buffer `desc`, whose bytes
    /// are at host address `host` in the section of `epoch`: what
    /// [`clear`](Chain::clear) and a walk of that one descriptor leave,
    /// without the walk's running sums and loop (the one-buffer pop, see
    /// `walk.rs`).
    #[inline(always)]
    pub(super) fn set_one(&mut self, head: u16, epoch: u64, desc: Desc, host: usize) {
        self.head = head;
        self.epoch = epoch;
        let len = u64::from(desc.len);
        (self.readable, self.writable) = if desc.writable { (0, len) } else { (len, 0) };
        let frag = Frag {
            addr: host,
            len: desc.len as usize,
            writable: desc.writable,
        };
        // A reused chain of one buffer (the steady state) is overwritten in
        // place, without the vectors' length stores and capacity checks
        // (scripts/count-net.sh: 742.3 -> 739.9 per frame, --packed 986.2 ->
        // 980.9).
        match self.descs.as_mut_slice() {
            [d] => *d = desc,
            _ => {
                self.descs.clear();
                self.descs.push(desc);
            }
        }
        match self.frags.as_mut_slice() {
            [f] => *f = frag,
            _ => {
                self.frags.clear();
                self.frags.push(frag);
            }
        }
    }

    pub(super) fn clear(&mut self) {
        self.head = 0;
        self.descs.clear();
        self.readable = 0;
        self.writable = 0;
        self.frags.clear();
        self.epoch = 0;
    }
}

impl<'a> Queue<'a> {
    /// Copies device-readable bytes of `chain`, starting `offset` bytes into
    /// its readable part, into `buf`. Returns the number of bytes copied
    /// (less than `buf.len()` at the end of the readable part).
    ///
    /// Always inlined, as [`write`](Queue::write): a call cost vdpa-net's
    /// receive path its register saves and a result through memory per
    /// frame (scripts/count-net.sh: 738.2 -> 703.1 per frame, --packed
    /// 934.0 -> 899.0, both together).
    #[inline(always)]
    pub fn read(&mut self, chain: &Chain, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if chain.epoch == self.epoch {
            if let Some((f, at, n)) = one_frag(chain, false, offset, buf.len()) {
                // SAFETY: as below: the chain's only fragment, translated for
                // read in this open section; `at + n <= f.len`,
                // `n <= buf.len()`; guest memory is reached through raw
                // pointers only.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (f.addr as *const u8).wrapping_add(at),
                        buf.as_mut_ptr(),
                        n,
                    )
                };
                return Ok(n);
            }
            return Ok(copy_frags(
                chain,
                false,
                offset,
                buf.len(),
                |f, at, n, done| {
                    // SAFETY: the fragment was translated for read in this
                    // queue's access section (same epoch), which is still open;
                    // `at + n <= f.len`, `done + n <= buf.len()`, and guest memory
                    // is only reached through raw pointers, so no overlap.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            (f.addr as *const u8).wrapping_add(at),
                            buf.as_mut_ptr().wrapping_add(done),
                            n,
                        )
                    }
                },
            ));
        }
        self.read_slow(chain, offset, buf)
    }

    /// [`read`](Queue::read) of a chain popped in an earlier access
    /// section: translated again, descriptor by descriptor. Out of line so
    /// that the common case inlined into the caller stays small (a call
    /// to the whole cost every read about 20 instructions of saving and
    /// restoring registers; `scripts/count-net.sh`).
    #[inline(never)]
    fn read_slow(&mut self, chain: &Chain, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let dma = &self.dma;
        walk_descs(chain, false, offset, buf.len(), |addr, done, n| {
            dma.read(addr, &mut buf[done..done + n])
        })
        .map_err(|e| self.dma_err(e))
    }

    /// Copies `data` into the device-writable part of `chain`, starting
    /// `offset` bytes into it. Returns the number of bytes written (less than
    /// `data.len()` when the writable part is too short).
    #[inline(always)]
    pub fn write(&mut self, chain: &Chain, offset: u64, data: &[u8]) -> Result<usize> {
        if chain.epoch == self.epoch {
            if let Some((f, at, n)) = one_frag(chain, true, offset, data.len()) {
                // SAFETY: as below: the chain's only fragment, translated for
                // write in this open section; `at + n <= f.len`,
                // `n <= data.len()`; the source is a distinct Rust slice.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr(),
                        (f.addr as *mut u8).wrapping_add(at),
                        n,
                    )
                };
                return Ok(n);
            }
            return Ok(copy_frags(
                chain,
                true,
                offset,
                data.len(),
                |f, at, n, done| {
                    // SAFETY: the fragment was translated for write in this
                    // queue's access section (same epoch), which is still open;
                    // `at + n <= f.len`, `done + n <= data.len()`; the source is a
                    // distinct Rust slice.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data.as_ptr().wrapping_add(done),
                            (f.addr as *mut u8).wrapping_add(at),
                            n,
                        )
                    }
                },
            ));
        }
        self.write_slow(chain, offset, data)
    }

    /// [`write`](Queue::write) of a chain popped in an earlier access
    /// section (see [`read_slow`](Queue::read_slow)).
    #[inline(never)]
    fn write_slow(&mut self, chain: &Chain, offset: u64, data: &[u8]) -> Result<usize> {
        let dma = &self.dma;
        walk_descs(chain, true, offset, data.len(), |addr, done, n| {
            dma.write(addr, &data[done..done + n])
        })
        .map_err(|e| self.dma_err(e))
    }
}

/// The slow-path twin of [`copy_frags`]: walks the chain's descriptors of
/// one direction (device-readable or device-writable), skipping `offset`
/// bytes, and hands `step(addr, done, n)` each piece until `want` bytes are
/// covered or the chain ends. Returns the bytes covered, or the first error.
#[inline]
fn walk_descs<E>(
    chain: &Chain,
    writable: bool,
    offset: u64,
    want: usize,
    mut step: impl FnMut(u64, usize, usize) -> std::result::Result<(), E>,
) -> std::result::Result<usize, E> {
    let mut skip = offset;
    let mut done = 0usize;
    for d in chain.descs.iter().filter(|d| d.writable == writable) {
        if done == want {
            break;
        }
        let len = u64::from(d.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let avail = usize::try_from(len - skip).unwrap_or(usize::MAX);
        let n = avail.min(want - done);
        step(d.addr.wrapping_add(skip), done, n)?;
        done += n;
        skip = 0;
    }
    Ok(done)
}

/// The common chain of one fragment of the direction asked: that fragment,
/// the offset in it and the bytes to copy (what [`copy_frags`] would copy,
/// without its loop: scripts/count-net.sh 784.1 -> 742.3 per frame,
/// --packed 1027.8 -> 986.2); `None` for any
/// other chain.
#[inline(always)]
fn one_frag(
    chain: &Chain,
    writable: bool,
    offset: u64,
    want: usize,
) -> Option<(&Frag, usize, usize)> {
    match chain.frags.as_slice() {
        [f] if f.writable == writable => {
            let at = usize::try_from(offset).unwrap_or(usize::MAX).min(f.len);
            Some((f, at, (f.len - at).min(want)))
        }
        _ => None,
    }
}

/// Walks the readable (or writable) fragments of `chain` from `offset`,
/// calling `copy(fragment, offset in it, bytes, bytes done)` until `want`
/// bytes are done or the fragments end. Returns the bytes done.
fn copy_frags(
    chain: &Chain,
    writable: bool,
    offset: u64,
    want: usize,
    mut copy: impl FnMut(&Frag, usize, usize, usize),
) -> usize {
    let mut skip = offset;
    let mut done = 0usize;
    for f in chain.frags.iter().filter(|f| f.writable == writable) {
        if done == want {
            break;
        }
        let len = f.len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        // skip < len <= usize::MAX
        let at = skip as usize;
        let n = (f.len - at).min(want - done);
        copy(f, at, n, done);
        done += n;
        skip = 0;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::fixture::*;
    use crate::testing::Buf;

    #[test]
    fn test_pop_read_write_complete() {
        let mut f = fixture(true);
        f.buf_mem.write_at(0, b"hello").expect("write");
        f.driver
            .add_chain(&[
                Buf {
                    addr: BUF_IOVA,
                    len: 5,
                    writable: false,
                },
                Buf {
                    addr: BUF_IOVA + 0x1000,
                    len: 16,
                    writable: true,
                },
            ])
            .expect("chain");
        f.driver.publish().expect("publish");
        let mut chain = Chain::new();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert!(q.pop(&mut chain).expect("pop"));
            assert_eq!(chain.readable_len(), 5);
            assert_eq!(chain.writable_len(), 16);
            let mut buf = [0u8; 8];
            assert_eq!(q.read(&chain, 0, &mut buf).expect("read"), 5);
            assert_eq!(&buf[..5], b"hello");
            assert_eq!(q.write(&chain, 2, b"world").expect("write"), 5);
            q.add_used(chain.head(), 7).expect("used");
            assert!(!q.pop(&mut chain).expect("pop empty"));
        });
        assert_eq!(f.driver.used_idx().expect("idx"), 1);
        assert_eq!(f.driver.used_elem(0).expect("elem"), (0, 7));
        let mut out = [0u8; 7];
        f.buf_mem.read_at(0x1000, &mut out).expect("read back");
        assert_eq!(&out[2..], b"world");
    }

    /// A chain of one buffer (copied without the fragment loop) reads and
    /// writes what the loop would: clipped at its end, nothing past it,
    /// nothing in the other direction.
    #[test]
    fn test_one_buffer_chain_copies_like_the_loop() {
        let mut f = fixture(true);
        f.driver
            .add_chain(&[Buf {
                addr: BUF_IOVA + 0x100,
                len: 8,
                writable: true,
            }])
            .expect("chain");
        f.driver.publish().expect("publish");
        let mut chain = Chain::new();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert!(q.pop(&mut chain).expect("pop"));
            assert_eq!(q.write(&chain, 0, b"abcd").expect("write"), 4);
            assert_eq!(q.write(&chain, 5, b"wxyz").expect("clipped"), 3);
            assert_eq!(q.write(&chain, 8, b"!").expect("at the end"), 0);
            assert_eq!(q.write(&chain, u64::MAX, b"!").expect("past it"), 0);
            let mut buf = [0u8; 4];
            assert_eq!(q.read(&chain, 0, &mut buf).expect("no readable part"), 0);
            q.add_used(chain.head(), 8).expect("used");
        });
        let mut out = [0u8; 9];
        f.buf_mem.read_at(0x100, &mut out).expect("read back");
        assert_eq!(&out, b"abcd\0wxy\0");
    }
}
