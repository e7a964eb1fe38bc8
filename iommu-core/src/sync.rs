//! The unmap-safety protocol: per-translator slots and invalidation tickets
//! (see the crate docs for the protocol).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::prim::{AtomicU64, AtomicUsize, Condvar, Mutex, MutexGuard};

/// A hook the invalidator may call to nudge a device thread that sits in an
/// access section (e.g. write its eventfd or wake its ring). It must not
/// block.
pub type Nudge = Arc<dyn Fn() + Send + Sync>;

/// A translator that still holds old state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslatorInfo {
    /// Unique id of the translator (see [`Translator::id`](crate::Translator::id)).
    pub translator: u64,
    /// Label of its device.
    pub label: String,
}

/// Locks a std mutex, ignoring poisoning (the protected state stays
/// consistent: every critical section of this crate is panic-free on
/// peer input).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The orderings of the protocol's two store-then-load pairs: a section
/// start stores `active` then loads `gen`; an invalidation bumps `gen` then
/// loads `active`. Both sequentially consistent, so that at least one side
/// sees the other (see the crate docs).
#[cfg(not(ioasis_broken = "acqrel"))]
const PAIR_STORE: Ordering = Ordering::SeqCst;
#[cfg(not(ioasis_broken = "acqrel"))]
const PAIR_RMW: Ordering = Ordering::SeqCst;
#[cfg(not(ioasis_broken = "acqrel"))]
const PAIR_LOAD: Ordering = Ordering::SeqCst;
// Test-only build (`--cfg ioasis_broken="acqrel"`): the pairs weakened to
// Release/Acquire, which lets both loads miss the other side's store (store
// buffering); kept so that the loom models can show they find it.
#[cfg(ioasis_broken = "acqrel")]
const PAIR_STORE: Ordering = Ordering::Release;
#[cfg(ioasis_broken = "acqrel")]
const PAIR_RMW: Ordering = Ordering::AcqRel;
#[cfg(ioasis_broken = "acqrel")]
const PAIR_LOAD: Ordering = Ordering::Acquire;

/// A process-wide id counter, not part of the protocol: std's atomic, also
/// under loom (whose atomics cannot live in a static).
static NEXT_TRANSLATOR_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The shared half of one translator.
pub(crate) struct Slot {
    pub(crate) id: u64,
    pub(crate) label: Arc<str>,
    /// Bumped by invalidators.
    pub(crate) gen: AtomicU64,
    /// Odd while an access section is open.
    pub(crate) active: AtomicU64,
    waiters: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
    nudge: Mutex<Option<Nudge>>,
}

impl Slot {
    pub(crate) fn new(label: Arc<str>) -> Slot {
        Slot {
            id: NEXT_TRANSLATOR_ID.fetch_add(1, Ordering::Relaxed),
            label,
            gen: AtomicU64::new(0),
            active: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            nudge: Mutex::new(None),
        }
    }

    /// Section start: returns the current `gen`.
    #[inline]
    pub(crate) fn enter(&self) -> u64 {
        let a = self.active.load(Ordering::Relaxed);
        self.active.store(a | 1, PAIR_STORE);
        self.gen.load(PAIR_LOAD)
    }

    /// Section end.
    #[inline]
    pub(crate) fn leave(&self) {
        let a = self.active.load(Ordering::Relaxed);
        self.active.store((a | 1).wrapping_add(1), Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) != 0 {
            let _g = lock(&self.lock);
            self.cv.notify_all();
        }
    }

    /// Invalidator side: bump `gen`; returns `Some(active)` when a section
    /// is open and must be waited for.
    pub(crate) fn invalidate(&self) -> Option<u64> {
        self.gen.fetch_add(1, PAIR_RMW);
        let a = self.active.load(PAIR_LOAD);
        (a & 1 == 1).then_some(a)
    }

    fn passed(&self, seen: u64) -> bool {
        self.active.load(Ordering::SeqCst) != seen
    }

    /// Waits until `active != seen` or the deadline; true when passed.
    fn wait_passed(&self, seen: u64, deadline: Option<Instant>) -> bool {
        if self.passed(seen) {
            return true;
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut g = lock(&self.lock);
        let ok = loop {
            if self.passed(seen) {
                break true;
            }
            // The timeout only bounds a lost-wakeup bug; the translator
            // notifies under the lock after ending its section.
            let mut step = Duration::from_millis(5);
            if let Some(d) = deadline {
                let now = Instant::now();
                if now >= d {
                    break false;
                }
                step = step.min(d - now);
            }
            g = match self.cv.wait_timeout(g, step) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        };
        drop(g);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        ok
    }

    pub(crate) fn set_nudge(&self, n: Option<Nudge>) {
        *lock(&self.nudge) = n;
    }
}

/// Starts an invalidation of `slots`; the ticket holds those in a section.
pub(crate) fn invalidate_slots<'a>(
    slots: impl IntoIterator<Item = &'a Arc<Slot>>,
) -> InvalidationTicket {
    let mut waits = Vec::new();
    for s in slots {
        if let Some(a) = s.invalidate() {
            waits.push((s.clone(), a));
        }
    }
    InvalidationTicket { waits }
}

/// The access sections that may still use translations of one address
/// space although their translator no longer reaches it: a device whose
/// attachment was detached, replaced or unbound while one of its
/// translators was inside a section. Kept by the IOAS (under its lock), so
/// that an unmap of the IOAS that runs before those sections end waits for
/// them too, however the detaching caller waits on its own ticket. An entry
/// is dropped once its section has ended.
#[derive(Default)]
pub(crate) struct Departed {
    waits: Vec<(Arc<Slot>, u64)>,
}

impl Departed {
    /// Invalidates `slots` (they are leaving the address space: their next
    /// section sees the new attachment) and records those inside a section.
    /// Returns the ticket for those sections.
    pub(crate) fn depart(&mut self, slots: &[Arc<Slot>]) -> InvalidationTicket {
        self.prune();
        let mut waits = Vec::new();
        for s in slots {
            if let Some(a) = s.invalidate() {
                if !self.waits.iter().any(|(d, b)| Arc::ptr_eq(d, s) && *b == a) {
                    self.waits.push((s.clone(), a));
                }
                waits.push((s.clone(), a));
            }
        }
        InvalidationTicket { waits }
    }

    /// A ticket for the recorded sections that have not ended yet.
    pub(crate) fn pending(&self) -> InvalidationTicket {
        let waits = self
            .waits
            .iter()
            .filter(|(s, a)| !s.passed(*a))
            .cloned()
            .collect();
        InvalidationTicket { waits }
    }

    /// Forgets the sections that have ended.
    pub(crate) fn prune(&mut self) {
        self.waits.retain(|(s, a)| !s.passed(*a));
    }
}

/// The second phase of an invalidation (unmap, replace, detach, unbind,
/// HWPT invalidation). Caches were invalidated when the ticket was made;
/// it is complete once every access section that was open at that moment
/// has ended. Poll it with [`InvalidationTicket::is_done`], list laggards
/// with [`InvalidationTicket::pending`], nudge them, or block in
/// [`InvalidationTicket::wait`]. Dropping an incomplete ticket blocks until
/// it completes, so the safety promise holds either way: never wait on or
/// drop a ticket from inside an access section of a translator it may name.
#[must_use = "an invalidation is complete only when its ticket is done"]
pub struct InvalidationTicket {
    pub(crate) waits: Vec<(Arc<Slot>, u64)>,
}

impl std::fmt::Debug for InvalidationTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvalidationTicket")
            .field("pending", &self.waits.len())
            .finish()
    }
}

impl InvalidationTicket {
    /// A ticket that is already complete.
    pub fn done() -> InvalidationTicket {
        InvalidationTicket { waits: Vec::new() }
    }

    /// Merges another ticket into this one.
    pub fn merge(&mut self, mut other: InvalidationTicket) {
        self.waits.append(&mut other.waits);
    }

    /// True once no translator can still use the old state (non-blocking).
    pub fn is_done(&mut self) -> bool {
        self.waits.retain(|(s, a)| !s.passed(*a));
        self.waits.is_empty()
    }

    /// The translators still inside an access section that began before
    /// the invalidation.
    pub fn pending(&self) -> Vec<TranslatorInfo> {
        self.waits
            .iter()
            .filter(|(s, a)| !s.passed(*a))
            .map(|(s, _)| TranslatorInfo {
                translator: s.id,
                label: s.label.to_string(),
            })
            .collect()
    }

    /// Calls the nudge hook of every pending translator that has one.
    pub fn nudge(&self) {
        for (s, a) in &self.waits {
            if !s.passed(*a) {
                let n = lock(&s.nudge).clone();
                if let Some(n) = n {
                    n();
                }
            }
        }
    }

    /// Blocks until complete.
    pub fn wait(mut self) {
        self.wait_inner(None);
    }

    /// Blocks until complete or `timeout`; returns [`InvalidationTicket::is_done`].
    pub fn wait_timeout(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        self.wait_inner(deadline)
    }

    fn wait_inner(&mut self, deadline: Option<Instant>) -> bool {
        while let Some((s, a)) = self.waits.last() {
            if !s.wait_passed(*a, deadline) {
                return false;
            }
            self.waits.pop();
        }
        true
    }
}

impl Drop for InvalidationTicket {
    fn drop(&mut self) {
        if !self.waits.is_empty() {
            self.wait_inner(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_idle_slot_needs_no_wait() {
        let s = Arc::new(Slot::new("d".into()));
        let mut t = invalidate_slots([&s]);
        assert!(t.is_done());
        assert_eq!(s.gen.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn test_open_section_is_waited_for() {
        let s = Arc::new(Slot::new("d".into()));
        let g = s.enter();
        assert_eq!(g, 0);
        let mut t = invalidate_slots([&s]);
        assert!(!t.is_done());
        assert_eq!(t.pending().len(), 1);
        assert!(!t.wait_timeout(Duration::from_millis(1)));
        let s2 = s.clone();
        let h = std::thread::spawn(move || s2.leave());
        t.wait();
        h.join().expect("join");
        // A new section sees the new generation.
        assert_eq!(s.enter(), 1);
        s.leave();
    }

    #[test]
    fn test_nudge_called_for_pending() {
        let s = Arc::new(Slot::new("d".into()));
        let hits = Arc::new(AtomicUsize::new(0));
        let h2 = hits.clone();
        s.set_nudge(Some(Arc::new(move || {
            h2.fetch_add(1, Ordering::SeqCst);
        })));
        s.enter();
        let mut t = invalidate_slots([&s]);
        t.nudge();
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        s.leave();
        assert!(t.is_done());
        t.nudge();
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }
}
