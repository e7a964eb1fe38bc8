//! Writes to a peer's eventfds, and getting past a thread that one wedged.
//!
//! A worker signals the driver by writing its vring call eventfd (and
//! reports a failed queue on the vring error eventfd). Those files are the
//! frontend's: [`crate::sys::peer_fd`] makes them `O_NONBLOCK` on arrival, but
//! the flag belongs to the open file, which the frontend shares. A hostile
//! frontend clears it again on its own copy and writes
//! `0xfffffffffffffffe` into the counter; the worker's next `write(2)` of 1
//! then waits until the frontend reads, which it never does, while the
//! worker holds the ring's lock and, for a call, an access section. Eventfd
//! writes do not honour `RWF_NOWAIT` (`EOPNOTSUPP`), and checking the flag
//! first would cost a system call per notification and still race with the
//! frontend. So the write is left as it is, and a wedged one is
//! interrupted:
//!
//! - The framework reserves one real-time signal, [`reserved_signal`]
//!   (`SIGRTMIN() + 5`); its handler does nothing and is installed without
//!   `SA_RESTART` (vmm-sys-util's `register_signal_handler`), so a
//!   `write(2)` that blocked returns `EINTR`. An application embedding the
//!   framework must leave that signal alone.
//! - Each worker thread has a `Writer`: it records the thread
//!   (`Writer::attach`, which also unblocks the signal in that thread)
//!   and a sequence number that is odd while the thread is inside
//!   `Writer::write_counter`. The notification path gains two plain
//!   stores and no system call: 374-431 ns per write against 407-521 ns
//!   for the `EventFd::write` it replaced, within the noise of a shared
//!   2-core machine
//!   (`cargo test --release -p ioasis --lib write_counter_cost -- --ignored --nocapture`).
//! - `Writer::interrupt` signals the thread if it is inside a write
//!   (a write that does not block ignores the signal; only one that waits
//!   returns `EINTR`). Whoever must get past a worker calls it while it
//!   waits: `lock` (the connection thread, or the service thread, waiting
//!   for a ring lock), `join` (stopping a worker set, at teardown and at
//!   server shutdown) and `wait_ticket` (an unmap waiting for a worker's
//!   access section; the worker's translator's nudge hook interrupts it
//!   too). Each starts interrupting after [`GRACE`] and repeats at most
//!   every few milliseconds, because a signal that arrives just before the
//!   thread enters the write is absorbed without effect.
//! - A write that returns `EINTR` reports `Written::Wedged` (the write is
//!   a plain `write(2)`: vmm-sys-util's `EventFd::write` retries on
//!   `EINTR`): the caller forgets that eventfd, until the frontend sets a
//!   new one with `SET_VRING_CALL` / `SET_VRING_ERR`, and logs,
//!   rate-limited. Nothing is lost: the counter is full, so the driver has
//!   a signal it has not read. A full counter on a non-blocking file
//!   (`Written::Full`) is the same situation without the wait: nothing
//!   more to do.
//! - The service thread never writes a frontend's eventfd: a queue resumed
//!   after an address-space change is handed to its worker through the
//!   worker's own control eventfd.
//!
//! A signal sent because a thread was seen inside a write may land just
//! after the write returned: the thread then sees `EINTR` from a blocking
//! call it makes next (its `epoll_wait` retries); device code runs inside
//! access sections, which must not block anyway.
//!
//! `framework/tests/hostile_full_call.rs` wedges a worker on a full,
//! blocking call eventfd and on a full, blocking error eventfd, and checks
//! that the connection answers, that a later frontend is served, that
//! another device is served throughout, and that SIGTERM stops the server.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, warn};
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, Killable, SIGRTMIN};

/// How long a waiter lets a thread sit in a peer write before it
/// interrupts it (a write that does not block takes microseconds).
pub const GRACE: Duration = Duration::from_millis(10);
/// Longest pause between two looks of a waiter.
const MAX_PAUSE: Duration = Duration::from_millis(2);
/// A waiter still waiting after this logs once.
const SLOW: Duration = Duration::from_secs(5);
/// [`reserved_signal`] is `SIGRTMIN() + SIGNAL_OFFSET`.
const SIGNAL_OFFSET: libc::c_int = 5;

/// The real-time signal the framework uses to interrupt a worker thread
/// wedged in a write to a peer's eventfd: `SIGRTMIN() + 5`. Its handler is
/// installed when the first worker thread starts; an application must not
/// install another handler for it nor block it in worker threads.
pub fn reserved_signal() -> libc::c_int {
    SIGRTMIN() + SIGNAL_OFFSET
}

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing: the point is that the interrupted write returns EINTR.
}

/// Whether the handler is installed (decided once per process).
static HANDLER: OnceLock<bool> = OnceLock::new();

fn handler_installed() -> bool {
    *HANDLER.get_or_init(|| match register_signal_handler(reserved_signal(), on_signal) {
        Ok(()) => true,
        Err(e) => {
            error!(
                "installing the handler of signal {}: {e}; a worker wedged by a peer's eventfd cannot be interrupted",
                reserved_signal()
            );
            false
        }
    })
}

/// How a write to a peer's eventfd ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// The counter was incremented.
    Done,
    /// The counter is full and the file non-blocking (`EAGAIN`): the peer
    /// has not read a signal it already has.
    Full,
    /// The counter is full and the peer made the file blocking: the write
    /// waited and was interrupted. Do not write this file again.
    Wedged,
}

/// A running thread, borrowed from a [`Writer`]'s record while that is
/// locked.
struct Running<'a>(&'a libc::pthread_t);

// SAFETY: the handle is borrowed from `Writer::thread` while its lock is
// held; the thread clears that record under the same lock
// (`Writer::detach`) before it exits, so it is a live thread for as long as
// a `Running` exists.
unsafe impl Killable for Running<'_> {
    fn pthread_handle(&self) -> libc::pthread_t {
        *self.0
    }
}

/// One thread that writes to peers' eventfds, as others see it.
#[derive(Debug, Default)]
pub struct Writer {
    /// Odd while the thread is inside [`Writer::write_counter`].
    seq: AtomicU64,
    /// The thread, from [`Writer::attach`] until [`Writer::detach`]. Held
    /// while signalling it, so it never signals a thread that has exited.
    thread: Mutex<Option<libc::pthread_t>>,
}

fn lock_thread(m: &Mutex<Option<libc::pthread_t>>) -> MutexGuard<'_, Option<libc::pthread_t>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Writer {
    /// A writer attached to no thread (never interrupted).
    pub const fn new() -> Writer {
        Writer {
            seq: AtomicU64::new(0),
            thread: Mutex::new(None),
        }
    }

    /// A writer for threads nobody interrupts (tests and the harness).
    pub fn unattached() -> &'static Writer {
        static W: Writer = Writer::new();
        &W
    }

    /// Makes the calling thread the one this writer interrupts: installs
    /// the signal handler (once per process) and unblocks the signal in
    /// this thread. Call [`Writer::detach`] before the thread exits.
    pub fn attach(&self) -> io::Result<()> {
        if !handler_installed() {
            return Err(io::Error::other("the signal handler is not installed"));
        }
        unblock_signal(reserved_signal()).map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *lock_thread(&self.thread) = Some(me);
        Ok(())
    }

    /// Forgets the thread (it is about to exit); from now on nothing
    /// signals it.
    pub fn detach(&self) {
        *lock_thread(&self.thread) = None;
    }

    /// Adds `n` to the eventfd counter of `fd`, a peer's file. Call it only
    /// from the thread this writer is attached to (or from any thread for
    /// an unattached writer).
    pub fn write_counter(&self, fd: &impl AsRawFd, n: u64) -> io::Result<Written> {
        let bytes = n.to_ne_bytes();
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        // SAFETY: `fd` is borrowed from its owner and open for the call;
        // `bytes` is a live 8-byte buffer.
        let rc = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        let err = (rc < 0).then(io::Error::last_os_error);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
        match err {
            None if rc == 8 => Ok(Written::Done),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{rc}-byte write to an eventfd"),
            )),
            Some(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(Written::Full),
                Some(libc::EINTR) => Ok(Written::Wedged),
                _ => Err(e),
            },
        }
    }

    /// True while the thread is inside [`Writer::write_counter`].
    pub fn writing(&self) -> bool {
        self.seq.load(Ordering::Acquire) & 1 == 1
    }

    /// Signals the thread if it is inside a write; true if it was
    /// signalled. A write that does not block is not affected.
    pub fn interrupt(&self) -> bool {
        if !self.writing() {
            return false;
        }
        let g = lock_thread(&self.thread);
        let Some(t) = g.as_ref() else { return false };
        // attach() installed the handler before recording the thread.
        match Running(t).kill(reserved_signal()) {
            Ok(()) => true,
            Err(e) => {
                crate::log_limited!(
                    log::Level::Warn,
                    "interrupting a worker thread wedged in a peer write: {e}"
                );
                false
            }
        }
    }
}

/// Pauses between looks, doubling up to [`MAX_PAUSE`].
struct Backoff {
    start: Instant,
    pause: Duration,
    warned: bool,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            start: Instant::now(),
            pause: Duration::from_micros(20),
            warned: false,
        }
    }

    /// True once the waiter should interrupt.
    fn past_grace(&self) -> bool {
        self.start.elapsed() >= GRACE
    }

    fn pause(&mut self, what: &str) {
        if !self.warned && self.start.elapsed() >= SLOW {
            self.warned = true;
            warn!("still waiting for {what} after {:?}", self.start.elapsed());
        }
        std::thread::sleep(self.pause);
        self.pause = (self.pause * 2).min(MAX_PAUSE);
    }
}

/// Locks `m`, which a worker thread may hold while wedged in a peer write:
/// after [`GRACE`] each look calls `interrupt` (which should call
/// [`Writer::interrupt`] on the threads that may hold it). Ignores
/// poisoning, like every lock of the framework's shared state.
pub fn lock<'a, T>(m: &'a Mutex<T>, interrupt: impl Fn()) -> MutexGuard<'a, T> {
    let mut b = Backoff::new();
    loop {
        match m.try_lock() {
            Ok(g) => return g,
            Err(TryLockError::Poisoned(p)) => return p.into_inner(),
            Err(TryLockError::WouldBlock) => {}
        }
        if b.past_grace() {
            interrupt();
        }
        b.pause("a lock a worker holds");
    }
}

/// Joins `handle`, the thread `writer` is attached to, interrupting it
/// while it sits in a peer write (after [`GRACE`]). Returns `false` if the
/// thread panicked.
pub fn join(handle: JoinHandle<()>, writer: &Writer) -> bool {
    let mut b = Backoff::new();
    while !handle.is_finished() {
        if b.past_grace() {
            writer.interrupt();
        }
        b.pause("a worker thread to stop");
    }
    handle.join().is_ok()
}

/// Waits until `ticket` completes, nudging its translators (a worker's
/// nudge hook interrupts its peer write) after [`GRACE`] and then every
/// [`GRACE`].
pub fn wait_ticket(mut ticket: iommu_core::InvalidationTicket) {
    let start = Instant::now();
    let mut warned = false;
    while !ticket.wait_timeout(GRACE) {
        ticket.nudge();
        if !warned && start.elapsed() >= SLOW {
            warned = true;
            warn!(
                "an unmap still waits for {:?} after {:?}",
                ticket.pending(),
                start.elapsed()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EventFd;

    fn fill(e: &EventFd) {
        e.write(0xffff_ffff_ffff_fffe).expect("fill");
    }

    #[test]
    fn test_write_counter_outcomes() {
        let w = Writer::unattached();
        let e = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        assert_eq!(w.write_counter(&e, 1).expect("write"), Written::Done);
        assert_eq!(e.read().expect("read"), 1);
        fill(&e);
        assert_eq!(w.write_counter(&e, 1).expect("write"), Written::Full);
        assert!(!w.writing());
    }

    /// A thread wedged on a full, blocking eventfd: `join` interrupts it
    /// and the write reports `Wedged`. Checked by making `interrupt` send
    /// nothing: the test hangs in `join`.
    #[test]
    fn test_join_interrupts_a_wedged_write() {
        let e = Arc::new(EventFd::new(0).expect("eventfd"));
        fill(&e);
        let w = Arc::new(Writer::new());
        let (w2, e2) = (w.clone(), e.clone());
        let got = Arc::new(Mutex::new(None));
        let got2 = got.clone();
        let h = std::thread::spawn(move || {
            w2.attach().expect("attach");
            let r = w2.write_counter(&*e2, 1).expect("write");
            w2.detach();
            *got2.lock().expect("lock") = Some(r);
        });
        // Bounded: 2 s for the thread to enter the write.
        for _ in 0..200 {
            if w.writing() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = Instant::now();
        assert!(join(h, &w));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(*got.lock().expect("lock"), Some(Written::Wedged));
        // The counter is unchanged: nothing was added.
        assert_eq!(e.read().expect("read"), 0xffff_ffff_ffff_fffe);
    }

    /// `lock` gets a mutex a wedged writer holds. Checked by making
    /// `interrupt` send nothing: the test hangs in `lock`.
    #[test]
    fn test_lock_interrupts_the_holder() {
        let e = Arc::new(EventFd::new(0).expect("eventfd"));
        fill(&e);
        let m = Arc::new(Mutex::new(0u32));
        let w = Arc::new(Writer::new());
        let held = Arc::new(AtomicBool::new(false));
        let (w2, e2, m2, held2) = (w.clone(), e.clone(), m.clone(), held.clone());
        let h = std::thread::spawn(move || {
            w2.attach().expect("attach");
            let mut g = m2.lock().expect("lock");
            held2.store(true, Ordering::SeqCst);
            let r = w2.write_counter(&*e2, 1).expect("write");
            *g += 1;
            drop(g);
            w2.detach();
            r
        });
        for _ in 0..200 {
            if held.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let g = lock(&m, || {
            w.interrupt();
        });
        assert_eq!(*g, 1);
        drop(g);
        assert_eq!(h.join().expect("thread"), Written::Wedged);
    }

    /// Cost of one notification: [`Writer::write_counter`] against the
    /// `EventFd::write` it replaced, on an attached writer, medians of 5
    /// rounds of 200000 writes each. Not a check; prints the figures:
    /// `cargo test --release -p ioasis --lib write_counter_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn write_counter_cost() {
        const N: u32 = 200_000;
        let e = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let w = Writer::new();
        w.attach().expect("attach");
        let mut plain = Vec::new();
        let mut ours = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..N {
                e.write(1).expect("write");
            }
            plain.push(t.elapsed() / N);
            let _ = e.read();
            let t = Instant::now();
            for _ in 0..N {
                assert_eq!(w.write_counter(&e, 1).expect("write"), Written::Done);
            }
            ours.push(t.elapsed() / N);
            let _ = e.read();
        }
        w.detach();
        plain.sort();
        ours.sort();
        println!(
            "per write: EventFd::write {:?}, Writer::write_counter {:?} (medians)",
            plain[2], ours[2]
        );
    }

    /// Interrupting a thread that is not writing sends nothing.
    #[test]
    fn test_interrupt_outside_a_write_is_a_no_op() {
        let w = Writer::new();
        w.attach().expect("attach");
        assert!(!w.interrupt());
        w.detach();
        assert!(!w.interrupt());
    }
}
