//! `--conn-limit` for connections that completed their handshake: which are
//! taken, which connection makes room for a newcomer with too few, and which
//! connections a router over its limit gives up.
//!
//! The limit counts established connections (and, in control, our own dials).
//! A router at its limit refuses an inbound connection, first telling the
//! newcomer its topology so that the newcomer's discovery can dial others
//! (control does that). That alone can lock a newcomer out: with discovery every
//! router fills its slots, and a newcomer whose every dial is refused stays
//! alone. So a newcomer says in its Hello how few connections it has
//! ([`Need`]: none, `CAP_LONELY`; one, `CAP_ONE_CONNECTION`), and a full router:
//! - takes a newcomer with none or one connection if it can shed a *redundant*
//!   connection: one whose peer stays reachable by another path and keeps at
//!   least two other connections (so shedding never cuts anyone off nor makes
//!   a needy peer);
//! - otherwise **always takes a lonely newcomer**, going over its limit;
//! - takes a newcomer it cannot reach by other links as if it were lonely
//!   (the connection joins two meshes: after a partition heals, the routers
//!   on each side have forgotten the other's, and only connect targets, often
//!   full routers, lead across);
//! - refuses the rest.
//!
//! Discovery does not dial peers whose entry lists as many connections as our
//! own limit unless we have fewer than two ([`worth_dialling`]), and a refusal
//! carries the topology only to a newcomer with fewer than two connections
//! (the others hear it from their neighbours): a partial mesh at rest makes
//! no dials.
//!
//! A router over its limit sheds a connection as soon as one is redundant in a
//! weaker sense ([`excess`]: the peer stays reachable and keeps one other
//! connection), so going over is temporary: the newcomer it took has free
//! slots, learns the topology from it, and its further dials are taken (it
//! has one connection, so full routers make room for it).
//!
//! Why every router ends up connected: a newcomer dials the addresses it was
//! given. Each dial reaches a router that has a free slot (taken), or is full
//! and the newcomer is lonely (taken), or is full and the newcomer has a
//! connection already (it is connected). Shedding only drops connections whose
//! peer stays reachable by the path checked, so the mesh stays one component; a
//! shed peer that does end up lonely (the topology it was judged on was stale)
//! is lonely in its next Hello and taken.
//!
//! Never does: I/O, reading the clock, closing connections (it says which).

use std::collections::HashSet;

use crate::topology::{Graph, Topology};
use crate::PeerName;

/// How many connections a newcomer has, as its Hello says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// None: never refused.
    Lonely,
    /// One: taken if a redundant connection can make room.
    One,
    /// More: refused by a full router.
    Enough,
}

impl Need {
    /// From a Hello's capability bits.
    pub fn from_capabilities(caps: u32) -> Need {
        if caps & crate::handshake::CAP_LONELY != 0 {
            Need::Lonely
        } else if caps & crate::handshake::CAP_ONE_CONNECTION != 0 {
            Need::One
        } else {
            Need::Enough
        }
    }

    /// The capability bits that say we have `established` connections.
    pub fn capabilities(established: usize) -> u32 {
        match established {
            0 => crate::handshake::CAP_LONELY,
            1 => crate::handshake::CAP_ONE_CONNECTION,
            _ => 0,
        }
    }
}

/// An established connection as [`admit_inbound`] and [`excess`] see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// The caller's connection id.
    pub conn: u64,
    pub peer: PeerName,
    /// Made by our discovery (our dial of a gossiped address, not a connect
    /// target): shed before the others.
    pub discovered: bool,
    /// A connect target of ours: never shed.
    pub target: bool,
    /// Connections the peer's topology entry lists (ours included).
    pub peer_connections: usize,
}

/// What to do with an inbound connection that completed its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Accept,
    /// Accept, and close connection `shed` (its peer stays reachable).
    AcceptShedding { shed: u64 },
    /// At the limit and the newcomer has enough connections, or one and
    /// nothing can make room.
    Refuse,
}

/// The connection to shed among `held` whose peer stays reachable without it
/// and keeps at least `keeps` other connections: discovered ones first, then
/// by peer name. Connect targets are never shed.
fn redundant(held: &[Held], keeps: usize, graph: &Graph) -> Option<u64> {
    let mut candidates: Vec<&Held> =
        held.iter().filter(|h| !h.target && h.peer_connections > keeps).collect();
    candidates.sort_by_key(|h| (!h.discovered, h.peer));
    candidates.into_iter().find(|h| graph.reachable_avoiding_direct(h.peer)).map(|h| h.conn)
}

/// Judges an inbound connection from `peer`, which completed its handshake.
/// `held`: our established connections; `replaces`: the peer has one of them
/// already (the new one takes its slot); `need`: what its Hello says;
/// `graph`: the links routes use now. A peer we cannot reach otherwise is
/// taken like a lonely one: the connection joins two meshes (a healed partition).
pub fn admit_inbound(limit: usize, held: &[Held], replaces: bool, need: Need, peer: PeerName, graph: &Graph) -> Admit {
    if replaces || held.len() < limit {
        return Admit::Accept;
    }
    let bridges = !graph.reachable_avoiding_direct(peer);
    if need == Need::Enough && !bridges {
        return Admit::Refuse;
    }
    match redundant(held, 2, graph) {
        Some(shed) => Admit::AcceptShedding { shed },
        None if need == Need::Lonely || bridges => Admit::Accept,
        None => Admit::Refuse,
    }
}

/// Whether discovery should dial a peer whose entry lists `peer_connections`:
/// not when that is at our own limit (it would most likely refuse us: limits
/// are usually the same everywhere), unless we have fewer than two connections
/// (then a full router makes room). Without this, routers below their limit
/// keep dialling full ones, each dial a handshake and a refusal.
pub fn worth_dialling(established: usize, limit: usize, peer_connections: usize) -> bool {
    established < 2 || peer_connections < limit
}

/// The addresses discovery may dial (as `ip:port`): those `topology` reports
/// for peers we have no connection with (`connected`), not ourselves, and
/// [`worth_dialling`] with our `established` connections and `limit`.
pub fn discovery_addresses(
    topology: &Topology,
    connected: &HashSet<PeerName>,
    established: usize,
    limit: usize,
) -> Vec<String> {
    let me = topology.me().name;
    let worth = |p: PeerName| worth_dialling(established, limit, topology.get(p).map_or(0, |i| i.connections.len()));
    topology
        .discovery_candidates()
        .into_iter()
        .filter(|&(peer, _)| peer != me && !connected.contains(&peer) && worth(peer))
        .map(|(_, addr)| addr.to_string())
        .collect()
}

/// Addresses (`ip:port`, as `topology` lists them) of peers already at our
/// limit: a connect target among them would refuse us (see [`worth_dialling`]).
pub fn full_addresses(topology: &Topology, established: usize, limit: usize) -> HashSet<String> {
    topology
        .peers()
        .flat_map(|p| p.connections.iter())
        .filter(|c| topology.get(c.peer).is_some_and(|p| !worth_dialling(established, limit, p.connections.len())))
        .map(|c| c.addr.to_string())
        .collect()
}

/// Slots our dials may use: the free ones, or one when a connect target that
/// is due has no peer in our mesh (`target_outside`): after a partition heals,
/// routers that refilled their slots on their side would never dial across
/// again; the target takes the connection as a bridge (see [`admit_inbound`])
/// and [`excess`] trims what is redundant afterwards.
pub fn dial_slots(limit: usize, used: usize, target_outside: bool) -> usize {
    limit.saturating_sub(used).max(usize::from(target_outside))
}

/// Over the limit (a lonely newcomer was taken): a connection to shed now,
/// if one's peer stays reachable without it and keeps another connection.
pub fn excess(limit: usize, held: &[Held], graph: &Graph) -> Option<u64> {
    if held.len() <= limit {
        return None;
    }
    redundant(held, 1, graph)
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

    /// Me (1) connected to 2, 3, 4; 2 and 3 also connected to each other; 4
    /// only to me; 5 (not to me) to 2 and 3.
    fn graph() -> Graph {
        let mut t = Topology::new(info(1, &[2, 3, 4]));
        t.merge(vec![info(2, &[1, 3, 5]), info(3, &[1, 2, 5]), info(4, &[1]), info(5, &[2, 3])]).unwrap();
        t.graph()
    }

    const NEW: PeerName = PeerName(5);
    const STRANGER: PeerName = PeerName(9);

    fn held(peers: &[(u64, bool)]) -> Vec<Held> {
        peers
            .iter()
            .map(|&(p, discovered)| Held { conn: p * 100, peer: name(p), discovered, target: false, peer_connections: 3 })
            .collect()
    }

    #[test]
    fn below_the_limit_or_replacing_accepts() {
        let g = graph();
        let all = held(&[(2, true), (3, true), (4, true)]);
        assert_eq!(admit_inbound(4, &all, false, Need::Enough, NEW, &g), Admit::Accept);
        assert_eq!(admit_inbound(3, &all, true, Need::Enough, NEW, &g), Admit::Accept);
    }

    #[test]
    fn a_full_router_refuses_a_connected_newcomer() {
        let g = graph();
        assert_eq!(admit_inbound(3, &held(&[(2, true), (3, true), (4, true)]), false, Need::Enough, NEW, &g), Admit::Refuse);
        assert_eq!(admit_inbound(0, &[], false, Need::Enough, NEW, &g), Admit::Refuse);
        let mut full = held(&[(2, false), (3, false), (4, false)]);
        for h in &mut full {
            h.target = true;
        }
        assert_eq!(admit_inbound(3, &full, false, Need::Enough, STRANGER, &g), Admit::Accept, "a peer we cannot reach joins two meshes");
        assert_eq!(
            admit_inbound(3, &held(&[(2, true), (3, true), (4, true)]), false, Need::Enough, STRANGER, &g),
            Admit::AcceptShedding { shed: 200 }
        );
    }

    #[test]
    fn a_needy_newcomer_is_accepted_shedding_a_peer_that_stays_reachable() {
        let g = graph();
        assert!(g.reachable_avoiding_direct(name(2)) && g.reachable_avoiding_direct(name(3)));
        assert!(!g.reachable_avoiding_direct(name(4)), "4 hangs on our link alone");
        assert!(!g.reachable_avoiding_direct(name(9)), "unknown");
        let all = held(&[(4, true), (3, true), (2, true)]);
        assert_eq!(admit_inbound(3, &all, false, Need::Lonely, NEW, &g), Admit::AcceptShedding { shed: 200 });
        assert_eq!(admit_inbound(3, &all, false, Need::One, NEW, &g), Admit::AcceptShedding { shed: 200 });
        // Discovered connections go first; connect targets never.
        let mut some = held(&[(4, true), (3, true), (2, false)]);
        assert_eq!(admit_inbound(3, &some, false, Need::One, NEW, &g), Admit::AcceptShedding { shed: 300 });
        some[1].target = true;
        assert_eq!(admit_inbound(3, &some, false, Need::One, NEW, &g), Admit::AcceptShedding { shed: 200 });
        some[2].target = true;
        assert_eq!(admit_inbound(3, &some, false, Need::One, NEW, &g), Admit::Refuse, "nothing can make room");
        assert_eq!(admit_inbound(3, &some, false, Need::Lonely, NEW, &g), Admit::Accept, "over the limit rather than lock out");
        // A peer that would be left with fewer than two connections is not shed for a newcomer.
        let mut thin = held(&[(4, true), (3, true), (2, true)]);
        for h in &mut thin {
            h.peer_connections = 2;
        }
        assert_eq!(admit_inbound(3, &thin, false, Need::One, NEW, &g), Admit::Refuse);
        assert_eq!(excess(3, &thin, &g), None, "at the limit: nothing to shed");
        assert_eq!(excess(2, &thin, &g), Some(200), "over it: a reachable peer keeping one other connection");
    }

    #[test]
    fn discovery_skips_full_peers_unless_we_are_needy() {
        assert!(worth_dialling(5, 10, 9));
        assert!(!worth_dialling(5, 10, 10));
        assert!(!worth_dialling(2, 10, 12));
        assert!(worth_dialling(1, 10, 12));
        assert!(worth_dialling(0, 10, 10));
    }

    #[test]
    fn a_target_outside_the_mesh_gets_a_slot() {
        assert_eq!(dial_slots(10, 7, false), 3);
        assert_eq!(dial_slots(10, 10, false), 0);
        assert_eq!(dial_slots(10, 10, true), 1);
        assert_eq!(dial_slots(10, 11, true), 1);
        assert_eq!(dial_slots(10, 8, true), 2);
    }

    #[test]
    fn needs_round_trip_through_capabilities() {
        for (n, need) in [(0, Need::Lonely), (1, Need::One), (2, Need::Enough), (9, Need::Enough)] {
            assert_eq!(Need::from_capabilities(Need::capabilities(n) | crate::handshake::CAP_SUPERFRAMES), need);
        }
    }
}
