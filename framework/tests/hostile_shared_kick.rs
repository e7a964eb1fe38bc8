//! A hostile frontend passes one (blocking) eventfd as the kick of two
//! queues served by one worker: a kick makes both readable, the first read
//! empties the counter. The worker must not block on the second read: when
//! that frontend goes away the device serves a later frontend, a
//! well-behaved frontend of another device is served throughout with
//! bounded latency, and SIGTERM still stops the server.
//!
//! Checked against the code before `ioasis::peer_fd` (kick fds left
//! blocking, read with `EventFd::read`): the worker blocked in `read(2)` and
//! the later frontend was never served (the test failed on that wait, after
//! 20 s).
//!
//! This binary holds one test: it sends SIGTERM to its own process (the
//! server's handler takes it).

mod hostile_common;
mod vhost_common;

use std::sync::mpsc;
use std::time::Duration;

use hostile_common::*;
use ioasis::server::Server;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VringConfigData};
use vhost_common::*;
use vmm_sys_util::eventfd::EventFd;

#[test]
fn test_one_eventfd_kicking_two_queues_wedges_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.sock");
    let b = dir.path().join("b.sock");
    let mut server = Server::new();
    server
        .add_device("a", &a, EchoDevice::new(2))
        .expect("add a");
    server
        .add_device("b", &b, EchoDevice::new(1))
        .expect("add b");
    server.handle_signals().expect("signals");
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = server.run();
        let _ = done_tx.send(r.is_ok());
    });

    let probe = Probe::start(move || EchoClient::connect(&b), |c| c.round_trip());

    // The hostile frontend: both queues of `a` share one blocking kick.
    {
        let (mut fe, _raw) = connect(&a, 2);
        let guest = Guest::new();
        handshake(
            &mut fe,
            &guest,
            ioasis::vhost_user::VIRTIO_F_VERSION_1
                | ioasis::vhost_user::VHOST_USER_F_PROTOCOL_FEATURES,
        );
        let kick = EventFd::new(0).expect("kick");
        let mut calls = Vec::new();
        for q in 0..2usize {
            let ring = ioasis::testing::DriverRing::new(
                guest.mem.clone(),
                RING_OFF + q * 0x4000,
                guest.gpa + (q * 0x4000) as u64,
                16,
            )
            .expect("ring");
            let delta = guest.va(0).wrapping_sub(guest.gpa);
            fe.set_vring_num(q, 16).expect("num");
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: 256,
                    queue_size: 16,
                    flags: 0,
                    desc_table_addr: ring.desc_addr().wrapping_add(delta),
                    used_ring_addr: ring.used_addr().wrapping_add(delta),
                    avail_ring_addr: ring.avail_addr().wrapping_add(delta),
                    log_addr: None,
                },
            )
            .expect("addr");
            fe.set_vring_base(q, 0).expect("base");
            let call = EventFd::new(0).expect("call");
            fe.set_vring_call(q, &call).expect("call");
            calls.push(call);
            fe.set_vring_kick(q, &kick).expect("kick");
            fe.set_vring_enable(q, true).expect("enable");
        }
        // Several kicks, each making both registrations readable at once.
        for _ in 0..5 {
            kick.write(1).expect("kick");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The frontend goes away.
    }

    // A later frontend of the same device is served.
    let a2 = a.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut c = EchoClient::connect(&a2);
        c.round_trip();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("a later frontend of the device is served (the worker is not wedged)");

    probe
        .finish()
        .assert_served("device b beside the hostile frontend of a");

    // SIGTERM stops the server.
    // SAFETY: kill(2) with our own pid and a signal the server handles.
    let rc = unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    assert_eq!(rc, 0);
    let ok = done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the server stops on SIGTERM");
    assert!(ok, "the server's loop ended cleanly");
}
