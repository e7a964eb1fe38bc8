//! The device's I/O address space as the frontend defines it.
//!
//! Each connection owns one iommu-core IOAS, attached to the device's RID.
//! Its content depends on `VIRTIO_F_ACCESS_PLATFORM`:
//!
//! - Without it ([`Mode::Table`]) the memory table is the address space:
//!   every region is mapped read-write at IOVA = its guest physical address,
//!   and kept in step with SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG.
//! - With it ([`Mode::Iotlb`]) the address space holds exactly the frontend's
//!   IOTLB updates: an update maps the slice of memory-table memory behind its
//!   frontend virtual address at its IOVA with its permission; an invalidation
//!   unmaps every translation in its range. An invalidation that cuts an
//!   area uses iommu-core's [`Iommu::ioas_cut`], which splits the area and
//!   removes the range under one lock: the parts outside stay mapped
//!   throughout (the service's `IOAS_UNMAP` keeps iommufd's whole-area
//!   rule). A shadow of the updates makes all of that exact.

use std::collections::BTreeMap;
use std::sync::Arc;

use iommu_core::{DevId, InvalidationTicket, IoasId, Iommu, Perm};
use log::debug;

use super::mem::{MemTable, Region};
use super::msg::{VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO};
use super::{Error, Result};
use crate::ownership::RidOwnership;
use crate::removed::{RemovalCount, RemovedRanges};

/// Largest number of IOTLB translations a frontend may install at once.
pub const MAX_IOTLB_ENTRIES: usize = 1 << 16;

/// How the IOAS is populated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// IOVA = guest physical address, from the memory table.
    Table,
    /// IOVA space from IOTLB messages.
    Iotlb,
}

#[derive(Clone, Debug)]
struct Entry {
    len: u64,
    uaddr: u64,
    perm: u8,
    region: Region,
    region_off: u64,
}

/// A connection's address space.
#[derive(Debug)]
pub(crate) struct AddressSpace {
    iommu: Iommu,
    dev_id: DevId,
    ioas: IoasId,
    mode: Mode,
    /// Who holds the RID: while a session owns it, the IOAS stays detached.
    rid: Arc<RidOwnership>,
    /// Mapped areas: iova -> entry (one IOAS area each).
    areas: BTreeMap<u64, Entry>,
    /// Bumped before anything is unmapped (shared with the workers, see
    /// [`AddressSpace::new`]).
    removals: Arc<RemovalCount>,
    /// The range of each removal, recorded before `removals` is bumped.
    removed: Arc<RemovedRanges>,
}

fn perm_of(p: u8) -> Perm {
    match p {
        VHOST_ACCESS_RO => Perm::READ,
        VHOST_ACCESS_WO => Perm::WRITE,
        VHOST_ACCESS_RW => Perm::RW,
        _ => Perm::NONE,
    }
}

impl AddressSpace {
    /// Allocates an IOAS and attaches the device to it, unless a service
    /// session owns the RID (then the IOAS is attached when it lets go).
    /// `removals` is bumped (sequentially consistent) before each unmap of
    /// the IOAS starts: a worker that finds an address unmapped and then
    /// reads the count sees every removal that unmapped it. Each removal's
    /// range is recorded in `removed` under its number first (the workers
    /// forget the misses they reported that a removal overlapped).
    pub fn new(
        iommu: &Iommu,
        dev_id: DevId,
        rid: Arc<RidOwnership>,
        removals: Arc<RemovalCount>,
        removed: Arc<RemovedRanges>,
    ) -> Result<Self> {
        let ioas = iommu.ioas_alloc().map_err(|source| Error::Ioas {
            op: "allocate",
            source,
        })?;
        {
            let mut st = rid.lock();
            if st.owner.is_none() {
                if let Err(source) = iommu.attach(dev_id, None, ioas) {
                    drop(st);
                    let _ = iommu.destroy(ioas);
                    return Err(Error::Ioas {
                        op: "attach",
                        source,
                    });
                }
            }
            st.private = Some(ioas);
        }
        Ok(AddressSpace {
            iommu: iommu.clone(),
            dev_id,
            ioas,
            mode: Mode::Table,
            rid,
            areas: BTreeMap::new(),
            removals,
            removed,
        })
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Number of mapped areas.
    #[cfg(test)]
    pub fn area_count(&self) -> usize {
        self.areas.len()
    }

    /// Switches mode, rebuilding the content from `table`.
    pub fn set_mode(&mut self, mode: Mode, table: &MemTable) -> Result<()> {
        if mode == self.mode {
            return Ok(());
        }
        self.clear()?;
        self.mode = mode;
        if mode == Mode::Table {
            self.map_table(table)?;
        }
        Ok(())
    }

    fn map_area(&mut self, iova: u64, entry: Entry) -> Result<()> {
        if self.areas.len() >= MAX_IOTLB_ENTRIES {
            return Err(Error::TooManyMappings);
        }
        self.iommu
            .ioas_map(
                self.ioas,
                &entry.region.mem,
                entry.region_off,
                entry.len,
                Some(iova),
                perm_of(entry.perm),
            )
            .map_err(|source| Error::Map {
                iova,
                len: entry.len,
                source,
            })?;
        self.areas.insert(iova, entry);
        Ok(())
    }

    fn map_table(&mut self, table: &MemTable) -> Result<()> {
        for r in table.regions() {
            self.map_region(r)?;
        }
        Ok(())
    }

    fn map_region(&mut self, r: &Region) -> Result<()> {
        let entry = Entry {
            len: r.desc.size,
            uaddr: r.desc.uaddr,
            perm: VHOST_ACCESS_RW,
            region: r.clone(),
            region_off: 0,
        };
        self.map_area(r.desc.gpa, entry)
    }

    /// Unmaps the whole IOAS and waits until no worker can use a
    /// translation of it (a worker wedged in a write to the frontend's
    /// eventfd inside its access section is interrupted).
    fn unmap_all(&self) -> iommu_core::Result<u64> {
        self.removed(0, u64::MAX);
        let (n, t) = self.iommu.ioas_unmap_begin(self.ioas, 0, u64::MAX)?;
        crate::peer_write::wait_ticket(t);
        Ok(n)
    }

    /// Records and counts a removal of `first..=last` (before it starts).
    fn removed(&self, first: u64, last: u64) {
        self.removed.record(&self.removals, first, last);
    }

    /// Unmaps everything.
    pub fn clear(&mut self) -> Result<()> {
        if self.areas.is_empty() {
            return Ok(());
        }
        let r = self.unmap_all();
        self.areas.clear();
        match r {
            Ok(_) => Ok(()),
            // Nothing left mapped is fine.
            Err(iommu_core::Error::NotMapped { .. }) => Ok(()),
            Err(source) => Err(Error::Unmap {
                iova: 0,
                len: u64::MAX,
                source,
            }),
        }
    }

    /// The memory table was replaced.
    pub fn table_replaced(&mut self, table: &MemTable) -> Result<()> {
        match self.mode {
            Mode::Table => {
                self.clear()?;
                self.map_table(table)
            }
            Mode::Iotlb => {
                // Re-resolve every translation against the new table; drop
                // those whose frontend address is gone.
                let old: Vec<(u64, Entry)> = std::mem::take(&mut self.areas).into_iter().collect();
                let _ = self.unmap_all();
                for (iova, e) in old {
                    if let Err(err) = self.map_update(iova, e.len, e.uaddr, e.perm, table) {
                        debug!(
                            "dropping translation at {iova:#x} after memory table change: {err}"
                        );
                    }
                }
                Ok(())
            }
        }
    }

    /// A region was added to the table.
    pub fn region_added(&mut self, r: &Region) -> Result<()> {
        match self.mode {
            Mode::Table => self.map_region(r),
            Mode::Iotlb => Ok(()),
        }
    }

    /// A region was removed from the table: nothing may reach it any more.
    pub fn region_removed(&mut self, r: &Region) -> Result<()> {
        let doomed: Vec<(u64, u64)> = self
            .areas
            .iter()
            .filter(|(_, e)| std::sync::Arc::ptr_eq(&e.region.mem, &r.mem))
            .map(|(iova, e)| (*iova, e.len))
            .collect();
        self.unmap_areas(&doomed)
    }

    fn unmap_areas(&mut self, areas: &[(u64, u64)]) -> Result<()> {
        let mut tickets: Vec<InvalidationTicket> = Vec::with_capacity(areas.len());
        let mut first_err = None;
        if let (Some(first), Some(last)) = (
            areas.iter().map(|&(iova, _)| iova).min(),
            areas
                .iter()
                .map(|&(iova, len)| iova.saturating_add(len.saturating_sub(1)))
                .max(),
        ) {
            // One removal covering all of them.
            self.removed(first, last);
        }
        for &(iova, len) in areas {
            self.areas.remove(&iova);
            match self.iommu.ioas_unmap_begin(self.ioas, iova, len) {
                Ok((_, t)) => tickets.push(t),
                Err(source) => {
                    crate::log_limited!(
                        log::Level::Warn,
                        "unmap of {iova:#x}+{len:#x} failed: {source}"
                    );
                    first_err.get_or_insert(Error::Unmap { iova, len, source });
                }
            }
        }
        // Every area is gone from the IOAS; now wait until no worker can
        // still be using a translation of one.
        for t in tickets {
            crate::peer_write::wait_ticket(t);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// IOTLB update: maps `iova..iova+size` to the memory behind the
    /// frontend address `uaddr`. Replaces whatever was mapped there.
    pub fn update(
        &mut self,
        iova: u64,
        size: u64,
        uaddr: u64,
        perm: u8,
        table: &MemTable,
    ) -> Result<()> {
        if self.mode != Mode::Iotlb {
            return Err(Error::NotIotlbMode);
        }
        // Validated at decode: size > 0 and no overflow.
        let last = iova.saturating_add(size - 1);
        if let Some(e) = self.areas.get(&iova) {
            if e.len == size && e.uaddr == uaddr && e.perm == perm {
                return Ok(());
            }
        }
        self.invalidate(iova, last)?;
        self.map_update(iova, size, uaddr, perm, table)
    }

    fn map_update(
        &mut self,
        iova: u64,
        size: u64,
        uaddr: u64,
        perm: u8,
        table: &MemTable,
    ) -> Result<()> {
        let pieces = table
            .split_va(uaddr, size)
            .ok_or(Error::UaddrNotInTable { uaddr, size })?;
        let mut cur = iova;
        for (region, off, len) in pieces {
            let entry = Entry {
                len,
                uaddr: region.desc.uaddr + off,
                perm,
                region,
                region_off: off,
            };
            self.map_area(cur, entry)?;
            cur = cur.saturating_add(len);
        }
        Ok(())
    }

    /// IOTLB invalidation of `iova..=last`: afterwards no translation in the
    /// range exists and no worker can still use one. Areas that straddle an
    /// end of the range are cut by iommu-core in one step, so a worker using
    /// the parts outside the range never finds them missing.
    pub fn invalidate(&mut self, iova: u64, last: u64) -> Result<()> {
        let hit: Vec<(u64, Entry)> = self
            .areas
            .range(..=last)
            .rev()
            .take_while(|(a, e)| a.saturating_add(e.len - 1) >= iova)
            .map(|(a, e)| (*a, e.clone()))
            .collect();
        if hit.is_empty() {
            return Ok(());
        }
        let grows = hit
            .iter()
            .map(|(a, e)| usize::from(*a < iova) + usize::from(a + (e.len - 1) > last))
            .sum::<usize>();
        if self.areas.len() + grows > MAX_IOTLB_ENTRIES + hit.len() {
            return Err(Error::TooManyMappings);
        }
        // Only the mapped part of the range is cut (the IOAS alignment is
        // checked on those ends).
        let lo = hit.iter().map(|(a, _)| *a).min().unwrap_or(iova).max(iova);
        let hi = hit
            .iter()
            .map(|(a, e)| a + (e.len - 1))
            .max()
            .unwrap_or(last)
            .min(last);
        let len = hi - lo + 1;
        self.removed(lo, hi);
        let ticket = match self.iommu.ioas_cut_begin(self.ioas, lo, len) {
            Ok((_, t)) => t,
            Err(source) => {
                crate::log_limited!(
                    log::Level::Warn,
                    "IOTLB invalidation of {lo:#x}+{len:#x} failed: {source}"
                );
                return Err(Error::Unmap {
                    iova: lo,
                    len,
                    source,
                });
            }
        };
        // The shadow follows: the cut areas leave, their outside parts stay.
        for (a, e) in hit {
            self.areas.remove(&a);
            let e_last = a + (e.len - 1);
            if a < iova {
                let left = Entry {
                    len: iova - a,
                    ..e.clone()
                };
                self.areas.insert(a, left);
            }
            if e_last > last {
                let skip = last + 1 - a;
                let right = Entry {
                    len: e_last - last,
                    uaddr: e.uaddr + skip,
                    region_off: e.region_off + skip,
                    ..e.clone()
                };
                self.areas.insert(last + 1, right);
            }
        }
        // Wait until no worker can still use a translation of the range.
        crate::peer_write::wait_ticket(ticket);
        Ok(())
    }

    /// True if `iova` is covered by a mapping.
    pub fn covers(&self, iova: u64) -> bool {
        self.areas
            .range(..=iova)
            .next_back()
            .is_some_and(|(a, e)| iova - a < e.len)
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        let _ = self.clear();
        {
            let mut st = self.rid.lock();
            st.private = None;
            // A session that owns the RID keeps its attachment.
            if st.owner.is_none() {
                if let Err(e) = self.iommu.detach(self.dev_id, None) {
                    debug!("detach on teardown: {e}");
                }
            }
        }
        if let Err(e) = self.iommu.destroy(self.ioas) {
            debug!("destroying IOAS {}: {e}", self.ioas);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::vhost_user::mem::MemTable;
    use crate::vhost_user::msg::RegionDesc;

    const PAGE: u64 = 0x1000;
    const PAGES: u64 = 24;
    const UADDR: u64 = 0x7f00_0000_0000;

    #[derive(Clone, Debug)]
    enum Op {
        Update {
            page: u64,
            pages: u64,
            src: u64,
            perm: u8,
        },
        Invalidate {
            page: u64,
            pages: u64,
        },
        InvalidateAll,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..PAGES, 1..6u64, 0..PAGES, 1..=3u8).prop_map(|(page, pages, src, perm)| {
                Op::Update {
                    page,
                    pages,
                    src,
                    perm,
                }
            }),
            (0..PAGES, 1..8u64).prop_map(|(page, pages)| Op::Invalidate { page, pages }),
            Just(Op::InvalidateAll),
        ]
    }

    struct Fixture {
        space: AddressSpace,
        table: MemTable,
        core: iommu_core::IommuDevice,
    }

    fn fixture() -> Fixture {
        let iommu = Iommu::new();
        let core = iommu_core::IommuDevice::new("t", iommu_core::HwInfo::default());
        let dev_id = iommu.bind(&core).expect("bind");
        let mut space = AddressSpace::new(
            &iommu,
            dev_id,
            Arc::default(),
            Arc::default(),
            Arc::default(),
        )
        .expect("space");
        let mem = iommu_core::Memory::anonymous("g", (2 * PAGES * PAGE) as usize).expect("mem");
        // Page i of guest memory holds byte i.
        for i in 0..2 * PAGES {
            mem.fill((i * PAGE) as usize, PAGE as usize, i as u8)
                .expect("fill");
        }
        let mut table = MemTable::default();
        table.replace(vec![crate::vhost_user::mem::Region {
            desc: RegionDesc {
                gpa: 0,
                size: 2 * PAGES * PAGE,
                uaddr: UADDR,
                offset: 0,
            },
            mem,
        }]);
        space.set_mode(Mode::Iotlb, &table).expect("mode");
        Fixture { space, table, core }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// After any sequence of updates and invalidations (including ones
        /// that cut areas and whole-space ones), each page translates exactly
        /// as a page-granular model of the IOTLB says, through iommu-core.
        #[test]
        fn test_address_space_matches_page_model(ops in proptest::collection::vec(op(), 1..24)) {
            let mut f = fixture();
            let mut model: Vec<Option<(u64, u8)>> = vec![None; (PAGES + 8) as usize];
            for o in &ops {
                match *o {
                    Op::Update { page, pages, src, perm } => {
                        f.space
                            .update(page * PAGE, pages * PAGE, UADDR + src * PAGE, perm, &f.table)
                            .expect("update");
                        for i in 0..pages {
                            model[(page + i) as usize] = Some((src + i, perm));
                        }
                    }
                    Op::Invalidate { page, pages } => {
                        f.space.invalidate(page * PAGE, page * PAGE + pages * PAGE - 1).expect("inv");
                        for i in 0..pages {
                            if let Some(m) = model.get_mut((page + i) as usize) {
                                *m = None;
                            }
                        }
                    }
                    Op::InvalidateAll => {
                        f.space.invalidate(0, u64::MAX).expect("inv all");
                        model.iter_mut().for_each(|m| *m = None);
                    }
                }
            }
            let mut tr = f.core.translator();
            for (p, m) in model.iter().enumerate() {
                let iova = p as u64 * PAGE;
                prop_assert_eq!(f.space.covers(iova), m.is_some(), "page {}", p);
                let mut b = [0u8; 1];
                let r = tr.read(None, iova, &mut b);
                match m {
                    Some((src, perm)) if perm & 1 != 0 => {
                        prop_assert!(r.is_ok(), "page {} readable", p);
                        prop_assert_eq!(u64::from(b[0]), *src, "page {} maps the right memory", p);
                    }
                    Some(_) => prop_assert!(r.is_err(), "page {} write-only", p),
                    None => prop_assert!(r.is_err(), "page {} unmapped", p),
                }
            }
        }
    }

    #[test]
    fn test_update_is_idempotent_and_replaces_overlaps() {
        let mut f = fixture();
        f.space
            .update(0, 4 * PAGE, UADDR, 3, &f.table)
            .expect("update");
        f.space
            .update(0, 4 * PAGE, UADDR, 3, &f.table)
            .expect("same again");
        assert_eq!(f.space.area_count(), 1);
        f.space
            .update(PAGE, PAGE, UADDR + 9 * PAGE, 1, &f.table)
            .expect("overlap");
        assert_eq!(f.space.area_count(), 3);
        let mut tr = f.core.translator();
        let mut b = [0u8; 1];
        tr.read(None, PAGE, &mut b).expect("read");
        assert_eq!(b[0], 9);
    }

    #[test]
    fn test_table_mode_maps_regions_at_gpa_and_rejects_iotlb() {
        let mut f = fixture();
        f.space.set_mode(Mode::Table, &f.table).expect("mode");
        let mut tr = f.core.translator();
        let mut b = [0u8; 1];
        tr.read(None, 5 * PAGE, &mut b).expect("read");
        assert_eq!(b[0], 5);
        assert!(matches!(
            f.space.update(0, PAGE, UADDR, 3, &f.table),
            Err(Error::NotIotlbMode)
        ));
    }
}
