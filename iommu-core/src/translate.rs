//! The device side: per-thread translators with their own IOTLB.
//!
//! The cache is set associative: the 4 KiB page number, hashed
//! multiplicatively (Fibonacci hashing: the top bits of `page * 2^64/φ`),
//! picks a set of [`TRANSLATION_CACHE_WAYS`] entries. An entry covers the
//! whole contiguous run it was filled from (a whole area for a paging HWPT,
//! one stage-1 page for a nested one), so a warm translation is a multiply,
//! a shift, and a tag compare plus a range check per way probed.
//!
//! The hash spreads pages that a plain `page mod sets` index would put in
//! one slot (buffers 1 MiB, 64 MiB, ... apart, as a memmove's source and
//! destination often are), and the second way keeps two hot pages that do
//! share a set. A fill goes to way 0 and moves the older entries down one
//! way (the last falls out), so the set holds its most recently filled
//! pages; a fill that replaces an entry covering the same address (one
//! cached without the permission now asked) takes that entry's place
//! instead, so no stale duplicate stays. Hits do not reorder the set: the
//! warm path only reads.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::device::{pasid_key, DirtyState, Domain, IommuDevice};
use crate::error::{Error, Result};
use crate::event::EventReason;
use crate::fault::{
    FaultRecord, IOMMU_PGFAULT_FLAGS_PASID_VALID, IOMMU_PGFAULT_FLAGS_VIRTUAL_IDS,
    MAX_FAULT_GROUP_RECORDS,
};
use crate::ioas::IoasState;
use crate::memory::Memory;
use crate::sync::{lock, Nudge, Slot};
use crate::types::{Perm, PAGE_SIZE};

/// Entries of the translation cache (a power of two).
pub const TRANSLATION_CACHE_ENTRIES: usize = 256;
/// Entries per set of the translation cache (its associativity).
pub const TRANSLATION_CACHE_WAYS: usize = 2;
const CACHE_SETS: usize = TRANSLATION_CACHE_ENTRIES / TRANSLATION_CACHE_WAYS;
const SET_BITS: u32 = CACHE_SETS.trailing_zeros();
/// `2^64 / φ`, odd: consecutive pages and pages a power of two apart land
/// in well spread sets.
const HASH_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

const _: () = assert!(
    CACHE_SETS.is_power_of_two()
        && CACHE_SETS * TRANSLATION_CACHE_WAYS == TRANSLATION_CACHE_ENTRIES
);

/// The cache set of `iova`'s page.
#[inline(always)]
fn set_index(iova: u64) -> usize {
    ((iova / PAGE_SIZE).wrapping_mul(HASH_MUL) >> (64 - SET_BITS)) as usize
}
/// Distinct memories a cache refers to before it is dropped wholesale.
const MAX_CACHED_MEMORIES: usize = 1024;

/// A host fragment of a translated range. `ptr` is valid for `len` bytes
/// only until the [`AccessSection`] it came from ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// Host address.
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

/// A whole host-contiguous run of translated I/O addresses:
/// `[iova, iova + len)` is host memory at `ptr`. Valid, like a
/// [`Fragment`], only until the [`AccessSection`] it came from ends;
/// `iova + len - 1` never overflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First I/O address of the run.
    pub iova: u64,
    /// Host address of `iova`.
    pub ptr: *mut u8,
    /// Length in bytes (at least 1).
    pub len: u64,
}

/// Counters of a translator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TranslatorStats {
    /// Translations of multi-fragment or helper (read/write/copy) accesses
    /// answered from the cache; single-entry [`AccessSection::translate`] hits
    /// are not counted, to keep that path minimal.
    pub hits: u64,
    /// Translations that walked the IOAS / page table.
    pub misses: u64,
    /// Cache flushes caused by invalidations.
    pub flushes: u64,
}

/// One cache entry: `[start, last]` → `host`, valid while `tag` equals the
/// translator's `(epoch << 32) | pasid key` (epoch >= 1, so a zero tag never
/// matches).
#[derive(Clone, Copy, Default)]
struct Entry {
    tag: u64,
    start: u64,
    /// `last - start`.
    span: u64,
    last: u64,
    host: u64,
    mem_off: u64,
    perm: u32,
    mem: u32,
}

/// What a failed translation does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Raise an I/O page fault (fault-capable HWPT) or report an event.
    Fault,
    /// Only return [`Error::Unmapped`] / [`Error::AccessDenied`]: no fault
    /// group, no event (the caller reports the failure its own way).
    NoFault,
}

/// One set of the cache: way 0 is the most recently filled.
#[derive(Clone, Copy, Default)]
#[repr(align(64))]
struct Set {
    ways: [Entry; TRANSLATION_CACHE_WAYS],
}

/// A failed translation, as the fault / event path needs it.
#[derive(Clone, Copy)]
struct Miss {
    pasid: Option<u32>,
    key: u32,
    iova: u64,
    perm: Perm,
    /// Bytes the access still needs from `iova`.
    left: u64,
}

/// One DMA thread's view of a device: its own translation cache, validated
/// by a generation counter at the start of each access section.
pub struct Translator {
    device: IommuDevice,
    slot: Arc<Slot>,
    seen_gen: u64,
    epoch: u64,
    sets: Box<[Set; CACHE_SETS]>,
    mems: Vec<Arc<Memory>>,
    stats: TranslatorStats,
    /// Access pins held ([`AccessSection::pin`]): while any is held the
    /// slot stays in its section (odd `active`) between sections too.
    pins: u64,
    /// The generation the translator had seen when `pins` went from 0 to 1:
    /// an invalidation since then waits for every pin to be released.
    pin_gen: u64,
}

impl std::fmt::Debug for Translator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Translator")
            .field("id", &self.slot.id)
            .field("device", &self.device.label())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Translator {
    pub(crate) fn new(device: IommuDevice) -> Translator {
        let slot = Arc::new(Slot::new(device.shared.label.clone()));
        device.shared.add_slot(&slot);
        let seen_gen = slot.gen.load(Ordering::SeqCst);
        Translator {
            device,
            slot,
            seen_gen,
            epoch: 1,
            sets: Box::new([Set::default(); CACHE_SETS]),
            mems: Vec::new(),
            stats: TranslatorStats::default(),
            pins: 0,
            pin_gen: 0,
        }
    }

    /// Unique id (as reported by [`InvalidationTicket::pending`](crate::InvalidationTicket::pending)).
    pub fn id(&self) -> u64 {
        self.slot.id
    }
    /// The device.
    pub fn device(&self) -> &IommuDevice {
        &self.device
    }
    /// Opens an access section. Never block inside one (an unmap waits for
    /// it to end).
    #[inline]
    pub fn access(&mut self) -> AccessSection<'_> {
        let g = self.slot.enter();
        if g != self.seen_gen {
            self.flush();
            self.seen_gen = g;
        }
        AccessSection { t: self }
    }
    /// Reads `buf.len()` bytes at `iova` (own access section).
    pub fn read(&mut self, pasid: Option<u32>, iova: u64, buf: &mut [u8]) -> Result<()> {
        self.access().read(pasid, iova, buf)
    }
    /// Writes `buf` at `iova` (own access section).
    pub fn write(&mut self, pasid: Option<u32>, iova: u64, buf: &[u8]) -> Result<()> {
        self.access().write(pasid, iova, buf)
    }
    /// [`AccessSection::read_nofault`] in its own access section.
    pub fn read_nofault(&mut self, pasid: Option<u32>, iova: u64, buf: &mut [u8]) -> Result<()> {
        self.access().read_nofault(pasid, iova, buf)
    }
    /// [`AccessSection::write_nofault`] in its own access section.
    pub fn write_nofault(&mut self, pasid: Option<u32>, iova: u64, buf: &[u8]) -> Result<()> {
        self.access().write_nofault(pasid, iova, buf)
    }
    /// Sets the hook an invalidator may call to nudge this thread.
    pub fn set_nudge(&mut self, nudge: Option<Nudge>) {
        self.slot.set_nudge(nudge);
    }
    /// Valid cached translations (drops the cache first if it was invalidated).
    pub fn cached_translations(&mut self) -> usize {
        let g = self.slot.gen.load(Ordering::SeqCst);
        if g != self.seen_gen {
            self.flush();
            self.seen_gen = g;
        }
        self.sets
            .iter()
            .flat_map(|s| s.ways.iter())
            .filter(|e| e.tag >> 32 == self.epoch)
            .count()
    }
    /// Counters.
    pub fn stats(&self) -> TranslatorStats {
        self.stats
    }

    /// Access pins held ([`AccessSection::pin`]).
    pub fn pinned(&self) -> u64 {
        self.pins
    }

    /// True while pins are held and an invalidation began after the
    /// oldest of them was taken: that invalidation waits until every pin
    /// is released, so the owner should finish or cancel the work behind
    /// them and take no new pin until [`Translator::pinned`] is 0 (one
    /// atomic load).
    pub fn drain_requested(&self) -> bool {
        self.pins > 0 && self.slot.gen.load(Ordering::SeqCst) != self.pin_gen
    }

    /// Releases `pin` outside an access section. When it was the last
    /// one, the translator's section ends here: invalidations waiting for
    /// it complete.
    pub fn unpin(&mut self, pin: AccessPin) {
        // Test-only build (`--cfg ioasis_broken="firstunpin"`): any release
        // ends the section, with pins still held; kept so that the loom
        // model with two pins (tests/loom.rs) can show it finds it.
        if self.release(pin) && (self.pins == 0 || cfg!(ioasis_broken = "firstunpin")) {
            self.slot.leave();
        }
    }

    fn release(&mut self, pin: AccessPin) -> bool {
        if pin.translator != self.slot.id || self.pins == 0 {
            // Another translator's pin, or more releases than pins: a bug
            // of the owner. Ignoring it keeps this translator's section
            // open (safe) rather than ending it early.
            debug_assert!(false, "access pin released on the wrong translator");
            return false;
        }
        self.pins -= 1;
        true
    }

    fn flush(&mut self) {
        self.epoch += 1;
        if self.epoch > u64::from(u32::MAX) {
            self.sets.fill(Set::default());
            self.epoch = 1;
        }
        self.mems.clear();
        self.stats.flushes += 1;
    }

    #[inline(always)]
    fn hit(&self, key: u32, iova: u64, perm: Perm) -> Option<&Entry> {
        let tag = self.epoch << 32 | u64::from(key);
        self.sets[set_index(iova)].ways.iter().find(|e| {
            e.tag == tag && iova.wrapping_sub(e.start) <= e.span && perm.bits() & !e.perm == 0
        })
    }

    /// `left` is how many bytes the access still needs from `iova` (it
    /// sizes the fault group if the translation fails).
    #[inline]
    fn resolve(
        &mut self,
        pasid: Option<u32>,
        iova: u64,
        perm: Perm,
        left: u64,
        mode: Mode,
    ) -> Result<Entry> {
        let key = pasid_key(pasid);
        if let Some(e) = self.hit(key, iova, perm) {
            let e = *e;
            self.stats.hits += 1;
            return Ok(e);
        }
        self.fill(key, pasid, iova, perm, left, mode)
    }

    fn mem_index(&mut self, m: &Arc<Memory>) -> u32 {
        if let Some(i) = self.mems.iter().position(|x| Arc::ptr_eq(x, m)) {
            return i as u32;
        }
        if self.mems.len() >= MAX_CACHED_MEMORIES {
            // Indexes handed out in this section must stay valid: drop the
            // cache at the next section start instead.
            self.seen_gen = self.seen_gen.wrapping_sub(1);
        }
        self.mems.push(m.clone());
        (self.mems.len() - 1) as u32
    }

    #[cold]
    fn fill(
        &mut self,
        key: u32,
        pasid: Option<u32>,
        iova: u64,
        perm: Perm,
        left: u64,
        mode: Mode,
    ) -> Result<Entry> {
        self.stats.misses += 1;
        let dom = self.device.shared.attach_read().get(&key).cloned();
        let Some(dom) = dom else {
            return Err(Error::NotAttached { pasid });
        };
        let walked = {
            let st = dom.s2.read();
            match dom.s1_root {
                None => walk_s2(&st, iova, perm).map(|(e, m)| (e, m, iova & !(PAGE_SIZE - 1))),
                Some(root) => walk_nested(&st, root, iova, perm),
            }
        };
        let walked = match (&dom.dirty, walked) {
            (Some(d), Ok((e, m, s2_page))) if d.enabled.load(Ordering::SeqCst) => {
                Ok((track_dirty(d, e, iova, perm, s2_page), m, s2_page))
            }
            (_, w) => w,
        };
        let (mut e, mem, _) = match walked {
            Ok(x) => x,
            Err(reason) => {
                let miss = Miss {
                    pasid,
                    key,
                    iova,
                    perm,
                    left,
                };
                return Err(self.fail(&dom, miss, reason, mode));
            }
        };
        e.mem = self.mem_index(&mem);
        e.tag = self.epoch << 32 | u64::from(key);
        e.span = e.last - e.start;
        let ways = &mut self.sets[set_index(iova)].ways;
        // Take the place of an entry that covers `iova` (cached without
        // `perm`), else of the oldest; the entries before it move down.
        let victim = ways
            .iter()
            .position(|w| w.tag == e.tag && iova.wrapping_sub(w.start) <= w.span)
            .unwrap_or(TRANSLATION_CACHE_WAYS - 1);
        ways.copy_within(0..victim, 1);
        ways[0] = e;
        Ok(e)
    }

    #[cold]
    fn fail(&mut self, dom: &Domain, miss: Miss, reason: EventReason, mode: Mode) -> Error {
        let Miss {
            pasid,
            key,
            iova,
            perm,
            left,
        } = miss;
        let plain = match reason {
            EventReason::Permission => Error::AccessDenied { pasid, iova, perm },
            EventReason::NotMapped | EventReason::BadStage1Table | EventReason::Lost => {
                Error::Unmapped { pasid, iova }
            }
        };
        if mode == Mode::NoFault {
            return plain;
        }
        let shared = &self.device.shared;
        if let Some(q) = &dom.fault {
            let dev_id = shared.bound_ctx().map(|(_, id)| id).unwrap_or(0);
            let (vdev, vpasid, virtual_ids) = {
                let v = shared.virt_read();
                let vp = pasid.map(|p| v.p2v.get(&p).copied().unwrap_or(p));
                (
                    v.virt_id.unwrap_or(u64::from(dev_id)),
                    vp,
                    v.virt_id.is_some(),
                )
            };
            let mut flags = 0;
            if pasid.is_some() {
                flags |= IOMMU_PGFAULT_FLAGS_PASID_VALID;
            }
            if virtual_ids {
                flags |= IOMMU_PGFAULT_FLAGS_VIRTUAL_IDS;
            }
            let grpid = shared.next_grpid();
            let first = iova & !(PAGE_SIZE - 1);
            let rec = |addr| FaultRecord {
                flags,
                dev_id: vdev,
                pasid: vpasid.unwrap_or(0),
                grpid,
                perm,
                addr,
                length: 0,
                cookie: 0,
            };
            // One group for the access: the faulting page and the following
            // pages of the access that fail too (a page request group).
            let mut recs = vec![rec(first)];
            let last = iova.saturating_add(left.max(1) - 1) & !(PAGE_SIZE - 1);
            {
                let st = dom.s2.read();
                let mut page = first;
                while page < last && recs.len() < MAX_FAULT_GROUP_RECORDS {
                    page += PAGE_SIZE;
                    let ok = match dom.s1_root {
                        None => walk_s2(&st, page, perm).is_ok(),
                        Some(root) => walk_nested(&st, root, page, perm).is_ok(),
                    };
                    if ok {
                        break;
                    }
                    recs.push(rec(page));
                }
            }
            return match q.raise(shared, key, recs) {
                Ok(pending) => Error::FaultRaised {
                    iova,
                    cookie: pending.cookie(),
                    pending,
                },
                Err(e) => e,
            };
        }
        if let Some((ctx, dev_id)) = shared.bound_ctx() {
            ctx.report_event(dev_id, shared, pasid, iova, perm, reason);
        }
        plain
    }
}

/// Dirty tracking: narrows `e` to `iova`'s page; a write marks the page
/// (as its stage-2 address), a read caches it without write permission so
/// that a later write misses and marks it.
fn track_dirty(d: &DirtyState, mut e: Entry, iova: u64, perm: Perm, s2_page: u64) -> Entry {
    let page = iova & !(PAGE_SIZE - 1);
    let lo = e.start.max(page);
    let hi = e.last.min(page + (PAGE_SIZE - 1));
    e.host += lo - e.start;
    e.mem_off += lo - e.start;
    e.start = lo;
    e.last = hi;
    if perm.contains(Perm::WRITE) {
        lock(&d.pages).insert(s2_page / PAGE_SIZE);
    } else {
        e.perm &= !Perm::WRITE.bits();
    }
    e
}

fn walk_s2(
    st: &IoasState,
    iova: u64,
    perm: Perm,
) -> std::result::Result<(Entry, Arc<Memory>), EventReason> {
    let Some((s, a)) = st.lookup(iova) else {
        return Err(EventReason::NotMapped);
    };
    if !a.perm.contains(perm) {
        return Err(EventReason::Permission);
    }
    Ok((
        Entry {
            start: s,
            last: a.last,
            host: a.host_addr(),
            mem_off: a.mem_off,
            perm: a.perm.bits(),
            ..Entry::default()
        },
        a.mem.clone(),
    ))
}

/// Stage-1 address mask of table and page addresses (bits 51:12).
const S1_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const S1_PRESENT: u64 = 1;
const S1_WRITABLE: u64 = 2;

/// Returns the entry, its memory and the stage-2 address of `iova`'s page.
fn walk_nested(
    st: &IoasState,
    root: u64,
    iova: u64,
    perm: Perm,
) -> std::result::Result<(Entry, Arc<Memory>, u64), EventReason> {
    if iova >> 48 != 0 {
        return Err(EventReason::NotMapped);
    }
    let mut table = root & S1_ADDR_MASK;
    let mut writable = true;
    for level in (0..4u32).rev() {
        let idx = (iova >> (12 + 9 * level)) & 0x1ff;
        let pte_addr = table + idx * 8;
        let Some((s, a)) = st.lookup(pte_addr) else {
            return Err(EventReason::BadStage1Table);
        };
        if !a.perm.contains(Perm::READ) || pte_addr.checked_add(7).is_none_or(|l| l > a.last) {
            return Err(EventReason::BadStage1Table);
        }
        let off = a.mem_off + (pte_addr - s);
        let pte = usize::try_from(off)
            .ok()
            .and_then(|o| a.mem.read_u64_le(o).ok())
            .ok_or(EventReason::BadStage1Table)?;
        if pte & S1_PRESENT == 0 {
            return Err(EventReason::NotMapped);
        }
        writable &= pte & S1_WRITABLE != 0;
        table = pte & S1_ADDR_MASK;
    }
    let s1perm = if writable { Perm::RW } else { Perm::READ };
    if !s1perm.contains(perm) {
        return Err(EventReason::Permission);
    }
    let page = iova & !(PAGE_SIZE - 1);
    let gpa_page = table;
    let gpa = gpa_page + (iova - page);
    let Some((s, a)) = st.lookup(gpa) else {
        return Err(EventReason::NotMapped);
    };
    if !a.perm.contains(perm) {
        return Err(EventReason::Permission);
    }
    let lo = s.max(gpa_page);
    let hi = a.last.min(gpa_page + PAGE_SIZE - 1);
    Ok((
        Entry {
            start: page + (lo - gpa_page),
            last: page + (hi - gpa_page),
            host: a.host_addr() + (lo - s),
            mem_off: a.mem_off + (lo - s),
            perm: s1perm.bits() & a.perm.bits(),
            ..Entry::default()
        },
        a.mem.clone(),
        gpa_page,
    ))
}

/// An access section: host pointers from [`AccessSection::translate`] stay valid
/// until it is dropped.
pub struct AccessSection<'t> {
    t: &'t mut Translator,
}

impl std::fmt::Debug for AccessSection<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessSection")
            .field("translator", &self.t.slot.id)
            .finish()
    }
}

impl Drop for AccessSection<'_> {
    #[inline]
    fn drop(&mut self) {
        // Pins extend the section until the last one is released.
        if self.t.pins == 0 || cfg!(ioasis_broken = "unpinned") {
            self.t.slot.leave();
        }
    }
}

impl Drop for Translator {
    fn drop(&mut self) {
        if self.pins > 0 {
            // The owner dropped the translator with pins held (it must
            // finish the work behind them first): end the section so that
            // no invalidation waits forever.
            self.pins = 0;
            self.slot.leave();
        }
    }
}

/// A pin on a translator's current translations ([`AccessSection::pin`]),
/// the userspace form of an iommufd access object's pinned pages: while it
/// is held, every invalidation of the translator's device (unmap, replace,
/// detach, unbind, HWPT invalidation) waits, so host memory obtained in the
/// section that took it stays valid after the section ends, for I/O that
/// outlives it (io_uring, a DMA engine). Release it with
/// [`AccessSection::unpin`] or [`Translator::unpin`]; a translator whose
/// [`Translator::drain_requested`] is true has an invalidation waiting for
/// its pins. Not `Clone`: one release per pin.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a pin holds every invalidation of the device until released"]
pub struct AccessPin {
    translator: u64,
}

fn check_range(iova: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Err(Error::ZeroLength);
    }
    iova.checked_add(len - 1).ok_or(Error::Overflow {
        start: iova,
        length: len,
    })?;
    Ok(())
}

impl AccessSection<'_> {
    /// Pins the translations of this section beyond its end: the
    /// translator's section stays open (invalidations of its device wait)
    /// until every pin is released. Host pointers translated in this section
    /// stay valid while the pin is held. See [`AccessPin`].
    pub fn pin(&mut self) -> AccessPin {
        if self.t.pins == 0 {
            self.t.pin_gen = self.t.seen_gen;
        }
        self.t.pins += 1;
        AccessPin {
            translator: self.t.slot.id,
        }
    }

    /// Releases `pin` inside a section (the section's end then ends the
    /// translator's section if no pin is left).
    pub fn unpin(&mut self, pin: AccessPin) {
        self.t.release(pin);
    }

    /// Pins held by the translator.
    pub fn pinned(&self) -> u64 {
        self.t.pins
    }

    /// [`Translator::drain_requested`] inside a section.
    pub fn drain_requested(&self) -> bool {
        self.t.drain_requested()
    }

    /// Translates `[iova, iova+len)` for `perm`: clears `out` and fills it
    /// with host fragments covering the range in order (adjacent host runs
    /// are merged).
    ///
    /// A failure raises an I/O page fault on a fault-capable HWPT
    /// ([`Error::FaultRaised`]) or reports an event otherwise; see
    /// [`AccessSection::translate_nofault`] for a translation that does neither.
    #[inline(always)]
    pub fn translate(
        &mut self,
        pasid: Option<u32>,
        iova: u64,
        len: u64,
        perm: Perm,
        out: &mut Vec<Fragment>,
    ) -> Result<()> {
        self.translate_in(pasid, iova, len, perm, out, Mode::Fault)
    }

    /// [`AccessSection::translate`] without fault or event: a range that is not
    /// mapped, or not with `perm`, fails with [`Error::Unmapped`] /
    /// [`Error::AccessDenied`] even on a fault-capable HWPT. No fault group
    /// is queued (nothing for the fault queue's reader to answer) and no
    /// event goes to any event queue: the caller reports the failure its
    /// own way (a completion status, a `block-on-fault=0` error). Hits and
    /// fills of the cache are the same as for [`AccessSection::translate`].
    #[inline(always)]
    pub fn translate_nofault(
        &mut self,
        pasid: Option<u32>,
        iova: u64,
        len: u64,
        perm: Perm,
        out: &mut Vec<Fragment>,
    ) -> Result<()> {
        self.translate_in(pasid, iova, len, perm, out, Mode::NoFault)
    }

    #[inline(always)]
    fn translate_in(
        &mut self,
        pasid: Option<u32>,
        iova: u64,
        len: u64,
        perm: Perm,
        out: &mut Vec<Fragment>,
        mode: Mode,
    ) -> Result<()> {
        // Fast path: one cache entry covers the whole range.
        let key = pasid_key(pasid);
        if let Some(e) = self.t.hit(key, iova, perm) {
            let off = iova - e.start;
            if len != 0 && len - 1 <= e.span - off {
                let frag = Fragment {
                    ptr: e.host.wrapping_add(off) as usize as *mut u8,
                    len: len as usize,
                };
                match out.first_mut() {
                    Some(f) => {
                        *f = frag;
                        out.truncate(1);
                    }
                    None => out.push(frag),
                }
                return Ok(());
            }
        }
        out.clear();
        check_range(iova, len)?;
        let mut at = iova;
        let mut left = len;
        loop {
            let e = self.t.resolve(pasid, at, perm, left, mode)?;
            let avail = (e.last - at).saturating_add(1);
            let n = left.min(avail);
            let ptr = e.host.wrapping_add(at - e.start) as usize as *mut u8;
            match out.last_mut() {
                Some(f) if (f.ptr as usize).wrapping_add(f.len) == ptr as usize => {
                    f.len += n as usize
                }
                _ => out.push(Fragment {
                    ptr,
                    len: n as usize,
                }),
            }
            left -= n;
            if left == 0 {
                return Ok(());
            }
            at += n;
        }
    }

    /// True when an invalidation started since this section began: a
    /// device thread in a long section should finish its current unit of
    /// work and end the section (one atomic load).
    #[inline]
    pub fn invalidation_requested(&self) -> bool {
        self.t.slot.gen.load(Ordering::Relaxed) != self.t.seen_gen
    }

    /// Translates the first contiguous host run of `[iova, iova+len)`: the
    /// fragment returned covers `iova` and is at most `len` bytes long
    /// (shorter when the range continues in another host buffer).
    ///
    /// A failure raises a fault or reports an event as for
    /// [`AccessSection::translate`].
    #[inline(always)]
    pub fn translate_contiguous(
        &mut self,
        pasid: Option<u32>,
        iova: u64,
        len: u64,
        perm: Perm,
    ) -> Result<Fragment> {
        self.translate_contiguous_in(pasid, iova, len, perm, Mode::Fault)
    }

    /// [`AccessSection::translate_contiguous`] without fault or event: fails
    /// with [`Error::Unmapped`] / [`Error::AccessDenied`] as
    /// [`AccessSection::translate_nofault`] does.
    #[inline(always)]
    pub fn translate_contiguous_nofault(
        &mut self,
        pasid: Option<u32>,
        iova: u64,
        len: u64,
        perm: Perm,
    ) -> Result<Fragment> {
        self.translate_contiguous_in(pasid, iova, len, perm, Mode::NoFault)
    }

    /// The whole host-contiguous run that holds `iova` and allows `perm`,
    /// as far as the translation cache keeps it (a mapping, or the part of
    /// it a dirty-tracked domain tracks as one), including the bytes before
    /// `iova`: a caller that remembers translations covers later accesses
    /// below `iova` too. `left` is the length the caller means to access
    /// from `iova` (what a miss reports). Fails as
    /// [`AccessSection::translate_nofault`] does, without fault or event.
    #[inline(always)]
    pub fn run_nofault(
        &mut self,
        pasid: Option<u32>,
        iova: u64,
        left: u64,
        perm: Perm,
    ) -> Result<Run> {
        if left == 0 {
            return Err(Error::ZeroLength);
        }
        let key = pasid_key(pasid);
        let e = match self.t.hit(key, iova, perm) {
            Some(e) => *e,
            None => self.t.fill(key, pasid, iova, perm, left, Mode::NoFault)?,
        };
        Ok(Run {
            iova: e.start,
            ptr: e.host as usize as *mut u8,
            // `start + span` is `last`: only the whole 64-bit space has
            // no length that fits; it loses its last byte.
            len: e.span.saturating_add(1),
        })
    }

    #[inline(always)]
    fn translate_contiguous_in(
        &mut self,
        pasid: Option<u32>,
        iova: u64,
        len: u64,
        perm: Perm,
        mode: Mode,
    ) -> Result<Fragment> {
        if len == 0 {
            return Err(Error::ZeroLength);
        }
        let key = pasid_key(pasid);
        let e = match self.t.hit(key, iova, perm) {
            Some(e) => *e,
            None => self.t.fill(key, pasid, iova, perm, len, mode)?,
        };
        let off = iova - e.start;
        let n = (len - 1).min(e.span - off) + 1;
        Ok(Fragment {
            ptr: e.host.wrapping_add(off) as usize as *mut u8,
            len: n as usize,
        })
    }

    fn for_each_piece(
        &mut self,
        pasid: Option<u32>,
        iova: u64,
        len: usize,
        perm: Perm,
        mode: Mode,
        mut f: impl FnMut(&Memory, usize, usize, usize) -> Result<()>,
    ) -> Result<()> {
        check_range(iova, len as u64)?;
        // First pass: translate the whole range, so that a failure transfers
        // nothing. The second pass hits the cache.
        let mut done = 0usize;
        while done < len {
            let at = iova + done as u64;
            let e = self.t.resolve(pasid, at, perm, (len - done) as u64, mode)?;
            let avail = (e.last - at).saturating_add(1);
            done += ((len - done) as u64).min(avail) as usize;
        }
        let mut done = 0usize;
        while done < len {
            let at = iova + done as u64;
            let e = self.t.resolve(pasid, at, perm, (len - done) as u64, mode)?;
            let avail = (e.last - at).saturating_add(1);
            let n = ((len - done) as u64).min(avail) as usize;
            let off = usize::try_from(e.mem_off + (at - e.start))
                .map_err(|_| Error::Unmapped { pasid, iova: at })?;
            let mem = &self.t.mems[e.mem as usize];
            f(mem, off, done, n)?;
            done += n;
        }
        Ok(())
    }

    /// Reads device memory into `buf`. The whole range is translated
    /// first: on error nothing was transferred.
    pub fn read(&mut self, pasid: Option<u32>, iova: u64, buf: &mut [u8]) -> Result<()> {
        self.read_in(pasid, iova, buf, Mode::Fault)
    }

    /// [`AccessSection::read`] without fault or event (see
    /// [`AccessSection::translate_nofault`]).
    pub fn read_nofault(&mut self, pasid: Option<u32>, iova: u64, buf: &mut [u8]) -> Result<()> {
        self.read_in(pasid, iova, buf, Mode::NoFault)
    }

    fn read_in(&mut self, pasid: Option<u32>, iova: u64, buf: &mut [u8], mode: Mode) -> Result<()> {
        let len = buf.len();
        self.for_each_piece(pasid, iova, len, Perm::READ, mode, |m, off, done, n| {
            m.read_at(off, &mut buf[done..done + n])
        })
    }

    /// Writes `buf` to device memory. The whole range is translated first:
    /// on error nothing was written.
    pub fn write(&mut self, pasid: Option<u32>, iova: u64, buf: &[u8]) -> Result<()> {
        self.write_in(pasid, iova, buf, Mode::Fault)
    }

    /// [`AccessSection::write`] without fault or event (see
    /// [`AccessSection::translate_nofault`]), e.g. for a completion record whose
    /// failure the device reports itself.
    pub fn write_nofault(&mut self, pasid: Option<u32>, iova: u64, buf: &[u8]) -> Result<()> {
        self.write_in(pasid, iova, buf, Mode::NoFault)
    }

    fn write_in(&mut self, pasid: Option<u32>, iova: u64, buf: &[u8], mode: Mode) -> Result<()> {
        self.for_each_piece(
            pasid,
            iova,
            buf.len(),
            Perm::WRITE,
            mode,
            |m, off, done, n| m.write_at(off, &buf[done..done + n]),
        )
    }

    /// Copies `len` bytes between two device addresses (memmove semantics
    /// per fragment pair). Both ranges are translated first: on error
    /// nothing was copied.
    pub fn copy(
        &mut self,
        src_pasid: Option<u32>,
        src: u64,
        dst_pasid: Option<u32>,
        dst: u64,
        len: u64,
    ) -> Result<()> {
        self.copy_in(src_pasid, src, dst_pasid, dst, len, Mode::Fault)
    }

    /// [`AccessSection::copy`] without fault or event (see
    /// [`AccessSection::translate_nofault`]).
    pub fn copy_nofault(
        &mut self,
        src_pasid: Option<u32>,
        src: u64,
        dst_pasid: Option<u32>,
        dst: u64,
        len: u64,
    ) -> Result<()> {
        self.copy_in(src_pasid, src, dst_pasid, dst, len, Mode::NoFault)
    }

    fn copy_in(
        &mut self,
        src_pasid: Option<u32>,
        src: u64,
        dst_pasid: Option<u32>,
        dst: u64,
        len: u64,
        mode: Mode,
    ) -> Result<()> {
        check_range(src, len)?;
        check_range(dst, len)?;
        // Validate both ranges first: on error nothing is copied.
        for (pasid, base, perm) in [(src_pasid, src, Perm::READ), (dst_pasid, dst, Perm::WRITE)] {
            let mut done = 0u64;
            while done < len {
                let e = self.t.resolve(pasid, base + done, perm, len - done, mode)?;
                done += (len - done).min((e.last - (base + done)).saturating_add(1));
            }
        }
        let mut done = 0u64;
        while done < len {
            let s_at = src + done;
            let d_at = dst + done;
            let es = self
                .t
                .resolve(src_pasid, s_at, Perm::READ, len - done, mode)?;
            let ed = self
                .t
                .resolve(dst_pasid, d_at, Perm::WRITE, len - done, mode)?;
            let n = (len - done)
                .min((es.last - s_at).saturating_add(1))
                .min((ed.last - d_at).saturating_add(1));
            let so =
                usize::try_from(es.mem_off + (s_at - es.start)).map_err(|_| Error::Unmapped {
                    pasid: src_pasid,
                    iova: s_at,
                })?;
            let dof =
                usize::try_from(ed.mem_off + (d_at - ed.start)).map_err(|_| Error::Unmapped {
                    pasid: dst_pasid,
                    iova: d_at,
                })?;
            let nn = usize::try_from(n).map_err(|_| Error::Overflow {
                start: src,
                length: len,
            })?;
            Memory::copy(
                &self.t.mems[es.mem as usize],
                so,
                &self.t.mems[ed.mem as usize],
                dof,
                nn,
            )?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventQueue, FaultQueue, HwInfo, HwptAlloc, Iommu};

    const P: u64 = PAGE_SIZE;

    /// A device attached to a fault-capable HWPT over an IOAS with one
    /// read-only page at `P` and one read-write page at `2P`, plus the
    /// context-wide event queue.
    fn fault_capable() -> (Iommu, IommuDevice, FaultQueue, EventQueue, Arc<Memory>) {
        let iommu = Iommu::new();
        let dev = IommuDevice::new("d0", HwInfo::full());
        let dev_id = iommu.bind(&dev).expect("bind");
        let ioas = iommu.ioas_alloc().expect("ioas");
        let mem = Memory::anonymous("m", (2 * P) as usize).expect("mem");
        iommu
            .ioas_map(ioas, &mem, 0, P, Some(P), Perm::READ)
            .expect("map ro");
        iommu
            .ioas_map(ioas, &mem, P, P, Some(2 * P), Perm::RW)
            .expect("map rw");
        let (fid, fq) = iommu.fault_queue_alloc().expect("fault queue");
        let (_eid, eq) = iommu.event_queue_alloc(None, 8).expect("event queue");
        let h = iommu
            .hwpt_alloc(&HwptAlloc {
                dev_id,
                pt_id: ioas,
                fault_id: Some(fid),
                ..Default::default()
            })
            .expect("hwpt");
        iommu.attach(dev_id, None, h).expect("attach");
        (iommu, dev, fq, eq, mem)
    }

    fn assert_quiet(fq: &FaultQueue, eq: &EventQueue) {
        assert_eq!(fq.stats().raised, 0);
        assert_eq!(fq.undelivered(), 0);
        let mut evs = Vec::new();
        assert_eq!(eq.read_batch(&mut evs, 8), Ok(0));
        assert_eq!(eq.stats().queued, 0);
    }

    #[test]
    fn test_nofault_miss_is_unmapped_without_group_or_event() {
        let (_iommu, dev, fq, eq, _mem) = fault_capable();
        let mut t = dev.translator();
        let mut out = Vec::new();
        {
            let mut a = t.access();
            assert_eq!(
                a.translate_nofault(None, 5 * P + 8, 64, Perm::READ, &mut out),
                Err(Error::Unmapped {
                    pasid: None,
                    iova: 5 * P + 8
                })
            );
            assert!(out.is_empty());
            assert_eq!(
                a.translate_contiguous_nofault(None, 5 * P, 8, Perm::WRITE),
                Err(Error::Unmapped {
                    pasid: None,
                    iova: 5 * P
                })
            );
            // A range that starts mapped and runs into a hole.
            assert_eq!(
                a.translate_nofault(None, 3 * P - 8, 16, Perm::READ, &mut out),
                Err(Error::Unmapped {
                    pasid: None,
                    iova: 3 * P
                })
            );
            assert_eq!(
                a.copy_nofault(None, 2 * P, None, 7 * P, 8),
                Err(Error::Unmapped {
                    pasid: None,
                    iova: 7 * P
                })
            );
        }
        assert_eq!(
            t.read_nofault(None, 9 * P, &mut [0u8; 4]),
            Err(Error::Unmapped {
                pasid: None,
                iova: 9 * P
            })
        );
        assert_quiet(&fq, &eq);
    }

    #[test]
    fn test_run_nofault_covers_the_mapping_around_iova() {
        let (_iommu, dev, fq, eq, mem) = fault_capable();
        let mut t = dev.translator();
        {
            let mut a = t.access();
            // The read-write page at 2P, asked from inside it.
            let run = a
                .run_nofault(None, 2 * P + 100, 8, Perm::WRITE)
                .expect("mapped");
            assert_eq!((run.iova, run.len), (2 * P, P));
            let host = mem.as_ptr() as usize + P as usize;
            assert_eq!(run.ptr as usize, host, "the run starts at its mapping");
            // Read-only at P: not for writing, and a hole is a miss.
            assert_eq!(
                a.run_nofault(None, P + 8, 1, Perm::WRITE),
                Err(Error::AccessDenied {
                    pasid: None,
                    iova: P + 8,
                    perm: Perm::WRITE
                })
            );
            assert_eq!(
                a.run_nofault(None, 5 * P, 1, Perm::READ),
                Err(Error::Unmapped {
                    pasid: None,
                    iova: 5 * P
                })
            );
            assert_eq!(
                a.run_nofault(None, P, 0, Perm::READ),
                Err(Error::ZeroLength)
            );
        }
        assert_quiet(&fq, &eq);
    }

    #[test]
    fn test_nofault_permission_is_access_denied() {
        let (_iommu, dev, fq, eq, _mem) = fault_capable();
        let mut t = dev.translator();
        assert_eq!(
            t.write_nofault(None, P + 16, b"x"),
            Err(Error::AccessDenied {
                pasid: None,
                iova: P + 16,
                perm: Perm::WRITE
            })
        );
        {
            let mut a = t.access();
            assert_eq!(
                a.translate_contiguous_nofault(None, P, 4, Perm::WRITE),
                Err(Error::AccessDenied {
                    pasid: None,
                    iova: P,
                    perm: Perm::WRITE
                })
            );
        }
        assert_quiet(&fq, &eq);
    }

    #[test]
    fn test_nofault_hits_behave_as_translate() {
        let (_iommu, dev, fq, eq, mem) = fault_capable();
        let mut t = dev.translator();
        t.write_nofault(None, 2 * P + 4, b"rec").expect("write");
        let mut b = [0u8; 3];
        mem.read_at((P + 4) as usize, &mut b).expect("read back");
        assert_eq!(&b, b"rec");
        let mut out = Vec::new();
        {
            let mut a = t.access();
            a.translate_nofault(None, 2 * P, P, Perm::RW, &mut out)
                .expect("translate");
            let f = a
                .translate_contiguous_nofault(None, P, 2 * P, Perm::READ)
                .expect("contiguous");
            assert_eq!(f.len as u64, P);
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len as u64, P);
        assert_quiet(&fq, &eq);
    }

    #[test]
    fn test_translate_still_raises_after_nofault_miss() {
        let (_iommu, dev, fq, _eq, _mem) = fault_capable();
        let mut t = dev.translator();
        let mut out = Vec::new();
        let mut a = t.access();
        assert!(matches!(
            a.translate_nofault(None, 5 * P, 8, Perm::READ, &mut out),
            Err(Error::Unmapped { .. })
        ));
        assert_eq!(fq.stats().raised, 0);
        let err = a.translate(None, 5 * P, 8, Perm::READ, &mut out);
        assert!(
            matches!(err, Err(Error::FaultRaised { iova, .. }) if iova == 5 * P),
            "{err:?}"
        );
        let err = a.translate_contiguous(None, 6 * P, 8, Perm::READ);
        assert!(matches!(err, Err(Error::FaultRaised { .. })), "{err:?}");
        drop(a);
        assert_eq!(fq.stats().raised, 2);
        let mut recs = Vec::new();
        assert_eq!(fq.read_batch(&mut recs, 8), Ok(2));
        assert_eq!(recs[0].addr, 5 * P);
    }

    /// A device attached (auto paging HWPT) to an IOAS with a 64 KiB area
    /// at each of `iovas`.
    fn plain(iovas: &[u64]) -> (Iommu, IommuDevice) {
        let iommu = Iommu::new();
        let dev = IommuDevice::new("d0", HwInfo::full());
        let dev_id = iommu.bind(&dev).expect("bind");
        let ioas = iommu.ioas_alloc().expect("ioas");
        let mem = Memory::anonymous("m", 16 * P as usize).expect("mem");
        for &iova in iovas {
            iommu
                .ioas_map(ioas, &mem, 0, 16 * P, Some(iova), Perm::RW)
                .expect("map");
        }
        iommu.attach(dev_id, None, ioas).expect("attach");
        (iommu, dev)
    }

    #[test]
    fn test_buffers_a_power_of_two_apart_stay_cached() {
        for apart in [1u64 << 20, 64 << 20, 1 << 30] {
            let src = 0x1000_0000u64;
            let dst = src + apart;
            let (_iommu, dev) = plain(&[src, dst]);
            let mut t = dev.translator();
            let mut b = [0u8; 8];
            // Every page of both buffers, alternately: one miss each.
            for round in 0..4u64 {
                for k in 0..16u64 {
                    t.read(None, src + k * P, &mut b).expect("read src");
                    t.write(None, dst + k * P + 8, &b).expect("write dst");
                }
                assert_eq!(t.stats().misses, 32, "apart {apart:#x} round {round}");
            }
            assert_eq!(t.cached_translations(), 32);
            let mut a = t.access();
            for _ in 0..8 {
                a.translate_contiguous(None, src, 16 * P, Perm::READ)
                    .expect("src");
                a.translate_contiguous(None, dst, 16 * P, Perm::WRITE)
                    .expect("dst");
            }
            drop(a);
            assert_eq!(t.stats().misses, 32, "apart {apart:#x}");
        }
    }

    #[test]
    fn test_set_keeps_the_two_most_recent_fills() {
        // Three pages that share a set (the search is bounded and the hash
        // spreads pages evenly, so it finds them quickly).
        let base = 0x1_0000_0000u64 / P;
        let want = set_index(base * P);
        let same: Vec<u64> = (base..base + 64 * CACHE_SETS as u64)
            .filter(|p| set_index(p * P) == want)
            .take(3)
            .map(|p| p * P)
            .collect();
        assert_eq!(same.len(), 3);
        let iommu = Iommu::new();
        let dev = IommuDevice::new("d0", HwInfo::full());
        let dev_id = iommu.bind(&dev).expect("bind");
        let ioas = iommu.ioas_alloc().expect("ioas");
        let mem = Memory::anonymous("m", P as usize).expect("mem");
        for &iova in &same {
            iommu
                .ioas_map(ioas, &mem, 0, P, Some(iova), Perm::RW)
                .expect("map");
        }
        iommu.attach(dev_id, None, ioas).expect("attach");
        let mut t = dev.translator();
        let mut b = [0u8; 1];
        let mut misses = |t: &mut Translator, iova: u64| {
            let before = t.stats().misses;
            t.read(None, iova, &mut b).expect("read");
            t.stats().misses - before
        };
        assert_eq!(misses(&mut t, same[0]), 1);
        assert_eq!(misses(&mut t, same[1]), 1);
        assert_eq!(misses(&mut t, same[0]), 0);
        assert_eq!(misses(&mut t, same[1]), 0);
        // A third page evicts the oldest fill (same[0]).
        assert_eq!(misses(&mut t, same[2]), 1);
        assert_eq!(misses(&mut t, same[1]), 0);
        assert_eq!(misses(&mut t, same[2]), 0);
        assert_eq!(misses(&mut t, same[0]), 1);
        assert_eq!(t.cached_translations(), 2);
    }

    #[test]
    fn test_refill_for_write_replaces_read_only_entry() {
        let iommu = Iommu::new();
        let dev = IommuDevice::new("d0", HwInfo::full());
        let dev_id = iommu.bind(&dev).expect("bind");
        let ioas = iommu.ioas_alloc().expect("ioas");
        let mem = Memory::anonymous("m", 16 * P as usize).expect("mem");
        iommu
            .ioas_map(ioas, &mem, 0, 16 * P, Some(0), Perm::RW)
            .expect("map");
        let h = iommu
            .hwpt_alloc(&HwptAlloc {
                dev_id,
                pt_id: ioas,
                flags: crate::IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
                ..Default::default()
            })
            .expect("hwpt");
        iommu.attach(dev_id, None, h).expect("attach");
        iommu.hwpt_set_dirty_tracking(h, true).expect("dirty on");
        let mut t = dev.translator();
        let mut b = [0u8; 4];
        // Dirty tracking caches a read without write permission.
        t.read(None, 3 * P, &mut b).expect("read");
        assert_eq!(t.cached_translations(), 1);
        t.write(None, 3 * P + 4, &b).expect("write");
        assert_eq!(t.cached_translations(), 1);
        let misses = t.stats().misses;
        t.read(None, 3 * P, &mut b).expect("read again");
        t.write(None, 3 * P, &b).expect("write again");
        assert_eq!(t.stats().misses, misses);
        assert_eq!(
            iommu.hwpt_get_dirty_bitmap(h, 0, 16 * P, P, false),
            Ok(vec![1 << 3])
        );
    }

    #[test]
    fn test_nofault_without_fault_queue_reports_no_event() {
        let iommu = Iommu::new();
        let dev = IommuDevice::new("d0", HwInfo::full());
        let dev_id = iommu.bind(&dev).expect("bind");
        let ioas = iommu.ioas_alloc().expect("ioas");
        let (_eid, eq) = iommu.event_queue_alloc(None, 8).expect("event queue");
        iommu.attach(dev_id, None, ioas).expect("attach");
        let mut t = dev.translator();
        assert_eq!(
            t.read_nofault(None, P, &mut [0u8; 1]),
            Err(Error::Unmapped {
                pasid: None,
                iova: P
            })
        );
        let mut evs = Vec::new();
        assert_eq!(eq.read_batch(&mut evs, 8), Ok(0));
        // The faulting form reports one.
        assert!(t.read(None, P, &mut [0u8; 1]).is_err());
        assert_eq!(eq.read_batch(&mut evs, 8), Ok(1));
    }
}

#[cfg(test)]
mod pin_tests {
    use crate::{HwInfo, Iommu, IommuDevice, Memory, Perm};

    /// An unmap issued while a pin is held waits for its release, across
    /// the end of the section that took it; a section begun meanwhile sees
    /// the unmap (its translation misses).
    #[test]
    fn test_pin_holds_unmap_until_released() {
        let iommu = Iommu::new();
        let dev = IommuDevice::new("pin", HwInfo::default());
        let id = iommu.bind(&dev).expect("bind");
        let ioas = iommu.ioas_alloc().expect("ioas");
        iommu.attach(id, None, ioas).expect("attach");
        let m = Memory::anonymous("m", 0x2000).expect("mem");
        iommu
            .ioas_map(ioas, &m, 0, 0x2000, Some(0x10000), Perm::RW)
            .expect("map");
        let mut t = dev.translator();
        let pin = {
            let mut s = t.access();
            let mut b = [0u8; 4];
            s.read(None, 0x10000, &mut b).expect("read");
            s.pin()
        };
        assert_eq!(t.pinned(), 1);
        assert!(!t.drain_requested());
        let (_, mut ticket) = iommu
            .ioas_unmap_begin(ioas, 0x10000, 0x2000)
            .expect("unmap");
        assert!(!ticket.is_done(), "the pin holds the unmap");
        assert!(t.drain_requested());
        {
            let mut s = t.access();
            assert!(
                s.read(None, 0x10000, &mut [0u8; 4]).is_err(),
                "fresh section misses"
            );
        }
        assert!(
            !ticket.is_done(),
            "a later section does not release the pin"
        );
        t.unpin(pin);
        assert!(ticket.is_done());
        assert!(!t.drain_requested());
        assert_eq!(t.pinned(), 0);
    }

    /// A pin released inside a section ends the translator's section with it.
    #[test]
    fn test_unpin_inside_section() {
        let iommu = Iommu::new();
        let dev = IommuDevice::new("pin2", HwInfo::default());
        let id = iommu.bind(&dev).expect("bind");
        let ioas = iommu.ioas_alloc().expect("ioas");
        iommu.attach(id, None, ioas).expect("attach");
        let m = Memory::anonymous("m", 0x1000).expect("mem");
        iommu
            .ioas_map(ioas, &m, 0, 0x1000, Some(0x10000), Perm::RW)
            .expect("map");
        let mut t = dev.translator();
        let pin = t.access().pin();
        let (_, mut ticket) = iommu.ioas_unmap_begin(ioas, 0, u64::MAX).expect("unmap");
        assert!(!ticket.is_done());
        {
            let mut s = t.access();
            s.unpin(pin);
            assert!(!ticket.is_done(), "still inside a section");
        }
        assert!(ticket.is_done());
    }
}
