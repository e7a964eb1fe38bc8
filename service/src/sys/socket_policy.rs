//! Who may connect to a daemon's unix sockets.
//!
//! Every listening socket the framework and its daemons create (vhost-user
//! device sockets, the `/dev/iommu` service, the sva-accel portal) is bound
//! through [`SocketPolicy::bind`]: the socket file gets mode `0600` by
//! default (owner and root only), whatever the process umask, or the mode
//! and group the administrator gives (`--socket-mode`, `--socket-group` on
//! the daemons). The file is never more open than the policy at any time:
//! the socket is created `0600` (the mode is set on the socket before
//! `bind`, and the kernel gives the file that mode less the umask), then
//! its group is set, then its final mode.
//!
//! The `/dev/iommu` service also checks each client's credentials
//! (`SO_PEERCRED`, and `SO_PEERGROUPS` for supplementary groups) against the
//! same policy when it accepts the connection ([`SocketPolicy::admits`]): a
//! peer whose uid is neither the daemon's nor root, and that the mode does
//! not open the socket to (its group bits for a member of the socket's
//! group, its other bits for anyone), is refused with a log line that says
//! why. That holds even if the file's mode was widened by hand or the
//! connection came through a path the mode does not cover.
//!
//! Tests: `framework/tests/socket_policy.rs`.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Group, Uid};

use crate::ownership::Peer;

/// `SO_PEERGROUPS` (asm-generic value; Linux 4.13+).
const SO_PEERGROUPS: libc::c_int = 59;

/// Who may connect to a socket: its file mode and group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPolicy {
    mode: u32,
    group: Option<u32>,
}

impl Default for SocketPolicy {
    fn default() -> Self {
        SocketPolicy {
            mode: Self::DEFAULT_MODE,
            group: None,
        }
    }
}

impl fmt::Display for SocketPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mode {:04o}", self.mode)?;
        if let Some(g) = self.group {
            write!(f, ", group {g}")?;
        }
        Ok(())
    }
}

/// A client's credentials as the kernel recorded them at `connect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id and effective user and group ids (`SO_PEERCRED`).
    pub peer: Peer,
    /// Supplementary groups (empty if the kernel does not report them).
    pub groups: Vec<u32>,
}

impl SocketPolicy {
    /// The mode of a socket file unless told otherwise.
    pub const DEFAULT_MODE: u32 = 0o600;

    /// A policy with file mode `mode` (permission bits only, at most
    /// `0o777`) and, if given, the socket file's group.
    pub fn new(mode: u32, group: Option<u32>) -> Result<SocketPolicy, String> {
        if mode & !0o777 != 0 {
            return Err(format!(
                "socket mode {mode:o} has bits outside 0777 (permission bits only)"
            ));
        }
        Ok(SocketPolicy { mode, group })
    }

    /// Parses an octal mode (`0660`, `660`).
    pub fn parse_mode(s: &str) -> Result<u32, String> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        let m = u32::from_str_radix(digits, 8)
            .map_err(|_| format!("{s:?} is not an octal mode such as 0660"))?;
        if m & !0o777 != 0 {
            return Err(format!("{s:?}: permission bits only (at most 0777)"));
        }
        Ok(m)
    }

    /// Parses a group name or number.
    pub fn parse_group(s: &str) -> Result<u32, String> {
        if let Ok(g) = s.parse::<u32>() {
            return Ok(g);
        }
        match Group::from_name(s) {
            Ok(Some(g)) => Ok(g.gid.as_raw()),
            Ok(None) => Err(format!("no group named {s:?}")),
            Err(e) => Err(format!("looking up group {s:?}: {e}")),
        }
    }

    /// The file mode.
    pub fn mode(&self) -> u32 {
        self.mode
    }

    /// The socket file's group, if one was given.
    pub fn group(&self) -> Option<u32> {
        self.group
    }

    /// The group whose members the mode's group bits admit: the given one,
    /// else the daemon's effective group (the group a new file gets).
    fn effective_group(&self) -> u32 {
        self.group.unwrap_or_else(|| Gid::effective().as_raw())
    }

    /// Creates a listening unix socket of type `ty` (close-on-exec, and
    /// non-blocking if asked) at `path` under this policy. A stale socket
    /// file there is replaced; any other kind of file is an error
    /// (`AlreadyExists`).
    pub fn bind(&self, path: &Path, ty: SockType, nonblocking: bool) -> io::Result<OwnedFd> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            // A stale socket from an earlier run; replace it.
            let _ = std::fs::remove_file(path);
        }
        let mut flags = SockFlag::SOCK_CLOEXEC;
        if nonblocking {
            flags |= SockFlag::SOCK_NONBLOCK;
        }
        let fd = socket::socket(AddressFamily::Unix, ty, flags, None)?;
        // The file bind creates takes the socket's mode less the umask: make
        // it owner-only until the final group and mode are in place.
        nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(0o600 & self.mode))?;
        let addr = UnixAddr::new(path)?;
        socket::bind(fd.as_raw_fd(), &addr)?;
        let finish = || -> io::Result<()> {
            if let Some(g) = self.group {
                nix::unistd::chown(path, None, Some(Gid::from_raw(g)))?;
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(self.mode))?;
            socket::listen(&fd, Backlog::MAXCONN)?;
            Ok(())
        };
        if let Err(e) = finish() {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(fd)
    }

    /// Whether this policy admits a client with credentials `peer`: root,
    /// the daemon's own user, a member of the socket's group if the mode has
    /// group bits, anyone if it has other bits.
    pub fn admits(&self, cred: &PeerCred) -> bool {
        let peer = &cred.peer;
        if peer.uid == 0 || peer.uid == Uid::effective().as_raw() {
            return true;
        }
        if self.mode & 0o006 != 0 {
            return true;
        }
        if self.mode & 0o060 != 0 {
            let g = self.effective_group();
            return peer.gid == g || cred.groups.contains(&g);
        }
        false
    }

    /// Why `peer` is refused, for the log.
    pub fn refusal(&self, cred: &PeerCred) -> String {
        let peer = &cred.peer;
        let groups = if self.mode & 0o060 != 0 {
            format!(", nor in group {}", self.effective_group())
        } else {
            String::new()
        };
        format!(
            "peer pid {} uid {} gid {} is neither this daemon's user (uid {}) nor root{groups} \
             (socket {self}; widen with --socket-mode/--socket-group)",
            peer.pid,
            peer.uid,
            peer.gid,
            Uid::effective().as_raw()
        )
    }
}

/// The credentials of the process on the other end of a connected unix
/// socket (`SO_PEERCRED`; supplementary groups from `SO_PEERGROUPS`).
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<PeerCred> {
    Ok(PeerCred {
        peer: Peer::of(fd)?,
        groups: peer_groups(fd).unwrap_or_default(),
    })
}

fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    // Twice at most: the first answer gives the size needed.
    for _ in 0..2 {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
            .unwrap_or(libc::socklen_t::MAX);
        // SAFETY: `groups` is a live buffer of `len` bytes and `len` a live
        // socklen_t; the kernel writes at most `len` bytes and updates it.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n.min(groups.len()));
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() || n > 65536 {
            return Err(e);
        }
        groups.resize(n, 0);
    }
    Err(io::Error::from_raw_os_error(libc::ERANGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> PeerCred {
        PeerCred {
            peer: Peer { pid: 1, uid, gid },
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn test_parse() {
        assert_eq!(SocketPolicy::parse_mode("0660"), Ok(0o660));
        assert_eq!(SocketPolicy::parse_mode("600"), Ok(0o600));
        assert!(SocketPolicy::parse_mode("0999").is_err());
        assert!(SocketPolicy::parse_mode("4755").is_err());
        assert!(SocketPolicy::parse_mode("").is_err());
        assert_eq!(SocketPolicy::parse_group("123"), Ok(123));
        assert_eq!(SocketPolicy::parse_group("root"), Ok(0));
        assert!(SocketPolicy::parse_group("no-such-group-ioasis").is_err());
        assert!(SocketPolicy::new(0o1777, None).is_err());
    }

    #[test]
    fn test_admits() {
        let me = Uid::effective().as_raw();
        let stranger = if me == 4242 { 4343 } else { 4242 };
        let def = SocketPolicy::default();
        assert!(def.admits(&peer(0, 0, &[])));
        assert!(def.admits(&peer(me, 7, &[])));
        assert!(!def.admits(&peer(stranger, 7, &[7])));
        let grp = SocketPolicy::new(0o660, Some(7)).expect("policy");
        assert!(grp.admits(&peer(stranger, 7, &[])));
        assert!(grp.admits(&peer(stranger, 8, &[9, 7])));
        assert!(!grp.admits(&peer(stranger, 8, &[9])));
        // A group without group bits in the mode admits nobody more.
        let no_bits = SocketPolicy::new(0o600, Some(7)).expect("policy");
        assert!(!no_bits.admits(&peer(stranger, 7, &[])));
        let all = SocketPolicy::new(0o666, None).expect("policy");
        assert!(all.admits(&peer(stranger, 8, &[])));
        assert!(def.refusal(&peer(stranger, 8, &[])).contains("uid 4"));
    }
}
