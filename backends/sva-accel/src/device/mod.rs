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
//!
//! Files, one concept each: this one holds the device and its state (the
//! shared state, a client's context); [`config`](DeviceConfig) its
//! configuration; `service` its `/dev/iommu` service and binding;
//! `connections` what the control sockets mean; `worker` the worker threads
//! and their turns; `pass` one unit of work of a client; `ready` a client's
//! waiting work (parked, ready, held); `retire` work queue slots and
//! retirement; `events` records not written; `abort` a departing client's
//! outstanding work.

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
use nix::sys::socket::SockType;
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

mod abort;
mod config;
mod connections;
mod events;
mod pass;
mod ready;
mod retire;
mod service;
mod worker;

use abort::*;
pub use config::{
    DeviceConfig, DEFAULT_FAULTS_PER_CLIENT, DEFAULT_PRIORITY, MAX_FAULTS_PER_CLIENT,
};
use connections::*;
use events::*;
pub use pass::WORK_UNIT;
use pass::*;
use ready::*;
use retire::*;
use service::*;
pub use service::{
    hw_info, serve_iommu, serve_iommu_with, serve_iommu_with_policy, IommuBinding, DEFAULT_LABEL,
};
use worker::*;

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
    completion_efd: EventFd,
    /// This client's doorbell (each client its own, so that one client
    /// draining its eventfd cannot swallow another's wake-ups).
    doorbell_efd: EventFd,
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
    doorbell: EventFd,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    occupancy: AtomicU64,
    dedicated_in_use: AtomicUsize,
    /// The `/dev/iommu` service binding every access translates through.
    iommu: IommuBinding,
    fault_answered: AtomicBool,
    /// Index (in the client list) of the client whose turn it is.
    turn: AtomicUsize,
    /// Units of work that client ran in its turn so far.
    turn_used: AtomicU32,
    /// Connected clients (for the per-client share of the work queue).
    n_clients: AtomicUsize,
}

/// A running device: workers plus (optionally) a listening socket.
#[derive(Debug)]
pub struct Accelerator {
    shared: Arc<Shared>,
    control: Arc<Control>,
    threads: Vec<JoinHandle<()>>,
}

impl Accelerator {
    /// Starts the workers of the device `iommu` binds to a `/dev/iommu`
    /// service: clients bind a PASID they attached through that service,
    /// and every access is translated by iommu-core for (device, PASID).
    pub fn start_with(cfg: DeviceConfig, iommu: IommuBinding) -> Result<Accelerator> {
        cfg.check()?;
        let doorbell = shm::new_eventfd().map_err(|source| DeviceError::Fd {
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
        {
            let b = &shared.iommu;
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
                    shm::signal(&s.doorbell);
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
        Ok(Accelerator {
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

    /// [`Accelerator::listen`] with the socket file's mode and group from
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
        shm::signal(&self.shared.doorbell);
        self.control.wake();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Accelerator {
    fn drop(&mut self) {
        self.stop();
    }
}
