//! Block benchmark: vdpa-blk against qemu-storage-daemon's vhost-user-blk
//! export, driven by the same load generator of the project's own
//! ([`ioasis_integration::blk_frontend`]: the vhost crate's `Frontend`,
//! one split queue in its own memfd memory), alternating the two servers
//! round by round in one run and comparing medians.
//!
//! Run through `scripts/bench-blk.sh` (it builds in release mode and passes
//! the commit). Each round, for each backing (a raw image file in tmpfs,
//! and each server's null disk: vdpa-blk `null:SIZE`, qemu-storage-daemon
//! `null-co` with `read-zeroes=on`, which measure the vhost-user path
//! alone), each server in turn (the first one alternates by round) is
//! started, one driver connects, and measures 4 KiB random reads and
//! writes at queue depth 1, 32 and 128: IOPS and latency percentiles
//! (p50, p99) over `--secs` after a `--warmup-ms` warm-up. One queue,
//! one request queue on the server; qemu-storage-daemon reads and writes
//! the file with `aio=io_uring` (`--qsd-aio` to change), vdpa-blk runs as
//! users start it plus `--vdpa-arg`s.
//!
//! Every measurement checks itself: every completion is a request in
//! flight (none completed twice or never issued), every status is OK, and
//! at the end completed equals issued; a measurement that fails makes the
//! run fail (exit status 1) and says why. `--check-skew N` (hidden, for
//! showing that) adds N to the issued count before the comparison.
//!
//! The summary gives, per backing, operation and depth, each server's
//! median IOPS with the range over rounds, the ratio of the medians with
//! the range of per-round ratios, and the median p50/p99 latencies; then
//! the targets (file: >= 1.5x qemu-storage-daemon's IOPS at depth
//! 32, p50 latency at depth 1 no worse; null: >= 2x at depth 32), each
//! marked met or MISSED. The output names the commit and the load average
//! at the start and the end.
//!
//! Usage: `ioasis-bench-blk [--rounds N] [--secs S] [--warmup-ms MS]
//! [--depth D]... [--op randread|randwrite]... [--size-mib M] [--dir DIR]
//! [--backing file|null]... [--only qsd|vdpa-blk] [--qsd-aio MODE]
//! [--variant NAME=ARGS]... [--compare-bin PATH [--compare-name NAME]] [--idle-secs S]
//! [--vdpa-arg ARG]... [--always-kick]` (`--always-kick`: kick after every
//! batch even when the device set `VRING_USED_F_NO_NOTIFY`, to tell a
//! device's missed re-check from other stalls).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ioasis_integration::bench_record::{commit, loadavg};
use ioasis_integration::blk_frontend::{queue_size_for, BlkFrontend, Op, RunResult};
use ioasis_integration::blk_server::{
    qsd_bin, vdpa_blk_bin, workspace_has_vdpa_blk, BlkExport, BlkServer, BlkServerKind, Image,
};
use ioasis_integration::env::{heavy_lock, WorkDir};

#[derive(Parser, Debug)]
#[command(
    name = "ioasis-bench-blk",
    about = "vdpa-blk against qemu-storage-daemon, 4 KiB random I/O"
)]
struct Opts {
    /// Rounds (each measures every server once per backing).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds measured per operation and depth.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Warm-up before each measurement, in milliseconds (not measured).
    #[arg(long, default_value_t = 300)]
    warmup_ms: u64,
    /// Queue depths (repeatable; default 1, 32, 128).
    #[arg(long = "depth")]
    depths: Vec<u16>,
    /// Operations (repeatable; default randread and randwrite).
    #[arg(long = "op")]
    ops: Vec<String>,
    /// Disk size in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Directory of the image file (tmpfs).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Backings (repeatable; default file and null).
    #[arg(long = "backing")]
    backings: Vec<String>,
    /// Measure one server only.
    #[arg(long)]
    only: Option<String>,
    /// qemu-storage-daemon's aio mode for the file.
    #[arg(long, default_value = "io_uring")]
    qsd_aio: String,
    /// Extra arguments for vdpa-blk (repeatable).
    #[arg(long = "vdpa-arg", allow_hyphen_values = true)]
    vdpa_args: Vec<String>,
    /// Also measure the workspace's vdpa-blk with these extra arguments, as
    /// server NAME, alternating with the others (`NAME=ARGS`, the
    /// arguments split on spaces; repeatable): e.g. `event=--poll-us 0`
    /// beside the default mode.
    #[arg(long = "variant", value_name = "NAME=ARGS", value_parser = parse_variant)]
    variants: Vec<(String, Vec<String>)>,
    /// Also measure another vdpa-blk binary (an earlier build), alternating
    /// with the others.
    #[arg(long, value_name = "PATH")]
    compare_bin: Option<PathBuf>,
    /// The name of `--compare-bin` in the report.
    #[arg(long, default_value = "before")]
    compare_name: String,
    /// After each server's measurements, keep its frontend connected with
    /// nothing in flight for S seconds and report the server's CPU over
    /// that time (from /proc/PID/stat); the run fails if a vdpa-blk used
    /// 1 % of a CPU or more (0: not measured).
    #[arg(long, default_value_t = 0.0, value_name = "S")]
    idle_secs: f64,
    /// Kick after every batch even when the device asks not to
    /// (`VRING_USED_F_NO_NOTIFY`): a diagnostic for stalls.
    #[arg(long)]
    always_kick: bool,
    /// Test-only: add N to the issued count before the check (must fail).
    #[arg(long, default_value_t = 0, hide = true)]
    check_skew: u64,
}

/// One measurement's figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

type Key = (String, String, u16); // backing, op, depth

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn parse_variant(s: &str) -> Result<(String, Vec<String>), String> {
    let (name, args) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=ARGS"))?;
    if name.is_empty() || name == "qsd" || name == "vdpa-blk" {
        return Err(format!("variant name {name:?}: empty or taken"));
    }
    Ok((
        name.into(),
        args.split_whitespace().map(String::from).collect(),
    ))
}

/// One server of the run: its name in the report, what it is, and the
/// extra arguments it gets (vdpa-blk only).
#[derive(Clone, Debug)]
struct Server {
    name: String,
    kind: BlkServerKind,
    args: Vec<String>,
}

fn parse_op(s: &str) -> Option<Op> {
    match s {
        "randread" => Some(Op::RandRead),
        "randwrite" => Some(Op::RandWrite),
        _ => None,
    }
}

/// Creates the image: `bytes` of non-zero data, so reads touch real pages.
fn create_image(path: &Path, bytes: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

/// Runs every operation and depth against one server; returns the
/// figures, or the first failure.
/// What each server runs: operations, depths, disk size.
struct Plan {
    ops: Vec<Op>,
    depths: Vec<u16>,
    disk_bytes: u64,
}

fn measure_server(
    kind: &BlkServerKind,
    export: &BlkExport,
    opts: &Opts,
    plan: &Plan,
    dir: &Path,
    tag: &str,
) -> Result<ServerRun, String> {
    let (ops, depths, disk_bytes) = (&plan.ops, &plan.depths, plan.disk_bytes);
    let mut server =
        BlkServer::spawn(kind, export, dir, tag).map_err(|e| format!("start {tag}: {e}"))?;
    let max_depth = depths.iter().copied().max().unwrap_or(1);
    let mut fe = BlkFrontend::connect(&export.socket, max_depth, disk_bytes)
        .map_err(|e| format!("{tag}: {e}\n{}", server.log_tail()))?;
    fe.set_always_kick(opts.always_kick);
    let mut out = Vec::new();
    for &op in ops {
        for &depth in depths {
            let mut r = fe
                .run(
                    op,
                    depth,
                    Duration::from_millis(opts.warmup_ms),
                    Duration::from_secs_f64(opts.secs),
                    Duration::from_secs(10),
                )
                .map_err(|e| {
                    format!("{tag} {} qd{depth}: {e}\n{}", op.name(), server.log_tail())
                })?;
            r.issued += opts.check_skew;
            if r.issued != r.completed {
                return Err(format!(
                    "{tag} {} qd{depth}: issued {} requests, completed {}: {} lost",
                    op.name(),
                    r.issued,
                    r.completed,
                    r.issued - r.completed
                ));
            }
            let f = Figures {
                iops: r.iops(),
                p50_us: r.latency_us(50.0),
                p99_us: r.latency_us(99.0),
            };
            out.push((op, depth, f, r));
        }
    }
    let idle = if opts.idle_secs > 0.0 {
        // Polling windows close within a millisecond of the last request.
        std::thread::sleep(Duration::from_millis(500));
        let pid = server.proc_mut().pid();
        let before = cpu_seconds(pid).map_err(|e| format!("{tag}: {e}"))?;
        std::thread::sleep(Duration::from_secs_f64(opts.idle_secs));
        let after = cpu_seconds(pid).map_err(|e| format!("{tag}: {e}"))?;
        Some(100.0 * (after - before) / opts.idle_secs)
    } else {
        None
    };
    drop(fe);
    server
        .check_running("the measurement")
        .map_err(|e| format!("{tag}: {e}"))?;
    server.stop(Duration::from_secs(10));
    Ok(ServerRun { figures: out, idle })
}

/// What one server's measurements gave: the figures of each operation and
/// depth, and its CPU while idle (`--idle-secs`), in per cent of a CPU.
struct ServerRun {
    figures: Vec<(Op, u16, Figures, RunResult)>,
    idle: Option<f64>,
}

/// CPU time (user + system) process `pid` has used, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // The fields after the command name, which is in parentheses and may
    // hold spaces: state is field 3, utime and stime fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("/proc/{pid}/stat: no command name"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64, String> {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v as f64)
            .ok_or_else(|| format!("/proc/{pid}/stat: field {} unreadable", i + 3))
    };
    // SAFETY: sysconf reads a constant of the system; no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok((ticks(11)? + ticks(12)?) / hz)
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    let depths: Vec<u16> = if opts.depths.is_empty() {
        vec![1, 32, 128]
    } else {
        opts.depths.clone()
    };
    let ops: Vec<Op> = if opts.ops.is_empty() {
        vec![Op::RandRead, Op::RandWrite]
    } else {
        let mut v = Vec::new();
        for o in &opts.ops {
            match parse_op(o) {
                Some(op) => v.push(op),
                None => {
                    eprintln!("unknown --op {o} (randread, randwrite)");
                    return ExitCode::from(2);
                }
            }
        }
        v
    };
    let backings: Vec<String> = if opts.backings.is_empty() {
        vec!["file".into(), "null".into()]
    } else {
        opts.backings.clone()
    };
    if let Some(b) = backings.iter().find(|b| *b != "file" && *b != "null") {
        eprintln!("unknown --backing {b} (file, null)");
        return ExitCode::from(2);
    }
    let mut servers: Vec<Server> = Vec::new();
    let server = |name: &str, kind: BlkServerKind, args: Vec<String>| Server {
        name: name.into(),
        kind,
        args,
    };
    if opts.only.as_deref() != Some("vdpa-blk") {
        match qsd_bin() {
            Ok(b) => servers.push(server("qsd", BlkServerKind::Qsd(b), Vec::new())),
            Err(e) => {
                eprintln!("qemu-storage-daemon: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if opts.only.as_deref() != Some("qsd") {
        let wanted = opts.only.as_deref() == Some("vdpa-blk")
            || workspace_has_vdpa_blk()
            || std::env::var_os("IOASIS_VDPA_BLK_BIN").is_some();
        if wanted {
            match vdpa_blk_bin() {
                Ok(b) => {
                    servers.push(server(
                        "vdpa-blk",
                        BlkServerKind::VdpaBlk(b.clone()),
                        opts.vdpa_args.clone(),
                    ));
                    for (name, args) in &opts.variants {
                        let mut all = opts.vdpa_args.clone();
                        all.extend(args.iter().cloned());
                        servers.push(server(name, BlkServerKind::VdpaBlk(b.clone()), all));
                    }
                }
                Err(e) => {
                    eprintln!("vdpa-blk: {e}");
                    return ExitCode::FAILURE;
                }
            }
            if let Some(b) = &opts.compare_bin {
                servers.push(server(
                    &opts.compare_name,
                    BlkServerKind::VdpaBlk(b.clone()),
                    opts.vdpa_args.clone(),
                ));
            }
        } else {
            println!("note: no vdpa-blk in this workspace: measuring qemu-storage-daemon only");
        }
    }
    let load_before = loadavg();
    println!(
        "commit {}; load average at the start {load_before}; {} rounds, {} s per measurement \
         after {} ms warm-up; 4 KiB, one queue; disk {} MiB; servers: {}",
        commit(),
        opts.rounds,
        opts.secs,
        opts.warmup_ms,
        opts.size_mib,
        servers
            .iter()
            .map(|s| if s.args.is_empty() {
                s.name.clone()
            } else {
                format!("{} ({})", s.name, s.args.join(" "))
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _lock = match heavy_lock() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("heavy-test lock: {e}");
            return ExitCode::FAILURE;
        }
    };
    let work = match WorkDir::new("bench-blk") {
        Ok(w) => w,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let disk_bytes = opts.size_mib << 20;
    let plan = Plan {
        ops: ops.clone(),
        depths: depths.clone(),
        disk_bytes,
    };
    let image = opts
        .dir
        .join(format!("ioasis-bench-blk-{}.img", std::process::id()));
    if backings.iter().any(|b| b == "file") {
        if let Err(e) = create_image(&image, disk_bytes) {
            eprintln!("create {}: {e}", image.display());
            return ExitCode::FAILURE;
        }
    }
    let qsize = queue_size_for(depths.iter().copied().max().unwrap_or(1));
    // results[(backing, op, depth)][server] = per-round figures (None: failed)
    let mut results: BTreeMap<Key, BTreeMap<String, Vec<Option<Figures>>>> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    for round in 0..opts.rounds {
        for backing in &backings {
            let mut order = servers.clone();
            let n = order.len().max(1);
            order.rotate_left(round % n);
            for srv in &order {
                let kind = &srv.kind;
                let sock = work.join(&format!("{}-{backing}.sock", srv.name));
                let img = if backing == "file" {
                    Image::File(image.clone())
                } else {
                    Image::Null(disk_bytes)
                };
                let mut export = BlkExport::new(&sock, img).queue_size(qsize);
                export.qsd_aio = opts.qsd_aio.clone();
                export.vdpa_args = srv.args.clone();
                let tag = format!("r{round}-{}-{backing}", srv.name);
                match measure_server(kind, &export, &opts, &plan, work.path(), &tag) {
                    Ok(ServerRun {
                        figures: figs,
                        idle,
                    }) => {
                        if let Some(cpu) = idle {
                            println!(
                                "round {} {backing:4} {:8} idle      : {cpu:.2} % of a CPU over {} s (connected, nothing in flight)",
                                round + 1,
                                srv.name,
                                opts.idle_secs
                            );
                            if srv.name != "qsd" && cpu >= 1.0 {
                                failures.push(format!(
                                    "{tag}: idle, {cpu:.2} % of a CPU (1 % or more)"
                                ));
                            }
                        }
                        for (op, depth, f, r) in figs {
                            println!(
                                "round {} {backing:4} {:8} {:9} qd{depth:<3}: {:>9.0} IOPS, p50 {:>7.1} us, p99 {:>7.1} us (issued {} = completed {})",
                                round + 1,
                                srv.name,
                                op.name(),
                                f.iops,
                                f.p50_us,
                                f.p99_us,
                                r.issued,
                                r.completed
                            );
                            results
                                .entry((backing.clone(), op.name().into(), depth))
                                .or_default()
                                .entry(srv.name.clone())
                                .or_default()
                                .push(Some(f));
                        }
                    }
                    Err(e) => {
                        println!("round {} {backing} {}: FAILED: {e}", round + 1, srv.name);
                        failures.push(e);
                        for &op in &ops {
                            for &depth in &depths {
                                results
                                    .entry((backing.clone(), op.name().into(), depth))
                                    .or_default()
                                    .entry(srv.name.clone())
                                    .or_default()
                                    .push(None);
                            }
                        }
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_file(&image);

    println!("\nsummary (medians over rounds, range in parentheses):");
    let fig = |v: &[Option<Figures>], f: fn(&Figures) -> f64| -> Vec<f64> {
        v.iter().flatten().map(f).collect()
    };
    for ((backing, op, depth), per) in &results {
        let mut line = format!("{backing:4} {op:9} qd{depth:<3}");
        for (name, v) in per {
            let iops = fig(v, |f| f.iops);
            let (lo, hi) = range(&iops);
            line.push_str(&format!(
                " | {name}: {:.0} IOPS ({lo:.0}-{hi:.0}), p50 {:.1} us, p99 {:.1} us",
                median(iops.clone()),
                median(fig(v, |f| f.p50_us)),
                median(fig(v, |f| f.p99_us)),
            ));
        }
        if let Some(q) = per.get("qsd") {
            for (name, v) in per.iter().filter(|(n, _)| *n != "qsd") {
                let (r, lo, hi) = ratio(v, q, |f| f.iops);
                line.push_str(&format!(" | {name}/qsd {r:.2}x ({lo:.2}-{hi:.2})"));
            }
        }
        if let Some(m) = per.get("vdpa-blk") {
            for (name, v) in per.iter().filter(|(n, _)| *n != "qsd" && *n != "vdpa-blk") {
                let (r, lo, hi) = ratio(v, m, |f| f.iops);
                line.push_str(&format!(" | {name}/vdpa-blk {r:.2}x ({lo:.2}-{hi:.2})"));
            }
        }
        println!("{line}");
    }
    if servers.iter().any(|s| s.name == "qsd") && servers.iter().any(|s| s.name == "vdpa-blk") {
        println!(
            "\ntargets (vdpa-blk as started{}):",
            if opts.vdpa_args.is_empty() {
                ", the default mode".to_string()
            } else {
                format!(" with {}", opts.vdpa_args.join(" "))
            }
        );
        for op in ops.iter().map(|o| o.name()) {
            let get = |b: &str, d: u16| results.get(&(b.to_string(), op.to_string(), d));
            if let Some(per) = get("file", 32) {
                target(per, &format!("file {op} qd32 IOPS >= 1.5x"), 1.5, |f| {
                    f.iops
                });
            }
            if let Some(per) = get("file", 1) {
                // Lower is better: compare qsd/vdpa-blk >= 1.
                if let (Some(v), Some(q)) = (per.get("vdpa-blk"), per.get("qsd")) {
                    let (r, lo, hi) = ratio(q, v, |f| f.p50_us);
                    println!(
                        "  file {op} qd1 p50 latency no worse: qsd/vdpa-blk {r:.2}x ({lo:.2}-{hi:.2}): {}",
                        if r >= 1.0 { "met" } else { "MISSED" }
                    );
                }
            }
            if let Some(per) = get("null", 32) {
                target(per, &format!("null {op} qd32 IOPS >= 2x"), 2.0, |f| f.iops);
            }
        }
    }
    let ok = failures.is_empty();
    if !ok {
        println!("\n{} measurements FAILED their checks:", failures.len());
        for f in &failures {
            println!("  {}", f.lines().next().unwrap_or(""));
        }
    }
    println!(
        "\ncommit {}; load average at the start {load_before}, at the end {}; {} (requests \
         issued = completed, every status OK, in every measurement: {})",
        commit(),
        loadavg(),
        if ok { "ok" } else { "FAILED" },
        if ok { "yes" } else { "no" }
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Ratio of medians of `a` over `b`, and the range of per-round ratios.
fn ratio(a: &[Option<Figures>], b: &[Option<Figures>], f: fn(&Figures) -> f64) -> (f64, f64, f64) {
    let ma = median(a.iter().flatten().map(f).collect());
    let mb = median(b.iter().flatten().map(f).collect());
    let per: Vec<f64> = a
        .iter()
        .zip(b)
        .filter_map(|(x, y)| match (x, y) {
            (Some(x), Some(y)) if f(y) > 0.0 => Some(f(x) / f(y)),
            _ => None,
        })
        .collect();
    let (lo, hi) = range(&per);
    (if mb > 0.0 { ma / mb } else { 0.0 }, lo, hi)
}

fn target(
    per: &BTreeMap<String, Vec<Option<Figures>>>,
    what: &str,
    want: f64,
    f: fn(&Figures) -> f64,
) {
    if let (Some(v), Some(q)) = (per.get("vdpa-blk"), per.get("qsd")) {
        let (r, lo, hi) = ratio(v, q, f);
        println!(
            "  {what}: {r:.2}x ({lo:.2}-{hi:.2}): {}",
            if r >= want { "met" } else { "MISSED" }
        );
    }
}
