//! Aborting a departing client's outstanding work.

use super::*;

/// Longest [`abort_work`] waits for a client's executing descriptors.
pub(super) const ABORT_WAIT: Duration = Duration::from_secs(10);

/// What [`abort_work`] did.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Aborted {
    /// Descriptors dropped unexecuted.
    pub(super) aborted: u64,
    /// The client's executing descriptors all finished within the bound.
    pub(super) finished: bool,
}

/// Aborts the outstanding work of client `c`, whose `dead` or `unbound`
/// flag the caller has set (so no worker starts another descriptor of it):
/// descriptors still queued in its portal, held behind a drain, or parked
/// on a fault are dropped without executing (each that asked for a
/// completion record is reported as an event instead, since its record can
/// no longer be translated), then this waits (bounded by [`ABORT_WAIT`])
/// until the descriptors workers are executing for it have finished. After
/// it returns, no descriptor of `c` touches memory through its PASID, and
/// none will.
pub(super) fn abort_work(s: &Shared, c: &ClientCtx) -> Aborted {
    let mut out = Aborted::default();
    // Parked work holds no work queue slot; held work does.
    let parked: Vec<Job> = c
        .parked_iommu
        .lock()
        .map(|mut p| p.drain(..).map(|(j, _, _)| j).collect())
        .unwrap_or_default();
    for j in &parked {
        report_dropped(c, &j.desc);
    }
    retire_released(c, parked.len() as u64);
    let held: Vec<Job> = c
        .held
        .lock()
        .map(|mut q| q.drain(..).collect())
        .unwrap_or_default();
    for j in &held {
        report_dropped(c, &j.desc);
    }
    retire(s, c, held.len() as u64);
    out.aborted += (parked.len() + held.len()) as u64;
    let ready: Vec<(Job, Resume)> = c
        .ready
        .lock()
        .map(|mut q| {
            c.has_ready.store(false, Ordering::Release);
            q.drain(..).collect()
        })
        .unwrap_or_default();
    for (j, _) in &ready {
        report_dropped(c, &j.desc);
    }
    retire(s, c, ready.len() as u64);
    out.aborted += ready.len() as u64;
    // Queued in the portal and never taken. A worker popping meanwhile
    // holds the cursor: what it took counts as in flight and is dropped
    // by it (it checks the flags before every descriptor).
    let mut buf = Vec::new();
    for _ in 0..1000 {
        buf.clear();
        match c.portal.pop(&mut buf, MAX_WQ_SIZE as usize) {
            Some(0) => break,
            Some(n) => {
                for raw in &buf {
                    report_dropped(c, &Descriptor::from_bytes(raw));
                }
                c.portal.complete(n as u64);
                out.aborted += n as u64;
            }
            None => std::thread::yield_now(),
        }
    }
    c.stats.aborted.fetch_add(out.aborted, Ordering::Relaxed);
    // Descriptors already executing finish (a worker checks the flags
    // before each descriptor, so at most one per worker runs on).
    let start = Instant::now();
    out.finished = loop {
        if c.inflight.load(Ordering::SeqCst) == 0 {
            break true;
        }
        if start.elapsed() >= ABORT_WAIT {
            ioasis::log_limited!(
                log::Level::Warn,
                "PASID {}: {} descriptors still executing after {ABORT_WAIT:?}",
                c.pasid,
                c.inflight.load(Ordering::SeqCst)
            );
            break false;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    out
}
