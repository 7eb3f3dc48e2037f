//! The planes of many routers in one process, over an in-memory network with
//! a virtual clock: relay chains, broadcast exactly once on random
//! topologies, TTL, salvage, too-big, the per-frame path and heartbeats.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use super::rx::{RxOut, RxPlane};
use super::traffic::{PeerTraffic, ThreadCounters};
use super::tx::{TxOut, TxPlane};
use super::{Datagrams, PeerPath, Routes, Stats};
use crate::datapath::{Receiver, SALVAGE_AGE_MS};
use crate::gso::{self, VNET_HDR_LEN};
use crate::ingress::Upstream;
use crate::mac_table::MacOwner;
use crate::wire::datagram::Heartbeat;
use crate::{Mac, PeerName};

const MAX_DATAGRAM: usize = 1472;

fn name(i: usize) -> PeerName {
    PeerName(0x0200_0000_0000 + i as u64 + 1)
}

fn mac(i: usize) -> Mac {
    [0x02, 0, 0, 0, (i >> 8) as u8, i as u8]
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 6783))
}

/// The key `from` seals with towards `to` (and `to` opens with).
fn key(from: usize, to: usize) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(from as u64).to_le_bytes());
    k[8..16].copy_from_slice(&(to as u64).to_le_bytes());
    k[31] = 0x5a;
    k
}

/// The receiver index `to` chose for what `from` sends it.
fn index(from: usize, to: usize) -> u32 {
    (to * 4096 + from + 1) as u32
}

/// A plain Ethernet unit (zeroed virtio header) from `src` to `dst` whose
/// payload carries `tag`.
fn unit(dst: Mac, src: Mac, tag: u32, len: usize) -> Vec<u8> {
    let mut u = vec![0u8; VNET_HDR_LEN];
    u.extend_from_slice(&dst);
    u.extend_from_slice(&src);
    u.extend_from_slice(&[0x88, 0xb5]);
    u.extend_from_slice(&tag.to_be_bytes());
    u.resize(len.max(u.len()), 0xab);
    u
}

fn tag_of(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[VNET_HDR_LEN + 14..VNET_HDR_LEN + 18].try_into().unwrap())
}

/// A TCPv4 superframe unit of `payload` bytes cut at `mss`.
fn superframe(payload: usize, mss: u16, dst: Mac, src: Mac) -> Vec<u8> {
    let mut u = vec![1, gso::GSO_TCPV4, 0, 0];
    u.extend_from_slice(&mss.to_le_bytes());
    u.extend_from_slice(&34u16.to_le_bytes());
    u.extend_from_slice(&16u16.to_le_bytes());
    u.extend_from_slice(&dst);
    u.extend_from_slice(&src);
    u.extend_from_slice(&[8, 0]);
    u.extend_from_slice(&[0x45, 0]);
    u.extend_from_slice(&((40 + payload) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    u.extend_from_slice(&[0, 80, 0, 81, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 1, 0, 0, 0, 0, 0]);
    u.extend((0..payload).map(|i| i as u8));
    u
}

/// A tiny deterministic RNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

struct Node {
    tx: TxPlane,
    rx: RxPlane,
    stats: Arc<Stats>,
    /// Units written into the device, in order.
    delivered: Vec<Vec<u8>>,
    /// Frames the TX plane wrote back into the device (ICMP).
    replies: Vec<Vec<u8>>,
}

/// Routers on an in-memory network; `now` is the virtual clock (ms).
struct Net {
    nodes: Vec<Node>,
    adj: Vec<Vec<usize>>,
    /// (from, to, datagram) in flight.
    wire: VecDeque<(usize, usize, Vec<u8>)>,
    now: u64,
    /// Datagrams put on the wire so far; `lose` drops those it names.
    sent: usize,
    lose: Vec<usize>,
}

impl Net {
    /// Routers 0..n joined by `edges`, with routes from breadth-first search
    /// (the smallest name first, as the topology does).
    fn new(n: usize, edges: &[(usize, usize)], superframes: bool) -> Net {
        let mut adj = vec![Vec::new(); n];
        for &(a, b) in edges {
            adj[a].push(b);
            adj[b].push(a);
        }
        for a in &mut adj {
            a.sort_unstable();
            a.dedup();
        }
        let mut nodes = Vec::new();
        for i in 0..n {
            let stats = Arc::new(Stats::default());
            let counters = Arc::new(ThreadCounters::default());
            let mut tx = TxPlane::new(name(i), MAX_DATAGRAM, true, stats.clone(), counters.clone());
            let mut rx = RxPlane::new(name(i), MAX_DATAGRAM, true, stats.clone(), counters);
            for &j in &adj[i] {
                let path = PeerPath { peer: name(j), addr: addr(j), superframes, multiqueue: true };
                let traffic = Arc::new(PeerTraffic::default());
                tx.add_peer(path.clone(), index(i, j), &key(i, j), traffic.clone());
                rx.add_peer(path, index(j, i), &key(j, i), index(i, j), &key(i, j), traffic);
            }
            nodes.push(Node { tx, rx, stats, delivered: Vec::new(), replies: Vec::new() });
        }
        let mut net = Net { nodes, adj, wire: VecDeque::new(), now: 1, sent: 0, lose: Vec::new() };
        net.route();
        net
    }

    fn dist_from(&self, s: usize) -> Vec<u32> {
        let mut d = vec![u32::MAX; self.adj.len()];
        d[s] = 0;
        let mut q = VecDeque::from([s]);
        while let Some(x) = q.pop_front() {
            for &y in &self.adj[x] {
                if d[y] == u32::MAX {
                    d[y] = d[x] + 1;
                    q.push_back(y);
                }
            }
        }
        d
    }

    fn route(&mut self) {
        let n = self.adj.len();
        let dist: Vec<Vec<u32>> = (0..n).map(|s| self.dist_from(s)).collect();
        // Parent of x in s's tree: the smallest neighbour one hop closer to s.
        let parent = |s: usize, x: usize| self.adj[x].iter().copied().find(|&y| dist[s][y] + 1 == dist[s][x]);
        for me in 0..n {
            let mut r = Routes::default();
            for o in (0..n).filter(|&o| o != me && dist[me][o] != u32::MAX) {
                let closer: Vec<usize> = self.adj[me].iter().copied().filter(|&y| dist[o][y] + 1 == dist[o][me]).collect();
                r.next_hop.insert(name(o), name(closer[0]));
                let mut via: Vec<PeerName> = closer.iter().map(|&y| name(y)).collect();
                via.sort_unstable();
                r.upstream.insert(name(o), Upstream { hops: dist[me][o], via });
            }
            for s in 0..n {
                let children: Vec<PeerName> =
                    self.adj[me].iter().copied().filter(|&y| y != s && parent(s, y) == Some(me)).map(name).collect();
                if !children.is_empty() {
                    r.children.insert(name(s), children);
                }
            }
            self.nodes[me].tx.set_routes(Arc::new(r.clone()));
            self.nodes[me].rx.set_routes(Arc::new(r));
        }
    }

    fn put(&mut self, from: usize, d: &Datagrams) {
        for t in &d.sends {
            let to = self.adj[from].iter().copied().find(|&j| addr(j) == t.addr).expect("a neighbour's address");
            for i in t.datagrams.clone() {
                if !self.lose.contains(&self.sent) {
                    self.wire.push_back((from, to, d.batch.datagram(i).unwrap().to_vec()));
                }
                self.sent += 1;
            }
        }
    }

    /// Router `i` reads `units` from its device.
    fn send(&mut self, i: usize, units: Vec<Vec<u8>>) {
        let lens: Vec<usize> = units.iter().map(|u| u.len()).collect();
        let mut out = TxOut::default();
        self.nodes[i].tx.handle(self.now, &units, &lens, &mut out);
        let replies: Vec<Vec<u8>> = out.device_frames().map(|f| f.to_vec()).collect();
        self.nodes[i].replies.extend(replies);
        self.put(i, &out.datagrams);
    }

    /// Carries datagrams until none is in flight.
    fn run(&mut self) {
        let mut out = RxOut::default();
        let mut steps = 0;
        while let Some((from, to, mut d)) = self.wire.pop_front() {
            steps += 1;
            assert!(steps < 1_000_000, "datagrams never stop");
            let now = self.now;
            let node = &mut self.nodes[to];
            let _ = node.rx.receive(now, &mut d, addr(from), &mut out);
            let units: Vec<Vec<u8>> = node.rx.deliveries(&out, &d).map(|u| u.to_vec()).collect();
            node.delivered.extend(units);
            for (m, p) in out.learned.drain(..) {
                node.tx.learn(m, p, now);
            }
            self.put(to, &out.relays);
        }
    }

    /// Advances the clock and lets every RX plane do its time-driven work.
    fn advance(&mut self, ms: u64) {
        self.now += ms;
        let mut out = RxOut::default();
        for node in &mut self.nodes {
            node.rx.poll(self.now, &mut out);
            let units: Vec<Vec<u8>> = node.rx.deliveries(&out, &[]).map(|u| u.to_vec()).collect();
            node.delivered.extend(units);
        }
    }

    fn count(&self, i: usize, tag: u32) -> usize {
        self.nodes[i].delivered.iter().filter(|u| tag_of(u) == tag).count()
    }

    fn stat(&self, i: usize, f: impl Fn(&Stats) -> &super::traffic::Counter) -> u64 {
        f(&self.nodes[i].stats).get()
    }
}

#[test]
fn a_relay_chain_carries_unicast_end_to_end_once_macs_are_learned() {
    let n = 6;
    let edges: Vec<(usize, usize)> = (0..n - 1).map(|i| (i, i + 1)).collect();
    let mut net = Net::new(n, &edges, true);
    // Unknown destination: flooded down 0's tree, every router takes it once.
    net.send(0, vec![unit(mac(5), mac(0), 1, 100)]);
    net.run();
    for i in 1..n {
        assert_eq!(net.count(i, 1), 1, "router {i}");
    }
    assert_eq!(net.count(0, 1), 0);
    // The reply is unicast (5 learned mac(0) behind router 0) and relayed by 4..1.
    net.send(5, vec![unit(mac(0), mac(5), 2, 200)]);
    net.run();
    assert_eq!(net.count(0, 2), 1);
    for i in 1..5 {
        assert_eq!(net.count(i, 2), 0, "router {i} only relays");
        // The first flood, passed down 0's tree, and the reply.
        assert_eq!(net.stat(i, |s| &s.relayed_units), 2, "router {i}");
    }
    // Now both ends know each other: a burst of mixed sizes, in order.
    let burst: Vec<Vec<u8>> = (0..50).map(|k| unit(mac(5), mac(0), 100 + k, 60 + 97 * k as usize)).collect();
    net.send(0, burst.clone());
    net.run();
    let got: Vec<&Vec<u8>> = net.nodes[5].delivered.iter().filter(|u| tag_of(u) >= 100).collect();
    assert_eq!(got.len(), 50);
    for (g, w) in got.iter().zip(&burst) {
        assert_eq!(*g, w);
    }
    for i in 1..5 {
        assert_eq!(net.nodes[i].delivered.iter().filter(|u| tag_of(u) >= 100).count(), 0);
    }
    // The MAC tables: 0 sends to 5's MAC through the chain, not by flooding.
    assert_eq!(net.nodes[0].tx.mac_owner(&mac(5), net.now), Some(MacOwner::Peer(name(5))));
    assert_eq!(net.stat(0, |s| &s.refused[0]) + net.stat(3, |s| &s.refused[2]), 0);
}

#[test]
fn broadcasts_arrive_exactly_once_on_random_topologies() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..20 {
        let n = 3 + rng.below(18);
        // A random spanning tree, then random extra edges (cycles).
        let mut edges: Vec<(usize, usize)> = (1..n).map(|i| (rng.below(i), i)).collect();
        for _ in 0..rng.below(2 * n) {
            let (a, b) = (rng.below(n), rng.below(n));
            if a != b {
                edges.push((a.min(b), a.max(b)));
            }
        }
        let mut net = Net::new(n, &edges, round % 2 == 0);
        for s in 0..n {
            let tag = (round * 1000 + s) as u32;
            net.send(s, vec![unit([0xff; 6], mac(s), tag, 80 + 13 * s)]);
        }
        net.run();
        for s in 0..n {
            let tag = (round * 1000 + s) as u32;
            for i in 0..n {
                let want = usize::from(i != s);
                assert_eq!(net.count(i, tag), want, "round {round}: {n} routers {edges:?}, from {s} at {i}");
            }
        }
        for i in 0..n {
            assert_eq!(net.stat(i, |s| &s.dropped_no_route), 0);
            let refused: u64 = (0..4).map(|r| net.stat(i, |s| &s.refused[r])).sum();
            assert_eq!(refused, 0, "round {round}: router {i} refused a frame");
        }
    }
}

#[test]
fn ttl_ends_a_path_longer_than_the_hop_budget() {
    // 18 routers in a line: 17 hops from end to end, more than MAX_TTL allows.
    let n = 18;
    let edges: Vec<(usize, usize)> = (0..n - 1).map(|i| (i, i + 1)).collect();
    let mut net = Net::new(n, &edges, true);
    let now = net.now;
    net.nodes[0].tx.learn(mac(16), name(16), now);
    net.nodes[0].tx.learn(mac(17), name(17), now);
    net.send(0, vec![unit(mac(16), mac(0), 16, 100), unit(mac(17), mac(0), 17, 100)]);
    net.run();
    // 16 hops still arrive; the 17th hop has no TTL left and is dropped by router 16.
    assert_eq!(net.count(16, 16), 1);
    assert_eq!(net.count(17, 17), 0);
    assert_eq!(net.stat(16, |s| &s.dropped_no_route), 1);
    for i in 1..16 {
        assert_eq!(net.stat(i, |s| &s.relayed_units), 2, "router {i}");
        assert_eq!(net.stat(i, |s| &s.dropped_no_route), 0);
    }
}

#[test]
fn a_routing_loop_ends_when_the_ttl_runs_out() {
    // Routes that disagree (as they can while topology converges): 1 and 2
    // each think the other is the way to 3, which neither reaches.
    let mut net = Net::new(3, &[(0, 1), (1, 2)], true);
    let ghost = name(3);
    for (me, hop, origin_via) in [(1usize, 2usize, vec![name(0), name(2)]), (2, 1, vec![name(1)])] {
        let mut r = Routes::default();
        r.next_hop.insert(ghost, name(hop));
        r.upstream.insert(name(0), Upstream { hops: if me == 1 { 1 } else { 2 }, via: origin_via });
        net.nodes[me].rx.set_routes(Arc::new(r));
    }
    let now = net.now;
    net.nodes[0].tx.learn(mac(3), ghost, now);
    let mut r = Routes::default();
    r.next_hop.insert(ghost, name(1));
    net.nodes[0].tx.set_routes(Arc::new(r));
    net.send(0, vec![unit(mac(3), mac(0), 3, 100)]);
    net.run();
    let relays = net.stat(1, |s| &s.relayed_units) + net.stat(2, |s| &s.relayed_units);
    let dropped = net.stat(1, |s| &s.dropped_no_route) + net.stat(2, |s| &s.dropped_no_route);
    assert!(relays > 2 && relays < crate::ingress::MAX_TTL as u64, "{relays} relays");
    assert_eq!(dropped, 1);
    assert_eq!(net.count(1, 3) + net.count(2, 3), 0);
}

#[test]
fn a_superframe_that_lost_a_chunk_is_salvaged_by_age() {
    let mut net = Net::new(2, &[(0, 1)], true);
    let now = net.now;
    net.nodes[0].tx.learn(mac(1), name(1), now);
    // 10 segments of 1000 bytes, chunked into 1472-byte datagrams; lose the 4th.
    let sf = superframe(10_000, 1000, mac(1), mac(0));
    net.lose = vec![3];
    net.send(0, vec![sf.clone()]);
    net.run();
    assert_eq!(net.nodes[1].delivered.len(), 0, "incomplete: nothing yet");
    net.advance(SALVAGE_AGE_MS);
    let got = &net.nodes[1].delivered;
    // The datagram lost held bytes of segments 3 and 4 (1458 bytes of chunk from 4374).
    let mut all = Vec::new();
    gso::to_plain_frames(&sf, &mut vec![0u8; 70_000], VNET_HDR_LEN, |f| all.push(f.to_vec())).unwrap();
    assert_eq!(all.len(), 10);
    assert!(!got.is_empty() && got.len() < 10, "{} frames salvaged", got.len());
    for f in got {
        assert!(all.contains(f), "a salvaged frame is exactly one of the superframe's segments");
    }
    assert_eq!(net.stat(1, |s| &s.salvaged_units), 1);
    assert_eq!(net.stat(1, |s| &s.salvaged_frames), got.len() as u64);
    // Complete superframes after it arrive whole.
    net.lose.clear();
    net.send(0, vec![sf.clone()]);
    net.run();
    assert_eq!(net.nodes[1].delivered.last(), Some(&sf));
}

#[test]
fn a_superframe_overtaken_by_newer_ones_is_salvaged_before_its_time() {
    let mut net = Net::new(2, &[(0, 1)], true);
    let now = net.now;
    net.nodes[0].tx.learn(mac(1), name(1), now);
    let sf = superframe(10_000, 1000, mac(1), mac(0));
    // A chunk in the middle (the first holds the headers salvaging needs).
    net.lose = vec![4];
    net.send(0, vec![sf.clone(), sf.clone(), sf.clone(), sf.clone()]);
    net.run();
    // Three newer units completed: the first gave up its whole segments at once.
    let got = &net.nodes[1].delivered;
    assert_eq!(got.iter().filter(|u| **u == sf).count(), 3);
    assert!(got.len() > 3, "salvaged frames delivered too");
    assert_eq!(net.stat(1, |s| &s.salvaged_units), 1);
}

#[test]
fn a_frame_too_big_for_the_destination_gets_icmp_back_to_the_device() {
    let mut net = Net::new(2, &[(0, 1)], true);
    let now = net.now;
    net.nodes[0].tx.learn(mac(1), name(1), now);
    let mut r = Routes::default();
    r.next_hop.insert(name(1), name(1));
    r.mtu.insert(name(1), 1000);
    net.nodes[0].tx.set_routes(Arc::new(r));
    // An IPv4 packet of 1400 bytes with DF set.
    let mut big = vec![0u8; VNET_HDR_LEN];
    big.extend_from_slice(&mac(1));
    big.extend_from_slice(&mac(0));
    big.extend_from_slice(&[8, 0, 0x45, 0]);
    big.extend_from_slice(&1400u16.to_be_bytes());
    big.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    big.resize(VNET_HDR_LEN + 14 + 1400, 7);
    let small = unit(mac(1), mac(0), 9, 500);
    net.send(0, vec![big, small]);
    net.run();
    assert_eq!(net.nodes[0].replies.len(), 1, "one ICMP reply");
    let icmp = &net.nodes[0].replies[0];
    assert_eq!(icmp[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
    let f = &icmp[VNET_HDR_LEN..];
    assert_eq!((&f[0..6], &f[6..12]), (&mac(0)[..], &mac(1)[..]), "back to the sender");
    assert_eq!((f[14 + 20], f[14 + 21]), (3, 4), "destination unreachable, fragmentation needed");
    assert_eq!(u16::from_be_bytes([f[14 + 26], f[14 + 27]]), 1000, "the destination's MTU");
    assert_eq!(net.stat(0, |s| &s.frag_needed_sent), 1);
    assert_eq!(net.stat(0, |s| &s.dropped_too_big), 1);
    assert_eq!(net.nodes[1].delivered.len(), 1, "only the small frame crossed");
    assert_eq!(tag_of(&net.nodes[1].delivered[0]), 9);
}

#[test]
fn a_next_hop_without_superframes_gets_plain_frames() {
    let mut net = Net::new(2, &[(0, 1)], false);
    let now = net.now;
    net.nodes[0].tx.learn(mac(1), name(1), now);
    let sf = superframe(10_000, 1000, mac(1), mac(0));
    let plain = unit(mac(1), mac(0), 5, 300);
    let mut bad = superframe(100, 1000, mac(1), mac(0));
    bad[1] = 0x81;
    net.send(0, vec![sf, plain.clone(), bad]);
    net.run();
    let got = &net.nodes[1].delivered;
    assert_eq!(got.len(), 11);
    for u in &got[..10] {
        assert_eq!(u[..VNET_HDR_LEN], [0; VNET_HDR_LEN], "zeroed virtio header");
        assert_eq!(u.len(), VNET_HDR_LEN + 54 + 1000);
        assert!(gso::is_plain(u));
    }
    assert_eq!(got[10], plain);
    let c = net.nodes[0].stats.per_frame.to_json();
    assert_eq!(c, [("sw_segmented_units", 1), ("sw_frames_out", 10), ("sw_malformed_units", 1)]);
}

#[test]
fn heartbeats_are_heard_with_their_sender_and_size() {
    let mut net = Net::new(2, &[(0, 1)], true);
    let mut d = Datagrams::default();
    let hb = Heartbeat { heard: 3, seq: 9 };
    net.nodes[0].tx.seal_heartbeats(name(1), hb, &[0, 1400], &mut d);
    assert_eq!(d.sends.len(), 1);
    assert!(!d.sends[0].gso, "each heartbeat probes its own size");
    let mut out = RxOut::default();
    for dg in d.batch.datagrams() {
        let mut dg = dg.to_vec();
        net.nodes[1].rx.receive(5, &mut dg, addr(7), &mut out).unwrap();
    }
    assert_eq!(out.heard.len(), 2);
    assert!(out.heard.iter().all(|h| h.peer == name(0) && h.heartbeat == hb && h.from == addr(7)));
    assert_eq!(out.heard[1].len, 1400);
    assert_eq!(net.stat(0, |s| &s.heartbeats_out), 2);
}

#[test]
fn garbage_and_forgeries_change_nothing() {
    let mut net = Net::new(3, &[(0, 1), (1, 2)], true);
    let mut out = RxOut::default();
    let mut rng = Rng(7);
    for len in [0usize, 1, 20, 40, 100, 1472] {
        let mut g: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        assert!(net.nodes[1].rx.receive(1, &mut g, addr(0), &mut out).is_err());
        assert_eq!(out.deliveries() + out.relays.sends.len() + out.learned.len() + out.heard.len(), 0);
    }
    // A frame from 0 that claims to come from 2 is refused by 1, not relayed.
    let mut forger = TxPlane::new(name(2), MAX_DATAGRAM, true, Arc::default(), Arc::default());
    forger.add_peer(PeerPath { peer: name(1), addr: addr(1), superframes: true, multiqueue: true }, index(0, 1), &key(0, 1), Arc::default());
    forger.learn(mac(2), name(2), 1);
    let mut r = Routes::default();
    r.next_hop.insert(name(2), name(1));
    forger.set_routes(Arc::new(r));
    let mut txo = TxOut::default();
    let u = unit(mac(2), mac(9), 1, 100);
    forger.handle(1, &[u.clone()], &[u.len()], &mut txo);
    assert_eq!(txo.datagrams.batch.datagram_count(), 1);
    let mut dg = txo.datagrams.batch.datagram(0).unwrap().to_vec();
    net.nodes[1].rx.receive(1, &mut dg, addr(0), &mut out).unwrap();
    assert_eq!(out.deliveries() + out.relays.sends.len() + out.learned.len(), 0);
    assert_eq!(net.stat(1, |s| &s.refused[crate::ingress::Refused::OriginIsMe.index()]), 0);
    let refused: u64 = (0..4).map(|r| net.stat(1, |s| &s.refused[r])).sum();
    assert_eq!(refused, 1);
    let _ = Receiver::new();
}

#[test]
fn a_mac_that_moves_behind_the_device_is_reported() {
    let mut net = Net::new(2, &[(0, 1)], true);
    let now = net.now;
    net.nodes[0].tx.learn(mac(7), name(1), now);
    let mut out = TxOut::default();
    let u = unit(mac(1), mac(7), 1, 100);
    net.nodes[0].tx.handle(now, &[u.clone()], &[u.len()], &mut out);
    assert_eq!(out.moved_local, vec![mac(7)]);
    assert_eq!(net.nodes[0].tx.mac_owner(&mac(7), now), Some(MacOwner::Local));
    // Seen from the device again: not a move.
    net.nodes[0].tx.handle(now, &[u.clone()], &[u.len()], &mut out);
    assert!(out.moved_local.is_empty());
}

/// `trusted (userspace)` between 0 and 1 of the chain 0 – 1 – 2: units from
/// 0's device for 1 itself go unsealed (the payload visible on the wire) and
/// are delivered; units relayed through 1, broadcasts and the other link stay
/// sealed; an unsealed datagram from another address is refused and counted.
#[test]
fn unsealed_goes_only_to_the_agreed_peer_itself() {
    let mut net = Net::new(3, &[(0, 1), (1, 2)], true);
    net.nodes[0].tx.set_unsealed(name(1), true);
    net.nodes[1].rx.set_unsealed_from(name(0), Some(addr(0).ip()));
    // Everyone learns everyone's MAC (flooded, so sealed).
    for i in 0..3 {
        net.send(i, vec![unit([0xff; 6], mac(i), 1, 100)]);
        assert!(net.wire.iter().all(|(_, _, d)| d[1] == 0), "a broadcast went unsealed");
        net.run();
    }
    let marker = 0x5eed_0001;
    // 0 → 1: unsealed, the payload on the wire in the clear.
    net.send(0, vec![unit(mac(1), mac(0), marker, 300)]);
    let on_wire: Vec<Vec<u8>> = net.wire.iter().map(|(_, _, d)| d.clone()).collect();
    assert_eq!(on_wire.len(), 1);
    assert_eq!(on_wire[0][1], crate::wire::datagram::OUTER_FLAG_UNSEALED);
    assert!(on_wire[0].windows(4).any(|w| w == marker.to_be_bytes()), "the unit is not in the clear");
    net.run();
    assert_eq!(net.count(1, marker), 1);
    assert_eq!(net.stat(0, |s| &s.udp_unsealed_out), 1);
    assert_eq!(net.stat(1, |s| &s.udp_unsealed_in), 1);
    // 0 → 2 through 1: sealed on both links.
    net.send(0, vec![unit(mac(2), mac(0), marker + 1, 300)]);
    assert!(net.wire.iter().all(|(_, _, d)| d[1] == 0), "a unit relayed through the trusted peer went unsealed");
    net.run();
    assert_eq!(net.count(2, marker + 1), 1);
    // 1 → 0: 1 did not agree to send unsealed (its TX plane), so sealed.
    net.send(1, vec![unit(mac(0), mac(1), marker + 2, 300)]);
    assert!(net.wire.iter().all(|(_, _, d)| d[1] == 0));
    net.run();
    assert_eq!(net.count(0, marker + 2), 1);
    // The unsealed datagram again, from 2's address: refused, counted, not delivered.
    net.send(0, vec![unit(mac(1), mac(0), marker + 3, 300)]);
    let (_, _, mut d) = net.wire.pop_front().unwrap();
    let mut out = RxOut::default();
    let before = net.nodes[1].delivered.len();
    assert!(net.nodes[1].rx.receive(net.now, &mut d.clone(), addr(2), &mut out).is_err());
    assert_eq!(out.deliveries(), 0);
    assert_eq!(net.stat(1, |s| &s.udp_unsealed_refused), 1);
    assert_eq!(net.nodes[1].delivered.len(), before);
    // From the agreed address it is still taken (the refusal moved no window).
    net.nodes[1].rx.receive(net.now, &mut d, addr(0), &mut out).unwrap();
    assert_eq!(out.deliveries(), 1);
    // A peer added again starts sealed both ways.
    let path = PeerPath { peer: name(1), addr: addr(1), superframes: true, multiqueue: true };
    net.nodes[0].tx.add_peer(path, index(0, 1), &key(0, 1), Arc::default());
    net.send(0, vec![unit(mac(1), mac(0), marker + 4, 300)]);
    assert!(net.wire.iter().all(|(_, _, d)| d[1] == 0));
}

/// A removed peer's counters are let go by both planes (after traffic, so the
/// RX plane's cached sender is let go too), so the router's book can forget
/// them once the peer is gone for good: planes kept every peer ever added.
#[test]
fn removed_peers_counters_are_let_go() {
    let mut net = Net::new(2, &[(0, 1)], true);
    let path = PeerPath { peer: name(1), addr: addr(1), superframes: true, multiqueue: true };
    let traffic = Arc::new(PeerTraffic::default());
    net.nodes[0].tx.add_peer(path.clone(), index(0, 1), &key(0, 1), traffic.clone());
    net.nodes[0].rx.add_peer(path, index(1, 0), &key(1, 0), index(0, 1), &key(0, 1), traffic.clone());
    net.route();
    net.send(1, vec![unit(mac(0), mac(1), 7, 300)]);
    net.run();
    assert_eq!(net.count(0, 7), 1);
    assert!(traffic.rx.bytes.get() > 0, "the frame was counted for the peer");
    assert!(Arc::strong_count(&traffic) > 1);
    net.nodes[0].tx.remove_peer(name(1));
    net.nodes[0].rx.remove_peer(name(1), &[index(1, 0)]);
    assert_eq!(Arc::strong_count(&traffic), 1, "a plane still holds the removed peer's counters");
}
