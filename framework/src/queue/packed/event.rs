//! Event suppression on a packed ring, both ways. The driver's structure
//! (driver area) says whether it wants an interrupt: always, never, or,
//! with `VIRTIO_RING_F_EVENT_IDX`, once the used position passes the
//! descriptor it names (`off_wrap`: slot and wrap counter). The device's
//! (device area) says the same about kicks: the device disables them while
//! it polls and re-enables them before it sleeps, naming the next
//! available slot when descriptor events were negotiated.

use std::sync::atomic::{fence, Ordering};

use virtio_queue::QueueT;

use super::desc::{is_avail, EVENT_F_DESC, EVENT_F_DISABLE, EVENT_F_ENABLE};
use super::ring::{HostRing, Mem, RingMem};
use crate::queue::{Queue, QueueError, Result};

/// Whether the driver asked to hear of used descriptors up to `new`
/// (slot in the lap `wrap`) having heard of those up to `old`, given its
/// event structure (`off_wrap`, `flags`); `moved` ring descriptors were
/// used since `old`. As the virtio spec's `vring_need_event` on the
/// packed ring's positions (and DPDK's vhost).
pub(crate) fn needs_event(
    event_idx: bool,
    driver: (u16, u16),
    old: Option<(u16, bool)>,
    new: (u16, bool),
    moved: u32,
    size: u16,
) -> bool {
    let (off_wrap, flags) = driver;
    if flags == EVENT_F_DISABLE {
        return false;
    }
    if !event_idx || flags != EVENT_F_DESC {
        return true;
    }
    let Some((old, _)) = old else {
        return true;
    };
    if moved == 0 {
        return false;
    }
    if moved >= u32::from(size) {
        return true;
    }
    let size = i32::from(size);
    let new_i = i32::from(new.0);
    let mut old = i32::from(old);
    if new_i <= old {
        old -= size;
    }
    let mut off = i32::from(off_wrap & 0x7fff);
    if new.1 != (off_wrap & 0x8000 != 0) {
        off -= size;
    }
    // vring_need_event(event, new, old) on 16 bits.
    ((new_i - off - 1) as u16) < ((new_i - old) as u16)
}

impl<'a> Queue<'a> {
    /// [`Queue::notify`] on a packed ring.
    pub(in crate::queue) fn packed_notify(&mut self) -> Result<()> {
        self.packed_publish();
        self.vring.num_added = 0;
        // The used descriptors must be visible before the driver's
        // suppression state is read (the driver does the converse).
        fence(Ordering::SeqCst);
        let event_idx = self.vring.q.event_idx_enabled();
        let size = self.vring.q.size();
        let driver = match self.rings {
            Some(r) => HostRing::new(r).driver_event(),
            None => self.packed_dma_ring().driver_event(),
        };
        // If the structure cannot be read, signalling is the safe choice.
        let driver = driver.unwrap_or((0, EVENT_F_ENABLE));
        let Some(p) = self.vring.packed.as_mut() else {
            return Ok(());
        };
        let new = (p.used_idx, p.used_wrap);
        let needed = needs_event(event_idx, driver, p.signalled, new, p.since_signal, size);
        p.signalled = Some(new);
        p.since_signal = 0;
        if needed {
            self.signal()?;
        }
        Ok(())
    }

    /// [`Queue::enable_notification`] on a packed ring. Returns true if a
    /// chain is available meanwhile.
    pub(in crate::queue) fn packed_enable_notification(&mut self) -> Result<bool> {
        let r = match self.rings {
            Some(r) => self.packed_enable_in(&HostRing::new(r)),
            None => {
                let ring = self.packed_dma_ring();
                self.packed_enable_in(&ring)
            }
        };
        r.map_err(|e| QueueError::Ring {
            queue: self.index,
            msg: e.to_string(),
        })
    }

    fn packed_enable_in<R: RingMem>(&mut self, ring: &R) -> Mem<bool> {
        let Some(p) = self.vring.packed.as_ref() else {
            return Ok(false);
        };
        let (idx, wrap) = (p.avail_idx, p.avail_wrap);
        if self.vring.q.event_idx_enabled() {
            ring.set_device_off_wrap(idx | (u16::from(wrap) << 15))?;
            fence(Ordering::Release);
            ring.set_device_flags(EVENT_F_DESC)?;
        } else {
            ring.set_device_flags(EVENT_F_ENABLE)?;
        }
        // The flags must be visible before the ring is read again (the
        // driver writes a descriptor, then reads the flags).
        fence(Ordering::SeqCst);
        Ok(is_avail(ring.flags(idx)?, wrap))
    }

    /// [`Queue::disable_notification`] on a packed ring: writes nothing
    /// when kicks are already off (the line is the driver's).
    pub(in crate::queue) fn packed_disable_notification(&mut self) -> Result<()> {
        let r = match self.rings {
            Some(r) => disable(&HostRing::new(r)),
            None => disable(&self.packed_dma_ring()),
        };
        r.map_err(|e| QueueError::Ring {
            queue: self.index,
            msg: e.to_string(),
        })
    }
}

fn disable<R: RingMem>(ring: &R) -> Mem<()> {
    if ring.device_flags()? != EVENT_F_DISABLE {
        ring.set_device_flags(EVENT_F_DISABLE)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_needs_event_follows_flags_and_descriptor_events() {
        let s = 16;
        // Flags alone.
        assert!(!needs_event(
            true,
            (0, EVENT_F_DISABLE),
            None,
            (1, true),
            1,
            s
        ));
        assert!(needs_event(
            true,
            (0, EVENT_F_ENABLE),
            None,
            (1, true),
            1,
            s
        ));
        assert!(needs_event(
            false,
            (5, EVENT_F_DESC),
            Some((0, true)),
            (1, true),
            1,
            s
        ));
        // Descriptor event at slot 2 of lap 1: used 0 -> 2 has not passed
        // it, 2 -> 3 has.
        let ev = (2 | 0x8000, EVENT_F_DESC);
        assert!(!needs_event(true, ev, Some((0, true)), (2, true), 2, s));
        assert!(needs_event(true, ev, Some((2, true)), (3, true), 1, s));
        // Across the wrap: event at slot 1 of lap 0, used 14 (lap 1) -> 2
        // (lap 0).
        let ev = (1, EVENT_F_DESC);
        assert!(needs_event(true, ev, Some((14, true)), (2, false), 4, s));
        assert!(!needs_event(true, ev, Some((14, true)), (1, false), 3, s));
        // Nothing moved: nothing to tell.
        assert!(!needs_event(true, ev, Some((3, true)), (3, true), 0, s));
    }
}
