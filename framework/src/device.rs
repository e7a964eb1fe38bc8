//! The device trait backend authors implement.
//!
//! A device is split in two, like a real virtio device:
//!
//! - [`Device`]: the control plane. It describes the device (virtio device
//!   type, features, config space, queue count and sizes, threading) and is
//!   called from the connection thread while the frontend negotiates. It is
//!   shared (`Send + Sync`) and takes `&self`.
//! - [`Worker`]: the data plane of one worker thread. When the frontend starts
//!   the queues, the framework asks the device for one worker per thread
//!   ([`Device::worker`]), moves it to its thread and calls it there with
//!   `&mut self`, so per-thread state (scratch buffers, a tap fd, counters)
//!   needs no lock. Which queues a thread serves is the device's choice
//!   ([`Device::queues_per_thread`]).
//!
//! Everything a worker touches in frontend memory goes through the queue handle
//! ([`Queue`]) or the DMA handle ([`Dma`]) it hands out: both
//! translate every access through the device's I/O address space, so a device
//! can never read or write memory the frontend did not map for it. A
//! translation miss surfaces as a [`DmaError`]; returning it (for example with
//! `?`) parks the queue until the frontend supplies the mapping, and the chain
//! that was being popped is offered again afterwards: nothing is lost.
//!
//! # Lifecycle
//!
//! - **Config space.** The framework offers `VHOST_USER_PROTOCOL_F_CONFIG`
//!   exactly when [`Device::config_size`] is not 0; GET_CONFIG and
//!   SET_CONFIG then reach [`Device::read_config`] / [`Device::write_config`]
//!   with the range already checked against it
//!   ([`crate::config_space::ConfigSpace`] serves a `#[repr(C)]` struct).
//!   A device whose space changes under the driver (a disk resized)
//!   updates it and calls the
//!   [`ConfigNotifier`](crate::config_space::ConfigNotifier) of
//!   [`Server::config_notifier`](crate::server::Server::config_notifier),
//!   which tells the driver through the transport.
//! - **When workers start.** All of a device's worker threads (one per
//!   mask of [`Device::queues_per_thread`]) are built and started together
//!   when the frontend starts the first ring (its SET_VRING_KICK), with the
//!   features of the SET_FEATURES before it
//!   ([`crate::context::WorkerContext`]); a ring started later wakes them.
//!   They are stopped and dropped when every ring was stopped
//!   (GET_VRING_BASE), on RESET_DEVICE / RESET_OWNER and when the frontend
//!   disconnects. A ring that stops, or the end of a worker, waits
//!   (bounded) for the chains a worker has in flight ([`Worker::in_flight`]).
//! - **A malformed chain.** A chain the queue layer cannot walk (a
//!   descriptor index out of range, a loop or a chain longer than the
//!   queue, a bad indirect table, a buffer outside the memory table) is
//!   completed with length 0 by the queue itself: [`Queue::pop`] returns
//!   [`QueueError::BadChain`], the queue counts it, warns (rate-limited)
//!   and goes on with the next chain; the device is not involved. An avail
//!   index that runs ahead of the ring by more than its size, or a buffer
//!   the frontend maps without the access it needs, marks the queue failed:
//!   it stops until the device is reset and the driver is told (the ring's
//!   error eventfd, `NEEDS_RESET` in GET_STATUS). A chain whose layout is
//!   wrong for the device (a short header, say) is the device's to answer,
//!   with its own error status (vdpa-blk: `VIRTIO_BLK_S_IOERR`).
//!
//! # Writing a device
//!
//! ```
//! use ioasis::device::{Device, DeviceError, Queues, Worker};
//! use ioasis::queue::Chain;
//!
//! /// A device whose single queue echoes nothing: it completes every chain
//! /// with zero bytes written.
//! struct Null;
//!
//! impl Device for Null {
//!     fn device_type(&self) -> u32 { 0x1f }
//!     fn features(&self) -> u64 { 0 }
//!     fn num_queues(&self) -> usize { 1 }
//!     fn max_queue_size(&self) -> u16 { 256 }
//!     fn worker(&self, _thread: usize) -> Result<Box<dyn Worker>, DeviceError> {
//!         Ok(Box::new(NullWorker { chain: Chain::new() }))
//!     }
//! }
//!
//! struct NullWorker { chain: Chain }
//!
//! impl Worker for NullWorker {
//!     fn process_queue(&mut self, index: u16, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
//!         let Some(mut queue) = queues.get(index) else { return Ok(()) };
//!         while queue.pop(&mut self.chain)? {
//!             queue.add_used(self.chain.head(), 0)?;
//!         }
//!         queue.notify()?;
//!         Ok(())
//!     }
//! }
//! ```

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use crate::epoll::{self, CtlOp, Epoll, EpollFlags};

pub use crate::context::{Waker, WorkerContext};
pub use crate::dma::{Dma, DmaError};
pub use crate::queue::{Chain, Queue, QueueError, Queues};

/// Errors a device or worker reports to the framework.
///
/// The framework decides what to do with each one through
/// [`DeviceError::is_translation_miss`] and [`DeviceError::needs_reset`]: a
/// translation miss parks the queue until the mapping arrives; anything else is
/// logged, counted and marks the device as needing a reset. No error ever ends
/// the process or silently stops a queue.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device does not implement an optional capability.
    #[error("Operation not supported by the device: {0}")]
    Unsupported(&'static str),
    /// A queue operation failed.
    #[error("Queue operation failed")]
    Queue(#[from] QueueError),
    /// A DMA access outside a queue failed.
    #[error("DMA access failed")]
    Dma(#[from] DmaError),
    /// A config space access was out of range.
    #[error("Config space access out of range: offset {offset}, length {len}")]
    ConfigRange {
        /// Offset into the config space.
        offset: u32,
        /// Length of the access.
        len: usize,
    },
    /// The device rejected the features the driver acknowledged.
    #[error("Features {0:#x} rejected by the device")]
    Features(u64),
    /// An I/O operation of the device's own failed.
    #[error("Device I/O failed: {op}")]
    Io {
        /// What the device was doing.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A device-specific failure.
    #[error("Device failure: {0}")]
    Other(String),
}

impl DeviceError {
    /// The DMA error behind this error, if any.
    pub fn dma_error(&self) -> Option<&DmaError> {
        match self {
            DeviceError::Dma(e) => Some(e),
            DeviceError::Queue(q) => q.dma_error(),
            DeviceError::Unsupported(_)
            | DeviceError::ConfigRange { .. }
            | DeviceError::Features(_)
            | DeviceError::Io { .. }
            | DeviceError::Other(_) => None,
        }
    }

    /// True when the error is an I/O translation miss that the frontend can
    /// resolve by supplying a mapping: the queue is parked, not failed.
    pub fn is_translation_miss(&self) -> bool {
        self.dma_error().is_some_and(DmaError::is_miss)
    }

    /// True when the error leaves the device in a state the driver must reset.
    pub fn needs_reset(&self) -> bool {
        match self {
            DeviceError::Unsupported(_) | DeviceError::ConfigRange { .. } => false,
            DeviceError::Features(_) => false,
            DeviceError::Queue(_) | DeviceError::Dma(_) => !self.is_translation_miss(),
            DeviceError::Io { .. } | DeviceError::Other(_) => true,
        }
    }
}

/// Result of device operations.
pub type Result<T> = std::result::Result<T, DeviceError>;

/// A virtio device served by the framework: the control plane.
///
/// Required: what the device is ([`device_type`](Device::device_type),
/// [`features`](Device::features), [`num_queues`](Device::num_queues),
/// [`max_queue_size`](Device::max_queue_size)) and how its data plane is built
/// ([`worker`](Device::worker)). Everything else has a default that either does
/// nothing or answers "unsupported".
///
/// The framework adds the transport features itself (`VIRTIO_F_VERSION_1`,
/// `VIRTIO_F_ACCESS_PLATFORM`, `VIRTIO_RING_F_EVENT_IDX`,
/// `VIRTIO_RING_F_INDIRECT_DESC` and the vhost-user protocol feature bit);
/// [`features`](Device::features) returns the device-specific bits and any
/// transport bit the device wants offered beyond those.
pub trait Device: Send + Sync + 'static {
    /// The virtio device type (`VIRTIO_ID_*`, e.g. 1 for net, 4 for rng).
    fn device_type(&self) -> u32;

    /// Device feature bits offered to the driver.
    fn features(&self) -> u64;

    /// Number of virtqueues the device has.
    fn num_queues(&self) -> usize;

    /// Largest queue size the device accepts (a power of two, at most 32768).
    fn max_queue_size(&self) -> u16;

    /// Builds the data plane of worker thread `thread` (an index into
    /// [`queues_per_thread`](Device::queues_per_thread)). Called when the
    /// frontend starts the device; the worker is dropped when the frontend
    /// stops it, resets it or disconnects.
    fn worker(&self, thread: usize) -> Result<Box<dyn Worker>>;

    /// Size of the device's config space in bytes (0: none).
    fn config_size(&self) -> u32 {
        0
    }

    /// Reads `data.len()` bytes of config space at `offset`. The framework
    /// has already checked that the range lies within
    /// [`config_size`](Device::config_size).
    fn read_config(&self, offset: u32, data: &mut [u8]) -> Result<()> {
        let _ = (offset, data);
        Err(DeviceError::Unsupported("config space read"))
    }

    /// Writes config space (range already checked).
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<()> {
        let _ = (offset, data);
        Err(DeviceError::Unsupported("config space write"))
    }

    /// The driver acknowledged `features` (a subset of what was offered, with
    /// transport bits included). The device may reject a combination.
    fn set_features(&self, features: u64) -> Result<()> {
        let _ = features;
        Ok(())
    }

    /// Which queues each worker thread serves: one bit mask per thread, bit
    /// `i` for queue `i`. The default is one thread serving every queue. Every
    /// queue must appear in exactly one mask; masks beyond 64 queues are not
    /// supported.
    fn queues_per_thread(&self) -> Vec<u64> {
        let n = self.num_queues().min(64);
        let mask = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        vec![mask]
    }

    /// The CPUs worker thread `thread` runs on: the framework restricts the
    /// thread to them before [`Worker::init`]. `None`, the default: no
    /// restriction. Only the workers are pinned; the connection thread that
    /// answers the frontend stays free to run elsewhere (see
    /// [`crate::affinity`]).
    fn worker_cpus(&self, thread: usize) -> Option<Vec<usize>> {
        let _ = thread;
        None
    }

    /// Resets device state (the frontend reset the device, or disconnected).
    /// Workers have already been dropped when this is called.
    fn reset(&self) {}

    /// Whether the device wants inflight I/O tracking: the framework then
    /// offers `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, records in the region
    /// the frontend shares which chains each queue popped and did not
    /// complete, and after a restart of the backend on the same socket
    /// resubmits them (their chains come first out of [`Queue::pop`]).
    /// Right for a device whose requests can be done twice without harm
    /// (block I/O); the default is no.
    fn inflight_tracking(&self) -> bool {
        false
    }

    /// The driver wrote the virtio device status (vhost-user `SET_STATUS`,
    /// VDUSE's `SET_STATUS` request).
    fn set_status(&self, status: u8) {
        let _ = status;
    }

    /// The transport the device is served over, said once when the server
    /// takes the device ([`Server::add_device`](crate::server::Server::add_device),
    /// [`Server::add_vduse_device`](crate::server::Server::add_vduse_device)),
    /// before the framework asks for its features, queues or config space.
    /// A device leaves out there what a transport refuses (VDUSE: a net
    /// device's control queue). The default ignores it.
    fn set_transport(&self, transport: TransportKind) {
        let _ = transport;
    }
}

/// Which transport a device is served over ([`Device::set_transport`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// vhost-user: a frontend (QEMU, DPDK virtio-user) on a unix socket.
    VhostUser,
    /// VDUSE: a vDPA device of the kernel ([`crate::vduse`]).
    Vduse,
}

/// The data plane of one worker thread, built by [`Device::worker`].
///
/// All methods run on the worker thread, inside a DMA access section: host
/// memory behind the translations a method obtains stays valid until it
/// returns, and an unmap issued meanwhile waits for it. A method must
/// therefore not block for long (no waiting on other threads or sockets).
pub trait Worker: Send {
    /// Called once on the worker thread before anything else: register the
    /// device's own event sources (for example a tap fd) with `events`.
    fn init(&mut self, events: &mut EventRegistrar<'_>) -> Result<()> {
        let _ = events;
        Ok(())
    }

    /// The driver kicked queue `index` (or the framework resumed it after a
    /// translation miss was resolved). Pop chains, process them and complete
    /// every popped head exactly once.
    ///
    /// The robust shape (it also handles `VIRTIO_RING_F_EVENT_IDX`, which
    /// the framework offers): `disable_notification`, pop until empty,
    /// `notify`, and go round again while `enable_notification` reports that
    /// the driver added chains meanwhile; `examples/backend-template` has it.
    /// Returning a translation miss (with `?`) parks the queue; the framework
    /// calls again once the mapping exists.
    fn process_queue(&mut self, index: u16, queues: &mut Queues<'_>) -> Result<()>;

    /// An event source registered in [`init`](Worker::init) with `token`
    /// became ready.
    ///
    /// Sources are level-triggered: a device that cannot consume what is
    /// ready (no buffers on its queue, say) should stop watching the source
    /// through an [`EventHandle`] kept from `init` and watch it again from
    /// [`process_queue`](Worker::process_queue) once the driver adds buffers,
    /// rather than leave it ready and make the thread spin.
    fn handle_event(&mut self, token: u64, queues: &mut Queues<'_>) -> Result<()> {
        let _ = (token, queues);
        Err(DeviceError::Unsupported("device event sources"))
    }

    /// The thread has handled every event that was ready and is about to
    /// block until the next one (a kick, one of the device's event sources,
    /// the framework's own control). Called after every round of events
    /// (and once after the thread starts), in its own access section.
    ///
    /// This is where a device that polls decides whether to keep polling:
    ///
    /// - [`Idle::Sleep`] (the default): the thread blocks. The device must
    ///   have re-enabled the notifications it suppressed
    ///   ([`Queue::enable_notification`], processing what it reports), or
    ///   a driver that was told not to kick is not heard.
    /// - [`Idle::Poll`]: the thread looks for ready events without blocking,
    ///   handles them, and calls `before_sleep` again. The access section
    ///   ends between two calls, and control (a ring's stop or final pass,
    ///   the worker's exit, an unmap waiting for the section) is served as
    ///   in any round, so a device may poll for as long as it likes; each
    ///   call should still end within a millisecond or so, like every
    ///   method that holds a section.
    ///
    /// A polling window that follows the load (poll after work for a while,
    /// then re-arm notifications and sleep) is built on this hook: the
    /// device keeps a [`crate::poll::AdaptiveWindow`], shows it at each
    /// call whether the polls found work, and answers what it says
    /// (`tests/vhost_adaptive_poll.rs` has such a worker; vdpa-net's
    /// default mode is one).
    fn before_sleep(&mut self, queues: &mut Queues<'_>) -> Result<Idle> {
        let _ = queues;
        Ok(Idle::Sleep)
    }

    /// Chains this worker has deferred ([`Queue::defer`]) and not finished
    /// yet: I/O in flight. When a ring stops or the worker ends, the
    /// framework waits (bounded) for this to reach 0, dispatching the
    /// device's events meanwhile. The default (0) is right for a device
    /// that completes every chain within the call that popped it.
    fn in_flight(&self) -> usize {
        0
    }

    /// An invalidation of the device's address space waits for the I/O
    /// this worker has in flight (its deferred chains are pinned, see
    /// [`crate::queue::InFlight`]): finish or cancel it soon, and start no
    /// new I/O while [`Dma::drain_requested`] is true. Called on the worker
    /// thread, in an access section, when the invalidation nudges the
    /// thread. The default does nothing: the I/O completes on its own and
    /// the invalidation waits that long.
    fn drain(&mut self, queues: &mut Queues<'_>) -> Result<()> {
        let _ = queues;
        Ok(())
    }
}

/// What a worker thread does after [`Worker::before_sleep`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idle {
    /// Block until the next event.
    Sleep,
    /// Keep polling: handle what is ready without blocking, then call
    /// [`Worker::before_sleep`] again.
    Poll,
}

/// Which readiness a device event source waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interest {
    /// Readable (`EPOLLIN`).
    Readable,
    /// Writable (`EPOLLOUT`).
    Writable,
    /// Either.
    Both,
}

impl Interest {
    pub(crate) fn epoll_flags(self) -> EpollFlags {
        match self {
            Interest::Readable => EpollFlags::EPOLLIN,
            Interest::Writable => EpollFlags::EPOLLOUT,
            Interest::Both => EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT,
        }
    }
}

/// Largest token a device may use for its own event sources.
pub const MAX_DEVICE_TOKEN: u64 = (1 << 48) - 1;

/// Bit marking a device-owned token in a worker thread's epoll set (the
/// framework's own tokens never have it).
const DEVICE_BIT: u64 = 1 << 63;

/// Tags a device-owned event token for the worker thread's epoll set.
fn device_token(token: u64) -> u64 {
    token | DEVICE_BIT
}

/// The device's token behind an epoll token, if the event source is the
/// device's (registered through an [`EventRegistrar`]).
pub(crate) fn device_token_of(epoll_token: u64) -> Option<u64> {
    (epoll_token & DEVICE_BIT != 0).then_some(epoll_token & !DEVICE_BIT)
}

/// An owned handle to a worker thread's event loop, obtained from
/// [`EventRegistrar::handle`]; same operations as the registrar.
#[derive(Debug)]
pub struct EventHandle {
    epoll: Epoll,
}

impl EventHandle {
    fn registrar(&self) -> EventRegistrar<'_> {
        EventRegistrar {
            epoll: &self.epoll,
            thread: usize::MAX,
            context: None,
        }
    }

    /// See [`EventRegistrar::add`].
    pub fn add(&self, fd: &impl AsRawFd, interest: Interest, token: u64) -> io::Result<()> {
        self.registrar().add(fd, interest, token)
    }

    /// See [`EventRegistrar::modify`].
    pub fn modify(&self, fd: &impl AsRawFd, interest: Interest, token: u64) -> io::Result<()> {
        self.registrar().modify(fd, interest, token)
    }

    /// See [`EventRegistrar::remove`].
    pub fn remove(&self, fd: &impl AsRawFd) -> io::Result<()> {
        self.registrar().remove(fd)
    }
}

/// Registers a device's own event sources on its worker thread's event loop.
#[derive(Debug)]
pub struct EventRegistrar<'a> {
    pub(crate) epoll: &'a Epoll,
    pub(crate) thread: usize,
    pub(crate) context: Option<&'a WorkerContext>,
}

impl EventRegistrar<'_> {
    /// The worker thread's index.
    pub fn thread(&self) -> usize {
        self.thread
    }

    /// The worker's context (negotiated features, queues, a waker), in
    /// [`Worker::init`] on a worker thread (`None` from an
    /// [`EventHandle`]).
    pub fn context(&self) -> Option<&WorkerContext> {
        self.context
    }

    /// An owned handle to the same event loop, for changing registrations
    /// later (from [`Worker::handle_event`] or [`Worker::process_queue`]).
    pub fn handle(&self) -> io::Result<EventHandle> {
        Ok(EventHandle {
            epoll: Epoll(self.epoll.0.try_clone()?),
        })
    }

    /// Watches `fd` for `interest` (level-triggered); readiness calls
    /// [`Worker::handle_event`] with `token` (at most [`MAX_DEVICE_TOKEN`]).
    /// The fd must stay open until the worker is dropped.
    pub fn add(&mut self, fd: &impl AsRawFd, interest: Interest, token: u64) -> io::Result<()> {
        self.ctl(CtlOp::Add, fd.as_raw_fd(), interest, token)
    }

    /// Changes the interest of a registered fd.
    pub fn modify(&mut self, fd: &impl AsRawFd, interest: Interest, token: u64) -> io::Result<()> {
        self.ctl(CtlOp::Modify, fd.as_raw_fd(), interest, token)
    }

    /// Stops watching `fd`.
    pub fn remove(&mut self, fd: &impl AsRawFd) -> io::Result<()> {
        epoll::ctl_raw(
            self.epoll,
            CtlOp::Delete,
            fd.as_raw_fd(),
            EpollFlags::empty(),
            0,
        )
    }

    fn ctl(&mut self, op: CtlOp, fd: RawFd, interest: Interest, token: u64) -> io::Result<()> {
        if token > MAX_DEVICE_TOKEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("device event token {token:#x} above {MAX_DEVICE_TOKEN:#x}"),
            ));
        }
        epoll::ctl_raw(
            self.epoll,
            op,
            fd,
            interest.epoll_flags(),
            device_token(token),
        )
    }
}
