//! Invalidation delivery: completing two-phase unmaps on the control loop.
//!
//! iommu-core makes every invalidation two-phase: `*_begin` changes the
//! shared state and bumps the generation of every affected translator (so
//! its cache is dropped at its next access section), and returns an
//! [`InvalidationTicket`] naming the translators that were *inside* a
//! section at that moment. The unmap is complete when each of them has left
//! that section.
//!
//! The hub keeps those tickets for a control loop that must not block on
//! them: [`InvalidationHub::submit`] nudges the ticket's translators (their
//! nudge hooks; a worker wedged in a write to a peer's eventfd is
//! interrupted) and [`InvalidationHub::poll_now`] reports the ones that are
//! done, seen through each ticket's section counters; the loop re-checks on
//! a timer while [`InvalidationHub::in_flight`] is not zero.
//!
//! Device threads need no part in it: they leave their access sections at
//! the end of each call into a device (bounded, about a millisecond at
//! most) and never wait inside one, so a re-check finds the section ended
//! within the timer's period.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use iommu_core::{InvalidationTicket, Iommu};

/// Longest pause between re-checks of a ticket in [`InvalidationHub::complete`].
const MAX_RECHECK: Duration = Duration::from_millis(2);

/// Identifies an invalidation handed to [`InvalidationHub::submit`].
pub type OpId = u64;

/// Counters of a hub.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HubStats {
    /// Invalidations submitted.
    pub submitted: u64,
    /// Invalidations that needed no waiting (no translator was in a section).
    pub immediate: u64,
    /// Nudges sent (ticket-wide).
    pub nudges: u64,
}

/// The control-loop side of invalidation delivery.
#[derive(Debug, Default)]
pub struct InvalidationHub {
    ops: HashMap<OpId, InvalidationTicket>,
    next_op: OpId,
    stats: HubStats,
}

impl InvalidationHub {
    /// An empty hub.
    pub fn new() -> Self {
        InvalidationHub {
            ops: HashMap::new(),
            next_op: 1,
            stats: HubStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> HubStats {
        self.stats
    }

    /// Starts delivering `ticket`: returns `None` when it is already done,
    /// else nudges its translators and returns an id that
    /// [`InvalidationHub::poll_now`] reports when complete.
    pub fn submit(&mut self, mut ticket: InvalidationTicket) -> Option<OpId> {
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

    /// Returns the invalidations that completed; never waits. For a
    /// control loop that re-checks on a timer while
    /// [`InvalidationHub::in_flight`] is not zero.
    pub fn poll_now(&mut self) -> Vec<OpId> {
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

    /// Completes `ticket` on this hub, blocking: nudges, then re-checks on a
    /// short backoff (re-nudging every 10 ms) until it is done. Returns once
    /// no translator can use the old state.
    pub fn complete(&mut self, ticket: InvalidationTicket) {
        let Some(id) = self.submit(ticket) else {
            return;
        };
        let mut backoff = Duration::from_micros(50);
        let mut last_nudge = Instant::now();
        loop {
            if self.check().contains(&id) || !self.ops.contains_key(&id) {
                return;
            }
            std::thread::sleep(backoff);
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
    ) -> iommu_core::Result<u64> {
        let (n, t) = iommu.ioas_unmap_begin(ioas, iova, len)?;
        self.complete(t);
        Ok(n)
    }

    /// Detach through the hub.
    pub fn detach(
        &mut self,
        iommu: &Iommu,
        dev_id: u32,
        pasid: Option<u32>,
    ) -> iommu_core::Result<()> {
        let t = iommu.detach_begin(dev_id, pasid)?;
        self.complete(t);
        Ok(())
    }

    /// `IOMMU_HWPT_INVALIDATE` through the hub: entries done and the first
    /// failure.
    pub fn hwpt_invalidate(
        &mut self,
        iommu: &Iommu,
        id: u32,
        entries: &[iommu_core::InvalidateEntry],
    ) -> (u32, iommu_core::Result<()>) {
        let (n, r, t) = iommu.hwpt_invalidate_begin(id, entries);
        self.complete(t);
        (n, r)
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
    }
}
