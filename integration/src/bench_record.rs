//! What a benchmark records about its run besides its figures: the commit
//! measured and the machine's load, printed at the start and the end so a
//! figure can be read against both.

use std::process::Command;

/// The load average (1, 5, 15 minutes), or "?".
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The commit measured: `IOASIS_BENCH_COMMIT` (set by the `scripts/bench-*.sh`
/// wrappers), else `git rev-parse --short HEAD` with `-dirty` when tracked
/// files differ from it.
pub fn commit() -> String {
    if let Ok(c) = std::env::var("IOASIS_BENCH_COMMIT") {
        if !c.is_empty() {
            return c;
        }
    }
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(c) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(s) if !s.is_empty() => format!("{c}-dirty"),
            Some(_) => c,
            None => format!("{c} (tree state unknown)"),
        },
        None => "unknown (not a git checkout)".into(),
    }
}
