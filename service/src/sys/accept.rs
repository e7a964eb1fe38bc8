//! Accept loops that back off instead of spinning.
//!
//! A listener stays readable while connections wait in its backlog, so an
//! accept that fails for lack of resources (`EMFILE`, `ENFILE`, `ENOBUFS`,
//! `ENOMEM`) would fail again at once in a level-triggered loop: the daemon
//! spun at 63-98 % CPU and logged 14-24 MB/s at the fd limit. Every accept
//! loop (the device framework's `ioasis::server::Server`'s device and extra listeners, the
//! `/dev/iommu` service, the sva-accel portal) keeps an [`AcceptBackoff`]:
//! after a failure it stops watching the listener for a pause that doubles
//! from [`AcceptBackoff::MIN_PAUSE`] up to [`AcceptBackoff::MAX_PAUSE`]
//! while failures go on, logs through one rate-limited line, and returns to
//! normal at the first accept that succeeds. Connections keep waiting in the
//! backlog meanwhile and are served once fds are free again.
//!
//! `framework/tests/hostile_emfile.rs` lowers `RLIMIT_NOFILE` under a
//! running server and measures its CPU time and log lines.

use std::io;
use std::time::Duration;

use crate::sys::ratelimit::RateLimit;

static ACCEPT_FAILED: RateLimit = RateLimit::peer();
static ACCEPTING_AGAIN: RateLimit = RateLimit::peer();

/// Back-off state of one listener.
#[derive(Debug, Clone, Default)]
pub struct AcceptBackoff {
    /// Failures since the last accept that succeeded.
    failures: u64,
}

/// Whether an accept error only means "try again now": nothing to accept,
/// a signal, a connection that went away before it was accepted.
pub fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ECONNABORTED) | Some(libc::EPROTO)
    ) || matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Whether an accept error means the process or the system is out of
/// resources (fds, socket buffers, memory).
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

impl AcceptBackoff {
    /// The first pause after a failure.
    pub const MIN_PAUSE: Duration = Duration::from_millis(10);
    /// The longest pause.
    pub const MAX_PAUSE: Duration = Duration::from_secs(1);

    /// A listener that has not failed.
    pub const fn new() -> AcceptBackoff {
        AcceptBackoff { failures: 0 }
    }

    /// An accept on `listener` (a name for the log) failed with `e`, which
    /// is not [`is_transient`]: returns how long to stop watching the
    /// listener, and logs (rate-limited).
    pub fn failed(&mut self, listener: &str, e: &io::Error) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let shift = u32::try_from(self.failures - 1).unwrap_or(u32::MAX).min(16);
        let pause = Self::MIN_PAUSE
            .saturating_mul(1u32 << shift)
            .min(Self::MAX_PAUSE);
        let why = if is_exhaustion(e) {
            "out of resources"
        } else {
            "unexpected error"
        };
        crate::log_limited!(limit: ACCEPT_FAILED,
            log::Level::Warn,
            "{listener}: accept failed ({why}): {e}; not accepting for {pause:?} ({} failures in a row)",
            self.failures
        );
        pause
    }

    /// An accept succeeded: the next failure starts from the shortest pause.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            crate::log_limited!(limit: ACCEPTING_AGAIN,
                log::Level::Info,
                "accepting connections again after {} failures",
                self.failures
            );
        }
        self.failures = 0;
    }

    /// Failures since the last accept that succeeded.
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pauses_double_up_to_the_cap_and_reset() {
        let mut b = AcceptBackoff::new();
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(is_exhaustion(&e) && !is_transient(&e));
        let p: Vec<_> = (0..10).map(|_| b.failed("test", &e)).collect();
        assert_eq!(p[0], AcceptBackoff::MIN_PAUSE);
        assert_eq!(p[1], AcceptBackoff::MIN_PAUSE * 2);
        assert_eq!(p[9], AcceptBackoff::MAX_PAUSE);
        assert!(p.windows(2).all(|w| w[0] <= w[1]));
        b.succeeded();
        assert_eq!(b.failed("test", &e), AcceptBackoff::MIN_PAUSE);
        assert!(is_transient(&io::Error::from_raw_os_error(libc::EAGAIN)));
    }
}
