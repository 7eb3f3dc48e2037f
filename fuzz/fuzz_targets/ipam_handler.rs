//! Bytes -> a sequence of IPAM messages into a peer's handler with a key book.
//! The first byte of each chunk says how it is wrapped: raw bytes, or envelope
//! bytes signed by a real neighbour or by an attacker (so the fuzzer gets past
//! the signature check into the gossip, request and Paxos handling).
//! Nothing may panic; a message refused with an error changes nothing; every
//! message the peer sends decodes cleanly; the snapshot restores.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::identity::Identity;
use meshnet_proto::ipam::wire::{check_message, sign_raw};
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
    let u: Cidr = "10.32.0.0/22".parse().unwrap();
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
        let msg = match kind % 3 {
            0 => body.to_vec(),
            1 => sign_raw(body, kind >> 2, vec![bnb.clone()], &snb),
            _ => sign_raw(body, kind >> 2, vec![bat.clone(), bnb.clone()], &sat),
        };
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
