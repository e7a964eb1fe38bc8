//! ioasis-service: the userspace `/dev/iommu` service, between iommu-core
//! (the IOMMU model) and the device framework (crate `ioasis`).
//!
//! The crate holds the service ([`Service`], server side), its wire
//! protocol ([`proto`], [`transport`]) and client ([`Client`]), io_uring
//! fault delivery and invalidation completion ([`uring`]), device and RID
//! ownership ([`ownership`]), and the small OS-facing pieces the service
//! and the device framework share ([`sys`]: fd passing, peer fds, accept
//! backoff, socket policy, rate-limited logs). The framework re-exports
//! what backends use, so a backend names these as `ioasis::service`,
//! `ioasis::uring`, `ioasis::ownership`, `ioasis::scm`, ...
//!
//! # Features
//!
//! - `client`: [`Client`] and what it needs (the protocol, the fault
//!   channel consumer). A process that only connects builds with
//!   `default-features = false, features = ["client"]`.
//! - `server`: [`Service`] and its machinery (fault pump, invalidation
//!   hub, limits, grants, accept backoff, socket policy, the peer-write
//!   guard). The device framework depends on it.
//!
//! Both are on by default.
//!
//! # The service
//!
//! How other processes share IOAS objects with the devices of a server.
//!
//! A [`Service`] listens on a `SOCK_SEQPACKET` unix socket. Each connection
//! is a *session*: the userspace analogue of a process that opened
//! `/dev/iommu`, except that the context is the server's one shared
//! [`iommu_core::Iommu`] and the devices are the server's, found by label in
//! a [`Directory`]. Through its session a client (a VMM, an SVA client
//! driver, the quickstart driver) allocates IOAS, maps its own memory into
//! them (a memfd passed with `SCM_RIGHTS`, so the device and the client
//! touch the same pages), copies, queries and restricts IOVA ranges,
//! attaches the server's devices on their RID or on a PASID, allocates and
//! invalidates HWPTs, and allocates fault queues whose fault channel fd
//! comes back with the reply ([`crate::uring::FaultChannel`] reads it).
//!
//! # Protocol
//!
//! [`proto`] has the wire format: a 24-byte versioned header (magic,
//! version, opcode, length, fd count, flags, request id), a body per opcode,
//! replies carrying an errno that is the iommu-core errno
//! ([`iommu_core::Error::errno`]) and its message. Every message is
//! validated once, centrally, before anything executes: exact lengths,
//! bounded counts, known flags, zero reserved words, checked arithmetic,
//! the right number of fds.
//!
//! # Ownership and isolation
//!
//! - A session sees only the objects it created: any other id is `ENOENT`.
//! - A PASID attach needs a PASID the session reserved with `PASID_ALLOC`
//!   (else `EPERM`); a session detaches only what it attached.
//! - A memfd must be sealed with `F_SEAL_SHRINK` (so the client cannot
//!   truncate it under a device); [`sealed_memfd`] makes one.
//! - Every count a session can grow is bounded ([`MAX_MAPPINGS_PER_SESSION`],
//!   [`MAX_PASIDS_PER_SESSION`], [`MAX_FAULT_QUEUES_PER_SESSION`]), and
//!   what it costs the daemon is charged ([`Limits`]): the bytes it maps
//!   (per user, in the spirit of `RLIMIT_MEMLOCK`: `ENOMEM` past it, with
//!   a ceiling over all users that bounds the daemon's address space), the
//!   fds the service holds for it (`EMFILE`), its objects (`ENOSPC`), and
//!   its sessions (per user and in total: a connection past them is
//!   closed). A refusal names the limit in its message and in a
//!   (rate-limited) log line; `--limit NAME=VALUE` ([`ServiceOptions`])
//!   and [`Service::set_limits`] change them.
//! - Devices are attached only by the sessions they are granted to, and a
//!   vhost-user frontend's RID only with its consent
//!   ([`crate::ownership`]).
//! - The RID of a device a transport connection serves (a
//!   [`Directory::rid_ownership`] device, such as the framework's
//!   vhost-user devices) is held by that connection
//!   on an IOAS of its own; a session's ATTACH takes it over (replace) and
//!   makes the session its owner (another session gets `EBUSY`) until it
//!   detaches or closes, when the RID returns to the connection's IOAS. See
//!   [`crate::ownership::RidOwnership`] for the arbitration and
//!   the device framework's `ioasis::vhost_user` for what the frontend must negotiate and what it
//!   may send meanwhile.
//! - A fault queue's channel is its fd: DESTROY of a queue whose channel
//!   the client still holds (any copy of it) is `EBUSY`, as `IOMMU_DESTROY`
//!   of a FAULT object is while its fd is open; close the fd first.
//! - When the connection closes, its attachments are detached (PASIDs
//!   first), its fault channels closed, its objects destroyed (reverse
//!   order) and its PASIDs released.
//!
//! # Who owns a PASID
//!
//! A device server that takes the PASID of work from its client (an SVA
//! accelerator) asks the service: the `HELLO` reply gives the client its
//! session id ([`Client::session_id`]); the client presents it, with the
//! PASID it reserved, to the device server, which checks it with
//! [`ServiceHandle::pasid_owner`] (and may compare the session's peer pid
//! from `SO_PEERCRED` with its own client's). A [`ServiceObserver`] learns
//! of PASID reservations and of sessions closing *before* their PASIDs are
//! detached, so the device can drain that PASID's work first.
//!
//! # Running it
//!
//! The device framework's `ioasis::server::Server`'s hosted devices are a
//! [`Directory`] as they are (devices with their own socket and
//! protocol join it with `Server::add_external_device`):
//! `Service::bind(path, server.iommu().clone(), Arc::new(server.directory()))`.
//! [`Service::spawn`] runs it on its own thread; or put
//! [`Service::poll_fd`] in another event loop and call
//! [`Service::run_once`] with a zero timeout when it polls readable.
//!
//! Unmaps, detaches, replaces and HWPT invalidations requested by clients
//! are two-phase and never hold up the service: the state changes at once
//! (`*_begin`), and the request's reply is held until every device thread
//! that was inside an access section has left it (that is the unmap
//! promise: once the client reads the reply, no device uses the old
//! translations). The service keeps those waits in its
//! [`crate::uring::InvalidationHub`] and re-checks them on a 1 ms timer in
//! its epoll set (device threads leave their sections at the end of each
//! call into a device), nudging every thread still waited for again every
//! 10 ms. Meanwhile every other
//! session is served. The waiting session's socket is not read until its
//! reply has gone out, so requests it sends behind the unmap are answered
//! in order, after it; if it hangs up meanwhile it is closed at once and
//! the invalidation completes in the background. A closing session's
//! detaches complete in the background too.

#![deny(missing_docs)]

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
#[cfg(feature = "server")]
mod ledger;
#[cfg(feature = "server")]
mod limits;
#[cfg(feature = "server")]
mod options;
pub mod ownership;
pub mod proto;
#[cfg(feature = "server")]
pub mod server;
pub mod sys;
pub mod transport;
pub mod uring;

#[cfg(feature = "client")]
pub use client::{sealed_memfd, Client, ClientError, DeviceInfo, HwptRequest, MapPerm};
#[cfg(feature = "server")]
/// A device as the IOMMU context knows it (iommu-core's type, re-exported so
/// that the service's users need not name iommu-core).
pub use iommu_core::IommuDevice;
/// The HWPT allocation flag a client sets to make a HWPT PASID-capable
/// ([`HwptRequest::flags`](client::HwptRequest)).
pub use iommu_core::IOMMU_HWPT_ALLOC_PASID;
#[cfg(feature = "server")]
pub use ledger::{Exceeded, Usage};
#[cfg(feature = "server")]
pub use limits::{Limits, Resource, Scope};
#[cfg(feature = "server")]
pub use options::ServiceOptions;
pub use proto::InvalidateEntry;
#[cfg(feature = "server")]
pub use server::{
    Directory, QueueSource, Service, ServiceError, ServiceHandle, ServiceObserver, ServiceThread,
    SessionInfo, StaticDirectory, MAX_FAULT_QUEUES_PER_SESSION, MAX_MAPPINGS_PER_SESSION,
    MAX_OBJECTS_PER_SESSION, MAX_PASIDS_PER_SESSION, MAX_SESSIONS,
};
