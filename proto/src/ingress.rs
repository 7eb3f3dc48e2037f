//! Which received frames to believe: the origin a frame's inner header claims
//! must fit the direct peer whose session it arrived on, and its TTL is cut to
//! what that peer could legitimately have left in it.
//!
//! The AEAD only proves which *direct peer* sealed a datagram; the inner
//! header's `src` (the origin, whose MACs the receiver learns and along whose
//! broadcast tree it passes broadcasts on) is that peer's word. A member could
//! otherwise claim any origin, making the mesh learn another peer's MACs as
//! living behind a peer of its choosing, or inject broadcasts into a tree it is
//! not part of. [`admit`] decides, per frame, from what the topology says (see
//! [`crate::topology::Topology::upstream`]):
//!
//! - **Unicast** from origin `S` arriving from direct peer `P`: accepted when
//!   `S == P`, or when `P` is one of my neighbours one hop closer to `S`. A
//!   relayed frame follows a shortest path (every relay hands it to its next
//!   hop, which is one hop closer to the destination), so its last relay is
//!   always such a neighbour while the views agree. This is more lenient than
//!   "P is my next hop towards S" (which is wrong: S picks its path by *its*
//!   tie-breaking, which need not mirror mine) and stricter than "S is any known
//!   peer" (which lets any member speak for anyone).
//! - **Broadcast** from `S`: accepted only from my parent in `S`'s broadcast
//!   tree, the smallest of those neighbours (the tree every router computes).
//!   A broadcast from `S` directly when I am not its child is refused too.
//! - Nobody may claim to be me.
//! - **TTL**: the originator puts [`MAX_TTL`] and every relay takes one off,
//!   so a frame from an origin `h` hops away carries at most
//!   `MAX_TTL + 1 - h`; a higher TTL is cut to that (relays of a clamped frame
//!   then stop in time, whatever a peer wrote).
//!
//! While the topology is changing two routers may briefly disagree and a
//! legitimate relayed frame be refused; it is counted like any other refusal.

use std::collections::HashMap;

use crate::peer::PeerName;
use crate::wire::datagram::InnerHeader;

/// The TTL an originator puts in every frame: the most hops a frame may take.
pub const MAX_TTL: u8 = 16;

/// What this router knows about one origin: how far away it is and which of
/// its direct peers are one hop closer to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upstream {
    /// Hops from me to the origin (1 for a direct peer).
    pub hops: u32,
    /// My neighbours one hop closer to the origin, sorted. The first is my
    /// parent in the origin's broadcast tree.
    pub via: Vec<PeerName>,
}

impl Upstream {
    /// My parent in the origin's broadcast tree.
    pub fn parent(&self) -> Option<PeerName> {
        self.via.first().copied()
    }
}

/// Per origin (never me), what [`admit`] needs.
pub type UpstreamMap = HashMap<PeerName, Upstream>;

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    #[error("claims to come from this router")]
    OriginIsMe,
    #[error("relayed from an origin the topology does not reach")]
    UnknownOrigin,
    #[error("the peer it came from is not one hop closer to its origin")]
    NotOnPath,
    #[error("a broadcast not from our parent in its origin's tree")]
    NotParent,
}

impl Refused {
    /// Every reason, in the order of [`index`](Self::index).
    pub const ALL: [Refused; 4] = [Refused::OriginIsMe, Refused::UnknownOrigin, Refused::NotOnPath, Refused::NotParent];

    /// A small dense index, for counters.
    pub fn index(self) -> usize {
        match self {
            Refused::OriginIsMe => 0,
            Refused::UnknownOrigin => 1,
            Refused::NotOnPath => 2,
            Refused::NotParent => 3,
        }
    }

    /// The name of its counter in the data-plane statistics.
    pub fn counter_name(self) -> &'static str {
        match self {
            Refused::OriginIsMe => "refused_origin_is_me",
            Refused::UnknownOrigin => "refused_unknown_origin",
            Refused::NotOnPath => "refused_not_on_path",
            Refused::NotParent => "refused_broadcast_not_parent",
        }
    }
}

/// A frame accepted, with the TTL it is to be handled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// The header with the TTL clamped.
    pub hdr: InnerHeader,
    /// The TTL was higher than the sender could legitimately use.
    pub clamped: bool,
}

/// Decides whether to believe a frame with header `hdr` that arrived on the
/// session of direct peer `sender`, at router `me`. `upstream` looks an
/// origin up (see [`Upstream`]); it is only called for relayed and broadcast
/// frames, so the common direct unicast costs no lookup.
pub fn admit<'a>(
    me: PeerName,
    sender: PeerName,
    hdr: &InnerHeader,
    upstream: impl FnOnce(PeerName) -> Option<&'a Upstream>,
) -> Result<Admitted, Refused> {
    let src = hdr.src;
    if src == me {
        return Err(Refused::OriginIsMe);
    }
    let max_ttl = if src == sender && !hdr.broadcast {
        MAX_TTL
    } else {
        let Some(up) = upstream(src) else { return Err(Refused::UnknownOrigin) };
        let ok = match hdr.broadcast {
            true => up.parent() == Some(sender),
            false => up.via.binary_search(&sender).is_ok(),
        };
        if !ok {
            return Err(if hdr.broadcast { Refused::NotParent } else { Refused::NotOnPath });
        }
        max_ttl_from(up.hops)
    };
    let clamped = hdr.ttl > max_ttl;
    Ok(Admitted { hdr: InnerHeader { ttl: hdr.ttl.min(max_ttl), ..*hdr }, clamped })
}

/// The highest TTL a frame from an origin `hops` away can arrive with.
pub fn max_ttl_from(hops: u32) -> u8 {
    let relays = hops.saturating_sub(1).min(MAX_TTL as u32) as u8;
    MAX_TTL - relays
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{ConnInfo, PeerInfo, Topology};

    fn name(n: u64) -> PeerName {
        PeerName(0x0200_0000_0000 | n)
    }

    fn hdr(src: u64, dst: Option<u64>, ttl: u8) -> InnerHeader {
        match dst {
            Some(d) => InnerHeader { ttl, broadcast: false, src: name(src), dst: name(d) },
            None => InnerHeader { ttl, broadcast: true, src: name(src), dst: PeerName::BROADCAST },
        }
    }

    /// The topology of `edges` (all established both ways) seen from peer `me`.
    fn topo(me: u64, edges: &[(u64, u64)], nodes: u64) -> Topology {
        let info = |n: u64| PeerInfo {
            name: name(n),
            nickname: format!("h{n}"),
            uid: n,
            version: 1,
            software: String::new(),
            mtu: 0,
            connections: edges
                .iter()
                .filter_map(|&(a, b)| match (a == n, b == n) {
                    (true, _) => Some(b),
                    (_, true) => Some(a),
                    _ => None,
                })
                .map(|p| ConnInfo {
                    peer: name(p),
                    addr: ([10, 0, 0, p as u8], 6783).into(),
                    outbound: n < p,
                    established: true,
                })
                .collect(),
        };
        let mut t = Topology::new(info(me));
        t.merge((1..=nodes).filter(|&n| n != me).map(info).collect()).unwrap();
        t
    }

    fn check(t: &Topology, me: u64, from: u64, h: InnerHeader) -> Result<Admitted, Refused> {
        let up = t.upstream();
        admit(name(me), name(from), &h, |s| up.get(&s))
    }

    #[test]
    fn direct_unicast_needs_no_topology_and_keeps_a_legal_ttl() {
        let empty = UpstreamMap::new();
        let h = hdr(2, Some(1), MAX_TTL);
        let a = admit(name(1), name(2), &h, |s| empty.get(&s)).unwrap();
        assert_eq!((a.hdr, a.clamped), (h, false));
        // A higher TTL than any originator uses is cut.
        let a = admit(name(1), name(2), &hdr(2, Some(1), 255), |s| empty.get(&s)).unwrap();
        assert_eq!((a.hdr.ttl, a.clamped), (MAX_TTL, true));
        // Claiming to be the receiver, or to be someone else without a topology, is refused.
        assert_eq!(admit(name(1), name(2), &hdr(1, Some(3), 4), |s| empty.get(&s)), Err(Refused::OriginIsMe));
        assert_eq!(admit(name(1), name(2), &hdr(3, Some(1), 4), |s| empty.get(&s)), Err(Refused::UnknownOrigin));
        assert_eq!(admit(name(1), name(2), &hdr(2, None, 4), |s| empty.get(&s)), Err(Refused::UnknownOrigin));
    }

    /// The square of two-hop paths from the module docs: 1's next hop towards 6
    /// is 4 (smaller than 5), but 6 sends to 1 through 2 then 5 (2 < 3), so
    /// frames from 6 reach 1 from 5. Both must be accepted; nobody else's.
    ///
    /// ```text
    ///   6 - 2 - 5 - 1
    ///   6 - 3 - 4 - 1
    /// ```
    #[test]
    fn relayed_unicast_is_accepted_from_any_neighbour_one_hop_closer() {
        let edges = [(6, 2), (2, 5), (5, 1), (6, 3), (3, 4), (4, 1)];
        let t = topo(1, &edges, 6);
        assert_eq!(t.routes()[&name(6)], name(4), "1's own next hop towards 6");
        let six = &t.upstream()[&name(6)];
        assert_eq!((six.hops, six.via.clone()), (3, vec![name(4), name(5)]));
        for via in [4, 5] {
            let a = check(&t, 1, via, hdr(6, Some(1), MAX_TTL - 2)).unwrap();
            assert_eq!((a.hdr.ttl, a.clamped), (MAX_TTL - 2, false));
        }
        // Two relays took at least two off: more is clamped.
        let a = check(&t, 1, 5, hdr(6, Some(1), MAX_TTL)).unwrap();
        assert_eq!((a.hdr.ttl, a.clamped), (MAX_TTL - 2, true));
        // 2 is a peer of the mesh, but not my neighbour: it cannot hand me 6's frames
        // (a session with it would be a direct connection, which the topology lacks).
        assert_eq!(check(&t, 1, 2, hdr(6, Some(1), 10)), Err(Refused::NotOnPath));
        // 4 speaking for 5 (its own neighbour... of mine, but farther from 5 than I am).
        assert_eq!(check(&t, 1, 4, hdr(5, Some(1), 10)), Err(Refused::NotOnPath));
        // A frame I relay: from 5, origin 2, for 4.
        assert!(check(&t, 1, 5, hdr(2, Some(4), 15)).is_ok());
        assert_eq!(check(&t, 1, 4, hdr(2, Some(5), 15)), Err(Refused::NotOnPath));
        // An origin the topology does not know.
        assert_eq!(check(&t, 1, 5, hdr(9, Some(1), 15)), Err(Refused::UnknownOrigin));
    }

    #[test]
    fn broadcasts_only_from_the_parent_in_the_origins_tree() {
        let edges = [(6, 2), (2, 5), (5, 1), (6, 3), (3, 4), (4, 1), (1, 7)];
        let t = topo(1, &edges, 7);
        // In 6's tree, 1's parent is the smaller of 4 and 5.
        assert!(check(&t, 1, 4, hdr(6, None, MAX_TTL - 2)).is_ok());
        assert_eq!(check(&t, 1, 5, hdr(6, None, MAX_TTL - 2)), Err(Refused::NotParent));
        // A neighbour's own broadcasts come straight from it.
        assert!(check(&t, 1, 7, hdr(7, None, MAX_TTL)).is_ok());
        // Not from it through someone else, nor from someone else directly.
        assert_eq!(check(&t, 1, 4, hdr(7, None, MAX_TTL)), Err(Refused::NotParent));
        assert_eq!(check(&t, 1, 6, hdr(6, None, MAX_TTL)), Err(Refused::NotParent), "straight from an origin whose child I am not");
        let a = check(&t, 1, 7, hdr(7, None, 200)).unwrap();
        assert_eq!((a.hdr.ttl, a.clamped), (MAX_TTL, true));
        // My parents agree with broadcast_children: I am my parent's child in that tree.
        let up = t.upstream();
        for (origin, u) in &up {
            let from_parent = topo(u.parent().unwrap().0 & 0xff, &edges, 7).broadcast_children();
            assert!(from_parent[origin].contains(&name(1)), "origin {origin}: parent {:?}", u.parent());
        }
    }

    #[test]
    fn max_ttl_by_distance() {
        assert_eq!(max_ttl_from(1), MAX_TTL);
        assert_eq!(max_ttl_from(2), MAX_TTL - 1);
        assert_eq!(max_ttl_from(MAX_TTL as u32), 1);
        assert_eq!(max_ttl_from(MAX_TTL as u32 + 1), 0);
        assert_eq!(max_ttl_from(u32::MAX), 0);
        assert_eq!(max_ttl_from(0), MAX_TTL);
    }
}
