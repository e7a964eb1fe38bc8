//! The device's configuration: work queue, workers, priorities, faults.

use super::*;

/// Work queue priority of a client by default.
pub const DEFAULT_PRIORITY: u8 = 8;
/// Outstanding I/O page faults per client by default (what the whole device
/// had before faults were budgeted per client).
pub const DEFAULT_FAULTS_PER_CLIENT: u32 = 32;
/// Most outstanding I/O page faults a client may be given.
pub const MAX_FAULTS_PER_CLIENT: u32 = 1024;

/// Device configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Worker threads.
    pub workers: usize,
    /// Work queue size (descriptors), a power of two.
    pub wq_size: u32,
    /// Work queue mode.
    pub wq_mode: WqMode,
    /// Maximum transfer size.
    pub max_xfer: u32,
    /// Maximum batch size.
    pub max_batch: u32,
    /// Work queue priority (1..=15) of every client whose uid
    /// `uid_priority` does not name: set by the daemon's administrator, as
    /// a DSA work queue's priority is (accel-config). A client may ask for
    /// a lower one, never a higher one.
    pub priority: u8,
    /// Work queue priority per client uid (overrides `priority`).
    pub uid_priority: Vec<(u32, u8)>,
    /// I/O page faults each client may have outstanding (raised and not
    /// yet answered and resumed); past it a descriptor that blocks on a
    /// fault completes with 0x04 at once.
    pub faults_per_client: u32,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        DeviceConfig {
            workers: cores.saturating_sub(1).max(1),
            wq_size: 128,
            wq_mode: WqMode::Shared,
            max_xfer: 1 << 31,
            max_batch: 1024,
            priority: DEFAULT_PRIORITY,
            uid_priority: Vec::new(),
            faults_per_client: DEFAULT_FAULTS_PER_CLIENT,
        }
    }
}

impl DeviceConfig {
    /// The administrator's work queue priority for clients of `uid`.
    pub fn priority_of(&self, uid: u32) -> u8 {
        self.uid_priority
            .iter()
            .rev()
            .find(|(u, _)| *u == uid)
            .map_or(self.priority, |(_, p)| *p)
    }

    /// The priority a client of `uid` that asked for `requested` gets: the
    /// administrator's for its uid, or lower if it asked for lower (0:
    /// whatever the administrator set).
    pub fn grant_priority(&self, uid: u32, requested: u32) -> u8 {
        let admin = self.priority_of(uid);
        match u8::try_from(requested) {
            Ok(r) if r != 0 => r.min(admin),
            _ => admin,
        }
    }

    pub(super) fn check(&self) -> Result<()> {
        if self.workers == 0 || self.workers > 256 {
            return Err(DeviceError::Config(format!(
                "workers {} not in 1..=256",
                self.workers
            )));
        }
        if !self.wq_size.is_power_of_two() || !(MIN_WQ_SIZE..=MAX_WQ_SIZE).contains(&self.wq_size) {
            return Err(DeviceError::Config(format!(
                "wq size {} is not a power of two in {MIN_WQ_SIZE}..={MAX_WQ_SIZE}",
                self.wq_size
            )));
        }
        for p in std::iter::once(self.priority).chain(self.uid_priority.iter().map(|(_, p)| *p)) {
            if !(1..=15).contains(&p) {
                return Err(DeviceError::Config(format!("priority {p} not in 1..=15")));
            }
        }
        if !(1..=MAX_FAULTS_PER_CLIENT).contains(&self.faults_per_client) {
            return Err(DeviceError::Config(format!(
                "faults per client {} not in 1..={MAX_FAULTS_PER_CLIENT}",
                self.faults_per_client
            )));
        }
        if self.max_batch < 2 || self.max_batch > 1024 || self.max_xfer == 0 {
            return Err(DeviceError::Config("bad max batch or max transfer".into()));
        }
        Ok(())
    }
}
