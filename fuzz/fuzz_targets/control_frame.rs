//! Feeds arbitrary bytes to an established `ControlChannel` (from a handshake
//! run in-process between two fixed identities), then polls every message.
//!
//! First byte even: the rest goes in raw, as frames off the socket (almost all
//! stop at the frame header or the AEAD tag). Odd: the rest is encrypted by the
//! peer's channel as stream bytes, so the message framing and bincode decoding
//! see attacker-shaped input as an authenticated peer could send it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::handshake::{Established, Handshake, HandshakeConfig, Hello, Role, CAP_SUPERFRAMES};
use meshnet_proto::identity::Identity;
use meshnet_proto::trust::{Binding, Signer};

fn config(seed: u8) -> HandshakeConfig {
    let identity = Identity::from_private([seed; 32]).unwrap();
    let hello = Hello {
        name: identity.name(),
        nickname: format!("fuzz{seed}"),
        uid: seed as u64,
        software: "meshnet fuzz".into(),
        tcp_port: 6783,
        udp_port: 6784,
        receiver_index: seed as u32,
        capabilities: CAP_SUPERFRAMES,
        binding: Binding::new(identity.name(), &identity, &Signer::from_identity(&identity)),
    };
    HandshakeConfig { identity, psk: None, hello }
}

/// (initiator, responder), connected through in-memory buffers.
fn pair() -> (Established, Established) {
    let mut i = Handshake::new(Role::Initiator, config(1)).unwrap();
    let mut r = Handshake::new(Role::Responder, config(2)).unwrap();
    while !(i.is_complete() && r.is_complete()) {
        let to_r = i.take_output();
        let to_i = r.take_output();
        assert!(!to_r.is_empty() || !to_i.is_empty(), "handshake stalled");
        r.feed(&to_r).unwrap();
        i.feed(&to_i).unwrap();
    }
    (i.finish().unwrap(), r.finish().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (mut sender, mut receiver) = pair();
    let wire = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut w = Vec::new();
        sender.channel.send_stream_bytes(rest, &mut w).unwrap();
        w
    };
    // Feed in two parts to exercise buffering across feeds.
    let cut = (mode as usize >> 1).min(wire.len());
    for part in [&wire[..cut], &wire[cut..]] {
        if receiver.channel.feed(part).is_err() {
            return;
        }
        loop {
            match receiver.channel.poll_message() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    assert!(receiver.channel.poll_message().is_err(), "a failed channel stays failed");
                    return;
                }
            }
        }
    }
});
