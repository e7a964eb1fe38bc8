//! A disk resized under the daemon: SIGHUP makes vdpa-blk read its image's
//! size again (the analog of qemu-storage-daemon's `block_resize`: grow
//! the image, e.g. with `truncate -s`, then `kill -HUP` the daemon) and,
//! if the capacity changed, put it in the config space and tell the driver
//! through the framework's [`ConfigNotifier`] (VDUSE: the kernel's copy of
//! the config space and a config interrupt; vhost-user:
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, after which the frontend
//! re-reads the space).
//!
//! The signal goes through signal-hook's pipe: the handler writes a byte,
//! a thread of its own ([`Hangup::spawn`]) reads it and does the work, out
//! of signal context. SIGHUP is blocked in every other thread
//! ([`Hangup::for_main_thread`] before any thread starts), so no system
//! call of the framework's is interrupted by it.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use ioasis::config_space::{ConfigChange, ConfigNotifier};
use log::{error, info, warn};
use nix::sys::signal::{SigSet, Signal};
use signal_hook::consts::SIGHUP;

use crate::config::SECTOR_SIZE;
use crate::device::BlkDevice;

/// SIGHUP, caught: each one runs the action given to [`Hangup::spawn`].
#[derive(Debug)]
pub struct Hangup {
    rx: UnixStream,
}

fn mask() -> SigSet {
    let mut m = SigSet::empty();
    m.add(Signal::SIGHUP);
    m
}

impl Hangup {
    /// Catches SIGHUP from now on and blocks it in the calling thread:
    /// call it before any other thread starts (they inherit the mask).
    pub fn for_main_thread() -> io::Result<Hangup> {
        let (rx, tx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        signal_hook::low_level::pipe::register(SIGHUP, tx)?;
        mask().thread_block().map_err(io::Error::from)?;
        Ok(Hangup { rx })
    }

    /// Runs `on_hangup` on a thread of its own (where SIGHUP is unblocked)
    /// once per SIGHUP (signals that come while it runs are merged).
    pub fn spawn(self, mut on_hangup: impl FnMut() + Send + 'static) -> io::Result<JoinHandle<()>> {
        let mut rx = self.rx;
        std::thread::Builder::new()
            .name("vdpa-blk-sighup".into())
            .spawn(move || {
                if let Err(e) = mask().thread_unblock() {
                    error!("cannot unblock SIGHUP: {e}");
                }
                let mut buf = [0u8; 64];
                loop {
                    match rx.read(&mut buf) {
                        Ok(0) => return,
                        Ok(_) => on_hangup(),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            error!("SIGHUP wait failed: {e}; resizing by SIGHUP stops");
                            return;
                        }
                    }
                }
            })
    }
}

/// Reads the image's size again ([`BlkDevice::resize`]) and, if the
/// capacity changed, tells the driver through `notifier`. Logs what
/// happened; returns the new capacity in sectors when it changed.
pub fn resize_and_notify(device: &BlkDevice, notifier: Option<&ConfigNotifier>) -> Option<u64> {
    let (old, new) = match device.resize() {
        Ok(Some(c)) => c,
        Ok(None) => {
            info!(
                "SIGHUP: the disk's size is unchanged ({} bytes)",
                device.backing().size()
            );
            return None;
        }
        Err(e) => {
            error!("SIGHUP: reading the image's size: {e}");
            return None;
        }
    };
    info!(
        "SIGHUP: disk resized from {old} to {new} sectors ({} bytes)",
        new * SECTOR_SIZE
    );
    match notifier.map(ConfigNotifier::notify) {
        Some(Ok(ConfigChange::Signalled)) => info!("the driver was told of the new capacity"),
        Some(Ok(ConfigChange::NotRunning)) => {
            info!("the driver is not running the device; it reads the new capacity when it starts")
        }
        Some(Ok(ConfigChange::NoDriver)) => {
            info!("no driver connected; the next one reads the new capacity")
        }
        Some(Ok(ConfigChange::CannotTell(why))) => {
            warn!("the driver cannot be told of the new capacity: {why}")
        }
        Some(Err(e)) => error!("telling the driver of the new capacity: {e}"),
        None => warn!("no config notifier: the driver is not told"),
    }
    Some(new)
}
