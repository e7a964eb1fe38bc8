//! The virtio-blk config space and feature bits (virtio 1.2, 5.2).

use vm_memory::ByteValued;

/// `VIRTIO_ID_BLOCK`.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Sector size of the virtio-blk protocol (request offsets, capacity).
pub const SECTOR_SIZE: u64 = 512;
/// `VIRTIO_BLK_F_SIZE_MAX`: `size_max` is valid.
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
/// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// `VIRTIO_BLK_F_RO`: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// `VIRTIO_BLK_F_FLUSH`: cache flush command.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// `VIRTIO_BLK_F_TOPOLOGY`: topology fields are valid.
pub const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
/// `VIRTIO_BLK_F_MQ`: `num_queues` is valid.
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
/// `VIRTIO_BLK_F_DISCARD`: discard command and its limits.
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
/// `VIRTIO_BLK_F_WRITE_ZEROES`: write-zeroes command and its limits.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

/// Largest data segment the device accepts (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest discard or write-zeroes request, in sectors (1 GiB).
pub const MAX_ZERO_SECTORS: u32 = 1 << 21;
/// Segments per discard or write-zeroes request.
pub const MAX_ZERO_SEGS: u32 = 1;

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` (and its
/// padding), little-endian fields. 60 bytes.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioBlkConfig {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment in bytes.
    pub size_max: u32,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Geometry: cylinders.
    pub cylinders: u16,
    /// Geometry: heads.
    pub heads: u8,
    /// Geometry: sectors.
    pub sectors: u8,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in blocks.
    pub opt_io_size: u32,
    /// Writeback cache mode (CONFIG_WCE; not offered).
    pub writeback: u8,
    /// Padding.
    pub unused0: u8,
    /// Request queues (MQ).
    pub num_queues: u16,
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// Most discard segments per request.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// Write-zeroes may deallocate (unmap flag honoured).
    pub write_zeroes_may_unmap: u8,
    /// Padding.
    pub unused1: [u8; 3],
}

// SAFETY: plain integers, packed (no padding), any bit pattern is valid.
unsafe impl ByteValued for VirtioBlkConfig {}

const _: () = assert!(std::mem::size_of::<VirtioBlkConfig>() == 60);

/// What the config space is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Disk size in bytes (a multiple of 512 is used; the tail is ignored).
    pub size: u64,
    /// Logical block size (512 or the block device's).
    pub blk_size: u32,
    /// Request queues.
    pub queues: u16,
    /// Negotiable queue size (seg_max follows it).
    pub queue_size: u16,
}

impl VirtioBlkConfig {
    /// The config space of a disk of `g` (multi-byte fields little-endian).
    pub fn new(g: Geometry) -> VirtioBlkConfig {
        let blk_sectors = (u64::from(g.blk_size) / SECTOR_SIZE).max(1) as u32;
        VirtioBlkConfig {
            capacity: (g.size / SECTOR_SIZE).to_le(),
            size_max: SIZE_MAX.to_le(),
            seg_max: seg_max(g.queue_size).to_le(),
            blk_size: g.blk_size.to_le(),
            num_queues: g.queues.to_le(),
            max_discard_sectors: MAX_ZERO_SECTORS.to_le(),
            max_discard_seg: MAX_ZERO_SEGS.to_le(),
            discard_sector_alignment: blk_sectors.to_le(),
            max_write_zeroes_sectors: MAX_ZERO_SECTORS.to_le(),
            max_write_zeroes_seg: MAX_ZERO_SEGS.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
    }
}

/// Data segments per request for a queue of `queue_size` descriptors: the
/// header and the status take two (QEMU's choice too).
pub fn seg_max(queue_size: u16) -> u32 {
    u32::from(queue_size).saturating_sub(2).max(1)
}
