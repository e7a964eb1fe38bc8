//! Wire format of the service protocol: header, requests, replies.
//!
//! Every message is one `SOCK_SEQPACKET` packet: a 24-byte header followed by
//! a body, all little-endian. File descriptors travel as `SCM_RIGHTS` on the
//! same packet and the header says how many.
//!
//! ```text
//! offset size field
//!      0    4 magic       SERVICE_MAGIC ("IOMS")
//!      4    2 version     PROTOCOL_VERSION
//!      6    2 opcode      Opcode
//!      8    4 length      header + body, bytes; equals the packet length
//!     12    2 nfds        number of SCM_RIGHTS fds on the packet
//!     14    2 flags       FLAG_REPLY on replies, 0 on requests
//!     16    8 request_id  chosen by the client, echoed by the reply
//! ```
//!
//! A reply body starts with `errno: u32` (0 on success) and `aux: u32`
//! (entries done for `HWPT_INVALIDATE`, also on error; 0 otherwise). On
//! error a message follows (`u16` length + UTF-8, at most
//! [`MAX_ERROR_MESSAGE`] bytes); on success the opcode's reply body.
//!
//! Request bodies (`label` is a string as below; `[n x (start, last)]` is
//! `n` pairs of `u64`) and successful reply bodies:
//!
//! | opcode | request body | reply body |
//! | --- | --- | --- |
//! | 1 `HELLO` | empty | `session_id u64, server_pid u32, max_message u32` |
//! | 2 `IOAS_ALLOC` | empty | `ioas_id u32` |
//! | 3 `DESTROY` | `id u32` | empty |
//! | 4 `IOAS_MAP` (1 fd: a memfd sealed with `F_SEAL_SHRINK`) | `flags u32, ioas_id u32, offset u64, length u64, iova u64` | `iova u64` |
//! | 5 `IOAS_UNMAP` | `ioas_id u32, 0 u32, iova u64, length u64` | `unmapped u64` |
//! | 6 `IOAS_COPY` | `flags u32, dst_ioas_id u32, src_ioas_id u32, 0 u32, length u64, dst_iova u64, src_iova u64` | `dst_iova u64` |
//! | 7 `IOAS_IOVA_RANGES` | `ioas_id u32` | `alignment u64, n u32, [n x (start, last)]` |
//! | 8 `IOAS_ALLOW_IOVAS` | `ioas_id u32, n u32, [n x (start, last)]` | empty |
//! | 9 `DEVICE_LIST` | empty | `n u32, n x label` |
//! | 10 `DEVICE_INFO` | `label` | `dev_id u32, max_pasid_log2 u32, flags u32 (INFO_*), 0 u32, page_sizes u64, n u32, [n x (start, last)]` |
//! | 11 `ATTACH` | `label, flags u32 (ATTACH_PASID), pasid u32, pt_id u32` | `hwpt_id u32` |
//! | 12 `DETACH` | `label, flags u32 (ATTACH_PASID), pasid u32` | empty |
//! | 13 `PASID_ALLOC` | `label` | `pasid u32` |
//! | 14 `PASID_FREE` | `label, pasid u32` | empty |
//! | 15 `HWPT_ALLOC` | `label, pt_id u32, flags u32 (IOMMU_HWPT_ALLOC_*, FAULT_ID_VALID), fault_id u32, data_type u32, data_len u32, data` | `hwpt_id u32` |
//! | 16 `HWPT_INVALIDATE` | `hwpt_id u32, data_type u32, entry_len u32, entry_num u32, entries` | empty (`aux` = entries done, also on error) |
//! | 17 `FAULT_QUEUE_ALLOC` | `flags u32` (0) | `fault_id u32` + 1 fd: the fault channel |
//! | 18 `RID_TOKEN` | `label` | `token [16 x u8]` |
//! | 19 `RID_CLAIM` | `label, token [16 x u8]` | empty |
//!
//! `MAP_FIXED_IOVA` off means the `iova` fields must be 0 and the server
//! picks the IOVA. `ATTACH_PASID` off means `pasid` must be 0 (the RID).
//! HWPT data: type 0 has no data; type 1 (stage 1) is the `u64` root IOVA.
//! Invalidation entries are described at [`INVALIDATE_DATA_STAGE1`] and
//! [`INVALIDATE_DATA_VIOMMU`].
//!
//! `RID_TOKEN` is asked by the process of a device's vhost-user frontend;
//! the token it returns, passed to another process and redeemed there with
//! `RID_CLAIM`, is the frontend's consent to that session taking the RID
//! over (see [`crate::ownership`]).
//!
//! Strings (device labels) are a `u16` length and that many UTF-8 bytes,
//! 1..=[`MAX_LABEL`]. Ranges are inclusive `[start, last]` pairs of `u64`.
//! Every count has a named bound, every body must be consumed exactly
//! (trailing bytes are `E2BIG`, as iommufd's non-zero tails), unknown flag
//! bits and non-zero reserved words are `EOPNOTSUPP`.

use crate::sys::le::{LeReader, LeWriter, Short};
pub use iommu_core::InvalidateEntry;
use thiserror::Error;

pub use crate::ownership::TOKEN_LEN;

/// First word of every message: "IOMS" little-endian.
pub const SERVICE_MAGIC: u32 = 0x534d_4f49;
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Size of the message header.
pub const HEADER_SIZE: usize = 24;
/// Largest message, header included.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Largest number of fds on one message.
pub const MAX_FDS: usize = 1;
/// Longest device label.
pub const MAX_LABEL: usize = 64;
/// Most ranges in `IOAS_ALLOW_IOVAS` or an `IOAS_IOVA_RANGES` reply.
pub const MAX_RANGES: usize = 1024;
/// Most devices in a `DEVICE_LIST` reply.
pub const MAX_DEVICES: usize = 256;
/// Most reserved ranges in a `DEVICE_INFO` reply.
pub const MAX_RESERVED: usize = 64;
/// Largest HWPT driver data.
pub const MAX_HWPT_DATA: usize = 256;
/// Most invalidation entries in one `HWPT_INVALIDATE`.
pub const MAX_INVALIDATE_ENTRIES: usize = 1024;
/// Longest error message in a reply.
pub const MAX_ERROR_MESSAGE: usize = 256;

/// Header flag: the message is a reply.
pub const FLAG_REPLY: u16 = 1;

/// `IOAS_MAP`/`IOAS_COPY` flag: use the given IOVA (`IOMMU_IOAS_MAP_FIXED_IOVA`).
pub const MAP_FIXED_IOVA: u32 = 1 << 0;
/// `IOAS_MAP`/`IOAS_COPY` flag: device may write (`IOMMU_IOAS_MAP_WRITEABLE`).
pub const MAP_WRITEABLE: u32 = 1 << 1;
/// `IOAS_MAP`/`IOAS_COPY` flag: device may read (`IOMMU_IOAS_MAP_READABLE`).
pub const MAP_READABLE: u32 = 1 << 2;
/// Every map flag.
pub const MAP_FLAGS_KNOWN: u32 = MAP_FIXED_IOVA | MAP_WRITEABLE | MAP_READABLE;

/// `ATTACH`/`DETACH` flag: the `pasid` field is valid.
pub const ATTACH_PASID: u32 = 1 << 0;

/// HWPT data type: none (a paging HWPT from an IOAS).
pub const HWPT_DATA_NONE: u32 = 0;
/// HWPT data type: stage-1 table, data is the `u64` root IOVA.
pub const HWPT_DATA_STAGE1: u32 = 1;

/// Invalidation data type: stage-1 IOTLB, 24-byte entries
/// `{flags u32, reserved u32, addr u64, npages u64}`.
pub const INVALIDATE_DATA_STAGE1: u32 = 0;
/// Invalidation data type: vIOMMU, 32-byte entries
/// `{vdev_id u64, flags u32, vpasid u32, addr u64, npages u64}`; `flags`
/// bit 31 ([`INVALIDATE_VPASID_VALID`]) makes `vpasid` valid.
pub const INVALIDATE_DATA_VIOMMU: u32 = 1;
/// Entry size of [`INVALIDATE_DATA_STAGE1`].
pub const INVALIDATE_STAGE1_LEN: u32 = 24;
/// Entry size of [`INVALIDATE_DATA_VIOMMU`].
pub const INVALIDATE_VIOMMU_LEN: u32 = 32;
/// vIOMMU invalidation entry flag: `vpasid` is valid.
pub const INVALIDATE_VPASID_VALID: u32 = 1 << 31;

/// `DEVICE_INFO` flag bit: nesting supported.
pub const INFO_NESTING: u32 = 1 << 0;
/// `DEVICE_INFO` flag bit: I/O page faults supported.
pub const INFO_IOPF: u32 = 1 << 1;
/// `DEVICE_INFO` flag bit: dirty tracking supported.
pub const INFO_DIRTY_TRACKING: u32 = 1 << 2;

/// Operation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Opcode {
    /// Open the session; learn the version, session id and limits.
    Hello = 1,
    /// `IOMMU_IOAS_ALLOC`.
    IoasAlloc = 2,
    /// `IOMMU_DESTROY` of an object this session owns.
    Destroy = 3,
    /// `IOMMU_IOAS_MAP_FILE` with the memfd on the message.
    IoasMap = 4,
    /// `IOMMU_IOAS_UNMAP`.
    IoasUnmap = 5,
    /// `IOMMU_IOAS_COPY`.
    IoasCopy = 6,
    /// `IOMMU_IOAS_IOVA_RANGES`.
    IoasIovaRanges = 7,
    /// `IOMMU_IOAS_ALLOW_IOVAS`.
    IoasAllowIovas = 8,
    /// Labels of the server's devices.
    DeviceList = 9,
    /// `IOMMU_GET_HW_INFO` of a device by label.
    DeviceInfo = 10,
    /// Attach a device (default PASID or a PASID) to an IOAS or HWPT.
    Attach = 11,
    /// Detach a device (default PASID or a PASID).
    Detach = 12,
    /// Reserve a free PASID of a device for this session.
    PasidAlloc = 13,
    /// Release a PASID reserved by this session.
    PasidFree = 14,
    /// `IOMMU_HWPT_ALLOC`.
    HwptAlloc = 15,
    /// `IOMMU_HWPT_INVALIDATE`.
    HwptInvalidate = 16,
    /// `IOMMU_FAULT_QUEUE_ALLOC`; the reply carries the fault channel fd.
    FaultQueueAlloc = 17,
    /// A one-time token with which the device's frontend consents to
    /// another session taking its RID over.
    RidToken = 18,
    /// Redeem a frontend's token.
    RidClaim = 19,
}

impl Opcode {
    /// Decodes an opcode.
    pub fn from_u16(v: u16) -> Option<Opcode> {
        use Opcode::*;
        Some(match v {
            1 => Hello,
            2 => IoasAlloc,
            3 => Destroy,
            4 => IoasMap,
            5 => IoasUnmap,
            6 => IoasCopy,
            7 => IoasIovaRanges,
            8 => IoasAllowIovas,
            9 => DeviceList,
            10 => DeviceInfo,
            11 => Attach,
            12 => Detach,
            13 => PasidAlloc,
            14 => PasidFree,
            15 => HwptAlloc,
            16 => HwptInvalidate,
            17 => FaultQueueAlloc,
            18 => RidToken,
            19 => RidClaim,
            _ => return None,
        })
    }

    /// Number of fds a request of this opcode carries.
    pub fn request_fds(self) -> usize {
        match self {
            Opcode::IoasMap => 1,
            _ => 0,
        }
    }

    /// Number of fds a successful reply of this opcode carries.
    pub fn reply_fds(self) -> usize {
        match self {
            Opcode::FaultQueueAlloc => 1,
            _ => 0,
        }
    }
}

/// A message failed validation.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    /// Fewer bytes than the header or the body needs.
    #[error("message truncated: {need} bytes needed, {have} present")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// The packet is larger than [`MAX_MESSAGE`].
    #[error("message of {len} bytes exceeds the limit of {MAX_MESSAGE}")]
    TooLong {
        /// Packet length (at least).
        len: usize,
    },
    /// The header's length is not the packet's.
    #[error("header says {header} bytes, packet has {actual}")]
    LengthMismatch {
        /// Length in the header.
        header: usize,
        /// Packet length.
        actual: usize,
    },
    /// The magic word is wrong.
    #[error("bad magic {0:#x}")]
    BadMagic(u32),
    /// The version is not [`PROTOCOL_VERSION`].
    #[error("unsupported protocol version {0}")]
    BadVersion(u16),
    /// Unknown opcode.
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    /// The body has bytes after its last field.
    #[error("{extra} trailing bytes after the body")]
    Trailing {
        /// Bytes left over.
        extra: usize,
    },
    /// The number of fds does not match the opcode or the header.
    #[error("{got} fds on the message, {expected} expected")]
    FdCount {
        /// Fds expected.
        expected: usize,
        /// Fds received (or announced).
        got: usize,
    },
    /// Unknown flag bits.
    #[error("unknown flags {flags:#x} in {field}")]
    BadFlags {
        /// Which field.
        field: &'static str,
        /// The flags.
        flags: u32,
    },
    /// A reserved field is not zero.
    #[error("reserved field {0} is not zero")]
    Reserved(&'static str),
    /// A label is empty, too long or not UTF-8.
    #[error("bad device label ({0})")]
    BadLabel(&'static str),
    /// A count exceeds its bound.
    #[error("{what}: {count} exceeds the limit of {max}")]
    TooMany {
        /// What was counted.
        what: &'static str,
        /// The count.
        count: usize,
        /// The bound.
        max: usize,
    },
    /// Address arithmetic overflows.
    #[error("{what}: {start:#x}+{length:#x} overflows")]
    Overflow {
        /// Which range.
        what: &'static str,
        /// Start.
        start: u64,
        /// Length.
        length: u64,
    },
    /// A field holds a value its type does not allow.
    #[error("bad value {value:#x} in {field}")]
    BadValue {
        /// Which field.
        field: &'static str,
        /// The value.
        value: u64,
    },
    /// A request where a reply was expected or the reverse.
    #[error("message direction flag is wrong")]
    Direction,
}

impl ProtoError {
    /// The errno this validation failure is reported with.
    pub fn errno(&self) -> i32 {
        match self {
            ProtoError::Truncated { .. } => libc::EINVAL,
            ProtoError::TooLong { .. } => libc::EMSGSIZE,
            ProtoError::LengthMismatch { .. } => libc::EINVAL,
            ProtoError::BadMagic(_) => libc::EPROTO,
            ProtoError::BadVersion(_) => libc::EPROTONOSUPPORT,
            ProtoError::UnknownOpcode(_) => libc::ENOTTY,
            ProtoError::Trailing { .. } => libc::E2BIG,
            ProtoError::FdCount { .. } => libc::EBADF,
            ProtoError::BadFlags { .. } => libc::EOPNOTSUPP,
            ProtoError::Reserved(_) => libc::EOPNOTSUPP,
            ProtoError::BadLabel(_) => libc::EINVAL,
            ProtoError::TooMany { .. } => libc::EINVAL,
            ProtoError::Overflow { .. } => libc::EOVERFLOW,
            ProtoError::BadValue { .. } => libc::EINVAL,
            ProtoError::Direction => libc::EINVAL,
        }
    }
}

/// Result alias of the wire format.
pub type Result<T> = std::result::Result<T, ProtoError>;

/// The message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version.
    pub version: u16,
    /// Raw opcode.
    pub opcode: u16,
    /// Total length, header included.
    pub length: u32,
    /// Fds carried.
    pub nfds: u16,
    /// [`FLAG_REPLY`] or 0.
    pub flags: u16,
    /// Request id.
    pub request_id: u64,
}

impl Header {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&SERVICE_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.opcode.to_le_bytes());
        b[8..12].copy_from_slice(&self.length.to_le_bytes());
        b[12..14].copy_from_slice(&self.nfds.to_le_bytes());
        b[14..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.request_id.to_le_bytes());
        b
    }

    /// Decodes and checks the header of a packet of `packet.len()` bytes
    /// that arrived with `nfds` fds: magic, size bounds, length, fd count.
    /// The version and opcode are returned unchecked so that the caller can
    /// answer them with the request id.
    pub fn decode(packet: &[u8], nfds: usize) -> Result<Header> {
        if packet.len() > MAX_MESSAGE {
            return Err(ProtoError::TooLong { len: packet.len() });
        }
        let mut r = Reader::new(packet);
        let magic = r.u32()?;
        if magic != SERVICE_MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        let h = Header {
            version: r.u16()?,
            opcode: r.u16()?,
            length: r.u32()?,
            nfds: r.u16()?,
            flags: r.u16()?,
            request_id: r.u64()?,
        };
        if h.length as usize != packet.len() {
            return Err(ProtoError::LengthMismatch {
                header: h.length as usize,
                actual: packet.len(),
            });
        }
        if usize::from(h.nfds) != nfds {
            return Err(ProtoError::FdCount {
                expected: usize::from(h.nfds),
                got: nfds,
            });
        }
        Ok(h)
    }
}

/// Bounded little-endian reader over a body: the workspace's one reader
/// ([`LeReader`]) with the protocol's errors and field kinds.
#[derive(Debug)]
pub struct Reader<'a> {
    le: LeReader<'a>,
}

impl From<Short> for ProtoError {
    fn from(s: Short) -> Self {
        ProtoError::Truncated {
            need: s.need,
            have: s.have,
        }
    }
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader {
            le: LeReader::new(buf),
        }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        Ok(self.le.bytes(n)?)
    }

    /// A `u8`.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.le.u8()?)
    }
    /// A `u16`.
    pub fn u16(&mut self) -> Result<u16> {
        Ok(self.le.u16()?)
    }
    /// A `u32`.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(self.le.u32()?)
    }
    /// A `u64`.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(self.le.u64()?)
    }

    /// A reserved `u32` that must be zero.
    pub fn reserved32(&mut self, name: &'static str) -> Result<()> {
        if self.u32()? != 0 {
            return Err(ProtoError::Reserved(name));
        }
        Ok(())
    }

    /// A device label.
    pub fn label(&mut self) -> Result<String> {
        let n = usize::from(self.u16()?);
        if n == 0 {
            return Err(ProtoError::BadLabel("empty"));
        }
        if n > MAX_LABEL {
            return Err(ProtoError::BadLabel("too long"));
        }
        let b = self.bytes(n)?;
        let s = std::str::from_utf8(b).map_err(|_| ProtoError::BadLabel("not UTF-8"))?;
        Ok(s.to_owned())
    }

    /// A count bounded by `max`, checked against the bytes left (each item
    /// `item` bytes) before anything is allocated.
    pub fn count(&mut self, what: &'static str, max: usize, item: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(ProtoError::TooMany {
                what,
                count: n,
                max,
            });
        }
        let need = n.saturating_mul(item);
        if need > self.remaining() {
            return Err(ProtoError::Truncated {
                need: self.le.position().saturating_add(need),
                have: self.le.len(),
            });
        }
        Ok(n)
    }

    /// Inclusive ranges: `n` pairs of `u64`.
    pub fn ranges(&mut self, n: usize) -> Result<Vec<(u64, u64)>> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push((self.u64()?, self.u64()?));
        }
        Ok(v)
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.le.remaining()
    }

    /// Ends the body: every byte must have been read.
    pub fn finish(self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(ProtoError::Trailing {
                extra: self.remaining(),
            });
        }
        Ok(())
    }
}

/// Little-endian writer of a message: the workspace's one writer
/// ([`LeWriter`]) behind room for the header.
#[derive(Debug, Default)]
pub struct Writer {
    le: LeWriter,
}

impl Writer {
    /// A writer with room for the header.
    pub fn new() -> Self {
        Writer {
            le: LeWriter::from_vec(vec![0u8; HEADER_SIZE]),
        }
    }
    /// Appends a `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.le.u16(v);
        self
    }
    /// Appends a `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.le.u32(v);
        self
    }
    /// Appends a `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.le.u64(v);
        self
    }
    /// Appends raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.le.bytes(b);
        self
    }
    /// Appends a string with its `u16` length (truncated to `max` bytes at
    /// a character boundary).
    pub fn string(&mut self, s: &str, max: usize) -> &mut Self {
        let mut end = s.len().min(max);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.bytes(&s.as_bytes()[..end])
    }
    /// Finishes the message: writes the header in front.
    pub fn finish(mut self, opcode: u16, flags: u16, nfds: u16, request_id: u64) -> Vec<u8> {
        let h = Header {
            version: PROTOCOL_VERSION,
            opcode,
            length: self.le.len() as u32,
            nfds,
            flags,
            request_id,
        };
        self.le.as_mut_slice()[..HEADER_SIZE].copy_from_slice(&h.encode());
        self.le.into_vec()
    }
}

/// A request, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Open the session.
    Hello,
    /// Allocate an IOAS.
    IoasAlloc,
    /// Destroy an object of this session.
    Destroy {
        /// The object id.
        id: u32,
    },
    /// Map `length` bytes of the memfd on the message, from `offset`.
    IoasMap {
        /// `MAP_*` flags.
        flags: u32,
        /// The IOAS.
        ioas_id: u32,
        /// Offset into the memfd.
        offset: u64,
        /// Length.
        length: u64,
        /// The IOVA with [`MAP_FIXED_IOVA`].
        iova: u64,
    },
    /// Unmap whole areas in `[iova, iova + length)`; `0, u64::MAX` is all.
    IoasUnmap {
        /// The IOAS.
        ioas_id: u32,
        /// First IOVA.
        iova: u64,
        /// Length.
        length: u64,
    },
    /// Copy mappings between IOAS.
    IoasCopy {
        /// `MAP_*` flags.
        flags: u32,
        /// Destination IOAS.
        dst_ioas_id: u32,
        /// Source IOAS.
        src_ioas_id: u32,
        /// Length.
        length: u64,
        /// Destination IOVA with [`MAP_FIXED_IOVA`].
        dst_iova: u64,
        /// Source IOVA.
        src_iova: u64,
    },
    /// The usable IOVA ranges of an IOAS.
    IoasIovaRanges {
        /// The IOAS.
        ioas_id: u32,
    },
    /// Replace the allowed IOVA ranges of an IOAS.
    IoasAllowIovas {
        /// The IOAS.
        ioas_id: u32,
        /// Inclusive ranges.
        ranges: Vec<(u64, u64)>,
    },
    /// Labels of the server's devices.
    DeviceList,
    /// Hardware info of a device.
    DeviceInfo {
        /// Device label.
        label: String,
    },
    /// Attach a device to an IOAS or HWPT.
    Attach {
        /// Device label.
        label: String,
        /// A PASID, or the default PASID (RID).
        pasid: Option<u32>,
        /// IOAS or HWPT id.
        pt_id: u32,
    },
    /// Detach a device.
    Detach {
        /// Device label.
        label: String,
        /// A PASID, or the default PASID (RID).
        pasid: Option<u32>,
    },
    /// Reserve a free PASID of a device.
    PasidAlloc {
        /// Device label.
        label: String,
    },
    /// Release a reserved PASID (detaching it first).
    PasidFree {
        /// Device label.
        label: String,
        /// The PASID.
        pasid: u32,
    },
    /// Allocate a HWPT.
    HwptAlloc {
        /// Device label.
        label: String,
        /// IOAS, nest-parent HWPT or vIOMMU id.
        pt_id: u32,
        /// `IOMMU_HWPT_ALLOC_*` flags.
        flags: u32,
        /// Fault queue id.
        fault_id: Option<u32>,
        /// `HWPT_DATA_*` type.
        data_type: u32,
        /// Driver data.
        data: Vec<u8>,
    },
    /// Invalidate a nested HWPT or vIOMMU.
    HwptInvalidate {
        /// The HWPT or vIOMMU.
        hwpt_id: u32,
        /// `INVALIDATE_DATA_*` type.
        data_type: u32,
        /// Entry length as sent.
        entry_len: u32,
        /// Decoded entries (empty: a probe).
        entries: Vec<InvalidateEntry>,
    },
    /// Allocate a fault queue; the reply carries its channel fd.
    FaultQueueAlloc,
    /// A handover token of the device's frontend (asked by its process).
    RidToken {
        /// Device label.
        label: String,
    },
    /// Redeem a handover token.
    RidClaim {
        /// Device label.
        label: String,
        /// The token.
        token: [u8; TOKEN_LEN],
    },
}

const HWPT_FAULT_ID_VALID: u32 = 1 << 2;
const HWPT_FLAGS_KNOWN: u32 = 0xf;

fn check_range(what: &'static str, start: u64, length: u64) -> Result<()> {
    if length > 0 && start.checked_add(length - 1).is_none() {
        return Err(ProtoError::Overflow {
            what,
            start,
            length,
        });
    }
    Ok(())
}

fn opt_pasid(flags: u32, pasid: u32) -> Result<Option<u32>> {
    if flags & !ATTACH_PASID != 0 {
        return Err(ProtoError::BadFlags {
            field: "attach flags",
            flags,
        });
    }
    if flags & ATTACH_PASID != 0 {
        Ok(Some(pasid))
    } else if pasid != 0 {
        Err(ProtoError::Reserved("pasid without ATTACH_PASID"))
    } else {
        Ok(None)
    }
}

impl Request {
    /// The opcode of this request.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Hello => Opcode::Hello,
            Request::IoasAlloc => Opcode::IoasAlloc,
            Request::Destroy { .. } => Opcode::Destroy,
            Request::IoasMap { .. } => Opcode::IoasMap,
            Request::IoasUnmap { .. } => Opcode::IoasUnmap,
            Request::IoasCopy { .. } => Opcode::IoasCopy,
            Request::IoasIovaRanges { .. } => Opcode::IoasIovaRanges,
            Request::IoasAllowIovas { .. } => Opcode::IoasAllowIovas,
            Request::DeviceList => Opcode::DeviceList,
            Request::DeviceInfo { .. } => Opcode::DeviceInfo,
            Request::Attach { .. } => Opcode::Attach,
            Request::Detach { .. } => Opcode::Detach,
            Request::PasidAlloc { .. } => Opcode::PasidAlloc,
            Request::PasidFree { .. } => Opcode::PasidFree,
            Request::HwptAlloc { .. } => Opcode::HwptAlloc,
            Request::HwptInvalidate { .. } => Opcode::HwptInvalidate,
            Request::FaultQueueAlloc => Opcode::FaultQueueAlloc,
            Request::RidToken { .. } => Opcode::RidToken,
            Request::RidClaim { .. } => Opcode::RidClaim,
        }
    }

    /// Encodes the request with `request_id` (fds travel beside it).
    pub fn encode(&self, request_id: u64) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            Request::Hello | Request::IoasAlloc | Request::DeviceList => {}
            Request::FaultQueueAlloc => {
                w.u32(0);
            }
            Request::Destroy { id } => {
                w.u32(*id);
            }
            Request::IoasMap {
                flags,
                ioas_id,
                offset,
                length,
                iova,
            } => {
                w.u32(*flags)
                    .u32(*ioas_id)
                    .u64(*offset)
                    .u64(*length)
                    .u64(*iova);
            }
            Request::IoasUnmap {
                ioas_id,
                iova,
                length,
            } => {
                w.u32(*ioas_id).u32(0).u64(*iova).u64(*length);
            }
            Request::IoasCopy {
                flags,
                dst_ioas_id,
                src_ioas_id,
                length,
                dst_iova,
                src_iova,
            } => {
                w.u32(*flags)
                    .u32(*dst_ioas_id)
                    .u32(*src_ioas_id)
                    .u32(0)
                    .u64(*length)
                    .u64(*dst_iova)
                    .u64(*src_iova);
            }
            Request::IoasIovaRanges { ioas_id } => {
                w.u32(*ioas_id);
            }
            Request::IoasAllowIovas { ioas_id, ranges } => {
                w.u32(*ioas_id).u32(ranges.len() as u32);
                for (s, l) in ranges {
                    w.u64(*s).u64(*l);
                }
            }
            Request::DeviceInfo { label }
            | Request::PasidAlloc { label }
            | Request::RidToken { label } => {
                w.string(label, usize::from(u16::MAX));
            }
            Request::RidClaim { label, token } => {
                w.string(label, usize::from(u16::MAX));
                w.bytes(token);
            }
            Request::Attach {
                label,
                pasid,
                pt_id,
            } => {
                w.string(label, usize::from(u16::MAX));
                w.u32(if pasid.is_some() { ATTACH_PASID } else { 0 })
                    .u32(pasid.unwrap_or(0))
                    .u32(*pt_id);
            }
            Request::Detach { label, pasid } => {
                w.string(label, usize::from(u16::MAX));
                w.u32(if pasid.is_some() { ATTACH_PASID } else { 0 })
                    .u32(pasid.unwrap_or(0));
            }
            Request::PasidFree { label, pasid } => {
                w.string(label, usize::from(u16::MAX));
                w.u32(*pasid);
            }
            Request::HwptAlloc {
                label,
                pt_id,
                flags,
                fault_id,
                data_type,
                data,
            } => {
                w.string(label, usize::from(u16::MAX));
                let flags = if fault_id.is_some() {
                    flags | HWPT_FAULT_ID_VALID
                } else {
                    *flags
                };
                w.u32(*pt_id)
                    .u32(flags)
                    .u32(fault_id.unwrap_or(0))
                    .u32(*data_type)
                    .u32(data.len() as u32)
                    .bytes(data);
            }
            Request::HwptInvalidate {
                hwpt_id,
                data_type,
                entry_len,
                entries,
            } => {
                w.u32(*hwpt_id)
                    .u32(*data_type)
                    .u32(*entry_len)
                    .u32(entries.len() as u32);
                for e in entries {
                    match e {
                        InvalidateEntry::Stage1 {
                            flags,
                            addr,
                            npages,
                        } => {
                            w.u32(*flags).u32(0).u64(*addr).u64(*npages);
                        }
                        InvalidateEntry::Viommu {
                            vdev_id,
                            vpasid,
                            flags,
                            addr,
                            npages,
                        } => {
                            let f = if vpasid.is_some() {
                                flags | INVALIDATE_VPASID_VALID
                            } else {
                                *flags
                            };
                            w.u64(*vdev_id)
                                .u32(f)
                                .u32(vpasid.unwrap_or(0))
                                .u64(*addr)
                                .u64(*npages);
                        }
                    }
                }
            }
        }
        let op = self.opcode();
        w.finish(op as u16, 0, op.request_fds() as u16, request_id)
    }

    /// Decodes and validates a request packet that arrived with `nfds`
    /// fds. On error the header is returned too when it was readable, so
    /// the server can answer with the request id.
    pub fn decode(
        packet: &[u8],
        nfds: usize,
    ) -> std::result::Result<(Header, Request), (Option<Header>, ProtoError)> {
        let h = Header::decode(packet, nfds).map_err(|e| (None, e))?;
        Self::decode_body(&h, &packet[HEADER_SIZE..], nfds)
            .map(|r| (h, r))
            .map_err(|e| (Some(h), e))
    }

    fn decode_body(h: &Header, body: &[u8], nfds: usize) -> Result<Request> {
        if h.version != PROTOCOL_VERSION {
            return Err(ProtoError::BadVersion(h.version));
        }
        if h.flags != 0 {
            return Err(ProtoError::Direction);
        }
        let op = Opcode::from_u16(h.opcode).ok_or(ProtoError::UnknownOpcode(h.opcode))?;
        if nfds != op.request_fds() {
            return Err(ProtoError::FdCount {
                expected: op.request_fds(),
                got: nfds,
            });
        }
        let mut r = Reader::new(body);
        let req = match op {
            Opcode::Hello => Request::Hello,
            Opcode::IoasAlloc => Request::IoasAlloc,
            Opcode::DeviceList => Request::DeviceList,
            Opcode::FaultQueueAlloc => {
                let flags = r.u32()?;
                if flags != 0 {
                    return Err(ProtoError::BadFlags {
                        field: "fault queue flags",
                        flags,
                    });
                }
                Request::FaultQueueAlloc
            }
            Opcode::Destroy => Request::Destroy { id: r.u32()? },
            Opcode::IoasMap => {
                let flags = r.u32()?;
                if flags & !MAP_FLAGS_KNOWN != 0 {
                    return Err(ProtoError::BadFlags {
                        field: "map flags",
                        flags,
                    });
                }
                let ioas_id = r.u32()?;
                let offset = r.u64()?;
                let length = r.u64()?;
                let iova = r.u64()?;
                check_range("memfd range", offset, length)?;
                if flags & MAP_FIXED_IOVA != 0 {
                    check_range("iova range", iova, length)?;
                } else if iova != 0 {
                    return Err(ProtoError::Reserved("iova without MAP_FIXED_IOVA"));
                }
                Request::IoasMap {
                    flags,
                    ioas_id,
                    offset,
                    length,
                    iova,
                }
            }
            Opcode::IoasUnmap => {
                let ioas_id = r.u32()?;
                r.reserved32("unmap reserved")?;
                let iova = r.u64()?;
                let length = r.u64()?;
                check_range("unmap range", iova, length)?;
                Request::IoasUnmap {
                    ioas_id,
                    iova,
                    length,
                }
            }
            Opcode::IoasCopy => {
                let flags = r.u32()?;
                if flags & !MAP_FLAGS_KNOWN != 0 {
                    return Err(ProtoError::BadFlags {
                        field: "copy flags",
                        flags,
                    });
                }
                let dst_ioas_id = r.u32()?;
                let src_ioas_id = r.u32()?;
                r.reserved32("copy reserved")?;
                let length = r.u64()?;
                let dst_iova = r.u64()?;
                let src_iova = r.u64()?;
                check_range("source range", src_iova, length)?;
                if flags & MAP_FIXED_IOVA != 0 {
                    check_range("destination range", dst_iova, length)?;
                } else if dst_iova != 0 {
                    return Err(ProtoError::Reserved("dst_iova without MAP_FIXED_IOVA"));
                }
                Request::IoasCopy {
                    flags,
                    dst_ioas_id,
                    src_ioas_id,
                    length,
                    dst_iova,
                    src_iova,
                }
            }
            Opcode::IoasIovaRanges => Request::IoasIovaRanges { ioas_id: r.u32()? },
            Opcode::IoasAllowIovas => {
                let ioas_id = r.u32()?;
                let n = r.count("allowed ranges", MAX_RANGES, 16)?;
                let ranges = r.ranges(n)?;
                Request::IoasAllowIovas { ioas_id, ranges }
            }
            Opcode::DeviceInfo => Request::DeviceInfo { label: r.label()? },
            Opcode::PasidAlloc => Request::PasidAlloc { label: r.label()? },
            Opcode::RidToken => Request::RidToken { label: r.label()? },
            Opcode::RidClaim => {
                let label = r.label()?;
                let mut token = [0u8; TOKEN_LEN];
                token.copy_from_slice(r.bytes(TOKEN_LEN)?);
                Request::RidClaim { label, token }
            }
            Opcode::Attach => {
                let label = r.label()?;
                let flags = r.u32()?;
                let pasid = opt_pasid(flags, r.u32()?)?;
                let pt_id = r.u32()?;
                Request::Attach {
                    label,
                    pasid,
                    pt_id,
                }
            }
            Opcode::Detach => {
                let label = r.label()?;
                let flags = r.u32()?;
                let pasid = opt_pasid(flags, r.u32()?)?;
                Request::Detach { label, pasid }
            }
            Opcode::PasidFree => Request::PasidFree {
                label: r.label()?,
                pasid: r.u32()?,
            },
            Opcode::HwptAlloc => {
                let label = r.label()?;
                let pt_id = r.u32()?;
                let flags = r.u32()?;
                if flags & !HWPT_FLAGS_KNOWN != 0 {
                    return Err(ProtoError::BadFlags {
                        field: "hwpt flags",
                        flags,
                    });
                }
                let fault_raw = r.u32()?;
                let fault_id = if flags & HWPT_FAULT_ID_VALID != 0 {
                    Some(fault_raw)
                } else if fault_raw != 0 {
                    return Err(ProtoError::Reserved("fault_id without FAULT_ID_VALID"));
                } else {
                    None
                };
                let data_type = r.u32()?;
                let data_len = r.u32()? as usize;
                if data_len > MAX_HWPT_DATA {
                    return Err(ProtoError::TooMany {
                        what: "hwpt data bytes",
                        count: data_len,
                        max: MAX_HWPT_DATA,
                    });
                }
                let data = r.bytes(data_len)?.to_vec();
                Request::HwptAlloc {
                    label,
                    pt_id,
                    flags: flags & !HWPT_FAULT_ID_VALID,
                    fault_id,
                    data_type,
                    data,
                }
            }
            Opcode::HwptInvalidate => {
                let hwpt_id = r.u32()?;
                let data_type = r.u32()?;
                let entry_len = r.u32()?;
                let entry_num = r.u32()? as usize;
                if entry_num > MAX_INVALIDATE_ENTRIES {
                    return Err(ProtoError::TooMany {
                        what: "invalidation entries",
                        count: entry_num,
                        max: MAX_INVALIDATE_ENTRIES,
                    });
                }
                let mut entries = Vec::new();
                if entry_num > 0 {
                    let expected = match data_type {
                        INVALIDATE_DATA_STAGE1 => INVALIDATE_STAGE1_LEN,
                        INVALIDATE_DATA_VIOMMU => INVALIDATE_VIOMMU_LEN,
                        other => {
                            return Err(ProtoError::BadValue {
                                field: "invalidation data type",
                                value: u64::from(other),
                            })
                        }
                    };
                    if entry_len != expected {
                        return Err(ProtoError::BadValue {
                            field: "invalidation entry length",
                            value: u64::from(entry_len),
                        });
                    }
                    let need = entry_num * expected as usize;
                    if need > r.remaining() {
                        return Err(ProtoError::Truncated {
                            need: HEADER_SIZE + 16 + need,
                            have: HEADER_SIZE + 16 + r.remaining(),
                        });
                    }
                    entries.reserve(entry_num);
                    for _ in 0..entry_num {
                        entries.push(if data_type == INVALIDATE_DATA_STAGE1 {
                            let flags = r.u32()?;
                            r.reserved32("stage-1 entry reserved")?;
                            InvalidateEntry::Stage1 {
                                flags,
                                addr: r.u64()?,
                                npages: r.u64()?,
                            }
                        } else {
                            let vdev_id = r.u64()?;
                            let f = r.u32()?;
                            let vp = r.u32()?;
                            let vpasid = if f & INVALIDATE_VPASID_VALID != 0 {
                                Some(vp)
                            } else if vp != 0 {
                                return Err(ProtoError::Reserved("vpasid without VPASID_VALID"));
                            } else {
                                None
                            };
                            InvalidateEntry::Viommu {
                                vdev_id,
                                vpasid,
                                flags: f & !INVALIDATE_VPASID_VALID,
                                addr: r.u64()?,
                                npages: r.u64()?,
                            }
                        });
                    }
                }
                Request::HwptInvalidate {
                    hwpt_id,
                    data_type,
                    entry_len,
                    entries,
                }
            }
        };
        r.finish()?;
        Ok(req)
    }
}

/// Device information in a `DEVICE_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WireDeviceInfo {
    /// The device's id in the server context.
    pub dev_id: u32,
    /// PASID width in bits (0: no PASID).
    pub max_pasid_log2: u8,
    /// `INFO_*` bits.
    pub flags: u32,
    /// Supported page sizes bitmap.
    pub page_sizes: u64,
    /// Reserved IOVA ranges (inclusive).
    pub reserved: Vec<(u64, u64)>,
}

/// A successful reply body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    /// `HELLO`.
    Hello {
        /// This session's id (see the service docs on PASID ownership).
        session_id: u64,
        /// Server's process id.
        server_pid: u32,
    },
    /// No body.
    Empty,
    /// An object id or a PASID.
    Id(u32),
    /// An IOVA (map, copy) or a length (unmap).
    U64(u64),
    /// `IOAS_IOVA_RANGES`.
    Ranges {
        /// `out_iova_alignment`.
        alignment: u64,
        /// Inclusive ranges.
        ranges: Vec<(u64, u64)>,
    },
    /// `DEVICE_LIST`.
    Devices(Vec<String>),
    /// `DEVICE_INFO`.
    DeviceInfo(WireDeviceInfo),
    /// `RID_TOKEN`.
    Token([u8; TOKEN_LEN]),
}

/// A reply: success with a body, or an errno with its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Success.
    Ok {
        /// The body.
        body: ReplyBody,
        /// Entries done (`HWPT_INVALIDATE`), else 0.
        aux: u32,
    },
    /// Failure.
    Err {
        /// The errno (positive).
        errno: i32,
        /// Entries done (`HWPT_INVALIDATE`), else 0.
        aux: u32,
        /// What went wrong.
        message: String,
    },
}

impl Reply {
    /// Encodes a reply to `opcode` with `request_id`; `nfds` are sent beside it.
    pub fn encode(&self, opcode: u16, request_id: u64, nfds: u16) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            Reply::Err {
                errno,
                aux,
                message,
            } => {
                w.u32(*errno as u32).u32(*aux);
                w.string(message, MAX_ERROR_MESSAGE);
            }
            Reply::Ok { body, aux } => {
                w.u32(0).u32(*aux);
                match body {
                    ReplyBody::Empty => {}
                    ReplyBody::Hello {
                        session_id,
                        server_pid,
                    } => {
                        w.u64(*session_id).u32(*server_pid).u32(MAX_MESSAGE as u32);
                    }
                    ReplyBody::Id(id) => {
                        w.u32(*id);
                    }
                    ReplyBody::U64(v) => {
                        w.u64(*v);
                    }
                    ReplyBody::Token(t) => {
                        w.bytes(t);
                    }
                    ReplyBody::Ranges { alignment, ranges } => {
                        let n = ranges.len().min(MAX_RANGES);
                        w.u64(*alignment).u32(n as u32);
                        for (s, l) in &ranges[..n] {
                            w.u64(*s).u64(*l);
                        }
                    }
                    ReplyBody::Devices(labels) => {
                        let n = labels.len().min(MAX_DEVICES);
                        w.u32(n as u32);
                        for l in &labels[..n] {
                            w.string(l, MAX_LABEL);
                        }
                    }
                    ReplyBody::DeviceInfo(i) => {
                        let n = i.reserved.len().min(MAX_RESERVED);
                        w.u32(i.dev_id)
                            .u32(u32::from(i.max_pasid_log2))
                            .u32(i.flags)
                            .u32(0)
                            .u64(i.page_sizes)
                            .u32(n as u32);
                        for (s, l) in &i.reserved[..n] {
                            w.u64(*s).u64(*l);
                        }
                    }
                }
            }
        }
        w.finish(opcode, FLAG_REPLY, nfds, request_id)
    }

    /// Decodes a reply packet to a request of `opcode`, arrived with
    /// `nfds` fds.
    pub fn decode(packet: &[u8], nfds: usize, opcode: Opcode) -> Result<(Header, Reply)> {
        let h = Header::decode(packet, nfds)?;
        if h.version != PROTOCOL_VERSION {
            return Err(ProtoError::BadVersion(h.version));
        }
        if h.flags != FLAG_REPLY {
            return Err(ProtoError::Direction);
        }
        if h.opcode != opcode as u16 {
            return Err(ProtoError::BadValue {
                field: "reply opcode",
                value: u64::from(h.opcode),
            });
        }
        let mut r = Reader::new(&packet[HEADER_SIZE..]);
        let errno = r.u32()?;
        let aux = r.u32()?;
        if errno != 0 {
            let n = usize::from(r.u16()?);
            if n > MAX_ERROR_MESSAGE {
                return Err(ProtoError::TooMany {
                    what: "error message bytes",
                    count: n,
                    max: MAX_ERROR_MESSAGE,
                });
            }
            let message = String::from_utf8_lossy(r.bytes(n)?).into_owned();
            r.finish()?;
            if nfds != 0 {
                return Err(ProtoError::FdCount {
                    expected: 0,
                    got: nfds,
                });
            }
            return Ok((
                h,
                Reply::Err {
                    errno: errno as i32,
                    aux,
                    message,
                },
            ));
        }
        if nfds != opcode.reply_fds() {
            return Err(ProtoError::FdCount {
                expected: opcode.reply_fds(),
                got: nfds,
            });
        }
        let body = match opcode {
            Opcode::Hello => {
                let session_id = r.u64()?;
                let server_pid = r.u32()?;
                let _max = r.u32()?;
                ReplyBody::Hello {
                    session_id,
                    server_pid,
                }
            }
            Opcode::Destroy
            | Opcode::IoasAllowIovas
            | Opcode::Detach
            | Opcode::PasidFree
            | Opcode::HwptInvalidate
            | Opcode::RidClaim => ReplyBody::Empty,
            Opcode::RidToken => {
                let mut t = [0u8; TOKEN_LEN];
                t.copy_from_slice(r.bytes(TOKEN_LEN)?);
                ReplyBody::Token(t)
            }
            Opcode::IoasAlloc
            | Opcode::Attach
            | Opcode::PasidAlloc
            | Opcode::HwptAlloc
            | Opcode::FaultQueueAlloc => ReplyBody::Id(r.u32()?),
            Opcode::IoasMap | Opcode::IoasUnmap | Opcode::IoasCopy => ReplyBody::U64(r.u64()?),
            Opcode::IoasIovaRanges => {
                let alignment = r.u64()?;
                let n = r.count("iova ranges", MAX_RANGES, 16)?;
                ReplyBody::Ranges {
                    alignment,
                    ranges: r.ranges(n)?,
                }
            }
            Opcode::DeviceList => {
                let n = r.count("devices", MAX_DEVICES, 3)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(r.label()?);
                }
                ReplyBody::Devices(v)
            }
            Opcode::DeviceInfo => {
                let dev_id = r.u32()?;
                let pasid_bits = r.u32()?;
                let max_pasid_log2 =
                    u8::try_from(pasid_bits).map_err(|_| ProtoError::BadValue {
                        field: "max_pasid_log2",
                        value: u64::from(pasid_bits),
                    })?;
                let flags = r.u32()?;
                r.reserved32("device info reserved")?;
                let page_sizes = r.u64()?;
                let n = r.count("reserved ranges", MAX_RESERVED, 16)?;
                ReplyBody::DeviceInfo(WireDeviceInfo {
                    dev_id,
                    max_pasid_log2,
                    flags,
                    page_sizes,
                    reserved: r.ranges(n)?,
                })
            }
        };
        r.finish()?;
        Ok((h, Reply::Ok { body, aux }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(req: Request) {
        let b = req.encode(42);
        let nfds = req.opcode().request_fds();
        let (h, got) = Request::decode(&b, nfds).expect("decode");
        assert_eq!(h.request_id, 42);
        assert_eq!(got, req);
    }

    #[test]
    fn test_requests_roundtrip() {
        roundtrip(Request::Hello);
        roundtrip(Request::IoasAlloc);
        roundtrip(Request::FaultQueueAlloc);
        roundtrip(Request::Destroy { id: 7 });
        roundtrip(Request::IoasMap {
            flags: MAP_FIXED_IOVA | MAP_READABLE,
            ioas_id: 1,
            offset: 4096,
            length: 8192,
            iova: 0x10000,
        });
        roundtrip(Request::IoasUnmap {
            ioas_id: 1,
            iova: 0,
            length: u64::MAX,
        });
        roundtrip(Request::IoasAllowIovas {
            ioas_id: 1,
            ranges: vec![(0x1000, 0x1fff), (0x10000, 0xfffff)],
        });
        roundtrip(Request::Attach {
            label: "net0".into(),
            pasid: Some(5),
            pt_id: 3,
        });
        roundtrip(Request::Detach {
            label: "net0".into(),
            pasid: None,
        });
        roundtrip(Request::HwptAlloc {
            label: "acc".into(),
            pt_id: 2,
            flags: 8,
            fault_id: Some(9),
            data_type: HWPT_DATA_NONE,
            data: vec![],
        });
        roundtrip(Request::HwptInvalidate {
            hwpt_id: 4,
            data_type: INVALIDATE_DATA_VIOMMU,
            entry_len: INVALIDATE_VIOMMU_LEN,
            entries: vec![InvalidateEntry::Viommu {
                vdev_id: 1,
                vpasid: Some(3),
                flags: 1,
                addr: 0x1000,
                npages: 1,
            }],
        });
    }

    #[test]
    fn test_bad_version_magic_and_length() {
        let mut b = Request::IoasAlloc.encode(1);
        b[4] = 9;
        let (h, e) = Request::decode(&b, 0).expect_err("must fail");
        assert_eq!(h.map(|h| h.request_id), Some(1));
        assert_eq!(e.errno(), libc::EPROTONOSUPPORT);
        let mut b = Request::IoasAlloc.encode(1);
        b[0] = 0;
        assert_eq!(
            Request::decode(&b, 0).expect_err("must fail").1.errno(),
            libc::EPROTO
        );
        let b = Request::Destroy { id: 1 }.encode(1);
        assert!(matches!(
            Request::decode(&b[..b.len() - 1], 0)
                .expect_err("must fail")
                .1,
            ProtoError::LengthMismatch { .. }
        ));
        assert!(matches!(
            Request::decode(&b[..10], 0).expect_err("must fail").1,
            ProtoError::Truncated { .. }
        ));
    }

    #[test]
    fn test_truncated_body_is_einval_and_trailing_is_e2big() {
        let mut b = Request::Destroy { id: 1 }.encode(1);
        b.truncate(HEADER_SIZE + 2);
        b[8..12].copy_from_slice(&((HEADER_SIZE + 2) as u32).to_le_bytes());
        assert_eq!(
            Request::decode(&b, 0).expect_err("must fail").1.errno(),
            libc::EINVAL
        );
        let mut b = Request::Destroy { id: 1 }.encode(1);
        b.extend_from_slice(&[1, 2]);
        let len = b.len() as u32;
        b[8..12].copy_from_slice(&len.to_le_bytes());
        assert_eq!(
            Request::decode(&b, 0).expect_err("must fail").1.errno(),
            libc::E2BIG
        );
    }

    #[test]
    fn test_fd_count_must_match_opcode() {
        let b = Request::IoasMap {
            flags: MAP_READABLE,
            ioas_id: 1,
            offset: 0,
            length: 4096,
            iova: 0,
        }
        .encode(1);
        // Header says 1 fd, none arrived.
        assert_eq!(
            Request::decode(&b, 0).expect_err("must fail").1.errno(),
            libc::EBADF
        );
        // An fd on a request that takes none.
        let mut b = Request::IoasAlloc.encode(1);
        b[12] = 1;
        assert_eq!(
            Request::decode(&b, 1).expect_err("must fail").1.errno(),
            libc::EBADF
        );
    }

    #[test]
    fn test_overflowing_ranges_are_eoverflow() {
        let b = Request::IoasMap {
            flags: MAP_READABLE | MAP_FIXED_IOVA,
            ioas_id: 1,
            offset: 0,
            length: 0x2000,
            iova: u64::MAX - 0x1000,
        }
        .encode(1);
        assert_eq!(
            Request::decode(&b, 1).expect_err("must fail").1.errno(),
            libc::EOVERFLOW
        );
        let b = Request::IoasMap {
            flags: MAP_READABLE,
            ioas_id: 1,
            offset: u64::MAX,
            length: 2,
            iova: 0,
        }
        .encode(1);
        assert_eq!(
            Request::decode(&b, 1).expect_err("must fail").1.errno(),
            libc::EOVERFLOW
        );
        let b = Request::IoasUnmap {
            ioas_id: 1,
            iova: 2,
            length: u64::MAX,
        }
        .encode(1);
        assert_eq!(
            Request::decode(&b, 0).expect_err("must fail").1.errno(),
            libc::EOVERFLOW
        );
    }

    #[test]
    fn test_unknown_flags_and_counts() {
        let b = Request::IoasMap {
            flags: 0x100,
            ioas_id: 1,
            offset: 0,
            length: 1,
            iova: 0,
        }
        .encode(1);
        assert_eq!(
            Request::decode(&b, 1).expect_err("must fail").1.errno(),
            libc::EOPNOTSUPP
        );
        let mut w = Writer::new();
        w.u32(1).u32(u32::MAX);
        let b = w.finish(Opcode::IoasAllowIovas as u16, 0, 0, 1);
        assert!(matches!(
            Request::decode(&b, 0).expect_err("must fail").1,
            ProtoError::TooMany { .. }
        ));
        let mut w = Writer::new();
        w.u32(1).u32(5);
        let b = w.finish(Opcode::IoasAllowIovas as u16, 0, 0, 1);
        assert!(matches!(
            Request::decode(&b, 0).expect_err("must fail").1,
            ProtoError::Truncated { .. }
        ));
        let b = Writer::new().finish(999, 0, 0, 1);
        assert_eq!(
            Request::decode(&b, 0).expect_err("must fail").1.errno(),
            libc::ENOTTY
        );
    }

    #[test]
    fn test_labels_are_bounded() {
        let b = Request::DeviceInfo {
            label: "x".repeat(MAX_LABEL + 1),
        }
        .encode(1);
        assert!(matches!(
            Request::decode(&b, 0).expect_err("must fail").1,
            ProtoError::BadLabel(_)
        ));
        let mut w = Writer::new();
        w.u16(0);
        let b = w.finish(Opcode::DeviceInfo as u16, 0, 0, 1);
        assert!(Request::decode(&b, 0).is_err());
        let mut w = Writer::new();
        w.u16(2).bytes(&[0xff, 0xfe]);
        let b = w.finish(Opcode::DeviceInfo as u16, 0, 0, 1);
        assert!(matches!(
            Request::decode(&b, 0).expect_err("must fail").1,
            ProtoError::BadLabel("not UTF-8")
        ));
    }

    #[test]
    fn test_replies_roundtrip() {
        let cases = [
            (Opcode::IoasAlloc, ReplyBody::Id(3)),
            (Opcode::IoasMap, ReplyBody::U64(0x4000)),
            (Opcode::Destroy, ReplyBody::Empty),
            (
                Opcode::IoasIovaRanges,
                ReplyBody::Ranges {
                    alignment: 4096,
                    ranges: vec![(0, 0xfedfffff), (0xfef00000, u64::MAX)],
                },
            ),
            (
                Opcode::DeviceList,
                ReplyBody::Devices(vec!["a".into(), "net0".into()]),
            ),
            (
                Opcode::DeviceInfo,
                ReplyBody::DeviceInfo(WireDeviceInfo {
                    dev_id: 1,
                    max_pasid_log2: 20,
                    flags: INFO_IOPF,
                    page_sizes: 4096,
                    reserved: vec![(0xfee00000, 0xfeefffff)],
                }),
            ),
            (
                Opcode::Hello,
                ReplyBody::Hello {
                    session_id: 77,
                    server_pid: 5,
                },
            ),
        ];
        for (op, body) in cases {
            let r = Reply::Ok { body, aux: 0 };
            let b = r.encode(op as u16, 9, 0);
            let (h, got) = Reply::decode(&b, 0, op).expect("decode reply");
            assert_eq!(h.request_id, 9);
            assert_eq!(got, r);
        }
        let r = Reply::Err {
            errno: libc::EBUSY,
            aux: 1,
            message: "busy".into(),
        };
        let b = r.encode(Opcode::HwptInvalidate as u16, 2, 0);
        assert_eq!(
            Reply::decode(&b, 0, Opcode::HwptInvalidate)
                .expect("decode")
                .1,
            r
        );
    }
}
