//! What this machine offers, and what a test does when something is missing.
//!
//! Tests against real frontends need external programs (QEMU, DPDK's
//! testpmd), a guest kernel, hugepages and root. A missing piece is
//! [`Error::Unavailable`], and [`ready`] turns it into a skip through the
//! workspace's one skip helper, [`ioasis_test_skip`]: a loud notice on
//! standard error, a line in the skip log that `scripts/test.sh` counts and
//! prints at its end, and, in CI (`CI` set to anything but `false`/`0`, or
//! `IOASIS_REQUIRE_FRONTENDS=1`), a test failure, so that "skipped" can never
//! be the only outcome there. The workspace's own daemons are not
//! prerequisites of the machine: one that does not build fails the test
//! ([`crate::bins`]).

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{io, Error, Result};

/// Whether missing prerequisites must fail tests rather than skip them
/// (the workspace-wide rule of [`ioasis_test_skip::strict`]).
pub use ioasis_test_skip::strict;

/// Turns an unavailable prerequisite into a recorded skip (a failure in CI);
/// any other error fails the test.
///
/// Use as `let Some(x) = ready(test, thing()) else { return };`, with
/// `test` the test function's name.
#[track_caller]
pub fn ready<T>(test: &str, r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(Error::Unavailable(why)) => {
            ioasis_test_skip::skip_as(test, why);
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// Finds an executable in `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Like [`which`], but an absent program is [`Error::Unavailable`] with a hint.
pub fn require_tool(name: &str, package: &str) -> Result<PathBuf> {
    which(name).ok_or_else(|| {
        Error::Unavailable(format!(
            "`{name}` not found in PATH (Debian package {package}; scripts/setup.sh installs it)"
        ))
    })
}

/// Fails with [`Error::Unavailable`] unless the harness runs as root
/// (network namespaces, taps and hugepages need it).
pub fn require_root() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::Unavailable("needs root".into()))
    }
}

/// The workspace's target directory, derived from the running executable
/// (`target/<profile>/deps/<test>`), or `CARGO_TARGET_DIR`.
pub fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    profile_dir()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The profile directory (`target/debug` or `target/release`) the running executable belongs to.
pub fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?.to_path_buf();
    if dir
        .file_name()
        .is_some_and(|n| n == "deps" || n == "examples")
    {
        dir = dir.parent()?.to_path_buf();
    }
    Some(dir)
}

/// The workspace root (the integration crate's parent directory).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or(here)
}

/// A scratch directory for one test: sockets, logs, consoles.
///
/// It lives under `/tmp` (unix socket paths must stay short) and is removed
/// on drop, unless the thread is panicking or `IOASIS_KEEP_LOGS` is set:
/// then its path is printed and its logs are kept for the post-mortem (or,
/// with `RUST_LOG=debug`, for counting a daemon's messages).
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Creates `/tmp/ioasis-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Result<WorkDir> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(24)
            .collect();
        let path = std::env::temp_dir().join(format!("ioasis-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).map_err(io(format!("create {}", path.display())))?;
        Ok(WorkDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os("IOASIS_KEEP_LOGS").is_some() {
            eprintln!("logs kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Holds the machine-wide lock that serializes heavy tests (see [`heavy_lock`]).
#[derive(Debug)]
pub struct HeavyLock {
    _lock: Flock<File>,
}

/// Upper bound for waiting on the heavy-test lock.
pub const HEAVY_LOCK_TIMEOUT: Duration = Duration::from_secs(25 * 60);

/// Serializes tests that busy-poll cores or boot guests.
///
/// On a 2-core machine two testpmd pairs, or two TCG guests, running at
/// once starve each other. Every such test takes this lock first: an
/// exclusive `flock` on a file in the target directory, so it also holds
/// across the test binaries cargo runs and across concurrent `cargo test`s.
pub fn heavy_lock() -> Result<HeavyLock> {
    let dir = target_dir();
    fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let path = dir.join("ioasis-heavy-test.lock");
    let start = Instant::now();
    let interval = Duration::from_millis(100);
    let max_polls = HEAVY_LOCK_TIMEOUT.as_millis() / interval.as_millis() + 1;
    for _ in 0..max_polls {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(format!("open {}", path.display())))?;
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(HeavyLock { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {}
            Err((_, e)) => {
                return Err(Error::Sys {
                    what: format!("lock {}", path.display()),
                    source: e,
                })
            }
        }
        if start.elapsed() >= HEAVY_LOCK_TIMEOUT {
            break;
        }
        thread::sleep(interval);
    }
    Err(Error::Timeout {
        what: format!("the heavy-test lock {}", path.display()),
        secs: start.elapsed().as_secs_f64(),
        context: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_workdir_removed_on_drop() {
        let w = WorkDir::new("unit test/x").expect("workdir");
        let p = w.path().to_path_buf();
        assert!(p.is_dir());
        assert!(p.to_string_lossy().contains("ioasis-unit-test-x-"));
        drop(w);
        assert!(!p.exists());
    }

    #[test]
    fn test_which_finds_sh() {
        assert!(which("sh").is_some());
        assert!(which("surely-not-a-program-ioasis").is_none());
    }
}
