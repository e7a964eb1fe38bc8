//! A service's settings as an administrator gives them on a daemon's
//! command line.

use crate::ownership::Grants;
use crate::Limits;

/// What a daemon's administrator sets for its `/dev/iommu` service: who may
/// attach which device ([`Grants::grant`], from `--grant DEVICE=WHO`), and
/// what sessions may hold ([`Limits::set`], from `--limit NAME=VALUE`).
/// Daemons apply them with [`super::Service::configure`].
#[derive(Debug, Clone, Default)]
pub struct ServiceOptions {
    /// Who may attach which device ([`Grants`]).
    pub grants: Grants,
    /// What sessions may hold ([`Limits`]).
    pub limits: Limits,
}

impl ServiceOptions {
    /// The `--limit` names with their defaults, for a daemon's help text
    /// (`tests::test_limits_help_names_every_limit` keeps it in step with
    /// [`Limits`]).
    pub const LIMITS_HELP: &'static str = "\
Limits (--limit NAME=VALUE; sizes take K, M, G or T):
  mapped-per-uid 64G, mapped-total 1T, fds-per-session 512, fds-per-uid 1024,
  fds-total half of RLIMIT_NOFILE, objects-per-session 1024, objects-per-uid 4096,
  objects-total 16384, sessions-per-uid 32, sessions-total 128, faults-per-session 32.";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Resource, Scope};

    /// Every limit is named in [`ServiceOptions::LIMITS_HELP`] with its
    /// default (but `fds-total`, which follows `RLIMIT_NOFILE`), and no
    /// other. (Checked to fail with `mapped-total 2T` written in the text.)
    #[test]
    fn test_limits_help_names_every_limit() {
        let d = Limits::default();
        let items: Vec<&str> = ServiceOptions::LIMITS_HELP
            .lines()
            .skip(1)
            .flat_map(|l| l.split(','))
            .map(|i| i.trim().trim_end_matches('.'))
            .filter(|i| !i.is_empty())
            .collect();
        let mut named = 0;
        for r in Resource::ALL {
            for s in [Scope::Session, Scope::Uid, Scope::Service] {
                let name = Limits::name(r, s);
                if name == "(none)" {
                    continue;
                }
                named += 1;
                let v = d.limit(r, s);
                let want = match (name, r) {
                    ("fds-total", _) => format!("{name} half of RLIMIT_NOFILE"),
                    (_, Resource::MappedBytes) => format!("{name} {}", size(v)),
                    _ => format!("{name} {v}"),
                };
                assert!(items.contains(&want.as_str()), "{want:?} in {items:?}");
            }
        }
        // Not a resource of the ledger (see `Limits::faults_per_session`).
        let want = format!("faults-per-session {}", d.faults_per_session);
        assert!(items.contains(&want.as_str()), "{want:?} in {items:?}");
        assert_eq!(named + 1, items.len());
    }

    /// A size with the largest suffix that divides it.
    fn size(v: u64) -> String {
        for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if v >= 1 << shift && v % (1 << shift) == 0 {
                return format!("{}{suffix}", v >> shift);
            }
        }
        v.to_string()
    }
}
