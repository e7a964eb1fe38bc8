//! DMA: how a device reads and writes frontend memory.
//!
//! (being wired to iommu-core translation)

use std::cell::{Cell, RefCell};

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

/// Errors of DMA accesses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// No translation exists for the address: the frontend has not mapped it
    /// (yet). Recoverable: the framework asks the frontend and parks the queue.
    #[error("iova {iova:#x} is not mapped for {access:?}")]
    NotMapped {
        /// The first unmapped address.
        iova: u64,
        /// The access attempted.
        access: Access,
    },
    /// A translation exists but does not allow the access.
    #[error("iova {iova:#x} does not allow {access:?}")]
    Denied {
        /// The address.
        iova: u64,
        /// The access attempted.
        access: Access,
    },
    /// `iova + len` overflows the 64-bit address space.
    #[error("range {iova:#x}+{len:#x} overflows")]
    Overflow {
        /// Start of the range.
        iova: u64,
        /// Its length.
        len: u64,
    },
    /// Nothing is attached: DMA is blocked.
    #[error("DMA is blocked: no address space attached")]
    Blocked,
    /// Any other translation failure.
    #[error("translation failed at {iova:#x}: {msg}")]
    Failed {
        /// The address.
        iova: u64,
        /// What failed.
        msg: String,
    },
    /// A memory error without a recorded cause.
    #[error("unknown memory error")]
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
}

/// Result of DMA operations.
pub type Result<T> = std::result::Result<T, DmaError>;

/// A worker thread's DMA handle.
#[derive(Debug, Default)]
pub struct Dma {
    fault: Cell<Option<(u64, Access)>>,
    last: RefCell<Option<DmaError>>,
}

impl Dma {
    /// Checks that `iova..iova+len` is mapped for `access`.
    pub fn check(&self, iova: u64, len: u64, access: Access) -> Result<()> {
        let _ = (iova, len, access, &self.fault);
        Err(DmaError::NotMapped { iova, access })
    }

    /// Reads `buf.len()` bytes at `iova`.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<()> {
        self.check(iova, buf.len() as u64, Access::Read)
    }

    /// Writes `data` at `iova`.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<()> {
        self.check(iova, data.len() as u64, Access::Write)
    }

    pub(crate) fn clear_fault(&self) {
        self.last.replace(None);
    }

    pub(crate) fn take_fault(&self) -> Option<DmaError> {
        self.last.take()
    }
}

impl Dma {
    /// The first contiguous host fragment of `iova..iova+len`: its host
    /// address and length (at most `len`).
    fn first_fragment(&self, iova: u64, len: usize, access: Access) -> Result<(*mut u8, usize)> {
        let _ = len;
        Err(DmaError::NotMapped { iova, access })
    }

    fn record(&self, e: DmaError) {
        self.last.replace(Some(e));
    }
}

/// Iterator over the host fragments of an IOVA range, translated lazily.
#[derive(Debug)]
pub struct DmaSlices<'a> {
    dma: &'a Dma,
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
        match self.dma.first_fragment(self.iova, self.remaining, self.access) {
            Ok((ptr, n)) => {
                let n = n.min(self.remaining);
                self.remaining -= n;
                self.iova = self.iova.wrapping_add(n as u64);
                // SAFETY: `first_fragment` returned `n` bytes of host memory that
                // stay mapped while the worker's access section lasts, which
                // outlives every use of the `Dma` borrow `'a`; all accesses
                // through VolatileSlice are volatile.
                Some(Ok(unsafe { vm_memory::VolatileSlice::new(ptr, n) }))
            }
            Err(e) => {
                self.done = true;
                let addr = vm_memory::GuestAddress(self.iova);
                self.dma.record(e);
                Some(Err(vm_memory::GuestMemoryError::InvalidGuestAddress(addr)))
            }
        }
    }
}

impl std::iter::FusedIterator for DmaSlices<'_> {}

impl<'a> vm_memory::guest_memory::GuestMemorySliceIterator<'a, ()> for DmaSlices<'a> {}

impl vm_memory::GuestMemory for Dma {
    type PhysicalMemory = vm_memory::GuestMemoryMmap<()>;
    type Bitmap = ();

    fn check_range(
        &self,
        addr: vm_memory::GuestAddress,
        count: usize,
        access: vm_memory::Permissions,
    ) -> bool {
        let access = match access {
            vm_memory::Permissions::Write => Access::Write,
            vm_memory::Permissions::ReadWrite => Access::ReadWrite,
            vm_memory::Permissions::Read | vm_memory::Permissions::No => Access::Read,
        };
        self.check(addr.0, count as u64, access).is_ok()
    }

    fn get_slices<'a>(
        &'a self,
        addr: vm_memory::GuestAddress,
        count: usize,
        access: vm_memory::Permissions,
    ) -> vm_memory::guest_memory::Result<
        impl vm_memory::guest_memory::GuestMemorySliceIterator<'a, vm_memory::bitmap::BS<'a, ()>>,
    > {
        let access = match access {
            vm_memory::Permissions::Write => Access::Write,
            vm_memory::Permissions::ReadWrite => Access::ReadWrite,
            vm_memory::Permissions::Read | vm_memory::Permissions::No => Access::Read,
        };
        if addr.0.checked_add(count as u64).is_none() {
            self.record(DmaError::Overflow {
                iova: addr.0,
                len: count as u64,
            });
            return Err(vm_memory::GuestMemoryError::GuestAddressOverflow);
        }
        Ok(DmaSlices {
            dma: self,
            iova: addr.0,
            remaining: count,
            access,
            done: false,
        })
    }
}
