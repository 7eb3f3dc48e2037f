//! Rekeying between two connection ends (an initiator and a responder), driven
//! by the input: time passes by input-chosen steps, messages in flight are
//! delivered in order, dropped, or joined by messages the input makes up (any
//! `RekeyMsg` a dishonest peer could send over its authenticated channel).
//!
//! Nothing may panic; no side ever installs or sends under a relay index (top
//! bit); a side removes only receiving indexes it installed; a side holds at
//! most `MAX_RETIRING` + 2 receiving keys at once (newest, pending, retiring),
//! however fast the peer rekeys; the epoch never goes backwards. While the
//! run is honest (nothing made up, nothing dropped, nobody closed), every key a
//! side sends under is installed, under that index with that key, at the other
//! side once the messages in flight are delivered.
#![no_main]

use std::collections::{HashMap, VecDeque};

use libfuzzer_sys::fuzz_target;
use meshnet_proto::handshake::{DataKeys, Role};
use meshnet_proto::rekey::{Fresh, Output, RekeyConfig, RekeyMsg, Rekeyer, MAX_RETIRING, MIN_INTERVAL_MS};
use meshnet_proto::session::RELAY_INDEX_BIT;

struct End {
    r: Rekeyer,
    /// Receiving keys installed: index -> key.
    recv: HashMap<u32, [u8; 32]>,
    /// Where and with what we send.
    send: (u32, [u8; 32]),
    epoch: u32,
    closed: bool,
    /// Messages to the other end, in order.
    outbox: VecDeque<RekeyMsg>,
}

impl End {
    fn perform(&mut self, out: Vec<Output>) {
        for o in out {
            match o {
                Output::InstallRecv { index, key } => {
                    assert_eq!(index & RELAY_INDEX_BIT, 0, "installed a relay index");
                    self.recv.insert(index, key.0);
                }
                Output::SwitchSend { from_index, index, key } => {
                    assert_eq!(from_index, self.send.0, "switched from an index we do not send under");
                    assert_eq!(index & RELAY_INDEX_BIT, 0, "sends under a relay index");
                    self.send = (index, key.0);
                }
                Output::RemoveRecv { index } => {
                    assert!(self.recv.remove(&index).is_some(), "removed index {index} it never installed");
                }
                Output::Send(m) => self.outbox.push_back(m),
                Output::Rekeyed { epoch } => {
                    assert!(epoch > self.epoch, "epoch went from {} to {epoch}", self.epoch);
                    self.epoch = epoch;
                }
                Output::Close(_) => self.closed = true,
            }
        }
        assert!(self.recv.len() <= MAX_RETIRING + 2, "{} receiving keys installed", self.recv.len());
    }
}

/// Fresh material from the input's counter (indexes unique per run).
fn fresh_from(counter: &mut u32) -> impl FnMut() -> Fresh + '_ {
    move || {
        *counter += 1;
        let mut secret = [0u8; 32];
        for (i, b) in secret.iter_mut().enumerate() {
            *b = (*counter as u8).wrapping_mul(31).wrapping_add(i as u8) | 1;
        }
        Fresh { secret, recv_index: 100 + *counter }
    }
}

fn made_up(b: &[u8]) -> RekeyMsg {
    let epoch = u32::from(b[1] % 4);
    let mut public = [0u8; 32];
    public.iter_mut().enumerate().for_each(|(i, p)| *p = b[2].wrapping_add(i as u8));
    if b[3] & 1 == 0 {
        public = [0; 32]; // the all-zero (low-order) point
    }
    let receiver_index = u32::from(b[3]) << 24 | 7;
    match b[0] % 4 {
        0 => RekeyMsg::Offer { epoch, public, receiver_index },
        1 => RekeyMsg::Accept { epoch, public, receiver_index },
        2 => RekeyMsg::Switched { epoch },
        _ => RekeyMsg::Request { epoch },
    }
}

fuzz_target!(|data: &[u8]| {
    let (ka, kb) = ([1u8; 32], [2u8; 32]);
    let cfg = RekeyConfig { interval_ms: MIN_INTERVAL_MS };
    let mut now = 0u64;
    let mut counter = 0u32;
    let mk = |role, keys: DataKeys, recv: u32, send: u32, skey: [u8; 32], rkey: [u8; 32]| End {
        r: Rekeyer::new(role, cfg, &keys, recv, send, 0),
        recv: HashMap::from([(recv, rkey)]),
        send: (send, skey),
        epoch: 0,
        closed: false,
        outbox: VecDeque::new(),
    };
    let mut ends = [
        mk(Role::Initiator, DataKeys { send: ka, recv: kb }, 1, 2, ka, kb),
        mk(Role::Responder, DataKeys { send: kb, recv: ka }, 2, 1, kb, ka),
    ];
    let mut honest = true;
    for op in data.chunks(5) {
        if op.len() < 5 {
            break;
        }
        let side = usize::from(op[0] & 1);
        match op[0] >> 1 & 3 {
            // Time passes; the side polls.
            0 => {
                now += u64::from(u16::from_le_bytes([op[1], op[2]]));
                for e in &mut ends {
                    let out = e.r.poll(now, 0, &mut fresh_from(&mut counter));
                    e.perform(out);
                }
            }
            // The next message in flight reaches the other side.
            1 => {
                if let Some(m) = ends[side].outbox.pop_front() {
                    let other = &mut ends[1 - side];
                    let out = other.r.on_message(now, m, &mut fresh_from(&mut counter));
                    other.perform(out);
                }
            }
            // Lost (a dishonest or broken channel: the control channel is reliable).
            2 => {
                honest &= ends[side].outbox.pop_front().is_none();
            }
            // Made up by the peer.
            _ => {
                honest = false;
                let out = ends[side].r.on_message(now, made_up(&op[1..]), &mut fresh_from(&mut counter));
                ends[side].perform(out);
            }
        }
        if ends.iter().any(|e| e.closed) {
            honest = false;
        }
    }
    // Everything in flight is delivered; then each side's sending key opens at the other.
    for _ in 0..8 {
        for side in 0..2 {
            while let Some(m) = ends[side].outbox.pop_front() {
                let other = &mut ends[1 - side];
                let out = other.r.on_message(now, m, &mut fresh_from(&mut counter));
                other.perform(out);
            }
        }
    }
    if honest && !ends.iter().any(|e| e.closed) {
        for side in 0..2 {
            let (index, key) = ends[side].send;
            assert_eq!(ends[1 - side].recv.get(&index), Some(&key), "side {side} sends under a key the other cannot open");
        }
    }
});
