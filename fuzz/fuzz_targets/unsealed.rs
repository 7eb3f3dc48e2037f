//! `trusted (userspace)`: feeds arbitrary bytes to a `Receiver` that takes
//! unsealed datagrams from one peer at one address, two ways:
//! - as a datagram off the wire from the agreed address and from a stranger's
//!   (flag, tag, session and inner header all attacker-chosen);
//! - as a sequence of plaintexts (each prefixed by a big-endian u16 length)
//!   framed as unsealed datagrams under the session (flag set, zero tag), so
//!   the record parser and chunk reassembly see them as the trusted peer could
//!   send them.
//!
//! Nothing may panic, every unit delivered must be 1..=MAX_UNIT bytes, and
//! nothing is ever delivered from the stranger's address.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use meshnet_proto::datapath::Receiver;
use meshnet_proto::wire::datagram::{OuterHeader, OuterPacket, MAX_UNIT, OUTER_FLAG_UNSEALED, TAG_LEN};
use meshnet_proto::PeerName;

const KEY: [u8; 32] = [0x5a; 32];
const INDEX: u32 = 1;

fuzz_target!(|data: &[u8]| {
    let peer = PeerName(0x0200_0000_0001);
    let agreed: IpAddr = "fd00::2".parse().unwrap();
    let stranger: IpAddr = "fd00::66".parse().unwrap();
    let mut rx = Receiver::new();
    rx.add_session(INDEX, peer, &KEY);
    rx.set_unsealed_from(peer, Some(agreed));

    let mut delivered = 0usize;
    let mut raw = data.to_vec();
    let _ = rx.receive_placed_from(0, &mut raw, Some(stranger), |_, _, _, _| delivered += 1, |_, _, _| {}, |_, _, _, _| {});
    assert_eq!(delivered, 0, "delivered from a stranger");
    let mut raw = data.to_vec();
    let check = |_: PeerName, _: &meshnet_proto::wire::datagram::InnerHeader, unit: &[u8], _| {
        assert!(!unit.is_empty() && unit.len() <= MAX_UNIT);
    };
    let _ = rx.receive_placed_from(0, &mut raw, Some(agreed), check, |_, _, _| {}, |_, _, _, _| {});

    let mut rest = data;
    let mut now = 0u64;
    let mut counter = 0u64;
    let mut dgram = Vec::new();
    while rest.len() >= 2 {
        let len = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let (plain, tail) = rest[2..].split_at(len);
        rest = tail;
        dgram.clear();
        dgram.extend_from_slice(&OuterHeader { receiver_index: INDEX, counter }.to_bytes());
        OuterPacket::new_unchecked(&mut dgram[..]).set_flags(OUTER_FLAG_UNSEALED);
        dgram.extend_from_slice(plain);
        dgram.extend_from_slice(&[0u8; TAG_LEN]);
        let _ = rx.receive_placed_from(now, &mut dgram, Some(agreed), check, |_, _, _| {}, |_, _, _, _| {});
        counter += 1;
        now += 100;
        rx.expire(now);
    }
});
