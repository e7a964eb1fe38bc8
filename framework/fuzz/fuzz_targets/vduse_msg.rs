//! Fuzz VDUSE control-request decoding: the first two bytes are the
//! device's queue count, the rest is what `read(2)` on the device fd
//! returned. Nothing may panic; a decoded request satisfies what its
//! handler relies on (a queue index below the count, a non-empty IOVA
//! range), and its answer encodes to a full response carrying its id.
#![no_main]

use ioasis::vduse::msg::{decode, request_id, response, Request, MSG_SIZE, RESULT_OK};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let num_queues = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let msg = &data[2..];
    let decoded = decode(msg, num_queues);
    if let Ok(req) = decoded {
        assert_eq!(msg.len(), MSG_SIZE);
        match req {
            Request::GetVqState { index } => assert!(usize::from(index) < num_queues),
            Request::UpdateIotlb { start, last } => assert!(start <= last),
            Request::SetStatus { .. } => {}
        }
        let id = request_id(msg).expect("a decoded request has an id");
        let state = match req {
            Request::GetVqState { index } => Some((index, 7)),
            _ => None,
        };
        let r = response(id, RESULT_OK, state);
        assert_eq!(request_id(&r[..]).map(|_| &r[0..4]), Some(&id.to_le_bytes()[..]));
    }
});
