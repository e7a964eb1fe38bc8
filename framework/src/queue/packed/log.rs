//! Dirty logging of a packed ring's writes while the frontend migrates the
//! guest: a completion's buffers (the first `len` bytes of the writable
//! buffers its chain had when popped, kept per buffer id since the ring
//! slots may be overwritten by then), and the descriptor ring and device
//! area the used descriptors and event suppression went to, logged whole
//! when the queue handle is dropped. Through the same DMA probe and log
//! as the split ring's (see `queue/log.rs`).

use virtio_queue::QueueT;

use super::desc::{DESC_LEN, EVENT_LEN};
use crate::dirty_log::DirtyLog;
use crate::queue::log::log_iova;
use crate::queue::Queue;

impl Queue<'_> {
    /// Logs the first `len` bytes of buffer `id`'s writable buffers.
    #[cold]
    #[inline(never)]
    pub(super) fn packed_log_buffer(&self, log: &DirtyLog, id: u16, len: u32) {
        if cfg!(ioasis_broken = "nolog") {
            return;
        }
        let Some(p) = self.vring.packed.as_ref() else {
            return;
        };
        let Some(&(addr, blen, more)) = p.writable.get(usize::from(id)) else {
            return;
        };
        let rest = p.writable_more.get(usize::from(id)).filter(|_| more > 0);
        let bufs = std::iter::once((addr, blen)).chain(rest.into_iter().flatten().copied());
        let mut left = u64::from(len);
        for (addr, blen) in bufs {
            if left == 0 {
                break;
            }
            let n = left.min(u64::from(blen));
            log_iova(log, self.dma, addr, n);
            left -= n;
        }
    }

    /// Logs the descriptor ring and the device area.
    #[cold]
    #[inline(never)]
    pub(in crate::queue) fn packed_log_rings(&self, log: &DirtyLog) {
        let size = u64::from(self.vring.q.size());
        log_iova(log, self.dma, self.vring.q.desc_table(), DESC_LEN * size);
        log_iova(log, self.dma, self.vring.q.used_ring(), EVENT_LEN);
    }
}
