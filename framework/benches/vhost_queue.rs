//! Data-path benchmark of the queue layer.
//!
//! Prints, in one run (medians of several rounds):
//! - per-chain cost of pop + 64-byte read + 64-byte write + add_used through
//!   iommu-core translation (the `Harness`, no sockets), batches of 256,
//!   popping one chain at a time and in bursts of 32 (`Queue::pop_burst`);
//! - the same chains through the whole vhost-user path: a server, vhost's
//!   `Frontend`, a kick per batch and the call eventfd back;
//! - the same with dirty logging on (a live migration's cost per chain:
//!   the chain walked again and its written bytes and the used ring logged).
//!
//! `cargo bench -p ioasis --bench vhost_queue` (add `-- --quick` for a
//! shorter run, `-- --harness-only` for the queue layer alone).
//!
//! `-- --packed` runs the queue-layer part on packed rings
//! (`VIRTIO_F_RING_PACKED`; 128 chains of two descriptors fill a ring of
//! 256), `-- --one-buffer` gives every chain a single 64-byte writable
//! descriptor which the device fills (a receive queue's shape: what a
//! frontend such as DPDK's virtio_user posts), for either layout. The
//! harness then prints the chains it ran (`chains: N`, what
//! `scripts/count-queue.sh` divides by).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ioasis::device::{Device, DeviceError, Queues, Worker};
use ioasis::queue::Chain;
use ioasis::server::Server;
use ioasis::testing::{Buf, DriverRing, Harness, PackedDriverRing};
use ioasis::vhost_user::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 256;
const LEN: u32 = 64;

/// Echoes every chain's readable bytes into its writable part; `burst`
/// pops with [`ioasis::queue::Queue::pop_burst`]; `one_buffer`: the chains
/// have one writable buffer, filled with 64 bytes ([`FillEchoWorker`]).
struct Echo {
    burst: bool,
    one_buffer: bool,
}

struct EchoWorker {
    chain: Chain,
    chains: Vec<Chain>,
    burst: bool,
    buf: [u8; 64],
}

impl Device for Echo {
    fn device_type(&self) -> u32 {
        0x2a
    }
    fn features(&self) -> u64 {
        0
    }
    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> u16 {
        QSIZE
    }
    fn worker(&self, _thread: usize) -> Result<Box<dyn Worker>, DeviceError> {
        if self.one_buffer {
            return Ok(Box::new(FillEchoWorker {
                chains: vec![Chain::new(); 32],
                buf: [0x5a; 64],
            }));
        }
        Ok(Box::new(EchoWorker {
            chain: Chain::new(),
            chains: vec![Chain::new(); 32],
            burst: self.burst,
            buf: [0; 64],
        }))
    }
}

impl Worker for EchoWorker {
    fn process_queue(&mut self, index: u16, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        let Some(mut q) = queues.get(index) else {
            return Ok(());
        };
        for _ in 0..=q.size() {
            q.disable_notification()?;
            let mut n = 0;
            if self.burst {
                // Bounded: each burst takes at least one chain of the ring.
                for _ in 0..=q.size() {
                    let b = q.pop_burst(&mut self.chains);
                    for c in &self.chains[..b.popped] {
                        let got = q.read(c, 0, &mut self.buf)?;
                        let wrote = q.write(c, 0, &self.buf[..got])?;
                        q.add_used(c.head(), wrote as u32)?;
                    }
                    n += b.popped + b.bad;
                    if let Some(e) = b.error {
                        return Err(e.into());
                    }
                    if b.popped < self.chains.len() {
                        break;
                    }
                }
            } else {
                while q.pop(&mut self.chain)? {
                    let got = q.read(&self.chain, 0, &mut self.buf)?;
                    let wrote = q.write(&self.chain, 0, &self.buf[..got])?;
                    q.add_used(self.chain.head(), wrote as u32)?;
                    n += 1;
                }
            }
            if n > 0 {
                q.notify()?;
            }
            if !q.enable_notification()? {
                break;
            }
        }
        Ok(())
    }
}

/// Fills every chain's writable buffer with 64 bytes, popping in bursts of
/// 32 (a receive queue: one writable buffer per chain).
struct FillEchoWorker {
    chains: Vec<Chain>,
    buf: [u8; 64],
}

impl Worker for FillEchoWorker {
    fn process_queue(&mut self, index: u16, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        let Some(mut q) = queues.get(index) else {
            return Ok(());
        };
        for _ in 0..=q.size() {
            q.disable_notification()?;
            let mut n = 0;
            // Bounded: each burst takes at least one chain of the ring.
            for _ in 0..=q.size() {
                let b = q.pop_burst(&mut self.chains);
                for c in &self.chains[..b.popped] {
                    let wrote = q.write(c, 0, &self.buf)?;
                    q.add_used(c.head(), wrote as u32)?;
                }
                n += b.popped + b.bad;
                if let Some(e) = b.error {
                    return Err(e.into());
                }
                if b.popped < self.chains.len() {
                    break;
                }
            }
            if n > 0 {
                q.notify()?;
            }
            if !q.enable_notification()? {
                break;
            }
        }
        Ok(())
    }
}

/// The chains of one batch: one readable and one writable buffer each, or
/// with `one_buffer` a single writable one.
fn chain_bufs(base: u64, i: u16, one_buffer: bool) -> Vec<Buf> {
    let a = base + u64::from(i) * 0x100;
    if one_buffer {
        return vec![Buf {
            addr: a,
            len: LEN,
            writable: true,
        }];
    }
    vec![
        Buf {
            addr: a,
            len: LEN,
            writable: false,
        },
        Buf {
            addr: a + 0x80,
            len: LEN,
            writable: true,
        },
    ]
}

/// Takes back every used descriptor of a packed ring and makes `n` chains
/// available.
fn fill_packed(ring: &mut PackedDriverRing, base: u64, n: u16, one_buffer: bool) {
    while ring.take_used().expect("used").is_some() {}
    for i in 0..n {
        ring.add_chain(&chain_bufs(base, i, one_buffer))
            .expect("chain");
    }
}

fn fill(ring: &mut DriverRing, base: u64, n: u16) {
    for i in 0..n {
        let a = base + u64::from(i) * 0x100;
        ring.add_chain(&[
            Buf {
                addr: a,
                len: LEN,
                writable: false,
            },
            Buf {
                addr: a + 0x80,
                len: LEN,
                writable: true,
            },
        ])
        .expect("chain");
    }
    ring.publish().expect("publish");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The harness's rings and chains.
#[derive(Clone, Copy)]
struct Shape {
    packed: bool,
    one_buffer: bool,
}

impl Shape {
    /// Chains per batch: a packed ring holds as many descriptors as its
    /// size, a split ring's driver reuses its table's slots.
    fn chains(self) -> u16 {
        if self.packed && !self.one_buffer {
            QSIZE / 2
        } else {
            QSIZE
        }
    }
}

/// Returns the median ns per chain and the chains run.
fn bench_harness(rounds: usize, batches: usize, burst: bool, shape: Shape) -> (f64, u64) {
    let dev = Echo {
        burst,
        one_buffer: shape.one_buffer,
    };
    let mut h = if shape.packed {
        Harness::new_packed(&dev, QSIZE)
    } else {
        Harness::new(&dev, QSIZE)
    }
    .expect("harness");
    let mut w = dev.worker(0).expect("worker");
    let mut per_chain = Vec::new();
    let n = shape.chains();
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..batches {
            if shape.packed {
                fill_packed(h.packed_ring(0), Harness::BUFFER_AREA, n, shape.one_buffer);
            } else if shape.one_buffer {
                let ring = h.ring(0);
                for i in 0..n {
                    ring.add_chain(&chain_bufs(Harness::BUFFER_AREA, i, true))
                        .expect("chain");
                }
                ring.publish().expect("publish");
            } else {
                fill(h.ring(0), Harness::BUFFER_AREA, n);
            }
            h.process(&mut *w, 0).expect("process");
        }
        let ns = start.elapsed().as_nanos() as f64;
        per_chain.push(ns / (batches as f64 * f64::from(n)));
    }
    let chains = (rounds * batches) as u64 * u64::from(n);
    (median(per_chain), chains)
}

/// `log`: with dirty logging on (`VHOST_F_LOG_ALL` and a shared log), as
/// while the frontend migrates the guest.
fn bench_vhost_user(rounds: usize, batches: usize, log: bool) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("bench.sock");
    let mut server = Server::new();
    server
        .add_device(
            "bench",
            &sock,
            Arc::new(Echo {
                burst: true,
                one_buffer: false,
            }),
        )
        .expect("add");
    let stop = server.shutdown_handle();
    let t = std::thread::spawn(move || server.run().expect("run"));
    let stream = (0..100)
        .find_map(|_| {
            std::os::unix::net::UnixStream::connect(&sock)
                .map_err(|_| std::thread::sleep(Duration::from_millis(10)))
                .ok()
        })
        .expect("connect");
    let mut fe = Frontend::from_stream(stream, 1);
    let size = 4 << 20;
    let mem = iommu_core::Memory::anonymous("guest", size).expect("mem");
    let gpa = 0x1000_0000u64;
    let va = mem.as_ptr() as u64;
    fe.set_owner().expect("owner");
    fe.get_features().expect("get features");
    let features = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_RING_F_EVENT_IDX;
    fe.set_features(features).expect("features");
    let p = fe.get_protocol_features().expect("protocol");
    fe.set_protocol_features(
        p & (VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD),
    )
    .expect("set protocol");
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size as u64,
        userspace_addr: va,
        mmap_offset: 0,
        mmap_handle: mem.fd().expect("fd").as_raw_fd(),
    }])
    .expect("mem table");
    let mut ring = DriverRing::new(mem.clone(), 0, gpa, QSIZE).expect("ring");
    fe.set_vring_num(0, QSIZE).expect("num");
    let delta = va.wrapping_sub(gpa);
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: ring.desc_addr().wrapping_add(delta),
            used_ring_addr: ring.used_addr().wrapping_add(delta),
            avail_ring_addr: ring.avail_addr().wrapping_add(delta),
            log_addr: None,
        },
    )
    .expect("addr");
    fe.set_vring_base(0, 0).expect("base");
    let call = EventFd::new(0).expect("call");
    let kick = EventFd::new(0).expect("kick");
    fe.set_vring_call(0, &call).expect("call");
    fe.set_vring_kick(0, &kick).expect("kick");
    fe.set_vring_enable(0, true).expect("enable");
    // Kept alive while the server may write it.
    let log_mem = log.then(|| {
        let len = (gpa + size as u64) / 0x1000 / 8;
        let m = iommu_core::Memory::anonymous("log", len as usize).expect("log");
        fe.set_log_base(
            0,
            Some(vhost::VhostUserDirtyLogRegion {
                mmap_size: len,
                mmap_offset: 0,
                mmap_handle: m.fd().expect("log fd").as_raw_fd(),
            }),
        )
        .expect("log base");
        fe.set_features(features | (1 << 26)).expect("LOG_ALL");
        m
    });
    let mut used = 0u16;
    let mut per_chain = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..batches {
            fill(&mut ring, gpa + 0x10_0000, QSIZE);
            used = used.wrapping_add(QSIZE);
            // Ask for one notification, when the whole batch is done.
            ring.set_used_event(used.wrapping_sub(1))
                .expect("used event");
            kick.write(1).expect("kick");
            // Bounded wait for the batch, woken by the call eventfd.
            for _ in 0..10_000 {
                if ring.used_idx().expect("idx") == used {
                    break;
                }
                let mut pfd = libc::pollfd {
                    fd: call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: `pfd` is a valid pollfd for the duration of the call.
                if unsafe { libc::poll(&mut pfd, 1, 100) } > 0 {
                    let _ = call.read();
                }
            }
        }
        let ns = start.elapsed().as_nanos() as f64;
        per_chain.push(ns / (batches as f64 * f64::from(QSIZE)));
    }
    drop(fe);
    drop(log_mem);
    stop.shutdown();
    t.join().expect("server");
    median(per_chain)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, batches) = if quick { (3, 50) } else { (7, 400) };
    let shape = Shape {
        packed: std::env::args().any(|a| a == "--packed"),
        one_buffer: std::env::args().any(|a| a == "--one-buffer"),
    };
    let what = match (shape.packed, shape.one_buffer) {
        (false, false) => "",
        (true, false) => ", packed rings",
        (false, true) => ", one writable buffer per chain",
        (true, true) => ", packed rings, one writable buffer per chain",
    };
    // One writable buffer: the worker always pops in bursts.
    let (h, c1) = bench_harness(rounds, batches, false, shape);
    println!(
        "queue layer (harness, translation, no sockets{what}): {h:.0} ns/chain, {:.2} M chains/s",
        1e3 / h
    );
    let (b, c2) = bench_harness(rounds, batches, true, shape);
    println!(
        "queue layer, pop_burst of 32 (harness{what}): {b:.0} ns/chain, {:.2} M chains/s",
        1e3 / b
    );
    println!("chains: {}", c1 + c2);
    if std::env::args().any(|a| a == "--harness-only") || shape.packed || shape.one_buffer {
        return;
    }
    let v = bench_vhost_user(rounds, batches, false);
    println!(
        "vhost-user end to end (kick per {QSIZE} chains, EVENT_IDX): {v:.0} ns/chain, {:.2} M chains/s",
        1e3 / v
    );
    println!("end-to-end / queue-layer cost ratio: {:.2}", v / h);
    let l = bench_vhost_user(rounds, batches, true);
    println!(
        "vhost-user end to end, dirty logging on (VHOST_F_LOG_ALL): {l:.0} ns/chain, {:.2} M chains/s",
        1e3 / l
    );
}
