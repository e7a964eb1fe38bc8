//! Deferred completion: chains whose I/O outlives the worker call that
//! popped them.
//!
//! # Model
//!
//! A worker pops a chain, starts asynchronous I/O on its buffers (an
//! io_uring `READV` into the guest's pages, say), returns, and completes
//! the chain later, from the same thread, when the I/O is done (typically
//! in [`Worker::handle_event`](crate::device::Worker::handle_event) for the
//! io_uring completion eventfd).
//!
//! The host addresses of a chain are valid only inside the access section
//! that translated them: an unmap waits for the section and then the
//! memory may go. I/O in flight outlives the section, so
//! [`Queue::defer`] *pins* the chain: it takes an iommu-core
//! [`AccessPin`](iommu_core::AccessPin) on the worker's translator, the
//! userspace form of the pages an iommufd access object pins. While the
//! worker holds any pin, every invalidation of the device's address space
//! (an IOTLB invalidation or unmap from the frontend, a new memory table,
//! a replace or detach by a `/dev/iommu` session) waits before it returns:
//!
//! 1. The invalidation nudges the worker thread; the framework calls
//!    [`Worker::drain`](crate::device::Worker::drain): the device should
//!    finish or cancel its I/O in flight (an io_uring `ASYNC_CANCEL`) and
//!    start no new I/O while [`Dma::drain_requested`](crate::dma::Dma::drain_requested)
//!    is true.
//! 2. As each I/O completes, the device hands its [`InFlight`] to
//!    [`Queues::finish`], which releases the pin and says whether the
//!    chain's buffers still translate to the pages the I/O used
//!    ([`Finished::intact`]). When the last pin is released the
//!    invalidation returns: the unmap promise holds, no I/O touches the
//!    pages afterwards.
//! 3. A chain that is not intact had its buffers remapped to other pages
//!    (or, with the memory table, their region removed) under its I/O by
//!    the frontend itself: the device fails the request
//!    (for virtio-blk, `VIRTIO_BLK_S_IOERR`, written with a fresh
//!    translation if the status byte is still mapped). The data went to
//!    the old pages while they were still pinned: a failed request, never
//!    memory corruption.
//!
//! A pin covers the whole device: an unmap of any range waits for all the
//! worker's I/O in flight (iommufd notifies only the accesses whose range
//! overlaps; iommu-core's invalidations carry no range yet). For storage
//! I/O that completes in micro- to milliseconds this bounds an unmap's
//! latency by the slowest request in flight.
//!
//! When a ring stops (GET_VRING_BASE, SET_VRING_ENABLE 0) or the worker
//! ends, the framework waits (bounded) until the worker reports no I/O in
//! flight ([`Worker::in_flight`](crate::device::Worker::in_flight)),
//! dispatching the device's events meanwhile, so that requests complete
//! before the driver reads the ring's state.
//!
//! `tests/deferred_unmap.rs` shows an unmap waiting for a request held in
//! flight on a pipe; with `--cfg ioasis_broken="unpinned"` (pins ignored)
//! it fails.

use log::error;

use super::chain::Frag;
use super::iovec::{export, Part};
use super::{Chain, Queue, QueueError, Queues, Result};
use crate::dma::Access;

/// A chain whose I/O is in flight: its buffers' host fragments, pinned
/// against unmap until [`Queues::finish`]. Made by [`Queue::defer`].
#[derive(Debug)]
pub struct InFlight {
    chain: Chain,
    queue: u16,
    pin: Option<iommu_core::AccessPin>,
    iov: IoVecBuf,
}

/// The iovecs an [`InFlight`] keeps for its own I/O.
#[derive(Debug, Default)]
struct IoVecBuf(Vec<libc::iovec>);

// SAFETY: the iovecs are plain addresses of pinned guest pages; they are
// dereferenced only by the kernel (I/O submitted by the worker) or by
// `InFlight`'s own copies, while the pin is held, whatever thread the
// InFlight (moved with its worker) is on.
unsafe impl Send for IoVecBuf {}

impl InFlight {
    /// The queue the chain was popped from.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// Head index (what [`Queue::add_used`] takes).
    pub fn head(&self) -> u16 {
        self.chain.head()
    }

    /// The chain (descriptors and lengths).
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// Appends the iovecs of `len` bytes of `part` from `offset` (see
    /// [`Queue::iovecs`]); they stay valid until this is finished.
    pub fn iovecs(&self, part: Part, offset: u64, len: u64, out: &mut Vec<libc::iovec>) -> u64 {
        export(&self.chain.frags, part, offset, len, out)
    }

    /// Builds the iovecs of `len` bytes of `part` from `offset` into the
    /// InFlight's own storage and returns them (and the bytes covered):
    /// the array an io_uring `READV`/`WRITEV` points at, valid as long as
    /// the InFlight lives and this is not called again.
    pub fn io_vectors(&mut self, part: Part, offset: u64, len: u64) -> (&[libc::iovec], u64) {
        self.iov.0.clear();
        let n = export(&self.chain.frags, part, offset, len, &mut self.iov.0);
        (&self.iov.0, n)
    }

    /// Copies `data` into the writable part at `offset`, through the pinned
    /// fragments (into the pages the I/O uses). Returns the bytes written.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> usize {
        let mut iov = Vec::new();
        let n = self.iovecs(Part::Writable, offset, data.len() as u64, &mut iov);
        let mut done = 0usize;
        for v in &iov {
            // SAFETY: the fragment was translated for write and is pinned
            // (`self.pin` is held: no invalidation of the device completes
            // until it is released), so `iov_len` bytes at `iov_base` are
            // mapped host memory; `done + iov_len <= data.len()` by
            // construction of `iov`, and the source is a distinct slice.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr().wrapping_add(done),
                    v.iov_base.cast::<u8>(),
                    v.iov_len,
                )
            };
            done += v.iov_len;
        }
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    /// Copies readable bytes at `offset` through the pinned fragments into
    /// `buf`. Returns the bytes read.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> usize {
        let mut iov = Vec::new();
        let n = self.iovecs(Part::Readable, offset, buf.len() as u64, &mut iov);
        let mut done = 0usize;
        for v in &iov {
            // SAFETY: pinned fragment, translated for read (see `write`);
            // `done + iov_len <= buf.len()`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base.cast::<u8>().cast_const(),
                    buf.as_mut_ptr().wrapping_add(done),
                    v.iov_len,
                )
            };
            done += v.iov_len;
        }
        usize::try_from(n).unwrap_or(usize::MAX)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(pin) = self.pin.take() {
            // Releasing needs the worker's section; a dropped pin stays
            // held until the worker ends (invalidations wait that long).
            error!(
                "queue {}: chain {} dropped while in flight, without Queues::finish; its pin is held until the worker ends",
                self.queue,
                self.chain.head()
            );
            let _leaked = pin;
        }
    }
}

/// A deferred chain whose I/O is over: unpinned, ready to be completed.
#[derive(Debug)]
pub struct Finished {
    /// The chain (descriptors; its host fragments are gone with the pin).
    pub chain: Chain,
    /// The queue it was popped from.
    pub queue: u16,
    /// Its buffers still translated to the pages the I/O used when it
    /// finished. False: the frontend remapped them to other pages under
    /// the I/O (or, with the memory table, removed their region); fail the
    /// request. With IOTLB translation a buffer with no translation left
    /// counts as intact: the frontend may have flushed its whole IOTLB
    /// (QEMU does on a global invalidation), which says nothing of its
    /// mappings.
    pub intact: bool,
}

impl Queue<'_> {
    /// Pins `chain` (translating it first if needed) for I/O that outlives
    /// this call; `chain` is left empty. Complete it later with
    /// [`Queues::finish`] then [`Queue::add_used`], from this worker
    /// thread. See the module docs.
    pub fn defer(&mut self, chain: &mut Chain) -> Result<InFlight> {
        self.translate_chain(chain)?;
        let Some(pin) = self.dma.pin() else {
            return Err(QueueError::Ring {
                queue: self.index,
                msg: "cannot pin: the access section is in use".into(),
            });
        };
        Ok(InFlight {
            chain: std::mem::take(chain),
            queue: self.index,
            pin: Some(pin),
            iov: IoVecBuf::default(),
        })
    }
}

impl Queues<'_> {
    /// Ends the pin of a deferred chain whose I/O is over (completed,
    /// failed or cancelled), checking first that its buffers still
    /// translate to the pinned pages. Works whatever the state of its queue
    /// (stopped, parked); the caller then completes the head on the queue if
    /// it is still running.
    pub fn finish(&mut self, mut inflight: InFlight) -> Finished {
        let dma = self.dma();
        let intact = match still_mapped(&inflight.chain, dma) {
            Mapped::Same => true,
            Mapped::Moved => false,
            // With IOTLB translation the device's address space is a cache
            // the frontend may flush wholesale (QEMU does on a global
            // invalidation): a missing translation is no evidence of an
            // unmap. With the memory table it is: the region went.
            Mapped::Missing => self.parks_on_miss(),
        };
        if let Some(pin) = inflight.pin.take() {
            if let Err(pin) = dma.unpin(pin) {
                error!(
                    "queue {}: cannot release the pin of chain {}: the access section is in use; held until the worker ends",
                    inflight.queue,
                    inflight.chain.head()
                );
                let _leaked = pin;
            }
        }
        let mut chain = std::mem::take(&mut inflight.chain);
        chain.frags.clear();
        chain.epoch = 0;
        Finished {
            chain,
            queue: inflight.queue,
            intact,
        }
    }
}

/// How a pinned chain's buffers translate now.
enum Mapped {
    /// To the pinned pages.
    Same,
    /// Some buffer has no translation now.
    Missing,
    /// Some buffer translates to other pages.
    Moved,
}

/// How every buffer of `chain` translates now (no fault, no event),
/// compared with the host fragments it was pinned with.
fn still_mapped(chain: &Chain, dma: crate::dma::Dma<'_>) -> Mapped {
    let probe = dma.probe();
    let mut pinned = chain.frags.iter();
    let mut cur: Option<Frag> = None;
    for d in &chain.descs {
        let access = if d.writable {
            Access::Write
        } else {
            Access::Read
        };
        let mut at = d.addr;
        let mut left = u64::from(d.len);
        while left > 0 {
            let Ok(f) = probe.fragment(at, left, access) else {
                return Mapped::Missing;
            };
            let mut ptr = f.as_ptr() as usize;
            let mut n = f.len();
            // Match the fresh run against the pinned runs, which may be
            // cut differently.
            while n > 0 {
                let p = match cur.take() {
                    Some(p) if p.len > 0 => p,
                    _ => match pinned.next() {
                        Some(p) => *p,
                        None => return Mapped::Moved,
                    },
                };
                if p.addr != ptr || p.writable != d.writable {
                    return Mapped::Moved;
                }
                let k = p.len.min(n);
                ptr += k;
                n -= k;
                cur = Some(Frag {
                    addr: p.addr + k,
                    len: p.len - k,
                    writable: p.writable,
                });
            }
            at = at.wrapping_add(f.len() as u64);
            left -= f.len() as u64;
        }
    }
    Mapped::Same
}
