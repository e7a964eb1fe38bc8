//! Service protocol tests: two processes sharing memfd pages through the
//! service, disconnect cleanup, isolation between sessions, errno
//! pass-through, malformed messages and fault queues over the service.
//!
//! The two-process test re-runs this test binary as the client
//! (`IOASIS_SERVICE_CHILD` set, running only `child_client`).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ioasis_service::proto::*;
use ioasis_service::uring::{FaultBatch, PageResponse, Wait};
use ioasis_service::{
    sealed_memfd, Client, HwptRequest, MapPerm, Service, ServiceObserver, ServiceThread,
    SessionInfo, StaticDirectory,
};
use iommu_core::{FaultStatus, HwInfo, Iommu, IommuDevice, Memory, Perm, IOMMU_HWPT_ALLOC_PASID};

const CHILD_ENV: &str = "IOASIS_SERVICE_CHILD";
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
enum Ev {
    Closing(u64, Vec<(String, u32)>),
    Other,
}

struct Obs(Mutex<mpsc::Sender<Ev>>);
use std::sync::Mutex;

impl ServiceObserver for Obs {
    fn pasid_allocated(&self, s: &SessionInfo, label: &str, pasid: u32) {
        let _ = (s, label, pasid);
        let _ = self.0.lock().map(|t| t.send(Ev::Other));
    }
    fn session_closing(&self, s: &SessionInfo, pasids: &[(String, u32)]) {
        let _ = self
            .0
            .lock()
            .map(|t| t.send(Ev::Closing(s.id, pasids.to_vec())));
    }
    fn pasid_released(&self, s: &SessionInfo, label: &str, pasid: u32) {
        let _ = (s, label, pasid);
        let _ = self.0.lock().map(|t| t.send(Ev::Other));
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    iommu: Iommu,
    dev: IommuDevice,
    events: mpsc::Receiver<Ev>,
    thread: Option<ServiceThread>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("iommu.sock");
        let iommu = Iommu::new();
        let dev = IommuDevice::new("dev0", HwInfo::full());
        iommu.bind(&dev).expect("bind");
        let plain = IommuDevice::new("plain", HwInfo::default());
        iommu.bind(&plain).expect("bind plain");
        let directory = Arc::new(StaticDirectory::new());
        directory.insert(dev.clone());
        directory.insert(plain);
        let svc = Service::bind(&path, iommu.clone(), directory).expect("service");
        let (tx, rx) = mpsc::channel();
        svc.handle()
            .set_observer(Some(Arc::new(Obs(Mutex::new(tx)))));
        let thread = svc.spawn().expect("spawn");
        Fixture {
            _dir: dir,
            path,
            iommu,
            dev,
            events: rx,
            thread: Some(thread),
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.path).expect("connect")
    }

    fn handle(&self) -> &ioasis_service::ServiceHandle {
        self.thread.as_ref().expect("running").handle()
    }

    fn wait_closed(&self, sid: u64) -> Vec<(String, u32)> {
        loop {
            match self
                .events
                .recv_timeout(WAIT)
                .expect("session_closing event")
            {
                Ev::Closing(id, p) if id == sid => break p,
                _ => {}
            }
        }
    }

    /// Waits for the registry to forget the session (after cleanup).
    fn wait_cleaned(&self, sid: u64) {
        let deadline = std::time::Instant::now() + WAIT;
        while self.handle().session(sid).is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "session {sid} never cleaned up"
            );
            std::thread::yield_now();
        }
    }
}

fn remote_errno(r: std::result::Result<impl std::fmt::Debug, ioasis_service::ClientError>) -> i32 {
    match r {
        Err(e) => e.errno().expect("errno"),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

/// Destroys fault queue `id` once this process has closed every copy of
/// its channel fd. Other tests of this binary spawn child processes, and a
/// child holds a copy of every fd of this process between its fork and its
/// exec (CLOEXEC closes them only at exec): during that window the channel
/// is still open and the destroy is rightly EBUSY. So EBUSY is retried, for
/// at most 2 s; every other answer is returned at once.
fn destroy_closed_queue(
    c: &mut Client,
    id: u32,
) -> std::result::Result<(), ioasis_service::ClientError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match c.destroy(id) {
            Err(e) if e.errno() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

/// The client half of `test_two_processes_share_pages`; does nothing unless
/// run as the child.
#[test]
fn child_client() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut c = Client::connect(&path).expect("child connect");
    let fd = sealed_memfd("child", 0x4000).expect("memfd");
    let dup = fd.try_clone().expect("dup");
    let mem = Memory::from_memfd(dup, 0, 0x4000).expect("map memfd");
    mem.write_at(0, b"written by the child process")
        .expect("write");
    let ioas = c.ioas_alloc().expect("ioas");
    c.attach("dev0", None, ioas).expect("attach");
    let iova = c
        .ioas_map(
            ioas,
            fd.as_fd(),
            0,
            0x4000,
            Some(0x10_0000),
            MapPerm::ReadWrite,
        )
        .expect("map");
    println!("READY {} {ioas} {iova}", c.session_id());
    std::io::stdout().flush().expect("flush");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("stdin");
    let mut buf = [0u8; 19];
    mem.read_at(0x1000, &mut buf).expect("read");
    println!("SEEN {}", String::from_utf8_lossy(&buf));
    std::io::stdout().flush().expect("flush");
    // Exit without cleaning up: the service must do it.
    std::process::exit(0);
}

#[test]
fn test_two_processes_share_pages() {
    let fx = Fixture::new();
    let exe = std::env::current_exe().expect("exe");
    let mut child = Command::new(exe)
        .args(["--exact", "child_client", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &fx.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut stdin = child.stdin.take().expect("stdin");
    let mut line = String::new();
    // Bounded by the child's output; the child is killed on failure below.
    let ready = loop {
        line.clear();
        if out.read_line(&mut line).expect("read child") == 0 {
            let _ = child.kill();
            panic!("child exited before READY");
        }
        // The harness may print "test child_client ... " first.
        if let Some(at) = line.find("READY ") {
            break line[at + 6..].trim().to_owned();
        }
    };
    let f: Vec<u64> = ready
        .split(' ')
        .map(|s| s.parse().expect("number"))
        .collect();
    let (sid, ioas, iova) = (f[0], f[1] as u32, f[2]);
    assert_eq!(iova, 0x10_0000);
    // The device reads what the child wrote: the same pages.
    let mut t = fx.dev.translator();
    let mut buf = [0u8; 28];
    t.read(None, iova, &mut buf).expect("device read");
    assert_eq!(&buf, b"written by the child process");
    // And the child sees what the device writes.
    t.write(None, iova + 0x1000, b"written by a device")
        .expect("device write");
    writeln!(stdin, "CHECK").expect("to child");
    let seen = loop {
        line.clear();
        assert!(
            out.read_line(&mut line).expect("read child") > 0,
            "child ended"
        );
        if let Some(at) = line.find("SEEN ") {
            break line[at + 5..].trim().to_owned();
        }
    };
    assert_eq!(seen, "written by a device");
    assert!(child.wait().expect("wait child").success());
    // The child exited without cleaning up: the service did.
    fx.wait_closed(sid);
    fx.wait_cleaned(sid);
    assert_eq!(
        fx.iommu.attached_hwpt(fx.dev.dev_id().expect("id"), None),
        Ok(None)
    );
    assert!(fx.iommu.object_kind(ioas).is_err());
    let mut t = fx.dev.translator();
    assert!(t.read(None, iova, &mut buf).is_err());
}

#[test]
fn test_disconnect_destroys_objects_and_releases_pasids() {
    let fx = Fixture::new();
    let mut c = fx.client();
    let sid = c.session_id();
    let ioas = c.ioas_alloc().expect("ioas");
    let fd = sealed_memfd("m", 0x2000).expect("memfd");
    c.ioas_map(ioas, fd.as_fd(), 0, 0x2000, None, MapPerm::Read)
        .expect("map");
    let (fault_id, _chan) = c.fault_queue_alloc().expect("fault queue");
    let hwpt = c
        .hwpt_alloc(&HwptRequest {
            label: "dev0".into(),
            pt_id: ioas,
            flags: IOMMU_HWPT_ALLOC_PASID,
            fault_id: Some(fault_id),
            stage1_root: None,
        })
        .expect("hwpt");
    let pasid = c.pasid_alloc("dev0").expect("pasid");
    assert!(pasid >= 1);
    assert_eq!(
        fx.handle().pasid_owner("dev0", pasid).map(|s| s.id),
        Some(sid)
    );
    assert_eq!(
        fx.handle().session_pasids(sid),
        vec![("dev0".to_owned(), pasid)]
    );
    assert_eq!(c.attach("dev0", None, hwpt).expect("attach rid"), hwpt);
    assert_eq!(
        c.attach("dev0", Some(pasid), hwpt).expect("attach pasid"),
        hwpt
    );
    let dev_id = fx.dev.dev_id().expect("bound");
    assert_eq!(fx.iommu.attached_hwpt(dev_id, Some(pasid)), Ok(Some(hwpt)));
    drop(c);
    assert_eq!(fx.wait_closed(sid), vec![("dev0".to_owned(), pasid)]);
    fx.wait_cleaned(sid);
    assert_eq!(fx.iommu.attached_hwpt(dev_id, Some(pasid)), Ok(None));
    assert_eq!(fx.iommu.attached_hwpt(dev_id, None), Ok(None));
    for id in [ioas, hwpt, fault_id] {
        assert!(fx.iommu.object_kind(id).is_err(), "object {id} survived");
    }
    assert_eq!(fx.handle().pasid_owner("dev0", pasid), None);
    // The PASID is free again for the next session.
    let mut c2 = fx.client();
    assert_eq!(c2.pasid_alloc("dev0").expect("pasid again"), pasid);
}

#[test]
fn test_sessions_are_isolated() {
    let fx = Fixture::new();
    let mut a = fx.client();
    let mut b = fx.client();
    let ioas_a = a.ioas_alloc().expect("ioas");
    let fd = sealed_memfd("m", 0x1000).expect("memfd");
    // B can neither use nor destroy A's IOAS.
    assert_eq!(
        remote_errno(b.ioas_map(ioas_a, fd.as_fd(), 0, 0x1000, None, MapPerm::Read)),
        libc::ENOENT
    );
    assert_eq!(remote_errno(b.destroy(ioas_a)), libc::ENOENT);
    assert_eq!(remote_errno(b.attach("dev0", None, ioas_a)), libc::ENOENT);
    // A PASID must be reserved by the session that attaches it.
    let pasid = a.pasid_alloc("dev0").expect("pasid");
    let ioas_b = b.ioas_alloc().expect("ioas b");
    assert_eq!(
        remote_errno(b.attach("dev0", Some(pasid), ioas_b)),
        libc::EPERM
    );
    assert_eq!(remote_errno(b.pasid_free("dev0", pasid)), libc::ENOENT);
    // B cannot detach what A attached.
    a.attach("dev0", None, ioas_a).expect("attach");
    assert_eq!(remote_errno(b.detach("dev0", None)), libc::EPERM);
    // Nor take the device over.
    assert_eq!(remote_errno(b.attach("dev0", None, ioas_b)), libc::EBUSY);
    a.detach("dev0", None).expect("detach");
    // Detaching what is not attached is a no-op, as in iommufd.
    b.detach("dev0", None).expect("no-op detach");
    // A device without PASID support has no PASIDs to give.
    assert_eq!(remote_errno(a.pasid_alloc("plain")), libc::EOPNOTSUPP);
    assert_eq!(remote_errno(a.device_info("nope")), libc::ENOENT);
}

#[test]
fn test_errors_carry_the_iommu_errno() {
    let fx = Fixture::new();
    let mut c = fx.client();
    let ioas = c.ioas_alloc().expect("ioas");
    let fd = sealed_memfd("m", 0x4000).expect("memfd");
    c.ioas_map(
        ioas,
        fd.as_fd(),
        0,
        0x2000,
        Some(0x10000),
        MapPerm::ReadWrite,
    )
    .expect("map");
    // Overlap: EEXIST.
    assert_eq!(
        remote_errno(c.ioas_map(ioas, fd.as_fd(), 0, 0x1000, Some(0x11000), MapPerm::Read)),
        libc::EEXIST
    );
    // Range beyond the memfd: EINVAL.
    assert_eq!(
        remote_errno(c.ioas_map(ioas, fd.as_fd(), 0x2000, 0x4000, None, MapPerm::Read)),
        libc::EINVAL
    );
    // Partial unmap of an area: ENOENT.
    assert_eq!(
        remote_errno(c.ioas_unmap(ioas, 0x10000, 0x1000)),
        libc::ENOENT
    );
    // No R/W: EINVAL (checked before the memfd is looked at).
    let bad = Request::IoasMap {
        flags: MAP_FIXED_IOVA,
        ioas_id: ioas,
        offset: 0,
        length: 0x1000,
        iova: 0x40000,
    };
    let (reply, _) = c
        .raw_call(&bad.encode(99), &[fd.as_fd()])
        .expect("raw")
        .expect("reply");
    assert!(matches!(
        Reply::decode(&reply, 0, Opcode::IoasMap).expect("decode").1,
        Reply::Err { errno, .. } if errno == libc::EINVAL
    ));
    // An IOAS with an attached device's HWPT: EBUSY.
    c.attach("dev0", None, ioas).expect("attach");
    assert_eq!(remote_errno(c.destroy(ioas)), libc::EBUSY);
    // Copy shares the pages; iova_ranges reports the MSI hole of nothing
    // (full info has none), allow_iovas restricts allocation.
    let ioas2 = c.ioas_alloc().expect("ioas2");
    let at = c
        .ioas_copy(ioas2, ioas, 0x10000, 0x2000, Some(0x80000), MapPerm::Read)
        .expect("copy");
    assert_eq!(at, 0x80000);
    c.ioas_allow_iovas(ioas2, &[(0x100000, 0x1fffff)])
        .expect("allow");
    let got = c
        .ioas_map(ioas2, fd.as_fd(), 0, 0x1000, None, MapPerm::Read)
        .expect("alloc map");
    assert!((0x100000..=0x1fffff).contains(&got));
    let (align, ranges) = c.ioas_iova_ranges(ioas2).expect("ranges");
    assert!(align >= 1);
    assert!(!ranges.is_empty());
    assert_eq!(c.ioas_unmap_all(ioas2).expect("unmap all"), 0x3000);
    assert_eq!(
        c.devices().expect("list"),
        vec!["dev0".to_owned(), "plain".to_owned()]
    );
    let info = c.device_info("dev0").expect("info");
    assert_eq!(info.max_pasid_log2, 20);
    assert_eq!(info.dev_id, fx.dev.dev_id().expect("id"));
    // Invalidation of a paging HWPT is EINVAL with zero entries done.
    let hwpt = c.attach("dev0", None, ioas).expect("re-attach (replace)");
    let (done, r) = c.hwpt_invalidate(
        hwpt,
        &[InvalidateEntry::Stage1 {
            flags: 0,
            addr: 0,
            npages: 1,
        }],
    );
    assert_eq!(done, 0);
    assert!(r.is_err());
}

#[test]
fn test_unsealed_memfd_is_refused() {
    let fx = Fixture::new();
    let mut c = fx.client();
    let ioas = c.ioas_alloc().expect("ioas");
    let fd = nix::sys::memfd::memfd_create("plain", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .expect("memfd");
    nix::unistd::ftruncate(&fd, 0x1000).expect("truncate");
    assert_eq!(
        remote_errno(c.ioas_map(ioas, fd.as_fd(), 0, 0x1000, None, MapPerm::Read)),
        libc::EINVAL
    );
}

fn raw_errno(c: &mut Client, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>], op: Opcode) -> i32 {
    let (reply, rfds) = c.raw_call(bytes, fds).expect("raw call").expect("a reply");
    assert!(rfds.is_empty());
    match Reply::decode(&reply, 0, op).expect("reply decodes").1 {
        Reply::Err { errno, .. } => errno,
        Reply::Ok { .. } => panic!("malformed message accepted"),
    }
}

#[test]
fn test_malformed_messages_get_errors() {
    let fx = Fixture::new();
    let mut c = fx.client();
    let fd = sealed_memfd("m", 0x1000).expect("memfd");
    // Truncated body.
    let mut b = Request::Destroy { id: 1 }.encode(5);
    b.truncate(HEADER_SIZE + 2);
    b[8..12].copy_from_slice(&((HEADER_SIZE + 2) as u32).to_le_bytes());
    assert_eq!(raw_errno(&mut c, &b, &[], Opcode::Destroy), libc::EINVAL);
    // Header length disagrees with the packet.
    let mut b = Request::Destroy { id: 1 }.encode(5);
    b.push(0);
    assert_eq!(raw_errno(&mut c, &b, &[], Opcode::Destroy), libc::EINVAL);
    // Trailing bytes.
    let mut b = Request::Destroy { id: 1 }.encode(5);
    b.extend_from_slice(&[0; 4]);
    let len = b.len() as u32;
    b[8..12].copy_from_slice(&len.to_le_bytes());
    assert_eq!(raw_errno(&mut c, &b, &[], Opcode::Destroy), libc::E2BIG);
    // Oversize.
    let mut b = Request::IoasAlloc.encode(5);
    b.resize(MAX_MESSAGE + 100, 0);
    let len = b.len() as u32;
    b[8..12].copy_from_slice(&len.to_le_bytes());
    assert_eq!(
        raw_errno(&mut c, &b, &[], Opcode::IoasAlloc),
        libc::EMSGSIZE
    );
    // Bad version.
    let mut b = Request::IoasAlloc.encode(5);
    b[4..6].copy_from_slice(&7u16.to_le_bytes());
    assert_eq!(
        raw_errno(&mut c, &b, &[], Opcode::IoasAlloc),
        libc::EPROTONOSUPPORT
    );
    // Unknown opcode.
    let b = Writer::new().finish(0x7777, 0, 0, 5);
    let (reply, _) = c.raw_call(&b, &[]).expect("raw").expect("reply");
    assert_eq!(Header::decode(&reply, 0).expect("header").opcode, 0x7777);
    // Missing fd on a map, fd on a request that takes none, fd count that
    // disagrees with the header.
    let map = Request::IoasMap {
        flags: MAP_READABLE,
        ioas_id: 1,
        offset: 0,
        length: 0x1000,
        iova: 0,
    }
    .encode(5);
    assert_eq!(raw_errno(&mut c, &map, &[], Opcode::IoasMap), libc::EBADF);
    let alloc = Request::IoasAlloc.encode(5);
    assert_eq!(
        raw_errno(&mut c, &alloc, &[fd.as_fd()], Opcode::IoasAlloc),
        libc::EBADF
    );
    let mut two = map.clone();
    two[12..14].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(
        raw_errno(&mut c, &two, &[fd.as_fd(), fd.as_fd()], Opcode::IoasMap),
        libc::EBADF
    );
    // Overflowing ranges.
    let over = Request::IoasMap {
        flags: MAP_READABLE | MAP_FIXED_IOVA,
        ioas_id: 1,
        offset: 0,
        length: 0x2000,
        iova: u64::MAX - 0x1000,
    }
    .encode(5);
    assert_eq!(
        raw_errno(&mut c, &over, &[fd.as_fd()], Opcode::IoasMap),
        libc::EOVERFLOW
    );
    let over = Request::IoasUnmap {
        ioas_id: 1,
        iova: 0x1000,
        length: u64::MAX,
    }
    .encode(5);
    assert_eq!(
        raw_errno(&mut c, &over, &[], Opcode::IoasUnmap),
        libc::EOVERFLOW
    );
    // Too many ranges.
    let mut w = Writer::new();
    w.u32(1).u32((MAX_RANGES + 1) as u32);
    let b = w.finish(Opcode::IoasAllowIovas as u16, 0, 0, 5);
    assert_eq!(
        raw_errno(&mut c, &b, &[], Opcode::IoasAllowIovas),
        libc::EINVAL
    );
    // Garbage without a header at all.
    let (reply, _) = c.raw_call(&[1, 2, 3], &[]).expect("raw").expect("reply");
    assert!(Header::decode(&reply, 0).is_ok());
    // The session still works afterwards.
    assert!(c.ioas_alloc().expect("still serving") > 0);
}

#[test]
fn test_fault_queue_over_the_service() {
    let fx = Fixture::new();
    let mut c = fx.client();
    let ioas = c.ioas_alloc().expect("ioas");
    let (fault_id, mut chan) = c.fault_queue_alloc().expect("fault queue");
    let hwpt = c
        .hwpt_alloc(&HwptRequest {
            label: "dev0".into(),
            pt_id: ioas,
            flags: 0,
            fault_id: Some(fault_id),
            stage1_root: None,
        })
        .expect("hwpt");
    c.attach("dev0", None, hwpt).expect("attach");
    let mut t = fx.dev.translator();
    let mut buf = [0u8; 8];
    let pending = match t.read(None, 0x5000, &mut buf) {
        Err(iommu_core::Error::FaultRaised { pending, .. }) => pending,
        other => panic!("expected a fault, got {other:?}"),
    };
    let mut batch = FaultBatch::default();
    let n = chan.recv(&mut batch, Wait::Timeout(WAIT)).expect("recv");
    assert_eq!(n, 1);
    let r = batch.records[0];
    assert_eq!(r.cookie, pending.cookie());
    assert_eq!(r.addr, 0x5000);
    assert_eq!(r.dev_id, u64::from(fx.dev.dev_id().expect("id")));
    assert!(r.is_last());
    // Map the page lazily, then answer: the device resumes.
    let fd = sealed_memfd("lazy", 0x1000).expect("memfd");
    c.ioas_map(
        ioas,
        fd.as_fd(),
        0,
        0x1000,
        Some(0x5000),
        MapPerm::ReadWrite,
    )
    .expect("lazy map");
    chan.respond(&[PageResponse::success(r.cookie)])
        .expect("respond");
    assert_eq!(pending.wait_timeout(WAIT), FaultStatus::Success);
    t.read(None, 0x5000, &mut buf).expect("read after fault");
    let _ = Perm::READ;
}

#[test]
fn test_unmap_over_the_service_waits_for_device_threads_in_a_section() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let fx = Fixture::new();
    let mut c = fx.client();
    let ioas = c.ioas_alloc().expect("ioas");
    let fd = sealed_memfd("m", 0x1000).expect("memfd");
    c.ioas_map(
        ioas,
        fd.as_fd(),
        0,
        0x1000,
        Some(0x20000),
        MapPerm::ReadWrite,
    )
    .expect("map");
    c.attach("dev0", None, ioas).expect("attach");
    let dev = fx.dev.clone();
    let ended = Arc::new(AtomicBool::new(false));
    let e2 = ended.clone();
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let mut t = dev.translator();
        {
            let mut a = t.access();
            a.write(None, 0x20000, b"in flight").expect("write");
            tx.send(()).expect("signal");
            std::thread::sleep(Duration::from_millis(50));
            e2.store(true, Ordering::SeqCst);
        }
    });
    rx.recv_timeout(WAIT).expect("worker in its section");
    assert_eq!(c.ioas_unmap(ioas, 0x20000, 0x1000).expect("unmap"), 0x1000);
    assert!(
        ended.load(Ordering::SeqCst),
        "unmap answered while a device section was open"
    );
    worker.join().expect("worker");
}

#[test]
fn test_session_limits_are_enforced() {
    let fx = Fixture::new();
    let mut c = fx.client();
    let mut chans = Vec::new();
    for _ in 0..ioasis_service::MAX_FAULT_QUEUES_PER_SESSION {
        chans.push(c.fault_queue_alloc_fd().expect("fault queue"));
    }
    assert_eq!(remote_errno(c.fault_queue_alloc_fd()), libc::ENOSPC);
    // Destroying one makes room again.
    let (id, fd) = chans.pop().expect("one");
    drop(fd);
    destroy_closed_queue(&mut c, id).expect("destroy");
    c.fault_queue_alloc_fd().expect("room again");
}

/// As iommufd's fault fd holds a reference on its FAULT object
/// (eventq.c `iommufd_eventq_init` / `iommufd_eventq_fops_release`; main.c
/// `iommufd_object_remove` → EBUSY), a session's DESTROY of a fault queue
/// whose channel fd it still holds is EBUSY; after it closes the fd the
/// destroy succeeds and the id is gone. (Before the service checked the
/// channel, the destroy succeeded with the fd open: seen failing.)
#[test]
fn test_destroy_fault_queue_with_open_channel_ebusy() {
    let fx = Fixture::new();
    let mut c = fx.client();
    let (id, fd) = c.fault_queue_alloc_fd().expect("fault queue");
    let dup = fd.try_clone().expect("dup");
    assert_eq!(remote_errno(c.destroy(id)), libc::EBUSY);
    drop(fd);
    assert_eq!(remote_errno(c.destroy(id)), libc::EBUSY);
    drop(dup);
    destroy_closed_queue(&mut c, id).expect("destroy once closed");
    assert_eq!(remote_errno(c.destroy(id)), libc::ENOENT);
    assert!(fx.iommu.object_kind(id).is_err());
    // The session goes on.
    c.ioas_alloc().expect("ioas after");
}

#[test]
fn test_pasid_free_detaches_and_releases() {
    let fx = Fixture::new();
    let mut c = fx.client();
    let ioas = c.ioas_alloc().expect("ioas");
    let hwpt = c
        .hwpt_alloc(&HwptRequest {
            label: "dev0".into(),
            pt_id: ioas,
            flags: IOMMU_HWPT_ALLOC_PASID,
            ..HwptRequest::default()
        })
        .expect("hwpt");
    let p1 = c.pasid_alloc("dev0").expect("pasid");
    let p2 = c.pasid_alloc("dev0").expect("pasid");
    assert_ne!(p1, p2);
    c.attach("dev0", Some(p1), hwpt).expect("attach");
    let dev_id = fx.dev.dev_id().expect("bound");
    assert_eq!(fx.iommu.attached_hwpt(dev_id, Some(p1)), Ok(Some(hwpt)));
    c.pasid_free("dev0", p1).expect("free");
    assert_eq!(fx.iommu.attached_hwpt(dev_id, Some(p1)), Ok(None));
    assert_eq!(fx.handle().pasid_owner("dev0", p1), None);
    assert_eq!(
        fx.handle().session_pasids(c.session_id()),
        vec![("dev0".to_owned(), p2)]
    );
    // Freed: it can no longer be attached by this session.
    assert_eq!(remote_errno(c.attach("dev0", Some(p1), hwpt)), libc::EPERM);
    // The HWPT is now unused and can be destroyed.
    c.destroy(hwpt).expect("destroy hwpt");
}

#[test]
fn test_nested_invalidation_reports_entries_done() {
    let fx = Fixture::new();
    let mut c = fx.client();
    let ioas = c.ioas_alloc().expect("ioas");
    let fd = sealed_memfd("s1", 0x1000).expect("memfd");
    c.ioas_map(
        ioas,
        fd.as_fd(),
        0,
        0x1000,
        Some(0x1000),
        MapPerm::ReadWrite,
    )
    .expect("map stage-1 root");
    let parent = c
        .hwpt_alloc(&HwptRequest {
            label: "dev0".into(),
            pt_id: ioas,
            flags: iommu_core::IOMMU_HWPT_ALLOC_NEST_PARENT,
            ..HwptRequest::default()
        })
        .expect("nest parent");
    let nested = c
        .hwpt_alloc(&HwptRequest {
            label: "dev0".into(),
            pt_id: parent,
            stage1_root: Some(0x1000),
            ..HwptRequest::default()
        })
        .expect("nested");
    let ok = InvalidateEntry::Stage1 {
        flags: 0,
        addr: 0x2000,
        npages: 1,
    };
    let bad = InvalidateEntry::Stage1 {
        flags: 0xffff_ffff,
        addr: 0x2000,
        npages: 1,
    };
    let (done, r) = c.hwpt_invalidate(nested, &[ok, ok]);
    assert_eq!(done, 2);
    assert!(r.is_ok());
    let (done, r) = c.hwpt_invalidate(nested, &[ok, bad]);
    assert_eq!(done, 1);
    assert_eq!(remote_errno(r), libc::EOPNOTSUPP);
    // A probe (no entries) succeeds.
    let (done, r) = c.hwpt_invalidate(nested, &[]);
    assert_eq!((done, r.is_ok()), (0, true));
}

const FAULT_CHILD_ENV: &str = "IOASIS_SERVICE_FAULT_CHILD";

/// The client half of `test_fault_answered_by_another_process`: owns a
/// fault-capable HWPT, consumes the fault over its channel, maps the page
/// lazily and answers. Does nothing unless run as the child.
#[test]
fn child_fault_client() {
    let Ok(path) = std::env::var(FAULT_CHILD_ENV) else {
        return;
    };
    let mut c = Client::connect(&path).expect("child connect");
    let ioas = c.ioas_alloc().expect("ioas");
    let (fault_id, mut chan) = c.fault_queue_alloc().expect("fault queue");
    let hwpt = c
        .hwpt_alloc(&HwptRequest {
            label: "dev0".into(),
            pt_id: ioas,
            fault_id: Some(fault_id),
            ..HwptRequest::default()
        })
        .expect("hwpt");
    c.attach("dev0", None, hwpt).expect("attach");
    println!("FAULT-READY");
    std::io::stdout().flush().expect("flush");
    let mut batch = FaultBatch::default();
    let n = chan
        .recv(&mut batch, Wait::Timeout(WAIT))
        .expect("fault record");
    assert_eq!(n, 1);
    let rec = batch.records[0];
    let fd = sealed_memfd("lazy", 0x1000).expect("memfd");
    let mem = Memory::from_memfd(fd.try_clone().expect("dup"), 0, 0x1000).expect("map");
    mem.write_at(0, b"paged in by the child").expect("write");
    c.ioas_map(
        ioas,
        fd.as_fd(),
        0,
        0x1000,
        Some(rec.addr),
        MapPerm::ReadWrite,
    )
    .expect("lazy map");
    chan.respond(&[PageResponse::success(rec.cookie)])
        .expect("respond");
    println!("ANSWERED {}", rec.cookie);
    std::io::stdout().flush().expect("flush");
    let mut line = String::new();
    // Stay alive (keeping the mapping) until the parent is done.
    let _ = std::io::stdin().read_line(&mut line);
    std::process::exit(0);
}

#[test]
fn test_fault_answered_by_another_process() {
    let fx = Fixture::new();
    let exe = std::env::current_exe().expect("exe");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "child_fault_client",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FAULT_CHILD_ENV, &fx.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut stdin = child.stdin.take().expect("stdin");
    let mut line = String::new();
    let mut next = |tag: &str| -> String {
        loop {
            line.clear();
            assert!(
                out.read_line(&mut line).expect("read child") > 0,
                "child ended before {tag}"
            );
            if let Some(at) = line.find(tag) {
                break line[at + tag.len()..].trim().to_owned();
            }
        }
    };
    next("FAULT-READY");
    let mut t = fx.dev.translator();
    let mut buf = [0u8; 21];
    let pending = match t.read(None, 0x7000, &mut buf) {
        Err(iommu_core::Error::FaultRaised { pending, .. }) => pending,
        other => panic!("expected a fault, got {other:?}"),
    };
    let cookie: u32 = next("ANSWERED ").parse().expect("cookie");
    assert_eq!(cookie, pending.cookie());
    assert_eq!(pending.wait_timeout(WAIT), FaultStatus::Success);
    t.read(None, 0x7000, &mut buf)
        .expect("read after the answer");
    assert_eq!(&buf, b"paged in by the child");
    writeln!(stdin, "DONE").expect("to child");
    assert!(child.wait().expect("wait child").success());
}

#[test]
fn test_service_driven_from_another_event_loop() {
    let iommu = Iommu::new();
    let dev = IommuDevice::new("dev0", HwInfo::full());
    iommu.bind(&dev).expect("bind");
    let dir = Arc::new(StaticDirectory::new());
    dir.insert(dev);
    let mut svc = Service::new(iommu.clone(), dir).expect("service");
    let fd = svc.connect_local().expect("local session");
    let client = std::thread::spawn(move || {
        let mut c = Client::from_fd(fd).expect("hello");
        let ioas = c.ioas_alloc().expect("ioas");
        c.attach("dev0", None, ioas).expect("attach");
        ioas
    });
    // The host loop: poll the service's fd, run it without blocking.
    let deadline = std::time::Instant::now() + WAIT;
    while !client.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "client never finished"
        );
        let mut p = [nix::poll::PollFd::new(
            svc.poll_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(100u16));
        assert!(svc.run_once(Some(Duration::ZERO)).expect("run once"));
    }
    let ioas = client.join().expect("client");
    // The client's socket closed when its thread ended: one more turn of
    // the loop cleans the session up.
    for _ in 0..100 {
        if svc.handle().sessions().is_empty() {
            break;
        }
        svc.run_once(Some(Duration::from_millis(100)))
            .expect("run once");
    }
    assert!(svc.handle().sessions().is_empty());
    assert!(iommu.object_kind(ioas).is_err());
}
