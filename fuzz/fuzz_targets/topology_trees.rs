//! Bytes -> a small mesh (up to 12 peers, links and their states chosen by the
//! input, some one-sided) -> every peer's own view of it (unsigned merge, as
//! tools and tests do; the signed path shares the same rules) -> routes and
//! broadcast trees in every view. Every view must agree: a broadcast from any
//! source, passed on along each peer's children, reaches every peer the
//! source can reach exactly once and nobody else; routes use neighbours only.
#![no_main]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use meshnet_proto::topology::{ConnInfo, PeerInfo, Topology};
use meshnet_proto::PeerName;

fn name(n: usize) -> PeerName {
    PeerName(0x0200_0000_0000 | n as u64)
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let n = 2 + (n as usize % 11);
    // Each input byte lists one directed link: from, to, established.
    let mut lists: Vec<Vec<(usize, bool)>> = vec![Vec::new(); n + 1];
    for pair in rest.chunks(2).take(200) {
        let (a, b) = (1 + pair[0] as usize % n, 1 + pair.get(1).copied().unwrap_or(0) as usize % n);
        let established = pair[0] & 0x80 == 0;
        if a != b {
            lists[a].push((b, established));
        }
    }
    let entry = |i: usize| PeerInfo {
        name: name(i),
        nickname: String::new(),
        uid: i as u64,
        version: 1,
        software: String::new(),
        mtu: 0,
        connections: lists[i]
            .iter()
            .map(|&(p, established)| ConnInfo {
                peer: name(p),
                addr: SocketAddr::from(([10, 0, 0, p as u8], 6783)),
                outbound: true,
                established,
            })
            .collect(),
    };
    let views: Vec<Topology> = (1..=n)
        .map(|me| {
            let mut t = Topology::new(entry(me));
            t.merge((1..=n).filter(|&i| i != me).map(entry).collect()).unwrap();
            t
        })
        .collect();
    // Symmetric established links: the graph everyone routes on.
    let linked = |a: usize, b: usize| {
        lists[a].iter().any(|&(p, e)| p == b && e) && lists[b].iter().any(|&(p, e)| p == a && e)
    };
    let children: Vec<HashMap<PeerName, Vec<PeerName>>> = views.iter().map(|v| v.broadcast_children()).collect();
    for (i, v) in views.iter().enumerate() {
        for (_, hop) in v.routes() {
            assert!(linked(i + 1, (hop.0 & 0xff) as usize), "route via a non-neighbour");
        }
    }
    for source in 1..=n {
        // Who the source can reach.
        let mut reach = vec![false; n + 1];
        reach[source] = true;
        let mut q = VecDeque::from([source]);
        while let Some(u) = q.pop_front() {
            for w in 1..=n {
                if !reach[w] && linked(u, w) {
                    reach[w] = true;
                    q.push_back(w);
                }
            }
        }
        let mut got = vec![0u32; n + 1];
        let mut q = VecDeque::from([source]);
        while let Some(at) = q.pop_front() {
            for c in children[at - 1].get(&name(source)).into_iter().flatten() {
                let c = (c.0 & 0xff) as usize;
                assert!(linked(at, c), "broadcast child is not a neighbour");
                got[c] += 1;
                assert!(got[c] <= 1, "peer {c} got a broadcast of {source} twice");
                q.push_back(c);
            }
        }
        for p in 1..=n {
            let want = u32::from(reach[p] && p != source);
            assert_eq!(got[p], want, "peer {p}, broadcast of {source}");
        }
    }
});
