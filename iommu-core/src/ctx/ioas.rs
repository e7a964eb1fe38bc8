//! IOAS operations (iommufd's `ioas.c`): alloc, map, unmap, the
//! framework's exact-range cut, copy between IOASes, the IOVA range lists
//! and the huge-pages option. The area tree itself is `crate::ioas`.

use std::sync::Arc;

use super::{Iommu, Object};
use crate::error::{Error, Result};
use crate::ioas::{range_of, Area, IoasInner, IoasState, ResvOwner};
use crate::memory::Memory;
use crate::sync::InvalidationTicket;
use crate::types::*;

/// Most areas one IOAS holds; a map past it fails with `ENOSPC` (iommufd
/// bounds this through memory accounting instead).
pub const MAX_AREAS_PER_IOAS: usize = 1 << 22;

fn check_map_perm(perm: Perm) -> Result<()> {
    if perm.bits() & !Perm::RW.bits() != 0 {
        return Err(Error::NotSupported {
            what: "map permission bits other than read and write",
        });
    }
    Ok(())
}

fn need_rw(perm: Perm) -> Result<()> {
    if perm.is_empty() {
        return Err(Error::Invalid {
            what: "a mapping needs read or write permission",
        });
    }
    Ok(())
}

impl Iommu {
    /// `IOMMU_IOAS_ALLOC`.
    pub fn ioas_alloc(&self) -> Result<IoasId> {
        let mut st = self.lock();
        let id = st.alloc_id()?;
        st.objects.insert(id, Object::Ioas(IoasInner::new(id)));
        Ok(id)
    }

    fn ioas_arc(&self, id: IoasId) -> Result<Arc<IoasInner>> {
        self.lock().ioas(id).cloned()
    }

    /// `IOMMU_IOAS_MAP` / `MAP_FILE`: maps `len` bytes of `mem` from
    /// `mem_offset` at the fixed `iova` or an allocated one; returns the IOVA.
    ///
    /// Checked in iommufd's order: permission bits other than R/W →
    /// `EOPNOTSUPP`; `iova` or `len` equal to `u64::MAX` → `EOVERFLOW`; no R/W
    /// → `EINVAL`; unknown IOAS → `ENOENT`; zero length, a range outside
    /// `mem`, or `iova`/`len`/host address not aligned to the IOAS alignment
    /// → `EINVAL`; then allocation (`ENOSPC`) or, for a fixed IOVA, overflow
    /// (`EOVERFLOW`), reserved (`EINVAL`), overlap (`EEXIST`).
    pub fn ioas_map(
        &self,
        ioas: IoasId,
        mem: &Arc<Memory>,
        mem_offset: u64,
        len: u64,
        iova: Option<u64>,
        perm: Perm,
    ) -> Result<u64> {
        check_map_perm(perm)?;
        if iova == Some(u64::MAX) || len == u64::MAX {
            return Err(Error::Overflow {
                start: iova.unwrap_or(0),
                length: len,
            });
        }
        need_rw(perm)?;
        let ioas = self.ioas_arc(ioas)?;
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        let end = mem_offset.checked_add(len).ok_or(Error::Overflow {
            start: mem_offset,
            length: len,
        })?;
        if end > mem.len() as u64 {
            return Err(Error::OutOfBounds {
                offset: mem_offset,
                length: len,
                size: mem.len() as u64,
            });
        }
        let host = (mem.as_ptr() as u64).wrapping_add(mem_offset);
        let mut st = ioas.write();
        let align = st.alignment();
        if len % align != 0 {
            return Err(Error::Misaligned { value: len, align });
        }
        if host % align != 0 {
            return Err(Error::Misaligned { value: host, align });
        }
        if st.areas.len() >= MAX_AREAS_PER_IOAS {
            return Err(Error::NoSpace { length: len });
        }
        let start = match iova {
            Some(i) => st.check_fixed(i, len, align)?.start,
            None => st.alloc_iova(host, len, align)?,
        };
        st.areas.insert(
            start,
            Area {
                last: start + (len - 1),
                mem: mem.clone(),
                mem_off: mem_offset,
                perm,
                pages_writable: perm.contains(Perm::WRITE),
            },
        );
        Ok(start)
    }

    /// `IOMMU_IOAS_UNMAP`: removes the whole areas inside the range (iova 0
    /// and length `u64::MAX`: all) and returns the bytes unmapped, once no
    /// device can use them any more.
    pub fn ioas_unmap(&self, ioas: IoasId, iova: u64, len: u64) -> Result<u64> {
        let (n, t) = self.ioas_unmap_begin(ioas, iova, len)?;
        t.wait();
        Ok(n)
    }

    /// Two-phase [`Iommu::ioas_unmap`]. Errors: zero length → `EINVAL`;
    /// overflow → `EOVERFLOW`; unknown IOAS, nothing mapped, or an area only
    /// partly covered → `ENOENT` (nothing is removed then).
    pub fn ioas_unmap_begin(
        &self,
        ioas: IoasId,
        iova: u64,
        len: u64,
    ) -> Result<(u64, InvalidationTicket)> {
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        let all = iova == 0 && len == u64::MAX;
        let r = if all {
            IovaRange::new(0, u64::MAX)
        } else {
            range_of(iova, len)?
        };
        self.remove_begin(ioas, |st| st.unmap(r, all))
    }

    /// The first phase of a removal from an IOAS: `remove` takes areas out
    /// under the IOAS lock, and every translator that may hold a
    /// translation of the IOAS is invalidated before the lock is released
    /// (nothing to invalidate when nothing was removed).
    fn remove_begin(
        &self,
        ioas: IoasId,
        remove: impl FnOnce(&mut IoasState) -> Result<(u64, Vec<Area>)>,
    ) -> Result<(u64, InvalidationTicket)> {
        let ioas = self.ioas_arc(ioas)?;
        let (bytes, removed, ticket) = {
            let mut st = ioas.write();
            let (bytes, removed) = remove(&mut st)?;
            if removed.is_empty() {
                return Ok((bytes, InvalidationTicket::done()));
            }
            st.departed.prune();
            (bytes, removed, st.invalidate_all())
        };
        // Dropped after the lock: a translator's cache may still hold the
        // memory until its section ends.
        drop(removed);
        Ok((bytes, ticket))
    }

    /// Removes exactly `[iova, iova + len)` from the IOAS: an area that
    /// straddles an end of the range is split there first, atomically (under
    /// the IOAS lock), so the parts outside the range stay mapped throughout
    /// and a device using them never sees them missing. Returns the bytes
    /// removed (0, with a done ticket, when nothing was mapped in the range)
    /// once no device can use them any more.
    ///
    /// Not an iommufd operation: `IOMMU_IOAS_UNMAP` removes whole areas only
    /// ([`Iommu::ioas_unmap`]), and a userspace `/dev/iommu` service must
    /// keep that rule. This is for an owner of the IOAS whose own protocol
    /// unmaps arbitrary ranges (a vhost-user IOTLB invalidation).
    /// Errors: zero length → `EINVAL`; overflow → `EOVERFLOW`; unknown IOAS
    /// → `ENOENT`; an end not aligned to the IOAS alignment → `EINVAL`; a
    /// split past [`MAX_AREAS_PER_IOAS`] → `ENOSPC`.
    pub fn ioas_cut(&self, ioas: IoasId, iova: u64, len: u64) -> Result<u64> {
        let (n, t) = self.ioas_cut_begin(ioas, iova, len)?;
        t.wait();
        Ok(n)
    }

    /// Two-phase [`Iommu::ioas_cut`].
    pub fn ioas_cut_begin(
        &self,
        ioas: IoasId,
        iova: u64,
        len: u64,
    ) -> Result<(u64, InvalidationTicket)> {
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        let r = range_of(iova, len)?;
        self.remove_begin(ioas, |st| st.cut(r, MAX_AREAS_PER_IOAS))
    }

    /// `IOMMU_IOAS_COPY`: maps the pages behind `src`'s range (any range
    /// covered by areas without gaps) into `dst` at a fixed or allocated
    /// IOVA, sharing the same memory; returns the destination IOVA.
    /// WRITE on pages first mapped read-only → `EPERM`.
    pub fn ioas_copy(
        &self,
        dst: IoasId,
        src: IoasId,
        src_iova: u64,
        len: u64,
        dst_iova: Option<u64>,
        perm: Perm,
    ) -> Result<u64> {
        check_map_perm(perm)?;
        if len == u64::MAX || dst_iova == Some(u64::MAX) {
            return Err(Error::Overflow {
                start: src_iova,
                length: len,
            });
        }
        need_rw(perm)?;
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        let r = range_of(src_iova, len)?;
        let (src, dst) = {
            let st = self.lock();
            (st.ioas(src)?.clone(), st.ioas(dst)?.clone())
        };
        let pieces = src.read().pieces(r)?;
        if perm.contains(Perm::WRITE) {
            if let Some((at, _)) = pieces.iter().find(|(_, a)| !a.pages_writable) {
                return Err(Error::ReadOnlyPages { iova: *at });
            }
        }
        let mut st = dst.write();
        let align = st.alignment();
        if len % align != 0 {
            return Err(Error::Misaligned { value: len, align });
        }
        for (_, a) in &pieces {
            if a.host_addr() % align != 0 {
                return Err(Error::Misaligned {
                    value: a.host_addr(),
                    align,
                });
            }
        }
        if st.areas.len().saturating_add(pieces.len()) > MAX_AREAS_PER_IOAS {
            return Err(Error::NoSpace { length: len });
        }
        let host = pieces.first().map(|(_, a)| a.host_addr()).unwrap_or(0);
        let start = match dst_iova {
            Some(i) => st.check_fixed(i, len, align)?.start,
            None => st.alloc_iova(host, len, align)?,
        };
        for (at, a) in pieces {
            let off = at - src_iova;
            let piece_len = a.last - at;
            let new_start = start + off;
            st.areas.insert(
                new_start,
                Area {
                    last: new_start + piece_len,
                    mem: a.mem,
                    mem_off: a.mem_off,
                    perm,
                    pages_writable: a.pages_writable,
                },
            );
        }
        Ok(start)
    }

    /// `IOMMU_IOAS_IOVA_RANGES`.
    pub fn ioas_iova_ranges(&self, ioas: IoasId) -> Result<IovaRanges> {
        Ok(self.ioas_arc(ioas)?.read().iova_ranges())
    }

    /// `IOMMU_IOAS_ALLOW_IOVAS`: replaces the allowed list (empty: clear).
    /// `start >= last` or overlapping ranges → `EINVAL`; a range over a
    /// reservation → `EADDRINUSE`.
    pub fn ioas_allow_iovas(&self, ioas: IoasId, ranges: &[IovaRange]) -> Result<()> {
        self.ioas_arc(ioas)?.write().set_allowed(ranges)
    }

    /// Adds a user reservation (the selftests' `ADD_RESERVED`): over an area
    /// or inside the allowed list → `EADDRINUSE`.
    pub fn ioas_add_reserved(&self, ioas: IoasId, range: IovaRange) -> Result<()> {
        self.ioas_arc(ioas)?
            .write()
            .reserve(&[range], ResvOwner::User)
    }

    /// `IOMMU_OPTION_HUGE_PAGES` SET: `false` forces `PAGE_SIZE` alignment
    /// on the IOAS; existing areas that are not aligned → `EADDRINUSE`.
    pub fn ioas_set_huge_pages(&self, ioas: IoasId, enable: bool) -> Result<()> {
        let ioas = self.ioas_arc(ioas)?;
        let mut st = ioas.write();
        if !enable {
            let align = st.alignment().max(PAGE_SIZE);
            if let Some(r) = st.misaligned_area(align) {
                return Err(Error::AddressInUse {
                    start: r.start,
                    last: r.last,
                });
            }
        }
        st.huge_pages = enable;
        Ok(())
    }

    /// `IOMMU_OPTION_HUGE_PAGES` GET.
    pub fn ioas_huge_pages(&self, ioas: IoasId) -> Result<bool> {
        Ok(self.ioas_arc(ioas)?.read().huge_pages)
    }

    /// The areas of an IOAS, ascending.
    pub fn ioas_areas(&self, ioas: IoasId) -> Result<Vec<AreaInfo>> {
        Ok(self.ioas_arc(ioas)?.read().area_infos())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_setup as setup;
    use super::*;
    use crate::translate::Fragment;

    #[test]
    fn test_map_attach_translate_unmap() {
        let (iommu, dev, dev_id, ioas, mem) = setup();
        let iova = iommu
            .ioas_map(ioas, &mem, 0, 64 << 10, Some(0x10000), Perm::RW)
            .expect("map");
        assert_eq!(iova, 0x10000);
        let hwpt = iommu.attach(dev_id, None, ioas).expect("attach");
        assert_eq!(
            iommu.object_kind(hwpt),
            Ok(ObjectKind::HwptPaging { auto: true })
        );
        let mut t = dev.translator();
        t.write(None, 0x10ffe, b"abcd").expect("write");
        let mut b = [0u8; 4];
        mem.read_at(0xffe, &mut b).expect("read");
        assert_eq!(&b, b"abcd");
        let mut out: Vec<Fragment> = Vec::new();
        {
            let mut a = t.access();
            a.translate(None, 0x10000, 0x2000, Perm::READ, &mut out)
                .expect("translate");
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].ptr, mem.as_ptr());
        assert!(t.cached_translations() > 0);
        assert_eq!(iommu.ioas_unmap(ioas, 0x10000, 64 << 10), Ok(64 << 10));
        assert_eq!(t.cached_translations(), 0);
        assert_eq!(
            t.read(None, 0x10000, &mut b),
            Err(Error::Unmapped {
                pasid: None,
                iova: 0x10000
            })
        );
        iommu.detach(dev_id, None).expect("detach");
        // The auto HWPT went away with its last user.
        assert!(iommu.object_kind(hwpt).is_err());
        iommu.destroy(ioas).expect("destroy");
    }

    #[test]
    fn test_fragments_across_areas() {
        let (iommu, dev, dev_id, ioas, mem) = setup();
        iommu
            .ioas_map(ioas, &mem, 0x8000, 0x1000, Some(0x1000), Perm::RW)
            .expect("map");
        iommu
            .ioas_map(ioas, &mem, 0x0, 0x1000, Some(0x2000), Perm::RW)
            .expect("map");
        iommu.attach(dev_id, None, ioas).expect("attach");
        let mut t = dev.translator();
        let mut out = Vec::new();
        t.access()
            .translate(None, 0x1800, 0x1000, Perm::READ, &mut out)
            .expect("translate");
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len, 0x800);
        assert_eq!(out[1].ptr, mem.as_ptr());
        t.write(None, 0x1fff, b"xy").expect("write across");
        let mut b = [0u8; 1];
        mem.read_at(0x8fff, &mut b).expect("read");
        assert_eq!(b[0], b'x');
        mem.read_at(0, &mut b).expect("read");
        assert_eq!(b[0], b'y');
    }
}
