//! IPAM messages and snapshots: byte layout and the checks on everything decoded.
//!
//! Owns: the envelope every IPAM message travels in, the message bodies, the
//! snapshot format, the signed encodings of records, and the bounds every decoded
//! value must meet before the rest of IPAM sees it. Decoding never panics and never
//! allocates more than [`MAX_MESSAGE_BYTES`] (bincode's limit), whatever the input.
//!
//! # Layout (version 4)
//! A message is `u8 version (= 4) ‖ bincode(Packet)` with bincode 2's standard
//! config. [`Packet`] holds the relay hop count, the [`Binding`]s of the peers
//! whose signatures the message carries (in gossip to neighbours only the
//! sender's, once: the receiver's key book has the others from the topology),
//! the bytes of the [`Envelope`]
//! (`bincode(Envelope)`) and the sender's Ed25519 signature of those bytes in
//! [`DOMAIN_ENVELOPE`]. Only `hops` (decremented by relays) is outside the
//! signature, so relays cannot alter a message and its `src` is proven.
//!
//! Inside, every ring entry carries a [`Proof`]: the signature of the peer that
//! wrote it (its owner, or the previous owner that gave it away) over
//! [`entry_message`] in [`DOMAIN_ENTRY`]; every Paxos value is signed by the
//! proposer of its ballot ([`value_message`], [`DOMAIN_PAXOS_VALUE`]) and every
//! acceptance by its participant ([`accept_message`], [`DOMAIN_PAXOS_ACCEPT`]),
//! so a [`Decision`] relayed by any peer is verifiable signature by signature.
//! Prepares, promises and accept requests are signed by their envelope alone
//! (a prepare is flooded as its proposer's own packet, unchanged).
//! Version 4 replaced Paxos records in gossip (every participant's record
//! flooded to every peer; versions 2 and 3) with those addressed messages.
//! Routers of different versions do not exchange IPAM: a message of another
//! version is dropped and counted ([`super::DropStats::version_mismatches`]).
//! Version-0 (genesis) entries follow from the seeds and are never sent.
//!
//! A snapshot is `u8 version (= 2) ‖ bincode(Snapshot)`; version 1 snapshots (the
//! previous release, without signatures) still load. Both are opaque to the
//! daemon, which carries messages in `ControlMsg::Ipam(Vec<u8>)`.


use serde::{Deserialize, Serialize};

use super::paxos::{Ballot, PaxosUpdate, MAX_PARTICIPANTS};
use super::ring::{ring_id, Entry, MAX_ENTRIES, MAX_SEEDS, MAX_VERSION};
use super::space::{Addr, Cidr};
use super::IpamError;
use crate::peer::PeerName;
use crate::trust::{Binding, Signature, Signer};

/// Message format version (first byte). Version 2: signed envelopes and records;
/// version 3: gossip to neighbours carries each binding and each Paxos value once;
/// version 4: Paxos by addressed messages to the proposer and a verifiable
/// decision instead of every participant's records in gossip.
pub const WIRE_VERSION: u8 = 4;
/// First byte of the messages of an IPv6 ring (same layout as [`WIRE_VERSION`]):
/// an IPv6 ring is a second, independent IPAM instance whose messages
/// routers without it, or of another version, drop and count as a version
/// mismatch; a router with both rings hands each message to the ring of its
/// first byte ([`is_v6_message`]).
pub const WIRE_VERSION_V6: u8 = 0x80 | WIRE_VERSION;

/// The first byte of the messages of a ring over `universe`.
pub fn wire_version(universe: &Cidr) -> u8 {
    if universe.is_v6() {
        WIRE_VERSION_V6
    } else {
        WIRE_VERSION
    }
}

/// Whether `bytes` is a message of an IPv6 ring (its first byte).
pub fn is_v6_message(bytes: &[u8]) -> bool {
    bytes.first() == Some(&WIRE_VERSION_V6)
}
/// Snapshot format version (first byte). Version 2 adds the records' signatures
/// and the bindings of their signers; version 1 is still read.
pub const SNAPSHOT_VERSION: u8 = 2;
/// Largest message accepted; leaves room for the control channel's
/// framing inside its 4 MiB message limit. Full gossip is split into messages of
/// at most [`FULL_GOSSIP_CHUNK`] entries to stay under it.
pub const MAX_MESSAGE_BYTES: usize = (4 << 20) - 4096;
/// Largest snapshot accepted (a full ring of [`MAX_ENTRIES`] signed entries, the
/// bindings of their signers and [`MAX_ALLOCATIONS`] targets fit).
pub const MAX_SNAPSHOT_BYTES: usize = 512 << 20;
/// Most ring entries per full-gossip message (about 1 MB with their proofs and bindings).
pub const FULL_GOSSIP_CHUNK: usize = 8192;
/// Longest target name (bytes).
pub const MAX_TARGET_LEN: usize = 256;
/// Most addresses a snapshot may hold.
pub const MAX_ALLOCATIONS: usize = 1 << 20;
/// Most bindings one message may carry.
pub const MAX_BINDINGS: usize = 2 * FULL_GOSSIP_CHUNK + MAX_PARTICIPANTS;
/// Most bindings a snapshot may hold.
pub const MAX_SNAPSHOT_BINDINGS: usize = MAX_ENTRIES + MAX_PARTICIPANTS;
/// Relay hop limit for messages addressed to one peer.
pub(crate) const MAX_HOPS: u8 = 32;

/// Domain of the sender's signature over a message's envelope bytes.
pub const DOMAIN_ENVELOPE: &[u8] = b"meshnet ipam envelope v1";
/// Domain of a ring entry's signature ([`entry_message`]).
pub const DOMAIN_ENTRY: &[u8] = b"meshnet ipam entry v1";
/// Domain of a participant's acceptance of a ballot ([`accept_message`]).
pub const DOMAIN_PAXOS_ACCEPT: &[u8] = b"meshnet ipam paxos accept v1";
/// Domain of a Paxos value's signature ([`value_message`]).
pub const DOMAIN_PAXOS_VALUE: &[u8] = b"meshnet ipam paxos value v1";

/// What travels on the wire: the signed envelope and what relays may touch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Packet {
    /// The version byte it travelled with (not encoded inside: it is the first byte).
    #[serde(skip)]
    pub version: u8,
    /// Relays left (not signed: each relay decrements it).
    pub hops: u8,
    /// Bindings of the sender and of the signers of the records inside.
    pub bindings: Vec<Binding>,
    /// `bincode(Envelope)`, exactly as signed.
    pub signed: Vec<u8>,
    /// `src`'s signature of `signed` in [`DOMAIN_ENVELOPE`].
    pub sig: Signature,
}

/// What every IPAM message is wrapped in (signed by `src`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Envelope {
    /// The sender's allocation range; must equal the receiver's.
    pub universe: Cidr,
    /// The original sender (not the relay); proven by the packet's signature.
    pub src: PeerName,
    /// [`PeerName::BROADCAST`] for gossip to neighbours, else the one recipient.
    pub dst: PeerName,
    pub body: Body,
}

/// Who wrote a ring entry: `by`'s signature over [`entry_message`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    pub by: PeerName,
    pub sig: Signature,
}

/// The bytes a ring entry's [`Proof`] signs: ring id, start and every field.
/// When start, size and free count fit 32 bits (always in an IPv4 ring) that is
/// 36 bytes with 32-bit fields, as before IPv6 rings existed; otherwise 72
/// bytes with 128-bit ones. The ring id (which covers the universe) tells the
/// rings apart, and the lengths the layouts.
pub fn entry_message(ring_id: u64, start: Addr, e: &Entry) -> Vec<u8> {
    let small = |v: u128| u32::try_from(v).ok();
    let mut m = Vec::with_capacity(72);
    m.extend_from_slice(&ring_id.to_be_bytes());
    if let (Some(start), Some(size), Some(free)) = (small(start), small(e.size), small(e.free)) {
        m.extend_from_slice(&start.to_be_bytes());
        m.extend_from_slice(&e.owner.0.to_be_bytes());
        m.extend_from_slice(&size.to_be_bytes());
        m.extend_from_slice(&e.version.to_be_bytes());
        m.extend_from_slice(&free.to_be_bytes());
    } else {
        m.extend_from_slice(&start.to_be_bytes());
        m.extend_from_slice(&e.owner.0.to_be_bytes());
        m.extend_from_slice(&e.size.to_be_bytes());
        m.extend_from_slice(&e.version.to_be_bytes());
        m.extend_from_slice(&e.free.to_be_bytes());
    }
    m
}

fn put_universe(m: &mut Vec<u8>, universe: &Cidr) {
    match universe.network() {
        std::net::IpAddr::V4(a) => m.extend_from_slice(&a.octets()),
        std::net::IpAddr::V6(a) => m.extend_from_slice(&a.octets()),
    }
    m.push(universe.prefix());
}

fn put_ballot(m: &mut Vec<u8>, b: &Ballot) {
    m.extend_from_slice(&b.round.to_be_bytes());
    m.extend_from_slice(&b.proposer.0.to_be_bytes());
}

/// SHA-256 of a Paxos value (the names, 8 bytes each, in order).
pub fn value_digest(value: &[PeerName]) -> [u8; 32] {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    for p in value {
        h.update(&p.0.to_be_bytes());
    }
    let mut d = [0u8; 32];
    d.copy_from_slice(h.finish().as_ref());
    d
}

/// The bytes participant `name` signs to accept `ballot` with the value of
/// digest `value` ([`value_digest`]): a decision carries a quorum of these.
pub fn accept_message(universe: &Cidr, name: PeerName, ballot: &Ballot, value: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(61);
    put_universe(&mut m, universe);
    m.extend_from_slice(&name.0.to_be_bytes());
    put_ballot(&mut m, ballot);
    m.extend_from_slice(value);
    m
}

/// The bytes a ballot's proposer signs to fix the ballot's value.
pub fn value_message(universe: &Cidr, b: &Ballot, value: &[PeerName]) -> Vec<u8> {
    let mut m = Vec::with_capacity(21 + 8 * value.len());
    put_universe(&mut m, universe);
    put_ballot(&mut m, b);
    for p in value {
        m.extend_from_slice(&p.0.to_be_bytes());
    }
    m
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum Body {
    /// Ring entries (all of them if `full`, else the changed ones) and, while the
    /// ring is not agreed, paxos records.
    Gossip(Gossip),
    /// "Please donate part of your free space in `subnet`."
    SpaceRequest { id: u64, subnet: Cidr },
    /// "Please give me exactly `ip`."
    ClaimRequest { id: u64, ip: Addr },
    /// The answer to either request, with the donor's relevant entries.
    Reply { id: u64, outcome: Outcome, gossip: Gossip },
    /// "Send me your full state" (after adopting a ring from partial gossip).
    SyncRequest,
    /// To the neighbours, periodically, once the ring is agreed: which ring I hold
    /// and a digest of all its entries ([`ring_digest`]). A neighbour whose ring
    /// differs sends its full state back (and asks for mine if it has none); equal
    /// rings cost this one small message instead of the whole ring.
    Digest { ring_id: u64, digest: [u8; 16] },
    /// Paxos phase 1, flooded (`src` is the ballot's proposer; relays forward the
    /// packet unchanged). `attempt` counts the proposer's re-floods of it.
    Prepare { ballot: Ballot, attempt: u32, initial: u32 },
    /// To the ballot's proposer: I promised `ballot`; I accepted `accepted` last,
    /// whose `value` (with its proposer's signature) comes along.
    Promise { ballot: Ballot, initial: u32, accepted: Ballot, value: Vec<PeerName>, value_sig: Option<Signature> },
    /// From the ballot's proposer to one participant: accept `value`.
    Accept { ballot: Ballot, value: Vec<PeerName>, value_sig: Signature },
    /// To the ballot's proposer: my signature over [`accept_message`].
    Accepted { ballot: Ballot, sig: Signature },
    /// To the neighbours, once, by every peer that verified a decision.
    Decided { ballot: Ballot },
    /// "Send me the decision you announced"; `holds`: the [`value_digest`] of
    /// the value I accepted, if any (a decision of that value comes without it).
    WantDecision { holds: Option<[u8; 32]> },
    /// A decision, verifiable by anyone. Its value is empty when it is the one
    /// the recipient said it holds.
    Decision(Decision),
}

/// The chosen value of `ballot` and a quorum of acceptances of it
/// ([`super::paxos::decision_quorum`] of `max(initial, value's length)`), every
/// one signed by its participant, the value by the ballot's proposer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Decision {
    pub ballot: Ballot,
    pub initial: u32,
    pub value: Vec<PeerName>,
    pub value_sig: Signature,
    /// Sorted by name, each a member of `value`.
    pub accepts: Vec<(PeerName, Signature)>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Gossip {
    pub full: bool,
    /// The sender's [`super::ring::ring_id`]; 0 if it has no agreed ring (then
    /// `seeds` and `entries` are empty).
    pub ring_id: u64,
    /// The ring's seeds, in full gossip only (deltas identify the ring by `ring_id`).
    pub seeds: Vec<PeerName>,
    /// Entries by start; never version 0 (genesis).
    pub entries: Vec<(Addr, Entry)>,
    /// One per entry, in the same order.
    pub proofs: Vec<Proof>,
    /// The sender's `N` of `consensus=N` while it is an unagreed participant,
    /// else 0 (neighbours learn of each other's participation from it).
    pub consensus: u32,
}

/// Paxos records as persisted: `N` and the records (the version-1 snapshot layout).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct PaxosState {
    /// `N` of `consensus=N`; 0 from a relay that does not know it.
    pub initial: u32,
    /// Records, and the value of each ballot they accepted (once per ballot).
    pub records: PaxosUpdate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Outcome {
    /// The entries carried give the requester the space (or address) asked for.
    Donated,
    /// No free space in the subnet here (entries carry my current free counts).
    NoSpace,
    /// The address asked for is allocated here.
    InUse,
    /// I do not own the address (entries carry what I know of its owner).
    NotOwner,
    /// My ring is not agreed yet.
    NotAgreed,
}

/// Everything [`super::Ipam::restore`] needs (version 2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub me: PeerName,
    pub universe: Cidr,
    pub seeds: Vec<PeerName>,
    pub entries: Vec<(Addr, Entry)>,
    /// One per entry; `None` for genesis entries, for entries migrated from a
    /// version-1 snapshot and for my own entries not yet signed (re-signed on load).
    pub proofs: Vec<Option<Proof>>,
    pub paxos: Option<PaxosState>,
    /// Signatures of other participants' records (versions before 4; written empty).
    pub paxos_sigs: Vec<(PeerName, Signature)>,
    pub value_sigs: Vec<(Ballot, Signature)>,
    /// Bindings of the signers above, to relay with their records.
    pub bindings: Vec<Binding>,
    pub allocations: Vec<(Addr, String)>,
}

/// The version-1 snapshot (no signatures), still read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct SnapshotV1 {
    pub me: PeerName,
    pub universe: Cidr,
    pub seeds: Vec<PeerName>,
    pub entries: Vec<(Addr, Entry)>,
    pub paxos: Option<PaxosState>,
    pub allocations: Vec<(Addr, String)>,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

fn snapshot_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_SNAPSHOT_BYTES>()
}

fn body_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding plain structs into a Vec cannot fail; an empty body would be refused on decode.
    bincode::serde::encode_to_vec(value, bincode::config::standard()).unwrap_or_default()
}

fn encode_with<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let mut out = vec![version];
    out.extend_from_slice(&body_bytes(value));
    out
}

/// Signs `env` as its sender and wraps it with `bindings` for `hops` relays.
pub(crate) fn encode(env: &Envelope, hops: u8, bindings: Vec<Binding>, signer: &Signer) -> Vec<u8> {
    let signed = body_bytes(env);
    let sig = signer.sign(DOMAIN_ENVELOPE, &signed);
    encode_packet(&Packet { version: wire_version(&env.universe), hops, bindings, signed, sig })
}

/// Encodes with the packet's own version byte ([`WIRE_VERSION`] if unset).
pub(crate) fn encode_packet(p: &Packet) -> Vec<u8> {
    encode_with(if p.version == 0 { WIRE_VERSION } else { p.version }, p)
}

pub(crate) fn encode_snapshot(s: &Snapshot) -> Vec<u8> {
    encode_with(SNAPSHOT_VERSION, s)
}

fn decode_body<T: for<'de> Deserialize<'de>>(rest: &[u8], limit: usize, snapshot: bool) -> Result<T, IpamError> {
    if rest.len() > limit {
        return Err(IpamError::Malformed(format!("{} bytes, over the {limit} byte limit", rest.len())));
    }
    let r = if snapshot {
        bincode::serde::decode_from_slice(rest, snapshot_config())
    } else {
        bincode::serde::decode_from_slice(rest, config())
    };
    let (value, used): (T, usize) = r.map_err(|e| IpamError::Malformed(e.to_string()))?;
    if used != rest.len() {
        return Err(IpamError::Malformed(format!("{} trailing bytes", rest.len() - used)));
    }
    Ok(value)
}

/// Decodes the outer packet (not yet verified: see [`decode_envelope`]).
pub(crate) fn decode_packet(bytes: &[u8]) -> Result<Packet, IpamError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(malformed(format!("{} bytes, over the {MAX_MESSAGE_BYTES} byte limit", bytes.len())));
    }
    let (&v, rest) = bytes.split_first().ok_or_else(|| IpamError::Malformed("empty".into()))?;
    if v != WIRE_VERSION && v != WIRE_VERSION_V6 {
        return Err(IpamError::UnsupportedVersion(v));
    }
    let mut p: Packet = decode_body(rest, MAX_MESSAGE_BYTES, false)?;
    p.version = v;
    if p.hops > MAX_HOPS {
        return Err(malformed("hop count over the limit"));
    }
    if p.bindings.len() > MAX_BINDINGS {
        return Err(malformed(format!("{} bindings, over the limit of {MAX_BINDINGS}", p.bindings.len())));
    }
    Ok(p)
}

/// Decodes and checks the envelope a packet signs (see [`check_envelope`]).
pub(crate) fn decode_envelope(signed: &[u8]) -> Result<Envelope, IpamError> {
    let env: Envelope = decode_body(signed, MAX_MESSAGE_BYTES, false)?;
    check_envelope(&env)?;
    Ok(env)
}

/// Decodes a packet and its envelope without checking signatures (tests, fuzzing).
pub fn check_message(bytes: &[u8]) -> Result<(), IpamError> {
    decode(bytes).map(|_| ())
}

/// Wraps arbitrary envelope bytes in a packet signed by `signer` (fuzzing and
/// hostile-peer tests: it lets bytes reach the checks behind the signature).
#[doc(hidden)]
pub fn sign_raw(signed: &[u8], hops: u8, bindings: Vec<Binding>, signer: &Signer) -> Vec<u8> {
    let sig = signer.sign(DOMAIN_ENVELOPE, signed);
    encode_packet(&Packet { version: WIRE_VERSION, hops, bindings, signed: signed.to_vec(), sig })
}

/// Decodes and checks a snapshot (fuzzing).
pub fn check_snapshot(bytes: &[u8]) -> Result<(), IpamError> {
    decode_snapshot(bytes).map(|_| ())
}

/// Bytes of a message spent on authentication: the envelope signature, the
/// bindings, the entries' proofs and the Paxos signatures (0 if it does not decode).
pub fn signature_overhead(bytes: &[u8]) -> usize {
    let Ok((p, env)) = decode(bytes) else { return 0 };
    let binding = 8 + 32 + 32 + 64;
    let mut n = 64 + binding * p.bindings.len();
    match &env.body {
        Body::Gossip(g) | Body::Reply { gossip: g, .. } => n += g.proofs.len() * (8 + 64),
        Body::Promise { value_sig: Some(_), .. } | Body::Accept { .. } | Body::Accepted { .. } => n += 64,
        Body::Decision(d) => n += 64 + d.accepts.len() * (8 + 64),
        _ => {}
    }
    n
}

/// Where the bytes of one message go, as encoded (see [`message_cost`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageCost {
    pub total: usize,
    /// The bindings the packet carries.
    pub bindings: usize,
    /// The envelope's signature.
    pub envelope_sig: usize,
    /// Ring entries and seeds.
    pub entries: usize,
    /// The entries' proofs.
    pub proofs: usize,
    /// Paxos messages besides their values: ballots, acceptances with their
    /// signatures (a decision's quorum of them).
    pub paxos_records: usize,
    /// Paxos values (lists of initial owners) with their signatures.
    pub paxos_values: usize,
}

/// What kind of message `bytes` is (`"full"` or `"delta"` gossip, `"reply"`,
/// `"request"`, `"paxos"` for prepares, promises, accepts and announcements,
/// `"decision"`) and where its bytes go; `None` if it does not decode. For the
/// simulator's accounting.
pub fn message_cost(bytes: &[u8]) -> Option<(&'static str, MessageCost)> {
    let (p, env) = decode(bytes).ok()?;
    let mut c = MessageCost { total: bytes.len(), bindings: len(&p.bindings), envelope_sig: 64, ..Default::default() };
    let body = len(&env.body);
    let paxos = |c: &mut MessageCost, values: usize| {
        c.paxos_values = values;
        c.paxos_records = body.saturating_sub(values);
    };
    let (kind, g) = match &env.body {
        Body::Gossip(g) if g.full => ("full", g),
        Body::Gossip(g) => ("delta", g),
        Body::Reply { gossip, .. } => ("reply", gossip),
        Body::Prepare { .. } | Body::Accepted { .. } | Body::Decided { .. } | Body::WantDecision { .. } => {
            paxos(&mut c, 0);
            return Some(("paxos", c));
        }
        Body::Promise { value, value_sig, .. } => {
            paxos(&mut c, len(value) + len(value_sig));
            return Some(("paxos", c));
        }
        Body::Accept { value, value_sig, .. } => {
            paxos(&mut c, len(value) + len(value_sig));
            return Some(("paxos", c));
        }
        Body::Decision(d) => {
            paxos(&mut c, len(&d.value) + len(&d.value_sig));
            return Some(("decision", c));
        }
        _ => return Some(("request", c)),
    };
    c.entries = len(&g.entries) + len(&g.seeds);
    c.proofs = len(&g.proofs);
    Some((kind, c))
}

fn len<T: Serialize>(value: &T) -> usize {
    body_bytes(value).len()
}

/// Decodes a packet and its envelope without checking signatures.
pub(crate) fn decode(bytes: &[u8]) -> Result<(Packet, Envelope), IpamError> {
    let p = decode_packet(bytes)?;
    let env = decode_envelope(&p.signed)?;
    if p.version != wire_version(&env.universe) {
        return Err(malformed("version byte of the other address family"));
    }
    Ok((p, env))
}

/// Decodes and checks a snapshot, of this version or of version 1 (migrated:
/// no proofs, signatures or bindings).
pub(crate) fn decode_snapshot(bytes: &[u8]) -> Result<Snapshot, IpamError> {
    let bad = |e: IpamError| IpamError::BadSnapshot(e.to_string());
    let (&v, rest) = bytes.split_first().ok_or_else(|| IpamError::BadSnapshot("empty".into()))?;
    let s: Snapshot = match v {
        SNAPSHOT_VERSION => decode_body(rest, MAX_SNAPSHOT_BYTES, true).map_err(bad)?,
        1 => {
            let o: SnapshotV1 = decode_body(rest, MAX_SNAPSHOT_BYTES, true).map_err(bad)?;
            Snapshot {
                me: o.me,
                universe: o.universe,
                seeds: o.seeds,
                proofs: vec![None; o.entries.len()],
                entries: o.entries,
                paxos: o.paxos,
                paxos_sigs: Vec::new(),
                value_sigs: Vec::new(),
                bindings: Vec::new(),
                allocations: o.allocations,
            }
        }
        v => return Err(IpamError::BadSnapshot(format!("unknown snapshot version {v} (this release reads 1 and {SNAPSHOT_VERSION})"))),
    };
    check_universe(&s.universe).map_err(bad)?;
    if s.me == PeerName::BROADCAST {
        return Err(IpamError::BadSnapshot("names the broadcast peer".into()));
    }
    if s.proofs.len() != s.entries.len() {
        return Err(IpamError::BadSnapshot("proofs do not match the entries".into()));
    }
    check_ring(&s.universe, &s.seeds, &s.entries, true).map_err(bad)?;
    if let Some(p) = &s.paxos {
        check_paxos(p.initial, &p.records, true).map_err(bad)?;
    }
    if s.bindings.len() > MAX_SNAPSHOT_BINDINGS || s.paxos_sigs.len() > MAX_PARTICIPANTS || s.value_sigs.len() > MAX_PARTICIPANTS {
        return Err(IpamError::BadSnapshot("too many bindings or signatures".into()));
    }
    if s.allocations.len() > MAX_ALLOCATIONS {
        return Err(IpamError::BadSnapshot("too many allocations".into()));
    }
    let mut prev: Option<Addr> = None;
    for (ip, target) in &s.allocations {
        if prev.is_some_and(|p| p >= *ip) || !s.universe.contains_u(*ip) {
            return Err(IpamError::BadSnapshot(format!("allocation {} out of order or range", s.universe.ip(*ip))));
        }
        if target.is_empty() || target.len() > MAX_TARGET_LEN {
            return Err(IpamError::BadSnapshot("bad target name".into()));
        }
        prev = Some(*ip);
    }
    Ok(s)
}

/// The allocation range must be a network IPAM can use ([`Cidr::is_allocatable`]).
pub(crate) fn check_universe(u: &Cidr) -> Result<(), IpamError> {
    if !u.is_valid() || !u.is_allocatable() {
        return Err(IpamError::BadRange(*u));
    }
    Ok(())
}

fn malformed(what: impl Into<String>) -> IpamError {
    IpamError::Malformed(what.into())
}

/// Bounds and shape of a decoded message: valid universe and names, entries
/// sorted by start, inside the universe, non-empty, `free <= size`, versions and
/// rounds bounded, counts bounded, seed and value lists sorted without duplicates.
pub(crate) fn check_envelope(env: &Envelope) -> Result<(), IpamError> {
    check_universe(&env.universe)?;
    if env.src == PeerName::BROADCAST {
        return Err(malformed("sender is the broadcast name"));
    }
    match &env.body {
        Body::Gossip(g) => check_gossip(&env.universe, g),
        Body::SpaceRequest { subnet, .. } => {
            if !subnet.is_valid() || !env.universe.contains_net(subnet) || subnet.prefix() > subnet.max_subnet_prefix() {
                return Err(malformed(format!("space request for {subnet}")));
            }
            check_unicast(env)
        }
        Body::ClaimRequest { ip, .. } => {
            if !env.universe.contains_u(*ip) {
                return Err(malformed("claim outside the range"));
            }
            check_unicast(env)
        }
        Body::Reply { gossip, .. } => {
            check_unicast(env)?;
            check_gossip(&env.universe, gossip)
        }
        Body::SyncRequest => check_unicast(env),
        Body::Digest { ring_id, .. } => {
            if env.dst != PeerName::BROADCAST {
                return Err(malformed("digest to one peer"));
            }
            if *ring_id == 0 {
                return Err(malformed("digest of no ring"));
            }
            Ok(())
        }
        Body::Prepare { ballot, initial, .. } => {
            check_broadcast(env)?;
            check_live_ballot(ballot)?;
            check_initial(*initial)
        }
        Body::Promise { ballot, initial, accepted, value, value_sig } => {
            check_unicast(env)?;
            check_live_ballot(ballot)?;
            check_ballot(accepted)?;
            check_initial(*initial)?;
            if *accepted > *ballot {
                return Err(malformed("promise reporting an acceptance above its ballot"));
            }
            if value.is_empty() != value_sig.is_none() || (!value.is_empty() && accepted.is_zero()) {
                return Err(malformed("promise value without its signature or accepted ballot"));
            }
            if !value.is_empty() {
                check_sorted_names(value, MAX_PARTICIPANTS, "paxos value")?;
            }
            Ok(())
        }
        Body::Accept { ballot, value, .. } => {
            check_unicast(env)?;
            check_live_ballot(ballot)?;
            check_value(value)
        }
        Body::Accepted { ballot, .. } => {
            check_unicast(env)?;
            check_live_ballot(ballot)
        }
        Body::Decided { ballot } => {
            check_broadcast(env)?;
            check_live_ballot(ballot)
        }
        Body::WantDecision { .. } => check_unicast(env),
        Body::Decision(d) => {
            check_unicast(env)?;
            check_live_ballot(&d.ballot)?;
            check_initial(d.initial)?;
            if !d.value.is_empty() {
                check_value(&d.value)?;
            }
            if d.accepts.len() > MAX_PARTICIPANTS || d.accepts.windows(2).any(|w| w[0].0 >= w[1].0) {
                return Err(malformed("decision accepts unsorted, duplicated or more than the value's names"));
            }
            Ok(())
        }
    }
}

fn check_broadcast(env: &Envelope) -> Result<(), IpamError> {
    if env.dst != PeerName::BROADCAST {
        return Err(malformed("neighbour message addressed to one peer"));
    }
    Ok(())
}

/// A ballot that names a proposal (not the zero ballot).
fn check_live_ballot(b: &Ballot) -> Result<(), IpamError> {
    check_ballot(b)?;
    if b.round == 0 {
        return Err(malformed("zero ballot"));
    }
    Ok(())
}

fn check_initial(initial: u32) -> Result<(), IpamError> {
    if initial as usize > MAX_PARTICIPANTS {
        return Err(malformed(format!("consensus={initial} is over the limit of {MAX_PARTICIPANTS}")));
    }
    Ok(())
}

fn check_value(value: &[PeerName]) -> Result<(), IpamError> {
    if value.is_empty() {
        return Err(malformed("empty paxos value"));
    }
    check_sorted_names(value, MAX_PARTICIPANTS, "paxos value")
}

/// The digest of a ring in [`Body::Digest`]: SHA-256 (first 16 bytes) of the ring
/// id and every entry's signed bytes ([`entry_message`]), by start.
pub fn ring_digest<'a>(ring_id: u64, entries: impl Iterator<Item = (Addr, &'a Entry)>) -> [u8; 16] {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    h.update(&ring_id.to_be_bytes());
    for (start, e) in entries {
        h.update(&entry_message(ring_id, start, e));
    }
    let mut d = [0u8; 16];
    d.copy_from_slice(&h.finish().as_ref()[..16]);
    d
}

fn check_unicast(env: &Envelope) -> Result<(), IpamError> {
    if env.dst == PeerName::BROADCAST {
        return Err(malformed("request without a recipient"));
    }
    Ok(())
}

fn check_sorted_names(names: &[PeerName], max: usize, what: &str) -> Result<(), IpamError> {
    if names.len() > max {
        return Err(malformed(format!("{} {what}, over the limit of {max}", names.len())));
    }
    if names.windows(2).any(|w| w[0] >= w[1]) || names.contains(&PeerName::BROADCAST) {
        return Err(malformed(format!("{what} not sorted, duplicated or naming the broadcast peer")));
    }
    Ok(())
}

fn check_ballot(b: &Ballot) -> Result<(), IpamError> {
    if b.round > MAX_VERSION || (b.round > 0 && b.proposer == PeerName::BROADCAST) {
        return Err(malformed("bad ballot"));
    }
    Ok(())
}

pub(crate) fn check_gossip(universe: &Cidr, g: &Gossip) -> Result<(), IpamError> {
    check_sorted_names(&g.seeds, MAX_SEEDS, "seeds")?;
    if g.ring_id == 0 && !(g.seeds.is_empty() && g.entries.is_empty()) {
        return Err(malformed("ring entries or seeds without a ring id"));
    }
    if !g.seeds.is_empty() && ring_id(universe, &g.seeds) != g.ring_id {
        return Err(malformed("ring id does not match the seeds"));
    }
    if g.proofs.len() != g.entries.len() {
        return Err(malformed("ring entries and proofs differ in number"));
    }
    check_ring(universe, &[], &g.entries, false)?;
    check_initial(g.consensus)
}

/// Entries sorted by start, inside the universe, non-empty, `free <= size`,
/// versions bounded (and above 0 on the wire: genesis entries are never sent).
fn check_ring(universe: &Cidr, seeds: &[PeerName], entries: &[(Addr, Entry)], genesis_ok: bool) -> Result<(), IpamError> {
    check_sorted_names(seeds, MAX_SEEDS, "seeds")?;
    if seeds.is_empty() && genesis_ok && !entries.is_empty() {
        return Err(malformed("ring entries without seeds"));
    }
    if entries.len() > MAX_ENTRIES {
        return Err(IpamError::TooManyEntries);
    }
    let mut prev: Option<Addr> = None;
    for (start, e) in entries {
        if prev.is_some_and(|p| p >= *start) {
            return Err(malformed("ring entries not sorted by start"));
        }
        prev = Some(*start);
        let end = start.checked_add(e.size);
        if !universe.contains_u(*start) || e.size == 0 || end.is_none_or(|end| end > universe.end()) {
            return Err(malformed(format!("entry {} (+{}) outside {universe}", universe.ip(*start), e.size)));
        }
        if e.owner == PeerName::BROADCAST || e.version > MAX_VERSION || e.free > e.size || (e.version == 0 && !genesis_ok) {
            return Err(malformed(format!("bad entry at {}", universe.ip(*start))));
        }
    }
    Ok(())
}

/// Records sorted and bounded, values sorted and each used by a record; with
/// `all_values` (snapshots) every accepted ballot has its value too. Gossip
/// carries each value to a neighbour once, so records may accept a value that
/// the message does not carry.
fn check_paxos(initial: u32, r: &PaxosUpdate, all_values: bool) -> Result<(), IpamError> {
    if r.claims.len() > MAX_PARTICIPANTS || r.values.len() > r.claims.len() {
        return Err(malformed("too many paxos records or values"));
    }
    if initial as usize > MAX_PARTICIPANTS {
        return Err(malformed(format!("consensus={initial} is over the limit of {MAX_PARTICIPANTS}")));
    }
    let mut prev: Option<PeerName> = None;
    let mut accepted = std::collections::BTreeSet::new();
    for (name, c) in &r.claims {
        if *name == PeerName::BROADCAST || prev.is_some_and(|x| x >= *name) {
            return Err(malformed("paxos records not sorted or naming the broadcast peer"));
        }
        prev = Some(*name);
        check_ballot(&c.promised)?;
        check_ballot(&c.accepted)?;
        if c.accepted > c.promised {
            return Err(malformed("paxos record accepts above its promise"));
        }
        if !c.accepted.is_zero() {
            accepted.insert(c.accepted);
        }
    }
    let mut prev: Option<Ballot> = None;
    for (b, v) in &r.values {
        if prev.is_some_and(|x| x >= *b) || !accepted.remove(b) || v.is_empty() {
            return Err(malformed("paxos values unsorted, unused or empty"));
        }
        prev = Some(*b);
        check_sorted_names(v, MAX_PARTICIPANTS, "paxos value")?;
    }
    if all_values && !accepted.is_empty() {
        return Err(malformed("accepted paxos ballot without its value"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::testutil::Rng;

    fn env(body: Body) -> Envelope {
        Envelope { universe: "10.32.0.0/12".parse().unwrap(), src: PeerName(1), dst: PeerName(2), body }
    }

    fn encode(env: &Envelope) -> Vec<u8> {
        let id = crate::identity::Identity::from_private([3; 32]).unwrap();
        let signer = Signer::from_identity(&id);
        super::encode(env, 4, vec![Binding::new(env.src, &id, &signer)], &signer)
    }

    fn decode(bytes: &[u8]) -> Result<Envelope, IpamError> {
        super::decode(bytes).map(|(_, e)| e)
    }

    #[test]
    fn round_trip() {
        let e = env(Body::SpaceRequest { id: 7, subnet: "10.32.1.0/24".parse().unwrap() });
        assert_eq!(decode(&encode(&e)).unwrap(), e);
    }

    #[test]
    fn refuses_bad_input() {
        let u: Cidr = "10.32.0.0/12".parse().unwrap();
        let entry = |owner, size, free| Entry { owner: PeerName(owner), size, version: 1, free };
        let (b1, b2) = (Ballot { round: 1, proposer: PeerName(1) }, Ballot { round: 2, proposer: PeerName(1) });
        let sig0 = Signature([0; 64]);
        let bcast = |body| Envelope { dst: PeerName::BROADCAST, ..env(body) };
        let decision = Decision { ballot: b1, initial: 2, value: vec![PeerName(1), PeerName(2)], value_sig: sig0, accepts: vec![(PeerName(1), sig0), (PeerName(2), sig0)] };
        let cases: Vec<Envelope> = vec![
            // Request outside the range, and one without a recipient.
            env(Body::SpaceRequest { id: 1, subnet: "10.0.0.0/24".parse().unwrap() }),
            Envelope { dst: PeerName::BROADCAST, ..env(Body::SyncRequest) },
            // Entries: unsorted, outside, empty, free > size, broadcast owner, no seeds.
            env(Body::Gossip(Gossip { ring_id: ring_id(&u, &[PeerName(1)]), seeds: vec![PeerName(1)], entries: vec![(u.start() + 5, entry(1, 1, 0)), (u.start(), entry(1, 1, 0))], ..Default::default() })),
            env(Body::Gossip(Gossip { ring_id: ring_id(&u, &[PeerName(1)]), seeds: vec![PeerName(1)], entries: vec![(u.start() + (1 << 20) - 1, entry(1, 2, 0))], ..Default::default() })),
            env(Body::Gossip(Gossip { ring_id: ring_id(&u, &[PeerName(1)]), seeds: vec![PeerName(1)], entries: vec![(u.start(), entry(1, 0, 0))], ..Default::default() })),
            env(Body::Gossip(Gossip { ring_id: ring_id(&u, &[PeerName(1)]), seeds: vec![PeerName(1)], entries: vec![(u.start(), entry(1, 1, 2))], ..Default::default() })),
            env(Body::Gossip(Gossip { ring_id: ring_id(&u, &[PeerName(1)]), seeds: vec![PeerName(1)], entries: vec![(u.start(), entry(0, 1, 0))], ..Default::default() })),
            env(Body::Gossip(Gossip { seeds: vec![], entries: vec![(u.start(), entry(1, 1, 0))], ..Default::default() })),
            // Seeds that do not match the ring id.
            env(Body::Gossip(Gossip { ring_id: 12345, seeds: vec![PeerName(1)], ..Default::default() })),
            // Seeds unsorted.
            env(Body::Gossip(Gossip { seeds: vec![PeerName(2), PeerName(1)], ..Default::default() })),
            // A consensus count over the participant limit.
            env(Body::Gossip(Gossip { consensus: MAX_PARTICIPANTS as u32 + 1, ..Default::default() })),
            // Paxos: a prepare to one peer, of the zero ballot, over the count limit.
            env(Body::Prepare { ballot: b1, attempt: 0, initial: 3 }),
            bcast(Body::Prepare { ballot: Ballot::default(), attempt: 0, initial: 3 }),
            bcast(Body::Prepare { ballot: b1, attempt: 0, initial: MAX_PARTICIPANTS as u32 + 1 }),
            // A promise accepting above its ballot, a value without its signature or ballot.
            env(Body::Promise { ballot: b1, initial: 3, accepted: b2, value: vec![], value_sig: None }),
            env(Body::Promise { ballot: b2, initial: 3, accepted: b1, value: vec![PeerName(1)], value_sig: None }),
            env(Body::Promise { ballot: b2, initial: 3, accepted: Ballot::default(), value: vec![PeerName(1)], value_sig: Some(sig0) }),
            // Accept: an empty or unsorted value; broadcast.
            env(Body::Accept { ballot: b1, value: vec![], value_sig: sig0 }),
            env(Body::Accept { ballot: b1, value: vec![PeerName(2), PeerName(1)], value_sig: sig0 }),
            bcast(Body::Accept { ballot: b1, value: vec![PeerName(1)], value_sig: sig0 }),
            // Decision: accepts unsorted or duplicated, the value unsorted.
            env(Body::Decision(Decision { accepts: vec![(PeerName(2), sig0), (PeerName(1), sig0)], ..decision.clone() })),
            env(Body::Decision(Decision { accepts: vec![(PeerName(1), sig0), (PeerName(1), sig0)], ..decision.clone() })),
            env(Body::Decision(Decision { value: vec![PeerName(2), PeerName(1)], ..decision.clone() })),
            // Announcements: to one peer; a request for the decision to all.
            env(Body::Decided { ballot: b1 }),
            bcast(Body::WantDecision { holds: None }),
            // Bad universe.
            Envelope { universe: "10.0.0.0/31".parse().unwrap(), ..env(Body::SyncRequest) },
        ];
        let proof = Proof { by: PeerName(1), sig: Signature([7; 64]) };
        let rid = ring_id(&u, &[PeerName(1)]);
        let mut cases = cases;
        // Every case above fails for its own reason, not for missing proofs.
        for c in cases.iter_mut() {
            if let Body::Gossip(g) = &mut c.body {
                g.proofs = vec![proof; g.entries.len()];
            }
        }
        // Entries without their proofs, and a genesis (version 0) entry on the wire.
        cases.push(env(Body::Gossip(Gossip { ring_id: rid, seeds: vec![PeerName(1)], entries: vec![(u.start(), entry(1, 1, 0))], ..Default::default() })));
        let genesis = Entry { version: 0, ..entry(1, 1, 0) };
        cases.push(env(Body::Gossip(Gossip { ring_id: rid, seeds: vec![PeerName(1)], entries: vec![(u.start(), genesis)], proofs: vec![proof], ..Default::default() })));
        for (i, c) in cases.iter().enumerate() {
            assert!(decode(&encode(c)).is_err(), "case {i}: {c:?}");
        }
        // The same shapes with what they lacked are accepted.
        let ok = env(Body::Gossip(Gossip { ring_id: rid, seeds: vec![PeerName(1)], entries: vec![(u.start(), entry(1, 1, 0))], proofs: vec![proof], ..Default::default() }));
        assert_eq!(decode(&encode(&ok)).unwrap(), ok);
        // Every Paxos message in its right shape.
        for ok in [
            bcast(Body::Prepare { ballot: b1, attempt: 3, initial: 3 }),
            env(Body::Promise { ballot: b2, initial: 3, accepted: b1, value: vec![PeerName(1)], value_sig: Some(sig0) }),
            env(Body::Promise { ballot: b2, initial: 3, accepted: Ballot::default(), value: vec![], value_sig: None }),
            env(Body::Accept { ballot: b1, value: vec![PeerName(1), PeerName(2)], value_sig: sig0 }),
            env(Body::Accepted { ballot: b1, sig: sig0 }),
            bcast(Body::Decided { ballot: b1 }),
            env(Body::WantDecision { holds: Some([7; 32]) }),
            env(Body::Decision(Decision { value: vec![], ..decision.clone() })),
            env(Body::Decision(decision.clone())),
        ] {
            assert_eq!(decode(&encode(&ok)).unwrap(), ok);
        }
        // A message of the previous wire version is refused as such.
        let mut old = encode(&env(Body::SyncRequest));
        old[0] = 3;
        assert!(matches!(decode(&old), Err(IpamError::UnsupportedVersion(3))));
        assert!(matches!(decode(&[]), Err(IpamError::Malformed(_))));
        assert!(matches!(decode(&[9, 0]), Err(IpamError::UnsupportedVersion(9))));
        let mut trailing = encode(&env(Body::SyncRequest));
        trailing.push(0);
        assert!(decode(&trailing).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng::new(3);
        let u: Cidr = "10.32.0.0/12".parse().unwrap();
        let good = encode(&env(Body::Gossip(Gossip {
            full: true,
            ring_id: ring_id(&u, &[PeerName(1), PeerName(2)]),
            seeds: vec![PeerName(1), PeerName(2)],
            entries: vec![(u32::from(std::net::Ipv4Addr::new(10, 32, 0, 0)) as Addr, Entry { owner: PeerName(1), size: 100, version: 3, free: 50 })],
            proofs: vec![Proof { by: PeerName(1), sig: Signature([7; 64]) }],
            consensus: 0,
        })));
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(b.len() as u64) as usize;
                b[i] = rng.next() as u8;
            }
            if rng.below(4) == 0 {
                b.truncate(rng.below(b.len() as u64) as usize);
            }
            let _ = decode(&b);
            let _ = decode_snapshot(&b);
        }
        // A length prefix claiming a huge vector is refused without allocating it.
        let mut huge = vec![WIRE_VERSION];
        huge.extend_from_slice(&[0xff; 64]);
        assert!(decode(&huge).is_err());
    }
}
