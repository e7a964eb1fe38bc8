//! Concurrency stress test of the unmap-safety promise: device threads
//! translate and read through several devices while another thread maps,
//! unmaps (blocking and two-phase) and replaces.
//!
//! A slot is poisoned right after its unmap returns and stays poisoned
//! while unmapped; it is refilled with valid bytes before it is mapped
//! again. Device threads re-read the same slot several times inside one
//! access section, so a translation that outlived its unmap would read the
//! poison. Bounded by a deadline and by iteration caps.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iommu_core::*;

const P: u64 = PAGE_SIZE;
const SLOTS: u64 = 32;
const POISON: u8 = 0xde;
/// Hard time bound of the mapper loop (the test's duration).
const RUN_FOR: Duration = Duration::from_millis(2500);
/// The mapper stops after this many unmaps even before the deadline.
const MAX_UNMAPS: u64 = 400_000;
const MAX_ITERS: u64 = 20_000_000;
/// Reads of one slot inside one access section.
const READS_PER_SECTION: u64 = 16;

struct Space {
    ioas: IoasId,
    mem: Arc<Memory>,
    /// IOVA base; slot i lives at base + i * 2P (2 pages, so reads can cross
    /// a page boundary).
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

fn xorshift(r: &mut u64) -> u64 {
    *r ^= *r << 13;
    *r ^= *r >> 7;
    *r ^= *r << 17;
    *r
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
                if iters % 64 == 0 {
                    // Real device threads wait for work between sections.
                    std::thread::yield_now();
                }
                let r = xorshift(&mut rng);
                let base = bases[(r >> 60) as usize % bases.len()];
                let slot_iova = base + ((r >> 8) % SLOTS) * 2 * P;
                let mut a = t.access();
                for k in 0..READS_PER_SECTION {
                    // Straddle the page boundary every other read.
                    let off = if k % 2 == 0 {
                        P - 48
                    } else {
                        (xorshift(&mut rng) >> 20) % (P - 96)
                    };
                    match a.read(None, slot_iova + off, &mut buf) {
                        Ok(()) => {
                            reads_ok.fetch_add(1, Ordering::Relaxed);
                            if buf.contains(&POISON) {
                                poison_seen.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Err(Error::Unmapped { .. }) => {
                            reads_failed.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(e) => panic!("unexpected translation error {e}"),
                    }
                }
            }
        }));
    }

    // The mapper: unmap a mapped slot and poison it (every third unmap
    // two-phase); keep about a quarter of the slots unmapped and poisoned,
    // refilling and remapping the others; now and then replace d0 between
    // the spaces.
    let deadline = Instant::now() + RUN_FOR;
    let mut unmaps = 0u64;
    let mut replaces = 0u64;
    let mut round = 1u64;
    let mut rng = 12345u64;
    let d0 = devs[0].1;
    let mut d0_space = 0;
    let mut unmapped: Vec<(usize, u64)> = Vec::new();
    while Instant::now() < deadline && unmaps < MAX_UNMAPS {
        let r = xorshift(&mut rng);
        let si = (r >> 40) as usize % 2;
        let slot = (r >> 8) % SLOTS;
        if unmapped.contains(&(si, slot)) {
            continue;
        }
        let s = &spaces[si];
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
        unmapped.push((si, slot));
        if unmapped.len() as u64 > SLOTS / 2 {
            let k = (xorshift(&mut rng) % unmapped.len() as u64) as usize;
            let (si, slot) = unmapped.swap_remove(k);
            fill_valid(&spaces[si].mem, slot, round);
            round += 1;
            map_slot(&iommu, &spaces[si], slot);
        }
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
    let poisoned = poison_seen.load(Ordering::SeqCst);
    eprintln!(
        "stress: {unmaps} unmaps, {replaces} replaces, {ok} good reads, \
         {failed} unmapped reads, {poisoned} poisoned reads"
    );
    // Progress, not speed: both sides did some work.
    assert!(unmaps > 0, "the mapper made progress");
    assert!(ok > 0, "the devices made progress");
    assert_eq!(
        poisoned, 0,
        "a read used a translation after its unmap returned"
    );
}
