//! Feeds arbitrary bytes to an initiator `Handshake`, the way a hostile or
//! impersonating responder could answer our dial.
//!
//! First byte: bit 0 = use a password, bit 1 = prepend a valid responder
//! preamble (so the fuzzer reaches message 2 and Noise without guessing the
//! magic), bits 2..8 = feed split size. Nothing may panic; an initiator must
//! never complete against bytes that did not come from a responder holding keys
//! (the fuzzer cannot forge message 2); after an error, output may hold at most
//! a refusal and further feeds must fail.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::handshake::{
    derive_psk_with_iterations, Handshake, HandshakeConfig, Hello, Role, CAP_SUPERFRAMES, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use meshnet_proto::identity::Identity;
use meshnet_proto::trust::{Binding, Signer};
use meshnet_proto::wire::control::Preamble;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let password = mode & 1 != 0;
    let identity = Identity::from_private([0x24; 32]).unwrap();
    let hello = Hello {
        name: identity.name(),
        nickname: "fuzz-initiator".into(),
        uid: 2,
        software: "meshnet fuzz".into(),
        tcp_port: 6783,
        udp_port: 6783,
        receiver_index: 2,
        capabilities: CAP_SUPERFRAMES,
        binding: Binding::new(identity.name(), &identity, &Signer::from_identity(&identity)),
    };
    let psk = password.then(|| derive_psk_with_iterations(b"fuzz", 1));
    let mut hs = Handshake::new(Role::Initiator, HandshakeConfig { identity, psk, hello }).unwrap();
    let _ = hs.take_output();

    let mut input = Vec::new();
    if mode & 2 != 0 {
        input.extend_from_slice(
            &Preamble { min_version: MIN_PROTOCOL_VERSION, max_version: PROTOCOL_VERSION, password }.emit(),
        );
    }
    input.extend_from_slice(rest);
    let split = 1 + (mode >> 2) as usize * 37;
    for piece in input.chunks(split) {
        if hs.feed(piece).is_err() {
            let _ = hs.take_output();
            assert!(hs.feed(b"x").is_err());
            return;
        }
        let _ = hs.take_output();
    }
    assert!(!hs.is_complete(), "an initiator completed against forged bytes");
});
