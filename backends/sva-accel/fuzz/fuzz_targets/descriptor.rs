//! Any descriptor over any memory contents: the engine validates and
//! executes (resuming blocked descriptors with Invalid) without panicking,
//! and every completion carries a defined status. Half the inputs run in
//! bounded steps (a budget taken from the input, every yield resumed).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sva_accel::desc::{Descriptor, DESC_SIZE};
use sva_accel::engine::{
    execute_bounded, Budget, DmaMemory, Fragment, Job, Limits, Outcome, PageFault, Resume,
};
use std::cell::UnsafeCell;

const BASE: u64 = 0x10_0000;
const LEN: usize = 0x2_0000;

struct Mem(Box<UnsafeCell<[u8; LEN]>>);

// SAFETY: fragments point into the boxed array, which lives as long as
// `self`, and never extend past its end.
unsafe impl DmaMemory for Mem {
    fn translate(&self, addr: u64, len: u64, write: bool) -> Result<Fragment, PageFault> {
        if addr < BASE || addr - BASE >= LEN as u64 {
            return Err(PageFault { addr, write });
        }
        let off = (addr - BASE) as usize;
        let n = ((LEN - off) as u64).min(len) as usize;
        // SAFETY: off < LEN.
        let ptr = unsafe { self.0.get().cast::<u8>().add(off) };
        Ok(Fragment { ptr, len: n })
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < DESC_SIZE {
        return;
    }
    let mut raw = [0u8; DESC_SIZE];
    raw.copy_from_slice(&data[..DESC_SIZE]);
    let mem = Mem(Box::new(UnsafeCell::new([0u8; LEN])));
    let rest = &data[DESC_SIZE..];
    let n = rest.len().min(LEN);
    // SAFETY: exclusive access before any fragment is handed out.
    unsafe { (&mut (*mem.0.get()))[..n].copy_from_slice(&rest[..n]) };
    let mut d = Descriptor::from_bytes(&raw);
    // Keep addresses near the mapped window so operations run.
    d.src = BASE + (d.src % (LEN as u64 + 0x1000));
    d.dst = BASE + (d.dst % (LEN as u64 + 0x1000));
    d.completion_addr = BASE + (d.completion_addr % (LEN as u64 + 0x1000));
    d.xfer_size %= 0x4_0000;
    let mut job = Job::new(d);
    let lim = Limits::default();
    // The budget: unbounded, or 1..=64 KiB per step from two input bytes.
    let step = match (data.get(DESC_SIZE), data.get(DESC_SIZE + 1)) {
        (Some(&a), Some(&b)) if a & 1 == 1 => Some(u64::from(u16::from_le_bytes([a, b])) + 1),
        _ => None,
    };
    let budget = || step.map_or_else(Budget::unlimited, Budget::new);
    let mut out = execute_bounded(&mut job, &mem, &lim, Resume::Start, &mut budget(), &mut |_| {});
    for _ in 0..1_000_000 {
        match out {
            Outcome::Complete(cr) => {
                assert!(cr.code() != 0, "completion without a status");
                return;
            }
            Outcome::Blocked(_) => {
                out = execute_bounded(&mut job, &mem, &lim, Resume::Invalid, &mut budget(), &mut |_| {})
            }
            Outcome::Yielded => {
                assert!(step.is_some(), "an unbounded execution yielded");
                out = execute_bounded(&mut job, &mem, &lim, Resume::Continue, &mut budget(), &mut |_| {})
            }
        }
    }
    panic!("descriptor never completed");
});
