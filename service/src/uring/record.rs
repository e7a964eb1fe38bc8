//! Wire layouts of the fault channel: fault records, page responses and
//! status packets.
//!
//! A record and a response are iommu-core's own [`FaultRecord`] and
//! [`PageResponse`], encoded and decoded here (one type per concept, from
//! the fault queue to the consumer); only the status packet
//! ([`Rejection`]) is the channel's.
//!
//! The layouts are those of iommufd's fault queue fd, little-endian:
//!
//! `struct iommu_hwpt_pgfault`, 40 bytes, server to consumer:
//!
//! | offset | size | field | meaning |
//! | --- | --- | --- | --- |
//! | 0 | 4 | `flags` | [`FAULT_FLAG_PASID_VALID`], [`FAULT_FLAG_LAST_PAGE`], [`FAULT_FLAG_VIRTUAL_IDS`] |
//! | 4 | 4 | `dev_id` | id of the faulting device (virtual where one exists) |
//! | 8 | 4 | `pasid` | valid only with [`FAULT_FLAG_PASID_VALID`] |
//! | 12 | 4 | `grpid` | page request group index |
//! | 16 | 4 | `perm` | [`FAULT_PERM_READ`], [`FAULT_PERM_WRITE`], [`FAULT_PERM_EXEC`], [`FAULT_PERM_PRIV`] |
//! | 20 | 4 | `__reserved` | zero |
//! | 24 | 8 | `addr` | faulting address |
//! | 32 | 4 | `length` | prefetch hint (0 today) |
//! | 36 | 4 | `cookie` | the same for every record of one group |
//!
//! `struct iommu_hwpt_page_response`, 8 bytes, consumer to server:
//!
//! | offset | size | field | meaning |
//! | --- | --- | --- | --- |
//! | 0 | 4 | `cookie` | the group being answered |
//! | 4 | 4 | `code` | [`PAGE_RESP_SUCCESS`] or [`PAGE_RESP_INVALID`] |
//!
//! The channel adds one packet kind iommufd reports through `write(2)`'s
//! return value instead: a 16-byte status packet, server to consumer, saying
//! that a response was refused (unknown or already answered cookie, bad
//! code). Its length is never a multiple of 40, so a packet is a status
//! packet exactly when it is 16 bytes long:
//!
//! | offset | size | field | meaning |
//! | --- | --- | --- | --- |
//! | 0 | 4 | `magic` | [`STATUS_MAGIC`] |
//! | 4 | 4 | `cookie` | the cookie of the refused response |
//! | 8 | 4 | `errno` | why it was refused (`EINVAL` as iommufd) |
//! | 12 | 4 | `code` | the response code that was sent |

pub use iommu_core::{FaultRecord, PageResponse, PageResponseCode, Perm};
use thiserror::Error;

use crate::sys::le::{LeReader, Short};

/// Size of one fault record on the wire.
pub const FAULT_RECORD_SIZE: usize = 40;
/// Size of one page response on the wire.
pub const PAGE_RESPONSE_SIZE: usize = 8;
/// Size of a status packet.
pub const STATUS_PACKET_SIZE: usize = 16;
/// First word of a status packet ("FSTA" little-endian).
pub const STATUS_MAGIC: u32 = 0x4154_5346;

/// Record flag: the `pasid` field is valid.
pub const FAULT_FLAG_PASID_VALID: u32 = iommu_core::IOMMU_PGFAULT_FLAGS_PASID_VALID;
/// Record flag: last record of its group.
pub const FAULT_FLAG_LAST_PAGE: u32 = iommu_core::IOMMU_PGFAULT_FLAGS_LAST_PAGE;
/// Record flag (ioasis extension): `dev_id` is the device's virtual id and
/// `pasid` the virtual PASID where one is mapped.
pub const FAULT_FLAG_VIRTUAL_IDS: u32 = iommu_core::IOMMU_PGFAULT_FLAGS_VIRTUAL_IDS;
/// Every record flag this version knows.
pub const FAULT_FLAGS_KNOWN: u32 =
    FAULT_FLAG_PASID_VALID | FAULT_FLAG_LAST_PAGE | FAULT_FLAG_VIRTUAL_IDS;

/// Permission bit: read access faulted.
pub const FAULT_PERM_READ: u32 = Perm::READ.bits();
/// Permission bit: write access faulted.
pub const FAULT_PERM_WRITE: u32 = Perm::WRITE.bits();
/// Permission bit: execute access faulted.
pub const FAULT_PERM_EXEC: u32 = Perm::EXEC.bits();
/// Permission bit: privileged access faulted.
pub const FAULT_PERM_PRIV: u32 = Perm::PRIV.bits();

/// Response code: the fault was handled, retry the access.
pub const PAGE_RESP_SUCCESS: u32 = PageResponseCode::Success as u32;
/// Response code: the fault cannot be handled; do not retry.
pub const PAGE_RESP_INVALID: u32 = PageResponseCode::Invalid as u32;

/// A fault record failed to decode.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecordError {
    /// A packet's length is not a whole number of records.
    #[error("packet of {len} bytes is not a whole number of {unit}-byte entries")]
    BadLength {
        /// Packet length.
        len: usize,
        /// Entry size expected.
        unit: usize,
    },
    /// A record's reserved word is not zero.
    #[error("fault record {index} has reserved word {value:#x}")]
    Reserved {
        /// Index of the record in its packet.
        index: usize,
        /// The reserved word.
        value: u32,
    },
    /// A record carries unknown flags.
    #[error("fault record {index} has unknown flags {flags:#x}")]
    UnknownFlags {
        /// Index of the record in its packet.
        index: usize,
        /// The flags.
        flags: u32,
    },
    /// A response code is neither SUCCESS nor INVALID.
    #[error("page response {index} has unknown code {code}")]
    BadCode {
        /// Index of the response in its packet.
        index: usize,
        /// The code.
        code: u32,
    },
    /// A status packet lacks its magic.
    #[error("status packet has magic {magic:#x}")]
    BadStatusMagic {
        /// The magic found.
        magic: u32,
    },
}

impl RecordError {
    /// The errno iommufd returns for this condition.
    pub fn errno(&self) -> i32 {
        match self {
            RecordError::BadLength { .. } => libc::ESPIPE,
            RecordError::Reserved { .. } | RecordError::UnknownFlags { .. } => libc::EOPNOTSUPP,
            RecordError::BadCode { .. } | RecordError::BadStatusMagic { .. } => libc::EINVAL,
        }
    }
}

/// A reader over one fixed-size entry; running short is a length error of
/// entries of `unit` bytes (which a caller that checked lengths never sees).
fn entry(b: &[u8], unit: usize) -> (LeReader<'_>, impl Fn(Short) -> RecordError) {
    let len = b.len();
    (LeReader::new(b), move |_| RecordError::BadLength {
        len,
        unit,
    })
}

/// Encodes `r` into its 40-byte wire form. A device id wider than the
/// wire's 32 bits is sent as `u32::MAX`.
pub fn encode_record(r: &FaultRecord, out: &mut [u8; FAULT_RECORD_SIZE]) {
    let dev_id = u32::try_from(r.dev_id).unwrap_or(u32::MAX);
    out[0..4].copy_from_slice(&r.flags.to_le_bytes());
    out[4..8].copy_from_slice(&dev_id.to_le_bytes());
    out[8..12].copy_from_slice(&r.pasid.to_le_bytes());
    out[12..16].copy_from_slice(&r.grpid.to_le_bytes());
    out[16..20].copy_from_slice(&r.perm.bits().to_le_bytes());
    out[20..24].copy_from_slice(&0u32.to_le_bytes());
    out[24..32].copy_from_slice(&r.addr.to_le_bytes());
    out[32..36].copy_from_slice(&r.length.to_le_bytes());
    out[36..40].copy_from_slice(&r.cookie.to_le_bytes());
}

/// Decodes one record; `index` only labels errors.
pub fn decode_record(
    b: &[u8; FAULT_RECORD_SIZE],
    index: usize,
) -> Result<FaultRecord, RecordError> {
    let (mut r, short) = entry(b, FAULT_RECORD_SIZE);
    let flags = r.u32().map_err(&short)?;
    if flags & !FAULT_FLAGS_KNOWN != 0 {
        return Err(RecordError::UnknownFlags { index, flags });
    }
    let dev_id = u64::from(r.u32().map_err(&short)?);
    let pasid = r.u32().map_err(&short)?;
    let grpid = r.u32().map_err(&short)?;
    let perm = Perm::from_bits_retain(r.u32().map_err(&short)?);
    let reserved = r.u32().map_err(&short)?;
    if reserved != 0 {
        return Err(RecordError::Reserved {
            index,
            value: reserved,
        });
    }
    Ok(FaultRecord {
        flags,
        dev_id,
        pasid,
        grpid,
        perm,
        addr: r.u64().map_err(&short)?,
        length: r.u32().map_err(&short)?,
        cookie: r.u32().map_err(&short)?,
    })
}

/// Decodes a packet of records, appending them to `out`. On error nothing
/// is appended.
pub fn decode_records(packet: &[u8], out: &mut Vec<FaultRecord>) -> Result<usize, RecordError> {
    if packet.is_empty() || packet.len() % FAULT_RECORD_SIZE != 0 {
        return Err(RecordError::BadLength {
            len: packet.len(),
            unit: FAULT_RECORD_SIZE,
        });
    }
    let start = out.len();
    for (index, chunk) in packet.chunks_exact(FAULT_RECORD_SIZE).enumerate() {
        let mut rec = [0u8; FAULT_RECORD_SIZE];
        rec.copy_from_slice(chunk);
        match decode_record(&rec, index) {
            Ok(r) => out.push(r),
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        }
    }
    Ok(out.len() - start)
}

/// Encodes `r` into the 8-byte wire form.
pub fn encode_response(r: &PageResponse, out: &mut [u8; PAGE_RESPONSE_SIZE]) {
    out[0..4].copy_from_slice(&r.cookie.to_le_bytes());
    out[4..8].copy_from_slice(&(r.code as u32).to_le_bytes());
}

/// Decodes a packet of responses, appending them to `out`. A response
/// with an unknown code is an error and nothing is appended.
pub fn decode_responses(packet: &[u8], out: &mut Vec<PageResponse>) -> Result<usize, RecordError> {
    if packet.is_empty() || packet.len() % PAGE_RESPONSE_SIZE != 0 {
        return Err(RecordError::BadLength {
            len: packet.len(),
            unit: PAGE_RESPONSE_SIZE,
        });
    }
    let start = out.len();
    for (index, chunk) in packet.chunks_exact(PAGE_RESPONSE_SIZE).enumerate() {
        let (mut r, short) = entry(chunk, PAGE_RESPONSE_SIZE);
        let cookie = r.u32().map_err(&short)?;
        let code = r.u32().map_err(&short)?;
        let Ok(code) = PageResponseCode::try_from(code) else {
            out.truncate(start);
            return Err(RecordError::BadCode { index, code });
        };
        out.push(PageResponse { cookie, code });
    }
    Ok(out.len() - start)
}

/// A response the server refused, reported back on the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// Cookie of the refused response.
    pub cookie: u32,
    /// The response code that was sent.
    pub code: u32,
    /// Why it was refused (`EINVAL` for an unknown or answered cookie).
    pub errno: i32,
}

impl Rejection {
    /// Encodes into the 16-byte status packet.
    pub fn encode(&self) -> [u8; STATUS_PACKET_SIZE] {
        let mut out = [0u8; STATUS_PACKET_SIZE];
        out[0..4].copy_from_slice(&STATUS_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.cookie.to_le_bytes());
        out[8..12].copy_from_slice(&(self.errno as u32).to_le_bytes());
        out[12..16].copy_from_slice(&self.code.to_le_bytes());
        out
    }

    /// Decodes a 16-byte status packet.
    pub fn decode(b: &[u8]) -> Result<Self, RecordError> {
        if b.len() != STATUS_PACKET_SIZE {
            return Err(RecordError::BadLength {
                len: b.len(),
                unit: STATUS_PACKET_SIZE,
            });
        }
        let (mut r, short) = entry(b, STATUS_PACKET_SIZE);
        let magic = r.u32().map_err(&short)?;
        if magic != STATUS_MAGIC {
            return Err(RecordError::BadStatusMagic { magic });
        }
        Ok(Rejection {
            cookie: r.u32().map_err(&short)?,
            errno: r.i32().map_err(&short)?,
            code: r.u32().map_err(&short)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_record_layout_offsets() {
        let r = FaultRecord {
            flags: FAULT_FLAG_LAST_PAGE | FAULT_FLAG_PASID_VALID,
            dev_id: 0x11,
            pasid: 0x22,
            grpid: 0x33,
            perm: Perm::WRITE,
            addr: 0x1122_3344_5566_7788,
            length: 0x44,
            cookie: 0x55,
        };
        let mut b = [0u8; FAULT_RECORD_SIZE];
        encode_record(&r, &mut b);
        assert_eq!(b[4], 0x11);
        assert_eq!(b[8], 0x22);
        assert_eq!(b[12], 0x33);
        assert_eq!(b[16], 2);
        assert_eq!(&b[20..24], &[0; 4]);
        assert_eq!(b[24], 0x88);
        assert_eq!(b[31], 0x11);
        assert_eq!(b[32], 0x44);
        assert_eq!(b[36], 0x55);
        assert_eq!(decode_record(&b, 0), Ok(r));
        assert!(r.is_last());
        assert_eq!(r.pasid(), Some(0x22));
    }

    #[test]
    fn test_record_rejects_reserved_and_flags() {
        let mut b = [0u8; FAULT_RECORD_SIZE];
        b[20] = 1;
        assert!(matches!(
            decode_record(&b, 3),
            Err(RecordError::Reserved { index: 3, .. })
        ));
        let mut b = [0u8; FAULT_RECORD_SIZE];
        b[0] = 0x80;
        assert_eq!(
            decode_record(&b, 0).map_err(|e| e.errno()),
            Err(libc::EOPNOTSUPP)
        );
    }

    #[test]
    fn test_packet_length_must_be_whole_records() {
        let mut out = Vec::new();
        let e = decode_records(&[0u8; 41], &mut out).expect_err("must fail");
        assert_eq!(e.errno(), libc::ESPIPE);
        assert!(decode_records(&[], &mut out).is_err());
        assert_eq!(decode_records(&[0u8; 80], &mut out), Ok(2));
    }

    #[test]
    fn test_response_codes() {
        let mut b = [0u8; PAGE_RESPONSE_SIZE];
        encode_response(&PageResponse::invalid(9), &mut b);
        let mut out = Vec::new();
        assert_eq!(decode_responses(&b, &mut out), Ok(1));
        assert_eq!(out[0], PageResponse::invalid(9));
        b[4] = 2;
        assert!(matches!(
            decode_responses(&b, &mut out),
            Err(RecordError::BadCode { code: 2, .. })
        ));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn test_status_packet_roundtrip() {
        let r = Rejection {
            cookie: 7,
            code: 0,
            errno: libc::EINVAL,
        };
        assert_eq!(Rejection::decode(&r.encode()), Ok(r));
        assert!(Rejection::decode(&[0u8; 16]).is_err());
        assert_ne!(STATUS_PACKET_SIZE % FAULT_RECORD_SIZE, 0);
    }
}
