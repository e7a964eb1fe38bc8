//! Fuzz the portal handshake: the input (after its first byte) is sent as a
//! connection's first `SOCK_SEQPACKET` packet with 0..=64 fds attached (the
//! first byte says how many), received with the daemon's `proto::recv` and
//! decoded as its HELLO. Nothing may panic, a decoded HELLO re-encodes to an
//! equal one, and every fd that arrived is closed by the end: the fd table
//! is back to its size.
#![no_main]

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd};

use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use sva_accel::proto::{self, Hello};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let nfds = usize::from(n % 65);
    let rest = &rest[..rest.len().min(proto::MAX_PACKET + 64)];
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
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(rest)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        if let Ok(Some(pkt)) = proto::recv(b.as_fd()) {
            assert!(pkt.fds.len() <= proto::MAX_FDS);
            if let Ok(h) = Hello::decode(&pkt.data, pkt.fds.len()) {
                assert_eq!(Hello::decode(&h.encode(), 0), Ok(h));
            }
        }
    }
    assert_eq!(open_fds(), before, "an fd that arrived was not closed");
});
