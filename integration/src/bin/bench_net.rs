//! Packet-rate benchmark: vdpa-net against DPDK's own vhost backend
//! (net_vhost), with the same testpmd virtio_user frontend, alternating the
//! backends round by round on one machine and comparing medians.
//!
//! Run through `scripts/bench-net.sh` (it prepares hugepages, builds in
//! release mode and passes the commit). Measurements, all with 64-byte
//! frames:
//!
//! - `to-backend`: frontend txonly into net_vhost (rxonly) / vdpa-net `sink`;
//!   the figure is the frontend's Tx-pps (frames the backend took off the ring);
//! - `from-backend`: frames the backend delivers into the frontend's receive
//!   ring, the frontend's Rx-pps: the frontend in rxonly, net_vhost
//!   generating (txonly, which builds each packet in a buffer from its
//!   pool), vdpa-net its `source` port (which writes each packet afresh,
//!   with its sequence number);
//! - `loop`: the same workload for both: frontend flowgen, the backend
//!   returning every frame (net_vhost macswap / vdpa-net `reflect`); the
//!   figure is the frontend's Rx-pps;
//! - `tap` (with `--tap`): frontend txonly through the backend into a tap
//!   inside a network namespace, counted on the tap (DPDK's reference is
//!   net_vhost + net_tap in io mode);
//! - `tcp` (with `--tcp`, vdpa-net only): a TCG guest on vdpa-net with a
//!   `tap` port inside a network namespace serves a file; busybox wget in
//!   the namespace downloads it a few times
//!   ([`ioasis_integration::tcp_bulk`], the same path as the guest test);
//!   the figure is the median bytes per second, with the frames and bytes
//!   the tap received (their mean size shows TSO at work);
//! - `guest-pktgen` (with `--test guest-pktgen` or `--guest-iommu MODE`): a
//!   TCG guest sends 60-byte frames with the kernel's pktgen into vdpa-net's
//!   `sink` / net_vhost in testpmd rxonly, alternating, without a guest
//!   IOMMU and behind intel-iommu in strict and lazy mode
//!   (`--guest-iommu none|strict|lazy|all`, repeatable; default none and
//!   strict); `--guest-packets N` sets pktgen's count (default per mode);
//!   every round checks that pktgen's sent count equals the backend's
//!   count (see `bench_net/guest_pktgen.rs`).
//!
//! With `--packed` the frontend drives every backend on packed rings
//! (`packed_vq=1`), and each vdpa-net mode is measured on split rings too,
//! in the same rounds (`MODE split`): vdpa-net packed against net_vhost
//! packed, and against vdpa-net split, from one run.
//!
//! vdpa-net is measured in two modes in the same run, each round against
//! the same net_vhost figure: as users start it (no `--poll-us`, not
//! pinned; `vdpa-net`) and polling (`--poll-us 1000`, its worker pinned to
//! CPU 1 with `--worker-cpus 1`, where net_vhost's forwarding lcore runs
//! while testpmd's frontend forwards on CPU 0; `vdpa-net poll`; the other
//! threads unpinned, as net_vhost's control threads are; a binary without
//! `--worker-cpus` runs wholly under `taskset -c 1`). `--mode` picks one;
//! `--poll-us N` sets the window (0: no polling mode); `--no-pin` unpins; a
//! `--vdpa-arg --poll-us` replaces both by one run with the given arguments.
//!
//! Every measurement checks itself (see [`ioasis_integration::accounting`]):
//! the frontend is an interactive testpmd whose port counters are read
//! after it stops, the backend's counters when it exits (vdpa-net's final
//! statistics line, net_vhost's testpmd forward statistics), and
//! - to the backend: frames the frontend sent = frames the backend counted;
//! - loop: the generator stops, the frontend receives for half a second
//!   more (rxonly) so nothing is left in flight, then frames sent = frames
//!   the backend counted, frames the backend returned = frames received,
//!   and frames sent = frames received back + frames the backend counted
//!   as dropped (no receive buffers; printed with the figure);
//! - from the backend: the backend stops first, the frontend then drains
//!   its ring, frames the backend sent = frames received, up to one ring
//!   (256) the frontend sometimes does not see after the disconnect;
//! - tap: also frames the backend wrote to the tap = frames the tap
//!   received.
//!
//! A check that fails makes the run fail (exit status 1) with the number of
//! frames lost; `--check-skew N` (hidden, for showing that) adds N frames
//! to the sender's count. The output names the commit
//! (`IOASIS_BENCH_COMMIT`, or `git rev-parse --short HEAD`, `-dirty` when
//! tracked files differ), each backend's mode and the load average at the
//! start and the end.
//!
//! Usage: `ioasis-bench-net [--rounds N] [--secs S] [--tap] [--tcp]
//! [--only-reference] [--no-pin] [--poll-us N] [--mode MODE]...
//! [--test NAME]... [--guest-iommu MODE]... [--guest-packets N]
//! [--vdpa-arg ARG]...` (`--help` prints every flag).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use guest_pktgen::GuestIommu;
use ioasis_integration::accounting::{verify, CountCheck};
use ioasis_integration::bench_record::{commit, loadavg};
use ioasis_integration::env::{heavy_lock, require_tool, WorkDir};
use ioasis_integration::netns::Netns;
use ioasis_integration::process::wait_for_path;
use ioasis_integration::tcp_bulk::{TcpBulk, Transfer, BULK_BYTES};
use ioasis_integration::testpmd::{
    median, net_vhost_vdev, virtio_user_vdev, ForwardStats, Testpmd, TestpmdConfig,
};
use ioasis_integration::vdpa_net::{pin_workers, vdpa_net_bin, VdpaNet, VdpaNetConfig};
use ioasis_integration::{Error, Result};

#[path = "bench_net/guest_pktgen.rs"]
mod guest_pktgen;

const STOP: Duration = Duration::from_secs(30);
const SOCKET: Duration = Duration::from_secs(30);
/// Bound for one command of the interactive frontend.
const COMMAND: Duration = Duration::from_secs(20);
/// A median rate below this many frames a second is a stalled device, and
/// the round fails: counts that agree at 0 prove nothing (the adaptive
/// default mode once delivered nothing from `source` after its first sleep
/// while every count agreed).
const STALLED_PPS: u64 = 1000;

/// How long the frontend keeps receiving after the generator stopped, so
/// frames still in flight come back before the counts are compared.
const DRAIN: Duration = Duration::from_millis(500);

/// What serves the frontend in a measurement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Backend {
    /// DPDK's net_vhost in testpmd.
    Reference,
    /// vdpa-net with these extra arguments, its worker pinned to CPU 1 or not.
    VdpaNet {
        /// Its name in the output (`vdpa-net`, `vdpa-net poll`).
        name: String,
        /// Extra daemon arguments of the packet tests.
        args: Vec<String>,
        /// Pinned to CPU 1 (where net_vhost's forwarding lcore runs).
        pin: bool,
        /// Another build of vdpa-net (`--compare-bin`); `None`: the
        /// workspace's own.
        bin: Option<PathBuf>,
        /// Served on split rings even in a `--packed` run (the packed
        /// against split comparison).
        split: bool,
    },
}

impl Backend {
    fn name(&self) -> &str {
        match self {
            Backend::Reference => "net_vhost",
            Backend::VdpaNet { name, .. } => name,
        }
    }

    /// Whether the frontend drives it on packed rings in this run.
    fn packed(&self, opts: &Opts) -> bool {
        opts.packed && !matches!(self, Backend::VdpaNet { split: true, .. })
    }

    /// How it runs, for the run's header.
    fn mode(&self) -> String {
        match self {
            Backend::Reference => {
                "testpmd net_vhost, forwarding lcore on CPU 1 (busy-polls)".into()
            }
            Backend::VdpaNet { args, pin, bin, .. } => format!(
                "{}vdpa-net {}{}",
                bin.as_ref()
                    .map(|b| format!("{} as ", b.display()))
                    .unwrap_or_default(),
                if args.is_empty() {
                    "(no flags)".to_string()
                } else {
                    args.join(" ")
                },
                if *pin {
                    ", worker pinned to CPU 1"
                } else {
                    ", not pinned"
                }
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Test {
    ToBackend,
    Loop,
    FromBackend,
    Tap,
}

impl Test {
    fn name(self) -> &'static str {
        match self {
            Test::ToBackend => "to-backend",
            Test::Loop => "loop",
            Test::FromBackend => "from-backend",
            Test::Tap => "tap",
        }
    }
}

/// The names `--test` takes: the frontend tests and the guest's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TestName {
    ToBackend,
    Loop,
    FromBackend,
    Tap,
    GuestPktgen,
}

impl TestName {
    /// The frontend test of this name (`None` for the guest's).
    fn frontend(self) -> Option<Test> {
        match self {
            TestName::ToBackend => Some(Test::ToBackend),
            TestName::Loop => Some(Test::Loop),
            TestName::FromBackend => Some(Test::FromBackend),
            TestName::Tap => Some(Test::Tap),
            TestName::GuestPktgen => None,
        }
    }
}

/// The vdpa-net modes a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// As users start it: no `--poll-us`, not pinned.
    Default,
    /// `--poll-us N` (`--poll-us`, default 1000), worker pinned to CPU 1.
    Poll,
}

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "ioasis-bench-net",
    version,
    about = "64-byte packet rates of vdpa-net against DPDK's net_vhost, alternated round by round, every frame counted"
)]
struct Cli {
    /// Rounds per test; the figures are medians over them.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=50))]
    rounds: u64,
    /// Seconds each measurement runs.
    #[arg(long, value_name = "S", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(2..=120))]
    secs: u64,
    /// Adds the tap test (frames through the backend into a tap in a network
    /// namespace).
    #[arg(long)]
    tap: bool,
    /// Adds the guest bulk TCP transfer (vdpa-net only).
    #[arg(long)]
    tcp: bool,
    /// Measures net_vhost only.
    #[arg(long)]
    only_reference: bool,
    /// Lets vdpa-net run on any CPU in every mode (by default the polling
    /// mode is pinned to CPU 1).
    #[arg(long)]
    no_pin: bool,
    /// Busy-poll window of vdpa-net's polling mode; 0: the polling mode is
    /// not measured.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_POLL_US)]
    poll_us: u64,
    /// vdpa-net modes to measure (repeatable): default (no --poll-us, as
    /// users start it) and poll (--poll-us N, pinned); by default both.
    #[arg(long = "mode", value_name = "MODE", value_enum)]
    modes: Vec<Mode>,
    /// Runs only this test (repeatable); by default all but guest-pktgen.
    #[arg(long = "test", value_name = "NAME", value_enum)]
    only: Vec<TestName>,
    /// Guest-IOMMU modes of the guest-pktgen test (repeatable; implies the
    /// test): none, strict, lazy or all; default none and strict.
    #[arg(long = "guest-iommu", value_name = "MODE", value_enum)]
    guest_iommu: Vec<GuestIommu>,
    /// Frames pktgen sends per guest-pktgen round (default per mode: none
    /// 800000, lazy 200000, strict 40000).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    guest_packets: Option<u64>,
    /// An extra argument for vdpa-net (repeatable); one that sets
    /// `--poll-us` replaces the modes by a single vdpa-net run with these
    /// arguments.
    #[arg(long = "vdpa-arg", value_name = "ARG", allow_hyphen_values = true)]
    vdpa_args: Vec<String>,
    /// Another vdpa-net binary (e.g. a build of an earlier commit) measured
    /// in the same run: every vdpa-net mode runs with it too, named
    /// `MODE @NAME` (`--compare-name`), alternated with the others round by
    /// round, so a change is compared before and after on equal terms.
    #[arg(long, value_name = "PATH")]
    compare_bin: Option<PathBuf>,
    /// The name of `--compare-bin` in the output.
    #[arg(long, value_name = "NAME", default_value = "base")]
    compare_name: String,
    /// The frontend drives every backend on packed rings (virtio_user's
    /// `packed_vq=1`: net_vhost and vdpa-net both serve packed rings);
    /// each vdpa-net mode is also measured on split rings in the same
    /// rounds, named `MODE split`.
    #[arg(long)]
    packed: bool,
    /// Test only: adds N frames to what the frontend sent before the counts
    /// are compared, to show that the check fails.
    #[arg(long, value_name = "N", default_value_t = 0, hide = true)]
    check_skew: u64,
}

/// What a run measures, from the command line.
struct Opts {
    rounds: usize,
    secs: u64,
    tap: bool,
    tcp: bool,
    vdpa: Option<PathBuf>,
    vdpa_args: Vec<String>,
    pin: bool,
    poll_us: u64,
    modes: Vec<Mode>,
    /// Only these tests (`--test NAME`, repeatable); empty: all.
    only: Vec<Test>,
    /// No frontend test (`--test` named only guest-pktgen).
    no_frontend_tests: bool,
    /// The guest-pktgen test's IOMMU modes, if it runs.
    guest_iommu: Option<Vec<GuestIommu>>,
    guest_packets: Option<u64>,
    check_skew: u64,
    /// `--packed`: the frontend negotiates packed rings.
    packed: bool,
    /// `--compare-bin` and its name.
    compare: Option<(PathBuf, String)>,
}

impl Opts {
    /// The vdpa-net variants measured against net_vhost: each mode with the
    /// workspace's binary, followed by the same mode with `--compare-bin`.
    fn vdpa_backends(&self) -> Vec<Backend> {
        let own = self.own_vdpa_backends();
        let Some((bin, label)) = &self.compare else {
            return own;
        };
        let mut v = Vec::new();
        for b in own {
            if let Backend::VdpaNet {
                name, args, pin, ..
            } = &b
            {
                let other = Backend::VdpaNet {
                    name: format!("{name} @{label}"),
                    args: args.clone(),
                    pin: *pin,
                    bin: Some(bin.clone()),
                    split: false,
                };
                v.push(b);
                v.push(other);
            }
        }
        v
    }

    /// The vdpa-net modes of the run, with the workspace's binary.
    fn own_vdpa_backends(&self) -> Vec<Backend> {
        if self.vdpa.is_none() {
            return Vec::new();
        }
        if self.vdpa_args.iter().any(|a| a == "--poll-us") {
            return vec![Backend::VdpaNet {
                name: "vdpa-net".into(),
                args: self.vdpa_args.clone(),
                pin: self.pin,
                bin: None,
                split: false,
            }];
        }
        let modes = if self.modes.is_empty() {
            vec![Mode::Default, Mode::Poll]
        } else {
            self.modes.clone()
        };
        let mut v = Vec::new();
        for m in modes {
            match m {
                Mode::Default => v.push(Backend::VdpaNet {
                    name: "vdpa-net".into(),
                    args: self.vdpa_args.clone(),
                    pin: false,
                    bin: None,
                    split: false,
                }),
                Mode::Poll if self.poll_us > 0 => {
                    let mut args = self.vdpa_args.clone();
                    args.push("--poll-us".into());
                    args.push(self.poll_us.to_string());
                    v.push(Backend::VdpaNet {
                        name: "vdpa-net poll".into(),
                        args,
                        pin: self.pin,
                        bin: None,
                        split: false,
                    });
                }
                Mode::Poll => {}
            }
        }
        if self.packed {
            // Each mode again on split rings, in the same rounds.
            let split: Vec<Backend> = v
                .iter()
                .filter_map(|b| match b {
                    Backend::VdpaNet {
                        name,
                        args,
                        pin,
                        bin,
                        ..
                    } => Some(Backend::VdpaNet {
                        name: format!("{name} split"),
                        args: args.clone(),
                        pin: *pin,
                        bin: bin.clone(),
                        split: true,
                    }),
                    Backend::Reference => None,
                })
                .collect();
            v.extend(split);
        }
        v
    }
}

/// A backend under test, killed on drop.
enum Running {
    Testpmd(Testpmd),
    Vdpa(VdpaNet),
}

/// What a backend counted, when it stopped.
#[derive(Debug, Clone, Copy, Default)]
struct BackendCounts {
    /// Frames it took from the frontend.
    rx: u64,
    /// Frames it delivered to the frontend.
    tx: u64,
    /// Frames it dropped and counted (no receive buffers, full queue).
    drops: u64,
    /// Frames it delivered to the tap (tap test, net_vhost: its tap port's
    /// transmissions; vdpa-net: received minus drops and errors).
    to_tap: u64,
}

impl Running {
    /// Stops the backend and reads its counters.
    fn stop(&mut self, t: Test, sock: &Path) -> Result<BackendCounts> {
        match self {
            Running::Testpmd(p) => {
                let r = p.stop(STOP)?;
                let port = |n: u16| -> Result<ForwardStats> {
                    r.port(n).ok_or_else(|| Error::Parse {
                        what: format!("net_vhost's forward statistics of port {n}"),
                        path: PathBuf::from("-"),
                        detail: r.log.lines().rev().take(30).collect::<Vec<_>>().join("\n"),
                    })
                };
                let p0 = port(0)?;
                let mut c = BackendCounts {
                    rx: p0.rx_packets,
                    tx: p0.tx_packets,
                    drops: p0.tx_dropped,
                    to_tap: 0,
                };
                if t == Test::Tap {
                    let p1 = port(1)?;
                    c.to_tap = p1.tx_packets;
                    c.drops = p1.tx_dropped;
                }
                Ok(c)
            }
            Running::Vdpa(v) => {
                let last = v.stop(STOP)?;
                let c = v.device_counters(&last, sock);
                Ok(BackendCounts {
                    rx: c.rx_packets,
                    tx: c.tx_packets,
                    drops: c.drops,
                    to_tap: c.rx_packets.saturating_sub(c.drops + c.errors),
                })
            }
        }
    }
}

fn start_backend(
    b: &Backend,
    t: Test,
    opts: &Opts,
    dir: &Path,
    sock: &Path,
    ns: Option<&Netns>,
) -> Result<Running> {
    match b {
        Backend::Reference => {
            let (fwd, vdevs) = match t {
                Test::ToBackend => ("rxonly", vec![net_vhost_vdev(0, sock, 1, false)]),
                Test::Loop => ("macswap", vec![net_vhost_vdev(0, sock, 1, false)]),
                Test::FromBackend => ("txonly", vec![net_vhost_vdev(0, sock, 1, false)]),
                Test::Tap => (
                    "io",
                    vec![
                        net_vhost_vdev(0, sock, 1, false),
                        "net_tap0,iface=btap0".to_string(),
                    ],
                ),
            };
            let mut cfg = TestpmdConfig::reference_backend("backend", sock, fwd)
                .vdevs(vdevs)
                .duration(Duration::from_secs(opts.secs + 120));
            if let Some(ns) = ns {
                cfg = cfg.in_netns(ns.name());
            }
            let mut p = Testpmd::spawn(&cfg, dir)?;
            wait_for_path(sock, SOCKET, Some(p.proc_mut()))?;
            Ok(Running::Testpmd(p))
        }
        Backend::VdpaNet { args, pin, bin, .. } => {
            let bin = bin
                .as_ref()
                .or(opts.vdpa.as_ref())
                .ok_or_else(|| Error::Unavailable("vdpa-net".into()))?;
            // The from-backend workload writes a fresh frame per packet,
            // as net_vhost's testpmd txonly does.
            let port = match t {
                Test::ToBackend => "sink",
                Test::Loop => "reflect",
                Test::FromBackend => "source",
                Test::Tap => "tap=btap0",
            };
            let mut cfg = VdpaNetConfig::new().device(sock, port).stats_interval(1);
            for a in args {
                cfg = cfg.arg(a);
            }
            // Workers pinned to CPU 1, where net_vhost's forwarding lcore
            // runs, so both backends get the same share of the machine.
            let bin = if *pin {
                pin_workers(bin, 1, &mut cfg, dir)?
            } else {
                bin.clone()
            };
            Ok(Running::Vdpa(VdpaNet::spawn_bin(&bin, &cfg, dir, ns)?))
        }
    }
}

/// virtio_user's default queue size: the receive buffers a frontend has
/// posted at most.
const RING_SIZE: u64 = 256;

/// One measurement: its figure (median pps) and the counts it checked.
struct Outcome {
    pps: u64,
    checks: Vec<CountCheck>,
    /// Frames the backend dropped and counted (loop: no receive buffers).
    drops: u64,
}

/// One measurement. The frontend is an interactive testpmd: started, its
/// port statistics read once a second, then stopped; in the loop it then
/// receives for [`DRAIN`] with its generator stopped; from the backend, the
/// backend stops first and the frontend then drains the ring. The counts
/// of both sides are compared afterwards (see [`Outcome::checks`]).
fn measure(b: &Backend, t: Test, opts: &Opts) -> Result<Outcome> {
    let dir = WorkDir::new(&format!(
        "bench-{}-{}",
        b.name().replace(' ', "-"),
        t.name()
    ))?;
    let sock = dir.join("net.sock");
    let ns = if t == Test::Tap {
        Some(Netns::new()?)
    } else {
        None
    };
    let mut backend = start_backend(b, t, opts, dir.path(), &sock, ns.as_ref())?;
    if let Some(ns) = &ns {
        ns.wait_link("btap0", SOCKET)?;
        ns.addr_up("btap0", "10.0.8.1/24")?;
    }
    let fwd = match t {
        Test::ToBackend | Test::Tap => "txonly",
        Test::Loop => "flowgen",
        Test::FromBackend => "rxonly",
    };
    let mut cfg = TestpmdConfig::frontend("frontend", &sock, fwd)
        .interactive()
        .duration(Duration::from_secs(opts.secs + 120));
    if b.packed(opts) {
        cfg = cfg.vdevs(vec![format!(
            "{},packed_vq=1",
            virtio_user_vdev(0, &sock, 1)
        )]);
    }
    let mut front = Testpmd::spawn(&cfg, dir.path())?;
    let tap_before = match &ns {
        Some(ns) => ns.link_stats("btap0")?.rx_packets,
        None => 0,
    };
    front.command("start")?;
    // The first answer only sets testpmd's reference point for the rates.
    front.show_port_stats(0, COMMAND)?;
    let mut samples = Vec::new();
    let mut tap_rates = Vec::new();
    let mut prev_tap = (tap_before, Instant::now());
    for _ in 0..opts.secs {
        std::thread::sleep(Duration::from_secs(1));
        samples.push(front.show_port_stats(0, COMMAND)?);
        if let Some(ns) = &ns {
            let now = (ns.link_stats("btap0")?.rx_packets, Instant::now());
            let dt = now.1.duration_since(prev_tap.1).as_secs_f64();
            tap_rates.push(((now.0 - prev_tap.0) as f64 / dt) as u64);
            prev_tap = now;
        }
    }
    let mut early = None;
    match t {
        Test::FromBackend => {
            // The generator is the backend: it stops first, then the
            // frontend takes what is left in its receive ring.
            early = Some(backend.stop(t, &sock)?);
            std::thread::sleep(DRAIN);
            front.stop_forwarding(COMMAND)?;
        }
        Test::Loop => {
            front.stop_forwarding(COMMAND)?;
            front.drain(DRAIN, COMMAND)?;
        }
        Test::ToBackend | Test::Tap => {
            front.stop_forwarding(COMMAND)?;
        }
    }
    let totals = front.show_port_stats(0, COMMAND)?;
    let tap_total = match &ns {
        Some(ns) => ns.link_stats("btap0")?.rx_packets - tap_before,
        None => 0,
    };
    front.quit(STOP)?;
    let counts = match early {
        Some(c) => c,
        None => backend.stop(t, &sock)?,
    };
    let sent = totals.tx_packets + opts.check_skew;
    let received = totals.rx_packets;
    let name = b.name();
    let mut checks = Vec::new();
    match t {
        Test::ToBackend => {
            checks.push(CountCheck::new(
                format!("frames the frontend sent / {name} counted"),
                sent,
                counts.rx,
            ));
        }
        Test::Tap => {
            checks.push(CountCheck::new(
                format!("frames the frontend sent / {name} counted"),
                sent,
                counts.rx,
            ));
            checks.push(CountCheck::new(
                format!("frames {name} wrote to the tap / the tap received"),
                counts.to_tap,
                tap_total,
            ));
        }
        Test::Loop => {
            checks.push(CountCheck::new(
                format!("frames the frontend sent / {name} counted"),
                sent,
                counts.rx,
            ));
            checks.push(CountCheck::new(
                format!("frames {name} returned / the frontend received"),
                counts.tx,
                received,
            ));
            checks.push(CountCheck::new(
                format!("frames the frontend sent / received back + dropped by {name}"),
                sent,
                received + counts.drops,
            ));
        }
        Test::FromBackend => {
            // The frontend drains its ring after the backend stopped, but
            // sometimes does not see the frames of its last ring of posted
            // buffers (measured with both backends: 0 or 256 frames).
            checks.push(
                CountCheck::new(
                    format!("frames {name} sent / the frontend received"),
                    counts.tx + opts.check_skew,
                    received,
                )
                .in_flight(RING_SIZE),
            );
        }
    }
    // Skip the first second (warm-up) when there are more.
    let skip = usize::from(samples.len() > 2);
    let figure = match t {
        Test::ToBackend => median(samples.iter().skip(skip).map(|s| s.tx_pps).collect()),
        Test::Loop | Test::FromBackend => {
            median(samples.iter().skip(skip).map(|s| s.rx_pps).collect())
        }
        Test::Tap => median(tap_rates.into_iter().skip(skip).collect()),
    };
    Ok(Outcome {
        pps: figure,
        checks,
        // A generator's refused attempts (txonly's TX-dropped) are not
        // frames lost.
        drops: if t == Test::FromBackend {
            0
        } else {
            counts.drops
        },
    })
}

/// Downloads per `--tcp` run; the figure is their median.
const TCP_TRANSFERS: usize = 5;

/// The polling mode's window: net_vhost's forwarding lcore polls without
/// ever sleeping; with a 1 ms idle window vdpa-net's worker under load never
/// sleeps either.
const DEFAULT_POLL_US: u64 = 1000;

/// The guest TCP bulk transfers (`--tcp`): vdpa-net unpinned, since the TCG
/// guest needs both CPUs.
fn measure_tcp(opts: &Opts) -> Result<Vec<Transfer>> {
    let bin = opts
        .vdpa
        .as_ref()
        .ok_or_else(|| Error::Unavailable("vdpa-net".into()))?;
    require_tool("qemu-system-x86_64", "qemu-system-x86")?;
    let busybox = require_tool("busybox", "busybox-static")?;
    let dir = WorkDir::new("bench-vdpa-net-tcp")?;
    let bulk = TcpBulk::start(bin, &opts.vdpa_args, &busybox, dir.path())?;
    eprintln!("guest virtio features: {}", bulk.features());
    let mut out = Vec::new();
    for i in 0..TCP_TRANSFERS {
        let t = bulk.transfer()?;
        println!(
            "tcp transfer {} vdpa-net {:>7.1} MB/s ({} bytes in {:.2} s, {} frames on the tap, mean {} bytes)",
            i + 1,
            t.bytes_per_sec() / 1e6,
            t.received,
            t.secs,
            t.frames,
            t.mean_frame()
        );
        if t.received != BULK_BYTES {
            return Err(Error::Mismatch {
                what: format!("bytes received in transfer {}", i + 1),
                expected: BULK_BYTES,
                got: t.received,
            });
        }
        out.push(t);
    }
    bulk.stop(STOP)?;
    Ok(out)
}

/// Parses the command line (help, version and usage errors exit here: 0,
/// 0 and 2) and finds the vdpa-net binary unless `--only-reference`.
fn parse_opts() -> Opts {
    let cli = Cli::parse();
    let vdpa = if cli.only_reference {
        None
    } else {
        match vdpa_net_bin() {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("!! vdpa-net unavailable, measuring net_vhost only: {e}");
                None
            }
        }
    };
    Opts {
        // Bounded to 1..=50 by the parser.
        rounds: usize::try_from(cli.rounds).unwrap_or(50),
        secs: cli.secs,
        tap: cli.tap,
        tcp: cli.tcp,
        vdpa,
        vdpa_args: cli.vdpa_args,
        pin: !cli.no_pin,
        poll_us: cli.poll_us,
        modes: cli.modes,
        only: cli.only.iter().filter_map(|t| t.frontend()).collect(),
        no_frontend_tests: !cli.only.is_empty() && cli.only.iter().all(|t| t.frontend().is_none()),
        guest_iommu: (cli.only.contains(&TestName::GuestPktgen) || !cli.guest_iommu.is_empty())
            .then_some(cli.guest_iommu),
        guest_packets: cli.guest_packets,
        check_skew: cli.check_skew,
        packed: cli.packed,
        compare: cli.compare_bin.map(|b| (b, cli.compare_name)),
    }
}

fn fmt_mpps(v: u64) -> String {
    format!("{:.2}", v as f64 / 1e6)
}

/// "median (min-max)" of per-round figures, in Mpps.
fn spread(v: &[u64]) -> String {
    match (v.iter().min(), v.iter().max()) {
        (Some(lo), Some(hi)) => format!(
            "{} ({}-{})",
            fmt_mpps(median(v.to_vec())),
            fmt_mpps(*lo),
            fmt_mpps(*hi)
        ),
        _ => "-".into(),
    }
}

/// `v` against `r`: the ratio of the medians, then the median and the
/// range of the per-round ratios (each round's two sides ran back to back,
/// so a minute the machine spends in a slow state weighs on both), then
/// the best round against the best round.
fn ratio(v: &[Option<u64>], r: &[Option<u64>]) -> String {
    let mv = median(v.iter().flatten().copied().collect());
    let mr = median(r.iter().flatten().copied().collect());
    if mv == 0 || mr == 0 {
        return "-".into();
    }
    let mut per: Vec<f64> = v
        .iter()
        .zip(r)
        .filter_map(|(a, b)| match (a, b) {
            (Some(a), Some(b)) if *b > 0 => Some(*a as f64 / *b as f64),
            _ => None,
        })
        .collect();
    per.sort_by(f64::total_cmp);
    let (Some(lo), Some(hi)) = (per.first(), per.last()) else {
        return format!("{:.2}x", mv as f64 / mr as f64);
    };
    let n = per.len();
    let mid = if n % 2 == 1 {
        per[n / 2]
    } else {
        (per[n / 2 - 1] + per[n / 2]) / 2.0
    };
    let best = |x: &[Option<u64>]| x.iter().flatten().copied().max().unwrap_or(0);
    format!(
        "{:.2}x; per round {mid:.2}x ({lo:.2}-{hi:.2}); best {:.2}x",
        mv as f64 / mr as f64,
        best(v) as f64 / best(r).max(1) as f64
    )
}

fn main() -> ExitCode {
    let opts = parse_opts();
    let _lock = match heavy_lock() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut tests = vec![Test::ToBackend, Test::Loop, Test::FromBackend];
    if opts.tap {
        tests.push(Test::Tap);
    }
    if !opts.only.is_empty() {
        let known = [Test::ToBackend, Test::Loop, Test::FromBackend, Test::Tap];
        tests = known
            .into_iter()
            .filter(|t| opts.only.contains(t))
            .collect();
    }
    let mut backends = vec![Backend::Reference];
    backends.extend(opts.vdpa_backends());
    let load_before = loadavg();
    println!("commit {}", commit());
    println!("load average at the start: {load_before}");
    if let Some(p) = &opts.vdpa {
        println!("vdpa-net binary: {}", p.display());
    }
    for b in &backends {
        println!("mode {}: {}", b.name(), b.mode());
    }
    println!(
        "frontend: testpmd virtio_user{}, forwarding lcore on CPU 0; every frame sent is counted on the other side",
        if opts.packed {
            " on packed rings (packed_vq=1; the `split` modes on split rings)"
        } else {
            ""
        }
    );
    if opts.no_frontend_tests {
        return finish(guest_pktgen_run(&opts), &load_before);
    }
    // results[test][backend][round]: the figure, if the round passed.
    let mut results: Vec<Vec<Vec<Option<u64>>>> =
        vec![vec![Vec::new(); backends.len()]; tests.len()];
    let mut failed = false;
    for round in 0..opts.rounds {
        for (ti, &t) in tests.iter().enumerate() {
            // Alternate which backend goes first from round to round.
            let order: Vec<usize> = if round % 2 == 0 {
                (0..backends.len()).collect()
            } else {
                (0..backends.len()).rev().collect()
            };
            for bi in order {
                let b = &backends[bi];
                match measure(b, t, &opts) {
                    Ok(o) => {
                        let drops = if o.drops > 0 {
                            format!(", {} dropped by the backend (counted)", o.drops)
                        } else {
                            String::new()
                        };
                        println!(
                            "round {} {:<12} {:<13} {:>7} Mpps  [{}{drops}]",
                            round + 1,
                            t.name(),
                            b.name(),
                            fmt_mpps(o.pps),
                            o.checks
                                .iter()
                                .map(|c| c.to_string())
                                .collect::<Vec<_>>()
                                .join("; ")
                        );
                        let checked = verify(&o.checks).map_err(|e| e.to_string()).and_then(|()| {
                            if o.pps < STALLED_PPS {
                                Err(format!(
                                    "frames stopped flowing: a median of {} frames a second (every count agreed, but the device stalled)",
                                    o.pps
                                ))
                            } else {
                                Ok(())
                            }
                        });
                        match checked {
                            Ok(()) => results[ti][bi].push(Some(o.pps)),
                            Err(e) => {
                                failed = true;
                                println!(
                                    "round {} {:<12} {:<13} FAILED: {e}",
                                    round + 1,
                                    t.name(),
                                    b.name()
                                );
                                results[ti][bi].push(None);
                            }
                        }
                    }
                    Err(e) => {
                        failed = true;
                        println!(
                            "round {} {:<12} {:<13} FAILED: {e}",
                            round + 1,
                            t.name(),
                            b.name()
                        );
                        results[ti][bi].push(None);
                    }
                }
            }
        }
    }
    println!(
        "\n64-byte frames, medians (min-max) over {} rounds of {} s (Mpps); ratios against net_vhost: of the medians; per round, median (range) of the ratios of the rounds' two sides; best round against best round:",
        opts.rounds, opts.secs
    );
    let mut header = String::from("| test | net_vhost |");
    let mut rule = String::from("|---|---|");
    for b in &backends[1..] {
        header.push_str(&format!(" {} | ratio |", b.name()));
        rule.push_str("---|---|");
    }
    println!("{header}\n{rule}");
    for (ti, t) in tests.iter().enumerate() {
        let figures =
            |bi: usize| -> Vec<u64> { results[ti][bi].iter().flatten().copied().collect() };
        let mut row = format!("| {} | {} |", t.name(), spread(&figures(0)));
        for bi in 1..backends.len() {
            row.push_str(&format!(
                " {} | {} |",
                spread(&figures(bi)),
                ratio(&results[ti][bi], &results[ti][0])
            ));
        }
        println!("{row}");
    }
    if opts.tcp {
        match measure_tcp(&opts) {
            Ok(ts) => {
                let rate = median(ts.iter().map(|t| t.bytes_per_sec() as u64).collect());
                let frames = median(ts.iter().map(|t| t.frames).collect());
                let mean = median(ts.iter().map(|t| t.mean_frame()).collect());
                println!(
                    "\nguest TCP bulk to the namespace through vdpa-net's tap, median of {} transfers of {} MiB:",
                    ts.len(),
                    BULK_BYTES >> 20
                );
                println!(
                    "| tcp | {:.1} MB/s ({rate} bytes/s) | {frames} frames on the tap, mean {mean} bytes |",
                    rate as f64 / 1e6
                );
            }
            Err(e) => {
                failed = true;
                println!("tcp vdpa-net FAILED: {e}");
            }
        }
    }
    if opts.guest_iommu.is_some() && !guest_pktgen_run(&opts) {
        failed = true;
    }
    finish(!failed, &load_before)
}

/// The guest-pktgen rounds, if asked for; false if any failed.
fn guest_pktgen_run(opts: &Opts) -> bool {
    match &opts.guest_iommu {
        Some(modes) => guest_pktgen::run(opts, modes, opts.guest_packets),
        None => true,
    }
}

/// The run's last lines (commit, load) and its exit status.
fn finish(ok: bool, load_before: &str) -> ExitCode {
    println!(
        "\ncommit {}; load average at the start {load_before}, at the end {}",
        commit(),
        loadavg()
    );
    if !ok {
        println!("FAILED: some measurements failed or lost frames (see above)");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
