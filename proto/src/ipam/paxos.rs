//! Single-decree Paxos over addressed messages: how the first peers agree on
//! the seeds of the ring (`consensus=N`).
//!
//! Owns: this peer's acceptor record, the participants it knows of, and, while
//! it proposes, the promises and accepts sent to it. Knows nothing about rings,
//! the wire or the clock (time is passed in); the allocator verifies what
//! arrives, wraps what goes out ([`Out`]) and spreads the decision.
//!
//! # Protocol (wire version 4)
//! Classic Paxos in which only the proposer collects answers:
//!
//! 1. **Prepare** (flooded). A participant asked for an address (`propose` in
//!    [`Paxos::think`]: consensus is lazy, as in Weave) picks a ballot
//!    `(highest round seen + 1, me)`, promises it to itself and floods a
//!    `Prepare`: each peer forwards a prepare to its neighbours only the first
//!    time it sees that `(ballot, attempt)` and only if it is the highest seen,
//!    so competing floods stop where a higher one passed.
//! 2. **Promise** (addressed to the proposer). A participant promises the
//!    highest ballot it saw and answers with the ballot it accepted last and
//!    that ballot's value (signed by its proposer).
//! 3. **Accept** (addressed to each participant). Once the promises of a quorum
//!    are in and all `N` participants are known (from promises, neighbours'
//!    gossip and values), the proposer takes the value of the highest accepted
//!    ballot among the promises, or, if none, the sorted names of every
//!    participant it knows, signs it and sends it to every participant.
//! 4. **Accepted** (addressed to the proposer). A participant that has not
//!    promised a higher ballot accepts, persists, and answers with its
//!    signature over (ballot, SHA-256 of the value).
//! 5. **Decision**. With a quorum of accept signatures the proposer has learned
//!    the value; the decision (ballot, value, value signature and a quorum of
//!    accept signatures) is verifiable by anyone and spreads announce-and-pull
//!    (see the allocator): no single peer can forge one.
//!
//! Losses are repaired by the proposer alone: every `retry` it floods the
//! prepare again (a higher `attempt`) while promises are missing, or sends the
//! accept again to those that did not answer; a proposal that brings nothing
//! new for [`IDLE_RESENDS`] resends gives way to a new ballot. A participant
//! that wants a ring and sees no prepare or accept for `retry` (the proposer
//! died) starts its own ballot, as Paxos does; the promises then carry the
//! values accepted so far, so a chosen value stays chosen.
//!
//! The quorum is `max(N, participants known)/2 + 1` (so it grows if more than
//! `N` consensus peers show up); `N` is the largest `consensus=N` heard of
//! (gossip, prepares and promises carry it). An acceptor record must be
//! persisted before the promise or accept that reports it is sent
//! (see `Ipam::take_dirty`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::space::Cidr;
use super::wire;
use crate::peer::PeerName;
use crate::trust::{Signature, Signer};

/// Most participants counted (and accepted in values and decisions).
pub const MAX_PARTICIPANTS: usize = 10_000;
/// Resends without a new promise or accept after which a proposal gives way
/// to a new ballot (some acceptors promised a higher one this peer never saw).
pub const IDLE_RESENDS: u32 = 3;

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

/// One participant's acceptor record: the highest ballot it promised, the
/// highest it accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub promised: Ballot,
    pub accepted: Ballot,
}

/// Records plus the values of the ballots they accepted: the snapshot layout
/// (since wire version 4 only this peer's own record is kept).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PaxosUpdate {
    pub claims: Vec<(PeerName, Claims)>,
    pub values: Vec<(Ballot, Vec<PeerName>)>,
}

/// A ballot's value with its proposer's signature over [`wire::value_message`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SignedValue {
    pub value: Vec<PeerName>,
    pub sig: Signature,
}

/// What Paxos wants sent; the allocator signs the envelope and routes it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Out {
    /// Flood my prepare to the neighbours.
    Prepare { ballot: Ballot, attempt: u32 },
    Promise { to: PeerName, ballot: Ballot, accepted: Ballot, value: Option<SignedValue> },
    Accept { to: PeerName, ballot: Ballot, value: SignedValue },
    Accepted { to: PeerName, ballot: Ballot, sig: Signature },
}

/// What a proposer learned: enough for a verifiable decision.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Learned {
    pub ballot: Ballot,
    pub value: SignedValue,
    /// A quorum of accept signatures, by name.
    pub accepts: Vec<(PeerName, Signature)>,
}

#[derive(Clone, Debug)]
struct Proposal {
    ballot: Ballot,
    attempt: u32,
    promises: BTreeSet<PeerName>,
    /// The highest accepted ballot the promises reported, with its value.
    best: Option<(Ballot, SignedValue)>,
    /// Phase 2: the value sent and its digest.
    value: Option<(SignedValue, [u8; 32])>,
    accepts: BTreeMap<PeerName, Signature>,
    resend_at: u64,
    idle: u32,
}

/// Paxos state at one peer (see the module docs).
#[derive(Clone, Debug)]
pub struct Paxos {
    me: PeerName,
    participant: bool,
    universe: Cidr,
    /// `N`: the largest `consensus=N` of mine and those heard of; 0 while unknown.
    initial: u32,
    /// My acceptor record (participants only).
    mine: Claims,
    /// The value of `mine.accepted`.
    my_value: Option<SignedValue>,
    participants: BTreeSet<PeerName>,
    max_round: u64,
    /// The highest `(ballot, attempt)` of a prepare seen (forwarded once).
    seen: (Ballot, u32),
    proposal: Option<Proposal>,
    next_attempt: Option<u64>,
    retry_ms: u64,
    decided: Option<Vec<PeerName>>,
    mine_changed: bool,
    out: Vec<Out>,
    learned: Option<Learned>,
}

/// The quorum a decision of `value` must show (anyone can check it).
pub(crate) fn decision_quorum(initial: u32, value_len: usize) -> usize {
    (initial as usize).max(value_len) / 2 + 1
}

impl Paxos {
    /// A participant (`consensus=initial`) or a relay (`participant` false: it
    /// forwards prepares but never promises or proposes).
    pub fn new(me: PeerName, participant: bool, initial: u32, retry_ms: u64, universe: Cidr) -> Paxos {
        let mut participants = BTreeSet::new();
        if participant {
            participants.insert(me);
        }
        Paxos {
            me,
            participant,
            universe,
            initial: if participant { initial.max(1) } else { 0 },
            mine: Claims::default(),
            my_value: None,
            participants,
            max_round: 0,
            seen: (Ballot::default(), 0),
            proposal: None,
            next_attempt: None,
            retry_ms: retry_ms.max(1),
            decided: None,
            mine_changed: participant,
            out: Vec::new(),
            learned: None,
        }
    }

    pub fn is_participant(&self) -> bool {
        self.participant
    }

    pub fn initial(&self) -> u32 {
        self.initial
    }

    /// Participants known (me included).
    pub fn known(&self) -> usize {
        self.participants.len()
    }

    pub fn quorum(&self) -> usize {
        (self.initial as usize).max(self.participants.len()) / 2 + 1
    }

    /// Participants that must be known before a value is proposed: all `N` of
    /// `consensus=N`, and at least a quorum.
    pub fn needed(&self) -> usize {
        self.quorum().max(self.initial as usize)
    }

    pub fn decided(&self) -> Option<&[PeerName]> {
        self.decided.as_deref()
    }

    /// My acceptor record, if I am a participant.
    pub fn mine(&self) -> Option<&Claims> {
        self.participant.then_some(&self.mine)
    }

    /// The highest round seen.
    pub fn max_round(&self) -> u64 {
        self.max_round.max(self.mine.promised.round)
    }

    /// The value of the ballot I accepted last, if I hold it.
    pub(crate) fn accepted_value(&self) -> Option<&[PeerName]> {
        self.my_value.as_ref().filter(|_| !self.mine.accepted.is_zero()).map(|v| v.value.as_slice())
    }

    /// Whether a proposal of mine is under way.
    pub fn proposing(&self) -> bool {
        self.proposal.is_some()
    }

    /// When [`Paxos::think`] wants to run next.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.decided.is_some() || !self.participant {
            return None;
        }
        let resend = self.proposal.as_ref().map(|p| p.resend_at);
        match (self.next_attempt, resend) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(crate) fn take_out(&mut self) -> Vec<Out> {
        std::mem::take(&mut self.out)
    }

    pub(crate) fn take_learned(&mut self) -> Option<Learned> {
        self.learned.take()
    }

    /// Whether my own record changed since the last call (persist before sending).
    pub(crate) fn take_mine_changed(&mut self) -> bool {
        std::mem::take(&mut self.mine_changed)
    }

    fn note_initial(&mut self, initial: u32) {
        if initial as usize <= MAX_PARTICIPANTS {
            self.initial = self.initial.max(initial);
        }
    }

    fn add_participant(&mut self, p: PeerName) {
        if self.participants.len() < MAX_PARTICIPANTS && p != PeerName::BROADCAST {
            self.participants.insert(p);
        }
    }

    fn note_round(&mut self, b: &Ballot) {
        self.max_round = self.max_round.max(b.round);
    }

    /// Progress by someone else: a new ballot of mine can wait.
    fn push_back(&mut self, now_ms: u64) {
        if let Some(t) = self.next_attempt.as_mut() {
            *t = (*t).max(now_ms + self.retry_ms);
        }
    }

    /// A neighbour's gossip says it takes part with `consensus=initial`.
    pub(crate) fn heard_participant(&mut self, p: PeerName, initial: u32) {
        self.note_initial(initial);
        self.add_participant(p);
    }

    /// A verified prepare (its envelope is the proposer's). Returns whether to
    /// forward it to the neighbours (first sight, highest seen).
    pub(crate) fn on_prepare(&mut self, ballot: Ballot, attempt: u32, initial: u32, now_ms: u64) -> bool {
        self.note_initial(initial);
        self.note_round(&ballot);
        self.add_participant(ballot.proposer);
        if (ballot, attempt) <= self.seen {
            return false;
        }
        self.seen = (ballot, attempt);
        self.push_back(now_ms);
        if self.participant && self.decided.is_none() {
            if ballot > self.mine.promised {
                self.mine.promised = ballot;
                self.mine_changed = true;
            }
            if ballot == self.mine.promised && ballot.proposer != self.me {
                let value = if self.mine.accepted.is_zero() { None } else { self.my_value.clone() };
                self.out.push(Out::Promise { to: ballot.proposer, ballot, accepted: self.mine.accepted, value });
            }
        }
        true
    }

    /// A verified promise from participant `from` (its value, if any, signed by
    /// its ballot's proposer).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_promise(
        &mut self,
        from: PeerName,
        ballot: Ballot,
        initial: u32,
        accepted: Ballot,
        value: Option<SignedValue>,
        now_ms: u64,
        signer: &Signer,
    ) {
        self.note_initial(initial);
        self.note_round(&accepted);
        self.add_participant(from);
        if let Some(v) = &value {
            for &n in &v.value {
                self.add_participant(n);
            }
        }
        let Some(p) = self.proposal.as_mut().filter(|p| p.ballot == ballot) else { return };
        if !p.promises.insert(from) {
            return;
        }
        p.idle = 0;
        if let Some(v) = value.filter(|_| !accepted.is_zero()) {
            if p.best.as_ref().is_none_or(|(b, _)| accepted > *b) {
                p.best = Some((accepted, v));
            }
        }
        if let Some((v, _)) = &p.value {
            // Phase 2 is under way: this one may accept too.
            self.out.push(Out::Accept { to: from, ballot, value: v.clone() });
        }
        self.try_phase2(now_ms, signer);
    }

    /// A verified accept request from `ballot`'s proposer.
    pub(crate) fn on_accept(&mut self, ballot: Ballot, value: SignedValue, now_ms: u64, signer: &Signer) {
        self.note_round(&ballot);
        self.add_participant(ballot.proposer);
        for &n in &value.value {
            self.add_participant(n);
        }
        self.push_back(now_ms);
        if !self.participant || self.decided.is_some() || ballot < self.mine.promised {
            return;
        }
        if self.mine.accepted != ballot {
            self.mine = Claims { promised: ballot, accepted: ballot };
            self.my_value = Some(value);
            self.mine_changed = true;
        }
        if ballot.proposer != self.me {
            if let Some(sig) = self.accept_sig_with(signer, ballot) {
                self.out.push(Out::Accepted { to: ballot.proposer, ballot, sig });
            }
        }
    }

    fn accept_sig_with(&self, signer: &Signer, ballot: Ballot) -> Option<Signature> {
        let v = self.my_value.as_ref()?;
        let digest = wire::value_digest(&v.value);
        Some(signer.sign(wire::DOMAIN_PAXOS_ACCEPT, &wire::accept_message(&self.universe, self.me, &ballot, &digest)))
    }

    /// The digest of the value my proposal `ballot` sent (to check accept signatures).
    pub(crate) fn proposal_digest(&self, ballot: &Ballot) -> Option<[u8; 32]> {
        self.proposal.as_ref().filter(|p| p.ballot == *ballot).and_then(|p| p.value.as_ref()).map(|(_, d)| *d)
    }

    /// A verified accept signature from participant `from` for my proposal.
    pub(crate) fn on_accepted(&mut self, from: PeerName, ballot: Ballot, sig: Signature) {
        self.add_participant(from);
        let Some(p) = self.proposal.as_mut().filter(|p| p.ballot == ballot && p.value.is_some()) else { return };
        if p.accepts.insert(from, sig).is_none() {
            p.idle = 0;
        }
        self.check_learned();
    }

    /// Phase 2 of my proposal, once a quorum promised and all `N` are known.
    fn try_phase2(&mut self, now_ms: u64, signer: &Signer) {
        let (quorum, needed) = (self.quorum(), self.needed());
        let known = self.participants.len();
        let Some(p) = self.proposal.as_mut() else { return };
        if p.value.is_some() || p.ballot != self.mine.promised || p.promises.len() < quorum || known < needed {
            return;
        }
        let ballot = p.ballot;
        let value = match &p.best {
            Some((_, v)) => v.value.clone(),
            None => self.participants.iter().copied().collect(),
        };
        let sig = signer.sign(wire::DOMAIN_PAXOS_VALUE, &wire::value_message(&self.universe, &ballot, &value));
        let sv = SignedValue { value, sig };
        let digest = wire::value_digest(&sv.value);
        p.value = Some((sv.clone(), digest));
        p.resend_at = now_ms + self.retry_ms;
        p.idle = 0;
        self.mine = Claims { promised: ballot, accepted: ballot };
        self.my_value = Some(sv.clone());
        self.mine_changed = true;
        if let Some(s) = self.accept_sig_with(signer, ballot) {
            if let Some(p) = self.proposal.as_mut() {
                p.accepts.insert(self.me, s);
            }
        }
        for &to in &self.participants {
            if to != self.me {
                self.out.push(Out::Accept { to, ballot, value: sv.clone() });
            }
        }
        self.check_learned();
    }

    fn check_learned(&mut self) {
        let q = self.quorum();
        let Some(p) = self.proposal.as_ref() else { return };
        let Some((sv, _)) = &p.value else { return };
        let need = q.max(decision_quorum(self.initial, sv.value.len()));
        let members: Vec<(PeerName, Signature)> =
            p.accepts.iter().filter(|(n, _)| sv.value.binary_search(n).is_ok()).map(|(n, s)| (*n, *s)).take(need).collect();
        if members.len() < need {
            return;
        }
        self.decided = Some(sv.value.clone());
        self.learned = Some(Learned { ballot: p.ballot, value: sv.clone(), accepts: members });
        self.proposal = None;
        self.next_attempt = None;
    }

    /// Timers and my own proposal: starts a ballot when asked to (`propose`),
    /// resends, gives way. `jitter` is a random number used to spread retries.
    pub(crate) fn think(&mut self, now_ms: u64, jitter: u64, propose: bool, signer: &Signer) -> Option<&[PeerName]> {
        if self.decided.is_some() || !self.participant {
            self.next_attempt = None;
            return self.decided.as_deref();
        }
        if self.proposal.as_ref().is_some_and(|p| p.ballot < self.mine.promised) {
            self.proposal = None; // someone promised a higher ballot: mine gave way
        }
        let quorum = self.quorum();
        let spread = jitter % self.retry_ms;
        if let Some(p) = self.proposal.as_mut().filter(|p| now_ms >= p.resend_at) {
            p.idle += 1;
            p.resend_at = now_ms + self.retry_ms;
            let waiting_for_joiners = p.value.is_none() && p.promises.len() >= quorum;
            if p.idle > IDLE_RESENDS && !waiting_for_joiners {
                self.proposal = None;
                self.next_attempt = Some(now_ms + spread / 4);
            } else if p.value.is_none() {
                p.attempt = p.attempt.saturating_add(1);
                let (ballot, attempt) = (p.ballot, p.attempt);
                self.seen = self.seen.max((ballot, attempt));
                self.out.push(Out::Prepare { ballot, attempt });
            } else if let Some((v, _)) = &p.value {
                let (ballot, v) = (p.ballot, v.clone());
                let missing: Vec<PeerName> =
                    self.participants.iter().copied().filter(|n| *n != self.me && !p.accepts.contains_key(n)).collect();
                for to in missing {
                    self.out.push(Out::Accept { to, ballot, value: v.clone() });
                }
            }
        }
        if !propose {
            self.next_attempt = None;
        } else if self.proposal.is_none() {
            match self.next_attempt {
                None => self.next_attempt = Some(now_ms + spread / 4),
                Some(t) if now_ms >= t => {
                    // Rounds are bounded like versions: at the bound no new ballot starts.
                    if let Some(round) = super::ring::bump(self.max_round(), 1) {
                        let ballot = Ballot { round, proposer: self.me };
                        self.mine.promised = ballot;
                        self.mine_changed = true;
                        self.max_round = round;
                        let best = (!self.mine.accepted.is_zero())
                            .then(|| self.my_value.clone().map(|v| (self.mine.accepted, v)))
                            .flatten();
                        self.proposal = Some(Proposal {
                            ballot,
                            attempt: 0,
                            promises: BTreeSet::from([self.me]),
                            best,
                            value: None,
                            accepts: BTreeMap::new(),
                            resend_at: now_ms + self.retry_ms,
                            idle: 0,
                        });
                        self.seen = self.seen.max((ballot, 0));
                        self.out.push(Out::Prepare { ballot, attempt: 0 });
                    }
                    self.next_attempt = Some(now_ms + self.retry_ms + spread);
                }
                Some(_) => {}
            }
        }
        self.try_phase2(now_ms, signer);
        self.decided.as_deref()
    }

    /// Marks the decision known from elsewhere (a decision or an agreed ring).
    pub(crate) fn set_decided(&mut self, seeds: &[PeerName]) {
        if self.decided.is_none() {
            self.decided = Some(seeds.to_vec());
        }
        self.proposal = None;
        self.next_attempt = None;
        self.out.clear();
    }

    /// My record and its value (with the value's signature), for the snapshot.
    pub(crate) fn saved(&self) -> (PaxosUpdate, Vec<(Ballot, Signature)>) {
        if !self.participant {
            return (PaxosUpdate::default(), Vec::new());
        }
        let mut up = PaxosUpdate { claims: vec![(self.me, self.mine)], values: Vec::new() };
        let mut sigs = Vec::new();
        if let Some(v) = self.my_value.as_ref().filter(|_| !self.mine.accepted.is_zero()) {
            up.values.push((self.mine.accepted, v.value.clone()));
            sigs.push((self.mine.accepted, v.sig));
        }
        (up, sigs)
    }

    /// Restores from a snapshot (validated by the caller): my own record and
    /// the value it accepted (records of others from older snapshots are not needed).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn restore(
        me: PeerName,
        participant: bool,
        initial: u32,
        retry_ms: u64,
        universe: Cidr,
        saved: PaxosUpdate,
        value_sigs: &[(Ballot, Signature)],
    ) -> Paxos {
        let mut p = Paxos::new(me, participant, initial, retry_ms, universe);
        if !participant {
            return p;
        }
        if let Some((_, c)) = saved.claims.iter().find(|(n, _)| *n == me) {
            p.mine = *c;
            p.max_round = c.promised.round.max(c.accepted.round);
            let value = saved.values.iter().find(|(b, _)| *b == c.accepted).map(|(_, v)| v.clone());
            let sig = value_sigs.iter().find(|(b, _)| *b == c.accepted).map(|(_, s)| *s);
            if let (Some(value), Some(sig)) = (value, sig) {
                for &n in &value {
                    p.add_participant(n);
                }
                p.my_value = Some(SignedValue { value, sig });
            }
            // (A value held without its signature, from a version-1 snapshot, is
            // not reported in promises: its signature cannot be shown.)
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::ipam::testutil::Rng;

    fn p(n: u64) -> PeerName {
        PeerName(n)
    }

    /// A full mesh of `n` participants exchanging [`Out`]s through a lossy,
    /// reordering queue; returns every value a proposer learned.
    struct Net {
        nodes: Vec<Paxos>,
        signers: Vec<Signer>,
        queue: Vec<(usize, Out)>,
        learned: Vec<Learned>,
        up: Vec<bool>,
    }

    impl Net {
        fn new(n: usize, initial: u32) -> Net {
            let u: Cidr = "10.32.0.0/12".parse().unwrap();
            Net {
                nodes: (1..=n as u64).map(|i| Paxos::new(p(i), true, initial, 1000, u)).collect(),
                signers: (1..=n as u8).map(|i| Signer::from_identity(&Identity::from_private([i; 32]).unwrap())).collect(),
                queue: Vec::new(),
                learned: Vec::new(),
                up: vec![true; n],
            }
        }

        fn collect(&mut self, i: usize) {
            for o in self.nodes[i].take_out() {
                self.queue.push((i, o));
            }
            if let Some(l) = self.nodes[i].take_learned() {
                self.learned.push(l);
            }
        }

        /// Delivers the queue in random order, losing `loss_pct` % of deliveries.
        fn deliver(&mut self, now: u64, rng: &mut Rng, loss_pct: u64) {
            let mut q = std::mem::take(&mut self.queue);
            for k in (1..q.len()).rev() {
                q.swap(k, rng.below(k as u64 + 1) as usize);
            }
            for (from, o) in q {
                let to: Vec<usize> = match &o {
                    Out::Prepare { .. } => (0..self.nodes.len()).filter(|&j| j != from).collect(),
                    Out::Promise { to, .. } | Out::Accept { to, .. } | Out::Accepted { to, .. } => vec![to.0 as usize - 1],
                };
                for j in to {
                    if !self.up[j] || !self.up[from] || rng.below(100) < loss_pct {
                        continue;
                    }
                    let src = p(from as u64 + 1);
                    let s = &self.signers[j];
                    let node = &mut self.nodes[j];
                    match o.clone() {
                        Out::Prepare { ballot, attempt } => {
                            node.on_prepare(ballot, attempt, 0, now);
                        }
                        Out::Promise { ballot, accepted, value, .. } => node.on_promise(src, ballot, 0, accepted, value, now, s),
                        Out::Accept { ballot, value, .. } => node.on_accept(ballot, value, now, s),
                        Out::Accepted { ballot, sig, .. } => node.on_accepted(src, ballot, sig),
                    }
                    self.collect(j);
                }
            }
        }

        fn think(&mut self, now: u64, rng: &mut Rng, propose: &[bool]) {
            for (i, &wants) in propose.iter().enumerate() {
                if self.up[i] {
                    let s = &self.signers[i];
                    self.nodes[i].think(now, rng.next(), wants, s);
                    self.collect(i);
                }
            }
        }
    }

    #[test]
    fn one_proposer_decides_with_all_n_known() {
        let mut rng = Rng::new(1);
        let mut net = Net::new(5, 5);
        let propose = [false, false, true, false, false];
        let mut now = 0;
        for _ in 0..20 {
            now += 250;
            net.think(now, &mut rng, &propose);
            net.deliver(now, &mut rng, 0);
        }
        assert_eq!(net.learned.len(), 1);
        let l = &net.learned[0];
        assert_eq!(l.value.value, (1..=5).map(p).collect::<Vec<_>>());
        assert_eq!(l.ballot.proposer, p(3));
        assert_eq!(l.accepts.len(), 5 / 2 + 1, "a bare quorum of acceptances");
        assert!(net.nodes.iter().enumerate().all(|(i, n)| (i == 2) == n.decided().is_some()));
    }

    #[test]
    fn a_proposer_dying_mid_round_is_taken_over_with_its_value() {
        let mut rng = Rng::new(2);
        let mut net = Net::new(5, 5);
        let mut now = 0;
        // Peer 5 proposes; once some acceptors accepted its value, it dies.
        let mut propose = [false, false, false, false, true];
        while !net.nodes[0..4].iter().any(|n| !n.mine.accepted.is_zero()) {
            now += 50;
            net.think(now, &mut rng, &propose);
            net.deliver(now, &mut rng, 0);
            net.queue.retain(|(_, o)| !matches!(o, Out::Accepted { .. })); // it never learns
            assert!(now < 10_000);
        }
        let first = net.nodes.iter().find(|n| !n.mine.accepted.is_zero() && n.me != p(5)).unwrap().my_value.clone().unwrap();
        net.up[4] = false;
        net.queue.clear();
        propose = [true, false, false, false, false];
        for _ in 0..200 {
            now += 100;
            net.think(now, &mut rng, &propose);
            net.deliver(now, &mut rng, 0);
        }
        assert_eq!(net.learned.len(), 1, "peer 1 took over");
        assert_eq!(net.learned[0].ballot.proposer, p(1));
        assert_eq!(net.learned[0].value.value, first.value, "a value accepted may be chosen: kept");
    }

    #[test]
    fn competing_proposers_under_loss_never_learn_two_values() {
        for seed in 0..200 {
            let mut rng = Rng::new(seed);
            let n = 3 + rng.below(5) as usize;
            let mut net = Net::new(n, n as u32);
            let mut propose: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
            propose[rng.below(n as u64) as usize] = true;
            let mut now = 0;
            for t in 0..400 {
                now += rng.below(300);
                // Proposers crash and come back (state kept, as if restored).
                if t % 50 == 0 {
                    for k in 0..n {
                        net.up[k] = rng.below(5) != 0;
                    }
                }
                net.think(now, &mut rng, &propose);
                net.deliver(now, &mut rng, 30);
            }
            net.up = vec![true; n];
            for _ in 0..300 {
                now += 200;
                net.think(now, &mut rng, &propose);
                net.deliver(now, &mut rng, 0);
            }
            assert!(!net.learned.is_empty(), "seed {seed}: no decision after healing");
            let values: BTreeSet<Vec<PeerName>> = net.learned.iter().map(|l| l.value.value.clone()).collect();
            assert_eq!(values.len(), 1, "seed {seed}: {values:?}");
        }
    }
}
