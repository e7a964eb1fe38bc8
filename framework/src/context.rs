//! What a worker knows of its device and connection when it starts
//! ([`WorkerContext`], from [`EventRegistrar::context`] in
//! [`Worker::init`]): the negotiated features, the device's queue count and
//! the queues this thread serves, and a [`Waker`] that makes the thread
//! process its queues again from another thread (a completion thread, a
//! timer). Event sources of the device's own (an io_uring's completion
//! eventfd, a tap fd) are registered with the
//! [`EventRegistrar`] itself.
//!
//! [`EventRegistrar`]: crate::device::EventRegistrar
//! [`EventRegistrar::context`]: crate::device::EventRegistrar::context
//! [`Worker::init`]: crate::device::Worker::init

use std::sync::Arc;

/// Wakes a worker thread from anywhere: the thread then runs
/// [`Worker::process_queue`](crate::device::Worker::process_queue) on each
/// of its running queues (and serves any drain an unmap asked for).
/// Cheap to clone; waking a thread that has ended does nothing.
#[derive(Clone)]
pub struct Waker(pub(crate) Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waker")
    }
}

impl Waker {
    /// Wakes the thread (an eventfd write; never blocks).
    pub fn wake(&self) {
        (self.0)()
    }
}

/// A worker thread's view of its device and connection when it starts.
#[derive(Clone, Debug)]
pub struct WorkerContext {
    pub(crate) thread: usize,
    pub(crate) features: u64,
    pub(crate) num_queues: usize,
    pub(crate) queues: Vec<u16>,
    pub(crate) waker: Waker,
}

impl WorkerContext {
    /// The worker thread's index (as [`Device::worker`](crate::device::Device::worker) got it).
    pub fn thread(&self) -> usize {
        self.thread
    }

    /// The virtio features the driver acknowledged (transport bits
    /// included), as of the worker's start.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// True if the driver acknowledged feature bit `bit`.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.features & (1u64 << bit) != 0
    }

    /// The device's queue count.
    pub fn num_queues(&self) -> usize {
        self.num_queues
    }

    /// The queues this thread serves.
    pub fn queues(&self) -> &[u16] {
        &self.queues
    }

    /// A handle that wakes this thread.
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }
}
