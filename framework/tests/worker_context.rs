//! The worker context: a worker learns the negotiated features and its
//! queues in `init`, and a `Waker` taken there makes its thread process
//! its queues again when called from another thread.

mod vhost_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ioasis::device::{Device, DeviceError, EventRegistrar, Queues, Worker, WorkerContext};
use ioasis::vhost_user::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use vhost_common::*;

#[derive(Default)]
struct Seen {
    context: Mutex<Option<WorkerContext>>,
    calls: AtomicUsize,
}

struct WakeDevice(Arc<Seen>);

impl Device for WakeDevice {
    fn device_type(&self) -> u32 {
        0x2a
    }
    fn features(&self) -> u64 {
        0
    }
    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> u16 {
        16
    }
    fn worker(&self, _thread: usize) -> Result<Box<dyn Worker>, DeviceError> {
        Ok(Box::new(WakeWorker(self.0.clone())))
    }
}

struct WakeWorker(Arc<Seen>);

impl Worker for WakeWorker {
    fn init(&mut self, events: &mut EventRegistrar<'_>) -> Result<(), DeviceError> {
        let ctx = events
            .context()
            .ok_or(DeviceError::Unsupported("no context"))?;
        *self
            .0
            .context
            .lock()
            .map_err(|_| DeviceError::Other("poisoned".into()))? = Some(ctx.clone());
        Ok(())
    }

    fn process_queue(&mut self, _index: u16, _queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    // Bounded by WAIT.
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn test_context_features_queues_and_waker() {
    let seen = Arc::new(Seen::default());
    let srv = TestServer::start(vec![(
        "wake",
        Arc::new(WakeDevice(seen.clone())) as Arc<dyn Device>,
    )]);
    let (mut fe, _raw) = connect(&srv.socket("wake"), 1);
    let guest = Guest::new();
    let features = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_RING_F_EVENT_IDX;
    handshake(&mut fe, &guest, features);
    let _q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
    wait_until("the worker's init", || {
        seen.context.lock().map(|c| c.is_some()).unwrap_or(false)
    });
    let ctx = seen.context.lock().expect("lock").clone().expect("context");
    assert_eq!(ctx.features(), features, "the negotiated features");
    assert!(ctx.has_feature(32), "VIRTIO_F_VERSION_1");
    assert_eq!((ctx.num_queues(), ctx.queues()), (1, &[0u16][..]));
    let waker = ctx.waker();
    wait_until("the first pass", || seen.calls.load(Ordering::SeqCst) > 0);
    std::thread::sleep(Duration::from_millis(50));
    let before = seen.calls.load(Ordering::SeqCst);
    // No kick: only the waker makes the thread process its queue.
    let w = waker.clone();
    std::thread::spawn(move || w.wake())
        .join()
        .expect("waker thread");
    wait_until("a pass after wake()", || {
        seen.calls.load(Ordering::SeqCst) > before
    });
}
