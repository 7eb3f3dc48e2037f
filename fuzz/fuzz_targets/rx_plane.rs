//! The RX plane's handling of received datagrams, as the `udp-to-tap` thread
//! drives it: `RxPlane::receive` on each datagram, then what it asks for
//! (relays, deliveries, learned MACs, heartbeats heard), and `poll` as time
//! passes.
//!
//! Router 2 has two direct peers (1 and 3) and knows a peer 4 behind 3, with
//! routes, broadcast trees and the origin check set up. Input: a flags byte,
//! then records of a u16 length, a selector byte and bytes. The selector picks
//! raw bytes (garbage on the wire) or a plaintext sealed under one of the
//! peers' sessions (direct or relay) with an attacker-chosen inner header and
//! records, so everything after authentication is reached.
//!
//! Nothing may panic, and, checked independently: every delivered unit is
//! non-empty and at most `MAX_UNIT` bytes and carries an admissible source;
//! only sealed datagrams deliver or relay anything; every relayed datagram
//! opens under the relay session of the peer it is addressed to, at no more
//! than the largest datagram, with a TTL lower than it came with (the inner
//! header's first byte is the TTL).
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use meshnet_proto::datapath::{Receiver, MAX_DATAGRAM};
use meshnet_proto::ingress::Upstream;
use meshnet_proto::plane::rx::{RxOut, RxPlane};
use meshnet_proto::plane::{PeerPath, Routes};
use meshnet_proto::session::{relay_key, SealKey, RELAY_INDEX_BIT};
use meshnet_proto::wire::datagram::{InnerHeader, OuterHeader, MAX_UNIT, OUTER_LEN};
use meshnet_proto::PeerName;

const ME: PeerName = PeerName(0x0200_0000_0002);
const P1: PeerName = PeerName(0x0200_0000_0001);
const P3: PeerName = PeerName(0x0200_0000_0003);
const P4: PeerName = PeerName(0x0200_0000_0004);
const MAX: usize = 1472;

fn key(from: u8, to: u8) -> [u8; 32] {
    let mut k = [0x33; 32];
    k[0] = from;
    k[1] = to;
    k
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 6783))
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else { return };
    let mut plane = RxPlane::new(ME, MAX, flags & 1 == 0, Arc::default(), Arc::default());
    for (peer, i) in [(P1, 1u8), (P3, 3u8)] {
        let path = PeerPath { peer, addr: addr(i), superframes: flags & 2 == 0, multiqueue: flags & 4 == 0 };
        plane.add_peer(path, i as u32, &key(i, 2), 10 + i as u32, &key(2, i), Arc::default());
    }
    let mut routes = Routes::default();
    for (p, hop) in [(P1, P1), (P3, P3), (P4, P3)] {
        routes.next_hop.insert(p, hop);
    }
    routes.upstream.insert(P1, Upstream { hops: 1, via: vec![P1] });
    routes.upstream.insert(P3, Upstream { hops: 1, via: vec![P3] });
    routes.upstream.insert(P4, Upstream { hops: 2, via: vec![P3] });
    routes.children.insert(P1, vec![P3]);
    routes.children.insert(P4, vec![P1]);
    plane.set_routes(Arc::new(routes));

    // What the peers would open relays with: 1 and 3 open what we seal to them.
    let mut openers = Receiver::new();
    for i in [1u8, 3] {
        let peer = if i == 1 { P1 } else { P3 };
        openers.add_session((10 + i as u32) | RELAY_INDEX_BIT, peer, &relay_key(&key(2, i)));
    }
    let mut seals = [SealKey::new(&key(1, 2)), SealKey::new(&relay_key(&key(1, 2))), SealKey::new(&key(3, 2)), SealKey::new(&relay_key(&key(3, 2)))];

    let mut out = RxOut::default();
    let mut now = 0u64;
    let mut dgram = Vec::new();
    while rest.len() >= 3 {
        let len = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 3);
        let sel = rest[2];
        let (body, tail) = rest[3..].split_at(len);
        rest = tail;
        now += u64::from(sel >> 4);
        dgram.clear();
        let sealed = sel & 8 != 0;
        let mut came_ttl = 0;
        if sealed {
            let s = (sel & 3) as usize;
            let index = [1u32, 1 | RELAY_INDEX_BIT, 3, 3 | RELAY_INDEX_BIT][s];
            let Ok(counter) = seals[s].next_counter() else { continue };
            dgram.extend_from_slice(&OuterHeader { receiver_index: index, counter }.to_bytes());
            dgram.extend_from_slice(body);
            came_ttl = body.first().copied().unwrap_or(0);
            let (aad, plain) = dgram.split_at_mut(OUTER_LEN);
            let Ok((_, tag)) = seals[s].seal_in_place(aad, plain) else { continue };
            dgram.extend_from_slice(&tag);
        } else {
            dgram.extend_from_slice(body);
        }
        let from = addr(sel & 7);
        let ok = plane.receive(now, &mut dgram, from, &mut out).is_ok();
        if !ok || !sealed {
            assert_eq!(out.deliveries() + out.relays.sends.len(), 0, "only authentic datagrams act");
        }
        for unit in plane.deliveries(&out, &dgram) {
            assert!(!unit.is_empty() && unit.len() <= MAX_UNIT + 64);
        }
        for t in &out.relays.sends {
            let to = if t.addr == addr(1) { P1 } else { assert_eq!(t.addr, addr(3)); P3 };
            for i in t.datagrams.clone() {
                let mut d = out.relays.batch.datagram(i).expect("in the batch").to_vec();
                assert!(d.len() <= MAX && d.len() <= MAX_DATAGRAM);
                let mut hdrs = Vec::new();
                let r = openers.receive(now, &mut d, |p, h: &InnerHeader, u| {
                    assert!(!u.is_empty());
                    hdrs.push((p, *h));
                });
                r.expect("a relayed datagram opens under the next hop's relay session");
                for (p, h) in hdrs {
                    assert_eq!(p, to);
                    assert!(h.ttl < came_ttl, "a relay lowers the TTL ({} from {came_ttl})", h.ttl);
                }
            }
        }
        out.learned.clear();
        out.heard.clear();
        if sel & 0x80 != 0 {
            plane.poll(now, &mut out);
            assert_eq!(out.relays.sends.len(), 0, "poll relays nothing");
            for unit in plane.deliveries(&out, &[]) {
                assert!(!unit.is_empty());
            }
        }
    }
});
