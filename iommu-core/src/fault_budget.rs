//! Fault budgets: a bound on outstanding I/O page fault groups shared by
//! several fault queues (or by any other raiser), with one RAII slot per
//! outstanding group.
//!
//! A device's own bound
//! ([`IommuDevice::set_max_outstanding_faults`](crate::IommuDevice::set_max_outstanding_faults))
//! is shared by everyone whose faults the device raises: one consumer that
//! never answers can hold all of it and fail every other consumer's faults
//! on that device. A budget bounds one consumer instead: give each
//! consumer's fault queues the same budget
//! ([`FaultQueue::set_budget`](crate::FaultQueue::set_budget)), smaller than
//! the device's bound, and a group raised on any of them takes a slot from
//! it first; with none left the access fails with
//! [`Error::FaultOverflow`](crate::Error::FaultOverflow) as past the
//! device's bound. The slot comes back when the group is answered (by the
//! consumer, or INVALID on detach, replace, unbind or queue destroy).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::prim::AtomicU32;

/// A bound on outstanding fault groups, shared by whoever holds the `Arc`.
pub struct FaultBudget {
    outstanding: AtomicU32,
    limit: u32,
}

impl std::fmt::Debug for FaultBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultBudget")
            .field("outstanding", &self.outstanding())
            .field("limit", &self.limit)
            .finish()
    }
}

impl FaultBudget {
    /// A budget of `limit` outstanding groups (at least 1).
    pub fn new(limit: u32) -> Arc<FaultBudget> {
        Arc::new(FaultBudget {
            outstanding: AtomicU32::new(0),
            limit: limit.max(1),
        })
    }

    /// Slots taken and not yet given back.
    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// The bound.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Takes one slot, if fewer than [`FaultBudget::limit`] are taken; the
    /// slot is given back when dropped.
    pub fn try_take(self: &Arc<Self>) -> Option<FaultSlot> {
        self.outstanding
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| FaultSlot(self.clone()))
    }
}

/// One slot of a [`FaultBudget`], given back when dropped.
pub struct FaultSlot(Arc<FaultBudget>);

impl std::fmt::Debug for FaultSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FaultSlot").field(&self.0).finish()
    }
}

impl Drop for FaultSlot {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn test_slots_are_bounded_and_given_back() {
        let b = FaultBudget::new(2);
        let s1 = b.try_take().expect("first");
        let s2 = b.try_take().expect("second");
        assert!(b.try_take().is_none(), "past the limit");
        assert_eq!((b.outstanding(), b.limit()), (2, 2));
        drop(s1);
        assert_eq!(b.outstanding(), 1);
        let s3 = b.try_take().expect("room again");
        drop((s2, s3));
        assert_eq!(b.outstanding(), 0);
        assert_eq!(FaultBudget::new(0).limit(), 1, "at least 1");
    }
}
