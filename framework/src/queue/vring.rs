//! The per-queue state shared between the connection thread (which sets
//! it up from the frontend's messages) and the worker (which serves it
//! through a [`Queue`](super::Queue)), and why a queue is parked.

use std::collections::VecDeque;

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::inflight::InflightQueue;

use crate::dma::Access;
use crate::transport::Signals;

/// Why a queue is parked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Parked {
    /// The I/O address that missed.
    pub iova: u64,
    /// The access that missed.
    pub access: Access,
    /// Whether the miss was reported to the frontend yet.
    pub reported: bool,
}

/// Most chains behind a parked one whose buffers are checked for misses.
pub(crate) const LOOK_AHEAD_CHAINS: u16 = 16;
/// Most misses of the chains behind a parked one kept for the worker to
/// report.
pub(crate) const LOOK_AHEAD_MISSES: usize = 16;

/// Per-queue state shared between the connection thread and the worker.
#[derive(Debug)]
pub(crate) struct Vring {
    pub q: virtio_queue::Queue,
    /// The eventfd the driver's kicks arrive on (installed by the transport).
    pub kick: Option<EventFd>,
    /// Bumped whenever `kick` is set or cleared, so that a worker re-reads
    /// it only when it changed.
    pub kick_gen: u64,
    /// The driver's call and error eventfds, for transports that signal
    /// through them.
    pub signals: Signals,
    /// SET_VRING_ENABLE state.
    pub enabled: bool,
    /// Started by the frontend (kick received) and not stopped by GET_VRING_BASE.
    pub started: bool,
    /// Waiting for the frontend to map an address.
    pub parked: Option<Parked>,
    /// When parked: addresses the chains behind the one that missed will
    /// miss too (one per page, at most [`LOOK_AHEAD_MISSES`]), found when it
    /// parked, for the worker to report along with the miss (so that the
    /// frontend answers them one after another instead of one per round trip
    /// through the worker). Taken by the worker when it reports.
    pub ahead: Vec<(u64, Access)>,
    /// A non-recoverable error hit this queue; it stays stopped until reset.
    pub broken: bool,
    /// Chains completed with an error status (counted, rate-limited warnings).
    pub errors: u64,
    /// Used elements added since the driver was last notified (or asked
    /// not to be); saturates, and a large count always notifies.
    pub num_added: u16,
    /// `VIRTIO_F_IN_ORDER` was negotiated: buffers are used in the order
    /// they were made available, and a batch of them may be completed with
    /// one used element (see [`Queue::add_used_batch`](super::Queue::add_used_batch)).
    pub in_order: bool,
    /// Inflight tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`), when the
    /// frontend gave a region.
    pub inflight: Option<InflightQueue>,
    /// Heads recorded in flight by an earlier instance, to pop before any
    /// new chain, oldest first.
    pub resubmit: VecDeque<u16>,
    /// Heads popped by the queue handle now held, in order, and whether
    /// each came from `resubmit` (what [`Queue::unpop`](super::Queue::unpop)
    /// gives back); kept only with inflight tracking.
    pub tail: Vec<(u16, bool)>,
    /// The frontend's dirty log while it migrates the guest (`None`:
    /// logging off): completions and used-ring writes are recorded there.
    pub log: Option<std::sync::Arc<crate::dirty_log::DirtyLog>>,
    /// `VIRTIO_F_RING_PACKED` was negotiated: the ring is packed and this
    /// is its device state (the addresses in `q` are then the descriptor
    /// ring, the driver area and the device area).
    pub packed: Option<super::packed::PackedState>,
    /// Inflight tracking of a packed ring (the region's packed layout).
    pub packed_inflight: Option<super::packed::inflight::PackedInflight>,
}

impl Vring {
    /// A stopped queue; `None` if `max_size` is not a power of two in
    /// `1..=MAX_QUEUE_SIZE`.
    pub fn new(max_size: u16) -> Option<Self> {
        let q = virtio_queue::Queue::new(max_size).ok()?;
        Some(Vring {
            q,
            kick: None,
            kick_gen: 0,
            signals: Signals::default(),
            enabled: false,
            started: false,
            parked: None,
            ahead: Vec::new(),
            broken: false,
            errors: 0,
            num_added: 0,
            in_order: false,
            inflight: None,
            resubmit: VecDeque::new(),
            tail: Vec::new(),
            log: None,
            packed: None,
            packed_inflight: None,
        })
    }

    /// True when a worker may process this queue.
    pub fn serving(&self) -> bool {
        self.started && self.enabled && self.parked.is_none() && !self.broken && self.q.ready()
    }
}
