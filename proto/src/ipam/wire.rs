//! IPAM messages and snapshots: byte layout and the checks on everything decoded.
//!
//! Owns: the envelope every IPAM message travels in, the message bodies, the
//! snapshot format, and the bounds every decoded value must meet before the rest
//! of IPAM sees it. Decoding never panics and never allocates more than
//! [`MAX_MESSAGE_BYTES`] (bincode's limit), whatever the input.
//!
//! # Layout
//! A message is `u8 version (= 1) ‖ bincode(Envelope)` with bincode 2's standard
//! config; a snapshot is `u8 version (= 1) ‖ bincode(Snapshot)`. Both are opaque to
//! the daemon, which carries messages in `ControlMsg::Ipam(Vec<u8>)`.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::paxos::{Ballot, PaxosUpdate, MAX_PARTICIPANTS};
use super::ring::{ring_id, Entry, MAX_ENTRIES, MAX_SEEDS, MAX_VERSION};
use super::space::Cidr;
use super::IpamError;
use crate::peer::PeerName;

/// Message format version (first byte).
pub const WIRE_VERSION: u8 = 1;
/// Snapshot format version (first byte).
pub const SNAPSHOT_VERSION: u8 = 1;
/// Largest message or snapshot accepted; leaves room for the control channel's
/// framing inside its 4 MiB message limit. A full ring of [`MAX_ENTRIES`] entries
/// encodes to well under this.
pub const MAX_MESSAGE_BYTES: usize = (4 << 20) - 4096;
/// Longest target name (bytes).
pub const MAX_TARGET_LEN: usize = 256;
/// Most addresses a snapshot may hold.
pub const MAX_ALLOCATIONS: usize = 1 << 20;
/// Relay hop limit for messages addressed to one peer.
pub(crate) const MAX_HOPS: u8 = 32;

/// What every IPAM message is wrapped in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Envelope {
    /// The sender's allocation range; must equal the receiver's.
    pub universe: Cidr,
    /// The original sender (not the relay).
    pub src: PeerName,
    /// [`PeerName::BROADCAST`] for gossip to neighbours, else the one recipient.
    pub dst: PeerName,
    /// Relays left.
    pub hops: u8,
    pub body: Body,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum Body {
    /// Ring entries (all of them if `full`, else the changed ones) and, while the
    /// ring is not agreed, paxos records.
    Gossip(Gossip),
    /// "Please donate part of your free space in `subnet`."
    SpaceRequest { id: u64, subnet: Cidr },
    /// "Please give me exactly `ip`."
    ClaimRequest { id: u64, ip: u32 },
    /// The answer to either request, with the donor's relevant entries.
    Reply { id: u64, outcome: Outcome, gossip: Gossip },
    /// "Send me your full state" (after adopting a ring from partial gossip).
    SyncRequest,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Gossip {
    pub full: bool,
    /// The sender's [`super::ring::ring_id`]; 0 if it has no agreed ring (then
    /// `seeds` and `entries` are empty).
    pub ring_id: u64,
    /// The ring's seeds, in full gossip only (deltas identify the ring by `ring_id`).
    pub seeds: Vec<PeerName>,
    pub entries: Vec<(u32, Entry)>,
    pub paxos: Option<PaxosGossip>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct PaxosGossip {
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

/// Everything [`super::Ipam::restore`] needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub me: PeerName,
    pub universe: Cidr,
    pub seeds: Vec<PeerName>,
    pub entries: Vec<(u32, Entry)>,
    pub paxos: Option<PaxosGossip>,
    pub allocations: Vec<(u32, String)>,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

fn encode_with<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let mut out = vec![version];
    // Encoding plain structs into a Vec cannot fail; an empty body would be refused on decode.
    if let Ok(body) = bincode::serde::encode_to_vec(value, bincode::config::standard()) {
        out.extend_from_slice(&body);
    }
    out
}

pub(crate) fn encode(env: &Envelope) -> Vec<u8> {
    encode_with(WIRE_VERSION, env)
}

pub(crate) fn encode_snapshot(s: &Snapshot) -> Vec<u8> {
    encode_with(SNAPSHOT_VERSION, s)
}

fn decode_with<T: for<'de> Deserialize<'de>>(bytes: &[u8], version: u8) -> Result<T, IpamError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(IpamError::Malformed(format!("{} bytes, over the {MAX_MESSAGE_BYTES} byte limit", bytes.len())));
    }
    let (&v, rest) = bytes.split_first().ok_or_else(|| IpamError::Malformed("empty".into()))?;
    if v != version {
        return Err(IpamError::UnsupportedVersion(v));
    }
    let (value, used): (T, usize) =
        bincode::serde::decode_from_slice(rest, config()).map_err(|e| IpamError::Malformed(e.to_string()))?;
    if used != rest.len() {
        return Err(IpamError::Malformed(format!("{} trailing bytes", rest.len() - used)));
    }
    Ok(value)
}

/// Decodes and checks a message (see [`check_envelope`]).
pub(crate) fn decode(bytes: &[u8]) -> Result<Envelope, IpamError> {
    let env: Envelope = decode_with(bytes, WIRE_VERSION)?;
    check_envelope(&env)?;
    Ok(env)
}

/// Decodes and checks a snapshot.
pub(crate) fn decode_snapshot(bytes: &[u8]) -> Result<Snapshot, IpamError> {
    let s: Snapshot = decode_with(bytes, SNAPSHOT_VERSION).map_err(|e| IpamError::BadSnapshot(e.to_string()))?;
    let bad = |e: IpamError| IpamError::BadSnapshot(e.to_string());
    check_universe(&s.universe).map_err(bad)?;
    if s.me == PeerName::BROADCAST {
        return Err(IpamError::BadSnapshot("names the broadcast peer".into()));
    }
    check_gossip(
        &s.universe,
        &Gossip {
            full: true,
            ring_id: ring_id(&s.universe, &s.seeds),
            seeds: s.seeds.clone(),
            entries: s.entries.clone(),
            paxos: s.paxos.clone(),
        },
    )
    .map_err(bad)?;
    if s.allocations.len() > MAX_ALLOCATIONS {
        return Err(IpamError::BadSnapshot("too many allocations".into()));
    }
    let mut prev: Option<u32> = None;
    for (ip, target) in &s.allocations {
        if prev.is_some_and(|p| p >= *ip) || !s.universe.contains_u32(*ip) {
            return Err(IpamError::BadSnapshot(format!("allocation {} out of order or range", Ipv4Addr::from(*ip))));
        }
        if target.is_empty() || target.len() > MAX_TARGET_LEN {
            return Err(IpamError::BadSnapshot("bad target name".into()));
        }
        prev = Some(*ip);
    }
    Ok(s)
}

/// The allocation range must be a network of /1 to /30.
pub(crate) fn check_universe(u: &Cidr) -> Result<(), IpamError> {
    if !u.is_valid() || u.prefix() == 0 || u.prefix() > 30 {
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
    if env.hops > MAX_HOPS {
        return Err(malformed("hop count over the limit"));
    }
    match &env.body {
        Body::Gossip(g) => check_gossip(&env.universe, g),
        Body::SpaceRequest { subnet, .. } => {
            if !subnet.is_valid() || !env.universe.contains_net(subnet) || subnet.prefix() > 30 {
                return Err(malformed(format!("space request for {subnet}")));
            }
            check_unicast(env)
        }
        Body::ClaimRequest { ip, .. } => {
            if !env.universe.contains_u32(*ip) {
                return Err(malformed("claim outside the range"));
            }
            check_unicast(env)
        }
        Body::Reply { gossip, .. } => {
            check_unicast(env)?;
            check_gossip(&env.universe, gossip)
        }
        Body::SyncRequest => check_unicast(env),
    }
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
    if g.entries.len() > MAX_ENTRIES {
        return Err(IpamError::TooManyEntries);
    }
    let mut prev: Option<u32> = None;
    for (start, e) in &g.entries {
        if prev.is_some_and(|p| p >= *start) {
            return Err(malformed("ring entries not sorted by start"));
        }
        prev = Some(*start);
        let end = *start as u64 + e.size as u64;
        if !universe.contains_u32(*start) || e.size == 0 || end > universe.end() {
            return Err(malformed(format!("entry {} (+{}) outside {universe}", Ipv4Addr::from(*start), e.size)));
        }
        if e.owner == PeerName::BROADCAST || e.version > MAX_VERSION || e.free > e.size {
            return Err(malformed(format!("bad entry at {}", Ipv4Addr::from(*start))));
        }
    }
    if let Some(p) = &g.paxos {
        let r = &p.records;
        if r.claims.len() > MAX_PARTICIPANTS || r.values.len() > r.claims.len() {
            return Err(malformed("too many paxos records or values"));
        }
        if p.initial as usize > MAX_PARTICIPANTS {
            return Err(malformed(format!("consensus={} is over the limit of {MAX_PARTICIPANTS}", p.initial)));
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
        if !accepted.is_empty() {
            return Err(malformed("accepted paxos ballot without its value"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::paxos::Claims;
    use crate::ipam::testutil::Rng;

    fn env(body: Body) -> Envelope {
        Envelope { universe: "10.32.0.0/12".parse().unwrap(), src: PeerName(1), dst: PeerName(2), hops: 4, body }
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
            // Paxos: accepted without value.
            env(Body::Gossip(Gossip {
                paxos: Some(PaxosGossip {
                    initial: 3,
                    records: PaxosUpdate {
                        claims: vec![(PeerName(1), Claims { promised: Ballot { round: 1, proposer: PeerName(1) }, accepted: Ballot { round: 1, proposer: PeerName(1) } })],
                        values: vec![],
                    },
                }),
                ..Default::default()
            })),
            // Paxos: a consensus count over the participant limit.
            env(Body::Gossip(Gossip {
                paxos: Some(PaxosGossip { initial: MAX_PARTICIPANTS as u32 + 1, records: PaxosUpdate::default() }),
                ..Default::default()
            })),
            // Bad universe.
            Envelope { universe: "10.0.0.0/31".parse().unwrap(), ..env(Body::SyncRequest) },
        ];
        for (i, c) in cases.iter().enumerate() {
            assert!(decode(&encode(c)).is_err(), "case {i}: {c:?}");
        }
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
            entries: vec![(u32::from(Ipv4Addr::new(10, 32, 0, 0)), Entry { owner: PeerName(1), size: 100, version: 3, free: 50 })],
            paxos: None,
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
