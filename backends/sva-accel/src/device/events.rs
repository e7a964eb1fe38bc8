//! Events: completion records the device could not write, reported in the
//! client's portal instead.

use super::*;

/// Reports a descriptor dropped unexecuted, when it asked for a record.
pub(super) fn report_dropped(c: &ClientCtx, d: &Descriptor) {
    if d.flags & crate::desc::flags::CRAV != 0 {
        report(
            c,
            CrWriteFailed {
                cr_addr: d.completion_addr,
                status: crate::desc::status::PAGE_FAULT_NOBOF,
                code: crate::desc::status::CRA_XLAT,
            },
            d.opcode,
        );
    }
}

pub(super) fn report(c: &ClientCtx, e: CrWriteFailed, opcode: u8) {
    c.stats.events.fetch_add(1, Ordering::Relaxed);
    debug!(
        "PASID {}: completion record at {:#x} not written ({:#x})",
        c.pasid, e.cr_addr, e.code
    );
    c.portal.push_event(&Event {
        code: e.code,
        status: e.status,
        opcode,
        pasid: c.pasid,
        cr_addr: e.cr_addr,
    });
}
