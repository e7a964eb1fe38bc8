//! The device: clients (PASID, portal, address space), worker threads, block
//! on fault, and what its control sockets mean (HELLO binds a client).
//!
//! Threads:
//! - workers (configurable, default cores - 1, at least 1): run one unit of
//!   work ([`WORK_UNIT`]) of one client at a time, in turns weighted by
//!   priority (see [`DeviceConfig::priority`]; work
//!   that yielded, was answered after a fault or released by a drain first,
//!   then descriptors from its portal); spin a short adaptive while when
//!   idle, then sleep on the doorbell eventfd;
//! - one control thread for every connection ([`crate::control`]: an
//!   epoll loop over the listener, connections waiting for their HELLO,
//!   with a timeout and caps, and bound clients' connections, which carry
//!   nothing more: memory is mapped and faults are delivered through the
//!   `/dev/iommu` service).
//!
//! Isolation: a descriptor's PASID is the one bound to the portal it came
//! through (its own pasid field is overwritten) and it only ever translates
//! for that PASID, through iommu-core (the framework's DMA handle). Batch
//! members inherit the batch's.

use crate::control::{self, Control};
use crate::desc::{opcode, CompletionRecord, Descriptor, OpCap, DESC_SIZE};
use crate::engine::{self, Budget, CrWriteFailed, Job, Limits, Outcome, Resume};
use crate::iommu::{DmaView, FaultBudget, FaultSlot};
use crate::proto::{self, Reader, Writer};
use crate::shm;
use crate::wq::{Event, Portal, WqMode, MAX_WQ_SIZE, MIN_WQ_SIZE};
use ioasis::dma::{Dma, FaultStatus, PendingFault, Translator};
use ioasis::service::ServiceHandle;
use ioasis::socket_policy::SocketPolicy;
use log::{debug, info};
use nix::sys::socket::{self, SockType};
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Device id carried in fault records.
pub const DEV_ID: u32 = 1;
/// Bound on connected clients.
pub const MAX_CLIENTS: usize = 256;
/// Bound on dedicated queues (one per client in dedicated mode).
pub const MAX_DEDICATED_WQS: usize = 8;
/// Shortest idle busy-poll of a worker before it sleeps.
pub const SPIN_MIN: Duration = Duration::from_micros(20);
/// Longest idle busy-poll of a worker before it sleeps.
pub const SPIN_MAX: Duration = Duration::from_millis(1);
/// Descriptors a worker takes from a portal at once.
const POP_MAX: usize = 32;

/// Errors of the device.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listening socket could not be set up.
    #[error("cannot listen on {path}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start thread {name}")]
    Thread {
        /// Thread name.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The device could not be bound to the iommu-core context.
    #[error("cannot bind device {label} to the iommu context")]
    Bind {
        /// Device label.
        label: String,
        /// Cause.
        #[source]
        source: ioasis::iommu::Error,
    },
    /// The `/dev/iommu` service could not be started.
    #[error("cannot serve /dev/iommu on {path}")]
    Service {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: ioasis::service::ServiceError,
    },
    /// An fd could not be created.
    #[error("cannot create {what}")]
    Fd {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, DeviceError>;

/// Label of the device in the daemon's own `/dev/iommu` service.
pub const DEFAULT_LABEL: &str = "sva0";

/// Hardware information the device reports to iommu-core: 20-bit PASIDs
/// and I/O page faults.
pub fn hw_info() -> ioasis::iommu::HwInfo {
    ioasis::iommu::HwInfo {
        max_pasid_log2: 20,
        iopf: true,
        ..ioasis::iommu::HwInfo::default()
    }
}

/// Creates an iommu-core context with a device `label` bound to it and
/// serves it as a `/dev/iommu` service on `path`. Start the device with the
/// returned binding ([`Device::start_with`]); keep the thread alive.
pub fn serve_iommu(
    path: &Path,
    label: &str,
) -> Result<(IommuBinding, ioasis::service::ServiceThread)> {
    serve_iommu_with_policy(path, label, SocketPolicy::default())
}

/// [`serve_iommu`] with the service socket's mode and group from `policy`
/// (clients' credentials are checked against it).
pub fn serve_iommu_with_policy(
    path: &Path,
    label: &str,
    policy: SocketPolicy,
) -> Result<(IommuBinding, ioasis::service::ServiceThread)> {
    serve_iommu_with(
        path,
        label,
        policy,
        &ioasis::service::ServiceOptions::default(),
    )
}

/// [`serve_iommu_with_policy`] with the administrator's service options
/// (grants).
pub fn serve_iommu_with(
    path: &Path,
    label: &str,
    policy: SocketPolicy,
    options: &ioasis::service::ServiceOptions,
) -> Result<(IommuBinding, ioasis::service::ServiceThread)> {
    let iommu = ioasis::iommu::Iommu::new();
    let device = ioasis::iommu::IommuDevice::new(label, hw_info());
    device.bind(&iommu).map_err(|source| DeviceError::Bind {
        label: label.to_owned(),
        source,
    })?;
    let dir = Arc::new(ioasis::service::StaticDirectory::new());
    dir.insert(device.clone());
    let svc =
        ioasis::service::Service::bind_with_policy(path, iommu, dir, policy).map_err(|source| {
            DeviceError::Service {
                path: path.to_path_buf(),
                source,
            }
        })?;
    svc.configure(options);
    let service = svc.handle();
    let thread = svc.spawn().map_err(|source| DeviceError::Thread {
        name: "ioasis-service".into(),
        source,
    })?;
    Ok((IommuBinding { device, service }, thread))
}

/// Work queue priority of a client by default.
pub const DEFAULT_PRIORITY: u8 = 8;
/// Outstanding I/O page faults per client by default (what the whole device
/// had before faults were budgeted per client).
pub const DEFAULT_FAULTS_PER_CLIENT: u32 = 32;
/// Most outstanding I/O page faults a client may be given.
pub const MAX_FAULTS_PER_CLIENT: u32 = 1024;

/// Device configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Worker threads.
    pub workers: usize,
    /// Work queue size (descriptors), a power of two.
    pub wq_size: u32,
    /// Work queue mode.
    pub wq_mode: WqMode,
    /// Maximum transfer size.
    pub max_xfer: u32,
    /// Maximum batch size.
    pub max_batch: u32,
    /// Work queue priority (1..=15) of every client whose uid
    /// `uid_priority` does not name: set by the daemon's administrator, as
    /// a DSA work queue's priority is (accel-config). A client may ask for
    /// a lower one, never a higher one.
    pub priority: u8,
    /// Work queue priority per client uid (overrides `priority`).
    pub uid_priority: Vec<(u32, u8)>,
    /// I/O page faults each client may have outstanding (raised and not
    /// yet answered and resumed); past it a descriptor that blocks on a
    /// fault completes with 0x04 at once.
    pub faults_per_client: u32,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        DeviceConfig {
            workers: cores.saturating_sub(1).max(1),
            wq_size: 128,
            wq_mode: WqMode::Shared,
            max_xfer: 1 << 31,
            max_batch: 1024,
            priority: DEFAULT_PRIORITY,
            uid_priority: Vec::new(),
            faults_per_client: DEFAULT_FAULTS_PER_CLIENT,
        }
    }
}

impl DeviceConfig {
    /// The administrator's work queue priority for clients of `uid`.
    pub fn priority_of(&self, uid: u32) -> u8 {
        self.uid_priority
            .iter()
            .rev()
            .find(|(u, _)| *u == uid)
            .map_or(self.priority, |(_, p)| *p)
    }

    /// The priority a client of `uid` that asked for `requested` gets: the
    /// administrator's for its uid, or lower if it asked for lower (0:
    /// whatever the administrator set).
    pub fn grant_priority(&self, uid: u32, requested: u32) -> u8 {
        let admin = self.priority_of(uid);
        match u8::try_from(requested) {
            Ok(r) if r != 0 => r.min(admin),
            _ => admin,
        }
    }

    fn check(&self) -> Result<()> {
        if self.workers == 0 || self.workers > 256 {
            return Err(DeviceError::Config(format!(
                "workers {} not in 1..=256",
                self.workers
            )));
        }
        if !self.wq_size.is_power_of_two() || !(MIN_WQ_SIZE..=MAX_WQ_SIZE).contains(&self.wq_size) {
            return Err(DeviceError::Config(format!(
                "wq size {} is not a power of two in {MIN_WQ_SIZE}..={MAX_WQ_SIZE}",
                self.wq_size
            )));
        }
        for p in std::iter::once(self.priority).chain(self.uid_priority.iter().map(|(_, p)| *p)) {
            if !(1..=15).contains(&p) {
                return Err(DeviceError::Config(format!("priority {p} not in 1..=15")));
            }
        }
        if !(1..=MAX_FAULTS_PER_CLIENT).contains(&self.faults_per_client) {
            return Err(DeviceError::Config(format!(
                "faults per client {} not in 1..={MAX_FAULTS_PER_CLIENT}",
                self.faults_per_client
            )));
        }
        if self.max_batch < 2 || self.max_batch > 1024 || self.max_xfer == 0 {
            return Err(DeviceError::Config("bad max batch or max transfer".into()));
        }
        Ok(())
    }
}

/// Per-client counters.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Descriptors taken from the portal.
    pub submitted: AtomicU64,
    /// Descriptors completed.
    pub completed: AtomicU64,
    /// Fault groups raised.
    pub faults_raised: AtomicU64,
    /// Fault groups answered.
    pub faults_answered: AtomicU64,
    /// Events (completion records not written).
    pub events: AtomicU64,
    /// Descriptors aborted unexecuted (queued, held or parked) because the
    /// client went away or its PASID was released.
    pub aborted: AtomicU64,
}

/// A descriptor parked on a fault: the job, the fault, and the client's
/// fault budget slot it holds until it resumes.
type Parked = (Job, PendingFault, Option<FaultSlot>);

/// One connected client.
#[derive(Debug)]
pub struct ClientCtx {
    /// PASID bound to this client's address space.
    pub pasid: u32,
    /// Work queue priority (the administrator's for its uid, or lower): its
    /// units of work per turn.
    priority: u8,
    /// Work queue slots its descriptors hold (taken from the portal, not
    /// parked, not completed).
    slots: AtomicU64,
    /// Its budget of outstanding I/O page faults.
    faults: Arc<FaultBudget>,
    portal: Portal,
    completion_efd: OwnedFd,
    /// This client's doorbell (each client its own, so that one client
    /// draining its eventfd cannot swallow another's wake-ups).
    doorbell_efd: OwnedFd,
    dead: AtomicBool,
    inflight: AtomicU64,
    held: Mutex<VecDeque<Job>>,
    has_held: AtomicBool,
    /// Jobs taken from the portal that hold a work queue slot and wait for
    /// the client's next turn: one that yielded after a unit of work (at
    /// the front), those its pass did not get to, those answered after a
    /// fault, those a drain released.
    ready: Mutex<VecDeque<(Job, Resume)>>,
    has_ready: AtomicBool,
    /// Service session that reserved the PASID.
    session: u64,
    /// The PASID was released by its session: nothing translates for it.
    unbound: AtomicBool,
    parked_iommu: Mutex<Vec<Parked>>,
    /// Counters.
    pub stats: ClientStats,
}

#[derive(Debug)]
struct Shared {
    cfg: DeviceConfig,
    limits: Limits,
    clients: RwLock<Arc<Vec<Arc<ClientCtx>>>>,
    clients_gen: AtomicU64,
    doorbell: OwnedFd,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    occupancy: AtomicU64,
    dedicated_in_use: AtomicUsize,
    iommu: Option<IommuBinding>,
    fault_answered: AtomicBool,
    /// Index (in the client list) of the client whose turn it is.
    turn: AtomicUsize,
    /// Units of work that client ran in its turn so far.
    turn_used: AtomicU32,
    /// Connected clients (for the per-client share of the work queue).
    n_clients: AtomicUsize,
}

/// The device as an iommu-core device offered by a `/dev/iommu` service:
/// clients then bring an IOAS and a PASID they set up through the service,
/// and every access is translated by iommu-core for (device, PASID).
#[derive(Clone)]
pub struct IommuBinding {
    /// The iommu-core device (bound to the service's context, PASID and
    /// IOPF capable).
    pub device: ioasis::iommu::IommuDevice,
    /// The service whose sessions own the PASIDs clients present.
    pub service: ServiceHandle,
}

impl std::fmt::Debug for IommuBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuBinding")
            .field("device", &self.device.label())
            .finish_non_exhaustive()
    }
}

/// A running device: workers plus (optionally) a listening socket.
#[derive(Debug)]
pub struct Device {
    shared: Arc<Shared>,
    control: Arc<Control>,
    threads: Vec<JoinHandle<()>>,
}

impl Device {
    /// Starts the workers of the device `iommu` binds to a `/dev/iommu`
    /// service: clients bind a PASID they attached through that service,
    /// and every access is translated by iommu-core for (device, PASID).
    /// `None` is refused: the device has no other way to translate.
    pub fn start_with(cfg: DeviceConfig, iommu: Option<IommuBinding>) -> Result<Device> {
        cfg.check()?;
        if iommu.is_none() {
            return Err(DeviceError::Config(
                "no /dev/iommu binding: every access goes through iommu-core".into(),
            ));
        }
        let doorbell = shm::eventfd().map_err(|source| DeviceError::Fd {
            what: "doorbell eventfd",
            source,
        })?;
        let limits = Limits {
            max_xfer: cfg.max_xfer,
            max_batch: cfg.max_batch,
            opcap: OpCap::supported(),
        };
        let workers = cfg.workers;
        let shared = Arc::new(Shared {
            cfg,
            limits,
            clients: RwLock::new(Arc::new(Vec::new())),
            clients_gen: AtomicU64::new(0),
            doorbell,
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            occupancy: AtomicU64::new(0),
            dedicated_in_use: AtomicUsize::new(0),
            iommu,
            fault_answered: AtomicBool::new(false),
            turn: AtomicUsize::new(0),
            turn_used: AtomicU32::new(0),
            n_clients: AtomicUsize::new(0),
        });
        if let Some(b) = shared.iommu.as_ref() {
            // Faults are budgeted per client (here); the device as a whole
            // may have every client's budget outstanding.
            b.device.set_max_outstanding_faults(
                MAX_CLIENTS.saturating_mul(shared.cfg.faults_per_client as usize),
            );
            // Learn of PASIDs their sessions give up (this replaces any
            // observer the service had).
            b.service.set_observer(Some(Arc::new(Unbinder {
                shared: Arc::downgrade(&shared),
            })));
            // An answered fault group wakes a worker to resume its job.
            let weak = Arc::downgrade(&shared);
            b.device.set_fault_waker(Some(Arc::new(move |_| {
                if let Some(s) = weak.upgrade() {
                    s.fault_answered.store(true, Ordering::SeqCst);
                    shm::signal(s.doorbell.as_fd());
                }
            })));
        }
        let mut threads = Vec::new();
        for i in 0..workers {
            let s = shared.clone();
            let name = format!("sva-worker-{i}");
            let h = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || worker(&s))
                .map_err(|source| DeviceError::Thread { name, source })?;
            threads.push(h);
        }
        info!(
            "sva-accel: {} workers, wq size {}, {:?} queue, priority {} ({} per-uid), \
             {} faults per client",
            workers,
            shared.cfg.wq_size,
            shared.cfg.wq_mode,
            shared.cfg.priority,
            shared.cfg.uid_priority.len(),
            shared.cfg.faults_per_client
        );
        // The control sockets: one thread for every connection.
        let (control, thread) =
            Control::spawn(Arc::new(Portals(shared.clone()))).map_err(|source| {
                DeviceError::Thread {
                    name: "sva-control".into(),
                    source,
                }
            })?;
        threads.push(thread);
        Ok(Device {
            shared,
            control,
            threads,
        })
    }

    /// Listens on `path` (mode `0600`: [`ioasis::socket_policy`]) and
    /// serves clients on a background thread.
    pub fn listen(&mut self, path: &Path) -> Result<()> {
        self.listen_with_policy(path, &SocketPolicy::default())
    }

    /// [`Device::listen`] with the socket file's mode and group from
    /// `policy`.
    pub fn listen_with_policy(&mut self, path: &Path, policy: &SocketPolicy) -> Result<()> {
        let fd = policy
            .bind(path, SockType::SeqPacket, false)
            .map_err(|source| DeviceError::Listen {
                path: path.to_path_buf(),
                source,
            })?;
        self.control.add_listener(fd);
        Ok(())
    }

    /// Serves one already-connected client socket (its first packet must
    /// be HELLO) on the device's control thread.
    pub fn serve_connection(&self, conn: OwnedFd) {
        self.control.add_connection(conn);
    }

    /// Number of connected clients.
    pub fn clients(&self) -> usize {
        self.shared.clients.read().map_or(0, |c| c.len())
    }

    /// Stops the workers and the acceptor (joins them).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        shm::signal(self.shared.doorbell.as_fd());
        self.control.wake();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop();
    }
}

fn reply(conn: BorrowedFd<'_>, status: i32, payload: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut msg = Writer::default().i32(status).u32(0).0;
    msg.extend_from_slice(payload);
    if let Err(e) = proto::send(conn, &msg, fds) {
        debug!("reply failed: {e}");
    }
}

fn hello(s: &Arc<Shared>, conn: BorrowedFd<'_>, h: &proto::Hello) -> Option<Arc<ClientCtx>> {
    let proto::Hello {
        priority: prio,
        session,
        pasid,
    } = *h;
    let uid = match check_pasid_owner(s, conn, session, pasid) {
        Ok(uid) => uid,
        Err(errno) => {
            reply(conn, -errno, &[], &[]);
            return None;
        }
    };
    // The administrator's priority for the uid; a client may only lower it.
    let priority = s.cfg.grant_priority(uid, prio);
    if s.clients.read().map_or(0, |c| c.len()) >= MAX_CLIENTS {
        reply(conn, -libc::EBUSY, &[], &[]);
        return None;
    }
    if s.cfg.wq_mode == WqMode::Dedicated
        && s.dedicated_in_use.fetch_add(1, Ordering::SeqCst) >= MAX_DEDICATED_WQS
    {
        s.dedicated_in_use.fetch_sub(1, Ordering::SeqCst);
        reply(conn, -libc::EBUSY, &[], &[]);
        return None;
    }
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        ioasis::log_limited!(log::Level::Warn, "client setup: {what}: {e}");
        if s.cfg.wq_mode == WqMode::Dedicated {
            s.dedicated_in_use.fetch_sub(1, Ordering::SeqCst);
        }
        reply(conn, -libc::ENOMEM, &[], &[]);
    };
    let made = (|| -> std::io::Result<_> {
        let (portal, portal_fd) = Portal::create(s.cfg.wq_size)?;
        let completion_efd = shm::eventfd()?;
        let doorbell_efd = shm::eventfd()?;
        Ok((portal, portal_fd, completion_efd, doorbell_efd))
    })();
    let (portal, portal_fd, completion_efd, doorbell_efd) = match made {
        Ok(v) => v,
        Err(e) => {
            fail("resources", &e);
            return None;
        }
    };
    let client = Arc::new(ClientCtx {
        pasid,
        priority,
        slots: AtomicU64::new(0),
        faults: FaultBudget::new(s.cfg.faults_per_client),
        portal,
        completion_efd,
        doorbell_efd,
        dead: AtomicBool::new(false),
        inflight: AtomicU64::new(0),
        held: Mutex::new(VecDeque::new()),
        has_held: AtomicBool::new(false),
        ready: Mutex::new(VecDeque::new()),
        has_ready: AtomicBool::new(false),
        session,
        unbound: AtomicBool::new(false),
        parked_iommu: Mutex::new(Vec::new()),
        stats: ClientStats::default(),
    });
    let mut w = Writer::default()
        .u32(pasid)
        .u32(s.cfg.wq_mode.to_u32())
        .u32(s.cfg.wq_size)
        .u32(s.cfg.max_batch)
        .u32(s.cfg.max_xfer)
        .u32(DEV_ID);
    for word in s.limits.opcap.0 {
        w = w.u64(word);
    }
    w = w.u32(u32::from(priority));
    // Faults travel over the fault queue the client allocated from the
    // service, not over this socket.
    let fds = [
        portal_fd.as_fd(),
        client.doorbell_efd.as_fd(),
        client.completion_efd.as_fd(),
    ];
    reply(conn, 0, &w.0, &fds);
    // Publish the client to the workers (turns go round in list order).
    if let Ok(mut list) = s.clients.write() {
        let mut v: Vec<_> = list.iter().cloned().collect();
        v.push(client.clone());
        s.n_clients.store(v.len(), Ordering::Release);
        *list = Arc::new(v);
        s.clients_gen.fetch_add(1, Ordering::Release);
    }
    // Sleeping workers re-read the list (and so wait on this client's
    // doorbell too).
    shm::signal(s.doorbell.as_fd());
    ioasis::log_limited!(
        log::Level::Info,
        "client bound to PASID {pasid} (uid {uid}, priority {priority}, session {session})"
    );
    Some(client)
}

/// Unbinds device clients whose PASID their service session gives up,
/// before (session closing) or right after (PASID freed) the detach, so that
/// no descriptor of theirs starts translating for a PASID that may be handed
/// to another session next, and aborts their outstanding work
/// ([`abort_work`]): when a closing session's PASID is detached and its
/// IOAS destroyed, nothing of that client is executing, parked or held.
struct Unbinder {
    shared: std::sync::Weak<Shared>,
}

impl Unbinder {
    fn unbind(&self, session: u64, label: &str, pasid: u32) {
        let Some(s) = self.shared.upgrade() else {
            return;
        };
        if s.iommu.as_ref().is_none_or(|b| b.device.label() != label) {
            return;
        }
        let list = match s.clients.read() {
            Ok(l) => l.clone(),
            Err(_) => return,
        };
        for c in list.iter() {
            if c.session == session && c.pasid == pasid {
                c.unbound.store(true, Ordering::SeqCst);
                let n = abort_work(&s, c);
                ioasis::log_limited!(
                    log::Level::Info,
                    "PASID {pasid}: released by session {session}; client unbound, \
                     {} descriptors aborted, {} finished executing",
                    n.aborted,
                    n.finished
                );
            }
        }
    }
}

impl ioasis::service::ServiceObserver for Unbinder {
    fn session_closing(&self, session: &ioasis::service::SessionInfo, pasids: &[(String, u32)]) {
        for (label, pasid) in pasids {
            self.unbind(session.id, label, *pasid);
        }
    }

    fn pasid_released(&self, session: &ioasis::service::SessionInfo, label: &str, pasid: u32) {
        self.unbind(session.id, label, pasid);
    }
}

/// Checks that the session presenting `pasid` reserved it from the service
/// and is the process on the other end of `conn`, and that no live client
/// has bound it already. Returns the peer's uid.
fn check_pasid_owner(
    s: &Shared,
    conn: BorrowedFd<'_>,
    session: u64,
    pasid: u32,
) -> std::result::Result<u32, i32> {
    let Some(b) = s.iommu.as_ref() else {
        return Err(libc::EOPNOTSUPP);
    };
    let Some(owner) = b.service.pasid_owner(b.device.label(), pasid) else {
        return Err(libc::EPERM);
    };
    if owner.id != session {
        return Err(libc::EPERM);
    }
    let peer = socket::getsockopt(&conn, socket::sockopt::PeerCredentials).map_err(|e| e as i32)?;
    if peer.pid() != owner.pid {
        return Err(libc::EPERM);
    }
    let taken = s
        .clients
        .read()
        .map(|l| {
            l.iter().any(|c| {
                c.pasid == pasid
                    && !c.dead.load(Ordering::SeqCst)
                    && !c.unbound.load(Ordering::SeqCst)
            })
        })
        .unwrap_or(true);
    if taken {
        return Err(libc::EBUSY);
    }
    Ok(peer.uid())
}

/// After HELLO the control socket carries no requests: memory is mapped
/// through the `/dev/iommu` service.
fn handle_request(c: &ClientCtx, conn: BorrowedFd<'_>, pkt: &proto::Packet) {
    debug!(
        "PASID {}: request {:?} refused",
        c.pasid,
        Reader::new(&pkt.data).u32()
    );
    reply(conn, -libc::EINVAL, &[], &[]);
}

/// The device's side of the control sockets ([`crate::control`]): HELLO
/// binds a client, nothing else is a request, a closed connection tears
/// its client down.
struct Portals(Arc<Shared>);

impl control::Handler for Portals {
    type Client = Arc<ClientCtx>;

    fn hello(&self, conn: BorrowedFd<'_>, pkt: &proto::Packet) -> Option<Arc<ClientCtx>> {
        match proto::Hello::decode(&pkt.data, pkt.fds.len()) {
            Ok(h) => hello(&self.0, conn, &h),
            Err(errno) => {
                reply(conn, -errno, &[], &[]);
                None
            }
        }
    }

    fn request(&self, c: &Arc<ClientCtx>, conn: BorrowedFd<'_>, pkt: nix::Result<&proto::Packet>) {
        match pkt {
            Ok(p) => handle_request(c, conn, p),
            Err(e) => reply(conn, -(e as i32), &[], &[]),
        }
    }

    fn closed(&self, c: Arc<ClientCtx>) {
        teardown(&self.0, &c);
    }

    fn stopping(&self) -> bool {
        self.0.shutdown.load(Ordering::SeqCst)
    }
}

/// Drops a client whose control connection closed: stop taking its work,
/// abort what it has outstanding, wait for what is executing. Its service
/// session closing (usually at the same time) detaches the PASID and
/// destroys its IOAS.
fn teardown(s: &Arc<Shared>, c: &Arc<ClientCtx>) {
    c.dead.store(true, Ordering::SeqCst);
    if let Ok(mut list) = s.clients.write() {
        let v: Vec<_> = list
            .iter()
            .filter(|x| !Arc::ptr_eq(x, c))
            .cloned()
            .collect();
        s.n_clients.store(v.len(), Ordering::Release);
        *list = Arc::new(v);
        s.clients_gen.fetch_add(1, Ordering::Release);
    }
    let n = abort_work(s, c);
    // Sleeping workers let go of the client (their copy of the list).
    shm::signal(s.doorbell.as_fd());
    if s.cfg.wq_mode == WqMode::Dedicated {
        s.dedicated_in_use.fetch_sub(1, Ordering::SeqCst);
    }
    ioasis::log_limited!(
        log::Level::Info,
        "PASID {}: client gone ({} descriptors, {} faults, {} aborted)",
        c.pasid,
        c.stats.completed.load(Ordering::Relaxed),
        c.stats.faults_raised.load(Ordering::Relaxed),
        n.aborted
    );
}

/// Longest [`abort_work`] waits for a client's executing descriptors.
const ABORT_WAIT: Duration = Duration::from_secs(10);

/// What [`abort_work`] did.
#[derive(Debug, Default, Clone, Copy)]
struct Aborted {
    /// Descriptors dropped unexecuted.
    aborted: u64,
    /// The client's executing descriptors all finished within the bound.
    finished: bool,
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
fn abort_work(s: &Shared, c: &ClientCtx) -> Aborted {
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

/// Reports a descriptor dropped unexecuted, when it asked for a record.
fn report_dropped(c: &ClientCtx, d: &Descriptor) {
    if d.flags & crate::desc::flags::CRAV != 0 {
        report(
            c,
            CrWriteFailed {
                cr_addr: d.completion_addr,
                status: crate::desc::status::PAGE_FAULT_NOBOF,
                code: crate::desc::status::CRA_XLAT,
            },
            d.opcode,
        );
    }
}

/// `n` descriptors of `c` take work queue slots.
fn take_slots(s: &Shared, c: &ClientCtx, n: u64) {
    s.occupancy.fetch_add(n, Ordering::AcqRel);
    c.slots.fetch_add(n, Ordering::AcqRel);
}

/// `n` descriptors of `c` give their work queue slots back.
fn give_slots(s: &Shared, c: &ClientCtx, n: u64) {
    s.occupancy.fetch_sub(n, Ordering::AcqRel);
    c.slots.fetch_sub(n, Ordering::AcqRel);
}

/// Retires `n` descriptors that hold a work queue slot.
fn retire(s: &Shared, c: &ClientCtx, n: u64) {
    if n == 0 {
        return;
    }
    give_slots(s, c, n);
    retire_released(c, n);
}

/// Retires `n` descriptors whose work queue slot was already released
/// (parked on a fault).
fn retire_released(c: &ClientCtx, n: u64) {
    if n == 0 {
        return;
    }
    c.inflight.fetch_sub(n, Ordering::AcqRel);
    c.portal.complete(n);
    c.stats.completed.fetch_add(n, Ordering::Relaxed);
}

fn report(c: &ClientCtx, e: CrWriteFailed, opcode: u8) {
    c.stats.events.fetch_add(1, Ordering::Relaxed);
    debug!(
        "PASID {}: completion record at {:#x} not written ({:#x})",
        c.pasid, e.cr_addr, e.code
    );
    c.portal.push_event(&Event {
        code: e.code,
        status: e.status,
        opcode,
        pasid: c.pasid,
        cr_addr: e.cr_addr,
    });
}

/// Runs (or resumes) one job of client `c`: to completion, a park, or (a
/// unit of work done) a yield that queues it on the client's ready queue.
fn run_job(s: &Shared, c: &ClientCtx, job: Job, resume: Resume, tr: &mut Option<Translator>) {
    run_pass(s, c, Source::One(Some(Box::new((job, resume)))), tr);
}

fn park_iommu(s: &Shared, c: &ClientCtx, job: Job, p: PendingFault, slot: Option<FaultSlot>) {
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
fn resume_answered(s: &Shared, clients: &[Arc<ClientCtx>]) -> bool {
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
fn make_ready(
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

fn write_record<M: engine::DmaMemory + ?Sized>(
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

/// Completes held descriptors once everything before the drain at their
/// head has completed.
fn check_held(s: &Shared, c: &ClientCtx, tr: &mut Option<Translator>) -> bool {
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

/// Takes one unit of work of client `c`: its ready queue (work that yielded,
/// was answered after a fault, or waited behind a drain) first, else up to
/// [`POP_MAX`] fresh descriptors from its portal. False when it had
/// nothing to run.
fn take_from(
    s: &Shared,
    c: &ClientCtx,
    buf: &mut Vec<[u8; DESC_SIZE]>,
    tr: &mut Option<Translator>,
) -> bool {
    if c.has_ready.load(Ordering::Acquire) {
        return run_pass(s, c, Source::Ready, tr);
    }
    if c.has_held.load(Ordering::Acquire) || !c.portal.has_work() {
        return false;
    }
    let room = if s.cfg.wq_mode == WqMode::Shared {
        // Free slots of the work queue, and of the client's share of it
        // (an equal share per connected client, at least one), so that no
        // client holds every slot while its work runs.
        let occ = s.occupancy.load(Ordering::Acquire);
        let cap = u64::from(s.cfg.wq_size);
        let share = (cap / s.n_clients.load(Ordering::Acquire).max(1) as u64).max(1);
        let mine = c.slots.load(Ordering::Acquire);
        if occ >= cap || mine >= share {
            return false;
        }
        (cap - occ).min(share - mine) as usize
    } else {
        POP_MAX
    };
    buf.clear();
    let Some(n) = c.portal.pop(buf, room.min(POP_MAX)) else {
        return false;
    };
    if n == 0 {
        return false;
    }
    c.inflight.fetch_add(n as u64, Ordering::AcqRel);
    take_slots(s, c, n as u64);
    c.stats.submitted.fetch_add(n as u64, Ordering::Relaxed);
    if c.dead.load(Ordering::SeqCst) {
        retire(s, c, n as u64);
        c.stats.aborted.fetch_add(n as u64, Ordering::Relaxed);
        return true;
    }
    // Everything before the first drain runs now, in one pass; the drain
    // and what follows it are held.
    let mut run = [Descriptor::new(opcode::NOOP, 0); POP_MAX];
    let mut n_run = 0;
    let mut held_from = buf.len();
    for (i, raw) in buf.iter().enumerate() {
        let mut d = Descriptor::from_bytes(raw);
        // ENQCMD semantics: the PASID is the portal owner's.
        d.pasid = c.pasid;
        if d.opcode == opcode::DRAIN {
            held_from = i;
            break;
        }
        if let Some(slot) = run.get_mut(n_run) {
            *slot = d;
            n_run += 1;
        }
    }
    if held_from < buf.len() {
        // A drain holds itself and everything after it until all that came
        // before has completed.
        if let Ok(mut held) = c.held.lock() {
            // Checked under the lock abort_work drains the held work with.
            if c.dead.load(Ordering::SeqCst) || c.unbound.load(Ordering::SeqCst) {
                let n = (buf.len() - held_from) as u64;
                for raw in &buf[held_from..] {
                    report_dropped(c, &Descriptor::from_bytes(raw));
                }
                retire(s, c, n);
                c.stats.aborted.fetch_add(n, Ordering::Relaxed);
            } else {
                for raw in &buf[held_from..] {
                    let mut d = Descriptor::from_bytes(raw);
                    d.pasid = c.pasid;
                    held.push_back(Job::new(d));
                }
                c.has_held.store(true, Ordering::Release);
            }
        }
    }
    run_pass(s, c, Source::Fresh(run[..n_run].iter()), tr);
    check_held(s, c, tr);
    true
}

/// Where a pass takes its jobs from.
enum Source<'a> {
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
fn run_pass(s: &Shared, c: &ClientCtx, mut src: Source<'_>, tr: &mut Option<Translator>) -> bool {
    let mut budget = Budget::new(WORK_UNIT);
    let mut pending = src.next(c);
    let mut did = false;
    while let Some(first) = pending.take() {
        did = true;
        let gone = c.dead.load(Ordering::SeqCst) || c.unbound.load(Ordering::SeqCst);
        let Some(t) = tr.as_mut().filter(|_| !gone) else {
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
        };
        let mut done = Retirements::default();
        let end = Dma::enter(t, Some(c.pasid), |dma| {
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
            shm::signal(c.completion_efd.as_fd());
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

/// One round of a worker: answered faults and released drains, then one
/// unit of work ([`WORK_UNIT`]) of the client whose turn it is.
///
/// Turns go round the clients in the order they connected (weighted round
/// robin, as DSA's arbiter weighs work queues by priority: a queue of
/// priority 6 gets three times the descriptors of one of priority 2): the
/// client whose turn it is runs up to `priority` units, one per call, then
/// the turn passes; a client with nothing to run (or no free work queue
/// slot) passes it at once. So between two units of a client with work,
/// every other client runs at most `priority` units.
fn work_once(
    s: &Shared,
    clients: &[Arc<ClientCtx>],
    buf: &mut Vec<[u8; DESC_SIZE]>,
    tr: &mut Option<Translator>,
) -> bool {
    let mut did = resume_answered(s, clients);
    for c in clients {
        did |= check_held(s, c, tr);
    }
    let n = clients.len();
    if n == 0 {
        return did;
    }
    let start = s.turn.load(Ordering::Relaxed) % n;
    for k in 0..n {
        let i = (start + k) % n;
        let c = &clients[i];
        if !take_from(s, c, buf, tr) {
            continue;
        }
        // Charge the unit to c's turn (c takes the turn when the clients
        // before it had nothing to run); other workers may charge the same
        // turn meanwhile, which only shortens it.
        let used = if k == 0 {
            s.turn_used.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            s.turn_used.store(1, Ordering::Relaxed);
            1
        };
        if used >= u32::from(c.priority) {
            s.turn.store(i + 1, Ordering::Relaxed);
            s.turn_used.store(0, Ordering::Relaxed);
        } else {
            s.turn.store(i, Ordering::Relaxed);
        }
        return true;
    }
    did
}

/// Longest a worker sleeps before it looks again (at the stop flag, and at
/// invalidations of what it has cached).
const SLEEP_MS: i32 = 100;

/// Drops the translator's cache if an unmap or detach invalidated it since
/// its last access section (an empty section does that). A worker's cache
/// holds references to the memory it translated; were they kept while the
/// worker idles, a departed client's memory (or a buffer a client
/// unmapped) would stay mapped in the daemon until the worker next ran.
/// Called before and after every sleep, so such memory goes within
/// [`SLEEP_MS`] of its unmap (`tests/hostile_departed.rs`).
fn drop_invalidated(tr: &mut Option<Translator>) {
    if let Some(t) = tr.as_mut() {
        drop(t.access());
    }
}

fn worker(s: &Arc<Shared>) {
    let mut buf = Vec::with_capacity(POP_MAX);
    let mut gen = u64::MAX;
    let mut clients: Arc<Vec<Arc<ClientCtx>>> = Arc::new(Vec::new());
    // Adaptive busy-poll budget: grows when work shows up while spinning,
    // shrinks when the spin ends in sleep.
    let mut spin = Duration::from_micros(100);
    let (spin_min, spin_max) = (SPIN_MIN, SPIN_MAX);
    let mut idle_since: Option<Instant> = None;
    let mut tr = s.iommu.as_ref().map(|b| b.device.translator());
    while !s.shutdown.load(Ordering::Relaxed) {
        let g = s.clients_gen.load(Ordering::Acquire);
        if g != gen {
            if let Ok(l) = s.clients.read() {
                clients = l.clone();
            }
            gen = g;
        }
        if work_once(s, &clients, &mut buf, &mut tr) {
            if idle_since.take().is_some() {
                spin = (spin * 2).min(spin_max);
            }
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < spin {
            // Pure spinning: yielding to a busy neighbour can cost a whole
            // scheduler slice.
            for _ in 0..32 {
                std::hint::spin_loop();
            }
            continue;
        }
        spin = (spin / 2).max(spin_min);
        drop_invalidated(&mut tr);
        // Sleep: ask every portal for a doorbell, re-check, then wait.
        s.sleepers.fetch_add(1, Ordering::SeqCst);
        for c in clients.iter() {
            c.portal.set_need_doorbell(true);
        }
        let pending = s.fault_answered.load(Ordering::SeqCst)
            || clients
                .iter()
                .any(|c| c.portal.has_work() || c.has_ready.load(Ordering::SeqCst));
        if !pending && s.clients_gen.load(Ordering::Acquire) == gen {
            // The internal doorbell (answers, shutdown, new clients) and
            // every client's own.
            let mut fds = Vec::with_capacity(clients.len() + 1);
            fds.push(s.doorbell.as_fd());
            fds.extend(clients.iter().map(|c| c.doorbell_efd.as_fd()));
            if let Ok(ready) = shm::poll_in(&fds, SLEEP_MS) {
                for (fd, r) in fds.iter().zip(ready) {
                    if r != 0 {
                        shm::drain(*fd);
                    }
                }
            }
            drop_invalidated(&mut tr);
        }
        if s.sleepers.fetch_sub(1, Ordering::SeqCst) == 1 {
            for c in clients.iter() {
                c.portal.set_need_doorbell(false);
            }
        }
        idle_since = None;
    }
}
