//! Which peer owns which MAC, as the forwarding threads learn it, for readers
//! outside them (the trusted-subnet sync in `control`, which points the
//! bridge at the kernel VXLAN device for MACs of trusted peers).
//!
//! Owns a small map behind a mutex that the RX thread writes only when it
//! (re)announces a MAC to the TX thread (a new MAC, a MAC that moved, or once a
//! minute per MAC), and the TX thread only when a MAC it knew behind a peer
//! turns up behind the TAP. Never on the per-frame path otherwise. Bounded: at
//! [`MAX_ENTRIES`] the oldest entry makes room.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use meshnet_proto::{Mac, PeerName};

/// Most MACs remembered.
pub const MAX_ENTRIES: usize = 64 * 1024;

/// Where a MAC was last seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Peer(PeerName),
    /// Behind this router's own TAP (it moved here).
    Local,
}

/// The shared MAC → owner map (see the module docs).
#[derive(Default)]
pub struct MacOwners {
    map: Mutex<HashMap<Mac, (Owner, u64)>>,
    /// Bumped on every change, so readers skip unchanged snapshots.
    generation: AtomicU64,
}

impl MacOwners {
    /// Records that `mac` lives behind `owner` (at `now_ms`, any monotonic clock).
    pub fn note(&self, mac: Mac, owner: Owner, now_ms: u64) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let changed = m.get(&mac).map(|e| e.0) != Some(owner);
        if !m.contains_key(&mac) && m.len() >= MAX_ENTRIES {
            if let Some(oldest) = m.iter().min_by_key(|(_, e)| e.1).map(|(k, _)| *k) {
                m.remove(&oldest);
            }
        }
        m.insert(mac, (owner, now_ms));
        if changed {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forgets every MAC of `peer` (its connection ended).
    pub fn forget_peer(&self, peer: PeerName) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let before = m.len();
        m.retain(|_, e| e.0 != Owner::Peer(peer));
        if m.len() != before {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Every MAC owned by a peer, with its owner.
    pub fn of_peers(&self) -> Vec<(Mac, PeerName)> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter_map(|(mac, e)| match e.0 {
                Owner::Peer(p) => Some((*mac, p)),
                Owner::Local => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_move_and_are_forgotten() {
        let o = MacOwners::default();
        let a = [2, 0, 0, 0, 0, 1];
        let g0 = o.generation();
        o.note(a, Owner::Peer(PeerName(5)), 1);
        assert_eq!(o.of_peers(), vec![(a, PeerName(5))]);
        let g1 = o.generation();
        assert!(g1 > g0);
        o.note(a, Owner::Peer(PeerName(5)), 2);
        assert_eq!(o.generation(), g1, "a refresh is no change");
        o.note(a, Owner::Local, 3);
        assert!(o.of_peers().is_empty());
        o.note(a, Owner::Peer(PeerName(6)), 4);
        o.forget_peer(PeerName(6));
        assert!(o.of_peers().is_empty());
    }
}
