//! Dirty tracking of paging HWPTs (iommufd's
//! `IOMMU_HWPT_SET_DIRTY_TRACKING` and `IOMMU_HWPT_GET_DIRTY_BITMAP`):
//! switching it on or off and reading (and clearing) the bitmap without
//! losing a write that races with the clear. Translators mark the pages
//! (`crate::device::DirtyState`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{no_such, Iommu, Object};
use crate::device::DirtyState;
use crate::error::{Error, Result};
use crate::ioas::{range_of, IoasInner};
use crate::sync::lock;
use crate::types::*;

/// Most bits one dirty bitmap query returns (a 32 MiB bitmap).
pub const MAX_DIRTY_BITMAP_BITS: u64 = 1 << 28;

impl Iommu {
    /// The dirty state and IOAS of a paging HWPT with dirty tracking.
    fn dirty_of(&self, hwpt: HwptId) -> Result<(Arc<DirtyState>, Arc<IoasInner>)> {
        match self.lock().objects.get(&hwpt) {
            Some(Object::Hwpt(h)) if h.nested.is_none() => match &h.domain.dirty {
                Some(d) => Ok((d.clone(), h.domain.s2.clone())),
                None => Err(Error::NotSupported {
                    what: "the HWPT was not allocated with dirty tracking",
                }),
            },
            _ => Err(no_such("paging HWPT", hwpt)),
        }
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING`. Only paging HWPTs allocated with
    /// `DIRTY_TRACKING` (else `EOPNOTSUPP`); other ids → `ENOENT`. Enabling
    /// clears stale dirty state. Returns once every device of the IOAS
    /// translates under the new mode.
    pub fn hwpt_set_dirty_tracking(&self, hwpt: HwptId, enable: bool) -> Result<()> {
        let (d, s2) = self.dirty_of(hwpt)?;
        if enable {
            lock(&d.pages).clear();
        }
        d.enabled.store(enable, Ordering::SeqCst);
        let ticket = s2.read().invalidate_all();
        ticket.wait();
        Ok(())
    }

    /// Whether dirty tracking is enabled on a paging HWPT.
    pub fn hwpt_dirty_tracking(&self, hwpt: HwptId) -> Result<bool> {
        Ok(self.dirty_of(hwpt)?.0.enabled.load(Ordering::SeqCst))
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP`: bit `n` of the result (word `n / 64`,
    /// bit `n % 64`) is set when the page `[iova + n * page_size, +page_size)`
    /// was written by a device since the last clear. Unless `no_clear`, the
    /// range is cleared, and the call returns once no device can still
    /// write through a translation cached before the clear (writes that
    /// raced with the clear are reported now as well).
    ///
    /// Errors: `page_size` zero or not a power of two, `iova`/`length` not
    /// multiples of it or of the IOAS alignment, zero length, or a bitmap
    /// above [`MAX_DIRTY_BITMAP_BITS`] → `EINVAL`; overflow → `EOVERFLOW`; a
    /// HWPT without dirty tracking → `EOPNOTSUPP`.
    pub fn hwpt_get_dirty_bitmap(
        &self,
        hwpt: HwptId,
        iova: u64,
        length: u64,
        page_size: u64,
        no_clear: bool,
    ) -> Result<Vec<u64>> {
        let (d, s2) = self.dirty_of(hwpt)?;
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(Error::Invalid {
                what: "dirty bitmap page size must be a power of two",
            });
        }
        if length == 0 {
            return Err(Error::ZeroLength);
        }
        let r = range_of(iova, length)?;
        let align = s2.read().alignment().max(page_size);
        for v in [iova, length] {
            if v % align != 0 {
                return Err(Error::Misaligned { value: v, align });
            }
        }
        let bits = length / page_size;
        if bits > MAX_DIRTY_BITMAP_BITS {
            return Err(Error::Invalid {
                what: "dirty bitmap too large",
            });
        }
        let first = r.start / PAGE_SIZE;
        let last = r.last / PAGE_SIZE;
        let mut bitmap = vec![0u64; bits.div_ceil(64) as usize];
        // A dirty page sets every bit it covers inside the range (iommufd's
        // `iova_bitmap_set` over the whole dirty IOPTE): several when
        // `page_size` is below the page size.
        let mut set = |page: u64| {
            let lo = (page * PAGE_SIZE).max(r.start) - iova;
            let hi = (page * PAGE_SIZE + (PAGE_SIZE - 1)).min(r.last) - iova;
            for bit in lo / page_size..=hi / page_size {
                if let Some(w) = bitmap.get_mut((bit / 64) as usize) {
                    *w |= 1 << (bit % 64);
                }
            }
        };
        if no_clear {
            for p in lock(&d.pages).range(first..=last) {
                set(*p);
            }
            return Ok(bitmap);
        }
        // Take the range out, make every device drop its cached writable
        // translations, then report what was taken plus what was marked in
        // the meantime (left marked for the next round).
        let taken: Vec<u64> = {
            let mut pages = lock(&d.pages);
            let taken: Vec<u64> = pages.range(first..=last).copied().collect();
            for p in &taken {
                pages.remove(p);
            }
            taken
        };
        let ticket = s2.read().invalidate_all();
        ticket.wait();
        for p in taken {
            set(p);
        }
        for p in lock(&d.pages).range(first..=last) {
            set(*p);
        }
        Ok(bitmap)
    }
}
