//! Who a peer is, provably: each peer's name bound to its keys, and signatures on
//! everything a peer says about itself in gossip.
//!
//! Owns: the Ed25519 signing key every peer derives from its identity, the
//! [`Binding`] that ties a [`PeerName`] to a peer's Noise static key and signing
//! key, signing and verifying with domain separation, and the [`KeyBook`] of names
//! this router has pinned to keys. Never does I/O: persisting the key book is the
//! caller's job (it is plain serde data).
//!
//! # The model
//! * A peer holds one secret, its X25519 identity key. Its Ed25519 signing key is
//!   derived from it with HKDF, so nothing new has to be stored or can be lost.
//! * A [`Binding`] is signed by the signing key over (name, static key, signing
//!   key). Whoever verifies it knows the holder of that signing key claims that
//!   name and that static key. The Noise handshake proves possession of the static
//!   key; a connection is believed only if the handshake's static key is the
//!   binding's.
//! * A name derived from the static key ([`PeerName::from_public_key`]) is bound
//!   cryptographically: nobody else can produce a binding for it without finding a
//!   48-bit second preimage of SHA-256. A name chosen with `--name` is bound on
//!   first sight (trust on first use): the [`KeyBook`] pins it to the first keys
//!   seen for it and refuses any other keys for it until the operator removes the
//!   old identity (`rmpeer`).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Mutex;

use ring::hkdf;
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::identity::Identity;
use crate::peer::PeerName;

/// HKDF salt and info for deriving the signing seed from the identity key.
const SIGNING_SALT: &[u8] = b"meshnet signing key v1";
const SIGNING_INFO: &[u8] = b"ed25519 seed";

/// Domain of [`Binding`] signatures.
pub const DOMAIN_BINDING: &[u8] = b"meshnet binding v1";

/// An Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Signature({:02x}{:02x}{:02x}{:02x}..)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                let arr: [u8; 64] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Signature(arr))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Signature, E> {
                self.visit_bytes(&v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Signature, A::Error> {
                let mut out = [0u8; 64];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<u8>()?.is_some() {
                    return Err(serde::de::Error::invalid_length(65, &self));
                }
                Ok(Signature(out))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// The message actually signed: domain, a zero byte, then the content. A signature
/// made for one kind of record can never be replayed as another kind.
fn signed_message(domain: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + 1 + msg.len());
    m.extend_from_slice(domain);
    m.push(0);
    m.extend_from_slice(msg);
    m
}

/// A peer's Ed25519 key pair, derived from its identity.
pub struct Signer {
    pair: Ed25519KeyPair,
    public: [u8; 32],
}

impl Signer {
    /// Derives the signing key from the identity's private key (HKDF-SHA256).
    pub fn from_identity(identity: &Identity) -> Signer {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SIGNING_SALT).extract(&identity.private);
        let mut seed = [0u8; 32];
        // Expanding 32 bytes of SHA-256 HKDF cannot fail (the limit is 255 blocks).
        prk.expand(&[SIGNING_INFO], Seed)
            .and_then(|okm| okm.fill(&mut seed))
            .expect("HKDF-SHA256 expands 32 bytes");
        // Any 32 bytes are a valid Ed25519 seed.
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).expect("32-byte Ed25519 seed");
        seed.fill(0);
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        Signer { pair, public }
    }

    /// The public half, as gossiped.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// Signs `msg` in `domain`.
    pub fn sign(&self, domain: &[u8], msg: &[u8]) -> Signature {
        let sig = self.pair.sign(&signed_message(domain, msg));
        let mut out = [0u8; 64];
        out.copy_from_slice(sig.as_ref());
        Signature(out)
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Signer({:02x}{:02x}{:02x}{:02x}..)",
            self.public[0], self.public[1], self.public[2], self.public[3]
        )
    }
}

struct Seed;
impl hkdf::KeyType for Seed {
    fn len(&self) -> usize {
        32
    }
}

/// Whether `sig` is `public`'s signature of `msg` in `domain`.
///
/// The same signed record reaches a router many times (from several neighbours,
/// in full gossip, inside relayed IPAM messages), and an Ed25519 verification
/// costs ~50 µs. Signatures that verified are remembered in [`VERIFIED`], keyed by
/// the SHA-256 of everything verified (key, domain, message, signature), so an
/// exact repeat is believed without the curve arithmetic. Only successes are
/// remembered: a forged or altered record misses and is verified (and refused)
/// every time. The answer is the same with or without the memo.
pub fn verify(public: &[u8; 32], domain: &[u8], msg: &[u8], sig: &Signature) -> bool {
    let signed = signed_message(domain, msg);
    let key = memo_key(public, &signed, sig);
    if VERIFIED.lock().map(|m| m.contains(&key)).unwrap_or(false) {
        return true;
    }
    let ok = signature::UnparsedPublicKey::new(&signature::ED25519, public).verify(&signed, &sig.0).is_ok();
    if ok {
        if let Ok(mut m) = VERIFIED.lock() {
            m.insert(key);
        }
    }
    ok
}

fn memo_key(public: &[u8; 32], signed: &[u8], sig: &Signature) -> [u8; 32] {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    h.update(public);
    h.update(&sig.0);
    h.update(signed);
    let mut key = [0u8; 32];
    key.copy_from_slice(h.finish().as_ref());
    key
}

/// Signatures verified in this process (all routers of a simulation share it).
static VERIFIED: Mutex<VerifiedMemo> = Mutex::new(VerifiedMemo::new());

/// Most signatures remembered per generation; two generations are kept, so
/// the memo holds at most `2 * MEMO_GENERATION` keys (about 1 MB).
pub const MEMO_GENERATION: usize = 8192;

/// A set of 32-byte keys in two generations: when the current one is full it
/// becomes the previous one (the one before is forgotten). Recently seen keys
/// stay; memory is bounded; no per-entry bookkeeping.
struct VerifiedMemo {
    current: Option<HashSet<[u8; 32]>>,
    previous: Option<HashSet<[u8; 32]>>,
}

impl VerifiedMemo {
    const fn new() -> VerifiedMemo {
        VerifiedMemo { current: None, previous: None }
    }

    fn contains(&self, key: &[u8; 32]) -> bool {
        self.current.as_ref().is_some_and(|s| s.contains(key)) || self.previous.as_ref().is_some_and(|s| s.contains(key))
    }

    fn insert(&mut self, key: [u8; 32]) {
        let current = self.current.get_or_insert_with(HashSet::new);
        if current.len() >= MEMO_GENERATION {
            self.previous = self.current.take();
        }
        self.current.get_or_insert_with(|| HashSet::with_capacity(MEMO_GENERATION)).insert(key);
    }
}

/// The two public keys that make up a peer's identity on the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerKeys {
    /// The X25519 Noise static key (authenticated by every handshake).
    pub static_key: [u8; 32],
    /// The Ed25519 key that signs the peer's gossip.
    pub signing_key: [u8; 32],
}

impl PeerKeys {
    /// A short fingerprint for logs: the first 8 bytes of the signing key in hex.
    pub fn fingerprint(&self) -> String {
        self.signing_key[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// A peer's signed statement "I am `name`, with these keys".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub name: PeerName,
    pub keys: PeerKeys,
    /// By `keys.signing_key`, over [`Binding::message`], in [`DOMAIN_BINDING`].
    pub sig: Signature,
}

/// Why a binding or a record was not believed.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum TrustError {
    #[error("peer name {0} is not a valid peer name (0, or wider than 48 bits)")]
    BadName(PeerName),
    #[error("binding for {0} has a bad signature")]
    BadSignature(PeerName),
    #[error("{name} is already bound to key {pinned}; refusing key {offered} (remove the old identity with `meshnet rmpeer {name}` if the host was reinstalled)")]
    Conflict {
        name: PeerName,
        pinned: String,
        offered: String,
    },
    #[error("the handshake authenticated a different static key than the one {0} is bound to")]
    StaticKeyMismatch(PeerName),
    #[error("{0} is not known: no key is bound to it")]
    Unknown(PeerName),
    #[error("peer claims name {claimed} but its key is bound to {bound}")]
    NameMismatch { claimed: PeerName, bound: PeerName },
    #[error("no room to pin {0}: the key book holds {MAX_PINNED} names")]
    BookFull(PeerName),
}

/// Most names a [`KeyBook`] pins through [`KeyBook::admit_preferring_derived`]
/// (gossip can invent names; the book must not grow without bound).
pub const MAX_PINNED: usize = 40_000;

/// Whether a peer name can name a peer: not 0 (broadcast), not wider than 48 bits.
pub fn valid_name(name: PeerName) -> bool {
    name.0 != 0 && name.0 >> 48 == 0
}

impl Binding {
    /// The bytes the binding's signature covers.
    pub fn message(name: PeerName, keys: &PeerKeys) -> [u8; 72] {
        let mut m = [0u8; 72];
        m[..8].copy_from_slice(&name.0.to_be_bytes());
        m[8..40].copy_from_slice(&keys.static_key);
        m[40..].copy_from_slice(&keys.signing_key);
        m
    }

    /// This peer's own binding.
    pub fn new(name: PeerName, identity: &Identity, signer: &Signer) -> Binding {
        let keys = PeerKeys {
            static_key: identity.public,
            signing_key: signer.public(),
        };
        let sig = signer.sign(DOMAIN_BINDING, &Binding::message(name, &keys));
        Binding { name, keys, sig }
    }

    /// Checks the name's form and the signature (not whether the name is pinned to other keys).
    pub fn verify(&self) -> Result<(), TrustError> {
        if !valid_name(self.name) {
            return Err(TrustError::BadName(self.name));
        }
        if !verify(
            &self.keys.signing_key,
            DOMAIN_BINDING,
            &Binding::message(self.name, &self.keys),
            &self.sig,
        ) {
            return Err(TrustError::BadSignature(self.name));
        }
        Ok(())
    }

    /// Whether the name is the one derived from the static key (bound by the key
    /// itself, not only on first use).
    pub fn is_derived(&self) -> bool {
        PeerName::from_public_key(&self.keys.static_key) == self.name
    }
}

/// What [`KeyBook::admit`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The name was already bound to exactly these keys.
    Known,
    /// The name was new and is now pinned to these keys.
    Pinned,
}

/// Names pinned to keys. Persisted by the caller; a pin is removed only by the
/// operator (`rmpeer`) or by [`KeyBook::remove`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyBook {
    pinned: BTreeMap<PeerName, PeerKeys>,
}

impl KeyBook {
    pub fn new() -> KeyBook {
        KeyBook::default()
    }

    /// The keys pinned for `name`.
    pub fn get(&self, name: PeerName) -> Option<&PeerKeys> {
        self.pinned.get(&name)
    }

    /// Verifies `binding` and pins it if its name is new. A binding whose name is
    /// pinned to other keys is refused and changes nothing.
    pub fn admit(&mut self, binding: &Binding) -> Result<Admission, TrustError> {
        binding.verify()?;
        match self.pinned.get(&binding.name) {
            Some(keys) if *keys == binding.keys => Ok(Admission::Known),
            Some(keys) => Err(TrustError::Conflict {
                name: binding.name,
                pinned: keys.fingerprint(),
                offered: binding.keys.fingerprint(),
            }),
            None => {
                self.pinned.insert(binding.name, binding.keys);
                Ok(Admission::Pinned)
            }
        }
    }

    /// Checks `binding` against the pins without changing them.
    pub fn check(&self, binding: &Binding) -> Result<Option<Admission>, TrustError> {
        binding.verify()?;
        match self.pinned.get(&binding.name) {
            Some(keys) if *keys == binding.keys => Ok(Some(Admission::Known)),
            Some(keys) => Err(TrustError::Conflict {
                name: binding.name,
                pinned: keys.fingerprint(),
                offered: binding.keys.fingerprint(),
            }),
            None => Ok(None),
        }
    }

    /// Verifies `sig` over `msg` in `domain` against the key pinned for `name`.
    pub fn verify_from(
        &self,
        name: PeerName,
        domain: &[u8],
        msg: &[u8],
        sig: &Signature,
    ) -> Result<(), TrustError> {
        let keys = self.pinned.get(&name).ok_or(TrustError::Unknown(name))?;
        if verify(&keys.signing_key, domain, msg, sig) {
            Ok(())
        } else {
            Err(TrustError::BadSignature(name))
        }
    }

    /// Like [`admit`](Self::admit), with two differences for bindings met on the
    /// network: a binding whose name is derived from its static key replaces a pin
    /// that is not derived (such a pin can only be someone else's first-use claim
    /// of a name its owner proves with its key; the return is then
    /// `Admission::Pinned`), and no new name is pinned once the book holds
    /// [`MAX_PINNED`] names.
    pub fn admit_preferring_derived(&mut self, binding: &Binding) -> Result<Admission, TrustError> {
        binding.verify()?;
        self.admit_verified(binding)
    }

    /// [`admit_preferring_derived`](Self::admit_preferring_derived) for a binding
    /// the caller has just verified (saves a second signature check).
    pub(crate) fn admit_verified(&mut self, binding: &Binding) -> Result<Admission, TrustError> {
        let admission = self.judge_verified(binding)?;
        if admission == Admission::Pinned {
            self.pinned.insert(binding.name, binding.keys);
        }
        Ok(admission)
    }

    /// What [`admit_preferring_derived`](Self::admit_preferring_derived) would
    /// answer, without changing the book.
    pub fn check_preferring_derived(&self, binding: &Binding) -> Result<Admission, TrustError> {
        binding.verify()?;
        self.judge_verified(binding)
    }

    /// The verdict on a verified binding: known, to be pinned (new, or a derived
    /// name taking back a first-use pin), or refused.
    fn judge_verified(&self, binding: &Binding) -> Result<Admission, TrustError> {
        match self.pinned.get(&binding.name) {
            Some(keys) if *keys == binding.keys => Ok(Admission::Known),
            Some(keys)
                if binding.is_derived() && PeerName::from_public_key(&keys.static_key) != binding.name =>
            {
                Ok(Admission::Pinned)
            }
            Some(keys) => Err(TrustError::Conflict {
                name: binding.name,
                pinned: keys.fingerprint(),
                offered: binding.keys.fingerprint(),
            }),
            None if self.pinned.len() >= MAX_PINNED => Err(TrustError::BookFull(binding.name)),
            None => Ok(Admission::Pinned),
        }
    }

    /// Forgets `name`'s keys (after `rmpeer`), so a reinstalled host can bind it anew.
    pub fn remove(&mut self, name: PeerName) -> Option<PeerKeys> {
        self.pinned.remove(&name)
    }

    pub fn len(&self) -> usize {
        self.pinned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pinned.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&PeerName, &PeerKeys)> {
        self.pinned.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(seed: u8) -> (Identity, Signer) {
        let id = Identity::from_private([seed; 32]).unwrap();
        let s = Signer::from_identity(&id);
        (id, s)
    }

    #[test]
    fn signing_key_is_stable_and_distinct() {
        let (a, sa) = peer(1);
        let (_, sb) = peer(2);
        assert_eq!(Signer::from_identity(&a).public(), sa.public());
        assert_ne!(sa.public(), sb.public());
        // The signing key is not the Noise key.
        assert_ne!(sa.public(), a.public);
    }

    #[test]
    fn a_remembered_signature_never_vouches_for_anything_else() {
        let (_, s) = peer(4);
        let (_, other) = peer(5);
        let sig = s.sign(b"topology", b"remembered");
        assert!(verify(&s.public(), b"topology", b"remembered", &sig));
        assert!(verify(&s.public(), b"topology", b"remembered", &sig), "a repeat (from the memo) is still believed");
        assert!(!verify(&s.public(), b"topology", b"rememberee", &sig));
        assert!(!verify(&s.public(), b"ipam", b"remembered", &sig));
        assert!(!verify(&other.public(), b"topology", b"remembered", &sig));
        let mut bad = sig;
        bad.0[5] ^= 1;
        assert!(!verify(&s.public(), b"topology", b"remembered", &bad));
        // Failures are not remembered as successes, nor successes as failures.
        assert!(!verify(&s.public(), b"topology", b"rememberee", &sig));
        assert!(verify(&s.public(), b"topology", b"remembered", &sig));
    }

    #[test]
    fn the_memo_keeps_recent_keys_and_a_bounded_number() {
        let key = |i: usize| {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(i as u64).to_le_bytes());
            k
        };
        let mut m = VerifiedMemo::new();
        assert!(!m.contains(&key(0)));
        for i in 0..MEMO_GENERATION * 3 {
            m.insert(key(i));
            assert!(m.contains(&key(i)));
        }
        let held = m.current.as_ref().map_or(0, |s| s.len()) + m.previous.as_ref().map_or(0, |s| s.len());
        assert!(held <= 2 * MEMO_GENERATION, "{held}");
        assert!(m.contains(&key(MEMO_GENERATION * 3 - 1)) && m.contains(&key(MEMO_GENERATION * 2)));
        assert!(!m.contains(&key(0)), "the oldest generation is forgotten");
    }

    #[test]
    fn signatures_are_domain_separated() {
        let (_, s) = peer(3);
        let sig = s.sign(b"topology", b"hello");
        assert!(verify(&s.public(), b"topology", b"hello", &sig));
        assert!(!verify(&s.public(), b"ipam", b"hello", &sig));
        assert!(!verify(&s.public(), b"topology", b"hellp", &sig));
        let mut bad = sig;
        bad.0[10] ^= 1;
        assert!(!verify(&s.public(), b"topology", b"hello", &bad));
    }

    #[test]
    fn binding_verifies_and_detects_tampering() {
        let (id, s) = peer(4);
        let b = Binding::new(id.name(), &id, &s);
        b.verify().unwrap();
        assert!(b.is_derived());
        let mut other = b.clone();
        other.name = PeerName(0x02_00_00_00_00_09);
        assert_eq!(other.verify(), Err(TrustError::BadSignature(other.name)));
        let mut wrong_static = b.clone();
        wrong_static.keys.static_key[0] ^= 1;
        assert!(wrong_static.verify().is_err());
        let custom = Binding::new(PeerName(0x02_00_00_00_00_01), &id, &s);
        custom.verify().unwrap();
        assert!(!custom.is_derived());
    }

    #[test]
    fn bad_names_are_refused() {
        let (id, s) = peer(5);
        for name in [PeerName(0), PeerName(1 << 48), PeerName(u64::MAX)] {
            assert_eq!(
                Binding::new(name, &id, &s).verify(),
                Err(TrustError::BadName(name))
            );
        }
    }

    #[test]
    fn key_book_pins_first_keys_and_refuses_others_until_removed() {
        let (a, sa) = peer(6);
        let (b, sb) = peer(7);
        let name = PeerName(0x02_00_00_00_00_01);
        let mut book = KeyBook::new();
        assert_eq!(
            book.admit(&Binding::new(name, &a, &sa)),
            Ok(Admission::Pinned)
        );
        assert_eq!(
            book.admit(&Binding::new(name, &a, &sa)),
            Ok(Admission::Known)
        );
        let intruder = Binding::new(name, &b, &sb);
        assert!(matches!(
            book.admit(&intruder),
            Err(TrustError::Conflict { .. })
        ));
        assert!(matches!(
            book.check(&intruder),
            Err(TrustError::Conflict { .. })
        ));
        assert_eq!(book.get(name).unwrap().signing_key, sa.public());
        book.remove(name);
        assert_eq!(book.admit(&intruder), Ok(Admission::Pinned));
    }

    #[test]
    fn a_derived_binding_replaces_a_first_use_claim_of_its_name() {
        let (owner, so) = peer(11);
        let (squatter, ss) = peer(12);
        let mut book = KeyBook::new();
        // The squatter claims the owner's derived name first, with its own key.
        let squat = Binding::new(owner.name(), &squatter, &ss);
        assert_eq!(book.admit_preferring_derived(&squat), Ok(Admission::Pinned));
        // The owner proves the name with its key: it wins the pin.
        let real = Binding::new(owner.name(), &owner, &so);
        assert!(real.is_derived());
        assert_eq!(book.check_preferring_derived(&real), Ok(Admission::Pinned));
        assert_eq!(book.admit_preferring_derived(&real), Ok(Admission::Pinned));
        assert_eq!(book.get(owner.name()), Some(&real.keys));
        // And the squatter cannot take it back.
        assert!(matches!(book.admit_preferring_derived(&squat), Err(TrustError::Conflict { .. })));
        // A chosen (not derived) name stays pinned to its first keys.
        let chosen = PeerName(0x02_00_00_00_00_42);
        book.admit_preferring_derived(&Binding::new(chosen, &owner, &so)).unwrap();
        assert!(matches!(
            book.admit_preferring_derived(&Binding::new(chosen, &squatter, &ss)),
            Err(TrustError::Conflict { .. })
        ));
    }

    #[test]
    fn verify_from_uses_the_pinned_key() {
        let (a, sa) = peer(8);
        let (_, sb) = peer(9);
        let mut book = KeyBook::new();
        book.admit(&Binding::new(a.name(), &a, &sa)).unwrap();
        let good = sa.sign(b"d", b"m");
        let forged = sb.sign(b"d", b"m");
        assert_eq!(book.verify_from(a.name(), b"d", b"m", &good), Ok(()));
        assert_eq!(
            book.verify_from(a.name(), b"d", b"m", &forged),
            Err(TrustError::BadSignature(a.name()))
        );
        assert_eq!(
            book.verify_from(PeerName(0x0a), b"d", b"m", &good),
            Err(TrustError::Unknown(PeerName(0x0a)))
        );
    }

    #[test]
    fn key_book_and_signature_round_trip_through_bincode() {
        let (a, sa) = peer(10);
        let mut book = KeyBook::new();
        let binding = Binding::new(a.name(), &a, &sa);
        book.admit(&binding).unwrap();
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&binding, cfg).unwrap();
        let (back, _): (Binding, _) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back, binding);
        back.verify().unwrap();
        let bytes = bincode::serde::encode_to_vec(&book, cfg).unwrap();
        let (back, _): (KeyBook, _) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back, book);
        // Truncated signature bytes are refused, not padded.
        let mut short = bincode::serde::encode_to_vec(&binding, cfg).unwrap();
        short.truncate(short.len() - 1);
        assert!(bincode::serde::decode_from_slice::<Binding, _>(&short, cfg).is_err());
    }
}
