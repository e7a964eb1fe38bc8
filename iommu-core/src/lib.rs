//! The /dev/iommu object model in userspace (work in progress).
