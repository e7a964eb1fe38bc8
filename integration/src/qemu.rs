//! QEMU guests whose virtio-net and virtio-blk devices are served over
//! vhost-user.
//!
//! Guests run under TCG (nested KVM guests hang on this kind of machine),
//! with their RAM in a shared memfd (vhost-user needs shareable memory), and
//! each virtio-net-pci device with `vectors=0` (QEMU 7.2 crashes in
//! vhost_net_start when the device uses MSI-X under TCG). Disks are
//! `vhost-user-blk-pci` devices ([`QemuConfig::blkdev`]), optionally with
//! `reconnect=1` on their chardev, so that QEMU reconnects to a backend
//! restarted on the same socket (and hands it the inflight region, if the
//! backend offers one).
//!
//! With [`IommuMode::Lazy`] or [`IommuMode::Strict`] the machine is q35
//! with `intel-iommu,device-iotlb=on` and every device is
//! `iommu_platform=on,ats=on` behind a PCIe root port, so the backend gets
//! IOTLB messages; the two modes differ in the guest's invalidation pattern
//! (`iommu.strict=0` or `=1`). QEMU 7.2 forwards the guest's IOTLB
//! invalidations to a vhost-user device only with both `ats=on` on the
//! device and `device-iotlb=on` on the intel-iommu: without them the
//! backend keeps translations the guest has unmapped.
//!
//! The serial console goes to a file; [`Qemu::wait_marker`] waits for a
//! marker from the guest script (see [`crate::guest`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::env::require_tool;
use crate::error::{Error, Result};
use crate::guest::{marker, GuestKit, MARKER_PREFIX};
use crate::process::{read_lossy, tail_file, Output, Proc};

/// Default bound for one wait on the guest (boots take ~10 s wall under TCG
/// on an idle machine, several times that on a loaded one).
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The guest's IOMMU configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuMode {
    /// No vIOMMU: the backend sees guest physical addresses.
    Off,
    /// intel-iommu, `iommu_platform=on`, guest in lazy (deferred flush) mode.
    Lazy,
    /// intel-iommu, `iommu_platform=on`, guest in strict mode (`iommu.strict=1`).
    Strict,
}

/// One virtio-net device of the guest.
#[derive(Debug, Clone)]
pub struct NetDev {
    /// The backend's vhost-user socket (QEMU connects as the client).
    pub socket: PathBuf,
    /// The device's MAC address.
    pub mac: String,
    /// Queue pairs (1 = no multiqueue).
    pub queues: u16,
}

/// One vhost-user-blk disk of the guest.
#[derive(Debug, Clone)]
pub struct BlkDev {
    /// The backend's vhost-user socket (QEMU connects as the client).
    pub socket: PathBuf,
    /// Request queues (`num-queues`).
    pub queues: u16,
    /// `reconnect=1` on the chardev: QEMU reconnects (every second) to a
    /// backend restarted on the same socket; with a backend that offers
    /// `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` it hands the new one the
    /// inflight region, which says which requests to resubmit (without it,
    /// QEMU rewinds the ring to the used index).
    pub reconnect: bool,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    name: String,
    mem_mb: u32,
    mem_extra_kb: u32,
    smp: u32,
    iommu: IommuMode,
    netdevs: Vec<NetDev>,
    blkdevs: Vec<BlkDev>,
    files: Vec<(String, Vec<u8>)>,
    script: String,
    append: String,
    /// The kit to boot ([`GuestKit::get`] when unset).
    kit: Option<&'static GuestKit>,
    /// `packed=on` on every virtio device: the guest's drivers use packed
    /// virtqueues.
    packed: bool,
    qmp: Option<PathBuf>,
    incoming: Option<String>,
    /// `-cpu MODEL` (QEMU's default model when unset).
    cpu: Option<String>,
}

impl QemuConfig {
    /// A guest named `name` (used for log file names) that runs `script`.
    pub fn new(name: &str, script: &str) -> QemuConfig {
        QemuConfig {
            name: name.to_string(),
            mem_mb: 256,
            mem_extra_kb: 0,
            smp: 1,
            iommu: IommuMode::Off,
            netdevs: Vec::new(),
            blkdevs: Vec::new(),
            files: Vec::new(),
            script: script.to_string(),
            append: String::new(),
            kit: None,
            packed: false,
            qmp: None,
            incoming: None,
            cpu: None,
        }
    }

    /// Adds a virtio-net device served on `socket`.
    pub fn netdev(mut self, socket: &Path, mac: &str) -> QemuConfig {
        self.netdevs.push(NetDev {
            socket: socket.to_path_buf(),
            mac: mac.to_string(),
            queues: 1,
        });
        self
    }

    /// Adds a multiqueue virtio-net device.
    pub fn netdev_mq(mut self, socket: &Path, mac: &str, queues: u16) -> QemuConfig {
        self.netdevs.push(NetDev {
            socket: socket.to_path_buf(),
            mac: mac.to_string(),
            queues,
        });
        self
    }

    /// Adds a vhost-user-blk disk served on `socket` with `queues` request
    /// queues (the guest names disks `vda`, `vdb`, ... in the order added).
    pub fn blkdev(mut self, socket: &Path, queues: u16) -> QemuConfig {
        self.blkdevs.push(BlkDev {
            socket: socket.to_path_buf(),
            queues: queues.max(1),
            reconnect: false,
        });
        self
    }

    /// Like [`blkdev`](Self::blkdev), with `reconnect=1` on the chardev.
    pub fn blkdev_reconnecting(mut self, socket: &Path, queues: u16) -> QemuConfig {
        self.blkdevs.push(BlkDev {
            socket: socket.to_path_buf(),
            queues: queues.max(1),
            reconnect: true,
        });
        self
    }

    /// Adds a file to the guest's initramfs at `path` (e.g. `data/pattern`).
    pub fn file(mut self, path: &str, data: Vec<u8>) -> QemuConfig {
        self.files
            .push((path.trim_start_matches('/').to_string(), data));
        self
    }

    /// Boots `kit` instead of the default kit (the VDUSE guests' kernel,
    /// [`crate::vduse_kit`]).
    pub fn kit(mut self, kit: &'static GuestKit) -> QemuConfig {
        self.kit = Some(kit);
        self
    }

    /// Offers packed virtqueues on every virtio device (`packed=on`; the
    /// backend must offer `VIRTIO_F_RING_PACKED` too).
    pub fn packed(mut self) -> QemuConfig {
        self.packed = true;
        self
    }

    /// Sets the IOMMU mode.
    pub fn iommu(mut self, mode: IommuMode) -> QemuConfig {
        self.iommu = mode;
        self
    }

    /// Sets the guest RAM size in MiB (default 256).
    pub fn mem_mb(mut self, mb: u32) -> QemuConfig {
        self.mem_mb = mb;
        self
    }

    /// Adds `kb` KiB to the guest's RAM (default 0; QEMU rounds the size up
    /// to 8 KiB).
    ///
    /// Migration tests give a TCG guest a RAM size that is not a multiple of
    /// 256 KiB: QEMU 7.2 synchronises the dirty bitmap of a RAM block whose
    /// size is such a multiple through a fast path that does not reset the
    /// vCPUs' TLB entries, so stores made afterwards through those entries
    /// are not tracked and reach the destination stale (fixed upstream in
    /// 9.0 by 03bfc2188f, "physmem: Fix migration dirty bitmap coherency
    /// with TCG memory access"; Debian's 7.2 does not have it). Any other
    /// size takes the page-by-page path, which resets them.
    pub fn mem_extra_kb(mut self, kb: u32) -> QemuConfig {
        self.mem_extra_kb = kb;
        self
    }

    /// Sets the number of vCPUs (default 1). The guest's virtio-net driver
    /// uses as many queue pairs as it has CPUs, up to the device's maximum.
    pub fn smp(mut self, n: u32) -> QemuConfig {
        self.smp = n.max(1);
        self
    }

    /// Sets the vCPU model (`-cpu MODEL`; e.g. `max`, whose TCG vCPU has
    /// the SSE4.2 that Debian's DPDK needs, where QEMU's default lacks it).
    pub fn cpu(mut self, model: &str) -> QemuConfig {
        self.cpu = Some(model.to_string());
        self
    }

    /// Serves QMP on the unix socket `path` (see [`crate::qmp`]).
    pub fn qmp(mut self, path: &Path) -> QemuConfig {
        self.qmp = Some(path.to_path_buf());
        self
    }

    /// Starts as a migration destination waiting on `uri` (`-incoming`,
    /// e.g. `unix:/path`): the guest runs once the source's state arrived.
    pub fn incoming(mut self, uri: &str) -> QemuConfig {
        self.incoming = Some(uri.to_string());
        self
    }

    /// Appends to the kernel command line.
    pub fn append(mut self, extra: &str) -> QemuConfig {
        self.append.push(' ');
        self.append.push_str(extra);
        self
    }

    /// The kernel command line this configuration boots with.
    pub fn cmdline(&self) -> String {
        let mut s = String::from("console=ttyS0 panic=-1 quiet loglevel=3 nokaslr");
        match self.iommu {
            IommuMode::Off => {}
            IommuMode::Lazy => s.push_str(" intel_iommu=on iommu.strict=0"),
            IommuMode::Strict => s.push_str(" intel_iommu=on iommu.strict=1"),
        }
        s.push_str(&self.append);
        s
    }

    /// The QEMU arguments (without the program).
    pub fn args(&self, kernel: &Path, initrd: &Path, console: &Path) -> Vec<String> {
        let mut a: Vec<String> = [
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut push = |v: &[&str]| a.extend(v.iter().map(|s| s.to_string()));
        let mem_kb = u64::from(self.mem_mb) * 1024 + u64::from(self.mem_extra_kb);
        push(&["-m", &format!("{mem_kb}K")]);
        push(&["-smp", &self.smp.to_string()]);
        if let Some(cpu) = &self.cpu {
            push(&["-cpu", cpu]);
        }
        push(&["-serial", &format!("file:{}", console.display())]);
        push(&["-kernel", &kernel.to_string_lossy()]);
        push(&["-initrd", &initrd.to_string_lossy()]);
        push(&["-append", &self.cmdline()]);
        if let Some(q) = &self.qmp {
            push(&["-qmp", &format!("unix:{},server=on,wait=off", q.display())]);
        }
        if let Some(uri) = &self.incoming {
            push(&["-incoming", uri]);
        }
        push(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem_kb}K,share=on"),
            "-numa",
            "node,memdev=mem",
        ]);
        let iommu = self.iommu != IommuMode::Off;
        if iommu {
            push(&[
                "-machine",
                "q35",
                "-device",
                "intel-iommu,intremap=off,device-iotlb=on",
            ]);
        }
        for (i, n) in self.netdevs.iter().enumerate() {
            push(&[
                "-chardev",
                &format!("socket,id=c{i},path={}", n.socket.display()),
            ]);
            let mut netdev = format!("vhost-user,id=n{i},chardev=c{i}");
            let mut dev = format!("virtio-net-pci,netdev=n{i},vectors=0,mac={}", n.mac);
            if n.queues > 1 {
                netdev.push_str(&format!(",queues={}", n.queues));
                dev.push_str(",mq=on");
            }
            if self.packed {
                dev.push_str(",packed=on");
            }
            if iommu {
                push(&[
                    "-device",
                    &format!("pcie-root-port,id=rp{i},bus=pcie.0,chassis={}", i + 1),
                ]);
                dev.push_str(&format!(
                    ",bus=rp{i},disable-legacy=on,iommu_platform=on,ats=on"
                ));
            }
            push(&["-netdev", &netdev, "-device", &dev]);
        }
        for (i, b) in self.blkdevs.iter().enumerate() {
            let mut chardev = format!("socket,id=cb{i},path={}", b.socket.display());
            if b.reconnect {
                chardev.push_str(",reconnect=1");
            }
            push(&["-chardev", &chardev]);
            let mut dev = format!("vhost-user-blk-pci,chardev=cb{i},num-queues={}", b.queues);
            if self.packed {
                dev.push_str(",packed=on");
            }
            if iommu {
                let chassis = self.netdevs.len() + i + 1;
                push(&[
                    "-device",
                    &format!("pcie-root-port,id=rpb{i},bus=pcie.0,chassis={chassis}"),
                ]);
                // ats=on here and device-iotlb=on on the intel-iommu: QEMU
                // 7.2 forwards IOTLB invalidations to a vhost-user device
                // only with both.
                dev.push_str(&format!(
                    ",bus=rpb{i},disable-legacy=on,iommu_platform=on,ats=on"
                ));
            }
            push(&["-device", &dev]);
        }
        a
    }
}

/// A running guest; killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Qemu {
    proc: Proc,
    console: PathBuf,
}

impl Qemu {
    /// Builds the guest's initramfs and starts QEMU, logging into `dir`.
    pub fn launch(cfg: &QemuConfig, dir: &Path) -> Result<Qemu> {
        let qemu = require_tool("qemu-system-x86_64", "qemu-system-x86")?;
        let kit = match cfg.kit {
            Some(k) => k,
            None => GuestKit::get()?,
        };
        let initrd = kit.initrd_with_files(
            dir,
            &format!("{}-initrd", cfg.name),
            &cfg.script,
            &cfg.files,
        )?;
        let console = dir.join(format!("{}-console.log", cfg.name));
        let mut cmd = Command::new(qemu);
        cmd.args(cfg.args(kit.kernel(), &initrd, &console));
        let proc = Proc::spawn(
            &format!("{}-qemu", cfg.name),
            &mut cmd,
            dir,
            Output::Combined,
        )?;
        Ok(Qemu { proc, console })
    }

    /// The serial console log file.
    pub fn console_path(&self) -> &Path {
        &self.console
    }

    /// Everything the guest printed so far.
    pub fn console_text(&self) -> String {
        read_lossy(&self.console)
    }

    /// The supervised QEMU process.
    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    fn context(&self) -> String {
        format!(
            "--- guest console tail ({}):\n{}\n{}",
            self.console.display(),
            tail_file(&self.console, 6000),
            self.proc.log_tail()
        )
    }

    /// Waits for the first of `names` to appear as a marker; returns its index.
    ///
    /// Fails early on a kernel panic, on the script's end marker, or when
    /// QEMU exits before any of the markers shows up.
    pub fn wait_any(&mut self, names: &[&str], timeout: Duration) -> Result<usize> {
        let wanted: Vec<String> = names.iter().map(|n| marker(n)).collect();
        let what = format!("guest marker {}", wanted.join(" or "));
        let start = Instant::now();
        let interval = Duration::from_millis(100);
        let max_polls = timeout.as_millis() / interval.as_millis() + 2;
        for _ in 0..max_polls {
            let text = self.console_text();
            let hit = wanted
                .iter()
                .enumerate()
                .filter_map(|(i, w)| text.find(w.as_str()).map(|pos| (pos, i)))
                .min();
            if let Some((_, i)) = hit {
                return Ok(i);
            }
            let ended = text.contains(&format!("{MARKER_PREFIX}END:"));
            if ended || text.contains("Kernel panic") {
                return Err(Error::Timeout {
                    what: format!("{what} (the guest ended without it)"),
                    secs: start.elapsed().as_secs_f64(),
                    context: self.context(),
                });
            }
            if let Some(status) = self.proc.try_status()? {
                return Err(Error::ExitedEarly {
                    name: self.proc.name().to_string(),
                    status,
                    what,
                    context: self.context(),
                });
            }
            if start.elapsed() >= timeout {
                break;
            }
            thread::sleep(interval);
        }
        Err(Error::Timeout {
            what,
            secs: start.elapsed().as_secs_f64(),
            context: self.context(),
        })
    }

    /// Waits for marker `name`.
    pub fn wait_marker(&mut self, name: &str, timeout: Duration) -> Result<()> {
        self.wait_any(&[name], timeout).map(|_| ())
    }

    /// Waits for `ok`; fails with the console if `fail` (or nothing) comes instead.
    pub fn expect_marker(&mut self, ok: &str, fail: &str, timeout: Duration) -> Result<()> {
        match self.wait_any(&[ok, fail], timeout)? {
            0 => Ok(()),
            _ => Err(Error::Timeout {
                what: format!("guest marker {} (got {})", marker(ok), marker(fail)),
                secs: 0.0,
                context: self.context(),
            }),
        }
    }

    /// Waits for the script's end and QEMU's exit; returns the script's exit status.
    pub fn wait_end(&mut self, timeout: Duration) -> Result<i32> {
        let start = Instant::now();
        if let Err(e) = self.proc.wait_timeout(timeout) {
            return Err(Error::Timeout {
                what: format!("the guest to power off ({e})"),
                secs: start.elapsed().as_secs_f64(),
                context: self.context(),
            });
        }
        let console = self.console_text();
        let tag = format!("{MARKER_PREFIX}END:");
        let rc = console.rfind(&tag).and_then(|pos| {
            let rest = &console[pos + tag.len()..];
            rest.split("@@").next()?.trim().parse::<i32>().ok()
        });
        rc.ok_or_else(|| Error::Timeout {
            what: "the guest's END marker".into(),
            secs: start.elapsed().as_secs_f64(),
            context: self.context(),
        })
    }

    /// Kills QEMU at once (SIGKILL), like a crashing VMM.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_iommu_args() {
        let cfg = QemuConfig::new("g", "true")
            .netdev(Path::new("/tmp/s.sock"), "52:54:00:00:00:01")
            .iommu(IommuMode::Strict);
        let args = cfg.args(Path::new("/k"), Path::new("/i"), Path::new("/c"));
        let joined = args.join(" ");
        assert!(joined.contains("-machine q35 -device intel-iommu"));
        assert!(joined.contains("iommu_platform=on"));
        assert!(joined.contains("vectors=0"));
        assert!(joined.contains("share=on"));
        assert!(cfg.cmdline().contains("iommu.strict=1"));
        let plain = QemuConfig::new("g", "true").netdev(Path::new("/s"), "52:54:00:00:00:01");
        let joined = plain
            .args(Path::new("/k"), Path::new("/i"), Path::new("/c"))
            .join(" ");
        assert!(!joined.contains("iommu"));
    }

    #[test]
    fn test_blk_args() {
        let cfg = QemuConfig::new("g", "true")
            .blkdev_reconnecting(Path::new("/tmp/b.sock"), 2)
            .blkdev(Path::new("/tmp/r.sock"), 1)
            .iommu(IommuMode::Lazy);
        let joined = cfg
            .args(Path::new("/k"), Path::new("/i"), Path::new("/c"))
            .join(" ");
        assert!(joined.contains("socket,id=cb0,path=/tmp/b.sock,reconnect=1"));
        assert!(joined.contains("socket,id=cb1,path=/tmp/r.sock "));
        assert!(joined.contains("vhost-user-blk-pci,chardev=cb0,num-queues=2,bus=rpb0"));
        assert!(joined.contains("iommu_platform=on,ats=on"));
        assert!(joined.contains("device-iotlb=on"));
    }
}
