//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): a
//! backend that loses its connection with requests popped and not
//! completed (as one killed under load does) resubmits them, oldest first,
//! when a frontend connects again with the same inflight region and the
//! ring's used index as its base (what QEMU sends after a backend crash):
//! every request completes exactly once.
//!
//! Shown to fail without resubmission: `RUSTFLAGS='--cfg
//! ioasis_broken="noresubmit"' cargo test -p ioasis --test vhost_inflight`
//! (recovery then resubmits nothing and the ring restarts at the used
//! index, as a backend without inflight tracking would): head 0 is lost and
//! head 3 is completed twice (used heads `[1, 3, 2, 3, 4]` instead of
//! `[1, 3, 0, 2, 4]`).

mod vhost_common;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use ioasis::device::Device;
use ioasis::testing::Buf;
use ioasis::vhost_user::{VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VringConfigData};
use vhost_common::*;

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;

/// Starts the ring on a connection with `base` as its next avail index.
fn start_ring(
    fe: &mut vhost::vhost_user::Frontend,
    ring: &ioasis::testing::DriverRing,
    guest: &Guest,
    base: u16,
    kick: &vmm_sys_util::eventfd::EventFd,
    call: &vmm_sys_util::eventfd::EventFd,
) {
    let delta = guest.va(0).wrapping_sub(guest.gpa);
    fe.set_vring_num(0, 16).expect("num");
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 16,
            queue_size: 16,
            flags: 0,
            desc_table_addr: ring.desc_addr().wrapping_add(delta),
            used_ring_addr: ring.used_addr().wrapping_add(delta),
            avail_ring_addr: ring.avail_addr().wrapping_add(delta),
            log_addr: None,
        },
    )
    .expect("addr");
    fe.set_vring_base(0, base).expect("base");
    fe.set_vring_call(0, call).expect("call");
    fe.set_vring_kick(0, kick).expect("kick");
    fe.set_vring_enable(0, true).expect("enable");
}

#[test]
fn test_requests_in_flight_are_resubmitted_once_after_reconnect() {
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
    assert!(info.mmap_size >= 16 * 16);
    fe.set_inflight_fd(&info, region.as_raw_fd())
        .expect("set inflight fd");
    let mut q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
    // Heads 0..4 in order: one buffer each, byte 0 = hold, 1 = complete.
    let kinds = [0u8, 1, 0, 1];
    for (i, k) in kinds.iter().enumerate() {
        guest.mem.write_at(BUF_OFF + i * 64, &[*k]).expect("buf");
        q.ring
            .add_chain(&[Buf {
                addr: guest.gpa + (BUF_OFF + i * 64) as u64,
                len: 64,
                writable: false,
            }])
            .expect("chain");
    }
    q.ring.publish().expect("publish");
    q.kick.write(1).expect("kick");
    wait_used(&q, 2);
    // The connection goes with heads 0 and 2 in flight (as with a backend
    // killed under load: nothing completes them).
    drop(fe);
    drop(raw);
    std::thread::sleep(std::time::Duration::from_millis(100));
    hold.store(false, Ordering::SeqCst);
    // A new connection: same memory, same rings, the same inflight region,
    // and the used index as base (QEMU's choice after a crash).
    let (mut fe, _raw2) = connect(&srv.socket("hold"), 1);
    handshake(&mut fe, &guest, FEATURES);
    fe.set_inflight_fd(&info, region.as_raw_fd())
        .expect("set inflight fd again");
    let used = q.ring.used_idx().expect("used idx");
    assert_eq!(used, 2);
    start_ring(&mut fe, &q.ring, &guest, used, &q.kick, &q.call);
    // A new request after the reconnect.
    guest.mem.write_at(BUF_OFF + 4 * 64, &[0]).expect("buf");
    q.ring
        .add_chain(&[Buf {
            addr: guest.gpa + (BUF_OFF + 4 * 64) as u64,
            len: 64,
            writable: false,
        }])
        .expect("chain");
    q.ring.publish().expect("publish");
    q.kick.write(1).expect("kick");
    wait_used(&q, 5);
    let order: Vec<u32> = (0..5)
        .map(|i| q.ring.used_elem(i).expect("elem").0)
        .collect();
    assert_eq!(
        order,
        vec![1, 3, 0, 2, 4],
        "resubmitted oldest first, then the new one"
    );
    for (h, c) in completions.iter().enumerate().take(5) {
        assert_eq!(c.load(Ordering::SeqCst), 1, "head {h} completed once");
    }
    let _ = &mut q;
}
