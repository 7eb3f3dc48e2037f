//! The password path end to end: an honest initiator and responder run
//! `XXpsk0` with (maybe) the same PSK, and the fuzzer plays the man in the
//! middle on one of the first six transmissions: it replaces, XORs into,
//! truncates or extends those bytes.
//!
//! Input: byte 0 = which transmission (0..6: even = initiator to responder) and
//! how (bits 3..5: 0 replace, 1 xor, 2 append, 3 truncate to the rest's length);
//! byte 1 bit 0 = the responder's password differs. The rest is the payload.
//! Nothing may panic. If both sides complete, the transcript was untouched in
//! effect: passwords equal, both agree on each other's static keys and on the
//! data keys. A side with a different password never completes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::handshake::{derive_psk_with_iterations, Handshake, HandshakeConfig, Hello, Role, CAP_SUPERFRAMES};
use meshnet_proto::identity::Identity;
use meshnet_proto::trust::{Binding, Signer};

fn config(seed: u8, psk: [u8; 32]) -> HandshakeConfig {
    let identity = Identity::from_private([seed; 32]).unwrap();
    let hello = Hello {
        name: identity.name(),
        nickname: format!("fuzz-{seed}"),
        uid: seed as u64,
        software: "meshnet fuzz".into(),
        tcp_port: 6783,
        udp_port: 6783,
        receiver_index: seed as u32,
        capabilities: CAP_SUPERFRAMES,
        binding: Binding::new(identity.name(), &identity, &Signer::from_identity(&identity)),
    };
    HandshakeConfig { identity, psk: Some(psk), hello }
}

fuzz_target!(|data: &[u8]| {
    let [how, flags, rest @ ..] = data else { return };
    let step = (how & 7) as usize % 6;
    let op = (how >> 3) & 3;
    let differ = flags & 1 != 0;
    let psk_i = derive_psk_with_iterations(b"fuzz", 1);
    let psk_r = if differ { derive_psk_with_iterations(b"other", 1) } else { psk_i };
    let (ci, cr) = (config(1, psk_i), config(2, psk_r));
    let (pub_i, pub_r) = (ci.identity.public, cr.identity.public);
    let mut i = Handshake::new(Role::Initiator, ci).unwrap();
    let mut r = Handshake::new(Role::Responder, cr).unwrap();
    let (mut i_failed, mut r_failed) = (false, false);
    for n in 0..12 {
        let from_initiator = n % 2 == 0;
        let mut bytes = if from_initiator { i.take_output() } else { r.take_output() };
        if n == step {
            match op {
                0 => bytes = rest.to_vec(),
                1 => bytes.iter_mut().zip(rest.iter().cycle()).for_each(|(b, x)| *b ^= x),
                2 => bytes.extend_from_slice(rest),
                _ => bytes.truncate(rest.len()),
            }
        }
        if bytes.is_empty() {
            continue;
        }
        let (to, failed) = if from_initiator { (&mut r, &mut r_failed) } else { (&mut i, &mut i_failed) };
        if !*failed && to.feed(&bytes).is_err() {
            *failed = true;
        }
    }
    if differ {
        assert!(!i.is_complete() || !r.is_complete(), "different passwords completed");
        assert!(!r.is_complete(), "the responder completed with a different password");
    }
    if i.is_complete() && r.is_complete() {
        let (ie, re) = (i.finish().unwrap(), r.finish().unwrap());
        assert_eq!(ie.remote_static, pub_r);
        assert_eq!(re.remote_static, pub_i);
        assert_eq!(ie.data_keys.send, re.data_keys.recv);
        assert_eq!(ie.data_keys.recv, re.data_keys.send);
    }
});
