//! Event loops: nix's [`Epoll`] is the epoll of the service and the device
//! framework's server loop (and sva-accel's control loop); this module adds
//! the few calls they share: a close-on-exec instance, watching a fd for
//! input under a token, and a wait that takes an optional timeout and
//! treats `EINTR` as no events.

use std::io;
use std::os::fd::BorrowedFd;
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
