//! Budgets are per client: one client's unanswered faults, its flood of
//! work at the highest priority it can ask for, and its fill of the shared
//! work queue leave another client's faults working and its latency
//! bounded.

mod common;

use common::Daemon;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use sva_accel::client::{ops, Buffer, Client, ClientError, FaultAction, Options};
use sva_accel::desc::{opcode, status, Descriptor, DESC_SIZE};

/// Longest a victim's NOOP may take while another client floods the device
/// (generous: the flooder's turn is 8 units of 1 MiB, about 20 ms in a
/// debug build; measured 19-100 ms with three such tests at once on two
/// cores).
const BOUND: Duration = Duration::from_millis(500);

/// A hostile client's batch: `members` fills of all of `buf` (with 64 MiB
/// and 1024 members, 64 GiB of work in one descriptor).
fn huge_batch(c: &Client, buf: &Buffer, members: usize) -> (Buffer, Descriptor) {
    let list = c.alloc(members * DESC_SIZE).expect("alloc list");
    for i in 0..members {
        let m = ops::fill(buf.addr(), i as u64, buf.len() as u32);
        list.write(i * DESC_SIZE, &m.to_bytes());
    }
    let mut b = Descriptor::new(opcode::BATCH, 0);
    b.src = list.addr();
    b.xfer_size = members as u32;
    (list, b)
}

/// Submits `d` until the client's queue answers retry (bounded).
fn fill_queue(c: &Client, d: Descriptor) -> usize {
    let mut n = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) && n < 4096 {
        match c.try_submit_raw(&[d]) {
            Ok(()) => n += 1,
            Err(ClientError::Retry) => break,
            Err(e) => panic!("submit: {e}"),
        }
    }
    n
}

/// The latency of `v`'s NOOPs (up to `n` of them; the first that does not
/// complete within 3 s is the last).
fn noop_latencies(v: &Client, n: usize) -> Vec<Duration> {
    let mut lat = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let h = v.submit(Descriptor::new(opcode::NOOP, 0)).expect("submit");
        while h.poll().is_none() && t.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_micros(200));
        }
        lat.push(t.elapsed());
        if h.poll().is_none() {
            // Never completed: leave the handle to the client's end.
            std::mem::forget(h);
            break;
        }
        assert_eq!(h.wait().expect("wait").status, status::SUCCESS);
    }
    lat
}

/// Client A leaves every I/O page fault it gets unanswered: 40 descriptors
/// that block on fault, more than its budget of 32. The ones beyond the
/// budget complete at once with 0x04; client B's own fault is still
/// raised, answered and resumed (its fill succeeds).
///
/// Seen failing before faults were budgeted per client (this test run
/// against the parent commit): B's fill completed with 0x04 (`status
/// 0x84`), because the device's 32 outstanding faults were A's. After: it
/// succeeds in about a millisecond.
#[test]
fn test_parked_faults_of_one_client_do_not_fail_anothers() {
    let d = Daemon::start(&["--workers", "1"]);
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let a = Client::connect_with(
        &d.socket,
        Options {
            block_on_fault: true,
            fault_handler: Some(Box::new(move |_| {
                // Holds the fault thread: no fault of A is answered.
                if let Ok(rx) = release_rx.lock() {
                    let _ = rx.recv_timeout(Duration::from_secs(30));
                }
                FaultAction::Fail
            })),
            ..Options::default()
        },
    )
    .expect("connect A");
    let lazy_b: Arc<Mutex<Option<Arc<Buffer>>>> = Arc::default();
    let slot = lazy_b.clone();
    let b = Client::connect_with(
        &d.socket,
        Options {
            block_on_fault: true,
            fault_handler: Some(Box::new(move |_| {
                match slot.lock().ok().and_then(|s| s.clone()) {
                    Some(buf) if buf.register().is_ok() => FaultAction::Retry,
                    _ => FaultAction::Fail,
                }
            })),
            ..Options::default()
        },
    )
    .expect("connect B");
    const N: usize = 40;
    let lazy_a = a.alloc_lazy(N * 4096).expect("lazy");
    let handles: Vec<_> = (0..N)
        .map(|i| {
            a.submit(ops::fill(lazy_a.at(i * 4096), 1, 64))
                .expect("submit")
        })
        .collect();
    // A's budget is full once the descriptors beyond it have completed
    // (0x04 at once).
    let start = Instant::now();
    let over = loop {
        let done = handles.iter().filter(|h| h.poll().is_some()).count();
        if done >= N - 32 || start.elapsed() > Duration::from_secs(10) {
            break done;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(over, N - 32, "descriptors beyond A's fault budget");
    for h in handles.iter().filter(|h| h.poll().is_some()) {
        assert_eq!(h.poll().map(|cr| cr.code()), Some(status::PAGE_FAULT_IR));
    }
    // B's fault is served.
    let buf = Arc::new(b.alloc_lazy(4096).expect("lazy"));
    *lazy_b.lock().expect("lock") = Some(buf.clone());
    let t = Instant::now();
    let cr = b
        .fill(buf.addr(), 0x0202_0202_0202_0202, 4096)
        .expect("fill");
    eprintln!("B's fill: status {:#x} in {:?}", cr.status, t.elapsed());
    assert_eq!(cr.status, status::SUCCESS, "B's fault failed");
    assert_eq!(buf.to_vec(0, 4), vec![2, 2, 2, 2]);
    // A's parked work completes once A answers.
    for _ in 0..N {
        let _ = release_tx.send(());
    }
    for h in handles {
        assert_eq!(h.wait().expect("wait").code(), status::PAGE_FAULT_IR);
    }
}

/// Client F asks for the highest priority (15) and floods the device with
/// batches of 64 GiB of fills; client V, of the same user and so of the
/// same administrator-set priority, runs NOOPs meanwhile: each completes
/// within [`BOUND`].
///
/// Seen failing before priorities were the administrator's (this test run
/// against the parent commit): F got the 15 it asked for and V the 1 it
/// asked for by default, and under strict priority V's first NOOP did not
/// complete while F had work (`3.0s`, the test's give-up time). After:
/// both get priority 8, and V's worst NOOP took 19-100 ms.
#[test]
fn test_flood_cannot_starve_a_client_of_the_same_priority() {
    let d = Daemon::start(&["--workers", "1"]);
    let f = Client::connect_with(
        &d.socket,
        Options {
            priority: 15,
            ..Options::default()
        },
    )
    .expect("connect F");
    let v = Client::connect(&d.socket).expect("connect V");
    let buf = f.alloc(64 << 20).expect("alloc");
    let (_list, batch) = huge_batch(&f, &buf, 1024);
    let queued = fill_queue(&f, batch);
    assert!(queued > 1, "flood queued {queued}");
    let lat = noop_latencies(&v, 20);
    let worst = lat.iter().max().copied().unwrap_or_default();
    eprintln!(
        "priorities F {} V {}; worst NOOP {worst:?} of {lat:?}",
        f.info().priority,
        v.info().priority
    );
    assert_eq!(
        f.info().priority,
        v.info().priority,
        "a client's request changed its administrator-set priority"
    );
    assert!(worst < BOUND, "V's NOOP took {worst:?} during F's flood");
}

/// With a work queue of 4 slots, client F keeps its portal full of huge
/// batches; client V (same priority) still gets a slot: its NOOPs each
/// complete within [`BOUND`].
///
/// Seen failing before work queue slots were shared out per client (this
/// test run against the parent commit): F's four batches held all four
/// slots for as long as they ran, and V's first NOOP did not complete
/// (`3.0s`, the test's give-up time). After: worst NOOP 19-45 ms.
#[test]
fn test_flood_cannot_hold_every_work_queue_slot() {
    let d = Daemon::start(&["--workers", "1", "--wq-size", "4"]);
    let f = Client::connect(&d.socket).expect("connect F");
    let v = Client::connect(&d.socket).expect("connect V");
    let buf = f.alloc(64 << 20).expect("alloc");
    let (_list, batch) = huge_batch(&f, &buf, 1024);
    let queued = fill_queue(&f, batch);
    assert!(queued >= 4, "flood queued {queued}");
    // Let the worker take F's batches into the queue's slots.
    std::thread::sleep(Duration::from_millis(50));
    let lat = noop_latencies(&v, 20);
    let worst = lat.iter().max().copied().unwrap_or_default();
    eprintln!("worst NOOP {worst:?} of {lat:?}");
    assert!(worst < BOUND, "V's NOOP took {worst:?} during F's flood");
}
