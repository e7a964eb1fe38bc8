//! The frontend's dirty page log: what a device wrote into guest memory
//! while the frontend migrates the guest.
//!
//! vhost-user's log (`VHOST_F_LOG_ALL`, `VHOST_USER_PROTOCOL_F_LOG_SHMFD`)
//! is a bitmap the frontend shares as a memfd (`SET_LOG_BASE`): bit `n` (bit
//! `n % 8` of byte `n / 8`) stands for the guest physical page
//! `n * LOG_PAGE`. The frontend reads and clears it while it copies guest
//! memory, and once more after the device stopped; a page the device wrote
//! after the frontend last copied it must have its bit set, or the
//! destination keeps the stale copy.
//!
//! A [`DirtyLog`] is that bitmap plus the host mappings of the frontend's
//! memory regions with their guest physical addresses. The queue layer logs
//! by *host address*: whatever translated the device's I/O address (the
//! memory table, where IOVA = guest physical address, or the frontend's
//! IOTLB, where it is not) the bytes were written into one of these
//! mappings, and the mapping says which guest page they are. So a write
//! through an IOVA is logged at the guest physical address behind it.
//!
//! Bits are set after the write they record, with release ordering: the
//! frontend clears a bit before it copies the page, so a bit set before the
//! write could be cleared, the page copied, and the write then lost.
//!
//! With logging off no queue holds a `DirtyLog`, and the data path pays one
//! test of an `Option` per completion.

use std::sync::atomic::{fence, AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use iommu_core::Memory;

/// Bytes of guest memory one bit of the log stands for (`VHOST_LOG_PAGE`).
pub(crate) const LOG_PAGE: u64 = 0x1000;

/// One frontend memory region as mapped here.
#[derive(Debug, Clone)]
pub(crate) struct LoggedRegion {
    /// The mapping (kept alive while the log may point into it).
    pub mem: Arc<Memory>,
    /// Guest physical address of its first byte.
    pub gpa: u64,
}

/// The shared dirty bitmap and the regions it covers.
#[derive(Debug)]
pub(crate) struct DirtyLog {
    bitmap: Arc<Memory>,
    /// Sorted by host address.
    regions: Vec<LoggedRegion>,
    /// A write outside the regions or past the bitmap was reported.
    warned: AtomicBool,
}

impl DirtyLog {
    /// A log writing into `bitmap` for the memory `regions`.
    pub(crate) fn new(bitmap: Arc<Memory>, mut regions: Vec<LoggedRegion>) -> DirtyLog {
        regions.sort_by_key(|r| r.mem.as_ptr() as usize);
        DirtyLog {
            bitmap,
            regions,
            warned: AtomicBool::new(false),
        }
    }

    /// Records that `len` bytes at host address `ptr` were written. The
    /// range may span regions; bytes in none are reported once and not
    /// logged (the device wrote memory that is not the guest's).
    pub fn log_host(&self, ptr: *const u8, len: usize) {
        if len == 0 {
            return;
        }
        // The writes being recorded happen before the bits are seen set.
        fence(Ordering::Release);
        let mut at = ptr as usize;
        let Some(end) = at.checked_add(len) else {
            self.warn(format_args!("host range {at:#x}+{len:#x} overflows"));
            return;
        };
        while at < end {
            let i = self
                .regions
                .partition_point(|r| r.mem.as_ptr() as usize <= at);
            let r = i.checked_sub(1).map(|i| &self.regions[i]);
            let base = r.map_or(0, |r| r.mem.as_ptr() as usize);
            match r {
                Some(r) if at - base < r.mem.len() => {
                    let n = (end - at).min(r.mem.len() - (at - base));
                    let gpa = r.gpa.saturating_add((at - base) as u64);
                    self.log_gpa(gpa, n as u64);
                    at += n;
                }
                _ => {
                    self.warn(format_args!(
                        "a device wrote host address {at:#x}, in no guest memory region"
                    ));
                    return;
                }
            }
        }
    }

    /// Sets the bits of the pages `gpa..gpa+len` touches (`len > 0`).
    pub fn log_gpa(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        let nbytes = self.bitmap.len() as u64;
        if last / 8 >= nbytes {
            self.warn(format_args!(
                "guest pages {first:#x}..={last:#x} are past the dirty log ({nbytes} bytes)"
            ));
        }
        let base = self.bitmap.as_ptr();
        let mut page = first;
        // One pass over the bitmap, a byte (eight pages) at a time.
        while page <= last && page / 8 < nbytes {
            let byte = page / 8;
            let lo = page % 8;
            let hi = if last / 8 == byte { last % 8 } else { 7 };
            let mask = (0xffu8 >> (7 - (hi - lo))) << lo;
            // `byte < nbytes`: inside the mapping.
            let p = base.wrapping_add(byte as usize);
            // SAFETY: `p` points into the log mapping, which `self.bitmap`
            // keeps mapped; the frontend updates the same bytes only
            // atomically, and every access here is atomic too.
            let cell = unsafe { AtomicU8::from_ptr(p) };
            cell.fetch_or(mask, Ordering::Relaxed);
            page = (byte + 1) * 8;
        }
    }

    #[cold]
    fn warn(&self, what: std::fmt::Arguments<'_>) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            log::error!("dirty log: {what}: not logged; the migrated guest may miss it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(region_len: usize, gpa: u64, bitmap_len: usize) -> (DirtyLog, Arc<Memory>) {
        let mem = Memory::anonymous("guest", region_len).expect("region");
        let bitmap = Memory::anonymous("log", bitmap_len).expect("log");
        let log = DirtyLog::new(
            bitmap,
            vec![LoggedRegion {
                mem: mem.clone(),
                gpa,
            }],
        );
        (log, mem)
    }

    fn bits(log: &DirtyLog) -> Vec<u64> {
        let mut out = Vec::new();
        let mut b = vec![0u8; log.bitmap.len()];
        log.bitmap.read_at(0, &mut b).expect("read");
        for (i, byte) in b.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    out.push(i as u64 * 8 + bit);
                }
            }
        }
        out
    }

    #[test]
    fn test_host_write_is_logged_at_its_guest_page() {
        let (log, mem) = log_with(0x10_0000, 0x4000_0000, 0x10000);
        // 0x10 bytes at offset 0x2ff8: straddles pages 2 and 3 of the region.
        log.log_host(mem.as_ptr().wrapping_add(0x2ff8), 0x10);
        let base = 0x4000_0000 / LOG_PAGE;
        assert_eq!(bits(&log), vec![base + 2, base + 3]);
    }

    #[test]
    fn test_long_range_sets_every_page_once_through_whole_bytes() {
        let (log, mem) = log_with(0x10_0000, 0, 64);
        // Pages 5..=30: a partial byte, two whole ones, a partial one.
        log.log_host(mem.as_ptr().wrapping_add(5 * 0x1000), 26 * 0x1000);
        assert_eq!(bits(&log), (5..=30).collect::<Vec<_>>());
    }

    #[test]
    fn test_write_outside_regions_and_past_bitmap_is_not_logged() {
        let (log, mem) = log_with(0x10_0000, 0x1000_0000, 8);
        let other = Memory::anonymous("other", 0x1000).expect("other");
        log.log_host(other.as_ptr(), 16);
        // Page 0x10000 is far past 8 bytes of bitmap: refused, no overrun.
        log.log_host(mem.as_ptr(), 16);
        assert!(bits(&log).is_empty());
        log.log_gpa(0x3f * LOG_PAGE, 2 * LOG_PAGE);
        assert_eq!(bits(&log), vec![0x3f], "clipped at the bitmap's end");
    }

    #[test]
    fn test_range_across_two_regions_is_logged_in_both() {
        let a = Memory::anonymous("a", 0x2000).expect("a");
        let b = Memory::anonymous("b", 0x2000).expect("b");
        let bitmap = Memory::anonymous("log", 64).expect("log");
        let log = DirtyLog::new(
            bitmap,
            vec![
                LoggedRegion {
                    mem: a.clone(),
                    gpa: 0,
                },
                LoggedRegion {
                    mem: b.clone(),
                    gpa: 0x10_0000,
                },
            ],
        );
        log.log_host(a.as_ptr().wrapping_add(0x1ff0), 0x10);
        log.log_host(b.as_ptr(), 1);
        assert_eq!(bits(&log), vec![1, 0x100]);
    }
}
