//! The unmap-safety protocol: invalidation tickets.

use std::sync::Arc;
use std::time::Duration;

/// A hook the invalidator may call to nudge a device thread that sits in an
/// access section (e.g. write its eventfd or wake its ring).
pub type Nudge = Arc<dyn Fn() + Send + Sync>;

/// A translator that still holds old state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslatorInfo {
    /// Unique id of the translator (see [`Translator::id`](crate::Translator::id)).
    pub translator: u64,
    /// Label of its device.
    pub label: String,
}

pub(crate) struct Slot {}

/// The second phase of an invalidation (unmap, replace, detach, unbind,
/// HWPT invalidation). Caches were invalidated when the ticket was made;
/// it is complete once every access section that was open at that moment
/// has ended. Poll it with [`InvalidationTicket::is_done`], list laggards
/// with [`InvalidationTicket::pending`], nudge them, or block in
/// [`InvalidationTicket::wait`]. Dropping an incomplete ticket blocks until
/// it completes, so the safety promise holds either way.
pub struct InvalidationTicket {
    pub(crate) waits: Vec<(Arc<Slot>, u64)>,
}

impl std::fmt::Debug for InvalidationTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvalidationTicket").finish_non_exhaustive()
    }
}

impl InvalidationTicket {
    /// True once no translator can still use the old state (non-blocking).
    pub fn is_done(&mut self) -> bool {
        todo!()
    }
    /// The translators still inside an access section that began before
    /// the invalidation.
    pub fn pending(&self) -> Vec<TranslatorInfo> {
        todo!()
    }
    /// Calls the nudge hook of every pending translator that has one.
    pub fn nudge(&self) {
        todo!()
    }
    /// Blocks until complete.
    pub fn wait(self) {
        todo!()
    }
    /// Blocks until complete or `timeout`; returns [`InvalidationTicket::is_done`].
    pub fn wait_timeout(&mut self, timeout: Duration) -> bool {
        let _ = timeout;
        todo!()
    }
}
