//! What one user's sessions may hold in the service, and all sessions
//! together.
//!
//! iommufd charges every pinned page to the caller's `RLIMIT_MEMLOCK`
//! (`ENOMEM` past it). The service maps each client's memfd into the
//! daemon, so the bytes mapped are charged the same way, per user, with a
//! ceiling over all users that bounds the daemon's own address space; the
//! fds the service holds for a session (its socket, one per mapping, two
//! per fault queue), its objects and its sessions are charged alike. A
//! request past a limit fails (`ENOMEM` for bytes, `EMFILE` for fds,
//! `ENOSPC` for objects), a connection past a session limit is closed, and
//! the daemon logs which limit was reached.
//!
//! Outstanding I/O page faults are the one special case: they are not a
//! [`Resource`] of the service's ledger, because the service thread never
//! sees a fault raised. A device's own thread raises it, on a fault queue
//! of the session, and takes a slot of the session's
//! [`iommu_core::FaultBudget`] (lock-free, set on every fault queue the
//! session allocates); the session's answer (or the INVALID answer of a
//! detach, or of the session closing) gives it back. Past the budget the
//! access fails as past the device's own bound (the device sees
//! `EBUSY`, [`iommu_core::Error::FaultOverflow`]), so that a session that
//! never answers holds at most [`Limits::faults_per_session`] of a
//! device's outstanding faults, not all of them. The budget is per session
//! only (the devices' own bounds are the ceiling over all sessions) and is
//! fixed when the session opens.

use std::fmt;

/// What a session is charged for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// Bytes of client memory mapped into the daemon (`IOAS_MAP`).
    MappedBytes,
    /// Fds the service holds on a session's behalf.
    Fds,
    /// IOAS, HWPT and fault queue objects.
    Objects,
    /// Sessions (connections to the service).
    Sessions,
}

impl Resource {
    /// Every resource, in [`Resource::index`] order.
    pub const ALL: [Resource; 4] = [
        Resource::MappedBytes,
        Resource::Fds,
        Resource::Objects,
        Resource::Sessions,
    ];

    /// Position in [`Resource::ALL`].
    pub fn index(self) -> usize {
        match self {
            Resource::MappedBytes => 0,
            Resource::Fds => 1,
            Resource::Objects => 2,
            Resource::Sessions => 3,
        }
    }

    /// The errno of a request refused for this resource.
    pub fn errno(self) -> i32 {
        match self {
            Resource::MappedBytes => libc::ENOMEM,
            Resource::Fds => libc::EMFILE,
            Resource::Objects | Resource::Sessions => libc::ENOSPC,
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::MappedBytes => "mapped bytes",
            Resource::Fds => "fds",
            Resource::Objects => "objects",
            Resource::Sessions => "sessions",
        })
    }
}

/// Whose count a limit bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One session.
    Session,
    /// All sessions of one user.
    Uid,
    /// All sessions of the service.
    Service,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Session => "session",
            Scope::Uid => "uid",
            Scope::Service => "total",
        })
    }
}

const KIB: u64 = 1 << 10;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// The service's limits. [`Limits::default`] is sane for a daemon that
/// serves a few VMMs and SVA clients; an administrator changes them with
/// `--limit NAME=VALUE` ([`Limits::set`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes one user's sessions may map (`mapped-per-uid`; in the spirit
    /// of `RLIMIT_MEMLOCK`). Default 64 GiB.
    pub mapped_per_uid: u64,
    /// Bytes all sessions together may map (`mapped-total`): bounds the
    /// daemon's address space. Default 1 TiB, 1/128 of x86-64's user half.
    pub mapped_total: u64,
    /// Fds the service may hold for one session (`fds-per-session`).
    /// Default 512.
    pub fds_per_session: u64,
    /// ... for one user's sessions (`fds-per-uid`). Default 1024.
    pub fds_per_uid: u64,
    /// ... for all sessions (`fds-total`). Default: half the process's
    /// `RLIMIT_NOFILE` soft limit when the service starts, at least 64, so
    /// that the daemon keeps fds for its devices and their connections.
    pub fds_total: u64,
    /// Objects one session may own (`objects-per-session`). Default 1024.
    pub objects_per_session: u64,
    /// ... one user's sessions (`objects-per-uid`). Default 4096.
    pub objects_per_uid: u64,
    /// ... all sessions (`objects-total`). Default 16384.
    pub objects_total: u64,
    /// Sessions of one user (`sessions-per-uid`). Default 32.
    pub sessions_per_uid: u64,
    /// Sessions of all users (`sessions-total`). Default 128.
    pub sessions_total: u64,
    /// I/O page fault groups raised on one session's fault queues and not
    /// yet answered (`faults-per-session`; not a [`Resource`], see the
    /// module's docs). Default 32. It protects the other sessions on a
    /// device only while it is below the device's own bound
    /// ([`iommu_core::IommuDevice::set_max_outstanding_faults`], 32 unless
    /// the device's server raised it).
    pub faults_per_session: u64,
}

/// The `--limit` name of [`Limits::faults_per_session`].
const FAULTS_PER_SESSION: &str = "faults-per-session";

impl Default for Limits {
    fn default() -> Self {
        Limits {
            mapped_per_uid: 64 * GIB,
            mapped_total: TIB,
            fds_per_session: 512,
            fds_per_uid: 1024,
            fds_total: default_fds_total(),
            objects_per_session: super::MAX_OBJECTS_PER_SESSION as u64,
            objects_per_uid: 4096,
            objects_total: 16384,
            sessions_per_uid: 32,
            sessions_total: super::MAX_SESSIONS as u64,
            faults_per_session: 32,
        }
    }
}

fn default_fds_total() -> u64 {
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => (soft / 2).max(64),
        Err(_) => 512,
    }
}

/// The names [`Limits::set`] takes, with their fields.
const NAMES: [(&str, Resource, Scope); 10] = [
    ("mapped-per-uid", Resource::MappedBytes, Scope::Uid),
    ("mapped-total", Resource::MappedBytes, Scope::Service),
    ("fds-per-session", Resource::Fds, Scope::Session),
    ("fds-per-uid", Resource::Fds, Scope::Uid),
    ("fds-total", Resource::Fds, Scope::Service),
    ("objects-per-session", Resource::Objects, Scope::Session),
    ("objects-per-uid", Resource::Objects, Scope::Uid),
    ("objects-total", Resource::Objects, Scope::Service),
    ("sessions-per-uid", Resource::Sessions, Scope::Uid),
    ("sessions-total", Resource::Sessions, Scope::Service),
];

impl Limits {
    /// The limit on `resource` in `scope` (`u64::MAX`: none).
    pub fn limit(&self, resource: Resource, scope: Scope) -> u64 {
        match (resource, scope) {
            (Resource::MappedBytes, Scope::Session) => u64::MAX,
            (Resource::MappedBytes, Scope::Uid) => self.mapped_per_uid,
            (Resource::MappedBytes, Scope::Service) => self.mapped_total,
            (Resource::Fds, Scope::Session) => self.fds_per_session,
            (Resource::Fds, Scope::Uid) => self.fds_per_uid,
            (Resource::Fds, Scope::Service) => self.fds_total,
            (Resource::Objects, Scope::Session) => self.objects_per_session,
            (Resource::Objects, Scope::Uid) => self.objects_per_uid,
            (Resource::Objects, Scope::Service) => self.objects_total,
            (Resource::Sessions, Scope::Session) => u64::MAX,
            (Resource::Sessions, Scope::Uid) => self.sessions_per_uid,
            (Resource::Sessions, Scope::Service) => self.sessions_total,
        }
    }

    fn field(&mut self, resource: Resource, scope: Scope) -> Option<&mut u64> {
        Some(match (resource, scope) {
            (Resource::MappedBytes, Scope::Uid) => &mut self.mapped_per_uid,
            (Resource::MappedBytes, Scope::Service) => &mut self.mapped_total,
            (Resource::Fds, Scope::Session) => &mut self.fds_per_session,
            (Resource::Fds, Scope::Uid) => &mut self.fds_per_uid,
            (Resource::Fds, Scope::Service) => &mut self.fds_total,
            (Resource::Objects, Scope::Session) => &mut self.objects_per_session,
            (Resource::Objects, Scope::Uid) => &mut self.objects_per_uid,
            (Resource::Objects, Scope::Service) => &mut self.objects_total,
            (Resource::Sessions, Scope::Uid) => &mut self.sessions_per_uid,
            (Resource::Sessions, Scope::Service) => &mut self.sessions_total,
            _ => return None,
        })
    }

    /// The `--limit` name of `resource` in `scope`.
    pub fn name(resource: Resource, scope: Scope) -> &'static str {
        NAMES
            .iter()
            .find(|(_, r, s)| *r == resource && *s == scope)
            .map_or("(none)", |(n, _, _)| n)
    }

    /// [`Limits::faults_per_session`] as a [`iommu_core::FaultBudget`]'s
    /// limit.
    pub fn fault_budget(&self) -> u32 {
        u32::try_from(self.faults_per_session).unwrap_or(u32::MAX)
    }

    /// Sets one limit from `NAME=VALUE` (`mapped-per-uid=128G`,
    /// `sessions-per-uid=8`, `faults-per-session=16`, ...; sizes take a
    /// `K`, `M`, `G` or `T` suffix).
    pub fn set(&mut self, arg: &str) -> Result<(), String> {
        let (name, value) = arg
            .split_once('=')
            .ok_or_else(|| format!("limit {arg:?} is not NAME=VALUE"))?;
        let field = if name == FAULTS_PER_SESSION {
            None
        } else {
            let (_, r, s) = NAMES.iter().find(|(n, _, _)| *n == name).ok_or_else(|| {
                let mut names: Vec<&str> = NAMES.iter().map(|(n, _, _)| *n).collect();
                names.push(FAULTS_PER_SESSION);
                format!("unknown limit {name:?} (one of {})", names.join(", "))
            })?;
            Some((*r, *s))
        };
        let v = parse_size(value).ok_or_else(|| format!("limit {name}: bad value {value:?}"))?;
        if v == 0 {
            return Err(format!("limit {name}: must not be 0"));
        }
        match field {
            None if v > u64::from(u32::MAX) => {
                return Err(format!("limit {name}: at most {}", u32::MAX));
            }
            None => self.faults_per_session = v,
            Some((r, s)) => {
                if let Some(f) = self.field(r, s) {
                    *f = v;
                }
            }
        }
        Ok(())
    }
}

/// `N` with an optional binary suffix `K`, `M`, `G`, `T`.
fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], KIB),
        b'M' | b'm' => (&s[..s.len() - 1], KIB * KIB),
        b'G' | b'g' => (&s[..s.len() - 1], GIB),
        b'T' | b't' => (&s[..s.len() - 1], TIB),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_set_by_name() {
        let mut l = Limits::default();
        l.set("mapped-per-uid=4T").expect("set");
        assert_eq!(l.mapped_per_uid, 4 * TIB);
        l.set("sessions-per-uid=8").expect("set");
        assert_eq!(l.limit(Resource::Sessions, Scope::Uid), 8);
        l.set("fds-total=2k").expect("set");
        assert_eq!(l.fds_total, 2048);
        l.set("faults-per-session=16").expect("set");
        assert_eq!((l.faults_per_session, l.fault_budget()), (16, 16));
        for bad in [
            "mapped-per-uid",
            "nope=1",
            "fds-total=x",
            "fds-total=0",
            "mapped-total=99999999999T",
            "faults-per-session=0",
            "faults-per-session=4G",
        ] {
            assert!(l.set(bad).is_err(), "{bad:?} accepted");
        }
        for (n, r, s) in NAMES {
            assert_eq!(Limits::name(r, s), n);
        }
    }

    #[test]
    fn test_defaults_bound_the_address_space() {
        let l = Limits::default();
        assert!(l.mapped_total <= TIB);
        assert!(l.mapped_per_uid <= l.mapped_total);
        assert!(l.fds_total >= 64);
        assert_eq!(l.sessions_total, 128);
        assert_eq!(l.faults_per_session, 32);
    }
}
