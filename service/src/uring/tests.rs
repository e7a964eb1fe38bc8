//! Unit tests of the fault channel with an in-memory fault source.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use crate::sys::eventfd::{self, EventFd};

use super::record::*;
use super::*;

/// A fault source holding groups in memory; answered groups are recorded.
pub(crate) struct MemSource {
    ready: EventFd,
    groups: VecDeque<Vec<FaultRecord>>,
    waiting: HashMap<u32, usize>,
    answered: Vec<PageResponse>,
    next_cookie: u32,
}

impl MemSource {
    pub(crate) fn new() -> Self {
        MemSource {
            ready: eventfd::nonblocking().expect("eventfd"),
            groups: VecDeque::new(),
            waiting: HashMap::new(),
            answered: Vec::new(),
            next_cookie: 1,
        }
    }

    /// Queues a group of `n` records for device `dev`; returns its cookie.
    pub(crate) fn raise(&mut self, dev: u32, n: usize) -> u32 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut g = Vec::new();
        for i in 0..n {
            g.push(FaultRecord {
                flags: if i + 1 == n { FAULT_FLAG_LAST_PAGE } else { 0 },
                dev_id: u64::from(dev),
                pasid: 0,
                grpid: cookie & 0x1ff,
                perm: Perm::READ,
                addr: 0x1000 * (i as u64 + 1),
                length: 0,
                cookie,
            });
        }
        self.groups.push_back(g);
        let _ = self.ready.write(1);
        cookie
    }
}

impl FaultSource for MemSource {
    fn ready_fd(&self) -> BorrowedFd<'_> {
        eventfd::borrow(&self.ready)
    }

    fn read_groups(&mut self, out: &mut Vec<FaultRecord>, max: usize) -> Result<usize, i32> {
        let mut n = 0;
        while let Some(g) = self.groups.front() {
            if n + g.len() > max {
                break;
            }
            let g = self.groups.pop_front().unwrap_or_default();
            n += g.len();
            if let Some(last) = g.last() {
                self.waiting.insert(last.cookie, g.len());
            }
            out.extend(g);
        }
        if self.groups.is_empty() {
            let _ = self.ready.read();
        }
        Ok(n)
    }

    fn respond(&mut self, responses: &[PageResponse]) -> Result<(), (usize, i32)> {
        for (i, r) in responses.iter().enumerate() {
            if self.waiting.remove(&r.cookie).is_none() {
                return Err((i, libc::EINVAL));
            }
            self.answered.push(*r);
        }
        Ok(())
    }
}

fn pair() -> (FaultPump<MemSource>, FaultChannel) {
    let (s, c): (OwnedFd, OwnedFd) = fault_channel_pair().expect("socketpair");
    let pump = FaultPump::new(MemSource::new(), s).expect("pump");
    let ch = FaultChannel::new(c).expect("channel");
    (pump, ch)
}

const WAIT: Wait = Wait::Timeout(Duration::from_secs(5));

/// Waits (bounded) until the pump's socket has something to read.
fn wait_readable(pump: &FaultPump<MemSource>) {
    let mut p = [nix::poll::PollFd::new(
        pump.socket(),
        nix::poll::PollFlags::POLLIN,
    )];
    let _ = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(1000u16));
}

#[test]
fn test_whole_groups_are_delivered_and_answered() {
    let (mut pump, mut ch) = pair();
    let c1 = pump.source_mut().raise(3, 3);
    let c2 = pump.source_mut().raise(4, 1);
    assert_eq!(pump.pump_out().expect("pump out"), 4);
    let mut batch = FaultBatch::default();
    let mut got = 0;
    for _ in 0..10 {
        got += ch.recv(&mut batch, WAIT).expect("recv");
        if got == 4 {
            break;
        }
    }
    assert_eq!(got, 4);
    assert_eq!(batch.group_cookies().collect::<Vec<_>>(), vec![c1, c2]);
    assert!(batch.records[..3]
        .iter()
        .all(|r| r.cookie == c1 && r.dev_id == 3));
    ch.respond(&[PageResponse::success(c1), PageResponse::invalid(c2)])
        .expect("respond");
    let mut applied = 0;
    for _ in 0..1000 {
        applied += pump.pump_in().expect("pump in");
        if applied == 2 {
            break;
        }
        wait_readable(&pump);
    }
    assert_eq!(
        pump.source().answered,
        vec![PageResponse::success(c1), PageResponse::invalid(c2)]
    );
}

#[test]
fn test_unknown_cookie_is_rejected_with_einval() {
    let (mut pump, mut ch) = pair();
    let c1 = pump.source_mut().raise(1, 1);
    pump.pump_out().expect("pump out");
    let mut batch = FaultBatch::default();
    ch.recv(&mut batch, WAIT).expect("recv");
    ch.respond(&[PageResponse::success(999), PageResponse::success(c1)])
        .expect("respond");
    for _ in 0..1000 {
        if pump.pump_in().expect("pump in") > 0 {
            break;
        }
        wait_readable(&pump);
    }
    // The bad response is reported, the good one after it still applies.
    assert_eq!(pump.source().answered, vec![PageResponse::success(c1)]);
    batch.clear();
    ch.recv(&mut batch, WAIT).expect("recv status");
    assert_eq!(
        batch.rejected,
        vec![Rejection {
            cookie: 999,
            code: PAGE_RESP_SUCCESS,
            errno: libc::EINVAL
        }]
    );
    assert_eq!(pump.stats().rejected, 1);
}

#[test]
fn test_many_groups_span_packets_whole() {
    let (mut pump, mut ch) = pair();
    // 100 groups of 3 records: 300 records, more than one packet; a packet
    // never splits a group.
    for i in 0..100 {
        pump.source_mut().raise(i, 3);
    }
    assert_eq!(pump.pump_out().expect("pump out"), 300);
    assert!(pump.stats().packets_out >= 2);
    let mut batch = FaultBatch::default();
    for _ in 0..100 {
        if batch.records.len() >= 300 {
            break;
        }
        ch.recv(&mut batch, WAIT).expect("recv");
    }
    assert_eq!(batch.records.len(), 300);
    assert_eq!(batch.group_cookies().count(), 100);
    let cookies: Vec<_> = batch.group_cookies().map(PageResponse::success).collect();
    ch.respond(&cookies).expect("respond");
    let mut applied = 0;
    for _ in 0..1000 {
        applied += pump.pump_in().expect("pump in");
        if applied == 100 {
            break;
        }
        wait_readable(&pump);
    }
    assert_eq!(applied, 100);
    assert_eq!(pump.stats().responses_in, 100);
    assert_eq!(pump.stats().records_out, 300);
}

#[test]
fn test_recv_poll_returns_zero_when_empty_and_closed_after_pump_drop() {
    let (pump, mut ch) = pair();
    let mut batch = FaultBatch::default();
    assert_eq!(ch.recv(&mut batch, Wait::Poll).expect("poll"), 0);
    drop(pump);
    assert!(matches!(
        ch.recv(&mut batch, WAIT),
        Err(ChannelError::Closed)
    ));
}

#[test]
fn test_malformed_response_packet_is_dropped() {
    let (s, c) = fault_channel_pair().expect("socketpair");
    let mut pump = FaultPump::new(MemSource::new(), s).expect("pump");
    nix::sys::socket::send(
        std::os::fd::AsRawFd::as_raw_fd(&c),
        &[1, 2, 3],
        nix::sys::socket::MsgFlags::empty(),
    )
    .expect("send");
    assert_eq!(pump.pump_in().expect("pump in"), 0);
    assert_eq!(pump.stats().malformed, 1);
}

#[test]
fn test_records_reaped_while_waiting_for_send_slots_are_kept() {
    let (mut pump, mut ch) = pair();
    for i in 0..5 {
        pump.source_mut().raise(i, 1);
    }
    assert_eq!(pump.pump_out().expect("pump out"), 5);
    // More response packets than send slots: the channel waits for sends
    // to complete and reaps the records' completions meanwhile.
    let many: Vec<PageResponse> = (0..MAX_RESPONSES_PER_PACKET as u32 * 12)
        .map(|c| PageResponse::invalid(10_000 + c))
        .collect();
    ch.respond(&many).expect("respond");
    let mut batch = FaultBatch::default();
    for _ in 0..10 {
        if batch.records.len() >= 5 {
            break;
        }
        ch.recv(&mut batch, WAIT).expect("recv");
    }
    assert_eq!(batch.records.len(), 5);
}

#[test]
fn test_pump_in_is_bounded_per_call() {
    let (s, c) = fault_channel_pair().expect("socketpair");
    let mut pump = FaultPump::new(MemSource::new(), s).expect("pump");
    // More garbage packets than one call handles.
    for _ in 0..pump::MAX_PACKETS_PER_CALL + 10 {
        nix::sys::socket::send(
            std::os::fd::AsRawFd::as_raw_fd(&c),
            &[9u8; 5],
            nix::sys::socket::MsgFlags::empty(),
        )
        .expect("send");
    }
    assert_eq!(pump.pump_in().expect("pump in"), 0);
    assert_eq!(pump.stats().malformed, pump::MAX_PACKETS_PER_CALL as u64);
    assert_eq!(pump.pump_in().expect("pump in"), 0);
    assert_eq!(
        pump.stats().malformed,
        pump::MAX_PACKETS_PER_CALL as u64 + 10
    );
}

#[test]
fn test_channel_moves_between_threads() {
    let (mut pump, ch) = pair();
    pump.source_mut().raise(1, 1);
    pump.pump_out().expect("pump out");
    // Armed and used on one thread that then exits...
    let mut ch = std::thread::spawn(move || {
        let mut ch = ch;
        let mut b = FaultBatch::default();
        assert_eq!(ch.recv(&mut b, WAIT).expect("recv on thread a"), 1);
        ch
    })
    .join()
    .expect("thread a");
    // ...then used on another: the receive is re-armed here.
    pump.source_mut().raise(2, 2);
    pump.pump_out().expect("pump out");
    let mut b = FaultBatch::default();
    for _ in 0..10 {
        if b.records.len() >= 2 {
            break;
        }
        ch.recv(&mut b, WAIT).expect("recv on thread b");
    }
    assert_eq!(b.records.len(), 2);
    // And on a third thread that stays alive while this one waits.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        let mut b = FaultBatch::default();
        let n = ch.recv(&mut b, WAIT).expect("recv on thread c");
        let _ = tx.send(());
        (n, ch)
    });
    pump.source_mut().raise(3, 1);
    pump.pump_out().expect("pump out");
    rx.recv_timeout(Duration::from_secs(10))
        .expect("thread c got it");
    let (n, _ch) = h.join().expect("thread c");
    assert_eq!(n, 1);
}

#[test]
fn test_completion_fd_fires_for_records() {
    let (mut pump, mut ch) = pair();
    pump.source_mut().raise(1, 1);
    pump.pump_out().expect("pump out");
    let mut p = [nix::poll::PollFd::new(
        ch.completion_fd().expect("completion fd"),
        nix::poll::PollFlags::POLLIN,
    )];
    let n = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(10_000u16));
    assert_eq!(n, Ok(1));
    let mut b = FaultBatch::default();
    assert_eq!(ch.recv(&mut b, Wait::Poll).expect("recv"), 1);
}
