//! Translation through iommu-core: the engine's [`DmaMemory`] over one
//! access section of a worker's [`Translator`](iommu_core::Translator) for one PASID.
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
    failure: RefCell<Option<Failure>>,
}

impl<'a, 't> IommuView<'a, 't> {
    /// A view of `pasid` inside the open section `acc`.
    pub fn new(acc: &'a mut Access<'t>, pasid: u32) -> Self {
        IommuView {
            acc: RefCell::new(acc),
            pasid,
            failure: RefCell::new(None),
        }
    }

    /// Takes the first failure seen.
    pub fn take_failure(&self) -> Option<Failure> {
        self.failure.borrow_mut().take()
    }
}

// SAFETY: fragments come from iommu-core's translation inside the access
// section this view borrows for its whole life; iommu-core keeps them
// valid (and unmaps wait) until the section ends, checked `perm`, and
// returns at most `len` bytes.
unsafe impl DmaMemory for IommuView<'_, '_> {
    fn translate(&self, addr: u64, len: u64, write: bool) -> Result<Fragment, PageFault> {
        if let Some(f) = self.failure.borrow().as_ref() {
            if f.addr == addr {
                // Already failed (and possibly raised) here: not again.
                return Err(PageFault {
                    addr,
                    write: f.write,
                });
            }
        }
        let perm = if write { Perm::WRITE } else { Perm::READ };
        let res =
            self.acc
                .borrow_mut()
                .translate_contiguous(Some(self.pasid), addr, len.max(1), perm);
        match res {
            Ok(f) => Ok(Fragment {
                ptr: f.ptr,
                len: f.len.clamp(1, len.max(1) as usize),
            }),
            Err(e) => {
                let pending = match e {
                    IommuError::FaultRaised { pending, .. } => Some(pending),
                    _ => None,
                };
                let mut slot = self.failure.borrow_mut();
                if slot.is_none() {
                    *slot = Some(Failure {
                        addr,
                        write,
                        pending,
                    });
                }
                Err(PageFault { addr, write })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::{flags, status, Descriptor};
    use crate::engine::{execute, read_bytes, Job, Limits, Outcome, Resume};
    use iommu_core::{
        FaultStatus, HwptAlloc, Iommu, Memory, PageResponseCode, IOMMU_HWPT_ALLOC_PASID,
    };

    const PASID: u32 = 5;
    const BASE: u64 = 0x10_0000;

    struct Rig {
        iommu: Iommu,
        dev: iommu_core::Device,
        ioas: u32,
        faults: Option<iommu_core::FaultQueue>,
        _mem: std::sync::Arc<Memory>,
    }

    fn rig(with_faults: bool) -> Rig {
        let iommu = Iommu::new();
        let dev = iommu_core::Device::new("sva-test", crate::device::hw_info());
        let dev_id = iommu.bind(&dev).expect("bind");
        let ioas = iommu.ioas_alloc().expect("ioas");
        let mem = Memory::anonymous("t", 0x4000).expect("memory");
        // Two pages mapped, then a hole, then one more page.
        iommu
            .ioas_map(ioas, &mem, 0, 0x2000, Some(BASE), Perm::READ | Perm::WRITE)
            .expect("map");
        iommu
            .ioas_map(
                ioas,
                &mem,
                0x3000,
                0x1000,
                Some(BASE + 0x3000),
                Perm::READ | Perm::WRITE,
            )
            .expect("map");
        let (fault_id, faults) = if with_faults {
            let (id, q) = iommu.fault_queue_alloc().expect("fault queue");
            (Some(id), Some(q))
        } else {
            (None, None)
        };
        let hwpt = iommu
            .hwpt_alloc(&HwptAlloc {
                dev_id,
                pt_id: ioas,
                flags: IOMMU_HWPT_ALLOC_PASID,
                fault_id,
                ..Default::default()
            })
            .expect("hwpt");
        iommu.attach(dev_id, Some(PASID), hwpt).expect("attach");
        Rig {
            iommu,
            dev,
            ioas,
            faults,
            _mem: mem,
        }
    }

    fn fill(dst: u64, len: u32, bof: bool) -> Descriptor {
        let mut d = Descriptor::new(
            crate::desc::opcode::MEMFILL,
            if bof { flags::BOF } else { 0 },
        );
        d.src = 0x0101_0101_0101_0101;
        d.dst = dst;
        d.xfer_size = len;
        d
    }

    #[test]
    fn test_prefix_up_to_the_hole_then_partial_completion() {
        let r = rig(false);
        let mut tr = r.dev.translator();
        let mut acc = tr.access();
        let view = IommuView::new(&mut acc, PASID);
        let mut job = Job::new(fill(BASE + 0x1f00, 0x200, false));
        let out = execute(
            &mut job,
            &view,
            &Limits::default(),
            Resume::Start,
            &mut |_| {},
        );
        let Outcome::Complete(cr) = out else {
            panic!("blocked without a fault queue")
        };
        assert_eq!(cr.status, status::PAGE_FAULT_NOBOF | status::WRITE);
        assert_eq!((cr.bytes_completed, cr.fault_addr), (0x100, BASE + 0x2000));
        let f = view.take_failure().expect("failure recorded");
        assert!(f.pending.is_none());
        let mut b = [0u8; 4];
        read_bytes(&view, BASE + 0x1ffc, &mut b).expect("mapped");
        assert_eq!(b, [1, 1, 1, 1]);
        let _ = r.ioas;
    }

    #[test]
    fn test_block_on_fault_raises_one_group_and_resumes() {
        let r = rig(true);
        let q = r.faults.as_ref().expect("queue");
        let mut tr = r.dev.translator();
        let mut job = Job::new(fill(BASE + 0x1f00, 0x200, true));
        job.desc.pasid = PASID;
        let pending = {
            let mut acc = tr.access();
            let view = IommuView::new(&mut acc, PASID);
            let out = execute(
                &mut job,
                &view,
                &Limits::default(),
                Resume::Start,
                &mut |_| {},
            );
            assert!(matches!(out, Outcome::Blocked(_)));
            view.take_failure()
                .and_then(|f| f.pending)
                .expect("fault raised")
        };
        let mut recs = Vec::new();
        q.read_batch(&mut recs, 16).expect("read");
        assert_eq!(recs.len(), 1, "one fault group for one blocked descriptor");
        assert_eq!(recs[0].addr, BASE + 0x2000);
        // The owner maps the hole and answers Success.
        let mem = Memory::anonymous("hole", 0x1000).expect("memory");
        r.iommu
            .ioas_map(
                r.ioas,
                &mem,
                0,
                0x1000,
                Some(BASE + 0x2000),
                Perm::READ | Perm::WRITE,
            )
            .expect("map hole");
        q.respond(recs[0].cookie, PageResponseCode::Success)
            .expect("respond");
        assert_eq!(pending.status(), FaultStatus::Success);
        let mut acc = tr.access();
        let view = IommuView::new(&mut acc, PASID);
        let out = execute(
            &mut job,
            &view,
            &Limits::default(),
            Resume::Success,
            &mut |_| {},
        );
        let Outcome::Complete(cr) = out else {
            panic!("still blocked")
        };
        assert_eq!(cr.status, status::SUCCESS);
        let mut b = [0u8; 2];
        read_bytes(&view, BASE + 0x20fe, &mut b).expect("mapped");
        assert_eq!(b, [1, 1]);
    }
}
