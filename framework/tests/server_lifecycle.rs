//! Server lifecycle: device validation, shared context and directory, extra
//! listeners, clean shutdown that removes the sockets.

mod vhost_common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use ioasis::device::{Device, DeviceError, Queues, Worker};
use ioasis::server::{Server, ServerError};
use vhost_common::*;

struct Bad {
    queues: usize,
    size: u16,
    masks: Vec<u64>,
}

impl Device for Bad {
    fn device_type(&self) -> u32 {
        1
    }
    fn features(&self) -> u64 {
        0
    }
    fn num_queues(&self) -> usize {
        self.queues
    }
    fn max_queue_size(&self) -> u16 {
        self.size
    }
    fn worker(&self, _thread: usize) -> Result<Box<dyn Worker>, DeviceError> {
        struct W;
        impl Worker for W {
            fn process_queue(&mut self, _i: u16, _q: &mut Queues<'_>) -> Result<(), DeviceError> {
                Ok(())
            }
        }
        Ok(Box::new(W))
    }
    fn queues_per_thread(&self) -> Vec<u64> {
        if self.masks.is_empty() {
            vec![(1u64 << self.queues.min(63)) - 1]
        } else {
            self.masks.clone()
        }
    }
}

#[test]
fn test_invalid_devices_and_duplicate_labels_are_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::new();
    let cases = [
        Bad {
            queues: 0,
            size: 256,
            masks: vec![],
        },
        Bad {
            queues: 1,
            size: 3,
            masks: vec![],
        },
        Bad {
            queues: 1,
            size: 0,
            masks: vec![],
        },
        Bad {
            queues: 2,
            size: 256,
            masks: vec![0b01],
        },
        Bad {
            queues: 2,
            size: 256,
            masks: vec![0b11, 0b01],
        },
        Bad {
            queues: 2,
            size: 256,
            masks: vec![0b111],
        },
    ];
    for (i, d) in cases.into_iter().enumerate() {
        let r = server.add_device(
            &format!("bad{i}"),
            dir.path().join(format!("b{i}")),
            Arc::new(d),
        );
        assert!(
            matches!(r, Err(ServerError::InvalidDevice { .. })),
            "case {i}: {r:?}"
        );
    }
    server
        .add_device("ok", dir.path().join("ok.sock"), EchoDevice::new(1))
        .expect("add");
    assert!(matches!(
        server.add_device("ok", dir.path().join("ok2.sock"), EchoDevice::new(1)),
        Err(ServerError::DuplicateLabel(_))
    ));
    // A path that exists and is not a socket is left alone.
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").expect("write");
    assert!(matches!(
        server.add_device("p", &file, EchoDevice::new(1)),
        Err(ServerError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&file).expect("read"), b"x");
}

#[test]
fn test_directory_shares_one_iommu_context() {
    let srv = TestServer::start(vec![("a", EchoDevice::new(1)), ("b", EchoDevice::new(1))]);
    assert_eq!(
        srv.directory.labels(),
        vec!["a".to_string(), "b".to_string()]
    );
    let a = srv.directory.get("a").expect("a");
    let b = srv.directory.get("b").expect("b");
    assert_ne!(a.dev_id, b.dev_id);
    assert_eq!(a.device.label(), "a");
    // Both are bound to the server's context: an IOAS of that context can be
    // attached to either.
    let ioas = srv.iommu.ioas_alloc().expect("ioas");
    srv.iommu.attach(a.dev_id, None, ioas).expect("attach a");
    srv.iommu.attach(b.dev_id, None, ioas).expect("attach b");
    srv.iommu.detach(a.dev_id, None).expect("detach a");
    srv.iommu.detach(b.dev_id, None).expect("detach b");
    srv.iommu.destroy(ioas).expect("destroy");
    assert!(srv.directory.get("c").is_none());
}

#[test]
fn test_extra_listener_and_shutdown_remove_sockets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::new();
    let dev_sock = dir.path().join("dev.sock");
    server
        .add_device("dev", &dev_sock, EchoDevice::new(1))
        .expect("add");
    let svc_sock = dir.path().join("svc.sock");
    let listener = UnixListener::bind(&svc_sock).expect("bind");
    server
        .add_listener(
            listener,
            Some(svc_sock.clone()),
            Box::new(|mut s: UnixStream| {
                std::thread::spawn(move || {
                    let mut b = [0u8; 4];
                    if s.read_exact(&mut b).is_ok() {
                        let _ = s.write_all(&b);
                    }
                });
            }),
        )
        .expect("listener");
    let stop = server.shutdown_handle();
    let t = std::thread::spawn(move || server.run().expect("run"));
    let mut c = UnixStream::connect(&svc_sock).expect("connect service");
    c.set_read_timeout(Some(WAIT)).expect("timeout");
    c.write_all(b"ping").expect("write");
    let mut b = [0u8; 4];
    c.read_exact(&mut b).expect("echo");
    assert_eq!(&b, b"ping");
    // A frontend connected at shutdown is disconnected.
    let (fe, raw) = connect(&dev_sock, 1);
    vhost::VhostBackend::set_owner(&fe).expect("owner");
    stop.shutdown();
    t.join().expect("server thread");
    assert!(is_closed(&raw));
    assert!(!dev_sock.exists(), "device socket removed");
    assert!(!svc_sock.exists(), "service socket removed");
}

#[test]
fn test_second_frontend_waits_for_the_first() {
    let srv = TestServer::start(vec![("echo", EchoDevice::new(1))]);
    let (first, _r1) = connect(&srv.socket("echo"), 1);
    vhost::VhostBackend::set_owner(&first).expect("owner");
    // A second frontend is held until the first goes away, then served.
    let (second, _r2) = connect(&srv.socket("echo"), 1);
    drop(first);
    drop(_r1);
    let f = vhost::VhostBackend::get_features(&second).expect("served after the first left");
    assert_ne!(f, 0);
}
