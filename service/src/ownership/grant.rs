//! The daemon's grants: which peers may attach which device.

use std::collections::BTreeMap;
use std::str::FromStr;

use thiserror::Error;

use super::Peer;

/// Whom a device is granted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Grantee {
    /// Sessions of processes running with this effective user id.
    Uid(u32),
    /// Sessions of processes running with this effective group id.
    Gid(u32),
    /// Sessions of this one process. Only safe for a process that outlives
    /// the grant or takes the daemon down with it (a process id is reused
    /// once its process is gone).
    Process(i32),
    /// Every session.
    Anyone,
}

impl Grantee {
    /// Whether `peer` is this grantee.
    pub fn admits(&self, peer: &Peer) -> bool {
        match *self {
            Grantee::Uid(u) => peer.uid == u,
            Grantee::Gid(g) => peer.gid == g,
            Grantee::Process(p) => peer.pid == p,
            Grantee::Anyone => true,
        }
    }
}

impl std::fmt::Display for Grantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Grantee::Uid(u) => write!(f, "uid {u}"),
            Grantee::Gid(g) => write!(f, "gid {g}"),
            Grantee::Process(p) => write!(f, "pid {p}"),
            Grantee::Anyone => f.write_str("anyone"),
        }
    }
}

/// A grant that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GrantError {
    /// Not `DEVICE=WHO`.
    #[error("grant {0:?} is not DEVICE=WHO")]
    Syntax(String),
    /// The device part is empty.
    #[error("grant {0:?} names no device")]
    NoDevice(String),
    /// The grantee is not `UID`, `uid:N`, `gid:N`, `pid:N` or `any`.
    #[error("grantee {0:?} is not UID, uid:N, gid:N, pid:N or any")]
    Grantee(String),
}

impl FromStr for Grantee {
    type Err = GrantError;

    /// `UID`, `uid:UID`, `gid:GID`, `pid:PID` or `any`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || GrantError::Grantee(s.to_owned());
        let num = |v: &str| v.parse::<u32>().map_err(|_| bad());
        if s == "any" {
            return Ok(Grantee::Anyone);
        }
        match s.split_once(':') {
            None => num(s).map(Grantee::Uid),
            Some(("uid", v)) => num(v).map(Grantee::Uid),
            Some(("gid", v)) => num(v).map(Grantee::Gid),
            Some(("pid", v)) => match v.parse::<i32>() {
                Ok(p) if p > 0 => Ok(Grantee::Process(p)),
                _ => Err(bad()),
            },
            Some(_) => Err(bad()),
        }
    }
}

/// Label that stands for every device without grants of its own.
pub const ANY_DEVICE: &str = "*";

/// Which peers may attach which device.
///
/// A device's grantees are those granted for it by label. A device with no
/// grant of its own takes the grantees of [`ANY_DEVICE`] (`*`); until
/// something is granted for `*`, that is the user the daemon runs as, who
/// owns its sockets.
#[derive(Debug, Clone)]
pub struct Grants {
    daemon_uid: u32,
    any: Vec<Grantee>,
    devices: BTreeMap<String, Vec<Grantee>>,
}

impl Default for Grants {
    fn default() -> Self {
        Grants::new(Peer::current().uid)
    }
}

impl Grants {
    /// Grants of a daemon running as `daemon_uid`: every device is granted
    /// to that user until told otherwise.
    pub fn new(daemon_uid: u32) -> Grants {
        Grants {
            daemon_uid,
            any: Vec::new(),
            devices: BTreeMap::new(),
        }
    }

    /// Grants device `label` (or, for `*`, every device without grants of
    /// its own) to `who`. The first grant of a label replaces its default.
    pub fn grant(&mut self, label: &str, who: Grantee) {
        let list = if label == ANY_DEVICE {
            &mut self.any
        } else {
            self.devices.entry(label.to_owned()).or_default()
        };
        if !list.contains(&who) {
            list.push(who);
        }
    }

    /// Applies one `DEVICE=WHO` grant as given on a command line (see
    /// [`Grants::parse`]).
    pub fn grant_arg(&mut self, arg: &str) -> Result<(), GrantError> {
        let (label, who) = Grants::parse(arg)?;
        self.grant(&label, who);
        Ok(())
    }

    /// Parses `DEVICE=WHO`: `DEVICE` is a device label or `*`, `WHO` a
    /// [`Grantee`] (`UID`, `uid:UID`, `gid:GID`, `pid:PID` or `any`).
    pub fn parse(arg: &str) -> Result<(String, Grantee), GrantError> {
        let (label, who) = arg
            .split_once('=')
            .ok_or_else(|| GrantError::Syntax(arg.to_owned()))?;
        if label.is_empty() {
            return Err(GrantError::NoDevice(arg.to_owned()));
        }
        Ok((label.to_owned(), who.parse()?))
    }

    /// The grantees of device `label`.
    pub fn grantees(&self, label: &str) -> Vec<Grantee> {
        match self.devices.get(label) {
            Some(v) if !v.is_empty() => v.clone(),
            _ if !self.any.is_empty() => self.any.clone(),
            _ => vec![Grantee::Uid(self.daemon_uid)],
        }
    }

    /// The labels granted explicitly (`*` among them if granted).
    pub fn granted_labels(&self) -> Vec<String> {
        let mut v: Vec<String> = self.devices.keys().cloned().collect();
        if !self.any.is_empty() {
            v.push(ANY_DEVICE.to_owned());
        }
        v
    }

    /// Whether `peer` may attach device `label`.
    pub fn allows(&self, label: &str, peer: &Peer) -> bool {
        self.grantees(label).iter().any(|g| g.admits(peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(pid: i32, uid: u32, gid: u32) -> Peer {
        Peer { pid, uid, gid }
    }

    #[test]
    fn test_default_is_the_daemon_user() {
        let g = Grants::new(1000);
        assert!(g.allows("net0", &peer(5, 1000, 1000)));
        assert!(!g.allows("net0", &peer(5, 1001, 1000)));
        assert!(!g.allows("net0", &peer(5, 0, 0)), "root is not implied");
    }

    #[test]
    fn test_device_grant_replaces_the_default_for_that_device_only() {
        let mut g = Grants::new(1000);
        g.grant_arg("net0=2000").expect("grant");
        assert!(g.allows("net0", &peer(5, 2000, 7)));
        assert!(!g.allows("net0", &peer(5, 1000, 7)));
        assert!(g.allows("sva0", &peer(5, 1000, 7)));
        g.grant_arg("*=gid:50").expect("grant");
        assert!(g.allows("sva0", &peer(5, 3, 50)));
        assert!(!g.allows("sva0", &peer(5, 1000, 7)));
        g.grant_arg("net0=pid:77").expect("grant");
        assert!(g.allows("net0", &peer(77, 9, 9)));
        g.grant_arg("sva1=any").expect("grant");
        assert!(g.allows("sva1", &peer(1, 2, 3)));
    }

    #[test]
    fn test_bad_grants_are_refused() {
        for bad in [
            "net0",
            "=1000",
            "net0=",
            "net0=-1",
            "net0=pid:0",
            "net0=foo:1",
            "net0=uid:x",
        ] {
            assert!(Grants::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            Grants::parse("a=b=1"),
            Err(GrantError::Grantee("b=1".into()))
        );
    }
}
