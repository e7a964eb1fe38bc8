//! Fuzz the packed-ring descriptor walk: the input is the ring (size,
//! where the device starts, IOTLB or memory-table mode, descriptor bytes,
//! indirect tables), popped through the `Queue` API until it looks empty
//! (`ioasis::testing::walk_arbitrary`, which the property tests in
//! `framework/src/queue/packed/tests.rs` also drive). Nothing may panic,
//! the walk is bounded, and every descriptor consumed is completed once.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ioasis::testing::walk_arbitrary(data);
});
