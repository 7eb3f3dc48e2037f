//! An in-memory network with a virtual clock: a graph of links, partitions, and
//! seeded faults (loss, duplication, reordering by random delay).
//!
//! Time is counted in ticks; a message sent at tick `t` arrives at `t + d` with
//! `1 <= d <= max_delay_ticks` drawn at random, so messages overtake each other.
//! Whether a message arrives is decided twice: when sent (loss) and when due
//! (the two ends must still be up and in one partition, connected through links
//! inside it — the model of the daemon routing `Dest::Peer` messages).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// splitmix64: small, seeded, good enough for a simulator.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `0..n`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.below(items.len() as u64) as usize])
        }
    }
}

/// What can go wrong with a message.
#[derive(Clone, Debug, PartialEq)]
pub struct Faults {
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Largest delay in ticks (at least 1); above 1 reorders messages.
    pub max_delay_ticks: u64,
}

impl Faults {
    /// Every message arrives once, one tick later, in order.
    pub fn none() -> Faults {
        Faults { loss: 0.0, duplicate: 0.0, max_delay_ticks: 1 }
    }
}

/// Undirected links between nodes `0..n`.
#[derive(Clone, Debug)]
pub struct Graph {
    adj: Vec<Vec<usize>>,
}

impl Graph {
    /// Everyone linked to everyone.
    pub fn full(n: usize) -> Graph {
        Graph { adj: (0..n).map(|i| (0..n).filter(|&j| j != i).collect()).collect() }
    }

    /// A ring (so the graph is connected) plus random links until the average
    /// degree is about `degree`.
    pub fn random(n: usize, degree: usize, rng: &mut SimRng) -> Graph {
        let mut g = Graph { adj: vec![Vec::new(); n] };
        if n < 2 {
            return g;
        }
        for i in 0..n {
            g.link(i, (i + 1) % n);
        }
        let want = n * degree / 2;
        let mut links = n;
        let mut tries = 0;
        while links < want && tries < want * 20 {
            tries += 1;
            let a = rng.below(n as u64) as usize;
            let b = rng.below(n as u64) as usize;
            if g.link(a, b) {
                links += 1;
            }
        }
        g
    }

    /// Nodes `0..n` with exactly these undirected links.
    pub fn from_links(n: usize, links: &[(usize, usize)]) -> Graph {
        let mut g = Graph { adj: vec![Vec::new(); n] };
        for &(a, b) in links {
            assert!(a < n && b < n, "link {a}-{b} outside 0..{n}");
            g.link(a, b);
        }
        g
    }

    fn link(&mut self, a: usize, b: usize) -> bool {
        if a == b || self.adj[a].contains(&b) {
            return false;
        }
        self.adj[a].push(b);
        self.adj[b].push(a);
        true
    }

    pub fn len(&self) -> usize {
        self.adj.len()
    }

    pub fn is_empty(&self) -> bool {
        self.adj.is_empty()
    }

    pub fn links(&self, i: usize) -> &[usize] {
        &self.adj[i]
    }
}

/// Counters over a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetStats {
    /// Messages handed to the network (one per recipient).
    pub sent: u64,
    pub bytes: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Arrived and handled.
    pub delivered: u64,
    /// Due, but the ends were no longer connected.
    pub undeliverable: u64,
    pub largest: usize,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: u64,
    seq: u64,
    from: usize,
    to: usize,
    bytes: Vec<u8>,
}

/// Links, partitions, node liveness and messages in flight.
#[derive(Debug)]
pub struct Network {
    graph: Graph,
    partition: Vec<u32>,
    up: Vec<bool>,
    /// Connected component per node (over up links inside partitions); cached.
    component: Vec<usize>,
    queue: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    pub faults: Faults,
    pub stats: NetStats,
}

impl Network {
    pub fn new(graph: Graph, faults: Faults) -> Network {
        let n = graph.len();
        let mut net = Network {
            graph,
            partition: vec![0; n],
            up: vec![false; n],
            component: vec![0; n],
            queue: BinaryHeap::new(),
            seq: 0,
            faults,
            stats: NetStats::default(),
        };
        net.recompute();
        net
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn set_up(&mut self, i: usize, up: bool) {
        self.up[i] = up;
        self.recompute();
    }

    /// Puts node `i` in partition `partition[i]`; nodes talk only within one.
    pub fn set_partitions(&mut self, partition: Vec<u32>) {
        assert_eq!(partition.len(), self.partition.len());
        self.partition = partition;
        self.recompute();
    }

    pub fn heal(&mut self) {
        self.set_partitions(vec![0; self.partition.len()]);
    }

    fn link_works(&self, a: usize, b: usize) -> bool {
        self.up[a] && self.up[b] && self.partition[a] == self.partition[b]
    }

    fn recompute(&mut self) {
        let n = self.graph.len();
        let mut comp = vec![usize::MAX; n];
        let mut next = 0;
        for s in 0..n {
            if comp[s] != usize::MAX {
                continue;
            }
            comp[s] = next;
            if self.up[s] {
                let mut q = VecDeque::from([s]);
                while let Some(a) = q.pop_front() {
                    for &b in self.graph.links(a) {
                        if comp[b] == usize::MAX && self.link_works(a, b) {
                            comp[b] = next;
                            q.push_back(b);
                        }
                    }
                }
            }
            next += 1;
        }
        self.component = comp;
    }

    /// Whether `a` can reach `b` now (routing through working links).
    pub fn connected(&self, a: usize, b: usize) -> bool {
        self.up[a] && self.up[b] && self.component[a] == self.component[b]
    }

    /// Up nodes reachable from `i`, `i` excluded.
    pub fn reachable(&self, i: usize) -> Vec<usize> {
        (0..self.graph.len()).filter(|&j| j != i && self.connected(i, j)).collect()
    }

    /// Working links of `i`.
    pub fn neighbours(&self, i: usize) -> Vec<usize> {
        self.graph.links(i).iter().copied().filter(|&j| self.link_works(i, j)).collect()
    }

    /// Queues `bytes` from `from` to `to` at tick `now`, applying the faults.
    pub fn send(&mut self, now: u64, from: usize, to: usize, bytes: Vec<u8>, rng: &mut SimRng) {
        self.stats.sent += 1;
        self.stats.bytes += bytes.len() as u64;
        self.stats.largest = self.stats.largest.max(bytes.len());
        if rng.chance(self.faults.loss) {
            self.stats.lost += 1;
            return;
        }
        let copies = if rng.chance(self.faults.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = 1 + rng.below(self.faults.max_delay_ticks.max(1));
            self.seq += 1;
            self.queue.push(Reverse(InFlight { at: now + delay, seq: self.seq, from, to, bytes: bytes.clone() }));
        }
    }

    /// Messages due at tick `now` whose ends are still connected, in arrival order.
    pub fn due(&mut self, now: u64) -> Vec<(usize, usize, Vec<u8>)> {
        let mut out = Vec::new();
        while self.queue.peek().is_some_and(|Reverse(m)| m.at <= now) {
            let Reverse(m) = self.queue.pop().expect("peeked");
            if self.connected(m.from, m.to) {
                self.stats.delivered += 1;
                out.push((m.from, m.to, m.bytes));
            } else {
                self.stats.undeliverable += 1;
            }
        }
        out
    }

    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}
