//! The synchronisation primitives of the crate, in one place: std's in
//! every normal build, the [loom](https://docs.rs/loom) model checker's
//! under `--cfg loom` (scripts/model-check.sh, models in tests/loom.rs).
//!
//! In a normal build this module only re-exports std's types, so the
//! crate's code is the same as with std's named directly (checked when it
//! was introduced: `cargo rustc --release -p iommu-core --lib -- --emit asm
//! -C codegen-units=1 -C debuginfo=0` before and after, symbol hashes
//! normalised, differ only in three source-line numbers of panic
//! locations).
//!
//! Every lock, condition variable and atomic that a translator, an
//! invalidator or a fault responder touches comes from here, so that loom
//! sees (and schedules) each of them: a std lock held across a loom
//! scheduling point would block loom's single OS thread for good. Process
//! statics (translator ids, the SIGBUS registry) stay on std: loom objects
//! live inside one model execution, and none of those is part of the
//! protocol. `Arc` stays std's as well (loom's has no `Weak` and no unsized
//! coercion); reference counts are not part of the protocol either.
//!
//! Under loom, a `SeqCst` access is modelled as the access with a `SeqCst`
//! fence before and after it. loom 0.7 checks `SeqCst` accesses only as
//! `AcqRel` (its `rt::thread::Set::seq_cst` is a no-op: "this may fail to
//! model correct code"), which would report the store-buffering outcome
//! that the protocol's `SeqCst` pairs exclude (checked: with the fences
//! left out, every model in tests/loom.rs fails on its first execution).
//! The fences exclude it as `SeqCst` accesses do, and are what x86-64
//! compiles them to (a locked instruction, or `mov` + `mfence`); orderings
//! weaker than `SeqCst` are checked as they are, which is what lets the
//! models catch the test-only `ioasis_broken="acqrel"` build.

#[cfg(not(loom))]
pub use std::sync::atomic::AtomicU64;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(loom)]
pub(crate) use loom::sync::{
    Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
};
#[cfg(loom)]
pub use model::AtomicU64;
#[cfg(loom)]
pub(crate) use model::{AtomicBool, AtomicU32, AtomicUsize};

#[cfg(loom)]
mod model {
    use loom::sync::atomic;
    use std::sync::atomic::Ordering;

    /// The fence that stands for the `SeqCst` part of an access.
    #[inline]
    fn sc(order: Ordering) {
        if order == Ordering::SeqCst {
            atomic::fence(Ordering::SeqCst);
        }
    }

    macro_rules! atomic_int {
        ($name:ident, $t:ty) => {
            /// loom's atomic of the same name, `SeqCst` modelled with fences.
            #[derive(Debug, Default)]
            pub struct $name(atomic::$name);

            #[allow(dead_code)] // each type uses a different subset
            impl $name {
                /// As std's.
                pub fn new(v: $t) -> Self {
                    Self(atomic::$name::new(v))
                }
                /// As std's.
                pub fn load(&self, order: Ordering) -> $t {
                    sc(order);
                    let v = self.0.load(order);
                    sc(order);
                    v
                }
                /// As std's.
                pub fn store(&self, v: $t, order: Ordering) {
                    sc(order);
                    self.0.store(v, order);
                    sc(order);
                }
                /// As std's.
                pub fn fetch_add(&self, v: $t, order: Ordering) -> $t {
                    sc(order);
                    let old = self.0.fetch_add(v, order);
                    sc(order);
                    old
                }
                /// As std's.
                pub fn fetch_sub(&self, v: $t, order: Ordering) -> $t {
                    sc(order);
                    let old = self.0.fetch_sub(v, order);
                    sc(order);
                    old
                }
                /// As std's.
                pub fn fetch_update<F>(
                    &self,
                    set: Ordering,
                    fetch: Ordering,
                    f: F,
                ) -> Result<$t, $t>
                where
                    F: FnMut($t) -> Option<$t>,
                {
                    sc(set);
                    let r = self.0.fetch_update(set, fetch, f);
                    sc(set);
                    r
                }
            }
        };
    }

    atomic_int!(AtomicU32, u32);
    atomic_int!(AtomicU64, u64);
    atomic_int!(AtomicUsize, usize);

    /// loom's `AtomicBool`, `SeqCst` modelled with fences.
    #[derive(Default)]
    pub(crate) struct AtomicBool(atomic::AtomicBool);

    #[allow(dead_code)]
    impl AtomicBool {
        pub(crate) fn load(&self, order: Ordering) -> bool {
            sc(order);
            let v = self.0.load(order);
            sc(order);
            v
        }
        pub(crate) fn store(&self, v: bool, order: Ordering) {
            sc(order);
            self.0.store(v, order);
            sc(order);
        }
    }
}
