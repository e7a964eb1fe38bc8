//! Eventfds: vmm-sys-util's [`EventFd`] is the one eventfd type of the
//! service and the device framework; this module adds what it lacks for
//! them (a non-blocking, close-on-exec constructor and a borrowed fd).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

pub use vmm_sys_util::eventfd::EventFd;

/// A non-blocking, close-on-exec eventfd whose counter is 0.
pub fn nonblocking() -> io::Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
}

/// An eventfd's descriptor, borrowed for as long as the eventfd is.
pub fn borrow(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor is owned by `e`, which the returned borrow
    // cannot outlive, so it stays open for the borrow's lifetime.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_nonblocking_eventfd_does_not_block_when_empty() {
        let e = nonblocking().expect("eventfd");
        e.write(1).expect("write");
        assert_eq!(e.read().expect("read"), 1);
        // Empty: a read returns at once instead of blocking the thread.
        assert!(e.read().is_err());
    }
}
