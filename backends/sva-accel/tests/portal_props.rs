//! Bounded property tests of the portal handshake, driving the same
//! functions as the fuzz target `backends/sva-accel/fuzz` `portal_hello`:
//! arbitrary bytes (raw, or a real HELLO with some bytes changed) with
//! 0..=64 fds attached go through a real `SOCK_SEQPACKET` socket, are
//! received with `proto::recv` and decoded as a HELLO. Nothing panics, a
//! decoded HELLO re-encodes to an equal one, and every fd that arrived is
//! closed by the end (the fd table is back to its size).
//!
//! Checked against the portal receive before `ioasis::scm`: the fd property
//! failed at once (an empty packet with 5 fds, 4 of them left open).
//!
//! The fd count is process-wide, so the cases run one at a time.

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Mutex, MutexGuard};

use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use proptest::prelude::*;
use sva_accel::proto::{self, Hello};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn packet() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        (
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            prop::collection::vec((0usize..32, any::<u8>()), 0..3),
            0usize..4
        )
            .prop_map(|(priority, session, pasid, flips, cut)| {
                let mut v = Hello {
                    priority,
                    session,
                    pasid,
                }
                .encode();
                for (i, b) in flips {
                    if let Some(x) = v.get_mut(i) {
                        *x = b;
                    }
                }
                v.truncate(v.len() - cut);
                v
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn prop_portal_handshake_closes_every_fd(data in packet(), nfds in 0usize..=64) {
        let _g = serial();
        let before = open_fds();
        {
            let (a, b) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .expect("socketpair");
            let null = File::open("/dev/null").expect("/dev/null");
            let fds = vec![null.as_raw_fd(); nfds];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
            sendmsg::<()>(a.as_raw_fd(), &[IoSlice::new(&data)], cmsgs, MsgFlags::empty(), None)
                .expect("sendmsg");
            match proto::recv(b.as_fd()) {
                Ok(Some(pkt)) => {
                    prop_assert!(pkt.fds.len() <= proto::MAX_FDS);
                    if let Ok(h) = Hello::decode(&pkt.data, pkt.fds.len()) {
                        prop_assert_eq!(Hello::decode(&h.encode(), 0), Ok(h));
                    }
                }
                Ok(None) => prop_assert!(data.is_empty() && nfds == 0),
                Err(_) => prop_assert!(nfds > proto::MAX_FDS || data.len() > proto::MAX_PACKET),
            }
        }
        prop_assert_eq!(open_fds(), before, "an fd that arrived was not closed");
    }

    #[test]
    fn prop_hello_round_trips(priority in any::<u32>(), session in any::<u64>(), pasid in any::<u32>()) {
        let h = Hello { priority, session, pasid };
        prop_assert_eq!(Hello::decode(&h.encode(), 0), Ok(h));
        prop_assert_eq!(Hello::decode(&h.encode(), 1), Err(libc::EINVAL));
    }
}
