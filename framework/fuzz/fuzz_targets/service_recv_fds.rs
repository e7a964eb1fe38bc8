//! Fuzz the `/dev/iommu` service transport with fds: the input (after its
//! first byte) is sent as one `SOCK_SEQPACKET` packet with 0..=64 fds
//! attached (the first byte says how many), received with the service's
//! `recv_packet` and decoded as the server does. Nothing may panic, a
//! decoded request re-encodes to an equal one, and every fd that arrived is
//! closed by the end: the fd table is back to its size.
#![no_main]

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd};

use ioasis::service::proto::{Request, MAX_MESSAGE};
use ioasis::service::transport::recv_packet;
use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let nfds = usize::from(n % 65);
    let rest = &rest[..rest.len().min(MAX_MESSAGE + 64)];
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
        if let Ok(Some(pkt)) = recv_packet(b.as_fd()) {
            assert!(pkt.fds.len() == nfds, "every fd sent arrived and is owned");
            if !pkt.truncated && !pkt.fds_truncated {
                if let Ok((h, req)) = Request::decode(&pkt.data, pkt.fds.len()) {
                    let again = req.encode(h.request_id);
                    let (_, back) = Request::decode(&again, req.opcode().request_fds())
                        .unwrap_or_else(|e| panic!("re-encoded request fails: {e:?}"));
                    assert_eq!(back, req);
                }
            }
        }
    }
    assert_eq!(open_fds(), before, "an fd that arrived was not closed");
});
