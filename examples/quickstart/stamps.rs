//! The unmap step's check: no device wrote into the frame area after
//! IOAS_UNMAP returned.
//!
//! Every device write into the area carries a stamp the driver chose: net0
//! reflects frames whose sequence number lands in the receive buffer with
//! the frame, and each of sva0's fills writes an 8-byte pattern unique to
//! that fill ([`fill_stamp`]). The driver clears the area before it gives
//! the devices any work, and right after IOAS_UNMAP returns it takes one
//! snapshot of what the devices have reported complete (net0's receive used
//! index, the completion records of sva0's fills): the writes in that
//! snapshot are the set C. Once all work has ended, the area must hold exactly the
//! replay of C, in the order each device made its writes (a [`Ledger`]);
//! any other byte is a write that no completion visible when the unmap
//! returned accounts for, and the driver names its stamp.
//!
//! Why a write that landed before the unmap returned is in C (no false
//! alarm): a device reaches the area only inside an access section, and an
//! unmap returns only once every section that may hold a translation of
//! the area has ended. Both devices post each write's completion in the
//! same section as the write, after it:
//! - net0 writes a frame into a receive buffer, puts the buffer on the used
//!   ring and publishes the used index before the worker call (the
//!   section) returns;
//! - sva0 runs its work in units of about 1 MiB, one section each, and a
//!   job that is not done goes on in a later section, so neither a batch's
//!   record nor a long fill's record is posted in the section that made
//!   the writes it reports. The step's fills into the area therefore ask
//!   for a record of their own (`RCR`) and are 4 KiB, at most what sva0
//!   does in one step (`sva_accel::engine::MIN_STEP`): such a fill runs in
//!   one step and its record is written right after it, in that step's
//!   section. The longer fills that keep sva0 busy go to a buffer of its
//!   own, outside the area.
//!
//! So each write made before the unmap returned has its completion visible
//! by then, with the bytes it wrote: net0's used element gives the buffer
//! and the length, and the length names the frame (net0 gets rounds of
//! frames, one per receive buffer, the next round once it has delivered the
//! last, and the frames of a round all have different lengths); a fill's
//! record gives its outcome and, for a partial one, how many bytes it
//! wrote. One device thread each makes the writes into the area, in the
//! order the driver gave them (net0's used ring; sva0's batches and their
//! members, in order: one worker, one client), which is the order of the
//! replay.
//!
//! Why a write that lands after the unmap returned is caught, whenever it
//! lands before the final comparison (made after both devices were shown
//! to miss on the area): its completion, if the device posts one at all,
//! comes after it, so the snapshot did not see it and the write is not in
//! C (a completion the snapshot missed is reported as such: net0 completing
//! a receive buffer, or sva0 a fill with bytes written, after the unmap
//! returned). No write of C overwrites it: each landed before the snapshot
//! read its completion, so it would have to land between the reply and the
//! snapshot as well. And its bytes differ from the replay's there, since
//! every write of the step has a stamp of its own.
//!
//! What the check cannot see: a late write whose completion is also
//! posted, and read by the snapshot, in the instant between the unmap's
//! return in the backend and the snapshot (the reply's way back, then a
//! load of net0's used index and of sva0's 1024 records, latest first,
//! before anything else); a write of the very bytes already there, which
//! changes nothing; and a write landing after the final comparison. Poisoning the pages
//! after the unmap, as this step did before, missed every late write that
//! landed before the poison, completion or not.

/// Tag in the high half of every fill stamp.
pub const FILL_TAG: u64 = 0x5354_4d50_0000_0000;

/// The 8-byte pattern of area fill `member` of batch `batch`.
pub fn fill_stamp(batch: usize, member: usize) -> u64 {
    FILL_TAG | (batch as u64 & 0xffff) << 16 | (member as u64 & 0xffff)
}

/// Batch and member of a fill stamp, if `word` is one.
pub fn fill_of(word: u64) -> Option<(usize, usize)> {
    (word & 0xffff_ffff_0000_0000 == FILL_TAG)
        .then_some((((word >> 16) & 0xffff) as usize, (word & 0xffff) as usize))
}

/// The expected content of the area: the writes of C, replayed in the
/// order each device made them, over the cleared area.
#[derive(Debug)]
pub struct Ledger {
    image: Vec<u8>,
    writes: u64,
}

/// Where the area differs from the replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Offset of the first differing byte in the area.
    pub at: usize,
    /// Bytes that differ in all.
    pub bytes: usize,
}

impl Ledger {
    /// A cleared area of `len` bytes.
    pub fn new(len: usize) -> Ledger {
        Ledger {
            image: vec![0; len],
            writes: 0,
        }
    }

    /// Replays a write of `bytes` at `at` (offset in the area).
    pub fn write(&mut self, at: usize, bytes: &[u8]) -> Result<(), String> {
        let end = at
            .checked_add(bytes.len())
            .filter(|&e| e <= self.image.len())
            .ok_or_else(|| {
                format!(
                    "a write of {} bytes at {at:#x} leaves the area",
                    bytes.len()
                )
            })?;
        self.image[at..end].copy_from_slice(bytes);
        self.writes += u64::from(!bytes.is_empty());
        Ok(())
    }

    /// Replays a fill of `len` bytes of `pattern` at `at`.
    pub fn fill(&mut self, at: usize, pattern: u64, len: usize) -> Result<(), String> {
        let p = pattern.to_le_bytes();
        let bytes: Vec<u8> = p.iter().copied().cycle().take(len).collect();
        self.write(at, &bytes)
    }

    /// Writes replayed (of at least one byte).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// The replay's bytes.
    pub fn image(&self) -> &[u8] {
        &self.image
    }

    /// Compares the area's content with the replay.
    pub fn compare(&self, actual: &[u8]) -> Option<Mismatch> {
        let mut first = None;
        let mut bytes = 0;
        for (i, (a, e)) in actual.iter().zip(&self.image).enumerate() {
            if a != e {
                first.get_or_insert(i);
                bytes += 1;
            }
        }
        bytes += actual.len().abs_diff(self.image.len());
        first
            .or((bytes > 0).then_some(actual.len().min(self.image.len())))
            .map(|at| Mismatch { at, bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fill_stamps_are_unique_and_decode() {
        let mut seen = std::collections::BTreeSet::new();
        for b in 0..64 {
            for m in 0..32 {
                let s = fill_stamp(b, m);
                assert!(seen.insert(s));
                assert_eq!(fill_of(s), Some((b, m)));
            }
        }
        assert_eq!(fill_of(0), None);
    }

    #[test]
    fn test_ledger_replays_in_order_and_finds_a_stray_write() {
        let mut l = Ledger::new(64);
        l.fill(0, fill_stamp(0, 0), 32).expect("fill");
        l.fill(16, fill_stamp(0, 1), 32).expect("fill");
        l.write(56, b"net").expect("write");
        let mut area = l.image().to_vec();
        assert_eq!(l.compare(&area), None);
        // The first fill again, late: its bytes differ where the second
        // one had overwritten it.
        area[16..24].copy_from_slice(&fill_stamp(0, 0).to_le_bytes());
        assert_eq!(l.compare(&area), Some(Mismatch { at: 16, bytes: 1 }));
        assert!(l.write(60, b"too long").is_err());
    }
}
