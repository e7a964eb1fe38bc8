//! The frontend's memory table: regions of its memory, mapped here once.
//!
//! Each region arrives as an fd (a memfd or hugetlbfs file of QEMU or DPDK)
//! with its guest physical address, its address in the frontend's own
//! address space and its offset in the fd. The region is mapped into this
//! process as an iommu-core [`Memory`], which is what IOAS areas point at.

use std::fs::File;
use std::sync::Arc;

use iommu_core::Memory;

use super::msg::RegionDesc;
use super::{Error, Result};

/// Memory slots the backend supports (GET_MAX_MEM_SLOTS).
pub const MAX_MEM_SLOTS: usize = 32;

/// One mapped region.
#[derive(Debug, Clone)]
pub(crate) struct Region {
    pub desc: RegionDesc,
    pub mem: Arc<Memory>,
}

/// The current memory table, sorted by guest physical address.
///
/// A region added again with the same guest address, size, frontend address
/// and offset is shared, not refused: in multiqueue QEMU sends ADD_MEM_REG
/// for every region once per queue pair on the one connection, and
/// REM_MEM_REG once per pair too. The region stays mapped until its last
/// reference is removed.
#[derive(Debug, Default)]
pub(crate) struct MemTable {
    regions: Vec<Region>,
    /// References of `regions[i]`, always >= 1.
    refs: Vec<u32>,
    /// Regions (by mapping address) already reported as truncated.
    truncated_seen: Vec<usize>,
}

/// What [`MemTable::add_shared`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Added {
    /// A new region: map it into the device's address space.
    New,
    /// The same region was already in the table; one more reference was
    /// counted and the new mapping is not used.
    Shared,
}

impl MemTable {
    /// Maps a region's fd.
    pub fn map_region(desc: RegionDesc, file: File) -> Result<Region> {
        let len =
            usize::try_from(desc.size).map_err(|_| Error::RegionTooLarge { size: desc.size })?;
        let mem =
            Memory::from_memfd(file.into(), desc.offset, len).map_err(|source| Error::Mmap {
                gpa: desc.gpa,
                size: desc.size,
                source,
            })?;
        Ok(Region { desc, mem })
    }

    /// Replaces the whole table.
    /// Regions the frontend shrank under the mapping since the last call
    /// (each reported once): accesses past the file's new end were answered
    /// with zero pages instead of killing the process (iommu-core's SIGBUS
    /// guard), so the device has read zeros or lost writes there.
    pub fn newly_truncated(&mut self) -> Vec<RegionDesc> {
        // Forget regions that are gone: a new mapping may reuse the address.
        let regions = &self.regions;
        self.truncated_seen
            .retain(|k| regions.iter().any(|r| Arc::as_ptr(&r.mem) as usize == *k));
        let mut out = Vec::new();
        for r in &self.regions {
            let key = Arc::as_ptr(&r.mem) as usize;
            if r.mem.truncated() && !self.truncated_seen.contains(&key) {
                self.truncated_seen.push(key);
                out.push(r.desc);
            }
        }
        out
    }

    pub fn replace(&mut self, mut regions: Vec<Region>) {
        regions.sort_by_key(|r| r.desc.gpa);
        self.refs = vec![1; regions.len()];
        self.regions = regions;
    }

    /// Adds one region, or one more reference to an identical region (same
    /// guest address, size, frontend address and offset). A different
    /// region that overlaps an existing one is refused.
    pub fn add_shared(&mut self, region: Region) -> Result<Added> {
        if let Some(i) = self.regions.iter().position(|r| r.desc == region.desc) {
            // Bounded by the number of messages a frontend can send; a
            // saturated count only keeps the region mapped.
            self.refs[i] = self.refs[i].saturating_add(1);
            return Ok(Added::Shared);
        }
        self.check_new(&region.desc)?;
        self.insert(region);
        Ok(Added::New)
    }

    fn check_new(&self, desc: &RegionDesc) -> Result<()> {
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(Error::TooManyRegions);
        }
        if let Some(o) = self.regions.iter().find(|o| o.desc.overlaps(desc)) {
            return Err(Error::RegionOverlap {
                gpa: desc.gpa,
                existing: o.desc.gpa,
            });
        }
        Ok(())
    }

    fn insert(&mut self, region: Region) {
        let pos = self
            .regions
            .partition_point(|r| r.desc.gpa <= region.desc.gpa);
        self.regions.insert(pos, region);
        self.refs.insert(pos, 1);
    }

    fn position(&self, desc: &RegionDesc) -> Result<usize> {
        self.regions
            .iter()
            .position(|r| {
                r.desc.gpa == desc.gpa && r.desc.uaddr == desc.uaddr && r.desc.size == desc.size
            })
            .ok_or(Error::NoSuchRegion { gpa: desc.gpa })
    }

    /// Drops one reference to the region with the same guest address,
    /// frontend address and size (the offset is not compared, as the
    /// protocol says). Returns the region when that was its last
    /// reference (it is out of the table: unmap it), `None` while other
    /// references keep it.
    pub fn release(&mut self, desc: &RegionDesc) -> Result<Option<Region>> {
        let pos = self.position(desc)?;
        if self.refs[pos] > 1 {
            self.refs[pos] -= 1;
            return Ok(None);
        }
        self.refs.remove(pos);
        Ok(Some(self.regions.remove(pos)))
    }

    /// All regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Number of regions.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Converts a frontend virtual address to a guest physical address.
    pub fn va_to_gpa(&self, va: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| r.desc.uaddr <= va && va <= r.desc.uaddr_last())
            .map(|r| r.desc.gpa + (va - r.desc.uaddr))
    }

    /// The region containing frontend virtual address `va`, and the offset of
    /// `va` in it.
    pub fn find_va(&self, va: u64) -> Option<(&Region, u64)> {
        self.regions
            .iter()
            .find(|r| r.desc.uaddr <= va && va <= r.desc.uaddr_last())
            .map(|r| (r, va - r.desc.uaddr))
    }

    /// Splits the frontend virtual range `va..=va+len-1` into pieces that
    /// each lie in one region: `(region, offset in region, length)`. `None`
    /// if some part is outside every region.
    pub fn split_va(&self, va: u64, len: u64) -> Option<Vec<(Region, u64, u64)>> {
        let mut out = Vec::new();
        let mut cur = va;
        let mut left = len;
        // Each step consumes at least one byte of a distinct region.
        for _ in 0..=self.regions.len() {
            if left == 0 {
                return Some(out);
            }
            let (r, off) = self.find_va(cur)?;
            let room = r.desc.size - off;
            let n = room.min(left);
            out.push((r.clone(), off, n));
            left -= n;
            cur = cur.checked_add(n)?;
        }
        if left == 0 {
            Some(out)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_region_shrunk_by_the_frontend_is_reported_once() {
        // The frontend keeps its fd, shares the file, then shrinks it.
        let peer = Memory::anonymous("frontend", 2 * 4096).expect("memfd");
        let shared = peer.fd().expect("fd").try_clone_to_owned().expect("dup");
        let desc = RegionDesc {
            gpa: 0,
            size: 2 * 4096,
            uaddr: 0x7000_0000,
            offset: 0,
        };
        let r = MemTable::map_region(desc, File::from(shared)).expect("map");
        let mut t = MemTable::default();
        t.replace(vec![r.clone()]);
        assert!(t.newly_truncated().is_empty());
        nix::unistd::ftruncate(peer.fd().expect("fd"), 0).expect("shrink");
        // The device touches the region: zeros, not SIGBUS.
        let mut b = [1u8; 4];
        r.mem.read_at(4096, &mut b).expect("read");
        assert_eq!(b, [0; 4]);
        assert_eq!(t.newly_truncated(), vec![desc]);
        assert!(t.newly_truncated().is_empty(), "reported once");
    }

    fn region(gpa: u64, size: u64, uaddr: u64) -> Region {
        Region {
            desc: RegionDesc {
                gpa,
                size,
                uaddr,
                offset: 0,
            },
            mem: Memory::anonymous("t", usize::try_from(size).unwrap_or(4096)).expect("memfd"),
        }
    }

    #[test]
    fn test_va_to_gpa_and_split() {
        let mut t = MemTable::default();
        t.replace(vec![
            region(0x10_0000, 0x1000, 0x7000_1000),
            region(0, 0x1000, 0x7000_0000),
        ]);
        assert_eq!(t.va_to_gpa(0x7000_0010), Some(0x10));
        assert_eq!(t.va_to_gpa(0x7000_1010), Some(0x10_0010));
        assert_eq!(t.va_to_gpa(0x7000_2000), None);
        let parts = t.split_va(0x7000_0800, 0x1000).expect("covered");
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[0].1, parts[0].2), (0x800, 0x800));
        assert_eq!((parts[1].1, parts[1].2), (0, 0x800));
        assert!(t.split_va(0x7000_1800, 0x1000).is_none());
    }

    #[test]
    fn test_add_rejects_overlap_and_remove_matches() {
        let mut t = MemTable::default();
        t.add_shared(region(0, 0x2000, 0x1000_0000)).expect("add");
        assert!(matches!(
            t.add_shared(region(0x1000, 0x1000, 0x2000_0000)),
            Err(Error::RegionOverlap { .. })
        ));
        let d = RegionDesc {
            gpa: 0,
            size: 0x2000,
            uaddr: 0x1000_0000,
            offset: 0x5000,
        };
        // The offset is not compared, as the protocol says.
        assert!(t.release(&d).expect("remove").is_some());
        assert_eq!(t.len(), 0);
        assert!(matches!(t.release(&d), Err(Error::NoSuchRegion { .. })));
    }

    #[test]
    fn test_identical_region_is_shared_until_the_last_release() {
        let mut t = MemTable::default();
        let r = region(0, 0x2000, 0x1000_0000);
        let d = r.desc;
        assert_eq!(t.add_shared(r).expect("first"), Added::New);
        // The same region again (a second queue pair of a multiqueue QEMU).
        assert_eq!(
            t.add_shared(region(0, 0x2000, 0x1000_0000)).expect("again"),
            Added::Shared
        );
        assert_eq!(t.len(), 1);
        // A different region overlapping it still fails.
        assert!(matches!(
            t.add_shared(region(0x1000, 0x2000, 0x3000_0000)),
            Err(Error::RegionOverlap { .. })
        ));
        assert!(matches!(
            t.add_shared(region(0x10_0000, 0x1000, 0x1000_1000)),
            Err(Error::RegionOverlap { .. })
        ));
        // One removal keeps it for the other user.
        assert!(t.release(&d).expect("first release").is_none());
        assert_eq!(t.va_to_gpa(0x1000_0010), Some(0x10));
        // The last one takes it out.
        let gone = t.release(&d).expect("last release").expect("region");
        assert_eq!(gone.desc, d);
        assert_eq!(t.len(), 0);
        assert!(matches!(t.release(&d), Err(Error::NoSuchRegion { .. })));
    }

    #[test]
    fn test_replace_resets_references() {
        let mut t = MemTable::default();
        let d = region(0, 0x1000, 0x1000_0000).desc;
        t.add_shared(region(0, 0x1000, 0x1000_0000)).expect("add");
        t.add_shared(region(0, 0x1000, 0x1000_0000)).expect("add");
        t.replace(vec![region(0, 0x1000, 0x1000_0000)]);
        assert!(t.release(&d).expect("release").is_some());
    }
}
