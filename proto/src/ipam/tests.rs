//! Unit tests of the [`Ipam`] state machine over a tiny lossless in-memory mesh
//! (every peer a neighbour of every other). The faulty, many-peer simulator
//! lives in `tests/src/sim/`.

use std::net::{IpAddr, Ipv4Addr};

use super::space::{addr_value, Addr};

use super::wire::{self, Body, Envelope, Gossip};
use super::*;
use crate::identity::Identity;
use crate::peer::PeerName;
use crate::trust::{Binding, KeyBook, Signer};

fn u() -> Cidr {
    "10.32.0.0/22".parse().unwrap()
}
fn p(n: u64) -> PeerName {
    PeerName(0x0200_0000_0000 + n)
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn any() -> Request {
    Request::Any(u())
}

/// A fixed identity per peer name (tests are deterministic).
pub(super) fn id_of(name: PeerName) -> Identity {
    let mut k = [0x5au8; 32];
    k[..8].copy_from_slice(&name.0.to_be_bytes());
    Identity::from_private(k).unwrap()
}
pub(super) fn new_ipam(me: PeerName, universe: Cidr, init: InitMode) -> Result<Ipam, IpamError> {
    Ipam::new(me, universe, init, &id_of(me))
}
fn restore_ipam(me: PeerName, universe: Cidr, init: InitMode, cfg: Config, bytes: &[u8]) -> Result<Ipam, IpamError> {
    Ipam::restore(me, universe, init, cfg, bytes, &id_of(me))
}
/// Signs `env` as `env.src` (whose identity is [`id_of`]) with its binding.
fn signed(env: &Envelope, hops: u8) -> Vec<u8> {
    let id = id_of(env.src);
    let signer = Signer::from_identity(&id);
    wire::encode(env, hops, vec![Binding::new(env.src, &id, &signer)], &signer)
}

struct Mesh {
    nodes: Vec<Ipam>,
    /// Each peer's key book (the daemon's, filled from the messages here).
    keys: Vec<KeyBook>,
    up: Vec<bool>,
    now: u64,
    sent: usize,
    /// Every message delivered, for the mutation test.
    log: Vec<Vec<u8>>,
    /// Errors from `handle_message` (receiver, error), kept instead of panicking
    /// when `tolerate` is set.
    errors: Vec<(usize, IpamError)>,
    tolerate: bool,
    /// Pairs of peers that do not reach each other (both ways).
    cut: Vec<(usize, usize)>,
}

impl Mesh {
    fn new(init: impl Fn(usize) -> InitMode, n: usize) -> Mesh {
        Mesh::new_in(u(), init, n)
    }

    fn new_in(universe: Cidr, init: impl Fn(usize) -> InitMode, n: usize) -> Mesh {
        let nodes = (0..n).map(|i| new_ipam(p(i as u64 + 1), universe, init(i)).unwrap()).collect();
        let mut m = Mesh { nodes, keys: vec![KeyBook::new(); n], up: vec![true; n], now: 0, sent: 0, log: Vec::new(), errors: Vec::new(), tolerate: false, cut: Vec::new() };
        m.topology();
        m
    }

    fn idx(&self, name: PeerName) -> Option<usize> {
        self.nodes.iter().position(|n| n.me() == name)
    }

    fn topology(&mut self) {
        let live: Vec<PeerName> = (0..self.nodes.len()).filter(|&i| self.up[i]).map(|i| self.nodes[i].me()).collect();
        for i in 0..self.nodes.len() {
            if self.up[i] {
                self.nodes[i].peers_changed(&live);
            }
        }
    }

    /// Delivers everything until quiet, advancing time by 10 ms a round.
    fn run(&mut self) {
        for _ in 0..200 {
            self.now += 10;
            let mut msgs = Vec::new();
            for i in 0..self.nodes.len() {
                if !self.up[i] {
                    while self.nodes[i].poll_transmit().is_some() {}
                    continue;
                }
                if self.nodes[i].poll_timeout().is_some_and(|t| t <= self.now) {
                    self.nodes[i].handle_timeout(self.now);
                }
                while let Some((dest, bytes)) = self.nodes[i].poll_transmit() {
                    msgs.push((i, dest, bytes));
                }
            }
            if msgs.is_empty() {
                return;
            }
            for (from, dest, bytes) in msgs {
                let to: Vec<usize> = match dest {
                    Dest::Neighbours => (0..self.nodes.len()).filter(|&j| j != from).collect(),
                    Dest::Peer(name) => self.idx(name).into_iter().collect(),
                };
                for j in to {
                    if self.up[j] && !self.cut.contains(&(from, j)) && !self.cut.contains(&(j, from)) {
                        self.sent += 1;
                        if self.log.len() < 10_000 {
                            self.log.push(bytes.clone());
                        }
                        let me = self.nodes[from].me();
                        match self.nodes[j].handle_message(me, &bytes, self.now, &mut self.keys[j]) {
                            Ok(()) => {}
                            Err(e) if self.tolerate => self.errors.push((j, e)),
                            Err(e) => panic!("peer {j}: {e}"),
                        }
                    }
                }
            }
        }
        panic!("mesh did not go quiet");
    }

    fn alloc(&mut self, i: usize, target: &str, req: Request) -> Result<Allocation, IpamError> {
        let now = self.now;
        self.nodes[i].allocate(target, req, now)
    }

    /// `run` once a virtual second for `secs` seconds (timers fire in between).
    fn run_secs(&mut self, secs: u64) {
        for _ in 0..secs {
            self.now += 1000;
            self.run();
        }
    }

    /// Runs node `i` on its own (a peer nobody hears, not ticked by `run`) for
    /// `ms` of virtual time, firing its timers; returns what it sent.
    fn run_alone(&mut self, i: usize, ms: u64) -> Vec<Vec<u8>> {
        let end = self.now + ms;
        let mut sent = Vec::new();
        let mut wakeups = 0;
        while let Some(t) = self.nodes[i].poll_timeout() {
            if t > end {
                break;
            }
            wakeups += 1;
            assert!(wakeups <= 10 + ms / 500, "peer {i} wakes up too often (timer at {t}, now {})", self.now);
            self.now = self.now.max(t);
            self.nodes[i].handle_timeout(self.now);
            while let Some((_, bytes)) = self.nodes[i].poll_transmit() {
                sent.push(bytes);
            }
        }
        self.now = end;
        sent
    }

    /// Every address held, by any node; panics if one is held twice.
    fn check_unique(&self) -> usize {
        let mut seen = std::collections::BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for (a, t) in n.allocations() {
                if let Some((j, u)) = seen.insert(a, (i, t.to_string())) {
                    panic!("{a} held by {u} on peer {j} and by {t} on peer {i}");
                }
            }
        }
        seen.len()
    }
}

fn ready(a: Result<Allocation, IpamError>) -> IpAddr {
    match a {
        Ok(Allocation::Ready { ip, .. }) => ip,
        other => panic!("expected ready, got {other:?}"),
    }
}

fn seeded(n: usize) -> Mesh {
    let seeds: Vec<PeerName> = (1..=n as u64).map(p).collect();
    Mesh::new(|_| InitMode::Seed(seeds.clone()), n)
}

#[test]
fn seeded_peers_allocate_locally_lowest_free() {
    let mut m = seeded(2);
    assert!(m.nodes[0].is_agreed());
    assert_eq!(ready(m.alloc(0, "c1", any())), ip("10.32.0.1"), "the network address is skipped");
    assert_eq!(ready(m.alloc(0, "c2", any())), ip("10.32.0.2"));
    assert_eq!(ready(m.alloc(0, "c1", any())), ip("10.32.0.1"), "same target, same subnet: same address");
    assert_eq!(ready(m.alloc(1, "c3", any())), ip("10.32.2.0"));
    assert!(m.nodes[0].free("c1", ip("10.32.0.1")));
    assert!(!m.nodes[0].free("c1", ip("10.32.0.1")));
    assert_eq!(ready(m.alloc(0, "c4", any())), ip("10.32.0.1"));
    // Subnet requests use the subnet's own reserved addresses.
    let sub: Cidr = "10.32.1.0/24".parse().unwrap();
    assert_eq!(ready(m.alloc(0, "c5", Request::Any(sub))), ip("10.32.1.1"));
    assert_eq!(m.nodes[0].addresses_of("c5"), vec![ip("10.32.1.1")]);
    m.run();
    assert_eq!(m.nodes[0].ring_bytes(), m.nodes[1].ring_bytes());
    assert_eq!(m.nodes[0].free_target("c5"), vec![ip("10.32.1.1")]);
}

#[test]
fn bad_requests() {
    let mut m2 = seeded(1);
    let mut e2 = |r| m2.nodes[0].allocate("c", r, 0).unwrap_err();
    assert!(matches!(e2(Request::Any("10.0.0.0/24".parse().unwrap())), IpamError::SubnetOutsideRange { .. }));
    assert!(matches!(e2(Request::Any("10.32.0.0/31".parse().unwrap())), IpamError::SubnetTooSmall(_)));
    assert!(matches!(e2(Request::Exact { ip: ip("10.33.0.1"), prefix: 12 }), IpamError::AddressOutsideRange { .. }));
    assert!(matches!(e2(Request::Exact { ip: ip("10.32.1.0"), prefix: 24 }), IpamError::ReservedAddress { .. }));
    assert!(matches!(e2(Request::Exact { ip: ip("10.32.0.0"), prefix: 30 }), IpamError::ReservedAddress { .. }));
    assert!(matches!(e2(Request::Exact { ip: ip("10.32.3.255"), prefix: 32 }), IpamError::ReservedAddress { .. }));
    assert!(matches!(e2(Request::Exact { ip: ip("10.32.1.1"), prefix: 33 }), IpamError::BadPrefix(33)));
    assert!(matches!(m2.nodes[0].allocate("", any(), 0), Err(IpamError::BadTarget(_))));
    assert!(matches!(m2.nodes[0].allocate(&"x".repeat(300), any(), 0), Err(IpamError::BadTarget(_))));
    assert!(new_ipam(p(1), "10.0.0.0/31".parse().unwrap(), InitMode::Observer).is_err());
    assert!(new_ipam(p(1), u(), InitMode::Consensus(0)).is_err());
    assert!(new_ipam(p(1), u(), InitMode::Consensus(paxos::MAX_PARTICIPANTS as u32 + 1)).is_err());
    assert!(new_ipam(p(1), u(), InitMode::Seed(vec![])).is_err());
}

#[test]
fn exact_claims_local_and_remote() {
    let mut m = seeded(2);
    // Mine and free.
    assert_eq!(ready(m.alloc(0, "a", Request::Exact { ip: ip("10.32.0.9"), prefix: 22 })), ip("10.32.0.9"));
    assert!(matches!(
        m.alloc(0, "b", Request::Exact { ip: ip("10.32.0.9"), prefix: 22 }),
        Err(IpamError::AddressInUse { holder: Holder::Target(t), .. }) if t == "a"
    ));
    // Owned by peer 2: ask it.
    let want = Request::Exact { ip: ip("10.32.2.7"), prefix: 22 };
    match m.alloc(0, "b", want.clone()) {
        Ok(Allocation::Pending(Waiting::Owner { owner, reachable: true })) => assert_eq!(owner, p(2)),
        other => panic!("{other:?}"),
    }
    m.run();
    assert_eq!(m.nodes[0].poll_event(), Some(Event::Allocated { target: "b".into(), ip: ip("10.32.2.7"), prefix: 22 }));
    assert_eq!(ready(m.alloc(0, "b", want)), ip("10.32.2.7"));
    // Peer 2 gave away exactly one address; it allocates around it.
    assert_eq!(m.nodes[1].ring().covering_owned(p(1), addr_value(ip("10.32.2.7"))).unwrap().1.size, 1);
    // An address in use on peer 2 is refused.
    let taken = ready(m.alloc(1, "x", any()));
    let want = Request::Exact { ip: taken, prefix: 22 };
    assert!(matches!(m.alloc(0, "c", want.clone()), Ok(Allocation::Pending(_))));
    m.run();
    assert!(matches!(m.nodes[0].poll_event(), Some(Event::Failed { .. })));
    assert!(matches!(m.alloc(0, "c", want), Err(IpamError::AddressInUse { holder: Holder::Peer(_), .. })));
    m.run();
    assert_eq!(m.nodes[0].ring_bytes(), m.nodes[1].ring_bytes());
}

#[test]
fn observer_gets_space_by_donation() {
    let seeds = vec![p(1), p(2)];
    let mut m = Mesh::new(|i| if i < 2 { InitMode::Seed(seeds.clone()) } else { InitMode::Observer }, 3);
    // Before it hears anyone, the observer waits for the ring.
    assert_eq!(m.alloc(2, "c", any()), Ok(Allocation::Pending(Waiting::Ring)));
    m.run();
    assert!(m.nodes[2].is_agreed());
    assert!(matches!(m.nodes[2].poll_event(), Some(Event::Agreed { .. })));
    let got = match m.nodes[2].poll_event() {
        Some(Event::Allocated { target, ip, .. }) if target == "c" => ip,
        other => panic!("{other:?}"),
    };
    assert_eq!(ready(m.alloc(2, "c", any())), got);
    let st = m.nodes[2].status();
    let mine = st.owners.iter().find(|o| o.peer == p(3)).expect("observer owns space now");
    assert!(mine.size >= 1 && mine.free == mine.size - 1);
    // The donor gave half of its free space.
    let donor = st.owners.iter().find(|o| o.peer != p(3) && o.size < 512).expect("a donor shrank");
    assert!(donor.size >= 255 && donor.size <= 257, "{donor:?}");
    m.run();
    let b = m.nodes[0].ring_bytes();
    assert!(m.nodes.iter().all(|n| n.ring_bytes() == b));
}

#[test]
fn full_peers_ask_and_exhaustion_waits() {
    let tiny: Cidr = "10.9.0.0/29".parse().unwrap(); // 6 usable
    let seeds = vec![p(1), p(2)];
    let mut nodes: Vec<Ipam> = (1..=2).map(|i| new_ipam(p(i), tiny, InitMode::Seed(seeds.clone())).unwrap()).collect();
    let mut m =
        Mesh { nodes: std::mem::take(&mut nodes), keys: vec![KeyBook::new(); 2], up: vec![true; 2], now: 0, sent: 0, log: Vec::new(), errors: Vec::new(), tolerate: false, cut: Vec::new() };
    m.topology();
    let mut got = Vec::new();
    for k in 0..6 {
        let r = m.alloc(0, &format!("t{k}"), Request::Any(tiny)).unwrap();
        if let Allocation::Ready { ip, .. } = r {
            got.push(ip);
        }
        m.run();
        while let Some(e) = m.nodes[0].poll_event() {
            if let Event::Allocated { ip, .. } = e {
                got.push(ip);
            }
        }
    }
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 6, "{got:?}");
    assert!(matches!(m.alloc(0, "t6", Request::Any(tiny)), Ok(Allocation::Pending(_))));
    m.run();
    assert!(matches!(m.alloc(0, "t6", Request::Any(tiny)), Ok(Allocation::Pending(Waiting::NoFreeSpace { .. }))));
    // A free elsewhere (on peer 2, which donated everything) is not needed: free here.
    assert!(m.nodes[0].free("t0", got[0]));
    m.run();
    assert_eq!(ready(m.alloc(0, "t6", Request::Any(tiny))), got[0]);
}

#[test]
fn consensus_of_one_and_of_three() {
    let mut one = new_ipam(p(1), u(), InitMode::Consensus(1)).unwrap();
    assert!(matches!(one.allocate("c", any(), 0), Ok(Allocation::Pending(Waiting::Consensus { known: 1, quorum: 1 }))));
    for _ in 0..4 {
        let t = one.poll_timeout().unwrap();
        one.handle_timeout(t);
    }
    assert!(one.is_agreed());
    assert_eq!(one.poll_event(), Some(Event::Agreed { seeds: vec![p(1)] }));
    assert!(matches!(one.poll_event(), Some(Event::Allocated { .. })));

    let mut m = Mesh::new(|_| InitMode::Consensus(3), 3);
    m.up = vec![true, false, false];
    m.topology();
    assert_eq!(m.alloc(0, "c", any()), Ok(Allocation::Pending(Waiting::Consensus { known: 1, quorum: 3 })));
    for _ in 0..10 {
        m.now += 1000;
        m.run();
    }
    assert!(!m.nodes[0].is_agreed());
    assert_eq!(m.nodes[0].allocate("c", any(), m.now).unwrap().to_string_for_test(), "waiting for consensus: 1 of 3 peers");
    // Two of three are a quorum, but consensus=3 waits for the third.
    m.up = vec![true, true, false];
    m.topology();
    for _ in 0..10 {
        m.now += 1000;
        m.run();
    }
    assert!(!m.nodes[0].is_agreed() && !m.nodes[1].is_agreed());
    assert_eq!(m.nodes[0].allocate("c", any(), m.now).unwrap().to_string_for_test(), "waiting for consensus: 2 of 3 peers");
    // The third joins: all three agree, and the waiting request completes.
    m.up = vec![true, true, true];
    m.topology();
    for _ in 0..10 {
        m.now += 1000;
        m.run();
    }
    assert!(m.nodes.iter().all(|n| n.is_agreed()));
    assert_eq!(m.nodes[0].ring().seeds(), &[p(1), p(2), p(3)]);
    assert!(matches!(m.alloc(0, "c", any()), Ok(Allocation::Ready { .. })));
    assert!(matches!(m.alloc(2, "d", any()), Ok(Allocation::Ready { .. })));
}

/// The ballot a message proposes, if it is a prepare.
fn prepare_in(bytes: &[u8]) -> Option<paxos::Ballot> {
    match wire::decode(bytes).unwrap().1.body {
        Body::Prepare { ballot, .. } => Some(ballot),
        _ => None,
    }
}

fn seeds_of(n: &Ipam) -> Vec<PeerName> {
    n.ring().seeds().to_vec()
}

#[test]
fn lone_consensus_peer_forms_no_ring_until_it_allocates() {
    let mut m = Mesh::new(|_| InitMode::Consensus(1), 1);
    let sent = m.run_alone(0, 600_000); // ten minutes
    assert!(!m.nodes[0].is_agreed(), "consensus is lazy: no allocation, no ring");
    assert_eq!(m.nodes[0].paxos().mine(), Some(&paxos::Claims::default()), "no ballot promised");
    assert!(m.nodes[0].paxos().mine().unwrap().promised.is_zero());
    assert!(!sent.is_empty(), "it still gossips (to learn a ring from peers it may meet)");
    for b in &sent {
        assert_eq!(prepare_in(b), None, "no proposal was sent");
    }
    assert_eq!(m.nodes[0].status().state, RingState::AwaitingConsensus { known: 1, quorum: 1 });
    // The first allocation starts consensus: alone with N = 1 it agrees at once.
    assert!(matches!(m.alloc(0, "c", any()), Ok(Allocation::Pending(Waiting::Consensus { known: 1, quorum: 1 }))));
    m.run_alone(0, 5_000);
    assert!(m.nodes[0].is_agreed());
    assert_eq!(seeds_of(&m.nodes[0]), vec![p(1)]);
    assert!(!m.nodes[0].paxos().mine().unwrap().promised.is_zero());
    assert!(matches!(m.alloc(0, "c", any()), Ok(Allocation::Ready { .. })));
}

/// Asking for an address starts consensus, which then runs to the end even if
/// the request is cancelled at once (the daemon's `prime`); the address is not
/// handed out.
#[test]
fn a_cancelled_request_still_primes_consensus() {
    let mut m = Mesh::new(|_| InitMode::Consensus(2), 2);
    m.run_secs(30);
    assert!(!m.nodes[0].is_agreed() && !m.nodes[1].is_agreed());
    assert!(matches!(m.alloc(1, "prime", any()), Ok(Allocation::Pending(Waiting::Consensus { .. }))));
    assert!(m.nodes[1].free_target("prime").is_empty());
    assert_eq!(m.nodes[1].pending_count(), 0);
    m.run_secs(10);
    assert!(m.nodes[0].is_agreed() && m.nodes[1].is_agreed());
    assert_eq!(seeds_of(&m.nodes[0]), vec![p(1), p(2)]);
    assert_eq!(m.check_unique(), 0);
    assert!(!std::iter::from_fn(|| m.nodes[1].poll_event()).any(|e| matches!(e, Event::Allocated { .. })));
}

/// A (N = 1) allocates and agrees alone; B (N = 2) meets A and adopts A's ring;
/// C (N = 1) runs alone for a long time without allocating, meets the others
/// and adopts the ring too, then gets space by donation. No conflict anywhere.
#[test]
fn late_peers_adopt_the_agreed_ring_whatever_their_n() {
    let inits = [InitMode::Consensus(1), InitMode::Consensus(2), InitMode::Consensus(1)];
    let mut m = Mesh::new(|i| inits[i].clone(), 3);
    m.up = vec![true, false, false];
    m.topology();
    m.nodes[2].peers_changed(&[]);
    assert!(matches!(m.alloc(0, "a", any()), Ok(Allocation::Pending(_))));
    m.run_secs(5);
    assert!(m.nodes[0].is_agreed());
    assert_eq!(seeds_of(&m.nodes[0]), vec![p(1)]);
    let a_ip = ready(m.alloc(0, "a", any()));
    // B, whose N is 2, meets A: it adopts A's ring instead of waiting for a quorum of 2.
    m.up[1] = true;
    m.topology();
    m.run_secs(3);
    assert!(m.nodes[1].is_agreed());
    assert_eq!(seeds_of(&m.nodes[1]), vec![p(1)]);
    assert_eq!(m.nodes[1].paxos().mine().map(|c| c.promised.is_zero()), Some(true), "B never proposed");
    // C on its own for ten minutes, no allocation: no ring of its own.
    m.run_alone(2, 600_000);
    assert!(!m.nodes[2].is_agreed());
    assert!(m.nodes[2].paxos().mine().unwrap().promised.is_zero());
    // C connects: it adopts the ring (N = 1 does not matter) and gets space by donation.
    m.up[2] = true;
    m.topology();
    m.run_secs(2);
    assert!(m.nodes[2].is_agreed());
    assert_eq!(seeds_of(&m.nodes[2]), vec![p(1)]);
    assert!(m.nodes[2].poll_event().is_some_and(|e| e == Event::Agreed { seeds: vec![p(1)] }));
    assert!(matches!(m.alloc(2, "c", any()), Ok(Allocation::Pending(Waiting::Donation { .. }))));
    assert!(matches!(m.alloc(1, "b", any()), Ok(Allocation::Pending(Waiting::Donation { .. }))));
    m.run_secs(3);
    let c_ip = ready(m.alloc(2, "c", any()));
    let b_ip = ready(m.alloc(1, "b", any()));
    assert!(a_ip != b_ip && b_ip != c_ip && a_ip != c_ip);
    assert_eq!(m.check_unique(), 3);
    let b = m.nodes[0].ring_bytes();
    assert!(m.nodes.iter().all(|n| n.ring_bytes() == b));
    // C restarts from its snapshot: still agreed on the adopted ring, same address.
    let snap = m.nodes[2].snapshot();
    let mut r = restore_ipam(p(3), u(), InitMode::Consensus(1), Config::default(), &snap).unwrap();
    assert!(r.is_agreed());
    assert_eq!(seeds_of(&r), vec![p(1)]);
    assert_eq!(r.release_missing(["c"]), vec![]);
    assert_eq!(ready(r.allocate("c", any(), m.now)), c_ip);
    m.nodes[2] = r;
    m.topology();
    m.run_secs(2);
    assert!(m.nodes[2].is_agreed());
    assert_eq!(m.check_unique(), 3);
}

/// A participant in the middle of its own proposal (an allocation waiting, its
/// ballot promised, the quorum gone) adopts an agreed ring it hears of, and its
/// request completes by donation.
#[test]
fn unfinished_proposal_gives_way_to_an_agreed_ring() {
    let inits = [InitMode::Seed(vec![p(1)]), InitMode::Consensus(2), InitMode::Consensus(2)];
    let mut m = Mesh::new(|i| inits[i].clone(), 3);
    // B and C exchange records (no allocation: no ballot), then C goes away.
    m.up = vec![false, true, true];
    m.topology();
    m.run_secs(3);
    assert!(m.nodes[1].paxos().mine().unwrap().promised.is_zero());
    assert_eq!(m.nodes[1].paxos().known(), 2);
    m.up = vec![false, true, false];
    m.topology();
    assert!(matches!(m.alloc(1, "x", any()), Ok(Allocation::Pending(Waiting::Consensus { known: 2, quorum: 2 }))));
    m.run_secs(30);
    assert!(!m.nodes[1].is_agreed());
    assert_eq!(m.nodes[1].paxos().mine().unwrap().promised.proposer, p(2), "B proposed, C never answered");
    // A (seeded, agreed) appears: B adopts A's ring and gets space from A.
    m.up = vec![true, true, false];
    m.topology();
    m.run_secs(3);
    assert!(m.nodes[1].is_agreed());
    assert_eq!(seeds_of(&m.nodes[1]), vec![p(1)]);
    assert!(matches!(m.alloc(1, "x", any()), Ok(Allocation::Ready { .. })));
    assert_eq!(m.check_unique(), 1);
}

/// The README flow: `h1$ launch` (N = 1) and `h2$ launch h1` (N = 2) meet before
/// either allocates: no conflict, no ring; the first allocation (on either)
/// makes both agree on `[h1, h2]` (the largest N, 2, counts); `h3$ launch &&
/// connect h2` (N = 1) adopts that ring.
#[test]
fn peers_with_different_n_agree_on_first_allocation() {
    let inits = [InitMode::Consensus(1), InitMode::Consensus(2), InitMode::Consensus(1)];
    let mut m = Mesh::new(|i| inits[i].clone(), 3);
    m.up = vec![true, true, false];
    m.topology();
    m.nodes[2].peers_changed(&[]);
    m.run_secs(60);
    assert!(!m.nodes[0].is_agreed() && !m.nodes[1].is_agreed());
    assert_eq!(m.nodes[0].paxos().initial(), 2, "h1 counts the larger N it heard of");
    assert_eq!(m.nodes[0].status().state, RingState::AwaitingConsensus { known: 2, quorum: 2 });
    // h1 allocates: with N = 2 it needs h2, which is there.
    assert!(matches!(m.alloc(0, "c1", any()), Ok(Allocation::Pending(Waiting::Consensus { known: 2, quorum: 2 }))));
    m.run_secs(5);
    assert!(m.nodes[0].is_agreed() && m.nodes[1].is_agreed());
    assert_eq!(seeds_of(&m.nodes[0]), vec![p(1), p(2)]);
    assert_eq!(seeds_of(&m.nodes[1]), vec![p(1), p(2)]);
    ready(m.alloc(0, "c1", any()));
    m.run_alone(2, 60_000);
    assert!(!m.nodes[2].is_agreed());
    // h3 is asked for an address the moment it meets the others: it waits to hear
    // them (the agreed ring) before proposing, so it does not agree on a ring of its own.
    m.up[2] = true;
    m.topology();
    assert!(matches!(m.alloc(2, "c3", any()), Ok(Allocation::Pending(_))));
    m.run_secs(5);
    assert_eq!(seeds_of(&m.nodes[2]), vec![p(1), p(2)]);
    ready(m.alloc(2, "c3", any()));
    assert_eq!(m.check_unique(), 2);
}

/// C (N = 1) allocates before it ever meets anyone: it agrees on a ring of its
/// own. Meeting the others is then a conflict (two agreed rings), and nothing is
/// applied on either side.
#[test]
fn allocating_alone_first_makes_a_ring_that_conflicts() {
    let inits = [InitMode::Consensus(1), InitMode::Consensus(2), InitMode::Consensus(1)];
    let mut m = Mesh::new(|i| inits[i].clone(), 3);
    m.up = vec![true, true, false];
    m.topology();
    m.nodes[2].peers_changed(&[]);
    let _ = m.alloc(0, "a", any());
    m.run_secs(5);
    assert_eq!(seeds_of(&m.nodes[1]), vec![p(1), p(2)]);
    let _ = m.alloc(2, "c", any());
    m.run_alone(2, 5_000);
    assert_eq!(seeds_of(&m.nodes[2]), vec![p(3)]);
    let c_ip = ready(m.alloc(2, "c", any()));
    // Let the periodic full gossip publish the free counts the allocations moved.
    m.run_secs(31);
    m.run_alone(2, 31_000);
    let before: Vec<Vec<u8>> = m.nodes.iter_mut().map(|n| n.snapshot()).collect();
    m.tolerate = true;
    m.up[2] = true;
    m.topology();
    m.run_secs(3);
    assert!(!m.errors.is_empty());
    for (_, e) in &m.errors {
        assert!(e.is_conflict() && matches!(e, IpamError::DifferentRings { .. }), "{e}");
    }
    for (i, b) in before.iter().enumerate() {
        assert_eq!(&m.nodes[i].snapshot(), b, "peer {i} changed");
    }
    assert_eq!(ready(m.alloc(2, "c", any())), c_ip);
}

impl Allocation {
    fn to_string_for_test(&self) -> String {
        match self {
            Allocation::Pending(w) => w.to_string(),
            Allocation::Ready { ip, prefix } => format!("{ip}/{prefix}"),
        }
    }
}

#[test]
fn conflicts_are_refused_and_change_nothing() {
    let mut a = seeded(2);
    ready(a.alloc(0, "c", any()));
    a.run();
    let before = a.nodes[0].snapshot();
    // Different seeds.
    let mut other = new_ipam(p(7), u(), InitMode::Seed(vec![p(7), p(8)])).unwrap();
    let (_, bytes) = other.poll_transmit().unwrap();
    let e = a.nodes[0].handle_message(p(7), &bytes, 1, &mut a.keys[0]).unwrap_err();
    assert!(e.is_conflict() && matches!(e, IpamError::DifferentRings { .. }), "{e}");
    assert_eq!(a.nodes[0].snapshot(), before);
    // Different range.
    let mut other = new_ipam(p(7), "10.32.0.0/21".parse().unwrap(), InitMode::Seed(vec![p(1), p(2)])).unwrap();
    let (_, bytes) = other.poll_transmit().unwrap();
    assert!(matches!(a.nodes[0].handle_message(p(7), &bytes, 1, &mut a.keys[0]), Err(IpamError::RangeMismatch { .. })));
    assert_eq!(a.nodes[0].snapshot(), before);
    // Someone "takes over" my range that holds an allocation (rmpeer on a live
    // peer): a conflict naming it; nothing applied.
    let mut thief = new_ipam(p(2), u(), InitMode::Seed(vec![p(1), p(2)])).unwrap();
    thief.peers_changed(&[]);
    thief.rmpeer(p(1)).unwrap();
    while thief.poll_transmit().is_some() {}
    thief.peers_changed(&[p(5)]); // a newly reachable peer: full state to the neighbours
    let (_, bytes) = thief.poll_transmit().unwrap();
    let e = a.nodes[0].handle_message(p(2), &bytes, 1, &mut a.keys[0]).unwrap_err();
    assert!(e.is_conflict() && matches!(e, IpamError::RangeTakenOver { by, .. } if by == p(2)), "{e}");
    assert_eq!(a.nodes[0].snapshot(), before);
    // Garbage.
    for junk in [&b""[..], &b"\x01"[..], &b"\x02abc"[..], &[1u8, 0xff, 0xff, 0xff, 0xff][..]] {
        let e = a.nodes[0].handle_message(p(2), junk, 1, &mut a.keys[0]).unwrap_err();
        assert!(!e.is_conflict());
    }
    assert_eq!(a.nodes[0].snapshot(), before);
}

#[test]
fn relays_unicast_for_others() {
    let mut a = seeded(1);
    let env = Envelope { universe: u(), src: p(5), dst: p(6), body: Body::SyncRequest };
    a.nodes[0].handle_message(p(5), &signed(&env, 3), 0, &mut a.keys[0]).unwrap();
    let mut out = Vec::new();
    while let Some(t) = a.nodes[0].poll_transmit() {
        out.push(t);
    }
    let relayed = out.iter().find(|(d, _)| *d == Dest::Peer(p(6))).expect("relayed");
    let (packet, env2) = wire::decode(&relayed.1).unwrap();
    assert_eq!(packet.hops, 2);
    assert_eq!(env2.src, p(5));
    // Relayed as signed: the receiver can still verify the original sender.
    assert_eq!(wire::decode(&signed(&env, 3)).unwrap().0.signed, packet.signed);
    a.nodes[0].handle_message(p(5), &signed(&env, 0), 0, &mut a.keys[0]).unwrap();
    assert!(a.nodes[0].poll_transmit().is_none());
}

#[test]
fn rmpeer_takes_dead_space_and_reset_hands_over() {
    let mut m = seeded(3);
    m.run();
    m.up[2] = false;
    m.topology();
    assert!(matches!(m.nodes[0].rmpeer(p(1)), Err(IpamError::RemoveSelf)));
    assert!(matches!(m.nodes[0].rmpeer(p(2)), Err(IpamError::PeerReachable(_))));
    let st = m.nodes[0].status();
    assert_eq!(st.unreachable_space, 342);
    let taken = m.nodes[0].rmpeer(p(3)).unwrap();
    assert_eq!(taken, 342);
    m.run();
    assert_eq!(m.nodes[1].status().unreachable_space, 0);
    assert_eq!(m.nodes[1].ring_bytes(), m.nodes[0].ring_bytes());
    // Peer 2 resets: everything goes to peer 1 (the only live peer).
    ready(m.alloc(1, "x", any()));
    assert_eq!(m.nodes[1].reset(), Ok(Some(p(1))));
    assert_eq!(m.nodes[1].allocations().count(), 0);
    m.run();
    let st = m.nodes[0].status();
    assert_eq!(st.owners.len(), 1);
    assert_eq!(st.owners[0].size, 1024);
    assert_eq!(st.owners[0].free, 1022);
    // Alone: nobody to hand over to.
    m.up[1] = false;
    m.topology();
    assert_eq!(m.nodes[0].reset(), Err(IpamError::NoLivePeer));
}

/// Owners and sizes in `n`'s view of the ring.
fn owned(n: &Ipam) -> Vec<(PeerName, u128)> {
    n.status().owners.iter().map(|o| (o.peer, o.size)).collect()
}

#[test]
fn a_peer_removed_while_down_refuses_the_takeover_loudly() {
    let mut m = seeded(3);
    m.run();
    let mine = ready(m.alloc(2, "c3", any()));
    m.run();
    let snap = m.nodes[2].snapshot();
    // Peer 3 goes down; peer 1 removes it and takes its space (and may hand out `mine`).
    m.up[2] = false;
    m.topology();
    assert_eq!(m.nodes[0].rmpeer(p(3)), Ok(342));
    m.run();
    assert_eq!(m.nodes[1].ring_bytes(), m.nodes[0].ring_bytes());
    // It comes back with its state: it must not go on handing out its old range.
    m.nodes[2] = restore_ipam(p(3), u(), InitMode::Seed(vec![p(1), p(2), p(3)]), Config::default(), &snap).unwrap();
    m.up[2] = true;
    m.topology();
    m.tolerate = true;
    m.run();
    let refused: Vec<&IpamError> = m.errors.iter().filter(|(j, _)| *j == 2).map(|(_, e)| e).collect();
    assert!(!refused.is_empty(), "peer 3 took the takeover of its own range silently: {:?}", m.errors);
    for e in &refused {
        assert!(matches!(e, IpamError::RangeTakenOver { by, .. } if *by == p(1)), "{e}");
        assert!(e.is_conflict());
        assert!(e.to_string().contains("rmpeer"), "{e}");
    }
    // Nothing was applied on either side: peer 3 still holds its address, the others keep the takeover.
    assert!(m.nodes[2].allocations().any(|(ip, _)| ip == mine));
    assert!(owned(&m.nodes[2]).iter().any(|&(o, size)| o == p(3) && size == 342));
    assert!(owned(&m.nodes[0]).iter().all(|&(o, _)| o != p(3)));
    assert_eq!(m.nodes[1].ring_bytes(), m.nodes[0].ring_bytes());
    assert!(m.errors.iter().all(|(j, _)| *j == 2), "{:?}", m.errors);
}

#[test]
fn rmpeer_run_on_two_peers_at_once_is_a_conflict_not_a_silent_split() {
    let mut m = seeded(3);
    m.run();
    m.up[2] = false;
    m.topology();
    assert_eq!(m.nodes[0].rmpeer(p(3)), Ok(342));
    assert_eq!(m.nodes[1].rmpeer(p(3)), Ok(342));
    m.tolerate = true;
    m.run();
    // Both would hand out the same 342 addresses: each refuses the other's takeover.
    let noticed = |m: &Mesh| {
        for me in [0, 1] {
            assert!(
                m.errors.iter().any(|(j, e)| *j == me && matches!(e, IpamError::RangeTakenOver { .. })),
                "peer {} did not notice: {:?}",
                me + 1,
                m.errors
            );
        }
    };
    noticed(&m);
    // The same when they meet only after one of them restarted (from its saved state).
    let mut m = seeded(3);
    m.run();
    m.up[2] = false;
    m.topology();
    m.cut.push((0, 1));
    assert_eq!(m.nodes[0].rmpeer(p(3)), Ok(342));
    assert_eq!(m.nodes[1].rmpeer(p(3)), Ok(342));
    m.run();
    let snap = m.nodes[1].snapshot();
    m.nodes[1] = restore_ipam(p(2), u(), InitMode::Seed((1..=3).map(p).collect()), Config::default(), &snap).unwrap();
    m.nodes[1].peers_changed(&[p(1), p(2)]);
    m.cut.clear();
    m.nodes[0].neighbour_connected(p(2));
    m.tolerate = true;
    m.run();
    noticed(&m);
}

#[test]
fn a_takeover_that_came_while_the_old_owner_looked_alive_is_fetched_once_it_is_gone() {
    let mut m = seeded(3);
    m.run();
    // Peer 3 dies; peer 1 notices first and removes it at once.
    m.up[2] = false;
    m.nodes[0].peers_changed(&[p(1), p(2)]);
    assert_eq!(m.nodes[0].rmpeer(p(3)), Ok(342));
    m.run();
    // Peer 2 still sees peer 3: the takeover cannot be told from a forgery yet.
    assert!(owned(&m.nodes[1]).contains(&(p(3), 342)));
    assert!(m.nodes[1].drops().unverifiable_entries > 0);
    // Once peer 2 notices the death too, it asks peer 1 again (not 30 s later with a digest).
    m.nodes[1].peers_changed(&[p(1), p(2)]);
    m.run();
    assert_eq!(m.nodes[1].ring_bytes(), m.nodes[0].ring_bytes());
    assert_eq!(m.nodes[1].status().unreachable_space, 0);
}

#[test]
fn a_takeover_of_a_peer_alive_elsewhere_is_shown_to_it() {
    let mut m = seeded(3);
    m.run();
    // Peer 1 lost peer 3 (cut off, or peer 3 was back before the takeover spread)
    // and removes it; peer 2 still reaches peer 3.
    m.cut.push((0, 2));
    m.nodes[0].peers_changed(&[p(1), p(2)]);
    assert_eq!(m.nodes[0].rmpeer(p(3)), Ok(342));
    m.tolerate = true;
    m.run();
    // Peer 2 cannot believe it (peer 3 is alive here) but shows it to peer 3,
    // which refuses it loudly instead of both handing out the same addresses.
    assert!(owned(&m.nodes[1]).contains(&(p(3), 342)));
    assert!(
        m.errors.iter().any(|(j, e)| *j == 2 && matches!(e, IpamError::RangeTakenOver { by, .. } if *by == p(1))),
        "peer 3 never heard of the takeover: {:?}",
        m.errors
    );
}

#[test]
fn a_neighbour_reconnecting_gets_what_changed_while_it_was_away() {
    let mut m = seeded(4);
    m.run();
    // Peer 4 dies for good; peer 3 restarts meanwhile, faster than the topology
    // notices (nobody's view of it changes), and misses peer 1's takeover.
    m.up[3] = false;
    m.topology();
    let snap = m.nodes[2].snapshot();
    m.up[2] = false;
    assert_eq!(m.nodes[0].rmpeer(p(4)), Ok(256));
    m.run();
    m.nodes[2] = restore_ipam(p(3), u(), InitMode::Seed((1..=4).map(p).collect()), Config::default(), &snap).unwrap();
    m.up[2] = true;
    m.nodes[2].peers_changed(&[p(1), p(2), p(3)]);
    // Its neighbours see new connections to it (the daemon's call).
    m.nodes[0].neighbour_connected(p(3));
    m.nodes[1].neighbour_connected(p(3));
    m.run();
    assert_eq!(m.nodes[2].ring_bytes(), m.nodes[0].ring_bytes());
}

#[test]
fn snapshot_restore_and_release_missing() {
    let mut m = seeded(2);
    let a = ready(m.alloc(0, "keep", any()));
    let b = ready(m.alloc(0, "gone", any()));
    let want = Request::Exact { ip: ip("10.32.2.9"), prefix: 22 };
    assert!(matches!(m.alloc(0, "remote", want.clone()), Ok(Allocation::Pending(_))));
    m.run();
    let c = ready(m.alloc(0, "remote", want));
    assert_eq!(c, ip("10.32.2.9"));
    m.run();
    assert!(m.nodes[0].take_dirty());
    let snap = m.nodes[0].snapshot();
    let cfg = Config::default();
    let seeds = InitMode::Seed(vec![p(1), p(2)]);
    let mut r = restore_ipam(p(1), u(), seeds.clone(), cfg.clone(), &snap).unwrap();
    assert_eq!(r.ring_bytes(), m.nodes[0].ring_bytes());
    assert_eq!(r.allocations().collect::<Vec<_>>(), m.nodes[0].allocations().collect::<Vec<_>>());
    assert_eq!(r.snapshot(), snap);
    let freed = r.release_missing(["keep", "remote"]);
    assert_eq!(freed, vec![("gone".to_string(), b)]);
    assert_eq!(ready(r.allocate("keep", any(), 0)), a);
    assert!(matches!(restore_ipam(p(2), u(), seeds.clone(), cfg.clone(), &snap), Err(IpamError::SnapshotPeer { .. })));
    assert!(matches!(
        restore_ipam(p(1), "10.32.0.0/21".parse().unwrap(), seeds.clone(), cfg.clone(), &snap),
        Err(IpamError::SnapshotRange { .. })
    ));
    let mut bad = snap.clone();
    bad[0] = 9;
    assert!(matches!(restore_ipam(p(1), u(), seeds.clone(), cfg.clone(), &bad), Err(IpamError::BadSnapshot(_))));
    // Truncations never panic.
    for n in 0..snap.len() {
        let _ = restore_ipam(p(1), u(), seeds.clone(), cfg.clone(), &snap[..n]);
    }
    // An unagreed consensus peer keeps its promises across a restart.
    let mut c = new_ipam(p(1), u(), InitMode::Consensus(3)).unwrap();
    let _ = c.allocate("x", any(), 0);
    let s = c.snapshot();
    let r = restore_ipam(p(1), u(), InitMode::Consensus(3), cfg, &s).unwrap();
    assert_eq!(r.status().state, RingState::AwaitingConsensus { known: 1, quorum: 3 });
}

#[test]
fn agreed_peers_compare_digests_and_only_a_stale_one_gets_full_state() {
    let mut m = seeded(3);
    m.run();
    m.run_secs(1);
    // At rest, the periodic anti-entropy of an agreed ring is one small digest.
    let sent = m.run_alone(0, 31_000);
    assert!(!sent.is_empty());
    for bytes in &sent {
        let (_, env) = wire::decode(bytes).unwrap();
        assert!(matches!(env.body, Body::Digest { .. }), "{:?}", env.body);
        assert!(bytes.len() < 120, "{} bytes", bytes.len());
    }
    // Peer 3 misses a delta (64 of 511 addresses taken at peer 1: news).
    m.up[2] = false;
    for k in 0..64 {
        ready(m.alloc(0, &format!("c{k}"), any()));
    }
    m.run();
    m.up[2] = true;
    assert_ne!(m.nodes[2].ring_bytes(), m.nodes[0].ring_bytes());
    // Equal digests between peers 1 and 2 send nothing more; peer 3's differs,
    // and one period later it holds the same ring.
    let before = m.sent;
    m.run_secs(31);
    assert_eq!(m.nodes[2].ring_bytes(), m.nodes[0].ring_bytes());
    assert_eq!(m.nodes[1].ring_bytes(), m.nodes[0].ring_bytes());
    assert!(m.sent - before <= 3 * 2 + 2 * 3, "{} messages", m.sent - before);
    // Garbage digests change nothing: a digest to one peer, or of no ring, is malformed.
    let ring = m.nodes[0].ring_bytes();
    let malformed = m.nodes[0].drops().malformed_messages;
    for (dst, ring_id) in [(p(1), 1), (PeerName::BROADCAST, 0)] {
        let env = Envelope { universe: u(), src: p(2), dst, body: Body::Digest { ring_id, digest: [0; 16] } };
        let _ = m.nodes[0].handle_message(p(2), &signed(&env, 0), m.now, &mut m.keys[0]);
    }
    assert!(m.nodes[0].poll_transmit().is_none());
    assert_eq!(m.nodes[0].ring_bytes(), ring);
    assert_eq!(m.nodes[0].drops().malformed_messages, malformed + 2);
}

#[test]
fn free_counts_are_published_in_small_deltas_when_they_move_enough() {
    let mut m = seeded(2);
    m.run();
    let start = u().start();
    assert_eq!(m.nodes[0].ring().get(start).map(|e| (e.owner, e.free)), Some((p(1), 511)));
    // One allocation in a range with 511 free addresses is no news: nothing is sent.
    ready(m.alloc(0, "c0", any()));
    assert!(m.nodes[0].poll_transmit().is_none());
    // A burst that moves the count by an eighth is one delta of one entry.
    for k in 1..62 {
        ready(m.alloc(0, &format!("c{k}"), any()));
    }
    assert!(m.nodes[0].poll_transmit().is_none(), "62 of 511 is not yet an eighth");
    ready(m.alloc(0, "c62", any()));
    let (dest, bytes) = m.nodes[0].poll_transmit().unwrap();
    assert!(m.nodes[0].poll_transmit().is_none());
    assert_eq!(dest, Dest::Neighbours);
    let (packet, env) = wire::decode(&bytes).unwrap();
    match env.body {
        Body::Gossip(Gossip { full: false, entries, .. }) => assert_eq!(entries, vec![(start, *m.nodes[0].ring().get(start).unwrap())]),
        b => panic!("{b:?}"),
    }
    assert_eq!(m.nodes[0].ring().get(start).unwrap().free, 511 - 63);
    // One entry (about 20 bytes) with its proof (73) and the envelope signature
    // (64); the sender's binding (136) went to the neighbours with its first gossip.
    assert!(packet.bindings.is_empty());
    assert!(bytes.len() < 200, "{} bytes", bytes.len());
    let now = m.now;
    m.nodes[1].handle_message(p(1), &bytes, now, &mut m.keys[1]).unwrap();
    // The status is exact for my own ranges; the next full gossip publishes it.
    ready(m.alloc(0, "c63", any()));
    let mine = |n: &Ipam| n.status().owners.iter().find(|o| o.peer == p(1)).map(|o| o.free);
    assert_eq!(mine(&m.nodes[0]), Some(511 - 64));
    m.run();
    assert_eq!(mine(&m.nodes[1]), Some(511 - 63));
    m.run_secs(31);
    assert_eq!(mine(&m.nodes[1]), Some(511 - 64));
    assert_eq!(m.nodes[1].ring_bytes(), m.nodes[0].ring_bytes());
}

#[test]
fn mutated_messages_never_panic_and_errors_change_nothing() {
    // Record real traffic: gossip, donations, claims, replies, syncs.
    let seeds = vec![p(1), p(2)];
    let mut m = Mesh::new(|i| if i < 2 { InitMode::Seed(seeds.clone()) } else { InitMode::Observer }, 3);
    m.run();
    for k in 0..20 {
        let _ = m.alloc(2, &format!("o{k}"), any());
        let _ = m.alloc(0, &format!("c{k}"), Request::Exact { ip: IpAddr::V4(Ipv4Addr::from(u32::from(ip("10.32.2.1").to_string().parse::<Ipv4Addr>().unwrap()) + k)), prefix: 22 });
        m.run();
    }
    let mut c = Mesh::new(|_| InitMode::Consensus(3), 3);
    for i in 0..3 {
        let _ = c.alloc(i, "x", any()); // consensus starts on the first allocation
    }
    c.run_secs(5);
    assert!(c.nodes.iter().all(|n| n.is_agreed()));
    let mut corpus = std::mem::take(&mut m.log);
    corpus.extend(std::mem::take(&mut c.log));
    assert!(corpus.len() > 50);
    let mut rng = Rng::new(99);
    let target = &mut m.nodes[1];
    let keys = &mut m.keys[1];
    let (mut applied, mut refused) = (0, 0);
    for round in 0..10_000u64 {
        let mut b = corpus[rng.below(corpus.len() as u64) as usize].clone();
        match rng.below(4) {
            0 => b.truncate(rng.below(b.len() as u64 + 1) as usize),
            1 => b.push(rng.next() as u8),
            _ => {
                for _ in 0..1 + rng.below(3) {
                    let i = rng.below(b.len() as u64) as usize;
                    b[i] ^= 1 << rng.below(8);
                }
            }
        }
        let before = (target.snapshot(), target.ring_bytes());
        match target.handle_message(p(3), &b, 1_000_000 + round, keys) {
            Ok(()) => applied += 1,
            Err(_) => {
                refused += 1;
                assert_eq!((target.snapshot(), target.ring_bytes()), before, "a refused message changed state");
            }
        }
        while target.poll_transmit().is_some() {}
        while target.poll_event().is_some() {}
    }
    assert!(applied > 100 && refused > 100, "{applied} applied, {refused} refused");
}

// ------------------------------------------------------------------ forgeries

/// The attacker: a member with its own identity, named `p(9)`.
fn attacker() -> (Identity, Signer) {
    let id = id_of(p(9));
    let s = Signer::from_identity(&id);
    (id, s)
}

/// `env` signed with `key`'s signer whatever `env.src` says, carrying `bindings`.
fn forge(env: &Envelope, key: &Signer, bindings: Vec<Binding>) -> Vec<u8> {
    wire::encode(env, 0, bindings, key)
}

fn entry_proof(key: &Signer, by: PeerName, ring_id: u64, start: Addr, e: &ring::Entry) -> wire::Proof {
    wire::Proof { by, sig: key.sign(wire::DOMAIN_ENTRY, &wire::entry_message(ring_id, start, e)) }
}

/// State a forgery must not change: the ring, allocations and Paxos records.
fn state(n: &mut Ipam) -> (Vec<u8>, Vec<u8>) {
    (n.ring_bytes(), n.snapshot())
}

#[test]
fn forged_entries_are_dropped_and_counted() {
    let mut m = seeded(2);
    m.run();
    ready(m.alloc(0, "c", any()));
    m.run();
    let (mid, ms) = attacker();
    let me_binding = Binding::new(p(9), &mid, &ms);
    let rid = m.nodes[0].ring().id();
    let start = u().start();
    let victim_entry = *m.nodes[0].ring().get(start).unwrap();
    assert_eq!(victim_entry.owner, p(1));
    let stolen = ring::Entry { owner: p(9), size: victim_entry.size, version: victim_entry.version + 5, free: victim_entry.free };
    let send = |m: &mut Mesh, j: usize, proof: wire::Proof, bindings: Vec<Binding>| {
        let g = Gossip { full: false, ring_id: rid, seeds: vec![], entries: vec![(start, stolen)], proofs: vec![proof], consensus: 0 };
        let env = Envelope { universe: u(), src: p(9), dst: PeerName::BROADCAST, body: Body::Gossip(g) };
        let bytes = forge(&env, &ms, bindings);
        let keys = &mut m.keys[j];
        m.nodes[j].handle_message(p(9), &bytes, m.now, keys)
    };
    let before: Vec<_> = m.nodes.iter_mut().map(state).collect();
    // 1. The victim's own range, claimed by the attacker under its own signature.
    let own_sig = entry_proof(&ms, p(9), rid, start, &stolen);
    send(&mut m, 0, own_sig, vec![me_binding.clone()]).unwrap();
    assert_eq!(m.nodes[0].drops().forged_entries, 1);
    // 2. A third peer: a live owner's range signed by someone else is not believed
    //    (and the owner is asked for its state).
    send(&mut m, 1, own_sig, vec![me_binding.clone()]).unwrap();
    assert_eq!(m.nodes[1].drops().unverifiable_entries, 1);
    // 3. Claiming to be the owner's signature: a bad signature.
    let fake_owner_sig = entry_proof(&ms, p(1), rid, start, &stolen);
    send(&mut m, 1, fake_owner_sig, vec![me_binding.clone()]).unwrap();
    assert_eq!(m.nodes[1].drops().forged_entries, 1);
    // 4. A writer with no key bound anywhere (no binding sent for it).
    let xs = Signer::from_identity(&id_of(p(7)));
    send(&mut m, 1, entry_proof(&xs, p(7), rid, start, &stolen), vec![me_binding.clone()]).unwrap();
    assert_eq!(m.nodes[1].drops().unknown_entry_signers, 1);
    // 5. No signature at all: the message does not decode (proofs missing).
    let g = Gossip { full: false, ring_id: rid, seeds: vec![], entries: vec![(start, stolen)], proofs: vec![], consensus: 0 };
    let env = Envelope { universe: u(), src: p(9), dst: PeerName::BROADCAST, body: Body::Gossip(g) };
    let e = m.nodes[1].handle_message(p(9), &forge(&env, &ms, vec![me_binding]), m.now, &mut m.keys[1]).unwrap_err();
    assert!(!e.is_conflict(), "{e}");
    assert_eq!(m.nodes[1].drops().malformed_messages, 1);
    let after: Vec<_> = m.nodes.iter_mut().map(state).collect();
    assert_eq!(before, after, "a forgery changed state");
    // The victim still allocates from its range, and the mesh still agrees.
    m.run();
    ready(m.alloc(0, "d", any()));
    m.run();
    assert_eq!(m.nodes[0].ring_bytes(), m.nodes[1].ring_bytes());
    assert_eq!(m.nodes[0].ring().get(start).unwrap().owner, p(1));
}

#[test]
fn forged_sender_and_conflicting_binding_are_dropped() {
    let mut m = seeded(2);
    m.run();
    let (mid, ms) = attacker();
    let before: Vec<_> = m.nodes.iter_mut().map(state).collect();
    // A space request claiming to come from peer 2, signed by the attacker.
    let env = Envelope { universe: u(), src: p(2), dst: p(1), body: Body::SpaceRequest { id: 7, subnet: u() } };
    m.nodes[0].handle_message(p(9), &forge(&env, &ms, vec![]), m.now, &mut m.keys[0]).unwrap();
    assert_eq!(m.nodes[0].drops().forged_messages, 1);
    assert!(m.nodes[0].poll_transmit().is_none(), "nothing donated, nothing answered");
    // The same with a binding of peer 2's name to the attacker's keys.
    let squat = Binding::new(p(2), &mid, &ms);
    m.nodes[0].handle_message(p(9), &forge(&env, &ms, vec![squat]), m.now, &mut m.keys[0]).unwrap();
    assert_eq!(m.nodes[0].drops().conflicting_bindings, 1);
    assert_eq!(m.nodes[0].drops().forged_messages, 2);
    assert_eq!(m.keys[0].get(p(2)).unwrap().signing_key, Signer::from_identity(&id_of(p(2))).public());
    // A sender nobody knows, with no binding.
    let env = Envelope { universe: u(), src: p(8), dst: p(1), body: Body::SyncRequest };
    m.nodes[0].handle_message(p(9), &forge(&env, &Signer::from_identity(&id_of(p(8))), vec![]), m.now, &mut m.keys[0]).unwrap();
    assert_eq!(m.nodes[0].drops().unknown_senders, 1);
    // A genuine message altered by a relay (its signature no longer matches).
    let genuine = Envelope { universe: u(), src: p(2), dst: p(1), body: Body::SyncRequest };
    let mut bytes = signed(&genuine, 3);
    let n = bytes.len();
    bytes[n - 10] ^= 1; // inside the signature
    m.nodes[0].handle_message(p(2), &bytes, m.now, &mut m.keys[0]).unwrap();
    assert_eq!(m.nodes[0].drops().forged_messages, 3);
    assert!(m.nodes[0].poll_transmit().is_none());
    let after: Vec<_> = m.nodes.iter_mut().map(state).collect();
    assert_eq!(before, after);
    assert_eq!(m.nodes[0].status().drops.forged_messages, 3);
}

#[test]
fn a_donation_reply_not_from_the_donor_is_dropped() {
    let seeds = vec![p(1), p(2)];
    let mut m = Mesh::new(|i| if i < 2 { InitMode::Seed(seeds.clone()) } else { InitMode::Observer }, 3);
    m.run();
    // The observer asks a donor; the attacker answers in the donor's name.
    assert!(matches!(m.alloc(2, "o", any()), Ok(Allocation::Pending(Waiting::Donation { .. }))));
    let (dest, bytes) = m.nodes[2].poll_transmit().unwrap();
    let Dest::Peer(donor) = dest else { panic!("{dest:?}") };
    let (_, env) = wire::decode(&bytes).unwrap();
    let Body::SpaceRequest { id, .. } = env.body else { panic!() };
    let (mid, ms) = attacker();
    let rid = m.nodes[2].ring().id();
    let start = m.nodes[2].ring().owned_by(donor).next().map(|(s, _)| s).unwrap();
    let gift = ring::Entry { owner: p(3), size: 4, version: 9, free: 4 };
    let before = state(&mut m.nodes[2]);
    // (a) In the donor's name, signed by the attacker.
    let g = Gossip { full: false, ring_id: rid, seeds: vec![], entries: vec![(start, gift)], proofs: vec![entry_proof(&ms, donor, rid, start, &gift)], consensus: 0 };
    let env = Envelope { universe: u(), src: donor, dst: p(3), body: Body::Reply { id, outcome: wire::Outcome::Donated, gossip: g } };
    m.nodes[2].handle_message(p(9), &forge(&env, &ms, vec![]), m.now, &mut m.keys[2]).unwrap();
    assert_eq!(m.nodes[2].drops().forged_messages, 1);
    // (b) In its own name, giving away the donor's space.
    let g = Gossip { full: false, ring_id: rid, seeds: vec![], entries: vec![(start, gift)], proofs: vec![entry_proof(&ms, p(9), rid, start, &gift)], consensus: 0 };
    let env = Envelope { universe: u(), src: p(9), dst: p(3), body: Body::Reply { id, outcome: wire::Outcome::Donated, gossip: g } };
    m.nodes[2].handle_message(p(9), &forge(&env, &ms, vec![Binding::new(p(9), &mid, &ms)]), m.now, &mut m.keys[2]).unwrap();
    assert_eq!(m.nodes[2].drops().unverifiable_entries, 1);
    assert_eq!(state(&mut m.nodes[2]), before);
    assert_eq!(m.nodes[2].allocations().count(), 0);
    assert!(matches!(m.alloc(2, "o", any()), Ok(Allocation::Pending(Waiting::Donation { .. }))), "still waiting for the real donor");
    // The real donor's answer still works.
    let bytes_to_donor = bytes;
    let donor_i = m.idx(donor).unwrap();
    m.nodes[donor_i].handle_message(p(3), &bytes_to_donor, m.now, &mut m.keys[donor_i]).unwrap();
    m.run();
    ready(m.alloc(2, "o", any()));
    assert_eq!(m.check_unique(), 1);
}

#[test]
fn forged_paxos_messages_and_decisions_are_dropped() {
    let mut m = Mesh::new(|_| InitMode::Consensus(3), 3);
    m.run();
    let (mid, ms) = attacker();
    let before: Vec<_> = m.nodes.iter_mut().map(state).collect();
    let big = paxos::Ballot { round: 1000, proposer: p(2) };
    let huge = paxos::Ballot { round: 1 << 40, proposer: p(9) };
    let send = |m: &mut Mesh, body: Body, dst: PeerName| {
        let env = Envelope { universe: u(), src: p(9), dst, body };
        m.nodes[0].handle_message(p(9), &forge(&env, &ms, vec![Binding::new(p(9), &mid, &ms)]), m.now, &mut m.keys[0])
    };
    // A prepare of peer 2's ballot, flooded by the attacker.
    send(&mut m, Body::Prepare { ballot: big, attempt: 0, initial: 3 }, PeerName::BROADCAST).unwrap();
    assert_eq!(m.nodes[0].drops().forged_paxos_records, 1);
    // Its own prepare, jumping rounds towards the bound.
    send(&mut m, Body::Prepare { ballot: huge, attempt: 0, initial: 3 }, PeerName::BROADCAST).unwrap();
    assert_eq!(m.nodes[0].drops().paxos_round_jumps, 1);
    // An accept request for peer 2's ballot with a value it made up.
    let value = vec![p(9)];
    let value_sig = ms.sign(wire::DOMAIN_PAXOS_VALUE, &wire::value_message(&u(), &big, &value));
    send(&mut m, Body::Accept { ballot: big, value, value_sig }, p(1)).unwrap();
    assert_eq!(m.nodes[0].drops().forged_paxos_values, 1);
    assert_eq!(m.nodes[0].drops().forged_paxos_records, 2);
    // Decisions: acceptances signed by the attacker in the peers' names; too
    // few acceptances; an acceptance by a peer outside the value.
    let mine = paxos::Ballot { round: 1, proposer: p(9) };
    let value = vec![p(1), p(2), p(3)];
    let value_sig = ms.sign(wire::DOMAIN_PAXOS_VALUE, &wire::value_message(&u(), &mine, &value));
    let digest = wire::value_digest(&value);
    let acc = |n: PeerName| (n, ms.sign(wire::DOMAIN_PAXOS_ACCEPT, &wire::accept_message(&u(), n, &mine, &digest)));
    let d = wire::Decision { ballot: mine, initial: 3, value: value.clone(), value_sig, accepts: vec![acc(p(1)), acc(p(2))] };
    send(&mut m, Body::Decision(d.clone()), p(1)).unwrap();
    assert_eq!(m.nodes[0].drops().forged_decisions, 1);
    send(&mut m, Body::Decision(wire::Decision { accepts: vec![acc(p(1))], ..d.clone() }), p(1)).unwrap();
    assert_eq!(m.nodes[0].drops().forged_decisions, 2);
    let value = vec![p(1), p(9)];
    let value_sig = ms.sign(wire::DOMAIN_PAXOS_VALUE, &wire::value_message(&u(), &mine, &value));
    let d = wire::Decision { ballot: mine, initial: 1, value, value_sig, accepts: vec![acc(p(9))] };
    send(&mut m, Body::Decision(d), p(1)).unwrap();
    assert_eq!(m.nodes[0].drops().forged_decisions, 3, "its own acceptance of another value's digest");
    m.run();
    let after: Vec<_> = m.nodes.iter_mut().map(state).collect();
    assert_eq!(before, after);
    assert!(m.nodes.iter().all(|n| !n.is_agreed()));
    // Consensus among the real peers still works.
    for i in 0..3 {
        let _ = m.alloc(i, "x", any());
    }
    m.run_secs(5);
    assert!(m.nodes.iter().all(|n| n.is_agreed() && n.ring().seeds() == [p(1), p(2), p(3)]));
}

#[test]
fn a_version_1_snapshot_loads_and_is_re_signed() {
    // The previous release's layout, written by hand.
    let start = u().start();
    let mine = ring::Entry { owner: p(1), size: 256, version: 3, free: 254 };
    let given = ring::Entry { owner: p(2), size: 256, version: 1, free: 256 };
    let theirs = ring::Entry { owner: p(2), size: 512, version: 0, free: 511 };
    let old = wire::SnapshotV1 {
        me: p(1),
        universe: u(),
        seeds: vec![p(1), p(2)],
        entries: vec![(start, mine), (start + 256, given), (start + 512, theirs)],
        paxos: None,
        allocations: vec![(start + 1, "keep".to_string())],
    };
    let mut bytes = vec![1u8];
    bytes.extend(bincode::serde::encode_to_vec(&old, bincode::config::standard()).unwrap());
    let seeds = InitMode::Seed(vec![p(1), p(2)]);
    let mut r = restore_ipam(p(1), u(), seeds.clone(), Config::default(), &bytes).unwrap();
    assert_eq!(r.allocations().collect::<Vec<_>>(), vec![(IpAddr::V4(Ipv4Addr::from(start as u32 + 1)), "keep")]);
    assert_eq!(r.ring().get(start), Some(&mine));
    assert_eq!(r.ring().get(start + 256), Some(&given));
    // My own entry is signed anew; the other's is kept but not relayed unsigned.
    assert_eq!(r.ring().proof(start).map(|p| p.by), Some(p(1)));
    assert!(r.ring().proof(start + 256).is_none());
    assert!(r.needs_save(), "a migrated snapshot is written back in the new format");
    let snap = r.snapshot();
    assert_eq!(snap[0], wire::SNAPSHOT_VERSION);
    let mut again = restore_ipam(p(1), u(), seeds, Config::default(), &snap).unwrap();
    assert!(!again.needs_save());
    assert_eq!(again.ring_bytes(), r.ring_bytes());
    assert_eq!(again.snapshot(), snap);
    // Full gossip carries my signed entry only (genesis entries follow from the seeds).
    again.peers_changed(&[p(2)]);
    let (_, bytes) = again.poll_transmit().unwrap();
    let (_, env) = wire::decode(&bytes).unwrap();
    let Body::Gossip(g) = env.body else { panic!() };
    assert_eq!(g.entries, vec![(start, mine)]);
    // Peer 2 verifies and merges it.
    let mut two = new_ipam(p(2), u(), InitMode::Seed(vec![p(1), p(2)])).unwrap();
    let mut keys = KeyBook::new();
    two.handle_message(p(1), &bytes, 0, &mut keys).unwrap();
    assert_eq!(two.ring().get(start), Some(&mine));
    assert_eq!(two.drops(), DropStats::default());
}

#[test]
fn versions_at_the_bound_do_not_wrap() {
    let mut r = ring::Ring::genesis(u(), &[p(1)]);
    let start = u().start();
    let allocs: std::collections::BTreeMap<Addr, ()> = Default::default();
    // Push the entry to the bound through merges (as only its owner can sign).
    let top = ring::Entry { owner: p(1), size: 1024, version: ring::MAX_VERSION, free: 1022 };
    let plan = r.plan_merge_same(p(1), &[(start, top)]).unwrap();
    r.apply(plan);
    assert!(!r.set_free(p(1), start, 5), "no edit past the bound");
    assert!(r.transfer(p(1), start + 10, start + 20, p(2), &allocs).is_none());
    assert!(r.reassign_all(p(1), p(2), 1).is_empty());
    assert_eq!(r.get(start), Some(&top));
}

// --- IPv6 rings: 128-bit universes, never enumerated ---

fn c6(s: &str) -> Cidr {
    s.parse().unwrap()
}

/// A /64 ring: allocation, a donation to an observer, an exact claim across
/// owners and a snapshot round trip, all without enumerating 2^64 addresses.
#[test]
fn ipv6_slash64_allocates_donates_claims_and_restores() {
    let u6 = c6("fd32::/64");
    let seeds = vec![p(1), p(2)];
    let mut m = Mesh::new_in(u6, |i| if i < 2 { InitMode::Seed(seeds.clone()) } else { InitMode::Observer }, 3);
    assert_eq!(ready(m.alloc(0, "a", Request::Any(u6))), ip("fd32::1"), "the first address is reserved");
    assert_eq!(ready(m.alloc(1, "b", Request::Any(u6))), ip("fd32::8000:0:0:0"), "peer 2 owns the upper half");
    // A subnet of peer 2's half, asked of peer 1: a donation.
    let sub = c6("fd32:0:0:0:8000:0:1:0/112");
    assert!(matches!(m.alloc(0, "c", Request::Any(sub)), Ok(Allocation::Pending(Waiting::Donation { .. }))));
    m.run();
    let got = ready(m.alloc(0, "c", Request::Any(sub)));
    assert!(sub.contains(got), "{got} in {sub}");
    let (_, e) = m.nodes[0].ring().covering(addr_value(got)).unwrap();
    assert_eq!(e.owner, p(1), "the donated piece is peer 1's now");
    // The observer gets space by donation too.
    assert!(matches!(m.alloc(2, "d", Request::Any(u6)), Ok(Allocation::Pending(_))));
    m.run();
    let d = ready(m.alloc(2, "d", Request::Any(u6)));
    assert!(u6.contains(d));
    // Exact claim of an address peer 1 owns, from peer 2.
    let want = Request::Exact { ip: ip("fd32::1234:5678"), prefix: 64 };
    assert!(matches!(m.alloc(1, "e", want.clone()), Ok(Allocation::Pending(Waiting::Owner { .. }))));
    m.run();
    assert_eq!(ready(m.alloc(1, "e", want)), ip("fd32::1234:5678"));
    m.run();
    assert_eq!(m.check_unique(), 5);
    let st = m.nodes[0].status();
    let total: u128 = st.owners.iter().map(|o| o.size).sum();
    assert_eq!(total, 1u128 << 64, "the owners' sizes add up to the universe");
    assert_eq!(st.universe, u6);
    assert!(st.owners.iter().all(|o| o.ranges.iter().all(|(a, b)| a.is_ipv6() && b.is_ipv6())));
    // Snapshot and restore keep the ring and the addresses exactly.
    let snap = m.nodes[1].snapshot();
    let r = restore_ipam(p(2), u6, InitMode::Seed(seeds.clone()), Config::default(), &snap).unwrap();
    assert_eq!(r.ring_bytes(), m.nodes[1].ring_bytes());
    assert_eq!(r.addresses_of("e"), vec![ip("fd32::1234:5678")]);
    assert_eq!(r.addresses_of("b"), vec![ip("fd32::8000:0:0:0")]);
    // An IPv6 snapshot does not load into an IPv4 ring, nor the other way round.
    assert!(matches!(restore_ipam(p(2), u(), InitMode::Seed(seeds.clone()), Config::default(), &snap), Err(IpamError::SnapshotRange { .. })));
    // Requests of the other family, too-small subnets and reserved addresses are refused.
    assert!(matches!(m.alloc(0, "x", Request::Any(u())), Err(IpamError::SubnetOutsideRange { .. })));
    assert!(matches!(m.alloc(0, "x", Request::Exact { ip: ip("10.32.0.5"), prefix: 22 }), Err(IpamError::AddressOutsideRange { .. })));
    assert!(matches!(m.alloc(0, "x", Request::Any(c6("fd32::/127"))), Err(IpamError::SubnetTooSmall(_))));
    assert!(matches!(m.alloc(0, "x", Request::Exact { ip: ip("fd32::"), prefix: 64 }), Err(IpamError::ReservedAddress { .. })));
    assert!(matches!(m.alloc(0, "x", Request::Exact { ip: ip("fd32::1"), prefix: 129 }), Err(IpamError::BadPrefix(129))));
}

/// IPv4 and IPv6 rings do not talk: a message of one family's ring is refused
/// by the other's as another version (dropped and counted, no conflict).
#[test]
fn rings_of_the_two_families_drop_each_others_messages() {
    let u6 = c6("fd32::/64");
    let mut a4 = new_ipam(p(1), u(), InitMode::Seed(vec![p(1), p(2)])).unwrap();
    let mut b6 = new_ipam(p(2), u6, InitMode::Seed(vec![p(1), p(2)])).unwrap();
    a4.peers_changed(&[p(1), p(2)]);
    b6.peers_changed(&[p(1), p(2)]);
    a4.handle_timeout(0);
    b6.handle_timeout(0);
    let m4: Vec<Vec<u8>> = std::iter::from_fn(|| a4.poll_transmit()).map(|(_, b)| b).collect();
    let m6: Vec<Vec<u8>> = std::iter::from_fn(|| b6.poll_transmit()).map(|(_, b)| b).collect();
    assert!(!m4.is_empty() && !m6.is_empty());
    assert!(m4.iter().all(|b| b[0] == wire::WIRE_VERSION && !wire::is_v6_message(b)));
    assert!(m6.iter().all(|b| b[0] == wire::WIRE_VERSION_V6 && wire::is_v6_message(b)));
    let mut keys = KeyBook::new();
    for b in &m6 {
        assert!(matches!(a4.handle_message(p(2), b, 1, &mut keys), Err(IpamError::UnsupportedVersion(v)) if v == wire::WIRE_VERSION_V6));
    }
    for b in &m4 {
        assert!(matches!(b6.handle_message(p(1), b, 1, &mut keys), Err(IpamError::UnsupportedVersion(4))));
    }
    assert_eq!(a4.drops().version_mismatches, m6.len() as u64);
    assert_eq!(b6.drops().version_mismatches, m4.len() as u64);
}

/// A bare CIDR used at once while its owner was unreachable, which the owner
/// gave to another target meanwhile: after the heal the claim fails, which is
/// a conflict (reported once, listed in the status), not an error waiting for
/// an `allocate` nobody makes; it is claimed again every CONFLICT_RETRY_MS and
/// completes once the other holder lets go. Freeing it ends the conflict.
#[test]
fn a_failed_claim_of_an_address_in_use_is_a_conflict_until_resolved() {
    let mut m = seeded(2);
    let want = ip("10.32.2.7");
    let req = Request::Exact { ip: want, prefix: 22 };
    // Cut: peer 1 cannot reach peer 2, the owner of 10.32.2.7.
    m.up[1] = false;
    m.topology();
    match m.alloc(0, "c1", req.clone()) {
        Ok(Allocation::Pending(Waiting::Owner { owner, reachable: false })) => assert_eq!(owner, p(2)),
        other => panic!("{other:?}"),
    }
    let now = m.now;
    m.nodes[0].note_in_use("c1", want, 22, now).unwrap();
    // Meanwhile the owner gives it to a target of its own.
    assert_eq!(ready(m.alloc(1, "c2", req.clone())), want);
    assert!(m.nodes[0].status().conflicts.is_empty(), "no conflict while the claim waits");

    // Heal: the claim is answered "in use".
    m.up[1] = true;
    m.topology();
    m.run();
    let conflict = Conflict { target: "c1".into(), ip: want, prefix: 22, error: IpamError::AddressInUse { ip: want, holder: Holder::Peer(p(2)) } };
    let events: Vec<Event> = std::iter::from_fn(|| m.nodes[0].poll_event()).collect();
    assert_eq!(events, vec![Event::Conflict(conflict.clone())]);
    assert_eq!(m.nodes[0].status().conflicts, vec![conflict.clone()]);
    // Retried, quietly while the answer stays the same.
    m.run_secs(CONFLICT_RETRY_MS / 1000 * 2 + 1);
    assert_eq!(std::iter::from_fn(|| m.nodes[0].poll_event()).count(), 0, "a retry failing the same way is not news");
    assert_eq!(m.nodes[0].status().conflicts, vec![conflict]);
    // No `allocate` waits for it: a new ask for the same starts afresh.
    assert!(matches!(m.alloc(0, "c1", req.clone()), Ok(Allocation::Pending(_))));

    // The owner's target lets go: the next retry completes the claim.
    assert!(m.nodes[1].free("c2", want));
    m.run_secs(CONFLICT_RETRY_MS / 1000 + 1);
    assert_eq!(m.nodes[0].poll_event(), Some(Event::Allocated { target: "c1".into(), ip: want, prefix: 22 }));
    assert!(m.nodes[0].status().conflicts.is_empty());
    assert_eq!(m.nodes[0].addresses_of("c1"), vec![want]);
    m.check_unique();

    // Another conflict, ended by the target letting go of the address.
    let other = ready(m.alloc(1, "c3", any()));
    let req = Request::Exact { ip: other, prefix: 22 };
    m.up[1] = false;
    m.topology();
    assert!(matches!(m.alloc(0, "c4", req.clone()), Ok(Allocation::Pending(Waiting::Owner { reachable: false, .. }))));
    let now = m.now;
    m.nodes[0].note_in_use("c4", other, 22, now).unwrap();
    m.up[1] = true;
    m.topology();
    m.run();
    assert_eq!(m.nodes[0].status().conflicts.len(), 1);
    assert!(!m.nodes[0].free("c4", other), "it was never c4's in the ring");
    assert!(m.nodes[0].status().conflicts.is_empty());
    m.run_secs(CONFLICT_RETRY_MS / 1000 + 1);
    assert!(m.nodes[0].addresses_of("c4").is_empty(), "a freed address is not claimed again");
    assert_eq!(m.nodes[0].pending_count(), 0);
}

/// `note_in_use` after the claim already failed: the failure becomes the conflict.
#[test]
fn note_in_use_after_the_claim_failed_reports_the_conflict() {
    let mut m = seeded(2);
    let taken = ready(m.alloc(1, "x", any()));
    let req = Request::Exact { ip: taken, prefix: 22 };
    assert!(matches!(m.alloc(0, "c", req.clone()), Ok(Allocation::Pending(_))));
    m.run();
    assert!(matches!(m.nodes[0].poll_event(), Some(Event::Failed { .. })));
    let now = m.now;
    m.nodes[0].note_in_use("c", taken, 22, now).unwrap();
    assert!(matches!(m.nodes[0].poll_event(), Some(Event::Conflict(Conflict { ref target, .. })) if target == "c"));
    assert_eq!(m.nodes[0].status().conflicts.len(), 1);
    // Nothing to note for an address the target holds, or a bad one.
    let mine = ready(m.alloc(0, "d", any()));
    m.nodes[0].note_in_use("d", mine, 22, now).unwrap();
    assert_eq!(m.nodes[0].status().conflicts.len(), 1);
    assert!(m.nodes[0].note_in_use("d", ip("10.99.0.1"), 22, now).is_err());
}

/// An address a target uses before the ring is agreed (noted, its claim
/// deferred) is not handed to another target when the ring comes: the
/// allocation that started consensus is served first, and took the lowest
/// free address, so the deferred claim then failed and nothing claimed it again.
#[test]
fn an_address_noted_before_agreement_is_not_handed_out() {
    let mut one = new_ipam(p(1), u(), InitMode::Consensus(1)).unwrap();
    let used = ip("10.32.0.1");
    one.note_in_use("old", used, 22, 0).unwrap();
    assert!(matches!(one.allocate("new", any(), 0), Ok(Allocation::Pending(_))));
    for _ in 0..4 {
        let t = one.poll_timeout().unwrap();
        one.handle_timeout(t);
    }
    assert!(one.is_agreed());
    assert_eq!(one.poll_event(), Some(Event::Agreed { seeds: vec![p(1)] }));
    match one.poll_event() {
        Some(Event::Allocated { target, ip, .. }) => {
            assert_eq!(target, "new");
            assert_ne!(ip, used, "the noted address went to another target");
        }
        other => panic!("{other:?}"),
    }
    // The deferred claim now succeeds.
    assert!(matches!(one.allocate("old", Request::Exact { ip: used, prefix: 22 }, 1), Ok(Allocation::Ready { .. })));
    assert_eq!(one.addresses_of("old"), vec![used]);

    // One whose claim fails at once (another target here has it) is a listed conflict.
    let taken = one.addresses_of("new")[0];
    let e = one.allocate("late", Request::Exact { ip: taken, prefix: 22 }, 2).unwrap_err();
    one.note_conflict("late", taken, 22, e.clone(), 2).unwrap();
    assert_eq!(one.poll_event(), Some(Event::Conflict(Conflict { target: "late".into(), ip: taken, prefix: 22, error: e })));
    assert_eq!(one.status().conflicts.len(), 1);
    // Retried: once the holder lets go, the claim completes.
    assert!(one.free("new", taken));
    for _ in 0..3 {
        let t = one.poll_timeout().unwrap();
        one.handle_timeout(t);
    }
    assert_eq!(one.addresses_of("late"), vec![taken]);
    assert!(one.status().conflicts.is_empty());
}

/// Weave's 350_observers_can_call_election: participants enough for
/// consensus that nobody asked for an address stay idle; an allocation on an
/// observer makes them agree (it asks them for space), and it gets an address.
#[test]
fn an_observer_calls_the_election() {
    let mut m = Mesh::new(|i| if i < 2 { InitMode::Consensus(2) } else { InitMode::Observer }, 3);
    m.run_secs(10);
    assert!(m.nodes.iter().all(|n| !n.is_agreed()), "nobody asked: no consensus");
    assert_eq!(m.alloc(2, "c", any()), Ok(Allocation::Pending(Waiting::Ring)));
    m.run_secs(10);
    assert!(m.nodes.iter().all(|n| n.is_agreed()));
    let events: Vec<Event> = std::iter::from_fn(|| m.nodes[2].poll_event()).collect();
    assert!(events.iter().any(|e| matches!(e, Event::Allocated { target, .. } if target == "c")), "{events:?}");
    assert!(m.nodes[2].status().owners.iter().any(|o| o.peer == p(3) && o.size > 0), "the observer got space");
    m.check_unique();
}
