//! Which peer owns which MAC address: the learning bridge's forwarding table.
//!
//! The router learns the source MAC of every unit: units read from the local TAP
//! teach [`MacOwner::Local`], units received from the mesh teach
//! [`MacOwner::Peer`] with the inner header's `src`. Lookups of a destination MAC
//! tell where to send; a miss (or a multicast destination) means flood.
//!
//! Entries age out after `ageing_ms` without being seen (Weave: 10 minutes).
//! The table is bounded: when full, new MACs are refused rather than let a flood
//! of random source addresses grow it without limit; known MACs still refresh and
//! move. Expired entries stay in memory until [`MacTable::expire`] sweeps them
//! (the table also sweeps itself, at most once a second, when it is full).
//!
//! Time is passed in; nothing here reads a clock.

use std::collections::HashMap;

use crate::peer::{Mac, PeerName};

/// Weave's ageing time: 10 minutes.
pub const DEFAULT_AGEING_MS: u64 = 10 * 60 * 1000;
/// Default bound on the number of entries.
pub const DEFAULT_MAX_ENTRIES: usize = 64 * 1024;
/// When full, sweep expired entries at most this often.
const FULL_SWEEP_INTERVAL_MS: u64 = 1000;

/// Where a MAC lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MacOwner {
    /// Behind this host's own TAP.
    Local,
    /// Behind a remote peer's TAP.
    Peer(PeerName),
}

/// What [`MacTable::learn`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// The MAC was unknown (or its entry had expired) and is now recorded.
    New,
    /// The MAC was live with another owner; it now belongs to the new one.
    Moved { from: MacOwner },
    /// The MAC was live with the same owner; its age was reset.
    Refreshed,
    /// Multicast, broadcast or all-zero MACs are never learned as sources.
    Ignored,
    /// The table is full of live entries; the new MAC was not recorded.
    Full,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    owner: MacOwner,
    last_seen: u64,
}

/// A bounded, ageing MAC → owner table.
#[derive(Debug)]
pub struct MacTable {
    entries: HashMap<Mac, Entry>,
    ageing_ms: u64,
    max_entries: usize,
    last_full_sweep: Option<u64>,
}

/// Whether a MAC may be learned as a source: unicast and not all-zero.
pub fn is_learnable(mac: &Mac) -> bool {
    mac[0] & 0x01 == 0 && *mac != [0; 6]
}

impl MacTable {
    /// A table ageing entries after `ageing_ms`, holding at most
    /// [`DEFAULT_MAX_ENTRIES`].
    pub fn new(ageing_ms: u64) -> Self {
        Self::with_max_entries(ageing_ms, DEFAULT_MAX_ENTRIES)
    }

    /// A table holding at most `max_entries` MACs.
    pub fn with_max_entries(ageing_ms: u64, max_entries: usize) -> Self {
        MacTable { entries: HashMap::new(), ageing_ms, max_entries, last_full_sweep: None }
    }

    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    fn live(&self, e: &Entry, now_ms: u64) -> bool {
        now_ms.saturating_sub(e.last_seen) < self.ageing_ms
    }

    /// Records that `mac` was seen as a source behind `owner` at `now_ms`.
    pub fn learn(&mut self, mac: Mac, owner: MacOwner, now_ms: u64) -> Learned {
        if !is_learnable(&mac) {
            return Learned::Ignored;
        }
        let ageing = self.ageing_ms;
        if let Some(e) = self.entries.get_mut(&mac) {
            let was_live = now_ms.saturating_sub(e.last_seen) < ageing;
            let from = e.owner;
            e.owner = owner;
            e.last_seen = now_ms;
            return match (was_live, from == owner) {
                (false, _) => Learned::New,
                (true, true) => Learned::Refreshed,
                (true, false) => Learned::Moved { from },
            };
        }
        if self.entries.len() >= self.max_entries {
            let due = match self.last_full_sweep {
                None => true,
                Some(t) => now_ms.saturating_sub(t) >= FULL_SWEEP_INTERVAL_MS,
            };
            if !due {
                return Learned::Full;
            }
            self.last_full_sweep = Some(now_ms);
            self.expire(now_ms);
            if self.entries.len() >= self.max_entries {
                return Learned::Full;
            }
        }
        self.entries.insert(mac, Entry { owner, last_seen: now_ms });
        Learned::New
    }

    /// Who owns `mac`, unless unknown or expired.
    pub fn lookup(&self, mac: &Mac, now_ms: u64) -> Option<MacOwner> {
        let e = self.entries.get(mac)?;
        self.live(e, now_ms).then_some(e.owner)
    }

    /// Removes expired entries; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let before = self.entries.len();
        let ageing = self.ageing_ms;
        self.entries.retain(|_, e| now_ms.saturating_sub(e.last_seen) < ageing);
        before - self.entries.len()
    }

    /// Forgets every MAC behind `peer` (it left the mesh); returns how many.
    pub fn remove_peer(&mut self, peer: PeerName) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.owner != MacOwner::Peer(peer));
        before - self.entries.len()
    }

    /// Entries held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry held as (MAC, owner, last seen), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (Mac, MacOwner, u64)> + '_ {
        self.entries.iter().map(|(m, e)| (*m, e.owner, e.last_seen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = [0x02, 0, 0, 0, 0, 0xa];
    const B: Mac = [0x02, 0, 0, 0, 0, 0xb];
    const P1: MacOwner = MacOwner::Peer(PeerName(0x0200_0000_0001));
    const P2: MacOwner = MacOwner::Peer(PeerName(0x0200_0000_0002));

    #[test]
    fn learn_refresh_move() {
        let mut t = MacTable::new(DEFAULT_AGEING_MS);
        assert_eq!(t.lookup(&A, 0), None);
        assert_eq!(t.learn(A, MacOwner::Local, 0), Learned::New);
        assert_eq!(t.lookup(&A, 1), Some(MacOwner::Local));
        assert_eq!(t.learn(A, MacOwner::Local, 5), Learned::Refreshed);
        assert_eq!(t.learn(A, P1, 6), Learned::Moved { from: MacOwner::Local });
        assert_eq!(t.lookup(&A, 7), Some(P1));
        assert_eq!(t.learn(B, P1, 8), Learned::New);
        assert_eq!(t.len(), 2);
        let mut all: Vec<_> = t.iter().collect();
        all.sort_by_key(|e| e.0);
        assert_eq!(all, vec![(A, P1, 6), (B, P1, 8)]);
    }

    #[test]
    fn never_learns_group_or_zero_macs() {
        let mut t = MacTable::new(DEFAULT_AGEING_MS);
        for m in [[0xff; 6], [0x01, 0x00, 0x5e, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1], [0; 6]] {
            assert_eq!(t.learn(m, P1, 0), Learned::Ignored, "{m:?}");
            assert_eq!(t.lookup(&m, 0), None);
        }
        assert!(t.is_empty());
    }

    #[test]
    fn entries_age_out() {
        let mut t = MacTable::new(1000);
        t.learn(A, P1, 100);
        t.learn(B, P2, 600);
        assert_eq!(t.lookup(&A, 1099), Some(P1));
        assert_eq!(t.lookup(&A, 1100), None);
        // An expired entry learned again is new, even from another owner.
        assert_eq!(t.learn(A, P2, 1200), Learned::New);
        assert_eq!(t.lookup(&A, 1201), Some(P2));
        assert_eq!(t.expire(1600), 1);
        assert_eq!(t.lookup(&B, 1600), None);
        assert_eq!(t.len(), 1);
        // Time going backwards does not make entries immortal or panic.
        assert_eq!(t.lookup(&A, 0), Some(P2));
    }

    #[test]
    fn remove_peer_forgets_its_macs() {
        let mut t = MacTable::new(DEFAULT_AGEING_MS);
        t.learn(A, P1, 0);
        t.learn(B, P2, 0);
        t.learn([0x02, 0, 0, 0, 0, 0xc], P1, 0);
        assert_eq!(t.remove_peer(PeerName(0x0200_0000_0001)), 2);
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup(&B, 0), Some(P2));
    }

    #[test]
    fn bounded_under_a_flood_of_random_sources() {
        let mut t = MacTable::with_max_entries(1000, 100);
        let mac = |i: u32| {
            let b = i.to_be_bytes();
            [0x02, 0x42, b[0], b[1], b[2], b[3]]
        };
        for i in 0..100 {
            assert_eq!(t.learn(mac(i), P1, 0), Learned::New);
        }
        for i in 100..10_000 {
            assert_eq!(t.learn(mac(i), P2, 10), Learned::Full);
        }
        assert_eq!(t.len(), 100);
        // Known MACs still refresh and move while full.
        assert_eq!(t.learn(mac(5), P2, 20), Learned::Moved { from: P1 });
        assert_eq!(t.learn(mac(5), P2, 30), Learned::Refreshed);
        // Once entries age, a full table sweeps itself (at most once a second).
        assert_eq!(t.learn(mac(20_000), P2, 1010), Learned::New);
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(&mac(5), 1010), Some(P2));
    }
}
