//! Property tests of vhost-user message decoding (the same decoder the fuzz
//! target drives): nothing panics, and what is accepted is exactly what the
//! protocol and the device limits allow.

use std::fs::File;

use ioasis::vhost_user::msg::{
    decode, Header, IotlbRequest, Limits, MsgError, Request, FLAG_NEED_REPLY, VERSION_1,
    VHOST_IOTLB_INVALIDATE, VHOST_IOTLB_UPDATE,
};
use proptest::prelude::*;

const LIMITS: Limits = Limits {
    num_queues: 4,
    max_queue_size: 256,
    max_mem_slots: 32,
};

fn fds(n: usize) -> Vec<File> {
    (0..n)
        .map(|_| File::open("/dev/null").expect("/dev/null"))
        .collect()
}

fn hdr(request: u32, payload: &[u8]) -> Header {
    Header {
        request,
        flags: VERSION_1,
        size: payload.len() as u32,
    }
}

#[derive(Clone, Copy, Debug)]
struct R {
    gpa: u64,
    size: u64,
    uaddr: u64,
    off: u64,
}

fn region() -> impl Strategy<Value = R> {
    (
        prop_oneof![0..0x10_0000u64, Just(u64::MAX - 0xfff)],
        prop_oneof![0..0x4_0000u64, Just(u64::MAX)],
        prop_oneof![0..0x10_0000u64, Just(u64::MAX - 0x10)],
        prop_oneof![Just(0u64), 0..0x1000u64, Just(u64::MAX)],
    )
        .prop_map(|(gpa, size, uaddr, off)| R {
            gpa,
            size,
            uaddr,
            off,
        })
}

fn valid(r: &R) -> bool {
    r.size != 0
        && r.gpa.checked_add(r.size - 1).is_some()
        && r.uaddr.checked_add(r.size - 1).is_some()
        && r.off
            .checked_add(r.size)
            .is_some_and(|e| i64::try_from(e).is_ok())
}

fn overlap(a: &R, b: &R) -> bool {
    let (al, bl) = (a.gpa + (a.size - 1), b.gpa + (b.size - 1));
    let (au, bu) = (a.uaddr + (a.size - 1), b.uaddr + (b.size - 1));
    (a.gpa <= bl && b.gpa <= al) || (a.uaddr <= bu && b.uaddr <= au)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn test_arbitrary_messages_never_panic(
        request in 0u32..50,
        flags in prop_oneof![Just(VERSION_1), Just(VERSION_1 | FLAG_NEED_REPLY), any::<u32>()],
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        nfds in 0usize..4,
        lie in any::<bool>(),
    ) {
        let size = if lie { payload.len() as u32 ^ 8 } else { payload.len() as u32 };
        let h = Header { request, flags, size };
        let _ = decode(&h, &payload, fds(nfds), &LIMITS);
    }

    #[test]
    fn test_mem_table_accepted_iff_valid_and_disjoint(
        regions in proptest::collection::vec(region(), 0..5),
        extra_fd in any::<bool>(),
    ) {
        let mut p = Vec::new();
        p.extend_from_slice(&(regions.len() as u32).to_ne_bytes());
        p.extend_from_slice(&0u32.to_ne_bytes());
        for r in &regions {
            for x in [r.gpa, r.size, r.uaddr, r.off] {
                p.extend_from_slice(&x.to_ne_bytes());
            }
        }
        let n = regions.len() + usize::from(extra_fd);
        let got = decode(&hdr(5, &p), &p, fds(n), &LIMITS);
        let all_valid = regions.iter().all(valid);
        let disjoint = all_valid && regions.iter().enumerate().all(|(i, a)| {
            regions[i + 1..].iter().all(|b| !overlap(a, b))
        });
        let expect_ok = !extra_fd && all_valid && disjoint;
        match got {
            Ok(Request::SetMemTable(v)) => {
                prop_assert!(expect_ok, "accepted {:?}", regions);
                prop_assert_eq!(v.len(), regions.len());
            }
            Ok(other) => prop_assert!(false, "decoded as {:?}", other),
            Err(e) => prop_assert!(!expect_ok, "rejected {:?}: {}", regions, e),
        }
    }

    #[test]
    fn test_vring_num_bounds(index in 0u32..8, num in 0u32..1024) {
        let mut p = index.to_ne_bytes().to_vec();
        p.extend_from_slice(&num.to_ne_bytes());
        let ok = index < 4 && num.is_power_of_two() && num <= 256;
        match decode(&hdr(8, &p), &p, fds(0), &LIMITS) {
            Ok(Request::SetVringNum { index: i, num: n }) => {
                prop_assert!(ok);
                prop_assert_eq!((u32::from(i), u32::from(n)), (index, num));
            }
            Ok(other) => prop_assert!(false, "decoded as {:?}", other),
            Err(_) => prop_assert!(!ok),
        }
    }

    #[test]
    fn test_iotlb_ranges_never_overflow(
        typ in prop_oneof![Just(VHOST_IOTLB_UPDATE), Just(VHOST_IOTLB_INVALIDATE), 0u8..10],
        iova in prop_oneof![any::<u64>(), Just(0u64), Just(u64::MAX)],
        size in prop_oneof![any::<u64>(), Just(0u64), Just(u64::MAX), 1u64..0x10000],
        uaddr in any::<u64>(),
        perm in 0u8..5,
    ) {
        let mut p = Vec::new();
        for x in [iova, size, uaddr] {
            p.extend_from_slice(&x.to_ne_bytes());
        }
        p.extend_from_slice(&[perm, typ, 0, 0, 0, 0, 0, 0]);
        match decode(&hdr(22, &p), &p, fds(0), &LIMITS) {
            Ok(Request::Iotlb(IotlbRequest::Update { iova: i, size: s, uaddr: u, perm: pm })) => {
                prop_assert_eq!(typ, VHOST_IOTLB_UPDATE);
                prop_assert!(s > 0 && i.checked_add(s - 1).is_some() && u.checked_add(s - 1).is_some());
                prop_assert!((1..=3).contains(&pm));
            }
            Ok(Request::Iotlb(IotlbRequest::Invalidate { iova: i, last })) => {
                prop_assert_eq!(typ, VHOST_IOTLB_INVALIDATE);
                prop_assert!(i <= last);
                prop_assert_eq!(last, iova.saturating_add(size - 1));
            }
            Ok(Request::Iotlb(_)) => prop_assert!(typ == 5 || typ == 6),
            Ok(other) => prop_assert!(false, "decoded as {:?}", other),
            Err(e) => {
                let is_iotlb = matches!(e, MsgError::Iotlb { .. });
                prop_assert!(is_iotlb, "unexpected error {}", e);
            }
        }
    }
}

#[test]
fn test_header_rules() {
    let ok = Header {
        request: 1,
        flags: VERSION_1,
        size: 0,
    };
    assert!(ok.validate().is_ok());
    for bad in [
        Header {
            request: 1,
            flags: 0,
            size: 0,
        },
        Header {
            request: 1,
            flags: 2,
            size: 0,
        },
        Header {
            request: 1,
            flags: VERSION_1 | 0x4,
            size: 0,
        },
        Header {
            request: 1,
            flags: VERSION_1 | 0x10,
            size: 0,
        },
        Header {
            request: 0,
            flags: VERSION_1,
            size: 0,
        },
        Header {
            request: 1,
            flags: VERSION_1,
            size: 0x1001,
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    let h = Header {
        request: 7,
        flags: 0x9,
        size: 300,
    };
    assert_eq!(Header::from_bytes(&h.to_bytes()), h);
}

#[test]
fn test_kick_fd_count_follows_nofd_flag() {
    let with_fd = 1u64.to_ne_bytes();
    assert!(decode(&hdr(12, &with_fd), &with_fd, fds(1), &LIMITS).is_ok());
    assert!(matches!(
        decode(&hdr(12, &with_fd), &with_fd, fds(0), &LIMITS),
        Err(MsgError::FdCount { .. })
    ));
    let nofd = (0x100u64 | 1).to_ne_bytes();
    match decode(&hdr(12, &nofd), &nofd, fds(0), &LIMITS) {
        Ok(Request::SetVringFd {
            index: 1, fd: None, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        decode(&hdr(12, &nofd), &nofd, fds(1), &LIMITS),
        Err(MsgError::FdCount { .. })
    ));
}
