//! `sva-accel`: the accelerator daemon.
//!
//! ```text
//! sva-accel --socket-path PATH [--workers N] [--wq-size N] [--wq-mode shared|dedicated]
//!           [--max-batch N] [--max-xfer BYTES] [--priority N] [--uid-priority UID:N]...
//!           [--faults-per-client N] [--iommu-socket PATH] [--label NAME]
//!           [--socket-mode MODE] [--socket-group GROUP]
//!           [--grant DEVICE=WHO]... [--limit NAME=VALUE]...
//! ```
//!
//! Both sockets are created with mode `--socket-mode` (octal, default
//! `0600`: the daemon's user and root only) and group `--socket-group`;
//! the `/dev/iommu` service refuses clients the mode does not admit
//! (`ioasis::socket_policy`).
//!
//! Clients bind a PASID they attached through the daemon's `/dev/iommu`
//! service (at `--iommu-socket`, default `PATH.iommu`); every device access
//! is translated by iommu-core for (device, PASID). The device is granted
//! to the user the daemon runs as, or to whom `--grant` names (`UID`,
//! `uid:N`, `gid:N`, `pid:N` or `any`; see `ioasis::ownership`).
//!
//! Work queue priorities are the administrator's: `--priority` for every
//! user, `--uid-priority UID:N` for one (repeatable, the last one for a uid
//! wins). A client may ask for a lower priority than its user's, never a
//! higher one. Priorities weigh the device's round robin among clients
//! (a client of priority 6 gets three times the units of work of one of
//! priority 2 while both have work).

use ioasis::socket_policy::SocketPolicy;
use std::path::PathBuf;
use std::process::ExitCode;

use ioasis::service::ServiceOptions;
use sva_accel::device::{Device, DeviceConfig};
use sva_accel::wq::WqMode;

const USAGE: &str = "usage: sva-accel --socket-path PATH [--workers N] [--wq-size N] \
[--wq-mode shared|dedicated] [--max-batch N] [--max-xfer BYTES] [--priority N] \
[--uid-priority UID:N]... [--faults-per-client N] [--iommu-socket PATH] [--label NAME] \
[--socket-mode MODE] [--socket-group GROUP] [--grant DEVICE=WHO]... [--limit NAME=VALUE]...";

struct Opts {
    path: PathBuf,
    iommu: PathBuf,
    label: String,
    cfg: DeviceConfig,
    policy: SocketPolicy,
    service: ServiceOptions,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut cfg = DeviceConfig::default();
    let mut path = None;
    let mut iommu = None;
    let mut label = sva_accel::device::DEFAULT_LABEL.to_string();
    let mut mode = SocketPolicy::DEFAULT_MODE;
    let mut group = None;
    let mut service = ServiceOptions::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let num = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name}: not a number: {v}"))
        };
        match a.as_str() {
            "--socket-path" => path = Some(PathBuf::from(val(a)?)),
            "--iommu-socket" => iommu = Some(PathBuf::from(val(a)?)),
            "--label" => label = val(a)?,
            "--socket-mode" => {
                mode = SocketPolicy::parse_mode(&val(a)?).map_err(|e| format!("{a}: {e}"))?
            }
            "--socket-group" => {
                group = Some(SocketPolicy::parse_group(&val(a)?).map_err(|e| format!("{a}: {e}"))?)
            }
            "--workers" => {
                cfg.workers = usize::try_from(num(a, val(a)?)?).map_err(|e| e.to_string())?
            }
            "--wq-size" => {
                cfg.wq_size = u32::try_from(num(a, val(a)?)?).map_err(|e| e.to_string())?
            }
            "--max-batch" => {
                cfg.max_batch = u32::try_from(num(a, val(a)?)?).map_err(|e| e.to_string())?
            }
            "--priority" => {
                cfg.priority = u8::try_from(num(a, val(a)?)?).map_err(|e| e.to_string())?
            }
            "--uid-priority" => {
                let v = val(a)?;
                let (uid, prio) = v
                    .split_once(':')
                    .ok_or_else(|| format!("{a}: expected UID:PRIORITY, got {v}"))?;
                let uid = u32::try_from(num(a, uid.to_string())?).map_err(|e| e.to_string())?;
                let prio = u8::try_from(num(a, prio.to_string())?).map_err(|e| e.to_string())?;
                cfg.uid_priority.push((uid, prio));
            }
            "--faults-per-client" => {
                cfg.faults_per_client =
                    u32::try_from(num(a, val(a)?)?).map_err(|e| e.to_string())?
            }
            "--max-xfer" => {
                cfg.max_xfer = u32::try_from(num(a, val(a)?)?).map_err(|e| e.to_string())?
            }
            "--wq-mode" => {
                cfg.wq_mode = match val(a)?.as_str() {
                    "shared" => WqMode::Shared,
                    "dedicated" => WqMode::Dedicated,
                    m => return Err(format!("--wq-mode: unknown mode {m}")),
                }
            }
            flag if ServiceOptions::accepts(flag) => service.set(flag, &val(a)?)?,
            "-h" | "--help" => return Err(format!("{USAGE}\n{}", ServiceOptions::HELP)),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let path: PathBuf = path.ok_or_else(|| format!("--socket-path is required\n{USAGE}"))?;
    let iommu = iommu.unwrap_or_else(|| {
        let mut p = path.clone().into_os_string();
        p.push(".iommu");
        PathBuf::from(p)
    });
    let policy = SocketPolicy::new(mode, group)?;
    Ok(Opts {
        path,
        iommu,
        label,
        cfg,
        policy,
        service,
    })
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    // SIGINT/SIGTERM are taken synchronously by the main thread below; block
    // them before any thread starts so that every thread inherits the mask.
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGINT);
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    if let Err(e) = sigs.thread_block() {
        eprintln!("sva-accel: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let o = match parse(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // The daemon's own /dev/iommu service: clients that set up their IOAS
    // and PASID there get iommu-core translation.
    let (binding, _service) =
        match sva_accel::device::serve_iommu_with(&o.iommu, &o.label, o.policy, &o.service) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("sva-accel: {e}");
                return ExitCode::FAILURE;
            }
        };
    let path = o.path;
    let mut dev = match Device::start_with(o.cfg, Some(binding)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("sva-accel: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = dev.listen_with_policy(&path, &o.policy) {
        eprintln!("sva-accel: {e}");
        return ExitCode::FAILURE;
    }
    log::info!(
        "listening on {} (device {}, /dev/iommu service on {})",
        path.display(),
        o.label,
        o.iommu.display()
    );
    // Serve until SIGINT or SIGTERM.
    match sigs.wait() {
        Ok(sig) => log::info!("{sig:?}: shutting down"),
        Err(e) => log::warn!("sigwait failed ({e}); shutting down"),
    }
    dev.shutdown();
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&o.iommu);
    ExitCode::SUCCESS
}
