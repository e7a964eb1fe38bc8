//! The daemon's command line.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sva-accel"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run sva-accel");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Usage errors exit with status 2 and name the flag; the device's own
/// refusals (a socket that cannot be bound) exit with 1.
#[test]
fn test_cli_rejects_bad_arguments() {
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--socket-path <PATH>"), "{err}");
    let (code, err) = run(&["--socket-path", "/tmp/x", "--wq-mode", "weird"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("'--wq-mode <MODE>'"), "{err}");
    let (code, _) = run(&["--socket-path", "/tmp/x", "--workers", "many"]);
    assert_eq!(code, Some(2));
    let (code, _) = run(&["--bogus"]);
    assert_eq!(code, Some(2));
    let (code, err) = run(&["--socket-path", "/tmp/x", "--wq-size", "3"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--wq-size") && err.contains("power of two"),
        "{err}"
    );
    let (code, err) = run(&["--socket-path", "/tmp/x", "--workers", "0"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--workers"), "{err}");
    let (code, err) = run(&["--socket-path", "/nonexistent-dir-ioasis/s.sock"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("sva-accel: "), "{err}");
}

/// `--help` and `--version` print to stdout and exit 0; the version line
/// is `sva-accel VERSION`.
#[test]
fn test_help_and_version_exit_zero() {
    let out = Command::new(env!("CARGO_BIN_EXE_sva-accel"))
        .arg("--help")
        .output()
        .expect("run sva-accel");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--socket-path <PATH>",
        "--workers <N>",
        "--wq-size <N>",
        "--wq-mode <MODE>",
        "--max-batch <N>",
        "--max-xfer <BYTES>",
        "--priority <N>",
        "--uid-priority <UID:N>",
        "--faults-per-client <N>",
        "--iommu-socket <PATH>",
        "--label <NAME>",
        "--socket-mode <MODE>",
        "--socket-group <GROUP>",
        "--grant <DEVICE=WHO>",
        "--limit <NAME=VALUE>",
        "--version",
    ] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sva-accel"))
        .arg("--version")
        .output()
        .expect("run sva-accel");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("sva-accel {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// The README's synopsis is the binary's `--help` output, verbatim.
/// (Checked to fail with one help line of the README changed.)
#[test]
fn test_readme_shows_the_help() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    let marker = "```text\n$ sva-accel --help\n";
    let start = readme.find(marker).expect("the --help block") + marker.len();
    let len = readme[start..].find("```").expect("end of the block");
    let out = Command::new(env!("CARGO_BIN_EXE_sva-accel"))
        .arg("--help")
        .output()
        .expect("run sva-accel");
    assert_eq!(
        readme[start..start + len],
        *String::from_utf8_lossy(&out.stdout)
    );
}

/// A daemon started with some arguments (killed on drop), its socket, and
/// the directory the socket is in (removed on drop).
struct Child {
    child: std::process::Child,
    sock: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Child {
    fn start(args: &[&str]) -> Child {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("s.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_sva-accel"))
            .args(["--workers", "1"])
            .args(args)
            .arg("--socket-path")
            .arg(&sock)
            .env("RUST_LOG", "off")
            .spawn()
            .expect("spawn");
        let start = std::time::Instant::now();
        while !sock.exists() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "no socket"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Child {
            child,
            sock,
            _dir: dir,
        }
    }

    /// The priority a client asking for `asked` is granted.
    fn granted(&self, asked: u8) -> u8 {
        let c = sva_accel::client::Client::connect_with(
            &self.sock,
            sva_accel::client::Options {
                priority: asked,
                ..Default::default()
            },
        )
        .expect("connect");
        c.info().priority
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Priorities are the administrator's: `--priority` for every user,
/// `--uid-priority` for one; a client asking for more gets its user's, one
/// asking for less gets less, one asking for nothing (0) gets its user's.
#[test]
fn test_priorities_are_the_administrators() {
    let d = Child::start(&["--priority", "3"]);
    assert_eq!((d.granted(15), d.granted(0), d.granted(2)), (3, 3, 2));
    drop(d);
    let uid = nix::unistd::getuid().as_raw().to_string();
    let d = Child::start(&[
        "--priority",
        "9",
        "--uid-priority",
        &format!("{uid}:5"),
        "--uid-priority",
        "4294967000:15",
    ]);
    assert_eq!((d.granted(15), d.granted(0), d.granted(4)), (5, 5, 4));
    drop(d);
    let (code, err) = run(&["--socket-path", "/tmp/x", "--uid-priority", "7"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("UID:PRIORITY"), "{err}");
}

#[test]
fn test_sigterm_shuts_down_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sva-accel"))
        .args(["--workers", "1", "--socket-path"])
        .arg(&sock)
        .env("RUST_LOG", "off")
        .spawn()
        .expect("spawn");
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "no socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let c = sva_accel::client::Client::connect(&sock).expect("connect");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "socket removed");
    drop(c);
}

/// Both sockets (portal and `/dev/iommu` service) are 0600 by default and
/// take --socket-mode and --socket-group; a bad mode is refused. Checked
/// with the framework's socket policy disabled (sockets bound under the
/// process umask, as before): the default sockets came out 0755.
#[test]
fn test_socket_mode_and_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for (extra, mode) in [
        (vec![], 0o600),
        (vec!["--socket-mode", "0660", "--socket-group", "0"], 0o660),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("s.sock");
        let iommu = dir.path().join("s.sock.iommu");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sva-accel"))
            .args(["--workers", "1", "--socket-path"])
            .arg(&sock)
            .args(&extra)
            .env("RUST_LOG", "off")
            .spawn()
            .expect("spawn");
        let start = std::time::Instant::now();
        while !sock.exists() || !iommu.exists() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "no socket"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let metas = [
            std::fs::metadata(&sock).expect("stat"),
            std::fs::metadata(&iommu).expect("stat"),
        ];
        let _ = child.kill();
        let _ = child.wait();
        for m in metas {
            assert_eq!(m.permissions().mode() & 0o777, mode, "{extra:?}");
            if !extra.is_empty() {
                assert_eq!(m.gid(), 0, "--socket-group 0");
            }
        }
    }
    let (code, _) = run(&["--socket-path", "/tmp/never.sock", "--socket-mode", "8"]);
    assert_eq!(code, Some(2), "a mode that is not octal is refused");
}
