//! Rekeying of a connection's data-plane keys: when, how, and which key is live.
//!
//! The handshake gives each connection one pair of data keys (epoch 0). This
//! module replaces them with fresh ones every `interval` (at most 120 s) and as
//! soon as a sending key has sealed [`REKEY_AFTER_BLOCKS`] AES blocks (far below
//! the AES-GCM usage limits of draft-irtf-cfrg-aead-limits), over the encrypted
//! control channel:
//!
//! ```text
//!  initiator (dialled)                           responder
//!  Offer{e, eph_i, idx_i}          ───────────►  derive e; install recv(e) at idx_r
//!  derive e; install recv(e) at idx_i  ◄───────  Accept{e, eph_r, idx_r}
//!  send under e
//!  Switched{e}                     ───────────►  send under e
//!  retire recv(e-1) in OVERLAP     ◄───────────  Switched{e}; retire recv(e-1) in OVERLAP
//! ```
//!
//! Each epoch's keys are HKDF-SHA256 of the previous epoch's key of the same
//! direction and a fresh X25519 agreement of the two ephemerals, with a label per
//! direction: a key stolen today opens nothing sealed after the next rekey
//! (post-compromise security), and erased keys cannot be rebuilt from later ones
//! (forward secrecy). Each epoch has new receiver indexes, so a datagram says by
//! its index which epoch sealed it and the wire format does not change.
//!
//! No datagram is lost or rejected across a switch: a side installs its new
//! receiving key *before* telling the peer it may use it (the caller runs the
//! outputs in order and waits for [`Output::InstallRecv`] to take effect), and
//! keeps the old receiving key for [`OVERLAP_MS`] after the peer said it stopped
//! sending under it. Keys this module holds are overwritten with zeros when
//! dropped.
//!
//! Either side keeps its own deadline: the responder asks for a rekey
//! ([`RekeyMsg::Request`]) when its interval or block limit is reached, and a
//! side closes the connection when a rekey it needs does not finish within
//! [`REKEY_TIMEOUT_MS`].
//!
//! Sans-I/O: time and randomness (the ephemeral secret, and the receiver index
//! the caller reserved) are passed in.

use curve25519_dalek::montgomery::MontgomeryPoint;
use ring::hkdf;
use serde::{Deserialize, Serialize};

use crate::handshake::{DataKeys, Role};
use crate::session::KEY_LEN;

/// The longest a data key is used: also the default `--rekey-interval`.
pub const MAX_INTERVAL_MS: u64 = 120_000;
/// The shortest interval accepted (for tests).
pub const MIN_INTERVAL_MS: u64 = 1_000;
/// How long an old receiving key stays after the peer stopped sealing under it:
/// datagrams already in flight (or queued behind a batch) still open.
pub const OVERLAP_MS: u64 = 5_000;
/// Most old receiving keys kept at once (each a receive session in the data
/// plane). Rekeys at the shortest interval retire one key a second, each kept
/// [`OVERLAP_MS`]: an honest peer never needs more than 6. A peer that offers
/// (or asks for) rekeys faster than that would make us hold sessions without
/// bound; its Offer closes the connection, its Request waits.
pub const MAX_RETIRING: usize = 8;
/// A rekey this side needs that has not finished after this long closes the
/// connection.
pub const REKEY_TIMEOUT_MS: u64 = 15_000;
/// Rekey once a sending key has sealed this many 16-byte AES blocks (64 GiB).
///
/// draft-irtf-cfrg-aead-limits bounds AES-GCM's confidentiality advantage by
/// about `(q·l)² / 2^129` (`q` messages of `l` blocks); TLS 1.3 derives from it
/// its limit of 2^24.5 records of 2^10 blocks, 2^34.5 blocks in all, for an
/// advantage of 2^-60. 2^32 blocks stays a factor 5.6 below that (advantage
/// ≤ 2^-65), and is about 55 s of sending at 10 Gbit/s.
pub const REKEY_AFTER_BLOCKS: u64 = 1 << 32;

/// AES blocks a key has processed after sealing `datagrams` datagrams of at most
/// `max_datagram` bytes (an upper bound: one more block for the tag's `J0`).
pub fn blocks_sealed(datagrams: u64, max_datagram: usize) -> u64 {
    datagrams.saturating_mul(max_datagram.div_ceil(16) as u64 + 1)
}

/// Rekeying parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RekeyConfig {
    /// Fresh keys at least this often (ms), within [`MIN_INTERVAL_MS`]..=[`MAX_INTERVAL_MS`].
    pub interval_ms: u64,
}

impl Default for RekeyConfig {
    fn default() -> Self {
        RekeyConfig { interval_ms: MAX_INTERVAL_MS }
    }
}

/// Rekey messages, carried in `ControlMsg::Rekey`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RekeyMsg {
    /// Initiator: let us move to `epoch`; my ephemeral is `public`; send me
    /// datagrams of `epoch` under `receiver_index`.
    Offer { epoch: u32, public: [u8; 32], receiver_index: u32 },
    /// Responder: my ephemeral is `public`; I already receive `epoch` under
    /// `receiver_index`.
    Accept { epoch: u32, public: [u8; 32], receiver_index: u32 },
    /// I receive under `epoch` and now send under it only.
    Switched { epoch: u32 },
    /// Responder: my sending key (at `epoch`) is due; please offer a rekey.
    Request { epoch: u32 },
}

/// A 32-byte key that is overwritten with zeros when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(pub [u8; KEY_LEN]);

impl Drop for Key {
    fn drop(&mut self) {
        erase(&mut self.0);
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Drop for DataKeys {
    fn drop(&mut self) {
        erase(&mut self.send);
        erase(&mut self.recv);
    }
}

/// Overwrites `bytes` with zeros in a way the compiler does not elide.
pub fn erase(bytes: &mut [u8]) {
    for b in bytes.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// What the caller must do, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Start accepting datagrams under `index` (and its relay index) opened
    /// with `key`. Must have taken effect before the next output is run.
    InstallRecv { index: u32, key: Key },
    /// Seal what goes to the peer under `index`/`key` from now on, replacing
    /// the session under `from_index`.
    SwitchSend { from_index: u32, index: u32, key: Key },
    /// Stop accepting datagrams under `index` (and its relay index); erase its key.
    RemoveRecv { index: u32 },
    /// Send this to the peer over the control channel.
    Send(RekeyMsg),
    /// A new epoch is in use for sending (count it, show it).
    Rekeyed { epoch: u32 },
    /// Close the connection, with the reason.
    Close(String),
}

/// Fresh material for one rekey, from the caller's randomness.
pub struct Fresh {
    /// An X25519 secret (clamped when used): 32 random bytes.
    pub secret: [u8; 32],
    /// A receiver index no other session of this router uses, top bit clear.
    pub recv_index: u32,
}

impl Drop for Fresh {
    fn drop(&mut self) {
        erase(&mut self.secret);
    }
}

enum Pending {
    None,
    /// Initiator: sent an Offer.
    Offered { epoch: u32, secret: Key, recv_index: u32, since: u64 },
    /// Initiator: switched, waiting for the responder's Switched.
    AwaitSwitched { epoch: u32, old_recv: u32, since: u64 },
    /// Responder: sent an Accept, waiting for the initiator's Switched.
    Accepted { epoch: u32, send_index: u32, send_key: Key, old_recv: u32, since: u64 },
    /// Responder: sent a Request, waiting for an Offer.
    Requested { since: u64 },
}

/// One connection's rekeying state.
pub struct Rekeyer {
    role: Role,
    cfg: RekeyConfig,
    /// The epoch we send under.
    epoch: u32,
    /// When we started sending under `epoch`.
    epoch_since: u64,
    /// The index we send under now (the peer's receiving index of `epoch`).
    send_index: u32,
    /// The index we receive the newest epoch under.
    recv_index: u32,
    /// The newest epoch's keys, which the next epoch's are derived from.
    chain_send: Key,
    chain_recv: Key,
    pending: Pending,
    /// Old receiving indexes and when to remove them.
    retiring: Vec<(u32, u64)>,
    rekeys: u64,
}

impl std::fmt::Debug for Rekeyer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rekeyer")
            .field("role", &self.role)
            .field("epoch", &self.epoch)
            .field("send_index", &self.send_index)
            .field("recv_index", &self.recv_index)
            .finish_non_exhaustive()
    }
}

const LABEL_I2R: &[u8] = b"meshnet rekey i2r";
const LABEL_R2I: &[u8] = b"meshnet rekey r2i";

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        KEY_LEN
    }
}

/// The next epoch's key of one direction: HKDF-SHA256(salt = label, ikm =
/// previous key ‖ shared secret, info = label ‖ epoch).
fn next_key(prev: &Key, shared: &[u8; 32], label: &[u8], epoch: u32) -> Key {
    let mut ikm = [0u8; 64];
    ikm[..32].copy_from_slice(&prev.0);
    ikm[32..].copy_from_slice(shared);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, label).extract(&ikm);
    erase(&mut ikm);
    let e = epoch.to_be_bytes();
    let mut out = Key([0; KEY_LEN]);
    prk.expand(&[label, &e], Len32)
        .and_then(|okm| okm.fill(&mut out.0))
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

fn public_of(secret: &[u8; 32]) -> [u8; 32] {
    MontgomeryPoint::mul_base_clamped(*secret).to_bytes()
}

/// X25519; None for a peer public key of small order (an all-zero result).
fn agree(secret: &[u8; 32], public: &[u8; 32]) -> Option<[u8; 32]> {
    let shared = MontgomeryPoint(*public).mul_clamped(*secret).to_bytes();
    (shared != [0; 32]).then_some(shared)
}

impl Rekeyer {
    /// Epoch 0: the handshake's keys, received under `recv_index` (ours) and
    /// sent under `send_index` (the peer's), starting at `now`.
    pub fn new(role: Role, cfg: RekeyConfig, keys: &DataKeys, recv_index: u32, send_index: u32, now: u64) -> Self {
        let cfg = RekeyConfig { interval_ms: cfg.interval_ms.clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS) };
        Rekeyer {
            role,
            cfg,
            epoch: 0,
            epoch_since: now,
            send_index,
            recv_index,
            chain_send: Key(keys.send),
            chain_recv: Key(keys.recv),
            pending: Pending::None,
            retiring: Vec::new(),
            rekeys: 0,
        }
    }

    /// The epoch we send under.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// How long we have sent under the current epoch.
    pub fn key_age_ms(&self, now: u64) -> u64 {
        now.saturating_sub(self.epoch_since)
    }

    /// Rekeys completed (switches of our sending key).
    pub fn rekeys(&self) -> u64 {
        self.rekeys
    }

    /// The index we send under now.
    pub fn send_index(&self) -> u32 {
        self.send_index
    }

    /// Every receiving index still installed (newest and retiring).
    pub fn recv_indexes(&self) -> Vec<u32> {
        let mut v = vec![self.recv_index];
        v.extend(self.retiring.iter().map(|r| r.0));
        if let Pending::Accepted { old_recv, .. } | Pending::AwaitSwitched { old_recv, .. } = self.pending {
            v.push(old_recv);
        }
        v
    }

    /// When [`poll`](Self::poll) next has something to do, at the latest.
    pub fn next_deadline(&self) -> u64 {
        let mut t = self.epoch_since + self.cfg.interval_ms;
        for &(_, at) in &self.retiring {
            t = t.min(at);
        }
        match self.pending {
            Pending::None => {}
            Pending::Offered { since, .. }
            | Pending::AwaitSwitched { since, .. }
            | Pending::Accepted { since, .. }
            | Pending::Requested { since } => t = t.min(since + REKEY_TIMEOUT_MS),
        }
        t
    }

    /// Time passes. `sealed_blocks`: AES blocks sealed so far under the current
    /// sending key (see [`blocks_sealed`]). `fresh` is called when a rekey starts.
    pub fn poll(&mut self, now: u64, sealed_blocks: u64, fresh: &mut dyn FnMut() -> Fresh) -> Vec<Output> {
        let mut out = Vec::new();
        self.retiring.retain(|&(index, at)| {
            if now >= at {
                out.push(Output::RemoveRecv { index });
                false
            } else {
                true
            }
        });
        let due = now.saturating_sub(self.epoch_since) >= self.cfg.interval_ms || sealed_blocks >= REKEY_AFTER_BLOCKS;
        match (&self.pending, self.role) {
            (Pending::Offered { since, .. } | Pending::AwaitSwitched { since, .. } | Pending::Accepted { since, .. }, _)
                if now.saturating_sub(*since) >= REKEY_TIMEOUT_MS =>
            {
                out.push(Output::Close(format!("rekey to epoch {} not completed in time", self.epoch + 1)));
            }
            (Pending::Requested { since }, _) if now.saturating_sub(*since) >= REKEY_TIMEOUT_MS => {
                out.push(Output::Close(format!("peer did not rekey epoch {} in time", self.epoch)));
            }
            (Pending::None, Role::Initiator) if due => self.offer(now, fresh, &mut out),
            (Pending::None, Role::Responder) if due => {
                self.pending = Pending::Requested { since: now };
                out.push(Output::Send(RekeyMsg::Request { epoch: self.epoch }));
            }
            _ => {}
        }
        out
    }

    fn offer(&mut self, now: u64, fresh: &mut dyn FnMut() -> Fresh, out: &mut Vec<Output>) {
        if self.retiring.len() >= MAX_RETIRING {
            return; // asked again when a retiring key has gone (poll, or the peer's next Request)
        }
        let f = fresh();
        let epoch = self.epoch + 1;
        out.push(Output::Send(RekeyMsg::Offer { epoch, public: public_of(&f.secret), receiver_index: f.recv_index }));
        self.pending = Pending::Offered { epoch, secret: Key(f.secret), recv_index: f.recv_index, since: now };
    }

    /// A rekey message from the peer. Anything out of turn closes the connection.
    pub fn on_message(&mut self, now: u64, msg: RekeyMsg, fresh: &mut dyn FnMut() -> Fresh) -> Vec<Output> {
        let mut out = Vec::new();
        let unexpected = |what: &str| vec![Output::Close(format!("rekey: unexpected {what}"))];
        match (msg, self.role) {
            (RekeyMsg::Request { epoch }, Role::Initiator) => {
                // A request from before our last rekey is already answered.
                if epoch == self.epoch && matches!(self.pending, Pending::None) {
                    self.offer(now, fresh, &mut out);
                }
            }
            (RekeyMsg::Offer { epoch, public, receiver_index }, Role::Responder) => {
                if epoch != self.epoch.wrapping_add(1) || !matches!(self.pending, Pending::None | Pending::Requested { .. }) {
                    return unexpected("offer");
                }
                if receiver_index & crate::session::RELAY_INDEX_BIT != 0 {
                    return unexpected("receiver index");
                }
                if self.retiring.len() >= MAX_RETIRING {
                    return unexpected("offer: rekeys faster than old keys retire");
                }
                let f = fresh();
                let Some(mut shared) = agree(&f.secret, &public) else {
                    return unexpected("ephemeral key");
                };
                let recv = next_key(&self.chain_recv, &shared, LABEL_I2R, epoch);
                let send = next_key(&self.chain_send, &shared, LABEL_R2I, epoch);
                erase(&mut shared);
                self.chain_recv = recv.clone();
                self.chain_send = send.clone();
                let old_recv = std::mem::replace(&mut self.recv_index, f.recv_index);
                out.push(Output::InstallRecv { index: f.recv_index, key: recv });
                out.push(Output::Send(RekeyMsg::Accept { epoch, public: public_of(&f.secret), receiver_index: f.recv_index }));
                self.pending = Pending::Accepted { epoch, send_index: receiver_index, send_key: send, old_recv, since: now };
            }
            (RekeyMsg::Accept { epoch, public, receiver_index }, Role::Initiator) => {
                let Pending::Offered { epoch: offered, ref secret, recv_index, .. } = self.pending else {
                    return unexpected("accept");
                };
                if epoch != offered || receiver_index & crate::session::RELAY_INDEX_BIT != 0 {
                    return unexpected("accept");
                }
                let Some(mut shared) = agree(&secret.0, &public) else {
                    return unexpected("ephemeral key");
                };
                let send = next_key(&self.chain_send, &shared, LABEL_I2R, epoch);
                let recv = next_key(&self.chain_recv, &shared, LABEL_R2I, epoch);
                erase(&mut shared);
                self.chain_recv = recv.clone();
                self.chain_send = send.clone();
                let old_recv = std::mem::replace(&mut self.recv_index, recv_index);
                out.push(Output::InstallRecv { index: recv_index, key: recv });
                out.push(Output::SwitchSend { from_index: self.send_index, index: receiver_index, key: send });
                out.push(Output::Send(RekeyMsg::Switched { epoch }));
                self.switched(epoch, receiver_index, now, &mut out);
                // The Offer's secret is dropped (and erased) here.
                self.pending = Pending::AwaitSwitched { epoch, old_recv, since: now };
            }
            (RekeyMsg::Switched { epoch }, Role::Responder) => {
                let Pending::Accepted { epoch: accepted, send_index, ref send_key, old_recv, .. } = self.pending else {
                    return unexpected("switch");
                };
                if epoch != accepted {
                    return unexpected("switch");
                }
                out.push(Output::SwitchSend { from_index: self.send_index, index: send_index, key: send_key.clone() });
                out.push(Output::Send(RekeyMsg::Switched { epoch }));
                self.switched(epoch, send_index, now, &mut out);
                // The initiator sends under the new epoch only: the old receiving key goes soon.
                self.retiring.push((old_recv, now + OVERLAP_MS));
                self.pending = Pending::None;
            }
            (RekeyMsg::Switched { epoch }, Role::Initiator) => {
                let Pending::AwaitSwitched { epoch: ours, old_recv, .. } = self.pending else {
                    return unexpected("switch");
                };
                if epoch != ours {
                    return unexpected("switch");
                }
                self.retiring.push((old_recv, now + OVERLAP_MS));
                self.pending = Pending::None;
            }
            (RekeyMsg::Offer { .. }, Role::Initiator) => return unexpected("offer"),
            (RekeyMsg::Accept { .. }, Role::Responder) => return unexpected("accept"),
            (RekeyMsg::Request { .. }, Role::Responder) => return unexpected("request"),
        }
        out
    }

    fn switched(&mut self, epoch: u32, send_index: u32, now: u64, out: &mut Vec<Output>) {
        self.epoch = epoch;
        self.epoch_since = now;
        self.send_index = send_index;
        self.rekeys += 1;
        out.push(Output::Rekeyed { epoch });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{Encoder, Receiver, TxBatch, TxSession};
    use crate::session::relay_key;
    use crate::wire::datagram::InnerHeader;
    use crate::PeerName;

    /// A deterministic stream of fresh material (tests only).
    struct Source(u64, u32);
    impl Source {
        fn fresh(&mut self) -> Fresh {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.1 += 1;
            let mut secret = [0u8; 32];
            for (i, c) in secret.chunks_mut(8).enumerate() {
                c.copy_from_slice(&(self.0 ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes());
            }
            Fresh { secret, recv_index: self.1 }
        }
    }

    fn keys() -> (DataKeys, DataKeys) {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        (DataKeys { send: a, recv: b }, DataKeys { send: b, recv: a })
    }

    const CFG: RekeyConfig = RekeyConfig { interval_ms: 2_000 };

    fn pair() -> (Rekeyer, Rekeyer) {
        let (ki, kr) = keys();
        (Rekeyer::new(Role::Initiator, CFG, &ki, 10, 20, 0), Rekeyer::new(Role::Responder, CFG, &kr, 20, 10, 0))
    }

    /// One side's data plane: sealing session, receiver, and what it did.
    struct Plane {
        name: PeerName,
        tx: TxSession,
        rx: Receiver,
        installed: Vec<u32>,
        rekeyed: Vec<u32>,
    }

    impl Plane {
        fn new(name: u64, send_index: u32, send: &[u8; 32], recv_index: u32, recv: &[u8; 32], from: u64) -> Plane {
            let mut rx = Receiver::new();
            rx.add_session(recv_index, PeerName(from), recv);
            rx.add_session(recv_index | crate::session::RELAY_INDEX_BIT, PeerName(from), &relay_key(recv));
            Plane { name: PeerName(name), tx: TxSession::new(send_index, send), rx, installed: vec![recv_index], rekeyed: vec![] }
        }

        /// Runs outputs that touch the data plane; returns the messages to send, or the close reason.
        fn run(&mut self, outs: Vec<Output>, from: u64) -> Result<Vec<RekeyMsg>, String> {
            let mut msgs = Vec::new();
            for o in outs {
                match o {
                    Output::InstallRecv { index, key } => {
                        assert_eq!(index & crate::session::RELAY_INDEX_BIT, 0);
                        self.rx.add_session(index, PeerName(from), &key.0);
                        self.installed.push(index);
                    }
                    Output::SwitchSend { from_index, index, key } => {
                        assert_eq!(self.tx.receiver_index(), from_index);
                        self.tx = TxSession::new(index, &key.0);
                    }
                    Output::RemoveRecv { index } => {
                        assert!(self.rx.session_peer(index).is_some(), "removing {index} twice");
                        self.rx.remove_session(index);
                        self.installed.retain(|&i| i != index);
                    }
                    Output::Send(m) => msgs.push(m),
                    Output::Rekeyed { epoch } => self.rekeyed.push(epoch),
                    Output::Close(why) => return Err(why),
                }
            }
            Ok(msgs)
        }

        fn seal(&mut self, enc: &mut Encoder, n: u8) -> Vec<u8> {
            let mut batch = TxBatch::new();
            let hdr = InnerHeader { ttl: 16, broadcast: false, src: self.name, dst: PeerName(99) };
            enc.begin(&mut self.tx, hdr, &mut batch);
            let mut unit = vec![0u8; 10 + 60];
            unit[10..].fill(n);
            enc.push(&mut self.tx, &unit, &mut batch).unwrap();
            enc.finish(&mut self.tx, &mut batch).unwrap();
            assert_eq!(batch.datagram_count(), 1);
            batch.datagram(0).unwrap().to_vec()
        }
    }

    fn open(p: &mut Plane, now: u64, mut d: Vec<u8>) -> Vec<u8> {
        let mut got = Vec::new();
        p.rx.receive(now, &mut d, |_, _, u| got = u.to_vec()).expect("a datagram in flight was rejected");
        got
    }

    #[test]
    fn keys_change_every_epoch_and_both_sides_agree() {
        let (mut i, mut r) = pair();
        let mut src = Source(7, 100);
        let mut fresh = || src.fresh();
        let mut seen = vec![i.chain_send.0, i.chain_recv.0];
        for round in 1..=5u32 {
            let now = round as u64 * 2_000;
            // The one message each step sends (besides old keys being removed).
            let sent = |outs: Vec<Output>| -> RekeyMsg {
                let mut m = outs.into_iter().filter_map(|o| match o {
                    Output::Send(m) => Some(m),
                    _ => None,
                });
                let one = m.next().expect("a message");
                assert!(m.next().is_none());
                one
            };
            let offer = sent(i.poll(now, 0, &mut fresh));
            assert!(matches!(offer, RekeyMsg::Offer { .. }));
            let accept = sent(r.on_message(now, offer, &mut fresh));
            let switched = sent(i.on_message(now, accept, &mut fresh));
            let back = sent(r.on_message(now, switched, &mut fresh));
            assert!(i.on_message(now, back, &mut fresh).is_empty());
            assert_eq!((i.epoch(), r.epoch()), (round, round));
            assert_eq!(i.chain_send, r.chain_recv);
            assert_eq!(i.chain_recv, r.chain_send);
            assert_ne!(i.chain_send, i.chain_recv);
            for k in [i.chain_send.0, i.chain_recv.0] {
                assert!(!seen.contains(&k), "a key came back");
                seen.push(k);
            }
        }
        assert_eq!((i.rekeys(), r.rekeys()), (5, 5));
    }

    #[test]
    fn same_exchange_with_another_ephemeral_gives_other_keys() {
        let (ki, _) = keys();
        let prev = Key(ki.send);
        let a = next_key(&prev, &[3; 32], LABEL_I2R, 1);
        assert_ne!(a, next_key(&prev, &[4; 32], LABEL_I2R, 1));
        assert_ne!(a, next_key(&prev, &[3; 32], LABEL_R2I, 1));
        assert_ne!(a, next_key(&Key([9; 32]), &[3; 32], LABEL_I2R, 1));
    }

    /// Datagrams sealed under the old keys just before each switch, and delivered
    /// late (after the switch and after new-epoch datagrams), all open; so do
    /// those sealed under the new keys the moment they are used. Old keys go
    /// only OVERLAP_MS after the peer's switch, and nothing else leaks.
    #[test]
    fn no_datagram_in_flight_across_switches_is_rejected() {
        let (ki, kr) = keys();
        let mut i = Rekeyer::new(Role::Initiator, CFG, &ki, 10, 20, 0);
        let mut r = Rekeyer::new(Role::Responder, CFG, &kr, 20, 10, 0);
        let mut pi = Plane::new(1, 20, &ki.send, 10, &ki.recv, 2);
        let mut pr = Plane::new(2, 10, &kr.send, 20, &kr.recv, 1);
        let mut enc = Encoder::new(1400);
        let mut src = Source(42, 1000);
        let mut fresh = || src.fresh();
        let mut in_flight_to_r: Vec<Vec<u8>> = Vec::new();
        let mut in_flight_to_i: Vec<Vec<u8>> = Vec::new();
        let mut opened = 0;
        let mut now = 0u64;
        let mut sent = 0u8;
        // Ten epochs, 2 s apart, in steps of 100 ms; datagrams every step both ways.
        while i.rekeys() < 10 {
            now += 100;
            sent = sent.wrapping_add(1);
            in_flight_to_r.push(pi.seal(&mut enc, sent));
            in_flight_to_i.push(pr.seal(&mut enc, sent));
            // The control channel runs; its messages take effect at once, the
            // datagrams sealed before stay in flight until after.
            let mut to_r = pi.run(i.poll(now, 0, &mut fresh), 2).unwrap();
            let mut to_i = pr.run(r.poll(now, 0, &mut fresh), 1).unwrap();
            while !to_r.is_empty() || !to_i.is_empty() {
                for m in std::mem::take(&mut to_r) {
                    to_i.extend(pr.run(r.on_message(now, m, &mut fresh), 1).unwrap());
                }
                for m in std::mem::take(&mut to_i) {
                    to_r.extend(pi.run(i.on_message(now, m, &mut fresh), 2).unwrap());
                }
            }
            // New-epoch datagrams overtake the old ones.
            let d_r = pi.seal(&mut enc, sent);
            let d_i = pr.seal(&mut enc, sent);
            assert_eq!(open(&mut pr, now, d_r), open(&mut pi, now, d_i));
            // The old ones arrive, late but within the overlap.
            for d in in_flight_to_r.drain(..) {
                open(&mut pr, now, d);
                opened += 1;
            }
            for d in in_flight_to_i.drain(..) {
                open(&mut pi, now, d);
                opened += 1;
            }
            // At most the newest epoch plus those within the overlap are installed.
            assert!(pi.installed.len() <= 1 + (OVERLAP_MS / CFG.interval_ms + 2) as usize, "{:?}", pi.installed);
            assert_eq!(pi.installed.iter().copied().collect::<std::collections::BTreeSet<_>>(),
                i.recv_indexes().into_iter().collect::<std::collections::BTreeSet<_>>());
            assert!(now < 100_000, "rekeys stalled");
        }
        assert_eq!(opened, 2 * (now / 100) as usize);
        assert_eq!(pi.rekeyed, (1..=10).collect::<Vec<_>>());
        assert!(pr.rekeyed.len() >= 10);
        // Well after the last switch only the newest receiving key is left.
        let end = now + OVERLAP_MS;
        pi.run(i.poll(end, 0, &mut fresh), 2).unwrap();
        pr.run(r.poll(end, 0, &mut fresh), 1).unwrap();
        assert_eq!(pi.installed, vec![i.recv_index]);
        assert_eq!(pr.installed, vec![r.recv_index]);
        // A datagram under an erased key is now refused (unknown index).
        let (ki0, _) = keys();
        let mut stale = Plane::new(1, 20, &ki0.send, 10, &ki0.recv, 2);
        let mut d = stale.seal(&mut enc, 1);
        assert!(pr.rx.receive(end, &mut d, |_, _, _| panic!("opened under an erased key")).is_err());
    }

    #[test]
    fn interval_and_block_limit_start_a_rekey_and_the_responder_asks() {
        let (mut i, mut r) = pair();
        let mut src = Source(1, 1);
        let mut fresh = || src.fresh();
        assert!(i.poll(1_999, 0, &mut fresh).is_empty());
        assert!(matches!(&i.poll(100, REKEY_AFTER_BLOCKS, &mut fresh)[..], [Output::Send(RekeyMsg::Offer { epoch: 1, .. })]));
        // Only one offer at a time.
        assert!(i.poll(2_500, 0, &mut fresh).is_empty());
        // The responder asks when its own deadline comes; once.
        assert!(r.poll(1_999, 0, &mut fresh).is_empty());
        assert_eq!(r.poll(2_000, 0, &mut fresh), vec![Output::Send(RekeyMsg::Request { epoch: 0 })]);
        assert!(r.poll(2_100, 0, &mut fresh).is_empty());
        // An initiator that is asked offers at once.
        let (mut i2, _) = pair();
        assert!(matches!(
            &i2.on_message(5, RekeyMsg::Request { epoch: 0 }, &mut fresh)[..],
            [Output::Send(RekeyMsg::Offer { epoch: 1, .. })]
        ));
        // A stale request (from an earlier epoch) is ignored.
        assert!(i2.on_message(6, RekeyMsg::Request { epoch: 0 }, &mut fresh).is_empty());
        assert!(blocks_sealed(1 << 20, 1472) > 1 << 26);
        assert!(blocks_sealed(u64::MAX, 1472) == u64::MAX);
    }

    #[test]
    fn unanswered_rekeys_close_the_connection() {
        let (mut i, mut r) = pair();
        let mut src = Source(1, 1);
        let mut fresh = || src.fresh();
        i.poll(2_000, 0, &mut fresh);
        assert!(i.poll(2_000 + REKEY_TIMEOUT_MS - 1, 0, &mut fresh).is_empty());
        assert!(matches!(&i.poll(2_000 + REKEY_TIMEOUT_MS, 0, &mut fresh)[..], [Output::Close(_)]));
        r.poll(2_000, 0, &mut fresh);
        assert!(matches!(&r.poll(2_000 + REKEY_TIMEOUT_MS, 0, &mut fresh)[..], [Output::Close(_)]));
        assert!(i.next_deadline() <= 2_000 + REKEY_TIMEOUT_MS);
    }

    /// A peer that rekeys faster than old keys retire cannot make us hold
    /// receive sessions without bound: its Offer beyond [`MAX_RETIRING`] closes.
    #[test]
    fn rekeys_faster_than_keys_retire_close() {
        let mut src = Source(5, 1);
        let mut fresh = || src.fresh();
        let (mut i, mut r) = pair();
        let sends = |o: &[Output]| o.iter().filter_map(|o| if let Output::Send(m) = o { Some(m.clone()) } else { None }).collect::<Vec<_>>();
        // Offers as fast as the initiator likes (its Request-free path: the peer drives).
        for k in 0..MAX_RETIRING as u64 {
            let now = 1_000 + k; // far less than OVERLAP_MS apart
            let mut offer = Vec::new();
            i.offer(now, &mut fresh, &mut offer);
            let accept = r.on_message(now, sends(&offer).remove(0), &mut fresh);
            let switched = i.on_message(now, sends(&accept).remove(0), &mut fresh);
            let back = r.on_message(now, sends(&switched).remove(0), &mut fresh);
            i.on_message(now, sends(&back).remove(0), &mut fresh);
        }
        assert_eq!(r.recv_indexes().len(), 1 + MAX_RETIRING);
        // Our own side waits instead of offering a ninth...
        let mut offer = Vec::new();
        i.offer(2_000, &mut fresh, &mut offer);
        assert!(offer.is_empty());
        // ...and a peer that offers it anyway is closed.
        let epoch = r.epoch() + 1;
        let out = r.on_message(2_000, RekeyMsg::Offer { epoch, public: [9; 32], receiver_index: 5 }, &mut fresh);
        assert!(matches!(&out[..], [Output::Close(_)]), "{out:?}");
        // Once the old keys have retired, rekeying goes on.
        let out = r.poll(1_000 + OVERLAP_MS + MAX_RETIRING as u64, 0, &mut fresh);
        assert_eq!(out.iter().filter(|o| matches!(o, Output::RemoveRecv { .. })).count(), MAX_RETIRING);
        assert_eq!(r.recv_indexes().len(), 1);
    }

    #[test]
    fn messages_out_of_turn_or_bad_keys_close() {
        let mut src = Source(3, 1);
        let mut fresh = || src.fresh();
        let closes = |o: Vec<Output>| matches!(&o[..], [Output::Close(_)]);
        let (mut i, mut r) = pair();
        assert!(closes(i.on_message(0, RekeyMsg::Switched { epoch: 1 }, &mut fresh)));
        assert!(closes(i.on_message(0, RekeyMsg::Accept { epoch: 1, public: [9; 32], receiver_index: 5 }, &mut fresh)));
        assert!(closes(i.on_message(0, RekeyMsg::Offer { epoch: 1, public: [9; 32], receiver_index: 5 }, &mut fresh)));
        assert!(closes(r.on_message(0, RekeyMsg::Offer { epoch: 2, public: [9; 32], receiver_index: 5 }, &mut fresh)));
        assert!(closes(r.on_message(0, RekeyMsg::Offer { epoch: 1, public: [9; 32], receiver_index: 0x8000_0005 }, &mut fresh)));
        // A small-order point (here 0) gives no shared secret.
        assert!(closes(r.on_message(0, RekeyMsg::Offer { epoch: 1, public: [0; 32], receiver_index: 5 }, &mut fresh)));
        assert!(closes(r.on_message(0, RekeyMsg::Switched { epoch: 1 }, &mut fresh)));
        assert!(closes(r.on_message(0, RekeyMsg::Request { epoch: 0 }, &mut fresh)));
        assert_eq!((i.epoch(), r.epoch()), (0, 0));
    }

    #[test]
    fn x25519_matches_rfc7748() {
        // RFC 7748 section 6.1.
        let hex = |s: &str| -> [u8; 32] {
            let v: Vec<u8> = (0..64).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect();
            v.try_into().unwrap()
        };
        let a = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let b = hex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
        assert_eq!(public_of(&a), hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"));
        let k = hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        assert_eq!(agree(&a, &public_of(&b)), Some(k));
        assert_eq!(agree(&b, &public_of(&a)), Some(k));
    }
}
