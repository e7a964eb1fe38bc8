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
//!
//! The slots are a seqlock, model-checked with loom (the `loom_model`
//! module below, run by scripts/model-check.sh).

use std::sync::atomic::Ordering;

// std's `AtomicU64`; under `--cfg loom` iommu-core's loom model of it.
use iommu_core::atomic::AtomicU64;

/// The type of a connection's removal count
/// ([`ConnShared::removals`](crate::worker::ConnShared)): std's
/// `AtomicU64`, loom's model of it under `--cfg loom` (so that the model
/// sees the count's order against the slots).
pub(crate) type RemovalCount = AtomicU64;

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
///
/// `N` is [`REMOVED_SLOTS`] but in the loom model, which wraps a ring of 2.
#[derive(Debug)]
pub(crate) struct RemovedRanges<const N: usize = REMOVED_SLOTS> {
    slots: [Slot; N],
}

impl<const N: usize> Default for RemovedRanges<N> {
    fn default() -> Self {
        RemovedRanges {
            slots: std::array::from_fn(|_| Slot::default()),
        }
    }
}

impl<const N: usize> RemovedRanges<N> {
    /// Records that `first..=last` is about to be unmapped and counts the
    /// removal in `count` (after the range is readable under the count's
    /// new value). Called by the one writer of `count`, before the unmap
    /// starts.
    pub fn record(&self, count: &AtomicU64, first: u64, last: u64) {
        let seq = count.load(Ordering::SeqCst).wrapping_add(1);
        let s = &self.slots[slot_of::<N>(seq)];
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
        if n > N as u64 {
            return false;
        }
        for k in 1..=n {
            let seq = from.wrapping_add(k);
            let s = &self.slots[slot_of::<N>(seq)];
            let before = s.seq.load(Ordering::SeqCst);
            let first = s.first.load(Ordering::SeqCst);
            let last = s.last.load(Ordering::SeqCst);
            #[cfg(not(ioasis_broken = "seqlockonce"))]
            let after = s.seq.load(Ordering::SeqCst);
            // Test-only broken build: the range is taken without checking
            // that the slot was not rewritten meanwhile.
            #[cfg(ioasis_broken = "seqlockonce")]
            let after = before;
            if before != seq || after != seq || seq == 0 {
                return false;
            }
            f(first, last);
        }
        true
    }
}

fn slot_of<const N: usize>(seq: u64) -> usize {
    (seq % N as u64) as usize
}

#[cfg(all(test, not(loom)))]
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

/// A loom model of the seqlock: a writer records three removals in a ring
/// of 2 (the third overwrites the first's slot) while a worker reads the
/// count and then the ranges since the count it saw before, twice.
/// Whenever [`RemovedRanges::each_since`] returns true, every range it
/// passed must be exactly the one recorded under its number, never a
/// half-written or overwritten one ("RANGE TORN" otherwise); a false
/// return is always allowed.
///
/// Run by `scripts/model-check.sh` (`RUSTFLAGS="--cfg loom" cargo test
/// -p ioasis --lib loom_model`): every interleaving (no preemption
/// bound), 3185 executions, 1.5 s in the dev profile (0.13 s in release).
///
/// Able to fail: with `--cfg ioasis_broken="seqlockonce"` (each_since
/// does not read the slot's seq again after its range), run by
/// `scripts/model-check.sh --prove-fail` (dev profile, 2 preemptions), it
/// fails after 27 executions (131 without a bound; it passes at 1
/// preemption, 8 executions): "RANGE TORN: removals 0+1..=2 read as
/// [(1000, 3fff), (2000, 2fff)], recorded as [(1000, 1fff), (2000,
/// 2fff)]": the worker read seq 1 and the first address of removal 1 in
/// slot 1, the writer then rewrote the slot for removal 3, and the worker
/// took removal 3's last address for removal 1's. Checked by hand as
/// well: a writer that does not zero the slot's seq first fails after 6
/// executions (removal 3's range read as removal 1's, at any bound from
/// 2); with the `SeqCst` fences of `iommu_core::atomic::AtomicU64`'s model left out (every access
/// checked as acquire/release only) the model passes (4260 executions),
/// so the seqlock does not depend on them.
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;

    /// Removal `n`'s range: page `n`.
    fn range_of(n: u64) -> (u64, u64) {
        (n << 12, (n << 12) | 0xfff)
    }

    /// Reads the ranges of removals `from + 1..=to` and checks them.
    fn read_and_check(r: &RemovedRanges<2>, from: u64, to: u64) {
        let mut got = Vec::new();
        if r.each_since(from, to, |a, b| got.push((a, b))) {
            let want: Vec<_> = (from + 1..=to).map(range_of).collect();
            assert!(
                got == want,
                "RANGE TORN: removals {from}+1..={to} read as {got:x?}, recorded as {want:x?}"
            );
        }
    }

    #[test]
    fn removed_ranges_seqlock() {
        iommu_core::model::check("removed_ranges_seqlock", None, || {
            let r = Arc::new(RemovedRanges::<2>::default());
            let count = Arc::new(RemovalCount::new(0));
            let (rr, rc) = (r.clone(), count.clone());
            let worker = loom::thread::spawn(move || {
                let mut seen = 0;
                for _ in 0..2 {
                    let now = rc.load(Ordering::SeqCst);
                    assert!(now >= seen && now <= 3, "count went from {seen} to {now}");
                    read_and_check(&rr, seen, now);
                    seen = now;
                }
            });
            for n in 1..=3 {
                let (first, last) = range_of(n);
                r.record(&count, first, last);
            }
            worker.join().expect("the worker panicked");
        });
    }
}
