//! The queue tests' fixture: a device bound to an IOAS, a 16-entry ring
//! driven by [`DriverRing`] and the buffers its chains point at.

use std::sync::{Arc, Mutex};

use iommu_core::{HwInfo, Iommu, Memory, Perm};
use virtio_queue::QueueT;

use super::*;
use crate::dma::Section;
use crate::testing::{Buf, DriverRing};

pub(super) const RING_IOVA: u64 = 0x10_0000;
pub(super) const BUF_IOVA: u64 = 0x20_0000;

pub(super) struct Fixture {
    pub(super) iommu: Iommu,
    pub(super) ioas: u32,
    pub(super) core: iommu_core::IommuDevice,
    pub(super) ring_mem: Arc<Memory>,
    pub(super) buf_mem: Arc<Memory>,
    pub(super) vrings: Vec<(u16, Arc<Mutex<Vring>>)>,
    pub(super) driver: DriverRing,
    pub(super) park_on_miss: bool,
}

pub(super) fn fixture(map_bufs: bool) -> Fixture {
    let iommu = Iommu::new();
    let core = iommu_core::IommuDevice::new("q", HwInfo::default());
    let dev_id = iommu.bind(&core).expect("bind");
    let ioas = iommu.ioas_alloc().expect("ioas");
    iommu.attach(dev_id, None, ioas).expect("attach");
    let ring_mem = Memory::anonymous("ring", 0x4000).expect("ring mem");
    let buf_mem = Memory::anonymous("buf", 0x4000).expect("buf mem");
    iommu
        .ioas_map(ioas, &ring_mem, 0, 0x4000, Some(RING_IOVA), Perm::RW)
        .expect("map ring");
    if map_bufs {
        iommu
            .ioas_map(ioas, &buf_mem, 0, 0x4000, Some(BUF_IOVA), Perm::RW)
            .expect("map bufs");
    }
    let driver = DriverRing::new(ring_mem.clone(), 0, RING_IOVA, 16).expect("ring");
    let mut v = Vring::new(16).expect("vring");
    v.q.set_size(16);
    v.q.try_set_desc_table_address(vm_memory::GuestAddress(driver.desc_addr()))
        .expect("desc");
    v.q.try_set_avail_ring_address(vm_memory::GuestAddress(driver.avail_addr()))
        .expect("avail");
    v.q.try_set_used_ring_address(vm_memory::GuestAddress(driver.used_addr()))
        .expect("used");
    v.q.set_ready(true);
    v.started = true;
    v.enabled = true;
    Fixture {
        iommu,
        ioas,
        core,
        ring_mem,
        buf_mem,
        vrings: vec![(0, Arc::new(Mutex::new(v)))],
        driver,
        park_on_miss: true,
    }
}

/// Runs `body` with the fixture's queues in one access section.
pub(super) fn with_queues<R>(f: &Fixture, body: impl FnOnce(&mut Queues<'_>) -> R) -> R {
    let mut tr = f.core.translator();
    let section = Section::new(&mut tr, None, false);
    let mut qs = Queues::new(
        &f.vrings,
        Dma::from_section(&section),
        f.park_on_miss,
        Writer::unattached(),
        &crate::transport::Local,
    );
    body(&mut qs)
}

pub(super) fn with_queue<R>(f: &Fixture, body: impl FnOnce(Option<Queue<'_>>) -> R) -> R {
    with_queues(f, |qs| body(qs.get(0)))
}

/// Gives queue 0 a call eventfd (the driver's signals land there).
pub(super) fn set_call(f: &Fixture) -> vmm_sys_util::eventfd::EventFd {
    let call = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    f.vrings[0].1.lock().expect("lock").signals.call = Some(call.try_clone().expect("clone"));
    call
}

/// Makes `n` one-buffer chains of 16 bytes at `BUF_IOVA` available.
pub(super) fn offer(f: &mut Fixture, n: usize, writable: bool) {
    for _ in 0..n {
        f.driver
            .add_chain(&[Buf {
                addr: BUF_IOVA,
                len: 16,
                writable,
            }])
            .expect("chain");
    }
    f.driver.publish().expect("publish");
}
