//! Notifications both ways: signalling the driver only when it asked to
//! be (`used_event` with `EVENT_IDX`, `VRING_AVAIL_F_NO_INTERRUPT`
//! without), and asking it to kick or not (`VRING_USED_F_NO_NOTIFY`) while
//! the device sleeps or polls.

use std::sync::atomic::{fence, Ordering};

use virtio_queue::QueueT;

use super::ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY};
use super::{Queue, QueueError, Result};

impl<'a> Queue<'a> {
    /// Publishes the used index and signals the driver if it asked to be:
    /// with `EVENT_IDX`, when the used index passed its `used_event`;
    /// without, unless it set `VRING_AVAIL_F_NO_INTERRUPT`.
    pub fn notify(&mut self) -> Result<()> {
        if self.vring.packed.is_some() {
            return self.packed_notify();
        }
        self.publish_used();
        let added = std::mem::take(&mut self.vring.num_added);
        // The used index must be visible before the driver's suppression
        // state is read (the driver does the converse).
        fence(Ordering::SeqCst);
        let needed = match self.rings {
            Some(r) if r.event_idx => {
                let new = self.vring.q.next_used();
                let old = new.wrapping_sub(added);
                added > r.size
                    || new.wrapping_sub(r.used_event()).wrapping_sub(1) < new.wrapping_sub(old)
            }
            Some(r) => r.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT == 0,
            None if self.vring.q.event_idx_enabled() => {
                let dma = self.dma;
                // If the event index cannot be read, signalling is the safe choice.
                self.vring.q.needs_notification(&dma).unwrap_or(true)
            }
            None => {
                let flags: u16 = self
                    .dma
                    .read_obj(self.vring.q.avail_ring())
                    .map(u16::from_le)
                    .unwrap_or(0);
                flags & VRING_AVAIL_F_NO_INTERRUPT == 0
            }
        };
        if needed {
            self.signal()?;
        }
        Ok(())
    }

    /// Publishes the used index and signals the driver unconditionally,
    /// through the device's transport (vhost-user writes the ring's call
    /// eventfd).
    ///
    /// A call eventfd whose counter is full needs no signal (the driver has
    /// one it has not read). One the frontend also made blocking is
    /// forgotten once the write was interrupted ([`crate::peer_write`]):
    /// the queue then signals nothing until the frontend sets a new one.
    pub fn signal(&mut self) -> Result<()> {
        self.publish_used();
        self.transport
            .call(self.index, &mut self.vring.signals, self.writer)
            .map_err(|source| QueueError::Notify {
                queue: self.index,
                source,
            })
    }

    /// Asks the driver to kick again (clears suppression). Returns true if
    /// chains became available meanwhile: process them before sleeping.
    pub fn enable_notification(&mut self) -> Result<bool> {
        if self.vring.packed.is_some() {
            return self.packed_enable_notification();
        }
        let dma = self.dma;
        self.vring
            .q
            .enable_notification(&dma)
            .map_err(|e| QueueError::Ring {
                queue: self.index,
                msg: e.to_string(),
            })
    }

    /// Asks the driver not to kick (the device polls).
    ///
    /// Writes nothing when the driver was already asked: the used ring's
    /// first line is the one the driver polls, and a store to it, even of
    /// the same value, takes it away from the driver's core.
    pub fn disable_notification(&mut self) -> Result<()> {
        if self.vring.packed.is_some() {
            return self.packed_disable_notification();
        }
        if let Some(r) = self.rings {
            if !r.event_idx && r.used_flags() & VRING_USED_F_NO_NOTIFY == 0 {
                r.set_used_flags(VRING_USED_F_NO_NOTIFY);
            }
            // With EVENT_IDX the driver kicks only when the avail index
            // passes `avail_event`, which is left behind while polling.
            return Ok(());
        }
        let dma = self.dma;
        self.vring
            .q
            .disable_notification(&dma)
            .map_err(|e| QueueError::Ring {
                queue: self.index,
                msg: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::queue::fixture::*;
    use crate::queue::Chain;
    use crate::testing::Buf;

    fn avail_flags(f: &Fixture, flags: u16) {
        let off = usize::try_from(f.driver.avail_addr() - RING_IOVA).expect("offset");
        f.ring_mem
            .write_at(off, &flags.to_le_bytes())
            .expect("flags");
    }

    #[test]
    fn test_notify_honours_no_interrupt_without_event_idx() {
        let mut f = fixture(true);
        let call = set_call(&f);
        offer(&mut f, 1, true);
        avail_flags(&f, VRING_AVAIL_F_NO_INTERRUPT);
        let mut chain = Chain::new();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert!(q.pop(&mut chain).expect("pop"));
            q.add_used(chain.head(), 0).expect("used");
            q.notify().expect("notify");
        });
        assert_eq!(f.driver.used_idx().expect("idx"), 1, "published");
        assert!(call.read().is_err(), "no interrupt asked for none");
        avail_flags(&f, 0);
        with_queue(&f, |q| {
            q.expect("queue serving").notify().expect("notify");
        });
        assert_eq!(call.read().expect("signalled"), 1);
    }

    #[test]
    fn test_disable_then_enable_notification_sets_and_clears_no_notify() {
        let f = fixture(true);
        let used = f.driver.used_addr() - RING_IOVA;
        let flags = |f: &Fixture| {
            let mut b = [0u8; 2];
            f.ring_mem.read_at(used as usize, &mut b).expect("read");
            u16::from_le_bytes(b)
        };
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            q.disable_notification().expect("disable");
            q.disable_notification().expect("disable again");
        });
        assert_eq!(flags(&f), VRING_USED_F_NO_NOTIFY);
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert!(
                !q.enable_notification().expect("enable"),
                "nothing available"
            );
        });
        assert_eq!(flags(&f), 0);
    }

    #[test]
    fn test_event_idx_suppresses_until_used_event() {
        let mut f = fixture(true);
        f.vrings[0].1.lock().expect("lock").q.set_event_idx(true);
        let call = set_call(&f);
        for _ in 0..4 {
            f.driver
                .add_chain(&[Buf {
                    addr: BUF_IOVA,
                    len: 16,
                    writable: true,
                }])
                .expect("chain");
        }
        f.driver.publish().expect("publish");
        // The driver wants an interrupt once used passes 2.
        f.driver.set_used_event(2).expect("used event");
        let mut chain = Chain::new();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            for _ in 0..2 {
                assert!(q.pop(&mut chain).expect("pop"));
                q.add_used(chain.head(), 0).expect("used");
            }
            q.notify().expect("notify");
        });
        assert!(call.read().is_err(), "used 2 has not passed used_event 2");
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert!(q.pop(&mut chain).expect("pop"));
            q.add_used(chain.head(), 0).expect("used");
            q.notify().expect("notify");
        });
        assert_eq!(call.read().expect("signalled"), 1);
    }
}
