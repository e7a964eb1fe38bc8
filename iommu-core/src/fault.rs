//! Fault queues: I/O page fault records out, page responses in
//! (`IOMMU_FAULT_QUEUE_ALLOC`).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::device::DeviceShared;
use crate::error::{Error, Result};
use crate::fault_budget::{FaultBudget, FaultSlot};
use crate::prim::{AtomicU32, Condvar, Mutex};
use crate::queue_file::{FileRef, QueueFile};
use crate::sync::lock;
use crate::types::{FaultId, Perm};

/// `IOMMU_PGFAULT_FLAGS_PASID_VALID`: the record's `pasid` is valid.
pub const IOMMU_PGFAULT_FLAGS_PASID_VALID: u32 = 1 << 0;
/// `IOMMU_PGFAULT_FLAGS_LAST_PAGE`: the last record of its group.
pub const IOMMU_PGFAULT_FLAGS_LAST_PAGE: u32 = 1 << 1;
/// ioasis extension: `dev_id` is the vdevice's virtual id and `pasid` the
/// virtual PASID where one is mapped.
pub const IOMMU_PGFAULT_FLAGS_VIRTUAL_IDS: u32 = 1 << 31;

/// Default bound on fault groups outstanding (queued or awaiting a
/// response) per device
/// ([`IommuDevice::set_max_outstanding_faults`](crate::IommuDevice::set_max_outstanding_faults)
/// changes it). Past it, a translation that would fault fails with
/// [`Error::FaultOverflow`](crate::Error::FaultOverflow), no record is
/// queued, and the overflow is counted in [`FaultQueueStats::overflows`].
pub const MAX_OUTSTANDING_FAULTS_PER_DEVICE: usize = 32;

/// Most records in one fault group: an access that misses on several
/// consecutive pages raises one group with a record per page, up to this
/// many.
pub const MAX_FAULT_GROUP_RECORDS: usize = 16;

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

impl FaultRecord {
    /// Whether this is the last record of its group
    /// ([`IOMMU_PGFAULT_FLAGS_LAST_PAGE`]).
    pub fn is_last(&self) -> bool {
        self.flags & IOMMU_PGFAULT_FLAGS_LAST_PAGE != 0
    }

    /// The PASID, if the record carries one
    /// ([`IOMMU_PGFAULT_FLAGS_PASID_VALID`]).
    pub fn pasid(&self) -> Option<u32> {
        (self.flags & IOMMU_PGFAULT_FLAGS_PASID_VALID != 0).then_some(self.pasid)
    }
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

impl PageResponse {
    /// A SUCCESS answer for the group `cookie`.
    pub fn success(cookie: u32) -> Self {
        PageResponse {
            cookie,
            code: PageResponseCode::Success,
        }
    }

    /// An INVALID answer for the group `cookie`.
    pub fn invalid(cookie: u32) -> Self {
        PageResponse {
            cookie,
            code: PageResponseCode::Invalid,
        }
    }
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
    /// Faults refused because a device hit its bound
    /// ([`MAX_OUTSTANDING_FAULTS_PER_DEVICE`] by default) or the queue's
    /// budget ([`FaultQueue::set_budget`]) had no slot left.
    pub overflows: u64,
}

pub(crate) struct FaultInner {
    pub(crate) id: FaultId,
    state: Mutex<FaultState>,
    efd: EventFd,
    /// Open while a [`FaultQueue`] handle exists (destroy → `EBUSY`).
    pub(crate) file: FileRef,
}

#[derive(Default)]
struct FaultState {
    destroyed: bool,
    next_cookie: u32,
    /// Every outstanding group by cookie, with "delivered" set once read.
    groups: HashMap<u32, (Arc<Group>, bool)>,
    /// Cookies not yet delivered, oldest first.
    undelivered: VecDeque<u32>,
    stats: FaultQueueStats,
    /// The budget every group raised here takes a slot of, if any.
    budget: Option<Arc<FaultBudget>>,
}

impl FaultInner {
    /// A new fault queue and its first handle.
    pub(crate) fn open(id: FaultId) -> Result<FaultQueue> {
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| Error::os("eventfd", e))?;
        let (file, file_ref) = FileRef::open();
        let inner = Arc::new(FaultInner {
            id,
            state: Mutex::new(FaultState {
                next_cookie: 1,
                ..FaultState::default()
            }),
            efd,
            file: file_ref,
        });
        Ok(FaultQueue { inner, _file: file })
    }

    fn signal(&self) {
        if let Err(e) = self.efd.write(1) {
            log::warn!("fault queue {}: eventfd write failed: {e}", self.id);
        }
    }

    fn drain_signal(&self) {
        // EAGAIN when already zero is fine.
        let _ = self.efd.read();
    }

    /// Queues a group of records for `dev`; cookies and LAST_PAGE are
    /// filled in here.
    pub(crate) fn raise(
        &self,
        dev: &Arc<DeviceShared>,
        pasid_key: u32,
        mut records: Vec<FaultRecord>,
    ) -> Result<PendingFault> {
        let mut st = lock(&self.state);
        if st.destroyed {
            return Err(Error::QueueDestroyed { id: self.id });
        }
        // The queue's budget first, then the device's bound; a slot taken
        // from the budget goes back (dropped) if the device has none.
        let budget_slot = match &st.budget {
            None => None,
            Some(b) => match b.try_take() {
                Some(s) => Some(s),
                None => {
                    let why = format!("its budget of {} page faults is used up", b.limit());
                    return Err(self.overflow(&mut st, dev, &why));
                }
            },
        };
        if !dev.try_take_fault_slot() {
            let why = format!(
                "the device has {} page faults outstanding",
                dev.max_outstanding_faults()
            );
            return Err(self.overflow(&mut st, dev, &why));
        }
        let mut cookie = st.next_cookie;
        // At most the device's bound outstanding: a free cookie is found
        // quickly.
        while cookie == 0 || st.groups.contains_key(&cookie) {
            cookie = cookie.wrapping_add(1);
        }
        st.next_cookie = cookie.wrapping_add(1);
        for r in records.iter_mut() {
            r.cookie = cookie;
        }
        if let Some(r) = records.last_mut() {
            r.flags |= IOMMU_PGFAULT_FLAGS_LAST_PAGE;
        }
        let group = Arc::new(Group {
            cookie,
            addr: records.first().map_or(0, |r| r.addr),
            records,
            dev: dev.clone(),
            pasid_key,
            budget_slot: Mutex::new(budget_slot),
            status: Mutex::new(FaultStatus::Pending),
            cv: Condvar::new(),
            waiters: AtomicU32::new(0),
        });
        st.groups.insert(cookie, (group.clone(), false));
        st.undelivered.push_back(cookie);
        st.stats.raised += 1;
        if st.undelivered.len() == 1 {
            self.signal();
        }
        Ok(PendingFault { group })
    }

    /// Counts a refused fault and says why: at warn level for a queue's
    /// first, at debug level after it (how often faults are raised, and so
    /// refused, is up to whoever accesses memory, a peer's device or
    /// driver; [`FaultQueueStats::overflows`] counts them all).
    fn overflow(&self, st: &mut FaultState, dev: &DeviceShared, why: &str) -> Error {
        st.stats.overflows += 1;
        if st.stats.overflows == 1 {
            log::warn!(
                "fault queue {}: a page fault of device {:?} refused: {why} \
                 (further refusals on this queue are logged at debug level)",
                self.id,
                dev.label
            );
        } else {
            log::debug!(
                "fault queue {}: a page fault of device {:?} refused: {why}",
                self.id,
                dev.label
            );
        }
        Error::FaultOverflow {
            label: dev.label.to_string(),
        }
    }

    /// Answers INVALID every outstanding group of `dev` (on `pasid_key`, or
    /// all of the device's when `None`; every group when `dev` is `None`).
    pub(crate) fn auto_respond(
        &self,
        dev: Option<&Arc<DeviceShared>>,
        pasid_key: Option<u32>,
    ) -> AutoAnswered {
        let done: Vec<Arc<Group>> = {
            let mut st = lock(&self.state);
            let cookies: Vec<u32> = st
                .groups
                .iter()
                .filter(|(_, (g, _))| {
                    dev.is_none_or(|d| Arc::ptr_eq(d, &g.dev))
                        && pasid_key.is_none_or(|p| p == g.pasid_key)
                })
                .map(|(c, _)| *c)
                .collect();
            let mut out = Vec::with_capacity(cookies.len());
            for c in cookies {
                if let Some((g, _)) = st.groups.remove(&c) {
                    out.push(g);
                }
            }
            let before = st.undelivered.len();
            let groups = std::mem::take(&mut st.groups);
            st.undelivered.retain(|c| groups.contains_key(c));
            st.groups = groups;
            if before != 0 && st.undelivered.is_empty() {
                self.drain_signal();
            }
            st.stats.answered += out.len() as u64;
            st.stats.auto_answered += out.len() as u64;
            out
        };
        AutoAnswered(done)
    }

    pub(crate) fn destroy(&self) -> AutoAnswered {
        lock(&self.state).destroyed = true;
        self.auto_respond(None, None)
    }
}

/// Groups answered INVALID automatically; the raising devices learn of it
/// when [`AutoAnswered::finish`] runs (after the caller's locks are gone).
#[derive(Default)]
pub(crate) struct AutoAnswered(Vec<Arc<Group>>);

impl AutoAnswered {
    pub(crate) fn append(&mut self, mut o: AutoAnswered) {
        self.0.append(&mut o.0);
    }
    pub(crate) fn finish(self) {
        for g in self.0 {
            g.complete(FaultStatus::Invalid);
        }
    }
}

/// Consumer side of a fault queue. Poll [`FaultQueue::fd`] (readable while
/// undelivered groups exist), read whole groups with
/// [`FaultQueue::read_batch`], answer with [`FaultQueue::respond`].
///
/// A handle is the queue's fd (a clone is a `dup` of it): while any handle
/// exists, [`Iommu::destroy`](crate::Iommu::destroy) of the queue fails with
/// `EBUSY`, as `IOMMU_DESTROY` does while a fault fd is open.
#[derive(Clone)]
pub struct FaultQueue {
    pub(crate) inner: Arc<FaultInner>,
    _file: Arc<QueueFile>,
}

impl std::fmt::Debug for FaultQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultQueue").finish_non_exhaustive()
    }
}

impl FaultQueue {
    /// The queue's object id.
    pub fn id(&self) -> FaultId {
        self.inner.id
    }
    /// An eventfd that is readable while undelivered groups are queued.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.efd.as_fd()
    }
    /// Appends whole pending groups to `out`, at most `max` records in all;
    /// returns the number of records appended (0 when empty). If the first
    /// group alone exceeds `max`: [`Error::BatchTooSmall`](crate::Error::BatchTooSmall).
    pub fn read_batch(&self, out: &mut Vec<FaultRecord>, max: usize) -> Result<usize> {
        let inner = &self.inner;
        let mut st = lock(&inner.state);
        if st.destroyed {
            return Err(Error::QueueDestroyed { id: inner.id });
        }
        let mut n = 0;
        while let Some(&cookie) = st.undelivered.front() {
            let Some((g, delivered)) = st.groups.get_mut(&cookie) else {
                st.undelivered.pop_front();
                continue;
            };
            let len = g.records.len();
            if n + len > max {
                if n == 0 {
                    return Err(Error::BatchTooSmall { needed: len, max });
                }
                break;
            }
            out.extend_from_slice(&g.records);
            *delivered = true;
            n += len;
            st.undelivered.pop_front();
            st.stats.delivered += 1;
        }
        if n > 0 && st.undelivered.is_empty() {
            inner.drain_signal();
        }
        Ok(n)
    }
    /// Answers one delivered group. Unknown or already answered cookie:
    /// [`Error::UnknownCookie`](crate::Error::UnknownCookie) (`EINVAL`).
    pub fn respond(&self, cookie: u32, code: PageResponseCode) -> Result<()> {
        let g = {
            let mut st = lock(&self.inner.state);
            if st.destroyed {
                return Err(Error::QueueDestroyed { id: self.inner.id });
            }
            match st.groups.get(&cookie) {
                Some((_, true)) => {}
                _ => return Err(Error::UnknownCookie { cookie }),
            }
            st.stats.answered += 1;
            match st.groups.remove(&cookie) {
                Some((g, _)) => g,
                None => return Err(Error::UnknownCookie { cookie }),
            }
        };
        g.complete(match code {
            PageResponseCode::Success => FaultStatus::Success,
            PageResponseCode::Invalid => FaultStatus::Invalid,
        });
        Ok(())
    }
    /// Answers in order, stopping at the first bad entry; returns how many
    /// were accepted and the first error.
    pub fn respond_batch(&self, responses: &[PageResponse]) -> (usize, Result<()>) {
        for (i, r) in responses.iter().enumerate() {
            if let Err(e) = self.respond(r.cookie, r.code) {
                return (i, Err(e));
            }
        }
        (responses.len(), Ok(()))
    }
    /// Sets (or clears) the budget that every fault group raised on this
    /// queue from now on takes a slot of, before the device's own slot: with
    /// no slot left the access fails with
    /// [`Error::FaultOverflow`](crate::Error::FaultOverflow) and
    /// [`FaultQueueStats::overflows`] counts it. A group gives its slot back
    /// when it is answered ([`FaultQueue::respond`], or INVALID on detach,
    /// replace, unbind or destroy). Groups already outstanding keep the slot
    /// they took (or none). Share one budget among several queues to bound
    /// them together.
    pub fn set_budget(&self, budget: Option<Arc<FaultBudget>>) {
        lock(&self.inner.state).budget = budget;
    }
    /// The budget set with [`FaultQueue::set_budget`], if any.
    pub fn budget(&self) -> Option<Arc<FaultBudget>> {
        lock(&self.inner.state).budget.clone()
    }
    /// Counters.
    pub fn stats(&self) -> FaultQueueStats {
        lock(&self.inner.state).stats
    }
    /// Groups queued but not yet read.
    pub fn undelivered(&self) -> usize {
        lock(&self.inner.state).undelivered.len()
    }
}

pub(crate) struct Group {
    cookie: u32,
    addr: u64,
    records: Vec<FaultRecord>,
    dev: Arc<DeviceShared>,
    pasid_key: u32,
    /// The slot of the queue's budget the group holds until answered.
    budget_slot: Mutex<Option<FaultSlot>>,
    status: Mutex<FaultStatus>,
    cv: Condvar,
    /// Threads blocked in `wait*`; changed only with `status` locked, so
    /// `complete` skips the wake-up syscall when nobody waits (the common
    /// case for event-loop devices that use the waker instead).
    waiters: AtomicU32,
}

impl Group {
    fn complete(self: &Arc<Self>, status: FaultStatus) {
        {
            let mut s = lock(&self.status);
            if *s != FaultStatus::Pending {
                return;
            }
            // Only the first completion gets here, so each slot is given
            // back once; and before the answer is seen, so that a device
            // that retries on the answer and faults again finds its slots.
            drop(lock(&self.budget_slot).take());
            self.dev.release_fault_slot();
            *s = status;
            if self.waiters.load(Ordering::Relaxed) != 0 {
                self.cv.notify_all();
            }
        }
        let waker = self.dev.fault_waker();
        if let Some(w) = waker {
            w(&PendingFault {
                group: self.clone(),
            });
        }
    }
}

/// The raising device's handle on one fault group: poll
/// [`PendingFault::status`] or block in [`PendingFault::wait`]. A
/// per-device waker ([`IommuDevice::set_fault_waker`](crate::IommuDevice::set_fault_waker))
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
        self.group.cookie
    }
    /// The faulting address.
    pub fn addr(&self) -> u64 {
        self.group.addr
    }
    /// Current state, without blocking.
    pub fn status(&self) -> FaultStatus {
        *lock(&self.group.status)
    }
    /// Blocks until answered.
    pub fn wait(&self) -> FaultStatus {
        let mut s = lock(&self.group.status);
        while *s == FaultStatus::Pending {
            self.group.waiters.fetch_add(1, Ordering::Relaxed);
            s = match self.group.cv.wait(s) {
                Ok(g) => g,
                Err(e) => e.into_inner(),
            };
            self.group.waiters.fetch_sub(1, Ordering::Relaxed);
        }
        *s
    }
    /// Blocks until answered or `timeout` passed; returns the state then.
    pub fn wait_timeout(&self, timeout: Duration) -> FaultStatus {
        let deadline = Instant::now().checked_add(timeout);
        let mut s = lock(&self.group.status);
        while *s == FaultStatus::Pending {
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(l) if !l.is_zero() => l,
                    _ => break,
                },
                None => Duration::from_secs(3600),
            };
            self.group.waiters.fetch_add(1, Ordering::Relaxed);
            s = match self.group.cv.wait_timeout(s, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
            self.group.waiters.fetch_sub(1, Ordering::Relaxed);
        }
        *s
    }
}
