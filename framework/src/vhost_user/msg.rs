//! vhost-user message framing and validation.
//!
//! Every frontend message is read here (header, payload, SCM_RIGHTS fds) and
//! decoded into a [`Request`] whose every field has been checked against the
//! protocol and the device's limits ([`Limits`]): sizes, indices, fd counts,
//! overlapping regions, address arithmetic. Nothing downstream re-parses
//! peer bytes. Decoding ([`decode`]) is a pure function over bytes and fds, so
//! it can be fuzzed.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::MsgFlags;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserInflight, VhostUserLog, VhostUserMemory,
    VhostUserMemoryRegion, VhostUserSingleMemoryRegion, VhostUserVringAddr,
    VhostUserVringAddrFlags, VhostUserVringState, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
    VHOST_USER_CONFIG_SIZE,
};
use vm_memory::ByteValued;

/// Size of the vhost-user message header.
pub const HDR_SIZE: usize = 12;
/// Header flag: protocol version 1.
pub const VERSION_1: u32 = 0x1;
/// Header flag bits holding the version.
pub const VERSION_MASK: u32 = 0x3;
/// Header flag: this message is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Header flag: the sender wants a reply (REPLY_ACK).
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// Largest number of regions in one SET_MEM_TABLE.
pub const MAX_MEM_TABLE_REGIONS: usize = MAX_ATTACHED_FD_ENTRIES;
/// Vring index bits of a SET_VRING_KICK/CALL/ERR payload.
pub const VRING_IDX_MASK: u64 = 0xff;
/// "No fd" bit of a SET_VRING_KICK/CALL/ERR payload.
pub const VRING_NOFD_MASK: u64 = 0x100;
/// Size of `struct vhost_iotlb_msg` on the wire.
pub const IOTLB_MSG_SIZE: usize = 32;

/// IOTLB message type: miss (backend to frontend).
pub const VHOST_IOTLB_MISS: u8 = 1;
/// IOTLB message type: update (frontend to backend).
pub const VHOST_IOTLB_UPDATE: u8 = 2;
/// IOTLB message type: invalidate (frontend to backend).
pub const VHOST_IOTLB_INVALIDATE: u8 = 3;
/// IOTLB message type: access failure (backend to frontend).
pub const VHOST_IOTLB_ACCESS_FAIL: u8 = 4;
/// IOTLB message type: start of a batch of updates.
pub const VHOST_IOTLB_BATCH_BEGIN: u8 = 5;
/// IOTLB message type: end of a batch of updates.
pub const VHOST_IOTLB_BATCH_END: u8 = 6;
/// IOTLB permission: read only (device reads).
pub const VHOST_ACCESS_RO: u8 = 1;
/// IOTLB permission: write only.
pub const VHOST_ACCESS_WO: u8 = 2;
/// IOTLB permission: read and write.
pub const VHOST_ACCESS_RW: u8 = 3;

/// Decoding and framing errors. Each one ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    /// The peer closed the connection.
    #[error("Connection closed by the frontend")]
    Disconnected,
    /// A socket operation failed.
    #[error("Socket {op} failed: {errno}")]
    Socket {
        /// The operation.
        op: &'static str,
        /// The error.
        errno: nix::errno::Errno,
    },
    /// The message ended early.
    #[error("Short message: {got} of {want} bytes")]
    Short {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// Bad header: unknown code, version, flags or size.
    #[error("Invalid header: request {request}, flags {flags:#x}, size {size}")]
    Header {
        /// Request code.
        request: u32,
        /// Flags.
        flags: u32,
        /// Payload size.
        size: u32,
    },
    /// The payload size does not match the request.
    #[error("{req:?}: payload of {got} bytes, expected {want}")]
    PayloadSize {
        /// The request.
        req: FrontendReq,
        /// Payload bytes received.
        got: usize,
        /// Payload bytes expected.
        want: usize,
    },
    /// The number of fds does not match the request.
    #[error("{req:?}: {got} file descriptors, expected {want}")]
    FdCount {
        /// The request.
        req: FrontendReq,
        /// Fds received.
        got: usize,
        /// Fds expected.
        want: usize,
    },
    /// A vring index is out of range.
    #[error("{req:?}: vring index {index} out of range (device has {max})")]
    VringIndex {
        /// The request.
        req: FrontendReq,
        /// Index given.
        index: u64,
        /// Number of queues of the device.
        max: usize,
    },
    /// A field has a value the protocol or the device does not allow.
    #[error("{req:?}: invalid {field} {value:#x}")]
    Field {
        /// The request.
        req: FrontendReq,
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A memory region is empty or its address arithmetic overflows.
    #[error(
        "Memory region gpa {gpa:#x} size {size:#x} uaddr {uaddr:#x} offset {offset:#x} is invalid"
    )]
    Region {
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// Frontend virtual address.
        uaddr: u64,
        /// Offset into the fd.
        offset: u64,
    },
    /// Two memory regions overlap.
    #[error("Memory regions at gpa {a:#x} and {b:#x} overlap")]
    Overlap {
        /// First region's guest physical address.
        a: u64,
        /// Second region's guest physical address.
        b: u64,
    },
    /// Too many memory regions.
    #[error("{got} memory regions, at most {max} allowed")]
    TooManyRegions {
        /// Regions given.
        got: usize,
        /// Limit.
        max: usize,
    },
    /// An IOTLB message is invalid.
    #[error("Invalid IOTLB message: type {typ}, iova {iova:#x}, size {size:#x}, perm {perm}")]
    Iotlb {
        /// Message type.
        typ: u8,
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
        /// Permission.
        perm: u8,
    },
}

/// Result of message operations.
pub type Result<T> = std::result::Result<T, MsgError>;

/// A message header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Flags (version, reply, need-reply).
    pub flags: u32,
    /// Payload size in bytes.
    pub size: u32,
}

impl Header {
    /// Parses 12 header bytes (native endian, as the protocol says).
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    /// Serialises the header.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut out = [0u8; HDR_SIZE];
        out[0..4].copy_from_slice(&self.request.to_ne_bytes());
        out[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        out[8..12].copy_from_slice(&self.size.to_ne_bytes());
        out
    }

    /// True if the sender asked for a REPLY_ACK.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// Checks version, flags and size; returns the request code.
    pub fn validate(&self) -> Result<FrontendReq> {
        let bad = || MsgError::Header {
            request: self.request,
            flags: self.flags,
            size: self.size,
        };
        let req = FrontendReq::try_from(self.request).map_err(|_| bad())?;
        if self.flags & VERSION_MASK != VERSION_1
            || self.flags & FLAG_REPLY != 0
            || self.flags & !(VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY) != 0
            || self.size as usize > MAX_MSG_SIZE
        {
            return Err(bad());
        }
        Ok(req)
    }
}

/// One memory region as the frontend describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionDesc {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes (non-zero).
    pub size: u64,
    /// Address of the region in the frontend's address space.
    pub uaddr: u64,
    /// Offset of the region in the fd.
    pub offset: u64,
}

impl RegionDesc {
    fn from_wire(r: &VhostUserMemoryRegion) -> Result<Self> {
        let d = RegionDesc {
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            uaddr: r.user_addr,
            offset: r.mmap_offset,
        };
        let ok = d.size != 0
            && d.gpa.checked_add(d.size - 1).is_some()
            && d.uaddr.checked_add(d.size - 1).is_some()
            && d.offset.checked_add(d.size).is_some()
            && i64::try_from(d.offset.saturating_add(d.size)).is_ok();
        if !ok {
            return Err(MsgError::Region {
                gpa: d.gpa,
                size: d.size,
                uaddr: d.uaddr,
                offset: d.offset,
            });
        }
        Ok(d)
    }

    /// Last guest physical address of the region (no overflow: checked at decode).
    pub fn gpa_last(&self) -> u64 {
        self.gpa + (self.size - 1)
    }

    /// Last frontend virtual address of the region.
    pub fn uaddr_last(&self) -> u64 {
        self.uaddr + (self.size - 1)
    }

    /// True if the two regions overlap in guest physical or frontend virtual space.
    pub fn overlaps(&self, o: &RegionDesc) -> bool {
        (self.gpa <= o.gpa_last() && o.gpa <= self.gpa_last())
            || (self.uaddr <= o.uaddr_last() && o.uaddr <= self.uaddr_last())
    }
}

/// An IOTLB message from the frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbRequest {
    /// Map `iova..=iova+size-1` to the frontend virtual address `uaddr`.
    Update {
        /// IOVA.
        iova: u64,
        /// Size (non-zero, no overflow).
        size: u64,
        /// Frontend virtual address.
        uaddr: u64,
        /// `VHOST_ACCESS_*`.
        perm: u8,
    },
    /// Drop translations for `iova..=last` (clamped at the top of the space).
    Invalidate {
        /// First IOVA.
        iova: u64,
        /// Last IOVA (inclusive).
        last: u64,
    },
    /// Start of a batch.
    BatchBegin,
    /// End of a batch.
    BatchEnd,
}

/// Wire layout of `struct vhost_iotlb_msg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbMsg {
    /// IOVA.
    pub iova: u64,
    /// Size.
    pub size: u64,
    /// Frontend virtual address.
    pub uaddr: u64,
    /// `VHOST_ACCESS_*`.
    pub perm: u8,
    /// `VHOST_IOTLB_*`.
    pub typ: u8,
    /// Padding.
    pub pad: [u8; 6],
}

// SAFETY: IotlbMsg is repr(C), made of integers only, with explicit padding,
// so every byte pattern is a valid value.
unsafe impl ByteValued for IotlbMsg {}

/// The device-dependent limits messages are checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Number of queues of the device.
    pub num_queues: usize,
    /// Largest queue size.
    pub max_queue_size: u16,
    /// Memory slots (GET_MAX_MEM_SLOTS).
    pub max_mem_slots: usize,
}

/// Which fd-carrying vring message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VringFdKind {
    /// SET_VRING_KICK.
    Kick,
    /// SET_VRING_CALL.
    Call,
    /// SET_VRING_ERR.
    Err,
}

/// Largest dirty log SET_LOG_BASE may give (1 GiB of bitmap: 32 TiB of
/// guest memory in 4 KiB pages).
pub const MAX_LOG_SIZE: u64 = 1 << 30;

/// `VHOST_VRING_F_LOG` in SET_VRING_ADDR's flags.
const VHOST_VRING_F_LOG: u32 = VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits();

/// A decoded, validated frontend request.
#[derive(Debug)]
pub enum Request {
    /// GET_FEATURES.
    GetFeatures,
    /// SET_FEATURES.
    SetFeatures(u64),
    /// SET_OWNER.
    SetOwner,
    /// RESET_OWNER.
    ResetOwner,
    /// SET_MEM_TABLE: regions (non-overlapping) with their fds.
    SetMemTable(Vec<(RegionDesc, File)>),
    /// SET_LOG_BASE: the dirty log, `size` bytes at `offset` of `fd`
    /// (`size` in `1..=MAX_LOG_SIZE`).
    SetLogBase {
        /// Bytes of bitmap.
        size: u64,
        /// Offset in the fd.
        offset: u64,
        /// The shared memory.
        fd: File,
    },
    /// SET_LOG_FD: the eventfd to signal log updates on, or none.
    SetLogFd(Option<File>),
    /// SET_VRING_NUM.
    SetVringNum {
        /// Queue.
        index: u16,
        /// Size (power of two within the device's maximum).
        num: u16,
    },
    /// SET_VRING_ADDR.
    SetVringAddr {
        /// Queue.
        index: u16,
        /// Descriptor table address (aligned to 16).
        desc: u64,
        /// Used ring address (aligned to 4).
        used: u64,
        /// Available ring address (aligned to 2).
        avail: u64,
        /// `VHOST_VRING_F_LOG`: the frontend logs this ring's used ring at
        /// this guest physical address (the device logs what it writes by
        /// the guest page behind its own translation, the same page).
        log: Option<u64>,
    },
    /// SET_VRING_BASE.
    SetVringBase {
        /// Queue.
        index: u16,
        /// The ring's state: for a split ring the next available index
        /// (at most 16 bits, checked when applied); for a packed ring the
        /// next available slot and wrap counter (bits 0-15) and the next
        /// used ones (bits 16-31).
        base: u32,
    },
    /// GET_VRING_BASE.
    GetVringBase {
        /// Queue.
        index: u16,
    },
    /// SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR.
    SetVringFd {
        /// Which one.
        kind: VringFdKind,
        /// Queue.
        index: u16,
        /// The eventfd, or none (polling / no signalling).
        fd: Option<File>,
    },
    /// GET_PROTOCOL_FEATURES.
    GetProtocolFeatures,
    /// SET_PROTOCOL_FEATURES.
    SetProtocolFeatures(u64),
    /// GET_QUEUE_NUM.
    GetQueueNum,
    /// SET_VRING_ENABLE.
    SetVringEnable {
        /// Queue.
        index: u16,
        /// Enable or disable.
        enable: bool,
    },
    /// SET_BACKEND_REQ_FD.
    SetBackendReqFd(OwnedFd),
    /// IOTLB_MSG.
    Iotlb(IotlbRequest),
    /// GET_CONFIG.
    GetConfig {
        /// Offset into the config space.
        offset: u32,
        /// Bytes.
        size: u32,
        /// Flags.
        flags: u32,
    },
    /// SET_CONFIG.
    SetConfig {
        /// Offset into the config space.
        offset: u32,
        /// Flags.
        flags: u32,
        /// Bytes to write.
        data: Vec<u8>,
    },
    /// RESET_DEVICE.
    ResetDevice,
    /// GET_MAX_MEM_SLOTS.
    GetMaxMemSlots,
    /// ADD_MEM_REG.
    AddMemReg(RegionDesc, File),
    /// REM_MEM_REG.
    RemMemReg(RegionDesc),
    /// SET_STATUS.
    SetStatus(u8),
    /// GET_STATUS.
    GetStatus,
    /// GET_INFLIGHT_FD: a region for `num_queues` queues of `queue_size`.
    GetInflightFd {
        /// Queues.
        num_queues: u16,
        /// Entries per queue (a power of two).
        queue_size: u16,
    },
    /// SET_INFLIGHT_FD: the region, `mmap_size` bytes at `mmap_offset` of
    /// `fd`.
    SetInflightFd {
        /// Bytes.
        mmap_size: u64,
        /// Offset in the file.
        mmap_offset: u64,
        /// Queues.
        num_queues: u16,
        /// Entries per queue (a power of two).
        queue_size: u16,
        /// The region's file.
        fd: File,
    },
    /// A well-formed request the backend does not implement.
    Unsupported(FrontendReq),
}

/// Bytes of the GET/SET_INFLIGHT_FD payload (QEMU's `sizeof`, with its
/// trailing padding).
pub const INFLIGHT_MSG_SIZE: usize = std::mem::size_of::<VhostUserInflight>();

fn inflight_geometry(
    req: FrontendReq,
    m: &VhostUserInflight,
    limits: &Limits,
) -> Result<(u16, u16)> {
    let (n, qs) = (m.num_queues, m.queue_size);
    if n == 0 || u64::from(n) > limits.num_queues as u64 {
        return Err(MsgError::Field {
            req,
            field: "inflight num_queues",
            value: u64::from(n),
        });
    }
    if !qs.is_power_of_two() || qs > crate::queue::MAX_QUEUE_SIZE {
        return Err(MsgError::Field {
            req,
            field: "inflight queue_size",
            value: u64::from(qs),
        });
    }
    Ok((n, qs))
}

fn read_pod<T: ByteValued + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    let n = v.as_mut_slice().len().min(b.len());
    v.as_mut_slice()[..n].copy_from_slice(&b[..n]);
    v
}

fn expect_size(req: FrontendReq, payload: &[u8], want: usize) -> Result<()> {
    if payload.len() != want {
        return Err(MsgError::PayloadSize {
            req,
            got: payload.len(),
            want,
        });
    }
    Ok(())
}

fn expect_fds(req: FrontendReq, fds: &[File], want: usize) -> Result<()> {
    if fds.len() != want {
        return Err(MsgError::FdCount {
            req,
            got: fds.len(),
            want,
        });
    }
    Ok(())
}

fn vring_index(req: FrontendReq, index: u64, limits: &Limits) -> Result<u16> {
    if index >= limits.num_queues as u64 {
        return Err(MsgError::VringIndex {
            req,
            index,
            max: limits.num_queues,
        });
    }
    u16::try_from(index).map_err(|_| MsgError::VringIndex {
        req,
        index,
        max: limits.num_queues,
    })
}

fn u64_payload(req: FrontendReq, payload: &[u8]) -> Result<u64> {
    expect_size(req, payload, 8)?;
    let mut b = [0u8; 8];
    b.copy_from_slice(payload);
    Ok(u64::from_ne_bytes(b))
}

fn vring_state(req: FrontendReq, payload: &[u8], limits: &Limits) -> Result<(u16, u32)> {
    expect_size(req, payload, std::mem::size_of::<VhostUserVringState>())?;
    let s: VhostUserVringState = read_pod(payload);
    let index = vring_index(req, u64::from(s.index), limits)?;
    Ok((index, s.num))
}

/// Decodes and validates one request. `fds` are the descriptors that came
/// with the header; they are consumed (closed if the request does not keep
/// them).
pub fn decode(hdr: &Header, payload: &[u8], fds: Vec<File>, limits: &Limits) -> Result<Request> {
    let req = hdr.validate()?;
    if payload.len() != hdr.size as usize {
        return Err(MsgError::Short {
            got: payload.len(),
            want: hdr.size as usize,
        });
    }
    use FrontendReq as F;
    let no_payload = |r: Request| -> Result<Request> {
        expect_size(req, payload, 0)?;
        expect_fds(req, &fds, 0)?;
        Ok(r)
    };
    match req {
        F::GET_FEATURES => no_payload(Request::GetFeatures),
        F::SET_OWNER => no_payload(Request::SetOwner),
        F::RESET_OWNER => no_payload(Request::ResetOwner),
        F::GET_PROTOCOL_FEATURES => no_payload(Request::GetProtocolFeatures),
        F::GET_QUEUE_NUM => no_payload(Request::GetQueueNum),
        F::RESET_DEVICE => no_payload(Request::ResetDevice),
        F::GET_MAX_MEM_SLOTS => no_payload(Request::GetMaxMemSlots),
        F::GET_INFLIGHT_FD | F::SET_INFLIGHT_FD => {
            expect_size(req, payload, INFLIGHT_MSG_SIZE)?;
            let m: VhostUserInflight = read_pod(payload);
            let (num_queues, queue_size) = inflight_geometry(req, &m, limits)?;
            if req == F::GET_INFLIGHT_FD {
                expect_fds(req, &fds, 0)?;
                return Ok(Request::GetInflightFd {
                    num_queues,
                    queue_size,
                });
            }
            expect_fds(req, &fds, 1)?;
            let fd = fds.into_iter().next().ok_or(MsgError::FdCount {
                req,
                got: 0,
                want: 1,
            })?;
            let need = u64::from(num_queues) * crate::queue::queue_region_size(queue_size) as u64;
            if m.mmap_size < need || m.mmap_size > need.saturating_mul(2) {
                return Err(MsgError::Field {
                    req,
                    field: "inflight mmap_size",
                    value: m.mmap_size,
                });
            }
            Ok(Request::SetInflightFd {
                mmap_size: m.mmap_size,
                mmap_offset: m.mmap_offset,
                num_queues,
                queue_size,
                fd,
            })
        }
        F::GET_STATUS => no_payload(Request::GetStatus),
        F::SET_FEATURES => {
            expect_fds(req, &fds, 0)?;
            Ok(Request::SetFeatures(u64_payload(req, payload)?))
        }
        F::SET_PROTOCOL_FEATURES => {
            expect_fds(req, &fds, 0)?;
            Ok(Request::SetProtocolFeatures(u64_payload(req, payload)?))
        }
        F::SET_STATUS => {
            expect_fds(req, &fds, 0)?;
            let v = u64_payload(req, payload)?;
            let status = u8::try_from(v).map_err(|_| MsgError::Field {
                req,
                field: "status",
                value: v,
            })?;
            Ok(Request::SetStatus(status))
        }
        F::SET_MEM_TABLE => decode_mem_table(req, payload, fds, limits),
        F::SET_LOG_BASE => {
            expect_size(req, payload, std::mem::size_of::<VhostUserLog>())?;
            expect_fds(req, &fds, 1)?;
            let m: VhostUserLog = read_pod(payload);
            let (size, offset) = (m.mmap_size, m.mmap_offset);
            if size == 0 || size > MAX_LOG_SIZE {
                return Err(MsgError::Field {
                    req,
                    field: "log mmap_size",
                    value: size,
                });
            }
            let fd = fds.into_iter().next().ok_or(MsgError::FdCount {
                req,
                got: 0,
                want: 1,
            })?;
            Ok(Request::SetLogBase { size, offset, fd })
        }
        F::SET_LOG_FD => {
            expect_size(req, payload, 0)?;
            if fds.len() > 1 {
                return Err(MsgError::FdCount {
                    req,
                    got: fds.len(),
                    want: 1,
                });
            }
            Ok(Request::SetLogFd(fds.into_iter().next()))
        }
        F::SET_VRING_NUM => {
            expect_fds(req, &fds, 0)?;
            let (index, num) = vring_state(req, payload, limits)?;
            let ok = num != 0
                && num.is_power_of_two()
                && num <= u32::from(limits.max_queue_size)
                && num <= u32::from(crate::queue::MAX_QUEUE_SIZE);
            if !ok {
                return Err(MsgError::Field {
                    req,
                    field: "queue size",
                    value: u64::from(num),
                });
            }
            // Bounded by max_queue_size (a u16) just above.
            let num = u16::try_from(num).unwrap_or(0);
            Ok(Request::SetVringNum { index, num })
        }
        F::SET_VRING_BASE => {
            expect_fds(req, &fds, 0)?;
            let (index, base) = vring_state(req, payload, limits)?;
            Ok(Request::SetVringBase { index, base })
        }
        F::GET_VRING_BASE => {
            expect_fds(req, &fds, 0)?;
            let (index, _) = vring_state(req, payload, limits)?;
            Ok(Request::GetVringBase { index })
        }
        F::SET_VRING_ENABLE => {
            expect_fds(req, &fds, 0)?;
            let (index, num) = vring_state(req, payload, limits)?;
            if num > 1 {
                return Err(MsgError::Field {
                    req,
                    field: "enable flag",
                    value: u64::from(num),
                });
            }
            Ok(Request::SetVringEnable {
                index,
                enable: num == 1,
            })
        }
        F::SET_VRING_ADDR => {
            expect_fds(req, &fds, 0)?;
            expect_size(req, payload, std::mem::size_of::<VhostUserVringAddr>())?;
            let a: VhostUserVringAddr = read_pod(payload);
            let index = vring_index(req, u64::from(a.index), limits)?;
            let (flags, desc, used, avail) = (a.flags, a.descriptor, a.used, a.available);
            if flags & !VHOST_VRING_F_LOG != 0 {
                return Err(MsgError::Field {
                    req,
                    field: "vring flags",
                    value: u64::from(flags),
                });
            }
            for (field, v, align) in [
                ("desc", desc, 16u64),
                ("used", used, 4),
                ("avail", avail, 2),
            ] {
                if v % align != 0 {
                    return Err(MsgError::Field {
                        req,
                        field,
                        value: v,
                    });
                }
            }
            let log_addr = a.log;
            Ok(Request::SetVringAddr {
                index,
                desc,
                used,
                avail,
                log: (flags & VHOST_VRING_F_LOG != 0).then_some(log_addr),
            })
        }
        F::SET_VRING_KICK | F::SET_VRING_CALL | F::SET_VRING_ERR => {
            let v = u64_payload(req, payload)?;
            if v & !(VRING_IDX_MASK | VRING_NOFD_MASK) != 0 {
                return Err(MsgError::Field {
                    req,
                    field: "vring fd payload",
                    value: v,
                });
            }
            let index = vring_index(req, v & VRING_IDX_MASK, limits)?;
            let nofd = v & VRING_NOFD_MASK != 0;
            expect_fds(req, &fds, usize::from(!nofd))?;
            let kind = match req {
                F::SET_VRING_KICK => VringFdKind::Kick,
                F::SET_VRING_CALL => VringFdKind::Call,
                _ => VringFdKind::Err,
            };
            Ok(Request::SetVringFd {
                kind,
                index,
                fd: fds.into_iter().next(),
            })
        }
        F::SET_BACKEND_REQ_FD => {
            expect_size(req, payload, 0)?;
            expect_fds(req, &fds, 1)?;
            let f = fds.into_iter().next().ok_or(MsgError::FdCount {
                req,
                got: 0,
                want: 1,
            })?;
            Ok(Request::SetBackendReqFd(OwnedFd::from(f)))
        }
        F::IOTLB_MSG => {
            expect_fds(req, &fds, 0)?;
            expect_size(req, payload, IOTLB_MSG_SIZE)?;
            Ok(Request::Iotlb(decode_iotlb(&read_pod::<IotlbMsg>(
                payload,
            ))?))
        }
        F::GET_CONFIG | F::SET_CONFIG => {
            expect_fds(req, &fds, 0)?;
            let hlen = std::mem::size_of::<VhostUserConfig>();
            if payload.len() < hlen {
                return Err(MsgError::PayloadSize {
                    req,
                    got: payload.len(),
                    want: hlen,
                });
            }
            let c: VhostUserConfig = read_pod(&payload[..hlen]);
            let (offset, size, flags) = (c.offset, c.size, c.flags);
            expect_size(req, payload, hlen + size as usize)?;
            if size == 0 || size > VHOST_USER_CONFIG_SIZE {
                return Err(MsgError::Field {
                    req,
                    field: "config size",
                    value: u64::from(size),
                });
            }
            match offset.checked_add(size) {
                Some(end) if end <= VHOST_USER_CONFIG_SIZE => {}
                _ => {
                    return Err(MsgError::Field {
                        req,
                        field: "config offset",
                        value: u64::from(offset),
                    })
                }
            }
            if flags & !0x3 != 0 {
                return Err(MsgError::Field {
                    req,
                    field: "config flags",
                    value: u64::from(flags),
                });
            }
            if req == F::GET_CONFIG {
                Ok(Request::GetConfig {
                    offset,
                    size,
                    flags,
                })
            } else {
                Ok(Request::SetConfig {
                    offset,
                    flags,
                    data: payload[hlen..].to_vec(),
                })
            }
        }
        F::ADD_MEM_REG | F::REM_MEM_REG => {
            expect_size(
                req,
                payload,
                std::mem::size_of::<VhostUserSingleMemoryRegion>(),
            )?;
            let r: VhostUserSingleMemoryRegion = read_pod(payload);
            let d = RegionDesc::from_wire(&r)?;
            if req == F::ADD_MEM_REG {
                expect_fds(req, &fds, 1)?;
                let f = fds.into_iter().next().ok_or(MsgError::FdCount {
                    req,
                    got: 0,
                    want: 1,
                })?;
                Ok(Request::AddMemReg(d, f))
            } else {
                // QEMU sends the region's fd along; it is not needed.
                if fds.len() > 1 {
                    return Err(MsgError::FdCount {
                        req,
                        got: fds.len(),
                        want: 1,
                    });
                }
                Ok(Request::RemMemReg(d))
            }
        }
        other => Ok(Request::Unsupported(other)),
    }
}

fn decode_mem_table(
    req: FrontendReq,
    payload: &[u8],
    fds: Vec<File>,
    limits: &Limits,
) -> Result<Request> {
    let hlen = std::mem::size_of::<VhostUserMemory>();
    let rlen = std::mem::size_of::<VhostUserMemoryRegion>();
    if payload.len() < hlen {
        return Err(MsgError::PayloadSize {
            req,
            got: payload.len(),
            want: hlen,
        });
    }
    let m: VhostUserMemory = read_pod(&payload[..hlen]);
    let n = m.num_regions as usize;
    let max = MAX_MEM_TABLE_REGIONS.min(limits.max_mem_slots);
    if n > max {
        return Err(MsgError::TooManyRegions { got: n, max });
    }
    expect_size(req, payload, hlen + n * rlen)?;
    expect_fds(req, &fds, n)?;
    let mut regions: Vec<RegionDesc> = Vec::with_capacity(n);
    for i in 0..n {
        let start = hlen + i * rlen;
        let r: VhostUserMemoryRegion = read_pod(&payload[start..start + rlen]);
        let d = RegionDesc::from_wire(&r)?;
        if let Some(o) = regions.iter().find(|o| o.overlaps(&d)) {
            return Err(MsgError::Overlap { a: o.gpa, b: d.gpa });
        }
        regions.push(d);
    }
    Ok(Request::SetMemTable(regions.into_iter().zip(fds).collect()))
}

fn decode_iotlb(m: &IotlbMsg) -> Result<IotlbRequest> {
    let bad = || MsgError::Iotlb {
        typ: m.typ,
        iova: m.iova,
        size: m.size,
        perm: m.perm,
    };
    match m.typ {
        VHOST_IOTLB_UPDATE => {
            let ok = m.size != 0
                && m.iova.checked_add(m.size - 1).is_some()
                && m.uaddr.checked_add(m.size - 1).is_some()
                && (VHOST_ACCESS_RO..=VHOST_ACCESS_RW).contains(&m.perm);
            if !ok {
                return Err(bad());
            }
            Ok(IotlbRequest::Update {
                iova: m.iova,
                size: m.size,
                uaddr: m.uaddr,
                perm: m.perm,
            })
        }
        VHOST_IOTLB_INVALIDATE => {
            if m.size == 0 {
                return Err(bad());
            }
            // Whole-space invalidations are common: clamp instead of overflowing.
            let last = m.iova.saturating_add(m.size - 1);
            Ok(IotlbRequest::Invalidate { iova: m.iova, last })
        }
        VHOST_IOTLB_BATCH_BEGIN => Ok(IotlbRequest::BatchBegin),
        VHOST_IOTLB_BATCH_END => Ok(IotlbRequest::BatchEnd),
        _ => Err(bad()),
    }
}

/// Reads one message: header, fds and payload. Blocks.
///
/// Every fd that came with the message is owned by the returned `File`s or
/// closed before an error returns, however many the frontend attached
/// ([`crate::scm`]); [`decode`] checks the count each request allows.
pub fn recv_message(sock: &UnixStream) -> Result<(Header, Vec<u8>, Vec<File>)> {
    let mut hbuf = [0u8; HDR_SIZE];
    let got = {
        let mut iov = [IoSliceMut::new(&mut hbuf)];
        crate::scm::recv_with_fds(sock.as_fd(), &mut iov, MsgFlags::empty()).map_err(|e| {
            MsgError::Socket {
                op: "recvmsg",
                errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        })?
    };
    let fds: Vec<File> = got.fds.into_iter().map(File::from).collect();
    let got = got.bytes;
    if got == 0 {
        return Err(MsgError::Disconnected);
    }
    let mut have = got;
    while have < HDR_SIZE {
        let n = read_some(sock, &mut hbuf[have..])?;
        have += n;
    }
    let hdr = Header::from_bytes(&hbuf);
    let size = hdr.size as usize;
    if size > MAX_MSG_SIZE {
        return Err(MsgError::Header {
            request: hdr.request,
            flags: hdr.flags,
            size: hdr.size,
        });
    }
    let mut payload = vec![0u8; size];
    let mut have = 0;
    while have < size {
        let n = read_some(sock, &mut payload[have..])?;
        have += n;
    }
    Ok((hdr, payload, fds))
}

fn read_some(sock: &UnixStream, buf: &mut [u8]) -> Result<usize> {
    use std::io::Read;
    let mut s = sock;
    loop {
        match s.read(buf) {
            Ok(0) => return Err(MsgError::Disconnected),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(MsgError::Socket {
                    op: "read",
                    errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                })
            }
        }
    }
}

/// Sends a message (header and payload) with optional fds.
pub fn send_message(
    sock: &UnixStream,
    hdr: &Header,
    payload: &[u8],
    fds: &[RawFd],
    flags: MsgFlags,
) -> Result<()> {
    let h = hdr.to_bytes();
    let iov = [IoSlice::new(&h), IoSlice::new(payload)];
    let total = HDR_SIZE + payload.len();
    let sent = crate::scm::send_with_fds(sock.as_fd(), &iov, fds, flags).map_err(|errno| {
        MsgError::Socket {
            op: "sendmsg",
            errno,
        }
    })?;
    if sent != total {
        // A partial write of a tiny message on a unix stream: finish it.
        let mut all = Vec::with_capacity(total);
        all.extend_from_slice(&h);
        all.extend_from_slice(payload);
        use std::io::Write;
        let mut s = sock;
        s.write_all(&all[sent..]).map_err(|e| MsgError::Socket {
            op: "write",
            errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
    }
    Ok(())
}

/// Sends a reply to `req` with `payload`, carrying `fds` (SCM_RIGHTS).
pub fn send_reply_fds(sock: &UnixStream, req: u32, payload: &[u8], fds: &[RawFd]) -> Result<()> {
    let hdr = Header {
        request: req,
        flags: VERSION_1 | FLAG_REPLY,
        size: payload.len() as u32,
    };
    send_message(sock, &hdr, payload, fds, MsgFlags::empty())
}

/// Sends a reply to `req`.
pub fn send_reply(sock: &UnixStream, req: u32, payload: &[u8]) -> Result<()> {
    let hdr = Header {
        request: req,
        flags: VERSION_1 | FLAG_REPLY,
        size: payload.len() as u32,
    };
    send_message(sock, &hdr, payload, &[], MsgFlags::empty())
}
