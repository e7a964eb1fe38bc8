//! A vhost-user-blk driver of the project's own, for the block benchmark:
//! the vhost crate's `Frontend` on the socket, one split queue in its own
//! memfd memory (laid out by the framework's test driver ring), and 4 KiB
//! requests issued at a fixed queue depth.
//!
//! Request `k` of the `depth` in flight always uses descriptors `3k`
//! (header, device-readable), `3k+1` (the 4 KiB data buffer: readable for
//! a write, writable for a read) and `3k+2` (the status byte), so a queue
//! of [`queue_size_for`]`(depth)` entries never runs out, whatever order
//! the device completes in. Notifications are the plain ones (no
//! EVENT_IDX): the driver kicks after each batch unless the device set
//! `VRING_USED_F_NO_NOTIFY`, and waits for the device's call eventfd.
//!
//! Every completion is checked: its head must be a request in flight (a
//! request completed twice, or a head never issued, is an error), its
//! status `VIRTIO_BLK_S_OK`; at the end, completed must equal issued.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ioasis::testing::{DriverRing, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use iommu_core::Memory;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VIRTIO_BLK_T_IN`.
const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`.
const T_OUT: u32 = 1;
/// `VIRTIO_BLK_S_OK`.
const S_OK: u8 = 0;
/// A status byte value no device writes: the request is still in flight.
const S_PENDING: u8 = 0xff;

/// Bytes of data per request.
pub const IO_SIZE: usize = 4096;

/// Where the ring starts in the driver's memory (and its address: the
/// memory is shared at guest address 0).
const RING_OFF: usize = 0;
/// Where the headers and status bytes start (32 bytes per request).
const HDR_OFF: usize = 64 * 1024;
/// Where the data buffers start.
const DATA_OFF: usize = 128 * 1024;

/// The kind of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// 4 KiB random reads.
    RandRead,
    /// 4 KiB random writes.
    RandWrite,
}

impl Op {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Op::RandRead => "randread",
            Op::RandWrite => "randwrite",
        }
    }
}

/// The smallest power-of-two queue size that holds `depth` requests of
/// three descriptors.
pub fn queue_size_for(depth: u16) -> u16 {
    (3 * u32::from(depth.max(1))).next_power_of_two().min(32768) as u16
}

/// What one measurement found.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Requests issued in the measured window and after (all of them checked).
    pub issued: u64,
    /// Requests completed.
    pub completed: u64,
    /// Requests completed in the measured window.
    pub measured: u64,
    /// Length of the measured window.
    pub secs: f64,
    /// Latency of each request completed in the window, in nanoseconds, sorted.
    pub latencies_ns: Vec<u64>,
}

impl RunResult {
    /// Requests per second in the window.
    pub fn iops(&self) -> f64 {
        if self.secs > 0.0 {
            self.measured as f64 / self.secs
        } else {
            0.0
        }
    }

    /// The `p`-th percentile latency (0-100) in microseconds.
    pub fn latency_us(&self, p: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * (self.latencies_ns.len() - 1) as f64).round() as usize;
        self.latencies_ns[i.min(self.latencies_ns.len() - 1)] as f64 / 1000.0
    }
}

type Res<T> = std::result::Result<T, String>;

fn ctx<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A connected driver with one queue.
pub struct BlkFrontend {
    _fe: Frontend,
    mem: Arc<Memory>,
    ring: DriverRing,
    kick: EventFd,
    call: EventFd,
    depth: u16,
    disk_blocks: u64,
    /// Used index consumed so far.
    seen: u16,
    /// Submission time per slot; `None` when the slot is free.
    started: Vec<Option<Instant>>,
    rng: u64,
    /// The block of the next request, when [`request`](Self::request) chose it.
    rng_override: Option<u64>,
    always_kick: bool,
    /// The used flags read after the last publish, and whether it kicked.
    last_kick: std::cell::Cell<(u16, bool)>,
}

impl std::fmt::Debug for BlkFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkFrontend")
            .field("depth", &self.depth)
            .field("disk_blocks", &self.disk_blocks)
            .finish()
    }
}

/// Connects to `path` (bounded retries while the socket appears).
fn connect(path: &Path) -> Res<Frontend> {
    let mut last = String::new();
    for _ in 0..200 {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(Frontend::from_stream(s, 1)),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(format!("connecting to {}: {last}", path.display()))
}

/// The vhost-user protocol features the server at `path` offers
/// (`GET_PROTOCOL_FEATURES` right after `GET_FEATURES`); the connection is
/// closed again.
pub fn offered_protocol_features(path: &Path) -> Res<VhostUserProtocolFeatures> {
    let mut fe = connect(path)?;
    fe.set_owner().map_err(ctx("SET_OWNER"))?;
    let offered = fe.get_features().map_err(ctx("GET_FEATURES"))?;
    if offered & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
        return Ok(VhostUserProtocolFeatures::empty());
    }
    fe.get_protocol_features()
        .map_err(ctx("GET_PROTOCOL_FEATURES"))
}

impl BlkFrontend {
    /// Connects to the vhost-user-blk socket at `path`, negotiates, shares
    /// its memory and starts queue 0 for up to `depth` requests in flight
    /// over a disk of `disk_bytes` bytes.
    pub fn connect(path: &Path, depth: u16, disk_bytes: u64) -> Res<BlkFrontend> {
        let depth = depth.clamp(1, 1024);
        let qsize = queue_size_for(depth);
        let mut fe = connect(path)?;
        fe.set_owner().map_err(ctx("SET_OWNER"))?;
        let offered = fe.get_features().map_err(ctx("GET_FEATURES"))?;
        let want = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
        if offered & want != want {
            return Err(format!(
                "the device offers features {offered:#x}, without {:#x}",
                want & !offered
            ));
        }
        fe.set_features(want).map_err(ctx("SET_FEATURES"))?;
        let p = fe
            .get_protocol_features()
            .map_err(ctx("GET_PROTOCOL_FEATURES"))?;
        fe.set_protocol_features(p & VhostUserProtocolFeatures::REPLY_ACK)
            .map_err(ctx("SET_PROTOCOL_FEATURES"))?;

        let data_end = DATA_OFF + usize::from(depth) * IO_SIZE;
        let len = data_end.div_ceil(1 << 20) << 20;
        let mem = Memory::anonymous("ioasis-bench-blk", len).map_err(ctx("driver memory"))?;
        if DriverRing::layout_len(qsize) > HDR_OFF || HDR_OFF + 32 * usize::from(depth) > DATA_OFF {
            return Err(format!("queue depth {depth} does not fit the layout"));
        }
        let fd = mem.fd().ok_or("driver memory has no memfd")?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem.len() as u64,
            userspace_addr: mem.as_ptr() as u64,
            mmap_offset: mem.file_offset(),
            mmap_handle: fd.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).map_err(ctx("SET_MEM_TABLE"))?;
        let ring = DriverRing::new(mem.clone(), RING_OFF, RING_OFF as u64, qsize)
            .map_err(ctx("driver ring"))?;
        fe.set_vring_num(0, qsize).map_err(ctx("SET_VRING_NUM"))?;
        // Ring addresses in SET_VRING_ADDR are the frontend's own virtual
        // addresses (without VIRTIO_F_ACCESS_PLATFORM); descriptors carry
        // guest addresses (the memory is at guest address 0).
        let va = mem.as_ptr() as u64;
        let cfg = VringConfigData {
            queue_max_size: qsize,
            queue_size: qsize,
            flags: 0,
            desc_table_addr: va + ring.desc_addr(),
            used_ring_addr: va + ring.used_addr(),
            avail_ring_addr: va + ring.avail_addr(),
            log_addr: None,
        };
        fe.set_vring_addr(0, &cfg).map_err(ctx("SET_VRING_ADDR"))?;
        fe.set_vring_base(0, 0).map_err(ctx("SET_VRING_BASE"))?;
        let call = EventFd::new(libc::EFD_NONBLOCK).map_err(ctx("eventfd"))?;
        let kick = EventFd::new(0).map_err(ctx("eventfd"))?;
        fe.set_vring_call(0, &call).map_err(ctx("SET_VRING_CALL"))?;
        fe.set_vring_kick(0, &kick).map_err(ctx("SET_VRING_KICK"))?;
        fe.set_vring_enable(0, true)
            .map_err(ctx("SET_VRING_ENABLE"))?;
        // Fill the data buffers so that writes carry something other than zeroes.
        for k in 0..usize::from(depth) {
            mem.fill(DATA_OFF + k * IO_SIZE, IO_SIZE, 0xa5 ^ (k as u8))
                .map_err(ctx("fill data buffers"))?;
        }
        Ok(BlkFrontend {
            _fe: fe,
            mem,
            ring,
            kick,
            call,
            depth,
            disk_blocks: (disk_bytes / IO_SIZE as u64).max(1),
            seen: 0,
            started: vec![None; usize::from(depth)],
            rng: 0x853c_49e6_748f_ea9b,
            rng_override: None,
            always_kick: false,
            last_kick: std::cell::Cell::new((0, false)),
        })
    }

    fn next_block(&mut self) -> u64 {
        if let Some(b) = self.rng_override {
            return b;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % self.disk_blocks
    }

    /// Writes request `k` (descriptors, header, status) and puts it on the
    /// available ring (not yet published).
    fn submit(&mut self, k: usize, op: Op) -> Res<()> {
        let block = self.next_block();
        let hdr = HDR_OFF + 32 * k;
        let mut h = [0u8; 16];
        let t = if op == Op::RandRead { T_IN } else { T_OUT };
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&(block * (IO_SIZE as u64 / 512)).to_le_bytes());
        self.mem.write_at(hdr, &h).map_err(ctx("write header"))?;
        self.mem
            .write_at(hdr + 16, &[S_PENDING])
            .map_err(ctx("write status"))?;
        let d = (3 * k) as u16;
        let data_flags = if op == Op::RandRead {
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT
        } else {
            VRING_DESC_F_NEXT
        };
        let r = &self.ring;
        r.write_desc(d, hdr as u64, 16, VRING_DESC_F_NEXT, d + 1)
            .and_then(|()| {
                r.write_desc(
                    d + 1,
                    (DATA_OFF + k * IO_SIZE) as u64,
                    IO_SIZE as u32,
                    data_flags,
                    d + 2,
                )
            })
            .and_then(|()| r.write_desc(d + 2, (hdr + 16) as u64, 1, VRING_DESC_F_WRITE, 0))
            .map_err(ctx("write descriptors"))?;
        self.ring.push_avail(d).map_err(ctx("avail ring"))?;
        self.started[k] = Some(Instant::now());
        Ok(())
    }

    /// The device's used index (one atomic 16-bit load: see
    /// [`DriverRing::used_idx`]).
    fn used_idx(&self) -> Res<u16> {
        self.ring.used_idx().map_err(|e| e.to_string())
    }

    /// Kick after every batch even when the device set
    /// `VRING_USED_F_NO_NOTIFY` (a diagnostic: a device that stalls only
    /// without it misses the re-check after clearing the flag).
    pub fn set_always_kick(&mut self, on: bool) {
        self.always_kick = on;
    }

    fn publish_and_kick(&self) -> Res<()> {
        self.ring.publish().map_err(ctx("publish"))?;
        let flags = self.ring.used_flags().map_err(ctx("used flags"))?;
        let kick = self.always_kick || flags & VRING_USED_F_NO_NOTIFY == 0;
        self.last_kick.set((flags, kick));
        if kick {
            self.kick.write(1).map_err(ctx("kick"))?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for the device's call.
    fn wait_call(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd() as RawFd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            let _ = self.call.read();
        }
    }

    /// Issues one 4 KiB request (`op` on block `block`, through slot 0) and
    /// waits at most `timeout` for it; returns its status byte
    /// (`VIRTIO_BLK_S_OK` = 0, `IOERR` = 1, `UNSUPP` = 2). For a write the
    /// data is `fill` repeated; for a read the data is returned too.
    pub fn request(
        &mut self,
        op: Op,
        block: u64,
        fill: u8,
        timeout: Duration,
    ) -> Res<(u8, Vec<u8>)> {
        if self.started.iter().any(Option::is_some) {
            return Err("requests are still in flight".into());
        }
        self.mem
            .fill(DATA_OFF, IO_SIZE, fill)
            .map_err(ctx("fill the data buffer"))?;
        self.rng_override = Some(block);
        let r = self.submit(0, op);
        self.rng_override = None;
        r?;
        self.publish_and_kick()?;
        let end = Instant::now() + timeout;
        // Bounded by the clock; each iteration waits up to 20 ms.
        let max_polls = timeout.as_millis() / 20 + 2;
        for _ in 0..max_polls {
            let used = self.used_idx()?;
            fence(Ordering::Acquire);
            if used != self.seen {
                let (id, _) = self
                    .ring
                    .used_elem(self.seen)
                    .map_err(ctx("used element"))?;
                self.seen = self.seen.wrapping_add(1);
                if id != 0 || self.started[0].take().is_none() {
                    return Err(format!(
                        "the device completed head {id}, not the request in flight"
                    ));
                }
                if used != self.seen {
                    return Err(format!(
                        "the device completed more than the one request (used index {used})"
                    ));
                }
                let mut status = [S_PENDING];
                self.mem
                    .read_at(HDR_OFF + 16, &mut status)
                    .map_err(ctx("read status"))?;
                let mut data = vec![0u8; IO_SIZE];
                self.mem
                    .read_at(DATA_OFF, &mut data)
                    .map_err(ctx("read data"))?;
                return Ok((status[0], data));
            }
            if Instant::now() >= end {
                break;
            }
            self.wait_call(Duration::from_millis(20));
        }
        Err(format!(
            "no completion of a {} within {timeout:?}",
            op.name()
        ))
    }

    /// The largest queue depth this driver was set up for.
    pub fn max_depth(&self) -> u16 {
        self.depth
    }

    /// Issues `op` at queue depth `depth` (at most
    /// [`max_depth`](Self::max_depth)) for `warmup` (not measured), then for
    /// `secs` (measured), then stops issuing and waits (at most
    /// `drain_timeout`) for every request in flight. Fails on a completion
    /// that is not a request in flight, on a status other than OK, and when
    /// completed differs from issued at the end.
    pub fn run(
        &mut self,
        op: Op,
        depth: u16,
        warmup: Duration,
        secs: Duration,
        drain_timeout: Duration,
    ) -> Res<RunResult> {
        if depth == 0 || depth > self.depth {
            return Err(format!("queue depth {depth} outside 1..={}", self.depth));
        }
        let depth = usize::from(depth);
        let mut issued = 0u64;
        let mut completed = 0u64;
        let mut measured = 0u64;
        let mut lat: Vec<u64> = Vec::with_capacity(1 << 16);
        for k in 0..depth {
            self.submit(k, op)?;
            issued += 1;
        }
        self.publish_and_kick()?;
        let start = Instant::now();
        let window_start = start + warmup;
        let window_end = window_start + secs;
        let hard_end = window_end + drain_timeout;
        let mut in_flight = depth;
        let mut measured_secs = secs.as_secs_f64();
        let mut ended = false;
        // Bounded by the clock (`hard_end`) and, as a backstop, by a count
        // no run at any rate reaches (a wait or a completion per iteration).
        let max_iterations = 1u64 << 40;
        let mut it = 0u64;
        while in_flight > 0 && it < max_iterations {
            it += 1;
            let now = Instant::now();
            if now >= hard_end {
                return Err(format!(
                    "{} requests still in flight {drain_timeout:?} after the end: issued {issued}, \
                     completed {completed}; avail index {}, used index {}, used flags {:#x} \
                     (a device that sleeps with VRING_USED_F_NO_NOTIFY set misses the kick); \
                     after the last publish the flags were {:#x} and the driver {}",
                    in_flight,
                    self.ring.avail_idx(),
                    self.used_idx().unwrap_or(0),
                    self.ring.used_flags().unwrap_or(0xffff),
                    self.last_kick.get().0,
                    if self.last_kick.get().1 { "kicked" } else { "did not kick" },
                ));
            }
            if !ended && now >= window_end {
                ended = true;
                measured_secs = (now - window_start).as_secs_f64();
            }
            let used = self.used_idx()?;
            // The used elements and status bytes are read after the index.
            fence(Ordering::Acquire);
            if used == self.seen {
                self.wait_call(Duration::from_millis(50));
                continue;
            }
            let mut resubmitted = false;
            while self.seen != used {
                let (id, _len) = self
                    .ring
                    .used_elem(self.seen)
                    .map_err(ctx("used element"))?;
                self.seen = self.seen.wrapping_add(1);
                let k = (id / 3) as usize;
                let start_k = match (id % 3, self.started.get_mut(k)) {
                    (0, Some(slot)) => slot.take(),
                    _ => None,
                };
                let Some(t0) = start_k else {
                    return Err(format!(
                        "the device completed head {id}, which is not a request in flight \
                         (completed twice, or never issued); issued {issued}, completed {completed}"
                    ));
                };
                let mut status = [S_PENDING];
                self.mem
                    .read_at(HDR_OFF + 32 * k + 16, &mut status)
                    .map_err(ctx("read status"))?;
                if status[0] != S_OK {
                    // Look again a moment later: a status that turns OK was
                    // written after the used index moved.
                    std::thread::sleep(Duration::from_millis(5));
                    let mut again = [S_PENDING];
                    let _ = self.mem.read_at(HDR_OFF + 32 * k + 16, &mut again);
                    let used_now = self.used_idx().unwrap_or(used);
                    return Err(format!(
                        "request {k} ({}) completed with status {} (not OK; {} 5 ms later); \
                         used index {used} (now {used_now}), this was used element {}; \
                         issued {issued}, completed {completed}",
                        op.name(),
                        status[0],
                        again[0],
                        self.seen.wrapping_sub(1)
                    ));
                }
                completed += 1;
                in_flight -= 1;
                let done = Instant::now();
                if t0 >= window_start && done <= window_end {
                    measured += 1;
                    lat.push(u64::try_from((done - t0).as_nanos()).unwrap_or(u64::MAX));
                }
                if !ended && done < window_end {
                    self.submit(k, op)?;
                    issued += 1;
                    in_flight += 1;
                    resubmitted = true;
                }
            }
            if resubmitted {
                self.publish_and_kick()?;
            }
        }
        if completed != issued {
            return Err(format!("issued {issued} requests, completed {completed}"));
        }
        lat.sort_unstable();
        Ok(RunResult {
            issued,
            completed,
            measured,
            secs: measured_secs,
            latencies_ns: lat,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_queue_size_holds_depth() {
        assert_eq!(queue_size_for(1), 4);
        assert_eq!(queue_size_for(32), 128);
        assert_eq!(queue_size_for(128), 512);
    }

    #[test]
    fn test_percentiles() {
        let r = RunResult {
            issued: 4,
            completed: 4,
            measured: 4,
            secs: 2.0,
            latencies_ns: vec![1000, 2000, 3000, 4000],
        };
        assert_eq!(r.iops(), 2.0);
        assert_eq!(r.latency_us(0.0), 1.0);
        assert_eq!(r.latency_us(100.0), 4.0);
    }
}
