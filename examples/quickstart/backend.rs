//! The quickstart's backend process: one framework `Server` hosting a
//! vdpa-net device (`net0`, reflect port) and an sva-accel device (`sva0`),
//! both bound to the server's one iommu-core context, which a `/dev/iommu`
//! service offers to other processes.
//!
//! Sockets, in the directory given on the command line:
//! - `net0.sock`: vhost-user, the net device;
//! - `sva0.sock`: the accelerator's portal socket;
//! - `iommu.sock`: the `/dev/iommu` service (ioasis service protocol);
//! - `glue.sock`: one request the service cannot serve yet (see below).
//!
//! # The glue socket
//!
//! A vhost-user connection attaches its device's RID to an IOAS of its own
//! when the frontend connects, and the service refuses to attach a RID that
//! another owner holds (EBUSY). Until the framework lets a service session
//! take over the RID of a connected vhost-user device, this process does it
//! for the quickstart's driver, with iommufd's replace on the shared
//! context: `attach IOAS` switches net0's RID to that IOAS, `detach`
//! detaches it, `stats` reports net0's counters. One line per request, one
//! line per answer (`ok ...` or `err ...`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use ioasis::server::Server;
use ioasis::service::{Service, StaticDirectory};
use iommu_core::{DevId, Iommu, ObjectKind};
use log::warn;
use sva_accel::device::{Device as Accel, DeviceConfig, IommuBinding};
use vdpa_net::net::MacAddr;
use vdpa_net::port::{PortSpec, TapIo};
use vdpa_net::stats::DeviceStats;
use vdpa_net::{NetConfig, VhostUserNetBackend};

/// Label of the net device.
pub const NET: &str = "net0";
/// Label of the accelerator.
pub const ACCEL: &str = "sva0";
/// MAC address of the net device.
pub const NET_MAC: MacAddr = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Line the backend prints on stdout once every socket listens.
pub const READY: &str = "ready";
/// Longest request line on the glue socket.
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
        poll_us: 0,
        tap_io: TapIo::Auto,
    };
    let net = Arc::new(VhostUserNetBackend::new(&net_cfg).map_err(ctx("net0"))?);
    let stats = net.stats();
    let mut server = Server::new();
    server
        .add_device(NET, dir.join("net0.sock"), net)
        .map_err(ctx("hosting net0"))?;
    let iommu = server.iommu().clone();
    let net_entry = server
        .directory()
        .get(NET)
        .ok_or("net0 is not in the server's directory")?;

    // The accelerator: an iommu-core device bound to the same context.
    let accel_core = iommu_core::Device::new(ACCEL, sva_accel::device::hw_info());
    iommu.bind(&accel_core).map_err(ctx("binding sva0"))?;
    let directory = Arc::new(StaticDirectory::new());
    directory.insert(net_entry.device.clone());
    directory.insert(accel_core.clone());
    let service = Service::bind(dir.join("iommu.sock"), iommu.clone(), directory)
        .map_err(ctx("/dev/iommu service"))?;
    let handle = service.handle();
    let service = service.spawn().map_err(ctx("service thread"))?;
    let cfg = DeviceConfig {
        workers: 1,
        ..DeviceConfig::default()
    };
    let mut accel = Accel::start_with(
        cfg,
        Some(IommuBinding {
            device: accel_core,
            service: handle,
        }),
    )
    .map_err(ctx("sva0"))?;
    accel
        .listen(&dir.join("sva0.sock"))
        .map_err(ctx("sva0 socket"))?;

    let glue_path = dir.join("glue.sock");
    let glue = UnixListener::bind(&glue_path).map_err(ctx("glue socket"))?;
    let net_id = net_entry.dev_id;
    server
        .add_listener(
            glue,
            Some(glue_path),
            Box::new(move |s| {
                let (iommu, stats) = (iommu.clone(), stats.clone());
                let spawned = std::thread::Builder::new()
                    .name("quickstart-glue".into())
                    .spawn(move || serve_glue(s, &iommu, net_id, &stats));
                if let Err(e) = spawned {
                    warn!("glue thread: {e}");
                }
            }),
        )
        .map_err(ctx("glue listener"))?;
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

fn serve_glue(s: UnixStream, iommu: &Iommu, net: DevId, stats: &DeviceStats) {
    let Ok(mut out) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    // One connection, a handful of requests; each line bounded.
    for _ in 0..1024 {
        let mut line = String::new();
        match r.by_ref().take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let answer = match glue_request(line.trim(), iommu, net, stats) {
            Ok(a) => format!("ok {a}\n"),
            Err(e) => format!("err {e}\n"),
        };
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn glue_request(line: &str, iommu: &Iommu, net: DevId, stats: &DeviceStats) -> Res<String> {
    let words: Vec<&str> = line.split_whitespace().take(3).collect();
    match words.as_slice() {
        ["attach", id] => {
            let ioas: u32 = id.parse().map_err(|_| format!("bad IOAS id {id:?}"))?;
            match iommu.object_kind(ioas) {
                Ok(ObjectKind::Ioas) => {}
                Ok(k) => return Err(format!("object {ioas} is a {k:?}, not an IOAS")),
                Err(e) => return Err(e.to_string()),
            }
            let hwpt = match iommu.attached_hwpt(net, None).map_err(|e| e.to_string())? {
                Some(_) => iommu.replace(net, None, ioas),
                None => iommu.attach(net, None, ioas),
            }
            .map_err(|e| e.to_string())?;
            Ok(hwpt.to_string())
        }
        ["detach"] => {
            iommu.detach(net, None).map_err(|e| e.to_string())?;
            Ok(String::new())
        }
        ["stats"] => {
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

    fn setup() -> (Iommu, DevId, DeviceStats) {
        let iommu = Iommu::new();
        let dev = iommu_core::Device::new(NET, iommu_core::HwInfo::default());
        let id = iommu.bind(&dev).expect("bind");
        (iommu, id, DeviceStats::new("net0.sock", "reflect", 1))
    }

    #[test]
    fn test_glue_attach_replace_detach() {
        let (iommu, net, stats) = setup();
        let a = iommu.ioas_alloc().expect("ioas");
        let b = iommu.ioas_alloc().expect("ioas");
        assert!(glue_request(&format!("attach {a}"), &iommu, net, &stats).is_ok());
        // Attached already: the second attach replaces.
        assert!(glue_request(&format!("attach {b}"), &iommu, net, &stats).is_ok());
        assert!(iommu.attached_hwpt(net, None).expect("query").is_some());
        assert!(glue_request("detach", &iommu, net, &stats).is_ok());
        assert_eq!(iommu.attached_hwpt(net, None).expect("query"), None);
    }

    #[test]
    fn test_glue_rejects_bad_requests() {
        let (iommu, net, stats) = setup();
        for bad in [
            "",
            "attach",
            "attach x",
            "attach 99",
            "attach -1",
            "attach 1 2",
            "detach now",
            "frobnicate",
        ] {
            assert!(
                glue_request(bad, &iommu, net, &stats).is_err(),
                "{bad:?} accepted"
            );
        }
        // The device's own id is not an IOAS.
        let req = format!("attach {net}");
        assert!(glue_request(&req, &iommu, net, &stats).is_err());
    }

    #[test]
    fn test_glue_stats_line() {
        let (iommu, net, stats) = setup();
        stats.queue(0).add_rx(3, 300);
        let s = glue_request("stats", &iommu, net, &stats).expect("stats");
        assert!(s.starts_with("rx_packets=3 rx_bytes=300 "), "{s}");
    }
}
