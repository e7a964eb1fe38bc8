//! Devices, as their owner (a backend) creates them.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use crate::ctx::CtxInner;
use crate::fault::{FaultInner, PendingFault, MAX_OUTSTANDING_FAULTS_PER_DEVICE};
use crate::ioas::IoasInner;
use crate::prim::{
    AtomicBool, AtomicU32, AtomicUsize, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard,
};
use crate::sync::{lock, Slot};
use crate::translate::Translator;
use crate::types::{DevId, HwInfo};

/// Called (on the responding thread) when a fault group of the device is
/// answered; it must not block.
pub type FaultWaker = Arc<dyn Fn(&PendingFault) + Send + Sync>;

/// Internal key of the RID (no PASID) in attachment tables.
pub(crate) const NO_PASID: u32 = u32::MAX;

pub(crate) fn pasid_key(pasid: Option<u32>) -> u32 {
    pasid.unwrap_or(NO_PASID)
}

/// What an attachment resolves to for translation.
pub(crate) struct Domain {
    /// The stage-2 (or only) IOAS.
    pub(crate) s2: Arc<IoasInner>,
    /// Root of a user-owned stage-1 table (nested HWPT).
    pub(crate) s1_root: Option<u64>,
    /// Fault queue of the HWPT.
    pub(crate) fault: Option<Arc<FaultInner>>,
    /// Dirty tracking state of the (parent) paging HWPT.
    pub(crate) dirty: Option<Arc<DirtyState>>,
}

/// Dirty tracking of a paging HWPT: IOVA page numbers (4 KiB) written
/// since the last clear. While enabled, translators cache writable
/// translations one page at a time and mark the page when they fill it, so
/// every page written through a cached entry is marked.
#[derive(Default)]
pub(crate) struct DirtyState {
    pub(crate) enabled: AtomicBool,
    pub(crate) pages: Mutex<BTreeSet<u64>>,
}

pub(crate) struct Binding {
    pub(crate) ctx: Weak<CtxInner>,
    pub(crate) dev_id: DevId,
}

#[derive(Default)]
pub(crate) struct VirtIds {
    /// The vdevice's virtual id.
    pub(crate) virt_id: Option<u64>,
    /// pPASID → vPASID.
    pub(crate) p2v: HashMap<u32, u32>,
}

pub(crate) struct DeviceShared {
    pub(crate) label: Arc<str>,
    pub(crate) info: HwInfo,
    pub(crate) binding: Mutex<Option<Binding>>,
    /// PASID key → domain, read by translators on a miss.
    pub(crate) attach: RwLock<HashMap<u32, Arc<Domain>>>,
    slots: Mutex<Vec<Weak<Slot>>>,
    fault_waker: Mutex<Option<FaultWaker>>,
    outstanding: AtomicUsize,
    /// Bound on `outstanding` (see [`IommuDevice::set_max_outstanding_faults`]).
    max_outstanding: AtomicUsize,
    pub(crate) virt: RwLock<VirtIds>,
    next_grpid: AtomicU32,
}

impl DeviceShared {
    pub(crate) fn collect_slots(&self, out: &mut Vec<Arc<Slot>>) {
        let mut v = lock(&self.slots);
        v.retain(|w| match w.upgrade() {
            Some(s) => {
                out.push(s);
                true
            }
            None => false,
        });
    }

    pub(crate) fn add_slot(&self, s: &Arc<Slot>) {
        let mut v = lock(&self.slots);
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(s));
    }

    pub(crate) fn try_take_fault_slot(&self) -> bool {
        self.outstanding
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_outstanding_faults()).then_some(n + 1)
            })
            .is_ok()
    }

    pub(crate) fn max_outstanding_faults(&self) -> usize {
        self.max_outstanding.load(Ordering::Relaxed)
    }

    pub(crate) fn release_fault_slot(&self) {
        let _ = self
            .outstanding
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    pub(crate) fn fault_waker(&self) -> Option<FaultWaker> {
        lock(&self.fault_waker).clone()
    }

    pub(crate) fn next_grpid(&self) -> u32 {
        // PRI page request group indexes are 9 bits.
        self.next_grpid.fetch_add(1, Ordering::Relaxed) & 0x1ff
    }

    pub(crate) fn attach_read(&self) -> RwLockReadGuard<'_, HashMap<u32, Arc<Domain>>> {
        self.attach.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn attach_write(&self) -> RwLockWriteGuard<'_, HashMap<u32, Arc<Domain>>> {
        self.attach.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn virt_read(&self) -> RwLockReadGuard<'_, VirtIds> {
        self.virt.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn virt_write(&self) -> RwLockWriteGuard<'_, VirtIds> {
        self.virt.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn bound_ctx(&self) -> Option<(Arc<CtxInner>, DevId)> {
        let b = lock(&self.binding);
        let b = b.as_ref()?;
        Some((b.ctx.upgrade()?, b.dev_id))
    }
}

/// A device: a label and its hardware info. Created by the device's owner,
/// bound to at most one [`Iommu`](crate::Iommu) at a time, and the source of
/// [`Translator`]s for its DMA threads. Cheap to clone.
#[derive(Clone)]
pub struct IommuDevice {
    pub(crate) shared: Arc<DeviceShared>,
}

impl std::fmt::Debug for IommuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuDevice")
            .field("label", &self.shared.label)
            .field("dev_id", &self.dev_id())
            .finish()
    }
}

impl IommuDevice {
    /// A new, unbound device.
    pub fn new(label: impl Into<String>, info: HwInfo) -> IommuDevice {
        let label: String = label.into();
        IommuDevice {
            shared: Arc::new(DeviceShared {
                label: label.into(),
                info,
                binding: Mutex::new(None),
                attach: RwLock::new(HashMap::new()),
                slots: Mutex::new(Vec::new()),
                fault_waker: Mutex::new(None),
                outstanding: AtomicUsize::new(0),
                max_outstanding: AtomicUsize::new(MAX_OUTSTANDING_FAULTS_PER_DEVICE),
                virt: RwLock::new(VirtIds::default()),
                next_grpid: AtomicU32::new(0),
            }),
        }
    }
    /// The label.
    pub fn label(&self) -> &str {
        &self.shared.label
    }
    /// The hardware info.
    pub fn hw_info(&self) -> &HwInfo {
        &self.shared.info
    }
    /// The id of the current binding, if bound.
    pub fn dev_id(&self) -> Option<DevId> {
        self.shared.bound_ctx().map(|(_, id)| id)
    }
    /// A new translator (one per DMA thread).
    pub fn translator(&self) -> Translator {
        Translator::new(self.clone())
    }
    /// Sets or clears the waker called when a fault group is answered.
    pub fn set_fault_waker(&self, waker: Option<FaultWaker>) {
        *lock(&self.shared.fault_waker) = waker;
    }
    /// Fault groups of this device that are queued or awaiting a response.
    pub fn outstanding_faults(&self) -> usize {
        self.shared.outstanding.load(Ordering::SeqCst)
    }
    /// Sets the bound on this device's outstanding fault groups (default
    /// [`MAX_OUTSTANDING_FAULTS_PER_DEVICE`], at least 1): the page requests
    /// system software allows the device to have outstanding, as with the
    /// PCIe PRI capability's Outstanding Page Request Allocation. A device
    /// that serves several clients raises it and shares it out among them
    /// itself. Groups already outstanding stay.
    pub fn set_max_outstanding_faults(&self, n: usize) {
        self.shared
            .max_outstanding
            .store(n.max(1), Ordering::Relaxed);
    }
    /// The bound on this device's outstanding fault groups.
    pub fn max_outstanding_faults(&self) -> usize {
        self.shared.max_outstanding_faults()
    }
}
