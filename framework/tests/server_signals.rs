//! SIGTERM shuts a server down cleanly and removes its sockets. (Alone in
//! its test binary: it installs process-wide signal handlers.)

mod vhost_common;

use ioasis::server::Server;
use vhost_common::*;

#[test]
fn test_sigterm_shuts_down_and_removes_sockets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("dev.sock");
    let mut server = Server::new();
    server
        .add_device("dev", &sock, EchoDevice::new(1))
        .expect("add");
    server.handle_signals().expect("signals");
    let t = std::thread::spawn(move || server.run().expect("run"));
    // The socket exists while serving.
    let (fe, _raw) = connect(&sock, 1);
    vhost::VhostBackend::set_owner(&fe).expect("owner");
    // SAFETY: raise has no memory-safety preconditions; the handler installed
    // above turns SIGTERM into a shutdown request instead of killing us.
    let rc = unsafe { libc::raise(libc::SIGTERM) };
    assert_eq!(rc, 0);
    t.join().expect("server thread");
    assert!(!sock.exists());
}
