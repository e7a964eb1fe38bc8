//! Completions on a packed ring: a used descriptor (buffer id, bytes
//! written, flags in the device's lap) written at the device's used
//! position, which then moves past every descriptor the buffer's chain
//! took. The first used descriptor of a batch has its flags written last,
//! after a release fence ([`Queue::publish_used`]), so the driver sees the
//! batch at once and never a descriptor before its id and length (as
//! DPDK's vhost does). An in-order device completes a batch with one used
//! descriptor, the last buffer's.

use std::sync::atomic::{fence, Ordering};

use virtio_queue::QueueT;

use super::ring::{HostRing, Mem, RingMem};
use crate::queue::{Queue, QueueError, Result};

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
                if known && p.shadow.len() < usize::from(size) {
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
            _ => {
                return Err(QueueError::BadHead {
                    queue: self.index,
                    head,
                    size,
                })
            }
        };
        if len > 0 && self.vring.log.is_some() {
            if let Some(log) = self.vring.log.clone() {
                self.packed_log_buffer(&log, head, len);
            }
        }
        // The common case: room in the batch, nothing written to the ring
        // until the batch is published.
        if let Some(p) = self.vring.packed.as_mut() {
            if p.shadow.len() < usize::from(size) {
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

    /// [`Queue::add_used_lens`] on a packed ring: without the dirty log
    /// and with room in the batch, every (head, length) joins the batch
    /// with the ring state borrowed once; else one at a time through
    /// [`packed_add_used`](Self::packed_add_used). On error, how many were
    /// completed with it.
    pub(in crate::queue) fn packed_add_used_lens(
        &mut self,
        used: &[(u16, u32)],
    ) -> std::result::Result<(), (usize, QueueError)> {
        let size = self.vring.q.size();
        if self.vring.log.is_none() && used.iter().all(|&(h, _)| h < size) {
            if let Some(p) = self.vring.packed.as_mut() {
                let room = usize::from(size).saturating_sub(p.shadow.len());
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
    /// one per head.
    #[inline(never)]
    pub(in crate::queue) fn packed_add_used_batch(
        &mut self,
        heads: &[u16],
    ) -> std::result::Result<(), (usize, QueueError)> {
        let size = self.vring.q.size();
        let known = |h: u16| usize::from(h) < usize::from(size);
        if let Some(&head) = heads.iter().find(|&&h| !known(h)) {
            let e = QueueError::BadHead {
                queue: self.index,
                head,
                size,
            };
            return Err((0, e));
        }
        // With inflight tracking each buffer gets its used descriptor, so
        // that its recorded entries are freed.
        let in_order = self.vring.in_order && self.vring.packed_inflight.is_none();
        if !in_order && self.vring.log.is_none() {
            // The common case: every head joins the batch, the ring state
            // borrowed once for all of them.
            if let Some(p) = self.vring.packed.as_mut() {
                let room = usize::from(size).saturating_sub(p.shadow.len());
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
            .is_some_and(|p| p.shadow.len() >= usize::from(size))
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
            .is_none_or(|p| p.shadow.is_empty())
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

    /// Writes the batch's used descriptors to the ring.
    #[inline(always)]
    fn packed_flush_ring<R: RingMem>(&mut self, ring: &R) -> Mem<()> {
        let Some(p) = self.vring.packed.as_mut() else {
            return Ok(());
        };
        let Some(first) = p.shadow.first().copied() else {
            return Ok(());
        };
        let write = || -> Mem<()> {
            ring.write_used(first.slot, first.id, first.len)?;
            for e in &p.shadow[1..] {
                ring.write_used(e.slot, e.id, e.len)?;
                ring.set_flags(e.slot, e.flags)?;
            }
            fence(Ordering::Release);
            ring.set_flags(first.slot, first.flags)
        };
        let r = write();
        p.shadow.clear();
        r
    }
}
