//! Test-only fault injection (cargo feature `fault-injection`): a fill that
//! lands after the access section it was translated in has ended.
//!
//! Armed with `ioasis::fault_injection::arm(FAULT_KIND, delay)`, the device,
//! at the next batch that starts with a fill and has another fill of the
//! same length among its first members, translates that other fill's
//! destination inside its section and, `delay` after the section has
//! ended, writes the first fill's pattern there through the host pointer
//! the section gave. The batch itself runs as usual. The write is the kind
//! the unmap promise excludes: end-to-end checks show with it that they
//! catch such a write.

use crate::desc::{opcode, Descriptor, DESC_SIZE};
use ioasis::dma::{Access, Dma};
use ioasis::fault_injection;

/// The kind under which a test arms a late write for this device.
pub const FAULT_KIND: &str = "sva-accel";

/// Members of a batch looked at for a second fill.
const MEMBERS_LOOKED_AT: usize = 8;

/// Called inside a section before `d` runs: registers the late write when
/// one is armed and `d` qualifies.
pub(crate) fn before_job(dma: Dma<'_>, d: &Descriptor) {
    if d.opcode != opcode::BATCH || d.xfer_size < 2 || !fault_injection::armed(FAULT_KIND) {
        return;
    }
    let probe = dma.probe();
    let n = (d.xfer_size as usize).min(MEMBERS_LOOKED_AT);
    let mut raw = vec![0u8; n * DESC_SIZE];
    if probe.read(d.src, &mut raw).is_err() {
        return;
    }
    let members: Vec<Descriptor> = raw
        .chunks_exact(DESC_SIZE)
        .filter_map(|c| <&[u8; DESC_SIZE]>::try_from(c).ok())
        .map(Descriptor::from_bytes)
        .collect();
    let Some(first) = members.first().filter(|m| m.opcode == opcode::MEMFILL) else {
        return;
    };
    let Some(second) = members[1..]
        .iter()
        .find(|m| m.opcode == opcode::MEMFILL && m.xfer_size == first.xfer_size)
    else {
        return;
    };
    let Ok(frag) = probe.fragment(second.dst, u64::from(second.xfer_size), Access::Write) else {
        return;
    };
    let Some(delay) = fault_injection::claim(FAULT_KIND) else {
        return;
    };
    let pattern = first.src.to_le_bytes();
    let data: Vec<u8> = pattern.iter().copied().cycle().take(frag.len()).collect();
    fault_injection::write_after_section(frag, &data, delay);
}
