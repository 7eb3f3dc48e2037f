//! Bytes -> bincode `Vec<PeerInfo>` (under the wire decode limit) -> merge into a
//! topology that already knows a few peers -> routes, discovery, garbage
//! collection. Nothing may panic, a refused update must change nothing, every
//! route must lead to a known peer through a direct neighbour, and the broadcast
//! trees must fit the routes.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use meshnet_proto::topology::{ConnInfo, PeerInfo, Topology};
use meshnet_proto::wire::control::decode_gossip;
use meshnet_proto::PeerName;

fn peer(n: u64, links: &[u64]) -> PeerInfo {
    PeerInfo {
        name: PeerName(0x0200_0000_0000 | n),
        nickname: format!("p{n}"),
        uid: n,
        version: 1,
        software: "meshnet fuzz".into(),
        mtu: 1376,
        connections: links
            .iter()
            .map(|&l| ConnInfo {
                peer: PeerName(0x0200_0000_0000 | l),
                addr: SocketAddr::from(([10, 0, 0, l as u8], 6783)),
                outbound: n < l,
                established: true,
            })
            .collect(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(update) = decode_gossip(data) else { return };
    let mut topo = Topology::new(peer(1, &[2, 3]));
    topo.merge(vec![peer(2, &[1, 3]), peer(3, &[1, 2, 4]), peer(4, &[3])]).unwrap();
    let before = topo.gossip_all();
    match topo.merge(update) {
        Ok(_) => {}
        Err(_) => assert_eq!(topo.gossip_all(), before, "a refused update changed the topology"),
    }
    let me = topo.me().name;
    let direct: Vec<PeerName> = topo.me().connections.iter().map(|c| c.peer).collect();
    for (dest, hop) in topo.routes() {
        assert_ne!(dest, me);
        assert!(topo.get(dest).is_some());
        assert!(direct.contains(&hop), "next hop {hop} is not a neighbour");
    }
    // Broadcast trees: computed in the same pass as the routes and agreeing with
    // them; my parent in a source's tree is the next hop towards it, my children
    // are neighbours, and my own broadcasts go to every neighbour that carries data.
    let graph = topo.graph();
    let tables = graph.tables();
    assert_eq!(tables.next_hop, graph.routes());
    assert_eq!(tables.next_hop, topo.routes());
    assert_eq!(tables.parents, tables.next_hop);
    let neighbours: std::collections::BTreeSet<PeerName> =
        tables.next_hop.iter().filter(|(d, h)| d == h).map(|(d, _)| *d).collect();
    for (source, kids) in &tables.children {
        assert!(*source == me || tables.next_hop.contains_key(source), "tree of an unreachable peer");
        assert!(kids.windows(2).all(|w| w[0] < w[1]), "children sorted, once each");
        assert!(kids.iter().all(|k| neighbours.contains(k) && k != source), "child {kids:?} not a neighbour");
    }
    let mine: std::collections::BTreeSet<PeerName> =
        tables.children.get(&me).into_iter().flatten().copied().collect();
    assert_eq!(mine, neighbours);
    let _ = topo.discovery_candidates();
    let _ = topo.garbage_collect();
    let _ = topo.routes();
});
