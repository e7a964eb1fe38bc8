//! What the worker threads tell the driver through VDUSE (the
//! [`Transport`] of a VDUSE device): calls are `VDUSE_VQ_INJECT_IRQ` on the
//! device fd, misses go to the device's control thread (which asks the
//! kernel for the region with `VDUSE_IOTLB_GET_FD`, maps it and resumes the
//! queue), access failures and failed rings are logged (Linux 6.12's VDUSE
//! has no way for a device to set `NEEDS_RESET`), a config change replaces
//! the kernel's copy of the config space (`VDUSE_DEV_SET_CONFIG`: the
//! kernel answers the driver's config reads from it) and injects a config
//! interrupt (`VDUSE_DEV_INJECT_CONFIG_IRQ`).

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::sys;
use crate::config_space::ConfigChange;
use crate::dma::Access;
use crate::peer_write::Writer;
use crate::transport::{MissReport, Signals, Transport};

/// Most misses waiting for the control thread; more are dropped (the queue
/// reports again on its retry).
const MAX_PENDING_MISSES: usize = 256;

/// The VDUSE transport of one device.
#[derive(Debug)]
pub(crate) struct VduseTransport {
    dev: Arc<File>,
    /// IOVAs the workers missed, for the control thread.
    misses: Mutex<Vec<u64>>,
    /// Wakes the control thread when `misses` grew.
    pub miss_event: EventFd,
}

impl VduseTransport {
    /// The transport of the device whose fd is `dev`.
    pub fn new(dev: Arc<File>) -> io::Result<VduseTransport> {
        Ok(VduseTransport {
            dev,
            misses: Mutex::new(Vec::new()),
            miss_event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The misses reported since the last call.
    pub fn take_misses(&self) -> Vec<u64> {
        let _ = self.miss_event.read();
        std::mem::take(&mut *self.misses.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Transport for VduseTransport {
    fn report_miss(&self, index: u16, iova: u64, _access: Access) -> MissReport {
        {
            let mut m = self.misses.lock().unwrap_or_else(|p| p.into_inner());
            if m.len() >= MAX_PENDING_MISSES {
                return MissReport::Retry;
            }
            if !m.contains(&iova) {
                m.push(iova);
            }
        }
        if let Err(e) = self.miss_event.write(1) {
            crate::log_limited!(
                log::Level::Warn,
                "queue {index}: waking the VDUSE control thread for a miss at {iova:#x}: {e}"
            );
            return MissReport::Retry;
        }
        MissReport::Done
    }

    fn access_failed(&self, iova: u64, access: Access) {
        crate::log_limited!(
            log::Level::Warn,
            "the kernel's mapping at {iova:#x} does not allow {access:?}"
        );
    }

    fn call(&self, index: u16, _ring: &mut Signals, _writer: &Writer) -> io::Result<()> {
        match sys::inject_irq(&*self.dev, u32::from(index)) {
            Ok(()) => Ok(()),
            // The driver is resetting the device (DRIVER_OK is gone): the
            // interrupt has no one to go to.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                crate::log_limited!(
                    log::Level::Debug,
                    "queue {index}: interrupt while the device is not running"
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn config_changed(&self, config: &[u8]) -> io::Result<ConfigChange> {
        sys::set_config(&*self.dev, 0, config)?;
        if cfg!(ioasis_broken = "noconfigirq") {
            // Test-only: the kernel's copy changes, the driver is not told.
            return Ok(ConfigChange::Signalled);
        }
        match sys::inject_config_irq(&*self.dev) {
            Ok(()) => Ok(ConfigChange::Signalled),
            // Not DRIVER_OK: the driver reads the new space when it starts.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(ConfigChange::NotRunning),
            Err(e) => Err(e),
        }
    }

    fn queue_failed(&self, index: u16, _ring: &mut Signals, _writer: &Writer) {
        crate::log_limited!(log::Level::Error,
            "queue {index} failed; VDUSE gives a device no way to set NEEDS_RESET, so the driver is not told (the queue stays stopped until the driver resets the device)"
        );
    }
}
