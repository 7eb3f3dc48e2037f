//! Single-decree Paxos carried in gossip: how the first peers agree on the seeds
//! of the ring (`consensus=N`).
//!
//! Owns: every participant's claims as this peer knows them, the merge of
//! claims from gossip, and the acceptor, proposer and learner steps. Knows
//! nothing about rings, messages or the clock (time is passed in).
//!
//! # Protocol
//! Each participant `P` publishes one record, its [`Claims`]: the highest ballot
//! it has promised, the highest ballot it has accepted and that ballot's value.
//! Only `P` writes its record, and both ballots only grow, so records merge by
//! taking the larger `(promised, accepted)`; everyone gossips everyone's records
//! (like Weave's paxos-over-gossip). Then, at each peer, after every merge:
//!
//! 1. **Learn.** If a quorum of records have accepted the same ballot, its value is
//!    chosen: the seeds of the ring.
//! 2. **Promise** (acceptor). Promise the highest ballot seen in any record.
//! 3. **Accept** (acceptor). If some record has accepted a ballot equal to my
//!    promise, accept it with its value. (A ballot is accepted first by its own
//!    proposer, which stands for the proposer's "accept" message.)
//! 4. **Propose, phase 2.** If my promise is my own ballot, not yet accepted, and a
//!    quorum of records promise exactly it, accept it myself with the value of the
//!    highest accepted ballot among those records, or, if none accepted anything,
//!    with the sorted names of all participants I know.
//! 5. **Propose, phase 1** — only while the caller asks for it (`propose` in
//!    [`Paxos::think`]: the peer was asked for an address; consensus is lazy, as
//!    in Weave, so a peer nobody asks for an address never starts a ballot and
//!    can still adopt a ring agreed elsewhere). Once I know of a quorum of
//!    participants, and again whenever `retry` passes (with random jitter)
//!    without a decision, pick a ballot `(highest round seen + 1, me)` and
//!    promise it to myself. The timer is pushed back whenever new claims arrive,
//!    so a proposal making progress is not interrupted. Steps 1 to 4 run
//!    whatever `propose` says: every participant is always an acceptor and a
//!    learner, and finishes phase 2 of a ballot it started.
//!
//! A record that promises ballot `b` shows the records' accepted ballot as of
//! that promise (a promise of `b` forbids accepting anything below `b`, and the
//! record is written atomically), which is exactly what a phase-1 reply carries,
//! so this is classic Paxos with gossip as the transport. Safety needs any two
//! quorums to intersect: the quorum is `max(N, participants known)/2 + 1`, so it
//! also grows if more than `N` consensus peers show up (best effort: two groups of
//! more than `N` peers that never hear of each other can still each decide, and
//! then refuse to merge with [`super::IpamError::DifferentRings`]).
//!
//! `N` is the largest `consensus=N` heard of, not only mine: the daemon's default
//! is 1 + the number of peers named at launch, so the first peers of a mesh
//! normally differ (`launch` gives 1, `launch h1` gives 2). Gossip carries each
//! peer's `N`; taking the maximum makes every peer that heard of the others count
//! a majority of the same, largest, group (a peer with a small `N` that heard of
//! a larger one cannot decide with a quorum the others would not intersect).
//! Claims must be persisted before they are sent (see `Ipam::take_dirty`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::IpamError;
use crate::peer::PeerName;

/// Most participants whose claims are kept (and accepted from gossip).
pub const MAX_PARTICIPANTS: usize = 10_000;

/// A proposal number; ordered by round, then proposer. The zero ballot means "none".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ballot {
    pub round: u64,
    pub proposer: PeerName,
}

impl Ballot {
    pub fn is_zero(&self) -> bool {
        *self == Ballot::default()
    }
}

/// One participant's published state. The value of its accepted ballot is kept
/// (and gossiped) once per ballot, not per record: with a thousand participants a
/// value is a few KB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub promised: Ballot,
    pub accepted: Ballot,
}

/// Records plus the values of the ballots they accepted: what gossip carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PaxosUpdate {
    pub claims: Vec<(PeerName, Claims)>,
    pub values: Vec<(Ballot, Vec<PeerName>)>,
}

impl Claims {
    fn key(&self) -> (Ballot, Ballot) {
        (self.promised, self.accepted)
    }
}

/// Paxos state at one peer (see the module docs).
#[derive(Clone, Debug)]
pub struct Paxos {
    me: PeerName,
    participant: bool,
    /// `N`: the largest `consensus=N` of mine and those heard of; 0 while unknown
    /// (a non-participant that has heard none).
    initial: u32,
    knows: BTreeMap<PeerName, Claims>,
    /// The value (sorted seeds) of every ballot some record accepted.
    values: BTreeMap<Ballot, Vec<PeerName>>,
    /// Records changed since the last gossip.
    changed: BTreeSet<PeerName>,
    next_attempt: Option<u64>,
    retry_ms: u64,
    decided: Option<Vec<PeerName>>,
    /// My own record changed since [`Paxos::take_mine_changed`] (must be persisted).
    mine_changed: bool,
}

impl Paxos {
    /// A participant (`consensus=initial`) or a relay (`participant` false: it
    /// merges and forwards claims but never makes any).
    pub fn new(me: PeerName, participant: bool, initial: u32, retry_ms: u64) -> Paxos {
        let mut p = Paxos {
            me,
            participant,
            initial: if participant { initial.max(1) } else { 0 },
            knows: BTreeMap::new(),
            values: BTreeMap::new(),
            changed: BTreeSet::new(),
            next_attempt: None,
            retry_ms: retry_ms.max(1),
            decided: None,
            mine_changed: participant,
        };
        if participant {
            p.knows.insert(me, Claims::default());
            p.changed.insert(me);
        }
        p
    }

    pub fn is_participant(&self) -> bool {
        self.participant
    }

    pub fn initial(&self) -> u32 {
        self.initial
    }

    /// Participants whose records I hold (me included).
    pub fn known(&self) -> usize {
        self.knows.len()
    }

    pub fn quorum(&self) -> usize {
        (self.initial as usize).max(self.knows.len()) / 2 + 1
    }

    /// Participants that must be known before a proposal starts: all `N` of
    /// `consensus=N` (so `consensus=3` allocates nothing until the third peer is
    /// there), and at least a quorum. Agreement itself needs only the quorum, so
    /// a participant that fails later does not block the others' agreement.
    pub fn needed(&self) -> usize {
        self.quorum().max(self.initial as usize)
    }

    pub fn decided(&self) -> Option<&[PeerName]> {
        self.decided.as_deref()
    }

    pub fn claims(&self) -> impl Iterator<Item = (PeerName, &Claims)> {
        self.knows.iter().map(|(&p, c)| (p, c))
    }

    /// The value of ballot `b`, if some record accepted it.
    pub fn value(&self, b: &Ballot) -> Option<&[PeerName]> {
        self.values.get(b).map(Vec::as_slice)
    }

    fn update_for(&self, claims: Vec<(PeerName, Claims)>) -> PaxosUpdate {
        let ballots: BTreeSet<Ballot> = claims.iter().map(|(_, c)| c.accepted).filter(|b| !b.is_zero()).collect();
        let values = ballots.into_iter().filter_map(|b| self.values.get(&b).map(|v| (b, v.clone()))).collect();
        PaxosUpdate { claims, values }
    }

    /// Everything, for full gossip and snapshots.
    pub(crate) fn all(&self) -> PaxosUpdate {
        self.update_for(self.knows.iter().map(|(&p, c)| (p, *c)).collect())
    }

    /// The records changed since the last call, for delta gossip.
    pub(crate) fn take_changed(&mut self) -> PaxosUpdate {
        let names = std::mem::take(&mut self.changed);
        let claims = names.into_iter().filter_map(|n| self.knows.get(&n).map(|c| (n, *c))).collect();
        self.update_for(claims)
    }

    /// Whether my own record changed since the last call (persist before sending it).
    pub(crate) fn take_mine_changed(&mut self) -> bool {
        std::mem::take(&mut self.mine_changed)
    }

    pub(crate) fn has_changes(&self) -> bool {
        !self.changed.is_empty()
    }

    pub(crate) fn clear_changed(&mut self) {
        self.changed.clear();
    }

    /// The highest round of any ballot in the records known here.
    pub fn max_round(&self) -> u64 {
        self.knows.values().map(|c| c.promised.round.max(c.accepted.round)).max().unwrap_or(0)
    }

    /// `name`'s record as known here.
    pub fn record(&self, name: PeerName) -> Option<&Claims> {
        self.knows.get(&name)
    }

    /// Whether the value of ballot `b` is known here.
    pub(crate) fn has_value(&self, b: &Ballot) -> bool {
        self.values.contains_key(b)
    }

    /// My own record, if I am a participant.
    pub fn mine(&self) -> Option<&Claims> {
        self.knows.get(&self.me)
    }

    /// When [`Paxos::think`] wants to run next (with `propose` true; a peer that
    /// is not proposing needs no timer).
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.decided.is_some() || !self.participant {
            return None;
        }
        self.next_attempt
    }

    /// Checks gossiped records (already bounded and shaped by the decoder: every
    /// accepted ballot has its value in `update`) without applying anything.
    /// The sender's `N` is no part of the check: a different one is no error, the
    /// larger is kept by [`Paxos::apply`] (see the module docs).
    pub(crate) fn plan_merge(&self, peer: PeerName, update: &PaxosUpdate) -> Result<PaxosUpdate, IpamError> {
        for (b, v) in &update.values {
            if self.values.get(b).is_some_and(|mine| mine != v) {
                return Err(IpamError::InconsistentClaims { peer, participant: b.proposer });
            }
        }
        let mut claims = Vec::new();
        let mut new_names = 0usize;
        for (name, c) in &update.claims {
            match self.knows.get(name) {
                None => {
                    new_names += 1;
                    claims.push((*name, *c));
                }
                Some(m) if c.key() > m.key() => claims.push((*name, *c)),
                Some(_) => {}
            }
        }
        if self.knows.len() + new_names > MAX_PARTICIPANTS {
            return Err(IpamError::Malformed(format!("more than {MAX_PARTICIPANTS} consensus participants")));
        }
        let needed: BTreeSet<Ballot> = claims.iter().map(|(_, c)| c.accepted).filter(|b| !b.is_zero()).collect();
        let values = update.values.iter().filter(|(b, _)| needed.contains(b) && !self.values.contains_key(b)).cloned().collect();
        Ok(PaxosUpdate { claims, values })
    }

    /// Applies what [`Paxos::plan_merge`] returned, and the sender's `N` (`initial`,
    /// 0 if unknown) if larger than mine. A record about me that is newer than
    /// mine (my own, from before a restart from an old snapshot) is adopted.
    pub(crate) fn apply(&mut self, initial: u32, plan: PaxosUpdate, now_ms: u64) {
        self.initial = self.initial.max(initial);
        if plan.claims.is_empty() {
            return;
        }
        self.values.extend(plan.values);
        for (name, c) in plan.claims {
            self.mine_changed |= name == self.me;
            self.knows.insert(name, c);
            self.changed.insert(name);
        }
        self.prune_values();
        // Progress is being made: do not interrupt it with a new ballot.
        if let Some(t) = self.next_attempt.as_mut() {
            *t = (*t).max(now_ms + self.retry_ms);
        }
    }

    /// Drops values no record refers to any more.
    fn prune_values(&mut self) {
        if self.values.len() > 1 {
            let used: BTreeSet<Ballot> = self.knows.values().map(|c| c.accepted).collect();
            self.values.retain(|b, _| used.contains(b));
        }
    }

    /// Runs the learner, acceptor and proposer steps; returns the chosen value once known.
    /// `jitter` is a random number used to spread retries. `propose`: whether to
    /// start (or retry) a ballot of my own (step 5); without it the proposal
    /// timer is dropped.
    pub fn think(&mut self, now_ms: u64, jitter: u64, propose: bool) -> Option<&[PeerName]> {
        if !propose {
            self.next_attempt = None;
        }
        for _ in 0..4 {
            if self.decided.is_some() || !self.step(now_ms, jitter, propose) {
                break;
            }
        }
        self.decided.as_deref()
    }

    /// One pass; true if my record changed (another pass may then make progress).
    fn step(&mut self, now_ms: u64, jitter: u64, propose: bool) -> bool {
        let quorum = self.quorum();
        // 1. Learn (only once N is known).
        if self.initial > 0 {
            let mut counts: BTreeMap<Ballot, usize> = BTreeMap::new();
            for c in self.knows.values() {
                if !c.accepted.is_zero() {
                    *counts.entry(c.accepted).or_default() += 1;
                }
            }
            if let Some((&b, _)) = counts.iter().rev().find(|(_, &n)| n >= quorum) {
                if let Some(value) = self.values.get(&b).filter(|v| !v.is_empty()) {
                    self.decided = Some(value.clone());
                    return false;
                }
            }
        }
        if !self.participant {
            return false;
        }
        let Some(mut mine) = self.knows.get(&self.me).copied() else { return false };
        let before = mine;
        // 2. Promise the highest ballot seen.
        let max_promised = self.knows.values().map(|c| c.promised.max(c.accepted)).max().unwrap_or_default();
        if max_promised > mine.promised {
            mine.promised = max_promised;
        }
        // 3. Accept a ballot equal to my promise that someone accepted.
        if mine.accepted < mine.promised && self.values.contains_key(&mine.promised) {
            mine.accepted = mine.promised;
        }
        // 4. Phase 2 of my own proposal.
        if mine.promised.proposer == self.me && !mine.promised.is_zero() && mine.accepted < mine.promised {
            let promisers: Vec<&Claims> = self
                .knows
                .iter()
                .map(|(n, c)| if *n == self.me { &mine } else { c })
                .filter(|c| c.promised == mine.promised)
                .collect();
            if promisers.len() >= quorum {
                let value = promisers
                    .iter()
                    .filter(|c| !c.accepted.is_zero())
                    .max_by_key(|c| c.accepted)
                    .and_then(|c| self.values.get(&c.accepted).cloned())
                    .unwrap_or_else(|| self.knows.keys().copied().collect());
                mine.accepted = mine.promised;
                self.values.insert(mine.promised, value);
            }
        }
        // 5. Phase 1: start or retry a proposal (only when asked to).
        if propose && self.knows.len() >= self.needed() {
            let spread = jitter % self.retry_ms;
            match self.next_attempt {
                None => self.next_attempt = Some(now_ms + spread / 4),
                Some(t) if now_ms >= t => {
                    // Rounds are bounded like versions: at the bound no new ballot starts.
                    if let Some(round) = super::ring::bump(self.max_round(), 1) {
                        mine.promised = Ballot { round, proposer: self.me };
                    }
                    self.next_attempt = Some(now_ms + self.retry_ms + spread);
                }
                Some(_) => {}
            }
        }
        if mine != before {
            self.knows.insert(self.me, mine);
            self.changed.insert(self.me);
            self.mine_changed = true;
            self.prune_values();
            true
        } else {
            false
        }
    }

    /// Marks the decision known from elsewhere (an agreed ring was adopted).
    pub(crate) fn set_decided(&mut self, seeds: &[PeerName]) {
        if self.decided.is_none() {
            self.decided = Some(seeds.to_vec());
        }
    }

    /// Restores from a snapshot (validated by the caller).
    pub(crate) fn restore(me: PeerName, participant: bool, initial: u32, retry_ms: u64, saved: PaxosUpdate) -> Paxos {
        let mut p = Paxos::new(me, participant, initial, retry_ms);
        for (n, c) in saved.claims {
            if n == me && !participant {
                continue;
            }
            p.knows.insert(n, c);
            p.changed.insert(n);
        }
        p.values.extend(saved.values);
        p.prune_values();
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::testutil::Rng;

    fn p(n: u64) -> PeerName {
        PeerName(n)
    }

    /// Exchanges full records between all pairs in `group` until nothing changes;
    /// every node proposes.
    fn gossip(nodes: &mut [Paxos], group: &[usize], now: u64, rng: &mut Rng) {
        gossip_with(nodes, group, now, rng, &vec![true; nodes.len()]);
    }

    /// Like [`gossip`]; only the nodes with `propose[i]` start ballots.
    fn gossip_with(nodes: &mut [Paxos], group: &[usize], now: u64, rng: &mut Rng, propose: &[bool]) {
        for _ in 0..20 {
            let mut any = false;
            for &i in group {
                let all = nodes[i].all();
                let initial = nodes[i].initial;
                for &j in group {
                    if i != j {
                        let up = nodes[j].plan_merge(p(i as u64 + 1), &all).unwrap();
                        any |= !up.claims.is_empty();
                        nodes[j].apply(initial, up, now);
                    }
                }
            }
            for &i in group {
                nodes[i].think(now, rng.next(), propose[i]);
            }
            if !any {
                break;
            }
        }
    }

    #[test]
    fn all_of_n_must_be_known_before_anyone_proposes() {
        let mut rng = Rng::new(1);
        let mut nodes: Vec<Paxos> = (1..=5).map(|i| Paxos::new(p(i), true, 5, 1000)).collect();
        let mut now = 0;
        assert_eq!(nodes[0].quorum(), 3);
        assert_eq!(nodes[0].needed(), 5);
        // Three of five are a quorum, but consensus=5 waits for all five.
        for _ in 0..10 {
            now += 500;
            gossip(&mut nodes, &[0, 1, 2], now, &mut rng);
        }
        assert!(nodes.iter().all(|n| n.decided().is_none()));
        assert!(nodes[0].mine().is_some_and(|m| m.promised.is_zero()), "nobody proposed");
        for _ in 0..10 {
            now += 500;
            gossip(&mut nodes, &[0, 1, 2, 3, 4], now, &mut rng);
        }
        let v = nodes[0].decided().expect("five of five decide").to_vec();
        assert_eq!(v, vec![p(1), p(2), p(3), p(4), p(5)]);
        for n in &nodes {
            assert_eq!(n.decided(), Some(&v[..]));
        }
    }

    #[test]
    fn different_counts_merge_and_the_largest_counts() {
        let mut a = Paxos::new(p(1), true, 1, 1000);
        let b = Paxos::new(p(2), true, 5, 1000);
        assert_eq!(a.quorum(), 1);
        let up = a.plan_merge(p(2), &b.all()).expect("a different N is no conflict");
        a.apply(b.initial, up, 0);
        assert_eq!((a.initial(), a.quorum()), (5, 3), "the larger N is kept");
        // A smaller N heard later changes nothing.
        let c = Paxos::new(p(3), true, 2, 1000);
        let up = a.plan_merge(p(3), &c.all()).unwrap();
        a.apply(c.initial, up, 0);
        assert_eq!((a.initial(), a.quorum()), (5, 3));
        // Alone with N = 1, A decides; a record claiming another value for A's ballot is refused.
        let mut a = Paxos::new(p(1), true, 1, 1000);
        a.think(0, 0, true);
        a.think(1000, 0, true);
        assert_eq!(a.decided(), Some(&[p(1)][..]));
        let mut bad = a.all();
        bad.values[0].1 = vec![p(9)];
        assert!(matches!(a.plan_merge(p(2), &bad), Err(IpamError::InconsistentClaims { .. })));
    }

    #[test]
    fn idle_participants_never_propose_but_accept_and_learn() {
        let mut rng = Rng::new(3);
        // Alone, N = 1, nobody asks it to propose: no ballot, no decision, no timer.
        let mut lone = Paxos::new(p(1), true, 1, 1000);
        for t in 0..100 {
            assert!(lone.think(t * 1000, rng.next(), false).is_none());
        }
        assert_eq!(lone.mine(), Some(&Claims::default()));
        assert_eq!(lone.poll_timeout(), None);
        // Three idle peers of N = 3 never decide either.
        let mut nodes: Vec<Paxos> = (1..=3).map(|i| Paxos::new(p(i), true, 3, 1000)).collect();
        let mut now = 0;
        for _ in 0..20 {
            now += 500;
            gossip_with(&mut nodes, &[0, 1, 2], now, &mut rng, &[false; 3]);
        }
        assert!(nodes.iter().all(|n| n.decided().is_none() && n.mine() == Some(&Claims::default())));
        // One of them proposes: the idle ones promise, accept and learn its value.
        for _ in 0..20 {
            now += 500;
            gossip_with(&mut nodes, &[0, 1, 2], now, &mut rng, &[false, true, false]);
        }
        for n in &nodes {
            assert_eq!(n.decided(), Some(&[p(1), p(2), p(3)][..]));
        }
        assert!(nodes.iter().all(|n| n.mine().unwrap().accepted.proposer == p(2)), "only peer 2 proposed");
    }

    #[test]
    fn random_partitions_never_decide_two_values() {
        for seed in 0..300 {
            let mut rng = Rng::new(seed);
            let n = 3 + rng.below(5) as usize;
            let mut nodes: Vec<Paxos> = (1..=n as u64).map(|i| Paxos::new(p(i), true, n as u32, 1000)).collect();
            // Some peers have allocations waiting (they propose), the others only accept.
            let mut propose: Vec<bool> = (0..n).map(|_| rng.below(3) != 0).collect();
            propose[rng.below(n as u64) as usize] = true;
            let mut now = 0;
            for _ in 0..40 {
                now += rng.below(1500);
                // A random group talks; pairwise one-way deliveries of random records.
                for _ in 0..rng.below(6) {
                    let i = rng.below(n as u64) as usize;
                    let j = rng.below(n as u64) as usize;
                    if i == j {
                        continue;
                    }
                    let mut all = nodes[i].all();
                    all.claims.retain(|_| rng.below(4) != 0); // lose some records
                    let init = nodes[i].initial;
                    let up = nodes[j].plan_merge(p(i as u64 + 1), &all).unwrap();
                    nodes[j].apply(init, up, now);
                    nodes[j].think(now, rng.next(), propose[j]);
                }
                for (k, node) in nodes.iter_mut().enumerate() {
                    node.think(now, rng.next(), propose[k]);
                }
            }
            // Everyone talks at the end: all decide, and on one value.
            for _ in 0..30 {
                now += 1000;
                let all: Vec<usize> = (0..n).collect();
                gossip_with(&mut nodes, &all, now, &mut rng, &propose);
            }
            let vals: BTreeSet<Vec<PeerName>> = nodes.iter().filter_map(|x| x.decided().map(|v| v.to_vec())).collect();
            assert_eq!(vals.len(), 1, "seed {seed}: {vals:?}");
        }
    }
}
