//! Property test: map / unmap / copy / translate against a simple reference
//! model of two IOAS (a list of areas each, memory filled with a pattern).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use iommu_core::*;
use proptest::prelude::*;

const P: u64 = PAGE_SIZE;
const MEM_PAGES: u64 = 64;
/// IOVAs are drawn from the first 48 pages.
const SPACE_PAGES: u64 = 48;

#[derive(Debug, Clone)]
enum Op {
    Map {
        ioas: usize,
        page: u64,
        pages: u64,
        mem_page: u64,
        write: bool,
    },
    MapAuto {
        ioas: usize,
        pages: u64,
        mem_page: u64,
    },
    Unmap {
        ioas: usize,
        page: u64,
        pages: u64,
    },
    UnmapAll {
        ioas: usize,
    },
    Copy {
        src_page: u64,
        pages: u64,
        dst_page: u64,
    },
    Read {
        ioas: usize,
        at: u64,
        len: u64,
    },
    Write {
        ioas: usize,
        at: u64,
        len: u64,
        byte: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 0..SPACE_PAGES, 1..6u64, 0..MEM_PAGES - 6, any::<bool>())
            .prop_map(|(ioas, page, pages, mem_page, write)| Op::Map { ioas, page, pages, mem_page, write }),
        1 => (0..2usize, 1..4u64, 0..MEM_PAGES - 4)
            .prop_map(|(ioas, pages, mem_page)| Op::MapAuto { ioas, pages, mem_page }),
        3 => (0..2usize, 0..SPACE_PAGES, 1..10u64)
            .prop_map(|(ioas, page, pages)| Op::Unmap { ioas, page, pages }),
        1 => (0..2usize).prop_map(|ioas| Op::UnmapAll { ioas }),
        2 => (0..SPACE_PAGES, 1..6u64, 0..SPACE_PAGES)
            .prop_map(|(src_page, pages, dst_page)| Op::Copy { src_page, pages, dst_page }),
        4 => (0..2usize, 0..SPACE_PAGES * P, 1..3 * P)
            .prop_map(|(ioas, at, len)| Op::Read { ioas, at, len }),
        2 => (0..2usize, 0..SPACE_PAGES * P, 1..2 * P, any::<u8>())
            .prop_map(|(ioas, at, len, byte)| Op::Write { ioas, at, len, byte }),
    ]
}

#[derive(Debug, Clone, Copy)]
struct MArea {
    start: u64,
    len: u64,
    mem_off: u64,
    write: bool,
    pages_writable: bool,
}

#[derive(Default, Debug)]
struct Model {
    areas: [Vec<MArea>; 2],
}

impl Model {
    fn overlaps(&self, i: usize, start: u64, len: u64) -> bool {
        self.areas[i]
            .iter()
            .any(|a| a.start < start + len && start < a.start + a.len)
    }
    fn find(&self, i: usize, iova: u64) -> Option<MArea> {
        self.areas[i]
            .iter()
            .copied()
            .find(|a| a.start <= iova && iova < a.start + a.len)
    }
    /// Host memory offset of each byte of the range, or the first hole /
    /// permission failure.
    fn resolve(
        &self,
        i: usize,
        at: u64,
        len: u64,
        write: bool,
    ) -> std::result::Result<Vec<u64>, u64> {
        let mut v = Vec::with_capacity(len as usize);
        for x in at..at + len {
            match self.find(i, x) {
                Some(a) if !write || a.write => v.push(a.mem_off + (x - a.start)),
                _ => return Err(x),
            }
        }
        Ok(v)
    }
}

fn pattern(off: u64) -> u8 {
    (off % 251) as u8
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn test_against_model(ops in proptest::collection::vec(op(), 1..60)) {
        let iommu = Iommu::new();
        let mem = Memory::anonymous("model", (MEM_PAGES * P) as usize).unwrap();
        let mut shadow: Vec<u8> = (0..MEM_PAGES * P).map(pattern).collect();
        mem.write_at(0, &shadow).unwrap();
        let ioas = [iommu.ioas_alloc().unwrap(), iommu.ioas_alloc().unwrap()];
        let devs: Vec<IommuDevice> = (0..2).map(|i| IommuDevice::new(format!("m{i}"), HwInfo::default())).collect();
        for i in 0..2 {
            let id = iommu.bind(&devs[i]).unwrap();
            iommu.attach(id, None, ioas[i]).unwrap();
        }
        let mut ts: Vec<Translator> = devs.iter().map(|d| d.translator()).collect();
        let mut model = Model::default();
        let mem_arc: Arc<Memory> = mem.clone();

        for op in ops {
            match op {
                Op::Map { ioas: i, page, pages, mem_page, write } => {
                    let (start, len) = (page * P, pages * P);
                    let perm = if write { Perm::RW } else { Perm::READ };
                    let r = iommu.ioas_map(ioas[i], &mem_arc, mem_page * P, len, Some(start), perm);
                    if model.overlaps(i, start, len) {
                        prop_assert_eq!(r.map_err(|e| e.errno()), Err(libc::EEXIST));
                    } else {
                        prop_assert_eq!(r, Ok(start));
                        model.areas[i].push(MArea { start, len, mem_off: mem_page * P, write, pages_writable: write });
                    }
                }
                Op::MapAuto { ioas: i, pages, mem_page } => {
                    let len = pages * P;
                    let iova = iommu.ioas_map(ioas[i], &mem_arc, mem_page * P, len, None, Perm::RW).unwrap();
                    prop_assert!(iova >= P);
                    prop_assert!(!model.overlaps(i, iova, len));
                    model.areas[i].push(MArea { start: iova, len, mem_off: mem_page * P, write: true, pages_writable: true });
                }
                Op::Unmap { ioas: i, page, pages } => {
                    let (start, len) = (page * P, pages * P);
                    let hit: Vec<MArea> = model.areas[i].iter().copied()
                        .filter(|a| a.start < start + len && start < a.start + a.len).collect();
                    let whole = hit.iter().all(|a| a.start >= start && a.start + a.len <= start + len);
                    let r = iommu.ioas_unmap(ioas[i], start, len);
                    if hit.is_empty() || !whole {
                        prop_assert_eq!(r.map_err(|e| e.errno()), Err(libc::ENOENT));
                    } else {
                        prop_assert_eq!(r, Ok(hit.iter().map(|a| a.len).sum::<u64>()));
                        model.areas[i].retain(|a| !(a.start >= start && a.start + a.len <= start + len));
                    }
                }
                Op::UnmapAll { ioas: i } => {
                    let total: u64 = model.areas[i].iter().map(|a| a.len).sum();
                    prop_assert_eq!(iommu.ioas_unmap(ioas[i], 0, u64::MAX), Ok(total));
                    model.areas[i].clear();
                }
                Op::Copy { src_page, pages, dst_page } => {
                    let (s, len, d) = (src_page * P, pages * P, dst_page * P);
                    let r = iommu.ioas_copy(ioas[1], ioas[0], s, len, Some(d), Perm::READ);
                    // Covered without gaps?
                    let mut pieces = Vec::new();
                    let mut at = s;
                    let mut covered = true;
                    while at < s + len {
                        match model.find(0, at) {
                            Some(a) => {
                                let end = (a.start + a.len).min(s + len);
                                pieces.push(MArea { start: d + (at - s), len: end - at, mem_off: a.mem_off + (at - a.start), write: false, pages_writable: a.pages_writable });
                                at = end;
                            }
                            None => { covered = false; break; }
                        }
                    }
                    if !covered {
                        prop_assert_eq!(r.map_err(|e| e.errno()), Err(libc::ENOENT));
                    } else if model.overlaps(1, d, len) {
                        prop_assert_eq!(r.map_err(|e| e.errno()), Err(libc::EEXIST));
                    } else {
                        prop_assert_eq!(r, Ok(d));
                        model.areas[1].extend(pieces);
                    }
                }
                Op::Read { ioas: i, at, len } => {
                    let mut buf = vec![0u8; len as usize];
                    let r = ts[i].read(None, at, &mut buf);
                    match model.resolve(i, at, len, false) {
                        Ok(offs) => {
                            prop_assert_eq!(r, Ok(()));
                            for (k, off) in offs.iter().enumerate() {
                                prop_assert_eq!(buf[k], shadow[*off as usize]);
                            }
                        }
                        Err(hole) => {
                            prop_assert_eq!(r, Err(Error::Unmapped { pasid: None, iova: hole }));
                        }
                    }
                    // translate agrees on total length when mapped.
                    let mut frags = Vec::new();
                    let tr = ts[i].access().translate(None, at, len, Perm::READ, &mut frags);
                    if tr.is_ok() {
                        prop_assert_eq!(frags.iter().map(|f| f.len as u64).sum::<u64>(), len);
                    }
                }
                Op::Write { ioas: i, at, len, byte } => {
                    let buf = vec![byte; len as usize];
                    let r = ts[i].write(None, at, &buf);
                    match model.resolve(i, at, len, true) {
                        Ok(offs) => {
                            prop_assert_eq!(r, Ok(()));
                            for off in offs {
                                shadow[off as usize] = byte;
                            }
                        }
                        Err(_) => prop_assert!(r.is_err()),
                    }
                }
            }
        }
        let mut back = vec![0u8; shadow.len()];
        mem.read_at(0, &mut back).unwrap();
        prop_assert!(back == shadow, "memory differs from the model");
    }
}
