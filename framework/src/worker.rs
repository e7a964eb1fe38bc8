//! Worker threads: the data plane of a running device.
//!
//! One thread per entry of [`Device::queues_per_thread`]. Each thread has its
//! own epoll set (its queues' kick eventfds, a control eventfd, and the
//! device's own event sources), its own iommu-core translator (so its
//! translation cache needs no lock), and its [`Worker`]. Every call into the
//! worker runs inside one access section of the translator.
//!
//! The data plane knows no transport: what it must tell the driver (a
//! translation miss, an access failure, a call, a failed ring) goes through
//! the connection's [`Transport`]; kicks arrive on the rings' kick eventfds,
//! which the transport installs.
//!
//! After each round of events the thread asks the worker whether it keeps
//! polling ([`Worker::before_sleep`]): while it does, the thread looks for
//! events without blocking and asks again; otherwise it blocks in
//! `epoll_wait`.
//!
//! A queue that misses a translation is parked by the queue layer; after the
//! call the thread reports the miss through the transport (when addresses
//! are IOVAs), with the misses the queue layer found in the chains behind
//! it, each page once (so that the driver side answers them back to back,
//! see [`Runner::report`]), and sleeps until the connection thread resumes
//! it through the control eventfd, once the address space covers the
//! address. Nothing spins and no popped chain is lost.
//!
//! When the driver stops a ring (vhost-user's GET_VRING_BASE) or disables
//! it (SET_VRING_ENABLE 0), buffers it already made available count as
//! submitted on its side. The connection thread asks the worker serving that
//! ring for a final pass ([`WorkerSet::final_pass`]): the worker calls the
//! device on the ring until a call consumes nothing more, then signals back;
//! the connection waits for that (bounded, holding no vring lock), then stops
//! the ring and reads its base. A ring that is parked, failed, disabled or
//! served by no worker is stopped at once.
//!
//! The call and error eventfds a worker writes may be a peer's, and a
//! peer can make such a write wait forever ([`crate::peer_write`]).
//! Every thread that waits on a worker (for a ring lock, an access section
//! or its exit) interrupts such a write after a short grace: a worker
//! never holds up the connection, the service or the server's shutdown.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iommu_core::Translator;
use log::{debug, error, warn};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::context::{Waker, WorkerContext};
use crate::device::{device_token_of, Device, DeviceError, EventRegistrar, Idle, Worker};
use crate::dma::{Access, Dma, Section};
use crate::epoll::{self, CtlOp, Epoll, EpollEvent, EpollFlags};
use crate::peer_write::{self, Writer};
use crate::queue::{Queues, Vring};
use crate::removed::{RemovalCount, RemovedRanges};
use crate::transport::{MissReport, Transport};

/// Token of the control eventfd in a worker's epoll set (queue tokens are
/// queue indices, device tokens carry [`device_token_of`]'s bit).
const CTL_TOKEN: u64 = 1 << 62;
/// Poll interval while a miss could not be sent yet.
const RETRY: Duration = Duration::from_millis(10);
/// How long a reported miss counts as asked for: a queue that parks on a
/// page reported this recently (ahead of its chain) waits for the update
/// on its way rather than asking again. Until then only an unmap that
/// overlaps the page (or a ring change) forgets the ask. Long enough for a frontend to work
/// through the misses queued before it: QEMU answers one at a time, each
/// after its update's reply, and under TCG a batch of 17 took longer than
/// the 5 ms this used to be. The page was asked again meanwhile, QEMU
/// answered twice, and when it read the second ask after the driver had
/// used and unmapped the buffer, its translation failed and the guest's
/// IOMMU recorded a DMA fault for a buffer the device was done with
/// (strict guest IOMMU, `vdpa_net_migration`'s strict test with
/// `RUST_LOG=debug`: 4344 of 27179 misses were such second asks).
const ASKED_FOR: Duration = Duration::from_millis(100);
/// The granule of [`ASKED_FOR`]'s bookkeeping (a frontend answers a miss
/// with at least the page around it).
const ASKED_PAGE: u64 = 4096;
/// Most pages remembered as asked for.
const ASKED_MAX: usize = 64;
/// Events handled per epoll_wait.
const MAX_EVENTS: usize = 64;
/// Most worker calls in one final pass of a queue (each consumes at least one
/// buffer, or the pass ends).
const FINAL_PASS_CALLS: usize = 1024;
/// Longest wait of a final pass for the worker's I/O in flight (the
/// connection waits one second for the whole pass).
const FINAL_PASS_IN_FLIGHT: Duration = Duration::from_millis(900);
/// Longest wait of an ending worker for its I/O in flight.
const EXIT_IN_FLIGHT: Duration = Duration::from_secs(5);

/// State a connection of a transport shares with its workers.
#[derive(Debug)]
pub(crate) struct ConnShared {
    /// Addresses are IOVAs of an I/O address space the driver side maps
    /// (`VIRTIO_F_ACCESS_PLATFORM`): a miss is reported to it and waits.
    pub iotlb_mode: AtomicBool,
    /// How the workers reach the driver.
    pub transport: Arc<dyn Transport>,
    /// A worker hit an error the driver must reset the device for.
    pub needs_reset: AtomicBool,
    /// The features the driver acknowledged (what [`WorkerContext`] says).
    pub features: AtomicU64,
    /// Bumped by the transport before it unmaps anything from the address
    /// space (sequentially consistent): a worker that misses an address
    /// and then reads it sees the removal that unmapped it. Workers forget
    /// the misses they reported that a removal since overlapped
    /// ([`Runner::report`]).
    pub removals: Arc<RemovalCount>,
    /// The ranges of the last removals, by their number in `removals`
    /// (recorded by the vhost-user address space; a removal counted
    /// without one makes the workers forget every miss).
    pub removed: Arc<RemovedRanges>,
    /// The running worker threads' controls.
    workers: Mutex<Vec<Arc<Ctl>>>,
}

impl ConnShared {
    /// The shared state of a connection whose workers reach the driver
    /// through `transport`.
    pub fn new(transport: Arc<dyn Transport>) -> ConnShared {
        ConnShared {
            iotlb_mode: AtomicBool::new(false),
            transport,
            needs_reset: AtomicBool::new(false),
            features: AtomicU64::new(0),
            removals: Arc::default(),
            removed: Arc::default(),
            workers: Mutex::new(Vec::new()),
        }
    }

    fn workers(&self) -> MutexGuard<'_, Vec<Arc<Ctl>>> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks a ring of this connection from a thread other than its
    /// workers; a worker that holds it while wedged in a write to the
    /// frontend's eventfd is interrupted ([`peer_write::lock`]).
    pub fn lock_vring<'a>(&self, m: &'a Mutex<Vring>) -> MutexGuard<'a, Vring> {
        peer_write::lock(m, || {
            for c in self.workers().iter() {
                c.writer.interrupt();
            }
        })
    }

    /// Wakes every running worker through its control eventfd (ours, not
    /// the frontend's): each re-reads its rings and processes what is
    /// serving.
    pub fn wake_workers(&self) {
        for c in self.workers().iter() {
            if let Err(e) = c.event.write(1) {
                warn!("waking worker: {e}");
            }
        }
    }
}

#[derive(Debug)]
struct Ctl {
    event: EventFd,
    stop: AtomicBool,
    /// Final passes the connection thread asked for.
    drain: Mutex<Drain>,
    /// Signalled when the worker finished a round of final passes.
    drained: Condvar,
    /// The worker thread's writes to the frontend's eventfds.
    writer: Writer,
}

/// Final-pass bookkeeping of one worker thread.
///
/// The connection thread adds queues to `requested`; the worker takes the
/// whole set at once (bumping `taken`), runs a final pass on each, then sets
/// `finished` to the round it took. A request added when `taken` was `t` is
/// served by round `t + 1` at the latest, so it is complete once
/// `finished >= t + 1`.
#[derive(Debug, Default)]
struct Drain {
    /// Queue bits whose final pass was asked for and not yet taken.
    requested: u64,
    /// Rounds taken by the worker.
    taken: u64,
    /// Last round whose passes are complete.
    finished: u64,
}

fn lock_drain(m: &Mutex<Drain>) -> MutexGuard<'_, Drain> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[derive(Debug)]
struct Thread {
    ctl: Arc<Ctl>,
    /// Queues this thread serves (bit i: queue i).
    mask: u64,
    handle: Option<JoinHandle<()>>,
}

/// How a final pass on a queue ended (see [`WorkerSet::final_pass`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FinalPass {
    /// The owning worker processed what the queue had available.
    Done,
    /// No running worker thread serves the queue.
    NoWorker,
    /// The worker did not answer in time.
    TimedOut,
}

/// The running worker threads of one connection.
#[derive(Debug)]
pub(crate) struct WorkerSet {
    threads: Vec<Thread>,
    shared: Arc<ConnShared>,
}

/// Errors starting workers.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The device could not build a worker.
    #[error("Device failed to build worker {thread}")]
    Device {
        /// Thread index.
        thread: usize,
        /// The device's error.
        #[source]
        source: DeviceError,
    },
    /// A system resource could not be created.
    #[error("Creating worker {thread} failed: {op}")]
    Io {
        /// Thread index.
        thread: usize,
        /// What failed.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl WorkerSet {
    /// Builds one worker per thread mask and starts the threads.
    pub fn start(
        device: &Arc<dyn Device>,
        vrings: &[Arc<Mutex<Vring>>],
        core: &iommu_core::IommuDevice,
        shared: &Arc<ConnShared>,
    ) -> Result<WorkerSet, WorkerError> {
        let masks = device.queues_per_thread();
        let mut set = WorkerSet {
            threads: Vec::with_capacity(masks.len()),
            shared: shared.clone(),
        };
        for (thread, mask) in masks.iter().enumerate() {
            let mine: Vec<(u16, Arc<Mutex<Vring>>)> = vrings
                .iter()
                .enumerate()
                .filter(|(i, _)| *i < 64 && mask & (1u64 << i) != 0)
                .filter_map(|(i, v)| u16::try_from(i).ok().map(|i| (i, v.clone())))
                .collect();
            let worker = device
                .worker(thread)
                .map_err(|source| WorkerError::Device { thread, source })?;
            let event = EventFd::new(EFD_NONBLOCK).map_err(|source| WorkerError::Io {
                thread,
                op: "eventfd",
                source,
            })?;
            let ctl = Arc::new(Ctl {
                event,
                stop: AtomicBool::new(false),
                drain: Mutex::new(Drain::default()),
                drained: Condvar::new(),
                writer: Writer::new(),
            });
            let weak = Arc::downgrade(&ctl);
            let context = WorkerContext {
                thread,
                features: shared.features.load(Ordering::SeqCst),
                num_queues: device.num_queues(),
                queues: mine.iter().map(|(i, _)| *i).collect(),
                waker: Waker(Arc::new(move || {
                    if let Some(c) = weak.upgrade() {
                        let _ = c.event.write(1);
                    }
                })),
            };
            let mut runner = Runner {
                context,
                thread,
                worker,
                vrings: mine,
                translator: core.translator(),
                ctl: ctl.clone(),
                shared: shared.clone(),
                kicks: Vec::new(),
                kicks_seen: None,
                pending_report: false,
                asked: Vec::with_capacity(ASKED_MAX),
                asked_removals: 0,
                errors: 0,
            };
            let cpus = device.worker_cpus(thread);
            let handle = std::thread::Builder::new()
                .name(format!("ioasis-worker-{thread}"))
                .spawn(move || {
                    if let Some(cpus) = cpus {
                        // A CPU the process may no longer use: the worker
                        // runs unpinned rather than not at all.
                        if let Err(e) = crate::affinity::pin_current_thread(&cpus) {
                            error!("worker {thread}: not pinned to CPUs {cpus:?}: {e}");
                        }
                    }
                    runner.run_attached()
                })
                .map_err(|source| WorkerError::Io {
                    thread,
                    op: "spawn",
                    source,
                })?;
            shared.workers().push(ctl.clone());
            set.threads.push(Thread {
                ctl,
                mask: *mask,
                handle: Some(handle),
            });
        }
        Ok(set)
    }

    /// Wakes every worker: re-read kick fds and process every serving queue
    /// (used after ring changes and to resume parked queues).
    pub fn wake(&self) {
        for t in &self.threads {
            if let Err(e) = t.ctl.event.write(1) {
                warn!("waking worker: {e}");
            }
        }
    }

    /// Asks the worker that serves queue `index` to process what the queue
    /// has available one last time, and waits up to `timeout` for it.
    ///
    /// The caller must hold no vring lock: the worker takes it. The worker
    /// never waits on the caller. The pass leaves the queue running; the
    /// caller stops it afterwards (under the vring lock, so nothing the
    /// worker consumes after the pass escapes the caller's reading of the
    /// ring state).
    pub fn final_pass(&self, index: u16, timeout: Duration) -> FinalPass {
        let Some(bit) = 1u64.checked_shl(u32::from(index)) else {
            return FinalPass::NoWorker;
        };
        let Some(t) = self.threads.iter().find(|t| t.mask & bit != 0) else {
            return FinalPass::NoWorker;
        };
        if t.handle.as_ref().is_none_or(|h| h.is_finished()) {
            return FinalPass::NoWorker;
        }
        let target = {
            let mut d = lock_drain(&t.ctl.drain);
            d.requested |= bit;
            d.taken + 1
        };
        if let Err(e) = t.ctl.event.write(1) {
            warn!("queue {index}: waking its worker for a final pass: {e}");
        }
        let deadline = Instant::now() + timeout;
        let mut d = lock_drain(&t.ctl.drain);
        while d.finished < target {
            let now = Instant::now();
            if now >= deadline {
                // A pass the worker did not take yet is withdrawn; one it
                // took is harmless (the queue is still running).
                d.requested &= !bit;
                return FinalPass::TimedOut;
            }
            d = match t.ctl.drained.wait_timeout(d, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        FinalPass::Done
    }

    /// Stops and joins every worker thread.
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for t in &self.threads {
            t.ctl.stop.store(true, Ordering::SeqCst);
            let _ = t.ctl.event.write(1);
        }
        for t in &mut self.threads {
            if let Some(h) = t.handle.take() {
                // A worker wedged in a write to the frontend's eventfd is
                // interrupted.
                if !peer_write::join(h, &t.ctl.writer) {
                    error!("a worker thread panicked");
                }
            }
        }
        self.shared
            .workers()
            .retain(|c| !self.threads.iter().any(|t| Arc::ptr_eq(c, &t.ctl)));
    }
}

impl Drop for WorkerSet {
    fn drop(&mut self) {
        self.stop_all();
    }
}

struct Runner {
    context: WorkerContext,
    thread: usize,
    worker: Box<dyn Worker>,
    vrings: Vec<(u16, Arc<Mutex<Vring>>)>,
    translator: Translator,
    ctl: Arc<Ctl>,
    shared: Arc<ConnShared>,
    /// Our clones of the kick fds, registered in epoll.
    kicks: Vec<(u16, EventFd)>,
    /// Each ring's `(started, kick_gen)` when `kicks` was last built.
    kicks_seen: Option<Vec<(bool, u64)>>,
    pending_report: bool,
    /// Pages whose misses this thread reported lately, for which access,
    /// and when (see [`Runner::report`]).
    asked: Vec<Asked>,
    /// [`ConnShared::removals`] when `asked` was last checked.
    asked_removals: u64,
    /// Errors returned by the worker (logged at powers of two).
    errors: u64,
}

fn lock(m: &Mutex<Vring>) -> std::sync::MutexGuard<'_, Vring> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A miss this thread reported: the page, the access asked for, when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Asked {
    page: u64,
    access: Access,
    at: Instant,
}

/// Remembers in `asked` that the page of `iova` was asked for `access` at
/// `now` (the oldest entry makes room).
fn note_asked(asked: &mut Vec<Asked>, iova: u64, access: Access, now: Instant) {
    if asked.len() >= ASKED_MAX {
        asked.remove(0);
    }
    asked.push(Asked {
        page: iova & !(ASKED_PAGE - 1),
        access,
        at: now,
    });
}

/// Whether a miss of `iova` for `access` was asked already: the same page
/// asked for that access, or for both. An ask for the other access does not
/// count: the frontend translates a miss for the access it names, and a
/// page the driver mapped for one direction only (a transmit buffer the
/// device may only read) answers a read and not a write, or the reverse, so
/// a queue that needs the other access would wait for an update that never
/// comes (the quickstart's transmit from unmapped memory, whose page the
/// receive queue had asked for writing, waited so).
fn already_asked(asked: &[Asked], iova: u64, access: Access) -> bool {
    let page = iova & !(ASKED_PAGE - 1);
    asked
        .iter()
        .any(|a| a.page == page && (a.access == access || a.access == Access::ReadWrite))
}

/// Forgets the pages in `asked` that the removals numbered `from + 1..=to`
/// overlapped (all of them if one of those ranges is not known): a page
/// answered and unmapped since must be asked for again at once, while one
/// whose update is still on its way stays asked.
fn forget_removed(asked: &mut Vec<Asked>, removed: &RemovedRanges, from: u64, to: u64) {
    #[cfg(ioasis_broken = "missforgetnone")]
    {
        let _ = (asked, removed, from, to);
    }
    #[cfg(ioasis_broken = "missforgetall")]
    {
        let _ = (removed, from, to);
        asked.clear();
    }
    #[cfg(not(any(ioasis_broken = "missforgetnone", ioasis_broken = "missforgetall")))]
    {
        let known = removed.each_since(from, to, |first, last| {
            asked.retain(|a| a.page > last || a.page.saturating_add(ASKED_PAGE - 1) < first)
        });
        if !known {
            asked.clear();
        }
    }
}

/// Watches `fd` (an eventfd offering only `AsRawFd`) for input under `token`.
fn watch_raw(epoll: &Epoll, fd: std::os::fd::RawFd, token: u64) -> std::io::Result<()> {
    epoll::ctl_raw(epoll, CtlOp::Add, fd, EpollFlags::EPOLLIN, token)
}

impl Runner {
    /// Runs the worker on this thread, interruptible while it writes to the
    /// frontend's eventfds.
    fn run_attached(&mut self) {
        struct Detach<'a>(&'a Writer);
        impl Drop for Detach<'_> {
            fn drop(&mut self) {
                self.0.detach();
            }
        }
        let ctl = self.ctl.clone();
        if let Err(e) = ctl.writer.attach() {
            error!(
                "worker {}: a write to the frontend's eventfds cannot be interrupted: {e}",
                self.thread
            );
        }
        // Runs on every exit, unwinding included.
        let _detach = Detach(&ctl.writer);
        // An unmap waiting for this thread's access section interrupts its
        // write to the frontend.
        // It also wakes the thread: I/O it has pinned must drain.
        let weak = Arc::downgrade(&ctl);
        self.translator.set_nudge(Some(Arc::new(move || {
            if let Some(c) = weak.upgrade() {
                c.writer.interrupt();
                let _ = c.event.write(1);
            }
        })));
        self.run();
        self.translator.set_nudge(None);
    }

    fn run(&mut self) {
        let epoll = match epoll::new() {
            Ok(e) => e,
            Err(e) => {
                error!("worker {}: epoll_create1: {e}", self.thread);
                return;
            }
        };
        self.serve(&epoll);
        // Deferred chains complete before the worker goes (their pins
        // hold every invalidation of the device).
        self.wait_in_flight(&epoll, EXIT_IN_FLIGHT);
        let left = self.worker.in_flight();
        if left > 0 {
            error!(
                "worker {}: {left} requests still in flight after {EXIT_IN_FLIGHT:?}; the device's worker is dropped with them",
                self.thread
            );
        }
    }

    /// Dispatches the device's events (its I/O completions) until it
    /// reports nothing in flight or `limit` passed. Kicks are read and
    /// their queues processed afterwards; the control eventfd is left
    /// to the main loop. Blocks outside any access section.
    fn wait_in_flight(&mut self, epoll: &Epoll, limit: Duration) {
        if self.worker.in_flight() == 0 {
            return;
        }
        let deadline = Instant::now() + limit;
        let mut kicked: Vec<u16> = Vec::new();
        let mut events = [EpollEvent::empty(); MAX_EVENTS];
        while self.worker.in_flight() > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let step = (deadline - now).min(Duration::from_millis(10));
            let n = match epoll::wait(epoll, &mut events, Some(step)) {
                Ok(n) => n.min(MAX_EVENTS),
                Err(_) => break,
            };
            for ev in events.iter().take(n) {
                let token = ev.data();
                if let Some(token) = device_token_of(token) {
                    self.handle_device_event(token);
                } else if let Ok(index) = u16::try_from(token) {
                    if let Some((_, k)) = self.kicks.iter().find(|(i, _)| *i == index) {
                        let _ = crate::peer_fd::read_counter(k);
                        if !kicked.contains(&index) {
                            kicked.push(index);
                        }
                    }
                }
            }
            if self.translator.drain_requested() {
                self.call(|w, queues| w.drain(queues));
            }
        }
        for index in kicked {
            self.process(index);
        }
    }

    fn serve(&mut self, epoll: &Epoll) {
        if let Err(e) = watch_raw(epoll, self.ctl.event.as_raw_fd(), CTL_TOKEN) {
            error!("worker {}: registering control eventfd: {e}", self.thread);
            return;
        }
        {
            let mut reg = EventRegistrar {
                epoll,
                thread: self.thread,
                context: Some(&self.context),
            };
            if let Err(e) = self.worker.init(&mut reg) {
                error!("worker {}: init failed: {e}", self.thread);
                self.shared.needs_reset.store(true, Ordering::SeqCst);
            }
        }
        self.sync_kicks(epoll);
        self.process_all();
        // The device keeps polling (Idle::Poll): look at events without
        // blocking and ask it again.
        let mut polling = self.before_sleep();
        self.report();
        let mut events = [EpollEvent::empty(); MAX_EVENTS];
        loop {
            if self.ctl.stop.load(Ordering::SeqCst) {
                break;
            }
            let timeout = if polling {
                Some(Duration::ZERO)
            } else if self.pending_report {
                Some(RETRY)
            } else {
                None
            };
            // An interrupted wait returns no events.
            let n = match epoll::wait(epoll, &mut events, timeout) {
                Ok(n) => n.min(MAX_EVENTS),
                Err(e) => {
                    error!("worker {}: epoll_wait: {e}", self.thread);
                    break;
                }
            };
            for ev in events.iter().take(n) {
                let token = ev.data();
                if token == CTL_TOKEN {
                    let _ = self.ctl.event.read();
                    if self.ctl.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if self.translator.drain_requested() {
                        self.call(|w, queues| w.drain(queues));
                    }
                    self.final_passes_in(epoll);
                    self.sync_kicks(epoll);
                    self.process_all();
                } else if let Some(token) = device_token_of(token) {
                    self.handle_device_event(token);
                } else if let Ok(index) = u16::try_from(token) {
                    if let Some((_, k)) = self.kicks.iter().find(|(i, _)| *i == index) {
                        // The frontend's eventfd: it may also be another
                        // queue's kick (the other read may have emptied it
                        // first), so never a blocking read.
                        let _ = crate::peer_fd::read_counter(k);
                    }
                    self.process(index);
                }
            }
            // About to block again (or still polling): the device's say.
            if n > 0 || polling {
                polling = self.before_sleep();
            }
            self.report();
        }
    }

    /// Watches the kick fds of this thread's started rings, unless they
    /// are the ones already watched (a wake-up of the control eventfd, such
    /// as a queue resumed after a miss, usually changes none).
    fn sync_kicks(&mut self, epoll: &Epoll) {
        let seen: Vec<(bool, u64)> = self
            .vrings
            .iter()
            .map(|(_, m)| {
                let v = lock(m);
                (v.started, v.kick_gen)
            })
            .collect();
        if self.kicks_seen.as_ref() == Some(&seen) {
            return;
        }
        self.kicks_seen = Some(seen);
        // A ring (re)started or stopped: what was asked may have been
        // dropped (QEMU discards the misses it reads while the device is
        // stopped), so it is asked again when needed.
        self.asked.clear();
        for (_, k) in self.kicks.drain(..) {
            // Best effort: the fd is ours, so it is still registered.
            let _ = epoll::ctl_raw(epoll, CtlOp::Delete, k.as_raw_fd(), EpollFlags::empty(), 0);
        }
        for (index, m) in &self.vrings {
            let v = lock(m);
            if !v.started {
                continue;
            }
            let Some(kick) = &v.kick else { continue };
            match kick.try_clone() {
                Ok(k) => {
                    if let Err(e) = watch_raw(epoll, k.as_raw_fd(), u64::from(*index)) {
                        error!(
                            "worker {}: watching kick of queue {index}: {e}",
                            self.thread
                        );
                        continue;
                    }
                    self.kicks.push((*index, k));
                }
                Err(e) => error!("worker {}: cloning kick of queue {index}: {e}", self.thread),
            }
        }
    }

    /// Runs the final passes the connection thread asked for and tells it.
    fn final_passes_in(&mut self, epoll: &Epoll) {
        let (requested, round) = {
            let mut d = lock_drain(&self.ctl.drain);
            if d.requested == 0 {
                return;
            }
            d.taken += 1;
            (std::mem::take(&mut d.requested), d.taken)
        };
        for i in 0..self.vrings.len() {
            let index = self.vrings[i].0;
            if 1u64
                .checked_shl(u32::from(index))
                .is_some_and(|bit| requested & bit != 0)
            {
                self.final_pass(i);
            }
        }
        // Requests in flight complete before the driver reads the rings.
        self.wait_in_flight(epoll, FINAL_PASS_IN_FLIGHT);
        lock_drain(&self.ctl.drain).finished = round;
        self.ctl.drained.notify_all();
    }

    /// Processes queue `self.vrings[i]` until a call consumes nothing more
    /// (a device may handle only part of a ring per call), the queue stops
    /// serving (parked, failed) or the call bound is reached.
    fn final_pass(&mut self, i: usize) {
        let index = self.vrings[i].0;
        let mut last = None;
        for _ in 0..FINAL_PASS_CALLS {
            let (serving, next) = {
                let v = lock(&self.vrings[i].1);
                (v.serving(), v.q.next_avail())
            };
            if !serving || last == Some(next) {
                return;
            }
            last = Some(next);
            self.process(index);
        }
        debug!(
            "worker {}: queue {index} still consuming after {FINAL_PASS_CALLS} final calls",
            self.thread
        );
    }

    fn process_all(&mut self) {
        for i in 0..self.vrings.len() {
            let index = self.vrings[i].0;
            let serving = lock(&self.vrings[i].1).serving();
            if serving {
                self.process(index);
            }
        }
    }

    fn process(&mut self, index: u16) {
        self.call(|w, queues| w.process_queue(index, queues));
    }

    fn handle_device_event(&mut self, token: u64) {
        self.call(|w, queues| w.handle_event(token, queues));
    }

    /// Calls [`Worker::before_sleep`]; true if the device keeps polling
    /// (an error counts as sleep).
    fn before_sleep(&mut self) -> bool {
        let mut idle = Idle::Sleep;
        self.call(|w, queues| {
            idle = w.before_sleep(queues)?;
            Ok(())
        });
        idle == Idle::Poll
    }

    /// Calls the worker inside one access section of the thread's
    /// translator, with its queues, then handles the outcome.
    fn call(
        &mut self,
        f: impl FnOnce(&mut dyn Worker, &mut Queues<'_>) -> Result<(), DeviceError>,
    ) {
        let iotlb = self.shared.iotlb_mode.load(Ordering::Relaxed);
        let r = {
            let section = Section::new(&mut self.translator, None, !iotlb);
            let mut queues = Queues::new(
                &self.vrings,
                Dma::from_section(&section),
                iotlb,
                &self.ctl.writer,
                &*self.shared.transport,
            );
            f(&mut *self.worker, &mut queues)
        };
        #[cfg(feature = "fault-injection")]
        crate::fault_injection::after_section();
        self.after(r);
    }

    fn after(&mut self, r: Result<(), DeviceError>) {
        let Err(e) = r else { return };
        if e.is_translation_miss() {
            debug!("worker {}: parked on a translation miss: {e}", self.thread);
            return;
        }
        if let Some((iova, access)) = e.dma_error().and_then(|d| d.denied_address()) {
            if self.shared.iotlb_mode.load(Ordering::SeqCst) {
                self.shared.transport.access_failed(iova, access);
            }
        }
        self.errors += 1;
        if self.errors.is_power_of_two() {
            error!(
                "worker {}: {} ({} errors so far)",
                self.thread,
                crate::error_chain(&e),
                self.errors
            );
        }
        if e.needs_reset() {
            self.shared.needs_reset.store(true, Ordering::SeqCst);
        }
        let failed = match &e {
            DeviceError::Queue(q) => Some(q.queue()),
            _ => None,
        };
        for (index, m) in &self.vrings {
            let mut v = lock(m);
            if v.broken || failed == Some(*index) {
                self.shared
                    .transport
                    .queue_failed(*index, &mut v.signals, &self.ctl.writer);
            }
        }
    }

    /// Reports unreported misses of parked queues, and the misses their
    /// queue layer found in the chains behind ([`Vring::ahead`]), so that
    /// the frontend answers them one after another (QEMU reads a miss,
    /// sends its update and waits for the reply before the next: with the
    /// next misses already queued it goes on at once instead of waiting for
    /// this thread's round trip). Each page is asked for once
    /// ([`ASKED_FOR`]): a queue that parks on a page reported ahead waits
    /// for the update on its way. A page is forgotten when an unmap
    /// overlaps it ([`ConnShared::removals`], [`ConnShared::removed`]): an
    /// update that came and was invalidated since is asked for again at
    /// once, while unmaps elsewhere (a strict guest IOMMU unmaps every
    /// buffer the device used) leave the pages whose updates are on their
    /// way asked.
    fn report(&mut self) {
        self.pending_report = false;
        let iotlb = self.shared.iotlb_mode.load(Ordering::SeqCst);
        for (index, m) in &self.vrings {
            let mut v = lock(m);
            let Some(mut p) = v.parked else { continue };
            if p.reported {
                continue;
            }
            if !iotlb {
                // Without an IOMMU every valid address is in the memory table:
                // the driver gave an address outside guest memory, or the
                // table is being changed. Wait for the next table change.
                crate::log_limited!(log::Level::Warn,
                    "queue {index}: address {:#x} is not in the memory table; the queue waits for a memory table change",
                    p.iova
                );
                p.reported = true;
                v.parked = Some(p);
                continue;
            }
            let now = Instant::now();
            // A page answered and then unmapped again (the driver reusing
            // an I/O address) must be asked for again, at once.
            let removals = self.shared.removals.load(Ordering::SeqCst);
            if removals != self.asked_removals {
                forget_removed(
                    &mut self.asked,
                    &self.shared.removed,
                    self.asked_removals,
                    removals,
                );
                self.asked_removals = removals;
            }
            self.asked
                .retain(|a| now.saturating_duration_since(a.at) < ASKED_FOR);
            if already_asked(&self.asked, p.iova, p.access) {
                // Reported ahead of this chain lately: its update is on its
                // way and resumes the queue, as for a miss reported now
                // (neither is asked again while the queue waits; a polling
                // worker would otherwise look at it on every turn, taking
                // the ring's lock from the connection thread that resumes
                // it).
                p.reported = true;
            } else {
                match self.shared.transport.report_miss(*index, p.iova, p.access) {
                    MissReport::Done => {
                        p.reported = true;
                        note_asked(&mut self.asked, p.iova, p.access, now);
                    }
                    MissReport::Retry => self.pending_report = true,
                }
            }
            v.parked = Some(p);
            // The chains behind it: their misses are reported now, so that
            // the frontend answers them back to back.
            let ahead = std::mem::take(&mut v.ahead);
            for &(iova, access) in &ahead {
                if already_asked(&self.asked, iova, access) {
                    continue;
                }
                match self.shared.transport.report_miss(*index, iova, access) {
                    MissReport::Done => note_asked(&mut self.asked, iova, access, now),
                    // Asked again when its chain misses.
                    MissReport::Retry => break,
                }
            }
            v.ahead = ahead;
            v.ahead.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(asked: &[Asked]) -> Vec<u64> {
        asked.iter().map(|a| a.page).collect()
    }

    /// A page asked for one access is not asked for the other (fails if
    /// asks are told apart by page alone, as before this test: the
    /// quickstart's transmit then waited for ever).
    #[test]
    fn test_an_ask_covers_its_own_access_only() {
        let now = Instant::now();
        let mut asked = Vec::new();
        note_asked(&mut asked, 0x5010, Access::Write, now);
        assert!(already_asked(&asked, 0x5ff0, Access::Write));
        assert!(!already_asked(&asked, 0x5000, Access::Read));
        assert!(!already_asked(&asked, 0x5000, Access::ReadWrite));
        assert!(!already_asked(&asked, 0x6000, Access::Write));
        note_asked(&mut asked, 0x9000, Access::ReadWrite, now);
        assert!(already_asked(&asked, 0x9000, Access::Read));
        assert!(already_asked(&asked, 0x9000, Access::Write));
    }

    /// An unmap forgets exactly the asks it overlapped (fails with
    /// `--cfg ioasis_broken="missforgetnone"` and `"missforgetall"`).
    #[test]
    fn test_forget_removed_forgets_only_overlapped_pages() {
        let removed = RemovedRanges::default();
        let count = RemovalCount::new(0);
        let now = Instant::now();
        let mut asked = Vec::new();
        for iova in [0x1000, 0x2234, 0x5000, 0x9fff] {
            note_asked(&mut asked, iova, Access::Write, now);
        }
        // Ends inside 0x2000's page; starts inside 0x9000's page.
        removed.record(&count, 0x1800, 0x2000);
        removed.record(&count, 0x9ffe, 0xa000);
        forget_removed(&mut asked, &removed, 0, count.load(Ordering::SeqCst));
        assert_eq!(pages(&asked), [0x5000]);
        // Already seen removals change nothing.
        note_asked(&mut asked, 0x1000, Access::Write, now);
        forget_removed(&mut asked, &removed, 2, 2);
        assert_eq!(pages(&asked), [0x5000, 0x1000]);
    }

    /// A removal whose range is not known (counted without one, or
    /// overwritten since) forgets every ask.
    #[test]
    fn test_forget_removed_forgets_all_when_a_range_is_unknown() {
        let removed = RemovedRanges::default();
        let count = RemovalCount::new(0);
        let now = Instant::now();
        let mut asked = Vec::new();
        note_asked(&mut asked, 0x5000, Access::Write, now);
        count.fetch_add(1, Ordering::SeqCst);
        forget_removed(&mut asked, &removed, 0, 1);
        assert!(asked.is_empty());
        note_asked(&mut asked, 0x5000, Access::Write, now);
        for _ in 0..=crate::removed::REMOVED_SLOTS {
            removed.record(&count, 0x1000, 0x1fff);
        }
        forget_removed(&mut asked, &removed, 1, count.load(Ordering::SeqCst));
        assert!(asked.is_empty());
    }
}
