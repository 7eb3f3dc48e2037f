//! Bytes -> a sequence of IPAM messages into a peer's handler with a key book.
//! The first byte of each chunk says how it is wrapped: raw bytes, envelope
//! bytes signed by a real neighbour or by an attacker (so the fuzzer gets past
//! the signature check into the gossip, request and Paxos handling), or a
//! well-formed Paxos message (prepare, accept request, decision) whose fields
//! and signers come from the bytes (so it reaches the Paxos checks).
//! Nothing may panic; a message refused with an error changes nothing; every
//! message the peer sends decodes cleanly; the snapshot restores. Bit 6 of the
//! first byte makes the peer an IPv6 ring (a /64: 128-bit arithmetic near
//! nothing a small range would reach), whose messages carry its version byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::identity::Identity;
use meshnet_proto::ipam::forge;
use meshnet_proto::ipam::paxos::Ballot;
use meshnet_proto::ipam::wire::{check_message, sign_raw, WIRE_VERSION_V6};
use meshnet_proto::ipam::{Cidr, Config, InitMode, Ipam, Request};
use meshnet_proto::trust::{Binding, KeyBook, Signer};
use meshnet_proto::PeerName;

fn name(n: u64) -> PeerName {
    PeerName(0x0200_0000_0000 | n)
}

fn id(n: u64) -> Identity {
    Identity::from_private([n as u8; 32]).expect("32 bytes")
}

fuzz_target!(|data: &[u8]| {
    let v6 = data.first().is_some_and(|b| b & 0x40 != 0);
    let u: Cidr = if v6 { "fd32::/64" } else { "10.32.0.0/22" }.parse().unwrap();
    let seeds = vec![name(1), name(2)];
    let me = id(1);
    let init = if data.first().is_some_and(|b| b & 0x80 != 0) { InitMode::Consensus(3) } else { InitMode::Seed(seeds) };
    let mut ipam = Ipam::with_config(name(1), u, init.clone(), Config::default(), &me).unwrap();
    ipam.peers_changed(&[name(2), name(3), name(9)]);
    let _ = ipam.allocate("c", Request::Any(u), 0);
    let (nb, attacker) = (id(2), id(9));
    let (snb, sat) = (Signer::from_identity(&nb), Signer::from_identity(&attacker));
    let (bnb, bat) = (Binding::new(name(2), &nb, &snb), Binding::new(name(9), &attacker, &sat));
    let mut keys = KeyBook::new();
    let mut rest = data.get(1..).unwrap_or_default();
    let mut now = 1;
    while rest.len() >= 3 {
        let kind = rest[0];
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let body = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let mut msg = match kind % 4 {
            0 => body.to_vec(),
            1 => sign_raw(body, kind >> 2, vec![bnb.clone()], &snb),
            2 => sign_raw(body, kind >> 2, vec![bat.clone(), bnb.clone()], &sat),
            _ => paxos(u, body, (name(2), &snb), (name(9), &sat), vec![bat.clone(), bnb.clone()]),
        };
        if v6 && kind % 4 != 0 && kind % 4 != 3 {
            msg[0] = WIRE_VERSION_V6;
        }
        let before = ipam.snapshot();
        now += 100;
        if ipam.handle_message(name(2), &msg, now, &mut keys).is_err() {
            assert_eq!(ipam.snapshot(), before, "a refused message changed state");
        }
        if kind & 0x40 != 0 {
            ipam.handle_timeout(now + 5000);
        }
        while let Some((_, out)) = ipam.poll_transmit() {
            assert!(check_message(&out).is_ok(), "sent a message that does not decode");
        }
        while ipam.poll_event().is_some() {}
    }
    let snap = ipam.snapshot();
    Ipam::restore(name(1), u, init, Config::default(), &snap, &me).expect("own snapshot restores");
});

/// A well-formed Paxos message from the neighbour or the attacker, built from
/// `b`: which message, who sends it, the ballot's round and proposer, the
/// value's names (from 1..=9, a bit each) and who signs the value and the acceptances.
fn paxos(u: Cidr, b: &[u8], nb: (PeerName, &Signer), at: (PeerName, &Signer), bindings: Vec<Binding>) -> Vec<u8> {
    let byte = |i: usize| b.get(i).copied().unwrap_or(0);
    let who = |x: u8| if x & 1 == 0 { nb } else { at };
    let (src, key) = who(byte(1));
    let round = u64::from_le_bytes(std::array::from_fn(|i| byte(3 + i))) >> (byte(2) % 64);
    let ballot = Ballot { round: round.max(1), proposer: name(1 + byte(11) as u64 % 9) };
    // Nine names, nine bits: byte 12's eight, and bit 7 of byte 2 (whose low
    // six bits shift the round) for name 9. Shifting byte 12 alone by 8 overflowed.
    let names = u16::from(byte(12)) | u16::from(byte(2) >> 7) << 8;
    let mut value: Vec<PeerName> = (1..=9u64).filter(|i| names >> (i - 1) & 1 != 0 || *i == 1).map(name).collect();
    value.dedup();
    let (_, vkey) = who(byte(13));
    match byte(0) % 3 {
        0 => forge::prepare(u, src, byte(14) as u32, ballot, key, bindings),
        1 => forge::accept(u, src, name(1), ballot, value, vkey, key, bindings),
        _ => {
            let signers: Vec<(PeerName, &Signer)> = value.iter().map(|n| (*n, who(byte(15) >> (n.0 as u8 % 8)).1)).collect();
            forge::decision(u, src, name(1), ballot, byte(14) as u32, value, vkey, &signers, key)
        }
    }
}
