//! A client whose work is long cannot stall the others: the device runs
//! one bounded unit of a client's work (at most `WORK_UNIT` bytes) before
//! it looks at other clients' work and at waiting unmaps.

mod common;

use common::{pattern, Daemon};
use std::time::{Duration, Instant};
use sva_accel::client::{ops, Client};
use sva_accel::desc::{flags, opcode, status, CompletionRecord, Descriptor, CR_SIZE, DESC_SIZE};

/// Bytes each CRC of the hostile batch covers.
const CRC_LEN: usize = 64 << 20;
/// Members of the hostile batch.
const MEMBERS: usize = 8;
/// The other client's NOOP and unmap must each take less than this while
/// the hostile batch runs (generous: one unit of work takes about a
/// millisecond).
const BOUND: Duration = Duration::from_millis(100);

fn record_at(buf: &sva_accel::client::Buffer, off: usize) -> CompletionRecord {
    let mut b = [0u8; CR_SIZE];
    buf.read(off, &mut b);
    CompletionRecord::from_bytes(&b)
}

/// Client A submits one batch of `MEMBERS` CRCs of 64 MiB (512 MiB of
/// work, seconds on one worker of a debug build). While it runs, client B's NOOP and B's unmap of
/// a buffer each complete within [`BOUND`], and A's batch still completes
/// with every member's CRC right.
///
/// Seen failing before the device split work into units (this test run
/// against the parent commit): B's NOOP waited for the whole batch and so
/// did its unmap (`NOOP 2.04s, unmap 2.04s`, debug build, one worker: the
/// service waits for the worker's access section, which lasted the
/// batch). After: NOOP 1.6-3.3 ms, unmap 3.8-4.4 ms.
#[test]
fn test_long_batch_does_not_stall_other_clients() {
    let d = Daemon::start(&["--workers", "1"]);
    let a = Client::connect(&d.socket).expect("connect A");
    let b = Client::connect(&d.socket).expect("connect B");
    let data = a.alloc(CRC_LEN).expect("alloc");
    let contents = pattern(CRC_LEN, 7);
    data.write(0, &contents);
    let want = sva_accel::crc::crc32c(0, &contents);
    // The batch: members with a record each (RCR), so progress shows.
    let list = a.alloc(MEMBERS * DESC_SIZE).expect("alloc");
    let crs = a.alloc(MEMBERS * CR_SIZE).expect("alloc");
    for i in 0..MEMBERS {
        let mut m = ops::crc(data.addr(), CRC_LEN as u32, 0);
        m.flags |= flags::CRAV | flags::RCR;
        m.completion_addr = crs.at(i * CR_SIZE);
        list.write(i * DESC_SIZE, &m.to_bytes());
    }
    let mut batch = Descriptor::new(opcode::BATCH, 0);
    batch.src = list.addr();
    batch.xfer_size = MEMBERS as u32;
    let bb = b.alloc(1 << 20).expect("alloc");
    let h = a.submit(batch).expect("submit batch");
    // The batch is running once its first member has completed.
    let start = Instant::now();
    while record_at(&crs, 0).status == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "batch never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // B's NOOP and B's unmap, at the same time.
    let (noop, unmap) = std::thread::scope(|sc| {
        let noop = sc.spawn(|| {
            let t = Instant::now();
            let cr = b.run(Descriptor::new(opcode::NOOP, 0)).expect("noop");
            assert_eq!(cr.status, status::SUCCESS);
            t.elapsed()
        });
        let unmap = sc.spawn(|| {
            let t = Instant::now();
            bb.unregister().expect("unmap");
            t.elapsed()
        });
        (
            noop.join().expect("noop thread"),
            unmap.join().expect("unmap thread"),
        )
    });
    let running = h.poll().is_none();
    eprintln!("NOOP {noop:?}, unmap {unmap:?}, batch still running: {running}");
    assert!(
        noop < BOUND,
        "NOOP took {noop:?} behind another client's batch"
    );
    assert!(
        unmap < BOUND,
        "unmap took {unmap:?} behind another client's batch"
    );
    assert!(
        running,
        "premise: the batch ran for the whole measurement (it completed first)"
    );
    // A's batch completes, every member with the right CRC.
    let cr = h.wait().expect("batch");
    assert_eq!(cr.status, status::SUCCESS);
    assert_eq!(cr.bytes_completed, MEMBERS as u32);
    for i in 0..MEMBERS {
        let m = record_at(&crs, i * CR_SIZE);
        assert_eq!(m.status, status::SUCCESS, "member {i}");
        assert_eq!(m.bytes_completed, CRC_LEN as u32, "member {i}");
        assert_eq!(m.crc_val(), want, "member {i}");
    }
}
