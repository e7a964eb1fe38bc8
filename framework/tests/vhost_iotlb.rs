//! DMA remapping: with VIRTIO_F_ACCESS_PLATFORM the device's address space
//! is exactly the frontend's IOTLB updates; a miss is reported on the
//! backend request channel while the queue is parked, and the queue resumes
//! once an update covers the address.

mod vhost_common;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ioasis::testing::Buf;
use ioasis::vhost_user::msg::{
    IotlbMsg, VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO, VHOST_IOTLB_ACCESS_FAIL,
    VHOST_IOTLB_INVALIDATE, VHOST_IOTLB_MISS, VHOST_IOTLB_UPDATE,
};
use ioasis::vhost_user::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost_common::*;
use vm_memory::ByteValued;

const FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_ACCESS_PLATFORM;
const RING_IOVA: u64 = 0x10_0000;
const BUF_IOVA: u64 = 0x20_0000;

struct Setup {
    _srv: TestServer,
    _fe: Frontend,
    raw: UnixStream,
    backend: UnixStream,
    guest: Guest,
    q: QueueSetup,
}

fn setup() -> Setup {
    let srv = TestServer::start(vec![("echo", EchoDevice::new(1))]);
    let (mut fe, raw) = connect(&srv.socket("echo"), 1);
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES);
    let (ours, backend) = UnixStream::pair().expect("pair");
    fe.set_backend_request_fd(&ours).expect("backend fd");
    backend.set_read_timeout(Some(WAIT)).expect("timeout");
    // Map the rings; ring addresses are IOVAs in this mode.
    assert_eq!(
        iotlb(
            &raw,
            VHOST_IOTLB_UPDATE,
            RING_IOVA,
            0x4000,
            guest.va(RING_OFF),
            VHOST_ACCESS_RW
        ),
        0
    );
    let q = setup_queue(&mut fe, &guest, 0, RING_OFF, RING_IOVA, RING_IOVA);
    Setup {
        _srv: srv,
        _fe: fe,
        raw,
        backend,
        guest,
        q,
    }
}

/// Reads one IOTLB message from the backend channel.
fn backend_msg(s: &UnixStream) -> IotlbMsg {
    let (hdr, p) = recv_raw(s).expect("backend request");
    assert_eq!(hdr.request, 1, "BACKEND_IOTLB_MSG");
    assert_eq!(p.len(), 32);
    let mut m = IotlbMsg::default();
    m.as_mut_slice().copy_from_slice(&p);
    m
}

#[test]
fn test_miss_parks_queue_then_update_resumes() {
    let mut s = setup();
    s.guest.mem.write_at(BUF_OFF, b"iotl").expect("write");
    echo_chain(&mut s.q, BUF_IOVA, BUF_IOVA + 0x1000);
    // The readable buffer is not mapped: a miss for it, and nothing completed.
    let m = backend_msg(&s.backend);
    assert_eq!(
        (m.typ, m.iova, m.perm),
        (VHOST_IOTLB_MISS, BUF_IOVA, VHOST_ACCESS_RO)
    );
    assert_eq!(
        s.q.ring.used_idx().expect("idx"),
        0,
        "queue parked, not completed"
    );
    // Map it; now the writable one misses.
    assert_eq!(
        iotlb(
            &s.raw,
            VHOST_IOTLB_UPDATE,
            BUF_IOVA,
            0x1000,
            s.guest.va(BUF_OFF),
            VHOST_ACCESS_RO
        ),
        0
    );
    let m = backend_msg(&s.backend);
    assert_eq!(
        (m.typ, m.iova, m.perm),
        (VHOST_IOTLB_MISS, BUF_IOVA + 0x1000, VHOST_ACCESS_WO)
    );
    assert_eq!(s.q.ring.used_idx().expect("idx"), 0);
    assert_eq!(
        iotlb(
            &s.raw,
            VHOST_IOTLB_UPDATE,
            BUF_IOVA + 0x1000,
            0x1000,
            s.guest.va(BUF_OFF + 0x1000),
            VHOST_ACCESS_WO
        ),
        0
    );
    wait_used(&s.q, 1);
    assert_eq!(s.q.ring.used_elem(0).expect("elem"), (0, 4));
    let mut out = [0u8; 4];
    s.guest
        .mem
        .read_at(BUF_OFF + 0x1000, &mut out)
        .expect("read");
    assert_eq!(&out, b"iotl");
}

#[test]
fn test_whole_range_invalidation_then_ring_miss() {
    let mut s = setup();
    assert_eq!(
        iotlb(
            &s.raw,
            VHOST_IOTLB_UPDATE,
            BUF_IOVA,
            0x2000,
            s.guest.va(BUF_OFF),
            VHOST_ACCESS_RW
        ),
        0
    );
    echo_chain(&mut s.q, BUF_IOVA, BUF_IOVA + 0x1000);
    wait_used(&s.q, 1);
    // Real frontends invalidate everything at once: iova 0, size u64::MAX.
    assert_eq!(iotlb(&s.raw, VHOST_IOTLB_INVALIDATE, 0, u64::MAX, 0, 0), 0);
    echo_chain(&mut s.q, BUF_IOVA, BUF_IOVA + 0x1000);
    let m = backend_msg(&s.backend);
    assert_eq!(m.typ, VHOST_IOTLB_MISS);
    assert!(
        (RING_IOVA..RING_IOVA + 0x4000).contains(&m.iova),
        "the rings miss first: {:#x}",
        m.iova
    );
    assert_eq!(s.q.ring.used_idx().expect("idx"), 1);
    assert_eq!(
        iotlb(
            &s.raw,
            VHOST_IOTLB_UPDATE,
            RING_IOVA,
            0x4000,
            s.guest.va(RING_OFF),
            VHOST_ACCESS_RW
        ),
        0
    );
    assert_eq!(
        iotlb(
            &s.raw,
            VHOST_IOTLB_UPDATE,
            BUF_IOVA,
            0x2000,
            s.guest.va(BUF_OFF),
            VHOST_ACCESS_RW
        ),
        0
    );
    wait_used(&s.q, 2);
}

#[test]
fn test_partial_invalidation_keeps_the_rest_mapped() {
    let mut s = setup();
    s.guest.mem.write_at(BUF_OFF, b"left").expect("write");
    assert_eq!(
        iotlb(
            &s.raw,
            VHOST_IOTLB_UPDATE,
            BUF_IOVA,
            0x3000,
            s.guest.va(BUF_OFF),
            VHOST_ACCESS_RW
        ),
        0
    );
    // Cut the middle page out of the 3-page mapping.
    assert_eq!(
        iotlb(
            &s.raw,
            VHOST_IOTLB_INVALIDATE,
            BUF_IOVA + 0x1000,
            0x1000,
            0,
            0
        ),
        0
    );
    // Left and right pages still translate.
    echo_chain(&mut s.q, BUF_IOVA, BUF_IOVA + 0x2000);
    wait_used(&s.q, 1);
    let mut out = [0u8; 4];
    s.guest
        .mem
        .read_at(BUF_OFF + 0x2000, &mut out)
        .expect("read");
    assert_eq!(&out, b"left");
    // The middle one misses.
    echo_chain(&mut s.q, BUF_IOVA, BUF_IOVA + 0x1000);
    let m = backend_msg(&s.backend);
    assert_eq!((m.typ, m.iova), (VHOST_IOTLB_MISS, BUF_IOVA + 0x1000));
}

#[test]
fn test_permission_failure_sends_access_fail() {
    let mut s = setup();
    // The writable buffer is mapped read-only.
    assert_eq!(
        iotlb(
            &s.raw,
            VHOST_IOTLB_UPDATE,
            BUF_IOVA,
            0x2000,
            s.guest.va(BUF_OFF),
            VHOST_ACCESS_RO
        ),
        0
    );
    echo_chain(&mut s.q, BUF_IOVA, BUF_IOVA + 0x1000);
    let m = backend_msg(&s.backend);
    assert_eq!(
        (m.typ, m.iova, m.perm),
        (VHOST_IOTLB_ACCESS_FAIL, BUF_IOVA + 0x1000, VHOST_ACCESS_WO)
    );
    // The chain is completed (length 0), never leaked.
    wait_used(&s.q, 1);
    assert_eq!(s.q.ring.used_elem(0).expect("elem"), (0, 0));
}

#[test]
fn test_update_outside_memory_table_is_refused_not_fatal() {
    let s = setup();
    assert_ne!(
        iotlb(
            &s.raw,
            VHOST_IOTLB_UPDATE,
            BUF_IOVA,
            0x1000,
            0xdead_0000_0000,
            VHOST_ACCESS_RW
        ),
        0
    );
    // Straddling the end of the table: refused too.
    assert_ne!(
        iotlb(
            &s.raw,
            VHOST_IOTLB_UPDATE,
            BUF_IOVA,
            0x2000,
            s.guest.va(GUEST_SIZE - 0x1000),
            VHOST_ACCESS_RW
        ),
        0
    );
    // Still connected and serving.
    assert_eq!(
        iotlb(
            &s.raw,
            VHOST_IOTLB_UPDATE,
            BUF_IOVA,
            0x1000,
            s.guest.va(BUF_OFF),
            VHOST_ACCESS_RW
        ),
        0
    );
}

#[test]
fn test_iotlb_without_access_platform_is_refused() {
    let srv = TestServer::start(vec![("echo", EchoDevice::new(1))]);
    let (mut fe, raw) = connect(&srv.socket("echo"), 1);
    let guest = Guest::new();
    handshake(
        &mut fe,
        &guest,
        VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES,
    );
    assert_ne!(
        iotlb(
            &raw,
            VHOST_IOTLB_UPDATE,
            0,
            0x1000,
            guest.va(0),
            VHOST_ACCESS_RW
        ),
        0
    );
    assert_eq!(fe.get_queue_num().expect("still connected"), 1);
}

#[test]
fn test_invalidation_churn_while_processing_loses_nothing() {
    let mut s = setup();
    let map = |s: &Setup| {
        assert_eq!(
            iotlb(
                &s.raw,
                VHOST_IOTLB_UPDATE,
                BUF_IOVA,
                0x2000,
                s.guest.va(BUF_OFF),
                VHOST_ACCESS_RW
            ),
            0
        );
    };
    map(&s);
    s.backend.set_nonblocking(true).expect("nonblocking");
    let mut sent = 0u16;
    for round in 0..100u16 {
        // A few chains per round, kicked, while the buffers come and go.
        for _ in 0..3 {
            s.q.ring
                .add_chain(&[
                    Buf {
                        addr: BUF_IOVA,
                        len: 4,
                        writable: false,
                    },
                    Buf {
                        addr: BUF_IOVA + 0x1000,
                        len: 64,
                        writable: true,
                    },
                ])
                .expect("chain");
            sent += 1;
        }
        s.q.ring.publish().expect("publish");
        s.q.kick.write(1).expect("kick");
        if round % 2 == 0 {
            assert_eq!(
                iotlb(&s.raw, VHOST_IOTLB_INVALIDATE, 0x0, u64::MAX, 0, 0),
                0
            );
            // Rings are gone too: map everything back.
            assert_eq!(
                iotlb(
                    &s.raw,
                    VHOST_IOTLB_UPDATE,
                    RING_IOVA,
                    0x4000,
                    s.guest.va(RING_OFF),
                    VHOST_ACCESS_RW
                ),
                0
            );
        } else {
            assert_eq!(
                iotlb(&s.raw, VHOST_IOTLB_INVALIDATE, BUF_IOVA, 0x2000, 0, 0),
                0
            );
        }
        map(&s);
        // Drain whatever misses were reported (answered by the updates above).
        let mut b = [0u8; 4096];
        let _ = std::io::Read::read(&mut &s.backend, &mut b);
        // 16 descriptors, 2 per chain: let the device catch up every 6 chains.
        if round % 2 == 1 {
            wait_used(&s.q, sent);
        }
    }
    wait_used(&s.q, sent);
    for i in 0..sent {
        assert_eq!(
            s.q.ring.used_elem(i).expect("elem").1,
            4,
            "chain {i} echoed"
        );
    }
}

/// How long a worker counts a reported miss as asked for (the worker's
/// `ASKED_FOR`), and its retry interval while a queue waits on such a
/// miss (`RETRY`).
const ASKED_FOR: Duration = Duration::from_millis(100);
const RETRY: Duration = Duration::from_millis(10);
/// How long a test waits for a second ask that should not come.
const QUIET: Duration = Duration::from_millis(20);

fn update(s: &Setup, iova: u64, size: u64, off: usize, perm: u8) {
    assert_eq!(
        iotlb(
            &s.raw,
            VHOST_IOTLB_UPDATE,
            iova,
            size,
            s.guest.va(off),
            perm
        ),
        0
    );
}

fn invalidate(s: &Setup, iova: u64, size: u64) {
    assert_eq!(iotlb(&s.raw, VHOST_IOTLB_INVALIDATE, iova, size, 0, 0), 0);
}

/// A page the device asked for, was answered for, used, and that the
/// frontend then invalidated, is asked for again at once when the next
/// chain misses it (a strict guest IOMMU reuses I/O addresses right
/// away), not only when the worker's retry finds the ask expired.
/// Fails with `--cfg ioasis_broken="missforgetnone"` (the worker never
/// forgets an ask on an unmap: the queue waits for an update that does not
/// come, and the second miss is never sent).
#[test]
fn test_invalidated_then_asked_page_is_asked_again_at_once() {
    let mut s = setup();
    let page = BUF_IOVA;
    let dst = BUF_IOVA + 0x4000;
    update(&s, dst, 0x1000, BUF_OFF + 0x4000, VHOST_ACCESS_WO);
    echo_chain(&mut s.q, page, dst);
    let m = backend_msg(&s.backend);
    assert_eq!((m.typ, m.iova), (VHOST_IOTLB_MISS, page));
    let mut asked_at = Instant::now();
    let mut conclusive = 0;
    for round in 1..=20u16 {
        update(&s, page, 0x1000, BUF_OFF, VHOST_ACCESS_RO);
        wait_used(&s.q, round);
        invalidate(&s, page, 0x1000);
        let kick = Instant::now();
        echo_chain(&mut s.q, page, dst);
        let m = backend_msg(&s.backend);
        let took = kick.elapsed();
        assert_eq!((m.typ, m.iova), (VHOST_IOTLB_MISS, page), "round {round}");
        // Only a round that re-used the page while the first ask still
        // counted tells forgetting from expiry.
        if kick.duration_since(asked_at) < ASKED_FOR - Duration::from_millis(1) {
            conclusive += 1;
            assert!(
                took < RETRY - Duration::from_millis(1),
                "round {round}: the invalidated page was asked again after {took:?}, \
                 not at once"
            );
        }
        asked_at = Instant::now();
    }
    assert!(
        conclusive > 0,
        "no round re-used the page within {ASKED_FOR:?}"
    );
}

/// A miss reported ahead of its chain stays asked while the frontend
/// unmaps other pages (a strict guest IOMMU unmaps every buffer the device
/// used): when the chain's turn comes it waits for the update on its way
/// instead of asking again. Fails with `--cfg ioasis_broken="missforgetall"`
/// (every unmap forgets every ask: the chain asks again).
#[test]
fn test_unmap_elsewhere_keeps_a_miss_on_its_way_asked() {
    let mut s = setup();
    let (p1, p2) = (BUF_IOVA, BUF_IOVA + 0x1000);
    let dst = BUF_IOVA + 0x4000;
    let other = BUF_IOVA + 0x6000;
    update(&s, dst, 0x1000, BUF_OFF + 0x4000, VHOST_ACCESS_WO);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&s.backend);
    let mut conclusive = 0;
    let mut used = 0u16;
    for round in 0..10 {
        update(&s, other, 0x1000, BUF_OFF + 0x6000, VHOST_ACCESS_RW);
        // Two chains at once: the first misses p1, the look-ahead finds p2.
        for src in [p1, p2] {
            add_echo_chain(&mut s.q, src, dst);
        }
        s.q.ring.publish().expect("publish");
        s.q.kick.write(1).expect("kick");
        let m = backend_msg(&s.backend);
        assert_eq!((m.typ, m.iova), (VHOST_IOTLB_MISS, p1), "round {round}");
        let m = backend_msg(&s.backend);
        assert_eq!((m.typ, m.iova), (VHOST_IOTLB_MISS, p2), "round {round}");
        let asked_at = Instant::now();
        // An unmap elsewhere, then p1's update: the first chain completes,
        // the second parks on p2, whose update is on its way.
        invalidate(&s, other, 0x1000);
        update(&s, p1, 0x1000, BUF_OFF, VHOST_ACCESS_RO);
        let deadline = asked_at + QUIET;
        let now = Instant::now();
        if now < deadline {
            conclusive += 1;
            if wait_readable(fd, deadline - now) {
                let m = backend_msg(&s.backend);
                panic!(
                    "round {round}: asked again for {:#x} {:?} after it was reported, \
                     though no unmap overlapped it",
                    m.iova,
                    asked_at.elapsed()
                );
            }
        }
        update(&s, p2, 0x1000, BUF_OFF + 0x1000, VHOST_ACCESS_RO);
        used += 2;
        wait_used(&s.q, used);
        // Whatever the retry asked meanwhile, and the pages unmapped for
        // the next round.
        while wait_readable(fd, RETRY * 2) {
            let m = backend_msg(&s.backend);
            assert_eq!(m.typ, VHOST_IOTLB_MISS);
        }
        invalidate(&s, p1, 0x2000);
    }
    assert!(conclusive > 0, "no round was quick enough to tell");
}
