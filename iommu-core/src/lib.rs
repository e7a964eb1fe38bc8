//! The `/dev/iommu` (iommufd) object model in userspace.
//!
//! # Model
//!
//! An [`Iommu`] is one open `/dev/iommu`: a table of objects addressed by
//! 32-bit ids (from 1, 31 bits, one id space for every kind). The objects:
//!
//! | object | created by | iommufd analogue |
//! | --- | --- | --- |
//! | IOAS: IOVA areas → [`Memory`] with R/W permissions | [`Iommu::ioas_alloc`] | `IOMMU_IOAS_*` |
//! | device: a [`IommuDevice`] (label + [`HwInfo`]) bound to the context | [`Iommu::bind`] | VFIO cdev bind |
//! | HWPT paging: what devices attach to, built from an IOAS | [`Iommu::hwpt_alloc`], or automatically by attaching an IOAS id | `IOMMU_HWPT_ALLOC` |
//! | HWPT nested: a user-owned stage-1 table walked through its parent | [`Iommu::hwpt_alloc`] with [`HwptData::Stage1`] | `IOMMU_HWPT_ALLOC` + data |
//! | fault queue: page-fault records out, responses in | [`Iommu::fault_queue_alloc`] | `IOMMU_FAULT_QUEUE_ALLOC` |
//! | vIOMMU / vdevice: virtual device ids and vPASID ↔ pPASID | [`Iommu::viommu_alloc`], [`Iommu::vdevice_alloc`] | `IOMMU_VIOMMU_ALLOC`, `IOMMU_VDEVICE_ALLOC` |
//! | event queue: unrecoverable translation failures | [`Iommu::event_queue_alloc`] | `IOMMU_VEVENTQ_ALLOC` |
//!
//! Semantics follow iommufd: fixed or allocated IOVA; unmap covers whole
//! areas only (iova 0 + `u64::MAX` unmaps all); the usable IOVA space is the
//! allowed ranges minus the reserved ranges of every device whose RID is
//! attached; the IOVA alignment is the largest page size of the paging
//! HWPTs over the IOAS (from allocation, attached or not) and of the
//! attached devices; destroying an object that something depends on fails
//! with [`Error::Busy`], and so does destroying a fault or event queue
//! while a handle of it (its fd) is open; a RID attaches to a nested HWPT
//! of a vIOMMU only once the device has a vdevice there (`ENOENT` before);
//! copy between IOAS shares the same pages. Every
//! [`Error`] names the errno iommufd returns ([`Error::errno`]).
//!
//! ```
//! use iommu_core::{IommuDevice, HwInfo, Iommu, Memory, Perm};
//!
//! # fn main() -> iommu_core::Result<()> {
//! let iommu = Iommu::new();
//! let dev = IommuDevice::new("net0", HwInfo::default());
//! let dev_id = iommu.bind(&dev)?;
//! let ioas = iommu.ioas_alloc()?;
//! let mem = Memory::anonymous("guest-ram", 1 << 20)?;
//! let iova = iommu.ioas_map(ioas, &mem, 0, 64 << 10, Some(0x10000), Perm::RW)?;
//! iommu.attach(dev_id, None, ioas)?;
//!
//! // On the device's DMA thread:
//! let mut t = dev.translator();
//! t.write(None, iova + 8, b"hello")?;
//! let mut buf = [0u8; 5];
//! t.read(None, iova + 8, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//!
//! // After unmap returns, no device can reach the old pages.
//! assert_eq!(iommu.ioas_unmap(ioas, iova, 64 << 10)?, 64 << 10);
//! assert!(t.read(None, iova + 8, &mut buf).is_err());
//! # Ok(())
//! # }
//! ```
//!
//! # The device side
//!
//! A device's owner creates a [`IommuDevice`] and gives each DMA thread a
//! [`Translator`] ([`IommuDevice::translator`]). A translator has its own
//! translation cache (IOTLB, 2-way set associative by hashed 4 KiB page
//! number, each entry covering a whole contiguous area). DMA happens inside an *access section*
//! ([`Translator::access`] → [`AccessSection`]):
//! [`AccessSection::translate`] yields the host [`Fragment`]s covering a
//! range (one IOVA range need not be one host buffer),
//! [`AccessSection::read`] / [`AccessSection::write`] /
//! [`AccessSection::copy`] move bytes. Host pointers are valid only until
//! the section ends.
//!
//! A translation that fails on a HWPT with a fault queue raises an I/O page
//! fault: the access returns [`Error::FaultRaised`] with a [`PendingFault`].
//! The device ends its section, and either polls [`PendingFault::status`] or
//! blocks in [`PendingFault::wait`]; a per-device waker
//! ([`IommuDevice::set_fault_waker`]) is called when a group is answered, so an
//! event loop can learn of it without spinning. On a HWPT without a fault
//! queue the access fails with [`Error::Unmapped`] / [`Error::AccessDenied`]
//! and an event goes to the event queue that covers the device.
//!
//! The `_nofault` forms ([`AccessSection::translate_nofault`],
//! [`AccessSection::translate_contiguous_nofault`],
//! [`AccessSection::read_nofault`], [`AccessSection::write_nofault`],
//! [`AccessSection::copy_nofault`]) ask "is this mapped?" without side
//! effects: on any HWPT a failure is
//! [`Error::Unmapped`] / [`Error::AccessDenied`], no fault group is queued
//! and no event is reported; the caller reports the failure its own way
//! (a device that does not block on faults, a completion-record write).
//!
//! # Unmap safety protocol
//!
//! After [`Iommu::ioas_unmap`], [`Iommu::replace`], [`Iommu::detach`],
//! [`Iommu::unbind`] or [`Iommu::hwpt_invalidate`] returns, no device can
//! touch the old pages through a translation it obtained before. The
//! mechanism, per translator:
//!
//! - `gen`: a counter the invalidator bumps. At the start of every access
//!   section the translator compares it with the value it last saw and drops
//!   its whole cache if it changed.
//! - `active`: a sequence the translator makes odd when a section begins and
//!   even when it ends.
//!
//! A section begins with a sequentially consistent store of `active` followed
//! by a load of `gen`; an invalidator first changes the shared state (removes
//! areas, switches the attachment), then bumps `gen` and loads `active`, both
//! sequentially consistent. So either the translator sees the new `gen` (and
//! its misses see the new state), or the invalidator sees the section open and
//! waits for `active` to move on. The invalidation is thus two-phase:
//!
//! 1. `*_begin` ([`Iommu::ioas_unmap_begin`], ...) changes the state, bumps
//!    every affected translator's `gen` and returns an
//!    [`InvalidationTicket`] holding the translators that were inside a
//!    section, with the `active` value seen.
//! 2. The ticket is complete when each of those has a different `active`.
//!    [`InvalidationTicket::is_done`] polls, [`InvalidationTicket::pending`]
//!    names the laggards, [`InvalidationTicket::nudge`] calls their nudge
//!    hook ([`Translator::set_nudge`]), [`InvalidationTicket::wait`] blocks
//!    (a translator that ends a section wakes waiters; no spinning).
//!
//! Which translators an invalidation must name: an unmap names every
//! translator of the IOAS's users *and* every translator that left the IOAS
//! (its device was detached, replaced away or unbound) while inside a
//! section that has not ended yet. The leaving operation records those
//! sections in the IOAS under the IOAS's lock, at the moment it takes the
//! device out of the user list; otherwise an unmap that runs after the
//! device left but before the section ended would find no user and return
//! while the section still held a cached translation of the pages. The
//! record of a section is dropped once the section has ended.
//! (`iommu-core/tests/unmap_race.rs` is the regression test, one per path.)
//!
//! **Access pins.** I/O that outlives a section (a read submitted to
//! io_uring into translated host buffers, completed later) holds an
//! [`AccessPin`] ([`AccessSection::pin`]), the counterpart of the pages an
//! iommufd access object pins: while a translator holds pins, its section
//! does not end when the [`AccessSection`] is dropped (`active` stays odd
//! across sections), so every invalidation that reaches the translator
//! waits until the last pin is released ([`Translator::unpin`]). The
//! owner learns that an invalidation waits through the nudge hook and
//! [`Translator::drain_requested`]; it finishes or cancels the pinned work
//! and takes no new pin until then (a pin taken meanwhile is still safe,
//! it only delays the invalidation). Sections begun while pins are held
//! see the new `gen` and flush as usual, so new translations are fresh.
//! A pin covers the whole device, not a range: an unmap of any range waits
//! for all of the translator's pinned work. (`--cfg
//! ioasis_broken="unpinned"` makes a section's end ignore pins, and
//! `--cfg ioasis_broken="firstunpin"` makes the first release of several
//! pins end the section, for the tests and loom models that show they
//! catch an unmap returning under pinned I/O.)
//!
//! The blocking forms are `*_begin` plus `wait`. Idle translators cost the
//! invalidator two atomic operations each and never delay it. A thread must
//! never block inside an access section (not on a fault, not on a lock of its
//! own that an unmapper may hold): the invalidator waits for sections to end.
//! [`Memory`] is reference counted by areas and by translator caches, so the
//! mapping itself outlives every user.
//!
//! # Model checking of the protocol
//!
//! The protocol is checked with the [loom](https://docs.rs/loom) model
//! checker on this crate's own code. Built with `--cfg loom`, every lock,
//! condition variable and atomic of the crate is loom's (the crate's
//! primitives all come from one module, `src/prim.rs`; in a normal build
//! it re-exports std's, so nothing changes there). The models
//! (`tests/loom.rs`) run the real [`Iommu`], [`Translator`],
//! [`InvalidationTicket`] and fault queue code, and loom runs each model
//! under every interleaving of its threads within a preemption bound, and
//! with every value each load may return under the C11 memory model.
//!
//! What is checked: translator threads, whose caches hold a translation of
//! the old pages, write a stamp that no other write uses into those pages,
//! section after section, while the main thread unmaps the area. Every
//! thread whose unmap, replace, detach or unbind returned reads the stamp
//! in the old pages before any other thread can run; after all threads
//! ended the stamp must be the one read. So no write lands in the old
//! pages after a promise, in any explored execution. A deadlock (a lost
//! wake-up of a ticket or fault waiter) fails a model as well.
//!
//! | model | besides the unmap | preemptions | executions |
//! | --- | --- | --- | --- |
//! | `unmap_one_translator` | a translator, two sections | any (exhaustive) | 2003 |
//! | `unmap_two_translators` | two translators of a device | 5 | 7207 |
//! | `replace_during_unmap` | a translator; [`Iommu::replace`] to another IOAS | 4 | 12156 |
//! | `detach_during_unmap` | a translator; [`Iommu::detach`] | 4 | 12156 |
//! | `unbind_during_unmap` | a translator; [`Iommu::unbind`] | 4 | 14830 |
//! | `fault_answer_during_unmap` | a translator that faults on a fault-capable HWPT, waits for the answer outside its section and retries; a responder that maps the page and answers | 4 | 33563 |
//! | `unmap_during_pinned_io` | a translator that pins ([`AccessSection::pin`]), ends its section, then writes through the pinned host pointer and unpins | any (exhaustive) | 2003 |
//! | `unmap_during_two_pins` | a translator that pins in two sections, then writes and releases through each pin in turn | any (exhaustive) | 1349 |
//! | `drain_requested_during_pinned_io` | a pin holder woken by its nudge hook: [`Translator::drain_requested`] is true, it writes and unpins; a pin taken after the unmap returned is not asked to drain | any (exhaustive) | 1430 |
//!
//! In the three pin models the write through the pinned pointer (deferred
//! I/O) lands after the section that translated it ended: only the pin
//! keeps the unmap from returning before it.
//!
//! Run them with `scripts/model-check.sh` (release build in `target/loom`;
//! the nine models' times add up to 10-30 s on the project's 2-core
//! machine, shared with other builds, the three pin models' to under 1 s;
//! two run at a time).
//! `scripts/model-check.sh --prove-fail` also builds four test-only broken
//! variants and requires the models to fail there: with
//! `--cfg ioasis_broken="departed"` (a device that leaves an IOAS inside a
//! section is not recorded in it) the replace, detach and unbind models
//! fail after 147 to 192 executions; with `--cfg ioasis_broken="acqrel"`
//! (both store-then-load pairs Release/Acquire) the unmap models fail on
//! their first execution; with `--cfg ioasis_broken="unpinned"` (a
//! section's end ignores pins) the three pin models fail after 4 to 36
//! executions; with `--cfg ioasis_broken="firstunpin"` (the first release
//! of two pins ends the section) the two-pin model fails after 12.
//! `scripts/test.sh` runs them all.
//!
//! Bounds of the model: one device per model (the IOAS's user table is a
//! hash map, whose order loom could not replay across executions); loom
//! 0.7 checks `SeqCst` accesses only as `AcqRel`, so under loom a `SeqCst`
//! access is modelled with a `SeqCst` fence on either side (as x86-64
//! compiles it; without those fences loom reports the correct protocol as
//! broken on its first execution); `Arc` reference counts and the memory
//! itself are std's, outside the model. The concurrency stress test
//! (`tests/stress.rs`) runs the protocol on real threads.
//!
//! # Faults, events and dirty tracking
//!
//! - A failed access on a fault-capable HWPT raises one fault *group*: a
//!   record for the faulting page and for each following page of the same
//!   access that fails too (at most [`MAX_FAULT_GROUP_RECORDS`]), all with
//!   the group's cookie and `grpid`, `LAST_PAGE` on the last. The consumer
//!   reads whole groups only ([`FaultQueue::read_batch`]); each group holds
//!   one of the device's outstanding-fault slots
//!   ([`MAX_OUTSTANDING_FAULTS_PER_DEVICE`] unless
//!   [`IommuDevice::set_max_outstanding_faults`] changed the bound) until
//!   it is answered (by [`FaultQueue::respond`], or INVALID automatically on
//!   detach, replace, unbind or queue destroy). Past the bound the access
//!   fails with [`Error::FaultOverflow`] and [`FaultQueueStats::overflows`]
//!   counts it. A fault queue may also have a [`FaultBudget`]
//!   ([`FaultQueue::set_budget`]), shared with other queues of the same
//!   consumer: a group takes a slot of it first, so that one consumer that
//!   never answers cannot hold the whole of a device's bound.
//! - A failed access on a HWPT without fault queue is reported to the event
//!   queue of the device's vIOMMU (if it has a vdevice there) or else to the
//!   context-wide event queue, with a sequence number; a full queue drops
//!   the event, counts it and appends one `LOST_EVENTS` record.
//! - Fault records and events carry the vdevice's virtual id and the virtual
//!   PASID where one is mapped ([`Iommu::vdevice_set_vpasid`]).
//! - Dirty tracking ([`Iommu::hwpt_set_dirty_tracking`],
//!   [`Iommu::hwpt_get_dirty_bitmap`]): while enabled, translators cache
//!   writable translations one page at a time and mark the page when they
//!   fill the entry; reads cache the page without write permission. A
//!   clearing read takes the range's marks, invalidates every translator of
//!   the IOAS and waits, then reports the taken marks plus any made
//!   meanwhile, so no write is lost between two reads.
//!
//! # Stage-1 table format (nested HWPTs)
//!
//! A nested HWPT's stage-1 table is x86-64 4-level style, with 4 KiB pages
//! only, and lives in the parent's IOAS (its addresses are stage-2 input
//! addresses, i.e. IOVAs of the parent):
//!
//! - Input addresses are 48 bits; higher bits set → not mapped.
//! - Four levels of 512 little-endian 64-bit entries, indexed by address
//!   bits 47:39, 38:30, 29:21 and 20:12. [`HwptData::Stage1::root`] is the
//!   4 KiB aligned address of the level-4 table.
//! - Entry bit 0 is *present*, bit 1 is *writable*; bits 51:12 are the
//!   address of the next table (or of the 4 KiB page at the last level);
//!   other bits are ignored (bit 7, large pages, is not supported and is
//!   ignored).
//! - A read needs *present* at every level; a write needs *present* and
//!   *writable* at every level; the output address is then translated by the
//!   parent's stage 2 with the same permission. Table reads go through stage
//!   2 with read permission; a table that is not mapped there is a
//!   [`EventReason::BadStage1Table`].
//! - Cached stage-1 translations stay in use until [`Iommu::hwpt_invalidate`]
//!   (as on hardware); stage-2 changes invalidate on their own.
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod ctx;
mod device;
mod error;
mod event;
mod fault;
mod fault_budget;
mod ioas;
pub mod memory;
mod prim;
mod queue_file;
pub mod sigbus;
/// iommu-core's own `AtomicU64`, for crates above whose synchronisation is
/// model-checked together with it: std's in every normal build; under
/// `--cfg loom` loom's, with each `SeqCst` access modelled as the access
/// between two `SeqCst` fences (loom 0.7 checks `SeqCst` only as `AcqRel`;
/// see `src/prim.rs`). The framework's range ring of recent unmaps uses it.
pub mod atomic {
    pub use crate::prim::AtomicU64;
}
/// The runner of every loom model of the workspace (iommu-core's
/// `tests/loom.rs`, the framework's `RemovedRanges` model), so that all of
/// them honour `LOOM_MAX_PREEMPTIONS` alike and report in the one format
/// `scripts/model-check.sh` reads. Only under `--cfg loom`.
#[cfg(loom)]
pub mod model {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    /// Runs `model` under loom with at most `bound` preemptions (`None`:
    /// every interleaving), or `LOOM_MAX_PREEMPTIONS` when set, and prints
    /// "loom model NAME: passed|FAILED after N iterations, preemption bound
    /// B, Ts"; a failing model's panic is then resumed.
    pub fn check(name: &str, bound: Option<usize>, model: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
            b.preemption_bound = bound;
        }
        let bound = b.preemption_bound;
        let iterations = Arc::new(AtomicUsize::new(0));
        let counted = iterations.clone();
        let start = Instant::now();
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            b.check(move || {
                counted.fetch_add(1, Ordering::Relaxed);
                model();
            })
        }));
        println!(
            "loom model {name}: {} after {} iterations, preemption bound {}, {:.2}s",
            if run.is_ok() { "passed" } else { "FAILED" },
            iterations.load(Ordering::Relaxed),
            bound.map_or("none (exhaustive)".to_string(), |b| b.to_string()),
            start.elapsed().as_secs_f64()
        );
        if let Err(panic) = run {
            std::panic::resume_unwind(panic);
        }
    }
}
mod sync;
mod translate;
mod types;

pub use ctx::{Iommu, MAX_AREAS_PER_IOAS, MAX_DIRTY_BITMAP_BITS};
pub use device::{FaultWaker, IommuDevice};
pub use error::{Error, Result};
pub use event::*;
pub use fault::*;
pub use fault_budget::{FaultBudget, FaultSlot};
pub use memory::Memory;
pub use sync::{InvalidationTicket, Nudge, TranslatorInfo};
pub use translate::{
    AccessPin, AccessSection, Fragment, Run, Translator, TranslatorStats,
    TRANSLATION_CACHE_ENTRIES, TRANSLATION_CACHE_WAYS,
};
pub use types::*;
