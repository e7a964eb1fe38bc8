//! The server: one backend process's event loop.
//!
//! A [`Server`] hosts any number of devices, each listening on its own unix
//! socket, all sharing one iommu-core [`Iommu`] context (so devices of one
//! process can be attached to the same IOAS). Its event loop (epoll, on the
//! thread that calls [`Server::run`]) accepts frontends; each connection is
//! served on a thread of its own, so a slow or hostile frontend cannot stall
//! another device, and each running device has its worker threads.
//!
//! Lifecycle:
//! - A frontend that disconnects or crashes leaves the device serving: its
//!   workers stop, the device is reset ([`Device::reset`]), its address space
//!   is torn down, and the next connection is accepted.
//! - A malformed message is logged and drops that connection only.
//! - [`ShutdownHandle::shutdown`], or SIGINT/SIGTERM once
//!   [`Server::handle_signals`] was called, ends the loop: connections are
//!   closed, workers joined and the socket files removed.
//!
//! Extra listeners ([`Server::add_listener`]) run in the same loop, for
//! example a `/dev/iommu` service socket that needs the shared context
//! ([`Server::iommu`]) and the hosted devices ([`Server::directory`]).
//! Devices the server does not serve itself (their own socket and
//! protocol) join the directory with [`Server::add_external_device`], so
//! one service offers every device of the process. A session of that
//! service may take over the RID of a hosted vhost-user device from its
//! connection, with its frontend's consent ([`crate::ownership`]).
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn device() -> Arc<dyn ioasis::device::Device> { unimplemented!() }
//! let mut server = ioasis::server::Server::new();
//! server.add_device("rng0", "/tmp/rng0.sock", device())?;
//! server.handle_signals()?;
//! server.run()?;
//! # Ok::<(), ioasis::server::ServerError>(())
//! ```

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iommu_core::{DevId, HwInfo, Iommu};
use log::{error, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::accept::{self, AcceptBackoff};
use crate::config_space::ConfigNotifier;
use crate::device::Device;
use crate::epoll::{self, Epoll, EpollEvent};
use crate::eventfd;
use crate::iommu::IommuDevice;
use crate::ownership::RidOwnership;
use crate::ratelimit::RateLimit;
use crate::socket_policy::SocketPolicy;
use crate::termination::Termination;
use crate::transport::ConfigTarget;
use crate::vduse;
use crate::vhost_user::conn::{Connection, Served};

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A device socket could not be created.
    #[error("Binding socket {path:?} failed")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The path exists and is not a socket; it is left alone.
    #[error("Path {0:?} exists and is not a socket")]
    NotASocket(PathBuf),
    /// A device label is used twice.
    #[error("Device label {0:?} is already in use")]
    DuplicateLabel(String),
    /// A device's description is unusable.
    #[error("Device {label:?} is invalid: {reason}")]
    InvalidDevice {
        /// The label.
        label: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Binding the device to the iommu context failed.
    #[error("Binding device {label:?} to the iommu context failed")]
    Iommu {
        /// The label.
        label: String,
        /// iommu-core's error.
        #[source]
        source: iommu_core::Error,
    },
    /// A VDUSE device could not be created or set up.
    #[error("VDUSE device {label:?}")]
    Vduse {
        /// The label.
        label: String,
        /// The transport's error.
        #[source]
        source: vduse::Error,
    },
    /// An event loop system call failed.
    #[error("Event loop {op} failed")]
    Io {
        /// The operation.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Result of server operations.
pub type Result<T> = std::result::Result<T, ServerError>;

/// A hosted device as the iommu context knows it.
#[derive(Debug, Clone)]
pub struct DirectoryEntry {
    /// The device as the iommu context knows it (bound to the server's
    /// context).
    pub device: IommuDevice,
    /// Its binding id in the context.
    pub dev_id: DevId,
    /// The socket the device listens on.
    pub socket: PathBuf,
}

/// The hosted devices by label. Cheap to clone; shared with extra listeners.
#[derive(Debug, Clone, Default)]
pub struct DeviceDirectory {
    inner: Arc<RwLock<BTreeMap<String, DirectoryEntry>>>,
    /// RID arbitration of the hosted vhost-user devices.
    rids: Arc<RwLock<BTreeMap<String, Arc<RidOwnership>>>>,
}

impl DeviceDirectory {
    /// The device with `label`.
    pub fn get(&self, label: &str) -> Option<DirectoryEntry> {
        match self.inner.read() {
            Ok(m) => m.get(label).cloned(),
            Err(p) => p.into_inner().get(label).cloned(),
        }
    }

    /// All labels, sorted.
    pub fn labels(&self) -> Vec<String> {
        match self.inner.read() {
            Ok(m) => m.keys().cloned().collect(),
            Err(p) => p.into_inner().keys().cloned().collect(),
        }
    }

    /// Who holds the RID of the vhost-user device `label` (its connection or
    /// a `/dev/iommu` session); `None` for devices added with
    /// [`Server::add_external_device`] and unknown labels.
    pub fn rid_ownership(&self, label: &str) -> Option<Arc<RidOwnership>> {
        match self.rids.read() {
            Ok(m) => m.get(label).cloned(),
            Err(p) => p.into_inner().get(label).cloned(),
        }
    }

    fn insert(&self, label: String, e: DirectoryEntry) -> bool {
        let mut m = match self.inner.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if m.contains_key(&label) {
            return false;
        }
        m.insert(label, e);
        true
    }
}

/// The hosted devices are offered by a `/dev/iommu` service as they are:
/// `Service::new(server.iommu().clone(), Arc::new(server.directory()))`.
impl crate::service::Directory for DeviceDirectory {
    fn device(&self, label: &str) -> Option<IommuDevice> {
        self.get(label).map(|e| e.device)
    }

    fn labels(&self) -> Vec<String> {
        DeviceDirectory::labels(self)
    }

    fn rid_ownership(&self, label: &str) -> Option<Arc<RidOwnership>> {
        DeviceDirectory::rid_ownership(self, label)
    }
}
/// Stops a running [`Server`] from any thread.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    event: Arc<EventFd>,
}

impl ShutdownHandle {
    /// Asks the server to shut down; [`Server::run`] returns once it has.
    pub fn shutdown(&self) {
        if let Err(e) = self.event.write(1) {
            error!("signalling shutdown: {e}");
        }
    }
}

/// What an extra listener does with an accepted connection.
pub type AcceptHandler = Box<dyn FnMut(UnixStream) + Send>;

struct Extra {
    listener: UnixListener,
    path: Option<PathBuf>,
    on_accept: AcceptHandler,
    backoff: AcceptBackoff,
    /// Not watched until then (accept failed: [`crate::accept`]).
    paused: Option<Instant>,
}

struct Active {
    stream: UnixStream,
    handle: JoinHandle<()>,
    /// Set by the connection thread when it is done (before it signals the
    /// loop), so the loop never waits on a thread that is still exiting.
    done: Arc<std::sync::atomic::AtomicBool>,
}

struct Hosted {
    label: String,
    path: PathBuf,
    listener: UnixListener,
    served: Served,
    active: Option<Active>,
    /// A frontend that connected while the previous connection was still
    /// being torn down; served as soon as that finishes.
    pending: Option<UnixStream>,
    backoff: AcceptBackoff,
    /// Not watched until then (accept failed: [`crate::accept`]).
    paused: Option<Instant>,
}

/// A device served over VDUSE: its kernel device and control state until
/// [`Server::run`] hands them to the device's control thread.
struct VduseHosted {
    label: String,
    parts: Option<(vduse::KernelDevice, vduse::Control)>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for VduseHosted {
    /// A device whose server never ran is destroyed here (once its control
    /// state, which holds the device's fd, is gone).
    fn drop(&mut self) {
        if let Some((kernel, control)) = self.parts.take() {
            drop(control);
            kernel.destroy();
        }
    }
}

/// One backend process's device server.
pub struct Server {
    iommu: Iommu,
    hosted: Vec<Hosted>,
    vduse: Vec<VduseHosted>,
    extra: Vec<Extra>,
    directory: DeviceDirectory,
    stop: Arc<EventFd>,
    reaped: Arc<EventFd>,
    /// Mode and group of the device sockets bound from now on.
    policy: SocketPolicy,
    /// SIGINT/SIGTERM, once [`Server::handle_signals`] was called.
    signals: Option<Termination>,
    /// The served devices (vhost-user and VDUSE) by label, with where
    /// their config changes go ([`Server::config_notifier`]).
    notifiers: BTreeMap<String, ConfigNotifier>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("devices", &self.directory.labels())
            .field("extra_listeners", &self.extra.len())
            .finish_non_exhaustive()
    }
}

const TOKEN_STOP: u64 = 0;
const TOKEN_REAP: u64 = 1;
const TOKEN_DEVICE: u64 = 1 << 32;
const TOKEN_EXTRA: u64 = 2 << 32;

fn eventfd(op: &'static str) -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| ServerError::Io { op, source })
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    /// A server with a fresh iommu context.
    pub fn new() -> Server {
        Self::with_iommu(Iommu::new())
    }

    /// A server using an existing iommu context.
    ///
    /// # Panics
    /// Only if the process cannot create two eventfds at start-up.
    pub fn with_iommu(iommu: Iommu) -> Server {
        let (stop, reaped) = match (eventfd("eventfd"), eventfd("eventfd")) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => panic!("cannot create the server's eventfds: {e}"),
        };
        Server {
            iommu,
            hosted: Vec::new(),
            vduse: Vec::new(),
            extra: Vec::new(),
            directory: DeviceDirectory::default(),
            stop: Arc::new(stop),
            reaped: Arc::new(reaped),
            policy: SocketPolicy::default(),
            signals: None,
            notifiers: BTreeMap::new(),
        }
    }

    /// The shared iommu context.
    pub fn iommu(&self) -> &Iommu {
        &self.iommu
    }

    /// The hosted devices by label.
    pub fn directory(&self) -> DeviceDirectory {
        self.directory.clone()
    }

    /// A handle that stops [`run`](Server::run) from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            event: self.stop.clone(),
        }
    }

    /// Sets the mode and group of the device sockets that
    /// [`add_device`](Server::add_device) binds from now on (default: mode
    /// `0600`, the process's group; see [`crate::socket_policy`]).
    pub fn set_socket_policy(&mut self, policy: SocketPolicy) {
        self.policy = policy;
    }

    /// Hosts `device` as `label`, listening on the unix socket `path` (a stale
    /// socket file there is replaced; the file's mode and group follow
    /// [`set_socket_policy`](Server::set_socket_policy)). The device is bound to the shared
    /// iommu context right away; its address space is created per connection.
    pub fn add_device(
        &mut self,
        label: &str,
        path: impl AsRef<Path>,
        device: Arc<dyn Device>,
    ) -> Result<()> {
        self.add_device_with_info(label, path, device, HwInfo::default())
    }

    /// [`add_device`](Server::add_device) with the hardware information the
    /// device reports to the iommu context (PASID width, page sizes,
    /// reserved IOVA ranges, ...), for devices that other processes attach
    /// through the `/dev/iommu` service.
    pub fn add_device_with_info(
        &mut self,
        label: &str,
        path: impl AsRef<Path>,
        device: Arc<dyn Device>,
        info: HwInfo,
    ) -> Result<()> {
        let path = path.as_ref().to_path_buf();
        device.set_transport(crate::device::TransportKind::VhostUser);
        check_device(label, &*device)?;
        if self.directory.get(label).is_some() {
            return Err(ServerError::DuplicateLabel(label.to_string()));
        }
        let listener = bind_socket(&path, &self.policy)?;
        let core = iommu_core::IommuDevice::new(label, info);
        let dev_id = match self.iommu.bind(&core) {
            Ok(id) => id,
            Err(source) => {
                let _ = std::fs::remove_file(&path);
                return Err(ServerError::Iommu {
                    label: label.to_string(),
                    source,
                });
            }
        };
        self.directory.insert(
            label.to_string(),
            DirectoryEntry {
                device: core.clone(),
                dev_id,
                socket: path.clone(),
            },
        );
        let rid = Arc::new(RidOwnership::new());
        let config_target = Arc::new(ConfigTarget::default());
        self.notifiers.insert(
            label.to_string(),
            ConfigNotifier::new(device.clone(), config_target.clone()),
        );
        match self.directory.rids.write() {
            Ok(mut m) => m.insert(label.to_string(), rid.clone()),
            Err(p) => p.into_inner().insert(label.to_string(), rid.clone()),
        };
        self.hosted.push(Hosted {
            label: label.to_string(),
            path,
            listener,
            served: Served {
                device,
                core,
                dev_id,
                iommu: self.iommu.clone(),
                rid,
                config_target,
            },
            active: None,
            pending: None,
            backoff: AcceptBackoff::new(),
            paused: None,
        });
        Ok(())
    }

    /// Serves `device` as `label` over VDUSE: creates the kernel's VDUSE
    /// device `name` (`/dev/vduse/NAME`; or takes over an existing one of
    /// that name, see [`crate::vduse`]) with the device's type, features,
    /// queues and config space, sets up its queues, and serves it from
    /// [`run`](Server::run) on a thread of its own. The device is then
    /// ready for `vdpa dev add name NAME mgmtdev vduse`. It is destroyed
    /// when the server shuts down, unless it is still on the vDPA bus.
    /// Needs the `vduse` module, and `CAP_NET_ADMIN` for a net device.
    pub fn add_vduse_device(
        &mut self,
        label: &str,
        name: &str,
        device: Arc<dyn Device>,
    ) -> Result<()> {
        device.set_transport(crate::device::TransportKind::Vduse);
        check_device(label, &*device)?;
        if self.directory.get(label).is_some() {
            return Err(ServerError::DuplicateLabel(label.to_string()));
        }
        let err = |source| ServerError::Vduse {
            label: label.to_string(),
            source,
        };
        let kernel = vduse::KernelDevice::create(name, &*device).map_err(err)?;
        let core = iommu_core::IommuDevice::new(label, HwInfo::default());
        let dev_id = self
            .iommu
            .bind(&core)
            .map_err(|source| ServerError::Iommu {
                label: label.to_string(),
                source,
            })?;
        let fd = kernel.fd.try_clone().map_err(|source| {
            err(vduse::Error::Sys {
                op: "dup of the device fd",
                source,
            })
        })?;
        let mut control = vduse::Control::new(
            Arc::new(fd),
            device.clone(),
            &self.iommu,
            core.clone(),
            dev_id,
            kernel.inflight.clone(),
        )
        .map_err(err)?;
        if kernel.existed {
            control.take_over().map_err(err)?;
        }
        let config_target = Arc::new(ConfigTarget::default());
        config_target.set(Some(&control.transport()));
        let notifier = ConfigNotifier::new(device, config_target);
        if kernel.existed {
            // The kernel kept the old daemon's config space: this one's
            // may differ (a disk resized meanwhile).
            match notifier.notify() {
                Ok(c) => info!(
                    "VDUSE device {name:?} taken over: config space given to the kernel ({c:?})"
                ),
                Err(e) => warn!(
                    "VDUSE device {name:?} taken over: giving the kernel the config space: {e}"
                ),
            }
        }
        self.notifiers.insert(label.to_string(), notifier);
        self.directory.insert(
            label.to_string(),
            DirectoryEntry {
                device: core,
                dev_id,
                socket: vduse::dev_path(name),
            },
        );
        self.vduse.push(VduseHosted {
            label: label.to_string(),
            parts: Some((kernel, control)),
            stop: Arc::new(eventfd("eventfd")?),
            thread: None,
        });
        Ok(())
    }

    /// What tells the driver of the device `label` (added with
    /// [`add_device`](Server::add_device) or
    /// [`add_vduse_device`](Server::add_vduse_device)) that its config space
    /// changed: the device updates the space, then calls
    /// [`ConfigNotifier::notify`] (from any thread, also once the server
    /// runs). `None` for an unknown label.
    pub fn config_notifier(&self, label: &str) -> Option<ConfigNotifier> {
        self.notifiers.get(label).cloned()
    }

    /// Adds a device the server does not serve itself (one with its own
    /// socket and protocol, such as an SVA accelerator) to the directory,
    /// so that one `/dev/iommu` service offers every device of the process.
    /// The device is bound to the shared iommu context; the returned
    /// handle is what the device's own code translates through
    /// ([`IommuDevice::translator`]).
    /// `socket` is recorded in the directory entry (the server does not
    /// listen on it).
    pub fn add_external_device(
        &mut self,
        label: &str,
        socket: impl AsRef<Path>,
        info: HwInfo,
    ) -> Result<IommuDevice> {
        if label.is_empty() {
            return Err(ServerError::InvalidDevice {
                label: label.to_string(),
                reason: "the label is empty",
            });
        }
        if self.directory.get(label).is_some() {
            return Err(ServerError::DuplicateLabel(label.to_string()));
        }
        let device = IommuDevice::new(label, info);
        let dev_id = self
            .iommu
            .bind(&device)
            .map_err(|source| ServerError::Iommu {
                label: label.to_string(),
                source,
            })?;
        let entry = DirectoryEntry {
            device: device.clone(),
            dev_id,
            socket: socket.as_ref().to_path_buf(),
        };
        if !self.directory.insert(label.to_string(), entry) {
            let _ = self.iommu.unbind(dev_id);
            return Err(ServerError::DuplicateLabel(label.to_string()));
        }
        Ok(device)
    }

    /// Runs `on_accept` (on the event loop thread) for every connection
    /// accepted on `listener`; it should hand the stream to a thread of its
    /// own. `path`, if given, is removed at shutdown.
    pub fn add_listener(
        &mut self,
        listener: UnixListener,
        path: Option<PathBuf>,
        on_accept: AcceptHandler,
    ) -> Result<()> {
        listener
            .set_nonblocking(true)
            .map_err(|source| ServerError::Io {
                op: "set_nonblocking",
                source,
            })?;
        self.extra.push(Extra {
            listener,
            path,
            on_accept,
            backoff: AcceptBackoff::new(),
            paused: None,
        });
        Ok(())
    }

    /// Makes SIGINT and SIGTERM shut this server down cleanly. One server
    /// per process should call this.
    pub fn handle_signals(&mut self) -> Result<()> {
        let t = Termination::new().map_err(|source| ServerError::Io {
            op: "catching SIGINT/SIGTERM",
            source,
        })?;
        self.signals = Some(t);
        Ok(())
    }

    /// Runs the event loop until shut down.
    pub fn run(&mut self) -> Result<()> {
        let epoll = epoll::new().map_err(|source| ServerError::Io {
            op: "epoll_create1",
            source,
        })?;
        let add = |fd: BorrowedFd<'_>, token: u64| -> Result<()> {
            epoll::watch(&epoll, fd, token).map_err(|source| ServerError::Io {
                op: "epoll_ctl",
                source,
            })
        };
        add(eventfd::borrow(&self.stop), TOKEN_STOP)?;
        if let Some(t) = &self.signals {
            add(t.as_fd(), TOKEN_STOP)?;
        }
        add(eventfd::borrow(&self.reaped), TOKEN_REAP)?;
        for (i, h) in self.hosted.iter().enumerate() {
            h.listener
                .set_nonblocking(true)
                .map_err(|source| ServerError::Io {
                    op: "set_nonblocking",
                    source,
                })?;
            add(h.listener.as_fd(), TOKEN_DEVICE + i as u64)?;
            info!("device {:?} listening on {:?}", h.label, h.path);
        }
        for (i, x) in self.extra.iter().enumerate() {
            add(x.listener.as_fd(), TOKEN_EXTRA + i as u64)?;
        }
        for v in &mut self.vduse {
            start_vduse(v);
        }
        let mut events = [EpollEvent::empty(); 16];
        'outer: loop {
            let timeout = self.resume_listeners(&epoll);
            let n = match epoll::wait(&epoll, &mut events, timeout) {
                Ok(n) => n,
                Err(e) => {
                    self.shutdown_all();
                    return Err(ServerError::Io {
                        op: "epoll_wait",
                        source: e,
                    });
                }
            };
            for ev in events.iter().take(n) {
                let token = ev.data();
                if token == TOKEN_STOP {
                    break 'outer;
                } else if token == TOKEN_REAP {
                    let _ = self.reaped.read();
                    self.reap();
                } else if token >= TOKEN_EXTRA {
                    let i = usize::try_from(token - TOKEN_EXTRA).unwrap_or(usize::MAX);
                    self.accept_extra(i, &epoll);
                } else if token >= TOKEN_DEVICE {
                    let i = usize::try_from(token - TOKEN_DEVICE).unwrap_or(usize::MAX);
                    self.accept_device(i, &epoll);
                }
            }
        }
        info!("shutting down");
        self.shutdown_all();
        Ok(())
    }

    fn reap(&mut self) {
        let reaped = self.reaped.clone();
        for h in &mut self.hosted {
            if h.active
                .as_ref()
                .is_some_and(|a| a.done.load(Ordering::SeqCst))
            {
                if let Some(a) = h.active.take() {
                    if a.handle.join().is_err() {
                        error!("device {:?}: connection thread panicked", h.label);
                    }
                }
            }
            if h.active.is_none() {
                if let Some(s) = h.pending.take() {
                    start_connection(h, s, &reaped);
                }
            }
        }
    }

    /// Watches again every listener whose pause ended; returns the
    /// epoll_wait timeout until the next pause ends (`None`: no pause).
    fn resume_listeners(&mut self, epoll: &Epoll) -> Option<Duration> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let listeners = self
            .hosted
            .iter_mut()
            .enumerate()
            .map(|(i, h)| (&mut h.paused, h.listener.as_fd(), TOKEN_DEVICE + i as u64))
            .chain(
                self.extra
                    .iter_mut()
                    .enumerate()
                    .map(|(i, x)| (&mut x.paused, x.listener.as_fd(), TOKEN_EXTRA + i as u64)),
            );
        for (paused, fd, token) in listeners {
            let Some(t) = *paused else { continue };
            if t <= now {
                match epoll::watch(epoll, fd, token) {
                    Ok(()) => *paused = None,
                    Err(e) => {
                        error!("watching a listener again: {e}");
                        *paused = Some(now + AcceptBackoff::MAX_PAUSE);
                        next = Some(next.map_or(now + AcceptBackoff::MAX_PAUSE, |n| {
                            n.min(now + AcceptBackoff::MAX_PAUSE)
                        }));
                    }
                }
            } else {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        // Rounded up, so the wait does not end just before the pause.
        next.map(|t| t.saturating_duration_since(now) + Duration::from_millis(1))
    }

    fn accept_extra(&mut self, i: usize, epoll: &Epoll) {
        let Some(x) = self.extra.get_mut(i) else {
            return;
        };
        // Bounded: a listener backlog is finite; stop at the first WouldBlock.
        for _ in 0..64 {
            match x.listener.accept() {
                Ok((s, _)) => {
                    x.backoff.succeeded();
                    (x.on_accept)(s)
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if accept::is_transient(&e) => continue,
                Err(e) => {
                    let pause = x.backoff.failed("extra listener", &e);
                    pause_listener(epoll, x.listener.as_fd(), &mut x.paused, pause);
                    break;
                }
            }
        }
    }

    fn accept_device(&mut self, i: usize, epoll: &Epoll) {
        self.reap();
        let reaped = self.reaped.clone();
        let Some(h) = self.hosted.get_mut(i) else {
            return;
        };
        for _ in 0..64 {
            let stream = match h.listener.accept() {
                Ok((s, _)) => {
                    h.backoff.succeeded();
                    s
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if accept::is_transient(&e) => continue,
                Err(e) => {
                    let pause = h.backoff.failed(&format!("device {:?}", h.label), &e);
                    pause_listener(epoll, h.listener.as_fd(), &mut h.paused, pause);
                    break;
                }
            };
            if let Err(e) = stream.set_nonblocking(false) {
                warn!("device {:?}: {e}", h.label);
                continue;
            }
            if h.active.is_none() {
                start_connection(h, stream, &reaped);
            } else if h.pending.is_none() {
                // The previous frontend may be going away (reconnect): serve
                // this one once it is gone.
                h.pending = Some(stream);
            } else {
                crate::log_limited!(limit: REFUSED_FRONTEND,
                    log::Level::Warn,
                    "device {:?}: a frontend is already connected; refusing another",
                    h.label
                );
            }
        }
    }

    fn shutdown_all(&mut self) {
        for v in &mut self.vduse {
            let _ = v.stop.write(1);
            if let Some(t) = v.thread.take() {
                if t.join().is_err() {
                    error!("VDUSE device {:?}: control thread panicked", v.label);
                }
            }
        }
        for h in &mut self.hosted {
            h.pending = None;
            if let Some(a) = h.active.take() {
                let _ = a.stream.shutdown(std::net::Shutdown::Both);
                if a.handle.join().is_err() {
                    error!("device {:?}: connection thread panicked", h.label);
                }
            }
            if let Err(e) = std::fs::remove_file(&h.path) {
                warn!("removing {:?}: {e}", h.path);
            }
        }
        for x in &self.extra {
            if let Some(p) = &x.path {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

static REFUSED_FRONTEND: RateLimit = RateLimit::peer();
static CONNECTION_LOG: RateLimit = RateLimit::peer();

/// Stops watching a listener for `pause` (its accept failed).
fn pause_listener(
    epoll: &Epoll,
    fd: BorrowedFd<'_>,
    paused: &mut Option<Instant>,
    pause: Duration,
) {
    if let Err(e) = epoll::unwatch(epoll, fd) {
        error!("pausing a listener: {e}");
    }
    *paused = Some(Instant::now() + pause);
}

fn start_connection(h: &mut Hosted, stream: UnixStream, reaped: &Arc<EventFd>) {
    let shut = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            warn!("device {:?}: cloning stream: {e}", h.label);
            return;
        }
    };
    let served = h.served.clone();
    let label = h.label.clone();
    let reaped = reaped.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done_thread = done.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("ioasis-conn-{label}"))
        .spawn(move || {
            crate::log_limited!(limit: CONNECTION_LOG,
                log::Level::Info,
                "device {label:?}: frontend connected"
            );
            match Connection::new(served, stream) {
                Ok(c) => match c.serve() {
                    Ok(()) => crate::log_limited!(limit: CONNECTION_LOG,
                        log::Level::Info,
                        "device {label:?}: frontend disconnected; device reset"
                    ),
                    Err(e) => crate::log_limited!(limit: CONNECTION_LOG,
                        log::Level::Error,
                        "device {label:?}: dropping connection: {}",
                        crate::error_chain(&e)
                    ),
                },
                Err(e) => crate::log_limited!(limit: CONNECTION_LOG,
                    log::Level::Error,
                    "device {label:?}: setting up connection: {}",
                    crate::error_chain(&e)
                ),
            }
            done_thread.store(true, Ordering::SeqCst);
            let _ = reaped.write(1);
        });
    match spawned {
        Ok(handle) => {
            h.active = Some(Active {
                stream: shut,
                handle,
                done,
            })
        }
        Err(e) => error!("device {:?}: spawning connection thread: {e}", h.label),
    }
}

/// Checks a device's description (queue count and sizes, thread masks).
fn check_device(label: &str, device: &dyn Device) -> Result<()> {
    let invalid = |reason| ServerError::InvalidDevice {
        label: label.to_string(),
        reason,
    };
    let n = device.num_queues();
    if n == 0 || n > 64 {
        return Err(invalid("num_queues must be in 1..=64"));
    }
    let max = device.max_queue_size();
    if max == 0 || !max.is_power_of_two() || max > crate::queue::MAX_QUEUE_SIZE {
        return Err(invalid("max_queue_size must be a power of two up to 32768"));
    }
    let masks = device.queues_per_thread();
    let all = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
    let mut seen = 0u64;
    for m in &masks {
        if m & seen != 0 || m & !all != 0 || *m == 0 {
            return Err(invalid(
                "queues_per_thread masks must be non-empty, disjoint and within num_queues",
            ));
        }
        seen |= m;
    }
    if seen != all {
        return Err(invalid("queues_per_thread must cover every queue"));
    }
    Ok(())
}

/// Starts the control thread of a VDUSE device: it serves the device until
/// the server shuts down, then destroys it.
fn start_vduse(v: &mut VduseHosted) {
    let Some((kernel, mut control)) = v.parts.take() else {
        return;
    };
    let label = v.label.clone();
    let stop = v.stop.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("ioasis-vduse-{label}"))
        .spawn(move || {
            info!(
                "device {label:?} served over VDUSE as {:?}{}",
                kernel.name(),
                if kernel.existed {
                    " (an existing device, taken over)"
                } else {
                    ""
                }
            );
            if let Err(e) = control.run(&stop) {
                error!("VDUSE device {label:?}: {}", crate::error_chain(&e));
            }
            // Every fd of the device closes before it is destroyed.
            drop(control);
            kernel.destroy();
        });
    match spawned {
        Ok(t) => v.thread = Some(t),
        Err(e) => error!("VDUSE device {:?}: spawning its thread: {e}", v.label),
    }
}

fn bind_socket(path: &Path, policy: &SocketPolicy) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket(path.to_path_buf()));
        }
    }
    policy
        .bind(path, nix::sys::socket::SockType::Stream, false)
        .map(UnixListener::from)
        .map_err(|source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        })
}
