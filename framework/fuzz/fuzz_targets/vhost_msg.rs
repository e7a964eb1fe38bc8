//! Fuzz vhost-user message decoding: a header, 0..=3 attached fds and a
//! payload, decoded against fixed device limits. Nothing may panic; a
//! decoded request must satisfy the invariants its handler relies on.
#![no_main]

use std::fs::File;

use ioasis::vhost_user::msg::{decode, Header, IotlbRequest, Limits, Request, HDR_SIZE};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    num_queues: 4,
    max_queue_size: 256,
    max_mem_slots: 32,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < HDR_SIZE + 1 {
        return;
    }
    let mut h = [0u8; HDR_SIZE];
    h.copy_from_slice(&data[..HDR_SIZE]);
    let hdr = Header::from_bytes(&h);
    let nfds = usize::from(data[HDR_SIZE] % 4);
    let payload = &data[HDR_SIZE + 1..];
    // Keep the declared size consistent with the payload half the time, so
    // decoding gets past the framing check.
    let hdr = if data[HDR_SIZE] & 0x80 != 0 {
        Header {
            size: payload.len() as u32,
            ..hdr
        }
    } else {
        hdr
    };
    let fds: Vec<File> = (0..nfds)
        .filter_map(|_| File::open("/dev/null").ok())
        .collect();
    match decode(&hdr, payload, fds, &LIMITS) {
        Ok(Request::SetMemTable(regions)) => {
            for (i, (a, _)) in regions.iter().enumerate() {
                assert!(a.size > 0);
                for (b, _) in &regions[i + 1..] {
                    assert!(!a.overlaps(b), "overlapping regions accepted");
                }
            }
        }
        Ok(Request::SetVringNum { index, num }) => {
            assert!(usize::from(index) < LIMITS.num_queues);
            assert!(num.is_power_of_two() && num <= LIMITS.max_queue_size);
        }
        Ok(Request::Iotlb(IotlbRequest::Update {
            iova, size, uaddr, ..
        })) => {
            assert!(size > 0);
            assert!(iova.checked_add(size - 1).is_some());
            assert!(uaddr.checked_add(size - 1).is_some());
        }
        Ok(Request::Iotlb(IotlbRequest::Invalidate { iova, last })) => assert!(iova <= last),
        _ => {}
    }
});
