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

use std::process::ExitCode;

use ioasis::termination::Termination;

use sva_accel::cli::Options;
use sva_accel::device::Accelerator;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Help, the version and usage errors exit here (0, 0 and 2).
    let o = Options::parse();
    // SIGINT/SIGTERM are taken by the main thread alone: blocked before any
    // thread starts, so that every thread inherits the mask, and unblocked
    // in this thread only once the others run (Termination::wait below).
    let mut termination = match Termination::for_main_thread() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sva-accel: cannot take SIGINT/SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The daemon's own /dev/iommu service: clients that set up their IOAS
    // and PASID there get iommu-core translation.
    let (binding, _service) = match sva_accel::device::serve_iommu_with(
        &o.iommu_socket,
        &o.label,
        o.socket_policy,
        &o.service,
    ) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("sva-accel: {e}");
            return ExitCode::FAILURE;
        }
    };
    let path = o.socket_path;
    let mut dev = match Accelerator::start_with(o.device, binding) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("sva-accel: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = dev.listen_with_policy(&path, &o.socket_policy) {
        eprintln!("sva-accel: {e}");
        return ExitCode::FAILURE;
    }
    log::info!(
        "listening on {} (device {}, /dev/iommu service on {})",
        path.display(),
        o.label,
        o.iommu_socket.display()
    );
    // Serve until SIGINT or SIGTERM.
    while !termination.wait(None) {}
    log::info!("SIGINT or SIGTERM: shutting down");
    dev.shutdown();
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&o.iommu_socket);
    ExitCode::SUCCESS
}
