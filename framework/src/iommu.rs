//! What a backend needs of the IOMMU model (iommu-core), so that backends
//! depend on the framework only.
//!
//! [`IommuDevice`] is a device as the IOMMU context knows it: what
//! [`Server::add_external_device`](crate::server::Server::add_external_device)
//! returns and a device's own code translates through. The rest are
//! iommu-core's types as they are.

pub use ioasis_service::IommuDevice;
pub use iommu_core::{
    DevId, Error, FaultBudget, FaultQueue, FaultSlot, HwInfo, HwptAlloc, Iommu, Memory,
    IOMMU_HWPT_ALLOC_PASID,
};
