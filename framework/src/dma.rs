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
//! `Dma` also implements vm-memory's [`GuestMemory`](vm_memory::GuestMemory)
//! (the IOVA-aware trait of vm-memory 0.18), which is how virtio-queue walks
//! rings and descriptor chains through the same translation. vm-memory turns
//! errors into its own type and virtio-queue into `None`; the handle keeps the
//! typed cause of the last failure so the queue layer can tell a miss from an
//! empty ring.

use std::cell::RefCell;

use iommu_core::{Fragment, Perm, Translator};

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
            | DmaError::Overflow { .. }
            | DmaError::Blocked
            | DmaError::Failed { .. }
            | DmaError::Unknown => None,
        }
    }

    fn from_core(e: iommu_core::Error, iova: u64, len: u64, access: Access) -> DmaError {
        match e {
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
/// are contiguous host memory at `ptr`, allowed for `perm`.
#[derive(Clone, Copy)]
struct Hot {
    iova: u64,
    len: u64,
    ptr: *mut u8,
    perm: Perm,
}

/// One open access section of a translator, with its scratch storage.
///
/// Within a section the host memory behind a translation stays mapped (an
/// unmap waits for the section to end), so the section remembers a few
/// recent contiguous translations (the rings, the buffers of popped chains)
/// and answers repeated small accesses to them without asking iommu-core.
pub(crate) struct Section<'t> {
    access: RefCell<iommu_core::Access<'t>>,
    pasid: Option<u32>,
    frags: RefCell<Vec<Fragment>>,
    last_err: RefCell<Option<DmaError>>,
    hot: RefCell<[Option<Hot>; HOT_ENTRIES]>,
    hot_next: std::cell::Cell<usize>,
    windows: std::cell::Cell<bool>,
}

impl<'t> Section<'t> {
    /// Opens a section. `speculate`: translate whole aligned windows around
    /// small accesses (only where a failed speculative translation has no
    /// side effect: no fault or event queue behind the device's HWPT, as for
    /// vhost-user devices whose memory table is their address space).
    pub(crate) fn new(translator: &'t mut Translator, pasid: Option<u32>, speculate: bool) -> Self {
        Section {
            access: RefCell::new(translator.access()),
            pasid,
            frags: RefCell::new(Vec::with_capacity(8)),
            last_err: RefCell::new(None),
            hot: RefCell::new([None; HOT_ENTRIES]),
            hot_next: std::cell::Cell::new(0),
            windows: std::cell::Cell::new(speculate),
        }
    }
}

/// What a [`Dma`] handle needs from a section (object-safe, so the handle
/// carries no invariant lifetime).
pub(crate) trait SectionOps {
    fn translate_with(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        f: &mut dyn FnMut(&[Fragment]) -> Result<()>,
    ) -> Result<()>;
    fn record(&self, e: DmaError);
    fn take(&self) -> Option<DmaError>;
}

impl Section<'_> {
    fn remember(&self, h: Hot) {
        let i = self.hot_next.get() % HOT_ENTRIES;
        if let Ok(mut hot) = self.hot.try_borrow_mut() {
            hot[i] = Some(h);
        }
        self.hot_next.set(i + 1);
    }
}

impl SectionOps for Section<'_> {
    fn translate_with(
        &self,
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
        let hit = self.hot.try_borrow().ok().and_then(|hot| {
            hot.iter().flatten().find_map(|h| {
                // `h.len >= 1` and `h.iova + h.len - 1` did not overflow when stored.
                (h.perm.contains(perm) && iova >= h.iova && last <= h.iova + (h.len - 1)).then(
                    || {
                        let off = usize::try_from(iova - h.iova).unwrap_or(usize::MAX);
                        Fragment {
                            ptr: h.ptr.wrapping_add(off),
                            len: usize::try_from(len).unwrap_or(usize::MAX),
                        }
                    },
                )
            })
        });
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
            let ok = acc
                .translate(self.pasid, start, wlen, perm, &mut frags)
                .is_ok();
            if ok && frags.len() == 1 {
                let base = frags[0].ptr;
                self.remember(Hot {
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
        acc.translate(self.pasid, iova, len, perm, &mut frags)
            .map_err(|e| DmaError::from_core(e, iova, len, access))?;
        drop(acc);
        if frags.len() == 1 && len >= HOT_MIN_LEN {
            self.remember(Hot {
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

/// A worker thread's DMA handle for one access section. Cheap to copy.
#[derive(Clone, Copy)]
pub struct Dma<'a> {
    ops: &'a (dyn SectionOps + 'a),
}

impl std::fmt::Debug for Dma<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dma").finish_non_exhaustive()
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
        let section = Section::new(translator, pasid, false);
        f(Dma { ops: &section })
    }

    pub(crate) fn from_section(ops: &'a (dyn SectionOps + 'a)) -> Self {
        Dma { ops }
    }

    /// Checks that `iova..iova+len` is mapped for `access` (and warms the
    /// translation cache for it).
    pub fn check(&self, iova: u64, len: u64, access: Access) -> Result<()> {
        self.ops.translate_with(iova, len, access, &mut |_| Ok(()))
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
        self.ops.translate_with(iova, len, access, &mut |frags| {
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
            .translate_with(iova, len, Access::Read, &mut |frags| {
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
            .translate_with(iova, len, Access::Write, &mut |frags| {
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
            .translate_with(iova, len as u64, access, &mut |frags| {
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
        iommu_core::Device,
        u32,
        std::sync::Arc<Memory>,
        std::sync::Arc<Memory>,
    ) {
        let iommu = Iommu::new();
        let core = iommu_core::Device::new("dma", HwInfo::default());
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

    #[test]
    fn test_speculative_windows_keep_permissions() {
        let iommu = Iommu::new();
        let core = iommu_core::Device::new("spec", HwInfo::default());
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
