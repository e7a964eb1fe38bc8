//! Supervised child processes and bounded waiting.
//!
//! Every process the harness starts runs in its own process group with its
//! output in a log file. Dropping a [`Proc`] kills the whole group with
//! SIGKILL and reaps the child, so a failing test never leaves a frontend or
//! backend behind. Every wait is bounded in time and in iterations.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::error::{io, sys, Error, Result};

/// How many bytes of a log the harness quotes in an error.
pub const LOG_TAIL_BYTES: usize = 4096;

/// Polls `f` every `interval` until it returns `Some`, at most for `timeout`.
///
/// The number of polls is bounded by `timeout / interval + 1` as well as by
/// the clock. `context` is called on timeout to describe the situation.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
    context: impl FnOnce() -> String,
) -> Result<T> {
    let start = Instant::now();
    let max_polls = timeout.as_millis() / interval.as_millis().max(1) + 1;
    for _ in 0..max_polls {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() >= timeout {
            break;
        }
        thread::sleep(interval);
    }
    // One last look after the final sleep.
    if let Some(v) = f()? {
        return Ok(v);
    }
    Err(Error::Timeout {
        what: what.to_string(),
        secs: start.elapsed().as_secs_f64(),
        context: context(),
    })
}

/// Reads the last `max` bytes of a file as (lossy) text; empty if unreadable.
pub fn tail_file(path: &Path, max: usize) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    let start = buf.len().saturating_sub(max);
    String::from_utf8_lossy(&buf[start..]).into_owned()
}

/// Reads a whole log file as (lossy) text; empty if unreadable.
pub fn read_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Renders a command line for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a short helper command to completion (bounded by `timeout`), returning stdout.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let text = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("run `{text}`")))?;
    let status = poll_until(
        &format!("`{text}` to finish"),
        timeout,
        Duration::from_millis(10),
        || child.try_wait().map_err(io(format!("wait for `{text}`"))),
        String::new,
    );
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if !status.success() {
        return Err(Error::Command {
            cmd: text,
            status,
            stderr: err.trim().to_string(),
        });
    }
    Ok(out)
}

/// Where a supervised process's standard output and error go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Both into `<name>.log`.
    Combined,
    /// Standard output into `<name>.out`, standard error into `<name>.err`.
    Split,
}

/// A supervised child process; killed (whole process group) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    cmdline: String,
    out_path: PathBuf,
    err_path: PathBuf,
    status: Option<ExitStatus>,
    /// Its standard input, for a process started with
    /// [`Proc::spawn_with_stdin`].
    stdin: Option<ChildStdin>,
}

impl Proc {
    /// Starts `cmd` in its own process group, logging into `dir`; its
    /// standard input is empty.
    pub fn spawn(name: &str, cmd: &mut Command, dir: &Path, output: Output) -> Result<Proc> {
        Self::spawn_inner(name, cmd, dir, output, false)
    }

    /// Like [`Proc::spawn`], with standard input a pipe that
    /// [`Proc::write_stdin`] writes to (for a program driven by commands).
    pub fn spawn_with_stdin(
        name: &str,
        cmd: &mut Command,
        dir: &Path,
        output: Output,
    ) -> Result<Proc> {
        Self::spawn_inner(name, cmd, dir, output, true)
    }

    fn spawn_inner(
        name: &str,
        cmd: &mut Command,
        dir: &Path,
        output: Output,
        piped: bool,
    ) -> Result<Proc> {
        let (out_path, err_path) = match output {
            Output::Combined => {
                let p = dir.join(format!("{name}.log"));
                (p.clone(), p)
            }
            Output::Split => (
                dir.join(format!("{name}.out")),
                dir.join(format!("{name}.err")),
            ),
        };
        let out = File::create(&out_path).map_err(io(format!("create {}", out_path.display())))?;
        let err = if output == Output::Combined {
            out.try_clone().map_err(io("duplicate a log file"))?
        } else {
            File::create(&err_path).map_err(io(format!("create {}", err_path.display())))?
        };
        let cmdline = describe(cmd);
        log::info!("starting {name}: {cmdline}");
        let mut child = cmd
            .stdin(if piped { Stdio::piped() } else { Stdio::null() })
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(io(format!("start {name} (`{cmdline}`)")))?;
        let child_stdin = child.stdin.take();
        Ok(Proc {
            name: name.to_string(),
            child,
            cmdline,
            out_path,
            err_path,
            status: None,
            stdin: child_stdin,
        })
    }

    /// Writes `text` to the process's standard input (started with
    /// [`Proc::spawn_with_stdin`]); fails if it has exited or has none.
    pub fn write_stdin(&mut self, text: &str) -> Result<()> {
        self.check_running(&format!("input {:?}", text.trim()))?;
        let name = self.name.clone();
        let stdin = self.stdin.as_mut().ok_or_else(|| Error::Io {
            what: format!("write to {name}"),
            source: std::io::Error::other("standard input is not a pipe"),
        })?;
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(io(format!("write {:?} to {name}", text.trim())))
    }

    /// The process's name in the harness.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line it was started with.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The file its standard output goes to.
    pub fn stdout_path(&self) -> &Path {
        &self.out_path
    }

    /// The file its standard error goes to (the same as stdout for [`Output::Combined`]).
    pub fn stderr_path(&self) -> &Path {
        &self.err_path
    }

    /// Everything it has written to standard output so far.
    pub fn stdout_text(&self) -> String {
        read_lossy(&self.out_path)
    }

    /// The ends of its logs, for error messages.
    pub fn log_tail(&self) -> String {
        let mut s = format!(
            "--- {} ({}) stdout tail:\n{}",
            self.name,
            self.cmdline,
            tail_file(&self.out_path, LOG_TAIL_BYTES)
        );
        if self.err_path != self.out_path {
            s.push_str(&format!(
                "\n--- {} stderr tail:\n{}",
                self.name,
                tail_file(&self.err_path, LOG_TAIL_BYTES)
            ));
        }
        s
    }

    /// Its exit status, if it has exited (non-blocking).
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(io(format!("poll {}", self.name)))?;
        }
        Ok(self.status)
    }

    /// Fails with [`Error::ExitedEarly`] if the process has already exited.
    pub fn check_running(&mut self, what: &str) -> Result<()> {
        match self.try_status()? {
            None => Ok(()),
            Some(status) => Err(Error::ExitedEarly {
                name: self.name.clone(),
                status,
                what: what.to_string(),
                context: self.log_tail(),
            }),
        }
    }

    /// Sends `sig` to the main process only (e.g. SIGINT for a clean stop).
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.try_status()?.is_some() {
            return Ok(());
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        kill(pid, sig).map_err(sys(format!("send {sig} to {}", self.name)))
    }

    /// Waits at most `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let what = format!("{} to exit", self.name);
        let name = self.name.clone();
        let tail = self.log_tail();
        let child = &mut self.child;
        let status = poll_until(
            &what,
            timeout,
            Duration::from_millis(20),
            || child.try_wait().map_err(io(format!("wait for {name}"))),
            || tail,
        )?;
        self.status = Some(status);
        Ok(status)
    }

    /// Sends `sig`, then waits at most `timeout` for the exit.
    pub fn stop(&mut self, sig: Signal, timeout: Duration) -> Result<ExitStatus> {
        self.signal(sig)?;
        self.wait_timeout(timeout)
    }

    /// Kills the whole process group with SIGKILL and reaps the child.
    pub fn kill(&mut self) {
        let pgid = Pid::from_raw(self.child.id() as i32);
        // The group outlives its leader if the leader already exited (e.g. a
        // `timeout` wrapper): kill the group whenever it may still exist.
        let _ = killpg(pgid, Signal::SIGKILL);
        if self.status.is_none() {
            match self.child.wait() {
                Ok(s) => self.status = Some(s),
                Err(e) => log::warn!("reaping {} failed: {e}", self.name),
            }
        }
    }

    /// Polls the stdout log until `pred` finds something in the text, at most `timeout`.
    ///
    /// Fails early if the process exits before the text shows up.
    pub fn wait_for_output<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> Option<T>,
    ) -> Result<T> {
        let start = Instant::now();
        let interval = Duration::from_millis(50);
        let max_polls = timeout.as_millis() / interval.as_millis() + 2;
        for _ in 0..max_polls {
            if let Some(v) = pred(&self.stdout_text()) {
                return Ok(v);
            }
            if let Some(status) = self.try_status()? {
                // Give the log one more read: the text may have landed just before exit.
                if let Some(v) = pred(&self.stdout_text()) {
                    return Ok(v);
                }
                return Err(Error::ExitedEarly {
                    name: self.name.clone(),
                    status,
                    what: what.to_string(),
                    context: self.log_tail(),
                });
            }
            if start.elapsed() >= timeout {
                break;
            }
            thread::sleep(interval);
        }
        Err(Error::Timeout {
            what: what.to_string(),
            secs: start.elapsed().as_secs_f64(),
            context: self.log_tail(),
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits at most `timeout` for a path (e.g. a unix socket) to appear.
pub fn wait_for_path(path: &Path, timeout: Duration, owner: Option<&mut Proc>) -> Result<()> {
    let what = format!("{} to appear", path.display());
    match owner {
        Some(p) => {
            let start = Instant::now();
            let interval = Duration::from_millis(20);
            let max_polls = timeout.as_millis() / interval.as_millis() + 2;
            for _ in 0..max_polls {
                if path.exists() {
                    return Ok(());
                }
                p.check_running(&what)?;
                if start.elapsed() >= timeout {
                    break;
                }
                thread::sleep(interval);
            }
            Err(Error::Timeout {
                what,
                secs: start.elapsed().as_secs_f64(),
                context: p.log_tail(),
            })
        }
        None => poll_until(
            &what,
            timeout,
            Duration::from_millis(20),
            || Ok(path.exists().then_some(())),
            String::new,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_poll_until_times_out_with_context() {
        let err = poll_until(
            "nothing",
            Duration::from_millis(30),
            Duration::from_millis(10),
            || Ok(None::<()>),
            || "ctx".to_string(),
        )
        .expect_err("nothing ever comes");
        assert!(matches!(err, Error::Timeout { ref context, .. } if context == "ctx"));
    }

    #[test]
    fn test_proc_drop_kills_process_group() {
        let dir = crate::env::WorkDir::new("proc-drop").expect("workdir");
        let mut p = Proc::spawn(
            "sleeper",
            Command::new("sh").args(["-c", "sleep 30 & echo \"child $!\"; wait"]),
            dir.path(),
            Output::Combined,
        )
        .expect("spawn sh");
        let child: u32 = p
            .wait_for_output("the child's pid", Duration::from_secs(5), |t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("child ")?.trim().parse().ok())
            })
            .expect("output");
        drop(p);
        // The grandchild dies too (it may linger as a zombie until reaped).
        let dead = poll_until(
            "the grandchild to die",
            Duration::from_secs(5),
            Duration::from_millis(20),
            || {
                let stat =
                    std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next());
                Ok(matches!(state, None | Some("Z") | Some("X")).then_some(()))
            },
            String::new,
        );
        assert!(dead.is_ok(), "grandchild {child} survived the drop");
    }

    #[test]
    fn test_run_reports_failure() {
        let err = run(
            Command::new("sh").args(["-c", "echo oops >&2; exit 3"]),
            Duration::from_secs(5),
        )
        .expect_err("exit 3 is a failure");
        assert!(matches!(err, Error::Command { ref stderr, .. } if stderr == "oops"));
    }
}
