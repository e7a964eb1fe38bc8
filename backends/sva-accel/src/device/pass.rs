//! A pass: one unit of work ([`WORK_UNIT`]) of one client, as many jobs as
//! fit sharing one access section.

use super::*;

/// Runs (or resumes) one job of client `c`: to completion, a park, or (a
/// unit of work done) a yield that queues it on the client's ready queue.
pub(super) fn run_job(s: &Shared, c: &ClientCtx, job: Job, resume: Resume, tr: &mut Translator) {
    run_pass(s, c, Source::One(Some(Box::new((job, resume)))), tr);
}

pub(super) fn write_record<M: engine::DmaMemory + ?Sized>(
    c: &ClientCtx,
    view: &M,
    d: &Descriptor,
    cr: &CompletionRecord,
) {
    if engine::wants_record(d, cr.status) {
        if let Err(e) = engine::write_completion(view, d.completion_addr, cr) {
            report(c, e, d.opcode);
        }
    }
}

/// Where a pass takes its jobs from.
pub(super) enum Source<'a> {
    /// Descriptors just taken from the portal.
    Fresh(std::slice::Iter<'a, Descriptor>),
    /// The client's ready queue, one job at a time.
    Ready,
    /// One job (boxed: rare, and large next to the others).
    One(Option<Box<(Job, Resume)>>),
}

impl Source<'_> {
    fn next(&mut self, c: &ClientCtx) -> Option<(Job, Resume)> {
        match self {
            Source::Fresh(it) => it.next().map(|d| (Job::new(*d), Resume::Start)),
            Source::Ready => {
                let mut q = c.ready.lock().ok()?;
                let j = q.pop_front();
                c.has_ready.store(!q.is_empty(), Ordering::Release);
                j
            }
            Source::One(j) => j.take().map(|b| *b),
        }
    }

    /// Puts back `yielded` (the job that stopped) and what the pass did not
    /// get to, in order, for the client's next turn.
    fn stash(self, s: &Shared, c: &ClientCtx, yielded: Option<Job>) {
        let first = yielded.map(|j| (j, Resume::Continue));
        match self {
            // The rest is still queued, behind where the yielded job was.
            Source::Ready => make_ready(s, c, first, true),
            Source::Fresh(it) => make_ready(
                s,
                c,
                first
                    .into_iter()
                    .chain(it.map(|d| (Job::new(*d), Resume::Start))),
                false,
            ),
            Source::One(j) => make_ready(s, c, first.into_iter().chain(j.map(|b| *b)), false),
        }
    }
}

/// Work a pass does for one client before the worker looks at other
/// clients' work and at waiting unmaps: bytes moved, compared, checksummed
/// or filled, plus [`engine::DESC_COST`] per descriptor and batch member.
/// A job that has more to do yields ([`Outcome::Yielded`]) and waits on the
/// client's ready queue for its next turn.
pub const WORK_UNIT: u64 = 1 << 20;

/// How a pass's access section ended.
enum SectionEnd {
    /// Nothing more to run.
    Done,
    /// An invalidation is waiting (or the client went): a new section.
    Again,
    /// The unit of work is spent.
    Spent,
    /// A job yielded with this progress.
    Yielded(Job),
    /// A job blocked on this fault (holding this fault budget slot).
    Parked(Job, PendingFault, Option<FaultSlot>),
}

/// Runs one unit of work ([`WORK_UNIT`]) of client `c` from `src` in order,
/// sharing one access section among as many jobs as it can, so that the
/// section's set-up and the translations it remembers (source,
/// destination, records) serve the whole pass rather than one descriptor.
/// What the unit did not get to (the job that yielded first) is queued on
/// the client's ready queue. True when it ran anything.
///
/// The section stays bounded: it holds at most one unit of work, and it
/// ends after any step once an unmap or invalidation is waiting for it, when
/// a descriptor parks on a fault, and when the client goes away or its
/// PASID is released (checked before every descriptor, as [`run_job`]
/// does).
pub(super) fn run_pass(
    s: &Shared,
    c: &ClientCtx,
    mut src: Source<'_>,
    tr: &mut Translator,
) -> bool {
    let mut budget = Budget::new(WORK_UNIT);
    let mut pending = src.next(c);
    let mut did = false;
    while let Some(first) = pending.take() {
        did = true;
        let gone = c.dead.load(Ordering::SeqCst) || c.unbound.load(Ordering::SeqCst);
        if gone {
            // Nothing translates for it: dropped and retired (reported as
            // an event when it asked for a record and the PASID went).
            let (job, _) = first;
            if !c.dead.load(Ordering::SeqCst) {
                report_dropped(c, &job.desc);
            }
            retire(s, c, 1);
            c.stats.aborted.fetch_add(1, Ordering::Relaxed);
            pending = src.next(c);
            continue;
        }
        let mut done = Retirements::default();
        let end = Dma::enter(tr, Some(c.pasid), |dma| {
            let mut next = Some(first);
            let mut ran = false;
            loop {
                if ran
                    && (dma.invalidation_requested()
                        || c.dead.load(Ordering::SeqCst)
                        || c.unbound.load(Ordering::SeqCst))
                {
                    return (SectionEnd::Again, next);
                }
                let Some((mut job, resume)) = next.take().or_else(|| src.next(c)) else {
                    return (SectionEnd::Done, None);
                };
                ran = true;
                #[cfg(feature = "fault-injection")]
                if resume == Resume::Start {
                    crate::inject::before_job(dma, &job.desc);
                }
                match execute_in(s, c, dma, &mut job, resume, &mut budget) {
                    Ran::Retired => done.add(s, c, &job.desc),
                    Ran::Blocked(p, slot) => return (SectionEnd::Parked(job, p, slot), None),
                    Ran::Yielded => return (SectionEnd::Yielded(job), None),
                }
                if budget.is_spent() {
                    return (SectionEnd::Spent, None);
                }
            }
        });
        done.flush(s, c);
        match end {
            (SectionEnd::Done, _) => return did,
            (SectionEnd::Again, next) => pending = next.or_else(|| src.next(c)),
            (SectionEnd::Spent, _) => {
                src.stash(s, c, None);
                return did;
            }
            (SectionEnd::Yielded(job), _) => {
                src.stash(s, c, Some(job));
                return did;
            }
            (SectionEnd::Parked(job, p, slot), _) => {
                // Park outside the section.
                park_iommu(s, c, job, p, slot);
                if budget.is_spent() {
                    src.stash(s, c, None);
                    return did;
                }
                pending = src.next(c);
            }
        }
    }
    did
}

/// Work a pass completes between two retirements: completions are counted
/// (work queue slots, credits, the client's wake-up) once per this much
/// work rather than once per descriptor, since each count is an atomic
/// read-modify-write that must first wait for the copy's stores to drain.
/// The completion records themselves are written per descriptor.
const RETIRE_BYTES: u64 = 256 * 1024;

/// Descriptors of a pass completed and not yet retired.
#[derive(Default)]
struct Retirements {
    n: u64,
    bytes: u64,
}

impl Retirements {
    fn add(&mut self, s: &Shared, c: &ClientCtx, d: &Descriptor) {
        self.n += 1;
        // A batch counts as a whole unit of work.
        let work = if d.opcode == opcode::BATCH {
            RETIRE_BYTES
        } else {
            u64::from(d.xfer_size)
        };
        self.bytes = self.bytes.saturating_add(work);
        if self.bytes >= RETIRE_BYTES {
            self.flush(s, c);
        }
    }

    fn flush(&mut self, s: &Shared, c: &ClientCtx) {
        if self.n == 0 {
            return;
        }
        retire(s, c, self.n);
        if c.portal.client_needs_wakeup() {
            shm::signal(&c.completion_efd);
        }
        *self = Retirements::default();
    }
}

/// How [`execute_in`] left a job.
enum Ran {
    /// Completed (record written or reported) or dropped: to be retired.
    Retired,
    /// Blocked on this raised fault (holding this fault budget slot): to
    /// be parked.
    Blocked(PendingFault, Option<FaultSlot>),
    /// The unit of work is spent: the job's progress is saved.
    Yielded,
}

/// Executes `job` of client `c` inside an open section, within `budget`:
/// on completion writes its record. A block with nothing raised (no fault
/// queue) is answered Invalid at once. The caller retires, parks or
/// queues the job.
fn execute_in(
    s: &Shared,
    c: &ClientCtx,
    dma: Dma<'_>,
    job: &mut Job,
    mut resume: Resume,
    budget: &mut Budget,
) -> Ran {
    let op = job.desc.opcode;
    // Two rounds at most: a block without a fault queue to raise on is
    // answered Invalid at once (the device has no page request service).
    for _ in 0..2 {
        let view = DmaView::with_budget(dma, &c.faults);
        let out = engine::execute_bounded(job, &view, &s.limits, resume, budget, &mut |e| {
            report(c, e, op)
        });
        match out {
            Outcome::Complete(cr) => {
                write_record(c, &view, &job.desc, &cr);
                return Ran::Retired;
            }
            Outcome::Yielded => return Ran::Yielded,
            Outcome::Blocked(_) => match view.take_failure() {
                Some(f) if f.pending.is_some() => {
                    if let Some(p) = f.pending {
                        return Ran::Blocked(p, f.slot);
                    }
                }
                // Nothing raised (no fault queue, or the client's fault
                // budget is spent): answered Invalid at once.
                _ => resume = Resume::Invalid,
            },
        }
    }
    ioasis::log_limited!(
        log::Level::Warn,
        "PASID {}: descriptor blocked after an Invalid answer",
        c.pasid
    );
    Ran::Retired
}
