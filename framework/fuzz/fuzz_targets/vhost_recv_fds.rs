//! Fuzz vhost-user message receive with fds: the input (after its first
//! byte) is written to a unix stream with 0..=64 fds attached (the first
//! byte says how many), then messages are received and decoded until the
//! stream ends. Nothing may panic, and every fd that arrived is closed by
//! the end: the fd table is back to its size.
#![no_main]

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use ioasis::vhost_user::msg::{decode, recv_message, Limits};
use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

const LIMITS: Limits = Limits {
    num_queues: 4,
    max_queue_size: 256,
    max_mem_slots: 32,
};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    // A stream carries fds only with at least one byte.
    if rest.is_empty() {
        return;
    }
    let nfds = usize::from(n % 65);
    let rest = &rest[..rest.len().min(32 * 1024)];
    let before = open_fds();
    {
        let (a, b) = UnixStream::pair().expect("socketpair");
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
        drop(a);
        // Bounded: each message consumes at least a header, or ends the loop.
        for _ in 0..4096 {
            match recv_message(&b) {
                Ok((hdr, payload, fds)) => {
                    let _ = decode(&hdr, &payload, fds, &LIMITS);
                }
                Err(_) => break,
            }
        }
    }
    assert_eq!(open_fds(), before, "an fd that arrived was not closed");
});
