//! Bursts: many chains popped for one read of the avail index
//! ([`Queue::pop_burst`], [`Queue::pop_batch`]), and the prefetching that
//! overlaps the cache misses on the driver's descriptors and buffers with
//! the device's work.

use virtio_queue::QueueT;

use super::chain::Frag;
use super::walk::pop_one_hot;
use super::{Chain, Queue, QueueError, Result, Rings};

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
pub(super) fn prefetch_frag(f: &Frag, skip: usize) {
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

/// Starts loading the packed descriptor ring's lines from slot `from` for
/// `n` descriptors (four to a line), wrapping at the ring's end: the walk
/// then reads them one after another without waiting for each line.
fn prefetch_packed(r: Rings, from: u16, n: usize) {
    let size = usize::from(r.size);
    let n = n.min(size);
    let mut i = 0;
    while i < n {
        let slot = (usize::from(from) + i) % size;
        prefetch(r.desc.wrapping_add(16 * slot));
        i += 4;
    }
}

impl<'a> Queue<'a> {
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
        if let Some(r) = self.rings {
            match &self.vring.packed {
                None => self.prefetch_descs(r, chains.len()),
                Some(p) => prefetch_packed(r, p.avail_idx, chains.len()),
            }
        }
        // A split ring without inflight tracking (the common case) is
        // walked here directly, without `pop`'s per-chain dispatch.
        let plain = self.vring.packed.is_none() && self.vring.inflight.is_none();
        if self.vring.packed.is_some() && self.vring.packed_inflight.is_none() {
            if let Some(r) = self.rings {
                return self.packed_pop_burst(r, chains);
            }
        }
        if plain {
            if let Some(r) = self.rings {
                return self.split_pop_burst(r, chains);
            }
        }
        let size = self.size();
        self.burst_loop(chains, 0, size, |q, c| {
            if plain {
                q.pop_avail(c)
            } else {
                q.pop(c)
            }
        })
    }

    /// [`pop_burst`](Queue::pop_burst) of a split ring at host addresses
    /// without inflight tracking. The chains the last read of the avail
    /// index announced are taken in a tight loop as long as each is one
    /// buffer this section already translated (`pop_one_hot`, the common
    /// chain: no result per chain to build and test, the ring's addresses
    /// kept in registers); the first other chain and the rest go through
    /// the loop of every burst ([`burst_loop`](Queue::burst_loop)), which
    /// pops exactly as before (scripts/count-net.sh: 984.8 -> 874.3 per
    /// frame; the packed ring's `packed_pop_hot`: 1154.1 -> 1094.6).
    #[inline(always)]
    fn split_pop_burst(&mut self, r: Rings, chains: &mut [Chain]) -> Burst {
        let next = self.vring.q.next_avail();
        // At most `size`: the cache holds a checked avail index.
        let ready = usize::from(self.avail_cache.wrapping_sub(next))
            .min(usize::from(r.size))
            .min(chains.len());
        // The handle and the epoch in registers through the loop.
        let (dma, epoch, skip) = (self.dma, self.epoch, self.prefetch_skip);
        let mut k = 0usize;
        while k < ready {
            let Some(c) = chains.get_mut(k) else {
                break;
            };
            let slot = next.wrapping_add(k as u16) & (r.size - 1);
            if !pop_one_hot(&dma, epoch, r, r.avail_entry(slot), c) {
                break;
            }
            if k < PREFETCH_AHEAD {
                if let Some(f) = c.frags.first() {
                    prefetch_frag(f, skip);
                }
            }
            k += 1;
        }
        if k > 0 {
            // k <= size: no truncation.
            let n = k as u16;
            self.vring.q.set_next_avail(next.wrapping_add(n));
            self.tail_pops = self.tail_pops.saturating_add(n);
        }
        self.burst_loop(chains, k, r.size, |q, c| q.pop_avail(c))
    }

    /// The loop of a burst, for every kind of ring: `pop_one` fills each of
    /// `chains` from index `start` (those before are popped already) in
    /// turn (as [`pop`](Queue::pop) does) until the ring has no
    /// more, the slice is full or an error other than a malformed chain
    /// comes; malformed chains are counted and their entry reused, and the
    /// first [`PREFETCH_AHEAD`] chains' buffers start loading. `size` is the
    /// ring's: every skipped chain consumed at least one ring entry, so the
    /// loop ends after `chains.len() + size` turns whatever the driver wrote.
    #[inline(always)]
    pub(in crate::queue) fn burst_loop(
        &mut self,
        chains: &mut [Chain],
        start: usize,
        size: u16,
        mut pop_one: impl FnMut(&mut Self, &mut Chain) -> Result<bool>,
    ) -> Burst {
        let mut burst = Burst {
            popped: start,
            ..Burst::default()
        };
        let limit = chains.len() + usize::from(size);
        for _ in 0..limit {
            let Some(c) = chains.get_mut(burst.popped) else {
                break;
            };
            match pop_one(self, c) {
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
}

#[cfg(test)]
mod tests {
    use iommu_core::Perm;

    use super::*;
    use crate::dma::{Access, DmaError};
    use crate::queue::fixture::*;
    use crate::testing::Buf;

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
}
