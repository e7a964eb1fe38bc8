//! `--test guest-pktgen`: a QEMU TCG guest sends 60-byte frames with the
//! kernel's pktgen into the backend, which counts them
//! ([`ioasis_integration::guest_pktgen`]): vdpa-net's `sink` in each of the
//! run's vdpa-net modes against DPDK's net_vhost in testpmd rxonly,
//! alternating round by round, for each guest-IOMMU mode asked for
//! (`--guest-iommu none|strict|lazy|all`, repeatable; default none and
//! strict). The figures are the backend's steady rate (the median of its
//! per-second rates inside the traffic) and pktgen's own (its `Result:`
//! line); every round checks that the frames pktgen sent equal the frames
//! the backend counted, and fails saying how many were lost otherwise.

use ioasis_integration::accounting::verify;
use ioasis_integration::env::{require_tool, WorkDir};
use ioasis_integration::guest_pktgen::{run_pktgen, PktgenBackend, PktgenRun};
use ioasis_integration::qemu::IommuMode;
use ioasis_integration::testpmd::median;

use super::{ratio, Backend, Opts};

/// The guest-IOMMU modes of `--guest-iommu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestIommu {
    /// No vIOMMU.
    None,
    /// intel-iommu, `iommu.strict=1`: the guest unmaps and invalidates
    /// each buffer when it is done.
    Strict,
    /// intel-iommu, `iommu.strict=0`: invalidations deferred and batched.
    Lazy,
    /// All three.
    All,
}

impl GuestIommu {
    fn mode(self) -> IommuMode {
        match self {
            GuestIommu::None | GuestIommu::All => IommuMode::Off,
            GuestIommu::Strict => IommuMode::Strict,
            GuestIommu::Lazy => IommuMode::Lazy,
        }
    }

    fn name(self) -> &'static str {
        match self {
            GuestIommu::None | GuestIommu::All => "none",
            GuestIommu::Strict => "strict",
            GuestIommu::Lazy => "lazy",
        }
    }

    /// Frames per round by default: several seconds of traffic at the
    /// rates measured on this 2-core machine (none 40-160 kpps, strict
    /// 3-9 kpps, lazy 10-60 kpps), so the backend's rate has whole seconds
    /// to be taken from (300 000 frames at 160 kpps left net_vhost's
    /// one-second statistics no whole second inside the traffic).
    fn default_count(self) -> u64 {
        match self {
            GuestIommu::None | GuestIommu::All => 800_000,
            GuestIommu::Lazy => 200_000,
            GuestIommu::Strict => 40_000,
        }
    }
}

/// The modes a run measures, in order, from `--guest-iommu` (default: none
/// and strict).
pub fn modes(asked: &[GuestIommu]) -> Vec<GuestIommu> {
    let all = [GuestIommu::None, GuestIommu::Strict, GuestIommu::Lazy];
    if asked.is_empty() {
        return vec![GuestIommu::None, GuestIommu::Strict];
    }
    if asked.contains(&GuestIommu::All) {
        return all.to_vec();
    }
    all.into_iter().filter(|m| asked.contains(m)).collect()
}

/// One round's figures, if it passed: the backend's rate and pktgen's.
type Figures = (Option<u64>, Option<u64>);

fn fmt_kpps(v: u64) -> String {
    format!("{:.2}", v as f64 / 1e3)
}

/// "median (min-max)" in kpps.
fn spread_k(v: &[Option<u64>]) -> String {
    let v: Vec<u64> = v.iter().flatten().copied().collect();
    match (v.iter().min(), v.iter().max()) {
        (Some(lo), Some(hi)) => format!(
            "{} ({}-{})",
            fmt_kpps(median(v.clone())),
            fmt_kpps(*lo),
            fmt_kpps(*hi)
        ),
        _ => "-".into(),
    }
}

/// The backends: net_vhost and the run's vdpa-net modes.
fn backends(opts: &Opts) -> Vec<(String, PktgenBackend)> {
    let mut v = vec![("net_vhost".to_string(), PktgenBackend::NetVhost)];
    if let Some(own) = &opts.vdpa {
        for b in opts.vdpa_backends() {
            if let Backend::VdpaNet {
                name,
                args,
                pin,
                bin,
                ..
            } = b
            {
                v.push((
                    name,
                    PktgenBackend::VdpaNet {
                        bin: bin.unwrap_or_else(|| own.clone()),
                        args,
                        pin,
                    },
                ));
            }
        }
    }
    v
}

/// One round's line.
fn report(round: usize, mode: GuestIommu, name: &str, r: &PktgenRun) -> String {
    format!(
        "round {} guest-pktgen {:<6} {:<13} {:>8} kpps into the backend, pktgen {:>8} kpps ({} frames in {:.2} s, {} refused, {} guest interrupts per 1000 frames)  [{}]",
        round + 1,
        mode.name(),
        name,
        r.backend_pps.map_or("-".into(), fmt_kpps),
        fmt_kpps(r.pktgen.pps),
        r.pktgen.sent,
        r.pktgen.usec as f64 / 1e6,
        r.pktgen.errors,
        r.guest_irqs.map_or("-".into(), |n| format!(
            "{:.1}",
            n as f64 * 1000.0 / r.pktgen.sent.max(1) as f64
        )),
        r.check
    )
}

/// Runs the guest pktgen rounds and prints their table; false if any
/// round failed or lost a frame.
pub fn run(opts: &Opts, asked: &[GuestIommu], packets: Option<u64>) -> bool {
    if let Err(e) = require_tool("qemu-system-x86_64", "qemu-system-x86") {
        println!("guest-pktgen FAILED: {e}");
        return false;
    }
    let modes = modes(asked);
    let backends = backends(opts);
    println!(
        "\nguest-pktgen: a TCG guest (1 vCPU) sends {}-byte frames with pktgen; QEMU unpinned; net_vhost: testpmd rxonly (iommu-support=1 with a guest IOMMU), forwarding lcore on CPU 1; vdpa-net: sink",
        ioasis_integration::guest_pktgen::FRAME_BYTES
    );
    // [mode][backend][round]: (backend figure, pktgen figure) of passed rounds.
    let mut fig: Vec<Vec<Vec<Figures>>> = vec![vec![Vec::new(); backends.len()]; modes.len()];
    let mut ok = true;
    for round in 0..opts.rounds {
        for (mi, &mode) in modes.iter().enumerate() {
            let order: Vec<usize> = if round % 2 == 0 {
                (0..backends.len()).collect()
            } else {
                (0..backends.len()).rev().collect()
            };
            for bi in order {
                let (name, b) = &backends[bi];
                let count = packets.unwrap_or_else(|| mode.default_count());
                let outcome = WorkDir::new(&format!("bench-pktgen-{}", mode.name()))
                    .and_then(|dir| run_pktgen(b, mode.mode(), count, opts.check_skew, dir.path()));
                match outcome {
                    Ok(r) => {
                        println!("{}", report(round, mode, name, &r));
                        match verify(std::slice::from_ref(&r.check)) {
                            Ok(()) => fig[mi][bi].push((r.backend_pps, Some(r.pktgen.pps))),
                            Err(e) => {
                                ok = false;
                                println!(
                                    "round {} guest-pktgen {:<6} {:<13} FAILED: {e}",
                                    round + 1,
                                    mode.name(),
                                    name
                                );
                                fig[mi][bi].push((None, None));
                            }
                        }
                    }
                    Err(e) => {
                        ok = false;
                        println!(
                            "round {} guest-pktgen {:<6} {:<13} FAILED: {e}",
                            round + 1,
                            mode.name(),
                            name
                        );
                        fig[mi][bi].push((None, None));
                    }
                }
            }
        }
    }
    println!(
        "\nguest pktgen, {}-byte frames, medians (min-max) over {} rounds (kpps); ratios against net_vhost: of the medians; per round, median (range) of the ratios of the rounds' two sides; best round against best round:",
        ioasis_integration::guest_pktgen::FRAME_BYTES,
        opts.rounds
    );
    let mut header = String::from("| guest IOMMU | figure | net_vhost |");
    let mut rule = String::from("|---|---|---|");
    for (name, _) in &backends[1..] {
        header.push_str(&format!(" {name} | ratio |"));
        rule.push_str("---|---|");
    }
    println!("{header}\n{rule}");
    for (mi, mode) in modes.iter().enumerate() {
        for (what, pick) in [("into the backend", 0usize), ("pktgen's own", 1usize)] {
            let col = |bi: usize| -> Vec<Option<u64>> {
                fig[mi][bi]
                    .iter()
                    .map(|f| if pick == 0 { f.0 } else { f.1 })
                    .collect()
            };
            let mut row = format!("| {} | {what} | {} |", mode.name(), spread_k(&col(0)));
            for bi in 1..backends.len() {
                row.push_str(&format!(
                    " {} | {} |",
                    spread_k(&col(bi)),
                    ratio(&col(bi), &col(0))
                ));
            }
            println!("{row}");
        }
    }
    ok
}
