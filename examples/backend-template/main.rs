//! backend-template: a complete, minimal ioasis device (virtio-rng) to copy.
//!
//! Copy this file, rename `Rng`, and change four things:
//! 1. what the device is (`device_type`, `features`, `num_queues`,
//!    `max_queue_size`, and `config_size`/`read_config` if it has a config
//!    space);
//! 2. how a worker thread is built (`Device::worker`): per-thread state lives
//!    in the worker, so the hot path needs no lock;
//! 3. what a worker does with a chain (`Worker::process_queue`): pop, read and
//!    write buffers through the queue (every access is translated through the
//!    device's IOAS), complete every popped head exactly once, notify;
//! 4. the command line in `main`.
//!
//! Run it, then point a frontend at the socket:
//!
//! ```text
//! cargo run -p ioasis-examples --example backend-template -- /tmp/rng.sock
//! qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \
//!   -numa node,memdev=mem -chardev socket,id=c0,path=/tmp/rng.sock \
//!   -device vhost-user-rng-pci,chardev=c0
//! ```

use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use ioasis::device::{Device, DeviceError, Queues, Worker};
use ioasis::queue::Chain;
use ioasis::server::Server;

/// `VIRTIO_ID_RNG`.
const VIRTIO_ID_RNG: u32 = 4;
/// Largest number of bytes handed out per request (a driver may post huge
/// buffers; bound the work one chain can cause).
const MAX_REQUEST: usize = 64 * 1024;

/// The device: stateless, so one instance serves every connection.
struct Rng;

impl Device for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn features(&self) -> u64 {
        // virtio-rng has no device feature bits; the framework adds the
        // transport ones (VERSION_1, ACCESS_PLATFORM, EVENT_IDX, ...).
        0
    }

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> u16 {
        256
    }

    fn worker(&self, _thread: usize) -> Result<Box<dyn Worker>, DeviceError> {
        let source = File::open("/dev/urandom").map_err(|source| DeviceError::Io {
            op: "open /dev/urandom",
            source,
        })?;
        Ok(Box::new(RngWorker {
            source,
            chain: Chain::new(),
            buf: vec![0; MAX_REQUEST],
        }))
    }
}

/// One worker thread's state: allocated once, reused for every chain.
struct RngWorker {
    source: File,
    chain: Chain,
    buf: Vec<u8>,
}

impl Worker for RngWorker {
    fn process_queue(&mut self, index: u16, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        // `None`: the queue is not running (stopped, disabled, or parked on a
        // translation miss); the framework calls again when it is.
        let Some(mut queue) = queues.get(index) else {
            return Ok(());
        };
        // With EVENT_IDX: drain, re-enable notifications, and go round again
        // if the driver added chains meanwhile. Bounded by the ring size.
        for _ in 0..=queue.size() {
            queue.disable_notification()?;
            let mut completed = 0;
            // `?` on a translation miss parks the queue; the chain being popped
            // is offered again once the frontend maps the address.
            while queue.pop(&mut self.chain)? {
                let want = usize::try_from(self.chain.writable_len())
                    .unwrap_or(usize::MAX)
                    .min(MAX_REQUEST);
                let written = match self.source.read(&mut self.buf[..want]) {
                    Ok(n) => queue.write(&self.chain, 0, &self.buf[..n])?,
                    // Complete the head anyway (nothing written) and go on.
                    Err(e) => {
                        log::warn!("reading /dev/urandom: {e}");
                        0
                    }
                };
                queue.add_used(self.chain.head(), u32::try_from(written).unwrap_or(0))?;
                completed += 1;
            }
            if completed > 0 {
                queue.notify()?;
            }
            if !queue.enable_notification()? {
                break;
            }
        }
        Ok(())
    }
}

fn main() {
    let socket = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/ioasis-rng.sock".to_string());
    let mut server = Server::new();
    if let Err(e) = server.add_device("rng0", &socket, Arc::new(Rng)) {
        eprintln!("backend-template: {e}");
        std::process::exit(1);
    }
    if let Err(e) = server.handle_signals() {
        eprintln!("backend-template: {e}");
        std::process::exit(1);
    }
    println!("virtio-rng backend listening on {socket} (Ctrl-C to stop)");
    if let Err(e) = server.run() {
        eprintln!("backend-template: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use ioasis::testing::{Buf, Harness};

    use super::*;

    #[test]
    fn test_fills_every_buffer_and_completes_every_chain() {
        let dev = Rng;
        let mut h = Harness::new(&dev, 16).expect("harness");
        let mut worker = dev.worker(0).expect("worker");
        let base = Harness::BUFFER_AREA;
        for i in 0..4u64 {
            h.ring(0)
                .add_chain(&[
                    Buf {
                        addr: base + i * 0x1000,
                        len: 32,
                        writable: true,
                    },
                    Buf {
                        addr: base + i * 0x1000 + 0x800,
                        len: 32,
                        writable: true,
                    },
                ])
                .expect("chain");
        }
        h.ring(0).publish().expect("publish");
        h.process(&mut *worker, 0).expect("process");
        assert_eq!(h.ring(0).used_idx().expect("used"), 4);
        for i in 0..4u16 {
            assert_eq!(h.ring(0).used_elem(i).expect("elem").1, 64);
        }
        let mut out = [0u8; 32];
        h.memory()
            .read_at(Harness::BUFFER_AREA as usize + 0x800, &mut out)
            .expect("read");
        assert_ne!(out, [0u8; 32], "random bytes were written");
    }

    #[test]
    fn test_readable_only_chain_completes_with_zero() {
        let dev = Rng;
        let mut h = Harness::new(&dev, 16).expect("harness");
        let mut worker = dev.worker(0).expect("worker");
        h.ring(0)
            .add_chain(&[Buf {
                addr: Harness::BUFFER_AREA,
                len: 32,
                writable: false,
            }])
            .expect("chain");
        h.ring(0).publish().expect("publish");
        h.process(&mut *worker, 0).expect("process");
        assert_eq!(h.ring(0).used_elem(0).expect("elem"), (0, 0));
    }

    #[test]
    fn test_unmapped_buffer_is_a_miss_not_a_crash() {
        let dev = Rng;
        let mut h = Harness::new(&dev, 16).expect("harness");
        let mut worker = dev.worker(0).expect("worker");
        h.ring(0)
            .add_chain(&[Buf {
                addr: 0x1_0000_0000,
                len: 32,
                writable: true,
            }])
            .expect("chain");
        h.ring(0).publish().expect("publish");
        let e = h.process(&mut *worker, 0).expect_err("miss");
        assert!(e.is_translation_miss());
        assert_eq!(
            h.ring(0).used_idx().expect("used"),
            0,
            "chain kept for later"
        );
    }
}
