//! Inflight I/O tracking on a packed ring
//! (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, the region's packed layout): a
//! backend that loses its connection with packed chains popped and not
//! completed (as one killed under load does) resubmits them, oldest first,
//! from the descriptors the region kept, when a frontend connects again
//! with the same region, and goes on at the right ring positions although
//! the frontend's vring base is stale (after a crash QEMU cannot read the
//! positions of a packed ring back and sends the ones it started with):
//! every chain completes exactly once.
//!
//! Shown to fail without resubmission: `RUSTFLAGS='--cfg
//! ioasis_broken="noresubmit"' cargo test -p ioasis --test
//! vhost_packed_inflight` (recovery then resubmits nothing and the ring
//! restarts at the used position, as a backend without inflight tracking
//! would): buffer 0 is lost and buffer 3, whose descriptors are still
//! marked available in the ring, is completed twice.

mod vhost_common;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ioasis::device::Device;
use ioasis::testing::{Buf, PackedDriverRing};
use ioasis::vhost_user::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VringConfigData};
use vhost_common::*;
use vmm_sys_util::eventfd::EventFd;

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_RING_PACKED;

/// Starts queue 0 on the packed ring `ring` with `base` as SET_VRING_BASE.
fn start(
    fe: &mut vhost::vhost_user::Frontend,
    guest: &Guest,
    ring: &PackedDriverRing,
    base: u16,
    kick: &EventFd,
    call: &EventFd,
) {
    let delta = guest.va(0).wrapping_sub(guest.gpa);
    fe.set_vring_num(0, ring.size()).expect("num");
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 16,
            queue_size: ring.size(),
            flags: 0,
            desc_table_addr: ring.desc_addr().wrapping_add(delta),
            used_ring_addr: ring.device_addr().wrapping_add(delta),
            avail_ring_addr: ring.driver_addr().wrapping_add(delta),
            log_addr: None,
        },
    )
    .expect("addr");
    fe.set_vring_base(0, base).expect("base");
    fe.set_vring_call(0, call).expect("call");
    fe.set_vring_kick(0, kick).expect("kick");
    fe.set_vring_enable(0, true).expect("enable");
}

/// Takes used descriptors until `want` were seen in all (bounded).
fn take(ring: &mut PackedDriverRing, call: &EventFd, got: &mut Vec<(u16, u32)>, want: usize) {
    for _ in 0..500 {
        while let Some(u) = ring.take_used().expect("used") {
            got.push(u);
        }
        if got.len() >= want {
            break;
        }
        if wait_readable(call.as_raw_fd(), Duration::from_millis(10)) {
            let _ = call.read();
        }
    }
    // A little longer: anything completed twice shows up too.
    std::thread::sleep(Duration::from_millis(50));
    while let Some(u) = ring.take_used().expect("used") {
        got.push(u);
    }
}

/// A chain whose first buffer holds `kind` (0: held, 1: completed); with
/// `writable`, a second, writable descriptor of 32 bytes.
fn chain(guest: &Guest, i: usize, kind: u8, writable: bool) -> Vec<Buf> {
    let off = BUF_OFF + i * 0x100;
    guest.mem.write_at(off, &[kind]).expect("buf");
    let mut bufs = vec![Buf {
        addr: guest.gpa + off as u64,
        len: 16,
        writable: false,
    }];
    if writable {
        bufs.push(Buf {
            addr: guest.gpa + off as u64 + 0x80,
            len: 32,
            writable: true,
        });
    }
    bufs
}

#[test]
fn test_packed_chains_in_flight_are_resubmitted_once_after_reconnect() {
    let hold = Arc::new(AtomicBool::new(true));
    let completions: Arc<Vec<AtomicUsize>> =
        Arc::new((0..16).map(|_| AtomicUsize::new(0)).collect());
    let dev = Arc::new(HoldDevice {
        hold: hold.clone(),
        completions: completions.clone(),
    });
    let srv = TestServer::start(vec![("hold", dev as Arc<dyn Device>)]);
    let guest = Guest::new();
    let (mut fe, raw) = connect(&srv.socket("hold"), 1);
    handshake(&mut fe, &guest, FEATURES);
    let p = fe.get_protocol_features().expect("protocol features");
    assert!(p.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    let (info, region) = fe
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, 16))
        .expect("get inflight fd");
    assert!(info.mmap_size >= 32 * 16 + 32, "room for the packed layout");
    fe.set_inflight_fd(&info, region.as_raw_fd())
        .expect("set inflight fd");
    let mut ring = PackedDriverRing::new(guest.mem.clone(), RING_OFF, guest.gpa, 16).expect("ring");
    let (kick, call) = (
        EventFd::new(0).expect("kick"),
        EventFd::new(0).expect("call"),
    );
    start(&mut fe, &guest, &ring, 0x8000, &kick, &call);
    // Buffers 0..4 in order: held (two descriptors), completed, held,
    // completed (two descriptors): ring slots 0-1, 2, 3, 4-5.
    let kinds = [(0u8, true), (1, false), (0, false), (1, true)];
    for (i, &(k, w)) in kinds.iter().enumerate() {
        let id = ring.add_chain(&chain(&guest, i, k, w)).expect("chain");
        assert_eq!(usize::from(id), i);
    }
    kick.write(1).expect("kick");
    let mut used = Vec::new();
    take(&mut ring, &call, &mut used, 2);
    assert_eq!(used, vec![(1, 0), (3, 32)], "the two completed at once");
    // The connection goes with buffers 0 and 2 in flight (as with a backend
    // killed under load: nothing completes them).
    drop(fe);
    drop(raw);
    std::thread::sleep(Duration::from_millis(100));
    hold.store(false, Ordering::SeqCst);
    // A new connection: same memory, same ring, the same inflight region,
    // and the base the frontend started with (stale: slot 0, first lap).
    let (mut fe, _raw2) = connect(&srv.socket("hold"), 1);
    handshake(&mut fe, &guest, FEATURES);
    fe.set_inflight_fd(&info, region.as_raw_fd())
        .expect("set inflight fd again");
    start(&mut fe, &guest, &ring, 0x8000, &kick, &call);
    // A new chain after the reconnect (slots 6-7).
    let id = ring.add_chain(&chain(&guest, 4, 0, true)).expect("chain");
    assert_eq!(id, 4);
    kick.write(1).expect("kick");
    take(&mut ring, &call, &mut used, 5);
    assert_eq!(
        used,
        vec![(1, 0), (3, 32), (0, 32), (2, 0), (4, 32)],
        "resubmitted oldest first, then the new one"
    );
    for (h, c) in completions.iter().enumerate().take(5) {
        assert_eq!(c.load(Ordering::SeqCst), 1, "buffer {h} completed once");
    }
}
