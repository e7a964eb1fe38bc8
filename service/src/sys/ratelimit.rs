//! One small rate limiter for log lines that a peer's input can cause.
//!
//! A peer decides how often a malformed message, a refused request or a
//! failed accept happens; a log line per event lets it fill the disk and
//! burn the daemon's CPU (a malformed fault response once logged 5000 WARN
//! lines a second). Every such site logs through [`log_limited!`](crate::log_limited!)
//! (crate::log_limited), which gives the site a [`RateLimit`] of its own (or
//! one that several sites share): at most [`RateLimit::PEER_BURST`] lines
//! per [`RateLimit::PEER_WINDOW`]; the first line of the next window says
//! how many were suppressed.
//!
//! ```
//! for n in 0..1000 {
//!     // 10 lines, then silence for the rest of the 10 s window.
//!     ioasis_service::log_limited!(log::Level::Warn, "malformed packet {n} dropped");
//! }
//! ```
//!
//! `framework/tests/hostile_log_flood.rs` counts the lines a flood of
//! malformed input produces.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[doc(hidden)]
pub use log as __log;

/// A fixed-window limiter: at most `burst` admissions per `window`.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    /// Lines per window a site driven by peer input may log.
    pub const PEER_BURST: u32 = 10;
    /// The window of [`RateLimit::PEER_BURST`].
    pub const PEER_WINDOW: Duration = Duration::from_secs(10);

    /// At most `burst` admissions per `window`.
    pub const fn new(burst: u32, window: Duration) -> RateLimit {
        RateLimit {
            burst,
            window,
            state: Mutex::new(State {
                start: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// The limit for log lines driven by peer input
    /// ([`RateLimit::PEER_BURST`] per [`RateLimit::PEER_WINDOW`]).
    pub const fn peer() -> RateLimit {
        Self::new(Self::PEER_BURST, Self::PEER_WINDOW)
    }

    /// Whether one more line may be logged now: `Some(n)` if so, `n` being
    /// the lines suppressed since the last admitted one; `None` if this one
    /// is suppressed (and counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = match s.start {
            None => true,
            Some(t) => now.saturating_duration_since(t) >= self.window,
        };
        if fresh {
            s.start = Some(now);
            s.used = 0;
        }
        if s.used < self.burst {
            s.used += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed = s.suppressed.saturating_add(1);
            None
        }
    }
}

/// Logs at `level`, rate-limited: `log_limited!(log::Level::Warn, "format {}",
/// args)` limits the call site by a [`RateLimit::peer`] of its own;
/// `log_limited!(limit: STATIC, log::Level::Warn, ...)` goes through a
/// [`RateLimit`] static that several sites share.
#[macro_export]
macro_rules! log_limited {
    (limit: $limit:expr, $level:expr, $($arg:tt)+) => {{
        if let ::core::option::Option::Some(n) = $crate::sys::ratelimit::RateLimit::admit(&$limit) {
            if n == 0 {
                $crate::sys::ratelimit::__log::log!($level, $($arg)+);
            } else {
                $crate::sys::ratelimit::__log::log!(
                    $level,
                    "{} ({} similar lines suppressed)",
                    ::core::format_args!($($arg)+),
                    n
                );
            }
        }
    }};
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::sys::ratelimit::RateLimit = $crate::sys::ratelimit::RateLimit::peer();
        $crate::log_limited!(limit: LIMIT, $level, $($arg)+)
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_burst_then_suppressed_then_reported() {
        let r = RateLimit::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        let admitted: Vec<_> = (0..10).map(|_| r.admit_at(t0)).collect();
        assert_eq!(&admitted[..3], &[Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none));
        // The next window's first line reports the 7 suppressed.
        assert_eq!(r.admit_at(t0 + Duration::from_secs(1)), Some(7));
        assert_eq!(r.admit_at(t0 + Duration::from_secs(1)), Some(0));
    }
}
