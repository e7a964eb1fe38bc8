//! The harness's error type.

use std::path::PathBuf;
use std::process::ExitStatus;

/// Everything that can go wrong while driving external frontends and backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system or process operation failed.
    #[error("I/O error while trying to {what}")]
    Io {
        /// What the harness was doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A system call made through nix failed.
    #[error("system call failed while trying to {what}")]
    Sys {
        /// What the harness was doing.
        what: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A helper command ran but reported failure.
    #[error("command `{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: ExitStatus,
        /// The tail of its standard error.
        stderr: String,
    },
    /// A bounded wait ran out of time.
    #[error("timed out after {secs:.1} s waiting for {what}\n{context}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long the harness waited.
        secs: f64,
        /// Log tails that help to see why.
        context: String,
    },
    /// A supervised process exited before the harness expected it to.
    #[error("{name} exited early ({status}) while waiting for {what}\n{context}")]
    ExitedEarly {
        /// The process's name in the harness.
        name: String,
        /// Its exit status.
        status: ExitStatus,
        /// What was awaited.
        what: String,
        /// Log tails.
        context: String,
    },
    /// Frames were lost (or counted twice) between two sides of a run:
    /// each failed [`crate::accounting::CountCheck`], with its loss.
    #[error("packet counts disagree: {0}")]
    Lost(String),
    /// A measured quantity differs from what the workload must produce.
    #[error("{what}: expected {expected}, got {got}")]
    Mismatch {
        /// What was measured.
        what: String,
        /// The value the workload must produce.
        expected: u64,
        /// The value measured.
        got: u64,
    },
    /// Data that must arrive intact differs from what was sent.
    #[error("{what}: sent {expected}, received {got}")]
    Corrupt {
        /// What was compared.
        what: String,
        /// The sender's digest (or value).
        expected: String,
        /// The receiver's.
        got: String,
    },
    /// A prerequisite of the machine (tool, kernel, module, root) is missing:
    /// the test skips ([`crate::env::ready`]).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A binary of this workspace could not be built or found: the test fails,
    /// it never skips or falls back to an older build ([`crate::bins`]).
    #[error("workspace binary: {0}")]
    Build(String),
    /// Output of a tool could not be understood.
    #[error("cannot parse {what} in {path}: {detail}")]
    Parse {
        /// What was being parsed.
        what: String,
        /// The file it came from.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

/// Result alias for the harness.
pub type Result<T> = std::result::Result<T, Error>;

/// Attaches a description to an I/O error.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Attaches a description to a nix error.
pub(crate) fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> Error {
    let what = what.into();
    move |source| Error::Sys { what, source }
}

/// Turns a harness error into a test failure whose message shows the
/// (multi-line) context as text, rather than `expect`'s debug rendering.
pub trait OrPanic<T> {
    /// Returns the value, or panics with `what` and the error's message.
    fn or_panic(self, what: &str) -> T;
}

impl<T> OrPanic<T> for Result<T> {
    #[track_caller]
    fn or_panic(self, what: &str) -> T {
        match self {
            Ok(v) => v,
            Err(e) => panic!("{what}: {e}"),
        }
    }
}
