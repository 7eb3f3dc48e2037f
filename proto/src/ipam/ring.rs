//! The ring: which peer owns which part of the address space (the universe).
//!
//! Owns: the CRDT of ownership entries, its merge rule, and the few edits an
//! owner may make to its own entries (report free space, give a piece away,
//! hand everything over). Knows nothing about allocations, messages or time.
//!
//! # Model
//! An entry is keyed by its first address (`start`) and carries its `owner`, its
//! `size` (so the range is `[start, start + size)`; the extent does not depend on
//! the other entries), a `version` and the owner's count of `free` addresses in it
//! (advice for picking donors, never trusted for safety).
//!
//! * **Genesis.** A ring starts from a sorted, deduplicated seed list: seed `i` of
//!   `n` owns `[u + i*size/n, u + (i+1)*size/n)`, all at version 0. Every peer that
//!   knows the seeds computes the same genesis, so it is never sent.
//! * **Single writer.** Only an entry's current owner changes it, and every change
//!   bumps its version. Ownership moves only when the owner rewrites the entry's
//!   `owner` (donation, shutdown handoff) — or by `rmpeer`, which is the one
//!   documented exception and is unsafe if the "dead" peer is alive.
//! * **Starts are never deleted.** A split keeps the old start (shrunk, version+1)
//!   and adds new starts; pieces are never coalesced. So the set of starts only
//!   grows (bounded by [`MAX_ENTRIES`]).
//! * **Merge** is per start: unknown start → take it; higher version → take it;
//!   equal version with different content → [`IpamError::InconsistentEntry`]
//!   (two writers: `rmpeer` ran on a live peer or twice). Rings from different
//!   seed lists never merge ([`IpamError::DifferentRings`]). An unseeded ring
//!   adopts the other side's seeds. Merging is planned first and applied only if
//!   the whole update is valid, so an error leaves the ring unchanged.
//!
//! Because an entry carries its own extent and is written by its owner only, the
//! entries a peer owns in its own view are always exactly right, even when the
//! rest of its view is stale or was learned from partial (delta) gossip; stale
//! entries of other peers may overlap, which only affects donor choice and status.
//! Without duplicated writers, merge is commutative, associative and idempotent
//! (tests below), so all peers that have seen the same updates hold the same
//! bytes ([`Ring::canonical_bytes`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::wire::Proof;

use super::space::{clip, count_used, Addr, Cidr};
use super::IpamError;
use crate::peer::PeerName;

/// Most entries a ring holds; a merge or split that would exceed it is refused.
pub const MAX_ENTRIES: usize = 100_000;
/// Most seeds (initial owners) a ring may have.
pub const MAX_SEEDS: usize = 10_000;
/// Highest version accepted from a peer (leaves room for local bumps).
pub const MAX_VERSION: u64 = 1 << 62;
/// How far `rmpeer` raises the versions of the entries it takes over, so that the
/// takeover wins over updates the dead peer made that were never seen here.
pub(crate) const TAKEOVER_JUMP: u64 = 1 << 20;

/// `v + by`, if that stays within [`MAX_VERSION`] (checked: a version at the
/// bound cannot be bumped, so the entry cannot change any more).
pub(crate) fn bump(v: u64, by: u64) -> Option<u64> {
    v.checked_add(by).filter(|n| *n <= MAX_VERSION)
}

/// One owned range, `[start, start + size)`, keyed by `start` in the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub owner: PeerName,
    pub size: Addr,
    pub version: u64,
    /// Free addresses in the range as the owner last reported them.
    pub free: Addr,
}

/// A validated merge, ready to apply.
#[derive(Debug)]
pub(crate) struct MergePlan {
    /// The genesis to start from, when this ring had no seeds yet.
    adopt: Option<Ring>,
    changes: Vec<(Addr, Entry)>,
    /// The writers' proofs of (some of) the changes.
    proofs: BTreeMap<Addr, Proof>,
}

impl MergePlan {
    pub(crate) fn changes(&self) -> &[(Addr, Entry)] {
        &self.changes
    }

    pub(crate) fn adopts(&self) -> bool {
        self.adopt.is_some()
    }

    /// Attaches the proofs of the changes (verified by the caller).
    pub(crate) fn with_proofs(mut self, proofs: BTreeMap<Addr, Proof>) -> MergePlan {
        self.proofs = proofs;
        self
    }
}

/// The ownership CRDT (see the module docs).
#[derive(Clone, Debug)]
pub struct Ring {
    universe: Cidr,
    seeds: Vec<PeerName>,
    /// [`ring_id`] of the universe and seeds; 0 while unseeded.
    id: u64,
    entries: BTreeMap<Addr, Entry>,
    /// The writer's signature of each entry, where known (never for genesis
    /// entries; not for entries kept from a version-1 snapshot until a signed copy
    /// arrives). Entries without one are not relayed.
    proofs: BTreeMap<Addr, Proof>,
    /// Starts edited here since they were last signed (see `Ipam::sign_pending`).
    unsigned: BTreeSet<Addr>,
}

/// Equal state: proofs (who signed the same content) do not count.
impl PartialEq for Ring {
    fn eq(&self, o: &Ring) -> bool {
        self.universe == o.universe && self.seeds == o.seeds && self.entries == o.entries
    }
}
impl Eq for Ring {}

/// A ring's identity: 64 bits of SHA-256 over the universe and the sorted seeds
/// (never 0). Delta gossip carries this instead of the seed list, which can be
/// thousands of names.
pub fn ring_id(universe: &Cidr, seeds: &[PeerName]) -> u64 {
    if seeds.is_empty() {
        return 0;
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"meshnet ipam ring v1");
    match universe.network() {
        std::net::IpAddr::V4(a) => ctx.update(&a.octets()),
        std::net::IpAddr::V6(a) => ctx.update(&a.octets()),
    }
    ctx.update(&[universe.prefix()]);
    for s in seeds {
        ctx.update(&s.0.to_be_bytes());
    }
    let d = ctx.finish();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(b).max(1)
}

/// Addresses of `[lo, hi)` that may ever be allocated (the universe's network and
/// broadcast addresses never are).
pub(crate) fn usable_count(universe: &Cidr, lo: Addr, hi: Addr) -> u128 {
    let (a, b) = universe.usable();
    clip(lo, hi, a, b).map_or(0, |(l, h)| h - l)
}

/// Free addresses in `[start, start+size)` given this peer's allocations.
pub(crate) fn free_in<T>(universe: &Cidr, start: Addr, size: Addr, allocs: &BTreeMap<Addr, T>) -> Addr {
    let lo = start;
    let hi = lo + size;
    let (a, b) = universe.usable();
    match clip(lo, hi, a, b) {
        Some((l, h)) => (h - l) - count_used(l, h, allocs),
        None => 0,
    }
}

impl Ring {
    /// A ring with no seeds: nothing is owned until seeds are agreed or adopted.
    pub fn new(universe: Cidr) -> Ring {
        Ring { universe, seeds: Vec::new(), id: 0, entries: BTreeMap::new(), proofs: BTreeMap::new(), unsigned: BTreeSet::new() }
    }

    /// The deterministic initial division of `universe` among `seeds` (sorted and
    /// deduplicated here). With more seeds than addresses, the later of two seeds
    /// falling on one address keeps it and the other gets nothing.
    pub fn genesis(universe: Cidr, seeds: &[PeerName]) -> Ring {
        let mut seeds = seeds.to_vec();
        seeds.sort();
        seeds.dedup();
        let id = ring_id(&universe, &seeds);
        let mut ring = Ring { universe, seeds, id, entries: BTreeMap::new(), proofs: BTreeMap::new(), unsigned: BTreeSet::new() };
        let n = ring.seeds.len() as u128;
        if n == 0 {
            return ring;
        }
        let start = universe.start();
        let size = universe.size();
        // start + floor(i * size / n), without overflowing 128 bits.
        let (q, r) = (size / n, size % n);
        let token = |i: u128| start + i * q + i * r / n;
        for (i, &owner) in ring.seeds.iter().enumerate() {
            let (t, next) = (token(i as u128), token(i as u128 + 1));
            if t == next {
                continue;
            }
            let free = usable_count(&universe, t, next);
            ring.entries.insert(t, Entry { owner, size: (next - t), version: 0, free });
        }
        ring
    }

    pub fn universe(&self) -> Cidr {
        self.universe
    }

    /// Whether the ring has seeds, i.e. initial ownership is settled.
    pub fn is_agreed(&self) -> bool {
        !self.seeds.is_empty()
    }

    pub fn seeds(&self) -> &[PeerName] {
        &self.seeds
    }

    /// See [`ring_id`].
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, start: Addr) -> Option<&Entry> {
        self.entries.get(&start)
    }

    /// The writer's proof of the entry at `start`, if known.
    pub fn proof(&self, start: Addr) -> Option<&Proof> {
        self.proofs.get(&start)
    }

    /// Records the proof of the entry at `start` (already verified, or made here).
    pub(crate) fn set_proof(&mut self, start: Addr, proof: Proof) {
        if self.entries.contains_key(&start) {
            self.proofs.insert(start, proof);
        }
    }

    /// Starts edited here and not signed since; clears the list.
    pub(crate) fn take_unsigned(&mut self) -> BTreeSet<Addr> {
        std::mem::take(&mut self.unsigned)
    }

    /// The entries below `start`, nearest first.
    pub(crate) fn entries_before(&self, start: Addr) -> impl Iterator<Item = (Addr, &Entry)> + '_ {
        self.entries.range(..start).rev().map(|(&s, e)| (s, e))
    }

    /// The entry covering `ip` in this ring with `overlay` (newer entries, e.g. the
    /// earlier ones of a message being verified) applied on top.
    pub(crate) fn covering_with(&self, overlay: &BTreeMap<Addr, Entry>, ip: Addr) -> Option<(Addr, Entry)> {
        let mut a = self.entries.range(..=ip).rev().take(64).peekable();
        let mut b = overlay.range(..=ip).rev().take(64).peekable();
        for _ in 0..128 {
            let next = match (a.peek(), b.peek()) {
                (Some((&sa, _)), Some((&sb, _))) if sa > sb => a.next().map(|(&s, e)| (s, *e)),
                (Some((&sa, _)), Some((&sb, _))) if sa == sb => {
                    a.next();
                    b.next().map(|(&s, e)| (s, *e))
                }
                (_, Some(_)) => b.next().map(|(&s, e)| (s, *e)),
                (Some(_), None) => a.next().map(|(&s, e)| (s, *e)),
                (None, None) => None,
            };
            let (s, e) = next?;
            if (ip) < s + e.size {
                return Some((s, e));
            }
        }
        None
    }

    /// All entries by start.
    pub fn entries(&self) -> impl Iterator<Item = (Addr, &Entry)> + '_ {
        self.entries.iter().map(|(&s, e)| (s, e))
    }

    /// The entries for `starts` (unknown ones skipped), as gossip carries them.
    pub(crate) fn entries_at(&self, starts: impl IntoIterator<Item = Addr>) -> Vec<(Addr, Entry)> {
        starts.into_iter().filter_map(|s| self.entries.get(&s).map(|e| (s, *e))).collect()
    }

    pub(crate) fn all_entries(&self) -> Vec<(Addr, Entry)> {
        self.entries.iter().map(|(&s, e)| (s, *e)).collect()
    }

    /// The entries `peer` owns, by start.
    pub fn owned_by(&self, peer: PeerName) -> impl Iterator<Item = (Addr, &Entry)> + '_ {
        self.entries().filter(move |(_, e)| e.owner == peer)
    }

    /// The entry whose range holds `ip`. In a stale view several may; the one with
    /// the greatest start wins (looking back at most 64 entries).
    pub fn covering(&self, ip: Addr) -> Option<(Addr, &Entry)> {
        self.entries
            .range(..=ip)
            .rev()
            .take(64)
            .find(|(&s, e)| (ip) < s + e.size)
            .map(|(&s, e)| (s, e))
    }

    /// The entry owned by `me` whose range holds `ip`.
    pub fn covering_owned(&self, me: PeerName, ip: Addr) -> Option<(Addr, &Entry)> {
        self.covering(ip).filter(|(_, e)| e.owner == me)
    }

    /// Checks an update (`seeds` and some entries, all already validated against
    /// the universe) without changing anything. `peer` names the sender in errors.
    pub(crate) fn plan_merge(&self, peer: PeerName, seeds: &[PeerName], entries: &[(Addr, Entry)]) -> Result<MergePlan, IpamError> {
        if seeds.is_empty() {
            if !entries.is_empty() {
                return Err(IpamError::Malformed("ring entries without seeds".into()));
            }
            return Ok(MergePlan { adopt: None, changes: Vec::new(), proofs: BTreeMap::new() });
        }
        let adopt = if self.seeds.is_empty() {
            Some(Ring::genesis(self.universe, seeds))
        } else if self.seeds != seeds {
            return Err(IpamError::DifferentRings {
                peer,
                ours: super::Seeds(self.seeds.clone()),
                theirs: super::Seeds(seeds.to_vec()),
            });
        } else {
            None
        };
        self.plan_entries(peer, adopt, entries)
    }

    /// Like [`Ring::plan_merge`] for entries of this same ring (the caller checked
    /// the sender's [`ring_id`]).
    pub(crate) fn plan_merge_same(&self, peer: PeerName, entries: &[(Addr, Entry)]) -> Result<MergePlan, IpamError> {
        self.plan_entries(peer, None, entries)
    }

    fn plan_entries(&self, peer: PeerName, adopt: Option<Ring>, entries: &[(Addr, Entry)]) -> Result<MergePlan, IpamError> {
        let base = adopt.as_ref().unwrap_or(self);
        let mut changes = Vec::new();
        let mut new_starts = 0usize;
        for &(s, e) in entries {
            match base.entries.get(&s) {
                None => {
                    new_starts += 1;
                    changes.push((s, e));
                }
                Some(m) if e.version > m.version => changes.push((s, e)),
                Some(m) if e.version == m.version && e != *m => {
                    return Err(IpamError::InconsistentEntry { peer, start: self.universe.ip(s), version: e.version });
                }
                Some(_) => {}
            }
        }
        if base.entries.len() + new_starts > MAX_ENTRIES {
            return Err(IpamError::TooManyEntries);
        }
        Ok(MergePlan { adopt, changes, proofs: BTreeMap::new() })
    }

    /// Applies a plan from [`Ring::plan_merge`] on this same ring; returns the
    /// starts that changed (genesis entries of an adopted ring excluded).
    pub(crate) fn apply(&mut self, plan: MergePlan) -> Vec<Addr> {
        if let Some(genesis) = plan.adopt {
            *self = genesis;
        }
        let mut changed = Vec::with_capacity(plan.changes.len());
        let mut proofs = plan.proofs;
        for (s, e) in plan.changes {
            self.entries.insert(s, e);
            self.unsigned.remove(&s);
            match proofs.remove(&s) {
                Some(p) => self.proofs.insert(s, p),
                None => self.proofs.remove(&s),
            };
            changed.push(s);
        }
        changed
    }

    /// Merges another ring (plan + apply); for tests and tools.
    pub fn merge(&mut self, peer: PeerName, other: &Ring) -> Result<Vec<Addr>, IpamError> {
        if other.universe != self.universe {
            return Err(IpamError::RangeMismatch { peer, ours: self.universe, theirs: other.universe });
        }
        let plan = self.plan_merge(peer, &other.seeds, &other.all_entries())?;
        Ok(self.apply(plan))
    }

    /// Owner edit: sets the free count `me` reports for its entry at `start`,
    /// bumping the version if it changed. False if not `me`'s entry or unchanged.
    pub(crate) fn set_free(&mut self, me: PeerName, start: Addr, free: Addr) -> bool {
        match self.entries.get_mut(&start) {
            Some(e) if e.owner == me && e.free != free => {
                let Some(v) = bump(e.version, 1) else { return false };
                e.free = free;
                e.version = v;
                self.proofs.remove(&start);
                self.unsigned.insert(start);
                true
            }
            _ => false,
        }
    }

    /// Owner edit: gives `[lo, hi)`, which must lie inside one entry owned by `me`,
    /// to `to`. Splits as needed; the free counts of the pieces are computed from
    /// `allocs` (which must have nothing in `[lo, hi)`). Returns the changed starts,
    /// or `None` (nothing changed) if the piece is not `me`'s or the ring is full.
    pub(crate) fn transfer<T>(&mut self, me: PeerName, lo: Addr, hi: Addr, to: PeerName, allocs: &BTreeMap<Addr, T>) -> Option<Vec<Addr>> {
        if lo >= hi || hi > self.universe.end() || to == me {
            return None;
        }
        let (s, e) = self.covering_owned(me, lo).map(|(s, e)| (s, *e))?;
        let end = s + e.size;
        if hi > end || count_used(lo, hi, allocs) != 0 {
            return None;
        }
        let extra = usize::from(lo > s) + usize::from(hi < end);
        if self.entries.len() + extra > MAX_ENTRIES {
            return None;
        }
        let universe = self.universe;
        let next_version = |ring: &Ring, at: Addr| ring.entries.get(&at).map_or(Some(1), |x| bump(x.version, 1));
        // Every version this edit writes must stay bounded, or nothing changes.
        let own_next = bump(e.version, 1)?;
        if (hi < end && next_version(self, hi).is_none()) || (lo > s && next_version(self, lo).is_none()) {
            return None;
        }
        let mut changed = Vec::new();
        if hi < end {
            let t = hi;
            let size = end - hi;
            let v = next_version(self, t)?;
            self.entries.insert(t, Entry { owner: me, size, version: v, free: free_in(&universe, t, size, allocs) });
            changed.push(t);
        }
        let piece = hi - lo;
        let piece_free = free_in(&universe, lo, piece, allocs);
        if lo > s {
            let head = lo - s;
            let v = own_next;
            self.entries.insert(s, Entry { owner: me, size: head, version: v, free: free_in(&universe, s, head, allocs) });
            changed.push(s);
            let t = lo;
            let v = next_version(self, t)?;
            self.entries.insert(t, Entry { owner: to, size: piece, version: v, free: piece_free });
            changed.push(t);
        } else {
            self.entries.insert(s, Entry { owner: to, size: piece, version: own_next, free: piece_free });
            changed.push(s);
        }
        changed.sort_unstable();
        for &c in &changed {
            self.proofs.remove(&c);
            self.unsigned.insert(c);
        }
        Some(changed)
    }

    /// Gives every entry of `from` to `to`, raising versions by `jump` and marking
    /// the ranges entirely free. Used by the owner for its shutdown handoff
    /// (`jump` 1) and by `rmpeer` for a dead peer ([`TAKEOVER_JUMP`]).
    pub(crate) fn reassign_all(&mut self, from: PeerName, to: PeerName, jump: u64) -> Vec<Addr> {
        let universe = self.universe;
        let mut changed = Vec::new();
        for (&s, e) in self.entries.iter_mut() {
            if e.owner == from {
                // An entry whose version cannot grow any more stays as it is.
                let Some(v) = bump(e.version, jump) else { continue };
                e.owner = to;
                e.version = v;
                e.free = usable_count(&universe, s, s + e.size);
                changed.push(s);
            }
        }
        for &c in &changed {
            self.proofs.remove(&c);
            self.unsigned.insert(c);
        }
        changed
    }

    /// The canonical encoding: two rings holding the same state give the same bytes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let entries = self.all_entries();
        bincode::serde::encode_to_vec((&self.universe, &self.seeds, &entries), bincode::config::standard())
            .unwrap_or_default()
    }

    /// Restores a ring from its parts (snapshot); the caller validated them.
    /// Entries without a proof that are not genesis entries and are owned by
    /// `me` are marked for signing (a version-1 snapshot, or unsigned at save time).
    pub(crate) fn from_parts(universe: Cidr, seeds: Vec<PeerName>, entries: Vec<(Addr, Entry)>, proofs: Vec<Option<Proof>>, me: PeerName) -> Ring {
        let id = ring_id(&universe, &seeds);
        let mut ring = Ring { universe, seeds, id, entries: BTreeMap::new(), proofs: BTreeMap::new(), unsigned: BTreeSet::new() };
        for ((s, e), p) in entries.into_iter().zip(proofs.into_iter().chain(std::iter::repeat(None))) {
            match p {
                Some(p) => {
                    ring.proofs.insert(s, p);
                }
                None if e.owner == me && e.version > 0 => {
                    ring.unsigned.insert(s);
                }
                None => {}
            }
            ring.entries.insert(s, e);
        }
        ring
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::testutil::Rng;

    fn u() -> Cidr {
        "10.32.0.0/22".parse().unwrap()
    }
    fn p(n: u64) -> PeerName {
        PeerName(n)
    }
    const X: PeerName = PeerName(99);

    fn no_allocs() -> BTreeMap<Addr, ()> {
        BTreeMap::new()
    }

    #[test]
    fn genesis_divides_evenly_and_ignores_seed_order() {
        let a = Ring::genesis(u(), &[p(3), p(1), p(2), p(1)]);
        let b = Ring::genesis(u(), &[p(1), p(2), p(3)]);
        assert_eq!(a, b);
        assert_eq!(a.seeds(), &[p(1), p(2), p(3)]);
        let es: Vec<_> = a.entries().map(|(s, e)| (s - u().start(), e.owner, e.size, e.free)).collect();
        // 1024 addresses: 341 + 341 + 342; the first and last address are never free.
        assert_eq!(es, vec![(0, p(1), 341, 340), (341, p(2), 341, 341), (682, p(3), 342, 341)]);
        // More seeds than addresses: the ring still covers everything exactly once.
        let tiny: Cidr = "10.0.0.0/30".parse().unwrap();
        let r = Ring::genesis(tiny, &(1..=10).map(p).collect::<Vec<_>>());
        assert_eq!(r.entries().map(|(_, e)| e.size).sum::<u128>(), 4);
    }

    #[test]
    fn transfer_splits_and_only_owner_may() {
        let mut r = Ring::genesis(u(), &[p(1), p(2)]);
        let base = u().start();
        // p(2) may not give away p(1)'s space.
        assert_eq!(r.transfer(p(2), base + 10, base + 20, X, &no_allocs()), None);
        let before = r.clone();
        let ch = r.transfer(p(1), base + 100, base + 200, X, &no_allocs()).unwrap();
        assert_eq!(ch.len(), 3);
        assert_eq!(r.get(base as Addr).unwrap().size, 100);
        assert_eq!(r.get(base as Addr).unwrap().version, 1);
        assert_eq!(r.get(base as Addr + 100).unwrap().owner, X);
        assert_eq!(r.get(base as Addr + 200).unwrap().owner, p(1));
        assert_eq!(r.get(base as Addr + 200).unwrap().size, 312);
        // p(2)'s entry untouched.
        assert_eq!(r.get(base as Addr + 512), before.get(base as Addr + 512));
        // The piece must not hold allocations.
        let mut allocs = BTreeMap::new();
        allocs.insert(base as Addr + 300, ());
        assert_eq!(r.transfer(p(1), base + 250, base + 350, X, &allocs), None);
        // Crossing an entry boundary is refused.
        assert_eq!(r.transfer(p(1), base + 50, base + 150, X, &no_allocs()), None);
        // Rmpeer-style reassign touches only the named owner's entries.
        let mut r2 = r.clone();
        let ch = r2.reassign_all(X, p(2), TAKEOVER_JUMP);
        assert_eq!(ch, vec![base as Addr + 100]);
        assert_eq!(r2.owned_by(X).count(), 0);
        for (s, e) in r.entries() {
            if e.owner != X {
                assert_eq!(r2.get(s), Some(e));
            }
        }
    }

    #[test]
    fn conflicts_leave_ring_unchanged() {
        let mut a = Ring::genesis(u(), &[p(1), p(2)]);
        let mut b = a.clone();
        let start = u().start();
        a.set_free(p(1), start, 7);
        b.set_free(p(1), start, 8); // two writers at the same version
        let before = a.clone();
        assert!(matches!(a.merge(X, &b), Err(IpamError::InconsistentEntry { .. })));
        assert_eq!(a, before);
        let c = Ring::genesis(u(), &[p(1), p(3)]);
        let err = a.merge(X, &c).unwrap_err();
        assert!(matches!(err, IpamError::DifferentRings { .. }));
        let msg = err.to_string();
        assert!(msg.contains("00:00:00:00:00:03") && msg.contains("00:00:00:00:00:02"), "{msg}");
        assert_eq!(a, before);
        let d = Ring::genesis("10.32.0.0/23".parse().unwrap(), &[p(1), p(2)]);
        assert!(matches!(a.merge(X, &d), Err(IpamError::RangeMismatch { .. })));
        assert_eq!(a, before);
        // An unseeded ring adopts.
        let mut e = Ring::new(u());
        e.merge(X, &a).unwrap();
        assert_eq!(e, a);
    }

    /// A random single-writer history: each step, one owner edits its own entries.
    /// Returns the last state and every state.
    fn random_history(rng: &mut Rng, steps: usize) -> (Ring, Vec<Ring>) {
        let owners: Vec<PeerName> = (1..=5).map(p).collect();
        let mut truth = Ring::genesis(u(), &owners[..3]);
        let mut history = vec![truth.clone()];
        for _ in 0..steps {
            let me = owners[rng.below(owners.len() as u64) as usize];
            let mine: Vec<(Addr, Entry)> = truth.owned_by(me).map(|(s, e)| (s, *e)).collect();
            if mine.is_empty() {
                continue;
            }
            let (s, e) = mine[rng.below(mine.len() as u64) as usize];
            match rng.below(3) {
                0 => {
                    truth.set_free(me, s, rng.below(e.size as u64 + 1) as Addr);
                }
                _ => {
                    let lo = s as u64 + rng.below(e.size as u64);
                    let hi = lo + 1 + rng.below(s as u64 + e.size as u64 - lo);
                    let to = owners[rng.below(owners.len() as u64) as usize];
                    truth.transfer(me, lo as Addr, hi as Addr, to, &no_allocs());
                }
            }
            history.push(truth.clone());
        }
        (truth, history)
    }

    /// Views: random subsets of the entries of random past states (partial, stale gossip).
    fn random_views(rng: &mut Rng, steps: usize, views: usize) -> Vec<Ring> {
        let (_, history) = random_history(rng, steps);
        (0..views)
            .map(|_| {
                let src = &history[rng.below(history.len() as u64) as usize];
                let keep: Vec<(Addr, Entry)> = src.all_entries().into_iter().filter(|_| rng.below(3) != 0).collect();
                let mut v = Ring::new(u());
                let plan = v.plan_merge(X, src.seeds(), &keep).unwrap();
                v.apply(plan);
                v
            })
            .collect()
    }

    fn merged(a: &Ring, b: &Ring) -> Ring {
        let mut m = a.clone();
        m.merge(X, b).unwrap();
        m
    }

    #[test]
    fn merge_is_commutative_associative_idempotent() {
        let mut rng = Rng::new(7);
        for round in 0..200 {
            let v = random_views(&mut rng, 30, 3);
            let (a, b, c) = (&v[0], &v[1], &v[2]);
            assert_eq!(merged(a, b).canonical_bytes(), merged(b, a).canonical_bytes(), "round {round}");
            assert_eq!(merged(&merged(a, b), c), merged(a, &merged(b, c)), "round {round}");
            assert_eq!(merged(a, a), *a);
            // Merging in what one already has changes nothing.
            let ab = merged(a, b);
            assert_eq!(merged(&ab, a), ab);
        }
    }

    #[test]
    fn join_of_a_history_is_its_last_state_and_partitions_the_universe() {
        let mut rng = Rng::new(11);
        for _ in 0..100 {
            let (truth, history) = random_history(&mut rng, 40);
            // The latest state divides the universe exactly.
            let mut next = u().start();
            for (s, e) in truth.entries() {
                assert_eq!(s, next, "gap or overlap at {s}");
                next += e.size;
            }
            assert_eq!(next, u().end());
            // Merging every past state, in any order, gives the latest one.
            let mut order: Vec<usize> = (0..history.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut m = Ring::new(u());
            for i in order {
                m.merge(X, &history[i]).unwrap();
            }
            assert_eq!(m, truth);
        }
    }

    /// A 128-bit ring that ends just below 2^128: genesis, splits and transfers at
    /// its edges, a takeover, and merges, with no overflow and no enumeration.
    #[test]
    fn ipv6_ring_near_the_top_of_the_space() {
        let edge: Cidr = "ffff:ffff:ffff:ffff:8000::/65".parse().unwrap();
        assert!(!edge.is_allocatable(), "ends at 2^128");
        let top: Cidr = "ffff:ffff:ffff:fffe:8000::/65".parse().unwrap();
        assert!(top.is_allocatable());
        assert_eq!(top.end(), u128::MAX - (1u128 << 64) + 1);
        let seeds: Vec<PeerName> = (1..=3).map(p).collect();
        let mut r = Ring::genesis(top, &seeds);
        let total: u128 = r.entries().map(|(_, e)| e.size).sum();
        assert_eq!(total, 1u128 << 63);
        let mut next = top.start();
        for (s, e) in r.entries() {
            assert_eq!(s, next);
            next += e.size;
        }
        assert_eq!(next, top.end());
        let (last_start, last) = r.entries().last().map(|(s, e)| (s, *e)).unwrap();
        assert_eq!(last.free, last.size - 1, "the last address is reserved");
        let end = last_start + last.size;
        // Give away the very last address, then the first of the last entry.
        let ch = r.transfer(last.owner, end - 1, end, X, &no_allocs()).unwrap();
        assert_eq!(ch, vec![last_start, end - 1]);
        assert_eq!(r.get(end - 1).unwrap().size, 1);
        assert_eq!(r.get(end - 1).unwrap().free, 0);
        let ch = r.transfer(last.owner, last_start, last_start + 1, X, &no_allocs()).unwrap();
        assert_eq!(ch, vec![last_start, last_start + 1]);
        assert_eq!(r.covering(end - 1).unwrap().1.owner, X);
        assert_eq!(r.covering(last_start + 5).unwrap().1.owner, last.owner);
        // Nothing past the universe, nothing crossing an entry.
        assert_eq!(r.transfer(X, end - 1, end + 1, p(1), &no_allocs()), None);
        // An allocation blocks a transfer; a huge piece is fine.
        let mut allocs = BTreeMap::new();
        allocs.insert(last_start + 100, ());
        assert_eq!(r.transfer(last.owner, last_start + 50, last_start + 150, X, &allocs), None);
        let first = top.start();
        let big = r.get(first).unwrap().size / 2;
        assert!(r.transfer(p(1), first + big, first + 2 * big, X, &no_allocs()).is_some());
        // A takeover of X's entries by p(2).
        let mut r2 = r.clone();
        let taken = r2.reassign_all(X, p(2), TAKEOVER_JUMP);
        assert_eq!(taken.len(), 3);
        assert_eq!(r2.owned_by(X).count(), 0);
        // Merging views in any order gives the same bytes.
        let mut a = Ring::genesis(top, &seeds);
        a.merge(X, &r).unwrap();
        let mut b = Ring::new(top);
        b.merge(X, &r).unwrap();
        assert_eq!(a.canonical_bytes(), b.canonical_bytes());
        assert_eq!(a, r);
        // An IPv6 ring and an IPv4 ring never merge.
        let v4 = Ring::genesis(u(), &seeds);
        assert!(matches!(a.clone().merge(X, &v4), Err(IpamError::RangeMismatch { .. })));
        // Many seeds over a huge space: exact shares, no overflow.
        let many: Vec<PeerName> = (1..=9999).map(p).collect();
        let g = Ring::genesis(top, &many);
        assert_eq!(g.len(), 9999);
        assert_eq!(g.entries().map(|(_, e)| e.size).sum::<u128>(), 1u128 << 63);
    }
}
