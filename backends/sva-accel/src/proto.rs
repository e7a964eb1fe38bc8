//! The control protocol between the client driver and the daemon.
//!
//! One `SOCK_SEQPACKET` connection per client; each request is one packet
//! answered by one reply packet. All integers little-endian.
//!
//! ```text
//! request: u32 op | u32 0 | payload          reply: i32 status (0 or -errno) | u32 0 | payload
//! HELLO  payload: u32 version (2), u32 priority (0: the administrator's for
//!                 the peer's uid; 1..=15: at most that), u64 service session id,
//!                 u32 PASID (reserved and attached by that session)
//!        reply:   u32 pasid, u32 wq_mode, u32 wq_size, u32 max_batch, u32 max_xfer,
//!                 u32 dev_id, [u64; 4] opcap, u32 granted priority
//!                 fds: portal memfd, doorbell eventfd, completion eventfd
//! ```
//!
//! HELLO must come first and only once; it is the only request. Memory is
//! mapped through the `/dev/iommu` service, and faults travel over the
//! session's fault queue. Any later packet is answered `-EINVAL` and the
//! connection stays up; closing it unbinds the client.

use ioasis::le::{LeReader, LeWriter};
use nix::sys::socket::MsgFlags;
use std::io::IoSliceMut;
use std::os::fd::{BorrowedFd, OwnedFd};

/// HELLO version, the only one: the client's PASID and IOAS come from the
/// `/dev/iommu` service; the payload continues with u64 session id, u32
/// PASID; the reply carries the portal, doorbell and completion fds (faults
/// go to the client's fault queue). Version 1 (memory registered with the
/// device itself) is refused with `EPROTO`.
pub const VERSION_IOMMU: u32 = 2;
/// Opcode: hello.
pub const OP_HELLO: u32 = 1;
/// Largest packet either side sends.
pub const MAX_PACKET: usize = 256;
/// Most fds in one packet.
pub const MAX_FDS: usize = 4;

/// A received packet.
#[derive(Debug, Default)]
pub struct Packet {
    /// Payload bytes.
    pub data: Vec<u8>,
    /// Received fds (owned).
    pub fds: Vec<OwnedFd>,
}

/// Sends one packet with optional fds (`SCM_RIGHTS`), through the one
/// packet sender of the workspace (`ioasis::service::transport`).
pub fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> nix::Result<()> {
    ioasis::service::transport::send_packet(sock, data, fds)
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
}

/// Receives one packet; `Ok(None)` on end of file. A packet longer than
/// [`MAX_PACKET`] or with more than [`MAX_FDS`] fds is `EMSGSIZE`; whatever
/// fds came with it are closed first ([`ioasis::scm`]).
pub fn recv(sock: BorrowedFd<'_>) -> nix::Result<Option<Packet>> {
    let mut buf = [0u8; MAX_PACKET];
    let got = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        ioasis::scm::recv_with_fds(sock, &mut iov, MsgFlags::empty())
            .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?
    };
    if got.bytes == 0 && got.fds.is_empty() {
        return Ok(None);
    }
    if got.data_truncated || got.fds_truncated || got.fds.len() > MAX_FDS {
        // `got.fds` closes here.
        return Err(nix::errno::Errno::EMSGSIZE);
    }
    Ok(Some(Packet {
        data: buf[..got.bytes.min(MAX_PACKET)].to_vec(),
        fds: got.fds,
    }))
}

/// A decoded HELLO request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Work queue priority asked for: 0 for the administrator's, else at
    /// most that (the daemon lowers a higher one).
    pub priority: u32,
    /// The client's `/dev/iommu` service session.
    pub session: u64,
    /// The PASID that session reserved and attached.
    pub pasid: u32,
}

impl Hello {
    /// Decodes the first packet of a connection, carrying `nfds` fds.
    /// Errors are the errno the daemon answers with: `EPROTO` for another
    /// opcode or version, `EINVAL` for a short packet, a non-zero reserved
    /// word or attached fds. Pure, so that it can be fuzzed
    /// (`backends/sva-accel/fuzz`, `tests/portal_props.rs`).
    pub fn decode(data: &[u8], nfds: usize) -> Result<Hello, i32> {
        let mut r = Reader::new(data);
        if r.u32() != Some(OP_HELLO) {
            return Err(libc::EPROTO);
        }
        let (Some(reserved), Some(version), Some(priority)) = (r.u32(), r.u32(), r.u32()) else {
            return Err(libc::EINVAL);
        };
        // Version 1 (memory registered with the device itself) is gone:
        // every client binds a PASID its service session attached.
        if version != VERSION_IOMMU {
            return Err(libc::EPROTO);
        }
        let (Some(session), Some(pasid)) = (r.u64(), r.u32()) else {
            return Err(libc::EINVAL);
        };
        if reserved != 0 || nfds != 0 {
            return Err(libc::EINVAL);
        }
        Ok(Hello {
            priority,
            session,
            pasid,
        })
    }

    /// Encodes it (what the client driver sends).
    pub fn encode(&self) -> Vec<u8> {
        Writer::default()
            .u32(OP_HELLO)
            .u32(0)
            .u32(VERSION_IOMMU)
            .u32(self.priority)
            .u64(self.session)
            .u32(self.pasid)
            .0
    }
}

/// Little-endian writer (the framework's [`LeWriter`], by value).
#[derive(Debug, Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    fn put(self, f: impl FnOnce(&mut LeWriter) -> &mut LeWriter) -> Self {
        let mut w = LeWriter::from_vec(self.0);
        f(&mut w);
        Writer(w.into_vec())
    }
    /// Appends a u32.
    pub fn u32(self, v: u32) -> Self {
        self.put(|w| w.u32(v))
    }
    /// Appends an i32.
    pub fn i32(self, v: i32) -> Self {
        self.put(|w| w.i32(v))
    }
    /// Appends a u64.
    pub fn u64(self, v: u64) -> Self {
        self.put(|w| w.u64(v))
    }
}

/// Little-endian reader that fails (None) past the end (the framework's
/// [`LeReader`]).
#[derive(Debug)]
pub struct Reader<'a>(LeReader<'a>);

impl<'a> Reader<'a> {
    /// Reads from `b`.
    pub fn new(b: &'a [u8]) -> Self {
        Reader(LeReader::new(b))
    }
    /// Reads a u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.0.u32().ok()
    }
    /// Reads an i32.
    pub fn i32(&mut self) -> Option<i32> {
        self.0.i32().ok()
    }
    /// Reads a u64.
    pub fn u64(&mut self) -> Option<u64> {
        self.0.u64().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsFd;

    #[test]
    fn test_packet_with_fds_roundtrip() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::empty(),
        )
        .expect("pair");
        let efd = crate::shm::new_eventfd().expect("eventfd");
        let msg = Writer::default().u32(OP_HELLO).u32(0).u64(42).0;
        send(a.as_fd(), &msg, &[crate::shm::borrow_eventfd(&efd)]).expect("send");
        let p = recv(b.as_fd()).expect("recv").expect("packet");
        assert_eq!(p.fds.len(), 1);
        let mut r = Reader::new(&p.data);
        assert_eq!(
            (r.u32(), r.u32(), r.u64(), r.u32()),
            (Some(1), Some(0), Some(42), None)
        );
        drop(a);
        assert!(recv(b.as_fd()).expect("eof").is_none());
    }
}
