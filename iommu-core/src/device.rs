//! Devices, as their owner (a backend) creates them.

use std::sync::Arc;

use crate::fault::PendingFault;
use crate::translate::Translator;
use crate::types::{DevId, HwInfo};

/// Called (on the responding thread) when a fault group of the device is
/// answered; it must not block.
pub type FaultWaker = Arc<dyn Fn(&PendingFault) + Send + Sync>;

pub(crate) struct DeviceShared {}

/// A device: a label and its hardware info. Created by the device's owner,
/// bound to at most one [`Iommu`](crate::Iommu) at a time, and the source of
/// [`Translator`]s for its DMA threads. Cheap to clone.
#[derive(Clone)]
pub struct Device {
    pub(crate) shared: Arc<DeviceShared>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").finish_non_exhaustive()
    }
}

impl Device {
    /// A new, unbound device.
    pub fn new(label: impl Into<String>, info: HwInfo) -> Device {
        let _ = (label.into(), info);
        todo!()
    }
    /// The label.
    pub fn label(&self) -> &str {
        todo!()
    }
    /// The hardware info.
    pub fn hw_info(&self) -> &HwInfo {
        todo!()
    }
    /// The id of the current binding, if bound.
    pub fn dev_id(&self) -> Option<DevId> {
        todo!()
    }
    /// A new translator (one per DMA thread).
    pub fn translator(&self) -> Translator {
        todo!()
    }
    /// Sets or clears the waker called when a fault group is answered.
    pub fn set_fault_waker(&self, waker: Option<FaultWaker>) {
        let _ = waker;
        todo!()
    }
    /// Fault groups of this device that are queued or awaiting a response.
    pub fn outstanding_faults(&self) -> usize {
        todo!()
    }
}
