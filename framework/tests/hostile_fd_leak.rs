//! Hostile clients that over-stuff `SCM_RIGHTS` (more fds than a message
//! may carry, more than the receiver's control buffer used to hold), through
//! the real sockets: the server's fd table ends as it began, and a
//! well-behaved client of the same server is served throughout with bounded
//! latency.
//!
//! Checked against the code before the shared receive helper
//! (`ioasis::scm`): there `cmsgs()` failed with `MSG_CTRUNC` and the
//! receive sites returned early, so the service kept the fds that fit in
//! its buffer (7 a message, on a session that stays usable) and vhost-user
//! the 32 that fit in its buffer per connection; both tests failed on the
//! fd count (about 2100 and 3200 fds left open).
//!
//! The fd counts are those of this process (the servers run in it), so the
//! tests of this file run one at a time.

mod hostile_common;
mod vhost_common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hostile_common::*;
use ioasis::service::proto::{Reply, Request, MAX_FDS};
use ioasis::service::transport::{recv_packet, send_packet};
use ioasis::service::{Client, Service, StaticDirectory};
use ioasis::vhost_user::msg::VERSION_1;
use iommu_core::{HwInfo, Iommu, IommuDevice};
use nix::sys::socket::{
    connect, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use vhost_common::*;

/// More fds than any of these receivers allows in one message.
const STUFFED: usize = 40;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends `data` with `n` copies of `fd` attached.
fn send_stuffed(sock: RawFd, data: &[u8], fd: RawFd, n: usize) {
    let fds = vec![fd; n];
    let iov = [std::io::IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::empty(), None).expect("sendmsg");
}

fn null_fd() -> OwnedFd {
    OwnedFd::from(std::fs::File::open("/dev/null").expect("/dev/null"))
}

#[test]
fn test_service_closes_fds_of_overstuffed_messages() {
    let _g = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("iommu.sock");
    let iommu = Iommu::new();
    let dev = IommuDevice::new("dev0", HwInfo::full());
    iommu.bind(&dev).expect("bind");
    let directory = Arc::new(StaticDirectory::new());
    directory.insert(dev);
    let svc = Service::bind(&path, iommu, directory).expect("service");
    let thread = svc.spawn().expect("spawn");

    let p = path.clone();
    let probe = Probe::start(
        move || Client::connect(&p).expect("connect"),
        |c: &mut Client| {
            let id = c.ioas_alloc().expect("ioas_alloc");
            c.destroy(id).expect("destroy");
        },
    );

    let attacker = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    connect(attacker.as_raw_fd(), &UnixAddr::new(&path).expect("addr")).expect("connect");
    let efd = null_fd();
    let hello = Request::Hello.encode(1);
    send_packet(attacker.as_fd(), &hello, &[]).expect("hello");
    recv_packet(attacker.as_fd())
        .expect("hello reply")
        .expect("not closed");
    let before = open_fds();
    for i in 0..300u64 {
        let req = Request::IoasAlloc.encode(i + 2);
        send_stuffed(attacker.as_raw_fd(), &req, efd.as_raw_fd(), STUFFED);
        let reply = recv_packet(attacker.as_fd())
            .expect("reply")
            .expect("the session stays up");
        let (_, r) = Reply::decode(
            &reply.data,
            reply.fds.len(),
            ioasis::service::proto::Opcode::IoasAlloc,
        )
        .expect("reply decodes");
        assert!(
            matches!(r, Reply::Err { errno, .. } if errno == libc::EBADF),
            "{STUFFED} fds (at most {MAX_FDS} allowed) must be refused: {r:?}"
        );
    }
    // The session is still usable.
    send_packet(attacker.as_fd(), &Request::IoasAlloc.encode(999), &[]).expect("send");
    let reply = recv_packet(attacker.as_fd())
        .expect("reply")
        .expect("reply");
    let (_, r) =
        Reply::decode(&reply.data, 0, ioasis::service::proto::Opcode::IoasAlloc).expect("decode");
    assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
    let after = settle_fds(before + 2, Duration::from_secs(5));
    let report = probe.finish();
    thread.stop();
    assert!(
        after <= before + 2,
        "300 messages with {STUFFED} fds each left {} fds open in the service ({before} before, {after} after)",
        after.saturating_sub(before)
    );
    report.assert_served("service under an fd-stuffing session");
}

#[test]
fn test_vhost_user_closes_fds_of_overstuffed_messages() {
    let _g = serial();
    let srv = TestServer::start(vec![("a", EchoDevice::new(1)), ("b", EchoDevice::new(1))]);
    let b = srv.socket("b");
    let probe = Probe::start(move || EchoClient::connect(&b), |c| c.round_trip());
    let efd = null_fd();
    let a = srv.socket("a");
    // One connection first, so the device's first-connection setup is not
    // counted as a leak.
    {
        let s = std::os::unix::net::UnixStream::connect(&a).expect("connect");
        send_raw(&s, 1, VERSION_1, &[], &[]);
        assert!(recv_raw(&s).is_some(), "GET_FEATURES answered");
    }
    let before = settle_fds(0, Duration::from_millis(200));
    for _ in 0..100 {
        let s = std::os::unix::net::UnixStream::connect(&a).expect("connect");
        // GET_FEATURES carrying 40 fds: refused, the connection dropped.
        let hdr = {
            let mut h = Vec::new();
            h.extend_from_slice(&1u32.to_ne_bytes());
            h.extend_from_slice(&VERSION_1.to_ne_bytes());
            h.extend_from_slice(&0u32.to_ne_bytes());
            h
        };
        send_stuffed(s.as_raw_fd(), &hdr, efd.as_raw_fd(), STUFFED);
        assert!(
            is_closed(&s),
            "a message with {STUFFED} fds drops the connection"
        );
    }
    // The device still serves a frontend.
    {
        let s = std::os::unix::net::UnixStream::connect(&a).expect("connect");
        send_raw(&s, 1, VERSION_1, &[], &[]);
        assert!(
            recv_raw(&s).is_some(),
            "GET_FEATURES answered after the attack"
        );
    }
    let after = settle_fds(before + 2, Duration::from_secs(5));
    let report = probe.finish();
    assert!(
        after <= before + 2,
        "100 connections with {STUFFED} fds each left {} fds open in the server ({before} before, {after} after)",
        after.saturating_sub(before)
    );
    report.assert_served("vhost-user device next to an fd-stuffing frontend");
}
