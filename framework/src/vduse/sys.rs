//! The VDUSE uAPI (Linux `include/uapi/linux/vduse.h`, API version 0, as
//! Linux 6.12 has it): ioctl numbers and the structures they carry, defined
//! here in Rust, and thin wrappers that turn each ioctl into a `Result`.
//!
//! Every structure is `#[repr(C)]` with the kernel's field order, sizes and
//! padding (checked by the tests below against the sizes the ioctl numbers
//! encode). Reserved fields are zeroed: the kernel refuses a request whose
//! reserved words are not.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// The ioctl type of every VDUSE ioctl (`VDUSE_BASE`).
const VDUSE_BASE: u32 = 0x81;

/// The API version this transport speaks (`VDUSE_API_VERSION`).
pub const VDUSE_API_VERSION: u64 = 0;

/// Longest device name, NUL included (`VDUSE_NAME_MAX`).
pub const VDUSE_NAME_MAX: usize = 256;

/// `VDUSE_ACCESS_RO`: the device may read the range.
pub const VDUSE_ACCESS_RO: u8 = 0x1;
/// `VDUSE_ACCESS_WO`: the device may write the range.
pub const VDUSE_ACCESS_WO: u8 = 0x2;
/// `VDUSE_ACCESS_RW`.
pub const VDUSE_ACCESS_RW: u8 = 0x3;

/// `struct vduse_dev_config` without its trailing config space (which
/// follows it in the same buffer, see [`DevConfigBuf`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DevConfig {
    /// NUL-terminated device name.
    pub name: [u8; VDUSE_NAME_MAX],
    /// Virtio vendor id.
    pub vendor_id: u32,
    /// Virtio device id (`VIRTIO_ID_*`).
    pub device_id: u32,
    /// Device features offered to the driver.
    pub features: u64,
    /// Number of virtqueues.
    pub vq_num: u32,
    /// Alignment of a virtqueue's metadata (at most the page size, not 0).
    pub vq_align: u32,
    /// Zero.
    pub reserved: [u32; 13],
    /// Bytes of config space following the structure.
    pub config_size: u32,
}

/// A `struct vduse_dev_config` with its config space, as VDUSE_CREATE_DEV
/// reads it: the fixed part, then `config_size` bytes.
#[repr(C)]
#[derive(Debug)]
pub struct DevConfigBuf {
    /// The fixed part.
    pub head: DevConfig,
    /// The config space (the kernel reads `head.config_size` bytes of it;
    /// at most a page).
    pub config: [u8; 4096],
}

/// `struct vduse_iotlb_entry`: one IOVA region and where to map it from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbEntry {
    /// Offset of the region in the returned fd.
    pub offset: u64,
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
    /// `VDUSE_ACCESS_*`.
    pub perm: u8,
}

/// `struct vduse_vq_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VqConfig {
    /// Queue index.
    pub index: u32,
    /// Largest queue size.
    pub max_size: u16,
    /// Zero.
    pub reserved: [u16; 13],
}

/// `struct vduse_vq_info`, split rings' state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VqInfo {
    /// Queue index (in).
    pub index: u32,
    /// Queue size the driver chose.
    pub num: u32,
    /// IOVA of the descriptor table.
    pub desc_addr: u64,
    /// IOVA of the driver area (avail ring).
    pub driver_addr: u64,
    /// IOVA of the device area (used ring).
    pub device_addr: u64,
    /// Split ring: the avail index to start from (first u16); the packed
    /// state's other words are not used.
    pub state: [u16; 4],
    /// The driver made the queue ready.
    pub ready: u8,
}

/// `struct vduse_vq_eventfd`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VqEventfd {
    /// Queue index.
    pub index: u32,
    /// The eventfd, or `VDUSE_EVENTFD_DEASSIGN` (-1).
    pub fd: i32,
}

/// `struct vduse_config_data` without its trailing bytes (which follow it
/// in the same buffer, see [`ConfigDataBuf`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConfigData {
    /// Offset into the config space.
    pub offset: u32,
    /// Bytes that follow.
    pub length: u32,
}

/// A `struct vduse_config_data` with its bytes, as VDUSE_DEV_SET_CONFIG
/// reads it.
#[repr(C)]
#[derive(Debug)]
pub struct ConfigDataBuf {
    /// The fixed part.
    pub head: ConfigData,
    /// The bytes (the kernel reads `head.length` of them).
    pub buffer: [u8; 4096],
}

/// `VDUSE_EVENTFD_DEASSIGN`.
pub const VDUSE_EVENTFD_DEASSIGN: i32 = -1;

ioctl_iow_nr!(VDUSE_SET_API_VERSION, VDUSE_BASE, 0x01, u64);
ioctl_iow_nr!(VDUSE_CREATE_DEV, VDUSE_BASE, 0x02, DevConfig);
ioctl_iow_nr!(VDUSE_DESTROY_DEV, VDUSE_BASE, 0x03, [u8; VDUSE_NAME_MAX]);
ioctl_iowr_nr!(VDUSE_IOTLB_GET_FD, VDUSE_BASE, 0x10, IotlbEntry);
ioctl_ior_nr!(VDUSE_DEV_GET_FEATURES, VDUSE_BASE, 0x11, u64);
ioctl_iow_nr!(VDUSE_DEV_SET_CONFIG, VDUSE_BASE, 0x12, ConfigData);
ioctl_io_nr!(VDUSE_DEV_INJECT_CONFIG_IRQ, VDUSE_BASE, 0x13);
ioctl_iow_nr!(VDUSE_VQ_SETUP, VDUSE_BASE, 0x14, VqConfig);
ioctl_iowr_nr!(VDUSE_VQ_GET_INFO, VDUSE_BASE, 0x15, VqInfo);
ioctl_iow_nr!(VDUSE_VQ_SETUP_KICKFD, VDUSE_BASE, 0x16, VqEventfd);
ioctl_iow_nr!(VDUSE_VQ_INJECT_IRQ, VDUSE_BASE, 0x17, u32);

fn check(ret: i32) -> io::Result<i32> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The NUL-terminated form of `name` (at most [`VDUSE_NAME_MAX`] - 1
/// bytes, no NUL, no `/`).
pub fn name_bytes(name: &str) -> io::Result<[u8; VDUSE_NAME_MAX]> {
    if name.is_empty() || name.len() >= VDUSE_NAME_MAX || name.bytes().any(|b| b == 0 || b == b'/')
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("VDUSE device name {name:?}: 1 to 255 bytes, no NUL, no '/'"),
        ));
    }
    let mut out = [0u8; VDUSE_NAME_MAX];
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

/// VDUSE_SET_API_VERSION on the control fd.
pub fn set_api_version(control: &impl AsRawFd, version: u64) -> io::Result<()> {
    // SAFETY: the ioctl reads one u64 from `version`, which outlives the call.
    check(unsafe { ioctl_with_ref(control, VDUSE_SET_API_VERSION(), &version) }).map(|_| ())
}

/// VDUSE_CREATE_DEV on the control fd.
pub fn create_dev(control: &impl AsRawFd, config: &DevConfigBuf) -> io::Result<()> {
    // SAFETY: the kernel reads the fixed part and then `config_size` bytes
    // after it; `DevConfigBuf` holds both (config_size is checked against
    // its 4096 bytes by the caller) and lives through the call.
    check(unsafe { ioctl_with_ref(control, VDUSE_CREATE_DEV(), config) }).map(|_| ())
}

/// VDUSE_DESTROY_DEV on the control fd.
pub fn destroy_dev(control: &impl AsRawFd, name: &[u8; VDUSE_NAME_MAX]) -> io::Result<()> {
    // SAFETY: the kernel reads VDUSE_NAME_MAX bytes from `name`.
    check(unsafe { ioctl_with_ref(control, VDUSE_DESTROY_DEV(), name) }).map(|_| ())
}

/// VDUSE_IOTLB_GET_FD: the first region overlapping `start..=last`, and an
/// fd to map it from. `Ok(None)` when no region overlaps (`EINVAL`).
pub fn iotlb_get_fd(
    dev: &impl AsRawFd,
    start: u64,
    last: u64,
) -> io::Result<Option<(IotlbEntry, OwnedFd)>> {
    let mut e = IotlbEntry {
        start,
        last,
        ..IotlbEntry::default()
    };
    // SAFETY: the kernel reads and writes one `IotlbEntry`, owned here.
    let r = unsafe { ioctl_with_mut_ref(dev, VDUSE_IOTLB_GET_FD(), &mut e) };
    match check(r) {
        // SAFETY: on success the ioctl returns a new fd that nothing else
        // owns; the OwnedFd closes it exactly once.
        Ok(fd) => Ok(Some((e, unsafe { OwnedFd::from_raw_fd(fd) }))),
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(err) => Err(err),
    }
}

/// VDUSE_DEV_GET_FEATURES: the features the driver acknowledged.
pub fn get_features(dev: &impl AsRawFd) -> io::Result<u64> {
    let mut f = 0u64;
    // SAFETY: the kernel writes one u64 into `f`.
    check(unsafe { ioctl_with_mut_ref(dev, VDUSE_DEV_GET_FEATURES(), &mut f) })?;
    Ok(f)
}

/// VDUSE_VQ_SETUP.
pub fn vq_setup(dev: &impl AsRawFd, index: u32, max_size: u16) -> io::Result<()> {
    let c = VqConfig {
        index,
        max_size,
        reserved: [0; 13],
    };
    // SAFETY: the kernel reads one `VqConfig`.
    check(unsafe { ioctl_with_ref(dev, VDUSE_VQ_SETUP(), &c) }).map(|_| ())
}

/// VDUSE_VQ_GET_INFO.
pub fn vq_info(dev: &impl AsRawFd, index: u32) -> io::Result<VqInfo> {
    let mut i = VqInfo {
        index,
        ..VqInfo::default()
    };
    // SAFETY: the kernel reads and writes one `VqInfo`, owned here.
    check(unsafe { ioctl_with_mut_ref(dev, VDUSE_VQ_GET_INFO(), &mut i) })?;
    Ok(i)
}

/// VDUSE_VQ_SETUP_KICKFD (`fd` -1: de-assign).
pub fn vq_kickfd(dev: &impl AsRawFd, index: u32, fd: i32) -> io::Result<()> {
    let e = VqEventfd { index, fd };
    // SAFETY: the kernel reads one `VqEventfd` (and takes its own
    // reference on the eventfd).
    check(unsafe { ioctl_with_ref(dev, VDUSE_VQ_SETUP_KICKFD(), &e) }).map(|_| ())
}

/// VDUSE_VQ_INJECT_IRQ: interrupts the driver for queue `index`.
pub fn inject_irq(dev: &impl AsRawFd, index: u32) -> io::Result<()> {
    // SAFETY: the kernel reads one u32.
    check(unsafe { ioctl_with_ref(dev, VDUSE_VQ_INJECT_IRQ(), &index) }).map(|_| ())
}

/// VDUSE_DEV_SET_CONFIG: replaces the kernel's copy of the config space
/// from `offset` with `data` (1 to 4096 bytes within the device's space;
/// the kernel refuses anything else with `EINVAL`). The kernel serves the
/// driver's config reads from this copy.
pub fn set_config(dev: &impl AsRawFd, offset: u32, data: &[u8]) -> io::Result<()> {
    let mut buf = ConfigDataBuf {
        head: ConfigData { offset, length: 0 },
        buffer: [0; 4096],
    };
    let Some(dst) = buf.buffer.get_mut(..data.len()) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    dst.copy_from_slice(data);
    buf.head.length =
        u32::try_from(data.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the kernel reads the fixed part and then `length` bytes after
    // it, all inside `buf` (length is at most its 4096 bytes), which lives
    // through the call.
    check(unsafe { ioctl_with_ref(dev, VDUSE_DEV_SET_CONFIG(), &buf) }).map(|_| ())
}

/// VDUSE_DEV_INJECT_CONFIG_IRQ: a config interrupt to the driver
/// (`EINVAL` while the driver has not set `DRIVER_OK`).
pub fn inject_config_irq(dev: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: the ioctl takes no argument and touches no memory of ours.
    check(unsafe { ioctl(dev, VDUSE_DEV_INJECT_CONFIG_IRQ()) }).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes the kernel's structures have (and its ioctl numbers
    /// encode).
    #[test]
    fn test_layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<DevConfig>(), 336);
        assert_eq!(std::mem::size_of::<IotlbEntry>(), 32);
        assert_eq!(std::mem::size_of::<VqConfig>(), 32);
        assert_eq!(std::mem::size_of::<VqInfo>(), 48);
        assert_eq!(std::mem::size_of::<VqEventfd>(), 8);
        // _IOW(0x81, 0x02, 336 bytes) and _IOWR(0x81, 0x15, 48 bytes).
        assert_eq!(VDUSE_CREATE_DEV(), 0x4150_8102);
        assert_eq!(VDUSE_VQ_GET_INFO(), 0xc030_8115);
        assert_eq!(VDUSE_VQ_INJECT_IRQ(), 0x4004_8117);
        // _IOW(0x81, 0x12, 8 bytes) and _IO(0x81, 0x13).
        assert_eq!(std::mem::size_of::<ConfigData>(), 8);
        assert_eq!(VDUSE_DEV_SET_CONFIG(), 0x4008_8112);
        assert_eq!(VDUSE_DEV_INJECT_CONFIG_IRQ(), 0x8113);
    }

    #[test]
    fn test_name_bytes() {
        assert!(name_bytes("blk0").is_ok());
        assert!(name_bytes("").is_err());
        assert!(name_bytes("a/b").is_err());
        assert!(name_bytes(&"x".repeat(256)).is_err());
    }
}
