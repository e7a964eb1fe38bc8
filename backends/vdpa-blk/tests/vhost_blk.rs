//! vdpa-blk driven over vhost-user in-process: the vhost crate's
//! `Frontend` negotiates, a test driver ring (`ioasis::testing`) submits
//! requests, and the image file is checked afterwards.

#[path = "../../../framework/tests/vhost_common/mod.rs"]
mod vhost_common;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use ioasis::device::Device;
use ioasis::testing::Buf;
use ioasis::vhost_user::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use vdpa_blk::backing::{Backing, ImageSpec};
use vdpa_blk::config::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
};
use vdpa_blk::request::*;
use vdpa_blk::{BlkDevice, BlkOptions};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost_common::*;

const BASE: u64 = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_RING_F_EVENT_IDX;
const DISK: usize = 1 << 20;
/// Offsets in guest memory of a request's pieces.
const HDR: usize = BUF_OFF;
const STATUS: usize = BUF_OFF + 0x10;
const OUT: usize = BUF_OFF + 0x1000;
const IN: usize = BUF_OFF + 0x40000;
const RING_STRIDE: usize = 0x4000;
const IOVA_BASE: u64 = 0x10_0000_0000;

struct Disk {
    srv: TestServer,
    fe: Frontend,
    raw: UnixStream,
    guest: Guest,
    qs: Vec<QueueSetup>,
    done: Vec<u16>,
    image: PathBuf,
    _dir: tempfile::TempDir,
    device: Arc<BlkDevice>,
    /// Device address of guest offset 0 (GPA, or IOVA with ACCESS_PLATFORM).
    base: u64,
}

struct Reply {
    status: u8,
    used_len: u32,
    data: Vec<u8>,
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

impl Disk {
    fn start(read_only: bool, queues: u16, iotlb: bool) -> Disk {
        Self::start_with(None, read_only, queues, iotlb)
    }

    fn start_with(null: Option<u64>, read_only: bool, queues: u16, iotlb: bool) -> Disk {
        Self::start_in(
            tempfile::tempdir().expect("tempdir"),
            null,
            read_only,
            queues,
            iotlb,
        )
    }

    /// A disk whose image lives in `dir`.
    fn start_in(
        dir: tempfile::TempDir,
        null: Option<u64>,
        read_only: bool,
        queues: u16,
        iotlb: bool,
    ) -> Disk {
        let image = dir.path().join("disk.img");
        std::fs::write(&image, pattern(0xa5, DISK)).expect("image");
        let spec = match null {
            Some(n) => ImageSpec::Null(n),
            None => ImageSpec::File(image.clone()),
        };
        let backing = Backing::open(&spec, read_only).expect("open image");
        let device = Arc::new(BlkDevice::new(
            backing,
            BlkOptions {
                queues,
                queue_size: 16,
                serial: "test-serial-0123".into(),
                poll: ioasis::poll::PollMode::Off,
                worker_cpus: Vec::new(),
            },
        ));
        let srv = TestServer::start(vec![("blk", device.clone() as Arc<dyn Device>)]);
        let (fe, raw, guest, qs, base) = attach(&srv, &device, queues, iotlb);
        Disk {
            srv,
            fe,
            raw,
            guest,
            qs,
            done: vec![0; usize::from(queues)],
            image,
            _dir: dir,
            device,
            base,
        }
    }

    /// Disconnects the frontend and connects a new one (fresh memory and
    /// rings).
    fn reconnect(&mut self) {
        let queues = self.qs.len() as u16;
        let iotlb = self.base == IOVA_BASE;
        // The old connection ends first (a second one waits for it).
        let (fe, raw, guest, qs, base) = {
            let old = std::mem::take(&mut self.qs);
            drop(old);
            let dummy = UnixStream::pair().expect("pair").0;
            drop(std::mem::replace(&mut self.raw, dummy));
            let (f, _) = UnixStream::pair().expect("pair");
            drop(std::mem::replace(&mut self.fe, Frontend::from_stream(f, 1)));
            attach(&self.srv, &self.device, queues, iotlb)
        };
        self.fe = fe;
        self.raw = raw;
        self.guest = guest;
        self.qs = qs;
        self.base = base;
        self.done = vec![0; usize::from(queues)];
    }

    fn addr(&self, off: usize) -> u64 {
        self.base + off as u64
    }

    /// One request on queue `q`: header, `out` as readable data, `in_len`
    /// writable data bytes, the status byte. Waits for its completion.
    fn request(&mut self, q: usize, kind: u32, sector: u64, out: &[u8], in_len: usize) -> Reply {
        let hdr = BlkHeader {
            kind: kind.to_le(),
            ioprio: 0,
            sector: sector.to_le(),
        };
        use vm_memory::ByteValued;
        self.guest.mem.write_at(HDR, hdr.as_slice()).expect("hdr");
        self.guest.mem.write_at(STATUS, &[0xff]).expect("status");
        self.guest.mem.write_at(OUT, out).expect("out");
        self.guest
            .mem
            .write_at(IN, &vec![0xee; in_len])
            .expect("in");
        let mut bufs = vec![Buf {
            addr: self.addr(HDR),
            len: 16,
            writable: false,
        }];
        if !out.is_empty() {
            bufs.push(Buf {
                addr: self.addr(OUT),
                len: out.len() as u32,
                writable: false,
            });
        }
        if in_len > 0 {
            bufs.push(Buf {
                addr: self.addr(IN),
                len: in_len as u32,
                writable: true,
            });
        }
        bufs.push(Buf {
            addr: self.addr(STATUS),
            len: 1,
            writable: true,
        });
        self.submit(q, &bufs)
    }

    /// Submits one chain and waits for it.
    fn submit(&mut self, q: usize, bufs: &[Buf]) -> Reply {
        let head = self.qs[q].ring.add_chain(bufs).expect("chain");
        self.qs[q].ring.publish().expect("publish");
        self.qs[q].kick.write(1).expect("kick");
        let slot = self.done[q];
        self.done[q] = self.done[q].wrapping_add(1);
        wait_used(&self.qs[q], self.done[q]);
        let (id, used_len) = self.qs[q].ring.used_elem(slot).expect("used elem");
        assert_eq!(id, u32::from(head), "completed head");
        let mut status = [0u8];
        self.guest.mem.read_at(STATUS, &mut status).expect("status");
        let in_len = bufs
            .iter()
            .filter(|b| b.writable)
            .map(|b| b.len as usize)
            .sum::<usize>();
        let mut data = vec![0u8; in_len.saturating_sub(1)];
        self.guest.mem.read_at(IN, &mut data).expect("in data");
        Reply {
            status: status[0],
            used_len,
            data,
        }
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(&self.image).expect("read image")
    }
}

/// Connects a frontend to the disk and sets up its queues.
fn attach(
    srv: &TestServer,
    device: &BlkDevice,
    queues: u16,
    iotlb: bool,
) -> (Frontend, UnixStream, Guest, Vec<QueueSetup>, u64) {
    let (mut fe, raw) = connect(&srv.socket("blk"), u64::from(queues));
    let guest = Guest::new();
    let offered = device.features();
    let mut features = BASE
        | (offered
            & (VIRTIO_BLK_F_FLUSH
                | VIRTIO_BLK_F_DISCARD
                | VIRTIO_BLK_F_WRITE_ZEROES
                | VIRTIO_BLK_F_RO));
    if iotlb {
        features |= VIRTIO_F_ACCESS_PLATFORM;
    }
    handshake(&mut fe, &guest, features);
    let base = if iotlb {
        let (ours, backend) = UnixStream::pair().expect("pair");
        fe.set_backend_request_fd(&ours).expect("backend fd");
        std::mem::forget(backend);
        // The whole of guest memory at IOVA_BASE.
        assert_eq!(
            iotlb_msg(&raw, IOVA_BASE, GUEST_SIZE as u64, guest.va(0)),
            0
        );
        IOVA_BASE
    } else {
        guest.gpa
    };
    let mut qs = Vec::new();
    for i in 0..usize::from(queues) {
        let off = RING_OFF + i * RING_STRIDE;
        let addr = base + off as u64;
        let fe_addr = if iotlb { addr } else { guest.va(off) };
        qs.push(setup_queue(&mut fe, &guest, i, off, addr, fe_addr));
    }
    (fe, raw, guest, qs, base)
}

fn iotlb_msg(raw: &UnixStream, iova: u64, size: u64, uaddr: u64) -> u64 {
    // VHOST_IOTLB_UPDATE (2), VHOST_ACCESS_RW (3).
    iotlb(raw, 2, iova, size, uaddr, 3)
}

#[test]
fn test_read_write_flush_get_id_discard_write_zeroes() {
    let mut d = Disk::start(false, 1, false);
    let cfg = d.device.config();
    let capacity = cfg.capacity;
    assert_eq!(capacity, (DISK / 512) as u64);
    // Read 8 KiB at sector 16: the image's pattern.
    let r = d.request(0, VIRTIO_BLK_T_IN, 16, &[], 8192);
    assert_eq!((r.status, r.used_len), (VIRTIO_BLK_S_OK, 8193));
    assert_eq!(r.data, pattern(0xa5, DISK)[16 * 512..16 * 512 + 8192]);
    // Write 12 KiB at sector 100, read it back, check the file.
    let w = pattern(7, 12288);
    let r = d.request(0, VIRTIO_BLK_T_OUT, 100, &w, 0);
    assert_eq!((r.status, r.used_len), (VIRTIO_BLK_S_OK, 1));
    let r = d.request(0, VIRTIO_BLK_T_IN, 100, &[], 12288);
    assert_eq!(r.data, w);
    let r = d.request(0, VIRTIO_BLK_T_FLUSH, 0, &[], 0);
    assert_eq!(r.status, VIRTIO_BLK_S_OK);
    assert_eq!(&d.image()[100 * 512..100 * 512 + 12288], &w[..]);
    // The serial.
    let r = d.request(0, VIRTIO_BLK_T_GET_ID, 0, &[], ID_BYTES);
    assert_eq!(r.status, VIRTIO_BLK_S_OK);
    assert_eq!(&r.data[..16], b"test-serial-0123");
    assert_eq!(r.data[16..], [0; 4]);
    // Discard 8 sectors at 200 and write-zeroes 4 at 300: both read zero.
    use vm_memory::ByteValued;
    let seg = |sector: u64, n: u32, flags: u32| ZeroSegment {
        sector: sector.to_le(),
        num_sectors: n.to_le(),
        flags: flags.to_le(),
    };
    let r = d.request(0, VIRTIO_BLK_T_DISCARD, 0, seg(200, 8, 0).as_slice(), 0);
    assert_eq!(r.status, VIRTIO_BLK_S_OK);
    let r = d.request(
        0,
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        seg(300, 4, 0).as_slice(),
        0,
    );
    assert_eq!(r.status, VIRTIO_BLK_S_OK);
    let r = d.request(
        0,
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        seg(310, 4, FLAG_UNMAP).as_slice(),
        0,
    );
    assert_eq!(r.status, VIRTIO_BLK_S_OK);
    let img = d.image();
    assert!(img[200 * 512..208 * 512].iter().all(|&b| b == 0));
    assert!(img[300 * 512..304 * 512].iter().all(|&b| b == 0));
    assert!(img[310 * 512..314 * 512].iter().all(|&b| b == 0));
    assert_eq!(
        img[304 * 512..310 * 512],
        pattern(0xa5, DISK)[304 * 512..310 * 512]
    );
    assert_eq!(img.len(), DISK, "the image keeps its size");
    let stats = d.device.stats();
    assert_eq!(stats.requests(), 8);
    assert_eq!(stats.errors(), 0);
    drop(d.fe);
    d.srv.stop();
}

/// Malformed, out-of-range and unknown requests are answered with an
/// error status, counted, and the device goes on serving.
#[test]
fn test_malformed_requests_fail_and_the_device_goes_on() {
    let mut d = Disk::start(false, 1, false);
    let sectors = (DISK / 512) as u64;
    // Past the end, straddling the end, a partial sector, an unknown type.
    let r = d.request(0, VIRTIO_BLK_T_IN, sectors, &[], 512);
    assert_eq!((r.status, r.used_len), (VIRTIO_BLK_S_IOERR, 1));
    let r = d.request(0, VIRTIO_BLK_T_OUT, sectors - 1, &[1; 1024], 0);
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR);
    let r = d.request(0, VIRTIO_BLK_T_IN, 0, &[], 100);
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR);
    let r = d.request(0, 77, 0, &[], 0);
    assert_eq!(r.status, VIRTIO_BLK_S_UNSUPP);
    let r = d.request(0, VIRTIO_BLK_T_IN, u64::MAX, &[], 512);
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR);
    // A discard with a flag it does not support, and half a segment.
    let r = d.request(0, VIRTIO_BLK_T_DISCARD, 0, &[0; 8], 0);
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR);
    // A chain with no writable byte: completed with length 0.
    let bufs = [Buf {
        addr: d.addr(HDR),
        len: 16,
        writable: false,
    }];
    let r = d.submit(0, &bufs);
    assert_eq!(r.used_len, 0);
    // A short header.
    let bufs = [
        Buf {
            addr: d.addr(HDR),
            len: 8,
            writable: false,
        },
        Buf {
            addr: d.addr(STATUS),
            len: 1,
            writable: true,
        },
    ];
    d.guest.mem.write_at(STATUS, &[0xff]).expect("status");
    let r = d.submit(0, &bufs);
    assert_eq!((r.status, r.used_len), (VIRTIO_BLK_S_IOERR, 1));
    // Still serving.
    let r = d.request(0, VIRTIO_BLK_T_IN, 0, &[], 512);
    assert_eq!(r.status, VIRTIO_BLK_S_OK);
    let stats: serde_json::Value =
        serde_json::from_str(&d.device.stats().json_line(0.0, false)).expect("json");
    assert_eq!(stats["requests"], 9);
    assert_eq!(stats["errors"], 8);
    assert_eq!(stats["queues"][0]["unsupported"], 1);
    assert_eq!(stats["queues"][0]["malformed"], 7);
    assert_eq!(d.image(), pattern(0xa5, DISK), "nothing written");
}

#[test]
fn test_read_only_disk_fails_writes_and_keeps_the_image() {
    let mut d = Disk::start(true, 1, false);
    assert_ne!(d.device.features() & VIRTIO_BLK_F_RO, 0);
    assert_eq!(
        d.device.features() & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES),
        0
    );
    let r = d.request(0, VIRTIO_BLK_T_OUT, 0, &[9; 4096], 0);
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR);
    let r = d.request(0, VIRTIO_BLK_T_IN, 0, &[], 4096);
    assert_eq!(r.status, VIRTIO_BLK_S_OK);
    assert_eq!(r.data, pattern(0xa5, DISK)[..4096]);
    let r = d.request(0, VIRTIO_BLK_T_DISCARD, 0, &[0; 16], 0);
    assert_eq!(r.status, VIRTIO_BLK_S_UNSUPP, "not negotiated");
    assert_eq!(d.image(), pattern(0xa5, DISK));
}

#[test]
fn test_two_queues_each_served() {
    let mut d = Disk::start(false, 2, false);
    for i in 0..6u64 {
        let q = (i % 2) as usize;
        let w = pattern(i as u8, 4096);
        let r = d.request(q, VIRTIO_BLK_T_OUT, i * 8, &w, 0);
        assert_eq!(r.status, VIRTIO_BLK_S_OK);
        let r = d.request(1 - q, VIRTIO_BLK_T_IN, i * 8, &[], 4096);
        assert_eq!(r.data, w, "queue {} reads what queue {q} wrote", 1 - q);
    }
    let stats: serde_json::Value =
        serde_json::from_str(&d.device.stats().json_line(0.0, false)).expect("json");
    assert_eq!(stats["queues"][0]["requests"], 6);
    assert_eq!(stats["queues"][1]["requests"], 6);
}

/// With VIRTIO_F_ACCESS_PLATFORM every address is an IOVA the frontend
/// maps with IOTLB messages.
#[test]
fn test_iotlb_mode() {
    let mut d = Disk::start(false, 1, true);
    let w = pattern(3, 8192);
    let r = d.request(0, VIRTIO_BLK_T_OUT, 40, &w, 0);
    assert_eq!(r.status, VIRTIO_BLK_S_OK);
    let r = d.request(0, VIRTIO_BLK_T_IN, 40, &[], 8192);
    assert_eq!((r.status, r.data), (VIRTIO_BLK_S_OK, w.clone()));
    assert_eq!(&d.image()[40 * 512..40 * 512 + 8192], &w[..]);
    let _ = &d.raw;
}

/// An image on tmpfs takes the in-memory path (the worker reads and
/// writes it itself rather than through io_uring): reads, writes of
/// several descriptors, reads back and the file, with the memory table and
/// through IOTLB translation.
#[test]
fn test_image_on_tmpfs_takes_the_in_memory_path() {
    let Some(shm) = ["/dev/shm"]
        .into_iter()
        .map(std::path::Path::new)
        .find(|p| p.is_dir())
    else {
        ioasis_test_skip::skip("no /dev/shm: the in-memory path needs a tmpfs");
        return;
    };
    for iotlb in [false, true] {
        let dir = tempfile::tempdir_in(shm).expect("tempdir on tmpfs");
        let mut d = Disk::start_in(dir, None, false, 1, iotlb);
        let backing = Backing::open(&ImageSpec::File(d.image.clone()), true).expect("open");
        if !backing.in_memory() {
            ioasis_test_skip::skip("/dev/shm is not a memory file system here");
            return;
        }
        let r = d.request(0, VIRTIO_BLK_T_IN, 16, &[], 8192);
        assert_eq!(
            (r.status, r.used_len),
            (VIRTIO_BLK_S_OK, 8193),
            "iotlb {iotlb}"
        );
        assert_eq!(r.data, pattern(0xa5, DISK)[16 * 512..16 * 512 + 8192]);
        let w = pattern(9, 12288);
        let r = d.request(0, VIRTIO_BLK_T_OUT, 100, &w, 0);
        assert_eq!(
            (r.status, r.used_len),
            (VIRTIO_BLK_S_OK, 1),
            "iotlb {iotlb}"
        );
        let r = d.request(0, VIRTIO_BLK_T_IN, 100, &[], 12288);
        assert_eq!(r.data, w, "iotlb {iotlb}");
        assert_eq!(&d.image()[100 * 512..100 * 512 + 12288], &w[..]);
        // The last sector, and one past the end (refused before any I/O).
        let last = (DISK / 512 - 1) as u64;
        let r = d.request(0, VIRTIO_BLK_T_IN, last, &[], 512);
        assert_eq!(r.status, VIRTIO_BLK_S_OK);
        let r = d.request(0, VIRTIO_BLK_T_IN, last, &[], 1024);
        assert_eq!(r.status, VIRTIO_BLK_S_IOERR);
        assert_eq!(d.device.stats().errors(), 1, "the refused read is counted");
        let _ = &d.raw;
    }
}

#[test]
fn test_null_disk_reads_zeroes_and_writes_nothing() {
    let mut d = Disk::start_with(Some(1 << 30), false, 1, false);
    let capacity = d.device.config().capacity;
    assert_eq!(capacity, (1u64 << 30) / 512);
    let r = d.request(0, VIRTIO_BLK_T_IN, 1000, &[], 8192);
    assert_eq!((r.status, r.used_len), (VIRTIO_BLK_S_OK, 8193));
    assert!(r.data.iter().all(|&b| b == 0));
    let r = d.request(0, VIRTIO_BLK_T_OUT, 1000, &[1; 4096], 0);
    assert_eq!(r.status, VIRTIO_BLK_S_OK);
    let r = d.request(0, VIRTIO_BLK_T_IN, (1 << 21) - 1, &[], 1024);
    assert_eq!(
        r.status, VIRTIO_BLK_S_IOERR,
        "past the end of the null disk"
    );
    assert_eq!(d.image(), pattern(0xa5, DISK));
}

/// A frontend that disconnects and connects again gets the device anew.
#[test]
fn test_reconnect() {
    let mut d = Disk::start(false, 1, false);
    let w = pattern(1, 4096);
    let r = d.request(0, VIRTIO_BLK_T_OUT, 8, &w, 0);
    assert_eq!(r.status, VIRTIO_BLK_S_OK);
    for round in 0..2 {
        d.reconnect();
        let r = d.request(0, VIRTIO_BLK_T_IN, 8, &[], 4096);
        assert_eq!((r.status, &r.data), (VIRTIO_BLK_S_OK, &w), "round {round}");
    }
}
