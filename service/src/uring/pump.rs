//! The server side of a fault channel: moves fault groups out of a fault
//! queue into the channel socket and page responses back in.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use log::debug;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, MsgFlags};
use thiserror::Error;

use crate::sys::scm::send_with_fds;

use super::channel::{MAX_RECORDS_PER_PACKET, MAX_RESPONSE_PACKET};
use super::record::{
    decode_responses, encode_record, FaultRecord, PageResponse, Rejection, FAULT_RECORD_SIZE,
    PAGE_RESPONSE_SIZE,
};

/// Where fault groups come from and where their answers go: the consumer
/// side of a fault queue.
pub trait FaultSource {
    /// An fd that polls readable while groups are waiting to be read.
    fn ready_fd(&self) -> BorrowedFd<'_>;

    /// Appends whole groups, at most `max` records in all, to `out`; returns
    /// the number of records appended (0 when none is waiting). Only whole
    /// groups are returned; a source bounds its groups to
    /// [`MAX_RECORDS_PER_PACKET`] records so that one always fits.
    fn read_groups(&mut self, out: &mut Vec<FaultRecord>, max: usize) -> Result<usize, i32>;

    /// Answers groups. On failure returns the index of the first response
    /// that was refused and its errno; the responses before it took effect,
    /// the ones after it were not looked at.
    fn respond(&mut self, responses: &[PageResponse]) -> Result<(), (usize, i32)>;
}

/// Most packets one [`FaultPump::pump_in`] or [`FaultPump::pump_out`] call
/// handles, so that a flooding consumer cannot hold the loop; the socket
/// stays readable (level-triggered) and the loop comes back.
pub const MAX_PACKETS_PER_CALL: usize = 64;

/// Errors of the fault pump.
#[derive(Debug, Error)]
pub enum PumpError {
    /// Reading groups from the fault source failed.
    #[error("reading fault groups failed with errno {0}")]
    Source(i32),
    /// Sending to the channel failed.
    #[error("sending fault records on the channel failed")]
    Send(#[source] io::Error),
    /// Receiving from the channel failed.
    #[error("receiving page responses from the channel failed")]
    Recv(#[source] io::Error),
    /// The consumer closed its end.
    #[error("the fault channel consumer has gone")]
    Closed,
}

/// What a pump step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PumpStats {
    /// Fault records sent to the consumer.
    pub records_out: u64,
    /// Packets sent to the consumer.
    pub packets_out: u64,
    /// Page responses applied.
    pub responses_in: u64,
    /// Page responses refused (reported back as status packets).
    pub rejected: u64,
    /// Malformed packets from the consumer (dropped and counted).
    pub malformed: u64,
}

/// Server end of a fault channel, bound to one fault source.
///
/// Drive it from any loop: call [`pump_out`](Self::pump_out) when
/// [`FaultSource::ready_fd`] polls readable (or [`wants_writable`](Self::wants_writable)
/// and the socket polls writable), and [`pump_in`](Self::pump_in) when
/// [`socket`](Self::socket) polls readable. Both are non-blocking.
#[derive(Debug)]
pub struct FaultPump<S> {
    source: S,
    fd: OwnedFd,
    out: Vec<u8>,
    pending: usize,
    records: Vec<FaultRecord>,
    responses: Vec<PageResponse>,
    inbuf: Box<[u8]>,
    stats: PumpStats,
    packet_limit: usize,
}

impl<S: FaultSource> FaultPump<S> {
    /// A pump between `source` and the server end `fd` of a channel.
    pub fn new(source: S, fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_fd())?;
        Ok(FaultPump {
            source,
            fd,
            out: Vec::with_capacity(MAX_RECORDS_PER_PACKET * FAULT_RECORD_SIZE),
            pending: 0,
            records: Vec::with_capacity(MAX_RECORDS_PER_PACKET),
            responses: Vec::with_capacity(MAX_RESPONSE_PACKET / PAGE_RESPONSE_SIZE),
            inbuf: vec![0u8; MAX_RESPONSE_PACKET + 1].into_boxed_slice(),
            stats: PumpStats::default(),
            packet_limit: MAX_RECORDS_PER_PACKET,
        })
    }

    /// Limits the records per packet (1..=[`MAX_RECORDS_PER_PACKET`]). A
    /// group larger than the limit makes the source fail (`EINVAL`), so
    /// keep it at least the largest group. A limit of 1 gives one packet
    /// per one-record group: the per-record baseline of the benchmarks.
    pub fn set_packet_limit(&mut self, records: usize) {
        self.packet_limit = records.clamp(1, MAX_RECORDS_PER_PACKET);
    }

    /// The channel socket (server end).
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The fault source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// The fault source, mutably.
    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// Counters since creation.
    pub fn stats(&self) -> PumpStats {
        self.stats
    }

    /// Whether a packet is waiting for the socket to become writable.
    pub fn wants_writable(&self) -> bool {
        self.pending > 0
    }

    /// Whether the consumer's end of the channel is closed (every copy of
    /// its fd; the socket polls hung up). A service uses it as iommufd uses
    /// a fault fd's reference: the queue cannot be destroyed while the
    /// consumer still holds its end. Unknown (poll failed): `false`.
    pub fn consumer_closed(&self) -> bool {
        let mut p = [PollFd::new(self.fd.as_fd(), PollFlags::empty())];
        match poll(&mut p, PollTimeout::ZERO) {
            Ok(_) => p[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
            Err(e) => {
                log::warn!("fault pump: poll of the channel failed: {e}");
                false
            }
        }
    }

    /// Moves waiting groups into the channel, a packet of whole groups at a
    /// time, until the source is empty, the socket is full or
    /// [`MAX_PACKETS_PER_CALL`] packets went. Returns the number of records
    /// sent.
    pub fn pump_out(&mut self) -> Result<usize, PumpError> {
        let mut sent = 0;
        for _ in 0..MAX_PACKETS_PER_CALL {
            if self.pending == 0 {
                self.records.clear();
                let n = self
                    .source
                    .read_groups(&mut self.records, self.packet_limit)
                    .map_err(PumpError::Source)?;
                if n == 0 {
                    return Ok(sent);
                }
                self.out.clear();
                for r in &self.records {
                    let mut b = [0u8; FAULT_RECORD_SIZE];
                    encode_record(r, &mut b);
                    self.out.extend_from_slice(&b);
                }
                self.pending = n;
            }
            match socket::send(
                self.fd.as_raw_fd(),
                &self.out,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(_) => {
                    sent += self.pending;
                    self.stats.records_out += self.pending as u64;
                    self.stats.packets_out += 1;
                    self.pending = 0;
                }
                Err(Errno::EAGAIN) => return Ok(sent),
                Err(Errno::EINTR) => continue,
                Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(PumpError::Closed),
                Err(e) => return Err(PumpError::Send(e.into())),
            }
        }
        Ok(sent)
    }

    /// Applies the response packets waiting on the socket (at most
    /// [`MAX_PACKETS_PER_CALL`]). Refused responses are reported to the
    /// consumer with a status packet and processing goes on with the next
    /// one; a malformed packet is dropped and counted. Returns the number of
    /// responses applied.
    pub fn pump_in(&mut self) -> Result<usize, PumpError> {
        let mut applied = 0;
        for _ in 0..MAX_PACKETS_PER_CALL {
            let n = match socket::recv(self.fd.as_raw_fd(), &mut self.inbuf, MsgFlags::MSG_DONTWAIT)
            {
                Ok(0) => return Err(PumpError::Closed),
                Ok(n) => n,
                Err(Errno::EAGAIN) => return Ok(applied),
                Err(Errno::EINTR) => continue,
                Err(Errno::ECONNRESET) => return Err(PumpError::Closed),
                Err(e) => return Err(PumpError::Recv(e.into())),
            };
            self.responses.clear();
            if n > MAX_RESPONSE_PACKET {
                self.stats.malformed += 1;
                crate::log_limited!(
                    log::Level::Warn,
                    "fault pump: oversize response packet ({n} bytes) dropped"
                );
                continue;
            }
            if let Err(e) = decode_responses(&self.inbuf[..n], &mut self.responses) {
                self.stats.malformed += 1;
                crate::log_limited!(
                    log::Level::Warn,
                    "fault pump: malformed response packet dropped: {e}"
                );
                if let super::record::RecordError::BadCode { index, code } = e {
                    let off = index * PAGE_RESPONSE_SIZE;
                    let mut w = [0u8; 4];
                    w.copy_from_slice(&self.inbuf[off..off + 4]);
                    self.reject(Rejection {
                        cookie: u32::from_le_bytes(w),
                        code,
                        errno: libc::EINVAL,
                    })?;
                }
                continue;
            }
            let mut start = 0;
            let mut here = 0;
            while start < self.responses.len() {
                match self.source.respond(&self.responses[start..]) {
                    Ok(()) => {
                        here += self.responses.len() - start;
                        break;
                    }
                    Err((idx, errno)) => {
                        let idx = idx.min(self.responses.len() - start - 1);
                        here += idx;
                        let r = self.responses[start + idx];
                        debug!(
                            "fault pump: response for cookie {} refused: errno {errno}",
                            r.cookie
                        );
                        self.reject(Rejection {
                            cookie: r.cookie,
                            code: r.code as u32,
                            errno,
                        })?;
                        start += idx + 1;
                    }
                }
            }
            applied += here;
            self.stats.responses_in += here as u64;
        }
        Ok(applied)
    }

    fn reject(&mut self, r: Rejection) -> Result<(), PumpError> {
        self.stats.rejected += 1;
        let pkt = r.encode();
        let iov = [IoSlice::new(&pkt)];
        // A status packet is best effort: if the consumer's socket is full
        // it would not read it soon anyway.
        match send_with_fds(self.fd.as_fd(), &iov, &[], MsgFlags::MSG_DONTWAIT) {
            Ok(_) | Err(Errno::EAGAIN) => Ok(()),
            Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => Err(PumpError::Closed),
            Err(e) => Err(PumpError::Send(e.into())),
        }
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}
