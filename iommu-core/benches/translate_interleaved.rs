//! Warm translate vs a BTreeMap range lookup, measured interleaved: each
//! round times both over the same 64 addresses and the minimum over all
//! rounds is kept, which is robust on a shared, noisy machine.
//! Then the aligned-buffers pattern: a source and a destination buffer a
//! power-of-two distance apart (1 MiB, 64 MiB), translated alternately as a
//! memmove engine does, page by page.
//! `cargo bench -p iommu-core --bench translate_interleaved`; without
//! `--bench` (as under `cargo test`) it runs a few rounds only.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use iommu_core::*;

const P: u64 = PAGE_SIZE;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rounds = if full { 2000 } else { 3 };
    for areas in [1024u64, 100_000] {
        let iommu = Iommu::new();
        let dev = IommuDevice::new("bench", HwInfo::default());
        let dev_id = iommu.bind(&dev).unwrap();
        let ioas = iommu.ioas_alloc().unwrap();
        let mem = Memory::anonymous("bench", (1024 * P) as usize).unwrap();
        let mut tree: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for i in 0..areas {
            let iova = 0x100_0000 + i * 2 * P;
            let off = (i % 1024) * P;
            iommu
                .ioas_map(ioas, &mem, off, P, Some(iova), Perm::RW)
                .unwrap();
            tree.insert(iova, (iova + P - 1, mem.as_ptr() as u64 + off));
        }
        iommu.attach(dev_id, None, ioas).unwrap();
        let mut t = dev.translator();
        // The addresses of benches/iommu.rs.
        let addrs: Vec<u64> = (0..64u64)
            .map(|k| {
                let i = k + 128 * ((k * 7919) % (areas / 128));
                0x100_0000 + i * 2 * P + (k * 64) % P
            })
            .collect();
        let mut out = Vec::with_capacity(4);
        let mut a = t.access();
        for &x in &addrs {
            a.translate(None, x, 64, Perm::READ, &mut out).unwrap();
        }
        drop(a);
        let misses_before = t.stats().misses;
        let mut a = t.access();
        let per = (20 * addrs.len()) as f64;
        let (mut bt, mut bc, mut bb) = (f64::MAX, f64::MAX, f64::MAX);
        for _ in 0..rounds {
            let s = Instant::now();
            for _ in 0..20 {
                for &x in &addrs {
                    a.translate(None, black_box(x), 64, Perm::READ, &mut out)
                        .unwrap();
                    black_box(out[0].ptr);
                }
            }
            bt = bt.min(s.elapsed().as_nanos() as f64 / per);
            let s = Instant::now();
            for _ in 0..20 {
                for &x in &addrs {
                    let f = a
                        .translate_contiguous(None, black_box(x), 64, Perm::READ)
                        .unwrap();
                    black_box(f.ptr);
                }
            }
            bc = bc.min(s.elapsed().as_nanos() as f64 / per);
            let s = Instant::now();
            for _ in 0..20 {
                for &x in &addrs {
                    let x = black_box(x);
                    let (st, (last, host)) = tree.range(..=x).next_back().unwrap();
                    assert!(x <= *last);
                    black_box(host + (x - st));
                }
            }
            bb = bb.min(s.elapsed().as_nanos() as f64 / per);
        }
        drop(a);
        let misses = t.stats().misses - misses_before;
        println!(
            "{areas} areas (min of {rounds} rounds): translate {bt:.2} ns, translate_contiguous {bc:.2} ns, \
             BTreeMap {bb:.2} ns; BTreeMap/translate {:.1}x, BTreeMap/contiguous {:.1}x; \
             cache misses after warm-up {misses}",
            bb / bt,
            bb / bc
        );
    }
    for apart in [1u64 << 20, 64 << 20] {
        aligned_buffers(apart, rounds);
    }
}

/// Source and destination buffers of 64 pages, `apart` bytes apart (each
/// one area); 32 "descriptors" each translate one page of the source for
/// reading and the same page of the destination for writing.
fn aligned_buffers(apart: u64, rounds: usize) {
    const BUF: u64 = 64 * P;
    let iommu = Iommu::new();
    let dev = IommuDevice::new("bench", HwInfo::default());
    let dev_id = iommu.bind(&dev).unwrap();
    let ioas = iommu.ioas_alloc().unwrap();
    let mem = Memory::anonymous("bench", (2 * BUF) as usize).unwrap();
    let src = 0x1_0000_0000u64;
    let dst = src + apart;
    iommu
        .ioas_map(ioas, &mem, 0, BUF, Some(src), Perm::RW)
        .unwrap();
    iommu
        .ioas_map(ioas, &mem, BUF, BUF, Some(dst), Perm::RW)
        .unwrap();
    iommu.attach(dev_id, None, ioas).unwrap();
    let mut t = dev.translator();
    let offs: Vec<u64> = (0..32u64).map(|k| k * 2 * P).collect();
    let per = (20 * 2 * offs.len()) as f64;
    let mut best = f64::MAX;
    let misses_before;
    {
        let mut a = t.access();
        for &o in &offs {
            a.translate_contiguous(None, src + o, P, Perm::READ)
                .unwrap();
            a.translate_contiguous(None, dst + o, P, Perm::WRITE)
                .unwrap();
        }
        drop(a);
        misses_before = t.stats().misses;
        let mut a = t.access();
        for _ in 0..rounds {
            let s = Instant::now();
            for _ in 0..20 {
                for &o in &offs {
                    let f = a
                        .translate_contiguous(None, black_box(src + o), P, Perm::READ)
                        .unwrap();
                    black_box(f.ptr);
                    let f = a
                        .translate_contiguous(None, black_box(dst + o), P, Perm::WRITE)
                        .unwrap();
                    black_box(f.ptr);
                }
            }
            best = best.min(s.elapsed().as_nanos() as f64 / per);
        }
    }
    let misses = t.stats().misses - misses_before;
    println!(
        "aligned buffers {} MiB apart (min of {rounds} rounds): translate_contiguous {best:.2} ns, \
         misses after warm-up {:.2} per translation",
        apart >> 20,
        misses as f64 / (per * rounds as f64)
    );
}
