//! The open file behind a queue handle.
//!
//! In iommufd a fault queue's or vEVENTQ's fd holds a `users` reference on
//! its object (`iommufd_eventq_init` takes it, `iommufd_eventq_fops_release`
//! drops it), so `IOMMU_DESTROY` of the object fails with `EBUSY` while the
//! fd, or a duplicate of it, is open. Here every handle
//! ([`FaultQueue`](crate::FaultQueue), [`EventQueue`](crate::EventQueue),
//! and their clones, the analogue of `dup`) holds a [`QueueFile`]; the queue
//! object sees it through a [`FileRef`].

use std::sync::{Arc, Weak};

/// Held by every handle of one queue: the queue's open file.
#[derive(Debug)]
pub(crate) struct QueueFile;

/// The queue object's view of its file.
pub(crate) struct FileRef(Weak<QueueFile>);

impl FileRef {
    /// A new file for a new queue: the first handle's share and the
    /// object's view. No handle can be made once every share is gone (a
    /// handle comes only from the allocation or from cloning another), so
    /// [`FileRef::is_open`] turning false is final.
    pub(crate) fn open() -> (Arc<QueueFile>, FileRef) {
        let file = Arc::new(QueueFile);
        let r = FileRef(Arc::downgrade(&file));
        (file, r)
    }

    /// Whether any handle of the queue is still open.
    pub(crate) fn is_open(&self) -> bool {
        self.0.strong_count() > 0
    }
}
