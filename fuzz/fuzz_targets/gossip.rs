//! Bytes -> bincode `Vec<PeerInfo>` (under the wire decode limit) -> merge into a
//! topology that already knows a few peers -> routes, discovery, garbage
//! collection. Nothing may panic, a refused update must change nothing, and
//! every route must lead to a known peer through a direct neighbour.
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
    let _ = topo.discovery_candidates();
    let _ = topo.garbage_collect();
    let _ = topo.routes();
});
