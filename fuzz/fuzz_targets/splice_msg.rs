//! Feeds arbitrary bytes as the body of a `ControlMsg::Splice` (a splice
//! message a neighbour relays between two peers behind NAT). Nothing may
//! panic, and whatever decodes is within its bounds (`decode_message` checks
//! them: a chunk of 1..=MAX_SPLICE_CHUNK bytes, an ack inside the window, a
//! short close reason, never addressed to its own sender).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::wire::control::{decode_message, ControlMsg, SpliceBody, MAX_SPLICE_CHUNK, SPLICE_WINDOW};

fuzz_target!(|data: &[u8]| {
    // Bincode's tag of ControlMsg::Splice (the tenth variant), then the input.
    let mut body = vec![9u8];
    body.extend_from_slice(data);
    if let Ok(ControlMsg::Splice(m)) = decode_message(&body) {
        assert_ne!(m.from, m.to);
        match &m.body {
            SpliceBody::Data(d) => assert!(!d.is_empty() && d.len() <= MAX_SPLICE_CHUNK),
            SpliceBody::Ack(n) => assert!((1..=SPLICE_WINDOW).contains(n)),
            SpliceBody::Close(r) => assert!(r.len() <= meshnet_proto::wire::control::MAX_REFUSAL),
            SpliceBody::Open | SpliceBody::Accept => {}
        }
    }
});
