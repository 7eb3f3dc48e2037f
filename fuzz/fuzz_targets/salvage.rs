//! The receiver's salvage path: superframes that lost chunks, given up with a
//! map of what arrived (`Receiver::receive_salvaging` when newer units overtook
//! them, `Receiver::salvage_older_than` by age), and cut into the segments
//! that did arrive by `gso::to_plain_frames_where`, as the RX thread does.
//!
//! Input: 8 bytes of parameters (payload length, gso_size, datagram size, how
//! many units, order), then a bitmap of which datagrams to lose, then (when a
//! flag says so) attacker-shaped plaintexts sealed under the session key (each
//! a u16 length and the records after a fixed inner header), so partial maps
//! and slot buffers also hold chunks a hostile peer chose.
//!
//! Nothing may panic, and, checked independently of the code under test:
//! every unit delivered whole is one of those sent, and every frame salvaged
//! from a real superframe is exactly a frame that segmenting the complete unit
//! gives (a salvaged segment never carries bytes that did not arrive, or
//! another unit's).
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use meshnet_proto::datapath::{Encoder, Receiver, TxBatch, TxSession, MIN_DATAGRAM, SALVAGE_AGE_MS};
use meshnet_proto::gso::{self, VNET_HDR_LEN};
use meshnet_proto::session::SealKey;
use meshnet_proto::wire::datagram::{InnerHeader, OuterHeader, MAX_UNIT, OUTER_LEN};
use meshnet_proto::PeerName;

const KEY: [u8; 32] = [0x77; 32];
const INDEX: u32 = 3;
const SRC: PeerName = PeerName(0x0200_0000_0001);
const DST: PeerName = PeerName(0x0200_0000_0002);

/// A TCPv4 superframe unit (virtio header asking for segmentation and the
/// checksum) with `payload` bytes cut at `mss`, its sequence number `seq`.
fn superframe(payload: usize, mss: u16, seq: u32, fill: u8) -> Vec<u8> {
    let mut u = vec![1, gso::GSO_TCPV4, 0, 0];
    u.extend_from_slice(&mss.to_le_bytes());
    u.extend_from_slice(&34u16.to_le_bytes());
    u.extend_from_slice(&16u16.to_le_bytes());
    u.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0]);
    u.extend_from_slice(&[0x45, 0]);
    u.extend_from_slice(&((40 + payload) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    u.extend_from_slice(&[0, 80, 0, 81]);
    u.extend_from_slice(&seq.to_be_bytes());
    u.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x18, 1, 0, 0, 0, 0, 0]);
    u.extend((0..payload).map(|i| (i as u8).wrapping_mul(7) ^ fill));
    u
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (p, rest) = data.split_at(8);
    let payload = u16::from_be_bytes([p[0], p[1]]) as usize % (65535 - 40 + 1);
    // At least 64 bytes a segment: a tiny gso_size makes ~64 Ki frames a unit, which only
    // slows the search down (the `gso` target covers segmentation's own edges).
    let mss = 64 + u16::from_be_bytes([p[2], p[3]]) % (9000 - 64);
    let max_datagram = MIN_DATAGRAM + u16::from_be_bytes([p[4], p[5]]) as usize % (9000 - MIN_DATAGRAM);
    let count = 1 + (p[6] & 7) as usize;
    let flags = p[7];
    let (lost, hostile) = rest.split_at(rest.len().min(32));

    let units: Vec<Vec<u8>> =
        (0..count).map(|k| superframe(payload, mss, 1000 + (k * payload) as u32, k as u8)).collect();
    let mut whole_frames: HashSet<Vec<u8>> = HashSet::new();
    let mut scratch = vec![0u8; MAX_UNIT + 64];
    for u in &units {
        // Units gso cannot cut (mss 0, ...) are still sent; they just salvage nothing.
        let _ = gso::to_plain_frames(u, &mut scratch, VNET_HDR_LEN, |f| {
            whole_frames.insert(f.to_vec());
        });
    }

    let mut enc = Encoder::new(max_datagram);
    let mut tx = TxSession::new(INDEX, &KEY);
    let mut batch = TxBatch::new();
    let hdr = InnerHeader { ttl: 16, broadcast: false, src: SRC, dst: DST };
    enc.begin(&mut tx, hdr, &mut batch);
    for u in &units {
        enc.push(&mut tx, u, &mut batch).expect("a fresh session seals");
    }
    enc.finish(&mut tx, &mut batch).expect("a fresh session seals");
    let mut dgrams: Vec<Vec<u8>> = batch.datagrams().map(<[u8]>::to_vec).collect();
    if flags & 1 != 0 {
        dgrams.reverse();
    }

    let mut rx = Receiver::new();
    rx.add_session(INDEX, SRC, &KEY);
    let mut out = vec![0u8; MAX_UNIT + 64];
    let mut check_partial = |peer: PeerName, h: &InnerHeader, unit: &[u8], have: &dyn Fn(usize, usize) -> bool, genuine: bool| {
        assert_eq!((peer, h.src), (SRC, SRC));
        assert!(!unit.is_empty() && unit.len() <= MAX_UNIT);
        assert!(!have(0, unit.len() + 1), "have() beyond the unit");
        let mut emitted = 0;
        let made = gso::to_plain_frames_where(unit, &mut out, VNET_HDR_LEN, have, |f| {
            assert!(f.len() > VNET_HDR_LEN && f[..VNET_HDR_LEN].iter().all(|&b| b == 0));
            if genuine {
                assert!(whole_frames.contains(f), "a salvaged frame that segmenting the whole unit does not give");
            }
            emitted += 1;
        });
        match made {
            Ok(n) => assert_eq!(n, emitted),
            Err(_) => assert_eq!(emitted, 0, "frames emitted before an error"),
        }
    };
    let mut now = 0u64;
    for (i, d) in dgrams.iter_mut().enumerate() {
        if lost.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0) {
            continue;
        }
        let r = rx.receive_salvaging(
            now,
            d,
            |_, _, u| assert!(units.iter().any(|x| x == u), "a whole unit that was never sent"),
            |_, _, _| panic!("no heartbeat was sent"),
            |peer, h, u, have| check_partial(peer, h, u, have, true),
        );
        if flags & 1 == 0 {
            // Reversed, the oldest counters of a long batch fall out of the replay window.
            r.expect("an authentic datagram in order is accepted");
        }
        if flags & 2 != 0 {
            now += 1;
            rx.salvage_older_than(now, SALVAGE_AGE_MS, |peer, h, u, have| check_partial(peer, h, u, have, true));
        }
    }

    // Hostile chunks, sealed with the session key: they share the slots.
    if flags & 0x80 != 0 {
        let mut seal = SealKey::new(&KEY);
        for _ in 0..dgrams.len() {
            if seal.next_counter().is_err() {
                return;
            }
        }
        let mut rest = hostile;
        let mut dgram = Vec::new();
        while rest.len() >= 2 {
            let len = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
            let (plain, tail) = rest[2..].split_at(len);
            rest = tail;
            let Ok(counter) = seal.next_counter() else { break };
            dgram.clear();
            dgram.extend_from_slice(&OuterHeader { receiver_index: INDEX, counter }.to_bytes());
            dgram.extend_from_slice(&hdr.to_bytes());
            dgram.extend_from_slice(plain);
            let (aad, body) = dgram.split_at_mut(OUTER_LEN);
            let Ok((_, tag)) = seal.seal_in_place(aad, body) else { break };
            dgram.extend_from_slice(&tag);
            now += 3;
            let _ = rx.receive_salvaging(
                now,
                &mut dgram,
                |_, _, u| assert!(!u.is_empty() && u.len() <= MAX_UNIT),
                |_, _, _| {},
                |peer, h, u, have| check_partial(peer, h, u, have, false),
            );
            rx.salvage_older_than(now, SALVAGE_AGE_MS, |peer, h, u, have| check_partial(peer, h, u, have, false));
        }
    }
    now += 1000;
    let genuine = flags & 0x80 == 0;
    rx.salvage_older_than(now, SALVAGE_AGE_MS, |peer, h, u, have| check_partial(peer, h, u, have, genuine));
    assert_eq!(rx.partial_units(), 0, "every partial unit is given up by age");
});
