//! Feeds arbitrary bytes to an established `ControlChannel` (from a handshake
//! run in-process between two fixed identities), then polls every message.
//!
//! First byte even: the rest goes in raw, as frames off the socket (almost all
//! stop at the frame header or the AEAD tag). Odd: the rest is encrypted by the
//! peer's channel as stream bytes, so the message framing and bincode decoding
//! see attacker-shaped input as an authenticated peer could send it.
//!
//! Every decoded message must be within its bounds and re-encode to itself;
//! gossip digests and summaries go to a `Gossip` schedule as the daemon's
//! would, which within one instant may answer with at most one summary and one
//! set of entries, however many arrive (what a member can make us send).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::handshake::{Established, Handshake, HandshakeConfig, Hello, Role, CAP_SUPERFRAMES};
use meshnet_proto::identity::Identity;
use meshnet_proto::gossip::{Gossip, Send};
use meshnet_proto::topology::{PeerInfo, Topology};
use meshnet_proto::trust::{Binding, Signer};
use meshnet_proto::wire::control::{decode_message, encode_message, ControlMsg, MAX_MESSAGE};

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
    let me = PeerInfo {
        name: meshnet_proto::PeerName(0x0200_0000_0001),
        nickname: "me".into(),
        uid: 1,
        version: 3,
        software: String::new(),
        mtu: 0,
        connections: Vec::new(),
    };
    let topology = Topology::new(me);
    let mut gossip = Gossip::new();
    gossip.connected(1, meshnet_proto::PeerName(1), true, 0, &topology);
    let (mut summaries, mut entries) = (0, 0);
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
                Ok(Some(msg)) => {
                    msg.check().expect("decoded messages are within bounds");
                    if let Ok(body) = encode_message(&msg) {
                        assert!(body.len() <= MAX_MESSAGE);
                        assert_eq!(decode_message(&body).expect("re-decodes"), msg);
                    }
                    let out = match &msg {
                        ControlMsg::GossipDigest(d) => gossip.on_digest(1, *d, 0, &topology),
                        ControlMsg::GossipSummary(s) => gossip.on_summary(1, s, 0, &topology),
                        _ => Vec::new(),
                    };
                    for o in out {
                        match o.send {
                            Send::Summary(_) => summaries += 1,
                            Send::Entries(_) => entries += 1,
                            _ => panic!("digests and summaries are answered with summaries and entries only"),
                        }
                    }
                    assert!(summaries <= 1 && entries <= 1, "rate limits hold");
                }
                Ok(None) => break,
                Err(_) => {
                    assert!(receiver.channel.poll_message().is_err(), "a failed channel stays failed");
                    return;
                }
            }
        }
    }
});
