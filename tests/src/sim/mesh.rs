//! The whole control plane of many routers in one process: connection making,
//! topology gossip, discovery, `--conn-limit` and IPAM, over simulated TCP
//! connections with latency, dial loss, partitions and churn, on a virtual clock.
//!
//! Each [`SimNode`] holds the daemon's decision makers from `meshnet_proto` and
//! drives them as `control::mesh::Mesh` does: [`Dialer`] (what to dial, backoff,
//! tie-break), [`Topology`] (signed entries, merge, garbage collection, routes,
//! discovery candidates), [`Gossip`] (deltas, digest anti-entropy),
//! [`slots::admit_inbound`] (`--conn-limit`, lonely newcomers), [`SendQueue`]
//! (a connection's bounded queue, gossip coalesced) and [`Ipam`]. Real
//! identities, real signatures: every merged entry is verified.
//!
//! What is modelled, not run:
//! - A connection is a pair of queues. A dial reaches the listener of the node
//!   owning the address (after one latency), fails if that node is down (at
//!   once: a reset) or partitioned off or the dial is "lost" (after the 5 s
//!   connect timeout); the handshake takes one more round trip, after which
//!   both sides judge the connection (responder first) as `Mesh::establish` does.
//! - Messages on a connection arrive in order, one latency (drawn per message,
//!   kept in order) after the sender's writer takes them from its queue, which
//!   it does every tick (100 ms).
//! - UDP works at once: a connection is gossiped as established as soon as it is.
//! - A crashed node's connections end at its peers one latency later; a
//!   partition ends connections across it after the heartbeat timeout (35 s).
//! - Routes and garbage collection run at most once per virtual second per node
//!   (the daemon: 100 ms debounce), and whenever a connection ends.
//!
//! Deterministic for a seed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use meshnet_proto::dialer::{self, Dialer, Direction, End, Failure, Keep};
use meshnet_proto::gossip::{self, Gossip};
use meshnet_proto::identity::Identity;
use meshnet_proto::ipam::{Cidr, Config as IpamConfig, Dest, InitMode, Ipam};
use meshnet_proto::sendqueue::{Next, SendQueue};
use meshnet_proto::slots::{self, Admit, Held, Need};
use meshnet_proto::topology::{ConnInfo, PeerInfo, SignedPeerInfo, Topology};
use meshnet_proto::trust::{Binding, KeyBook, Signer};
use meshnet_proto::wire::control::{encode_message, split_gossip, ControlMsg, GOSSIP_CHUNK};
use meshnet_proto::PeerName;

use super::net::SimRng;

pub const TICK_MS: u64 = 100;
const CONNECT_TIMEOUT_MS: u64 = 5_000;
const HEARTBEAT_DEAD_MS: u64 = 35_000;
const ROUTES_EVERY_MS: u64 = 1_000;
const PORT: u16 = 6783;
const REPLACED: &str = "replaced by a newer connection";
const ALREADY_CONNECTED: &str = "already connected to";
const SELF_CONNECTION: &str = "connected to ourselves";

/// The simulation's knobs.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    pub conn_limit: usize,
    /// One-way latency of a message, drawn uniformly in this range (ms).
    pub latency_ms: (u64, u64),
    /// Probability that a dial is lost (no answer: connect timeout).
    pub dial_loss: f64,
    /// Run IPAM (every initial node in consensus over the initial count).
    pub ipam: Option<Cidr>,
    pub seed: u64,
}

/// Bytes and messages sent, by kind (each counted once, on the link it crossed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub topology_msgs: u64,
    pub topology_bytes: u64,
    /// Of `topology_bytes`: digests and summaries.
    pub anti_entropy_bytes: u64,
    pub ipam_msgs: u64,
    pub ipam_bytes: u64,
    pub other_msgs: u64,
    pub other_bytes: u64,
}

impl Traffic {
    pub fn since(&self, before: &Traffic) -> Traffic {
        Traffic {
            topology_msgs: self.topology_msgs - before.topology_msgs,
            topology_bytes: self.topology_bytes - before.topology_bytes,
            anti_entropy_bytes: self.anti_entropy_bytes - before.anti_entropy_bytes,
            ipam_msgs: self.ipam_msgs - before.ipam_msgs,
            ipam_bytes: self.ipam_bytes - before.ipam_bytes,
            other_msgs: self.other_msgs - before.other_msgs,
            other_bytes: self.other_bytes - before.other_bytes,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.topology_bytes + self.ipam_bytes + self.other_bytes
    }
}

/// Connection-level counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub dials: u64,
    pub dials_failed: u64,
    pub established: u64,
    pub refused_conn_limit: u64,
    pub lonely_accepted: u64,
    pub shed: u64,
    pub duplicates: u64,
    pub closed: u64,
    pub entries_rejected: u64,
    pub ipam_errors: u64,
}

struct Conn {
    /// The node at the other end, and its id for this connection.
    peer_node: usize,
    peer_conn: u64,
    direction: Direction,
    established: bool,
    peer: Option<PeerName>,
    /// The peer's listen address.
    listen: SocketAddr,
    queue: SendQueue,
    /// When the last message on it arrives (keeps delivery in order).
    last_arrival: u64,
}

/// One simulated router.
pub struct SimNode {
    pub name: PeerName,
    pub addr: SocketAddr,
    identity: Identity,
    signer: Arc<Signer>,
    binding: Binding,
    pub keys: KeyBook,
    pub up: bool,
    /// Bumped at every start: events for an old incarnation are dropped.
    epoch: u64,
    pub partition: u32,
    pub topology: Topology,
    pub gossip: Gossip,
    pub dialer: Dialer,
    pub ipam: Option<Ipam>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    targets: Vec<String>,
    hints: Vec<String>,
    discovery_stale: bool,
    /// The connection maker was notified (a change) or is due at `wake_at`.
    maker_due: bool,
    wake_at: Option<u64>,
    routes_dirty: bool,
    routes_at: u64,
    pub next_hop: HashMap<PeerName, PeerName>,
}

enum Event {
    /// A dial reached `to`'s listener (or not): the handshake starts.
    Connect { from: usize, epoch: u64, conn: u64, to: usize, need: Need },
    /// The handshake finished: both sides judge.
    Handshake { a: usize, a_epoch: u64, a_conn: u64, b: usize, b_epoch: u64, need: Need },
    DialFailed { node: usize, epoch: u64, dial: u64, why: Failure },
    Deliver { to: usize, epoch: u64, conn: u64, msg: ControlMsg },
    /// The connection died under `node` (the peer crashed, or a partition).
    Lost { node: usize, epoch: u64, conn: u64, why: String },
}

/// The simulated mesh.
pub struct MeshSim {
    pub cfg: MeshConfig,
    pub now: u64,
    pub nodes: Vec<SimNode>,
    by_addr: HashMap<String, usize>,
    events: BinaryHeap<Reverse<(u64, u64)>>,
    payloads: HashMap<u64, Event>,
    seq: u64,
    pub rng: SimRng,
    pub traffic: Traffic,
    pub counters: Counters,
    /// Encoded size of each signed entry version seen (name, uid, version).
    entry_size: HashMap<(PeerName, u64, u64), u64>,
    /// Nodes created so far (names and identities follow the index).
    initial: usize,
}

/// The identity of simulated router `i`.
pub fn node_identity(i: usize, seed: u64) -> Identity {
    let mut k = [0x5au8; 32];
    k[..8].copy_from_slice(&(i as u64).to_be_bytes());
    k[8..16].copy_from_slice(&seed.to_be_bytes());
    Identity::from_private(k).expect("any 32 bytes make an X25519 key")
}

/// The listen address of simulated router `i`.
pub fn node_addr(i: usize) -> SocketAddr {
    let i = i as u32 + 1;
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], PORT))
}

fn is_duplicate(why: &str) -> bool {
    [REPLACED, ALREADY_CONNECTED, SELF_CONNECTION].iter().any(|r| why.contains(r))
}

impl SimNode {
    fn new(i: usize, seed: u64) -> SimNode {
        let identity = node_identity(i, seed);
        let name = PeerName(0x0200_0000_0000 | (i as u64 + 1));
        let signer = Arc::new(Signer::from_identity(&identity));
        let binding = Binding::new(name, &identity, &signer);
        let topology = Topology::new(PeerInfo {
            name,
            nickname: String::new(),
            uid: 0,
            version: 0,
            software: String::new(),
            mtu: 0,
            connections: Vec::new(),
        });
        SimNode {
            name,
            addr: node_addr(i),
            identity,
            signer,
            binding,
            keys: KeyBook::new(),
            up: false,
            epoch: 0,
            partition: 0,
            topology,
            gossip: Gossip::new(),
            dialer: Dialer::default(),
            ipam: None,
            conns: BTreeMap::new(),
            next_conn: 1,
            targets: Vec::new(),
            hints: Vec::new(),
            discovery_stale: true,
            maker_due: true,
            wake_at: None,
            routes_dirty: true,
            routes_at: 0,
            next_hop: HashMap::new(),
        }
    }

    fn established(&self) -> usize {
        self.conns.values().filter(|c| c.established).count()
    }

    fn slots_used(&self) -> usize {
        self.conns.values().filter(|c| c.established || c.direction == Direction::Outbound).count()
    }

    /// Established connections, by peer node.
    pub fn neighbours(&self) -> Vec<usize> {
        self.conns.values().filter(|c| c.established).map(|c| c.peer_node).collect()
    }

    pub fn established_count(&self) -> usize {
        self.established()
    }
}

impl MeshSim {
    /// `n` nodes, none started.
    pub fn new(n: usize, cfg: MeshConfig) -> MeshSim {
        let nodes: Vec<SimNode> = (0..n).map(|i| SimNode::new(i, cfg.seed)).collect();
        let by_addr = nodes.iter().enumerate().map(|(i, n)| (n.addr.to_string(), i)).collect();
        MeshSim {
            rng: SimRng::new(cfg.seed),
            cfg,
            now: 0,
            nodes,
            by_addr,
            events: BinaryHeap::new(),
            payloads: HashMap::new(),
            seq: 0,
            traffic: Traffic::default(),
            counters: Counters::default(),
            entry_size: HashMap::new(),
            initial: n,
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn up(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].up).collect()
    }

    /// Adds a node (not started); its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        self.nodes.push(SimNode::new(i, self.cfg.seed));
        self.by_addr.insert(self.nodes[i].addr.to_string(), i);
        i
    }

    /// Starts node `i` fresh (a new incarnation: new uid, empty topology),
    /// told only about `target` (`meshnet launch <target>`).
    pub fn start(&mut self, i: usize, target: Option<usize>) {
        let uid = self.rng.next_u64() | 1;
        let ipam_cfg = self.cfg.ipam.map(|u| {
            let init = if i < self.initial { InitMode::Consensus(self.initial as u32) } else { InitMode::Observer };
            (u, init, IpamConfig { rng_seed: self.rng.next_u64() | 1, ..IpamConfig::default() })
        });
        let target = target.map(|t| self.nodes[t].addr.to_string());
        let n = &mut self.nodes[i];
        assert!(!n.up, "node {i} is running");
        n.up = true;
        n.epoch += 1;
        let me = PeerInfo {
            name: n.name,
            nickname: format!("h{i}"),
            uid,
            version: 1,
            software: "sim".into(),
            mtu: 1376,
            connections: Vec::new(),
        };
        n.topology = Topology::with_signer(me, n.signer.clone(), n.binding.clone());
        n.keys = KeyBook::new();
        n.keys.admit(&n.binding).expect("own binding");
        n.gossip = Gossip::new();
        n.dialer = Dialer::default();
        n.targets = target.into_iter().collect();
        n.dialer.set_targets(n.targets.iter().cloned());
        n.hints.clear();
        n.conns.clear();
        n.discovery_stale = true;
        n.maker_due = true;
        n.wake_at = None;
        n.routes_dirty = true;
        n.next_hop.clear();
        n.ipam = ipam_cfg.map(|(u, init, c)| Ipam::with_config(n.name, u, init, c, &n.identity).expect("IPAM config"));
    }

    /// Node `i` crashes: its peers see their connections close one latency later.
    pub fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if !n.up {
            return;
        }
        n.up = false;
        n.ipam = None;
        let ends: Vec<(usize, u64)> = n.conns.values().map(|c| (c.peer_node, c.peer_conn)).collect();
        n.conns.clear();
        for (peer, pc) in ends {
            if pc == 0 {
                continue;
            }
            let at = self.now + self.latency();
            let epoch = self.nodes[peer].epoch;
            self.schedule(at, Event::Lost { node: peer, epoch, conn: pc, why: "peer closed the connection".into() });
        }
    }

    /// Puts node `i` in partition `p[i]`. Connections across partitions end
    /// after the heartbeat timeout; dials across them time out.
    pub fn set_partitions(&mut self, p: &[u32]) {
        for (i, &g) in p.iter().enumerate() {
            self.nodes[i].partition = g;
        }
        for i in 0..self.nodes.len() {
            let crossing: Vec<u64> = self.nodes[i]
                .conns
                .iter()
                .filter(|(_, c)| self.nodes[c.peer_node].partition != self.nodes[i].partition)
                .map(|(&id, _)| id)
                .collect();
            let epoch = self.nodes[i].epoch;
            for conn in crossing {
                let at = self.now + HEARTBEAT_DEAD_MS;
                self.schedule(at, Event::Lost { node: i, epoch, conn, why: "no heartbeat for 35s".into() });
            }
        }
    }

    pub fn heal(&mut self) {
        let p = vec![0; self.nodes.len()];
        self.set_partitions(&p);
    }

    fn latency(&mut self) -> u64 {
        let (lo, hi) = self.cfg.latency_ms;
        lo + self.rng.below(hi.saturating_sub(lo) + 1)
    }

    fn schedule(&mut self, at: u64, e: Event) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq)));
        self.payloads.insert(self.seq, e);
    }

    fn reachable_link(&self, a: usize, b: usize) -> bool {
        self.nodes[a].up && self.nodes[b].up && self.nodes[a].partition == self.nodes[b].partition
    }

    /// Runs until `until` (ms): events in time order, and every node's tick
    /// work at each tick boundary.
    pub fn run_until(&mut self, until: u64) {
        while self.now < until {
            let next_tick = (self.now / TICK_MS + 1) * TICK_MS;
            while let Some(&Reverse((at, seq))) = self.events.peek() {
                if at >= next_tick {
                    break;
                }
                self.events.pop();
                self.now = self.now.max(at);
                let e = self.payloads.remove(&seq).expect("scheduled");
                self.handle(e);
            }
            self.now = next_tick;
            for i in 0..self.nodes.len() {
                if self.nodes[i].up {
                    self.tick_node(i);
                }
            }
            for i in 0..self.nodes.len() {
                if self.nodes[i].up {
                    self.flush(i);
                }
            }
        }
    }

    pub fn run_for(&mut self, ms: u64) {
        let until = self.now + ms;
        self.run_until(until);
    }

    fn tick_node(&mut self, i: usize) {
        let now = self.now;
        // Routes and garbage collection (route_loop), IPAM's peers.
        let n = &mut self.nodes[i];
        if n.routes_dirty && now >= n.routes_at + ROUTES_EVERY_MS {
            self.recompute_routes(i);
        }
        // Over the limit: shed what is redundant (`Mesh::shed_excess`).
        let n = &mut self.nodes[i];
        if n.established() > self.cfg.conn_limit {
            if let Some(shed) = slots::excess(self.cfg.conn_limit, &held(n), &n.topology.graph()) {
                self.counters.shed += 1;
                if let Some(c) = self.nodes[i].conns.get_mut(&shed) {
                    c.queue.push(ControlMsg::Goodbye("over its connection limit".into()));
                }
                self.flush_conn(i, shed);
                self.drop_conn(i, shed, End::Duplicate);
            }
        }
        // The connection maker.
        let n = &mut self.nodes[i];
        if n.maker_due || n.wake_at.is_some_and(|t| t <= now) {
            n.maker_due = false;
            self.due_dials(i);
        }
        // Gossip anti-entropy.
        let random = self.rng.next_u64();
        let n = &mut self.nodes[i];
        let out = n.gossip.tick(now, random, &n.topology);
        self.perform(i, out);
        // IPAM timers.
        if let Some(ipam) = self.nodes[i].ipam.as_mut() {
            if ipam.poll_timeout().is_some_and(|t| t <= now) {
                ipam.handle_timeout(now);
            }
        }
        self.ipam_flush(i);
    }

    fn recompute_routes(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.routes_dirty = false;
        n.routes_at = self.now;
        if !n.topology.garbage_collect().is_empty() {
            n.discovery_stale = true;
            n.maker_due = true;
        }
        n.next_hop = n.topology.routes();
        if let Some(ipam) = n.ipam.as_mut() {
            let live: Vec<PeerName> = n.next_hop.keys().copied().collect();
            ipam.peers_changed(&live);
        }
    }

    /// `Mesh::due_dials` and the dials the connection maker starts.
    fn due_dials(&mut self, i: usize) {
        let now = self.now;
        let random = self.rng.next_u64();
        let n = &mut self.nodes[i];
        if n.discovery_stale {
            let connected: HashSet<PeerName> = n.conns.values().filter_map(|c| c.peer).collect();
            let mut list = slots::discovery_addresses(&n.topology, &connected, n.established(), self.cfg.conn_limit);
            list.extend(n.hints.iter().cloned());
            n.dialer.set_candidates(list);
            n.discovery_stale = false;
        }
        // A due connect target that is a peer of our mesh already at our limit
        // would refuse us: not dialled for a while unless we need connections
        // (without this, routers below their limit redial a full seed forever).
        if n.established() >= 2 {
            let due: Vec<String> = n.dialer.due_targets(now).map(str::to_string).collect();
            if !due.is_empty() {
                let full = slots::full_addresses(&n.topology, n.established(), self.cfg.conn_limit);
                for t in due.iter().filter(|t| full.contains(*t)) {
                    n.dialer.hold(t, now, now + dialer::SATISFIED_MS);
                }
            }
        }
        // Only when no slot is free: is a due connect target outside our mesh?
        let used = n.slots_used();
        let outside = used >= self.cfg.conn_limit && n.dialer.due_targets(now).next().is_some() && {
            let known: HashSet<String> =
                n.topology.peers().flat_map(|p| p.connections.iter().map(|c| c.addr.to_string())).collect();
            n.dialer.due_targets(now).any(|t| !known.contains(t))
        };
        let free = slots::dial_slots(self.cfg.conn_limit, used, outside);
        let poll = n.dialer.poll(now, random, free);
        n.wake_at = poll.wake_at;
        for d in poll.dials {
            self.counters.dials += 1;
            let target = self.by_addr.get(&d.key).copied();
            let epoch = self.nodes[i].epoch;
            let lat = self.latency();
            let lost = self.rng.chance(self.cfg.dial_loss);
            match target {
                Some(t) if self.nodes[t].up && self.reachable_link(i, t) && !lost => {
                    let n = &mut self.nodes[i];
                    let conn = n.next_conn;
                    n.next_conn += 1;
                    let listen = self.nodes[t].addr;
                    let n = &mut self.nodes[i];
                    n.conns.insert(
                        conn,
                        Conn {
                            peer_node: t,
                            peer_conn: 0,
                            direction: Direction::Outbound,
                            established: false,
                            peer: None,
                            listen,
                            queue: SendQueue::default(),
                            last_arrival: 0,
                        },
                    );
                    n.dialer.registered(d.id, conn);
                    let need = Need::from_capabilities(Need::capabilities(n.established()));
                    self.schedule(now + lat, Event::Connect { from: i, epoch, conn, to: t, need });
                }
                Some(t) if !self.nodes[t].up && self.nodes[t].partition == self.nodes[i].partition && !lost => {
                    // Connection refused: at once (a reset).
                    let why = Failure::Connect(format!("cannot reach {}: Connection refused", d.key));
                    self.schedule(now + 2 * lat, Event::DialFailed { node: i, epoch, dial: d.id, why });
                }
                _ => {
                    let why = Failure::Connect(format!("cannot reach {}: timed out", d.key));
                    self.schedule(now + CONNECT_TIMEOUT_MS, Event::DialFailed { node: i, epoch, dial: d.id, why });
                }
            }
        }
    }

    fn handle(&mut self, e: Event) {
        match e {
            Event::Connect { from, epoch, conn, to, need } => {
                if self.nodes[from].epoch != epoch || !self.nodes[from].conns.contains_key(&conn) {
                    return;
                }
                if !self.reachable_link(from, to) {
                    // Gone meanwhile: the handshake times out.
                    let at = self.now + 10_000;
                    self.schedule(at, Event::Lost { node: from, epoch, conn, why: "handshake timed out".into() });
                    return;
                }
                let lat = self.latency();
                let b_epoch = self.nodes[to].epoch;
                self.schedule(
                    self.now + 2 * lat,
                    Event::Handshake { a: from, a_epoch: epoch, a_conn: conn, b: to, b_epoch, need },
                );
            }
            Event::Handshake { a, a_epoch, a_conn, b, b_epoch, need } => self.handshake(a, a_epoch, a_conn, b, b_epoch, need),
            Event::DialFailed { node, epoch, dial, why } => {
                if self.nodes[node].epoch == epoch && self.nodes[node].up {
                    self.counters.dials_failed += 1;
                    let random = self.rng.next_u64();
                    let n = &mut self.nodes[node];
                    n.dialer.failed(dial, self.now, random, why);
                    n.maker_due = true;
                }
            }
            Event::Deliver { to, epoch, conn, msg } => {
                if self.nodes[to].epoch == epoch && self.nodes[to].up && self.nodes[to].conns.contains_key(&conn) {
                    self.receive(to, conn, msg);
                }
            }
            Event::Lost { node, epoch, conn, why } => {
                if self.nodes[node].epoch == epoch && self.nodes[node].up {
                    self.unregister(node, conn, &why);
                }
            }
        }
    }

    /// Both ends judge a completed handshake: the responder `b` first (as the
    /// daemon's responder establishes before its key confirmation reaches `a`).
    fn handshake(&mut self, a: usize, a_epoch: u64, a_conn: u64, b: usize, b_epoch: u64, need: Need) {
        if self.nodes[a].epoch != a_epoch || !self.nodes[a].up || !self.nodes[a].conns.contains_key(&a_conn) {
            return;
        }
        if self.nodes[b].epoch != b_epoch || !self.reachable_link(a, b) {
            self.unregister(a, a_conn, "handshake timed out");
            return;
        }
        let b_conn = {
            let listen = self.nodes[a].addr;
            let n = &mut self.nodes[b];
            let id = n.next_conn;
            n.next_conn += 1;
            n.conns.insert(
                id,
                Conn {
                    peer_node: a,
                    peer_conn: a_conn,
                    direction: Direction::Inbound,
                    established: false,
                    peer: None,
                    listen,
                    queue: SendQueue::default(),
                    last_arrival: 0,
                },
            );
            id
        };
        self.nodes[a].conns.get_mut(&a_conn).expect("checked").peer_conn = b_conn;
        let b_result = self.establish(b, b_conn, a, need);
        let a_result = self.establish(a, a_conn, b, Need::Enough);
        for (node, conn, result) in [(b, b_conn, b_result), (a, a_conn, a_result)] {
            if let Err((why, first)) = result {
                // Tell the peer (topology first when refused for the limit), then close.
                let n = &mut self.nodes[node];
                if let Some(c) = n.conns.get_mut(&conn) {
                    for m in first {
                        c.queue.push(m);
                    }
                    c.queue.push(ControlMsg::Goodbye(why.clone()));
                }
                self.flush_conn(node, conn);
                self.unregister(node, conn, &why);
            }
        }
    }

    /// `Mesh::establish`: `need` is what the peer's Hello says.
    fn establish(&mut self, i: usize, id: u64, peer_node: usize, need: Need) -> Result<(), (String, Vec<ControlMsg>)> {
        let peer = self.nodes[peer_node].name;
        let me = self.nodes[i].name;
        let limit = self.cfg.conn_limit;
        let n = &mut self.nodes[i];
        if peer == me {
            return Err((SELF_CONNECTION.into(), Vec::new()));
        }
        let Some(this) = n.conns.get(&id) else { return Err(("connection vanished".into(), Vec::new())) };
        let this_dir = this.direction;
        if this_dir == Direction::Inbound {
            let replaces = n.conns.values().any(|c| c.established && c.peer == Some(peer));
            let held = held(n);
            match slots::admit_inbound(limit, &held, replaces, need, peer, &n.topology.graph()) {
                Admit::Accept => {
                    if held.len() >= limit && !replaces {
                        self.counters.lonely_accepted += 1;
                    }
                }
                Admit::AcceptShedding { shed } => {
                    self.counters.lonely_accepted += 1;
                    self.counters.shed += 1;
                    let why = format!("{me} makes room for {peer}, which has too few connections");
                    if let Some(c) = n.conns.get_mut(&shed) {
                        c.queue.push(ControlMsg::Goodbye(why.clone()));
                    }
                    self.flush_conn(i, shed);
                    self.drop_conn(i, shed, End::Duplicate);
                }
                Admit::Refuse => {
                    self.counters.refused_conn_limit += 1;
                    let topo = match need {
                        Need::Enough => Vec::new(),
                        _ => split_gossip(n.topology.gossip_all_signed(), GOSSIP_CHUNK),
                    };
                    return Err((format!("connection limit ({limit}) reached"), topo));
                }
            }
        }
        let n = &mut self.nodes[i];
        let existing: Vec<(u64, Direction)> = n
            .conns
            .iter()
            .filter(|(cid, c)| **cid != id && c.established && c.peer == Some(peer))
            .map(|(cid, c)| (*cid, c.direction))
            .collect();
        for (cid, dir) in existing {
            match dialer::tie_break(me, peer, this_dir, dir) {
                Keep::New => {
                    self.counters.duplicates += 1;
                    if let Some(old) = self.nodes[i].conns.get_mut(&cid) {
                        old.queue.push(ControlMsg::Goodbye(REPLACED.into()));
                    }
                    self.flush_conn(i, cid);
                    self.drop_conn(i, cid, End::Duplicate);
                }
                Keep::Old => {
                    self.counters.duplicates += 1;
                    return Err((format!("{ALREADY_CONNECTED} {peer}"), Vec::new()));
                }
            }
        }
        self.counters.established += 1;
        let now = self.now;
        let n = &mut self.nodes[i];
        let c = n.conns.get_mut(&id).expect("checked");
        c.established = true;
        c.peer = Some(peer);
        if !n.hints.is_empty() {
            n.hints.clear();
            n.discovery_stale = true;
        }
        let out = n.gossip.connected(id, peer, true, now, &n.topology);
        self.perform(i, out);
        let n = &mut self.nodes[i];
        n.dialer.established(id, now);
        self.local_connections_changed(i);
        self.nodes[i].routes_dirty = true;
        Ok(())
    }

    /// `Mesh::unregister`.
    fn unregister(&mut self, i: usize, id: u64, why: &str) {
        let Some(c) = self.nodes[i].conns.get(&id) else { return };
        let end = if is_duplicate(why) {
            End::Duplicate
        } else if c.established {
            End::Failed(Failure::Closed(why.to_string()))
        } else {
            End::Failed(Failure::Handshake(why.to_string()))
        };
        self.drop_conn(i, id, end);
        self.nodes[i].maker_due = true;
    }

    /// `Mesh::drop_conn_locked`; the other end hears of it (a FIN) unless it
    /// was told with a Goodbye already.
    fn drop_conn(&mut self, i: usize, id: u64, end: End) {
        let Some(c) = self.nodes[i].conns.remove(&id) else { return };
        if c.peer_conn != 0 && self.reachable_link(i, c.peer_node) {
            let at = self.now.max(c.last_arrival) + 1;
            let epoch = self.nodes[c.peer_node].epoch;
            self.schedule(at, Event::Lost { node: c.peer_node, epoch, conn: c.peer_conn, why: "peer closed the connection".into() });
        }
        if c.established {
            self.counters.closed += 1;
            self.nodes[i].gossip.disconnected(id);
            self.local_connections_changed(i);
            let n = &mut self.nodes[i];
            if n.established() == 0 {
                let me = n.name;
                n.hints = n
                    .topology
                    .discovery_candidates()
                    .into_iter()
                    .filter(|(p, _)| *p != me)
                    .map(|(_, a)| a.to_string())
                    .collect();
                n.discovery_stale = true;
            }
            if !n.topology.garbage_collect().is_empty() {
                n.discovery_stale = true;
            }
            n.routes_dirty = true;
        }
        let random = self.rng.next_u64();
        let now = self.now;
        self.nodes[i].dialer.ended(id, now, random, end);
    }

    /// `Mesh::local_connections_changed`.
    fn local_connections_changed(&mut self, i: usize) {
        let random = self.rng.next_u64();
        let now = self.now;
        let n = &mut self.nodes[i];
        let listening: Vec<String> = n.conns.values().filter(|c| c.established).map(|c| c.listen.to_string()).collect();
        n.dialer.set_connected(now, random, listening);
        let conns: Vec<ConnInfo> = n
            .conns
            .values()
            .filter(|c| c.established)
            .filter_map(|c| {
                Some(ConnInfo {
                    peer: c.peer?,
                    addr: c.listen,
                    outbound: c.direction == Direction::Outbound,
                    established: true,
                })
            })
            .collect();
        if n.topology.set_local_connections(conns) {
            n.discovery_stale = true;
            n.maker_due = true;
            let out = n.gossip.own_changed(self.now, &n.topology);
            self.perform(i, out);
        }
    }

    fn receive(&mut self, i: usize, conn: u64, msg: ControlMsg) {
        let now = self.now;
        match msg {
            ControlMsg::Goodbye(why) => self.unregister(i, conn, &format!("peer said goodbye: {why}")),
            ControlMsg::Gossip(infos) => self.on_gossip(i, conn, infos),
            ControlMsg::GossipDigest(d) => {
                let n = &mut self.nodes[i];
                let out = n.gossip.on_digest(conn, d, now, &n.topology);
                self.perform(i, out);
            }
            ControlMsg::GossipSummary(s) => {
                let n = &mut self.nodes[i];
                let out = n.gossip.on_summary(conn, &s, now, &n.topology);
                self.perform(i, out);
            }
            ControlMsg::Ipam(bytes) => {
                let n = &mut self.nodes[i];
                let Some(from) = n.conns.get(&conn).and_then(|c| c.peer) else { return };
                if let Some(ipam) = n.ipam.as_mut() {
                    if let Err(e) = ipam.handle_message(from, &bytes, now, &mut n.keys) {
                        if e.is_conflict() {
                            panic!("IPAM conflict in the simulation: {e}");
                        }
                        self.counters.ipam_errors += 1;
                    }
                }
                self.ipam_flush(i);
            }
            // The simulator does not model DNS (its nodes never send it).
            ControlMsg::Heartbeat | ControlMsg::Rekey(_) | ControlMsg::Dns(_) | ControlMsg::Dns6(_) | ControlMsg::Trusted(_) | ControlMsg::Splice(_) => {}
        }
    }

    /// `Mesh::on_gossip`.
    fn on_gossip(&mut self, i: usize, from: u64, infos: Vec<SignedPeerInfo>) {
        let n = &mut self.nodes[i];
        let report = match n.topology.merge_signed(infos, &mut n.keys) {
            Ok(r) => r,
            Err(_) => return,
        };
        self.counters.entries_rejected += report.rejected.len() as u64;
        if !report.changed.is_empty() {
            n.discovery_stale = true;
            n.maker_due = true;
            n.routes_dirty = true;
            let random = self.rng.next_u64();
            let out = n.gossip.relay(&report.changed, from, &n.topology, random);
            self.perform(i, out);
        }
    }

    /// Queues what the gossip schedule decided (`Mesh::perform`).
    fn perform(&mut self, i: usize, out: Vec<gossip::Out>) {
        let n = &mut self.nodes[i];
        for o in out {
            let Some(c) = n.conns.get_mut(&o.to) else { continue };
            let msgs = match o.send {
                gossip::Send::Entries(names) => vec![ControlMsg::Gossip(n.topology.gossip_about_signed(&names))],
                gossip::Send::Everything => vec![ControlMsg::Gossip(n.topology.gossip_all_signed())],
                gossip::Send::Digest(d) => vec![ControlMsg::GossipDigest(d)],
                gossip::Send::Summary(s) => vec![ControlMsg::GossipSummary(s)],
            };
            for m in msgs {
                if !matches!(&m, ControlMsg::Gossip(v) if v.is_empty()) {
                    c.queue.push(m);
                }
            }
        }
    }

    /// IPAM's sends (`Mesh::ipam_flush`): neighbours, or the next hop.
    fn ipam_flush(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let Some(ipam) = n.ipam.as_mut() else { return };
        let mut out = Vec::new();
        while let Some(t) = ipam.poll_transmit() {
            out.push(t);
        }
        while ipam.poll_event().is_some() {}
        for (dest, bytes) in out {
            match dest {
                Dest::Neighbours => {
                    for c in n.conns.values_mut().filter(|c| c.established) {
                        c.queue.push(ControlMsg::Ipam(bytes.clone()));
                    }
                }
                Dest::Peer(p) => {
                    let hop = n.next_hop.get(&p).copied().unwrap_or(p);
                    if let Some(c) = n.conns.values_mut().find(|c| c.established && c.peer == Some(hop)) {
                        c.queue.push(ControlMsg::Ipam(bytes));
                    }
                }
            }
        }
    }

    fn flush(&mut self, i: usize) {
        let ids: Vec<u64> = self.nodes[i].conns.keys().copied().collect();
        for id in ids {
            self.flush_conn(i, id);
        }
    }

    /// The connection's writer: everything queued goes out, in order.
    fn flush_conn(&mut self, i: usize, id: u64) {
        loop {
            let Some(c) = self.nodes[i].conns.get_mut(&id) else { return };
            if c.peer_conn == 0 {
                return;
            }
            let Some(next) = c.queue.pop() else { return };
            let msg = match next {
                Next::Send(m) => m,
                Next::Goodbye(why) => ControlMsg::Goodbye(why),
                Next::Overflow => ControlMsg::Goodbye("send queue full: the peer reads too slowly".into()),
            };
            let (peer, pc, last) = (c.peer_node, c.peer_conn, c.last_arrival);
            let size = self.size_of(&msg);
            match &msg {
                ControlMsg::Gossip(_) => {
                    self.traffic.topology_msgs += 1;
                    self.traffic.topology_bytes += size;
                }
                ControlMsg::GossipDigest(_) | ControlMsg::GossipSummary(_) => {
                    self.traffic.topology_msgs += 1;
                    self.traffic.topology_bytes += size;
                    self.traffic.anti_entropy_bytes += size;
                }
                ControlMsg::Ipam(_) => {
                    self.traffic.ipam_msgs += 1;
                    self.traffic.ipam_bytes += size;
                }
                _ => {
                    self.traffic.other_msgs += 1;
                    self.traffic.other_bytes += size;
                }
            }
            if !self.reachable_link(i, peer) {
                continue;
            }
            let at = (self.now + self.latency()).max(last);
            self.nodes[i].conns.get_mut(&id).expect("present").last_arrival = at;
            let epoch = self.nodes[peer].epoch;
            self.schedule(at, Event::Deliver { to: peer, epoch, conn: pc, msg });
        }
    }

    /// Encoded size on the wire (length prefix included), without encoding
    /// large gossip again: entry sizes are remembered per version.
    fn size_of(&mut self, msg: &ControlMsg) -> u64 {
        match msg {
            ControlMsg::Gossip(infos) => {
                let mut total = 4 + 1 + varint_len(infos.len() as u64);
                for e in infos {
                    let key = (e.info.name, e.info.uid, e.info.version);
                    let size = *self.entry_size.entry(key).or_insert_with(|| {
                        let one = encode_message(&ControlMsg::Gossip(vec![e.clone()])).map_or(0, |b| b.len() as u64);
                        one - 2
                    });
                    total += size;
                }
                total
            }
            other => 4 + encode_message(other).map_or(0, |b| b.len() as u64),
        }
    }

    /// Whether every running node knows exactly the running nodes and routes
    /// to every one of them.
    pub fn converged(&mut self) -> bool {
        let up = self.up();
        let names: HashSet<PeerName> = up.iter().map(|&i| self.nodes[i].name).collect();
        for &i in &up {
            let n = &self.nodes[i];
            if n.topology.peers().count() != names.len() || !n.topology.peers().all(|p| names.contains(&p.name)) {
                return false;
            }
        }
        for &i in &up {
            let n = &mut self.nodes[i];
            if n.routes_dirty {
                n.next_hop = n.topology.routes();
            }
            if n.next_hop.len() + 1 != names.len() {
                return false;
            }
        }
        true
    }

    /// Runs until [`converged`](Self::converged) (checked every second);
    /// the virtual ms it took, or None after `limit_ms`.
    pub fn run_until_converged(&mut self, limit_ms: u64) -> Option<u64> {
        let start = self.now;
        while self.now < start + limit_ms {
            self.run_for(1_000);
            if self.converged() {
                return Some(self.now - start);
            }
        }
        None
    }

    /// Established connections per running node.
    pub fn degrees(&self) -> Vec<usize> {
        self.up().iter().map(|&i| self.nodes[i].established()).collect()
    }

    /// Whether the running nodes' connections form one component.
    pub fn connected_graph(&self) -> bool {
        let up = self.up();
        let Some(&first) = up.first() else { return true };
        let mut seen = HashSet::from([first]);
        let mut stack = vec![first];
        while let Some(i) = stack.pop() {
            for j in self.nodes[i].neighbours() {
                if seen.insert(j) {
                    stack.push(j);
                }
            }
        }
        seen.len() == up.len()
    }

    /// Sum over running nodes of their whole topology's encoded size.
    pub fn topology_bytes(&self) -> u64 {
        self.up()
            .iter()
            .map(|&i| {
                let all = self.nodes[i].topology.gossip_all_signed();
                encode_message(&ControlMsg::Gossip(all)).map_or(0, |b| b.len() as u64)
            })
            .sum()
    }

    /// IPAM: whether every running node agreed on the ring.
    pub fn ipam_agreed(&self) -> bool {
        self.up().iter().all(|&i| self.nodes[i].ipam.as_ref().is_some_and(|p| p.is_agreed()))
    }

    pub fn ipam_mut(&mut self, i: usize) -> &mut Ipam {
        self.nodes[i].ipam.as_mut().expect("IPAM runs")
    }

    /// Runs IPAM's sends after an API call on node `i`.
    pub fn after_ipam_call(&mut self, i: usize) {
        self.ipam_flush(i);
    }

    /// Events not yet handled.
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }
}

/// Established connections as `meshnet_proto::slots` judges them (`control::mesh::held`).
fn held(n: &SimNode) -> Vec<Held> {
    n.conns
        .iter()
        .filter(|(_, c)| c.established)
        .filter_map(|(&conn, c)| {
            let peer = c.peer?;
            let target = c.direction == Direction::Outbound && n.targets.contains(&c.listen.to_string());
            Some(Held {
                conn,
                peer,
                discovered: c.direction == Direction::Outbound && !target,
                target,
                peer_connections: n.topology.get(peer).map_or(0, |p| p.connections.len()),
            })
        })
        .collect()
}

fn varint_len(v: u64) -> u64 {
    // bincode's standard varint: < 251 one byte, then 3, 5 or 9.
    match v {
        0..=250 => 1,
        251..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}
