//! DPDK `dpdk-testpmd` as a vhost-user frontend (virtio_user vdev) or as the
//! reference backend (net_vhost vdev, DPDK's own vhost library).
//!
//! Every run is wrapped in `timeout -s INT`: testpmd stops forwarding on
//! SIGINT and prints its forward statistics, which [`Testpmd::stop`] parses
//! together with the periodic port statistics (`--stats-period`). Runs never
//! read standard input (non-interactive, auto-started).
//!
//! Memory: with free hugepages on a mounted hugetlbfs, `--in-memory
//! --single-file-segments` (a killed testpmd leaves no hugepage files
//! behind, and the few segments fit vhost-user's region limit); otherwise
//! `--no-huge`, where DPDK backs its memory with a memfd. Either way each
//! process gets a distinct `--file-prefix`, `--no-mlockall` (locking the
//! memory makes short runs fail to start the device) and an mbuf pool that
//! fits.
//!
//! CPU placement: a main lcore that mostly sleeps and one forwarding lcore
//! that busy-polls. By default the frontend forwards on CPU 0 and the
//! reference backend on CPU 1, as on a 2-core machine each side must own one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::env::{require_tool, which};
use crate::error::{Error, Result};
use crate::process::{Output, Proc};

/// The vdev string of a virtio_user frontend port on `socket`.
pub fn virtio_user_vdev(index: u32, socket: &Path, queues: u16) -> String {
    format!(
        "virtio_user{index},path={},queues={queues}",
        socket.display()
    )
}

/// The vdev string of a net_vhost (reference backend) port serving `socket`.
pub fn net_vhost_vdev(index: u32, socket: &Path, queues: u16, iommu: bool) -> String {
    let mut s = format!(
        "net_vhost{index},iface={},queues={queues}",
        socket.display()
    );
    if iommu {
        s.push_str(",iommu-support=1");
    }
    s
}

/// How testpmd gets its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemMode {
    /// Hugepages if running as root, enough are free and
    /// `IOASIS_TESTPMD_NO_HUGE` is unset; otherwise no hugepages.
    Auto,
    /// 2 MiB hugepages, `--in-memory --single-file-segments`.
    Hugepages,
    /// `--no-huge`: a memfd.
    NoHuge,
}

/// Free 2 MiB hugepages on a mounted hugetlbfs, in MiB (0 if none).
pub fn free_hugepage_mb() -> u64 {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"))
        })
        .unwrap_or(false);
    if !mounted {
        return 0;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    if field("Hugepagesize:") != 2048 {
        return 0;
    }
    field("HugePages_Free:") * 2
}

/// One testpmd run.
#[derive(Debug, Clone)]
pub struct TestpmdConfig {
    name: String,
    vdevs: Vec<String>,
    fwd: String,
    mem: MemMode,
    mem_mb: u32,
    main_cpu: u32,
    fwd_cpu: u32,
    stats_period: u32,
    queues: u16,
    tx_first: bool,
    mbufs: u32,
    duration: Duration,
    extra: Vec<String>,
    netns: Option<String>,
    interactive: bool,
}

impl TestpmdConfig {
    fn new(name: &str, vdev: String, fwd: &str, main_cpu: u32, fwd_cpu: u32) -> TestpmdConfig {
        TestpmdConfig {
            name: name.to_string(),
            vdevs: vec![vdev],
            fwd: fwd.to_string(),
            mem: MemMode::Auto,
            mem_mb: 256,
            main_cpu,
            fwd_cpu,
            stats_period: 1,
            queues: 1,
            tx_first: false,
            mbufs: 16384,
            duration: Duration::from_secs(30),
            extra: Vec::new(),
            netns: None,
            interactive: false,
        }
    }

    /// A virtio_user frontend on `socket` in forward mode `fwd`
    /// (txonly, rxonly, io, macswap, ...).
    pub fn frontend(name: &str, socket: &Path, fwd: &str) -> TestpmdConfig {
        TestpmdConfig::new(name, virtio_user_vdev(0, socket, 1), fwd, 1, 0)
    }

    /// DPDK's net_vhost reference backend serving `socket`, in forward mode `fwd`.
    pub fn reference_backend(name: &str, socket: &Path, fwd: &str) -> TestpmdConfig {
        TestpmdConfig::new(name, net_vhost_vdev(0, socket, 1, false), fwd, 0, 1)
    }

    /// Replaces the vdev list with `vdevs` (e.g. several ports, or extra devargs).
    pub fn vdevs(mut self, vdevs: Vec<String>) -> TestpmdConfig {
        self.vdevs = vdevs;
        self
    }

    /// Queue pairs per port (sets `--rxq/--txq`; vdevs must match).
    pub fn queues(mut self, q: u16) -> TestpmdConfig {
        self.queues = q;
        for v in &mut self.vdevs {
            if let Some(pos) = v.find(",queues=") {
                let end = v[pos + 1..].find(',').map_or(v.len(), |e| pos + 1 + e);
                v.replace_range(pos..end, &format!(",queues={q}"));
            }
        }
        self
    }

    /// Memory mode and size in MiB.
    pub fn memory(mut self, mode: MemMode, mb: u32) -> TestpmdConfig {
        self.mem = mode;
        self.mem_mb = mb;
        self
    }

    /// CPUs for the main and the forwarding lcore (may be the same CPU).
    pub fn cpus(mut self, main_cpu: u32, fwd_cpu: u32) -> TestpmdConfig {
        self.main_cpu = main_cpu;
        self.fwd_cpu = fwd_cpu;
        self
    }

    /// Sends a first burst before forwarding (needed by io/macswap loops).
    pub fn tx_first(mut self) -> TestpmdConfig {
        self.tx_first = true;
        self
    }

    /// Seconds between periodic statistics (default 1).
    pub fn stats_period(mut self, secs: u32) -> TestpmdConfig {
        self.stats_period = secs.max(1);
        self
    }

    /// Upper bound of the run: testpmd gets SIGINT after this long (default 30 s).
    pub fn duration(mut self, d: Duration) -> TestpmdConfig {
        self.duration = d;
        self
    }

    /// Extra testpmd application arguments (after `--`).
    pub fn arg(mut self, a: &str) -> TestpmdConfig {
        self.extra.push(a.to_string());
        self
    }

    /// Runs testpmd inside network namespace `name` (e.g. for a net_tap port).
    pub fn in_netns(mut self, name: &str) -> TestpmdConfig {
        self.netns = Some(name.to_string());
        self
    }

    /// Runs testpmd driven by commands on its standard input (`-i`) instead
    /// of forwarding from the start (`-a`): [`Testpmd::command`],
    /// [`Testpmd::show_port_stats`], [`Testpmd::stop_forwarding`] and
    /// [`Testpmd::quit`] drive it. Its output is line buffered (`stdbuf
    /// -oL`), so each command's answer is in the log when it is complete;
    /// there are no periodic statistics (`--stats-period` is for
    /// non-interactive runs). SIGPIPE is ignored, so the run survives its
    /// backend going away (and can then drain its receive ring).
    pub fn interactive(mut self) -> TestpmdConfig {
        self.interactive = true;
        self
    }

    /// Whether the run is driven by commands ([`TestpmdConfig::interactive`]).
    pub fn is_interactive(&self) -> bool {
        self.interactive
    }

    /// The name of this run.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The full command line (`timeout` wrapper included).
    pub fn command(&self) -> Result<Command> {
        let testpmd = require_tool("dpdk-testpmd", "dpdk-dev")?;
        let timeout = require_tool("timeout", "coreutils")?;
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "ioasis-{}-{}-{}",
            self.name,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let huge = match self.mem {
            MemMode::Hugepages => true,
            MemMode::NoHuge => false,
            MemMode::Auto => {
                std::env::var_os("IOASIS_TESTPMD_NO_HUGE").is_none()
                    && nix::unistd::geteuid().is_root()
                    && free_hugepage_mb() >= u64::from(self.mem_mb) + 64
            }
        };
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if self.interactive {
            // SIGPIPE ignored (inherited across exec): an interactive run
            // outlives its backend (a generator stopped first so the ring
            // can drain), and virtio_user's next message on the closed
            // socket would otherwise kill it.
            argv.push(require_tool("sh", "dash")?.into());
            argv.push("-c".into());
            argv.push("trap '' PIPE; exec \"$0\" \"$@\"".into());
        }
        if let Some(ns) = &self.netns {
            argv.extend(["ip", "netns", "exec", ns.as_str()].map(Into::into));
        }
        argv.push(timeout.into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd.args(["-s", "INT", "-k", "10"])
            .arg(format!("{}", self.duration.as_secs().max(1)));
        if self.interactive {
            // Line-buffered output: the answer to a command is in the log
            // before the next prompt, not when a stdio buffer fills.
            cmd.arg(require_tool("stdbuf", "coreutils")?).arg("-oL");
        }
        cmd.arg(testpmd)
            .arg("--lcores")
            .arg(format!("0@{},1@{}", self.main_cpu, self.fwd_cpu))
            .args(["--main-lcore", "0", "--no-pci", "--file-prefix"])
            .arg(prefix)
            .arg("-m")
            .arg(self.mem_mb.to_string());
        if huge {
            cmd.args(["--in-memory", "--single-file-segments"]);
        } else {
            cmd.arg("--no-huge");
        }
        for v in &self.vdevs {
            cmd.arg("--vdev").arg(v);
        }
        cmd.arg("--")
            .arg(format!("--forward-mode={}", self.fwd))
            .arg(format!("--total-num-mbufs={}", self.mbufs));
        if self.interactive {
            cmd.arg("-i");
        } else {
            cmd.arg(format!("--stats-period={}", self.stats_period))
                .arg("-a");
        }
        cmd.args(["--nb-cores=1", "--no-mlockall"]);
        if self.queues > 1 {
            cmd.arg(format!("--rxq={}", self.queues))
                .arg(format!("--txq={}", self.queues));
        }
        if self.tx_first {
            cmd.arg("--tx-first");
        }
        cmd.args(&self.extra);
        Ok(cmd)
    }
}

/// How long an interactive testpmd may take to print its first prompt.
const INTERACTIVE_START: Duration = Duration::from_secs(60);

/// Whether testpmd is installed (without it, [`Error::Unavailable`]).
pub fn require_testpmd() -> Result<PathBuf> {
    require_tool("dpdk-testpmd", "dpdk-dev")?;
    which("timeout").ok_or_else(|| Error::Unavailable("`timeout` (coreutils) missing".into()))
}

/// One periodic "NIC statistics" block for one port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortSample {
    /// Port id.
    pub port: u16,
    /// Cumulative packets received.
    pub rx_packets: u64,
    /// Cumulative packets sent.
    pub tx_packets: u64,
    /// Cumulative bytes received.
    pub rx_bytes: u64,
    /// Cumulative bytes sent.
    pub tx_bytes: u64,
    /// Receive rate since the previous block.
    pub rx_pps: u64,
    /// Transmit rate since the previous block.
    pub tx_pps: u64,
}

/// The forward statistics testpmd prints when it stops, for one port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Port id.
    pub port: u16,
    /// Packets received and forwarded.
    pub rx_packets: u64,
    /// Packets received and dropped.
    pub rx_dropped: u64,
    /// Packets the port accepted for transmission.
    pub tx_packets: u64,
    /// Packets the port refused (ring full).
    pub tx_dropped: u64,
}

/// Parses `Key: value` pairs on one line.
fn pairs(line: &str) -> Vec<(&str, u64)> {
    let toks: Vec<&str> = line.split_whitespace().collect();
    toks.windows(2)
        .filter_map(|w| {
            let key = w[0].strip_suffix(':')?;
            Some((key, w[1].parse().ok()?))
        })
        .collect()
}

fn port_of(line: &str, tag: &str) -> Option<u16> {
    let rest = &line[line.find(tag)? + tag.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Parses testpmd's output: all periodic samples, and the final forward statistics.
pub fn parse_output(text: &str) -> (Vec<PortSample>, Vec<ForwardStats>) {
    let mut samples = Vec::new();
    let mut forward = Vec::new();
    let mut cur: Option<PortSample> = None;
    let mut fwd: Option<ForwardStats> = None;
    for line in text.lines() {
        if let Some(port) = port_of(line, "NIC statistics for port") {
            cur = Some(PortSample {
                port,
                ..Default::default()
            });
            continue;
        }
        if let Some(port) = port_of(line, "Forward statistics for port") {
            fwd = Some(ForwardStats {
                port,
                ..Default::default()
            });
            continue;
        }
        let trimmed = line.trim();
        if let Some(s) = cur.as_mut() {
            if trimmed.starts_with("####") {
                samples.push(*s);
                cur = None;
                continue;
            }
            for (k, v) in pairs(line) {
                match k {
                    "RX-packets" => s.rx_packets = v,
                    "TX-packets" => s.tx_packets = v,
                    "RX-bytes" => s.rx_bytes = v,
                    "TX-bytes" => s.tx_bytes = v,
                    "Rx-pps" => s.rx_pps = v,
                    "Tx-pps" => s.tx_pps = v,
                    _ => {}
                }
            }
        }
        if let Some(f) = fwd.as_mut() {
            if trimmed.starts_with("----") {
                forward.push(*f);
                fwd = None;
                continue;
            }
            for (k, v) in pairs(line) {
                match k {
                    "RX-packets" => f.rx_packets = v,
                    "RX-dropped" => f.rx_dropped = v,
                    "TX-packets" => f.tx_packets = v,
                    "TX-dropped" => f.tx_dropped = v,
                    _ => {}
                }
            }
        }
    }
    (samples, forward)
}

/// The median of the values (0 for none).
pub fn median(mut v: Vec<u64>) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

/// What a finished run printed.
#[derive(Debug, Clone)]
pub struct TestpmdReport {
    /// Periodic samples, in order.
    pub samples: Vec<PortSample>,
    /// Final forward statistics per port.
    pub forward: Vec<ForwardStats>,
    /// The whole log.
    pub log: String,
}

impl TestpmdReport {
    /// The final statistics of `port`.
    pub fn port(&self, port: u16) -> Option<ForwardStats> {
        self.forward.iter().copied().find(|f| f.port == port)
    }

    /// Rates of `port` over its samples, leaving out the first `skip` (warm-up)
    /// and any sample where both rates are zero (before traffic started or after it ended).
    pub fn rates(&self, port: u16, skip: usize) -> Vec<(u64, u64)> {
        self.samples
            .iter()
            .filter(|s| s.port == port)
            .skip(skip)
            .map(|s| (s.rx_pps, s.tx_pps))
            .filter(|&(rx, tx)| rx > 0 || tx > 0)
            .collect()
    }
}

/// Lines that close a forward-statistics summary (one per `stop`).
const FORWARD_SUMMARY: &str = "Accumulated forward statistics for all ports";

/// How many complete forward-statistics summaries `text` holds (the
/// accumulated block and its closing `++++` line both printed).
fn forward_summaries(text: &str) -> usize {
    let mut n = 0;
    let mut open = false;
    for line in text.lines() {
        if line.contains(FORWARD_SUMMARY) {
            open = true;
        } else if open && line.trim().starts_with("++++") {
            open = false;
            n += 1;
        }
    }
    n
}

/// A running testpmd; killed on drop.
#[derive(Debug)]
pub struct Testpmd {
    proc: Proc,
}

impl Testpmd {
    /// Starts testpmd as configured, logging to `dir/<name>.log`; an
    /// interactive run ([`TestpmdConfig::interactive`]) gets its commands
    /// through a pipe and is ready for them when this returns.
    pub fn spawn(cfg: &TestpmdConfig, dir: &Path) -> Result<Testpmd> {
        let mut cmd = cfg.command()?;
        if !cfg.interactive {
            let proc = Proc::spawn(&cfg.name, &mut cmd, dir, Output::Combined)?;
            return Ok(Testpmd { proc });
        }
        let proc = Proc::spawn_with_stdin(&cfg.name, &mut cmd, dir, Output::Combined)?;
        let mut t = Testpmd { proc };
        t.proc
            .wait_for_output("testpmd's first prompt", INTERACTIVE_START, |text| {
                text.contains("testpmd>").then_some(())
            })?;
        Ok(t)
    }

    /// Sends one command line to an interactive testpmd.
    pub fn command(&mut self, line: &str) -> Result<()> {
        self.proc.write_stdin(&format!("{line}\n"))
    }

    /// `show port stats PORT`: waits (at most `timeout`) for the answer and
    /// returns it: cumulative counters, and the rates since the previous
    /// `show` (zero for the first).
    pub fn show_port_stats(&mut self, port: u16, timeout: Duration) -> Result<PortSample> {
        let before = self.samples().iter().filter(|s| s.port == port).count();
        self.command(&format!("show port stats {port}"))?;
        self.proc.wait_for_output(
            &format!("testpmd's statistics of port {port}"),
            timeout,
            |t| {
                parse_output(t)
                    .0
                    .into_iter()
                    .filter(|s| s.port == port)
                    .nth(before)
            },
        )
    }

    /// `stop`: stops forwarding, waits (at most `timeout`) for the forward
    /// statistics of that run and returns them, one per port.
    pub fn stop_forwarding(&mut self, timeout: Duration) -> Result<Vec<ForwardStats>> {
        let text = self.proc.stdout_text();
        let before = forward_summaries(&text);
        let blocks_before = parse_output(&text).1.len();
        self.command("stop")?;
        self.proc
            .wait_for_output("testpmd's forward statistics", timeout, |t| {
                (forward_summaries(t) > before).then_some(())
            })?;
        Ok(parse_output(&self.proc.stdout_text())
            .1
            .split_off(blocks_before))
    }

    /// Receives what is still in flight towards an interactive testpmd
    /// after its generator stopped: `set fwd rxonly`, `start`, `settle`,
    /// `stop` (forwarding must be stopped when this is called). Returns the
    /// forward statistics of the drain.
    pub fn drain(&mut self, settle: Duration, timeout: Duration) -> Result<Vec<ForwardStats>> {
        self.command("set fwd rxonly")?;
        self.command("start")?;
        std::thread::sleep(settle);
        self.stop_forwarding(timeout)
    }

    /// `quit`: waits (at most `timeout`) for an interactive testpmd to exit
    /// and parses everything it printed.
    pub fn quit(&mut self, timeout: Duration) -> Result<TestpmdReport> {
        self.command("quit")?;
        self.finish(timeout)
    }

    /// The supervised process.
    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Waits until forwarding has started (the first statistics block).
    pub fn wait_forwarding(&mut self, timeout: Duration) -> Result<()> {
        self.proc
            .wait_for_output("testpmd to start forwarding", timeout, |t| {
                t.contains("NIC statistics for port").then_some(())
            })
    }

    /// Waits until at least `n` periodic samples have been printed for `port`.
    pub fn wait_samples(&mut self, port: u16, n: usize, timeout: Duration) -> Result<()> {
        self.proc.wait_for_output(
            &format!("{n} statistics samples from testpmd"),
            timeout,
            |t| {
                let (s, _) = parse_output(t);
                (s.iter().filter(|s| s.port == port).count() >= n).then_some(())
            },
        )
    }

    /// The samples printed so far.
    pub fn samples(&self) -> Vec<PortSample> {
        parse_output(&self.proc.stdout_text()).0
    }

    /// Stops forwarding (SIGINT) and parses the final statistics.
    pub fn stop(&mut self, timeout: Duration) -> Result<TestpmdReport> {
        self.proc.signal(Signal::SIGINT)?;
        self.finish(timeout)
    }

    /// Waits for the run to end on its own (its duration) and parses the statistics.
    pub fn finish(&mut self, timeout: Duration) -> Result<TestpmdReport> {
        let status = self.proc.wait_timeout(timeout)?;
        let log = self.proc.stdout_text();
        let (samples, forward) = parse_output(&log);
        // 124: `timeout` stopped it, the normal end of a bounded run.
        let ok = status.success() || status.code() == Some(124);
        if !ok || forward.is_empty() {
            return Err(Error::Parse {
                what: format!("testpmd's final statistics (exit status {status})"),
                path: self.proc.stdout_path().to_path_buf(),
                detail: self.proc.log_tail(),
            });
        }
        Ok(TestpmdReport {
            samples,
            forward,
            log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::OrPanic;

    const SAMPLE: &str = "\
Port statistics ====================================
  ######################## NIC statistics for port 0  ########################
  RX-packets: 10         RX-missed: 0          RX-bytes:  640
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 59257984   TX-errors: 0          TX-bytes:  3792510976

  Throughput (since last show)
  Rx-pps:            5          Rx-bps:            0
  Tx-pps:     29625986          Tx-bps:  15168505296
  ############################################################################
Telling cores to stop...

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 242219968      TX-dropped: 3076160       TX-total: 245296128
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 242219968      TX-dropped: 3076160       TX-total: 245296128
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
";

    #[test]
    fn test_parse_testpmd_output() {
        let (s, f) = parse_output(SAMPLE);
        assert_eq!(
            s,
            vec![PortSample {
                port: 0,
                rx_packets: 10,
                tx_packets: 59257984,
                rx_bytes: 640,
                tx_bytes: 3792510976,
                rx_pps: 5,
                tx_pps: 29625986,
            }]
        );
        assert_eq!(
            f,
            vec![ForwardStats {
                port: 0,
                rx_packets: 0,
                rx_dropped: 0,
                tx_packets: 242219968,
                tx_dropped: 3076160,
            }]
        );
    }

    #[test]
    fn test_forward_summaries_counts_complete_stops() {
        assert_eq!(forward_summaries(SAMPLE), 1);
        let two = format!("{SAMPLE}testpmd> {SAMPLE}");
        assert_eq!(forward_summaries(&two), 2);
        assert_eq!(parse_output(&two).1.len(), 2);
        // The accumulated block without its closing line is not complete.
        let body = SAMPLE.trim_end();
        let cut = &body[..body.rfind('\n').unwrap_or(0)];
        assert_eq!(forward_summaries(cut), 0);
    }

    #[test]
    fn test_interactive_command_line() {
        if require_testpmd().is_err() || which("stdbuf").is_none() {
            eprintln!("skipped: testpmd or stdbuf missing");
            return;
        }
        let cfg = TestpmdConfig::frontend("f", Path::new("/tmp/x.sock"), "flowgen").interactive();
        let cmd = cfg.command().or_panic("interactive command line");
        let args: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args[0].ends_with("sh"), "{args:?}");
        assert!(args[2].contains("trap '' PIPE"), "{args:?}");
        assert!(args.iter().any(|a| a == "-oL"), "{args:?}");
        assert!(args.iter().any(|a| a == "-i"), "{args:?}");
        assert!(!args
            .iter()
            .any(|a| a == "-a" || a.starts_with("--stats-period")));
        let plain = TestpmdConfig::frontend("f", Path::new("/tmp/x.sock"), "txonly")
            .command()
            .or_panic("command line");
        assert!(plain.get_program().to_string_lossy().ends_with("timeout"));
        assert!(plain.get_args().any(|a| a == "-a"));
    }

    #[test]
    fn test_median() {
        assert_eq!(median(vec![]), 0);
        assert_eq!(median(vec![3, 1, 2]), 2);
        assert_eq!(median(vec![4, 1, 3, 2]), 2);
    }

    #[test]
    fn test_queues_rewrites_vdevs() {
        let cfg = TestpmdConfig::frontend("f", Path::new("/tmp/x.sock"), "txonly").queues(2);
        assert_eq!(cfg.vdevs, vec!["virtio_user0,path=/tmp/x.sock,queues=2"]);
    }
}
