//! iommu-core benchmarks:
//! - warm translate vs a plain BTreeMap range lookup over the same areas;
//! - map+unmap pairs with 100k areas present;
//! - unmap with 8 devices holding cached translations.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use iommu_core::*;

const P: u64 = PAGE_SIZE;

fn translate_warm(c: &mut Criterion) {
    let mut g = c.benchmark_group("translate");
    for areas in [1024u64, 100_000] {
        let iommu = Iommu::new();
        let dev = IommuDevice::new("bench", HwInfo::default());
        let dev_id = iommu.bind(&dev).unwrap();
        let ioas = iommu.ioas_alloc().unwrap();
        let mem = Memory::anonymous("bench", (1024 * P) as usize).unwrap();
        let mut tree: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for i in 0..areas {
            // Areas of one page at every other page.
            let iova = 0x100_0000 + i * 2 * P;
            let off = (i % 1024) * P;
            iommu
                .ioas_map(ioas, &mem, off, P, Some(iova), Perm::RW)
                .unwrap();
            tree.insert(iova, (iova + P - 1, mem.as_ptr() as u64 + off));
        }
        iommu.attach(dev_id, None, ioas).unwrap();
        let mut t = dev.translator();
        // 64 addresses spread over all areas (area i sits on page 2i, and
        // i % 128 differs, which kept them in distinct slots of the former
        // direct-mapped cache; the hashed 2-way cache holds them all too:
        // `translate_interleaved` checks that they do not miss).
        let addrs: Vec<u64> = (0..64u64)
            .map(|k| {
                let i = k + 128 * ((k * 7919) % (areas / 128));
                0x100_0000 + i * 2 * P + (k * 64) % P
            })
            .collect();
        let mut out = Vec::with_capacity(4);
        g.throughput(Throughput::Elements(addrs.len() as u64));
        {
            let mut a = t.access();
            for &x in &addrs {
                a.translate(None, x, 64, Perm::READ, &mut out).unwrap();
            }
            g.bench_function(format!("warm_cache_{areas}_areas_x64"), |b| {
                b.iter(|| {
                    for &x in &addrs {
                        a.translate(None, black_box(x), 64, Perm::READ, &mut out)
                            .unwrap();
                        black_box(out[0].ptr);
                    }
                })
            });
            g.bench_function(format!("warm_contiguous_{areas}_areas_x64"), |b| {
                b.iter(|| {
                    for &x in &addrs {
                        let f = a
                            .translate_contiguous(None, black_box(x), 64, Perm::READ)
                            .unwrap();
                        black_box(f.ptr);
                    }
                })
            });
        }
        g.bench_function(format!("btreemap_{areas}_areas_x64"), |b| {
            b.iter(|| {
                for &x in &addrs {
                    let x = black_box(x);
                    let (s, (last, host)) = tree.range(..=x).next_back().unwrap();
                    assert!(x <= *last);
                    black_box(host + (x - s));
                }
            })
        });
        if areas == 1024 {
            g.bench_function("read_64B_own_section_x64", |b| {
                let mut buf = [0u8; 64];
                b.iter(|| {
                    for &x in &addrs {
                        t.read(None, black_box(x), &mut buf).unwrap();
                    }
                })
            });
        }
    }
    for apart in [1u64 << 20, 64 << 20] {
        // Source and destination buffers `apart` bytes apart, translated
        // alternately page by page (a memmove engine's pattern).
        let iommu = Iommu::new();
        let dev = IommuDevice::new("bench", HwInfo::default());
        let dev_id = iommu.bind(&dev).unwrap();
        let ioas = iommu.ioas_alloc().unwrap();
        let mem = Memory::anonymous("bench", (128 * P) as usize).unwrap();
        let (src, dst) = (0x1_0000_0000u64, 0x1_0000_0000 + apart);
        iommu
            .ioas_map(ioas, &mem, 0, 64 * P, Some(src), Perm::RW)
            .unwrap();
        iommu
            .ioas_map(ioas, &mem, 64 * P, 64 * P, Some(dst), Perm::RW)
            .unwrap();
        iommu.attach(dev_id, None, ioas).unwrap();
        let mut t = dev.translator();
        let mut a = t.access();
        g.throughput(Throughput::Elements(64));
        g.bench_function(
            format!("aligned_buffers_{}MiB_apart_x64", apart >> 20),
            |b| {
                b.iter(|| {
                    for k in 0..32u64 {
                        let o = k * 2 * P;
                        let f = a
                            .translate_contiguous(None, black_box(src + o), P, Perm::READ)
                            .unwrap();
                        black_box(f.ptr);
                        let f = a
                            .translate_contiguous(None, black_box(dst + o), P, Perm::WRITE)
                            .unwrap();
                        black_box(f.ptr);
                    }
                })
            },
        );
    }
    g.finish();
}

fn map_unmap_100k(c: &mut Criterion) {
    const AREAS: u64 = 100_000;
    let mut g = c.benchmark_group("map_unmap");
    g.throughput(Throughput::Elements(1));
    for attached in [false, true] {
        let iommu = Iommu::new();
        let ioas = iommu.ioas_alloc().unwrap();
        let mem = Memory::anonymous("bench", 1 << 20).unwrap();
        for i in 0..AREAS {
            iommu
                .ioas_map(ioas, &mem, 0, P, Some(0x1_0000_0000 + i * P), Perm::RW)
                .unwrap();
        }
        let dev = IommuDevice::new("bench", HwInfo::default());
        let _t = dev.translator();
        if attached {
            let dev_id = iommu.bind(&dev).unwrap();
            iommu.attach(dev_id, None, ioas).unwrap();
        }
        let name = if attached {
            "pair_100k_areas_1_device"
        } else {
            "pair_100k_areas_no_device"
        };
        let mut k = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                // Cycle through 1024 holes in the middle of the tree.
                k = (k + 1) % 1024;
                let iova = 0x10_0000 + k * 2 * P;
                iommu
                    .ioas_map(ioas, &mem, 0, P, Some(iova), Perm::RW)
                    .unwrap();
                iommu.ioas_unmap(ioas, iova, P).unwrap();
            })
        });
    }
    g.finish();
}

fn unmap_8_devices(c: &mut Criterion) {
    let iommu = Iommu::new();
    let ioas = iommu.ioas_alloc().unwrap();
    let mem = Memory::anonymous("bench", 1 << 20).unwrap();
    let mut ts: Vec<Translator> = (0..8)
        .map(|i| {
            let d = IommuDevice::new(format!("d{i}"), HwInfo::default());
            let id = iommu.bind(&d).unwrap();
            iommu.attach(id, None, ioas).unwrap();
            d.translator()
        })
        .collect();
    let mem2: Arc<Memory> = mem.clone();
    let mut g = c.benchmark_group("unmap");
    g.bench_function("8_devices_cached", |b| {
        b.iter_batched(
            || {
                iommu
                    .ioas_map(ioas, &mem2, 0, 16 * P, Some(0x10_0000), Perm::RW)
                    .unwrap();
                let mut buf = [0u8; 8];
                for t in ts.iter_mut() {
                    t.read(None, 0x10_0000, &mut buf).unwrap();
                    assert!(t.cached_translations() > 0);
                }
            },
            |()| iommu.ioas_unmap(ioas, 0x10_0000, 16 * P).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
    for t in ts.iter_mut() {
        assert_eq!(t.cached_translations(), 0);
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = translate_warm, map_unmap_100k, unmap_8_devices
}
criterion_main!(benches);
