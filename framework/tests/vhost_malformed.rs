//! Malformed messages drop the connection (never a panic), the device is
//! reset and serves the next frontend, and other devices are unaffected.
//! Also: reconnect after a frontend goes away mid-session.

mod vhost_common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;

use ioasis::testing::Buf;
use ioasis::vhost_user::msg::{FLAG_NEED_REPLY, VERSION_1, VHOST_ACCESS_RW, VHOST_IOTLB_UPDATE};
use ioasis::vhost_user::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use vhost::VhostBackend;
use vhost_common::*;

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;

fn raw_connect(srv: &TestServer, label: &str) -> UnixStream {
    let s = UnixStream::connect(srv.socket(label)).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s
}

/// The device still answers a fresh frontend.
fn assert_serving(srv: &TestServer, label: &str) {
    let s = raw_connect(srv, label);
    send_raw(&s, 1, VERSION_1, &[], &[]);
    let (hdr, p) = recv_raw(&s).expect("GET_FEATURES reply");
    assert_eq!(hdr.request, 1);
    assert_eq!(p.len(), 8);
}

fn region_bytes(gpa: u64, size: u64, uaddr: u64, off: u64) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [gpa, size, uaddr, off] {
        v.extend_from_slice(&x.to_ne_bytes());
    }
    v
}

fn mem_table(regions: &[Vec<u8>]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(regions.len() as u32).to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes());
    for r in regions {
        v.extend_from_slice(r);
    }
    v
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut v = index.to_ne_bytes().to_vec();
    v.extend_from_slice(&num.to_ne_bytes());
    v
}

/// Sends one bad message and checks the connection is dropped.
fn expect_dropped(srv: &TestServer, request: u32, flags: u32, payload: &[u8], fds: &[i32]) {
    let s = raw_connect(srv, "a");
    send_raw(&s, request, flags, payload, fds);
    assert!(
        is_closed(&s),
        "request {request} with {} bytes should drop the connection",
        payload.len()
    );
}

#[test]
fn test_malformed_messages_drop_connection_only() {
    let a = EchoDevice::new(1);
    let b = EchoDevice::new(1);
    let resets = a.counters.clone();
    let srv = TestServer::start(vec![("a", a), ("b", b)]);
    let mem = iommu_core::Memory::anonymous("m", 0x10000).expect("memfd");
    let fd = mem.fd().expect("fd").as_raw_fd();
    let va = mem.as_ptr() as u64;

    // Bad header: version 2, reply flag, reserved flag bits, unknown code.
    expect_dropped(&srv, 1, 2, &[], &[]);
    expect_dropped(&srv, 1, VERSION_1 | 0x4, &[], &[]);
    expect_dropped(&srv, 1, VERSION_1 | 0x100, &[], &[]);
    expect_dropped(&srv, 9999, VERSION_1, &[], &[]);
    // Bad sizes.
    expect_dropped(&srv, 2, VERSION_1, &[0u8; 4], &[]);
    expect_dropped(&srv, 1, VERSION_1, &[0u8; 8], &[]);
    expect_dropped(&srv, 8, VERSION_1, &[0u8; 12], &[]);
    // Vring index out of range, bad queue size.
    expect_dropped(&srv, 8, VERSION_1, &vring_state(1, 16), &[]);
    expect_dropped(&srv, 8, VERSION_1, &vring_state(u32::MAX, 16), &[]);
    expect_dropped(&srv, 8, VERSION_1, &vring_state(0, 3), &[]);
    expect_dropped(&srv, 8, VERSION_1, &vring_state(0, 512), &[]);
    // Kick without fd and without the no-fd flag; kick index out of range.
    expect_dropped(&srv, 12, VERSION_1, &0u64.to_ne_bytes(), &[]);
    expect_dropped(&srv, 12, VERSION_1, &(0x100u64 | 7).to_ne_bytes(), &[]);
    // Memory table: fd count mismatch, overlapping regions, overflow, empty region.
    let r0 = region_bytes(0, 0x10000, va, 0);
    expect_dropped(
        &srv,
        5,
        VERSION_1,
        &mem_table(std::slice::from_ref(&r0)),
        &[],
    );
    let r1 = region_bytes(0x8000, 0x10000, va + 0x100000, 0);
    expect_dropped(&srv, 5, VERSION_1, &mem_table(&[r0.clone(), r1]), &[fd, fd]);
    let r2 = region_bytes(u64::MAX - 0xfff, 0x2000, va, 0);
    expect_dropped(&srv, 5, VERSION_1, &mem_table(&[r2]), &[fd]);
    let r3 = region_bytes(0, 0, va, 0);
    expect_dropped(&srv, 5, VERSION_1, &mem_table(&[r3]), &[fd]);
    let mut too_many = mem_table(std::slice::from_ref(&r0));
    too_many[0..4].copy_from_slice(&1000u32.to_ne_bytes());
    expect_dropped(&srv, 5, VERSION_1, &too_many, &[fd]);
    // IOTLB update whose iova + size overflows; unknown IOTLB type.
    let mut m = Vec::new();
    for x in [u64::MAX - 0xfff, 0x2000u64, va] {
        m.extend_from_slice(&x.to_ne_bytes());
    }
    m.extend_from_slice(&[VHOST_ACCESS_RW, VHOST_IOTLB_UPDATE, 0, 0, 0, 0, 0, 0]);
    expect_dropped(&srv, 22, VERSION_1 | FLAG_NEED_REPLY, &m, &[]);
    let mut bad_type = m.clone();
    bad_type[25] = 77;
    expect_dropped(&srv, 22, VERSION_1, &bad_type, &[]);
    // Config access beyond the protocol's config space.
    let mut cfg = Vec::new();
    for x in [0x0fffu32, 8, 0] {
        cfg.extend_from_slice(&x.to_ne_bytes());
    }
    cfg.extend_from_slice(&[0u8; 8]);
    expect_dropped(&srv, 24, VERSION_1, &cfg, &[]);
    // A header promising more payload than arrives, then EOF.
    {
        let s = raw_connect(&srv, "a");
        let hdr = ioasis::vhost_user::msg::Header {
            request: 2,
            flags: VERSION_1,
            size: 8,
        };
        use std::io::Write;
        let mut w = &s;
        w.write_all(&hdr.to_bytes()).expect("write");
        w.write_all(&[1, 2, 3]).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        assert!(is_closed(&s));
    }

    // The device still serves, and so does its neighbour.
    assert_serving(&srv, "a");
    assert_serving(&srv, "b");
    assert!(
        resets.resets.load(Ordering::SeqCst) >= 20,
        "each dropped connection reset the device"
    );
}

#[test]
fn test_reconnect_after_frontend_disappears() {
    let dev = EchoDevice::new(1);
    let counters = dev.counters.clone();
    let srv = TestServer::start(vec![("echo", dev)]);
    for round in 0..3u16 {
        let (mut fe, _raw) = connect(&srv.socket("echo"), 1);
        let guest = Guest::new();
        handshake(&mut fe, &guest, FEATURES);
        let mut q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
        q.ring
            .add_chain(&[Buf {
                addr: guest.gpa + BUF_OFF as u64,
                len: 8,
                writable: true,
            }])
            .expect("chain");
        q.ring.publish().expect("publish");
        q.kick.write(1).expect("kick");
        wait_used(&q, 1);
        // Go away without stopping anything (a crashed frontend).
        drop(fe);
        drop(_raw);
        assert!(counters.chains.load(Ordering::SeqCst) > usize::from(round));
    }
    // The next frontend is accepted once the last one is torn down.
    let (fe, _raw) = connect(&srv.socket("echo"), 1);
    fe.set_owner().expect("owner");
    assert_ne!(fe.get_features().expect("features") & VIRTIO_F_VERSION_1, 0);
    assert!(counters.resets.load(Ordering::SeqCst) >= 3);
}

#[test]
fn test_iotlb_session_reconnects_in_table_mode() {
    // A session with ACCESS_PLATFORM, then one without: the address space is
    // rebuilt from scratch for each connection.
    let srv = TestServer::start(vec![("echo", EchoDevice::new(1))]);
    {
        let (mut fe, raw) = connect(&srv.socket("echo"), 1);
        let guest = Guest::new();
        handshake(&mut fe, &guest, FEATURES | VIRTIO_F_ACCESS_PLATFORM);
        assert_eq!(
            iotlb(
                &raw,
                VHOST_IOTLB_UPDATE,
                0x1000,
                0x1000,
                guest.va(0),
                VHOST_ACCESS_RW
            ),
            0
        );
    }
    let (mut fe, _raw) = connect(&srv.socket("echo"), 1);
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES);
    let mut q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
    q.ring
        .add_chain(&[Buf {
            addr: guest.gpa + BUF_OFF as u64,
            len: 8,
            writable: true,
        }])
        .expect("chain");
    q.ring.publish().expect("publish");
    q.kick.write(1).expect("kick");
    wait_used(&q, 1);
}
