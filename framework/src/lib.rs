//! ioasis: a userspace device-server framework for vDPA and SVA.
//!
//! # Model
//!
//! A backend process runs one [`Server`](server::Server). The server hosts any
//! number of devices, each listening on its own unix socket for a vhost-user
//! frontend (QEMU, DPDK virtio-user, cloud-hypervisor, ...), and all sharing
//! one iommu-core [`Iommu`](iommu_core::Iommu) context, so devices of one
//! process can be attached to the same I/O address space (IOAS).
//!
//! A device is written against two small traits in [`device`]: [`Device`]
//! (what the device is: type, features, config space, queues, threading) and
//! [`Worker`] (the data plane of one worker thread). Workers see their
//! virtqueues through [`Queue`](queue::Queue) handles and reach frontend memory
//! only through the [`Dma`](dma::Dma) handle, which translates every access
//! through the device's IOAS, fragment by fragment. A translation miss is a
//! typed error, never a touch of unmapped memory.
//!
//! The data plane (the worker threads) knows no transport: what it tells the
//! driver (misses, access failures, calls, failed rings) goes through a small
//! internal transport trait, and so does a device's config change
//! ([`config_space::ConfigNotifier`]). The vhost-user transport ([`vhost_user`])
//! implements it and owns the backend side of the protocol. Without `VIRTIO_F_ACCESS_PLATFORM` the frontend's memory table
//! becomes the device's IOAS (IOVA = guest physical address); with it, the
//! frontend's IOTLB updates and invalidations become maps and unmaps of that
//! IOAS, and a miss is sent back to the frontend while the queue waits.
//! The VDUSE transport ([`vduse`]) serves the same devices as vDPA devices
//! of the kernel (`/dev/vduse`): the kernel's IOTLB regions become the
//! device's IOAS, kicks arrive on eventfds and calls are injected
//! interrupts.
//! The virtio feature and status bits both transports negotiate are in
//! [`virtio`]; neither transport imports the other.
//!
//! The `/dev/iommu` service through which other processes share the
//! server's IOAS objects is crate `ioasis-service`, below this one;
//! [`service`], [`uring`], [`ownership`] and the shared OS pieces
//! ([`scm`], [`eventfd`], [`epoll`], [`le`], [`peer_fd`], [`peer_write`],
//! [`accept`], [`socket_policy`], [`ratelimit`]: one piece of code per
//! mechanism) are re-exported from it. [`iommu`] has what a backend
//! needs of iommu-core, so that no backend depends on it directly.
//!
//! # Signals
//!
//! The framework reserves one real-time signal, `SIGRTMIN() + 5`
//! ([`peer_write::reserved_signal`]): it interrupts a worker thread wedged
//! in a write to a frontend's eventfd. Its handler is installed when the
//! first worker thread starts; an application must not install another
//! handler for that signal nor block it in the framework's threads.
//! [`Server::handle_signals`](server::Server::handle_signals) takes SIGINT
//! and SIGTERM.
//!
//! [`Device`]: device::Device
//! [`Worker`]: device::Worker
#![deny(missing_docs)]

pub mod affinity;
pub mod config_space;
pub mod context;
pub mod device;
mod dirty_log;
pub mod dma;
#[cfg(feature = "fault-injection")]
pub mod fault_injection;
pub mod iommu;
pub mod poll;
pub mod queue;
mod removed;
pub mod server;
pub mod termination;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
mod transport;
pub mod vduse;
pub mod vhost_user;
pub mod virtio;
mod worker;

/// The `/dev/iommu` service (crate `ioasis-service`): server, client and
/// wire protocol.
pub use ioasis_service as service;
/// The OS-facing pieces the framework shares with the service (crate
/// `ioasis-service`'s `sys` module), under the names backends use.
pub use ioasis_service::sys::{
    accept, epoll, eventfd, le, peer_fd, peer_write, ratelimit, scm, socket_policy,
};
pub use ioasis_service::{log_limited, ownership, uring};

pub(crate) use ioasis_service::sys::error_chain;
