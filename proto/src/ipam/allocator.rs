//! The [`Ipam`] state machine: allocations, donations and claims, gossip
//! scheduling, persistence. See the parent module for the daemon's contract.
//!
//! Owns: this peer's allocations (address → target), requests waiting for space,
//! outstanding asks to donors and owners, what to gossip next and when.
//! Invariant: every allocated address lies in an entry this peer owns in its own
//! ring; merges that would break it are refused ([`IpamError::OwnershipConflict`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use super::paxos::{decision_quorum, Ballot, Out, Paxos, SignedValue, MAX_PARTICIPANTS};
use super::ring::{free_in, Entry, Ring, MAX_SEEDS, TAKEOVER_JUMP};
use super::space::{self, addr_value, clip, Addr, Cidr};
use super::wire::{
    self, Body, Decision, Envelope, Gossip, Outcome, Packet, PaxosState, Proof, Snapshot, DOMAIN_ENTRY,
    DOMAIN_ENVELOPE, DOMAIN_PAXOS_ACCEPT, DOMAIN_PAXOS_VALUE, FULL_GOSSIP_CHUNK, MAX_HOPS, MAX_SNAPSHOT_BINDINGS,
    MAX_TARGET_LEN,
};
use super::{
    Allocation, Config, Conflict, Dest, DropStats, Event, Holder, InitMode, IpamError, IpamStatus, OwnerStatus, Request, RingState,
    Rng, Waiting,
};
use crate::identity::Identity;
use crate::peer::PeerName;
use crate::trust::{Binding, KeyBook, Signature, Signer, TrustError};

/// At most this many old owners, and signers per owner, are remembered in
/// `Ipam::early_takeovers` (each is one sync request later).
const MAX_EARLY_TAKEOVERS: usize = 16;

/// The version a takeover of an entry of mine at `version` jumps from: the
/// version itself, or, for an entry I took over myself (a version of at least
/// [`TAKEOVER_JUMP`]: my own edits add one each), the version it had before, as
/// another peer taking it over from the same dead peer saw it.
fn takeover_base(version: u64) -> u64 {
    if version >= TAKEOVER_JUMP {
        version - TAKEOVER_JUMP
    } else {
        version
    }
}

/// A takeover dropped because its old owner was still reachable here (see
/// `Ipam::early_takeovers`): one of its entries, to show that owner.
struct EarlyTakeover {
    owner: PeerName,
    by: PeerName,
    start: Addr,
    entry: Entry,
    proof: Proof,
}

/// Most failed requests remembered for the next `allocate` call.
const MAX_FAILED: usize = 1024;
/// How often the claim of an address in conflict is tried again.
pub const CONFLICT_RETRY_MS: u64 = 30_000;
/// Most events queued; the oldest are dropped beyond it.
const MAX_EVENTS: usize = 10_000;
/// Least time between two full-state answers to the same peer.
const SYNC_INTERVAL_MS: u64 = 1_000;
/// A donor that said no (or did not answer) is not asked again for this many request timeouts.
const SHUN_TIMEOUTS: u64 = 5;
/// How far above every round known here a gossiped Paxos ballot may be: rounds
/// grow by one per attempt, so this never drops an honest record, and pushing
/// rounds to [`super::ring::MAX_VERSION`] takes 2^42 messages.
const MAX_ROUND_STEP: u64 = 1 << 20;
/// How many entries before a gap in this peer's view may have cut it off.
const GAP_LOOKBACK: usize = 16;
/// How long after agreeing this peer leaves neighbours that still gossip without
/// a ring to learn the decision from the Paxos records in flight, before it
/// answers their gossip with its full ring (the seeds: up to thousands of names).
/// Their full gossip is answered at once.
const AGREED_GRACE_MS: u64 = 1_000;

#[derive(Clone, Debug)]
struct Ask {
    id: u64,
    peer: PeerName,
    deadline: u64,
}

/// Most peers an observer asks at once to start consensus for it.
const ELECTION_CALLS: usize = 16;

/// An address a target uses while its claim is pending or has failed.
#[derive(Clone, Debug)]
struct InUse {
    prefix: u8,
    /// Why the last claim failed; `None` while the first one is pending.
    conflict: Option<IpamError>,
    /// When to claim again (after a failure).
    retry_at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PendingReq {
    target: String,
    req: Request,
}

enum Step {
    Done(IpAddr, u8),
    Failed(IpamError),
    NeedSpace(Cidr),
    NeedClaim(Addr),
}

/// One peer's IPAM (see the module docs of [`crate::ipam`]).
#[derive(Debug)]
pub struct Ipam {
    me: PeerName,
    universe: Cidr,
    config: Config,
    ring: Ring,
    paxos: Paxos,
    allocs: BTreeMap<Addr, String>,
    targets: BTreeMap<String, BTreeSet<Addr>>,
    pending: Vec<PendingReq>,
    failed: VecDeque<(PendingReq, IpamError)>,
    /// Exact addresses targets use before the ring gave them to them (see
    /// [`Ipam::note_in_use`]), by target and address. Not persisted.
    in_use: BTreeMap<(String, Addr), InUse>,
    space_asks: BTreeMap<Cidr, Ask>,
    claim_asks: BTreeMap<Addr, Ask>,
    shunned: BTreeMap<(Cidr, PeerName), u64>,
    live: Option<BTreeSet<PeerName>>,
    /// Ring starts changed since the last gossip.
    changed: BTreeSet<Addr>,
    full_due: bool,
    /// Send the neighbours a [`Body::Digest`] of the agreed ring (the periodic
    /// anti-entropy once agreed; full state goes only to neighbours that differ).
    digest_due: bool,
    next_full_ms: u64,
    next_paxos_full_ms: u64,
    retry_at: Option<u64>,
    /// Asked for an address before the ring was agreed: propose until it is (lazy
    /// consensus, as Weave's `awaitingConsensus`; a request cancelled meanwhile,
    /// like the daemon's `prime`, does not stop it). Not persisted.
    want_ring: bool,
    /// An observer waiting for the ring asks its reachable peers for space no
    /// earlier than this again: that makes the participants among them start
    /// consensus on its behalf (Weave's observers "call an election").
    next_election_call: u64,
    /// No ballot of mine before this time: a peer just became reachable and its
    /// agreed ring (or its consensus records) may be on the way.
    hold_proposals_until: u64,
    /// Re-base `hold_proposals_until` on the next clock reading (`peers_changed`
    /// gets no time).
    hold_rebase: bool,
    last_sync: BTreeMap<PeerName, u64>,
    last_sync_req: BTreeMap<PeerName, u64>,
    /// Takeovers (`rmpeer`) dropped because their old owner was still reachable
    /// here: old owner -> the peers that signed them. Their full state is asked
    /// for again once that owner is unreachable here too (an `rmpeer` run right
    /// after a death that another peer notices a little later). Not persisted.
    early_takeovers: BTreeMap<PeerName, BTreeSet<PeerName>>,
    /// When the ring became agreed here (0 if it was at start or restore).
    agreed_at: u64,
    transmits: VecDeque<(Dest, Vec<u8>)>,
    events: VecDeque<Event>,
    rng: Rng,
    next_id: u64,
    now: u64,
    dirty: bool,
    /// Signs this peer's messages, entries, Paxos records and values.
    signer: Arc<Signer>,
    /// This peer's binding, sent with its messages.
    binding: Binding,
    /// Bindings of the signers of records held here, to send along with them.
    bindings: BTreeMap<PeerName, Binding>,
    /// The decision this peer learned or verified (not persisted): announced
    /// to the neighbours once ([`Body::Decided`]), sent to those that ask.
    decision: Option<Decision>,
    announce_due: bool,
    /// The neighbour asked for its decision, and until when its answer is awaited.
    want_decision: Option<(PeerName, u64)>,
    /// When my decision was last sent to each peer.
    last_decision: BTreeMap<PeerName, u64>,
    /// Neighbours that announced a decision not yet held here.
    announcers: BTreeSet<PeerName>,
    drops: DropStats,
    /// Bindings admitted from the message being handled: kept in `bindings`
    /// only for the signers of records that end up held here.
    offered: BTreeMap<PeerName, Binding>,
    /// Whether my binding was sent to the neighbours (since reachable peers were
    /// last gained): later gossip to neighbours leaves it out. A neighbour that
    /// missed it (a lost message) asks for a sync, which carries it.
    sent_binding: bool,
}

impl Ipam {
    /// A fresh IPAM with default timers. Errors: a range outside /1../30, a
    /// `Consensus(0)`, an empty or oversized seed list, or `me` the broadcast name.
    pub fn new(me: PeerName, universe: Cidr, init: InitMode, identity: &Identity) -> Result<Ipam, IpamError> {
        Ipam::with_config(me, universe, init, Config::default(), identity)
    }

    /// A fresh IPAM. `identity` is this peer's: its signing key (derived from it)
    /// signs every message and record this peer writes, bound to the name `me`.
    pub fn with_config(me: PeerName, universe: Cidr, init: InitMode, config: Config, identity: &Identity) -> Result<Ipam, IpamError> {
        wire::check_universe(&universe)?;
        if me == PeerName::BROADCAST {
            return Err(IpamError::BadInit("peer name 00:00:00:00:00:00 is reserved".into()));
        }
        let retry = config.paxos_retry_ms;
        let (ring, paxos) = match &init {
            InitMode::Consensus(n) => {
                if *n == 0 || *n as usize > MAX_PARTICIPANTS {
                    return Err(IpamError::BadInit(format!("consensus needs 1 to {MAX_PARTICIPANTS} peers")));
                }
                (Ring::new(universe), Paxos::new(me, true, *n, retry, universe))
            }
            InitMode::Seed(peers) => {
                if peers.is_empty() || peers.len() > MAX_SEEDS || peers.contains(&PeerName::BROADCAST) {
                    return Err(IpamError::BadInit(format!("seed list must name 1 to {MAX_SEEDS} peers")));
                }
                let mut p = Paxos::new(me, false, 0, retry, universe);
                let ring = Ring::genesis(universe, peers);
                p.set_decided(ring.seeds());
                (ring, p)
            }
            InitMode::Observer => (Ring::new(universe), Paxos::new(me, false, 0, retry, universe)),
        };
        let seed = if config.rng_seed != 0 { config.rng_seed } else { me.0 ^ 0x6d65_7368_6e65_7421 };
        let signer = Arc::new(Signer::from_identity(identity));
        let binding = Binding::new(me, identity, &signer);
        let mut ipam = Ipam {
            me,
            universe,
            config,
            ring,
            paxos,
            allocs: BTreeMap::new(),
            targets: BTreeMap::new(),
            pending: Vec::new(),
            failed: VecDeque::new(),
            in_use: BTreeMap::new(),
            space_asks: BTreeMap::new(),
            claim_asks: BTreeMap::new(),
            shunned: BTreeMap::new(),
            live: None,
            changed: BTreeSet::new(),
            full_due: true,
            digest_due: false,
            next_full_ms: 0,
            next_paxos_full_ms: 0,
            retry_at: None,
            want_ring: false,
            next_election_call: 0,
            hold_proposals_until: 0,
            hold_rebase: false,
            last_sync: BTreeMap::new(),
            last_sync_req: BTreeMap::new(),
            early_takeovers: BTreeMap::new(),
            agreed_at: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            rng: Rng::new(seed),
            next_id: 0,
            now: 0,
            dirty: true,
            signer,
            binding,
            bindings: BTreeMap::new(),
            decision: None,
            announce_due: false,
            want_decision: None,
            last_decision: BTreeMap::new(),
            announcers: BTreeSet::new(),
            drops: DropStats::default(),
            offered: BTreeMap::new(),
            sent_binding: false,
        };
        ipam.next_id = ipam.fresh_ids();
        Ok(ipam)
    }

    /// Request ids start at a random point, so that replies to asks made before a
    /// restart are not taken for answers to new ones (ids are not persisted).
    fn fresh_ids(&mut self) -> u64 {
        (self.rng.next() >> 16) | 1
    }

    /// Restores from [`Ipam::snapshot`] bytes: the same ring (or consensus state),
    /// allocations and request ids. `me` and `universe` must match the snapshot's
    /// ([`IpamError::SnapshotPeer`], [`IpamError::SnapshotRange`]); a saved agreed
    /// ring (agreed here or adopted from a peer) wins over `init`, whatever its
    /// `N`. Call [`Ipam::release_missing`] next.
    ///
    /// A version-1 snapshot (no signatures) loads too: my own entries are signed
    /// anew; other peers' entries are kept unsigned (they only guide donor choice
    /// and status, never what this peer allocates) and are not relayed until a
    /// signed copy arrives from the mesh, which then replaces them.
    pub fn restore(me: PeerName, universe: Cidr, init: InitMode, config: Config, bytes: &[u8], identity: &Identity) -> Result<Ipam, IpamError> {
        let s: Snapshot = wire::decode_snapshot(bytes)?;
        if s.me != me {
            return Err(IpamError::SnapshotPeer { found: s.me, expected: me });
        }
        if s.universe != universe {
            return Err(IpamError::SnapshotRange { found: s.universe, expected: universe });
        }
        let mut ipam = Ipam::with_config(me, universe, init, config, identity)?;
        // Never repeat the random choices (and request ids) of the run that wrote the snapshot.
        let digest = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3));
        ipam.rng = Rng::new(ipam.rng.next() ^ digest);
        ipam.next_id = ipam.fresh_ids();
        for b in s.bindings {
            if b.verify().is_ok() && b.name != me {
                ipam.bindings.insert(b.name, b);
            }
        }
        if !s.seeds.is_empty() {
            ipam.ring = Ring::from_parts(universe, s.seeds, s.entries, s.proofs, me);
            ipam.paxos.set_decided(ipam.ring.seeds());
        } else if let Some(p) = s.paxos {
            if !ipam.ring.is_agreed() {
                let participant = ipam.paxos.is_participant();
                // The largest N heard of before the restart still counts.
                let initial = ipam.paxos.initial().max(p.initial);
                let retry = ipam.config.paxos_retry_ms;
                ipam.paxos = Paxos::restore(me, participant, initial, retry, universe, p.records, &s.value_sigs);
            }
        }
        for (ip, target) in s.allocations {
            if ipam.ring.covering_owned(me, ip).is_none() {
                return Err(IpamError::BadSnapshot(format!("{} is allocated but not in this peer's ranges", universe.ip(ip))));
            }
            ipam.targets.entry(target.clone()).or_default().insert(ip);
            ipam.allocs.insert(ip, target);
        }
        let mine: Vec<Addr> = ipam.ring.owned_by(me).map(|(s, _)| s).collect();
        for start in mine {
            ipam.recompute_free(start);
        }
        ipam.sign_pending();
        // Re-signed or migrated entries must reach the disk in the new format.
        ipam.dirty = bytes.first() != Some(&wire::SNAPSHOT_VERSION);
        Ok(ipam)
    }

    /// Everything needed to come back after a crash, as bytes (version byte first).
    /// Signs what this peer changed since the last signature first.
    pub fn snapshot(&mut self) -> Vec<u8> {
        self.sign_pending();
        let (paxos, value_sigs) = if !self.ring.is_agreed() && self.paxos.is_participant() {
            let (records, sigs) = self.paxos.saved();
            (Some(PaxosState { initial: self.paxos.initial(), records }), sigs)
        } else {
            (None, Vec::new())
        };
        let paxos_sigs = Vec::new();
        let entries = self.ring.all_entries();
        let proofs = entries.iter().map(|(s, _)| self.ring.proof(*s).copied()).collect();
        wire::encode_snapshot(&Snapshot {
            me: self.me,
            universe: self.universe,
            seeds: self.ring.seeds().to_vec(),
            entries,
            proofs,
            paxos,
            paxos_sigs,
            value_sigs,
            bindings: self.bindings.values().cloned().collect(),
            allocations: self.allocs.iter().map(|(&ip, t)| (ip, t.clone())).collect(),
        })
    }

    /// True once since the last call if the state changed. Clears the flag
    /// whether or not the caller manages to persist: a daemon should use
    /// [`Ipam::needs_save`] and [`Ipam::saved`] instead.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Whether the state changed since the last [`Ipam::saved`]: persist
    /// [`Ipam::snapshot`], then call [`Ipam::saved`], before sending anything from
    /// [`Ipam::poll_transmit`] or acting on [`Ipam::poll_event`]. If the write
    /// fails, send nothing: the state stays dirty and the messages stay queued.
    pub fn needs_save(&self) -> bool {
        self.dirty
    }

    /// The snapshot taken last was written durably.
    pub fn saved(&mut self) {
        self.dirty = false;
    }

    /// This peer's binding (name, keys), as its messages carry it.
    pub fn binding(&self) -> &Binding {
        &self.binding
    }

    /// What was dropped from peers so far, by reason.
    pub fn drops(&self) -> DropStats {
        self.drops
    }

    pub fn me(&self) -> PeerName {
        self.me
    }

    pub fn universe(&self) -> Cidr {
        self.universe
    }

    /// Whether initial ownership is settled here (allocation can proceed).
    pub fn is_agreed(&self) -> bool {
        self.ring.is_agreed()
    }

    /// The ring as this peer sees it.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The consensus state (records of the participants known here); it stops
    /// changing once the ring is agreed.
    pub fn paxos(&self) -> &Paxos {
        &self.paxos
    }

    /// The ring's canonical bytes: equal on peers that converged.
    pub fn ring_bytes(&self) -> Vec<u8> {
        self.ring.canonical_bytes()
    }

    /// Every address allocated here, with its target, by address.
    pub fn allocations(&self) -> impl Iterator<Item = (IpAddr, &str)> + '_ {
        self.allocs.iter().map(|(&ip, t)| (self.universe.ip(ip), t.as_str()))
    }

    /// The addresses `target` holds here.
    pub fn addresses_of(&self, target: &str) -> Vec<IpAddr> {
        self.targets.get(target).map(|s| s.iter().map(|&ip| self.universe.ip(ip)).collect()).unwrap_or_default()
    }

    /// Addresses targets here use whose claim failed (see [`Ipam::note_in_use`]).
    pub fn conflicts(&self) -> impl Iterator<Item = Conflict> + '_ {
        self.in_use.iter().filter_map(|((target, a), u)| {
            let error = u.conflict.clone()?;
            Some(Conflict { target: target.clone(), ip: self.universe.ip(*a), prefix: u.prefix, error })
        })
    }

    /// Number of requests waiting.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    // ------------------------------------------------------------------ API

    /// Allocates for `target` (see the module docs for the answers).
    pub fn allocate(&mut self, target: &str, req: Request, now_ms: u64) -> Result<Allocation, IpamError> {
        self.tick(now_ms);
        if target.is_empty() || target.len() > MAX_TARGET_LEN {
            return Err(IpamError::BadTarget(target.chars().take(64).collect()));
        }
        self.check_request(&req)?;
        let p = PendingReq { target: target.to_string(), req };
        if let Some(i) = self.failed.iter().position(|(f, _)| *f == p) {
            let (_, e) = self.failed.remove(i).expect("index is in range");
            return Err(e);
        }
        if self.pending.contains(&p) {
            return Ok(Allocation::Pending(self.waiting_for(&p.req)));
        }
        if !self.ring.is_agreed() {
            // The first request is what starts consensus (lazy, as in Weave).
            let w = self.waiting_for(&p.req);
            self.pending.push(p);
            self.want_ring = true;
            self.progress();
            return Ok(Allocation::Pending(w));
        }
        match self.try_complete(&p) {
            Step::Done(ip, prefix) => {
                self.in_use.remove(&(p.target, addr_value(ip)));
                Ok(Allocation::Ready { ip, prefix })
            }
            Step::Failed(e) => Err(e),
            Step::NeedSpace(subnet) => {
                self.pending.push(p.clone());
                self.ensure_space_ask(subnet);
                Ok(Allocation::Pending(self.waiting_for(&p.req)))
            }
            Step::NeedClaim(ip) => {
                self.pending.push(p.clone());
                self.ensure_claim_ask(ip);
                Ok(Allocation::Pending(self.waiting_for(&p.req)))
            }
        }
    }

    /// Notes that `target` uses `ip` (with `prefix`) whatever its claim's
    /// outcome: call it after [`Ipam::allocate`] of `Request::Exact` answered
    /// `Pending` and the address was configured anyway. A failure of that claim
    /// is then a [`Conflict`] (see the module docs), not an error for the next
    /// `allocate`. Nothing is noted for an address `target` already holds.
    pub fn note_in_use(&mut self, target: &str, ip: IpAddr, prefix: u8, now_ms: u64) -> Result<(), IpamError> {
        self.tick(now_ms);
        if target.is_empty() || target.len() > MAX_TARGET_LEN {
            return Err(IpamError::BadTarget(target.chars().take(64).collect()));
        }
        let req = Request::Exact { ip, prefix };
        self.check_request(&req)?;
        let a = addr_value(ip);
        if self.allocs.get(&a).is_some_and(|t| t == target) {
            return Ok(());
        }
        let mut entry = InUse { prefix, conflict: None, retry_at: 0 };
        // Its claim may have failed already, between `allocate` and now.
        let p = PendingReq { target: target.to_string(), req };
        if let Some(i) = self.failed.iter().position(|(f, _)| *f == p) {
            let (_, e) = self.failed.remove(i).expect("index is in range");
            entry.conflict = Some(e.clone());
            entry.retry_at = self.now + CONFLICT_RETRY_MS;
            self.push_event(Event::Conflict(Conflict { target: p.target.clone(), ip, prefix, error: e }));
        }
        self.in_use.insert((p.target, a), entry);
        Ok(())
    }

    /// Notes that `target` uses `ip` (with `prefix`) although its claim failed
    /// at once with `error` (another target here holds it): a [`Conflict`],
    /// listed and claimed again every [`CONFLICT_RETRY_MS`], as when a claim
    /// noted by [`Ipam::note_in_use`] fails later.
    pub fn note_conflict(&mut self, target: &str, ip: IpAddr, prefix: u8, error: IpamError, now_ms: u64) -> Result<(), IpamError> {
        self.tick(now_ms);
        if target.is_empty() || target.len() > MAX_TARGET_LEN {
            return Err(IpamError::BadTarget(target.chars().take(64).collect()));
        }
        self.check_request(&Request::Exact { ip, prefix })?;
        let a = addr_value(ip);
        if self.allocs.get(&a).is_some_and(|t| t == target) {
            return Ok(());
        }
        let entry = InUse { prefix, conflict: Some(error.clone()), retry_at: self.now + CONFLICT_RETRY_MS };
        self.in_use.insert((target.to_string(), a), entry);
        self.push_event(Event::Conflict(Conflict { target: target.to_string(), ip, prefix, error }));
        Ok(())
    }

    /// Returns `ip` of `target` to the pool; false if it was not allocated to it.
    /// A claim of it for `target` still waiting is cancelled.
    pub fn free(&mut self, target: &str, ip: impl Into<IpAddr>) -> bool {
        let ip = ip.into();
        if !self.universe.contains(ip) {
            return false;
        }
        let a = addr_value(ip);
        self.in_use.remove(&(target.to_string(), a));
        self.pending.retain(|p| !(p.target == target && matches!(p.req, Request::Exact { ip: x, .. } if x == ip)));
        if self.allocs.get(&a).map(String::as_str) != Some(target) {
            return false;
        }
        self.unassign(a);
        self.progress();
        true
    }

    /// Frees every address of `target` and cancels its pending requests; returns the freed addresses.
    pub fn free_target(&mut self, target: &str) -> Vec<IpAddr> {
        let ips: Vec<Addr> = self.targets.get(target).map(|s| s.iter().copied().collect()).unwrap_or_default();
        for &ip in &ips {
            self.unassign(ip);
        }
        self.pending.retain(|p| p.target != target);
        self.failed.retain(|(p, _)| p.target != target);
        self.in_use.retain(|(t, _), _| t != target);
        self.progress();
        ips.into_iter().map(|a| self.universe.ip(a)).collect()
    }

    /// After a restore: frees the addresses of every target not in `live_targets`
    /// (containers that went away while the daemon was down); returns what was freed.
    pub fn release_missing<I, S>(&mut self, live_targets: I) -> Vec<(String, IpAddr)>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let live: BTreeSet<String> = live_targets.into_iter().map(|s| s.as_ref().to_string()).collect();
        let gone: Vec<String> = self.targets.keys().filter(|t| !live.contains(*t)).cloned().collect();
        let mut freed = Vec::new();
        for t in gone {
            for ip in self.free_target(&t) {
                freed.push((t.clone(), ip));
            }
        }
        freed
    }

    /// Takes over every range of `dead` (a peer that is gone for good); returns the
    /// number of addresses taken. Unsafe if `dead` is alive but partitioned (see
    /// the module docs). Refused for myself, before agreement, and for a peer in
    /// the last [`Ipam::peers_changed`] list.
    pub fn rmpeer(&mut self, dead: PeerName) -> Result<u128, IpamError> {
        if dead == self.me {
            return Err(IpamError::RemoveSelf);
        }
        if !self.ring.is_agreed() {
            return Err(IpamError::NotAgreed);
        }
        if self.live.as_ref().is_some_and(|l| l.contains(&dead)) {
            return Err(IpamError::PeerReachable(dead));
        }
        let changed = self.ring.reassign_all(dead, self.me, TAKEOVER_JUMP);
        let total: u128 = changed.iter().filter_map(|s| self.ring.get(*s)).fold(0u128, |t, e| t.saturating_add(e.size));
        for &s in &changed {
            self.recompute_free(s);
        }
        self.changed.extend(changed);
        self.space_asks.retain(|_, a| a.peer != dead);
        self.claim_asks.retain(|_, a| a.peer != dead);
        self.dirty = true;
        self.progress();
        Ok(total)
    }

    /// Shutdown handoff (`meshnet reset`): gives every range of this peer to the
    /// reachable peer owning the least space, forgets all allocations and requests,
    /// and queues the news (flush [`Ipam::poll_transmit`] before exiting). Returns
    /// the recipient, or `None` if this peer owned nothing. Errors with
    /// [`IpamError::NoLivePeer`] (nothing changed) if no peer is reachable.
    pub fn reset(&mut self) -> Result<Option<PeerName>, IpamError> {
        let owned: u128 = self.ring.owned_by(self.me).fold(0u128, |t, (_, e)| t.saturating_add(e.size));
        if owned > 0 {
            let live: Vec<PeerName> = self.live.iter().flatten().copied().filter(|p| *p != self.me).collect();
            if live.is_empty() {
                return Err(IpamError::NoLivePeer);
            }
            let mut space: BTreeMap<PeerName, u128> = live.iter().map(|p| (*p, 0)).collect();
            for (_, e) in self.ring.entries() {
                if let Some(s) = space.get_mut(&e.owner) {
                    *s = s.saturating_add(e.size);
                }
            }
            let to = space.iter().min_by_key(|(p, s)| (**s, **p)).map(|(p, _)| *p).expect("live is not empty");
            self.allocs.clear();
            self.targets.clear();
            let changed = self.ring.reassign_all(self.me, to, 1);
            let (entries, proofs) = self.signed_entries(changed.iter().copied());
            self.changed.extend(changed);
            let gossip = Gossip { full: false, ring_id: self.ring.id(), seeds: Vec::new(), entries, proofs, consensus: 0 };
            self.send_to(to, Body::Gossip(gossip));
            self.finish_reset();
            return Ok(Some(to));
        }
        self.allocs.clear();
        self.targets.clear();
        self.finish_reset();
        Ok(None)
    }

    fn finish_reset(&mut self) {
        self.pending.clear();
        self.failed.clear();
        self.in_use.clear();
        self.space_asks.clear();
        self.claim_asks.clear();
        self.dirty = true;
    }

    /// The peers currently reachable (from the topology). Space of others is
    /// reported unreachable and never asked for; a newly reachable peer makes this
    /// peer send its full state to its neighbours.
    pub fn peers_changed(&mut self, live: &[PeerName]) {
        let new: BTreeSet<PeerName> = live.iter().copied().filter(|p| *p != self.me).collect();
        let gained = match &self.live {
            None => true,
            Some(old) => new.iter().any(|p| !old.contains(p)),
        };
        if gained {
            self.full_due = true;
            // A new neighbour may be among them: send my binding again.
            self.sent_binding = false;
            if !new.is_empty() && !self.ring.is_agreed() {
                // Hear the new peers before proposing: with an agreed ring they make
                // me adopt it, with records they raise the quorum. Without this, a
                // `consensus=1` peer asked for an address right after connecting
                // would agree on a ring of its own before their answer arrives.
                self.hold_proposals_until = self.now + self.config.paxos_retry_ms;
                self.hold_rebase = true;
            }
        }
        self.space_asks.retain(|_, a| new.contains(&a.peer));
        self.claim_asks.retain(|_, a| new.contains(&a.peer));
        // Takeovers of a peer that was reachable when they came: ask their signers
        // again now that it is gone from here too.
        let gone: Vec<PeerName> = self.early_takeovers.keys().copied().filter(|p| !new.contains(p)).collect();
        self.live = Some(new);
        for owner in gone {
            for by in self.early_takeovers.remove(&owner).unwrap_or_default() {
                if self.is_live(by) {
                    self.last_sync_req.remove(&by);
                    self.request_sync(by);
                }
            }
        }
        self.progress();
    }

    /// A connection to neighbour `peer` was established: it gets my full state
    /// (with the bindings of its signers). A peer restarted faster than the
    /// topology noticed it was gone is no new peer to [`Ipam::peers_changed`],
    /// yet it missed everything that changed while it was down (a takeover of
    /// its ranges among them).
    pub fn neighbour_connected(&mut self, peer: PeerName) {
        if peer == self.me {
            return;
        }
        if self.ring.is_agreed() {
            self.last_sync.remove(&peer);
            self.send_sync(peer);
        } else {
            self.full_due = true;
            self.sent_binding = false;
        }
    }

    /// What `meshnet status ipam` shows.
    pub fn status(&self) -> IpamStatus {
        let mut owners: BTreeMap<PeerName, OwnerStatus> = BTreeMap::new();
        for (s, e) in self.ring.entries() {
            let o = owners.entry(e.owner).or_insert_with(|| OwnerStatus {
                peer: e.owner,
                ranges: Vec::new(),
                size: 0,
                free: 0,
                reachable: self.is_live(e.owner),
            });
            let last = s + e.size - 1;
            o.ranges.push((self.universe.ip(s), self.universe.ip(last)));
            o.size = o.size.saturating_add(e.size);
            // Mine exactly (my published count may lag: see `publish_free`).
            o.free = o.free.saturating_add(if e.owner == self.me { free_in(&self.universe, s, e.size, &self.allocs) } else { e.free });
        }
        let unreachable_space = owners.values().filter(|o| !o.reachable).fold(0u128, |t, o| t.saturating_add(o.size));
        let state = if self.ring.is_agreed() {
            RingState::Agreed { seeds: self.ring.seeds().to_vec() }
        } else if self.paxos.is_participant() {
            RingState::AwaitingConsensus { known: self.paxos.known(), quorum: self.paxos.needed() }
        } else {
            RingState::AwaitingRing
        };
        IpamStatus {
            me: self.me,
            universe: self.universe,
            state,
            owners: owners.into_values().collect(),
            allocated: self.allocs.len(),
            pending: self.pending.len(),
            unreachable_space,
            ring_entries: self.ring.len(),
            drops: self.drops,
            conflicts: self.conflicts().collect(),
        }
    }

    // ------------------------------------------------------------ I/O side

    /// Handles one `ControlMsg::Ipam` payload received from neighbour `from`.
    /// On error nothing was applied; see the module docs for what to do.
    ///
    /// `keys` is the daemon's key book: the bindings a message carries are
    /// admitted into it (pinned if new), and every signature is checked against
    /// the key pinned for its signer. A message not signed by its `src`, and every
    /// record inside not signed by the peer it belongs to, is dropped and counted
    /// in [`Ipam::drops`] (returning `Ok`): only malformed messages and genuine
    /// conflicts return errors.
    pub fn handle_message(&mut self, from: PeerName, bytes: &[u8], now_ms: u64, keys: &mut KeyBook) -> Result<(), IpamError> {
        // Errors name the original sender; the daemon acts on `from`'s connection.
        // `from` is asked for a sync when its gossip relies on bindings or values
        // that did not reach me (they go to each neighbour once).
        self.tick(now_ms);
        self.offered.clear();
        self.ensure_own_binding(keys);
        // A ring only reads its own family's version (IPv4 and IPv6 rings are
        // separate instances that never exchange messages).
        let decoded = match bytes.first() {
            Some(&v) if v != wire::wire_version(&self.universe) => Err(IpamError::UnsupportedVersion(v)),
            _ => wire::decode_packet(bytes).and_then(|p| wire::decode_envelope(&p.signed).map(|env| (p, env))),
        };
        let (packet, env) = match decoded {
            Ok(x) => x,
            Err(e) => {
                match e {
                    IpamError::UnsupportedVersion(_) => self.drops.version_mismatches += 1,
                    _ => self.drops.malformed_messages += 1,
                }
                return Err(e);
            }
        };
        // Admit only the bindings of peers whose signatures this message holds.
        let signers = signers_of(&env);
        for b in packet.bindings.iter().filter(|b| signers.contains(&b.name)) {
            self.admit(b, keys);
        }
        match keys.verify_from(env.src, DOMAIN_ENVELOPE, &packet.signed, &packet.sig) {
            Ok(()) => {}
            Err(TrustError::Unknown(_)) if env.dst == PeerName::BROADCAST => {
                // Gossip carries the sender's binding once per neighbour: it was lost.
                self.drops.missing_bindings += 1;
                self.offered.clear();
                self.request_sync(from);
                return Ok(());
            }
            Err(TrustError::Unknown(_)) => {
                self.drops.unknown_senders += 1;
                self.offered.clear();
                return Ok(());
            }
            Err(_) => {
                self.drops.forged_messages += 1;
                self.offered.clear();
                return Ok(());
            }
        }
        if env.universe != self.universe {
            return Err(IpamError::RangeMismatch { peer: env.src, ours: self.universe, theirs: env.universe });
        }
        if env.dst != PeerName::BROADCAST && env.dst != self.me {
            if packet.hops > 0 {
                let dst = env.dst;
                let relayed = Packet { hops: packet.hops - 1, ..packet };
                self.transmits.push_back((Dest::Peer(dst), wire::encode_packet(&relayed)));
            }
            return Ok(());
        }
        if env.src == self.me {
            return Ok(());
        }
        let src = env.src;
        let result = match env.body {
            Body::Gossip(g) => self.on_gossip(src, g, keys, Some(from)),
            Body::SpaceRequest { id, subnet } => {
                self.on_space_request(src, id, subnet);
                Ok(())
            }
            Body::ClaimRequest { id, ip } => {
                self.on_claim_request(src, id, ip);
                Ok(())
            }
            Body::Reply { id, outcome, gossip } => self.on_reply(src, id, outcome, gossip, keys),
            Body::SyncRequest => {
                self.send_sync(src);
                Ok(())
            }
            Body::Digest { ring_id, digest } => {
                self.on_digest(src, ring_id, digest);
                Ok(())
            }
            Body::Prepare { ballot, attempt, initial } => {
                self.on_prepare(src, from, ballot, attempt, initial, bytes);
                Ok(())
            }
            Body::Promise { ballot, initial, accepted, value, value_sig } => {
                self.on_promise(src, ballot, initial, accepted, value, value_sig, keys);
                Ok(())
            }
            Body::Accept { ballot, value, value_sig } => {
                self.on_accept(src, ballot, value, value_sig, keys);
                Ok(())
            }
            Body::Accepted { ballot, sig } => {
                self.on_accepted(src, ballot, sig, keys);
                Ok(())
            }
            Body::Decided { .. } => {
                self.on_decided(src);
                Ok(())
            }
            Body::WantDecision { holds } => {
                self.send_decision(src, holds);
                Ok(())
            }
            Body::Decision(d) => self.on_decision(src, d, keys),
        };
        self.offered.clear();
        result?;
        self.progress();
        Ok(())
    }

    /// The next message to send (see [`Dest`]); call until `None`.
    pub fn poll_transmit(&mut self) -> Option<(Dest, Vec<u8>)> {
        if let Some(t) = self.transmits.pop_front() {
            return Some(t);
        }
        if std::mem::take(&mut self.announce_due) {
            if let Some(ballot) = self.decision.as_ref().map(|d| d.ballot) {
                return Some((Dest::Neighbours, self.encode_broadcast(Body::Decided { ballot })));
            }
        }
        if self.digest_due && !self.full_due && self.ring.is_agreed() {
            // The exact free counts of my entries first (as in full state): a
            // drifted one goes out as a delta before the digest that covers it.
            let mine: Vec<Addr> = self.ring.owned_by(self.me).map(|(s, _)| s).collect();
            for s in mine {
                self.recompute_free(s);
            }
            if self.changed.is_empty() {
                self.digest_due = false;
                let ring_id = self.ring.id();
                let digest = wire::ring_digest(ring_id, self.ring.entries());
                return Some((Dest::Neighbours, self.encode_broadcast(Body::Digest { ring_id, digest })));
            }
        }
        let mut gossips = if self.full_due {
            self.full_due = false;
            self.digest_due = false;
            self.changed.clear();
            self.full_gossip()
        } else if self.ring.is_agreed() {
            if self.changed.is_empty() {
                return None;
            }
            let changed = std::mem::take(&mut self.changed);
            let (entries, proofs) = self.signed_entries(changed);
            if entries.is_empty() {
                return None;
            }
            vec![Gossip { full: false, ring_id: self.ring.id(), seeds: Vec::new(), entries, proofs, consensus: 0 }]
        } else {
            return None;
        };
        let rest = gossips.split_off(1.min(gossips.len()));
        let first = gossips.pop()?;
        for g in rest {
            let bytes = self.encode_gossip(g);
            self.transmits.push_back((Dest::Neighbours, bytes));
        }
        Some((Dest::Neighbours, self.encode_gossip(first)))
    }

    /// The next event for the daemon.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`Ipam::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t = self.next_full_ms;
        if !self.ring.is_agreed() {
            t = t.min(self.next_paxos_full_ms);
            if self.want_ring && self.hold_proposals_until > self.now {
                t = t.min(self.hold_proposals_until);
            }
            if let Some(p) = self.paxos.poll_timeout() {
                t = t.min(p);
            }
            if let Some((_, until)) = self.want_decision {
                t = t.min(until);
            }
            if self.calls_election() {
                t = t.min(self.next_election_call);
            }
        }
        for a in self.space_asks.values().chain(self.claim_asks.values()) {
            t = t.min(a.deadline);
        }
        if let Some(r) = self.retry_at {
            t = t.min(r);
        }
        for u in self.in_use.values().filter(|u| u.conflict.is_some()) {
            t = t.min(u.retry_at);
        }
        Some(t)
    }

    /// Timers: periodic full gossip, paxos retries, unanswered asks, retries.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.tick(now_ms);
        let now = self.now;
        if now >= self.next_full_ms {
            // Agreed: a digest, and full state only where it differs. Not yet
            // agreed: the records themselves (they are few and all change).
            if self.ring.is_agreed() {
                self.digest_due = true;
            } else {
                self.full_due = true;
            }
            let iv = self.config.full_gossip_interval_ms.max(1);
            self.next_full_ms = now + iv - self.rng.below(iv / 4 + 1);
        }
        if !self.ring.is_agreed() && now >= self.next_paxos_full_ms {
            // While I want a ring: my (small) full state, which an agreed
            // neighbour answers with its ring (Paxos repairs its own losses).
            self.full_due |= self.want_ring;
            let iv = self.config.paxos_retry_ms.max(1);
            self.next_paxos_full_ms = now + iv + self.rng.below(iv);
        }
        let timeout = self.config.request_timeout_ms;
        let expired: Vec<(Cidr, PeerName)> =
            self.space_asks.iter().filter(|(_, a)| a.deadline <= now).map(|(s, a)| (*s, a.peer)).collect();
        for (subnet, peer) in expired {
            self.space_asks.remove(&subnet);
            self.shunned.insert((subnet, peer), now + SHUN_TIMEOUTS * timeout);
        }
        self.claim_asks.retain(|_, a| a.deadline > now);
        self.shunned.retain(|_, until| *until > now);
        if self.last_sync.len() > 1024 {
            self.last_sync.retain(|_, t| *t + SYNC_INTERVAL_MS > now);
        }
        if self.last_sync_req.len() > 1024 {
            self.last_sync_req.retain(|_, t| *t + SYNC_INTERVAL_MS > now);
        }
        if self.retry_at.is_some_and(|r| r <= now) {
            self.retry_at = None;
        }
        // Claim addresses in conflict again: the other holder may have let go.
        let mut again = Vec::new();
        for ((target, a), u) in self.in_use.iter_mut() {
            if u.conflict.is_some() && u.retry_at <= now {
                u.retry_at = now + CONFLICT_RETRY_MS;
                again.push(PendingReq { target: target.clone(), req: Request::Exact { ip: self.universe.ip(*a), prefix: u.prefix } });
            }
        }
        for p in again {
            if !self.pending.contains(&p) {
                self.pending.push(p);
            }
        }
        if let Some((asked, until)) = self.want_decision {
            if until <= now {
                // No answer: ask the next neighbour that announced one (in turn).
                self.want_decision = None;
                let next = self.announcers.range(asked..).nth(1).or_else(|| self.announcers.iter().next()).copied();
                if let Some(next) = next {
                    self.ask_decision(next);
                }
            }
        }
        self.progress();
    }

    // -------------------------------------------------------------- inside

    fn tick(&mut self, now_ms: u64) {
        self.now = self.now.max(now_ms);
        if std::mem::take(&mut self.hold_rebase) {
            self.hold_proposals_until = self.hold_proposals_until.max(self.now + self.config.paxos_retry_ms);
        }
    }

    fn is_live(&self, p: PeerName) -> bool {
        p == self.me || self.live.as_ref().is_none_or(|l| l.contains(&p))
    }

    fn check_request(&self, req: &Request) -> Result<(), IpamError> {
        let u = self.universe;
        match req {
            Request::Any(subnet) => {
                if !u.contains_net(subnet) {
                    return Err(IpamError::SubnetOutsideRange { subnet: *subnet, universe: u });
                }
                if subnet.prefix() > subnet.max_subnet_prefix() {
                    return Err(IpamError::SubnetTooSmall(*subnet));
                }
            }
            Request::Exact { ip, prefix } => {
                if *prefix > space::width(ip.is_ipv6()) {
                    return Err(IpamError::BadPrefix(*prefix));
                }
                if !u.contains(*ip) {
                    return Err(IpamError::AddressOutsideRange { ip: *ip, universe: u });
                }
                let a = addr_value(*ip);
                let net = Cidr::containing(*ip, *prefix).map_err(|_| IpamError::BadPrefix(*prefix))?;
                if net.is_reserved(a) {
                    return Err(IpamError::ReservedAddress { ip: *ip, net });
                }
                if u.is_reserved(a) {
                    return Err(IpamError::ReservedAddress { ip: *ip, net: u });
                }
            }
        }
        Ok(())
    }

    fn waiting_for(&self, req: &Request) -> Waiting {
        if !self.ring.is_agreed() {
            return if self.paxos.is_participant() {
                Waiting::Consensus { known: self.paxos.known(), quorum: self.paxos.needed() }
            } else {
                Waiting::Ring
            };
        }
        match req {
            Request::Any(subnet) => match self.space_asks.get(subnet) {
                Some(a) => Waiting::Donation { donor: a.peer },
                None => Waiting::NoFreeSpace { subnet: *subnet },
            },
            Request::Exact { ip, .. } => match self.ring.covering(addr_value(*ip)) {
                Some((_, e)) => Waiting::Owner { owner: e.owner, reachable: self.is_live(e.owner) },
                None => Waiting::Ring,
            },
        }
    }

    fn address_in(&self, target: &str, subnet: &Cidr) -> Option<Addr> {
        self.targets.get(target)?.iter().copied().find(|ip| subnet.contains_u(*ip))
    }

    fn lowest_free(&self, subnet: &Cidr) -> Option<Addr> {
        let (lo, hi) = subnet.usable();
        // Not an address a target here uses while its claim waits or failed
        // (an address attached before the ring was agreed, claimed once it is):
        // it would be on two targets.
        let noted: BTreeSet<Addr> = self.in_use.keys().map(|(_, a)| *a).collect();
        self.ring.owned_by(self.me).find_map(|(s, e)| {
            let (mut l, h) = clip(s, s + e.size, lo, hi)?;
            loop {
                let a = space::lowest_free(l, h, &self.allocs)?;
                if !noted.contains(&a) {
                    return Some(a);
                }
                l = a + 1;
            }
        })
    }

    fn try_complete(&mut self, p: &PendingReq) -> Step {
        match &p.req {
            Request::Any(subnet) => {
                let ip = match self.address_in(&p.target, subnet) {
                    Some(ip) => ip,
                    None => match self.lowest_free(subnet) {
                        Some(ip) => {
                            self.assign(&p.target, ip);
                            ip
                        }
                        None => return Step::NeedSpace(*subnet),
                    },
                };
                Step::Done(self.universe.ip(ip), subnet.prefix())
            }
            Request::Exact { ip, prefix } => {
                let a = addr_value(*ip);
                match self.allocs.get(&a) {
                    Some(t) if *t == p.target => return Step::Done(*ip, *prefix),
                    Some(t) => return Step::Failed(IpamError::AddressInUse { ip: *ip, holder: Holder::Target(t.clone()) }),
                    None => {}
                }
                if self.ring.covering_owned(self.me, a).is_some() {
                    self.assign(&p.target, a);
                    Step::Done(*ip, *prefix)
                } else {
                    Step::NeedClaim(a)
                }
            }
        }
    }

    fn assign(&mut self, target: &str, ip: Addr) {
        self.allocs.insert(ip, target.to_string());
        self.targets.entry(target.to_string()).or_default().insert(ip);
        if let Some((s, _)) = self.ring.covering_owned(self.me, ip) {
            self.publish_free(s, false);
        }
        self.dirty = true;
    }

    fn unassign(&mut self, ip: Addr) {
        if let Some(t) = self.allocs.remove(&ip) {
            if let Some(set) = self.targets.get_mut(&t) {
                set.remove(&ip);
                if set.is_empty() {
                    self.targets.remove(&t);
                }
            }
            if let Some((s, _)) = self.ring.covering_owned(self.me, ip) {
                self.publish_free(s, false);
            }
            self.dirty = true;
        }
    }

    /// Brings the free count of my entry at `start` up to date (bumping its
    /// version if it changed), whatever the change.
    fn recompute_free(&mut self, start: Addr) {
        self.publish_free(start, true);
    }

    /// Publishes the free count of my entry at `start` if it changed (`force`),
    /// or only if the change is news worth flooding ([`free_is_news`]): an
    /// allocation or a free changes one entry of mine, and every peer hears of
    /// each new version, so small changes wait for the next full gossip. The
    /// count only guides other peers' choice of donors; what this peer hands
    /// out follows its allocations, never the published count.
    fn publish_free(&mut self, start: Addr, force: bool) {
        let Some(e) = self.ring.get(start) else { return };
        if e.owner != self.me {
            return;
        }
        let f = free_in(&self.universe, start, e.size, &self.allocs);
        if !force && !free_is_news(e.free, f) {
            return;
        }
        if self.ring.set_free(self.me, start, f) {
            self.changed.insert(start);
            self.dirty = true;
        }
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    fn send_to(&mut self, dst: PeerName, body: Body) {
        let bytes = self.encode(dst, MAX_HOPS, body);
        self.transmits.push_back((Dest::Peer(dst), bytes));
    }

    /// Signs a message from me, with the bindings of every signer inside.
    fn encode(&self, dst: PeerName, hops: u8, body: Body) -> Vec<u8> {
        let env = Envelope { universe: self.universe, src: self.me, dst, body };
        let bindings = signers_of(&env).into_iter().filter_map(|n| self.binding_of(n)).collect();
        wire::encode(&env, hops, bindings, &self.signer)
    }

    /// Signs gossip for the neighbours. Of the bindings, only mine goes, once:
    /// the daemon's key book holds those of the peers it reaches (topology
    /// gossip pins them), and a neighbour that lacks one asks for my full
    /// state, which carries the bindings of every signer inside.
    fn encode_gossip(&mut self, g: Gossip) -> Vec<u8> {
        self.encode_broadcast(Body::Gossip(g))
    }

    /// Signs `body` for the neighbours, with my binding the first time only.
    fn encode_broadcast(&mut self, body: Body) -> Vec<u8> {
        let env = Envelope { universe: self.universe, src: self.me, dst: PeerName::BROADCAST, body };
        let bindings = if std::mem::replace(&mut self.sent_binding, true) { Vec::new() } else { vec![self.binding.clone()] };
        wire::encode(&env, 0, bindings, &self.signer)
    }

    fn binding_of(&self, n: PeerName) -> Option<Binding> {
        if n == self.me {
            Some(self.binding.clone())
        } else {
            self.bindings.get(&n).cloned()
        }
    }

    /// My full state, in as many messages as [`FULL_GOSSIP_CHUNK`] requires, with
    /// the exact free counts of my entries (published now if they drifted). This
    /// can run in `poll_transmit`, after the daemon saved: a new version written
    /// here is a function of saved state only (the entry and the allocations),
    /// so after a crash `restore` writes the same entry again (same version, same
    /// deterministic signature), never a different one under that version.
    fn full_gossip(&mut self) -> Vec<Gossip> {
        if self.ring.is_agreed() {
            let mine: Vec<Addr> = self.ring.owned_by(self.me).map(|(s, _)| s).collect();
            for s in mine {
                self.recompute_free(s);
            }
            let (ring_id, seeds) = (self.ring.id(), self.ring.seeds().to_vec());
            let starts: Vec<Addr> = self.ring.entries().map(|(s, _)| s).collect();
            let (entries, proofs) = self.signed_entries(starts);
            if entries.is_empty() {
                return vec![Gossip { full: true, ring_id, seeds, entries, proofs, consensus: 0 }];
            }
            entries
                .chunks(FULL_GOSSIP_CHUNK)
                .zip(proofs.chunks(FULL_GOSSIP_CHUNK))
                .map(|(e, p)| Gossip { full: true, ring_id, seeds: seeds.clone(), entries: e.to_vec(), proofs: p.to_vec(), consensus: 0 })
                .collect()
        } else {
            // Sent even when empty: an agreed neighbour answers with its full ring.
            let consensus = if self.paxos.is_participant() { self.paxos.initial() } else { 0 };
            vec![Gossip { full: true, ring_id: 0, seeds: Vec::new(), entries: Vec::new(), proofs: Vec::new(), consensus }]
        }
    }

    /// Sends my full state to `dst`, at most once per [`SYNC_INTERVAL_MS`].
    fn send_sync(&mut self, dst: PeerName) {
        if self.last_sync.get(&dst).is_some_and(|t| t + SYNC_INTERVAL_MS > self.now) {
            return;
        }
        self.last_sync.insert(dst, self.now);
        for g in self.full_gossip() {
            self.send_to(dst, Body::Gossip(g));
        }
    }

    fn reply(&mut self, dst: PeerName, id: u64, outcome: Outcome, entries: Vec<(Addr, Entry)>) {
        let (entries, proofs) = self.signed_entries(entries.into_iter().map(|(s, _)| s));
        let ring_id = if entries.is_empty() { 0 } else { self.ring.id() };
        let gossip = Gossip { full: false, ring_id, seeds: Vec::new(), entries, proofs, consensus: 0 };
        self.send_to(dst, Body::Reply { id, outcome, gossip });
    }

    // ------------------------------------------------------------ signatures

    /// Signs every entry this peer edited since it last signed.
    fn sign_pending(&mut self) {
        let id = self.ring.id();
        for s in self.ring.take_unsigned() {
            if let Some(e) = self.ring.get(s).copied().filter(|e| e.version > 0) {
                let sig = self.signer.sign(DOMAIN_ENTRY, &wire::entry_message(id, s, &e));
                self.ring.set_proof(s, Proof { by: self.me, sig });
            }
        }
    }

    /// The entries at `starts` that can be sent: signed, and not genesis entries
    /// (which follow from the seeds). Entries of others held without a proof (from
    /// a version-1 snapshot) are left out.
    fn signed_entries(&mut self, starts: impl IntoIterator<Item = Addr>) -> (Vec<(Addr, Entry)>, Vec<Proof>) {
        self.sign_pending();
        let mut entries = Vec::new();
        let mut proofs = Vec::new();
        for s in starts {
            if let (Some(e), Some(p)) = (self.ring.get(s), self.ring.proof(s)) {
                if e.version > 0 {
                    entries.push((s, *e));
                    proofs.push(*p);
                }
            }
        }
        (entries, proofs)
    }

    /// Makes sure my own binding is in the key book (my records come back to me).
    fn ensure_own_binding(&mut self, keys: &mut KeyBook) {
        if keys.get(self.me) == Some(&self.binding.keys) {
            return;
        }
        match keys.admit(&self.binding) {
            Ok(_) => {}
            Err(TrustError::Conflict { .. }) => self.drops.conflicting_bindings += 1,
            Err(_) => self.drops.bad_bindings += 1,
        }
    }

    /// Admits a binding a message carried (pinned if its name is new).
    fn admit(&mut self, b: &Binding, keys: &mut KeyBook) {
        if b.name == self.me {
            // My name is bound to my keys only; another binding for it is an impostor's.
            if *b != self.binding {
                self.drops.conflicting_bindings += 1;
            }
            return;
        }
        if self.bindings.get(&b.name) == Some(b) && keys.get(b.name) == Some(&b.keys) {
            self.offered.insert(b.name, b.clone());
            return;
        }
        match keys.admit(b) {
            Ok(_) => {
                self.offered.insert(b.name, b.clone());
            }
            Err(TrustError::Conflict { .. }) => self.drops.conflicting_bindings += 1,
            Err(_) => self.drops.bad_bindings += 1,
        }
    }

    /// Keeps the binding of `signer` (offered by the message being handled), whose
    /// record is now held here and may be relayed.
    fn keep_binding(&mut self, signer: PeerName) {
        if signer == self.me || self.bindings.contains_key(&signer) {
            return;
        }
        if let Some(b) = self.offered.get(&signer) {
            if self.bindings.len() < MAX_SNAPSHOT_BINDINGS {
                self.bindings.insert(signer, b.clone());
            }
        }
    }

    /// Keeps the entries of `g` whose signature is their writer's and whose writer
    /// may write them, given my view `base`. Returns them,
    /// their proofs, proofs of entries I hold unsigned with the same content, and
    /// the owners to ask for their full state (entries I could not verify yet).
    ///
    /// Takeovers dropped because their old owner is still reachable here are
    /// added to `early` (one per old owner and signer). Err if another peer claims one of
    /// my ranges ([`IpamError::RangeTakenOver`]).
    #[allow(clippy::type_complexity)]
    fn verify_entries(
        &self,
        src: PeerName,
        base: &Ring,
        g: &Gossip,
        keys: &KeyBook,
        drops: &mut DropStats,
        early: &mut Vec<EarlyTakeover>,
    ) -> Result<(Vec<(Addr, Entry)>, BTreeMap<Addr, Proof>, Vec<(Addr, Proof)>, BTreeSet<PeerName>), IpamError> {
        let mut overlay: BTreeMap<Addr, Entry> = BTreeMap::new();
        let mut out = Vec::new();
        let mut proofs = BTreeMap::new();
        let mut fills = Vec::new();
        let mut ask = BTreeSet::new();
        for ((s, e), proof) in g.entries.iter().zip(&g.proofs) {
            let (s, e) = (*s, *e);
            // Starts are unique in a message: an existing start is judged by my view.
            let cur = base.get(s).copied();
            let known = cur.is_some_and(|c| c.version > e.version || c == e);
            if known && !(cur == Some(e) && base.proof(s).is_none()) {
                continue; // nothing new: no need to check it
            }
            match keys.verify_from(proof.by, DOMAIN_ENTRY, &wire::entry_message(g.ring_id, s, &e), &proof.sig) {
                Ok(()) => {}
                Err(TrustError::Unknown(_)) => {
                    drops.unknown_entry_signers += 1;
                    continue;
                }
                Err(_) => {
                    drops.forged_entries += 1;
                    continue;
                }
            }
            // Who may write it: the owner of its start in my view (a single writer,
            // which may give it away); for a new start, the owner of the range it
            // splits, in my view or as changed by the earlier entries of this message
            // (a range given away and split again); or, if that owner is unreachable,
            // a takeover by `rmpeer` signed by the new owner. The owner may also
            // vouch for the current state of its range by sending it itself.
            let mut candidates: Vec<(PeerName, bool)> = Vec::new();
            let mut takeover = false;
            match cur {
                Some(c)
                    if c.owner == self.me
                        && e.owner == proof.by
                        && e.owner != self.me
                        && e.version >= takeover_base(c.version).saturating_add(TAKEOVER_JUMP / 2) =>
                {
                    // Another peer signed a takeover of a range of mine (its version
                    // jumped as only `rmpeer` makes it: my own edits add one each):
                    // `rmpeer` of me while I was down, or of the peer I took it
                    // from, on two routers. Both of us would hand out the same
                    // addresses: refuse it, loudly. (A claim without the jump is
                    // no takeover, only a forgery: dropped and counted below.)
                    return Err(IpamError::RangeTakenOver {
                        peer: src,
                        by: proof.by,
                        start: self.universe.ip(s),
                        theirs: e.version,
                        ours: c.version,
                    });
                }
                Some(c) => {
                    candidates.push((c.owner, e.owner != c.owner || e.size <= c.size));
                    let shaped = proof.by == e.owner && e.version >= c.version.saturating_add(TAKEOVER_JUMP);
                    takeover = shaped && c.owner != self.me && !self.is_live(c.owner);
                    if shaped
                        && c.owner != self.me
                        && !takeover
                        && early.len() < MAX_EARLY_TAKEOVERS
                        && !early.iter().any(|t| t.owner == c.owner && t.by == proof.by)
                    {
                        early.push(EarlyTakeover { owner: c.owner, by: proof.by, start: s, entry: e, proof: *proof });
                    }
                }
                None => {
                    let fit = |(cs, c): (Addr, Entry)| (c.owner, s + e.size <= cs + c.size);
                    candidates.extend(base.covering(s).map(|(cs, c)| fit((cs, *c))));
                    candidates.extend(base.covering_with(&overlay, s).map(fit));
                    if candidates.is_empty() {
                        // A gap in my view: the range before it shrank and the pieces
                        // cut off are unknown here (only ever in my view of other
                        // peers' space: my own ranges are exact). One of the last
                        // owners or writers of the entries before it cut it off.
                        let mut b = base.entries_before(s).peekable();
                        let mut o = overlay.range(..s).rev().peekable();
                        for _ in 0..GAP_LOOKBACK {
                            let (owner, writer) = match (b.peek(), o.peek()) {
                                (Some(&(bs, _)), Some(&(&os, _))) if bs > os => {
                                    let (bs, be) = b.next().expect("peeked");
                                    (be.owner, base.proof(bs).map(|p| p.by))
                                }
                                (Some(&(bs, _)), Some(&(&os, _))) if bs == os => {
                                    b.next();
                                    let (os, oe) = o.next().expect("peeked");
                                    (oe.owner, proofs.get(os).map(|p: &Proof| p.by))
                                }
                                (_, Some(_)) => {
                                    let (os, oe) = o.next().expect("peeked");
                                    (oe.owner, proofs.get(os).map(|p: &Proof| p.by))
                                }
                                (Some(_), None) => {
                                    let (bs, be) = b.next().expect("peeked");
                                    (be.owner, base.proof(bs).map(|p| p.by))
                                }
                                (None, None) => break,
                            };
                            candidates.push((owner, owner != self.me));
                            candidates.extend(writer.filter(|w| *w != self.me).map(|w| (w, true)));
                        }
                    }
                }
            }
            let allowed = takeover
                || candidates.iter().any(|&(owner, fits)| fits && (proof.by == owner || (src == owner && owner != self.me)));
            if !allowed {
                let others: Vec<PeerName> = candidates.iter().filter(|(o, fits)| *fits && *o != self.me).map(|(o, _)| *o).collect();
                if others.is_empty() {
                    // My own range (exact here), or an entry that does not fit.
                    drops.forged_entries += 1;
                } else {
                    // Another peer's range, written by someone else: a forgery, or a
                    // transfer I missed. Ask the owner I know for its state.
                    drops.unverifiable_entries += 1;
                    ask.extend(others.into_iter().filter(|o| self.is_live(*o)));
                }
                continue;
            }
            if known {
                fills.push((s, *proof));
                continue;
            }
            overlay.insert(s, e);
            proofs.insert(s, *proof);
            out.push((s, e));
        }
        Ok((out, proofs, fills, ask))
    }

    /// Refuses a merge that would leave one of my allocations outside my ranges.
    fn check_ownership(&self, src: PeerName, changes: &[(Addr, super::ring::Entry)]) -> Result<(), IpamError> {
        if self.allocs.is_empty() {
            return Ok(());
        }
        let touches_mine = changes.iter().any(|(s, e)| {
            self.ring.get(*s).is_some_and(|m| m.owner == self.me && (e.owner != self.me || e.size < m.size))
        });
        if !touches_mine {
            return Ok(());
        }
        let mut mine: BTreeMap<Addr, Addr> = self.ring.owned_by(self.me).map(|(s, e)| (s, e.size)).collect();
        for (s, e) in changes {
            if e.owner == self.me {
                mine.insert(*s, e.size);
            } else {
                mine.remove(s);
            }
        }
        for (&ip, target) in &self.allocs {
            let covered = mine.range(..=ip).next_back().is_some_and(|(&s, &sz)| (ip) < s + sz);
            if !covered {
                let owner = changes
                    .iter()
                    .filter(|(s, e)| *s <= ip && (ip) < *s + e.size)
                    .map(|(_, e)| e.owner)
                    .next_back()
                    .unwrap_or(PeerName::BROADCAST);
                return Err(IpamError::OwnershipConflict { peer: src, ip: self.universe.ip(ip), target: target.clone(), owner });
            }
        }
        Ok(())
    }

    /// Gossip from `src`, sent to its neighbours (`neighbour`: the one it came
    /// from) or in a reply.
    fn on_gossip(&mut self, src: PeerName, mut g: Gossip, keys: &KeyBook, neighbour: Option<PeerName>) -> Result<(), IpamError> {
        if g.consensus > 0 && neighbour.is_some() && !self.ring.is_agreed() {
            // A neighbour that takes part: it counts towards the N needed.
            self.paxos.heard_participant(src, g.consensus);
        }
        let agreed_before = self.ring.is_agreed();
        // Only records signed by the peers they belong to are looked at.
        let mut drops = self.drops;
        let before = drops;
        let mut fills = Vec::new();
        let mut ask = BTreeSet::new();
        let mut proofs = BTreeMap::new();
        if g.ring_id != 0 && !g.entries.is_empty() {
            let adopt;
            let base = if !agreed_before && !g.seeds.is_empty() {
                adopt = Ring::genesis(self.universe, &g.seeds);
                Some(&adopt)
            } else if agreed_before && g.ring_id == self.ring.id() {
                Some(&self.ring)
            } else {
                None // another ring: refused or synced below, entries unused
            };
            if let Some(base) = base {
                let mut early = Vec::new();
                let (entries, p, f, a) = self.verify_entries(src, base, &g, keys, &mut drops, &mut early)?;
                for t in early {
                    let signers = self.early_takeovers.entry(t.owner).or_default();
                    if signers.len() < MAX_EARLY_TAKEOVERS {
                        signers.insert(t.by);
                    }
                    // The old owner is alive here: `rmpeer` raced its return, or it
                    // is cut off from the taker only. It refuses a takeover of its
                    // range (a listed conflict) where I can only drop it: show it.
                    if t.owner != src {
                        self.keep_binding(t.by);
                        let gossip = Gossip {
                            full: false,
                            ring_id: g.ring_id,
                            seeds: Vec::new(),
                            entries: vec![(t.start, t.entry)],
                            proofs: vec![t.proof],
                            consensus: 0,
                        };
                        self.send_to(t.owner, Body::Gossip(gossip));
                    }
                }
                self.early_takeovers.retain(|_, v| !v.is_empty());
                while self.early_takeovers.len() > MAX_EARLY_TAKEOVERS {
                    self.early_takeovers.pop_first();
                }
                g.entries = entries;
                proofs = p;
                fills = f;
                ask = a;
            }
        }
        self.drops = drops;
        // Records whose signer's binding did not reach me: the neighbour that
        // sent them holds those and sends them with its full state.
        let missing = drops.missing_bindings > before.missing_bindings
            || drops.unknown_entry_signers > before.unknown_entry_signers;
        // The ring first: an agreed ring (seeds) supersedes consensus. An unagreed
        // peer adopts it whatever its own `N` or records; only an agreed ring with
        // other seeds is a conflict.
        let plan = if g.ring_id == 0 {
            self.ring.plan_merge(src, &[], &[])?
        } else if !g.seeds.is_empty() {
            self.ring.plan_merge(src, &g.seeds, &g.entries)?
        } else if agreed_before && g.ring_id == self.ring.id() {
            self.ring.plan_merge_same(src, &g.entries)?
        } else {
            // A delta of a ring I do not know (not agreed yet, or another ring): get the
            // full state, whose seeds let me adopt it or name the conflict.
            self.request_sync(src);
            self.ring.plan_merge(src, &[], &[])?
        };
        self.check_ownership(src, plan.changes())?;
        let writers: BTreeSet<PeerName> = proofs.values().chain(fills.iter().map(|(_, p)| p)).map(|p| p.by).collect();
        let plan = plan.with_proofs(proofs);
        // Everything checked: apply.
        let adopted = plan.adopts();
        // Only my own state must be persisted; other peers' entries can be learned again.
        let me = self.me;
        if adopted || plan.changes().iter().any(|(s, e)| e.owner == me || self.ring.get(*s).is_some_and(|m| m.owner == me)) {
            self.dirty = true;
        }
        let changed = self.ring.apply(plan);
        for &s in &changed {
            // A newer version of my own entry (my state from before a restart): re-assert the truth.
            self.recompute_free(s);
        }
        self.changed.extend(changed);
        for (s, proof) in fills {
            if self.ring.proof(s).is_none() {
                self.ring.set_proof(s, proof);
                self.dirty |= self.ring.get(s).is_some_and(|e| e.owner == self.me);
            }
        }
        for w in writers {
            self.keep_binding(w);
        }
        for owner in ask {
            self.request_sync(owner);
        }
        if let Some(n) = neighbour.filter(|_| missing) {
            self.request_sync(n);
        }
        if adopted {
            self.on_agreed();
            if !g.full {
                self.request_sync(src);
            }
        }
        if self.ring.is_agreed() && g.ring_id == 0 && (g.full || self.now >= self.agreed_at + AGREED_GRACE_MS) {
            // The sender has no ring yet and is not about to learn it: give it mine.
            self.send_sync(src);
        }
        Ok(())
    }

    /// A neighbour's periodic digest: equal rings need nothing; a different one
    /// gets my full state (its newer entries reach me by its own full state when
    /// my digest reaches it, or at once if I have no ring to offer).
    fn on_digest(&mut self, src: PeerName, ring_id: u64, digest: [u8; 16]) {
        if !self.ring.is_agreed() {
            self.request_sync(src);
            return;
        }
        let mine = self.ring.id();
        if ring_id != mine || digest != wire::ring_digest(mine, self.ring.entries()) {
            self.send_sync(src);
        }
    }

    /// Asks `dst` for its full state, at most once per [`SYNC_INTERVAL_MS`].
    fn request_sync(&mut self, dst: PeerName) {
        if self.last_sync_req.get(&dst).is_some_and(|t| t + SYNC_INTERVAL_MS > self.now) {
            return;
        }
        self.last_sync_req.insert(dst, self.now);
        self.send_to(dst, Body::SyncRequest);
    }

    fn on_agreed(&mut self) {
        self.agreed_at = self.now;
        let seeds = self.ring.seeds().to_vec();
        self.paxos.set_decided(&seeds);
        self.push_event(Event::Agreed { seeds });
        // No full broadcast: a decision is announced (neighbours pull it), and
        // neighbours without the ring that gossip get my full state in answer.
        self.announce_due = self.decision.is_some();
        self.want_decision = None;
        self.announcers.clear();
        self.dirty = true;
    }

    // ------------------------------------------------------------ Paxos

    /// Sends what Paxos asked for (after the caller's save: see the contract).
    fn flush_paxos(&mut self) {
        let initial = self.paxos.initial();
        for out in self.paxos.take_out() {
            match out {
                Out::Prepare { ballot, attempt } => {
                    let bytes = self.encode_broadcast(Body::Prepare { ballot, attempt, initial });
                    self.transmits.push_back((Dest::Neighbours, bytes));
                }
                Out::Promise { to, ballot, accepted, value } => {
                    let (value, value_sig) = match value {
                        Some(v) => (v.value, Some(v.sig)),
                        None => (Vec::new(), None),
                    };
                    self.send_to(to, Body::Promise { ballot, initial, accepted, value, value_sig });
                }
                Out::Accept { to, ballot, value } => {
                    self.send_to(to, Body::Accept { ballot, value: value.value, value_sig: value.sig })
                }
                Out::Accepted { to, ballot, sig } => self.send_to(to, Body::Accepted { ballot, sig }),
            }
        }
    }

    /// Rounds far above every round known here are dropped (see [`MAX_ROUND_STEP`]).
    fn round_ok(&mut self, b: &Ballot) -> bool {
        if b.round > self.paxos.max_round().saturating_add(MAX_ROUND_STEP) {
            self.drops.paxos_round_jumps += 1;
            return false;
        }
        true
    }

    /// Whether `v` is signed by `b`'s proposer; counts what is not.
    fn value_ok(&mut self, b: &Ballot, v: &[PeerName], sig: &Signature, keys: &KeyBook) -> bool {
        match keys.verify_from(b.proposer, DOMAIN_PAXOS_VALUE, &wire::value_message(&self.universe, b, v), sig) {
            Ok(()) => true,
            Err(TrustError::Unknown(_)) => {
                self.drops.missing_bindings += 1;
                false
            }
            Err(_) => {
                self.drops.forged_paxos_values += 1;
                false
            }
        }
    }

    /// A prepare flooded by `src` (its proposer), here from neighbour `from`.
    fn on_prepare(&mut self, src: PeerName, from: PeerName, ballot: Ballot, attempt: u32, initial: u32, bytes: &[u8]) {
        if ballot.proposer != src {
            // A prepare is only ever its proposer's own packet.
            self.drops.forged_paxos_records += 1;
            return;
        }
        if self.ring.is_agreed() {
            // The proposer's side has not heard: the neighbour gets the outcome.
            if self.decision.is_some() {
                self.send_decision(from, None);
            } else {
                self.send_sync(from);
            }
            return;
        }
        if !self.round_ok(&ballot) {
            return;
        }
        if self.paxos.on_prepare(ballot, attempt, initial, self.now) {
            // Forwarded unchanged (the proposer's signature); my own promise,
            // if any, is saved before it goes (queued behind the save).
            self.transmits.push_back((Dest::Neighbours, bytes.to_vec()));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_promise(
        &mut self,
        src: PeerName,
        ballot: Ballot,
        initial: u32,
        accepted: Ballot,
        value: Vec<PeerName>,
        value_sig: Option<Signature>,
        keys: &KeyBook,
    ) {
        if ballot.proposer != self.me || self.ring.is_agreed() || !self.round_ok(&accepted) {
            return;
        }
        let value = match value_sig {
            Some(sig) => {
                if !self.value_ok(&accepted, &value, &sig, keys) {
                    return;
                }
                Some(SignedValue { value, sig })
            }
            None => None,
        };
        self.paxos.on_promise(src, ballot, initial, accepted, value, self.now, &self.signer);
    }

    fn on_accept(&mut self, src: PeerName, ballot: Ballot, value: Vec<PeerName>, value_sig: Signature, keys: &KeyBook) {
        if ballot.proposer != src {
            self.drops.forged_paxos_records += 1;
            // (Its value is checked too: counted if it is not the proposer's.)
            let _ = self.value_ok(&ballot, &value, &value_sig, keys);
            return;
        }
        if self.ring.is_agreed() {
            if self.decision.is_some() {
                self.send_decision(src, None);
            }
            return;
        }
        if !self.round_ok(&ballot) || !self.value_ok(&ballot, &value, &value_sig, keys) {
            return;
        }
        self.paxos.on_accept(ballot, SignedValue { value, sig: value_sig }, self.now, &self.signer);
    }

    fn on_accepted(&mut self, src: PeerName, ballot: Ballot, sig: Signature, keys: &KeyBook) {
        let Some(digest) = self.paxos.proposal_digest(&ballot) else { return };
        let msg = wire::accept_message(&self.universe, src, &ballot, &digest);
        match keys.verify_from(src, DOMAIN_PAXOS_ACCEPT, &msg, &sig) {
            Ok(()) => self.paxos.on_accepted(src, ballot, sig),
            Err(TrustError::Unknown(_)) => self.drops.missing_bindings += 1,
            Err(_) => self.drops.forged_paxos_records += 1,
        }
    }

    /// A neighbour announced a decision: ask for it unless I agreed (one
    /// neighbour at a time; another if it does not answer).
    fn on_decided(&mut self, src: PeerName) {
        if self.ring.is_agreed() {
            return;
        }
        if self.announcers.len() < 64 {
            self.announcers.insert(src);
        }
        if self.want_decision.is_none_or(|(_, until)| until <= self.now) {
            self.ask_decision(src);
        }
    }

    fn ask_decision(&mut self, dst: PeerName) {
        self.want_decision = Some((dst, self.now + self.config.request_timeout_ms));
        let holds = self.paxos.accepted_value().map(wire::value_digest);
        self.send_to(dst, Body::WantDecision { holds });
    }

    /// Sends my decision to `dst` (at most once per [`SYNC_INTERVAL_MS`]),
    /// without its value if `dst` holds it (`holds`: that value's digest); my
    /// full ring if I agreed without a decision (adopted, seeded or restored).
    fn send_decision(&mut self, dst: PeerName, holds: Option<[u8; 32]>) {
        let Some(mut d) = self.decision.clone() else {
            if self.ring.is_agreed() {
                self.send_sync(dst);
            }
            return;
        };
        // Its own rate limit: a sync asked for meanwhile (a delta that arrived
        // before the decision) must not be held back by this answer.
        if self.last_decision.get(&dst).is_some_and(|t| t + SYNC_INTERVAL_MS > self.now) {
            return;
        }
        if self.last_decision.len() >= 1024 {
            let now = self.now;
            self.last_decision.retain(|_, t| *t + SYNC_INTERVAL_MS > now);
        }
        self.last_decision.insert(dst, self.now);
        if holds.is_some_and(|h| h == wire::value_digest(&d.value)) {
            d.value = Vec::new();
        }
        self.send_to(dst, Body::Decision(d));
    }

    /// Checks every signature of a decision and that it shows a quorum.
    fn decision_ok(&mut self, d: &Decision, keys: &KeyBook) -> bool {
        if !self.value_ok(&d.ballot, &d.value, &d.value_sig, keys) {
            return false;
        }
        let need = decision_quorum(d.initial.max(self.paxos.initial()), d.value.len());
        if d.accepts.len() < need || d.accepts.iter().any(|(n, _)| d.value.binary_search(n).is_err()) {
            self.drops.forged_decisions += 1;
            return false;
        }
        let digest = wire::value_digest(&d.value);
        for (n, sig) in &d.accepts {
            match keys.verify_from(*n, DOMAIN_PAXOS_ACCEPT, &wire::accept_message(&self.universe, *n, &d.ballot, &digest), sig) {
                Ok(()) => {}
                Err(TrustError::Unknown(_)) => {
                    self.drops.missing_bindings += 1;
                    return false;
                }
                Err(_) => {
                    self.drops.forged_decisions += 1;
                    return false;
                }
            }
        }
        true
    }

    /// A decision from `src`: verified, it makes me agree on its value.
    fn on_decision(&mut self, src: PeerName, mut d: Decision, keys: &KeyBook) -> Result<(), IpamError> {
        if d.value.is_empty() {
            // The value I said I hold (checked with the rest below).
            match self.paxos.accepted_value() {
                Some(v) => d.value = v.to_vec(),
                None => {
                    self.drops.forged_decisions += 1;
                    return Ok(());
                }
            }
        }
        if self.ring.is_agreed() && self.ring.seeds() == d.value.as_slice() {
            return Ok(());
        }
        if !self.decision_ok(&d, keys) {
            if self.want_decision.is_some_and(|(p, _)| p == src) {
                self.want_decision = None;
                self.announcers.remove(&src);
                if let Some(&next) = self.announcers.iter().next() {
                    self.ask_decision(next);
                }
            }
            return Ok(());
        }
        if self.ring.is_agreed() {
            return Err(IpamError::DifferentRings {
                peer: src,
                ours: super::Seeds(self.ring.seeds().to_vec()),
                theirs: super::Seeds(d.value),
            });
        }
        self.ring = Ring::genesis(self.universe, &d.value);
        self.decision = Some(d);
        self.on_agreed();
        Ok(())
    }

    fn push_event(&mut self, e: Event) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    fn on_space_request(&mut self, src: PeerName, id: u64, subnet: Cidr) {
        if !self.ring.is_agreed() {
            // Someone (an observer) wants an address: a participant starts
            // consensus for it, as one of its own requests would.
            if self.paxos.is_participant() {
                self.want_ring = true;
            }
            return self.reply(src, id, Outcome::NotAgreed, Vec::new());
        }
        let (lo, hi) = subnet.usable();
        let mut best: Option<(Addr, Addr)> = None;
        let mut total: u128 = 0;
        for (s, e) in self.ring.owned_by(self.me) {
            if let Some((l, h)) = clip(s, s + e.size, lo, hi) {
                for (a, b) in space::free_runs(l, h, &self.allocs) {
                    total = total.saturating_add(b - a);
                    if best.is_none_or(|(x, y)| b - a > y - x) {
                        best = Some((a, b));
                    }
                }
            }
        }
        let donated = best.and_then(|(a, b)| {
            let want = (total / 2).clamp(1, b - a);
            self.ring.transfer(self.me, b - want, b, src, &self.allocs)
        });
        match donated {
            Some(changed) => {
                let entries = self.ring.entries_at(changed.iter().copied());
                self.changed.extend(changed);
                self.dirty = true;
                self.reply(src, id, Outcome::Donated, entries);
            }
            None => {
                // Tell the asker my real free counts so it asks elsewhere.
                let mine: Vec<Addr> = self.ring.owned_by(self.me).map(|(s, _)| s).collect();
                for s in mine {
                    self.recompute_free(s);
                }
                let entries: Vec<_> = self
                    .ring
                    .owned_by(self.me)
                    .filter(|(s, e)| clip(*s, *s + e.size, lo, hi).is_some())
                    .map(|(s, e)| (s, *e))
                    .collect();
                self.reply(src, id, Outcome::NoSpace, entries);
            }
        }
    }

    fn on_claim_request(&mut self, src: PeerName, id: u64, ip: Addr) {
        if !self.ring.is_agreed() {
            return self.reply(src, id, Outcome::NotAgreed, Vec::new());
        }
        match self.ring.covering_owned(self.me, ip).map(|(s, e)| (s, *e)) {
            Some((s, e)) if self.allocs.contains_key(&ip) => self.reply(src, id, Outcome::InUse, vec![(s, e)]),
            Some((s, e)) => match self.ring.transfer(self.me, ip, ip + 1, src, &self.allocs) {
                Some(changed) => {
                    let entries = self.ring.entries_at(changed.iter().copied());
                    self.changed.extend(changed);
                    self.dirty = true;
                    self.reply(src, id, Outcome::Donated, entries);
                }
                None => self.reply(src, id, Outcome::NoSpace, vec![(s, e)]),
            },
            None => {
                let hint: Vec<_> = self.ring.covering(ip).map(|(s, e)| (s, *e)).into_iter().collect();
                self.reply(src, id, Outcome::NotOwner, hint);
            }
        }
    }

    fn on_reply(&mut self, src: PeerName, id: u64, outcome: Outcome, gossip: Gossip, keys: &KeyBook) -> Result<(), IpamError> {
        self.on_gossip(src, gossip, keys, None)?;
        let timeout = self.config.request_timeout_ms;
        if let Some(subnet) = self.space_asks.iter().find(|(_, a)| a.id == id && a.peer == src).map(|(s, _)| *s) {
            self.space_asks.remove(&subnet);
            if outcome != Outcome::Donated {
                self.shunned.insert((subnet, src), self.now + SHUN_TIMEOUTS * timeout);
            }
        } else if let Some(ip) = self.claim_asks.iter().find(|(_, a)| a.id == id && a.peer == src).map(|(ip, _)| *ip) {
            self.claim_asks.remove(&ip);
            match outcome {
                Outcome::Donated => {}
                Outcome::InUse => {
                    let error = IpamError::AddressInUse { ip: self.universe.ip(ip), holder: Holder::Peer(src) };
                    let (failed, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
                        .into_iter()
                        .partition(|p| matches!(p.req, Request::Exact { ip: x, .. } if addr_value(x) == ip));
                    self.pending = keep;
                    for p in failed {
                        self.fail(p, error.clone());
                    }
                }
                Outcome::NotOwner | Outcome::NoSpace | Outcome::NotAgreed => {
                    // Back off unless my view now names another owner.
                    if self.ring.covering(ip).is_none_or(|(_, e)| e.owner == src) {
                        self.claim_asks.insert(ip, Ask { id: 0, peer: src, deadline: self.now + timeout });
                    }
                }
            }
        }
        Ok(())
    }

    fn fail(&mut self, p: PendingReq, error: IpamError) {
        if let Request::Exact { ip, prefix } = p.req {
            if let Some(u) = self.in_use.get_mut(&(p.target.clone(), addr_value(ip))) {
                // The target uses the address anyway: a conflict, reported once
                // (again only if the reason changes), and claimed again later.
                let news = u.conflict.as_ref() != Some(&error);
                u.conflict = Some(error.clone());
                u.retry_at = self.now + CONFLICT_RETRY_MS;
                if news {
                    self.push_event(Event::Conflict(Conflict { target: p.target, ip, prefix, error }));
                }
                return;
            }
        }
        self.push_event(Event::Failed { target: p.target.clone(), request: p.req.clone(), error: error.clone() });
        if self.failed.len() >= MAX_FAILED {
            self.failed.pop_front();
        }
        self.failed.push_back((p, error));
    }

    /// Runs paxos, then completes what pending requests it can and asks for the rest.
    /// A ballot of my own is only started once an address was asked of me (lazy
    /// consensus): a peer nobody asked forms no ring, so it can still adopt the
    /// ring of a mesh it joins later.
    fn progress(&mut self) {
        if !self.ring.is_agreed() {
            let jitter = self.rng.next();
            let propose = self.want_ring && !self.hold_rebase && self.now >= self.hold_proposals_until;
            let decided = self.paxos.think(self.now, jitter, propose, &self.signer).map(|v| v.to_vec());
            if self.paxos.take_mine_changed() {
                self.dirty = true;
            }
            let learned = self.paxos.take_learned();
            self.flush_paxos();
            if let Some(seeds) = decided {
                if let Some(l) = learned {
                    self.decision = Some(Decision {
                        ballot: l.ballot,
                        initial: self.paxos.initial(),
                        value: l.value.value,
                        value_sig: l.value.sig,
                        accepts: l.accepts,
                    });
                }
                self.ring = Ring::genesis(self.universe, &seeds);
                self.on_agreed();
            } else {
                self.call_election();
                return;
            }
        }
        let mut need_space = BTreeSet::new();
        let mut need_claim = BTreeSet::new();
        let mut keep = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            match self.try_complete(&p) {
                Step::Done(ip, prefix) => {
                    self.in_use.remove(&(p.target.clone(), addr_value(ip)));
                    self.push_event(Event::Allocated { target: p.target.clone(), ip, prefix })
                }
                Step::Failed(e) => self.fail(p, e),
                Step::NeedSpace(s) => {
                    need_space.insert(s);
                    keep.push(p);
                }
                Step::NeedClaim(ip) => {
                    need_claim.insert(ip);
                    keep.push(p);
                }
            }
        }
        self.pending = keep;
        for s in need_space {
            self.ensure_space_ask(s);
        }
        for ip in need_claim {
            self.ensure_claim_ask(ip);
        }
    }

    /// Whether I am an observer waiting for the ring with requests pending.
    fn calls_election(&self) -> bool {
        !self.ring.is_agreed() && !self.paxos.is_participant() && !self.pending.is_empty()
    }

    /// As an observer with requests waiting for the ring, asks reachable peers
    /// (at most [`ELECTION_CALLS`]) for space, again after a request timeout:
    /// the participants among them start consensus (they answer `NotAgreed`).
    fn call_election(&mut self) {
        if !self.calls_election() || self.now < self.next_election_call {
            return;
        }
        let peers: Vec<PeerName> = self.live.iter().flatten().copied().take(ELECTION_CALLS).collect();
        if peers.is_empty() {
            return; // Called again when peers become reachable.
        }
        for p in peers {
            let id = self.next_id();
            self.send_to(p, Body::SpaceRequest { id, subnet: self.universe });
        }
        self.next_election_call = self.now + self.config.request_timeout_ms;
    }

    fn schedule_retry(&mut self) {
        if self.retry_at.is_none() {
            self.retry_at = Some(self.now + self.config.request_timeout_ms);
        }
    }

    fn ensure_space_ask(&mut self, subnet: Cidr) {
        if self.space_asks.contains_key(&subnet) {
            return;
        }
        match self.choose_donor(&subnet) {
            Some(donor) => {
                let id = self.next_id();
                self.send_to(donor, Body::SpaceRequest { id, subnet });
                let deadline = self.now + self.config.request_timeout_ms;
                self.space_asks.insert(subnet, Ask { id, peer: donor, deadline });
            }
            None => self.schedule_retry(),
        }
    }

    /// A reachable peer with free space in `subnet`, at random weighted by the free
    /// space its entries report there (clipped to the subnet).
    fn choose_donor(&mut self, subnet: &Cidr) -> Option<PeerName> {
        let (lo, hi) = subnet.usable();
        let mut weights: BTreeMap<PeerName, u128> = BTreeMap::new();
        for (s, e) in self.ring.entries() {
            if e.owner == self.me || !self.is_live(e.owner) {
                continue;
            }
            if self.shunned.get(&(*subnet, e.owner)).is_some_and(|u| *u > self.now) {
                continue;
            }
            if let Some((l, h)) = clip(s, s + e.size, lo, hi) {
                let est = (h - l).min(e.free);
                if est > 0 {
                    let w = weights.entry(e.owner).or_default();
                    *w = w.saturating_add(est);
                }
            }
        }
        let total: u128 = weights.values().fold(0u128, |t, w| t.saturating_add(*w));
        if total == 0 {
            return None;
        }
        let mut pick = self.rng.below128(total);
        for (p, w) in weights {
            if pick < w {
                return Some(p);
            }
            pick -= w;
        }
        None
    }

    fn ensure_claim_ask(&mut self, ip: Addr) {
        if self.claim_asks.contains_key(&ip) {
            return;
        }
        let owner = self.ring.covering(ip).map(|(_, e)| e.owner);
        match owner {
            Some(o) if o != self.me && self.is_live(o) => {
                let id = self.next_id();
                self.send_to(o, Body::ClaimRequest { id, ip });
                let deadline = self.now + self.config.request_timeout_ms;
                self.claim_asks.insert(ip, Ask { id, peer: o, deadline });
            }
            _ => self.schedule_retry(),
        }
    }
}

/// Whether my free count moving from `published` to `exact` is worth a new
/// version of my entry now: it reaches or leaves zero, or it moved by an eighth
/// of the larger of the two (so counts are exact near exhaustion, and a burst of
/// allocations in a large range is one update, or none until the next full gossip).
fn free_is_news(published: Addr, exact: Addr) -> bool {
    published != exact && ((published == 0) != (exact == 0) || published.abs_diff(exact) >= (published.max(exact) / 8).max(1))
}

/// Every peer whose signature `env` carries: its sender, the writers of its ring
/// entries, the participants of its Paxos records and the proposers of its values.
fn signers_of(env: &Envelope) -> BTreeSet<PeerName> {
    let mut names = BTreeSet::new();
    names.insert(env.src);
    match &env.body {
        Body::Gossip(g) | Body::Reply { gossip: g, .. } => names.extend(g.proofs.iter().map(|p| p.by)),
        Body::Promise { accepted, value_sig: Some(_), .. } => {
            names.insert(accepted.proposer);
        }
        Body::Decision(d) => {
            names.insert(d.ballot.proposer);
            names.extend(d.accepts.iter().map(|(n, _)| *n));
        }
        _ => {}
    }
    names
}
