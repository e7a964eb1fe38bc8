//! vdpa-blk: a virtio-blk device served over vhost-user on the ioasis
//! framework.
//!
//! - [`backing`]: a raw image file or block device (`O_DIRECT` where the
//!   file system allows it), or a null disk;
//! - [`config`]: the config space (capacity, `size_max`, `seg_max`,
//!   `blk_size`, `num_queues`, discard and write-zeroes limits) and
//!   feature bits;
//! - [`request`]: request layouts and the checks before any I/O;
//! - [`device`]: the framework [`Device`](ioasis::device::Device): one worker
//!   thread per queue;
//! - [`worker`]: each worker's io_uring, deferred completion of the guest's
//!   buffers (pinned against unmap while the kernel uses them);
//! - [`resize`]: SIGHUP re-reads the image's size and tells the driver
//!   of a new capacity (a config change);
//! - [`stats`]: counters as JSON lines; [`cli`]: the command line.
//!
//! Supported requests: `IN`, `OUT`, `FLUSH`, `GET_ID`, `DISCARD`,
//! `WRITE_ZEROES`. A read-only disk offers `VIRTIO_BLK_F_RO` and fails
//! writes, discards and write-zeroes with `IOERR`. Guest IOMMU
//! (`VIRTIO_F_ACCESS_PLATFORM`, IOTLB messages) comes with the framework.

#![deny(missing_docs)]

pub mod backing;
pub mod cli;
pub mod config;
pub mod device;
pub mod request;
pub mod resize;
pub mod stats;
pub mod worker;

pub use device::{BlkDevice, BlkOptions};
