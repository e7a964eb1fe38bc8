//! Fault path benchmark: I/O page faults raised by iommu-core devices,
//! pumped into a fault channel, consumed and answered by another thread
//! through io_uring, and the device resumed.
//!
//! Prints, in one run:
//! - round trip (raise, consume, respond, resume) p50/p99, one fault in
//!   flight, with both sides busy-polling and with both sides blocking;
//! - batched throughput with many faults in flight (io_uring consumer,
//!   packets of whole groups);
//! - the baseline on the same channel: one packet and one read/write
//!   syscall per record on both sides;
//! - the ratio.
//!
//! `cargo bench -p ioasis --bench fault_path` (add `-- --quick` for a
//! shorter run).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ioasis::service::QueueSource;
use ioasis::uring::record::{FAULT_RECORD_SIZE, PAGE_RESPONSE_SIZE};
use ioasis::uring::{
    fault_channel_pair, ChannelError, FaultBatch, FaultChannel, FaultPump, PageResponse, Wait,
    MAX_FAULT_PACKET,
};
use iommu_core::{Device, Error, FaultStatus, HwInfo, HwptAlloc, Iommu, Translator};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, send, MsgFlags};

struct Rig {
    _iommu: Iommu,
    devs: Vec<Device>,
    pump: FaultPump<QueueSource>,
    consumer_fd: Option<OwnedFd>,
}

fn rig(ndev: usize) -> Rig {
    let iommu = Iommu::new();
    let ioas = iommu.ioas_alloc().expect("ioas");
    let (fault_id, fq) = iommu.fault_queue_alloc().expect("fault queue");
    let mut devs = Vec::new();
    for i in 0..ndev {
        let d = Device::new(format!("d{i}"), HwInfo::full());
        let id = iommu.bind(&d).expect("bind");
        let hwpt = iommu
            .hwpt_alloc(&HwptAlloc {
                dev_id: id,
                pt_id: ioas,
                fault_id: Some(fault_id),
                ..HwptAlloc::default()
            })
            .expect("hwpt");
        iommu.attach(id, None, hwpt).expect("attach");
        devs.push(d);
    }
    let (s, c) = fault_channel_pair().expect("pair");
    Rig {
        _iommu: iommu,
        devs,
        pump: FaultPump::new(QueueSource::new(fq), s).expect("pump"),
        consumer_fd: Some(c),
    }
}

/// Raises one fault on `t` (an unmapped address always faults).
fn raise(t: &mut Translator, iova: u64) -> Option<iommu_core::PendingFault> {
    let mut b = [0u8; 1];
    match t.read(None, iova, &mut b) {
        Err(Error::FaultRaised { pending, .. }) => Some(pending),
        Err(Error::FaultOverflow { .. }) => None,
        other => panic!("expected a fault, got {other:?}"),
    }
}

/// The io_uring consumer: answers SUCCESS to every group, batching the
/// answers into the next receive's `io_uring_enter`.
fn uring_consumer(fd: OwnedFd, wait: Wait, stop: Arc<AtomicBool>) -> u64 {
    let mut ch = FaultChannel::new(fd).expect("channel");
    let mut batch = FaultBatch::with_capacity(4096);
    let mut resp: Vec<PageResponse> = Vec::with_capacity(4096);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        batch.clear();
        match ch.respond_and_recv(&resp, &mut batch, wait) {
            Ok(_) => {}
            Err(ChannelError::Closed) => break,
            Err(e) => panic!("consumer: {e}"),
        }
        resp.clear();
        resp.extend(batch.group_cookies().map(PageResponse::success));
        n += resp.len() as u64;
    }
    n
}

/// The baseline consumer: one recv and one send syscall per record.
fn syscall_consumer(fd: OwnedFd, stop: Arc<AtomicBool>) -> u64 {
    let mut buf = [0u8; FAULT_RECORD_SIZE];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) => break,
            Ok(FAULT_RECORD_SIZE) => {}
            Ok(len) => panic!("baseline consumer: packet of {len} bytes"),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::ECONNRESET) => break,
            Err(e) => panic!("baseline consumer: {e}"),
        }
        let cookie = u32::from_le_bytes([buf[36], buf[37], buf[38], buf[39]]);
        let mut out = [0u8; PAGE_RESPONSE_SIZE];
        PageResponse::success(cookie).encode(&mut out);
        if send(fd.as_raw_fd(), &out, MsgFlags::MSG_NOSIGNAL).is_err() {
            break;
        }
        n += 1;
    }
    n
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Round trip with one fault in flight.
fn round_trip(iters: usize, spin: Option<Duration>) -> (Duration, Duration) {
    let mut r = rig(1);
    let stop = Arc::new(AtomicBool::new(false));
    let fd = r.consumer_fd.take().expect("fd");
    let s2 = stop.clone();
    let wait = match spin {
        Some(d) => Wait::SpinThenBlock(d),
        None => Wait::Forever,
    };
    let consumer = std::thread::spawn(move || uring_consumer(fd, wait, s2));
    let mut t = r.devs[0].translator();
    let mut lat = Vec::with_capacity(iters);
    for i in 0..iters + 1000 {
        let start = Instant::now();
        let p = raise(&mut t, 0x1000).expect("fault");
        r.pump.pump_out().expect("pump out");
        // Wait for the answer on the channel socket (spinning first if
        // asked), then apply it.
        let spin_until = Instant::now() + spin.unwrap_or_default();
        loop {
            if r.pump.pump_in().expect("pump in") > 0 {
                break;
            }
            if Instant::now() >= spin_until {
                let mut pfd = [PollFd::new(r.pump.socket(), PollFlags::POLLIN)];
                let _ = poll(&mut pfd, PollTimeout::from(1000u16));
            } else {
                std::hint::spin_loop();
            }
        }
        assert_eq!(p.status(), FaultStatus::Success);
        if i >= 1000 {
            lat.push(start.elapsed());
        }
    }
    stop.store(true, Ordering::Relaxed);
    drop(r.pump);
    consumer.join().expect("consumer");
    lat.sort();
    (percentile(&lat, 0.5), percentile(&lat, 0.99))
}

/// Faults per second with up to `ndev * 32` faults in flight.
fn throughput(ndev: usize, dur: Duration, baseline: bool) -> f64 {
    let mut r = rig(ndev);
    if baseline {
        r.pump.set_packet_limit(1);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let fd = r.consumer_fd.take().expect("fd");
    let s2 = stop.clone();
    let consumer = std::thread::spawn(move || {
        if baseline {
            syscall_consumer(fd, s2)
        } else {
            uring_consumer(fd, Wait::SpinThenBlock(Duration::from_micros(200)), s2)
        }
    });
    let mut ts: Vec<Translator> = r.devs.iter().map(|d| d.translator()).collect();
    let mut done = 0u64;
    let start = Instant::now();
    let mut in_flight = 0usize;
    let cap = ndev * iommu_core::MAX_OUTSTANDING_FAULTS_PER_DEVICE;
    while start.elapsed() < dur {
        // Keep every device's window full.
        if in_flight < cap {
            for t in ts.iter_mut() {
                while t.device().outstanding_faults()
                    < iommu_core::MAX_OUTSTANDING_FAULTS_PER_DEVICE
                {
                    if raise(t, 0x1000).is_none() {
                        break;
                    }
                    in_flight += 1;
                }
            }
        }
        r.pump.pump_out().expect("pump out");
        let got = r.pump.pump_in().expect("pump in");
        if got == 0 {
            let mut pfd = [PollFd::new(r.pump.socket(), PollFlags::POLLIN)];
            let _ = poll(&mut pfd, PollTimeout::from(100u16));
        }
        done += got as u64;
        in_flight = in_flight.saturating_sub(got);
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    drop(r.pump);
    let _ = consumer.join();
    done as f64 / secs
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let iters = if quick { 5_000 } else { 50_000 };
    let dur = Duration::from_secs(if quick { 1 } else { 3 });
    let ndev = 32;
    println!(
        "fault path benchmark (ioasis), packet limit {} bytes",
        MAX_FAULT_PACKET
    );
    let (p50, p99) = round_trip(iters, Some(Duration::from_micros(50)));
    println!(
        "round trip, spin 50us:      p50 {:>7.2} us  p99 {:>7.2} us  ({iters} faults)",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    let (bp50, bp99) = round_trip(iters / 5, None);
    println!(
        "round trip, blocking:       p50 {:>7.2} us  p99 {:>7.2} us  ({} faults)",
        bp50.as_secs_f64() * 1e6,
        bp99.as_secs_f64() * 1e6,
        iters / 5
    );
    let mut ur = Vec::new();
    let mut base = Vec::new();
    for _ in 0..3 {
        ur.push(throughput(ndev, dur, false));
        base.push(throughput(ndev, dur, true));
    }
    ur.sort_by(f64::total_cmp);
    base.sort_by(f64::total_cmp);
    let (u, b) = (ur[1], base[1]);
    println!(
        "batched (io_uring, {} in flight): {:>6.2} M faults/s (median of 3; runs {:.2?})",
        ndev * iommu_core::MAX_OUTSTANDING_FAULTS_PER_DEVICE,
        u / 1e6,
        ur.iter().map(|x| x / 1e6).collect::<Vec<_>>()
    );
    println!(
        "baseline (syscall per record):  {:>6.2} M faults/s (median of 3; runs {:.2?})",
        b / 1e6,
        base.iter().map(|x| x / 1e6).collect::<Vec<_>>()
    );
    println!("ratio batched / baseline: {:.2}x", u / b);
    let _ = std::io::Write::flush(&mut std::io::stdout());
}
