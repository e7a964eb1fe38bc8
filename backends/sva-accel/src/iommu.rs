//! Translation through the framework's DMA handle: the engine's
//! [`DmaMemory`] over one access section of a worker's translator, for the
//! client's PASID ([`ioasis::dma::Dma`], which translates through iommu-core
//! for (device, PASID)).
//!
//! The engine asks for the longest host-contiguous prefix of a range, which
//! is [`Dma::fragment`]. Work with block on fault translates in the handle's
//! raising mode; work without it, and completion records, translate through
//! the handle's probe ([`DmaMemory::translate_nofault`]), so their failures
//! leave no fault group for the client to answer. The first failure is
//! remembered, with the I/O page fault it raised (on a HWPT with a fault
//! queue), so that the device can park the descriptor on it, and so that a
//! retry at the same address does not raise a second fault group.
//!
//! A view may carry its client's [`FaultBudget`]: a raising access then
//! raises a fault only while the client has fewer than its budget
//! outstanding; past it the access fails without raising (the device
//! answers the descriptor Invalid at once), so that no client can hold the
//! device's outstanding page requests for the others.

use crate::engine::{DmaMemory, Fragment, PageFault};
use ioasis::dma::{Access, Dma, DmaError, PendingFault};
use std::cell::{Cell, RefCell};
use std::sync::Arc;

/// One client's budget of outstanding I/O page faults (groups raised for
/// it and not yet answered and resumed), and one fault of it: iommu-core's,
/// which the `/dev/iommu` service also charges each session's fault queues
/// to.
pub use ioasis::iommu::{FaultBudget, FaultSlot};

/// The first translation failure seen in a view.
#[derive(Debug)]
pub struct Failure {
    /// Faulting device address.
    pub addr: u64,
    /// Whether the access was a write.
    pub write: bool,
    /// The access could raise a fault or report an event (not a probe).
    pub raised: bool,
    /// The raised fault, when the HWPT has a fault queue.
    pub pending: Option<PendingFault>,
    /// The client's budget slot the raised fault holds (a view with a
    /// budget).
    pub slot: Option<FaultSlot>,
}

/// A [`DmaMemory`] over a framework DMA handle (one access section, one
/// PASID).
#[derive(Debug)]
pub struct DmaView<'a> {
    dma: Dma<'a>,
    /// A failure is recorded (checked before `failure` on every access).
    failed: Cell<bool>,
    failure: RefCell<Option<Failure>>,
    budget: Option<&'a Arc<FaultBudget>>,
}

impl<'a> DmaView<'a> {
    /// A view through `dma` (its PASID, in its mode).
    pub fn new(dma: Dma<'a>) -> Self {
        DmaView {
            dma,
            failed: Cell::new(false),
            failure: RefCell::new(None),
            budget: None,
        }
    }

    /// A view through `dma` whose raising accesses raise a fault only
    /// while `budget` has room.
    pub fn with_budget(dma: Dma<'a>, budget: &'a Arc<FaultBudget>) -> Self {
        DmaView {
            // Every access probes first; `raise` raises.
            dma: dma.probe(),
            budget: Some(budget),
            ..DmaView::new(dma)
        }
    }

    /// Takes the first failure seen.
    pub fn take_failure(&self) -> Option<Failure> {
        self.failed.set(false);
        self.failure.borrow_mut().take()
    }

    #[inline(always)]
    fn translate_in(
        &self,
        dma: Dma<'a>,
        addr: u64,
        len: u64,
        write: bool,
    ) -> Result<Fragment, PageFault> {
        let probe = dma.is_probe();
        if self.failed.get() {
            if let Some(f) = self.failure.borrow().as_ref() {
                if f.addr == addr && (f.raised || probe) {
                    // Already failed (and raised or reported) here: not again.
                    return Err(PageFault {
                        addr,
                        write: f.write,
                    });
                }
            }
        }
        let access = if write { Access::Write } else { Access::Read };
        let len = len.max(1);
        match dma.fragment(addr, len, access) {
            Ok(f) if !f.is_empty() => Ok(Fragment {
                ptr: f.as_ptr(),
                len: f.len().min(len as usize),
            }),
            r => Err(self.fail(addr, write, probe, r.err(), None)),
        }
    }

    /// A raising access whose probe failed: raises the fault if the
    /// client's budget has room (the fault keeps its slot), else fails as a
    /// raising access that raised nothing (the device answers the
    /// descriptor Invalid at once).
    #[cold]
    #[inline(never)]
    fn raise(&self, addr: u64, len: u64, write: bool) -> Result<Fragment, PageFault> {
        if let Some(f) = self.failure.borrow().as_ref() {
            if f.addr == addr && f.raised {
                // Already raised (or refused) here: not again.
                return Err(PageFault {
                    addr,
                    write: f.write,
                });
            }
        }
        let access = if write { Access::Write } else { Access::Read };
        let Some(slot) = self.budget.and_then(|b| b.try_take()) else {
            return Err(self.fail(addr, write, false, None, None));
        };
        match self.dma.raising().fragment(addr, len.max(1), access) {
            // Mapped meanwhile (the slot goes back).
            Ok(f) if !f.is_empty() => Ok(Fragment {
                ptr: f.as_ptr(),
                len: f.len().min(len as usize),
            }),
            r => Err(self.fail(addr, write, false, r.err(), Some(slot))),
        }
    }

    /// Records a failure (the first one, or a raised one after probes).
    #[cold]
    #[inline(never)]
    fn fail(
        &self,
        addr: u64,
        write: bool,
        probe: bool,
        e: Option<DmaError>,
        budget_slot: Option<FaultSlot>,
    ) -> PageFault {
        let pending = e.and_then(|e| e.pending_fault().cloned());
        // A slot is kept only by a fault that was raised.
        let budget_slot = budget_slot.filter(|_| pending.is_some());
        let mut slot = self.failure.borrow_mut();
        // Keep the first failure, unless a raising access fails after
        // probes did: the raised one is what the device parks on.
        if slot.as_ref().is_none_or(|f| !f.raised && !probe) {
            *slot = Some(Failure {
                addr,
                write,
                raised: !probe,
                pending,
                slot: budget_slot,
            });
            self.failed.set(true);
        }
        PageFault { addr, write }
    }
}

// SAFETY: fragments come from the framework's DMA handle, whose access
// section outlives the `'a` this view borrows it for; the section keeps
// them valid (and unmaps wait) until it ends. The handle checked the
// permission and returns a non-empty run of at most `len` bytes.
unsafe impl DmaMemory for DmaView<'_> {
    #[inline]
    fn translate(&self, addr: u64, len: u64, write: bool) -> Result<Fragment, PageFault> {
        // With a budget, `self.dma` is a probe: a raising access raises only
        // once it knows it fails, and only if the budget has room.
        match self.translate_in(self.dma, addr, len, write) {
            Err(_) if self.budget.is_some() => self.raise(addr, len, write),
            r => r,
        }
    }

    #[inline]
    fn translate_nofault(&self, addr: u64, len: u64, write: bool) -> Result<Fragment, PageFault> {
        self.translate_in(self.dma.probe(), addr, len, write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::{flags, status, Descriptor};
    use crate::engine::{execute, read_bytes, Job, Limits, Outcome, Resume};
    use ioasis::dma::{FaultStatus, PageResponseCode, Perm};
    use ioasis::iommu::{HwptAlloc, Iommu, IommuDevice, Memory, IOMMU_HWPT_ALLOC_PASID};

    const PASID: u32 = 5;
    const BASE: u64 = 0x10_0000;

    struct Rig {
        iommu: Iommu,
        dev: IommuDevice,
        ioas: u32,
        faults: Option<ioasis::iommu::FaultQueue>,
        _mem: std::sync::Arc<Memory>,
    }

    fn rig(with_faults: bool) -> Rig {
        let iommu = Iommu::new();
        let dev = IommuDevice::new("sva-test", crate::device::hw_info());
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
        Dma::enter(&mut tr, Some(PASID), |dma| {
            let view = DmaView::new(dma);
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
        });
        let _ = r.ioas;
    }

    #[test]
    fn test_no_block_on_fault_and_records_raise_nothing() {
        let r = rig(true);
        let q = r.faults.as_ref().expect("queue");
        let mut tr = r.dev.translator();
        Dma::enter(&mut tr, Some(PASID), |dma| {
            let view = DmaView::new(dma);
            let mut d = fill(BASE + 0x1f00, 0x200, false);
            d.flags |= flags::CRAV | flags::RCR;
            d.completion_addr = BASE + 0x2020;
            let mut job = Job::new(d);
            let out = execute(
                &mut job,
                &view,
                &Limits::default(),
                Resume::Start,
                &mut |_| {},
            );
            let Outcome::Complete(cr) = out else {
                panic!("BOF=0 blocked")
            };
            assert_eq!(cr.status, status::PAGE_FAULT_NOBOF | status::WRITE);
            assert_eq!(cr.fault_addr, BASE + 0x2000);
            let f = view.take_failure().expect("failure recorded");
            assert!(!f.raised && f.pending.is_none());
            // The record's page is the hole too: not written, nothing raised.
            let e = crate::engine::write_completion(&view, d.completion_addr, &cr)
                .expect_err("unmapped record");
            assert_eq!(e.code, status::CRA_XLAT);
        });
        assert_eq!(q.stats().raised, 0, "no fault group for the client");
    }

    #[test]
    fn test_raising_after_probe_at_same_address_raises_once() {
        let r = rig(true);
        let q = r.faults.as_ref().expect("queue");
        let mut tr = r.dev.translator();
        let hole = BASE + 0x2000;
        Dma::enter(&mut tr, Some(PASID), |dma| {
            let view = DmaView::new(dma);
            assert!(view.translate_nofault(hole, 8, true).is_err());
            assert!(view.translate(hole, 8, true).is_err());
            assert!(view.translate(hole, 8, true).is_err(), "not raised again");
            assert!(view.translate_nofault(hole, 8, true).is_err());
            let f = view.take_failure().expect("failure");
            assert!(f.raised && f.pending.is_some());
        });
        assert_eq!(q.stats().raised, 1);
    }

    /// A view with a fault budget raises while the budget has room, and
    /// past it fails without raising (no group queued); the budget's slot
    /// goes back when the raised failure is dropped.
    #[test]
    fn test_fault_budget_bounds_raised_faults() {
        let r = rig(true);
        let q = r.faults.as_ref().expect("queue");
        let mut tr = r.dev.translator();
        let budget = FaultBudget::new(1);
        let hole = BASE + 0x2000;
        let first = Dma::enter(&mut tr, Some(PASID), |dma| {
            let view = DmaView::with_budget(dma, &budget);
            assert!(view.translate(BASE, 8, true).is_ok(), "mapped: no slot");
            assert_eq!(budget.outstanding(), 0);
            assert!(view.translate(hole, 8, true).is_err());
            view.take_failure().expect("failure")
        });
        assert!(first.pending.is_some() && first.slot.is_some());
        assert_eq!((budget.outstanding(), q.stats().raised), (1, 1));
        // Budget spent: a second hole fails without a group.
        let second = Dma::enter(&mut tr, Some(PASID), |dma| {
            let view = DmaView::with_budget(dma, &budget);
            assert!(view.translate(hole + 0x10_0000, 8, true).is_err());
            view.take_failure().expect("failure")
        });
        assert!(second.raised && second.pending.is_none() && second.slot.is_none());
        assert_eq!((budget.outstanding(), q.stats().raised), (1, 1));
        drop(first);
        assert_eq!(budget.outstanding(), 0);
        let third = Dma::enter(&mut tr, Some(PASID), |dma| {
            let view = DmaView::with_budget(dma, &budget);
            assert!(view.translate(hole + 0x10_0000, 8, true).is_err());
            view.take_failure().expect("failure")
        });
        assert!(third.pending.is_some());
        assert_eq!(q.stats().raised, 2);
    }

    #[test]
    fn test_block_on_fault_raises_one_group_and_resumes() {
        let r = rig(true);
        let q = r.faults.as_ref().expect("queue");
        let mut tr = r.dev.translator();
        let mut job = Job::new(fill(BASE + 0x1f00, 0x200, true));
        job.desc.pasid = PASID;
        let pending = Dma::enter(&mut tr, Some(PASID), |dma| {
            let view = DmaView::new(dma);
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
        });
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
        Dma::enter(&mut tr, Some(PASID), |dma| {
            let view = DmaView::new(dma);
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
        });
    }
}
