//! A device config space laid out as a `#[repr(C)]` struct of
//! little-endian fields (the virtio spec's layout), served to
//! [`Device::read_config`] /
//! [`Device::write_config`] by byte
//! ranges.
//!
//! When the config protocol feature is offered: the framework offers
//! `VHOST_USER_PROTOCOL_F_CONFIG` exactly when the device's
//! [`config_size`](crate::device::Device::config_size) is not 0; the
//! frontend then reads the space with GET_CONFIG (QEMU does so when the
//! device is realized and on every guest read) and writes it with
//! SET_CONFIG. The framework checks every range against `config_size`
//! before calling the device.
//!
//! A device whose config space changes under the driver (a disk that grew)
//! updates it and then tells the driver through a [`ConfigNotifier`]
//! ([`Server::config_notifier`](crate::server::Server::config_notifier)):
//! over vhost-user a `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend
//! request channel (the frontend re-reads the space with GET_CONFIG and
//! interrupts the guest), over VDUSE the kernel's copy of the space is
//! replaced (`VDUSE_DEV_SET_CONFIG`) and a config interrupt injected
//! (`VDUSE_DEV_INJECT_CONFIG_IRQ`).

use std::sync::{Arc, Mutex};

use vm_memory::ByteValued;

use crate::device::{Device, DeviceError, Result};
use crate::transport::ConfigTarget;

/// What became of a config change ([`ConfigNotifier::notify`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigChange {
    /// The driver was told (VDUSE: the kernel's copy updated and the
    /// interrupt injected; vhost-user: the message sent).
    Signalled,
    /// The driver side has the new space but the driver is not running
    /// the device (VDUSE without `DRIVER_OK`): it reads the new space when
    /// it starts.
    NotRunning,
    /// No driver is connected (vhost-user between frontends): the next
    /// one reads the new space.
    NoDriver,
    /// The driver cannot be told, for this reason (the frontend did not
    /// negotiate what it takes); it sees the change only when it reads the
    /// space again by itself.
    CannotTell(&'static str),
}

/// Tells a device's driver that its config space changed: the device
/// (or its control side: a daemon's signal handler thread) updates the
/// space first, then calls [`notify`](ConfigNotifier::notify). Obtained
/// from [`Server::config_notifier`](crate::server::Server::config_notifier);
/// cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct ConfigNotifier {
    device: Arc<dyn Device>,
    target: Arc<ConfigTarget>,
}

impl std::fmt::Debug for ConfigNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigNotifier")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl ConfigNotifier {
    pub(crate) fn new(device: Arc<dyn Device>, target: Arc<ConfigTarget>) -> ConfigNotifier {
        ConfigNotifier { device, target }
    }

    /// Reads the device's whole config space ([`Device::read_config`]) and
    /// hands it to the transport the device is served over now, which
    /// tells the driver. May wait briefly (a full backend channel); never
    /// for the driver's answer.
    pub fn notify(&self) -> Result<ConfigChange> {
        let size = self.device.config_size() as usize;
        if size == 0 {
            return Ok(ConfigChange::CannotTell("the device has no config space"));
        }
        let mut config = vec![0u8; size];
        self.device.read_config(0, &mut config)?;
        let Some(transport) = self.target.get() else {
            return Ok(ConfigChange::NoDriver);
        };
        transport
            .config_changed(&config)
            .map_err(|source| DeviceError::Io {
                op: "signalling a config change",
                source,
            })
    }
}

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

    /// Its size in bytes (what [`Device::config_size`] returns).
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

    /// A device with a config space of [`Cfg`].
    struct CfgDevice(ConfigSpace<Cfg>);

    impl Device for CfgDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            0
        }
        fn num_queues(&self) -> usize {
            1
        }
        fn max_queue_size(&self) -> u16 {
            8
        }
        fn worker(&self, _thread: usize) -> Result<Box<dyn crate::device::Worker>> {
            Err(DeviceError::Unsupported("no workers"))
        }
        fn config_size(&self) -> u32 {
            self.0.size()
        }
        fn read_config(&self, offset: u32, data: &mut [u8]) -> Result<()> {
            self.0.read(offset, data)
        }
    }

    /// A transport that records the config spaces it was given.
    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<Vec<u8>>>);

    impl crate::transport::Transport for Recorder {
        fn report_miss(
            &self,
            _index: u16,
            _iova: u64,
            _access: crate::dma::Access,
        ) -> crate::transport::MissReport {
            crate::transport::MissReport::Done
        }
        fn access_failed(&self, _iova: u64, _access: crate::dma::Access) {}
        fn config_changed(&self, config: &[u8]) -> std::io::Result<ConfigChange> {
            self.0.lock().expect("lock").push(config.to_vec());
            Ok(ConfigChange::Signalled)
        }
    }

    /// A change reaches the transport the device is served over now, with
    /// the space as it reads after the update; none while it is served
    /// over nothing, and none once that transport is gone.
    #[test]
    fn test_notifier_reaches_the_current_transport() {
        let device = Arc::new(CfgDevice(ConfigSpace::new(Cfg { a: 1, b: 2 })));
        let target = Arc::new(ConfigTarget::default());
        let n = ConfigNotifier::new(device.clone(), target.clone());
        assert_eq!(n.notify().expect("no driver"), ConfigChange::NoDriver);
        let rec = Arc::new(Recorder::default());
        let t: Arc<dyn crate::transport::Transport> = rec.clone();
        target.set(Some(&t));
        device.0.set(Cfg { a: 0x0300, b: 2 });
        assert_eq!(n.clone().notify().expect("told"), ConfigChange::Signalled);
        assert_eq!(
            *rec.0.lock().expect("lock"),
            vec![vec![0, 3, 0, 0, 0, 0, 0, 0, 2]]
        );
        drop((t, rec));
        assert_eq!(n.notify().expect("gone"), ConfigChange::NoDriver);
    }
}
