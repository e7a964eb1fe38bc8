//! Tests of the real device on the framework's queues (its test harness
//! plays the driver over iommu-core memory).

use ioasis::device::Device;
use ioasis::testing::{Buf, Harness};

use super::*;
use crate::net::{bit, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF};

const F_NEXT: u16 = 1;

fn device(port: PortSpec) -> VhostUserNetBackend {
    let cfg = NetConfig {
        socket: "/test/vh.sock".into(),
        port,
        queues: 1,
        mac: [2, 0, 0, 0, 0, 1],
        poll: PollMode::Off,
        tap_io: TapIo::Syscall,
        worker_cpus: Vec::new(),
    };
    let d = VhostUserNetBackend::new(&cfg).unwrap();
    d.set_features(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF))
        .unwrap();
    d
}

fn frame_bytes(tag: u8) -> Vec<u8> {
    let mut f = vec![0u8; 72];
    f[12..18].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
    f[18..24].copy_from_slice(&[2, 0, 0, 0, 0, tag]);
    f[24..26].copy_from_slice(&[0x08, 0x00]);
    f
}

fn used(h: &mut Harness, q: u16) -> Vec<(u32, u32)> {
    let n = h.ring(q).used_idx().unwrap();
    (0..n).map(|i| h.ring(q).used_elem(i).unwrap()).collect()
}

#[test]
fn test_sink_on_framework_completes_every_head_once() {
    let dev = device(PortSpec::Sink);
    let mut h = Harness::new(&dev, 64).unwrap();
    let mut w = dev.worker(0).unwrap();
    let a = Harness::BUFFER_AREA;
    h.memory().write_at(a as usize, &frame_bytes(1)).unwrap();
    let good = Buf {
        addr: a,
        len: 72,
        writable: false,
    };
    let tx = h.ring(1);
    tx.add_chain(&[good]).unwrap();
    // Header and frame split, with a zero-length segment between.
    tx.add_chain(&[
        Buf {
            addr: a,
            len: 12,
            writable: false,
        },
        Buf {
            addr: a,
            len: 0,
            writable: false,
        },
        Buf {
            addr: a + 12,
            len: 60,
            writable: false,
        },
    ])
    .unwrap();
    // Shorter than the header.
    tx.add_chain(&[Buf {
        addr: a,
        len: 4,
        writable: false,
    }])
    .unwrap();
    // Writable on a transmit queue.
    tx.add_chain(&[Buf {
        addr: a,
        len: 72,
        writable: true,
    }])
    .unwrap();
    // Writable before readable.
    tx.add_chain(&[
        Buf {
            addr: a,
            len: 12,
            writable: true,
        },
        Buf {
            addr: a,
            len: 60,
            writable: false,
        },
    ])
    .unwrap();
    // A loop: 40 -> 41 -> 40.
    tx.write_desc(40, a, 72, F_NEXT, 41).unwrap();
    tx.write_desc(41, a, 72, F_NEXT, 40).unwrap();
    tx.push_avail(40).unwrap();
    // A next index outside the table.
    tx.write_desc(42, a, 72, F_NEXT, 999).unwrap();
    tx.push_avail(42).unwrap();
    tx.add_chain(&[good]).unwrap();
    tx.publish().unwrap();
    let _ = h.process(&mut *w, 1);
    // Whatever the framework made of each bad chain, the queue goes on.
    h.ring(1).add_chain(&[good]).unwrap();
    h.ring(1).publish().unwrap();
    let _ = h.process(&mut *w, 1);
    let u = used(&mut h, 1);
    let mut heads: Vec<u32> = u.iter().map(|(id, _)| *id).collect();
    heads.sort_unstable();
    let before = heads.len();
    heads.dedup();
    assert_eq!(heads.len(), before, "a head completed twice: {u:?}");
    assert_eq!(u.len(), 9, "{u:?}");
    let s = dev.stats().total();
    assert_eq!(s.rx_packets, 4, "{s:?}");
    assert_eq!(s.errors, 5, "{s:?}");
}

#[test]
fn test_out_of_range_address_on_framework() {
    let dev = device(PortSpec::Sink);
    let mut h = Harness::new(&dev, 64).unwrap();
    let mut w = dev.worker(0).unwrap();
    let a = Harness::BUFFER_AREA;
    h.memory().write_at(a as usize, &frame_bytes(1)).unwrap();
    let far = Harness::MEMORY_SIZE as u64 + 0x10_0000;
    h.ring(1)
        .add_chain(&[Buf {
            addr: far,
            len: 72,
            writable: false,
        }])
        .unwrap();
    h.ring(1)
        .add_chain(&[Buf {
            addr: u64::MAX - 8,
            len: 72,
            writable: false,
        }])
        .unwrap();
    h.ring(1)
        .add_chain(&[Buf {
            addr: a,
            len: 72,
            writable: false,
        }])
        .unwrap();
    h.ring(1).publish().unwrap();
    h.set_memory_table_mode(true);
    // Without an IOMMU every valid address is in the memory table: a
    // buffer outside it (or one whose end overflows) is the driver's
    // error. The framework completes that head with length 0, the
    // device counts it, and the chains behind it are served.
    h.process(&mut *w, 1).unwrap();
    assert_eq!(used(&mut h, 1), vec![(0, 0), (1, 0), (2, 0)]);
    let s = dev.stats().total();
    assert_eq!((s.rx_packets, s.errors), (1, 2));
}

#[test]
fn test_reflect_on_framework_round_trip() {
    let dev = device(PortSpec::Reflect);
    let mut h = Harness::new(&dev, 64).unwrap();
    let mut w = dev.worker(0).unwrap();
    let a = Harness::BUFFER_AREA;
    let rxbuf = a + 0x1000;
    h.memory().write_at(a as usize, &frame_bytes(7)).unwrap();
    h.ring(0)
        .add_chain(&[Buf {
            addr: rxbuf,
            len: 2048,
            writable: true,
        }])
        .unwrap();
    h.ring(0).publish().unwrap();
    h.ring(1)
        .add_chain(&[Buf {
            addr: a,
            len: 72,
            writable: false,
        }])
        .unwrap();
    h.ring(1).publish().unwrap();
    h.process(&mut *w, 1).unwrap();
    assert_eq!(used(&mut h, 1), vec![(0, 0)]);
    assert_eq!(used(&mut h, 0), vec![(0, 72)]);
    let mut got = [0u8; 72];
    h.memory().read_at(rxbuf as usize, &mut got).unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[12..18], &[2, 0, 0, 0, 0, 7]);
    assert_eq!(&got[18..24], &[2, 0, 0, 0, 0, 9]);
    let s = dev.stats().total();
    assert_eq!((s.rx_packets, s.tx_packets, s.errors), (1, 1, 0));
}

#[test]
fn test_config_space_through_device_trait() {
    let dev = device(PortSpec::Sink);
    let mut c = [0u8; 12];
    dev.read_config(0, &mut c).unwrap();
    assert_eq!(&c[..6], &[2, 0, 0, 0, 0, 1]);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), net::VIRTIO_NET_S_LINK_UP);
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1);
    assert_eq!(dev.num_queues(), 3);
    assert_eq!(dev.queues_per_thread(), vec![0b111]);
    assert_eq!(dev.device_type(), VIRTIO_ID_NET);
    assert_eq!(
        dev.features() & bit(net::VIRTIO_NET_F_CSUM),
        0,
        "a sink takes no offloads"
    );
}
