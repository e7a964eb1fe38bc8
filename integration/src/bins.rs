//! Locating the workspace's daemons and examples (e.g. `vdpa-net`).
//!
//! Cargo offers `CARGO_BIN_EXE_<name>` only for binaries of the test's own
//! package, so the harness finds the daemons itself:
//!
//! 1. `IOASIS_<NAME>_BIN` (upper case, `-` as `_`, e.g. `IOASIS_VDPA_NET_BIN`)
//!    names a binary to use as is (benchmarks point it at a release build,
//!    or at the build of another commit to compare); it must be a file;
//! 2. otherwise the harness runs `cargo build -p <package> --bin <name>` once
//!    per test process, in the profile of the running test (a nested cargo
//!    build in the same target directory is safe: `cargo test` holds no build
//!    lock while tests run), and uses `target/<profile>/<name>`.
//!
//! Whatever goes wrong in 2 (the build fails, the package has no such
//! target, cargo built it but the file is missing) is [`Error::Build`],
//! which fails the test everywhere: these binaries are part of the
//! workspace, not prerequisites a machine may lack, and an older binary
//! left in `target/` by an earlier build is never used in their place.
//!
//! `scripts/test.sh` builds every binary before the tests (and stops if that
//! fails), so there the nested build is a fast no-op.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::env::{profile_dir, workspace_root};
use crate::error::{Error, Result};
use crate::process::run;

/// Longest time a nested `cargo build` of one daemon may take.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

static BUILT: Mutex<Option<HashMap<String, std::result::Result<PathBuf, String>>>> =
    Mutex::new(None);

/// Returns the path of workspace binary `bin` from package `package`, building it once.
///
/// Any failure to build or find it is [`Error::Build`] with the reason.
pub fn workspace_bin(package: &str, bin: &str) -> Result<PathBuf> {
    workspace_target(package, bin, Kind::Bin, None)
}

/// Like [`workspace_bin`] for an example (`target/<profile>/examples/<name>`).
pub fn workspace_example(package: &str, example: &str) -> Result<PathBuf> {
    workspace_target(package, example, Kind::Example, None)
}

/// Like [`workspace_example`] for an example that needs cargo features of
/// its package (`features`: a comma-separated list, as `cargo build
/// --features` takes it). Give such an example a name of its own, so that
/// its build never replaces the one without the features.
pub fn workspace_example_with(package: &str, example: &str, features: &str) -> Result<PathBuf> {
    workspace_target(package, example, Kind::Example, Some(features))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bin,
    Example,
}

fn workspace_target(
    package: &str,
    bin: &str,
    kind: Kind,
    features: Option<&str>,
) -> Result<PathBuf> {
    let var = format!("IOASIS_{}_BIN", bin.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Build(format!("{var}={} is not a file", p.display())))
        };
    }
    let mut guard = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let cache = guard.get_or_insert_with(HashMap::new);
    let key = format!("{package}/{bin}/{kind:?}/{features:?}");
    if let Some(r) = cache.get(&key) {
        return r.clone().map_err(Error::Build);
    }
    let r = build(package, bin, kind, features);
    cache.insert(key, r.clone());
    r.map_err(Error::Build)
}

fn build(
    package: &str,
    bin: &str,
    kind: Kind,
    features: Option<&str>,
) -> std::result::Result<PathBuf, String> {
    let profile = profile_dir().ok_or("cannot tell the target directory of this test")?;
    let (exe, flag) = match kind {
        Kind::Bin => (profile.join(bin), "--bin"),
        Kind::Example => (profile.join("examples").join(bin), "--example"),
    };
    let release = profile.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "-q", "-j2", "-p", package, flag, bin]);
    if release {
        cmd.arg("--release");
    }
    if let Some(f) = features {
        cmd.args(["--features", f]);
    }
    eprintln!("[ioasis-integration] building {bin} (cargo build -p {package} {flag} {bin})");
    match run(&mut cmd, BUILD_TIMEOUT) {
        Ok(_) if exe.is_file() => Ok(exe),
        Ok(_) => Err(format!(
            "cargo built {package} but {} does not exist",
            exe.display()
        )),
        Err(Error::Command { stderr, .. }) => {
            let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(format!(
                "building {bin} (cargo build -p {package} {flag} {bin}) failed:\n{}",
                tail.join("\n")
            ))
        }
        Err(other) => Err(format!("building {bin} failed: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target the workspace does not have is a failure, not a skip.
    /// (Checked to fail with the earlier rule, which made it
    /// `Error::Unavailable`.)
    #[test]
    fn test_missing_target_is_a_build_error() {
        let r = workspace_bin("vdpa-net", "no-such-daemon");
        assert!(
            matches!(&r, Err(Error::Build(why)) if why.contains("no-such-daemon")),
            "{r:?}"
        );
    }
}
