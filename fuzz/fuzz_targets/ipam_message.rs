//! Bytes -> the IPAM message decoder (packet, then the envelope it signs, with
//! every bound checked) and the snapshot decoder. Nothing may panic; whatever
//! decodes must re-check clean (decoding is deterministic).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::ipam::wire::{check_message, check_snapshot};

fuzz_target!(|data: &[u8]| {
    let first = check_message(data);
    assert_eq!(first.is_ok(), check_message(data).is_ok());
    let _ = check_snapshot(data);
});
