//! DMA: how a device reads and writes frontend memory.
//!
//! A [`Dma`] handle is a worker thread's window on its device's I/O address
//! space, valid for one *access section* of the device's iommu-core
//! [`Translator`]. Every access is translated through the IOAS (through the
//! translator's cache), fragment by fragment: one IOVA range need not be one
//! contiguous host buffer. A miss is [`DmaError::NotMapped`], a permission
//! failure [`DmaError::Denied`]; unmapped memory is never touched.
//!
//! Host memory obtained inside a section stays mapped until the section
//! ends: an unmap issued meanwhile waits for it. So a worker must never block
//! while it holds a `Dma` (see [`Worker`](crate::device::Worker)).
//!
//! # PASIDs and I/O page faults
//!
//! A handle addresses one PASID of the device ([`Dma::pasid`]; `None` is
//! the device's RID) and [`Dma::with_pasid`] gives a handle on another PASID
//! in the same section. On an address space whose HWPT has a fault queue, a
//! failed access in the default *raising* mode raises an I/O page fault and
//! returns [`DmaError::Fault`] with the group's [`PendingFault`]: the device
//! ends its section (it must not block inside one), parks the work, and
//! resumes it when [`PendingFault::status`] says the group was answered. A
//! *probe* handle ([`Dma::probe`]) asks "is this mapped?" without side
//! effects: a failure is [`DmaError::NotMapped`] / [`DmaError::Denied`] on
//! any HWPT, no fault group is queued and no event is reported, for accesses
//! whose failure the device reports its own way (a partial completion, a
//! completion record it cannot write).
//!
//! [`Dma::fragment`] is the allocation-free hot path of such devices: the
//! first host-contiguous run of a range, answered inline from the runs the
//! section has already translated, else (one dynamic call) from the
//! translator's cache or the IOAS. [`Dma::copy`] moves bytes between two
//! device addresses.
//!
//! `Dma` also implements vm-memory's [`GuestMemory`](vm_memory::GuestMemory)
//! (the IOVA-aware trait of vm-memory 0.18), which is how virtio-queue walks
//! rings and descriptor chains through the same translation. vm-memory turns
//! errors into its own type and virtio-queue into `None`; the handle keeps the
//! typed cause of the last failure so the queue layer can tell a miss from an
//! empty ring.

use std::cell::RefCell;
use std::marker::PhantomData;

use iommu_core::Fragment;

/// The iommu-core types a device needs next to its DMA handle, re-exported
/// so that backends use them through the framework.
pub use iommu_core::{FaultStatus, PageResponseCode, PendingFault, Perm, Translator};

/// The access a DMA operation makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The device reads (driver-to-device buffer).
    Read,
    /// The device writes (device-to-driver buffer).
    Write,
    /// Both.
    ReadWrite,
}

impl Access {
    /// The iommu-core permission this access needs.
    pub fn perm(self) -> Perm {
        match self {
            Access::Read => Perm::READ,
            Access::Write => Perm::WRITE,
            Access::ReadWrite => Perm::RW,
        }
    }

    fn from_vm(p: vm_memory::Permissions) -> Access {
        match p {
            vm_memory::Permissions::Write => Access::Write,
            vm_memory::Permissions::ReadWrite => Access::ReadWrite,
            vm_memory::Permissions::Read | vm_memory::Permissions::No => Access::Read,
        }
    }
}

/// Errors of DMA accesses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// No translation exists for the address: the frontend has not mapped it
    /// (yet). Recoverable: the framework asks the frontend and parks the queue.
    #[error("Iova {iova:#x} is not mapped for {access:?}")]
    NotMapped {
        /// The first unmapped address.
        iova: u64,
        /// The access attempted.
        access: Access,
    },
    /// A translation exists but does not allow the access.
    #[error("Iova {iova:#x} does not allow {access:?}")]
    Denied {
        /// The address.
        iova: u64,
        /// The access attempted.
        access: Access,
    },
    /// The access failed on an address space with a fault queue and raised
    /// an I/O page fault (raising mode only; a probe reports
    /// [`DmaError::NotMapped`] / [`DmaError::Denied`] instead). The fault
    /// group stays outstanding until its owner answers it: end the access
    /// section, then poll [`PendingFault::status`] (or wait, outside any
    /// section) and retry on [`FaultStatus::Success`].
    #[error("Iova {iova:#x} raised an I/O page fault for {access:?}")]
    Fault {
        /// The faulting address.
        iova: u64,
        /// The access attempted.
        access: Access,
        /// The raised fault group.
        pending: PendingFault,
    },
    /// `iova + len` overflows the 64-bit address space.
    #[error("Range {iova:#x}+{len:#x} overflows")]
    Overflow {
        /// Start of the range.
        iova: u64,
        /// Its length.
        len: u64,
    },
    /// Nothing is attached to the device: DMA is blocked.
    #[error("DMA is blocked: no address space attached")]
    Blocked,
    /// Any other translation failure (for example an I/O page fault raised on
    /// a fault-capable address space).
    #[error("Translation failed at {iova:#x}")]
    Failed {
        /// The address.
        iova: u64,
        /// The iommu-core error.
        #[source]
        source: iommu_core::Error,
    },
    /// A memory error whose cause was not recorded.
    #[error("Unknown memory error")]
    Unknown,
}

impl DmaError {
    /// True for a miss the frontend can resolve by mapping the address.
    pub fn is_miss(&self) -> bool {
        self.miss_address().is_some()
    }

    /// The address and access of a miss.
    pub fn miss_address(&self) -> Option<(u64, Access)> {
        match self {
            DmaError::NotMapped { iova, access } => Some((*iova, *access)),
            DmaError::Denied { .. }
            | DmaError::Fault { .. }
            | DmaError::Overflow { .. }
            | DmaError::Blocked
            | DmaError::Failed { .. }
            | DmaError::Unknown => None,
        }
    }

    /// The address and access of a permission failure.
    pub fn denied_address(&self) -> Option<(u64, Access)> {
        match self {
            DmaError::Denied { iova, access } => Some((*iova, *access)),
            DmaError::NotMapped { .. }
            | DmaError::Fault { .. }
            | DmaError::Overflow { .. }
            | DmaError::Blocked
            | DmaError::Failed { .. }
            | DmaError::Unknown => None,
        }
    }

    /// The I/O page fault this access raised, if it raised one.
    pub fn pending_fault(&self) -> Option<&PendingFault> {
        match self {
            DmaError::Fault { pending, .. } => Some(pending),
            DmaError::NotMapped { .. }
            | DmaError::Denied { .. }
            | DmaError::Overflow { .. }
            | DmaError::Blocked
            | DmaError::Failed { .. }
            | DmaError::Unknown => None,
        }
    }

    /// The first address the access could not reach, for the failures that
    /// name one (miss, permission, raised fault).
    pub fn fault_address(&self) -> Option<u64> {
        match self {
            DmaError::NotMapped { iova, .. }
            | DmaError::Denied { iova, .. }
            | DmaError::Fault { iova, .. } => Some(*iova),
            DmaError::Overflow { .. }
            | DmaError::Blocked
            | DmaError::Failed { .. }
            | DmaError::Unknown => None,
        }
    }

    fn from_core(e: iommu_core::Error, iova: u64, len: u64, access: Access) -> DmaError {
        match e {
            iommu_core::Error::FaultRaised { iova, pending, .. } => DmaError::Fault {
                iova,
                access,
                pending,
            },
            iommu_core::Error::Unmapped { iova, .. } => DmaError::NotMapped { iova, access },
            iommu_core::Error::AccessDenied { iova, .. } => DmaError::Denied { iova, access },
            iommu_core::Error::NotAttached { .. } => DmaError::Blocked,
            iommu_core::Error::Overflow { .. } => DmaError::Overflow { iova, len },
            source => DmaError::Failed { iova, source },
        }
    }
}

/// Result of DMA operations.
pub type Result<T> = std::result::Result<T, DmaError>;

/// Capacity the fragment scratch vector is trimmed back to after an access
/// that resolved to more fragments.
pub const MAX_FRAGMENTS: usize = 1024;

/// Fragments [`Dma::with_fragments`] hands out without allocating.
pub const INLINE_FRAGMENTS: usize = 8;

/// Contiguous translations remembered for the rest of a section.
const HOT_ENTRIES: usize = 8;
/// Smallest single-fragment translation worth remembering (rings, buffers).
const HOT_MIN_LEN: u64 = 16;
/// Aligned window translated speculatively around a small access.
const HOT_WINDOW: u64 = 64 * 1024;

/// A translation obtained earlier in the same section: `len` bytes at `iova`
/// of `pasid` are contiguous host memory at `ptr`, allowed for `perm`.
/// `iova + len - 1` never overflows.
#[derive(Clone, Copy)]
struct Hot {
    pasid: Option<u32>,
    iova: u64,
    len: u64,
    ptr: *mut u8,
    perm: Perm,
}

/// What a [`HotCache`] slot keeps besides its range.
#[derive(Clone, Copy)]
struct HotTarget {
    pasid: Option<u32>,
    ptr: *mut u8,
    perm: Perm,
}

impl HotTarget {
    const EMPTY: HotTarget = HotTarget {
        pasid: None,
        ptr: std::ptr::null_mut(),
        perm: Perm::from_bits_retain(0),
    };
}

/// The translations a section remembers. It has no lifetime of its own, so
/// a [`Dma`] handle refers to it directly (no dynamic dispatch) and answers
/// repeated accesses inline. The ranges are kept apart from the rest of the
/// entries so that a lookup scans two cache lines.
pub(crate) struct HotCache {
    /// Start of each run.
    iova: [std::cell::Cell<u64>; HOT_ENTRIES],
    /// Length of each run (0: empty slot).
    len: [std::cell::Cell<u64>; HOT_ENTRIES],
    entries: [std::cell::Cell<HotTarget>; HOT_ENTRIES],
    next: std::cell::Cell<usize>,
}

impl HotCache {
    fn new() -> HotCache {
        HotCache {
            iova: Default::default(),
            len: Default::default(),
            entries: std::array::from_fn(|_| std::cell::Cell::new(HotTarget::EMPTY)),
            next: std::cell::Cell::new(0),
        }
    }

    /// The remembered run holding `iova` for (`pasid`, `perm`), as the
    /// fragment from `iova` to the run's end, at most `len` bytes.
    #[inline(always)]
    fn prefix(&self, pasid: Option<u32>, iova: u64, len: u64, perm: Perm) -> Option<Fragment> {
        for i in 0..HOT_ENTRIES {
            let off = iova.wrapping_sub(self.iova[i].get());
            let run = self.len[i].get();
            if off < run {
                let h = self.entries[i].get();
                if h.pasid == pasid && h.perm.contains(perm) {
                    return Some(Fragment {
                        ptr: h.ptr.wrapping_add(off as usize),
                        len: len.min(run - off) as usize,
                    });
                }
            }
        }
        None
    }

    /// The remembered run holding all of `iova..=last`, as one fragment.
    #[inline]
    fn whole(&self, pasid: Option<u32>, iova: u64, last: u64, perm: Perm) -> Option<Fragment> {
        let len = last - iova + 1;
        self.prefix(pasid, iova, len, perm)
            .filter(|f| f.len as u64 == len)
    }

    fn remember(&self, h: Hot) {
        let i = self.next.get() % HOT_ENTRIES;
        self.iova[i].set(h.iova);
        self.len[i].set(h.len);
        self.entries[i].set(HotTarget {
            pasid: h.pasid,
            ptr: h.ptr,
            perm: h.perm,
        });
        self.next.set(i + 1);
    }
}

/// One open access section of a translator, with its scratch storage.
///
/// Within a section the host memory behind a translation stays mapped (an
/// unmap waits for the section to end), so the section remembers a few
/// recent contiguous translations (the rings, the buffers of popped chains)
/// and answers repeated small accesses to them without asking iommu-core.
pub(crate) struct Section<'t> {
    access: RefCell<iommu_core::AccessSection<'t>>,
    pasid: Option<u32>,
    frags: RefCell<Vec<Fragment>>,
    last_err: RefCell<Option<DmaError>>,
    /// Cause of the last failed [`SectionOps::contiguous`].
    contiguous_err: RefCell<Option<DmaError>>,
    hot: HotCache,
    windows: std::cell::Cell<bool>,
    /// An invalidation waited for the translator's pins when the section
    /// began: no pin is taken in it, so that it ends with none and the
    /// invalidation passes (see [`Dma::drain_requested`]).
    drain_at_start: bool,
}

impl<'t> Section<'t> {
    /// Opens a section. `speculate`: translate whole aligned windows around
    /// small accesses (only where a failed speculative translation has no
    /// side effect: no fault or event queue behind the device's HWPT, as for
    /// vhost-user devices whose memory table is their address space).
    pub(crate) fn new(translator: &'t mut Translator, pasid: Option<u32>, speculate: bool) -> Self {
        // Late writes of the thread's last section are made before this one
        // begins (and so before its translator lets go of their memory).
        #[cfg(feature = "fault-injection")]
        crate::fault_injection::after_section();
        let drain_at_start = translator.drain_requested();
        Section {
            drain_at_start,
            access: RefCell::new(translator.access()),
            pasid,
            // Allocated on the first multi-fragment translation only: a
            // section that only asks for contiguous runs never allocates.
            frags: RefCell::new(Vec::new()),
            last_err: RefCell::new(None),
            contiguous_err: RefCell::new(None),
            hot: HotCache::new(),
            windows: std::cell::Cell::new(speculate),
        }
    }
}

/// What a [`Dma`] handle needs from a section (object-safe, so the handle
/// carries no invariant lifetime).
pub(crate) trait SectionOps {
    /// The PASID handles made by [`Dma::from_section`] address.
    fn pasid(&self) -> Option<u32>;
    /// The section's remembered translations.
    fn hot(&self) -> &HotCache;
    fn translate_with(
        &self,
        at: Target,
        iova: u64,
        len: u64,
        access: Access,
        f: &mut dyn FnMut(&[Fragment]) -> Result<()>,
    ) -> Result<()>;
    /// The first run of `iova..iova+len` (`len >= 1`), or an empty
    /// fragment after a failure, whose cause [`SectionOps::contiguous_error`]
    /// then takes. (Two words: returned in registers on the hot path.)
    fn contiguous(&self, at: Target, iova: u64, len: u64, access: Access) -> Fragment;
    fn contiguous_error(&self) -> DmaError;
    fn copy(&self, at: Target, src: u64, dst: u64, len: u64) -> Result<()>;
    fn invalidation_requested(&self) -> bool;
    /// Pins the section's translations beyond its end (None: the section
    /// is borrowed re-entrantly).
    fn pin(&self) -> Option<iommu_core::AccessPin>;
    /// Releases a pin of this section's translator.
    fn unpin(&self, pin: iommu_core::AccessPin) -> std::result::Result<(), iommu_core::AccessPin>;
    /// Pins held and an invalidation waits for them.
    fn drain_requested(&self) -> bool;
    fn record(&self, e: DmaError);
    fn take(&self) -> Option<DmaError>;
}

/// Where and how a handle translates: its PASID, and whether a failure may
/// raise an I/O page fault (or report an event).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pasid: Option<u32>,
    probe: bool,
}

impl Section<'_> {
    #[cold]
    fn contiguous_failed(&self, e: DmaError) {
        if let Ok(mut slot) = self.contiguous_err.try_borrow_mut() {
            *slot = Some(e);
        }
    }

    fn remember(&self, h: Hot) {
        self.hot.remember(h);
    }
}

impl SectionOps for Section<'_> {
    fn pasid(&self) -> Option<u32> {
        self.pasid
    }

    fn hot(&self) -> &HotCache {
        &self.hot
    }

    fn translate_with(
        &self,
        at: Target,
        iova: u64,
        len: u64,
        access: Access,
        f: &mut dyn FnMut(&[Fragment]) -> Result<()>,
    ) -> Result<()> {
        if len == 0 {
            return f(&[]);
        }
        let Some(last) = iova.checked_add(len - 1) else {
            return Err(DmaError::Overflow { iova, len });
        };
        let perm = access.perm();
        let hit = self.hot.whole(at.pasid, iova, last, perm);
        if let Some(frag) = hit {
            return f(&[frag]);
        }
        let (Ok(mut acc), Ok(mut frags)) =
            (self.access.try_borrow_mut(), self.frags.try_borrow_mut())
        else {
            // Re-entrant use from inside a callback: refuse rather than alias.
            return Err(DmaError::Unknown);
        };
        // Try the enclosing window first: mappings are usually much larger
        // than one buffer, and one window answers many later accesses.
        if self.windows.get() && len <= HOT_WINDOW {
            let start = iova & !(HOT_WINDOW - 1);
            let wlast = last | (HOT_WINDOW - 1);
            let wlen = wlast - start + 1;
            // Speculation never has side effects: no fault, no event.
            let ok = acc
                .translate_nofault(at.pasid, start, wlen, perm, &mut frags)
                .is_ok();
            if ok && frags.len() == 1 {
                let base = frags[0].ptr;
                self.remember(Hot {
                    pasid: at.pasid,
                    iova: start,
                    len: wlen,
                    ptr: base,
                    perm,
                });
                drop(acc);
                let off = usize::try_from(iova - start).unwrap_or(usize::MAX);
                let frag = Fragment {
                    ptr: base.wrapping_add(off),
                    len: usize::try_from(len).unwrap_or(usize::MAX),
                };
                return f(&[frag]);
            }
            // Sparse mappings: stop trying windows in this section.
            self.windows.set(false);
        }
        let r = if at.probe {
            acc.translate_nofault(at.pasid, iova, len, perm, &mut frags)
        } else {
            acc.translate(at.pasid, iova, len, perm, &mut frags)
        };
        r.map_err(|e| DmaError::from_core(e, iova, len, access))?;
        drop(acc);
        if frags.len() == 1 && len >= HOT_MIN_LEN {
            self.remember(Hot {
                pasid: at.pasid,
                iova,
                len,
                ptr: frags[0].ptr,
                perm,
            });
        }
        let r = f(&frags);
        if frags.capacity() > MAX_FRAGMENTS {
            frags.shrink_to(MAX_FRAGMENTS);
        }
        r
    }

    #[inline]
    fn contiguous(&self, at: Target, iova: u64, len: u64, access: Access) -> Fragment {
        let failed = Fragment {
            ptr: std::ptr::NonNull::dangling().as_ptr(),
            len: 0,
        };
        let Ok(mut acc) = self.access.try_borrow_mut() else {
            self.contiguous_failed(DmaError::Unknown);
            return failed;
        };
        let perm = access.perm();
        // Ask for the whole host-contiguous run around `iova` without side
        // effects: a success is the same in both modes, and the run is
        // remembered from its start, so the handle answers later accesses
        // anywhere in it inline. (Remembered from `iova` on, a run missed
        // for every buffer below the first one seen: with a frontend's
        // buffer pool in one region, 22 % of the loop's buffer
        // translations went to the translator.)
        let rest = (u64::MAX - iova).saturating_add(1);
        let r = match acc.run_nofault(at.pasid, iova, rest, perm) {
            Ok(run) => {
                self.remember(Hot {
                    pasid: at.pasid,
                    iova: run.iova,
                    len: run.len,
                    ptr: run.ptr,
                    perm,
                });
                let off = iova - run.iova;
                return Fragment {
                    ptr: run.ptr.wrapping_add(off as usize),
                    len: (run.len - off).min(len) as usize,
                };
            }
            Err(e) if at.probe => Err(e),
            // Raising: translate again with the access's own length, so
            // that the fault group (or event) covers what it needs.
            Err(_) => acc.translate_contiguous(at.pasid, iova, len, perm),
        };
        match r {
            // Mapped meanwhile (maps do not wait for sections).
            Ok(f) if f.len > 0 => f,
            Ok(_) => {
                self.contiguous_failed(DmaError::NotMapped { iova, access });
                failed
            }
            Err(e) => {
                self.contiguous_failed(DmaError::from_core(e, iova, len, access));
                failed
            }
        }
    }

    fn contiguous_error(&self) -> DmaError {
        self.contiguous_err
            .try_borrow_mut()
            .ok()
            .and_then(|mut e| e.take())
            .unwrap_or(DmaError::Unknown)
    }

    fn copy(&self, at: Target, src: u64, dst: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let Ok(mut acc) = self.access.try_borrow_mut() else {
            return Err(DmaError::Unknown);
        };
        let r = if at.probe {
            acc.copy_nofault(at.pasid, src, at.pasid, dst, len)
        } else {
            acc.copy(at.pasid, src, at.pasid, dst, len)
        };
        r.map_err(|e| {
            // iommu-core checks the whole source before the destination, so
            // an address inside the source range failed the read, unless
            // the error says it was a write permission.
            let failed_at = match &e {
                iommu_core::Error::Unmapped { iova, .. }
                | iommu_core::Error::FaultRaised { iova, .. } => Some((*iova, None)),
                iommu_core::Error::AccessDenied { iova, perm, .. } => Some((*iova, Some(*perm))),
                _ => None,
            };
            let access = match failed_at {
                Some((_, Some(p))) if p.contains(Perm::WRITE) => Access::Write,
                Some((a, None)) if a.wrapping_sub(src) >= len => Access::Write,
                _ => Access::Read,
            };
            let base = if access == Access::Write { dst } else { src };
            DmaError::from_core(e, base, len, access)
        })
    }

    fn invalidation_requested(&self) -> bool {
        self.access
            .try_borrow()
            .is_ok_and(|a| a.invalidation_requested())
    }

    fn pin(&self) -> Option<iommu_core::AccessPin> {
        self.access.try_borrow_mut().ok().map(|mut a| a.pin())
    }

    fn unpin(&self, pin: iommu_core::AccessPin) -> std::result::Result<(), iommu_core::AccessPin> {
        match self.access.try_borrow_mut() {
            Ok(mut a) => {
                a.unpin(pin);
                Ok(())
            }
            Err(_) => Err(pin),
        }
    }

    fn drain_requested(&self) -> bool {
        self.drain_at_start || self.access.try_borrow().is_ok_and(|a| a.drain_requested())
    }

    fn record(&self, e: DmaError) {
        if let Ok(mut l) = self.last_err.try_borrow_mut() {
            *l = Some(e);
        }
    }

    fn take(&self) -> Option<DmaError> {
        self.last_err
            .try_borrow_mut()
            .ok()
            .and_then(|mut l| l.take())
    }
}

/// A worker thread's DMA handle for one access section, on one PASID, in
/// raising or probe mode. Cheap to copy.
#[derive(Clone, Copy)]
pub struct Dma<'a> {
    ops: &'a (dyn SectionOps + 'a),
    hot: &'a HotCache,
    at: Target,
}

impl std::fmt::Debug for Dma<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dma")
            .field("pasid", &self.at.pasid)
            .field("probe", &self.at.probe)
            .finish_non_exhaustive()
    }
}

/// One host-contiguous run of device memory, valid for the rest of the
/// access section it was translated in (the `'a` of its [`Dma`] handle).
///
/// The memory may be shared with the frontend or client process, which can
/// change it at any time: access it through raw pointers or volatile
/// accesses ([`DmaFragment::as_volatile_slice`]), never as a Rust reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaFragment<'a> {
    ptr: *mut u8,
    len: usize,
    section: PhantomData<&'a ()>,
}

impl<'a> DmaFragment<'a> {
    /// Host address of the first byte; valid for [`DmaFragment::len`] bytes
    /// (writable when translated for write) until the section ends.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for the empty fragment of a zero-length request.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The fragment as a vm-memory volatile slice.
    pub fn as_volatile_slice(&self) -> vm_memory::VolatileSlice<'a> {
        // SAFETY: iommu-core returned `len` bytes at `ptr` that stay mapped
        // until the access section ends, which outlives `'a`; a zero-length
        // fragment is never dereferenced.
        unsafe { vm_memory::VolatileSlice::new(self.ptr, self.len) }
    }
}

impl<'a> Dma<'a> {
    /// Opens an access section of `translator` on `pasid` (`None`: the
    /// device's RID) and runs `f` with a handle to it. The section ends when
    /// `f` returns; `f` must not block.
    pub fn enter<R>(
        translator: &mut Translator,
        pasid: Option<u32>,
        f: impl FnOnce(Dma<'_>) -> R,
    ) -> R {
        let r = {
            let section = Section::new(translator, pasid, false);
            f(Dma::from_section(&section))
        };
        #[cfg(feature = "fault-injection")]
        crate::fault_injection::after_section();
        r
    }

    pub(crate) fn from_section(ops: &'a (dyn SectionOps + 'a)) -> Self {
        Dma {
            ops,
            hot: ops.hot(),
            at: Target {
                pasid: ops.pasid(),
                probe: false,
            },
        }
    }

    /// The PASID this handle addresses (`None`: the device's RID).
    pub fn pasid(&self) -> Option<u32> {
        self.at.pasid
    }

    /// A handle on `pasid` in the same access section, same mode.
    #[must_use]
    pub fn with_pasid(self, pasid: Option<u32>) -> Dma<'a> {
        Dma {
            at: Target { pasid, ..self.at },
            ..self
        }
    }

    /// The probe form of this handle: its failures are
    /// [`DmaError::NotMapped`] / [`DmaError::Denied`] on any HWPT, without
    /// an I/O page fault or an event. For accesses whose failure the device
    /// reports its own way.
    #[must_use]
    pub fn probe(self) -> Dma<'a> {
        Dma {
            at: Target {
                probe: true,
                ..self.at
            },
            ..self
        }
    }

    /// The raising form of this handle (the default): a failure on a HWPT
    /// with a fault queue raises an I/O page fault ([`DmaError::Fault`]),
    /// on one without reports an event.
    #[must_use]
    pub fn raising(self) -> Dma<'a> {
        Dma {
            at: Target {
                probe: false,
                ..self.at
            },
            ..self
        }
    }

    /// True for a probe handle.
    pub fn is_probe(&self) -> bool {
        self.at.probe
    }

    /// True when an unmap or invalidation started since the section
    /// began: a device in a long section should finish its current unit of
    /// work and end the section, so the invalidation can complete.
    pub fn invalidation_requested(&self) -> bool {
        self.ops.invalidation_requested()
    }

    /// True while this thread holds access pins (I/O in flight on
    /// deferred chains, [`crate::queue::InFlight`]) and an invalidation of
    /// the device waits for them, or when one did as this access section
    /// began: finish or cancel that I/O, and start no new one in this
    /// section. (Sticky for the section: the pins released by completions
    /// in it must not be replaced by new ones before it ends, or the
    /// translator's section would never end and the invalidation would
    /// wait for as long as requests keep coming.)
    pub fn drain_requested(&self) -> bool {
        self.ops.drain_requested()
    }

    pub(crate) fn pin(&self) -> Option<iommu_core::AccessPin> {
        self.ops.pin()
    }

    pub(crate) fn unpin(
        &self,
        pin: iommu_core::AccessPin,
    ) -> std::result::Result<(), iommu_core::AccessPin> {
        self.ops.unpin(pin)
    }

    /// Checks that `iova..iova+len` is mapped for `access` (and warms the
    /// translation cache for it).
    pub fn check(&self, iova: u64, len: u64, access: Access) -> Result<()> {
        self.ops
            .translate_with(self.at, iova, len, access, &mut |_| Ok(()))
    }

    /// The first host-contiguous run of `iova..iova+len`: it starts at
    /// `iova` and holds at most `len` bytes (fewer when the range goes on
    /// in another host buffer, or another area). Zero-copy and
    /// allocation-free: an address inside a run the section already
    /// translated (for this PASID and permission) is answered inline; else
    /// the whole run is asked of iommu-core once, without side effects, and
    /// remembered, and only if that fails does a raising handle translate
    /// again to raise the fault. A zero `len` gives an empty fragment.
    #[inline]
    pub fn fragment(&self, iova: u64, len: u64, access: Access) -> Result<DmaFragment<'a>> {
        match self.hot.prefix(self.at.pasid, iova, len, access.perm()) {
            Some(f) if len != 0 => Ok(DmaFragment {
                ptr: f.ptr,
                len: f.len,
                section: PhantomData,
            }),
            _ => self.fragment_slow(iova, len, access),
        }
    }

    /// [`Dma::fragment`] past the remembered runs: asks iommu-core.
    #[cold]
    #[inline(never)]
    fn fragment_slow(&self, iova: u64, len: u64, access: Access) -> Result<DmaFragment<'a>> {
        if len == 0 {
            return Ok(DmaFragment {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
                section: PhantomData,
            });
        }
        let f = self.ops.contiguous(self.at, iova, len, access);
        if f.len == 0 {
            return Err(self.ops.contiguous_error());
        }
        Ok(DmaFragment {
            ptr: f.ptr,
            len: f.len,
            section: PhantomData,
        })
    }

    /// The host address of all `len` bytes at `iova` when one run this
    /// section already translated (for this PASID and `access`) holds them
    /// (what [`Dma::fragment`] would return whole, without a result to build
    /// or a call to make); `None` otherwise, and for `len == 0`, without any
    /// side effect: the caller then asks [`Dma::fragment`]. The queue's
    /// one-buffer pop uses it (see `queue/walk.rs`).
    #[inline(always)]
    pub(crate) fn hot_whole(&self, iova: u64, len: u64, access: Access) -> Option<*mut u8> {
        match self.hot.prefix(self.at.pasid, iova, len, access.perm()) {
            Some(f) if len != 0 && f.len as u64 == len => Some(f.ptr),
            _ => None,
        }
    }

    /// Copies `len` bytes from `src` to `dst` (both device addresses of
    /// this handle's PASID; memmove semantics per pair of host fragments).
    /// Both ranges are translated first: on error nothing was copied. The
    /// error's access is [`Access::Read`] for the source, [`Access::Write`]
    /// for the destination.
    pub fn copy(&self, src: u64, dst: u64, len: u64) -> Result<()> {
        self.ops.copy(self.at, src, dst, len)
    }

    /// Runs `f` with the host fragments covering `iova..iova+len`, in order.
    /// The slices are valid only inside `f`; use them for zero-copy I/O
    /// (`readv`/`writev` on a tap, for instance). Allocation-free for up to
    /// [`INLINE_FRAGMENTS`] fragments.
    pub fn with_fragments<R>(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        f: impl FnOnce(&[vm_memory::VolatileSlice<'_>]) -> R,
    ) -> Result<R> {
        let mut f = Some(f);
        let mut out = None;
        self.ops
            .translate_with(self.at, iova, len, access, &mut |frags| {
                let slice = |fr: &Fragment| {
                    // SAFETY: iommu-core returned `fr.len` bytes at `fr.ptr` that
                    // stay mapped until the access section ends, which is after
                    // this callback returns; the slice does not escape it.
                    unsafe { vm_memory::VolatileSlice::new(fr.ptr, fr.len) }
                };
                let Some(f) = f.take() else { return Ok(()) };
                if frags.len() <= INLINE_FRAGMENTS {
                    let empty = || {
                        // SAFETY: a zero-length slice at a dangling, well-aligned
                        // pointer is never dereferenced.
                        unsafe {
                            vm_memory::VolatileSlice::new(std::ptr::NonNull::dangling().as_ptr(), 0)
                        }
                    };
                    let arr: [vm_memory::VolatileSlice<'_>; INLINE_FRAGMENTS] =
                        std::array::from_fn(|i| frags.get(i).map_or_else(empty, slice));
                    out = Some(f(&arr[..frags.len()]));
                } else {
                    let v: Vec<vm_memory::VolatileSlice<'_>> = frags.iter().map(slice).collect();
                    out = Some(f(&v));
                }
                Ok(())
            })?;
        out.ok_or(DmaError::Unknown)
    }

    /// Reads `buf.len()` bytes at `iova`.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.ops
            .translate_with(self.at, iova, len, Access::Read, &mut |frags| {
                let mut done = 0usize;
                for fr in frags {
                    let n = fr.len.min(buf.len() - done);
                    // SAFETY: `fr.ptr` is valid for `fr.len >= n` bytes for the
                    // rest of the access section (iommu-core's translation
                    // contract); `buf[done..done + n]` is in bounds and cannot
                    // overlap guest memory we only reach through raw pointers.
                    unsafe { std::ptr::copy_nonoverlapping(fr.ptr, buf[done..].as_mut_ptr(), n) };
                    done += n;
                }
                Ok(())
            })
    }

    /// Writes `data` at `iova`.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        self.ops
            .translate_with(self.at, iova, len, Access::Write, &mut |frags| {
                let mut done = 0usize;
                for fr in frags {
                    let n = fr.len.min(data.len() - done);
                    // SAFETY: `fr.ptr` is valid and writable for `fr.len >= n`
                    // bytes until the access section ends (the translation was
                    // made for write permission); the source is a distinct slice.
                    unsafe { std::ptr::copy_nonoverlapping(data[done..].as_ptr(), fr.ptr, n) };
                    done += n;
                }
                Ok(())
            })
    }

    /// Reads a plain-data object at `iova`.
    pub fn read_obj<T: vm_memory::ByteValued + Default>(&self, iova: u64) -> Result<T> {
        let mut v = T::default();
        self.read(iova, v.as_mut_slice())?;
        Ok(v)
    }

    /// Writes a plain-data object at `iova`.
    pub fn write_obj<T: vm_memory::ByteValued>(&self, iova: u64, v: &T) -> Result<()> {
        self.write(iova, v.as_slice())
    }

    pub(crate) fn clear_fault(&self) {
        let _ = self.ops.take();
    }

    pub(crate) fn take_fault(&self) -> Option<DmaError> {
        self.ops.take()
    }

    /// The first contiguous host fragment of `iova..iova+len`.
    fn first_fragment(&self, iova: u64, len: usize, access: Access) -> Result<(*mut u8, usize)> {
        let mut first = None;
        self.ops
            .translate_with(self.at, iova, len as u64, access, &mut |frags| {
                first = frags.first().map(|f| (f.ptr, f.len));
                Ok(())
            })?;
        first.ok_or(DmaError::NotMapped { iova, access })
    }
}

/// Iterator over the host fragments of an IOVA range, translated lazily.
#[derive(Debug)]
pub struct DmaSlices<'a> {
    dma: Dma<'a>,
    iova: u64,
    remaining: usize,
    access: Access,
    done: bool,
}

impl<'a> Iterator for DmaSlices<'a> {
    type Item = vm_memory::guest_memory::Result<vm_memory::VolatileSlice<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.remaining == 0 {
            return None;
        }
        match self
            .dma
            .first_fragment(self.iova, self.remaining, self.access)
        {
            Ok((ptr, n)) => {
                let n = n.min(self.remaining);
                self.remaining -= n;
                self.iova = self.iova.wrapping_add(n as u64);
                // SAFETY: iommu-core returned `n` bytes of host memory that stay
                // mapped until the access section ends; the section outlives
                // `'a`, the borrow every `Dma<'a>` is tied to. Accesses through
                // VolatileSlice are volatile.
                Some(Ok(unsafe { vm_memory::VolatileSlice::new(ptr, n) }))
            }
            Err(e) => {
                self.done = true;
                let addr = vm_memory::GuestAddress(self.iova);
                self.dma.ops.record(e);
                Some(Err(vm_memory::GuestMemoryError::InvalidGuestAddress(addr)))
            }
        }
    }
}

impl std::iter::FusedIterator for DmaSlices<'_> {}

impl<'a> vm_memory::guest_memory::GuestMemorySliceIterator<'a, ()> for DmaSlices<'a> {}

impl vm_memory::GuestMemory for Dma<'_> {
    type PhysicalMemory = vm_memory::GuestMemoryMmap<()>;
    type Bitmap = ();

    fn check_range(
        &self,
        addr: vm_memory::GuestAddress,
        count: usize,
        access: vm_memory::Permissions,
    ) -> bool {
        match self.check(addr.0, count as u64, Access::from_vm(access)) {
            Ok(()) => true,
            Err(e) => {
                self.ops.record(e);
                false
            }
        }
    }

    fn get_slices<'b>(
        &'b self,
        addr: vm_memory::GuestAddress,
        count: usize,
        access: vm_memory::Permissions,
    ) -> vm_memory::guest_memory::Result<
        impl vm_memory::guest_memory::GuestMemorySliceIterator<'b, vm_memory::bitmap::BS<'b, ()>>,
    > {
        if count > 0 && addr.0.checked_add(count as u64 - 1).is_none() {
            self.ops.record(DmaError::Overflow {
                iova: addr.0,
                len: count as u64,
            });
            return Err(vm_memory::GuestMemoryError::GuestAddressOverflow);
        }
        Ok(DmaSlices {
            dma: *self,
            iova: addr.0,
            remaining: count,
            access: Access::from_vm(access),
            done: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use iommu_core::{HwInfo, Iommu, Memory};

    use super::*;

    fn setup() -> (
        Iommu,
        iommu_core::IommuDevice,
        u32,
        std::sync::Arc<Memory>,
        std::sync::Arc<Memory>,
    ) {
        let iommu = Iommu::new();
        let core = iommu_core::IommuDevice::new("dma", HwInfo::default());
        let dev = iommu.bind(&core).expect("bind");
        let ioas = iommu.ioas_alloc().expect("ioas");
        iommu.attach(dev, None, ioas).expect("attach");
        // Two separate host buffers, adjacent in IOVA space.
        let a = Memory::anonymous("a", 0x1000).expect("a");
        let b = Memory::anonymous("b", 0x1000).expect("b");
        iommu
            .ioas_map(ioas, &a, 0, 0x1000, Some(0x10000), Perm::RW)
            .expect("map a");
        iommu
            .ioas_map(ioas, &b, 0, 0x1000, Some(0x11000), Perm::READ)
            .expect("map b");
        (iommu, core, ioas, a, b)
    }

    #[test]
    fn test_access_spanning_two_host_buffers() {
        let (_iommu, core, _ioas, a, b) = setup();
        a.write_at(0xffe, b"xy").expect("write");
        b.write_at(0, b"zw").expect("write");
        let mut tr = core.translator();
        Dma::enter(&mut tr, None, |dma| {
            let mut buf = [0u8; 4];
            dma.read(0x10ffe, &mut buf).expect("read across");
            assert_eq!(&buf, b"xyzw");
            let n = dma
                .with_fragments(0x10ff0, 0x20, Access::Read, |s| s.len())
                .expect("fragments");
            assert_eq!(n, 2, "one IOVA range, two host fragments");
            let v: u32 = dma.read_obj(0x10ffe).expect("read obj");
            assert_eq!(v.to_ne_bytes(), *b"xyzw");
        });
    }

    #[test]
    fn test_miss_permission_and_overflow_are_typed() {
        let (_iommu, core, _ioas, _a, _b) = setup();
        let mut tr = core.translator();
        Dma::enter(&mut tr, None, |dma| {
            assert_eq!(
                dma.read(0x20000, &mut [0u8; 4]),
                Err(DmaError::NotMapped {
                    iova: 0x20000,
                    access: Access::Read
                })
            );
            // Writable part first, then a read-only page: denied at the boundary.
            let e = dma.write(0x10ff0, &[0u8; 0x20]).expect_err("denied");
            assert_eq!(e.denied_address(), Some((0x11000, Access::Write)));
            assert!(matches!(
                dma.check(u64::MAX - 1, 8, Access::Read),
                Err(DmaError::Overflow { .. })
            ));
            // The first half was not written: a failed access touches nothing.
            assert!(dma.check(0x10000, 0x1000, Access::Write).is_ok());
        });
    }

    #[test]
    fn test_guest_memory_records_typed_cause() {
        use vm_memory::{Bytes, GuestAddress};
        let (_iommu, core, _ioas, _a, _b) = setup();
        let mut tr = core.translator();
        Dma::enter(&mut tr, None, |dma| {
            let r: std::result::Result<u16, _> = Bytes::read_obj(&dma, GuestAddress(0x30000));
            assert!(r.is_err());
            assert_eq!(
                dma.take_fault(),
                Some(DmaError::NotMapped {
                    iova: 0x30000,
                    access: Access::Read
                })
            );
            let v: u16 = Bytes::read_obj(&dma, GuestAddress(0x10000)).expect("read");
            assert_eq!(v, 0);
        });
    }

    const P: u64 = 0x1000;
    const PASID: u32 = 7;

    /// A device with a fault-capable HWPT attached on `PASID`: read-write
    /// page at `P` (memory `m`), read-only page at `2P` (memory `n`), hole
    /// from `3P`.
    struct FaultRig {
        _iommu: Iommu,
        dev: iommu_core::IommuDevice,
        faults: iommu_core::FaultQueue,
        m: std::sync::Arc<Memory>,
        n: std::sync::Arc<Memory>,
    }

    fn fault_rig() -> FaultRig {
        let iommu = Iommu::new();
        let dev = iommu_core::IommuDevice::new("sva", HwInfo::full());
        let dev_id = iommu.bind(&dev).expect("bind");
        let ioas = iommu.ioas_alloc().expect("ioas");
        let m = Memory::anonymous("m", P as usize).expect("m");
        let n = Memory::anonymous("n", P as usize).expect("n");
        iommu
            .ioas_map(ioas, &m, 0, P, Some(P), Perm::RW)
            .expect("map m");
        iommu
            .ioas_map(ioas, &n, 0, P, Some(2 * P), Perm::READ)
            .expect("map n");
        let (fault_id, faults) = iommu.fault_queue_alloc().expect("fault queue");
        let hwpt = iommu
            .hwpt_alloc(&iommu_core::HwptAlloc {
                dev_id,
                pt_id: ioas,
                flags: iommu_core::IOMMU_HWPT_ALLOC_PASID,
                fault_id: Some(fault_id),
                ..Default::default()
            })
            .expect("hwpt");
        iommu.attach(dev_id, Some(PASID), hwpt).expect("attach");
        FaultRig {
            _iommu: iommu,
            dev,
            faults,
            m,
            n,
        }
    }

    #[test]
    fn test_raising_miss_returns_pending_fault_and_resumes_after_answer() {
        let r = fault_rig();
        let mut tr = r.dev.translator();
        let e = Dma::enter(&mut tr, Some(PASID), |dma| {
            assert_eq!(dma.pasid(), Some(PASID));
            assert!(!dma.is_probe());
            dma.write(3 * P + 8, b"late").expect_err("hole")
        });
        let DmaError::Fault {
            iova,
            access,
            ref pending,
        } = e
        else {
            panic!("not a raised fault: {e:?}")
        };
        assert_eq!((iova, access), (3 * P + 8, Access::Write));
        assert_eq!(e.pending_fault(), Some(pending));
        assert_eq!(e.fault_address(), Some(3 * P + 8));
        assert!(!e.is_miss(), "not a vhost-user IOTLB miss");
        assert_eq!(pending.status(), FaultStatus::Pending);
        let mut recs = Vec::new();
        assert_eq!(r.faults.read_batch(&mut recs, 8), Ok(1));
        assert_eq!(recs[0].addr, 3 * P);
        assert_eq!(recs[0].pasid, PASID);
        r.faults
            .respond(recs[0].cookie, PageResponseCode::Invalid)
            .expect("respond");
        assert_eq!(pending.status(), FaultStatus::Invalid);
        // The fragment path raises as well.
        let e = Dma::enter(&mut tr, Some(PASID), |dma| {
            dma.fragment(5 * P, 8, Access::Read).expect_err("hole")
        });
        assert!(e.pending_fault().is_some(), "{e:?}");
        assert_eq!(r.faults.stats().raised, 2);
    }

    #[test]
    fn test_probe_reports_without_fault_group() {
        let r = fault_rig();
        let mut tr = r.dev.translator();
        Dma::enter(&mut tr, Some(PASID), |dma| {
            let probe = dma.probe();
            assert!(probe.is_probe() && !probe.raising().is_probe());
            assert_eq!(
                probe.fragment(3 * P, 8, Access::Read).map(|f| f.len()),
                Err(DmaError::NotMapped {
                    iova: 3 * P,
                    access: Access::Read
                })
            );
            assert_eq!(
                probe.write(2 * P, b"ro").map_err(|e| e.denied_address()),
                Err(Some((2 * P, Access::Write)))
            );
            assert_eq!(
                probe.read(2 * P - 4, &mut [0u8; 8 + P as usize]),
                Err(DmaError::NotMapped {
                    iova: 3 * P,
                    access: Access::Read
                })
            );
            assert!(probe.copy(P, 3 * P, 16).is_err());
            // Mapped accesses work as in raising mode.
            probe.write(P + 4, b"ok").expect("write");
        });
        assert_eq!(r.faults.stats().raised, 0);
        assert_eq!(r.faults.undelivered(), 0);
        let mut b = [0u8; 2];
        r.m.read_at(4, &mut b).expect("read back");
        assert_eq!(&b, b"ok");
    }

    #[test]
    fn test_fragment_is_the_first_contiguous_run() {
        let r = fault_rig();
        r.n.write_at(0, b"NN").expect("write");
        let mut tr = r.dev.translator();
        Dma::enter(&mut tr, Some(PASID), |dma| {
            // The range spans two host buffers: the first run only.
            let f = dma.fragment(2 * P - 8, 16, Access::Read).expect("run");
            assert_eq!(f.len(), 8);
            let g = dma.fragment(2 * P, 2, Access::Read).expect("second");
            assert_eq!(g.len(), 2);
            let mut b = [0u8; 2];
            // SAFETY: `g` is readable for 2 bytes for the rest of the section.
            unsafe { std::ptr::copy_nonoverlapping(g.as_ptr(), b.as_mut_ptr(), 2) };
            assert_eq!(&b, b"NN");
            let h = dma.fragment(P + 0x10, 4, Access::Write).expect("writable");
            assert_eq!(h.as_volatile_slice().len(), 4);
            // SAFETY: `h` is writable for 4 bytes for the rest of the section.
            unsafe { std::ptr::copy_nonoverlapping(b"frag".as_ptr(), h.as_ptr(), 4) };
            let z = dma.fragment(9 * P, 0, Access::Read).expect("empty");
            assert!(z.is_empty());
            assert_eq!(
                dma.probe()
                    .fragment(2 * P, 4, Access::Write)
                    .map_err(|e| e.denied_address()),
                Err(Some((2 * P, Access::Write)))
            );
            // Raising: a permission failure is an I/O page fault too.
            let e = dma
                .fragment(2 * P, 4, Access::Write)
                .expect_err("read-only");
            assert!(
                matches!(
                    e,
                    DmaError::Fault {
                        access: Access::Write,
                        ..
                    }
                ),
                "{e:?}"
            );
            // The RID has nothing attached.
            assert_eq!(
                dma.with_pasid(None)
                    .fragment(P, 4, Access::Read)
                    .map(|f| f.len()),
                Err(DmaError::Blocked)
            );
        });
        let mut b = [0u8; 4];
        r.m.read_at(0x10, &mut b).expect("read back");
        assert_eq!(&b, b"frag");
    }

    #[test]
    fn test_remembered_runs_keep_pasid_permission_and_length() {
        let r = fault_rig();
        let mut tr = r.dev.translator();
        // A speculating section over a fault-capable HWPT: a failed window
        // must not raise; the access itself raises once.
        let section = Section::new(&mut tr, Some(PASID), true);
        let dma = Dma::from_section(&section);
        let f = dma.fragment(P, 8, Access::Read).expect("first");
        assert_eq!(f.len(), 8);
        // Answered from the remembered run: up to the end of the area.
        let g = dma.fragment(P + 16, 2 * P, Access::Read).expect("run");
        assert_eq!(g.len() as u64, P - 16);
        assert_eq!(g.as_ptr(), f.as_ptr().wrapping_add(16));
        // The run was translated for read: a write is translated anew.
        dma.fragment(P + 16, 4, Access::Write)
            .expect("writable too");
        let ro = dma
            .fragment(2 * P, 4, Access::Read)
            .expect("read-only page");
        assert_eq!(ro.len(), 4);
        assert!(dma.probe().fragment(2 * P + 8, 4, Access::Write).is_err());
        assert_eq!(
            dma.with_pasid(Some(PASID + 1))
                .fragment(P + 16, 4, Access::Read)
                .map(|f| f.len()),
            Err(DmaError::Blocked)
        );
        let e = dma.read(3 * P + 8, &mut [0u8; 8]).expect_err("hole");
        assert!(e.pending_fault().is_some(), "{e:?}");
        drop(section);
        assert_eq!(r.faults.stats().raised, 1, "speculation raised nothing");
    }

    /// A run is remembered from the start of its mapping, not from the
    /// first address asked for: buffers below it hit too (with the memory
    /// table, a frontend's whole buffer pool is one run).
    #[test]
    fn test_remembered_run_covers_bytes_before_the_first_access() {
        let r = fault_rig();
        let mut tr = r.dev.translator();
        let section = Section::new(&mut tr, Some(PASID), false);
        let dma = Dma::from_section(&section);
        let hi = dma.fragment(P + 0x800, 8, Access::Read).expect("mapped");
        let lo = section
            .hot
            .prefix(Some(PASID), P, 8, Perm::READ)
            .expect("remembered below the first access");
        assert_eq!(lo.ptr.wrapping_add(0x800), hi.as_ptr());
        assert_eq!(lo.len, 8);
    }

    #[test]
    fn test_copy_across_fragments_and_typed_failures() {
        let r = fault_rig();
        r.n.write_at(0, b"abcd").expect("write");
        let mut tr = r.dev.translator();
        Dma::enter(&mut tr, Some(PASID), |dma| {
            dma.write(2 * P - 4, &[]).expect("empty write");
            dma.copy(2 * P, P + 0x100, 4).expect("copy");
            let mut b = [0u8; 4];
            dma.read(P + 0x100, &mut b).expect("read");
            assert_eq!(&b, b"abcd");
            // Source runs into the hole: nothing copied.
            let probe = dma.probe();
            assert_eq!(
                probe.copy(3 * P - 2, P + 0x200, 4),
                Err(DmaError::NotMapped {
                    iova: 3 * P,
                    access: Access::Read
                })
            );
            assert_eq!(
                probe.copy(P, 2 * P, 4).map_err(|e| e.denied_address()),
                Err(Some((2 * P, Access::Write)))
            );
            assert_eq!(
                probe.copy(P, 4 * P, 4),
                Err(DmaError::NotMapped {
                    iova: 4 * P,
                    access: Access::Write
                })
            );
            let e = dma.copy(P, 6 * P, 4).expect_err("raises");
            assert!(
                matches!(
                    e,
                    DmaError::Fault {
                        iova,
                        access: Access::Write,
                        ..
                    } if iova == 6 * P
                ),
                "{e:?}"
            );
            dma.copy(P, P + 0x200, 0).expect("zero length");
        });
        let mut b = [0u8; 4];
        r.m.read_at(0x200, &mut b).expect("read back");
        assert_eq!(b, [0; 4], "failed copies wrote nothing");
    }

    #[test]
    fn test_pasids_of_one_section_do_not_share_translations() {
        let iommu = Iommu::new();
        let dev = iommu_core::IommuDevice::new("two", HwInfo::full());
        let dev_id = iommu.bind(&dev).expect("bind");
        let mut mems = Vec::new();
        for (i, pasid) in [(0u8, None), (1, Some(3)), (2, Some(4))] {
            let ioas = iommu.ioas_alloc().expect("ioas");
            let m = Memory::anonymous("m", P as usize).expect("m");
            m.write_at(0, &[i; 32]).expect("fill");
            iommu
                .ioas_map(ioas, &m, 0, P, Some(P), Perm::RW)
                .expect("map");
            let hwpt = iommu
                .hwpt_alloc(&iommu_core::HwptAlloc {
                    dev_id,
                    pt_id: ioas,
                    flags: iommu_core::IOMMU_HWPT_ALLOC_PASID,
                    ..Default::default()
                })
                .expect("hwpt");
            iommu.attach(dev_id, pasid, hwpt).expect("attach");
            mems.push(m);
        }
        let mut tr = dev.translator();
        // Speculating section (as the vhost-user workers open): the
        // remembered windows must be per PASID too.
        let section = Section::new(&mut tr, None, true);
        let dma = Dma::from_section(&section);
        for round in 0..2 {
            for (i, pasid) in [(0u8, None), (1, Some(3)), (2, Some(4))] {
                let h = dma.with_pasid(pasid);
                let v: [u8; 32] = h.read_obj(P).expect("read");
                assert_eq!(v, [i; 32], "pasid {pasid:?} round {round}");
                let f = h.fragment(P, 1, Access::Read).expect("fragment");
                // SAFETY: `f` is readable for one byte during the section.
                assert_eq!(unsafe { f.as_ptr().read_volatile() }, i);
            }
        }
        assert_eq!(
            dma.with_pasid(Some(9)).check(P, 1, Access::Read),
            Err(DmaError::Blocked)
        );
    }

    #[test]
    fn test_invalidation_requested_inside_a_section() {
        let (iommu, core, ioas, _a, _b) = setup();
        let mut tr = core.translator();
        let mut ticket = Dma::enter(&mut tr, None, |dma| {
            assert!(!dma.invalidation_requested());
            dma.check(0x10000, 4, Access::Read).expect("mapped");
            let (_, mut ticket) = iommu
                .ioas_unmap_begin(ioas, 0x11000, 0x1000)
                .expect("unmap begin");
            assert!(dma.invalidation_requested());
            assert!(!ticket.is_done(), "the section is still open");
            ticket
        });
        assert!(ticket.is_done());
    }

    #[test]
    fn test_speculative_windows_keep_permissions() {
        let iommu = Iommu::new();
        let core = iommu_core::IommuDevice::new("spec", HwInfo::default());
        let dev = iommu.bind(&core).expect("bind");
        let ioas = iommu.ioas_alloc().expect("ioas");
        iommu.attach(dev, None, ioas).expect("attach");
        let m = Memory::anonymous("m", 0x20000).expect("m");
        iommu
            .ioas_map(ioas, &m, 0, 0x10000, Some(0x40000), Perm::READ)
            .expect("ro");
        iommu
            .ioas_map(ioas, &m, 0x10000, 0x10000, Some(0x50000), Perm::RW)
            .expect("rw");
        m.write_at(0x100, b"ro").expect("write");
        let mut tr = core.translator();
        let section = Section::new(&mut tr, None, true);
        let dma = Dma::from_section(&section);
        let mut b = [0u8; 2];
        dma.read(0x40100, &mut b).expect("read");
        assert_eq!(&b, b"ro");
        // The read-only window answered reads; a write must still be denied.
        assert_eq!(
            dma.write(0x40200, b"no").map_err(|e| e.denied_address()),
            Err(Some((0x40200, Access::Write)))
        );
        dma.write(0x50010, b"ok").expect("rw write");
        dma.read(0x50010, &mut b).expect("rw read");
        assert_eq!(&b, b"ok");
        assert!(matches!(
            dma.read(0x60000, &mut b),
            Err(DmaError::NotMapped { iova: 0x60000, .. })
        ));
    }
}
