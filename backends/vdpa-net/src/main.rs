//! `vdpa-net`: serves virtio-net devices over vhost-user or VDUSE (see `--help`).

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ioasis::termination::Termination;
use log::{error, info};
use vdpa_net::cli::Options;
use vdpa_net::stats::{json_line, DeviceStats};
use vdpa_net::VhostUserNetBackend;

mod serve;

fn print_stats(stats: &[Arc<DeviceStats>], start: Instant, final_line: bool) {
    let refs: Vec<&DeviceStats> = stats.iter().map(|s| s.as_ref()).collect();
    let line = json_line(&refs, start.elapsed().as_secs_f64(), final_line);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    // Help, the version and usage errors exit here (0, 0 and 2).
    let opts = Options::parse();
    // SIGINT and SIGTERM are taken by this thread alone: blocked before any
    // other thread exists (every thread inherits the mask), unblocked here
    // while the main loop waits for them with the statistics interval as
    // its timeout, so no worker's system call is interrupted by them.
    let mut termination = match Termination::for_main_thread() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vdpa-net: cannot take SIGINT/SIGTERM: {e}");
            return ExitCode::from(1);
        }
    };

    let mut backends = Vec::with_capacity(opts.devices.len());
    for d in &opts.devices {
        match VhostUserNetBackend::new(d) {
            Ok(b) => {
                info!(
                    "device {}: port {}, {} queue pair(s), mac {}",
                    d.socket,
                    d.port,
                    b.pairs(),
                    vdpa_net::net::format_mac(&d.mac)
                );
                backends.push(Arc::new(b));
            }
            Err(e) => {
                error!("device {}: {e}", d.socket);
                eprintln!(
                    "vdpa-net: device {}: {}",
                    d.socket,
                    ioasis::service::sys::error_chain(&e)
                );
                return ExitCode::from(1);
            }
        }
    }
    let stats: Vec<Arc<DeviceStats>> = backends.iter().map(|b| b.stats()).collect();
    let sockets: Vec<String> = opts.devices.iter().map(|d| d.socket.clone()).collect();
    // The files to remove at exit (a VDUSE device's name is not a file).
    let files: Vec<String> = sockets
        .iter()
        .enumerate()
        .filter(|(i, _)| !(*i == 0 && opts.vduse.is_some()))
        .map(|(_, s)| s.clone())
        .collect();
    let server = match serve::start(
        &sockets,
        &backends,
        opts.socket_policy,
        opts.vduse.as_deref(),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vdpa-net: {}", ioasis::service::sys::error_chain(&e));
            for s in &files {
                let _ = std::fs::remove_file(s);
            }
            return ExitCode::from(1);
        }
    };

    let start = Instant::now();
    let interval =
        (opts.stats_interval > 0.0).then(|| Duration::from_secs_f64(opts.stats_interval));
    termination.wait_ticking(interval, || false, || print_stats(&stats, start, false));
    info!("signal received, shutting down");
    server.stop();
    for s in &files {
        let _ = std::fs::remove_file(s);
    }
    print_stats(&stats, start, true);
    ExitCode::SUCCESS
}
