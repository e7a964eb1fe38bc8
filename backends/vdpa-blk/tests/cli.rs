//! The daemon as a process: bad arguments exit with status 2, a missing
//! image with 1; a running daemon prints statistics as JSON lines and a
//! final one at SIGTERM, and removes its socket.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vdpa-blk");

fn wait_for(path: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    // Bounded by `limit`.
    while start.elapsed() < limit {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn test_bad_arguments_exit_2() {
    for args in [
        vec![],
        vec!["--socket-path", "/tmp/x.sock"],
        vec!["--socket-path", "/tmp/x.sock", "--image", "null:12"],
        vec![
            "--socket-path",
            "/tmp/x.sock",
            "--null",
            "1G",
            "--queues",
            "0",
        ],
        vec![
            "--socket-path",
            "/tmp/x.sock",
            "--null",
            "1G",
            "--queue-size",
            "100",
        ],
        vec!["--bogus"],
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .env("RUST_LOG", "off")
            .output()
            .expect("run vdpa-blk");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "stdout carries only statistics");
    }
    let out = Command::new(BIN)
        .args([
            "--socket-path",
            "/tmp/x.sock",
            "--image",
            "/nonexistent/disk.img",
        ])
        .env("RUST_LOG", "off")
        .output()
        .expect("run vdpa-blk");
    assert_eq!(out.status.code(), Some(1), "a missing image");
}

#[test]
fn test_runs_prints_stats_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("blk.sock");
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(&sock)
        .args([
            "--image",
            "null:64M",
            "--queues",
            "2",
            "--stats-interval-ms",
            "100",
        ])
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn vdpa-blk");
    assert!(wait_for(&sock, Duration::from_secs(10)), "socket appears");
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "vdpa-blk did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(lines.len() >= 2, "{out}");
    let last = lines.last().expect("final line");
    assert_eq!(last["final"], true);
    assert_eq!(last["queues"].as_array().map(Vec::len), Some(2));
    assert!(!sock.exists(), "socket removed");
}
