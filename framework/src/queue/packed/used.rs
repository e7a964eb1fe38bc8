//! Completions on a packed ring: a used descriptor (buffer id, bytes
//! written, flags in the device's lap) written at the device's used
//! position, which then moves past every descriptor the buffer's chain
//! took. The first used descriptor of a batch has its flags written last,
//! after a release fence ([`Queue::publish_used`]), so the driver sees the
//! batch at once and never a descriptor before its id and length (as
//! DPDK's vhost does). An in-order device completes a batch with one used
//! descriptor, the last buffer's.
//!
//! Batch completions (`add_used_lens`, `add_used_batch`) at the ring's host
//! address, without the dirty log or inflight tracking, write their used
//! descriptors as they come, each but the batch's first whole in one
//! store; single completions and the other cases keep theirs in the
//! state's shadow batch until the publication (scripts/count-net.sh
//! --packed: 892.0 -> 846.1 per frame; the loop's later steps, to 762.6
//! at 476a4f5, 743.1 with the pops' at 167c355: BENCHMARKS.md, "The
//! packed loop's instruction count").

use std::sync::atomic::{fence, Ordering};

use virtio_queue::QueueT;

use super::desc::{DESC_F_AVAIL, DESC_F_USED, DESC_F_WRITE};
use super::ring::{HostRing, Mem, RingMem};
use super::state::{advance, PackedState};
use crate::queue::{Queue, QueueError, Result, Vring};

impl<'a> Queue<'a> {
    /// [`Queue::add_used`] on a packed ring. The common case inline (a
    /// known head, no dirty log, room in the batch: the used descriptor
    /// joins the batch, nothing is written to the ring until it is
    /// published); the rest in [`packed_add_used_other`](Self::packed_add_used_other).
    /// Inlined into the loop of `packed_add_used_batch` and the general
    /// `add_used`, it saves each completion a call and its register saves
    /// (`scripts/count-net.sh --packed`).
    #[inline(always)]
    pub(in crate::queue) fn packed_add_used(&mut self, head: u16, len: u32) -> Result<()> {
        let size = self.vring.q.size();
        if self.vring.log.is_none() {
            if let Some(p) = self.vring.packed.as_mut() {
                let known = p.ndescs.len() == usize::from(size) && head < size;
                if known && p.batched() < usize::from(size) {
                    let n = p.ndescs[usize::from(head)];
                    p.push_used(head, len, n, size);
                    self.vring.num_added = self.vring.num_added.saturating_add(1);
                    self.dirty = true;
                    return Ok(());
                }
            }
        }
        self.packed_add_used_other(head, len)
    }

    /// [`packed_add_used`](Self::packed_add_used) with the dirty log on, a
    /// full batch or a head outside the ring.
    #[inline(never)]
    fn packed_add_used_other(&mut self, head: u16, len: u32) -> Result<()> {
        let size = self.vring.q.size();
        let n = match self.vring.packed.as_ref() {
            Some(p) if usize::from(head) < p.ndescs.len() => p.ndescs[usize::from(head)],
            _ => return Err(self.bad_head(head)),
        };
        if len > 0 && self.vring.log.is_some() {
            if let Some(log) = self.vring.log.clone() {
                self.packed_log_buffer(&log, head, len);
            }
        }
        // The common case: room in the batch, nothing written to the ring
        // until the batch is published.
        if let Some(p) = self.vring.packed.as_mut() {
            if p.batched() < usize::from(size) {
                p.push_used(head, len, n, size);
                self.vring.num_added = self.vring.num_added.saturating_add(1);
                self.dirty = true;
                return Ok(());
            }
        }
        let r = match self.rings {
            Some(r) => self.packed_put_used(&HostRing::new(r), head, len, n),
            None => {
                let ring = self.packed_dma_ring();
                self.packed_put_used(&ring, head, len, n)
            }
        };
        r.map_err(|e| self.dma_err(e))
    }

    /// [`Queue::add_used_lens`] on a packed ring: written to the ring at
    /// once when [`direct_used`](Self::direct_used) allows; else, without
    /// the dirty log and with room in the batch, every (head, length)
    /// joins the shadow batch with the ring state borrowed once; else one
    /// at a time through
    /// [`packed_add_used`](Self::packed_add_used). On error, how many were
    /// completed with it.
    pub(in crate::queue) fn packed_add_used_lens(
        &mut self,
        used: &[(u16, u32)],
    ) -> std::result::Result<(), (usize, QueueError)> {
        let size = self.vring.q.size();
        if let Some(r) = self.direct_used(used.len()) {
            let (done, bad) = write_used_all(r, &mut self.vring, used.iter().copied());
            self.dirty |= done > 0;
            return match bad {
                None => Ok(()),
                Some(head) => Err((done, self.bad_head(head))),
            };
        }
        if self.vring.log.is_none() && used.iter().all(|&(h, _)| h < size) {
            if let Some(p) = self.vring.packed.as_mut() {
                let room = usize::from(size).saturating_sub(p.batched());
                if p.ndescs.len() == usize::from(size) && used.len() <= room {
                    p.push_used_all(used.iter().copied(), size);
                    let added = u16::try_from(used.len()).unwrap_or(u16::MAX);
                    self.vring.num_added = self.vring.num_added.saturating_add(added);
                    self.dirty |= !used.is_empty();
                    return Ok(());
                }
            }
        }
        for (i, &(head, len)) in used.iter().enumerate() {
            self.packed_add_used(head, len).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// [`Queue::add_used_batch`] on a packed ring: with `VIRTIO_F_IN_ORDER`
    /// one used descriptor (the last head's) for the whole batch, without
    /// one per head (written to the ring at once when
    /// [`direct_used`](Self::direct_used) allows).
    #[inline(never)]
    pub(in crate::queue) fn packed_add_used_batch(
        &mut self,
        heads: &[u16],
    ) -> std::result::Result<(), (usize, QueueError)> {
        let size = self.vring.q.size();
        self.check_heads(heads)?;
        // With inflight tracking each buffer gets its used descriptor, so
        // that its recorded entries are freed.
        let in_order = self.vring.in_order && self.vring.packed_inflight.is_none();
        if !in_order {
            if let Some(r) = self.direct_used(heads.len()) {
                // Every head is in the ring (checked above): all complete.
                let (done, _) = write_used_all(r, &mut self.vring, heads.iter().map(|&h| (h, 0)));
                self.dirty |= done > 0;
                return Ok(());
            }
        }
        if !in_order && self.vring.log.is_none() {
            // Every head joins the batch, the ring state borrowed once for
            // all of them.
            if let Some(p) = self.vring.packed.as_mut() {
                let room = usize::from(size).saturating_sub(p.batched());
                if p.ndescs.len() == usize::from(size) && heads.len() <= room {
                    p.push_used_all(heads.iter().map(|&h| (h, 0)), size);
                    let added = u16::try_from(heads.len()).unwrap_or(u16::MAX);
                    self.vring.num_added = self.vring.num_added.saturating_add(added);
                    self.dirty |= !heads.is_empty();
                    return Ok(());
                }
            }
        }
        let (true, Some(&last)) = (in_order, heads.last()) else {
            for (i, &h) in heads.iter().enumerate() {
                self.packed_add_used(h, 0).map_err(|e| (i, e))?;
            }
            return Ok(());
        };
        let Some(p) = self.vring.packed.as_mut() else {
            return Ok(());
        };
        p.fit(size);
        // A driver cannot have more than `size` descriptors outstanding.
        let total: u32 = heads
            .iter()
            .map(|&h| u32::from(p.ndescs[usize::from(h)].max(1)))
            .sum();
        let total = u16::try_from(total.min(u32::from(size))).unwrap_or(size);
        let r = match self.rings {
            Some(r) => self.packed_put_used(&HostRing::new(r), last, 0, total),
            None => {
                let ring = self.packed_dma_ring();
                self.packed_put_used(&ring, last, 0, total)
            }
        };
        let added = u16::try_from(heads.len()).unwrap_or(u16::MAX);
        self.vring.num_added = self.vring.num_added.saturating_add(added.saturating_sub(1));
        r.map_err(|e| (0, self.dma_err(e)))
    }

    /// Writes a used descriptor for buffer `id` with `len` bytes written,
    /// covering `n` ring descriptors, at the used position, and moves it.
    pub(super) fn packed_put_used<R: RingMem>(
        &mut self,
        ring: &R,
        id: u16,
        len: u32,
        n: u16,
    ) -> Mem<()> {
        let size = ring.size();
        if self
            .vring
            .packed
            .as_ref()
            .is_some_and(|p| p.batched() >= usize::from(size))
        {
            // More completions than the ring holds without a publication:
            // only a device completing chains it did not pop gets here.
            self.packed_flush(ring)?;
        }
        let Some(p) = self.vring.packed.as_mut() else {
            return Ok(());
        };
        p.push_used(id, len, n, size);
        self.vring.num_added = self.vring.num_added.saturating_add(1);
        self.dirty = true;
        Ok(())
    }

    /// [`Queue::publish_used`] on a packed ring: the batch's used
    /// descriptors are written, the first one's flags last, after
    /// everything written before.
    pub(in crate::queue) fn packed_publish(&mut self) {
        self.dirty = false;
        if self
            .vring
            .packed
            .as_ref()
            .is_none_or(|p| p.gate.is_none() && p.shadow.is_empty())
        {
            return;
        }
        let r = match self.rings {
            Some(r) => self.packed_flush(&HostRing::new(r)),
            None => {
                let ring = self.packed_dma_ring();
                self.packed_flush(&ring)
            }
        };
        if let Err(e) = r {
            crate::log_limited!(
                log::Level::Error,
                "queue {}: used descriptors not published: {e}",
                self.index
            );
            self.vring.broken = true;
        }
    }

    /// Writes the batch's used descriptors: each one's id and length, the
    /// flags of all but the first, then (release) the first one's flags.
    fn packed_flush<R: RingMem>(&mut self, ring: &R) -> Mem<()> {
        if self.vring.packed_inflight.is_some() {
            return self.packed_flush_tracked(ring);
        }
        self.packed_flush_ring(ring)
    }

    /// [`packed_flush`](Queue::packed_flush) with inflight tracking: the
    /// region is told before and after the ring is written.
    #[cold]
    #[inline(never)]
    fn packed_flush_tracked<R: RingMem>(&mut self, ring: &R) -> Mem<()> {
        self.packed_inflight_before_publish();
        let r = self.packed_flush_ring(ring);
        if r.is_ok() {
            self.packed_inflight_after_publish();
        }
        r
    }

    /// Writes the batch's used descriptors to the ring: those not written
    /// yet (the shadow's) but for the batch's first one's flags, then,
    /// after a release fence, those flags.
    #[inline(always)]
    fn packed_flush_ring<R: RingMem>(&mut self, ring: &R) -> Mem<()> {
        let Some(p) = self.vring.packed.as_mut() else {
            return Ok(());
        };
        let (gate, first) = match (p.gate.take(), p.shadow.first().copied()) {
            (Some(g), _) => (g, None),
            (None, Some(e)) => ((e.slot, e.flags), Some(e)),
            (None, None) => return Ok(()),
        };
        let rest = if first.is_some() {
            &p.shadow[1..]
        } else {
            &p.shadow[..]
        };
        let write = || -> Mem<()> {
            if let Some(e) = first {
                ring.write_used(e.slot, e.id, e.len)?;
            }
            for e in rest {
                ring.write_used(e.slot, e.id, e.len)?;
                ring.set_flags(e.slot, e.flags)?;
            }
            fence(Ordering::Release);
            ring.set_flags(gate.0, gate.1)
        };
        let r = write();
        p.shadow.clear();
        p.written = 0;
        r
    }

    /// The ring at its host address when a batch of `n` completions can
    /// be written to it as they come ([`write_used_all`]): no dirty log,
    /// no inflight tracking, no shadow entries before them (a batch's
    /// used descriptors are written in ring order) and room in the batch.
    #[inline(always)]
    fn direct_used(&self, n: usize) -> Option<HostRing> {
        let (Some(r), None, None, Some(p)) = (
            self.rings,
            &self.vring.log,
            &self.vring.packed_inflight,
            &self.vring.packed,
        ) else {
            return None;
        };
        let size = usize::from(r.size);
        let fits = p.ndescs.len() == size
            && p.shadow.is_empty()
            && n <= size.saturating_sub(usize::from(p.written));
        fits.then(|| HostRing::new(r))
    }
}

/// Completes each (`id`, `len`) of `used` in order, writing its used
/// descriptor to the ring at once: the batch's first (when `gate` is
/// unset) without its flags, which [`Queue::publish_used`] writes last
/// after a release fence; the others whole, one store each, which the
/// driver does not read before it sees the first one's flags. The used
/// position and the count since the last signal are kept in registers
/// through the loop. Stops at the first `id` outside the ring; returns
/// how many were completed and that id. The caller checked
/// [`Queue::direct_used`].
#[inline(always)]
fn write_used_all(
    ring: HostRing,
    v: &mut Vring,
    used: impl Iterator<Item = (u16, u32)>,
) -> (usize, Option<u16>) {
    let Some(p) = v.packed.as_mut() else {
        return (0, None);
    };
    let (done, bad) = write_used_ring(ring, p, used);
    let bad = u16::try_from(bad).ok();
    // done <= the room `direct_used` checked (< 2^16).
    let n = done as u16;
    let done = done as usize;
    p.written += n;
    v.num_added = v.num_added.saturating_add(n);
    (done, bad)
}

/// [`write_used_ring`]'s bad id when there is none (ids are 16 bits): its
/// result is two `u32`s, returned in registers.
const NO_BAD: u32 = u32::MAX;

/// A used descriptor's flags in the driver's wrap (avail and used set),
/// shifted to their place in the descriptor's second word.
const LAP: u64 = ((DESC_F_AVAIL | DESC_F_USED) as u64) << 48;

/// The loop of [`write_used_all`], out of line: its registers are its
/// own (inlined into the general completion functions, it spilled the
/// used position and the tables' addresses to the stack).
#[inline(never)]
fn write_used_ring(
    ring: HostRing,
    p: &mut PackedState,
    mut used: impl Iterator<Item = (u16, u32)>,
) -> (u32, u32) {
    let size = ring.size();
    let ndescs = p.ndescs.as_mut_slice();
    let (mut slot, mut wrap) = (p.used_idx, p.used_wrap);
    // Ring descriptors used in this call: at most size * size < 2^32.
    let mut moved = 0u32;
    let mut done = 0u32;
    // The used descriptors the chain of buffer `id` took (0: `id` not
    // outstanding, a device completing a head twice; the used position
    // still moves by one); None: `id` outside the ring (`ndescs` has
    // `size` entries).
    let mut take = |id: u16| {
        let c = ndescs.get_mut(usize::from(id))?;
        // The common case (1 to `size`) tested with one comparison, the
        // rest (0, or more than the ring: a peer's inflight record) out of
        // the loop (scripts/count-net.sh --packed).
        let mut n = u32::from(*c);
        if n.wrapping_sub(1) >= u32::from(size) {
            n = u32::from(odd_count(*c, size));
        }
        *c = 0;
        Some(n)
    };
    if p.gate.is_none() {
        let Some((id, len)) = used.next() else {
            return (0, NO_BAD);
        };
        let Some(n) = take(id) else {
            return (0, u32::from(id));
        };
        let flags = super::desc::used_flags(wrap, len > 0);
        if cfg!(ioasis_broken = "gatefirst") {
            ring.put_used_flags(slot, id, len, flags);
        } else {
            ring.put_used(slot, id, len);
        }
        p.gate = Some((slot, flags));
        // n <= size.
        (slot, wrap) = advance(slot, wrap, n as u16, size);
        moved += n;
        done += 1;
    }
    // The rest: each written whole as one value, the lap's flags kept
    // shifted in place (scripts/count-net.sh --packed).
    const WRITTEN: u64 = (DESC_F_WRITE as u64) << 48;
    let mut lap = if wrap { LAP } else { 0 };
    let mut at = u32::from(slot);
    // The ring descriptors this loop uses are counted from the position
    // and the laps it went round, not added up per completion.
    let (start, mut laps) = (at, 0u32);
    let mut bad = None;
    for (id, len) in used {
        let Some(n) = take(id) else {
            bad = Some(id);
            break;
        };
        let written = if len > 0 { WRITTEN } else { 0 };
        // at < size.
        ring.put_used_word(at, u64::from(len) | (u64::from(id) << 32) | lap | written);
        at += n;
        done += 1;
        if at >= u32::from(size) {
            // Once a lap: a call, so that the loop tests and branches
            // instead of computing both outcomes and selecting one
            // (scripts/count-net.sh --packed).
            (at, lap) = next_lap(at, lap, size);
            laps += 1;
        }
    }
    // laps <= done <= size: laps * size < 2^32; at least `start` when
    // a lap was gone round.
    moved += laps * u32::from(size) + at - start;
    (p.used_idx, p.used_wrap) = (at as u16, lap != 0);
    p.since_signal = p.since_signal.saturating_add(moved);
    (done, bad.map_or(NO_BAD, u32::from))
}

/// The used position `at` (at least `size`, at most `2 * size - 1`) moved
/// into the ring's next lap, and the lap's flags `lap` flipped: out of the
/// loop of [`write_used_ring`], taken once a lap.
#[cold]
#[inline(never)]
fn next_lap(at: u32, lap: u64, size: u16) -> (u32, u64) {
    (at - u32::from(size), lap ^ LAP)
}

/// A chain's recorded descriptor count outside 1 to `size` made one:
/// 0 (the id is not outstanding, a device completing a head twice) moves
/// the used position by one, more than the ring by the ring.
#[cold]
#[inline(never)]
fn odd_count(n: u16, size: u16) -> u16 {
    // Not `clamp`: it panics when `size` is 0.
    n.max(1).min(size)
}
