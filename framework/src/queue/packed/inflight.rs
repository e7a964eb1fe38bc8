//! Inflight I/O tracking for packed rings
//! (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): the region the frontend keeps
//! for the backend across restarts (see the split ring's
//! `queue/inflight.rs` for the messages) in the vhost-user specification's
//! packed layout, so that a backend killed with packed chains popped and
//! not completed resubmits them when it is started again: none lost, none
//! completed twice.
//!
//! A packed ring's slots are overwritten (by used descriptors, then by the
//! driver's next available ones) while chains are in flight, so the region
//! keeps a copy of every descriptor popped, in entries taken from a free
//! list, and the device's used position with its wrap counter (which the
//! frontend cannot read from the ring after a crash).
//!
//! # Layout (per queue, `align_up(32 + 32 * queue_size, 64)` bytes)
//!
//! | offset | field |
//! | --- | --- |
//! | 0 | `u64 features` (0) |
//! | 8 | `u16 version` (1; 0: never used) |
//! | 10 | `u16 desc_num` (entries, the queue size) |
//! | 12 | `u16 free_head`, 14 `u16 old_free_head` |
//! | 16 | `u16 used_idx`, 18 `u16 old_used_idx` (ring slots) |
//! | 20 | `u8 used_wrap_counter`, 21 `u8 old_used_wrap_counter` |
//! | 32 + 32 * i | entry `i`: `u8 inflight`, pad, `u16 next` (free list), `u16 last`, `u16 num`, `u64 counter`, `u16 id`, `u16 flags`, `u32 len`, `u64 addr` |
//!
//! The `old_` fields are the committed state, the others the state of a
//! batch of completions being published.
//!
//! # Protocol (the specification's, with completions spliced back into
//! the free list when their batch is published, so that no pop ever takes
//! an entry of a batch the driver has not seen)
//!
//! - Pop: each ring descriptor of the chain is copied into the entry at
//!   `free_head`, which moves along the free list; the first entry (the
//!   head) gets the chain's length (`num`), its last entry and the next pop
//!   number, then `inflight` = 1, then `old_free_head` = `free_head`.
//! - Publication of a batch of used descriptors: each completed chain's
//!   entries go back to the head of the free list and `used_idx` / its wrap
//!   counter take the position after the batch; the ring is written (the
//!   batch's first flags last); then each completed head's `inflight`
//!   becomes 0, then the `old_` fields take the current values.
//! - Restart (the first time a started ring is served with a region of
//!   version 1): if `used_idx` differs from `old_used_idx`, a batch was
//!   being published: if the ring slot at `old_used_idx` no longer holds an
//!   available descriptor of the old lap, the driver saw it and the batch
//!   is committed, else it is rolled back. Then every entry on the free
//!   list is marked not in flight, the heads still in flight are
//!   resubmitted in pop order from their copied descriptors (an indirect
//!   table is read again from memory), the used position is the region's
//!   and the next available position lies past the resubmitted chains'
//!   descriptors (the frontend's vring base, which after a crash is stale
//!   for a packed ring, is ignored).
//!
//! A device that tracks a packed ring completes in-order batches one used
//! descriptor per buffer (so that each one's entries are freed) and does not
//! give chains back ([`Queue::unpop`] returns false).

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use log::{info, warn};
use virtio_queue::QueueT;

use super::desc::{is_avail, PackedDesc, DESC_F_INDIRECT, DESC_F_WRITE};
use super::ring::{HostRing, RingMem};
use super::state::advance;
use crate::queue::inflight::InflightRegion;
use crate::queue::{Chain, Queue, QueueError, Result};

/// The region's version.
const VERSION: u16 = 1;
/// Bytes of a queue region's header.
const HEADER: usize = 32;
/// Bytes of one entry.
const ENTRY: usize = 32;
/// No entry (end of the free list, an id without a recorded chain).
const NONE: u16 = u16::MAX;

// Header fields.
const H_VERSION: usize = 8;
const H_DESC_NUM: usize = 10;
const H_FREE_HEAD: usize = 12;
const H_OLD_FREE_HEAD: usize = 14;
const H_USED_IDX: usize = 16;
const H_OLD_USED_IDX: usize = 18;
const H_USED_WRAP: usize = 20;
const H_OLD_USED_WRAP: usize = 21;

// Entry fields.
const E_INFLIGHT: usize = 0;
const E_NEXT: usize = 2;
const E_LAST: usize = 4;
const E_NUM: usize = 6;
const E_COUNTER: usize = 8;
const E_ID: usize = 16;
const E_FLAGS: usize = 18;
const E_LEN: usize = 20;
const E_ADDR: usize = 24;

/// Bytes of one packed queue's region for a queue of `queue_size`
/// entries.
pub fn packed_queue_region_size(queue_size: u16) -> usize {
    (HEADER + ENTRY * usize::from(queue_size)).div_ceil(64) * 64
}

impl InflightRegion {
    /// The packed layout's region of queue `index`, if the region holds
    /// one.
    pub(crate) fn packed_queue(self: &Arc<Self>, index: u16) -> Option<PackedInflight> {
        if index >= self.num_queues {
            return None;
        }
        let size = packed_queue_region_size(self.queue_size);
        let off = usize::from(index) * size;
        if off + size > self.mem.len() {
            return None;
        }
        Some(PackedInflight {
            region: self.clone(),
            off,
            desc_num: self.queue_size,
            counter: 0,
            recover: true,
            heads: Vec::new(),
            resubmit: std::collections::VecDeque::new(),
            batch: Vec::new(),
        })
    }
}

/// A chain an earlier instance left in flight: its head entry, its buffer
/// id and its ring descriptors as they were popped.
#[derive(Debug, Clone)]
pub(crate) struct Resubmit {
    head: u16,
    id: u16,
    descs: Vec<PackedDesc>,
}

/// One packed queue's view of the region (kept in its vring).
#[derive(Debug)]
pub(crate) struct PackedInflight {
    region: Arc<InflightRegion>,
    off: usize,
    desc_num: u16,
    /// Next pop number.
    counter: u64,
    /// Recovery still to run (the ring was just started).
    pub(crate) recover: bool,
    /// Per buffer id: the head entry of its recorded chain ([`NONE`]: none).
    heads: Vec<u16>,
    /// Chains to pop before any new one, oldest first.
    resubmit: std::collections::VecDeque<Resubmit>,
    /// Head entries of the batch being published.
    batch: Vec<u16>,
}

impl PackedInflight {
    fn write(&self, at: usize, b: &[u8]) {
        // Every offset used lies in this queue's region, which
        // `packed_queue` checked is inside the mapping; write_at checks
        // again and cannot fail otherwise.
        let _ = self.region.mem.write_at(self.off + at, b);
    }

    fn read<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut b = [0u8; N];
        let _ = self.region.mem.read_at(self.off + at, &mut b);
        b
    }

    fn read16(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.read::<2>(at))
    }

    fn write16(&self, at: usize, v: u16) {
        self.write(at, &v.to_le_bytes());
    }

    fn entry(&self, e: u16) -> Option<usize> {
        (e < self.desc_num).then(|| HEADER + ENTRY * usize::from(e))
    }

    fn entry16(&self, e: u16, field: usize) -> u16 {
        self.entry(e).map_or(NONE, |at| self.read16(at + field))
    }

    fn set_entry16(&self, e: u16, field: usize, v: u16) {
        if let Some(at) = self.entry(e) {
            self.write16(at + field, v);
        }
    }

    fn set_inflight(&self, e: u16, on: bool) {
        if let Some(at) = self.entry(e) {
            self.write(at + E_INFLIGHT, &[u8::from(on)]);
        }
    }

    fn fit(&mut self, size: u16) {
        if self.heads.len() != usize::from(size) {
            self.heads = vec![NONE; usize::from(size)];
        }
    }

    /// Records a chain just popped (its ring descriptors `descs`, buffer
    /// `id`). False if the region has no room (it is then out of step with
    /// the ring: the chain is served untracked).
    fn record(&mut self, id: u16, descs: &[PackedDesc]) -> bool {
        let head = self.read16(H_FREE_HEAD);
        let (mut e, mut last) = (head, head);
        for (k, d) in descs.iter().enumerate() {
            let Some(at) = self.entry(e) else {
                return false;
            };
            // The descriptor's fields in one write, at their offsets.
            let mut b = [0u8; ENTRY - E_ID];
            b[..E_FLAGS - E_ID].copy_from_slice(&d.id.to_le_bytes());
            b[E_FLAGS - E_ID..E_LEN - E_ID].copy_from_slice(&d.flags.to_le_bytes());
            b[E_LEN - E_ID..E_ADDR - E_ID].copy_from_slice(&d.len.to_le_bytes());
            b[E_ADDR - E_ID..].copy_from_slice(&d.addr.to_le_bytes());
            self.write(at + E_ID, &b);
            if k > 0 {
                self.write(at + E_INFLIGHT, &[0]);
            }
            last = e;
            e = self.read16(at + E_NEXT);
        }
        let Some(at) = self.entry(head) else {
            return false;
        };
        let num = u16::try_from(descs.len()).unwrap_or(NONE);
        self.write16(at + E_LAST, last);
        self.write16(at + E_NUM, num);
        self.write(at + E_COUNTER, &self.counter.to_le_bytes());
        self.counter += 1;
        fence(Ordering::SeqCst);
        self.write(at + E_INFLIGHT, &[1]);
        fence(Ordering::SeqCst);
        self.write16(H_FREE_HEAD, e);
        self.write16(H_OLD_FREE_HEAD, e);
        if let Some(h) = self.heads.get_mut(usize::from(id)) {
            *h = head;
        }
        true
    }

    /// Before a batch is written to the ring: the completed chains
    /// (buffer ids `ids`) go back to the free list and the used position
    /// takes (`used`, `wrap`), the position after the batch.
    fn before_publish(&mut self, ids: impl Iterator<Item = u16>, used: u16, wrap: bool) {
        self.batch.clear();
        let mut free = self.read16(H_FREE_HEAD);
        for id in ids {
            let Some(h) = self.heads.get_mut(usize::from(id)) else {
                continue;
            };
            let head = std::mem::replace(h, NONE);
            if head == NONE {
                continue;
            }
            let last = self.entry16(head, E_LAST);
            self.set_entry16(last, E_NEXT, free);
            free = head;
            self.batch.push(head);
        }
        self.write16(H_FREE_HEAD, free);
        self.write16(H_USED_IDX, used);
        self.write(H_USED_WRAP, &[u8::from(wrap)]);
    }

    /// After the batch was written to the ring: its heads are no longer in
    /// flight and the state is committed.
    fn after_publish(&mut self) {
        fence(Ordering::SeqCst);
        for &h in &self.batch {
            self.set_inflight(h, false);
        }
        self.batch.clear();
        fence(Ordering::SeqCst);
        let free = self.read16(H_FREE_HEAD);
        let used = self.read16(H_USED_IDX);
        let wrap = self.read::<1>(H_USED_WRAP);
        self.write16(H_OLD_FREE_HEAD, free);
        self.write16(H_OLD_USED_IDX, used);
        self.write(H_OLD_USED_WRAP, &wrap);
    }

    /// Recovery when the ring starts (see the module docs). `used` is the
    /// device's used position as the frontend set it (kept for a fresh
    /// region), `flags_at(slot)` reads a ring slot's flags. Returns the
    /// used position and the descriptors the resubmitted chains take, or
    /// `None` for a fresh region (initialised; positions as they are).
    fn recover(
        &mut self,
        size: u16,
        used: (u16, bool),
        flags_at: impl Fn(u16) -> Option<u16>,
    ) -> Option<((u16, bool), u16)> {
        self.recover = false;
        self.fit(size);
        self.resubmit.clear();
        self.batch.clear();
        if self.read16(H_VERSION) != VERSION || self.read16(H_DESC_NUM) != self.desc_num {
            let len = packed_queue_region_size(self.desc_num);
            let _ = self.region.mem.fill(self.off, len, 0);
            for e in 0..self.desc_num {
                self.set_entry16(e, E_NEXT, e + 1);
            }
            self.write16(H_DESC_NUM, self.desc_num);
            for (idx, wrap) in [(H_USED_IDX, H_USED_WRAP), (H_OLD_USED_IDX, H_OLD_USED_WRAP)] {
                self.write16(idx, used.0);
                self.write(wrap, &[u8::from(used.1)]);
            }
            fence(Ordering::SeqCst);
            self.write16(H_VERSION, VERSION);
            self.counter = 0;
            return None;
        }
        let cur = (self.read16(H_USED_IDX), self.read::<1>(H_USED_WRAP)[0] != 0);
        let mut old = (
            self.read16(H_OLD_USED_IDX),
            self.read::<1>(H_OLD_USED_WRAP)[0] != 0,
        );
        let mut old_free = self.read16(H_OLD_FREE_HEAD);
        if cur != old {
            // A batch was being published: committed if the driver can
            // have seen its first used descriptor (the slot no longer holds
            // an available descriptor of the old lap).
            let published = flags_at(old.0 % size.max(1)).is_none_or(|f| !is_avail(f, old.1));
            if published {
                old = cur;
                old_free = self.read16(H_FREE_HEAD);
            }
        }
        self.write16(H_FREE_HEAD, old_free);
        self.write16(H_OLD_FREE_HEAD, old_free);
        self.write16(H_USED_IDX, old.0);
        self.write16(H_OLD_USED_IDX, old.0);
        self.write(H_USED_WRAP, &[u8::from(old.1)]);
        self.write(H_OLD_USED_WRAP, &[u8::from(old.1)]);
        // Entries on the free list are not in flight.
        let mut e = old_free;
        for _ in 0..self.desc_num {
            if e >= self.desc_num {
                break;
            }
            self.set_inflight(e, false);
            e = self.entry16(e, E_NEXT);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.desc_num)
            .filter_map(|h| {
                let at = self.entry(h)?;
                (self.read::<1>(at + E_INFLIGHT)[0] == 1)
                    .then(|| (u64::from_le_bytes(self.read::<8>(at + E_COUNTER)), h))
            })
            .collect();
        heads.sort_unstable();
        self.counter = heads.last().map_or(0, |(c, _)| c + 1);
        let mut total = 0u32;
        for (_, h) in heads {
            let num = self.entry16(h, E_NUM);
            let mut descs = Vec::new();
            let mut e = h;
            for _ in 0..num.min(size) {
                let Some(at) = self.entry(e) else { break };
                descs.push(PackedDesc {
                    id: self.read16(at + E_ID),
                    flags: self.read16(at + E_FLAGS),
                    len: u32::from_le_bytes(self.read::<4>(at + E_LEN)),
                    addr: u64::from_le_bytes(self.read::<8>(at + E_ADDR)),
                });
                e = self.entry16(e, E_NEXT);
            }
            let id = descs.last().map_or(NONE, |d| d.id);
            if num == 0 || descs.len() != usize::from(num) || id >= size {
                warn!("inflight region: entry {h} is not a chain; not resubmitted");
                continue;
            }
            if total + u32::from(num) > u32::from(size) {
                warn!("inflight region: more descriptors in flight than the ring holds");
                break;
            }
            total += u32::from(num);
            self.heads[usize::from(id)] = h;
            self.resubmit.push_back(Resubmit { head: h, id, descs });
        }
        if cfg!(ioasis_broken = "noresubmit") {
            // Test-only: what a backend without inflight tracking does.
            self.resubmit.clear();
            return Some((old, 0));
        }
        Some((old, u16::try_from(total).unwrap_or(size)))
    }
}

impl<'a> Queue<'a> {
    /// [`Queue::pop`] on a packed ring with inflight tracking: recovery
    /// when the ring was just started, chains left in flight first, every
    /// chain popped recorded.
    #[cold]
    #[inline(never)]
    pub(in crate::queue) fn packed_pop_tracked(&mut self, chain: &mut Chain) -> Result<bool> {
        chain.clear();
        if self
            .vring
            .packed_inflight
            .as_ref()
            .is_some_and(|i| i.recover)
        {
            self.packed_recover();
        }
        let next = self
            .vring
            .packed_inflight
            .as_ref()
            .and_then(|i| i.resubmit.front().cloned());
        if let Some(r) = next {
            return self.packed_pop_resubmitted(r, chain);
        }
        let start = self
            .vring
            .packed
            .as_ref()
            .map(|p| (p.avail_idx, p.avail_wrap));
        let popped = match self.rings {
            Some(r) => self.packed_pop_in(&HostRing::new(r), chain),
            None => {
                let ring = self.packed_dma_ring();
                self.packed_pop_in(&ring, chain)
            }
        }?;
        if !popped {
            return Ok(false);
        }
        let (Some((mut slot, mut wrap)), Some(p)) = (start, self.vring.packed.as_ref()) else {
            return Ok(true);
        };
        let size = self.vring.q.size();
        let n = p.ndescs.get(usize::from(chain.head)).copied().unwrap_or(0);
        let mut descs = Vec::with_capacity(usize::from(n));
        let ring = self.rings.map(HostRing::new);
        let dma = self.packed_dma_ring();
        for _ in 0..n {
            let d = match &ring {
                Some(r) => r.desc(slot),
                None => dma.desc(slot),
            };
            match d {
                Ok(d) => descs.push(d),
                Err(_) => break,
            }
            (slot, wrap) = advance(slot, wrap, 1, size);
        }
        let head = chain.head;
        if let Some(i) = self.vring.packed_inflight.as_mut() {
            i.fit(size);
            if descs.len() != usize::from(n) || !i.record(head, &descs) {
                crate::log_limited!(
                    log::Level::Warn,
                    "queue {}: packed chain {head} not recorded in the inflight region",
                    self.index
                );
            }
        }
        Ok(true)
    }

    /// Runs the inflight recovery of a packed ring (see the module docs).
    fn packed_recover(&mut self) {
        let size = self.vring.q.size();
        let Some(used) = self
            .vring
            .packed
            .as_ref()
            .map(|p| (p.used_idx, p.used_wrap))
        else {
            return;
        };
        let ring = self.rings.map(HostRing::new);
        let dma = self.packed_dma_ring();
        let flags_at = |slot: u16| match &ring {
            Some(r) => r.flags(slot).ok(),
            None => dma.flags(slot).ok(),
        };
        let Some(i) = self.vring.packed_inflight.as_mut() else {
            return;
        };
        let Some((used, taken)) = i.recover(size, used, flags_at) else {
            return;
        };
        let n = i.resubmit.len();
        let Some(p) = self.vring.packed.as_mut() else {
            return;
        };
        p.fit(size);
        (p.used_idx, p.used_wrap) = used;
        (p.avail_idx, p.avail_wrap) = advance(used.0, used.1, taken, size);
        p.shadow.clear();
        p.gate = None;
        p.written = 0;
        info!(
            "queue {}: packed inflight region: {n} chain(s) resubmitted; used position {} (wrap {})",
            self.index, used.0, used.1
        );
    }

    /// Pops a chain an earlier instance left in flight from the
    /// descriptors the region kept.
    fn packed_pop_resubmitted(&mut self, r: Resubmit, chain: &mut Chain) -> Result<bool> {
        chain.head = r.id;
        chain.epoch = self.epoch;
        let mut bad = None;
        let mut ok = true;
        for d in &r.descs {
            if d.flags & DESC_F_INDIRECT != 0 {
                match self.packed_indirect(*d, chain) {
                    super::walk::End::Chain => continue,
                    super::walk::End::Dma(e) => bad = Some(e),
                    super::walk::End::Bad => {}
                }
                ok = false;
                break;
            }
            if let Err(e) = self.push_buffer(chain, d.addr, d.len, d.flags & DESC_F_WRITE != 0) {
                bad = e;
                ok = false;
                break;
            }
        }
        let num = u16::try_from(r.descs.len()).unwrap_or(1);
        if !ok {
            chain.clear();
            if let Some(e) = bad {
                if e.is_miss() && self.park_on_miss {
                    // Still queued for resubmission once mapped.
                    return Err(self.dma_err(e));
                }
            }
        }
        if let Some(i) = self.vring.packed_inflight.as_mut() {
            i.resubmit.pop_front();
        }
        let Some(p) = self.vring.packed.as_mut() else {
            return Ok(false);
        };
        p.ndescs[usize::from(r.id)] = num;
        if !ok {
            let r2 = match self.rings {
                Some(rings) => self.packed_put_used(&HostRing::new(rings), r.id, 0, num),
                None => {
                    let ring = self.packed_dma_ring();
                    self.packed_put_used(&ring, r.id, 0, num)
                }
            };
            self.vring.errors += 1;
            if let Err(e) = r2 {
                log::error!(
                    "queue {}: cannot complete bad chain {}: {e}",
                    self.index,
                    r.id
                );
                self.vring.broken = true;
            }
            return Err(QueueError::BadChain {
                queue: self.index,
                head: r.id,
            });
        }
        p.writable[usize::from(r.id)] = match chain.descs.as_slice() {
            [d] if d.writable && d.len > 0 => (d.addr, d.len, 0),
            [_] => (0, 0, 0),
            descs => p.keep_writables(r.id, descs),
        };
        let _ = r.head;
        Ok(true)
    }

    /// Inflight steps before a batch of used descriptors is written.
    pub(super) fn packed_inflight_before_publish(&mut self) {
        let v = &mut *self.vring;
        let (Some(i), Some(p)) = (v.packed_inflight.as_mut(), v.packed.as_ref()) else {
            return;
        };
        i.before_publish(p.shadow.iter().map(|e| e.id), p.used_idx, p.used_wrap);
    }

    /// Inflight steps after a batch of used descriptors was written.
    pub(super) fn packed_inflight_after_publish(&mut self) {
        if let Some(i) = self.vring.packed_inflight.as_mut() {
            i.after_publish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(size: u16) -> Arc<InflightRegion> {
        Arc::new(InflightRegion {
            mem: iommu_core::Memory::anonymous("inflight", 2 * packed_queue_region_size(size))
                .expect("mem"),
            num_queues: 2,
            queue_size: size,
        })
    }

    fn d(id: u16, addr: u64) -> PackedDesc {
        PackedDesc {
            addr,
            len: 64,
            id,
            flags: 0,
        }
    }

    #[test]
    fn test_layout_size() {
        assert_eq!(packed_queue_region_size(16), 576);
        assert_eq!(packed_queue_region_size(256), 8256);
    }

    /// Chains recorded, one completed and published: a new instance
    /// resubmits the others in pop order with their descriptors, and its
    /// positions follow the region.
    #[test]
    fn test_recorded_chains_are_resubmitted_in_pop_order() {
        let r = region(8);
        let mut q = r.packed_queue(1).expect("queue 1");
        assert!(q.recover(8, (0, true), |_| None).is_none(), "fresh region");
        assert!(q.record(5, &[d(0, 0x100), d(5, 0x200)]));
        assert!(q.record(2, &[d(2, 0x300)]));
        assert!(q.record(7, &[d(7, 0x400)]));
        // Buffer 2 completed: one used descriptor at slot 0.
        q.before_publish([2].into_iter(), 1, true);
        q.after_publish();
        let mut again = r.packed_queue(1).expect("queue 1");
        let got = again.recover(8, (0, true), |_| Some(0));
        assert_eq!(got, Some(((1, true), 3)));
        let ids: Vec<u16> = again.resubmit.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![5, 7]);
        assert_eq!(again.resubmit[0].descs, vec![d(0, 0x100), d(5, 0x200)]);
        // The freed entry is taken again; the others are not.
        assert!(again.record(3, &[d(3, 0x500)]));
        let mut third = r.packed_queue(1).expect("queue 1");
        let got = third.recover(8, (0, true), |_| Some(0));
        assert_eq!(got, Some(((1, true), 4)));
        let ids: Vec<u16> = third.resubmit.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![5, 7, 3]);
        // The other queue is untouched.
        assert!(r
            .packed_queue(0)
            .expect("queue 0")
            .recover(8, (0, true), |_| None)
            .is_none());
    }

    /// A crash between writing the ring and committing: the batch counts
    /// as published when the slot at the old used position no longer
    /// holds an available descriptor of the old lap, and is rolled back
    /// when it does.
    #[test]
    fn test_batch_in_progress_committed_or_rolled_back() {
        use super::super::desc::{used_flags, DESC_F_AVAIL};
        for published in [true, false] {
            let r = region(8);
            let mut q = r.packed_queue(0).expect("queue");
            let _ = q.recover(8, (0, true), |_| None);
            assert!(q.record(4, &[d(4, 0x100)]));
            assert!(q.record(6, &[d(6, 0x200)]));
            q.before_publish([6].into_iter(), 1, true);
            // Crash: no after_publish.
            let slot0 = if published {
                used_flags(true, false)
            } else {
                DESC_F_AVAIL
            };
            let mut again = r.packed_queue(0).expect("queue");
            let got = again.recover(8, (0, true), |s| (s == 0).then_some(slot0));
            let ids: Vec<u16> = again.resubmit.iter().map(|c| c.id).collect();
            if published {
                assert_eq!(got, Some(((1, true), 1)));
                assert_eq!(ids, vec![4]);
            } else {
                assert_eq!(got, Some(((0, true), 2)));
                assert_eq!(ids, vec![4, 6]);
            }
        }
    }
}
