//! What the control plane tells its neighbours about the topology, and when:
//! deltas on change, digest-based anti-entropy on a timer.
//!
//! [`Gossip`] holds one [`Neighbour`] per established connection (the caller's
//! connection id) and answers every event with the sends it wants, as
//! [`Out`] values; the caller (control's `Mesh`, or the simulator) performs
//! them: [`Send::Entries`] and [`Send::Everything`] become signed
//! `ControlMsg::Gossip` messages, [`Send::Digest`] and [`Send::Summary`] their
//! own messages.
//!
//! # The exchange
//! * A new connection gets our summary, and the two ends send each other what
//!   the other lacks ([`Gossip::connected`]; a peer without digests is told
//!   everything).
//! * A change of our own entry goes to every neighbour at once, as long as a
//!   token bucket allows ([`OWN_ENTRY_BURST`] in a row, then one per
//!   [`OWN_ENTRY_EVERY_MS`]; a change that must wait goes with a later
//!   [`Gossip::tick`]): while a mesh forms a router's connections change a
//!   couple of hundred times a minute, while a quiet mesh's rare changes (a
//!   connection whose UDP starts working, which moves routes) are not delayed
//!   ([`Gossip::own_changed`]).
//! * Entries that were news to us are passed on ([`Gossip::relay`]) to the
//!   neighbours [`relay_targets`] picks: not the sender, not the owner, none the
//!   entry lists as the owner's connections (the owner tells those itself), and
//!   of the rest about 2·log₂ n at random (Weave's `GossipNeighbourSubset`).
//!   Flooding every change to every neighbour cost a full mesh of n about n²
//!   messages per change; in a mesh of 100 the copies took the routers' CPU
//!   and starved handshakes. In a full mesh nothing is relayed.
//! * Anti-entropy ([`Gossip::tick`]): every [`ROUND_MS`] (jittered) a random
//!   [`fanout`] of the neighbours (about 2·log₂ n, as Weave) get a [`Digest`]:
//!   a hash over every entry's (name, uid, version) plus the count, 20 bytes.
//!   A neighbour whose own digest differs answers with a [`Summary`] (every
//!   entry's name, uid and version, about 20 bytes per peer); the side that
//!   reads a summary sends back the signed entries the other lacks or holds
//!   older, and its own summary if the other holds something it lacks.
//!   In steady state a round costs one digest per chosen neighbour: bytes per
//!   peer per minute grow with log n, not with n (periodic full gossip did).
//! * A neighbour that did not say it understands digests (capability bit
//!   `CAP_GOSSIP_DIGEST` in its Hello) gets the old periodic full gossip instead.
//!
//! Digests and summaries are hints: entries still travel signed and are
//! verified on merge. What a neighbour can make us send is bounded: at most one
//! summary to it and one answer to its summaries per [`SUMMARY_EVERY_MS`]
//! (others are dropped and counted in [`Stats::limited`]), so a hostile member
//! sending digests in a loop gets at most one copy of the topology per period.
//!
//! Never does: I/O, reading the clock, drawing randomness (time in milliseconds
//! and a random `u64` per call are passed in), signing or verifying.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::topology::{full_gossip_targets, relay_targets, Topology, MAX_PEERS};
use crate::PeerName;

/// The caller's number for an established connection.
pub type Neighbour = u64;

/// Time between anti-entropy rounds (±25 % jitter).
pub const ROUND_MS: u64 = 30_000;
/// At most one summary sent to, and one summary from a neighbour answered,
/// per this long.
pub const SUMMARY_EVERY_MS: u64 = 10_000;
/// Our own entry goes out at once this many times in a row...
pub const OWN_ENTRY_BURST: u64 = 4;
/// ...and then at most once per this long.
pub const OWN_ENTRY_EVERY_MS: u64 = 500;
/// Most entries a [`Summary`] may list (checked when it is decoded).
pub const MAX_SUMMARY: usize = MAX_PEERS;

/// A hash over every entry's (name, uid, version), plus their count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Digest {
    pub peers: u32,
    pub hash: [u8; 16],
}

/// Which incarnation and version of a peer's entry the sender holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntryVersion {
    pub name: PeerName,
    pub uid: u64,
    pub version: u64,
}

impl EntryVersion {
    /// Whether an entry at `self` wins over one at `other` by the topology's
    /// merge rules (higher version; at equal versions the higher uid).
    pub fn newer_than(&self, other: &EntryVersion) -> bool {
        (self.version, self.uid) > (other.version, other.uid)
    }
}

/// Every entry the sender holds, as (name, uid, version), sorted by name.
pub type Summary = Vec<EntryVersion>;

/// One send to a neighbour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Send {
    /// The signed entries of these peers (those the caller holds), sorted.
    Entries(Vec<PeerName>),
    /// Every signed entry (a new connection, or periodic gossip to a neighbour
    /// that does not understand digests).
    Everything,
    Digest(Digest),
    Summary(Summary),
}

/// A send and its neighbour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Out {
    pub to: Neighbour,
    pub send: Send,
}

/// Counters for `status` and the simulator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub rounds: u64,
    pub digests_sent: u64,
    pub digests_matched: u64,
    pub summaries_sent: u64,
    pub summaries_answered: u64,
    /// Summaries not sent, or not answered, because of [`SUMMARY_EVERY_MS`].
    pub limited: u64,
}

#[derive(Clone, Debug)]
struct NeighbourState {
    peer: PeerName,
    digests: bool,
    summary_sent_at: Option<u64>,
    summary_answered_at: Option<u64>,
}

/// The gossip schedule of one router (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct Gossip {
    neighbours: BTreeMap<Neighbour, NeighbourState>,
    next_round: Option<u64>,
    /// Our own entry changed since it was last sent; the token bucket for
    /// sending it (thousandths of a send; None: full) and when it was filled.
    own_pending: bool,
    own_tokens: Option<(u64, u64)>,
    pub stats: Stats,
}

fn within(last: Option<u64>, now: u64) -> bool {
    last.is_some_and(|t| now < t.saturating_add(SUMMARY_EVERY_MS))
}

/// The (name, uid, version) of every entry of `topology`, sorted by name.
pub fn summary(topology: &Topology) -> Summary {
    let mut v: Summary =
        topology.peers().map(|p| EntryVersion { name: p.name, uid: p.uid, version: p.version }).collect();
    v.sort_unstable();
    v
}

/// The digest of `topology`: SHA-256 over its sorted [`summary`], cut to 16 bytes.
pub fn digest(topology: &Topology) -> Digest {
    digest_of(&summary(topology))
}

/// The digest of a sorted summary.
pub fn digest_of(summary: &[EntryVersion]) -> Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for e in summary {
        ctx.update(&e.name.0.to_be_bytes());
        ctx.update(&e.uid.to_be_bytes());
        ctx.update(&e.version.to_be_bytes());
    }
    let mut hash = [0u8; 16];
    hash.copy_from_slice(&ctx.finish().as_ref()[..16]);
    Digest { peers: summary.len().min(u32::MAX as usize) as u32, hash }
}

/// How many neighbours get a digest each round in a mesh of `peers`: about
/// 2·log₂ n, at least 2 (see [`crate::topology::full_gossip_fanout`]).
pub fn fanout(peers: usize) -> usize {
    crate::topology::full_gossip_fanout(peers)
}

impl Gossip {
    pub fn new() -> Self {
        Gossip::default()
    }

    /// Neighbours now.
    pub fn len(&self) -> usize {
        self.neighbours.len()
    }

    pub fn is_empty(&self) -> bool {
        self.neighbours.is_empty()
    }

    /// Connection `id` to `peer` was established; `digests`: the peer
    /// understands digests and summaries. It gets our [`Summary`], and answers
    /// with the entries we lack or hold older (and its summary if it lacks
    /// some of ours, which we answer likewise); a peer without digests is told
    /// everything. Both ends of a new connection usually hold nearly the same
    /// topology: the summaries cost about 20 bytes per peer where everything
    /// cost a few hundred (in a forming mesh of 200, most of its bytes).
    pub fn connected(&mut self, id: Neighbour, peer: PeerName, digests: bool, now: u64, topology: &Topology) -> Vec<Out> {
        let summary_sent_at = digests.then_some(now);
        self.neighbours.insert(id, NeighbourState { peer, digests, summary_sent_at, summary_answered_at: None });
        if digests {
            self.stats.summaries_sent += 1;
            vec![Out { to: id, send: Send::Summary(summary(topology)) }]
        } else {
            vec![Out { to: id, send: Send::Everything }]
        }
    }

    /// Connection `id` ended.
    pub fn disconnected(&mut self, id: Neighbour) {
        self.neighbours.remove(&id);
    }

    /// Our own entry (of `topology`) changed: every neighbour gets it, now or,
    /// when the token bucket is empty, from a later [`tick`](Self::tick).
    pub fn own_changed(&mut self, now: u64, topology: &Topology) -> Vec<Out> {
        self.own_pending = true;
        self.send_own(now, topology)
    }

    fn send_own(&mut self, now: u64, topology: &Topology) -> Vec<Out> {
        if !self.own_pending {
            return Vec::new();
        }
        let full = OWN_ENTRY_BURST * 1000;
        let tokens = match self.own_tokens {
            None => full,
            Some((t, at)) => (t + now.saturating_sub(at) * 1000 / OWN_ENTRY_EVERY_MS).min(full),
        };
        if tokens < 1000 {
            self.own_tokens = Some((tokens, now));
            return Vec::new();
        }
        self.own_tokens = Some((tokens - 1000, now));
        self.own_pending = false;
        let me = topology.me().name;
        self.neighbours.keys().map(|&id| Out { to: id, send: Send::Entries(vec![me]) }).collect()
    }

    /// Entries `names` of `topology` were news to us, heard from neighbour
    /// `from`: each goes to the neighbours [`relay_targets`] picks for it.
    pub fn relay(&mut self, names: &[PeerName], from: Neighbour, topology: &Topology, random: u64) -> Vec<Out> {
        let Some(from_peer) = self.neighbours.get(&from).map(|n| n.peer) else { return Vec::new() };
        let ids: Vec<Neighbour> = self.neighbours.keys().copied().collect();
        let peers: Vec<PeerName> = self.neighbours.values().map(|n| n.peer).collect();
        let count = topology.peers().count();
        let mut names = names.to_vec();
        names.sort_unstable();
        names.dedup();
        let mut per: BTreeMap<Neighbour, Vec<PeerName>> = BTreeMap::new();
        for (k, &name) in names.iter().enumerate() {
            let Some(entry) = topology.get(name) else { continue };
            let seed = random.wrapping_add((k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            for i in relay_targets(entry, from_peer, &peers, count, seed) {
                if ids[i] != from {
                    per.entry(ids[i]).or_default().push(name);
                }
            }
        }
        per.into_iter().map(|(to, names)| Out { to, send: Send::Entries(names) }).collect()
    }

    /// When the next round is due (None before the first tick).
    pub fn next_round(&self) -> Option<u64> {
        self.next_round
    }

    /// Sends our own entry if a change of it waits (see
    /// [`own_changed`](Self::own_changed)), and runs an anti-entropy round if one
    /// is due: a digest of `topology` to [`fanout`] random neighbours
    /// (everything to those without digests). The first call only schedules the
    /// first round. Call it often (the daemon: every pass of its connection
    /// maker, at least every 200 ms).
    pub fn tick(&mut self, now: u64, random: u64, topology: &Topology) -> Vec<Out> {
        let own = self.send_own(now, topology);
        let Some(due) = self.next_round else {
            self.next_round = Some(now + jitter(ROUND_MS, random));
            return own;
        };
        if now < due {
            return own;
        }
        self.next_round = Some(now + jitter(ROUND_MS, random.rotate_left(32)));
        self.stats.rounds += 1;
        let ids: Vec<Neighbour> = self.neighbours.keys().copied().collect();
        if ids.is_empty() {
            return Vec::new();
        }
        let chosen = full_gossip_targets(ids.len(), topology.peers().count(), random);
        let mine = digest(topology);
        let mut out = own;
        out.extend(chosen
            .into_iter()
            .map(|i| {
                let id = ids[i];
                if self.neighbours[&id].digests {
                    self.stats.digests_sent += 1;
                    Out { to: id, send: Send::Digest(mine) }
                } else {
                    Out { to: id, send: Send::Everything }
                }
            }));
        out
    }

    /// Neighbour `from` sent its digest: our summary if ours differs (at most
    /// one per [`SUMMARY_EVERY_MS`] to it).
    pub fn on_digest(&mut self, from: Neighbour, theirs: Digest, now: u64, topology: &Topology) -> Vec<Out> {
        let Some(n) = self.neighbours.get_mut(&from) else { return Vec::new() };
        let mine = summary(topology);
        if digest_of(&mine) == theirs {
            self.stats.digests_matched += 1;
            return Vec::new();
        }
        if within(n.summary_sent_at, now) {
            self.stats.limited += 1;
            return Vec::new();
        }
        n.summary_sent_at = Some(now);
        self.stats.summaries_sent += 1;
        vec![Out { to: from, send: Send::Summary(mine) }]
    }

    /// Neighbour `from` sent its summary: the entries it lacks or holds older,
    /// and our summary if it holds entries we lack or hold older (so it sends
    /// them). At most one answer per [`SUMMARY_EVERY_MS`] to it.
    pub fn on_summary(&mut self, from: Neighbour, theirs: &[EntryVersion], now: u64, topology: &Topology) -> Vec<Out> {
        let Some(n) = self.neighbours.get_mut(&from) else { return Vec::new() };
        if within(n.summary_answered_at, now) {
            self.stats.limited += 1;
            return Vec::new();
        }
        n.summary_answered_at = Some(now);
        self.stats.summaries_answered += 1;
        let mine = summary(topology);
        let held: HashMap<PeerName, EntryVersion> =
            theirs.iter().take(MAX_SUMMARY).map(|e| (e.name, *e)).collect();
        let they_lack: Vec<PeerName> = mine
            .iter()
            .filter(|m| held.get(&m.name).is_none_or(|t| m.newer_than(t)))
            .map(|m| m.name)
            .collect();
        let by_name: HashMap<PeerName, &EntryVersion> = mine.iter().map(|m| (m.name, m)).collect();
        let we_lack = held.values().any(|t| by_name.get(&t.name).is_none_or(|m| t.newer_than(m)));
        let mut out = Vec::new();
        if !they_lack.is_empty() {
            out.push(Out { to: from, send: Send::Entries(they_lack) });
        }
        if we_lack {
            if within(n.summary_sent_at, now) {
                self.stats.limited += 1;
            } else {
                n.summary_sent_at = Some(now);
                self.stats.summaries_sent += 1;
                out.push(Out { to: from, send: Send::Summary(mine) });
            }
        }
        out
    }
}

/// `base` × [0.75, 1.25), by `random`.
fn jitter(base: u64, random: u64) -> u64 {
    base * (750 + (((random & 0xffff_ffff) * 500) >> 32)) / 1000
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{ConnInfo, PeerInfo};

    fn name(n: u64) -> PeerName {
        PeerName(n)
    }

    fn info(n: u64, version: u64, conns: &[u64]) -> PeerInfo {
        PeerInfo {
            name: name(n),
            nickname: format!("p{n}"),
            uid: n * 10,
            version,
            software: "t".into(),
            mtu: 1400,
            connections: conns
                .iter()
                .map(|&c| ConnInfo {
                    peer: name(c),
                    addr: format!("10.0.0.{c}:6783").parse().unwrap(),
                    outbound: n < c,
                    established: true,
                })
                .collect(),
        }
    }

    fn topo(me: u64, others: &[(u64, u64)]) -> Topology {
        let mut t = Topology::new(info(me, 1, &[others.first().map_or(me + 1, |o| o.0)]));
        t.merge(others.iter().map(|&(n, v)| info(n, v, &[me])).collect()).unwrap();
        t
    }

    #[test]
    fn a_new_neighbour_gets_our_summary_and_news_skips_who_has_it() {
        let mut g = Gossip::new();
        // Me (1) connected to 7, 8, 9; entries of 2 and 3, whose owners reach only me.
        let mut t = Topology::new(info(1, 1, &[7, 8, 9]));
        t.merge(vec![info(2, 1, &[1]), info(3, 1, &[1]), info(7, 1, &[1]), info(8, 1, &[1]), info(9, 1, &[1])]).unwrap();
        assert_eq!(g.connected(7, name(7), true, 0, &t), vec![Out { to: 7, send: Send::Summary(summary(&t)) }]);
        g.connected(8, name(8), true, 0, &t);
        assert_eq!(g.connected(9, name(9), false, 0, &t), vec![Out { to: 9, send: Send::Everything }], "no digests: everything");
        // 7 answers with its own summary (it lacks 2 and 3, holds 8 newer): it
        // gets what it lacks; ours is not sent again (it had it on connect).
        let mut theirs = summary(&t);
        theirs.retain(|e| e.name != name(2) && e.name != name(3));
        theirs.iter_mut().filter(|e| e.name == name(8)).for_each(|e| e.version += 1);
        assert_eq!(g.on_summary(7, &theirs, 10, &t), vec![Out { to: 7, send: Send::Entries(vec![name(2), name(3)]) }]);
        let out = g.relay(&[name(3), name(2), name(3)], 8, &t, 5);
        assert_eq!(
            out,
            vec![
                Out { to: 7, send: Send::Entries(vec![name(2), name(3)]) },
                Out { to: 9, send: Send::Entries(vec![name(2), name(3)]) },
            ]
        );
        assert!(g.relay(&[], 8, &t, 5).is_empty());
        // 9's entry says 9 is connected to 7: 9 tells 7 itself, only 8 gets it.
        t.merge(vec![info(9, 2, &[1, 7])]).unwrap();
        assert_eq!(g.relay(&[name(9)], 9, &t, 5), vec![Out { to: 8, send: Send::Entries(vec![name(9)]) }]);
        // Connected to 7 and 8 too: nobody relays it.
        t.merge(vec![info(9, 3, &[1, 7, 8])]).unwrap();
        assert!(g.relay(&[name(9)], 9, &t, 5).is_empty());
        g.disconnected(7);
        assert_eq!(g.own_changed(0, &t).len(), 2, "our own entry to every neighbour");
    }

    #[test]
    fn our_own_entry_goes_out_at_once_until_it_changes_too_often() {
        let mut g = Gossip::new();
        let t = topo(1, &[(2, 1)]);
        g.connected(2, name(2), true, 0, &t);
        let me = |out: &[Out]| out.iter().filter(|o| o.send == Send::Entries(vec![name(1)])).count();
        for k in 0..OWN_ENTRY_BURST {
            assert_eq!(me(&g.own_changed(1000 + k, &t)), 1, "change {k} of a burst goes at once");
        }
        assert_eq!(me(&g.own_changed(1010, &t)), 0, "then it waits");
        assert_eq!(me(&g.own_changed(1100, &t)), 0);
        assert_eq!(me(&g.tick(1400, 1, &t)), 0);
        assert_eq!(me(&g.tick(1010 + OWN_ENTRY_EVERY_MS, 1, &t)), 1, "sent with a tick once a token is back");
        assert_eq!(me(&g.tick(5000, 1, &t)), 0, "nothing waits");
        // A quiet spell fills the bucket again.
        assert_eq!(me(&g.own_changed(60_000, &t)), 1);
    }

    #[test]
    fn rounds_send_digests_to_a_logarithmic_fanout() {
        let t = topo(1, &[(2, 1), (3, 1)]);
        let mut g = Gossip::new();
        for id in 0..100 {
            g.connected(id, name(id + 100), id != 5, 0, &t);
        }
        assert!(g.tick(0, 1, &t).is_empty(), "the first tick schedules");
        let due = g.next_round().unwrap();
        assert!((ROUND_MS * 3 / 4..ROUND_MS * 5 / 4).contains(&due), "{due}");
        assert!(g.tick(due - 1, 2, &t).is_empty());
        let mut legacy_seen = false;
        let mut now = due;
        for r in 0..50u64 {
            let out = g.tick(now, r.wrapping_mul(0x9e37_79b9_7f4a_7c15), &t);
            assert_eq!(out.len(), fanout(3), "round {r}");
            for o in &out {
                match &o.send {
                    Send::Digest(d) => assert_eq!(*d, digest(&t)),
                    Send::Everything => {
                        assert_eq!(o.to, 5, "only the neighbour without digests gets everything");
                        legacy_seen = true;
                    }
                    other => panic!("{other:?}"),
                }
            }
            now = g.next_round().unwrap();
        }
        assert!(legacy_seen, "the legacy neighbour was chosen in some round");
        assert_eq!(g.stats.rounds, 50);
    }

    #[test]
    fn digests_depend_on_every_version_and_uid() {
        let a = topo(1, &[(2, 1), (3, 1)]);
        let b = topo(1, &[(2, 1), (3, 2)]);
        let mut c = topo(1, &[(2, 1), (3, 1)]);
        assert_eq!(digest(&a), digest(&c));
        assert_ne!(digest(&a), digest(&b));
        let mut other_uid = info(3, 1, &[1]);
        other_uid.uid = 99;
        c.merge(vec![other_uid]).unwrap();
        assert_ne!(digest(&a), digest(&c), "a new incarnation at the same version");
        assert_eq!(digest(&a).peers, 3);
    }

    /// Two routers that differ reconcile in digest, summary, entries (+ summary), entries.
    #[test]
    fn a_differing_digest_leads_to_the_missing_entries_both_ways() {
        // a: 2@1, 3@2, 4@1. b: 2@3, 3@2, 5@1.
        let a = topo(1, &[(2, 1), (3, 2), (4, 1)]);
        let b = topo(1, &[(2, 3), (3, 2), (5, 1)]);
        let (mut ga, mut gb) = (Gossip::new(), Gossip::new());
        ga.connected(1, name(1), true, 0, &a);
        gb.connected(1, name(1), true, 0, &b);
        let now = SUMMARY_EVERY_MS; // after the summaries of the connect
        assert!(gb.on_digest(1, digest(&b), now, &b).is_empty(), "equal digests: nothing");
        let out = gb.on_digest(1, digest(&a), now, &b);
        let [Out { send: Send::Summary(sb), .. }] = &out[..] else { panic!("{out:?}") };
        let out = ga.on_summary(1, sb, now, &a);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].send, Send::Entries(vec![name(4)]), "b lacks 4 (2 is newer at b, 3 equal)");
        let Send::Summary(sa) = &out[1].send else { panic!("{out:?}") };
        let out = gb.on_summary(1, sa, now, &b);
        assert_eq!(out, vec![Out { to: 1, send: Send::Entries(vec![name(2), name(5)]) }], "b answers, and sent its summary already");
        assert_eq!(gb.stats.limited, 1);
    }

    #[test]
    fn a_neighbour_cannot_make_us_send_summaries_or_entries_in_a_loop() {
        let a = topo(1, &[(2, 1), (3, 1)]);
        let mut g = Gossip::new();
        g.connected(4, name(4), true, 0, &a);
        let bogus = Digest { peers: 1, hash: [7; 16] };
        let mut summaries = 0;
        let mut answers = 0;
        for t in (SUMMARY_EVERY_MS..SUMMARY_EVERY_MS + 60_000).step_by(100) {
            summaries += g.on_digest(4, bogus, t, &a).len();
            answers += g.on_summary(4, &[], t, &a).len();
        }
        // One minute: at most one summary and one answer per SUMMARY_EVERY_MS.
        assert_eq!(summaries, 6);
        assert_eq!(answers, 6);
        assert!(g.on_digest(99, bogus, 0, &a).is_empty(), "unknown neighbours get nothing");
        assert!(g.on_summary(99, &[], 0, &a).is_empty());
    }
}
