//! Shared pieces of the hostile-client tests: counting the process's open
//! fds, and a well-behaved client that keeps doing round trips on its own
//! thread while an attack runs, recording its worst latency.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The worst round trip a well-behaved client may see during an attack
/// (generous: debug builds on a shared 2-core machine).
pub const LATENCY_BOUND: Duration = Duration::from_secs(3);

/// Open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Waits (bounded by `within`) until this process has at most `limit` open
/// fds; returns the last count.
pub fn settle_fds(limit: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let n = open_fds();
        if n <= limit || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a probe saw.
#[derive(Debug, Clone, Copy)]
pub struct ProbeReport {
    /// Round trips completed.
    pub rounds: u64,
    /// The slowest one.
    pub worst: Duration,
}

impl ProbeReport {
    /// Asserts the client was served throughout, each round within
    /// [`LATENCY_BOUND`].
    pub fn assert_served(&self, what: &str) {
        assert!(
            self.rounds > 0,
            "{what}: the well-behaved client got nothing done"
        );
        assert!(
            self.worst <= LATENCY_BOUND,
            "{what}: the well-behaved client waited {:?} for one round trip (bound {LATENCY_BOUND:?})",
            self.worst
        );
    }
}

/// A well-behaved client doing round trips every few milliseconds on its own
/// thread until [`Probe::finish`].
pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<ProbeReport>>,
}

impl Probe {
    /// Runs `setup` on the probe's thread, then `round(&mut state)` in a loop
    /// (bounded: at most 60 s, pausing 5 ms between rounds). Returns once
    /// the first round is done, so that an attack starts against a client
    /// that is already served.
    pub fn start<S, F, R>(setup: F, mut round: R) -> Probe
    where
        F: FnOnce() -> S + Send + 'static,
        R: FnMut(&mut S) + Send + 'static,
        S: 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut state = setup();
            let mut rep = ProbeReport {
                rounds: 0,
                worst: Duration::ZERO,
            };
            let begin = Instant::now();
            while begin.elapsed() < Duration::from_secs(60) {
                let t = Instant::now();
                round(&mut state);
                rep.worst = rep.worst.max(t.elapsed());
                rep.rounds += 1;
                if rep.rounds == 1 {
                    let _ = ready_tx.send(());
                }
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            rep
        });
        let _ = ready_rx.recv_timeout(Duration::from_secs(20));
        Probe {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the client and returns what it saw (a panic in a round fails
    /// the test here).
    pub fn finish(mut self) -> ProbeReport {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(p)) => std::panic::resume_unwind(p),
            None => unreachable!("finish runs once"),
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
