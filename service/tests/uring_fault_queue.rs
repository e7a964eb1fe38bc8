//! Fault queue batch tests: an iommu-core fault queue behind a fault pump,
//! consumed through the io_uring fault channel.

use std::collections::HashSet;
use std::time::Duration;

use ioasis_service::uring::record::{FAULT_PERM_READ, FAULT_PERM_WRITE, PAGE_RESP_SUCCESS};
use ioasis_service::uring::{
    fault_channel_pair, FaultBatch, FaultChannel, FaultPump, PageResponse, Rejection, Wait,
};
use ioasis_service::QueueSource;
use iommu_core::{Error, FaultStatus, HwInfo, HwptAlloc, Iommu, IommuDevice, PendingFault};

const WAIT: Wait = Wait::Timeout(Duration::from_secs(10));
const LONG: Duration = Duration::from_secs(10);

struct Rig {
    iommu: Iommu,
    devs: Vec<IommuDevice>,
    pump: FaultPump<QueueSource>,
    chan: FaultChannel,
}

fn rig(ndev: usize) -> Rig {
    let iommu = Iommu::new();
    let ioas = iommu.ioas_alloc().expect("ioas");
    let (fault_id, fq) = iommu.fault_queue_alloc().expect("fault queue");
    let mut devs = Vec::new();
    for i in 0..ndev {
        let d = IommuDevice::new(format!("d{i}"), HwInfo::full());
        let id = iommu.bind(&d).expect("bind");
        let hwpt = iommu
            .hwpt_alloc(&HwptAlloc {
                dev_id: id,
                pt_id: ioas,
                fault_id: Some(fault_id),
                ..HwptAlloc::default()
            })
            .expect("hwpt");
        iommu.attach(id, None, hwpt).expect("attach");
        devs.push(d);
    }
    let (s, c) = fault_channel_pair().expect("pair");
    Rig {
        iommu,
        devs,
        pump: FaultPump::new(QueueSource::new(fq), s).expect("pump"),
        chan: FaultChannel::new(c).expect("channel"),
    }
}

fn fault(dev: &IommuDevice, iova: u64, write: bool) -> PendingFault {
    let mut t = dev.translator();
    let r = if write {
        t.write(None, iova, &[1])
    } else {
        let mut b = [0u8; 1];
        t.read(None, iova, &mut b)
    };
    match r {
        Err(Error::FaultRaised { pending, .. }) => pending,
        other => panic!("expected a fault, got {other:?}"),
    }
}

/// Receives until `n` records (bounded by the wait of each receive).
fn recv_n(chan: &mut FaultChannel, n: usize) -> FaultBatch {
    let mut b = FaultBatch::default();
    for _ in 0..n + 4 {
        if b.records.len() >= n {
            break;
        }
        chan.recv(&mut b, WAIT).expect("recv");
    }
    assert_eq!(b.records.len(), n);
    b
}

/// Applies responses until `n` are in (the pump is non-blocking; the
/// channel's send completes asynchronously).
fn pump_in_n(pump: &mut FaultPump<QueueSource>, n: usize) {
    let deadline = std::time::Instant::now() + LONG;
    let mut got = 0;
    while got < n {
        assert!(
            std::time::Instant::now() < deadline,
            "responses never arrived"
        );
        let fd = pump.socket();
        let mut pfd = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(100u16));
        got += pump.pump_in().expect("pump in");
    }
}

#[test]
fn test_whole_groups_from_many_devices_in_one_batch() {
    let mut r = rig(4);
    let mut pending = Vec::new();
    for (i, d) in r.devs.iter().enumerate() {
        for k in 0..8u64 {
            pending.push(fault(
                d,
                0x10_0000 * (i as u64 + 1) + k * 0x1000,
                k % 2 == 1,
            ));
        }
    }
    assert_eq!(r.pump.pump_out().expect("pump out"), 32);
    // One packet carries them all.
    assert_eq!(r.pump.stats().packets_out, 1);
    let b = recv_n(&mut r.chan, 32);
    let cookies: HashSet<u32> = b.records.iter().map(|x| x.cookie).collect();
    assert_eq!(cookies.len(), 32);
    assert_eq!(b.group_cookies().count(), 32);
    for rec in &b.records {
        assert!(rec.is_last());
        assert_eq!(rec.addr % 0x1000, 0);
        let want = if (rec.addr / 0x1000) % 2 == 1 {
            FAULT_PERM_WRITE
        } else {
            FAULT_PERM_READ
        };
        assert_eq!(rec.perm.bits() & (FAULT_PERM_READ | FAULT_PERM_WRITE), want);
        let p = pending
            .iter()
            .find(|p| p.cookie() == rec.cookie)
            .expect("record of a raised group");
        assert_eq!(p.addr(), rec.addr);
    }
    // One batch of responses resumes every device.
    let resp: Vec<PageResponse> = b.group_cookies().map(PageResponse::success).collect();
    r.chan.respond(&resp).expect("respond");
    pump_in_n(&mut r.pump, 32);
    for p in &pending {
        assert_eq!(p.wait_timeout(LONG), FaultStatus::Success);
    }
    for d in &r.devs {
        assert_eq!(d.outstanding_faults(), 0);
    }
}

#[test]
fn test_invalid_response_completes_with_invalid() {
    let mut r = rig(1);
    let p = fault(&r.devs[0], 0x4000, false);
    r.pump.pump_out().expect("pump out");
    let b = recv_n(&mut r.chan, 1);
    r.chan
        .respond(&[PageResponse::invalid(b.records[0].cookie)])
        .expect("respond");
    pump_in_n(&mut r.pump, 1);
    assert_eq!(p.wait_timeout(LONG), FaultStatus::Invalid);
}

#[test]
fn test_unknown_and_repeated_cookies_are_rejected() {
    let mut r = rig(1);
    let p = fault(&r.devs[0], 0x4000, false);
    r.pump.pump_out().expect("pump out");
    let b = recv_n(&mut r.chan, 1);
    let c = b.records[0].cookie;
    r.chan
        .respond(&[
            PageResponse::success(c ^ 0x5555),
            PageResponse::success(c),
            PageResponse::success(c),
        ])
        .expect("respond");
    pump_in_n(&mut r.pump, 1);
    assert_eq!(p.wait_timeout(LONG), FaultStatus::Success);
    let mut st = FaultBatch::default();
    for _ in 0..4 {
        if st.rejected.len() >= 2 {
            break;
        }
        r.chan.recv(&mut st, WAIT).expect("status");
    }
    assert_eq!(
        st.rejected,
        vec![
            Rejection {
                cookie: c ^ 0x5555,
                code: PAGE_RESP_SUCCESS,
                errno: libc::EINVAL
            },
            Rejection {
                cookie: c,
                code: PAGE_RESP_SUCCESS,
                errno: libc::EINVAL
            }
        ]
    );
}

#[test]
fn test_detach_answers_outstanding_groups_invalid() {
    let mut r = rig(2);
    // One group delivered, one still queued, on device 0; one on device 1.
    let delivered = fault(&r.devs[0], 0x1000, false);
    r.pump.pump_out().expect("pump out");
    let b = recv_n(&mut r.chan, 1);
    let queued = fault(&r.devs[0], 0x2000, false);
    let other = fault(&r.devs[1], 0x3000, false);
    let d0 = r.devs[0].dev_id().expect("bound");
    r.iommu.detach(d0, None).expect("detach");
    assert_eq!(delivered.wait_timeout(LONG), FaultStatus::Invalid);
    assert_eq!(queued.wait_timeout(LONG), FaultStatus::Invalid);
    assert_eq!(other.status(), FaultStatus::Pending);
    // Only device 1's group is still delivered.
    assert_eq!(r.pump.pump_out().expect("pump out"), 1);
    let b2 = recv_n(&mut r.chan, 1);
    assert_eq!(b2.records[0].cookie, other.cookie());
    // Answering the auto-answered group is refused.
    r.chan
        .respond(&[
            PageResponse::success(b.records[0].cookie),
            PageResponse::success(other.cookie()),
        ])
        .expect("respond");
    pump_in_n(&mut r.pump, 1);
    assert_eq!(other.wait_timeout(LONG), FaultStatus::Success);
    let mut st = FaultBatch::default();
    r.chan.recv(&mut st, WAIT).expect("status");
    assert_eq!(st.rejected.len(), 1);
    assert_eq!(st.rejected[0].cookie, b.records[0].cookie);
}

#[test]
fn test_consumer_gone_closes_the_pump_and_pump_gone_closes_the_consumer() {
    let mut r = rig(1);
    let _p = fault(&r.devs[0], 0x1000, false);
    drop(r.chan);
    // The record may or may not be sent before the close is seen; the
    // next step must report the closed channel.
    let res = r.pump.pump_out().and_then(|_| r.pump.pump_in());
    assert!(matches!(res, Err(ioasis_service::uring::PumpError::Closed)));

    let r2 = rig(1);
    let mut chan = r2.chan;
    drop(r2.pump);
    let mut b = FaultBatch::default();
    assert!(matches!(
        chan.recv(&mut b, WAIT),
        Err(ioasis_service::uring::ChannelError::Closed)
    ));
}
