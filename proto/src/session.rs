//! AEAD keys of one data-plane session: AES-256-GCM with a 64-bit counter nonce.
//!
//! A session is one direction of one handshake: the sender holds a [`SealKey`]
//! (key plus the next counter to use), the receiver an [`OpenKey`] (key plus a
//! [`ReplayWindow`]). The nonce is `4 zero bytes ‖ counter (big-endian)`; the
//! counter also travels in the cleartext outer header so the receiver can
//! rebuild the nonce.
//!
//! Both keys work in place on caller-owned buffers and never allocate.
//!
//! Rules this module enforces:
//! - a counter is used at most once per key: [`SealKey`] only moves forward, and
//!   refuses to go on once it reaches [`COUNTER_LIMIT`] (rekeying, long
//!   before that, is [`crate::rekey`]'s job);
//! - [`OpenKey`] consults the replay window *before* decrypting (cheap rejection)
//!   and marks it only *after* the tag verified, so forgeries cannot move it;
//! - a key is overwritten with zeros when its [`SealKey`] or [`OpenKey`] is dropped.

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};

use crate::replay::ReplayWindow;
pub use crate::replay::COUNTER_LIMIT;

/// AES-256 key length.
pub const KEY_LEN: usize = 32;
/// GCM tag length.
pub const TAG_LEN: usize = 16;
/// GCM nonce length.
pub const NONCE_LEN: usize = 12;

/// Receiver indexes of relay sessions have this bit set; direct ones never do.
pub const RELAY_INDEX_BIT: u32 = 0x8000_0000;

/// The key of the relay session that rides beside a direct session keyed `key`.
///
/// A router relays from its receive thread while its send thread owns the direct
/// session; two threads sealing under one key would reuse nonces, so relayed
/// datagrams use a second session with its own key (HKDF-SHA256 of the direct
/// key, label "meshnet relay") and counter, under `index | RELAY_INDEX_BIT`.
pub fn relay_key(key: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    struct Len32;
    impl ring::hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            KEY_LEN
        }
    }
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"meshnet relay").extract(key);
    let mut out = [0u8; KEY_LEN];
    prk.expand(&[b"meshnet relay key"], Len32)
        .and_then(|okm| okm.fill(&mut out))
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// The most queues (forwarding thread pairs) a router runs, and so the
/// largest queue number + 1 a datagram's outer header may carry.
pub const MAX_QUEUES: u16 = 64;

/// The key of queue `queue`'s session beside the session keyed `key` (its
/// queue 0): each of a multi-queue router's threads seals under a key of its
/// own, so none shares a counter space (HKDF-SHA256 of the key, label
/// "meshnet queue", the queue number as info). Queue 0 is `key` itself, which
/// is what a single-queue router seals and opens.
pub fn queue_key(key: &[u8; KEY_LEN], queue: u16) -> [u8; KEY_LEN] {
    if queue == 0 {
        return *key;
    }
    struct Len32;
    impl ring::hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            KEY_LEN
        }
    }
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"meshnet queue").extract(key);
    let mut out = [0u8; KEY_LEN];
    let info = queue.to_be_bytes();
    prk.expand(&[&b"meshnet queue key"[..], &info[..]], Len32)
        .and_then(|okm| okm.fill(&mut out))
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// Why sealing or opening failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The send counter reached [`COUNTER_LIMIT`]: the session must be rekeyed.
    #[error("send counter exhausted; session needs a rekey")]
    CounterExhausted,
    /// The counter was already accepted, or is older than the replay window.
    #[error("replayed or too old counter")]
    Replay,
    /// The tag did not verify: wrong key, or the datagram was altered.
    #[error("authentication failed")]
    AuthFailed,
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aead_key(key: &[u8; KEY_LEN]) -> ManuallyDrop<LessSafeKey> {
    // A 32-byte key is always valid for AES-256-GCM; `new` fails only on a wrong length.
    match UnboundKey::new(&AES_256_GCM, key) {
        Ok(k) => ManuallyDrop::new(LessSafeKey::new(k)),
        Err(_) => unreachable!("AES-256-GCM accepts every 32-byte key"),
    }
}

// ring keeps the expanded key (whose first round keys are the key itself) inline
// and owns nothing else, so overwriting it in place erases the key.
const _: () = assert!(!std::mem::needs_drop::<LessSafeKey>());

/// Overwrites a key schedule with zeros; it is never used (or dropped) again.
fn erase_key(key: &mut ManuallyDrop<LessSafeKey>) {
    let p = (&mut **key as *mut LessSafeKey).cast::<u8>();
    for i in 0..std::mem::size_of::<LessSafeKey>() {
        // SAFETY: writes stay inside the value, which is never read again: it
        // is only ever erased from `Drop`, and `ManuallyDrop` runs no drop glue
        // (and `LessSafeKey` has none).
        unsafe { std::ptr::write_volatile(p.add(i), 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// The sending half of a session: the key and the next counter to use.
///
/// A key is normally owned by one thread. A key *shared* by several threads
/// ([`SealKey::shared`]: a multi-queue router's threads all sealing for a peer
/// that opens one counter space only) takes its counters from one atomic
/// instead: [`reserve_counter`](Self::reserve_counter) before each seal.
pub struct SealKey {
    key: ManuallyDrop<LessSafeKey>,
    next: u64,
    /// The counter space shared with other threads' copies of this key.
    shared: Option<Arc<AtomicU64>>,
    /// The counter reserved from `shared` for the next seal.
    reserved: Option<u64>,
}

impl SealKey {
    /// A fresh key whose first counter is 0.
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        SealKey { key: aead_key(key), next: 0, shared: None, reserved: None }
    }

    /// A key whose counters come from `counter`, which every copy of the
    /// same key (on other threads) shares: no counter is used twice.
    pub fn shared(key: &[u8; KEY_LEN], counter: Arc<AtomicU64>) -> Self {
        SealKey { key: aead_key(key), next: 0, shared: Some(counter), reserved: None }
    }

    /// A key whose next counter is `next` (tests of exhaustion).
    #[cfg(test)]
    pub(crate) fn starting_at(key: &[u8; KEY_LEN], next: u64) -> Self {
        SealKey { key: aead_key(key), next, shared: None, reserved: None }
    }

    /// Takes the counter the next [`seal_in_place`](Self::seal_in_place) will
    /// use: for an owned key the same as [`next_counter`](Self::next_counter);
    /// for a shared one the next counter of the shared space, which is then
    /// this key's alone (a reservation not sealed is skipped, never reused).
    #[allow(clippy::absurd_extreme_comparisons)]
    pub fn reserve_counter(&mut self) -> Result<u64, SessionError> {
        let Some(shared) = &self.shared else { return self.next_counter() };
        if let Some(c) = self.reserved {
            return Ok(c);
        }
        let c = shared.fetch_add(1, Ordering::Relaxed);
        if c >= COUNTER_LIMIT {
            shared.store(COUNTER_LIMIT, Ordering::Relaxed);
            return Err(SessionError::CounterExhausted);
        }
        self.reserved = Some(c);
        Ok(c)
    }

    /// The counter the next [`seal_in_place`](Self::seal_in_place) will use, so the
    /// caller can write it into the associated data first.
    // `>=` stays correct should the limit ever be lowered below `u64::MAX`.
    #[allow(clippy::absurd_extreme_comparisons)]
    pub fn next_counter(&self) -> Result<u64, SessionError> {
        // A shared key: the reserved counter, else (a guess only, another
        // thread may take it first) the shared space's next one.
        let next = match (&self.shared, self.reserved) {
            (Some(_), Some(c)) => return Ok(c),
            (Some(shared), None) => shared.load(Ordering::Relaxed),
            (None, _) => self.next,
        };
        if next >= COUNTER_LIMIT {
            Err(SessionError::CounterExhausted)
        } else {
            Ok(next)
        }
    }

    /// How many more messages this key may seal.
    pub fn remaining(&self) -> u64 {
        match &self.shared {
            Some(shared) => COUNTER_LIMIT.saturating_sub(shared.load(Ordering::Relaxed)),
            None => COUNTER_LIMIT.saturating_sub(self.next),
        }
    }

    /// Encrypts `in_out` in place under the next counter, authenticating `aad`
    /// too, and returns the counter used and the tag to append.
    ///
    /// The counter is always taken from the key, never from the caller, so a
    /// nonce cannot be reused; if `aad` carries a different counter than the one
    /// returned, the receiver will simply fail to authenticate.
    pub fn seal_in_place(
        &mut self,
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<(u64, [u8; TAG_LEN]), SessionError> {
        let counter = if self.shared.is_some() { self.reserve_counter()? } else { self.next_counter()? };
        self.reserved = None;
        let tag: Tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(aad), in_out)
            // ring fails only on inputs longer than GCM's ~64 GiB limit.
            .map_err(|_| SessionError::CounterExhausted)?;
        if self.shared.is_none() {
            self.next = counter + 1;
        }
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag.as_ref());
        Ok((counter, t))
    }
}

impl SealKey {
    /// Takes the counter an unsealed datagram (`trusted (userspace)`) carries
    /// instead of sealing: the same counter space as
    /// [`seal_in_place`](Self::seal_in_place), so the receiver's replay window
    /// covers both and no counter is ever used twice under this key.
    pub fn take_counter(&mut self) -> Result<u64, SessionError> {
        let counter = if self.shared.is_some() { self.reserve_counter()? } else { self.next_counter()? };
        self.reserved = None;
        if self.shared.is_none() {
            self.next = counter + 1;
        }
        Ok(counter)
    }
}

impl Drop for SealKey {
    /// Keys are erased when their session goes (after a rekey, or with the connection).
    fn drop(&mut self) {
        erase_key(&mut self.key);
    }
}

impl Drop for OpenKey {
    fn drop(&mut self) {
        erase_key(&mut self.key);
    }
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKey").field("next", &self.next).field("shared", &self.shared.is_some()).finish_non_exhaustive()
    }
}

/// The receiving half of a session: the key and its replay window.
pub struct OpenKey {
    key: ManuallyDrop<LessSafeKey>,
    window: ReplayWindow,
}

impl OpenKey {
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        OpenKey { key: aead_key(key), window: ReplayWindow::new() }
    }

    /// The replay window, for diagnostics.
    pub fn window(&self) -> &ReplayWindow {
        &self.window
    }

    /// Authenticates and decrypts `in_out` (ciphertext ‖ tag) in place and returns
    /// the plaintext, a prefix of `in_out`.
    ///
    /// Rejects with [`SessionError::Replay`] without decrypting if the window
    /// already holds `counter`; marks `counter` only once the tag verified.
    pub fn open_in_place<'a>(
        &mut self,
        counter: u64,
        aad: &[u8],
        in_out: &'a mut [u8],
    ) -> Result<&'a mut [u8], SessionError> {
        if !self.window.check(counter) {
            return Err(SessionError::Replay);
        }
        let plain = self
            .key
            .open_in_place(nonce(counter), Aad::from(aad), in_out)
            .map_err(|_| SessionError::AuthFailed)?;
        if !self.window.update(counter) {
            // Unreachable: checked above and nothing else touched the window.
            return Err(SessionError::Replay);
        }
        Ok(plain)
    }
}

impl OpenKey {
    /// Takes an unsealed datagram's `counter` into the replay window (the
    /// caller decided the sender may send unsealed): [`SessionError::Replay`]
    /// if the window already holds it or it is too old.
    pub fn accept_unsealed(&mut self, counter: u64) -> Result<(), SessionError> {
        if !self.window.check(counter) || !self.window.update(counter) {
            return Err(SessionError::Replay);
        }
        Ok(())
    }
}

impl std::fmt::Debug for OpenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenKey").field("window", &self.window).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; KEY_LEN] = [7; KEY_LEN];

    /// Seals `msg` behind an 8-byte header carrying the counter; returns the message.
    fn seal(k: &mut SealKey, msg: &[u8]) -> Vec<u8> {
        let counter = k.next_counter().unwrap();
        let mut out = counter.to_be_bytes().to_vec();
        out.extend_from_slice(msg);
        let (aad, body) = out.split_at_mut(8);
        let (used, tag) = k.seal_in_place(aad, body).unwrap();
        assert_eq!(used, counter);
        out.extend_from_slice(&tag);
        out
    }

    fn open(k: &mut OpenKey, mut m: Vec<u8>) -> Result<Vec<u8>, SessionError> {
        let counter = u64::from_be_bytes(m[..8].try_into().unwrap());
        let (aad, body) = m.split_at_mut(8);
        k.open_in_place(counter, aad, body).map(|p| p.to_vec())
    }

    #[test]
    fn seal_open_round_trip() {
        let mut s = SealKey::new(&KEY);
        let mut o = OpenKey::new(&KEY);
        for i in 0..100u32 {
            let msg = vec![i as u8; i as usize];
            let m = seal(&mut s, &msg);
            assert_eq!(m.len(), 8 + msg.len() + TAG_LEN);
            assert_eq!(open(&mut o, m).unwrap(), msg);
        }
        assert_eq!(s.next_counter().unwrap(), 100);
    }

    #[test]
    fn tampering_anywhere_fails_authentication() {
        let mut s = SealKey::new(&KEY);
        let m = seal(&mut s, b"hello, overlay");
        for i in 0..m.len() {
            // Bytes 0..8 are the header (aad + counter), then ciphertext, then tag.
            let mut o = OpenKey::new(&KEY);
            let mut bad = m.clone();
            bad[i] ^= 0x40;
            assert_eq!(open(&mut o, bad), Err(SessionError::AuthFailed), "byte {i}");
            // A forgery does not consume the counter: the genuine one still opens.
            assert_eq!(open(&mut o, m.clone()).unwrap(), b"hello, overlay");
        }
    }

    #[test]
    fn wrong_key_fails() {
        let mut s = SealKey::new(&KEY);
        let mut o = OpenKey::new(&[8; KEY_LEN]);
        assert_eq!(open(&mut o, seal(&mut s, b"x")), Err(SessionError::AuthFailed));
    }

    #[test]
    fn replay_rejected_before_decrypting() {
        let mut s = SealKey::new(&KEY);
        let mut o = OpenKey::new(&KEY);
        let m = seal(&mut s, b"once");
        assert!(open(&mut o, m.clone()).is_ok());
        assert_eq!(open(&mut o, m), Err(SessionError::Replay));
    }

    #[test]
    fn counter_exhaustion_refuses_to_wrap() {
        let mut s = SealKey::starting_at(&KEY, COUNTER_LIMIT - 2);
        assert_eq!(s.remaining(), 2);
        let mut buf = [0u8; 4];
        assert_eq!(s.seal_in_place(&[], &mut buf).unwrap().0, COUNTER_LIMIT - 2);
        assert_eq!(s.seal_in_place(&[], &mut buf).unwrap().0, COUNTER_LIMIT - 1);
        assert_eq!(s.next_counter(), Err(SessionError::CounterExhausted));
        assert_eq!(s.seal_in_place(&[], &mut buf), Err(SessionError::CounterExhausted));
        assert_eq!(s.remaining(), 0);
    }

    #[test]
    fn nonce_layout() {
        let n = nonce(0x0102_0304_0506_0708);
        assert_eq!(n.as_ref(), &[0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn relay_keys_differ_from_direct_keys_and_agree_on_both_ends() {
        let k = [7u8; KEY_LEN];
        assert_ne!(relay_key(&k), k);
        assert_eq!(relay_key(&k), relay_key(&[7u8; KEY_LEN]));
        assert_ne!(relay_key(&k), relay_key(&[8u8; KEY_LEN]));
    }

    #[test]
    fn queue_keys_differ_per_queue_and_queue_0_is_the_key() {
        let k = [7u8; KEY_LEN];
        assert_eq!(queue_key(&k, 0), k);
        assert_ne!(queue_key(&k, 1), k);
        assert_ne!(queue_key(&k, 1), queue_key(&k, 2));
        assert_eq!(queue_key(&k, 3), queue_key(&[7u8; KEY_LEN], 3));
        assert_ne!(queue_key(&k, 1), relay_key(&k));
    }

    #[test]
    fn shared_keys_never_use_a_counter_twice() {
        let counter = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut k = SealKey::shared(&KEY, counter);
                    let mut used = Vec::new();
                    let mut buf = [0u8; 4];
                    for _ in 0..5000 {
                        let c = k.reserve_counter().unwrap();
                        assert_eq!(k.next_counter(), Ok(c));
                        assert_eq!(k.seal_in_place(&[], &mut buf).unwrap().0, c);
                        used.push(c);
                    }
                    used
                })
            })
            .collect();
        let mut all: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 10_000);
        assert_eq!(SealKey::shared(&KEY, counter).remaining(), COUNTER_LIMIT - 10_000);
    }
}
