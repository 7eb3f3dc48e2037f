//! The registry of per-peer traffic counters. The counters themselves live in
//! [`meshnet_proto::plane::traffic`] (the planes write them); this keeps every
//! peer's for as long as the data plane runs, across reconnects and rekeys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use meshnet_proto::PeerName;

pub use meshnet_proto::plane::traffic::*;

/// Every peer's counters, ever since the data plane started. Locked when a
/// peer is added and when the counters are read, never per frame.
#[derive(Default)]
pub struct TrafficBook {
    peers: Mutex<HashMap<PeerName, Arc<PeerTraffic>>>,
}

impl TrafficBook {
    /// The counters of `peer` (made on first use, kept for good).
    pub fn of(&self, peer: PeerName) -> Arc<PeerTraffic> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).entry(peer).or_default().clone()
    }

    /// Every peer's counters, in name order.
    pub fn snapshot(&self) -> Vec<(PeerName, TrafficSnapshot)> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = peers.iter().map(|(p, t)| (*p, t.snapshot())).collect();
        v.sort_by_key(|(p, _)| *p);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshnet_proto::ingress::Refused;

    #[test]
    fn counters_add_and_snapshot() {
        let book = TrafficBook::default();
        let p = PeerName(7);
        let t = book.of(p);
        t.tx.datagrams.add(3);
        t.tx.bytes.add(4000);
        t.rx.bytes.add(10);
        t.rx.refused[Refused::NotOnPath.index()].add(2);
        // The same counters come back for the same peer (a reconnect keeps them).
        book.of(p).tx.datagrams.add(1);
        let snap = book.snapshot();
        assert_eq!(snap.len(), 1);
        let s = &snap[0].1;
        assert_eq!((s.tx_datagrams, s.tx_bytes, s.rx_bytes), (4, 4000, 10));
        assert!(s.drops.contains(&("not_on_path".to_string(), 2)));
        assert!(s.drops.contains(&("no_route".to_string(), 0)));
    }
}
