//! Peers that send a stream of bad input the server answers with a log
//! line each: malformed page responses on a fault channel, and vhost-user
//! requests that fail (features that were not offered). The log lines are
//! rate-limited (`ioasis::ratelimit`), and a well-behaved client is served
//! throughout with bounded latency.
//!
//! Checked against the sites before they went through `log_limited!`: the
//! test failed with 2000 WARN lines for 2000 malformed responses, and 2000
//! ERROR lines for 2000 failing requests.
//!
//! This binary installs a logger that counts the framework's warnings and
//! errors by target.

mod hostile_common;
mod vhost_common;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use hostile_common::*;
use ioasis::ratelimit::RateLimit;
use ioasis::service::{Client, Service, StaticDirectory};
use ioasis::vhost_user::msg::{FLAG_NEED_REPLY, VERSION_1};
use iommu_core::{HwInfo, Iommu, IommuDevice};
use nix::sys::socket::{send, MsgFlags};
use vhost_common::*;

/// Bad inputs each attack sends.
const FLOOD: usize = 2000;

static LINES: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

struct Counter;

impl log::Log for Counter {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        if r.level() <= log::Level::Warn && r.target().starts_with("ioasis") {
            let mut g = LINES.lock().unwrap_or_else(|e| e.into_inner());
            *g.get_or_insert_with(HashMap::new)
                .entry(r.target().to_string())
                .or_default() += 1;
        }
    }
    fn flush(&self) {}
}

fn install_logger() {
    static COUNTER: Counter = Counter;
    // The first test to get here installs it.
    if log::set_logger(&COUNTER).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

fn lines(target: &str) -> u64 {
    let g = LINES.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref().and_then(|m| m.get(target).copied()).unwrap_or(0)
}

/// At most this many lines per site in one attack (a window and the first
/// lines of the next, should the attack straddle two windows).
const MAX_LINES: u64 = 2 * RateLimit::PEER_BURST as u64 + 2;

#[test]
fn test_malformed_fault_responses_are_logged_rate_limited() {
    install_logger();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("iommu.sock");
    let iommu = Iommu::new();
    let dev = IommuDevice::new("dev0", HwInfo::full());
    iommu.bind(&dev).expect("bind");
    let directory = Arc::new(StaticDirectory::new());
    directory.insert(dev);
    let svc = Service::bind(&path, iommu, directory)
        .expect("service")
        .spawn()
        .expect("spawn");
    let p = path.clone();
    let probe = Probe::start(
        move || Client::connect(&p).expect("connect"),
        |c: &mut Client| {
            let id = c.ioas_alloc().expect("ioas_alloc");
            c.destroy(id).expect("destroy");
        },
    );
    let mut attacker = Client::connect(&path).expect("connect");
    let (_, channel) = attacker.fault_queue_alloc_fd().expect("fault queue");
    let before = lines("ioasis::uring::pump");
    for i in 0..FLOOD {
        // Three bytes: not a whole page response.
        loop {
            match send(channel.as_raw_fd(), &[i as u8, 1, 2], MsgFlags::empty()) {
                Ok(_) => break,
                Err(nix::errno::Errno::EAGAIN) => std::thread::yield_now(),
                Err(e) => panic!("send: {e}"),
            }
        }
    }
    // The session still answers once the flood is consumed.
    let id = attacker
        .ioas_alloc()
        .expect("the attacker's session still works");
    attacker.destroy(id).expect("destroy");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let logged = lines("ioasis::uring::pump") - before;
    probe
        .finish()
        .assert_served("service session beside a fault-response flood");
    drop(svc);
    assert!(
        logged <= MAX_LINES,
        "{FLOOD} malformed page responses logged {logged} warnings"
    );
}

#[test]
fn test_failing_vhost_user_requests_are_logged_rate_limited() {
    install_logger();
    let srv = TestServer::start(vec![("a", EchoDevice::new(1)), ("b", EchoDevice::new(1))]);
    let b = srv.socket("b");
    let probe = Probe::start(move || EchoClient::connect(&b), |c| c.round_trip());
    let s = std::os::unix::net::UnixStream::connect(srv.socket("a")).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    // REPLY_ACK, so that each failure is answered.
    send_raw(&s, 1, VERSION_1, &[], &[]);
    let (_, f) = recv_raw(&s).expect("features");
    let offered = u64::from_ne_bytes(f[..8].try_into().expect("8 bytes"));
    send_raw(&s, 2, VERSION_1, &offered.to_ne_bytes(), &[]);
    send_raw(
        &s,
        16,
        VERSION_1,
        &(vhost::vhost_user::message::VhostUserProtocolFeatures::REPLY_ACK.bits()).to_ne_bytes(),
        &[],
    );
    let before = lines("ioasis::vhost_user::conn");
    let unoffered = !offered & !(1u64 << 30);
    for _ in 0..FLOOD {
        send_raw(
            &s,
            2,
            VERSION_1 | FLAG_NEED_REPLY,
            &unoffered.to_ne_bytes(),
            &[],
        );
        let (_, ack) = recv_raw(&s).expect("ack");
        assert_ne!(ack, 0u64.to_ne_bytes(), "features not offered are refused");
    }
    let logged = lines("ioasis::vhost_user::conn") - before;
    probe
        .finish()
        .assert_served("device b beside a frontend of a failing every request");
    assert!(
        logged <= MAX_LINES,
        "{FLOOD} failing requests logged {logged} errors"
    );
}
