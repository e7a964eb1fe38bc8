//! Bounded property tests of the receive paths that take fds, driving the
//! same functions as the fuzz targets `framework/fuzz` `vhost_recv_fds` and
//! `service_recv_fds`: arbitrary bytes (raw, or framed as a message of a
//! real opcode) with 0..=64 fds attached go through a real socket, are
//! received and decoded. Nothing panics, and every fd that arrived is closed
//! by the end (the fd table is back to its size).
//!
//! Checked against the receive code before `ioasis::scm` (fds left open on
//! a truncated control buffer): both properties failed at once, the service
//! on an empty packet with 5 fds (4 left open), vhost-user with 32 left
//! open.
//!
//! The fd count is process-wide, so the cases run one at a time.

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};

use ioasis::service::proto::{Request, MAX_MESSAGE};
use ioasis::service::transport::recv_packet;
use ioasis::vhost_user::msg::{decode, recv_message, Limits, HDR_SIZE, VERSION_1};
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use proptest::prelude::*;

const LIMITS: Limits = Limits {
    num_queues: 4,
    max_queue_size: 256,
    max_mem_slots: 32,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn send_with_fds(sock: i32, data: &[u8], nfds: usize) {
    let null = File::open("/dev/null").expect("/dev/null");
    let fds = vec![null.as_raw_fd(); nfds];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock, &[IoSlice::new(data)], cmsgs, MsgFlags::empty(), None).expect("sendmsg");
}

/// A vhost-user stream: raw bytes, or a header of a real request whose size
/// matches the payload, followed by more bytes.
fn vhost_stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 1..256),
        (
            0u32..48,
            prop::collection::vec(any::<u8>(), 0..128),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(request, payload, tail)| {
                let mut v = Vec::with_capacity(HDR_SIZE + payload.len() + tail.len());
                v.extend_from_slice(&request.to_ne_bytes());
                v.extend_from_slice(&VERSION_1.to_ne_bytes());
                v.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
                v.extend_from_slice(&payload);
                v.extend_from_slice(&tail);
                v
            }),
    ]
}

/// A service packet: raw bytes, or a real request's encoding with some bytes
/// changed.
fn service_packet() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        (
            prop::sample::select(vec![
                Request::Hello,
                Request::IoasAlloc,
                Request::DeviceList,
                Request::Destroy { id: 3 },
            ]),
            prop::collection::vec((0usize..64, any::<u8>()), 0..3)
        )
            .prop_map(|(req, flips)| {
                let mut v = req.encode(9);
                for (i, b) in flips {
                    if let Some(x) = v.get_mut(i) {
                        *x = b;
                    }
                }
                v
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn prop_vhost_receive_closes_every_fd(data in vhost_stream(), nfds in 0usize..=64) {
        let _g = serial();
        let before = open_fds();
        {
            let (a, b) = UnixStream::pair().expect("socketpair");
            send_with_fds(a.as_raw_fd(), &data, nfds);
            drop(a);
            // Bounded: each message consumes a header, or the loop ends.
            for _ in 0..256 {
                match recv_message(&b) {
                    Ok((hdr, payload, fds)) => {
                        let _ = decode(&hdr, &payload, fds, &LIMITS);
                    }
                    Err(_) => break,
                }
            }
        }
        prop_assert_eq!(open_fds(), before, "an fd that arrived was not closed");
    }

    #[test]
    fn prop_service_receive_closes_every_fd(data in service_packet(), nfds in 0usize..=64) {
        let _g = serial();
        prop_assume!(data.len() <= MAX_MESSAGE);
        let before = open_fds();
        {
            let (a, b) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .expect("socketpair");
            send_with_fds(a.as_raw_fd(), &data, nfds);
            if let Ok(Some(pkt)) = recv_packet(b.as_fd()) {
                prop_assert_eq!(pkt.fds.len(), nfds, "every fd sent arrived and is owned");
                if !pkt.truncated && !pkt.fds_truncated {
                    if let Ok((h, req)) = Request::decode(&pkt.data, pkt.fds.len()) {
                        let again = req.encode(h.request_id);
                        let back = Request::decode(&again, req.opcode().request_fds());
                        prop_assert!(matches!(back, Ok((_, ref r)) if *r == req));
                    }
                }
            }
        }
        prop_assert_eq!(open_fds(), before, "an fd that arrived was not closed");
    }
}
