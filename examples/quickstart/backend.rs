//! The quickstart's backend process: one framework `Server` hosting a
//! vdpa-net device (`net0`, reflect port) and an sva-accel device (`sva0`),
//! both bound to the server's one iommu-core context, which a `/dev/iommu`
//! service offers to other processes.
//!
//! Sockets, in the directory given on the command line:
//! - `net0.sock`: vhost-user, the net device;
//! - `sva0.sock`: the accelerator's portal socket;
//! - `iommu.sock`: the `/dev/iommu` service (ioasis service protocol),
//!   offering every device of the server's directory: net0 (hosted by the
//!   server) and sva0 (added with `Server::add_external_device`).
//!
//! Both devices are granted to the driver's process (`Service::grant`), and
//! only to it. A session's ATTACH of net0's RID takes it over from the
//! vhost-user connection (replace) when the session is the frontend's own
//! process, as the driver's is, so the driver attaches both devices through
//! the service alone.
//!
//! Standard input takes one request, `stats`, answered on standard output
//! with one line of net0's counters (`stats rx_packets=... tx_packets=...`).
//! A build with the `fault-injection` feature also takes
//! `arm-late-write <device> <ms>`, answered `armed`: that device makes one
//! write into the driver's memory `<ms>` milliseconds after an access
//! section ended (`ioasis::fault_injection`); and `late-write-claimed`,
//! answered `yes` once the device has prepared that write, else `no`.

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::sync::Arc;

use ioasis::ownership::Grantee;
use ioasis::server::Server;
use ioasis::service::Service;
use log::warn;
use sva_accel::device::{Accelerator, DeviceConfig, IommuBinding};
use vdpa_net::net::MacAddr;
use vdpa_net::port::{PortSpec, TapIo};
use vdpa_net::stats::DeviceStats;
use vdpa_net::{NetConfig, PollMode, VhostUserNetBackend};

/// Label of the net device.
pub const NET: &str = "net0";
/// Label of the accelerator.
pub const ACCEL: &str = "sva0";
/// MAC address of the net device.
pub const NET_MAC: MacAddr = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Line the backend prints on stdout once every socket listens.
pub const READY: &str = "ready";
/// Longest request line on standard input.
const MAX_LINE: u64 = 256;

type Res<T> = Result<T, String>;

fn ctx<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Runs the backend until SIGTERM/SIGINT (or the parent's death).
pub fn run(dir: &Path) -> Res<()> {
    // The driver blocks SIGINT/SIGTERM for its signal thread, and a child
    // inherits the mask: take them back, the server handles them.
    unblock_signals()?;
    // Die with the driver, whatever happens to it.
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and has no
    // memory-safety preconditions.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if rc != 0 {
        return Err(format!(
            "prctl(PR_SET_PDEATHSIG): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } == 1 {
        return Err("the driver is already gone".into());
    }

    let net_cfg = NetConfig {
        socket: dir.join("net0.sock").display().to_string(),
        port: PortSpec::Reflect,
        queues: 1,
        mac: NET_MAC,
        poll: PollMode::default(),
        tap_io: TapIo::Auto,
        worker_cpus: Vec::new(),
    };
    let net = Arc::new(VhostUserNetBackend::new(&net_cfg).map_err(ctx("net0"))?);
    let stats = net.stats();
    let mut server = Server::new();
    server
        .add_device(NET, dir.join("net0.sock"), net)
        .map_err(ctx("hosting net0"))?;
    let iommu = server.iommu().clone();

    // The accelerator has its own socket and protocol; the server's
    // directory offers it next to net0, bound to the same context.
    let accel_core = server
        .add_external_device(ACCEL, dir.join("sva0.sock"), sva_accel::device::hw_info())
        .map_err(ctx("adding sva0 to the directory"))?;
    let directory = Arc::new(server.directory());
    let service = Service::bind(dir.join("iommu.sock"), iommu.clone(), directory)
        .map_err(ctx("/dev/iommu service"))?;
    // The driver owns both devices: they are granted to its process alone
    // (this backend dies with it, so its process id is not reused while
    // the grant stands). It is also net0's vhost-user frontend, so its
    // session speaks for that frontend when it takes net0's RID over.
    let driver = Grantee::Process(
        i32::try_from(std::os::unix::process::parent_id()).map_err(ctx("parent pid"))?,
    );
    for label in [NET, ACCEL] {
        service.grant(label, driver);
    }
    let handle = service.handle();
    let service = service.spawn().map_err(ctx("service thread"))?;
    let cfg = DeviceConfig {
        workers: 1,
        ..DeviceConfig::default()
    };
    let mut accel = Accelerator::start_with(
        cfg,
        IommuBinding {
            device: accel_core,
            service: handle,
        },
    )
    .map_err(ctx("sva0"))?;
    accel
        .listen(&dir.join("sva0.sock"))
        .map_err(ctx("sva0 socket"))?;

    let spawned = std::thread::Builder::new()
        .name("quickstart-stats".into())
        .spawn(move || serve_stats(&stats));
    if let Err(e) = spawned {
        warn!("stats thread: {e}");
    }
    server.handle_signals().map_err(ctx("signals"))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{READY}").map_err(ctx("stdout"))?;
        out.flush().map_err(ctx("stdout"))?;
    }
    let r = server.run().map_err(ctx("server"));
    accel.shutdown();
    service.stop();
    r
}

fn unblock_signals() -> Res<()> {
    // SAFETY: sigset_t is a plain C struct; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `set` is initialised and `sig` a valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(format!("pthread_sigmask: error {rc}"));
    }
    Ok(())
}

/// Answers `stats` requests on stdin until it closes (the driver's end).
fn serve_stats(stats: &DeviceStats) {
    let mut r = std::io::stdin().lock();
    // A handful of requests in a run; each line bounded.
    for _ in 0..1024 {
        let mut line = String::new();
        match r.by_ref().take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = line.trim();
        let answer = match line.split_whitespace().next() {
            #[cfg(feature = "fault-injection")]
            Some("arm-late-write") => match arm_late_write(line) {
                Ok(()) => "armed\n".to_string(),
                Err(e) => format!("err {e}\n"),
            },
            #[cfg(feature = "fault-injection")]
            Some("late-write-claimed") => {
                if ioasis::fault_injection::pending() {
                    "no\n".to_string()
                } else {
                    "yes\n".to_string()
                }
            }
            _ => match stats_request(line, stats) {
                Ok(a) => format!("stats {a}\n"),
                Err(e) => format!("err {e}\n"),
            },
        };
        let mut out = std::io::stdout().lock();
        if out.write_all(answer.as_bytes()).is_err() || out.flush().is_err() {
            return;
        }
    }
}

/// `arm-late-write <device> <ms>`: arms one late write of that device.
#[cfg(feature = "fault-injection")]
fn arm_late_write(line: &str) -> Res<()> {
    let mut w = line.split_whitespace().skip(1);
    let kind = match w.next() {
        Some(NET) => vdpa_net::engine::FAULT_KIND,
        Some(ACCEL) => sva_accel::inject::FAULT_KIND,
        d => return Err(format!("no device {d:?}")),
    };
    let ms: u64 = w
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or("arm-late-write needs a delay in ms")?;
    warn!("fault injection armed: {kind}, {ms} ms");
    ioasis::fault_injection::arm(kind, std::time::Duration::from_millis(ms));
    Ok(())
}

fn stats_request(line: &str, stats: &DeviceStats) -> Res<String> {
    match line {
        "stats" => {
            let t = stats.total();
            Ok(format!(
                "rx_packets={} rx_bytes={} tx_packets={} tx_bytes={} drops={} errors={}",
                t.rx_packets, t.rx_bytes, t.tx_packets, t.tx_bytes, t.drops, t.errors
            ))
        }
        _ => Err(format!("unknown request {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_stats_line() {
        let stats = DeviceStats::new("net0.sock", "reflect", 1);
        stats.queue(0).add_rx(3, 300);
        let s = stats_request("stats", &stats).expect("stats");
        assert!(s.starts_with("rx_packets=3 rx_bytes=300 "), "{s}");
    }

    #[test]
    fn test_stats_rejects_other_requests() {
        let stats = DeviceStats::new("net0.sock", "reflect", 1);
        for bad in ["", "stats now", "attach 3", "detach"] {
            assert!(stats_request(bad, &stats).is_err(), "{bad:?} accepted");
        }
    }
}
