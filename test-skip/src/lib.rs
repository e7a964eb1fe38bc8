//! The one way a test of the ioasis workspace says that it did not run.
//!
//! Some tests need what a machine may lack: QEMU, DPDK's testpmd, a guest
//! kernel, root for network namespaces and taps, or a timing premise that a
//! loaded machine may not give. Such a test calls [`skip`] (or [`skip_as`])
//! and returns. The call
//!
//! 1. prints a loud `SKIPPED` notice on standard error (which `cargo test`
//!    shows only for failing tests, hence the next point);
//! 2. appends one line, `<test>\t<reason>\n`, to the file named by
//!    [`LOG_ENV`] (`IOASIS_SKIP_LOG`) when it is set. `scripts/test.sh` sets
//!    it, and ends with `== skipped: N` and one line per skip read from that
//!    file. The line is written with one `write` on a file opened with
//!    `O_APPEND`, so tests running in parallel threads and processes never
//!    interleave their lines. A log that is named but cannot be written fails
//!    the test: a skip must never be lost;
//! 3. under [`strict`] mode (`CI` set, or `IOASIS_REQUIRE_FRONTENDS=1`)
//!    panics after recording, so in CI a test that cannot run fails, and
//!    `scripts/test.sh` fails too because the skip count is not zero.
//!
//! `<test>` is the test executable's name without cargo's hash (the crate,
//! or the file under `tests/`), `::`, and the test's name: the name passed to
//! [`skip_as`], or, for [`skip`], the name of the current thread, which the
//! standard test harness sets to the test's path (`port::tap::tests::test_x`).
//!
//! This is its own crate, with no dependencies, so that every crate of the
//! workspace reaches it the same way (as a dev-dependency; the integration
//! harness, a test-only crate, as a dependency) without any crate depending
//! on one above it, and without a test concern in a product crate's API.

use std::fmt::Display;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The environment variable naming the file skips are appended to.
pub const LOG_ENV: &str = "IOASIS_SKIP_LOG";

/// Whether a skip must fail the test: `CI` or `IOASIS_REQUIRE_FRONTENDS` set
/// to anything but empty, `0` or `false` (any case).
pub fn strict() -> bool {
    ["IOASIS_REQUIRE_FRONTENDS", "CI"]
        .iter()
        .any(|var| std::env::var(var).is_ok_and(|v| on(&v)))
}

fn on(v: &str) -> bool {
    !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false")
}

/// Records that the current test skips for `reason` (see the crate docs);
/// the test is named after the current thread. Panics in [`strict`] mode.
///
/// Call it on the test's own thread, then return from the test.
#[track_caller]
pub fn skip(reason: impl Display) {
    skip_as(&current_test(), reason);
}

/// Like [`skip`], naming the test `test` rather than after the current thread.
#[track_caller]
pub fn skip_as(test: &str, reason: impl Display) {
    let log = std::env::var_os(LOG_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    record(log.as_deref(), strict(), test, &reason.to_string());
}

/// The name the standard test harness gave the current thread, or a
/// placeholder off a test thread.
fn current_test() -> String {
    match std::thread::current().name() {
        Some(n) if n != "main" => n.to_string(),
        _ => "(unnamed test thread)".to_string(),
    }
}

/// The running executable's name without cargo's `-<hash>` suffix.
fn executable() -> String {
    let exe = std::env::current_exe().ok();
    let name = exe
        .as_deref()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "?".to_string());
    match name.rsplit_once('-') {
        Some((stem, hash))
            if !stem.is_empty()
                && hash.len() == 16
                && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            stem.to_string()
        }
        _ => name,
    }
}

/// One field of a log line: no tabs or line breaks, no surrounding blanks.
fn field(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    s.trim().to_string()
}

/// The log line for a skip of `test` (already qualified) for `reason`.
fn line(test: &str, reason: &str) -> String {
    format!("{}\t{}\n", field(test), field(reason))
}

#[track_caller]
fn record(log: Option<&Path>, strict: bool, test: &str, reason: &str) {
    let test = format!("{}::{test}", executable());
    let reason = field(reason);
    eprintln!(
        "\n!!!!!!!! SKIPPED {test}: {reason}\n!!!!!!!! (with CI=true or IOASIS_REQUIRE_FRONTENDS=1 this is a failure)\n"
    );
    if let Some(log) = log {
        if let Err(e) = append(log, &line(&test, &reason)) {
            panic!(
                "{test} skipped ({reason}), and the skip cannot be recorded in {LOG_ENV}={}: {e}",
                log.display()
            );
        }
    }
    if strict {
        panic!(
            "{test} skipped: {reason} (a skip fails under CI=true or IOASIS_REQUIRE_FRONTENDS=1)"
        );
    }
}

/// Appends `line` with a single `write` on an `O_APPEND` file.
fn append(log: &Path, line: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(log)?;
    let n = f.write(line.as_bytes())?;
    if n == line.len() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "short write ({n} of {} bytes)",
            line.len()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::catch_unwind;

    fn scratch(tag: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("ioasis-test-skip-{tag}-{}.tsv", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// Each skip is one line `<exe>::<test>\t<reason>`, appended; control
    /// characters in the reason do not break the line format. (Checked to
    /// fail by writing the line without `append(true)`: only one line stayed.)
    #[test]
    fn test_skips_are_appended_one_line_each() {
        let p = scratch("append");
        record(Some(&p), false, "t_one", "needs root");
        record(Some(&p), false, "t_two", "no qemu\n\tin PATH");
        let text = std::fs::read_to_string(&p).expect("read log");
        let _ = std::fs::remove_file(&p);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "ioasis_test_skip::t_one\tneeds root",
                "ioasis_test_skip::t_two\tno qemu  in PATH",
            ]
        );
    }

    /// In strict mode the skip is recorded and then fails the test.
    #[test]
    fn test_strict_records_then_panics() {
        let p = scratch("strict");
        let r = catch_unwind(|| record(Some(&p), true, "t_strict", "no testpmd"));
        let text = std::fs::read_to_string(&p).expect("read log");
        let _ = std::fs::remove_file(&p);
        assert!(r.is_err(), "strict skip must panic");
        assert_eq!(text, "ioasis_test_skip::t_strict\tno testpmd\n");
    }

    /// A log that cannot be written fails the test rather than losing the skip.
    #[test]
    fn test_unwritable_log_panics() {
        let p = std::env::temp_dir().join("ioasis-test-skip-no-such-dir/x/log.tsv");
        assert!(catch_unwind(|| record(Some(&p), false, "t", "r")).is_err());
    }

    #[test]
    fn test_thread_name_is_the_test_name() {
        assert_eq!(current_test(), "tests::test_thread_name_is_the_test_name");
    }

    #[test]
    fn test_strict_values() {
        assert!(on("true") && on("1") && on("yes"));
        assert!(!on("") && !on("0") && !on("false") && !on("FALSE"));
    }
}
