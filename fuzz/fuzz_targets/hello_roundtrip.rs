//! Feeds arbitrary bytes to the `Hello` decoder (what a peer sends inside the
//! handshake). Nothing may panic; whatever decodes re-encodes within the size
//! limit and decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::handshake::{decode_hello, encode_hello, MAX_HELLO};

fuzz_target!(|data: &[u8]| {
    let Ok(hello) = decode_hello(data) else { return };
    assert!(data.len() <= MAX_HELLO);
    let again = encode_hello(&hello).expect("a decoded Hello re-encodes");
    assert_eq!(decode_hello(&again).expect("and decodes again"), hello);
});
