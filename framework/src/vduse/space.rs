//! The device's I/O address space as the kernel's VDUSE IOTLB defines it.
//!
//! The vDPA bus gives a VDUSE device I/O virtual addresses: with
//! `virtio_vdpa` those of the kernel's bounce buffer and of its coherent
//! allocations (the rings), with `vhost_vdpa` those of the VM's or
//! process's memory. `VDUSE_IOTLB_GET_FD` names the region around an IOVA
//! and hands an fd to map it from; each region is mapped here once (an
//! iommu-core [`Memory`]) and becomes one area of the device's IOAS at its
//! IOVA, so the worker threads translate through the IOAS exactly as they
//! do under vhost-user. `VDUSE_UPDATE_IOTLB` drops the areas in its range
//! (they are looked up again when used); a reset drops them all, since the
//! kernel frees the rings' pages and may hand the same IOVAs to new ones
//! without a message.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use iommu_core::{DevId, IoasId, Iommu, Memory, Perm};
use log::debug;

use crate::removed::RemovalCount;

use super::sys::{self, IotlbEntry, VDUSE_ACCESS_RO, VDUSE_ACCESS_RW, VDUSE_ACCESS_WO};
use super::{Error, Result};

/// The granule of the kernel's regions and of the IOAS.
const PAGE: u64 = 4096;

/// Most regions mapped at once (each is a kernel allocation: the bounce
/// buffer, a ring).
pub const MAX_REGIONS: usize = 4096;

/// One mapped region.
#[derive(Debug)]
struct Area {
    last: u64,
    /// Keeps the mapping alive while the area exists (the IOAS holds its
    /// own reference for translations in use).
    _mem: Arc<Memory>,
}

/// A VDUSE device's address space.
#[derive(Debug)]
pub(crate) struct Space {
    iommu: Iommu,
    dev_id: DevId,
    ioas: IoasId,
    areas: BTreeMap<u64, Area>,
    /// Bumped before anything is unmapped (the workers' reported misses).
    removals: Arc<RemovalCount>,
}

fn perm_of(p: u8) -> Perm {
    match p {
        VDUSE_ACCESS_RO => Perm::READ,
        VDUSE_ACCESS_WO => Perm::WRITE,
        VDUSE_ACCESS_RW => Perm::RW,
        _ => Perm::NONE,
    }
}

impl Space {
    /// Allocates an IOAS and attaches device `dev_id` to it.
    pub fn new(iommu: &Iommu, dev_id: DevId, removals: Arc<RemovalCount>) -> Result<Space> {
        let ioas = iommu.ioas_alloc().map_err(|source| Error::Ioas {
            op: "allocate",
            source,
        })?;
        if let Err(source) = iommu.attach(dev_id, None, ioas) {
            let _ = iommu.destroy(ioas);
            return Err(Error::Ioas {
                op: "attach",
                source,
            });
        }
        Ok(Space {
            iommu: iommu.clone(),
            dev_id,
            ioas,
            areas: BTreeMap::new(),
            removals,
        })
    }

    /// True if `iova` is mapped.
    pub fn covers(&self, iova: u64) -> bool {
        self.areas
            .range(..=iova)
            .next_back()
            .is_some_and(|(_, a)| iova <= a.last)
    }

    /// Looks up the kernel's region around `iova` and maps it. `Ok(false)`
    /// if the kernel has none there.
    pub fn fault_in(&mut self, dev: &impl AsRawFd, iova: u64) -> Result<bool> {
        if self.covers(iova) {
            return Ok(true);
        }
        match sys::iotlb_get_fd(dev, iova, iova).map_err(|source| Error::Sys {
            op: "VDUSE_IOTLB_GET_FD",
            source,
        })? {
            None => Ok(false),
            Some((e, fd)) => {
                self.map(e, fd)?;
                Ok(true)
            }
        }
    }

    /// Maps every region the kernel has now (at most [`MAX_REGIONS`]):
    /// the rings and the bounce buffer are known once the driver set the
    /// device up, so the workers start without a miss.
    pub fn fill(&mut self, dev: &impl AsRawFd) -> Result<usize> {
        let mut next = 0u64;
        let mut n = 0;
        while n < MAX_REGIONS {
            let Some((e, fd)) =
                sys::iotlb_get_fd(dev, next, u64::MAX).map_err(|source| Error::Sys {
                    op: "VDUSE_IOTLB_GET_FD",
                    source,
                })?
            else {
                break;
            };
            let last = e.last;
            if !self.covers(e.start) {
                self.map(e, fd)?;
            }
            n += 1;
            match last.checked_add(1) {
                Some(v) if v > next => next = v,
                _ => break,
            }
        }
        Ok(n)
    }

    fn map(&mut self, e: IotlbEntry, fd: std::os::fd::OwnedFd) -> Result<()> {
        if e.last < e.start {
            return Err(Error::BadRegion {
                start: e.start,
                last: e.last,
            });
        }
        if self.areas.len() >= MAX_REGIONS {
            return Err(Error::TooManyRegions);
        }
        // A coherent allocation's region ends where its size does, inside
        // its last page; the pages are the allocation's whole (the kernel
        // allocates pages), and the IOAS maps whole pages.
        let len = (e.last - e.start)
            .checked_add(1)
            .and_then(|l| l.checked_next_multiple_of(PAGE))
            .and_then(|l| usize::try_from(l).ok())
            .filter(|_| e.start % PAGE == 0)
            .ok_or(Error::BadRegion {
                start: e.start,
                last: e.last,
            })?;
        let last = e.start + (len as u64 - 1);
        if e.perm != VDUSE_ACCESS_RW {
            // The kernel hands such a region's fd open read-only or
            // write-only; the framework maps memory read-write.
            return Err(Error::Permission {
                start: e.start,
                last: e.last,
                perm: e.perm,
            });
        }
        // Anything stale in the range goes first.
        self.invalidate(e.start, last)?;
        let mem = Memory::from_device_fd(fd, e.offset, len).map_err(|source| Error::Map {
            iova: e.start,
            len: len as u64,
            source,
        })?;
        self.iommu
            .ioas_map(
                self.ioas,
                &mem,
                0,
                len as u64,
                Some(e.start),
                perm_of(e.perm),
            )
            .map_err(|source| Error::Map {
                iova: e.start,
                len: len as u64,
                source,
            })?;
        debug!(
            "VDUSE region {:#x}..={:#x} (offset {:#x}) mapped",
            e.start, e.last, e.offset
        );
        self.areas.insert(e.start, Area { last, _mem: mem });
        Ok(())
    }

    /// Unmaps every region that overlaps `start..=last` and waits until no
    /// worker can still use a translation of one.
    pub fn invalidate(&mut self, start: u64, last: u64) -> Result<()> {
        let hit: Vec<(u64, u64)> = self
            .areas
            .range(..=last)
            .rev()
            .take_while(|(_, a)| a.last >= start)
            .map(|(s, a)| (*s, a.last))
            .collect();
        if hit.is_empty() {
            return Ok(());
        }
        self.removals.fetch_add(1, Ordering::SeqCst);
        let mut tickets = Vec::with_capacity(hit.len());
        let mut first_err = None;
        for (s, l) in hit {
            self.areas.remove(&s);
            let len = l - s + 1;
            match self.iommu.ioas_unmap_begin(self.ioas, s, len) {
                Ok((_, t)) => tickets.push(t),
                Err(source) => {
                    first_err.get_or_insert(Error::Unmap {
                        iova: s,
                        len,
                        source,
                    });
                }
            }
        }
        for t in tickets {
            crate::peer_write::wait_ticket(t);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Unmaps everything.
    pub fn clear(&mut self) -> Result<()> {
        self.invalidate(0, u64::MAX)
    }

    /// Number of mapped regions.
    pub fn len(&self) -> usize {
        self.areas.len()
    }
}

impl Drop for Space {
    fn drop(&mut self) {
        if let Err(e) = self.clear() {
            debug!("VDUSE address space teardown: {e}");
        }
        if let Err(e) = self.iommu.detach(self.dev_id, None) {
            debug!("detach on teardown: {e}");
        }
        if let Err(e) = self.iommu.destroy(self.ioas) {
            debug!("destroying IOAS {}: {e}", self.ioas);
        }
    }
}
