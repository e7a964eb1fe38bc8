//! vIOMMUs and vdevices (iommufd's `viommu.c`): a vIOMMU over a
//! nest-parent HWPT, a device's virtual id on it, and the device's
//! virtual-to-physical PASID table.

use std::collections::HashMap;

use super::{no_such, Iommu, Object, VdevEntry, ViommuEntry};
use crate::error::{Error, Result};
use crate::types::*;

impl Iommu {
    /// `IOMMU_VIOMMU_ALLOC` over a nest-parent HWPT. Unknown HWPT → `ENOENT`;
    /// not a nest parent → `EINVAL`; device without nesting → `EOPNOTSUPP`.
    pub fn viommu_alloc(&self, dev_id: DevId, hwpt: HwptId) -> Result<ViommuId> {
        let mut st = self.lock();
        let info = st.dev(dev_id)?.shared.info.clone();
        let h = st.hwpt(hwpt)?;
        if h.nested.is_some() || h.flags & IOMMU_HWPT_ALLOC_NEST_PARENT == 0 {
            return Err(Error::Invalid {
                what: "a vIOMMU needs a nest-parent HWPT",
            });
        }
        if !info.nesting {
            return Err(Error::NotSupported {
                what: "the device does not support nesting",
            });
        }
        st.insert(Object::Viommu(ViommuEntry { parent: hwpt }))
    }

    /// `IOMMU_VDEVICE_ALLOC`: gives the device virtual id `virt_id`. A
    /// device with a vdevice already, or a taken `virt_id` → `EEXIST`.
    pub fn vdevice_alloc(
        &self,
        viommu: ViommuId,
        dev_id: DevId,
        virt_id: u64,
    ) -> Result<VdeviceId> {
        let mut st = self.lock();
        if !matches!(st.objects.get(&viommu), Some(Object::Viommu(_))) {
            return Err(no_such("vIOMMU", viommu));
        }
        let dev = st.dev(dev_id)?;
        if dev.vdevice.is_some() {
            return Err(Error::AlreadyExists {
                what: "a vdevice for this device",
            });
        }
        let shared = dev.shared.clone();
        let taken = st
            .objects
            .values()
            .any(|o| matches!(o, Object::Vdevice(v) if v.viommu == viommu && v.virt_id == virt_id));
        if taken {
            return Err(Error::AlreadyExists {
                what: "this virtual device id",
            });
        }
        let id = st.insert(Object::Vdevice(VdevEntry {
            viommu,
            dev_id,
            virt_id,
            v2p: HashMap::new(),
        }))?;
        st.dev_mut(dev_id)?.vdevice = Some(id);
        let mut v = shared.virt_write();
        v.virt_id = Some(virt_id);
        v.p2v.clear();
        Ok(id)
    }

    /// Maps virtual PASID `vpasid` of the vdevice to physical `ppasid`.
    /// A taken vPASID or pPASID → `EEXIST`; a pPASID beyond the device's
    /// width → `EINVAL`.
    pub fn vdevice_set_vpasid(&self, vdevice: VdeviceId, vpasid: u32, ppasid: u32) -> Result<()> {
        let mut st = self.lock();
        let v = st.vdev(vdevice)?;
        let shared = st.dev(v.dev_id)?.shared.clone();
        let width = shared.info.max_pasid_log2;
        if width == 0 || u64::from(ppasid) >= 1u64 << width.min(32) {
            return Err(Error::Invalid {
                what: "physical PASID beyond the device's PASID width",
            });
        }
        if v.v2p.contains_key(&vpasid) || v.v2p.values().any(|p| *p == ppasid) {
            return Err(Error::AlreadyExists {
                what: "this vPASID or pPASID mapping",
            });
        }
        if let Some(Object::Vdevice(v)) = st.objects.get_mut(&vdevice) {
            v.v2p.insert(vpasid, ppasid);
        }
        shared.virt_write().p2v.insert(ppasid, vpasid);
        Ok(())
    }

    /// Removes a vPASID mapping (`ENOENT` when absent).
    pub fn vdevice_clear_vpasid(&self, vdevice: VdeviceId, vpasid: u32) -> Result<()> {
        let mut st = self.lock();
        let dev_id = st.vdev(vdevice)?.dev_id;
        let shared = st.dev(dev_id)?.shared.clone();
        let Some(Object::Vdevice(v)) = st.objects.get_mut(&vdevice) else {
            return Err(no_such("vdevice", vdevice));
        };
        let Some(p) = v.v2p.remove(&vpasid) else {
            return Err(no_such("vPASID", vpasid));
        };
        shared.virt_write().p2v.remove(&p);
        Ok(())
    }

    /// The physical PASID behind a vdevice's virtual PASID.
    pub fn vdevice_ppasid(&self, vdevice: VdeviceId, vpasid: u32) -> Result<u32> {
        let st = self.lock();
        st.vdev(vdevice)?
            .v2p
            .get(&vpasid)
            .copied()
            .ok_or(no_such("vPASID", vpasid))
    }
}
