//! A sequence-numbered UDP stream for the live-migration tests.
//!
//! `guest-stream send ADDR:PORT PPS STOP_FILE` (host side, in the test's
//! network namespace) sends records of [`RECORD`] bytes at about `PPS` per
//! second until `STOP_FILE` exists, then a few end records, and prints how
//! many it sent. Its datagrams carry no UDP checksum (`SO_NO_CHECK`), so
//! the guest's kernel hands a record whose bytes changed after they
//! arrived to the reader as it finds them in memory, instead of dropping
//! it quietly when the reader copies it out (Linux checks a UDP checksum
//! only then).
//!
//! `guest-stream recv PORT MAX_RECORDS` (in the guest) checks each record
//! when it reads it: the body must be the one its sequence number implies
//! and sequence numbers must grow (UDP may lose records, never repeat or
//! reorder them on one path). It keeps the first [`KEPT`] bytes of each in
//! one buffer in guest memory. At the end record (or after 60 s without
//! any) it checks the whole buffer again against the checksum kept on
//! arrival, so memory that changed while the guest moved is seen, prints a
//! summary (with the kernel's UDP checksum error count) and the marker
//! `STREAM_OK` or `STREAM_FAIL`.
//!
//! The receiver also listens on `PORT + 1` for control words: `HOLD` stops
//! reading the stream (marker `HOLDING`) until `RESUME` comes (marker
//! `RESUMED`, then `DRAINED` once the records queued meanwhile are read).
//! While it holds, the records the device wrote stay queued on the socket
//! in the receive buffers the device wrote them to (virtio_net attaches a
//! frame's payload to the socket buffer without copying it), pages no CPU
//! of the guest touches until the reader copies them out.
//! Until `QUIET` comes (marker `QUIET`; during a hold too), a thread of the
//! receiver writes a byte into every page of [`DIRTY_BYTES`] of its own
//! memory every [`DIRTY_EVERY`], so that a migration under way with a small
//! downtime limit cannot converge before then (its last pass would always
//! have more to copy than the limit allows).
//! `guest-stream ctl ADDR:PORT WORD` sends a control word a few times.
//!
//! std and libc only, built static, so the guest's busybox initramfs can
//! run it.

use std::io::ErrorKind;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes per record: sequence number (LE) and a body derived from it. The
/// frame (1442 bytes with the headers) fills a mergeable receive buffer of
/// virtio_net too far for it to build the socket buffer around it, so the
/// payload stays in the device-written buffer as a page fragment.
const RECORD: usize = 1400;
/// Bytes of each record the receiver keeps in its buffer.
const KEPT: usize = 64;
/// The end record's sequence number.
const END: u64 = u64::MAX;
/// Memory the receiver keeps dirty until it holds.
const DIRTY_BYTES: usize = 8 << 20;
/// How often each of its pages is written.
const DIRTY_EVERY: Duration = Duration::from_millis(20);
/// How long a hold may last at most.
const MAX_HOLD: Duration = Duration::from_secs(300);

/// The body record `seq` carries.
fn body(seq: u64, out: &mut [u8]) {
    let mut x = seq ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in out.chunks_mut(8) {
        // xorshift64*: cheap, and every byte depends on the sequence number.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn record(seq: u64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..8].copy_from_slice(&seq.to_le_bytes());
    body(seq, &mut r[8..]);
    r
}

/// The sequence number of `r` if it is the record that number implies.
fn valid(r: &[u8]) -> Option<u64> {
    let seq = u64::from_le_bytes(r.get(..8)?.try_into().ok()?);
    (r.len() <= RECORD && r == &record(seq)[..r.len()]).then_some(seq)
}

fn fnv(h: u64, data: &[u8]) -> u64 {
    data.iter()
        .fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Sends without UDP checksums (`SO_NO_CHECK`).
fn no_checksum(s: &UdpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket this function borrows, with a pointer
    // to a live c_int and its size; the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn send(addr: &str, pps: u64, stop: &str) -> std::io::Result<()> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(addr)?;
    no_checksum(&s)?;
    let start = Instant::now();
    let mut seq = 0u64;
    // Bounded by the stop file and by an hour.
    while !std::path::Path::new(stop).exists() && start.elapsed() < Duration::from_secs(3600) {
        // Records due by now, in bursts of at most 64.
        let due = (start.elapsed().as_micros() as u64).saturating_mul(pps) / 1_000_000;
        for _ in 0..due.saturating_sub(seq).min(64) {
            // A full socket buffer or no route yet: the record is lost,
            // as on a wire.
            let _ = s.send(&record(seq));
            seq += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    for _ in 0..20 {
        let _ = s.send(&record(END));
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("sent {seq}");
    Ok(())
}

fn ctl(addr: &str, word: &str) -> std::io::Result<()> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(addr)?;
    for _ in 0..5 {
        let _ = s.send(word.as_bytes());
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `InCsumErrors` of the kernel's UDP counters (`/proc/net/snmp`).
fn udp_csum_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let names = udp.next()?;
    let values = udp.next()?;
    let i = names.split_whitespace().position(|n| n == "InCsumErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Waits on `ctl` for `RESUME`, at most [`MAX_HOLD`]; whether it came.
/// `QUIET` meanwhile sets `stop_dirty`; other words are ignored.
fn hold(ctl: &UdpSocket, stop_dirty: &AtomicBool) -> std::io::Result<bool> {
    println!("@@IOASIS:HOLDING@@");
    ctl.set_nonblocking(false)?;
    ctl.set_read_timeout(Some(Duration::from_secs(1)))?;
    let start = Instant::now();
    let mut word = [0u8; 16];
    let mut resumed = false;
    while start.elapsed() < MAX_HOLD {
        if let Ok(n) = ctl.recv(&mut word) {
            if &word[..n] == b"RESUME" {
                resumed = true;
                break;
            }
            if &word[..n] == b"QUIET" && !stop_dirty.swap(true, Ordering::Relaxed) {
                println!("@@IOASIS:QUIET@@");
            }
        }
    }
    ctl.set_nonblocking(true)?;
    println!(
        "@@IOASIS:{}@@",
        if resumed { "RESUMED" } else { "HOLD_TIMEOUT" }
    );
    Ok(resumed)
}

/// Writes a byte into each page of [`DIRTY_BYTES`] every [`DIRTY_EVERY`]
/// until `stop` is set.
fn dirty(stop: &AtomicBool) {
    let mut mem = vec![0u8; DIRTY_BYTES];
    let mut v = 0u8;
    while !stop.load(Ordering::Relaxed) {
        v = v.wrapping_add(1);
        for page in mem.chunks_mut(4096) {
            // SAFETY: a write to the first byte of a live, non-empty slice
            // this function owns; volatile so that the compiler keeps
            // stores nobody reads.
            unsafe { std::ptr::write_volatile(page.as_mut_ptr(), v) };
        }
        std::thread::sleep(DIRTY_EVERY);
    }
}

fn recv(port: u16, max: usize) -> std::io::Result<bool> {
    let s = UdpSocket::bind(("0.0.0.0", port))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let ctl_sock = UdpSocket::bind(("0.0.0.0", port + 1))?;
    ctl_sock.set_nonblocking(true)?;
    let csum_before = udp_csum_errors();
    let stop_dirty = Arc::new(AtomicBool::new(false));
    let dirtier = {
        let stop = Arc::clone(&stop_dirty);
        std::thread::spawn(move || dirty(&stop))
    };
    println!("@@IOASIS:RECEIVING@@");
    let mut buf = vec![0u8; max * KEPT];
    let (mut n, mut sum, mut last) = (0usize, 0xcbf2_9ce4_8422_2325u64, None::<u64>);
    let (mut bad, mut backwards, mut dropped_full) = (0u64, 0u64, 0u64);
    let (mut held, mut hold_ok, mut draining) = (false, true, false);
    let mut pkt = [0u8; 2048];
    let mut word = [0u8; 16];
    let mut idle = Instant::now();
    let mut ended = false;
    while idle.elapsed() < Duration::from_secs(60) {
        if !held {
            if let Ok(w) = ctl_sock.recv(&mut word) {
                if &word[..w] == b"HOLD" {
                    held = true;
                    hold_ok = hold(&ctl_sock, &stop_dirty)?;
                    s.set_nonblocking(true)?;
                    draining = true;
                    idle = Instant::now();
                } else if &word[..w] == b"QUIET" && !stop_dirty.swap(true, Ordering::Relaxed) {
                    println!("@@IOASIS:QUIET@@");
                }
            }
        }
        let len = match s.recv(&mut pkt) {
            Ok(l) => l,
            Err(e) if draining && e.kind() == ErrorKind::WouldBlock => {
                println!("@@IOASIS:DRAINED@@");
                draining = false;
                s.set_nonblocking(false)?;
                continue;
            }
            Err(_) => continue,
        };
        idle = Instant::now();
        let r = &pkt[..len];
        match (len == RECORD).then(|| valid(r)).flatten() {
            Some(END) => {
                ended = true;
                break;
            }
            Some(seq) => {
                if last.is_some_and(|l| seq <= l) {
                    backwards += 1;
                    if backwards <= 5 {
                        println!("record {seq} after {last:?}");
                    }
                }
                last = Some(seq);
                if n < max {
                    buf[n * KEPT..(n + 1) * KEPT].copy_from_slice(&r[..KEPT]);
                    sum = fnv(sum, &r[..KEPT]);
                    n += 1;
                } else {
                    dropped_full += 1;
                }
            }
            None => {
                bad += 1;
                if bad <= 5 {
                    let at = r.get(8..).and_then(|b| {
                        let seq = u64::from_le_bytes(r.get(..8)?.try_into().ok()?);
                        let good = record(seq);
                        b.iter().zip(&good[8..]).position(|(x, y)| x != y)
                    });
                    println!(
                        "malformed record of {len} bytes after {last:?}: {:02x?}, \
                         first byte off its body at {at:?}",
                        &r[..len.min(16)]
                    );
                }
            }
        }
    }
    stop_dirty.store(true, Ordering::Relaxed);
    let _ = dirtier.join();
    // The buffer again, as guest memory holds it now.
    let mut again = 0xcbf2_9ce4_8422_2325u64;
    let mut corrupt = 0u64;
    for r in buf[..n * KEPT].chunks(KEPT) {
        again = fnv(again, r);
        if valid(r).is_none() {
            corrupt += 1;
        }
    }
    let csum = match (csum_before, udp_csum_errors()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => 0,
    };
    let ok = ended
        && hold_ok
        && bad == 0
        && backwards == 0
        && corrupt == 0
        && csum == 0
        && again == sum
        && n > 0;
    println!(
        "received {n} records, last {last:?}, ended {ended}, held {held}, malformed {bad}, \
         out of order {backwards}, corrupt in buffer {corrupt}, UDP checksum errors {csum}, \
         checksum {} ({dropped_full} over the buffer)",
        if again == sum { "intact" } else { "CHANGED" }
    );
    println!(
        "@@IOASIS:STREAM_LAST {}@@",
        last.map_or(-1, |l| i64::try_from(l).unwrap_or(-1))
    );
    println!(
        "@@IOASIS:{}@@",
        if ok { "STREAM_OK" } else { "STREAM_FAIL" }
    );
    Ok(ok)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r = match args.iter().map(String::as_str).collect::<Vec<_>>()[1..] {
        ["send", addr, pps, stop] => match pps.parse() {
            Ok(pps) => send(addr, pps, stop).map(|()| true),
            Err(_) => Ok(false),
        },
        ["ctl", addr, word] => ctl(addr, word).map(|()| true),
        ["recv", port, max] => match (port.parse::<u16>(), max.parse()) {
            (Ok(p), Ok(m)) if p < u16::MAX => recv(p, m),
            _ => Ok(false),
        },
        _ => {
            eprintln!(
                "usage: guest-stream send ADDR:PORT PPS STOP_FILE | ctl ADDR:PORT WORD \
                 | recv PORT MAX_RECORDS"
            );
            Ok(false)
        }
    };
    match r {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("guest-stream: {e}");
            std::process::exit(1);
        }
    }
}
