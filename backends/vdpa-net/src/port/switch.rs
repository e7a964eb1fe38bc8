//! `switch=NAME`: an in-process L2 learning switch.
//!
//! Every device of the process that names the same switch is joined to it,
//! one endpoint per queue pair. The switch learns which endpoint each source
//! MAC was seen on; a frame to a known unicast MAC goes to that endpoint,
//! anything else is flooded to the first queue pair of every other device.
//! Frames are copied into the receiver's queue, whose buffers are reused.

use std::collections::{HashMap, VecDeque};
use std::os::fd::BorrowedFd;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

use vmm_sys_util::eventfd::EventFd;

use super::{Error, PacketBuf, Port, Result, SendOutcome, PORT_QUEUE_LEN};
use crate::net::{MacAddr, VNET_HDR_LEN};

/// Most MAC addresses one switch learns.
pub const MAX_LEARNED_MACS: usize = 4096;

static SWITCHES: LazyLock<Mutex<HashMap<String, Weak<Switch>>>> = LazyLock::new(Default::default);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the data path down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
struct EpQueue {
    frames: VecDeque<PacketBuf>,
    spare: Vec<PacketBuf>,
}

#[derive(Debug)]
struct Endpoint {
    dev: u64,
    queue: Mutex<EpQueue>,
    event: EventFd,
}

impl Endpoint {
    /// Copies a frame into this endpoint's queue; false when full.
    fn deliver(&self, frame: &[u8]) -> bool {
        let mut q = lock(&self.queue);
        if q.frames.len() >= PORT_QUEUE_LEN {
            return false;
        }
        let was_empty = q.frames.is_empty();
        // Warm-up only: the pool grows to the queue length, then buffers circulate.
        let mut b = q.spare.pop().unwrap_or_default();
        b.fill_from(frame);
        q.frames.push_back(b);
        drop(q);
        if was_empty {
            // Only an overflowing counter fails, and it is readable then.
            let _ = self.event.write(1);
        }
        true
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_dev: u64,
    /// Every endpoint; the first endpoint of each device is its flood target.
    endpoints: Vec<(Arc<Endpoint>, bool)>,
    table: HashMap<MacAddr, Arc<Endpoint>>,
}

/// One named switch.
#[derive(Debug)]
pub struct Switch {
    name: String,
    inner: Mutex<Inner>,
}

impl Switch {
    /// The switch called `name` in this process, created on first use.
    pub fn get(name: &str) -> Arc<Switch> {
        let mut all = lock(&SWITCHES);
        if let Some(s) = all.get(name).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(Switch {
            name: name.to_string(),
            inner: Mutex::new(Inner::default()),
        });
        all.retain(|_, w| w.strong_count() > 0);
        all.insert(name.to_string(), Arc::downgrade(&s));
        s
    }

    /// Joins a device with `pairs` queue pairs; its MAC is learned at once so
    /// the first frame towards it is not flooded.
    pub fn attach(self: &Arc<Self>, pairs: usize, mac: MacAddr) -> Result<Vec<SwitchPort>> {
        let mut inner = lock(&self.inner);
        let dev = inner.next_dev;
        inner.next_dev += 1;
        let mut ports = Vec::with_capacity(pairs);
        for i in 0..pairs.max(1) {
            let ep = Arc::new(Endpoint {
                dev,
                queue: Mutex::new(EpQueue::default()),
                event: ioasis::eventfd::nonblocking().map_err(Error::EventFd)?,
            });
            inner.endpoints.push((ep.clone(), i == 0));
            if i == 0 && inner.table.len() < MAX_LEARNED_MACS {
                inner.table.insert(mac, ep.clone());
            }
            ports.push(SwitchPort {
                sw: self.clone(),
                ep,
            });
        }
        Ok(ports)
    }

    /// Number of endpoints joined.
    pub fn endpoints(&self) -> usize {
        lock(&self.inner).endpoints.len()
    }
}

/// One queue pair's endpoint on a switch.
#[derive(Debug)]
pub struct SwitchPort {
    sw: Arc<Switch>,
    ep: Arc<Endpoint>,
}

impl Drop for SwitchPort {
    fn drop(&mut self) {
        let mut inner = lock(&self.sw.inner);
        inner.endpoints.retain(|(e, _)| !Arc::ptr_eq(e, &self.ep));
        inner.table.retain(|_, e| !Arc::ptr_eq(e, &self.ep));
    }
}

impl Port for SwitchPort {
    fn describe(&self) -> String {
        format!("switch={}", self.sw.name)
    }

    fn send(&mut self, pkts: &mut [PacketBuf]) -> SendOutcome {
        let mut out = SendOutcome::default();
        let mut inner = lock(&self.sw.inner);
        for p in pkts.iter() {
            let f = p.frame();
            if f.len() < 14 {
                out.errors += 1;
                continue;
            }
            let mut src = [0u8; 6];
            src.copy_from_slice(&f[6..12]);
            if src[0] & 1 == 0 {
                let known = inner
                    .table
                    .get(&src)
                    .is_some_and(|e| Arc::ptr_eq(e, &self.ep));
                if !known
                    && (inner.table.len() < MAX_LEARNED_MACS || inner.table.contains_key(&src))
                {
                    inner.table.insert(src, self.ep.clone());
                }
            }
            // The header goes along: offloads stay meaningful end to end, but
            // num_buffers belongs to the receiving ring.
            let data = p.as_slice();
            let dst = &f[..6];
            let target = if dst[0] & 1 == 0 {
                inner.table.get(dst)
            } else {
                None
            };
            let delivered = match target {
                Some(t) if t.dev == self.ep.dev => false,
                Some(t) => t.deliver(data),
                None => {
                    let mut any = false;
                    for (e, flood) in inner.endpoints.iter() {
                        if *flood && e.dev != self.ep.dev {
                            any |= e.deliver(data);
                        }
                    }
                    any
                }
            };
            if delivered {
                out.sent += 1;
            } else {
                out.dropped += 1;
            }
        }
        out
    }

    fn recv(&mut self, max: usize, deliver: &mut dyn FnMut(&mut [u8]) -> bool) -> Result<usize> {
        // Consumes the readiness (an empty counter fails: nothing to clear).
        let _ = self.ep.event.read();
        let mut q = lock(&self.ep.queue);
        let mut n = 0;
        while n < max {
            let Some(front) = q.frames.front_mut() else {
                break;
            };
            if let Some(h) = front.as_mut_slice().get_mut(10..VNET_HDR_LEN) {
                h.fill(0);
            }
            if !deliver(front.as_mut_slice()) {
                break;
            }
            if let Some(b) = q.frames.pop_front() {
                q.spare.push(b);
            }
            n += 1;
        }
        if n == max && !q.frames.is_empty() {
            // Stopped by the caller's limit, not for lack of buffers: the
            // readiness was consumed above, so raise it again.
            let _ = self.ep.event.write(1);
        }
        Ok(n)
    }

    fn rx_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(ioasis::eventfd::borrow(&self.ep.event))
    }

    fn reset(&mut self) {
        let mut q = lock(&self.ep.queue);
        while let Some(b) = q.frames.pop_front() {
            q.spare.push(b);
        }
        drop(q);
        let _ = self.ep.event.read();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: MacAddr, src: MacAddr) -> PacketBuf {
        let mut v = vec![0u8; VNET_HDR_LEN + 60];
        v[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&dst);
        v[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12].copy_from_slice(&src);
        let mut b = PacketBuf::new();
        b.fill_from(&v);
        b
    }

    fn drain(p: &mut SwitchPort) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        p.recv(64, &mut |f| {
            v.push(f.to_vec());
            true
        })
        .unwrap();
        v
    }

    const A: MacAddr = [2, 0, 0, 0, 0, 0xa];
    const B: MacAddr = [2, 0, 0, 0, 0, 0xb];
    const C: MacAddr = [2, 0, 0, 0, 0, 0xc];

    #[test]
    fn test_switch_unicast_to_known_mac() {
        let sw = Switch::get("test-unicast");
        let mut a = sw.attach(1, A).unwrap().remove(0);
        let mut b = sw.attach(1, B).unwrap().remove(0);
        let mut c = sw.attach(1, C).unwrap().remove(0);
        let o = a.send(&mut [frame(B, A)]);
        assert_eq!(o.sent, 1);
        assert_eq!(drain(&mut b).len(), 1);
        assert!(drain(&mut c).is_empty(), "known unicast is not flooded");
        assert!(drain(&mut a).is_empty());
    }

    #[test]
    fn test_switch_floods_broadcast_and_unknown() {
        let sw = Switch::get("test-flood");
        let mut a = sw.attach(1, A).unwrap().remove(0);
        let mut b = sw.attach(2, B).unwrap();
        let mut c = sw.attach(1, C).unwrap().remove(0);
        a.send(&mut [frame([0xff; 6], A), frame([2, 9, 9, 9, 9, 9], A)]);
        assert_eq!(drain(&mut b[0]).len(), 2);
        assert!(
            drain(&mut b[1]).is_empty(),
            "flood goes to the first pair only"
        );
        assert_eq!(drain(&mut c).len(), 2);
        assert!(drain(&mut a).is_empty(), "no hairpin");
        // b learned on its second pair: replies to it land there.
        b[1].send(&mut [frame(A, [2, 0, 0, 0, 1, 0xb])]);
        assert_eq!(drain(&mut a).len(), 1);
        a.send(&mut [frame([2, 0, 0, 0, 1, 0xb], A)]);
        assert_eq!(drain(&mut b[1]).len(), 1);
        assert_eq!(sw.endpoints(), 4);
        drop(b);
        assert_eq!(sw.endpoints(), 2);
    }

    #[test]
    fn test_switch_alone_drops_and_rejects_runts() {
        let sw = Switch::get("test-alone");
        let mut a = sw.attach(1, A).unwrap().remove(0);
        let mut runt = PacketBuf::new();
        runt.fill_from(&[0u8; VNET_HDR_LEN + 5]);
        let o = a.send(&mut [frame([0xff; 6], A), runt]);
        assert_eq!(
            o,
            SendOutcome {
                sent: 0,
                dropped: 1,
                errors: 1
            }
        );
    }

    #[test]
    fn test_switch_same_name_is_shared() {
        let s1 = Switch::get("test-shared");
        let s2 = Switch::get("test-shared");
        assert!(Arc::ptr_eq(&s1, &s2));
        let s3 = Switch::get("test-other");
        assert!(!Arc::ptr_eq(&s1, &s3));
    }

    fn readable(fd: BorrowedFd<'_>) -> bool {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, zero timeout.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r == 1
    }

    #[test]
    fn test_switch_readiness_raised_again_when_limit_hit() {
        let sw = Switch::get("test-resignal");
        let mut a = sw.attach(1, A).unwrap().remove(0);
        let mut b = sw.attach(1, B).unwrap().remove(0);
        let mut batch: Vec<PacketBuf> = (0..10).map(|_| frame(B, A)).collect();
        a.send(&mut batch);
        assert!(readable(b.rx_fd().unwrap()));
        assert_eq!(b.recv(4, &mut |_| true).unwrap(), 4);
        assert!(readable(b.rx_fd().unwrap()), "frames left: still readable");
        assert_eq!(b.recv(4, &mut |_| false).unwrap(), 0);
        assert!(
            !readable(b.rx_fd().unwrap()),
            "refused: wait for the driver"
        );
        assert_eq!(b.recv(64, &mut |_| true).unwrap(), 6);
    }

    #[test]
    fn test_switch_queue_bounded() {
        let sw = Switch::get("test-bounded");
        let mut a = sw.attach(1, A).unwrap().remove(0);
        let mut b = sw.attach(1, B).unwrap().remove(0);
        let mut dropped = 0;
        for _ in 0..(PORT_QUEUE_LEN / 64 + 1) {
            let mut batch: Vec<PacketBuf> = (0..64).map(|_| frame(B, A)).collect();
            dropped += a.send(&mut batch).dropped;
        }
        assert_eq!(dropped, 64);
        assert_eq!(b.recv(usize::MAX, &mut |_| true).unwrap(), PORT_QUEUE_LEN);
    }
}
