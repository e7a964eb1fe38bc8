//! A device config space laid out as a `#[repr(C)]` struct of
//! little-endian fields (the virtio spec's layout), served to
//! [`Device::read_config`](crate::device::Device::read_config) /
//! [`Device::write_config`](crate::device::Device::write_config) by byte
//! ranges.
//!
//! When the config protocol feature is offered: the framework offers
//! `VHOST_USER_PROTOCOL_F_CONFIG` exactly when the device's
//! [`config_size`](crate::device::Device::config_size) is not 0; the
//! frontend then reads the space with GET_CONFIG (QEMU does so when the
//! device is realized and on every guest read) and writes it with
//! SET_CONFIG. The framework checks every range against `config_size`
//! before calling the device.

use std::sync::Mutex;

use vm_memory::ByteValued;

use crate::device::{DeviceError, Result};

/// A config space of type `T`, readable and (for the bytes a device allows)
/// writable by the driver. Thread-safe: the connection thread reads it while
/// the device may update it.
#[derive(Debug)]
pub struct ConfigSpace<T: ByteValued> {
    value: Mutex<T>,
}

impl<T: ByteValued> ConfigSpace<T> {
    /// A config space holding `value`.
    pub fn new(value: T) -> ConfigSpace<T> {
        ConfigSpace {
            value: Mutex::new(value),
        }
    }

    /// Its size in bytes (what [`Device::config_size`](crate::device::Device::config_size) returns).
    pub fn size(&self) -> u32 {
        u32::try_from(std::mem::size_of::<T>()).unwrap_or(u32::MAX)
    }

    /// A copy of the current value.
    pub fn get(&self) -> T {
        *self.value.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the value (the device tells the driver through a config
    /// change notification of its own, if it has one).
    pub fn set(&self, value: T) {
        *self.value.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }

    /// Copies `data.len()` bytes at `offset` into `data`.
    pub fn read(&self, offset: u32, data: &mut [u8]) -> Result<()> {
        let v = self.value.lock().unwrap_or_else(|e| e.into_inner());
        let range = Self::range(offset, data.len())?;
        data.copy_from_slice(&v.as_slice()[range]);
        Ok(())
    }

    /// Writes `data` at `offset`, if every byte written lies in one of
    /// `writable` (byte ranges the driver may change); otherwise nothing
    /// changes and the write is refused.
    pub fn write(
        &self,
        offset: u32,
        data: &[u8],
        writable: &[std::ops::Range<usize>],
    ) -> Result<()> {
        let range = Self::range(offset, data.len())?;
        if !writable
            .iter()
            .any(|w| w.start <= range.start && range.end <= w.end)
        {
            return Err(DeviceError::Unsupported(
                "write to a read-only config field",
            ));
        }
        let mut v = self.value.lock().unwrap_or_else(|e| e.into_inner());
        v.as_mut_slice()[range].copy_from_slice(data);
        Ok(())
    }

    fn range(offset: u32, len: usize) -> Result<std::ops::Range<usize>> {
        let start = offset as usize;
        start
            .checked_add(len)
            .filter(|&end| end <= std::mem::size_of::<T>())
            .map(|end| start..end)
            .ok_or(DeviceError::ConfigRange { offset, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, packed)]
    #[derive(Clone, Copy, Default)]
    struct Cfg {
        a: u64,
        b: u8,
    }
    // SAFETY: plain integers, packed, any bit pattern is valid.
    unsafe impl ByteValued for Cfg {}

    #[test]
    fn test_ranges_and_writable_fields() {
        let c = ConfigSpace::new(Cfg { a: 0x0102, b: 7 });
        assert_eq!(c.size(), 9);
        let mut b = [0u8; 2];
        c.read(0, &mut b).expect("read");
        assert_eq!(b, [2, 1]);
        assert!(c.read(8, &mut b).is_err());
        assert!(c.read(u32::MAX, &mut b).is_err());
        let writable = [8..9, 9..9];
        assert!(c.write(0, &[9], &writable).is_err());
        c.write(8, &[9], &writable).expect("writable");
        assert_eq!(c.get().b, 9);
    }
}
