//! Socket files are `0600` by default whatever the umask, take the mode and
//! group they are given, and the `/dev/iommu` service refuses a client
//! whose credentials the policy does not admit, even when the file was
//! opened up by hand, with a log line that says why; an admitted client of
//! another user (a member of the socket's group) is served.
//!
//! Clients of another user are forked children that drop to uid/gid 65534
//! before connecting; the test needs root (it skips through
//! `ioasis_test_skip` otherwise).
//!
//! Checked with the policy disabled (sockets bound with the process umask as
//! before `ioasis::socket_policy`, every peer admitted): the sockets came out
//! 0777 under umask 0 and 0755 under 022, and the service served the
//! uid-65534 client; all three tests failed.
//!
//! The umask is process-wide, so the tests of this file run one at a time.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ioasis::server::Server;
use ioasis::service::proto::Request;
use ioasis::service::{Client, Service, StaticDirectory};
use ioasis::socket_policy::SocketPolicy;
use iommu_core::{HwInfo, Iommu, IommuDevice};

/// The unprivileged user and group the child clients become.
const NOBODY: u32 = 65534;

static SERIAL: Mutex<()> = Mutex::new(());
static REFUSALS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        let m = r.args().to_string();
        if m.contains("refusing a client") {
            REFUSALS.lock().unwrap_or_else(|e| e.into_inner()).push(m);
        }
    }
    fn flush(&self) {}
}

fn capture_logs() {
    static CAPTURE: Capture = Capture;
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn service(path: &Path, policy: SocketPolicy) -> ioasis::service::ServiceThread {
    let iommu = Iommu::new();
    let dev = IommuDevice::new("dev0", HwInfo::full());
    iommu.bind(&dev).expect("bind");
    let dir = Arc::new(StaticDirectory::new());
    dir.insert(dev);
    Service::bind_with_policy(path, iommu, dir, policy)
        .expect("service")
        .spawn()
        .expect("spawn")
}

#[test]
fn test_sockets_are_0600_by_default_whatever_the_umask() {
    let _g = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    // SAFETY: umask(2) has no memory-safety preconditions.
    let old = unsafe { libc::umask(0) };
    let mut server = Server::new();
    server
        .add_device(
            "d",
            dir.path().join("d.sock"),
            Arc::new(Rng) as Arc<dyn ioasis::device::Device>,
        )
        .expect("device");
    let svc = service(&dir.path().join("iommu.sock"), SocketPolicy::default());
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    assert_eq!(mode_of(&dir.path().join("d.sock")), 0o600, "device socket");
    assert_eq!(
        mode_of(&dir.path().join("iommu.sock")),
        0o600,
        "service socket"
    );
    drop(svc);
}

#[test]
fn test_sockets_take_the_given_mode_and_group() {
    let _g = serial();
    if !is_root() {
        ioasis_test_skip::skip(format!("setting a socket's group to {NOBODY} needs root"));
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = SocketPolicy::new(0o660, Some(NOBODY)).expect("policy");
    let mut server = Server::new();
    server.set_socket_policy(policy);
    server
        .add_device(
            "d",
            dir.path().join("d.sock"),
            Arc::new(Rng) as Arc<dyn ioasis::device::Device>,
        )
        .expect("device");
    let svc = service(&dir.path().join("iommu.sock"), policy);
    for s in ["d.sock", "iommu.sock"] {
        let p = dir.path().join(s);
        assert_eq!(mode_of(&p), 0o660, "{s}");
        assert_eq!(std::fs::metadata(&p).expect("stat").gid(), NOBODY, "{s}");
    }
    drop(svc);
}

/// What a child client saw.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Its HELLO was answered.
    Served,
    /// The connection was closed without an answer.
    Closed,
    /// connect(2) failed (the file's mode kept it out).
    NoConnect,
    /// Anything else (exit code).
    Other(i32),
}

/// Forks a child that becomes uid/gid `NOBODY`, connects to the service at
/// `path` and sends HELLO.
fn client_as_nobody(path: &Path) -> Seen {
    let hello = Request::Hello.encode(1);
    let addr = nix::sys::socket::UnixAddr::new(path).expect("addr");
    // SAFETY: the child only makes async-signal-safe system calls through
    // libc on data prepared before the fork, then _exit()s.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            // SAFETY: plain system calls on live local data; no allocation.
            unsafe {
                let code = (|| {
                    let groups = [NOBODY];
                    if libc::setgroups(1, groups.as_ptr()) != 0
                        || libc::setgid(NOBODY) != 0
                        || libc::setuid(NOBODY) != 0
                    {
                        return 10;
                    }
                    let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
                    if fd < 0 {
                        return 11;
                    }
                    let sa = nix::sys::socket::SockaddrLike::as_ptr(&addr);
                    let len = nix::sys::socket::SockaddrLike::len(&addr);
                    if libc::connect(fd, sa, len) != 0 {
                        return 2;
                    }
                    let tv = libc::timeval {
                        tv_sec: 10,
                        tv_usec: 0,
                    };
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        (&tv as *const libc::timeval).cast(),
                        std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                    );
                    // A refused client may see EPIPE on send: not a crash.
                    let _ = libc::send(fd, hello.as_ptr().cast(), hello.len(), libc::MSG_NOSIGNAL);
                    let mut buf = [0u8; 512];
                    let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                    if n > 0 {
                        0
                    } else if n == 0 || *libc::__errno_location() == libc::ECONNRESET {
                        1
                    } else {
                        12
                    }
                })();
                libc::_exit(code)
            }
        }
        nix::unistd::ForkResult::Parent { child } => {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match nix::sys::wait::waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
                    .expect("waitpid")
                {
                    nix::sys::wait::WaitStatus::Exited(_, c) => {
                        return match c {
                            0 => Seen::Served,
                            1 => Seen::Closed,
                            2 => Seen::NoConnect,
                            c => Seen::Other(c),
                        }
                    }
                    nix::sys::wait::WaitStatus::StillAlive if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    other => {
                        let _ = nix::sys::signal::kill(child, nix::sys::signal::SIGKILL);
                        let _ = nix::sys::wait::waitpid(child, None);
                        panic!("child client: {other:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn test_service_refuses_clients_the_policy_does_not_admit() {
    let _g = serial();
    if !is_root() {
        ioasis_test_skip::skip("clients of another user need root (setuid in a forked child)");
        return;
    }
    capture_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");

    // Default policy: the file keeps nobody out...
    let path = dir.path().join("default.sock");
    let svc = service(&path, SocketPolicy::default());
    assert_eq!(client_as_nobody(&path), Seen::NoConnect, "mode 0600");
    // ...and opened up by hand, the credentials check still does.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let before = REFUSALS.lock().unwrap_or_else(|e| e.into_inner()).len();
    assert_eq!(
        client_as_nobody(&path),
        Seen::Closed,
        "uid {NOBODY} is not admitted by mode 0600"
    );
    // The daemon's own user is still served.
    let mut me = Client::connect(&path).expect("root client");
    me.ioas_alloc().expect("ioas_alloc");
    let refusals = REFUSALS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        refusals.len() > before
            && refusals[before..]
                .iter()
                .any(|m| m.contains(&format!("uid {NOBODY}")) && m.contains("mode 0600")),
        "the refusal is logged with the reason: {refusals:?}"
    );
    drop(svc);

    // Mode 0660 with group NOBODY: a member is served.
    let path = dir.path().join("group.sock");
    let svc = service(
        &path,
        SocketPolicy::new(0o660, Some(NOBODY)).expect("policy"),
    );
    assert_eq!(
        client_as_nobody(&path),
        Seen::Served,
        "a member of the socket's group is admitted"
    );
    drop(svc);
}

/// A device with one queue that never does anything (the mode tests only
/// bind its socket).
struct Rng;

impl ioasis::device::Device for Rng {
    fn device_type(&self) -> u32 {
        4
    }
    fn features(&self) -> u64 {
        0
    }
    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> u16 {
        64
    }
    fn worker(
        &self,
        _thread: usize,
    ) -> Result<Box<dyn ioasis::device::Worker>, ioasis::device::DeviceError> {
        Err(ioasis::device::DeviceError::Other(
            "not started in these tests".into(),
        ))
    }
}
