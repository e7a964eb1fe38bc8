//! The packed ring's wire format (virtio 1.1+, "Packed Virtqueues"): the
//! descriptor, its flags, and the event suppression structure, as laid
//! out in guest memory (little endian).

/// `VIRTQ_DESC_F_NEXT`: the chain goes on in the next ring slot.
pub(crate) const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: a device-writable buffer (in a used descriptor:
/// the device wrote into the buffer).
pub(crate) const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`: the buffer is a table of descriptors.
pub(crate) const DESC_F_INDIRECT: u16 = 4;
/// `VIRTQ_DESC_F_AVAIL`: set by the driver to its wrap counter.
pub(crate) const DESC_F_AVAIL: u16 = 1 << 7;
/// `VIRTQ_DESC_F_USED`: set by the device to its wrap counter.
pub(crate) const DESC_F_USED: u16 = 1 << 15;

/// `RING_EVENT_FLAGS_ENABLE`: notifications wanted.
pub(crate) const EVENT_F_ENABLE: u16 = 0;
/// `RING_EVENT_FLAGS_DISABLE`: no notifications.
pub(crate) const EVENT_F_DISABLE: u16 = 1;
/// `RING_EVENT_FLAGS_DESC`: a notification when the descriptor at
/// `off_wrap` is reached (needs `VIRTIO_RING_F_EVENT_IDX`).
pub(crate) const EVENT_F_DESC: u16 = 2;

/// Bytes of one descriptor.
pub(crate) const DESC_LEN: u64 = 16;
/// Bytes of an event suppression structure (`off_wrap`, `flags`).
pub(crate) const EVENT_LEN: u64 = 4;

/// A packed descriptor as the driver wrote it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PackedDesc {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) id: u16,
    pub(crate) flags: u16,
}

impl PackedDesc {
    /// From its 16 bytes in memory.
    pub(crate) fn from_le_bytes(b: [u8; 16]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[0..8]);
        PackedDesc {
            addr: u64::from_le_bytes(a),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            id: u16::from_le_bytes([b[12], b[13]]),
            flags: u16::from_le_bytes([b[14], b[15]]),
        }
    }
}

/// True when `flags` mark a descriptor the driver made available in the
/// lap whose wrap counter is `wrap`: `AVAIL` equal to it, `USED` not.
/// One mask and one compare (scripts/count-net.sh --packed: 807.8 ->
/// 799.8 per frame against the two flag tests apart).
#[inline]
pub(crate) fn is_avail(flags: u16, wrap: bool) -> bool {
    let want = if wrap { DESC_F_AVAIL } else { DESC_F_USED };
    flags & (DESC_F_AVAIL | DESC_F_USED) == want
}

/// The flags of a used descriptor written in the lap `wrap`: `AVAIL` and
/// `USED` both equal to it, `WRITE` when the device wrote into the buffer.
#[inline]
pub(crate) fn used_flags(wrap: bool, written: bool) -> u16 {
    let w = if wrap { DESC_F_AVAIL | DESC_F_USED } else { 0 };
    if written {
        w | DESC_F_WRITE
    } else {
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_avail_and_used_flags_follow_the_wrap_counter() {
        assert!(is_avail(DESC_F_AVAIL, true));
        assert!(!is_avail(DESC_F_AVAIL, false));
        assert!(is_avail(DESC_F_USED, false));
        assert!(!is_avail(used_flags(true, false), true), "used, not avail");
        assert!(!is_avail(used_flags(false, true), false));
        for flags in [0, DESC_F_AVAIL, DESC_F_USED, DESC_F_AVAIL | DESC_F_USED] {
            for wrap in [false, true] {
                let spec =
                    (flags & DESC_F_AVAIL != 0) == wrap && (flags & DESC_F_USED != 0) != wrap;
                assert_eq!(
                    is_avail(flags | DESC_F_NEXT, wrap),
                    spec,
                    "{flags:#x} {wrap}"
                );
            }
        }
        assert_eq!(
            used_flags(true, true),
            DESC_F_AVAIL | DESC_F_USED | DESC_F_WRITE
        );
    }

    #[test]
    fn test_descriptor_bytes_are_little_endian() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        b[8..12].copy_from_slice(&0x99u32.to_le_bytes());
        b[12..14].copy_from_slice(&7u16.to_le_bytes());
        b[14..16].copy_from_slice(&(DESC_F_AVAIL | DESC_F_NEXT).to_le_bytes());
        let d = PackedDesc::from_le_bytes(b);
        assert_eq!(
            d,
            PackedDesc {
                addr: 0x1122_3344_5566_7788,
                len: 0x99,
                id: 7,
                flags: DESC_F_AVAIL | DESC_F_NEXT
            }
        );
    }
}
