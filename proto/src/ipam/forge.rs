//! Hostile IPAM messages, for the hostile-member tests and fuzzing: a member
//! that knows the mesh password builds messages whose envelope it signs with
//! its own key whatever `src` says, with any records and any signatures inside.
//! Nothing here is used by a router; it exists so that tests outside this crate
//! can lie in every field the wire format has.
//!
//! [`read_gossip`] reads what an honest router sends (without verifying it), so
//! a forger can learn the ring it attacks.

use super::paxos::Ballot;
use super::ring::Entry;
use super::space::Cidr;
use super::wire::{
    self, Body, Decision, Envelope, Gossip, Proof, DOMAIN_ENTRY, DOMAIN_PAXOS_ACCEPT, DOMAIN_PAXOS_VALUE,
};
use crate::peer::PeerName;
use crate::trust::{Binding, Signer};

/// What a gossip message says about the ring (nothing is verified).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RingView {
    pub src: PeerName,
    pub universe: Option<Cidr>,
    /// The sender's ring id; 0 before agreement.
    pub ring_id: u64,
    pub seeds: Vec<PeerName>,
    pub entries: Vec<(super::Addr, Entry)>,
}

/// The ring a gossip message (or a reply carrying gossip) describes; `None`
/// for other messages and for bytes that do not decode.
pub fn read_gossip(bytes: &[u8]) -> Option<RingView> {
    let (_, env) = wire::decode(bytes).ok()?;
    let g = match env.body {
        Body::Gossip(g) | Body::Reply { gossip: g, .. } => g,
        _ => return None,
    };
    Some(RingView { src: env.src, universe: Some(env.universe), ring_id: g.ring_id, seeds: g.seeds, entries: g.entries })
}

impl RingView {
    /// Every entry of the ring this view describes: the genesis that `seeds`
    /// imply (never sent: it follows from them), overlaid with the entries
    /// gossiped (the highest version of each start). Empty without seeds.
    pub fn ring(&self) -> Vec<(super::Addr, Entry)> {
        let (Some(universe), false) = (self.universe, self.seeds.is_empty()) else { return Vec::new() };
        let mut all: std::collections::BTreeMap<super::Addr, Entry> =
            super::ring::Ring::genesis(universe, &self.seeds).entries().map(|(s, e)| (s, *e)).collect();
        for (s, e) in &self.entries {
            if all.get(s).is_none_or(|have| have.version < e.version) {
                all.insert(*s, *e);
            }
        }
        all.into_iter().collect()
    }
}

/// One envelope from `src` to `dst` carrying `body`, signed by `key` (whoever
/// `src` is), with `bindings`.
fn sealed(universe: Cidr, src: PeerName, dst: PeerName, body: Body, key: &Signer, bindings: Vec<Binding>) -> Vec<u8> {
    wire::encode(&Envelope { universe, src, dst, body }, 0, bindings, key)
}

/// Gossip from `src` of ring entries, each with a proof claiming to be `by`'s
/// but signed with `by_key` (a lie unless it is `by`'s key).
pub fn entries(
    universe: Cidr,
    src: PeerName,
    ring_id: u64,
    entries: Vec<(super::Addr, Entry)>,
    by: PeerName,
    by_key: &Signer,
    key: &Signer,
    bindings: Vec<Binding>,
) -> Vec<u8> {
    let proofs = entries
        .iter()
        .map(|(start, e)| Proof { by, sig: by_key.sign(DOMAIN_ENTRY, &wire::entry_message(ring_id, *start, e)) })
        .collect();
    let g = Gossip { full: false, ring_id, seeds: Vec::new(), entries, proofs, consensus: 0 };
    sealed(universe, src, PeerName::BROADCAST, Body::Gossip(g), key, bindings)
}

/// "Donate part of `subnet` to me", from `src` to `dst`.
pub fn space_request(universe: Cidr, src: PeerName, dst: PeerName, subnet: Cidr, key: &Signer, bindings: Vec<Binding>) -> Vec<u8> {
    sealed(universe, src, dst, Body::SpaceRequest { id: 0x0bad, subnet }, key, bindings)
}

/// "Give me exactly `ip`", from `src` to `dst`.
pub fn claim_request(universe: Cidr, src: PeerName, dst: PeerName, ip: super::Addr, key: &Signer, bindings: Vec<Binding>) -> Vec<u8> {
    sealed(universe, src, dst, Body::ClaimRequest { id: 0x0bad, ip }, key, bindings)
}

/// "Send me your full state", from `src` to `dst`.
pub fn sync_request(universe: Cidr, src: PeerName, dst: PeerName, key: &Signer, bindings: Vec<Binding>) -> Vec<u8> {
    sealed(universe, src, dst, Body::SyncRequest, key, bindings)
}

/// A Paxos prepare flooded by `src` for `ballot` (honest only if `src` is the
/// ballot's proposer), signed with `key`. `initial` is the `N` of `consensus=N`.
pub fn prepare(universe: Cidr, src: PeerName, initial: u32, ballot: Ballot, key: &Signer, bindings: Vec<Binding>) -> Vec<u8> {
    sealed(universe, src, PeerName::BROADCAST, Body::Prepare { ballot, attempt: 0, initial }, key, bindings)
}

/// A Paxos accept request from `src` to `dst` for `ballot` with `value`, the
/// value signed with `value_key` (honest only if both are the ballot's proposer's).
#[allow(clippy::too_many_arguments)]
pub fn accept(
    universe: Cidr,
    src: PeerName,
    dst: PeerName,
    ballot: Ballot,
    value: Vec<PeerName>,
    value_key: &Signer,
    key: &Signer,
    bindings: Vec<Binding>,
) -> Vec<u8> {
    let value_sig = value_key.sign(DOMAIN_PAXOS_VALUE, &wire::value_message(&universe, &ballot, &value));
    sealed(universe, src, dst, Body::Accept { ballot, value, value_sig }, key, bindings)
}

/// A decision from `src` to `dst` that `ballot` chose `value`, with the value and
/// every acceptance in `accepts` signed with the keys given (honest only if each
/// is its named peer's).
#[allow(clippy::too_many_arguments)]
pub fn decision(
    universe: Cidr,
    src: PeerName,
    dst: PeerName,
    ballot: Ballot,
    initial: u32,
    value: Vec<PeerName>,
    value_key: &Signer,
    accepts: &[(PeerName, &Signer)],
    key: &Signer,
) -> Vec<u8> {
    let value_sig = value_key.sign(DOMAIN_PAXOS_VALUE, &wire::value_message(&universe, &ballot, &value));
    let digest = wire::value_digest(&value);
    let accepts = accepts
        .iter()
        .map(|(n, k)| (*n, k.sign(DOMAIN_PAXOS_ACCEPT, &wire::accept_message(&universe, *n, &ballot, &digest))))
        .collect();
    sealed(universe, src, dst, Body::Decision(Decision { ballot, initial, value, value_sig, accepts }), key, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::ipam::{Config, InitMode, Ipam};

    /// Every forgery decodes (so it reaches the checks behind the signature)
    /// and a router's own gossip reads back as the ring it holds.
    #[test]
    fn forgeries_decode_and_gossip_reads_back() {
        let u: Cidr = "10.32.0.0/12".parse().unwrap();
        let id = Identity::generate();
        let me = id.name();
        let mut ipam = Ipam::with_config(me, u, InitMode::Seed(vec![me]), Config::default(), &id).unwrap();
        ipam.allocate("t", crate::ipam::Request::Any(u), 0).unwrap();
        ipam.handle_timeout(60_000);
        let mut view = None;
        while let Some((_, bytes)) = ipam.poll_transmit() {
            view = view.or_else(|| read_gossip(&bytes).filter(|v| !v.entries.is_empty()));
        }
        let view = view.expect("the seeded peer gossips its ring");
        assert_eq!((view.src, view.ring_id, view.universe), (me, ipam.ring().id(), Some(u)));
        let s = Signer::from_identity(&Identity::generate());
        let b = Ballot { round: 7, proposer: me };
        for bytes in [
            entries(u, me, view.ring_id, view.entries.clone(), me, &s, &s, vec![]),
            space_request(u, me, PeerName(5), u, &s, vec![]),
            claim_request(u, me, PeerName(5), crate::ipam::space::addr_value(u.network()) + 1, &s, vec![]),
            sync_request(u, me, PeerName(5), &s, vec![]),
            prepare(u, me, 3, b, &s, vec![]),
            accept(u, me, PeerName(5), b, vec![me], &s, &s, vec![]),
            decision(u, me, PeerName(5), b, 1, vec![me], &s, &[(me, &s)], &s),
        ] {
            wire::check_message(&bytes).unwrap();
        }
    }
}
