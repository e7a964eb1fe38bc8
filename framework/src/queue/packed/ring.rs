//! Where a packed ring's three areas are reached: [`RingMem`] is the
//! access the walk, completions and event suppression need, with two
//! implementations: [`HostRing`], the areas translated once for the
//! handle's access section and read and written at their host addresses
//! (the hot path, as the split ring's `Rings`), and [`DmaRing`], every
//! field through the DMA handle (areas that are not host-contiguous, as
//! with a guest IOMMU mapping a large ring page by page).

use std::sync::atomic::{fence, Ordering};

use super::desc::{PackedDesc, DESC_LEN};
use crate::dma::{Access, Dma, DmaError};
use crate::queue::Rings;

/// Result of a ring access.
pub(crate) type Mem<T> = std::result::Result<T, DmaError>;

/// A packed ring's descriptor ring, driver area (the driver's event
/// suppression structure) and device area (the device's). Slots are
/// `< size()`.
pub(crate) trait RingMem {
    /// Ring size.
    fn size(&self) -> u16;
    /// The flags of descriptor `slot`, then an acquire fence: what is read
    /// of the slot afterwards is at least as new as the flags.
    fn flags(&self, slot: u16) -> Mem<u16>;
    /// Descriptor `slot` (read after its flags, see [`RingMem::flags`]).
    fn desc(&self, slot: u16) -> Mem<PackedDesc>;
    /// Writes `id` and `len` of used descriptor `slot` (not its flags).
    fn write_used(&self, slot: u16, id: u16, len: u32) -> Mem<()>;
    /// Writes the flags of descriptor `slot`.
    fn set_flags(&self, slot: u16, flags: u16) -> Mem<()>;
    /// The driver's event suppression structure: (`off_wrap`, `flags`).
    fn driver_event(&self) -> Mem<(u16, u16)>;
    /// The device's event suppression flags.
    fn device_flags(&self) -> Mem<u16>;
    /// Writes the device's `off_wrap`.
    fn set_device_off_wrap(&self, off_wrap: u16) -> Mem<()>;
    /// Writes the device's event suppression flags.
    fn set_device_flags(&self, flags: u16) -> Mem<()>;
}

/// The areas at host addresses translated for the whole section: the
/// descriptor ring (16 * size bytes, 16-aligned, writable), the driver
/// area and the device area (4 bytes each, 4-aligned; the driver area
/// readable, the device area writable), checked when translated.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostRing {
    desc: *mut u8,
    driver: *const u8,
    device: *mut u8,
    size: u16,
}

impl HostRing {
    /// The packed layout of a queue's translated areas (`Rings` holds the
    /// descriptor ring, the driver area in `avail` and the device area in
    /// `used`).
    pub(in crate::queue) fn new(r: Rings) -> Self {
        HostRing {
            desc: r.desc.cast_mut(),
            driver: r.avail,
            device: r.used,
            size: r.size,
        }
    }

    #[inline]
    fn at(&self, slot: u16, off: usize) -> *mut u8 {
        self.desc
            .wrapping_add(DESC_LEN as usize * usize::from(slot) + off)
    }

    /// [`RingMem::write_used`], which cannot fail at a host address.
    #[inline(always)]
    pub(crate) fn put_used(&self, slot: u16, id: u16, len: u32) {
        // SAFETY: slot < size, inside the ring translated for write; the
        // length at offset 8 is 4-aligned, the id at offset 12 2-aligned.
        unsafe {
            std::ptr::write_volatile(self.at(slot, 8).cast::<u32>(), len.to_le());
            std::ptr::write_volatile(self.at(slot, 12).cast::<u16>(), id.to_le());
        }
    }

    /// Writes used descriptor `slot` whole: `len`, `id` and `flags` (the 8
    /// bytes from offset 8) in one store. Only for a descriptor the driver
    /// does not read before a later release: not the first of a batch.
    #[inline(always)]
    pub(crate) fn put_used_flags(&self, slot: u16, id: u16, len: u32, flags: u16) {
        self.put_used_word(
            u32::from(slot),
            u64::from(len) | (u64::from(id) << 32) | (u64::from(flags) << 48),
        );
    }

    /// [`put_used_flags`](HostRing::put_used_flags) with the three fields
    /// as one value: the length in bits 0-31, the id in 32-47, the flags
    /// in 48-63. The slot as a `u32` (below the size), which a loop keeps
    /// without cutting it to 16 bits for each descriptor.
    #[inline(always)]
    pub(crate) fn put_used_word(&self, slot: u32, v: u64) {
        let at = self
            .desc
            .wrapping_add(DESC_LEN as usize * slot as usize + 8);
        // SAFETY: slot < size, inside the ring translated for write; offset
        // 8 of a 16-aligned descriptor is 8-aligned: length, id and flags
        // in their little-endian layout.
        unsafe { std::ptr::write_volatile(at.cast::<u64>(), v.to_le()) };
    }
}

impl RingMem for HostRing {
    #[inline]
    fn size(&self) -> u16 {
        self.size
    }

    #[inline]
    fn flags(&self, slot: u16) -> Mem<u16> {
        // SAFETY: slot < size: offset 14 of a descriptor inside the ring
        // translated for 16 * size bytes, 2-aligned; mapped until the
        // section ends, after the queue handle.
        let v = unsafe { std::ptr::read_volatile(self.at(slot, 14).cast::<u16>()) };
        fence(Ordering::Acquire);
        Ok(u16::from_le(v))
    }

    #[inline]
    fn desc(&self, slot: u16) -> Mem<PackedDesc> {
        // SAFETY: as in `flags`: the descriptor's 8-aligned address field.
        let addr = unsafe { std::ptr::read_volatile(self.at(slot, 0).cast::<u64>()) };
        // SAFETY: as above, the 4-aligned length at offset 8.
        let len = unsafe { std::ptr::read_volatile(self.at(slot, 8).cast::<u32>()) };
        // SAFETY: as above, the 2-aligned id at offset 12.
        let id = unsafe { std::ptr::read_volatile(self.at(slot, 12).cast::<u16>()) };
        // SAFETY: as above, the flags at offset 14.
        let flags = unsafe { std::ptr::read_volatile(self.at(slot, 14).cast::<u16>()) };
        Ok(PackedDesc {
            addr: u64::from_le(addr),
            len: u32::from_le(len),
            id: u16::from_le(id),
            flags: u16::from_le(flags),
        })
    }

    #[inline]
    fn write_used(&self, slot: u16, id: u16, len: u32) -> Mem<()> {
        self.put_used(slot, id, len);
        Ok(())
    }

    #[inline]
    fn set_flags(&self, slot: u16, flags: u16) -> Mem<()> {
        // SAFETY: as in `write_used`: the flags at offset 14.
        unsafe { std::ptr::write_volatile(self.at(slot, 14).cast::<u16>(), flags.to_le()) };
        Ok(())
    }

    #[inline]
    fn driver_event(&self) -> Mem<(u16, u16)> {
        // SAFETY: the driver area was translated for 4 bytes, 4-aligned.
        let (o, f) = unsafe {
            (
                std::ptr::read_volatile(self.driver.cast::<u16>()),
                std::ptr::read_volatile(self.driver.wrapping_add(2).cast::<u16>()),
            )
        };
        Ok((u16::from_le(o), u16::from_le(f)))
    }

    #[inline]
    fn device_flags(&self) -> Mem<u16> {
        // SAFETY: the device area was translated for write (so readable)
        // for 4 bytes, 4-aligned: flags at offset 2.
        let f = unsafe { std::ptr::read_volatile(self.device.wrapping_add(2).cast::<u16>()) };
        Ok(u16::from_le(f))
    }

    #[inline]
    fn set_device_off_wrap(&self, off_wrap: u16) -> Mem<()> {
        // SAFETY: as in `device_flags`, offset 0.
        unsafe { std::ptr::write_volatile(self.device.cast::<u16>(), off_wrap.to_le()) };
        Ok(())
    }

    #[inline]
    fn set_device_flags(&self, flags: u16) -> Mem<()> {
        // SAFETY: as in `device_flags`.
        unsafe {
            std::ptr::write_volatile(self.device.wrapping_add(2).cast::<u16>(), flags.to_le())
        };
        Ok(())
    }
}

/// The areas reached field by field through the DMA handle (each access
/// translated; a miss is returned and parks the queue).
#[derive(Clone, Copy, Debug)]
pub(crate) struct DmaRing<'a> {
    pub(crate) dma: Dma<'a>,
    pub(crate) desc: u64,
    pub(crate) driver: u64,
    pub(crate) device: u64,
    pub(crate) size: u16,
}

impl DmaRing<'_> {
    fn slot(&self, slot: u16, off: u64) -> u64 {
        self.desc
            .wrapping_add(DESC_LEN * u64::from(slot))
            .wrapping_add(off)
    }
}

impl RingMem for DmaRing<'_> {
    fn size(&self) -> u16 {
        self.size
    }

    fn flags(&self, slot: u16) -> Mem<u16> {
        let f: u16 = self.dma.read_obj(self.slot(slot, 14))?;
        fence(Ordering::Acquire);
        Ok(u16::from_le(f))
    }

    fn desc(&self, slot: u16) -> Mem<PackedDesc> {
        let b: [u8; 16] = self.dma.read_obj(self.slot(slot, 0))?;
        Ok(PackedDesc::from_le_bytes(b))
    }

    fn write_used(&self, slot: u16, id: u16, len: u32) -> Mem<()> {
        let mut b = [0u8; 6];
        b[..4].copy_from_slice(&len.to_le_bytes());
        b[4..].copy_from_slice(&id.to_le_bytes());
        self.dma.write(self.slot(slot, 8), &b)
    }

    fn set_flags(&self, slot: u16, flags: u16) -> Mem<()> {
        self.dma.write_obj(self.slot(slot, 14), &flags.to_le())
    }

    fn driver_event(&self) -> Mem<(u16, u16)> {
        let b: [u8; 4] = self.dma.read_obj(self.driver)?;
        Ok((
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[2], b[3]]),
        ))
    }

    fn device_flags(&self) -> Mem<u16> {
        let f: u16 = self.dma.read_obj(self.device.wrapping_add(2))?;
        Ok(u16::from_le(f))
    }

    fn set_device_off_wrap(&self, off_wrap: u16) -> Mem<()> {
        self.dma.write_obj(self.device, &off_wrap.to_le())
    }

    fn set_device_flags(&self, flags: u16) -> Mem<()> {
        self.dma
            .write_obj(self.device.wrapping_add(2), &flags.to_le())
    }
}

/// The sizes and accesses a packed ring's areas are checked for: the
/// descriptor ring is written too (used descriptors go there).
pub(crate) fn area_checks(
    desc: u64,
    driver: u64,
    device: u64,
    size: u16,
) -> [(u64, u64, Access); 3] {
    [
        (desc, DESC_LEN * u64::from(size), Access::Write),
        (driver, super::desc::EVENT_LEN, Access::Read),
        (device, super::desc::EVENT_LEN, Access::Write),
    ]
}
