//! Work descriptor and completion record formats, laid out as Intel DSA lays
//! them out (64-byte descriptor, 32-byte completion record).
//!
//! Peer bytes are never transmuted: [`Descriptor::from_bytes`] and
//! [`CompletionRecord::to_bytes`] parse and emit explicit little-endian
//! fields, so any 64 bytes a client writes parse into some descriptor and
//! validation decides what it means.

/// Size of a work descriptor in bytes.
pub const DESC_SIZE: usize = 64;
/// Size of a completion record in bytes.
pub const CR_SIZE: usize = 32;
/// Required alignment of a completion record address.
pub const CR_ALIGN: u64 = 32;
/// Required alignment of a batch descriptor list address.
pub const DESC_LIST_ALIGN: u64 = 64;

/// Descriptor opcodes (`enum dsa_opcode`).
pub mod opcode {
    /// No operation; only completes.
    pub const NOOP: u8 = 0x00;
    /// Batch of descriptors in memory.
    pub const BATCH: u8 = 0x01;
    /// Completes once earlier descriptors of the portal completed.
    pub const DRAIN: u8 = 0x02;
    /// Memory move (overlap allowed).
    pub const MEMMOVE: u8 = 0x03;
    /// Fill with an 8-byte pattern.
    pub const MEMFILL: u8 = 0x04;
    /// Compare two regions.
    pub const COMPARE: u8 = 0x05;
    /// Compare a region with an 8-byte pattern.
    pub const COMPVAL: u8 = 0x06;
    /// Create a delta record.
    pub const CR_DELTA: u8 = 0x07;
    /// Apply a delta record.
    pub const AP_DELTA: u8 = 0x08;
    /// Copy one source to two destinations.
    pub const DUALCAST: u8 = 0x09;
    /// CRC-32C generation.
    pub const CRCGEN: u8 = 0x10;
    /// Copy with CRC-32C.
    pub const COPY_CRC: u8 = 0x11;
    /// Cache flush of a range.
    pub const CFLUSH: u8 = 0x20;
}

/// Descriptor flags (`IDXD_OP_FLAG_*`), bits 0..24 of the flags field.
pub mod flags {
    /// Order after earlier batch members; abandon after a failure.
    pub const FENCE: u32 = 0x0001;
    /// Block on fault: raise an I/O page fault instead of completing partially.
    pub const BOF: u32 = 0x0002;
    /// Completion record address valid.
    pub const CRAV: u32 = 0x0004;
    /// Request a completion record (else only on failure).
    pub const RCR: u32 = 0x0008;
    /// Request a completion interrupt (kernel clients only).
    pub const RCI: u32 = 0x0010;
    /// Completion record steering-tag selector.
    pub const CRSTS: u32 = 0x0020;
    /// Check result (compare-type operations).
    pub const CR: u32 = 0x0080;
    /// Cache control.
    pub const CC: u32 = 0x0100;
    /// Traffic-class select, address 1.
    pub const ADDR1_TCS: u32 = 0x0200;
    /// Traffic-class select, address 2.
    pub const ADDR2_TCS: u32 = 0x0400;
    /// Traffic-class select, address 3.
    pub const ADDR3_TCS: u32 = 0x0800;
    /// Traffic-class select, completion record.
    pub const CR_TCS: u32 = 0x1000;
    /// Strict ordering of destination writes.
    pub const STORD: u32 = 0x2000;
    /// Destination readback.
    pub const DRDBK: u32 = 0x4000;
    /// Destination steering-tag selector.
    pub const DSTS: u32 = 0x8000;
    /// Flags every opcode accepts (hints this device honours trivially).
    pub const COMMON: u32 = FENCE
        | BOF
        | CRAV
        | RCR
        | RCI
        | CRSTS
        | CC
        | ADDR1_TCS
        | ADDR2_TCS
        | ADDR3_TCS
        | CR_TCS
        | STORD
        | DRDBK
        | DSTS;
}

/// Completion status codes (`enum dsa_completion_status`).
pub mod status {
    /// Not yet written.
    pub const NONE: u8 = 0x00;
    /// Success.
    pub const SUCCESS: u8 = 0x01;
    /// Success with false predicate.
    pub const SUCCESS_PRED: u8 = 0x02;
    /// Partial completion: page fault with block-on-fault off.
    pub const PAGE_FAULT_NOBOF: u8 = 0x03;
    /// Partial completion: page request answered Invalid.
    pub const PAGE_FAULT_IR: u8 = 0x04;
    /// One or more batch members did not succeed.
    pub const BATCH_FAIL: u8 = 0x05;
    /// Page fault reading the batch descriptor list.
    pub const BATCH_PAGE_FAULT: u8 = 0x06;
    /// Delta record offsets not increasing.
    pub const DR_OFFSET_NOINC: u8 = 0x07;
    /// Delta record offset out of range.
    pub const DR_OFFSET_ERANGE: u8 = 0x08;
    /// Unsupported opcode.
    pub const BAD_OPCODE: u8 = 0x10;
    /// Invalid flags.
    pub const INVALID_FLAGS: u8 = 0x11;
    /// Non-zero reserved field.
    pub const NOZERO_RESERVE: u8 = 0x12;
    /// Invalid transfer size.
    pub const XFER_ERANGE: u8 = 0x13;
    /// Batch descriptor count out of range.
    pub const DESC_CNT_ERANGE: u8 = 0x14;
    /// Delta record size out of range.
    pub const DR_ERANGE: u8 = 0x15;
    /// Overlapping buffers.
    pub const OVERLAP_BUFFERS: u8 = 0x16;
    /// Dualcast destinations differ in bits 11:0.
    pub const DCAST_ERR: u8 = 0x17;
    /// Misaligned descriptor list address.
    pub const DESCLIST_ALIGN: u8 = 0x18;
    /// Invalid interrupt handle.
    pub const INT_HANDLE_INVAL: u8 = 0x19;
    /// Page fault translating the completion record address.
    pub const CRA_XLAT: u8 = 0x1a;
    /// Misaligned completion record address.
    pub const CRA_ALIGN: u8 = 0x1b;
    /// Misaligned address.
    pub const ADDR_ALIGN: u8 = 0x1c;
    /// priv=1 without privileged mode.
    pub const PRIV_BAD: u8 = 0x1d;
    /// Page request answered with Response Failure.
    pub const TRANSLATION_FAIL: u8 = 0x22;
    /// Mask of the code bits of the status byte.
    pub const MASK: u8 = 0x7f;
    /// Status bit 7: the faulting access was a write.
    pub const WRITE: u8 = 0x80;
}

/// Operation capability: a 256-bit mask indexed by opcode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpCap(pub [u64; 4]);

impl OpCap {
    /// The opcodes this device implements.
    pub const fn supported() -> Self {
        let ops = [
            opcode::NOOP,
            opcode::BATCH,
            opcode::DRAIN,
            opcode::MEMMOVE,
            opcode::MEMFILL,
            opcode::COMPARE,
            opcode::COMPVAL,
            opcode::CR_DELTA,
            opcode::AP_DELTA,
            opcode::DUALCAST,
            opcode::CRCGEN,
            opcode::COPY_CRC,
            opcode::CFLUSH,
        ];
        let mut m = [0u64; 4];
        let mut i = 0;
        while i < ops.len() {
            let op = ops[i] as usize;
            m[op / 64] |= 1 << (op % 64);
            i += 1;
        }
        OpCap(m)
    }

    /// Whether `op` is advertised.
    pub fn has(&self, op: u8) -> bool {
        let op = op as usize;
        self.0[op / 64] & (1 << (op % 64)) != 0
    }
}

/// A parsed 64-byte work descriptor.
///
/// Field names follow `struct dsa_hw_desc`; the union members are exposed as
/// accessors over the raw operand words.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// PASID (20 bits).
    pub pasid: u32,
    /// Reserved bits 20..31 of the first dword (must be zero).
    pub rsvd0: u16,
    /// Privileged bit.
    pub privileged: bool,
    /// Flags (24 bits).
    pub flags: u32,
    /// Opcode.
    pub opcode: u8,
    /// Completion record address.
    pub completion_addr: u64,
    /// Bytes 16..24: source / pattern / descriptor list.
    pub src: u64,
    /// Bytes 24..32: destination / second source / compare pattern.
    pub dst: u64,
    /// Bytes 32..36: transfer size / descriptor count.
    pub xfer_size: u32,
    /// Completion interrupt handle.
    pub int_handle: u16,
    /// Reserved bytes 38..40 (must be zero).
    pub rsvd1: u16,
    /// Bytes 40..64: operation-specific.
    pub op_specific: [u8; 24],
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

impl Descriptor {
    /// Parses 64 bytes. Every bit pattern parses.
    pub fn from_bytes(b: &[u8; DESC_SIZE]) -> Self {
        let w0 = le_u32(b, 0);
        let w1 = le_u32(b, 4);
        let mut op_specific = [0u8; 24];
        op_specific.copy_from_slice(&b[40..64]);
        Descriptor {
            pasid: w0 & 0xf_ffff,
            rsvd0: ((w0 >> 20) & 0x7ff) as u16,
            privileged: w0 >> 31 != 0,
            flags: w1 & 0xff_ffff,
            opcode: (w1 >> 24) as u8,
            completion_addr: le_u64(b, 8),
            src: le_u64(b, 16),
            dst: le_u64(b, 24),
            xfer_size: le_u32(b, 32),
            int_handle: le_u16(b, 36),
            rsvd1: le_u16(b, 38),
            op_specific,
        }
    }

    /// Serialises to 64 bytes.
    pub fn to_bytes(&self) -> [u8; DESC_SIZE] {
        let mut b = [0u8; DESC_SIZE];
        let w0 = (self.pasid & 0xf_ffff)
            | (u32::from(self.rsvd0 & 0x7ff) << 20)
            | (u32::from(self.privileged) << 31);
        let w1 = (self.flags & 0xff_ffff) | (u32::from(self.opcode) << 24);
        b[0..4].copy_from_slice(&w0.to_le_bytes());
        b[4..8].copy_from_slice(&w1.to_le_bytes());
        b[8..16].copy_from_slice(&self.completion_addr.to_le_bytes());
        b[16..24].copy_from_slice(&self.src.to_le_bytes());
        b[24..32].copy_from_slice(&self.dst.to_le_bytes());
        b[32..36].copy_from_slice(&self.xfer_size.to_le_bytes());
        b[36..38].copy_from_slice(&self.int_handle.to_le_bytes());
        b[38..40].copy_from_slice(&self.rsvd1.to_le_bytes());
        b[40..64].copy_from_slice(&self.op_specific);
        b
    }

    /// A descriptor with the given opcode and flags, other fields zero.
    pub fn new(opcode: u8, flags: u32) -> Self {
        Descriptor {
            opcode,
            flags,
            ..Default::default()
        }
    }

    /// Reads the 8-byte little-endian word at op-specific offset `off` (0, 8 or 16).
    pub fn op_u64(&self, off: usize) -> u64 {
        le_u64(&self.op_specific, off)
    }

    /// Reads the 4-byte little-endian word at op-specific offset `off`.
    pub fn op_u32(&self, off: usize) -> u32 {
        le_u32(&self.op_specific, off)
    }

    /// Writes the 8-byte word at op-specific offset `off`.
    pub fn set_op_u64(&mut self, off: usize, v: u64) {
        self.op_specific[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Writes the 4-byte word at op-specific offset `off`.
    pub fn set_op_u32(&mut self, off: usize, v: u32) {
        self.op_specific[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// `expected_res` (byte 40), for compare-type operations.
    pub fn expected_res(&self) -> u8 {
        self.op_specific[0]
    }

    /// `delta_addr` (bytes 40..48), create delta record.
    pub fn delta_addr(&self) -> u64 {
        self.op_u64(0)
    }

    /// `max_delta_size` (bytes 48..52), create delta record.
    pub fn max_delta_size(&self) -> u32 {
        self.op_u32(8)
    }

    /// `expected_res_mask` (byte 56), create delta record.
    pub fn expected_res_mask(&self) -> u8 {
        self.op_specific[16]
    }

    /// `delta_rec_size` (bytes 40..44), apply delta record.
    pub fn delta_rec_size(&self) -> u32 {
        self.op_u32(0)
    }

    /// `dest2` (bytes 40..48), dualcast.
    pub fn dest2(&self) -> u64 {
        self.op_u64(0)
    }

    /// `crc_seed` (bytes 40..44).
    pub fn crc_seed(&self) -> u32 {
        self.op_u32(0)
    }

    /// `seed_addr` (bytes 48..56).
    pub fn seed_addr(&self) -> u64 {
        self.op_u64(8)
    }
}

/// Op-specific flag (bit 16) of CRC operations: read the seed from `seed_addr`.
pub const CRC_READ_SEED: u32 = 0x1_0000;

/// A 32-byte completion record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionRecord {
    /// Status byte: code in bits 6:0, write bit in bit 7.
    pub status: u8,
    /// Result (compare result, memmove direction, delta result).
    pub result: u8,
    /// Fault information (reserved here).
    pub fault_info: u8,
    /// Bytes completed, or descriptors completed for a batch.
    pub bytes_completed: u32,
    /// Faulting address.
    pub fault_addr: u64,
    /// Bytes 16..32, operation-specific.
    pub op_specific: [u8; 16],
}

impl CompletionRecord {
    /// A record with the given status.
    pub fn with_status(status: u8) -> Self {
        CompletionRecord {
            status,
            ..Default::default()
        }
    }

    /// Serialises to 32 bytes.
    pub fn to_bytes(&self) -> [u8; CR_SIZE] {
        let mut b = [0u8; CR_SIZE];
        b[0] = self.status;
        b[1] = self.result;
        b[2] = self.fault_info;
        b[4..8].copy_from_slice(&self.bytes_completed.to_le_bytes());
        b[8..16].copy_from_slice(&self.fault_addr.to_le_bytes());
        b[16..32].copy_from_slice(&self.op_specific);
        b
    }

    /// Parses 32 bytes.
    pub fn from_bytes(b: &[u8; CR_SIZE]) -> Self {
        let mut op_specific = [0u8; 16];
        op_specific.copy_from_slice(&b[16..32]);
        CompletionRecord {
            status: b[0],
            result: b[1],
            fault_info: b[2],
            bytes_completed: le_u32(b, 4),
            fault_addr: le_u64(b, 8),
            op_specific,
        }
    }

    /// The status code without the write bit.
    pub fn code(&self) -> u8 {
        self.status & status::MASK
    }

    /// Whether the faulting access was a write (page fault codes only).
    pub fn fault_was_write(&self) -> bool {
        self.status & status::WRITE != 0
    }

    /// `crc_val` (bytes 16..20).
    pub fn crc_val(&self) -> u32 {
        le_u32(&self.op_specific, 0)
    }

    /// Sets `crc_val`.
    pub fn set_crc_val(&mut self, v: u32) {
        self.op_specific[0..4].copy_from_slice(&v.to_le_bytes());
    }

    /// `delta_rec_size` (bytes 16..20).
    pub fn delta_rec_size(&self) -> u32 {
        le_u32(&self.op_specific, 0)
    }

    /// Sets `delta_rec_size`.
    pub fn set_delta_rec_size(&mut self, v: u32) {
        self.op_specific[0..4].copy_from_slice(&v.to_le_bytes());
    }

    /// `invalid_flags` (bytes 16..20, 24 bits).
    pub fn invalid_flags(&self) -> u32 {
        le_u32(&self.op_specific, 0) & 0xff_ffff
    }

    /// Sets `invalid_flags`.
    pub fn set_invalid_flags(&mut self, v: u32) {
        self.op_specific[0..4].copy_from_slice(&(v & 0xff_ffff).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_descriptor_roundtrip_layout() {
        let mut d = Descriptor::new(opcode::MEMMOVE, flags::CRAV | flags::RCR);
        d.pasid = 0xabcde;
        d.privileged = true;
        d.completion_addr = 0x1122_3344_5566_7780;
        d.src = 0x1000;
        d.dst = 0x2000;
        d.xfer_size = 4096;
        d.set_op_u64(0, 0xdead_beef);
        let b = d.to_bytes();
        assert_eq!(&b[0..4], &(0xabcde | 0x8000_0000u32).to_le_bytes());
        assert_eq!(b[7], opcode::MEMMOVE);
        assert_eq!(b[4], 0x0c);
        assert_eq!(&b[32..36], &4096u32.to_le_bytes());
        assert_eq!(Descriptor::from_bytes(&b), d);
    }

    #[test]
    fn test_every_bit_pattern_parses() {
        let b = [0xffu8; DESC_SIZE];
        let d = Descriptor::from_bytes(&b);
        assert_eq!(d.pasid, 0xf_ffff);
        assert_eq!(d.rsvd0, 0x7ff);
        assert!(d.privileged);
        assert_eq!(d.flags, 0xff_ffff);
        assert_eq!(d.to_bytes(), b);
    }

    #[test]
    fn test_completion_record_layout() {
        let mut cr = CompletionRecord::with_status(status::PAGE_FAULT_NOBOF | status::WRITE);
        cr.bytes_completed = 0x1234;
        cr.fault_addr = 0xfeed_0000;
        cr.set_crc_val(0xe306_9283);
        let b = cr.to_bytes();
        assert_eq!(b[0], 0x83);
        assert_eq!(&b[4..8], &0x1234u32.to_le_bytes());
        assert_eq!(&b[8..16], &0xfeed_0000u64.to_le_bytes());
        let back = CompletionRecord::from_bytes(&b);
        assert_eq!(back, cr);
        assert_eq!(back.code(), status::PAGE_FAULT_NOBOF);
        assert!(back.fault_was_write());
        assert_eq!(back.crc_val(), 0xe306_9283);
    }

    #[test]
    fn test_opcap_advertises_implemented_opcodes() {
        let cap = OpCap::supported();
        for op in [
            0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x10, 0x11, 0x20,
        ] {
            assert!(cap.has(op), "opcode {op:#x}");
        }
        for op in [0x0a, 0x12, 0x13, 0x17, 0x21, 0x42, 0xff] {
            assert!(!cap.has(op), "opcode {op:#x}");
        }
        assert_eq!(cap.0[0] & 0xf, 0xf);
    }
}
