//! Feeds arbitrary bytes to the decrypted-plaintext parser and drains the
//! record iterator: it must never panic, and every record it yields must lie
//! within the input and within its unit's bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::wire::datagram::{parse_plaintext, Record, INNER_LEN, MAX_UNIT};

fuzz_target!(|data: &[u8]| {
    let Ok((hdr, records)) = parse_plaintext(data) else {
        return;
    };
    assert!(hdr.is_consistent());
    let mut consumed = INNER_LEN;
    for rec in records {
        let Ok(rec) = rec else { break };
        consumed += rec.wire_len();
        assert!(consumed <= data.len());
        assert!(!rec.data().is_empty());
        if let Record::Chunk { offset, total, data, .. } = rec {
            assert!(offset as usize + data.len() <= total as usize);
            assert!(total as usize <= MAX_UNIT);
        }
    }
});
