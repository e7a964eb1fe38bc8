//! The split ring at its host addresses: the descriptor table, avail ring
//! and used ring of a queue translated once (see `queues.rs`), and their
//! fields read and written there directly, with the ring's byte order and
//! the ordering the driver relies on.

use std::sync::atomic::{fence, Ordering};

pub(super) const VRING_DESC_F_NEXT: u16 = 1;

pub(super) const VRING_DESC_F_WRITE: u16 = 2;

pub(super) const VRING_DESC_F_INDIRECT: u16 = 4;

pub(super) const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// `used->flags`: the device asks the driver not to kick.
pub(super) const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// A split-ring descriptor as laid out in the table (little endian).
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct RawDesc {
    pub(super) addr: u64,
    pub(super) len: u32,
    pub(super) flags: u16,
    pub(super) next: u16,
}

/// Host addresses of a queue's three ring areas, translated for the whole
/// area each and valid for the access section the [`Queue`](super::Queue) lives in.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rings {
    pub(super) desc: *const u8,
    pub(super) avail: *const u8,
    pub(super) used: *mut u8,
    pub(super) size: u16,
    pub(super) event_idx: bool,
}

impl Rings {
    /// `avail->idx`, with acquire ordering for the entries it announces.
    #[inline]
    pub(super) fn avail_idx(&self) -> u16 {
        // SAFETY: the avail area was translated for at least 4 + 2 * size
        // bytes and is 2-aligned (checked when the rings were mapped); it
        // stays mapped until the section ends, after the queue is dropped.
        let v = unsafe { std::ptr::read_volatile(self.avail.wrapping_add(2).cast::<u16>()) };
        fence(Ordering::Acquire);
        u16::from_le(v)
    }

    #[inline]
    pub(super) fn avail_flags(&self) -> u16 {
        // SAFETY: as in `avail_idx`: offset 0 of the translated avail area.
        u16::from_le(unsafe { std::ptr::read_volatile(self.avail.cast::<u16>()) })
    }

    /// `avail->ring[slot]`; `slot < size`.
    #[inline]
    pub(super) fn avail_entry(&self, slot: u16) -> u16 {
        let off = 4 + 2 * usize::from(slot);
        // SAFETY: slot < size, so the entry is inside the translated
        // 4 + 2 * size bytes; 2-aligned.
        u16::from_le(unsafe { std::ptr::read_volatile(self.avail.wrapping_add(off).cast::<u16>()) })
    }

    /// `used_event` (the avail ring's trailing field); only with `EVENT_IDX`,
    /// for which the area was translated 2 bytes longer.
    #[inline]
    pub(super) fn used_event(&self) -> u16 {
        let off = 4 + 2 * usize::from(self.size);
        // SAFETY: with EVENT_IDX the avail area was translated for
        // 4 + 2 * size + 2 bytes; 2-aligned.
        u16::from_le(unsafe { std::ptr::read_volatile(self.avail.wrapping_add(off).cast::<u16>()) })
    }

    /// Descriptor `i`; `i < size`.
    #[inline]
    pub(super) fn desc(&self, i: u16) -> RawDesc {
        // SAFETY: i < size, the table was translated for 16 * size bytes
        // and is 16-aligned (checked when mapped).
        let d = unsafe {
            std::ptr::read_volatile(
                self.desc
                    .wrapping_add(16 * usize::from(i))
                    .cast::<RawDesc>(),
            )
        };
        RawDesc {
            addr: u64::from_le(d.addr),
            len: u32::from_le(d.len),
            flags: u16::from_le(d.flags),
            next: u16::from_le(d.next),
        }
    }

    /// Writes used element `slot` (`slot < size`).
    #[inline]
    pub(super) fn write_used(&self, slot: u16, id: u32, len: u32) {
        let off = 4 + 8 * usize::from(slot);
        // SAFETY: slot < size, so the 8-byte element is inside the used area
        // translated for write for 4 + 8 * size bytes; it is 4-aligned (the
        // area is, checked when mapped).
        unsafe { std::ptr::write_volatile(self.used.wrapping_add(off).cast::<u32>(), id.to_le()) };
        // SAFETY: as above, the element's second half.
        unsafe {
            std::ptr::write_volatile(self.used.wrapping_add(off + 4).cast::<u32>(), len.to_le())
        };
    }

    /// `used->idx` as last published.
    pub(super) fn used_idx(&self) -> u16 {
        // SAFETY: offset 2 of the used area, translated for write (so also
        // readable), 4-aligned.
        u16::from_le(unsafe { std::ptr::read_volatile(self.used.wrapping_add(2).cast::<u16>()) })
    }

    /// The head (`id`) of used element `slot` (`slot < size`).
    pub(super) fn used_id(&self, slot: u16) -> u32 {
        let off = 4 + 8 * usize::from(slot % self.size.max(1));
        // SAFETY: slot < size: inside the used area, 4-aligned.
        u32::from_le(unsafe { std::ptr::read_volatile(self.used.wrapping_add(off).cast::<u32>()) })
    }

    /// `used->flags`.
    #[inline]
    pub(super) fn used_flags(&self) -> u16 {
        // SAFETY: offset 0 of the used area, translated for write (so also
        // readable), 4-aligned.
        u16::from_le(unsafe { std::ptr::read_volatile(self.used.cast::<u16>()) })
    }

    /// Sets `used->flags`.
    #[inline]
    pub(super) fn set_used_flags(&self, flags: u16) {
        // SAFETY: offset 0 of the used area, translated for write, 4-aligned.
        unsafe { std::ptr::write_volatile(self.used.cast::<u16>(), flags.to_le()) };
    }

    /// Publishes `used->idx` after the elements written before (release).
    #[inline]
    pub(super) fn publish_used(&self, idx: u16) {
        fence(Ordering::Release);
        // SAFETY: offset 2 of the used area, translated for write, 4-aligned.
        unsafe { std::ptr::write_volatile(self.used.wrapping_add(2).cast::<u16>(), idx.to_le()) };
    }
}
