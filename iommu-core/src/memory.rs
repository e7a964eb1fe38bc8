//! User memory that IOAS areas point into.
//!
//! A [`Memory`] is mapped once per process and shared through `Arc`: every
//! area, cached translation and in-flight invalidation that refers to it
//! holds a reference, so the mapping outlives every possible device access.
//! This module and [`sigbus`](crate::sigbus) (which keeps a peer that
//! shrinks its memfd from killing the process) are the crate's only
//! `unsafe` code.
#![allow(unsafe_code)]

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use nix::sys::mman::{MapFlags, ProtFlags};

use crate::error::{Error, Result};

/// Who unmaps the region when the last reference goes.
#[derive(Debug)]
enum Backing {
    /// Mapped here from a memfd; unmapped on drop. `map_len` and `map_base`
    /// describe the whole page-aligned mapping.
    Memfd {
        fd: OwnedFd,
        file_offset: u64,
        map_base: NonNull<u8>,
        map_len: usize,
        /// Registration with the SIGBUS guard (dropped before the unmap).
        guard: Option<crate::sigbus::Guard>,
    },
    /// Mapped by the caller, who keeps it alive.
    Foreign,
}

/// A region of user memory: host pointer, length and, for memfd-backed
/// memory, the fd that lets another process map the same pages
/// (send it with `SCM_RIGHTS` together with [`Memory::file_offset`]).
#[derive(Debug)]
pub struct Memory {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

// SAFETY: `Memory` only hands out raw pointers and bounds-checked copies;
// the mapping itself is process-wide and valid from any thread.
unsafe impl Send for Memory {}
// SAFETY: as above, no `&self` method mutates Rust-visible state; the bytes
// behind the pointer are shared with devices by design, as guest memory.
unsafe impl Sync for Memory {}

fn page_size() -> u64 {
    crate::types::PAGE_SIZE
}

impl Memory {
    /// Maps `len` bytes of the memfd (or any mappable file) `fd` from byte
    /// `offset`, shared and read-write.
    ///
    /// Errors: `len == 0` → [`Error::ZeroLength`]; a range beyond the end of
    /// the file → [`Error::OutOfBounds`] (`EINVAL`, as `IOAS_MAP_FILE`);
    /// system failures → [`Error::Os`].
    pub fn from_memfd(fd: OwnedFd, offset: u64, len: usize) -> Result<Arc<Memory>> {
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| Error::os("fstat", e))?;
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let end = offset.checked_add(len as u64).ok_or(Error::Overflow {
            start: offset,
            length: len as u64,
        })?;
        if end > size {
            return Err(Error::OutOfBounds {
                offset,
                length: len as u64,
                size,
            });
        }
        Memory::map_shared(fd, offset, len, usize::try_from(st.st_blksize).unwrap_or(0))
    }

    /// Maps `len` bytes of a device file `fd` (one whose size says nothing
    /// of what it can map, such as the IOVA domain file a VDUSE device's
    /// `VDUSE_IOTLB_GET_FD` returns) from byte `offset`, shared and
    /// read-write. The file's driver decides which offsets fault in pages;
    /// an access it refuses is answered like one past the end of a shrunk
    /// memfd ([`sigbus`](crate::sigbus)), and [`Memory::truncated`] says so.
    ///
    /// Errors: `len == 0` → [`Error::ZeroLength`]; a mapping the driver
    /// refuses (permission, range) → [`Error::Os`].
    pub fn from_device_fd(fd: OwnedFd, offset: u64, len: usize) -> Result<Arc<Memory>> {
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        offset.checked_add(len as u64).ok_or(Error::Overflow {
            start: offset,
            length: len as u64,
        })?;
        Memory::map_shared(fd, offset, len, 0)
    }

    /// Maps `len` bytes of `fd` from `offset` (range already checked),
    /// shared and read-write, guarded against SIGBUS with pages of
    /// `granule` bytes (0: the base page).
    fn map_shared(fd: OwnedFd, offset: u64, len: usize, granule: usize) -> Result<Arc<Memory>> {
        let delta = offset % page_size();
        let map_off = offset - delta;
        let map_len = usize::try_from(delta)
            .ok()
            .and_then(|d| d.checked_add(len))
            .ok_or(Error::Overflow {
                start: offset,
                length: len as u64,
            })?;
        let nz = NonZeroUsize::new(map_len).ok_or(Error::ZeroLength)?;
        let off = libc::off_t::try_from(map_off).map_err(|_| Error::Overflow {
            start: offset,
            length: len as u64,
        })?;
        // SAFETY: a fresh shared mapping chosen by the kernel (no fixed
        // address), so no existing Rust object is aliased or replaced; the
        // fd stays open in `Backing` for the mapping's lifetime.
        let base = unsafe {
            nix::sys::mman::mmap(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                off,
            )
        }
        .map_err(|e| Error::os("mmap", e))?;
        let map_base = base.cast::<u8>();
        let delta_us = map_len - len;
        // `delta_us < map_len`, so the offset pointer stays in the mapping.
        let ptr = NonNull::new(map_base.as_ptr().wrapping_add(delta_us)).ok_or(Error::Invalid {
            what: "mmap returned a null mapping",
        })?;
        // `granule`: the file's page size (a hugetlbfs file's pages are
        // replaced whole if it shrinks under the mapping).
        let guard = crate::sigbus::Guard::register(map_base.as_ptr() as usize, map_len, granule);
        Ok(Arc::new(Memory {
            ptr,
            len,
            backing: Backing::Memfd {
                fd,
                file_offset: offset,
                map_base,
                map_len,
                guard: Some(guard),
            },
        }))
    }

    /// Creates an anonymous memfd of `len` bytes (zero-filled) named `name`
    /// and maps it. The result can be shared through [`Memory::fd`].
    pub fn anonymous(name: &str, len: usize) -> Result<Arc<Memory>> {
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        let cname =
            std::ffi::CString::new(name.replace('\0', "?")).map_err(|_| Error::Invalid {
                what: "memfd name contains a NUL byte",
            })?;
        let fd =
            nix::sys::memfd::memfd_create(cname.as_c_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map_err(|e| Error::os("memfd_create", e))?;
        let size = libc::off_t::try_from(len).map_err(|_| Error::Overflow {
            start: 0,
            length: len as u64,
        })?;
        nix::unistd::ftruncate(fd.as_fd(), size).map_err(|e| Error::os("ftruncate", e))?;
        Memory::from_memfd(fd, 0, len)
    }

    /// Wraps a region this process already mapped. The region is never
    /// unmapped by this crate.
    ///
    /// # Safety
    ///
    /// `ptr..ptr+len` must be a readable and writable mapping that stays
    /// mapped for as long as the returned `Memory` (and every clone of the
    /// `Arc`) lives; the crate copies bytes in and out of it from any thread.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize) -> Result<Arc<Memory>> {
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        if (ptr.as_ptr() as usize).checked_add(len).is_none() {
            return Err(Error::Overflow {
                start: ptr.as_ptr() as u64,
                length: len as u64,
            });
        }
        Ok(Arc::new(Memory {
            ptr,
            len,
            backing: Backing::Foreign,
        }))
    }

    /// Host address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (a `Memory` is never empty); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the peer's file shrank under this mapping and an access past
    /// its new end was answered with a private zero page (see
    /// [`sigbus`](crate::sigbus)): the owner should fail whatever uses it.
    pub fn truncated(&self) -> bool {
        match &self.backing {
            Backing::Memfd { guard: Some(g), .. } => g.hits() > 0,
            _ => false,
        }
    }

    /// The backing fd, for memfd-backed memory.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.backing {
            Backing::Memfd { fd, .. } => Some(fd.as_fd()),
            Backing::Foreign => None,
        }
    }

    /// Byte offset of this memory inside its file (0 for foreign memory).
    pub fn file_offset(&self) -> u64 {
        match &self.backing {
            Backing::Memfd { file_offset, .. } => *file_offset,
            Backing::Foreign => 0,
        }
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::OutOfBounds {
                offset: offset as u64,
                length: len as u64,
                size: self.len as u64,
            }),
        }
    }

    /// Copies `dst.len()` bytes from byte `offset` of this memory.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check(offset, dst.len())?;
        // SAFETY: the range was bounds-checked against this live mapping and
        // `dst` is a distinct Rust buffer, so the copy stays in bounds and
        // does not overlap. Concurrent device writes to guest memory are
        // expected and only affect the bytes read.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }

    /// Copies `src` to byte `offset` of this memory.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check(offset, src.len())?;
        // SAFETY: bounds-checked against this live read-write mapping; `src`
        // is a Rust buffer that cannot overlap the mapping mutably.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len())
        };
        Ok(())
    }

    /// Reads a little-endian u64 at byte `offset` (page-table entries).
    pub fn read_u64_le(&self, offset: usize) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read_at(offset, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<()> {
        self.check(offset, len)?;
        // SAFETY: bounds-checked against this live read-write mapping.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), byte, len) };
        Ok(())
    }

    /// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off`
    /// (overlap allowed, as `memmove`).
    pub fn copy(
        src: &Memory,
        src_off: usize,
        dst: &Memory,
        dst_off: usize,
        len: usize,
    ) -> Result<()> {
        src.check(src_off, len)?;
        dst.check(dst_off, len)?;
        // SAFETY: both ranges were bounds-checked against live mappings;
        // `copy` (memmove) tolerates overlap when both are the same memory.
        unsafe {
            std::ptr::copy(
                src.ptr.as_ptr().add(src_off),
                dst.ptr.as_ptr().add(dst_off),
                len,
            )
        };
        Ok(())
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Backing::Memfd {
            map_base,
            map_len,
            guard,
            ..
        } = &mut self.backing
        {
            // Unregistered first: once unmapped, the range is not ours.
            drop(guard.take());
            // SAFETY: this mapping was created by `from_memfd` with exactly
            // this base and length and is unmapped once, here, when the last
            // reference (and so every possible user) is gone.
            let r = unsafe { nix::sys::mman::munmap(map_base.cast(), *map_len) };
            if let Err(e) = r {
                log::warn!("munmap of {map_len} bytes failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_peer_truncating_its_memfd_does_not_kill_the_process() {
        // The peer keeps its own fd to the file and shrinks it after sharing.
        let peer = Memory::anonymous("peer", 3 * 4096).expect("memfd");
        peer.write_at(0, b"kept").expect("write");
        let fd = peer.fd().expect("fd").try_clone_to_owned().expect("dup");
        let ours = Memory::from_memfd(fd, 0, 3 * 4096).expect("map");
        let peer_fd = peer.fd().expect("fd");
        nix::unistd::ftruncate(peer_fd, 4096).expect("shrink");
        assert!(!ours.truncated());
        // Past the new end: without the guard this is SIGBUS.
        let mut b = [0xaau8; 8];
        ours.read_at(2 * 4096, &mut b).expect("read");
        assert_eq!(b, [0u8; 8], "a truncated page reads as zeros");
        ours.write_at(4096 + 8, b"lost").expect("write");
        assert!(ours.truncated());
        assert!(crate::sigbus::truncations() >= 1);
        // The part still in the file is the peer's memory as before.
        let mut k = [0u8; 4];
        ours.read_at(0, &mut k).expect("read");
        assert_eq!(&k, b"kept");
    }

    #[test]
    fn test_anonymous_read_write() {
        let m = Memory::anonymous("t", 8192).expect("memfd");
        assert_eq!(m.len(), 8192);
        m.write_at(4090, b"hello world").expect("write");
        let mut b = [0u8; 11];
        m.read_at(4090, &mut b).expect("read");
        assert_eq!(&b, b"hello world");
        assert!(m.read_at(8190, &mut b).is_err());
        assert!(m.fd().is_some());
    }

    #[test]
    fn test_from_memfd_offset_and_bounds() {
        let m = Memory::anonymous("t", 16384).expect("memfd");
        m.write_at(5000, b"xyz").expect("write");
        let fd = m.fd().expect("fd").try_clone_to_owned().expect("dup");
        let m2 = Memory::from_memfd(fd, 4999, 100).expect("map");
        let mut b = [0u8; 3];
        m2.read_at(1, &mut b).expect("read");
        assert_eq!(&b, b"xyz");
        let fd = m.fd().expect("fd").try_clone_to_owned().expect("dup");
        assert_eq!(
            Memory::from_memfd(fd, 16000, 1000).map(|_| ()),
            Err(Error::OutOfBounds {
                offset: 16000,
                length: 1000,
                size: 16384
            })
        );
    }
}
