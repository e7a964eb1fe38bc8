//! A process's termination signals (SIGINT, SIGTERM), through signal-hook:
//! the one way the daemons, the examples and [`Server::handle_signals`]
//! learn that they should stop.
//!
//! signal-hook's handler writes a byte into a socket pair; a thread reads it
//! ([`Termination::wait`]), outside signal context, and does the rest. The
//! other signal the project handles is the framework's reserved real-time
//! signal ([`crate::peer_write`]), which must be installed without
//! `SA_RESTART` and therefore goes through vmm-sys-util instead (signal-hook
//! always sets `SA_RESTART`).
//!
//! [`Server::handle_signals`]: crate::server::Server::handle_signals

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::SigId;

/// SIGINT and SIGTERM, caught: [`Termination::wait`] says when one came.
/// Dropping it removes its handlers (the signals' default action, ending
/// the process, applies again unless another handler is installed).
#[derive(Debug)]
pub struct Termination {
    rx: UnixStream,
    ids: Vec<SigId>,
}

impl Termination {
    /// Catches SIGINT and SIGTERM from now on.
    pub fn new() -> io::Result<Termination> {
        let (rx, tx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        let mut ids = Vec::new();
        for sig in [SIGINT, SIGTERM] {
            match signal_hook::low_level::pipe::register(sig, tx.try_clone()?) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        signal_hook::low_level::unregister(id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(Termination { rx, ids })
    }

    /// [`Termination::new`], and both signals blocked in the calling thread,
    /// for a process whose main thread alone takes them: call it before any
    /// other thread starts (threads inherit the mask), and
    /// [`Termination::wait`] from this thread, which unblocks them here
    /// only, so no other thread's system call is interrupted by them.
    pub fn for_main_thread() -> io::Result<Termination> {
        let t = Termination::new()?;
        Self::mask().thread_block().map_err(io::Error::from)?;
        Ok(t)
    }

    fn mask() -> SigSet {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGINT);
        mask.add(Signal::SIGTERM);
        mask
    }

    /// Waits up to `timeout` (`None`: for ever) for SIGINT or SIGTERM; true
    /// if one came. Unblocks both in the calling thread first.
    pub fn wait(&mut self, timeout: Option<Duration>) -> bool {
        if let Err(e) = Self::mask().thread_unblock() {
            log::error!("cannot unblock SIGINT/SIGTERM: {e}");
        }
        // A zero timeout would mean "for ever" to the socket.
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        if let Err(e) = self.rx.set_read_timeout(timeout) {
            log::error!("termination signal wait: {e}");
        }
        let mut byte = [0u8; 1];
        match self.rx.read(&mut byte) {
            Ok(n) => n > 0,
            // Timed out, or interrupted by the very signal whose byte the
            // next wait reads at once: no signal yet.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                false
            }
            // A wait that cannot work again: stop rather than run unstoppable.
            Err(e) => {
                log::error!("termination signal wait failed ({e}): stopping");
                true
            }
        }
    }
}

impl Termination {
    /// A daemon's main loop: waits for SIGINT or SIGTERM, or until
    /// `finished()` says the work ended by itself (asked after every wait:
    /// without ticks, only once a signal came; the thread sleeps until then),
    /// calling `tick()` every `interval` meanwhile (`None`: never; the
    /// daemons print their statistics there). A tick that comes late is
    /// not caught up: the next one is due an interval after it.
    pub fn wait_ticking(
        &mut self,
        interval: Option<Duration>,
        mut finished: impl FnMut() -> bool,
        mut tick: impl FnMut(),
    ) {
        let mut next = interval.map(|i| Instant::now() + i);
        loop {
            let timeout = next.map(|n| n.saturating_duration_since(Instant::now()));
            if self.wait(timeout) || finished() {
                return;
            }
            if let (Some(n), Some(i)) = (next.as_mut(), interval) {
                let now = Instant::now();
                if now >= *n {
                    tick();
                    let due = *n + i;
                    *n = if due < now { now + i } else { due };
                }
            }
        }
    }
}

/// The read end the handlers write a byte into per signal: readable once a
/// signal came, for an event loop to watch (as [`Server`] does).
///
/// [`Server`]: crate::server::Server
impl AsFd for Termination {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

impl Drop for Termination {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_wait_ticking_ticks_until_finished() {
        let mut t = Termination::new().expect("termination");
        let (mut ticks, mut asked) = (0u32, 0u32);
        let start = Instant::now();
        // Bounded: `finished` says yes on its 50th question (about 50 ms).
        t.wait_ticking(
            Some(Duration::from_millis(5)),
            || {
                asked += 1;
                asked >= 50
            },
            || ticks += 1,
        );
        assert!(ticks >= 1, "no tick in {:?}", start.elapsed());
        assert!(ticks <= asked);
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn test_wait_ticking_returns_at_a_signal_without_ticking() {
        let mut t = Termination::new().expect("termination");
        let mut ticks = 0u32;
        // The byte a signal handler writes, written directly (raising
        // SIGTERM would reach every test thread's handlers).
        let (rx, tx) = UnixStream::pair().expect("pair");
        t.rx = rx;
        std::io::Write::write_all(&mut &tx, &[1]).expect("write");
        t.wait_ticking(None, || false, || ticks += 1);
        assert_eq!(ticks, 0);
    }
}
