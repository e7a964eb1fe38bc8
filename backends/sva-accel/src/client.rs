//! The client driver library, shaped like Intel DML.
//!
//! ```no_run
//! use sva_accel::client::Client;
//! # fn main() -> Result<(), sva_accel::client::ClientError> {
//! let client = Client::connect("/run/sva-accel.sock")?;
//! let src = client.alloc(4096)?;          // memfd memory the device sees
//! let dst = client.alloc(4096)?;          // at the same addresses as we do
//! src.write(0, b"hello");
//! let cr = client.mem_move(dst.addr(), src.addr(), 4096)?;
//! assert_eq!(cr.status, sva_accel::desc::status::SUCCESS);
//! # Ok(()) }
//! ```
//!
//! - Connection: [`Client::connect`] sets up, through the daemon's
//!   `/dev/iommu` service, an IOAS and a PASID of the device on a HWPT with
//!   a fault queue, and binds that PASID at the device: every device access
//!   is translated by iommu-core for (device, PASID).
//! - Memory: [`Client::alloc`] creates a sealed memfd, maps it in this
//!   process at some address A and maps it into the IOAS at IOVA A, so
//!   descriptors carry our own pointers (shared virtual addressing).
//!   [`Client::alloc_lazy`] leaves registration for later, for example for
//!   a page fault handler.
//! - Synchronous operations ([`Client::mem_move`], [`Client::fill`], ...),
//!   asynchronous submission ([`Client::submit`] → [`Handle::wait`]), a batch
//!   builder ([`Client::batch`]).
//! - Options: block on fault (descriptors carry BOF and faults go to the
//!   handler), and a CPU fallback that finishes a partially completed
//!   operation in software when the rest lies in memory this client owns.
//! - I/O page faults arrive over the framework's io_uring fault channel on a
//!   library thread that calls the user's handler and answers the device.

use crate::crc;
use crate::desc::{flags, opcode, status, CompletionRecord, Descriptor, OpCap, CR_SIZE, DESC_SIZE};
use crate::proto::{self, Reader};
use crate::shm::{self, SharedMap};
use crate::wq::{ClientPortal, Event, Rejected, WqMode};
use ioasis::service::{HwptRequest, MapPerm};
use ioasis::uring::record::FAULT_PERM_WRITE;
use ioasis::uring::{FaultBatch, FaultChannel, PageResponse, Wait};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Completion record slots per client.
pub const CR_SLOTS: usize = 4096;
/// How long a submission retries a full shared queue before giving up.
pub const SUBMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a wait busy-polls a completion record.
pub const SPIN_BUSY: Duration = Duration::from_micros(200);
/// How long a wait polls with yields before it sleeps.
pub const SPIN_YIELD: Duration = Duration::from_millis(1);
/// How long a wait for a completion lasts before it reports a timeout.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the client library.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Connecting to the daemon failed.
    #[error("cannot connect to {path}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// The control socket failed.
    #[error("control socket failed during {what}")]
    Socket {
        /// Operation.
        what: &'static str,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// The daemon refused a request.
    #[error("daemon refused {what} with errno {errno}")]
    Refused {
        /// Operation.
        what: &'static str,
        /// errno.
        errno: i32,
    },
    /// The daemon sent a malformed reply.
    #[error("malformed reply to {0}")]
    Protocol(&'static str),
    /// Local resource setup failed.
    #[error("cannot set up {what}")]
    Setup {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A request to the `/dev/iommu` service failed.
    #[error("iommu service request failed during {what}")]
    Service {
        /// Operation.
        what: &'static str,
        /// Cause.
        #[source]
        source: ioasis::service::ClientError,
    },
    /// The fault channel could not be set up.
    #[error("cannot set up the fault channel")]
    FaultChannel(#[source] ioasis::uring::ChannelError),
    /// A shared queue stayed full (ENQCMD kept answering retry).
    #[error("work queue full, retry")]
    Retry,
    /// No completion within the wait limit.
    #[error("no completion within {0:?}")]
    Timeout(Duration),
    /// A completion record address outside this client's buffers.
    #[error("completion record address {0:#x} is not in a buffer of this client")]
    NotOwned(u64),
    /// All completion record slots are in use.
    #[error("no free completion record slot")]
    NoSlots,
    /// A batch has more members than the device allows.
    #[error("batch of {count} exceeds the maximum of {max}")]
    BatchTooLarge {
        /// Members.
        count: usize,
        /// Device maximum.
        max: u32,
    },
}

/// Result alias of the client library.
pub type Result<T> = std::result::Result<T, ClientError>;

/// What the device reported at connect time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// PASID bound to this client.
    pub pasid: u32,
    /// Work queue mode.
    pub wq_mode: WqMode,
    /// Work queue size.
    pub wq_size: u32,
    /// Maximum batch size.
    pub max_batch: u32,
    /// Maximum transfer size.
    pub max_xfer: u32,
    /// Device id in fault records.
    pub dev_id: u32,
    /// Operation capability.
    pub opcap: OpCap,
    /// Work queue priority granted: the daemon administrator's for this
    /// user, or the lower one asked for.
    pub priority: u8,
}

/// An I/O page fault the device raised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Faulting page (page aligned).
    pub addr: u64,
    /// The access was a write.
    pub write: bool,
    /// PASID of the access.
    pub pasid: u32,
}

/// The handler's answer to a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// The page is now mapped: retry (page response SUCCESS).
    Retry,
    /// Give up: the descriptor completes with 0x04 (page response INVALID).
    Fail,
}

/// A page fault handler.
pub type FaultHandler = Box<dyn FnMut(&Fault) -> FaultAction + Send>;

/// Connection options.
#[derive(Default)]
pub struct Options {
    /// Work queue priority asked for: 0 (the default) takes the one the
    /// daemon's administrator set for this user; 1..=15 asks for that one,
    /// which the daemon lowers to the administrator's if it is higher.
    pub priority: u8,
    /// Library-built descriptors carry BOF.
    pub block_on_fault: bool,
    /// Finish partially completed operations on the CPU.
    pub cpu_fallback: bool,
    /// Called for each I/O page fault; without one every fault is answered
    /// INVALID.
    pub fault_handler: Option<FaultHandler>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("priority", &self.priority)
            .field("block_on_fault", &self.block_on_fault)
            .field("cpu_fallback", &self.cpu_fallback)
            .field("fault_handler", &self.fault_handler.is_some())
            .finish()
    }
}

/// Counters of a client.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Descriptors submitted.
    pub submitted: AtomicU64,
    /// Shared-queue retries.
    pub retries: AtomicU64,
    /// Faults received.
    pub faults: AtomicU64,
    /// Faults answered Retry.
    pub faults_retried: AtomicU64,
    /// Operations finished on the CPU.
    pub cpu_fallbacks: AtomicU64,
    /// Doorbells rung (workers were asleep).
    pub doorbells: AtomicU64,
    /// Waits that went to sleep on the completion eventfd.
    pub sleeps: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    /// The device connection: held open for the client's lifetime (closing
    /// it unbinds the PASID at the device).
    _ctrl: OwnedFd,
    reg: Registrar,
    portal: Mutex<ClientPortal>,
    info: DeviceInfo,
    doorbell: EventFd,
    completion: EventFd,
    regions: RwLock<Vec<(u64, u64)>>,
    free_slots: Mutex<Vec<u32>>,
    stop: AtomicBool,
    stats: ClientStats,
    block_on_fault: bool,
    cpu_fallback: bool,
}

/// A connection to the device.
#[derive(Debug)]
pub struct Client {
    inner: Arc<Inner>,
    crs: Arc<Buffer>,
    fault_thread: Option<JoinHandle<()>>,
}

/// Where memory registration goes: through the `/dev/iommu` service, into
/// an IOAS.
struct Registrar {
    svc: Mutex<ioasis::service::Client>,
    ioas: u32,
}

impl std::fmt::Debug for Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrar")
            .field("ioas", &self.ioas)
            .finish_non_exhaustive()
    }
}

/// The `/dev/iommu` service socket a daemon at `device` hosts by default:
/// `<device>.iommu`.
pub fn iommu_socket_of(device: &Path) -> std::path::PathBuf {
    let mut p = device.as_os_str().to_owned();
    p.push(".iommu");
    std::path::PathBuf::from(p)
}

fn dial(path: &Path) -> Result<OwnedFd> {
    let cerr = |source| ClientError::Connect {
        path: path.display().to_string(),
        source,
    };
    let sock = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(cerr)?;
    let addr = UnixAddr::new(path).map_err(cerr)?;
    socket::connect(sock.as_raw_fd(), &addr).map_err(cerr)?;
    Ok(sock)
}

/// Memory shared with the device: mapped here at [`Buffer::addr`], and (once
/// registered) at the same device address.
#[derive(Debug)]
pub struct Buffer {
    inner: Arc<Inner>,
    map: SharedMap,
    fd: OwnedFd,
    registered: AtomicBool,
    registered_len: AtomicU64,
}

impl Buffer {
    /// Device address (and our own address) of the first byte.
    pub fn addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// Device address of byte `off`.
    pub fn at(&self, off: usize) -> u64 {
        self.addr() + off as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the buffer is empty (never).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Raw pointer to the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Copies bytes out of the buffer. Panics if the range is outside it.
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        self.map.read(off, buf);
    }

    /// Copies bytes into the buffer. Panics if the range is outside it.
    pub fn write(&self, off: usize, data: &[u8]) {
        self.map.write(off, data);
    }

    /// A copy of `len` bytes from `off`. Panics if the range is outside it.
    pub fn to_vec(&self, off: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.read(off, &mut v);
        v
    }

    /// Whether the device can currently reach this buffer.
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    /// Makes the buffer reachable by the device at its own address (maps it
    /// into the IOAS).
    pub fn register(&self) -> Result<()> {
        self.register_prefix(self.len())
    }

    /// Registers only the first `len` bytes (rounded up to pages): the rest
    /// stays unreachable for the device.
    pub fn register_prefix(&self, len: usize) -> Result<()> {
        let len = (len.max(1).div_ceil(4096) * 4096).min(self.len()) as u64;
        if self.is_registered() {
            return Ok(());
        }
        let Registrar { svc, ioas } = &self.inner.reg;
        let what = "ioas map";
        let mut svc = svc.lock().map_err(|_| ClientError::Protocol(what))?;
        svc.ioas_map(
            *ioas,
            self.fd.as_fd(),
            0,
            len,
            Some(self.addr()),
            MapPerm::ReadWrite,
        )
        .map_err(|source| ClientError::Service { what, source })?;
        self.registered_len.store(len, Ordering::Release);
        self.registered.store(true, Ordering::Release);
        Ok(())
    }

    /// Removes the buffer from the device's view. When this returns the
    /// device no longer touches it.
    pub fn unregister(&self) -> Result<()> {
        if !self.registered.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let Registrar { svc, ioas } = &self.inner.reg;
        let what = "ioas unmap";
        let mut svc = svc.lock().map_err(|_| ClientError::Protocol(what))?;
        svc.ioas_unmap(
            *ioas,
            self.addr(),
            self.registered_len.load(Ordering::Acquire),
        )
        .map_err(|source| ClientError::Service { what, source })?;
        Ok(())
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let _ = self.unregister();
        let a = self.addr();
        if let Ok(mut r) = self.inner.regions.write() {
            r.retain(|(x, _)| *x != a);
        }
    }
}

/// An operation in flight.
#[derive(Debug)]
pub struct Handle<'c> {
    client: &'c Client,
    slot: Option<u32>,
    desc: Descriptor,
}

impl Handle<'_> {
    /// The completion record address.
    pub fn record_addr(&self) -> u64 {
        self.desc.completion_addr
    }

    /// The record, if the device wrote it.
    pub fn poll(&self) -> Option<CompletionRecord> {
        self.client.read_record(self.desc.completion_addr)
    }

    /// Waits for the completion record (then applies the CPU fallback when
    /// enabled).
    pub fn wait(mut self) -> Result<CompletionRecord> {
        let cr = self.client.wait_record(self.desc.completion_addr)?;
        if let Some(s) = self.slot.take() {
            self.client.free_slot(s);
        }
        Ok(self.client.fallback(&self.desc, cr))
    }
}

impl Drop for Handle<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.slot.take() {
            // The device may still write the slot: reuse it only once it has.
            if self.client.wait_record(self.desc.completion_addr).is_ok() {
                self.client.free_slot(s);
            }
        }
    }
}

impl Client {
    /// Connects with default options (see [`Client::connect_with`]).
    pub fn connect(path: impl AsRef<Path>) -> Result<Client> {
        Client::connect_with(path, Options::default())
    }

    /// Connects to the daemon at `path` through its `/dev/iommu` service at
    /// [`iommu_socket_of`]`(path)`: sets up an IOAS, a PASID of the
    /// daemon's device on a HWPT with a fault queue, and maps every buffer
    /// into the IOAS at the client's own address. Every device access is
    /// then translated by iommu-core for (device, PASID), and I/O page
    /// faults arrive over the service's fault queue.
    ///
    /// The device is the one the service offers (the daemon offers
    /// exactly one; [`crate::device::DEFAULT_LABEL`] when several).
    pub fn connect_with(path: impl AsRef<Path>, opts: Options) -> Result<Client> {
        let path = path.as_ref();
        let service = iommu_socket_of(path);
        let what = "device lookup";
        let mut svc = ioasis::service::Client::connect(&service)
            .map_err(|source| ClientError::Service { what, source })?;
        let labels = svc
            .devices()
            .map_err(|source| ClientError::Service { what, source })?;
        let label = match labels.as_slice() {
            [one] => one.clone(),
            _ if labels.iter().any(|l| l == crate::device::DEFAULT_LABEL) => {
                crate::device::DEFAULT_LABEL.to_owned()
            }
            _ => return Err(ClientError::Protocol(what)),
        };
        Client::connect_session(path, svc, &label, opts)
    }

    /// Connects through the `/dev/iommu` service at `service`: allocates an
    /// IOAS, reserves a PASID of device `label`, allocates a fault queue, a
    /// HWPT over the IOAS with that fault queue, attaches the device on the
    /// PASID, then binds the PASID at the device socket `device`. Every
    /// device access is then translated by iommu-core, and memory is mapped
    /// into the IOAS at the client's own addresses.
    pub fn connect_iommu(
        device: impl AsRef<Path>,
        service: impl AsRef<Path>,
        label: &str,
        opts: Options,
    ) -> Result<Client> {
        let what = "iommu service setup";
        let svc = ioasis::service::Client::connect(service.as_ref())
            .map_err(|source| ClientError::Service { what, source })?;
        Client::connect_session(device.as_ref(), svc, label, opts)
    }

    /// Over service session `svc`: IOAS, PASID of `label`, fault queue,
    /// HWPT with it, attach on the PASID; then binds the PASID at `device`.
    fn connect_session(
        device: &Path,
        mut svc: ioasis::service::Client,
        label: &str,
        opts: Options,
    ) -> Result<Client> {
        let what = "iommu service setup";
        let serr = |source| ClientError::Service { what, source };
        let ioas = svc.ioas_alloc().map_err(serr)?;
        let pasid = svc.pasid_alloc(label).map_err(serr)?;
        let (fault_id, channel) = svc.fault_queue_alloc().map_err(serr)?;
        let hwpt = svc
            .hwpt_alloc(&HwptRequest {
                label: label.to_owned(),
                pt_id: ioas,
                flags: ioasis::service::IOMMU_HWPT_ALLOC_PASID,
                fault_id: Some(fault_id),
                ..HwptRequest::default()
            })
            .map_err(serr)?;
        svc.attach(label, Some(pasid), hwpt).map_err(serr)?;
        Client::connect_with_session(device, svc, ioas, pasid, Some(channel), opts)
    }

    /// Binds a PASID the caller already attached through its service
    /// session `svc` (for example to an IOAS shared with other devices) at
    /// the device socket `device`. Buffers are mapped into `ioas` at their
    /// own addresses; faults arrive on `faults` when given.
    pub fn connect_with_session(
        device: impl AsRef<Path>,
        svc: ioasis::service::Client,
        ioas: u32,
        pasid: u32,
        faults: Option<FaultChannel>,
        opts: Options,
    ) -> Result<Client> {
        let sock = dial(device.as_ref())?;
        let hello = proto::Hello {
            priority: u32::from(opts.priority),
            session: svc.session_id(),
            pasid,
        }
        .encode();
        let reg = Registrar {
            svc: Mutex::new(svc),
            ioas,
        };
        Client::finish_connect(sock, &hello, opts, reg, faults)
    }

    fn finish_connect(
        sock: OwnedFd,
        hello: &[u8],
        mut opts: Options,
        reg: Registrar,
        faults: Option<FaultChannel>,
    ) -> Result<Client> {
        let what = "hello";
        proto::send(sock.as_fd(), hello, &[])
            .map_err(|source| ClientError::Socket { what, source })?;
        let pkt = proto::recv(sock.as_fd())
            .map_err(|source| ClientError::Socket { what, source })?
            .ok_or(ClientError::Protocol(what))?;
        let mut r = Reader::new(&pkt.data);
        let st = r.i32().ok_or(ClientError::Protocol(what))?;
        if st != 0 {
            return Err(ClientError::Refused { what, errno: -st });
        }
        let _ = r.u32();
        let mut f = || r.u32().ok_or(ClientError::Protocol(what));
        let (pasid, mode, wq_size, max_batch, max_xfer, dev_id) =
            (f()?, f()?, f()?, f()?, f()?, f()?);
        let mut opcap = [0u64; 4];
        for w in opcap.iter_mut() {
            *w = r.u64().ok_or(ClientError::Protocol(what))?;
        }
        let priority = r.u32().map_or(opts.priority, |p| p.min(15) as u8);
        let wq_mode = WqMode::from_u32(mode).ok_or(ClientError::Protocol(what))?;
        if !(2..=crate::wq::MAX_WQ_SIZE).contains(&wq_size) || pkt.fds.len() != 3 {
            return Err(ClientError::Protocol(what));
        }
        let mut fds = pkt.fds.into_iter();
        let (Some(portal_fd), Some(doorbell), Some(completion)) =
            (fds.next(), fds.next(), fds.next())
        else {
            return Err(ClientError::Protocol(what));
        };
        let channel = faults;
        let portal =
            ClientPortal::new(&portal_fd, wq_size).map_err(|source| ClientError::Setup {
                what: "portal mapping",
                source,
            })?;
        let info = DeviceInfo {
            pasid,
            wq_mode,
            wq_size,
            max_batch,
            max_xfer,
            dev_id,
            opcap: OpCap(opcap),
            priority,
        };
        let inner = Arc::new(Inner {
            _ctrl: sock,
            reg,
            portal: Mutex::new(portal),
            info,
            doorbell: shm::adopt_eventfd(doorbell),
            completion: shm::adopt_eventfd(completion),
            regions: RwLock::new(Vec::new()),
            free_slots: Mutex::new((0..CR_SLOTS as u32).rev().collect()),
            stop: AtomicBool::new(false),
            stats: ClientStats::default(),
            block_on_fault: opts.block_on_fault,
            cpu_fallback: opts.cpu_fallback,
        });
        let crs = Arc::new(alloc_buffer(&inner, CR_SLOTS * CR_SIZE)?);
        crs.register()?;
        let handler = opts.fault_handler.take();
        let fault_thread = match channel {
            Some(channel) => {
                let t_inner = inner.clone();
                Some(
                    std::thread::Builder::new()
                        .name("sva-faults".into())
                        .spawn(move || fault_loop(&t_inner, channel, handler))
                        .map_err(|source| ClientError::Setup {
                            what: "fault thread",
                            source,
                        })?,
                )
            }
            None => None,
        };
        Ok(Client {
            inner,
            crs,
            fault_thread,
        })
    }

    /// The IOAS buffers are mapped into.
    pub fn ioas(&self) -> u32 {
        self.inner.reg.ioas
    }

    /// Runs `f` with the `/dev/iommu` service session this client uses, for
    /// example to map or unmap memory of other devices sharing the IOAS.
    /// `None` only if the session's lock was poisoned.
    pub fn with_service<T>(&self, f: impl FnOnce(&mut ioasis::service::Client) -> T) -> Option<T> {
        self.inner.reg.svc.lock().ok().map(|mut g| f(&mut g))
    }

    /// What the device reported at connect time.
    pub fn info(&self) -> DeviceInfo {
        self.inner.info
    }

    /// PASID bound to this client.
    pub fn pasid(&self) -> u32 {
        self.inner.info.pasid
    }

    /// Counters.
    pub fn stats(&self) -> &ClientStats {
        &self.inner.stats
    }

    /// Allocates `len` bytes (rounded up to pages) and registers them.
    pub fn alloc(&self, len: usize) -> Result<Buffer> {
        let b = alloc_buffer(&self.inner, len)?;
        b.register()?;
        Ok(b)
    }

    /// Allocates `len` bytes without registering them (the device faults on
    /// them until [`Buffer::register`]).
    pub fn alloc_lazy(&self, len: usize) -> Result<Buffer> {
        alloc_buffer(&self.inner, len)
    }

    /// Events the device reported (completion records it could not write).
    pub fn events(&self) -> Vec<Event> {
        let mut v = Vec::new();
        if let Ok(mut p) = self.inner.portal.lock() {
            p.take_events(&mut v);
        }
        v
    }

    fn alloc_slot(&self) -> Result<(u32, u64)> {
        let s = self
            .inner
            .free_slots
            .lock()
            .map_err(|_| ClientError::NoSlots)?
            .pop()
            .ok_or(ClientError::NoSlots)?;
        let off = s as usize * CR_SIZE;
        self.crs.write(off, &[0u8; CR_SIZE]);
        Ok((s, self.crs.at(off)))
    }

    fn free_slot(&self, s: u32) {
        if let Ok(mut f) = self.inner.free_slots.lock() {
            f.push(s);
        }
    }

    /// Reads a completion record at a device address inside one of our
    /// buffers, if its status byte is set.
    fn read_record(&self, addr: u64) -> Option<CompletionRecord> {
        // The regions lock is held across the read: a buffer is removed
        // from the regions before it is unmapped.
        let regions = self.inner.regions.read().ok()?;
        if !contains(&regions, addr, CR_SIZE as u64) {
            return None;
        }
        // SAFETY: the record lies in a registered buffer, which cannot be
        // unmapped while the regions lock is held.
        unsafe { read_owned_record(addr) }
    }

    /// Waits for the completion record at byte `off` of `buf` (a record
    /// address the caller put in a raw descriptor).
    pub fn wait_record_in(&self, buf: &Buffer, off: usize) -> Result<CompletionRecord> {
        let addr = buf.addr().wrapping_add(off as u64);
        if off.checked_add(CR_SIZE).is_none_or(|end| end > buf.len()) {
            return Err(ClientError::NotOwned(addr));
        }
        // `buf` is borrowed for the whole wait, so it stays mapped.
        self.wait_record(addr)
    }

    /// Waits until the record at `addr` has a status: spins (the device is
    /// another core, as with UMWAIT on DSA), then yields, then sleeps on the
    /// completion eventfd. `addr` must lie in memory that stays mapped for
    /// the wait (the record pool, or a buffer the caller borrows).
    fn wait_record(&self, addr: u64) -> Result<CompletionRecord> {
        let known = self
            .inner
            .regions
            .read()
            .is_ok_and(|r| contains(&r, addr, CR_SIZE as u64));
        if !known {
            return Err(ClientError::NotOwned(addr));
        }
        // Most waits find the record written already and need no clock.
        // SAFETY: the record is in the client's pool or in a buffer the
        // caller borrows for the wait (see `wait_record_in`).
        if let Some(cr) = unsafe { read_owned_record(addr) } {
            return Ok(cr);
        }
        let start = Instant::now();
        let mut i = 0u32;
        loop {
            // SAFETY: the record is in the client's pool or in a buffer the
            // caller borrows for the wait (see `wait_record_in`).
            if let Some(cr) = unsafe { read_owned_record(addr) } {
                return Ok(cr);
            }
            i = i.wrapping_add(1);
            if i % 64 == 0 {
                let e = start.elapsed();
                if e > SPIN_YIELD {
                    break;
                }
                if e > SPIN_BUSY {
                    std::thread::yield_now();
                }
            }
            std::hint::spin_loop();
        }
        loop {
            if let Some(cr) = self.read_record(addr) {
                return Ok(cr);
            }
            if start.elapsed() > WAIT_TIMEOUT {
                return Err(ClientError::Timeout(WAIT_TIMEOUT));
            }
            self.with_portal(|p| p.set_waiting(true));
            if self.read_record(addr).is_none() {
                self.inner.stats.sleeps.fetch_add(1, Ordering::Relaxed);
                let _ = shm::poll_in(&[shm::borrow_eventfd(&self.inner.completion)], 5);
                shm::drain(&self.inner.completion);
            }
            self.with_portal(|p| p.set_waiting(false));
        }
    }

    fn with_portal<T>(&self, f: impl FnOnce(&mut ClientPortal) -> T) -> Option<T> {
        self.inner.portal.lock().ok().map(|mut p| f(&mut p))
    }

    /// Submits raw descriptors as they are (fields, flags and completion
    /// addresses untouched); retries a full shared queue and waits for
    /// credits on a dedicated one, up to [`SUBMIT_TIMEOUT`].
    pub fn submit_raw(&self, descs: &[Descriptor]) -> Result<()> {
        // One descriptor (the usual case) without an allocation.
        let one;
        let many: Vec<[u8; DESC_SIZE]>;
        let raw: &[[u8; DESC_SIZE]] = match descs {
            [d] => {
                one = [d.to_bytes()];
                &one
            }
            _ => {
                many = descs.iter().map(|d| d.to_bytes()).collect();
                &many
            }
        };
        let mut start = None;
        loop {
            match self.try_submit_bytes(raw) {
                Err(ClientError::Retry)
                    if start.get_or_insert_with(Instant::now).elapsed() < SUBMIT_TIMEOUT =>
                {
                    std::thread::yield_now();
                }
                other => return other,
            }
        }
    }

    /// One submission attempt: `Err(Retry)` when the shared queue is full
    /// (ENQCMD's retry) or the dedicated queue has no credit.
    pub fn try_submit_raw(&self, descs: &[Descriptor]) -> Result<()> {
        if let [d] = descs {
            return self.try_submit_bytes(&[d.to_bytes()]);
        }
        let raw: Vec<[u8; DESC_SIZE]> = descs.iter().map(|d| d.to_bytes()).collect();
        self.try_submit_bytes(&raw)
    }

    /// Submits raw 64-byte descriptors (one attempt).
    pub fn try_submit_bytes(&self, raw: &[[u8; DESC_SIZE]]) -> Result<()> {
        let mut p = self.inner.portal.lock().map_err(|_| ClientError::Retry)?;
        match p.submit(raw, self.inner.info.wq_mode) {
            Ok(()) => {
                self.inner
                    .stats
                    .submitted
                    .fetch_add(raw.len() as u64, Ordering::Relaxed);
                if p.needs_doorbell() {
                    self.inner.stats.doorbells.fetch_add(1, Ordering::Relaxed);
                    shm::signal(&self.inner.doorbell);
                }
                Ok(())
            }
            Err(Rejected::Retry | Rejected::NoCredit) => {
                self.inner.stats.retries.fetch_add(1, Ordering::Relaxed);
                if p.needs_doorbell() {
                    shm::signal(&self.inner.doorbell);
                }
                Err(ClientError::Retry)
            }
        }
    }

    /// Submits a descriptor with a library completion record (CRAV|RCR,
    /// BOF per options); the descriptor's completion address is replaced.
    pub fn submit(&self, mut d: Descriptor) -> Result<Handle<'_>> {
        let (slot, addr) = self.alloc_slot()?;
        d.completion_addr = addr;
        d.flags |= flags::CRAV | flags::RCR;
        if self.inner.block_on_fault {
            d.flags |= flags::BOF;
        }
        let h = Handle {
            client: self,
            slot: Some(slot),
            desc: d,
        };
        if let Err(e) = self.submit_raw(&[d]) {
            let mut h = h;
            if let Some(s) = h.slot.take() {
                self.free_slot(s);
            }
            return Err(e);
        }
        Ok(h)
    }

    /// Submits and waits.
    pub fn run(&self, d: Descriptor) -> Result<CompletionRecord> {
        self.submit(d)?.wait()
    }

    /// Memory move (overlap allowed).
    pub fn mem_move(&self, dst: u64, src: u64, len: u32) -> Result<CompletionRecord> {
        self.run(ops::mem_move(dst, src, len))
    }

    /// Fill with an 8-byte pattern.
    pub fn fill(&self, dst: u64, pattern: u64, len: u32) -> Result<CompletionRecord> {
        self.run(ops::fill(dst, pattern, len))
    }

    /// Compare two regions (`result` 0 equal, else `bytes_completed` is the
    /// first difference).
    pub fn compare(&self, a: u64, b: u64, len: u32) -> Result<CompletionRecord> {
        self.run(ops::compare(a, b, len))
    }

    /// Compare a region with a pattern.
    pub fn compare_pattern(&self, src: u64, pattern: u64, len: u32) -> Result<CompletionRecord> {
        self.run(ops::compare_pattern(src, pattern, len))
    }

    /// CRC-32C with a seed.
    pub fn crc(&self, src: u64, len: u32, seed: u32) -> Result<CompletionRecord> {
        self.run(ops::crc(src, len, seed))
    }

    /// Copy with CRC-32C.
    pub fn copy_crc(&self, dst: u64, src: u64, len: u32, seed: u32) -> Result<CompletionRecord> {
        self.run(ops::copy_crc(dst, src, len, seed))
    }

    /// Copy one source to two destinations.
    pub fn dualcast(&self, dst1: u64, dst2: u64, src: u64, len: u32) -> Result<CompletionRecord> {
        self.run(ops::dualcast(dst1, dst2, src, len))
    }

    /// Create a delta record of `a` → `b`.
    pub fn create_delta(
        &self,
        a: u64,
        b: u64,
        len: u32,
        delta: u64,
        max: u32,
    ) -> Result<CompletionRecord> {
        self.run(ops::create_delta(a, b, len, delta, max))
    }

    /// Apply a delta record to `dst`.
    pub fn apply_delta(
        &self,
        dst: u64,
        len: u32,
        delta: u64,
        delta_size: u32,
    ) -> Result<CompletionRecord> {
        self.run(ops::apply_delta(dst, len, delta, delta_size))
    }

    /// Cache flush of a range.
    pub fn cache_flush(&self, dst: u64, len: u32) -> Result<CompletionRecord> {
        self.run(ops::cache_flush(dst, len))
    }

    /// Drain: completes after everything submitted before it.
    pub fn drain(&self) -> Result<CompletionRecord> {
        self.run(Descriptor::new(opcode::DRAIN, 0))
    }

    /// A batch builder with room for `capacity` members.
    pub fn batch(&self, capacity: usize) -> Result<Batch<'_>> {
        let max = self.inner.info.max_batch;
        if capacity > max as usize {
            return Err(ClientError::BatchTooLarge {
                count: capacity,
                max,
            });
        }
        let cap = capacity.max(2);
        Ok(Batch {
            client: self,
            list: self.alloc(cap * DESC_SIZE)?,
            crs: self.alloc(cap * CR_SIZE)?,
            descs: Vec::with_capacity(cap),
            capacity: cap,
            fence_next: false,
            written: false,
            crs_zero: std::cell::Cell::new(true),
        })
    }

    /// The CPU fallback: finish a partially completed operation in software
    /// when everything left lies in this client's buffers (DML's rewrite
    /// rules: advance by `bytes_completed`, continue CRCs from `crc_val`).
    fn fallback(&self, d: &Descriptor, cr: CompletionRecord) -> CompletionRecord {
        let code = cr.code();
        if !self.inner.cpu_fallback
            || (code != status::PAGE_FAULT_NOBOF && code != status::PAGE_FAULT_IR)
        {
            return cr;
        }
        let done = u64::from(cr.bytes_completed);
        let len = u64::from(d.xfer_size);
        if done > len {
            return cr;
        }
        let rem = len - done;
        // Held for the whole fallback: a buffer leaves the regions before it
        // is unmapped, so every range checked here stays mapped meanwhile.
        let Ok(regions) = self.inner.regions.read() else {
            return cr;
        };
        let own = |a: u64| contains(&regions, a, rem);
        let mut out = CompletionRecord::with_status(status::SUCCESS);
        out.bytes_completed = d.xfer_size;
        let ok = match d.opcode {
            opcode::MEMMOVE => {
                // Descending copies completed their tail.
                let (s, t) = if cr.result == 1 {
                    (d.src, d.dst)
                } else {
                    (d.src + done, d.dst + done)
                };
                out.result = cr.result;
                own(s) && own(t) && {
                    // SAFETY: both ranges lie in buffers of this client,
                    // checked under the regions read lock held for the whole
                    // fallback (a buffer leaves the regions before it is
                    // unmapped); ptr::copy allows overlap.
                    unsafe { std::ptr::copy(s as *const u8, t as *mut u8, rem as usize) };
                    true
                }
            }
            opcode::MEMFILL => {
                let t = d.dst + done;
                own(t) && {
                    let pat = d.src.to_le_bytes();
                    for i in 0..rem {
                        let b = pat[((done + i) % 8) as usize];
                        // SAFETY: t + i lies in a buffer checked under the
                        // regions read lock held throughout.
                        unsafe { ((t + i) as *mut u8).write_volatile(b) };
                    }
                    true
                }
            }
            opcode::CRCGEN | opcode::COPY_CRC => {
                let s = d.src + done;
                let copy_ok = d.opcode == opcode::CRCGEN || own(d.dst + done);
                own(s) && copy_ok && {
                    let mut v = vec![0u8; rem as usize];
                    // SAFETY: the source range lies in a buffer checked
                    // under the regions read lock held throughout.
                    unsafe {
                        std::ptr::copy_nonoverlapping(s as *const u8, v.as_mut_ptr(), v.len())
                    };
                    if d.opcode == opcode::COPY_CRC {
                        // SAFETY: the destination range too.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                v.as_ptr(),
                                (d.dst + done) as *mut u8,
                                v.len(),
                            )
                        };
                    }
                    out.set_crc_val(crc::crc32c(cr.crc_val(), &v));
                    true
                }
            }
            opcode::CFLUSH => true,
            _ => false,
        };
        if ok {
            self.inner
                .stats
                .cpu_fallbacks
                .fetch_add(1, Ordering::Relaxed);
            out
        } else {
            cr
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.fault_thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `[addr, addr + len)` lies inside one of `regions`.
fn contains(regions: &[(u64, u64)], addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    regions.iter().any(|(a, l)| addr >= *a && end <= a + l)
}

/// Reads the record at `addr` if its status byte is set.
///
/// # Safety
/// The 32 bytes at `addr` must lie in a mapping of this process that stays
/// mapped for the call.
unsafe fn read_owned_record(addr: u64) -> Option<CompletionRecord> {
    let p = addr as *mut u8;
    // SAFETY: mapped for the call (caller); the status byte is accessed
    // atomically on both sides and has u8 alignment.
    let st = unsafe { AtomicU8::from_ptr(p) }.load(Ordering::Acquire);
    if st == 0 {
        return None;
    }
    let mut b = [0u8; CR_SIZE];
    // SAFETY: as above; the acquire load orders the rest of the record.
    unsafe { std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), CR_SIZE) };
    Some(CompletionRecord::from_bytes(&b))
}

fn alloc_buffer(inner: &Arc<Inner>, len: usize) -> Result<Buffer> {
    let len = len.max(1).div_ceil(4096) * 4096;
    let setup = |what| move |source| ClientError::Setup { what, source };
    let fd = shm::memfd("sva-buffer", len as u64).map_err(setup("memfd"))?;
    // Sealed against shrinking: the device refuses memory that could vanish.
    shm::add_seals(fd.as_fd(), libc::F_SEAL_SHRINK).map_err(setup("memfd seals"))?;
    let map = SharedMap::map(fd.as_fd(), 0, len, true).map_err(setup("buffer mapping"))?;
    let b = Buffer {
        inner: inner.clone(),
        map,
        fd,
        registered: AtomicBool::new(false),
        registered_len: AtomicU64::new(0),
    };
    if let Ok(mut r) = inner.regions.write() {
        r.push((b.addr(), len as u64));
    }
    Ok(b)
}

fn fault_loop(inner: &Inner, mut ch: FaultChannel, mut handler: Option<FaultHandler>) {
    let mut batch = FaultBatch::with_capacity(64);
    let mut responses = Vec::new();
    while !inner.stop.load(Ordering::SeqCst) {
        batch.clear();
        match ch.respond_and_recv(
            &responses,
            &mut batch,
            Wait::Timeout(Duration::from_millis(50)),
        ) {
            Ok(_) => {}
            Err(ioasis::uring::ChannelError::Closed) => return,
            Err(e) => {
                log::warn!("fault channel: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        responses.clear();
        let mut ok = true;
        for r in &batch.records {
            inner.stats.faults.fetch_add(1, Ordering::Relaxed);
            let f = Fault {
                addr: r.addr,
                write: r.perm.bits() & FAULT_PERM_WRITE != 0,
                pasid: r.pasid,
            };
            let act = handler.as_mut().map_or(FaultAction::Fail, |h| h(&f));
            ok &= act == FaultAction::Retry;
            if r.is_last() {
                if ok {
                    inner.stats.faults_retried.fetch_add(1, Ordering::Relaxed);
                    responses.push(PageResponse::success(r.cookie));
                } else {
                    responses.push(PageResponse::invalid(r.cookie));
                }
                ok = true;
            }
        }
        if !responses.is_empty() {
            if let Err(e) = ch.respond(&responses) {
                log::warn!("fault responses: {e}");
            }
            responses.clear();
        }
    }
}

/// Builders of library descriptors (completion address filled at submit).
pub mod ops {
    use crate::desc::{opcode, Descriptor};

    /// Memory move.
    pub fn mem_move(dst: u64, src: u64, len: u32) -> Descriptor {
        let mut d = Descriptor::new(opcode::MEMMOVE, 0);
        d.src = src;
        d.dst = dst;
        d.xfer_size = len;
        d
    }
    /// Fill.
    pub fn fill(dst: u64, pattern: u64, len: u32) -> Descriptor {
        let mut d = Descriptor::new(opcode::MEMFILL, 0);
        d.src = pattern;
        d.dst = dst;
        d.xfer_size = len;
        d
    }
    /// Compare.
    pub fn compare(a: u64, b: u64, len: u32) -> Descriptor {
        let mut d = Descriptor::new(opcode::COMPARE, 0);
        d.src = a;
        d.dst = b;
        d.xfer_size = len;
        d
    }
    /// Compare with a pattern.
    pub fn compare_pattern(src: u64, pattern: u64, len: u32) -> Descriptor {
        let mut d = Descriptor::new(opcode::COMPVAL, 0);
        d.src = src;
        d.dst = pattern;
        d.xfer_size = len;
        d
    }
    /// CRC-32C.
    pub fn crc(src: u64, len: u32, seed: u32) -> Descriptor {
        let mut d = Descriptor::new(opcode::CRCGEN, 0);
        d.src = src;
        d.xfer_size = len;
        d.set_op_u32(0, seed);
        d
    }
    /// Copy with CRC-32C.
    pub fn copy_crc(dst: u64, src: u64, len: u32, seed: u32) -> Descriptor {
        let mut d = crc(src, len, seed);
        d.opcode = opcode::COPY_CRC;
        d.dst = dst;
        d
    }
    /// Dualcast.
    pub fn dualcast(dst1: u64, dst2: u64, src: u64, len: u32) -> Descriptor {
        let mut d = Descriptor::new(opcode::DUALCAST, 0);
        d.src = src;
        d.dst = dst1;
        d.xfer_size = len;
        d.set_op_u64(0, dst2);
        d
    }
    /// Create a delta record.
    pub fn create_delta(a: u64, b: u64, len: u32, delta: u64, max: u32) -> Descriptor {
        let mut d = Descriptor::new(opcode::CR_DELTA, 0);
        d.src = a;
        d.dst = b;
        d.xfer_size = len;
        d.set_op_u64(0, delta);
        d.set_op_u32(8, max);
        d
    }
    /// Apply a delta record.
    pub fn apply_delta(dst: u64, len: u32, delta: u64, delta_size: u32) -> Descriptor {
        let mut d = Descriptor::new(opcode::AP_DELTA, 0);
        d.src = delta;
        d.dst = dst;
        d.xfer_size = len;
        d.set_op_u32(0, delta_size);
        d
    }
    /// Cache flush.
    pub fn cache_flush(dst: u64, len: u32) -> Descriptor {
        let mut d = Descriptor::new(opcode::CFLUSH, 0);
        d.dst = dst;
        d.xfer_size = len;
        d
    }
}

/// A batch under construction. Members get a completion record slot each
/// (written only when they fail: CRAV without RCR); a one-member batch is
/// padded with a NOOP because the device needs at least two.
#[derive(Debug)]
pub struct Batch<'c> {
    client: &'c Client,
    list: Buffer,
    crs: Buffer,
    descs: Vec<Descriptor>,
    capacity: usize,
    fence_next: bool,
    /// The list in memory matches `descs` (resubmission skips rewriting it,
    /// so the device reads lines it already caches).
    written: bool,
    /// The member record area is all zero.
    crs_zero: std::cell::Cell<bool>,
}

/// The outcome of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchResult {
    /// The batch's record (`bytes_completed` = members completed).
    pub record: CompletionRecord,
    /// Each member's record; status 0 means it succeeded (no record) or was
    /// abandoned after a fence.
    pub members: Vec<CompletionRecord>,
}

impl<'c> Batch<'c> {
    /// Adds a descriptor (its completion address is replaced by the
    /// member's slot).
    pub fn push(&mut self, mut d: Descriptor) -> &mut Self {
        if self.descs.len() >= self.capacity {
            log::warn!("batch full ({} members), descriptor dropped", self.capacity);
            return self;
        }
        let i = self.descs.len();
        d.flags |= flags::CRAV;
        if self.client.inner.block_on_fault {
            d.flags |= flags::BOF;
        }
        if std::mem::take(&mut self.fence_next) {
            d.flags |= flags::FENCE;
        }
        d.completion_addr = self.crs.at(i * CR_SIZE);
        self.descs.push(d);
        self.written = false;
        self
    }

    /// The next member waits for every earlier one (and is abandoned, with
    /// the rest, if one of them failed).
    pub fn fence(&mut self) -> &mut Self {
        self.fence_next = true;
        self
    }

    /// Adds a memory move.
    pub fn mem_move(&mut self, dst: u64, src: u64, len: u32) -> &mut Self {
        self.push(ops::mem_move(dst, src, len))
    }

    /// Adds a fill.
    pub fn fill(&mut self, dst: u64, pattern: u64, len: u32) -> &mut Self {
        self.push(ops::fill(dst, pattern, len))
    }

    /// Adds a compare.
    pub fn compare(&mut self, a: u64, b: u64, len: u32) -> &mut Self {
        self.push(ops::compare(a, b, len))
    }

    /// Adds a CRC.
    pub fn crc(&mut self, src: u64, len: u32, seed: u32) -> &mut Self {
        self.push(ops::crc(src, len, seed))
    }

    /// Adds a NOOP.
    pub fn noop(&mut self) -> &mut Self {
        self.push(Descriptor::new(opcode::NOOP, 0))
    }

    /// Members so far.
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// Removes every member (the builder and its memory are reused).
    pub fn clear(&mut self) {
        self.descs.clear();
        self.fence_next = false;
        self.written = false;
    }

    /// Device address of the descriptor list.
    pub fn list_addr(&self) -> u64 {
        self.list.addr()
    }

    /// Writes the list and submits the batch descriptor.
    pub fn submit(&mut self) -> Result<BatchHandle<'_, 'c>> {
        if self.descs.len() == 1 {
            self.noop();
        }
        let n = self.descs.len();
        if !self.written {
            for (i, d) in self.descs.iter().enumerate() {
                self.list.write(i * DESC_SIZE, &d.to_bytes());
            }
            self.written = true;
        }
        if !self.crs_zero.get() {
            self.crs.write(0, &vec![0u8; self.capacity * CR_SIZE]);
        }
        // Until a wait finds them untouched, the device may write them.
        self.crs_zero.set(false);
        let mut b = Descriptor::new(opcode::BATCH, 0);
        b.src = self.list.addr();
        b.xfer_size = n as u32;
        let h = self.client.submit(b)?;
        Ok(BatchHandle { batch: self, h })
    }
}

/// A batch in flight.
#[derive(Debug)]
pub struct BatchHandle<'b, 'c> {
    batch: &'b Batch<'c>,
    h: Handle<'c>,
}

impl BatchHandle<'_, '_> {
    /// Member `i`'s record, if the device wrote it (no wait): a member
    /// writes one on failure, and on success too when it asked for one
    /// (`flags::RCR`).
    pub fn poll_member(&self, i: usize) -> Option<CompletionRecord> {
        if i >= self.batch.descs.len() {
            return None;
        }
        self.batch
            .client
            .read_record(self.batch.crs.at(i * CR_SIZE))
    }

    /// Waits for the batch and collects the member records.
    pub fn wait(self) -> Result<BatchResult> {
        let record = self.h.wait()?;
        let n = self.batch.descs.len();
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let mut b = [0u8; CR_SIZE];
            self.batch.crs.read(i * CR_SIZE, &mut b);
            members.push(CompletionRecord::from_bytes(&b));
        }
        if members.iter().all(|m| m.status == 0) {
            self.batch.crs_zero.set(true);
        }
        Ok(BatchResult { record, members })
    }
}
