//! vhost-user control plane with vhost's `Frontend`: negotiation, memory
//! table (IOVA = guest physical address), queue processing, config space,
//! memory regions added and removed, vring base, status.

mod vhost_common;

use std::sync::atomic::Ordering;

use ioasis::testing::Buf;
use ioasis::vhost_user::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vhost_common::*;

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;

#[test]
fn test_negotiation_offers_transport_and_device_features() {
    let dev = EchoDevice::new(2);
    let srv = TestServer::start(vec![("echo", dev)]);
    let (mut fe, _raw) = connect(&srv.socket("echo"), 2);
    fe.set_owner().expect("owner");
    let f = fe.get_features().expect("features");
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_F_ACCESS_PLATFORM,
        VIRTIO_RING_F_EVENT_IDX,
        VHOST_USER_F_PROTOCOL_FEATURES,
        1 << 5,
    ] {
        assert_ne!(f & bit, 0, "feature {bit:#x} offered");
    }
    fe.set_features(FEATURES).expect("set features");
    let p = fe.get_protocol_features().expect("protocol");
    fe.set_protocol_features(p).expect("set protocol");
    assert_eq!(fe.get_queue_num().expect("queue num"), 2);
    assert_eq!(fe.get_max_mem_slots().expect("slots"), 32);
}

#[test]
fn test_echo_through_memory_table_with_event_idx() {
    let dev = EchoDevice::new(1);
    let counters = dev.counters.clone();
    let srv = TestServer::start(vec![("echo", dev)]);
    let (mut fe, _raw) = connect(&srv.socket("echo"), 1);
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES | VIRTIO_RING_F_EVENT_IDX);
    // Without ACCESS_PLATFORM the device sees guest physical addresses and
    // the frontend gives ring addresses as its own virtual addresses.
    let mut q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
    guest.mem.write_at(BUF_OFF, b"ping").expect("write");
    let buf = guest.gpa + BUF_OFF as u64;
    for i in 0..3u16 {
        q.ring
            .add_chain(&[
                Buf {
                    addr: buf,
                    len: 4,
                    writable: false,
                },
                Buf {
                    addr: buf + 0x1000 + u64::from(i) * 0x100,
                    len: 64,
                    writable: true,
                },
            ])
            .expect("chain");
    }
    q.ring.publish().expect("publish");
    q.kick.write(1).expect("kick");
    wait_used(&q, 3);
    for i in 0..3u16 {
        assert_eq!(q.ring.used_elem(i).expect("elem").1, 4);
        let mut out = [0u8; 4];
        guest
            .mem
            .read_at(BUF_OFF + 0x1000 + usize::from(i) * 0x100, &mut out)
            .expect("read");
        assert_eq!(&out, b"ping");
    }
    assert_eq!(counters.chains.load(Ordering::SeqCst), 3);
    assert_eq!(fe.get_vring_base(0).expect("base"), 3);
}

#[test]
fn test_config_space_read_and_write() {
    let dev = EchoDevice::new(1);
    let srv = TestServer::start(vec![("echo", dev)]);
    let (mut fe, _raw) = connect(&srv.socket("echo"), 1);
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES);
    let (_, data) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .expect("get config");
    assert_eq!(&data, b"ioasis01");
    fe.set_config(4, VhostUserConfigFlags::WRITABLE, b"XY")
        .expect("set config");
    let (_, data) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .expect("get config");
    assert_eq!(&data, b"ioasXY01");
    // Past the device's config space: refused, connection kept.
    assert!(fe
        .set_config(6, VhostUserConfigFlags::WRITABLE, b"abcd")
        .is_err());
    assert_eq!(fe.get_queue_num().expect("still connected"), 1);
}

#[test]
fn test_added_memory_region_serves_buffers_and_removal_unmaps() {
    let dev = EchoDevice::new(1);
    let srv = TestServer::start(vec![("echo", dev)]);
    let (mut fe, _raw) = connect(&srv.socket("echo"), 1);
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES);
    let mut q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
    // A second region, added with ADD_MEM_REG, holds the buffers.
    let extra = iommu_core::Memory::anonymous("extra", 0x10000).expect("extra");
    let extra_gpa = 0x8000_0000u64;
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: extra_gpa,
        memory_size: 0x10000,
        userspace_addr: extra.as_ptr() as u64,
        mmap_offset: 0,
        mmap_handle: std::os::fd::AsRawFd::as_raw_fd(&extra.fd().expect("fd")),
    };
    fe.add_mem_region(&region).expect("add region");
    extra.write_at(0, b"far").expect("write");
    q.ring
        .add_chain(&[
            Buf {
                addr: extra_gpa,
                len: 3,
                writable: false,
            },
            Buf {
                addr: extra_gpa + 0x100,
                len: 16,
                writable: true,
            },
        ])
        .expect("chain");
    q.ring.publish().expect("publish");
    q.kick.write(1).expect("kick");
    wait_used(&q, 1);
    let mut out = [0u8; 3];
    extra.read_at(0x100, &mut out).expect("read");
    assert_eq!(&out, b"far");
    fe.remove_mem_region(&region).expect("remove region");
    // Removing it again names no region: refused with a NACK.
    assert!(fe.remove_mem_region(&region).is_err());
    // Overlapping an existing region: refused, connection kept.
    let overlap = VhostUserMemoryRegionInfo {
        guest_phys_addr: guest.gpa + 0x1000,
        ..region
    };
    assert!(fe.add_mem_region(&overlap).is_err());
    assert_eq!(fe.get_queue_num().expect("still connected"), 1);
}

#[test]
fn test_identical_memory_region_added_twice_is_shared() {
    let dev = EchoDevice::new(1);
    let srv = TestServer::start(vec![("echo", dev)]);
    let (mut fe, _raw) = connect(&srv.socket("echo"), 1);
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES);
    let mut q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
    let extra = iommu_core::Memory::anonymous("extra", 0x10000).expect("extra");
    let extra_gpa = 0x8000_0000u64;
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: extra_gpa,
        memory_size: 0x10000,
        userspace_addr: extra.as_ptr() as u64,
        mmap_offset: 0,
        mmap_handle: std::os::fd::AsRawFd::as_raw_fd(&extra.fd().expect("fd")),
    };
    // QEMU with several queue pairs sends every region once per pair.
    fe.add_mem_region(&region).expect("add region");
    fe.add_mem_region(&region).expect("the same region again");
    // A different region overlapping it is still refused.
    let overlap = VhostUserMemoryRegionInfo {
        guest_phys_addr: extra_gpa + 0x8000,
        ..region
    };
    assert!(fe.add_mem_region(&overlap).is_err());
    // One removal leaves it mapped for the other user.
    fe.remove_mem_region(&region).expect("first removal");
    extra.write_at(0, b"far").expect("write");
    q.ring
        .add_chain(&[
            Buf {
                addr: extra_gpa,
                len: 3,
                writable: false,
            },
            Buf {
                addr: extra_gpa + 0x100,
                len: 16,
                writable: true,
            },
        ])
        .expect("chain");
    q.ring.publish().expect("publish");
    q.kick.write(1).expect("kick");
    wait_used(&q, 1);
    let mut out = [0u8; 3];
    extra.read_at(0x100, &mut out).expect("read");
    assert_eq!(&out, b"far", "still mapped after one of two removals");
    fe.remove_mem_region(&region).expect("last removal");
    assert!(
        fe.remove_mem_region(&region).is_err(),
        "gone after the last"
    );
    assert_eq!(fe.get_queue_num().expect("still connected"), 1);
}

#[test]
fn test_status_and_reset_device() {
    let dev = EchoDevice::new(1);
    let counters = dev.counters.clone();
    let srv = TestServer::start(vec![("echo", dev)]);
    let (mut fe, raw) = connect(&srv.socket("echo"), 1);
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES);
    // SET_STATUS / GET_STATUS (raw: the vhost frontend has no status calls).
    send_raw(&raw, 39, 1, &0x0fu64.to_ne_bytes(), &[]);
    send_raw(&raw, 40, 1, &[], &[]);
    let (hdr, p) = recv_raw(&raw).expect("status reply");
    assert_eq!(hdr.request, 40);
    assert_eq!(p, 0x0fu64.to_ne_bytes());
    let before = counters.resets.load(Ordering::SeqCst);
    fe.reset_device().expect("reset device");
    assert_eq!(fe.get_queue_num().expect("still connected"), 1);
    assert_eq!(counters.resets.load(Ordering::SeqCst), before + 1);
}

#[test]
fn test_two_queues_on_separate_threads() {
    struct TwoThreads(std::sync::Arc<EchoDevice>);
    impl ioasis::device::Device for TwoThreads {
        fn device_type(&self) -> u32 {
            self.0.device_type()
        }
        fn features(&self) -> u64 {
            self.0.features()
        }
        fn num_queues(&self) -> usize {
            2
        }
        fn max_queue_size(&self) -> u16 {
            256
        }
        fn worker(
            &self,
            thread: usize,
        ) -> Result<Box<dyn ioasis::device::Worker>, ioasis::device::DeviceError> {
            self.0.worker(thread)
        }
        fn queues_per_thread(&self) -> Vec<u64> {
            vec![0b01, 0b10]
        }
    }
    let inner = EchoDevice::new(2);
    let counters = inner.counters.clone();
    let srv = TestServer::start(vec![("two", std::sync::Arc::new(TwoThreads(inner)))]);
    let (mut fe, _raw) = connect(&srv.socket("two"), 2);
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES);
    let mut qs = Vec::new();
    for i in 0..2usize {
        let off = RING_OFF + i * 0x4000;
        qs.push(setup_queue(
            &mut fe,
            &guest,
            i,
            off,
            guest.gpa + off as u64,
            guest.va(off),
        ));
    }
    for (i, q) in qs.iter_mut().enumerate() {
        let b = guest.gpa + BUF_OFF as u64 + i as u64 * 0x1000;
        q.ring
            .add_chain(&[Buf {
                addr: b,
                len: 8,
                writable: true,
            }])
            .expect("chain");
        q.ring.publish().expect("publish");
        q.kick.write(1).expect("kick");
    }
    for q in &qs {
        wait_used(q, 1);
    }
    assert_eq!(
        counters.workers.load(Ordering::SeqCst),
        2,
        "one worker per thread"
    );
}

#[test]
fn test_bad_chain_signals_error_fd_and_needs_reset() {
    let dev = EchoDevice::new(1);
    let srv = TestServer::start(vec![("echo", dev)]);
    let (mut fe, raw) = connect(&srv.socket("echo"), 1);
    let guest = Guest::new();
    handshake(&mut fe, &guest, FEATURES);
    let err = vmm_sys_util::eventfd::EventFd::new(0).expect("err fd");
    fe.set_vring_err(0, &err).expect("set_vring_err");
    let mut q = setup_queue(&mut fe, &guest, 0, RING_OFF, guest.gpa, guest.va(0));
    // A descriptor loop: 0 -> 1 -> 0.
    let b = guest.gpa + BUF_OFF as u64;
    q.ring
        .write_desc(0, b, 8, ioasis::testing::VRING_DESC_F_NEXT, 1)
        .expect("d0");
    q.ring
        .write_desc(1, b, 8, ioasis::testing::VRING_DESC_F_NEXT, 0)
        .expect("d1");
    q.ring.push_avail(0).expect("avail");
    q.ring.publish().expect("publish");
    q.kick.write(1).expect("kick");
    assert!(
        wait_readable(std::os::fd::AsRawFd::as_raw_fd(&err), WAIT),
        "error eventfd signalled"
    );
    // The bad chain was completed (length 0), not leaked.
    assert_eq!(q.ring.used_idx().expect("used"), 1);
    assert_eq!(q.ring.used_elem(0).expect("elem"), (0, 0));
    send_raw(&raw, 40, 1, &[], &[]);
    let (_, p) = recv_raw(&raw).expect("status");
    assert_ne!(p[0] & 0x40, 0, "VIRTIO_CONFIG_S_NEEDS_RESET reported");
    // A reset brings the device back.
    fe.reset_device().expect("reset");
    assert_eq!(fe.get_queue_num().expect("still connected"), 1);
}
