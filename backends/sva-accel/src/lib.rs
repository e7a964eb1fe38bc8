//! sva-accel: a software accelerator with the programming model of Intel DSA.
//!
//! Clients share their own address space with the device through a PASID:
//! memory they allocate through the client driver ([`client`]) is mapped in
//! the device's view at the same addresses as in the client, so descriptors
//! carry plain pointers. Work is submitted as 64-byte descriptors ([`desc`])
//! through a per-client portal ([`wq`]), executed by worker threads over the
//! client's address space ([`engine`], [`device`]), and completed with 32-byte
//! completion records written back into client memory. A page the device
//! cannot translate either ends the descriptor with a partial completion
//! (block-on-fault off) or parks it and raises an I/O page fault that the
//! client answers (block-on-fault on).
//!
//! Memory is shared through the framework's `/dev/iommu` service: the
//! client sets up an IOAS mirroring its own addresses and a PASID of the
//! device on a fault-capable HWPT, and every device access is translated by
//! iommu-core for (device, PASID) ([`iommu`]). [`space`] is a memfd-backed
//! [`engine::DmaMemory`] without iommu-core that only the benchmark uses (to
//! measure the engine alone).

#![deny(missing_docs)]

pub mod cli;
pub mod client;
pub mod control;

mod copy;

pub mod crc;
pub mod desc;
pub mod device;
pub mod engine;
#[cfg(feature = "fault-injection")]
pub mod inject;
pub mod iommu;
pub mod proto;
pub mod shm;
pub mod space;
pub mod wq;
