//! The one error type of the crate.
//!
//! Every variant names the errno that iommufd returns for the same condition,
//! so a VMM or a `/dev/iommu` service can pass it through unchanged
//! ([`Error::errno`]).

use crate::fault::PendingFault;
use crate::types::Perm;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Every failure of the object model and of device-side translation.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum Error {
    /// The id names no live object of the expected kind (also a tombstoned
    /// id, or an object of the wrong kind where iommufd answers `ENOENT`).
    /// errno: `ENOENT`.
    #[error("no {kind} with id {id}")]
    NoSuchObject {
        /// What kind of object was expected.
        kind: &'static str,
        /// The id looked up.
        id: u32,
    },
    /// The id names an object of a kind this operation cannot take where
    /// iommufd answers `EINVAL` (e.g. `pt_id` of `HWPT_ALLOC`).
    /// errno: `EINVAL`.
    #[error("object {id} is not a valid {expected}")]
    WrongObjectType {
        /// The id given.
        id: u32,
        /// What the operation expected.
        expected: &'static str,
    },
    /// The object is still referenced (an IOAS with HWPTs, an attached HWPT,
    /// a parent with children, ...), or the PASID/device is already taken.
    /// errno: `EBUSY`.
    #[error("object {id} is busy: {reason}")]
    Busy {
        /// The object, device or PASID that is busy.
        id: u32,
        /// Why.
        reason: &'static str,
    },
    /// The device is already bound to a context (this one or another).
    /// errno: `EBUSY`.
    #[error("device {label:?} is already bound")]
    AlreadyBound {
        /// The device label.
        label: String,
    },
    /// A flag, type or feature this implementation or the device does not
    /// support. errno: `EOPNOTSUPP`.
    #[error("not supported: {what}")]
    NotSupported {
        /// What was asked for.
        what: &'static str,
    },
    /// A semantically bad argument. errno: `EINVAL`.
    #[error("invalid argument: {what}")]
    Invalid {
        /// What was wrong.
        what: &'static str,
    },
    /// A length of zero where a length is required. errno: `EINVAL`.
    #[error("length is zero")]
    ZeroLength,
    /// `start + length - 1` overflows, or a value is at or above
    /// `u64::MAX` where iommufd refuses it. errno: `EOVERFLOW`.
    #[error("range {start:#x}+{length:#x} overflows")]
    Overflow {
        /// Start of the range.
        start: u64,
        /// Its length.
        length: u64,
    },
    /// A value is not a multiple of the required alignment. errno: `EINVAL`.
    #[error("{value:#x} is not aligned to {align:#x}")]
    Misaligned {
        /// The offending value.
        value: u64,
        /// The required alignment.
        align: u64,
    },
    /// The object or id already exists (a second vdevice for a device, a
    /// taken virtual id or vPASID, a second event queue). errno: `EEXIST`.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What exists.
        what: &'static str,
    },
    /// A fixed IOVA range intersects an existing area. errno: `EEXIST`.
    #[error("iova range {iova:#x}+{length:#x} overlaps an existing area")]
    Exists {
        /// Start of the requested range.
        iova: u64,
        /// Its length.
        length: u64,
    },
    /// A fixed IOVA range intersects a reserved range or lies outside the
    /// allowed ranges. errno: `EINVAL`.
    #[error("iova range {iova:#x}+{length:#x} is reserved or not allowed")]
    ReservedIova {
        /// Start of the requested range.
        iova: u64,
        /// Its length.
        length: u64,
    },
    /// No free IOVA range of the requested size and alignment. errno: `ENOSPC`.
    #[error("no free iova range of length {length:#x}")]
    NoSpace {
        /// The requested length.
        length: u64,
    },
    /// An unmap or copy range is not exactly covered by whole areas, or
    /// nothing is mapped there. errno: `ENOENT`.
    #[error("iova range {iova:#x}+{length:#x} is not covered by whole areas")]
    NotMapped {
        /// Start of the range.
        iova: u64,
        /// Its length.
        length: u64,
    },
    /// A reservation or allowed range conflicts with areas, reservations or
    /// the allowed list. errno: `EADDRINUSE`.
    #[error("iova range {start:#x}..={last:#x} is in use")]
    AddressInUse {
        /// First IOVA of the conflicting range.
        start: u64,
        /// Last IOVA of the conflicting range.
        last: u64,
    },
    /// Writable access asked for pages that were mapped read-only.
    /// errno: `EPERM`.
    #[error("write permission requested on read-only pages at {iova:#x}")]
    ReadOnlyPages {
        /// The source IOVA.
        iova: u64,
    },
    /// A memory range lies outside its backing memory or file. errno: `EINVAL`.
    #[error("memory range {offset:#x}+{length:#x} exceeds size {size:#x}")]
    OutOfBounds {
        /// Offset into the memory.
        offset: u64,
        /// Length asked for.
        length: u64,
        /// Size of the memory.
        size: u64,
    },
    /// A fault response names a cookie that is not awaiting a response.
    /// errno: `EINVAL`.
    #[error("no fault group with cookie {cookie} awaits a response")]
    UnknownCookie {
        /// The cookie given.
        cookie: u32,
    },
    /// The first pending fault group does not fit in the batch (iommufd's
    /// read rule). errno: `EINVAL`.
    #[error("the next fault group has {needed} records, the batch allows {max}")]
    BatchTooSmall {
        /// Records in the next group.
        needed: usize,
        /// The batch size given.
        max: usize,
    },
    /// A system call failed (memfd, mmap, eventfd). errno: the system one.
    #[error("{op} failed: errno {errno}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The raw errno.
        errno: i32,
    },
    /// Device side: no translation exists for the address on a HWPT without
    /// a fault queue (an event is queued where an event queue exists).
    /// errno: `ENOENT` (what `access_rw` returns for a hole).
    #[error("iova {iova:#x} (pasid {pasid:?}) is not mapped")]
    Unmapped {
        /// The PASID of the access, if any.
        pasid: Option<u32>,
        /// The faulting address.
        iova: u64,
    },
    /// Device side: the translation exists but lacks the permission asked
    /// for. errno: `EPERM`.
    #[error("iova {iova:#x} (pasid {pasid:?}) does not allow {perm:?}")]
    AccessDenied {
        /// The PASID of the access, if any.
        pasid: Option<u32>,
        /// The faulting address.
        iova: u64,
        /// The permission asked for.
        perm: Perm,
    },
    /// Device side: an I/O page fault was raised on a fault-capable HWPT.
    /// End the access section, wait for [`PendingFault`] and retry.
    /// errno: `EAGAIN`.
    #[error("page fault raised at {iova:#x}, cookie {cookie}")]
    FaultRaised {
        /// The faulting address.
        iova: u64,
        /// The fault group's cookie.
        cookie: u32,
        /// Handle to learn the response.
        pending: PendingFault,
    },
    /// Device side: the device already has its bound of fault groups
    /// outstanding
    /// ([`MAX_OUTSTANDING_FAULTS_PER_DEVICE`](crate::MAX_OUTSTANDING_FAULTS_PER_DEVICE)
    /// unless [`IommuDevice::set_max_outstanding_faults`](crate::IommuDevice::set_max_outstanding_faults)
    /// changed it), or the fault queue's budget
    /// ([`FaultQueue::set_budget`](crate::FaultQueue::set_budget)) has no
    /// slot left; the access fails and the overflow is counted. errno:
    /// `EBUSY`.
    #[error("too many outstanding page faults on device {label:?}")]
    FaultOverflow {
        /// The device label.
        label: String,
    },
    /// Device side: nothing is attached to the device on this PASID (DMA is
    /// blocked). errno: `ENODEV`.
    #[error("nothing attached on pasid {pasid:?}")]
    NotAttached {
        /// The PASID of the access, if any.
        pasid: Option<u32>,
    },
    /// The queue's object was destroyed. errno: `ENODEV`.
    #[error("queue {id} was destroyed")]
    QueueDestroyed {
        /// The queue id.
        id: u32,
    },
}

impl Error {
    /// The errno iommufd (or the device path) returns for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NoSuchObject { .. } => libc::ENOENT,
            Error::WrongObjectType { .. } => libc::EINVAL,
            Error::Busy { .. } => libc::EBUSY,
            Error::AlreadyBound { .. } => libc::EBUSY,
            Error::NotSupported { .. } => libc::EOPNOTSUPP,
            Error::Invalid { .. } => libc::EINVAL,
            Error::ZeroLength => libc::EINVAL,
            Error::Overflow { .. } => libc::EOVERFLOW,
            Error::Misaligned { .. } => libc::EINVAL,
            Error::AlreadyExists { .. } => libc::EEXIST,
            Error::Exists { .. } => libc::EEXIST,
            Error::ReservedIova { .. } => libc::EINVAL,
            Error::NoSpace { .. } => libc::ENOSPC,
            Error::NotMapped { .. } => libc::ENOENT,
            Error::AddressInUse { .. } => libc::EADDRINUSE,
            Error::ReadOnlyPages { .. } => libc::EPERM,
            Error::OutOfBounds { .. } => libc::EINVAL,
            Error::UnknownCookie { .. } => libc::EINVAL,
            Error::BatchTooSmall { .. } => libc::EINVAL,
            Error::Os { errno, .. } => *errno,
            Error::Unmapped { .. } => libc::ENOENT,
            Error::AccessDenied { .. } => libc::EPERM,
            Error::FaultRaised { .. } => libc::EAGAIN,
            Error::FaultOverflow { .. } => libc::EBUSY,
            Error::NotAttached { .. } => libc::ENODEV,
            Error::QueueDestroyed { .. } => libc::ENODEV,
        }
    }

    /// True for the device-side translation failures a DMA engine reports
    /// to its guest (as opposed to control-plane misuse).
    pub fn is_translation_failure(&self) -> bool {
        match self {
            Error::Unmapped { .. }
            | Error::AccessDenied { .. }
            | Error::FaultRaised { .. }
            | Error::FaultOverflow { .. }
            | Error::NotAttached { .. } => true,
            Error::NoSuchObject { .. }
            | Error::WrongObjectType { .. }
            | Error::Busy { .. }
            | Error::AlreadyBound { .. }
            | Error::NotSupported { .. }
            | Error::Invalid { .. }
            | Error::ZeroLength
            | Error::Overflow { .. }
            | Error::Misaligned { .. }
            | Error::AlreadyExists { .. }
            | Error::Exists { .. }
            | Error::ReservedIova { .. }
            | Error::NoSpace { .. }
            | Error::NotMapped { .. }
            | Error::AddressInUse { .. }
            | Error::ReadOnlyPages { .. }
            | Error::OutOfBounds { .. }
            | Error::UnknownCookie { .. }
            | Error::BatchTooSmall { .. }
            | Error::Os { .. }
            | Error::QueueDestroyed { .. } => false,
        }
    }

    pub(crate) fn os(op: &'static str, e: nix::errno::Errno) -> Self {
        Error::Os {
            op,
            errno: e as i32,
        }
    }
}
