//! A device as the IOMMU context knows it: the handle the service's
//! directory offers and a device's own code translates through.

use iommu_core::{DevId, Error, FaultWaker, HwInfo, Iommu, Translator};

/// A device as the IOMMU context knows it (its label, its hardware
/// information, its binding to a context), and the source of the
/// translators a device's threads access memory through.
///
/// This is the handle a [`Directory`](crate::Directory) offers
/// and the device framework hands to devices it does not serve itself, so
/// that neither a backend nor the framework's users name iommu-core's
/// device type. Cheap to clone: clones are the same device.
#[derive(Clone, Debug)]
pub struct IommuDevice(iommu_core::Device);

impl IommuDevice {
    /// A device `label` with hardware information `info`, not yet bound to
    /// a context ([`IommuDevice::bind`]).
    pub fn new(label: impl Into<String>, info: HwInfo) -> IommuDevice {
        IommuDevice(iommu_core::Device::new(label, info))
    }

    /// Binds the device to `iommu` (once; a second bind is an error) and
    /// returns its binding id there.
    pub fn bind(&self, iommu: &Iommu) -> Result<DevId, Error> {
        iommu.bind(&self.0)
    }

    /// The device's label.
    pub fn label(&self) -> &str {
        self.0.label()
    }

    /// The hardware information the device reports.
    pub fn hw_info(&self) -> &HwInfo {
        self.0.hw_info()
    }

    /// The binding id, when bound.
    pub fn dev_id(&self) -> Option<DevId> {
        self.0.dev_id()
    }

    /// A translator of the device: one per thread that accesses memory.
    pub fn translator(&self) -> Translator {
        self.0.translator()
    }

    /// Runs `waker` whenever a fault group of the device is answered
    /// (`None` removes it).
    pub fn set_fault_waker(&self, waker: Option<FaultWaker>) {
        self.0.set_fault_waker(waker);
    }

    /// I/O page fault groups of the device raised and not yet resumed.
    pub fn outstanding_faults(&self) -> usize {
        self.0.outstanding_faults()
    }

    /// The most fault groups the device may have outstanding.
    pub fn set_max_outstanding_faults(&self, n: usize) {
        self.0.set_max_outstanding_faults(n);
    }
}

impl From<iommu_core::Device> for IommuDevice {
    fn from(d: iommu_core::Device) -> IommuDevice {
        IommuDevice(d)
    }
}
