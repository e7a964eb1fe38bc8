//! Fault queues: I/O page fault records out, page responses in
//! (`IOMMU_FAULT_QUEUE_ALLOC`).

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::types::{FaultId, Perm};

/// `IOMMU_PGFAULT_FLAGS_PASID_VALID`: the record's `pasid` is valid.
pub const IOMMU_PGFAULT_FLAGS_PASID_VALID: u32 = 1 << 0;
/// `IOMMU_PGFAULT_FLAGS_LAST_PAGE`: the last record of its group.
pub const IOMMU_PGFAULT_FLAGS_LAST_PAGE: u32 = 1 << 1;
/// ioasis extension: `dev_id` is the vdevice's virtual id and `pasid` the
/// virtual PASID where one is mapped.
pub const IOMMU_PGFAULT_FLAGS_VIRTUAL_IDS: u32 = 1 << 31;

/// Bound on fault groups outstanding (queued or awaiting a response) per
/// device. Past it, a translation that would fault fails with
/// [`Error::FaultOverflow`](crate::Error::FaultOverflow), no record is
/// queued, and the overflow is counted in [`FaultQueueStats::overflows`].
pub const MAX_OUTSTANDING_FAULTS_PER_DEVICE: usize = 32;

/// One fault record (`struct iommu_hwpt_pgfault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRecord {
    /// `IOMMU_PGFAULT_FLAGS_*`.
    pub flags: u32,
    /// Device id: the vdevice's virtual id when the device has one
    /// (then `IOMMU_PGFAULT_FLAGS_VIRTUAL_IDS` is set), else its `DevId`.
    pub dev_id: u64,
    /// PASID (virtual where mapped), valid with `PASID_VALID`.
    pub pasid: u32,
    /// Page request group index.
    pub grpid: u32,
    /// Permission the access needed (`Perm::READ`, `Perm::WRITE`).
    pub perm: Perm,
    /// Faulting address (page aligned).
    pub addr: u64,
    /// Prefetch hint, always 0.
    pub length: u32,
    /// Cookie of the group, the same in every record of the group.
    pub cookie: u32,
}

/// Response code (`IOMMUFD_PAGE_RESP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageResponseCode {
    /// `IOMMUFD_PAGE_RESP_SUCCESS` (0): handled, retry the access.
    Success = 0,
    /// `IOMMUFD_PAGE_RESP_INVALID` (1): could not be handled.
    Invalid = 1,
}

impl TryFrom<u32> for PageResponseCode {
    type Error = crate::Error;
    /// 0 and 1 are valid; anything else is `EINVAL` (iommufd's write rule).
    fn try_from(v: u32) -> Result<Self> {
        match v {
            0 => Ok(PageResponseCode::Success),
            1 => Ok(PageResponseCode::Invalid),
            _ => Err(crate::Error::Invalid {
                what: "page response code must be 0 or 1",
            }),
        }
    }
}

/// A page response (`struct iommu_hwpt_page_response`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageResponse {
    /// Cookie of the group answered.
    pub cookie: u32,
    /// The answer.
    pub code: PageResponseCode,
}

/// State of a fault group as the raising device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultStatus {
    /// Not answered yet.
    Pending,
    /// Answered SUCCESS: retry the access.
    Success,
    /// Answered INVALID (also on detach, replace, unbind or destroy).
    Invalid,
}

/// Counters of a fault queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultQueueStats {
    /// Groups queued.
    pub raised: u64,
    /// Groups handed to the consumer.
    pub delivered: u64,
    /// Groups answered (by the consumer or automatically).
    pub answered: u64,
    /// Groups answered INVALID automatically (detach/replace/destroy).
    pub auto_answered: u64,
    /// Faults refused because a device hit
    /// [`MAX_OUTSTANDING_FAULTS_PER_DEVICE`].
    pub overflows: u64,
}

pub(crate) struct FaultInner {}

/// Consumer side of a fault queue. Poll [`FaultQueue::fd`] (readable while
/// undelivered groups exist), read whole groups with
/// [`FaultQueue::read_batch`], answer with [`FaultQueue::respond`].
#[derive(Clone)]
pub struct FaultQueue {
    pub(crate) inner: Arc<FaultInner>,
}

impl std::fmt::Debug for FaultQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultQueue").finish_non_exhaustive()
    }
}

impl FaultQueue {
    /// The queue's object id.
    pub fn id(&self) -> FaultId {
        todo!()
    }
    /// An eventfd that is readable while undelivered groups are queued.
    pub fn fd(&self) -> BorrowedFd<'_> {
        todo!()
    }
    /// Appends whole pending groups to `out`, at most `max` records in all;
    /// returns the number of records appended (0 when empty). If the first
    /// group alone exceeds `max`: [`Error::BatchTooSmall`](crate::Error::BatchTooSmall).
    pub fn read_batch(&self, out: &mut Vec<FaultRecord>, max: usize) -> Result<usize> {
        let _ = (out, max);
        todo!()
    }
    /// Answers one delivered group. Unknown or already answered cookie:
    /// [`Error::UnknownCookie`](crate::Error::UnknownCookie) (`EINVAL`).
    pub fn respond(&self, cookie: u32, code: PageResponseCode) -> Result<()> {
        let _ = (cookie, code);
        todo!()
    }
    /// Answers in order, stopping at the first bad entry; returns how many
    /// were accepted and the first error.
    pub fn respond_batch(&self, responses: &[PageResponse]) -> (usize, Result<()>) {
        let _ = responses;
        todo!()
    }
    /// Counters.
    pub fn stats(&self) -> FaultQueueStats {
        todo!()
    }
}

pub(crate) struct Group {}

/// The raising device's handle on one fault group: poll
/// [`PendingFault::status`] or block in [`PendingFault::wait`]. A
/// per-device waker ([`Device::set_fault_waker`](crate::Device::set_fault_waker))
/// is called when any group of the device is answered.
#[derive(Clone)]
pub struct PendingFault {
    pub(crate) group: Arc<Group>,
}

impl PartialEq for PendingFault {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.group, &other.group)
    }
}
impl Eq for PendingFault {}

impl std::fmt::Debug for PendingFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingFault").finish_non_exhaustive()
    }
}

impl PendingFault {
    /// The group's cookie.
    pub fn cookie(&self) -> u32 {
        todo!()
    }
    /// The faulting address.
    pub fn addr(&self) -> u64 {
        todo!()
    }
    /// Current state, without blocking.
    pub fn status(&self) -> FaultStatus {
        todo!()
    }
    /// Blocks until answered.
    pub fn wait(&self) -> FaultStatus {
        todo!()
    }
    /// Blocks until answered or `timeout` passed; returns the state then.
    pub fn wait_timeout(&self, timeout: Duration) -> FaultStatus {
        let _ = timeout;
        todo!()
    }
}
