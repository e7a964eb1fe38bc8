//! A worker polling through an adaptive window ([`AdaptiveWindow`] asked
//! from [`Worker::before_sleep`]) goes to sleep once its queue is idle (no
//! more calls of the hook, no CPU) and still serves the kicks that follow.

mod vhost_common;

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ioasis::device::{Device, DeviceError, Idle, Queue, Queues, Worker};
use ioasis::poll::AdaptiveWindow;
use ioasis::queue::Chain;
use ioasis::testing::Buf;
use ioasis::vhost_user::{VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1};
use vhost::vhost_user::Frontend;
use vhost_common::*;

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
/// How long an idle worker is watched.
const OBSERVE: Duration = Duration::from_millis(500);
/// Most CPU time an idle worker may use while watched: 1 %.
const IDLE_CPU: Duration = Duration::from_millis(5);

#[derive(Default)]
struct Stats {
    /// Calls of `before_sleep`.
    calls: AtomicU64,
    /// Chains completed.
    served: AtomicU64,
    /// The worker thread's id.
    tid: AtomicI32,
}

/// One queue whose chains are completed with 0 bytes; after work the
/// worker polls the queue (notifications off) while its window says so.
struct Poller {
    window: fn() -> AdaptiveWindow,
    stats: Arc<Stats>,
}

struct PollWorker {
    chain: Chain,
    window: AdaptiveWindow,
    /// Work found since the window's last observation.
    pending: bool,
    stats: Arc<Stats>,
}

impl Device for Poller {
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
        Ok(Box::new(PollWorker {
            chain: Chain::new(),
            window: (self.window)(),
            pending: false,
            stats: self.stats.clone(),
        }))
    }
}

impl PollWorker {
    fn drain(&mut self, q: &mut Queue<'_>) -> Result<bool, DeviceError> {
        let mut n = 0u64;
        while q.pop(&mut self.chain)? {
            // Counted before the driver can see it used.
            self.stats.served.fetch_add(1, Ordering::SeqCst);
            q.add_used(self.chain.head(), 0)?;
            n += 1;
        }
        if n > 0 {
            q.notify()?;
        }
        Ok(n > 0)
    }
}

impl Worker for PollWorker {
    fn process_queue(&mut self, _index: u16, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        // SAFETY: gettid has no preconditions.
        self.stats
            .tid
            .store(unsafe { libc::gettid() }, Ordering::SeqCst);
        let Some(mut q) = queues.get(0) else {
            return Ok(());
        };
        q.disable_notification()?;
        self.pending |= self.drain(&mut q)?;
        Ok(())
    }

    fn before_sleep(&mut self, queues: &mut Queues<'_>) -> Result<Idle, DeviceError> {
        self.stats.calls.fetch_add(1, Ordering::SeqCst);
        let Some(mut q) = queues.get(0) else {
            return Ok(Idle::Sleep);
        };
        let work = std::mem::take(&mut self.pending) | self.drain(&mut q)?;
        if self.window.observe(Instant::now(), work) == Idle::Poll {
            return Ok(Idle::Poll);
        }
        // Re-arm; chains that came meanwhile are served and shown to the
        // window (bounded: the ring holds 16).
        for _ in 0..16 {
            if !q.enable_notification()? {
                return Ok(Idle::Sleep);
            }
            if self.drain(&mut q)? && self.window.observe(Instant::now(), true) == Idle::Poll {
                q.disable_notification()?;
                return Ok(Idle::Poll);
            }
        }
        Ok(Idle::Sleep)
    }
}

/// CPU time thread `tid` of this process has used.
fn thread_cpu(tid: i32) -> Duration {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .expect("worker schedstat");
    let ns: u64 = s
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat run time");
    Duration::from_nanos(ns)
}

/// Waits (bounded) until `calls` changes no more for 50 ms; its value, or
/// None if it kept changing for [`WAIT`].
fn settled(calls: &AtomicU64) -> Option<u64> {
    let deadline = Instant::now() + WAIT;
    let mut last = calls.load(Ordering::SeqCst);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = calls.load(Ordering::SeqCst);
        if now == last {
            return Some(now);
        }
        last = now;
    }
    None
}

/// What the worker did while idle for [`OBSERVE`]: calls of the hook and
/// CPU time.
fn watch_idle(stats: &Stats) -> (u64, Duration) {
    let tid = stats.tid.load(Ordering::SeqCst);
    let calls = stats.calls.load(Ordering::SeqCst);
    let cpu = thread_cpu(tid);
    std::thread::sleep(OBSERVE);
    (
        stats.calls.load(Ordering::SeqCst) - calls,
        thread_cpu(tid) - cpu,
    )
}

struct Rig {
    fe: Frontend,
    q: QueueSetup,
    srv: TestServer,
    stats: Arc<Stats>,
    buf: u64,
    sent: u16,
}

impl Rig {
    fn start(window: fn() -> AdaptiveWindow) -> Rig {
        let stats = Arc::new(Stats::default());
        let dev = Arc::new(Poller {
            window,
            stats: stats.clone(),
        });
        let srv = TestServer::start(vec![("poll", dev)]);
        let (mut fe, _raw) = connect(&srv.socket("poll"), 1);
        let guest = Guest::new();
        handshake(&mut fe, &guest, FEATURES);
        let q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
        let buf = guest.gpa + BUF_OFF as u64;
        Rig {
            fe,
            q,
            srv,
            stats,
            buf,
            sent: 0,
        }
    }

    /// Offers one chain, kicks, waits until it is used.
    fn round_trip(&mut self) {
        self.q
            .ring
            .add_chain(&[Buf {
                addr: self.buf,
                len: 64,
                writable: false,
            }])
            .expect("chain");
        self.q.ring.publish().expect("publish");
        self.q.kick.write(1).expect("kick");
        self.sent = self.sent.wrapping_add(1);
        wait_used(&self.q, self.sent);
    }

    fn stop(mut self) {
        drop(self.fe);
        self.srv.stop();
    }
}

/// Traffic, then idle: the adaptive worker stops calling `before_sleep`
/// within a bounded time (its window is at most 200 µs), uses under 1 % of
/// a CPU while watched for 500 ms, and serves the kick that ends the idle
/// time (and sleeps again after it). Checked to fail ("the worker never
/// slept") with `AdaptiveWindow::observe` never answering `Sleep` within
/// bounds; `test_idle_check_sees_a_window_that_never_closes` runs the same
/// idle check on a window that never closes and sees it poll.
#[test]
fn test_adaptive_worker_sleeps_when_idle_and_serves_kicks() {
    let mut rig = Rig::start(AdaptiveWindow::new);
    for _ in 0..200 {
        rig.round_trip();
    }
    assert!(
        settled(&rig.stats.calls).is_some(),
        "the worker never slept"
    );
    let (calls, cpu) = watch_idle(&rig.stats);
    assert_eq!(calls, 0, "before_sleep called while idle");
    assert!(cpu < IDLE_CPU, "idle worker used {cpu:?} in {OBSERVE:?}");
    rig.round_trip();
    assert_eq!(rig.stats.served.load(Ordering::SeqCst), 201);
    assert!(
        settled(&rig.stats.calls).is_some(),
        "the worker never slept"
    );
    rig.stop();
}

/// The idle check of the test above, on a worker whose window never closes
/// (fixed at an hour): it sees the hook called and the CPU used.
#[test]
fn test_idle_check_sees_a_window_that_never_closes() {
    let mut rig = Rig::start(|| AdaptiveWindow::fixed(Duration::from_secs(3600)));
    rig.round_trip();
    let (calls, cpu) = watch_idle(&rig.stats);
    assert!(calls > 0, "no call seen");
    assert!(cpu >= IDLE_CPU, "only {cpu:?} of CPU seen");
    rig.stop();
}
