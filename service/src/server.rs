//! The service server: sessions over a unix socket, each owning objects in
//! the server's shared [`Iommu`].
//!
//! This file has the session loop (epoll over the listener, the sessions'
//! sockets, the fault pumps and the invalidation hub; accepting, reading,
//! replying, holding replies behind invalidations, closing and cleaning
//! up); `server/dispatch.rs` has what each request does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iommu_core::{
    FaultBudget, FaultQueue, HwInfo, HwptAlloc, HwptData, InvalidationTicket, Iommu, IovaRange,
    Memory, Perm,
};
use log::{debug, warn};
use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use thiserror::Error;

use crate::ledger::{Exceeded, Ledger, Usage};
use crate::limits::{Limits, Resource};
use crate::log_limited;
use crate::ownership::{Grantee, Grants, Peer, Refusal, RidOwnership};
use crate::proto::*;
use crate::sys::accept::AcceptBackoff;
use crate::sys::epoll::{self, Epoll, EpollEvent, EpollFlags};
use crate::sys::eventfd::{self, EventFd};
use crate::sys::ratelimit::RateLimit;
use crate::sys::socket_policy::{peer_cred, SocketPolicy};
use crate::transport::{recv_packet, send_packet};
use crate::uring::invalidate::OpId;
use crate::uring::{
    fault_channel_pair, FaultPump, FaultRecord, FaultSource, InvalidationHub, PageResponse,
    PumpError,
};
use dispatch::Fail;
use iommu_core::IommuDevice;
use std::result::Result;

mod dispatch;

static SESSION_REFUSED: RateLimit = RateLimit::peer();
/// Requests refused at a limit (one site per resource would let a client
/// that alternates flood; they share one).
static LIMIT_REFUSED: RateLimit = RateLimit::peer();

/// Most sessions served at once unless configured otherwise (the default
/// of [`Limits::sessions_total`]); further connections are refused.
pub const MAX_SESSIONS: usize = 128;
/// Most objects (IOAS, HWPT, fault queues) one session may own unless
/// configured otherwise (the default of [`Limits::objects_per_session`]).
pub const MAX_OBJECTS_PER_SESSION: usize = 1024;
/// Most memfd mappings one session may keep alive (each is an `mmap` in
/// the server, so this bounds the server's map count).
pub const MAX_MAPPINGS_PER_SESSION: usize = 4096;
/// Most PASIDs one session may reserve.
pub const MAX_PASIDS_PER_SESSION: usize = 256;
/// Most fault queues one session may own.
pub const MAX_FAULT_QUEUES_PER_SESSION: usize = 16;
/// How many candidate PASIDs `PASID_ALLOC` examines.
pub const MAX_PASID_SCAN: u32 = 1 << 16;

/// The devices a service offers to its clients, by label.
///
/// The devices must be bound to the service's [`Iommu`]. The device
/// framework's server (`ioasis::server`) implements this for its hosted devices; a
/// [`StaticDirectory`] serves tests and small programs.
pub trait Directory: Send + Sync {
    /// The device with this label, if offered.
    fn device(&self, label: &str) -> Option<IommuDevice>;
    /// Labels of every offered device.
    fn labels(&self) -> Vec<String>;
    /// For a device whose RID a transport connection (the framework's
    /// vhost-user connections) holds on its own IOAS: the arbitration through which a session's ATTACH takes the RID
    /// over (replace) and its DETACH gives it back. `None` (the default):
    /// the RID is attached and detached plainly.
    fn rid_ownership(&self, _label: &str) -> Option<Arc<RidOwnership>> {
        None
    }
}

/// A [`Directory`] holding a fixed set of devices.
#[derive(Debug, Default)]
pub struct StaticDirectory {
    devices: RwLock<BTreeMap<String, IommuDevice>>,
}

impl StaticDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Offers `device` under its label (replacing one of the same label).
    pub fn insert(&self, device: IommuDevice) {
        let mut g = self.devices.write().unwrap_or_else(|e| e.into_inner());
        g.insert(device.label().to_owned(), device);
    }

    /// Withdraws a device.
    pub fn remove(&self, label: &str) -> Option<IommuDevice> {
        let mut g = self.devices.write().unwrap_or_else(|e| e.into_inner());
        g.remove(label)
    }
}

impl Directory for StaticDirectory {
    fn device(&self, label: &str) -> Option<IommuDevice> {
        let g = self.devices.read().unwrap_or_else(|e| e.into_inner());
        g.get(label).cloned()
    }

    fn labels(&self) -> Vec<String> {
        let g = self.devices.read().unwrap_or_else(|e| e.into_inner());
        g.keys().cloned().collect()
    }
}

/// Who is on the other end of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The session id (also given to the client in the `HELLO` reply).
    pub id: u64,
    /// Peer process id (`SO_PEERCRED`).
    pub pid: i32,
    /// Peer user id.
    pub uid: u32,
    /// Peer group id.
    pub gid: u32,
}

impl SessionInfo {
    /// The peer's credentials.
    pub fn peer(&self) -> Peer {
        Peer {
            pid: self.pid,
            uid: self.uid,
            gid: self.gid,
        }
    }
}

/// Callbacks for a device server that must know which client owns which
/// PASID (an SVA accelerator taking the PASID of work from the portal's
/// owner). All are called on the service thread and must not block for
/// long; the default implementations do nothing.
pub trait ServiceObserver: Send + Sync {
    /// A session opened.
    fn session_opened(&self, _session: &SessionInfo) {}
    /// A session reserved a PASID of a device.
    fn pasid_allocated(&self, _session: &SessionInfo, _label: &str, _pasid: u32) {}
    /// A session is closing: called before its PASIDs are detached and its
    /// objects destroyed, so that a device can stop (drain) the work of
    /// those PASIDs first.
    fn session_closing(&self, _session: &SessionInfo, _pasids: &[(String, u32)]) {}
    /// A PASID reserved by a session was released (freed or the session
    /// closed), after it was detached.
    fn pasid_released(&self, _session: &SessionInfo, _label: &str, _pasid: u32) {}
}

/// Errors of the service server itself (not of requests, which are answered).
#[derive(Debug, Error)]
pub enum ServiceError {
    /// Creating or binding the listening socket failed.
    #[error("cannot listen on {path:?}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Setting up the event loop failed.
    #[error("cannot set up the service event loop")]
    EventLoop(#[source] io::Error),
    /// Waiting for events failed.
    #[error("waiting for service events failed")]
    Wait(#[source] io::Error),
}

#[derive(Default)]
struct Registry {
    sessions: HashMap<u64, SessionInfo>,
    /// (label, pasid) -> owning session.
    pasids: HashMap<(String, u32), u64>,
}

struct Shared {
    iommu: Iommu,
    dir: Arc<dyn Directory>,
    registry: Mutex<Registry>,
    observer: RwLock<Option<Arc<dyn ServiceObserver>>>,
    grants: RwLock<Grants>,
    /// What sessions hold, against the limits.
    ledger: Mutex<Ledger>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn grants(&self) -> std::sync::RwLockReadGuard<'_, Grants> {
        self.grants.read().unwrap_or_else(|e| e.into_inner())
    }

    fn grant(&self, label: &str, who: Grantee) {
        log::info!("service: device {label:?} granted to {who}");
        self.grants
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .grant(label, who);
    }

    fn observer(&self) -> Option<Arc<dyn ServiceObserver>> {
        self.observer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A cheap handle on a running service: the context, and who owns what.
#[derive(Clone)]
pub struct ServiceHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ServiceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHandle").finish_non_exhaustive()
    }
}

impl ServiceHandle {
    /// The shared context.
    pub fn iommu(&self) -> &Iommu {
        &self.shared.iommu
    }

    /// The session that reserved `pasid` of device `label`, if any.
    pub fn pasid_owner(&self, label: &str, pasid: u32) -> Option<SessionInfo> {
        let r = self.shared.registry();
        let sid = r.pasids.get(&(label.to_owned(), pasid))?;
        r.sessions.get(sid).cloned()
    }

    /// A live session by id.
    pub fn session(&self, id: u64) -> Option<SessionInfo> {
        self.shared.registry().sessions.get(&id).cloned()
    }

    /// The live sessions.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.shared.registry().sessions.values().cloned().collect()
    }

    /// The PASIDs (device label, PASID) a session has reserved.
    pub fn session_pasids(&self, id: u64) -> Vec<(String, u32)> {
        let r = self.shared.registry();
        let mut v: Vec<_> = r
            .pasids
            .iter()
            .filter(|(_, s)| **s == id)
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// Grants device `label` (`*`: every device without grants of its own)
    /// to `who` (see [`crate::ownership::Grants`]). Grants only add; a
    /// session already attached keeps its attachment.
    pub fn grant(&self, label: &str, who: Grantee) {
        self.shared.grant(label, who);
    }

    /// What user `uid`'s sessions hold now (mappings that are gone are
    /// released at the next request that needs their room).
    pub fn usage(&self, uid: u32) -> Usage {
        self.shared.ledger().uid_usage(uid)
    }

    /// What all sessions hold now.
    pub fn total_usage(&self) -> Usage {
        self.shared.ledger().total()
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        *self.shared.ledger().limits()
    }

    /// Replaces the limits; what sessions hold already stays (a lower
    /// limit refuses new charges until they are under it).
    pub fn set_limits(&self, limits: Limits) {
        self.shared.ledger().set_limits(limits);
    }

    /// Installs (or clears) the observer.
    pub fn set_observer(&self, observer: Option<Arc<dyn ServiceObserver>>) {
        *self
            .shared
            .observer
            .write()
            .unwrap_or_else(|e| e.into_inner()) = observer;
    }
}

/// A fault queue as a [`FaultSource`] for a [`FaultPump`].
#[derive(Debug)]
pub struct QueueSource {
    queue: FaultQueue,
}

impl QueueSource {
    /// Wraps the consumer side of a fault queue.
    pub fn new(queue: FaultQueue) -> Self {
        QueueSource { queue }
    }

    /// The fault queue.
    pub fn queue(&self) -> &FaultQueue {
        &self.queue
    }
}

impl FaultSource for QueueSource {
    fn ready_fd(&self) -> BorrowedFd<'_> {
        self.queue.fd()
    }

    fn read_groups(&mut self, out: &mut Vec<FaultRecord>, max: usize) -> Result<usize, i32> {
        self.queue.read_batch(out, max).map_err(|e| e.errno())
    }

    fn respond(&mut self, responses: &[PageResponse]) -> Result<(), (usize, i32)> {
        let (n, res) = self.queue.respond_batch(responses);
        res.map_err(|e| (n, e.errno()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owned {
    Ioas,
    Hwpt,
    Fault,
}

const KIND_CONTROL: u64 = 0;
const KIND_SOURCE: u64 = 1;
const KIND_CHANNEL: u64 = 2;
const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_STOP: u64 = u64::MAX - 1;
const TOKEN_ACCEPT_TIMER: u64 = u64::MAX - 2;
const TOKEN_RECHECK: u64 = u64::MAX - 4;

/// How often invalidations in flight are re-checked (for translators
/// without a link, whose end is seen only by looking).
const RECHECK_PERIOD: Duration = Duration::from_millis(1);
/// Re-checks between two nudges of the translators still waited for.
const RECHECKS_PER_NUDGE: u32 = 10;

/// A reply held back until the invalidations its request started have
/// completed (the unmap promise: once the client reads it, no device uses
/// the old translations).
struct Held {
    bytes: Vec<u8>,
    fd: Option<OwnedFd>,
    ops: HashSet<OpId>,
    since: Instant,
}

fn token(sid: u64, fault_id: u32, kind: u64) -> u64 {
    (sid << 34) | (u64::from(fault_id) << 2) | kind
}

struct Session {
    info: SessionInfo,
    sock: OwnedFd,
    /// Owned objects in creation order.
    objects: Vec<(u32, Owned)>,
    /// Attachments this session made: (label, pasid).
    attachments: Vec<(String, Option<u32>)>,
    /// PASIDs reserved: (label, pasid).
    pasids: HashSet<(String, u32)>,
    /// Fault pumps by fault queue id.
    pumps: HashMap<u32, FaultPump<QueueSource>>,
    /// Memfd mappings with the bytes charged for them (weak: areas keep
    /// them alive; a dead one is released at the next sweep).
    mappings: Vec<(Weak<Memory>, u64)>,
    /// What the session is charged for.
    usage: Usage,
    /// The budget of I/O page faults outstanding on the session's fault
    /// queues (set on each; [`Limits::faults_per_session`]).
    faults: Arc<FaultBudget>,
    /// The reply its last request waits to send; meanwhile its further
    /// requests wait in its socket (they are answered in order).
    held: Option<Held>,
}

impl Session {
    fn owns(&self, id: u32, kinds: &[Owned]) -> bool {
        self.objects
            .iter()
            .any(|(i, k)| *i == id && kinds.contains(k))
    }

    fn require(&self, id: u32, kinds: &[Owned], what: &str) -> Result<(), Fail> {
        if self.owns(id, kinds) {
            Ok(())
        } else {
            Err(Fail::new(
                libc::ENOENT,
                format!("no {what} with id {id} in this session"),
            ))
        }
    }

    /// Releases the charges of mappings that are gone.
    fn sweep(&mut self, ledger: &mut Ledger) {
        let uid = self.info.uid;
        let usage = &mut self.usage;
        self.mappings.retain(|(w, len)| {
            if w.strong_count() > 0 {
                return true;
            }
            ledger.release(uid, usage, Resource::MappedBytes, *len);
            ledger.release(uid, usage, Resource::Fds, 1);
            false
        });
    }
}

/// What an object costs its session: the object, and for a fault queue its
/// two fds (the queue's and the service's end of the channel).
fn object_cost(kind: Owned) -> [(Resource, u64); 2] {
    match kind {
        Owned::Fault => [(Resource::Objects, 1), (Resource::Fds, 2)],
        Owned::Ioas | Owned::Hwpt => [(Resource::Objects, 1), (Resource::Fds, 0)],
    }
}

/// The userspace `/dev/iommu` service: listens on a unix socket and serves
/// sessions, each owning IOAS, HWPT and fault queue objects in the shared
/// context and attaching the directory's devices.
///
/// Run it on its own thread ([`Service::spawn`]) or from another event
/// loop: poll [`Service::poll_fd`] and call [`Service::run_once`] with a
/// zero timeout when it is readable.
pub struct Service {
    shared: Arc<Shared>,
    listener: Option<OwnedFd>,
    path: Option<PathBuf>,
    epoll: Epoll,
    stop: Arc<EventFd>,
    hub: InvalidationHub,
    sessions: HashMap<u64, Session>,
    next_session: u64,
    /// Accept failures ([`crate::sys::accept`]): the listener is left out of the
    /// epoll set until `accept_timer` fires.
    accept_backoff: AcceptBackoff,
    accept_timer: TimerFd,
    /// Invalidations in flight whose session waits for them, by hub op.
    waiting: HashMap<OpId, u64>,
    /// Invalidations started by the request being executed.
    deferred: Vec<OpId>,
    /// Fires every [`RECHECK_PERIOD`] while invalidations are in flight.
    recheck_timer: TimerFd,
    recheck_armed: bool,
    rechecks: u32,
    /// Who may open a session through the listener.
    policy: SocketPolicy,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("path", &self.path)
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

/// A service running on its own thread; dropping it stops the thread.
#[derive(Debug)]
pub struct ServiceThread {
    stop: Arc<EventFd>,
    handle: ServiceHandle,
    join: Option<JoinHandle<()>>,
}

impl ServiceThread {
    /// The service's handle.
    pub fn handle(&self) -> &ServiceHandle {
        &self.handle
    }

    /// Stops the thread and waits for it; every session is closed and
    /// cleaned up.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let _ = self.stop.write(1);
        if let Some(j) = self.join.take() {
            if j.join().is_err() {
                warn!("service thread panicked");
            }
        }
    }
}

impl Drop for ServiceThread {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

impl Service {
    /// A service over `iommu` offering `dir`'s devices, without a listener
    /// (add sessions with [`Service::connect_local`]).
    pub fn new(iommu: Iommu, dir: Arc<dyn Directory>) -> Result<Self, ServiceError> {
        let epoll = epoll::new().map_err(ServiceError::EventLoop)?;
        let stop = eventfd::nonblocking().map_err(ServiceError::EventLoop)?;
        epoll
            .add(
                eventfd::borrow(&stop),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_STOP),
            )
            .map_err(|e| ServiceError::EventLoop(e.into()))?;
        let hub = InvalidationHub::new();
        let accept_timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(|e| ServiceError::EventLoop(e.into()))?;
        epoll
            .add(
                accept_timer.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_ACCEPT_TIMER),
            )
            .map_err(|e| ServiceError::EventLoop(e.into()))?;
        let recheck_timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(|e| ServiceError::EventLoop(e.into()))?;
        epoll
            .add(
                recheck_timer.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_RECHECK),
            )
            .map_err(|e| ServiceError::EventLoop(e.into()))?;
        Ok(Service {
            shared: Arc::new(Shared {
                iommu,
                dir,
                registry: Mutex::new(Registry::default()),
                observer: RwLock::new(None),
                grants: RwLock::new(Grants::default()),
                ledger: Mutex::new(Ledger::new(Limits::default())),
            }),
            listener: None,
            path: None,
            epoll,
            stop: Arc::new(stop),
            hub,
            sessions: HashMap::new(),
            next_session: 1,
            accept_backoff: AcceptBackoff::new(),
            accept_timer,
            policy: SocketPolicy::default(),
            waiting: HashMap::new(),
            deferred: Vec::new(),
            recheck_timer,
            recheck_armed: false,
            rechecks: 0,
        })
    }

    /// A service listening on a `SOCK_SEQPACKET` unix socket at `path` (an
    /// existing socket file there is replaced), with the default
    /// [`SocketPolicy`]: mode `0600`, and clients other than root and the
    /// daemon's own user refused.
    pub fn bind(
        path: impl AsRef<Path>,
        iommu: Iommu,
        dir: Arc<dyn Directory>,
    ) -> Result<Self, ServiceError> {
        Self::bind_with_policy(path, iommu, dir, SocketPolicy::default())
    }

    /// [`Service::bind`] with the socket file's mode and group from
    /// `policy`; each client's `SO_PEERCRED` is checked against it when its
    /// connection is accepted ([`SocketPolicy::admits`]).
    pub fn bind_with_policy(
        path: impl AsRef<Path>,
        iommu: Iommu,
        dir: Arc<dyn Directory>,
        policy: SocketPolicy,
    ) -> Result<Self, ServiceError> {
        let path = path.as_ref().to_path_buf();
        let lerr = |source: io::Error| ServiceError::Listen {
            path: path.clone(),
            source,
        };
        let fd = policy
            .bind(&path, SockType::SeqPacket, true)
            .map_err(lerr)?;
        let mut s = Service::new(iommu, dir)?;
        s.epoll
            .add(
                fd.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_LISTENER),
            )
            .map_err(|e| ServiceError::EventLoop(e.into()))?;
        s.listener = Some(fd);
        s.path = Some(path);
        s.policy = policy;
        Ok(s)
    }

    /// Grants device `label` (`*`: every device without grants of its own)
    /// to `who`. Until a device (or `*`) is granted, it is granted to the
    /// user the service runs as, who owns its socket.
    pub fn grant(&self, label: &str, who: Grantee) {
        self.shared.grant(label, who);
    }

    /// Replaces every grant (a daemon's `--grant DEVICE=WHO` options, parsed
    /// with [`Grants::grant_arg`]).
    pub fn set_grants(&self, grants: Grants) {
        *self
            .shared
            .grants
            .write()
            .unwrap_or_else(|e| e.into_inner()) = grants;
    }

    /// Replaces the limits (see [`Limits`]).
    pub fn set_limits(&self, limits: Limits) {
        self.shared.ledger().set_limits(limits);
    }

    /// Applies an administrator's settings (a daemon's command line).
    pub fn configure(&self, options: &super::ServiceOptions) {
        self.set_limits(options.limits);
        for label in options.grants.granted_labels() {
            log::info!(
                "service: device {label:?} granted to {}",
                options
                    .grants
                    .grantees(&label)
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        self.set_grants(options.grants.clone());
    }

    /// The handle (context and ownership queries).
    pub fn handle(&self) -> ServiceHandle {
        ServiceHandle {
            shared: self.shared.clone(),
        }
    }

    /// An fd that polls readable whenever [`Service::run_once`] has work.
    pub fn poll_fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    /// Opens a session over a socket pair and returns the client end (for
    /// in-process clients and tests).
    pub fn connect_local(&mut self) -> io::Result<OwnedFd> {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        // The peer of a socket pair is the process that made it.
        self.add_session(a, Peer::current())?;
        Ok(b)
    }

    /// Runs the service on a new thread until [`ServiceThread::stop`].
    pub fn spawn(mut self) -> io::Result<ServiceThread> {
        let stop = self.stop.clone();
        let handle = self.handle();
        let join = std::thread::Builder::new()
            .name("ioasis-service".into())
            .spawn(move || {
                if let Err(e) = self.run() {
                    warn!("service loop ended: {e}");
                }
            })?;
        Ok(ServiceThread {
            stop,
            handle,
            join: Some(join),
        })
    }

    /// Serves until the stop eventfd fires, then closes every session.
    pub fn run(&mut self) -> Result<(), ServiceError> {
        loop {
            if !self.run_once(None)? {
                break;
            }
        }
        self.shutdown();
        Ok(())
    }

    /// Closes every session (cleaning up its objects) and removes the
    /// socket file.
    pub fn shutdown(&mut self) {
        let ids: Vec<u64> = self.sessions.keys().copied().collect();
        for sid in ids {
            self.close_session(sid);
        }
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Handles whatever is ready, waiting up to `timeout` (`None`: forever)
    /// for something. Returns false once stopped.
    pub fn run_once(&mut self, timeout: Option<Duration>) -> Result<bool, ServiceError> {
        let mut events = [EpollEvent::empty(); 32];
        let n = epoll::wait(&self.epoll, &mut events, timeout).map_err(ServiceError::Wait)?;
        for ev in &events[..n] {
            let tok = ev.data();
            match tok {
                TOKEN_STOP => return Ok(false),
                TOKEN_LISTENER => self.accept_all(),
                TOKEN_ACCEPT_TIMER => self.resume_accepting(),
                TOKEN_RECHECK => self.recheck_invalidations(),
                _ => {
                    let sid = tok >> 34;
                    let fault_id = ((tok >> 2) & 0xffff_ffff) as u32;
                    match tok & 3 {
                        KIND_CONTROL => self.service_session(sid, ev.events()),
                        KIND_SOURCE | KIND_CHANNEL => self.service_pump(sid, fault_id),
                        _ => {}
                    }
                }
            }
        }
        Ok(true)
    }

    fn accept_all(&mut self) {
        let Some(l) = self.listener.take() else {
            return;
        };
        // Bounded: at most this many accepts per wakeup.
        for _ in 0..64 {
            match socket::accept4(l.as_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(fd) => {
                    self.accept_backoff.succeeded();
                    let peer = match self.admit(fd.as_fd()) {
                        Ok(p) => p,
                        Err(why) => {
                            log_limited!(
                                limit: SESSION_REFUSED,
                                log::Level::Warn,
                                "service: refusing a client: {why}"
                            );
                            continue;
                        }
                    };
                    if let Err(e) = self.add_session(fd, peer) {
                        log_limited!(limit: SESSION_REFUSED,
                            log::Level::Warn,
                            "service: cannot add session: {e}"
                        );
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(e) if crate::sys::accept::is_transient(&e.into()) => continue,
                Err(e) => {
                    let pause = self.accept_backoff.failed("service", &e.into());
                    self.pause_accepting(&l, pause);
                    break;
                }
            }
        }
        self.listener = Some(l);
    }

    /// Leaves the listener out of the epoll set for `pause`.
    fn pause_accepting(&self, l: &OwnedFd, pause: Duration) {
        let _ = self.epoll.delete(l.as_fd());
        let t = nix::sys::time::TimeSpec::from_duration(pause);
        if let Err(e) = self
            .accept_timer
            .set(Expiration::OneShot(t), TimerSetTimeFlags::empty())
        {
            // Without the timer the listener would stay unwatched: watch it
            // again now (the loop then spins at worst, as before).
            warn!("service: arming the accept back-off timer: {e}");
            let _ = self.epoll.add(
                l.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_LISTENER),
            );
        }
    }

    /// The back-off pause ended: watch the listener again and accept.
    fn resume_accepting(&mut self) {
        // Clears the expiration (non-blocking).
        let _ = self.accept_timer.wait();
        if let Some(l) = &self.listener {
            if let Err(e) = self.epoll.add(
                l.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_LISTENER),
            ) {
                warn!("service: watching the listener again: {e}");
            }
        }
        self.accept_all();
    }

    /// Checks an accepted client's credentials against the policy; returns
    /// them for its session.
    fn admit(&self, fd: BorrowedFd<'_>) -> Result<Peer, String> {
        match peer_cred(fd) {
            Ok(c) if self.policy.admits(&c) => Ok(c.peer),
            Ok(c) => Err(self.policy.refusal(&c)),
            Err(e) => Err(format!("its credentials cannot be read: {e}")),
        }
    }

    /// Opens a session for the client on `fd`, whose credentials are `peer`.
    fn add_session(&mut self, fd: OwnedFd, peer: Peer) -> io::Result<()> {
        crate::sys::peer_fd::set_nonblocking(fd.as_fd())?;
        let Peer { pid, uid, gid } = peer;
        // A session costs a session and its socket.
        let mut usage = Usage::default();
        let charged = {
            let mut l = self.shared.ledger();
            let r = l
                .charge(uid, &mut usage, Resource::Sessions, 1)
                .and_then(|()| l.charge(uid, &mut usage, Resource::Fds, 1));
            if r.is_err() {
                l.release_all(uid, &mut usage);
            }
            r
        };
        if let Err(e) = charged {
            return Err(io::Error::other(format!(
                "a session of pid {pid} uid {uid} refused: {e}"
            )));
        }
        let sid = self.next_session;
        self.next_session += 1;
        if let Err(e) = self.epoll.add(
            fd.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, token(sid, 0, KIND_CONTROL)),
        ) {
            self.shared.ledger().release_all(uid, &mut usage);
            return Err(e.into());
        }
        let info = SessionInfo {
            id: sid,
            pid,
            uid,
            gid,
        };
        let faults = FaultBudget::new(self.shared.ledger().limits().fault_budget());
        debug!("service: session {sid} opened by pid {pid}");
        self.shared.registry().sessions.insert(sid, info.clone());
        if let Some(o) = self.shared.observer() {
            o.session_opened(&info);
        }
        self.sessions.insert(
            sid,
            Session {
                info,
                sock: fd,
                objects: Vec::new(),
                attachments: Vec::new(),
                pasids: HashSet::new(),
                pumps: HashMap::new(),
                mappings: Vec::new(),
                usage,
                faults,
                held: None,
            },
        );
        Ok(())
    }

    fn service_session(&mut self, sid: u64, events: EpollFlags) {
        // Bounded: at most this many messages per wakeup, then others get
        // their turn (epoll is level-triggered).
        for _ in 0..64 {
            let Some(sess) = self.sessions.get(&sid) else {
                return;
            };
            if sess.held.is_some() {
                // Its input is not watched while a reply is held; only a
                // hang-up is reported, and then nobody waits for the reply.
                if events.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
                    self.close_session(sid);
                }
                return;
            }
            let pkt = match recv_packet(sess.sock.as_fd()) {
                Ok(Some(p)) => p,
                Ok(None) => {
                    self.close_session(sid);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    crate::log_limited!(
                        log::Level::Warn,
                        "service: session {sid}: receive failed: {e}"
                    );
                    self.close_session(sid);
                    return;
                }
            };
            if !self.handle_packet(sid, pkt) {
                self.close_session(sid);
                return;
            }
        }
    }

    /// Decodes, executes and answers one packet. False: drop the session.
    fn handle_packet(&mut self, sid: u64, pkt: super::transport::Packet) -> bool {
        let nfds = pkt.fds.len();
        let decoded = if pkt.truncated {
            Err((
                Header::decode(&pkt.data[..HEADER_SIZE.min(pkt.data.len())], nfds).ok(),
                ProtoError::TooLong {
                    len: pkt.data.len(),
                },
            ))
        } else if pkt.fds_truncated {
            Err((
                None,
                ProtoError::FdCount {
                    expected: MAX_FDS,
                    got: nfds,
                },
            ))
        } else {
            Request::decode(&pkt.data, nfds)
        };
        self.deferred.clear();
        let (opcode, request_id, result) = match decoded {
            Ok((h, req)) => {
                let r = self.execute(sid, req, pkt.fds);
                (h.opcode, h.request_id, r)
            }
            Err((h, e)) => {
                debug!("service: session {sid}: malformed message: {e}");
                // Answer with what could be read of the header.
                let (op, id) = h
                    .map(|h| (h.opcode, h.request_id))
                    .or_else(|| raw_header_ids(&pkt.data))
                    .unwrap_or((0, 0));
                (op, id, Err(Fail::from(e)))
            }
        };
        let (bytes, fd) = match result {
            Ok((body, aux, fd)) => {
                let nfds = u16::from(fd.is_some());
                (Reply::Ok { body, aux }.encode(opcode, request_id, nfds), fd)
            }
            Err(f) => (
                Reply::Err {
                    errno: f.errno,
                    aux: f.aux,
                    message: f.message,
                }
                .encode(opcode, request_id, 0),
                None,
            ),
        };
        let ops = std::mem::take(&mut self.deferred);
        if !ops.is_empty() {
            return self.hold(sid, bytes, fd, ops);
        }
        self.send_reply(sid, &bytes, fd.as_ref())
    }

    fn send_reply(&mut self, sid: u64, bytes: &[u8], fd: Option<&OwnedFd>) -> bool {
        let Some(sess) = self.sessions.get(&sid) else {
            return false;
        };
        let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|f| f.as_fd()).collect();
        match send_packet(sess.sock.as_fd(), bytes, &fds) {
            Ok(()) => true,
            Err(e) => {
                // A client that does not read its replies loses its session.
                crate::log_limited!(
                    log::Level::Warn,
                    "service: session {sid}: reply failed: {e}"
                );
                false
            }
        }
    }

    /// Holds session `sid`'s reply until the invalidations `ops` complete,
    /// and stops reading its socket meanwhile (its next requests wait
    /// there, to be answered in order). False: drop the session.
    fn hold(&mut self, sid: u64, bytes: Vec<u8>, fd: Option<OwnedFd>, ops: Vec<OpId>) -> bool {
        let Some(sess) = self.sessions.get_mut(&sid) else {
            return false;
        };
        if let Err(e) = self.epoll.modify(
            sess.sock.as_fd(),
            &mut EpollEvent::new(EpollFlags::empty(), token(sid, 0, KIND_CONTROL)),
        ) {
            warn!("service: session {sid}: pausing its input: {e}");
            return false;
        }
        for op in &ops {
            self.waiting.insert(*op, sid);
        }
        sess.held = Some(Held {
            bytes,
            fd,
            ops: ops.into_iter().collect(),
            since: Instant::now(),
        });
        true
    }

    /// The reply to the request being executed waits for `ticket` (it is
    /// delivered on the hub; the service goes on serving meanwhile).
    fn defer(&mut self, ticket: InvalidationTicket) {
        if let Some(op) = self.hub.submit(ticket) {
            self.deferred.push(op);
            self.arm_recheck();
        }
    }

    /// `ticket` completes in the background: nobody waits for a reply.
    fn start(&mut self, ticket: InvalidationTicket) {
        if self.hub.submit(ticket).is_some() {
            self.arm_recheck();
        }
    }

    fn arm_recheck(&mut self) {
        if self.recheck_armed {
            return;
        }
        let t = nix::sys::time::TimeSpec::from_duration(RECHECK_PERIOD);
        match self
            .recheck_timer
            .set(Expiration::Interval(t), TimerSetTimeFlags::empty())
        {
            Ok(()) => self.recheck_armed = true,
            // Tried again at the next invalidation; the replies held
            // meanwhile wait for it.
            Err(e) => warn!("service: arming the invalidation re-check timer: {e}"),
        }
    }

    /// On the re-check timer: re-checks the invalidations in flight (and
    /// now and then re-nudges); answers the sessions whose invalidations
    /// are done.
    fn recheck_invalidations(&mut self) {
        let _ = self.recheck_timer.wait();
        self.rechecks = self.rechecks.wrapping_add(1);
        if self.rechecks % RECHECKS_PER_NUDGE == 0 {
            self.hub.nudge_all();
        }
        for op in self.hub.poll_now() {
            if let Some(sid) = self.waiting.remove(&op) {
                self.invalidation_done(sid, op);
            }
        }
        if self.hub.in_flight() == 0 && self.recheck_armed {
            if let Err(e) = self.recheck_timer.unset() {
                warn!("service: disarming the re-check timer: {e}");
            }
            self.recheck_armed = false;
        }
    }

    /// One invalidation session `sid` waits for is done: once all are, its
    /// reply goes out and its socket is read again.
    fn invalidation_done(&mut self, sid: u64, op: OpId) {
        let Some(sess) = self.sessions.get_mut(&sid) else {
            return;
        };
        let Some(h) = &mut sess.held else {
            return;
        };
        h.ops.remove(&op);
        if !h.ops.is_empty() {
            return;
        }
        let Some(h) = sess.held.take() else {
            return;
        };
        debug!(
            "service: session {sid}: reply released after {:?}",
            h.since.elapsed()
        );
        let resumed = self.epoll.modify(
            sess.sock.as_fd(),
            &mut EpollEvent::new(EpollFlags::EPOLLIN, token(sid, 0, KIND_CONTROL)),
        );
        if let Err(e) = resumed {
            warn!("service: session {sid}: watching its input again: {e}");
            self.close_session(sid);
            return;
        }
        if !self.send_reply(sid, &h.bytes, h.fd.as_ref()) {
            self.close_session(sid);
        }
    }

    fn service_pump(&mut self, sid: u64, fault_id: u32) {
        let Some(sess) = self.sessions.get_mut(&sid) else {
            return;
        };
        let Some(pump) = sess.pumps.get_mut(&fault_id) else {
            return;
        };
        let was_blocked = pump.wants_writable();
        let res = pump.pump_in().and_then(|_| pump.pump_out());
        match res {
            Ok(_) => {
                let blocked = pump.wants_writable();
                if blocked != was_blocked {
                    let (src, chan) = pump_interest(blocked);
                    let sfd = pump.source().queue().fd();
                    let _ = self.epoll.modify(
                        sfd,
                        &mut EpollEvent::new(src, token(sid, fault_id, KIND_SOURCE)),
                    );
                    let _ = self.epoll.modify(
                        pump.socket(),
                        &mut EpollEvent::new(chan, token(sid, fault_id, KIND_CHANNEL)),
                    );
                }
            }
            Err(PumpError::Closed) => {
                debug!("service: session {sid}: fault channel {fault_id} closed by the consumer");
                self.drop_pump(sid, fault_id);
            }
            Err(e) => {
                crate::log_limited!(
                    log::Level::Warn,
                    "service: session {sid}: fault channel {fault_id}: {e}"
                );
                self.drop_pump(sid, fault_id);
            }
        }
    }

    fn drop_pump(&mut self, sid: u64, fault_id: u32) {
        let Some(sess) = self.sessions.get_mut(&sid) else {
            return;
        };
        if let Some(p) = sess.pumps.remove(&fault_id) {
            let _ = self.epoll.delete(p.source().queue().fd());
            let _ = self.epoll.delete(p.socket());
        }
    }

    fn close_session(&mut self, sid: u64) {
        let Some(mut sess) = self.sessions.remove(&sid) else {
            return;
        };
        let _ = self.epoll.delete(sess.sock.as_fd());
        // A held reply has nobody to go to; its invalidations complete in
        // the background.
        self.waiting.retain(|_, s| *s != sid);
        let mut pasids: Vec<(String, u32)> = sess.pasids.iter().cloned().collect();
        pasids.sort();
        let observer = self.shared.observer();
        if let Some(o) = &observer {
            o.session_closing(&sess.info, &pasids);
        }
        let iommu = &self.shared.iommu.clone();
        // Detach PASIDs before RIDs (a RID may need to stay PASID-capable
        // while PASIDs are attached).
        sess.attachments.sort_by_key(|(_, p)| p.is_none());
        for (label, pasid) in sess.attachments.drain(..) {
            if let Some(dev) = self.shared.dir.device(&label).and_then(|d| d.dev_id()) {
                if pasid.is_none() {
                    if let Some(rid) = self.shared.dir.rid_ownership(&label) {
                        if let Some(t) = self.give_back_rid(sid, &rid, dev, &label) {
                            self.start(t);
                        }
                        continue;
                    }
                }
                match iommu.detach_begin(dev, pasid) {
                    Ok(t) => self.start(t),
                    Err(e) => crate::log_limited!(
                        log::Level::Warn,
                        "service: session {sid}: detach {label:?}/{pasid:?}: {e}"
                    ),
                }
            }
        }
        for (_, p) in sess.pumps.drain() {
            let _ = self.epoll.delete(p.source().queue().fd());
            let _ = self.epoll.delete(p.socket());
        }
        // Destroy in reverse creation order; repeat while progress is made
        // (dependencies between objects of the session).
        let mut left: Vec<(u32, Owned)> = sess.objects.drain(..).rev().collect();
        for _ in 0..4 {
            if left.is_empty() {
                break;
            }
            left.retain(|(id, _)| match iommu.destroy(*id) {
                Ok(()) => false,
                Err(e) if e.errno() == libc::ENOENT => false,
                Err(_) => true,
            });
        }
        for (id, kind) in &left {
            crate::log_limited!(
                log::Level::Warn,
                "service: session {sid}: could not destroy {kind:?} {id}"
            );
        }
        for label in self.shared.dir.labels() {
            if let Some(rid) = self.shared.dir.rid_ownership(&label) {
                rid.forget_session(sid);
            }
        }
        // Its mappings die with its objects; everything it held is given
        // back at once.
        self.shared
            .ledger()
            .release_all(sess.info.uid, &mut sess.usage);
        {
            let mut r = self.shared.registry();
            r.sessions.remove(&sid);
            r.pasids.retain(|_, s| *s != sid);
        }
        if let Some(o) = &observer {
            for (label, pasid) in &pasids {
                o.pasid_released(&sess.info, label, *pasid);
            }
        }
        crate::log_limited!(
            log::Level::Info,
            "service: session {sid} (pid {}) closed and cleaned up",
            sess.info.pid
        );
    }

    /// The session mapped something: queues of the RIDs it owns that wait
    /// on a miss try again.
    fn resume_owned(&self, sid: u64) {
        let Some(s) = self.sessions.get(&sid) else {
            return;
        };
        for (label, pasid) in &s.attachments {
            if pasid.is_some() {
                continue;
            }
            if let Some(rid) = self.shared.dir.rid_ownership(label) {
                if rid.owner() == Some(sid) {
                    rid.resume_parked();
                }
            }
        }
    }

    /// The owning session lets go of a RID a vhost-user connection may
    /// hold: back to the connection's own IOAS (replace), or detached when
    /// no frontend is connected. A failed replace detaches and flags the
    /// device `NEEDS_RESET`: the RID never keeps the session's objects.
    fn give_back_rid(
        &self,
        sid: u64,
        rid: &RidOwnership,
        dev_id: u32,
        label: &str,
    ) -> Option<InvalidationTicket> {
        let iommu = &self.shared.iommu;
        let mut st = rid.lock();
        if st.owner != Some(sid) {
            crate::log_limited!(
                log::Level::Warn,
                "service: session {sid} releases the RID of {label:?} it does not own"
            );
            return None;
        }
        st.owner = None;
        if let Some(private) = st.private {
            match iommu.replace_begin(dev_id, None, private) {
                Ok((_, ticket)) => {
                    crate::log_limited!(log::Level::Info,
                        "service: session {sid} gave the RID of {label:?} back to its connection (IOAS {private})"
                    );
                    drop(st);
                    rid.resume_parked();
                    return Some(ticket);
                }
                Err(e) => crate::log_limited!(log::Level::Warn,
                    "service: session {sid}: RID of {label:?} cannot return to IOAS {private}: {e}; \
                     detaching it and flagging the device NEEDS_RESET"
                ),
            }
            st.flag_needs_reset();
        }
        match iommu.detach_begin(dev_id, None) {
            Ok(t) => Some(t),
            Err(e) => {
                crate::log_limited!(
                    log::Level::Warn,
                    "service: session {sid}: detach {label:?}: {e}"
                );
                None
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn pump_interest(blocked: bool) -> (EpollFlags, EpollFlags) {
    if blocked {
        // Stop listening to the (level-triggered) source until the socket
        // drains, or the loop would spin.
        (
            EpollFlags::empty(),
            EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT,
        )
    } else {
        (EpollFlags::EPOLLIN, EpollFlags::EPOLLIN)
    }
}

fn raw_header_ids(data: &[u8]) -> Option<(u16, u64)> {
    if data.len() < HEADER_SIZE {
        return None;
    }
    let mut r = Reader::new(data);
    if r.u32().ok()? != SERVICE_MAGIC {
        return None;
    }
    let _version = r.u16().ok()?;
    let opcode = r.u16().ok()?;
    let _len = r.u32().ok()?;
    let _nfds = r.u16().ok()?;
    let _flags = r.u16().ok()?;
    Some((opcode, r.u64().ok()?))
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::ownership::RidHolder;
    use crate::Client;

    /// A holder that records being flagged for a reset.
    #[derive(Default)]
    struct Flag(AtomicBool);

    impl RidHolder for Flag {
        fn needs_reset(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
        fn resume_parked(&self) {}
    }

    /// One device whose RID a (simulated) connection holds.
    struct OneRid {
        dev: IommuDevice,
        rid: Arc<RidOwnership>,
    }

    impl Directory for OneRid {
        fn device(&self, label: &str) -> Option<IommuDevice> {
            (label == self.dev.label()).then(|| self.dev.clone())
        }
        fn labels(&self) -> Vec<String> {
            vec![self.dev.label().to_owned()]
        }
        fn rid_ownership(&self, label: &str) -> Option<Arc<RidOwnership>> {
            (label == self.dev.label()).then(|| self.rid.clone())
        }
    }

    fn setup() -> (Iommu, Arc<OneRid>, u32) {
        let iommu = Iommu::new();
        let dev = IommuDevice::new("d0", HwInfo::default());
        let dev_id = iommu.bind(&dev).expect("bind");
        let dir = Arc::new(OneRid {
            dev,
            rid: Arc::new(RidOwnership::new()),
        });
        (iommu, dir, dev_id)
    }

    #[test]
    fn test_failed_give_back_detaches_and_flags_needs_reset() {
        let (iommu, dir, dev_id) = setup();
        let conn = Arc::new(Flag::default());
        // The connection's private IOAS is attached; then it becomes unusable
        // (here: an id that names no IOAS).
        let private = iommu.ioas_alloc().expect("ioas");
        iommu.attach(dev_id, None, private).expect("attach");
        dir.rid.connect_holder(Some(Peer::current()), conn.clone());
        dir.rid.lock().private = Some(u32::MAX - 7);
        let mut svc = Service::new(iommu.clone(), dir.clone()).expect("service");
        let fd = svc.connect_local().expect("session");
        let t = svc.spawn().expect("thread");
        let mut c = Client::from_fd(fd).expect("client");
        let ioas = c.ioas_alloc().expect("IOAS_ALLOC");
        c.attach("d0", None, ioas).expect("take the RID");
        assert_eq!(dir.rid.owner(), Some(c.session_id()));
        assert!(!conn.0.load(Ordering::SeqCst));
        c.detach("d0", None).expect("DETACH");
        assert_eq!(dir.rid.owner(), None);
        // Not left pointing at the session's objects: detached, and the
        // frontend learns it through NEEDS_RESET.
        assert_eq!(iommu.attached_hwpt(dev_id, None).expect("query"), None);
        assert!(conn.0.load(Ordering::SeqCst));
        t.stop();
    }

    #[test]
    fn test_closed_session_without_connection_detaches_rid() {
        let (iommu, dir, dev_id) = setup();
        let mut svc = Service::new(iommu.clone(), dir.clone()).expect("service");
        let fd = svc.connect_local().expect("session");
        let t = svc.spawn().expect("thread");
        let mut c = Client::from_fd(fd).expect("client");
        let ioas = c.ioas_alloc().expect("IOAS_ALLOC");
        c.attach("d0", None, ioas).expect("attach, no connection");
        assert!(iommu.attached_hwpt(dev_id, None).expect("q").is_some());
        drop(c);
        t.stop();
        assert_eq!(dir.rid.owner(), None);
        assert_eq!(iommu.attached_hwpt(dev_id, None).expect("q"), None);
        // The session's IOAS is gone with it.
        assert!(iommu.object_kind(ioas).is_err());
    }
}
