//! The vhost-user transport, backend side, with DMA remapping.
//!
//! vhost 0.18's backend request handler rejects IOTLB messages and keeps its
//! connection type private, so the framework owns the backend-side dispatch,
//! built on vhost's public message definitions (`vhost::vhost_user::message`):
//!
//! - [`msg`]: framing (header, payload, SCM_RIGHTS fds) and one central
//!   validation step that turns bytes into a typed, checked [`msg::Request`].
//! - `mem`: the frontend's memory table, each region mapped once as an
//!   iommu-core `Memory`.
//! - `iotlb`: the device's IOAS, built from the memory table (IOVA = guest
//!   physical address) or from IOTLB updates and invalidations
//!   (`VIRTIO_F_ACCESS_PLATFORM`).
//! - `conn`: the request handlers, vring state and worker lifecycle.
//! - `backend_req`: IOTLB misses and access failures sent to the frontend.
//! - `owner`: the connection as the holder of its device's RID
//!   ([`crate::ownership::RidOwnership`]): the connection's own address
//!   space holds it unless a `/dev/iommu` service session took it over with
//!   the frontend's consent (then addresses are IOVAs of the session's IOAS
//!   and IOTLB messages are refused).
//!
//! # A RID taken over by a `/dev/iommu` session
//!
//! A connection holds its device's RID on its own address space; a service
//! session may take it over with the frontend's consent
//! ([`crate::ownership`]). While a session owns the RID:
//!
//! - ring and buffer addresses are IOVAs of the owner's IOAS, so the
//!   frontend must negotiate `VIRTIO_F_ACCESS_PLATFORM`: a SET_FEATURES
//!   without it is refused ([`Error::AccessPlatformRequired`]), the device
//!   is flagged `NEEDS_RESET` (GET_STATUS) and a session cannot take the RID
//!   of a frontend that already negotiated without it (`EINVAL`);
//! - IOTLB updates and invalidations from the frontend are refused
//!   ([`Error::IotlbWhileOwned`], a REPLY_ACK failure) and never touch the
//!   owner's IOAS; an invalidation still drops the translations it names
//!   from the private space, so nothing the frontend invalidated comes back
//!   when the session lets go;
//! - a translation miss is still reported to the frontend on the backend
//!   request channel, and the queue waits until the owner maps or copies
//!   into an IOAS (any successful IOAS_MAP or IOAS_COPY of the owning
//!   session resumes it: a queue still missing reports again);
//! - the connection never detaches the owner's attachment: a connection
//!   that ends (or starts) while owned leaves the RID alone.
//!
//! When the owner detaches, or its session closes, the RID goes back to the
//! connection's private space (replace), or is detached if no frontend is
//! connected; waiting queues are resumed on every change of hands. If that
//! replace fails the RID is detached (no translation to freed objects
//! survives) and the device is flagged `NEEDS_RESET`.
//!
//! [`Error::AccessPlatformRequired`]: Error::AccessPlatformRequired
//! [`Error::IotlbWhileOwned`]: Error::IotlbWhileOwned
//!
//! Messages implemented: GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES,
//! SET_OWNER, RESET_OWNER, SET_MEM_TABLE, ADD/REM_MEM_REG, GET_MAX_MEM_SLOTS,
//! SET_VRING_NUM/ADDR/BASE/KICK/CALL/ERR, GET_VRING_BASE, SET_VRING_ENABLE,
//! GET/SET_CONFIG, GET_QUEUE_NUM, SET/GET_STATUS, RESET_DEVICE, REPLY_ACK,
//! SET_BACKEND_REQ_FD, IOTLB_MSG and, for live migration, SET_LOG_BASE /
//! SET_LOG_FD with `VHOST_F_LOG_ALL` and `VHOST_USER_PROTOCOL_F_LOG_SHMFD`
//! (every device: the queue layer logs completed buffers and the used
//! ring, see `crate::dirty_log`).

pub(crate) mod backend_req;
pub(crate) mod conn;
pub(crate) mod iotlb;
pub(crate) mod mem;
pub mod msg;
pub(crate) mod owner;

pub use conn::{
    offered_features, offered_protocol_features, TRANSPORT_FEATURES, VHOST_USER_F_PROTOCOL_FEATURES,
};
// The virtio feature bits, where users of this transport have found them
// so far; they are the transport-independent ones of `crate::virtio`.
pub use crate::virtio::{
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_IN_ORDER, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
pub use iotlb::MAX_IOTLB_ENTRIES;
pub use mem::MAX_MEM_SLOTS;

use crate::device::DeviceError;
use crate::worker::WorkerError;

/// Errors of the vhost-user transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A GET/SET_INFLIGHT_FD request failed (not offered, or the region
    /// could not be made or mapped).
    #[error("Inflight region: {0}")]
    Inflight(String),
    /// SET_LOG_BASE failed: the connection is dropped, since the frontend
    /// waits for a reply that cannot say so, and a migration without the
    /// device's log would copy a guest its device is still writing.
    #[error("Dirty log: {0}")]
    Log(String),
    /// A malformed message or a socket failure: the connection is dropped.
    #[error("Protocol error")]
    Msg(#[source] msg::MsgError),
    /// The device's description is unusable.
    #[error("Device description invalid: {0}")]
    BadDevice(&'static str),
    /// A memory region is larger than the address space.
    #[error("Memory region of {size:#x} bytes cannot be mapped")]
    RegionTooLarge {
        /// Its size.
        size: u64,
    },
    /// Mapping a region's fd failed.
    #[error("Mapping memory region at gpa {gpa:#x} size {size:#x} failed")]
    Mmap {
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// iommu-core's error.
        #[source]
        source: iommu_core::Error,
    },
    /// The memory table is full.
    #[error("Memory table has no free slot")]
    TooManyRegions,
    /// A region overlaps an existing one.
    #[error("Memory region at gpa {gpa:#x} overlaps the region at {existing:#x}")]
    RegionOverlap {
        /// New region's address.
        gpa: u64,
        /// Existing region's address.
        existing: u64,
    },
    /// REM_MEM_REG named no region.
    #[error("No memory region at gpa {gpa:#x} to remove")]
    NoSuchRegion {
        /// Guest physical address given.
        gpa: u64,
    },
    /// An IOAS operation failed.
    #[error("IOAS {op} failed")]
    Ioas {
        /// Operation.
        op: &'static str,
        /// iommu-core's error.
        #[source]
        source: iommu_core::Error,
    },
    /// Mapping into the IOAS failed.
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
    /// Unmapping from the IOAS failed.
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
    /// Too many IOTLB translations.
    #[error("More than {MAX_IOTLB_ENTRIES} IOTLB translations")]
    TooManyMappings,
    /// An IOTLB message without VIRTIO_F_ACCESS_PLATFORM negotiated.
    #[error("IOTLB message without VIRTIO_F_ACCESS_PLATFORM")]
    NotIotlbMode,
    /// An IOTLB update names frontend memory outside the memory table.
    #[error("Frontend address range {uaddr:#x}+{size:#x} is not in the memory table")]
    UaddrNotInTable {
        /// Frontend address.
        uaddr: u64,
        /// Size.
        size: u64,
    },
    /// A ring address cannot be used.
    #[error("Ring address {addr:#x} of queue {index} is invalid or not in the memory table")]
    RingAddress {
        /// Queue.
        index: u16,
        /// Address.
        addr: u64,
    },
    /// A ring was reconfigured while running.
    #[error("Queue {index} is running")]
    RingStarted {
        /// Queue.
        index: u16,
    },
    /// A queue size the queue rejected.
    #[error("Queue {index} cannot have size {num}")]
    BadRingSize {
        /// Queue.
        index: u16,
        /// Size.
        num: u16,
    },
    /// A split ring's base that does not fit its 16-bit index.
    #[error("Queue {index} cannot start at {base:#x}")]
    BadRingBase {
        /// Queue.
        index: u16,
        /// The base given.
        base: u32,
    },
    /// Features the backend did not offer.
    #[error("Features {0:#x} were not offered")]
    FeaturesNotOffered(u64),
    /// Protocol features the backend did not offer.
    #[error("Protocol features {0:#x} were not offered")]
    ProtocolFeaturesNotOffered(u64),
    /// The device failed a request.
    #[error("Device failed the request")]
    Device(#[source] DeviceError),
    /// Workers could not be started.
    #[error("Starting workers failed")]
    Worker(#[source] WorkerError),
    /// A request the backend does not implement.
    #[error("Unsupported: {0}")]
    Unsupported(&'static str),
    /// An IOTLB update or invalidation while a `/dev/iommu` session owns the
    /// device's RID: the owner's IOAS is not the frontend's to change.
    #[error(
        "IOTLB message refused: session {owner} of the /dev/iommu service owns the device's RID"
    )]
    IotlbWhileOwned {
        /// The owning session.
        owner: u64,
    },
    /// An fd the frontend sent could not be made non-blocking
    /// ([`crate::peer_fd`]); it is not used.
    #[error("Cannot make the frontend's {what} fd non-blocking")]
    PeerFd {
        /// Which fd.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Features without `VIRTIO_F_ACCESS_PLATFORM` while a `/dev/iommu`
    /// session owns the device's RID: addresses must be IOVAs of its IOAS.
    #[error("VIRTIO_F_ACCESS_PLATFORM is required: session {owner} of the /dev/iommu service owns the device's RID, addresses are IOVAs of its IOAS")]
    AccessPlatformRequired {
        /// The owning session.
        owner: u64,
    },
}

impl Error {
    /// True if the connection must be dropped; otherwise the request is
    /// answered with a failure (REPLY_ACK) and the connection goes on.
    pub fn is_fatal(&self) -> bool {
        match self {
            Error::Msg(_) | Error::BadDevice(_) | Error::Log(_) => true,
            Error::RegionTooLarge { .. }
            | Error::Mmap { .. }
            | Error::TooManyRegions
            | Error::RegionOverlap { .. }
            | Error::NoSuchRegion { .. }
            | Error::Ioas { .. }
            | Error::Map { .. }
            | Error::Unmap { .. }
            | Error::TooManyMappings
            | Error::NotIotlbMode
            | Error::UaddrNotInTable { .. }
            | Error::RingAddress { .. }
            | Error::RingStarted { .. }
            | Error::BadRingSize { .. }
            | Error::BadRingBase { .. }
            | Error::FeaturesNotOffered(_)
            | Error::ProtocolFeaturesNotOffered(_)
            | Error::Device(_)
            | Error::Worker(_)
            | Error::Unsupported(_)
            | Error::IotlbWhileOwned { .. }
            | Error::PeerFd { .. }
            | Error::AccessPlatformRequired { .. }
            | Error::Inflight(_) => false,
        }
    }
}

/// Result of transport operations.
pub type Result<T> = std::result::Result<T, Error>;
