//! Test support: the driver side of a split virtqueue (behind the
//! `test-utils` feature: tests, benchmarks and examples enable it in their
//! dev-dependencies; no production build has it).
//!
//! [`DriverRing`] lays out a split ring (descriptor table, available ring,
//! used ring) in an iommu-core [`Memory`] and plays the driver: it adds
//! descriptor chains, publishes them, and reads back what the device put on
//! the used ring. Tests of devices and of the transport use it on a memfd
//! that is shared with the backend exactly as a frontend would share guest
//! memory.

use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use iommu_core::Memory;

mod packed;
pub use packed::{
    walk_arbitrary, PackedDriverRing, PackedRaw, WalkReport, PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_INDIRECT, PACKED_DESC_F_NEXT, PACKED_DESC_F_USED, PACKED_DESC_F_WRITE,
};

/// `VRING_DESC_F_NEXT`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`.
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// `VRING_USED_F_NO_NOTIFY`: the device asks the driver not to kick.
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// One buffer of a chain the driver adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Address of the buffer as the device sees it.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A split ring written by a test driver.
#[derive(Debug)]
pub struct DriverRing {
    mem: Arc<Memory>,
    off: usize,
    addr: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

/// Errors of the test driver (bad layout or a full ring).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriverError {
    /// The layout does not fit the memory.
    #[error("ring layout of {need} bytes at offset {off} does not fit {have} bytes")]
    TooSmall {
        /// Bytes needed.
        need: usize,
        /// Offset.
        off: usize,
        /// Memory size.
        have: usize,
    },
    /// Size not a power of two.
    #[error("queue size {0} is not a power of two")]
    BadSize(u16),
    /// More descriptors than the ring has.
    #[error("chain of {0} descriptors does not fit")]
    Full(usize),
    /// Memory access failed.
    #[error("memory access failed: {0}")]
    Memory(String),
}

impl DriverRing {
    /// Bytes a ring of `size` takes: descriptor table, then the available
    /// ring, then (4 KiB aligned) the used ring.
    pub fn layout_len(size: u16) -> usize {
        let s = usize::from(size);
        let used = Self::used_offset(size);
        used + 6 + 8 * s
    }

    fn avail_offset(size: u16) -> usize {
        16 * usize::from(size)
    }

    fn used_offset(size: u16) -> usize {
        let end = Self::avail_offset(size) + 6 + 2 * usize::from(size);
        end.div_ceil(4096) * 4096
    }

    /// A ring at byte `off` of `mem`, which the device sees at address `addr`.
    pub fn new(mem: Arc<Memory>, off: usize, addr: u64, size: u16) -> Result<Self, DriverError> {
        if size == 0 || !size.is_power_of_two() {
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
        Ok(DriverRing {
            mem,
            off,
            addr,
            size,
            next_desc: 0,
            avail_idx: 0,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Device address of the descriptor table.
    pub fn desc_addr(&self) -> u64 {
        self.addr
    }

    /// Device address of the available ring.
    pub fn avail_addr(&self) -> u64 {
        self.addr + Self::avail_offset(self.size) as u64
    }

    /// Device address of the used ring.
    pub fn used_addr(&self) -> u64 {
        self.addr + Self::used_offset(self.size) as u64
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

    /// Writes a raw descriptor at table slot `index`.
    pub fn write_desc(
        &self,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), DriverError> {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(16 * usize::from(index % self.size), &d)
    }

    /// Adds a chain of `bufs` (readable ones first) without publishing it;
    /// returns its head.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> Result<u16, DriverError> {
        if bufs.is_empty() || bufs.len() > usize::from(self.size) {
            return Err(DriverError::Full(bufs.len()));
        }
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            let next = idx.wrapping_add(1) % self.size;
            let mut flags = if b.writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(idx, b.addr, b.len, flags, next)?;
            self.next_desc = next;
        }
        self.push_avail(head)?;
        Ok(head)
    }

    /// Puts `head` on the available ring (not yet visible: see [`publish`](Self::publish)).
    pub fn push_avail(&mut self, head: u16) -> Result<(), DriverError> {
        let slot = usize::from(self.avail_idx % self.size);
        self.write(
            Self::avail_offset(self.size) + 4 + 2 * slot,
            &head.to_le_bytes(),
        )?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Makes every added chain visible to the device (writes the available index).
    pub fn publish(&self) -> Result<(), DriverError> {
        fence(Ordering::SeqCst);
        self.write(
            Self::avail_offset(self.size) + 2,
            &self.avail_idx.to_le_bytes(),
        )?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Writes `used_event` (EVENT_IDX): the driver wants a notification once
    /// the used index moves past `idx`.
    pub fn set_used_event(&self, idx: u16) -> Result<(), DriverError> {
        let off = Self::avail_offset(self.size) + 4 + 2 * usize::from(self.size);
        self.write(off, &idx.to_le_bytes())?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Overwrites the published available index (to craft bad drivers).
    pub fn set_avail_idx(&mut self, idx: u16) -> Result<(), DriverError> {
        self.avail_idx = idx;
        self.publish()
    }

    /// The device's used-ring flags (`VRING_USED_F_NO_NOTIFY` set: the
    /// device asks the driver not to kick).
    pub fn used_flags(&self) -> Result<u16, DriverError> {
        fence(Ordering::SeqCst);
        let mut b = [0u8; 2];
        self.read(Self::used_offset(self.size), &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// The available index published so far (chains made available).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The device's used index, read with one atomic 16-bit load: a byte
    /// copy tears while the device moves the index across a multiple of 256
    /// (low byte old, high byte new: the index jumps ahead by up to 256 and
    /// the driver reads stale used elements; seen with qemu-storage-daemon
    /// at queue depth 32).
    pub fn used_idx(&self) -> Result<u16, DriverError> {
        let off = self.off + Self::used_offset(self.size) + 2;
        let end = off.checked_add(2);
        if end.is_none_or(|e| e > self.mem.len()) || (self.mem.as_ptr() as usize + off) % 2 != 0 {
            return Err(DriverError::Memory(format!(
                "used index at offset {off} is out of bounds or unaligned"
            )));
        }
        // SAFETY: `off..off + 2` lies within the live mapping `mem` and is
        // 2-byte aligned (checked above); the device writes this u16
        // concurrently, which is what the atomic load is for.
        let idx = unsafe { &*(self.mem.as_ptr().add(off) as *const AtomicU16) };
        Ok(u16::from_le(idx.load(Ordering::Acquire)))
    }

    /// Used element `i` (modulo the size): `(head, length written)`.
    pub fn used_elem(&self, i: u16) -> Result<(u32, u32), DriverError> {
        let slot = usize::from(i % self.size);
        let mut b = [0u8; 8];
        self.read(Self::used_offset(self.size) + 4 + 8 * slot, &mut b)?;
        let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        Ok((id, len))
    }
}

/// Runs a device's [`Worker`](crate::device::Worker) against driver rings in
/// one memory, without sockets: the way to unit-test a device.
///
/// The memory is mapped at IOVA 0 of a private IOAS (so an offset in
/// [`memory`](Harness::memory) is the device address); queue `i`'s ring lives
/// at offset `i * RING_STRIDE` and buffers can go from
/// [`BUFFER_AREA`](Harness::BUFFER_AREA) on.
///
/// ```
/// # use ioasis::testing::{Buf, Harness};
/// # use ioasis::device::{Device, DeviceError, Queues, Worker};
/// # struct Zero;
/// # impl Device for Zero {
/// #     fn device_type(&self) -> u32 { 4 }
/// #     fn features(&self) -> u64 { 0 }
/// #     fn num_queues(&self) -> usize { 1 }
/// #     fn max_queue_size(&self) -> u16 { 64 }
/// #     fn worker(&self, _: usize) -> Result<Box<dyn Worker>, DeviceError> { Ok(Box::new(ZeroW)) }
/// # }
/// # struct ZeroW;
/// # impl Worker for ZeroW {
/// #     fn process_queue(&mut self, i: u16, qs: &mut Queues<'_>) -> Result<(), DeviceError> {
/// #         let Some(mut q) = qs.get(i) else { return Ok(()) };
/// #         let mut c = ioasis::queue::Chain::new();
/// #         while q.pop(&mut c)? { q.add_used(c.head(), 0)?; }
/// #         Ok(())
/// #     }
/// # }
/// let dev = Zero;
/// let mut h = Harness::new(&dev, 16).unwrap();
/// let mut worker = dev.worker(0).unwrap();
/// h.ring(0).add_chain(&[Buf { addr: Harness::BUFFER_AREA, len: 8, writable: true }]).unwrap();
/// h.ring(0).publish().unwrap();
/// h.process(&mut *worker, 0).unwrap();
/// assert_eq!(h.ring(0).used_idx().unwrap(), 1);
/// ```
#[derive(Debug)]
pub struct Harness {
    iommu: iommu_core::Iommu,
    ioas: u32,
    _core: iommu_core::IommuDevice,
    /// The worker's translator, kept across calls (pins outlive them).
    translator: iommu_core::Translator,
    mem: Arc<Memory>,
    vrings: Vec<(u16, Arc<std::sync::Mutex<crate::queue::Vring>>)>,
    rings: Vec<DriverRing>,
    packed: Vec<PackedDriverRing>,
    park_on_miss: bool,
}

/// Errors setting up a [`Harness`].
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// iommu-core refused a step.
    #[error("iommu setup failed: {0}")]
    Iommu(#[from] iommu_core::Error),
    /// A ring could not be laid out.
    #[error("ring setup failed: {0}")]
    Ring(#[from] DriverError),
    /// The device description cannot be used.
    #[error("bad device: {0}")]
    Device(&'static str),
}

impl Harness {
    /// Distance between two queues' rings in the memory.
    pub const RING_STRIDE: u64 = 0x1_0000;
    /// Start of the area for buffers (after 16 rings).
    pub const BUFFER_AREA: u64 = 0x10_0000;
    /// Size of the memory.
    pub const MEMORY_SIZE: usize = 0x40_0000;

    /// Sets up every queue of `device` with `size` entries, started and
    /// enabled, on a fresh iommu context.
    pub fn new(device: &dyn crate::device::Device, size: u16) -> Result<Self, HarnessError> {
        Self::with_layout(device, size, false)
    }

    /// Like [`new`](Self::new) with packed rings (`VIRTIO_F_RING_PACKED`):
    /// the driver side of queue `i` is [`packed_ring`](Self::packed_ring).
    pub fn new_packed(device: &dyn crate::device::Device, size: u16) -> Result<Self, HarnessError> {
        Self::with_layout(device, size, true)
    }

    fn with_layout(
        device: &dyn crate::device::Device,
        size: u16,
        packed: bool,
    ) -> Result<Self, HarnessError> {
        use virtio_queue::QueueT;
        let n = device.num_queues();
        if n == 0 || n > 16 {
            return Err(HarnessError::Device("the harness supports 1..=16 queues"));
        }
        let iommu = iommu_core::Iommu::new();
        let core = iommu_core::IommuDevice::new("harness", iommu_core::HwInfo::default());
        let dev_id = iommu.bind(&core)?;
        let ioas = iommu.ioas_alloc()?;
        iommu.attach(dev_id, None, ioas)?;
        let mem = Memory::anonymous("harness", Self::MEMORY_SIZE)?;
        iommu.ioas_map(
            ioas,
            &mem,
            0,
            Self::MEMORY_SIZE as u64,
            Some(0),
            iommu_core::Perm::RW,
        )?;
        let mut vrings = Vec::with_capacity(n);
        let mut rings = Vec::with_capacity(n);
        let mut packed_rings = Vec::new();
        for i in 0..n {
            let addr = i as u64 * Self::RING_STRIDE;
            let mut v = crate::queue::Vring::new(device.max_queue_size())
                .ok_or(HarnessError::Device("bad max_queue_size"))?;
            v.q.try_set_size(size)
                .map_err(|_| HarnessError::Device("queue size above the device maximum"))?;
            let (desc, avail, used) = if packed {
                let ring = PackedDriverRing::new(mem.clone(), addr as usize, addr, size)?;
                let a = (ring.desc_addr(), ring.driver_addr(), ring.device_addr());
                packed_rings.push(ring);
                v.packed = Some(crate::queue::packed::PackedState::new());
                a
            } else {
                let ring = DriverRing::new(mem.clone(), addr as usize, addr, size)?;
                let a = (ring.desc_addr(), ring.avail_addr(), ring.used_addr());
                rings.push(ring);
                a
            };
            let bad = |_| HarnessError::Device("ring alignment");
            v.q.try_set_desc_table_address(vm_memory::GuestAddress(desc))
                .map_err(bad)?;
            v.q.try_set_avail_ring_address(vm_memory::GuestAddress(avail))
                .map_err(bad)?;
            v.q.try_set_used_ring_address(vm_memory::GuestAddress(used))
                .map_err(bad)?;
            v.q.set_ready(true);
            v.started = true;
            v.enabled = true;
            let index = u16::try_from(i).map_err(|_| HarnessError::Device("queue index"))?;
            vrings.push((index, Arc::new(std::sync::Mutex::new(v))));
        }
        let translator = core.translator();
        Ok(Harness {
            iommu,
            ioas,
            _core: core,
            translator,
            mem,
            vrings,
            rings,
            packed: packed_rings,
            park_on_miss: true,
        })
    }

    /// Chooses how a buffer address outside the mapped memory is treated.
    /// By default (`false`) the harness behaves like IOTLB translation
    /// (`ACCESS_PLATFORM`): a miss is resolvable, so the queue parks and the
    /// chain is offered again. With `true` it behaves like the frontend's
    /// memory table: the address is the driver's error, the framework
    /// completes the head with length 0 and the queue goes on.
    pub fn set_memory_table_mode(&mut self, on: bool) {
        self.park_on_miss = !on;
    }

    /// The memory (device address = offset).
    pub fn memory(&self) -> &Arc<Memory> {
        &self.mem
    }

    /// The iommu context and the IOAS the memory is mapped in (device
    /// address = IOVA), for tests that unmap under the device.
    pub fn address_space(&self) -> (&iommu_core::Iommu, u32) {
        (&self.iommu, self.ioas)
    }

    /// Access pins the worker's translator holds (deferred chains).
    pub fn pinned(&self) -> u64 {
        self.translator.pinned()
    }

    /// Whether an invalidation waits for the worker's pins (what the
    /// worker thread's nudge would report); a test then calls
    /// [`drain`](Self::drain).
    pub fn drain_requested(&self) -> bool {
        self.translator.drain_requested()
    }

    /// Calls `worker.drain()` inside one access section.
    pub fn drain(
        &mut self,
        worker: &mut dyn crate::device::Worker,
    ) -> Result<(), crate::device::DeviceError> {
        self.with_queues(|queues| worker.drain(queues))
    }

    /// The driver side of queue `index`.
    ///
    /// # Panics
    /// If `index` is not a queue of the device, or the harness has packed
    /// rings ([`new_packed`](Self::new_packed)).
    pub fn ring(&mut self, index: u16) -> &mut DriverRing {
        &mut self.rings[usize::from(index)]
    }

    /// The driver side of packed queue `index`.
    ///
    /// # Panics
    /// If `index` is not a queue of the device, or the harness has split
    /// rings ([`new`](Self::new)).
    pub fn packed_ring(&mut self, index: u16) -> &mut PackedDriverRing {
        &mut self.packed[usize::from(index)]
    }

    /// Runs `f` on the queues inside one access section, as a worker's
    /// method is run: the way to drive a device's queue code without a
    /// worker.
    pub fn with_queues<R>(&mut self, f: impl FnOnce(&mut crate::queue::Queues<'_>) -> R) -> R {
        let section = crate::dma::Section::new(&mut self.translator, None, true);
        let mut queues = crate::queue::Queues::new(
            &self.vrings,
            crate::dma::Dma::from_section(&section),
            self.park_on_miss,
            crate::peer_write::Writer::unattached(),
            &crate::transport::Local,
        );
        f(&mut queues)
    }

    /// Calls `worker.process_queue(index)` inside one access section.
    pub fn process(
        &mut self,
        worker: &mut dyn crate::device::Worker,
        index: u16,
    ) -> Result<(), crate::device::DeviceError> {
        self.with_queues(|queues| worker.process_queue(index, queues))
    }

    /// Calls `worker.handle_event(token)` inside one access section.
    pub fn handle_event(
        &mut self,
        worker: &mut dyn crate::device::Worker,
        token: u64,
    ) -> Result<(), crate::device::DeviceError> {
        self.with_queues(|queues| worker.handle_event(token, queues))
    }

    fn vring(&self, index: u16) -> Option<std::sync::MutexGuard<'_, crate::queue::Vring>> {
        let (_, v) = self.vrings.iter().find(|(i, _)| *i == index)?;
        Some(v.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Gives queue `index` a call eventfd, so that the device's signals to
    /// the driver can be counted with [`take_calls`](Self::take_calls)
    /// (without one, a signal writes nothing).
    pub fn watch_calls(&mut self, index: u16) -> std::io::Result<()> {
        let call = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
        if let Some(mut v) = self.vring(index) {
            v.signals.call = Some(call);
        }
        Ok(())
    }

    /// Signals queue `index` sent the driver since the last call (0 if it
    /// has no call eventfd: see [`watch_calls`](Self::watch_calls)).
    pub fn take_calls(&mut self, index: u16) -> u64 {
        self.vring(index)
            .and_then(|v| v.signals.call.as_ref().and_then(|c| c.read().ok()))
            .unwrap_or(0)
    }

    /// Whether queue `index` is parked on a translation miss (the device
    /// cannot serve it until the miss is resolved).
    pub fn parked(&self, index: u16) -> bool {
        self.vring(index).is_some_and(|v| v.parked.is_some())
    }

    /// Resolves queue `index`'s translation miss, as the frontend's IOTLB
    /// update that maps the address does: the queue serves again. (A test
    /// makes the address valid first, e.g. by rewriting the descriptor.)
    pub fn resolve_miss(&mut self, index: u16) {
        if let Some(mut v) = self.vring(index) {
            v.parked = None;
        }
    }
}
