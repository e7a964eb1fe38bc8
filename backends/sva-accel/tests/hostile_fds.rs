//! A hostile client that over-stuffs the portal socket's `SCM_RIGHTS`
//! (more fds than a portal packet may carry, more than the receive buffer
//! used to hold): the daemon's fd table ends as it began, and a
//! well-behaved client is served throughout with bounded latency.
//!
//! Checked against the portal's receive before it used the shared helper
//! (`ioasis::scm`): `cmsgs()` failed with `MSG_CTRUNC`, the connection
//! thread returned, and the 4 fds that fit in its buffer stayed open per
//! connection; the test failed with 800 fds left open.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use common::Daemon;
use nix::sys::socket::{
    connect, recv, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
use sva_accel::client::Client;
use sva_accel::desc::status;

/// More fds than a portal packet may carry.
const STUFFED: usize = 40;
/// The slowest round trip the well-behaved client may see.
const LATENCY_BOUND: Duration = Duration::from_secs(3);

fn daemon_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Waits (bounded by `within`) until the daemon has at most `limit` fds.
fn settle(pid: u32, limit: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let n = daemon_fds(pid);
        if n <= limit || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stuffed_connection(path: &std::path::Path, fd: RawFd) {
    let s = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    connect(s.as_raw_fd(), &UnixAddr::new(path).expect("addr")).expect("connect");
    let fds = vec![fd; STUFFED];
    let hello = [1u8, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0];
    let iov = [std::io::IoSlice::new(&hello)];
    sendmsg::<()>(
        s.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    // The daemon drops the connection: end of file (bounded by a timeout).
    let tv = nix::sys::time::TimeVal::new(10, 0);
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
        .expect("timeout");
    let mut b = [0u8; 256];
    let n = recv(s.as_raw_fd(), &mut b, MsgFlags::empty()).expect("recv");
    assert_eq!(n, 0, "a HELLO with {STUFFED} fds is refused by closing");
}

#[test]
fn test_portal_closes_fds_of_overstuffed_hello() {
    let d = Daemon::shared();
    let pid = d.child.id();
    let path = d.socket.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let p2 = path.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let probe = std::thread::spawn(move || {
        let c = Client::connect(&p2).expect("connect");
        let buf = c.alloc(4096).expect("alloc");
        let mut worst = Duration::ZERO;
        let mut rounds = 0u64;
        let begin = Instant::now();
        while begin.elapsed() < Duration::from_secs(60) {
            let t = Instant::now();
            let cr = c.fill(buf.addr(), rounds, 4096).expect("fill");
            assert_eq!(cr.status, status::SUCCESS);
            worst = worst.max(t.elapsed());
            rounds += 1;
            if rounds == 1 {
                let _ = ready_tx.send(());
            }
            if stop2.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (rounds, worst)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the well-behaved client is served");
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    // One connection first, so that lazily created daemon state is not
    // counted as a leak.
    stuffed_connection(&path, null.as_raw_fd());
    let before = settle(pid, 0, Duration::from_millis(200));
    for _ in 0..200 {
        stuffed_connection(&path, null.as_raw_fd());
    }
    let after = settle(pid, before + 2, Duration::from_secs(5));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (rounds, worst) = probe.join().expect("probe");
    assert!(
        after <= before + 2,
        "200 connections with {STUFFED} fds each left {} fds open in the daemon ({before} before, {after} after)",
        after.saturating_sub(before)
    );
    assert!(rounds > 1, "the well-behaved client was served");
    assert!(
        worst <= LATENCY_BOUND,
        "the well-behaved client waited {worst:?} for one round trip"
    );
}
