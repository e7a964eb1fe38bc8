//! Test support for packed rings: [`PackedDriverRing`], the driver side of
//! a packed virtqueue in an iommu-core [`Memory`], and
//! [`walk_arbitrary`], the packed descriptor walk on a ring of arbitrary
//! bytes (what the `packed_walk` fuzz target and the property tests run).

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use iommu_core::Memory;

use super::{Buf, DriverError};

/// `VIRTQ_DESC_F_NEXT`.
pub const PACKED_DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
pub const PACKED_DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`.
pub const PACKED_DESC_F_INDIRECT: u16 = 4;
/// `VIRTQ_DESC_F_AVAIL`.
pub const PACKED_DESC_F_AVAIL: u16 = 1 << 7;
/// `VIRTQ_DESC_F_USED`.
pub const PACKED_DESC_F_USED: u16 = 1 << 15;

/// A packed ring written by a test driver: the descriptor ring, then the
/// driver area (4 bytes), then the device area (4 bytes).
#[derive(Debug)]
pub struct PackedDriverRing {
    mem: Arc<Memory>,
    off: usize,
    addr: u64,
    size: u16,
    avail: u16,
    avail_wrap: bool,
    used: u16,
    used_wrap: bool,
    free: VecDeque<u16>,
    ndescs: Vec<u16>,
}

/// One raw packed descriptor (to craft bad drivers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedRaw {
    /// Buffer address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Buffer id.
    pub id: u16,
    /// Flags, written as given.
    pub flags: u16,
}

impl PackedDriverRing {
    /// Bytes a ring of `size` takes.
    pub fn layout_len(size: u16) -> usize {
        16 * usize::from(size) + 8
    }

    /// A ring at byte `off` of `mem`, which the device sees at address
    /// `addr` (16-aligned); both wrap counters start set.
    pub fn new(mem: Arc<Memory>, off: usize, addr: u64, size: u16) -> Result<Self, DriverError> {
        if size == 0 || size > 0x8000 {
            return Err(DriverError::BadSize(size));
        }
        let need = Self::layout_len(size);
        if off.checked_add(need).is_none_or(|end| end > mem.len()) {
            return Err(DriverError::TooSmall {
                need,
                off,
                have: mem.len(),
            });
        }
        mem.fill(off, need, 0)
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        Ok(PackedDriverRing {
            mem,
            off,
            addr,
            size,
            avail: 0,
            avail_wrap: true,
            used: 0,
            used_wrap: true,
            free: (0..size).collect(),
            ndescs: vec![0; usize::from(size)],
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Device address of the descriptor ring.
    pub fn desc_addr(&self) -> u64 {
        self.addr
    }

    /// Device address of the driver area (driver event suppression).
    pub fn driver_addr(&self) -> u64 {
        self.addr + 16 * u64::from(self.size)
    }

    /// Device address of the device area (device event suppression).
    pub fn device_addr(&self) -> u64 {
        self.driver_addr() + 4
    }

    fn write(&self, off: usize, b: &[u8]) -> Result<(), DriverError> {
        self.mem
            .write_at(self.off + off, b)
            .map_err(|e| DriverError::Memory(e.to_string()))
    }

    fn read(&self, off: usize, b: &mut [u8]) -> Result<(), DriverError> {
        self.mem
            .read_at(self.off + off, b)
            .map_err(|e| DriverError::Memory(e.to_string()))
    }

    /// The flags that make a descriptor available in the driver's current
    /// lap.
    pub fn avail_bits(&self) -> u16 {
        if self.avail_wrap {
            PACKED_DESC_F_AVAIL
        } else {
            PACKED_DESC_F_USED
        }
    }

    /// The driver's next slot and wrap counter.
    pub fn avail_position(&self) -> (u16, bool) {
        (self.avail, self.avail_wrap)
    }

    /// Writes descriptor `slot` as given, flags last.
    pub fn write_raw(&self, slot: u16, d: PackedRaw) -> Result<(), DriverError> {
        let mut b = [0u8; 14];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.id.to_le_bytes());
        let at = 16 * usize::from(slot % self.size);
        self.write(at, &b)?;
        fence(Ordering::SeqCst);
        self.write(at + 14, &d.flags.to_le_bytes())
    }

    /// Moves the driver's next slot `n` slots on (after raw writes).
    pub fn skip(&mut self, n: u16) {
        for _ in 0..n {
            self.avail += 1;
            if self.avail == self.size {
                self.avail = 0;
                self.avail_wrap = !self.avail_wrap;
            }
        }
    }

    /// Records that buffer `id` took `n` ring descriptors (a chain written
    /// with [`write_raw`](Self::write_raw)), so that its completion moves
    /// the driver's used position past all of them.
    pub fn track(&mut self, id: u16, n: u16) {
        if let Some(c) = self.ndescs.get_mut(usize::from(id)) {
            *c = n;
            self.free.retain(|&f| f != id);
        }
    }

    fn take_id(&mut self, n: usize) -> Result<u16, DriverError> {
        let free =
            usize::from(self.size) - self.ndescs.iter().map(|&c| usize::from(c)).sum::<usize>();
        if n == 0 || n > free {
            return Err(DriverError::Full(n));
        }
        self.free.pop_front().ok_or(DriverError::Full(n))
    }

    /// Makes a chain of `bufs` (readable ones first) available; returns
    /// its buffer id. The head's flags are written last, so the device sees
    /// the chain whole.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> Result<u16, DriverError> {
        let id = self.take_id(bufs.len())?;
        let head = self.avail;
        let mut head_flags = 0;
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = self.avail_bits();
            if b.writable {
                flags |= PACKED_DESC_F_WRITE;
            }
            if i + 1 < bufs.len() {
                flags |= PACKED_DESC_F_NEXT;
            }
            let slot = self.avail;
            if i == 0 {
                // Everything but the flags now, the flags at the end.
                let mut d = [0u8; 14];
                d[0..8].copy_from_slice(&b.addr.to_le_bytes());
                d[8..12].copy_from_slice(&b.len.to_le_bytes());
                d[12..14].copy_from_slice(&id.to_le_bytes());
                self.write(16 * usize::from(slot), &d)?;
                head_flags = flags;
            } else {
                self.write_raw(
                    slot,
                    PackedRaw {
                        addr: b.addr,
                        len: b.len,
                        id,
                        flags,
                    },
                )?;
            }
            self.skip(1);
        }
        fence(Ordering::SeqCst);
        self.write(16 * usize::from(head) + 14, &head_flags.to_le_bytes())?;
        fence(Ordering::SeqCst);
        self.ndescs[usize::from(id)] = bufs.len() as u16;
        Ok(id)
    }

    /// Makes a chain available as one descriptor pointing at an indirect
    /// table of `bufs`, written at byte `table_off` of `table_mem`, which
    /// the device sees at `table_addr`; returns its buffer id.
    pub fn add_indirect(
        &mut self,
        table_mem: &Memory,
        table_off: usize,
        table_addr: u64,
        bufs: &[Buf],
    ) -> Result<u16, DriverError> {
        let id = self.take_id(1)?;
        for (i, b) in bufs.iter().enumerate() {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&b.addr.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            let flags = if b.writable { PACKED_DESC_F_WRITE } else { 0 };
            d[14..16].copy_from_slice(&flags.to_le_bytes());
            table_mem
                .write_at(table_off + 16 * i, &d)
                .map_err(|e| DriverError::Memory(e.to_string()))?;
        }
        let d = PackedRaw {
            addr: table_addr,
            len: 16 * bufs.len() as u32,
            id,
            flags: self.avail_bits() | PACKED_DESC_F_INDIRECT,
        };
        fence(Ordering::SeqCst);
        self.write_raw(self.avail, d)?;
        self.skip(1);
        self.ndescs[usize::from(id)] = 1;
        Ok(id)
    }

    fn read_flags(&self, slot: u16) -> Result<u16, DriverError> {
        let mut b = [0u8; 2];
        self.read(16 * usize::from(slot) + 14, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Takes the next used descriptor, if the device wrote one: `(id,
    /// length written)`. The driver's used position moves past the
    /// descriptors that buffer's chain took.
    pub fn take_used(&mut self) -> Result<Option<(u16, u32)>, DriverError> {
        fence(Ordering::SeqCst);
        let flags = self.read_flags(self.used)?;
        let a = flags & PACKED_DESC_F_AVAIL != 0;
        let u = flags & PACKED_DESC_F_USED != 0;
        if a != u || u != self.used_wrap {
            return Ok(None);
        }
        let mut b = [0u8; 6];
        self.read(16 * usize::from(self.used) + 8, &mut b)?;
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let id = u16::from_le_bytes([b[4], b[5]]);
        let n = self
            .ndescs
            .get(usize::from(id))
            .copied()
            .filter(|&n| n > 0)
            .unwrap_or(1);
        if let Some(c) = self.ndescs.get_mut(usize::from(id)) {
            if *c > 0 {
                *c = 0;
                self.free.push_back(id);
            }
        }
        for _ in 0..n {
            self.used += 1;
            if self.used == self.size {
                self.used = 0;
                self.used_wrap = !self.used_wrap;
            }
        }
        Ok(Some((id, len)))
    }

    /// Forgets the buffers up to `id` in an in-order batch the device
    /// completed with one used descriptor (the ones `take_used` did not
    /// see), oldest first.
    pub fn in_order_skip(&mut self, ids: &[u16]) {
        for &id in ids {
            let n = self.ndescs[usize::from(id % self.size)];
            self.ndescs[usize::from(id % self.size)] = 0;
            if n > 0 {
                self.free.push_back(id);
            }
            for _ in 0..n {
                self.used += 1;
                if self.used == self.size {
                    self.used = 0;
                    self.used_wrap = !self.used_wrap;
                }
            }
        }
    }

    /// Writes the driver's event suppression structure.
    pub fn set_driver_event(&self, off_wrap: u16, flags: u16) -> Result<(), DriverError> {
        let mut b = [0u8; 4];
        b[..2].copy_from_slice(&off_wrap.to_le_bytes());
        b[2..].copy_from_slice(&flags.to_le_bytes());
        self.write(16 * usize::from(self.size), &b)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// The device's event suppression structure: `(off_wrap, flags)`.
    pub fn device_event(&self) -> Result<(u16, u16), DriverError> {
        fence(Ordering::SeqCst);
        let mut b = [0u8; 4];
        self.read(16 * usize::from(self.size) + 4, &mut b)?;
        Ok((
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[2], b[3]]),
        ))
    }
}

/// What [`walk_arbitrary`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkReport {
    /// Chains popped whole (and completed).
    pub chains: usize,
    /// Malformed chains the queue completed with length 0.
    pub bad: usize,
    /// The walk stopped on a translation miss (the queue parked) or a
    /// failed ring.
    pub stopped: bool,
}

/// The packed descriptor walk on arbitrary input: `data` sets the ring
/// size (2 to 16), where the device starts (slot and wrap counter),
/// whether a miss parks the queue (IOTLB) or is the driver's error
/// (memory table), the descriptor ring's bytes and an indirect-table area
/// (both in a 64 KiB memory mapped at I/O address 0; descriptors may point
/// anywhere), and whether it pops one chain at a time or in bursts of
/// four (`Queue::pop_burst`, whose packed path walks the ring in one
/// loop). Pops until the ring looks empty, completing every chain at
/// once, at most `4 * size + 4` times (bursts).
///
/// Panics if an invariant breaks: a popped chain without descriptors or
/// whose lengths do not add up, more pops than the bound, or, when the
/// walk did not stop, the device's used position not at its available
/// position (every consumed descriptor completed exactly once).
pub fn walk_arbitrary(data: &[u8]) -> WalkReport {
    use virtio_queue::QueueT;

    use crate::dma::{Dma, Section};
    use crate::queue::packed::PackedState;
    use crate::queue::{Chain, Queues, Vring};

    const MEM: usize = 0x1_0000;
    const TABLES: usize = 0x8000;
    let (&head, rest) = data.split_first().unwrap_or((&0, &[]));
    let size = 2u16 << (head & 3);
    let park = head & 4 != 0;
    let in_bursts = head & 8 != 0;
    let (&start, rest) = rest.split_first().unwrap_or((&0, &[]));
    let ring_len = 16 * usize::from(size);
    let (ring, tables) = rest.split_at(rest.len().min(ring_len));
    let iommu = iommu_core::Iommu::new();
    let core = iommu_core::IommuDevice::new("walk", iommu_core::HwInfo::default());
    let setup = || -> Result<(Arc<Memory>, u32), iommu_core::Error> {
        let dev = iommu.bind(&core)?;
        let ioas = iommu.ioas_alloc()?;
        iommu.attach(dev, None, ioas)?;
        let mem = Memory::anonymous("walk", MEM)?;
        iommu.ioas_map(ioas, &mem, 0, MEM as u64, Some(0), iommu_core::Perm::RW)?;
        Ok((mem, ioas))
    };
    let Ok((mem, _ioas)) = setup() else {
        return WalkReport::default();
    };
    if mem.write_at(0, ring).is_err()
        || mem
            .write_at(TABLES, &tables[..tables.len().min(MEM - TABLES)])
            .is_err()
    {
        return WalkReport::default();
    }
    let Some(mut v) = Vring::new(16) else {
        return WalkReport::default();
    };
    v.q.set_size(size);
    let areas =
        v.q.try_set_desc_table_address(vm_memory::GuestAddress(0))
            .and_then(|_| {
                v.q.try_set_avail_ring_address(vm_memory::GuestAddress(ring_len as u64))
            })
            .and_then(|_| {
                v.q.try_set_used_ring_address(vm_memory::GuestAddress(ring_len as u64 + 4))
            });
    if areas.is_err() {
        return WalkReport::default();
    }
    v.q.set_ready(true);
    v.started = true;
    v.enabled = true;
    let mut p = PackedState::new();
    p.set_base(u32::from(u16::from(start) % size) | (u32::from(start & 0x80 != 0) << 15));
    v.packed = Some(p);
    let vrings = vec![(0u16, Arc::new(std::sync::Mutex::new(v)))];
    let mut tr = core.translator();
    let section = Section::new(&mut tr, None, false);
    let mut qs = Queues::new(
        &vrings,
        Dma::from_section(&section),
        park,
        crate::peer_write::Writer::unattached(),
        &crate::transport::Local,
    );
    let mut report = WalkReport::default();
    let Some(mut q) = qs.get(0) else {
        return report;
    };
    let mut chains = vec![Chain::new(); if in_bursts { 4 } else { 1 }];
    let bound = 4 * usize::from(size) + 4;
    let mut pops = 0;
    let check = |chain: &Chain| {
        assert!(!chain.descriptors().is_empty(), "a chain without buffers");
        let (r, w) = chain.descriptors().iter().fold((0u64, 0u64), |(r, w), d| {
            if d.writable {
                (r, w + u64::from(d.len))
            } else {
                (r + u64::from(d.len), w)
            }
        });
        assert_eq!((r, w), (chain.readable_len(), chain.writable_len()));
    };
    loop {
        pops += 1;
        assert!(
            pops <= bound,
            "more than {bound} pops from a ring of {size}"
        );
        if in_bursts {
            let b = q.pop_burst(&mut chains);
            for c in &chains[..b.popped] {
                check(c);
                let head = c.head();
                assert!(
                    q.add_used(head, 0).is_ok(),
                    "completing popped chain {head}"
                );
            }
            report.chains += b.popped;
            report.bad += b.bad;
            if b.error.is_some() {
                report.stopped = true;
                break;
            }
            if b.popped < chains.len() {
                break;
            }
            continue;
        }
        let chain = &mut chains[0];
        match q.pop(chain) {
            Ok(true) => {
                check(chain);
                let head = chain.head();
                assert!(
                    q.add_used(head, 0).is_ok(),
                    "completing popped chain {head}"
                );
                report.chains += 1;
            }
            Ok(false) => break,
            Err(crate::queue::QueueError::BadChain { .. }) => report.bad += 1,
            Err(_) => {
                report.stopped = true;
                break;
            }
        }
    }
    q.publish_used();
    drop(q);
    let v = vrings[0].1.lock().unwrap_or_else(|e| e.into_inner());
    if !report.stopped {
        let p = v.packed.as_ref().map(|p| (p.next_avail(), p.next_used()));
        if let Some((a, u)) = p {
            assert_eq!(a, u, "every consumed descriptor completed once");
        }
    }
    report
}
