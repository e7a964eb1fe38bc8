//! Dirty logging for live migration through rust-vmm's vhost-user
//! frontend: with `VHOST_F_LOG_ALL` switched on while the queue runs and a
//! shared log given by SET_LOG_BASE (`VHOST_USER_PROTOCOL_F_LOG_SHMFD`),
//! the pages the device wrote (the buffer it filled, the used ring) have
//! their bits set at their guest physical addresses and the page it only
//! read has not; switched off, nothing is logged.
//!
//! Shown to fail with a device that logs nothing:
//! `RUSTFLAGS='--cfg ioasis_broken="nolog"' CARGO_TARGET_DIR=/work/target-broken-mig
//! cargo test -p ioasis --test vhost_dirty_log` fails at "written buffer
//! logged".

mod vhost_common;

use std::os::fd::AsRawFd;

use ioasis::vhost_user::{VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1};
use iommu_core::Memory;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vhost_common::*;

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
const VHOST_F_LOG_ALL: u64 = 1 << 26;
const PAGE: u64 = 0x1000;

fn dirty_pages(log: &Memory) -> Vec<u64> {
    let mut b = vec![0u8; log.len()];
    log.read_at(0, &mut b).expect("read log");
    let mut out = Vec::new();
    for (i, byte) in b.iter().enumerate().filter(|(_, b)| **b != 0) {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                out.push((i as u64 * 8 + bit) * PAGE);
            }
        }
    }
    out
}

/// The log's pages once they include every page of `want`: the worker
/// logs the used ring when its pass ends, after the driver may already see
/// the completion, so the test waits for the bits (at most [`WAIT`]).
fn wait_pages(log: &Memory, want: &[u64]) -> Vec<u64> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let pages = dirty_pages(log);
        if want.iter().all(|p| pages.contains(p)) || std::time::Instant::now() >= deadline {
            return pages;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// How long a test lets a pass that should log nothing run to its end
/// before it looks at the log.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(50);

/// One chain: 16 bytes read at `BUF_OFF`, echoed into the writable buffer
/// at `BUF_OFF + 0x3000`.
fn echo(q: &mut QueueSetup, guest: &Guest, done: &mut u16) {
    let buf = guest.gpa + BUF_OFF as u64;
    guest.mem.write_at(BUF_OFF, &[0x5a; 16]).expect("write");
    q.ring
        .add_chain(&[
            ioasis::testing::Buf {
                addr: buf,
                len: 16,
                writable: false,
            },
            ioasis::testing::Buf {
                addr: buf + 0x3000,
                len: 16,
                writable: true,
            },
        ])
        .expect("chain");
    q.ring.publish().expect("publish");
    q.kick.write(1).expect("kick");
    *done += 1;
    wait_used(q, *done);
}

#[test]
fn test_log_all_logs_written_pages_at_their_guest_addresses() {
    let server = TestServer::start(vec![("echo", EchoDevice::new(1))]);
    let (mut fe, _raw) = connect(&server.socket("echo"), 1);
    let offered = fe.get_features().expect("features");
    assert_ne!(offered & VHOST_F_LOG_ALL, 0, "VHOST_F_LOG_ALL offered");
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES);
    let p = fe.get_protocol_features().expect("protocol features");
    assert!(p.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    let mut q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
    let mut done = 0u16;
    echo(&mut q, &guest, &mut done);

    // Migration starts: the log, then LOG_ALL on the running device.
    let log_len = ((guest.gpa + GUEST_SIZE as u64) / PAGE).div_ceil(8);
    let log = Memory::anonymous("dirty log", log_len as usize).expect("log");
    let region = VhostUserDirtyLogRegion {
        mmap_size: log_len,
        mmap_offset: 0,
        mmap_handle: log.fd().expect("log fd").as_raw_fd(),
    };
    fe.set_log_base(0, Some(region)).expect("set_log_base");
    fe.set_features(FEATURES | VHOST_F_LOG_ALL)
        .expect("set_features LOG_ALL");
    echo(&mut q, &guest, &mut done);
    let written = guest.gpa + BUF_OFF as u64 + 0x3000;
    let used_page = (guest.gpa + RING_OFF as u64 + (q.ring.used_addr() - guest.gpa)) & !(PAGE - 1);
    let pages = wait_pages(&log, &[written, used_page]);
    assert!(
        pages.contains(&written),
        "written buffer logged: {pages:x?}"
    );
    assert!(pages.contains(&used_page), "used ring logged: {pages:x?}");
    assert!(
        !pages.contains(&(guest.gpa + BUF_OFF as u64)),
        "a page only read is not logged: {pages:x?}"
    );
    assert_eq!(pages.len(), 2, "nothing else: {pages:x?}");

    // A resized log (SET_LOG_BASE again) takes the next writes.
    let log2 = Memory::anonymous("dirty log 2", 2 * log_len as usize).expect("log");
    let region = VhostUserDirtyLogRegion {
        mmap_size: 2 * log_len,
        mmap_offset: 0,
        mmap_handle: log2.fd().expect("log fd").as_raw_fd(),
    };
    fe.set_log_base(0, Some(region))
        .expect("set_log_base again");
    // (The earlier pass has logged all it will: its used ring page is in.)
    log.fill(0, log.len(), 0).expect("clear");
    echo(&mut q, &guest, &mut done);
    let pages2 = wait_pages(&log2, &[written, used_page]);
    assert!(
        pages2.contains(&written),
        "the new log is written: {pages2:x?}"
    );
    assert!(dirty_pages(&log).is_empty(), "the old log is left alone");

    // Migration ends (or is cancelled): LOG_ALL off, nothing logged.
    fe.set_features(FEATURES).expect("set_features");
    log2.fill(0, log2.len(), 0).expect("clear");
    echo(&mut q, &guest, &mut done);
    std::thread::sleep(SETTLE);
    assert!(dirty_pages(&log2).is_empty(), "logging is off");
    drop(fe);
}
