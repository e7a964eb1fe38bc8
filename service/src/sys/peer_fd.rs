//! fds a peer handed us are never read or written blocking.
//!
//! A vhost-user frontend gives the backend eventfds (vring kick, call and
//! error) and a socket (the backend request channel). They are the peer's
//! files: a hostile frontend may pass one eventfd as the kick of two queues
//! (both become readable, the first read empties the counter, a blocking
//! second read would wait forever), or a counter about to overflow (a
//! blocking write would wait until the frontend reads). So:
//!
//! - every such fd is made `O_NONBLOCK` when it arrives
//!   ([`set_nonblocking`]), before anything reads, writes or polls it; a
//!   read or write that cannot proceed fails with `EAGAIN` instead;
//! - kick counters are read with [`read_counter`], which asks the kernel
//!   for a non-blocking read of that one call (`RWF_NOWAIT`), so that a
//!   frontend that clears `O_NONBLOCK` again on its own copy of the file
//!   (the flag belongs to the open file, which both sides share) still
//!   cannot block the reader.
//!
//! Setting `O_NONBLOCK` changes the flag for the frontend too; QEMU and DPDK
//! create these eventfds non-blocking already.
//!
//! Writes have no per-call equivalent (eventfds refuse `RWF_NOWAIT` on
//! write): a frontend that clears `O_NONBLOCK` again and fills a call or
//! error counter makes the worker's write wait. [`crate::sys::peer_write`]
//! interrupts such a write whenever another thread needs to get past the
//! worker.
//!
//! `framework/tests/hostile_shared_kick.rs` passes one eventfd as the kick
//! of two queues and checks that the device goes on serving, that a later
//! frontend is served and that SIGTERM stops the server.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// Sets `O_NONBLOCK` on `fd` (keeping its other status flags).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let fl = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    if !fl.contains(OFlag::O_NONBLOCK) {
        fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
    }
    Ok(())
}

/// Reads an eventfd counter (resetting it) without ever blocking:
/// `Ok(None)` if it was zero (or another reader took it first).
///
/// Uses `preadv2(RWF_NOWAIT)`, which eventfds honour whatever the file's
/// `O_NONBLOCK` flag says; on a file or kernel without that support it falls
/// back to `read(2)`, which does not block as long as the file is
/// `O_NONBLOCK` (see [`set_nonblocking`]).
pub fn read_counter(fd: &impl AsRawFd) -> io::Result<Option<u64>> {
    let mut buf = [0u8; 8];
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Bounded: EINTR retries only while signals keep arriving.
    for _ in 0..64 {
        // SAFETY: `fd` is borrowed from its owner and open for the call;
        // `iov` describes `buf`, a live 8-byte buffer; offset -1 means the
        // current position (as read(2)).
        let n = unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
        let n = if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(None),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                    // SAFETY: as above, with read(2) into the same buffer.
                    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
                    if n < 0 {
                        let e = io::Error::last_os_error();
                        match e.raw_os_error() {
                            Some(libc::EINTR) => continue,
                            Some(libc::EAGAIN) => return Ok(None),
                            _ => return Err(e),
                        }
                    }
                    n
                }
                _ => return Err(e),
            }
        } else {
            n
        };
        if n != 8 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{n}-byte read from an eventfd"),
            ));
        }
        return Ok(Some(u64::from_ne_bytes(buf)));
    }
    Err(io::Error::from(io::ErrorKind::Interrupted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use vmm_sys_util::eventfd::EventFd;

    /// A blocking eventfd read twice: the second read returns at once.
    /// Checked by replacing `read_counter` with `EventFd::read` here: the
    /// test hangs.
    #[test]
    fn test_read_counter_never_blocks() {
        let e = EventFd::new(0).expect("eventfd");
        e.write(3).expect("write");
        assert_eq!(read_counter(&e).expect("read"), Some(3));
        assert_eq!(read_counter(&e).expect("read"), None);
    }

    #[test]
    fn test_set_nonblocking() {
        let e = EventFd::new(0).expect("eventfd");
        let f = std::fs::File::open("/dev/null").expect("null");
        set_nonblocking(f.as_fd()).expect("set");
        let fl = OFlag::from_bits_truncate(fcntl(f.as_fd(), FcntlArg::F_GETFL).expect("getfl"));
        assert!(fl.contains(OFlag::O_NONBLOCK));
        // An eventfd made non-blocking: a plain read of zero fails at once.
        // SAFETY: `e` owns the fd and outlives the borrow.
        let b = unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) };
        set_nonblocking(b).expect("set");
        assert!(e.read().is_err());
    }
}
