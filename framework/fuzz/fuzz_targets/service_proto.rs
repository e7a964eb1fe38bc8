//! Fuzz the service protocol decoders: requests with 0..=2 fds and the
//! replies of every opcode. Nothing may panic; a decoded request must
//! re-encode to an equal one.
#![no_main]

use ioasis::service::proto::{Opcode, Reply, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (nfds, pkt) = match data.split_first() {
        Some((n, rest)) => (usize::from(n % 3), rest),
        None => return,
    };
    if let Ok((_, req)) = Request::decode(pkt, nfds) {
        let again = req.encode(7);
        let (_, back) = Request::decode(&again, req.opcode().request_fds())
            .unwrap_or_else(|e| panic!("re-encoded request fails: {e:?}"));
        assert_eq!(back, req);
    }
    for op in 1..=17u16 {
        if let Some(op) = Opcode::from_u16(op) {
            let _ = Reply::decode(pkt, nfds, op);
        }
    }
});
