//! Helpers shared by the end-to-end tests of vdpa-net.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use ioasis_integration::env::require_tool;
use ioasis_integration::guest::GuestKit;
use ioasis_integration::testpmd::require_testpmd;
use ioasis_integration::vdpa_net::vdpa_net_bin;
use ioasis_integration::Result;

/// Bound for sockets and taps to appear.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for stopping a process cleanly.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The vdpa-net binary and testpmd.
///
/// The daemon comes first: one that does not build fails the test
/// ([`ioasis_integration::Error::Build`]) even where testpmd is missing.
pub fn need_testpmd_and_vdpa_net() -> Result<PathBuf> {
    let bin = vdpa_net_bin()?;
    require_testpmd()?;
    Ok(bin)
}

/// The vdpa-net binary, QEMU and the guest kit (the daemon first, as above).
pub fn need_qemu_and_vdpa_net() -> Result<PathBuf> {
    let bin = vdpa_net_bin()?;
    require_tool("qemu-system-x86_64", "qemu-system-x86")?;
    GuestKit::get()?;
    Ok(bin)
}

/// `Option::expect` with a plain message (clippy-clean in tests).
pub trait OrPanicOpt<T> {
    /// The value, or a panic naming what is missing.
    fn or_panic_opt(self, what: &str) -> T;
}

impl<T> OrPanicOpt<T> for Option<T> {
    #[track_caller]
    fn or_panic_opt(self, what: &str) -> T {
        match self {
            Some(v) => v,
            None => panic!("missing: {what}"),
        }
    }
}
