//! virtio-blk requests: the header and segment layouts, and the checks
//! every request passes before any I/O (pure functions, unit-tested).
//!
//! A request whose type the device does not know or did not negotiate gets
//! `VIRTIO_BLK_S_UNSUPP`; one that is malformed (short header, data in the
//! wrong direction, a length that is not a whole number of sectors), out of
//! range (past the capacity, or overflowing), too large (more bytes or
//! segments than the config space allows) or a write to a read-only disk
//! gets `VIRTIO_BLK_S_IOERR`. The caller counts and logs the [`Reject`]
//! (rate-limited); nothing here panics on driver input.

use vm_memory::ByteValued;

use crate::config::SECTOR_SIZE;

/// `VIRTIO_BLK_T_IN`: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`: the serial, 20 bytes.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// `VIRTIO_BLK_T_DISCARD`.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// `VIRTIO_BLK_S_OK`.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Bytes of a GET_ID answer.
pub const ID_BYTES: usize = 20;

/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const FLAG_UNMAP: u32 = 1;

/// `struct virtio_blk_outhdr` (little-endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkHeader {
    /// `VIRTIO_BLK_T_*`.
    pub kind: u32,
    /// I/O priority (ignored).
    pub ioprio: u32,
    /// Offset in 512-byte sectors.
    pub sector: u64,
}

// SAFETY: plain integers, no padding (4 + 4 + 8), any bit pattern is valid.
unsafe impl ByteValued for BlkHeader {}

/// `struct virtio_blk_discard_write_zeroes` (little-endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroSegment {
    /// First sector.
    pub sector: u64,
    /// Sectors.
    pub num_sectors: u32,
    /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP` or 0.
    pub flags: u32,
}

// SAFETY: plain integers, no padding (8 + 4 + 4), any bit pattern is valid.
unsafe impl ByteValued for ZeroSegment {}

/// Bytes of one discard / write-zeroes segment.
pub const SEGMENT_BYTES: u64 = std::mem::size_of::<ZeroSegment>() as u64;

/// What the checks compare a request with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in sectors.
    pub capacity: u64,
    /// Writes, discards and write-zeroes fail.
    pub read_only: bool,
    /// Largest read or write in bytes.
    pub max_bytes: u64,
    /// Most descriptors a request may have (data segments + header + status).
    pub max_descriptors: usize,
    /// Most discard / write-zeroes segments per request.
    pub max_zero_segments: u64,
    /// Largest discard / write-zeroes segment in sectors.
    pub max_zero_sectors: u64,
    /// The driver negotiated `VIRTIO_BLK_F_DISCARD`.
    pub discard: bool,
    /// The driver negotiated `VIRTIO_BLK_F_WRITE_ZEROES`.
    pub write_zeroes: bool,
    /// The driver negotiated `VIRTIO_BLK_F_FLUSH`.
    pub flush: bool,
}

/// A request that passed the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at byte `offset` into the writable data.
    Read {
        /// Byte offset in the disk.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Write the readable data, `len` bytes, at byte `offset`.
    Write {
        /// Byte offset in the disk.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Make previous writes durable.
    Flush,
    /// Answer the serial.
    GetId,
    /// Discard `segments` ranges (read next, checked with [`check_segment`]).
    Discard {
        /// Segments in the request.
        segments: u64,
    },
    /// Zero `segments` ranges.
    WriteZeroes {
        /// Segments in the request.
        segments: u64,
    },
}

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// Unknown or not negotiated request type.
    #[error("request type {0} not supported")]
    Unsupported(u32),
    /// A discard or write-zeroes flag the device does not support.
    #[error("flags {flags:#x} not supported for request type {kind}")]
    UnsupportedFlags {
        /// Request type.
        kind: u32,
        /// The flags.
        flags: u32,
    },
    /// The chain does not have the request's shape.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The range leaves the disk.
    #[error("sectors {sector}+{sectors} beyond the capacity of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors.
        sectors: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// More bytes or segments than the device allows.
    #[error("request too large: {what} {got} above {max}")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// The request's value.
        got: u64,
        /// The limit.
        max: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk (request type {0})")]
    ReadOnly(u32),
}

impl Reject {
    /// The status the request completes with.
    pub fn status(&self) -> u8 {
        match self {
            Reject::Unsupported(_) | Reject::UnsupportedFlags { .. } => VIRTIO_BLK_S_UNSUPP,
            Reject::Malformed(_)
            | Reject::OutOfRange { .. }
            | Reject::TooLarge { .. }
            | Reject::ReadOnly(_) => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// Checks a request: its header, the readable bytes after the header, the
/// writable bytes before the status byte, and its descriptor count.
pub fn classify(
    hdr: &BlkHeader,
    readable: u64,
    writable: u64,
    descriptors: usize,
    l: &Limits,
) -> Result<Op, Reject> {
    let kind = u32::from_le(hdr.kind);
    let sector = u64::from_le(hdr.sector);
    if descriptors > l.max_descriptors {
        return Err(Reject::TooLarge {
            what: "descriptors",
            got: descriptors as u64,
            max: l.max_descriptors as u64,
        });
    }
    match kind {
        VIRTIO_BLK_T_IN => {
            if readable != 0 {
                return Err(Reject::Malformed("device-readable data in a read"));
            }
            let offset = check_range(sector, writable, l)?;
            Ok(Op::Read {
                offset,
                len: writable,
            })
        }
        VIRTIO_BLK_T_OUT => {
            if writable != 0 {
                return Err(Reject::Malformed("device-writable data in a write"));
            }
            if l.read_only {
                return Err(Reject::ReadOnly(kind));
            }
            let offset = check_range(sector, readable, l)?;
            Ok(Op::Write {
                offset,
                len: readable,
            })
        }
        VIRTIO_BLK_T_FLUSH if l.flush => Ok(Op::Flush),
        VIRTIO_BLK_T_GET_ID => {
            if writable == 0 {
                return Err(Reject::Malformed("no room for the id"));
            }
            Ok(Op::GetId)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let negotiated = if kind == VIRTIO_BLK_T_DISCARD {
                l.discard
            } else {
                l.write_zeroes
            };
            if !negotiated {
                return Err(Reject::Unsupported(kind));
            }
            if l.read_only {
                return Err(Reject::ReadOnly(kind));
            }
            if readable == 0 || readable % SEGMENT_BYTES != 0 {
                return Err(Reject::Malformed(
                    "segment list not a whole number of segments",
                ));
            }
            let segments = readable / SEGMENT_BYTES;
            if segments > l.max_zero_segments {
                return Err(Reject::TooLarge {
                    what: "segments",
                    got: segments,
                    max: l.max_zero_segments,
                });
            }
            Ok(if kind == VIRTIO_BLK_T_DISCARD {
                Op::Discard { segments }
            } else {
                Op::WriteZeroes { segments }
            })
        }
        _ => Err(Reject::Unsupported(kind)),
    }
}

/// Checks a read or write of `len` bytes at `sector`; returns the byte
/// offset.
fn check_range(sector: u64, len: u64, l: &Limits) -> Result<u64, Reject> {
    if len % SECTOR_SIZE != 0 {
        return Err(Reject::Malformed("data length not a multiple of 512"));
    }
    if len > l.max_bytes {
        return Err(Reject::TooLarge {
            what: "bytes",
            got: len,
            max: l.max_bytes,
        });
    }
    let sectors = len / SECTOR_SIZE;
    in_disk(sector, sectors, l.capacity)?;
    // sector + sectors <= capacity, so no overflow.
    Ok(sector * SECTOR_SIZE)
}

fn in_disk(sector: u64, sectors: u64, capacity: u64) -> Result<(), Reject> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(Reject::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

/// A discard / write-zeroes range in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroRange {
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Deallocate (write-zeroes with the unmap flag, or a discard).
    pub unmap: bool,
}

/// Checks one segment of a discard (`discard`) or write-zeroes request.
pub fn check_segment(seg: &ZeroSegment, discard: bool, l: &Limits) -> Result<ZeroRange, Reject> {
    let kind = if discard {
        VIRTIO_BLK_T_DISCARD
    } else {
        VIRTIO_BLK_T_WRITE_ZEROES
    };
    let sector = u64::from_le(seg.sector);
    let sectors = u64::from(u32::from_le(seg.num_sectors));
    let flags = u32::from_le(seg.flags);
    let allowed = if discard { 0 } else { FLAG_UNMAP };
    if flags & !allowed != 0 {
        return Err(Reject::UnsupportedFlags { kind, flags });
    }
    if sectors > l.max_zero_sectors {
        return Err(Reject::TooLarge {
            what: "sectors",
            got: sectors,
            max: l.max_zero_sectors,
        });
    }
    in_disk(sector, sectors, l.capacity)?;
    Ok(ZeroRange {
        offset: sector * SECTOR_SIZE,
        len: sectors * SECTOR_SIZE,
        unmap: discard || flags & FLAG_UNMAP != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            capacity: 2048,
            read_only: false,
            max_bytes: 1 << 20,
            max_descriptors: 10,
            max_zero_segments: 1,
            max_zero_sectors: 1024,
            discard: true,
            write_zeroes: true,
            flush: true,
        }
    }

    fn hdr(kind: u32, sector: u64) -> BlkHeader {
        BlkHeader {
            kind: kind.to_le(),
            ioprio: 0,
            sector: sector.to_le(),
        }
    }

    #[test]
    fn test_reads_and_writes_in_range() {
        let l = limits();
        assert_eq!(
            classify(&hdr(VIRTIO_BLK_T_IN, 8), 0, 4096, 3, &l),
            Ok(Op::Read {
                offset: 4096,
                len: 4096
            })
        );
        assert_eq!(
            classify(&hdr(VIRTIO_BLK_T_OUT, 2040), 4096, 0, 3, &l),
            Ok(Op::Write {
                offset: 2040 * 512,
                len: 4096
            })
        );
        // The last sector, and nothing past it.
        assert!(classify(&hdr(VIRTIO_BLK_T_IN, 2047), 0, 512, 3, &l).is_ok());
        let e = classify(&hdr(VIRTIO_BLK_T_IN, 2047), 0, 1024, 3, &l).expect_err("past end");
        assert!(matches!(e, Reject::OutOfRange { .. }));
        assert_eq!(e.status(), VIRTIO_BLK_S_IOERR);
        // Overflowing sector numbers.
        assert!(matches!(
            classify(&hdr(VIRTIO_BLK_T_IN, u64::MAX), 0, 512, 3, &l),
            Err(Reject::OutOfRange { .. })
        ));
        assert!(matches!(
            classify(&hdr(VIRTIO_BLK_T_OUT, u64::MAX / 512), 512, 0, 3, &l),
            Err(Reject::OutOfRange { .. })
        ));
    }

    #[test]
    fn test_malformed_and_too_large() {
        let l = limits();
        let cases = [
            classify(&hdr(VIRTIO_BLK_T_IN, 0), 0, 100, 3, &l),
            classify(&hdr(VIRTIO_BLK_T_IN, 0), 512, 512, 3, &l),
            classify(&hdr(VIRTIO_BLK_T_OUT, 0), 512, 512, 3, &l),
            classify(&hdr(VIRTIO_BLK_T_GET_ID, 0), 0, 0, 2, &l),
            classify(&hdr(VIRTIO_BLK_T_IN, 0), 0, 2 << 20, 3, &l),
            classify(&hdr(VIRTIO_BLK_T_IN, 0), 0, 512, 11, &l),
            classify(&hdr(VIRTIO_BLK_T_DISCARD, 0), 17, 0, 3, &l),
            classify(&hdr(VIRTIO_BLK_T_DISCARD, 0), 32, 0, 3, &l),
        ];
        for (i, c) in cases.iter().enumerate() {
            let e = c.expect_err("refused");
            assert_eq!(e.status(), VIRTIO_BLK_S_IOERR, "case {i}: {e}");
        }
    }

    #[test]
    fn test_unsupported_and_read_only() {
        let mut l = limits();
        assert_eq!(
            classify(&hdr(99, 0), 0, 0, 2, &l).map_err(|e| e.status()),
            Err(VIRTIO_BLK_S_UNSUPP)
        );
        l.flush = false;
        assert_eq!(
            classify(&hdr(VIRTIO_BLK_T_FLUSH, 0), 0, 0, 2, &l).map_err(|e| e.status()),
            Err(VIRTIO_BLK_S_UNSUPP)
        );
        l.discard = false;
        assert_eq!(
            classify(&hdr(VIRTIO_BLK_T_DISCARD, 0), 16, 0, 3, &l).map_err(|e| e.status()),
            Err(VIRTIO_BLK_S_UNSUPP)
        );
        let mut l = limits();
        l.read_only = true;
        for kind in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_WRITE_ZEROES,
            VIRTIO_BLK_T_DISCARD,
        ] {
            assert_eq!(
                classify(&hdr(kind, 0), 512, 0, 3, &l),
                Err(Reject::ReadOnly(kind)),
                "kind {kind}"
            );
        }
        // Reads, flushes and the id still work.
        assert!(classify(&hdr(VIRTIO_BLK_T_IN, 0), 0, 512, 3, &l).is_ok());
        assert_eq!(
            classify(&hdr(VIRTIO_BLK_T_FLUSH, 0), 0, 0, 2, &l),
            Ok(Op::Flush)
        );
        assert_eq!(
            classify(&hdr(VIRTIO_BLK_T_GET_ID, 0), 0, 20, 3, &l),
            Ok(Op::GetId)
        );
    }

    #[test]
    fn test_segments() {
        let l = limits();
        let seg = |sector: u64, n: u32, flags: u32| ZeroSegment {
            sector: sector.to_le(),
            num_sectors: n.to_le(),
            flags: flags.to_le(),
        };
        assert_eq!(
            check_segment(&seg(8, 16, 0), true, &l),
            Ok(ZeroRange {
                offset: 4096,
                len: 8192,
                unmap: true
            })
        );
        assert_eq!(
            check_segment(&seg(8, 16, 0), false, &l).map(|r| r.unmap),
            Ok(false)
        );
        assert_eq!(
            check_segment(&seg(8, 16, FLAG_UNMAP), false, &l).map(|r| r.unmap),
            Ok(true)
        );
        assert_eq!(
            check_segment(&seg(8, 16, FLAG_UNMAP), true, &l).map_err(|e| e.status()),
            Err(VIRTIO_BLK_S_UNSUPP)
        );
        assert!(matches!(
            check_segment(&seg(2040, 16, 0), true, &l),
            Err(Reject::OutOfRange { .. })
        ));
        assert!(matches!(
            check_segment(&seg(0, 2000, 0), false, &l),
            Err(Reject::TooLarge { .. })
        ));
        assert_eq!(
            classify(&hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0), 16, 0, 3, &l),
            Ok(Op::WriteZeroes { segments: 1 })
        );
    }
}
