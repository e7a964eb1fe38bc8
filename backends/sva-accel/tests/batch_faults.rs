//! Batches (fences, partial failures) and page faults (BOF=0, BOF=1, lazy
//! mapping, CPU fallback), through the daemon.

mod common;

use common::{pattern, Daemon};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use sva_accel::client::{ops, Buffer, Client, FaultAction, Options};
use sva_accel::desc::{flags, opcode, status, Descriptor};

fn rep(b: u8) -> u64 {
    u64::from_ne_bytes([b; 8])
}

#[test]
fn test_batch_success_and_member_records() {
    let d = Daemon::shared();
    let c = Client::connect(&d.socket).expect("connect");
    let src = c.alloc(64 * 100).expect("alloc");
    let dst = c.alloc(64 * 100).expect("alloc");
    let data = pattern(64 * 100, 5);
    src.write(0, &data);
    let mut b = c.batch(100).expect("batch");
    for i in 0..100 {
        b.mem_move(dst.at(64 * i), src.at(64 * i), 64);
    }
    let r = b.submit().expect("submit").wait().expect("wait");
    assert_eq!(
        (r.record.status, r.record.bytes_completed),
        (status::SUCCESS, 100)
    );
    assert!(
        r.members.iter().all(|m| m.status == 0),
        "no records on success"
    );
    assert_eq!(dst.to_vec(0, 64 * 100), data);
    // Reuse the builder; a single member is padded to a valid batch.
    b.clear();
    b.fill(dst.addr(), 0, 64);
    let r = b.submit().expect("submit").wait().expect("wait");
    assert_eq!(
        (r.record.status, r.record.bytes_completed),
        (status::SUCCESS, 2)
    );
}

#[test]
fn test_batch_partial_failure_and_fence() {
    let d = Daemon::shared();
    let c = Client::connect(&d.socket).expect("connect");
    let a = c.alloc(8192).expect("alloc");
    let mut b = c.batch(6).expect("batch");
    b.fill(a.addr(), 1, 64);
    b.mem_move(a.at(4096), a.addr(), 0); // fails: 0x13
    b.fill(a.at(128), 2, 64); // runs: no fence
    b.fence().fill(a.at(256), 3, 64); // abandoned
    b.fill(a.at(512), 4, 64); // abandoned
    let r = b.submit().expect("submit").wait().expect("wait");
    assert_eq!(
        (r.record.status, r.record.bytes_completed),
        (status::BATCH_FAIL, 3)
    );
    assert_eq!(r.members[1].status, status::XFER_ERANGE);
    assert_eq!(r.members[3].status, 0);
    assert_eq!(a.to_vec(128, 1), vec![2]);
    assert_eq!(a.to_vec(256, 1), vec![0], "fenced member abandoned");
    // A fence without earlier failure just orders.
    b.clear();
    b.fill(a.addr(), rep(7), 64)
        .fence()
        .mem_move(a.at(1024), a.addr(), 64);
    let r = b.submit().expect("submit").wait().expect("wait");
    assert_eq!(r.record.status, status::SUCCESS);
    assert_eq!(a.to_vec(1024, 64), vec![7u8; 64]);
    // Batch descriptor errors.
    let mut bd = Descriptor::new(opcode::BATCH, 0);
    bd.src = b.list_addr();
    bd.xfer_size = 1;
    assert_eq!(c.run(bd).expect("run").status, status::DESC_CNT_ERANGE);
    bd.xfer_size = c.info().max_batch + 1;
    assert_eq!(c.run(bd).expect("run").status, status::DESC_CNT_ERANGE);
    bd.xfer_size = 2;
    bd.src += 32;
    assert_eq!(c.run(bd).expect("run").status, status::DESCLIST_ALIGN);
}

#[test]
fn test_page_fault_bof0_partial_and_cpu_fallback() {
    let d = Daemon::shared();
    let c = Client::connect(&d.socket).expect("connect");
    let src = c.alloc(8192).expect("alloc");
    let lazy = c.alloc_lazy(8192).expect("lazy");
    let data = pattern(8192, 8);
    src.write(0, &data);
    let cr = c.mem_move(lazy.addr(), src.addr(), 8192).expect("run");
    assert_eq!(cr.status, status::PAGE_FAULT_NOBOF | status::WRITE);
    assert_eq!((cr.fault_addr, cr.bytes_completed), (lazy.addr(), 0));
    // Read fault: no write bit; bytes completed up to the fault.
    let half = c.alloc_lazy(4096).expect("lazy");
    let cr = c.crc(half.addr(), 100, 0).expect("run");
    assert_eq!(cr.status, status::PAGE_FAULT_NOBOF);
    drop(c);

    // With the CPU fallback the library finishes the copy itself.
    let c = Client::connect_with(
        &d.socket,
        Options {
            cpu_fallback: true,
            ..Options::default()
        },
    )
    .expect("connect");
    let src = c.alloc(8192).expect("alloc");
    let lazy = c.alloc_lazy(8192).expect("lazy");
    src.write(0, &data);
    let cr = c.mem_move(lazy.addr(), src.addr(), 8192).expect("run");
    assert_eq!(cr.status, status::SUCCESS);
    assert_eq!(lazy.to_vec(0, 8192), data);
    assert_eq!(c.stats().cpu_fallbacks.load(Ordering::Relaxed), 1);
    let cr = c.crc(lazy.addr(), 8192, 0).expect("run");
    assert_eq!(
        (cr.status, cr.crc_val()),
        (status::SUCCESS, sva_accel::crc::crc32c(0, &data))
    );
}

#[test]
fn test_page_fault_bof1_lazy_mapping_by_handler() {
    let d = Daemon::shared();
    let slot: Arc<Mutex<Vec<Arc<Buffer>>>> = Arc::default();
    let seen = Arc::new(AtomicUsize::new(0));
    let (s2, seen2) = (slot.clone(), seen.clone());
    let c = Client::connect_with(
        &d.socket,
        Options {
            block_on_fault: true,
            fault_handler: Some(Box::new(move |f| {
                seen2.fetch_add(1, Ordering::SeqCst);
                let bufs = s2.lock().expect("lock");
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
    )
    .expect("connect");
    let src = c.alloc(64 * 1024).expect("alloc");
    let lazy = Arc::new(c.alloc_lazy(64 * 1024).expect("lazy"));
    slot.lock().expect("lock").push(lazy.clone());
    let data = pattern(64 * 1024, 4);
    src.write(0, &data);
    let cr = c.mem_move(lazy.addr(), src.addr(), 64 * 1024).expect("run");
    assert_eq!(cr.status, status::SUCCESS);
    assert_eq!(lazy.to_vec(0, 64 * 1024), data);
    // One fault group (iommu-core reports the pages of the missed run, one
    // record each), answered Retry once.
    assert_eq!(c.stats().faults_retried.load(Ordering::Relaxed), 1);
    let records = c.stats().faults.load(Ordering::Relaxed);
    assert!((1..=16).contains(&records), "{records} fault records");
    assert_eq!(seen.load(Ordering::SeqCst) as u64, records);
    assert!(lazy.is_registered());
    // A fault the handler cannot resolve: INVALID, status 0x04 with progress.
    let cr = c.mem_move(lazy.at(60 * 1024), 0x1000, 4096).expect("run");
    assert_eq!(cr.status, status::PAGE_FAULT_IR);
    assert_eq!((cr.fault_addr, cr.bytes_completed), (0x1000, 0));
    assert_eq!(c.stats().faults.load(Ordering::Relaxed), records + 1);
    assert_eq!(c.stats().faults_retried.load(Ordering::Relaxed), 1);
    // A batch member blocked on fault resumes inside the batch.
    let lazy2 = Arc::new(c.alloc_lazy(4096).expect("lazy"));
    slot.lock().expect("lock").push(lazy2.clone());
    let mut b = c.batch(3).expect("batch");
    b.fill(src.addr(), 1, 64)
        .fill(lazy2.addr(), rep(9), 4096)
        .fill(src.at(64), 2, 64);
    let r = b.submit().expect("submit").wait().expect("wait");
    assert_eq!(
        (r.record.status, r.record.bytes_completed),
        (status::SUCCESS, 3)
    );
    assert!(
        lazy2.to_vec(0, 4096) == vec![9u8; 4096],
        "lazily mapped fill"
    );
}

#[test]
fn test_bof1_without_handler_completes_invalid() {
    let d = Daemon::shared();
    let c = Client::connect(&d.socket).expect("connect");
    // Two pages, only the first one reachable by the device.
    let a = c.alloc_lazy(8192).expect("alloc");
    a.register_prefix(4096).expect("register");
    let mut desc = ops::fill(a.at(4000), 5, 200);
    desc.flags |= flags::BOF;
    let cr = c.run(desc).expect("run");
    assert_eq!(cr.status, status::PAGE_FAULT_IR | status::WRITE);
    assert_eq!((cr.bytes_completed, cr.fault_addr), (96, a.at(4096)));
}

#[test]
fn test_batch_list_fault_partial_batch() {
    let d = Daemon::shared();
    let c = Client::connect(&d.socket).expect("connect");
    let list = c.alloc_lazy(8192).expect("alloc");
    list.register_prefix(4096).expect("register");
    let a = c.alloc(4096).expect("alloc");
    // Two members, the second one beyond the end of the list's mapping.
    let mut m = ops::fill(a.addr(), 1, 64);
    m.flags |= flags::CRAV;
    m.completion_addr = a.at(1024);
    list.write(4096 - 64, &m.to_bytes());
    let mut bd = Descriptor::new(opcode::BATCH, 0);
    bd.src = list.at(4096 - 64);
    bd.xfer_size = 2;
    let cr = c.run(bd).expect("run");
    assert_eq!(
        (cr.status, cr.bytes_completed),
        (status::BATCH_PAGE_FAULT, 1)
    );
    assert_eq!(cr.fault_addr, list.at(4096));
}
