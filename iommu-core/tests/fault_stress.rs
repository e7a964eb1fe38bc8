//! Concurrency test of the fault path: device threads fault on a
//! fault-capable HWPT, a handler thread reads groups in batches, maps the
//! pages and answers, while a third thread unmaps pages and replaces the
//! device's attachment (which answers outstanding groups INVALID). Checks
//! that every raised group is answered, that nothing deadlocks, and that
//! the per-device bound holds. Bounded by a deadline and iteration caps.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iommu_core::*;

const P: u64 = PAGE_SIZE;
const PAGES: u64 = 64;
const RUN_FOR: Duration = Duration::from_millis(1500);
/// Liveness bound for one fault answer (never reached when healthy).
const ANSWER_BOUND: Duration = Duration::from_secs(20);

#[test]
fn test_fault_storm() {
    let iommu = Iommu::new();
    let ioas = iommu.ioas_alloc().unwrap();
    let mem = Memory::anonymous("faults", (PAGES * P) as usize).unwrap();
    let devs: Vec<(IommuDevice, DevId)> = (0..2)
        .map(|i| {
            let d = IommuDevice::new(format!("iopf{i}"), HwInfo::full());
            let id = iommu.bind(&d).unwrap();
            (d, id)
        })
        .collect();
    let (fid, q) = iommu.fault_queue_alloc().unwrap();
    let mk_hwpt = || {
        iommu
            .hwpt_alloc(&HwptAlloc {
                dev_id: devs[0].1,
                pt_id: ioas,
                fault_id: Some(fid),
                ..Default::default()
            })
            .unwrap()
    };
    let hwpts = [mk_hwpt(), mk_hwpt()];
    for (_, id) in &devs {
        iommu.attach(*id, None, hwpts[0]).unwrap();
    }
    // Pages are mapped by the handler and unmapped by the churn thread;
    // this lock orders their view of which pages are mapped.
    let mapped = Arc::new(Mutex::new(vec![false; PAGES as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    // The handler keeps answering until every device thread has ended, so
    // a fault raised just before `stop` is still answered.
    let handler_stop = Arc::new(AtomicBool::new(false));
    let raised = Arc::new(AtomicU64::new(0));
    let answered_ok = Arc::new(AtomicU64::new(0));
    let answered_invalid = Arc::new(AtomicU64::new(0));
    let overflows = Arc::new(AtomicU64::new(0));

    let mut threads = Vec::new();
    for (i, (dev, _)) in devs.iter().enumerate() {
        let dev = dev.clone();
        let stop = stop.clone();
        let (raised, ok, inv, ovf) = (
            raised.clone(),
            answered_ok.clone(),
            answered_invalid.clone(),
            overflows.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut t = dev.translator();
            let mut rng = 0x51u64 + i as u64;
            let mut buf = [0u8; 64];
            let mut iters = 0u64;
            while !stop.load(Ordering::Relaxed) && iters < 2_000_000 {
                iters += 1;
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let iova = (rng % PAGES) * P + (rng >> 32) % (P - 64);
                match t.read(None, iova, &mut buf) {
                    Ok(()) => {}
                    Err(Error::FaultRaised { pending, .. }) => {
                        raised.fetch_add(1, Ordering::Relaxed);
                        match pending.wait_timeout(ANSWER_BOUND) {
                            FaultStatus::Success => ok.fetch_add(1, Ordering::Relaxed),
                            FaultStatus::Invalid => inv.fetch_add(1, Ordering::Relaxed),
                            FaultStatus::Pending => panic!("fault never answered"),
                        };
                    }
                    Err(Error::FaultOverflow { .. }) => {
                        ovf.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
                assert!(dev.outstanding_faults() <= MAX_OUTSTANDING_FAULTS_PER_DEVICE);
            }
        }));
    }

    // Handler: read batches, map what is missing, answer SUCCESS.
    {
        let (iommu, q, mem, mapped, stop) = (
            iommu.clone(),
            q.clone(),
            mem.clone(),
            mapped.clone(),
            handler_stop.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut recs = Vec::new();
            let mut responses = Vec::new();
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) && rounds < 10_000_000 {
                rounds += 1;
                recs.clear();
                let n = q.read_batch(&mut recs, 64).unwrap();
                if n == 0 {
                    std::thread::yield_now();
                    continue;
                }
                responses.clear();
                for r in &recs {
                    let page = r.addr / P;
                    {
                        let mut m = mapped.lock().unwrap();
                        if !m[page as usize] {
                            iommu
                                .ioas_map(ioas, &mem, page * P, P, Some(page * P), Perm::RW)
                                .unwrap();
                            m[page as usize] = true;
                        }
                    }
                    if r.flags & IOMMU_PGFAULT_FLAGS_LAST_PAGE != 0 {
                        responses.push(PageResponse {
                            cookie: r.cookie,
                            code: PageResponseCode::Success,
                        });
                    }
                }
                // A group may have been auto-answered by a replace since it
                // was read: its cookie is then unknown. Answer the rest.
                for r in &responses {
                    match q.respond(r.cookie, r.code) {
                        Ok(()) | Err(Error::UnknownCookie { .. }) => {}
                        Err(e) => panic!("respond failed: {e}"),
                    }
                }
            }
        }));
    }

    // Churn: unmap random pages, replace device 0 between the two HWPTs.
    let deadline = Instant::now() + RUN_FOR;
    let mut rng = 99u64;
    let mut unmaps = 0u64;
    let mut replaces = 0u64;
    let mut cur = 0;
    while Instant::now() < deadline && unmaps < 1_000_000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let page = rng % PAGES;
        {
            let mut m = mapped.lock().unwrap();
            if m[page as usize] {
                assert_eq!(iommu.ioas_unmap(ioas, page * P, P), Ok(P));
                m[page as usize] = false;
                unmaps += 1;
            }
        }
        if rng % 97 == 0 {
            cur = 1 - cur;
            iommu.replace(devs[0].1, None, hwpts[cur]).unwrap();
            replaces += 1;
        }
        std::thread::yield_now();
    }
    stop.store(true, Ordering::SeqCst);
    // The handler was pushed last: join the device threads first, while it
    // still answers, then stop it.
    let handler = threads.pop().unwrap();
    for t in threads {
        t.join().unwrap();
    }
    handler_stop.store(true, Ordering::SeqCst);
    handler.join().unwrap();
    // Whatever is still queued is answered when the devices detach.
    for (_, id) in &devs {
        iommu.detach(*id, None).unwrap();
    }
    let r = raised.load(Ordering::SeqCst);
    let ok = answered_ok.load(Ordering::SeqCst);
    let inv = answered_invalid.load(Ordering::SeqCst);
    eprintln!(
        "fault storm: {r} faults, {ok} success, {inv} invalid, {} overflows, {unmaps} unmaps, {replaces} replaces, stats {:?}",
        overflows.load(Ordering::SeqCst),
        q.stats()
    );
    assert!(r > 0, "faults were raised");
    assert_eq!(r, ok + inv, "every fault a device waited on was answered");
    for (d, _) in &devs {
        assert_eq!(d.outstanding_faults(), 0);
    }
    let s = q.stats();
    assert_eq!(s.raised, s.answered);
}
