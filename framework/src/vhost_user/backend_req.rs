//! The backend request channel: messages the backend sends to the frontend
//! (SET_BACKEND_REQ_FD). Used for IOTLB misses and access failures: the
//! channel is vhost-user's [`Transport`] for the data plane (calls and
//! failed rings use the trait's defaults, the rings' call and error
//! eventfds).
//!
//! Sends never block: a worker reports a miss from its own thread, outside any
//! access section, with `MSG_DONTWAIT`; if the socket is full the miss stays
//! pending and is retried. No reply is requested, so no thread ever waits for
//! the frontend here (the frontend answers a miss with an IOTLB update on the
//! main socket, which the connection thread reads).

use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use nix::sys::socket::MsgFlags;
use vhost::vhost_user::message::BackendReq;
use vm_memory::ByteValued;

use super::msg::{
    send_message, Header, IotlbMsg, MsgError, VERSION_1, VHOST_IOTLB_ACCESS_FAIL, VHOST_IOTLB_MISS,
};
use crate::dma::Access;
use crate::transport::{MissReport, Transport};

/// Outcome of a non-blocking send.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SendOutcome {
    /// Sent.
    Sent,
    /// The socket is full; try again later.
    WouldBlock,
    /// No channel was set up by the frontend.
    NoChannel,
}

/// The channel, shared by the connection and its workers.
#[derive(Debug, Default)]
pub(crate) struct BackendChannel {
    sock: Mutex<Option<UnixStream>>,
}

fn vhost_perm(a: Access) -> u8 {
    match a {
        Access::Read => super::msg::VHOST_ACCESS_RO,
        Access::Write => super::msg::VHOST_ACCESS_WO,
        Access::ReadWrite => super::msg::VHOST_ACCESS_RW,
    }
}

impl BackendChannel {
    /// Installs (or replaces) the socket.
    pub fn set(&self, sock: Option<UnixStream>) {
        let mut g = match self.sock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g = sock;
    }

    /// Sends an IOTLB message of type `typ` (miss or access failure).
    pub fn send_iotlb(&self, typ: u8, iova: u64, access: Access) -> Result<SendOutcome, MsgError> {
        let msg = IotlbMsg {
            iova,
            size: 1,
            uaddr: 0,
            perm: vhost_perm(access),
            typ,
            pad: [0; 6],
        };
        let hdr = Header {
            request: u32::from(BackendReq::IOTLB_MSG),
            flags: VERSION_1,
            size: super::msg::IOTLB_MSG_SIZE as u32,
        };
        let g = match self.sock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let Some(sock) = g.as_ref() else {
            return Ok(SendOutcome::NoChannel);
        };
        match send_message(sock, &hdr, msg.as_slice(), &[], MsgFlags::MSG_DONTWAIT) {
            Ok(()) => Ok(SendOutcome::Sent),
            Err(MsgError::Socket {
                errno: nix::errno::Errno::EAGAIN,
                ..
            }) => Ok(SendOutcome::WouldBlock),
            Err(e) => Err(e),
        }
    }
}

impl Transport for BackendChannel {
    fn report_miss(&self, index: u16, iova: u64, access: Access) -> MissReport {
        match self.send_iotlb(VHOST_IOTLB_MISS, iova, access) {
            Ok(SendOutcome::Sent) => {
                log::debug!("queue {index}: IOTLB miss sent for {iova:#x}");
                MissReport::Done
            }
            Ok(SendOutcome::WouldBlock) => MissReport::Retry,
            Ok(SendOutcome::NoChannel) => {
                crate::log_limited!(log::Level::Warn,
                    "queue {index}: IOTLB miss at {iova:#x} but the frontend set no backend channel; waiting for an update"
                );
                MissReport::Done
            }
            Err(e) => {
                crate::log_limited!(log::Level::Error, "queue {index}: sending IOTLB miss: {e}");
                MissReport::Done
            }
        }
    }

    fn access_failed(&self, iova: u64, access: Access) {
        if let Err(e) = self.send_iotlb(VHOST_IOTLB_ACCESS_FAIL, iova, access) {
            crate::log_limited!(log::Level::Warn, "sending access failure at {iova:#x}: {e}");
        }
    }
}
