//! Packed rings through the vhost-user control plane, with vhost's
//! `Frontend`: `VIRTIO_F_RING_PACKED` offered and negotiated, a packed ring
//! set up with SET_VRING_NUM/ADDR/BASE (the driver and device areas in the
//! avail and used addresses, the base as DPDK's virtio_user sends it:
//! 0x8000, slot 0 in the first lap), chains echoed, GET_VRING_BASE
//! returning both positions with their wrap counters, and the ring started
//! again from that base going on where it stopped, across the end of the
//! ring (the wrap counters flip).

mod vhost_common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use ioasis::testing::{Buf, PackedDriverRing};
use ioasis::vhost_user::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VringConfigData};
use vhost_common::*;
use vmm_sys_util::eventfd::EventFd;

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_RING_PACKED;

/// Starts queue 0 on the packed ring `ring` at `base` (SET_VRING_BASE's
/// 16 bits); returns the kick and call eventfds.
fn start(
    fe: &mut vhost::vhost_user::Frontend,
    guest: &Guest,
    ring: &PackedDriverRing,
    base: u16,
) -> (EventFd, EventFd) {
    let delta = guest.va(0).wrapping_sub(guest.gpa);
    fe.set_vring_num(0, ring.size()).expect("set_vring_num");
    let cfg = VringConfigData {
        queue_max_size: 256,
        queue_size: ring.size(),
        flags: 0,
        desc_table_addr: ring.desc_addr().wrapping_add(delta),
        used_ring_addr: ring.device_addr().wrapping_add(delta),
        avail_ring_addr: ring.driver_addr().wrapping_add(delta),
        log_addr: None,
    };
    fe.set_vring_addr(0, &cfg).expect("set_vring_addr");
    fe.set_vring_base(0, base).expect("set_vring_base");
    let call = EventFd::new(0).expect("call");
    let kick = EventFd::new(0).expect("kick");
    fe.set_vring_call(0, &call).expect("set_vring_call");
    fe.set_vring_kick(0, &kick).expect("set_vring_kick");
    fe.set_vring_enable(0, true).expect("set_vring_enable");
    (kick, call)
}

/// Offers `n` echo chains, kicks, and waits (bounded) until the device
/// used them all; checks each one's length and echoed bytes.
fn echo(
    guest: &Guest,
    ring: &mut PackedDriverRing,
    kick: &EventFd,
    call: &EventFd,
    n: u16,
    round: u16,
) {
    let buf = guest.gpa + BUF_OFF as u64;
    guest.mem.write_at(BUF_OFF, b"pong").expect("write");
    for i in 0..n {
        ring.add_chain(&[
            Buf {
                addr: buf,
                len: 4,
                writable: false,
            },
            Buf {
                addr: buf + 0x1000 + u64::from(i) * 0x100,
                len: 64,
                writable: true,
            },
        ])
        .expect("chain");
    }
    kick.write(1).expect("kick");
    let mut got = 0;
    for _ in 0..1000 {
        while let Some((_, len)) = ring.take_used().expect("used") {
            assert_eq!(len, 4, "round {round}");
            got += 1;
        }
        if got == n {
            break;
        }
        if wait_readable(call.as_raw_fd(), Duration::from_millis(10)) {
            let _ = call.read();
        }
    }
    assert_eq!(got, n, "round {round}: chains used");
    for i in 0..n {
        let mut out = [0u8; 4];
        guest
            .mem
            .read_at(BUF_OFF + 0x1000 + usize::from(i) * 0x100, &mut out)
            .expect("read");
        assert_eq!(&out, b"pong");
    }
}

#[test]
fn test_packed_ring_echo_and_vring_base_round_trip() {
    let dev = EchoDevice::new(1);
    let srv = TestServer::start(vec![("echo", dev)]);
    let (mut fe, _raw) = connect(&srv.socket("echo"), 1);
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES);
    let mut ring = PackedDriverRing::new(guest.mem.clone(), RING_OFF, guest.gpa, 16).expect("ring");
    let (kick, call) = start(&mut fe, &guest, &ring, 0x8000);
    echo(&guest, &mut ring, &kick, &call, 6, 1);
    // Six chains of two descriptors: both positions at slot 12, first lap.
    let base = fe.get_vring_base(0).expect("base");
    assert_eq!(base, 12 | 1 << 15 | (12 | 1 << 15) << 16, "{base:#x}");
    // Started again from the base the frontend read (its low half, as
    // virtio_user sends it): the ring goes on across its end.
    let (kick, call) = start(&mut fe, &guest, &ring, (base & 0xffff) as u16);
    echo(&guest, &mut ring, &kick, &call, 4, 2);
    let base = fe.get_vring_base(0).expect("base");
    // 12 + 8 = 20 = slot 4 of the second lap (wrap counter 0).
    assert_eq!(base, 4 | 4 << 16, "{base:#x}");
}
