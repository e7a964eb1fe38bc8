//! Deferred completion keeps the unmap promise: an unmap issued while a
//! request's I/O is in flight (an io_uring `READV` from a pipe into the
//! chain's buffer, which completes only when the test writes the pipe)
//! waits until the worker has finished the request; the worker sees the
//! drain request meanwhile, and finds the chain no longer intact.
//!
//! Shown to fail with pins ignored: `RUSTFLAGS='--cfg ioasis_broken="unpinned"'
//! cargo test -p ioasis --test deferred_unmap` (a section's end then ends
//! the translator's section whatever it pinned): the unmap returns while
//! the read is still in flight ("unmap returned while the request was in
//! flight").

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, types, IoUring};
use ioasis::device::{Device, DeviceError, Queues, Worker};
use ioasis::queue::{Chain, InFlight, Part};
use ioasis::testing::{Buf, Harness};

struct PipeDevice;

impl Device for PipeDevice {
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
        16
    }
    fn worker(&self, _thread: usize) -> Result<Box<dyn Worker>, DeviceError> {
        Err(DeviceError::Unsupported("built by the test"))
    }
}

struct PipeWorker {
    ring: IoUring,
    pipe: OwnedFd,
    chain: Chain,
    inflight: Option<InFlight>,
    /// Set by the worker just before it releases the request's pin.
    finished: Arc<AtomicBool>,
    drains: usize,
    intact: Option<bool>,
}

impl Worker for PipeWorker {
    fn process_queue(&mut self, index: u16, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        let Some(mut q) = queues.get(index) else {
            return Ok(());
        };
        if !q.pop(&mut self.chain)? {
            return Ok(());
        }
        let mut inflight = q.defer(&mut self.chain)?;
        let (iov, _) = inflight.io_vectors(Part::Writable, 0, 64);
        let sqe = opcode::Readv::new(
            types::Fd(self.pipe.as_raw_fd()),
            iov.as_ptr(),
            iov.len() as u32,
        )
        .offset(u64::MAX)
        .build()
        .user_data(1);
        // SAFETY: the iovecs point at pinned guest pages and live in the
        // InFlight, kept in `self.inflight` until the completion is reaped.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| DeviceError::Other("sq full".into()))?;
        self.ring.submit().map_err(|source| DeviceError::Io {
            op: "submit",
            source,
        })?;
        self.inflight = Some(inflight);
        Ok(())
    }

    fn handle_event(&mut self, _token: u64, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        let Some(cqe) = self.ring.completion().next() else {
            return Ok(());
        };
        assert_eq!(cqe.result(), 5, "read from the pipe");
        let Some(inflight) = self.inflight.take() else {
            return Ok(());
        };
        self.finished.store(true, Ordering::SeqCst);
        let done = queues.finish(inflight);
        self.intact = Some(done.intact);
        if let Some(mut q) = queues.get(done.queue) {
            q.add_used(done.chain.head(), 5)?;
            q.notify()?;
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        usize::from(self.inflight.is_some())
    }

    fn drain(&mut self, _queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        self.drains += 1;
        Ok(())
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2");
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn test_unmap_waits_for_io_in_flight() {
    let Ok(ring) = IoUring::new(8) else {
        ioasis_test_skip::skip("io_uring is not available");
        return;
    };
    let dev = PipeDevice;
    let mut h = Harness::new(&dev, 16).expect("harness");
    // The memory table's semantics: an address that no longer translates
    // was unmapped (with IOTLB translation it may only have been flushed).
    h.set_memory_table_mode(true);
    let (rd, wr) = pipe();
    let finished = Arc::new(AtomicBool::new(false));
    let mut w = PipeWorker {
        ring,
        pipe: rd,
        chain: Chain::new(),
        inflight: None,
        finished: finished.clone(),
        drains: 0,
        intact: None,
    };
    h.ring(0)
        .add_chain(&[Buf {
            addr: Harness::BUFFER_AREA,
            len: 64,
            writable: true,
        }])
        .expect("chain");
    h.ring(0).publish().expect("publish");
    h.process(&mut w, 0).expect("process");
    assert_eq!(w.in_flight(), 1);
    assert_eq!(h.pinned(), 1, "the deferred chain is pinned");

    // The frontend unmaps the whole address space under the read.
    let (iommu, ioas) = h.address_space();
    let iommu = iommu.clone();
    let seen = finished.clone();
    let unmapper = std::thread::spawn(move || {
        iommu.ioas_unmap(ioas, 0, u64::MAX).expect("unmap");
        seen.load(Ordering::SeqCst)
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !unmapper.is_finished(),
        "unmap returned while the request was in flight"
    );
    assert!(h.drain_requested(), "the worker is asked to drain");
    h.drain(&mut w).expect("drain");
    assert_eq!(w.drains, 1);

    // The I/O completes; the worker finishes the request.
    nix::unistd::write(&wr, b"hello").expect("pipe write");
    w.ring.submit_and_wait(1).expect("wait for the completion");
    h.handle_event(&mut w, 0).expect("complete");
    let finished_first = unmapper.join().expect("unmap thread");
    assert!(
        finished_first,
        "the unmap returned before the request finished"
    );
    assert_eq!(h.pinned(), 0);
    assert_eq!(w.intact, Some(false), "its buffer was unmapped under it");
    let mut got = [0u8; 5];
    h.memory()
        .read_at(Harness::BUFFER_AREA as usize, &mut got)
        .expect("read back");
    assert_eq!(
        &got, b"hello",
        "the read landed while the pages were pinned"
    );
}
