//! The operations, over a memory-access trait.
//!
//! The engine never sees host pointers other than those a [`DmaMemory`]
//! hands out for one translated fragment, so it runs the same over
//! iommu-core in the daemon and on plain buffers in unit tests. Every
//! operation walks its ranges fragment by fragment; a translation failure
//! stops it with a [`PageFault`] and its [`Progress`] says where to resume
//! (block on fault) or what to report (partial completion).
//!
//! Validation order (first failing check wins):
//! 1. opcode not in OPCAP, or not allowed in a batch (BATCH, DRAIN): 0x10
//! 2. priv=1 from a user portal: 0x1D
//! 3. a flag the opcode does not define: 0x11 (`invalid_flags` set)
//! 4. a non-zero reserved field: 0x12
//! 5. RCI (no interrupt handles exist for user portals): 0x19
//! 6. sizes: transfer size 0, above the maximum or wrapping: 0x13; batch
//!    count: 0x14; delta record sizes: 0x15
//! 7. alignment: descriptor list 0x18; delta and seed addresses 0x1C
//! 8. dualcast destination bits 11:0: 0x17; forbidden overlap: 0x16
//!
//! A misaligned completion record address cannot be written and is reported
//! as an event instead (see the device module).
//!
//! Bounded execution: [`execute_bounded`] does at most a [`Budget`] of work
//! (bytes moved, compared, checksummed or filled, plus [`DESC_COST`] per
//! descriptor and batch member) and then stops with [`Outcome::Yielded`],
//! the job's progress saved exactly as for a block on fault; resuming it
//! with [`Resume::Continue`] carries on from there. A yield happens only
//! between fragments, after the previous fragment's bytes were done, so
//! the records, partial completions and `bytes_completed` are the same as
//! for a run in one go. Delta operations are not split (their size is
//! bounded by [`MAX_DELTA_XFER`]); they are charged as a whole.

use crate::crc;
use crate::desc::{
    flags, opcode, status, CompletionRecord, Descriptor, OpCap, CRC_READ_SEED, CR_ALIGN, CR_SIZE,
    DESC_LIST_ALIGN, DESC_SIZE,
};
use std::sync::atomic::{AtomicU8, Ordering};

/// Page size used to split descending copies.
const PAGE: u64 = 4096;
/// Largest transfer a delta record can describe (16-bit offsets, 8-byte words).
pub const MAX_DELTA_XFER: u32 = 0x8_0000;
/// Size of one delta record entry.
pub const DELTA_ENTRY: u32 = 10;

/// Work charged for each descriptor and each batch member on top of its
/// bytes, so that a batch of many small members is bounded too (a batch of
/// 1024 members of 64 bytes is about half a megabyte of work).
pub const DESC_COST: u64 = 512;

/// Least work an operation does between two yields: an operation of at
/// most this many bytes over host-contiguous memory runs in one step, so
/// it completes (and writes its record) in the access section it started
/// in.
pub const MIN_STEP: u64 = 4096;

/// How much work an execution may still do before it yields (bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    left: u64,
}

impl Budget {
    /// A budget of `bytes` of work.
    pub fn new(bytes: u64) -> Budget {
        Budget { left: bytes }
    }

    /// No bound: the execution runs to completion or a fault.
    pub fn unlimited() -> Budget {
        Budget { left: u64::MAX }
    }

    /// Work left, in bytes.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// The budget is used up: the next step yields.
    pub fn is_spent(&self) -> bool {
        self.left == 0
    }

    /// Charges `n` bytes of work.
    pub fn charge(&mut self, n: u64) {
        self.left = self.left.saturating_sub(n);
    }

    /// The longest step of at most `n` bytes the budget allows: what is
    /// left, but at least [`MIN_STEP`] (an operation resumed on a spent
    /// budget still makes progress before it yields again).
    fn clamp(&self, n: u64) -> u64 {
        n.min(self.left.max(MIN_STEP))
    }
}

/// Why an operation stopped before completing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A translation failed.
    Fault(PageFault),
    /// The budget is spent; the progress says where to carry on.
    Yield,
}

impl From<PageFault> for Stop {
    fn from(f: PageFault) -> Stop {
        Stop::Fault(f)
    }
}

/// One host fragment of a translated range.
#[derive(Clone, Copy, Debug)]
pub struct Fragment {
    /// Host address of the first byte.
    pub ptr: *mut u8,
    /// Length in bytes, at least 1 and at most the requested length.
    pub len: usize,
}

/// A translation failure: the first address that could not be accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    /// Faulting device address.
    pub addr: u64,
    /// Whether the access was a write.
    pub write: bool,
}

/// Device-side access to one address space.
///
/// # Safety
/// Implementors guarantee that a [`Fragment`] returned by `translate` has
/// `1 <= len <= len requested` and is valid for reads (and for writes when
/// `write` is true) of `len` bytes for as long as `self` is borrowed. The
/// memory may be shared with another process, so the engine only accesses it
/// through raw pointers.
pub unsafe trait DmaMemory {
    /// Translates the longest host-contiguous prefix of `[addr, addr + len)`.
    /// `len` is at least 1.
    fn translate(&self, addr: u64, len: u64, write: bool) -> Result<Fragment, PageFault>;

    /// [`DmaMemory::translate`] for an access whose failure the device
    /// reports itself (work without block on fault, completion records): it
    /// must not raise an I/O page fault. Memory that never raises one keeps
    /// the default.
    fn translate_nofault(&self, addr: u64, len: u64, write: bool) -> Result<Fragment, PageFault> {
        self.translate(addr, len, write)
    }
}

/// A view of `M` whose translations never raise an I/O page fault
/// ([`DmaMemory::translate_nofault`]).
#[derive(Debug)]
pub struct NoFault<'m, M: ?Sized>(pub &'m M);

// SAFETY: forwards to `M`'s `translate_nofault`, which has the contract of
// `translate` for the borrow of `M` this view holds.
unsafe impl<M: DmaMemory + ?Sized> DmaMemory for NoFault<'_, M> {
    #[inline]
    fn translate(&self, addr: u64, len: u64, write: bool) -> Result<Fragment, PageFault> {
        self.0.translate_nofault(addr, len, write)
    }
}

/// Runs `d`'s operation; a descriptor without block on fault translates
/// without raising I/O page faults (its failure is a partial completion).
fn run_op_for<M: DmaMemory + ?Sized>(
    d: &Descriptor,
    mem: &M,
    p: &mut Progress,
    budget: &mut Budget,
) -> Result<CompletionRecord, Stop> {
    if d.flags & flags::BOF != 0 {
        run_op(d, mem, p, budget)
    } else {
        run_op(d, &NoFault(mem), p, budget)
    }
}

/// Device limits the engine enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Maximum transfer size in bytes.
    pub max_xfer: u32,
    /// Maximum batch size in descriptors.
    pub max_batch: u32,
    /// Advertised operations.
    pub opcap: OpCap,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_xfer: 1 << 31,
            max_batch: 1024,
            opcap: OpCap::supported(),
        }
    }
}

/// How far an operation got; carried across a block-on-fault park.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes completed (from the end for a descending memmove; delta record
    /// bytes consumed for apply-delta).
    pub done: u64,
    /// Raw running CRC state (CRC operations), valid once `started`.
    pub crc: u32,
    /// Delta record bytes written so far (create delta).
    pub delta_size: u32,
    /// Memmove runs in descending address order.
    pub descending: bool,
    /// Last applied delta offset plus one (apply delta), 0 before the first.
    pub last_offset: u32,
    /// The operation's start-up (seed read, direction choice) is done.
    pub started: bool,
}

/// What finishing or stopping a step produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The descriptor completed with this record (written per CRAV/RCR).
    Complete(CompletionRecord),
    /// The descriptor blocked on a fault (BOF=1): park it and raise the fault.
    Blocked(PageFault),
    /// The budget is spent: the job's progress is saved; resume it with
    /// [`Resume::Continue`].
    Yielded,
}

/// A completion record the engine could not write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrWriteFailed {
    /// The completion record address.
    pub cr_addr: u64,
    /// The status that should have been written.
    pub status: u8,
    /// 0x1A (translation) or 0x1B (alignment).
    pub code: u8,
}

/// How a parked descriptor is resumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// First execution.
    Start,
    /// The page request was answered Success: retry the access.
    Success,
    /// The page request was answered Invalid: complete with 0x04 (0x06 for a
    /// batch descriptor list).
    Invalid,
    /// The job yielded ([`Outcome::Yielded`]): carry on from its progress.
    Continue,
}

/// State of a batch in execution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchState {
    /// Index of the next member to read.
    pub next: u32,
    /// Members completed (with any status).
    pub completed: u32,
    /// A member did not succeed.
    pub failed: bool,
    /// The member in execution, when the batch blocked inside it.
    pub member: Option<(Descriptor, Progress)>,
}

/// A descriptor in execution, with everything needed to resume it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Job {
    /// The descriptor (pasid and priv already taken from the portal).
    pub desc: Descriptor,
    /// Progress of a non-batch descriptor.
    pub progress: Progress,
    /// Progress of a batch.
    pub batch: BatchState,
    /// The fault the job last blocked on.
    pub last_fault: PageFault,
    /// The batch blocked reading its descriptor list.
    pub blocked_on_list: bool,
}

impl Job {
    /// A fresh job.
    pub fn new(desc: Descriptor) -> Self {
        Job {
            desc,
            progress: Progress::default(),
            batch: BatchState::default(),
            last_fault: PageFault {
                addr: 0,
                write: false,
            },
            blocked_on_list: false,
        }
    }
}

fn err(code: u8) -> CompletionRecord {
    CompletionRecord::with_status(code)
}

fn end_of(addr: u64, len: u64) -> Option<u64> {
    addr.checked_add(len)
}

fn overlaps(a: u64, b: u64, len: u64) -> bool {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    hi - lo < len
}

/// Flags each opcode defines beyond [`flags::COMMON`].
fn extra_flags(op: u8) -> u32 {
    match op {
        opcode::COMPARE | opcode::COMPVAL | opcode::CR_DELTA => flags::CR,
        opcode::CRCGEN | opcode::COPY_CRC => CRC_READ_SEED,
        _ => 0,
    }
}

/// Mask (bit i = byte 40 + i) of the operation-specific bytes each opcode
/// uses; the rest is reserved.
fn used_op_bytes(op: u8) -> u32 {
    match op {
        opcode::COMPARE | opcode::COMPVAL => 0x1,
        opcode::CR_DELTA => 0xfff | 0x1_0000,
        opcode::AP_DELTA => 0xf,
        opcode::DUALCAST => 0xff,
        opcode::CRCGEN | opcode::COPY_CRC => 0xf | 0xff00,
        _ => 0,
    }
}

/// Validates a descriptor (steps 1 to 8 of the module docs).
pub fn validate(d: &Descriptor, limits: &Limits, in_batch: bool) -> Result<(), CompletionRecord> {
    let op = d.opcode;
    if !limits.opcap.has(op) || (in_batch && (op == opcode::BATCH || op == opcode::DRAIN)) {
        return Err(err(status::BAD_OPCODE));
    }
    if d.privileged {
        return Err(err(status::PRIV_BAD));
    }
    let bad = d.flags & !(flags::COMMON | extra_flags(op));
    if bad != 0 {
        let mut cr = err(status::INVALID_FLAGS);
        cr.set_invalid_flags(bad);
        return Err(cr);
    }
    let mut reserved = d.rsvd0 != 0 || d.rsvd1 != 0;
    let used = used_op_bytes(op);
    for (i, b) in d.op_specific.iter().enumerate() {
        if *b != 0 && used & (1 << i) == 0 {
            reserved = true;
        }
    }
    if reserved {
        return Err(err(status::NOZERO_RESERVE));
    }
    if d.flags & flags::RCI != 0 {
        return Err(err(status::INT_HANDLE_INVAL));
    }
    let len = u64::from(d.xfer_size);
    let size_ok = |addrs: &[u64]| {
        d.xfer_size != 0
            && d.xfer_size <= limits.max_xfer
            && addrs.iter().all(|a| end_of(*a, len).is_some())
    };
    match op {
        opcode::NOOP | opcode::DRAIN => {}
        opcode::BATCH => {
            if d.xfer_size < 2 || d.xfer_size > limits.max_batch {
                return Err(err(status::DESC_CNT_ERANGE));
            }
            if d.src % DESC_LIST_ALIGN != 0 {
                return Err(err(status::DESCLIST_ALIGN));
            }
            if end_of(d.src, len * DESC_SIZE as u64).is_none() {
                return Err(err(status::DESC_CNT_ERANGE));
            }
        }
        opcode::MEMMOVE | opcode::COMPARE => {
            if !size_ok(&[d.src, d.dst]) {
                return Err(err(status::XFER_ERANGE));
            }
        }
        opcode::MEMFILL | opcode::CFLUSH => {
            if !size_ok(&[d.dst]) {
                return Err(err(status::XFER_ERANGE));
            }
        }
        opcode::COMPVAL | opcode::CRCGEN => {
            if !size_ok(&[d.src]) {
                return Err(err(status::XFER_ERANGE));
            }
            if op == opcode::CRCGEN && d.flags & CRC_READ_SEED != 0 && d.seed_addr() % 4 != 0 {
                return Err(err(status::ADDR_ALIGN));
            }
        }
        opcode::COPY_CRC => {
            if !size_ok(&[d.src, d.dst]) {
                return Err(err(status::XFER_ERANGE));
            }
            if d.flags & CRC_READ_SEED != 0 && d.seed_addr() % 4 != 0 {
                return Err(err(status::ADDR_ALIGN));
            }
            if overlaps(d.src, d.dst, len) {
                return Err(err(status::OVERLAP_BUFFERS));
            }
        }
        opcode::DUALCAST => {
            if !size_ok(&[d.src, d.dst, d.dest2()]) {
                return Err(err(status::XFER_ERANGE));
            }
            if d.dst & 0xfff != d.dest2() & 0xfff {
                return Err(err(status::DCAST_ERR));
            }
            if overlaps(d.src, d.dst, len)
                || overlaps(d.src, d.dest2(), len)
                || overlaps(d.dst, d.dest2(), len)
            {
                return Err(err(status::OVERLAP_BUFFERS));
            }
        }
        opcode::CR_DELTA => {
            if !size_ok(&[d.src, d.dst]) || d.xfer_size > MAX_DELTA_XFER || d.xfer_size % 8 != 0 {
                return Err(err(status::XFER_ERANGE));
            }
            let max = d.max_delta_size();
            if max == 0 || max % DELTA_ENTRY != 0 || end_of(d.delta_addr(), max.into()).is_none() {
                return Err(err(status::DR_ERANGE));
            }
            if d.src % 8 != 0 || d.dst % 8 != 0 || d.delta_addr() % 8 != 0 {
                return Err(err(status::ADDR_ALIGN));
            }
        }
        opcode::AP_DELTA => {
            if !size_ok(&[d.dst]) || d.xfer_size > MAX_DELTA_XFER || d.xfer_size % 8 != 0 {
                return Err(err(status::XFER_ERANGE));
            }
            let rec = d.delta_rec_size();
            let max_rec = MAX_DELTA_XFER / 8 * DELTA_ENTRY;
            if rec == 0
                || rec % DELTA_ENTRY != 0
                || rec > max_rec
                || end_of(d.src, rec.into()).is_none()
            {
                return Err(err(status::DR_ERANGE));
            }
            if d.dst % 8 != 0 || d.src % 2 != 0 {
                return Err(err(status::ADDR_ALIGN));
            }
        }
        _ => return Err(err(status::BAD_OPCODE)),
    }
    Ok(())
}

/// Copies `buf.len()` bytes from device memory at `addr`.
pub fn read_bytes<M: DmaMemory + ?Sized>(
    mem: &M,
    addr: u64,
    buf: &mut [u8],
) -> Result<(), PageFault> {
    let mut done = 0usize;
    while done < buf.len() {
        let a = addr.checked_add(done as u64).ok_or(PageFault {
            addr: u64::MAX,
            write: false,
        })?;
        let f = mem.translate(a, (buf.len() - done) as u64, false)?;
        let n = f.len.min(buf.len() - done);
        // SAFETY: the fragment is readable for f.len >= n bytes (DmaMemory
        // contract) and buf[done..done + n] is in bounds.
        unsafe { std::ptr::copy_nonoverlapping(f.ptr, buf[done..].as_mut_ptr(), n) };
        done += n;
    }
    Ok(())
}

/// Copies `buf` into device memory at `addr`.
pub fn write_bytes<M: DmaMemory + ?Sized>(mem: &M, addr: u64, buf: &[u8]) -> Result<(), PageFault> {
    let mut done = 0usize;
    while done < buf.len() {
        let a = addr.checked_add(done as u64).ok_or(PageFault {
            addr: u64::MAX,
            write: true,
        })?;
        let f = mem.translate(a, (buf.len() - done) as u64, true)?;
        let n = f.len.min(buf.len() - done);
        // SAFETY: the fragment is writable for f.len >= n bytes and the source
        // slice holds n bytes from `done`.
        unsafe { std::ptr::copy_nonoverlapping(buf[done..].as_ptr(), f.ptr, n) };
        done += n;
    }
    Ok(())
}

/// Writes a completion record: bytes 1..32 first, then the status byte with
/// release ordering, so a reader that sees the status sees the rest.
pub fn write_completion<M: DmaMemory + ?Sized>(
    mem: &M,
    addr: u64,
    cr: &CompletionRecord,
) -> Result<(), CrWriteFailed> {
    let fail = |code| CrWriteFailed {
        cr_addr: addr,
        status: cr.status,
        code,
    };
    if addr % CR_ALIGN != 0 {
        return Err(fail(status::CRA_ALIGN));
    }
    // A 32-byte aligned record never crosses a page, so one fragment holds it.
    let f = mem
        .translate_nofault(addr, CR_SIZE as u64, true)
        .map_err(|_| fail(status::CRA_XLAT))?;
    if f.len < CR_SIZE {
        return Err(fail(status::CRA_XLAT));
    }
    let bytes = cr.to_bytes();
    // SAFETY: the fragment is writable for 32 bytes; bytes 1..32 are copied.
    unsafe { std::ptr::copy_nonoverlapping(bytes[1..].as_ptr(), f.ptr.add(1), CR_SIZE - 1) };
    // SAFETY: f.ptr is valid and writable for one byte; AtomicU8 has the
    // alignment of u8, and the byte is only ever accessed by single-byte
    // loads and stores on both sides.
    let st = unsafe { AtomicU8::from_ptr(f.ptr) };
    st.store(cr.status, Ordering::Release);
    Ok(())
}

/// Walks two ranges of equal length fragment by fragment from `done`,
/// calling `f(src_ptr, dst_ptr, n, offset)`; stops at the first fault, and
/// yields once `budget` is spent (after a fragment: `done` counts every
/// byte `f` was given; the first fragment always runs).
fn zip2<M: DmaMemory + ?Sized>(
    mem: &M,
    (a, a_write): (u64, bool),
    (b, b_write): (u64, bool),
    len: u64,
    done: &mut u64,
    budget: &mut Budget,
    mut f: impl FnMut(*mut u8, *mut u8, usize, u64) -> bool,
) -> Result<(), Stop> {
    while *done < len {
        let rem = budget.clamp(len - *done);
        let fa = mem.translate(a + *done, rem, a_write)?;
        let fb = mem.translate(b + *done, rem, b_write)?;
        let n = fa.len.min(fb.len).min(rem as usize);
        budget.charge(n as u64);
        if !f(fa.ptr, fb.ptr, n, *done) {
            return Ok(());
        }
        *done += n as u64;
        if budget.is_spent() && *done < len {
            return Err(Stop::Yield);
        }
    }
    Ok(())
}

/// [`zip2`] over one range.
fn walk1<M: DmaMemory + ?Sized>(
    mem: &M,
    a: u64,
    write: bool,
    len: u64,
    done: &mut u64,
    budget: &mut Budget,
    mut f: impl FnMut(*mut u8, usize, u64) -> bool,
) -> Result<(), Stop> {
    while *done < len {
        let rem = budget.clamp(len - *done);
        let fa = mem.translate(a + *done, rem, write)?;
        let n = fa.len.min(rem as usize);
        budget.charge(n as u64);
        if !f(fa.ptr, n, *done) {
            return Ok(());
        }
        *done += n as u64;
        if budget.is_spent() && *done < len {
            return Err(Stop::Yield);
        }
    }
    Ok(())
}

/// Index of the first differing byte of two host ranges.
///
/// # Safety
/// Both pointers must be readable for `n` bytes.
unsafe fn first_diff(a: *const u8, b: *const u8, n: usize) -> Option<usize> {
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, both readable for n bytes.
        let x = unsafe { a.add(i).cast::<u64>().read_unaligned() };
        // SAFETY: as above.
        let y = unsafe { b.add(i).cast::<u64>().read_unaligned() };
        if x != y {
            return Some(i + ((x ^ y).to_le().trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        let (x, y) = unsafe { (a.add(i).read(), b.add(i).read()) };
        if x != y {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Index of the first byte of a host range that differs from `pattern`
/// repeated from phase `phase`.
///
/// # Safety
/// `p` must be readable for `n` bytes.
unsafe fn first_diff_pattern(p: *const u8, n: usize, pattern: u64, phase: u64) -> Option<usize> {
    let pat = pattern.to_le_bytes();
    let rot = pattern.rotate_right(8 * (phase % 8) as u32);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n.
        let x = unsafe { p.add(i).cast::<u64>().read_unaligned() };
        if u64::from_le(x) != rot {
            break;
        }
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        let x = unsafe { p.add(i).read() };
        if x != pat[((phase + i as u64) % 8) as usize] {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Fills `n` bytes at `p` with `pattern` repeated from phase `phase`.
///
/// # Safety
/// `p` must be writable for `n` bytes.
unsafe fn fill_pattern(p: *mut u8, n: usize, pattern: u64, phase: u64) {
    let pat = pattern.to_le_bytes();
    let rot = pattern.rotate_right(8 * (phase % 8) as u32).to_le();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n.
        unsafe { p.add(i).cast::<u64>().write_unaligned(rot) };
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        unsafe { p.add(i).write(pat[((phase + i as u64) % 8) as usize]) };
        i += 1;
    }
}

fn memmove<M: DmaMemory + ?Sized>(
    d: &Descriptor,
    mem: &M,
    p: &mut Progress,
    budget: &mut Budget,
) -> Result<CompletionRecord, Stop> {
    let len = u64::from(d.xfer_size);
    if !p.started {
        p.descending = d.dst > d.src && overlaps(d.src, d.dst, len);
        p.started = true;
    }
    if !p.descending {
        zip2(
            mem,
            (d.src, false),
            (d.dst, true),
            len,
            &mut p.done,
            budget,
            |s, t, n, _| {
                // SAFETY: s is readable and t writable for n bytes (DmaMemory);
                // they may overlap, which move_bytes allows.
                unsafe { crate::copy::move_bytes(s, t, n) };
                true
            },
        )?;
    } else {
        // Descending: copy the tail first, page by page, so an overlapping
        // destination above the source never overwrites unread bytes.
        while p.done < len {
            let end = len - p.done;
            let page_rem = |x: u64| ((x - 1) & (PAGE - 1)) + 1;
            let mut chunk = budget.clamp(end.min(page_rem(d.src + end)).min(page_rem(d.dst + end)));
            loop {
                let start = end - chunk;
                let fs = mem.translate(d.src + start, chunk, false)?;
                let fd = mem.translate(d.dst + start, chunk, true)?;
                let n = fs.len.min(fd.len) as u64;
                if n >= chunk {
                    // SAFETY: both fragments cover `chunk` bytes; ptr::copy
                    // handles overlap.
                    unsafe { std::ptr::copy(fs.ptr, fd.ptr, chunk as usize) };
                    break;
                }
                chunk = n;
            }
            budget.charge(chunk);
            p.done += chunk;
            if budget.is_spent() && p.done < len {
                return Err(Stop::Yield);
            }
        }
    }
    let mut cr = err(status::SUCCESS);
    cr.result = u8::from(p.descending);
    cr.bytes_completed = d.xfer_size;
    Ok(cr)
}

/// Executes one non-batch descriptor from `p`, within `budget`. On a fault
/// or a yield, `p` says how far it got.
pub fn run_op<M: DmaMemory + ?Sized>(
    d: &Descriptor,
    mem: &M,
    p: &mut Progress,
    budget: &mut Budget,
) -> Result<CompletionRecord, Stop> {
    let len = u64::from(d.xfer_size);
    let mut cr = err(status::SUCCESS);
    match d.opcode {
        opcode::NOOP | opcode::DRAIN => {}
        opcode::MEMMOVE => return memmove(d, mem, p, budget),
        opcode::MEMFILL => {
            let pattern = d.src;
            walk1(mem, d.dst, true, len, &mut p.done, budget, |t, n, off| {
                // SAFETY: t is writable for n bytes.
                unsafe { fill_pattern(t, n, pattern, off) };
                true
            })?;
        }
        opcode::COMPARE => {
            let mut diff = None;
            zip2(
                mem,
                (d.src, false),
                (d.dst, false),
                len,
                &mut p.done,
                budget,
                |a, b, n, off| {
                    // SAFETY: both fragments are readable for n bytes.
                    match unsafe { first_diff(a, b, n) } {
                        Some(i) => {
                            diff = Some(off + i as u64);
                            false
                        }
                        None => true,
                    }
                },
            )?;
            compare_result(d, &mut cr, diff, len);
            return Ok(cr);
        }
        opcode::COMPVAL => {
            let pattern = d.dst;
            let mut diff = None;
            walk1(mem, d.src, false, len, &mut p.done, budget, |a, n, off| {
                // SAFETY: the fragment is readable for n bytes.
                match unsafe { first_diff_pattern(a, n, pattern, off) } {
                    Some(i) => {
                        diff = Some(off + i as u64);
                        false
                    }
                    None => true,
                }
            })?;
            compare_result(d, &mut cr, diff, len);
            return Ok(cr);
        }
        opcode::CRCGEN | opcode::COPY_CRC => {
            if !p.started {
                let seed = if d.flags & CRC_READ_SEED != 0 {
                    let mut s = [0u8; 4];
                    read_bytes(mem, d.seed_addr(), &mut s)?;
                    u32::from_le_bytes(s)
                } else {
                    d.crc_seed()
                };
                p.crc = !seed;
                p.started = true;
            }
            let mut crc = p.crc;
            let res = if d.opcode == opcode::CRCGEN {
                walk1(mem, d.src, false, len, &mut p.done, budget, |a, n, _| {
                    // SAFETY: the fragment is readable for n bytes.
                    crc = unsafe { crc::update_raw(crc, a, n) };
                    true
                })
            } else {
                zip2(
                    mem,
                    (d.src, false),
                    (d.dst, true),
                    len,
                    &mut p.done,
                    budget,
                    |a, t, n, _| {
                        // SAFETY: a readable, t writable for n bytes; validation
                        // rejected overlapping buffers.
                        unsafe { std::ptr::copy_nonoverlapping(a, t, n) };
                        // SAFETY: the source fragment is readable for n bytes.
                        crc = unsafe { crc::update_raw(crc, a, n) };
                        true
                    },
                )
            };
            p.crc = crc;
            res?;
            cr.set_crc_val(!p.crc);
        }
        opcode::DUALCAST => {
            let dest2 = d.dest2();
            while p.done < len {
                let rem = budget.clamp(len - p.done);
                let fs = mem.translate(d.src + p.done, rem, false)?;
                let f1 = mem.translate(d.dst + p.done, rem, true)?;
                let f2 = mem.translate(dest2 + p.done, rem, true)?;
                let n = fs.len.min(f1.len).min(f2.len).min(rem as usize);
                budget.charge(n as u64);
                // SAFETY: all three fragments cover n bytes; validation
                // rejected overlapping buffers.
                unsafe { std::ptr::copy_nonoverlapping(fs.ptr, f1.ptr, n) };
                // SAFETY: as above.
                unsafe { std::ptr::copy_nonoverlapping(fs.ptr, f2.ptr, n) };
                p.done += n as u64;
                if budget.is_spent() && p.done < len {
                    return Err(Stop::Yield);
                }
            }
        }
        opcode::CFLUSH => {
            // Coherent software device: nothing to flush, but every page
            // must translate.
            walk1(mem, d.dst, false, len, &mut p.done, budget, |_, _, _| true)?;
        }
        // Bounded by MAX_DELTA_XFER: not split, charged as a whole.
        opcode::CR_DELTA => {
            budget.charge(len);
            return create_delta(d, mem, p).map_err(Stop::Fault);
        }
        opcode::AP_DELTA => {
            budget.charge(u64::from(d.delta_rec_size()));
            return apply_delta(d, mem, p).map_err(Stop::Fault);
        }
        _ => return Ok(err(status::BAD_OPCODE)),
    }
    cr.bytes_completed = d.xfer_size;
    Ok(cr)
}

fn compare_result(d: &Descriptor, cr: &mut CompletionRecord, diff: Option<u64>, len: u64) {
    match diff {
        Some(off) => {
            cr.result = 1;
            cr.bytes_completed = off as u32;
        }
        None => {
            cr.result = 0;
            cr.bytes_completed = len as u32;
        }
    }
    if d.flags & flags::CR != 0 && cr.result != d.expected_res() {
        cr.status = status::SUCCESS_PRED;
    }
}

fn create_delta<M: DmaMemory + ?Sized>(
    d: &Descriptor,
    mem: &M,
    p: &mut Progress,
) -> Result<CompletionRecord, PageFault> {
    let len = u64::from(d.xfer_size);
    let max = d.max_delta_size();
    let mut overflow = false;
    while p.done < len && !overflow {
        let rem = len - p.done;
        let fa = mem.translate(d.src + p.done, rem, false)?;
        let fb = mem.translate(d.dst + p.done, rem, false)?;
        let n = (fa.len.min(fb.len) as u64).min(rem) & !7;
        if n == 0 {
            // Fragments shorter than a word: read the word piecewise.
            let mut a = [0u8; 8];
            let mut b = [0u8; 8];
            read_bytes(mem, d.src + p.done, &mut a)?;
            read_bytes(mem, d.dst + p.done, &mut b)?;
            if a != b {
                if p.delta_size + DELTA_ENTRY > max {
                    overflow = true;
                    break;
                }
                put_entry(mem, d, p, b)?;
            }
            p.done += 8;
            continue;
        }
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 <= n and both fragments are readable for n bytes.
            let x = unsafe { fa.ptr.add(i as usize).cast::<u64>().read_unaligned() };
            // SAFETY: as above.
            let y = unsafe { fb.ptr.add(i as usize).cast::<u64>().read_unaligned() };
            if x != y {
                if p.delta_size + DELTA_ENTRY > max {
                    overflow = true;
                    break;
                }
                put_entry(mem, d, p, y.to_ne_bytes())?;
            }
            i += 8;
            p.done += 8;
        }
    }
    let mut cr = err(status::SUCCESS);
    cr.result = if overflow {
        2
    } else {
        u8::from(p.delta_size != 0)
    };
    cr.bytes_completed = p.done as u32;
    cr.set_delta_rec_size(p.delta_size);
    if d.flags & flags::CR != 0 && d.expected_res_mask() & (1 << cr.result) == 0 {
        cr.status = status::SUCCESS_PRED;
    }
    Ok(cr)
}

fn put_entry<M: DmaMemory + ?Sized>(
    mem: &M,
    d: &Descriptor,
    p: &mut Progress,
    data: [u8; 8],
) -> Result<(), PageFault> {
    let mut e = [0u8; DELTA_ENTRY as usize];
    e[0..2].copy_from_slice(&((p.done / 8) as u16).to_le_bytes());
    e[2..].copy_from_slice(&data);
    write_bytes(mem, d.delta_addr() + u64::from(p.delta_size), &e)?;
    p.delta_size += DELTA_ENTRY;
    Ok(())
}

fn apply_delta<M: DmaMemory + ?Sized>(
    d: &Descriptor,
    mem: &M,
    p: &mut Progress,
) -> Result<CompletionRecord, PageFault> {
    let rec = u64::from(d.delta_rec_size());
    while p.done < rec {
        let mut e = [0u8; DELTA_ENTRY as usize];
        read_bytes(mem, d.src + p.done, &mut e)?;
        let off = u32::from(u16::from_le_bytes([e[0], e[1]]));
        let fail = |code| {
            let mut cr = err(code);
            cr.bytes_completed = p.done as u32;
            cr
        };
        if p.last_offset != 0 && off < p.last_offset {
            return Ok(fail(status::DR_OFFSET_NOINC));
        }
        if u64::from(off) * 8 + 8 > u64::from(d.xfer_size) {
            return Ok(fail(status::DR_OFFSET_ERANGE));
        }
        write_bytes(mem, d.dst + u64::from(off) * 8, &e[2..])?;
        p.last_offset = off + 1;
        p.done += u64::from(DELTA_ENTRY);
    }
    let mut cr = err(status::SUCCESS);
    cr.bytes_completed = rec as u32;
    Ok(cr)
}

/// The record for a descriptor that stopped on `fault` after `p`: status
/// `code` (0x03 or 0x04) with the write bit, fault address and progress.
pub fn partial_record(
    d: &Descriptor,
    p: &Progress,
    fault: PageFault,
    code: u8,
) -> CompletionRecord {
    let mut cr = err(code | if fault.write { status::WRITE } else { 0 });
    cr.fault_addr = fault.addr;
    cr.bytes_completed = p.done as u32;
    match d.opcode {
        opcode::MEMMOVE => cr.result = u8::from(p.descending),
        opcode::CRCGEN | opcode::COPY_CRC => {
            // The CRC of the completed part: the seed that continues it.
            let v = if p.started { !p.crc } else { d.crc_seed() };
            cr.set_crc_val(v);
        }
        opcode::CR_DELTA => cr.set_delta_rec_size(p.delta_size),
        _ => {}
    }
    cr
}

/// Whether a record is written for `status` under the descriptor's flags:
/// always with RCR, only on failure with CRAV alone.
pub fn wants_record(d: &Descriptor, st: u8) -> bool {
    d.flags & flags::CRAV != 0 && (d.flags & flags::RCR != 0 || st != status::SUCCESS)
}

/// Executes (or resumes) a job to completion or a block on fault. Batch
/// members' records are written here; the job's own record is returned in
/// [`Outcome::Complete`] for the caller to write. Records that cannot be
/// written go to `cr_failed`. Never [`Outcome::Yielded`].
pub fn execute<M: DmaMemory + ?Sized>(
    job: &mut Job,
    mem: &M,
    limits: &Limits,
    resume: Resume,
    cr_failed: &mut dyn FnMut(CrWriteFailed),
) -> Outcome {
    execute_bounded(
        job,
        mem,
        limits,
        resume,
        &mut Budget::unlimited(),
        cr_failed,
    )
}

/// [`execute`] within `budget`: once it is spent the job stops with
/// [`Outcome::Yielded`], its progress saved; resume it with
/// [`Resume::Continue`] (and a new budget). Every call makes progress
/// before it yields (an operation does at least one fragment of up to
/// 4 KiB, a batch at least one member step), even on a spent budget.
pub fn execute_bounded<M: DmaMemory + ?Sized>(
    job: &mut Job,
    mem: &M,
    limits: &Limits,
    resume: Resume,
    budget: &mut Budget,
    cr_failed: &mut dyn FnMut(CrWriteFailed),
) -> Outcome {
    let out = execute_step(job, mem, limits, resume, budget, cr_failed);
    if let Outcome::Complete(_) = out {
        // Charged once it is done, so that a descriptor of exactly the
        // budget completes without a yield before its last bytes.
        budget.charge(DESC_COST);
    }
    out
}

fn execute_step<M: DmaMemory + ?Sized>(
    job: &mut Job,
    mem: &M,
    limits: &Limits,
    resume: Resume,
    budget: &mut Budget,
    cr_failed: &mut dyn FnMut(CrWriteFailed),
) -> Outcome {
    let d = job.desc;
    if resume == Resume::Start {
        if let Err(cr) = validate(&d, limits, false) {
            return Outcome::Complete(cr);
        }
    }
    if d.opcode == opcode::BATCH {
        return run_batch(job, mem, limits, resume, budget, cr_failed);
    }
    if resume == Resume::Invalid {
        return Outcome::Complete(partial_record(
            &d,
            &job.progress,
            job.last_fault,
            status::PAGE_FAULT_IR,
        ));
    }
    match run_op_for(&d, mem, &mut job.progress, budget) {
        Ok(cr) => Outcome::Complete(cr),
        Err(Stop::Yield) => Outcome::Yielded,
        Err(Stop::Fault(f)) if d.flags & flags::BOF != 0 => {
            job.last_fault = f;
            Outcome::Blocked(f)
        }
        Err(Stop::Fault(f)) => Outcome::Complete(partial_record(
            &d,
            &job.progress,
            f,
            status::PAGE_FAULT_NOBOF,
        )),
    }
}

fn batch_fault_record(job: &Job, f: PageFault) -> CompletionRecord {
    let mut cr = err(status::BATCH_PAGE_FAULT);
    cr.fault_addr = f.addr;
    cr.bytes_completed = job.batch.completed;
    cr
}

fn finish_member<M: DmaMemory + ?Sized>(
    job: &mut Job,
    md: &Descriptor,
    cr: CompletionRecord,
    mem: &M,
    budget: &mut Budget,
    cr_failed: &mut dyn FnMut(CrWriteFailed),
) {
    job.batch.completed += 1;
    budget.charge(DESC_COST);
    if cr.status != status::SUCCESS {
        job.batch.failed = true;
    }
    if wants_record(md, cr.status) {
        if let Err(e) = write_completion(mem, md.completion_addr, &cr) {
            cr_failed(e);
        }
    }
}

fn run_batch<M: DmaMemory + ?Sized>(
    job: &mut Job,
    mem: &M,
    limits: &Limits,
    mut resume: Resume,
    budget: &mut Budget,
    cr_failed: &mut dyn FnMut(CrWriteFailed),
) -> Outcome {
    let count = job.desc.xfer_size;
    if job.blocked_on_list {
        job.blocked_on_list = false;
        if resume == Resume::Invalid {
            return Outcome::Complete(batch_fault_record(job, job.last_fault));
        }
        resume = Resume::Start;
    }
    // The first step of this execution always runs (progress), later ones
    // only while the budget lasts.
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) && budget.is_spent() {
            return Outcome::Yielded;
        }
        if let Some((md, mut mp)) = job.batch.member.take() {
            let r = if resume == Resume::Invalid {
                Ok(partial_record(
                    &md,
                    &mp,
                    job.last_fault,
                    status::PAGE_FAULT_IR,
                ))
            } else {
                run_op_for(&md, mem, &mut mp, budget)
            };
            resume = Resume::Start;
            let cr = match r {
                Ok(cr) => cr,
                Err(Stop::Yield) => {
                    job.batch.member = Some((md, mp));
                    return Outcome::Yielded;
                }
                Err(Stop::Fault(f)) if md.flags & flags::BOF != 0 => {
                    job.batch.member = Some((md, mp));
                    job.last_fault = f;
                    return Outcome::Blocked(f);
                }
                Err(Stop::Fault(f)) => partial_record(&md, &mp, f, status::PAGE_FAULT_NOBOF),
            };
            finish_member(job, &md, cr, mem, budget, cr_failed);
            continue;
        }
        if job.batch.next >= count {
            break;
        }
        let addr = job.desc.src + DESC_SIZE as u64 * u64::from(job.batch.next);
        let mut raw = [0u8; DESC_SIZE];
        let read = if job.desc.flags & flags::BOF != 0 {
            read_bytes(mem, addr, &mut raw)
        } else {
            read_bytes(&NoFault(mem), addr, &mut raw)
        };
        if let Err(f) = read {
            if job.desc.flags & flags::BOF != 0 {
                job.blocked_on_list = true;
                job.last_fault = f;
                return Outcome::Blocked(f);
            }
            return Outcome::Complete(batch_fault_record(job, f));
        }
        job.batch.next += 1;
        let mut md = Descriptor::from_bytes(&raw);
        // Members run in the batch's address space with its privilege.
        md.pasid = job.desc.pasid;
        md.privileged = job.desc.privileged;
        if md.flags & flags::FENCE != 0 && job.batch.failed {
            // A fence after a failure abandons the rest of the batch.
            job.batch.next = count;
            break;
        }
        match validate(&md, limits, true) {
            Err(cr) => finish_member(job, &md, cr, mem, budget, cr_failed),
            Ok(()) => job.batch.member = Some((md, Progress::default())),
        }
    }
    let mut cr = err(if job.batch.failed {
        status::BATCH_FAIL
    } else {
        status::SUCCESS
    });
    cr.bytes_completed = job.batch.completed;
    Outcome::Complete(cr)
}

/// Plain-buffer memory for unit tests: regions at chosen device addresses,
/// optionally split into small host-discontiguous fragments.
#[cfg(test)]
pub(crate) mod testmem {
    use super::*;

    pub(crate) struct Region {
        pub iova: u64,
        pub buf: Box<[u8]>,
        pub ptr: *mut u8,
        pub write: bool,
    }

    #[derive(Default)]
    pub(crate) struct TestMemory {
        pub regions: Vec<Region>,
    }

    impl TestMemory {
        /// Maps `len` zeroed bytes at `iova`, in pieces of `piece` bytes with
        /// separate host buffers.
        pub fn map_pieces(&mut self, iova: u64, len: usize, piece: usize, write: bool) {
            let mut off = 0;
            while off < len {
                let n = piece.min(len - off);
                let mut buf = vec![0u8; n].into_boxed_slice();
                let ptr = buf.as_mut_ptr();
                self.regions.push(Region {
                    iova: iova + off as u64,
                    buf,
                    ptr,
                    write,
                });
                off += n;
            }
        }

        pub fn map(&mut self, iova: u64, len: usize) {
            self.map_pieces(iova, len, len, true);
        }

        pub fn unmap(&mut self, iova: u64) {
            self.regions.retain(|r| r.iova != iova);
        }

        pub fn write(&self, iova: u64, data: &[u8]) {
            write_bytes(self, iova, data).expect("test write mapped");
        }

        pub fn read(&self, iova: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            read_bytes(self, iova, &mut v).expect("test read mapped");
            v
        }

        pub fn cr(&self, iova: u64) -> CompletionRecord {
            let v = self.read(iova, CR_SIZE);
            let mut b = [0u8; CR_SIZE];
            b.copy_from_slice(&v);
            CompletionRecord::from_bytes(&b)
        }
    }

    // SAFETY: each fragment lies inside one region's boxed buffer, which
    // lives as long as the TestMemory and is only accessed through `ptr`.
    unsafe impl DmaMemory for TestMemory {
        fn translate(&self, addr: u64, len: u64, write: bool) -> Result<Fragment, PageFault> {
            for r in &self.regions {
                let end = r.iova + r.buf.len() as u64;
                if addr >= r.iova && addr < end {
                    if write && !r.write {
                        break;
                    }
                    let off = (addr - r.iova) as usize;
                    let n = (end - addr).min(len) as usize;
                    // SAFETY: off < buf.len().
                    let ptr = unsafe { r.ptr.add(off) };
                    return Ok(Fragment { ptr, len: n });
                }
            }
            Err(PageFault { addr, write })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testmem::TestMemory;
    use super::*;

    const SRC: u64 = 0x10_0000;
    const DST: u64 = 0x20_0000;
    const CR: u64 = 0x30_0000;
    const AUX: u64 = 0x40_0000;

    fn mem() -> TestMemory {
        let mut m = TestMemory::default();
        m.map_pieces(SRC, 0x10000, 4096, true);
        m.map_pieces(DST, 0x10000, 1000, true);
        m.map(CR, 4096);
        m.map(AUX, 0x10000);
        m
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn desc(op: u8, fl: u32) -> Descriptor {
        let mut d = Descriptor::new(op, fl | flags::CRAV | flags::RCR);
        d.completion_addr = CR;
        d
    }

    fn run(m: &TestMemory, d: Descriptor) -> CompletionRecord {
        let mut job = Job::new(d);
        let mut failed = Vec::new();
        match execute(&mut job, m, &Limits::default(), Resume::Start, &mut |e| {
            failed.push(e)
        }) {
            Outcome::Complete(cr) => cr,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Runs `d` with `budget` bytes per step, resuming after every yield
    /// (and answering every block Invalid); returns the record and the
    /// number of yields.
    fn run_bounded(m: &TestMemory, d: Descriptor, budget: u64) -> (CompletionRecord, u32) {
        let mut job = Job::new(d);
        let lim = Limits::default();
        let mut resume = Resume::Start;
        let mut yields = 0;
        for _ in 0..1_000_000 {
            let mut b = Budget::new(budget);
            match execute_bounded(&mut job, m, &lim, resume, &mut b, &mut |_| {}) {
                Outcome::Complete(cr) => return (cr, yields),
                Outcome::Yielded => {
                    yields += 1;
                    resume = Resume::Continue;
                }
                Outcome::Blocked(_) => resume = Resume::Invalid,
            }
        }
        panic!("never completed")
    }

    /// The contents of every region of `m`.
    fn snapshot(m: &TestMemory) -> Vec<(u64, Vec<u8>)> {
        m.regions
            .iter()
            .map(|r| (r.iova, m.read(r.iova, r.buf.len())))
            .collect()
    }

    /// Every operation split into small steps (yield, resume) ends with the
    /// record and memory of a run in one go, including a partial
    /// completion after several yields and a batch that yields inside and
    /// between members.
    #[test]
    fn test_bounded_execution_matches_one_go() {
        let init = |m: &TestMemory| {
            m.write(SRC, &pattern(0x10000, 9));
            m.write(DST, &pattern(0x10000, 9));
            m.write(DST + 0x8000, &[0xee]);
        };
        let mut descs = Vec::new();
        let mut mv = desc(opcode::MEMMOVE, 0);
        (mv.src, mv.dst, mv.xfer_size) = (SRC + 3, DST + 5, 0xf000);
        descs.push(mv);
        let mut down = desc(opcode::MEMMOVE, 0);
        (down.src, down.dst, down.xfer_size) = (SRC, SRC + 100, 0xf000);
        descs.push(down);
        let mut fill = desc(opcode::MEMFILL, 0);
        (fill.src, fill.dst, fill.xfer_size) = (0x0807_0605_0403_0201, DST + 1, 0xf000);
        descs.push(fill);
        let mut cmp = desc(opcode::COMPARE, 0);
        (cmp.src, cmp.dst, cmp.xfer_size) = (SRC, DST, 0x10000);
        descs.push(cmp);
        let mut crc = desc(opcode::CRCGEN, 0);
        (crc.src, crc.xfer_size) = (SRC + 1, 0xfff0);
        crc.set_op_u32(0, 0x1234_5678);
        descs.push(crc);
        let mut ccrc = desc(opcode::COPY_CRC, 0);
        (ccrc.src, ccrc.dst, ccrc.xfer_size) = (SRC, DST, 0x10000);
        descs.push(ccrc);
        let mut dc = desc(opcode::DUALCAST, 0);
        (dc.src, dc.dst, dc.xfer_size) = (SRC, DST, 0x8000);
        dc.set_op_u64(0, AUX);
        descs.push(dc);
        let mut cf = desc(opcode::CFLUSH, 0);
        (cf.dst, cf.xfer_size) = (DST, 0x10000);
        descs.push(cf);
        // Runs past the end of SRC: a partial completion after yields.
        let mut part = desc(opcode::MEMMOVE, 0);
        (part.src, part.dst, part.xfer_size) = (SRC + 0x8000, AUX, 0x9000);
        descs.push(part);
        let mut part_crc = desc(opcode::CRCGEN, 0);
        (part_crc.src, part_crc.xfer_size) = (SRC + 0x100, 0x11000);
        descs.push(part_crc);
        // A batch: moves, a failing member, a fence.
        let mut list: Vec<_> = (0..4).map(|i| member_move(i, 0)).collect();
        for m in &mut list {
            m.xfer_size = 0x3000;
        }
        list[2].src = 0x70_0000;
        list[3].flags |= flags::FENCE;
        let mut b = desc(opcode::BATCH, 0);
        b.src = AUX + 0x8000;
        b.xfer_size = 4;
        for d in descs.iter().chain([&b]) {
            let one = mem();
            init(&one);
            put_list(&one, AUX + 0x8000, &list);
            let want = run(&one, *d);
            for budget in [1, 1000, 4096, 5000, 0x8000] {
                let m = mem();
                init(&m);
                put_list(&m, AUX + 0x8000, &list);
                let (got, yields) = run_bounded(&m, *d, budget);
                assert_eq!(got, want, "opcode {:#x} budget {budget}", d.opcode);
                assert_eq!(
                    snapshot(&m),
                    snapshot(&one),
                    "opcode {:#x} budget {budget}",
                    d.opcode
                );
                if budget <= 4096 && d.xfer_size >= 0x8000 && d.opcode != opcode::BATCH {
                    assert!(yields >= 1, "opcode {:#x} never yielded", d.opcode);
                }
            }
        }
        // The failing batch member's record, and the partial record's
        // progress, are those of the run in one go (checked above); the
        // batch itself yields between and inside members.
        let m = mem();
        put_list(&m, AUX + 0x8000, &list);
        let (cr, yields) = run_bounded(&m, b, 4096);
        assert_eq!((cr.status, cr.bytes_completed), (status::BATCH_FAIL, 3));
        assert!(yields >= 3, "{yields} yields");
        // A descriptor of exactly the budget completes without a yield (the
        // per-descriptor charge comes after it).
        let mut f = desc(opcode::MEMFILL, 0);
        (f.dst, f.xfer_size) = (AUX, 0x8000);
        let (cr, yields) = run_bounded(&mem(), f, 0x8000);
        assert_eq!((cr.status, yields), (status::SUCCESS, 0));
    }

    /// A block on fault after a yield resumes from the yield's progress.
    #[test]
    fn test_block_on_fault_after_yield() {
        let mut m = mem();
        m.write(SRC, &pattern(0x10000, 5));
        let mut d = desc(opcode::MEMMOVE, flags::BOF);
        (d.src, d.dst, d.xfer_size) = (SRC, 0x80_0000, 0x8000);
        m.map(0x80_0000, 0x4000);
        let mut job = Job::new(d);
        let lim = Limits::default();
        let mut b = Budget::new(0x1000);
        assert_eq!(
            execute_bounded(&mut job, &m, &lim, Resume::Start, &mut b, &mut |_| {}),
            Outcome::Yielded
        );
        let mut yields = 1;
        let blocked = loop {
            let mut b = Budget::new(0x1000);
            match execute_bounded(&mut job, &m, &lim, Resume::Continue, &mut b, &mut |_| {}) {
                Outcome::Yielded => yields += 1,
                Outcome::Blocked(f) => break f,
                Outcome::Complete(cr) => panic!("completed {cr:?}"),
            }
            assert!(yields < 100);
        };
        assert_eq!(blocked.addr, 0x80_4000);
        assert_eq!(job.progress.done, 0x4000);
        m.map(0x80_4000, 0x4000);
        let Outcome::Complete(cr) = execute_bounded(
            &mut job,
            &m,
            &lim,
            Resume::Success,
            &mut Budget::unlimited(),
            &mut |_| {},
        ) else {
            panic!("not complete")
        };
        assert_eq!((cr.status, cr.bytes_completed), (status::SUCCESS, 0x8000));
        assert_eq!(m.read(0x80_0000, 0x8000), pattern(0x10000, 5)[..0x8000]);
    }

    #[test]
    fn test_memmove_across_fragments() {
        let m = mem();
        let data = pattern(9000, 1);
        m.write(SRC + 3, &data);
        let mut d = desc(opcode::MEMMOVE, 0);
        d.src = SRC + 3;
        d.dst = DST + 5;
        d.xfer_size = 9000;
        let cr = run(&m, d);
        assert_eq!(cr.status, status::SUCCESS);
        assert_eq!(cr.result, 0);
        assert_eq!(cr.bytes_completed, 9000);
        assert_eq!(m.read(DST + 5, 9000), data);
    }

    #[test]
    fn test_memmove_overlap_descending_reports_direction() {
        let m = mem();
        let data = pattern(10000, 2);
        m.write(SRC, &data);
        let mut d = desc(opcode::MEMMOVE, 0);
        d.src = SRC;
        d.dst = SRC + 100;
        d.xfer_size = 10000;
        let cr = run(&m, d);
        assert_eq!(cr.status, status::SUCCESS);
        assert_eq!(cr.result, 1);
        assert_eq!(m.read(SRC + 100, 10000), data);
        // Overlap downwards is ascending.
        let mut d = desc(opcode::MEMMOVE, 0);
        d.src = SRC + 100;
        d.dst = SRC + 50;
        d.xfer_size = 10000;
        let cr = run(&m, d);
        assert_eq!(cr.result, 0);
        assert_eq!(m.read(SRC + 50, 10000), data);
    }

    #[test]
    fn test_memmove_partial_completion_bof0() {
        let m = mem();
        let mut d = desc(opcode::MEMMOVE, 0);
        d.src = SRC + 0x10000 - 100;
        d.dst = DST;
        d.xfer_size = 300;
        let cr = run(&m, d);
        assert_eq!(cr.code(), status::PAGE_FAULT_NOBOF);
        assert!(!cr.fault_was_write());
        assert_eq!(cr.fault_addr, SRC + 0x10000);
        assert_eq!(cr.bytes_completed, 100);
        // A write fault sets bit 7.
        let mut d = desc(opcode::MEMMOVE, 0);
        d.src = SRC;
        d.dst = DST + 0x10000 - 10;
        d.xfer_size = 64;
        let cr = run(&m, d);
        assert_eq!(cr.status, status::PAGE_FAULT_NOBOF | status::WRITE);
        assert_eq!(cr.fault_addr, DST + 0x10000);
        assert_eq!(cr.bytes_completed, 10);
    }

    #[test]
    fn test_memmove_descending_partial_counts_from_end() {
        let mut m = TestMemory::default();
        m.map(0x1000, 0x1000);
        m.map(0x3000, 0x2000);
        m.map(CR, 4096);
        let mut d = desc(opcode::MEMMOVE, 0);
        d.src = 0x1800;
        d.dst = 0x1900;
        d.xfer_size = 0x1000; // src ends at 0x2800: unmapped tail
        let cr = run(&m, d);
        assert_eq!(cr.code(), status::PAGE_FAULT_NOBOF);
        assert_eq!(cr.result, 1);
        assert_eq!(cr.bytes_completed, 0);
        assert!(cr.fault_addr >= 0x2000);
    }

    #[test]
    fn test_block_on_fault_resumes_on_success() {
        let mut m = mem();
        let data = pattern(8192, 3);
        m.write(SRC, &data);
        let mut d = desc(opcode::MEMMOVE, flags::BOF);
        d.src = SRC;
        d.dst = 0x80_0000;
        d.xfer_size = 8192;
        let mut job = Job::new(d);
        let lim = Limits::default();
        let out = execute(&mut job, &m, &lim, Resume::Start, &mut |_| {});
        assert_eq!(
            out,
            Outcome::Blocked(PageFault {
                addr: 0x80_0000,
                write: true
            })
        );
        m.map(0x80_0000, 8192);
        let out = execute(&mut job, &m, &lim, Resume::Success, &mut |_| {});
        let Outcome::Complete(cr) = out else {
            panic!("still blocked")
        };
        assert_eq!(cr.status, status::SUCCESS);
        assert_eq!(m.read(0x80_0000, 8192), data);
    }

    #[test]
    fn test_block_on_fault_invalid_gives_0x04() {
        let mut m = TestMemory::default();
        m.map(SRC, 4096);
        let mut d = desc(opcode::MEMFILL, flags::BOF);
        d.dst = SRC + 4000;
        d.src = 0x1122_3344_5566_7788;
        d.xfer_size = 200;
        let mut job = Job::new(d);
        let lim = Limits::default();
        assert!(matches!(
            execute(&mut job, &m, &lim, Resume::Start, &mut |_| {}),
            Outcome::Blocked(_)
        ));
        let Outcome::Complete(cr) = execute(&mut job, &m, &lim, Resume::Invalid, &mut |_| {})
        else {
            panic!("blocked")
        };
        assert_eq!(cr.status, status::PAGE_FAULT_IR | status::WRITE);
        assert_eq!(cr.bytes_completed, 96);
        assert_eq!(cr.fault_addr, SRC + 4096);
    }

    #[test]
    fn test_fill_pattern_phase() {
        let m = mem();
        let mut d = desc(opcode::MEMFILL, 0);
        d.src = 0x0807_0605_0403_0201;
        d.dst = DST + 1;
        d.xfer_size = 2500;
        assert_eq!(run(&m, d).status, status::SUCCESS);
        let got = m.read(DST + 1, 2500);
        for (i, b) in got.iter().enumerate() {
            assert_eq!(*b, (i % 8) as u8 + 1, "byte {i}");
        }
    }

    #[test]
    fn test_compare_equal_and_mismatch_offset() {
        let m = mem();
        let data = pattern(5000, 4);
        m.write(SRC, &data);
        m.write(DST, &data);
        let mut d = desc(opcode::COMPARE, 0);
        d.src = SRC;
        d.dst = DST;
        d.xfer_size = 5000;
        let cr = run(&m, d);
        assert_eq!((cr.status, cr.result), (status::SUCCESS, 0));
        m.write(DST + 3333, &[!data[3333]]);
        let cr = run(&m, d);
        assert_eq!(
            (cr.status, cr.result, cr.bytes_completed),
            (status::SUCCESS, 1, 3333)
        );
        // Check result: expected 0, got 1: false predicate.
        let mut d2 = d;
        d2.flags |= flags::CR;
        assert_eq!(run(&m, d2).status, status::SUCCESS_PRED);
        d2.op_specific[0] = 1;
        assert_eq!(run(&m, d2).status, status::SUCCESS);
    }

    #[test]
    fn test_compare_pattern() {
        let m = mem();
        let mut f = desc(opcode::MEMFILL, 0);
        f.src = 0xaabb_ccdd_eeff_0011;
        f.dst = SRC + 2;
        f.xfer_size = 1000;
        run(&m, f);
        let mut d = desc(opcode::COMPVAL, 0);
        d.src = SRC + 2;
        d.dst = 0xaabb_ccdd_eeff_0011;
        d.xfer_size = 1000;
        assert_eq!(run(&m, d).result, 0);
        m.write(SRC + 2 + 777, &[0x42]);
        let cr = run(&m, d);
        assert_eq!((cr.result, cr.bytes_completed), (1, 777));
    }

    #[test]
    fn test_delta_create_and_apply_roundtrip() {
        let m = mem();
        let a = pattern(4096, 5);
        let mut b = a.clone();
        for i in [0usize, 100, 2048, 4095] {
            b[i] ^= 0xff;
        }
        m.write(SRC, &a);
        m.write(DST, &b);
        let mut d = desc(opcode::CR_DELTA, 0);
        d.src = SRC;
        d.dst = DST;
        d.xfer_size = 4096;
        d.set_op_u64(0, AUX);
        d.set_op_u32(8, 100);
        let cr = run(&m, d);
        assert_eq!((cr.status, cr.result), (status::SUCCESS, 1));
        assert_eq!(cr.delta_rec_size(), 40);
        // Apply the delta to a copy of `a` and get `b`.
        m.write(AUX + 0x1000, &a);
        let mut ap = desc(opcode::AP_DELTA, 0);
        ap.src = AUX;
        ap.dst = AUX + 0x1000;
        ap.xfer_size = 4096;
        ap.set_op_u32(0, 40);
        assert_eq!(run(&m, ap).status, status::SUCCESS);
        assert_eq!(m.read(AUX + 0x1000, 4096), b);
        // Equal regions: result 0; with a mask that wants 1: false predicate.
        let mut e = d;
        e.dst = SRC;
        let cr = run(&m, e);
        assert_eq!((cr.result, cr.delta_rec_size()), (0, 0));
        e.flags |= flags::CR;
        e.op_specific[16] = 0b10;
        assert_eq!(run(&m, e).status, status::SUCCESS_PRED);
        // Overflow: room for 2 entries only.
        let mut o = d;
        o.set_op_u32(8, 20);
        let cr = run(&m, o);
        assert_eq!(
            (cr.status, cr.result, cr.delta_rec_size()),
            (status::SUCCESS, 2, 20)
        );
    }

    #[test]
    fn test_delta_errors() {
        let m = mem();
        // Offsets not increasing.
        let mut rec = Vec::new();
        for off in [5u16, 3] {
            rec.extend_from_slice(&off.to_le_bytes());
            rec.extend_from_slice(&[7u8; 8]);
        }
        m.write(AUX, &rec);
        let mut ap = desc(opcode::AP_DELTA, 0);
        ap.src = AUX;
        ap.dst = DST;
        ap.xfer_size = 4096;
        ap.set_op_u32(0, 20);
        let cr = run(&m, ap);
        assert_eq!(
            (cr.status, cr.bytes_completed),
            (status::DR_OFFSET_NOINC, 10)
        );
        // Offset out of range.
        m.write(AUX, &600u16.to_le_bytes());
        ap.xfer_size = 4096;
        let cr = run(&m, ap);
        assert_eq!(
            (cr.status, cr.bytes_completed),
            (status::DR_OFFSET_ERANGE, 0)
        );
        // Record size not a multiple of 10.
        ap.set_op_u32(0, 15);
        assert_eq!(run(&m, ap).status, status::DR_ERANGE);
        // Misaligned destination.
        ap.set_op_u32(0, 10);
        ap.dst = DST + 4;
        assert_eq!(run(&m, ap).status, status::ADDR_ALIGN);
        // Create: max size 0, misaligned source, size not multiple of 8.
        let mut c = desc(opcode::CR_DELTA, 0);
        c.src = SRC;
        c.dst = DST;
        c.xfer_size = 64;
        c.set_op_u64(0, AUX);
        assert_eq!(run(&m, c).status, status::DR_ERANGE);
        c.set_op_u32(8, 10);
        c.src = SRC + 1;
        assert_eq!(run(&m, c).status, status::ADDR_ALIGN);
        c.src = SRC;
        c.xfer_size = 63;
        assert_eq!(run(&m, c).status, status::XFER_ERANGE);
        c.xfer_size = MAX_DELTA_XFER + 8;
        assert_eq!(run(&m, c).status, status::XFER_ERANGE);
    }

    #[test]
    fn test_dualcast_and_errors() {
        let m = mem();
        let data = pattern(3000, 6);
        m.write(SRC, &data);
        let mut d = desc(opcode::DUALCAST, 0);
        d.src = SRC;
        d.dst = DST + 0x10;
        d.set_op_u64(0, AUX + 0x2010);
        d.xfer_size = 3000;
        assert_eq!(run(&m, d).status, status::SUCCESS);
        assert_eq!(m.read(DST + 0x10, 3000), data);
        assert_eq!(m.read(AUX + 0x2010, 3000), data);
        let mut bad = d;
        bad.set_op_u64(0, AUX + 0x2020);
        assert_eq!(run(&m, bad).status, status::DCAST_ERR);
        let mut ov = d;
        ov.set_op_u64(0, DST + 0x1010);
        ov.xfer_size = 5000;
        assert_eq!(run(&m, ov).status, status::OVERLAP_BUFFERS);
    }

    #[test]
    fn test_crc_and_copy_crc() {
        let m = mem();
        m.write(SRC, b"123456789");
        let mut d = desc(opcode::CRCGEN, 0);
        d.src = SRC;
        d.xfer_size = 9;
        let cr = run(&m, d);
        assert_eq!((cr.status, cr.crc_val()), (status::SUCCESS, 0xe306_9283));
        // Seed from memory continues a CRC.
        m.write(AUX, &crc::crc32c(0, b"1234").to_le_bytes());
        let mut s = desc(opcode::CRCGEN, CRC_READ_SEED);
        s.src = SRC + 4;
        s.xfer_size = 5;
        s.set_op_u64(8, AUX);
        assert_eq!(run(&m, s).crc_val(), 0xe306_9283);
        s.set_op_u64(8, AUX + 2);
        assert_eq!(run(&m, s).status, status::ADDR_ALIGN);
        // Copy + CRC across fragments.
        let data = pattern(7000, 7);
        m.write(SRC, &data);
        let mut c = desc(opcode::COPY_CRC, 0);
        c.src = SRC;
        c.dst = DST + 1;
        c.xfer_size = 7000;
        let cr = run(&m, c);
        assert_eq!(cr.crc_val(), crc::crc32c(0, &data));
        assert_eq!(m.read(DST + 1, 7000), data);
        c.dst = SRC + 10;
        assert_eq!(run(&m, c).status, status::OVERLAP_BUFFERS);
    }

    #[test]
    fn test_crc_partial_record_carries_seed() {
        let mut m = TestMemory::default();
        m.map(0x1000, 0x1000);
        m.map(CR, 4096);
        let data = pattern(0x1000, 8);
        m.write(0x1000, &data);
        let mut d = desc(opcode::CRCGEN, 0);
        d.src = 0x1000;
        d.xfer_size = 0x1100;
        let cr = run(&m, d);
        assert_eq!(cr.code(), status::PAGE_FAULT_NOBOF);
        assert_eq!(cr.bytes_completed, 0x1000);
        assert_eq!(cr.crc_val(), crc::crc32c(0, &data));
    }

    #[test]
    fn test_cflush_and_noop_and_drain() {
        let m = mem();
        let mut d = desc(opcode::CFLUSH, flags::CC);
        d.dst = DST;
        d.xfer_size = 0x10000;
        assert_eq!(run(&m, d).status, status::SUCCESS);
        d.xfer_size = 0x10001;
        assert_eq!(run(&m, d).code(), status::PAGE_FAULT_NOBOF);
        assert_eq!(run(&m, desc(opcode::NOOP, 0)).status, status::SUCCESS);
        assert_eq!(run(&m, desc(opcode::DRAIN, 0)).status, status::SUCCESS);
    }

    #[test]
    fn test_validation_statuses() {
        let m = mem();
        let mv = |f: &dyn Fn(&mut Descriptor)| {
            let mut d = desc(opcode::MEMMOVE, 0);
            d.src = SRC;
            d.dst = DST;
            d.xfer_size = 64;
            f(&mut d);
            run(&m, d)
        };
        assert_eq!(mv(&|d| d.opcode = 0x0a).status, status::BAD_OPCODE);
        assert_eq!(mv(&|d| d.opcode = 0x12).status, status::BAD_OPCODE);
        assert_eq!(mv(&|d| d.privileged = true).status, status::PRIV_BAD);
        let cr = mv(&|d| d.flags |= 0x40 | flags::CR);
        assert_eq!(cr.status, status::INVALID_FLAGS);
        assert_eq!(cr.invalid_flags(), 0xc0);
        assert_eq!(mv(&|d| d.flags |= 0x10000).invalid_flags(), 0x10000);
        assert_eq!(mv(&|d| d.rsvd1 = 1).status, status::NOZERO_RESERVE);
        assert_eq!(mv(&|d| d.rsvd0 = 1).status, status::NOZERO_RESERVE);
        assert_eq!(
            mv(&|d| d.op_specific[23] = 1).status,
            status::NOZERO_RESERVE
        );
        assert_eq!(
            mv(&|d| d.flags |= flags::RCI).status,
            status::INT_HANDLE_INVAL
        );
        assert_eq!(mv(&|d| d.xfer_size = 0).status, status::XFER_ERANGE);
        assert_eq!(mv(&|d| d.src = u64::MAX - 10).status, status::XFER_ERANGE);
        let lim = Limits {
            max_xfer: 32,
            ..Limits::default()
        };
        let mut d = desc(opcode::MEMMOVE, 0);
        d.xfer_size = 64;
        assert_eq!(
            validate(&d, &lim, false).expect_err("invalid").status,
            status::XFER_ERANGE
        );
        // Order: opcode before priv before flags.
        let mut d = desc(0x30, 0x40);
        d.privileged = true;
        assert_eq!(
            validate(&d, &lim, false).expect_err("invalid").status,
            status::BAD_OPCODE
        );
        d.opcode = opcode::NOOP;
        assert_eq!(
            validate(&d, &lim, false).expect_err("invalid").status,
            status::PRIV_BAD
        );
    }

    #[test]
    fn test_every_data_opcode_checks_its_size_and_faults() {
        let m = mem();
        for op in [
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
        ] {
            let mut d = desc(op, 0);
            d.src = SRC;
            d.dst = DST + 0x2000;
            d.xfer_size = 0;
            match op {
                opcode::CR_DELTA => {
                    d.set_op_u64(0, AUX);
                    d.set_op_u32(8, 100);
                }
                opcode::AP_DELTA => d.set_op_u32(0, 10),
                opcode::DUALCAST => d.set_op_u64(0, AUX + 0x2000),
                _ => {}
            }
            assert_eq!(
                run(&m, d).status,
                status::XFER_ERANGE,
                "opcode {op:#x} size 0"
            );
            // Every operand in unmapped memory: a page fault, never a panic.
            let mut f = d;
            f.xfer_size = 64;
            f.src = 0x7000_0000;
            f.dst = 0x7100_0000;
            if op == opcode::DUALCAST {
                f.set_op_u64(0, 0x7200_0000);
            }
            if op == opcode::MEMFILL {
                f.dst = 0x7100_0000;
            }
            assert_eq!(
                run(&m, f).code(),
                status::PAGE_FAULT_NOBOF,
                "opcode {op:#x} unmapped"
            );
        }
        // Compare pattern with check result: false predicate.
        let mut cv = desc(opcode::COMPVAL, flags::CR);
        cv.src = SRC;
        cv.dst = 0x1111;
        cv.xfer_size = 64;
        assert_eq!(run(&m, cv).status, status::SUCCESS_PRED);
        cv.op_specific[0] = 1;
        assert_eq!(run(&m, cv).status, status::SUCCESS);
    }

    #[test]
    fn test_completion_record_rules() {
        let mut m = mem();
        // CRAV without RCR: no record on success, a record on failure.
        let mut d = Descriptor::new(opcode::NOOP, flags::CRAV);
        d.completion_addr = CR;
        m.write(CR, &[0u8; 32]);
        let cr = run(&m, d);
        assert!(!wants_record(&d, cr.status));
        assert!(wants_record(&d, status::BATCH_FAIL));
        // An unmapped record address is reported, not written.
        m.unmap(CR);
        let mut failed = Vec::new();
        let res = write_completion(&m, CR, &CompletionRecord::with_status(1));
        if let Err(e) = res {
            failed.push(e);
        }
        assert_eq!(failed[0].code, status::CRA_XLAT);
        m.map(CR, 4096);
        assert_eq!(
            write_completion(&m, CR + 8, &CompletionRecord::with_status(1))
                .expect_err("invalid")
                .code,
            status::CRA_ALIGN
        );
        let mut cr = CompletionRecord::with_status(status::SUCCESS);
        cr.bytes_completed = 77;
        write_completion(&m, CR, &cr).expect("mapped");
        assert_eq!(m.cr(CR), cr);
    }

    fn put_list(m: &TestMemory, base: u64, descs: &[Descriptor]) {
        for (i, d) in descs.iter().enumerate() {
            m.write(base + 64 * i as u64, &d.to_bytes());
        }
    }

    fn member_move(i: u64, fl: u32) -> Descriptor {
        let mut d = Descriptor::new(opcode::MEMMOVE, fl | flags::CRAV);
        d.completion_addr = CR + 0x100 + 32 * i;
        d.src = SRC + 64 * i;
        d.dst = DST + 64 * i;
        d.xfer_size = 64;
        d
    }

    #[test]
    fn test_batch_success_members_inherit_pasid() {
        let m = mem();
        let data = pattern(64 * 8, 9);
        m.write(SRC, &data);
        let mut list: Vec<_> = (0..8).map(|i| member_move(i, 0)).collect();
        list[3].pasid = 77; // forged: ignored
        put_list(&m, AUX, &list);
        let mut b = desc(opcode::BATCH, 0);
        b.src = AUX;
        b.xfer_size = 8;
        b.pasid = 5;
        let cr = run(&m, b);
        assert_eq!((cr.status, cr.bytes_completed), (status::SUCCESS, 8));
        assert_eq!(m.read(DST, 64 * 8), data);
        // RCR=0 members wrote no records.
        assert_eq!(m.read(CR + 0x100, 32 * 8), vec![0u8; 256]);
    }

    #[test]
    fn test_batch_failure_and_fence_abandons_rest() {
        let m = mem();
        let mut list: Vec<_> = (0..5).map(|i| member_move(i, 0)).collect();
        list[1].xfer_size = 0; // fails with 0x13
        list[2].flags |= 0; // runs (no fence)
        list[3].flags |= flags::FENCE; // abandoned with the rest
        put_list(&m, AUX, &list);
        let mut b = desc(opcode::BATCH, 0);
        b.src = AUX;
        b.xfer_size = 5;
        let cr = run(&m, b);
        assert_eq!((cr.status, cr.bytes_completed), (status::BATCH_FAIL, 3));
        assert_eq!(m.cr(CR + 0x100 + 32).status, status::XFER_ERANGE);
        assert_eq!(m.cr(CR + 0x100 + 64).status, status::NONE);
        // Nested batch and drain inside a batch are bad opcodes.
        let mut nested = list.clone();
        nested[0] = Descriptor::new(opcode::BATCH, flags::CRAV);
        nested[0].completion_addr = CR + 0x100;
        nested[1] = member_move(1, 0);
        put_list(&m, AUX, &nested[..2]);
        b.xfer_size = 2;
        let cr = run(&m, b);
        assert_eq!(cr.status, status::BATCH_FAIL);
        assert_eq!(m.cr(CR + 0x100).status, status::BAD_OPCODE);
    }

    #[test]
    fn test_batch_descriptor_errors() {
        let m = mem();
        let mut b = desc(opcode::BATCH, 0);
        b.src = AUX;
        b.xfer_size = 1;
        assert_eq!(run(&m, b).status, status::DESC_CNT_ERANGE);
        b.xfer_size = 1025;
        assert_eq!(run(&m, b).status, status::DESC_CNT_ERANGE);
        b.xfer_size = 2;
        b.src = AUX + 32;
        assert_eq!(run(&m, b).status, status::DESCLIST_ALIGN);
        // List crossing into unmapped memory: partial batch 0x06.
        let list: Vec<_> = (0..2).map(|i| member_move(i, 0)).collect();
        put_list(&m, AUX + 0x10000 - 64, &list[..1]);
        b.src = AUX + 0x10000 - 64;
        let cr = run(&m, b);
        assert_eq!(
            (cr.status, cr.bytes_completed),
            (status::BATCH_PAGE_FAULT, 1)
        );
        assert_eq!(cr.fault_addr, AUX + 0x10000);
    }

    #[test]
    fn test_batch_member_block_on_fault_resumes() {
        let mut m = mem();
        let mut list: Vec<_> = (0..3).map(|i| member_move(i, 0)).collect();
        list[1].flags |= flags::BOF;
        list[1].dst = 0x90_0000;
        put_list(&m, AUX, &list);
        let mut b = desc(opcode::BATCH, 0);
        b.src = AUX;
        b.xfer_size = 3;
        let mut job = Job::new(b);
        let lim = Limits::default();
        let out = execute(&mut job, &m, &lim, Resume::Start, &mut |_| {});
        assert_eq!(
            out,
            Outcome::Blocked(PageFault {
                addr: 0x90_0000,
                write: true
            })
        );
        m.map(0x90_0000, 4096);
        let Outcome::Complete(cr) = execute(&mut job, &m, &lim, Resume::Success, &mut |_| {})
        else {
            panic!("blocked")
        };
        assert_eq!((cr.status, cr.bytes_completed), (status::SUCCESS, 3));
        // Invalid answer: the member completes 0x04, the batch 0x05.
        let mut job = Job::new(b);
        m.unmap(0x90_0000);
        execute(&mut job, &m, &lim, Resume::Start, &mut |_| {});
        let Outcome::Complete(cr) = execute(&mut job, &m, &lim, Resume::Invalid, &mut |_| {})
        else {
            panic!("blocked")
        };
        assert_eq!((cr.status, cr.bytes_completed), (status::BATCH_FAIL, 3));
        assert_eq!(
            m.cr(CR + 0x100 + 32).status,
            status::PAGE_FAULT_IR | status::WRITE
        );
    }

    #[test]
    fn test_read_only_mapping_write_faults() {
        let mut m = TestMemory::default();
        m.map_pieces(0x1000, 4096, 4096, false);
        m.map(CR, 4096);
        let mut d = desc(opcode::MEMFILL, 0);
        d.dst = 0x1000;
        d.xfer_size = 8;
        let cr = run(&m, d);
        assert_eq!(cr.status, status::PAGE_FAULT_NOBOF | status::WRITE);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        const OPS: [u8; 16] = [
            0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x10, 0x11, 0x20, 0x0a,
            0x12, 0xff,
        ];
        const ADDRS: [u64; 8] = [
            SRC,
            SRC + 4093,
            DST + 8,
            CR,
            AUX,
            AUX + 0x10000 - 64,
            0,
            u64::MAX - 7,
        ];

        fn arb_desc() -> impl Strategy<Value = [u8; DESC_SIZE]> {
            (
                proptest::array::uniform32(any::<u8>()),
                proptest::array::uniform32(any::<u8>()),
                0..OPS.len(),
                0..ADDRS.len(),
                0..ADDRS.len(),
                0..ADDRS.len(),
                0u32..0x3000,
                any::<bool>(),
            )
                .prop_map(|(a, b, op, s, d, c, size, clean)| {
                    let mut raw = [0u8; DESC_SIZE];
                    raw[..32].copy_from_slice(&a);
                    raw[32..].copy_from_slice(&b);
                    let mut desc = Descriptor::from_bytes(&raw);
                    desc.opcode = OPS[op];
                    desc.src = ADDRS[s];
                    desc.dst = ADDRS[d];
                    desc.completion_addr = ADDRS[c];
                    desc.xfer_size = size;
                    if clean {
                        // Mostly-valid descriptors reach the operations.
                        desc.rsvd0 = 0;
                        desc.rsvd1 = 0;
                        desc.privileged = false;
                        desc.flags &= flags::COMMON & !flags::RCI;
                        desc.op_specific = [0; 24];
                        if desc.opcode == opcode::BATCH {
                            desc.xfer_size = size % 8;
                        }
                    }
                    desc.to_bytes()
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            /// Any 64 bytes, any memory layout: the engine completes (or
            /// blocks and then completes on Invalid) with a defined status.
            #[test]
            fn test_any_descriptor_completes(raw in arb_desc(), list in proptest::collection::vec(arb_desc(), 8)) {
                let m = mem();
                for (i, l) in list.iter().enumerate() {
                    m.write(AUX + 64 * i as u64, l);
                }
                let d = Descriptor::from_bytes(&raw);
                prop_assert_eq!(Descriptor::from_bytes(&d.to_bytes()), d);
                let mut job = Job::new(d);
                let lim = Limits::default();
                let mut out = execute(&mut job, &m, &lim, Resume::Start, &mut |_| {});
                for _ in 0..64 {
                    match out {
                        Outcome::Complete(_) | Outcome::Yielded => break,
                        Outcome::Blocked(_) => out = execute(&mut job, &m, &lim, Resume::Invalid, &mut |_| {}),
                    }
                }
                let Outcome::Complete(cr) = out else {
                    return Err(TestCaseError::fail("never completed"));
                };
                let known = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1c, 0x1d];
                prop_assert!(known.contains(&cr.code()), "status {:#x}", cr.status);
            }

            /// Any descriptor run in small steps (a yield after every
            /// `budget` bytes, each resumed) ends with the record and the
            /// memory of a run in one go.
            #[test]
            fn test_any_descriptor_bounded_matches_one_go(raw in arb_desc(), list in proptest::collection::vec(arb_desc(), 8), budget in 1u64..0x3000) {
                let setup = || {
                    let m = mem();
                    for (i, l) in list.iter().enumerate() {
                        m.write(AUX + 64 * i as u64, l);
                    }
                    m.write(SRC, &pattern(0x10000, 1));
                    m
                };
                let d = Descriptor::from_bytes(&raw);
                let lim = Limits::default();
                let one = setup();
                let mut job = Job::new(d);
                let mut out = execute(&mut job, &one, &lim, Resume::Start, &mut |_| {});
                for _ in 0..64 {
                    match out {
                        Outcome::Blocked(_) => out = execute(&mut job, &one, &lim, Resume::Invalid, &mut |_| {}),
                        _ => break,
                    }
                }
                let Outcome::Complete(want) = out else {
                    return Err(TestCaseError::fail("never completed"));
                };
                let m = setup();
                let mut job = Job::new(d);
                let mut resume = Resume::Start;
                let mut got = None;
                for _ in 0..100_000 {
                    let mut b = Budget::new(budget);
                    match execute_bounded(&mut job, &m, &lim, resume, &mut b, &mut |_| {}) {
                        Outcome::Complete(cr) => {
                            got = Some(cr);
                            break;
                        }
                        Outcome::Yielded => resume = Resume::Continue,
                        Outcome::Blocked(_) => resume = Resume::Invalid,
                    }
                }
                prop_assert_eq!(got, Some(want));
                prop_assert_eq!(snapshot(&m), snapshot(&one));
            }
        }
    }
}
