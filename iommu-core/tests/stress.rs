//! Concurrency stress test of the unmap-safety promise: device threads
//! translate and read through several devices while another thread maps,
//! unmaps (blocking and two-phase) and replaces. A page is poisoned right
//! after its unmap returns and refilled before it is mapped again, so a
//! read that ever sees the poison byte used a translation that outlived its
//! unmap. Bounded by a deadline and an iteration cap.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iommu_core::*;

const P: u64 = PAGE_SIZE;
const SLOTS: u64 = 32;
const POISON: u8 = 0xde;
const RUN_FOR: Duration = Duration::from_millis(2500);
const MAX_ITERS: u64 = 20_000_000;

struct Space {
    ioas: IoasId,
    mem: Arc<Memory>,
    /// IOVA base; slot i lives at base + i * 2P (2 pages, so multi-page
    /// reads cross a page boundary).
    base: u64,
}

fn fill_valid(m: &Memory, slot: u64, round: u64) {
    let v = (round % 200) as u8 + 1; // never POISON (0xde = 222 > 200)
    m.fill((slot * 2 * P) as usize, (2 * P) as usize, v)
        .unwrap();
}

fn map_slot(iommu: &Iommu, s: &Space, slot: u64) {
    iommu
        .ioas_map(
            s.ioas,
            &s.mem,
            slot * 2 * P,
            2 * P,
            Some(s.base + slot * 2 * P),
            Perm::RW,
        )
        .unwrap();
}

#[test]
fn test_stress_no_access_after_unmap() {
    let iommu = Iommu::new();
    let spaces: Vec<Arc<Space>> = (0..2)
        .map(|i| {
            let s = Space {
                ioas: iommu.ioas_alloc().unwrap(),
                mem: Memory::anonymous("stress", (SLOTS * 2 * P) as usize).unwrap(),
                base: 0x10_0000 * (i + 1),
            };
            for slot in 0..SLOTS {
                fill_valid(&s.mem, slot, 0);
                map_slot(&iommu, &s, slot);
            }
            Arc::new(s)
        })
        .collect();
    // Four devices: d0 is replaced between the two spaces, d1/d2 use space
    // 0, d3 space 1.
    let devs: Vec<(Device, DevId)> = (0..4)
        .map(|i| {
            let d = Device::new(format!("stress{i}"), HwInfo::default());
            let id = iommu.bind(&d).unwrap();
            (d, id)
        })
        .collect();
    for (i, (_, id)) in devs.iter().enumerate() {
        let sp = if i == 3 { 1 } else { 0 };
        iommu.attach(*id, None, spaces[sp].ioas).unwrap();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let poison_seen = Arc::new(AtomicU64::new(0));
    let reads_ok = Arc::new(AtomicU64::new(0));
    let reads_failed = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for (i, (dev, _)) in devs.iter().enumerate() {
        let dev = dev.clone();
        let stop = stop.clone();
        let poison_seen = poison_seen.clone();
        let reads_ok = reads_ok.clone();
        let reads_failed = reads_failed.clone();
        let bases: Vec<u64> = spaces.iter().map(|s| s.base).collect();
        handles.push(std::thread::spawn(move || {
            let mut t = dev.translator();
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
            let mut buf = [0u8; 96];
            let mut iters = 0u64;
            while !stop.load(Ordering::Relaxed) && iters < MAX_ITERS {
                iters += 1;
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let base = bases[(rng >> 60) as usize % bases.len()];
                let slot = (rng >> 8) % SLOTS;
                // Straddle the page boundary inside the slot half the time.
                let off = if rng & 1 == 0 {
                    P - 48
                } else {
                    (rng >> 20) % (P - 96)
                };
                let iova = base + slot * 2 * P + off;
                // Several reads inside one access section, to keep sections
                // open across the mapper's unmaps.
                let mut a = t.access();
                for k in 0..4u64 {
                    match a.read(None, iova + k * 8, &mut buf) {
                        Ok(()) => {
                            reads_ok.fetch_add(1, Ordering::Relaxed);
                            if buf.contains(&POISON) {
                                poison_seen.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Err(Error::Unmapped { .. }) => {
                            reads_failed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("unexpected translation error {e}"),
                    }
                }
            }
        }));
    }

    // The mapper: unmap a slot, poison it, refill, remap; now and then
    // replace d0 between the spaces; every third unmap two-phase.
    let deadline = Instant::now() + RUN_FOR;
    let mut unmaps = 0u64;
    let mut replaces = 0u64;
    let mut round = 1u64;
    let mut rng = 12345u64;
    let d0 = devs[0].1;
    let mut d0_space = 0;
    while Instant::now() < deadline && unmaps < 2_000_000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let s = &spaces[(rng >> 40) as usize % 2];
        let slot = (rng >> 8) % SLOTS;
        let iova = s.base + slot * 2 * P;
        if unmaps % 3 == 0 {
            let (n, mut ticket) = iommu.ioas_unmap_begin(s.ioas, iova, 2 * P).unwrap();
            assert_eq!(n, 2 * P);
            let mut polls = 0;
            while !ticket.is_done() {
                polls += 1;
                ticket.nudge();
                if polls > 16 {
                    assert!(ticket.wait_timeout(Duration::from_secs(10)));
                    break;
                }
                std::thread::yield_now();
            }
        } else {
            assert_eq!(iommu.ioas_unmap(s.ioas, iova, 2 * P), Ok(2 * P));
        }
        unmaps += 1;
        s.mem
            .fill((slot * 2 * P) as usize, (2 * P) as usize, POISON)
            .unwrap();
        fill_valid(&s.mem, slot, round);
        round += 1;
        map_slot(&iommu, s, slot);
        if unmaps % 64 == 0 {
            d0_space = 1 - d0_space;
            iommu.replace(d0, None, spaces[d0_space].ioas).unwrap();
            replaces += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        h.join().unwrap();
    }
    let ok = reads_ok.load(Ordering::SeqCst);
    let failed = reads_failed.load(Ordering::SeqCst);
    eprintln!(
        "stress: {unmaps} unmaps, {replaces} replaces, {ok} good reads, {failed} unmapped reads"
    );
    assert!(unmaps > 100, "the mapper made progress");
    assert!(ok > 1000, "the devices made progress");
    assert_eq!(poison_seen.load(Ordering::SeqCst), 0, "a read saw poison");
}
