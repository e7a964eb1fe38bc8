//! Event queues: unrecoverable translation failures (vEVENTQ-like).

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::error::{Error, Result};
use crate::prim::Mutex;
use crate::queue_file::{FileRef, QueueFile};
use crate::sync::lock;
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

pub(crate) struct EventInner {
    pub(crate) id: EventQueueId,
    depth: usize,
    state: Mutex<EventState>,
    efd: EventFd,
    /// Open while an [`EventQueue`] handle exists (destroy → `EBUSY`).
    pub(crate) file: FileRef,
}

#[derive(Default)]
struct EventState {
    destroyed: bool,
    queue: VecDeque<EventRecord>,
    next_seq: u32,
    /// Events were dropped since the last read: a lost-events record is
    /// delivered after the queued ones.
    lost_pending: bool,
    stats: EventQueueStats,
}

impl EventInner {
    /// A new event queue and its first handle.
    pub(crate) fn open(id: EventQueueId, depth: u32) -> Result<EventQueue> {
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| Error::os("eventfd", e))?;
        let (file, file_ref) = FileRef::open();
        let inner = Arc::new(EventInner {
            id,
            depth: depth as usize,
            state: Mutex::new(EventState::default()),
            efd,
            file: file_ref,
        });
        Ok(EventQueue { inner, _file: file })
    }

    /// Queues an event (its `sequence` and `flags` are set here). On a full
    /// queue the event is dropped, its sequence number consumed, and the
    /// lost-events marker set.
    pub(crate) fn push(&self, mut ev: EventRecord) {
        let mut st = lock(&self.state);
        if st.destroyed {
            return;
        }
        let seq = st.next_seq;
        st.next_seq = if seq >= i32::MAX as u32 { 0 } else { seq + 1 };
        let was_empty = st.queue.is_empty() && !st.lost_pending;
        if st.queue.len() >= self.depth {
            st.lost_pending = true;
            st.stats.lost += 1;
        } else {
            ev.sequence = seq;
            ev.flags = 0;
            st.queue.push_back(ev);
            st.stats.queued += 1;
        }
        if was_empty {
            if let Err(e) = self.efd.write(1) {
                log::warn!("event queue {}: eventfd write failed: {e}", self.id);
            }
        }
    }

    pub(crate) fn destroy(&self) {
        let mut st = lock(&self.state);
        st.destroyed = true;
        st.queue.clear();
    }
}

/// Consumer side of an event queue; poll [`EventQueue::fd`].
///
/// A handle is the queue's fd (a clone is a `dup` of it): while any handle
/// exists, [`Iommu::destroy`](crate::Iommu::destroy) of the queue fails with
/// `EBUSY`, as `IOMMU_DESTROY` does while a vEVENTQ fd is open.
#[derive(Clone)]
pub struct EventQueue {
    pub(crate) inner: Arc<EventInner>,
    _file: Arc<QueueFile>,
}

impl std::fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue").finish_non_exhaustive()
    }
}

impl EventQueue {
    /// The queue's object id.
    pub fn id(&self) -> EventQueueId {
        self.inner.id
    }
    /// An eventfd readable while events are pending.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.efd.as_fd()
    }
    /// Appends up to `max` records to `out` (a lost-events record counts as
    /// one); returns how many (0 when none is pending). `max == 0`, room
    /// for no record, is `EINVAL` whether or not events are pending
    /// (iommufd's `iommufd_veventq_fops_read` refuses a count below one
    /// record header before it looks at the queue).
    pub fn read_batch(&self, out: &mut Vec<EventRecord>, max: usize) -> Result<usize> {
        if max == 0 {
            return Err(Error::Invalid {
                what: "an event queue read needs room for at least one record",
            });
        }
        let inner = &self.inner;
        let mut st = lock(&inner.state);
        if st.destroyed {
            return Err(Error::QueueDestroyed { id: inner.id });
        }
        let mut n = 0;
        while n < max {
            let Some(ev) = st.queue.pop_front() else {
                break;
            };
            out.push(ev);
            n += 1;
        }
        if n < max && st.queue.is_empty() && st.lost_pending {
            st.lost_pending = false;
            out.push(EventRecord {
                flags: IOMMU_VEVENTQ_FLAG_LOST_EVENTS,
                sequence: st.next_seq,
                dev_id: 0,
                pasid: None,
                addr: 0,
                perm: Perm::NONE,
                reason: EventReason::Lost,
            });
            n += 1;
        }
        if st.queue.is_empty() && !st.lost_pending {
            let _ = inner.efd.read();
        }
        Ok(n)
    }
    /// Counters.
    pub fn stats(&self) -> EventQueueStats {
        lock(&self.inner.state).stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> EventRecord {
        EventRecord {
            flags: 0,
            sequence: 0,
            dev_id: 1,
            pasid: None,
            addr: 0x1000,
            perm: Perm::READ,
            reason: EventReason::NotMapped,
        }
    }

    #[test]
    fn test_sequence_wraps_at_int_max() {
        let eq = EventInner::open(1, 4).expect("eventq");
        lock(&eq.inner.state).next_seq = i32::MAX as u32;
        eq.inner.push(ev());
        eq.inner.push(ev());
        let mut out = Vec::new();
        assert_eq!(eq.read_batch(&mut out, 8), Ok(2));
        assert_eq!(out[0].sequence, i32::MAX as u32);
        assert_eq!(out[1].sequence, 0);
    }

    #[test]
    fn test_lost_record_after_drain_only() {
        let eq = EventInner::open(1, 1).expect("eventq");
        eq.inner.push(ev());
        eq.inner.push(ev());
        let mut out = Vec::new();
        // The batch of one takes the event; the lost marker comes next.
        assert_eq!(eq.read_batch(&mut out, 1), Ok(1));
        assert_eq!(eq.read_batch(&mut out, 1), Ok(1));
        assert_eq!(out[1].flags, IOMMU_VEVENTQ_FLAG_LOST_EVENTS);
        assert_eq!(out[1].sequence, 2);
        assert_eq!(eq.read_batch(&mut out, 1), Ok(0));
        assert_eq!(eq.stats(), EventQueueStats { queued: 1, lost: 1 });
    }
}
