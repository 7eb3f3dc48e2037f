//! What meshnet's own user-space work costs per gigabyte on this machine, one
//! core, no system calls: sealing 64 KiB superframes into datagrams (the TX
//! side of one stream), opening and reassembling them (the RX side), and a
//! plain 64 KiB copy (the kernel does four of them per superframe: TAP read,
//! UDP send, UDP receive, TAP write). BENCHMARKS.md ("A floor for an encrypted
//! user-space path") uses these figures.
//!
//! cargo run --release -p meshnet-proto --example plane_cost [-- DATAGRAM_BYTES]

use meshnet_proto::datapath::{Encoder, Receiver, TxBatch, TxSession};
use meshnet_proto::session::KEY_LEN;
use meshnet_proto::wire::datagram::InnerHeader;
use meshnet_proto::PeerName;
use std::hint::black_box;
use std::time::{Duration, Instant};

const UNIT: usize = 65_000;
const IDX: u32 = 7;

fn main() {
    let datagram: usize = std::env::args().nth(1).map_or(1472, |a| a.parse().expect("DATAGRAM_BYTES: a number"));
    let key = [9u8; KEY_LEN];
    let hdr = InnerHeader { ttl: 8, broadcast: false, src: PeerName(1), dst: PeerName(2) };
    let unit: Vec<u8> = (0..UNIT).map(|i| (i * 7) as u8).collect();
    let mut enc = Encoder::new(datagram);
    let mut tx = TxSession::new(IDX, &key);
    let mut batch = TxBatch::with_capacity(2 * UNIT, 64);
    let mut seal = |batch: &mut TxBatch| {
        batch.clear();
        enc.begin(&mut tx, hdr, batch);
        enc.push(&mut tx, &unit, batch).expect("push");
        enc.finish(&mut tx, batch).expect("finish");
    };
    let seal_t = best_of(5, || per_unit(&mut || seal(&mut batch)));
    let datagrams = batch.datagram_count();

    // The receiver opens copies of one sealed superframe; counters must be
    // fresh, so each round seals a new one first and only the opening is timed.
    let mut rx = Receiver::new();
    rx.add_session(IDX, PeerName(1), &key);
    let mut scratch: Vec<Vec<u8>> = Vec::new();
    let open_t = best_of(5, || {
        let mut spent = Duration::ZERO;
        let mut n = 0u32;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(400) {
            seal(&mut batch);
            scratch.clear();
            scratch.extend(batch.datagrams().map(<[u8]>::to_vec));
            let t = Instant::now();
            let mut got = 0;
            for d in scratch.iter_mut() {
                got += rx.receive(0, d, |_, _, u| {
                    black_box(u);
                })
                .expect("open");
            }
            spent += t.elapsed();
            assert_eq!(got, 1, "the superframe is delivered once");
            n += 1;
        }
        spent / n
    });

    // ring alone, the whole superframe in one call and in datagram-sized
    // calls: what chunking costs in calls, apart from meshnet's own code.
    let aead = ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).expect("key"));
    let mut buf = unit.clone();
    let mut seal_ring = |size: usize| {
        let mut n = 0u64;
        for piece in buf.chunks_mut(size) {
            n += 1;
            let nonce = ring::aead::Nonce::assume_unique_for_key([0u8; 12]);
            let tag = aead.seal_in_place_separate_tag(nonce, ring::aead::Aad::from([0u8; 16]), piece).expect("seal");
            let _ = black_box(tag);
        }
        n
    };
    let ring_whole = best_of(5, || per_unit(&mut || { black_box(seal_ring(UNIT)); }));
    let chunk = enc.chunk_payload();
    let ring_chunked = best_of(5, || per_unit(&mut || { black_box(seal_ring(chunk)); }));

    let src = vec![1u8; UNIT];
    let mut dst = vec![0u8; UNIT];
    let hot = best_of(5, || {
        per_unit(&mut || {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        })
    });
    // Copies that miss the caches, as a copy of a buffer another core just wrote.
    let ring: Vec<Vec<u8>> = (0..512).map(|i| vec![i as u8; UNIT]).collect();
    let mut k = 0;
    let cold = best_of(5, || {
        per_unit(&mut || {
            dst.copy_from_slice(black_box(&ring[k % ring.len()]));
            k += 1;
            black_box(&dst);
        })
    });

    let gb = |t: Duration| t.as_secs_f64() * 1e9 / UNIT as f64;
    println!("datagram {datagram} B: a {UNIT}-byte superframe is {datagrams} datagrams");
    println!("seal (Encoder::push, TX side):          {:>8.1} µs per superframe, {:.3} s/GB", us(seal_t), gb(seal_t));
    println!("open and reassemble (Receiver, RX side): {:>8.1} µs per superframe, {:.3} s/GB", us(open_t), gb(open_t));
    println!("ring AES-256-GCM, one call:              {:>8.1} µs, {:.3} s/GB", us(ring_whole), gb(ring_whole));
    println!("ring AES-256-GCM, {chunk}-byte calls:       {:>8.1} µs, {:.3} s/GB", us(ring_chunked), gb(ring_chunked));
    println!("copy 64 KiB, cache-hot:                  {:>8.1} µs, {:.3} s/GB", us(hot), gb(hot));
    println!("copy 64 KiB, from a 32 MiB ring:         {:>8.1} µs, {:.3} s/GB", us(cold), gb(cold));
    println!(
        "user-space crypto of both routers + four copies (hot..cold): {:.3}..{:.3} s/GB",
        gb(seal_t) + gb(open_t) + 4.0 * gb(hot),
        gb(seal_t) + gb(open_t) + 4.0 * gb(cold)
    );
}

/// Mean time of one call of `f` over ~400 ms.
fn per_unit(f: &mut impl FnMut()) -> Duration {
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < Duration::from_millis(400) {
        f();
        n += 1;
    }
    start.elapsed() / n
}

fn best_of(rounds: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..rounds).map(|_| f()).min().unwrap_or_default()
}

fn us(t: Duration) -> f64 {
    t.as_secs_f64() * 1e6
}
