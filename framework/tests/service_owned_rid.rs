//! A `/dev/iommu` session takes over the RID of a hosted vhost-user device:
//! its ATTACH replaces the connection's own attachment, the frontend's rings
//! and buffers are IOVAs of the session's IOAS, the session's unmap stops
//! the device (the queue misses and waits), the frontend's IOTLB messages
//! are refused while the session owns the RID, and a DETACH or the session's
//! end gives the RID back to the connection's own address space.

mod vhost_common;

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ioasis::ownership::RidOwnership;
use ioasis::service::{sealed_memfd, Client, MapPerm, Service, ServiceThread};
use ioasis::vhost_user::msg::{
    IotlbMsg, FLAG_NEED_REPLY, VERSION_1, VHOST_ACCESS_RW, VHOST_IOTLB_INVALIDATE,
    VHOST_IOTLB_MISS, VHOST_IOTLB_UPDATE,
};
use ioasis::vhost_user::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use iommu_core::Memory;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost_common::*;
use vm_memory::ByteValued;

const FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_ACCESS_PLATFORM;
const NO_PLATFORM: u64 = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
/// Where the session maps its memory.
const IOVA: u64 = 0x10_0000;
const RING_IOVA: u64 = IOVA + RING_OFF as u64;
const BUF_IOVA: u64 = IOVA + BUF_OFF as u64;
const SET_FEATURES: u32 = 2;
const RESET_DEVICE: u32 = 34;
const GET_STATUS: u32 = 40;
const NEEDS_RESET: u64 = 0x40;

struct World {
    srv: TestServer,
    _svc: ServiceThread,
    svc_path: PathBuf,
    /// The session's memory (memfd), also the frontend's memory table.
    memfd: OwnedFd,
    guest: Guest,
}

fn world() -> World {
    let srv = TestServer::start(vec![("echo", EchoDevice::new(1))]);
    let svc_path = srv.dir.path().join("iommu.sock");
    let svc = Service::bind(
        &svc_path,
        srv.iommu.clone(),
        Arc::new(srv.directory.clone()),
    )
    .expect("service")
    .spawn()
    .expect("service thread");
    let memfd = sealed_memfd("owned", GUEST_SIZE as u64).expect("memfd");
    let mem = Memory::from_memfd(memfd.try_clone().expect("dup"), 0, GUEST_SIZE).expect("map");
    World {
        srv,
        _svc: svc,
        svc_path,
        memfd,
        guest: Guest {
            mem,
            gpa: GUEST_GPA,
        },
    }
}

impl World {
    fn rid(&self) -> Arc<RidOwnership> {
        self.srv
            .directory
            .rid_ownership("echo")
            .expect("echo's RID")
    }

    fn dev_id(&self) -> u32 {
        self.srv.directory.get("echo").expect("echo").dev_id
    }

    /// A session with one IOAS mapping the whole memory at `IOVA`.
    fn session(&self) -> (Client, u32) {
        let mut c = Client::connect(&self.svc_path).expect("session");
        let ioas = c.ioas_alloc().expect("IOAS_ALLOC");
        c.ioas_map(
            ioas,
            self.memfd.as_fd(),
            0,
            GUEST_SIZE as u64,
            Some(IOVA),
            MapPerm::ReadWrite,
        )
        .expect("IOAS_MAP");
        (c, ioas)
    }

    /// A frontend that negotiated `features`, with a backend channel.
    fn frontend(&self, features: u64) -> (Frontend, UnixStream, UnixStream) {
        let (mut fe, raw) = connect(&self.srv.socket("echo"), 1);
        handshake(&mut fe, &self.guest, features);
        let (ours, backend) = UnixStream::pair().expect("pair");
        fe.set_backend_request_fd(&ours).expect("backend fd");
        backend.set_read_timeout(Some(WAIT)).expect("timeout");
        (fe, raw, backend)
    }

    /// Waits (bounded) until the RID's owner is `want`.
    fn wait_owner(&self, want: Option<u64>) {
        let rid = self.rid();
        for _ in 0..1000 {
            if rid.owner() == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("RID owner is {:?}, want {want:?}", rid.owner());
    }
}

fn backend_msg(s: &UnixStream) -> IotlbMsg {
    let (hdr, p) = recv_raw(s).expect("backend request");
    assert_eq!(hdr.request, 1, "BACKEND_IOTLB_MSG");
    let mut m = IotlbMsg::default();
    m.as_mut_slice().copy_from_slice(&p);
    m
}

/// A raw request with NEED_REPLY; the reply's u64.
fn call_u64(raw: &UnixStream, request: u32, payload: &[u8]) -> u64 {
    send_raw(raw, request, VERSION_1 | FLAG_NEED_REPLY, payload, &[]);
    let (hdr, p) = recv_raw(raw).expect("reply");
    assert_eq!(hdr.request, request);
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[..8]);
    u64::from_ne_bytes(b)
}

fn update_all(raw: &UnixStream, guest: &Guest) -> u64 {
    iotlb(
        raw,
        VHOST_IOTLB_UPDATE,
        IOVA,
        GUEST_SIZE as u64,
        guest.va(0),
        VHOST_ACCESS_RW,
    )
}

#[test]
fn test_session_takes_rid_serves_ring_unmap_parks_detach_restores() {
    let w = world();
    let (mut fe, raw, backend) = w.frontend(FEATURES);
    let (mut s, ioas) = w.session();
    // The connection holds the RID; the session's ATTACH replaces it.
    assert!(w
        .srv
        .iommu
        .attached_hwpt(w.dev_id(), None)
        .expect("q")
        .is_some());
    s.attach("echo", None, ioas)
        .expect("ATTACH of a connected RID");
    assert_eq!(w.rid().owner(), Some(s.session_id()));
    // Ring and buffers are IOVAs of the session's IOAS; no IOTLB message.
    let mut q = setup_queue(&mut fe, &w.guest, 0, RING_OFF, RING_IOVA, RING_IOVA);
    w.guest.mem.write_at(BUF_OFF, b"ownd").expect("write");
    echo_chain(&mut q, BUF_IOVA, BUF_IOVA + 0x1000);
    wait_used(&q, 1);
    let mut out = [0u8; 4];
    w.guest
        .mem
        .read_at(BUF_OFF + 0x1000, &mut out)
        .expect("read");
    assert_eq!(&out, b"ownd");

    // The frontend's IOTLB messages are refused while the session owns it.
    assert_ne!(update_all(&raw, &w.guest), 0, "update refused");
    assert_ne!(
        iotlb(&raw, VHOST_IOTLB_INVALIDATE, 0, u64::MAX, 0, 0),
        0,
        "invalidation refused"
    );
    echo_chain(&mut q, BUF_IOVA, BUF_IOVA + 0x1000);
    wait_used(&q, 2);

    // The session's unmap stops the device: the next access misses (reported
    // to the frontend) and the queue waits.
    s.ioas_unmap_all(ioas).expect("IOAS_UNMAP");
    echo_chain(&mut q, BUF_IOVA, BUF_IOVA + 0x1000);
    let m = backend_msg(&backend);
    assert_eq!(m.typ, VHOST_IOTLB_MISS);
    assert!(
        (IOVA..IOVA + GUEST_SIZE as u64).contains(&m.iova),
        "miss at {:#x}",
        m.iova
    );
    assert_eq!(q.ring.used_idx().expect("idx"), 2, "nothing completed");
    // The owner maps again: the waiting queue resumes.
    s.ioas_map(
        ioas,
        w.memfd.as_fd(),
        0,
        GUEST_SIZE as u64,
        Some(IOVA),
        MapPerm::ReadWrite,
    )
    .expect("IOAS_MAP");
    wait_used(&q, 3);

    // DETACH gives the RID back to the connection's own space (empty: the
    // frontend's update was refused), where the frontend's IOTLB updates
    // apply again and resume the queue.
    s.detach("echo", None).expect("DETACH");
    assert_eq!(w.rid().owner(), None);
    assert!(w
        .srv
        .iommu
        .attached_hwpt(w.dev_id(), None)
        .expect("q")
        .is_some());
    echo_chain(&mut q, BUF_IOVA, BUF_IOVA + 0x1000);
    assert_eq!(backend_msg(&backend).typ, VHOST_IOTLB_MISS);
    assert_eq!(q.ring.used_idx().expect("idx"), 3);
    assert_eq!(update_all(&raw, &w.guest), 0, "update applies again");
    wait_used(&q, 4);
}

#[test]
fn test_session_close_gives_rid_back() {
    let w = world();
    let (mut fe, raw, _backend) = w.frontend(FEATURES);
    assert_eq!(update_all(&raw, &w.guest), 0);
    let mut q = setup_queue(&mut fe, &w.guest, 0, RING_OFF, RING_IOVA, RING_IOVA);
    let (mut s, ioas) = w.session();
    s.attach("echo", None, ioas).expect("ATTACH");
    w.wait_owner(Some(s.session_id()));
    drop(s);
    w.wait_owner(None);
    // The connection's own translations serve the queue again.
    assert!(w
        .srv
        .iommu
        .attached_hwpt(w.dev_id(), None)
        .expect("q")
        .is_some());
    w.guest.mem.write_at(BUF_OFF, b"back").expect("write");
    echo_chain(&mut q, BUF_IOVA, BUF_IOVA + 0x1000);
    wait_used(&q, 1);
    let mut out = [0u8; 4];
    w.guest
        .mem
        .read_at(BUF_OFF + 0x1000, &mut out)
        .expect("read");
    assert_eq!(&out, b"back");
}

#[test]
fn test_attach_before_connect_and_connection_leaves_owner_alone() {
    let w = world();
    let (mut s, ioas) = w.session();
    let hwpt = s.attach("echo", None, ioas).expect("ATTACH, no frontend");
    assert_eq!(
        w.srv.iommu.attached_hwpt(w.dev_id(), None).expect("q"),
        Some(hwpt)
    );
    {
        let (mut fe, _raw, _backend) = w.frontend(FEATURES);
        let mut q = setup_queue(&mut fe, &w.guest, 0, RING_OFF, RING_IOVA, RING_IOVA);
        w.guest.mem.write_at(BUF_OFF, b"erly").expect("write");
        echo_chain(&mut q, BUF_IOVA, BUF_IOVA + 0x1000);
        wait_used(&q, 1);
        assert_eq!(
            w.srv.iommu.attached_hwpt(w.dev_id(), None).expect("q"),
            Some(hwpt),
            "the connection did not attach its own space"
        );
    }
    // The frontend left: its connection ends without touching the owner's
    // attachment.
    for _ in 0..1000 {
        if !w.rid().has_holder() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!w.rid().has_holder(), "connection ended");
    assert_eq!(
        w.srv.iommu.attached_hwpt(w.dev_id(), None).expect("q"),
        Some(hwpt)
    );
    // Given back with no connection: the RID is detached.
    s.detach("echo", None).expect("DETACH");
    assert_eq!(
        w.srv.iommu.attached_hwpt(w.dev_id(), None).expect("q"),
        None
    );
}

#[test]
fn test_second_session_is_busy() {
    let w = world();
    let (mut a, ioas_a) = w.session();
    let (mut b, ioas_b) = w.session();
    a.attach("echo", None, ioas_a).expect("ATTACH");
    let e = b.attach("echo", None, ioas_b).expect_err("owned by a");
    assert_eq!(e.errno(), Some(libc::EBUSY));
    let e = b.detach("echo", None).expect_err("not b's");
    assert_eq!(e.errno(), Some(libc::EPERM));
    // The owner may replace its own attachment.
    let ioas2 = a.ioas_alloc().expect("IOAS_ALLOC");
    a.attach("echo", None, ioas2).expect("replace by the owner");
    assert_eq!(w.rid().owner(), Some(a.session_id()));
}

#[test]
fn test_frontend_without_access_platform() {
    let w = world();
    let (_fe, raw, _backend) = w.frontend(NO_PLATFORM);
    let (mut s, ioas) = w.session();
    // Its addresses are guest physical: a session cannot take the RID.
    let e = s
        .attach("echo", None, ioas)
        .expect_err("no ACCESS_PLATFORM");
    assert_eq!(e.errno(), Some(libc::EINVAL));
    assert_eq!(w.rid().owner(), None);
    // After a device reset nothing is negotiated: the session may take it,
    // and then features without ACCESS_PLATFORM are refused and the device
    // reports NEEDS_RESET.
    assert_eq!(call_u64(&raw, RESET_DEVICE, &[]), 0);
    s.attach("echo", None, ioas).expect("ATTACH after reset");
    assert_ne!(
        call_u64(&raw, SET_FEATURES, &NO_PLATFORM.to_ne_bytes()),
        0,
        "SET_FEATURES without ACCESS_PLATFORM refused"
    );
    assert_ne!(call_u64(&raw, GET_STATUS, &[]) & NEEDS_RESET, 0);
    assert_eq!(call_u64(&raw, SET_FEATURES, &FEATURES.to_ne_bytes()), 0);
}

#[test]
fn test_plain_devices_unaffected() {
    // A device offered without RID arbitration (added with
    // add_external_device) is attached and detached plainly.
    let mut server = ioasis::server::Server::new();
    let core = server
        .add_external_device(
            "ext0",
            "/nonexistent/ext0.sock",
            iommu_core::HwInfo::default(),
        )
        .expect("external device");
    let dir = server.directory();
    assert!(dir.rid_ownership("ext0").is_none());
    assert_eq!(dir.get("ext0").expect("entry").device.label(), core.label());
    assert!(matches!(
        server.add_external_device("ext0", "x", iommu_core::HwInfo::default()),
        Err(ioasis::server::ServerError::DuplicateLabel(_))
    ));
    let mut svc = Service::new(server.iommu().clone(), Arc::new(dir)).expect("service");
    let fd = svc.connect_local().expect("local session");
    let t = svc.spawn().expect("thread");
    let mut c = Client::from_fd(fd).expect("client");
    assert_eq!(c.devices().expect("list"), vec!["ext0".to_string()]);
    let ioas = c.ioas_alloc().expect("ioas");
    c.attach("ext0", None, ioas).expect("attach");
    c.detach("ext0", None).expect("detach");
    t.stop();
}

#[test]
fn test_invalidation_while_owned_is_not_undone_by_give_back() {
    let w = world();
    let (mut fe, raw, backend) = w.frontend(FEATURES);
    // The connection's own space maps everything; the ring is served.
    assert_eq!(update_all(&raw, &w.guest), 0);
    let mut q = setup_queue(&mut fe, &w.guest, 0, RING_OFF, RING_IOVA, RING_IOVA);
    echo_chain(&mut q, BUF_IOVA, BUF_IOVA + 0x1000);
    wait_used(&q, 1);
    let (mut s, ioas) = w.session();
    s.attach("echo", None, ioas).expect("ATTACH");
    // Refused (the owner's IOAS stays), but the frontend meant it: once the
    // RID is back, the invalidated translations must not be.
    assert_ne!(
        iotlb(&raw, VHOST_IOTLB_INVALIDATE, 0, u64::MAX, 0, 0),
        0,
        "refused while owned"
    );
    echo_chain(&mut q, BUF_IOVA, BUF_IOVA + 0x1000);
    wait_used(&q, 2);
    s.detach("echo", None).expect("DETACH");
    echo_chain(&mut q, BUF_IOVA, BUF_IOVA + 0x1000);
    let m = backend_msg(&backend);
    assert_eq!(m.typ, VHOST_IOTLB_MISS, "the invalidated space misses");
    assert_eq!(q.ring.used_idx().expect("idx"), 2);
    assert_eq!(update_all(&raw, &w.guest), 0);
    wait_used(&q, 3);
}
