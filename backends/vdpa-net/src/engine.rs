//! The packet engine: the per-frame work of one queue pair on its rings.
//!
//! Transmit: pop a burst of chains (`Queue::pop_burst`: one avail-index read),
//! copy each into a reused packet buffer (12-byte header first), complete the
//! heads, hand the batch to the port, notify once (the used index is
//! published once). Receive: take frames from the port as long as the
//! receive queue has buffers, popping receive chains 32 at a time and
//! merging buffers with VIRTIO_NET_F_MRG_RXBUF; chains popped but not used
//! by the end of a pass go back to the driver (`Queue::unpop`), so a ring
//! stopped between passes loses none of its buffers and no head is ever
//! completed twice (where a ring cannot take them back, they stay with the
//! engine and are read and written through a fresh translation next pass).
//! Control: the control queue's commands run against the device model.
//!
//! The engine knows nothing of events or of vhost-user: the device's worker
//! ([`crate::vhu_net`]) calls it with the queues of one access section.

use std::sync::{Arc, Mutex};
#[cfg(feature = "fault-injection")]
use std::time::Duration;

use ioasis::device::{Chain, Queue, QueueError};
use ioasis::queue::PREFETCH_AHEAD;
use log::{debug, info, warn};

use crate::net::{
    self, Features, NetDevice, RxFilter, VnetHdr, VIRTIO_NET_ERR, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_OK, VNET_HDR_LEN,
};
use crate::port::{PacketBuf, Port, MAX_FRAME_LEN};
use crate::stats::DeviceStats;

/// Chains taken from a transmit queue, and frames from a port, per burst.
pub const BURST: usize = 64;

/// Receive chains popped at once when a frame needs more than are held.
const RX_POP: usize = 32;
/// Bursts one receive pass may move before it yields to other queues.
const RX_BURSTS_PER_PASS: usize = 16;
/// Bursts one transmit pass may move before it yields: a pass runs inside
/// one DMA access section, which an unmap waits for, so it must end even
/// while the driver keeps the queue full.
const TX_BURSTS_PER_PASS: usize = 32;
/// Most receive buffers one frame may be merged over (`num_buffers` is a u16,
/// and no real driver needs more for a 64 KiB frame).
pub const MAX_MERGED_BUFFERS: usize = 256;
/// Largest control command accepted.
const MAX_CTRL_LEN: usize = net::MAX_CTRL_PAYLOAD + 2;

/// Why receiving stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RxStop {
    /// The port had nothing more (or the burst was full).
    Port,
    /// The driver has no receive buffers.
    NoBuffers,
    /// The port failed (counted and logged): stop watching it until the
    /// driver kicks the receive queue again.
    PortFailed,
}

/// The outcome of a receive pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RxPass {
    /// Frames taken from the port.
    pub(crate) moved: usize,
    /// The driver has no receive buffers.
    pub(crate) blocked: bool,
    /// The pass limit was reached with frames possibly left.
    pub(crate) more: bool,
}

/// I/O address of the first device-writable buffer of `c` (fault injection).
#[cfg(feature = "fault-injection")]
fn first_writable(c: &Chain) -> Option<u64> {
    c.descriptors().iter().find(|d| d.writable).map(|d| d.addr)
}

/// Fault injection: translates `iova` for write in `q`'s access section and
/// registers a write of `data` there, made `delay` after the section ends
/// (see `ioasis::fault_injection`).
#[cfg(feature = "fault-injection")]
fn late_write(q: &Queue<'_>, iova: u64, data: &[u8], delay: Duration) {
    match q
        .dma()
        .fragment(iova, data.len() as u64, ioasis::dma::Access::Write)
    {
        Ok(f) => ioasis::fault_injection::write_after_section(f, data, delay),
        Err(e) => warn!("fault injection: cannot translate {iova:#x}: {e}"),
    }
}

/// Fault injection: once a late write is armed, remembers the buffer of
/// the frame just written into `chain`; the next frame then claims it and
/// is written into that same buffer again after the section ends.
#[cfg(feature = "fault-injection")]
fn inject_late(late: &mut Option<u64>, q: &Queue<'_>, chain: &Chain, parts: &RxParts<'_>) {
    match late.take() {
        // The next frame, again into the first one's buffer, once the
        // section has ended.
        Some(iova) => {
            if let Some(delay) = ioasis::fault_injection::claim(FAULT_KIND) {
                let mut bytes = parts.hdr.to_vec();
                bytes.extend_from_slice(parts.frame);
                late_write(q, iova, &bytes, delay);
            }
        }
        None => {
            if ioasis::fault_injection::armed(FAULT_KIND) {
                *late = first_writable(chain);
            }
        }
    }
}

/// Why a transmit chain's frame was dropped (the chain is still completed,
/// with length 0, and counted as an error).
#[derive(Debug, thiserror::Error)]
pub(crate) enum TxDrop {
    /// The driver gave the device buffers to write on a transmit queue.
    #[error("transmit chain has device-writable buffers")]
    Writable,
    /// Not even the virtio-net header is there.
    #[error("{readable} readable bytes, shorter than the {hdr}-byte header")]
    Short {
        /// Readable bytes of the chain.
        readable: u64,
        /// Header length negotiated.
        hdr: u64,
    },
    /// The frame is larger than a port carries.
    #[error("frame of {len} bytes exceeds {MAX_FRAME_LEN}")]
    TooLong {
        /// Frame length (header excluded).
        len: u64,
    },
    /// The chain yielded fewer bytes than it claims.
    #[error("short read of {got} bytes")]
    ShortRead {
        /// Bytes read.
        got: usize,
    },
    /// Reading the chain failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The header asks for what was not negotiated.
    #[error(transparent)]
    Header(#[from] net::Error),
}

/// Where a receive frame's bytes come from: the header (possibly rewritten)
/// and the frame proper, written as one virtual buffer.
struct RxParts<'a> {
    hdr: &'a [u8],
    frame: &'a [u8],
}

impl RxParts<'_> {
    /// Writes virtual bytes `start..start+len` into `chain` from offset 0.
    fn write_into(
        &self,
        q: &mut Queue<'_>,
        chain: &Chain,
        start: usize,
        len: usize,
    ) -> std::result::Result<(), QueueError> {
        let end = start + len;
        let mut off = 0u64;
        if start < self.hdr.len() {
            let h = &self.hdr[start..end.min(self.hdr.len())];
            off += q.write(chain, 0, h)? as u64;
        }
        let fs = start.max(self.hdr.len()) - self.hdr.len();
        let fe = end.saturating_sub(self.hdr.len());
        if fe > fs {
            q.write(chain, off, &self.frame[fs..fe])?;
        }
        Ok(())
    }
}

/// The packet engine of one queue pair: everything but event plumbing.
pub(crate) struct PairEngine {
    pair: usize,
    label: String,
    stats: Arc<DeviceStats>,
    features: Features,
    hdr_len: usize,
    pub(crate) filter: RxFilter,
    tx_bufs: Vec<PacketBuf>,
    tx_heads: Vec<u16>,
    /// Transmit chains of the current burst.
    tx_chains: Vec<Chain>,
    /// Heads popped whose completion failed (the queue was failing): they
    /// are completed first when the queue serves again, never dropped.
    tx_unacked: Vec<u16>,
    chain: Chain,
    /// Receive chains popped and not yet used, in ring order.
    rx_chains: Vec<Chain>,
    /// Index in `rx_chains` of the first held chain.
    rx_first: usize,
    rx_held: usize,
    /// Receive chains used (head, bytes written) and not yet completed:
    /// a burst's, completed at its end with one `add_used_lens`; what a
    /// failing queue did not take is completed first next time, never
    /// dropped.
    rx_used: Vec<(u16, u32)>,
    ctrl_buf: Vec<u8>,
    warned: u64,
    /// Polling: leave driver notifications off when a queue runs dry.
    pub(crate) suppress: bool,
    /// Heads were completed since the driver was last notified.
    notify_pending: bool,
    /// Fault injection: the receive buffer the first frame went to after a
    /// late write was armed.
    #[cfg(feature = "fault-injection")]
    late: Option<u64>,
}

/// The kind under which a test arms a late write for this device
/// (`ioasis::fault_injection::arm`): the device delivers a frame into a
/// receive buffer, and delivers the next frame into that same buffer again,
/// after the access section has ended (through the host pointer the section
/// gave), without completing it.
#[cfg(feature = "fault-injection")]
pub const FAULT_KIND: &str = "vdpa-net";

impl PairEngine {
    pub(crate) fn new(
        pair: usize,
        label: &str,
        stats: Arc<DeviceStats>,
        features: Features,
        filter: RxFilter,
    ) -> Self {
        PairEngine {
            pair,
            label: label.to_string(),
            stats,
            features,
            hdr_len: features.hdr_len(),
            filter,
            tx_bufs: (0..BURST).map(|_| PacketBuf::new()).collect(),
            tx_heads: Vec::with_capacity(BURST),
            tx_chains: (0..BURST).map(|_| Chain::new()).collect(),
            tx_unacked: Vec::new(),
            chain: Chain::new(),
            rx_chains: Vec::new(),
            rx_first: 0,
            rx_held: 0,
            rx_used: Vec::with_capacity(BURST),
            ctrl_buf: vec![0u8; MAX_CTRL_LEN],
            warned: 0,
            suppress: false,
            notify_pending: false,
            #[cfg(feature = "fault-injection")]
            late: None,
        }
    }

    /// CSUM was negotiated: transmit headers may carry offloads.
    fn host_offloads(&self) -> bool {
        self.features.has(net::VIRTIO_NET_F_CSUM)
    }

    fn warn_limited(&mut self, what: std::fmt::Arguments<'_>) {
        self.warned += 1;
        if self.warned.is_power_of_two() {
            warn!(
                "{} pair {}: {what} ({} so far)",
                self.label, self.pair, self.warned
            );
        }
    }

    /// Driver-to-device: bursts from the transmit queue into the port, until
    /// the driver has nothing more or the pass limit is reached. Returns the
    /// frames moved and whether work is left (the caller must come back).
    pub(crate) fn tx(
        &mut self,
        q: &mut Queue<'_>,
        port: &mut dyn Port,
    ) -> std::result::Result<(usize, bool), QueueError> {
        let r = self.tx_pass(q, port);
        self.flush_notify(q, r)
    }

    /// One notification per pass, not per burst: without EVENT_IDX (DPDK
    /// virtio-user never negotiates it) every `notify` is an eventfd write.
    fn flush_notify<T>(
        &mut self,
        q: &mut Queue<'_>,
        r: std::result::Result<T, QueueError>,
    ) -> std::result::Result<T, QueueError> {
        if std::mem::take(&mut self.notify_pending) {
            let n = q.notify();
            if r.is_ok() {
                n?;
            }
        }
        r
    }

    fn tx_pass(
        &mut self,
        q: &mut Queue<'_>,
        port: &mut dyn Port,
    ) -> std::result::Result<(usize, bool), QueueError> {
        let mut moved = 0;
        let mut suppressed = false;
        while let Some(&h) = self.tx_unacked.first() {
            q.add_used(h, 0)?;
            self.tx_unacked.remove(0);
        }
        if !self.host_offloads() {
            q.set_prefetch_skip(self.hdr_len);
        }
        for _ in 0..TX_BURSTS_PER_PASS {
            if !suppressed {
                q.disable_notification()?;
                suppressed = true;
            }
            let mut n = 0;
            let (mut bytes, mut errors) = (0u64, 0u64);
            self.tx_heads.clear();
            let burst = q.pop_burst(&mut self.tx_chains);
            // The queue completed malformed chains with length 0.
            errors += burst.bad as u64;
            let pending_err = burst.error;
            for k in 0..burst.popped {
                if let Some(c) = self.tx_chains[..burst.popped].get(k + PREFETCH_AHEAD) {
                    q.prefetch(c);
                }
                let head = self.tx_chains[k].head();
                match self.read_tx_frame(q, k, n) {
                    Ok(len) => {
                        bytes += len as u64;
                        n += 1;
                    }
                    Err(e) => {
                        errors += 1;
                        self.warn_limited(format_args!("transmit chain {head} dropped: {e}"));
                    }
                }
                self.tx_heads.push(head);
            }
            let mut used_err = None;
            if let Err((j, e)) = q.add_used_batch(&self.tx_heads) {
                self.tx_unacked.extend_from_slice(&self.tx_heads[j..]);
                used_err = Some(e);
            }
            let popped = self.tx_heads.len();
            if popped > 0 && used_err.is_none() {
                self.notify_pending = true;
                // As on the receive path: the driver gets its buffers back
                // burst by burst, not when the pass has drained the ring
                // (into the backend as users start vdpa-net, 5 rounds
                // alternated: 10.70 -> 14.52 Mpps; the polling mode within
                // noise).
                q.publish_used();
            }
            let out = if n > 0 {
                port.send(&mut self.tx_bufs[..n])
            } else {
                Default::default()
            };
            let st = self.stats.queue(self.pair);
            st.add_rx(n as u64, bytes);
            st.add_drops(out.dropped as u64);
            st.add_errors(errors + out.errors as u64);
            moved += n;
            if let Some(e) = used_err.or(pending_err) {
                return Err(e);
            }
            if popped < BURST {
                if self.suppress || !q.enable_notification()? {
                    return Ok((moved, false));
                }
                suppressed = false;
            }
        }
        Ok((moved, true))
    }

    /// Copies popped transmit chain `k` into transmit buffer `n`,
    /// normalising the header to 12 bytes. Returns the frame length.
    fn read_tx_frame(
        &mut self,
        q: &mut Queue<'_>,
        k: usize,
        n: usize,
    ) -> std::result::Result<usize, TxDrop> {
        let chain = &self.tx_chains[k];
        let total = chain.readable_len();
        let hl = self.hdr_len as u64;
        if chain.writable_len() != 0 {
            return Err(TxDrop::Writable);
        }
        if total < hl {
            return Err(TxDrop::Short {
                readable: total,
                hdr: hl,
            });
        }
        if total - hl > MAX_FRAME_LEN as u64 {
            return Err(TxDrop::TooLong { len: total - hl });
        }
        let host_offloads = self.host_offloads();
        let buf = &mut self.tx_bufs[n];
        let frame_len = (total - hl) as usize;
        let spare = buf.spare();
        if !host_offloads {
            // Without CSUM (and so without any transmit offload) the header
            // carries nothing the device may act on (the virtio spec has the
            // device ignore what it does not recognise): it is not read at
            // all, which spares a cache line per frame, nor checked; the port
            // gets a zero header.
            spare[..VNET_HDR_LEN].fill(0);
            let got = q.read(
                chain,
                hl,
                &mut spare[VNET_HDR_LEN..VNET_HDR_LEN + frame_len],
            )?;
            if got != frame_len {
                return Err(TxDrop::ShortRead { got });
            }
            buf.set_len(VNET_HDR_LEN + frame_len);
            return Ok(frame_len);
        }
        let got = if self.hdr_len == VNET_HDR_LEN {
            q.read(chain, 0, &mut spare[..VNET_HDR_LEN + frame_len])?
        } else {
            let a = q.read(chain, 0, &mut spare[..self.hdr_len])?;
            spare[self.hdr_len..VNET_HDR_LEN].fill(0);
            a + q.read(
                chain,
                hl,
                &mut spare[VNET_HDR_LEN..VNET_HDR_LEN + frame_len],
            )?
        };
        if got != self.hdr_len + frame_len {
            return Err(TxDrop::ShortRead { got });
        }
        let hdr = VnetHdr::read(&spare[..VNET_HDR_LEN])?;
        self.features.check_tx_hdr(&hdr)?;
        spare[10] = 0;
        spare[11] = 0;
        if cfg!(ioasis_broken = "txcorrupt") && frame_len > 1000 {
            // Test-only: a corrupted payload byte, past the checksum the
            // guest left to the device, reaches the port.
            spare[VNET_HDR_LEN + frame_len - 1] ^= 0x5a;
        }
        buf.set_len(VNET_HDR_LEN + frame_len);
        Ok(frame_len)
    }

    /// Device-to-driver: one burst of frames from the port into the receive queue.
    pub(crate) fn rx_burst(
        &mut self,
        q: &mut Queue<'_>,
        port: &mut dyn Port,
    ) -> std::result::Result<(usize, RxStop), QueueError> {
        let mrg = self.features.mrg_rxbuf();
        let hdr_len = self.hdr_len;
        let guest_csum = self.features.has(net::VIRTIO_NET_F_GUEST_CSUM);
        let filter = &self.filter;
        let chains = &mut self.rx_chains;
        let first = &mut self.rx_first;
        let held = &mut self.rx_held;
        let used = &mut self.rx_used;
        let (mut pkts, mut bytes, mut drops, mut errors) = (0u64, 0u64, 0u64, 0u64);
        let mut stop = RxStop::Port;
        let mut fatal: Option<QueueError> = None;
        #[cfg(feature = "fault-injection")]
        let late = &mut self.late;
        let taken = port.recv(BURST, &mut |data: &mut [u8]| {
            if data.len() < VNET_HDR_LEN + 14 {
                errors += 1;
                return true;
            }
            let frame_len = data.len() - VNET_HDR_LEN;
            if !filter.accepts(&data[VNET_HDR_LEN..VNET_HDR_LEN + 6]) {
                drops += 1;
                return true;
            }
            if !guest_csum {
                // Partial checksums and GSO need the driver's consent.
                if data[0] & !VIRTIO_NET_HDR_F_DATA_VALID != 0 || data[1] != 0 {
                    drops += 1;
                    return true;
                }
                data[..VNET_HDR_LEN].fill(0);
            }
            let total = hdr_len + frame_len;
            // The common frame: the 12-byte header, and the first held
            // chain one buffer with room for all of it (what DPDK's
            // virtio-user and Linux post with MRG_RXBUF): one copy and one
            // completion, without the gathering and merging loops below,
            // which do the same for it (scripts/count-net.sh: 874.3 ->
            // 807.5 per frame, --packed 1094.6 -> 1027.8).
            if hdr_len == VNET_HDR_LEN && *held > 0 {
                let c = &chains[*first];
                let one = c.readable_len() == 0
                    && usize::try_from(c.writable_len()).is_ok_and(|w| w >= total);
                if one {
                    data[10..12].copy_from_slice(&1u16.to_le_bytes());
                    if let Some(c) = chains[..*first + *held].get(*first + PREFETCH_AHEAD) {
                        q.prefetch(c);
                    }
                    let c = &chains[*first];
                    if let Err(e) = q.write(c, 0, data) {
                        fatal = Some(e);
                        return false;
                    }
                    used.push((c.head(), total as u32));
                    #[cfg(feature = "fault-injection")]
                    inject_late(
                        late,
                        q,
                        c,
                        &RxParts {
                            hdr: &[],
                            frame: data,
                        },
                    );
                    *first += 1;
                    *held -= 1;
                    pkts += 1;
                    bytes += frame_len as u64;
                    return true;
                }
            }
            // Gather enough chains: those held from an earlier frame first.
            let mut cap = 0usize;
            let mut k = 0usize;
            while cap < total && k < MAX_MERGED_BUFFERS {
                if k == *held {
                    // Pop a burst of receive chains behind the held ones.
                    if *held == 0 {
                        *first = 0;
                    }
                    let mut end = *first + *held;
                    if chains.len() < end + RX_POP && *first > 0 {
                        // Move the held chains to the front (rare: a frame
                        // that needed more than the chains left).
                        chains[..end].rotate_left(*first);
                        *first = 0;
                        end = *held;
                    }
                    // Warm-up only: grows to the most chains held at once.
                    while chains.len() < end + RX_POP {
                        chains.push(Chain::new());
                    }
                    let b = q.pop_burst(&mut chains[end..end + RX_POP]);
                    // The queue completed malformed chains with length 0.
                    errors += b.bad as u64;
                    *held += b.popped;
                    if b.popped == 0 {
                        match b.error {
                            Some(e) => fatal = Some(e),
                            None => stop = RxStop::NoBuffers,
                        }
                        return false;
                    }
                    // An error after some chains recurs at the next pop.
                }
                let c = &chains[*first + k];
                // A chain with readable buffers is not a receive buffer; it
                // contributes no room and is completed empty with the frame.
                let w = if c.readable_len() == 0 {
                    usize::try_from(c.writable_len()).unwrap_or(usize::MAX)
                } else {
                    0
                };
                cap = cap.saturating_add(w);
                k += 1;
                if !mrg {
                    break;
                }
            }
            if cap < total {
                // Too small without merging, or more buffers than allowed:
                // the chains go back empty and the frame is dropped.
                used.extend(chains[*first..*first + k].iter().map(|c| (c.head(), 0)));
                *first += k;
                *held -= k;
                drops += 1;
                return true;
            }
            let num = if mrg { k as u16 } else { 1 };
            // The header is patched in place (no round trip through a copy
            // on the stack: a wide load of bytes just stored narrowly
            // stalls the core). With the 12-byte header the port's buffer
            // then is the virtual buffer, one copy per chain; a legacy
            // driver gets the first 10 bytes of it.
            data[10..12].copy_from_slice(&num.to_le_bytes());
            let parts = if hdr_len == VNET_HDR_LEN {
                RxParts {
                    hdr: &[],
                    frame: data,
                }
            } else {
                let (hdr, frame) = data.split_at(VNET_HDR_LEN);
                RxParts {
                    hdr: &hdr[..hdr_len],
                    frame,
                }
            };
            // The chain a few frames ahead (one frame per chain is the
            // common case) starts loading.
            if let Some(c) = chains[..*first + *held].get(*first + k + PREFETCH_AHEAD - 1) {
                q.prefetch(c);
            }
            let mut start = 0usize;
            for j in 0..k {
                let c = &chains[*first + j];
                let room = if c.readable_len() == 0 {
                    usize::try_from(c.writable_len()).unwrap_or(usize::MAX)
                } else {
                    0
                };
                let w = room.min(total - start);
                if w > 0 {
                    if let Err(e) = parts.write_into(q, c, start, w) {
                        // The queue failed under us (it is parked or broken
                        // now): the chains before are used, this one and
                        // the rest stay held.
                        *first += j;
                        *held -= j;
                        fatal = Some(e);
                        return false;
                    }
                }
                used.push((c.head(), w as u32));
                start += w;
            }
            #[cfg(feature = "fault-injection")]
            inject_late(late, q, &chains[*first], &parts);
            *first += k;
            *held -= k;
            pkts += 1;
            bytes += frame_len as u64;
            true
        });
        // The burst's chains are completed at once, one dispatch, not one
        // per chain (scripts/count-net.sh: 989.7 -> 984.8 per frame,
        // --packed 1169.2 -> 1154.1); a queue that fails keeps the rest for
        // next time.
        let completed = match q.add_used_lens(&self.rx_used) {
            Ok(()) => {
                let n = self.rx_used.len();
                self.rx_used.clear();
                n
            }
            Err((j, e)) => {
                fatal = fatal.or(Some(e));
                self.rx_used.drain(..j);
                j
            }
        };
        if completed > 0 {
            self.notify_pending = true;
            // The driver sees this burst's buffers now, not at the end of
            // the pass: a pass fills every buffer the driver has, and a
            // driver that saw none of them until then sat idle meanwhile,
            // then refilled while the device waited (from-backend, `source`
            // into testpmd rxonly, `ioasis-bench-net --test from-backend`,
            // 5 rounds alternated with the build before: default mode 10.99
            // -> 17.70 Mpps, `--poll-us 1000` 11.95 -> 15.84; the
            // notification stays once per pass).
            q.publish_used();
        }
        let st = self.stats.queue(self.pair);
        st.add_tx(pkts, bytes);
        st.add_drops(drops);
        st.add_errors(errors);
        if let Some(e) = fatal {
            return Err(e);
        }
        match taken {
            Ok(n) => Ok((n, stop)),
            Err(e) => {
                st.add_errors(1);
                self.warn_limited(format_args!("port receive failed: {e}"));
                Ok((0, RxStop::PortFailed))
            }
        }
    }

    /// Device-to-driver: bursts until the port is empty, the driver has no
    /// buffers or the pass limit is reached.
    pub(crate) fn rx(
        &mut self,
        q: &mut Queue<'_>,
        port: &mut dyn Port,
    ) -> std::result::Result<RxPass, QueueError> {
        let r = self.rx_pass(q, port);
        // Receive chains popped ahead and not used go back to the driver, so
        // a ring stopped before the next pass loses none of its buffers.
        if self.rx_held > 0 {
            if let Ok(n) = u16::try_from(self.rx_held) {
                if q.unpop(n) {
                    self.rx_held = 0;
                    self.rx_first = 0;
                }
            }
        }
        self.flush_notify(q, r)
    }

    fn rx_pass(
        &mut self,
        q: &mut Queue<'_>,
        port: &mut dyn Port,
    ) -> std::result::Result<RxPass, QueueError> {
        let mut moved = 0;
        // The driver's receive kicks matter only once the device ran out of
        // buffers (enabled again below then): DPDK's virtio-user otherwise
        // writes the kick eventfd at every refill. (Frames from a port with
        // a readiness fd wake the worker through it.)
        q.disable_notification()?;
        for _ in 0..RX_BURSTS_PER_PASS {
            let (n, stop) = self.rx_burst(q, port)?;
            moved += n;
            match stop {
                RxStop::NoBuffers => {
                    // Ask for a kick; if buffers arrived meanwhile, go on.
                    if !self.suppress && q.enable_notification()? {
                        continue;
                    }
                    return Ok(RxPass {
                        moved,
                        blocked: true,
                        more: false,
                    });
                }
                RxStop::Port if n < BURST => {
                    return Ok(RxPass {
                        moved,
                        blocked: false,
                        more: false,
                    })
                }
                RxStop::Port => {}
                RxStop::PortFailed => {
                    return Ok(RxPass {
                        moved,
                        blocked: true,
                        more: false,
                    })
                }
            }
        }
        Ok(RxPass {
            moved,
            blocked: false,
            more: true,
        })
    }

    /// Runs the control queue's commands against `net`. Returns whether the
    /// receive filter may have changed.
    pub(crate) fn ctrl(
        &mut self,
        q: &mut Queue<'_>,
        net: &Mutex<NetDevice>,
    ) -> std::result::Result<usize, QueueError> {
        let mut done = 0;
        // Bounded: at most one queue's worth of commands per kick.
        let bound = usize::from(q.size());
        while done < bound {
            match q.pop(&mut self.chain) {
                Ok(true) => {}
                Ok(false) => break,
                Err(QueueError::BadChain { .. }) => {
                    self.stats.ctrl.add_errors(1);
                    continue;
                }
                Err(e) => return Err(e),
            }
            done += 1;
            let head = self.chain.head();
            let len = usize::try_from(self.chain.readable_len()).unwrap_or(usize::MAX);
            let status = if len > MAX_CTRL_LEN || self.chain.writable_len() < 1 {
                self.warn_limited(format_args!("control command of {len} bytes rejected"));
                VIRTIO_NET_ERR
            } else {
                let got = q.read(&self.chain, 0, &mut self.ctrl_buf[..len])?;
                let r = net
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .handle_ctrl(&self.ctrl_buf[..got]);
                match r {
                    Ok(cmd) => {
                        debug!("{}: control {cmd:?}", self.label);
                        VIRTIO_NET_OK
                    }
                    Err(e) => {
                        info!("{}: control command rejected: {e}", self.label);
                        VIRTIO_NET_ERR
                    }
                }
            };
            if status != VIRTIO_NET_OK {
                self.stats.ctrl.add_errors(1);
            }
            let w = if self.chain.writable_len() >= 1 {
                q.write(&self.chain, 0, &[status])?
            } else {
                0
            };
            q.add_used(head, w as u32)?;
        }
        if done > 0 {
            q.notify()?;
        }
        Ok(done)
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
