//! The registry of per-peer traffic counters. The counters themselves live in
//! [`meshnet_proto::plane::traffic`] (the planes write them); this keeps a
//! peer's across reconnects and rekeys, until the peer is gone for good (no
//! longer in the topology, and no plane holds its counters).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use meshnet_proto::PeerName;

pub use meshnet_proto::plane::traffic::*;

/// Every known peer's counters, since the data plane first carried it: one
/// [`PeerTraffic`] per peer and queue (each queue's threads write their own),
/// summed when read. Locked when a peer is added, when the counters are read
/// and when gone peers are forgotten, never per frame.
#[derive(Default)]
pub struct TrafficBook {
    peers: Mutex<HashMap<PeerName, Vec<Arc<PeerTraffic>>>>,
}

impl TrafficBook {
    /// The counters of `peer` on queue `queue` (made on first use, kept for good).
    pub fn of(&self, peer: PeerName, queue: usize) -> Arc<PeerTraffic> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let v = peers.entry(peer).or_default();
        while v.len() <= queue {
            v.push(Arc::default());
        }
        v[queue].clone()
    }

    /// Forgets the counters of every peer that `keep` refuses and that no plane
    /// holds any more (a plane holds a peer's counters while it carries the
    /// peer). Returns how many peers were forgotten. Without this, every peer
    /// ever seen (each host reinstalled under a new name) stayed in `/metrics`.
    pub fn retain(&self, keep: impl Fn(PeerName) -> bool) -> usize {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let before = peers.len();
        peers.retain(|p, queues| keep(*p) || queues.iter().any(|t| Arc::strong_count(t) > 1));
        before - peers.len()
    }

    /// Every peer's counters, summed over the queues, in name order.
    pub fn snapshot(&self) -> Vec<(PeerName, TrafficSnapshot)> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = peers
            .iter()
            .map(|(p, queues)| {
                let mut sum = TrafficSnapshot::default();
                for t in queues {
                    let s = t.snapshot();
                    sum.tx_datagrams += s.tx_datagrams;
                    sum.tx_bytes += s.tx_bytes;
                    sum.tx_units += s.tx_units;
                    sum.rx_datagrams += s.rx_datagrams;
                    sum.rx_bytes += s.rx_bytes;
                    sum.relayed_units += s.relayed_units;
                    sum.relayed_bytes += s.relayed_bytes;
                    if sum.drops.is_empty() {
                        sum.drops = s.drops;
                    } else {
                        for (d, (_, n)) in sum.drops.iter_mut().zip(s.drops) {
                            d.1 += n;
                        }
                    }
                }
                (*p, sum)
            })
            .collect();
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
        let t = book.of(p, 0);
        t.tx.datagrams.add(3);
        t.tx.bytes.add(4000);
        t.rx.bytes.add(10);
        t.rx.refused[Refused::NotOnPath.index()].add(2);
        // The same counters come back for the same peer (a reconnect keeps them).
        book.of(p, 0).tx.datagrams.add(1);
        // Another queue's counters of the same peer add up.
        book.of(p, 2).rx.bytes.add(5);
        let snap = book.snapshot();
        assert_eq!(snap.len(), 1);
        let s = &snap[0].1;
        assert_eq!((s.tx_datagrams, s.tx_bytes, s.rx_bytes), (4, 4000, 15));
        assert!(s.drops.contains(&("not_on_path".to_string(), 2)));
        assert!(s.drops.contains(&("no_route".to_string(), 0)));
    }

    #[test]
    fn gone_peers_are_forgotten_once_no_plane_holds_them() {
        let book = TrafficBook::default();
        let (kept, gone, held) = (PeerName(1), PeerName(2), PeerName(3));
        book.of(kept, 0).tx.datagrams.add(1);
        book.of(gone, 0).tx.datagrams.add(1);
        book.of(gone, 1).tx.datagrams.add(1);
        let plane = book.of(held, 1);
        // Only `kept` is still in the topology; `held` is still carried by a plane.
        assert_eq!(book.retain(|p| p == kept), 1);
        let names: Vec<PeerName> = book.snapshot().into_iter().map(|(p, _)| p).collect();
        assert_eq!(names, vec![kept, held]);
        // Once the plane lets go, `held` goes too; `kept` stays with its counts.
        drop(plane);
        assert_eq!(book.retain(|p| p == kept), 1);
        let snap = book.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!((snap[0].0, snap[0].1.tx_datagrams), (kept, 1));
        // Many peers come and go (hosts replaced under new names): the book stays small.
        for n in 100..1100 {
            book.of(PeerName(n), 0).rx.bytes.add(1);
            book.retain(|p| p == kept);
        }
        assert_eq!(book.snapshot().len(), 1);
    }
}
