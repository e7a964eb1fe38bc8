//! `vdpa-blk`: serves one disk over vhost-user or VDUSE (see `--help`).
//!
//! Statistics go to standard output as JSON lines, logs to standard error
//! (`RUST_LOG`, default `info`). SIGINT or SIGTERM stops the daemon; a
//! frontend that disconnects may connect again and gets the device anew.
//! SIGHUP re-reads the image's size and tells the driver of a new capacity
//! ([`vdpa_blk::resize`]).

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ioasis::server::Server;
use ioasis::termination::Termination;
use log::{error, info};
use vdpa_blk::backing::Backing;
use vdpa_blk::cli::{Args, Endpoint};
use vdpa_blk::resize::{resize_and_notify, Hangup};
use vdpa_blk::stats::DeviceStats;
use vdpa_blk::BlkDevice;

fn print_stats(stats: &DeviceStats, start: Instant, final_line: bool) {
    let line = stats.json_line(start.elapsed().as_secs_f64(), final_line);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    // Help, the version and usage errors exit here (0, 0 and 2).
    let args = Args::parse();
    let mut termination = match Termination::for_main_thread() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vdpa-blk: cannot take SIGINT/SIGTERM: {e}");
            return ExitCode::from(1);
        }
    };
    let hangup = match Hangup::for_main_thread() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("vdpa-blk: cannot take SIGHUP: {e}");
            return ExitCode::from(1);
        }
    };
    let backing = match Backing::open(&args.image(), args.read_only) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("vdpa-blk: opening {:?}: {e}", args.image());
            return ExitCode::from(1);
        }
    };
    let endpoint = args.endpoint();
    info!(
        "disk {}, {} queue(s) of at most {} entries, {endpoint}",
        backing.describe(),
        args.queues,
        args.queue_size,
    );
    let device = Arc::new(BlkDevice::new(backing, args.options()));
    let stats = device.stats();
    let mut server = Server::new();
    let added = match &endpoint {
        Endpoint::Socket(path) => server.add_device("blk0", path, device.clone()),
        Endpoint::Vduse(name) => server.add_vduse_device("blk0", name, device.clone()),
    };
    if let Err(e) = added {
        eprintln!(
            "vdpa-blk: {endpoint}: {}",
            ioasis::service::sys::error_chain(&e)
        );
        return ExitCode::from(1);
    }
    let notifier = server.config_notifier("blk0");
    if let Err(e) = hangup.spawn(move || {
        resize_and_notify(&device, notifier.as_ref());
    }) {
        eprintln!("vdpa-blk: spawning the SIGHUP thread: {e}");
        return ExitCode::from(1);
    }
    let shutdown = server.shutdown_handle();
    let thread = match std::thread::Builder::new()
        .name("vdpa-blk-server".into())
        .spawn(move || server.run())
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vdpa-blk: spawning the server thread: {e}");
            return ExitCode::from(1);
        }
    };
    let start = Instant::now();
    let interval =
        (args.stats_interval_ms > 0).then(|| Duration::from_millis(args.stats_interval_ms));
    termination.wait_ticking(
        interval,
        || thread.is_finished(),
        || print_stats(&stats, start, false),
    );
    info!("shutting down");
    shutdown.shutdown();
    let code = match thread.join() {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            error!("server: {e}");
            ExitCode::from(1)
        }
        Err(_) => {
            error!("server thread panicked");
            ExitCode::from(1)
        }
    };
    if let Endpoint::Socket(path) = &endpoint {
        let _ = std::fs::remove_file(path);
    }
    print_stats(&stats, start, true);
    code
}
