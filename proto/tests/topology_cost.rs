//! What merging gossip and recomputing routes and broadcast trees costs.
//!
//! `hostile_topology_stays_bounded` is the cost check: a member gossips the largest
//! topology the bounds allow it to invent, and merging it plus recomputing must
//! stay within a time bound. `bench_figures` (ignored; run it with
//! `cargo test --release -p meshnet-proto --test topology_cost -- --ignored --nocapture`)
//! prints the figures recorded in BENCHMARKS.md.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshnet_proto::identity::Identity;
use meshnet_proto::topology::{ConnInfo, PeerInfo, Seal, SignedPeerInfo, Topology, MAX_CONNECTIONS, MAX_PEERS};
use meshnet_proto::trust::{Binding, KeyBook, Signer};
use meshnet_proto::PeerName;

fn name(n: u64) -> PeerName {
    PeerName(0x0200_0000_0000 | n)
}

/// Peer `i`'s name: even numbers in order, except peer 1 (me, whose view is
/// measured), which gets the odd name `me`, so that where it sorts among the
/// others can be chosen (the tie rules favour small names).
fn label(i: u64, me: u64) -> PeerName {
    if i == 1 {
        name(me)
    } else {
        name(i * 2)
    }
}

fn peer(n: u64, links: &[u64], me: u64) -> PeerInfo {
    PeerInfo {
        name: label(n, me),
        nickname: format!("host-{n}"),
        uid: n * 7919,
        version: 3,
        software: "meshnet 0.1.0".into(),
        mtu: 1376,
        connections: links
            .iter()
            .map(|&l| ConnInfo {
                peer: label(l, me),
                addr: SocketAddr::from(([10, (l >> 16) as u8, (l >> 8) as u8, l as u8], 6783)),
                outbound: n < l,
                established: true,
            })
            .collect(),
    }
}

/// CPU time this thread has used (Linux, 10 ms steps): unlike wall time, it does
/// not depend on what else the machine runs.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("/proc/thread-self/stat");
    let rest: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..].split(' ').collect();
    // utime and stime (fields 14 and 15) in clock ticks of 1/100 s.
    let ticks: u64 = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Peers 1..=n, every link listed (established) by both ends; peer 1 named `me`.
fn infos(n: u64, adj: &[Vec<u64>], me: u64) -> Vec<PeerInfo> {
    (1..=n).map(|i| peer(i, &adj[i as usize], me)).collect()
}

/// Each entry sealed by its owner, as gossip carries them (a key per name).
fn sign_all(all: &[PeerInfo]) -> Vec<SignedPeerInfo> {
    all.iter()
        .map(|p| {
            let mut key = [1u8; 32];
            key[..8].copy_from_slice(&p.name.0.to_be_bytes());
            let id = Identity::from_private(key).unwrap();
            let signer = Signer::from_identity(&id);
            let binding = Binding::new(p.name, &id, &signer);
            SignedPeerInfo { seal: Seal::sign(p, &signer, &binding), info: p.clone() }
        })
        .collect()
}

/// A connected random graph of `n` peers with average degree about `degree`:
/// a ring plus random chords.
fn random_graph(n: u64, degree: u64, seed: u64) -> Vec<Vec<u64>> {
    let mut adj = vec![Vec::new(); n as usize + 1];
    let mut rng = Rng(seed);
    let add = |adj: &mut Vec<Vec<u64>>, a: u64, b: u64| {
        if a != b && !adj[a as usize].contains(&b) {
            adj[a as usize].push(b);
            adj[b as usize].push(a);
        }
    };
    for i in 1..=n {
        add(&mut adj, i, i % n + 1);
    }
    for _ in 0..n * (degree - 2) / 2 {
        let (a, b) = (rng.below(n) + 1, rng.below(n) + 1);
        add(&mut adj, a, b);
    }
    adj
}

/// The same graph with peers 2..=n renumbered at random (peer 1 stays).
fn shuffled(adj: &[Vec<u64>], seed: u64) -> Vec<Vec<u64>> {
    let n = adj.len() as u64 - 1;
    let mut perm: Vec<u64> = (0..=n).collect();
    let mut rng = Rng(seed);
    for i in (3..=n).rev() {
        perm.swap(i as usize, 2 + rng.below(i - 1) as usize);
    }
    let mut out = vec![Vec::new(); adj.len()];
    for (i, links) in adj.iter().enumerate() {
        out[perm[i] as usize] = links.iter().map(|&l| perm[l as usize]).collect();
    }
    out
}

fn full_mesh(n: u64) -> Vec<Vec<u64>> {
    (0..=n).map(|i| if i == 0 { Vec::new() } else { (1..=n).filter(|&j| j != i).collect() }).collect()
}

/// Runs `f` `reps` times: CPU time and wall time per run.
fn per_run(reps: u32, mut f: impl FnMut()) -> (Duration, Duration) {
    let (cpu, wall) = (thread_cpu(), Instant::now());
    for _ in 0..reps {
        f();
    }
    ((thread_cpu() - cpu) / reps, wall.elapsed() / reps)
}

#[test]
#[ignore = "prints benchmark figures; run in release with --ignored --nocapture"]
fn bench_figures() {
    // TOPOLOGY_BENCH_MESH=n measures a full mesh of n instead of 500.
    let mesh: u64 = std::env::var("TOPOLOGY_BENCH_MESH").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    for (label, n, adj, reps) in [
        ("1000 peers, degree 10".to_string(), 1000u64, random_graph(1000, 10, 0x5eed), 200),
        (format!("full mesh of {mesh}"), mesh, full_mesh(mesh), 50),
    ] {
        // Peer 1's view, me in the middle of the names: merge everyone else's
        // entries in one update, then recompute.
        let all = infos(n, &adj, n | 1);
        let bytes = bincode::serde::encode_to_vec(&all, bincode::config::standard()).unwrap().len();
        let parts = meshnet_proto::wire::control::split_gossip(sign_all(&all), meshnet_proto::wire::control::GOSSIP_CHUNK);
        let mut t = Topology::new(all[0].clone());
        let update = all[1..].to_vec();
        let (clone, _) = per_run(reps, || drop(std::hint::black_box(update.clone())));
        let (merge, merge_wall) = per_run(reps, || {
            t = Topology::new(all[0].clone());
            t.merge(update.clone()).unwrap();
        });
        let (routes, routes_wall) = per_run(reps, || drop(std::hint::black_box(t.routes())));
        // Routes and broadcast trees together, as the daemon recomputes them.
        let (tables, tables_wall) = per_run(reps, || drop(std::hint::black_box(t.graph().tables())));
        let result = t.graph().tables();
        assert_eq!(result.next_hop.len() as u64, n - 1, "connected");
        let links: usize = adj.iter().map(Vec::len).sum::<usize>() / 2;
        println!(
            "{label}: {links} links, gossip {bytes} bytes ({} messages); CPU per run: merge {merge:?} \
             (including copying the update, {clone:?}), routes {routes:?}, routes and broadcast trees {tables:?}; \
             wall: {merge_wall:?}, {routes_wall:?}, {tables_wall:?}",
            parts.len(),
        );
    }
}

/// A member invents the most peers the bounds allow, each listing as many
/// established connections to the others as fit, all listed both ways so
/// every link counts; it hangs the lot off itself (a neighbour of mine).
/// Merging it and recomputing routes and broadcast trees must stay bounded.
#[test]
fn hostile_topology_stays_bounded() {
    // CPU time for merging it all and recomputing once, on one core of a small
    // machine. Debug builds are ~30x slower: check a tenth of the size there.
    let (n, bound) = if cfg!(debug_assertions) {
        (MAX_PEERS as u64 / 10, Duration::from_secs(5))
    } else {
        (MAX_PEERS as u64, Duration::from_millis(800))
    };
    // Me (1) and 9 honest neighbours, 2 is the attacker.
    let honest: Vec<u64> = (2..=10).collect();
    let invented = 11..n.min(MAX_PEERS as u64);
    // Each invented peer links to `degree` others: a circulant graph (i ± each of
    // `degree / 2` random offsets), so every link is listed by both ends and the
    // diameter is small, and the total stays within MAX_TOTAL_CONNECTIONS.
    let total = meshnet_proto::topology::MAX_TOTAL_CONNECTIONS as u64;
    let degree = ((total - 2 * MAX_CONNECTIONS as u64 - 200) / n).min(MAX_CONNECTIONS as u64 - 2) & !1;
    let span = invented.end - invented.start;
    let mut rng = Rng(0xbad);
    let mut offsets = Vec::new();
    while (offsets.len() as u64) < degree / 2 {
        let o = 1 + rng.below(span / 2 - 1);
        if !offsets.contains(&o) {
            offsets.push(o);
        }
    }
    let mut adj = vec![Vec::new(); n as usize + 1];
    adj[1] = honest.clone();
    for &h in &honest {
        adj[h as usize] = std::iter::once(1).chain(honest.iter().copied().filter(|&o| o != h)).collect();
    }
    for i in invented.clone() {
        let k = i - invented.start;
        for &o in &offsets {
            adj[i as usize].push(invented.start + (k + o) % span);
            adj[i as usize].push(invented.start + (k + span - o) % span);
        }
    }
    // The attacker links to as many invented peers as one entry may list.
    let room = MAX_CONNECTIONS - adj[2].len();
    for j in invented.clone().take(room) {
        if adj[j as usize].len() < MAX_CONNECTIONS {
            adj[2].push(j);
            adj[j as usize].push(2);
        }
    }
    // My name is the largest: every invented peer wins ties against me, the most work.
    let me = 4 * n + 1;
    let all = infos(n - 1, &adj[..n as usize], me);
    let listed: usize = all.iter().map(|p| p.connections.len()).sum();
    assert!(listed <= meshnet_proto::topology::MAX_TOTAL_CONNECTIONS, "{listed}");

    let mut t = Topology::new(all[0].clone());
    let cpu = thread_cpu();
    let start = Instant::now();
    // As it arrives: in gossip messages of about 1000 peers each.
    for chunk in all[1..].chunks(1000) {
        t.merge(chunk.to_vec()).unwrap();
    }
    let merged = start.elapsed();
    let graph = t.graph();
    let built = start.elapsed();
    // What the daemon runs (off its lock) after every change.
    let tables = graph.tables();
    let took = start.elapsed();
    let cpu = thread_cpu() - cpu;
    let (routes, children, parents) = (&tables.next_hop, &tables.children, &tables.parents);
    println!(
        "hostile: {} peers, {} links, {listed} listed connections: merge {merged:?}, graph {:?}, tables {:?}, total {took:?} ({cpu:?} CPU)",
        n - 1,
        graph.size().1,
        built - merged,
        took - built
    );
    assert_eq!(&graph.routes(), routes);
    assert_eq!(routes.len() as u64, n - 2, "everything invented is reachable through the attacker");
    assert_eq!(children[&name(me)].len(), honest.len(), "my own broadcasts go to every neighbour");
    assert_eq!(parents.len(), routes.len(), "every reachable peer's tree includes me");
    assert!(parents.iter().all(|(s, &p)| p == routes[s]));
    assert_eq!(parents[&label(11, me)], label(2, me), "the invented peers reach me through the attacker");
    assert!(cpu < bound, "merging and recomputing took {cpu:?} of CPU, over {bound:?}");
}

/// A peer merges gossip split into `chunk`-byte messages one by one, collecting
/// garbage after each as the daemon may: nothing is lost on the way.
fn merge_in_parts(n: u64, adj: &[Vec<u64>], chunk: usize) -> usize {
    use meshnet_proto::wire::control::{decode_message, encode_message, split_gossip, ControlMsg};
    let all = infos(n, adj, n | 1);
    let mut sender = Topology::new(all[0].clone());
    sender.merge(all[1..].to_vec()).unwrap();
    let full = sign_all(&sender.gossip_all());
    let msgs = split_gossip(full.clone(), chunk);
    let count = msgs.len();
    // A new peer, connected only to the sender (pending: not yet in its entry).
    let mut me = peer(1, &[], n | 1);
    me.name = name(1);
    me.connections =
        vec![ConnInfo { peer: full[0].info.name, addr: "10.9.9.9:6783".parse().unwrap(), outbound: true, established: false }];
    let mut receiver = Topology::new(me);
    let mut book = KeyBook::new();
    let mut got = Vec::new();
    for msg in msgs {
        let body = encode_message(&msg).unwrap();
        assert!(body.len() <= chunk, "{} bytes", body.len());
        let ControlMsg::Gossip(part) = decode_message(&body).unwrap() else { panic!("not gossip") };
        got.extend(part.iter().cloned());
        let report = receiver.merge_signed(part, &mut book).unwrap();
        assert!(report.rejected.is_empty(), "{report:?}");
        assert_eq!(receiver.garbage_collect(), vec![], "every part is reachable through the parts before it");
    }
    assert_eq!(got, full, "same entries, same order");
    assert_eq!(receiver.peers().count() as u64, n + 1);
    count
}

/// A full mesh of 500 encodes beyond one control message: it goes as several,
/// each well under the limit, and every part merges.
#[test]
fn large_gossip_is_split_and_every_part_merges() {
    use meshnet_proto::wire::control::{encode_message, ControlMsg, GOSSIP_CHUNK};
    let adj = full_mesh(500);
    let all = infos(500, &adj, 501);
    assert!(encode_message(&ControlMsg::Gossip(sign_all(&all))).is_err(), "too big for one message");
    assert!(merge_in_parts(500, &adj, GOSSIP_CHUNK) > 4_000_000 / GOSSIP_CHUNK);
    // A sparse mesh in small parts: most peers are not the sender's neighbours, so
    // the order (breadth-first from the sender) is what keeps them.
    assert!(merge_in_parts(1000, &shuffled(&random_graph(1000, 10, 7), 9), 8 << 10) > 20);
}
