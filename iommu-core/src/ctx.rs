//! The context: one `Iommu` is one open `/dev/iommu`, a table of objects
//! addressed by 31-bit ids (iommufd's `main.c`). This file holds the table
//! (the entry of each object kind, id allocation, lookups, the dependency
//! check of a destroy), the context's lifetime and the operations on any
//! object (`destroy`, `object_kind`). The operations of each object kind
//! live in a file of their own, as iommufd lays them out:
//!
//! | file | operations | iommufd |
//! | --- | --- | --- |
//! | `ctx/device.rs` | bind, unbind, attach, replace, detach (RID and PASID) | `device.c` |
//! | `ctx/ioas.rs` | IOAS alloc, map, unmap, cut, copy, IOVA ranges, options | `ioas.c` |
//! | `ctx/hwpt.rs` | HWPT alloc, stage-1 cache invalidation | `hw_pagetable.c` |
//! | `ctx/dirty.rs` | dirty tracking of paging HWPTs | `hw_pagetable.c` |
//! | `ctx/viommu.rs` | vIOMMU, vdevice, vPASID ↔ pPASID | `viommu.c` |
//! | `ctx/eventq.rs` | fault and event queue alloc, event reports | `eventq.c` |
//!
//! The state behind those objects (areas, device attachments, queues) is
//! in the crate's other modules (`ioas`, `device`, `fault`, `event`).

mod device;
mod dirty;
mod eventq;
mod hwpt;
mod ioas;
mod viommu;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::device::{DeviceShared, Domain};
use crate::error::{Error, Result};
use crate::event::EventInner;
use crate::fault::{AutoAnswered, FaultInner};
use crate::ioas::IoasInner;
use crate::prim::{AtomicUsize, Mutex, MutexGuard};
use crate::sync::{invalidate_slots, lock, InvalidationTicket, Slot};
use crate::types::*;

pub use dirty::MAX_DIRTY_BITMAP_BITS;
pub use ioas::MAX_AREAS_PER_IOAS;

/// Largest object id (31 bits).
const MAX_ID: u32 = i32::MAX as u32;

struct DevEntry {
    shared: Arc<DeviceShared>,
    /// PASID key → HWPT.
    attached: BTreeMap<u32, HwptId>,
    vdevice: Option<VdeviceId>,
}

struct HwptEntry {
    domain: Arc<Domain>,
    /// `(parent HWPT, vIOMMU)` of a nested HWPT.
    nested: Option<(HwptId, Option<ViommuId>)>,
    auto: bool,
    flags: u32,
    fault_id: Option<FaultId>,
}

struct ViommuEntry {
    parent: HwptId,
}

struct VdevEntry {
    viommu: ViommuId,
    dev_id: DevId,
    virt_id: u64,
    /// vPASID → pPASID.
    v2p: HashMap<u32, u32>,
}

struct EqEntry {
    inner: Arc<EventInner>,
    viommu: Option<ViommuId>,
}

enum Object {
    Ioas(Arc<IoasInner>),
    Device(DevEntry),
    Hwpt(HwptEntry),
    Fault(Arc<FaultInner>),
    Viommu(ViommuEntry),
    Vdevice(VdevEntry),
    EventQueue(EqEntry),
    /// A vdevice removed by unbind: the id stays taken, `destroy` → ENOENT.
    Tombstone,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<u32, Object>,
}

pub(crate) struct CtxInner {
    state: Mutex<State>,
    /// Live event queues: lets translation failures skip the state lock
    /// when nobody listens.
    event_queues: AtomicUsize,
}

fn no_such(kind: &'static str, id: u32) -> Error {
    Error::NoSuchObject { kind, id }
}

impl State {
    fn alloc_id(&self) -> Result<u32> {
        let mut want = 1u32;
        for k in self.objects.keys() {
            if *k != want {
                break;
            }
            want += 1;
        }
        if want > MAX_ID {
            return Err(Error::NoSpace { length: 1 });
        }
        Ok(want)
    }

    fn insert(&mut self, o: Object) -> Result<u32> {
        let id = self.alloc_id()?;
        self.objects.insert(id, o);
        Ok(id)
    }

    fn ioas(&self, id: IoasId) -> Result<&Arc<IoasInner>> {
        match self.objects.get(&id) {
            Some(Object::Ioas(i)) => Ok(i),
            _ => Err(no_such("IOAS", id)),
        }
    }

    fn dev(&self, id: DevId) -> Result<&DevEntry> {
        match self.objects.get(&id) {
            Some(Object::Device(d)) => Ok(d),
            _ => Err(no_such("device", id)),
        }
    }

    fn dev_mut(&mut self, id: DevId) -> Result<&mut DevEntry> {
        match self.objects.get_mut(&id) {
            Some(Object::Device(d)) => Ok(d),
            _ => Err(no_such("device", id)),
        }
    }

    fn hwpt(&self, id: HwptId) -> Result<&HwptEntry> {
        match self.objects.get(&id) {
            Some(Object::Hwpt(h)) => Ok(h),
            _ => Err(no_such("HWPT", id)),
        }
    }

    fn vdev(&self, id: VdeviceId) -> Result<&VdevEntry> {
        match self.objects.get(&id) {
            Some(Object::Vdevice(v)) => Ok(v),
            _ => Err(no_such("vdevice", id)),
        }
    }

    /// Why `id` cannot be destroyed, if something depends on it.
    fn referenced(&self, id: u32) -> Option<&'static str> {
        for o in self.objects.values() {
            match o {
                Object::Hwpt(h) => {
                    if h.nested.is_none() && h.domain.s2_id() == Some(id) {
                        return Some("the IOAS has HWPTs");
                    }
                    if let Some((p, v)) = h.nested {
                        if p == id {
                            return Some("the HWPT is the parent of a nested HWPT");
                        }
                        if v == Some(id) {
                            return Some("the vIOMMU has nested HWPTs");
                        }
                    }
                    if h.fault_id == Some(id) {
                        return Some("the fault queue is used by a HWPT");
                    }
                }
                Object::Device(d) => {
                    if d.attached.values().any(|h| *h == id) {
                        return Some("the HWPT is attached to a device");
                    }
                }
                Object::Viommu(v) => {
                    if v.parent == id {
                        return Some("the HWPT is the parent of a vIOMMU");
                    }
                }
                Object::Vdevice(v) => {
                    if v.viommu == id {
                        return Some("the vIOMMU has vdevices");
                    }
                }
                Object::EventQueue(e) => {
                    if e.viommu == Some(id) {
                        return Some("the vIOMMU has an event queue");
                    }
                }
                Object::Ioas(_) | Object::Fault(_) | Object::Tombstone => {}
            }
        }
        None
    }
}

impl Domain {
    fn s2_id(&self) -> Option<IoasId> {
        Some(self.s2.id)
    }
}

fn device_slots(d: &DeviceShared) -> Vec<Arc<Slot>> {
    let mut v = Vec::new();
    d.collect_slots(&mut v);
    v
}

impl CtxInner {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for CtxInner {
    fn drop(&mut self) {
        let st = std::mem::take(&mut *lock(&self.state));
        let mut ticket = InvalidationTicket::done();
        let mut answered = AutoAnswered::default();
        for o in st.objects.values() {
            match o {
                Object::Device(d) => {
                    d.shared.attach_write().clear();
                    *lock(&d.shared.binding) = None;
                    *d.shared.virt_write() = Default::default();
                    ticket.merge(invalidate_slots(&device_slots(&d.shared)));
                }
                Object::Fault(f) => answered.append(f.destroy()),
                Object::EventQueue(e) => e.inner.destroy(),
                _ => {}
            }
        }
        answered.finish();
        ticket.wait();
    }
}

/// One iommufd context: a table of objects addressed by 31-bit ids from 1.
/// Cheap to clone (an `Arc`); `Send + Sync`. When the last clone is dropped
/// every object is destroyed, every device unbound, outstanding faults are
/// answered INVALID, and the drop waits for open access sections of the
/// devices (so never drop the last clone inside one). Queues whose handles
/// are still open are destroyed too (iommufd keeps the context alive while
/// a queue fd is open); reads through those handles then fail with
/// `ENODEV`.
#[derive(Clone)]
pub struct Iommu {
    pub(crate) inner: Arc<CtxInner>,
}

impl std::fmt::Debug for Iommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iommu")
            .field("objects", &self.lock().objects.len())
            .finish()
    }
}

impl Default for Iommu {
    fn default() -> Self {
        Iommu::new()
    }
}

impl Iommu {
    /// A new, empty context.
    pub fn new() -> Iommu {
        Iommu {
            inner: Arc::new(CtxInner {
                state: Mutex::new(State::default()),
                event_queues: AtomicUsize::new(0),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }

    /// `IOMMU_DESTROY`: destroys an object. `ENOENT` for unknown ids and
    /// tombstones; `EBUSY` while anything depends on it, including a fault
    /// or event queue while a handle of it
    /// ([`FaultQueue`](crate::FaultQueue), [`EventQueue`](crate::EventQueue),
    /// the queue's fd) is open. Devices are removed with [`Iommu::unbind`]
    /// (`EBUSY` here).
    pub fn destroy(&self, id: ObjectId) -> Result<()> {
        let answered = {
            let mut st = self.lock();
            match st.objects.get(&id) {
                None | Some(Object::Tombstone) => return Err(no_such("object", id)),
                Some(Object::Device(_)) => {
                    return Err(Error::Busy {
                        id,
                        reason: "a device is removed by unbind",
                    })
                }
                Some(_) => {}
            }
            if let Some(reason) = st.referenced(id) {
                return Err(Error::Busy { id, reason });
            }
            let open = match st.objects.get(&id) {
                Some(Object::Fault(f)) => f.file.is_open(),
                Some(Object::EventQueue(e)) => e.inner.file.is_open(),
                _ => false,
            };
            if open {
                return Err(Error::Busy {
                    id,
                    reason: "the queue's fd is open",
                });
            }
            let mut answered = AutoAnswered::default();
            match st.objects.remove(&id) {
                Some(Object::Hwpt(h)) if h.nested.is_none() => {
                    h.domain.s2.write().domains.remove(&id);
                }
                Some(Object::Fault(f)) => answered.append(f.destroy()),
                Some(Object::EventQueue(e)) => {
                    e.inner.destroy();
                    self.inner.event_queues.fetch_sub(1, Ordering::Relaxed);
                }
                Some(Object::Vdevice(v)) => {
                    if let Ok(d) = st.dev_mut(v.dev_id) {
                        d.vdevice = None;
                        *d.shared.virt_write() = Default::default();
                    }
                }
                _ => {}
            }
            answered
        };
        answered.finish();
        Ok(())
    }

    /// The kind of a live object.
    pub fn object_kind(&self, id: ObjectId) -> Result<ObjectKind> {
        let st = self.lock();
        Ok(match st.objects.get(&id) {
            None | Some(Object::Tombstone) => return Err(no_such("object", id)),
            Some(Object::Ioas(_)) => ObjectKind::Ioas,
            Some(Object::Device(_)) => ObjectKind::Device,
            Some(Object::Hwpt(h)) if h.nested.is_some() => ObjectKind::HwptNested,
            Some(Object::Hwpt(h)) => ObjectKind::HwptPaging { auto: h.auto },
            Some(Object::Fault(_)) => ObjectKind::FaultQueue,
            Some(Object::Viommu(_)) => ObjectKind::Viommu,
            Some(Object::Vdevice(_)) => ObjectKind::Vdevice,
            Some(Object::EventQueue(_)) => ObjectKind::EventQueue,
        })
    }
}

/// A context with one bound device (`HwInfo::full`), an IOAS and 1 MiB
/// of memory, for the tests of the operations.
#[cfg(test)]
fn test_setup() -> (Iommu, crate::IommuDevice, DevId, IoasId, Arc<crate::Memory>) {
    let iommu = Iommu::new();
    let dev = crate::IommuDevice::new("d0", HwInfo::full());
    let dev_id = iommu.bind(&dev).expect("bind");
    let ioas = iommu.ioas_alloc().expect("ioas");
    let mem = crate::Memory::anonymous("m", 1 << 20).expect("mem");
    (iommu, dev, dev_id, ioas, mem)
}
