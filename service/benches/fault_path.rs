//! Fault path benchmark: I/O page faults raised by iommu-core devices,
//! pumped into a fault channel, consumed and answered by another thread
//! through io_uring, and the device resumed.
//!
//! Prints, in one run:
//! - round trip (raise, consume, respond, resume) p50/p99, one fault in
//!   flight, with both sides blocking and with both sides polling for 50 us
//!   before they block (`--latency-matrix` tries each side alone);
//! - batched throughput with many faults in flight (io_uring consumer,
//!   packets of whole groups);
//! - the baseline on the same channel: one packet and one read/write
//!   syscall per record on both sides;
//! - the ratio.
//!
//! `cargo bench -p ioasis-service --bench fault_path` (add `-- --quick` for a
//! shorter run).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ioasis_service::uring::record::{FAULT_RECORD_SIZE, PAGE_RESPONSE_SIZE};
use ioasis_service::uring::{
    fault_channel_pair, ChannelError, FaultBatch, FaultChannel, FaultPump, PageResponse, Wait,
    MAX_FAULT_PACKET,
};
use ioasis_service::QueueSource;
use iommu_core::{Error, FaultStatus, HwInfo, HwptAlloc, Iommu, IommuDevice, Translator};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, send, MsgFlags};

struct Rig {
    _iommu: Iommu,
    devs: Vec<IommuDevice>,
    pump: FaultPump<QueueSource>,
    consumer_fd: Option<OwnedFd>,
}

fn rig(ndev: usize) -> Rig {
    let iommu = Iommu::new();
    let ioas = iommu.ioas_alloc().expect("ioas");
    let (fault_id, fq) = iommu.fault_queue_alloc().expect("fault queue");
    let mut devs = Vec::new();
    for i in 0..ndev {
        let d = IommuDevice::new(format!("d{i}"), HwInfo::full());
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
fn uring_consumer(fd: OwnedFd, wait: Wait, stop: Arc<AtomicBool>) -> (u64, Duration) {
    let cpu0 = thread_cpu();
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
    (n, thread_cpu() - cpu0)
}

/// The baseline consumer: one recv and one send syscall per record.
fn syscall_consumer(fd: OwnedFd, stop: Arc<AtomicBool>) -> (u64, Duration) {
    let cpu0 = thread_cpu();
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
        ioasis_service::uring::record::encode_response(&PageResponse::success(cookie), &mut out);
        if send(fd.as_raw_fd(), &out, MsgFlags::MSG_NOSIGNAL).is_err() {
            break;
        }
        n += 1;
    }
    (n, thread_cpu() - cpu0)
}

/// CPU time consumed by the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec owned by this frame, and
    // CLOCK_THREAD_CPUTIME_ID is always available on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Result of a throughput run.
struct Tput {
    /// Faults per wall-clock second.
    rate: f64,
    /// CPU nanoseconds per fault on the device-side thread (raise, pump,
    /// apply answers, resume).
    server_ns: f64,
    /// CPU nanoseconds per fault on the consumer thread.
    consumer_ns: f64,
}

impl Tput {
    /// The rate on two idle cores: the busier thread's CPU time per fault
    /// bounds the pipeline.
    fn cpu_bound_rate(&self) -> f64 {
        1e9 / self.server_ns.max(self.consumer_ns)
    }

    fn describe(&self) -> String {
        format!(
            "cpu per fault: device side {:.0} ns, consumer {:.0} ns -> {:.2} M faults/s on two idle cores",
            self.server_ns,
            self.consumer_ns,
            self.cpu_bound_rate() / 1e6
        )
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Round trip with one fault in flight.
fn round_trip(
    iters: usize,
    spin: Option<Duration>,
    consumer_spin: Option<Duration>,
) -> (Duration, Duration) {
    let mut r = rig(1);
    let stop = Arc::new(AtomicBool::new(false));
    let fd = r.consumer_fd.take().expect("fd");
    let s2 = stop.clone();
    let wait = match consumer_spin {
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

/// Faults per second with up to `ndev * 32` faults in flight. Two threads:
/// the device-side thread raises faults (keeping every device's window of
/// outstanding groups full), pumps them out and applies the answers (which
/// resumes the devices); the consumer thread answers.
fn throughput(ndev: usize, dur: Duration, baseline: bool) -> Tput {
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
            uring_consumer(fd, Wait::Forever, s2)
        }
    });
    let mut ts: Vec<Translator> = r.devs.iter().map(|d| d.translator()).collect();
    let max = iommu_core::MAX_OUTSTANDING_FAULTS_PER_DEVICE;
    let mut done = 0u64;
    let start = Instant::now();
    let cpu0 = thread_cpu();
    while start.elapsed() < dur {
        // Keep every device's window full.
        for t in ts.iter_mut() {
            while t.device().outstanding_faults() < max {
                if raise(t, 0x1000).is_none() {
                    break;
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
    }
    let secs = start.elapsed().as_secs_f64();
    let server_cpu = thread_cpu() - cpu0;
    stop.store(true, Ordering::Relaxed);
    drop(r.pump);
    let (_, consumer_cpu) = consumer.join().expect("consumer");
    let done_f = done.max(1) as f64;
    Tput {
        rate: done as f64 / secs,
        server_ns: server_cpu.as_nanos() as f64 / done_f,
        consumer_ns: consumer_cpu.as_nanos() as f64 / done_f,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let only_batched = std::env::args().any(|a| a == "--batched-only");
    let iters = if quick { 5_000 } else { 50_000 };
    let dur = Duration::from_secs(if quick { 1 } else { 3 });
    let ndev = 32;
    println!(
        "fault path benchmark (ioasis), packet limit {} bytes",
        MAX_FAULT_PACKET
    );
    if only_batched {
        let u = throughput(ndev, dur, false);
        println!(
            "batched (io_uring): {:.2} M faults/s; {}",
            u.rate / 1e6,
            u.describe()
        );
        return;
    }
    if std::env::args().any(|a| a == "--latency-matrix") {
        let s = Some(Duration::from_micros(50));
        for (d, c) in [(None, None), (s, None), (None, s), (s, s)] {
            let (p50, p99) = round_trip(iters / 5, d, c);
            println!(
                "device spin {d:?} consumer spin {c:?}: p50 {:.2} us p99 {:.2} us",
                p50.as_secs_f64() * 1e6,
                p99.as_secs_f64() * 1e6
            );
        }
        return;
    }
    let (bp50, bp99) = round_trip(iters / 5, None, None);
    println!(
        "round trip, blocking:       p50 {:>7.2} us  p99 {:>7.2} us  ({} faults)",
        bp50.as_secs_f64() * 1e6,
        bp99.as_secs_f64() * 1e6,
        iters / 5
    );
    let spin = Some(Duration::from_micros(50));
    let (p50, p99) = round_trip(iters / 5, spin, spin);
    println!(
        "round trip, polling 50us:   p50 {:>7.2} us  p99 {:>7.2} us  ({} faults)",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        iters / 5
    );
    let mut ur = Vec::new();
    let mut base = Vec::new();
    for _ in 0..3 {
        ur.push(throughput(ndev, dur, false));
        base.push(throughput(ndev, dur, true));
    }
    ur.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    base.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let (u, b) = (&ur[1], &base[1]);
    let in_flight = ndev * iommu_core::MAX_OUTSTANDING_FAULTS_PER_DEVICE;
    println!(
        "batched (io_uring, {in_flight} in flight): {:>6.2} M faults/s wall (median of 3: {:.2?})",
        u.rate / 1e6,
        ur.iter().map(|x| x.rate / 1e6).collect::<Vec<_>>()
    );
    println!("    {}", u.describe());
    println!(
        "baseline (syscall per record):  {:>6.2} M faults/s wall (median of 3: {:.2?})",
        b.rate / 1e6,
        base.iter().map(|x| x.rate / 1e6).collect::<Vec<_>>()
    );
    println!("    {}", b.describe());
    println!(
        "ratio batched / baseline: {:.2}x wall, {:.2}x cpu-bound",
        u.rate / b.rate,
        u.cpu_bound_rate() / b.cpu_bound_rate()
    );
    let _ = std::io::Write::flush(&mut std::io::stdout());
}
