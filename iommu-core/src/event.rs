//! Event queues: unrecoverable translation failures (vEVENTQ-like).

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use crate::error::Result;
use crate::types::{EventQueueId, Perm};

/// `IOMMU_VEVENTQ_FLAG_LOST_EVENTS`: events were dropped before this
/// header-only record because the queue was full.
pub const IOMMU_VEVENTQ_FLAG_LOST_EVENTS: u32 = 1;
/// Largest event queue depth (iommufd's `1 << 19`).
pub const MAX_EVENT_QUEUE_DEPTH: u32 = 1 << 19;

/// Why a translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventReason {
    /// Nothing mapped at the address.
    NotMapped,
    /// Mapped without the permission asked for.
    Permission,
    /// The stage-1 table could not be walked (table not mapped in stage 2).
    BadStage1Table,
    /// Header-only record: events were lost (see `flags`).
    Lost,
}

/// One event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRecord {
    /// `IOMMU_VEVENTQ_FLAG_*`.
    pub flags: u32,
    /// Sequence number, 0..=i32::MAX then wrapping to 0; a gap of n > 1
    /// means n - 1 events were lost.
    pub sequence: u32,
    /// Device: the virtual id where the device has a vdevice, else its DevId.
    pub dev_id: u64,
    /// PASID of the access (virtual where mapped), `None` for the RID.
    pub pasid: Option<u32>,
    /// Faulting address.
    pub addr: u64,
    /// Permission asked for.
    pub perm: Perm,
    /// Why it failed.
    pub reason: EventReason,
}

/// Counters of an event queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventQueueStats {
    /// Events queued.
    pub queued: u64,
    /// Events dropped because the queue was full.
    pub lost: u64,
}

pub(crate) struct EventInner {}

/// Consumer side of an event queue; poll [`EventQueue::fd`].
#[derive(Clone)]
pub struct EventQueue {
    pub(crate) inner: Arc<EventInner>,
}

impl std::fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue").finish_non_exhaustive()
    }
}

impl EventQueue {
    /// The queue's object id.
    pub fn id(&self) -> EventQueueId {
        todo!()
    }
    /// An eventfd readable while events are pending.
    pub fn fd(&self) -> BorrowedFd<'_> {
        todo!()
    }
    /// Appends up to `max` records to `out` (a lost-events record counts as
    /// one); returns how many.
    pub fn read_batch(&self, out: &mut Vec<EventRecord>, max: usize) -> Result<usize> {
        let _ = (out, max);
        todo!()
    }
    /// Counters.
    pub fn stats(&self) -> EventQueueStats {
        todo!()
    }
}
