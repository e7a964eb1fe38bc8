//! The service's books: what each session, each user and the service as a
//! whole hold, checked against [`Limits`].

use std::collections::HashMap;

use thiserror::Error;

use crate::limits::{Limits, Resource, Scope};

/// Counts of every [`Resource`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage([u64; Resource::ALL.len()]);

impl Usage {
    /// The count of `r`.
    pub fn get(&self, r: Resource) -> u64 {
        self.0[r.index()]
    }

    fn add(&mut self, r: Resource, n: u64) {
        let v = &mut self.0[r.index()];
        *v = v.saturating_add(n);
    }

    fn sub(&mut self, r: Resource, n: u64) {
        let v = &mut self.0[r.index()];
        *v = v.saturating_sub(n);
    }

    fn is_zero(&self) -> bool {
        self.0.iter().all(|v| *v == 0)
    }
}

/// A charge refused: which limit it would pass.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "{resource}: {asked} more would pass the {scope} limit of {limit} ({used} held; \
     the daemon raises it with --limit {name}=N)"
)]
pub struct Exceeded {
    /// What was asked for.
    pub resource: Resource,
    /// Whose limit.
    pub scope: Scope,
    /// Held already in that scope.
    pub used: u64,
    /// Asked for.
    pub asked: u64,
    /// The limit.
    pub limit: u64,
    /// The limit's `--limit` name.
    pub name: &'static str,
}

/// Charges and releases per session, per user and in total.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    limits: Limits,
    uids: HashMap<u32, Usage>,
    total: Usage,
}

impl Ledger {
    pub fn new(limits: Limits) -> Ledger {
        Ledger {
            limits,
            uids: HashMap::new(),
            total: Usage::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// What user `uid`'s sessions hold.
    pub fn uid_usage(&self, uid: u32) -> Usage {
        self.uids.get(&uid).copied().unwrap_or_default()
    }

    /// What all sessions hold.
    pub fn total(&self) -> Usage {
        self.total
    }

    /// Charges `n` of `r` to a session of user `uid` whose own count is
    /// `session`, unless that passes a limit (then nothing is charged).
    pub fn charge(
        &mut self,
        uid: u32,
        session: &mut Usage,
        r: Resource,
        n: u64,
    ) -> Result<(), Exceeded> {
        self.check(uid, session, r, n)?;
        session.add(r, n);
        self.uids.entry(uid).or_default().add(r, n);
        self.total.add(r, n);
        Ok(())
    }

    /// Whether [`Ledger::charge`] would succeed (charges nothing).
    pub fn check(&self, uid: u32, session: &Usage, r: Resource, n: u64) -> Result<(), Exceeded> {
        let user = self.uid_usage(uid);
        for (scope, used) in [
            (Scope::Session, session.get(r)),
            (Scope::Uid, user.get(r)),
            (Scope::Service, self.total.get(r)),
        ] {
            let limit = self.limits.limit(r, scope);
            if used.checked_add(n).is_none_or(|v| v > limit) {
                return Err(Exceeded {
                    resource: r,
                    scope,
                    used,
                    asked: n,
                    limit,
                    name: Limits::name(r, scope),
                });
            }
        }
        Ok(())
    }

    /// Gives back `n` of `r` charged to a session of `uid`.
    pub fn release(&mut self, uid: u32, session: &mut Usage, r: Resource, n: u64) {
        session.sub(r, n);
        self.total.sub(r, n);
        if let Some(u) = self.uids.get_mut(&uid) {
            u.sub(r, n);
            if u.is_zero() {
                self.uids.remove(&uid);
            }
        }
    }

    /// Gives back everything a session of `uid` holds.
    pub fn release_all(&mut self, uid: u32, session: &mut Usage) {
        for r in Resource::ALL {
            let n = session.get(r);
            self.release(uid, session, r, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            mapped_per_uid: 100,
            mapped_total: 150,
            sessions_per_uid: 2,
            sessions_total: 3,
            ..Limits::default()
        }
    }

    #[test]
    fn test_each_scope_bounds_its_count() {
        let mut l = Ledger::new(limits());
        let (mut a, mut b, mut c) = (Usage::default(), Usage::default(), Usage::default());
        l.charge(1, &mut a, Resource::MappedBytes, 60).expect("a");
        let e = l
            .charge(1, &mut b, Resource::MappedBytes, 41)
            .expect_err("uid 1 past 100");
        assert_eq!((e.scope, e.used, e.limit), (Scope::Uid, 60, 100));
        assert_eq!(e.name, "mapped-per-uid");
        l.charge(1, &mut b, Resource::MappedBytes, 40).expect("b");
        l.charge(2, &mut c, Resource::MappedBytes, 50).expect("c");
        let e = l
            .charge(2, &mut c, Resource::MappedBytes, 1)
            .expect_err("total past 150");
        assert_eq!(e.scope, Scope::Service);
        l.release(1, &mut a, Resource::MappedBytes, 60);
        assert_eq!(l.uid_usage(1).get(Resource::MappedBytes), 40);
        l.charge(2, &mut c, Resource::MappedBytes, 1)
            .expect("room again");
        l.release_all(1, &mut b);
        l.release_all(2, &mut c);
        assert_eq!(l.total(), Usage::default());
        assert!(l.uids.is_empty());
    }

    #[test]
    fn test_sessions_per_uid_and_ceiling() {
        let mut l = Ledger::new(limits());
        let mut s: Vec<Usage> = vec![Usage::default(); 5];
        l.charge(1, &mut s[0], Resource::Sessions, 1).expect("1");
        l.charge(1, &mut s[1], Resource::Sessions, 1).expect("2");
        assert!(l.charge(1, &mut s[2], Resource::Sessions, 1).is_err());
        l.charge(2, &mut s[3], Resource::Sessions, 1)
            .expect("other user");
        let e = l
            .charge(3, &mut s[4], Resource::Sessions, 1)
            .expect_err("ceiling");
        assert_eq!(e.scope, Scope::Service);
    }
}
