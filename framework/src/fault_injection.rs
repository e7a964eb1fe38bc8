//! Test-only fault injection (cargo feature `fault-injection`; a default
//! build has none of it): a device write that lands some time after the
//! access section it was translated in has ended, through the host pointer
//! that section handed out.
//!
//! That is the bug the unmap promise excludes: once an unmap returns, no
//! device touches the old pages, because a device reaches memory only inside
//! an access section and the unmap waits for the sections that may hold a
//! translation. A device that keeps a host pointer past its section escapes
//! the wait. End-to-end checks use this module to show that they catch such
//! a write (the quickstart's unmap step, `integration/tests/quickstart.rs`).
//!
//! A test arms one late write per device kind ([`arm`]); the device, inside
//! a section, claims it ([`claim`]) and registers the write
//! ([`write_after_section`]); the worker thread performs it after the
//! section has ended, once the delay has passed, and before it opens its
//! next section.
//!
//! The write stays inside this process's memory: until a translator opens
//! its next section it keeps every memory it translated mapped (iommu-core
//! drops them at that section's start), so the host pointer still points
//! into the mapping of the peer's memory, and the write lands there, in the
//! pages the unmap took away from the device.

use std::cell::RefCell;
use std::sync::Mutex;
use std::time::Duration;

use log::warn;

use crate::dma::DmaFragment;

/// Late writes armed and not yet claimed: (device kind, delay).
static ARMED: Mutex<Vec<(String, Duration)>> = Mutex::new(Vec::new());

/// Longest delay a late write may have (a test's bound).
pub const MAX_DELAY: Duration = Duration::from_secs(2);

/// Arms one late write for devices of `kind` (each device crate names its
/// own, e.g. `"vdpa-net"`): the first one to [`claim`] it gets `delay`
/// (at most [`MAX_DELAY`]).
pub fn arm(kind: &str, delay: Duration) {
    let mut a = ARMED.lock().unwrap_or_else(|p| p.into_inner());
    a.retain(|(k, _)| k != kind);
    a.push((kind.to_string(), delay.min(MAX_DELAY)));
}

/// Whether a late write is armed for `kind` (cheap enough to ask before
/// preparing one).
pub fn armed(kind: &str) -> bool {
    let a = ARMED.lock().unwrap_or_else(|p| p.into_inner());
    a.iter().any(|(k, _)| k == kind)
}

/// Whether a late write is armed and not yet claimed, for any kind.
pub fn pending() -> bool {
    let a = ARMED.lock().unwrap_or_else(|p| p.into_inner());
    !a.is_empty()
}

/// Takes the late write armed for `kind`, if any: its delay.
pub fn claim(kind: &str) -> Option<Duration> {
    let mut a = ARMED.lock().unwrap_or_else(|p| p.into_inner());
    let i = a.iter().position(|(k, _)| k == kind)?;
    Some(a.swap_remove(i).1)
}

/// A registered late write.
struct LateWrite {
    ptr: usize,
    data: Vec<u8>,
    delay: Duration,
}

thread_local! {
    static PENDING: RefCell<Vec<LateWrite>> = const { RefCell::new(Vec::new()) };
}

/// Registers a write of `data` (at most `frag.len()` bytes of it) at the
/// start of `frag`, to be made by this thread `delay` after its current
/// access section ends, without a section.
pub fn write_after_section(frag: DmaFragment<'_>, data: &[u8], delay: Duration) {
    let n = data.len().min(frag.len());
    if n == 0 {
        return;
    }
    warn!(
        "fault injection: {n} bytes will be written at host {:p} {delay:?} after this access \
         section ends",
        frag.as_ptr()
    );
    PENDING.with(|p| {
        p.borrow_mut().push(LateWrite {
            ptr: frag.as_ptr() as usize,
            data: data[..n].to_vec(),
            delay,
        })
    });
}

/// Makes this thread's registered late writes. Called right after a worker
/// call's or [`Dma::enter`](crate::dma::Dma::enter)'s section ends, and at
/// the start of every section (before its translator is asked for access),
/// so a write registered in a section is made before the thread's
/// translator opens another.
pub(crate) fn after_section() {
    let writes = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for w in writes {
        std::thread::sleep(w.delay);
        // SAFETY: the pointer came from a fragment translated for write, for
        // at least `data.len()` bytes, in the last section this thread
        // opened (every section start and end runs this function first).
        // Translators are owned by one thread, so the one that made the
        // translation has not opened a section since: it still holds the
        // memory behind it, and the range is still mapped in this process
        // (the bug injected is that the device no longer owns the pages, not
        // that the process lost them). The peer may write the same bytes:
        // raw copy, no reference is formed.
        unsafe {
            std::ptr::copy_nonoverlapping(w.data.as_ptr(), w.ptr as *mut u8, w.data.len());
        }
        warn!(
            "fault injection: wrote {} bytes at host {:#x} {:?} after the access section ended",
            w.data.len(),
            w.ptr,
            w.delay
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_arm_is_claimed_once_per_kind() {
        arm("test-kind-a", Duration::from_millis(3));
        arm("test-kind-b", Duration::from_secs(60));
        assert!(armed("test-kind-a"));
        assert_eq!(claim("test-kind-a"), Some(Duration::from_millis(3)));
        assert_eq!(claim("test-kind-a"), None);
        assert!(!armed("test-kind-a"));
        assert_eq!(claim("test-kind-b"), Some(MAX_DELAY));
        assert!(!armed("test-kind-b"));
    }
}
