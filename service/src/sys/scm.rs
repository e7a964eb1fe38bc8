//! Sending and receiving one message with fds attached (`SCM_RIGHTS`),
//! the one codec of the workspace for both directions: nix's `sendmsg` and
//! `recvmsg` with `ControlMessage::ScmRights`. Sending is
//! [`send_with_fds`]; receiving, without ever leaking a fd, is
//! [`recv_with_fds`].
//!
//! Every receive site of the framework and its backends that accepts fds
//! goes through [`recv_with_fds`]: vhost-user messages
//! (`ioasis::vhost_user::msg::recv_message`), the `/dev/iommu` service
//! transport ([`crate::transport::recv_packet`], both ends) and the
//! sva-accel portal. It
//!
//! - offers the kernel room for the most fds one message can carry
//!   ([`SCM_MAX_FD`]), so a peer that attaches more fds than the protocol
//!   allows cannot overflow the control buffer: every fd arrives and is
//!   owned;
//! - wraps every fd the kernel installed into an [`OwnedFd`] before it
//!   returns, so a refusal, a decode error or any early return of the caller
//!   closes them by drop;
//! - when the control data was truncated all the same (`MSG_CTRUNC`, for
//!   example because a caller's buffer is smaller, or other control messages
//!   took room), the kernel has still installed the fds that fit, and nix's
//!   `RecvMsg::cmsgs` refuses to walk a truncated buffer: the helper then
//!   walks the buffer itself and takes ownership of those fds too.
//!
//! How many fds a message may carry is the caller's rule: the helper returns
//! them all and reports truncation; the caller refuses the message and the
//! fds close when it drops them.
//!
//! `framework/tests/hostile_fd_leak.rs` checks, through real sockets, that
//! over-stuffed messages leave the server's fd table as it was.

use std::cell::RefCell;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Most fds Linux passes in one message (`SCM_MAX_FD`); a sender that
/// attaches more gets `EINVAL` from `sendmsg`.
pub const SCM_MAX_FD: usize = 253;

/// One received message.
#[derive(Debug)]
pub struct Received {
    /// Bytes received (at most the buffers' length).
    pub bytes: usize,
    /// Every fd that came with the message, owned (closed on drop).
    pub fds: Vec<OwnedFd>,
    /// `MSG_TRUNC`: the datagram was longer than the buffers.
    pub data_truncated: bool,
    /// `MSG_CTRUNC`: the control data did not fit; more fds were sent than
    /// arrived (the kernel closed the rest).
    pub fds_truncated: bool,
}

/// Sends one message of `iov` on `sock` with `fds` attached (none: no
/// control message), retrying on `EINTR`; `MSG_NOSIGNAL` is always added
/// to `flags` (a peer that hung up is `EPIPE`, not a signal). Returns the
/// bytes sent, which on a stream socket may be fewer than `iov` holds.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    iov: &[IoSlice<'_>],
    fds: &[RawFd],
    flags: MsgFlags,
) -> nix::Result<usize> {
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            iov,
            cmsgs,
            flags | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            r => return r,
        }
    }
}

thread_local! {
    // One control buffer per thread (about 1 KiB), so that a receive does
    // not allocate.
    static CONTROL: RefCell<Vec<u8>> = RefCell::new(nix::cmsg_space!([RawFd; SCM_MAX_FD]));
}

/// Receives one message on `sock` into `iov`, with room for
/// [`SCM_MAX_FD`] fds, retrying on `EINTR`. `flags` are passed on
/// (`MSG_CMSG_CLOEXEC` is always added). Errors, `EAGAIN` included, are
/// returned as they are; a received fd is never left open in the table
/// without an owner.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    iov: &mut [IoSliceMut<'_>],
    flags: MsgFlags,
) -> io::Result<Received> {
    CONTROL.with(|c| match c.try_borrow_mut() {
        Ok(mut c) => recv_with_control(sock, iov, flags, &mut c),
        // Not reentrant in practice; a fresh buffer keeps it correct anyway.
        Err(_) => recv_with_control(sock, iov, flags, &mut nix::cmsg_space!([RawFd; SCM_MAX_FD])),
    })
}

/// [`recv_with_fds`] with a caller-sized control buffer (tests use a small
/// one to exercise truncation).
pub(crate) fn recv_with_control(
    sock: BorrowedFd<'_>,
    iov: &mut [IoSliceMut<'_>],
    flags: MsgFlags,
    control: &mut [u8],
) -> io::Result<Received> {
    // Zeroed, so that a walk of a truncated buffer stops at the first
    // header the kernel did not write.
    control.fill(0);
    let mut fds = Vec::new();
    let (bytes, got_flags, walked) = {
        let msg = loop {
            match recvmsg::<()>(
                sock.as_raw_fd(),
                iov,
                Some(&mut *control),
                flags | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => break m,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let walked = match msg.cmsgs() {
            Ok(cmsgs) => {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        adopt(&raw, &mut fds);
                    }
                }
                true
            }
            // MSG_CTRUNC: walked below, once the buffer is no longer borrowed.
            Err(_) => false,
        };
        (msg.bytes, msg.flags, walked)
    };
    if !walked {
        adopt(&rights_in(control), &mut fds);
    }
    Ok(Received {
        bytes,
        fds,
        data_truncated: got_flags.contains(MsgFlags::MSG_TRUNC),
        fds_truncated: got_flags.contains(MsgFlags::MSG_CTRUNC),
    })
}

/// Takes ownership of fds the kernel installed for this message.
fn adopt(raw: &[RawFd], into: &mut Vec<OwnedFd>) {
    for &fd in raw {
        if fd >= 0 {
            // SAFETY: the kernel installed `fd` in our table for this message
            // (SCM_RIGHTS) just now, each one a distinct new descriptor;
            // nothing else owns it, so this is its only owner and it is
            // closed exactly once.
            into.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

/// `CMSG_ALIGN`: control messages are aligned to `size_t` (`None` on
/// overflow).
fn cmsg_align(len: usize) -> Option<usize> {
    let a = std::mem::size_of::<usize>();
    len.checked_add(a - 1).map(|l| l & !(a - 1))
}

/// The fds of every `SCM_RIGHTS` message in a control buffer the kernel
/// filled (possibly truncated: the kernel writes whole headers whose length
/// covers only the fds it installed). Walks the bytes without trusting them
/// beyond the buffer.
fn rights_in(control: &[u8]) -> Vec<RawFd> {
    let hdr = std::mem::size_of::<libc::cmsghdr>();
    let data_off = cmsg_align(hdr).unwrap_or(hdr);
    let mut out = Vec::new();
    let mut off = 0usize;
    // Bounded: each step advances by at least one aligned header.
    while off + hdr <= control.len() {
        // SAFETY: `off + hdr <= control.len()`, so the read stays inside the
        // buffer; `cmsghdr` is plain integers, valid for any bytes, and
        // read_unaligned has no alignment requirement.
        let h: libc::cmsghdr =
            unsafe { std::ptr::read_unaligned(control[off..].as_ptr().cast::<libc::cmsghdr>()) };
        let len = h.cmsg_len as usize;
        if len < data_off {
            // Zeroed (never written) or nonsense: nothing more.
            break;
        }
        let end = off.saturating_add(len).min(control.len());
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            let data = control.get(off + data_off..end).unwrap_or(&[]);
            for c in data.chunks_exact(std::mem::size_of::<RawFd>()) {
                let mut b = [0u8; std::mem::size_of::<RawFd>()];
                b.copy_from_slice(c);
                out.push(RawFd::from_ne_bytes(b));
            }
        }
        off = match cmsg_align(len).and_then(|l| off.checked_add(l)) {
            Some(o) => o,
            None => break,
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{
        sendmsg, socketpair, AddressFamily, ControlMessage, SockFlag, SockType,
    };
    use std::io::IoSlice;
    use std::os::fd::AsFd;

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
    }

    fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[RawFd]) {
        let iov = [IoSlice::new(data)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).expect("sendmsg");
    }

    /// A truncated control buffer still yields (and so closes) the fds the
    /// kernel installed. Checked by disabling the walk of a truncated buffer
    /// (what the receive sites did before this module: they returned on
    /// `cmsgs()`'s error): no fd is adopted and the test fails.
    #[test]
    fn test_truncated_control_data_is_owned() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let many = [null.as_raw_fd(); 10];
        send(a.as_fd(), b"x", &many);
        let mut buf = [0u8; 8];
        let mut iov = [IoSliceMut::new(&mut buf)];
        // Room for a few fds only (CMSG_SPACE rounds 3 up to 4).
        let mut small = nix::cmsg_space!([RawFd; 3]);
        let room = (small.len() - std::mem::size_of::<libc::cmsghdr>()) / 4;
        let r =
            recv_with_control(b.as_fd(), &mut iov, MsgFlags::empty(), &mut small).expect("recv");
        assert!(room < 10);
        assert!(r.fds_truncated, "10 fds into room for {room} must truncate");
        assert_eq!(r.fds.len(), room, "the fds the kernel installed are owned");
        assert_eq!(r.bytes, 1);
        for f in &r.fds {
            // Each one is a live, distinct descriptor.
            assert!(nix::fcntl::fcntl(f.as_fd(), nix::fcntl::FcntlArg::F_GETFD).is_ok());
        }
    }

    /// The full-size buffer takes every fd a sender can attach.
    #[test]
    fn test_full_buffer_takes_scm_max_fd() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let many = vec![null.as_raw_fd(); SCM_MAX_FD];
        send(a.as_fd(), b"yy", &many);
        let before = open_fds();
        let mut buf = [0u8; 8];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let r = recv_with_fds(b.as_fd(), &mut iov, MsgFlags::empty()).expect("recv");
        assert!(!r.fds_truncated);
        assert_eq!(r.fds.len(), SCM_MAX_FD);
        assert!(open_fds() >= before + SCM_MAX_FD - 8);
        drop(r);
    }

    #[test]
    fn test_rights_walk_ignores_garbage() {
        assert!(rights_in(&[]).is_empty());
        assert!(rights_in(&[0u8; 64]).is_empty());
        // A header claiming more than the buffer: clamped, no panic.
        let mut b = vec![0u8; 24];
        b[..8].copy_from_slice(&(1000usize).to_ne_bytes());
        b[8..12].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        b[12..16].copy_from_slice(&libc::SCM_RIGHTS.to_ne_bytes());
        b[16..20].copy_from_slice(&7i32.to_ne_bytes());
        assert_eq!(rights_in(&b), vec![7, 0]);
        let mut b = vec![0xffu8; 40];
        b[..8].copy_from_slice(&usize::MAX.to_ne_bytes());
        let _ = rights_in(&b);
    }
}
