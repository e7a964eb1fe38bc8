//! Who is on the other end of a unix socket.

use std::io;
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt};

/// The credentials of a socket's peer, as the kernel recorded them when it
/// connected (`SO_PEERCRED`): they cannot be forged without privilege.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Process id.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

impl Peer {
    /// The peer of the connected unix socket `fd`.
    pub fn of(fd: impl AsFd) -> io::Result<Peer> {
        let c = getsockopt(&fd, sockopt::PeerCredentials)?;
        Ok(Peer {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        })
    }

    /// This process, as its peers see it.
    pub fn current() -> Peer {
        Peer {
            pid: nix::unistd::getpid().as_raw(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} uid {} gid {}", self.pid, self.uid, self.gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_peer_of_socketpair_is_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert_eq!(Peer::of(&a).expect("peer"), Peer::current());
    }
}
