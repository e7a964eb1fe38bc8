//! Invalidation delivery: unmaps complete on the hub once every device
//! thread that was inside an access section has left it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ioasis_service::uring::InvalidationHub;
use iommu_core::{HwInfo, Iommu, IommuDevice, Memory, Perm};

/// How long a device thread stays in its section while an unmap waits.
const SECTION: Duration = Duration::from_millis(50);

fn setup() -> (Iommu, IommuDevice, u32) {
    let iommu = Iommu::new();
    let dev = IommuDevice::new("d", HwInfo::default());
    let id = iommu.bind(&dev).expect("bind");
    let ioas = iommu.ioas_alloc().expect("ioas");
    let mem = Memory::anonymous("m", 0x4000).expect("mem");
    mem.write_at(0, b"hello").expect("write");
    iommu
        .ioas_map(ioas, &mem, 0, 0x4000, Some(0x10000), Perm::RW)
        .expect("map");
    iommu.attach(id, None, ioas).expect("attach");
    (iommu, dev, ioas)
}

/// Checked to fail ("unmap returned while a section was open") with
/// `complete` forgetting the ticket instead of waiting for it (dropping it
/// would wait: a ticket's drop completes it).
#[test]
fn test_unmap_completes_after_the_open_section_ends() {
    let (iommu, dev, ioas) = setup();
    let mut hub = InvalidationHub::new();
    let ended = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let e2 = ended.clone();
    let worker = std::thread::spawn(move || {
        let mut t = dev.translator();
        {
            let mut a = t.access();
            let mut buf = [0u8; 5];
            a.read(None, 0x10000, &mut buf).expect("read in section");
            assert_eq!(&buf, b"hello");
            tx.send(()).expect("signal");
            std::thread::sleep(SECTION);
            e2.store(true, Ordering::SeqCst);
        }
        // The cache was dropped: the unmapped page is gone.
        let mut buf = [0u8; 5];
        assert!(t.read(None, 0x10000, &mut buf).is_err());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("worker in section");
    let n = hub.unmap(&iommu, ioas, 0, u64::MAX).expect("unmap");
    assert!(
        ended.load(Ordering::SeqCst),
        "unmap returned while a section was open"
    );
    assert_eq!(n, 0x4000);
    worker.join().expect("worker");
    let st = hub.stats();
    assert_eq!(st.submitted, 1);
    assert_eq!(st.immediate, 0);
    assert!(st.nudges >= 1);
}

#[test]
fn test_idle_translators_need_no_wait() {
    let (iommu, dev, ioas) = setup();
    let mut hub = InvalidationHub::new();
    let mut t = dev.translator();
    let mut buf = [0u8; 5];
    t.read(None, 0x10000, &mut buf).expect("warm the cache");
    assert_eq!(
        hub.unmap(&iommu, ioas, 0x10000, 0x4000).expect("unmap"),
        0x4000
    );
    assert_eq!(hub.stats().immediate, 1);
    assert!(t.read(None, 0x10000, &mut buf).is_err());
}

#[test]
fn test_poll_now_reports_the_finished_operation() {
    let (iommu, dev, ioas) = setup();
    let mut hub = InvalidationHub::new();
    let mut t = dev.translator();
    let a = t.access();
    let (n, ticket) = iommu.ioas_unmap_begin(ioas, 0, u64::MAX).expect("begin");
    assert_eq!(n, 0x4000);
    let op = hub.submit(ticket).expect("must wait for the open section");
    assert_eq!(hub.poll_now(), Vec::<u64>::new());
    assert_eq!(hub.in_flight(), 1);
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = Vec::new();
    while done.is_empty() && Instant::now() < deadline {
        done.extend(hub.poll_now());
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(done, vec![op]);
    assert_eq!(hub.in_flight(), 0);
}
