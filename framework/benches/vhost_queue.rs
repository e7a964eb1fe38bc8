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
//! shorter run).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ioasis::device::{Device, DeviceError, Queues, Worker};
use ioasis::queue::Chain;
use ioasis::server::Server;
use ioasis::testing::{Buf, DriverRing, Harness};
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
/// pops with [`ioasis::queue::Queue::pop_burst`].
struct Echo {
    burst: bool,
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

fn bench_harness(rounds: usize, batches: usize, burst: bool) -> f64 {
    let dev = Echo { burst };
    let mut h = Harness::new(&dev, QSIZE).expect("harness");
    let mut w = dev.worker(0).expect("worker");
    let mut per_chain = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..batches {
            fill(h.ring(0), Harness::BUFFER_AREA, QSIZE);
            h.process(&mut *w, 0).expect("process");
        }
        let ns = start.elapsed().as_nanos() as f64;
        per_chain.push(ns / (batches as f64 * f64::from(QSIZE)));
    }
    median(per_chain)
}

/// `log`: with dirty logging on (`VHOST_F_LOG_ALL` and a shared log), as
/// while the frontend migrates the guest.
fn bench_vhost_user(rounds: usize, batches: usize, log: bool) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("bench.sock");
    let mut server = Server::new();
    server
        .add_device("bench", &sock, Arc::new(Echo { burst: true }))
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
    let h = bench_harness(rounds, batches, false);
    println!(
        "queue layer (harness, translation, no sockets): {h:.0} ns/chain, {:.2} M chains/s",
        1e3 / h
    );
    let b = bench_harness(rounds, batches, true);
    println!(
        "queue layer, pop_burst of 32 (harness): {b:.0} ns/chain, {:.2} M chains/s",
        1e3 / b
    );
    if std::env::args().any(|a| a == "--harness-only") {
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
