//! The control thread of a VDUSE device: it answers the kernel's requests
//! read from the device fd ([`super::msg`]) and the workers' misses, and
//! starts and stops the worker threads as the driver sets the device
//! status.
//!
//! - `SET_STATUS` with `DRIVER_OK`: the features the driver acknowledged
//!   (`VDUSE_DEV_GET_FEATURES`) go to the device, the kernel's regions are
//!   mapped into the device's IOAS, each ready queue is set up from
//!   `VDUSE_VQ_GET_INFO` (size, ring IOVAs, avail index) with a kick
//!   eventfd of ours handed to the kernel (`VDUSE_VQ_SETUP_KICKFD`), and
//!   the workers start; the answer goes back once they run.
//! - `SET_STATUS` without `DRIVER_OK` after it (a reset is status 0): the
//!   workers stop, the queues and the device are reset and the IOAS is
//!   emptied (the kernel frees the rings and may reuse their IOVAs).
//! - `GET_VQ_STATE`: the queue's next avail index.
//! - `UPDATE_IOTLB`: the range is unmapped (waiting until no worker uses
//!   it) before the answer.
//! - A worker's miss: the region is looked up and mapped, and the queues
//!   it covers resumed.
//!
//! Every request is answered, a malformed one with a failure (logged).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, error, info, warn};
use virtio_queue::QueueT;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::msg::{self, Request, MSG_SIZE, RESULT_FAILED, RESULT_OK};
use super::space::Space;
use super::sys;
use super::transport::VduseTransport;
use super::{Error, Result};
use crate::device::Device;
use crate::epoll::{self, EpollEvent};
use crate::queue::inflight::InflightRegion;
use crate::queue::Vring;
use crate::virtio::{VIRTIO_F_IN_ORDER, VIRTIO_RING_F_EVENT_IDX};
use crate::worker::{ConnShared, WorkerSet};

/// `VIRTIO_CONFIG_S_DRIVER_OK`.
const DRIVER_OK: u8 = 0x4;
/// Requests read per wake-up before the other sources get a turn.
const BATCH: usize = 64;

const TOKEN_DEV: u64 = 0;
const TOKEN_MISS: u64 = 1;
const TOKEN_STOP: u64 = 2;

/// The state of one served VDUSE device.
pub(crate) struct Control {
    dev: Arc<File>,
    device: Arc<dyn Device>,
    core: iommu_core::IommuDevice,
    space: Space,
    vrings: Vec<Arc<Mutex<Vring>>>,
    shared: Arc<ConnShared>,
    transport: Arc<VduseTransport>,
    workers: Option<WorkerSet>,
    /// The device's inflight record, kept across daemon restarts.
    inflight: Option<Arc<InflightRegion>>,
    /// The queues are set up for DRIVER_OK and the workers start once the
    /// answer is written (see [`Control::start`]).
    start_pending: bool,
    status: u8,
    max_queue_size: u16,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("status", &self.status)
            .field("regions", &self.space.len())
            .finish_non_exhaustive()
    }
}

fn new_vrings(n: usize, max: u16) -> Result<Vec<Arc<Mutex<Vring>>>> {
    (0..n)
        .map(|_| {
            Vring::new(max)
                .map(|v| Arc::new(Mutex::new(v)))
                .ok_or(Error::BadDevice(
                    "max_queue_size must be a power of two up to 32768",
                ))
        })
        .collect()
}

impl Control {
    /// The control state of the device open as `dev`, served for `device`
    /// through the iommu context's `core` (bound as `dev_id`).
    pub fn new(
        dev: Arc<File>,
        device: Arc<dyn Device>,
        iommu: &iommu_core::Iommu,
        core: iommu_core::IommuDevice,
        dev_id: iommu_core::DevId,
        inflight: Option<Arc<InflightRegion>>,
    ) -> Result<Control> {
        let max = device.max_queue_size();
        let vrings = new_vrings(device.num_queues(), max)?;
        let transport =
            Arc::new(
                VduseTransport::new(dev.clone()).map_err(|source| Error::Sys {
                    op: "eventfd",
                    source,
                })?,
            );
        let shared = Arc::new(ConnShared::new(transport.clone()));
        let space = Space::new(iommu, dev_id, shared.removals.clone())?;
        Ok(Control {
            dev,
            device,
            core,
            space,
            vrings,
            shared,
            transport,
            workers: None,
            inflight,
            start_pending: false,
            status: 0,
            max_queue_size: max,
        })
    }

    /// The device's transport (where its config changes go while this
    /// control state serves it).
    pub fn transport(&self) -> Arc<dyn crate::transport::Transport> {
        self.transport.clone()
    }

    fn lock<'a>(&self, m: &'a Mutex<Vring>) -> MutexGuard<'a, Vring> {
        self.shared.lock_vring(m)
    }

    /// Serves the device until `stop` is signalled or the device breaks
    /// (the kernel marks it broken when a request went unanswered for its
    /// `msg_timeout`).
    pub fn run(&mut self, stop: &EventFd) -> Result<()> {
        let ep = epoll::new().map_err(|source| Error::Sys {
            op: "epoll_create1",
            source,
        })?;
        let watch = |fd: std::os::fd::RawFd, token: u64| {
            epoll::ctl_raw(
                &ep,
                epoll::CtlOp::Add,
                fd,
                epoll::EpollFlags::EPOLLIN,
                token,
            )
            .map_err(|source| Error::Sys {
                op: "epoll_ctl",
                source,
            })
        };
        watch(self.dev.as_raw_fd(), TOKEN_DEV)?;
        watch(self.transport.miss_event.as_raw_fd(), TOKEN_MISS)?;
        watch(stop.as_raw_fd(), TOKEN_STOP)?;
        let mut events = [EpollEvent::empty(); 8];
        loop {
            let n = epoll::wait(&ep, &mut events, None).map_err(|source| Error::Sys {
                op: "epoll_wait",
                source,
            })?;
            for ev in events.iter().take(n) {
                match ev.data() {
                    TOKEN_STOP => return Ok(()),
                    TOKEN_MISS => self.misses(),
                    _ => {
                        if ev.events().contains(epoll::EpollFlags::EPOLLERR) {
                            return Err(Error::Broken);
                        }
                        self.requests()?;
                    }
                }
            }
        }
    }

    /// Reads and answers the requests the kernel has queued (at most
    /// [`BATCH`]).
    fn requests(&mut self) -> Result<()> {
        let mut buf = [0u8; MSG_SIZE];
        for _ in 0..BATCH {
            let n = match (&*self.dev).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Sys {
                        op: "read of a control request",
                        source,
                    })
                }
            };
            let bytes = &buf[..n];
            let Some(id) = msg::request_id(bytes) else {
                error!("VDUSE control message of {n} bytes without a request id; not answered");
                continue;
            };
            let answer = match msg::decode(bytes, self.vrings.len()) {
                Ok(req) => {
                    debug!("VDUSE request {id}: {req:?}");
                    match self.handle(req) {
                        Ok(state) => msg::response(id, RESULT_OK, state),
                        Err(e) => {
                            error!("VDUSE request {req:?} failed: {}", crate::error_chain(&e));
                            msg::response(id, RESULT_FAILED, None)
                        }
                    }
                }
                Err(e) => {
                    crate::log_limited!(log::Level::Error, "VDUSE request {id} refused: {e}");
                    msg::response(id, RESULT_FAILED, None)
                }
            };
            if let Err(e) = (&*self.dev).write_all(&answer) {
                // ENOENT: the kernel gave up waiting for it.
                warn!("VDUSE answer to request {id}: {e}");
            }
            if std::mem::take(&mut self.start_pending) {
                self.start_workers();
            }
        }
        Ok(())
    }

    fn handle(&mut self, req: Request) -> Result<Option<(u16, u16)>> {
        match req {
            Request::GetVqState { index } => {
                let avail = self.lock(&self.vrings[usize::from(index)]).q.next_avail();
                Ok(Some((index, avail)))
            }
            Request::SetStatus { status } => {
                let was = self.status;
                if status & DRIVER_OK != 0 && self.workers.is_none() && !self.start_pending {
                    self.start()?;
                } else if status & DRIVER_OK == 0 && (was & DRIVER_OK != 0 || status == 0) {
                    self.stop();
                }
                self.status = status;
                self.device.set_status(status);
                Ok(None)
            }
            Request::UpdateIotlb { start, last } => {
                self.space.invalidate(start, last)?;
                Ok(None)
            }
        }
    }

    /// DRIVER_OK: set the queues up from the kernel's state; the workers
    /// start once the answer is written ([`Control::start_workers`]). The
    /// driver may hold locks while it waits for the answer (virtio-net
    /// holds the RTNL lock, which a device's worker needs to set up a
    /// tap's offloads): nothing of the device's own runs before it.
    fn start(&mut self) -> Result<()> {
        let features = sys::get_features(&*self.dev).map_err(|source| Error::Sys {
            op: "VDUSE_DEV_GET_FEATURES",
            source,
        })?;
        self.device.set_features(features).map_err(Error::Device)?;
        self.shared.features.store(features, Ordering::SeqCst);
        // Addresses are IOVAs of the kernel's domain: misses go to it.
        self.shared.iotlb_mode.store(true, Ordering::SeqCst);
        self.shared.needs_reset.store(false, Ordering::SeqCst);
        self.space.clear()?;
        let regions = self.space.fill(&*self.dev)?;
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        let in_order = features & VIRTIO_F_IN_ORDER != 0;
        let mut started = 0;
        for (i, m) in self.vrings.iter().enumerate() {
            let index = u32::try_from(i).map_err(|_| Error::BadDevice("queue index"))?;
            let info = sys::vq_info(&*self.dev, index).map_err(|source| Error::Sys {
                op: "VDUSE_VQ_GET_INFO",
                source,
            })?;
            if info.ready == 0 {
                continue;
            }
            let num = u16::try_from(info.num)
                .ok()
                .filter(|n| *n <= self.max_queue_size)
                .ok_or(Error::Queue {
                    index,
                    what: "size above the largest the device set up",
                })?;
            let kick = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Sys {
                op: "eventfd",
                source,
            })?;
            let ours = kick.try_clone().map_err(|source| Error::Sys {
                op: "eventfd dup",
                source,
            })?;
            {
                let mut v = self.shared.lock_vring(m);
                v.q.try_set_size(num).map_err(|_| Error::Queue {
                    index,
                    what: "size",
                })?;
                v.q.try_set_desc_table_address(GuestAddress(info.desc_addr))
                    .and_then(|_| {
                        v.q.try_set_avail_ring_address(GuestAddress(info.driver_addr))
                    })
                    .and_then(|_| {
                        v.q.try_set_used_ring_address(GuestAddress(info.device_addr))
                    })
                    .map_err(|_| Error::Queue {
                        index,
                        what: "ring address",
                    })?;
                v.q.set_event_idx(event_idx);
                v.in_order = in_order;
                v.q.set_next_avail(info.state[0]);
                v.q.set_next_used(info.state[0]);
                v.q.set_ready(true);
                // With an inflight record the queue resumes where the
                // record says when the worker first serves it.
                v.inflight = self
                    .inflight
                    .as_ref()
                    .and_then(|r| r.queue(u16::try_from(i).ok()?));
                v.resubmit.clear();
                v.kick = Some(ours);
                v.kick_gen = v.kick_gen.wrapping_add(1);
                v.enabled = true;
                v.started = true;
                v.broken = false;
                v.parked = None;
            }
            sys::vq_kickfd(&*self.dev, index, kick.as_raw_fd()).map_err(|source| Error::Sys {
                op: "VDUSE_VQ_SETUP_KICKFD",
                source,
            })?;
            started += 1;
        }
        self.start_pending = true;
        info!(
            "VDUSE device starting: features {features:#x}, {started} of {} queues, {regions} regions mapped",
            self.vrings.len()
        );
        Ok(())
    }

    /// A device taken over from a daemon that exited while the driver had
    /// it running (its queues are ready): the driver sends no new
    /// `DRIVER_OK`, so the queues are set up and the workers started from
    /// the kernel's state now. With an inflight record the requests the old
    /// daemon had in flight are resubmitted and each queue resumes after
    /// them; without one a queue resumes at its used index
    /// ([`Control::resume_at_used`]).
    pub fn take_over(&mut self) -> Result<()> {
        let mut running = false;
        for i in 0..self.vrings.len() {
            let index = u32::try_from(i).map_err(|_| Error::BadDevice("queue index"))?;
            let info = sys::vq_info(&*self.dev, index).map_err(|source| Error::Sys {
                op: "VDUSE_VQ_GET_INFO",
                source,
            })?;
            running |= info.ready != 0;
        }
        if !running {
            return Ok(());
        }
        info!("VDUSE device taken over while running: resuming its queues");
        self.start()?;
        self.resume_at_used();
        self.start_pending = false;
        self.start_workers();
        self.status |= DRIVER_OK;
        Ok(())
    }

    /// The queues of a device taken over that keep no inflight record:
    /// Linux 6.12's VDUSE reports the avail index the driver started a
    /// queue at (`VDUSE_VQ_GET_INFO`; the device's progress never reaches
    /// the kernel), so each resumes at the index of its used ring, where
    /// the old daemon's completions ended. The chains it had popped and not
    /// completed are popped again (right when it completed in order, as
    /// vdpa-net does; a device that completes out of order asks for
    /// inflight tracking). A ring that cannot be read resumes at the
    /// kernel's index (logged).
    fn resume_at_used(&self) {
        if cfg!(ioasis_broken = "vduseavail") {
            // Test-only: resume at the kernel's avail index.
            return;
        }
        let mut t = self.core.translator();
        for (i, m) in self.vrings.iter().enumerate() {
            let mut v = self.shared.lock_vring(m);
            if !v.started || v.inflight.is_some() || v.packed.is_some() {
                continue;
            }
            let at = v.q.used_ring().wrapping_add(2);
            let mut idx = [0u8; 2];
            match t.read_nofault(None, at, &mut idx) {
                Ok(()) => {
                    let idx = u16::from_le_bytes(idx);
                    info!(
                        "queue {i}: resuming at its used index {idx} (the kernel's avail index: {})",
                        v.q.next_avail()
                    );
                    v.q.set_next_avail(idx);
                    v.q.set_next_used(idx);
                }
                Err(e) => warn!(
                    "queue {i}: reading its used index at {at:#x}: {e}; resuming at the kernel's avail index {}",
                    v.q.next_avail()
                ),
            }
        }
    }

    /// Starts the workers of a device whose queues [`Control::start`] set
    /// up. A failure leaves the device stopped (logged): the driver is not
    /// told (VDUSE has no way to set `NEEDS_RESET`), its requests wait.
    fn start_workers(&mut self) {
        match WorkerSet::start(&self.device, &self.vrings, &self.core, &self.shared) {
            Ok(w) => {
                self.workers = Some(w);
                info!("VDUSE device running");
            }
            Err(e) => error!(
                "VDUSE device: starting its workers failed; it serves nothing until the driver resets it: {}",
                crate::error_chain(&e)
            ),
        }
    }

    /// The driver took DRIVER_OK back (or reset the device): workers stop,
    /// queues and device reset, the IOAS emptied.
    fn stop(&mut self) {
        self.start_pending = false;
        if let Some(w) = self.workers.take() {
            w.stop();
            info!("VDUSE device stopped");
        }
        for i in 0..self.vrings.len() {
            if let Ok(index) = u32::try_from(i) {
                if let Err(e) = sys::vq_kickfd(&*self.dev, index, sys::VDUSE_EVENTFD_DEASSIGN) {
                    debug!("queue {index}: de-assigning the kick eventfd: {e}");
                }
            }
        }
        match new_vrings(self.vrings.len(), self.max_queue_size) {
            Ok(v) => self.vrings = v,
            Err(e) => error!("resetting the queues: {e}"),
        }
        self.device.reset();
        // What was in flight before a reset is not to be done again.
        if let Some(r) = &self.inflight {
            if let Err(e) = r.mem.fill(0, r.mem.len(), 0) {
                error!("clearing the inflight record: {e}");
            }
        }
        self.shared.needs_reset.store(false, Ordering::SeqCst);
        if let Err(e) = self.space.clear() {
            error!("emptying the address space: {e}");
        }
    }

    /// Maps what the workers missed and resumes the queues it covers.
    fn misses(&mut self) {
        let misses = self.transport.take_misses();
        if misses.is_empty() {
            return;
        }
        for iova in misses {
            match self.space.fault_in(&*self.dev, iova) {
                Ok(true) => {}
                Ok(false) => crate::log_limited!(log::Level::Warn,
                    "no kernel mapping at {iova:#x}: the queue that needs it waits (a driver's bad address)"
                ),
                Err(e) => crate::log_limited!(
                    log::Level::Error,
                    "mapping the kernel's region at {iova:#x}: {}",
                    crate::error_chain(&e)
                ),
            }
        }
        let mut any = false;
        for m in &self.vrings {
            let mut v = self.shared.lock_vring(m);
            if let Some(p) = v.parked {
                if self.space.covers(p.iova) {
                    v.parked = None;
                    any = true;
                }
            }
        }
        if any {
            self.shared.wake_workers();
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        if let Some(w) = self.workers.take() {
            w.stop();
        }
        self.device.reset();
    }
}
