//! IOAS internals: the area tree, reservations, allowed ranges and IOVA
//! allocation. The public operations live on [`Iommu`](crate::Iommu).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::device::DeviceShared;
use crate::error::{Error, Result};
use crate::memory::Memory;
use crate::prim::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use crate::sync::{Departed, InvalidationTicket, Slot};
use crate::types::{AreaInfo, DevId, IoasId, IovaRange, IovaRanges, Perm, PAGE_SIZE};

/// Largest alignment automatic IOVA allocation asks for (a THP).
const MAX_AUTO_ALIGN: u64 = 2 << 20;

/// One mapping: `[start, last]` (the key holds `start`) → `mem[mem_off..]`.
#[derive(Clone)]
pub(crate) struct Area {
    pub(crate) last: u64,
    pub(crate) mem: Arc<Memory>,
    pub(crate) mem_off: u64,
    pub(crate) perm: Perm,
    /// The pages were first mapped writable (copy may ask for WRITE).
    pub(crate) pages_writable: bool,
}

impl Area {
    pub(crate) fn host_addr(&self) -> u64 {
        (self.mem.as_ptr() as u64).wrapping_add(self.mem_off)
    }
}

/// Who added a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResvOwner {
    User,
    Device(DevId),
}

pub(crate) struct IoasState {
    pub(crate) areas: BTreeMap<u64, Area>,
    pub(crate) reserved: Vec<(IovaRange, ResvOwner)>,
    pub(crate) allowed: Vec<IovaRange>,
    /// Devices attached through a domain over this IOAS, with the number of
    /// their attachments (RID and PASIDs).
    pub(crate) users: HashMap<DevId, (usize, Arc<DeviceShared>)>,
    /// Translators of devices that left (detach, replace, unbind) while
    /// inside an access section: an unmap waits for them like for users.
    pub(crate) departed: Departed,
    /// `IOMMU_OPTION_HUGE_PAGES`: when false the alignment is at least
    /// `PAGE_SIZE`.
    pub(crate) huge_pages: bool,
    hint: u64,
    /// Page sizes of the paging HWPTs allocated over this IOAS, attached or
    /// not (iommufd's domains of the `io_pagetable`): they count in the
    /// alignment from allocation to destroy.
    pub(crate) domains: BTreeMap<crate::types::HwptId, u64>,
}

pub(crate) struct IoasInner {
    pub(crate) id: IoasId,
    state: RwLock<IoasState>,
}

impl IoasInner {
    pub(crate) fn new(id: IoasId) -> Arc<IoasInner> {
        Arc::new(IoasInner {
            id,
            state: RwLock::new(IoasState {
                areas: BTreeMap::new(),
                reserved: Vec::new(),
                allowed: Vec::new(),
                users: HashMap::new(),
                departed: Departed::default(),
                huge_pages: true,
                hint: PAGE_SIZE,
                domains: BTreeMap::new(),
            }),
        })
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, IoasState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, IoasState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// `[start, start + len - 1]`, or `EOVERFLOW`.
pub(crate) fn range_of(start: u64, len: u64) -> Result<IovaRange> {
    let last = start
        .checked_add(len - 1)
        .ok_or(Error::Overflow { start, length: len })?;
    Ok(IovaRange::new(start, last))
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    let m = a - 1;
    x.checked_add(m).map(|v| v & !m)
}

impl IoasState {
    /// The area containing `iova`.
    #[inline]
    pub(crate) fn lookup(&self, iova: u64) -> Option<(u64, &Area)> {
        let (s, a) = self.areas.range(..=iova).next_back()?;
        (iova <= a.last).then_some((*s, a))
    }

    /// The first area (lowest start) intersecting `r`, with its start.
    pub(crate) fn first_area_in(&self, r: IovaRange) -> Option<(u64, &Area)> {
        if let Some((s, a)) = self.areas.range(..=r.start).next_back() {
            if a.last >= r.start {
                return Some((*s, a));
            }
        }
        self.areas
            .range(r.start..=r.last)
            .next()
            .map(|(s, a)| (*s, a))
    }

    fn last_area_in(&self, r: IovaRange) -> Option<(u64, &Area)> {
        let (s, a) = self.areas.range(..=r.last).next_back()?;
        (a.last >= r.start).then_some((*s, a))
    }

    pub(crate) fn reserved_hit(&self, r: IovaRange) -> Option<IovaRange> {
        self.reserved
            .iter()
            .filter(|(x, _)| x.intersects(&r))
            .map(|(x, _)| *x)
            .max_by_key(|x| x.last)
    }

    /// `out_iova_alignment`: the largest page size of the attached devices
    /// and of the paging HWPTs over this IOAS.
    pub(crate) fn alignment(&self) -> u64 {
        let devs = self
            .users
            .values()
            .map(|(_, d)| d.info.min_page_size())
            .chain(self.domains.values().copied())
            .max()
            .unwrap_or(1);
        if self.huge_pages {
            devs
        } else {
            devs.max(PAGE_SIZE)
        }
    }

    pub(crate) fn user_slots(&self) -> Vec<Arc<Slot>> {
        let mut v = Vec::new();
        for (_, d) in self.users.values() {
            d.collect_slots(&mut v);
        }
        v
    }

    /// Invalidates every translator that may hold a translation of this
    /// IOAS: the users' (their caches are dropped) and the sections of
    /// departed translators that are still open. The caller holds the IOAS
    /// lock, so no device can join or leave in between.
    pub(crate) fn invalidate_all(&self) -> InvalidationTicket {
        let mut t = crate::sync::invalidate_slots(&self.user_slots());
        t.merge(self.departed.pending());
        t
    }

    pub(crate) fn iova_ranges(&self) -> IovaRanges {
        let mut resv: Vec<IovaRange> = self.reserved.iter().map(|(r, _)| *r).collect();
        resv.sort();
        let mut ranges = Vec::new();
        let mut next: Option<u64> = Some(0);
        for r in resv {
            let Some(n) = next else { break };
            if r.start > n {
                ranges.push(IovaRange::new(n, r.start - 1));
            }
            if r.last >= n {
                next = r.last.checked_add(1);
            }
        }
        if let Some(n) = next {
            ranges.push(IovaRange::new(n, u64::MAX));
        }
        IovaRanges {
            ranges,
            alignment: self.alignment(),
        }
    }

    /// Checks a fixed range as `iopt_check_iova` does.
    pub(crate) fn check_fixed(&self, iova: u64, len: u64, align: u64) -> Result<IovaRange> {
        if iova % align != 0 {
            return Err(Error::Misaligned { value: iova, align });
        }
        let r = range_of(iova, len)?;
        if self.reserved_hit(r).is_some() {
            return Err(Error::ReservedIova { iova, length: len });
        }
        if self.first_area_in(r).is_some() {
            return Err(Error::Exists { iova, length: len });
        }
        Ok(r)
    }

    /// Automatic IOVA allocation as `iopt_alloc_iova` does it.
    pub(crate) fn alloc_iova(&mut self, host_addr: u64, len: u64, ioas_align: u64) -> Result<u64> {
        let mut align = len.checked_next_power_of_two().unwrap_or(1 << 63);
        if host_addr != 0 {
            align = align.min(1u64 << host_addr.trailing_zeros());
        }
        align = align.min(MAX_AUTO_ALIGN);
        if align < ioas_align {
            return Err(Error::Misaligned {
                value: host_addr,
                align: ioas_align,
            });
        }
        let page_off = host_addr % PAGE_SIZE;
        let windows: Vec<IovaRange> = if self.allowed.is_empty() {
            vec![IovaRange::new(PAGE_SIZE, u64::MAX - PAGE_SIZE)]
        } else {
            self.allowed.clone()
        };
        let hint = self.hint;
        // Next fit from the hint, then from the start of every window.
        for from in [hint, 0] {
            for w in &windows {
                if w.last < from {
                    continue;
                }
                let lo = w.start.max(from);
                if let Some(iova) = self.search(*w, lo, len, align, page_off) {
                    self.hint = iova.saturating_add(len);
                    return Ok(iova);
                }
            }
        }
        Err(Error::NoSpace { length: len })
    }

    fn search(&self, w: IovaRange, lo: u64, len: u64, align: u64, page_off: u64) -> Option<u64> {
        let cand = |x: u64| -> Option<u64> {
            if align >= PAGE_SIZE {
                align_up(x, align)
            } else {
                let base = (x & !(PAGE_SIZE - 1)).checked_add(page_off)?;
                if base >= x {
                    Some(base)
                } else {
                    base.checked_add(PAGE_SIZE)
                }
            }
        };
        let mut c = cand(lo)?;
        // Each step skips past one conflicting area or reservation.
        loop {
            let last = c.checked_add(len - 1)?;
            if c < w.start || last > w.last {
                return None;
            }
            let r = IovaRange::new(c, last);
            let mut skip = None;
            if let Some((_, a)) = self.last_area_in(r) {
                skip = Some(a.last);
            }
            if let Some(x) = self.reserved_hit(r) {
                skip = Some(skip.map_or(x.last, |s: u64| s.max(x.last)));
            }
            match skip {
                None => return Some(c),
                Some(s) => c = cand(s.checked_add(1)?)?,
            }
        }
    }

    /// Adds reservations for `owner`, all or nothing (`EADDRINUSE` on a
    /// conflict with areas or the allowed list).
    pub(crate) fn reserve(&mut self, ranges: &[IovaRange], owner: ResvOwner) -> Result<()> {
        for r in ranges {
            if r.start > r.last {
                return Err(Error::Invalid {
                    what: "reserved range with start > last",
                });
            }
            if self.first_area_in(*r).is_some() || self.allowed.iter().any(|a| a.intersects(r)) {
                return Err(Error::AddressInUse {
                    start: r.start,
                    last: r.last,
                });
            }
        }
        for r in ranges {
            self.reserved.push((*r, owner));
        }
        Ok(())
    }

    /// Removes one copy of each of `ranges` reserved by `owner` (a device
    /// attached twice to the same IOAS, e.g. during a replace, holds two).
    pub(crate) fn unreserve(&mut self, ranges: &[IovaRange], owner: ResvOwner) {
        for r in ranges {
            if let Some(i) = self
                .reserved
                .iter()
                .position(|(x, o)| x == r && *o == owner)
            {
                self.reserved.swap_remove(i);
            }
        }
    }

    pub(crate) fn set_allowed(&mut self, ranges: &[IovaRange]) -> Result<()> {
        let mut sorted = ranges.to_vec();
        sorted.sort();
        for r in &sorted {
            if r.start >= r.last {
                return Err(Error::Invalid {
                    what: "allowed range needs start < last",
                });
            }
        }
        for w in sorted.windows(2) {
            if w[0].intersects(&w[1]) {
                return Err(Error::Invalid {
                    what: "allowed ranges overlap",
                });
            }
        }
        for r in &sorted {
            if let Some(x) = self.reserved_hit(*r) {
                return Err(Error::AddressInUse {
                    start: x.start,
                    last: x.last,
                });
            }
        }
        self.allowed = sorted;
        Ok(())
    }

    /// Areas not aligned to `align` (start, length or host address).
    pub(crate) fn misaligned_area(&self, align: u64) -> Option<IovaRange> {
        if align <= 1 {
            return None;
        }
        self.areas
            .iter()
            .find(|(s, a)| {
                let len = a.last - **s + 1;
                **s % align != 0 || len % align != 0 || a.host_addr() % align != 0
            })
            .map(|(s, a)| IovaRange::new(*s, a.last))
    }

    /// Removes the whole areas inside `r` (atomically: a partial cover
    /// removes nothing); returns the bytes and the removed areas.
    pub(crate) fn unmap(&mut self, r: IovaRange, all: bool) -> Result<(u64, Vec<Area>)> {
        let keys: Vec<u64> = if all {
            self.areas.keys().copied().collect()
        } else {
            let mut keys = Vec::new();
            if let Some((s, a)) = self.areas.range(..r.start).next_back() {
                if a.last >= r.start {
                    let _ = s;
                    return Err(Error::NotMapped {
                        iova: r.start,
                        length: r.last - r.start + 1,
                    });
                }
            }
            for (s, a) in self.areas.range(r.start..=r.last) {
                if a.last > r.last {
                    return Err(Error::NotMapped {
                        iova: r.start,
                        length: r.last.wrapping_sub(r.start).wrapping_add(1),
                    });
                }
                keys.push(*s);
            }
            if keys.is_empty() {
                return Err(Error::NotMapped {
                    iova: r.start,
                    length: r.last.wrapping_sub(r.start).wrapping_add(1),
                });
            }
            keys
        };
        Ok(self.remove_areas(keys))
    }

    /// Removes the areas starting at `keys`; returns their bytes and them.
    fn remove_areas(&mut self, keys: Vec<u64>) -> (u64, Vec<Area>) {
        let mut bytes = 0u64;
        let mut removed = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(a) = self.areas.remove(&k) {
                bytes = bytes.wrapping_add(a.last - k + 1);
                removed.push(a);
            }
        }
        (bytes, removed)
    }

    /// Splits the area that holds `at` strictly inside it into two areas
    /// at `at` (same memory and permission); a no-op when `at` starts an
    /// area or lies outside every area. The caller checked the alignment.
    fn split_at(&mut self, at: u64) {
        let Some((s, a)) = self.areas.range(..at).next_back() else {
            return;
        };
        if a.last < at {
            return;
        }
        let (s, mut left) = (*s, a.clone());
        let right = Area {
            last: left.last,
            mem: left.mem.clone(),
            mem_off: left.mem_off + (at - s),
            perm: left.perm,
            pages_writable: left.pages_writable,
        };
        left.last = at - 1;
        self.areas.insert(s, left);
        self.areas.insert(at, right);
    }

    /// Removes exactly `r`: areas that straddle its ends are split first,
    /// under the same lock, so the parts outside `r` stay mapped throughout.
    /// Returns the bytes removed (0 when nothing was mapped there) and the
    /// removed areas. `r`'s ends must be aligned to the IOAS alignment.
    pub(crate) fn cut(&mut self, r: IovaRange, max_areas: usize) -> Result<(u64, Vec<Area>)> {
        let align = self.alignment();
        let end = r.last.checked_add(1);
        for v in [Some(r.start), end].into_iter().flatten() {
            if v % align != 0 {
                return Err(Error::Misaligned { value: v, align });
            }
        }
        let straddles = |at: u64| {
            self.areas
                .range(..at)
                .next_back()
                .is_some_and(|(_, a)| a.last >= at)
        };
        let new_areas =
            usize::from(straddles(r.start)) + end.map_or(0, |e| usize::from(straddles(e)));
        if self.areas.len() + new_areas > max_areas {
            return Err(Error::NoSpace {
                length: r.last - r.start + 1,
            });
        }
        self.split_at(r.start);
        if let Some(e) = end {
            self.split_at(e);
        }
        let keys: Vec<u64> = self
            .areas
            .range(r.start..=r.last)
            .map(|(k, _)| *k)
            .collect();
        Ok(self.remove_areas(keys))
    }

    /// The areas covering `r` without gaps, cut to `r`: `(iova, area)` with
    /// the area narrowed to the piece.
    pub(crate) fn pieces(&self, r: IovaRange) -> Result<Vec<(u64, Area)>> {
        let missing = Error::NotMapped {
            iova: r.start,
            length: r.last - r.start + 1,
        };
        let mut out = Vec::new();
        let mut at = r.start;
        loop {
            let Some((s, a)) = self.lookup(at) else {
                return Err(missing);
            };
            let end = a.last.min(r.last);
            let mut piece = a.clone();
            piece.mem_off = a.mem_off + (at - s);
            piece.last = end;
            out.push((at, piece));
            if end == r.last {
                return Ok(out);
            }
            at = end + 1;
        }
    }

    pub(crate) fn area_infos(&self) -> Vec<AreaInfo> {
        self.areas
            .iter()
            .map(|(s, a)| AreaInfo {
                iova: *s,
                length: a.last - *s + 1,
                perm: a.perm,
                mem_offset: a.mem_off,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(mem: &Arc<Memory>, last: u64) -> Area {
        Area {
            last,
            mem: mem.clone(),
            mem_off: 0,
            perm: Perm::RW,
            pages_writable: true,
        }
    }

    #[test]
    fn test_alloc_skips_areas_and_reservations() {
        let ioas = IoasInner::new(1);
        let mem = Memory::anonymous("t", 1 << 16).expect("mem");
        let mut st = ioas.write();
        st.areas.insert(PAGE_SIZE, area(&mem, 2 * PAGE_SIZE - 1));
        st.reserved.push((
            IovaRange::new(2 * PAGE_SIZE, 3 * PAGE_SIZE - 1),
            ResvOwner::User,
        ));
        let host = mem.as_ptr() as u64;
        assert_eq!(st.alloc_iova(host, PAGE_SIZE, 1), Ok(3 * PAGE_SIZE));
    }

    #[test]
    fn test_unmap_is_atomic_on_partial_cover() {
        let ioas = IoasInner::new(1);
        let mem = Memory::anonymous("t", 1 << 16).expect("mem");
        let mut st = ioas.write();
        st.areas.insert(0x1000, area(&mem, 0x1fff));
        st.areas.insert(0x2000, area(&mem, 0x3fff));
        let r = st.unmap(IovaRange::new(0x1000, 0x2fff), false);
        assert!(r.is_err());
        assert_eq!(st.areas.len(), 2);
    }

    #[test]
    fn test_iova_ranges_merge_overlapping_reservations() {
        let ioas = IoasInner::new(1);
        let mut st = ioas.write();
        st.reserved.push((IovaRange::new(10, 20), ResvOwner::User));
        st.reserved
            .push((IovaRange::new(15, 30), ResvOwner::Device(3)));
        st.reserved
            .push((IovaRange::new(u64::MAX - 1, u64::MAX), ResvOwner::User));
        let r = st.iova_ranges();
        assert_eq!(
            r.ranges,
            vec![IovaRange::new(0, 9), IovaRange::new(31, u64::MAX - 2)]
        );
    }
}
