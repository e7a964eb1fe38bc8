//! A sequence-numbered UDP stream for the live-migration tests.
//!
//! `guest-stream send ADDR:PORT PPS STOP_FILE` (host side, in the test's
//! network namespace) sends 64-byte records at about `PPS` per second until
//! `STOP_FILE` exists, then a few end records, and prints how many it sent.
//!
//! `guest-stream recv PORT MAX_RECORDS` (in the guest) keeps every record it
//! receives in one buffer in guest memory and checks each on arrival: the
//! body must be the one its sequence number implies and sequence numbers
//! must grow (UDP may lose records, never repeat or reorder them on one
//! path). At the end record (or after 60 s without any) it checks the whole
//! buffer again against the checksum kept on arrival, so memory that
//! changed while the guest moved is seen, prints a summary and the marker
//! `STREAM_OK` or `STREAM_FAIL`.
//!
//! std only and built static, so the guest's busybox initramfs can run it.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

/// Bytes per record: sequence number (LE) and a body derived from it.
const RECORD: usize = 64;
/// The end record's sequence number.
const END: u64 = u64::MAX;

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

fn valid(r: &[u8]) -> Option<u64> {
    let seq = u64::from_le_bytes(r.get(..8)?.try_into().ok()?);
    (r == record(seq)).then_some(seq)
}

fn fnv(h: u64, data: &[u8]) -> u64 {
    data.iter()
        .fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn send(addr: &str, pps: u64, stop: &str) -> std::io::Result<()> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(addr)?;
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

fn recv(port: u16, max: usize) -> std::io::Result<bool> {
    let s = UdpSocket::bind(("0.0.0.0", port))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    println!("@@IOASIS:RECEIVING@@");
    let mut buf = vec![0u8; max * RECORD];
    let (mut n, mut sum, mut last) = (0usize, 0xcbf2_9ce4_8422_2325u64, None::<u64>);
    let (mut bad, mut backwards, mut dropped_full) = (0u64, 0u64, 0u64);
    let mut pkt = [0u8; 2048];
    let mut idle = Instant::now();
    let mut ended = false;
    while idle.elapsed() < Duration::from_secs(60) {
        let len = match s.recv(&mut pkt) {
            Ok(l) => l,
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
                    buf[n * RECORD..(n + 1) * RECORD].copy_from_slice(r);
                    sum = fnv(sum, r);
                    n += 1;
                } else {
                    dropped_full += 1;
                }
            }
            None => {
                bad += 1;
                if bad <= 5 {
                    println!(
                        "malformed record of {len} bytes: {:02x?}",
                        &r[..len.min(16)]
                    );
                }
            }
        }
    }
    // The buffer again, as guest memory holds it now.
    let mut again = 0xcbf2_9ce4_8422_2325u64;
    let mut corrupt = 0u64;
    for r in buf[..n * RECORD].chunks(RECORD) {
        again = fnv(again, r);
        if valid(r).is_none() {
            corrupt += 1;
        }
    }
    let ok = ended && bad == 0 && backwards == 0 && corrupt == 0 && again == sum && n > 0;
    println!(
        "received {n} records, last {last:?}, ended {ended}, malformed {bad}, \
         out of order {backwards}, corrupt in buffer {corrupt}, checksum {} ({dropped_full} over the buffer)",
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
        ["recv", port, max] => match (port.parse(), max.parse()) {
            (Ok(p), Ok(m)) => recv(p, m),
            _ => Ok(false),
        },
        _ => {
            eprintln!("usage: guest-stream send ADDR:PORT PPS STOP_FILE | recv PORT MAX_RECORDS");
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
