//! Event loops: nix's [`Epoll`] is the epoll of the service, the device
//! framework's server loop and worker threads (and sva-accel's control loop); this module adds
//! the few calls they share: a close-on-exec instance, watching a fd for
//! input under a token, and a wait that takes an optional timeout and
//! treats `EINTR` as no events.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

pub use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

/// A close-on-exec epoll instance.
pub fn new() -> io::Result<Epoll> {
    Ok(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?)
}

/// Watches `fd` for input (level-triggered); its events carry `token`.
pub fn watch(epoll: &Epoll, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
    Ok(epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))?)
}

/// Stops watching `fd`.
pub fn unwatch(epoll: &Epoll, fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(epoll.delete(fd)?)
}

/// Waits up to `timeout` (`None`: for ever; longer than epoll can wait:
/// as long as it can) for events into `events`; returns how many arrived.
/// An interrupted wait (`EINTR`) returns 0.
pub fn wait(
    epoll: &Epoll,
    events: &mut [EpollEvent],
    timeout: Option<Duration>,
) -> io::Result<usize> {
    let t = match timeout {
        None => EpollTimeout::NONE,
        Some(d) => EpollTimeout::try_from(d).unwrap_or(EpollTimeout::MAX),
    };
    match epoll.wait(events, t) {
        Ok(n) => Ok(n),
        Err(nix::errno::Errno::EINTR) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// What [`ctl_raw`] does with a fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtlOp {
    /// Starts watching it.
    Add,
    /// Changes what it is watched for.
    Modify,
    /// Stops watching it.
    Delete,
}

/// `epoll_ctl` on a raw fd, for event sources that offer only [`AsRawFd`]
/// (vmm-sys-util's `EventFd`, the device framework's public registration
/// API): nix's [`Epoll`] methods take `AsFd`, and borrowing a raw fd as a
/// `BorrowedFd` would need an unsafe promise from every caller instead of
/// this one call. `events` and `token` are ignored for [`CtlOp::Delete`].
pub fn ctl_raw(
    epoll: &Epoll,
    op: CtlOp,
    fd: RawFd,
    events: EpollFlags,
    token: u64,
) -> io::Result<()> {
    let op = match op {
        CtlOp::Add => libc::EPOLL_CTL_ADD,
        CtlOp::Modify => libc::EPOLL_CTL_MOD,
        CtlOp::Delete => libc::EPOLL_CTL_DEL,
    };
    let mut ev = libc::epoll_event {
        // The flags are epoll's own bits, which fit its u32 field.
        events: events.bits() as u32,
        u64: token,
    };
    // SAFETY: the epoll fd is live (owned by `epoll`), `fd` is a fd number
    // the kernel checks (a stale one fails with EBADF), and `ev` is a valid
    // epoll_event the kernel only reads (it is ignored for EPOLL_CTL_DEL).
    let rc = unsafe { libc::epoll_ctl(epoll.0.as_raw_fd(), op, fd, &mut ev) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
