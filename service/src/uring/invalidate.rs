//! Invalidation delivery: completing two-phase unmaps on the control loop,
//! driven by io_uring.
//!
//! iommu-core makes every invalidation two-phase: `*_begin` changes the
//! shared state and bumps the generation of every affected translator (so
//! its cache is dropped at its next access section), and returns an
//! [`InvalidationTicket`] naming the translators that were *inside* a
//! section at that moment. The unmap is complete when each of them has left
//! that section.
//!
//! This module pushes that second phase to the device threads and collects
//! their answers without blocking the control loop on a condition variable:
//!
//! ```text
//!  control loop (InvalidationHub)            device thread (ThreadLink)
//!  ioas_unmap_begin -> ticket
//!  ticket.nudge() ---- doorbell eventfd ---> sees is_requested()/doorbell,
//!                                            ends its access section,
//!  ring: Read(ack eventfd) <--- ack eventfd - acknowledge()
//!  reap CQE, ticket.is_done() -> unmap returns
//! ```
//!
//! Every device thread that caches translations gets a [`ThreadLink`]
//! ([`InvalidationHub::link`]) and installs it on its translator
//! ([`ThreadLink::install`]), which makes the translator's nudge hook ring
//! the thread's doorbell. The thread polls [`ThreadLink::doorbell`] in its
//! own loop (or checks [`ThreadLink::is_requested`] between descriptors of
//! a long section) and calls [`ThreadLink::acknowledge`] after each access
//! section ends; that is one atomic swap when nothing was asked, one
//! eventfd write when it was. The hub keeps a read armed on every ack
//! eventfd in its ring; [`InvalidationHub::completion_fd`] polls readable
//! when an ack has landed, so a control loop can wait for it with epoll.
//!
//! A translator without a link still completes (the ticket watches its
//! section counter); the hub re-checks such tickets on a short backoff.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use iommu_core::{InvalidationTicket, Iommu, Translator};
use log::warn;
use nix::sys::eventfd::{EfdFlags, EventFd};

/// Most thread links one hub serves.
pub const MAX_THREAD_LINKS: usize = 1024;

/// Longest pause between re-checks of a ticket whose laggards have no link.
const MAX_RECHECK: Duration = Duration::from_millis(2);

/// Identifies an invalidation handed to [`InvalidationHub::submit`].
pub type OpId = u64;

#[derive(Debug)]
struct LinkShared {
    doorbell: EventFd,
    ack: EventFd,
    requested: AtomicBool,
}

/// A device thread's end of invalidation delivery.
#[derive(Debug, Clone)]
pub struct ThreadLink {
    shared: Arc<LinkShared>,
}

impl ThreadLink {
    /// Makes `translator`'s nudge hook ring this link's doorbell.
    pub fn install(&self, translator: &mut Translator) {
        let s = self.shared.clone();
        translator.set_nudge(Some(Arc::new(move || {
            if !s.requested.swap(true, Ordering::SeqCst) {
                // Never blocks: the counter cannot overflow with one
                // write per request.
                let _ = s.doorbell.write(1);
            }
        })));
    }

    /// Polls readable when an invalidation waits for this thread.
    pub fn doorbell(&self) -> BorrowedFd<'_> {
        self.shared.doorbell.as_fd()
    }

    /// Whether an invalidation waits for this thread to end its access
    /// section (cheap: one atomic load).
    pub fn is_requested(&self) -> bool {
        self.shared.requested.load(Ordering::Relaxed)
    }

    /// Call after an access section ends: if an invalidation asked for it,
    /// tell the hub. Returns whether an acknowledgement was sent.
    pub fn acknowledge(&self) -> bool {
        if !self.shared.requested.swap(false, Ordering::SeqCst) {
            return false;
        }
        let _ = self.shared.doorbell.read();
        if let Err(e) = self.shared.ack.write(1) {
            warn!("invalidation ack failed: {e}");
        }
        true
    }
}

/// Makes [`ThreadLink`]s for a hub from any thread (the hub adopts them
/// at its next operation). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Linker {
    pending: Arc<Mutex<Vec<Arc<LinkShared>>>>,
}

impl Linker {
    /// A new link for one device thread.
    pub fn link(&self) -> io::Result<ThreadLink> {
        let flags = EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK;
        let shared = Arc::new(LinkShared {
            doorbell: EventFd::from_value_and_flags(0, flags)?,
            ack: EventFd::from_value_and_flags(0, flags)?,
            requested: AtomicBool::new(false),
        });
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() >= MAX_THREAD_LINKS {
            return Err(io::Error::other(format!(
                "{MAX_THREAD_LINKS} links wait to be adopted"
            )));
        }
        p.push(shared.clone());
        Ok(ThreadLink { shared })
    }
}

struct LinkSlot {
    shared: Arc<LinkShared>,
    buf: Box<[u8; 8]>,
    armed: bool,
}

/// Counters of a hub.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HubStats {
    /// Invalidations submitted.
    pub submitted: u64,
    /// Invalidations that needed no waiting (no translator was in a section).
    pub immediate: u64,
    /// Acknowledgements reaped from the ring.
    pub acks: u64,
    /// Nudges sent (ticket-wide).
    pub nudges: u64,
}

/// The control-loop side of invalidation delivery.
pub struct InvalidationHub {
    // Dropped first (after draining in `Drop`): the ring, then the buffers.
    ring: IoUring,
    completion: EventFd,
    links: Vec<LinkSlot>,
    linker: Linker,
    ops: HashMap<OpId, InvalidationTicket>,
    next_op: OpId,
    stats: HubStats,
}

impl std::fmt::Debug for InvalidationHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvalidationHub")
            .field("links", &self.links.len())
            .field("ops", &self.ops.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl InvalidationHub {
    /// A hub with its own ring.
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::builder().setup_clamp().build(256)?;
        let completion =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        ring.submitter()
            .register_eventfd(completion.as_fd().as_raw_fd())?;
        Ok(InvalidationHub {
            ring,
            completion,
            links: Vec::new(),
            linker: Linker {
                pending: Arc::new(Mutex::new(Vec::new())),
            },
            ops: HashMap::new(),
            next_op: 1,
            stats: HubStats::default(),
        })
    }

    /// Polls readable when the ring has completions (acknowledgements).
    pub fn completion_fd(&self) -> BorrowedFd<'_> {
        self.completion.as_fd()
    }

    /// Counters.
    pub fn stats(&self) -> HubStats {
        self.stats
    }

    /// A linker that makes links for this hub from other threads.
    pub fn linker(&self) -> Linker {
        self.linker.clone()
    }

    /// A new link for one device thread.
    pub fn link(&mut self) -> io::Result<ThreadLink> {
        let l = self.linker.link()?;
        self.adopt()?;
        Ok(l)
    }

    /// Arms the ring's reads for links made by the linker.
    fn adopt(&mut self) -> io::Result<()> {
        let new: Vec<Arc<LinkShared>> = {
            let mut p = self
                .linker
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if p.is_empty() {
                return Ok(());
            }
            std::mem::take(&mut *p)
        };
        for shared in new {
            if self.links.len() >= MAX_THREAD_LINKS {
                warn!("invalidation hub: link dropped, {MAX_THREAD_LINKS} already served");
                continue;
            }
            self.links.push(LinkSlot {
                shared,
                buf: Box::new([0u8; 8]),
                armed: false,
            });
            self.arm(self.links.len() - 1)?;
        }
        self.ring.submit()?;
        Ok(())
    }

    fn arm(&mut self, idx: usize) -> io::Result<()> {
        let slot = &mut self.links[idx];
        if slot.armed {
            return Ok(());
        }
        let entry = opcode::Read::new(
            types::Fd(slot.shared.ack.as_fd().as_raw_fd()),
            slot.buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(idx as u64);
        if self.ring.submission().is_full() {
            self.ring.submit()?;
        }
        // SAFETY: the read targets `slot.buf`, a heap buffer owned by the
        // hub that is neither moved nor freed until this read completes
        // (`Drop` drains every armed read before the buffers go), and the
        // eventfd it reads is kept open by the same slot.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        pushed.map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))?;
        self.links[idx].armed = true;
        Ok(())
    }

    /// Reaps acknowledgements and re-arms their reads; returns how many.
    fn reap(&mut self) -> io::Result<usize> {
        let _ = self.completion.read();
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut n = 0;
        for (ud, res) in done {
            let idx = ud as usize;
            if idx >= self.links.len() {
                continue;
            }
            self.links[idx].armed = false;
            // ECANCELED: the thread that armed this read exited; it is
            // re-armed from this one below.
            if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR && res != -libc::ECANCELED {
                warn!("invalidation hub: ack read failed: {res}");
            } else if res > 0 {
                n += 1;
            }
            self.arm(idx)?;
        }
        if n > 0 || !self.ring.submission().is_empty() {
            self.ring.submit()?;
        }
        self.stats.acks += n as u64;
        Ok(n)
    }

    /// Starts delivering `ticket`: returns `None` when it is already done,
    /// else nudges its translators and returns an id that
    /// [`InvalidationHub::poll`] reports when complete.
    pub fn submit(&mut self, mut ticket: InvalidationTicket) -> Option<OpId> {
        if let Err(e) = self.adopt() {
            warn!("invalidation hub: cannot adopt new links: {e}");
        }
        self.stats.submitted += 1;
        if ticket.is_done() {
            self.stats.immediate += 1;
            return None;
        }
        ticket.nudge();
        self.stats.nudges += 1;
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(id, ticket);
        Some(id)
    }

    /// Waits up to `wait` for acknowledgements and returns the
    /// invalidations that completed.
    pub fn poll(&mut self, wait: Duration) -> io::Result<Vec<OpId>> {
        let mut done = self.check();
        if !done.is_empty() || self.ops.is_empty() {
            return Ok(done);
        }
        if !wait.is_zero() {
            let ts = types::Timespec::new()
                .sec(wait.as_secs())
                .nsec(wait.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
                Err(e) => return Err(e),
            }
        }
        self.reap()?;
        done.extend(self.check());
        Ok(done)
    }

    /// Reaps every acknowledgement that landed on the ring (whether or not
    /// an invalidation waits for it, so the completion fd is drained) and
    /// returns the invalidations that completed; never waits. For a control loop that polls
    /// [`InvalidationHub::completion_fd`] (and re-checks on a timer while
    /// [`InvalidationHub::in_flight`] is not zero, for translators without
    /// a link).
    pub fn poll_now(&mut self) -> Vec<OpId> {
        // A failed ring loses acknowledgements, not completions: tickets
        // are still seen done by their section counters.
        if let Err(e) = self.reap() {
            crate::log_limited!(log::Level::Warn, "invalidation hub: reaping: {e}");
        }
        self.check()
    }

    /// Nudges again every translator an invalidation still waits for (one
    /// that acknowledged an earlier request and entered a new section
    /// before this one was seen is asked again).
    pub fn nudge_all(&mut self) {
        for t in self.ops.values() {
            t.nudge();
            self.stats.nudges += 1;
        }
    }

    fn check(&mut self) -> Vec<OpId> {
        let mut done: Vec<OpId> = Vec::new();
        for (id, t) in self.ops.iter_mut() {
            if t.is_done() {
                done.push(*id);
            }
        }
        for id in &done {
            self.ops.remove(id);
        }
        done
    }

    /// Number of invalidations still waiting.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Completes `ticket` on this hub: nudges, then waits for
    /// acknowledgements on the ring (re-checking on a short backoff for
    /// translators without a link, and re-nudging) until it is done. Returns
    /// once no translator can use the old state.
    pub fn complete(&mut self, ticket: InvalidationTicket) -> io::Result<()> {
        let Some(id) = self.submit(ticket) else {
            return Ok(());
        };
        let mut backoff = Duration::from_micros(50);
        let mut last_nudge = Instant::now();
        loop {
            let done = self.poll(backoff)?;
            if done.contains(&id) || !self.ops.contains_key(&id) {
                return Ok(());
            }
            backoff = (backoff * 2).min(MAX_RECHECK);
            if last_nudge.elapsed() > Duration::from_millis(10) {
                if let Some(t) = self.ops.get(&id) {
                    t.nudge();
                    self.stats.nudges += 1;
                }
                last_nudge = Instant::now();
            }
        }
    }

    /// `IOMMU_IOAS_UNMAP` through the hub: returns the bytes unmapped once
    /// every device thread dropped the old translations.
    pub fn unmap(
        &mut self,
        iommu: &Iommu,
        ioas: u32,
        iova: u64,
        len: u64,
    ) -> Result<u64, HubError> {
        let (n, t) = iommu.ioas_unmap_begin(ioas, iova, len)?;
        self.complete(t).map_err(HubError::Io)?;
        Ok(n)
    }

    /// Detach through the hub.
    pub fn detach(
        &mut self,
        iommu: &Iommu,
        dev_id: u32,
        pasid: Option<u32>,
    ) -> Result<(), HubError> {
        let t = iommu.detach_begin(dev_id, pasid)?;
        self.complete(t).map_err(HubError::Io)
    }

    /// `IOMMU_HWPT_INVALIDATE` through the hub: entries done and the first
    /// failure.
    pub fn hwpt_invalidate(
        &mut self,
        iommu: &Iommu,
        id: u32,
        entries: &[iommu_core::InvalidateEntry],
    ) -> (u32, Result<(), HubError>) {
        let (n, r, t) = iommu.hwpt_invalidate_begin(id, entries);
        if let Err(e) = self.complete(t) {
            return (n, Err(HubError::Io(e)));
        }
        (n, r.map_err(HubError::Iommu))
    }
}

/// Errors of hub operations.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The iommu-core operation failed.
    #[error(transparent)]
    Iommu(#[from] iommu_core::Error),
    /// The ring failed.
    #[error("invalidation ring failed")]
    Io(#[source] io::Error),
}

impl HubError {
    /// The errno to report.
    pub fn errno(&self) -> i32 {
        match self {
            HubError::Iommu(e) => e.errno(),
            HubError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

impl Drop for InvalidationHub {
    fn drop(&mut self) {
        // Complete every pending ticket (their own drop would block anyway),
        // nudging laggards (a worker wedged in a write to a frontend's
        // eventfd is interrupted: `crate::sys::peer_write`).
        for (_, t) in self.ops.drain() {
            crate::sys::peer_write::wait_ticket(t);
        }
        // Make every armed read complete, then reap them, so the kernel
        // never writes into a freed buffer.
        for slot in &self.links {
            if slot.armed {
                let _ = slot.shared.ack.write(1);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.links.iter().any(|l| l.armed) && Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(10_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for ud in done {
                if let Some(l) = self.links.get_mut(ud as usize) {
                    l.armed = false;
                }
            }
        }
    }
}
