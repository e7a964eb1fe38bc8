//! Per-packet cost of the device on the framework's queue harness: real
//! split rings in iommu-core memory, every access translated, no socket and
//! no frontend process. Compare with the framework's own queue-layer bench.
//!
//! `-- --count-loop` runs a fixed number of `reflect` rounds outside
//! criterion (after a warm-up that fills the port's buffer pool) for
//! `scripts/count-net.sh`, which counts their instructions with callgrind;
//! `-- --count-loop --packed` the same on packed rings.

use criterion::{criterion_group, Criterion, Throughput};
use ioasis::device::{Device, Worker};
use ioasis::testing::{Buf, Harness, PackedDriverRing};
use vdpa_net::net::{bit, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF};
use vdpa_net::port::{PortSpec, TapIo};
use vdpa_net::{NetConfig, PollMode, VhostUserNetBackend};

const RING: u16 = 256;

fn device(port: PortSpec) -> VhostUserNetBackend {
    let cfg = NetConfig {
        socket: "/bench/vh.sock".into(),
        port,
        queues: 1,
        mac: [2, 0, 0, 0, 0, 1],
        poll: PollMode::Off,
        tap_io: TapIo::Syscall,
        worker_cpus: Vec::new(),
    };
    let d = VhostUserNetBackend::new(&cfg).expect("device");
    d.set_features(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF))
        .expect("features");
    d
}

fn frame() -> [u8; 76] {
    let mut f = [0u8; 76];
    f[12..18].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
    f[18..24].copy_from_slice(&[2, 0, 0, 0, 0, 8]);
    f[24..26].copy_from_slice(&[0x08, 0x00]);
    f
}

fn bench_tx_sink(c: &mut Criterion) {
    let dev = device(PortSpec::Sink);
    let mut h = Harness::new(&dev, RING).expect("harness");
    let mut w = dev.worker(0).expect("worker");
    let a = Harness::BUFFER_AREA;
    h.memory().write_at(a as usize, &frame()).expect("frame");
    let mut g = c.benchmark_group("vdpa-net");
    g.throughput(Throughput::Elements(RING as u64));
    g.bench_function("tx 64-byte frames into sink, 256 per kick", |b| {
        b.iter(|| {
            for _ in 0..RING {
                h.ring(1)
                    .add_chain(&[Buf {
                        addr: a,
                        len: 76,
                        writable: false,
                    }])
                    .expect("chain");
            }
            h.ring(1).publish().expect("publish");
            h.process(&mut *w, 1).expect("process");
        })
    });
    g.finish();
}

/// One round of the loop: the driver offers `RING` receive buffers and
/// `RING` 64-byte frames, the device reflects every frame into a buffer.
fn reflect_round(h: &mut Harness, w: &mut dyn Worker) {
    let a = Harness::BUFFER_AREA;
    let rx = a + 0x1000;
    for i in 0..RING {
        let buf = Buf {
            addr: rx + u64::from(i) * 2048,
            len: 2048,
            writable: true,
        };
        h.ring(0).add_chain(&[buf]).expect("rx chain");
        h.ring(1)
            .add_chain(&[Buf {
                addr: a,
                len: 76,
                writable: false,
            }])
            .expect("tx chain");
    }
    h.ring(0).publish().expect("publish");
    h.ring(1).publish().expect("publish");
    h.process(w, 1).expect("process");
}

/// [`reflect_round`] on packed rings: the driver first takes back what the
/// device used in the round before.
fn reflect_round_packed(h: &mut Harness, w: &mut dyn Worker) {
    let a = Harness::BUFFER_AREA;
    let rx = a + 0x1000;
    for q in 0..2 {
        let ring: &mut PackedDriverRing = h.packed_ring(q);
        while ring.take_used().expect("used").is_some() {}
    }
    for i in 0..RING {
        let buf = Buf {
            addr: rx + u64::from(i) * 2048,
            len: 2048,
            writable: true,
        };
        h.packed_ring(0).add_chain(&[buf]).expect("rx chain");
        h.packed_ring(1)
            .add_chain(&[Buf {
                addr: a,
                len: 76,
                writable: false,
            }])
            .expect("tx chain");
    }
    h.process(w, 1).expect("process");
}

fn loop_rig() -> (VhostUserNetBackend, Box<dyn Worker>) {
    let dev = device(PortSpec::Reflect);
    let w = dev.worker(0).expect("worker");
    (dev, w)
}

fn bench_loop_reflect(c: &mut Criterion) {
    let (dev, mut w) = loop_rig();
    let mut h = Harness::new(&dev, RING).expect("harness");
    h.memory()
        .write_at(Harness::BUFFER_AREA as usize, &frame())
        .expect("frame");
    let mut g = c.benchmark_group("vdpa-net");
    g.throughput(Throughput::Elements(RING as u64));
    g.bench_function("reflect 64-byte frames both ways, 256 per kick", |b| {
        b.iter(|| reflect_round(&mut h, &mut *w))
    });
    g.finish();
}

/// Rounds `--count-loop` runs after its warm-up.
const COUNT_ROUNDS: usize = 400;

/// The counted rounds (callgrind collects inside this function only).
#[inline(never)]
fn counted_reflect_rounds(
    h: &mut Harness,
    w: &mut dyn Worker,
    round: fn(&mut Harness, &mut dyn Worker),
) {
    for _ in 0..COUNT_ROUNDS {
        round(h, w);
    }
}

/// `--count-loop`: [`COUNT_ROUNDS`] rounds of `RING` frames after 8 rounds
/// of warm-up, and the frames the device counted, which must be all of them;
/// on packed rings with `packed`.
fn count_loop(packed: bool) {
    let (dev, mut w) = loop_rig();
    let (mut h, round): (Harness, fn(&mut Harness, &mut dyn Worker)) = if packed {
        (
            Harness::new_packed(&dev, RING).expect("harness"),
            reflect_round_packed,
        )
    } else {
        (Harness::new(&dev, RING).expect("harness"), reflect_round)
    };
    h.memory()
        .write_at(Harness::BUFFER_AREA as usize, &frame())
        .expect("frame");
    for _ in 0..8 {
        round(&mut h, &mut *w);
    }
    let before = dev.stats().total();
    counted_reflect_rounds(&mut h, &mut *w, round);
    let after = dev.stats().total();
    let frames = (COUNT_ROUNDS * usize::from(RING)) as u64;
    let (rx, tx) = (
        after.rx_packets - before.rx_packets,
        after.tx_packets - before.tx_packets,
    );
    if rx != frames || tx != frames {
        eprintln!("count-loop: {frames} frames offered, device took {rx} and returned {tx}");
        std::process::exit(1);
    }
    println!("count-loop: {frames} frames reflected");
}

criterion_group!(benches, bench_tx_sink, bench_loop_reflect);

fn main() {
    if std::env::args().any(|a| a == "--count-loop") {
        count_loop(std::env::args().any(|a| a == "--packed"));
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
