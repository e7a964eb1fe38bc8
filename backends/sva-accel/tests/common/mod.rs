//! Shared helpers of the integration tests: a daemon per test.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A daemon started for one test; killed on drop.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start(args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("sva.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_sva-accel"))
            .arg("--socket-path")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sva-accel");
        let start = Instant::now();
        let iommu = dir.path().join("sva.sock.iommu");
        while !socket.exists() || !iommu.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "daemon did not come up"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Daemon {
            child,
            socket,
            _dir: dir,
        }
    }

    /// The daemon's /dev/iommu service socket.
    pub fn iommu_socket(&self) -> PathBuf {
        let mut p = self.socket.clone().into_os_string();
        p.push(".iommu");
        PathBuf::from(p)
    }

    pub fn shared() -> Daemon {
        Daemon::start(&["--workers", "1"])
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// Polls `f` until it is true (bounded: 10 s).
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
