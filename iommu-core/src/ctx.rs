//! The context: one `Iommu` is one open `/dev/iommu`.

use std::sync::Arc;

use crate::device::Device;
use crate::error::Result;
use crate::event::EventQueue;
use crate::fault::FaultQueue;
use crate::memory::Memory;
use crate::sync::InvalidationTicket;
use crate::types::*;

pub(crate) struct CtxInner {}

/// One iommufd context: a table of objects addressed by 31-bit ids from 1.
/// Cheap to clone (an `Arc`); `Send + Sync`. When the last clone is dropped
/// every object is destroyed and every device unbound.
#[derive(Clone)]
pub struct Iommu {
    pub(crate) inner: Arc<CtxInner>,
}

impl std::fmt::Debug for Iommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iommu").finish_non_exhaustive()
    }
}

impl Default for Iommu {
    fn default() -> Self {
        Iommu::new()
    }
}

#[allow(unused_variables)]
impl Iommu {
    /// A new, empty context.
    pub fn new() -> Iommu {
        todo!()
    }

    /// `IOMMU_DESTROY`: destroys an object. `ENOENT` for unknown ids and
    /// tombstones; `EBUSY` while anything depends on it.
    pub fn destroy(&self, id: ObjectId) -> Result<()> {
        todo!()
    }

    /// The kind of a live object.
    pub fn object_kind(&self, id: ObjectId) -> Result<ObjectKind> {
        todo!()
    }

    /// Binds a device (`VFIO_DEVICE_BIND_IOMMUFD`). A device bound anywhere
    /// already → [`Error::AlreadyBound`](crate::Error::AlreadyBound) (`EBUSY`).
    pub fn bind(&self, device: &Device) -> Result<DevId> {
        todo!()
    }

    /// Unbinds: detaches every PASID and the RID (waiting as
    /// [`Iommu::detach`] does), tombstones its vdevice, frees the id.
    pub fn unbind(&self, dev_id: DevId) -> Result<()> {
        self.unbind_begin(dev_id)?.wait();
        Ok(())
    }

    /// Two-phase [`Iommu::unbind`].
    pub fn unbind_begin(&self, dev_id: DevId) -> Result<InvalidationTicket> {
        todo!()
    }

    /// `IOMMU_GET_HW_INFO`.
    pub fn hw_info(&self, dev_id: DevId) -> Result<HwInfo> {
        todo!()
    }

    /// Attaches `pt_id` (an IOAS: auto domain; or a HWPT) to the device's RID
    /// (`pasid = None`) or to a PASID; returns the HWPT id used.
    pub fn attach(&self, dev_id: DevId, pasid: Option<u32>, pt_id: ObjectId) -> Result<HwptId> {
        todo!()
    }

    /// Replaces the attachment; returns once no translator uses the old one.
    pub fn replace(&self, dev_id: DevId, pasid: Option<u32>, pt_id: ObjectId) -> Result<HwptId> {
        let (id, t) = self.replace_begin(dev_id, pasid, pt_id)?;
        t.wait();
        Ok(id)
    }

    /// Two-phase [`Iommu::replace`].
    pub fn replace_begin(
        &self,
        dev_id: DevId,
        pasid: Option<u32>,
        pt_id: ObjectId,
    ) -> Result<(HwptId, InvalidationTicket)> {
        todo!()
    }

    /// Detaches; returns once no translator uses the old attachment.
    pub fn detach(&self, dev_id: DevId, pasid: Option<u32>) -> Result<()> {
        self.detach_begin(dev_id, pasid)?.wait();
        Ok(())
    }

    /// Two-phase [`Iommu::detach`].
    pub fn detach_begin(&self, dev_id: DevId, pasid: Option<u32>) -> Result<InvalidationTicket> {
        todo!()
    }

    /// The HWPT attached on the RID or a PASID, if any.
    pub fn attached_hwpt(&self, dev_id: DevId, pasid: Option<u32>) -> Result<Option<HwptId>> {
        todo!()
    }

    /// `IOMMU_IOAS_ALLOC`.
    pub fn ioas_alloc(&self) -> Result<IoasId> {
        todo!()
    }

    /// `IOMMU_IOAS_MAP` / `MAP_FILE`: maps `len` bytes of `mem` from
    /// `mem_offset` at the fixed `iova` or an allocated one; returns the IOVA.
    pub fn ioas_map(
        &self,
        ioas: IoasId,
        mem: &Arc<Memory>,
        mem_offset: u64,
        len: u64,
        iova: Option<u64>,
        perm: Perm,
    ) -> Result<u64> {
        todo!()
    }

    /// `IOMMU_IOAS_UNMAP`: removes the whole areas inside the range (iova 0
    /// and length `u64::MAX`: all) and returns the bytes unmapped, once no
    /// device can use them any more.
    pub fn ioas_unmap(&self, ioas: IoasId, iova: u64, len: u64) -> Result<u64> {
        let (n, t) = self.ioas_unmap_begin(ioas, iova, len)?;
        t.wait();
        Ok(n)
    }

    /// Two-phase [`Iommu::ioas_unmap`].
    pub fn ioas_unmap_begin(
        &self,
        ioas: IoasId,
        iova: u64,
        len: u64,
    ) -> Result<(u64, InvalidationTicket)> {
        todo!()
    }

    /// `IOMMU_IOAS_COPY`: maps the pages behind `src`'s range into `dst`.
    pub fn ioas_copy(
        &self,
        dst: IoasId,
        src: IoasId,
        src_iova: u64,
        len: u64,
        dst_iova: Option<u64>,
        perm: Perm,
    ) -> Result<u64> {
        todo!()
    }

    /// `IOMMU_IOAS_IOVA_RANGES`.
    pub fn ioas_iova_ranges(&self, ioas: IoasId) -> Result<IovaRanges> {
        todo!()
    }

    /// `IOMMU_IOAS_ALLOW_IOVAS`: replaces the allowed list (empty: clear).
    pub fn ioas_allow_iovas(&self, ioas: IoasId, ranges: &[IovaRange]) -> Result<()> {
        todo!()
    }

    /// Adds a user reservation (the selftests' `ADD_RESERVED`).
    pub fn ioas_add_reserved(&self, ioas: IoasId, range: IovaRange) -> Result<()> {
        todo!()
    }

    /// The areas of an IOAS, ascending.
    pub fn ioas_areas(&self, ioas: IoasId) -> Result<Vec<AreaInfo>> {
        todo!()
    }

    /// `IOMMU_HWPT_ALLOC`.
    pub fn hwpt_alloc(&self, args: &HwptAlloc) -> Result<HwptId> {
        todo!()
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING`.
    pub fn hwpt_set_dirty_tracking(&self, hwpt: HwptId, enable: bool) -> Result<()> {
        todo!()
    }

    /// `IOMMU_HWPT_INVALIDATE` on a nested HWPT or a vIOMMU; returns the
    /// number of entries done (`entry_num` out) and the first error.
    pub fn hwpt_invalidate(&self, id: ObjectId, entries: &[InvalidateEntry]) -> (u32, Result<()>) {
        let (n, r, t) = self.hwpt_invalidate_begin(id, entries);
        t.wait();
        (n, r)
    }

    /// Two-phase [`Iommu::hwpt_invalidate`].
    pub fn hwpt_invalidate_begin(
        &self,
        id: ObjectId,
        entries: &[InvalidateEntry],
    ) -> (u32, Result<()>, InvalidationTicket) {
        todo!()
    }

    /// `IOMMU_FAULT_QUEUE_ALLOC`.
    pub fn fault_queue_alloc(&self) -> Result<(FaultId, FaultQueue)> {
        todo!()
    }

    /// `IOMMU_VIOMMU_ALLOC` over a nest-parent HWPT.
    pub fn viommu_alloc(&self, dev_id: DevId, hwpt: HwptId) -> Result<ViommuId> {
        todo!()
    }

    /// `IOMMU_VDEVICE_ALLOC`: gives the device virtual id `virt_id`.
    pub fn vdevice_alloc(
        &self,
        viommu: ViommuId,
        dev_id: DevId,
        virt_id: u64,
    ) -> Result<VdeviceId> {
        todo!()
    }

    /// Maps virtual PASID `vpasid` of the vdevice to physical `ppasid`.
    pub fn vdevice_set_vpasid(&self, vdevice: VdeviceId, vpasid: u32, ppasid: u32) -> Result<()> {
        todo!()
    }

    /// Removes a vPASID mapping.
    pub fn vdevice_clear_vpasid(&self, vdevice: VdeviceId, vpasid: u32) -> Result<()> {
        todo!()
    }

    /// The physical PASID behind a vdevice's virtual PASID.
    pub fn vdevice_ppasid(&self, vdevice: VdeviceId, vpasid: u32) -> Result<u32> {
        todo!()
    }

    /// `IOMMU_VEVENTQ_ALLOC` on a vIOMMU, or (`None`) the context-wide queue
    /// for devices without one.
    pub fn event_queue_alloc(
        &self,
        viommu: Option<ViommuId>,
        depth: u32,
    ) -> Result<(EventQueueId, EventQueue)> {
        todo!()
    }
}
