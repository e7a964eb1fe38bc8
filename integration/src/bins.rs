//! Locating the workspace's daemons (e.g. `vdpa-net`).
//!
//! Cargo offers `CARGO_BIN_EXE_<name>` only for binaries of the test's own
//! package, so the harness finds the daemons itself:
//!
//! 1. `IOASIS_<NAME>_BIN` (upper case, `-` as `_`, e.g. `IOASIS_VDPA_NET_BIN`)
//!    names a binary to use as is (benchmarks point it at a release build);
//! 2. otherwise the harness runs `cargo build -p <package> --bin <name>` once
//!    per test process, in the profile of the running test (a nested cargo
//!    build in the same target directory is safe: `cargo test` holds no build
//!    lock while tests run), and uses `target/<profile>/<name>`.
//!
//! `scripts/test.sh` builds every binary before the tests, so there the
//! nested build is a fast no-op.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::env::{profile_dir, strict, workspace_root};
use crate::error::{Error, Result};
use crate::process::run;

/// Longest time a nested `cargo build` of one daemon may take.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

static BUILT: Mutex<Option<HashMap<String, std::result::Result<PathBuf, String>>>> =
    Mutex::new(None);

/// Returns the path of workspace binary `bin` from package `package`, building it once.
///
/// A package without that binary yet, or a build failure, is
/// [`Error::Unavailable`] with the reason (in CI, tests turn that into a failure).
pub fn workspace_bin(package: &str, bin: &str) -> Result<PathBuf> {
    workspace_target(package, bin, Kind::Bin)
}

/// Like [`workspace_bin`] for an example (`target/<profile>/examples/<name>`).
pub fn workspace_example(package: &str, example: &str) -> Result<PathBuf> {
    workspace_target(package, example, Kind::Example)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bin,
    Example,
}

fn workspace_target(package: &str, bin: &str, kind: Kind) -> Result<PathBuf> {
    let var = format!("IOASIS_{}_BIN", bin.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Unavailable(format!(
                "{var}={} is not a file",
                p.display()
            )))
        };
    }
    let mut guard = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let cache = guard.get_or_insert_with(HashMap::new);
    let key = format!("{package}/{bin}/{kind:?}");
    if let Some(r) = cache.get(&key) {
        return r.clone().map_err(Error::Unavailable);
    }
    let r = build(package, bin, kind);
    cache.insert(key, r.clone());
    r.map_err(Error::Unavailable)
}

fn build(package: &str, bin: &str, kind: Kind) -> std::result::Result<PathBuf, String> {
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
    eprintln!("[ioasis-integration] building {bin} (cargo build -p {package} {flag} {bin})");
    match run(&mut cmd, BUILD_TIMEOUT) {
        Ok(_) if exe.is_file() => Ok(exe),
        Ok(_) => Err(format!(
            "cargo built {package} but {} does not exist",
            exe.display()
        )),
        Err(e) => {
            let why = match &e {
                Error::Command { stderr, .. }
                    if stderr.contains("no bin target named")
                        || stderr.contains("no example target named") =>
                {
                    format!("package {package} has no {flag} `{bin}` yet")
                }
                Error::Command { stderr, .. } => {
                    let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    format!("building {bin} failed:\n{}", tail.join("\n"))
                }
                other => format!("building {bin} failed: {other}"),
            };
            if exe.is_file() && !strict() {
                eprintln!(
                    "!!!!!!!! [ioasis-integration] {why}\n!!!!!!!! using the existing, possibly stale {}",
                    exe.display()
                );
                Ok(exe)
            } else {
                Err(why)
            }
        }
    }
}
