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

#[test]
fn test_cli_rejects_bad_arguments() {
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--socket-path is required"), "{err}");
    let (code, err) = run(&["--socket-path", "/tmp/x", "--wq-mode", "weird"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown mode"), "{err}");
    let (code, _) = run(&["--socket-path", "/tmp/x", "--workers", "many"]);
    assert_eq!(code, Some(2));
    let (code, _) = run(&["--bogus"]);
    assert_eq!(code, Some(2));
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().expect("utf-8 path");
    let (code, err) = run(&["--socket-path", sock, "--wq-size", "3"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("power of two"), "{err}");
    let (code, _) = run(&["--socket-path", sock, "--workers", "0"]);
    assert_eq!(code, Some(1));
}
