//! Test support: the driver side of a split virtqueue.
//!
//! [`DriverRing`] lays out a split ring (descriptor table, available ring,
//! used ring) in an iommu-core [`Memory`] and plays the driver: it adds
//! descriptor chains, publishes them, and reads back what the device put on
//! the used ring. Tests of devices and of the transport use it on a memfd
//! that is shared with the backend exactly as a frontend would share guest
//! memory.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use iommu_core::Memory;

/// `VRING_DESC_F_NEXT`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`.
pub const VRING_DESC_F_INDIRECT: u16 = 4;

/// One buffer of a chain the driver adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Address of the buffer as the device sees it.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A split ring written by a test driver.
#[derive(Debug)]
pub struct DriverRing {
    mem: Arc<Memory>,
    off: usize,
    addr: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

/// Errors of the test driver (bad layout or a full ring).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriverError {
    /// The layout does not fit the memory.
    #[error("Ring layout of {need} bytes at offset {off} does not fit {have} bytes")]
    TooSmall {
        /// Bytes needed.
        need: usize,
        /// Offset.
        off: usize,
        /// Memory size.
        have: usize,
    },
    /// Size not a power of two.
    #[error("Queue size {0} is not a power of two")]
    BadSize(u16),
    /// More descriptors than the ring has.
    #[error("Chain of {0} descriptors does not fit")]
    Full(usize),
    /// Memory access failed.
    #[error("Memory access failed: {0}")]
    Memory(String),
}

impl DriverRing {
    /// Bytes a ring of `size` takes: descriptor table, then the available
    /// ring, then (4 KiB aligned) the used ring.
    pub fn layout_len(size: u16) -> usize {
        let s = usize::from(size);
        let used = Self::used_offset(size);
        used + 6 + 8 * s
    }

    fn avail_offset(size: u16) -> usize {
        16 * usize::from(size)
    }

    fn used_offset(size: u16) -> usize {
        let end = Self::avail_offset(size) + 6 + 2 * usize::from(size);
        end.div_ceil(4096) * 4096
    }

    /// A ring at byte `off` of `mem`, which the device sees at address `addr`.
    pub fn new(mem: Arc<Memory>, off: usize, addr: u64, size: u16) -> Result<Self, DriverError> {
        if size == 0 || !size.is_power_of_two() {
            return Err(DriverError::BadSize(size));
        }
        let need = Self::layout_len(size);
        if off.checked_add(need).is_none_or(|end| end > mem.len()) {
            return Err(DriverError::TooSmall {
                need,
                off,
                have: mem.len(),
            });
        }
        mem.fill(off, need, 0)
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        Ok(DriverRing {
            mem,
            off,
            addr,
            size,
            next_desc: 0,
            avail_idx: 0,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Device address of the descriptor table.
    pub fn desc_addr(&self) -> u64 {
        self.addr
    }

    /// Device address of the available ring.
    pub fn avail_addr(&self) -> u64 {
        self.addr + Self::avail_offset(self.size) as u64
    }

    /// Device address of the used ring.
    pub fn used_addr(&self) -> u64 {
        self.addr + Self::used_offset(self.size) as u64
    }

    fn write(&self, off: usize, b: &[u8]) -> Result<(), DriverError> {
        self.mem
            .write_at(self.off + off, b)
            .map_err(|e| DriverError::Memory(e.to_string()))
    }

    fn read(&self, off: usize, b: &mut [u8]) -> Result<(), DriverError> {
        self.mem
            .read_at(self.off + off, b)
            .map_err(|e| DriverError::Memory(e.to_string()))
    }

    /// Writes a raw descriptor at table slot `index`.
    pub fn write_desc(
        &self,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), DriverError> {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(16 * usize::from(index % self.size), &d)
    }

    /// Adds a chain of `bufs` (readable ones first) without publishing it;
    /// returns its head.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> Result<u16, DriverError> {
        if bufs.is_empty() || bufs.len() > usize::from(self.size) {
            return Err(DriverError::Full(bufs.len()));
        }
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            let next = idx.wrapping_add(1) % self.size;
            let mut flags = if b.writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(idx, b.addr, b.len, flags, next)?;
            self.next_desc = next;
        }
        self.push_avail(head)?;
        Ok(head)
    }

    /// Puts `head` on the available ring (not yet visible: see [`publish`](Self::publish)).
    pub fn push_avail(&mut self, head: u16) -> Result<(), DriverError> {
        let slot = usize::from(self.avail_idx % self.size);
        self.write(
            Self::avail_offset(self.size) + 4 + 2 * slot,
            &head.to_le_bytes(),
        )?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Makes every added chain visible to the device (writes the available index).
    pub fn publish(&self) -> Result<(), DriverError> {
        fence(Ordering::SeqCst);
        self.write(
            Self::avail_offset(self.size) + 2,
            &self.avail_idx.to_le_bytes(),
        )?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Overwrites the published available index (to craft bad drivers).
    pub fn set_avail_idx(&mut self, idx: u16) -> Result<(), DriverError> {
        self.avail_idx = idx;
        self.publish()
    }

    /// The device's used index.
    pub fn used_idx(&self) -> Result<u16, DriverError> {
        fence(Ordering::SeqCst);
        let mut b = [0u8; 2];
        self.read(Self::used_offset(self.size) + 2, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Used element `i` (modulo the size): `(head, length written)`.
    pub fn used_elem(&self, i: u16) -> Result<(u32, u32), DriverError> {
        let slot = usize::from(i % self.size);
        let mut b = [0u8; 8];
        self.read(Self::used_offset(self.size) + 4 + 8 * slot, &mut b)?;
        let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        Ok((id, len))
    }
}
