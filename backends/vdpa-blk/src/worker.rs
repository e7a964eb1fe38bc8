//! The data plane of one queue: requests are checked, then read, written,
//! flushed or zeroed through the worker's own io_uring, on the guest's
//! pages directly (no copy): each chain is deferred ([`Queue::defer`]: its
//! buffers stay pinned against unmap while the kernel works on them) and
//! completed when its completion arrives on the ring's eventfd. The null
//! disk completes every request at once, without I/O, and so does a file on
//! a memory file system (see [`Backing::in_memory`](crate::backing::Backing::in_memory)):
//! the worker reads or writes it with `preadv`/`pwritev` on the buffers as
//! translated in the pass, since io_uring would hand each such request to a
//! kernel worker thread.
//!
//! Completions are published one by one as the pass makes them, the first
//! of a pass signalled at once ([`Queue::serve`]). After work the worker
//! polls its queues with the driver's kicks suppressed for a window that
//! follows the load ([`PollMode`], `--poll-us`), reaping io_uring
//! completions from the ring as it goes; when the window closes it re-arms
//! the kicks, checks the ring once more, and sleeps, unless that last pass
//! left chains (the driver may not kick for them: it added them while kicks
//! were off).
//!
//! At most one ring's worth of requests is in flight per queue; when the
//! slots are full (or an unmap waits for this worker's I/O) the worker
//! stops popping and serves the queue again as completions free slots.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use ioasis::device::{EventRegistrar, Idle, Interest, Result, Worker};
use ioasis::log_limited;
use ioasis::poll::{AdaptiveWindow, PollMode, Preemptions};
use ioasis::queue::{Chain, Cursor, Flow, InFlight, Lookup, Part, Queue, Queues};
use log::{warn, Level};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backing::Backing;
use crate::config::{self, SECTOR_SIZE};
use crate::request::{
    check_segment, classify, BlkHeader, Limits, Op, Reject, ZeroRange, ZeroSegment, ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use crate::stats::{DeviceStats, QueueStats};

/// Event token of the ring's completion eventfd.
const URING_TOKEN: u64 = 1;
/// user_data bit of cancellation requests (their completions are ignored).
const CANCEL_TAG: u64 = 1 << 63;
/// Most iovecs per request (`IOV_MAX`).
const IOV_MAX: usize = 1024;
/// Bytes of zeroes a null-disk read copies at a time.
const ZERO_CHUNK: usize = 64 * 1024;
/// Most completion-reaping rounds when the worker is dropped with I/O in flight.
const DROP_ROUNDS: usize = 500;

/// One operation of a request on the backing file.
#[derive(Clone, Copy, Debug)]
enum IoOp {
    Readv { offset: u64, len: u64, direct: bool },
    Writev { offset: u64, len: u64, direct: bool },
    Fsync,
    Fallocate { range: ZeroRange, mode: i32 },
}

/// The operation to do again after `op` completed with `res`, if any:
/// `O_DIRECT` refused for these buffers (alignment the submission check
/// did not catch: `EINVAL`; memory the kernel cannot pin for direct I/O,
/// such as Linux 6.12's VDUSE bounce buffer: `EFAULT`) is retried
/// buffered, and `ZERO_RANGE` on a file system without it (`EOPNOTSUPP`)
/// as a hole punched.
fn retry_of(op: IoOp, res: i32) -> Option<IoOp> {
    let refused = matches!(-res, libc::EINVAL | libc::EFAULT);
    match op {
        IoOp::Readv {
            offset,
            len,
            direct: true,
        } if refused => Some(IoOp::Readv {
            offset,
            len,
            direct: false,
        }),
        IoOp::Writev {
            offset,
            len,
            direct: true,
        } if refused => Some(IoOp::Writev {
            offset,
            len,
            direct: false,
        }),
        IoOp::Fallocate { range, mode }
            if -res == libc::EOPNOTSUPP && mode & libc::FALLOC_FL_ZERO_RANGE != 0 =>
        {
            Some(IoOp::Fallocate {
                range,
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            })
        }
        _ => None,
    }
}

/// A request in flight.
#[derive(Debug)]
struct Slot {
    inflight: InFlight,
    kind: Op,
    /// Offset of the status byte in the writable part.
    status_off: u64,
    /// Used length on success (data written to the driver + status).
    used_len: u32,
    ops: Vec<IoOp>,
    /// Operations not completed yet.
    left: usize,
    status: u8,
}

/// A request whose I/O is over, waiting for its queue to serve again
/// (parked on a translation miss the frontend resolves).
#[derive(Debug)]
struct Held {
    queue: u16,
    chain: Chain,
    status_off: u64,
    used_len: u32,
    status: u8,
}

/// How a pass over a queue ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serve {
    /// The driver's kicks re-armed and the ring checked once more after
    /// ([`Queue::serve`]): the worker may sleep.
    Rearm,
    /// Kicks left suppressed ([`Queue::poll`]): the worker polls on.
    Poll,
}

/// The longest polling slice between two access sections (an unmap waits
/// at most this long for the worker, beside its I/O).
const POLL_SLICE: Duration = Duration::from_micros(50);
/// A bound on the passes of one slice, beside [`POLL_SLICE`].
const POLL_PASSES_MAX: u32 = 1 << 16;
/// PAUSEs between two passes that found nothing.
const IDLE_PAUSES: u32 = 64;

/// The worker of one queue (see the module docs).
pub struct BlkWorker {
    backing: Arc<Backing>,
    stats: Arc<DeviceStats>,
    serial: [u8; ID_BYTES],
    limits: Limits,
    ring: Option<(IoUring, EventFd)>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Chains whose storage is reused after their request finished.
    pool: Vec<Chain>,
    chain: Chain,
    /// Queues that stopped popping (slots full, drain): served again later.
    starved: u64,
    /// Queues with completions not yet notified.
    touched: u64,
    /// Slots whose operations are all over, to finish.
    ready: Vec<u32>,
    /// Finished requests whose queue is parked.
    held: Vec<Held>,
    zeroes: Vec<u8>,
    /// The polling window (None: event-driven, `--poll-us 0`).
    window: Option<AdaptiveWindow>,
    /// Preemptions while polling (adaptive window only).
    preempt: Option<Preemptions>,
    /// The driver's kicks are suppressed: the worker is polling its queues.
    polling: bool,
    /// Requests taken (counted as they start).
    work: u64,
    /// `work` at the window's last observation.
    seen_work: u64,
    /// An `O_DIRECT` request failed with `EFAULT`: the kernel cannot pin
    /// the driver's memory for direct I/O (Linux 6.12's VDUSE bounce
    /// buffer is such memory), so requests go buffered from then on.
    direct_refused: bool,
}

impl std::fmt::Debug for BlkWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkWorker")
            .field("in_flight", &self.in_flight())
            .field("starved", &self.starved)
            .finish()
    }
}

impl BlkWorker {
    /// A worker for queues of at most `queue_size` entries, polling after
    /// work as `poll` says.
    pub fn new(
        backing: Arc<Backing>,
        stats: Arc<DeviceStats>,
        serial: [u8; ID_BYTES],
        queue_size: u16,
        poll: PollMode,
    ) -> std::io::Result<BlkWorker> {
        let ring = if backing.is_null() {
            None
        } else {
            let ring = IoUring::new(u32::from(queue_size).next_power_of_two().max(8))?;
            let ev = EventFd::new(EFD_NONBLOCK)?;
            ring.submitter().register_eventfd(ev.as_raw_fd())?;
            Some((ring, ev))
        };
        let read_only = backing.read_only();
        let capacity = backing.size() / SECTOR_SIZE;
        let seg_max = config::seg_max(queue_size);
        Ok(BlkWorker {
            limits: Limits {
                capacity,
                read_only,
                max_bytes: u64::from(seg_max) * u64::from(config::SIZE_MAX),
                max_descriptors: seg_max as usize + 2,
                max_zero_segments: u64::from(config::MAX_ZERO_SEGS),
                max_zero_sectors: u64::from(config::MAX_ZERO_SECTORS),
                discard: false,
                write_zeroes: false,
                flush: true,
            },
            backing,
            stats,
            serial,
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            pool: Vec::new(),
            chain: Chain::new(),
            starved: 0,
            touched: 0,
            ready: Vec::new(),
            held: Vec::new(),
            zeroes: vec![0; ZERO_CHUNK],
            window: poll.window(),
            preempt: poll.preemptions(),
            polling: false,
            work: 0,
            seen_work: 0,
            direct_refused: false,
        })
    }

    /// Serves queue `index`: re-arming the driver's kicks at the end
    /// unless the worker is polling.
    fn serve_queue(&mut self, index: u16, queues: &mut Queues<'_>) -> Result<()> {
        let how = if self.polling {
            Serve::Poll
        } else {
            Serve::Rearm
        };
        self.serve_queue_as(index, queues, how)
    }

    fn serve_queue_as(&mut self, index: u16, queues: &mut Queues<'_>, how: Serve) -> Result<()> {
        if !self.held.is_empty() {
            self.complete_held(queues)?;
        }
        let Some(mut q) = queues.get(index) else {
            return Ok(());
        };
        self.starved &= !bit(index);
        let mut chain = std::mem::take(&mut self.chain);
        let r = match how {
            Serve::Rearm => q.serve(&mut chain, |q, c| self.start(q, c)),
            Serve::Poll => q.poll(&mut chain, |q, c| self.start(q, c)),
        };
        self.chain = chain;
        drop(q);
        self.submit();
        if r? == Flow::Stop {
            // Chains may be left (slots full, a drain, or a driver faster
            // than the loop's bound): served again before sleeping.
            self.starved |= bit(index);
        }
        Ok(())
    }

    /// Serves again the queues that stopped popping (slots full, a drain,
    /// or the bound of a pass).
    fn serve_starved(&mut self, queues: &mut Queues<'_>) -> Result<()> {
        for index in queues.indices().collect::<Vec<_>>() {
            if self.starved & bit(index) != 0 {
                self.serve_queue(index, queues)?;
            }
        }
        Ok(())
    }

    /// Chains are left that no completion will wake the worker for (none
    /// in flight), and the driver may not kick for them either: the worker
    /// must look again rather than sleep.
    fn chains_left_unwatched(&self) -> bool {
        self.starved != 0 && Worker::in_flight(self) == 0
    }

    /// Serves every queue of the thread.
    fn serve_all(&mut self, queues: &mut Queues<'_>, how: Serve) -> Result<()> {
        for index in queues.indices().collect::<Vec<_>>() {
            self.serve_queue_as(index, queues, how)?;
        }
        Ok(())
    }

    /// One slice of polling, the driver's kicks suppressed: passes over
    /// the queues and the completion ring until work turns up, an unmap
    /// waits for this worker, or [`POLL_SLICE`] is over. The framework then
    /// ends the access section and asks [`Worker::before_sleep`] again,
    /// which shows the window what was found.
    fn poll_slice(&mut self, queues: &mut Queues<'_>) -> Result<()> {
        let start = Instant::now();
        let before = self.work;
        for pass in 0..POLL_PASSES_MAX {
            self.serve_all(queues, Serve::Poll)?;
            if self
                .ring
                .as_mut()
                .is_some_and(|(r, _)| !r.completion().is_empty())
            {
                self.reap(queues)?;
            }
            if self.work != before || queues.dma().drain_requested() {
                return Ok(());
            }
            // Nothing: back off before reading the driver's avail index
            // again (each read takes that line from the driver's core).
            for _ in 0..IDLE_PAUSES {
                std::hint::spin_loop();
            }
            if pass % 8 == 7 && start.elapsed() >= POLL_SLICE {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Takes one popped request: refuses it, answers it at once, or starts
    /// its I/O.
    fn start(&mut self, q: &mut Queue<'_>, chain: &mut Chain) -> ioasis::queue::Result<Flow> {
        let index = q.index();
        let head = chain.head();
        let stats = self.stats.clone();
        let st = stats.queue(usize::from(index));
        let mut cur = Cursor::new(chain);
        let Some(status_off) = cur.reserve_tail(1) else {
            st.malformed.fetch_add(1, Relaxed);
            log_limited!(
                Level::Warn,
                "queue {index}: request {head} has no writable status byte; completed with length 0"
            );
            count_done(st, VIRTIO_BLK_S_IOERR);
            q.add_used(head, 0)?;
            return Ok(Flow::Continue);
        };
        let Some(hdr) = cur.read_obj::<BlkHeader>(q, chain)? else {
            return self.refuse(q, chain, status_off, Reject::Malformed("short header"));
        };
        // The disk may have been resized (SIGHUP: BlkDevice::resize).
        self.limits.capacity = self.backing.size() / SECTOR_SIZE;
        let op = match classify(
            &hdr,
            cur.readable(),
            cur.writable(),
            chain.descriptors().len(),
            &self.limits,
        ) {
            Ok(op) => op,
            Err(r) => return self.refuse(q, chain, status_off, r),
        };
        let mut ranges = Vec::new();
        if let Op::Discard { segments } | Op::WriteZeroes { segments } = op {
            let discard = matches!(op, Op::Discard { .. });
            for _ in 0..segments {
                let Some(seg) = cur.read_obj::<ZeroSegment>(q, chain)? else {
                    return self.refuse(q, chain, status_off, Reject::Malformed("short segment"));
                };
                match check_segment(&seg, discard, &self.limits) {
                    Ok(r) => ranges.push(r),
                    Err(r) => return self.refuse(q, chain, status_off, r),
                }
            }
        }
        self.work += 1;
        if op == Op::GetId {
            let n = cur.write(q, chain, &self.serial)?;
            st.get_id.fetch_add(1, Relaxed);
            return self.answer(q, chain, status_off, VIRTIO_BLK_S_OK, n as u32 + 1);
        }
        if self.ring.is_none() {
            return self.null(q, chain, &mut cur, status_off, op, st);
        }
        if self.backing.in_memory() && matches!(op, Op::Read { .. } | Op::Write { .. }) {
            let hdr_len = cur.read_offset();
            return self.in_memory(q, chain, hdr_len, status_off, op);
        }
        let n_ops = match op {
            Op::Discard { .. } | Op::WriteZeroes { .. } => ranges.len(),
            _ => 1,
        };
        if !self.sq_room(n_ops) || q.dma().drain_requested() {
            // The ring is full, or an unmap waits for our I/O: give the
            // chain back and serve the queue again after completions.
            if q.unpop(1) {
                self.starved |= bit(index);
                self.work -= 1;
                return Ok(Flow::Stop);
            }
            // Cannot happen (the chain was just popped); fail it rather
            // than lose it.
            return self.answer(q, chain, status_off, VIRTIO_BLK_S_IOERR, 1);
        }
        let used_len = match op {
            Op::Read { len, .. } => len as u32 + 1,
            _ => 1,
        };
        let hdr_len = cur.read_offset();
        let direct = self.backing.direct() && !self.direct_refused;
        let ops: Vec<IoOp> = match op {
            Op::Read { offset, len } => vec![IoOp::Readv {
                offset,
                len,
                direct,
            }],
            Op::Write { offset, len } => vec![IoOp::Writev {
                offset,
                len,
                direct,
            }],
            Op::Flush => vec![IoOp::Fsync],
            Op::Discard { .. } | Op::WriteZeroes { .. } => ranges
                .iter()
                .map(|r| IoOp::Fallocate {
                    range: *r,
                    mode: if r.unmap {
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                    } else {
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                    },
                })
                .collect(),
            Op::GetId => Vec::new(),
        };
        let mut inflight = q.defer(chain)?;
        *chain = self.pool.pop().unwrap_or_default();
        // Buffers too fragmented for one vectored call fail the request
        // before any I/O.
        let (part, at, len) = match op {
            Op::Read { len, .. } => (Part::Writable, 0, len),
            Op::Write { len, .. } => (Part::Readable, hdr_len, len),
            _ => (Part::Readable, 0, 0),
        };
        let (iov, _) = inflight.io_vectors(part, at, len);
        let (iov_count, aligned) = (iov.len(), aligned(iov, self.backing.blk_size()));
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let n = ops.len();
        self.slots[slot as usize] = Some(Slot {
            inflight,
            kind: op,
            status_off,
            used_len,
            ops,
            left: n,
            status: VIRTIO_BLK_S_OK,
        });
        if iov_count > IOV_MAX {
            log_limited!(
                Level::Warn,
                "queue {index}: request {head}: {iov_count} buffer fragments, above {IOV_MAX}; failed"
            );
            st.malformed.fetch_add(1, Relaxed);
            if let Some(s) = self.slots[slot as usize].as_mut() {
                s.status = VIRTIO_BLK_S_IOERR;
                s.left = 0;
            }
            self.ready.push(slot);
            return Ok(Flow::Continue);
        }
        for i in 0..n {
            self.push_op(slot, i, aligned);
        }
        Ok(Flow::Continue)
    }

    /// True if the submission queue has room for `n` more entries (after
    /// submitting what it holds, if need be).
    fn sq_room(&mut self, n: usize) -> bool {
        let Some((ring, _)) = self.ring.as_mut() else {
            return true;
        };
        let room = |r: &mut IoUring| {
            let sq = r.submission();
            sq.capacity() - sq.len()
        };
        if room(ring) >= n {
            return true;
        }
        let _ = ring.submit();
        room(ring) >= n
    }

    /// Queues operation `i` of `slot` on the ring (room was checked).
    fn push_op(&mut self, slot: u32, i: usize, aligned: bool) {
        let Some((ring, _)) = self.ring.as_mut() else {
            return;
        };
        let Some(s) = self.slots[slot as usize].as_mut() else {
            return;
        };
        let user_data = u64::from(slot) | ((i as u64) << 32);
        let fd_of = |direct: bool| {
            self.backing
                .fd(aligned && direct)
                .or_else(|| self.backing.fd(false))
                .unwrap_or(-1)
        };
        let sqe = match s.ops[i] {
            IoOp::Readv {
                offset,
                len,
                direct,
            } => {
                let (iov, _) = s.inflight.io_vectors(Part::Writable, 0, len);
                opcode::Readv::new(types::Fd(fd_of(direct)), iov.as_ptr(), iov.len() as u32)
                    .offset(offset)
                    .build()
            }
            IoOp::Writev {
                offset,
                len,
                direct,
            } => {
                let hdr = std::mem::size_of::<BlkHeader>() as u64;
                let (iov, _) = s.inflight.io_vectors(Part::Readable, hdr, len);
                opcode::Writev::new(types::Fd(fd_of(direct)), iov.as_ptr(), iov.len() as u32)
                    .offset(offset)
                    .build()
            }
            IoOp::Fsync => opcode::Fsync::new(types::Fd(fd_of(false)))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoOp::Fallocate { range, mode } => {
                opcode::Fallocate::new(types::Fd(fd_of(false)), range.len)
                    .offset(range.offset)
                    .mode(mode)
                    .build()
            }
        }
        .user_data(user_data);
        // SAFETY: the iovec array and the buffers it points at belong to
        // the slot's InFlight (pinned guest pages), which stays in
        // `self.slots` until this operation's completion is reaped; the
        // fds are the backing's, open for the worker's life.
        let pushed = unsafe { ring.submission().push(&sqe) };
        if pushed.is_err() {
            let _ = ring.submit();
            // SAFETY: as above.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                log_limited!(
                    Level::Error,
                    "io_uring submission queue full; request failed"
                );
                s.status = VIRTIO_BLK_S_IOERR;
                s.left -= 1;
                if s.left == 0 {
                    self.ready.push(slot);
                }
            }
        }
    }

    /// Submits what the ring holds.
    fn submit(&mut self) {
        if let Some((ring, _)) = self.ring.as_mut() {
            if let Err(e) = ring.submit() {
                log_limited!(Level::Error, "io_uring submit: {e}");
            }
        }
    }

    /// Refuses a request: logs (rate-limited), counts, answers its status.
    fn refuse(
        &mut self,
        q: &mut Queue<'_>,
        chain: &Chain,
        status_off: u64,
        r: Reject,
    ) -> ioasis::queue::Result<Flow> {
        let index = q.index();
        let st = self.stats.queue(usize::from(index));
        match r {
            Reject::Unsupported(_) | Reject::UnsupportedFlags { .. } => {
                st.unsupported.fetch_add(1, Relaxed)
            }
            _ => st.malformed.fetch_add(1, Relaxed),
        };
        log_limited!(
            Level::Warn,
            "queue {index}: request {}: {r}; completed with status {}",
            chain.head(),
            r.status()
        );
        self.answer(q, chain, status_off, r.status(), 1)
    }

    /// Writes the status and completes the head with `used_len`.
    fn answer(
        &mut self,
        q: &mut Queue<'_>,
        chain: &Chain,
        status_off: u64,
        status: u8,
        used_len: u32,
    ) -> ioasis::queue::Result<Flow> {
        q.write(chain, status_off, &[status])?;
        q.add_used(chain.head(), used_len)?;
        count_done(self.stats.queue(usize::from(q.index())), status);
        Ok(Flow::Continue)
    }

    /// A read or write of a file on a memory file system, done here with
    /// `preadv`/`pwritev` on the guest's buffers as translated in this
    /// access section (see [`Backing::in_memory`]): it never waits for a
    /// device, and io_uring would hand it to a kernel worker thread.
    fn in_memory(
        &mut self,
        q: &mut Queue<'_>,
        chain: &mut Chain,
        hdr_len: u64,
        status_off: u64,
        op: Op,
    ) -> ioasis::queue::Result<Flow> {
        let index = q.index();
        let head = chain.head();
        let (part, at, offset, len, write) = match op {
            Op::Read { offset, len } => (Part::Writable, 0, offset, len, false),
            Op::Write { offset, len } => (Part::Readable, hdr_len, offset, len, true),
            _ => return self.answer(q, chain, status_off, VIRTIO_BLK_S_IOERR, 1),
        };
        let mut iov = Vec::with_capacity(4);
        let covered = q.iovecs(chain, part, at, len, &mut iov)?;
        let fd = self.backing.fd(false).unwrap_or(-1);
        let stats = self.stats.clone();
        let st = stats.queue(usize::from(index));
        let status = if covered < len || iov.len() > IOV_MAX {
            st.malformed.fetch_add(1, Relaxed);
            log_limited!(
                Level::Warn,
                "queue {index}: request {head}: {} buffer fragments covering {covered} of {len} bytes; failed",
                iov.len()
            );
            VIRTIO_BLK_S_IOERR
        } else {
            match rw_all(fd, &mut iov, offset, write) {
                Ok(n) if n == len => VIRTIO_BLK_S_OK,
                Ok(n) => {
                    log_limited!(
                        Level::Error,
                        "queue {index}: request {head}: {} of {len} bytes at {offset} done; failed",
                        n
                    );
                    VIRTIO_BLK_S_IOERR
                }
                Err(e) => {
                    log_limited!(
                        Level::Error,
                        "queue {index}: request {head}: {} at {offset}: {e}",
                        if write { "pwritev" } else { "preadv" }
                    );
                    VIRTIO_BLK_S_IOERR
                }
            }
        };
        if status == VIRTIO_BLK_S_OK {
            count_succeeded(st, op);
        }
        let used = match op {
            Op::Read { len, .. } if status == VIRTIO_BLK_S_OK => len as u32 + 1,
            _ => 1,
        };
        self.answer(q, chain, status_off, status, used)
    }

    /// The null disk: every request succeeds at once; reads return zeroes.
    fn null(
        &mut self,
        q: &mut Queue<'_>,
        chain: &Chain,
        cur: &mut Cursor,
        status_off: u64,
        op: Op,
        st: &QueueStats,
    ) -> ioasis::queue::Result<Flow> {
        let mut used = 1u32;
        if let Op::Read { len, .. } = op {
            let mut left = len;
            while left > 0 {
                let n = left.min(ZERO_CHUNK as u64) as usize;
                let w = cur.write(q, chain, &self.zeroes[..n])?;
                if w == 0 {
                    break;
                }
                left -= w as u64;
            }
            used += len as u32;
        }
        count_succeeded(st, op);
        self.answer(q, chain, status_off, VIRTIO_BLK_S_OK, used)
    }

    /// Reaps the ring's completions and finishes the requests they end.
    fn reap(&mut self, queues: &mut Queues<'_>) -> Result<()> {
        if let Some((_, ev)) = &self.ring {
            let _ = ev.read();
        }
        let mut done: Vec<(u64, i32)> = Vec::new();
        if let Some((ring, _)) = self.ring.as_mut() {
            done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        }
        let mut resubmit = false;
        for (user_data, res) in done {
            if user_data & CANCEL_TAG != 0 {
                continue;
            }
            let slot = (user_data & 0xffff_ffff) as u32;
            let i = (user_data >> 32) as usize;
            resubmit |= self.complete_op(slot, i, res);
        }
        if resubmit {
            self.submit();
        }
        let ready = std::mem::take(&mut self.ready);
        for slot in ready {
            self.finish(slot, queues)?;
        }
        self.flush_notifications(queues)?;
        Ok(())
    }

    /// One operation of `slot` completed with `res`; true if it was
    /// queued again (on another descriptor or in another mode).
    fn complete_op(&mut self, slot: u32, i: usize, res: i32) -> bool {
        let Some(s) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else {
            log_limited!(
                Level::Error,
                "io_uring completion for unknown request slot {slot}"
            );
            return false;
        };
        let Some(op) = s.ops.get(i).copied() else {
            return false;
        };
        let expected = match op {
            IoOp::Readv { len, .. } | IoOp::Writev { len, .. } => Some(len),
            _ => None,
        };
        let retry = retry_of(op, res);
        if let Some(again) = retry {
            s.ops[i] = again;
            if -res == libc::EFAULT && !self.direct_refused {
                self.direct_refused = true;
                warn!(
                    "O_DIRECT failed with EFAULT on the driver's memory (memory the kernel cannot pin for direct I/O): this worker does buffered I/O from now on"
                );
            }
            if self.sq_room(1) {
                self.push_op(slot, i, false);
                return true;
            }
        }
        let Some(s) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else {
            return false;
        };
        let ok = res >= 0 && expected.is_none_or(|e| res as u64 == e);
        if !ok {
            s.status = VIRTIO_BLK_S_IOERR;
            let q = s.inflight.queue();
            self.stats
                .queue(usize::from(q))
                .io_errors
                .fetch_add(1, Relaxed);
            if res < 0 {
                log_limited!(
                    Level::Error,
                    "queue {q}: request {}: {:?} failed: {}",
                    s.inflight.head(),
                    op,
                    std::io::Error::from_raw_os_error(-res)
                );
            } else {
                log_limited!(
                    Level::Error,
                    "queue {q}: request {}: {:?} transferred {res} bytes only",
                    s.inflight.head(),
                    op
                );
            }
        }
        s.left = s.left.saturating_sub(1);
        if s.left == 0 {
            self.ready.push(slot);
        }
        false
    }

    /// Ends a request: releases its pin, writes its status (through a
    /// fresh translation) and completes it on its queue.
    fn finish(&mut self, slot: u32, queues: &mut Queues<'_>) -> Result<()> {
        let Some(s) = self.slots.get_mut(slot as usize).and_then(Option::take) else {
            return Ok(());
        };
        self.free.push(slot);
        self.work += 1;
        let Slot {
            inflight,
            kind,
            status_off,
            used_len,
            mut status,
            ..
        } = s;
        let head = inflight.head();
        let done = queues.finish(inflight);
        let index = done.queue;
        let st = self.stats.queue(usize::from(index));
        if !done.intact && status == VIRTIO_BLK_S_OK {
            log_limited!(
                Level::Warn,
                "queue {index}: request {head}: its buffers were unmapped while the I/O was in flight; failed"
            );
            status = VIRTIO_BLK_S_IOERR;
        }
        if status == VIRTIO_BLK_S_OK {
            count_succeeded(st, kind);
        }
        self.complete(
            queues,
            Held {
                queue: index,
                chain: done.chain,
                status_off,
                used_len,
                status,
            },
        )
    }

    /// Writes a finished request's status (through a fresh translation)
    /// and completes it, or holds it while its queue is parked.
    fn complete(&mut self, queues: &mut Queues<'_>, h: Held) -> Result<()> {
        let index = h.queue;
        let head = h.chain.head();
        let st = self.stats.queue(usize::from(index));
        let mut q = match queues.lookup(index) {
            Lookup::Ready(q) => q,
            Lookup::Parked => {
                self.held.push(h);
                return Ok(());
            }
            Lookup::Stopped => {
                st.dropped.fetch_add(1, Relaxed);
                log_limited!(
                    Level::Warn,
                    "queue {index}: request {head} finished after its ring stopped; not completed"
                );
                self.pool.push(h.chain);
                return Ok(());
            }
        };
        // The status goes through a translating write: with IOTLB
        // translation a miss parks the queue until the frontend answers,
        // and the completion waits with it.
        let used = match q.write(&h.chain, h.status_off, &[h.status]) {
            Ok(1) if h.status == VIRTIO_BLK_S_OK => h.used_len,
            Ok(1) => 1,
            Ok(_) => 0,
            Err(e) if e.dma_error().is_some_and(|d| d.is_miss()) => {
                drop(q);
                self.held.push(h);
                return Ok(());
            }
            Err(e) => {
                // Not writable: complete without a status (counted).
                log_limited!(
                    Level::Warn,
                    "queue {index}: request {head}: status not writable ({e}); completed with length 0"
                );
                0
            }
        };
        q.add_used(head, used)?;
        count_done(st, h.status);
        self.touched |= bit(index);
        self.pool.push(h.chain);
        Ok(())
    }

    /// Completes the held requests whose queue serves again.
    fn complete_held(&mut self, queues: &mut Queues<'_>) -> Result<()> {
        for h in std::mem::take(&mut self.held) {
            self.complete(queues, h)?;
        }
        self.flush_notifications(queues)
    }

    /// Signals the driver once for every queue that got completions.
    fn flush_notifications(&mut self, queues: &mut Queues<'_>) -> Result<()> {
        let touched = std::mem::take(&mut self.touched);
        for index in queues.indices().collect::<Vec<_>>() {
            if touched & bit(index) != 0 {
                if let Some(mut q) = queues.get(index) {
                    q.notify()?;
                }
            }
        }
        Ok(())
    }
}

impl Worker for BlkWorker {
    fn init(&mut self, events: &mut EventRegistrar<'_>) -> Result<()> {
        if let Some(ctx) = events.context() {
            let f = ctx.features();
            self.limits.discard = f & config::VIRTIO_BLK_F_DISCARD != 0;
            self.limits.write_zeroes = f & config::VIRTIO_BLK_F_WRITE_ZEROES != 0;
            self.limits.flush = f & config::VIRTIO_BLK_F_FLUSH != 0;
        }
        if let Some((_, ev)) = &self.ring {
            events
                .add(ev, Interest::Readable, URING_TOKEN)
                .map_err(|source| ioasis::device::DeviceError::Io {
                    op: "watching the io_uring eventfd",
                    source,
                })?;
        }
        Ok(())
    }

    fn process_queue(&mut self, index: u16, queues: &mut Queues<'_>) -> Result<()> {
        self.serve_queue(index, queues)?;
        // I/O served from the page cache completes at submission: finish
        // it now rather than after a round trip through the eventfd.
        if self
            .ring
            .as_mut()
            .is_some_and(|(r, _)| !r.completion().is_empty())
        {
            self.reap(queues)?;
        }
        Ok(())
    }

    fn handle_event(&mut self, _token: u64, queues: &mut Queues<'_>) -> Result<()> {
        if !self.held.is_empty() {
            self.complete_held(queues)?;
        }
        self.reap(queues)?;
        // Slots freed: serve the queues that stopped for lack of them.
        if self.starved != 0 && !queues.dma().drain_requested() {
            self.serve_starved(queues)?;
        }
        Ok(())
    }

    fn before_sleep(&mut self, queues: &mut Queues<'_>) -> Result<Idle> {
        if self.starved != 0 {
            if queues.dma().drain_requested() {
                // An unmap waits for our I/O: look again in a new section.
                return Ok(Idle::Poll);
            }
            self.serve_starved(queues)?;
            if self.chains_left_unwatched() {
                // A full ring wakes us with its completions; this does not.
                return Ok(Idle::Poll);
            }
        }
        let Some(window) = self.window.as_mut() else {
            return Ok(Idle::Sleep);
        };
        let now = Instant::now();
        let work = std::mem::replace(&mut self.seen_work, self.work) != self.work;
        let preempted = self.preempt.as_mut().is_some_and(|p| p.since_last());
        let idle = if preempted && self.polling {
            // Another task wants this CPU (the driver, perhaps): polling
            // would only delay it.
            window.preempted(now)
        } else {
            window.observe(now, work)
        };
        if idle == Idle::Sleep {
            if std::mem::take(&mut self.polling) {
                // Kicks back on, and the ring checked once more after.
                self.serve_all(queues, Serve::Rearm)?;
                if self.chains_left_unwatched() && !cfg!(ioasis_broken = "sleepstarved") {
                    // The re-check found chains the pass could not take
                    // (a driver that adds one per completion outruns the
                    // pass's bound): the driver may not kick for them, so
                    // serve again rather than sleep.
                    return Ok(Idle::Poll);
                }
            }
            return Ok(Idle::Sleep);
        }
        if !self.polling {
            self.polling = true;
            if let Some(p) = self.preempt.as_mut() {
                // A baseline: what the thread lost before polling is not
                // the polling's.
                p.since_last();
            }
        }
        self.poll_slice(queues)?;
        Ok(Idle::Poll)
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn drain(&mut self, queues: &mut Queues<'_>) -> Result<()> {
        // An unmap waits for our I/O. File and block I/O completes within
        // its device's latency; cancelling it would fail guest requests on
        // every invalidation (a guest in strict IOMMU mode invalidates on
        // each unmap of any buffer), so the worker only stops starting new
        // I/O (see `start`) and reaps what completed.
        self.reap(queues)
    }
}

impl Drop for BlkWorker {
    fn drop(&mut self) {
        // The framework waited for our I/O; whatever is left is cancelled
        // and waited for (bounded), so the kernel does not write guest
        // pages after the pins go.
        let Some((ring, _)) = self.ring.as_mut() else {
            return;
        };
        let mut left = self.slots.iter().filter(|s| s.is_some()).count();
        for _ in 0..DROP_ROUNDS {
            if left == 0 {
                break;
            }
            let _ = ring.submit();
            for c in ring.completion() {
                if c.user_data() & CANCEL_TAG == 0 {
                    left = left.saturating_sub(1);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn bit(index: u16) -> u64 {
    1u64.checked_shl(u32::from(index)).unwrap_or(0)
}

/// True when every iovec is aligned to `align` in address and length (what
/// `O_DIRECT` needs).
fn aligned(iov: &[libc::iovec], align: u32) -> bool {
    let a = align.max(512) as usize;
    iov.iter()
        .all(|v| (v.iov_base as usize) % a == 0 && v.iov_len % a == 0)
}

/// Counts a request of kind `op` that succeeded, by kind and bytes.
fn count_succeeded(st: &QueueStats, op: Op) {
    match op {
        Op::Read { len, .. } => {
            st.reads.fetch_add(1, Relaxed);
            st.bytes_read.fetch_add(len, Relaxed);
        }
        Op::Write { len, .. } => {
            st.writes.fetch_add(1, Relaxed);
            st.bytes_written.fetch_add(len, Relaxed);
        }
        Op::Flush => {
            st.flushes.fetch_add(1, Relaxed);
        }
        Op::Discard { .. } => {
            st.discards.fetch_add(1, Relaxed);
        }
        Op::WriteZeroes { .. } => {
            st.write_zeroes.fetch_add(1, Relaxed);
        }
        Op::GetId => {}
    }
}

fn count_done(st: &QueueStats, status: u8) {
    st.requests.fetch_add(1, Relaxed);
    if status != VIRTIO_BLK_S_OK {
        st.errors.fetch_add(1, Relaxed);
    }
}

/// Reads (or writes, if `write`) the whole of `iov` at `offset` of `fd`,
/// going on after short transfers (at most a few rounds: a file on a
/// memory file system transfers all at once but for a signal); returns the
/// bytes done, short only at the end of the file. `iov` is consumed.
///
/// Raw `preadv`/`pwritev` rather than nix's: the buffers are guest memory
/// the framework translated, which Rust slices must not alias.
fn rw_all(fd: RawFd, iov: &mut [libc::iovec], offset: u64, write: bool) -> std::io::Result<u64> {
    let mut done = 0u64;
    let mut first = 0;
    for _ in 0..16 {
        let rest = &iov[first..];
        if rest.is_empty() {
            break;
        }
        let at = i64::try_from(offset + done).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let count =
            libc::c_int::try_from(rest.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        // SAFETY: every iovec points at guest memory the framework
        // translated in the caller's access section, with the access the
        // direction needs (writable for a read into it), and stays valid
        // until that section ends, after this call; the kernel checks the
        // ranges. `rest` outlives the call.
        let n = unsafe {
            if write {
                libc::pwritev(fd, rest.as_ptr(), count, at)
            } else {
                libc::preadv(fd, rest.as_ptr(), count, at)
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        let mut n = n as usize;
        done += n as u64;
        while n > 0 && first < iov.len() {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: `n` < the iovec's length: the base stays inside
                // the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `O_DIRECT` refused with `EINVAL` (alignment) or `EFAULT` (memory
    /// the kernel cannot pin, as Linux 6.12's VDUSE bounce buffer) is
    /// retried buffered, once; other errors, and buffered I/O, are not.
    #[test]
    fn test_direct_refusals_retry_buffered() {
        for err in [libc::EINVAL, libc::EFAULT] {
            let r = retry_of(
                IoOp::Readv {
                    offset: 4096,
                    len: 512,
                    direct: true,
                },
                -err,
            );
            assert!(
                matches!(
                    r,
                    Some(IoOp::Readv {
                        offset: 4096,
                        len: 512,
                        direct: false
                    })
                ),
                "{err}: {r:?}"
            );
            let w = retry_of(
                IoOp::Writev {
                    offset: 0,
                    len: 8192,
                    direct: true,
                },
                -err,
            );
            assert!(
                matches!(
                    w,
                    Some(IoOp::Writev {
                        offset: 0,
                        len: 8192,
                        direct: false
                    })
                ),
                "{err}: {w:?}"
            );
            // Buffered I/O failing the same way is an I/O error.
            for op in [
                IoOp::Readv {
                    offset: 0,
                    len: 512,
                    direct: false,
                },
                IoOp::Writev {
                    offset: 0,
                    len: 512,
                    direct: false,
                },
            ] {
                assert!(retry_of(op, -err).is_none(), "{err}: {op:?}");
            }
        }
        for err in [libc::EIO, libc::ENOSPC, libc::EOPNOTSUPP] {
            let op = IoOp::Readv {
                offset: 0,
                len: 512,
                direct: true,
            };
            assert!(retry_of(op, -err).is_none(), "{err}");
        }
        // Success and short transfers are not retried.
        let op = IoOp::Writev {
            offset: 0,
            len: 512,
            direct: true,
        };
        assert!(retry_of(op, 512).is_none());
        assert!(retry_of(op, 100).is_none());
        assert!(retry_of(IoOp::Fsync, -libc::EFAULT).is_none());
    }

    /// `ZERO_RANGE` refused by the file system becomes a hole punched.
    #[test]
    fn test_zero_range_unsupported_punches() {
        let range = ZeroRange {
            offset: 0,
            len: 4096,
            unmap: false,
        };
        let r = retry_of(
            IoOp::Fallocate {
                range,
                mode: libc::FALLOC_FL_ZERO_RANGE,
            },
            -libc::EOPNOTSUPP,
        );
        assert!(
            matches!(r, Some(IoOp::Fallocate { mode, .. })
                if mode == libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
            "{r:?}"
        );
        assert!(retry_of(
            IoOp::Fallocate {
                range,
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            },
            -libc::EOPNOTSUPP
        )
        .is_none());
    }
}
