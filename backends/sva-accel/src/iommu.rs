//! Translation through iommu-core: the engine's [`DmaMemory`] over one
//! access section of a worker's [`Translator`] for one PASID.
//!
//! iommu-core translates a whole range or fails at its first untranslatable
//! address, raising an I/O page fault when the HWPT has a fault queue. The
//! engine wants the longest translatable prefix, so the view translates the
//! prefix again up to the failing address, and remembers the failure so
//! that the retry the engine makes at that address does not raise a second
//! fault group.

use crate::engine::{DmaMemory, Fragment, PageFault};
use iommu_core::{Access, Error as IommuError, PendingFault, Perm};
use std::cell::RefCell;

/// Largest range translated in one call (bounds the fragment list).
const MAX_CHUNK: u64 = 64 << 20;

/// The first translation failure seen in a view.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Faulting device address.
    pub addr: u64,
    /// Whether the access was a write.
    pub write: bool,
    /// The raised fault, when the HWPT has a fault queue.
    pub pending: Option<PendingFault>,
}

/// A [`DmaMemory`] over an iommu-core access section for one PASID.
#[derive(Debug)]
pub struct IommuView<'a, 't> {
    acc: RefCell<&'a mut Access<'t>>,
    pasid: u32,
    frags: RefCell<Vec<iommu_core::Fragment>>,
    failure: RefCell<Option<Failure>>,
}

impl<'a, 't> IommuView<'a, 't> {
    /// A view of `pasid` inside the open section `acc`.
    pub fn new(acc: &'a mut Access<'t>, pasid: u32) -> Self {
        IommuView {
            acc: RefCell::new(acc),
            pasid,
            frags: RefCell::new(Vec::with_capacity(8)),
            failure: RefCell::new(None),
        }
    }

    /// Takes the first failure seen.
    pub fn take_failure(&self) -> Option<Failure> {
        self.failure.borrow_mut().take()
    }

    fn first(&self, addr: u64, len: u64, perm: Perm) -> Result<Fragment, IommuError> {
        let mut acc = self.acc.borrow_mut();
        let mut frags = self.frags.borrow_mut();
        acc.translate(Some(self.pasid), addr, len, perm, &mut frags)?;
        let f = frags.first().ok_or(IommuError::Unmapped {
            pasid: Some(self.pasid),
            iova: addr,
        })?;
        Ok(Fragment {
            ptr: f.ptr,
            len: f.len.min(len as usize).max(1),
        })
    }
}

// SAFETY: fragments come from iommu-core's translation inside the access
// section this view borrows for its whole life; iommu-core keeps them
// valid (and unmaps wait) until the section ends, and checked `perm`.
unsafe impl DmaMemory for IommuView<'_, '_> {
    fn translate(&self, addr: u64, len: u64, write: bool) -> Result<Fragment, PageFault> {
        let perm = if write { Perm::WRITE } else { Perm::READ };
        let mut len = len.clamp(1, MAX_CHUNK);
        if let Some(f) = self.failure.borrow().as_ref() {
            if f.addr == addr {
                return Err(PageFault {
                    addr,
                    write: f.write,
                });
            }
            if f.addr > addr && f.addr - addr < len {
                len = f.addr - addr;
            }
        }
        match self.first(addr, len, perm) {
            Ok(f) => Ok(f),
            Err(e) => {
                let (at, pending) = match e {
                    IommuError::FaultRaised { iova, pending, .. } => (iova, Some(pending)),
                    IommuError::Unmapped { iova, .. } | IommuError::AccessDenied { iova, .. } => {
                        (iova, None)
                    }
                    _ => (addr, None),
                };
                let at = if at >= addr && at - addr < len {
                    at
                } else {
                    addr
                };
                {
                    let mut slot = self.failure.borrow_mut();
                    if slot.is_none() {
                        *slot = Some(Failure {
                            addr: at,
                            write,
                            pending,
                        });
                    }
                }
                if at > addr {
                    // The prefix before the failure translates (cached now).
                    if let Ok(f) = self.first(addr, at - addr, perm) {
                        return Ok(f);
                    }
                }
                Err(PageFault { addr, write })
            }
        }
    }
}
