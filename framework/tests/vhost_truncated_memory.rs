//! A frontend that shrinks the memfd behind its memory table while the
//! device uses it: the access past the file's new end would raise SIGBUS and
//! kill the process with every device it serves. Instead the device reads
//! zeros there, completes the chain, reports NEEDS_RESET, and the process
//! goes on serving its other devices.

mod vhost_common;

use ioasis::testing::Buf;
use ioasis::vhost_user::{VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1};
use vhost_common::*;

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
const GET_STATUS: u32 = 40;
const NEEDS_RESET: u8 = 0x40;

fn echo_chain(q: &mut QueueSetup, guest: &Guest, off: usize) {
    let b = guest.gpa + off as u64;
    q.ring
        .add_chain(&[
            Buf {
                addr: b,
                len: 16,
                writable: false,
            },
            Buf {
                addr: b + 16,
                len: 16,
                writable: true,
            },
        ])
        .expect("chain");
    q.ring.publish().expect("publish");
    q.kick.write(1).expect("kick");
}

#[test]
fn test_frontend_shrinking_its_memory_does_not_kill_the_backend() {
    let srv = TestServer::start(vec![("a", EchoDevice::new(1)), ("b", EchoDevice::new(1))]);

    // Device a: the frontend shares 1 MiB, then cuts the file down to the
    // rings' half while a chain's buffers lie in the other half.
    let (mut fe, raw) = connect(&srv.socket("a"), 1);
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES);
    let mut q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
    guest.mem.write_at(BUF_OFF, &[7u8; 16]).expect("payload");
    nix::unistd::ftruncate(guest.mem.fd().expect("memfd"), BUF_OFF as i64).expect("shrink");
    echo_chain(&mut q, &guest, BUF_OFF);
    wait_used(&q, 1);
    assert_eq!(
        q.ring.used_elem(0).expect("elem"),
        (0, 16),
        "the chain completed (its payload read as zeros)"
    );
    send_raw(&raw, GET_STATUS, 1, &[], &[]);
    let (_, p) = recv_raw(&raw).expect("status");
    assert_ne!(p[0] & NEEDS_RESET, 0, "NEEDS_RESET reported");

    // Device b, same process, its own intact memory: still served.
    let (mut fe_b, _raw_b) = connect(&srv.socket("b"), 1);
    let guest_b = Guest::new();
    handshake(&mut fe_b, &guest_b, FEATURES);
    let mut qb = setup_queue(&mut fe_b, &guest_b, 0, RING_OFF, guest_b.gpa, guest_b.va(0));
    guest_b
        .mem
        .write_at(BUF_OFF, b"0123456789abcdef")
        .expect("payload");
    echo_chain(&mut qb, &guest_b, BUF_OFF);
    wait_used(&qb, 1);
    let mut echoed = [0u8; 16];
    guest_b
        .mem
        .read_at(BUF_OFF + 16, &mut echoed)
        .expect("read");
    assert_eq!(&echoed, b"0123456789abcdef");
    assert!(iommu_core::sigbus::truncations() >= 1);
}
