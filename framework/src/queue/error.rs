//! Errors of queue operations.

use crate::dma::DmaError;

/// Errors of queue operations.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A ring or buffer access failed translation or permission checks.
    #[error("DMA access failed on queue {queue}")]
    Dma {
        /// Queue index.
        queue: u16,
        /// What failed.
        #[source]
        source: DmaError,
    },
    /// The driver's available index ran ahead of the ring by more than the size.
    #[error(
        "Available index {avail} of queue {queue} is more than the queue size ahead of {next}"
    )]
    AvailIndex {
        /// Queue index.
        queue: u16,
        /// Available index read from the ring.
        avail: u16,
        /// Next index the device expected.
        next: u16,
    },
    /// A descriptor chain was malformed (bad index, loop, bad indirect table, too long).
    #[error("Malformed descriptor chain with head {head} on queue {queue}")]
    BadChain {
        /// Queue index.
        queue: u16,
        /// Head index of the chain.
        head: u16,
    },
    /// `add_used` was given a head outside the queue.
    #[error("Used head {head} out of range on queue {queue} of size {size}")]
    BadHead {
        /// Queue index.
        queue: u16,
        /// Head index given.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// A ring update failed.
    #[error("Ring update failed on queue {queue}: {msg}")]
    Ring {
        /// Queue index.
        queue: u16,
        /// virtio-queue's description of the failure.
        msg: String,
    },
    /// Signalling the driver failed.
    #[error("Signalling queue {queue} failed")]
    Notify {
        /// Queue index.
        queue: u16,
        /// The eventfd write error.
        #[source]
        source: std::io::Error,
    },
}

impl QueueError {
    /// The queue the error happened on.
    pub fn queue(&self) -> u16 {
        match self {
            QueueError::Dma { queue, .. }
            | QueueError::AvailIndex { queue, .. }
            | QueueError::BadChain { queue, .. }
            | QueueError::BadHead { queue, .. }
            | QueueError::Ring { queue, .. }
            | QueueError::Notify { queue, .. } => *queue,
        }
    }

    /// The DMA error behind this error, if any.
    pub fn dma_error(&self) -> Option<&DmaError> {
        match self {
            QueueError::Dma { source, .. } => Some(source),
            QueueError::AvailIndex { .. }
            | QueueError::BadChain { .. }
            | QueueError::BadHead { .. }
            | QueueError::Ring { .. }
            | QueueError::Notify { .. } => None,
        }
    }
}

/// Result of queue operations.
pub type Result<T> = std::result::Result<T, QueueError>;
