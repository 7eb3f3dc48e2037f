//! Heartbeats, as a peer that holds the session key could shape them, through
//! the receiver and into path-MTU discovery:
//! - the bytes as a datagram off the wire (almost always refused at the outer
//!   header or the tag);
//! - then a sequence of heartbeat plaintexts sealed under the session's key
//!   (each: u16 length, u16 milliseconds to advance, u16 datagram length to
//!   claim, then the plaintext), each fed to `Receiver::receive_any` and what it
//!   authenticates to a `Liveness`, which is polled between them.
//!
//! Nothing may panic; a heartbeat never delivers a unit; what `Liveness` says
//! stays within its bounds: the path MTU never exceeds the largest datagram we
//! send and exists only while UDP works both ways, and the probe sizes it asks
//! for are largest first, none above that maximum, the ladder's below the
//! first never under its smallest rung.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::datapath::{Receiver, MIN_HEARTBEAT};
use meshnet_proto::liveness::{Liveness, LADDER};
use meshnet_proto::session::SealKey;
use meshnet_proto::wire::datagram::{Heartbeat, OuterHeader, OuterPacket, KIND_HEARTBEAT, OUTER_LEN};
use meshnet_proto::PeerName;

const KEY: [u8; 32] = [0x3c; 32];
const INDEX: u32 = 7;
const MAX: usize = 1472;

fn no_unit(_: PeerName, _: &meshnet_proto::wire::datagram::InnerHeader, _: &[u8]) {
    panic!("a heartbeat delivered a unit");
}

fuzz_target!(|data: &[u8]| {
    let peer = PeerName(0x0200_0000_0007);
    let mut rx = Receiver::new();
    rx.add_session(INDEX, peer, &KEY);
    let mut live = Liveness::new(MAX, 0);
    let mut heard: Vec<(Heartbeat, usize)> = Vec::new();

    let mut raw = data.to_vec();
    let _ = rx.receive_any(0, &mut raw, no_unit, |p, hb, len| {
        assert_eq!(p, peer);
        heard.push((hb, len));
    });
    let smallest = LADDER[LADDER.len() - 1] as usize;

    let mut seal = SealKey::new(&KEY);
    let mut rest = data;
    let mut now = 0u64;
    let mut sizes = Vec::new();
    let mut dgram = Vec::new();
    while rest.len() >= 6 {
        let len = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 6);
        let step = u16::from_be_bytes([rest[2], rest[3]]) as u64;
        let claimed = u16::from_be_bytes([rest[4], rest[5]]) as usize;
        let (plain, tail) = rest[6..].split_at(len);
        rest = tail;
        let Ok(counter) = seal.next_counter() else { break };
        dgram.clear();
        dgram.extend_from_slice(&OuterHeader { receiver_index: INDEX, counter }.to_bytes());
        OuterHeader { receiver_index: INDEX, counter }.emit_kind(KIND_HEARTBEAT, &mut OuterPacket::new_unchecked(&mut dgram[..]));
        dgram.extend_from_slice(plain);
        let (aad, body) = dgram.split_at_mut(OUTER_LEN);
        let Ok((_, tag)) = seal.seal_in_place(aad, body) else { break };
        dgram.extend_from_slice(&tag);
        let got = rx.receive_any(now, &mut dgram, no_unit, |_, hb, len| heard.push((hb, len)));
        if got.is_ok() {
            assert!(dgram.len() >= MIN_HEARTBEAT);
        }
        now += step;
        for (hb, len) in heard.drain(..) {
            assert_eq!(hb, Heartbeat::parse(&hb.to_bytes()).expect("a heartbeat's own bytes parse"));
            // The router records the datagram's length, which the fuzzer may also claim freely.
            live.on_heartbeat(now, hb, if claimed % 2 == 0 { len } else { claimed });
        }
        if let Some(mtu) = live.path_mtu(now) {
            assert!(mtu <= MAX, "path MTU {mtu} above our maximum");
            assert!(live.udp_ok(now));
        }
        if live.poll(now, &mut sizes).is_some() {
            assert!(!sizes.is_empty());
            assert!(sizes.windows(2).all(|w| w[0] > w[1]), "probe sizes not largest first: {sizes:?}");
            // Sizes follow what the peer said it heard, which the router clamps to
            // MIN_HEARTBEAT..=MAX before sealing; the ladder part stays within bounds.
            assert!(sizes[0] as usize <= MAX);
            assert!(sizes.iter().skip(1).all(|&s| s as usize >= smallest && (s as usize) <= MAX));
        }
    }
});
