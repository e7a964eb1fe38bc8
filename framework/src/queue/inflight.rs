//! Inflight I/O tracking for split rings (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`):
//! a memfd the backend shares with the frontend (GET_INFLIGHT_FD) and gets
//! back after a restart (SET_INFLIGHT_FD), in which every queue records the
//! chains it has popped and not completed yet, so that a backend killed
//! under load and restarted resubmits them: none lost, none completed twice.
//!
//! # Layout (libvhost-user's, for split rings)
//!
//! One region per queue, each `align_up(16 * queue_size + 2, 64)` bytes:
//!
//! | offset | field |
//! | --- | --- |
//! | 0 | `u64 features` (0) |
//! | 8 | `u16 version` (1; 0: never used) |
//! | 10 | `u16 desc_num` (entries, the queue size) |
//! | 12 | `u16 last_batch_head` |
//! | 14 | `u16 used_idx`: the used index once the last completion was recorded |
//! | 16 + 16 * i | entry of head `i`: `u8 inflight`, 5 bytes padding, `u16 next`, `u64 counter` |
//!
//! # Protocol
//!
//! - Pop: the entry's `counter` takes the queue's next pop number, then
//!   `inflight` becomes 1.
//! - Completion: the used element is written and the used index published
//!   as usual; then each completed head's `inflight` becomes 0, then
//!   `used_idx` takes the published index (`last_batch_head` names the last
//!   head, as libvhost-user does).
//! - Restart (the first time a started ring is served with a region that
//!   has `version` 1): a crash between publishing and clearing left
//!   `used_idx` behind the ring's used index; the heads of the used
//!   elements in between are cleared (the driver saw them completed). The
//!   heads still marked are resubmitted, oldest pop first, before any new
//!   chain ([`Queue::pop`](super::Queue::pop) returns them first); the next
//!   chain popped from the avail ring is the one after the ring's used
//!   index plus those (the frontend's vring base is ignored, as
//!   libvhost-user does: after a crash QEMU sends the used index).
//!
//! A crash before the used index is published leaves the head marked: it
//! is done again, and the driver, which never saw the first completion,
//! sees one. Block requests are idempotent, so doing one twice is safe;
//! completing one twice is what the protocol rules out.

use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::Arc;

use iommu_core::Memory;

/// `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`'s region version.
const VERSION: u16 = 1;
/// Bytes of one entry.
const ENTRY: usize = 16;
/// Bytes of a queue region's header.
const HEADER: usize = 16;

/// Bytes of one queue's region for a queue of `queue_size` entries
/// (libvhost-user's `vu_inflight_queue_size`).
pub fn queue_region_size(queue_size: u16) -> usize {
    (ENTRY * usize::from(queue_size) + 2).div_ceil(64) * 64
}

/// The shared region of every queue of a device.
#[derive(Debug)]
pub(crate) struct InflightRegion {
    pub mem: Arc<Memory>,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl InflightRegion {
    /// The region of queue `index`, if the region has one.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<InflightQueue> {
        if index >= self.num_queues {
            return None;
        }
        let size = queue_region_size(self.queue_size);
        let off = usize::from(index) * size;
        if off + size > self.mem.len() {
            return None;
        }
        Some(InflightQueue {
            region: self.clone(),
            off,
            desc_num: self.queue_size,
            counter: 0,
            recover: true,
            pending: Vec::new(),
        })
    }
}

/// One queue's view of the region (kept in its vring).
#[derive(Debug)]
pub(crate) struct InflightQueue {
    region: Arc<InflightRegion>,
    off: usize,
    desc_num: u16,
    /// Next pop number.
    counter: u64,
    /// Recovery still to run (the ring was just started).
    pub recover: bool,
    /// Heads completed since the used index was last published.
    pub pending: Vec<u16>,
}

impl InflightQueue {
    fn write(&self, at: usize, b: &[u8]) {
        // Bounds: every offset used is inside this queue's region, which
        // `InflightRegion::queue` checked lies in the mapping; write_at
        // checks again and cannot fail otherwise.
        let _ = self.region.mem.write_at(self.off + at, b);
    }

    fn read<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut b = [0u8; N];
        let _ = self.region.mem.read_at(self.off + at, &mut b);
        b
    }

    fn entry(&self, head: u16) -> Option<usize> {
        (head < self.desc_num).then(|| HEADER + ENTRY * usize::from(head))
    }

    /// Records that `head` was popped.
    pub fn popped(&mut self, head: u16) {
        let Some(e) = self.entry(head) else { return };
        self.write(e + 8, &self.counter.to_le_bytes());
        self.counter += 1;
        compiler_fence(Ordering::SeqCst);
        self.write(e, &[1]);
    }

    /// `head` was given back to the avail ring before any work on it.
    pub fn unpopped(&mut self, head: u16) {
        if let Some(e) = self.entry(head) {
            self.write(e, &[0]);
        }
    }

    /// Records `head`'s used element (before the used index is published).
    pub fn used(&mut self, head: u16) {
        self.write(12, &head.to_le_bytes());
        self.pending.push(head);
    }

    /// The used index `idx` was published: the heads completed before it
    /// are no longer in flight.
    pub fn published(&mut self, idx: u16) {
        if self.pending.is_empty() {
            return;
        }
        compiler_fence(Ordering::SeqCst);
        for h in std::mem::take(&mut self.pending) {
            if let Some(e) = self.entry(h) {
                self.write(e, &[0]);
            }
        }
        compiler_fence(Ordering::SeqCst);
        self.write(14, &idx.to_le_bytes());
    }

    /// Recovery when the ring starts (see the module docs): `used_idx` is
    /// the ring's used index, `used_id(i)` the head of used element `i`
    /// (`None` if it cannot be read). Returns the heads to resubmit, oldest
    /// first; `None` for a fresh region (which is initialised; the ring's
    /// indices stay as the frontend set them).
    pub fn recover(
        &mut self,
        used_idx: u16,
        ring_size: u16,
        mut used_id: impl FnMut(u16) -> Option<u32>,
    ) -> Option<Vec<u16>> {
        self.recover = false;
        self.pending.clear();
        let version = u16::from_le_bytes(self.read::<2>(8));
        if version != VERSION {
            // Never used (or not ours): start clean.
            let _ = self
                .region
                .mem
                .fill(self.off, queue_region_size(self.desc_num), 0);
            self.write(8, &VERSION.to_le_bytes());
            self.write(10, &self.desc_num.to_le_bytes());
            self.write(14, &used_idx.to_le_bytes());
            self.counter = 0;
            return None;
        }
        let recorded = u16::from_le_bytes(self.read::<2>(14));
        let behind = used_idx.wrapping_sub(recorded);
        if behind != 0 && behind <= ring_size {
            // Published but not cleared before the crash.
            for i in 0..behind {
                let slot = recorded.wrapping_add(i) % ring_size.max(1);
                if let Some(h) = used_id(slot).and_then(|id| u16::try_from(id).ok()) {
                    if let Some(e) = self.entry(h) {
                        self.write(e, &[0]);
                    }
                }
            }
        }
        self.write(14, &used_idx.to_le_bytes());
        let mut heads: Vec<(u64, u16)> = (0..self.desc_num.min(ring_size))
            .filter_map(|h| {
                let e = self.entry(h)?;
                (self.read::<1>(e)[0] == 1).then(|| (u64::from_le_bytes(self.read::<8>(e + 8)), h))
            })
            .collect();
        heads.sort_unstable();
        self.counter = heads.last().map_or(0, |(c, _)| c + 1);
        if cfg!(ioasis_broken = "noresubmit") {
            // Test-only: what a backend without inflight tracking does.
            return Some(Vec::new());
        }
        Some(heads.into_iter().map(|(_, h)| h).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region() -> Arc<InflightRegion> {
        Arc::new(InflightRegion {
            mem: Memory::anonymous("inflight", 2 * queue_region_size(8)).expect("mem"),
            num_queues: 2,
            queue_size: 8,
        })
    }

    #[test]
    fn test_layout_size() {
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(8), 192);
    }

    #[test]
    fn test_popped_heads_are_resubmitted_in_pop_order() {
        let r = region();
        let mut q = r.queue(1).expect("queue 1");
        assert_eq!(q.recover(0, 8, |_| None), None, "fresh region");
        for h in [5, 2, 7] {
            q.popped(h);
        }
        // Head 2 completed and its index published.
        q.used(2);
        q.published(1);
        // A new instance (same memory) recovers 5 then 7.
        let mut again = r.queue(1).expect("queue 1");
        assert_eq!(again.recover(1, 8, |_| None), Some(vec![5, 7]));
        // New pops are numbered after the recovered ones.
        again.popped(3);
        let mut third = r.queue(1).expect("queue 1");
        assert_eq!(third.recover(1, 8, |_| None), Some(vec![5, 7, 3]));
        // The other queue is untouched.
        assert_eq!(r.queue(0).expect("queue 0").recover(0, 8, |_| None), None);
    }

    #[test]
    fn test_crash_between_publish_and_clear() {
        let r = region();
        let mut q = r.queue(0).expect("queue");
        let _ = q.recover(0, 8, |_| None);
        q.popped(4);
        q.popped(6);
        q.used(6);
        // Crash: the ring's used index moved to 1 (element 0 is head 6),
        // the region was not updated.
        let mut again = r.queue(0).expect("queue");
        assert_eq!(
            again.recover(1, 8, |i| (i == 0).then_some(6)),
            Some(vec![4])
        );
    }
}
