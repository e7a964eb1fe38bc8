//! The backend request channel: messages the backend sends to the frontend
//! (SET_BACKEND_REQ_FD). Used for IOTLB misses and access failures and for
//! config changes (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, when the
//! frontend negotiated `VHOST_USER_PROTOCOL_F_CONFIG`: it re-reads the
//! space with GET_CONFIG on the main socket): the channel is vhost-user's
//! [`Transport`] (calls and failed rings use the trait's defaults, the
//! rings' call and error eventfds).
//!
//! Sends never block: a worker reports a miss from its own thread, outside any
//! access section, with `MSG_DONTWAIT`; if the socket is full the miss stays
//! pending and is retried. No reply is requested, so no thread ever waits for
//! the frontend here (the frontend answers a miss with an IOTLB update on the
//! main socket, which the connection thread reads).

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::MsgFlags;
use vhost::vhost_user::message::BackendReq;
use vm_memory::ByteValued;

use super::msg::{
    send_message, Header, IotlbMsg, MsgError, VERSION_1, VHOST_IOTLB_ACCESS_FAIL, VHOST_IOTLB_MISS,
};
use crate::config_space::ConfigChange;
use crate::dma::Access;
use crate::transport::{MissReport, Transport};

/// How often a config change is tried on a full channel, and how long
/// apart.
const CONFIG_SEND_TRIES: u32 = 100;
const CONFIG_SEND_PAUSE: Duration = Duration::from_millis(10);

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
    /// The frontend negotiated `VHOST_USER_PROTOCOL_F_CONFIG`.
    config: AtomicBool,
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

    /// The frontend negotiated `VHOST_USER_PROTOCOL_F_CONFIG` (`config`)
    /// or not.
    pub fn set_config_negotiated(&self, config: bool) {
        self.config.store(config, Ordering::SeqCst);
    }

    /// Sends a message of type `request` with `payload`, without waiting.
    fn send(&self, request: BackendReq, payload: &[u8]) -> Result<SendOutcome, MsgError> {
        let hdr = Header {
            request: u32::from(request),
            flags: VERSION_1,
            size: u32::try_from(payload.len()).unwrap_or(u32::MAX),
        };
        let g = match self.sock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let Some(sock) = g.as_ref() else {
            return Ok(SendOutcome::NoChannel);
        };
        match send_message(sock, &hdr, payload, &[], MsgFlags::MSG_DONTWAIT) {
            Ok(()) => Ok(SendOutcome::Sent),
            Err(MsgError::Socket {
                errno: nix::errno::Errno::EAGAIN,
                ..
            }) => Ok(SendOutcome::WouldBlock),
            Err(e) => Err(e),
        }
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
        debug_assert_eq!(msg.as_slice().len(), super::msg::IOTLB_MSG_SIZE);
        self.send(BackendReq::IOTLB_MSG, msg.as_slice())
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

    /// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (no payload, no reply asked):
    /// the frontend reads the new space with GET_CONFIG, which the
    /// connection thread answers from the device. `_config` is not sent:
    /// vhost-user has the frontend read it.
    fn config_changed(&self, _config: &[u8]) -> io::Result<ConfigChange> {
        if !self.config.load(Ordering::SeqCst) {
            return Ok(ConfigChange::CannotTell(
                "the frontend did not negotiate VHOST_USER_PROTOCOL_F_CONFIG",
            ));
        }
        if cfg!(ioasis_broken = "noconfigirq") {
            // Test-only: the driver is not told.
            return Ok(ConfigChange::Signalled);
        }
        for _ in 0..CONFIG_SEND_TRIES {
            match self.send(BackendReq::CONFIG_CHANGE_MSG, &[]) {
                Ok(SendOutcome::Sent) => return Ok(ConfigChange::Signalled),
                Ok(SendOutcome::NoChannel) => {
                    return Ok(ConfigChange::CannotTell(
                        "the frontend set no backend request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ)",
                    ))
                }
                Ok(SendOutcome::WouldBlock) => std::thread::sleep(CONFIG_SEND_PAUSE),
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "the backend request channel stayed full",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn test_config_change_message_only_when_negotiated() {
        let ch = BackendChannel::default();
        assert!(matches!(
            ch.config_changed(&[1, 2]).expect("not negotiated"),
            ConfigChange::CannotTell(_)
        ));
        ch.set_config_negotiated(true);
        assert!(matches!(
            ch.config_changed(&[1, 2]).expect("no channel"),
            ConfigChange::CannotTell(_)
        ));
        let (ours, mut theirs) = UnixStream::pair().expect("pair");
        ch.set(Some(ours));
        assert_eq!(
            ch.config_changed(&[1, 2]).expect("sent"),
            ConfigChange::Signalled
        );
        let mut hdr = [0u8; 12];
        theirs.read_exact(&mut hdr).expect("header");
        let word = |i: usize| u32::from_ne_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        // Request 2 (CONFIG_CHANGE_MSG), version 1 without NEED_REPLY, no payload.
        assert_eq!((word(0), word(4), word(8)), (2, 1, 0));
    }
}
