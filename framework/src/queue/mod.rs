//! Virtqueues as a device sees them.
//!
//! A [`Queue`] is a split virtqueue whose rings and buffers live in the
//! device's I/O address space. It is built on virtio-queue's `Queue` (ring
//! layout, `EVENT_IDX` notification suppression) driven through the
//! framework's [`Dma`] handle, which implements vm-memory's `GuestMemory` on top
//! of iommu-core translation. virtio-queue reports a memory error as "no more
//! chains"; this module tells the two apart, so a translation miss parks the
//! queue (and the chain is offered again once the mapping exists) instead of
//! looking like an empty queue.
//!
//! Popping is allocation-free after warm-up: [`Queue::pop`] fills a
//! caller-owned [`Chain`] whose descriptor vector is reused.
//!
//! # Fast path
//!
//! virtio-queue lacks a burst API (one avail-index read for many chains,
//! one used-index write for many completions) and reads every ring field
//! through `GuestMemory`, which costs a translation each. This module wraps
//! it thinly: virtio-queue keeps the queue state (size, ring addresses,
//! next avail / next used, `EVENT_IDX`) and serves the unusual cases
//! (indirect descriptor tables, rings that are not host-contiguous, avail
//! notification control), while the split-ring hot path is done here the
//! way DPDK's vhost library does it:
//! - when a [`Queue`] is handed out, the descriptor table, avail ring and
//!   used ring are translated once and their host addresses kept; they stay
//!   valid for the queue's life, which is inside one DMA access section (an
//!   unmap waits for the section to end);
//! - the avail index is read once, then only again when the chains it
//!   announced are used up ([`Queue::pop_batch`] is one read per burst);
//! - descriptors are read directly from the table with the same checks as
//!   virtio-queue (index range, chain length at most the queue size, so no
//!   loop), and every buffer is translated at pop time into host fragments
//!   kept in the [`Chain`], so [`Queue::read`] / [`Queue::write`] are plain
//!   copies;
//! - [`Queue::add_used`] writes the used element only; the used index is
//!   published (release ordering) once, by [`Queue::notify`],
//!   [`Queue::publish_used`] or when the queue is dropped;
//! - [`Queue::notify`] suppresses the interrupt as the driver asked:
//!   `used_event` with `EVENT_IDX`, `VRING_AVAIL_F_NO_INTERRUPT` without.
//!
//! Address errors on buffers: with IOTLB translation (`ACCESS_PLATFORM`) a
//! miss is resolvable, so the chain is put back and the queue parks until
//! the frontend maps it. With the memory table every valid address is in the
//! table, so a buffer outside it is the driver's error: the head is
//! completed with length 0, counted, and the queue goes on.
//!
//! # Layout
//!
//! | file | what |
//! | --- | --- |
//! | `queues.rs` | [`Queues`]: a worker's queues, handing out a [`Queue`] with its rings translated (and reused within a section) |
//! | `ring.rs` | the split ring's fields read and written at their host addresses |
//! | `walk.rs` | the ring walk: [`Queue::pop`] (fast path and virtio-queue path), [`Queue::unpop`], bad chains |
//! | `burst.rs` | bursts: [`Queue::pop_burst`], [`Queue::pop_batch`], prefetching |
//! | `chain.rs` | [`Chain`]: a popped chain, its host fragments, [`Queue::read`] / [`Queue::write`] |
//! | `cursor.rs` | [`Cursor`]: read a request's header and data, write its answer and a status last |
//! | `iovec.rs` | a chain's host fragments as iovecs ([`Queue::iovecs`], [`Queue::translate_chain`]) |
//! | `deferred.rs` | deferred completion: [`Queue::defer`] pins a chain for I/O in flight, [`Queues::finish`] releases it ([`InFlight`]) |
//! | `inflight.rs` | inflight I/O tracking in a region shared with the frontend, resubmission after a restart |
//! | `serve.rs` | the notification loop every device repeats ([`Queue::serve`]) |
//! | `log.rs` | dirty logging of completions and the used ring while the frontend migrates the guest |
//! | `used.rs` | completions: [`Queue::add_used`], [`Queue::add_used_batch`], [`Queue::publish_used`] |
//! | `notify.rs` | notification suppression: [`Queue::notify`], [`Queue::signal`], kicks on and off |
//! | `vring.rs` | the per-queue state shared by the connection and the worker |
//! | `error.rs` | [`QueueError`] |
//! | `packed/` | packed rings (`VIRTIO_F_RING_PACKED`) behind the same API, see its module docs |

mod burst;
mod chain;
mod cursor;
mod deferred;
mod error;
#[cfg(test)]
mod fixture;
pub(crate) mod inflight;
mod iovec;
mod log;
mod notify;
pub(crate) mod packed;
mod queues;
mod ring;
mod serve;
mod used;
mod vring;
mod walk;

use std::num::Wrapping;
use std::sync::MutexGuard;

use virtio_queue::QueueT;

use crate::dma::{Dma, DmaError};
use crate::peer_write::Writer;
use crate::transport::Transport;

pub use burst::{Burst, PREFETCH_AHEAD, PREFETCH_BYTES};
pub use chain::{Chain, Desc};
pub use cursor::Cursor;
pub use deferred::{Finished, InFlight};
pub use error::{QueueError, Result};
pub use inflight::queue_region_size;
pub use iovec::Part;
pub use queues::{Lookup, Queues};
use ring::Rings;
pub use serve::Flow;
pub(crate) use vring::{Parked, Vring};

/// Largest queue size (`VIRTIO` split rings: 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// A running virtqueue, obtained from [`Queues::get`].
#[derive(Debug)]
pub struct Queue<'a> {
    index: u16,
    vring: MutexGuard<'a, Vring>,
    dma: Dma<'a>,
    writer: &'a Writer,
    transport: &'a dyn Transport,
    /// The rings' host addresses when each is host-contiguous (fast path).
    rings: Option<Rings>,
    /// Tags the chains this queue popped (their fragments are its section's).
    epoch: u64,
    /// Last avail index read; chains up to it need no new read.
    avail_cache: u16,
    /// Used elements were written and the used index not yet published.
    dirty: bool,
    park_on_miss: bool,
    /// Chains popped in a row by this queue since it was handed out or since
    /// the last malformed chain: how many [`Queue::unpop`] may give back.
    tail_pops: u16,
    /// Bytes at the start of each buffer prefetches skip.
    prefetch_skip: usize,
}

impl Drop for Queue<'_> {
    fn drop(&mut self) {
        self.publish_used();
        if let Some(log) = &self.vring.log {
            // After the handle's last write to the used ring.
            if self.vring.packed.is_some() {
                self.packed_log_rings(log);
            } else {
                self.log_used_ring(log);
            }
        }
    }
}

impl<'a> Queue<'a> {
    /// Queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Queue size negotiated with the driver.
    pub fn size(&self) -> u16 {
        self.vring.q.size()
    }

    /// The DMA handle for buffer accesses outside [`read`](Queue::read) and
    /// [`write`](Queue::write).
    pub fn dma(&self) -> Dma<'a> {
        self.dma
    }

    fn dma_err(&mut self, source: DmaError) -> QueueError {
        if let Some((iova, access)) = source.miss_address() {
            self.vring.parked = Some(Parked {
                iova,
                access,
                reported: false,
            });
        } else {
            self.vring.broken = true;
        }
        QueueError::Dma {
            queue: self.index,
            source,
        }
    }

    /// Next available index the device will pop.
    /// For a packed ring: the slot, with the wrap counter in bit 15.
    pub fn next_avail(&self) -> u16 {
        if let Some(p) = &self.vring.packed {
            return p.next_avail();
        }
        self.vring.q.next_avail()
    }

    /// Next used index the device will fill.
    /// For a packed ring: the slot, with the wrap counter in bit 15.
    pub fn next_used(&self) -> u16 {
        if let Some(p) = &self.vring.packed {
            return p.next_used();
        }
        Wrapping(self.vring.q.next_used()).0
    }
}
