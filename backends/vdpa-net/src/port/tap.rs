//! `tap=IFNAME`: a Linux tap device with the virtio-net header.
//!
//! The tap is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (and
//! IFF_MULTI_QUEUE with one queue per queue pair when there are several), its
//! header size set to 12 bytes so the driver's `virtio_net_hdr_v1` passes
//! through unchanged, and TUNSETOFFLOAD told what the driver accepts, so
//! checksum offload and TSO/USO frames go both ways as large frames.
//!
//! Packet I/O is batched through io_uring: a whole transmit batch is one
//! submission of writes through a registered file, and a receive batch is one
//! submission of non-blocking reads into registered buffers, sized by how many
//! frames the last batch found. Where io_uring is not available (old kernel,
//! `io_uring_disabled`), plain non-blocking `read`/`write` do the same job.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use io_uring::{opcode, types, IoUring};
use log::{debug, info, warn};

use super::{Error, PacketBuf, Port, Result, SendOutcome, MAX_BATCH, PKT_BUF_LEN};
use crate::net::{PortOffloads, TUN_F_CSUM, TUN_F_USO4, TUN_F_USO6, VNET_HDR_LEN};

/// How a tap port does its packet I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TapIo {
    /// io_uring where the kernel has it, system calls otherwise.
    #[default]
    Auto,
    /// io_uring only (opening fails without it).
    Uring,
    /// One `read`/`write` system call per frame.
    Syscall,
}

/// Frames read in one receive batch at most (registered buffers per port).
pub const RX_SLOTS: usize = 64;
/// Frames read in one receive batch at least.
const RX_MIN_BATCH: usize = 4;
/// Submission queue size: one transmit batch fits.
const URING_ENTRIES: u32 = MAX_BATCH as u32;

mod sys {
    //! Raw tun/tap ioctls (linux/if_tun.h, linux/sockios.h) under safe wrappers.

    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};

    pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
    pub const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
    pub const IFF_TAP: i16 = 0x0002;
    pub const IFF_NO_PI: i16 = 0x1000;
    pub const IFF_VNET_HDR: i16 = 0x4000;
    pub const IFF_MULTI_QUEUE: i16 = 0x0100;
    pub const SIOCGIFMTU: libc::c_ulong = 0x8921;
    pub const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
    pub const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
    pub const IFF_UP: i16 = 0x1;

    /// `struct ifreq`: the name and a 24-byte union of which we use the
    /// leading short (flags) or int (MTU).
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct IfReq {
        pub name: [u8; 16],
        pub data: [u8; 24],
    }

    impl IfReq {
        pub fn new(name: &str) -> IfReq {
            let mut r = IfReq::default();
            let n = name.len().min(15);
            r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
            r
        }
        pub fn set_flags(&mut self, f: i16) {
            self.data[..2].copy_from_slice(&f.to_ne_bytes());
        }
        pub fn flags(&self) -> i16 {
            i16::from_ne_bytes([self.data[0], self.data[1]])
        }
        pub fn int(&self) -> i32 {
            i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
        }
    }

    /// ioctl with a pointer to an `ifreq`.
    pub fn ioctl_ifreq(fd: BorrowedFd<'_>, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
        // SAFETY: `ifr` is a live, writable struct ifreq of the size these
        // requests read and write; the kernel does not keep the pointer.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, ifr as *mut IfReq) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// ioctl with a pointer to an int (TUNSETVNETHDRSZ).
    pub fn ioctl_int_ptr(fd: BorrowedFd<'_>, req: libc::c_ulong, v: i32) -> io::Result<()> {
        let mut v = v;
        // SAFETY: the pointer is to a live i32 that outlives the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v as *mut i32) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// ioctl with an integer argument by value (TUNSETOFFLOAD).
    pub fn ioctl_val(fd: BorrowedFd<'_>, req: libc::c_ulong, v: libc::c_ulong) -> io::Result<()> {
        // SAFETY: the argument is passed by value; no memory is shared.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, v) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// io_uring state of one tap queue.
struct UringIo {
    ring: IoUring,
    /// Receive slots registered as fixed buffers; must outlive `ring`'s
    /// registration, which ends when `ring` is dropped first (field order).
    rx_mem: Box<[u8]>,
    /// Frames read and not yet taken: (slot, length).
    ready: VecDeque<(u16, u32)>,
    /// Reads to submit next time.
    rx_batch: usize,
}

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringIo")
            .field("ready", &self.ready.len())
            .field("rx_batch", &self.rx_batch)
            .finish()
    }
}

impl UringIo {
    fn new(fd: BorrowedFd<'_>) -> std::io::Result<UringIo> {
        let ring = IoUring::new(URING_ENTRIES)?;
        ring.submitter().register_files(&[fd.as_raw_fd()])?;
        let mut rx_mem = vec![0u8; RX_SLOTS * PKT_BUF_LEN].into_boxed_slice();
        let base = rx_mem.as_mut_ptr();
        let iovs: Vec<libc::iovec> = (0..RX_SLOTS)
            .map(|i| libc::iovec {
                // In bounds: i * PKT_BUF_LEN < rx_mem.len().
                iov_base: base.wrapping_add(i * PKT_BUF_LEN).cast(),
                iov_len: PKT_BUF_LEN,
            })
            .collect();
        // SAFETY: every iovec points into `rx_mem`, which lives in the same
        // struct and is dropped after `ring` (declared after it), so the
        // registration never outlives the memory.
        unsafe { ring.submitter().register_buffers(&iovs)? };
        Ok(UringIo {
            ring,
            rx_mem,
            ready: VecDeque::with_capacity(RX_SLOTS),
            rx_batch: RX_MIN_BATCH,
        })
    }

    fn slot_mut(&mut self, i: u16) -> &mut [u8] {
        let start = i as usize * PKT_BUF_LEN;
        &mut self.rx_mem[start..start + PKT_BUF_LEN]
    }

    /// Submits `n` non-blocking reads into slots 0..n and collects them.
    /// Returns the frames read, the reads that failed and the first error.
    fn read_batch(&mut self, n: usize) -> std::io::Result<(usize, usize, i32)> {
        let base = self.rx_mem.as_mut_ptr();
        {
            let mut sq = self.ring.submission();
            for i in 0..n {
                let e = opcode::ReadFixed::new(
                    types::Fixed(0),
                    base.wrapping_add(i * PKT_BUF_LEN),
                    PKT_BUF_LEN as u32,
                    i as u16,
                )
                .rw_flags(libc::RWF_NOWAIT)
                .build()
                .user_data(i as u64);
                // SAFETY: the buffer is registered slot `i` of `rx_mem`, which
                // outlives the request: we wait for every completion below.
                if unsafe { sq.push(&e) }.is_err() {
                    break;
                }
            }
        }
        let want = self.ring.submission().len();
        self.ring.submit_and_wait(want)?;
        let (mut got, mut errors, mut first) = (0, 0, 0);
        let mut done = 0;
        // Bounded: each pass consumes at least one completion or waits for one.
        while done < want {
            let mut progressed = false;
            for cqe in self.ring.completion() {
                progressed = true;
                done += 1;
                let r = cqe.result();
                if r > 0 {
                    self.ready.push_back((cqe.user_data() as u16, r as u32));
                    got += 1;
                } else if r != -libc::EAGAIN && r != -libc::EINTR {
                    errors += 1;
                    if first == 0 {
                        first = -r;
                    }
                }
            }
            if !progressed && done < want {
                self.ring.submit_and_wait(1)?;
            }
        }
        // The ready list is sorted by slot only if completions came in order;
        // frames from one tap queue do, and order within a batch is kept.
        self.ready.make_contiguous().sort_by_key(|(s, _)| *s);
        Ok((got, errors, first))
    }

    fn write_batch(&mut self, pkts: &[PacketBuf]) -> std::io::Result<SendOutcome> {
        let mut out = SendOutcome::default();
        {
            let mut sq = self.ring.submission();
            for (i, p) in pkts.iter().enumerate() {
                let d = p.as_slice();
                let e = opcode::Write::new(types::Fixed(0), d.as_ptr(), d.len() as u32)
                    .build()
                    .user_data(i as u64);
                // SAFETY: the frame stays borrowed until every completion is
                // reaped below, before this function returns.
                if unsafe { sq.push(&e) }.is_err() {
                    out.dropped += 1;
                }
            }
        }
        let want = self.ring.submission().len();
        self.ring.submit_and_wait(want)?;
        let mut done = 0;
        while done < want {
            let mut progressed = false;
            for cqe in self.ring.completion() {
                progressed = true;
                done += 1;
                let r = cqe.result();
                if r >= 0 {
                    out.sent += 1;
                } else if r == -libc::EAGAIN || r == -libc::ENOBUFS || r == -libc::EIO {
                    out.dropped += 1;
                } else {
                    out.errors += 1;
                }
            }
            if !progressed && done < want {
                self.ring.submit_and_wait(1)?;
            }
        }
        Ok(out)
    }
}

enum Io {
    Uring(Box<UringIo>),
    Syscall { buf: PacketBuf, held: bool },
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Io::Uring(u) => u.fmt(f),
            Io::Syscall { held, .. } => f.debug_struct("Syscall").field("held", held).finish(),
        }
    }
}

/// One queue of a tap device.
#[derive(Debug)]
pub struct TapPort {
    ifname: String,
    io: Io,
    fd: File,
    offloads: PortOffloads,
    mtu: Option<u16>,
    guest_offloads: u32,
}

fn tap_err<'a>(ifname: &'a str, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::TapIoctl {
        ifname: ifname.to_string(),
        op,
        source,
    }
}

fn inet_socket() -> Option<OwnedFd> {
    // SAFETY: socket takes no pointers; the result is checked.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return None;
    }
    // SAFETY: `s` is a fresh descriptor nobody else owns.
    Some(unsafe { OwnedFd::from_raw_fd(s) })
}

impl TapPort {
    /// Opens (creating if needed) tap `ifname`, one queue of it when
    /// `multi_queue`, and brings the link up.
    pub fn open(ifname: &str, multi_queue: bool, io: TapIo) -> Result<TapPort> {
        if ifname.is_empty() || ifname.len() > 15 {
            return Err(Error::BadIfName(ifname.to_string()));
        }
        let path = c"/dev/net/tun";
        // SAFETY: `path` is a NUL-terminated string; the result is checked.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(Error::OpenTun(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let mut ifr = sys::IfReq::new(ifname);
        let mut flags = sys::IFF_TAP | sys::IFF_NO_PI | sys::IFF_VNET_HDR;
        if multi_queue {
            flags |= sys::IFF_MULTI_QUEUE;
        }
        ifr.set_flags(flags);
        sys::ioctl_ifreq(fd.as_fd(), sys::TUNSETIFF, &mut ifr)
            .map_err(tap_err(ifname, "TUNSETIFF"))?;
        sys::ioctl_int_ptr(fd.as_fd(), sys::TUNSETVNETHDRSZ, VNET_HDR_LEN as i32)
            .map_err(tap_err(ifname, "TUNSETVNETHDRSZ"))?;
        let uso = sys::ioctl_val(
            fd.as_fd(),
            sys::TUNSETOFFLOAD,
            (TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6) as _,
        )
        .is_ok();
        sys::ioctl_val(fd.as_fd(), sys::TUNSETOFFLOAD, 0)
            .map_err(tap_err(ifname, "TUNSETOFFLOAD"))?;
        let mut mtu = None;
        if let Some(s) = inet_socket() {
            let mut r = sys::IfReq::new(ifname);
            if sys::ioctl_ifreq(s.as_fd(), sys::SIOCGIFMTU, &mut r).is_ok() {
                mtu = u16::try_from(r.int()).ok();
            }
            let mut r = sys::IfReq::new(ifname);
            if sys::ioctl_ifreq(s.as_fd(), sys::SIOCGIFFLAGS, &mut r).is_ok()
                && r.flags() & sys::IFF_UP == 0
            {
                r.set_flags(r.flags() | sys::IFF_UP);
                if let Err(e) = sys::ioctl_ifreq(s.as_fd(), sys::SIOCSIFFLAGS, &mut r) {
                    warn!("tap {ifname}: cannot bring the link up: {e}");
                }
            }
        }
        let io = match io {
            TapIo::Syscall => Io::Syscall {
                buf: PacketBuf::new(),
                held: false,
            },
            TapIo::Uring => Io::Uring(Box::new(UringIo::new(fd.as_fd()).map_err(Error::Uring)?)),
            TapIo::Auto => match UringIo::new(fd.as_fd()) {
                Ok(u) => Io::Uring(Box::new(u)),
                Err(e) => {
                    info!("tap {ifname}: io_uring unavailable ({e}), using read/write");
                    Io::Syscall {
                        buf: PacketBuf::new(),
                        held: false,
                    }
                }
            },
        };
        debug!("tap {ifname}: opened ({io:?}, mtu {mtu:?}, uso {uso})");
        Ok(TapPort {
            ifname: ifname.to_string(),
            io,
            fd,
            offloads: PortOffloads {
                csum: true,
                tso: true,
                uso,
                guest: true,
            },
            mtu,
            guest_offloads: 0,
        })
    }

    /// Whether packet I/O goes through io_uring.
    pub fn uses_uring(&self) -> bool {
        matches!(self.io, Io::Uring(_))
    }

    fn io_err(&self, op: &'static str, source: std::io::Error) -> Error {
        Error::TapIo {
            ifname: self.ifname.clone(),
            op,
            source,
        }
    }
}

fn write_one(fd: &File, data: &[u8]) -> std::result::Result<(), i32> {
    // SAFETY: writes from a live slice of exactly `data.len()` bytes.
    let r = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    Ok(())
}

fn read_one(fd: &File, buf: &mut [u8]) -> std::result::Result<usize, i32> {
    // SAFETY: reads into a live, writable slice of `buf.len()` bytes.
    let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    Ok(r as usize)
}

impl Port for TapPort {
    fn describe(&self) -> String {
        format!("tap={}", self.ifname)
    }

    fn send(&mut self, pkts: &mut [PacketBuf]) -> SendOutcome {
        match &mut self.io {
            Io::Uring(u) => {
                let mut total = SendOutcome::default();
                for chunk in pkts.chunks(URING_ENTRIES as usize) {
                    match u.write_batch(chunk) {
                        Ok(o) => {
                            total.sent += o.sent;
                            total.dropped += o.dropped;
                            total.errors += o.errors;
                        }
                        Err(e) => {
                            warn!("tap {}: io_uring submit failed: {e}", self.ifname);
                            total.errors += chunk.len();
                        }
                    }
                }
                total
            }
            Io::Syscall { .. } => {
                let mut out = SendOutcome::default();
                for p in pkts.iter() {
                    match write_one(&self.fd, p.as_slice()) {
                        Ok(()) => out.sent += 1,
                        Err(libc::EAGAIN) | Err(libc::ENOBUFS) | Err(libc::EIO) => out.dropped += 1,
                        Err(_) => out.errors += 1,
                    }
                }
                out
            }
        }
    }

    fn recv(&mut self, max: usize, deliver: &mut dyn FnMut(&mut [u8]) -> bool) -> Result<usize> {
        let mut n = 0;
        match &mut self.io {
            Io::Uring(u) => {
                // Bounded: at most max / RX_MIN_BATCH + 1 read batches.
                while n < max {
                    while let Some(&(slot, len)) = u.ready.front() {
                        if n >= max {
                            return Ok(n);
                        }
                        if !deliver(&mut u.slot_mut(slot)[..len as usize]) {
                            return Ok(n);
                        }
                        u.ready.pop_front();
                        n += 1;
                    }
                    let want = u.rx_batch.min(max - n).clamp(1, RX_SLOTS);
                    let (got, errors, first) = u.read_batch(want).map_err(|e| Error::TapIo {
                        ifname: self.ifname.clone(),
                        op: "io_uring read",
                        source: e,
                    })?;
                    if errors == want {
                        // Every read failed (the interface is gone, say):
                        // report it rather than spin on a dead fd.
                        let source = std::io::Error::from_raw_os_error(first);
                        return Err(Error::TapIo {
                            ifname: self.ifname.clone(),
                            op: "read",
                            source,
                        });
                    }
                    if errors > 0 {
                        debug!("tap {}: {errors} reads failed", self.ifname);
                    }
                    u.rx_batch = if got == want {
                        (want * 2).min(RX_SLOTS)
                    } else {
                        (got * 2).max(RX_MIN_BATCH)
                    };
                    if got == 0 {
                        break;
                    }
                }
                Ok(n)
            }
            Io::Syscall { buf, held } => {
                while n < max {
                    if !*held {
                        match read_one(&self.fd, buf.spare()) {
                            Ok(len) => {
                                buf.set_len(len);
                                *held = true;
                            }
                            Err(libc::EAGAIN) => break,
                            Err(libc::EINTR) => continue,
                            Err(e) => {
                                let source = std::io::Error::from_raw_os_error(e);
                                return Err(Error::TapIo {
                                    ifname: self.ifname.clone(),
                                    op: "read",
                                    source,
                                });
                            }
                        }
                    }
                    if !deliver(buf.as_mut_slice()) {
                        break;
                    }
                    *held = false;
                    n += 1;
                }
                Ok(n)
            }
        }
    }

    fn rx_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.fd.as_fd())
    }

    fn offloads(&self) -> PortOffloads {
        self.offloads
    }

    fn set_guest_offloads(&mut self, tun_flags: u32) -> Result<()> {
        if tun_flags == self.guest_offloads {
            return Ok(());
        }
        sys::ioctl_val(
            self.fd.as_fd(),
            sys::TUNSETOFFLOAD,
            tun_flags as libc::c_ulong,
        )
        .map_err(|e| self.io_err("TUNSETOFFLOAD", e))?;
        self.guest_offloads = tun_flags;
        Ok(())
    }

    fn mtu(&self) -> Option<u16> {
        self.mtu
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;

    /// A network namespace made for one test, deleted when dropped.
    pub(crate) struct NetNs {
        pub(crate) name: String,
    }

    impl NetNs {
        /// Creates the namespace, or None where `ip` or the privilege is
        /// missing: then the calling test is recorded as skipped (and fails
        /// under CI, see `ioasis_test_skip`) and must return.
        pub(crate) fn new(tag: &str) -> Option<NetNs> {
            let name = format!("vdpanet-{tag}-{}", std::process::id());
            let why = match Command::new("ip").args(["netns", "add", &name]).output() {
                Ok(o) if o.status.success() => return Some(NetNs { name }),
                Ok(o) => format!(
                    "`ip netns add {name}` failed ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => format!("cannot run `ip` (Debian package iproute2): {e}"),
            };
            ioasis_test_skip::skip(format!(
                "needs root and iproute2 for a network namespace: {why}"
            ));
            None
        }

        pub(crate) fn ip(&self, args: &[&str]) -> bool {
            Command::new("ip")
                .arg("-n")
                .arg(&self.name)
                .args(args)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        }

        /// Runs `f` on a thread that has entered the namespace.
        pub(crate) fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
            let path = format!("/var/run/netns/{}", self.name);
            std::thread::spawn(move || {
                let ns = File::open(&path).expect("open netns");
                // SAFETY: setns on this thread only, with a namespace fd we hold.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread")
        }
    }

    impl Drop for NetNs {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    /// An Ethernet+IPv4+UDP frame to 10.99.0.1 port 9 from 10.99.0.2,
    /// behind a zero virtio-net header.
    pub(crate) fn udp_frame(dst_mac: [u8; 6], payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&dst_mac);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&[0x08, 0x00]);
        let total = 20 + 8 + payload;
        let mut ip = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
            0,
            0,
            10,
            99,
            0,
            2,
            10,
            99,
            0,
            1,
        ];
        let mut sum: u32 = ip
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let c = !(sum as u16);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        let ul = (8 + payload) as u16;
        f.extend_from_slice(&[0x30, 0x39, 0, 9]);
        f.extend_from_slice(&ul.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend(std::iter::repeat_n(0xab, payload));
        f
    }

    fn tap_send_receive(io: TapIo, tag: &str) {
        let Some(ns) = NetNs::new(tag) else { return };
        let (port_res, ns_name) = (
            ns.run(move || TapPort::open("vt0", false, io)),
            ns.name.clone(),
        );
        let mut port = port_res.expect("open tap");
        if io == TapIo::Uring {
            assert!(port.uses_uring());
        }
        assert_eq!(port.describe(), "tap=vt0");
        assert!(port.offloads().csum && port.offloads().tso);
        assert_eq!(port.mtu(), Some(1500));
        assert!(ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "vt0"]));
        assert!(ns.ip(&["link", "set", "vt0", "up"]));
        assert!(ns.ip(&[
            "neigh",
            "add",
            "10.99.0.2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "vt0"
        ]));
        // Host side: a UDP socket in the namespace receives what the port sends.
        let sock = ns.run(|| {
            let s = std::net::UdpSocket::bind("10.99.0.1:9").expect("bind");
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .expect("timeout");
            s
        });
        let mac = ns_mac(&ns_name);
        let mut batch: Vec<PacketBuf> = (0..8)
            .map(|i| {
                let mut b = PacketBuf::new();
                b.fill_from(&udp_frame(mac, 10 + i));
                b
            })
            .collect();
        let o = port.send(&mut batch);
        assert_eq!(o.sent, 8, "{o:?}");
        let mut buf = [0u8; 64];
        for i in 0..8 {
            let (n, _) = sock
                .recv_from(&mut buf)
                .expect("udp datagram through the tap");
            assert_eq!(n, 10 + i);
        }
        // Other way: the namespace sends UDP to 10.99.0.2, the port reads it.
        sock.send_to(b"hello", "10.99.0.2:7").expect("send");
        let mut got = Vec::new();
        for _ in 0..500 {
            port.recv(16, &mut |f| {
                got.push(f.to_vec());
                true
            })
            .expect("recv");
            if got.iter().any(|f| f.ends_with(b"hello")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let f = got
            .iter()
            .find(|f| f.ends_with(b"hello"))
            .expect("frame from the namespace");
        assert_eq!(&f[VNET_HDR_LEN..VNET_HDR_LEN + 6], &[2, 0, 0, 0, 0, 2]);
        // A refused frame stays for the next call.
        sock.send_to(b"again", "10.99.0.2:7").expect("send");
        let mut refused = 0;
        for _ in 0..500 {
            port.recv(16, &mut |f| {
                if f.ends_with(b"again") {
                    refused += 1;
                    false
                } else {
                    true
                }
            })
            .expect("recv");
            if refused > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(refused, 1);
        let mut again = false;
        port.recv(16, &mut |f| {
            again |= f.ends_with(b"again");
            true
        })
        .expect("recv");
        assert!(again, "refused frame delivered on the next call");
        // Offloads toggle.
        port.set_guest_offloads(TUN_F_CSUM).expect("offload");
        port.set_guest_offloads(0).expect("offload");
    }

    fn ns_mac(ns: &str) -> [u8; 6] {
        let out = Command::new("ip")
            .args(["-n", ns, "-o", "link", "show", "vt0"])
            .output()
            .expect("ip link");
        let s = String::from_utf8_lossy(&out.stdout);
        let mac = s
            .split("link/ether ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .expect("mac");
        crate::net::parse_mac(mac).expect("parse mac")
    }

    #[test]
    fn test_tap_uring_send_receive() {
        tap_send_receive(TapIo::Uring, "uring");
    }

    #[test]
    fn test_tap_syscall_send_receive() {
        tap_send_receive(TapIo::Syscall, "sys");
    }

    fn tap_deleted_under_port(io: TapIo, tag: &str) {
        let Some(ns) = NetNs::new(tag) else { return };
        let mut port = ns
            .run(move || TapPort::open("vt0", false, io))
            .expect("open");
        assert!(ns.ip(&["link", "del", "vt0"]));
        assert!(
            port.recv(8, &mut |_| true).is_err(),
            "a dead tap is an error, not an empty one"
        );
        let mut b = PacketBuf::new();
        b.fill_from(&udp_frame([2, 0, 0, 0, 0, 1], 10));
        let o = port.send(&mut [b]);
        assert_eq!(o.sent, 0);
    }

    #[test]
    fn test_tap_deleted_under_uring_port() {
        tap_deleted_under_port(TapIo::Uring, "del-uring");
    }

    #[test]
    fn test_tap_deleted_under_syscall_port() {
        tap_deleted_under_port(TapIo::Syscall, "del-sys");
    }

    #[test]
    fn test_tap_rejects_bad_header() {
        let Some(ns) = NetNs::new("badhdr") else {
            return;
        };
        let mut port = ns
            .run(|| TapPort::open("vt0", false, TapIo::Auto))
            .expect("open");
        assert!(ns.ip(&["link", "set", "vt0", "up"]));
        let mut b = PacketBuf::new();
        let mut f = udp_frame([2, 0, 0, 0, 0, 1], 10);
        f[1] = 0x7f; // unknown gso type
        b.fill_from(&f);
        let o = port.send(&mut [b]);
        assert_eq!(o.sent, 0);
        assert_eq!(o.errors + o.dropped, 1);
    }

    #[test]
    fn test_tap_multi_queue_opens_queues() {
        let Some(ns) = NetNs::new("mq") else { return };
        let ports = ns.run(|| {
            (0..4)
                .map(|_| TapPort::open("vt0", true, TapIo::Auto))
                .collect::<Result<Vec<_>>>()
        });
        let ports = ports.expect("multi-queue tap");
        assert_eq!(ports.len(), 4);
        // A single-queue open of the same tap is refused by the kernel.
        let single = ns.run(|| TapPort::open("vt0", false, TapIo::Auto).is_err());
        assert!(single);
    }
}
