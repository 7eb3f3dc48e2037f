//! Many IPAM peers in one process over a faulty [`Network`], driven like the
//! daemon drives them, with crashes, restores, permanent deaths and a global
//! check that no address is held by two targets. Every peer has its own
//! identity and key book, and runs the real signing and verification of IPAM
//! messages and records ([`IpamSim::signature_bytes`] counts what that costs).
//!
//! The driver follows the daemon's contract from `meshnet_proto::ipam`: after
//! every API call and after each tick's messages and timers, a dirty peer's
//! snapshot is "written to disk" *before* its messages are sent. A crash keeps
//! that snapshot and the addresses its targets hold (containers outlive the
//! daemon); a restore must give exactly those back.
//!
//! Key books model the daemon's: there, topology gossip pins the binding of
//! every peer a router reaches, and IPAM verifies against that same book. So
//! whenever reachability changes, each running peer's book admits the bindings
//! of the peers it now reaches (IPAM gossip itself carries only its sender's).

use std::collections::HashMap;
use std::net::IpAddr;

use meshnet_proto::identity::Identity;
use meshnet_proto::ipam::space::addr_value;
use meshnet_proto::ipam::{Allocation, Cidr, Config, Dest, Event, InitMode, Ipam, IpamError, Request};
use meshnet_proto::trust::{Binding, KeyBook, Signer};
use meshnet_proto::PeerName;

use super::net::{Faults, Graph, Network, SimRng};

/// The identity of simulated peer `i` (deterministic per seed).
pub fn sim_identity(i: usize, seed: u64) -> Identity {
    let mut k = [0x33u8; 32];
    k[..8].copy_from_slice(&(i as u64).to_be_bytes());
    k[8..16].copy_from_slice(&seed.to_be_bytes());
    Identity::from_private(k).expect("any 32 bytes make an X25519 key")
}

/// The name of simulated peer `i`.
pub fn peer_name(i: usize) -> PeerName {
    PeerName(0x0200_0000_0000 | (i as u64 + 1))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    NotStarted,
    Up,
    /// The daemon is down; its targets keep their addresses.
    Crashed,
    /// Gone for good, with its targets.
    Gone,
}

pub struct Node {
    pub name: PeerName,
    /// The peer's long-term key (its signing key derives from it).
    pub identity: Identity,
    /// Its name bound to its keys (what topology gossip carries).
    pub binding: Binding,
    /// The daemon's key book (persisted, so it survives a crash).
    pub keys: KeyBook,
    pub init: InitMode,
    pub status: Status,
    pub ipam: Option<Ipam>,
    /// The last snapshot written "to disk".
    pub persisted: Option<Vec<u8>>,
    /// What the targets hold while the daemon is down.
    pub frozen: Vec<(IpAddr, String)>,
    /// Events not yet taken by the workload.
    pub events: Vec<Event>,
}

/// The simulated mesh.
pub struct IpamSim {
    pub universe: Cidr,
    pub config: Config,
    pub tick_ms: u64,
    pub tick: u64,
    pub nodes: Vec<Node>,
    pub net: Network,
    pub rng: SimRng,
    /// Errors from `handle_message`: (receiver, error).
    pub errors: Vec<(usize, IpamError)>,
    pub snapshots_written: u64,
    pub snapshot_bytes_written: u64,
    /// Bytes of signatures, proofs and bindings in the messages sent (part of
    /// the network's byte count).
    pub signature_bytes: u64,
    /// Messages sent and where their bytes went, by kind of message.
    pub costs: Costs,
    index: HashMap<PeerName, usize>,
    restarts: u64,
}

impl IpamSim {
    /// Nodes are created but not started (see [`IpamSim::start`]).
    pub fn new(universe: Cidr, inits: Vec<InitMode>, graph: Graph, faults: Faults, seed: u64) -> IpamSim {
        assert_eq!(inits.len(), graph.len());
        let nodes: Vec<Node> = inits
            .into_iter()
            .enumerate()
            .map(|(i, init)| {
                let identity = sim_identity(i, seed);
                let binding = Binding::new(peer_name(i), &identity, &Signer::from_identity(&identity));
                (i, init, identity, binding)
            })
            .map(|(i, init, identity, binding)| Node {
                name: peer_name(i),
                identity,
                binding,
                keys: KeyBook::new(),
                init,
                status: Status::NotStarted,
                ipam: None,
                persisted: None,
                frozen: Vec::new(),
                events: Vec::new(),
            })
            .collect();
        let index = nodes.iter().enumerate().map(|(i, n)| (n.name, i)).collect();
        IpamSim {
            universe,
            config: Config { rng_seed: 0, ..Config::default() },
            tick_ms: 100,
            tick: 0,
            nodes,
            net: Network::new(graph, faults),
            rng: SimRng::new(seed),
            errors: Vec::new(),
            snapshots_written: 0,
            snapshot_bytes_written: 0,
            signature_bytes: 0,
            costs: Costs::default(),
            index,
            restarts: seed.wrapping_mul(1_000_003),
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn now_ms(&self) -> u64 {
        self.tick * self.tick_ms
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].status == Status::Up
    }

    pub fn up_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.is_up(i)).collect()
    }

    pub fn ipam(&self, i: usize) -> &Ipam {
        self.nodes[i].ipam.as_ref().expect("node is up")
    }

    fn config_for(&mut self, i: usize) -> Config {
        self.restarts += 1;
        Config { rng_seed: (self.restarts << 20) ^ (i as u64 + 1) ^ self.config.rng_seed, ..self.config.clone() }
    }

    /// Starts node `i` fresh.
    pub fn start(&mut self, i: usize) {
        assert_eq!(self.nodes[i].status, Status::NotStarted);
        let cfg = self.config_for(i);
        let n = &mut self.nodes[i];
        n.ipam = Some(Ipam::with_config(n.name, self.universe, n.init.clone(), cfg, &n.identity).expect("valid config"));
        n.status = Status::Up;
        self.persist(i);
        self.net.set_up(i, true);
        self.refresh_topology();
    }

    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].status == Status::NotStarted {
                let cfg = self.config_for(i);
                let n = &mut self.nodes[i];
                n.ipam = Some(Ipam::with_config(n.name, self.universe, n.init.clone(), cfg, &n.identity).expect("valid config"));
                n.status = Status::Up;
                self.persist(i);
                self.net.set_up(i, true);
            }
        }
        self.refresh_topology();
    }

    /// Tells every running peer who it can reach now, and pins their bindings
    /// in its key book (what the daemon's topology gossip does).
    fn refresh_topology(&mut self) {
        let names: Vec<PeerName> = self.nodes.iter().map(|n| n.name).collect();
        for i in 0..self.nodes.len() {
            if self.is_up(i) {
                let reach = self.net.reachable(i);
                for &j in &reach {
                    let b = &self.nodes[j].binding;
                    if self.nodes[i].keys.get(b.name) != Some(&b.keys) {
                        let b = b.clone();
                        self.nodes[i].keys.admit(&b).expect("simulated peers' bindings are valid and distinct");
                    }
                }
                let live: Vec<PeerName> = reach.into_iter().map(|j| names[j]).collect();
                self.nodes[i].ipam.as_mut().expect("up").peers_changed(&live);
                self.persist(i);
            }
        }
    }

    pub fn set_partitions(&mut self, partition: Vec<u32>) {
        self.net.set_partitions(partition);
        self.refresh_topology();
    }

    pub fn heal(&mut self) {
        self.net.heal();
        self.refresh_topology();
    }

    /// The daemon of `i` dies; its snapshot and its targets' addresses stay.
    pub fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        assert_eq!(n.status, Status::Up);
        let ipam = n.ipam.take().expect("up");
        n.frozen = ipam.allocations().map(|(ip, t)| (ip, t.to_string())).collect();
        n.status = Status::Crashed;
        n.events.clear();
        self.net.set_up(i, false);
        self.refresh_topology();
    }

    /// Restarts a crashed daemon from its snapshot, then releases targets that
    /// went away while it was down (`gone`). Returns what the restored peer holds.
    pub fn restore(&mut self, i: usize, gone: &[String]) -> Result<Vec<(IpAddr, String)>, IpamError> {
        assert_eq!(self.nodes[i].status, Status::Crashed);
        let cfg = self.config_for(i);
        let n = &mut self.nodes[i];
        let bytes = n.persisted.clone().expect("a crashed node wrote a snapshot");
        let mut ipam = Ipam::restore(n.name, self.universe, n.init.clone(), cfg, &bytes, &n.identity)?;
        let live: Vec<String> = n.frozen.iter().map(|(_, t)| t.clone()).filter(|t| !gone.contains(t)).collect();
        ipam.release_missing(&live);
        n.frozen.clear();
        let held = ipam.allocations().map(|(ip, t)| (ip, t.to_string())).collect();
        n.ipam = Some(ipam);
        n.status = Status::Up;
        self.persist(i);
        self.net.set_up(i, true);
        self.refresh_topology();
        Ok(held)
    }

    /// Node `i` is gone for good, with its targets.
    pub fn kill(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.ipam = None;
        n.frozen.clear();
        n.status = Status::Gone;
        self.net.set_up(i, false);
        self.refresh_topology();
    }

    fn persist(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if let Some(ipam) = n.ipam.as_mut() {
            if ipam.needs_save() {
                let s = ipam.snapshot();
                self.snapshots_written += 1;
                self.snapshot_bytes_written += s.len() as u64;
                n.persisted = Some(s);
                ipam.saved();
            }
        }
    }

    pub fn allocate(&mut self, i: usize, target: &str, req: Request) -> Result<Allocation, IpamError> {
        let now = self.now_ms();
        let r = self.nodes[i].ipam.as_mut().expect("up").allocate(target, req, now);
        self.persist(i);
        r
    }

    pub fn free(&mut self, i: usize, target: &str, ip: IpAddr) -> bool {
        let r = self.nodes[i].ipam.as_mut().expect("up").free(target, ip);
        self.persist(i);
        r
    }

    pub fn free_target(&mut self, i: usize, target: &str) -> Vec<IpAddr> {
        let r = self.nodes[i].ipam.as_mut().expect("up").free_target(target);
        self.persist(i);
        r
    }

    pub fn rmpeer(&mut self, i: usize, dead: usize) -> Result<u128, IpamError> {
        let name = self.nodes[dead].name;
        let r = self.nodes[i].ipam.as_mut().expect("up").rmpeer(name);
        self.persist(i);
        r
    }

    /// One tick: deliver what is due, run due timers, persist, send.
    pub fn step(&mut self) {
        self.tick += 1;
        let now = self.now_ms();
        for (from, to, bytes) in self.net.due(self.tick) {
            let from_name = self.nodes[from].name;
            let node = &mut self.nodes[to];
            if let Some(ipam) = node.ipam.as_mut() {
                if let Err(e) = ipam.handle_message(from_name, &bytes, now, &mut node.keys) {
                    self.errors.push((to, e));
                }
            }
        }
        for i in 0..self.nodes.len() {
            if let Some(ipam) = self.nodes[i].ipam.as_mut() {
                if ipam.poll_timeout().is_some_and(|t| t <= now) {
                    ipam.handle_timeout(now);
                }
            }
        }
        for i in 0..self.nodes.len() {
            if !self.is_up(i) {
                continue;
            }
            self.persist(i);
            let mut out = Vec::new();
            let node = &mut self.nodes[i];
            let ipam = node.ipam.as_mut().expect("up");
            while let Some(t) = ipam.poll_transmit() {
                out.push(t);
            }
            while let Some(e) = ipam.poll_event() {
                node.events.push(e);
            }
            for (dest, bytes) in out {
                let sig = meshnet_proto::ipam::wire::signature_overhead(&bytes) as u64;
                let cost = meshnet_proto::ipam::wire::message_cost(&bytes);
                match dest {
                    Dest::Neighbours => {
                        for j in self.net.neighbours(i) {
                            self.signature_bytes += sig;
                            self.costs.add(cost);
                            self.net.send(self.tick, i, j, bytes.clone(), &mut self.rng);
                        }
                    }
                    Dest::Peer(p) => {
                        // The daemon routes it; unreachable peers get nothing.
                        if let Some(&j) = self.index.get(&p) {
                            if self.net.connected(i, j) {
                                self.signature_bytes += sig;
                                self.costs.add(cost);
                                self.net.send(self.tick, i, j, bytes, &mut self.rng);
                            }
                        }
                    }
                }
            }
        }
    }

    pub fn run(&mut self, ticks: u64) {
        for _ in 0..ticks {
            self.step();
        }
    }

    /// Every address held by a target: by running peers, and by the targets of
    /// crashed ones. Errors if one address is held twice; else the count.
    pub fn check_unique(&self) -> Result<usize, String> {
        let mut seen: HashMap<IpAddr, (usize, String)> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let held: Vec<(IpAddr, String)> = match (&n.status, &n.ipam) {
                (Status::Up, Some(ipam)) => ipam.allocations().map(|(ip, t)| (ip, t.to_string())).collect(),
                (Status::Crashed, _) => n.frozen.clone(),
                _ => Vec::new(),
            };
            for (ip, t) in held {
                if !self.universe.contains(ip) {
                    return Err(format!("{ip} held by {t} on node {i} is outside {}", self.universe));
                }
                if let Some((j, u)) = seen.insert(ip, (i, t.clone())) {
                    return Err(format!("{ip} is held by {u} on node {j} and by {t} on node {i} at tick {}", self.tick));
                }
            }
        }
        Ok(seen.len())
    }

    /// All running peers hold the same ring bytes.
    pub fn rings_equal(&self) -> bool {
        let mut rings = self.nodes.iter().filter_map(|n| n.ipam.as_ref().map(|i| i.ring_bytes()));
        match rings.next() {
            None => true,
            Some(first) => rings.all(|r| r == first),
        }
    }

    /// Steps until every running peer holds the same ring and nothing is in
    /// flight; returns the ticks it took, or `None` after `max_ticks`.
    pub fn run_until_converged(&mut self, max_ticks: u64) -> Option<u64> {
        for t in 0..=max_ticks {
            if self.net.in_flight() == 0 && self.rings_equal() {
                return Some(t);
            }
            self.step();
        }
        None
    }

    /// Bytes of all running peers' snapshots (their whole state).
    pub fn state_bytes(&mut self) -> u64 {
        self.nodes.iter_mut().filter_map(|n| n.ipam.as_mut()).map(|i| i.snapshot().len() as u64).sum()
    }
}

/// Messages sent (once per link) and their bytes, by kind and by part.
#[derive(Clone, Debug, Default)]
pub struct Costs {
    /// Kind of message (see `wire::message_cost`) -> (messages, bytes).
    pub kinds: std::collections::BTreeMap<&'static str, (u64, u64)>,
    /// The parts of all of them, summed.
    pub parts: MessageCostSum,
}

/// [`meshnet_proto::ipam::wire::MessageCost`] summed over messages.
#[derive(Clone, Copy, Debug, Default)]
pub struct MessageCostSum {
    pub total: u64,
    pub bindings: u64,
    pub envelope_sigs: u64,
    pub entries: u64,
    pub proofs: u64,
    pub paxos_records: u64,
    pub paxos_values: u64,
}

impl Costs {
    fn add(&mut self, cost: Option<(&'static str, meshnet_proto::ipam::wire::MessageCost)>) {
        let Some((kind, c)) = cost else { return };
        let k = self.kinds.entry(kind).or_default();
        k.0 += 1;
        k.1 += c.total as u64;
        let p = &mut self.parts;
        p.total += c.total as u64;
        p.bindings += c.bindings as u64;
        p.envelope_sigs += c.envelope_sig as u64;
        p.entries += c.entries as u64;
        p.proofs += c.proofs as u64;
        p.paxos_records += c.paxos_records as u64;
        p.paxos_values += c.paxos_values as u64;
    }

    /// What was sent since `earlier` (a clone of these costs), one line per kind and one of parts.
    pub fn since(&self, earlier: &Costs) -> String {
        let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
        let mut out = String::new();
        for (kind, (n, b)) in &self.kinds {
            let (n0, b0) = earlier.kinds.get(kind).copied().unwrap_or_default();
            if *n > n0 {
                out += &format!("{kind}: {} msgs {}; ", n - n0, mb(b - b0));
            }
        }
        let (p, q) = (&self.parts, &earlier.parts);
        out += &format!(
            "\n    parts: bindings {}, envelope signatures {}, entries+seeds {}, proofs {}, paxos records+sigs {}, paxos values+sigs {}, other {}",
            mb(p.bindings - q.bindings),
            mb(p.envelope_sigs - q.envelope_sigs),
            mb(p.entries - q.entries),
            mb(p.proofs - q.proofs),
            mb(p.paxos_records - q.paxos_records),
            mb(p.paxos_values - q.paxos_values),
            mb((p.total - q.total)
                - (p.bindings - q.bindings)
                - (p.envelope_sigs - q.envelope_sigs)
                - (p.entries - q.entries)
                - (p.proofs - q.proofs)
                - (p.paxos_records - q.paxos_records)
                - (p.paxos_values - q.paxos_values)),
        );
        out
    }
}

/// Counters kept by [`Workload`].
#[derive(Clone, Debug, Default)]
pub struct WorkloadStats {
    pub ready: u64,
    pub pending: u64,
    pub completed_later: u64,
    pub failed_later: u64,
    pub refused: u64,
    pub timed_out: u64,
    pub freed: u64,
    pub exact_ok: u64,
}

/// Random allocations and frees, with the daemon's timeout for pending requests.
pub struct Workload {
    /// `Any` requests pick one of these (the first more often).
    pub subnets: Vec<Cidr>,
    /// Ticks before a pending request is given up (`free_target`).
    pub timeout_ticks: u64,
    /// Stop allocating above this share of the universe in use.
    pub max_fill: f64,
    /// Share of allocations that are exact claims of random addresses.
    pub exact_share: f64,
    next_target: u64,
    /// (node, target, request, since tick)
    waiting: Vec<(usize, String, Request, u64)>,
    pub stats: WorkloadStats,
}

impl Workload {
    pub fn new(universe: Cidr, subnets: Vec<Cidr>) -> Workload {
        let mut all = vec![universe];
        all.extend(subnets);
        Workload {
            subnets: all,
            timeout_ticks: 100,
            max_fill: 0.8,
            exact_share: 0.15,
            next_target: 0,
            waiting: Vec::new(),
            stats: WorkloadStats::default(),
        }
    }

    /// One random operation on a random running peer.
    pub fn op(&mut self, sim: &mut IpamSim) {
        let up = sim.up_nodes();
        let Some(&i) = sim.rng.pick(&up) else { return };
        let held: usize = up.iter().map(|&j| sim.ipam(j).allocations().count()).sum();
        let fill = held as f64 / sim.universe.size() as f64;
        let alloc_p = if fill > self.max_fill { 0.2 } else { 0.55 };
        if sim.rng.chance(alloc_p) {
            self.next_target += 1;
            let target = format!("t{}", self.next_target);
            let req = if sim.rng.chance(self.exact_share) {
                // Anywhere in the universe, or (half the time) among its first
                // addresses, where `Any` requests allocate: in a large (IPv6)
                // universe only those collide with what others hold.
                let (lo, size) = (addr_value(sim.universe.network()), sim.universe.size());
                let span = if sim.rng.chance(0.5) { (size - 2).min(4096) } else { size - 2 };
                let r = ((sim.rng.next_u64() as u128) << 64 | sim.rng.next_u64() as u128) % span;
                let ip = sim.universe.ip(lo + 1 + r);
                Request::Exact { ip, prefix: sim.universe.prefix() }
            } else if sim.rng.chance(0.6) {
                Request::Any(self.subnets[0])
            } else {
                Request::Any(*sim.rng.pick(&self.subnets).expect("subnets"))
            };
            match sim.allocate(i, &target, req.clone()) {
                Ok(Allocation::Ready { .. }) => {
                    self.stats.ready += 1;
                    if matches!(req, Request::Exact { .. }) {
                        self.stats.exact_ok += 1;
                    }
                }
                Ok(Allocation::Pending(_)) => {
                    self.stats.pending += 1;
                    self.waiting.push((i, target, req, sim.tick));
                }
                Err(_) => self.stats.refused += 1,
            }
        } else {
            let held: Vec<(IpAddr, String)> = sim.ipam(i).allocations().map(|(ip, t)| (ip, t.to_string())).collect();
            if let Some((ip, t)) = sim.rng.pick(&held).cloned() {
                if sim.rng.chance(0.7) {
                    assert!(sim.free(i, &t, ip));
                } else {
                    sim.free_target(i, &t);
                }
                self.stats.freed += 1;
            }
        }
    }

    /// Takes events and gives up on requests pending too long.
    pub fn collect(&mut self, sim: &mut IpamSim) {
        for i in 0..sim.len() {
            for e in std::mem::take(&mut sim.nodes[i].events) {
                match e {
                    Event::Allocated { target, .. } => {
                        if let Some(k) = self.waiting.iter().position(|w| w.0 == i && w.1 == target) {
                            self.waiting.swap_remove(k);
                            self.stats.completed_later += 1;
                        }
                    }
                    Event::Failed { target, .. } => {
                        if let Some(k) = self.waiting.iter().position(|w| w.0 == i && w.1 == target) {
                            let (_, t, r, _) = self.waiting.swap_remove(k);
                            // Ask again: the failure is reported once, as an error.
                            if sim.is_up(i) {
                                assert!(sim.allocate(i, &t, r).is_err());
                            }
                            self.stats.failed_later += 1;
                        }
                    }
                    _ => {}
                }
            }
        }
        let tick = sim.tick;
        let timeout = self.timeout_ticks;
        let (old, keep): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|w| tick - w.3 > timeout || !sim.is_up(w.0));
        self.waiting = keep;
        for (i, t, _, _) in old {
            if sim.is_up(i) {
                sim.free_target(i, &t);
            }
            self.stats.timed_out += 1;
        }
    }

    /// Gives up on every pending request (before measuring convergence).
    pub fn cancel_all(&mut self, sim: &mut IpamSim) {
        for (i, t, _, _) in std::mem::take(&mut self.waiting) {
            if sim.is_up(i) {
                sim.free_target(i, &t);
            }
        }
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}
