//! The consumer side of a fault channel, driven by io_uring.
//!
//! A fault channel is one end of a `SOCK_SEQPACKET` unix socket pair. The
//! other end belongs to a [`FaultPump`](super::FaultPump) next to the fault
//! queue. Every packet from the pump carries one or more whole fault groups
//! (40-byte records) or one 16-byte status packet; every packet to the pump
//! carries one or more 8-byte page responses (see [`super::record`]).
//!
//! [`FaultChannel`] keeps one multishot receive armed on the socket, with a
//! group of provided buffers, so the kernel lands packets in those buffers
//! without a syscall per packet; the consumer reaps all of them with one
//! `io_uring_enter`, and submits its responses (one send per batch) in the
//! same call ([`FaultChannel::respond_and_recv`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::sys::eventfd::{self, EventFd};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use log::warn;
use thiserror::Error;

use super::record::{
    decode_records, encode_response, FaultRecord, PageResponse, RecordError, Rejection,
    FAULT_RECORD_SIZE, PAGE_RESPONSE_SIZE, STATUS_PACKET_SIZE,
};

/// Largest number of fault records the pump puts in one packet.
pub const MAX_RECORDS_PER_PACKET: usize = 256;
/// Largest packet the pump sends (whole groups of records).
pub const MAX_FAULT_PACKET: usize = MAX_RECORDS_PER_PACKET * FAULT_RECORD_SIZE;
/// Largest number of responses the consumer puts in one packet.
pub const MAX_RESPONSES_PER_PACKET: usize = 512;
/// Largest packet the consumer sends.
pub const MAX_RESPONSE_PACKET: usize = MAX_RESPONSES_PER_PACKET * PAGE_RESPONSE_SIZE;

/// Number of provided receive buffers.
const RECV_BUFFERS: u16 = 16;
/// Size of each provided receive buffer: one packet.
const RECV_BUFFER_SIZE: usize = MAX_FAULT_PACKET;
/// Buffer group id of the receive buffers.
const RECV_GROUP: u16 = 0;
/// Number of send buffers that may be in flight at once.
const SEND_SLOTS: usize = 8;
/// Submission queue depth.
const RING_ENTRIES: u32 = 64;

const TAG_RECV: u64 = 1 << 32;
const TAG_PROVIDE: u64 = 2 << 32;
const TAG_SEND: u64 = 3 << 32;
const TAG_CANCEL: u64 = 4 << 32;
const TAG_MASK: u64 = 0xffff_ffff << 32;

/// Errors of the fault channel consumer.
#[derive(Debug, Error)]
pub enum ChannelError {
    /// Setting up the io_uring instance failed.
    #[error("cannot set up io_uring for the fault channel")]
    Setup(#[source] io::Error),
    /// `io_uring_enter` failed.
    #[error("io_uring_enter failed on the fault channel")]
    Enter(#[source] io::Error),
    /// The receive failed.
    #[error("receive on the fault channel failed")]
    Recv(#[source] io::Error),
    /// A send of responses failed.
    #[error("send of page responses on the fault channel failed")]
    Send(#[source] io::Error),
    /// The pump sent a packet that does not decode.
    #[error("malformed packet of {len} bytes from the fault pump")]
    Malformed {
        /// Packet length.
        len: usize,
        /// What was wrong.
        #[source]
        source: RecordError,
    },
    /// The pump end is closed: the fault queue is gone.
    #[error("fault channel closed by the server")]
    Closed,
}

/// Result alias of the fault channel.
pub type Result<T> = std::result::Result<T, ChannelError>;

/// How long [`FaultChannel::recv`] may wait for records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Reap only what is already there.
    Poll,
    /// Poll for up to this long (non-blocking `io_uring_enter` calls, which
    /// run the kernel's task work at once), then block.
    SpinThenBlock(Duration),
    /// Block for up to this long.
    Timeout(Duration),
    /// Block until at least one packet arrives.
    Forever,
}

/// What one receive produced.
#[derive(Debug, Default)]
pub struct FaultBatch {
    /// Fault records, whole groups, in arrival order.
    pub records: Vec<FaultRecord>,
    /// Responses the server refused since the last receive.
    pub rejected: Vec<Rejection>,
}

impl FaultBatch {
    /// An empty batch with room for `n` records.
    pub fn with_capacity(n: usize) -> Self {
        FaultBatch {
            records: Vec::with_capacity(n),
            rejected: Vec::new(),
        }
    }

    /// Empties the batch, keeping its capacity.
    pub fn clear(&mut self) {
        self.records.clear();
        self.rejected.clear();
    }

    /// The cookies of the groups completed in this batch (one per group, in
    /// order): the cookie of each record that has LAST_PAGE.
    pub fn group_cookies(&self) -> impl Iterator<Item = u32> + '_ {
        self.records
            .iter()
            .filter(|r| r.is_last())
            .map(|r| r.cookie)
    }
}

/// Consumer end of a fault channel: reads fault records and writes page
/// responses in batches through io_uring.
///
/// Field order matters: the ring is dropped (after draining) before the
/// buffers the kernel may write into.
pub struct FaultChannel {
    ring: IoUring,
    fd: OwnedFd,
    /// Registered on first use of `completion_fd` (it costs a read per
    /// reap, which the blocking receive loop does not need).
    completion: Option<EventFd>,
    recv_bufs: Box<[u8]>,
    send_bufs: Box<[[u8; MAX_RESPONSE_PACKET]]>,
    free_send: Vec<usize>,
    recv_armed: bool,
    /// The thread that armed the receive: io_uring runs a request's task
    /// work in the task that submitted it, so the receive is re-armed from
    /// the thread that consumes.
    armed_by: Option<std::thread::ThreadId>,
    closed: bool,
    send_error: Option<io::Error>,
    cqes: Vec<cqueue::Entry>,
    provide: Vec<u16>,
    /// Records and status packets reaped while no receive was asking
    /// (while waiting for a send slot); handed out by the next receive.
    stash: FaultBatch,
}

impl std::fmt::Debug for FaultChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultChannel")
            .field("fd", &self.fd.as_raw_fd())
            .field("recv_armed", &self.recv_armed)
            .field("closed", &self.closed)
            .finish()
    }
}

impl FaultChannel {
    /// Wraps the consumer end of a fault channel (an fd received from the
    /// service or made by [`fault_channel_pair`](super::fault_channel_pair)).
    pub fn new(fd: OwnedFd) -> Result<Self> {
        let ring = IoUring::builder()
            .setup_clamp()
            .build(RING_ENTRIES)
            .map_err(ChannelError::Setup)?;
        let mut ch = FaultChannel {
            ring,
            fd,
            completion: None,
            recv_bufs: vec![0u8; RECV_BUFFER_SIZE * usize::from(RECV_BUFFERS)].into_boxed_slice(),
            send_bufs: vec![[0u8; MAX_RESPONSE_PACKET]; SEND_SLOTS].into_boxed_slice(),
            free_send: (0..SEND_SLOTS).collect(),
            recv_armed: false,
            armed_by: None,
            closed: false,
            send_error: None,
            cqes: Vec::with_capacity(RING_ENTRIES as usize * 2),
            provide: Vec::with_capacity(usize::from(RECV_BUFFERS)),
            stash: FaultBatch::default(),
        };
        let provide = opcode::ProvideBuffers::new(
            ch.recv_bufs.as_mut_ptr(),
            RECV_BUFFER_SIZE as i32,
            RECV_BUFFERS,
            RECV_GROUP,
            0,
        )
        .build()
        .user_data(TAG_PROVIDE);
        ch.push(&provide)?;
        // Armed here so that `completion_fd` works at once; the first
        // receive call from another thread moves it to that thread.
        ch.arm_recv()?;
        ch.ring.submit().map_err(ChannelError::Enter)?;
        Ok(ch)
    }

    /// The socket of the channel. Its data is taken by the ring's
    /// receive: to wait in another event loop, poll
    /// [`completion_fd`](Self::completion_fd) instead.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// An eventfd that polls readable when the ring has completions (records
    /// or status packets arrived): put it in an epoll loop and call
    /// [`recv`](Self::recv) with [`Wait::Poll`] when it fires. Registered
    /// on the first call.
    pub fn completion_fd(&mut self) -> Result<BorrowedFd<'_>> {
        if self.completion.is_none() {
            let efd = eventfd::nonblocking().map_err(ChannelError::Setup)?;
            self.ring
                .submitter()
                .register_eventfd(efd.as_raw_fd())
                .map_err(ChannelError::Setup)?;
            // Completions that came before the registration did not signal.
            if !self.ring.completion().is_empty() || !self.stash.records.is_empty() {
                let _ = efd.write(1);
            }
            self.completion = Some(efd);
        }
        match &self.completion {
            Some(e) => Ok(eventfd::borrow(e)),
            None => Err(ChannelError::Setup(io::Error::from_raw_os_error(
                libc::EBADF,
            ))),
        }
    }

    /// Whether the server end has closed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    fn push(&mut self, entry: &squeue::Entry) -> Result<()> {
        // Make room: a full submission queue is flushed to the kernel first.
        if self.ring.submission().is_full() {
            self.ring.submit().map_err(ChannelError::Enter)?;
        }
        // SAFETY: every entry pushed here points only at memory owned by
        // `self` (receive buffers, send slots) or at nothing; that memory
        // lives until the ring is drained in `Drop`, and a send slot is not
        // reused before its completion is reaped.
        let pushed = unsafe { self.ring.submission().push(entry) };
        pushed.map_err(|_| ChannelError::Enter(io::Error::from_raw_os_error(libc::EBUSY)))
    }

    fn arm_recv(&mut self) -> Result<()> {
        let entry = opcode::RecvMulti::new(types::Fd(self.fd.as_raw_fd()), RECV_GROUP)
            .build()
            .user_data(TAG_RECV);
        self.push(&entry)?;
        self.recv_armed = true;
        self.armed_by = Some(std::thread::current().id());
        Ok(())
    }

    /// Arms the receive from this thread, or moves it here: cancels a
    /// receive armed by another thread (the cancellation completes it
    /// without `MORE`, and `reap` re-arms from the reaping thread).
    fn ensure_armed(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        let me = std::thread::current().id();
        if !self.recv_armed {
            return self.arm_recv();
        }
        if self.armed_by != Some(me) {
            let entry = opcode::AsyncCancel::new(TAG_RECV)
                .build()
                .user_data(TAG_CANCEL);
            self.push(&entry)?;
            // Do not cancel twice; the re-arm resets it.
            self.armed_by = Some(me);
        }
        Ok(())
    }

    fn reprovide(&mut self, bid: u16) -> Result<()> {
        let off = usize::from(bid) * RECV_BUFFER_SIZE;
        // The pointer is in bounds: `bid < RECV_BUFFERS` is checked by the
        // caller, so `off + RECV_BUFFER_SIZE <= recv_bufs.len()`.
        let addr = self.recv_bufs[off..].as_mut_ptr();
        let entry = opcode::ProvideBuffers::new(addr, RECV_BUFFER_SIZE as i32, 1, RECV_GROUP, bid)
            .build()
            .user_data(TAG_PROVIDE);
        self.push(&entry)
    }

    /// Queues page responses, one send per packet of at most
    /// [`MAX_RESPONSES_PER_PACKET`]; they reach the kernel at the next
    /// `io_uring_enter` (any call of this type that submits). Call
    /// [`flush`](Self::flush) to submit now.
    pub fn queue_responses(&mut self, responses: &[PageResponse]) -> Result<()> {
        if self.closed {
            return Err(ChannelError::Closed);
        }
        if let Some(e) = self.send_error.take() {
            return Err(ChannelError::Send(e));
        }
        for chunk in responses.chunks(MAX_RESPONSES_PER_PACKET) {
            let slot = loop {
                if let Some(s) = self.free_send.pop() {
                    break s;
                }
                // Every slot is in flight: wait for one send to complete.
                self.enter_wait()?;
                let mut stash = std::mem::take(&mut self.stash);
                let r = self.reap(&mut stash);
                self.stash = stash;
                r?;
                if self.closed {
                    return Err(ChannelError::Closed);
                }
            };
            let buf = &mut self.send_bufs[slot];
            for (i, r) in chunk.iter().enumerate() {
                let mut b = [0u8; PAGE_RESPONSE_SIZE];
                encode_response(r, &mut b);
                buf[i * PAGE_RESPONSE_SIZE..(i + 1) * PAGE_RESPONSE_SIZE].copy_from_slice(&b);
            }
            let len = chunk.len() * PAGE_RESPONSE_SIZE;
            let entry = opcode::Send::new(
                types::Fd(self.fd.as_raw_fd()),
                self.send_bufs[slot].as_ptr(),
                len as u32,
            )
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(TAG_SEND | slot as u64);
            self.push(&entry)?;
        }
        Ok(())
    }

    /// Submits queued responses without waiting.
    pub fn flush(&mut self) -> Result<()> {
        self.ring.submit().map_err(ChannelError::Enter)?;
        Ok(())
    }

    /// Sends page responses: queue them and submit.
    pub fn respond(&mut self, responses: &[PageResponse]) -> Result<()> {
        self.queue_responses(responses)?;
        self.flush()
    }

    /// Receives whatever fault records (whole groups) and status packets are
    /// pending, waiting as `wait` says; returns the number of records
    /// appended to `batch.records`. `Ok(0)` after a wait means the time ran
    /// out. [`ChannelError::Closed`] once the server end is gone and every
    /// packet has been read.
    pub fn recv(&mut self, batch: &mut FaultBatch, wait: Wait) -> Result<usize> {
        self.respond_and_recv(&[], batch, wait)
    }

    /// Sends `responses` and receives pending records in the same
    /// `io_uring_enter`: the steady-state loop of a consumer.
    pub fn respond_and_recv(
        &mut self,
        responses: &[PageResponse],
        batch: &mut FaultBatch,
        wait: Wait,
    ) -> Result<usize> {
        if !responses.is_empty() {
            self.queue_responses(responses)?;
        }
        let before = batch.records.len();
        let rejected_before = batch.rejected.len();
        // Whatever was reaped while waiting for a send slot comes first.
        batch.records.append(&mut self.stash.records);
        batch.rejected.append(&mut self.stash.rejected);
        self.ensure_armed()?;
        // First pass: submit, reap what is ready.
        self.ring.submit().map_err(ChannelError::Enter)?;
        self.reap(batch)?;
        let got = |b: &FaultBatch| b.records.len() > before || b.rejected.len() > rejected_before;
        if got(batch) || self.closed {
            return self.finish(batch, before);
        }
        match wait {
            Wait::Poll => {}
            Wait::Forever => {
                // Bounded only by the peer: the pump closing ends it.
                while !got(batch) && !self.closed {
                    self.enter_wait()?;
                    self.reap(batch)?;
                }
            }
            Wait::Timeout(d) => {
                self.wait_until(batch, Instant::now() + d, before, rejected_before)?
            }
            Wait::SpinThenBlock(spin) => {
                let deadline = Instant::now() + spin;
                let mut i = 0u32;
                while !got(batch) && !self.closed {
                    // Read the clock only every 64 polls of the ring.
                    i = i.wrapping_add(1);
                    if i % 64 == 0 && Instant::now() >= deadline {
                        break;
                    }
                    // A (cheap) enter runs the task work that posts the
                    // receive completions; a pure userspace spin on the
                    // completion ring could wait for the next tick.
                    self.ring.submit().map_err(ChannelError::Enter)?;
                    self.reap(batch)?;
                }
                if !got(batch) && !self.closed {
                    self.enter_wait()?;
                    self.reap(batch)?;
                    while !got(batch) && !self.closed {
                        self.enter_wait()?;
                        self.reap(batch)?;
                    }
                }
            }
        }
        self.finish(batch, before)
    }

    /// Submits and blocks for at least one completion; a signal is not an
    /// error (the caller loops).
    fn enter_wait(&mut self) -> Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(ChannelError::Enter(e)),
        }
    }

    fn wait_until(
        &mut self,
        batch: &mut FaultBatch,
        deadline: Instant,
        before: usize,
        rejected_before: usize,
    ) -> Result<()> {
        loop {
            if batch.records.len() > before || batch.rejected.len() > rejected_before || self.closed
            {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            let left = deadline - now;
            let ts = types::Timespec::new()
                .sec(left.as_secs())
                .nsec(left.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(ChannelError::Enter(e)),
            }
            self.reap(batch)?;
        }
    }

    fn finish(&mut self, batch: &FaultBatch, before: usize) -> Result<usize> {
        let n = batch.records.len() - before;
        if n == 0 && self.closed {
            return Err(ChannelError::Closed);
        }
        if let Some(e) = self.send_error.take() {
            return Err(ChannelError::Send(e));
        }
        Ok(n)
    }

    /// Reaps every completion; records and status packets go to `batch`.
    fn reap(&mut self, batch: &mut FaultBatch) -> Result<()> {
        let mut rearm = false;
        let mut first_err = None;
        let mut cqes = std::mem::take(&mut self.cqes);
        let mut provide = std::mem::take(&mut self.provide);
        cqes.clear();
        provide.clear();
        cqes.extend(self.ring.completion());
        if cqes.is_empty() {
            self.cqes = cqes;
            self.provide = provide;
            return Ok(());
        }
        // Drain the completion eventfd, then look again: a completion
        // posted after the drain signals it anew, so none is missed by a
        // loop polling `completion_fd`.
        if let Some(efd) = &self.completion {
            let _ = efd.read();
            cqes.extend(self.ring.completion());
        }
        for cqe in cqes.drain(..) {
            let ud = cqe.user_data();
            let res = cqe.result();
            match ud & TAG_MASK {
                TAG_RECV => {
                    let more = cqueue::more(cqe.flags());
                    if !more {
                        self.recv_armed = false;
                    }
                    let bid = cqueue::buffer_select(cqe.flags());
                    if res < 0 {
                        if res == -libc::ENOBUFS || res == -libc::ECANCELED {
                            rearm = true;
                        } else if res == -libc::ECONNRESET || res == -libc::EPIPE {
                            self.closed = true;
                        } else if first_err.is_none() {
                            first_err =
                                Some(ChannelError::Recv(io::Error::from_raw_os_error(-res)));
                        }
                    } else if res == 0 {
                        self.closed = true;
                    } else {
                        rearm |= !more;
                    }
                    let Some(bid) = bid else { continue };
                    if bid >= RECV_BUFFERS {
                        warn!("fault channel: kernel returned unknown buffer id {bid}");
                        continue;
                    }
                    if res > 0 {
                        let off = usize::from(bid) * RECV_BUFFER_SIZE;
                        let len = (res as usize).min(RECV_BUFFER_SIZE);
                        let packet = &self.recv_bufs[off..off + len];
                        if let Err(e) = decode_packet(packet, batch) {
                            warn!("fault channel: {e}");
                            if first_err.is_none() {
                                first_err = Some(e);
                            }
                        }
                    }
                    provide.push(bid);
                }
                TAG_SEND => {
                    let slot = (ud & !TAG_MASK) as usize;
                    if slot < SEND_SLOTS {
                        self.free_send.push(slot);
                    }
                    if res < 0 {
                        if res == -libc::EPIPE || res == -libc::ECONNRESET {
                            self.closed = true;
                        } else {
                            self.send_error = Some(io::Error::from_raw_os_error(-res));
                        }
                    }
                }
                TAG_CANCEL => {}
                TAG_PROVIDE => {
                    if res < 0 {
                        warn!("fault channel: providing buffers failed: {res}");
                    }
                }
                _ => warn!("fault channel: completion with unknown tag {ud:#x}"),
            }
        }
        self.cqes = cqes;
        let mut res = Ok(());
        for bid in provide.drain(..) {
            if let Err(e) = self.reprovide(bid) {
                res = Err(e);
            }
        }
        self.provide = provide;
        res?;
        if rearm && !self.closed && !self.recv_armed {
            self.arm_recv()?;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn decode_packet(packet: &[u8], batch: &mut FaultBatch) -> Result<()> {
    let res = if packet.len() == STATUS_PACKET_SIZE {
        Rejection::decode(packet).map(|r| batch.rejected.push(r))
    } else {
        decode_records(packet, &mut batch.records).map(|_| ())
    };
    res.map_err(|source| ChannelError::Malformed {
        len: packet.len(),
        source,
    })
}

impl Drop for FaultChannel {
    fn drop(&mut self) {
        // Stop the kernel from writing into our buffers before they are
        // freed: shut the socket down so the armed receive completes, then
        // wait (bounded) for it and every in-flight send.
        let _ = nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut scratch = FaultBatch::default();
        while (self.recv_armed || self.free_send.len() < SEND_SLOTS) && Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(10_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.closed = true;
            if self.reap(&mut scratch).is_err() {
                // Keep draining; errors no longer matter.
            }
            scratch.clear();
        }
    }
}
