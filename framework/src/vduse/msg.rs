//! The control messages the kernel sends on a VDUSE device fd (`read(2)`
//! of a `struct vduse_dev_request`) and the answers written back
//! (`struct vduse_dev_response`).
//!
//! [`decode`] is the one place bytes become a typed, checked [`Request`];
//! nothing else reads a request's bytes. A message that cannot be decoded
//! still has its id whenever it is long enough to carry one, so it is
//! answered (failed) rather than left for the kernel to time out.
//! Fields are in the host's byte order (the kernel writes the structure
//! as it is in memory); the framework runs on little-endian hosts.

use crate::le::LeReader;

/// Size of `struct vduse_dev_request` and of `struct vduse_dev_response`.
pub const MSG_SIZE: usize = 152;

/// `VDUSE_GET_VQ_STATE`.
pub const VDUSE_GET_VQ_STATE: u32 = 0;
/// `VDUSE_SET_STATUS`.
pub const VDUSE_SET_STATUS: u32 = 1;
/// `VDUSE_UPDATE_IOTLB`.
pub const VDUSE_UPDATE_IOTLB: u32 = 2;

/// `VDUSE_REQ_RESULT_OK`.
pub const RESULT_OK: u32 = 0;
/// `VDUSE_REQ_RESULT_FAILED`.
pub const RESULT_FAILED: u32 = 1;

/// Offset of the request's union.
const BODY: usize = 24;

/// A decoded control request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// The driver side asks where queue `index` stands (its next avail
    /// index).
    GetVqState {
        /// Queue index (checked against the queue count).
        index: u16,
    },
    /// The driver wrote the device status.
    SetStatus {
        /// The new status (`VIRTIO_CONFIG_S_*` bits; 0 is a reset).
        status: u8,
    },
    /// The mappings of `start..=last` changed: translations in the range
    /// must be dropped (and looked up again when used).
    UpdateIotlb {
        /// First IOVA.
        start: u64,
        /// Last IOVA (inclusive, `start <= last`).
        last: u64,
    },
}

/// Why a message could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    /// Not the size of a request.
    #[error("control message of {0} bytes (a request is {MSG_SIZE})")]
    Size(usize),
    /// A request type this transport does not know.
    #[error("unknown control request type {0}")]
    UnknownType(u32),
    /// GET_VQ_STATE for a queue the device does not have.
    #[error("GET_VQ_STATE for queue {index} of a device with {num_queues}")]
    QueueIndex {
        /// Requested index.
        index: u32,
        /// The device's queue count.
        num_queues: usize,
    },
    /// UPDATE_IOTLB whose range ends before it starts.
    #[error("UPDATE_IOTLB range {start:#x}..={last:#x} is empty")]
    Range {
        /// First IOVA.
        start: u64,
        /// Last IOVA.
        last: u64,
    },
}

/// The request id of a message, if it is long enough to have one.
pub fn request_id(bytes: &[u8]) -> Option<u32> {
    let mut r = LeReader::new(bytes);
    r.u32().and_then(|_| r.u32()).ok()
}

/// Decodes one message read from the device fd, for a device with
/// `num_queues` queues.
pub fn decode(bytes: &[u8], num_queues: usize) -> Result<Request, MsgError> {
    if bytes.len() != MSG_SIZE {
        return Err(MsgError::Size(bytes.len()));
    }
    // The size is checked: no read below runs past the end.
    let short = |_| MsgError::Size(bytes.len());
    let mut head = LeReader::new(bytes);
    let ty = head.u32().map_err(short)?;
    let mut body = LeReader::new(&bytes[BODY..]);
    match ty {
        VDUSE_GET_VQ_STATE => {
            let index = body.u32().map_err(short)?;
            match u16::try_from(index) {
                Ok(i) if usize::from(i) < num_queues => Ok(Request::GetVqState { index: i }),
                _ => Err(MsgError::QueueIndex { index, num_queues }),
            }
        }
        VDUSE_SET_STATUS => Ok(Request::SetStatus {
            status: body.u8().map_err(short)?,
        }),
        VDUSE_UPDATE_IOTLB => {
            let start = body.u64().map_err(short)?;
            let last = body.u64().map_err(short)?;
            if last < start {
                return Err(MsgError::Range { start, last });
            }
            Ok(Request::UpdateIotlb { start, last })
        }
        t => Err(MsgError::UnknownType(t)),
    }
}

/// The answer to request `id`: `result` and, for GET_VQ_STATE, the queue's
/// state (`(index, avail index)`).
pub fn response(id: u32, result: u32, vq_state: Option<(u16, u16)>) -> [u8; MSG_SIZE] {
    let mut out = [0u8; MSG_SIZE];
    out[0..4].copy_from_slice(&id.to_le_bytes());
    out[4..8].copy_from_slice(&result.to_le_bytes());
    if let Some((index, avail)) = vq_state {
        out[BODY..BODY + 4].copy_from_slice(&u32::from(index).to_le_bytes());
        out[BODY + 4..BODY + 6].copy_from_slice(&avail.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn msg(ty: u32, id: u32, body: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; MSG_SIZE];
        m[0..4].copy_from_slice(&ty.to_le_bytes());
        m[4..8].copy_from_slice(&id.to_le_bytes());
        m[BODY..BODY + body.len()].copy_from_slice(body);
        m
    }

    #[test]
    fn test_decode_each_request() {
        assert_eq!(
            decode(&msg(0, 7, &3u32.to_le_bytes()), 4),
            Ok(Request::GetVqState { index: 3 })
        );
        assert_eq!(
            decode(&msg(0, 7, &4u32.to_le_bytes()), 4),
            Err(MsgError::QueueIndex {
                index: 4,
                num_queues: 4
            })
        );
        assert_eq!(
            decode(&msg(1, 1, &[0x0f]), 4),
            Ok(Request::SetStatus { status: 0x0f })
        );
        let mut r = 0x1000u64.to_le_bytes().to_vec();
        r.extend_from_slice(&0x1fffu64.to_le_bytes());
        assert_eq!(
            decode(&msg(2, 9, &r), 4),
            Ok(Request::UpdateIotlb {
                start: 0x1000,
                last: 0x1fff
            })
        );
        let mut bad = 0x2000u64.to_le_bytes().to_vec();
        bad.extend_from_slice(&0x1fffu64.to_le_bytes());
        assert!(matches!(
            decode(&msg(2, 9, &bad), 4),
            Err(MsgError::Range { .. })
        ));
        assert_eq!(decode(&msg(3, 9, &[]), 4), Err(MsgError::UnknownType(3)));
        assert_eq!(decode(&[0u8; 12], 4), Err(MsgError::Size(12)));
        assert_eq!(request_id(&msg(1, 0xabcd, &[])), Some(0xabcd));
    }

    #[test]
    fn test_response_layout() {
        let r = response(5, RESULT_OK, Some((2, 0x1234)));
        assert_eq!(&r[0..4], &5u32.to_le_bytes());
        assert_eq!(&r[4..8], &0u32.to_le_bytes());
        assert_eq!(&r[24..28], &2u32.to_le_bytes());
        assert_eq!(&r[28..30], &0x1234u16.to_le_bytes());
        assert!(r[8..24].iter().all(|b| *b == 0), "reserved words are zero");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        /// Any bytes at all (any length, any type, any fields): decoding
        /// never panics, accepts only the three known types at the exact
        /// size, and what it accepts is within bounds.
        #[test]
        fn test_decode_any_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..2 * MSG_SIZE),
            num_queues in 0usize..70_000,
        ) {
            match decode(&bytes, num_queues) {
                Ok(Request::GetVqState { index }) => {
                    prop_assert!(usize::from(index) < num_queues);
                    prop_assert_eq!(bytes.len(), MSG_SIZE);
                }
                Ok(Request::UpdateIotlb { start, last }) => prop_assert!(start <= last),
                Ok(Request::SetStatus { .. }) => prop_assert_eq!(bytes.len(), MSG_SIZE),
                Err(_) => {}
            }
            if bytes.len() >= 8 {
                prop_assert!(request_id(&bytes).is_some());
            }
        }

        /// Well-formed requests of every type with any field values decode
        /// to what was encoded, or are refused for the reason their fields
        /// give.
        #[test]
        fn test_decode_structured(ty in 0u32..4, id in any::<u32>(), a in any::<u64>(), b in any::<u64>(), n in 1usize..64) {
            let mut body = a.to_le_bytes().to_vec();
            body.extend_from_slice(&b.to_le_bytes());
            let m = msg(ty, id, &body);
            let r = decode(&m, n);
            match ty {
                0 => {
                    let index = a as u32;
                    if (index as usize) < n {
                        prop_assert_eq!(r, Ok(Request::GetVqState { index: index as u16 }));
                    } else {
                        prop_assert!(r.is_err());
                    }
                }
                1 => prop_assert_eq!(r, Ok(Request::SetStatus { status: a as u8 })),
                2 if b >= a => prop_assert_eq!(r, Ok(Request::UpdateIotlb { start: a, last: b })),
                2 => prop_assert_eq!(r, Err(MsgError::Range { start: a, last: b })),
                _ => prop_assert_eq!(r, Err(MsgError::UnknownType(ty))),
            }
            prop_assert_eq!(request_id(&m), Some(id));
        }
    }
}
