//! Surviving a peer that truncates the memory it shared.
//!
//! A client or frontend hands its memory over as a memfd, and nothing stops
//! it from shrinking that file afterwards (DPDK's memfds carry no seals, and
//! sealing them here would break DPDK, which resizes its own files). An
//! access to a mapped page past the new end of the file raises SIGBUS, which
//! would kill the whole process and every other device it serves.
//!
//! Every memfd mapping made by [`Memory::from_memfd`](crate::Memory) is
//! registered here. A SIGBUS handler, installed once, looks the faulting
//! address up in that registry: inside a registered mapping, it puts a
//! private zero-filled page over the faulting page (of the file's page size,
//! so hugetlbfs files get a huge page) and returns, so the access completes
//! (reads see zeros, writes go nowhere the peer can see) and the mapping is
//! marked truncated, for the owner to notice ([`Memory::truncated`](crate::Memory::truncated)) and
//! report. Any other SIGBUS goes to the handler that was installed before
//! (Rust's own, for stack overflows), or to the default action.
//!
//! The handler only reads atomics and calls `mmap`, which is
//! async-signal-safe.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

/// Mappings the registry can hold at once; more are mapped unguarded (and
/// counted in [`unguarded`]).
const SLOTS: usize = 1024;

struct Slot {
    /// First byte of the mapping; 0: free.
    start: AtomicUsize,
    /// One past the last byte.
    end: AtomicUsize,
    /// Page size of the backing file (the granule a replacement covers).
    granule: AtomicUsize,
    /// Pages replaced after a SIGBUS.
    hits: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    granule: AtomicUsize::new(0),
    hits: AtomicU64::new(0),
};

static REGISTRY: [Slot; SLOTS] = [FREE; SLOTS];
/// The SIGBUS action in place before ours (leaked once, never freed).
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
static INSTALL: Once = Once::new();
static UNGUARDED: AtomicU64 = AtomicU64::new(0);
static TRUNCATIONS: AtomicU64 = AtomicU64::new(0);

/// A registered mapping; unregisters on drop.
#[derive(Debug)]
pub(crate) struct Guard {
    slot: Option<usize>,
}

impl Guard {
    /// Registers `start..start + len`, backed by a file with `granule`-byte
    /// pages (a power of two).
    pub(crate) fn register(start: usize, len: usize, granule: usize) -> Guard {
        install();
        let granule = granule.max(4096).next_power_of_two();
        for (i, s) in REGISTRY.iter().enumerate() {
            if s.start
                .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                s.end.store(start.saturating_add(len), Ordering::Relaxed);
                s.granule.store(granule, Ordering::Relaxed);
                s.hits.store(0, Ordering::Relaxed);
                // Published last: the handler matches only complete slots.
                s.start.store(start, Ordering::Release);
                return Guard { slot: Some(i) };
            }
        }
        UNGUARDED.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "more than {SLOTS} peer memory mappings: this one is not guarded against truncation"
        );
        Guard { slot: None }
    }

    /// Pages of the mapping replaced because the file shrank under them.
    pub(crate) fn hits(&self) -> u64 {
        self.slot
            .map_or(0, |i| REGISTRY[i].hits.load(Ordering::Acquire))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            // Before the mapping goes: a later fault there is not ours.
            REGISTRY[i].start.store(0, Ordering::Release);
        }
    }
}

/// Faults answered in all mappings since the process started.
pub fn truncations() -> u64 {
    TRUNCATIONS.load(Ordering::Relaxed)
}

/// Mappings made without a guard because the registry was full.
pub fn unguarded() -> u64 {
    UNGUARDED.load(Ordering::Relaxed)
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: an all-zero sigaction is a valid value to be filled in.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigbus as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        // SAFETY: `act.sa_mask` is a valid sigset to initialise.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        let old = Box::into_raw(Box::new(
            // SAFETY: as above, filled in by sigaction below.
            unsafe { std::mem::zeroed::<libc::sigaction>() },
        ));
        // SAFETY: both pointers are valid sigaction structs; the handler is
        // an `extern "C"` function with the SA_SIGINFO signature.
        let rc = unsafe { libc::sigaction(libc::SIGBUS, &act, old) };
        if rc != 0 {
            log::warn!(
                "installing the SIGBUS guard failed: {}; a peer truncating its memory can kill this process",
                std::io::Error::last_os_error()
            );
            // SAFETY: `old` came from Box::into_raw above and is not shared.
            drop(unsafe { Box::from_raw(old) });
            return;
        }
        PREVIOUS.store(old, Ordering::Release);
    });
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in REGISTRY.iter() {
        let start = s.start.load(Ordering::Acquire);
        if start == 0 || start == usize::MAX || addr < start {
            continue;
        }
        if addr >= s.end.load(Ordering::Relaxed) {
            continue;
        }
        let granule = s.granule.load(Ordering::Relaxed);
        let page = addr & !(granule - 1);
        // SAFETY: `page..page + granule` lies in a mapping this process made
        // of a peer's file (registered until just before it is unmapped);
        // replacing those pages with private anonymous ones changes what the
        // faulting access sees, never memory any Rust object owns. mmap is
        // async-signal-safe.
        let r = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                granule,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if r != libc::MAP_FAILED {
            s.hits.fetch_add(1, Ordering::AcqRel);
            TRUNCATIONS.fetch_add(1, Ordering::Relaxed);
            return;
        }
        break;
    }
    let prev = PREVIOUS.load(Ordering::Acquire);
    if !prev.is_null() {
        // SAFETY: `prev` was leaked by `install` and is never freed.
        let p = unsafe { &*prev };
        let h = p.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: an SA_SIGINFO handler has this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler has this signature.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
            return;
        }
    }
    // Not ours and nobody else's: the default action, when the access is
    // retried on return.
    // SAFETY: resetting a signal's disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}
