//! Packed virtqueues (`VIRTIO_F_RING_PACKED`, virtio 1.1+) behind the same
//! [`Queue`](crate::queue::Queue) API as split rings: a worker pops,
//! reads, writes and completes chains the same way whichever layout the
//! driver negotiated; the queue dispatches on the ring's layout.
//!
//! # Why it lives here
//!
//! rust-vmm's virtio-queue (0.18, which the framework builds on) has no
//! packed ring: its pull request for one has been open for a long time.
//! This module is written so that it could be offered there: the wire
//! format ([`desc`]) and the device state with its vhost-user encoding
//! ([`state`]) depend on nothing of the framework, the ring accesses go
//! through one trait ([`ring::RingMem`]) whose DMA implementation is
//! plain `GuestMemory`-style reads and writes, and the operations keep
//! virtio-queue's names and shapes (`pop`, `add_used`,
//! `enable_notification`, `disable_notification`, `needs_notification`
//! as [`event::needs_event`], `next_avail` / `set_next_avail` as the
//! vring base). What ties it to the framework is the queue handle it
//! hangs off (translation of every ring and buffer access through the
//! device's DMA handle, parking on IOTLB misses, error counting, dirty
//! logging), as for the split ring's fast path.
//!
//! # What it does
//!
//! - Descriptor ring with the driver's and the device's wrap counters:
//!   a descriptor is available when its `AVAIL` flag equals the driver's
//!   counter and its `USED` flag does not; used descriptors carry both
//!   flags equal to the device's counter.
//! - Chains of ring descriptors (`NEXT`), the buffer id in the last;
//!   indirect tables (one level); every buffer translated at pop time.
//! - Completions in any order (the used position moves past the
//!   descriptors the completed chain took), batches published with one
//!   release (the batch's first used descriptor's flags written last),
//!   in-order batches completed with one used descriptor.
//! - Event suppression both ways, including descriptor events
//!   (`VIRTIO_RING_F_EVENT_IDX`).
//! - `GET_VRING_BASE` / `SET_VRING_BASE` carry both positions and wrap
//!   counters (bit 15 of each half), see [`state::PackedState::base`].
//! - Malformed chains (wrong wrap counter inside a chain, chains longer
//!   than the ring, bad indirect tables, ids outside the ring) are
//!   completed once with length 0 and counted; the queue goes on.
//!
//! - Inflight tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) in the
//!   region's packed layout: chains in flight are resubmitted by a
//!   restarted backend ([`inflight`]).
//!
//! Not done: ring sizes that are not a power of two (the packed ring allows them;
//! virtio-queue's queue state, which keeps the size, does not).
//!
//! # Layout
//!
//! | file | what |
//! | --- | --- |
//! | `desc.rs` | the descriptor and event structure format, flag rules |
//! | `state.rs` | [`state::PackedState`]: positions, wrap counters, per-id bookkeeping, vring base |
//! | `ring.rs` | [`ring::RingMem`]: the areas at host addresses or through the DMA handle |
//! | `walk.rs` | popping a chain, malformed chains, unpop |
//! | `used.rs` | completions and their publication |
//! | `event.rs` | event suppression both ways |
//! | `inflight.rs` | inflight tracking in the region's packed layout, resubmission after a restart |
//! | `log.rs` | dirty logging of what the packed ring wrote |

pub(crate) mod desc;
pub(crate) mod event;
pub(crate) mod inflight;
mod log;
pub(crate) mod ring;
pub(crate) mod state;
mod used;
mod walk;

#[cfg(test)]
mod tests;

pub(crate) use state::PackedState;
