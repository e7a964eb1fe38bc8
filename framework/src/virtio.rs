//! Bits of the virtio specification that belong to no device type and no
//! transport: the reserved feature bits (24 and up) and the device status
//! bits the framework sets. vhost-user ([`crate::vhost_user`]) and VDUSE
//! ([`crate::vduse`]) both negotiate them; neither transport owns them.
//! Transport-specific bits (`VHOST_F_LOG_ALL`,
//! `VHOST_USER_F_PROTOCOL_FEATURES`) stay with their transport.

/// `VIRTIO_RING_F_INDIRECT_DESC`: descriptors may point at tables of
/// descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`: the used/avail event indexes suppress
/// notifications.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_ACCESS_PLATFORM`: addresses are I/O virtual addresses.
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
/// `VIRTIO_F_RING_PACKED`: packed rings (`crate::queue`'s packed module).
pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;
/// `VIRTIO_F_IN_ORDER`: buffers are used in the order they were made
/// available. Offered only by a device that guarantees it (the framework
/// passes it through); the queue layer then batches used elements in
/// [`Queue::add_used_batch`](crate::queue::Queue::add_used_batch).
pub const VIRTIO_F_IN_ORDER: u64 = 1 << 35;
/// `VIRTIO_CONFIG_S_NEEDS_RESET`: the device hit an error it cannot
/// recover from without a reset.
pub const VIRTIO_CONFIG_S_NEEDS_RESET: u8 = 0x40;
