//! The sequence-numbered UDP stream of the live-migration tests (package
//! `ioasis-guest-stream`): its receiver runs in the guest, its sender in
//! the test's network namespace.
//!
//! The guest's busybox initramfs has no C library, so the binary is built
//! static (`-C target-feature=+crt-static`, glibc's static archive, Debian
//! package libc6-dev) into `<target>/guest-static`, once per test process;
//! `IOASIS_GUEST_STREAM_BIN` names a ready binary instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::bins::BUILD_TIMEOUT;
use crate::env::{target_dir, workspace_root};
use crate::error::{io, Error, Result};
use crate::netns::Netns;
use crate::process::{run, Output, Proc};

/// Where the guest finds the binary (the script makes it executable).
pub const GUEST_PATH: &str = "bin/guest-stream";
/// The UDP port the receiver listens on.
pub const PORT: u16 = 9000;

static BUILT: Mutex<Option<std::result::Result<PathBuf, String>>> = Mutex::new(None);

/// The static `guest-stream` binary (built on first use).
pub fn guest_stream_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("IOASIS_GUEST_STREAM_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Build(format!(
                "IOASIS_GUEST_STREAM_BIN={} is not a file",
                p.display()
            )))
        };
    }
    let mut guard = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = guard.as_ref() {
        return r.clone().map_err(Error::Build);
    }
    let r = build();
    *guard = Some(r.clone());
    r.map_err(Error::Build)
}

fn build() -> std::result::Result<PathBuf, String> {
    let triple = "x86_64-unknown-linux-gnu";
    let dir = target_dir().join("guest-static");
    let exe = dir.join(triple).join("release").join("guest-stream");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args([
            "build",
            "-q",
            "-j2",
            "--release",
            "-p",
            "ioasis-guest-stream",
            "--target",
            triple,
        ])
        .arg("--target-dir")
        .arg(&dir)
        // Whatever the test's own build used (a test-only cfg, say) is not
        // this program's business.
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C strip=symbols -C debuginfo=0",
        );
    eprintln!("[ioasis-integration] building guest-stream (static)");
    match run(&mut cmd, BUILD_TIMEOUT) {
        Ok(_) if exe.is_file() => Ok(exe),
        Ok(_) => Err(format!(
            "cargo built guest-stream but {} is missing",
            exe.display()
        )),
        Err(e) => Err(format!("building guest-stream failed: {e}")),
    }
}

/// The binary's bytes, for [`QemuConfig::file`](crate::qemu::QemuConfig::file)
/// at [`GUEST_PATH`].
pub fn guest_file() -> Result<Vec<u8>> {
    let p = guest_stream_bin()?;
    std::fs::read(&p).map_err(io(format!("read {}", p.display())))
}

/// Bytes of socket receive buffer the guest's sockets get (`rmem_default`
/// and `rmem_max`): room for the records queued while the receiver holds
/// (see [`control`]); more arriving meanwhile are dropped.
pub const GUEST_RMEM: u32 = 1 << 20;

/// Guest script lines: give the first virtio-net interface the MAC address
/// `mac` (through the driver, which tells the device on its control
/// queue), address it with `cidr`, print the features its driver
/// negotiated (marker `FEATURES <bits>`, bit 0 first, as sysfs shows them)
/// and receive the stream (at most `max` records kept) until its end.
pub fn receive_script(cidr: &str, mac: &str, max: usize) -> String {
    format!(
        "IF=$(virtio_if) || {{ mark NO_NET; exit 1; }}\n\
         ip link set $IF address {mac} || {{ mark NO_MAC; exit 1; }}\n\
         net_up $IF {cidr} || exit 1\n\
         mark FEATURES $(cat /sys/class/net/$IF/device/features)\n\
         echo {GUEST_RMEM} > /proc/sys/net/core/rmem_max\n\
         echo {GUEST_RMEM} > /proc/sys/net/core/rmem_default\n\
         chmod 755 /{GUEST_PATH}\n\
         /{GUEST_PATH} recv {PORT} {max}\n"
    )
}

/// Whether feature bit `bit` is set in the `FEATURES` marker of a guest
/// console (`None`: no such marker).
pub fn negotiated(console: &str, bit: usize) -> Option<bool> {
    let bits = console
        .split("@@IOASIS:FEATURES ")
        .nth(1)?
        .split("@@")
        .next()?;
    bits.trim().as_bytes().get(bit).map(|&b| b == b'1')
}

/// Sends the control word `word` (`HOLD`, `QUIET` or `RESUME`) a few times
/// from `ns` to the receiver at `addr`: on `HOLD` it stops reading the
/// stream until `RESUME`, leaving what arrives meanwhile queued on its
/// socket; `QUIET` (also during a hold) stops the thread that keeps some
/// of its memory dirty.
pub fn control(ns: &Netns, addr: &str, word: &str, dir: &Path) -> Result<()> {
    let bin = guest_stream_bin()?;
    let mut cmd = ns.command(&bin);
    cmd.args(["ctl", &format!("{addr}:{}", PORT + 1), word]);
    let mut proc = Proc::spawn("stream-ctl", &mut cmd, dir, Output::Split)?;
    let status = proc.wait_timeout(std::time::Duration::from_secs(10))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            cmd: format!("guest-stream ctl {addr} {word}"),
            status,
            stderr: proc.log_tail(),
        })
    }
}

/// A sender running in `ns` towards `addr` (the guest's address) at `pps`
/// records per second until `stop` exists.
#[derive(Debug)]
pub struct Sender {
    proc: Proc,
    stop: PathBuf,
}

impl Sender {
    /// Starts the sender; its output goes to `dir`.
    pub fn start(ns: &Netns, addr: &str, pps: u32, dir: &Path) -> Result<Sender> {
        let bin = guest_stream_bin()?;
        let stop = dir.join("stream.stop");
        let mut cmd = ns.command(&bin);
        cmd.args(["send", &format!("{addr}:{PORT}"), &pps.to_string()])
            .arg(&stop);
        let proc = Proc::spawn("stream-sender", &mut cmd, dir, Output::Split)?;
        Ok(Sender { proc, stop })
    }

    /// Asks it to send the end records and waits for it; returns how many
    /// records it sent.
    pub fn finish(mut self) -> Result<u64> {
        std::fs::write(&self.stop, b"").map_err(io("create the stop file"))?;
        self.proc.wait_timeout(std::time::Duration::from_secs(30))?;
        let out = self.proc.stdout_text();
        out.trim()
            .strip_prefix("sent ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::Parse {
                what: "the sender's count".into(),
                path: self.proc.stdout_path().to_path_buf(),
                detail: out.clone(),
            })
    }
}
