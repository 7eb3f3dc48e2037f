//! `--conn-limit` for connections that completed their handshake: which are
//! taken, and which connection makes room for a newcomer that has no other.
//!
//! The limit counts established connections (and, in control, our own dials).
//! A router at its limit refuses an inbound connection, first telling the
//! newcomer its topology so that the newcomer's discovery can dial others
//! (control does that). That alone can lock a newcomer out: with discovery every
//! router fills its slots, and a newcomer whose every dial is refused stays
//! alone. So a newcomer with no established connection says so in its Hello
//! (`CAP_LONELY`), and a full router **always accepts a lonely newcomer**: it
//! makes room by shedding one of its own discovery-made connections whose peer
//! stays reachable by another path (so the shed peer is not cut off), and if
//! none qualifies it goes one over its limit until a connection ends.
//!
//! Why every router ends up connected: a newcomer dials the addresses it was
//! given. Each dial reaches a router that either has a free slot (accepted), or
//! is full and the newcomer is lonely (accepted), or is full and the newcomer
//! has a connection already (refused: it is connected). Shedding never
//! disconnects the shed peer from us (it stays reachable by the path checked),
//! so the mesh stays one component; a shed peer that does end up lonely (the
//! topology it was judged on was stale) is lonely in its next Hello and accepted.
//!
//! Never does: I/O, reading the clock, closing connections (it says which).

use crate::topology::Graph;
use crate::PeerName;

/// An established connection as [`admit_inbound`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// The caller's connection id.
    pub conn: u64,
    pub peer: PeerName,
    /// Made by our discovery (our dial of a gossiped address, not a connect
    /// target): the only kind shed for a lonely newcomer.
    pub discovered: bool,
}

/// What to do with an inbound connection that completed its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Accept,
    /// Accept, and close connection `shed` (its peer stays reachable).
    AcceptShedding { shed: u64 },
    /// At the limit and the newcomer has other connections.
    Refuse,
}

/// Judges an inbound connection from a peer that completed its handshake.
/// `held`: our established connections; `replaces`: the peer has one of them
/// already (the new one takes its slot); `lonely`: its Hello says it has no
/// other connection; `graph`: the links routes use now.
pub fn admit_inbound(limit: usize, held: &[Held], replaces: bool, lonely: bool, graph: &Graph) -> Admit {
    if replaces || held.len() < limit {
        return Admit::Accept;
    }
    if !lonely {
        return Admit::Refuse;
    }
    // The smallest peer name among those that stay reachable (stable, cheap).
    let mut candidates: Vec<&Held> = held.iter().filter(|h| h.discovered).collect();
    candidates.sort_by_key(|h| h.peer);
    match candidates.into_iter().find(|h| graph.reachable_avoiding_direct(h.peer)) {
        Some(h) => Admit::AcceptShedding { shed: h.conn },
        None => Admit::Accept,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{ConnInfo, PeerInfo, Topology};

    fn name(n: u64) -> PeerName {
        PeerName(n)
    }

    fn info(n: u64, conns: &[u64]) -> PeerInfo {
        PeerInfo {
            name: name(n),
            nickname: String::new(),
            uid: n,
            version: 1,
            software: String::new(),
            mtu: 0,
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

    /// Me (1) connected to 2, 3, 4; 2 and 3 also connected to each other; 4 only to me.
    fn graph() -> Graph {
        let mut t = Topology::new(info(1, &[2, 3, 4]));
        t.merge(vec![info(2, &[1, 3]), info(3, &[1, 2]), info(4, &[1])]).unwrap();
        t.graph()
    }

    fn held(peers: &[(u64, bool)]) -> Vec<Held> {
        peers.iter().map(|&(p, discovered)| Held { conn: p * 100, peer: name(p), discovered }).collect()
    }

    #[test]
    fn below_the_limit_or_replacing_accepts() {
        let g = graph();
        assert_eq!(admit_inbound(4, &held(&[(2, true), (3, true), (4, true)]), false, false, &g), Admit::Accept);
        assert_eq!(admit_inbound(3, &held(&[(2, true), (3, true), (4, true)]), true, false, &g), Admit::Accept);
    }

    #[test]
    fn a_full_router_refuses_a_connected_newcomer() {
        let g = graph();
        assert_eq!(admit_inbound(3, &held(&[(2, true), (3, true), (4, true)]), false, false, &g), Admit::Refuse);
        assert_eq!(admit_inbound(0, &[], false, false, &g), Admit::Refuse);
    }

    #[test]
    fn a_lonely_newcomer_is_accepted_shedding_a_peer_that_stays_reachable() {
        let g = graph();
        assert!(g.reachable_avoiding_direct(name(2)) && g.reachable_avoiding_direct(name(3)));
        assert!(!g.reachable_avoiding_direct(name(4)), "4 hangs on our link alone");
        assert!(!g.reachable_avoiding_direct(name(9)), "unknown");
        let all = held(&[(4, true), (3, true), (2, true)]);
        assert_eq!(admit_inbound(3, &all, false, true, &g), Admit::AcceptShedding { shed: 200 });
        // Connect targets are never shed; 4 would be cut off.
        let some = held(&[(4, true), (3, false), (2, false)]);
        assert_eq!(admit_inbound(3, &some, false, true, &g), Admit::Accept, "over the limit rather than lock out");
        let only3 = held(&[(4, true), (3, true), (2, false)]);
        assert_eq!(admit_inbound(3, &only3, false, true, &g), Admit::AcceptShedding { shed: 300 });
    }
}
