//! Stopping a ring (GET_VRING_BASE, or SET_VRING_ENABLE 0 first as DPDK's
//! virtio_user does) lets the device finish what the driver already made
//! available: the driver counted those buffers as submitted, so the device
//! must see every one of them, and the returned base covers them.

mod vhost_common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use ioasis::device::{Device, DeviceError, Queues, Worker};
use ioasis::queue::Chain;
use ioasis::testing::Buf;
use ioasis::vhost_user::{VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vhost_common::*;

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
/// Chains a sink worker consumes per call (less than a ring).
const BUDGET: usize = 3;
/// Chains the driver makes available without kicking (the ring holds 16).
const PENDING: u16 = 14;

/// A sink: consumes up to [`BUDGET`] chains per call while `open`, counting
/// them, and never asks to be called again (like a device with a per-call
/// budget whose rescheduling is not due yet).
struct Sink {
    open: Arc<AtomicBool>,
    consumed: Arc<AtomicUsize>,
}

struct SinkWorker {
    open: Arc<AtomicBool>,
    consumed: Arc<AtomicUsize>,
    chain: Chain,
}

impl Device for Sink {
    fn device_type(&self) -> u32 {
        1
    }
    fn features(&self) -> u64 {
        0
    }
    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn worker(&self, _thread: usize) -> Result<Box<dyn Worker>, DeviceError> {
        Ok(Box::new(SinkWorker {
            open: self.open.clone(),
            consumed: self.consumed.clone(),
            chain: Chain::new(),
        }))
    }
}

impl Worker for SinkWorker {
    fn process_queue(&mut self, index: u16, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        if !self.open.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(mut q) = queues.get(index) else {
            return Ok(());
        };
        let mut n = 0;
        while n < BUDGET && q.pop(&mut self.chain)? {
            q.add_used(self.chain.head(), 0)?;
            self.consumed.fetch_add(1, Ordering::SeqCst);
            n += 1;
        }
        if n > 0 {
            q.notify()?;
        }
        Ok(())
    }
}

/// Sets up a sink with [`PENDING`] chains available and not kicked, the
/// device closed until just before the ring stops; `stop` stops the ring and
/// returns the base. Returns (base, consumed, used index).
fn stop_with_pending(
    stop: impl FnOnce(&mut vhost::vhost_user::Frontend) -> u32,
) -> (u32, usize, u16) {
    let open = Arc::new(AtomicBool::new(false));
    let consumed = Arc::new(AtomicUsize::new(0));
    let dev = Arc::new(Sink {
        open: open.clone(),
        consumed: consumed.clone(),
    });
    let srv = TestServer::start(vec![("sink", dev)]);
    let (mut fe, _raw) = connect(&srv.socket("sink"), 1);
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES);
    let mut q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
    let buf = guest.gpa + BUF_OFF as u64;
    for i in 0..PENDING {
        q.ring
            .add_chain(&[Buf {
                addr: buf + u64::from(i) * 0x100,
                len: 64,
                writable: false,
            }])
            .expect("chain");
    }
    // Available, never kicked: only a final pass at stop reaches them.
    q.ring.publish().expect("publish");
    open.store(true, Ordering::SeqCst);
    let base = stop(&mut fe);
    let used = q.ring.used_idx().expect("used idx");
    (base, consumed.load(Ordering::SeqCst), used)
}

#[test]
fn test_get_vring_base_consumes_available_buffers_first() {
    let (base, consumed, used) =
        stop_with_pending(|fe| fe.get_vring_base(0).expect("get_vring_base"));
    assert_eq!(
        consumed,
        usize::from(PENDING),
        "every available chain consumed"
    );
    assert_eq!(base, u32::from(PENDING), "base covers the consumed chains");
    assert_eq!(used, PENDING, "every consumed chain is in the used ring");
}

#[test]
fn test_disable_then_get_vring_base_consumes_available_buffers_first() {
    let (base, consumed, used) = stop_with_pending(|fe| {
        fe.set_vring_enable(0, false).expect("disable");
        fe.get_vring_base(0).expect("get_vring_base")
    });
    assert_eq!(
        consumed,
        usize::from(PENDING),
        "every available chain consumed"
    );
    assert_eq!(base, u32::from(PENDING), "base covers the consumed chains");
    assert_eq!(used, PENDING, "every consumed chain is in the used ring");
}

#[test]
fn test_stopped_ring_is_not_processed_again() {
    let open = Arc::new(AtomicBool::new(true));
    let consumed = Arc::new(AtomicUsize::new(0));
    let dev = Arc::new(Sink {
        open: open.clone(),
        consumed: consumed.clone(),
    });
    let srv = TestServer::start(vec![("sink", dev)]);
    let (mut fe, _raw) = connect(&srv.socket("sink"), 1);
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES);
    let mut q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
    assert_eq!(fe.get_vring_base(0).expect("base"), 0);
    // Chains added after the stop stay untouched, even when kicked.
    q.ring
        .add_chain(&[Buf {
            addr: guest.gpa + BUF_OFF as u64,
            len: 64,
            writable: false,
        }])
        .expect("chain");
    q.ring.publish().expect("publish");
    q.kick.write(1).expect("kick");
    // A second stop is answered once the (stopped) ring is left alone.
    assert_eq!(fe.get_vring_base(0).expect("base"), 0);
    assert_eq!(consumed.load(Ordering::SeqCst), 0);
    assert_eq!(q.ring.used_idx().expect("used idx"), 0);
}
