//! The ring walk: popping the next available chain. The fast path reads
//! the chain straight from the translated descriptor table and translates
//! every buffer into the chain's host fragments; rings that are not
//! host-contiguous and indirect tables take virtio-queue's path. A miss
//! parks the queue and puts the chain back (IOTLB), or completes it with
//! length 0 (memory table); a malformed chain is completed with length 0.

use log::{error, warn};
use virtio_queue::{QueueOwnedT, QueueT};

use super::chain::Frag;
use super::ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use super::vring::{LOOK_AHEAD_CHAINS, LOOK_AHEAD_MISSES};
use super::{Chain, Desc, Queue, QueueError, Result, Rings};

/// Descriptors of one chain looked at by [`Queue::look_ahead`].
const LOOK_AHEAD_DESCS: usize = 4;
/// The granule in which looked-ahead misses are told apart (the frontend
/// answers a miss with at least the page around it).
const LOOK_AHEAD_PAGE: u64 = 4096;
use crate::dma::{Access, DmaError};

impl<'a> Queue<'a> {
    /// Pops the next available chain into `chain`. Returns `Ok(false)` when
    /// the driver has made nothing more available.
    ///
    /// Every buffer of the chain is translated before it is returned, so the
    /// device's accesses to it cannot miss while this call's access section
    /// lasts. On a translation miss the chain is put back, the queue is parked
    /// and the miss is returned; a malformed chain is completed with length 0
    /// and reported as [`QueueError::BadChain`].
    pub fn pop(&mut self, chain: &mut Chain) -> Result<bool> {
        if self.vring.packed.is_some() {
            return self.packed_pop(chain);
        }
        if self.vring.inflight.is_some() {
            return self.pop_other(chain);
        }
        chain.clear();
        self.pop_avail(chain)
    }

    /// Pops the next chain of a split ring from its avail ring, counted for
    /// [`unpop`](Queue::unpop). `chain` need not be cleared first: whatever
    /// the outcome, it holds nothing it held before.
    ///
    /// Kept apart from packed rings and inflight tracking so that
    /// [`pop`](Queue::pop)'s common path hands this result on as it is: a
    /// `Result` of this size travels through memory, and a copy of it on
    /// the way out cost every pop about 10 instructions
    /// (`scripts/count-queue.sh`: 619.5 -> 608.9 per chain).
    #[inline(always)]
    pub(super) fn pop_avail(&mut self, chain: &mut Chain) -> Result<bool> {
        let r = match self.rings {
            Some(r) => self.pop_fast(r, chain),
            None => {
                chain.clear();
                self.pop_slow(chain)
            }
        };
        if matches!(r, Ok(true)) {
            self.tail_pops = self.tail_pops.saturating_add(1);
        }
        r
    }

    /// [`pop`](Queue::pop) of a split ring with inflight tracking:
    /// resubmitted heads first, every head popped recorded in the region
    /// shared with the frontend.
    #[cold]
    #[inline(never)]
    fn pop_other(&mut self, chain: &mut Chain) -> Result<bool> {
        chain.clear();
        if self.vring.inflight.as_ref().is_some_and(|i| i.recover) {
            self.recover_inflight();
        }
        if let Some(&head) = self.vring.resubmit.front() {
            let r = self.pop_resubmitted(head, chain);
            if matches!(r, Ok(true)) {
                self.vring.tail.push((head, true));
            }
            return r;
        }
        let r = self.pop_avail(chain);
        if matches!(r, Ok(true)) {
            let head = chain.head;
            if let Some(i) = self.vring.inflight.as_mut() {
                i.popped(head);
                self.vring.tail.push((head, false));
            }
        }
        r
    }

    /// Inflight recovery when a started ring is first served (see
    /// `inflight.rs`): the heads an earlier instance left in flight are
    /// queued for resubmission and the ring's indices follow the used ring.
    fn recover_inflight(&mut self) {
        let size = self.vring.q.size();
        let (used_idx, ids): (u16, Box<dyn Fn(u16) -> Option<u32>>) = match self.rings {
            Some(r) => (r.used_idx(), Box::new(move |slot| Some(r.used_id(slot)))),
            None => {
                let dma = self.dma;
                let used = self.vring.q.used_ring();
                let idx = dma
                    .read_obj::<u16>(used.wrapping_add(2))
                    .map(u16::from_le)
                    .unwrap_or(self.vring.q.next_used());
                (
                    idx,
                    Box::new(move |slot| {
                        dma.read_obj::<u32>(used.wrapping_add(4 + 8 * u64::from(slot)))
                            .ok()
                            .map(u32::from_le)
                    }),
                )
            }
        };
        let Some(i) = self.vring.inflight.as_mut() else {
            return;
        };
        let Some(heads) = i.recover(used_idx, size, ids) else {
            return;
        };
        let n = u16::try_from(heads.len()).unwrap_or(u16::MAX);
        if n > 0 || used_idx != self.vring.q.next_used() {
            log::info!(
                "queue {}: inflight region: {n} request(s) resubmitted; used index {used_idx}",
                self.index
            );
        }
        self.vring.q.set_next_used(used_idx);
        self.vring.q.set_next_avail(used_idx.wrapping_add(n));
        self.avail_cache = used_idx.wrapping_add(n);
        self.vring.resubmit = heads.into();
        if cfg!(ioasis_broken = "dropinflight") {
            // Test-only: the ring resumes after what was in flight (as
            // above) but nothing is resubmitted, so those requests are
            // never completed; requests not yet popped are served.
            self.vring.resubmit.clear();
        }
    }

    /// Pops a chain an earlier instance left in flight, from its head (not
    /// from the avail ring).
    fn pop_resubmitted(&mut self, head: u16, chain: &mut Chain) -> Result<bool> {
        let size = self.vring.q.size();
        let table = self.vring.q.desc_table();
        chain.head = head;
        chain.epoch = self.epoch;
        let read = |dma: crate::dma::Dma<'_>,
                    at: u64|
         -> std::result::Result<super::ring::RawDesc, DmaError> {
            let b: [u8; 16] = dma.read_obj(at)?;
            let u = |r: std::ops::Range<usize>| {
                let mut x = [0u8; 8];
                x[..r.len()].copy_from_slice(&b[r]);
                u64::from_le_bytes(x)
            };
            Ok(super::ring::RawDesc {
                addr: u(0..8),
                len: u(8..12) as u32,
                flags: u(12..14) as u16,
                next: u(14..16) as u16,
            })
        };
        let mut bad: Option<DmaError> = None;
        let mut ok = false;
        if head < size {
            let (mut base, mut limit, mut idx) = (table, size, head);
            let mut count = 0u16;
            let mut indirect = false;
            loop {
                if idx >= limit || count >= limit {
                    break;
                }
                count += 1;
                let d = match read(self.dma, base.wrapping_add(16 * u64::from(idx))) {
                    Ok(d) => d,
                    Err(e) => {
                        bad = Some(e);
                        break;
                    }
                };
                if d.flags & VRING_DESC_F_INDIRECT != 0 {
                    if indirect || count != 1 || d.len == 0 || d.len % 16 != 0 {
                        break;
                    }
                    let Ok(n) = u16::try_from(d.len / 16) else {
                        break;
                    };
                    (base, limit, idx, count, indirect) = (d.addr, n, 0, 0, true);
                    continue;
                }
                let writable = d.flags & VRING_DESC_F_WRITE != 0;
                if let Err(e) = self.push_buffer(chain, d.addr, d.len, writable) {
                    bad = e;
                    break;
                }
                if d.flags & VRING_DESC_F_NEXT == 0 {
                    ok = true;
                    break;
                }
                idx = d.next;
            }
        }
        if ok {
            self.vring.resubmit.pop_front();
            return Ok(true);
        }
        chain.clear();
        if let Some(e) = bad {
            if e.is_miss() && self.park_on_miss {
                // Still queued for resubmission once mapped.
                return Err(self.dma_err(e));
            }
        }
        self.vring.resubmit.pop_front();
        self.complete_bad(head);
        Err(QueueError::BadChain {
            queue: self.index,
            head,
        })
    }

    /// Gives back the last `n` chains popped from this queue, which the
    /// caller has not completed and drops: the driver still owns them and
    /// they are popped again later (a device that popped ahead returns what
    /// it did not use, so a ring stopped in between loses no buffers).
    /// Returns false, changing nothing, if fewer than `n` chains were popped
    /// in a row since this queue was handed out or since the last malformed
    /// chain it completed.
    pub fn unpop(&mut self, n: u16) -> bool {
        if self.vring.packed.is_some() {
            return self.packed_unpop(n);
        }
        if self.vring.inflight.is_some() {
            // Chains from the resubmission list go back to its front, the
            // others to the avail ring (and are no longer in flight).
            let len = self.vring.tail.len();
            if usize::from(n) > len {
                return false;
            }
            let back: Vec<(u16, bool)> = self.vring.tail.drain(len - usize::from(n)..).collect();
            for &(head, resubmitted) in back.iter().rev() {
                if resubmitted {
                    self.vring.resubmit.push_front(head);
                } else {
                    let next = self.vring.q.next_avail();
                    self.vring.q.set_next_avail(next.wrapping_sub(1));
                    self.tail_pops = self.tail_pops.saturating_sub(1);
                    if let Some(i) = self.vring.inflight.as_mut() {
                        i.unpopped(head);
                    }
                }
            }
            return true;
        }
        if n > self.tail_pops {
            return false;
        }
        let next = self.vring.q.next_avail();
        self.vring.q.set_next_avail(next.wrapping_sub(n));
        self.tail_pops -= n;
        true
    }

    /// Reads `avail->idx` into the cache and checks it against the ring.
    pub(super) fn refresh_avail(&mut self, r: &Rings) -> Result<()> {
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
    #[inline(always)]
    fn pop_fast(&mut self, r: Rings, chain: &mut Chain) -> Result<bool> {
        let next = self.vring.q.next_avail();
        if next == self.avail_cache {
            // Whatever the outcome, `chain` holds nothing popped before.
            chain.clear();
            self.refresh_avail(&r)?;
            if next == self.avail_cache {
                return Ok(false);
            }
        }
        // The size is a power of two (virtio-queue checks it).
        let head = r.avail_entry(next & (r.size - 1));
        // One buffer already translated: no walk, no running sums, no
        // fragment call (scripts/count-net.sh: 1089.5 -> 989.7 per frame,
        // with the burst no longer clearing each chain first).
        if pop_one_hot(&self.dma, self.epoch, r, head, chain) {
            self.vring.q.set_next_avail(next.wrapping_add(1));
            return Ok(true);
        }
        chain.clear();
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
            if let Err(e) = self.push_buffer(chain, d.addr, d.len, writable) {
                break e;
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
                let err = self.dma_err(e);
                self.look_ahead(&r, next);
                return Err(err);
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

    /// Makes `chain` the chain `head` of one buffer when the section already
    /// holds that buffer's translation for the device's access (and it does
    /// not wrap around the address space); returns false, changing nothing,
    /// otherwise. The one-buffer pop of both ring layouts.
    #[inline(always)]
    pub(super) fn set_one_hot(
        &self,
        chain: &mut Chain,
        head: u16,
        addr: u64,
        len: u32,
        writable: bool,
    ) -> bool {
        fill_one_hot(&self.dma, self.epoch, chain, head, addr, len, writable)
    }

    /// The queue just parked on a miss of the chain at avail slot `missed`:
    /// records in [`Vring::ahead`](super::Vring) the pages of the next
    /// available chains' buffers that miss too (at most
    /// [`LOOK_AHEAD_CHAINS`] chains, direct descriptors only, each page
    /// once, the parked address's page left out), so that the worker reports
    /// them with the miss. Only looks: probe translations (no fault, no
    /// event), nothing consumed; the chains are popped, and miss again if
    /// still unmapped, when their turn comes. The driver made these chains
    /// available, so their buffers are its to map.
    fn look_ahead(&mut self, r: &Rings, missed: u16) {
        self.vring.ahead.clear();
        let Some(parked) = self.vring.parked else {
            return;
        };
        let mut pages = [parked.iova & !(LOOK_AHEAD_PAGE - 1); LOOK_AHEAD_MISSES + 1];
        let mut found = 1;
        let avail = r.avail_idx();
        let pending = avail.wrapping_sub(missed);
        if pending > r.size {
            // Malformed; the next pop says so.
            return;
        }
        let probe = self.dma.probe();
        for k in 1..pending.min(LOOK_AHEAD_CHAINS + 1) {
            let mut idx = r.avail_entry(missed.wrapping_add(k) & (r.size - 1));
            for _ in 0..LOOK_AHEAD_DESCS {
                if idx >= r.size {
                    break;
                }
                let d = r.desc(idx);
                if d.flags & VRING_DESC_F_INDIRECT != 0 {
                    break;
                }
                let access = if d.flags & VRING_DESC_F_WRITE != 0 {
                    Access::Write
                } else {
                    Access::Read
                };
                if d.len > 0 {
                    let miss = probe
                        .check(d.addr, u64::from(d.len), access)
                        .err()
                        .and_then(|e| e.miss_address());
                    if let Some((iova, access)) = miss {
                        let page = iova & !(LOOK_AHEAD_PAGE - 1);
                        if !pages[..found].contains(&page) {
                            pages[found] = page;
                            found += 1;
                            self.vring.ahead.push((iova, access));
                            if found > LOOK_AHEAD_MISSES {
                                return;
                            }
                        }
                    }
                }
                if d.flags & VRING_DESC_F_NEXT == 0 {
                    break;
                }
                idx = d.next;
            }
        }
    }

    /// Appends one direct descriptor's buffer to `chain`: the descriptor,
    /// its length to the readable or writable total, and its host
    /// fragments. The step every walk of a descriptor table repeats.
    /// `Err(None)`: the buffer wraps around the address space (a malformed
    /// chain); `Err(Some(e))`: its translation failed.
    #[inline(always)]
    pub(super) fn push_buffer(
        &self,
        chain: &mut Chain,
        addr: u64,
        len: u32,
        writable: bool,
    ) -> std::result::Result<(), Option<DmaError>> {
        if addr.checked_add(u64::from(len)).is_none() {
            return Err(None);
        }
        chain.descs.push(Desc {
            addr,
            len,
            writable,
        });
        if writable {
            chain.writable += u64::from(len);
        } else {
            chain.readable += u64::from(len);
        }
        self.translate_into(chain, addr, len, writable)
            .map_err(Some)
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

    fn complete_bad(&mut self, head: u16) {
        // Chains popped before this one can no longer be given back.
        self.tail_pops = 0;
        self.vring.tail.clear();
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
}

/// The common split chain, whole: `head` is one direct descriptor whose
/// buffer lies in a run the section of `dma` already translated (DPDK's
/// virtio-user posts nothing else with ANY_LAYOUT, on either ring).
/// Fills `chain` with it (for the queue of `epoch`) and returns true;
/// returns false, having changed nothing the walk relies on, for anything
/// else (which `pop_fast`'s walk then takes, checks and translates
/// in full). The same checks as the walk: head in the ring, no `NEXT` or
/// `INDIRECT`, the buffer inside the address space, every byte translated
/// for the device's access.
#[inline(always)]
pub(super) fn pop_one_hot(
    dma: &crate::dma::Dma<'_>,
    epoch: u64,
    r: Rings,
    head: u16,
    chain: &mut Chain,
) -> bool {
    if head >= r.size {
        return false;
    }
    let d = r.desc(head);
    if d.flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT) != 0 {
        return false;
    }
    let writable = d.flags & VRING_DESC_F_WRITE != 0;
    fill_one_hot(dma, epoch, chain, head, d.addr, d.len, writable)
}

/// [`Queue::set_one_hot`] with the queue's DMA handle and epoch passed
/// apart, for a loop that holds the ring state borrowed (the packed burst).
#[inline(always)]
pub(super) fn fill_one_hot(
    dma: &crate::dma::Dma<'_>,
    epoch: u64,
    chain: &mut Chain,
    head: u16,
    addr: u64,
    len: u32,
    writable: bool,
) -> bool {
    let access = if writable {
        Access::Write
    } else {
        Access::Read
    };
    if addr.checked_add(u64::from(len)).is_none() {
        return false;
    }
    let Some(host) = dma.hot_whole(addr, u64::from(len), access) else {
        return false;
    };
    let desc = Desc {
        addr,
        len,
        writable,
    };
    chain.set_one(head, epoch, desc, host as usize);
    true
}

#[cfg(test)]
mod tests {
    use iommu_core::Perm;
    use virtio_queue::QueueT;

    use super::*;
    use crate::queue::fixture::*;
    use crate::testing::Buf;

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

    /// A miss parks the queue and records the pages of the chains behind
    /// that miss too, once each, without the parked page, the mapped ones
    /// or anything consumed.
    #[test]
    fn test_miss_looks_ahead_at_the_chains_behind() {
        let mut f = fixture(false);
        // The second page is mapped; the others are not.
        f.iommu
            .ioas_map(
                f.ioas,
                &f.buf_mem,
                0x1000,
                0x1000,
                Some(BUF_IOVA + 0x1000),
                Perm::RW,
            )
            .expect("map");
        for (off, writable) in [
            (0x0, false),
            (0x800, false),
            (0x1000, false),
            (0x2010, true),
            (0x2800, false),
            (0x3000, false),
        ] {
            f.driver
                .add_chain(&[Buf {
                    addr: BUF_IOVA + off,
                    len: 64,
                    writable,
                }])
                .expect("chain");
        }
        f.driver.publish().expect("publish");
        let mut chain = Chain::new();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            q.pop(&mut chain).expect_err("miss");
        });
        let v = f.vrings[0].1.lock().expect("lock");
        assert_eq!(v.parked.map(|p| p.iova), Some(BUF_IOVA));
        assert_eq!(
            v.ahead,
            vec![
                (BUF_IOVA + 0x2010, Access::Write),
                (BUF_IOVA + 0x3000, Access::Read)
            ]
        );
        assert_eq!(v.q.next_avail(), 0, "nothing consumed");
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
