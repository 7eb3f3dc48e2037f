//! The TX plane's handling of units read from the device (what containers
//! send, behind the virtio header the kernel puts before it), as the
//! forwarding thread drives it: `TxPlane::handle` on batches of units.
//!
//! Router 2 has two direct peers, 1 (with or without superframes, by the
//! flags) and 3, and a peer 4 with a smaller MTU behind 3; it has learned a
//! MAC behind each, with routes and its own broadcast tree. Input: a flags
//! byte, then records of a u16 length, a selector byte and bytes: one unit, a
//! virtio header (zero, or the input's own) and a frame whose destination
//! MAC the selector picks (a learned one, broadcast, or the input's own) and
//! whose source is a MAC of this host or the input's own; the selector's high
//! bit ends a batch.
//!
//! Nothing may panic, and, checked independently: datagrams go to the
//! addresses of peers 1 and 3 only, each at most the largest datagram, and
//! each opens under that peer's session, carrying non-empty units from this
//! router to a known peer (or broadcast) with a TTL; frames for the device
//! (ICMP errors) are non-empty and no larger than a frame of the overlay.
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use meshnet_proto::datapath::{Receiver, MAX_DATAGRAM};
use meshnet_proto::gso::VNET_HDR_LEN;
use meshnet_proto::plane::tx::{TxOut, TxPlane};
use meshnet_proto::plane::{PeerPath, Routes};
use meshnet_proto::PeerName;

const ME: PeerName = PeerName(0x0200_0000_0002);
const P1: PeerName = PeerName(0x0200_0000_0001);
const P3: PeerName = PeerName(0x0200_0000_0003);
const P4: PeerName = PeerName(0x0200_0000_0004);
const MAX: usize = 1472;

fn key(from: u8, to: u8) -> [u8; 32] {
    let mut k = [0x44; 32];
    k[0] = from;
    k[1] = to;
    k
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 6783))
}

fn mac(i: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, i]
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else { return };
    let mut plane = TxPlane::new(ME, MAX, flags & 1 == 0, Arc::default(), Arc::default());
    let mut openers = [Receiver::new(), Receiver::new()];
    for (n, (peer, i)) in [(P1, 1u8), (P3, 3u8)].into_iter().enumerate() {
        let superframes = i == 3 || flags & 2 == 0;
        let path = PeerPath { peer, addr: addr(i), superframes, multiqueue: flags & 4 == 0 };
        plane.add_peer(path, 20 + i as u32, &key(2, i), Arc::default());
        openers[n].add_session(20 + i as u32, ME, &key(2, i));
    }
    let mut routes = Routes::default();
    for (p, hop) in [(P1, P1), (P3, P3), (P4, P3)] {
        routes.next_hop.insert(p, hop);
    }
    routes.children.insert(ME, vec![P1, P3]);
    routes.mtu.insert(P4, 1200);
    plane.set_routes(Arc::new(routes));
    for (m, p) in [(1, P1), (3, P3), (4, P4)] {
        plane.learn(mac(m), p, 0);
    }

    let mut out = TxOut::default();
    let mut now = 0u64;
    let mut units: Vec<Vec<u8>> = Vec::new();
    while rest.len() >= 3 {
        let len = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 3);
        let sel = rest[2];
        let (mut body, tail) = rest[3..].split_at(len);
        rest = tail;
        let mut unit = Vec::with_capacity(VNET_HDR_LEN + 12 + body.len());
        if sel & 8 != 0 && body.len() >= VNET_HDR_LEN {
            unit.extend_from_slice(&body[..VNET_HDR_LEN]);
            body = &body[VNET_HDR_LEN..];
        } else {
            unit.extend_from_slice(&[0; VNET_HDR_LEN]);
        }
        match sel & 3 {
            0 => unit.extend_from_slice(&mac(1)),
            1 => unit.extend_from_slice(&mac(4)),
            2 => unit.extend_from_slice(&[0xff; 6]),
            _ => {}
        }
        if sel & 4 == 0 {
            unit.extend_from_slice(&mac(2));
        }
        unit.extend_from_slice(body);
        units.push(unit);
        if sel & 0x80 == 0 && units.len() < 64 {
            continue;
        }
        now += u64::from(sel >> 4 & 7) * 1000;
        let lens: Vec<usize> = units.iter().map(Vec::len).collect();
        plane.handle(now, &units, &lens, &mut out);
        units.clear();
        check(&out, &mut openers, now);
    }
});

fn check(out: &TxOut, openers: &mut [Receiver; 2], now: u64) {
    for t in &out.datagrams.sends {
        let n = if t.addr == addr(1) {
            0
        } else {
            assert_eq!(t.addr, addr(3), "a datagram for an address that is no peer's");
            1
        };
        for i in t.datagrams.clone() {
            let mut d = out.datagrams.batch.datagram(i).expect("in the batch").to_vec();
            assert!(d.len() <= MAX && d.len() <= MAX_DATAGRAM, "a datagram of {} bytes", d.len());
            openers[n]
                .receive(now, &mut d, |p, h, u| {
                    assert_eq!(p, ME);
                    assert!(!u.is_empty());
                    assert_eq!(h.src, ME);
                    assert!(h.ttl > 0);
                    assert!(h.broadcast || [P1, P3, P4].contains(&h.dst), "units for {:?}", h.dst);
                })
                .expect("a datagram opens under the peer's session");
        }
    }
    for f in out.device_frames() {
        assert!(!f.is_empty() && f.len() <= VNET_HDR_LEN + 14 + 1500, "a device frame of {} bytes", f.len());
    }
}
