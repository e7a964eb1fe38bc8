//! The daemon's command line and lifecycle, run as a process.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vdpa-net");

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
fn test_bad_arguments_exit_nonzero_with_message() {
    for args in [
        vec![],
        vec!["--socket-path", "/tmp/x.sock"],
        vec!["--socket-path", "/tmp/x.sock", "--port", "nonsense"],
        vec![
            "--socket-path",
            "/tmp/x.sock",
            "--port",
            "sink",
            "--queues",
            "99",
        ],
        vec!["--device", "socket=/tmp/x.sock"],
        vec!["--bogus"],
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .env("RUST_LOG", "off")
            .output()
            .expect("run vdpa-net");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error: ") && err.contains("try '--help'"),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "stdout carries only statistics");
    }
}

/// `--help` and `--version` print to stdout and exit 0; the version line
/// is `vdpa-net VERSION`.
#[test]
fn test_help_and_version_exit_zero() {
    let out = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run vdpa-net");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--socket-path <PATH>",
        "--port <PORT>",
        "--queues <N>",
        "--mac <MAC>",
        "--device <SPEC>",
        "--stats-interval <SECS>",
        "--poll-us <N>",
        "--tap-io <MODE>",
        "--socket-mode <MODE>",
        "--socket-group <GROUP>",
        "--version",
    ] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
    let out = Command::new(BIN)
        .arg("--version")
        .output()
        .expect("run vdpa-net");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("vdpa-net {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// The README's synopsis is the binary's `--help` output, verbatim.
/// (Checked to fail with one help line of the README changed.)
#[test]
fn test_readme_shows_the_help() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    let marker = "```text\n$ vdpa-net --help\n";
    let start = readme.find(marker).expect("the --help block") + marker.len();
    let len = readme[start..].find("```").expect("end of the block");
    let out = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run vdpa-net");
    assert_eq!(
        readme[start..start + len],
        *String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn test_sigterm_prints_final_stats_and_removes_sockets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.sock");
    let b = dir.path().join("b.sock");
    let mut child = Command::new(BIN)
        .arg("--device")
        .arg(format!("socket={},port=sink", a.display()))
        .arg("--device")
        .arg(format!("socket={},port=reflect,queues=2", b.display()))
        .args(["--stats-interval", "0.2"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vdpa-net");
    let up = wait_for(&a, Duration::from_secs(10)) && wait_for(&b, Duration::from_secs(10));
    if !up {
        let _ = child.kill();
        panic!("sockets did not appear");
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on the child we spawned and still own.
    let r = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(r, 0);
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert!(lines.len() >= 2, "periodic lines and a final one: {out}");
    let last = lines.last().expect("a line");
    assert_eq!(last["final"], true);
    assert_eq!(last["devices"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        last["devices"][1]["queues"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(last["devices"][1]["port"], "reflect");
    assert!(lines[..lines.len() - 1].iter().all(|l| l["final"] == false));
    assert!(!a.exists() && !b.exists(), "sockets removed");
}

/// The daemon's device sockets are 0600 by default and take --socket-mode
/// and --socket-group. Checked with the framework's socket policy disabled
/// (the process umask applied, as before): the default socket came out 0755.
#[test]
fn test_socket_mode_and_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for (extra, mode) in [
        (vec![], 0o600),
        (vec!["--socket-mode", "0660", "--socket-group", "0"], 0o660),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("net.sock");
        let mut child = Command::new(BIN)
            .args([
                "--socket-path",
                sock.to_str().expect("utf-8"),
                "--port",
                "sink",
            ])
            .args(&extra)
            .env("RUST_LOG", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vdpa-net");
        assert!(wait_for(&sock, Duration::from_secs(10)), "socket appears");
        let meta = std::fs::metadata(&sock).expect("stat");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{extra:?}");
        if !extra.is_empty() {
            assert_eq!(meta.gid(), 0, "--socket-group 0");
        }
    }
}
