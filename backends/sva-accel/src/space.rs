//! A memfd-backed [`DmaMemory`] without iommu-core, for measuring the engine
//! alone (`sva-bench`) and in tests; the device never uses it (every client
//! access goes through iommu-core). Sealed memfd regions, each mapped into
//! this process and placed at a device address (IOVA) the caller chose.

use crate::engine::{DmaMemory, Fragment, PageFault};
use crate::shm::{self, SharedMap};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{RwLock, RwLockReadGuard};
use thiserror::Error;

/// Mapping granularity.
pub const PAGE_SIZE: u64 = 4096;
/// Bound on mappings per client.
pub const MAX_MAPPINGS: usize = 4096;
/// Bound on one mapping's length (1 TiB).
pub const MAX_MAP_LEN: u64 = 1 << 40;

/// Errors of address space changes.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpaceError {
    /// Address, length or offset not page aligned, zero, or wrapping.
    #[error("invalid range iova {iova:#x} len {len:#x} offset {offset:#x}")]
    BadRange {
        /// Device address.
        iova: u64,
        /// Length.
        len: u64,
        /// File offset.
        offset: u64,
    },
    /// The range overlaps an existing mapping.
    #[error("range iova {iova:#x} len {len:#x} overlaps an existing mapping")]
    Overlap {
        /// Device address.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// The fd is not a memfd sealed against shrinking.
    #[error("memory fd is not a memfd sealed with F_SEAL_SHRINK")]
    NotSealed,
    /// The file is smaller than offset + len.
    #[error("memory fd of {size} bytes is too small for offset {offset:#x} + len {len:#x}")]
    TooSmall {
        /// File size.
        size: u64,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Too many mappings.
    #[error("more than {MAX_MAPPINGS} mappings")]
    TooMany,
    /// mmap failed.
    #[error("mmap of {len:#x} bytes failed with errno {errno}")]
    Map {
        /// Length.
        len: u64,
        /// errno.
        errno: i32,
    },
    /// Nothing mapped in the range.
    #[error("nothing mapped in iova {iova:#x} len {len:#x}")]
    NotFound {
        /// Device address.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// The range cuts a mapping.
    #[error("range iova {iova:#x} len {len:#x} covers part of a mapping")]
    Partial {
        /// Device address.
        iova: u64,
        /// Length.
        len: u64,
    },
}

impl SpaceError {
    /// The errno the control protocol answers with.
    pub fn errno(&self) -> i32 {
        match self {
            SpaceError::BadRange { .. } | SpaceError::NotSealed | SpaceError::Partial { .. } => {
                libc::EINVAL
            }
            SpaceError::TooSmall { .. } => libc::EINVAL,
            SpaceError::Overlap { .. } => libc::EEXIST,
            SpaceError::TooMany => libc::ENOSPC,
            SpaceError::Map { errno, .. } => *errno,
            SpaceError::NotFound { .. } => libc::ENOENT,
        }
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, SpaceError>;

#[derive(Debug)]
struct Mapping {
    iova: u64,
    len: u64,
    writable: bool,
    map: SharedMap,
}

/// A client address space.
#[derive(Debug, Default)]
pub struct AddressSpace {
    maps: RwLock<Vec<Mapping>>,
}

/// A read section over an address space; implements [`DmaMemory`].
#[derive(Debug)]
pub struct SpaceView<'a> {
    maps: RwLockReadGuard<'a, Vec<Mapping>>,
    /// Index of the mapping that answered last (a one-entry cache).
    last: std::cell::Cell<usize>,
}

impl AddressSpace {
    /// Maps `len` bytes of memfd `fd` from `offset` at device address `iova`.
    pub fn map(
        &self,
        fd: &OwnedFd,
        iova: u64,
        len: u64,
        offset: u64,
        writable: bool,
    ) -> Result<()> {
        let bad = SpaceError::BadRange { iova, len, offset };
        if len == 0
            || len > MAX_MAP_LEN
            || iova % PAGE_SIZE != 0
            || len % PAGE_SIZE != 0
            || offset % PAGE_SIZE != 0
            || iova.checked_add(len).is_none()
            || offset.checked_add(len).is_none()
        {
            return Err(bad);
        }
        // A file that can shrink under us would turn device accesses into SIGBUS.
        let seals = shm::get_seals(fd.as_fd()).map_err(|_| SpaceError::NotSealed)?;
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(SpaceError::NotSealed);
        }
        let size = shm::file_size(fd.as_fd()).map_err(|_| SpaceError::NotSealed)?;
        if offset + len > size {
            return Err(SpaceError::TooSmall { size, offset, len });
        }
        let map = SharedMap::map(fd.as_fd(), offset, len as usize, writable).map_err(|e| {
            SpaceError::Map {
                len,
                errno: e.raw_os_error().unwrap_or(libc::EIO),
            }
        })?;
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        if maps.len() >= MAX_MAPPINGS {
            return Err(SpaceError::TooMany);
        }
        let pos = maps.partition_point(|m| m.iova < iova);
        let end = iova + len;
        let clash_prev = pos > 0 && maps[pos - 1].iova + maps[pos - 1].len > iova;
        let clash_next = pos < maps.len() && maps[pos].iova < end;
        if clash_prev || clash_next {
            return Err(SpaceError::Overlap { iova, len });
        }
        maps.insert(
            pos,
            Mapping {
                iova,
                len,
                writable,
                map,
            },
        );
        Ok(())
    }

    /// Unmaps every mapping inside `[iova, iova + len)` (whole mappings only;
    /// `0, u64::MAX` unmaps all). Returns the bytes unmapped. Waits for every
    /// read section to end first.
    pub fn unmap(&self, iova: u64, len: u64) -> Result<u64> {
        let end = iova.saturating_add(len);
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        let mut bytes = 0;
        for m in maps.iter() {
            let m_end = m.iova + m.len;
            let inside = m.iova >= iova && m_end <= end;
            let touches = m.iova < end && m_end > iova;
            if touches && !inside {
                return Err(SpaceError::Partial { iova, len });
            }
            if inside {
                bytes += m.len;
            }
        }
        if bytes == 0 {
            return Err(SpaceError::NotFound { iova, len });
        }
        maps.retain(|m| !(m.iova >= iova && m.iova + m.len <= end));
        Ok(bytes)
    }

    /// Unmaps everything.
    pub fn clear(&self) {
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        maps.clear();
    }

    /// Bytes mapped.
    pub fn mapped_bytes(&self) -> u64 {
        let maps = self.maps.read().unwrap_or_else(|e| e.into_inner());
        maps.iter().map(|m| m.len).sum()
    }

    /// Opens a read section. Never block inside one.
    pub fn view(&self) -> SpaceView<'_> {
        SpaceView {
            maps: self.maps.read().unwrap_or_else(|e| e.into_inner()),
            last: std::cell::Cell::new(0),
        }
    }
}

// SAFETY: a fragment points into one mapping held by the read guard, which
// `self` borrows, so it stays mapped while `self` lives; its length never
// passes the mapping's end; write access is refused on read-only mappings.
unsafe impl DmaMemory for SpaceView<'_> {
    fn translate(
        &self,
        addr: u64,
        len: u64,
        write: bool,
    ) -> std::result::Result<Fragment, PageFault> {
        let fault = PageFault { addr, write };
        let hit = self
            .maps
            .get(self.last.get())
            .filter(|m| addr >= m.iova && addr - m.iova < m.len);
        let m = match hit {
            Some(m) => m,
            None => {
                let pos = self.maps.partition_point(|m| m.iova <= addr);
                if pos == 0 {
                    return Err(fault);
                }
                self.last.set(pos - 1);
                &self.maps[pos - 1]
            }
        };
        let off = addr - m.iova;
        if off >= m.len || (write && !m.writable) {
            return Err(fault);
        }
        let n = (m.len - off).min(len);
        // SAFETY: off < m.len == the mapping's length.
        let ptr = unsafe { m.map.as_ptr().add(off as usize) };
        Ok(Fragment {
            ptr,
            len: n as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{read_bytes, write_bytes};

    fn sealed(len: u64) -> OwnedFd {
        let fd = shm::memfd("t", len).expect("memfd");
        shm::add_seals(fd.as_fd(), libc::F_SEAL_SHRINK).expect("seal");
        fd
    }

    #[test]
    fn test_map_translate_unmap() {
        let s = AddressSpace::default();
        let fd = sealed(0x3000);
        s.map(&fd, 0x10000, 0x2000, 0x1000, true).expect("map");
        write_bytes(&s.view(), 0x11fe0, &[1u8; 32]).expect("write");
        let mut b = [0u8; 32];
        read_bytes(&s.view(), 0x11fe0, &mut b).expect("read");
        assert_eq!(b, [1u8; 32]);
        assert!(read_bytes(&s.view(), 0x12000, &mut b).is_err());
        assert_eq!(
            s.unmap(0x10000, 0x1000),
            Err(SpaceError::Partial {
                iova: 0x10000,
                len: 0x1000
            })
        );
        assert_eq!(s.unmap(0, u64::MAX), Ok(0x2000));
        assert!(read_bytes(&s.view(), 0x11000, &mut b).is_err());
    }

    #[test]
    fn test_map_rejects_bad_input() {
        let s = AddressSpace::default();
        let fd = sealed(0x2000);
        assert!(matches!(
            s.map(&fd, 0x10001, 0x1000, 0, true),
            Err(SpaceError::BadRange { .. })
        ));
        assert!(matches!(
            s.map(&fd, u64::MAX - 0xfff, 0x1000, 0, true),
            Err(SpaceError::BadRange { .. })
        ));
        assert!(matches!(
            s.map(&fd, 0x10000, 0x3000, 0, true),
            Err(SpaceError::TooSmall { .. })
        ));
        let unsealed = shm::memfd("u", 0x1000).expect("memfd");
        assert_eq!(
            s.map(&unsealed, 0x10000, 0x1000, 0, true),
            Err(SpaceError::NotSealed)
        );
        s.map(&fd, 0x10000, 0x2000, 0, false).expect("map");
        assert!(matches!(
            s.map(&fd, 0x11000, 0x1000, 0, true),
            Err(SpaceError::Overlap { .. })
        ));
        // Read-only mapping refuses writes.
        assert!(write_bytes(&s.view(), 0x10000, &[1]).is_err());
        assert_eq!(
            s.unmap(0x40000, 0x1000),
            Err(SpaceError::NotFound {
                iova: 0x40000,
                len: 0x1000
            })
        );
    }
}
