//! A QMP client: the commands a migration test gives QEMU (`migrate`,
//! `query-migrate`, `migrate_cancel`, `migrate-set-parameters`) over the
//! unix socket [`QemuConfig::qmp`](crate::qemu::QemuConfig::qmp) names.
//!
//! QMP is one JSON object per line; asynchronous events interleave with
//! replies and are skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{io, Error, Result};
use crate::process::wait_for_path;

/// How long one command may take to be answered.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected QMP session (capabilities negotiated).
#[derive(Debug)]
pub struct Qmp {
    out: UnixStream,
    lines: BufReader<UnixStream>,
}

/// What `query-migrate` says.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationState {
    /// `status`: `setup`, `active`, `completed`, `failed`, `cancelled`, ...
    pub status: String,
    /// Guest downtime in ms, once completed.
    pub downtime_ms: Option<u64>,
    /// Total migration time in ms.
    pub total_ms: Option<u64>,
    /// RAM bytes transferred so far.
    pub transferred: Option<u64>,
    /// The whole reply.
    pub raw: Value,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (waiting up to `timeout` for it
    /// to appear) and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        wait_for_path(path, timeout, None)?;
        let s = UnixStream::connect(path).map_err(io(format!("connect {}", path.display())))?;
        s.set_read_timeout(Some(QMP_TIMEOUT))
            .map_err(io("QMP read timeout"))?;
        let out = s.try_clone().map_err(io("clone the QMP socket"))?;
        let mut q = Qmp {
            out,
            lines: BufReader::new(s),
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(parse_err("the QMP greeting", &greeting));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .lines
            .read_line(&mut line)
            .map_err(io("read from QMP"))?;
        if n == 0 {
            return Err(Error::Io {
                what: "read from QMP".into(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| Error::Parse {
            what: "a QMP message".into(),
            path: "qmp".into(),
            detail: format!("{e}: {line}"),
        })
    }

    /// Runs `command` with `arguments`; returns its `return` value, or the
    /// QMP error as [`Error::Parse`] (with the error's text).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.out
            .write_all(line.as_bytes())
            .map_err(io(format!("send QMP {command}")))?;
        let start = Instant::now();
        // Bounded: events are few, and each read waits at most QMP_TIMEOUT.
        for _ in 0..10_000 {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if v.get("error").is_some() {
                return Err(parse_err(&format!("the reply to {command}"), &v));
            }
            if start.elapsed() > QMP_TIMEOUT {
                break;
            }
        }
        Err(Error::Timeout {
            what: format!("QMP reply to {command}"),
            secs: start.elapsed().as_secs_f64(),
            context: String::new(),
        })
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<MigrationState> {
        let r = self.execute("query-migrate", None)?;
        let num = |k: &str| r.get(k).and_then(Value::as_u64);
        Ok(MigrationState {
            status: r
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string(),
            downtime_ms: num("downtime"),
            total_ms: num("total-time"),
            transferred: r
                .get("ram")
                .and_then(|ram| ram.get("transferred"))
                .and_then(Value::as_u64),
            raw: r,
        })
    }

    /// Polls `query-migrate` every 100 ms until `done` accepts the state or
    /// `timeout` passes.
    pub fn wait_migration(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&MigrationState) -> bool,
    ) -> Result<MigrationState> {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < timeout {
            let st = self.query_migrate()?;
            if done(&st) {
                return Ok(st);
            }
            last = Some(st);
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(Error::Timeout {
            what: "the migration".into(),
            secs: start.elapsed().as_secs_f64(),
            context: format!("last state: {last:?}"),
        })
    }
}

fn parse_err(what: &str, v: &Value) -> Error {
    Error::Parse {
        what: what.into(),
        path: "qmp".into(),
        detail: v.to_string(),
    }
}
