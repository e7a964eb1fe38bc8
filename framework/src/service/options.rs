//! A service's settings as an administrator gives them on a daemon's
//! command line.

use super::Limits;
use crate::ownership::Grants;

/// What a daemon's administrator sets for its `/dev/iommu` service: who may
/// attach which device, and what sessions may hold. Daemons hand the service's options to
/// [`ServiceOptions::set`] and apply them with
/// [`super::Service::configure`].
#[derive(Debug, Clone, Default)]
pub struct ServiceOptions {
    /// Who may attach which device ([`Grants`]).
    pub grants: Grants,
    /// What sessions may hold ([`Limits`]).
    pub limits: Limits,
}

impl ServiceOptions {
    /// The options, for a daemon's usage line.
    pub const USAGE: &'static str = "[--grant DEVICE=WHO]... [--limit NAME=VALUE]...";

    /// Help text, one option per line.
    pub const HELP: &'static str = "  --grant DEVICE=WHO  grant a device (or * for every device without a grant) to WHO:\n                      a uid, uid:N, gid:N, pid:N or any; repeatable. Without grants a\n                      device is granted to the user the daemon runs as\n  --limit NAME=VALUE  a service limit, repeatable: mapped-per-uid (default 64G),\n                      mapped-total (1T), fds-per-session (512), fds-per-uid (1024),\n                      fds-total (half of RLIMIT_NOFILE), objects-per-session (1024),\n                      objects-per-uid (4096), objects-total (16384),\n                      sessions-per-uid (32), sessions-total (128),\n                      faults-per-session (8); sizes take K, M, G, T";

    /// Whether `flag` is one of these options.
    pub fn accepts(flag: &str) -> bool {
        matches!(flag, "--grant" | "--limit")
    }

    /// Applies `flag` with its `value`.
    pub fn set(&mut self, flag: &str, value: &str) -> Result<(), String> {
        match flag {
            "--grant" => self
                .grants
                .grant_arg(value)
                .map_err(|e| format!("--grant: {e}")),
            "--limit" => self.limits.set(value).map_err(|e| format!("--limit: {e}")),
            _ => Err(format!("{flag} is not a service option")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownership::Peer;

    #[test]
    fn test_grant_option() {
        let mut o = ServiceOptions::default();
        assert!(ServiceOptions::accepts("--grant"));
        assert!(!ServiceOptions::accepts("--grants"));
        o.set("--grant", "sva0=4242").expect("grant");
        let p = Peer {
            pid: 1,
            uid: 4242,
            gid: 1,
        };
        assert!(o.grants.allows("sva0", &p));
        assert!(o.set("--grant", "sva0").is_err());
        o.set("--limit", "mapped-per-uid=1G").expect("limit");
        assert_eq!(o.limits.mapped_per_uid, 1 << 30);
        assert!(o.set("--limit", "mapped=1G").is_err());
        assert!(o.set("--nope", "1").is_err());
    }
}
