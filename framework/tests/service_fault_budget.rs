//! Outstanding I/O page faults are charged per session (hostile client
//! through the real socket): a session that never answers its faults holds
//! at most its budget (`--limit faults-per-session`, 32 by default) of a
//! device's outstanding faults, and another session's faults on the same
//! device are still raised, delivered and answered.
//!
//! The device is the test's own: a translator of a PASID-capable device
//! that the service's directory hosts, whose bound on outstanding faults is
//! raised to 64, as a device that serves several sessions raises it (a
//! session budget below the device's bound is what protects the others).

mod hostile_common;

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostile_common::LATENCY_BOUND;
use ioasis::service::{
    sealed_memfd, Client, HwptRequest, Limits, MapPerm, Service, ServiceThread, StaticDirectory,
};
use ioasis::uring::{FaultBatch, FaultChannel, PageResponse, Wait};
use iommu_core::{
    Error, FaultStatus, HwInfo, Iommu, IommuDevice, PendingFault, IOMMU_HWPT_ALLOC_PASID, PAGE_SIZE,
};

/// The device's own bound on outstanding faults in these tests.
const DEVICE_BOUND: usize = 64;
const WAIT: Duration = Duration::from_secs(10);

struct World {
    _dir: tempfile::TempDir,
    path: PathBuf,
    dev: IommuDevice,
    svc: Option<ServiceThread>,
}

impl World {
    fn new(limits: Limits) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("iommu.sock");
        let iommu = Iommu::new();
        let dev = IommuDevice::new("dev0", HwInfo::full());
        dev.set_max_outstanding_faults(DEVICE_BOUND);
        iommu.bind(&dev).expect("bind");
        let directory = Arc::new(StaticDirectory::new());
        directory.insert(dev.clone());
        let svc = Service::bind(&path, iommu, directory).expect("service");
        svc.set_limits(limits);
        World {
            _dir: dir,
            path,
            dev,
            svc: Some(svc.spawn().expect("service thread")),
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(s) = self.svc.take() {
            s.stop();
        }
    }
}

/// A session with a PASID of `dev0` attached to a fault-capable HWPT over
/// its own IOAS, and that HWPT's fault channel.
struct FaultSession {
    client: Client,
    ioas: u32,
    pasid: u32,
    chan: FaultChannel,
}

fn fault_session(path: &PathBuf) -> FaultSession {
    let mut client = Client::connect(path).expect("session");
    let ioas = client.ioas_alloc().expect("IOAS_ALLOC");
    let (fault_id, chan) = client.fault_queue_alloc().expect("FAULT_QUEUE_ALLOC");
    let hwpt = client
        .hwpt_alloc(&HwptRequest {
            label: "dev0".into(),
            pt_id: ioas,
            flags: IOMMU_HWPT_ALLOC_PASID,
            fault_id: Some(fault_id),
            stage1_root: None,
        })
        .expect("HWPT_ALLOC");
    let pasid = client.pasid_alloc("dev0").expect("PASID_ALLOC");
    client.attach("dev0", Some(pasid), hwpt).expect("ATTACH");
    FaultSession {
        client,
        ioas,
        pasid,
        chan,
    }
}

/// What the attack left the well-behaved session.
struct Outcome {
    /// Faults raised for the attacker before the first refusal.
    attacker_raised: usize,
    /// The well-behaved session's faults delivered and answered, each
    /// within [`LATENCY_BOUND`] (the first refused one ends the rounds).
    victim_served: usize,
    /// The device's refusal of the victim's fault, if any.
    victim_refused: Option<Error>,
}

/// Session A attaches a PASID of `dev0` to a fault-capable HWPT and never
/// answers; the device raises faults on A's PASID until one is refused
/// (at most 2 x the device's bound). Session B, with its own fault queue on
/// another PASID, then has 8 faults raised; each is delivered to B, B maps
/// the page and answers SUCCESS, and the device's retry succeeds. Last, A
/// closes: its outstanding faults are answered INVALID and the device's
/// count goes back to zero.
fn attack(limits: Limits) -> Outcome {
    let w = World::new(limits);
    let mut a = fault_session(&w.path);
    let mut b = fault_session(&w.path);
    let mut t = w.dev.translator();
    let mut buf = [0u8; 8];
    // A's faults, never answered.
    let mut held: Vec<PendingFault> = Vec::new();
    let mut refusal = None;
    for i in 0..2 * DEVICE_BOUND as u64 {
        match t.read(Some(a.pasid), 0x100_0000 + i * PAGE_SIZE, &mut buf) {
            Err(Error::FaultRaised { pending, .. }) => held.push(pending),
            Err(e) => {
                refusal = Some(e);
                break;
            }
            Ok(()) => panic!("nothing is mapped in A's IOAS"),
        }
    }
    let attacker_raised = held.len();
    assert!(
        matches!(refusal, Some(Error::FaultOverflow { .. })),
        "A's faults end in an overflow: {refusal:?}"
    );
    // Further faults of A keep failing with an overflow.
    let e = t
        .read(Some(a.pasid), 0x200_0000, &mut buf)
        .expect_err("A is past its budget");
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    // A reads what was delivered (or not: it makes no difference) and
    // answers nothing.
    let mut a_batch = FaultBatch::default();
    let _ = a.chan.recv(&mut a_batch, Wait::Poll);

    // B's faults on the same device.
    let memfd = sealed_memfd("victim", 8 * PAGE_SIZE).expect("memfd");
    let mut victim_served = 0;
    let mut victim_refused = None;
    for i in 0..8u64 {
        let addr = 0x300_0000 + i * PAGE_SIZE;
        let started = Instant::now();
        let pending = match t.read(Some(b.pasid), addr, &mut buf) {
            Err(Error::FaultRaised { pending, .. }) => pending,
            Err(e) => {
                victim_refused = Some(e);
                break;
            }
            Ok(()) => panic!("B's page {addr:#x} is not mapped yet"),
        };
        let mut batch = FaultBatch::default();
        let n = b
            .chan
            .recv(&mut batch, Wait::Timeout(WAIT))
            .expect("B's channel");
        assert_eq!(n, 1, "B's fault {i} delivered");
        let r = batch.records[0];
        assert_eq!(
            (r.addr, r.pasid(), r.cookie),
            (addr, Some(b.pasid), pending.cookie())
        );
        b.client
            .ioas_map(
                b.ioas,
                memfd.as_fd(),
                i * PAGE_SIZE,
                PAGE_SIZE,
                Some(addr),
                MapPerm::ReadWrite,
            )
            .expect("B maps the page");
        b.chan
            .respond(&[PageResponse::success(r.cookie)])
            .expect("B answers");
        assert_eq!(pending.wait_timeout(WAIT), FaultStatus::Success);
        t.read(Some(b.pasid), addr, &mut buf)
            .expect("the device's retry after B's answer");
        let took = started.elapsed();
        assert!(took <= LATENCY_BOUND, "B's fault {i} took {took:?}");
        victim_served += 1;
    }

    // A's session closes: its faults are answered INVALID, every slot back.
    drop(a);
    for p in &held {
        assert_eq!(p.wait_timeout(WAIT), FaultStatus::Invalid);
    }
    assert_eq!(w.dev.outstanding_faults(), 0);
    drop(b);
    Outcome {
        attacker_raised,
        victim_served,
        victim_refused,
    }
}

/// Issue finding 6 (outstanding faults): the bound on outstanding I/O page
/// faults was the device's alone, so one session parking unanswered faults
/// failed every other session's faults on that device. Now each session
/// has a budget (default 32, below this device's 64): session A's 33rd
/// fault is refused with an overflow (`EBUSY`) while 32 of the device's 64
/// slots stay free, and session B's faults on another PASID of the same
/// device are delivered and answered, each round within [`LATENCY_BOUND`].
///
/// Seen failing: with the service's `fq.set_budget(Some(budget))` line
/// (in `Request::FaultQueueAlloc`, server.rs) replaced by `let _ = budget;`,
/// A raised 64 faults (the device's whole bound) and this test failed with
/// "B's fault 0 refused: Some(FaultOverflow { label: \"dev0\" })" (and
/// the next one with 64 faults raised for A where 5 were allowed).
/// [`test_without_a_budget_one_session_takes_the_device`] keeps that case
/// as a test.
#[test]
fn test_a_session_that_never_answers_holds_only_its_budget() {
    let o = attack(Limits::default());
    assert!(
        o.victim_refused.is_none(),
        "B's fault {} refused: {:?}",
        o.victim_served,
        o.victim_refused
    );
    assert_eq!(o.victim_served, 8);
    assert_eq!(o.attacker_raised, 32, "the default faults-per-session");
}

/// The budget is what `--limit faults-per-session=N` says.
#[test]
fn test_the_budget_is_configurable() {
    let mut limits = Limits::default();
    limits.set("faults-per-session=5").expect("limit");
    let o = attack(limits);
    assert_eq!(o.attacker_raised, 5);
    assert_eq!(o.victim_served, 8);
}

/// The attack as it was without a session budget (one larger than the
/// device's bound is none): A takes the device's 64 slots and B's first
/// fault is refused. This is the failure the budget prevents, and shows
/// that [`attack`] detects it.
#[test]
fn test_without_a_budget_one_session_takes_the_device() {
    let limits = Limits {
        faults_per_session: 1 << 20,
        ..Limits::default()
    };
    let o = attack(limits);
    assert_eq!(o.attacker_raised, DEVICE_BOUND);
    assert_eq!(o.victim_served, 0);
    assert!(
        matches!(o.victim_refused, Some(Error::FaultOverflow { .. })),
        "{:?}",
        o.victim_refused
    );
}
