//! The service never waits on device progress: an unmap whose translations
//! a device thread still uses is completed asynchronously (its reply goes
//! out once the thread has left its access section), while the service
//! answers every other session, and the unmapping session's next requests
//! are answered in order after it.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ioasis_service::proto::{Opcode, Reply, ReplyBody, Request};
use ioasis_service::transport::{recv_packet, send_packet};
use ioasis_service::{
    sealed_memfd, Client, MapPerm, Service, ServiceHandle, ServiceThread, StaticDirectory,
};
use iommu_core::{HwInfo, Iommu, IommuDevice};

/// How long the device thread stays in its access section.
const SECTION: Duration = Duration::from_secs(1);
/// The bound on another session's request meanwhile (generous).
const PROMPT: Duration = Duration::from_millis(200);
const IOVA: u64 = 0x10_0000;
const LEN: u64 = 64 << 10;

struct World {
    _dir: tempfile::TempDir,
    path: PathBuf,
    dev: IommuDevice,
    svc: Option<ServiceThread>,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("iommu.sock");
        let iommu = Iommu::new();
        let dev = IommuDevice::new("d0", HwInfo::default());
        iommu.bind(&dev).expect("bind");
        let devices = Arc::new(StaticDirectory::new());
        devices.insert(dev.clone());
        let svc = Service::bind(&path, iommu, devices)
            .expect("service")
            .spawn()
            .expect("service thread");
        World {
            _dir: dir,
            path,
            dev,
            svc: Some(svc),
        }
    }

    fn handle(&self) -> &ServiceHandle {
        self.svc.as_ref().expect("running").handle()
    }

    /// A session with one IOAS mapping `LEN` bytes at `IOVA`, attached to
    /// the device's RID.
    fn owner(&self) -> (Client, u32) {
        let mut c = Client::connect(&self.path).expect("session");
        let ioas = c.ioas_alloc().expect("IOAS_ALLOC");
        let fd = sealed_memfd("m", LEN).expect("memfd");
        c.ioas_map(ioas, fd.as_fd(), 0, LEN, Some(IOVA), MapPerm::ReadWrite)
            .expect("IOAS_MAP");
        c.attach("d0", None, ioas).expect("ATTACH");
        (c, ioas)
    }

    /// A device thread that translates `IOVA` in an access section and
    /// stays in it for [`SECTION`]. Returns once it is inside, and a flag
    /// set as it leaves.
    fn device_in_section(&self) -> (std::thread::JoinHandle<()>, Arc<AtomicBool>) {
        let dev = self.dev.clone();
        let left = Arc::new(AtomicBool::new(false));
        let left2 = left.clone();
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            let mut tr = dev.translator();
            {
                let mut a = tr.access();
                let mut b = [0u8; 8];
                a.read(None, IOVA, &mut b).expect("read in section");
                tx.send(()).expect("signal");
                std::thread::sleep(SECTION);
                left2.store(true, Ordering::SeqCst);
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("device thread in its section");
        (t, left)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(s) = self.svc.take() {
            s.stop();
        }
    }
}

/// Finding 5 (service part): the single service thread waited for an
/// unmap with no bound, so an unrelated session's IOAS_ALLOC waited as long
/// as the slowest device thread (5.2 s in the report). Now, while a device
/// thread holds an access section for 1 s, another session connects and is
/// answered within [`PROMPT`], and the unmap still returns only after the
/// section ended.
///
/// Seen failing: on main at 83a3b49 (the service completed the unmap
/// inline), the other session was answered only after the section ended,
/// about 1 s later.
#[test]
fn test_other_sessions_are_served_while_an_unmap_waits() {
    let w = World::new();
    let (mut owner, ioas) = w.owner();
    let (dev, left) = w.device_in_section();
    let unmap = std::thread::spawn(move || {
        let n = owner.ioas_unmap(ioas, IOVA, LEN);
        (n, Instant::now())
    });
    // Let the unmap reach the service.
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    let mut other = Client::connect(&w.path).expect("another session");
    other.ioas_alloc().expect("IOAS_ALLOC");
    let took = t.elapsed();
    let section_over = left.load(Ordering::SeqCst);
    assert!(
        took < PROMPT,
        "another session waited {took:?} while an unmap was pending"
    );
    assert!(
        !section_over,
        "the section ended before the other session was answered"
    );
    let (n, _) = unmap.join().expect("unmap thread");
    assert_eq!(n.expect("IOAS_UNMAP"), LEN);
    assert!(
        left.load(Ordering::SeqCst),
        "the unmap returned while the device thread was still in its section"
    );
    dev.join().expect("device thread");
}

/// A session whose unmap waits may send more requests: they are answered
/// in order, after the unmap's reply (which is sent only once the section
/// ended). This held before too (the service answered one request at a
/// time); it guards the order now that the reply is held back.
///
/// Seen failing: with the held session's socket still watched (a reverted
/// pause), the IOAS_ALLOC behind the unmap was answered first.
#[test]
fn test_requests_behind_a_pending_unmap_are_answered_in_order() {
    let w = World::new();
    let (owner, ioas) = w.owner();
    let (dev, left) = w.device_in_section();
    let sock = owner.socket();
    let unmap = Request::IoasUnmap {
        ioas_id: ioas,
        iova: IOVA,
        length: LEN,
    };
    send_packet(sock, &unmap.encode(100), &[]).expect("send unmap");
    send_packet(sock, &Request::IoasAlloc.encode(101), &[]).expect("send alloc");
    send_packet(sock, &Request::DeviceList.encode(102), &[]).expect("send list");
    let mut got = Vec::new();
    for op in [Opcode::IoasUnmap, Opcode::IoasAlloc, Opcode::DeviceList] {
        let p = recv_packet(sock).expect("recv").expect("a reply");
        let (h, r) = Reply::decode(&p.data, p.fds.len(), op).expect("reply");
        if op == Opcode::IoasUnmap {
            assert!(
                left.load(Ordering::SeqCst),
                "the unmap was answered while the section was open"
            );
            assert!(matches!(r, Reply::Ok { body: ReplyBody::U64(n), .. } if n == LEN));
        }
        got.push(h.request_id);
    }
    assert_eq!(got, vec![100, 101, 102]);
    dev.join().expect("device thread");
}

/// A session that hangs up while its unmap waits is closed at once (its
/// reply has nobody to go to); the unmap completes in the background.
///
/// Seen failing: on main at 83a3b49 the session was closed 0.95 s later,
/// after the section ended.
#[test]
fn test_session_gone_while_its_unmap_waits() {
    let w = World::new();
    let (owner, ioas) = w.owner();
    let sid = owner.session_id();
    let (dev, left) = w.device_in_section();
    let unmap = Request::IoasUnmap {
        ioas_id: ioas,
        iova: IOVA,
        length: LEN,
    };
    send_packet(owner.socket(), &unmap.encode(7), &[]).expect("send unmap");
    std::thread::sleep(Duration::from_millis(50));
    drop(owner);
    let t = Instant::now();
    while w.handle().session(sid).is_some() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let section_over = left.load(Ordering::SeqCst);
    assert!(w.handle().session(sid).is_none(), "session still open");
    assert!(
        !section_over,
        "the session was closed only after the section ended ({:?})",
        t.elapsed()
    );
    let mut other = Client::connect(&w.path).expect("another session");
    other.ioas_alloc().expect("served");
    dev.join().expect("device thread");
}
