//! A worker's queues ([`Queues`]) and the [`Queue`] handles they give
//! out: a queue is handed out only when it is serving and its rings are
//! mapped with the access they need, and its rings' host addresses
//! (the ring translations) are kept for the access section, reused by
//! later gets of the same queue while its ring layout is unchanged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, TryLockError};

use virtio_queue::QueueT;

use super::{Queue, QueueError, Result, Rings, Vring};
use crate::dma::{Access, Dma};
use crate::peer_write::Writer;
use crate::transport::Transport;

/// Source of [`Queue`] epochs: each handed-out queue gets a distinct one.
static EPOCH: AtomicU64 = AtomicU64::new(1);

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

/// What [`Queues::lookup`] found for a queue.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// The queue is running: its handle.
    Ready(Queue<'a>),
    /// Started and enabled, but parked on a translation miss the frontend
    /// is expected to resolve; the worker is woken when it serves again.
    Parked,
    /// Not started, stopped, disabled, failed, or not this thread's.
    Stopped,
}

impl Lookup<'_> {
    /// The state of a queue that is not handed out, read under its lock.
    fn of(v: &Vring) -> Self {
        if v.started && v.enabled && !v.broken && v.parked.is_some() {
            Lookup::Parked
        } else {
            Lookup::Stopped
        }
    }
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
    /// already holds that queue). [`lookup`](Queues::lookup) also says
    /// whether a queue that is not running will run again.
    pub fn get(&mut self, index: u16) -> Option<Queue<'a>> {
        match self.lookup(index) {
            Lookup::Ready(q) => Some(q),
            Lookup::Parked | Lookup::Stopped => None,
        }
    }

    /// Queue `index` if it is running, as [`get`](Queues::get); otherwise
    /// whether it is parked on a translation miss the frontend is expected
    /// to resolve (it will serve again, so a device keeps completions for
    /// it, such as deferred chains that finished meanwhile) or stopped
    /// (not started, disabled, failed, or not this thread's).
    ///
    /// The answer is read under one hold of the queue's lock: a queue the
    /// connection thread resumes or stops meanwhile is seen in one state or
    /// the other, never as neither (a `get` followed by a separate "is it
    /// parked?" question could see it parked by the first and resumed by
    /// the second, and drop a completion it should have kept).
    pub fn lookup(&mut self, index: u16) -> Lookup<'a> {
        let Some((_, m)) = self.vrings.iter().find(|(i, _)| *i == index) else {
            return Lookup::Stopped;
        };
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
            return Lookup::of(&guard);
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
        queue.vring.tail.clear();
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
                return Lookup::Ready(queue);
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
                Lookup::Ready(queue)
            }
            Err(e) => {
                if !matches!(e.dma_error(), Some(d) if d.is_miss()) {
                    crate::log_limited!(log::Level::Error, "queue {index}: {e}");
                }
                // Still under the lock: a miss has just parked it.
                Lookup::of(&queue.vring)
            }
        }
    }

    /// True with IOTLB translation, where a miss parks the queue until the
    /// frontend maps the address.
    pub(crate) fn parks_on_miss(&self) -> bool {
        self.park_on_miss
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

impl<'a> Queue<'a> {
    /// Checks that the three rings are mapped with the access they need; on a
    /// miss the queue is parked.
    fn check_rings(&mut self) -> Result<()> {
        let size = u64::from(self.vring.q.size());
        let event = u64::from(self.vring.q.event_idx_enabled()) * 2;
        if let Some(p) = &self.vring.packed {
            let (a, u) = (p.avail_idx, p.used_idx);
            if a >= self.vring.q.size() || u >= self.vring.q.size() {
                self.vring.broken = true;
                return Err(QueueError::Ring {
                    queue: self.index,
                    msg: format!("packed ring positions {a} / {u} outside a ring of {size}"),
                });
            }
        }
        let checks = match &self.vring.packed {
            Some(_) => super::packed::ring::area_checks(
                self.vring.q.desc_table(),
                self.vring.q.avail_ring(),
                self.vring.q.used_ring(),
                self.vring.q.size(),
            ),
            None => [
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
            ],
        };
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::fixture::*;
    use crate::queue::Chain;

    #[test]
    fn test_ring_translation_follows_a_moved_used_ring() {
        let mut f = fixture(true);
        offer(&mut f, 1, true);
        with_queues(&f, |qs| {
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
        });
    }

    /// A device that finished deferred I/O asks once whether the queue
    /// is running, parked (keep the completion) or stopped (drop it): a
    /// ring-address miss parks the queue and says so in the same answer,
    /// a resumed queue is handed out, a stopped one is not.
    #[test]
    fn test_lookup_tells_parked_from_stopped() {
        let mut f = fixture(true);
        offer(&mut f, 1, true);
        // The used ring moves to an address the IOAS does not map.
        f.vrings[0]
            .1
            .lock()
            .expect("lock")
            .q
            .try_set_used_ring_address(vm_memory::GuestAddress(BUF_IOVA + 0x10_0000))
            .expect("used");
        with_queues(&f, |qs| {
            assert!(matches!(qs.lookup(0), Lookup::Parked), "a miss parks");
            assert!(matches!(qs.lookup(0), Lookup::Parked), "still parked");
            let used = f.driver.used_addr();
            {
                let mut v = f.vrings[0].1.lock().expect("lock");
                // What the connection thread does on the frontend's answer.
                v.parked = None;
                v.q.try_set_used_ring_address(vm_memory::GuestAddress(used))
                    .expect("used");
            }
            assert!(matches!(qs.lookup(0), Lookup::Ready(_)), "resumed");
            f.vrings[0].1.lock().expect("lock").started = false;
            assert!(matches!(qs.lookup(0), Lookup::Stopped), "stopped");
            assert!(matches!(qs.lookup(9), Lookup::Stopped), "not this thread's");
        });
    }
}
