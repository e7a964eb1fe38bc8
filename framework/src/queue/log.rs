//! Dirty logging of what a queue wrote into guest memory, while the
//! frontend migrates the guest (see `crate::dirty_log`).
//!
//! Two kinds of writes are logged, each after it happened:
//! - a completion's buffers: [`Queue::add_used`] with `len` bytes written
//!   walks the chain again from its head and logs the first `len` bytes of
//!   its device-writable buffers (what the device says it wrote, which is
//!   all a driver may read);
//! - the used ring (elements, index, flags, `avail_event`): logged whole
//!   (a page or two) when the queue handle is dropped, after its last
//!   write to it.
//!
//! Both go from I/O address to host address through the queue's DMA
//! handle (a probe: nothing is raised), and from host address to guest
//! physical address through the log's regions, so the IOTLB mode logs the
//! guest page behind an IOVA. Nothing here runs while logging is off.

use virtio_queue::QueueT;

use super::ring::{RawDesc, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use super::Queue;
use crate::dirty_log::DirtyLog;
use crate::dma::{Access, Dma};

/// Logs the host memory behind `iova..iova+len` (`Access::Write`
/// translations, as the device made them). A range that no longer
/// translates is logged up to where it stops.
pub(super) fn log_iova(log: &DirtyLog, dma: Dma<'_>, mut iova: u64, len: u64) {
    if cfg!(ioasis_broken = "nolog") {
        // Test-only: a device that logs nothing.
        return;
    }
    let dma = dma.probe();
    let Some(end) = iova.checked_add(len) else {
        return;
    };
    while iova < end {
        match dma.fragment(iova, end - iova, Access::Write) {
            Ok(f) if !f.is_empty() => {
                log.log_host(f.as_ptr(), f.len());
                iova += f.len() as u64;
            }
            _ => {
                crate::log_limited!(
                    log::Level::Warn,
                    "dirty log: {iova:#x} written by the device no longer translates; not logged"
                );
                return;
            }
        }
    }
}

fn read_desc(dma: Dma<'_>, at: u64) -> Option<RawDesc> {
    let b: [u8; 16] = dma.probe().read_obj(at).ok()?;
    let u = |r: std::ops::Range<usize>| {
        let mut x = [0u8; 8];
        x[..r.len()].copy_from_slice(&b[r]);
        u64::from_le_bytes(x)
    };
    Some(RawDesc {
        addr: u(0..8),
        len: u(8..12) as u32,
        flags: u(12..14) as u16,
        next: u(14..16) as u16,
    })
}

impl Queue<'_> {
    /// Logs the first `len` bytes of the device-writable buffers of the
    /// chain at `head` (bounded like a pop: at most the table's size of
    /// descriptors, one level of indirection).
    #[cold]
    #[inline(never)]
    pub(super) fn log_chain(&self, log: &DirtyLog, head: u16, len: u32) {
        let size = self.vring.q.size();
        let (mut base, mut limit, mut idx) = (self.vring.q.desc_table(), size, head);
        let mut left = u64::from(len);
        let mut count = 0u16;
        let mut indirect = false;
        while left > 0 && idx < limit && count < limit {
            count += 1;
            let Some(d) = read_desc(self.dma, base.wrapping_add(16 * u64::from(idx))) else {
                break;
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
            if d.flags & VRING_DESC_F_WRITE != 0 {
                let n = left.min(u64::from(d.len));
                log_iova(log, self.dma, d.addr, n);
                left -= n;
            }
            if d.flags & VRING_DESC_F_NEXT == 0 {
                break;
            }
            idx = d.next;
        }
    }

    /// Logs the whole used ring.
    #[cold]
    #[inline(never)]
    pub(super) fn log_used_ring(&self, log: &DirtyLog) {
        let size = u64::from(self.vring.q.size());
        let event = u64::from(self.vring.q.event_idx_enabled()) * 2;
        log_iova(
            log,
            self.dma,
            self.vring.q.used_ring(),
            4 + 8 * size + event,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use iommu_core::Memory;

    use crate::dirty_log::{DirtyLog, LoggedRegion, LOG_PAGE};
    use crate::queue::fixture::*;
    use crate::queue::Chain;
    use crate::testing::Buf;

    /// Guest physical addresses of the fixture's memories: not their IOVAs,
    /// as with a guest IOMMU.
    const RING_GPA: u64 = 0x1_0000_0000;
    const BUF_GPA: u64 = 0x8000_0000;

    fn logged(f: &Fixture) -> (Arc<Memory>, Arc<DirtyLog>) {
        let bitmap =
            Memory::anonymous("log", (RING_GPA / LOG_PAGE / 8 + 64) as usize).expect("log");
        let log = Arc::new(DirtyLog::new(
            bitmap.clone(),
            vec![
                LoggedRegion {
                    mem: f.ring_mem.clone(),
                    gpa: RING_GPA,
                },
                LoggedRegion {
                    mem: f.buf_mem.clone(),
                    gpa: BUF_GPA,
                },
            ],
        ));
        f.vrings[0].1.lock().expect("lock").log = Some(log.clone());
        (bitmap, log)
    }

    fn pages(bitmap: &Memory) -> Vec<u64> {
        let mut b = vec![0u8; bitmap.len()];
        bitmap.read_at(0, &mut b).expect("read");
        let mut out = Vec::new();
        for (i, byte) in b.iter().enumerate().filter(|(_, b)| **b != 0) {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    out.push((i as u64 * 8 + bit) * LOG_PAGE);
                }
            }
        }
        out
    }

    fn complete_one(f: &mut Fixture, bufs: &[Buf], len: u32) {
        f.driver.add_chain(bufs).expect("chain");
        f.driver.publish().expect("publish");
        let mut c = Chain::new();
        with_queue(f, |q| {
            let mut q = q.expect("queue serving");
            assert!(q.pop(&mut c).expect("pop"));
            q.add_used(c.head(), len).expect("used");
        });
    }

    #[test]
    fn test_completion_logs_written_bytes_and_used_ring_at_their_guest_pages() {
        let mut f = fixture(true);
        let (bitmap, _log) = logged(&f);
        let used_gpa = RING_GPA + (f.driver.used_addr() - RING_IOVA);
        // Two writable buffers; the device says it wrote 0x1900 bytes: all
        // of the first (pages 0 and 1) and 0x100 of the second (page 3).
        complete_one(
            &mut f,
            &[
                Buf {
                    addr: BUF_IOVA + 0x10,
                    len: 0x17f0,
                    writable: true,
                },
                Buf {
                    addr: BUF_IOVA + 0x3000,
                    len: 0x800,
                    writable: true,
                },
            ],
            0x1900,
        );
        let mut want = vec![BUF_GPA, BUF_GPA + 0x1000, BUF_GPA + 0x3000];
        let used_last = used_gpa + 4 + 8 * 16 - 1;
        let mut p = used_gpa & !(LOG_PAGE - 1);
        while p <= used_last {
            want.push(p);
            p += LOG_PAGE;
        }
        want.sort_unstable();
        assert_eq!(pages(&bitmap), want);
    }

    #[test]
    fn test_readable_buffers_are_not_logged_and_logging_off_logs_nothing() {
        let mut f = fixture(true);
        let read_only = [Buf {
            addr: BUF_IOVA,
            len: 0x100,
            writable: false,
        }];
        // Off: no log on the ring, nothing anywhere.
        complete_one(&mut f, &read_only, 0);
        let (bitmap, _log) = logged(&f);
        complete_one(&mut f, &read_only, 0);
        assert!(
            pages(&bitmap).iter().all(|&p| p >= RING_GPA),
            "only the used ring: {:x?}",
            pages(&bitmap)
        );
        assert!(!pages(&bitmap).is_empty(), "the used ring is logged");
    }
}
