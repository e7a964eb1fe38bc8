//! The driver's side of net0: a vhost-user frontend (the vhost crate's
//! `Frontend`) and two split rings written into the driver's own memory.
//!
//! `VIRTIO_F_ACCESS_PLATFORM` is negotiated, so ring and buffer addresses
//! are I/O virtual addresses: IOVAs of the IOAS the driver owns. The
//! frontend never sends IOTLB updates; the device translates through the
//! IOAS its RID is attached to. A translation the device misses comes back
//! as an IOTLB miss on the backend request channel.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ioasis::testing::{Buf, DriverRing};
use ioasis::vhost_user::msg::{Header, IotlbMsg, HDR_SIZE};
use ioasis::vhost_user::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use iommu_core::Memory;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

/// Features the driver acks.
pub const FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | VHOST_USER_F_PROTOCOL_FEATURES;
/// Queue size of both rings.
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue index.
pub const RXQ: usize = 0;
/// Transmit queue index.
pub const TXQ: usize = 1;
/// `VHOST_USER_BACKEND_IOTLB_MSG`.
const BACKEND_IOTLB_MSG: u32 = 1;
/// `VHOST_IOTLB_MISS`.
pub const VHOST_IOTLB_MISS: u8 = 1;

type Res<T> = Result<T, String>;

fn ctx<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// One queue: its ring and eventfds.
pub struct Queue {
    /// The driver ring.
    pub ring: DriverRing,
    kick: EventFd,
    call: EventFd,
    /// Used index consumed so far.
    pub seen: u16,
}

impl Queue {
    /// Publishes added chains and kicks the device.
    pub fn kick(&self) -> Res<()> {
        self.ring.publish().map_err(ctx("publish"))?;
        self.kick.write(1).map_err(ctx("kick"))
    }

    /// Waits up to `timeout` for a call from the device, then returns the
    /// used index.
    pub fn wait_call(&self, timeout: Duration) -> Res<u16> {
        if wait_readable(self.call.as_raw_fd(), timeout) {
            let _ = self.call.read();
        }
        self.ring.used_idx().map_err(ctx("used index"))
    }

    /// Waits until the used index reaches `want` (bounded by `timeout`).
    pub fn wait_used(&mut self, want: u16, timeout: Duration) -> Res<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let idx = self.ring.used_idx().map_err(ctx("used index"))?;
            if idx == want {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "queue used index stuck at {idx} (waiting for {want}) after {timeout:?}"
                ));
            }
            if wait_readable(self.call.as_raw_fd(), left.min(Duration::from_millis(20))) {
                let _ = self.call.read();
            }
        }
    }
}

/// The connected frontend.
pub struct NetFrontend {
    /// Kept open for the life of the connection; dropping it disconnects.
    _fe: Frontend,
    backend_req: UnixStream,
    /// Receive queue.
    pub rx: Queue,
    /// Transmit queue.
    pub tx: Queue,
}

/// Where the rings live: offsets in the driver memory and their IOVAs.
pub struct RingPlace {
    /// Offset of the receive ring in the memory.
    pub rx_off: usize,
    /// Offset of the transmit ring.
    pub tx_off: usize,
    /// IOVA of offset 0 of the memory.
    pub iova_base: u64,
}

/// Connects to `path` (bounded retries while the socket appears).
pub fn connect(path: &Path) -> Res<Frontend> {
    let mut last = String::new();
    for _ in 0..200 {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(Frontend::from_stream(s, 3)),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(format!("connecting to {}: {last}", path.display()))
}

/// Negotiates features and protocol features; returns the device's offer.
pub fn negotiate(fe: &mut Frontend) -> Res<u64> {
    fe.set_owner().map_err(ctx("SET_OWNER"))?;
    let offered = fe.get_features().map_err(ctx("GET_FEATURES"))?;
    if offered & FEATURES != FEATURES {
        return Err(format!(
            "net0 offers features {offered:#x}, without {:#x}",
            FEATURES & !offered
        ));
    }
    fe.set_features(FEATURES).map_err(ctx("SET_FEATURES"))?;
    let p = fe
        .get_protocol_features()
        .map_err(ctx("GET_PROTOCOL_FEATURES"))?;
    let want = VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::BACKEND_REQ;
    if !p.contains(want) {
        return Err(format!("net0 protocol features {p:?} lack {want:?}"));
    }
    fe.set_protocol_features(want)
        .map_err(ctx("SET_PROTOCOL_FEATURES"))?;
    fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    Ok(offered)
}

/// Shares the memory (memory table), sets up the backend request channel
/// and both rings, and starts the queues.
pub fn start(mut fe: Frontend, mem: &Arc<Memory>, place: &RingPlace) -> Res<NetFrontend> {
    let fd = mem.fd().ok_or("driver memory has no memfd")?;
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: place.iova_base,
        memory_size: mem.len() as u64,
        userspace_addr: mem.as_ptr() as u64,
        mmap_offset: mem.file_offset(),
        mmap_handle: fd.as_raw_fd(),
    };
    fe.set_mem_table(&[region]).map_err(ctx("SET_MEM_TABLE"))?;
    let (ours, backend_req) = UnixStream::pair().map_err(ctx("socketpair"))?;
    fe.set_backend_request_fd(&ours)
        .map_err(ctx("SET_BACKEND_REQ_FD"))?;
    drop(ours);
    let rx = queue(&mut fe, mem, RXQ, place.rx_off, place.iova_base)?;
    let tx = queue(&mut fe, mem, TXQ, place.tx_off, place.iova_base)?;
    Ok(NetFrontend {
        _fe: fe,
        backend_req,
        rx,
        tx,
    })
}

fn queue(fe: &mut Frontend, mem: &Arc<Memory>, index: usize, off: usize, base: u64) -> Res<Queue> {
    let ring = DriverRing::new(mem.clone(), off, base + off as u64, QUEUE_SIZE)
        .map_err(ctx("driver ring"))?;
    fe.set_vring_num(index, QUEUE_SIZE)
        .map_err(ctx("SET_VRING_NUM"))?;
    let cfg = VringConfigData {
        queue_max_size: QUEUE_SIZE,
        queue_size: QUEUE_SIZE,
        flags: 0,
        desc_table_addr: ring.desc_addr(),
        used_ring_addr: ring.used_addr(),
        avail_ring_addr: ring.avail_addr(),
        log_addr: None,
    };
    fe.set_vring_addr(index, &cfg)
        .map_err(ctx("SET_VRING_ADDR"))?;
    fe.set_vring_base(index, 0).map_err(ctx("SET_VRING_BASE"))?;
    let call = EventFd::new(libc::EFD_NONBLOCK).map_err(ctx("eventfd"))?;
    let kick = EventFd::new(0).map_err(ctx("eventfd"))?;
    fe.set_vring_call(index, &call)
        .map_err(ctx("SET_VRING_CALL"))?;
    fe.set_vring_kick(index, &kick)
        .map_err(ctx("SET_VRING_KICK"))?;
    fe.set_vring_enable(index, true)
        .map_err(ctx("SET_VRING_ENABLE"))?;
    Ok(Queue {
        ring,
        kick,
        call,
        seen: 0,
    })
}

impl NetFrontend {
    /// Adds one chain of one buffer.
    pub fn add(q: &mut Queue, addr: u64, len: u32, writable: bool) -> Res<u16> {
        q.ring
            .add_chain(&[Buf {
                addr,
                len,
                writable,
            }])
            .map_err(ctx("add chain"))
    }

    /// Waits for one IOTLB miss on the backend request channel.
    pub fn wait_miss(&self, timeout: Duration) -> Res<IotlbMsg> {
        use std::io::Read;
        self.backend_req
            .set_read_timeout(Some(timeout))
            .map_err(ctx("timeout"))?;
        let mut h = [0u8; HDR_SIZE];
        let mut r = &self.backend_req;
        r.read_exact(&mut h)
            .map_err(ctx("reading the backend request channel"))?;
        let hdr = Header::from_bytes(&h);
        if hdr.request != BACKEND_IOTLB_MSG || hdr.size as usize != std::mem::size_of::<IotlbMsg>()
        {
            return Err(format!(
                "unexpected backend request {} of {} bytes",
                hdr.request, hdr.size
            ));
        }
        let mut m = IotlbMsg::default();
        r.read_exact(m.as_mut_slice())
            .map_err(ctx("reading an IOTLB message"))?;
        Ok(m)
    }
}

/// Waits until `fd` is readable (bounded by `timeout`).
fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0
}
