//! A client's waiting work: jobs parked on a fault, the ready queue (work
//! that yielded, was answered or released) and descriptors held behind a
//! drain.

use super::*;

pub(super) fn park_iommu(
    s: &Shared,
    c: &ClientCtx,
    job: Job,
    p: PendingFault,
    slot: Option<FaultSlot>,
) {
    let Ok(mut parked) = c.parked_iommu.lock() else {
        return;
    };
    // Checked under the lock abort_work drains the parked work with.
    if c.dead.load(Ordering::SeqCst) || c.unbound.load(Ordering::SeqCst) {
        drop(parked);
        report_dropped(c, &job.desc);
        retire(s, c, 1);
        c.stats.aborted.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let answered = p.status() != FaultStatus::Pending;
    parked.push((job, p, slot));
    drop(parked);
    // A parked descriptor gives its work queue slot back, so that blocked
    // work of one client cannot fill the shared queue for the others.
    give_slots(s, c, 1);
    c.stats.faults_raised.fetch_add(1, Ordering::Relaxed);
    if answered {
        // Answered before it was parked: make sure a worker looks.
        s.fault_answered.store(true, Ordering::SeqCst);
    }
}

/// Moves parked jobs whose fault groups were answered to their client's
/// ready queue (they run in the client's turn, a unit at a time).
pub(super) fn resume_answered(s: &Shared, clients: &[Arc<ClientCtx>]) -> bool {
    if !s.fault_answered.swap(false, Ordering::AcqRel) {
        return false;
    }
    let mut did = false;
    for c in clients.iter() {
        let answered: Vec<(Job, Resume)> = match c.parked_iommu.lock() {
            Ok(mut parked) => {
                let mut out = Vec::new();
                let mut i = 0;
                while i < parked.len() {
                    let st = parked[i].1.status();
                    if st == FaultStatus::Pending {
                        i += 1;
                        continue;
                    }
                    // The fault's budget slot goes back here.
                    let (job, _, _) = parked.swap_remove(i);
                    let how = if st == FaultStatus::Success {
                        Resume::Success
                    } else {
                        Resume::Invalid
                    };
                    out.push((job, how));
                }
                out
            }
            Err(_) => Vec::new(),
        };
        if answered.is_empty() {
            continue;
        }
        c.stats
            .faults_answered
            .fetch_add(answered.len() as u64, Ordering::Relaxed);
        take_slots(s, c, answered.len() as u64);
        make_ready(s, c, answered, false);
        did = true;
    }
    did
}

/// Queues `jobs` (each holding a work queue slot) on `c`'s ready queue, in
/// order, at its front (`front`: they were taken from it) or back; drops
/// them instead when the client is gone, under the lock abort_work drains
/// the queue with.
pub(super) fn make_ready(
    s: &Shared,
    c: &ClientCtx,
    jobs: impl IntoIterator<Item = (Job, Resume)>,
    front: bool,
) {
    let Ok(mut ready) = c.ready.lock() else {
        return;
    };
    if c.dead.load(Ordering::SeqCst) || c.unbound.load(Ordering::SeqCst) {
        drop(ready);
        let mut n = 0;
        for (job, _) in jobs {
            report_dropped(c, &job.desc);
            n += 1;
        }
        retire(s, c, n);
        c.stats.aborted.fetch_add(n, Ordering::Relaxed);
        return;
    }
    if front {
        let mut v: Vec<_> = jobs.into_iter().collect();
        while let Some(j) = v.pop() {
            ready.push_front(j);
        }
    } else {
        ready.extend(jobs);
    }
    c.has_ready.store(!ready.is_empty(), Ordering::Release);
}

/// Completes held descriptors once everything before the drain at their
/// head has completed.
pub(super) fn check_held(s: &Shared, c: &ClientCtx, tr: &mut Translator) -> bool {
    if !c.has_held.load(Ordering::Acquire) {
        return false;
    }
    let mut did = false;
    loop {
        let Ok(mut held) = c.held.try_lock() else {
            return did;
        };
        // Only the held descriptors themselves are in flight: the drain at
        // the head may complete.
        if c.inflight.load(Ordering::Acquire) != held.len() as u64 {
            return did;
        }
        let Some(drain) = held.pop_front() else {
            c.has_held.store(false, Ordering::Release);
            return did;
        };
        // What follows the drain, up to the next drain, becomes ready: it
        // runs in the client's turns, a unit at a time.
        let mut run = Vec::new();
        while let Some(j) = held.front() {
            if j.desc.opcode == opcode::DRAIN {
                break;
            }
            if let Some(j) = held.pop_front() {
                run.push((j, Resume::Start));
            }
        }
        make_ready(s, c, run, false);
        if held.is_empty() {
            c.has_held.store(false, Ordering::Release);
        }
        drop(held);
        // The drain itself: validated and completed by the engine.
        run_job(s, c, drain, Resume::Start, tr);
        did = true;
    }
}
