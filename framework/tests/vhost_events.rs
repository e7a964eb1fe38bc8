//! A device's own event sources (registered on its worker thread) drive its
//! queues; a device that keeps polling before sleep ([`Worker::before_sleep`])
//! serves kicks, its sources and the frontend's control requests as well.

mod vhost_common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ioasis::device::{
    Device, DeviceError, EventHandle, EventRegistrar, Idle, Interest, Queues, Worker,
};
use ioasis::queue::Chain;
use ioasis::testing::Buf;
use ioasis::vhost_user::{VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1};
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;
use vhost_common::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
const TOKEN: u64 = 7;

/// A "receive" device: queue 0 holds buffers; each time its source eventfd
/// fires it fills one buffer with the counter value (like a tap device
/// becoming readable).
///
/// With a poll window the worker keeps polling before sleep for that long
/// after its last work (`Duration::MAX`: for ever); `sleeps` counts the
/// calls of [`Worker::before_sleep`].
struct Rx {
    source: Arc<EventFd>,
    poll: Option<Duration>,
    seen: Arc<Mutex<Vec<u64>>>,
    sleeps: Arc<AtomicU64>,
}

struct RxWorker {
    source: Arc<EventFd>,
    chain: Chain,
    seen: Arc<Mutex<Vec<u64>>>,
    events: Option<EventHandle>,
    paused: bool,
    poll: Option<Duration>,
    last_work: Instant,
    sleeps: Arc<AtomicU64>,
}

impl Device for Rx {
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
        64
    }
    fn worker(&self, _thread: usize) -> Result<Box<dyn Worker>, DeviceError> {
        Ok(Box::new(RxWorker {
            source: self.source.clone(),
            chain: Chain::new(),
            seen: self.seen.clone(),
            events: None,
            paused: false,
            poll: self.poll,
            last_work: Instant::now(),
            sleeps: self.sleeps.clone(),
        }))
    }
}

impl Worker for RxWorker {
    fn init(&mut self, events: &mut EventRegistrar<'_>) -> Result<(), DeviceError> {
        let io = |op| move |source| DeviceError::Io { op, source };
        events
            .add(&*self.source, Interest::Readable, TOKEN)
            .map_err(io("register source"))?;
        self.events = Some(events.handle().map_err(io("event handle"))?);
        Ok(())
    }

    fn process_queue(&mut self, _index: u16, _queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        self.last_work = Instant::now();
        // New buffers: watch the source again if it was paused.
        if self.paused {
            if let Some(ev) = &self.events {
                ev.add(&*self.source, Interest::Readable, TOKEN)
                    .map_err(|source| DeviceError::Io {
                        op: "resume source",
                        source,
                    })?;
            }
            self.paused = false;
        }
        Ok(())
    }

    fn handle_event(&mut self, token: u64, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        assert_eq!(token, TOKEN);
        let Some(mut q) = queues.get(0) else {
            return Ok(());
        };
        // Take the data only when there is a buffer for it; otherwise stop
        // watching the (level-triggered) source until buffers arrive.
        if !q.pop(&mut self.chain)? {
            if let Some(ev) = &self.events {
                ev.remove(&*self.source).map_err(|source| DeviceError::Io {
                    op: "pause source",
                    source,
                })?;
            }
            self.paused = true;
            return Ok(());
        }
        let v = self.source.read().map_err(|source| DeviceError::Io {
            op: "read source",
            source,
        })?;
        let n = q.write(&self.chain, 0, &v.to_le_bytes())?;
        self.seen
            .lock()
            .map_err(|_| DeviceError::Other("poisoned".into()))?
            .push(v);
        q.add_used(self.chain.head(), n as u32)?;
        q.signal()?;
        self.last_work = Instant::now();
        Ok(())
    }

    fn before_sleep(&mut self, _queues: &mut Queues<'_>) -> Result<Idle, DeviceError> {
        self.sleeps.fetch_add(1, Ordering::SeqCst);
        Ok(match self.poll {
            Some(w) if self.last_work.elapsed() < w => Idle::Poll,
            _ => Idle::Sleep,
        })
    }
}

/// Drives the device through a pause and a resume of its source; returns
/// the frontend and the queue (still running) and the server.
fn run(poll: Option<Duration>, sleeps: &Arc<AtomicU64>) -> (Frontend, QueueSetup, TestServer) {
    let source = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let dev = Arc::new(Rx {
        source: source.clone(),
        poll,
        seen: seen.clone(),
        sleeps: sleeps.clone(),
    });
    let srv = TestServer::start(vec![("rx", dev)]);
    let (mut fe, _raw) = connect(&srv.socket("rx"), 1);
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES);
    let mut q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
    // Data before any buffer: the device pauses the source, then resumes it
    // when buffers are kicked in.
    source.write(5).expect("source");
    let buf = guest.gpa + BUF_OFF as u64;
    for i in 0..2u64 {
        q.ring
            .add_chain(&[Buf {
                addr: buf + i * 0x100,
                len: 8,
                writable: true,
            }])
            .expect("chain");
    }
    q.ring.publish().expect("publish");
    q.kick.write(1).expect("kick");
    wait_used(&q, 1);
    source.write(9).expect("source");
    wait_used(&q, 2);
    let mut out = [0u8; 8];
    guest.mem.read_at(BUF_OFF + 0x100, &mut out).expect("read");
    assert_eq!(u64::from_le_bytes(out), 9);
    assert_eq!(*seen.lock().expect("lock"), vec![5, 9]);
    (fe, q, srv)
}

/// Waits (bounded) until `sleeps` changes no more for `quiet`; its value.
fn settled(sleeps: &AtomicU64, quiet: Duration) -> u64 {
    let deadline = Instant::now() + WAIT;
    let mut last = sleeps.load(Ordering::SeqCst);
    while Instant::now() < deadline {
        std::thread::sleep(quiet);
        let now = sleeps.load(Ordering::SeqCst);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the worker kept calling before_sleep for {WAIT:?}");
}

#[test]
fn test_device_event_source_fills_queue() {
    let sleeps = Arc::new(AtomicU64::new(0));
    let _ = run(None, &sleeps);
}

/// The worker asks the device before each sleep: once per round of events,
/// and not while nothing happens.
#[test]
fn test_before_sleep_follows_each_round_of_events() {
    let sleeps = Arc::new(AtomicU64::new(0));
    let (_fe, q, _srv) = run(None, &sleeps);
    let before = settled(&sleeps, Duration::from_millis(50));
    assert!(before >= 1, "asked before the first sleep");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(sleeps.load(Ordering::SeqCst), before, "asked while asleep");
    q.kick.write(1).expect("kick");
    let after = settled(&sleeps, Duration::from_millis(50));
    assert!(after > before, "a kick's round ends with the question");
}

#[test]
fn test_polling_device_still_serves_events() {
    let sleeps = Arc::new(AtomicU64::new(0));
    let _ = run(Some(Duration::from_millis(20)), &sleeps);
    // The window closes: the worker sleeps again.
    settled(&sleeps, Duration::from_millis(50));
}

/// A device that never stops polling still has its kicks and sources
/// served, and the frontend's stop of the ring (GET_VRING_BASE, a final
/// pass the worker runs) and the server's shutdown are not held up. Checked
/// to fail ("the worker polls") with the worker loop blocking in
/// `epoll_wait` whatever the device said.
#[test]
fn test_device_polling_for_ever_is_still_controlled() {
    let sleeps = Arc::new(AtomicU64::new(0));
    let (fe, _q, mut srv) = run(Some(Duration::MAX), &sleeps);
    let a = sleeps.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50));
    assert!(sleeps.load(Ordering::SeqCst) > a + 10, "the worker polls");
    let t = Instant::now();
    assert_eq!(fe.get_vring_base(0).expect("get_vring_base"), 2);
    drop(fe);
    srv.stop();
    assert!(t.elapsed() < WAIT, "stopped in {:?}", t.elapsed());
}
