//! Clients connect while the server process is at its fd limit
//! (`RLIMIT_NOFILE` lowered to the fds it has open): every accept fails
//! with `EMFILE` while the connections wait in the backlogs. The server's
//! accept loops (a vhost-user device listener and the `/dev/iommu`
//! service) must back off: little CPU and few log lines over the window,
//! clients connected before keep being served with bounded latency, and the
//! waiting connections are served once fds are free again.
//!
//! Checked against the loops before `ioasis::accept` (a failed accept
//! logged a warning and went back to a level-triggered epoll_wait): the
//! test failed on the CPU bound (about 1.9 s of CPU in the 1.5 s window) and
//! on the log lines (hundreds of thousands).
//!
//! This binary holds one test: it lowers the limit of its own process and
//! installs a counting logger.

mod hostile_common;
mod vhost_common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostile_common::*;
use ioasis::service::{Client, Service, StaticDirectory};
use ioasis::vhost_user::msg::VERSION_1;
use iommu_core::{HwInfo, Iommu, IommuDevice};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use vhost_common::*;

/// Log records of the framework.
static LINES: AtomicU64 = AtomicU64::new(0);

struct Counter;

impl log::Log for Counter {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        if r.target().starts_with("ioasis") {
            LINES.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn flush(&self) {}
}

fn cpu_time() -> Duration {
    // SAFETY: a zeroed rusage is a valid value for getrusage to fill.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a live rusage for the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    assert_eq!(rc, 0, "getrusage");
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn nofile() -> libc::rlimit {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a live rlimit for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    assert_eq!(rc, 0, "getrlimit");
    r
}

fn set_nofile(r: libc::rlimit) {
    // SAFETY: `r` is a valid rlimit for the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

fn unconnected(ty: SockType) -> OwnedFd {
    socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None).expect("socket")
}

#[test]
fn test_accept_loops_back_off_at_the_fd_limit() {
    static COUNTER: Counter = Counter;
    log::set_logger(&COUNTER).expect("logger");
    log::set_max_level(log::LevelFilter::Info);

    let srv = TestServer::start(vec![("a", EchoDevice::new(1)), ("b", EchoDevice::new(1))]);
    let dir = tempfile::tempdir().expect("tempdir");
    let svc_path = dir.path().join("iommu.sock");
    let iommu = Iommu::new();
    let dev = IommuDevice::new("dev0", HwInfo::full());
    iommu.bind(&dev).expect("bind");
    let directory = Arc::new(StaticDirectory::new());
    directory.insert(dev);
    let svc = Service::bind(&svc_path, iommu, directory)
        .expect("service")
        .spawn()
        .expect("spawn");

    // Well-behaved clients, connected before the limit is reached.
    let b = srv.socket("b");
    let echo = Probe::start(move || EchoClient::connect(&b), |c| c.round_trip());
    let p = svc_path.clone();
    let session = Probe::start(
        move || Client::connect(&p).expect("connect"),
        |c: &mut Client| {
            let id = c.ioas_alloc().expect("ioas_alloc");
            c.destroy(id).expect("destroy");
        },
    );

    // Sockets made now, connected once no fd is left.
    // (Two: a device serves one frontend and keeps one waiting.)
    let dev_socks: Vec<OwnedFd> = (0..2).map(|_| unconnected(SockType::Stream)).collect();
    let svc_socks: Vec<OwnedFd> = (0..4).map(|_| unconnected(SockType::SeqPacket)).collect();
    let dev_addr = UnixAddr::new(&srv.socket("a")).expect("addr");
    let svc_addr = UnixAddr::new(&svc_path).expect("addr");

    let saved = nofile();
    // open_fds() counts the directory fd it reads through, closed since.
    let open = u64::try_from(open_fds() - 1).expect("count");
    set_nofile(libc::rlimit {
        rlim_cur: open,
        rlim_max: saved.rlim_max,
    });
    // Take whatever slot is still free (an fd another thread held while
    // they were counted), so that no accept can succeed.
    let mut filler = Vec::new();
    for _ in 0..256 {
        match std::fs::File::open("/dev/null") {
            Ok(f) => filler.push(f),
            Err(_) => break,
        }
    }
    for s in &dev_socks {
        connect(s.as_raw_fd(), &dev_addr).expect("connect to the device");
    }
    for s in &svc_socks {
        connect(s.as_raw_fd(), &svc_addr).expect("connect to the service");
    }
    // Let the accept loops meet EMFILE, then measure a window.
    std::thread::sleep(Duration::from_millis(200));
    let lines0 = LINES.load(Ordering::Relaxed);
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let cpu = cpu_time() - cpu0;
    let wall = t0.elapsed();
    let lines = LINES.load(Ordering::Relaxed) - lines0;
    drop(filler);
    set_nofile(saved);

    // The waiting connections are served once fds are free again.
    let stream = UnixStream::from(dev_socks.into_iter().next().expect("socket"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    send_raw(&stream, 1, VERSION_1, &[], &[]);
    assert!(
        recv_raw(&stream).is_some(),
        "a frontend that connected at the fd limit is served afterwards"
    );
    let mut late = Client::from_fd(svc_socks.into_iter().next().expect("socket"))
        .expect("a session that connected at the fd limit is served afterwards");
    late.ioas_alloc().expect("ioas_alloc");

    eprintln!("at the fd limit: {cpu:?} of CPU and {lines} log lines in {wall:?}");
    echo.finish()
        .assert_served("vhost-user frontend during EMFILE");
    session
        .finish()
        .assert_served("service session during EMFILE");
    drop(svc);
    assert!(
        cpu < wall / 4,
        "the process used {cpu:?} of CPU in {wall:?} while its accept loops met EMFILE"
    );
    assert!(
        lines <= 40,
        "{lines} log lines in {wall:?} while the accept loops met EMFILE"
    );
}
