//! Clients whose IOAS and PASID come from the daemon's /dev/iommu service:
//! every device access is translated by iommu-core for (device, PASID).

mod common;

use common::{pattern, Daemon};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use sva_accel::client::{ops, Buffer, Client, ClientError, FaultAction, Options};
use sva_accel::desc::{flags, status};
use sva_accel::device::DEFAULT_LABEL;

fn connect(d: &Daemon, opts: Options) -> Client {
    Client::connect_iommu(&d.socket, d.iommu_socket(), DEFAULT_LABEL, opts)
        .expect("connect via service")
}

#[test]
fn test_iommu_mode_operations() {
    let d = Daemon::shared();
    let c = connect(&d, Options::default());
    let src = c.alloc(1 << 20).expect("alloc");
    let dst = c.alloc(1 << 20).expect("alloc");
    let data = pattern(1 << 20, 3);
    src.write(0, &data);
    let cr = c.mem_move(dst.addr(), src.addr(), 1 << 20).expect("run");
    assert_eq!(cr.status, status::SUCCESS);
    assert!(dst.to_vec(0, 1 << 20) == data, "copied through iommu-core");
    let cr = c.crc(src.addr(), 1 << 20, 0).expect("crc");
    assert_eq!(cr.crc_val(), sva_accel::crc::crc32c(0, &data));
    let mut b = c.batch(16).expect("batch");
    for i in 0..16 {
        b.mem_move(dst.at(64 * i), src.at(4096 + 64 * i), 64);
    }
    let r = b.submit().expect("submit").wait().expect("wait");
    assert_eq!(
        (r.record.status, r.record.bytes_completed),
        (status::SUCCESS, 16)
    );
    assert_eq!(dst.to_vec(0, 1024), data[4096..4096 + 1024].to_vec());
    // Unmapped through the service: the device no longer reaches it.
    dst.unregister().expect("unmap");
    let cr = c.mem_move(dst.addr(), src.addr(), 64).expect("run");
    assert_eq!(cr.status, status::PAGE_FAULT_NOBOF | status::WRITE);
    assert_eq!(cr.fault_addr, dst.addr());
}

#[test]
fn test_iommu_mode_block_on_fault_lazy_mapping() {
    let d = Daemon::shared();
    let lazy_bufs: Arc<Mutex<Vec<Arc<Buffer>>>> = Arc::default();
    let l2 = lazy_bufs.clone();
    let c = connect(
        &d,
        Options {
            block_on_fault: true,
            fault_handler: Some(Box::new(move |f| {
                let bufs = l2.lock().expect("lock");
                match bufs
                    .iter()
                    .find(|b| f.addr >= b.addr() && f.addr < b.addr() + b.len() as u64)
                {
                    Some(b) if b.register().is_ok() => FaultAction::Retry,
                    _ => FaultAction::Fail,
                }
            })),
            ..Options::default()
        },
    );
    let src = c.alloc(65536).expect("alloc");
    let lazy = Arc::new(c.alloc_lazy(65536).expect("lazy"));
    lazy_bufs.lock().expect("lock").push(lazy.clone());
    let data = pattern(65536, 7);
    src.write(0, &data);
    let cr = c.mem_move(lazy.addr(), src.addr(), 65536).expect("run");
    assert_eq!(cr.status, status::SUCCESS);
    assert!(lazy.to_vec(0, 65536) == data, "lazily mapped copy");
    assert_eq!(c.stats().faults_retried.load(Ordering::Relaxed), 1);
    // The handler cannot resolve this one: Invalid, 0x04.
    let cr = c.mem_move(src.addr(), 0x5000_0000, 64).expect("run");
    assert_eq!(
        (cr.status, cr.fault_addr),
        (status::PAGE_FAULT_IR, 0x5000_0000)
    );
}

#[test]
fn test_iommu_mode_isolation() {
    let d = Daemon::shared();
    let victim = connect(&d, Options::default());
    let attacker = connect(&d, Options::default());
    assert_ne!(victim.pasid(), attacker.pasid());
    let secret = victim.alloc(4096).expect("alloc");
    secret.write(0, &[0x77; 4096]);
    let loot = attacker.alloc(4096).expect("alloc");
    let cr = attacker
        .mem_move(loot.addr(), secret.addr(), 4096)
        .expect("run");
    assert_eq!(cr.code(), status::PAGE_FAULT_NOBOF);
    let mut forged = ops::fill(secret.addr(), 0, 64);
    forged.pasid = victim.pasid();
    forged.flags |= flags::BOF;
    assert_eq!(
        attacker.run(forged).expect("run").code(),
        status::PAGE_FAULT_IR
    );
    // A completion record aimed at the victim: not written, an event instead.
    let mut cr_elsewhere = ops::fill(loot.addr(), 0, 64);
    cr_elsewhere.flags |= flags::CRAV | flags::RCR;
    cr_elsewhere.completion_addr = secret.addr();
    attacker.submit_raw(&[cr_elsewhere]).expect("submit");
    assert_eq!(attacker.drain().expect("drain").status, status::SUCCESS);
    let mut events = Vec::new();
    common::eventually("an event", || {
        events.extend(attacker.events());
        !events.is_empty()
    });
    assert_eq!(
        (events[0].code, events[0].cr_addr),
        (status::CRA_XLAT, secret.addr())
    );
    assert_eq!(secret.to_vec(0, 4096), vec![0x77; 4096]);
    // Binding somebody else's PASID with another session is refused.
    let svc = ioasis::service::Client::connect(d.iommu_socket()).expect("session");
    match Client::connect_with_session(&d.socket, svc, 1, victim.pasid(), None, Options::default())
    {
        Err(ClientError::Refused { errno, .. }) => assert_eq!(errno, libc::EPERM),
        other => panic!("stolen PASID accepted: {other:?}"),
    }
    // The daemon's device-side map refuses iommu-mode clients' requests
    // implicitly: their memory only exists in their IOAS.
    assert_eq!(
        victim
            .mem_move(secret.addr(), secret.addr(), 64)
            .expect("run")
            .status,
        status::SUCCESS
    );
}

#[test]
fn test_session_shared_ioas_with_plain_iovas() {
    use ioasis::service::{sealed_memfd, HwptRequest, MapPerm};
    use std::os::fd::AsFd;
    let d = Daemon::shared();
    // The driver sets up the IOAS itself, as the owner of several devices
    // would, and maps a memfd at an IOVA that is not a pointer.
    let mut svc = ioasis::service::Client::connect(d.iommu_socket()).expect("session");
    let ioas = svc.ioas_alloc().expect("ioas");
    let mem = sealed_memfd("frames", 1 << 16).expect("memfd");
    let iova = 0x4000_0000u64;
    svc.ioas_map(
        ioas,
        mem.as_fd(),
        0,
        1 << 16,
        Some(iova),
        MapPerm::ReadWrite,
    )
    .expect("map");
    let pasid = svc.pasid_alloc(DEFAULT_LABEL).expect("pasid");
    let (fault_id, channel) = svc.fault_queue_alloc().expect("fault queue");
    let hwpt = svc
        .hwpt_alloc(&HwptRequest {
            label: DEFAULT_LABEL.into(),
            pt_id: ioas,
            flags: ioasis::service::IOMMU_HWPT_ALLOC_PASID,
            fault_id: Some(fault_id),
            ..HwptRequest::default()
        })
        .expect("hwpt");
    svc.attach(DEFAULT_LABEL, Some(pasid), hwpt)
        .expect("attach");
    let c = Client::connect_with_session(
        &d.socket,
        svc,
        ioas,
        pasid,
        Some(channel),
        Options::default(),
    )
    .expect("bind");
    assert_eq!((c.pasid(), c.ioas()), (pasid, ioas));
    // Fill and checksum at plain IOVAs; the record lands in the library's
    // pool (mapped at its pointer in the same IOAS).
    assert_eq!(
        c.fill(iova, 0x0202_0202_0202_0202, 4096)
            .expect("fill")
            .status,
        status::SUCCESS
    );
    let cr = c.crc(iova, 4096, 0).expect("crc");
    assert_eq!(cr.crc_val(), sva_accel::crc::crc32c(0, &[2u8; 4096]));
    // Unmapping through the same session: the device faults afterwards.
    let n = c
        .with_service(|s| s.ioas_unmap(ioas, iova, 1 << 16))
        .expect("iommu mode")
        .expect("unmap");
    assert_eq!(n, 1 << 16);
    assert_eq!(
        c.fill(iova, 0, 64).expect("fill").code(),
        status::PAGE_FAULT_NOBOF
    );
}

#[test]
fn test_released_pasid_is_unbound_before_reuse() {
    let d = Daemon::shared();
    let a = connect(&d, Options::default());
    let pasid = a.pasid();
    let abuf = a.alloc(4096).expect("alloc");
    assert_eq!(
        a.fill(abuf.addr(), 0, 64).expect("fill").status,
        status::SUCCESS
    );
    // A gives its PASID back while staying connected to the device.
    a.with_service(|s| s.pasid_free(DEFAULT_LABEL, pasid))
        .expect("iommu mode")
        .expect("pasid free");
    // B reserves PASIDs until it holds the same number (bounded).
    let mut svc = ioasis::service::Client::connect(d.iommu_socket()).expect("session");
    let mut got = None;
    for _ in 0..64 {
        let p = svc.pasid_alloc(DEFAULT_LABEL).expect("pasid");
        if p == pasid {
            got = Some(p);
            break;
        }
    }
    let Some(p) = got else {
        ioasis_test_skip::skip(format!(
            "PASID {pasid} not handed out again in 64 allocations; reuse not exercised"
        ));
        return;
    };
    let (fault_id, channel) = svc.fault_queue_alloc().expect("fault queue");
    let ioas = svc.ioas_alloc().expect("ioas");
    let hwpt = svc
        .hwpt_alloc(&ioasis::service::HwptRequest {
            label: DEFAULT_LABEL.into(),
            pt_id: ioas,
            flags: ioasis::service::IOMMU_HWPT_ALLOC_PASID,
            fault_id: Some(fault_id),
            ..Default::default()
        })
        .expect("hwpt");
    svc.attach(DEFAULT_LABEL, Some(p), hwpt).expect("attach");
    // B's memory, at an IOVA of B's IOAS that A knows.
    let mem = ioasis::service::sealed_memfd("b-secret", 4096).expect("memfd");
    let view =
        sva_accel::shm::SharedMap::map(std::os::fd::AsFd::as_fd(&mem), 0, 4096, true).expect("map");
    view.write(0, &[0x55; 4096]);
    let iova = 0x6000_0000u64;
    svc.ioas_map(
        ioas,
        std::os::fd::AsFd::as_fd(&mem),
        0,
        4096,
        Some(iova),
        ioasis::service::MapPerm::ReadWrite,
    )
    .expect("ioas map");
    // A aims at it through its old binding: nothing translates for A any
    // more, although PASID p now leads to B's IOAS.
    let mut attack = ops::fill(iova, 0, 4096);
    attack.flags |= flags::CRAV | flags::RCR;
    attack.completion_addr = abuf.at(2048);
    a.submit_raw(&[attack]).expect("submit");
    let mut events = Vec::new();
    common::eventually("an event for the unbound client", || {
        events.extend(a.events());
        !events.is_empty()
    });
    assert_eq!(events[0].code, status::CRA_XLAT);
    let mut got_back = vec![0u8; 4096];
    view.read(0, &mut got_back);
    assert!(got_back == vec![0x55; 4096], "B's memory untouched");
    // And B can bind the PASID at the device.
    let b =
        Client::connect_with_session(&d.socket, svc, ioas, p, Some(channel), Options::default())
            .expect("B binds the reused PASID");
    assert_eq!(b.fill(iova, 0, 64).expect("fill").status, status::SUCCESS);
}
