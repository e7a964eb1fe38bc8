//! Sending and receiving one message (a `SOCK_SEQPACKET` packet) with its
//! `SCM_RIGHTS` fds.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};

use super::proto::{MAX_FDS, MAX_MESSAGE};

/// A received packet.
#[derive(Debug)]
pub struct Packet {
    /// The bytes (at most [`MAX_MESSAGE`] + 1; longer means oversize).
    pub data: Vec<u8>,
    /// The fds that came with it, owned.
    pub fds: Vec<OwnedFd>,
    /// The packet was longer than the buffer ([`MAX_MESSAGE`]).
    pub truncated: bool,
    /// More fds were sent than [`MAX_FDS`]; the extra ones were closed.
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
    // Room for a few more fds than allowed, so that an excess is seen and
    // closed rather than silently dropped by the kernel.
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS + 3]);
    let (len, flags, raw_fds) = {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = loop {
            match socket::recvmsg::<()>(
                fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => break m,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let mut raw = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    raw.extend(fds);
                }
            }
        }
        (msg.bytes, msg.flags, raw)
    };
    let fds: Vec<OwnedFd> = raw_fds
        .into_iter()
        .filter(|&f| f >= 0)
        // SAFETY: the kernel just installed these fds in our table for this
        // message (SCM_RIGHTS); nothing else owns them, so taking ownership
        // here is the only way they get closed.
        .map(|f| unsafe { OwnedFd::from_raw_fd(f) })
        .collect();
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    let len = len.min(buf.len());
    let fds_truncated = flags.contains(MsgFlags::MSG_CTRUNC) || fds.len() > MAX_FDS;
    Ok(Some(Packet {
        truncated: flags.contains(MsgFlags::MSG_TRUNC) || len > MAX_MESSAGE,
        fds_truncated,
        data: buf[..len].to_vec(),
        fds,
    }))
}

/// Sends one packet with `fds` attached.
pub fn send_packet(fd: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    loop {
        match socket::sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short send: {n} of {} bytes", data.len()),
                ))
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
