//! Work queue slots and retirement: a descriptor holds a slot from the
//! portal until it completes or parks; a retired one is completed in the
//! portal.

use super::*;

/// `n` descriptors of `c` take work queue slots.
pub(super) fn take_slots(s: &Shared, c: &ClientCtx, n: u64) {
    s.occupancy.fetch_add(n, Ordering::AcqRel);
    c.slots.fetch_add(n, Ordering::AcqRel);
}

/// `n` descriptors of `c` give their work queue slots back.
pub(super) fn give_slots(s: &Shared, c: &ClientCtx, n: u64) {
    s.occupancy.fetch_sub(n, Ordering::AcqRel);
    c.slots.fetch_sub(n, Ordering::AcqRel);
}

/// Retires `n` descriptors that hold a work queue slot.
pub(super) fn retire(s: &Shared, c: &ClientCtx, n: u64) {
    if n == 0 {
        return;
    }
    give_slots(s, c, n);
    retire_released(c, n);
}

/// Retires `n` descriptors whose work queue slot was already released
/// (parked on a fault).
pub(super) fn retire_released(c: &ClientCtx, n: u64) {
    if n == 0 {
        return;
    }
    c.inflight.fetch_sub(n, Ordering::AcqRel);
    c.portal.complete(n);
    c.stats.completed.fetch_add(n, Ordering::Relaxed);
}
