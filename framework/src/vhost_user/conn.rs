//! One frontend connection: the backend side of the vhost-user protocol.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use iommu_core::Memory;
use log::{debug, error};
use vhost::vhost_user::message::{
    VhostUserConfig, VhostUserInflight, VhostUserLog, VhostUserProtocolFeatures,
    VhostUserVringState,
};
use virtio_queue::QueueT;
use vm_memory::{ByteValued, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::backend_req::BackendChannel;
use super::iotlb::{AddressSpace, Mode};
use super::mem::{Added, MemTable, MAX_MEM_SLOTS};
use super::msg::{
    decode, recv_message, send_reply, send_reply_fds, IotlbRequest, Limits, MsgError, Request,
    VringFdKind,
};
use super::owner::{ConnHolder, SharedRings};
use super::{Error, Result};
use crate::device::Device;
use crate::dirty_log::{DirtyLog, LoggedRegion};
use crate::ownership::{Peer, RidOwnership};
use crate::queue::inflight::InflightRegion;
use crate::queue::packed::PackedState;
use crate::queue::{queue_region_size, Vring};
use crate::virtio::{
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_IN_ORDER, VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::worker::{ConnShared, FinalPass, WorkerSet};

/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// The transport features the framework offers on top of the device's.
pub const TRANSPORT_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_F_ACCESS_PLATFORM
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_F_RING_PACKED
    | VHOST_USER_F_PROTOCOL_FEATURES;

/// `VHOST_F_LOG_ALL`: the device logs its writes into guest memory in the
/// frontend's dirty log (live migration). A transport feature: offered for
/// every device, never passed to the device.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// Virtio features offered for `device`: its own plus
/// [`TRANSPORT_FEATURES`] and `VHOST_F_LOG_ALL` (dirty logging).
pub fn offered_features(device: &dyn Device) -> u64 {
    device.features() | TRANSPORT_FEATURES | VHOST_F_LOG_ALL
}

/// Protocol features offered for `device`.
pub fn offered_protocol_features(device: &dyn Device) -> VhostUserProtocolFeatures {
    let mut p = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::STATUS
        | VhostUserProtocolFeatures::LOG_SHMFD;
    if device.config_size() > 0 {
        p |= VhostUserProtocolFeatures::CONFIG;
    }
    if device.inflight_tracking() {
        p |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    p
}

/// What a connection needs of the device it serves.
#[derive(Clone)]
pub(crate) struct Served {
    pub device: Arc<dyn Device>,
    pub core: iommu_core::IommuDevice,
    pub dev_id: iommu_core::DevId,
    pub iommu: iommu_core::Iommu,
    /// Who holds the RID (this connection or a service session).
    pub rid: Arc<RidOwnership>,
    /// Where the device's config changes go: this connection's backend
    /// channel while it lasts.
    pub config_target: Arc<crate::transport::ConfigTarget>,
}

#[derive(Clone, Copy, Debug, Default)]
struct RingAddr {
    desc: u64,
    used: u64,
    avail: u64,
}

/// State of one connection.
pub(crate) struct Connection {
    served: Served,
    sock: UnixStream,
    limits: Limits,
    owner: bool,
    features: u64,
    protocol: u64,
    status: u8,
    vrings: Vec<Arc<Mutex<Vring>>>,
    /// `vrings` as the RID arbitration sees them (to resume waiting queues).
    shared_rings: Arc<SharedRings>,
    ring_addrs: Vec<Option<RingAddr>>,
    table: MemTable,
    space: AddressSpace,
    /// The backend request channel, the workers' transport.
    backend: Arc<BackendChannel>,
    shared: Arc<ConnShared>,
    workers: Option<WorkerSet>,
    /// Queues were unparked by the request being handled: the workers are
    /// woken once its reply is sent (see [`Connection::resume_parked`]).
    wake_after_reply: bool,
    /// The inflight region the frontend gave (SET_INFLIGHT_FD) or got
    /// (GET_INFLIGHT_FD).
    inflight: Option<Arc<InflightRegion>>,
    /// An fd the next reply carries (GET_INFLIGHT_FD).
    reply_fd: Option<std::os::fd::OwnedFd>,
    /// The dirty log the frontend gave (SET_LOG_BASE); written while
    /// `VHOST_F_LOG_ALL` is negotiated.
    log_bitmap: Option<Arc<Memory>>,
    /// SET_LOG_FD's eventfd (kept; the shared log needs no signal).
    log_fd: Option<std::fs::File>,
}

/// How long a ring's stop waits for the worker's final pass over it.
const FINAL_PASS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

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

impl Connection {
    /// Sets up the connection state (allocating and attaching the IOAS).
    pub fn new(served: Served, sock: UnixStream) -> Result<Connection> {
        let n = served.device.num_queues();
        if n == 0 || n > usize::from(crate::queue::MAX_QUEUE_SIZE) {
            return Err(Error::BadDevice("num_queues must be in 1..=32768"));
        }
        let max = served.device.max_queue_size();
        let vrings = new_vrings(n, max)?;
        let backend = Arc::new(BackendChannel::default());
        let shared = Arc::new(ConnShared::new(backend.clone()));
        let transport: Arc<dyn crate::transport::Transport> = backend.clone();
        served.config_target.set(Some(&transport));
        let space = AddressSpace::new(
            &served.iommu,
            served.dev_id,
            served.rid.clone(),
            shared.removals.clone(),
            shared.removed.clone(),
        )?;
        let shared_rings = Arc::new(Mutex::new(vrings.clone()));
        // The frontend's process speaks for this connection (its sessions
        // may take the RID over).
        let peer = match Peer::of(&sock) {
            Ok(p) => Some(p),
            Err(e) => {
                crate::log_limited!(log::Level::Warn, "frontend credentials unavailable: {e}");
                None
            }
        };
        served.rid.connect_holder(
            peer,
            Arc::new(ConnHolder {
                conn: Arc::downgrade(&shared),
                rings: Arc::downgrade(&shared_rings),
            }),
        );
        Ok(Connection {
            limits: Limits {
                num_queues: n,
                max_queue_size: max,
                max_mem_slots: MAX_MEM_SLOTS,
            },
            served,
            sock,
            owner: false,
            features: 0,
            protocol: 0,
            status: 0,
            ring_addrs: vec![None; n],
            vrings,
            shared_rings,
            table: MemTable::default(),
            space,
            backend,
            shared,
            workers: None,
            wake_after_reply: false,
            inflight: None,
            reply_fd: None,
            log_bitmap: None,
            log_fd: None,
        })
    }

    /// Serves requests until the frontend disconnects (`Ok`) or sends
    /// something malformed (`Err`). Either way the device is reset afterwards.
    pub fn serve(mut self) -> Result<()> {
        let r = self.serve_loop();
        self.teardown();
        r
    }

    fn serve_loop(&mut self) -> Result<()> {
        loop {
            let (hdr, payload, fds) = match recv_message(&self.sock) {
                Ok(m) => m,
                Err(MsgError::Disconnected) => return Ok(()),
                Err(e) => return Err(Error::Msg(e)),
            };
            let req = decode(&hdr, &payload, fds, &self.limits).map_err(Error::Msg)?;
            let reply_ack = self.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
            let need_ack = hdr.need_reply() && reply_ack;
            debug!("request {:?}", req_name(&req));
            match self.handle(req) {
                Ok(Some(reply)) => match self.reply_fd.take() {
                    Some(fd) => send_reply_fds(&self.sock, hdr.request, &reply, &[fd.as_raw_fd()])
                        .map_err(Error::Msg)?,
                    None => send_reply(&self.sock, hdr.request, &reply).map_err(Error::Msg)?,
                },
                Ok(None) => {
                    if need_ack {
                        send_reply(&self.sock, hdr.request, &0u64.to_ne_bytes())
                            .map_err(Error::Msg)?;
                    }
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    crate::log_limited!(log::Level::Error, "request {} failed: {e}", hdr.request);
                    if need_ack {
                        send_reply(&self.sock, hdr.request, &1u64.to_ne_bytes())
                            .map_err(Error::Msg)?;
                    }
                }
            }
            if std::mem::take(&mut self.wake_after_reply) {
                self.wake_workers();
            }
        }
    }

    fn teardown(&mut self) {
        if let Some(w) = self.workers.take() {
            w.stop();
        }
        self.served.device.reset();
        self.served.config_target.set(None);
        self.backend.set(None);
        self.served.rid.disconnect_holder();
        // The address space detaches (unless a session owns the RID) and is
        // destroyed when dropped.
    }

    fn ensure_workers(&mut self) -> Result<()> {
        if self.workers.is_none() {
            let w = WorkerSet::start(
                &self.served.device,
                &self.vrings,
                &self.served.core,
                &self.shared,
            )
            .map_err(Error::Worker)?;
            self.workers = Some(w);
        } else if let Some(w) = &self.workers {
            w.wake();
        }
        Ok(())
    }

    fn wake_workers(&self) {
        if let Some(w) = &self.workers {
            w.wake();
        }
    }

    /// Has the worker serving queue `index` process what the ring has
    /// available before the ring stops or is disabled. A ring that is not
    /// being served (not started, disabled, parked on a translation miss,
    /// failed) or has no worker is left as it is. Waits at most
    /// [`FINAL_PASS_TIMEOUT`] and holds no vring lock meanwhile.
    fn final_pass(&self, index: u16, why: &str) {
        let Some(w) = &self.workers else { return };
        if !self.vring(index).serving() {
            return;
        }
        match w.final_pass(index, FINAL_PASS_TIMEOUT) {
            FinalPass::Done | FinalPass::NoWorker => {}
            FinalPass::TimedOut => crate::log_limited!(log::Level::Warn,
                "queue {index}: {why}: the worker did not finish processing the ring within {FINAL_PASS_TIMEOUT:?}; stopping it with buffers possibly unprocessed"
            ),
        }
    }

    /// Inflight messages need the protocol feature.
    fn require_inflight(&self) -> Result<()> {
        if self.protocol & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() == 0 {
            return Err(Error::Inflight(
                "GET/SET_INFLIGHT_FD without VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD".into(),
            ));
        }
        Ok(())
    }

    fn vring(&self, index: u16) -> MutexGuard<'_, Vring> {
        // Indices are validated against num_queues when decoding.
        self.lock(&self.vrings[usize::from(index)])
    }

    /// Locks one of this connection's rings; a worker wedged in a write to
    /// the frontend's eventfd while holding it is interrupted.
    fn lock<'a>(&self, m: &'a Mutex<Vring>) -> MutexGuard<'a, Vring> {
        self.shared.lock_vring(m)
    }

    /// Resets the device state: stops workers, forgets rings and features.
    fn reset_device(&mut self) -> Result<()> {
        if let Some(w) = self.workers.take() {
            w.stop();
        }
        self.served.device.reset();
        let n = self.vrings.len();
        self.vrings = new_vrings(n, self.limits.max_queue_size)?;
        *self.shared_rings.lock().unwrap_or_else(|e| e.into_inner()) = self.vrings.clone();
        self.ring_addrs = vec![None; n];
        self.features = 0;
        self.status = 0;
        self.shared.iotlb_mode.store(false, Ordering::SeqCst);
        self.shared.needs_reset.store(false, Ordering::SeqCst);
        self.served.rid.lock().set_holder_iovas(None);
        self.refresh_log();
        self.space.set_mode(Mode::Table, &self.table)
    }

    /// Gives every ring the dirty log to write, built from the current
    /// memory table, or none when logging is off (no log, or
    /// `VHOST_F_LOG_ALL` not negotiated). Called whenever one of the three
    /// changes.
    fn refresh_log(&self) {
        let log = match (&self.log_bitmap, self.features & VHOST_F_LOG_ALL != 0) {
            (Some(bitmap), true) => {
                let regions = self
                    .table
                    .regions()
                    .iter()
                    .map(|r| LoggedRegion {
                        mem: r.mem.clone(),
                        gpa: r.desc.gpa,
                    })
                    .collect();
                Some(Arc::new(DirtyLog::new(bitmap.clone(), regions)))
            }
            _ => None,
        };
        let mut changed = false;
        for m in &self.vrings {
            let mut v = self.lock(m);
            changed |= v.log.is_some() != log.is_some();
            v.log = log.clone();
        }
        if changed {
            log::info!("dirty logging {}", if log.is_some() { "on" } else { "off" });
        }
    }

    /// Unparks every parked queue (the address space changed); the workers
    /// are woken once the request's reply is sent. The frontend waits for
    /// that reply (an IOTLB update answering a miss: QEMU's main loop does
    /// nothing else meanwhile), and a worker woken first, on a CPU the
    /// connection thread shares, ran its pass (and sent its next miss)
    /// before the reply went out.
    fn resume_parked(&mut self, only_covered: bool) {
        let mut any = false;
        for m in &self.vrings {
            let mut v = self.lock(m);
            if let Some(p) = v.parked {
                if !only_covered || self.space.covers(p.iova) {
                    v.parked = None;
                    any = true;
                }
            }
        }
        if any {
            self.wake_after_reply = true;
        }
    }

    /// An IOTLB message while session `owner` owns the RID: the owner's IOAS
    /// is left alone and the message is refused. An invalidation still
    /// drops its range from the connection's own (detached) space, so that
    /// nothing the frontend invalidated is reachable once the RID returns.
    fn refuse_iotlb(&mut self, owner: u64, m: IotlbRequest) -> Result<Option<Vec<u8>>> {
        match m {
            IotlbRequest::BatchBegin | IotlbRequest::BatchEnd => Ok(None),
            IotlbRequest::Update { iova, size, .. } => {
                crate::log_limited!(log::Level::Warn,
                    "IOTLB update {iova:#x}+{size:#x} refused: session {owner} owns the device's RID"
                );
                Err(Error::IotlbWhileOwned { owner })
            }
            IotlbRequest::Invalidate { iova, last } => {
                crate::log_limited!(log::Level::Warn,
                    "IOTLB invalidation {iova:#x}..={last:#x} refused: session {owner} owns the device's RID \
                     (dropped from the connection's own space only)"
                );
                self.space.invalidate(iova, last)?;
                Err(Error::IotlbWhileOwned { owner })
            }
        }
    }

    fn apply_ring_addr(&self, index: u16) -> Result<()> {
        let Some(a) = self.ring_addrs[usize::from(index)] else {
            return Ok(());
        };
        let (desc, used, avail) = match self.space.mode() {
            Mode::Iotlb => (a.desc, a.used, a.avail),
            Mode::Table => {
                let t = |va: u64| {
                    self.table
                        .va_to_gpa(va)
                        .ok_or(Error::RingAddress { index, addr: va })
                };
                (t(a.desc)?, t(a.used)?, t(a.avail)?)
            }
        };
        let mut v = self.vring(index);
        v.q.try_set_desc_table_address(GuestAddress(desc))
            .and_then(|_| v.q.try_set_used_ring_address(GuestAddress(used)))
            .and_then(|_| v.q.try_set_avail_ring_address(GuestAddress(avail)))
            .map_err(|_| Error::RingAddress { index, addr: desc })
    }

    fn reapply_ring_addrs(&self) {
        for i in 0..self.vrings.len() {
            let Ok(index) = u16::try_from(i) else { break };
            if let Err(e) = self.apply_ring_addr(index) {
                debug!("ring address of queue {index} not resolvable yet: {e}");
            }
        }
    }

    fn handle(&mut self, req: Request) -> Result<Option<Vec<u8>>> {
        for d in self.table.newly_truncated() {
            error!(
                "the frontend shrank the file behind memory region gpa {:#x} size {:#x} while it was shared; the device read zeros or lost writes past its end; the device needs a reset",
                d.gpa, d.size
            );
            self.shared.needs_reset.store(true, Ordering::SeqCst);
        }
        let dev = self.served.device.clone();
        match req {
            Request::GetFeatures => Ok(Some(offered_features(&*dev).to_ne_bytes().to_vec())),
            Request::SetFeatures(f) => {
                let offered = offered_features(&*dev);
                if f & !offered != 0 {
                    return Err(Error::FeaturesNotOffered(f & !offered));
                }
                if f ^ self.features == VHOST_F_LOG_ALL {
                    // Migration starts or ends on a running device: only
                    // the log changes (the device never sees this bit).
                    self.features = f;
                    self.refresh_log();
                    return Ok(None);
                }
                let iotlb = f & VIRTIO_F_ACCESS_PLATFORM != 0;
                {
                    // Held across the device's update so that a session's
                    // ATTACH sees either the old or the new negotiation.
                    let mut st = self.served.rid.lock();
                    if let (Some(owner), false) = (st.owner, iotlb) {
                        self.shared.needs_reset.store(true, Ordering::SeqCst);
                        return Err(Error::AccessPlatformRequired { owner });
                    }
                    dev.set_features(f & !VHOST_F_LOG_ALL)
                        .map_err(Error::Device)?;
                    st.set_holder_iovas(Some(iotlb));
                }
                self.features = f;
                self.shared.features.store(f, Ordering::SeqCst);
                self.shared.iotlb_mode.store(iotlb, Ordering::SeqCst);
                let mode = if iotlb { Mode::Iotlb } else { Mode::Table };
                self.space.set_mode(mode, &self.table)?;
                let event_idx = f & VIRTIO_RING_F_EVENT_IDX != 0;
                let in_order = f & VIRTIO_F_IN_ORDER != 0;
                let packed = f & VIRTIO_F_RING_PACKED != 0;
                if packed {
                    log::info!("features {f:#x}: packed virtqueues (VIRTIO_F_RING_PACKED)");
                }
                for m in &self.vrings {
                    let mut v = self.lock(m);
                    v.q.set_event_idx(event_idx);
                    v.in_order = in_order;
                    if packed != v.packed.is_some() {
                        v.packed = packed.then(PackedState::new);
                    }
                }
                self.reapply_ring_addrs();
                self.refresh_log();
                Ok(None)
            }
            Request::SetOwner => {
                if self.owner {
                    crate::log_limited!(
                        log::Level::Warn,
                        "SET_OWNER on a connection that already has an owner"
                    );
                }
                self.owner = true;
                Ok(None)
            }
            Request::ResetOwner => {
                self.reset_device()?;
                self.owner = false;
                Ok(None)
            }
            Request::GetProtocolFeatures => Ok(Some(
                offered_protocol_features(&*dev)
                    .bits()
                    .to_ne_bytes()
                    .to_vec(),
            )),
            Request::SetProtocolFeatures(p) => {
                let offered = offered_protocol_features(&*dev).bits();
                if p & !offered != 0 {
                    return Err(Error::ProtocolFeaturesNotOffered(p & !offered));
                }
                self.protocol = p;
                self.backend
                    .set_config_negotiated(p & VhostUserProtocolFeatures::CONFIG.bits() != 0);
                Ok(None)
            }
            Request::GetQueueNum => Ok(Some((self.vrings.len() as u64).to_ne_bytes().to_vec())),
            Request::GetMaxMemSlots => Ok(Some((MAX_MEM_SLOTS as u64).to_ne_bytes().to_vec())),
            Request::SetMemTable(regions) => {
                let mut mapped = Vec::with_capacity(regions.len());
                for (d, f) in regions {
                    mapped.push(MemTable::map_region(d, f)?);
                }
                self.table.replace(mapped);
                self.refresh_log();
                self.space.table_replaced(&self.table)?;
                self.reapply_ring_addrs();
                self.resume_parked(false);
                Ok(None)
            }
            Request::AddMemReg(d, f) => {
                let r = MemTable::map_region(d, f)?;
                // The same region again (one ADD_MEM_REG per queue pair in
                // multiqueue) is counted, not mapped twice.
                if self.table.add_shared(r.clone())? == Added::Shared {
                    return Ok(None);
                }
                self.refresh_log();
                self.space.region_added(&r)?;
                self.reapply_ring_addrs();
                self.resume_parked(false);
                Ok(None)
            }
            Request::RemMemReg(d) => {
                // Unmapped with its last reference only.
                if let Some(r) = self.table.release(&d)? {
                    self.refresh_log();
                    self.space.region_removed(&r)?;
                }
                Ok(None)
            }
            Request::SetVringNum { index, num } => {
                let mut v = self.vring(index);
                if v.started {
                    return Err(Error::RingStarted { index });
                }
                v.q.try_set_size(num)
                    .map_err(|_| Error::BadRingSize { index, num })?;
                Ok(None)
            }
            Request::SetVringAddr {
                index,
                desc,
                used,
                avail,
                log,
            } => {
                debug!("queue {index}: used ring logged by the frontend at {log:x?}");
                self.ring_addrs[usize::from(index)] = Some(RingAddr { desc, used, avail });
                self.apply_ring_addr(index)?;
                Ok(None)
            }
            Request::SetVringBase { index, base } => {
                let mut v = self.vring(index);
                if v.started {
                    return Err(Error::RingStarted { index });
                }
                if let Some(p) = v.packed.as_mut() {
                    p.set_base(base);
                    return Ok(None);
                }
                let base = u16::try_from(base).map_err(|_| Error::BadRingBase { index, base })?;
                v.q.set_next_avail(base);
                v.q.set_next_used(base);
                Ok(None)
            }
            Request::GetVringBase { index } => {
                // Buffers the driver made available before stopping the ring
                // count as sent on its side: process them before the ring
                // stops, so the returned base covers them.
                self.final_pass(index, "GET_VRING_BASE");
                let base = {
                    let mut v = self.vring(index);
                    v.started = false;
                    v.kick = None;
                    v.kick_gen = v.kick_gen.wrapping_add(1);
                    v.parked = None;
                    v.q.set_ready(false);
                    match &v.packed {
                        Some(p) => p.base(),
                        None => {
                            let (avail, used) = (v.q.next_avail(), v.q.next_used());
                            if avail != used {
                                crate::log_limited!(
                                    log::Level::Warn,
                                    "queue {index}: stopped with {} chains popped and not completed",
                                    avail.wrapping_sub(used)
                                );
                            }
                            debug!("queue {index}: stopped at avail {avail}, used {used}");
                            u32::from(avail)
                        }
                    }
                };
                let any_started = self.vrings.iter().any(|m| self.lock(m).started);
                if any_started {
                    self.wake_workers();
                } else if let Some(w) = self.workers.take() {
                    w.stop();
                }
                let s = VhostUserVringState::new(u32::from(index), base);
                Ok(Some(s.as_slice().to_vec()))
            }
            Request::SetVringFd { kind, index, fd } => {
                // A peer's fd is never read or written blocking.
                if let Some(f) = &fd {
                    crate::peer_fd::set_nonblocking(f.as_fd()).map_err(|source| Error::PeerFd {
                        what: match kind {
                            VringFdKind::Kick => "vring kick",
                            VringFdKind::Call => "vring call",
                            VringFdKind::Err => "vring error",
                        },
                        source,
                    })?;
                }
                let efd = fd.map(|f| {
                    let raw = f.into_raw_fd();
                    // SAFETY: `raw` comes from a File that owned it exclusively;
                    // into_raw_fd released that ownership, so the EventFd is
                    // now its only owner and closes it exactly once.
                    unsafe { EventFd::from_raw_fd(raw) }
                });
                match kind {
                    VringFdKind::Kick => {
                        let protocol = self.features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
                        let region = self.inflight.clone().filter(|_| {
                            self.protocol & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() != 0
                        });
                        {
                            let mut v = self.vring(index);
                            // Recovered when the worker first serves it, in
                            // the region's split or packed layout.
                            let packed = v.packed.is_some();
                            v.inflight = region
                                .as_ref()
                                .filter(|_| !packed)
                                .and_then(|r| r.queue(index));
                            // (`nopackedinflight`: a test-only build that
                            // leaves packed rings untracked.)
                            v.packed_inflight = region
                                .as_ref()
                                .filter(|_| packed && !cfg!(ioasis_broken = "nopackedinflight"))
                                .and_then(|r| r.packed_queue(index));
                            v.resubmit.clear();
                            if efd.is_none() {
                                crate::log_limited!(log::Level::Warn, "queue {index}: started without a kick fd; it runs only when polled");
                            }
                            v.kick = efd;
                            v.kick_gen = v.kick_gen.wrapping_add(1);
                            v.started = true;
                            v.broken = false;
                            v.q.set_ready(true);
                            if !protocol {
                                v.enabled = true;
                            }
                        }
                        self.ensure_workers()?;
                    }
                    VringFdKind::Call => {
                        self.vring(index).signals.call = efd;
                    }
                    VringFdKind::Err => {
                        self.vring(index).signals.err = efd;
                    }
                }
                Ok(None)
            }
            Request::SetVringEnable { index, enable } => {
                if !enable {
                    // A disabled ring is not processed: finish what the
                    // driver already made available first.
                    self.final_pass(index, "SET_VRING_ENABLE 0");
                }
                self.vring(index).enabled = enable;
                self.wake_workers();
                Ok(None)
            }
            Request::SetBackendReqFd(fd) => {
                crate::peer_fd::set_nonblocking(fd.as_fd()).map_err(|source| Error::PeerFd {
                    what: "backend request channel",
                    source,
                })?;
                self.backend.set(Some(UnixStream::from(fd)));
                Ok(None)
            }
            Request::Iotlb(m) => {
                if self.space.mode() != Mode::Iotlb {
                    return Err(Error::NotIotlbMode);
                }
                debug!("IOTLB {m:?}");
                if let Some(owner) = self.served.rid.owner() {
                    return self.refuse_iotlb(owner, m);
                }
                match m {
                    IotlbRequest::Update {
                        iova,
                        size,
                        uaddr,
                        perm,
                    } => {
                        self.space.update(iova, size, uaddr, perm, &self.table)?;
                        self.resume_parked(true);
                    }
                    IotlbRequest::Invalidate { iova, last } => self.space.invalidate(iova, last)?,
                    IotlbRequest::BatchBegin | IotlbRequest::BatchEnd => {}
                }
                Ok(None)
            }
            Request::GetConfig {
                offset,
                size,
                flags,
            } => {
                let mut buf = vec![0u8; size as usize];
                let cs = dev.config_size();
                if offset < cs {
                    let n = (cs - offset).min(size) as usize;
                    if let Err(e) = dev.read_config(offset, &mut buf[..n]) {
                        crate::log_limited!(
                            log::Level::Warn,
                            "config read at {offset:#x}+{n}: {e}"
                        );
                    }
                }
                let hdr = VhostUserConfig {
                    offset,
                    size,
                    flags,
                };
                let mut out = hdr.as_slice().to_vec();
                out.extend_from_slice(&buf);
                Ok(Some(out))
            }
            Request::SetConfig {
                offset,
                flags: _,
                data,
            } => {
                let end = u64::from(offset) + data.len() as u64;
                if end > u64::from(dev.config_size()) {
                    return Err(Error::Device(crate::device::DeviceError::ConfigRange {
                        offset,
                        len: data.len(),
                    }));
                }
                dev.write_config(offset, &data).map_err(Error::Device)?;
                Ok(None)
            }
            Request::ResetDevice => {
                self.reset_device()?;
                Ok(None)
            }
            Request::SetStatus(s) => {
                self.status = s;
                dev.set_status(s);
                if s == 0 {
                    self.shared.needs_reset.store(false, Ordering::SeqCst);
                }
                Ok(None)
            }
            Request::GetStatus => {
                let mut s = self.status;
                if self.shared.needs_reset.load(Ordering::SeqCst) {
                    s |= VIRTIO_CONFIG_S_NEEDS_RESET;
                }
                Ok(Some(u64::from(s).to_ne_bytes().to_vec()))
            }
            Request::SetLogBase { size, offset, fd } => {
                if self.protocol & VhostUserProtocolFeatures::LOG_SHMFD.bits() == 0 {
                    return Err(Error::Log(
                        "SET_LOG_BASE without VHOST_USER_PROTOCOL_F_LOG_SHMFD".into(),
                    ));
                }
                // Bounded by MAX_LOG_SIZE when decoded.
                let len = usize::try_from(size)
                    .map_err(|_| Error::Log(format!("log of {size} bytes")))?;
                let bitmap = Memory::from_memfd(fd.into(), offset, len).map_err(|e| {
                    Error::Log(format!(
                        "mapping the log ({size} bytes at {offset:#x}): {e}"
                    ))
                })?;
                // A resize replaces the log: later writes go to the new one
                // (the frontend reads the old one once more before it lets
                // go of it).
                self.log_bitmap = Some(bitmap);
                self.refresh_log();
                // The frontend waits for this reply (with LOG_SHMFD): the
                // log's geometry, as rust-vmm's frontend expects (QEMU
                // reads any payload).
                Ok(Some(VhostUserLog::new(size, offset).as_slice().to_vec()))
            }
            Request::SetLogFd(fd) => {
                self.log_fd = fd;
                Ok(None)
            }
            Request::GetInflightFd {
                num_queues,
                queue_size,
            } => {
                self.require_inflight()?;
                // Room for either layout: whether the rings will be packed
                // is not known yet (QEMU asks before it sets the features).
                let size = usize::from(num_queues)
                    * queue_region_size(queue_size).max(
                        crate::queue::packed::inflight::packed_queue_region_size(queue_size),
                    );
                let mem = Memory::anonymous("vhost-user inflight", size)
                    .map_err(|e| Error::Inflight(format!("creating the region: {e}")))?;
                let fd = mem
                    .fd()
                    .ok_or_else(|| Error::Inflight("the region has no fd".into()))?
                    .try_clone_to_owned()
                    .map_err(|e| Error::Inflight(format!("dup of the region's fd: {e}")))?;
                self.inflight = Some(Arc::new(InflightRegion {
                    mem,
                    num_queues,
                    queue_size,
                }));
                self.reply_fd = Some(fd);
                let m = VhostUserInflight::new(size as u64, 0, num_queues, queue_size);
                Ok(Some(m.as_slice().to_vec()))
            }
            Request::SetInflightFd {
                mmap_size,
                mmap_offset,
                num_queues,
                queue_size,
                fd,
            } => {
                self.require_inflight()?;
                let len = usize::try_from(mmap_size)
                    .map_err(|_| Error::Inflight("region too large".into()))?;
                let mem = Memory::from_memfd(fd.into(), mmap_offset, len)
                    .map_err(|e| Error::Inflight(format!("mapping the region: {e}")))?;
                self.inflight = Some(Arc::new(InflightRegion {
                    mem,
                    num_queues,
                    queue_size,
                }));
                Ok(None)
            }
            Request::Unsupported(r) => {
                crate::log_limited!(log::Level::Info, "unsupported request {r:?}");
                Err(Error::Unsupported("request"))
            }
        }
    }
}

fn req_name(r: &Request) -> &'static str {
    match r {
        Request::GetFeatures => "GET_FEATURES",
        Request::SetFeatures(_) => "SET_FEATURES",
        Request::SetOwner => "SET_OWNER",
        Request::ResetOwner => "RESET_OWNER",
        Request::SetMemTable(_) => "SET_MEM_TABLE",
        Request::SetLogBase { .. } => "SET_LOG_BASE",
        Request::SetLogFd(_) => "SET_LOG_FD",
        Request::SetVringNum { .. } => "SET_VRING_NUM",
        Request::SetVringAddr { .. } => "SET_VRING_ADDR",
        Request::SetVringBase { .. } => "SET_VRING_BASE",
        Request::GetVringBase { .. } => "GET_VRING_BASE",
        Request::SetVringFd { .. } => "SET_VRING_KICK/CALL/ERR",
        Request::GetProtocolFeatures => "GET_PROTOCOL_FEATURES",
        Request::SetProtocolFeatures(_) => "SET_PROTOCOL_FEATURES",
        Request::GetQueueNum => "GET_QUEUE_NUM",
        Request::SetVringEnable { .. } => "SET_VRING_ENABLE",
        Request::SetBackendReqFd(_) => "SET_BACKEND_REQ_FD",
        Request::Iotlb(_) => "IOTLB_MSG",
        Request::GetConfig { .. } => "GET_CONFIG",
        Request::SetConfig { .. } => "SET_CONFIG",
        Request::ResetDevice => "RESET_DEVICE",
        Request::GetMaxMemSlots => "GET_MAX_MEM_SLOTS",
        Request::AddMemReg(..) => "ADD_MEM_REG",
        Request::RemMemReg(_) => "REM_MEM_REG",
        Request::SetStatus(_) => "SET_STATUS",
        Request::GetStatus => "GET_STATUS",
        Request::GetInflightFd { .. } => "GET_INFLIGHT_FD",
        Request::SetInflightFd { .. } => "SET_INFLIGHT_FD",
        Request::Unsupported(_) => "unsupported",
    }
}
