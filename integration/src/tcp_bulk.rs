//! A bulk TCP transfer from a QEMU guest on vdpa-net to a tap inside a
//! network namespace.
//!
//! vdpa-net runs inside a fresh namespace serving one device on a `tap`
//! port addressed [`HOST_IP`]; a TCG guest on that device serves a
//! [`BULK_BYTES`] file with busybox httpd (which sends it with sendfile(),
//! so the guest's TCP hands TSO-sized segments to the driver whenever the
//! device offers TSO), and busybox wget inside the namespace downloads it.
//! The file is random; its MD5 digest, taken in the guest, must equal the
//! downloaded copy's or the transfer fails (the guest's TCP checksums are
//! offloaded and never verified on the way, so only the digest shows a
//! corrupted frame).
//! Each [`Transfer`] carries the bytes received, the time taken and the
//! frames and bytes the tap received meanwhile. Used by the vdpa-net guest
//! test and by `ioasis-bench-net --tcp`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::guest::ping_script;
use crate::netns::Netns;
use crate::qemu::{IommuMode, Qemu, QemuConfig, GUEST_TIMEOUT};
use crate::vdpa_net::{VdpaNet, VdpaNetConfig};

/// The tap vdpa-net opens inside the namespace.
pub const TAP: &str = "vtap0";
/// The namespace side's address on the tap.
pub const HOST_IP: &str = "10.0.0.2";
/// The guest's address.
pub const GUEST_IP: &str = "10.0.0.1";
/// Size of the transferred file in MiB.
pub const BULK_MB: u64 = 20;
/// Size of the transferred file in bytes.
pub const BULK_BYTES: u64 = BULK_MB << 20;
/// Bound for one download.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(180);

const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// One download from the guest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transfer {
    /// Bytes the namespace side received.
    pub received: u64,
    /// Wall-clock seconds the download took.
    pub secs: f64,
    /// Frames the tap received (guest to namespace) meanwhile.
    pub frames: u64,
    /// Bytes the tap received meanwhile.
    pub bytes: u64,
}

impl Transfer {
    /// Received bytes per second.
    pub fn bytes_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.received as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Mean size of the frames on the tap, in bytes.
    pub fn mean_frame(&self) -> u64 {
        self.bytes.checked_div(self.frames).unwrap_or(0)
    }
}

/// The guest's script: reach the namespace, print the device's virtio
/// features (`FEATURES` marker), write the random file and print its MD5
/// digest (`SUM` marker), then serve it (`SERVING` marker).
pub fn serve_script() -> String {
    format!(
        "{}mark \"FEATURES $(cat /sys/class/net/$IF/device/features)\"\n\
         mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/big bs=1048576 count={BULK_MB} 2>/dev/null\n\
         mark \"SUM $(md5sum /tmp/www/big | cut -d ' ' -f 1)\"\n\
         httpd -p 8080 -h /tmp/www && mark SERVING\n\
         sleep 600\n",
        ping_script(&format!("{GUEST_IP}/24"), HOST_IP, 1)
    )
}

/// The text a guest printed with marker `name` (`mark "NAME text"`) in
/// `console`; empty if none.
fn marker_text(console: &str, name: &str) -> String {
    console
        .split(&format!("@@IOASIS:{name} "))
        .nth(1)
        .and_then(|r| r.split("@@").next())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The virtio feature bits a guest printed (`FEATURES` marker) in
/// `console`, summarised (bit 0 first).
pub fn guest_features(console: &str) -> String {
    let bits = marker_text(console, "FEATURES");
    let has = |bit: usize| bits.as_bytes().get(bit) == Some(&b'1');
    format!(
        "CSUM={} HOST_TSO4={} HOST_TSO6={} MRG_RXBUF={} ACCESS_PLATFORM={} RING_PACKED={} ({bits})",
        has(0),
        has(11),
        has(12),
        has(15),
        has(33),
        has(34)
    )
}

/// vdpa-net in a namespace on a tap, and a guest serving the file.
/// Everything is killed and the namespace deleted on drop.
#[derive(Debug)]
pub struct TcpBulk {
    guest: Qemu,
    vdpa: VdpaNet,
    ns: Netns,
    busybox: PathBuf,
    /// Where the namespace side stores the download.
    copy: PathBuf,
    /// The file's MD5 digest, as the guest printed it.
    sum: String,
}

impl TcpBulk {
    /// Starts vdpa-net (`bin`, with `extra_args`) in a new namespace, boots
    /// the guest in `dir` and waits until it serves the file. `busybox` runs
    /// the download inside the namespace.
    pub fn start(bin: &Path, extra_args: &[String], busybox: &Path, dir: &Path) -> Result<TcpBulk> {
        TcpBulk::start_on(bin, extra_args, busybox, dir, false, IommuMode::Off)
    }

    /// [`start`](TcpBulk::start), the guest's device with `packed=on` if
    /// `packed` (packed virtqueues), behind the guest's intel-iommu in
    /// `iommu` mode (every ring and buffer address then an I/O virtual
    /// address the device translates through IOTLB messages).
    pub fn start_on(
        bin: &Path,
        extra_args: &[String],
        busybox: &Path,
        dir: &Path,
        packed: bool,
        iommu: IommuMode,
    ) -> Result<TcpBulk> {
        let ns = Netns::new()?;
        let sock = dir.join("net.sock");
        let mut cfg = VdpaNetConfig::new()
            .device(&sock, &format!("tap={TAP}"))
            .stats_interval(1);
        for a in extra_args {
            cfg = cfg.arg(a);
        }
        let vdpa = VdpaNet::spawn_bin(bin, &cfg, dir, Some(&ns))?;
        ns.wait_link(TAP, SETUP_TIMEOUT)?;
        ns.addr_up(TAP, &format!("{HOST_IP}/24"))?;
        let mut qcfg = QemuConfig::new("guest", &serve_script())
            .netdev(&sock, "52:54:00:00:00:01")
            .iommu(iommu);
        if packed {
            qcfg = qcfg.packed();
        }
        let mut guest = Qemu::launch(&qcfg, dir)?;
        guest.expect_marker(
            &format!("PING_OK {HOST_IP}"),
            &format!("PING_FAIL {HOST_IP}"),
            GUEST_TIMEOUT,
        )?;
        guest.wait_marker("SERVING", GUEST_TIMEOUT)?;
        let sum = marker_text(&guest.console_text(), "SUM");
        if sum.len() != 32 {
            return Err(Error::Parse {
                what: format!("the file's digest {sum:?}"),
                path: PathBuf::from("guest console"),
                detail: "no SUM marker of 32 hex digits".into(),
            });
        }
        Ok(TcpBulk {
            guest,
            vdpa,
            ns,
            busybox: busybox.to_path_buf(),
            copy: dir.join("big"),
            sum,
        })
    }

    /// Downloads the file once from the namespace side; fails unless the
    /// copy's MD5 digest equals the guest's.
    pub fn transfer(&self) -> Result<Transfer> {
        let before = self.ns.link_stats(TAP)?;
        let start = Instant::now();
        let (bb, copy) = (self.busybox.display(), self.copy.display());
        self.ns.sh(
            &format!("{bb} wget -q -O {copy} http://{GUEST_IP}:8080/big"),
            TRANSFER_TIMEOUT,
        )?;
        let secs = start.elapsed().as_secs_f64();
        let after = self.ns.link_stats(TAP)?;
        let out = self.ns.sh(
            &format!("{bb} wc -c < {copy} && {bb} md5sum {copy}"),
            TRANSFER_TIMEOUT,
        )?;
        let mut words = out.split_whitespace();
        let count = words.next().unwrap_or("");
        let received = count.parse().map_err(|e| Error::Parse {
            what: format!("byte count {count:?}"),
            path: PathBuf::from("wc output"),
            detail: format!("{e}"),
        })?;
        let got = words.next().unwrap_or("");
        if got != self.sum {
            return Err(Error::Corrupt {
                what: format!("MD5 digest of the {received}-byte download"),
                expected: self.sum.clone(),
                got: got.to_string(),
            });
        }
        Ok(Transfer {
            received,
            secs,
            frames: after.rx_packets.saturating_sub(before.rx_packets),
            bytes: after.rx_bytes.saturating_sub(before.rx_bytes),
        })
    }

    /// The guest's virtio features, summarised ([`guest_features`]).
    pub fn features(&self) -> String {
        guest_features(&self.guest.console_text())
    }

    /// Kills the guest and stops vdpa-net cleanly.
    pub fn stop(mut self, timeout: Duration) -> Result<()> {
        self.guest.kill();
        self.vdpa.stop(timeout)?;
        Ok(())
    }
}
