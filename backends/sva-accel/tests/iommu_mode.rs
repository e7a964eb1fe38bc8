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
    assert!(c.is_iommu_mode());
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
