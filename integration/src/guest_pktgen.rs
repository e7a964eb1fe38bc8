//! Guest traffic into a backend: a QEMU TCG guest sends 60-byte frames with
//! the kernel's packet generator (`pktgen`) out of its virtio-net device,
//! and the backend counts them.
//!
//! The backend is vdpa-net with the `sink` port, or DPDK's net_vhost in
//! testpmd with `--forward-mode=rxonly` (`iommu-support=1` when the guest
//! has an IOMMU). The guest (see [`pktgen_script`]) disables IPv6 on its
//! interface and gives it no address, so pktgen's frames are the only ones
//! it sends; it records the interface's transmit count before pktgen starts
//! (`TX_BEFORE`, normally 0), runs pktgen for a bounded `count`, prints
//! the interrupts its virtio devices took meanwhile (`GUEST_IRQS`: mostly
//! the used-buffer notifications the backend sent, each costly for a TCG
//! guest) and pktgen's report (`/proc/net/pktgen/<if>`), then waits to be
//! killed.
//!
//! [`run_pktgen`] boots the guest on the backend, waits (bounded) for the
//! report and for the backend's count to reach what the guest sent, stops
//! the backend, and returns both sides' counts as a [`CountCheck`]: frames
//! the guest sent (pktgen's sent count plus `TX_BEFORE`) = frames the
//! backend counted. The figures are pktgen's own rate (its `Result:` line)
//! and the backend's rate: the median of the per-second rates the backend
//! reported (vdpa-net's statistics lines, testpmd's periodic port
//! statistics) over the seconds strictly inside the traffic (the first and
//! the last second with traffic are partial and left out), `None` when the
//! traffic lasted too short for a whole second inside it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::accounting::CountCheck;
use crate::error::{Error, Result};
use crate::process::wait_for_path;
use crate::qemu::{IommuMode, Qemu, QemuConfig, GUEST_TIMEOUT};
use crate::testpmd::{median, net_vhost_vdev, Testpmd, TestpmdConfig};
use crate::vdpa_net::{find_device, pin_workers, VdpaNet, VdpaNetConfig};

/// The guest's MAC address.
pub const GUEST_MAC: &str = "52:54:00:00:00:01";
/// The destination MAC of the generated frames.
pub const DST_MAC: &str = "52:54:00:00:00:02";
/// Frame size without the FCS (pktgen's `pkt_size`): the Ethernet minimum.
pub const FRAME_BYTES: u32 = 60;

/// Bound for the backend's count to reach what the guest sent, once pktgen
/// reported it was done.
const SETTLE: Duration = Duration::from_secs(10);
/// Bound for a backend to start or stop.
const BACKEND: Duration = Duration::from_secs(30);
/// The slowest rate a run is given time for (TCG guest, strict IOMMU,
/// loaded machine), in frames per second.
const SLOWEST_PPS: u64 = 200;

/// The guest script: the first virtio-net interface up without an address
/// and without IPv6, pktgen loaded and set up to send `count` frames of
/// [`FRAME_BYTES`] to [`DST_MAC`], markers `TX_BEFORE n`, `PKTGEN_DONE`
/// (after the report) or `PKTGEN_FAIL`.
pub fn pktgen_script(count: u64) -> String {
    format!(
        r#"IF=$(virtio_if) || {{ mark NO_VIRTIO_IF; exit 1; }}
for c in all default "$IF"; do
    echo 1 > /proc/sys/net/ipv6/conf/$c/disable_ipv6 2>/dev/null
done
ip link set "$IF" up || {{ mark PKTGEN_FAIL link; exit 1; }}
i=0
while [ "$(cat /sys/class/net/$IF/carrier 2>/dev/null)" != 1 ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && {{ mark PKTGEN_FAIL carrier; exit 1; }}
    sleep 0.1
done
load_module pktgen || {{ mark PKTGEN_FAIL no pktgen module; exit 1; }}
PG=/proc/net/pktgen
echo rem_device_all > $PG/kpktgend_0 || {{ mark PKTGEN_FAIL kpktgend_0; exit 1; }}
echo "add_device $IF" > $PG/kpktgend_0 || {{ mark PKTGEN_FAIL add_device; exit 1; }}
for c in "count {count}" "pkt_size {FRAME_BYTES}" "clone_skb 0" "delay 0" \
         "dst 10.0.0.2" "dst_mac {DST_MAC}"; do
    echo "$c" > $PG/$IF || {{ mark PKTGEN_FAIL "$c"; exit 1; }}
done
irqs() {{
    awk '/virtio/ {{ for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i }} END {{ print s + 0 }}' /proc/interrupts
}}
sleep 0.5
IRQS=$(irqs)
mark "TX_BEFORE $(cat /sys/class/net/$IF/statistics/tx_packets)"
mark PKTGEN_START
echo start > $PG/pgctrl
mark "GUEST_IRQS $(( $(irqs) - IRQS ))"
echo "--- pktgen report"
cat $PG/$IF
echo "--- guest tx_packets $(cat /sys/class/net/$IF/statistics/tx_packets) tx_dropped $(cat /sys/class/net/$IF/statistics/tx_dropped)"
mark PKTGEN_DONE
sleep 600
"#
    )
}

/// pktgen's report of a run (its `Result:` line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PktgenResult {
    /// Frames the driver accepted (`pkts-sofar`).
    pub sent: u64,
    /// How long pktgen ran, in microseconds.
    pub usec: u64,
    /// pktgen's own rate.
    pub pps: u64,
    /// Frames the driver refused (dropped; not in `sent`).
    pub errors: u64,
}

/// Parses the last `Result: OK: T(cA+dB) usec, N (60byte,0frags)` /
/// `Ppps XMb/sec (Ybps) errors: E` report in `text`.
pub fn parse_pktgen_result(text: &str) -> Option<PktgenResult> {
    let rest = &text[text.rfind("Result: OK:")? + "Result: OK:".len()..];
    let num = |s: &str| -> Option<u64> {
        let d: String = s
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        d.parse().ok()
    };
    let usec = num(rest)?;
    let sent = num(rest.split_once("usec,")?.1)?;
    let pps_pos = rest.find("pps")?;
    let pps_start = rest[..pps_pos]
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    let pps = rest[pps_start..pps_pos].parse().ok()?;
    let errors = num(rest.split_once("errors:")?.1)?;
    Some(PktgenResult {
        sent,
        usec,
        pps,
        errors,
    })
}

/// The number after marker `@@IOASIS:NAME ` in `console`.
fn marker_value(console: &str, name: &str) -> Option<u64> {
    let tag = format!("@@IOASIS:{name} ");
    let rest = &console[console.find(&tag)? + tag.len()..];
    rest.split("@@").next()?.trim().parse().ok()
}

/// The backend's steady rate from per-interval `(rate, frames)` samples in
/// order: the median rate of the intervals strictly between the first and
/// the last interval that carried frames; `None` if there are none.
pub fn steady_rate(intervals: &[(u64, u64)]) -> Option<u64> {
    let first = intervals.iter().position(|&(_, n)| n > 0)?;
    let last = intervals.iter().rposition(|&(_, n)| n > 0)?;
    if last < first + 2 {
        return None;
    }
    Some(median(
        intervals[first + 1..last].iter().map(|&(r, _)| r).collect(),
    ))
}

/// What counts the guest's frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PktgenBackend {
    /// DPDK's net_vhost in testpmd, rxonly, forwarding lcore on CPU 1.
    NetVhost,
    /// vdpa-net (`bin`) with the `sink` port and extra arguments `args`,
    /// its worker pinned to CPU 1 (where net_vhost's lcore runs) if `pin`
    /// ([`pin_workers`]).
    VdpaNet {
        /// The daemon binary.
        bin: PathBuf,
        /// Extra arguments (`--poll-us N`, ...).
        args: Vec<String>,
        /// Pinned to CPU 1.
        pin: bool,
    },
}

/// One run: both sides' counts and the figures.
#[derive(Debug, Clone)]
pub struct PktgenRun {
    /// pktgen's report.
    pub pktgen: PktgenResult,
    /// Frames the guest's interface had sent before pktgen started.
    pub tx_before: u64,
    /// Frames the backend counted.
    pub counted: u64,
    /// The backend's steady rate ([`steady_rate`]), if the run was long enough.
    pub backend_pps: Option<u64>,
    /// Interrupts of the guest's virtio devices while pktgen ran.
    pub guest_irqs: Option<u64>,
    /// Frames the guest sent (plus `skew`) against frames the backend counted.
    pub check: CountCheck,
}

/// A running backend, killed on drop.
enum Running {
    Testpmd(Testpmd),
    Vdpa(VdpaNet),
}

impl Running {
    fn start(
        b: &PktgenBackend,
        iommu: IommuMode,
        sock: &Path,
        dir: &Path,
        run_for: Duration,
    ) -> Result<Running> {
        match b {
            PktgenBackend::NetVhost => {
                let cfg = TestpmdConfig::reference_backend("net-vhost", sock, "rxonly")
                    .vdevs(vec![net_vhost_vdev(0, sock, 1, iommu != IommuMode::Off)])
                    .duration(run_for);
                let mut p = Testpmd::spawn(&cfg, dir)?;
                wait_for_path(sock, BACKEND, Some(p.proc_mut()))?;
                Ok(Running::Testpmd(p))
            }
            PktgenBackend::VdpaNet { bin, args, pin } => {
                let mut cfg = VdpaNetConfig::new().device(sock, "sink").stats_interval(1);
                for a in args {
                    cfg = cfg.arg(a);
                }
                let bin = if *pin {
                    pin_workers(bin, 1, &mut cfg, dir)?
                } else {
                    bin.clone()
                };
                Ok(Running::Vdpa(VdpaNet::spawn_bin(&bin, &cfg, dir, None)?))
            }
        }
    }

    /// Waits (at most [`SETTLE`]) until the backend reports `expected`
    /// frames; a shortfall is left to the count check.
    fn settle(&mut self, sock: &Path, expected: u64) {
        let r = match self {
            Running::Testpmd(p) => {
                p.proc_mut()
                    .wait_for_output("net_vhost's count to settle", SETTLE, |t| {
                        crate::testpmd::parse_output(t)
                            .0
                            .iter()
                            .rev()
                            .find(|s| s.port == 0)
                            .filter(|s| s.rx_packets >= expected)
                            .map(|_| ())
                    })
            }
            Running::Vdpa(v) => v
                .wait_stats("vdpa-net's count to settle", SETTLE, |l| {
                    device_rx(l, sock) >= expected
                })
                .map(|_| ()),
        };
        if let Err(e) = r {
            log::warn!("backend count did not reach {expected}: {e}");
        }
    }

    /// Stops the backend: frames counted and per-second `(rate, frames)`.
    fn stop(&mut self, sock: &Path) -> Result<(u64, Vec<(u64, u64)>)> {
        match self {
            Running::Testpmd(p) => {
                let r = p.stop(BACKEND)?;
                let port = r.port(0).ok_or_else(|| Error::Parse {
                    what: "net_vhost's forward statistics of port 0".into(),
                    path: PathBuf::from("-"),
                    detail: r.log.lines().rev().take(30).collect::<Vec<_>>().join("\n"),
                })?;
                let samples: Vec<_> = r.samples.iter().filter(|s| s.port == 0).collect();
                let intervals = samples
                    .windows(2)
                    .map(|w| (w[1].rx_pps, w[1].rx_packets.saturating_sub(w[0].rx_packets)))
                    .collect();
                Ok((port.rx_packets, intervals))
            }
            Running::Vdpa(v) => {
                let last = v.stop(BACKEND)?;
                let lines = v.stats_lines()?;
                let points: Vec<(f64, u64)> = lines
                    .iter()
                    .filter_map(|l| Some((l.get("time")?.as_f64()?, device_rx(l, sock))))
                    .collect();
                let intervals = points
                    .windows(2)
                    .map(|w| {
                        let n = w[1].1.saturating_sub(w[0].1);
                        let dt = w[1].0 - w[0].0;
                        let rate = if dt > 0.0 { (n as f64 / dt) as u64 } else { 0 };
                        (rate, n)
                    })
                    .collect();
                Ok((device_rx(&last, sock), intervals))
            }
        }
    }
}

/// Frames the device on `sock` received in a vdpa-net statistics line.
fn device_rx(line: &Value, sock: &Path) -> u64 {
    crate::vdpa_net::counters(find_device(line, sock).unwrap_or(line)).rx_packets
}

/// Boots a guest with `iommu` on `backend`, sends `count` frames with
/// pktgen and counts them on the backend (see the module documentation).
/// `skew` is added to the guest's count before the comparison (test only,
/// to show that the check fails). Logs go to `dir`.
pub fn run_pktgen(
    backend: &PktgenBackend,
    iommu: IommuMode,
    count: u64,
    skew: u64,
    dir: &Path,
) -> Result<PktgenRun> {
    let sock = dir.join("net.sock");
    let send_bound = Duration::from_secs(60 + count / SLOWEST_PPS);
    let run_for = GUEST_TIMEOUT + send_bound + SETTLE + Duration::from_secs(60);
    let mut running = Running::start(backend, iommu, &sock, dir, run_for)?;
    let cfg = QemuConfig::new("pktgen-guest", &pktgen_script(count))
        .netdev(&sock, GUEST_MAC)
        .iommu(iommu);
    let mut guest = Qemu::launch(&cfg, dir)?;
    guest.wait_marker("PKTGEN_START", GUEST_TIMEOUT)?;
    match guest.wait_any(&["PKTGEN_DONE", "PKTGEN_FAIL"], send_bound)? {
        0 => {}
        _ => {
            return Err(Error::Parse {
                what: "pktgen in the guest (it failed)".into(),
                path: guest.console_path().to_path_buf(),
                detail: guest.console_text(),
            })
        }
    }
    let console = guest.console_text();
    let parse_err = |what: &str| Error::Parse {
        what: what.into(),
        path: guest.console_path().to_path_buf(),
        detail: console.clone(),
    };
    let pktgen = parse_pktgen_result(&console).ok_or_else(|| parse_err("pktgen's Result line"))?;
    let tx_before =
        marker_value(&console, "TX_BEFORE").ok_or_else(|| parse_err("the TX_BEFORE marker"))?;
    let sent = pktgen.sent + tx_before;
    running.settle(&sock, sent);
    let (counted, intervals) = running.stop(&sock)?;
    guest.kill();
    Ok(PktgenRun {
        pktgen,
        tx_before,
        counted,
        backend_pps: steady_rate(&intervals),
        guest_irqs: marker_value(&console, "GUEST_IRQS"),
        check: CountCheck::new(
            format!(
                "frames the guest sent (pktgen {} + {tx_before} before it) / the backend counted",
                pktgen.sent
            ),
            sent + skew,
            counted,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "\
Params: count 2000  min_pkt_size: 60  max_pkt_size: 60
     frags: 0  delay: 0  clone_skb: 0  ifname: eth0
Current:
     pkts-sofar: 2000  errors: 0
Result: OK: 431006(c430795+d210) usec, 2000 (60byte,0frags)
  4640pps 2Mb/sec (2227200bps) errors: 3
";

    #[test]
    fn test_parse_pktgen_result() {
        assert_eq!(
            parse_pktgen_result(REPORT),
            Some(PktgenResult {
                sent: 2000,
                usec: 431006,
                pps: 4640,
                errors: 3
            })
        );
        assert_eq!(parse_pktgen_result("Result: Idle\n"), None);
    }

    #[test]
    fn test_marker_value() {
        let c = "x\n@@IOASIS:TX_BEFORE 3@@\n@@IOASIS:PKTGEN_START@@";
        assert_eq!(marker_value(c, "TX_BEFORE"), Some(3));
        assert_eq!(marker_value(c, "NOPE"), None);
    }

    #[test]
    fn test_steady_rate_leaves_out_partial_seconds() {
        // Idle, a partial first second, three full ones, a partial last one.
        let s = [
            (0, 0),
            (10, 10),
            (90, 90),
            (100, 100),
            (95, 95),
            (20, 20),
            (0, 0),
        ];
        assert_eq!(steady_rate(&s), Some(95));
        assert_eq!(steady_rate(&[(0, 0), (5, 5), (7, 7), (0, 0)]), None);
        assert_eq!(steady_rate(&[]), None);
    }

    #[test]
    fn test_script_sets_up_pktgen() {
        let s = pktgen_script(2000);
        assert!(s.contains("\"count 2000\""));
        assert!(s.contains("pkt_size 60"));
        assert!(s.contains("load_module pktgen"));
        assert!(s.contains("disable_ipv6"));
    }
}
