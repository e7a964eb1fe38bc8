//! Work queues and portals.
//!
//! Each client gets its own portal: a memfd the daemon creates, seals and
//! shares with the client. It holds a control page, a submission ring of
//! `wq_size` 64-byte descriptor slots (single producer: the client; consumer:
//! the daemon's workers, one at a time) and an event ring (daemon to client).
//!
//! ```text
//! offset 0      control page (one cache line per word, see OFF_*)
//! offset 4096   submission ring: wq_size x 64 B
//! then          event ring: EVENT_SLOTS x 32 B
//! ```
//!
//! Words the daemon owns (head, completed, event tail, doorbell request) are
//! kept authoritative in daemon memory and only mirrored into the page, so a
//! client that scribbles over them hurts only itself. The client's tail is
//! read once per pop and clamped to the ring size.
//!
//! Queue modes:
//! - shared (ENQCMD): a submission is accepted when the portal ring has a free
//!   slot, otherwise the client is told to retry; workers admit descriptors
//!   from all portals into the `wq_size` execution slots of the one shared
//!   work queue, highest priority first.
//! - dedicated (MOVDIR64B): no acceptance feedback; the client library keeps
//!   a credit count (`wq_size` minus descriptors submitted and not yet
//!   completed, read from the `completed` word) and never submits without a
//!   credit. Each client gets its own dedicated queue.

use crate::shm::{self, SharedMap};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::desc::DESC_SIZE;

/// Size of the control page.
pub const CTRL_SIZE: usize = 4096;
/// Client-written: descriptors published (free-running).
pub const OFF_TAIL: usize = 0;
/// Daemon-written: descriptors consumed (free-running).
pub const OFF_HEAD: usize = 64;
/// Daemon-written: descriptors completed (free-running; dedicated credits).
pub const OFF_COMPLETED: usize = 128;
/// Daemon-written u32: non-zero while workers sleep and want a doorbell.
pub const OFF_NEED_DOORBELL: usize = 192;
/// Client-written u32: number of client threads asleep on the completion eventfd.
pub const OFF_CLIENT_WAITING: usize = 256;
/// Client-written u32: sleep epoch, bumped by each client thread before it sleeps.
pub const OFF_CLIENT_EPOCH: usize = 260;
/// Daemon-written: events published (free-running).
pub const OFF_EV_TAIL: usize = 320;
/// Client-written: events consumed (free-running).
pub const OFF_EV_HEAD: usize = 384;
/// Daemon-written: events dropped because the event ring was full.
pub const OFF_EV_DROPPED: usize = 448;
/// Number of event slots.
pub const EVENT_SLOTS: usize = 256;
/// Size of one event record.
pub const EVENT_SIZE: usize = 32;
/// Smallest and largest work queue sizes.
pub const MIN_WQ_SIZE: u32 = 2;
/// Largest work queue size (descriptors).
pub const MAX_WQ_SIZE: u32 = 4096;

/// Queue mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WqMode {
    /// Shared work queue: accept-or-retry.
    Shared,
    /// Dedicated work queue: credit accounting by the client.
    Dedicated,
}

impl WqMode {
    /// Wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            WqMode::Shared => 0,
            WqMode::Dedicated => 1,
        }
    }

    /// From the wire value.
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(WqMode::Shared),
            1 => Some(WqMode::Dedicated),
            _ => None,
        }
    }
}

/// Total portal size for a queue of `wq_size` descriptors.
pub fn portal_size(wq_size: u32) -> usize {
    CTRL_SIZE + wq_size as usize * DESC_SIZE + EVENT_SLOTS * EVENT_SIZE
}

fn ring_off(wq_size: u32, idx: u64) -> usize {
    CTRL_SIZE + (idx % u64::from(wq_size)) as usize * DESC_SIZE
}

fn event_off(wq_size: u32, idx: u64) -> usize {
    CTRL_SIZE + wq_size as usize * DESC_SIZE + (idx % EVENT_SLOTS as u64) as usize * EVENT_SIZE
}

/// An event the device reports to a client: a completion record it could
/// not write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// 0x1A (record address did not translate) or 0x1B (misaligned).
    pub code: u8,
    /// Status the record would have carried.
    pub status: u8,
    /// Opcode of the descriptor.
    pub opcode: u8,
    /// PASID of the work.
    pub pasid: u32,
    /// The completion record address.
    pub cr_addr: u64,
}

impl Event {
    fn encode(&self) -> [u8; EVENT_SIZE] {
        let mut b = [0u8; EVENT_SIZE];
        b[0] = self.code;
        b[1] = self.status;
        b[2] = self.opcode;
        b[4..8].copy_from_slice(&self.pasid.to_le_bytes());
        b[8..16].copy_from_slice(&self.cr_addr.to_le_bytes());
        b
    }

    fn decode(b: &[u8; EVENT_SIZE]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[8..16]);
        Event {
            code: b[0],
            status: b[1],
            opcode: b[2],
            pasid: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            cr_addr: u64::from_le_bytes(a),
        }
    }
}

#[derive(Debug, Default)]
struct Cursor {
    head: u64,
    ev_tail: u64,
    ev_dropped: u64,
}

/// The daemon side of a portal.
#[derive(Debug)]
pub struct Portal {
    map: SharedMap,
    wq_size: u32,
    cursor: Mutex<Cursor>,
    completed: AtomicU64,
    woken_epoch: std::sync::atomic::AtomicU32,
}

impl Portal {
    /// Creates a portal memfd for a queue of `wq_size` descriptors; returns
    /// the portal and the fd to hand to the client.
    pub fn create(wq_size: u32) -> io::Result<(Portal, OwnedFd)> {
        let size = portal_size(wq_size);
        let fd = shm::memfd("sva-portal", size as u64)?;
        shm::add_seals(
            fd.as_fd(),
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )?;
        let map = SharedMap::map(fd.as_fd(), 0, size, true)?;
        Ok((
            Portal {
                map,
                wq_size,
                cursor: Mutex::new(Cursor::default()),
                completed: AtomicU64::new(0),
                woken_epoch: std::sync::atomic::AtomicU32::new(0),
            },
            fd,
        ))
    }

    /// Queue size.
    pub fn wq_size(&self) -> u32 {
        self.wq_size
    }

    /// Whether descriptors are waiting (cheap, racy hint).
    pub fn has_work(&self) -> bool {
        let tail = self.map.atomic_u64(OFF_TAIL).load(Ordering::Acquire);
        let head = self.map.atomic_u64(OFF_HEAD).load(Ordering::Relaxed);
        tail != head
    }

    /// Pops up to `max` descriptors into `out` (raw bytes). Returns `None`
    /// when another worker is consuming this portal.
    pub fn pop(&self, out: &mut Vec<[u8; DESC_SIZE]>, max: usize) -> Option<usize> {
        let mut cur = self.cursor.try_lock().ok()?;
        let tail = self.map.atomic_u64(OFF_TAIL).load(Ordering::Acquire);
        // Never trust the client's tail beyond one ring of descriptors.
        let avail = tail.wrapping_sub(cur.head).min(u64::from(self.wq_size));
        let n = (avail as usize).min(max);
        for i in 0..n {
            let mut d = [0u8; DESC_SIZE];
            self.map
                .read(ring_off(self.wq_size, cur.head + i as u64), &mut d);
            out.push(d);
        }
        if n > 0 {
            cur.head += n as u64;
            self.map
                .atomic_u64(OFF_HEAD)
                .store(cur.head, Ordering::Release);
        } else if avail == 0 && tail != cur.head {
            // The client moved its tail backwards: resynchronise the mirror.
            self.map
                .atomic_u64(OFF_HEAD)
                .store(cur.head, Ordering::Release);
        }
        Some(n)
    }

    /// Counts `n` completed descriptors and mirrors the count.
    pub fn complete(&self, n: u64) {
        let c = self.completed.fetch_add(n, Ordering::AcqRel) + n;
        self.map
            .atomic_u64(OFF_COMPLETED)
            .store(c, Ordering::Release);
    }

    /// Asks the client to ring (or not) the doorbell after publishing.
    pub fn set_need_doorbell(&self, on: bool) {
        self.map
            .atomic_u32(OFF_NEED_DOORBELL)
            .store(u32::from(on), Ordering::SeqCst);
    }

    /// Whether a client thread went to sleep waiting for a completion since
    /// the last time this answered true (one wake-up per sleep, not one per
    /// completion).
    pub fn client_needs_wakeup(&self) -> bool {
        fence(Ordering::SeqCst);
        if self
            .map
            .atomic_u32(OFF_CLIENT_WAITING)
            .load(Ordering::SeqCst)
            == 0
        {
            return false;
        }
        let epoch = self.map.atomic_u32(OFF_CLIENT_EPOCH).load(Ordering::SeqCst);
        self.woken_epoch.swap(epoch, Ordering::AcqRel) != epoch
    }

    /// Publishes an event; counts it as dropped when the ring is full.
    pub fn push_event(&self, ev: &Event) {
        let Ok(mut cur) = self.cursor.lock() else {
            return;
        };
        let head = self.map.atomic_u64(OFF_EV_HEAD).load(Ordering::Acquire);
        if cur.ev_tail.wrapping_sub(head) >= EVENT_SLOTS as u64 {
            cur.ev_dropped += 1;
            self.map
                .atomic_u64(OFF_EV_DROPPED)
                .store(cur.ev_dropped, Ordering::Release);
            return;
        }
        self.map
            .write(event_off(self.wq_size, cur.ev_tail), &ev.encode());
        cur.ev_tail += 1;
        self.map
            .atomic_u64(OFF_EV_TAIL)
            .store(cur.ev_tail, Ordering::Release);
    }
}

/// The client side of a portal.
#[derive(Debug)]
pub struct ClientPortal {
    map: SharedMap,
    wq_size: u32,
    tail: u64,
    ev_head: u64,
}

/// Why a submission was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Shared queue full: retry (ENQCMD returned ZF=1).
    Retry,
    /// Dedicated queue out of credits.
    NoCredit,
}

impl ClientPortal {
    /// Maps a portal fd received from the daemon.
    pub fn new(fd: &OwnedFd, wq_size: u32) -> io::Result<Self> {
        let map = SharedMap::map(fd.as_fd(), 0, portal_size(wq_size), true)?;
        let tail = map.atomic_u64(OFF_TAIL).load(Ordering::Acquire);
        Ok(ClientPortal {
            map,
            wq_size,
            tail,
            ev_head: 0,
        })
    }

    /// Descriptors submitted and not yet completed.
    pub fn in_flight(&self) -> u64 {
        self.tail
            .wrapping_sub(self.map.atomic_u64(OFF_COMPLETED).load(Ordering::Acquire))
    }

    /// Writes descriptors into the ring and publishes them if all fit:
    /// shared mode checks ring space, dedicated mode checks credits.
    pub fn submit(&mut self, descs: &[[u8; DESC_SIZE]], mode: WqMode) -> Result<(), Rejected> {
        let n = descs.len() as u64;
        match mode {
            WqMode::Shared => {
                let head = self.map.atomic_u64(OFF_HEAD).load(Ordering::Acquire);
                if self.tail.wrapping_sub(head) + n > u64::from(self.wq_size) {
                    return Err(Rejected::Retry);
                }
            }
            WqMode::Dedicated => {
                if self.in_flight() + n > u64::from(self.wq_size) {
                    return Err(Rejected::NoCredit);
                }
            }
        }
        for (i, d) in descs.iter().enumerate() {
            self.map
                .write(ring_off(self.wq_size, self.tail + i as u64), d);
        }
        self.tail += n;
        self.map
            .atomic_u64(OFF_TAIL)
            .store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Whether the daemon asked for a doorbell (checked after publishing).
    pub fn needs_doorbell(&self) -> bool {
        fence(Ordering::SeqCst);
        self.map
            .atomic_u32(OFF_NEED_DOORBELL)
            .load(Ordering::SeqCst)
            != 0
    }

    /// Counts a client thread as sleeping (`true`) or awake again
    /// (`false`) on the completion eventfd.
    pub fn set_waiting(&self, on: bool) {
        let w = self.map.atomic_u32(OFF_CLIENT_WAITING);
        if on {
            self.map
                .atomic_u32(OFF_CLIENT_EPOCH)
                .fetch_add(1, Ordering::SeqCst);
            w.fetch_add(1, Ordering::SeqCst);
        } else {
            w.fetch_sub(1, Ordering::SeqCst);
        }
        fence(Ordering::SeqCst);
    }

    /// Takes every published event.
    pub fn take_events(&mut self, out: &mut Vec<Event>) {
        let tail = self.map.atomic_u64(OFF_EV_TAIL).load(Ordering::Acquire);
        let n = tail.wrapping_sub(self.ev_head).min(EVENT_SLOTS as u64);
        for _ in 0..n {
            let mut b = [0u8; EVENT_SIZE];
            self.map.read(event_off(self.wq_size, self.ev_head), &mut b);
            out.push(Event::decode(&b));
            self.ev_head += 1;
        }
        self.map
            .atomic_u64(OFF_EV_HEAD)
            .store(self.ev_head, Ordering::Release);
    }

    /// Events the daemon dropped because the ring was full.
    pub fn events_dropped(&self) -> u64 {
        self.map.atomic_u64(OFF_EV_DROPPED).load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_shared_ring_accept_or_retry() {
        let (p, fd) = Portal::create(4).expect("portal");
        let mut c = ClientPortal::new(&fd, 4).expect("client");
        let d = [7u8; DESC_SIZE];
        for _ in 0..4 {
            c.submit(&[d], WqMode::Shared).expect("room");
        }
        assert_eq!(c.submit(&[d], WqMode::Shared), Err(Rejected::Retry));
        let mut out = Vec::new();
        assert_eq!(p.pop(&mut out, 3), Some(3));
        assert_eq!(out[0], d);
        c.submit(&[d, d, d], WqMode::Shared)
            .expect("room after pop");
        assert!(p.has_work());
    }

    #[test]
    fn test_dedicated_credits_return_on_completion() {
        let (p, fd) = Portal::create(2).expect("portal");
        let mut c = ClientPortal::new(&fd, 2).expect("client");
        let d = [1u8; DESC_SIZE];
        c.submit(&[d, d], WqMode::Dedicated).expect("credits");
        let mut out = Vec::new();
        p.pop(&mut out, 8);
        // Consumed but not completed: still no credit.
        assert_eq!(c.submit(&[d], WqMode::Dedicated), Err(Rejected::NoCredit));
        p.complete(1);
        c.submit(&[d], WqMode::Dedicated).expect("one credit back");
    }

    #[test]
    fn test_forged_tail_is_clamped() {
        let (p, fd) = Portal::create(4).expect("portal");
        let c = ClientPortal::new(&fd, 4).expect("client");
        c.map
            .atomic_u64(OFF_TAIL)
            .store(1_000_000, Ordering::Release);
        let mut out = Vec::new();
        assert_eq!(p.pop(&mut out, 100), Some(4));
    }

    #[test]
    fn test_events_roundtrip_and_overflow() {
        let (p, fd) = Portal::create(2).expect("portal");
        let mut c = ClientPortal::new(&fd, 2).expect("client");
        let ev = Event {
            code: 0x1a,
            status: 1,
            opcode: 3,
            pasid: 9,
            cr_addr: 0xdead_0000,
        };
        for _ in 0..EVENT_SLOTS + 3 {
            p.push_event(&ev);
        }
        let mut out = Vec::new();
        c.take_events(&mut out);
        assert_eq!(out.len(), EVENT_SLOTS);
        assert_eq!(out[0], ev);
        assert_eq!(c.events_dropped(), 3);
    }
}
