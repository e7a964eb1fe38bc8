//! The virtio-blk device as the framework sees it: features, config
//! space, one worker thread per queue.

use ioasis::poll::PollMode;
use std::sync::Arc;

use ioasis::config_space::ConfigSpace;
use ioasis::device::{Device, DeviceError, Result, Worker};

use crate::backing::Backing;
use crate::config::{
    Geometry, VirtioBlkConfig, SECTOR_SIZE, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_ID_BLOCK,
};
use crate::request::ID_BYTES;
use crate::stats::DeviceStats;
use crate::worker::BlkWorker;

/// How a disk is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkOptions {
    /// Request queues (one worker thread and one io_uring each).
    pub queues: u16,
    /// Largest queue size the driver may choose.
    pub queue_size: u16,
    /// GET_ID answer (at most 20 bytes; shorter is NUL-padded).
    pub serial: String,
    /// How workers poll after work before they sleep (`--poll-us`).
    pub poll: PollMode,
    /// CPUs the queues' workers are pinned to, round robin (`--worker-cpus`;
    /// empty: not pinned).
    pub worker_cpus: Vec<usize>,
}

/// A virtio-blk device over a [`Backing`].
#[derive(Debug)]
pub struct BlkDevice {
    backing: Arc<Backing>,
    opts: BlkOptions,
    config: ConfigSpace<VirtioBlkConfig>,
    stats: Arc<DeviceStats>,
    serial: [u8; ID_BYTES],
}

impl BlkDevice {
    /// A device serving `backing` as `opts` says.
    pub fn new(backing: Backing, opts: BlkOptions) -> BlkDevice {
        let config = ConfigSpace::new(VirtioBlkConfig::new(Geometry {
            size: backing.size(),
            blk_size: backing.blk_size(),
            queues: opts.queues,
            queue_size: opts.queue_size,
        }));
        let mut serial = [0u8; ID_BYTES];
        let n = opts.serial.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&opts.serial.as_bytes()[..n]);
        BlkDevice {
            stats: Arc::new(DeviceStats::new(usize::from(opts.queues))),
            backing: Arc::new(backing),
            opts,
            config,
            serial,
        }
    }

    /// The device's counters.
    pub fn stats(&self) -> Arc<DeviceStats> {
        self.stats.clone()
    }

    /// The backing store.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// The config space as the driver reads it.
    pub fn config(&self) -> VirtioBlkConfig {
        self.config.get()
    }

    /// Reads the image's size again (the analog of qemu-storage-daemon's
    /// `block_resize`: the image was grown or shrunk under the daemon) and,
    /// if the capacity changed, puts the new one in the config space:
    /// returns the old and new capacity in sectors then (`None`: no
    /// change). Requests are checked against the new size from now on; the
    /// caller tells the driver
    /// ([`ConfigNotifier::notify`](ioasis::config_space::ConfigNotifier::notify)).
    pub fn resize(&self) -> std::io::Result<Option<(u64, u64)>> {
        let size = self.backing.refresh_size()?;
        let new = size / SECTOR_SIZE;
        let mut c = self.config.get();
        let old = u64::from_le(c.capacity);
        if new == old {
            return Ok(None);
        }
        c.capacity = new.to_le();
        self.config.set(c);
        Ok(Some((old, new)))
    }
}

impl Device for BlkDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_MQ;
        if self.backing.read_only() {
            f |= VIRTIO_BLK_F_RO;
        } else {
            f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn num_queues(&self) -> usize {
        usize::from(self.opts.queues)
    }

    fn max_queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    fn worker(&self, _thread: usize) -> Result<Box<dyn Worker>> {
        let w = BlkWorker::new(
            self.backing.clone(),
            self.stats.clone(),
            self.serial,
            self.opts.queue_size,
            self.opts.poll,
        )
        .map_err(|source| DeviceError::Io {
            op: "creating the worker's io_uring",
            source,
        })?;
        Ok(Box::new(w))
    }

    fn config_size(&self) -> u32 {
        self.config.size()
    }

    fn read_config(&self, offset: u32, data: &mut [u8]) -> Result<()> {
        self.config.read(offset, data)
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<()> {
        // Nothing is writable (CONFIG_WCE is not offered).
        self.config.write(offset, data, &[])
    }

    fn inflight_tracking(&self) -> bool {
        // Block requests can be done twice: a restarted daemon resubmits
        // what the killed one had in flight.
        true
    }

    fn worker_cpus(&self, thread: usize) -> Option<Vec<usize>> {
        let cpus = &self.opts.worker_cpus;
        (!cpus.is_empty()).then(|| vec![cpus[thread % cpus.len()]])
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread (and io_uring) per queue.
        (0..self.num_queues().min(64)).map(|i| 1u64 << i).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::ImageSpec;

    #[test]
    fn test_resize_updates_the_capacity_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("disk.img");
        std::fs::write(&p, vec![0u8; 64 * 512]).expect("image");
        let backing = Backing::open(&ImageSpec::File(p.clone()), false).expect("open");
        let d = BlkDevice::new(
            backing,
            BlkOptions {
                queues: 1,
                queue_size: 64,
                serial: String::new(),
                poll: PollMode::default(),
                worker_cpus: Vec::new(),
            },
        );
        assert_eq!(d.resize().expect("same"), None);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_len(200 * 512))
            .expect("grow");
        assert_eq!(d.resize().expect("grown"), Some((64, 200)));
        assert_eq!({ d.config().capacity }, 200u64.to_le());
        let mut cap = [0u8; 8];
        d.read_config(0, &mut cap).expect("read");
        assert_eq!(u64::from_le_bytes(cap), 200);
        assert_eq!(d.backing().size(), 200 * 512);
        assert_eq!(d.resize().expect("again"), None);
    }
}
