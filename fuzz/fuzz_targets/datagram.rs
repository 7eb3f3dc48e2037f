//! Feeds arbitrary bytes to a `Receiver` holding one session (fixed key,
//! receiver index 1), two ways:
//! - as a datagram off the wire, which almost always stops at the outer header
//!   or the tag;
//! - as a sequence of plaintexts (each prefixed by a big-endian u16 length)
//!   sealed under the session's key, so that the record parser and chunk
//!   reassembly see attacker-shaped input as an authenticated peer could send it;
//!   a plaintext whose length is odd is sealed as a heartbeat instead, so the
//!   heartbeat parser sees it too.
//!
//! Nothing may panic, and every unit delivered must be 1..=MAX_UNIT bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnet_proto::datapath::Receiver;
use meshnet_proto::session::SealKey;
use meshnet_proto::wire::datagram::{OuterHeader, KIND_HEARTBEAT, MAX_UNIT, OUTER_LEN};
use meshnet_proto::wire::datagram::OuterPacket;
use meshnet_proto::PeerName;

const KEY: [u8; 32] = [0x5a; 32];
const INDEX: u32 = 1;

fn check_unit(_: PeerName, _: &meshnet_proto::wire::datagram::InnerHeader, unit: &[u8]) {
    assert!(!unit.is_empty() && unit.len() <= MAX_UNIT);
}

fn check_heartbeat(_: PeerName, _: meshnet_proto::wire::datagram::Heartbeat, len: usize) {
    assert!(len >= meshnet_proto::datapath::MIN_HEARTBEAT);
}

fuzz_target!(|data: &[u8]| {
    let mut rx = Receiver::new();
    rx.add_session(INDEX, PeerName(0x0200_0000_0001), &KEY);

    let mut raw = data.to_vec();
    let _ = rx.receive_any(0, &mut raw, check_unit, check_heartbeat);

    let mut seal = SealKey::new(&KEY);
    let mut rest = data;
    let mut now = 0u64;
    let mut dgram = Vec::new();
    while rest.len() >= 2 {
        let len = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let (plain, tail) = rest[2..].split_at(len);
        rest = tail;
        let Ok(counter) = seal.next_counter() else { break };
        dgram.clear();
        dgram.extend_from_slice(&OuterHeader { receiver_index: INDEX, counter }.to_bytes());
        if len % 2 == 1 {
            OuterHeader { receiver_index: INDEX, counter }
                .emit_kind(KIND_HEARTBEAT, &mut OuterPacket::new_unchecked(&mut dgram[..]));
        }
        dgram.extend_from_slice(plain);
        let (aad, body) = dgram.split_at_mut(OUTER_LEN);
        let Ok((_, tag)) = seal.seal_in_place(aad, body) else { break };
        dgram.extend_from_slice(&tag);
        let _ = rx.receive_any(now, &mut dgram, check_unit, check_heartbeat);
        now += 100;
        rx.expire(now);
    }
});
