//! Sending and receiving one message (a `SOCK_SEQPACKET` packet) with its
//! `SCM_RIGHTS` fds.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::MsgFlags;

use crate::proto::{MAX_FDS, MAX_MESSAGE};
use crate::sys::scm::{recv_with_fds, send_with_fds};

/// A received packet.
#[derive(Debug)]
pub struct Packet {
    /// The bytes (at most [`MAX_MESSAGE`] + 1; longer means oversize).
    pub data: Vec<u8>,
    /// The fds that came with it, owned.
    pub fds: Vec<OwnedFd>,
    /// The packet was longer than the buffer ([`MAX_MESSAGE`]).
    pub truncated: bool,
    /// More fds were sent than [`MAX_FDS`] (they are all in `fds`, and close
    /// when the packet is dropped).
    pub fds_truncated: bool,
}

/// Receives one packet. `Ok(None)` on end of stream; `EAGAIN` is returned as
/// an error for non-blocking sockets.
pub fn recv_packet(fd: BorrowedFd<'_>) -> io::Result<Option<Packet>> {
    thread_local! {
        // One receive buffer per thread, so that a message costs a copy of
        // its own length rather than a zeroed 64 KiB allocation.
        static RXBUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    RXBUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() != MAX_MESSAGE + 1 {
            b.resize(MAX_MESSAGE + 1, 0);
        }
        recv_into(fd, &mut b)
    })
}

fn recv_into(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<Packet>> {
    // Every fd that arrived is owned from here on (crate::sys::scm): an excess, a
    // truncation or any error path below closes them.
    let got = {
        let mut iov = [IoSliceMut::new(buf)];
        recv_with_fds(fd, &mut iov, MsgFlags::empty())?
    };
    if got.bytes == 0 && got.fds.is_empty() {
        return Ok(None);
    }
    let len = got.bytes.min(buf.len());
    let fds_truncated = got.fds_truncated || got.fds.len() > MAX_FDS;
    Ok(Some(Packet {
        truncated: got.data_truncated || len > MAX_MESSAGE,
        fds_truncated,
        data: buf[..len].to_vec(),
        fds: got.fds,
    }))
}

/// Sends one packet with `fds` attached.
pub fn send_packet(fd: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(data)];
    match send_with_fds(fd, &iov, &raw, MsgFlags::empty())? {
        n if n == data.len() => Ok(()),
        n => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short send: {n} of {} bytes", data.len()),
        )),
    }
}
