//! Quickstart: one backend process, two devices, one shared IOAS.
//!
//! ```text
//! cargo run --release -p ioasis-examples --example quickstart
//! ```
//!
//! This program is the *driver*: it starts a backend process (this same
//! binary with `--backend DIR`, see `backend.rs`) that hosts a vdpa-net
//! device (`net0`, reflect port) and an sva-accel device (`sva0`) on one
//! framework `Server`, then plays the owner of both:
//!
//! 1. through the backend's userspace `/dev/iommu` service it creates one
//!    IOAS over its own memory (a memfd passed with `SCM_RIGHTS`);
//! 2. it attaches sva0 on a PASID (fault-capable HWPT, fault channel read
//!    with io_uring) and net0's RID to that IOAS, and connects to net0 as a
//!    vhost-user frontend whose rings and buffers are IOVAs of the IOAS;
//! 3. it sends frames into net0, which reflects them into the driver's
//!    receive buffers; sva0 copies each received frame and computes its
//!    CRC-32C inside the same IOAS; the driver checks every copy and every
//!    CRC against its own computation;
//! 4. it has sva0 copy frames into a window it has not mapped yet: the I/O
//!    page faults reach the driver over the fault channel, the driver maps
//!    the memory and answers SUCCESS, and the copies complete;
//! 5. it unmaps the frame area while both devices have writes into it in
//!    flight (net0 fed by a thread until the unmap returns, sva0 running
//!    4 KiB fills there among longer ones elsewhere), every write stamped
//!    by the driver (a frame's sequence number, a fill pattern of its
//!    own); right after the unmap returns it reads which writes the devices
//!    have completed, and once all work has ended it checks that the area
//!    holds exactly those writes: no device wrote after the unmap returned
//!    (see `stamps.rs`). Then each device's next access to the area
//!    fails: an IOTLB miss from net0, a page-fault completion from sva0.
//!
//! It prints a transcript with a summary and exits 0; any failure exits 1
//! with a message. Every wait is bounded, a watchdog ends a stuck run, and
//! the backend dies with the driver.

mod backend;
mod frontend;
mod stamps;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ioasis::service::{sealed_memfd, Client as Session, HwptRequest, MapPerm};
use ioasis::termination::Termination;
use ioasis::uring::record::FAULT_PERM_WRITE;
use ioasis::uring::{FaultBatch, FaultChannel, PageResponse, Wait};
use iommu_core::Memory;
use sva_accel::client::{ops, Batch, BatchHandle, Client as Accel, Handle, Options};
use sva_accel::desc::{flags, status, CompletionRecord};

use backend::{ACCEL, NET, NET_MAC, READY};
use frontend::{NetFrontend, RingPlace, QUEUE_SIZE, VHOST_IOTLB_MISS};
use ioasis::vhost_user::msg::VHOST_ACCESS_RO;
use stamps::{fill_of, fill_stamp, Ledger};

type Res<T> = Result<T, String>;

fn ctx<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

// Driver memory: one sealed memfd, laid out as below (offsets), mapped into
// the IOAS at IOVA_BASE + offset.
const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const MEM_LEN: usize = 8 * MIB;
const IOVA_BASE: u64 = 0x1000_0000;
const RX_RING_OFF: usize = 0;
const TX_RING_OFF: usize = 16 * KIB;
const TX_BUF_OFF: usize = 64 * KIB;
/// Rings and transmit buffers: the first area.
const AREA_CTL: (usize, usize) = (0, MIB);
const RX_BUF_OFF: usize = MIB;
const COPY_OFF: usize = MIB + 512 * KIB;
/// Receive buffers and copies: the second area (unmapped at the end).
const AREA_FRAMES: (usize, usize) = (MIB, MIB);
/// Not mapped until a device faults on it.
const LAZY_OFF: usize = 4 * MIB;
const LAZY_LEN: usize = MIB;
/// Mapped per fault.
const FAULT_CHUNK: usize = 16 * KIB;
const SLOT: usize = 2 * KIB;
const VNET_HDR_LEN: usize = 12;
const ROUNDS: usize = 40;
const PER_ROUND: usize = QUEUE_SIZE as usize;
const MIN_FRAME: usize = 60;
const MAX_FRAME: usize = 1514;
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const WAIT: Duration = Duration::from_secs(10);
const WATCHDOG: Duration = Duration::from_secs(120);

fn iova(off: usize) -> u64 {
    IOVA_BASE + off as u64
}

/// Pid of the backend, for the watchdog (0: none).
static BACKEND_PID: AtomicI32 = AtomicI32::new(0);
/// The backend's scratch directory, for the watchdog to remove.
static SCRATCH: Mutex<Option<PathBuf>> = Mutex::new(None);

pub(crate) fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--backend") {
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
        let Some(dir) = args.get(1) else {
            eprintln!("quickstart backend: --backend needs a directory");
            std::process::exit(2);
        };
        if let Err(e) = backend::run(Path::new(dir)) {
            eprintln!("quickstart backend: {e}");
            std::process::exit(1);
        }
        return;
    }
    if !args.is_empty() {
        eprintln!("usage: quickstart (no arguments)");
        std::process::exit(2);
    }
    start_signal_thread();
    start_watchdog();
    let mut tally = Tally::default();
    match run(&mut tally) {
        Ok(()) => {
            summary(&tally);
            println!("\nquickstart: OK");
        }
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("\nquickstart FAILED: {e}");
            std::process::exit(1);
        }
    }
}

/// Kills the backend and removes the scratch directory.
fn emergency_cleanup() {
    let pid = BACKEND_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) with a pid we spawned; no memory involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if let Some(dir) = SCRATCH.lock().ok().and_then(|mut d| d.take()) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// SIGINT and SIGTERM are taken by a thread of their own (blocked in every
/// other thread; children start with an empty mask), which cleans up and
/// exits.
fn start_signal_thread() {
    // Called before any other thread starts: they inherit the blocked mask.
    let mut termination = match Termination::for_main_thread() {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "quickstart: cannot take SIGINT/SIGTERM ({e}); Ctrl-C may leave files behind"
            );
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            // Bounded by the process: the thread ends with it.
            while !termination.wait(None) {}
            eprintln!("\nquickstart: interrupted");
            emergency_cleanup();
            std::process::exit(130);
        });
    if let Err(e) = spawned {
        eprintln!("quickstart: no signal thread: {e}");
    }
}

fn start_watchdog() {
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(|| {
            std::thread::sleep(WATCHDOG);
            eprintln!("\nquickstart FAILED: no result after {WATCHDOG:?}; giving up");
            emergency_cleanup();
            std::process::exit(1);
        });
    if let Err(e) = spawned {
        eprintln!("quickstart: no watchdog thread: {e}");
    }
}

/// The figures the summary reports.
#[derive(Debug, Default)]
struct Tally {
    packets_sent: u64,
    bytes_sent: u64,
    packets_received: u64,
    bytes_received: u64,
    device_rx_packets: u64,
    device_tx_packets: u64,
    frames_copied: u64,
    crcs_verified: u64,
    faults_raised: u64,
    faults_answered: u64,
    lazy_copies: u64,
    invalidations_observed: u64,
    /// net0 and sva0 writes into the frame area submitted and not
    /// completed when IOAS_UNMAP was issued.
    net_in_flight: u64,
    sva_in_flight: u64,
    writes_stopped: u64,
    /// Device writes found in the frame area that no completion visible
    /// when IOAS_UNMAP returned accounts for (the run fails if not 0).
    late_writes: u64,
    /// Bytes of the frame area compared with the replay of the writes
    /// completed when IOAS_UNMAP returned.
    bytes_checked: u64,
    net_time: Duration,
    accel_time: Duration,
    accel_bytes: u64,
}

fn step(n: u32, title: &str) {
    println!("\n[{n}] {title}");
}

/// A progress line on stderr for a step that runs longer than a second.
struct Progress {
    what: &'static str,
    /// Items to do; 0 for a wait, which shows the time waited instead.
    total: usize,
    start: Instant,
    last: Option<Instant>,
    tty: bool,
}

impl Progress {
    /// Progress through `total` items.
    fn new(what: &'static str, total: usize) -> Progress {
        Progress {
            what,
            total,
            start: Instant::now(),
            last: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// A bounded wait: shows the seconds waited.
    fn waiting(what: &'static str) -> Progress {
        Progress::new(what, 0)
    }

    fn tick(&mut self, done: usize) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.start);
        if elapsed < Duration::from_secs(1) {
            return;
        }
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(1)
        };
        if self.last.is_some_and(|l| now.duration_since(l) < every) {
            return;
        }
        self.last = Some(now);
        let text = match (done * 100).checked_div(self.total) {
            None => format!("    ... {} ({:.1} s)", self.what, elapsed.as_secs_f64()),
            Some(pct) => format!("    ... {} {done}/{} ({pct}%)", self.what, self.total),
        };
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{text}");
        } else {
            let _ = writeln!(err, "{text}");
        }
        let _ = err.flush();
    }

    fn finish(self) {
        if self.tty && self.last.is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{:72}\r", "");
            let _ = err.flush();
        }
    }
}

/// The backend child: killed (and reaped) when dropped.
struct BackendProc {
    child: Child,
    dir: tempfile::TempDir,
    log: PathBuf,
    /// Requests to the backend (`stats`).
    stdin: Option<ChildStdin>,
    /// Lines of the backend's stdout.
    lines: Receiver<std::io::Result<String>>,
}

impl BackendProc {
    fn start() -> Res<BackendProc> {
        let dir = tempfile::Builder::new()
            .prefix("ioasis-quickstart-")
            .tempdir()
            .map_err(ctx("temporary directory"))?;
        if let Ok(mut d) = SCRATCH.lock() {
            *d = Some(dir.path().to_path_buf());
        }
        let exe = std::env::current_exe().map_err(ctx("own executable"))?;
        let log = dir.path().join("backend.log");
        let log_file = std::fs::File::create(&log).map_err(ctx("backend log"))?;
        let mut child = Command::new(exe)
            .arg("--backend")
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .map_err(ctx("starting the backend"))?;
        BACKEND_PID.store(i32::try_from(child.id()).unwrap_or(0), Ordering::SeqCst);
        let out = child.stdout.take().ok_or("backend stdout")?;
        let stdin = child.stdin.take();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut out = BufReader::new(out);
            // A ready line and a stats answer or two; bounded anyway.
            for _ in 0..1024 {
                let mut line = String::new();
                let r = out.read_line(&mut line);
                let end = matches!(r, Ok(0) | Err(_));
                if tx.send(r.map(|_| line)).is_err() || end {
                    return;
                }
            }
        });
        let mut b = BackendProc {
            child,
            dir,
            log,
            stdin,
            lines: rx,
        };
        let mut progress = Progress::waiting("waiting for the backend to start");
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match b.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok(l)) if l.trim() == READY => {
                    progress.finish();
                    return Ok(b);
                }
                Ok(Ok(l)) => {
                    return Err(b.fail(&format!("backend said {l:?} instead of {READY:?}")))
                }
                Ok(Err(e)) => return Err(b.fail(&format!("reading the backend: {e}"))),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(b.fail("backend closed its stdout"))
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => progress.tick(0),
            }
        }
        progress.finish();
        Err(b.fail(&format!("backend not ready after {WAIT:?}")))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// net0's packet counters (received, transmitted), asked on the
    /// backend's stdin.
    fn net_stats(&mut self) -> Res<(u64, u64)> {
        let line = self.request("stats")?;
        parse_stats(&line)
    }

    /// One request line on the backend's stdin, and its answer line.
    fn request(&mut self, req: &str) -> Res<String> {
        let stdin = self.stdin.as_mut().ok_or("backend stdin")?;
        stdin
            .write_all(format!("{req}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .map_err(ctx("writing to the backend"))?;
        match self.lines.recv_timeout(WAIT) {
            Ok(Ok(l)) => Ok(l),
            Ok(Err(e)) => Err(format!("reading the backend: {e}")),
            Err(e) => Err(format!("no answer from the backend to {req:?}: {e}")),
        }
    }

    /// A message with the tail of the backend's log.
    fn fail(&mut self, msg: &str) -> String {
        let exited = match self.child.try_wait() {
            Ok(Some(s)) => format!(" (backend exited: {s})"),
            _ => String::new(),
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        if tail.is_empty() {
            format!("{msg}{exited}")
        } else {
            format!("{msg}{exited}\nbackend log:\n  {}", tail.join("\n  "))
        }
    }

    /// SIGTERM, then a bounded wait; SIGKILL if it does not go.
    fn stop(&mut self) -> Res<std::process::ExitStatus> {
        let pid = i32::try_from(self.child.id()).map_err(ctx("pid"))?;
        // SAFETY: kill(2) on our own child; no memory involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut progress = Progress::waiting("waiting for the backend to exit");
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().map_err(ctx("waiting"))? {
                BACKEND_PID.store(0, Ordering::SeqCst);
                progress.finish();
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(10));
            progress.tick(0);
        }
        progress.finish();
        let _ = self.child.kill();
        let s = self.child.wait().map_err(ctx("waiting"))?;
        BACKEND_PID.store(0, Ordering::SeqCst);
        Err(format!(
            "backend ignored SIGTERM for 5 s and was killed ({s})"
        ))
    }
}

impl Drop for BackendProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        BACKEND_PID.store(0, Ordering::SeqCst);
    }
}

/// `stats rx_packets=.. tx_packets=.. ...` -> (rx_packets, tx_packets).
fn parse_stats(line: &str) -> Res<(u64, u64)> {
    let s = line
        .trim()
        .strip_prefix("stats ")
        .ok_or_else(|| format!("backend answered {line:?} to stats"))?;
    let get = |k: &str| -> Res<u64> {
        s.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {k} in {s:?}"))
    };
    Ok((get("rx_packets")?, get("tx_packets")?))
}

/// CRC-32C (Castagnoli), computed here bit by bit, independently of the
/// accelerator's implementation.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Frame lengths repeat with this period in the sequence number.
const LEN_PERIOD: usize = MAX_FRAME - MIN_FRAME + 1;
/// Step of the frame length from one sequence number to the next, prime to
/// the period: fewer than `LEN_PERIOD` consecutive frames all have
/// different lengths.
const LEN_STEP: usize = 397;
/// The inverse of `LEN_STEP` modulo `LEN_PERIOD`.
const LEN_STEP_INV: usize = {
    let mut i = 1;
    while i * LEN_STEP % LEN_PERIOD != 1 {
        i += 1;
    }
    i
};

/// Length of frame `seq`.
fn frame_len(seq: u32) -> usize {
    MIN_FRAME + (seq as usize * LEN_STEP) % LEN_PERIOD
}

/// The frame of `len` bytes among the `n` (at most `LEN_PERIOD`) frames
/// from `first` on.
fn seq_of_len(first: u32, n: usize, len: usize) -> Option<u32> {
    let r = len.checked_sub(MIN_FRAME).filter(|&r| r < LEN_PERIOD)?;
    let base = first as usize * LEN_STEP % LEN_PERIOD;
    let j = (r + LEN_PERIOD - base) % LEN_PERIOD * LEN_STEP_INV % LEN_PERIOD;
    (j < n.min(LEN_PERIOD)).then(|| first + j as u32)
}

/// Frame `seq` as the driver sends it.
fn frame(seq: u32) -> Vec<u8> {
    let len = frame_len(seq);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&NET_MAC);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(&seq.to_le_bytes());
    // xorshift64, eight bytes a step.
    let mut x = u64::from(seq).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while f.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = (len - f.len()).min(8);
        f.extend_from_slice(&x.to_le_bytes()[..n]);
    }
    f
}

/// The same frame after net0's reflect port swapped the addresses.
fn reflected(seq: u32) -> Vec<u8> {
    let mut f = frame(seq);
    let (dst, src) = f.split_at_mut(6);
    dst.swap_with_slice(&mut src[..6]);
    f
}

fn seq_of(f: &[u8]) -> Option<u32> {
    let b = f.get(14..18)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Writes frame `seq`, behind a zeroed virtio-net header, into transmit
/// slot `j` and offers it on net0's transmit queue; returns the frame's
/// length.
fn offer_frame(mem: &Memory, net: &mut NetFrontend, j: usize, seq: u32) -> Res<usize> {
    let f = frame(seq);
    let mut buf = vec![0u8; VNET_HDR_LEN];
    buf.extend_from_slice(&f);
    mem.write_at(TX_BUF_OFF + j * SLOT, &buf)
        .map_err(ctx("writing a frame"))?;
    NetFrontend::add(
        &mut net.tx,
        iova(TX_BUF_OFF + j * SLOT),
        buf.len() as u32,
        false,
    )?;
    Ok(f.len())
}

fn mem_read(mem: &Memory, off: usize, len: usize) -> Res<Vec<u8>> {
    let mut v = vec![0u8; len];
    mem.read_at(off, &mut v)
        .map_err(ctx("reading driver memory"))?;
    Ok(v)
}

fn run(t: &mut Tally) -> Res<()> {
    println!("ioasis quickstart: one backend process, two devices, one shared IOAS");

    step(1, "start the backend process");
    let mut be = BackendProc::start()?;
    println!(
        "    backend pid {}: a framework Server hosting {NET} (vdpa-net, reflect port) and \
         {ACCEL} (sva-accel),\n      one iommu-core context, a /dev/iommu service on iommu.sock",
        be.child.id()
    );
    let r = drive(t, &mut be);
    let r = match r {
        Ok(()) => Ok(()),
        Err(e) => Err(be.fail(&e)),
    };
    r?;

    step(8, "stop the backend");
    let st = be.stop()?;
    if !st.success() {
        return Err(be.fail(&format!("backend exited with {st}")));
    }
    println!("    SIGTERM: backend exited cleanly ({st})");
    Ok(())
}

fn drive(t: &mut Tally, be: &mut BackendProc) -> Res<()> {
    step(
        2,
        "open a /dev/iommu session; one IOAS over the driver's memory",
    );
    let mut svc = Session::connect(be.path("iommu.sock")).map_err(ctx("/dev/iommu session"))?;
    let devices = svc.devices().map_err(ctx("DEVICE_LIST"))?;
    println!(
        "    session {} with backend pid {}; devices offered: {}",
        svc.session_id(),
        svc.server_pid(),
        devices.join(", ")
    );
    for d in [NET, ACCEL] {
        if !devices.iter().any(|x| x == d) {
            return Err(format!("the service does not offer {d}"));
        }
    }
    let memfd: OwnedFd = sealed_memfd("quickstart", MEM_LEN as u64).map_err(ctx("memfd"))?;
    let mem = Memory::from_memfd(memfd.try_clone().map_err(ctx("dup memfd"))?, 0, MEM_LEN)
        .map_err(ctx("mapping the memfd"))?;
    let ioas = svc.ioas_alloc().map_err(ctx("IOAS_ALLOC"))?;
    for (off, len) in [AREA_CTL, AREA_FRAMES] {
        svc.ioas_map(
            ioas,
            memfd.as_fd(),
            off as u64,
            len as u64,
            Some(iova(off)),
            MapPerm::ReadWrite,
        )
        .map_err(ctx("IOAS_MAP"))?;
    }
    println!(
        "    memfd of {} MiB sealed and passed with SCM_RIGHTS; IOAS {ioas}:",
        MEM_LEN / MIB
    );
    println!(
        "      {:#x} +1 MiB  rings and transmit buffers",
        iova(AREA_CTL.0)
    );
    println!(
        "      {:#x} +1 MiB  receive buffers and copies",
        iova(AREA_FRAMES.0)
    );
    println!(
        "      {:#x} +1 MiB  not mapped: filled on demand by page faults",
        iova(LAZY_OFF)
    );

    step(3, "attach both devices to the IOAS");
    let pasid = svc.pasid_alloc(ACCEL).map_err(ctx("PASID_ALLOC"))?;
    let (fault_id, mut faults) = svc.fault_queue_alloc().map_err(ctx("FAULT_QUEUE_ALLOC"))?;
    let hwpt = svc
        .hwpt_alloc(&HwptRequest {
            label: ACCEL.into(),
            pt_id: ioas,
            flags: iommu_core::IOMMU_HWPT_ALLOC_PASID,
            fault_id: Some(fault_id),
            ..HwptRequest::default()
        })
        .map_err(ctx("HWPT_ALLOC"))?;
    svc.attach(ACCEL, Some(pasid), hwpt)
        .map_err(ctx("attaching sva0"))?;
    println!(
        "    {ACCEL}: PASID {pasid} attached to fault-capable HWPT {hwpt}\n      (fault queue {fault_id}; \
         its channel fd came back over SCM_RIGHTS and is read with io_uring)"
    );

    let mut fe = frontend::connect(&be.path("net0.sock"))?;
    let offered = frontend::negotiate(&mut fe)?;
    println!(
        "    {NET}: vhost-user frontend connected; device offers features {offered:#x};\n      \
         driver acks VERSION_1 | ACCESS_PLATFORM: ring and buffer addresses are IOVAs"
    );
    let h = svc.attach(NET, None, ioas).map_err(ctx("attaching net0"))?;
    println!(
        "    {NET}: RID attached to IOAS {ioas} through the service (HWPT {h}); the session took it\n      \
         over from the vhost-user connection's own IOAS (replace) and owns it until it detaches\n      \
         (both devices are granted to this process, and its session speaks for net0's frontend)"
    );
    let place = RingPlace {
        rx_off: RX_RING_OFF,
        tx_off: TX_RING_OFF,
        iova_base: IOVA_BASE,
    };
    let mut net = frontend::start(fe, &mem, &place)?;
    println!(
        "    {NET}: receive and transmit rings of {QUEUE_SIZE} at IOVA {:#x} and {:#x}",
        iova(RX_RING_OFF),
        iova(TX_RING_OFF)
    );
    let accel = Accel::connect_with_session(
        be.path("sva0.sock"),
        svc,
        ioas,
        pasid,
        None,
        Options::default(),
    )
    .map_err(ctx("binding the sva0 portal"))?;
    println!(
        "    {ACCEL}: portal bound to PASID {} ({} work queue of {});\n      the client library \
         maps its completion records through the driver's session",
        accel.pasid(),
        format!("{:?}", accel.info().wq_mode).to_lowercase(),
        accel.info().wq_size
    );

    step(
        4,
        "frames through net0, copied and checksummed by sva0 in the same IOAS",
    );
    traffic(t, &mem, &mut net, &accel)?;
    let (dev_rx, dev_tx) = be.net_stats()?;
    t.device_rx_packets = dev_rx;
    t.device_tx_packets = dev_tx;
    println!(
        "    {} frames sent ({} bytes), {} received back ({} bytes); net0 counted {dev_rx} in, {dev_tx} out",
        t.packets_sent, t.bytes_sent, t.packets_received, t.bytes_received
    );
    println!(
        "    {} frames copied by sva0 (COPY_CRC, one batch of {PER_ROUND} per round);\n      {} CRC-32C \
         values equal the driver's own, every copy byte-identical",
        t.frames_copied, t.crcs_verified
    );
    let net_s = t.net_time.as_secs_f64().max(1e-9);
    let acc_s = t.accel_time.as_secs_f64().max(1e-9);
    println!(
        "    throughput: net0 round trip {:.0} kframes/s ({:.2} Gbit/s of frames each way); \
         sva0 copy+CRC {:.0} MB/s",
        t.packets_received as f64 / net_s / 1e3,
        t.bytes_received as f64 * 8.0 / net_s / 1e9,
        t.accel_bytes as f64 / acc_s / 1e6
    );
    println!(
        "      (one queue pair, {PER_ROUND}-frame rounds, one accelerator worker: a demonstration, \
         not a benchmark)"
    );

    step(5, "an I/O page fault, answered by mapping memory lazily");
    lazy_faults(t, &mem, &memfd, ioas, &accel, &mut faults)?;

    step(
        6,
        "unmap while both devices write: no access after it returns",
    );
    #[cfg(feature = "fault-injection")]
    let mut before_unmap = late_write_hook(be)?;
    #[cfg(not(feature = "fault-injection"))]
    let mut before_unmap = || Ok(());
    unmap_step(t, &mem, &mut net, &accel, ioas, &mut before_unmap)?;

    step(7, "tear down");
    accel
        .with_service(|s| s.detach(NET, None))
        .ok_or("no service session")?
        .map_err(ctx("detaching net0"))?;
    drop(net);
    drop(accel);
    println!(
        "    {NET} detached and its vhost-user connection closed; the accelerator client and \
         its session closed\n      (the service detaches and destroys what a closed session owned)"
    );
    Ok(())
}

fn traffic(t: &mut Tally, mem: &Arc<Memory>, net: &mut NetFrontend, accel: &Accel) -> Res<()> {
    let total = ROUNDS * PER_ROUND;
    let mut progress = Progress::new("frames", total);
    let mut batch = accel.batch(PER_ROUND).map_err(ctx("sva0 batch"))?;
    let mut seq: u32 = 0;
    for round in 0..ROUNDS {
        // Receive buffers first, then the frames.
        for j in 0..PER_ROUND {
            NetFrontend::add(&mut net.rx, iova(RX_BUF_OFF + j * SLOT), SLOT as u32, true)?;
        }
        net.rx.kick()?;
        let mut sent = Vec::with_capacity(PER_ROUND);
        for j in 0..PER_ROUND {
            t.bytes_sent += offer_frame(mem, net, j, seq)? as u64;
            sent.push(seq);
            seq += 1;
        }
        let t0 = Instant::now();
        net.tx.kick()?;
        let want = net.tx.seen.wrapping_add(PER_ROUND as u16);
        net.tx
            .wait_used(want, WAIT)
            .map_err(|e| format!("net0 transmit, round {round}: {e}"))?;
        net.tx.seen = want;
        let want = net.rx.seen.wrapping_add(PER_ROUND as u16);
        net.rx
            .wait_used(want, WAIT)
            .map_err(|e| format!("net0 receive, round {round}: {e}"))?;
        t.net_time += t0.elapsed();
        t.packets_sent += PER_ROUND as u64;

        // What came back, where.
        let mut got = Vec::with_capacity(PER_ROUND);
        for k in 0..PER_ROUND {
            let (head, len) = net
                .rx
                .ring
                .used_elem(net.rx.seen.wrapping_add(k as u16))
                .map_err(ctx("used element"))?;
            let slot = head as usize;
            let len = len as usize;
            if slot >= PER_ROUND || !(VNET_HDR_LEN + MIN_FRAME..=SLOT).contains(&len) {
                return Err(format!("net0 returned head {head} with length {len}"));
            }
            let flen = len - VNET_HDR_LEN;
            let data = mem_read(mem, RX_BUF_OFF + slot * SLOT + VNET_HDR_LEN, flen)?;
            let s = seq_of(&data).ok_or("short frame")?;
            if !sent.contains(&s) || data != reflected(s) {
                return Err(format!(
                    "frame in receive buffer {slot} ({flen} bytes) is not a reflection of a frame sent"
                ));
            }
            t.packets_received += 1;
            t.bytes_received += flen as u64;
            got.push((slot, flen, s));
        }
        net.rx.seen = net.rx.seen.wrapping_add(PER_ROUND as u16);

        // sva0 copies each received frame and checksums it: one batch per
        // round, each member asking for its own completion record (RCR) so
        // that its CRC comes back.
        let t0 = Instant::now();
        batch.clear();
        for &(slot, flen, _) in &got {
            let src = iova(RX_BUF_OFF + slot * SLOT + VNET_HDR_LEN);
            let dst = iova(COPY_OFF + slot * SLOT);
            let mut d = ops::copy_crc(dst, src, flen as u32, 0);
            d.flags |= flags::RCR;
            batch.push(d);
        }
        let result = batch
            .submit()
            .and_then(|h| h.wait())
            .map_err(ctx("sva0 batch"))?;
        t.accel_time += t0.elapsed();
        if result.record.code() != status::SUCCESS {
            return Err(format!(
                "sva0 batch completed with status {:#x} ({} members done)",
                result.record.status, result.record.bytes_completed
            ));
        }
        let records = result.members;
        for (cr, &(slot, flen, s)) in records.iter().zip(&got) {
            if cr.code() != status::SUCCESS {
                return Err(format!(
                    "sva0 copy of frame {s} failed with status {:#x} at {:#x}",
                    cr.status, cr.fault_addr
                ));
            }
            t.frames_copied += 1;
            t.accel_bytes += flen as u64;
            let want = reflected(s);
            if cr.crc_val() != crc32c(&want) {
                return Err(format!(
                    "sva0 CRC-32C of frame {s} is {:#010x}, the driver computes {:#010x}",
                    cr.crc_val(),
                    crc32c(&want)
                ));
            }
            if mem_read(mem, COPY_OFF + slot * SLOT, flen)? != want {
                return Err(format!("sva0's copy of frame {s} differs from the frame"));
            }
            t.crcs_verified += 1;
        }
        progress.tick((round + 1) * PER_ROUND);
    }
    progress.finish();
    if t.packets_received != t.packets_sent || t.frames_copied != t.packets_received {
        return Err("frame counts do not match".into());
    }
    Ok(())
}

fn lazy_faults(
    t: &mut Tally,
    mem: &Arc<Memory>,
    memfd: &OwnedFd,
    ioas: u32,
    accel: &Accel,
    faults: &mut FaultChannel,
) -> Res<()> {
    // The last round's frames are still in the receive buffers: gather
    // them, back to back, into the unmapped window.
    let mut jobs = Vec::with_capacity(PER_ROUND);
    let mut cursor = 0usize;
    for slot in 0..PER_ROUND {
        let hdr = mem_read(mem, RX_BUF_OFF + slot * SLOT + VNET_HDR_LEN, MIN_FRAME)?;
        let s = seq_of(&hdr).ok_or("short frame")?;
        let want = reflected(s);
        if cursor + want.len() > LAZY_LEN {
            break;
        }
        let len = want.len();
        jobs.push((slot, cursor, want));
        cursor += len;
    }
    println!(
        "    {} copies with block-on-fault into {:#x} +{} KiB, which nothing maps yet \
         ({LAZY_WINDOW} in flight at a time)",
        jobs.len(),
        iova(LAZY_OFF),
        cursor.div_ceil(KIB)
    );
    let mut lazy = Lazy {
        mapped: BTreeSet::new(),
        batch: FaultBatch::with_capacity(64),
        shown: 0,
    };
    let mut progress = Progress::new("lazy copies", jobs.len());
    let mut done = 0;
    for window in jobs.chunks(LAZY_WINDOW) {
        let mut handles = Vec::with_capacity(window.len());
        for (slot, at, want) in window {
            let mut d = ops::copy_crc(
                iova(LAZY_OFF + at),
                iova(RX_BUF_OFF + slot * SLOT + VNET_HDR_LEN),
                want.len() as u32,
                0,
            );
            d.flags |= flags::BOF;
            match accel.submit(d) {
                Ok(h) => handles.push(Some(h)),
                Err(e) => {
                    forget_all(&mut handles);
                    return Err(format!("sva0 submit: {e}"));
                }
            }
        }
        let r = lazy.serve(t, memfd, ioas, accel, faults, &mut handles);
        let records = match r {
            Ok(r) => r,
            Err(e) => {
                forget_all(&mut handles);
                return Err(e);
            }
        };
        for (cr, (_, at, want)) in records.iter().zip(window) {
            if cr.code() != status::SUCCESS || cr.crc_val() != crc32c(want) {
                return Err(format!(
                    "lazy copy completed with status {:#x}, CRC {:#010x} (driver: {:#010x})",
                    cr.status,
                    cr.crc_val(),
                    crc32c(want)
                ));
            }
            if mem_read(mem, LAZY_OFF + at, want.len())? != *want {
                return Err("a lazily mapped copy differs from its frame".into());
            }
            t.lazy_copies += 1;
        }
        done += window.len();
        progress.tick(done);
    }
    progress.finish();
    println!(
        "    {} fault groups raised and {} answered over the io_uring fault channel\n      (several \
         descriptors may fault on one page); {} chunks of {} KiB mapped on demand",
        t.faults_raised,
        t.faults_answered,
        lazy.mapped.len(),
        FAULT_CHUNK / KIB
    );
    println!(
        "    all {} copies completed; CRC-32C values and bytes match the frames",
        t.lazy_copies
    );
    if t.faults_raised == 0 || t.faults_raised != t.faults_answered {
        return Err("faults raised and answered do not match".into());
    }
    Ok(())
}

/// Descriptors in flight during the lazy-mapping step: below the number of
/// fault groups a device may have outstanding (past it, iommu-core refuses
/// the fault and the descriptor completes with an error).
const LAZY_WINDOW: usize = 16;

fn forget_all(handles: &mut Vec<Option<Handle<'_>>>) {
    // A handle's drop waits for its record; after a failure the record may
    // never come, so let the handles go without waiting.
    for h in handles.drain(..).flatten() {
        std::mem::forget(h);
    }
}

/// The driver's fault handler: map the faulting chunk, answer SUCCESS.
struct Lazy {
    mapped: BTreeSet<u64>,
    batch: FaultBatch,
    shown: usize,
}

impl Lazy {
    /// Answers faults until every handle has its record (bounded).
    fn serve(
        &mut self,
        t: &mut Tally,
        memfd: &OwnedFd,
        ioas: u32,
        accel: &Accel,
        faults: &mut FaultChannel,
        handles: &mut [Option<Handle<'_>>],
    ) -> Res<Vec<CompletionRecord>> {
        let deadline = Instant::now() + WAIT;
        let mut records: Vec<Option<CompletionRecord>> = vec![None; handles.len()];
        let mut left = handles.len();
        let window = iova(LAZY_OFF)..iova(LAZY_OFF + LAZY_LEN);
        while left > 0 {
            if Instant::now() > deadline {
                return Err(format!("{left} lazy copies still waiting after {WAIT:?}"));
            }
            self.batch.clear();
            let n = faults
                .recv(&mut self.batch, Wait::Timeout(Duration::from_millis(2)))
                .map_err(ctx("fault channel"))?;
            if n > 0 {
                let mut answers = Vec::new();
                for r in &self.batch.records {
                    if !window.contains(&r.addr) || r.pasid() != Some(accel.pasid()) {
                        return Err(format!(
                            "unexpected fault at {:#x} (pasid {:?})",
                            r.addr,
                            r.pasid()
                        ));
                    }
                    let chunk = r.addr & !(FAULT_CHUNK as u64 - 1);
                    if self.mapped.insert(chunk) {
                        let off = LAZY_OFF as u64 + (chunk - iova(LAZY_OFF));
                        accel
                            .with_service(|s| {
                                s.ioas_map(
                                    ioas,
                                    memfd.as_fd(),
                                    off,
                                    FAULT_CHUNK as u64,
                                    Some(chunk),
                                    MapPerm::ReadWrite,
                                )
                            })
                            .ok_or("no service session")?
                            .map_err(ctx("lazy IOAS_MAP"))?;
                        if self.shown < 3 {
                            println!(
                                "    fault: {ACCEL} PASID {} {} at {:#x} (group {}) -> driver maps \
                                 {} KiB at {chunk:#x}, answers SUCCESS",
                                accel.pasid(),
                                if r.perm.bits() & FAULT_PERM_WRITE != 0 {
                                    "write"
                                } else {
                                    "read"
                                },
                                r.addr,
                                r.grpid,
                                FAULT_CHUNK / KIB
                            );
                        } else if self.shown == 3 {
                            println!("    ...");
                        }
                        self.shown += 1;
                    }
                    if r.is_last() {
                        t.faults_raised += 1;
                        answers.push(PageResponse::success(r.cookie));
                    }
                }
                faults.respond(&answers).map_err(ctx("page response"))?;
                t.faults_answered += answers.len() as u64;
            }
            for (h, rec) in handles.iter_mut().zip(records.iter_mut()) {
                let Some(cr) = h.as_ref().and_then(|h| h.poll()) else {
                    continue;
                };
                if let Some(h) = h.take() {
                    // Releases the record slot; returns at once.
                    let _ = h.wait();
                }
                *rec = Some(cr);
                left -= 1;
            }
        }
        records
            .into_iter()
            .map(|r| r.ok_or_else(|| "a lazy copy has no record".to_string()))
            .collect()
    }
}

/// sva0's work in the unmap step: batches, each of fills into the frame
/// area (stamped, each with its own record) alternating with longer fills
/// of a scratch buffer of the client's own, which keep sva0 busy (256 MiB
/// in all) but are not checked.
const FILL_BATCHES: usize = 64;
const AREA_FILLS_PER_BATCH: usize = 16;
/// Size of a fill into the frame area: at most what sva0 does in one step,
/// so a fill and its record are made in one access section (a longer one
/// may stop when its unit of work is spent and go on, with its record, in
/// a later section).
const FILL_LEN: usize = 4096;
const SCRATCH_FILL_LEN: usize = 256 * 1024;
const _: () = assert!(FILL_LEN as u64 <= sva_accel::engine::MIN_STEP);
/// Most rounds of frames net0 gets while the unmap is under way (a round: a
/// frame for every receive buffer; the next one once net0 has delivered the
/// last). Bounded, so that a 16-bit used index tells the step's receive
/// completions apart.
const NET_MAX_ROUNDS: usize = 200;
/// First sequence number of the unmap step's frames.
const UNMAP_SEQ: u32 = (ROUNDS * PER_ROUND) as u32;
/// Start of the copy half (sva0's fills) in the frame area.
const FILL_AREA: usize = COPY_OFF - AREA_FRAMES.0;
/// Length of the copy half.
const FILL_AREA_LEN: usize = AREA_FRAMES.1 - FILL_AREA;

const _: () = assert!(NET_MAX_ROUNDS * PER_ROUND < 1 << 16);
// The frames of a round have different lengths: a used element's length
// names the frame written.
const _: () = assert!(PER_ROUND <= MAX_FRAME - MIN_FRAME + 1);
// net0's receive buffers and sva0's fills do not overlap.
const _: () = assert!(RX_BUF_OFF + PER_ROUND * SLOT <= COPY_OFF);
const _: () = assert!(FILL_LEN <= FILL_AREA_LEN && FILL_AREA_LEN % FILL_LEN == 0);

/// Where area fill `k` of batch `batch` goes, as an offset in the frame
/// area: the copy half is covered every few batches, so later fills
/// overwrite earlier ones.
fn fill_at(batch: usize, k: usize) -> usize {
    FILL_AREA + ((batch * AREA_FILLS_PER_BATCH + k) * FILL_LEN) % FILL_AREA_LEN
}

/// The batch member of area fill `k` (members alternate: area, scratch).
fn area_member(k: usize) -> usize {
    2 * k
}

/// What net0 writes into a receive buffer for frame `seq`: the virtio-net
/// header (no offload negotiated, so all zero but `num_buffers` = 1) and the
/// reflected frame.
fn rx_bytes(seq: u32) -> Vec<u8> {
    let mut b = vec![0u8; VNET_HDR_LEN];
    b[10] = 1;
    b.extend_from_slice(&reflected(seq));
    b
}

/// net0's side of the unmap step: rounds of frames into the receive
/// buffers of the frame area, and the receive writes it completed.
struct NetRun {
    /// Receive buffer slot of each descriptor head posted.
    slot_of: Vec<Option<usize>>,
    /// Receive used index when the step began.
    rx_base: u16,
    /// First frame of each round posted.
    rounds: Vec<u32>,
    /// Receive completions read so far, in used order: (slot, frame).
    writes: Vec<(usize, u32)>,
}

impl NetRun {
    fn new(net: &NetFrontend) -> Res<NetRun> {
        Ok(NetRun {
            slot_of: vec![None; usize::from(QUEUE_SIZE)],
            rx_base: net.rx.ring.used_idx().map_err(ctx("used index"))?,
            rounds: Vec::new(),
            writes: Vec::new(),
        })
    }

    /// Receive buffers (and frames) posted in the step.
    fn posted(&self) -> u32 {
        (self.rounds.len() * PER_ROUND) as u32
    }

    /// Receive buffers completed in the step.
    fn used(&self, net: &NetFrontend) -> Res<u32> {
        let idx = net.rx.ring.used_idx().map_err(ctx("used index"))?;
        Ok(u32::from(idx.wrapping_sub(self.rx_base)))
    }

    /// Posts a round, once the last one was delivered: a receive buffer in
    /// every slot, as many frames; kicks both queues.
    fn post_round(&mut self, mem: &Memory, net: &mut NetFrontend, posted: &AtomicU32) -> Res<()> {
        let first = UNMAP_SEQ + self.posted();
        for j in 0..PER_ROUND {
            let head =
                NetFrontend::add(&mut net.rx, iova(RX_BUF_OFF + j * SLOT), SLOT as u32, true)?;
            *self
                .slot_of
                .get_mut(usize::from(head))
                .ok_or("receive head out of range")? = Some(j);
        }
        for j in 0..PER_ROUND {
            offer_frame(mem, net, j, first + j as u32)?;
        }
        net.rx.kick()?;
        net.tx.kick()?;
        self.rounds.push(first);
        posted.store(self.posted(), Ordering::Release);
        Ok(())
    }

    /// The step's `i`-th receive write: (slot, frame).
    fn write_of(&self, net: &NetFrontend, i: u32) -> Res<(usize, u32)> {
        let (head, len) = net
            .rx
            .ring
            .used_elem(self.rx_base.wrapping_add(i as u16))
            .map_err(ctx("used element"))?;
        let slot = usize::try_from(head)
            .ok()
            .and_then(|h| self.slot_of.get(h).copied().flatten())
            .ok_or_else(|| format!("net0 completed receive head {head}, which was not posted"))?;
        let first = self
            .rounds
            .get(i as usize / PER_ROUND)
            .copied()
            .ok_or("a receive completion past the rounds posted")?;
        let flen = (len as usize).saturating_sub(VNET_HDR_LEN);
        let seq = seq_of_len(first, PER_ROUND, flen).ok_or_else(|| {
            format!(
                "net0 completed receive buffer {slot} with length {len}, the length of no \
                     frame of its round"
            )
        })?;
        Ok((slot, seq))
    }

    /// Reads the step's receive writes up to `until`.
    fn read_writes(&mut self, net: &NetFrontend, until: u32) -> Res<()> {
        for i in self.writes.len() as u32..until {
            let w = self.write_of(net, i)?;
            self.writes.push(w);
        }
        Ok(())
    }

    /// The last round was delivered whole: reads its writes (before the
    /// next round reuses the used ring), waits for its transmits.
    fn finish_round(&mut self, net: &mut NetFrontend) -> Res<()> {
        self.read_writes(net, self.posted())?;
        net.rx.seen = net.rx.seen.wrapping_add(PER_ROUND as u16);
        let want = net.tx.seen.wrapping_add(PER_ROUND as u16);
        net.tx.wait_used(want, WAIT)?;
        net.tx.seen = want;
        Ok(())
    }
}

/// The feeding thread, while the unmap is under way: a new round of
/// frames each time net0 has delivered the last one, until the main thread
/// says the unmap returned (bounded).
fn keep_net_busy(
    mem: &Memory,
    net: &mut NetFrontend,
    nr: &mut NetRun,
    posted: &AtomicU32,
    done: &AtomicBool,
) -> Res<()> {
    let deadline = Instant::now() + WAIT;
    while !done.load(Ordering::Acquire) {
        if Instant::now() > deadline {
            return Err(format!("IOAS_UNMAP did not return within {WAIT:?}"));
        }
        if nr.used(net)? == nr.posted() && nr.rounds.len() < NET_MAX_ROUNDS {
            nr.finish_round(net)?;
            nr.post_round(mem, net, posted)?;
        } else {
            net.rx.wait_call(Duration::from_millis(1))?;
        }
    }
    Ok(())
}

/// What the main thread saw of the unmap.
struct Unmapped {
    /// Bytes unmapped, and how long IOAS_UNMAP took.
    bytes: u64,
    took: Duration,
    /// net0's receive buffers posted and completed, and sva0's area fills
    /// completed, just before IOAS_UNMAP was issued.
    net_posted: u32,
    net_done: u32,
    fills_done: usize,
    /// The snapshot taken as soon as IOAS_UNMAP returned (C): net0's
    /// receive completions, and which of sva0's area fills (batch by batch)
    /// had their record.
    rx_at_unmap: u32,
    fills_at_unmap: Vec<[bool; AREA_FILLS_PER_BATCH]>,
}

/// Submits sva0's batches and issues IOAS_UNMAP of the frame area, both
/// once net0 has receive writes in flight (the feeding thread gives it a
/// new round as soon as one is delivered; sva0's 256 MiB of fills last far
/// longer than the unmap), and as soon as it returns reads what the devices
/// have completed. `used` reads net0's receive completions in the step;
/// `before` runs once the batches are submitted.
fn unmap_now<'b, 'c>(
    accel: &Accel,
    ioas: u32,
    used: &dyn Fn() -> Res<u32>,
    posted: &AtomicU32,
    batches: &'b mut [Batch<'c>],
    inflight: &mut Vec<BatchHandle<'b, 'c>>,
    before: &mut dyn FnMut() -> Res<()>,
) -> Res<Unmapped> {
    let (off, len) = AREA_FRAMES;
    let mut batches = Some(batches);
    // Bounded: the feeding thread posts a new round as soon as one is done.
    let deadline = Instant::now() + WAIT;
    let (net_posted, net_done) = loop {
        let p = posted.load(Ordering::Acquire);
        let d = used()?;
        if d < p {
            let Some(b) = batches.take() else {
                break (p, d);
            };
            for b in b.iter_mut() {
                inflight.push(b.submit().map_err(ctx("sva0 batch submit"))?);
            }
            before()?;
            continue;
        }
        if Instant::now() > deadline {
            return Err(format!("net0 had no receive write in flight for {WAIT:?}"));
        }
        std::thread::sleep(Duration::from_micros(20));
    };
    let fills_done = inflight
        .iter()
        .flat_map(|h| (0..AREA_FILLS_PER_BATCH).map(move |k| h.poll_member(area_member(k))))
        .filter(Option::is_some)
        .count();
    let t0 = Instant::now();
    let bytes = accel
        .with_service(|s| s.ioas_unmap(ioas, iova(off), len as u64))
        .ok_or("the accelerator client has no service session")?
        .map_err(ctx("IOAS_UNMAP"))?;
    // At once: the one snapshot of what the devices have completed. sva0
    // runs its fills in order, so the last ones are read first: those that
    // complete after the unmap returned are read the sooner.
    let rx_at_unmap = used()?;
    let mut fills_at_unmap = vec![[false; AREA_FILLS_PER_BATCH]; inflight.len()];
    for (h, seen) in inflight.iter().zip(fills_at_unmap.iter_mut()).rev() {
        for k in (0..AREA_FILLS_PER_BATCH).rev() {
            seen[k] = h.poll_member(area_member(k)).is_some();
        }
    }
    let took = t0.elapsed();
    Ok(Unmapped {
        bytes,
        took,
        net_posted,
        net_done,
        fills_done,
        rx_at_unmap,
        fills_at_unmap,
    })
}

/// Arms a late device write for this run if asked (a build with the
/// `fault-injection` feature, `IOASIS_FAULT_LATE_WRITE=<device>[:<ms>]`):
/// the backend's device makes one write into the frame area that many
/// milliseconds (20 by default) after its access section ended, which the
/// unmap step must catch. Returns what the step runs before it issues the
/// unmap: with a late write armed, a bounded wait until the device has
/// prepared it (a device that has not written into the area yet when the
/// unmap takes effect never gets the chance to).
#[cfg(feature = "fault-injection")]
fn late_write_hook(be: &mut BackendProc) -> Res<impl FnMut() -> Res<()> + '_> {
    let armed = arm_late_write(be)?;
    Ok(move || {
        if !armed {
            return Ok(());
        }
        let deadline = Instant::now() + WAIT;
        while be.request("late-write-claimed")?.trim() != "yes" {
            if Instant::now() > deadline {
                return Err(format!(
                    "the armed device prepared no late write within {WAIT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    })
}

/// Arms the late write `IOASIS_FAULT_LATE_WRITE` asks for, if any.
#[cfg(feature = "fault-injection")]
fn arm_late_write(be: &mut BackendProc) -> Res<bool> {
    let Ok(spec) = std::env::var("IOASIS_FAULT_LATE_WRITE") else {
        return Ok(false);
    };
    let (dev, ms) = match spec.split_once(':') {
        Some((d, ms)) => (
            d,
            ms.parse::<u64>()
                .map_err(|e| format!("IOASIS_FAULT_LATE_WRITE={spec:?}: delay: {e}"))?,
        ),
        None => (spec.as_str(), 20),
    };
    if dev != NET && dev != ACCEL {
        return Err(format!(
            "IOASIS_FAULT_LATE_WRITE={spec:?}: the device is {NET} or {ACCEL}"
        ));
    }
    let answer = be.request(&format!("arm-late-write {dev} {ms}"))?;
    if answer.trim() != "armed" {
        return Err(format!("backend answered {answer:?} to arm-late-write"));
    }
    println!(
        "    FAULT INJECTION: {dev} will write into the frame area {ms} ms after an access \
         section ends"
    );
    Ok(true)
}

fn unmap_step(
    t: &mut Tally,
    mem: &Arc<Memory>,
    net: &mut NetFrontend,
    accel: &Accel,
    ioas: u32,
    before_unmap: &mut dyn FnMut() -> Res<()>,
) -> Res<()> {
    let (off, len) = AREA_FRAMES;
    let area = iova(off)..iova(off + len);
    // The area is cleared, then every device write into it carries a stamp
    // the driver chose (see `stamps`): net0 reflects rounds of frames into
    // the receive buffers (a frame's sequence number lands with it), sva0
    // runs batches of fills over the copy half, each with a pattern of its
    // own.
    mem.fill(off, len, 0)
        .map_err(ctx("clearing the frame area"))?;
    let scratch = accel
        .alloc(SCRATCH_FILL_LEN)
        .map_err(ctx("sva0 scratch buffer"))?;
    let mut batches = Vec::with_capacity(FILL_BATCHES);
    for bi in 0..FILL_BATCHES {
        let mut b = accel
            .batch(2 * AREA_FILLS_PER_BATCH)
            .map_err(ctx("sva0 batch"))?;
        for k in 0..AREA_FILLS_PER_BATCH {
            let mut d = ops::fill(
                iova(off + fill_at(bi, k)),
                fill_stamp(bi, k),
                FILL_LEN as u32,
            );
            d.flags |= flags::RCR;
            b.push(d);
            b.fill(scratch.addr(), !fill_stamp(bi, k), SCRATCH_FILL_LEN as u32);
        }
        batches.push(b);
    }
    let mut nr = NetRun::new(net)?;
    let used_off =
        usize::try_from(net.rx.ring.used_addr() - IOVA_BASE + 2).map_err(ctx("used ring"))?;
    let rx_base = nr.rx_base;
    // net0's receive completions in the step, read through the driver's
    // memory (the feeding thread holds the rings).
    let used = || -> Res<u32> {
        fence(Ordering::SeqCst);
        let mut b = [0u8; 2];
        mem.read_at(used_off, &mut b)
            .map_err(ctx("reading the used index"))?;
        Ok(u32::from(u16::from_le_bytes(b).wrapping_sub(rx_base)))
    };
    // Both devices write while the unmap is under way: a feeding thread
    // gives net0 a new round of frames each time it has delivered one,
    // until IOAS_UNMAP has returned, and sva0 gets 256 MiB of fills, which
    // last far longer than the unmap, submitted just before it is issued.
    let posted = AtomicU32::new(0);
    let done = AtomicBool::new(false);
    nr.post_round(mem, net, &posted)?;
    let mut inflight = Vec::with_capacity(FILL_BATCHES);
    let (fed, un) = std::thread::scope(|sc| {
        let (posted, done) = (&posted, &done);
        let (net, nr) = (&mut *net, &mut nr);
        let feeder = sc.spawn(move || keep_net_busy(mem, net, nr, posted, done));
        let un = unmap_now(
            accel,
            ioas,
            &used,
            posted,
            &mut batches,
            &mut inflight,
            before_unmap,
        );
        done.store(true, Ordering::Release);
        let fed = feeder
            .join()
            .unwrap_or_else(|_| Err("the feeding thread panicked".into()));
        (fed, un)
    });
    fed?;
    let un = un?;
    t.net_in_flight = u64::from(un.net_posted - un.net_done);
    t.sva_in_flight = (FILL_BATCHES * AREA_FILLS_PER_BATCH - un.fills_done) as u64;
    println!(
        "    {NET} reflecting rounds of {PER_ROUND} frames into {:#x} +512 KiB (a new round each \
         time it\n      delivered one, until the unmap returned: {} frames) and {ACCEL} running \
         {FILL_BATCHES} batches\n      of {AREA_FILLS_PER_BATCH} fills of 4 KiB into {:#x} +512 KiB \
         (among 256 MiB of fills of its own);\n      every write is stamped (a frame carries its \
         sequence number; each fill has a pattern of its own)",
        iova(RX_BUF_OFF),
        nr.posted(),
        iova(COPY_OFF)
    );
    println!(
        "    IOAS_UNMAP {:#x} +{} KiB issued with {} {NET} and {} {ACCEL} writes in flight;\n      \
         it returned after {} us ({} bytes; it waits for device threads inside an access \
         section)\n      and the driver read at once which writes the devices had completed",
        iova(off),
        len / KIB,
        t.net_in_flight,
        t.sva_in_flight,
        un.took.as_micros(),
        un.bytes
    );

    // Until all work has ended: sva0's batches...
    let mut results = Vec::with_capacity(FILL_BATCHES);
    for h in inflight {
        results.push(h.wait().map_err(ctx("sva0 batch"))?);
    }
    // ... net0's transmits (they read mapped memory and complete) and
    // receives (they stop at the first buffer net0 can no longer
    // translate).
    let want = net.tx.seen.wrapping_add(PER_ROUND as u16);
    net.tx.wait_used(want, WAIT)?;
    net.tx.seen = want;
    let round_start = nr.posted() - PER_ROUND as u32;
    let mut miss = None;
    let mut used = nr.used(net)?;
    // Bounded: 20 waits of at most 500 ms.
    for _ in 0..20 {
        if used == nr.posted() {
            break;
        }
        match net.wait_miss(Duration::from_millis(500)) {
            Ok(m) if m.typ == VHOST_IOTLB_MISS && area.contains(&m.iova) => {
                miss = Some(m);
                used = nr.used(net)?;
                break;
            }
            Ok(m) => {
                return Err(format!(
                    "net0 sent IOTLB message type {} for {:#x}",
                    m.typ, m.iova
                ))
            }
            Err(_) => used = nr.used(net)?,
        }
    }
    if used != nr.posted() && miss.is_none() {
        return Err(format!(
            "net0 delivered {} of the last {PER_ROUND} frames and reported no miss",
            used - round_start
        ));
    }
    net.rx.seen = net.rx.seen.wrapping_add((used - round_start) as u16);

    // The writes of C, replayed over the cleared area. A write completed
    // after the snapshot is a late one already.
    if used != un.rx_at_unmap {
        return Err(format!(
            "a device wrote into the frame area after IOAS_UNMAP returned: {NET} completed {} \
             receive buffers there after it returned",
            used.wrapping_sub(un.rx_at_unmap)
        ));
    }
    nr.read_writes(net, used)?;
    let mut ledger = Ledger::new(len);
    for &(slot, seq) in &nr.writes {
        ledger.write(RX_BUF_OFF - off + slot * SLOT, &rx_bytes(seq))?;
    }
    let (mut fills_before, mut stopped) = (0u64, 0u64);
    for (bi, (r, seen)) in results.iter().zip(&un.fills_at_unmap).enumerate() {
        for (m, cr) in r.members.iter().enumerate() {
            if m % 2 == 1 {
                // A scratch fill: it succeeded (no record) or the batch
                // result is wrong.
                if cr.status != 0 {
                    return Err(format!(
                        "sva0 scratch fill {bi}.{m} completed with status {:#x}",
                        cr.status
                    ));
                }
                continue;
            }
            let k = m / 2;
            let written = match cr.code() {
                status::SUCCESS => FILL_LEN,
                status::PAGE_FAULT_NOBOF if area.contains(&cr.fault_addr) => {
                    stopped += 1;
                    cr.bytes_completed as usize
                }
                c => {
                    return Err(format!(
                        "sva0 fill {bi}.{k} completed with status {c:#x} at {:#x}",
                        cr.fault_addr
                    ))
                }
            };
            if !seen[k] {
                if written > 0 {
                    return Err(format!(
                        "a device wrote into the frame area after IOAS_UNMAP returned: {ACCEL} \
                         completed fill {bi}.{k} ({written} bytes) after it returned"
                    ));
                }
                continue;
            }
            if written == FILL_LEN {
                fills_before += 1;
            }
            ledger.fill(fill_at(bi, k), fill_stamp(bi, k), written)?;
        }
    }
    t.writes_stopped = stopped + u64::from(nr.posted() - used);
    println!(
        "    {ACCEL}: {} fills completed before it was issued, {} while it was under way, \
         {stopped} stopped\n      by the unmap (status 0x03)",
        un.fills_done,
        fills_before.saturating_sub(un.fills_done as u64)
    );
    let during = un.rx_at_unmap - un.net_done;
    match miss {
        Some(m) => println!(
            "    {NET}: {} frames delivered before it was issued, {during} while it was under \
             way; the next\n      receive buffer missed (IOTLB miss for {:#x})",
            un.net_done, m.iova
        ),
        None => println!(
            "    {NET}: {} frames delivered before it was issued, {during} while it was under \
             way, all of them",
            un.net_done
        ),
    }

    // Now both devices are idle: each one's next access misses.
    let target = iova(RX_BUF_OFF);
    let used_before = net.tx.ring.used_idx().map_err(ctx("used index"))?;
    NetFrontend::add(
        &mut net.tx,
        target,
        (VNET_HDR_LEN + MIN_FRAME) as u32,
        false,
    )?;
    net.tx.kick()?;
    // The receive queue may have reported misses of the buffers queued
    // behind its first one (a parked queue reports those ahead, so that a
    // frontend answers them back to back): read past them. Bounded: at most
    // two rings' worth of misses, each wait at most WAIT.
    let mut got = None;
    let mut others = Vec::new();
    for _ in 0..2 * QUEUE_SIZE {
        let m = net.wait_miss(WAIT)?;
        if m.typ == VHOST_IOTLB_MISS && m.iova == target && m.perm == VHOST_ACCESS_RO {
            got = Some(m);
            break;
        }
        others.push((m.typ, m.iova, m.perm));
    }
    let m = got.ok_or_else(|| {
        format!(
            "net0 reported no miss for the transmit from unmapped memory (other IOTLB messages: {others:x?})"
        )
    })?;
    let used_after = net.tx.ring.used_idx().map_err(ctx("used index"))?;
    if used_after != used_before {
        return Err("net0 completed a transmit from unmapped memory".into());
    }
    t.invalidations_observed += 1;
    println!(
        "    {NET}: transmit from {target:#x} -> IOTLB miss for {:#x} (read) on the backend \
         request channel;\n      the queue waits, nothing was read",
        m.iova
    );
    let cr = accel
        .run(ops::crc(target + VNET_HDR_LEN as u64, 64, 0))
        .map_err(ctx("sva0 CRC after unmap"))?;
    if cr.code() != status::PAGE_FAULT_NOBOF || !area.contains(&cr.fault_addr) {
        return Err(format!(
            "sva0 CRC of unmapped memory completed with status {:#x} at {:#x}",
            cr.status, cr.fault_addr
        ));
    }
    t.invalidations_observed += 1;
    println!(
        "    {ACCEL}: CRC of {:#x} -> status {:#04x} (page fault, block-on-fault off) at {:#x}, \
         {} bytes done",
        target + VNET_HDR_LEN as u64,
        cr.status,
        cr.fault_addr,
        cr.bytes_completed
    );

    // Last, the area against the replay of C.
    let actual = mem_read(mem, off, len)?;
    if let Some(x) = ledger.compare(&actual) {
        t.late_writes += 1;
        return Err(format!(
            "a device wrote into the frame area after IOAS_UNMAP returned: stamp {} at {:#x} \
             ({} bytes differ from the replay of the {} writes completed when it returned, which \
             left {} there)",
            describe_stamp(&actual, x.at),
            iova(off + x.at),
            x.bytes,
            ledger.writes(),
            describe_stamp(ledger.image(), x.at)
        ));
    }
    t.bytes_checked = len as u64;
    println!(
        "    the frame area holds exactly the {} writes completed when the unmap returned\n      \
         ({} KiB compared with their replay): no device wrote after it returned",
        ledger.writes(),
        len / KIB
    );
    Ok(())
}

/// The stamp found at offset `at` of the frame area image `img`: the frame
/// in that receive buffer, or the fill pattern of that 8-byte word.
fn describe_stamp(img: &[u8], at: usize) -> String {
    let rx = RX_BUF_OFF - AREA_FRAMES.0;
    if (rx..FILL_AREA).contains(&at) {
        let slot = (at - rx) / SLOT;
        let buf = rx + slot * SLOT;
        let b = img.get(buf..buf + SLOT).unwrap_or(&[]);
        if b.iter().all(|&x| x == 0) {
            return format!("nothing (receive buffer {slot} empty)");
        }
        return match b.get(VNET_HDR_LEN..).and_then(seq_of) {
            Some(s) => format!("frame {s} ({NET}, receive buffer {slot})"),
            None => format!("unreadable (receive buffer {slot})"),
        };
    }
    let w = at & !7;
    let Some(word) = img
        .get(w..w + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
    else {
        return "past the area".into();
    };
    match fill_of(word) {
        Some((b, m)) => format!("{word:#018x} ({ACCEL} fill {b}.{m})"),
        None if word == 0 => "nothing".into(),
        None => format!("{word:#018x} (no fill's)"),
    }
}

fn summary(t: &Tally) {
    println!("\nsummary");
    let rows: [(&str, u64); 17] = [
        ("packets sent", t.packets_sent),
        ("packets received", t.packets_received),
        ("bytes sent", t.bytes_sent),
        ("bytes received", t.bytes_received),
        ("net0 rx_packets", t.device_rx_packets),
        ("net0 tx_packets", t.device_tx_packets),
        ("frames copied", t.frames_copied),
        ("crc32c verified", t.crcs_verified),
        ("faults raised", t.faults_raised),
        ("faults answered", t.faults_answered),
        ("lazy copies", t.lazy_copies),
        ("invalidations observed", t.invalidations_observed),
        ("net0 writes in flight at unmap", t.net_in_flight),
        ("sva0 writes in flight at unmap", t.sva_in_flight),
        ("writes stopped by unmap", t.writes_stopped),
        ("late device writes", t.late_writes),
        ("frame area bytes checked", t.bytes_checked),
    ];
    for (k, v) in rows {
        println!("    {k:<32}{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn test_a_length_names_a_frame_of_a_round() {
        for first in [0u32, 1, 10240, 10496, 60000] {
            for j in 0..PER_ROUND as u32 {
                let s = first + j;
                assert_eq!(seq_of_len(first, PER_ROUND, frame_len(s)), Some(s));
            }
            let lens: BTreeSet<usize> = (first..first + PER_ROUND as u32).map(frame_len).collect();
            assert_eq!(lens.len(), PER_ROUND);
            let other = (MIN_FRAME..=MAX_FRAME).find(|l| !lens.contains(l));
            assert_eq!(other.and_then(|l| seq_of_len(first, PER_ROUND, l)), None);
        }
        assert_eq!(seq_of_len(0, PER_ROUND, MIN_FRAME - 1), None);
        assert_eq!(seq_of_len(0, PER_ROUND, MAX_FRAME + 1), None);
    }

    #[test]
    fn test_frames_are_bounded_and_reflect() {
        for s in 0..2000 {
            let f = frame(s);
            assert!((MIN_FRAME..=MAX_FRAME).contains(&f.len()));
            assert_eq!(seq_of(&f), Some(s));
            let r = reflected(s);
            assert_eq!(&r[..6], &NET_MAC);
            assert_eq!(&r[6..12], &PEER_MAC);
            assert_eq!(&r[12..], &f[12..]);
        }
    }
}
