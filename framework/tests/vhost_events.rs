//! A device's own event sources (registered on its worker thread) drive its
//! queues, and a busy-polling device serves kicks as well.

mod vhost_common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ioasis::device::{Device, DeviceError, EventHandle, EventRegistrar, Interest, Queues, Worker};
use ioasis::queue::Chain;
use ioasis::testing::Buf;
use ioasis::vhost_user::{VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1};
use vhost_common::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
const TOKEN: u64 = 7;

/// A "receive" device: queue 0 holds buffers; each time its source eventfd
/// fires it fills one buffer with the counter value (like a tap device
/// becoming readable).
struct Rx {
    source: Arc<EventFd>,
    poll: Option<Duration>,
    seen: Arc<Mutex<Vec<u64>>>,
}

struct RxWorker {
    source: Arc<EventFd>,
    chain: Chain,
    seen: Arc<Mutex<Vec<u64>>>,
    events: Option<EventHandle>,
    paused: bool,
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
    fn busy_poll(&self) -> Option<Duration> {
        self.poll
    }
    fn worker(&self, _thread: usize) -> Result<Box<dyn Worker>, DeviceError> {
        Ok(Box::new(RxWorker {
            source: self.source.clone(),
            chain: Chain::new(),
            seen: self.seen.clone(),
            events: None,
            paused: false,
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
        Ok(())
    }
}

fn run(poll: Option<Duration>) {
    let source = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let dev = Arc::new(Rx {
        source: source.clone(),
        poll,
        seen: seen.clone(),
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
}

#[test]
fn test_device_event_source_fills_queue() {
    run(None);
}

#[test]
fn test_busy_polling_device_still_serves_events() {
    run(Some(Duration::from_millis(20)));
}
