//! The notification loop every device repeats: suppress kicks, pop until
//! the ring is empty, signal each completion the driver asks to hear of, re-enable kicks and go
//! round again if the driver added chains meanwhile (the `EVENT_IDX`
//! re-check: without it a chain made available between the last pop and
//! the re-enable would wait for the next kick, which never comes).

use super::{Chain, Queue, Result};

/// What a device's per-chain step tells [`Queue::serve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Go on popping.
    Continue,
    /// The device cannot take more now (its I/O slots are full): stop
    /// popping. Notifications stay suppressed and the rest of the ring
    /// waits; the device calls [`Queue::serve`] again when it can take more
    /// (after completions), so nothing is lost.
    Stop,
}

impl<'a> Queue<'a> {
    /// Pops every available chain into `chain` and hands it to `step`,
    /// which must complete it ([`Queue::add_used`]) or defer it
    /// ([`Queue::defer`]) before returning [`Flow`]. Publishes every
    /// completion as `step` makes it and signals the driver for it if the
    /// driver asked to be (see [`Queue::notify`]), and re-checks the ring
    /// after re-enabling notifications.
    ///
    /// Returns [`Flow::Continue`] when the ring is empty and the driver
    /// will kick for the next chain, [`Flow::Stop`] when chains may be
    /// left: `step` stopped, or the bound of `size + 1` rounds ran out
    /// while a fast driver kept adding chains (it may not kick for those:
    /// it added them while kicks were suppressed). After `Stop` the device
    /// must serve the queue again without waiting for a kick (from
    /// [`Worker::before_sleep`](crate::device::Worker::before_sleep),
    /// answering [`Idle::Poll`](crate::device::Idle::Poll) until it is
    /// done).
    pub fn serve(
        &mut self,
        chain: &mut Chain,
        mut step: impl FnMut(&mut Queue<'a>, &mut Chain) -> Result<Flow>,
    ) -> Result<Flow> {
        for _ in 0..=self.size() {
            self.disable_notification()?;
            if self.pop_all(chain, &mut step)? == Flow::Stop {
                return Ok(Flow::Stop);
            }
            if !self.enable_notification()? {
                return Ok(Flow::Continue);
            }
        }
        Ok(Flow::Stop)
    }

    /// One polling pass: pops every available chain and hands it to `step`
    /// as [`serve`](Queue::serve) does, but leaves the driver's kicks
    /// suppressed. For a worker that keeps polling the ring after work
    /// (see [`crate::poll`]): it serves the queue with
    /// [`serve`](Queue::serve) once more before it sleeps, which re-arms
    /// the kicks and re-checks the ring.
    ///
    /// Returns [`Flow::Stop`] when `step` stopped (chains may be left).
    pub fn poll(
        &mut self,
        chain: &mut Chain,
        mut step: impl FnMut(&mut Queue<'a>, &mut Chain) -> Result<Flow>,
    ) -> Result<Flow> {
        self.disable_notification()?;
        self.pop_all(chain, &mut step)
    }

    /// Pops and steps until the ring is empty or `step` stops, completing
    /// as it goes (see [`serve`](Queue::serve)); signals what is left to
    /// signal at the end.
    fn pop_all(
        &mut self,
        chain: &mut Chain,
        step: &mut impl FnMut(&mut Queue<'a>, &mut Chain) -> Result<Flow>,
    ) -> Result<Flow> {
        let mut flow = Flow::Continue;
        let mut signalled = false;
        while self.pop(chain)? {
            if step(self, chain)? == Flow::Stop {
                flow = Flow::Stop;
                break;
            }
            if self.vring.num_added > 0 {
                // Each completion is published before the next chain is
                // popped, and the first of the pass is signalled (if the
                // driver asked to be): a driver that wakes reaps and
                // refills while the device goes on, rather than both
                // taking turns over whole batches. The rest of the pass is
                // signalled once at its end.
                if signalled {
                    self.publish_used();
                } else {
                    self.notify()?;
                    signalled = true;
                }
            }
        }
        if self.dirty || self.vring.num_added > 0 {
            self.notify()?;
        }
        Ok(flow)
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::queue::fixture::*;

    fn used_flags(f: &Fixture) -> u16 {
        let mut b = [0u8; 2];
        let off = usize::try_from(f.driver.used_addr() - RING_IOVA).expect("offset");
        f.ring_mem.read_at(off, &mut b).expect("read");
        u16::from_le_bytes(b)
    }

    /// A pass over three chains signals the first completion at once and
    /// the other two once at the end (two signals), publishes all three,
    /// and leaves the kicks on.
    #[test]
    fn test_serve_signals_the_first_completion_and_the_rest_once() {
        let mut f = fixture(true);
        let call = set_call(&f);
        offer(&mut f, 3, true);
        let mut chain = Chain::new();
        let mut signals_seen = Vec::new();
        let flow = with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            q.serve(&mut chain, |q, c| {
                q.add_used(c.head(), 1)?;
                // What the driver has been told before the next chain.
                signals_seen.push(call.read().unwrap_or(0));
                Ok(Flow::Continue)
            })
        })
        .expect("serve");
        assert_eq!(flow, Flow::Continue);
        assert_eq!(f.driver.used_idx().expect("idx"), 3);
        // The signal for a completion comes after the step that made it:
        // seen by the second step (the first's), none by the third.
        assert_eq!(signals_seen, vec![0, 1, 0]);
        assert_eq!(call.read().expect("the end's signal"), 1);
        assert_eq!(used_flags(&f), 0, "kicks re-armed");
    }

    /// A polling pass completes what is there and leaves the kicks
    /// suppressed; a later serve re-arms them.
    #[test]
    fn test_poll_leaves_kicks_suppressed() {
        let mut f = fixture(true);
        let _call = set_call(&f);
        offer(&mut f, 2, true);
        let mut chain = Chain::new();
        let step = |q: &mut Queue<'_>, c: &mut Chain| {
            q.add_used(c.head(), 1)?;
            Ok(Flow::Continue)
        };
        with_queue(&f, |q| q.expect("queue serving").poll(&mut chain, step)).expect("poll");
        assert_eq!(f.driver.used_idx().expect("idx"), 2);
        assert_eq!(used_flags(&f), 1, "VRING_USED_F_NO_NOTIFY stays set");
        with_queue(&f, |q| q.expect("queue serving").serve(&mut chain, step)).expect("serve");
        assert_eq!(used_flags(&f), 0);
    }
}
