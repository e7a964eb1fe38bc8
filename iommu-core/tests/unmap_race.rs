//! Regression tests of the unmap promise across a change of attachment:
//! an unmap of an IOAS waits for every translator that may still hold a
//! translation of it, also one whose attachment is being replaced,
//! detached or unbound at that moment.
//!
//! Each test is the single-threaded repro of the race: a translator opens
//! an access section and writes through it (the translation is now
//! cached), the device leaves the IOAS with the two-phase API (its ticket
//! not yet waited on), and the IOAS is unmapped. The unmap's ticket must
//! not be done while the section is open, and must be done once it ends.
//!
//! Able to fail: built with `RUSTFLAGS='--cfg ioasis_broken="departed"'`
//! (the IOAS no longer records departed sections: the code before the
//! fix), all six tests fail at "unmap returned while a departed section
//! was open" (checked with
//! `RUSTFLAGS='--cfg ioasis_broken="departed"' cargo test -p iommu-core --test unmap_race`).
#![allow(clippy::unwrap_used)]

use iommu_core::*;

const IOVA: u64 = 0x10000;
const LEN: u64 = 64 << 10;

#[derive(Clone, Copy, Debug)]
enum Leave {
    Replace,
    Detach,
    Unbind,
}

fn repro(leave: Leave, pasid: Option<u32>) {
    let iommu = Iommu::new();
    let dev = IommuDevice::new("d0", HwInfo::full());
    let dev_id = iommu.bind(&dev).unwrap();
    let old = iommu.ioas_alloc().unwrap();
    let new = iommu.ioas_alloc().unwrap();
    let mem = Memory::anonymous("m", LEN as usize).unwrap();
    iommu
        .ioas_map(old, &mem, 0, LEN, Some(IOVA), Perm::RW)
        .unwrap();
    // A PASID attaches a HWPT allocated for PASIDs; the RID the IOAS
    // (auto domain), or a PASID-capable HWPT too for `replace`.
    let pasid_hwpt = |ioas| {
        iommu
            .hwpt_alloc(&HwptAlloc {
                dev_id,
                pt_id: ioas,
                flags: IOMMU_HWPT_ALLOC_PASID,
                ..Default::default()
            })
            .unwrap()
    };
    let (old_pt, new_pt) = match pasid {
        Some(_) => (pasid_hwpt(old), pasid_hwpt(new)),
        None => (old, new),
    };
    iommu.attach(dev_id, pasid, old_pt).unwrap();

    let mut t = dev.translator();
    let id = t.id();
    let mut a = t.access();
    a.write(pasid, IOVA, b"before").unwrap();

    // The device leaves `old`; its caller has not waited yet.
    let leaving = match leave {
        Leave::Replace => iommu.replace_begin(dev_id, pasid, new_pt).unwrap().1,
        Leave::Detach => iommu.detach_begin(dev_id, pasid).unwrap(),
        Leave::Unbind => iommu.unbind_begin(dev_id).unwrap(),
    };
    let (bytes, mut unmap) = iommu.ioas_unmap_begin(old, IOVA, LEN).unwrap();
    let waited = !unmap.is_done();
    let pending: Vec<u64> = unmap.pending().iter().map(|p| p.translator).collect();
    // End the section before asserting: a ticket dropped while a section
    // it names is open on this thread would block forever.
    drop(a);
    assert_eq!(bytes, LEN);
    assert!(
        waited,
        "{leave:?} {pasid:?}: unmap returned while a departed section was open"
    );
    assert_eq!(pending, vec![id], "{leave:?} {pasid:?}");
    // The section ended: both tickets are complete.
    assert!(unmap.is_done(), "{leave:?} {pasid:?}");
    drop(leaving);
    // A new section no longer reaches the old pages.
    let mut b = [0u8; 6];
    assert!(t.read_nofault(pasid, IOVA, &mut b).is_err());
    // The departed record was dropped once the section ended: a later
    // unmap of the same IOAS is done at once.
    iommu
        .ioas_map(old, &mem, 0, LEN, Some(IOVA), Perm::RW)
        .unwrap();
    let section = t.access();
    let (_, mut again) = iommu.ioas_unmap_begin(old, IOVA, LEN).unwrap();
    let stale = !again.is_done();
    drop(section);
    assert!(!stale, "{leave:?} {pasid:?}: stale departed record");
}

#[test]
fn test_replace_rid_then_unmap_waits() {
    repro(Leave::Replace, None);
}

#[test]
fn test_replace_pasid_then_unmap_waits() {
    repro(Leave::Replace, Some(1));
}

#[test]
fn test_detach_rid_then_unmap_waits() {
    repro(Leave::Detach, None);
}

#[test]
fn test_detach_pasid_then_unmap_waits() {
    repro(Leave::Detach, Some(1));
}

#[test]
fn test_unbind_rid_then_unmap_waits() {
    repro(Leave::Unbind, None);
}

#[test]
fn test_unbind_pasid_then_unmap_waits() {
    repro(Leave::Unbind, Some(1));
}
