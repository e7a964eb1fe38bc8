//! A popped chain's buffers as iovecs: the host fragments the chain's
//! buffers translate to, in chain order, cut to a byte range of its
//! device-readable or device-writable part, for `preadv`/`pwritev` or an
//! io_uring `READV`/`WRITEV`.
//!
//! The addresses are valid while the access section that translated them
//! lasts ([`Queue::iovecs`]: the caller's section), or while the chain is
//! pinned ([`InFlight::iovecs`](super::InFlight::iovecs): until it is
//! finished). One IOVA range may be several host fragments: an iovec never
//! spans two of them.

use super::chain::Frag;
use super::{Chain, Queue, Result};
use crate::dma::Access;

/// Which part of a chain a byte range is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The device-readable buffers (driver to device).
    Readable,
    /// The device-writable buffers (device to driver).
    Writable,
}

impl Part {
    fn writable(self) -> bool {
        self == Part::Writable
    }
}

/// Appends to `out` the iovecs of `len` bytes of `part`, starting `offset`
/// bytes into it, from host fragments `frags`. Returns the bytes covered
/// (less than `len` when the part ends first).
pub(super) fn export(
    frags: &[Frag],
    part: Part,
    offset: u64,
    len: u64,
    out: &mut Vec<libc::iovec>,
) -> u64 {
    let mut skip = offset;
    let mut done = 0u64;
    for f in frags.iter().filter(|f| f.writable == part.writable()) {
        if done == len {
            break;
        }
        let flen = f.len as u64;
        if skip >= flen {
            skip -= flen;
            continue;
        }
        // skip < flen <= usize::MAX
        let at = skip as usize;
        let n = (flen - skip).min(len - done);
        out.push(libc::iovec {
            iov_base: f.addr.wrapping_add(at) as *mut libc::c_void,
            // n <= flen <= usize::MAX
            iov_len: n as usize,
        });
        done += n;
        skip = 0;
    }
    done
}

impl Queue<'_> {
    /// Makes sure every buffer of `chain` has its host fragments translated
    /// in this queue's access section (a chain popped by the fast path of
    /// this queue has; one popped through virtio-queue's path, one from
    /// another section, or a resubmitted one is translated now). A miss
    /// parks the queue as a pop would.
    pub fn translate_chain(&mut self, chain: &mut Chain) -> Result<()> {
        if chain.epoch == self.epoch && !chain.descs.is_empty() {
            return Ok(());
        }
        chain.frags.clear();
        for i in 0..chain.descs.len() {
            let d = chain.descs[i];
            let access = if d.writable {
                Access::Write
            } else {
                Access::Read
            };
            let mut at = d.addr;
            let mut left = u64::from(d.len);
            while left > 0 {
                let f = match self.dma.fragment(at, left, access) {
                    Ok(f) => f,
                    Err(e) => {
                        chain.frags.clear();
                        chain.epoch = 0;
                        return Err(self.dma_err(e));
                    }
                };
                chain.frags.push(Frag {
                    addr: f.as_ptr() as usize,
                    len: f.len(),
                    writable: d.writable,
                });
                at = at.wrapping_add(f.len() as u64);
                left -= f.len() as u64;
            }
        }
        chain.epoch = self.epoch;
        Ok(())
    }

    /// Appends to `out` the iovecs of `len` bytes of `chain`'s `part`,
    /// starting `offset` bytes into it (translating the chain first if
    /// needed, see [`translate_chain`](Queue::translate_chain)). Returns
    /// the bytes covered. The iovecs are valid until this queue's access
    /// section ends: for a synchronous `preadv`/`pwritev` inside the
    /// worker's call; I/O that outlives the call takes them from
    /// [`InFlight::iovecs`](super::InFlight::iovecs) instead.
    pub fn iovecs(
        &mut self,
        chain: &mut Chain,
        part: Part,
        offset: u64,
        len: u64,
        out: &mut Vec<libc::iovec>,
    ) -> Result<u64> {
        self.translate_chain(chain)?;
        Ok(export(&chain.frags, part, offset, len, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_export_cuts_fragments_to_the_range() {
        let frags = [
            Frag {
                addr: 0x1000,
                len: 16,
                writable: false,
            },
            Frag {
                addr: 0x8000,
                len: 100,
                writable: false,
            },
            Frag {
                addr: 0x9000,
                len: 50,
                writable: true,
            },
            Frag {
                addr: 0xa000,
                len: 1,
                writable: true,
            },
        ];
        let mut out = Vec::new();
        assert_eq!(export(&frags, Part::Readable, 16, 1000, &mut out), 100);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].iov_base as usize, 0x8000);
        out.clear();
        assert_eq!(export(&frags, Part::Readable, 10, 20, &mut out), 20);
        let v: Vec<(usize, usize)> = out
            .iter()
            .map(|i| (i.iov_base as usize, i.iov_len))
            .collect();
        assert_eq!(v, vec![(0x100a, 6), (0x8000, 14)]);
        out.clear();
        assert_eq!(export(&frags, Part::Writable, 0, 50, &mut out), 50);
        assert_eq!(out.len(), 1);
        out.clear();
        assert_eq!(export(&frags, Part::Writable, 50, 5, &mut out), 1);
        assert_eq!(out[0].iov_base as usize, 0xa000);
    }
}
