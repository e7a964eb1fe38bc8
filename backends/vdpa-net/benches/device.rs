//! Per-packet cost of the device on the framework's queue harness: real
//! split rings in iommu-core memory, every access translated, no socket and
//! no frontend process. Compare with the framework's own queue-layer bench.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ioasis::device::Device;
use ioasis::testing::{Buf, Harness};
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

fn bench_loop_reflect(c: &mut Criterion) {
    let dev = device(PortSpec::Reflect);
    let mut h = Harness::new(&dev, RING).expect("harness");
    let mut w = dev.worker(0).expect("worker");
    let a = Harness::BUFFER_AREA;
    let rx = a + 0x1000;
    h.memory().write_at(a as usize, &frame()).expect("frame");
    let mut g = c.benchmark_group("vdpa-net");
    g.throughput(Throughput::Elements(RING as u64));
    g.bench_function("reflect 64-byte frames both ways, 256 per kick", |b| {
        b.iter(|| {
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
            h.process(&mut *w, 1).expect("process");
        })
    });
    g.finish();
}

criterion_group!(benches, bench_tx_sink, bench_loop_reflect);
criterion_main!(benches);
