//! The VDUSE transport: a device served from userspace as a real vDPA
//! device of the kernel (vDPA Device in Userspace, Linux 5.15 and later;
//! tested on Linux 6.12).
//!
//! The daemon creates the device through `/dev/vduse/control` from its
//! [`Device`](crate::device::Device) description (device type, features,
//! queue count and sizes, config space); an administrator then adds it to
//! the vDPA bus (`vdpa dev add name NAME mgmtdev vduse`), where
//! `virtio_vdpa` makes it a netdev or a disk of the host itself and
//! `vhost_vdpa` hands it to a VM. The same [`Device`](crate::device::Device)
//! and [`Worker`](crate::device::Worker) serve it as under vhost-user; only
//! the transport differs (the table in the crate's `transport` module):
//!
//! | what | vhost-user ([`crate::vhost_user`]) | VDUSE (this module) |
//! |---|---|---|
//! | control | messages on a unix socket | requests `read(2)` from `/dev/vduse/NAME` and answered with `write(2)` |
//! | start | SET_VRING_KICK | `SET_STATUS` with `DRIVER_OK`: queues from `VDUSE_VQ_GET_INFO` |
//! | addresses | memory table or IOTLB messages | always IOVAs of the kernel's domain, mapped from `VDUSE_IOTLB_GET_FD` |
//! | kick | the frontend's eventfd | our eventfd, given with `VDUSE_VQ_SETUP_KICKFD` |
//! | call | the frontend's eventfd | `VDUSE_VQ_INJECT_IRQ` |
//! | config space | GET_CONFIG / SET_CONFIG | given at creation; the kernel serves reads from its copy, refuses writes |
//! | config change | `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` | `VDUSE_DEV_SET_CONFIG` (the kernel's copy), then `VDUSE_DEV_INJECT_CONFIG_IRQ` |
//!
//! What the kernel refuses at creation (a bare `EINVAL`): a device without
//! `VIRTIO_F_ACCESS_PLATFORM` (the framework always offers it), a net
//! device without `VIRTIO_F_VERSION_1` (always offered) or with a control
//! queue (`VIRTIO_NET_F_CTRL_VQ`: a device learns it is served over VDUSE
//! from [`Device::set_transport`](crate::device::Device::set_transport) and
//! leaves it out), a block device with a writable cache setting
//! (`VIRTIO_BLK_F_CONFIG_WCE`).
//!
//! # Files
//!
//! | file | what |
//! |---|---|
//! | `sys.rs` | the uAPI: ioctl numbers, structures, wrappers |
//! | `msg.rs` | decoding the kernel's requests, encoding answers |
//! | `kernel.rs` | creating, opening, setting up and destroying the kernel's device |
//! | `space.rs` | the device's IOAS, fed from `VDUSE_IOTLB_GET_FD` |
//! | `transport.rs` | what the workers tell the driver (interrupts, misses) |
//! | `control.rs` | the control thread: requests, DRIVER_OK and reset, misses |
//!
//! # A daemon restarted while the device exists
//!
//! The kernel keeps a VDUSE device that is on the vDPA bus when its daemon
//! exits (it cannot be destroyed then), with its config space, features
//! and queue addresses; requests it sent meanwhile wait (at most its
//! `msg_timeout`, 30 s, after which the kernel marks the device broken for
//! good), and one the old daemon had read but not answered is queued again.
//! A daemon started again with the same name takes the device over
//! ([`Server::add_vduse_device`](crate::server::Server::add_vduse_device)
//! opens it instead of creating it). The kernel sends no new `DRIVER_OK`
//! to it, so when the device's queues are ready the new daemon sets them
//! up from `VDUSE_VQ_GET_INFO` and starts its workers at once.
//!
//! Linux 6.12's VDUSE keeps no record of which buffers the old daemon had
//! popped and not completed (vhost-user's frontend keeps the inflight
//! region, `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`). A device that asks for
//! inflight tracking ([`Device::inflight_tracking`](crate::device::Device::inflight_tracking),
//! vdpa-blk) gets the same record in a file that outlives the daemon
//! (`$TMPDIR/ioasis-vduse-NAME.inflight`; emptied on a driver reset,
//! removed when the device is destroyed): the new daemon resubmits what it
//! lists and resumes each queue after it. Without it (vdpa-net) a queue
//! resumes at the index of its used ring, where the old daemon's
//! completions ended, and what it had popped and not completed is popped
//! again: right for a device that completes in order. Not the avail index
//! `VDUSE_VQ_GET_INFO` reports: 6.12 keeps the one the driver started the
//! queue at (0 with `virtio_vdpa`), as the device's progress never reaches
//! the kernel.
//!
//! What a restart does not cover on 6.12: a request of the kernel's (a
//! status change, a reset, an IOTLB update) that waits for a daemon longer
//! than the device's `msg_timeout` (30 s) marks the device broken for good
//! (only `vdpa dev del` and a new device help); a device without an
//! inflight record that completes out of order would do some chains twice
//! and lose others; a request the old daemon had half done (a write that
//! reached the disk, its completion not) is done again; the kernel's own
//! resources of the old daemon (a tap device it created, with its
//! addresses and namespace) go with it and come back as the new daemon
//! creates them, unconfigured.
//! `cargo test -p ioasis-integration --test vduse_guest restart` kills
//! vdpa-blk while four readers of the guest have requests inside it and
//! restarts it: the new daemon resubmits them and every read completes with
//! the right data (it fails with the test-only build
//! `--cfg ioasis_broken="dropinflight"`); `... vduse_guest net_daemon_restart`
//! kills vdpa-net after traffic and restarts it: ping and a 4 MiB transfer
//! go through again (it fails with `--cfg ioasis_broken="vduseavail"`,
//! which resumes at the kernel's avail index).

mod control;
mod kernel;
pub mod msg;
mod space;
pub(crate) mod sys;
mod transport;

pub use kernel::{dev_path, offered_features, CONTROL_PATH, VDUSE_TRANSPORT_FEATURES};

pub(crate) use control::Control;
pub(crate) use kernel::KernelDevice;

use crate::device::DeviceError;
use crate::worker::WorkerError;

/// Errors of the VDUSE transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on a VDUSE device failed.
    #[error("VDUSE {op} failed")]
    Sys {
        /// What was done.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// VDUSE_CREATE_DEV failed (`EINVAL`: the kernel refused the
    /// description, see the module docs; `EPERM`: a net device needs
    /// `CAP_NET_ADMIN`).
    #[error("Creating VDUSE device {name:?} failed")]
    Create {
        /// The device name.
        name: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The device's description is unusable over VDUSE.
    #[error("Device description invalid for VDUSE: {0}")]
    BadDevice(&'static str),
    /// The device failed a request.
    #[error("Device failed the request")]
    Device(#[source] DeviceError),
    /// The kernel's state of a queue cannot be served.
    #[error("Queue {index}: {what}")]
    Queue {
        /// Queue index.
        index: u32,
        /// What is wrong.
        what: &'static str,
    },
    /// Workers could not be started.
    #[error("Starting workers failed")]
    Worker(#[source] WorkerError),
    /// An IOAS operation failed.
    #[error("IOAS {op} failed")]
    Ioas {
        /// Operation.
        op: &'static str,
        /// iommu-core's error.
        #[source]
        source: iommu_core::Error,
    },
    /// Mapping a kernel region failed.
    #[error("Mapping iova {iova:#x}+{len:#x} failed")]
    Map {
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
        /// iommu-core's error.
        #[source]
        source: iommu_core::Error,
    },
    /// Unmapping a region failed.
    #[error("Unmapping iova {iova:#x}+{len:#x} failed")]
    Unmap {
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
        /// iommu-core's error.
        #[source]
        source: iommu_core::Error,
    },
    /// The kernel described a region that cannot be mapped.
    #[error("Kernel IOTLB region {start:#x}..={last:#x} is malformed")]
    BadRegion {
        /// First IOVA.
        start: u64,
        /// Last IOVA.
        last: u64,
    },
    /// A region that is not read-write (the framework maps memory
    /// read-write; `virtio_vdpa`'s regions all are).
    #[error("Kernel IOTLB region {start:#x}..={last:#x} has permission {perm:#x}, not read-write")]
    Permission {
        /// First IOVA.
        start: u64,
        /// Last IOVA.
        last: u64,
        /// `VDUSE_ACCESS_*`.
        perm: u8,
    },
    /// Too many regions mapped at once.
    #[error("More than {} kernel regions mapped", space::MAX_REGIONS)]
    TooManyRegions,
    /// The kernel marked the device broken (a request went unanswered for
    /// its `msg_timeout`); only destroying it helps.
    #[error("The kernel marked the VDUSE device broken")]
    Broken,
}

/// Result of VDUSE operations.
pub type Result<T> = std::result::Result<T, Error>;
