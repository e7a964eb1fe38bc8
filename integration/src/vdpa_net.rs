//! Launching the `vdpa-net` daemon and reading its statistics.
//!
//! The command line follows the daemon's documented spelling:
//! `vdpa-net --socket-path PATH --port PORT [--queues N] [--mac MAC]
//! [--stats-interval SECS] [--poll-us N]` for one device, or a repeated
//! `--device socket=PATH,port=PORT[,queues=N][,mac=MAC]` for several. Ports
//! are `tap=IFNAME`, `switch=NAME`, `sink` and `reflect`.
//!
//! Statistics are one JSON object per line on standard output, with
//! per-device and per-queue counters (`rx_packets`, `rx_bytes`,
//! `tx_packets`, `tx_bytes`, `drops`, `errors`; rx = frames the frontend
//! sent). The harness does not depend on the exact nesting: a counter of a
//! subtree is the field itself where an object has it (an aggregate), or the
//! sum over its children otherwise, so totals are never counted twice.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::bins::workspace_bin;
use crate::error::{Error, Result};
use crate::netns::Netns;
use crate::process::{wait_for_path, Output, Proc};

/// How long the daemon may take to create its sockets.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The path of the `vdpa-net` binary (built on first use; see [`crate::bins`]).
pub fn vdpa_net_bin() -> Result<PathBuf> {
    workspace_bin("vdpa-net", "vdpa-net")
}

/// Runs vdpa-net `bin` with its workers pinned to `cpu`: through
/// `--worker-cpus CPU` added to `cfg`, so the connection thread (IOTLB
/// updates, ring setup) stays free to run elsewhere as DPDK's control
/// threads stay off its polling lcores; for a build without that option
/// (an older binary compared against), the whole process under
/// `taskset -c CPU` through a wrapper script written in `dir`, or unpinned
/// with a warning when taskset is missing. Returns the program to start.
pub fn pin_workers(bin: &Path, cpu: u32, cfg: &mut VdpaNetConfig, dir: &Path) -> Result<PathBuf> {
    let help = std::process::Command::new(bin)
        .arg("--help")
        .output()
        .map_err(|e| Error::Io {
            what: format!("{} --help", bin.display()),
            source: e,
        })?;
    if String::from_utf8_lossy(&help.stdout).contains("--worker-cpus") {
        *cfg = std::mem::take(cfg)
            .arg("--worker-cpus")
            .arg(&cpu.to_string());
        return Ok(bin.to_path_buf());
    }
    let Some(ts) = crate::env::which("taskset") else {
        log::warn!("taskset missing: {} runs unpinned", bin.display());
        return Ok(bin.to_path_buf());
    };
    let path = dir.join(format!("vdpa-net-pinned-cpu{cpu}.sh"));
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nexec {} -c {cpu} {} \"$@\"\n",
            ts.display(),
            bin.display()
        ),
    )
    .map_err(|e| Error::Io {
        what: format!("write {}", path.display()),
        source: e,
    })?;
    crate::process::run(
        std::process::Command::new("chmod").arg("+x").arg(&path),
        Duration::from_secs(10),
    )?;
    Ok(path)
}

/// One device the daemon serves.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// Its port (`sink`, `reflect`, `tap=IFNAME`, `switch=NAME`).
    pub port: String,
    /// Queue pairs.
    pub queues: u16,
    /// MAC address, if set.
    pub mac: Option<String>,
}

/// A daemon configuration.
#[derive(Debug, Clone, Default)]
pub struct VdpaNetConfig {
    devices: Vec<DeviceSpec>,
    stats_interval: Option<u32>,
    poll_us: Option<u32>,
    force_device_syntax: bool,
    extra: Vec<String>,
}

impl VdpaNetConfig {
    /// An empty configuration; add devices with [`VdpaNetConfig::device`].
    pub fn new() -> VdpaNetConfig {
        VdpaNetConfig::default()
    }

    /// Adds a device with one queue pair.
    pub fn device(mut self, socket: &Path, port: &str) -> VdpaNetConfig {
        self.devices.push(DeviceSpec {
            socket: socket.to_path_buf(),
            port: port.to_string(),
            queues: 1,
            mac: None,
        });
        self
    }

    /// Sets the queue pairs of the last added device.
    pub fn queues(mut self, q: u16) -> VdpaNetConfig {
        if let Some(d) = self.devices.last_mut() {
            d.queues = q;
        }
        self
    }

    /// Sets the MAC of the last added device.
    pub fn mac(mut self, mac: &str) -> VdpaNetConfig {
        if let Some(d) = self.devices.last_mut() {
            d.mac = Some(mac.to_string());
        }
        self
    }

    /// Statistics every `secs` seconds.
    pub fn stats_interval(mut self, secs: u32) -> VdpaNetConfig {
        self.stats_interval = Some(secs);
        self
    }

    /// Busy-poll window in microseconds.
    pub fn poll_us(mut self, us: u32) -> VdpaNetConfig {
        self.poll_us = Some(us);
        self
    }

    /// Uses `--device` even for a single device.
    pub fn device_syntax(mut self) -> VdpaNetConfig {
        self.force_device_syntax = true;
        self
    }

    /// An extra command-line argument.
    pub fn arg(mut self, a: &str) -> VdpaNetConfig {
        self.extra.push(a.to_string());
        self
    }

    /// The devices.
    pub fn devices(&self) -> &[DeviceSpec] {
        &self.devices
    }

    /// The daemon's arguments.
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.devices.len() == 1 && !self.force_device_syntax {
            let d = &self.devices[0];
            a.push("--socket-path".to_string());
            a.push(d.socket.to_string_lossy().into_owned());
            a.push("--port".to_string());
            a.push(d.port.clone());
            if d.queues != 1 {
                a.push("--queues".to_string());
                a.push(d.queues.to_string());
            }
            if let Some(m) = &d.mac {
                a.push("--mac".to_string());
                a.push(m.clone());
            }
        } else {
            for d in &self.devices {
                let mut s = format!("socket={},port={}", d.socket.display(), d.port);
                if d.queues != 1 {
                    s.push_str(&format!(",queues={}", d.queues));
                }
                if let Some(m) = &d.mac {
                    s.push_str(&format!(",mac={m}"));
                }
                a.push("--device".to_string());
                a.push(s);
            }
        }
        if let Some(s) = self.stats_interval {
            a.push("--stats-interval".to_string());
            a.push(s.to_string());
        }
        if let Some(p) = self.poll_us {
            a.push("--poll-us".to_string());
            a.push(p.to_string());
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// The six counters of a device or queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames the frontend sent to the device.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames the device delivered to the frontend.
    pub tx_packets: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames dropped.
    pub drops: u64,
    /// Errors (bad descriptors and the like).
    pub errors: u64,
}

/// The counter `field` of a JSON subtree: the field itself where an object
/// has it, the sum over children otherwise.
pub fn sum_field(v: &Value, field: &str) -> u64 {
    match v {
        Value::Object(m) => match m.get(field).and_then(Value::as_u64) {
            Some(n) => n,
            None => m.values().map(|c| sum_field(c, field)).sum(),
        },
        Value::Array(a) => a.iter().map(|c| sum_field(c, field)).sum(),
        _ => 0,
    }
}

/// The smallest object in `v` that names `socket` (by full path or file name).
pub fn find_device<'a>(v: &'a Value, socket: &Path) -> Option<&'a Value> {
    let full = socket.to_string_lossy();
    let file = socket
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    fn walk<'a>(v: &'a Value, full: &str, file: &str) -> Option<&'a Value> {
        match v {
            Value::Object(m) => {
                for c in m.values() {
                    if let Some(hit) = walk(c, full, file) {
                        return Some(hit);
                    }
                }
                m.values()
                    .any(|c| {
                        c.as_str()
                            .is_some_and(|s| s == full || s.ends_with(&format!("/{file}")))
                    })
                    .then_some(v)
            }
            Value::Array(a) => a.iter().find_map(|c| walk(c, full, file)),
            _ => None,
        }
    }
    walk(v, &full, &file)
}

/// The counters of a JSON subtree.
pub fn counters(v: &Value) -> Counters {
    Counters {
        rx_packets: sum_field(v, "rx_packets"),
        rx_bytes: sum_field(v, "rx_bytes"),
        tx_packets: sum_field(v, "tx_packets"),
        tx_bytes: sum_field(v, "tx_bytes"),
        drops: sum_field(v, "drops"),
        errors: sum_field(v, "errors"),
    }
}

/// A running daemon; killed on drop.
#[derive(Debug)]
pub struct VdpaNet {
    proc: Proc,
    cfg: VdpaNetConfig,
}

impl VdpaNet {
    /// Starts the daemon (inside `netns` if given) and waits for its sockets.
    pub fn spawn(cfg: &VdpaNetConfig, dir: &Path, netns: Option<&Netns>) -> Result<VdpaNet> {
        let bin = vdpa_net_bin()?;
        Self::spawn_bin(&bin, cfg, dir, netns)
    }

    /// Like [`VdpaNet::spawn`], with an explicit binary.
    pub fn spawn_bin(
        bin: &Path,
        cfg: &VdpaNetConfig,
        dir: &Path,
        netns: Option<&Netns>,
    ) -> Result<VdpaNet> {
        for d in &cfg.devices {
            let _ = std::fs::remove_file(&d.socket);
        }
        let mut cmd = match netns {
            Some(ns) => ns.command(bin),
            None => std::process::Command::new(bin),
        };
        cmd.args(cfg.args());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut proc = Proc::spawn("vdpa-net", &mut cmd, dir, Output::Split)?;
        for d in &cfg.devices {
            wait_for_path(&d.socket, START_TIMEOUT, Some(&mut proc))?;
        }
        Ok(VdpaNet {
            proc,
            cfg: cfg.clone(),
        })
    }

    /// The supervised process.
    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Fails if the daemon has exited.
    pub fn check_running(&mut self, what: &str) -> Result<()> {
        self.proc.check_running(what)
    }

    /// Every statistics line so far, parsed; a line that is not JSON is an error.
    pub fn stats_lines(&self) -> Result<Vec<Value>> {
        let text = self.proc.stdout_text();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).map_err(|e| Error::Parse {
                    what: "a statistics line (stdout must carry only JSON objects)".into(),
                    path: self.proc.stdout_path().to_path_buf(),
                    detail: format!("{e}: {l}"),
                })
            })
            .collect()
    }

    /// The newest statistics line, if any.
    pub fn last_stats(&self) -> Result<Option<Value>> {
        Ok(self.stats_lines()?.pop())
    }

    /// Waits until a statistics line satisfies `pred` (bounded).
    pub fn wait_stats(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        self.proc.wait_for_output(what, timeout, |text| {
            text.lines()
                .rev()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .next()
                .filter(|v| pred(v))
        })
    }

    /// Counters of the device on `socket` in a statistics line (whole line if
    /// the device cannot be told apart, e.g. a single-device daemon).
    pub fn device_counters(&self, line: &Value, socket: &Path) -> Counters {
        match find_device(line, socket) {
            Some(dev) => counters(dev),
            None if self.cfg.devices.len() == 1 => counters(line),
            None => Counters::default(),
        }
    }

    /// SIGTERM, waits for a clean exit (status 0) and returns the final statistics line.
    pub fn stop(&mut self, timeout: Duration) -> Result<Value> {
        let status = self.proc.stop(Signal::SIGTERM, timeout)?;
        if !status.success() {
            return Err(Error::ExitedEarly {
                name: "vdpa-net".into(),
                status,
                what: "a clean exit (status 0) on SIGTERM".into(),
                context: self.proc.log_tail(),
            });
        }
        self.last_stats()?.ok_or_else(|| Error::Parse {
            what: "the final statistics line".into(),
            path: self.proc.stdout_path().to_path_buf(),
            detail: self.proc.log_tail(),
        })
    }

    /// The ends of the daemon's logs.
    pub fn log_tail(&self) -> String {
        self.proc.log_tail()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_sum_field_prefers_aggregates() {
        let v: Value = serde_json::from_str(
            r#"{"devices":[{"socket":"/tmp/a.sock","rx_packets":7,"queues":[{"rx_packets":3},{"rx_packets":4}]},
                            {"socket":"/tmp/b.sock","queues":[{"rx_packets":1},{"rx_packets":2}]}]}"#,
        )
        .expect("json");
        assert_eq!(sum_field(&v, "rx_packets"), 10);
        let b = find_device(&v, Path::new("/tmp/b.sock")).expect("device b");
        assert_eq!(counters(b).rx_packets, 3);
        assert!(find_device(&v, Path::new("/tmp/c.sock")).is_none());
    }

    #[test]
    fn test_args_single_and_multi() {
        let one = VdpaNetConfig::new()
            .device(Path::new("/s"), "sink")
            .queues(2)
            .stats_interval(1);
        assert_eq!(
            one.args(),
            [
                "--socket-path",
                "/s",
                "--port",
                "sink",
                "--queues",
                "2",
                "--stats-interval",
                "1"
            ]
        );
        let two = VdpaNetConfig::new()
            .device(Path::new("/a"), "switch=sw")
            .device(Path::new("/b"), "switch=sw")
            .mac("52:54:00:00:00:02");
        assert_eq!(
            two.args(),
            [
                "--device",
                "socket=/a,port=switch=sw",
                "--device",
                "socket=/b,port=switch=sw,mac=52:54:00:00:00:02"
            ]
        );
    }
}
