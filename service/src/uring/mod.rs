//! io_uring fault channels, and the invalidation hub.
//!
//! # Fault channels
//!
//! An iommu-core fault queue produces I/O page fault groups for the devices
//! attached to a fault-capable HWPT and takes page responses back. A fault
//! channel carries that conversation over a `SOCK_SEQPACKET` unix socket
//! pair so that the consumer can live in another process (the fd is passed
//! with `SCM_RIGHTS` by the service):
//!
//! ```text
//!  device thread        server loop                      consumer (any process)
//!  raise fault --> FaultQueue --> FaultPump ==socket==> FaultChannel (io_uring)
//!  resume <------- FaultQueue <-- FaultPump <=socket=== respond (batched)
//! ```
//!
//! The records are iommufd's (`struct iommu_hwpt_pgfault`, 40 bytes) and the
//! responses too (`struct iommu_hwpt_page_response`, 8 bytes); the layouts
//! are in [`record`]. The pump sends whole groups only, up to
//! [`MAX_RECORDS_PER_PACKET`] records a packet; the consumer receives with a
//! multishot receive into provided buffers and answers many groups with one
//! send, submitted in the same `io_uring_enter` as the next receive wait.
//!
//! # Invalidation delivery
//!
//! See [`invalidate`]: the control loop keeps the second phase of two-phase
//! unmaps (the translators still inside an access section) and re-checks
//! it on a timer, never blocking on it.

pub mod channel;
#[cfg(feature = "server")]
pub mod invalidate;
#[cfg(feature = "server")]
pub mod pump;
pub mod record;

use std::io;
use std::os::fd::OwnedFd;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

pub use channel::{
    ChannelError, FaultBatch, FaultChannel, Wait, MAX_FAULT_PACKET, MAX_RECORDS_PER_PACKET,
    MAX_RESPONSES_PER_PACKET, MAX_RESPONSE_PACKET,
};
#[cfg(feature = "server")]
pub use invalidate::{HubStats, InvalidationHub};
#[cfg(feature = "server")]
pub use pump::{FaultPump, FaultSource, PumpError, PumpStats};
pub use record::{FaultRecord, PageResponse, Rejection};

/// Makes a connected fault channel socket pair: `(server end, consumer
/// end)`, both close-on-exec. Give the server end to a [`FaultPump`] and the
/// consumer end to [`FaultChannel::new`] (possibly in another process).
pub fn fault_channel_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((a, b))
}

#[cfg(all(test, feature = "server"))]
mod tests;
