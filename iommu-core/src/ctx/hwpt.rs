//! HWPT operations (iommufd's `hw_pagetable.c`): allocation of paging and
//! nested HWPTs, and `IOMMU_HWPT_INVALIDATE` of the stage-1 translations
//! cached for a nested HWPT or a vIOMMU. Dirty tracking is `ctx/dirty.rs`.

use std::sync::Arc;

use super::{no_such, HwptEntry, Iommu, Object, State};
use crate::device::{DeviceShared, DirtyState, Domain};
use crate::error::{Error, Result};
use crate::fault::FaultInner;
use crate::sync::{invalidate_slots, InvalidationTicket};
use crate::types::*;

const HWPT_FLAGS_KNOWN: u32 = IOMMU_HWPT_ALLOC_NEST_PARENT
    | IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    | IOMMU_HWPT_FAULT_ID_VALID
    | IOMMU_HWPT_ALLOC_PASID;

impl State {
    fn hwpt_users(&self, hwpt: HwptId) -> Vec<Arc<DeviceShared>> {
        self.objects
            .values()
            .filter_map(|o| match o {
                Object::Device(d) if d.attached.values().any(|h| *h == hwpt) => {
                    Some(d.shared.clone())
                }
                _ => None,
            })
            .collect()
    }

    fn fault(&self, id: FaultId) -> Result<Arc<FaultInner>> {
        match self.objects.get(&id) {
            Some(Object::Fault(f)) => Ok(f.clone()),
            _ => Err(no_such("fault queue", id)),
        }
    }
}

impl Iommu {
    /// `IOMMU_HWPT_ALLOC`: a paging HWPT from an IOAS ([`HwptData::None`])
    /// or a nested HWPT ([`HwptData::Stage1`]) over a nest-parent HWPT or a
    /// vIOMMU.
    pub fn hwpt_alloc(&self, args: &HwptAlloc) -> Result<HwptId> {
        if args.flags & !HWPT_FLAGS_KNOWN != 0 {
            return Err(Error::NotSupported {
                what: "unknown HWPT allocation flags",
            });
        }
        let mut st = self.lock();
        let info = st.dev(args.dev_id)?.shared.info.clone();
        let fault_flag = args.flags & IOMMU_HWPT_FAULT_ID_VALID != 0;
        if fault_flag && args.fault_id.is_none() {
            return Err(Error::Invalid {
                what: "IOMMU_HWPT_FAULT_ID_VALID without a fault id",
            });
        }
        let wants_fault = args.fault_id.is_some();
        let pt = st.objects.get(&args.pt_id);
        let (s2, nested, s1_root, dirty) = match args.data {
            HwptData::None => {
                let Some(Object::Ioas(i)) = pt else {
                    return Err(Error::WrongObjectType {
                        id: args.pt_id,
                        expected: "IOAS (DATA_NONE)",
                    });
                };
                if args.flags & IOMMU_HWPT_ALLOC_NEST_PARENT != 0 && wants_fault {
                    return Err(Error::NotSupported {
                        what: "a nest parent cannot take a fault queue",
                    });
                }
                if args.flags & IOMMU_HWPT_ALLOC_NEST_PARENT != 0 && !info.nesting {
                    return Err(Error::NotSupported {
                        what: "the device does not support nesting",
                    });
                }
                if args.flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0 && !info.dirty_tracking {
                    return Err(Error::NotSupported {
                        what: "the device does not support dirty tracking",
                    });
                }
                let dirty = (args.flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0)
                    .then(|| Arc::new(DirtyState::default()));
                (i.clone(), None, None, dirty)
            }
            HwptData::Stage1 { root } => {
                if args.flags & IOMMU_HWPT_ALLOC_NEST_PARENT != 0 {
                    return Err(Error::NotSupported {
                        what: "a nested HWPT cannot be a nest parent",
                    });
                }
                if args.flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0 {
                    return Err(Error::NotSupported {
                        what: "a nested HWPT cannot track dirty pages",
                    });
                }
                if !info.nesting {
                    return Err(Error::NotSupported {
                        what: "the device does not support nesting",
                    });
                }
                let (parent, viommu) = match pt {
                    Some(Object::Hwpt(h)) => {
                        if h.nested.is_some() || h.flags & IOMMU_HWPT_ALLOC_NEST_PARENT == 0 {
                            return Err(Error::WrongObjectType {
                                id: args.pt_id,
                                expected: "nest-parent HWPT",
                            });
                        }
                        (args.pt_id, None)
                    }
                    Some(Object::Viommu(v)) => (v.parent, Some(args.pt_id)),
                    _ => {
                        return Err(Error::WrongObjectType {
                            id: args.pt_id,
                            expected: "nest-parent HWPT or vIOMMU",
                        })
                    }
                };
                if root % PAGE_SIZE != 0 {
                    return Err(Error::Misaligned {
                        value: root,
                        align: PAGE_SIZE,
                    });
                }
                let pd = &st.hwpt(parent)?.domain;
                (
                    pd.s2.clone(),
                    Some((parent, viommu)),
                    Some(root),
                    pd.dirty.clone(),
                )
            }
        };
        if wants_fault && !info.iopf {
            return Err(Error::NotSupported {
                what: "the device does not support I/O page faults",
            });
        }
        let fault = match args.fault_id {
            Some(f) => Some(st.fault(f)?),
            None => None,
        };
        let id = st.alloc_id()?;
        if nested.is_none() {
            // A paging HWPT's domain joins the IOAS now, attached or not
            // (iommufd: `iommufd_hwpt_paging_alloc` → `iopt_table_add_domain`):
            // its page size counts in the IOAS alignment until destroy.
            let page = info.min_page_size();
            let mut io = s2.write();
            if page > io.alignment() {
                if let Some(r) = io.misaligned_area(page) {
                    return Err(Error::AddressInUse {
                        start: r.start,
                        last: r.last,
                    });
                }
            }
            io.domains.insert(id, page);
        }
        let mut flags = args.flags;
        if wants_fault {
            flags |= IOMMU_HWPT_FAULT_ID_VALID;
        }
        st.objects.insert(
            id,
            Object::Hwpt(HwptEntry {
                domain: Arc::new(Domain {
                    s2,
                    s1_root,
                    fault,
                    dirty,
                }),
                nested,
                auto: false,
                flags,
                fault_id: args.fault_id,
            }),
        );
        Ok(id)
    }

    /// `IOMMU_HWPT_INVALIDATE` on a nested HWPT or a vIOMMU; returns the
    /// number of entries done (`entry_num` out) and the first error. After
    /// it returns, no device uses a stage-1 translation cached before.
    pub fn hwpt_invalidate(&self, id: ObjectId, entries: &[InvalidateEntry]) -> (u32, Result<()>) {
        let (n, r, t) = self.hwpt_invalidate_begin(id, entries);
        t.wait();
        (n, r)
    }

    /// Two-phase [`Iommu::hwpt_invalidate`].
    pub fn hwpt_invalidate_begin(
        &self,
        id: ObjectId,
        entries: &[InvalidateEntry],
    ) -> (u32, Result<()>, InvalidationTicket) {
        let done = InvalidationTicket::done;
        if entries.len() > MAX_INVALIDATE_ENTRIES {
            return (
                0,
                Err(Error::Invalid {
                    what: "more than 1 << 19 invalidation entries",
                }),
                done(),
            );
        }
        let st = self.lock();
        let is_viommu = match st.objects.get(&id) {
            Some(Object::Hwpt(h)) if h.nested.is_some() => false,
            Some(Object::Hwpt(_)) => {
                return (
                    0,
                    Err(Error::Invalid {
                        what: "a paging HWPT has no stage-1 cache to invalidate",
                    }),
                    done(),
                )
            }
            Some(Object::Viommu(_)) => true,
            _ => return (0, Err(no_such("nested HWPT or vIOMMU", id)), done()),
        };
        // The stage-2 IOAS under it: a device that left the HWPT (or the
        // vIOMMU's) inside an access section may still hold a stage-1
        // translation of it until the section ends.
        let s2 = match st.objects.get(&id) {
            Some(Object::Hwpt(h)) => Some(h.domain.s2.clone()),
            Some(Object::Viommu(v)) => st.hwpt(v.parent).ok().map(|h| h.domain.s2.clone()),
            _ => None,
        };
        let check_range = |flags: u32, addr: u64, npages: u64| -> Result<()> {
            if flags & !IOMMU_INVALIDATE_FLAG_LEAF != 0 {
                return Err(Error::NotSupported {
                    what: "unknown invalidation entry flags",
                });
            }
            if addr == 0 && npages == u64::MAX {
                return Ok(());
            }
            if addr % PAGE_SIZE != 0 {
                return Err(Error::Misaligned {
                    value: addr,
                    align: PAGE_SIZE,
                });
            }
            if npages == 0 {
                return Err(Error::ZeroLength);
            }
            npages
                .checked_mul(PAGE_SIZE)
                .and_then(|l| addr.checked_add(l - 1))
                .map(|_| ())
                .ok_or(Error::Invalid {
                    what: "invalidation range overflows",
                })
        };
        let mut targets: Vec<Arc<DeviceShared>> = Vec::new();
        let mut n = 0u32;
        let mut result = Ok(());
        for e in entries {
            let r = match (*e, is_viommu) {
                (
                    InvalidateEntry::Stage1 {
                        flags,
                        addr,
                        npages,
                    },
                    false,
                ) => check_range(flags, addr, npages).map(|_| {
                    if targets.is_empty() {
                        targets = st.hwpt_users(id);
                    }
                }),
                (
                    InvalidateEntry::Viommu {
                        vdev_id,
                        vpasid,
                        flags,
                        addr,
                        npages,
                    },
                    true,
                ) => check_range(flags, addr, npages).and_then(|_| {
                    let v = st.objects.values().find_map(|o| match o {
                        Object::Vdevice(v) if v.viommu == id && v.virt_id == vdev_id => Some(v),
                        _ => None,
                    });
                    let Some(v) = v else {
                        return Err(Error::Invalid {
                            what: "unknown virtual device id",
                        });
                    };
                    if let Some(vp) = vpasid {
                        if !v.v2p.contains_key(&vp) {
                            return Err(Error::Invalid {
                                what: "unknown virtual PASID",
                            });
                        }
                    }
                    let d = st.dev(v.dev_id)?.shared.clone();
                    if !targets.iter().any(|t| Arc::ptr_eq(t, &d)) {
                        targets.push(d);
                    }
                    Ok(())
                }),
                _ => Err(Error::Invalid {
                    what: "invalidation entry of the wrong type for this object",
                }),
            };
            if let Err(e) = r {
                result = Err(e);
                break;
            }
            n += 1;
        }
        drop(st);
        let mut slots = Vec::new();
        for d in &targets {
            d.collect_slots(&mut slots);
        }
        let mut ticket = invalidate_slots(&slots);
        if let Some(s2) = s2 {
            ticket.merge(s2.read().departed.pending());
        }
        (n, result, ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_setup as setup;
    use super::*;

    #[test]
    fn test_nested_walk() {
        let (iommu, dev, dev_id, ioas, mem) = setup();
        // Stage 2: gpa 0..1M -> mem.
        iommu
            .ioas_map(ioas, &mem, 0, 1 << 20, Some(0), Perm::RW)
            .expect("map");
        let parent = iommu
            .hwpt_alloc(&HwptAlloc {
                dev_id,
                pt_id: ioas,
                flags: IOMMU_HWPT_ALLOC_NEST_PARENT,
                ..Default::default()
            })
            .expect("parent");
        // Tables at 0x1000 (L4), 0x2000 (L3), 0x3000 (L2), 0x4000 (L1).
        let va: u64 = 0x7f12_3456_7000;
        let idx = |l: u32| ((va >> (12 + 9 * l)) & 0x1ff) as usize;
        mem.write_at(0x1000 + idx(3) * 8, &(0x2000u64 | 3).to_le_bytes())
            .expect("w");
        mem.write_at(0x2000 + idx(2) * 8, &(0x3000u64 | 3).to_le_bytes())
            .expect("w");
        mem.write_at(0x3000 + idx(1) * 8, &(0x4000u64 | 3).to_le_bytes())
            .expect("w");
        // Leaf: read-only page at gpa 0x9000.
        mem.write_at(0x4000 + idx(0) * 8, &(0x9000u64 | 1).to_le_bytes())
            .expect("w");
        mem.write_at(0x9010, b"nested").expect("w");
        let nested = iommu
            .hwpt_alloc(&HwptAlloc {
                dev_id,
                pt_id: parent,
                data: HwptData::Stage1 { root: 0x1000 },
                ..Default::default()
            })
            .expect("nested");
        iommu.attach(dev_id, None, nested).expect("attach");
        let mut t = dev.translator();
        let mut b = [0u8; 6];
        t.read(None, va + 0x10, &mut b).expect("read");
        assert_eq!(&b, b"nested");
        assert_eq!(
            t.write(None, va, b"x"),
            Err(Error::AccessDenied {
                pasid: None,
                iova: va,
                perm: Perm::WRITE
            })
        );
        assert!(matches!(
            t.read(None, va + 0x1000, &mut b),
            Err(Error::Unmapped { .. })
        ));
        assert_eq!(
            iommu.destroy(parent),
            Err(Error::Busy {
                id: parent,
                reason: "the HWPT is the parent of a nested HWPT"
            })
        );
    }
}
