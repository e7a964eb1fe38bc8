//! Unit tests of the packet engine on an in-memory split ring that keeps the
//! framework's queue contract (a malformed chain is completed with length 0
//! by `pop` and reported as `BadChain`).

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;

use super::*;
use crate::net::{bit, PortOffloads, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF};
use crate::port::{ReflectPort, SendOutcome, SinkPort};

const MEM: usize = 1 << 20;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

#[derive(Debug, Default, Clone)]
struct MockChain {
    head: u16,
    descs: Vec<(u64, u32, bool)>,
    readable: u64,
    writable: u64,
}

impl ChainInfo for MockChain {
    fn head(&self) -> u16 {
        self.head
    }
    fn readable_len(&self) -> u64 {
        self.readable
    }
    fn writable_len(&self) -> u64 {
        self.writable
    }
}

#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// The driver side and the ring, in one.
struct MockRing {
    mem: Vec<u8>,
    size: u16,
    table: Vec<Desc>,
    avail: VecDeque<u16>,
    used: Vec<(u16, u32)>,
    notifies: usize,
    /// add_used fails once the used list has this many entries.
    fail_used_at: Option<usize>,
    enables: usize,
    /// Whether the driver is asked to kick (last enable/disable call).
    kicks_on: bool,
}

impl MockRing {
    fn new(size: u16) -> MockRing {
        MockRing {
            mem: vec![0u8; MEM],
            size,
            table: vec![
                Desc {
                    addr: 0,
                    len: 0,
                    flags: 0,
                    next: 0
                };
                size as usize
            ],
            avail: VecDeque::new(),
            used: Vec::new(),
            notifies: 0,
            fail_used_at: None,
            enables: 0,
            kicks_on: false,
        }
    }

    /// Makes a chain of (addr, len, writable) available at head `head`,
    /// using descriptors head, head+1, ...
    fn add_chain(&mut self, head: u16, segs: &[(u64, u32, bool)]) {
        for (i, &(addr, len, w)) in segs.iter().enumerate() {
            let idx = (head as usize + i) % self.size as usize;
            let last = i + 1 == segs.len();
            self.table[idx] = Desc {
                addr,
                len,
                flags: if w { VRING_DESC_F_WRITE } else { 0 }
                    | if last { 0 } else { VRING_DESC_F_NEXT },
                next: ((idx + 1) % self.size as usize) as u16,
            };
        }
        self.avail.push_back(head);
    }

    fn bad(&mut self, head: u16) -> QueueError {
        self.used.push((head, 0));
        QueueError::BadChain { queue: 0, head }
    }
}

impl Ring for MockRing {
    type C = MockChain;

    fn pop(&mut self, c: &mut MockChain) -> std::result::Result<bool, QueueError> {
        let Some(head) = self.avail.pop_front() else {
            return Ok(false);
        };
        c.head = head;
        c.descs.clear();
        c.readable = 0;
        c.writable = 0;
        let mut idx = head;
        let mut count = 0;
        loop {
            if idx >= self.size || count >= self.size {
                return Err(self.bad(head));
            }
            count += 1;
            let d = self.table[idx as usize];
            let end = d.addr.checked_add(d.len as u64);
            if end.is_none_or(|e| e > MEM as u64) {
                return Err(self.bad(head));
            }
            let w = d.flags & VRING_DESC_F_WRITE != 0;
            if !w && c.writable > 0 {
                return Err(self.bad(head));
            }
            if w {
                c.writable += d.len as u64;
            } else {
                c.readable += d.len as u64;
            }
            c.descs.push((d.addr, d.len, w));
            if d.flags & VRING_DESC_F_NEXT == 0 {
                break;
            }
            idx = d.next;
        }
        Ok(true)
    }

    fn read(
        &mut self,
        c: &MockChain,
        off: u64,
        buf: &mut [u8],
    ) -> std::result::Result<usize, QueueError> {
        let mut skip = off;
        let mut done = 0;
        for &(a, l, w) in &c.descs {
            if w || done == buf.len() {
                continue;
            }
            if skip >= l as u64 {
                skip -= l as u64;
                continue;
            }
            let n = ((l as u64 - skip) as usize).min(buf.len() - done);
            let s = (a + skip) as usize;
            buf[done..done + n].copy_from_slice(&self.mem[s..s + n]);
            done += n;
            skip = 0;
        }
        Ok(done)
    }

    fn write(
        &mut self,
        c: &MockChain,
        off: u64,
        data: &[u8],
    ) -> std::result::Result<usize, QueueError> {
        let mut skip = off;
        let mut done = 0;
        for &(a, l, w) in &c.descs {
            if !w || done == data.len() {
                continue;
            }
            if skip >= l as u64 {
                skip -= l as u64;
                continue;
            }
            let n = ((l as u64 - skip) as usize).min(data.len() - done);
            let s = (a + skip) as usize;
            self.mem[s..s + n].copy_from_slice(&data[done..done + n]);
            done += n;
            skip = 0;
        }
        Ok(done)
    }

    fn add_used(&mut self, head: u16, len: u32) -> std::result::Result<(), QueueError> {
        assert!(head < self.size);
        if self.fail_used_at == Some(self.used.len()) {
            return Err(QueueError::Ring {
                queue: 0,
                msg: "injected".into(),
            });
        }
        self.used.push((head, len));
        Ok(())
    }

    fn notify(&mut self) -> std::result::Result<(), QueueError> {
        self.notifies += 1;
        Ok(())
    }

    fn enable_notification(&mut self) -> std::result::Result<bool, QueueError> {
        self.enables += 1;
        self.kicks_on = true;
        Ok(!self.avail.is_empty())
    }

    fn disable_notification(&mut self) -> std::result::Result<(), QueueError> {
        self.kicks_on = false;
        Ok(())
    }
}

fn engine(features: u64) -> PairEngine<MockChain> {
    let stats = Arc::new(DeviceStats::new("/test.sock", "test", 1));
    PairEngine::new(
        0,
        "/test.sock",
        stats,
        Features(features),
        RxFilter::new([2, 0, 0, 0, 0, 1]),
    )
}

fn modern() -> u64 {
    bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)
}

/// A frame: 12-byte zero header, dst, src, ethertype, payload of `len - 14`.
fn put_frame(ring: &mut MockRing, addr: u64, len: usize, tag: u8) {
    let a = addr as usize;
    ring.mem[a..a + 12].fill(0);
    ring.mem[a + 12..a + 18].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
    ring.mem[a + 18..a + 24].copy_from_slice(&[2, 0, 0, 0, 0, tag]);
    ring.mem[a + 24..a + 26].copy_from_slice(&[0x08, 0x00]);
    for i in 26..12 + len {
        ring.mem[a + i] = tag;
    }
}

fn assert_each_head_once(used: &[(u16, u32)]) {
    let mut seen = HashMap::new();
    for (h, _) in used {
        *seen.entry(*h).or_insert(0) += 1;
    }
    for (h, n) in seen {
        assert_eq!(n, 1, "head {h} completed {n} times");
    }
}

/// A port that records what it was sent.
#[derive(Debug, Default)]
struct Recorder {
    frames: Vec<Vec<u8>>,
}

impl Port for Recorder {
    fn describe(&self) -> String {
        "recorder".into()
    }
    fn send(&mut self, pkts: &mut [PacketBuf]) -> SendOutcome {
        for p in pkts.iter() {
            self.frames.push(p.as_slice().to_vec());
        }
        SendOutcome {
            sent: pkts.len(),
            ..Default::default()
        }
    }
    fn recv(
        &mut self,
        _max: usize,
        _d: &mut dyn FnMut(&mut [u8]) -> bool,
    ) -> crate::port::Result<usize> {
        Ok(0)
    }
    fn rx_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// A port that offers a fixed list of frames (each with its 12-byte header).
#[derive(Debug, Default)]
struct Feeder {
    frames: VecDeque<Vec<u8>>,
}

impl Port for Feeder {
    fn describe(&self) -> String {
        "feeder".into()
    }
    fn send(&mut self, pkts: &mut [PacketBuf]) -> SendOutcome {
        SendOutcome {
            dropped: pkts.len(),
            ..Default::default()
        }
    }
    fn recv(
        &mut self,
        max: usize,
        d: &mut dyn FnMut(&mut [u8]) -> bool,
    ) -> crate::port::Result<usize> {
        let mut n = 0;
        while n < max {
            let Some(f) = self.frames.front_mut() else {
                break;
            };
            if !d(f) {
                break;
            }
            self.frames.pop_front();
            n += 1;
        }
        Ok(n)
    }
    fn rx_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

fn feed_frame(len: usize, tag: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN + len];
    f[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12].copy_from_slice(&[2, 0, 0, 0, 0, tag]);
    for b in f[VNET_HDR_LEN + 12..].iter_mut() {
        *b = tag;
    }
    f
}

#[test]
fn test_tx_frames_reach_port_and_heads_complete() {
    let mut e = engine(modern());
    let mut ring = MockRing::new(256);
    let mut port = Recorder::default();
    for i in 0..100u16 {
        let addr = 0x1000 * (i as u64 + 1);
        put_frame(&mut ring, addr, 60, i as u8);
        // Header and frame in separate descriptors for odd heads.
        if i % 2 == 0 {
            ring.add_chain(i * 2, &[(addr, 72, false)]);
        } else {
            ring.add_chain(i * 2, &[(addr, 12, false), (addr + 12, 60, false)]);
        }
    }
    assert_eq!(e.tx(&mut ring, &mut port).unwrap(), (100, false));
    assert_eq!(port.frames.len(), 100);
    assert_eq!(port.frames[7].len(), 72);
    assert_eq!(port.frames[7][VNET_HDR_LEN + 6 + 5], 7);
    assert_eq!(ring.used.len(), 100);
    assert_each_head_once(&ring.used);
    let s = e.stats.total();
    assert_eq!((s.rx_packets, s.rx_bytes, s.errors), (100, 6000, 0));
    assert_eq!(ring.notifies, 1, "one notification per pass");
}

#[test]
fn test_tx_pass_is_bounded_and_resumes() {
    let mut e = engine(modern());
    let mut ring = MockRing::new(4096);
    let mut port = SinkPort::default();
    let total = BURST * TX_BURSTS_PER_PASS + 10;
    put_frame(&mut ring, 0x1000, 60, 1);
    for i in 0..total {
        ring.add_chain(i as u16, &[(0x1000, 72, false)]);
    }
    assert_eq!(
        e.tx(&mut ring, &mut port).unwrap(),
        (BURST * TX_BURSTS_PER_PASS, true)
    );
    assert_eq!(e.tx(&mut ring, &mut port).unwrap(), (10, false));
    assert_eq!(ring.used.len(), total);
}

#[test]
fn test_tx_queue_failure_keeps_heads_for_later() {
    let mut e = engine(modern());
    let mut ring = MockRing::new(64);
    let mut port = SinkPort::default();
    put_frame(&mut ring, 0x1000, 60, 1);
    for i in 0..5u16 {
        ring.add_chain(i, &[(0x1000, 72, false)]);
    }
    ring.fail_used_at = Some(2);
    assert!(e.tx(&mut ring, &mut port).is_err());
    assert_eq!(ring.used.len(), 2);
    ring.fail_used_at = None;
    e.tx(&mut ring, &mut port).unwrap();
    assert_eq!(ring.used.len(), 5);
    assert_each_head_once(&ring.used);
}

#[test]
fn test_rx_asks_for_kicks_only_when_out_of_buffers() {
    let mut e = engine(modern());
    let mut rx = MockRing::new(64);
    rx.kicks_on = true;
    for i in 0..4u16 {
        rx.add_chain(i, &[(0x1000 + u64::from(i) * 0x100, 0x100, true)]);
    }
    let mut feeder = Feeder::default();
    feeder.frames.push_back(feed_frame(60, 1));
    let pass = e.rx(&mut rx, &mut feeder).unwrap();
    assert_eq!((pass.moved, pass.blocked), (1, false));
    assert!(
        !rx.kicks_on,
        "buffers left: the driver's refills need no kick"
    );
    for t in 0..4 {
        feeder.frames.push_back(feed_frame(60, t));
    }
    let pass = e.rx(&mut rx, &mut feeder).unwrap();
    assert_eq!((pass.moved, pass.blocked), (3, true));
    assert!(rx.kicks_on, "out of buffers: the next refill must kick");
}

#[test]
fn test_polling_keeps_notifications_suppressed() {
    let mut e = engine(modern());
    let mut ring = MockRing::new(64);
    let mut port = SinkPort::default();
    put_frame(&mut ring, 0x1000, 60, 1);
    ring.add_chain(0, &[(0x1000, 72, false)]);
    e.suppress = true;
    assert_eq!(e.tx(&mut ring, &mut port).unwrap(), (1, false));
    let mut rx = MockRing::new(64);
    let mut feeder = Feeder::default();
    feeder.frames.push_back(feed_frame(60, 1));
    assert!(e.rx(&mut rx, &mut feeder).unwrap().blocked);
    assert_eq!(ring.enables + rx.enables, 0);
    e.suppress = false;
    e.tx(&mut ring, &mut port).unwrap();
    e.rx(&mut rx, &mut feeder).unwrap();
    assert_eq!((ring.enables, rx.enables), (1, 1));
}

#[test]
fn test_tx_legacy_header_is_normalised() {
    let mut e = engine(0);
    let mut ring = MockRing::new(16);
    let mut port = Recorder::default();
    ring.mem[0x1000..0x100a].fill(0);
    ring.mem[0x100a..0x100a + 60].fill(0x77);
    ring.add_chain(0, &[(0x1000, 70, false)]);
    e.tx(&mut ring, &mut port).unwrap();
    assert_eq!(port.frames[0].len(), 72);
    assert_eq!(&port.frames[0][..12], &[0; 12]);
    assert_eq!(port.frames[0][12], 0x77);
}

#[test]
fn test_tx_bad_chains_completed_once_and_counted() {
    let mut e = engine(modern());
    let mut ring = MockRing::new(64);
    let mut port = SinkPort::default();
    put_frame(&mut ring, 0x1000, 60, 1);
    ring.add_chain(0, &[(0x1000, 72, false)]); // good
    ring.add_chain(2, &[(0x1000, 5, false)]); // shorter than the header
    ring.add_chain(4, &[(MEM as u64 - 4, 72, false)]); // out of range
    ring.add_chain(6, &[(0x1000, 72, true)]); // writable on transmit
    ring.add_chain(8, &[(0x1000, 12, true), (0x1000, 60, false)]); // wrong order
    ring.add_chain(10, &[(0x1000, u32::MAX, false)]); // huge
    ring.add_chain(12, &[(0x1000, 0, false), (0x1000, 72, false)]); // zero length is fine
                                                                    // A loop: 20 -> 21 -> 20.
    ring.table[20] = Desc {
        addr: 0x1000,
        len: 72,
        flags: VRING_DESC_F_NEXT,
        next: 21,
    };
    ring.table[21] = Desc {
        addr: 0x1000,
        len: 72,
        flags: VRING_DESC_F_NEXT,
        next: 20,
    };
    ring.avail.push_back(20);
    // Next index out of the table.
    ring.table[30] = Desc {
        addr: 0x1000,
        len: 72,
        flags: VRING_DESC_F_NEXT,
        next: 999,
    };
    ring.avail.push_back(30);
    assert_eq!(e.tx(&mut ring, &mut port).unwrap().0, 2);
    assert_eq!(port.frames(), 2);
    assert_eq!(ring.used.len(), 9);
    assert_each_head_once(&ring.used);
    let s = e.stats.total();
    assert_eq!(s.rx_packets, 2);
    assert_eq!(s.errors, 7);
    // The queue goes on.
    put_frame(&mut ring, 0x2000, 60, 2);
    ring.add_chain(50, &[(0x2000, 72, false)]);
    assert_eq!(e.tx(&mut ring, &mut port).unwrap().0, 1);
}

#[test]
fn test_tx_header_offloads_only_with_csum() {
    // NEEDS_CSUM and TSO4 in the header of a frame.
    let offload_frame = |ring: &mut MockRing| {
        put_frame(ring, 0x3000, 60, 3);
        ring.mem[0x3000] = 1;
        ring.mem[0x3001] = 1;
        ring.add_chain(0, &[(0x3000, 72, false)]);
    };
    // Without CSUM the header means nothing: not read, the port gets zeros.
    let mut e = engine(modern());
    let mut ring = MockRing::new(16);
    let mut port = Recorder::default();
    offload_frame(&mut ring);
    assert_eq!(e.tx(&mut ring, &mut port).unwrap().0, 1);
    assert_eq!(&port.frames[0][..12], &[0; 12]);
    assert_eq!(e.stats.total().errors, 0);
    // With CSUM but not HOST_TSO4, the TSO request is refused and counted.
    let mut e = engine(modern() | bit(net::VIRTIO_NET_F_CSUM));
    let mut ring = MockRing::new(16);
    let mut port = Recorder::default();
    offload_frame(&mut ring);
    assert_eq!(e.tx(&mut ring, &mut port).unwrap().0, 0);
    assert_eq!(ring.used.len(), 1, "the head is still completed");
    assert_eq!(e.stats.total().errors, 1);
}

#[test]
fn test_rx_mergeable_spans_buffers() {
    let mut e = engine(modern());
    let mut ring = MockRing::new(64);
    let mut port = Feeder::default();
    port.frames.push_back(feed_frame(3000, 5));
    for i in 0..4u16 {
        ring.add_chain(i, &[(0x10000 + i as u64 * 0x1000, 1536, true)]);
    }
    let p = e.rx(&mut ring, &mut port).unwrap();
    assert_eq!((p.moved, p.blocked, p.more), (1, false, false));
    assert_eq!(ring.used, vec![(0, 1536), (1, 1476)]);
    let hdr = VnetHdr::read(&ring.mem[0x10000..0x1000c]).unwrap();
    assert_eq!(hdr.num_buffers, 2);
    assert_eq!(&ring.mem[0x1000c..0x10012], &[2, 0, 0, 0, 0, 1]);
    assert_eq!(ring.mem[0x11000 + 1475], 5);
    let s = e.stats.total();
    assert_eq!((s.tx_packets, s.tx_bytes), (1, 3000));
    // The two chains left are held for the next frame, not lost.
    port.frames.push_back(feed_frame(60, 6));
    e.rx(&mut ring, &mut port).unwrap();
    assert_eq!(ring.used[2], (2, 72));
    assert_each_head_once(&ring.used);
}

#[test]
fn test_rx_without_buffers_keeps_frame_and_chains() {
    let mut e = engine(modern());
    let mut ring = MockRing::new(64);
    let mut port = Feeder::default();
    port.frames.push_back(feed_frame(3000, 1));
    ring.add_chain(0, &[(0x10000, 1536, true)]);
    let p = e.rx(&mut ring, &mut port).unwrap();
    assert_eq!((p.moved, p.blocked), (0, true));
    assert!(ring.used.is_empty(), "held, not completed");
    assert_eq!(port.frames.len(), 1);
    ring.add_chain(1, &[(0x11000, 1536, true)]);
    let p = e.rx(&mut ring, &mut port).unwrap();
    assert_eq!((p.moved, p.blocked), (1, false));
    assert_eq!(ring.used, vec![(0, 1536), (1, 1476)]);
}

#[test]
fn test_rx_queue_failure_mid_frame_never_completes_twice() {
    let mut e = engine(modern());
    let mut ring = MockRing::new(64);
    let mut port = Feeder::default();
    port.frames.push_back(feed_frame(3000, 1));
    port.frames.push_back(feed_frame(3000, 2));
    for i in 0..6u16 {
        ring.add_chain(i, &[(0x10000 + i as u64 * 0x1000, 1536, true)]);
    }
    ring.fail_used_at = Some(1);
    assert!(e.rx(&mut ring, &mut port).is_err());
    assert_eq!(ring.used.len(), 1);
    // The queue comes back (a parked queue resumes): go on.
    ring.fail_used_at = None;
    e.rx(&mut ring, &mut port).unwrap();
    assert_each_head_once(&ring.used);
    assert_eq!(ring.used.len() + e.rx_held + ring.avail.len(), 6);
}

/// A port whose receive side has failed.
#[derive(Debug)]
struct Broken;

impl Port for Broken {
    fn describe(&self) -> String {
        "broken".into()
    }
    fn send(&mut self, pkts: &mut [PacketBuf]) -> SendOutcome {
        SendOutcome {
            errors: pkts.len(),
            ..Default::default()
        }
    }
    fn recv(
        &mut self,
        _max: usize,
        _d: &mut dyn FnMut(&mut [u8]) -> bool,
    ) -> crate::port::Result<usize> {
        Err(crate::port::Error::EventFd(
            std::io::Error::from_raw_os_error(libc::EBADFD),
        ))
    }
    fn rx_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

#[test]
fn test_rx_port_failure_stops_watching_and_counts() {
    let mut e = engine(modern());
    let mut ring = MockRing::new(64);
    ring.add_chain(0, &[(0x10000, 1536, true)]);
    let p = e.rx(&mut ring, &mut Broken).unwrap();
    assert!(p.blocked && !p.more);
    assert!(ring.used.is_empty());
    assert_eq!(e.stats.total().errors, 1);
}

#[test]
fn test_rx_non_mergeable_too_small_drops() {
    let mut e = engine(bit(VIRTIO_F_VERSION_1));
    let mut ring = MockRing::new(64);
    let mut port = Feeder::default();
    port.frames.push_back(feed_frame(3000, 1));
    port.frames.push_back(feed_frame(100, 2));
    ring.add_chain(0, &[(0x10000, 1536, true)]);
    ring.add_chain(1, &[(0x11000, 1536, true)]);
    e.rx(&mut ring, &mut port).unwrap();
    assert_eq!(ring.used, vec![(0, 0), (1, 112)]);
    assert_eq!(
        VnetHdr::read(&ring.mem[0x11000..0x1100c])
            .unwrap()
            .num_buffers,
        1
    );
    let s = e.stats.total();
    assert_eq!((s.tx_packets, s.drops), (1, 1));
}

#[test]
fn test_rx_filter_drops_other_unicast() {
    let mut e = engine(modern());
    e.filter.promisc = false;
    let mut ring = MockRing::new(64);
    let mut port = Feeder::default();
    let mut other = feed_frame(60, 1);
    other[VNET_HDR_LEN + 5] = 0x42;
    port.frames.push_back(other);
    port.frames.push_back(feed_frame(60, 2));
    ring.add_chain(0, &[(0x10000, 1536, true)]);
    e.rx(&mut ring, &mut port).unwrap();
    assert_eq!(ring.used.len(), 1);
    assert_eq!(e.stats.total().drops, 1);
}

#[test]
fn test_reflect_round_trip_through_engine() {
    let mut e = engine(modern());
    let mut tx = MockRing::new(64);
    let mut rx = MockRing::new(64);
    let mut port = ReflectPort::new();
    put_frame(&mut tx, 0x1000, 60, 4);
    tx.add_chain(0, &[(0x1000, 72, false)]);
    rx.add_chain(0, &[(0x20000, 2048, true)]);
    e.tx(&mut tx, &mut port).unwrap();
    e.rx(&mut rx, &mut port).unwrap();
    assert_eq!(rx.used, vec![(0, 72)]);
    // dst and src swapped.
    assert_eq!(&rx.mem[0x2000c..0x20012], &[2, 0, 0, 0, 0, 4]);
    assert_eq!(&rx.mem[0x20012..0x20018], &[2, 0, 0, 0, 0, 9]);
}

#[test]
fn test_ctrl_commands_through_ring() {
    let offered = crate::net::device_features(4, PortOffloads::default(), None);
    let mut dev = NetDevice::new([2, 0, 0, 0, 0, 1], 4, PortOffloads::default(), None);
    dev.set_features(offered);
    let net = Mutex::new(dev);
    let mut e = engine(offered);
    let mut ring = MockRing::new(16);
    ring.mem[0x1000..0x1004].copy_from_slice(&[4, 0, 2, 0]); // VQ_PAIRS_SET 2
    ring.add_chain(0, &[(0x1000, 4, false), (0x2000, 1, true)]);
    ring.mem[0x1100..0x1104].copy_from_slice(&[4, 0, 9, 0]); // too many pairs
    ring.add_chain(2, &[(0x1100, 4, false), (0x2001, 1, true)]);
    ring.add_chain(4, &[(0x1100, 4, false)]); // no status byte
    assert_eq!(e.ctrl(&mut ring, &net).unwrap(), 3);
    assert_eq!(ring.mem[0x2000], VIRTIO_NET_OK);
    assert_eq!(ring.mem[0x2001], VIRTIO_NET_ERR);
    assert_eq!(ring.used, vec![(0, 1), (2, 1), (4, 0)]);
    assert_eq!(net.lock().unwrap().active_pairs, 2);
    assert_eq!(e.stats.ctrl.snapshot().errors, 2);
}

/// One segment of a generated chain.
fn seg() -> impl Strategy<Value = (u64, u32, bool)> {
    let addr = prop_oneof![
        8 => 0u64..(MEM as u64 - 0x10000),
        1 => Just(MEM as u64 - 1),
        1 => Just(u64::MAX - 8),
    ];
    let len = prop_oneof![
        8 => 0u32..2048,
        1 => Just(0u32),
        1 => Just(u32::MAX),
        1 => 60000u32..70000,
    ];
    (addr, len, any::<bool>())
}

fn chains() -> impl Strategy<Value = Vec<Vec<(u64, u32, bool)>>> {
    prop::collection::vec(prop::collection::vec(seg(), 1..6), 1..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn prop_tx_every_head_completed_once(cs in chains(), loops in prop::collection::vec((0u16..64, 0u16..64), 0..4)) {
        let mut e = engine(modern());
        let mut ring = MockRing::new(256);
        let mut port = SinkPort::default();
        let mut head = 0u16;
        let mut heads = 0;
        for c in &cs {
            if head as usize + c.len() > 250 { break; }
            ring.add_chain(head, c);
            head += c.len() as u16;
            heads += 1;
        }
        // Loops: a descriptor pointing back into its own chain.
        for (from, to) in loops {
            let d = &mut ring.table[(from % 256) as usize];
            d.flags |= VRING_DESC_F_NEXT;
            d.next = to;
        }
        let _ = e.tx(&mut ring, &mut port);
        prop_assert_eq!(ring.used.len(), heads);
        assert_each_head_once(&ring.used);
        let s = e.stats.total();
        prop_assert_eq!(s.rx_packets + s.errors, heads as u64);
        prop_assert_eq!(port.frames(), s.rx_packets);
    }

    #[test]
    fn prop_rx_heads_completed_at_most_once(cs in chains(), sizes in prop::collection::vec(14usize..9000, 1..30), mrg in any::<bool>()) {
        let f = if mrg { modern() } else { bit(VIRTIO_F_VERSION_1) };
        let mut e = engine(f);
        let mut ring = MockRing::new(256);
        let mut port = Feeder::default();
        for (i, s) in sizes.iter().enumerate() {
            port.frames.push_back(feed_frame(*s, i as u8));
        }
        let mut head = 0u16;
        let mut heads = 0;
        for c in &cs {
            if head as usize + c.len() > 250 { break; }
            ring.add_chain(head, c);
            head += c.len() as u16;
            heads += 1;
        }
        let r = e.rx(&mut ring, &mut port);
        prop_assert!(r.is_ok());
        assert_each_head_once(&ring.used);
        // Every chain is completed, held for the next frame, or still available.
        prop_assert_eq!(ring.used.len() + e.rx_held + ring.avail.len(), heads);
        for (h, len) in &ring.used {
            let _ = h;
            prop_assert!(*len as usize <= 9000 + VNET_HDR_LEN);
        }
        let s = e.stats.total();
        prop_assert_eq!(s.tx_packets + s.drops + port.frames.len() as u64, sizes.len() as u64);
    }
}
