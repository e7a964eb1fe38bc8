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

use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use log::{error, warn};
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::dma::{Access, Dma, DmaError};
use crate::peer_write::Writer;
use crate::transport::{Signals, Transport};

/// Largest queue size (`VIRTIO` split rings: 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Errors of queue operations.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A ring or buffer access failed translation or permission checks.
    #[error("DMA access failed on queue {queue}")]
    Dma {
        /// Queue index.
        queue: u16,
        /// What failed.
        #[source]
        source: DmaError,
    },
    /// The driver's available index ran ahead of the ring by more than the size.
    #[error(
        "Available index {avail} of queue {queue} is more than the queue size ahead of {next}"
    )]
    AvailIndex {
        /// Queue index.
        queue: u16,
        /// Available index read from the ring.
        avail: u16,
        /// Next index the device expected.
        next: u16,
    },
    /// A descriptor chain was malformed (bad index, loop, bad indirect table, too long).
    #[error("Malformed descriptor chain with head {head} on queue {queue}")]
    BadChain {
        /// Queue index.
        queue: u16,
        /// Head index of the chain.
        head: u16,
    },
    /// `add_used` was given a head outside the queue.
    #[error("Used head {head} out of range on queue {queue} of size {size}")]
    BadHead {
        /// Queue index.
        queue: u16,
        /// Head index given.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// A ring update failed.
    #[error("Ring update failed on queue {queue}: {msg}")]
    Ring {
        /// Queue index.
        queue: u16,
        /// virtio-queue's description of the failure.
        msg: String,
    },
    /// Signalling the driver failed.
    #[error("Signalling queue {queue} failed")]
    Notify {
        /// Queue index.
        queue: u16,
        /// The eventfd write error.
        #[source]
        source: std::io::Error,
    },
}

impl QueueError {
    /// The queue the error happened on.
    pub fn queue(&self) -> u16 {
        match self {
            QueueError::Dma { queue, .. }
            | QueueError::AvailIndex { queue, .. }
            | QueueError::BadChain { queue, .. }
            | QueueError::BadHead { queue, .. }
            | QueueError::Ring { queue, .. }
            | QueueError::Notify { queue, .. } => *queue,
        }
    }

    /// The DMA error behind this error, if any.
    pub fn dma_error(&self) -> Option<&DmaError> {
        match self {
            QueueError::Dma { source, .. } => Some(source),
            QueueError::AvailIndex { .. }
            | QueueError::BadChain { .. }
            | QueueError::BadHead { .. }
            | QueueError::Ring { .. }
            | QueueError::Notify { .. } => None,
        }
    }
}

/// Result of queue operations.
pub type Result<T> = std::result::Result<T, QueueError>;

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
    head: u16,
    descs: Vec<Desc>,
    readable: u64,
    writable: u64,
    /// Host fragments of the buffers, in chain order, translated by the
    /// fast path; usable only by the [`Queue`] whose `epoch` matches.
    frags: Vec<Frag>,
    /// The [`Queue`] (and so the access section) the fragments belong to;
    /// 0: none.
    epoch: u64,
}

/// One host-contiguous piece of a chain's buffer, as an address (a chain
/// must stay `Send`; the pointer is only rebuilt inside the section that
/// translated it).
#[derive(Clone, Copy, Debug)]
struct Frag {
    addr: usize,
    len: usize,
    writable: bool,
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

    fn clear(&mut self) {
        self.head = 0;
        self.descs.clear();
        self.readable = 0;
        self.writable = 0;
        self.frags.clear();
        self.epoch = 0;
    }
}

/// What one [`Queue::pop_burst`] did.
#[derive(Debug, Default)]
pub struct Burst {
    /// Chains popped, in the first `popped` entries of the slice.
    pub popped: usize,
    /// Malformed chains the queue completed with length 0 (and counted).
    pub bad: usize,
    /// The error that ended the burst early, if any: a translation miss
    /// (the queue is parked until the frontend maps the address) or a
    /// failed ring.
    pub error: Option<QueueError>,
}

/// Source of [`Queue`] epochs: each handed-out queue gets a distinct one.
static EPOCH: AtomicU64 = AtomicU64::new(1);

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `used->flags`: the device asks the driver not to kick.
const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// A split-ring descriptor as laid out in the table (little endian).
#[repr(C)]
#[derive(Clone, Copy)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Host addresses of a queue's three ring areas, translated for the whole
/// area each and valid for the access section the [`Queue`] lives in.
#[derive(Clone, Copy, Debug)]
struct Rings {
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    size: u16,
    event_idx: bool,
}

impl Rings {
    /// `avail->idx`, with acquire ordering for the entries it announces.
    #[inline]
    fn avail_idx(&self) -> u16 {
        // SAFETY: the avail area was translated for at least 4 + 2 * size
        // bytes and is 2-aligned (checked when the rings were mapped); it
        // stays mapped until the section ends, after the queue is dropped.
        let v = unsafe { std::ptr::read_volatile(self.avail.wrapping_add(2).cast::<u16>()) };
        fence(Ordering::Acquire);
        u16::from_le(v)
    }

    #[inline]
    fn avail_flags(&self) -> u16 {
        // SAFETY: as in `avail_idx`: offset 0 of the translated avail area.
        u16::from_le(unsafe { std::ptr::read_volatile(self.avail.cast::<u16>()) })
    }

    /// `avail->ring[slot]`; `slot < size`.
    #[inline]
    fn avail_entry(&self, slot: u16) -> u16 {
        let off = 4 + 2 * usize::from(slot);
        // SAFETY: slot < size, so the entry is inside the translated
        // 4 + 2 * size bytes; 2-aligned.
        u16::from_le(unsafe { std::ptr::read_volatile(self.avail.wrapping_add(off).cast::<u16>()) })
    }

    /// `used_event` (the avail ring's trailing field); only with `EVENT_IDX`,
    /// for which the area was translated 2 bytes longer.
    #[inline]
    fn used_event(&self) -> u16 {
        let off = 4 + 2 * usize::from(self.size);
        // SAFETY: with EVENT_IDX the avail area was translated for
        // 4 + 2 * size + 2 bytes; 2-aligned.
        u16::from_le(unsafe { std::ptr::read_volatile(self.avail.wrapping_add(off).cast::<u16>()) })
    }

    /// Descriptor `i`; `i < size`.
    #[inline]
    fn desc(&self, i: u16) -> RawDesc {
        // SAFETY: i < size, the table was translated for 16 * size bytes
        // and is 16-aligned (checked when mapped).
        let d = unsafe {
            std::ptr::read_volatile(
                self.desc
                    .wrapping_add(16 * usize::from(i))
                    .cast::<RawDesc>(),
            )
        };
        RawDesc {
            addr: u64::from_le(d.addr),
            len: u32::from_le(d.len),
            flags: u16::from_le(d.flags),
            next: u16::from_le(d.next),
        }
    }

    /// Writes used element `slot` (`slot < size`).
    #[inline]
    fn write_used(&self, slot: u16, id: u32, len: u32) {
        let off = 4 + 8 * usize::from(slot);
        // SAFETY: slot < size, so the 8-byte element is inside the used area
        // translated for write for 4 + 8 * size bytes; it is 4-aligned (the
        // area is, checked when mapped).
        unsafe { std::ptr::write_volatile(self.used.wrapping_add(off).cast::<u32>(), id.to_le()) };
        // SAFETY: as above, the element's second half.
        unsafe {
            std::ptr::write_volatile(self.used.wrapping_add(off + 4).cast::<u32>(), len.to_le())
        };
    }

    /// `used->flags`.
    #[inline]
    fn used_flags(&self) -> u16 {
        // SAFETY: offset 0 of the used area, translated for write (so also
        // readable), 4-aligned.
        u16::from_le(unsafe { std::ptr::read_volatile(self.used.cast::<u16>()) })
    }

    /// Sets `used->flags`.
    #[inline]
    fn set_used_flags(&self, flags: u16) {
        // SAFETY: offset 0 of the used area, translated for write, 4-aligned.
        unsafe { std::ptr::write_volatile(self.used.cast::<u16>(), flags.to_le()) };
    }

    /// Publishes `used->idx` after the elements written before (release).
    #[inline]
    fn publish_used(&self, idx: u16) {
        fence(Ordering::Release);
        // SAFETY: offset 2 of the used area, translated for write, 4-aligned.
        unsafe { std::ptr::write_volatile(self.used.wrapping_add(2).cast::<u16>(), idx.to_le()) };
    }
}

/// Why a queue is parked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Parked {
    /// The I/O address that missed.
    pub iova: u64,
    /// The access that missed.
    pub access: Access,
    /// Whether the miss was reported to the frontend yet.
    pub reported: bool,
}

/// How many chains ahead a device should [`Queue::prefetch`]: enough to
/// cover a cross-core miss with the work on the chains in between, few
/// enough not to fill the core's miss buffers.
pub const PREFETCH_AHEAD: usize = 8;

/// Hints the CPU to load the cache line at `p` (no effect on correctness:
/// a prefetch never faults, whatever the address).
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: PREFETCHT0 only hints the cache; it reads nothing
        // architecturally and does not fault on any address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Bytes of a buffer [`Queue::prefetch`] brings in: a minimum-size frame
/// (64 bytes) and a virtio-net header; the hardware prefetcher follows
/// larger ones.
pub const PREFETCH_BYTES: usize = 80;

/// Prefetches the cache lines holding bytes `skip..skip + PREFETCH_BYTES`
/// of `f`, for writing if the device writes them: the lines then arrive
/// owned, without a second round trip to the driver's core.
#[inline(always)]
fn prefetch_frag(f: &Frag, skip: usize) {
    let skip = skip.min(f.len);
    let start = f.addr.saturating_add(skip);
    let end = start.saturating_add((f.len - skip).min(PREFETCH_BYTES));
    let mut line = start & !63;
    // At most three lines.
    while line < end {
        let p = line as *const u8;
        if f.writable {
            prefetch_write(p);
        } else {
            prefetch(p);
        }
        line += 64;
    }
}

/// Like [`prefetch`], asking for the line in a writable state (PREFETCHW).
#[inline(always)]
fn prefetch_write(p: *const u8) {
    // Inline assembly: the intrinsic emits PREFETCHW only when the crate is
    // built for a CPU level that has it, and a plain prefetch otherwise.
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHW only hints the cache; it reads and writes nothing
    // architecturally, does not fault on any address, and executes as a NOP
    // on the few x86-64 CPUs without it.
    unsafe {
        std::arch::asm!("prefetchw [{}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Per-queue state shared between the connection thread and the worker.
#[derive(Debug)]
pub(crate) struct Vring {
    pub q: virtio_queue::Queue,
    /// The eventfd the driver's kicks arrive on (installed by the transport).
    pub kick: Option<EventFd>,
    /// The driver's call and error eventfds, for transports that signal
    /// through them.
    pub signals: Signals,
    /// SET_VRING_ENABLE state.
    pub enabled: bool,
    /// Started by the frontend (kick received) and not stopped by GET_VRING_BASE.
    pub started: bool,
    /// Waiting for the frontend to map an address.
    pub parked: Option<Parked>,
    /// A non-recoverable error hit this queue; it stays stopped until reset.
    pub broken: bool,
    /// Chains completed with an error status (counted, rate-limited warnings).
    pub errors: u64,
    /// Used elements added since the driver was last notified (or asked
    /// not to be); saturates, and a large count always notifies.
    pub num_added: u16,
    /// `VIRTIO_F_IN_ORDER` was negotiated: buffers are used in the order
    /// they were made available, and a batch of them may be completed with
    /// one used element (see [`Queue::add_used_batch`]).
    pub in_order: bool,
}

impl Vring {
    /// A stopped queue; `None` if `max_size` is not a power of two in
    /// `1..=MAX_QUEUE_SIZE`.
    pub fn new(max_size: u16) -> Option<Self> {
        let q = virtio_queue::Queue::new(max_size).ok()?;
        Some(Vring {
            q,
            kick: None,
            signals: Signals::default(),
            enabled: false,
            started: false,
            parked: None,
            broken: false,
            errors: 0,
            num_added: 0,
            in_order: false,
        })
    }

    /// True when a worker may process this queue.
    pub fn serving(&self) -> bool {
        self.started && self.enabled && self.parked.is_none() && !self.broken && self.q.ready()
    }
}

/// The queues of one worker thread, handed to [`Worker`](crate::device::Worker)
/// methods.
#[derive(Debug)]
pub struct Queues<'a> {
    vrings: &'a [(u16, std::sync::Arc<Mutex<Vring>>)],
    dma: Dma<'a>,
    /// The thread's writes to the driver's call eventfds.
    writer: &'a Writer,
    /// How the driver is signalled.
    transport: &'a dyn Transport,
    /// IOTLB translation: a buffer miss parks the queue (the frontend can
    /// map it). False with the memory table: the chain is completed with 0.
    park_on_miss: bool,
    /// Ring translations made in this access section, reused by later
    /// [`get`](Queues::get)s of the same queue while its ring layout is
    /// unchanged (a polling worker gets its queues many times per section).
    rings: [Option<CachedRings>; RINGS_CACHED],
}

/// Queues per worker whose ring translations [`Queues`] keeps.
const RINGS_CACHED: usize = 4;

/// A ring translation of one queue, valid for the section it was made in.
#[derive(Clone, Copy, Debug)]
struct CachedRings {
    index: u16,
    layout: RingLayout,
    rings: Rings,
}

/// What a ring translation depends on: the driver's ring addresses, the
/// queue size and whether the event-index fields exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RingLayout {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    event_idx: bool,
}

impl RingLayout {
    fn of(q: &virtio_queue::Queue) -> RingLayout {
        RingLayout {
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
            size: q.size(),
            event_idx: q.event_idx_enabled(),
        }
    }
}

impl<'a> Queues<'a> {
    /// The queues `vrings` of one worker, reached through `dma` (one access
    /// section): buffers that miss park the queue if `park_on_miss`; the
    /// driver is signalled through `transport`, with `writer` (the
    /// thread's) for writes to the driver's eventfds.
    pub(crate) fn new(
        vrings: &'a [(u16, std::sync::Arc<Mutex<Vring>>)],
        dma: Dma<'a>,
        park_on_miss: bool,
        writer: &'a Writer,
        transport: &'a dyn Transport,
    ) -> Queues<'a> {
        Queues {
            vrings,
            dma,
            writer,
            transport,
            park_on_miss,
            rings: [None; RINGS_CACHED],
        }
    }

    /// The thread's queue `index`, if it is running: started by the
    /// frontend, enabled, not parked on a translation miss and not failed, and
    /// its rings are mapped. Returns `None` otherwise (and when this thread
    /// already holds that queue).
    pub fn get(&mut self, index: u16) -> Option<Queue<'a>> {
        let (_, m) = self.vrings.iter().find(|(i, _)| *i == index)?;
        let guard = match m.try_lock() {
            Ok(g) => g,
            // The connection thread holds it briefly; wait for it.
            Err(TryLockError::WouldBlock) => match m.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            },
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        if !guard.serving() {
            return None;
        }
        let next_avail = guard.q.next_avail();
        let mut queue = Queue {
            index,
            vring: guard,
            dma: self.dma,
            writer: self.writer,
            transport: self.transport,
            rings: None,
            epoch: EPOCH.fetch_add(1, Ordering::Relaxed),
            avail_cache: next_avail,
            prefetch_skip: 0,
            dirty: false,
            park_on_miss: self.park_on_miss,
            tail_pops: 0,
        };
        let layout = RingLayout::of(&queue.vring.q);
        let slot = self
            .rings
            .iter()
            .position(|c| c.is_none_or(|c| c.index == index));
        if let Some(c) = slot.and_then(|i| self.rings[i]) {
            if c.layout == layout {
                // Translated in this section: still valid (an unmap waits
                // for the section to end).
                queue.rings = Some(c.rings);
                return Some(queue);
            }
        }
        match queue.check_rings() {
            Ok(()) => {
                if let (Some(i), Some(rings)) = (slot, queue.rings) {
                    self.rings[i] = Some(CachedRings {
                        index,
                        layout,
                        rings,
                    });
                }
                Some(queue)
            }
            Err(e) => {
                if !matches!(e.dma_error(), Some(d) if d.is_miss()) {
                    crate::log_limited!(log::Level::Error, "queue {index}: {e}");
                }
                None
            }
        }
    }

    /// Indices of the queues this thread serves.
    pub fn indices(&self) -> impl Iterator<Item = u16> + '_ {
        self.vrings.iter().map(|(i, _)| *i)
    }

    /// The thread's DMA handle.
    pub fn dma(&self) -> Dma<'a> {
        self.dma
    }
}

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

    /// Checks that the three rings are mapped with the access they need; on a
    /// miss the queue is parked.
    fn check_rings(&mut self) -> Result<()> {
        let size = u64::from(self.vring.q.size());
        let event = u64::from(self.vring.q.event_idx_enabled()) * 2;
        let checks = [
            (self.vring.q.desc_table(), size * 16, Access::Read),
            (
                self.vring.q.avail_ring(),
                4 + size * 2 + event,
                Access::Read,
            ),
            (
                self.vring.q.used_ring(),
                4 + size * 8 + event,
                Access::Write,
            ),
        ];
        let mut ptrs = [std::ptr::null_mut::<u8>(); 3];
        let mut contiguous = true;
        for (i, (addr, len, access)) in checks.into_iter().enumerate() {
            match self.dma.fragment(addr, len, access) {
                Ok(f) if f.len() as u64 == len => ptrs[i] = f.as_ptr(),
                Ok(_) => {
                    contiguous = false;
                    if let Err(e) = self.dma.check(addr, len, access) {
                        return Err(self.dma_err(e));
                    }
                }
                Err(e) => return Err(self.dma_err(e)),
            }
        }
        let aligned =
            ptrs[0] as usize % 16 == 0 && ptrs[1] as usize % 2 == 0 && ptrs[2] as usize % 4 == 0;
        if contiguous && aligned && size > 0 {
            self.rings = Some(Rings {
                desc: ptrs[0],
                avail: ptrs[1],
                used: ptrs[2],
                size: self.vring.q.size(),
                event_idx: event != 0,
            });
        }
        Ok(())
    }

    /// Pops the next available chain into `chain`. Returns `Ok(false)` when
    /// the driver has made nothing more available.
    ///
    /// Every buffer of the chain is translated before it is returned, so the
    /// device's accesses to it cannot miss while this call's access section
    /// lasts. On a translation miss the chain is put back, the queue is parked
    /// and the miss is returned; a malformed chain is completed with length 0
    /// and reported as [`QueueError::BadChain`].
    pub fn pop(&mut self, chain: &mut Chain) -> Result<bool> {
        chain.clear();
        let r = match self.rings {
            Some(r) => self.pop_fast(r, chain),
            None => self.pop_slow(chain),
        };
        if matches!(r, Ok(true)) {
            self.tail_pops = self.tail_pops.saturating_add(1);
        }
        r
    }

    /// Gives back the last `n` chains popped from this queue, which the
    /// caller has not completed and drops: the driver still owns them and
    /// they are popped again later (a device that popped ahead returns what
    /// it did not use, so a ring stopped in between loses no buffers).
    /// Returns false, changing nothing, if fewer than `n` chains were popped
    /// in a row since this queue was handed out or since the last malformed
    /// chain it completed.
    pub fn unpop(&mut self, n: u16) -> bool {
        if n > self.tail_pops {
            return false;
        }
        let next = self.vring.q.next_avail();
        self.vring.q.set_next_avail(next.wrapping_sub(n));
        self.tail_pops -= n;
        true
    }

    /// Reads `avail->idx` into the cache and checks it against the ring.
    fn refresh_avail(&mut self, r: &Rings) -> Result<()> {
        let avail = r.avail_idx();
        let next = self.vring.q.next_avail();
        if avail.wrapping_sub(next) > r.size {
            self.vring.broken = true;
            return Err(QueueError::AvailIndex {
                queue: self.index,
                avail,
                next,
            });
        }
        self.avail_cache = avail;
        Ok(())
    }

    /// The fast path of [`pop`](Queue::pop): the chain is read straight from
    /// the translated descriptor table. Indirect chains go to the slow path.
    fn pop_fast(&mut self, r: Rings, chain: &mut Chain) -> Result<bool> {
        let next = self.vring.q.next_avail();
        if next == self.avail_cache {
            self.refresh_avail(&r)?;
            if next == self.avail_cache {
                return Ok(false);
            }
        }
        // The size is a power of two (virtio-queue checks it).
        let head = r.avail_entry(next & (r.size - 1));
        let mut idx = head;
        let mut count = 0u16;
        chain.head = head;
        chain.epoch = self.epoch;
        let bad = loop {
            // At most `size` descriptors: longer means a loop.
            if idx >= r.size || count >= r.size {
                break None;
            }
            count += 1;
            let d = r.desc(idx);
            if d.flags & VRING_DESC_F_INDIRECT != 0 {
                chain.clear();
                return self.pop_slow(chain);
            }
            let writable = d.flags & VRING_DESC_F_WRITE != 0;
            if d.addr.checked_add(u64::from(d.len)).is_none() {
                break None;
            }
            chain.descs.push(Desc {
                addr: d.addr,
                len: d.len,
                writable,
            });
            if writable {
                chain.writable += u64::from(d.len);
            } else {
                chain.readable += u64::from(d.len);
            }
            if let Err(e) = self.translate_into(chain, d.addr, d.len, writable) {
                break Some(e);
            }
            if d.flags & VRING_DESC_F_NEXT == 0 {
                self.vring.q.set_next_avail(next.wrapping_add(1));
                return Ok(true);
            }
            idx = d.next;
        };
        chain.clear();
        if let Some(e) = bad {
            if e.is_miss() && self.park_on_miss {
                // Not consumed: popped again once the frontend maps it.
                return Err(self.dma_err(e));
            }
            self.vring.q.set_next_avail(next.wrapping_add(1));
            self.complete_bad(head);
            if e.is_miss() {
                // Memory table: the address is outside guest memory.
                self.warn_bad_address(head, &e);
                return Err(QueueError::BadChain {
                    queue: self.index,
                    head,
                });
            }
            // Permission failure or fault: the chain cannot be served.
            return Err(self.dma_err(e));
        }
        self.vring.q.set_next_avail(next.wrapping_add(1));
        self.complete_bad(head);
        Err(QueueError::BadChain {
            queue: self.index,
            head,
        })
    }

    /// Translates one buffer into host fragments appended to `chain`.
    #[inline]
    fn translate_into(
        &self,
        chain: &mut Chain,
        addr: u64,
        len: u32,
        writable: bool,
    ) -> std::result::Result<(), DmaError> {
        let access = if writable {
            Access::Write
        } else {
            Access::Read
        };
        let mut at = addr;
        let mut left = u64::from(len);
        // Each fragment holds at least one byte.
        while left > 0 {
            let f = self.dma.fragment(at, left, access)?;
            chain.frags.push(Frag {
                addr: f.as_ptr() as usize,
                len: f.len(),
                writable,
            });
            at = at.wrapping_add(f.len() as u64);
            left -= f.len() as u64;
        }
        Ok(())
    }

    fn warn_bad_address(&self, head: u16, e: &DmaError) {
        if self.vring.errors.is_power_of_two() {
            warn!(
                "queue {}: chain {head} has a buffer outside guest memory ({e}); completed with length 0",
                self.index
            );
        }
    }

    /// The virtio-queue path of [`pop`](Queue::pop): rings that are not
    /// host-contiguous, indirect descriptor tables.
    fn pop_slow(&mut self, chain: &mut Chain) -> Result<bool> {
        let dma = self.dma;
        dma.clear_fault();
        let queue = self.index;
        let mut truncated = true;
        let fault = {
            let mut iter = match self.vring.q.iter(&dma) {
                Ok(it) => it,
                Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                    let next = self.vring.q.next_avail();
                    let avail = self
                        .vring
                        .q
                        .avail_idx(&dma, std::sync::atomic::Ordering::Acquire)
                        .map(|w| w.0)
                        .unwrap_or(0);
                    self.vring.broken = true;
                    return Err(QueueError::AvailIndex { queue, avail, next });
                }
                Err(e) => {
                    if let Some(f) = dma.take_fault() {
                        return Err(self.dma_err(f));
                    }
                    return Err(QueueError::Ring {
                        queue,
                        msg: e.to_string(),
                    });
                }
            };
            match iter.next() {
                None => match dma.take_fault() {
                    Some(f) => Some((f, false)),
                    None => return Ok(false),
                },
                Some(dc) => {
                    chain.head = dc.head_index();
                    for d in dc {
                        truncated = d.has_next();
                        let desc = Desc {
                            addr: d.addr().0,
                            len: d.len(),
                            writable: d.is_write_only(),
                        };
                        if desc.writable {
                            chain.writable += u64::from(desc.len);
                        } else {
                            chain.readable += u64::from(desc.len);
                        }
                        chain.descs.push(desc);
                    }
                    let f = dma.take_fault();
                    if f.is_some() && self.park_on_miss {
                        // Put the chain back: it is popped again once mapped.
                        iter.go_to_previous_position();
                    }
                    f.map(|f| (f, true))
                }
            }
        };
        if let Some((f, has_head)) = fault {
            let head = chain.head;
            chain.clear();
            if has_head && !self.park_on_miss {
                // Memory table: an indirect table outside guest memory.
                self.complete_bad(head);
                self.warn_bad_address(head, &f);
                return Err(QueueError::BadChain { queue, head });
            }
            return Err(self.dma_err(f));
        }
        let head = chain.head;
        if truncated || chain.descs.is_empty() {
            self.complete_bad(head);
            chain.clear();
            return Err(QueueError::BadChain { queue, head });
        }
        // Translate every buffer now, so a miss is seen before any work is
        // done and the chain can be offered again.
        for i in 0..chain.descs.len() {
            let d = chain.descs[i];
            let access = if d.writable {
                Access::Write
            } else {
                Access::Read
            };
            if let Err(e) = dma.check(d.addr, u64::from(d.len), access) {
                if e.is_miss() && !self.park_on_miss {
                    self.complete_bad(head);
                    chain.clear();
                    self.warn_bad_address(head, &e);
                    return Err(QueueError::BadChain { queue, head });
                }
                if e.is_miss() {
                    let next = self.vring.q.next_avail();
                    self.vring.q.set_next_avail(next.wrapping_sub(1));
                    chain.clear();
                    return Err(self.dma_err(e));
                }
                // Permission failure or fault: the chain cannot be served.
                self.complete_bad(head);
                chain.clear();
                return Err(self.dma_err(e));
            }
        }
        Ok(true)
    }

    /// Pops up to `chains.len()` chains into `chains` and returns how many.
    ///
    /// Any error after some chains were popped ends the batch early with the
    /// chains popped so far, so none is lost (a miss parks the queue and the
    /// framework reports it; a malformed chain was completed with length 0
    /// and counted; a broken ring is not served again); an error on the first
    /// one is returned, like [`pop`](Queue::pop). [`pop_burst`](Queue::pop_burst)
    /// also skips malformed chains and hands back the error.
    pub fn pop_batch(&mut self, chains: &mut [Chain]) -> Result<usize> {
        let mut n = 0;
        for c in chains.iter_mut() {
            match self.pop(c) {
                Ok(true) => n += 1,
                Ok(false) => break,
                Err(_) if n > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Pops a burst: up to `chains.len()` chains into `chains`, reading the
    /// driver's avail index once (the fast path). Malformed chains are
    /// completed with length 0 by the queue, skipped and counted in
    /// [`Burst::bad`]. An error ends the burst early; the chains popped
    /// before it are returned with it and must be completed as usual.
    pub fn pop_burst(&mut self, chains: &mut [Chain]) -> Burst {
        let mut burst = Burst::default();
        if let Some(r) = self.rings {
            self.prefetch_descs(r, chains.len());
        }
        // Every skipped chain consumed an avail entry: at most `size` of them.
        let limit = chains.len() + usize::from(self.size());
        for _ in 0..limit {
            let Some(c) = chains.get_mut(burst.popped) else {
                break;
            };
            match self.pop(c) {
                Ok(true) => {
                    // The caller reads or writes the buffers after the burst
                    // is popped: start bringing the first chains' lines in
                    // now (the caller prefetches the next ones as it goes,
                    // see `prefetch`; more at once only stall the core).
                    if burst.popped < PREFETCH_AHEAD {
                        self.prefetch(c);
                    }
                    burst.popped += 1;
                }
                Ok(false) => break,
                Err(QueueError::BadChain { .. }) => burst.bad += 1,
                Err(e) => {
                    burst.error = Some(e);
                    break;
                }
            }
        }
        burst
    }

    /// Hints the CPU to start loading the first bytes of `chain`'s buffers
    /// (for writing, if the device writes them). A device working through a
    /// burst calls it for the chain a few places ahead of the one it copies,
    /// so the cache misses on memory the driver's core wrote overlap with
    /// its work; [`pop_burst`](Queue::pop_burst) does it for the first
    /// [`PREFETCH_AHEAD`] chains. Without effect on correctness.
    #[inline]
    pub fn prefetch(&self, chain: &Chain) {
        if chain.epoch == self.epoch {
            if let Some(f) = chain.frags.first() {
                prefetch_frag(f, self.prefetch_skip);
            }
        }
    }

    /// Makes [`prefetch`](Queue::prefetch) (and `pop_burst`'s) start
    /// `bytes` into each buffer: a device that never reads a header the
    /// driver puts first saves a cache line per chain.
    pub fn set_prefetch_skip(&mut self, bytes: usize) {
        self.prefetch_skip = bytes;
    }

    /// Starts loading the descriptors of up to `n` chains the driver has
    /// made available (their heads are read from the avail ring now; `pop`
    /// reads them again and validates everything). The driver writes
    /// descriptors on another core: without this every descriptor of a
    /// burst is a cache miss taken one after the other.
    fn prefetch_descs(&mut self, r: Rings, n: usize) {
        let next = self.vring.q.next_avail();
        if next == self.avail_cache && self.refresh_avail(&r).is_err() {
            // `pop` meets the same error and reports it.
            return;
        }
        let ready = self.avail_cache.wrapping_sub(next);
        let n = u16::try_from(n).unwrap_or(u16::MAX).min(ready);
        for i in 0..n {
            let head = r.avail_entry(next.wrapping_add(i) & (r.size - 1));
            if head < r.size {
                prefetch(r.desc.wrapping_add(16 * usize::from(head)));
            }
        }
    }

    fn complete_bad(&mut self, head: u16) {
        // Chains popped before this one can no longer be given back.
        self.tail_pops = 0;
        self.vring.errors += 1;
        if self.vring.errors.is_power_of_two() {
            warn!(
                "queue {}: completing bad chain {head} with length 0 ({} so far)",
                self.index, self.vring.errors
            );
        }
        if let Err(e) = self.add_used(head, 0) {
            error!(
                "queue {}: cannot complete bad chain {head}: {e}",
                self.index
            );
            self.vring.broken = true;
        }
    }

    /// Puts `head` on the used ring with `len` bytes written. Call
    /// [`notify`](Queue::notify) after a batch. The used index the driver
    /// sees moves at the next [`notify`](Queue::notify),
    /// [`publish_used`](Queue::publish_used) or when the queue is dropped.
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<()> {
        let size = self.vring.q.size();
        if head >= size {
            return Err(QueueError::BadHead {
                queue: self.index,
                head,
                size,
            });
        }
        self.vring.num_added = self.vring.num_added.saturating_add(1);
        if let Some(r) = self.rings {
            let next = self.vring.q.next_used();
            r.write_used(next & (size - 1), u32::from(head), len);
            self.vring.q.set_next_used(next.wrapping_add(1));
            self.dirty = true;
            return Ok(());
        }
        self.dma.clear_fault();
        let dma = self.dma;
        match self.vring.q.add_used(&dma, head, len) {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Some(f) = dma.take_fault() {
                    return Err(self.dma_err(f));
                }
                Err(QueueError::Ring {
                    queue: self.index,
                    msg: e.to_string(),
                })
            }
        }
    }

    /// Completes `heads`, chains popped from this queue in this order and
    /// not yet completed, each with nothing written (a transmit queue's
    /// chains). With `VIRTIO_F_IN_ORDER` negotiated, the whole batch is one
    /// used element, the last head's, and the used index moves past all of
    /// them (the batching the virtio spec allows in-order devices); without,
    /// one element per head.
    ///
    /// On error, returns how many of `heads` (a prefix) were completed with
    /// it; a head out of range fails the batch before anything is completed.
    pub fn add_used_batch(
        &mut self,
        heads: &[u16],
    ) -> std::result::Result<(), (usize, QueueError)> {
        let size = self.vring.q.size();
        if let Some(&head) = heads.iter().find(|&&h| h >= size) {
            let e = QueueError::BadHead {
                queue: self.index,
                head,
                size,
            };
            return Err((0, e));
        }
        let (Some(r), true, Some(&last)) = (self.rings, self.vring.in_order, heads.last()) else {
            for (i, &h) in heads.iter().enumerate() {
                self.add_used(h, 0).map_err(|e| (i, e))?;
            }
            return Ok(());
        };
        // A driver cannot have more than `size` chains outstanding.
        let n = u16::try_from(heads.len()).unwrap_or(u16::MAX).min(size);
        let next = self.vring.q.next_used();
        let end = next.wrapping_add(n);
        r.write_used(end.wrapping_sub(1) & (size - 1), u32::from(last), 0);
        self.vring.q.set_next_used(end);
        self.vring.num_added = self.vring.num_added.saturating_add(n);
        self.dirty = true;
        Ok(())
    }

    /// Publishes the used index for the elements added so far (one
    /// release-ordered write for a whole burst). [`notify`](Queue::notify)
    /// and dropping the queue do it too.
    pub fn publish_used(&mut self) {
        if std::mem::take(&mut self.dirty) {
            if let Some(r) = self.rings {
                r.publish_used(self.vring.q.next_used());
            }
        }
    }

    /// Publishes the used index and signals the driver if it asked to be:
    /// with `EVENT_IDX`, when the used index passed its `used_event`;
    /// without, unless it set `VRING_AVAIL_F_NO_INTERRUPT`.
    pub fn notify(&mut self) -> Result<()> {
        self.publish_used();
        let added = std::mem::take(&mut self.vring.num_added);
        // The used index must be visible before the driver's suppression
        // state is read (the driver does the converse).
        fence(Ordering::SeqCst);
        let needed = match self.rings {
            Some(r) if r.event_idx => {
                let new = self.vring.q.next_used();
                let old = new.wrapping_sub(added);
                added > r.size
                    || new.wrapping_sub(r.used_event()).wrapping_sub(1) < new.wrapping_sub(old)
            }
            Some(r) => r.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT == 0,
            None if self.vring.q.event_idx_enabled() => {
                let dma = self.dma;
                // If the event index cannot be read, signalling is the safe choice.
                self.vring.q.needs_notification(&dma).unwrap_or(true)
            }
            None => {
                let flags: u16 = self
                    .dma
                    .read_obj(self.vring.q.avail_ring())
                    .map(u16::from_le)
                    .unwrap_or(0);
                flags & VRING_AVAIL_F_NO_INTERRUPT == 0
            }
        };
        if needed {
            self.signal()?;
        }
        Ok(())
    }

    /// Publishes the used index and signals the driver unconditionally,
    /// through the device's transport (vhost-user writes the ring's call
    /// eventfd).
    ///
    /// A call eventfd whose counter is full needs no signal (the driver has
    /// one it has not read). One the frontend also made blocking is
    /// forgotten once the write was interrupted ([`crate::peer_write`]):
    /// the queue then signals nothing until the frontend sets a new one.
    pub fn signal(&mut self) -> Result<()> {
        self.publish_used();
        self.transport
            .call(self.index, &mut self.vring.signals, self.writer)
            .map_err(|source| QueueError::Notify {
                queue: self.index,
                source,
            })
    }

    /// Asks the driver to kick again (clears suppression). Returns true if
    /// chains became available meanwhile: process them before sleeping.
    pub fn enable_notification(&mut self) -> Result<bool> {
        let dma = self.dma;
        self.vring
            .q
            .enable_notification(&dma)
            .map_err(|e| QueueError::Ring {
                queue: self.index,
                msg: e.to_string(),
            })
    }

    /// Asks the driver not to kick (the device polls).
    ///
    /// Writes nothing when the driver was already asked: the used ring's
    /// first line is the one the driver polls, and a store to it, even of
    /// the same value, takes it away from the driver's core.
    pub fn disable_notification(&mut self) -> Result<()> {
        if let Some(r) = self.rings {
            if !r.event_idx && r.used_flags() & VRING_USED_F_NO_NOTIFY == 0 {
                r.set_used_flags(VRING_USED_F_NO_NOTIFY);
            }
            // With EVENT_IDX the driver kicks only when the avail index
            // passes `avail_event`, which is left behind while polling.
            return Ok(());
        }
        let dma = self.dma;
        self.vring
            .q
            .disable_notification(&dma)
            .map_err(|e| QueueError::Ring {
                queue: self.index,
                msg: e.to_string(),
            })
    }

    /// Copies device-readable bytes of `chain`, starting `offset` bytes into
    /// its readable part, into `buf`. Returns the number of bytes copied
    /// (less than `buf.len()` at the end of the readable part).
    pub fn read(&mut self, chain: &Chain, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if chain.epoch == self.epoch {
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
        let dma = &self.dma;
        walk_descs(chain, false, offset, buf.len(), |addr, done, n| {
            dma.read(addr, &mut buf[done..done + n])
        })
        .map_err(|e| self.dma_err(e))
    }

    /// Copies `data` into the device-writable part of `chain`, starting
    /// `offset` bytes into it. Returns the number of bytes written (less than
    /// `data.len()` when the writable part is too short).
    pub fn write(&mut self, chain: &Chain, offset: u64, data: &[u8]) -> Result<usize> {
        if chain.epoch == self.epoch {
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
        let dma = &self.dma;
        walk_descs(chain, true, offset, data.len(), |addr, done, n| {
            dma.write(addr, &data[done..done + n])
        })
        .map_err(|e| self.dma_err(e))
    }

    /// Next available index the device will pop.
    pub fn next_avail(&self) -> u16 {
        self.vring.q.next_avail()
    }

    /// Next used index the device will fill.
    pub fn next_used(&self) -> u16 {
        Wrapping(self.vring.q.next_used()).0
    }
}

/// Walks the readable (or writable) fragments of `chain` from `offset`,
/// calling `copy(fragment, offset in it, bytes, bytes done)` until `want`
/// bytes are done or the fragments end. Returns the bytes done.
#[inline]
/// The slow-path twin of [`copy_frags`]: walks the chain's descriptors of
/// one direction (device-readable or device-writable), skipping `offset`
/// bytes, and hands `step(addr, done, n)` each piece until `want` bytes are
/// covered or the chain ends. Returns the bytes covered, or the first error.
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
    use std::sync::{Arc, Mutex};

    use iommu_core::{HwInfo, Iommu, Memory, Perm};
    use virtio_queue::QueueT;

    use super::*;
    use crate::dma::Section;
    use crate::testing::{Buf, DriverRing};

    const RING_IOVA: u64 = 0x10_0000;
    const BUF_IOVA: u64 = 0x20_0000;

    struct Fixture {
        iommu: Iommu,
        ioas: u32,
        core: iommu_core::Device,
        ring_mem: Arc<Memory>,
        buf_mem: Arc<Memory>,
        vrings: Vec<(u16, Arc<Mutex<Vring>>)>,
        driver: DriverRing,
        park_on_miss: bool,
    }

    fn fixture(map_bufs: bool) -> Fixture {
        let iommu = Iommu::new();
        let core = iommu_core::Device::new("q", HwInfo::default());
        let dev_id = iommu.bind(&core).expect("bind");
        let ioas = iommu.ioas_alloc().expect("ioas");
        iommu.attach(dev_id, None, ioas).expect("attach");
        let ring_mem = Memory::anonymous("ring", 0x4000).expect("ring mem");
        let buf_mem = Memory::anonymous("buf", 0x4000).expect("buf mem");
        iommu
            .ioas_map(ioas, &ring_mem, 0, 0x4000, Some(RING_IOVA), Perm::RW)
            .expect("map ring");
        if map_bufs {
            iommu
                .ioas_map(ioas, &buf_mem, 0, 0x4000, Some(BUF_IOVA), Perm::RW)
                .expect("map bufs");
        }
        let driver = DriverRing::new(ring_mem.clone(), 0, RING_IOVA, 16).expect("ring");
        let mut v = Vring::new(16).expect("vring");
        v.q.set_size(16);
        v.q.try_set_desc_table_address(vm_memory::GuestAddress(driver.desc_addr()))
            .expect("desc");
        v.q.try_set_avail_ring_address(vm_memory::GuestAddress(driver.avail_addr()))
            .expect("avail");
        v.q.try_set_used_ring_address(vm_memory::GuestAddress(driver.used_addr()))
            .expect("used");
        v.q.set_ready(true);
        v.started = true;
        v.enabled = true;
        Fixture {
            iommu,
            ioas,
            core,
            ring_mem,
            buf_mem,
            vrings: vec![(0, Arc::new(Mutex::new(v)))],
            driver,
            park_on_miss: true,
        }
    }

    fn with_queue<R>(f: &Fixture, body: impl FnOnce(Option<Queue<'_>>) -> R) -> R {
        let mut tr = f.core.translator();
        let section = Section::new(&mut tr, None, false);
        let mut qs = Queues::new(
            &f.vrings,
            Dma::from_section(&section),
            f.park_on_miss,
            Writer::unattached(),
            &crate::transport::Local,
        );
        body(qs.get(0))
    }

    /// Makes `n` one-buffer chains of 16 bytes at `BUF_IOVA` available.
    fn offer(f: &mut Fixture, n: usize, writable: bool) {
        for _ in 0..n {
            f.driver
                .add_chain(&[Buf {
                    addr: BUF_IOVA,
                    len: 16,
                    writable,
                }])
                .expect("chain");
        }
        f.driver.publish().expect("publish");
    }

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

    #[test]
    fn test_miss_parks_queue_and_keeps_chain() {
        let mut f = fixture(false);
        f.driver
            .add_chain(&[Buf {
                addr: BUF_IOVA,
                len: 64,
                writable: true,
            }])
            .expect("chain");
        f.driver.publish().expect("publish");
        let mut chain = Chain::new();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            let e = q.pop(&mut chain).expect_err("miss");
            assert_eq!(
                e.dma_error().and_then(DmaError::miss_address),
                Some((BUF_IOVA, Access::Write))
            );
        });
        {
            let v = f.vrings[0].1.lock().expect("lock");
            assert!(v.parked.is_some());
            assert_eq!(v.q.next_avail(), 0, "the chain must be offered again");
        }
        // A parked queue is not handed out.
        with_queue(&f, |q| assert!(q.is_none()));
        // The frontend maps the buffer; the queue resumes.
        f.iommu
            .ioas_map(f.ioas, &f.buf_mem, 0, 0x4000, Some(BUF_IOVA), Perm::RW)
            .expect("map");
        f.vrings[0].1.lock().expect("lock").parked = None;
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert!(q.pop(&mut chain).expect("pop"));
            q.add_used(chain.head(), 0).expect("used");
        });
        assert_eq!(f.driver.used_idx().expect("idx"), 1);
        let _ = &f.ring_mem;
    }

    #[test]
    fn test_pop_batch_stops_at_a_miss_and_keeps_the_rest() {
        let mut f = fixture(false);
        f.iommu
            .ioas_map(f.ioas, &f.buf_mem, 0, 0x1000, Some(BUF_IOVA), Perm::RW)
            .expect("map first page");
        for i in 0..3u64 {
            f.driver
                .add_chain(&[Buf {
                    addr: BUF_IOVA + i * 0x1000,
                    len: 16,
                    writable: true,
                }])
                .expect("chain");
        }
        f.driver.publish().expect("publish");
        let mut chains = vec![Chain::new(); 8];
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert_eq!(q.pop_batch(&mut chains).expect("batch"), 1);
            q.add_used(chains[0].head(), 0).expect("used");
        });
        let v = f.vrings[0].1.lock().expect("lock");
        assert_eq!(v.parked.map(|p| p.iova), Some(BUF_IOVA + 0x1000));
        assert_eq!(v.q.next_avail(), 1, "the missed chain is offered again");
    }

    #[test]
    fn test_permission_failure_completes_chain_and_breaks_queue() {
        let mut f = fixture(false);
        f.iommu
            .ioas_map(f.ioas, &f.buf_mem, 0, 0x4000, Some(BUF_IOVA), Perm::READ)
            .expect("map read-only");
        f.driver
            .add_chain(&[Buf {
                addr: BUF_IOVA,
                len: 64,
                writable: true,
            }])
            .expect("chain");
        f.driver.publish().expect("publish");
        let mut chain = Chain::new();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            let e = q.pop(&mut chain).expect_err("denied");
            assert!(e.dma_error().and_then(DmaError::denied_address).is_some());
        });
        assert_eq!(
            f.driver.used_idx().expect("idx"),
            1,
            "head completed with 0"
        );
        assert!(f.vrings[0].1.lock().expect("lock").broken);
    }

    #[test]
    fn test_bad_avail_index_is_an_error_not_empty() {
        let mut f = fixture(true);
        f.driver.set_avail_idx(100).expect("idx");
        let mut chain = Chain::new();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert!(matches!(
                q.pop(&mut chain),
                Err(QueueError::AvailIndex { avail: 100, .. })
            ));
        });
    }

    #[test]
    fn test_descriptor_loop_is_bad_chain() {
        let mut f = fixture(true);
        // Two descriptors pointing at each other.
        f.driver
            .write_desc(0, BUF_IOVA, 8, crate::testing::VRING_DESC_F_NEXT, 1)
            .expect("d0");
        f.driver
            .write_desc(1, BUF_IOVA, 8, crate::testing::VRING_DESC_F_NEXT, 0)
            .expect("d1");
        f.driver.push_avail(0).expect("avail");
        f.driver.publish().expect("publish");
        let mut chain = Chain::new();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert!(matches!(
                q.pop(&mut chain),
                Err(QueueError::BadChain { head: 0, .. })
            ));
        });
        assert_eq!(f.driver.used_idx().expect("idx"), 1, "bad chain completed");
    }

    #[test]
    fn test_memory_table_miss_completes_the_head_and_goes_on() {
        let mut f = fixture(false);
        f.park_on_miss = false;
        f.iommu
            .ioas_map(f.ioas, &f.buf_mem, 0, 0x1000, Some(BUF_IOVA), Perm::RW)
            .expect("map first page");
        // Chain 0 is outside guest memory, chain 1 is fine.
        for addr in [BUF_IOVA + 0x8000, BUF_IOVA] {
            f.driver
                .add_chain(&[Buf {
                    addr,
                    len: 16,
                    writable: true,
                }])
                .expect("chain");
        }
        f.driver.publish().expect("publish");
        let mut chain = Chain::new();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert!(matches!(
                q.pop(&mut chain),
                Err(QueueError::BadChain { head: 0, .. })
            ));
            assert!(q.pop(&mut chain).expect("next chain"));
            assert_eq!(chain.head(), 1);
            assert_eq!(q.write(&chain, 0, b"ok").expect("write"), 2);
            q.add_used(chain.head(), 2).expect("used");
        });
        let v = f.vrings[0].1.lock().expect("lock");
        assert!(v.parked.is_none(), "the queue goes on");
        assert!(!v.broken);
        assert_eq!(v.errors, 1);
        drop(v);
        assert_eq!(f.driver.used_idx().expect("idx"), 2);
        assert_eq!(f.driver.used_elem(0).expect("elem"), (0, 0));
        assert_eq!(f.driver.used_elem(1).expect("elem"), (1, 2));
    }

    fn set_call(f: &Fixture) -> EventFd {
        let call = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        f.vrings[0].1.lock().expect("lock").signals.call = Some(call.try_clone().expect("clone"));
        call
    }

    fn avail_flags(f: &Fixture, flags: u16) {
        let off = usize::try_from(f.driver.avail_addr() - RING_IOVA).expect("offset");
        f.ring_mem
            .write_at(off, &flags.to_le_bytes())
            .expect("flags");
    }

    #[test]
    fn test_notify_honours_no_interrupt_without_event_idx() {
        let mut f = fixture(true);
        let call = set_call(&f);
        offer(&mut f, 1, true);
        avail_flags(&f, VRING_AVAIL_F_NO_INTERRUPT);
        let mut chain = Chain::new();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert!(q.pop(&mut chain).expect("pop"));
            q.add_used(chain.head(), 0).expect("used");
            q.notify().expect("notify");
        });
        assert_eq!(f.driver.used_idx().expect("idx"), 1, "published");
        assert!(call.read().is_err(), "no interrupt asked for none");
        avail_flags(&f, 0);
        with_queue(&f, |q| {
            q.expect("queue serving").notify().expect("notify");
        });
        assert_eq!(call.read().expect("signalled"), 1);
    }

    #[test]
    fn test_used_index_is_published_once_per_burst() {
        let mut f = fixture(true);
        for i in 0..4u64 {
            f.driver
                .add_chain(&[Buf {
                    addr: BUF_IOVA + i * 0x100,
                    len: 16,
                    writable: true,
                }])
                .expect("chain");
        }
        f.driver.publish().expect("publish");
        let mut chains = vec![Chain::new(); 8];
        let driver = &f.driver;
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert_eq!(q.pop_batch(&mut chains).expect("burst"), 4);
            for c in &chains[..4] {
                q.add_used(c.head(), 16).expect("used");
            }
            assert_eq!(driver.used_idx().expect("idx"), 0, "not yet published");
            q.publish_used();
            assert_eq!(driver.used_idx().expect("idx"), 4);
        });
        for i in 0..4u16 {
            assert_eq!(f.driver.used_elem(i).expect("elem"), (u32::from(i), 16));
        }
    }

    fn add_used_batch_on(in_order: bool) -> Fixture {
        let mut f = fixture(true);
        f.vrings[0].1.lock().expect("lock").in_order = in_order;
        offer(&mut f, 5, false);
        let mut chains: Vec<Chain> = (0..8).map(|_| Chain::new()).collect();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            let b = q.pop_burst(&mut chains);
            assert_eq!(b.popped, 5);
            let heads: Vec<u16> = chains[..5].iter().map(Chain::head).collect();
            q.add_used_batch(&heads).expect("batch");
            q.notify().expect("notify");
        });
        f
    }

    #[test]
    fn test_add_used_batch_in_order_writes_one_element() {
        // Virtio 1.1+ "In-order": an in-order device may complete a batch
        // with one used element carrying the last buffer's id.
        let f = add_used_batch_on(true);
        assert_eq!(f.driver.used_idx().expect("idx"), 5);
        assert_eq!(f.driver.used_elem(4).expect("elem"), (4, 0));
        for i in 0..4 {
            assert_eq!(
                f.driver.used_elem(i).expect("elem"),
                (0, 0),
                "slot {i} untouched"
            );
        }
    }

    #[test]
    fn test_add_used_batch_without_in_order_writes_every_element() {
        let f = add_used_batch_on(false);
        assert_eq!(f.driver.used_idx().expect("idx"), 5);
        for i in 0..5u16 {
            assert_eq!(f.driver.used_elem(i).expect("elem"), (u32::from(i), 0));
        }
    }

    #[test]
    fn test_add_used_batch_rejects_bad_head_before_completing() {
        let f = fixture(true);
        f.vrings[0].1.lock().expect("lock").in_order = true;
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            let r = q.add_used_batch(&[0, 1, 99]);
            assert!(matches!(r, Err((0, QueueError::BadHead { head: 99, .. }))));
            q.notify().expect("notify");
        });
        assert_eq!(f.driver.used_idx().expect("idx"), 0);
    }

    #[test]
    fn test_ring_translation_follows_a_moved_used_ring() {
        let mut f = fixture(true);
        offer(&mut f, 1, true);
        let mut tr = f.core.translator();
        let section = Section::new(&mut tr, None, false);
        let mut qs = Queues::new(
            &f.vrings,
            Dma::from_section(&section),
            true,
            Writer::unattached(),
            &crate::transport::Local,
        );
        drop(qs.get(0).expect("queue serving"));
        // The frontend moves the used ring (SET_VRING_ADDR) between two gets
        // of one section: the second must not use the first's translation.
        f.vrings[0]
            .1
            .lock()
            .expect("lock")
            .q
            .try_set_used_ring_address(vm_memory::GuestAddress(RING_IOVA + 0x2000))
            .expect("used");
        {
            let mut q = qs.get(0).expect("queue serving");
            let mut chain = Chain::new();
            assert!(q.pop(&mut chain).expect("pop"));
            q.add_used(chain.head(), 7).expect("used");
            q.publish_used();
        }
        let mut moved = [0u8; 12];
        f.ring_mem.read_at(0x2000, &mut moved).expect("read");
        assert_eq!(u16::from_le_bytes([moved[2], moved[3]]), 1, "new used idx");
        assert_eq!(
            u32::from_le_bytes([moved[8], moved[9], moved[10], moved[11]]),
            7
        );
        assert_eq!(f.driver.used_idx().expect("idx"), 0, "old ring untouched");
    }

    #[test]
    fn test_disable_then_enable_notification_sets_and_clears_no_notify() {
        let f = fixture(true);
        let used = f.driver.used_addr() - RING_IOVA;
        let flags = |f: &Fixture| {
            let mut b = [0u8; 2];
            f.ring_mem.read_at(used as usize, &mut b).expect("read");
            u16::from_le_bytes(b)
        };
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            q.disable_notification().expect("disable");
            q.disable_notification().expect("disable again");
        });
        assert_eq!(flags(&f), VRING_USED_F_NO_NOTIFY);
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert!(
                !q.enable_notification().expect("enable"),
                "nothing available"
            );
        });
        assert_eq!(flags(&f), 0);
    }

    #[test]
    fn test_event_idx_suppresses_until_used_event() {
        let mut f = fixture(true);
        f.vrings[0].1.lock().expect("lock").q.set_event_idx(true);
        let call = set_call(&f);
        for _ in 0..4 {
            f.driver
                .add_chain(&[Buf {
                    addr: BUF_IOVA,
                    len: 16,
                    writable: true,
                }])
                .expect("chain");
        }
        f.driver.publish().expect("publish");
        // The driver wants an interrupt once used passes 2.
        f.driver.set_used_event(2).expect("used event");
        let mut chain = Chain::new();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            for _ in 0..2 {
                assert!(q.pop(&mut chain).expect("pop"));
                q.add_used(chain.head(), 0).expect("used");
            }
            q.notify().expect("notify");
        });
        assert!(call.read().is_err(), "used 2 has not passed used_event 2");
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert!(q.pop(&mut chain).expect("pop"));
            q.add_used(chain.head(), 0).expect("used");
            q.notify().expect("notify");
        });
        assert_eq!(call.read().expect("signalled"), 1);
    }

    #[test]
    fn test_chain_longer_than_the_queue_is_bad() {
        let mut f = fixture(true);
        // 17 descriptors cannot exist in a 16-entry table; a chain that
        // revisits one is a loop whatever its shape.
        for i in 0..16u16 {
            f.driver
                .write_desc(
                    i,
                    BUF_IOVA,
                    8,
                    crate::testing::VRING_DESC_F_NEXT,
                    (i + 1) % 16,
                )
                .expect("desc");
        }
        f.driver.push_avail(3).expect("avail");
        f.driver.publish().expect("publish");
        let mut chain = Chain::new();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert!(matches!(
                q.pop(&mut chain),
                Err(QueueError::BadChain { head: 3, .. })
            ));
            assert!(!q.pop(&mut chain).expect("empty"));
        });
        assert_eq!(f.driver.used_idx().expect("idx"), 1);
        assert!(!f.vrings[0].1.lock().expect("lock").broken);
    }

    #[test]
    fn test_pop_burst_skips_bad_chains_and_stops_at_a_miss() {
        let mut f = fixture(false);
        f.iommu
            .ioas_map(f.ioas, &f.buf_mem, 0, 0x1000, Some(BUF_IOVA), Perm::RW)
            .expect("map first page");
        // good, loop, good, miss (IOTLB: parks), good
        f.driver
            .add_chain(&[Buf {
                addr: BUF_IOVA,
                len: 8,
                writable: false,
            }])
            .expect("c0");
        f.driver
            .write_desc(1, BUF_IOVA, 8, crate::testing::VRING_DESC_F_NEXT, 1)
            .expect("loop");
        f.driver.push_avail(1).expect("avail");
        f.driver.write_desc(2, BUF_IOVA, 8, 0, 0).expect("d2");
        f.driver.push_avail(2).expect("avail");
        f.driver
            .write_desc(3, BUF_IOVA + 0x2000, 8, 0, 0)
            .expect("d3");
        f.driver.push_avail(3).expect("avail");
        f.driver.write_desc(4, BUF_IOVA, 8, 0, 0).expect("d4");
        f.driver.push_avail(4).expect("avail");
        f.driver.publish().expect("publish");
        let mut chains = vec![Chain::new(); 8];
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            let b = q.pop_burst(&mut chains);
            assert_eq!((b.popped, b.bad), (2, 1));
            assert_eq!(
                b.error
                    .as_ref()
                    .and_then(QueueError::dma_error)
                    .and_then(DmaError::miss_address),
                Some((BUF_IOVA + 0x2000, Access::Read))
            );
            assert_eq!((chains[0].head(), chains[1].head()), (0, 2));
            for c in &chains[..2] {
                q.add_used(c.head(), 0).expect("used");
            }
        });
        assert_eq!(f.driver.used_idx().expect("idx"), 3, "loop + two good");
        let v = f.vrings[0].1.lock().expect("lock");
        assert_eq!(v.q.next_avail(), 3, "the missed chain is offered again");
    }

    #[test]
    fn test_unpop_gives_back_the_last_chains_only() {
        let mut f = fixture(true);
        for _ in 0..3 {
            f.driver
                .add_chain(&[Buf {
                    addr: BUF_IOVA,
                    len: 16,
                    writable: true,
                }])
                .expect("chain");
        }
        f.driver.publish().expect("publish");
        let mut chains = vec![Chain::new(); 3];
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert_eq!(q.pop_batch(&mut chains).expect("burst"), 3);
            q.add_used(chains[0].head(), 0).expect("used");
            assert!(!q.unpop(4), "only 3 were popped");
            assert!(q.unpop(2));
            assert!(!q.unpop(2), "nothing more to give back");
        });
        // The two given back are popped again, in order.
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert_eq!(q.pop_batch(&mut chains).expect("burst"), 2);
            assert_eq!((chains[0].head(), chains[1].head()), (1, 2));
            for c in &chains[..2] {
                q.add_used(c.head(), 0).expect("used");
            }
        });
        assert_eq!(f.driver.used_idx().expect("idx"), 3);
    }
}
