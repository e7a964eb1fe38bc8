//! Packet-rate benchmark: vdpa-net against DPDK's own vhost backend
//! (net_vhost), with the same testpmd virtio_user frontend, alternating the
//! backends round by round on one machine and comparing medians.
//!
//! Run through `scripts/bench-net.sh` (it prepares hugepages and builds in
//! release mode). Measurements, all with 64-byte frames:
//!
//! - `to-backend`: frontend txonly into net_vhost (rxonly) / vdpa-net `sink`;
//!   the figure is the frontend's Tx-pps (frames the backend took off the ring);
//! - `from-backend`: frames the backend delivers into the frontend's receive
//!   ring, the frontend's Rx-pps: the frontend in rxonly, net_vhost
//!   generating (txonly), vdpa-net its `source` port (the same 64-byte UDP
//!   frame again and again, as txonly sends);
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
//!   the tap received (their mean size shows TSO at work).
//!
//! vdpa-net runs with `--poll-us 1000` in the packet tests (net_vhost's
//! forwarding lcore always polls; `--poll-us 0` measures vdpa-net sleeping
//! between kicks instead).
//!
//! vdpa-net is pinned to CPU 1 (where net_vhost's forwarding lcore runs;
//! testpmd's frontend forwards on CPU 0) unless `--no-pin` is given.
//!
//! Usage: `ioasis-bench-net [--rounds N] [--secs S] [--tap] [--tcp]
//! [--only-reference] [--no-pin] [--poll-us N] [--test NAME]...
//! [--vdpa-arg ARG]...` (`--help` prints every flag).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use ioasis_integration::env::{heavy_lock, require_tool, which, WorkDir};
use ioasis_integration::netns::Netns;
use ioasis_integration::process::wait_for_path;
use ioasis_integration::tcp_bulk::{TcpBulk, Transfer, BULK_BYTES};
use ioasis_integration::testpmd::{median, net_vhost_vdev, Testpmd, TestpmdConfig};
use ioasis_integration::vdpa_net::{vdpa_net_bin, VdpaNet, VdpaNetConfig};
use ioasis_integration::{Error, Result};

const STOP: Duration = Duration::from_secs(30);
const SOCKET: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Reference,
    VdpaNet,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Reference => "net_vhost",
            Backend::VdpaNet => "vdpa-net",
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

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "ioasis-bench-net",
    version,
    about = "64-byte packet rates of vdpa-net against DPDK's net_vhost, alternated round by round"
)]
struct Cli {
    /// Rounds per test; the figures are medians over them.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=50))]
    rounds: u64,
    /// Seconds each measurement runs.
    #[arg(long, value_name = "S", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(3..=120))]
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
    /// Lets vdpa-net run on any CPU (by default it is pinned to CPU 1).
    #[arg(long)]
    no_pin: bool,
    /// Busy-poll window given to vdpa-net in the packet tests, unless a
    /// `--vdpa-arg` sets one; 0: none.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_POLL_US)]
    poll_us: u64,
    /// Runs only this test (repeatable); by default all.
    #[arg(long = "test", value_name = "NAME", value_enum)]
    only: Vec<Test>,
    /// An extra argument for vdpa-net (repeatable).
    #[arg(long = "vdpa-arg", value_name = "ARG", allow_hyphen_values = true)]
    vdpa_args: Vec<String>,
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
    /// Busy-poll window given to vdpa-net in the packet tests (`--poll-us`),
    /// unless `--vdpa-arg` sets one; 0: none.
    poll_us: u64,
    /// Only these tests (`--test NAME`, repeatable); empty: all.
    only: Vec<Test>,
}

impl Opts {
    /// vdpa-net's extra arguments in the packet-rate tests.
    fn packet_args(&self) -> Vec<String> {
        let mut a = self.vdpa_args.clone();
        if self.poll_us > 0 && !a.iter().any(|x| x == "--poll-us") {
            a.push("--poll-us".into());
            a.push(self.poll_us.to_string());
        }
        a
    }
}

/// A backend under test, killed on drop.
enum Running {
    Testpmd(Testpmd),
    Vdpa(VdpaNet),
}

fn start_backend(
    b: Backend,
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
                .duration(Duration::from_secs(opts.secs + 60));
            if let Some(ns) = ns {
                cfg = cfg.in_netns(ns.name());
            }
            let mut p = Testpmd::spawn(&cfg, dir)?;
            wait_for_path(sock, SOCKET, Some(p.proc_mut()))?;
            Ok(Running::Testpmd(p))
        }
        Backend::VdpaNet => {
            let bin = opts
                .vdpa
                .as_ref()
                .ok_or_else(|| Error::Unavailable("vdpa-net".into()))?;
            let port = match t {
                Test::ToBackend => "sink",
                Test::Loop => "reflect",
                Test::FromBackend => "source",
                Test::Tap => "tap=btap0",
            };
            let mut cfg = VdpaNetConfig::new().device(sock, port).stats_interval(1);
            for a in opts.packet_args() {
                cfg = cfg.arg(&a);
            }
            // Pin the daemon to CPU 1, where net_vhost's forwarding lcore
            // runs, so both backends get the same share of the machine.
            let pinned;
            let bin = match which("taskset").filter(|_| opts.pin) {
                Some(ts) => {
                    pinned = dir.join("vdpa-net-pinned.sh");
                    std::fs::write(
                        &pinned,
                        format!(
                            "#!/bin/sh\nexec {} -c 1 {} \"$@\"\n",
                            ts.display(),
                            bin.display()
                        ),
                    )
                    .map_err(|e| Error::Io {
                        what: "write wrapper".into(),
                        source: e,
                    })?;
                    let _ = Command::new("chmod").arg("+x").arg(&pinned).status();
                    pinned.as_path()
                }
                None => bin.as_path(),
            };
            Ok(Running::Vdpa(VdpaNet::spawn_bin(bin, &cfg, dir, ns)?))
        }
    }
}

/// One measurement; returns the median pps.
fn measure(b: Backend, t: Test, opts: &Opts) -> Result<u64> {
    let dir = WorkDir::new(&format!("bench-{}-{}", b.name(), t.name()))?;
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
    let fwd = match (t, b) {
        (Test::ToBackend | Test::Tap, _) => "txonly",
        (Test::Loop, _) => "flowgen",
        (Test::FromBackend, _) => "rxonly",
    };
    let cfg = TestpmdConfig::frontend("frontend", &sock, fwd)
        .duration(Duration::from_secs(opts.secs + 2));
    let mut front = Testpmd::spawn(&cfg, dir.path())?;
    let mut tap_rates = Vec::new();
    if let Some(ns) = &ns {
        // Sample the tap's receive counter once a second while traffic runs.
        front.wait_samples(0, 2, SOCKET)?;
        let mut prev = (ns.link_stats("btap0")?.rx_packets, Instant::now());
        for _ in 0..opts.secs.saturating_sub(1) {
            std::thread::sleep(Duration::from_secs(1));
            let now = (ns.link_stats("btap0")?.rx_packets, Instant::now());
            let dt = now.1.duration_since(prev.1).as_secs_f64();
            tap_rates.push(((now.0 - prev.0) as f64 / dt) as u64);
            prev = now;
        }
    }
    let report = front.finish(STOP)?;
    match &mut backend {
        Running::Testpmd(p) => {
            let _ = p.stop(STOP)?;
        }
        Running::Vdpa(v) => {
            v.stop(STOP)?;
        }
    }
    let rates = report.rates(0, 1);
    let figure = match t {
        Test::ToBackend => median(rates.iter().map(|r| r.1).collect()),
        Test::Loop | Test::FromBackend => median(rates.iter().map(|r| r.0).collect()),
        Test::Tap => median(tap_rates),
    };
    Ok(figure)
}

/// Downloads per `--tcp` run; the figure is their median.
const TCP_TRANSFERS: usize = 5;

/// net_vhost's forwarding lcore polls without ever sleeping; vdpa-net is
/// measured in its polling mode too (a 1 ms idle window: under load its
/// worker never sleeps either). `--poll-us 0` measures the sleeping mode.
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
        only: cli.only,
    }
}

fn fmt_mpps(v: u64) -> String {
    format!("{:.2}", v as f64 / 1e6)
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
    if let Some(p) = &opts.vdpa {
        eprintln!(
            "vdpa-net: {} (packet tests: {})",
            p.display(),
            opts.packet_args().join(" ")
        );
        backends.push(Backend::VdpaNet);
    }
    // results[test][backend] = per-round figures
    let mut results: Vec<Vec<Vec<u64>>> = vec![vec![Vec::new(); backends.len()]; tests.len()];
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
                let b = backends[bi];
                match measure(b, t, &opts) {
                    Ok(pps) => {
                        println!(
                            "round {} {:<12} {:<9} {:>7} Mpps",
                            round + 1,
                            t.name(),
                            b.name(),
                            fmt_mpps(pps)
                        );
                        results[ti][bi].push(pps);
                    }
                    Err(e) => {
                        failed = true;
                        println!(
                            "round {} {:<12} {:<9} FAILED: {e}",
                            round + 1,
                            t.name(),
                            b.name()
                        );
                    }
                }
            }
        }
    }
    println!(
        "\n64-byte frames, medians over {} rounds of {} s (Mpps):",
        opts.rounds, opts.secs
    );
    println!(
        "| test | {} | ratio |",
        backends
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}---|", "---|".repeat(backends.len()));
    for (ti, t) in tests.iter().enumerate() {
        let meds: Vec<u64> = results[ti].iter().map(|v| median(v.clone())).collect();
        let ratio = if meds.len() == 2 && meds[0] > 0 && meds[1] > 0 {
            format!("{:.2}x", meds[1] as f64 / meds[0] as f64)
        } else {
            "-".into()
        };
        println!(
            "| {} | {} | {} |",
            t.name(),
            meds.iter()
                .map(|m| if *m > 0 { fmt_mpps(*m) } else { "-".into() })
                .collect::<Vec<_>>()
                .join(" | "),
            ratio
        );
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
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
