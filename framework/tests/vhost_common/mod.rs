//! Shared pieces of the vhost-user tests: an echo device, a server in a
//! temp dir, guest memory with a driver ring, and raw message helpers.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ioasis::device::{Device, DeviceError, Queues, Worker};
use ioasis::queue::Chain;
use ioasis::server::{Server, ShutdownHandle};
use ioasis::testing::{Buf, DriverRing};
use ioasis::vhost_user::msg::{self, Header, FLAG_NEED_REPLY, HDR_SIZE, VERSION_1};
use iommu_core::Memory;
use nix::sys::socket::MsgFlags;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// How long a test waits for the backend before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// Counters of an echo device.
#[derive(Debug, Default)]
pub struct Counters {
    pub resets: AtomicUsize,
    pub workers: AtomicUsize,
    pub chains: AtomicUsize,
    pub errors: AtomicUsize,
}

/// A device whose queues copy each chain's readable bytes into its writable
/// bytes and complete it with the number of bytes written.
pub struct EchoDevice {
    pub queues: usize,
    pub counters: Arc<Counters>,
    pub config: Mutex<[u8; 8]>,
}

impl EchoDevice {
    pub fn new(queues: usize) -> Arc<Self> {
        Arc::new(EchoDevice {
            queues,
            counters: Arc::new(Counters::default()),
            config: Mutex::new(*b"ioasis01"),
        })
    }
}

impl Device for EchoDevice {
    fn device_type(&self) -> u32 {
        0x2a
    }
    fn features(&self) -> u64 {
        1 << 5
    }
    fn num_queues(&self) -> usize {
        self.queues
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn worker(&self, _thread: usize) -> Result<Box<dyn Worker>, DeviceError> {
        self.counters.workers.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(EchoWorker {
            counters: self.counters.clone(),
            chain: Chain::new(),
            buf: vec![0; 4096],
        }))
    }
    fn config_size(&self) -> u32 {
        8
    }
    fn read_config(&self, offset: u32, data: &mut [u8]) -> Result<(), DeviceError> {
        let c = self
            .config
            .lock()
            .map_err(|_| DeviceError::Other("poisoned".into()))?;
        let o = offset as usize;
        data.copy_from_slice(&c[o..o + data.len()]);
        Ok(())
    }
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        let mut c = self
            .config
            .lock()
            .map_err(|_| DeviceError::Other("poisoned".into()))?;
        let o = offset as usize;
        c[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn reset(&self) {
        self.counters.resets.fetch_add(1, Ordering::SeqCst);
    }
}

struct EchoWorker {
    counters: Arc<Counters>,
    chain: Chain,
    buf: Vec<u8>,
}

impl Worker for EchoWorker {
    fn process_queue(&mut self, index: u16, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        let Some(mut q) = queues.get(index) else {
            return Ok(());
        };
        // Bounded: the ring holds at most `size` chains per round.
        for _ in 0..=q.size() {
            q.disable_notification()?;
            let mut n = 0usize;
            while q.pop(&mut self.chain)? {
                let len = (self.chain.readable_len() as usize).min(self.buf.len());
                let got = q.read(&self.chain, 0, &mut self.buf[..len])?;
                let wrote = q.write(&self.chain, 0, &self.buf[..got])?;
                q.add_used(self.chain.head(), wrote as u32)?;
                self.counters.chains.fetch_add(1, Ordering::SeqCst);
                n += 1;
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

/// A server running on its own thread, with sockets in a temp dir.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub shutdown: ShutdownHandle,
    pub thread: Option<JoinHandle<()>>,
    pub directory: ioasis::server::DeviceDirectory,
    pub iommu: iommu_core::Iommu,
}

impl TestServer {
    /// Starts a server hosting `devices` as `(label, device)`; sockets are
    /// `<dir>/<label>.sock`.
    pub fn start(devices: Vec<(&str, Arc<dyn Device>)>) -> TestServer {
        let _ = env_logger_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = Server::new();
        for (label, dev) in devices {
            server
                .add_device(label, dir.path().join(format!("{label}.sock")), dev)
                .expect("add device");
        }
        let shutdown = server.shutdown_handle();
        let directory = server.directory();
        let iommu = server.iommu().clone();
        let thread = std::thread::spawn(move || {
            server.run().expect("server run");
        });
        TestServer {
            dir,
            shutdown,
            thread: Some(thread),
            directory,
            iommu,
        }
    }

    pub fn socket(&self, label: &str) -> PathBuf {
        self.dir.path().join(format!("{label}.sock"))
    }

    pub fn stop(&mut self) {
        self.shutdown.shutdown();
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn env_logger_init() -> Result<(), ()> {
    Ok(())
}

/// Guest memory shared with the backend: one memfd region.
pub struct Guest {
    pub mem: Arc<Memory>,
    pub gpa: u64,
}

pub const GUEST_SIZE: usize = 1 << 20;
pub const GUEST_GPA: u64 = 0x4000_0000;
/// Where rings live in guest memory (offset).
pub const RING_OFF: usize = 0;
/// Where buffers live in guest memory (offset).
pub const BUF_OFF: usize = 0x8_0000;

impl Guest {
    pub fn new() -> Guest {
        Guest {
            mem: Memory::anonymous("guest", GUEST_SIZE).expect("guest memory"),
            gpa: GUEST_GPA,
        }
    }

    /// The frontend's virtual address of offset `off`.
    pub fn va(&self, off: usize) -> u64 {
        self.mem.as_ptr() as u64 + off as u64
    }

    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.gpa,
            memory_size: GUEST_SIZE as u64,
            userspace_addr: self.va(0),
            mmap_offset: 0,
            mmap_handle: self.mem.fd().expect("memfd").as_raw_fd(),
        }
    }
}

/// Connects a vhost `Frontend`, retrying while the socket appears.
pub fn connect(path: &Path, queues: u64) -> (Frontend, UnixStream) {
    let mut last = None;
    for _ in 0..100 {
        match UnixStream::connect(path) {
            Ok(s) => {
                let raw = s.try_clone().expect("clone");
                raw.set_read_timeout(Some(WAIT)).expect("timeout");
                return (Frontend::from_stream(s, queues), raw);
            }
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    panic!("cannot connect to {path:?}: {last:?}");
}

/// Everything a test frontend keeps for one queue.
pub struct QueueSetup {
    pub ring: DriverRing,
    pub kick: EventFd,
    pub call: EventFd,
}

/// Standard handshake: owner, features, protocol features (REPLY_ACK,
/// BACKEND_REQ, CONFIG, STATUS, CONFIGURE_MEM_SLOTS), memory table.
pub fn handshake(fe: &mut Frontend, guest: &Guest, features: u64) {
    fe.set_owner().expect("set_owner");
    let offered = fe.get_features().expect("get_features");
    assert_eq!(offered & features, features, "features offered");
    fe.set_features(features).expect("set_features");
    let p = fe.get_protocol_features().expect("get_protocol_features");
    let want = VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::STATUS
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    assert!(p.contains(want), "protocol features {p:?}");
    fe.set_protocol_features(p).expect("set_protocol_features");
    fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    fe.set_mem_table(&[guest.region()]).expect("set_mem_table");
}

/// Sets up queue `index` with a ring at guest offset `ring_off`, whose
/// addresses the frontend gives as `addr_of(offset)` (VA or IOVA).
pub fn setup_queue(
    fe: &mut Frontend,
    guest: &Guest,
    index: usize,
    ring_off: usize,
    device_addr: u64,
    frontend_addr: u64,
) -> QueueSetup {
    let ring = DriverRing::new(guest.mem.clone(), ring_off, device_addr, 16).expect("ring");
    let delta = frontend_addr.wrapping_sub(device_addr);
    fe.set_vring_num(index, 16).expect("set_vring_num");
    let cfg = VringConfigData {
        queue_max_size: 256,
        queue_size: 16,
        flags: 0,
        desc_table_addr: ring.desc_addr().wrapping_add(delta),
        used_ring_addr: ring.used_addr().wrapping_add(delta),
        avail_ring_addr: ring.avail_addr().wrapping_add(delta),
        log_addr: None,
    };
    fe.set_vring_addr(index, &cfg).expect("set_vring_addr");
    fe.set_vring_base(index, 0).expect("set_vring_base");
    let call = EventFd::new(0).expect("call");
    let kick = EventFd::new(0).expect("kick");
    fe.set_vring_call(index, &call).expect("set_vring_call");
    fe.set_vring_kick(index, &kick).expect("set_vring_kick");
    fe.set_vring_enable(index, true).expect("set_vring_enable");
    QueueSetup { ring, kick, call }
}

/// Waits until `fd` is readable (bounded by `timeout`).
pub fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
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

/// Waits for the used index to reach `want`, waking on the call eventfd.
pub fn wait_used(q: &QueueSetup, want: u16) {
    for _ in 0..1000 {
        if q.ring.used_idx().expect("used idx") == want {
            return;
        }
        if wait_readable(q.call.as_raw_fd(), Duration::from_millis(10)) {
            let _ = q.call.read();
        }
    }
    panic!(
        "used index stuck at {} (want {want})",
        q.ring.used_idx().expect("used idx")
    );
}

/// Sends a raw message on the main socket.
pub fn send_raw(s: &UnixStream, request: u32, flags: u32, payload: &[u8], fds: &[RawFd]) {
    let hdr = Header {
        request,
        flags,
        size: payload.len() as u32,
    };
    msg::send_message(s, &hdr, payload, fds, MsgFlags::empty()).expect("send");
}

/// Reads one raw reply (header + payload), or None at EOF/timeout.
pub fn recv_raw(s: &UnixStream) -> Option<(Header, Vec<u8>)> {
    use std::io::Read;
    let mut h = [0u8; HDR_SIZE];
    let mut r = s;
    r.read_exact(&mut h).ok()?;
    let hdr = Header::from_bytes(&h);
    let mut p = vec![0u8; hdr.size as usize];
    r.read_exact(&mut p).ok()?;
    Some((hdr, p))
}

/// True once the backend has closed `s` (read returns EOF or reset).
pub fn is_closed(s: &UnixStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut b = [0u8; 64];
    let mut r = s;
    // Bounded: each read either returns data, EOF or times out.
    for _ in 0..64 {
        match r.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
    false
}

/// Sends an IOTLB message with NEED_REPLY and returns the ack value.
pub fn iotlb(s: &UnixStream, typ: u8, iova: u64, size: u64, uaddr: u64, perm: u8) -> u64 {
    let m = msg::IotlbMsg {
        iova,
        size,
        uaddr,
        perm,
        typ,
        pad: [0; 6],
    };
    use vm_memory::ByteValued;
    send_raw(s, 22, VERSION_1 | FLAG_NEED_REPLY, m.as_slice(), &[]);
    let (hdr, p) = recv_raw(s).expect("iotlb ack");
    assert_eq!(hdr.request, 22);
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[..8]);
    u64::from_ne_bytes(b)
}

/// A well-behaved frontend of an [`EchoDevice`]: one queue, one two-buffer
/// chain per round trip (16 bytes out, echoed back).
pub struct EchoClient {
    _fe: Frontend,
    _raw: UnixStream,
    guest: Guest,
    q: QueueSetup,
    done: u16,
}

impl EchoClient {
    /// Connects to the echo device at `path` and sets up queue 0.
    pub fn connect(path: &Path) -> EchoClient {
        let (mut fe, raw) = connect(path, 1);
        let guest = Guest::new();
        handshake(
            &mut fe,
            &guest,
            ioasis::vhost_user::VIRTIO_F_VERSION_1
                | ioasis::vhost_user::VHOST_USER_F_PROTOCOL_FEATURES,
        );
        let q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
        EchoClient {
            _fe: fe,
            _raw: raw,
            guest,
            q,
            done: 0,
        }
    }

    /// One chain through the device; panics if it is not echoed.
    pub fn round_trip(&mut self) {
        let seed = self.done as u8;
        let out: Vec<u8> = (0..16u8).map(|i| i.wrapping_mul(7) ^ seed).collect();
        self.guest.mem.write_at(BUF_OFF, &out).expect("write");
        let buf = self.guest.gpa + BUF_OFF as u64;
        self.q
            .ring
            .add_chain(&[
                ioasis::testing::Buf {
                    addr: buf,
                    len: 16,
                    writable: false,
                },
                ioasis::testing::Buf {
                    addr: buf + 0x100,
                    len: 16,
                    writable: true,
                },
            ])
            .expect("chain");
        self.q.ring.publish().expect("publish");
        self.q.kick.write(1).expect("kick");
        self.done = self.done.wrapping_add(1);
        wait_used(&self.q, self.done);
        let mut back = [0u8; 16];
        self.guest
            .mem
            .read_at(BUF_OFF + 0x100, &mut back)
            .expect("read");
        assert_eq!(back.to_vec(), out, "echoed bytes");
    }
}

/// Adds an echo chain to `q`'s ring (not yet published): 4 readable bytes
/// at `src`, 64 writable at `dst`.
pub fn add_echo_chain(q: &mut QueueSetup, src: u64, dst: u64) {
    q.ring
        .add_chain(&[
            Buf {
                addr: src,
                len: 4,
                writable: false,
            },
            Buf {
                addr: dst,
                len: 64,
                writable: true,
            },
        ])
        .expect("chain");
}

/// Adds an echo chain to `q`'s ring ([`add_echo_chain`]), publishes it and
/// kicks.
pub fn echo_chain(q: &mut QueueSetup, src: u64, dst: u64) {
    add_echo_chain(q, src, dst);
    q.ring.publish().expect("publish");
    q.kick.write(1).expect("kick");
}

/// Completes a chain whose first readable byte is 1 at once; one whose
/// byte is 0 is popped and held (never completed) while `hold` is set.
/// Completions report the chain's writable length. The inflight tests'
/// device, on split and packed rings.
pub struct HoldDevice {
    /// Hold chains whose first byte is 0.
    pub hold: Arc<AtomicBool>,
    /// Times each head (a packed ring's buffer id) was completed.
    pub completions: Arc<Vec<AtomicUsize>>,
}

impl Device for HoldDevice {
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
    fn inflight_tracking(&self) -> bool {
        true
    }
    fn worker(&self, _thread: usize) -> Result<Box<dyn Worker>, DeviceError> {
        Ok(Box::new(HoldWorker {
            hold: self.hold.clone(),
            completions: self.completions.clone(),
            chain: Chain::new(),
        }))
    }
}

struct HoldWorker {
    hold: Arc<AtomicBool>,
    completions: Arc<Vec<AtomicUsize>>,
    chain: Chain,
}

impl Worker for HoldWorker {
    fn process_queue(&mut self, index: u16, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        let Some(mut q) = queues.get(index) else {
            return Ok(());
        };
        let hold = self.hold.load(Ordering::SeqCst);
        // Bounded: a ring of 16 holds at most 16 chains.
        for _ in 0..=16 {
            if !q.pop(&mut self.chain)? {
                break;
            }
            let mut b = [0u8; 1];
            q.read(&self.chain, 0, &mut b)?;
            if b[0] == 0 && hold {
                continue;
            }
            let head = self.chain.head();
            let len = self.chain.writable_len() as u32;
            q.add_used(head, len)?;
            if let Some(c) = self.completions.get(usize::from(head)) {
                c.fetch_add(1, Ordering::SeqCst);
            }
        }
        q.notify()?;
        Ok(())
    }
}
