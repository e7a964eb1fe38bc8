//! The kernel side of a VDUSE device: created through
//! `/dev/vduse/control` from the [`Device`]'s description, opened as
//! `/dev/vduse/NAME`, its queues set up (`VDUSE_VQ_SETUP`, which the kernel
//! requires of every queue before `vdpa dev add`), and destroyed when the
//! daemon lets go of it.
//!
//! A device of the same name that already exists (a daemon restarted while
//! the device stayed on the vDPA bus) is taken over rather than created:
//! the kernel keeps it, its config space and its queues' state across the
//! daemon's exit.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use iommu_core::Memory;

use log::{info, warn};

use super::sys::{self, DevConfig, DevConfigBuf, VDUSE_NAME_MAX};
use super::{Error, Result};
use crate::device::Device;
use crate::queue::inflight::InflightRegion;
use crate::queue::queue_region_size;
use crate::virtio::{
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// The control device.
pub const CONTROL_PATH: &str = "/dev/vduse/control";

/// Bits the framework never offers over VDUSE: packed rings (split rings
/// only), and bits 26 and 30, which vhost-user uses for dirty logging
/// (`VHOST_F_LOG_ALL`) and its protocol features: a device model that
/// lists them must not pass them to the kernel.
const NOT_OFFERED: u64 = VIRTIO_F_RING_PACKED | (1 << 26) | (1 << 30);

/// The transport features the framework offers over VDUSE on top of the
/// device's (the kernel refuses a device without `ACCESS_PLATFORM`).
pub const VDUSE_TRANSPORT_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_F_ACCESS_PLATFORM
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX;

/// Virtio features offered over VDUSE for `device`.
pub fn offered_features(device: &dyn Device) -> u64 {
    (device.features() & !NOT_OFFERED) | VDUSE_TRANSPORT_FEATURES
}

/// Alignment of the queues' metadata the device asks for.
const VQ_ALIGN: u32 = 4096;

/// A VDUSE device in the kernel, and this process's fd of it.
#[derive(Debug)]
pub(crate) struct KernelDevice {
    name: String,
    name_bytes: [u8; VDUSE_NAME_MAX],
    /// `/dev/vduse/NAME`, opened non-blocking.
    pub fd: File,
    /// The device existed before (taken over, not created).
    pub existed: bool,
    /// The inflight record of a device that tracks its requests in flight
    /// ([`Device::inflight_tracking`]): a file that outlives the daemon.
    pub inflight: Option<Arc<InflightRegion>>,
    inflight_path: Option<PathBuf>,
}

/// Where the inflight record of device `name` is kept: a file in the
/// temporary directory (`TMPDIR`, else `/tmp`), which a daemon restarted
/// with the same name finds again.
pub fn inflight_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ioasis-vduse-{name}.inflight"))
}

/// Opens (`keep`: as it is) or creates afresh (zeroed) the inflight record
/// of `device` at `path`.
fn open_inflight(
    path: &std::path::Path,
    device: &dyn Device,
    keep: bool,
) -> Result<Arc<InflightRegion>> {
    let num_queues = u16::try_from(device.num_queues())
        .map_err(|_| Error::BadDevice("too many queues for an inflight record"))?;
    let queue_size = device.max_queue_size();
    let len = usize::from(num_queues) * queue_region_size(queue_size);
    let sys = |op, source| Error::Sys { op, source };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(!keep)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| sys("open the inflight record", e))?;
    let have = f
        .metadata()
        .map_err(|e| sys("stat the inflight record", e))?
        .len();
    if have != len as u64 {
        // Another shape (or a new file): start clean.
        f.set_len(0)
            .map_err(|e| sys("truncate the inflight record", e))?;
        f.set_len(len as u64)
            .map_err(|e| sys("size the inflight record", e))?;
    }
    let mem = Memory::from_memfd(f.into(), 0, len).map_err(|source| Error::Map {
        iova: 0,
        len: len as u64,
        source,
    })?;
    Ok(Arc::new(InflightRegion {
        mem,
        num_queues,
        queue_size,
    }))
}

/// The path of device `name`'s char device.
pub fn dev_path(name: &str) -> PathBuf {
    PathBuf::from("/dev/vduse").join(name)
}

fn open_control() -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(CONTROL_PATH)
        .map_err(|source| Error::Sys {
            op: "open /dev/vduse/control (module vduse)",
            source,
        })
}

impl KernelDevice {
    /// Creates device `name` for `device` (or takes over the existing one
    /// of that name), opens it and sets up every queue.
    pub fn create(name: &str, device: &dyn Device) -> Result<KernelDevice> {
        let name_bytes = sys::name_bytes(name).map_err(|source| Error::Sys {
            op: "device name",
            source,
        })?;
        let config_size = device.config_size();
        if config_size as usize > 4096 {
            return Err(Error::BadDevice("config space larger than a page"));
        }
        let n = device.num_queues();
        let num_queues = u32::try_from(n)
            .ok()
            .filter(|q| (1..=0xffff).contains(q))
            .ok_or(Error::BadDevice("num_queues must be in 1..=65535"))?;
        let mut buf = DevConfigBuf {
            head: DevConfig {
                name: name_bytes,
                vendor_id: 0,
                device_id: device.device_type(),
                features: offered_features(device),
                vq_num: num_queues,
                vq_align: VQ_ALIGN,
                reserved: [0; 13],
                config_size,
            },
            config: [0; 4096],
        };
        if config_size > 0 {
            device
                .read_config(0, &mut buf.config[..config_size as usize])
                .map_err(Error::Device)?;
        }
        let control = open_control()?;
        sys::set_api_version(&control, sys::VDUSE_API_VERSION).map_err(|source| Error::Sys {
            op: "VDUSE_SET_API_VERSION",
            source,
        })?;
        let existed = match sys::create_dev(&control, &buf) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                info!("VDUSE device {name:?} exists: taking it over");
                true
            }
            Err(source) => {
                return Err(Error::Create {
                    name: name.to_string(),
                    source,
                })
            }
        };
        let path = dev_path(name);
        let fd = match open_device(&path) {
            Ok(f) => f,
            Err(e) => {
                if !existed {
                    let _ = sys::destroy_dev(&control, &name_bytes);
                }
                return Err(e);
            }
        };
        let (inflight, inflight_path) = if device.inflight_tracking() {
            let path = inflight_path(name);
            (Some(open_inflight(&path, device, existed)?), Some(path))
        } else {
            (None, None)
        };
        let dev = KernelDevice {
            name: name.to_string(),
            name_bytes,
            fd,
            existed,
            inflight,
            inflight_path,
        };
        let max = device.max_queue_size();
        for i in 0..num_queues {
            sys::vq_setup(&dev.fd, i, max).map_err(|source| Error::Sys {
                op: "VDUSE_VQ_SETUP",
                source,
            })?;
        }
        Ok(dev)
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the device and destroys it in the kernel. A device still on
    /// the vDPA bus cannot be destroyed (`EBUSY`): it is left for `vdpa dev
    /// del NAME`, or for a daemon started again with the same name, which
    /// takes it over.
    pub fn destroy(self) {
        let KernelDevice {
            name,
            name_bytes,
            fd,
            inflight_path,
            ..
        } = self;
        drop(fd);
        let control = match open_control() {
            Ok(c) => c,
            Err(e) => {
                warn!("VDUSE device {name:?} not destroyed: {e}");
                return;
            }
        };
        match sys::destroy_dev(&control, &name_bytes) {
            Ok(()) => {
                info!("VDUSE device {name:?} destroyed");
                if let Some(p) = inflight_path {
                    let _ = std::fs::remove_file(p);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => warn!(
                "VDUSE device {name:?} is still on the vDPA bus and stays (`vdpa dev del {name}` removes it; a daemon started with --vduse {name} takes it over)"
            ),
            Err(e) => warn!("VDUSE device {name:?}: VDUSE_DESTROY_DEV: {e}"),
        }
    }
}

fn open_device(path: &std::path::Path) -> Result<File> {
    // The char device appears through devtmpfs/udev shortly after
    // VDUSE_CREATE_DEV; wait for it (bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => return Ok(f),
            Err(e)
                if e.kind() == io::ErrorKind::NotFound && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(source) => {
                return Err(Error::Sys {
                    op: "open /dev/vduse/NAME",
                    source,
                })
            }
        }
    }
}
