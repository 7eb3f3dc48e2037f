//! Bytes -> bincode `Vec<SignedPeerInfo>` (under the wire decode limit) -> signed
//! merge into a topology that already knows a few signed peers -> routes,
//! broadcast trees, discovery, garbage collection. Nothing may panic; an
//! update refused whole changes nothing; every entry kept (me aside) carries a
//! seal that verifies against the key book; every route leads to a known peer
//! through a direct neighbour, and the broadcast trees fit the routes.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use meshnet_proto::identity::Identity;
use meshnet_proto::topology::{ConnInfo, PeerInfo, Seal, SignedPeerInfo, Topology};
use meshnet_proto::trust::{Binding, KeyBook, Signer};
use meshnet_proto::wire::control::decode_gossip;
use meshnet_proto::PeerName;

struct Key {
    id: Identity,
    signer: Arc<Signer>,
}

fn keys() -> &'static Vec<Key> {
    static K: OnceLock<Vec<Key>> = OnceLock::new();
    K.get_or_init(|| {
        (1..=4u8)
            .map(|s| {
                let id = Identity::from_private([s; 32]).unwrap();
                Key { signer: Arc::new(Signer::from_identity(&id)), id }
            })
            .collect()
    })
}

fn name(n: usize) -> PeerName {
    keys()[n - 1].id.name()
}

fn peer(n: usize, links: &[usize]) -> PeerInfo {
    PeerInfo {
        name: name(n),
        nickname: format!("p{n}"),
        uid: n as u64,
        version: 1,
        software: "meshnet fuzz".into(),
        mtu: 1376,
        connections: links
            .iter()
            .map(|&l| ConnInfo {
                peer: name(l),
                addr: SocketAddr::from(([10, 0, 0, l as u8], 6783)),
                outbound: n < l,
                established: true,
            })
            .collect(),
    }
}

fn signed(n: usize, links: &[usize]) -> SignedPeerInfo {
    let k = &keys()[n - 1];
    let info = peer(n, links);
    let binding = Binding::new(info.name, &k.id, &k.signer);
    SignedPeerInfo { seal: Seal::sign(&info, &k.signer, &binding), info }
}

fuzz_target!(|data: &[u8]| {
    let Ok(update) = decode_gossip(data) else { return };
    let k = &keys()[0];
    let mut book = KeyBook::new();
    let mine = Binding::new(k.id.name(), &k.id, &k.signer);
    book.admit(&mine).unwrap();
    let mut topo = Topology::with_signer(peer(1, &[2, 3]), k.signer.clone(), mine);
    let r = topo
        .merge_signed(vec![signed(2, &[1, 3]), signed(3, &[1, 2, 4]), signed(4, &[3])], &mut book)
        .unwrap();
    assert!(r.rejected.is_empty());
    let before = topo.gossip_all_signed();
    let book_before = book.clone();
    match topo.merge_signed(update, &mut book) {
        Ok(report) => {
            for (n, _) in &report.rejected {
                assert!(!report.changed.contains(n) || *n == topo.me().name || topo.get(*n).is_some());
            }
        }
        Err(_) => {
            assert_eq!(topo.gossip_all_signed(), before, "a refused update changed the topology");
            assert_eq!(book, book_before, "a refused update pinned names");
        }
    }
    for e in topo.gossip_all_signed() {
        assert!(e.seal.signs(&e.info), "an entry kept does not verify");
        assert_eq!(book.get(e.info.name), Some(&e.seal.binding.keys), "an entry kept is not by the pinned key");
    }
    assert!(topo.me().version < meshnet_proto::topology::MAX_VERSION + 1);
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
    for (source, children) in topo.broadcast_children() {
        assert!(topo.get(source).is_some());
        for c in children {
            assert!(direct.contains(&c), "broadcast child {c} is not a neighbour");
        }
    }
    let _ = topo.discovery_candidates();
    let _ = topo.garbage_collect();
    let _ = topo.routes();
});
