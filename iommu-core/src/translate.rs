//! The device side: per-thread translators with their own IOTLB.

use crate::device::Device;
use crate::error::Result;
use crate::sync::Nudge;
use crate::types::Perm;

/// A host fragment of a translated range. `ptr` is valid for `len` bytes
/// only until the [`Access`] section it came from ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// Host address.
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

/// Counters of a translator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TranslatorStats {
    /// Translations answered from the cache.
    pub hits: u64,
    /// Translations that walked the IOAS / page table.
    pub misses: u64,
    /// Cache flushes caused by invalidations.
    pub flushes: u64,
}

/// One DMA thread's view of a device: its own translation cache, validated
/// by a generation counter at the start of each access section.
pub struct Translator {
    pub(crate) device: Device,
}

impl std::fmt::Debug for Translator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Translator").finish_non_exhaustive()
    }
}

impl Translator {
    /// Unique id (as reported by [`InvalidationTicket::pending`](crate::InvalidationTicket::pending)).
    pub fn id(&self) -> u64 {
        todo!()
    }
    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// Opens an access section. Never block inside one (an unmap waits for
    /// it to end).
    pub fn access(&mut self) -> Access<'_> {
        todo!()
    }
    /// Reads `buf.len()` bytes at `iova` (own access section).
    pub fn read(&mut self, pasid: Option<u32>, iova: u64, buf: &mut [u8]) -> Result<()> {
        self.access().read(pasid, iova, buf)
    }
    /// Writes `buf` at `iova` (own access section).
    pub fn write(&mut self, pasid: Option<u32>, iova: u64, buf: &[u8]) -> Result<()> {
        self.access().write(pasid, iova, buf)
    }
    /// Sets the hook an invalidator may call to nudge this thread.
    pub fn set_nudge(&mut self, nudge: Option<Nudge>) {
        let _ = nudge;
        todo!()
    }
    /// Valid cached translations (drops the cache first if it was invalidated).
    pub fn cached_translations(&mut self) -> usize {
        todo!()
    }
    /// Counters.
    pub fn stats(&self) -> TranslatorStats {
        todo!()
    }
}

/// An access section: host pointers from [`Access::translate`] stay valid
/// until it is dropped.
pub struct Access<'t> {
    t: &'t mut Translator,
}

impl std::fmt::Debug for Access<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").finish_non_exhaustive()
    }
}

impl Access<'_> {
    /// Translates `[iova, iova+len)` for `perm`: clears `out` and fills it
    /// with host fragments covering the range in order.
    pub fn translate(
        &mut self,
        pasid: Option<u32>,
        iova: u64,
        len: u64,
        perm: Perm,
        out: &mut Vec<Fragment>,
    ) -> Result<()> {
        let _ = (pasid, iova, len, perm, out, &self.t);
        todo!()
    }
    /// Reads device memory into `buf`.
    pub fn read(&mut self, pasid: Option<u32>, iova: u64, buf: &mut [u8]) -> Result<()> {
        let _ = (pasid, iova, buf);
        todo!()
    }
    /// Writes `buf` to device memory.
    pub fn write(&mut self, pasid: Option<u32>, iova: u64, buf: &[u8]) -> Result<()> {
        let _ = (pasid, iova, buf);
        todo!()
    }
    /// Copies `len` bytes between two device addresses (memmove semantics
    /// per fragment pair).
    pub fn copy(
        &mut self,
        src_pasid: Option<u32>,
        src: u64,
        dst_pasid: Option<u32>,
        dst: u64,
        len: u64,
    ) -> Result<()> {
        let _ = (src_pasid, src, dst_pasid, dst, len);
        todo!()
    }
}
