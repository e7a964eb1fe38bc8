//! Several clients at once, a client killed mid-work, queue modes, drain.

mod common;

use common::{eventually, pattern, Daemon};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use sva_accel::client::{ops, Client, ClientError, FaultAction, Options};
use sva_accel::desc::{flags, opcode, status, Descriptor};
use sva_accel::device::DEFAULT_LABEL;

#[test]
fn test_several_clients_at_once() {
    let d = Daemon::start(&["--workers", "2"]);
    let path = d.socket.clone();
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let path = path.clone();
            std::thread::spawn(move || {
                let c = Client::connect(&path).expect("connect");
                let src = c.alloc(1 << 16).expect("alloc");
                let dst = c.alloc(1 << 16).expect("alloc");
                for i in 0..100u32 {
                    let len = 1 + (i * 613 + u32::from(t) * 97) % (1 << 16);
                    let data = pattern(len as usize, t.wrapping_add(i as u8));
                    src.write(0, &data);
                    let cr = c.mem_move(dst.addr(), src.addr(), len).expect("run");
                    assert_eq!(cr.status, status::SUCCESS);
                    assert_eq!(dst.to_vec(0, len as usize), data, "client {t} op {i}");
                }
                c.pasid()
            })
        })
        .collect();
    let mut pasids: Vec<u32> = threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect();
    pasids.sort_unstable();
    pasids.dedup();
    assert_eq!(pasids.len(), 4, "distinct PASIDs");
}

/// Length of the victim's witness buffer (no other buffer of the victim has
/// this size, so the test finds it among the victim's memfds).
const WITNESS_LEN: usize = 5 << 20;
/// Pattern the victim's queued fills write into its witness buffer.
const WITNESS_FILL: u64 = 0x5a5a_5a5a_5a5a_5a5a;

/// Run as a separate process by `test_killed_client_is_cleaned_up`: a
/// client with a descriptor parked on a fault nobody answers and its work
/// queue kept full of fills into its witness buffer, until it is killed.
#[test]
fn victim_process() {
    let Ok(path) = std::env::var("SVA_VICTIM_SOCKET") else {
        return;
    };
    let opts = Options {
        block_on_fault: true,
        // Never answers: the fault stays parked until the process dies.
        fault_handler: Some(Box::new(|_| {
            std::thread::sleep(Duration::from_secs(60));
            FaultAction::Fail
        })),
        ..Options::default()
    };
    let c = Client::connect_with(&path, opts).expect("connect");
    let witness = c.alloc(WITNESS_LEN).expect("alloc");
    let lazy = c.alloc_lazy(4096).expect("lazy");
    let parked = c.submit(ops::fill(lazy.addr(), 0, 4096)).expect("submit");
    let fill = ops::fill(witness.addr(), WITNESS_FILL, WITNESS_LEN as u32);
    println!("READY {}", c.pasid());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if c.try_submit_raw(&[fill]).is_err() {
            std::thread::yield_now();
        }
    }
    drop(parked);
}

fn memfd_maps(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| m.lines().filter(|l| l.contains("memfd:sva-buffer")).count())
        .unwrap_or(0)
}

/// Opens the client buffer memfd of `pid` that is `len` bytes long.
fn open_buffer_of(pid: u32, len: usize) -> Option<std::fs::File> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    dir.flatten().find_map(|e| {
        let link = std::fs::read_link(e.path()).ok()?;
        if !link.to_string_lossy().contains("memfd:sva-buffer") {
            return None;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(e.path())
            .ok()?;
        (f.metadata().ok()?.len() == len as u64).then_some(f)
    })
}

/// A client killed with a descriptor parked on a fault and its work queue
/// full: its queued and parked work is aborted, its PASID is freed (handed
/// out again), its memory is unmapped from the daemon and never written by
/// the device again, and the other clients are unaffected (they keep
/// working meanwhile, and a newcomer connects and works).
#[test]
fn test_killed_client_is_cleaned_up() {
    use std::os::unix::fs::FileExt;
    let d = Daemon::shared();
    let survivor = Client::connect(&d.socket).expect("connect");
    let a = survivor.alloc(1 << 20).expect("alloc");
    let baseline = memfd_maps(d.child.id());
    let mut victim = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "victim_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SVA_VICTIM_SOCKET", &d.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn victim");
    let out = victim.stdout.take().expect("stdout");
    let victim_pasid = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            // The harness prints the test's name on the same line.
            l.split("READY ")
                .nth(1)
                .and_then(|p| p.trim().parse::<u32>().ok())
        })
        .expect("victim did not start");
    assert_ne!(victim_pasid, survivor.pasid());
    assert!(
        memfd_maps(d.child.id()) > baseline,
        "victim memory mapped in the daemon"
    );
    // The victim's memory, kept alive here after it dies.
    let witness = open_buffer_of(victim.id(), WITNESS_LEN).expect("victim's witness buffer");
    let read8 = |f: &std::fs::File| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 0).expect("read witness");
        u64::from_le_bytes(b)
    };
    eventually("the victim's queued work runs", || {
        read8(&witness) == WITNESS_FILL
    });
    victim.kill().expect("kill");
    victim.wait().expect("wait");
    // The survivor keeps working while the victim is cleaned up.
    let data = pattern(1 << 19, 1);
    a.write(0, &data);
    eventually("victim memory unmapped from the daemon", || {
        let cr = survivor
            .mem_move(a.at(1 << 19), a.addr(), 1 << 19)
            .expect("run");
        assert_eq!(cr.status, status::SUCCESS);
        memfd_maps(d.child.id()) == baseline
    });
    assert_eq!(a.to_vec(1 << 19, 1 << 19), data);
    // Its PASID is free again: the allocator hands out the lowest free one.
    let mut svc = ioasis::service::Client::connect(d.iommu_socket()).expect("session");
    eventually("victim PASID freed", || {
        let p = svc.pasid_alloc(DEFAULT_LABEL).expect("pasid");
        svc.pasid_free(DEFAULT_LABEL, p).expect("pasid free");
        p == victim_pasid
    });
    drop(svc);
    // Nothing writes the victim's memory any more: clear it, keep the
    // device busy, and it stays clear.
    witness
        .write_all_at(&vec![0u8; WITNESS_LEN], 0)
        .expect("clear witness");
    for _ in 0..20 {
        let cr = survivor
            .mem_move(a.at(1 << 19), a.addr(), 1 << 19)
            .expect("run");
        assert_eq!(cr.status, status::SUCCESS);
    }
    let mut after = vec![0xffu8; WITNESS_LEN];
    witness.read_exact_at(&mut after, 0).expect("read witness");
    assert!(
        after.iter().all(|&b| b == 0),
        "the dead client's memory was written after its teardown"
    );
    // A newcomer gets a PASID and works.
    let newcomer = Client::connect(&d.socket).expect("connect after kill");
    let b = newcomer.alloc(4096).expect("alloc");
    assert_eq!(
        newcomer.fill(b.addr(), 0, 4096).expect("fill").status,
        status::SUCCESS
    );
    assert_eq!(
        newcomer
            .run(Descriptor::new(opcode::NOOP, 0))
            .expect("noop")
            .status,
        status::SUCCESS
    );
}

/// A client that gives its PASID back while descriptors are queued in its
/// work queue and one is parked on a fault: when the release returns, that
/// work has been aborted (the parked descriptor's record, which can no
/// longer be translated, is reported as an event without its fault being
/// answered), nothing writes the client's memory any more, and another
/// client is unaffected.
#[test]
fn test_released_pasid_aborts_queued_and_parked_work() {
    let d = Daemon::shared();
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let c = Client::connect_with(
        &d.socket,
        Options {
            block_on_fault: true,
            fault_handler: Some(Box::new(move |_| {
                let _ = entered_tx.send(());
                if let Ok(rx) = release_rx.lock() {
                    let _ = rx.recv_timeout(Duration::from_secs(20));
                }
                FaultAction::Fail
            })),
            ..Options::default()
        },
    )
    .expect("connect");
    let other = Client::connect(&d.socket).expect("connect");
    let witness = c.alloc(4 << 20).expect("alloc");
    let crs = c.alloc(4096).expect("alloc");
    let lazy = c.alloc_lazy(4096).expect("lazy");
    // Parked: block on fault, its record in `crs`.
    let mut blocked = ops::fill(lazy.addr(), 0, 4096);
    blocked.flags |= flags::BOF | flags::CRAV | flags::RCR;
    blocked.completion_addr = crs.addr();
    c.submit_raw(&[blocked]).expect("submit");
    entered_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("fault raised");
    // Queued behind long fills, each with its record in `crs` (bounded:
    // the queue answers retry when full).
    let mut queued = 0u64;
    let start = Instant::now();
    while queued < 64 && start.elapsed() < Duration::from_secs(5) {
        let mut fill = ops::fill(witness.addr(), WITNESS_FILL, 4 << 20);
        fill.flags |= flags::CRAV | flags::RCR;
        fill.completion_addr = crs.at(32 * (1 + queued as usize));
        if c.try_submit_raw(&[fill]).is_ok() {
            queued += 1;
        }
    }
    assert!(queued > 0, "nothing queued");
    // The one worker is busy with the other client's long fill (or one of
    // the queued ones) while the PASID goes.
    let big = other.alloc(32 << 20).expect("alloc");
    let busy = other
        .submit(ops::fill(big.addr(), 7, 32 << 20))
        .expect("submit");
    let pasid = c.pasid();
    c.with_service(|s| s.pasid_free(DEFAULT_LABEL, pasid))
        .expect("service session")
        .expect("pasid free");
    // The release has returned: the client's work is over. Clear the
    // witness; no queued fill may write it again.
    witness.write(0, &vec![0u8; 4 << 20]);
    // Aborted before the release returned (not when some worker gets
    // round to it): the parked descriptor's event is already there.
    let events = c.events();
    let ev = events
        .iter()
        .find(|e| e.cr_addr == crs.addr())
        .expect("event for the parked descriptor when the release returns");
    assert_eq!((ev.code, ev.pasid), (status::CRA_XLAT, pasid));
    // Every queued fill either completed before the release (its record
    // written) or was aborted by it (an event instead): none is left.
    for i in 0..queued {
        let at = crs.at(32 * (1 + i as usize));
        let written = crs.to_vec(32 * (1 + i as usize), 1)[0] != 0;
        let reported = events.iter().any(|e| e.cr_addr == at);
        assert!(
            written != reported,
            "queued fill {i}: record written {written}, event {reported}"
        );
    }
    assert_eq!(busy.wait().expect("wait").status, status::SUCCESS);
    for _ in 0..20 {
        assert_eq!(
            other
                .run(Descriptor::new(opcode::NOOP, 0))
                .expect("noop")
                .status,
            status::SUCCESS
        );
    }
    assert!(
        witness.to_vec(0, 4 << 20).iter().all(|&b| b == 0),
        "queued work wrote the client's memory after its PASID was released"
    );
    assert_eq!(crs.to_vec(0, 1), vec![0], "no record for the parked work");
    // The other client's memory work is unaffected.
    let ob = other.alloc(8192).expect("alloc");
    ob.write(0, &pattern(4096, 3));
    assert_eq!(
        other
            .mem_move(ob.at(4096), ob.addr(), 4096)
            .expect("run")
            .status,
        status::SUCCESS
    );
    assert_eq!(ob.to_vec(4096, 4096), pattern(4096, 3));
    let _ = release_tx.send(());
}

#[test]
fn test_dedicated_queue_credits() {
    let d = Daemon::start(&["--workers", "1", "--wq-mode", "dedicated", "--wq-size", "4"]);
    let c = Client::connect(&d.socket).expect("connect");
    assert_eq!(c.info().wq_mode, sva_accel::wq::WqMode::Dedicated);
    let a = c.alloc(1 << 20).expect("alloc");
    // More operations in flight than the queue has entries: the library
    // waits for credits instead of overrunning the queue.
    let handles: Vec<_> = (0..32u32)
        .map(|i| {
            c.submit(ops::fill(a.at(i as usize * 4096), u64::from(i), 4096))
                .expect("submit")
        })
        .collect();
    for h in handles {
        assert_eq!(h.wait().expect("wait").status, status::SUCCESS);
    }
    assert_eq!(a.to_vec(31 * 4096, 1), vec![31]);
    // Every dedicated queue taken: the next client is refused.
    let mut others = Vec::new();
    loop {
        match Client::connect(&d.socket) {
            Ok(o) => others.push(o),
            Err(ClientError::Refused { errno, .. }) => {
                assert_eq!(errno, libc::EBUSY);
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(others.len() < 16, "dedicated queues unbounded");
    }
    assert_eq!(others.len() + 1, sva_accel::device::MAX_DEDICATED_WQS);
}

#[test]
fn test_shared_queue_retry() {
    let d = Daemon::start(&["--workers", "1", "--wq-size", "2"]);
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let c = Client::connect_with(
        &d.socket,
        Options {
            fault_handler: Some(Box::new(move |_| {
                if let Ok(rx) = release_rx.lock() {
                    let _ = rx.recv_timeout(Duration::from_secs(20));
                }
                FaultAction::Fail
            })),
            ..Options::default()
        },
    )
    .expect("connect");
    // A parked descriptor and a drain behind it: the worker takes nothing
    // more from this portal until the fault is answered, so its ring fills.
    let lazy = c.alloc_lazy(4096).expect("lazy");
    let crs = c.alloc(4096).expect("alloc");
    let mut parked = ops::fill(lazy.addr(), 0, 64);
    parked.flags |= flags::CRAV | flags::RCR | flags::BOF;
    parked.completion_addr = crs.addr();
    let mut drain = Descriptor::new(opcode::DRAIN, flags::CRAV | flags::RCR);
    drain.completion_addr = crs.at(32);
    c.submit_raw(&[parked, drain]).expect("submit");
    let mut accepted = 0;
    let mut retried = false;
    for _ in 0..64 {
        match c.try_submit_raw(&[Descriptor::new(opcode::NOOP, 0)]) {
            Ok(()) => accepted += 1,
            Err(ClientError::Retry) => {
                retried = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(retried, "a full shared queue answers retry");
    assert!(accepted <= 2, "{accepted} accepted into a ring of 2");
    assert!(c.stats().retries.load(Ordering::Relaxed) >= 1);
    release_tx.send(()).expect("release");
    assert_eq!(
        c.wait_record_in(&crs, 0).expect("wait").status,
        status::PAGE_FAULT_IR | status::WRITE
    );
    assert_eq!(
        c.wait_record_in(&crs, 32).expect("wait").status,
        status::SUCCESS
    );
}

#[test]
fn test_drain_waits_for_parked_work() {
    let d = Daemon::shared();
    let (entered_tx, entered_rx) = mpsc::channel();
    let release: Arc<Mutex<Option<mpsc::Receiver<()>>>> = Arc::default();
    let (release_tx, release_rx) = mpsc::channel();
    *release.lock().expect("lock") = Some(release_rx);
    let lazy_slot: Arc<Mutex<Option<Arc<sva_accel::client::Buffer>>>> = Arc::default();
    let (r2, l2) = (release.clone(), lazy_slot.clone());
    let c = Client::connect_with(
        &d.socket,
        Options {
            block_on_fault: true,
            fault_handler: Some(Box::new(move |_| {
                let _ = entered_tx.send(());
                if let Some(rx) = r2.lock().expect("lock").as_ref() {
                    let _ = rx.recv_timeout(Duration::from_secs(20));
                }
                match l2.lock().expect("lock").as_ref() {
                    Some(b) if b.register().is_ok() => FaultAction::Retry,
                    _ => FaultAction::Fail,
                }
            })),
            ..Options::default()
        },
    )
    .expect("connect");
    let other = Client::connect(&d.socket).expect("connect");
    let lazy = Arc::new(c.alloc_lazy(4096).expect("lazy"));
    *lazy_slot.lock().expect("lock") = Some(lazy.clone());
    let parked = c
        .submit(ops::fill(lazy.addr(), 0x0101_0101_0101_0101, 4096))
        .expect("submit");
    entered_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("fault raised");
    let drain = c.submit(Descriptor::new(opcode::DRAIN, 0)).expect("drain");
    // Let the workers make several full passes: the drain must stay pending.
    let done = AtomicBool::new(false);
    for _ in 0..20 {
        assert_eq!(
            other
                .run(Descriptor::new(opcode::NOOP, 0))
                .expect("noop")
                .status,
            status::SUCCESS
        );
        done.store(drain.poll().is_some(), Ordering::SeqCst);
        assert!(
            !done.load(Ordering::SeqCst),
            "drain completed before the parked work"
        );
    }
    release_tx.send(()).expect("release");
    let dr = drain.wait().expect("drain");
    assert_eq!(dr.status, status::SUCCESS);
    assert!(
        parked.poll().is_some(),
        "parked work completed before the drain"
    );
    assert_eq!(parked.wait().expect("parked").status, status::SUCCESS);
    assert_eq!(lazy.to_vec(0, 4), vec![1, 1, 1, 1]);
}

/// Priorities weigh the turns (as a DSA work queue's priority weighs its
/// share of the engines): with a client of priority 15 and one of priority
/// 1 both loaded with fills of one unit (1 MiB) each, the low one runs
/// about one unit per fifteen of the high one's: some (it is not starved,
/// as it would be under strict priority) and far fewer than the high one
/// (as it would not be under plain round robin).
#[test]
fn test_priority_weighs_turns() {
    let d = Daemon::start(&["--workers", "1", "--priority", "15"]);
    let high = Client::connect(&d.socket).expect("connect");
    let low = Client::connect_with(
        &d.socket,
        Options {
            priority: 1,
            ..Options::default()
        },
    )
    .expect("connect");
    assert_eq!((high.info().priority, low.info().priority), (15, 1));
    const N: usize = 60;
    let hb = high.alloc(N << 20).expect("alloc");
    let lb = low.alloc(N << 20).expect("alloc");
    let highs: Vec<_> = (0..N)
        .map(|i| {
            high.submit(ops::fill(hb.at(i << 20), 1, 1 << 20))
                .expect("submit")
        })
        .collect();
    let lows: Vec<_> = (0..N)
        .map(|i| {
            low.submit(ops::fill(lb.at(i << 20), 2, 1 << 20))
                .expect("submit")
        })
        .collect();
    for h in highs {
        assert_eq!(h.wait().expect("wait").status, status::SUCCESS);
    }
    let low_done = lows.iter().filter(|h| h.poll().is_some()).count();
    eprintln!("low-priority fills done when the high-priority ones were: {low_done}");
    assert!(
        (1..=N / 15 + 4).contains(&low_done),
        "{low_done} of {N} low-priority units ran during {N} high-priority ones"
    );
    for l in lows {
        assert_eq!(l.wait().expect("wait").status, status::SUCCESS);
    }
}

#[test]
fn test_parked_work_does_not_starve_shared_queue() {
    let d = Daemon::start(&["--workers", "1", "--wq-size", "4"]);
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let blocked = Client::connect_with(
        &d.socket,
        Options {
            block_on_fault: true,
            fault_handler: Some(Box::new(move |_| {
                // Hold every fault until the test releases them.
                if let Ok(rx) = release_rx.lock() {
                    let _ = rx.recv_timeout(Duration::from_secs(20));
                }
                FaultAction::Fail
            })),
            ..Options::default()
        },
    )
    .expect("connect");
    let lazy = blocked.alloc_lazy(16 * 4096).expect("lazy");
    let parked: Vec<_> = (0..8)
        .map(|i| {
            blocked
                .submit(ops::fill(lazy.at(i * 4096), 0, 64))
                .expect("submit")
        })
        .collect();
    // Eight blocked descriptors, a queue of four: the other client still runs.
    let other = Client::connect(&d.socket).expect("connect");
    let a = other.alloc(8192).expect("alloc");
    for _ in 0..10 {
        assert_eq!(
            other.fill(a.addr(), 0, 8192).expect("fill").status,
            status::SUCCESS
        );
    }
    for _ in 0..8 {
        let _ = release_tx.send(());
    }
    for h in parked {
        assert_eq!(h.wait().expect("wait").code(), status::PAGE_FAULT_IR);
    }
}

#[test]
fn test_mixed_work_two_workers() {
    let d = Daemon::start(&["--workers", "2", "--wq-size", "16"]);
    let path = d.socket.clone();
    let threads: Vec<_> = (0..3u8)
        .map(|t| {
            let path = path.clone();
            std::thread::spawn(move || {
                let c = Client::connect(&path).expect("connect");
                let a = c.alloc(1 << 16).expect("alloc");
                let mut b = c.batch(16).expect("batch");
                for round in 0..30u32 {
                    let v = t.wrapping_mul(31).wrapping_add(round as u8);
                    let pat = u64::from_ne_bytes([v; 8]);
                    // Async fills, a drain, then a batch that copies them.
                    let fills: Vec<_> = (0..8)
                        .map(|i| {
                            c.submit(ops::fill(a.at(i * 1024), pat, 1024))
                                .expect("fill")
                        })
                        .collect();
                    assert_eq!(c.drain().expect("drain").status, status::SUCCESS);
                    for f in fills {
                        assert!(f.poll().is_some(), "drain completed before earlier work");
                        assert_eq!(f.wait().expect("wait").status, status::SUCCESS);
                    }
                    b.clear();
                    for i in 0..8 {
                        b.mem_move(a.at(32768 + i * 1024), a.at(i * 1024), 1024);
                    }
                    b.fence().compare(a.addr(), a.at(32768), 8192);
                    let r = b.submit().expect("submit").wait().expect("wait");
                    assert_eq!(r.record.status, status::SUCCESS, "client {t} round {round}");
                    assert!(a.to_vec(32768, 8192).iter().all(|x| *x == v));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
}
