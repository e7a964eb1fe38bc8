//! The I/O address ranges a transport unmapped lately, so that a worker
//! forgets only the misses an unmap overlapped.
//!
//! A transport counts every removal from a connection's address space in
//! [`ConnShared::removals`](crate::worker::ConnShared) before it starts
//! (sequentially consistent). The vhost-user address space also records
//! the range of each removal here, under the count's new value, before it
//! bumps the count. A worker that sees the count move from `a` to `b`
//! reads the ranges of removals `a + 1..=b`: a page it asked for stays
//! asked unless one of them overlaps it. When a range is no longer known
//! (overwritten by a newer removal after [`REMOVED_SLOTS`] more, or
//! counted by a transport that records none) the worker forgets
//! everything, as it did before ranges were recorded.

use std::sync::atomic::{AtomicU64, Ordering};

/// Removals whose ranges are kept (a strict guest IOMMU unmaps tens of
/// buffers in a row between two looks of a worker).
pub(crate) const REMOVED_SLOTS: usize = 256;

/// One removal: its sequence number (0 while being written) and range.
#[derive(Debug, Default)]
struct Slot {
    seq: AtomicU64,
    first: AtomicU64,
    last: AtomicU64,
}

/// A ring of the last [`REMOVED_SLOTS`] removals' ranges, indexed by their
/// number in the connection's removal count. One writer (the thread that
/// owns the address space), any number of readers.
#[derive(Debug)]
pub(crate) struct RemovedRanges {
    slots: [Slot; REMOVED_SLOTS],
}

impl Default for RemovedRanges {
    fn default() -> Self {
        RemovedRanges {
            slots: std::array::from_fn(|_| Slot::default()),
        }
    }
}

impl RemovedRanges {
    /// Records that `first..=last` is about to be unmapped and counts the
    /// removal in `count` (after the range is readable under the count's
    /// new value). Called by the one writer of `count`, before the unmap
    /// starts.
    pub fn record(&self, count: &AtomicU64, first: u64, last: u64) {
        let seq = count.load(Ordering::SeqCst).wrapping_add(1);
        let s = &self.slots[slot_of(seq)];
        // Readers that catch the slot half-written see 0 and give up.
        s.seq.store(0, Ordering::SeqCst);
        s.first.store(first, Ordering::SeqCst);
        s.last.store(last, Ordering::SeqCst);
        s.seq.store(seq, Ordering::SeqCst);
        count.fetch_add(1, Ordering::SeqCst);
    }

    /// Calls `f(first, last)` with the range of every removal numbered
    /// `from + 1..=to`. Returns false if one of them is not known (too
    /// old, being overwritten, or counted without a range): the caller
    /// must then assume that everything was removed.
    pub fn each_since(&self, from: u64, to: u64, mut f: impl FnMut(u64, u64)) -> bool {
        let n = to.wrapping_sub(from);
        if n > REMOVED_SLOTS as u64 {
            return false;
        }
        for k in 1..=n {
            let seq = from.wrapping_add(k);
            let s = &self.slots[slot_of(seq)];
            let before = s.seq.load(Ordering::SeqCst);
            let first = s.first.load(Ordering::SeqCst);
            let last = s.last.load(Ordering::SeqCst);
            let after = s.seq.load(Ordering::SeqCst);
            if before != seq || after != seq || seq == 0 {
                return false;
            }
            f(first, last);
        }
        true
    }
}

fn slot_of(seq: u64) -> usize {
    (seq % REMOVED_SLOTS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(r: &RemovedRanges, from: u64, to: u64) -> Option<Vec<(u64, u64)>> {
        let mut v = Vec::new();
        r.each_since(from, to, |a, b| v.push((a, b))).then_some(v)
    }

    #[test]
    fn test_recorded_ranges_are_read_back_in_order() {
        let r = RemovedRanges::default();
        let count = AtomicU64::new(0);
        r.record(&count, 0x1000, 0x1fff);
        r.record(&count, 0x5000, 0x5fff);
        assert_eq!(count.load(Ordering::SeqCst), 2);
        assert_eq!(
            ranges(&r, 0, 2),
            Some(vec![(0x1000, 0x1fff), (0x5000, 0x5fff)])
        );
        assert_eq!(ranges(&r, 1, 2), Some(vec![(0x5000, 0x5fff)]));
        assert_eq!(ranges(&r, 2, 2), Some(vec![]));
    }

    #[test]
    fn test_overwritten_or_unrecorded_ranges_are_unknown() {
        let r = RemovedRanges::default();
        let count = AtomicU64::new(0);
        for i in 0..REMOVED_SLOTS as u64 + 1 {
            r.record(&count, i << 12, (i << 12) | 0xfff);
        }
        let to = count.load(Ordering::SeqCst);
        // The first removal's slot holds the newest one now.
        assert_eq!(ranges(&r, 0, to), None);
        assert_eq!(ranges(&r, 1, to).map(|v| v.len()), Some(REMOVED_SLOTS));
        // A removal counted without its range (a transport that records
        // none) is unknown too.
        count.fetch_add(1, Ordering::SeqCst);
        assert_eq!(ranges(&r, to, to + 1), None);
        assert_eq!(ranges(&r, to - 1, to).map(|v| v.len()), Some(1));
    }
}
