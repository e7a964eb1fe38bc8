//! Completions: used elements written at the used ring's host address,
//! and the used index published once for a whole burst (release ordering).
//! An in-order device completes a batch with one element.

use virtio_queue::QueueT;

use super::{Queue, QueueError, Result};

impl<'a> Queue<'a> {
    /// The error of a completion naming `head`, which is outside the ring.
    pub(in crate::queue) fn bad_head(&self, head: u16) -> QueueError {
        QueueError::BadHead {
            queue: self.index,
            head,
            size: self.vring.q.size(),
        }
    }

    /// Checks a batch's heads against the ring's size before anything is
    /// completed (split and packed `add_used_batch`): the largest head
    /// first, a loop without exits the compiler does 8 or 16 heads at a
    /// time; the first head outside the ring only when there is one
    /// (scripts/count-net.sh). The error completed none of them.
    #[inline(always)]
    pub(in crate::queue) fn check_heads(
        &self,
        heads: &[u16],
    ) -> std::result::Result<(), (usize, QueueError)> {
        let size = self.vring.q.size();
        let largest = heads.iter().fold(0, |m, &h| m.max(h));
        if !heads.is_empty() && largest >= size {
            let head = heads.iter().find(|&&h| h >= size).map_or(largest, |&h| h);
            return Err((0, self.bad_head(head)));
        }
        Ok(())
    }

    /// Puts `head` on the used ring with `len` bytes written. Call
    /// [`notify`](Queue::notify) after a batch. The used index the driver
    /// sees moves at the next [`notify`](Queue::notify),
    /// [`publish_used`](Queue::publish_used) or when the queue is dropped.
    #[inline]
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<()> {
        // The common case inline: a split ring at its host address, neither
        // logged nor tracked in flight. A call to the general path below
        // cost every completion about 30 instructions of saving and
        // restoring registers (`scripts/count-net.sh`).
        if let (Some(r), None, None, None) = (
            self.rings,
            &self.vring.packed,
            &self.vring.log,
            &self.vring.inflight,
        ) {
            if head < r.size {
                let next = self.vring.q.next_used();
                r.write_used(next & (r.size - 1), u32::from(head), len);
                self.vring.q.set_next_used(next.wrapping_add(1));
                self.vring.num_added = self.vring.num_added.saturating_add(1);
                self.dirty = true;
                return Ok(());
            }
        }
        self.add_used_other(head, len)
    }

    /// [`add_used`](Queue::add_used) of a packed ring, a logged or tracked
    /// one, one reached through virtio-queue, or a head out of range.
    #[inline(never)]
    fn add_used_other(&mut self, head: u16, len: u32) -> Result<()> {
        if self.vring.packed.is_some() {
            return self.packed_add_used(head, len);
        }
        let size = self.vring.q.size();
        if head >= size {
            return Err(self.bad_head(head));
        }
        if let (Some(log), true) = (&self.vring.log, len > 0) {
            // The device wrote the buffers before completing them.
            self.log_chain(log, head, len);
        }
        self.vring.num_added = self.vring.num_added.saturating_add(1);
        if let Some(i) = self.vring.inflight.as_mut() {
            i.used(head);
        }
        if let Some(r) = self.rings {
            let next = self.vring.q.next_used();
            r.write_used(next & (size - 1), u32::from(head), len);
            self.vring.q.set_next_used(next.wrapping_add(1));
            self.dirty = true;
            return Ok(());
        }
        self.dma.clear_fault();
        let dma = self.dma;
        match self.vring.q.add_used(&dma, head, len) {
            Ok(()) => {
                // virtio-queue published the used index.
                let idx = self.vring.q.next_used();
                if let Some(i) = self.vring.inflight.as_mut() {
                    i.published(idx);
                }
                Ok(())
            }
            Err(e) => {
                if let Some(f) = dma.take_fault() {
                    return Err(self.dma_err(f));
                }
                Err(QueueError::Ring {
                    queue: self.index,
                    msg: e.to_string(),
                })
            }
        }
    }

    /// Completes `heads`, chains popped from this queue in this order and
    /// not yet completed, each with nothing written (a transmit queue's
    /// chains). With `VIRTIO_F_IN_ORDER` negotiated, the whole batch is one
    /// used element, the last head's, and the used index moves past all of
    /// them (the batching the virtio spec allows in-order devices); without,
    /// one element per head.
    ///
    /// On error, returns how many of `heads` (a prefix) were completed with
    /// it; a head out of range fails the batch before anything is completed.
    pub fn add_used_batch(
        &mut self,
        heads: &[u16],
    ) -> std::result::Result<(), (usize, QueueError)> {
        if self.vring.packed.is_some() {
            return self.packed_add_used_batch(heads);
        }
        self.check_heads(heads)?;
        let size = self.vring.q.size();
        let (Some(r), true, Some(&last)) = (self.rings, self.vring.in_order, heads.last()) else {
            if let (Some(r), None, None) = (self.rings, &self.vring.log, &self.vring.inflight) {
                // One element per head, the choice of path made once for
                // the batch (a driver without IN_ORDER, such as Linux's or
                // the count's; scripts/count-net.sh: 807.5 -> 784.1 per
                // frame). Every head was checked against the size above.
                let mut next = self.vring.q.next_used();
                for &h in heads {
                    r.write_used(next & (size - 1), u32::from(h), 0);
                    next = next.wrapping_add(1);
                }
                if !heads.is_empty() {
                    self.vring.q.set_next_used(next);
                    let n = u16::try_from(heads.len()).unwrap_or(u16::MAX);
                    self.vring.num_added = self.vring.num_added.saturating_add(n);
                    self.dirty = true;
                }
                return Ok(());
            }
            for (i, &h) in heads.iter().enumerate() {
                self.add_used(h, 0).map_err(|e| (i, e))?;
            }
            return Ok(());
        };
        // A driver cannot have more than `size` chains outstanding.
        let n = u16::try_from(heads.len()).unwrap_or(u16::MAX).min(size);
        if let Some(i) = self.vring.inflight.as_mut() {
            for &h in heads {
                i.used(h);
            }
        }
        let next = self.vring.q.next_used();
        let end = next.wrapping_add(n);
        r.write_used(end.wrapping_sub(1) & (size - 1), u32::from(last), 0);
        self.vring.q.set_next_used(end);
        self.vring.num_added = self.vring.num_added.saturating_add(n);
        self.dirty = true;
        Ok(())
    }

    /// Completes `used`, (head, bytes written) pairs of chains popped from
    /// this queue and not yet completed, in this order: what
    /// [`add_used`](Queue::add_used) does for each, one used element per
    /// head, with the choice of path made once for the batch (a receive
    /// queue's burst; scripts/count-net.sh).
    ///
    /// On error, returns how many of `used` (a prefix) were completed with
    /// it; the rest were not.
    pub fn add_used_lens(
        &mut self,
        used: &[(u16, u32)],
    ) -> std::result::Result<(), (usize, QueueError)> {
        if let (Some(r), None, None, None) = (
            self.rings,
            &self.vring.packed,
            &self.vring.log,
            &self.vring.inflight,
        ) {
            let mut next = self.vring.q.next_used();
            let mut done = 0usize;
            let mut bad = None;
            for &(head, len) in used {
                if head >= r.size {
                    bad = Some(head);
                    break;
                }
                r.write_used(next & (r.size - 1), u32::from(head), len);
                next = next.wrapping_add(1);
                done += 1;
            }
            if done > 0 {
                self.vring.q.set_next_used(next);
                let n = u16::try_from(done).unwrap_or(u16::MAX);
                self.vring.num_added = self.vring.num_added.saturating_add(n);
                self.dirty = true;
            }
            return match bad {
                None => Ok(()),
                Some(head) => Err((done, self.bad_head(head))),
            };
        }
        if self.vring.packed.is_some() {
            return self.packed_add_used_lens(used);
        }
        for (i, &(head, len)) in used.iter().enumerate() {
            self.add_used(head, len).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// Publishes the used index for the elements added so far (one
    /// release-ordered write for a whole burst). [`notify`](Queue::notify)
    /// and dropping the queue do it too.
    pub fn publish_used(&mut self) {
        if self.vring.packed.is_some() {
            return self.packed_publish();
        }
        if std::mem::take(&mut self.dirty) {
            if let Some(r) = self.rings {
                let idx = self.vring.q.next_used();
                r.publish_used(idx);
                if let Some(i) = self.vring.inflight.as_mut() {
                    i.published(idx);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::fixture::*;
    use crate::queue::Chain;
    use crate::testing::Buf;

    #[test]
    fn test_used_index_is_published_once_per_burst() {
        let mut f = fixture(true);
        for i in 0..4u64 {
            f.driver
                .add_chain(&[Buf {
                    addr: BUF_IOVA + i * 0x100,
                    len: 16,
                    writable: true,
                }])
                .expect("chain");
        }
        f.driver.publish().expect("publish");
        let mut chains = vec![Chain::new(); 8];
        let driver = &f.driver;
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert_eq!(q.pop_batch(&mut chains).expect("burst"), 4);
            for c in &chains[..4] {
                q.add_used(c.head(), 16).expect("used");
            }
            assert_eq!(driver.used_idx().expect("idx"), 0, "not yet published");
            q.publish_used();
            assert_eq!(driver.used_idx().expect("idx"), 4);
        });
        for i in 0..4u16 {
            assert_eq!(f.driver.used_elem(i).expect("elem"), (u32::from(i), 16));
        }
    }

    fn add_used_batch_on(in_order: bool) -> Fixture {
        let mut f = fixture(true);
        f.vrings[0].1.lock().expect("lock").in_order = in_order;
        offer(&mut f, 5, false);
        let mut chains: Vec<Chain> = (0..8).map(|_| Chain::new()).collect();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            let b = q.pop_burst(&mut chains);
            assert_eq!(b.popped, 5);
            let heads: Vec<u16> = chains[..5].iter().map(Chain::head).collect();
            q.add_used_batch(&heads).expect("batch");
            q.notify().expect("notify");
        });
        f
    }

    #[test]
    fn test_add_used_batch_in_order_writes_one_element() {
        // Virtio 1.1+ "In-order": an in-order device may complete a batch
        // with one used element carrying the last buffer's id.
        let f = add_used_batch_on(true);
        assert_eq!(f.driver.used_idx().expect("idx"), 5);
        assert_eq!(f.driver.used_elem(4).expect("elem"), (4, 0));
        for i in 0..4 {
            assert_eq!(
                f.driver.used_elem(i).expect("elem"),
                (0, 0),
                "slot {i} untouched"
            );
        }
    }

    #[test]
    fn test_add_used_batch_without_in_order_writes_every_element() {
        let f = add_used_batch_on(false);
        assert_eq!(f.driver.used_idx().expect("idx"), 5);
        for i in 0..5u16 {
            assert_eq!(f.driver.used_elem(i).expect("elem"), (u32::from(i), 0));
        }
    }

    #[test]
    fn test_add_used_lens_writes_each_length_in_order() {
        let mut f = fixture(true);
        offer(&mut f, 4, true);
        let mut chains: Vec<Chain> = (0..8).map(|_| Chain::new()).collect();
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            assert_eq!(q.pop_burst(&mut chains).popped, 4);
            let used: Vec<(u16, u32)> = chains[..3]
                .iter()
                .map(|c| (c.head(), 10 + u32::from(c.head())))
                .collect();
            q.add_used_lens(&used).expect("lens");
            // A head outside the ring ends the batch: the prefix before it
            // is completed, nothing after it.
            let r = q.add_used_lens(&[(chains[3].head(), 5), (99, 1), (0, 1)]);
            assert!(matches!(r, Err((1, QueueError::BadHead { head: 99, .. }))));
            q.notify().expect("notify");
        });
        assert_eq!(f.driver.used_idx().expect("idx"), 4);
        for i in 0..3u16 {
            assert_eq!(
                f.driver.used_elem(i).expect("elem"),
                (u32::from(i), 10 + u32::from(i))
            );
        }
        assert_eq!(f.driver.used_elem(3).expect("elem"), (3, 5));
    }

    #[test]
    fn test_add_used_batch_rejects_bad_head_before_completing() {
        let f = fixture(true);
        f.vrings[0].1.lock().expect("lock").in_order = true;
        with_queue(&f, |q| {
            let mut q = q.expect("queue serving");
            let r = q.add_used_batch(&[0, 1, 99]);
            assert!(matches!(r, Err((0, QueueError::BadHead { head: 99, .. }))));
            q.notify().expect("notify");
        });
        assert_eq!(f.driver.used_idx().expect("idx"), 0);
    }
}
