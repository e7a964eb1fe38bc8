//! Hands the devices to the framework's server, which runs on a thread of
//! its own while the main thread takes signals and prints statistics.

use std::sync::Arc;
use std::thread::JoinHandle;

use ioasis::server::{Server, ServerError, ShutdownHandle};
use ioasis::socket_policy::SocketPolicy;
use log::error;
use vdpa_net::VhostUserNetBackend;

/// The running server.
pub struct Running {
    shutdown: ShutdownHandle,
    thread: JoinHandle<Result<(), ServerError>>,
}

impl Running {
    /// Stops serving: connections closed, workers joined, sockets removed.
    pub fn stop(self) {
        self.shutdown.shutdown();
        match self.thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!("server: {e}"),
            Err(_) => error!("server thread panicked"),
        }
    }
}

/// Starts serving `backends` on `sockets` (same order, socket files made
/// under `policy`); every device shares the server's iommu context. With
/// `vduse`, the first device is served as the kernel's VDUSE device of that
/// name instead (its entry in `sockets` is not used).
pub fn start(
    sockets: &[String],
    backends: &[Arc<VhostUserNetBackend>],
    policy: SocketPolicy,
    vduse: Option<&str>,
) -> Result<Running, ServerError> {
    let mut server = Server::new();
    server.set_socket_policy(policy);
    for (i, (s, b)) in sockets.iter().zip(backends).enumerate() {
        let label = format!("net{i}");
        match vduse {
            Some(name) if i == 0 => server.add_vduse_device(&label, name, b.clone())?,
            _ => server.add_device(&label, s, b.clone())?,
        }
    }
    let shutdown = server.shutdown_handle();
    let thread = std::thread::Builder::new()
        .name("vdpa-net-server".into())
        .spawn(move || server.run())
        .map_err(|source| ServerError::Io {
            op: "spawn server thread",
            source,
        })?;
    Ok(Running { shutdown, thread })
}
