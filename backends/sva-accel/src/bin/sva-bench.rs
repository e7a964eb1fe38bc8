//! `sva-bench`: memmove bandwidth next to single-core memcpy, and
//! descriptor rates with and without batching, in one run.
//!
//! ```text
//! sva-bench [--socket-path PATH] [--workers N] [--ms MILLISECONDS] [--batch N]
//!           [--size BYTES] [--descs-only]
//! ```
//!
//! `--size` measures memmove at that one size only, `--descs-only` only the
//! descriptor rates (for profiling).
//!
//! The client connects as every client does: its PASID is bound through
//! the `/dev/iommu` service and every access is translated by iommu-core
//! (with an external daemon, its service socket is `PATH.iommu`).
//!
//! Without `--socket-path` the device runs inside this process (its worker
//! threads poll as in the daemon) and the client talks to it over a unix
//! socket exactly as a separate process would. Each figure is the median of
//! three runs of `--ms` milliseconds (default 300).

use clap::builder::RangedU64ValueParser;
use clap::Parser;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use sva_accel::client::{ops, Client, Handle};
use sva_accel::desc::status;
use sva_accel::device::{Accelerator, DeviceConfig};

const SIZES: [(usize, &str); 5] = [
    (64, "64 B"),
    (4096, "4 KiB"),
    (65536, "64 KiB"),
    (1 << 20, "1 MiB"),
    (64 << 20, "64 MiB"),
];

/// The benchmark's arguments.
#[derive(Debug, Parser)]
#[command(
    name = "sva-bench",
    bin_name = "sva-bench",
    version,
    about = "memmove bandwidth next to memcpy, and descriptor rates with and without batching.",
    after_help = "Without --socket-path the device runs in this process. Each figure is the median of\n\
                  three runs.",
    args_override_self = true
)]
struct Args {
    /// Socket of a running sva-accel daemon [default: a device in this process]
    #[arg(long = "socket-path", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Worker threads of the device in this process
    #[arg(long, value_name = "N", default_value_t = 1)]
    workers: usize,
    /// Length of each run in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 300)]
    ms: u64,
    /// Descriptors per batch
    #[arg(long, value_name = "N", default_value_t = 256)]
    batch: usize,
    /// memmove at this one size only (bytes, at most 64 MiB)
    #[arg(long, value_name = "BYTES",
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=SIZES[SIZES.len() - 1].0 as u64))]
    size: Option<usize>,
    /// Only the descriptor rates (for profiling)
    #[arg(long)]
    descs_only: bool,
    /// Accepted for old command lines: iommu-core translation is the only path
    #[arg(long, hide = true)]
    iommu: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `f` (which does `n` units of work per call) for `ms`; returns units/s.
fn rate(ms: u64, mut f: impl FnMut() -> u64) -> f64 {
    let d = Duration::from_millis(ms);
    let start = Instant::now();
    let mut units = 0u64;
    while start.elapsed() < d {
        units += f();
    }
    units as f64 / start.elapsed().as_secs_f64()
}

fn memcpy_gbs(src: *const u8, dst: *mut u8, size: usize, ms: u64) -> f64 {
    let reps = ((1 << 20) / size).max(1) as u64;
    let r = rate(ms, || {
        for _ in 0..reps {
            // SAFETY: src and dst are distinct live buffers of at least
            // `size` bytes owned by the caller.
            unsafe { std::ptr::copy_nonoverlapping(src, dst, size) };
            std::hint::black_box(dst);
        }
        reps * size as u64
    });
    r / 1e9
}

/// Keeps up to `depth` memmoves of `size` in flight; returns bytes/s.
fn sva_gbs(
    c: &Client,
    src: u64,
    dst: u64,
    size: usize,
    ms: u64,
    depth: usize,
) -> Result<f64, String> {
    let mut q: VecDeque<Handle<'_>> = VecDeque::new();
    let mut err = None;
    let r = rate(ms, || {
        let mut n = 0;
        while q.len() < depth {
            match c.submit(ops::mem_move(dst, src, size as u32)) {
                Ok(h) => q.push_back(h),
                Err(e) => {
                    err = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(h) = q.pop_front() {
            match h.wait() {
                Ok(cr) if cr.status == status::SUCCESS => n += size as u64,
                Ok(cr) => err = Some(format!("status {:#x}", cr.status)),
                Err(e) => err = Some(e.to_string()),
            }
        }
        n
    });
    for h in q {
        let _ = h.wait();
    }
    match err {
        Some(e) => Err(e),
        None => Ok(r / 1e9),
    }
}

fn descs_unbatched(c: &Client, src: u64, dst: u64, ms: u64) -> f64 {
    let mut q: VecDeque<Handle<'_>> = VecDeque::new();
    let r = rate(ms, || {
        let mut n = 0;
        while q.len() < 64 {
            match c.submit(ops::mem_move(dst + 64 * q.len() as u64, src, 64)) {
                Ok(h) => q.push_back(h),
                Err(_) => break,
            }
        }
        for _ in 0..32 {
            if let Some(h) = q.pop_front() {
                if h.wait().is_ok() {
                    n += 1;
                }
            }
        }
        n
    });
    for h in q {
        let _ = h.wait();
    }
    r
}

fn descs_batched(c: &Client, src: u64, dst: u64, ms: u64, per: usize) -> Result<f64, String> {
    let build = || -> Result<_, String> {
        let mut b = c.batch(per).map_err(|e| e.to_string())?;
        for i in 0..per {
            b.mem_move(dst + 64 * (i as u64 % 1024), src + 64 * (i as u64 % 64), 64);
        }
        Ok(b)
    };
    let (mut b0, mut b1) = (build()?, build()?);
    let check = |r: Result<sva_accel::client::BatchResult, sva_accel::client::ClientError>| match r
    {
        Ok(r) if r.record.status == status::SUCCESS => Ok(per as u64),
        Ok(r) => Err(format!("batch status {:#x}", r.record.status)),
        Err(e) => Err(e.to_string()),
    };
    // Two batches in flight: each is resubmitted as soon as it completes,
    // while the other one executes.
    let d = Duration::from_millis(ms);
    let start = Instant::now();
    let mut n = 0u64;
    let mut h0 = b0.submit().map_err(|e| e.to_string())?;
    let mut h1 = b1.submit().map_err(|e| e.to_string())?;
    loop {
        n += check(h0.wait())?;
        if start.elapsed() >= d {
            n += check(h1.wait())?;
            break;
        }
        h0 = b0.submit().map_err(|e| e.to_string())?;
        n += check(h1.wait())?;
        h1 = b1.submit().map_err(|e| e.to_string())?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The engine alone on one thread (no portal, no client): batch members per
/// second over a real address space, the ceiling one worker can reach.
fn engine_only(ms: u64, per: usize) -> Result<f64, String> {
    use sva_accel::desc::{flags, opcode, Descriptor};
    use sva_accel::engine::{execute, Job, Limits, Outcome, Resume};
    use sva_accel::space::AddressSpace;
    let fd = sva_accel::shm::memfd("engine-bench", 1 << 20).map_err(|e| e.to_string())?;
    sva_accel::shm::add_seals(std::os::fd::AsFd::as_fd(&fd), libc::F_SEAL_SHRINK)
        .map_err(|e| e.to_string())?;
    let space = AddressSpace::default();
    let base = 0x10_0000u64;
    space
        .map(&fd, base, 1 << 20, 0, true)
        .map_err(|e| e.to_string())?;
    let list = base;
    for i in 0..per {
        let mut m = ops::mem_move(
            base + 0x8_0000 + 64 * (i as u64 % 1024),
            base + 0x4_0000 + 64 * (i as u64 % 64),
            64,
        );
        m.flags |= flags::CRAV;
        m.completion_addr = base + 0xc_0000 + 32 * i as u64;
        sva_accel::engine::write_bytes(&space.view(), list + 64 * i as u64, &m.to_bytes())
            .map_err(|_| "list write".to_string())?;
    }
    let mut b = Descriptor::new(opcode::BATCH, 0);
    b.src = list;
    b.xfer_size = per as u32;
    let limits = Limits::default();
    let mut err = None;
    let r = rate(ms, || {
        let view = space.view();
        let mut job = Job::new(b);
        match execute(&mut job, &view, &limits, Resume::Start, &mut |_| {}) {
            Outcome::Complete(cr) if cr.status == status::SUCCESS => per as u64,
            other => {
                err = Some(format!("{other:?}"));
                0
            }
        }
    });
    match err {
        Some(e) => Err(e),
        None => Ok(r),
    }
}

fn run(a: &Args) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("sva-bench-{}", std::process::id()));
    let mut _dev = None;
    let mut _svc = None;
    let (path, iommu_path) = match &a.socket {
        Some(p) => {
            let mut i = p.clone().into_os_string();
            i.push(".iommu");
            (p.clone(), PathBuf::from(i))
        }
        None => {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let p = dir.join("sva.sock");
            let ip = dir.join("sva.sock.iommu");
            let (binding, svc) =
                sva_accel::device::serve_iommu(&ip, sva_accel::device::DEFAULT_LABEL)
                    .map_err(|e| e.to_string())?;
            _svc = Some(svc);
            let mut d = Accelerator::start_with(
                DeviceConfig {
                    workers: a.workers,
                    ..DeviceConfig::default()
                },
                binding,
            )
            .map_err(|e| e.to_string())?;
            d.listen(&p).map_err(|e| e.to_string())?;
            _dev = Some(d);
            (p, ip)
        }
    };
    let c = Client::connect_iommu(
        &path,
        &iommu_path,
        sva_accel::device::DEFAULT_LABEL,
        Default::default(),
    )
    .map_err(|e| e.to_string())?;
    let info = c.info();
    println!(
        "sva-bench: iommu-core translation, {} device, {} worker(s), wq size {}, {:?} queue, {} ms x 3 per figure (median)",
        if a.socket.is_some() {
            "external"
        } else {
            "in-process"
        },
        if a.socket.is_some() {
            "?".to_string()
        } else {
            a.workers.to_string()
        },
        info.wq_size,
        info.wq_mode,
        a.ms
    );
    let max = SIZES[SIZES.len() - 1].0;
    let src = c.alloc(max).map_err(|e| e.to_string())?;
    let dst = c.alloc(max).map_err(|e| e.to_string())?;
    // Touch every page once so neither side measures first-touch faults.
    src.write(0, &vec![0x5au8; max]);
    dst.write(0, &vec![0u8; max]);
    println!(
        "{:>8}  {:>12}  {:>16}  {:>6}",
        "size", "memcpy GB/s", "sva memmove GB/s", "ratio"
    );
    let one = a.size.map(|n| [(n, format!("{n} B"))]);
    let sizes: Vec<(usize, String)> = match one {
        Some(o) => o.to_vec(),
        None if a.descs_only => Vec::new(),
        None => SIZES.iter().map(|(n, s)| (*n, s.to_string())).collect(),
    };
    for (size, name) in sizes {
        let depth = if size >= (1 << 20) { 2 } else { 32 };
        let mc = median(
            (0..3)
                .map(|_| memcpy_gbs(src.as_ptr(), dst.as_ptr(), size, a.ms))
                .collect(),
        );
        let mut sv = Vec::new();
        for _ in 0..3 {
            sv.push(sva_gbs(&c, src.addr(), dst.addr(), size, a.ms, depth)?);
        }
        let sv = median(sv);
        println!("{name:>8}  {mc:>12.2}  {sv:>16.2}  {:>6.2}", sv / mc);
    }
    if a.size.is_some() {
        drop((src, dst, c));
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    let un = median(
        (0..3)
            .map(|_| descs_unbatched(&c, src.addr(), dst.addr(), a.ms))
            .collect(),
    );
    let mut bv = Vec::new();
    for _ in 0..3 {
        bv.push(descs_batched(&c, src.addr(), dst.addr(), a.ms, a.batch)?);
    }
    let b = median(bv);
    println!(
        "64 B memmove descriptors/s: unbatched {:.2} M/s, batched ({} per batch) {:.2} M/s",
        un / 1e6,
        a.batch,
        b / 1e6
    );
    if a.socket.is_none() {
        println!(
            "  (per worker: unbatched {:.2} M/s, batched {:.2} M/s)",
            un / 1e6 / a.workers as f64,
            b / 1e6 / a.workers as f64
        );
    }
    let eo = median(
        (0..3)
            .map(|_| engine_only(a.ms, a.batch))
            .collect::<Result<Vec<_>, _>>()?,
    );
    println!(
        "  engine alone, one thread, batch members: {:.2} M/s",
        eo / 1e6
    );
    let st = c.stats();
    println!(
        "  client: {} descriptors, {} doorbells, {} sleeping waits",
        st.submitted.load(std::sync::atomic::Ordering::Relaxed),
        st.doorbells.load(std::sync::atomic::Ordering::Relaxed),
        st.sleeps.load(std::sync::atomic::Ordering::Relaxed)
    );
    drop(src);
    drop(dst);
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // Help, the version and usage errors exit here (0, 0 and 2).
    let a = Args::parse();
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sva-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
