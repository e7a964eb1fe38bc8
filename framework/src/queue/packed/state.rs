//! A packed ring's device-side state, kept with the queue between
//! handles: where the device reads the next available descriptor and
//! writes the next used one, each with its wrap counter; the descriptors
//! each outstanding buffer took (a used descriptor moves the used position
//! past all of them); and the ring state's encoding in `GET_VRING_BASE` /
//! `SET_VRING_BASE`.

use crate::queue::Desc;

/// The device's side of one packed ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PackedState {
    /// Ring slot of the next descriptor to read (`< size`).
    pub(crate) avail_idx: u16,
    /// The driver's wrap counter for the lap `avail_idx` is in.
    pub(crate) avail_wrap: bool,
    /// Ring slot the next used descriptor is written to (`< size`).
    pub(crate) used_idx: u16,
    /// The device's wrap counter for the lap `used_idx` is in.
    pub(crate) used_wrap: bool,
    /// Per buffer id: ring descriptors its chain took (0: not outstanding).
    pub(crate) ndescs: Vec<u16>,
    /// Per buffer id: its chain's first device-writable buffer (address,
    /// length; length 0: none) and how many more it has, for the dirty log
    /// (the ring slots may already be overwritten by used descriptors when
    /// the buffer completes, so they are kept from the pop). One flat store
    /// per pop; a chain with more writable buffers keeps the rest in
    /// `writable_more`.
    pub(crate) writable: Vec<(u64, u32, u16)>,
    /// Per buffer id: the writable buffers after the first, when there are.
    pub(crate) writable_more: Vec<Vec<(u64, u32)>>,
    /// Ring descriptors of the last chains popped, a ring of `size`
    /// entries indexed by pop count: what [`Queue::unpop`] rolls back.
    ///
    /// [`Queue::unpop`]: crate::queue::Queue::unpop
    pub(crate) recent: Vec<u16>,
    /// Pops recorded (modulo `size`): `recent`'s write position.
    pub(crate) pops: u16,
    /// Whether the pops record their ring descriptors in `recent`: off
    /// until the first chain of more than one descriptor is popped (which
    /// fills in the ones before it that [`Queue::unpop`] may reach), so
    /// while it is off every chain popped took one and `n` chains took `n`
    /// descriptors; the pops of one-descriptor chains record nothing and
    /// leave `pops` as it is (scripts/count-net.sh --packed).
    ///
    /// [`Queue::unpop`]: crate::queue::Queue::unpop
    pub(crate) recent_kept: bool,
    /// Used descriptors of the current batch, not yet written: all are
    /// written when the batch is published, the first one's flags last
    /// after a release fence, so the driver sees the whole batch at once
    /// and the descriptor ring's lines (which the driver polls and refills)
    /// are written in one go, not between the device's buffer copies.
    pub(crate) shadow: Vec<UsedEntry>,
    /// The first used descriptor of the current batch when the batch was
    /// written to the ring as it was completed (a batch of completions
    /// without the dirty log or inflight tracking, see
    /// `write_used_all`): its slot and flags, its id and length
    /// already written, its flags written at publication, last, after a
    /// release fence. The batch's other descriptors, written whole, stay
    /// unseen until then: the driver reads the used descriptors in ring
    /// order from this one. `shadow` entries, if any, follow it.
    pub(crate) gate: Option<(u16, u16)>,
    /// Used descriptors of the current batch written to the ring already
    /// (the `gate` one and those after it), beside the `shadow` ones.
    pub(crate) written: u16,
    /// The used position at the last notification check (slot, wrap),
    /// for `RING_EVENT_FLAGS_DESC`.
    pub(crate) signalled: Option<(u16, bool)>,
    /// Ring descriptors used since the last notification check.
    pub(crate) since_signal: u32,
}

impl Default for PackedState {
    fn default() -> Self {
        Self::new()
    }
}

impl PackedState {
    /// A ring at its start: both positions at slot 0 with wrap counters
    /// set (the spec's initial state).
    pub(crate) fn new() -> Self {
        PackedState {
            avail_idx: 0,
            avail_wrap: true,
            used_idx: 0,
            used_wrap: true,
            ndescs: Vec::new(),
            writable: Vec::new(),
            writable_more: Vec::new(),
            recent: Vec::new(),
            pops: 0,
            recent_kept: false,
            shadow: Vec::new(),
            gate: None,
            written: 0,
            signalled: None,
            since_signal: 0,
        }
    }

    /// Sizes the per-id tables for a ring of `size` (once per size).
    #[inline(always)]
    pub(crate) fn fit(&mut self, size: u16) {
        if self.ndescs.len() != usize::from(size) {
            self.resize(size);
        }
    }

    #[cold]
    #[inline(never)]
    fn resize(&mut self, size: u16) {
        let n = usize::from(size);
        self.ndescs = vec![0; n];
        self.writable = vec![(0, 0, 0); n];
        self.writable_more = vec![Vec::new(); n];
        self.recent = vec![0; n];
        self.pops = 0;
        self.shadow.reserve(n);
    }

    /// What [`writable`](PackedState::writable) keeps of buffer `id`'s
    /// chain of `descs` (more than one descriptor): its first writable
    /// buffer with bytes, the others in `writable_more`.
    pub(crate) fn keep_writables(&mut self, id: u16, descs: &[Desc]) -> (u64, u32, u16) {
        let mut first = (0, 0, 0u16);
        for d in descs.iter().filter(|d| d.writable && d.len > 0) {
            if first.1 == 0 {
                first = (d.addr, d.len, 0);
            } else {
                if first.2 == 0 {
                    self.writable_more[usize::from(id)].clear();
                }
                first.2 += 1;
                self.writable_more[usize::from(id)].push((d.addr, d.len));
            }
        }
        first
    }

    /// The state as `GET_VRING_BASE` carries it for a packed ring: bits
    /// 0-14 the next available slot, bit 15 its wrap counter, bits 16-30
    /// the next used slot, bit 31 its wrap counter (the vhost-user spec's
    /// layout, which QEMU reads back the same way).
    pub(crate) fn base(&self) -> u32 {
        let half = |idx: u16, wrap: bool| u32::from(idx & 0x7fff) | (u32::from(wrap) << 15);
        half(self.avail_idx, self.avail_wrap) | (half(self.used_idx, self.used_wrap) << 16)
    }

    /// Restores the state from `SET_VRING_BASE`'s `num` ([`base`]'s
    /// layout). A frontend that sends only the low half (DPDK's
    /// virtio_user, and any frontend starting a ring afresh) means the used
    /// position is the available one: nothing was in flight. Per-chain
    /// bookkeeping starts empty.
    ///
    /// [`base`]: PackedState::base
    pub(crate) fn set_base(&mut self, num: u32) {
        let avail = (num & 0xffff) as u16;
        let used = if num >> 16 == 0 {
            avail
        } else {
            (num >> 16) as u16
        };
        self.avail_idx = avail & 0x7fff;
        self.avail_wrap = avail & 0x8000 != 0;
        self.used_idx = used & 0x7fff;
        self.used_wrap = used & 0x8000 != 0;
        self.ndescs.iter_mut().for_each(|n| *n = 0);
        self.pops = 0;
        self.shadow.clear();
        self.gate = None;
        self.written = 0;
        self.signalled = None;
        self.since_signal = 0;
    }

    /// Adds a used descriptor for buffer `id` (`len` bytes written,
    /// covering `n` ring descriptors, at least 1) to the batch at the used
    /// position, and moves the position past them. Nothing is written to
    /// the ring until the batch is published.
    #[inline]
    pub(crate) fn push_used(&mut self, id: u16, len: u32, n: u16, size: u16) {
        let slot = self.used_idx;
        self.shadow.push(UsedEntry {
            slot,
            id,
            len,
            flags: super::desc::used_flags(self.used_wrap, len > 0),
        });
        let n = n.clamp(1, size.max(1));
        (self.used_idx, self.used_wrap) = advance(slot, self.used_wrap, n, size);
        self.since_signal = self.since_signal.saturating_add(u32::from(n));
        if let Some(c) = self.ndescs.get_mut(usize::from(id)) {
            *c = 0;
        }
    }

    /// [`push_used`](PackedState::push_used) for each (`id`, `len`) of
    /// `used`, in order, the used position and the count since the last
    /// signal kept in registers through the batch (the batch completions'
    /// path: scripts/count-net.sh --packed 980.9 -> 956.4 per frame, with
    /// the receive side's batch joining it whole). Each `id` must
    /// be `< size`; the caller checked the batch has room.
    #[inline(always)]
    pub(crate) fn push_used_all(&mut self, used: impl Iterator<Item = (u16, u32)>, size: u16) {
        let (mut slot, mut wrap, mut since) = (self.used_idx, self.used_wrap, self.since_signal);
        for (id, len) in used {
            let c = self.ndescs.get_mut(usize::from(id));
            let n = c.as_ref().map_or(0, |c| **c).clamp(1, size.max(1));
            if let Some(c) = c {
                *c = 0;
            }
            self.shadow.push(UsedEntry {
                slot,
                id,
                len,
                flags: super::desc::used_flags(wrap, len > 0),
            });
            (slot, wrap) = advance(slot, wrap, n, size);
            since = since.saturating_add(u32::from(n));
        }
        (self.used_idx, self.used_wrap, self.since_signal) = (slot, wrap, since);
    }

    /// Used descriptors in the current batch, not yet published (written
    /// to the ring or not).
    #[inline(always)]
    pub(crate) fn batched(&self) -> usize {
        self.shadow.len() + usize::from(self.written)
    }

    /// The next available position as one 16-bit value (slot, wrap in bit
    /// 15), what [`Queue::next_avail`](crate::queue::Queue::next_avail)
    /// reports for a packed ring.
    pub(crate) fn next_avail(&self) -> u16 {
        self.avail_idx | (u16::from(self.avail_wrap) << 15)
    }

    /// The next used position, as [`next_avail`](PackedState::next_avail).
    pub(crate) fn next_used(&self) -> u16 {
        self.used_idx | (u16::from(self.used_wrap) << 15)
    }
}

/// A used descriptor waiting for its batch's publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UsedEntry {
    /// Ring slot.
    pub(crate) slot: u16,
    /// Buffer id.
    pub(crate) id: u16,
    /// Bytes written.
    pub(crate) len: u32,
    /// Flags (the device's lap, `WRITE` if written).
    pub(crate) flags: u16,
}

/// Moves ring position (`idx`, `wrap`) forward by `n <= size` slots,
/// flipping the wrap counter when it passes the ring's end.
#[inline]
pub(crate) fn advance(idx: u16, wrap: bool, n: u16, size: u16) -> (u16, bool) {
    let next = u32::from(idx) + u32::from(n);
    if next >= u32::from(size) {
        ((next - u32::from(size)) as u16, !wrap)
    } else {
        (next as u16, wrap)
    }
}

/// Moves ring position (`idx`, `wrap`) back by `n <= size` slots.
#[inline]
pub(crate) fn retreat(idx: u16, wrap: bool, n: u16, size: u16) -> (u16, bool) {
    if n > idx {
        (idx + size - n, !wrap)
    } else {
        (idx - n, wrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_base_round_trips_both_positions_and_wrap_counters() {
        let mut s = PackedState::new();
        s.avail_idx = 5;
        s.avail_wrap = false;
        s.used_idx = 3;
        s.used_wrap = true;
        let num = s.base();
        assert_eq!(num, 5 | (3 << 16) | (1 << 31));
        let mut t = PackedState::new();
        t.set_base(num);
        assert_eq!(
            (t.avail_idx, t.avail_wrap, t.used_idx, t.used_wrap),
            (5, false, 3, true)
        );
    }

    #[test]
    fn test_low_half_only_means_used_is_avail() {
        // DPDK's virtio_user starts a packed ring with 0x8000.
        let mut t = PackedState::new();
        t.set_base(0x8000);
        assert_eq!(
            (t.avail_idx, t.avail_wrap, t.used_idx, t.used_wrap),
            (0, true, 0, true)
        );
        t.set_base(7);
        assert_eq!(
            (t.avail_idx, t.avail_wrap, t.used_idx, t.used_wrap),
            (7, false, 7, false)
        );
    }

    #[test]
    fn test_advance_and_retreat_flip_the_wrap_counter_at_the_end() {
        assert_eq!(advance(14, true, 2, 16), (0, false));
        assert_eq!(advance(3, true, 16, 16), (3, false));
        assert_eq!(advance(3, false, 4, 16), (7, false));
        assert_eq!(retreat(0, false, 2, 16), (14, true));
        assert_eq!(retreat(5, true, 5, 16), (0, true));
        assert_eq!(retreat(3, true, 16, 16), (3, false));
    }
}
