//! vhost-user-blk servers the tests and the block benchmark drive: the
//! workspace's `vdpa-blk` daemon and qemu-storage-daemon's vhost-user-blk
//! export (Debian package qemu-system-common), the reference.
//!
//! Both are started the same way from a [`BlkExport`]: a socket, an image
//! ([`Image::File`], or [`Image::Null`], a disk whose reads return zeroes
//! and which does no I/O: `null:SIZE` for vdpa-blk, the `null-co` driver
//! with `read-zeroes=on` for qemu-storage-daemon), read-only or not, and a
//! number of request queues. qemu-storage-daemon has no guest-IOMMU
//! support (it does not offer `VIRTIO_F_ACCESS_PLATFORM`, so QEMU refuses
//! `iommu_platform=on` on its socket) and no statistics.
//!
//! vdpa-blk prints its statistics as JSON lines on standard output
//! ([`BlkServer::last_stats`], [`queue_requests`]); its logs go to
//! standard error.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::bins::workspace_bin;
use crate::env::{require_tool, workspace_root};
use crate::error::{Error, Result};
use crate::process::{wait_for_path, Output, Proc};

/// Bound for a server's socket to appear.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// Which program serves the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlkServerKind {
    /// The workspace's `vdpa-blk` (path of the binary).
    VdpaBlk(PathBuf),
    /// qemu-storage-daemon (path of the binary).
    Qsd(PathBuf),
}

impl BlkServerKind {
    /// A short name for messages and reports (`vdpa-blk`, `qsd`).
    pub fn name(&self) -> &'static str {
        match self {
            BlkServerKind::VdpaBlk(_) => "vdpa-blk",
            BlkServerKind::Qsd(_) => "qsd",
        }
    }

    /// Whether the server offers `VIRTIO_F_ACCESS_PLATFORM` (guest IOMMU).
    pub fn supports_iommu(&self) -> bool {
        matches!(self, BlkServerKind::VdpaBlk(_))
    }
}

/// What backs the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// A raw image file.
    File(PathBuf),
    /// No storage: reads return zeroes, writes are dropped; `u64` is the size in bytes.
    Null(u64),
}

/// One export.
#[derive(Debug, Clone)]
pub struct BlkExport {
    /// The vhost-user socket the server listens on.
    pub socket: PathBuf,
    /// The disk.
    pub image: Image,
    /// Serve the disk read-only.
    pub read_only: bool,
    /// Request queues.
    pub queues: u16,
    /// Largest queue size the server accepts (vdpa-blk's `--queue-size`;
    /// qemu-storage-daemon accepts up to 1024 anyway).
    pub queue_size: Option<u16>,
    /// Extra arguments for vdpa-blk (ignored for qemu-storage-daemon).
    pub vdpa_args: Vec<String>,
    /// qemu-storage-daemon's `aio` mode for files (`io_uring`, `threads`, `native`).
    pub qsd_aio: String,
}

impl BlkExport {
    /// A writable single-queue export of `image` on `socket`.
    pub fn new(socket: &Path, image: Image) -> BlkExport {
        BlkExport {
            socket: socket.to_path_buf(),
            image,
            read_only: false,
            queues: 1,
            queue_size: None,
            vdpa_args: Vec::new(),
            qsd_aio: "io_uring".into(),
        }
    }

    /// Serves it read-only.
    pub fn read_only(mut self, on: bool) -> BlkExport {
        self.read_only = on;
        self
    }

    /// Sets the number of request queues.
    pub fn queues(mut self, n: u16) -> BlkExport {
        self.queues = n.max(1);
        self
    }

    /// Sets the largest queue size (vdpa-blk only).
    pub fn queue_size(mut self, n: u16) -> BlkExport {
        self.queue_size = Some(n);
        self
    }

    /// The command line of `kind` serving this export.
    pub fn command(&self, kind: &BlkServerKind) -> Command {
        match kind {
            BlkServerKind::VdpaBlk(bin) => {
                let mut c = Command::new(bin);
                c.arg("--socket-path").arg(&self.socket).arg("--image");
                match &self.image {
                    Image::File(p) => c.arg(p),
                    Image::Null(size) => c.arg(format!("null:{size}")),
                };
                if self.read_only {
                    c.arg("--read-only");
                }
                c.args(["--queues", &self.queues.to_string()]);
                if let Some(q) = self.queue_size {
                    c.args(["--queue-size", &q.to_string()]);
                }
                c.args(["--stats-interval-ms", "500"]);
                c.args(&self.vdpa_args);
                c
            }
            BlkServerKind::Qsd(bin) => {
                let mut c = Command::new(bin);
                let ro = if self.read_only { "on" } else { "off" };
                let blockdev = match &self.image {
                    Image::File(p) => format!(
                        "driver=file,node-name=disk,filename={},aio={},read-only={ro}",
                        p.display(),
                        self.qsd_aio
                    ),
                    Image::Null(size) => format!(
                        "driver=null-co,node-name=disk,size={size},read-zeroes=on,read-only={ro}"
                    ),
                };
                let writable = if self.read_only { "off" } else { "on" };
                c.args(["--blockdev", &blockdev]).args([
                    "--export",
                    &format!(
                        "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},writable={writable},num-queues={}",
                        self.socket.display(),
                        self.queues
                    ),
                ]);
                c
            }
        }
    }
}

/// The vdpa-blk binary (built on demand; see [`crate::bins`]).
pub fn vdpa_blk_bin() -> Result<PathBuf> {
    workspace_bin("vdpa-blk", "vdpa-blk")
}

/// Whether the workspace has the vdpa-blk crate.
pub fn workspace_has_vdpa_blk() -> bool {
    workspace_root()
        .join("backends/vdpa-blk/Cargo.toml")
        .is_file()
}

/// qemu-storage-daemon, or [`Error::Unavailable`].
pub fn qsd_bin() -> Result<PathBuf> {
    require_tool("qemu-storage-daemon", "qemu-system-common")
}

/// The server the guest tests run against: vdpa-blk when the workspace has
/// it, qemu-storage-daemon otherwise (`IOASIS_BLK_SERVER=qsd` forces
/// qemu-storage-daemon, `=vdpa-blk` forces vdpa-blk).
pub fn test_server() -> Result<BlkServerKind> {
    match std::env::var("IOASIS_BLK_SERVER").ok().as_deref() {
        Some("qsd") => return qsd_bin().map(BlkServerKind::Qsd),
        Some("vdpa-blk") => return vdpa_blk_bin().map(BlkServerKind::VdpaBlk),
        _ => {}
    }
    if workspace_has_vdpa_blk() {
        vdpa_blk_bin().map(BlkServerKind::VdpaBlk)
    } else {
        qsd_bin().map(BlkServerKind::Qsd)
    }
}

/// A running server; killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct BlkServer {
    kind: BlkServerKind,
    proc: Proc,
}

impl BlkServer {
    /// Starts `kind` serving `export` (logs in `dir/<name>.out`/`.err`) and
    /// waits for its socket. A stale socket file at that path is removed first.
    pub fn spawn(
        kind: &BlkServerKind,
        export: &BlkExport,
        dir: &Path,
        name: &str,
    ) -> Result<BlkServer> {
        let _ = std::fs::remove_file(&export.socket);
        let mut proc = Proc::spawn(name, &mut export.command(kind), dir, Output::Split)?;
        wait_for_path(&export.socket, SOCKET_TIMEOUT, Some(&mut proc))?;
        Ok(BlkServer {
            kind: kind.clone(),
            proc,
        })
    }

    /// Starts `kind` serving the image file `image` read-write on one queue
    /// at `dir/disk.sock` (logs `dir/server.out`/`.err`): the common case
    /// of the tests. Returns the server and its socket.
    pub fn on_file(kind: &BlkServerKind, image: &Path, dir: &Path) -> Result<(BlkServer, PathBuf)> {
        let sock = dir.join("disk.sock");
        let export = BlkExport::new(&sock, Image::File(image.to_path_buf()));
        Ok((BlkServer::spawn(kind, &export, dir, "server")?, sock))
    }

    /// Which server this is.
    pub fn kind(&self) -> &BlkServerKind {
        &self.kind
    }

    /// The supervised process.
    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Fails if the server has exited.
    pub fn check_running(&mut self, what: &str) -> Result<()> {
        self.proc.check_running(what)
    }

    /// Kills it with SIGKILL (a crash: no cleanup, no flush).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Stops it with SIGTERM, SIGKILL after `timeout`.
    pub fn stop(&mut self, timeout: Duration) {
        if self.proc.stop(Signal::SIGTERM, timeout).is_err() {
            self.proc.kill();
        }
    }

    /// The last JSON statistics line on its standard output (vdpa-blk), if any.
    pub fn last_stats(&self) -> Option<serde_json::Value> {
        self.proc
            .stdout_text()
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
    }

    /// The ends of its logs.
    pub fn log_tail(&self) -> String {
        self.proc.log_tail()
    }
}

/// Requests completed per queue in a vdpa-blk statistics line: the
/// `queues` array (of the line itself or of its first device), each
/// entry's first counter among `requests`, `completed`, `reqs`, `ops`
/// (the sum of `reads` and `writes` otherwise). `None` if the line has no
/// per-queue statistics.
pub fn queue_requests(stats: &serde_json::Value) -> Option<Vec<u64>> {
    let queues = stats.get("queues").or_else(|| {
        stats
            .get("devices")
            .and_then(|d| d.as_array())
            .and_then(|d| d.first())
            .and_then(|d| d.get("queues"))
    })?;
    let queues = queues.as_array()?;
    let count = |q: &serde_json::Value| -> u64 {
        for key in ["requests", "completed", "reqs", "ops"] {
            if let Some(v) = q.get(key).and_then(|v| v.as_u64()) {
                return v;
            }
        }
        let get = |k: &str| q.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        get("reads") + get("writes")
    };
    Some(queues.iter().map(count).collect())
}

/// Fails with [`Error::Unavailable`] unless `kind` supports a guest IOMMU.
pub fn require_iommu_support(kind: &BlkServerKind) -> Result<()> {
    if kind.supports_iommu() {
        Ok(())
    } else {
        Err(Error::Unavailable(
            "needs vdpa-blk (not in this workspace yet): qemu-storage-daemon, the fallback \
             server, has no guest-IOMMU support"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_qsd_command_line() {
        let e = BlkExport::new(Path::new("/s.sock"), Image::Null(1 << 20))
            .read_only(true)
            .queues(2);
        let c = e.command(&BlkServerKind::Qsd("qsd".into()));
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined
            .contains("driver=null-co,node-name=disk,size=1048576,read-zeroes=on,read-only=on"));
        assert!(joined.contains("addr.path=/s.sock,writable=off,num-queues=2"));
    }

    #[test]
    fn test_vdpa_blk_command_line() {
        let e = BlkExport::new(Path::new("/s.sock"), Image::Null(4096)).queue_size(512);
        let c = e.command(&BlkServerKind::VdpaBlk("vdpa-blk".into()));
        let joined: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = joined.join(" ");
        assert!(joined
            .starts_with("--socket-path /s.sock --image null:4096 --queues 1 --queue-size 512"));
        assert!(!joined.contains("--read-only"));
    }

    #[test]
    fn test_queue_requests_reads_both_shapes() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"queues":[{"requests":3},{"reads":1,"writes":2}]}"#)
                .unwrap_or_default();
        assert_eq!(queue_requests(&v), Some(vec![3, 3]));
        let v: serde_json::Value =
            serde_json::from_str(r#"{"devices":[{"queues":[{"completed":5}]}]}"#)
                .unwrap_or_default();
        assert_eq!(queue_requests(&v), Some(vec![5]));
        assert_eq!(queue_requests(&serde_json::json!({"x": 1})), None);
    }
}
