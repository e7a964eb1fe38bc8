//! A service's settings as an administrator gives them on a daemon's
//! command line.

use crate::ownership::Grants;

/// What a daemon's administrator sets for its `/dev/iommu` service: who may
/// attach which device. Daemons hand the service's options to
/// [`ServiceOptions::set`] and apply them with
/// [`super::Service::configure`].
#[derive(Debug, Clone, Default)]
pub struct ServiceOptions {
    /// Who may attach which device ([`Grants`]).
    pub grants: Grants,
}

impl ServiceOptions {
    /// The options, for a daemon's usage line.
    pub const USAGE: &'static str = "[--grant DEVICE=WHO]...";

    /// Help text, one option per line.
    pub const HELP: &'static str = "  --grant DEVICE=WHO  grant a device (or * for every device without a grant) to WHO:\n                      a uid, uid:N, gid:N, pid:N or any; repeatable. Without grants a\n                      device is granted to the user the daemon runs as";

    /// Whether `flag` is one of these options.
    pub fn accepts(flag: &str) -> bool {
        matches!(flag, "--grant")
    }

    /// Applies `flag` with its `value`.
    pub fn set(&mut self, flag: &str, value: &str) -> Result<(), String> {
        match flag {
            "--grant" => self
                .grants
                .grant_arg(value)
                .map_err(|e| format!("--grant: {e}")),
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
        assert!(o.set("--nope", "1").is_err());
    }
}
