//! Tests of the packed ring behind the [`Queue`] API, and the differential
//! property test: split and packed rings return the same chains for the
//! same requests and report the same completions.
//!
//! Checked once to fail: with the used position moved by one descriptor per
//! completion instead of the chain's count (`packed_put_used`), the
//! differential test, the plausible-ring walk test and five unit tests
//! fail (`cargo test -p ioasis --lib queue::packed`).

use std::sync::{Arc, Mutex};

use iommu_core::Perm;
use proptest::prelude::*;
use virtio_queue::QueueT;

use super::desc::{EVENT_F_DESC, EVENT_F_DISABLE, EVENT_F_ENABLE};
use super::PackedState;
use crate::dma::{Access, DmaError};
use crate::queue::fixture::*;
use crate::queue::{Chain, Queue, QueueError, Vring};
use crate::testing::{
    Buf, PackedDriverRing, PackedRaw, PACKED_DESC_F_INDIRECT, PACKED_DESC_F_NEXT,
    PACKED_DESC_F_WRITE,
};

/// Where the packed ring lives in the fixture's ring memory.
const PACKED_OFF: usize = 0x2000;
/// Where indirect tables go in the buffer memory.
const TABLE_OFF: usize = 0x3000;

/// The fixture with a second queue (index 1): a packed ring of 16.
struct Packed {
    f: Fixture,
    ring: PackedDriverRing,
}

fn packed(map_bufs: bool) -> Packed {
    let mut f = fixture(map_bufs);
    let ring = PackedDriverRing::new(
        f.ring_mem.clone(),
        PACKED_OFF,
        RING_IOVA + PACKED_OFF as u64,
        16,
    )
    .expect("ring");
    let mut v = Vring::new(16).expect("vring");
    v.q.set_size(16);
    v.q.try_set_desc_table_address(vm_memory::GuestAddress(ring.desc_addr()))
        .expect("desc");
    v.q.try_set_avail_ring_address(vm_memory::GuestAddress(ring.driver_addr()))
        .expect("driver area");
    v.q.try_set_used_ring_address(vm_memory::GuestAddress(ring.device_addr()))
        .expect("device area");
    v.q.set_ready(true);
    v.started = true;
    v.enabled = true;
    v.packed = Some(PackedState::new());
    f.vrings.push((1, Arc::new(Mutex::new(v))));
    Packed { f, ring }
}

impl Packed {
    fn with<R>(&self, body: impl FnOnce(Queue<'_>) -> R) -> R {
        with_queues(&self.f, |qs| body(qs.get(1).expect("packed queue serving")))
    }

    fn vring(&self) -> std::sync::MutexGuard<'_, Vring> {
        self.f.vrings[1].1.lock().expect("lock")
    }

    fn call(&self) -> vmm_sys_util::eventfd::EventFd {
        let call = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        self.vring().signals.call = Some(call.try_clone().expect("clone"));
        call
    }
}

fn buf(off: u64, len: u32, writable: bool) -> Buf {
    Buf {
        addr: BUF_IOVA + off,
        len,
        writable,
    }
}

#[test]
fn test_pop_read_write_complete() {
    let mut p = packed(true);
    p.f.buf_mem.write_at(0, b"hello").expect("write");
    let id = p
        .ring
        .add_chain(&[buf(0, 5, false), buf(0x1000, 16, true)])
        .expect("chain");
    let mut chain = Chain::new();
    p.with(|mut q| {
        assert!(q.pop(&mut chain).expect("pop"));
        assert_eq!(chain.head(), id);
        assert_eq!((chain.readable_len(), chain.writable_len()), (5, 16));
        let mut b = [0u8; 8];
        assert_eq!(q.read(&chain, 0, &mut b).expect("read"), 5);
        assert_eq!(&b[..5], b"hello");
        assert_eq!(q.write(&chain, 2, b"world").expect("write"), 5);
        assert!(!q.pop(&mut chain).expect("empty"));
        q.add_used(chain.head(), 7).expect("used");
    });
    assert_eq!(p.ring.take_used().expect("used"), Some((id, 7)));
    let mut out = [0u8; 7];
    p.f.buf_mem.read_at(0x1000, &mut out).expect("read");
    assert_eq!(&out[2..], b"world");
}

/// Chains of three descriptors over several laps of a 16-slot ring,
/// completed out of order: the wrap counters flip on both sides and the
/// driver gets every buffer back once.
#[test]
fn test_wrap_counters_over_laps_and_out_of_order_completion() {
    let mut p = packed(true);
    let mut chains = vec![Chain::new(); 5];
    for lap in 0..8u32 {
        let mut ids = Vec::new();
        for i in 0..5u64 {
            let b = [
                buf(i * 0x100, 8, false),
                buf(i * 0x100 + 8, 8, false),
                buf(0x2000 + i * 0x100, 32, true),
            ];
            ids.push(p.ring.add_chain(&b).expect("chain"));
        }
        p.with(|mut q| {
            assert_eq!(q.pop_batch(&mut chains).expect("burst"), 5);
            for (c, id) in chains.iter().zip(&ids) {
                assert_eq!(c.head(), *id);
                assert_eq!(c.descriptors().len(), 3);
            }
            // Backwards.
            for c in chains.iter().rev() {
                q.add_used(c.head(), lap).expect("used");
            }
            q.notify().expect("notify");
        });
        let mut got = Vec::new();
        while let Some((id, len)) = p.ring.take_used().expect("used") {
            assert_eq!(len, lap);
            got.push(id);
        }
        ids.reverse();
        assert_eq!(got, ids, "lap {lap}");
    }
    let v = p.vring();
    let s = v.packed.as_ref().expect("packed");
    // 8 laps of 15 descriptors: 120 = 7 * 16 + 8.
    assert_eq!((s.avail_idx, s.avail_wrap), (8, false));
    assert_eq!((s.used_idx, s.used_wrap), (8, false));
    assert_eq!(v.errors, 0);
}

#[test]
fn test_indirect_table() {
    let mut p = packed(true);
    let table = BUF_IOVA + TABLE_OFF as u64;
    let id = p
        .ring
        .add_indirect(
            &p.f.buf_mem,
            TABLE_OFF,
            table,
            &[buf(0, 4, false), buf(0x100, 4, false), buf(0x200, 64, true)],
        )
        .expect("indirect");
    let mut chain = Chain::new();
    p.with(|mut q| {
        assert!(q.pop(&mut chain).expect("pop"));
        assert_eq!(chain.head(), id);
        assert_eq!(
            chain.descriptors(),
            &[
                crate::queue::Desc {
                    addr: BUF_IOVA,
                    len: 4,
                    writable: false
                },
                crate::queue::Desc {
                    addr: BUF_IOVA + 0x100,
                    len: 4,
                    writable: false
                },
                crate::queue::Desc {
                    addr: BUF_IOVA + 0x200,
                    len: 64,
                    writable: true
                },
            ]
        );
        assert_eq!(q.write(&chain, 0, b"x").expect("write"), 1);
        q.add_used(chain.head(), 1).expect("used");
    });
    assert_eq!(p.ring.take_used().expect("used"), Some((id, 1)));
}

#[test]
fn test_wrong_wrap_counter_inside_a_chain_is_bad() {
    let mut p = packed(true);
    let bits = p.ring.avail_bits();
    // Slot 1 claims the previous lap: not part of this chain.
    p.ring
        .write_raw(
            1,
            PackedRaw {
                addr: BUF_IOVA,
                len: 8,
                id: 9,
                flags: bits ^ (super::desc::DESC_F_AVAIL | super::desc::DESC_F_USED),
            },
        )
        .expect("d1");
    p.ring
        .write_raw(
            0,
            PackedRaw {
                addr: BUF_IOVA,
                len: 8,
                id: 4,
                flags: bits | PACKED_DESC_F_NEXT,
            },
        )
        .expect("d0");
    p.ring.skip(2);
    p.ring.track(4, 2);
    bad_then_good_at(&mut p, 4);
}

/// The bad chain the driver made available is completed once with length
/// 0 under `bad_id`, counted, and the good chain behind it is served.
fn bad_then_good_at(p: &mut Packed, bad_id: u16) {
    let good = p.ring.add_chain(&[buf(0, 16, true)]).expect("good");
    let mut chain = Chain::new();
    p.with(|mut q| {
        assert!(matches!(
            q.pop(&mut chain),
            Err(QueueError::BadChain { head, .. }) if head == bad_id
        ));
        assert!(q.pop(&mut chain).expect("the next chain"));
        assert_eq!(chain.head(), good);
        q.add_used(good, 3).expect("used");
    });
    assert_eq!(
        p.ring.take_used().expect("used"),
        Some((bad_id, 0)),
        "bad chain completed with 0"
    );
    assert_eq!(p.ring.take_used().expect("used"), Some((good, 3)));
    assert_eq!(
        p.ring.take_used().expect("used"),
        None,
        "each completed once"
    );
    let v = p.vring();
    assert_eq!(v.errors, 1);
    assert!(!v.broken && v.parked.is_none(), "the queue goes on");
}

#[test]
fn test_chain_longer_than_the_ring_is_bad() {
    let mut p = packed(true);
    let bits = p.ring.avail_bits();
    for s in 0..16u16 {
        p.ring
            .write_raw(
                s,
                PackedRaw {
                    addr: BUF_IOVA,
                    len: 8,
                    id: 2,
                    flags: bits | PACKED_DESC_F_NEXT,
                },
            )
            .expect("desc");
    }
    p.ring.skip(16);
    let mut chain = Chain::new();
    p.with(|mut q| {
        assert!(matches!(
            q.pop(&mut chain),
            Err(QueueError::BadChain { head: 2, .. })
        ));
        assert!(!q.pop(&mut chain).expect("next lap empty"));
    });
    let v = p.vring();
    let s = v.packed.as_ref().expect("packed");
    assert_eq!((s.avail_idx, s.avail_wrap), (0, false), "one lap consumed");
    assert_eq!((s.used_idx, s.used_wrap), (0, false), "and completed");
    assert_eq!(v.errors, 1);
    assert!(!v.broken);
}

#[test]
fn test_bad_indirect_tables_and_ids_are_bad() {
    // Nested indirect, empty table, id outside the ring.
    for case in 0..3 {
        let mut p = packed(true);
        let bits = p.ring.avail_bits();
        let table = BUF_IOVA + TABLE_OFF as u64;
        let mut nested = [0u8; 16];
        nested[14..].copy_from_slice(&PACKED_DESC_F_INDIRECT.to_le_bytes());
        p.f.buf_mem.write_at(TABLE_OFF, &nested).expect("table");
        let (d, id) = match case {
            0 => (
                PackedRaw {
                    addr: table,
                    len: 16,
                    id: 5,
                    flags: bits | PACKED_DESC_F_INDIRECT,
                },
                5,
            ),
            1 => (
                PackedRaw {
                    addr: table,
                    len: 0,
                    id: 6,
                    flags: bits | PACKED_DESC_F_INDIRECT,
                },
                6,
            ),
            _ => (
                PackedRaw {
                    addr: BUF_IOVA,
                    len: 8,
                    id: 300,
                    flags: bits,
                },
                300,
            ),
        };
        p.ring.write_raw(0, d).expect("desc");
        p.ring.skip(1);
        bad_then_good_at(&mut p, id);
    }
}

#[test]
fn test_memory_table_miss_completes_the_chain_and_goes_on() {
    let mut p = packed(false);
    p.f.park_on_miss = false;
    p.f.iommu
        .ioas_map(p.f.ioas, &p.f.buf_mem, 0, 0x1000, Some(BUF_IOVA), Perm::RW)
        .expect("map");
    let bad = p.ring.add_chain(&[buf(0x8000, 16, true)]).expect("bad");
    bad_then_good_at(&mut p, bad);
}

#[test]
fn test_iotlb_miss_parks_and_keeps_the_chain() {
    let mut p = packed(false);
    let id = p.ring.add_chain(&[buf(0, 64, true)]).expect("chain");
    let mut chain = Chain::new();
    p.with(|mut q| {
        let e = q.pop(&mut chain).expect_err("miss");
        assert_eq!(
            e.dma_error().and_then(DmaError::miss_address),
            Some((BUF_IOVA, Access::Write))
        );
    });
    {
        let v = p.vring();
        assert!(v.parked.is_some());
        assert_eq!(
            v.packed.as_ref().map(|s| s.avail_idx),
            Some(0),
            "not consumed"
        );
    }
    p.f.iommu
        .ioas_map(p.f.ioas, &p.f.buf_mem, 0, 0x4000, Some(BUF_IOVA), Perm::RW)
        .expect("map");
    p.vring().parked = None;
    p.with(|mut q| {
        assert!(q.pop(&mut chain).expect("pop"));
        q.add_used(chain.head(), 0).expect("used");
    });
    assert_eq!(p.ring.take_used().expect("used"), Some((id, 0)));
}

#[test]
fn test_driver_event_suppression() {
    let mut p = packed(true);
    let call = p.call();
    let mut chain = Chain::new();
    let mut one = |p: &mut Packed| {
        p.ring.add_chain(&[buf(0, 8, true)]).expect("chain");
        p.with(|mut q| {
            assert!(q.pop(&mut chain).expect("pop"));
            q.add_used(chain.head(), 0).expect("used");
            q.notify().expect("notify");
        });
        while p.ring.take_used().expect("used").is_some() {}
        call.read().is_ok()
    };
    p.ring.set_driver_event(0, EVENT_F_DISABLE).expect("event");
    assert!(!one(&mut p), "disabled");
    p.ring.set_driver_event(0, EVENT_F_ENABLE).expect("event");
    assert!(one(&mut p), "enabled");
    // Descriptor events: negotiated EVENT_IDX; the driver wants to hear
    // when slot 4 of the first lap is used (used position passes 4).
    p.vring().q.set_event_idx(true);
    p.ring
        .set_driver_event(4 | 0x8000, EVENT_F_DESC)
        .expect("event");
    assert!(!one(&mut p), "used 3: before slot 4");
    assert!(!one(&mut p), "used 4: slot 4 not yet used");
    assert!(one(&mut p), "used 5: slot 4 used");
    assert!(!one(&mut p), "used 6: already told");
}

#[test]
fn test_device_event_suppression() {
    let mut p = packed(true);
    p.with(|mut q| {
        q.disable_notification().expect("disable");
    });
    assert_eq!(p.ring.device_event().expect("ev").1, EVENT_F_DISABLE);
    p.with(|mut q| assert!(!q.enable_notification().expect("enable")));
    assert_eq!(p.ring.device_event().expect("ev"), (0, EVENT_F_ENABLE));
    p.ring.add_chain(&[buf(0, 8, true)]).expect("chain");
    p.vring().q.set_event_idx(true);
    let mut chain = Chain::new();
    p.with(|mut q| {
        assert!(q.enable_notification().expect("enable"), "a chain is there");
        assert!(q.pop(&mut chain).expect("pop"));
        assert!(!q.enable_notification().expect("enable"));
        q.add_used(chain.head(), 0).expect("used");
    });
    // The next descriptor the driver writes is slot 1 of the first lap.
    assert_eq!(
        p.ring.device_event().expect("ev"),
        (1 | 0x8000, EVENT_F_DESC)
    );
}

#[test]
fn test_in_order_batch_is_one_used_descriptor() {
    let mut p = packed(true);
    p.vring().in_order = true;
    let ids: Vec<u16> = (0..5)
        .map(|i| {
            p.ring
                .add_chain(&[buf(i * 0x10, 8, false), buf(0x100, 8, false)])
                .expect("chain")
        })
        .collect();
    let mut chains = vec![Chain::new(); 8];
    p.with(|mut q| {
        let b = q.pop_burst(&mut chains);
        assert_eq!(b.popped, 5);
        let heads: Vec<u16> = chains[..5].iter().map(Chain::head).collect();
        q.add_used_batch(&heads).expect("batch");
        q.notify().expect("notify");
    });
    assert_eq!(p.ring.take_used().expect("used"), Some((ids[4], 0)));
    assert_eq!(
        p.ring.take_used().expect("used"),
        None,
        "one descriptor for the batch"
    );
    let v = p.vring();
    let s = v.packed.as_ref().expect("packed");
    assert_eq!(s.used_idx, 10, "past the batch's ten descriptors");
}

/// `add_used_lens` on a packed ring: one used descriptor per head with its
/// length, each past its chain's descriptors; a head outside the ring ends
/// the batch after the ones before it.
#[test]
fn test_add_used_lens_on_a_packed_ring() {
    let mut p = packed(true);
    let ids: Vec<u16> = (0..3)
        .map(|i| {
            p.ring
                .add_chain(&[buf(i * 0x10, 8, true), buf(0x100, 8, true)])
                .expect("chain")
        })
        .collect();
    let mut chains = vec![Chain::new(); 4];
    p.with(|mut q| {
        assert_eq!(q.pop_burst(&mut chains).popped, 3);
        let used: Vec<(u16, u32)> = chains[..2]
            .iter()
            .zip([5u32, 9])
            .map(|(c, l)| (c.head(), l))
            .collect();
        q.add_used_lens(&used).expect("lens");
        let r = q.add_used_lens(&[(chains[2].head(), 16), (999, 1)]);
        assert!(matches!(r, Err((1, QueueError::BadHead { head: 999, .. }))));
        q.notify().expect("notify");
    });
    assert_eq!(p.ring.take_used().expect("used"), Some((ids[0], 5)));
    assert_eq!(p.ring.take_used().expect("used"), Some((ids[1], 9)));
    assert_eq!(p.ring.take_used().expect("used"), Some((ids[2], 16)));
    assert_eq!(p.ring.take_used().expect("used"), None);
    let v = p.vring();
    let s = v.packed.as_ref().expect("packed");
    assert_eq!(s.used_idx, 6, "past the three chains' six descriptors");
}

/// A batch completion of a head that is not outstanding (a device
/// completing it twice) moves the used position by one descriptor, not by
/// its chain's: the count the pop recorded was taken by the first
/// completion (`write_used_ring`'s out-of-line case for a count outside 1
/// to the ring size).
#[test]
fn test_a_head_completed_twice_in_a_batch_moves_by_one() {
    let mut p = packed(true);
    for i in 0..2 {
        p.ring
            .add_chain(&[buf(i * 0x10, 8, true), buf(0x100, 8, true)])
            .expect("chain");
    }
    let mut chains = vec![Chain::new(); 2];
    p.with(|mut q| {
        assert_eq!(q.pop_burst(&mut chains).popped, 2);
        let (a, b) = (chains[0].head(), chains[1].head());
        q.add_used_lens(&[(a, 5), (b, 9), (b, 9)]).expect("lens");
    });
    let v = p.vring();
    let s = v.packed.as_ref().expect("packed");
    assert_eq!(s.used_idx, 5, "two chains of two, then one");
}

/// A batch of completions is seen by the driver whole and only when it is
/// published: batch completions (`add_used_lens`, `add_used_batch`) write
/// their used descriptors to the ring at once, a single one (`add_used`)
/// joins the batch after them, and the driver sees none of them until
/// `publish_used` writes the first one's flags, then all of them in order.
///
/// Checked once to fail: with the batch's first descriptor written whole
/// at once (`--cfg ioasis_broken="gatefirst"`, `write_used_ring`), the
/// driver sees it before the publication
/// (`cargo test -p ioasis --lib queue::packed::tests::test_a_batch_is_seen_whole`).
#[test]
fn test_a_batch_is_seen_whole_when_published() {
    let mut p = packed(true);
    let ids: Vec<u16> = (0..5)
        .map(|i| p.ring.add_chain(&[buf(i * 0x10, 8, true)]).expect("chain"))
        .collect();
    let mut chains = vec![Chain::new(); 5];
    let ring = &mut p.ring;
    with_queues(&p.f, |qs| {
        let mut q = qs.get(1).expect("packed queue serving");
        assert_eq!(q.pop_burst(&mut chains).popped, 5);
        q.add_used_lens(&[(chains[0].head(), 3), (chains[1].head(), 4)])
            .expect("lens");
        q.add_used_batch(&[chains[2].head()]).expect("batch");
        q.add_used(chains[3].head(), 6).expect("used");
        assert_eq!(ring.take_used().expect("used"), None, "not published yet");
        q.publish_used();
        q.add_used_batch(&[chains[4].head()]).expect("batch");
    });
    let want = [
        (ids[0], 3),
        (ids[1], 4),
        (ids[2], 0),
        (ids[3], 6),
        (ids[4], 0),
    ];
    for w in want {
        assert_eq!(p.ring.take_used().expect("used"), Some(w));
    }
    assert_eq!(p.ring.take_used().expect("used"), None);
    let v = p.vring();
    let s = v.packed.as_ref().expect("packed");
    assert_eq!((s.used_idx, s.gate, s.written), (5, None, 0));
}

#[test]
fn test_unpop_gives_back_the_last_chains() {
    let mut p = packed(true);
    for _ in 0..3 {
        p.ring
            .add_chain(&[buf(0, 8, false), buf(0x100, 8, true)])
            .expect("chain");
    }
    let mut chains = vec![Chain::new(); 3];
    p.with(|mut q| {
        assert_eq!(q.pop_batch(&mut chains).expect("burst"), 3);
        assert!(!q.unpop(4));
        assert!(q.unpop(2));
        assert!(!q.unpop(2));
        q.add_used(chains[0].head(), 0).expect("used");
    });
    p.with(|mut q| {
        assert_eq!(q.pop_batch(&mut chains).expect("burst"), 2);
        assert_eq!((chains[0].head(), chains[1].head()), (1, 2));
        for c in &chains[..2] {
            q.add_used(c.head(), 0).expect("used");
        }
    });
    let mut n = 0;
    while p.ring.take_used().expect("used").is_some() {
        n += 1;
    }
    assert_eq!(n, 3);
}

/// `unpop` over chains of one descriptor, popped by the burst's loop
/// without a record each, and over a chain of two popped after them: the
/// available position goes back over exactly their descriptors, and the
/// same chains are popped again.
///
/// Checked once to fail: without the one-descriptor entries written for
/// the chains before the first longer one
/// (`--cfg ioasis_broken="norecentfill"`, `packed_pop_in`), the position
/// goes back over the wrong count; the differential test
/// `prop_split_and_packed_pop_the_same_chains` fails too
/// (`cargo test -p ioasis --lib queue::packed`).
#[test]
fn test_unpop_over_one_and_two_descriptor_chains() {
    let mut p = packed(true);
    let shapes: [&[Buf]; 4] = [
        &[buf(0, 8, false)],
        &[buf(0x10, 8, false)],
        &[buf(0x20, 8, false), buf(0x100, 8, true)],
        &[buf(0x30, 8, false)],
    ];
    let ids: Vec<u16> = shapes
        .iter()
        .map(|c| p.ring.add_chain(c).expect("chain"))
        .collect();
    let mut chains = vec![Chain::new(); 4];
    p.with(|mut q| {
        assert_eq!(q.pop_burst(&mut chains[..2]).popped, 2);
        assert!(q.unpop(1), "one-descriptor chains alone");
        assert_eq!(q.pop_burst(&mut chains[1..]).popped, 3);
        assert!(q.unpop(4));
    });
    {
        let v = p.vring();
        let s = v.packed.as_ref().expect("packed");
        assert_eq!((s.avail_idx, s.avail_wrap), (0, true), "back at the start");
    }
    p.with(|mut q| {
        assert_eq!(q.pop_burst(&mut chains).popped, 4);
        let heads: Vec<u16> = chains.iter().map(Chain::head).collect();
        assert_eq!(heads, ids);
        let v = &q.vring;
        let s = v.packed.as_ref().expect("packed");
        assert_eq!(s.avail_idx, 5, "past the five descriptors");
    });
}

/// A base outside the ring (SET_VRING_BASE from a broken frontend) fails
/// the queue with an error when it is first served, never an access
/// outside the ring.
#[test]
fn test_base_outside_the_ring_fails_the_queue() {
    let p = packed(true);
    p.vring()
        .packed
        .as_mut()
        .expect("packed")
        .set_base(20 | 1 << 15);
    with_queues(&p.f, |qs| {
        assert!(matches!(qs.lookup(1), crate::queue::Lookup::Stopped));
    });
    assert!(p.vring().broken);
}

#[test]
fn test_rings_reached_through_the_dma_handle_when_not_contiguous() {
    // A ring whose translation is not kept (as when its pages are not
    // host-contiguous) is served field by field through the DMA handle.
    let mut p = packed(true);
    let id = p.ring.add_chain(&[buf(0, 8, true)]).expect("chain");
    let mut chain = Chain::new();
    with_queues(&p.f, |qs| {
        let mut q = qs.get(1).expect("serving");
        q.rings = None;
        assert!(q.pop(&mut chain).expect("pop"));
        q.add_used(chain.head(), 2).expect("used");
        q.notify().expect("notify");
        q.disable_notification().expect("disable");
    });
    assert_eq!(p.ring.take_used().expect("used"), Some((id, 2)));
    assert_eq!(p.ring.device_event().expect("ev").1, EVENT_F_DISABLE);
}

#[test]
fn test_completion_is_dirty_logged() {
    use crate::dirty_log::{DirtyLog, LoggedRegion, LOG_PAGE};
    let mut p = packed(true);
    let bitmap = iommu_core::Memory::anonymous("log", 0x1000).expect("log");
    let log = Arc::new(DirtyLog::new(
        bitmap.clone(),
        vec![
            LoggedRegion {
                mem: p.f.ring_mem.clone(),
                gpa: 0x10_0000,
            },
            LoggedRegion {
                mem: p.f.buf_mem.clone(),
                gpa: 0x40_0000,
            },
        ],
    ));
    p.vring().log = Some(log);
    let id = p
        .ring
        .add_chain(&[buf(0, 8, false), buf(0x3000, 0x100, true)])
        .expect("chain");
    let mut chain = Chain::new();
    p.with(|mut q| {
        assert!(q.pop(&mut chain).expect("pop"));
        q.add_used(chain.head(), 0x10).expect("used");
    });
    assert_eq!(p.ring.take_used().expect("used"), Some((id, 0x10)));
    let mut b = vec![0u8; bitmap.len()];
    bitmap.read_at(0, &mut b).expect("read");
    let bit = |gpa: u64| b[(gpa / LOG_PAGE / 8) as usize] & (1 << ((gpa / LOG_PAGE) % 8)) != 0;
    assert!(bit(0x40_3000), "the written buffer's page");
    assert!(!bit(0x40_0000), "not the readable one");
    assert!(bit(0x10_0000 + PACKED_OFF as u64), "the descriptor ring");
}

/// One request of the differential test: a chain's buffers (length,
/// device-writable), readable ones first, and whether it goes through an
/// indirect table.
#[derive(Clone, Debug)]
struct Req {
    bufs: Vec<(u32, bool)>,
    indirect: bool,
}

fn req() -> impl Strategy<Value = Req> {
    (
        0usize..3,
        0usize..3,
        any::<bool>(),
        proptest::collection::vec(1u32..300, 4),
    )
        .prop_filter("at least one buffer", |(r, w, _, _)| r + w > 0)
        .prop_map(|(r, w, indirect, lens)| Req {
            bufs: (0..r + w).map(|i| (lens[i], i >= r)).collect(),
            indirect,
        })
}

/// Buffers of request `k` of a batch, at distinct addresses.
fn bufs_of(k: usize, r: &Req) -> Vec<Buf> {
    r.bufs
        .iter()
        .enumerate()
        .map(|(i, &(len, writable))| buf((k * 4 + i) as u64 * 0x100 % 0x2800, len, writable))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The split and the packed ring, given the same requests (batches of
    /// up to five, over several laps, popped one by one or in bursts, the
    /// last up to two given back with `unpop` and popped again), pop the
    /// same chains (descriptors, lengths, bytes read) and give the driver
    /// the same completions (one by one, as one `add_used_lens` batch,
    /// half and half, or as one `add_used_batch`), in the order the device
    /// made them.
    #[test]
    fn prop_split_and_packed_pop_the_same_chains(
        batches in proptest::collection::vec(
            (proptest::collection::vec(req(), 1..5), any::<u64>()), 1..12),
    ) {
        let mut p = packed(true);
        let mut split_chains = vec![Chain::new(); 5];
        let mut packed_chains = vec![Chain::new(); 5];
        let table = |k: usize| TABLE_OFF + k * 0x100;
        let pattern: Vec<u8> = (0..0x3000u32).map(|i| (i * 7 + 3) as u8).collect();
        p.f.buf_mem.write_at(0, &pattern).expect("pattern");
        for (reqs, order) in &batches {
            let mut split_ids = Vec::new();
            let mut packed_ids = Vec::new();
            for (k, r) in reqs.iter().enumerate() {
                let b = bufs_of(k, r);
                if r.indirect {
                    // Split: one descriptor pointing at a table.
                    let t = table(k);
                    for (i, x) in b.iter().enumerate() {
                        let mut flags = if x.writable { crate::testing::VRING_DESC_F_WRITE } else { 0 };
                        if i + 1 < b.len() {
                            flags |= crate::testing::VRING_DESC_F_NEXT;
                        }
                        let mut d = [0u8; 16];
                        d[0..8].copy_from_slice(&x.addr.to_le_bytes());
                        d[8..12].copy_from_slice(&x.len.to_le_bytes());
                        d[12..14].copy_from_slice(&flags.to_le_bytes());
                        d[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
                        p.f.buf_mem.write_at(t + 16 * i, &d).expect("table");
                    }
                    let head = p.f.driver.add_chain(&[buf(0, 1, false)]).expect("split");
                    p.f.driver
                        .write_desc(head, BUF_IOVA + t as u64, 16 * b.len() as u32,
                                    crate::testing::VRING_DESC_F_INDIRECT, 0)
                        .expect("indirect");
                    split_ids.push(head);
                    // Packed: its own table (same buffers) further on.
                    let pt = t + 0x800;
                    packed_ids.push(
                        p.ring
                            .add_indirect(&p.f.buf_mem, pt, BUF_IOVA + pt as u64, &b)
                            .expect("packed"),
                    );
                } else {
                    split_ids.push(p.f.driver.add_chain(&b).expect("split"));
                    packed_ids.push(p.ring.add_chain(&b).expect("packed"));
                }
            }
            p.f.driver.publish().expect("publish");
            let n = reqs.len();
            let mut done = Vec::new();
            with_queues(&p.f, |qs| {
                let mut sq = qs.get(0).expect("split");
                let mut pq = qs.get(1).expect("packed");
                if order % 2 == 0 {
                    prop_assert_eq!(sq.pop_batch(&mut split_chains).expect("split pop"), n);
                    prop_assert_eq!(pq.pop_batch(&mut packed_chains).expect("packed pop"), n);
                } else {
                    // In bursts (the packed ring's own burst loop).
                    let b = sq.pop_burst(&mut split_chains[..n]);
                    prop_assert_eq!((b.popped, b.bad, b.error.is_none()), (n, 0, true));
                    let b = pq.pop_burst(&mut packed_chains[..n]);
                    prop_assert_eq!((b.popped, b.bad, b.error.is_none()), (n, 0, true));
                }
                // The last `m` given back and popped again.
                let m = ((order >> 16) % 3).min(n as u64) as usize;
                if m > 0 {
                    prop_assert!(sq.unpop(m as u16));
                    prop_assert!(pq.unpop(m as u16));
                    prop_assert_eq!(sq.pop_batch(&mut split_chains[n - m..n]).expect("split pop"), m);
                    prop_assert_eq!(pq.pop_batch(&mut packed_chains[n - m..n]).expect("packed pop"), m);
                }
                for k in 0..n {
                    let (s, c) = (&split_chains[k], &packed_chains[k]);
                    prop_assert_eq!(s.head(), split_ids[k]);
                    prop_assert_eq!(c.head(), packed_ids[k]);
                    prop_assert_eq!(s.descriptors(), c.descriptors());
                    prop_assert_eq!(s.readable_len(), c.readable_len());
                    prop_assert_eq!(s.writable_len(), c.writable_len());
                    let (mut a, mut b) = ([0u8; 600], [0u8; 600]);
                    prop_assert_eq!(sq.read(s, 1, &mut a).expect("read"), pq.read(c, 1, &mut b).expect("read"));
                    prop_assert_eq!(&a[..], &b[..]);
                }
                // The same completion order on both, from `order`.
                let mut ks: Vec<usize> = (0..n).collect();
                let mut o = *order;
                for i in (1..n).rev() {
                    ks.swap(i, (o % (i as u64 + 1)) as usize);
                    o /= i as u64 + 1;
                }
                let mode = (order >> 8) % 4;
                let len_of = |k: usize| if mode == 3 { 0 } else { (k as u32 + 1) * 3 };
                let used = |chains: &[Chain], ks: &[usize]| -> Vec<(u16, u32)> {
                    ks.iter().map(|&k| (chains[k].head(), len_of(k))).collect()
                };
                // How many complete as one batch (the rest one by one).
                let batch = match mode {
                    0 => 0,
                    2 => n / 2,
                    _ => n,
                };
                let (first, rest) = ks.split_at(batch);
                if mode == 3 {
                    let heads = |chains: &[Chain]| -> Vec<u16> { first.iter().map(|&k| chains[k].head()).collect() };
                    sq.add_used_batch(&heads(&split_chains)).expect("split batch");
                    pq.add_used_batch(&heads(&packed_chains)).expect("packed batch");
                } else {
                    sq.add_used_lens(&used(&split_chains, first)).expect("split lens");
                    pq.add_used_lens(&used(&packed_chains, first)).expect("packed lens");
                }
                for &k in rest {
                    sq.add_used(split_chains[k].head(), len_of(k)).expect("split used");
                    pq.add_used(packed_chains[k].head(), len_of(k)).expect("packed used");
                }
                done.extend_from_slice(&ks);
                sq.notify().expect("notify");
                pq.notify().expect("notify");
                Ok(())
            })?;
            // The driver sees the completions in the same order with the
            // same lengths on both rings.
            let base = p.f.driver.used_idx().expect("idx").wrapping_sub(n as u16);
            for (i, &k) in done.iter().enumerate() {
                let (sid, slen) = p.f.driver.used_elem(base.wrapping_add(i as u16)).expect("elem");
                let (pid, plen) = p.ring.take_used().expect("used").expect("a completion");
                prop_assert_eq!(sid, u32::from(split_ids[k]));
                prop_assert_eq!(pid, packed_ids[k]);
                prop_assert_eq!(slen, plen);
            }
            prop_assert_eq!(p.ring.take_used().expect("used"), None);
        }
        prop_assert_eq!(p.vring().errors, 0);
    }

    /// The packed walk on arbitrary ring bytes (the `packed_walk` fuzz
    /// target's function): no panic, bounded, and every consumed
    /// descriptor completed once.
    #[test]
    fn prop_packed_walk_on_arbitrary_rings(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = crate::testing::walk_arbitrary(&data);
    }

    /// The same with well-formed-looking descriptors (available flags in
    /// the right lap, small lengths, chains and indirect tables), which
    /// random bytes rarely produce.
    #[test]
    fn prop_packed_walk_on_plausible_rings(
        start in any::<u8>(),
        size_sel in 0u8..4,
        park in any::<bool>(),
        descs in proptest::collection::vec((0u64..0x1_2000, 0u32..0x400, 0u16..20, 0u16..8, any::<bool>()), 16),
        table in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let size = 2u16 << size_sel;
        let wrap = start & 0x80 != 0;
        let mut data = vec![size_sel | if park { 4 } else { 0 }, start];
        for (i, &(addr, len, id, fl, lap)) in descs.iter().take(usize::from(size)).enumerate() {
            let s = (usize::from(start) % usize::from(size)) as u16;
            let w = if (i as u16) < s { !wrap } else { wrap };
            let w = if lap { w } else { !w };
            let mut flags = fl & (PACKED_DESC_F_NEXT | PACKED_DESC_F_WRITE | PACKED_DESC_F_INDIRECT);
            flags |= if w { super::desc::DESC_F_AVAIL } else { super::desc::DESC_F_USED };
            let addr = if flags & PACKED_DESC_F_INDIRECT != 0 { 0x8000 + addr % 0x100 } else { addr };
            data.extend_from_slice(&addr.to_le_bytes());
            data.extend_from_slice(&len.to_le_bytes());
            data.extend_from_slice(&id.to_le_bytes());
            data.extend_from_slice(&flags.to_le_bytes());
        }
        data.extend_from_slice(&table);
        let _ = crate::testing::walk_arbitrary(&data);
    }
}

#[test]
fn test_packed_walk_fuzz_entry_survives_edge_inputs() {
    for data in [
        &[][..],
        &[0u8],
        &[7u8, 0xff],
        &[0x83u8; 300][..],
        &[0xffu8; 600][..],
    ] {
        let _ = crate::testing::walk_arbitrary(data);
    }
}
