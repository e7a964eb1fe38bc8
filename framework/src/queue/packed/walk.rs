//! The packed ring walk: popping the next available chain. A chain is the
//! run of ring descriptors from the next available slot up to the first
//! without `NEXT` (its buffer id is that last descriptor's), or one
//! descriptor pointing at an indirect table. Every buffer is translated
//! into the chain's host fragments before it is returned, as on the split
//! ring.
//!
//! Malformed chains (a descriptor of the chain not available in the
//! expected lap, i.e. a wrong wrap counter, consumed with it; more descriptors than the
//! ring has; an indirect table that is empty, misaligned in length, nested
//! or outside memory in the memory-table mode; a buffer id outside the
//! ring; an address range that overflows) are consumed as far as they were
//! read, completed once with length 0 under the id last read, counted in
//! the queue's errors, and the queue goes on with the next slot.

use log::warn;
use virtio_queue::QueueT;

use super::desc::{
    is_avail, PackedDesc, DESC_F_AVAIL, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_USED, DESC_F_WRITE,
    DESC_LEN,
};
use super::ring::{DmaRing, HostRing, RingMem};
use super::state::{advance, retreat};
use crate::dma::DmaError;
use crate::queue::burst::prefetch_frag;
use crate::queue::walk::fill_one_hot;
use crate::queue::{Burst, Chain, Queue, QueueError, Result, Rings, PREFETCH_AHEAD};

/// How a walk ended.
pub(super) enum End {
    /// A whole chain.
    Chain,
    /// Malformed: consumed and completed with length 0.
    Bad,
    /// A buffer or table access failed.
    Dma(DmaError),
}

impl<'a> Queue<'a> {
    /// The packed ring's field accessor through the DMA handle (areas that
    /// are not host-contiguous).
    pub(in crate::queue) fn packed_dma_ring(&self) -> DmaRing<'a> {
        DmaRing {
            dma: self.dma,
            desc: self.vring.q.desc_table(),
            driver: self.vring.q.avail_ring(),
            device: self.vring.q.used_ring(),
            size: self.vring.q.size(),
        }
    }

    /// [`Queue::pop`] on a packed ring.
    #[inline(never)]
    pub(in crate::queue) fn packed_pop(&mut self, chain: &mut Chain) -> Result<bool> {
        if self.vring.packed_inflight.is_some() {
            return self.packed_pop_tracked(chain);
        }
        chain.clear();
        match self.rings {
            Some(r) => self.packed_pop_in(&HostRing::new(r), chain),
            None => {
                let ring = self.packed_dma_ring();
                self.packed_pop_in(&ring, chain)
            }
        }
    }

    /// [`Queue::pop_burst`] on a packed ring whose areas are at host
    /// addresses, without inflight tracking: the walk of each chain inlined
    /// in one loop (no dispatch per chain), the burst's loop
    /// ([`Queue::burst_loop`]) shared with it.
    #[inline(never)]
    pub(in crate::queue) fn packed_pop_burst(&mut self, r: Rings, chains: &mut [Chain]) -> Burst {
        let ring = HostRing::new(r);
        let k = self.packed_pop_hot(&ring, chains);
        self.burst_loop(chains, k, ring.size(), |q, c| {
            c.clear();
            q.packed_pop_in(&ring, c)
        })
    }

    /// The start of a packed burst: chains taken in a tight loop from the
    /// next available slot as long as each is one direct descriptor with
    /// an id in the ring and a buffer this section already translated (no
    /// result per chain to build and test); returns how many, in the first
    /// entries of `chains`, with the first [`PREFETCH_AHEAD`] prefetched.
    /// The first other chain is left for [`packed_pop_in`](Self::packed_pop_in),
    /// which pops it exactly as before.
    #[inline(always)]
    fn packed_pop_hot(&mut self, ring: &HostRing, chains: &mut [Chain]) -> usize {
        let size = ring.size();
        let (dma, epoch, skip) = (self.dma, self.epoch, self.prefetch_skip);
        let Some(p) = self.vring.packed.as_mut() else {
            return 0;
        };
        let keep = p.recent_kept;
        p.fit(size);
        // The available position and the pop counter in registers through
        // the loop, the ring state borrowed once (scripts/count-net.sh
        // --packed: 956.4 -> 934.0 per frame).
        let (mut slot, mut wrap, mut pops) = (p.avail_idx, p.avail_wrap, p.pops);
        // The per-id tables sliced to the ring's size once: an id checked
        // against the size indexes them without another check.
        let n = usize::from(size);
        let (ndescs, writables, recent) =
            (&mut p.ndescs[..n], &mut p.writable[..n], &mut p.recent[..n]);
        let mut k = 0usize;
        // The flags an available descriptor has in this lap, kept with
        // the position and changed once a lap (`is_avail` per descriptor
        // picked them from `wrap`).
        let mut want = avail_flags(wrap);
        while let Some(c) = chains.get_mut(k) {
            match ring.flags(slot) {
                Ok(f) if f & (DESC_F_AVAIL | DESC_F_USED) == want => {}
                _ => break,
            }
            let Ok(d) = ring.desc(slot) else {
                break;
            };
            let writable = d.flags & DESC_F_WRITE != 0;
            if d.flags & (DESC_F_NEXT | DESC_F_INDIRECT) != 0
                || d.id >= size
                || !fill_one_hot(&dma, epoch, c, d.id, d.addr, d.len, writable)
            {
                break;
            }
            // What `packed_popped_one` records, for the chain of one
            // descriptor.
            // slot < size. The next lap through a cold call: a test and a
            // branch per descriptor (scripts/count-net.sh --packed).
            slot += 1;
            if slot >= size {
                (slot, wrap, want) = next_avail_lap(wrap);
            }
            // d.id < size: inside the tables.
            let id = usize::from(d.id);
            ndescs[id] = 1;
            writables[id] = if writable && d.len > 0 {
                (d.addr, d.len, 0)
            } else {
                (0, 0, 0)
            };
            if keep {
                if let Some(r) = recent.get_mut(usize::from(pops)) {
                    *r = 1;
                }
                pops = if pops + 1 >= size { 0 } else { pops + 1 };
            }
            if k < PREFETCH_AHEAD {
                if let Some(f) = c.frags.first() {
                    prefetch_frag(f, skip);
                }
            }
            k += 1;
        }
        (p.avail_idx, p.avail_wrap, p.pops) = (slot, wrap, pops);
        // k <= chains.len(), and every chain took a ring slot: k <= size.
        self.tail_pops = self.tail_pops.saturating_add(k as u16);
        k
    }

    #[inline(always)]
    pub(super) fn packed_pop_in<R: RingMem>(
        &mut self,
        ring: &R,
        chain: &mut Chain,
    ) -> Result<bool> {
        let size = ring.size();
        let Some(p) = self.vring.packed.as_mut() else {
            return Ok(false);
        };
        p.fit(size);
        let (start, wrap) = (p.avail_idx, p.avail_wrap);
        let flags = match ring.flags(start) {
            Ok(f) => f,
            Err(e) => return Err(self.dma_err(e)),
        };
        if !is_avail(flags, wrap) {
            return Ok(false);
        }
        chain.epoch = self.epoch;
        let (end, count, id) = match ring.desc(start) {
            // The common chain: one direct descriptor, done here.
            Ok(d) if d.flags & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 => {
                let writable = d.flags & DESC_F_WRITE != 0;
                // Its buffer already translated in this section: no walk
                // (scripts/count-net.sh --packed: 1252.3 -> 1169.2 per frame,
                // with the split ring's one-buffer pop).
                if d.id < size && self.set_one_hot(chain, d.id, d.addr, d.len, writable) {
                    self.packed_popped_one(start, wrap, d, writable, chain);
                    return Ok(true);
                }
                match self.push_buffer(chain, d.addr, d.len, writable) {
                    Ok(()) if d.id < size => {
                        self.packed_popped_one(start, wrap, d, writable, chain);
                        return Ok(true);
                    }
                    Ok(()) => (End::Bad, 1, d.id),
                    Err(e) => (e.map_or(End::Bad, End::Dma), 1, d.id),
                }
            }
            Ok(d) => self.packed_walk_chain(ring, chain, start, wrap, d),
            Err(e) => (End::Dma(e), 0, 0),
        };
        let end = match end {
            End::Chain if id >= size => End::Bad,
            e => e,
        };
        match end {
            End::Chain => {
                chain.head = id;
                let Some(p) = self.vring.packed.as_mut() else {
                    return Ok(false);
                };
                (p.avail_idx, p.avail_wrap) = advance(start, wrap, count, size);
                p.ndescs[usize::from(id)] = count;
                p.writable[usize::from(id)] = match chain.descs.as_slice() {
                    [d] if d.writable && d.len > 0 => (d.addr, d.len, 0),
                    [_] => (0, 0, 0),
                    descs => p.keep_writables(id, descs),
                };
                if count != 1 && !p.recent_kept {
                    // The chains popped before it in the tail took one
                    // descriptor each: their entries, before this one's.
                    let tail = if cfg!(ioasis_broken = "norecentfill") {
                        0
                    } else {
                        self.tail_pops.min(size)
                    };
                    for _ in 0..tail {
                        p.recent[usize::from(p.pops)] = 1;
                        p.pops = if p.pops + 1 >= size { 0 } else { p.pops + 1 };
                    }
                    p.recent_kept = true;
                }
                if p.recent_kept {
                    p.recent[usize::from(p.pops)] = count;
                    p.pops = if p.pops + 1 >= size { 0 } else { p.pops + 1 };
                }
                self.tail_pops = self.tail_pops.saturating_add(1);
                Ok(true)
            }
            End::Dma(e) if e.is_miss() && self.park_on_miss => {
                // Not consumed: popped again once the frontend maps it.
                chain.clear();
                Err(self.dma_err(e))
            }
            End::Dma(e) => {
                chain.clear();
                self.packed_consume(start, wrap, count);
                self.packed_complete_bad(ring, id, count);
                if e.is_miss() {
                    // Memory table: the address is outside guest memory.
                    self.packed_warn_bad_address(id, &e);
                    return Err(QueueError::BadChain {
                        queue: self.index,
                        head: id,
                    });
                }
                // Permission failure or fault: the chain cannot be served.
                Err(self.dma_err(e))
            }
            End::Bad => {
                chain.clear();
                self.packed_consume(start, wrap, count);
                self.packed_complete_bad(ring, id, count);
                Err(QueueError::BadChain {
                    queue: self.index,
                    head: id,
                })
            }
        }
    }

    /// The bookkeeping of a chain of one direct descriptor `d` popped at
    /// (`start`, `wrap`): what the general path does for a whole chain.
    #[inline(always)]
    fn packed_popped_one(
        &mut self,
        start: u16,
        wrap: bool,
        d: PackedDesc,
        writable: bool,
        chain: &mut Chain,
    ) {
        chain.head = d.id;
        if let Some(p) = self.vring.packed.as_mut() {
            let size = p.ndescs.len() as u16;
            (p.avail_idx, p.avail_wrap) = advance(start, wrap, 1, size);
            let id = usize::from(d.id);
            if let (Some(n), Some(w)) = (p.ndescs.get_mut(id), p.writable.get_mut(id)) {
                *n = 1;
                *w = if writable && d.len > 0 {
                    (d.addr, d.len, 0)
                } else {
                    (0, 0, 0)
                };
            }
            if p.recent_kept {
                if let Some(r) = p.recent.get_mut(usize::from(p.pops)) {
                    *r = 1;
                }
                p.pops = if p.pops + 1 >= size { 0 } else { p.pops + 1 };
            }
        }
        self.tail_pops = self.tail_pops.saturating_add(1);
    }

    /// Walks the rest of a chain whose first descriptor `first` (at
    /// `start`, lap `wrap`) has `NEXT` or `INDIRECT`: returns how the walk
    /// ended, the ring descriptors it took and the last buffer id read.
    fn packed_walk_chain<R: RingMem>(
        &mut self,
        ring: &R,
        chain: &mut Chain,
        start: u16,
        wrap: bool,
        first: PackedDesc,
    ) -> (End, u16, u16) {
        let size = ring.size();
        let (mut slot, mut w) = (start, wrap);
        let mut count = 0u16;
        let mut d = first;
        let end = loop {
            count += 1;
            if d.flags & DESC_F_INDIRECT != 0 {
                if d.flags & DESC_F_NEXT != 0 {
                    break End::Bad;
                }
                break self.packed_indirect(d, chain);
            }
            if let Err(e) = self.packed_push(chain, d.addr, d.len, d.flags & DESC_F_WRITE != 0) {
                break e;
            }
            if d.flags & DESC_F_NEXT == 0 {
                break End::Chain;
            }
            // At most `size` descriptors: a longer chain never ends.
            if count >= size {
                break End::Bad;
            }
            (slot, w) = advance(slot, w, 1, size);
            match ring.flags(slot) {
                // The driver makes a chain's head available last: the rest
                // must be there, in the same lap. One that is not is
                // consumed with the chain it was meant for.
                Ok(f) if is_avail(f, w) => {}
                Ok(_) => {
                    count += 1;
                    break End::Bad;
                }
                Err(e) => break End::Dma(e),
            }
            d = match ring.desc(slot) {
                Ok(d) => d,
                Err(e) => break End::Dma(e),
            };
        };
        (end, count, d.id)
    }

    /// Moves the available position past `count` slots from (`start`,
    /// `wrap`).
    fn packed_consume(&mut self, start: u16, wrap: bool, count: u16) {
        let size = self.vring.q.size();
        if let Some(p) = self.vring.packed.as_mut() {
            (p.avail_idx, p.avail_wrap) = advance(start, wrap, count.max(1), size);
        }
    }

    /// Reads the indirect table `d` points at into `chain`.
    pub(super) fn packed_indirect(&mut self, d: PackedDesc, chain: &mut Chain) -> End {
        if d.len == 0 || u64::from(d.len) % DESC_LEN != 0 {
            return End::Bad;
        }
        if d.addr.checked_add(u64::from(d.len)).is_none() {
            return End::Bad;
        }
        let n = u64::from(d.len) / DESC_LEN;
        if n > u64::from(u16::MAX) {
            return End::Bad;
        }
        for k in 0..n {
            let b: [u8; 16] = match self.dma.read_obj(d.addr + DESC_LEN * k) {
                Ok(b) => b,
                Err(e) => return End::Dma(e),
            };
            let e = PackedDesc::from_le_bytes(b);
            if e.flags & DESC_F_INDIRECT != 0 {
                return End::Bad;
            }
            // In a packed indirect table the descriptors follow each other;
            // `NEXT` and the id are not used.
            if let Err(end) = self.packed_push(chain, e.addr, e.len, e.flags & DESC_F_WRITE != 0) {
                return end;
            }
        }
        End::Chain
    }

    /// Appends a buffer to `chain` and translates it into host fragments:
    /// the split walk's step ([`Queue::push_buffer`]), its outcome told as
    /// the packed walk's [`End`].
    #[inline]
    fn packed_push(
        &self,
        chain: &mut Chain,
        addr: u64,
        len: u32,
        writable: bool,
    ) -> std::result::Result<(), End> {
        self.push_buffer(chain, addr, len, writable)
            .map_err(|e| e.map_or(End::Bad, End::Dma))
    }

    /// Completes a malformed chain of `count` ring descriptors under `id`
    /// with length 0, once, and counts it.
    fn packed_complete_bad<R: RingMem>(&mut self, ring: &R, id: u16, count: u16) {
        // Chains popped before this one can no longer be given back.
        self.tail_pops = 0;
        self.vring.errors += 1;
        if self.vring.errors.is_power_of_two() {
            warn!(
                "queue {}: completing bad packed chain {id} with length 0 ({} so far)",
                self.index, self.vring.errors
            );
        }
        if let Err(e) = self.packed_put_used(ring, id, 0, count) {
            log::error!("queue {}: cannot complete bad chain {id}: {e}", self.index);
            self.vring.broken = true;
        }
    }

    fn packed_warn_bad_address(&self, id: u16, e: &DmaError) {
        if self.vring.errors.is_power_of_two() {
            warn!(
                "queue {}: packed chain {id} has a buffer outside guest memory ({e}); completed with length 0",
                self.index
            );
        }
    }

    /// [`Queue::unpop`] on a packed ring: the available position moves
    /// back over the last `n` chains' descriptors.
    pub(in crate::queue) fn packed_unpop(&mut self, n: u16) -> bool {
        let size = self.vring.q.size();
        // Recorded chains stay with the device (see `inflight.rs`).
        if n > self.tail_pops || n > size || self.vring.packed_inflight.is_some() {
            return false;
        }
        let Some(p) = self.vring.packed.as_mut() else {
            return false;
        };
        if p.recent.len() != usize::from(size) {
            return false;
        }
        // Not kept: each of the tail's chains took one ring descriptor.
        let kept = p.recent_kept;
        let mut total = if kept { 0 } else { u32::from(n) };
        for k in (1..=n).filter(|_| kept) {
            let at = (u32::from(p.pops) + u32::from(size) - u32::from(k)) % u32::from(size);
            total += u32::from(p.recent[at as usize]);
        }
        let Ok(total) = u16::try_from(total) else {
            return false;
        };
        if total > size {
            return false;
        }
        (p.avail_idx, p.avail_wrap) = retreat(p.avail_idx, p.avail_wrap, total, size);
        if kept {
            p.pops =
                ((u32::from(p.pops) + u32::from(size) - u32::from(n)) % u32::from(size)) as u16;
        }
        self.tail_pops -= n;
        true
    }
}

/// The flags an available descriptor has in lap `wrap`: `AVAIL` equal to
/// it, `USED` not.
#[inline(always)]
fn avail_flags(wrap: bool) -> u16 {
    if wrap {
        DESC_F_AVAIL
    } else {
        DESC_F_USED
    }
}

/// The available position at the start of the lap after `wrap`: slot 0,
/// the lap flipped, and that lap's [`avail_flags`]. Out of the loop of
/// [`Queue::packed_pop_hot`], taken once a lap.
#[cold]
#[inline(never)]
fn next_avail_lap(wrap: bool) -> (u16, bool, u16) {
    (0, !wrap, avail_flags(!wrap))
}
