//! Shared router state: topology, connections, connect targets, and gossip.
//!
//! Tasks hold the lock only for short, non-async sections. Messages to a
//! connection go through its queue; the connection's own task encrypts and writes.
//! What to dial and when is decided by `meshnet_proto::dialer` (held here, told
//! about every connection that is established or ends); the tasks in `conn`
//! perform the dials. What to gossip to whom and when is decided by
//! `meshnet_proto::gossip` (told about connections, merges and ticks); this
//! module only queues what it returns ([`Mesh::perform`]). Which inbound
//! connection `--conn-limit` takes is `meshnet_proto::slots`' decision.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meshnet_proto::dialer::{self, Dial, DialId, Dialer, End, Failure, Keep};
use meshnet_proto::gossip::{self, Digest, EntryVersion, Gossip};
use meshnet_proto::handshake::{verify_peer, Hello, CAP_GOSSIP_DIGEST, CAP_SPLICE};
use meshnet_proto::slots::{self, Admit, Held, Need};
use meshnet_proto::topology::{ConnInfo, PeerInfo, SignedPeerInfo, Topology};
use meshnet_proto::trust::{Admission, Binding, KeyBook, PeerKeys, Signer};
use meshnet_proto::wire::control::{split_gossip, ControlMsg, GOSSIP_CHUNK};
use meshnet_proto::PeerName;
use meshnet_router::dataplane::{DataPlane, PeerLink, Routes};
use meshnet_proto::admission::{self, AdmissionConfig, Gate, Outcome, Ticket};
use tokio::sync::Notify;

use crate::api::{ConnectionStatus, LimitsStatus, PeerStatus, Refusal, TrustStatus};
use crate::conn::{CloseReason, ConnCounters, Outbox};
use crate::ipam::IpamHost;
use meshnet_proto::ipam::Dest;
use crate::peeraddr::PeerAddr;
use crate::state::StateDir;

/// A connection whose UDP worked and then stopped for this long is closed (and
/// dialled again by whoever holds the target): the peer may have moved.
pub const UDP_LOST_CLOSE: Duration = Duration::from_secs(30);
/// Routes and broadcast trees are recomputed at most this often: a burst of
/// gossip costs one recomputation (the first change after a quiet spell is
/// applied at once).
pub const ROUTES_DEBOUNCE: Duration = Duration::from_millis(100);
/// Discovery candidates are computed again at most this often: it walks every
/// connection of every peer (10 000 in a full mesh of 100), and while a mesh
/// forms the topology changes hundreds of times a second; this walk was the
/// largest single cost of a forming mesh of 100.
pub const DISCOVERY_EVERY: Duration = Duration::from_millis(500);

pub use meshnet_proto::dialer::Direction;

/// A live TCP connection (handshaking or established).
pub struct Conn {
    pub direction: Direction,
    pub remote: SocketAddr,
    /// The handshake completed (TCP control channel up).
    pub established: bool,
    /// UDP heartbeats work both ways: the connection carries data, and is
    /// gossiped as established so routes use it.
    pub udp_ok: bool,
    /// Since when UDP has not worked, on a connection where it once did.
    pub udp_lost_at: Option<Instant>,
    pub peer: Option<PeerName>,
    pub nickname: String,
    /// The peer's TCP listen address (its IP as seen, its advertised port).
    pub listen: Option<SocketAddr>,
    pub recv_index: u32,
    /// Receiver indexes reserved or installed by rekeying, not yet removed.
    pub rekey_indexes: Vec<u32>,
    /// The epoch of the data key we send under, and since when.
    pub key_epoch: u32,
    pub key_since: Instant,
    /// The kernel's smoothed round-trip time of the control connection
    /// (TCP_INFO, read at every control heartbeat), in microseconds.
    pub rtt_us: Option<u32>,
    /// Bounded; gossip coalesces, Goodbye always gets through (see `conn::Outbox`).
    pub queue: Arc<Outbox>,
    pub since: Instant,
    /// The peer's Hello's `CAP_*` bits (0 until established).
    pub capabilities: u32,
    /// The peer's Hello's `uid`, its incarnation (0 until established).
    pub peer_uid: u64,
    /// A spliced connection (see `crate::splice`): carried through this peer.
    pub spliced_via: Option<PeerName>,
}

pub struct Inner {
    pub topology: Topology,
    pub conns: HashMap<u64, Conn>,
    next_conn: u64,
    /// Persisted connect targets, normalised `host:port`.
    pub targets: BTreeSet<String>,
    /// Dial state per target string, and per discovered address (as `ip:port`);
    /// the discovery dial budget and its deferred counter.
    pub dialer: Dialer,
    pub ipam: IpamHost,
    /// The IPv6 ring, when a second `--ipalloc-range` (IPv6) was given: an
    /// independent IPAM instance whose messages are told apart by their first
    /// byte ([`meshnet_proto::ipam::wire::is_v6_message`]).
    pub ipam6: Option<IpamHost>,
    /// Next hop towards every reachable peer, as last computed (see [`route_loop`]).
    pub next_hop: HashMap<PeerName, PeerName>,
    /// The topology changed since the discovery candidates were last given to
    /// the dialer.
    discovery_stale: bool,
    /// When the discovery candidates were last computed (see [`DISCOVERY_EVERY`]).
    discovery_at: Option<Instant>,
    /// Route recomputations, and how long the last one took off the lock.
    pub route_runs: u64,
    pub route_last_ms: u64,
    /// Names pinned to keys; persisted in `keys.json` by [`Mesh::save_keys`].
    pub keys: meshnet_proto::trust::KeyBook,
    pub trust: TrustStats,
    /// Who gets which topology entries, and when (deltas, anti-entropy).
    pub gossip: Gossip,
    /// Discovery addresses remembered when our last connection ended (the
    /// refusal of a full router tells its topology first): dialled while we
    /// have no connection, although garbage collection forgot their entries.
    hints: Vec<String>,
    /// Nicknames of peers garbage collection forgot (unreachable), so that
    /// `rmpeer NICKNAME` still finds a dead peer; at most [`GONE_NICKNAMES`].
    gone_nicknames: HashMap<PeerName, String>,
    /// Incarnations of peers that a newer one replaced: one coming back is a
    /// second router with the same identity, refused.
    replaced: dialer::Replaced,
}

/// How many nicknames of forgotten peers are kept for `rmpeer`.
const GONE_NICKNAMES: usize = 4096;

/// How many refusals `status` lists.
const RECENT_REFUSALS: usize = 16;
/// Least time between two log lines about refusals of one name, or about dropped gossip.
const TRUST_LOG_EVERY: Duration = Duration::from_secs(10);
/// Reasons of `trust.gossip_rejected` besides the topology's own
/// ([`meshnet_proto::topology::Rejection::label`]): an entry under a revoked
/// key, a gossip message that does not decode within its bounds.
pub const GOSSIP_REVOKED: &str = "revoked";
pub const GOSSIP_OVERSIZE: &str = "oversize";

/// Every reason `trust.gossip_rejected` counts, each shown from the start.
pub fn gossip_reasons() -> impl Iterator<Item = &'static str> {
    meshnet_proto::topology::Rejection::ALL.into_iter().map(|r| r.label()).chain([GOSSIP_REVOKED, GOSSIP_OVERSIZE])
}
/// Prefix of the Goodbye reason a router sends when it refuses a peer's identity.
pub const IDENTITY_REFUSED: &str = "identity refused by";
/// How the goodbye after an IPAM conflict begins (an IPv4 ring's), so that the
/// peer told can list the refusal too: it may never see our IPAM message.
pub const IPAM_CONFLICT: &str = "IPAM conflict between peers";
/// The same for the IPv6 ring's conflicts.
pub const IPAM6_CONFLICT: &str = "IPAM conflict (IPv6 ring) between peers";

/// Why a peer that claims this router's own name `me` with keys other than
/// ours is refused: two routers were launched with the same `--name`. (The
/// key book's answer, "already bound ... rmpeer", would tell the user to
/// remove this router's own name.) `None` for any other claim.
fn claims_our_name(me: PeerName, ours: &PeerKeys, claimed: PeerName, keys: &PeerKeys) -> Option<String> {
    (claimed == me && keys != ours).then(|| {
        format!(
            "{me} is this router's own name, claimed with another key ({}, ours is {}): two routers were launched with the same --name; give each its own (or none)",
            keys.fingerprint(),
            ours.fingerprint()
        )
    })
}

/// Identities refused and gossip dropped, for `status` and rate-limited logs.
#[derive(Default)]
pub struct TrustStats {
    pub refused_identities: u64,
    pub refused_by_peers: u64,
    recent: VecDeque<(Instant, Refusal)>,
    pub gossip_rejected: BTreeMap<&'static str, u64>,
    /// Dropped entries not yet reported in the log, and when it last was.
    unlogged: u64,
    last_gossip_log: Option<Instant>,
    last_refusal_log: HashMap<PeerName, Instant>,
    /// Keys `rmpeer` removed: not pinned again from old gossip during this run.
    revoked: HashMap<PeerName, PeerKeys>,
    /// Key book changes made, and the last one saved.
    keys_changed: u64,
    keys_saved: u64,
}

impl TrustStats {
    fn remember(&mut self, r: Refusal) {
        if self.recent.len() >= RECENT_REFUSALS {
            self.recent.pop_front();
        }
        self.recent.push_back((Instant::now(), r));
    }

    /// Whether to log a refusal about `name` now (at most once per TRUST_LOG_EVERY per name).
    fn should_log(&mut self, name: PeerName) -> bool {
        let now = Instant::now();
        if self.last_refusal_log.len() > 16 {
            self.last_refusal_log.retain(|_, t| now.duration_since(*t) < TRUST_LOG_EVERY);
        }
        // At most 16 names logged per period: a flood of invented names cannot flood the log.
        if self.last_refusal_log.len() > 16 {
            return false;
        }
        match self.last_refusal_log.get(&name) {
            Some(t) if now.duration_since(*t) < TRUST_LOG_EVERY => false,
            _ => {
                self.last_refusal_log.insert(name, now);
                true
            }
        }
    }
}

/// Router-wide settings the control plane needs.
pub struct Settings {
    pub me: PeerName,
    pub nickname: String,
    pub uid: u64,
    pub port: u16,
    pub password: bool,
    pub discovery: bool,
    pub conn_limit: usize,
    pub bridge: String,
    pub mtu: u32,
    /// `--rekey-interval`: fresh data keys at least this often.
    pub rekey_interval: Duration,
    /// Signs our topology entry (derived from the identity).
    pub signer: Arc<Signer>,
    /// Our name bound to our keys, sent in every Hello and gossiped with our entry.
    pub binding: Binding,
    /// `--host`: which address families our UDP socket reaches.
    pub host: std::net::IpAddr,
}

impl Settings {
    /// Our sockets can carry UDP to `addr`: an IPv4 `--host` reaches IPv4
    /// only, an IPv6 one IPv6 only, `::` both. Discovery dials nothing else
    /// (a peer with no family in common is reached by relay).
    pub fn reaches(&self, addr: &std::net::SocketAddr) -> bool {
        let v6 = addr.ip().to_canonical().is_ipv6();
        match self.host {
            std::net::IpAddr::V4(_) => !v6,
            std::net::IpAddr::V6(h) if h.is_unspecified() => true,
            std::net::IpAddr::V6(_) => v6,
        }
    }
}

pub struct Mesh {
    pub settings: Settings,
    pub state: StateDir,
    pub dataplane: DataPlane,
    /// meshnet DNS: the table, our records, the server's counters (see `crate::dns`).
    pub dns: Arc<crate::dns::Dns>,
    /// `--trusted-subnets`: peers' records and the kernel VXLAN path (see `crate::trusted`).
    pub trusted: Arc<crate::trusted::Trusted>,
    inner: Mutex<Inner>,
    /// Wakes the connection maker (new targets, lost connections).
    pub maker: Notify,
    /// Wakes [`route_loop`]: the topology changed.
    pub routes_due: Notify,
    /// Wakes the task that persists the key book.
    pub keys_saver: Notify,
    /// Fired once to stop the router.
    pub shutdown: tokio::sync::watch::Sender<Option<Shutdown>>,
    /// Cloned into every connection task ([`ConnAlive`]); dropped at shutdown,
    /// after which the receiver hears the channel close once every task ended.
    alive: Mutex<Option<tokio::sync::mpsc::Sender<()>>>,
    all_ended: Mutex<Option<tokio::sync::mpsc::Receiver<()>>>,
    /// Held while the connect targets change: their file is written under it,
    /// never under `inner`'s lock, which the connection tasks need.
    targets_io: Mutex<()>,
    /// Who may open an inbound connection now (its own lock, never held with `inner`'s).
    admission: Mutex<Gate>,
    pub conn_counters: Arc<ConnCounters>,
    /// The clock of the admission gate and the dialer.
    epoch: Instant,
    /// Connections carried through a neighbour, for peers behind NAT (see `crate::splice`).
    pub splices: crate::splice::Splices,
}

/// Why [`Mesh::establish`] would not take a connection.
#[derive(Debug)]
pub struct Refused {
    /// The Goodbye reason.
    pub reason: String,
    /// Messages to send before the Goodbye (our topology, when refused for
    /// `--conn-limit`, so the peer's discovery can dial others).
    pub topology: Vec<ControlMsg>,
}

impl Refused {
    fn plain(reason: &str) -> Refused {
        Refused { reason: reason.to_string(), topology: Vec::new() }
    }
}

/// Held by a running connection task: shutdown waits until every one is dropped.
pub struct ConnAlive(#[allow(dead_code)] tokio::sync::mpsc::Sender<()>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    Stop,
    Reset,
}

impl Mesh {
    pub fn new(
        settings: Settings,
        state: StateDir,
        dataplane: DataPlane,
        targets: Vec<String>,
        ipam: IpamHost,
        mut keys: KeyBook,
        dns: Arc<crate::dns::Dns>,
        trusted: Arc<crate::trusted::Trusted>,
    ) -> Arc<Mesh> {
        let me = PeerInfo {
            name: settings.me,
            nickname: settings.nickname.clone(),
            uid: settings.uid,
            version: 1,
            software: env!("CARGO_PKG_VERSION").to_string(),
            mtu: settings.mtu,
            connections: Vec::new(),
        };
        let (shutdown, _) = tokio::sync::watch::channel(None);
        let (alive, all_ended) = tokio::sync::mpsc::channel(1);
        // We are who our identity says, whatever an old key book pinned for our name.
        let mut trust = TrustStats::default();
        if keys.get(settings.me) != Some(&settings.binding.keys) {
            if let Some(old) = keys.remove(settings.me) {
                log::warn!(
                    "key book pinned our name {} to key {}; re-pinning it to ours, {}",
                    settings.me,
                    old.fingerprint(),
                    settings.binding.keys.fingerprint()
                );
            }
            if let Err(e) = keys.admit(&settings.binding) {
                log::error!("our own binding does not verify: {e}");
            }
            trust.keys_changed = 1;
        }
        let topology = Topology::with_signer(me, settings.signer.clone(), settings.binding.clone());
        Arc::new(Mesh {
            settings,
            state,
            dataplane,
            dns,
            trusted,
            inner: Mutex::new(Inner {
                topology,
                conns: HashMap::new(),
                next_conn: 1,
                dialer: {
                    let mut d = Dialer::default();
                    d.set_targets(targets.iter().cloned());
                    d
                },
                targets: targets.into_iter().collect(),
                ipam,
                ipam6: None,
                next_hop: HashMap::new(),
                discovery_stale: true,
                discovery_at: None,
                route_runs: 0,
                route_last_ms: 0,
                keys,
                trust,
                gossip: Gossip::new(),
                hints: Vec::new(),
                gone_nicknames: HashMap::new(),
                replaced: dialer::Replaced::default(),
            }),
            maker: Notify::new(),
            routes_due: Notify::new(),
            keys_saver: Notify::new(),
            shutdown,
            alive: Mutex::new(Some(alive)),
            all_ended: Mutex::new(Some(all_ended)),
            targets_io: Mutex::new(()),
            admission: Mutex::new(Gate::new(AdmissionConfig::default())),
            conn_counters: Arc::new(ConnCounters::default()),
            epoch: Instant::now(),
            splices: crate::splice::Splices::default(),
        })
    }

    /// Whether any connection is established.
    pub fn has_established(&self) -> bool {
        self.lock().conns.values().any(|c| c.established)
    }

    /// The queue of our established connection to `peer`, if it carries splices.
    pub fn splice_queue(&self, peer: PeerName) -> Option<Arc<Outbox>> {
        let g = self.lock();
        g.conns
            .values()
            .find(|c| c.established && c.peer == Some(peer) && c.capabilities & CAP_SPLICE != 0)
            .map(|c| c.queue.clone())
    }

    /// Where our link to `peer` sends: the address its authenticated
    /// heartbeats come from (None before one arrived).
    pub fn udp_addr_of(&self, peer: PeerName) -> Option<SocketAddr> {
        let l = self.dataplane.links().remove(&peer)?;
        l.heard_ms_ago.map(|_| l.addr)
    }

    /// We have a connection (in any state past the handshake) to `peer`.
    pub fn connected_to(&self, peer: PeerName) -> bool {
        self.lock().conns.values().any(|c| c.peer == Some(peer))
    }

    /// Mark connection `id` as spliced through `via`.
    pub fn set_spliced(&self, id: u64, via: PeerName) {
        if let Some(c) = self.lock().conns.get_mut(&id) {
            c.spliced_via = Some(via);
        }
    }

    /// For `crate::splice::open_loop`, with discovery on: the peers we reach
    /// but have no connection to, and of those the ones this router opens a
    /// splice to: its name is the smaller, discovery dialled every address
    /// gossiped for the peer (of a family we reach) and failed, a
    /// `--conn-limit` slot is free (a partial mesh leaves peers unconnected
    /// on purpose), and a neighbour carries splices, has working UDP and
    /// lists the peer as an established connection of its own.
    pub fn splice_candidates(&self) -> (HashSet<PeerName>, Vec<(PeerName, PeerName)>) {
        let g = self.lock();
        let me = self.settings.me;
        let mut unconnected = HashSet::new();
        let mut out = Vec::new();
        if !self.settings.discovery {
            return (unconnected, out);
        }
        let full = slots_used(&g) >= self.settings.conn_limit;
        // A peer with no address of a family we reach is never spliced: its
        // heartbeats could not reach us either.
        let dials_failed = |peer: PeerName| {
            let mut addrs = g
                .topology
                .peers()
                .flat_map(|p| p.connections.iter())
                .filter(|c| c.peer == peer && c.addr.port() != 0 && !c.addr.ip().is_unspecified() && self.settings.reaches(&c.addr))
                .peekable();
            addrs.peek().is_some()
                && addrs.all(|c| g.dialer.get(&c.addr.to_string()).is_some_and(|e| e.failures > 0 && !e.state.in_progress()))
        };
        let connected: HashSet<PeerName> = g.conns.values().filter_map(|c| c.peer).collect();
        let relays: Vec<PeerName> = g
            .conns
            .values()
            .filter(|c| c.established && c.udp_ok && c.capabilities & CAP_SPLICE != 0 && c.spliced_via.is_none())
            .filter_map(|c| c.peer)
            .collect();
        for p in g.topology.peers() {
            if p.name == me || connected.contains(&p.name) || !g.next_hop.contains_key(&p.name) {
                continue;
            }
            unconnected.insert(p.name);
            if me >= p.name || full || !dials_failed(p.name) {
                continue;
            }
            let via = relays.iter().copied().find(|r| {
                g.topology.get(*r).is_some_and(|info| info.connections.iter().any(|c| c.peer == p.name && c.established))
            });
            if let Some(via) = via {
                out.push((p.name, via));
            }
        }
        (unconnected, out)
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn admission(&self) -> MutexGuard<'_, Gate> {
        self.admission.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Judges an accepted connection from `ip` (see `meshnet_proto::admission`).
    /// A full `--conn-limit` does not refuse it here: the handshake must tell
    /// whether the peer is lonely (taken anyway) and, if refused, the peer
    /// learns our topology first (see [`establish`](Self::establish)). The
    /// gate's rate and half-open caps bound what that costs.
    pub fn admit(&self, ip: std::net::IpAddr) -> Result<Ticket, admission::Refusal> {
        self.admission().admit(ip, self.now_ms(), false)
    }

    /// Gives back an admitted connection's half-open slot.
    pub fn admission_finished(&self, ticket: Ticket, outcome: Outcome) {
        let now = self.now_ms();
        self.admission().finished(ticket, outcome, now);
    }

    /// Forgets idle sources.
    pub fn admission_tick(&self) {
        let now = self.now_ms();
        self.admission().tick(now);
    }

    /// Counters of refusals and slow peers, for `status`.
    pub fn limits_status(&self) -> LimitsStatus {
        let used = slots_used(&self.lock());
        let c = &self.conn_counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        LimitsStatus {
            conn_limit: self.settings.conn_limit,
            conn_slots_used: used,
            inbound: self.admission().stats(),
            gossip_coalesced: load(&c.gossip_coalesced),
            closed_queue_full: load(&c.closed_queue_full),
            closed_write_timeout: load(&c.closed_write_timeout),
            closed_no_heartbeat: load(&c.closed_no_heartbeat),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For a connection task to hold while it runs (None once shutdown began
    /// waiting: then nobody waits for it).
    pub fn conn_alive(&self) -> Option<ConnAlive> {
        self.alive.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|tx| ConnAlive(tx.clone()))
    }

    /// After [`request_shutdown`](Self::request_shutdown): waits until every
    /// connection task has ended (each says goodbye first), at most `limit`.
    /// The number still running when it gave up, 0 if none.
    pub async fn connections_ended(&self, limit: Duration) -> usize {
        drop(self.alive.lock().unwrap_or_else(|p| p.into_inner()).take());
        let Some(mut rx) = self.all_ended.lock().unwrap_or_else(|p| p.into_inner()).take() else { return 0 };
        match tokio::time::timeout(limit, rx.recv()).await {
            Ok(_) => 0,
            Err(_) => self.lock().conns.len().max(1),
        }
    }

    pub fn request_shutdown(&self, how: Shutdown) {
        self.shutdown.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(how);
                true
            } else {
                false
            }
        });
    }

    /// Registers a connection that is starting its handshake. None when over the
    /// limit: `--conn-limit` counts established connections and our own dials.
    /// Accepted connections still handshaking are capped by the admission gate
    /// instead, so strangers never take these slots, and are judged against the
    /// limit once their handshake says who they are ([`establish`](Self::establish)).
    pub fn register(
        &self,
        direction: Direction,
        remote: SocketAddr,
        queue: Arc<Outbox>,
        recv_index: u32,
    ) -> Option<u64> {
        let mut g = self.lock();
        if direction == Direction::Outbound && slots_used(&g) >= self.settings.conn_limit {
            return None;
        }
        let id = g.next_conn;
        g.next_conn += 1;
        g.conns.insert(
            id,
            Conn {
                direction,
                remote,
                established: false,
                udp_ok: false,
                udp_lost_at: None,
                peer: None,
                nickname: String::new(),
                listen: None,
                recv_index,
                rekey_indexes: Vec::new(),
                key_epoch: 0,
                key_since: Instant::now(),
                rtt_us: None,
                queue,
                since: Instant::now(),
                capabilities: 0,
                peer_uid: 0,
                spliced_via: None,
            },
        );
        Some(id)
    }

    /// A receiver index not used by any live connection.
    pub fn fresh_recv_index(&self) -> u32 {
        let g = self.lock();
        loop {
            // The top bit marks relay sessions (see meshnet_proto::session::RELAY_INDEX_BIT).
            let i = random_u32() & !meshnet_proto::session::RELAY_INDEX_BIT;
            if i != 0 && !g.conns.values().any(|c| c.recv_index == i || c.rekey_indexes.contains(&i)) {
                return i;
            }
        }
    }

    /// Rekeying: a receiver index no live session uses, reserved for connection `id`
    /// until [`release_recv_index`](Self::release_recv_index) or the connection ends.
    pub fn reserve_recv_index(&self, id: u64) -> u32 {
        let i = self.fresh_recv_index();
        if let Some(c) = self.lock().conns.get_mut(&id) {
            c.rekey_indexes.push(i);
        }
        i
    }

    /// Rekeying: connection `id` no longer receives under `index`.
    pub fn release_recv_index(&self, id: u64, index: u32) {
        if let Some(c) = self.lock().conns.get_mut(&id) {
            c.rekey_indexes.retain(|&i| i != index);
        }
    }

    /// Rekeying: connection `id` now sends under data-key epoch `epoch`.
    /// Records connection `id`'s control-channel round-trip time.
    pub fn set_rtt(&self, id: u64, rtt_us: u32) {
        if let Some(c) = self.lock().conns.get_mut(&id) {
            c.rtt_us = Some(rtt_us);
        }
    }

    pub fn rekeyed(&self, id: u64, epoch: u32) {
        self.dataplane.stats.rekeys.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(c) = self.lock().conns.get_mut(&id) {
            c.key_epoch = epoch;
            c.key_since = Instant::now();
        }
    }

    /// Marks a connection established. Returns Err(reason) if it must be closed
    /// (a connection to ourselves, or the losing side of a duplicate).
    ///
    /// `capabilities`: the peer's Hello's `CAP_*` bits. An inbound connection
    /// over `--conn-limit` is refused ([`Refused::topology`] holds what to tell
    /// the peer before the Goodbye), unless the peer has no other connection
    /// (`CAP_LONELY`): see `meshnet_proto::slots`. `uid`: the peer's Hello's.
    pub fn establish(
        &self,
        id: u64,
        peer: PeerName,
        uid: u64,
        nickname: String,
        listen: SocketAddr,
        link: PeerLink,
        capabilities: u32,
    ) -> Result<(), Refused> {
        let mut guard = self.lock();
        let g = &mut *guard;
        if peer == self.settings.me {
            if uid == self.settings.uid {
                return Err(Refused::plain(crate::conn::SELF_CONNECTION));
            }
            // Our name and key (the handshake proved the key) in another
            // incarnation: a second host runs with a copy of this state directory.
            let why = format!(
                "{} at {}: a copy of this state directory on another host? on the copy run meshnet reset --force (a plain reset would hand this router's address ranges away), then launch",
                crate::conn::CLONED_IDENTITY,
                g.conns.get(&id).map_or_else(|| "?".into(), |c| c.remote.to_string())
            );
            log::warn!("{why}");
            return Err(Refused::plain(&why));
        }
        let Some(this) = g.conns.get(&id) else {
            return Err(Refused::plain("connection vanished"));
        };
        let this_dir = this.direction;
        let this_spliced = this.spliced_via.is_some();
        if g.replaced.was_replaced(peer, uid) && g.conns.values().any(|c| c.established && c.peer == Some(peer)) {
            let why = format!(
                "{}: {peer} at {} is an incarnation of it that another replaced, and that one is connected too: one host uses a copy of the other's state directory; on the copy run meshnet reset --force (a plain reset would hand the address ranges of {peer} away), then launch",
                crate::conn::SHARED_IDENTITY,
                this.remote
            );
            log::warn!("{why}");
            return Err(Refused::plain(&why));
        }
        // Accepted connections were not counted while they handshook (one that
        // replaces the peer's old connection takes that one's slot).
        if this_dir == Direction::Inbound {
            let replaces = g.conns.values().any(|c| c.established && c.peer == Some(peer));
            let held = held(g);
            let need = Need::from_capabilities(capabilities);
            match slots::admit_inbound(self.settings.conn_limit, &held, replaces, need, peer, &g.topology.graph()) {
                Admit::Accept => {}
                Admit::AcceptShedding { shed } => {
                    let why = format!("{} makes room for {peer}, which has too few connections", self.settings.me);
                    let to = g.conns.get(&shed).and_then(|c| c.peer).map(|p| p.to_string()).unwrap_or_default();
                    log::info!("--conn-limit: closing the connection to {to}: {why}");
                    if let Some(c) = g.conns.get(&shed) {
                        c.queue.offer(ControlMsg::Goodbye(why));
                    }
                    self.drop_conn_locked(g, shed, End::Duplicate);
                }
                Admit::Refuse => {
                    // A newcomer with fewer than two connections learns our
                    // topology, to dial others; the rest hear it from their neighbours.
                    let topology = match need {
                        Need::Enough => Vec::new(),
                        _ => split_gossip(g.topology.gossip_all_signed(), GOSSIP_CHUNK),
                    };
                    return Err(Refused { reason: format!("connection limit ({}) reached", self.settings.conn_limit), topology });
                }
            }
        }
        // One connection per pair of peers: keep the one dialled by the smaller name,
        // and a live one over a second dial of the same incarnation (a splice
        // is still replaced by a direct connection, as before).
        let existing: Vec<(u64, Direction, bool)> = g
            .conns
            .iter()
            .filter(|(cid, c)| **cid != id && c.established && c.peer == Some(peer))
            .map(|(cid, c)| (*cid, c.direction, c.peer_uid == uid && c.spliced_via.is_none() && !this_spliced))
            .collect();
        for (cid, dir, same_incarnation) in existing {
            match dialer::tie_break_incarnation(self.settings.me, peer, this_dir, dir, same_incarnation) {
                Keep::New => {
                    if let Some(old) = g.conns.get(&cid) {
                        old.queue.offer(ControlMsg::Goodbye(crate::conn::REPLACED.into()));
                        if old.peer_uid != uid {
                            g.replaced.note(peer, old.peer_uid);
                        }
                    }
                    self.drop_conn_locked(g, cid, End::Duplicate);
                }
                Keep::Old => return Err(Refused::plain(&format!("{} {peer}", crate::conn::ALREADY_CONNECTED))),
            }
        }
        let c = g.conns.get_mut(&id).expect("checked above");
        c.established = true;
        c.peer = Some(peer);
        c.nickname = nickname;
        c.listen = Some(listen);
        c.since = Instant::now();
        c.key_since = c.since;
        c.capabilities = capabilities;
        c.peer_uid = uid;
        self.dataplane.add_peer(link);
        log::info!(
            "connection to {peer} ({}) established, {}; waiting for UDP heartbeats both ways",
            c.remote,
            c.direction.as_str()
        );
        if !g.hints.is_empty() {
            g.hints.clear();
            g.discovery_stale = true;
        }
        let now = self.now_ms();
        let out = g.gossip.connected(id, peer, capabilities & CAP_GOSSIP_DIGEST != 0, now, &g.topology);
        self.perform(g, out);
        // A peer back within one route computation missed what changed meanwhile.
        g.ipam.ipam.neighbour_connected(peer);
        if let Some(h) = g.ipam6.as_mut() {
            h.ipam.neighbour_connected(peer);
        }
        self.ipam_flush(g);
        // DNS sets are checked with keys the topology pins: a set whose owner
        // is not pinned yet is refused and comes again with the DNS digests.
        crate::dns::connected(&self.dns, g, id);
        g.dialer.established(id, now);
        self.local_connections_changed(g);
        self.reachability_changed(g);
        Ok(())
    }

    /// Forgets a connection (closed, failed or refused). If the mesh dropped it
    /// already (a duplicate, lost UDP), that decision stands: `why` is only the
    /// connection's side of the story.
    pub fn unregister(&self, id: u64, why: &CloseReason) {
        let mut g = self.lock();
        let Some(c) = g.conns.get(&id) else { return };
        if c.established {
            log::info!(
                "connection to {} ({}) closed: {why}",
                c.peer.map(|p| p.to_string()).unwrap_or_default(),
                c.remote
            );
        }
        let end = if why.is_ourselves() {
            End::Ourselves
        } else if why.is_duplicate() {
            End::Duplicate
        } else if c.established {
            End::Failed(Failure::Closed(why.to_string()))
        } else {
            End::Failed(Failure::Handshake(why.to_string()))
        };
        self.drop_conn_locked(&mut g, id, end);
        drop(g);
        self.maker.notify_one();
    }

    /// Forgets connection `id`; the dialer learns how it ended (`end`) after it
    /// learnt which addresses are still connected.
    fn drop_conn_locked(&self, g: &mut Inner, id: u64, end: End) {
        let Some(c) = g.conns.remove(&id) else { return };
        if c.established {
            g.gossip.disconnected(id);
            self.dns.table().disconnected(id);
            if let Some(peer) = c.peer {
                let mut indexes = c.rekey_indexes.clone();
                indexes.push(c.recv_index);
                self.dataplane.remove_peer(peer, indexes);
            }
            self.local_connections_changed(g);
            if self.settings.discovery && established(g) == 0 {
                // Garbage collection is about to forget every other peer: keep
                // their addresses to dial (a full router's refusal told them).
                let me = self.settings.me;
                g.hints = g
                    .topology
                    .discovery_candidates()
                    .into_iter()
                    .filter(|(p, _)| *p != me)
                    .map(|(_, a)| a.to_string())
                    .collect();
                g.discovery_stale = true;
            }
            let removed = collect_garbage(g);
            if !removed.is_empty() {
                g.discovery_stale = true;
                log::info!("forgot unreachable peers: {}", names(&removed));
            }
            self.reachability_changed(g);
        }
        let now = self.now_ms();
        g.dialer.ended(id, now, random_u64(), end);
    }

    /// Recomputes our own entry from the established connections and gossips it.
    fn local_connections_changed(&self, g: &mut Inner) {
        let listening = g.conns.values().filter(|c| c.established).filter_map(|c| Some(c.listen?.to_string()));
        let listening: Vec<String> = listening.collect();
        let now = self.now_ms();
        g.dialer.set_connected(now, random_u64(), listening);
        let conns: Vec<ConnInfo> = g
            .conns
            .values()
            .filter(|c| c.established)
            .filter_map(|c| {
                Some(ConnInfo {
                    peer: c.peer?,
                    addr: c.listen?,
                    outbound: c.direction == Direction::Outbound,
                    established: c.udp_ok,
                })
            })
            .collect();
        if g.topology.set_local_connections(conns) {
            g.discovery_stale = true;
            let now = self.now_ms();
            let out = g.gossip.own_changed(now, &g.topology);
            self.perform(g, out);
        }
    }

    /// Follows the data plane's heartbeats: a connection carries data (and is
    /// gossiped as established) only while UDP works both ways.
    pub fn refresh_links(&self) {
        let links = self.dataplane.links();
        let mut g = self.lock();
        let mut changed = false;
        let mut lost = Vec::new();
        for (&id, c) in g.conns.iter_mut().filter(|(_, c)| c.established) {
            let Some(peer) = c.peer else { continue };
            let ok = links.get(&peer).is_some_and(|l| l.udp_ok);
            if c.udp_lost_at.is_some_and(|t| t.elapsed() >= UDP_LOST_CLOSE) {
                lost.push((id, peer));
            }
            if ok == c.udp_ok {
                continue;
            }
            c.udp_ok = ok;
            c.udp_lost_at = if ok { None } else { Some(Instant::now()) };
            changed = true;
            match links.get(&peer) {
                Some(l) if ok => log::info!(
                    "UDP to {peer} ({}) works both ways, path MTU {} bytes: carrying data",
                    l.addr,
                    l.path_mtu.unwrap_or(0)
                ),
                _ => log::warn!(
                    "UDP heartbeats with {peer} ({}) stopped working both ways: data goes around it",
                    c.remote.ip()
                ),
            }
        }
        for (id, peer) in lost {
            let why = format!("UDP heartbeats missed for {}s", UDP_LOST_CLOSE.as_secs());
            log::warn!("closing the connection to {peer}: {why}");
            if let Some(c) = g.conns.get(&id) {
                c.queue.offer(ControlMsg::Goodbye(why.clone()));
            }
            self.drop_conn_locked(&mut g, id, End::Failed(Failure::Closed(why)));
            changed = false; // dropping recomputed everything
        }
        if changed {
            self.local_connections_changed(&mut g);
            self.reachability_changed(&mut g);
        }
    }

    /// Counts gossiped entries dropped on connection `from` (the connection stays)
    /// and logs a summary at most every TRUST_LOG_EVERY.
    fn gossip_dropped(&self, g: &mut Inner, from: u64, dropped: &[(PeerName, &'static str)]) {
        for (_, why) in dropped {
            *g.trust.gossip_rejected.entry(why).or_default() += 1;
        }
        g.trust.unlogged += dropped.len() as u64;
        let now = Instant::now();
        if g.trust.last_gossip_log.is_some_and(|t| now.duration_since(t) < TRUST_LOG_EVERY) {
            return;
        }
        let via = g.conns.get(&from).and_then(|c| c.peer).map(|p| p.to_string()).unwrap_or_else(|| "?".into());
        let (name, why) = dropped[dropped.len() - 1];
        log::warn!(
            "dropped {} gossiped topology entries (latest: the entry for {name} relayed by {via}: {why}); counts in status --json, trust.gossip_rejected",
            g.trust.unlogged
        );
        g.trust.unlogged = 0;
        g.trust.last_gossip_log = Some(now);
    }

    /// Checks who the peer of a completed handshake is: its Hello's binding must
    /// name the claimed name, bind it to the key the handshake authenticated, and
    /// agree with the key book (a new name is pinned). Err: the Goodbye reason to
    /// send before closing; the refusal is logged (naming both peers) and counted.
    pub fn admit_identity(&self, hello: &Hello, remote_static: &[u8; 32], remote: SocketAddr) -> Result<(), String> {
        let mut guard = self.lock();
        let g = &mut *guard;
        let revoked = g.trust.revoked.get(&hello.name) == Some(&hello.binding.keys);
        let pinned_before = g.keys.get(hello.name).copied();
        let own = claims_our_name(self.settings.me, &self.settings.binding.keys, hello.name, &hello.binding.keys);
        let result = match own {
            Some(why) => Err(why),
            None => verify_peer(hello, remote_static)
                .and_then(|()| {
                    if revoked {
                        Err(meshnet_proto::trust::TrustError::Conflict {
                            name: hello.name,
                            pinned: "(removed by rmpeer)".into(),
                            offered: hello.binding.keys.fingerprint(),
                        })
                    } else {
                        g.keys.admit_preferring_derived(&hello.binding)
                    }
                })
                .map_err(|e| e.to_string()),
        };
        match result {
            Ok(Admission::Known) => Ok(()),
            Ok(Admission::Pinned) => {
                log::info!("pinned peer name {} to key {}", hello.name, hello.binding.keys.fingerprint());
                g.trust.keys_changed += 1;
                self.keys_saver.notify_one();
                if let Some(old) = pinned_before {
                    // A name derived from its key took the name back from a first-use
                    // claim: connections made under the old pin go.
                    log::warn!(
                        "peer {} proved its name with its key {}: dropping connections made under key {}",
                        hello.name,
                        hello.binding.keys.fingerprint(),
                        old.fingerprint()
                    );
                    let stale: Vec<u64> =
                        g.conns.iter().filter(|(_, c)| c.peer == Some(hello.name)).map(|(id, _)| *id).collect();
                    for id in stale {
                        let why = format!(
                            "{IDENTITY_REFUSED} {}: {} is bound to another key now",
                            self.settings.me, hello.name
                        );
                        if let Some(c) = g.conns.get(&id) {
                            c.queue.offer(ControlMsg::Goodbye(why.clone()));
                        }
                        self.drop_conn_locked(g, id, End::Failed(Failure::Closed(why)));
                    }
                    g.topology.forget(hello.name);
                }
                Ok(())
            }
            Err(e) => {
                let me = self.settings.me;
                g.trust.refused_identities += 1;
                g.trust.remember(Refusal {
                    by: "us".into(),
                    peer: hello.name.to_string(),
                    address: remote.to_string(),
                    reason: e.to_string(),
                    seconds_ago: 0,
                });
                if g.trust.should_log(hello.name) {
                    log::warn!(
                        "peer {me} refused the connection from {remote} claiming to be {} ({}): {e}",
                        hello.name,
                        hello.nickname
                    );
                }
                Err(format!("{IDENTITY_REFUSED} {me}: {} ({remote}): {e}", hello.name))
            }
        }
    }

    /// The peer at `remote` refused our identity (its Goodbye said so).
    pub fn refused_by_peer(&self, peer: PeerName, remote: SocketAddr, reason: &str) {
        let mut g = self.lock();
        g.trust.refused_by_peers += 1;
        g.trust.remember(Refusal {
            by: "peer".into(),
            peer: self.settings.me.to_string(),
            address: remote.to_string(),
            reason: reason.to_string(),
            seconds_ago: 0,
        });
        if g.trust.should_log(peer) {
            log::warn!("peer {peer} ({remote}) refused our identity {}: {reason}", self.settings.me);
        }
    }

    /// `peer` closed our connection after its IPAM found ours conflicting
    /// (`reason`, its goodbye): listed in `status ipam` as on its side. Only its
    /// own word about itself, on its authenticated connection.
    pub fn ipam_refused_by_peer(&self, peer: PeerName, reason: &str) {
        if let Some((v6, shown)) = ipam_refusal(peer, reason) {
            let mut g = self.lock();
            Self::host_of(&mut g, v6).peer_conflict(peer, shown);
        }
    }

    /// Peers named `nickname`: those in the topology, or else those garbage
    /// collection forgot since this router started (a dead peer, for `rmpeer`).
    pub fn peers_by_nickname(&self, nickname: &str) -> Vec<PeerName> {
        let g = self.lock();
        let known: Vec<PeerName> = g.topology.peers().filter(|p| p.nickname == nickname).map(|p| p.name).collect();
        if !known.is_empty() {
            return known;
        }
        let mut gone: Vec<PeerName> = g
            .gone_nicknames
            .iter()
            .filter(|(name, n)| n.as_str() == nickname && g.topology.get(**name).is_none())
            .map(|(name, _)| *name)
            .collect();
        gone.sort();
        gone
    }

    /// Tells both IPAM rings which peers are reachable in the topology now.
    /// `rmpeer` decides on this view (as [`Mesh::forget_identity`] does): the
    /// rings otherwise learn it only from the next, debounced, route
    /// computation, and refused a peer already gone from the topology.
    pub fn ipam_sees_topology(&self) {
        let mut g = self.lock();
        let live: Vec<PeerName> = g.topology.routes().into_keys().collect();
        g.ipam.ipam.peers_changed(&live);
        if let Some(h) = g.ipam6.as_mut() {
            h.ipam.peers_changed(&live);
        }
        self.ipam_flush(&mut g);
    }

    /// `rmpeer`: forgets the keys pinned for `name` and its topology entry, so a
    /// host reinstalled with a new key can use the name again; the removed keys
    /// are refused for it until the router restarts. Err if `name` is us or is
    /// reachable. Ok(Some(fingerprint)) if keys were pinned.
    pub fn forget_identity(&self, name: PeerName) -> Result<Option<String>, String> {
        if name == self.settings.me {
            return Err("this router's own identity cannot be removed".into());
        }
        let mut g = self.lock();
        if g.conns.values().any(|c| c.established && c.peer == Some(name)) || g.topology.routes().contains_key(&name) {
            return Err(format!("peer {name} is reachable: rmpeer is for peers that are gone"));
        }
        g.topology.forget(name);
        // Its DNS records go too; stale copies still gossiped are refused.
        if self.dns.table().remove_owner(name, crate::dns::unix_ms()) {
            log::info!("DNS: dropped the records of {name} (rmpeer)");
        }
        let Some(keys) = g.keys.remove(name) else { return Ok(None) };
        g.trust.revoked.insert(name, keys);
        g.trust.keys_changed += 1;
        drop(g);
        self.keys_saver.notify_one();
        log::info!("forgot the key {} pinned for peer {name} (rmpeer)", keys.fingerprint());
        Ok(Some(keys.fingerprint()))
    }

    /// Writes the key book if it changed since the last save: a snapshot is taken
    /// under the lock, the file is written outside it. True if it wrote.
    pub fn save_keys(&self) -> anyhow::Result<bool> {
        let (changed, book) = {
            let g = self.lock();
            if g.trust.keys_changed == g.trust.keys_saved {
                return Ok(false);
            }
            (g.trust.keys_changed, g.keys.clone())
        };
        self.state.save_keys(&book)?;
        let mut g = self.lock();
        g.trust.keys_saved = g.trust.keys_saved.max(changed);
        Ok(true)
    }

    pub fn trust_status(&self) -> TrustStatus {
        let g = self.lock();
        let now = Instant::now();
        TrustStatus {
            pinned_keys: g.keys.len(),
            refused_identities: g.trust.refused_identities,
            refused_by_peers: g.trust.refused_by_peers,
            recent_refusals: g
                .trust
                .recent
                .iter()
                .map(|(t, r)| Refusal { seconds_ago: now.duration_since(*t).as_secs(), ..r.clone() })
                .collect(),
            gossip_rejected: gossip_reasons()
                .map(|r| (r.to_string(), g.trust.gossip_rejected.get(r).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// Merges gossip received on connection `from` and passes on what was new.
    pub fn on_gossip(&self, from: u64, mut infos: Vec<SignedPeerInfo>) -> Result<(), String> {
        let mut guard = self.lock();
        let g = &mut *guard;
        let mut dropped: Vec<(PeerName, &'static str)> = Vec::new();
        if !g.trust.revoked.is_empty() {
            let revoked = &g.trust.revoked;
            infos.retain(|e| {
                let gone = revoked.get(&e.info.name) == Some(&e.seal.binding.keys);
                if gone {
                    dropped.push((e.info.name, GOSSIP_REVOKED));
                }
                !gone
            });
        }
        let report = match g.topology.merge_signed(infos, &mut g.keys) {
            Ok(r) => r,
            Err(e) => {
                *g.trust.gossip_rejected.entry(GOSSIP_OVERSIZE).or_default() += 1;
                return Err(format!("bad gossip: {e}"));
            }
        };
        dropped.extend(report.rejected.iter().map(|(n, why)| (*n, why.label())));
        if !dropped.is_empty() {
            self.gossip_dropped(g, from, &dropped);
        }
        if !report.pinned.is_empty() {
            g.trust.keys_changed += 1;
            self.keys_saver.notify_one();
        }
        let changed = report.changed;
        if !changed.is_empty() {
            g.discovery_stale = true;
            let out = g.gossip.relay(&changed, from, &g.topology, random_u64());
            self.perform(g, out);
            // Garbage collection and routes follow in route_loop, off this path.
            self.reachability_changed(g);
            drop(guard);
            self.maker.notify_one();
        }
        Ok(())
    }

    /// A neighbour's topology digest (anti-entropy): our summary if ours differs.
    pub fn on_gossip_digest(&self, from: u64, digest: Digest) {
        let mut guard = self.lock();
        let g = &mut *guard;
        let out = g.gossip.on_digest(from, digest, self.now_ms(), &g.topology);
        self.perform(g, out);
    }

    /// A neighbour's topology summary: what it lacks, and our summary if it
    /// holds what we lack.
    pub fn on_gossip_summary(&self, from: u64, summary: &[EntryVersion]) {
        let mut guard = self.lock();
        let g = &mut *guard;
        let out = g.gossip.on_summary(from, summary, self.now_ms(), &g.topology);
        self.perform(g, out);
    }

    /// Queues what the gossip schedule decided (see `meshnet_proto::gossip`).
    fn perform(&self, g: &mut Inner, out: Vec<gossip::Out>) {
        for o in out {
            let Some(c) = g.conns.get(&o.to) else { continue };
            let msgs = match o.send {
                gossip::Send::Entries(names) => split_gossip(g.topology.gossip_about_signed(&names), GOSSIP_CHUNK),
                gossip::Send::Everything => split_gossip(g.topology.gossip_all_signed(), GOSSIP_CHUNK),
                gossip::Send::Digest(d) => vec![ControlMsg::GossipDigest(d)],
                gossip::Send::Summary(s) => vec![ControlMsg::GossipSummary(s)],
            };
            for m in msgs {
                c.queue.offer(m);
            }
        }
    }

    /// The topology changed: [`route_loop`] recomputes routes and broadcast trees.
    fn reachability_changed(&self, _g: &mut Inner) {
        self.routes_due.notify_one();
    }

    /// Forgets peers no longer reachable, recomputes routes and broadcast trees
    /// for the data plane (on a blocking thread, without the lock), and tells
    /// IPAM which peers are reachable now.
    pub async fn recompute_routes(&self) {
        let (graph, mtus) = {
            let mut g = self.lock();
            // A peer's news may cut others off (a partition): forget who is no
            // longer reachable, or stale entries would keep coming back.
            let removed = collect_garbage(&mut g);
            if !removed.is_empty() {
                g.discovery_stale = true;
                log::info!("forgot unreachable peers: {}", names(&removed));
            }
            let mtus: Vec<(PeerName, u32)> = g
                .topology
                .peers()
                .filter(|p| p.mtu != 0 && p.mtu < self.settings.mtu)
                .map(|p| (p.name, p.mtu))
                .collect();
            (g.topology.graph(), mtus)
        };
        let started = Instant::now();
        let tables = match tokio::task::spawn_blocking(move || graph.tables()).await {
            Ok(t) => t,
            Err(e) => {
                log::error!("route computation failed: {e}");
                return;
            }
        };
        let took = started.elapsed();
        if took > Duration::from_millis(50) {
            log::info!(
                "routes and broadcast trees for {} peers took {} ms",
                tables.next_hop.len() + 1,
                took.as_millis()
            );
        }
        let mtu = mtus.into_iter().filter(|(p, _)| tables.next_hop.contains_key(p)).collect();
        let next_hop = tables.next_hop;
        self.dataplane.set_routes(Routes {
            next_hop: next_hop.clone(),
            children: tables.children,
            mtu,
            upstream: tables.upstream,
        });
        let mut g = self.lock();
        let live: Vec<PeerName> = next_hop.keys().copied().collect();
        // Traffic counters of peers gone for good (forgotten above, or by rmpeer).
        let known: HashSet<PeerName> = g.topology.peers().map(|p| p.name).collect();
        self.dataplane.traffic.retain(|p| known.contains(&p));
        g.next_hop = next_hop;
        g.route_runs += 1;
        g.route_last_ms = took.as_millis() as u64;
        g.ipam.ipam.peers_changed(&live);
        if let Some(h) = g.ipam6.as_mut() {
            h.ipam.peers_changed(&live);
        }
        self.ipam_flush(&mut g);
    }

    /// Installs the IPv6 ring (at launch, before anything runs).
    pub fn set_ipam6(&self, host: IpamHost) {
        self.lock().ipam6 = Some(host);
    }

    /// Persists both rings' state, sends what they want sent, logs their events.
    fn ipam_flush(&self, g: &mut Inner) {
        self.ipam_flush_one(g, false);
        if g.ipam6.is_some() {
            self.ipam_flush_one(g, true);
        }
    }

    fn host_of(g: &mut Inner, v6: bool) -> &mut IpamHost {
        match g.ipam6.as_mut() {
            Some(h) if v6 => h,
            _ => &mut g.ipam,
        }
    }

    /// [`Mesh::ipam_flush`] for one ring.
    fn ipam_flush_one(&self, g: &mut Inner, v6: bool) {
        let (out, events) = Self::host_of(g, v6).flush();
        if !out.is_empty() {
            for (dest, bytes) in out {
                match dest {
                    Dest::Neighbours => broadcast(g, None, &ControlMsg::Ipam(bytes)),
                    Dest::Peer(p) => {
                        let hop = g.next_hop.get(&p).copied().unwrap_or(p);
                        if let Some(c) = g.conns.values().find(|c| c.established && c.peer == Some(hop)) {
                            c.queue.offer(ControlMsg::Ipam(bytes));
                        }
                    }
                }
            }
        }
        for e in &events {
            crate::ipam::log_event(e);
        }
    }

    /// An IPAM message from the peer on connection `from`. Err: a conflict
    /// (different ranges or rings) that must close the connection.
    pub fn on_ipam(&self, from: PeerName, bytes: &[u8]) -> Result<(), String> {
        let mut g = self.lock();
        // An IPv6 ring's message goes to the IPv6 ring; without one, the IPv4
        // ring drops it and counts it as another version.
        let v6 = meshnet_proto::ipam::wire::is_v6_message(bytes) && g.ipam6.is_some();
        let inner = &mut *g;
        let host = match inner.ipam6.as_mut() {
            Some(h) if v6 => h,
            _ => &mut inner.ipam,
        };
        let now = host.now_ms();
        let pinned_before = inner.keys.len();
        let result = host.ipam.handle_message(from, bytes, now, &mut inner.keys);
        if g.keys.len() != pinned_before {
            // IPAM pinned the bindings of signers new to us: persist the book too.
            g.trust.keys_changed += 1;
            self.keys_saver.notify_one();
        }
        self.ipam_flush(&mut g);
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.is_conflict() => {
                Self::host_of(&mut g, v6).peer_conflict(from, e.to_string());
                Err(format!("{} {} and {from}: {e}", if v6 { IPAM6_CONFLICT } else { IPAM_CONFLICT }, self.settings.me))
            }
            Err(e) => {
                // Counted in `status ipam` (drops); logged at most once every 10 s.
                if Self::host_of(&mut g, v6).log_drop_due() {
                    match e {
                        meshnet_proto::ipam::IpamError::UnsupportedVersion(v) if v == meshnet_proto::ipam::wire::WIRE_VERSION_V6 => log::warn!(
                            "IPAM message of an IPv6 ring from {from} dropped: this router was launched without an IPv6 --ipalloc-range"
                        ),
                        meshnet_proto::ipam::IpamError::UnsupportedVersion(v) => log::warn!(
                            "IPAM message from {from} dropped: it speaks IPAM protocol version {v}, this router {} (upgrade both ends to the same release)",
                            meshnet_proto::ipam::wire::WIRE_VERSION
                        ),
                        e => log::warn!("IPAM message from {from} dropped: {e}"),
                    }
                }
                Ok(())
            }
        }
    }

    /// Runs IPAM's timers when due.
    pub fn ipam_tick(&self) {
        let mut g = self.lock();
        let mut due = false;
        let inner = &mut *g;
        for h in std::iter::once(&mut inner.ipam).chain(inner.ipam6.as_mut()) {
            if h.timer_due() {
                let now = h.now_ms();
                h.ipam.handle_timeout(now);
                due = true;
            }
        }
        if due {
            self.ipam_flush(&mut g);
        }
    }

    /// Runs `f` on IPAM (the IPv4 ring), then persists and sends what it changed.
    pub fn with_ipam<T>(&self, f: impl FnOnce(&mut IpamHost) -> T) -> T {
        let mut g = self.lock();
        let out = f(&mut g.ipam);
        self.ipam_flush(&mut g);
        out
    }

    /// Runs `f` on the ring of one family (`None`: no IPv6 ring), then persists
    /// and sends what it changed.
    pub fn with_ipam_for<T>(&self, v6: bool, f: impl FnOnce(&mut IpamHost) -> T) -> Option<T> {
        let mut g = self.lock();
        let out = if v6 { g.ipam6.as_mut().map(f) } else { Some(f(&mut g.ipam)) };
        self.ipam_flush(&mut g);
        out
    }

    /// Runs `f` on both rings (the IPv6 one if configured), then persists and
    /// sends what they changed.
    pub fn with_ipams<T>(&self, f: impl FnOnce(&mut IpamHost, Option<&mut IpamHost>) -> T) -> T {
        let mut g = self.lock();
        let inner = &mut *g;
        let out = f(&mut inner.ipam, inner.ipam6.as_mut());
        self.ipam_flush(&mut g);
        out
    }

    /// Runs the anti-entropy round when due (see `meshnet_proto::gossip`): a
    /// digest to about 2·log₂ n random neighbours. Call it often; it decides.
    pub fn gossip_tick(&self) {
        let mut guard = self.lock();
        let g = &mut *guard;
        let out = g.gossip.tick(self.now_ms(), random_u64(), &g.topology);
        self.perform(g, out);
    }

    /// The `CAP_*` bits that say how few connections we have (see
    /// `meshnet_proto::slots::Need`): a full router makes room for us.
    pub fn need_capabilities(&self) -> u32 {
        Need::capabilities(established(&self.lock()))
    }

    /// Over `--conn-limit` (a lonely newcomer was taken): closes one connection
    /// whose peer stays reachable without it (see `meshnet_proto::slots::excess`).
    pub fn shed_excess(&self) {
        let mut guard = self.lock();
        let g = &mut *guard;
        if established(g) <= self.settings.conn_limit {
            return;
        }
        let held = held(g);
        let Some(shed) = slots::excess(self.settings.conn_limit, &held, &g.topology.graph()) else { return };
        let why = format!("{} is over its connection limit ({})", self.settings.me, self.settings.conn_limit);
        if let Some(c) = g.conns.get(&shed) {
            log::info!("closing the connection to {}: {why}", c.peer.map(|p| p.to_string()).unwrap_or_default());
            c.queue.offer(ControlMsg::Goodbye(why));
        }
        self.drop_conn_locked(g, shed, End::Duplicate);
    }

    /// Counters for `status --json` (`control`).
    pub fn control_stats(&self) -> serde_json::Value {
        let splice = self.splices.stats();
        let g = self.lock();
        serde_json::json!({
            "route_recomputes": g.route_runs,
            "route_recompute_last_ms": g.route_last_ms,
            "discovery_dials_deferred": g.dialer.deferred,
            "gossip_rounds": g.gossip.stats.rounds,
            "gossip_digests_sent": g.gossip.stats.digests_sent,
            "gossip_digests_matched": g.gossip.stats.digests_matched,
            "gossip_summaries_sent": g.gossip.stats.summaries_sent,
            "gossip_summaries_answered": g.gossip.stats.summaries_answered,
            "gossip_summaries_limited": g.gossip.stats.limited,
            "splice": splice,
        })
    }

    pub fn peer_status(&self) -> Vec<PeerStatus> {
        let g = self.lock();
        let mut v: Vec<PeerStatus> = g
            .topology
            .peers()
            .map(|p| PeerStatus {
                name: p.name.to_string(),
                nickname: p.nickname.clone(),
                uid: p.uid,
                connections: p.connections.len(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn connection_status(&self) -> Vec<ConnectionStatus> {
        let links = self.dataplane.links();
        let g = self.lock();
        let routes = &g.next_hop;
        let nick = |p: PeerName| g.topology.get(p).map(|i| i.nickname.clone()).unwrap_or_default();
        let mut v: Vec<ConnectionStatus> = g
            .conns
            .iter()
            .map(|(id, c)| {
                let link = c.peer.and_then(|p| links.get(&p));
                let (data, data_reason) = if c.established { self.trusted.describe(*id) } else { (String::new(), None) };
                let (route, via) = match c.peer.map(|p| (p, routes.get(&p))) {
                    Some((p, Some(&hop))) if hop == p => ("direct", None),
                    Some((_, Some(&hop))) => ("relayed", Some(hop)),
                    Some((_, None)) if c.established => ("unreachable", None),
                    _ => ("", None),
                };
                let state = match (c.established, c.udp_ok) {
                    (false, _) => "connecting",
                    (true, false) => "pending",
                    (true, true) => "established",
                };
                let mut info = Vec::new();
                if c.established {
                    info.push(match &data_reason {
                        Some(why) => format!("{data} ({why})"),
                        None => data.clone(),
                    });
                    info.push(match via {
                        Some(h) => format!("relayed via {h}({})", nick(h)),
                        None => route.to_string(),
                    });
                    if let Some(v) = c.spliced_via {
                        info.push(format!("spliced through {v}({}): no TCP path either way (NAT, firewall or no route)", nick(v)));
                        if !c.udp_ok && c.since.elapsed() >= Duration::from_secs(10) {
                            let to = link.map(|l| l.addr.to_string()).unwrap_or_default();
                            info.push(match link.and_then(|l| l.heard_ms_ago) {
                                None => format!("no direct path: hole punching failed (no UDP heartbeat from {to}, where {v} sees it; no route to it, a firewall, or a NAT that maps each destination to another port?)"),
                                Some(_) => format!("no direct path: hole punching works one way only (to {to})"),
                            });
                        }
                    }
                    if !c.udp_ok {
                        info.push(match link.and_then(|l| l.heard_ms_ago) {
                            None => "no UDP heartbeat from it yet".into(),
                            Some(ms) => format!("UDP heartbeats not working both ways (last heard {:.1}s ago)", ms as f64 / 1000.0),
                        });
                    }
                    if let Some(mtu) = link.and_then(|l| l.path_mtu) {
                        info.push(format!("path MTU {mtu}"));
                    }
                    if let (true, Some(ms)) = (c.udp_ok, link.and_then(|l| l.heard_ms_ago)) {
                        info.push(format!("heartbeat {:.1}s ago", ms as f64 / 1000.0));
                    }
                    info.push(format!("key epoch {} age {}s", c.key_epoch, c.key_since.elapsed().as_secs()));
                    info.push(format!("up {}s", c.since.elapsed().as_secs()));
                } else {
                    info.push("handshake".into());
                }
                ConnectionStatus {
                    peer: c.peer.map(|p| p.to_string()),
                    nickname: c.nickname.clone(),
                    address: c.listen.unwrap_or(c.remote).to_string(),
                    direction: c.direction.as_str().into(),
                    state: state.into(),
                    info: info.join(", "),
                    route: route.into(),
                    via: via.map(|h| h.to_string()),
                    via_nickname: via.map(nick),
                    path_mtu: link.and_then(|l| l.path_mtu).map(|m| m as u32),
                    heartbeat_ms_ago: link.and_then(|l| l.heard_ms_ago),
                    udp_addr: link.map(|l| l.addr.to_string()),
                    key_epoch: c.established.then_some(c.key_epoch),
                    key_age_s: c.established.then(|| c.key_since.elapsed().as_secs()),
                    rtt_us: c.rtt_us.filter(|_| c.established),
                    data,
                    data_reason,
                }
            })
            .collect();
        for d in g.dialer.shown(self.now_ms()) {
            let retry = match d.retry_in_ms {
                Some(ms) => format!("retry in {}s", ms / 1000),
                None => "retry: never".into(),
            };
            v.push(ConnectionStatus {
                peer: None,
                nickname: String::new(),
                address: d.key.to_string(),
                direction: "outbound".into(),
                state: if d.dialling {
                    "connecting"
                } else if d.failures > 0 {
                    "retrying"
                } else {
                    "failed"
                }
                .into(),
                info: if d.dialling {
                    format!("dialling; last attempt: {}", d.error)
                } else {
                    format!("{}; {retry}", d.error)
                },
                ..Default::default()
            });
        }
        v.sort_by(|a, b| a.address.cmp(&b.address));
        v
    }

    /// Replaces or extends the connect targets and persists them (the file is
    /// written before the change is applied, off the mesh lock).
    pub fn set_targets(&self, add: &[PeerAddr], replace: bool) -> anyhow::Result<Vec<String>> {
        let _io = self.targets_io.lock().unwrap_or_else(|p| p.into_inner());
        let before = self.lock().targets.clone();
        let mut next = if replace { BTreeSet::new() } else { before.clone() };
        next.extend(add.iter().map(|p| p.to_string()));
        let list: Vec<String> = next.iter().cloned().collect();
        self.state.save_targets(&list)?;
        self.note_forgotten(before.difference(&next).cloned().collect(), &next);
        let mut g = self.lock();
        g.targets = next;
        g.dialer.set_targets(list.iter().cloned());
        for t in add {
            g.dialer.retry_now(&t.to_string());
        }
        drop(g);
        self.maker.notify_one();
        Ok(list)
    }

    pub fn forget_targets(&self, gone: &[PeerAddr]) -> anyhow::Result<Vec<String>> {
        let _io = self.targets_io.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.lock().targets.clone();
        let unknown: Vec<String> = gone.iter().map(|p| p.to_string()).filter(|p| !next.contains(p)).collect();
        if !unknown.is_empty() {
            anyhow::bail!(
                "not a connect target: {} (targets: {})",
                unknown.join(", "),
                next.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        for p in gone {
            next.remove(&p.to_string());
        }
        let list: Vec<String> = next.iter().cloned().collect();
        self.state.save_targets(&list)?;
        self.note_forgotten(gone.iter().map(|p| p.to_string()).collect(), &next);
        let mut g = self.lock();
        g.targets = next;
        g.dialer.set_targets(list.iter().cloned());
        Ok(list)
    }

    pub fn targets(&self) -> Vec<String> {
        self.lock().targets.iter().cloned().collect()
    }

    /// Keeps the list of targets removed since the last `meshnet stop` (see
    /// `StateDir::load_forgotten`): `removed` join it, the targets now in
    /// force leave it.
    fn note_forgotten(&self, removed: Vec<String>, now: &BTreeSet<String>) {
        let mut forgotten = self.state.load_forgotten();
        forgotten.extend(removed);
        forgotten.retain(|t| !now.contains(t));
        forgotten.sort();
        forgotten.dedup();
        if let Err(e) = self.state.save_forgotten(&forgotten) {
            log::warn!("recording the forgotten targets: {e:#} (a restart naming them adds them again)");
        }
    }

    /// What the connection maker should dial now (see `meshnet_proto::dialer`):
    /// connect targets when due, and addresses learnt from gossip (discovery)
    /// within the dial budget, while `--conn-limit` has slots for our dials.
    pub fn due_dials(&self) -> Vec<Dial> {
        let mut guard = self.lock();
        let g = &mut *guard;
        let recent = g.discovery_at.is_some_and(|t| t.elapsed() < DISCOVERY_EVERY);
        if self.settings.discovery && g.discovery_stale && !recent {
            // Recomputed only after the topology changed, and not more often
            // than DISCOVERY_EVERY (the maker loop comes back within 200 ms).
            let connected: HashSet<PeerName> = g.conns.values().filter_map(|c| c.peer).collect();
            let mut list = slots::discovery_addresses(&g.topology, &connected, established(g), self.settings.conn_limit);
            list.extend(g.hints.iter().cloned());
            // Addresses of a family our sockets cannot reach are never dialled.
            list.retain(|a| a.parse::<std::net::SocketAddr>().map_or(true, |a| self.settings.reaches(&a)));
            g.dialer.set_candidates(list);
            g.discovery_stale = false;
            g.discovery_at = Some(Instant::now());
        }
        // Accepted connections still handshaking never hold our dials back.
        let now = self.now_ms();
        // A due connect target that is a peer of our mesh already at our limit
        // would refuse us: not dialled for a while unless we need connections
        // (without this, routers below their limit redial a full seed forever).
        if established(g) >= 2 {
            let due: Vec<String> = g.dialer.due_targets(now).map(str::to_string).collect();
            if !due.is_empty() {
                let full = slots::full_addresses(&g.topology, established(g), self.settings.conn_limit);
                for t in due.iter().filter(|t| full.contains(*t)) {
                    g.dialer.hold(t, now, now + dialer::SATISFIED_MS);
                }
            }
        }
        // Only when no slot is free: is a due connect target outside our mesh?
        let used = slots_used(g);
        let outside = used >= self.settings.conn_limit && g.dialer.due_targets(now).next().is_some() && {
            let known: HashSet<String> =
                g.topology.peers().flat_map(|p| p.connections.iter().map(|c| c.addr.to_string())).collect();
            g.dialer.due_targets(now).any(|t| !known.contains(t))
        };
        let free = slots::dial_slots(self.settings.conn_limit, used, outside);
        g.dialer.poll(now, random_u64(), free).dials
    }

    /// Dial `dial` opened connection `conn` (handshaking now).
    pub fn dial_registered(&self, dial: DialId, conn: u64) {
        self.lock().dialer.registered(dial, conn);
    }

    /// Dial `dial` failed before it had a connection. (What becomes of a
    /// connection is learnt in [`establish`](Self::establish) and
    /// [`unregister`](Self::unregister).)
    pub fn dial_failed(&self, dial: DialId, why: Failure) {
        let now = self.now_ms();
        self.lock().dialer.failed(dial, now, random_u64(), why);
    }
}

/// Established connections.
fn established(g: &Inner) -> usize {
    g.conns.values().filter(|c| c.established).count()
}

/// Established connections as `meshnet_proto::slots` judges them.
fn held(g: &Inner) -> Vec<Held> {
    g.conns
        .iter()
        .filter(|(_, c)| c.established)
        .filter_map(|(&conn, c)| {
            let peer = c.peer?;
            let target = c.direction == Direction::Outbound && g.targets.contains(&c.remote.to_string());
            Some(Held {
                conn,
                peer,
                discovered: c.direction == Direction::Outbound && !target,
                target,
                peer_connections: g.topology.get(peer).map_or(0, |p| p.connections.len()),
            })
        })
        .collect()
}

/// `--conn-limit` slots in use: established connections and our own dials.
fn slots_used(g: &Inner) -> usize {
    g.conns.values().filter(|c| c.established || c.direction == Direction::Outbound).count()
}


/// Recomputes routes whenever the topology changed, at most every
/// [`ROUTES_DEBOUNCE`]: a burst of changes is coalesced into one run.
pub async fn route_loop(mesh: Arc<Mesh>) {
    let mut last: Option<Instant> = None;
    loop {
        mesh.routes_due.notified().await;
        if let Some(wait) = last.map(|t| ROUTES_DEBOUNCE.saturating_sub(t.elapsed())) {
            tokio::time::sleep(wait).await;
        }
        last = Some(Instant::now());
        mesh.recompute_routes().await;
    }
}

fn broadcast(g: &mut Inner, except: Option<u64>, msg: &ControlMsg) {
    for (id, c) in g.conns.iter() {
        if Some(*id) != except && c.established {
            c.queue.offer(msg.clone());
        }
    }
}

pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("system randomness");
    u32::from_le_bytes(b)
}

pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("system randomness");
    u64::from_le_bytes(b)
}

/// Forgets the peers no longer reachable ([`Topology::garbage_collect`]),
/// keeping their nicknames for `rmpeer`. Returns the forgotten peers.
fn collect_garbage(g: &mut Inner) -> Vec<PeerName> {
    let nicknames: Vec<(PeerName, String)> = g.topology.peers().map(|p| (p.name, p.nickname.clone())).collect();
    let removed = g.topology.garbage_collect();
    for (name, nickname) in nicknames.into_iter().filter(|(n, _)| removed.contains(n)) {
        if g.gone_nicknames.len() >= GONE_NICKNAMES && !g.gone_nicknames.contains_key(&name) {
            if let Some(any) = g.gone_nicknames.keys().next().copied() {
                g.gone_nicknames.remove(&any);
            }
        }
        g.gone_nicknames.insert(name, nickname);
    }
    removed
}

/// Whether `peer`'s goodbye `reason` refused us for an IPAM conflict: of its
/// IPv6 ring or not, and the line `status ipam` shows (one line, bounded).
fn ipam_refusal(peer: PeerName, reason: &str) -> Option<(bool, String)> {
    let v6 = reason.starts_with(IPAM6_CONFLICT);
    if !v6 && !reason.starts_with(IPAM_CONFLICT) {
        return None;
    }
    let reason: String = reason.chars().take(400).map(|c| if c.is_control() { ' ' } else { c }).collect();
    Some((v6, format!("refused by {peer}: {reason}")))
}

fn names(v: &[PeerName]) -> String {
    v.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_with_our_own_name_is_told_so_not_told_to_rmpeer_it() {
        let me = PeerName(0x0200_0000_0005);
        let ours = PeerKeys { static_key: [1; 32], signing_key: [2; 32] };
        let theirs = PeerKeys { static_key: [3; 32], signing_key: [4; 32] };
        let why = claims_our_name(me, &ours, me, &theirs).expect("a duplicate name is refused");
        assert!(why.contains("02:00:00:00:00:05 is this router's own name") && why.contains("same --name"), "{why}");
        assert!(!why.contains("rmpeer"), "{why}");
        // Ourselves (a connection to our own address) and other names are the key book's.
        assert_eq!(claims_our_name(me, &ours, me, &ours), None);
        assert_eq!(claims_our_name(me, &ours, PeerName(0x0200_0000_0006), &theirs), None);
    }

    #[test]
    fn a_goodbye_for_an_ipam_conflict_is_listed_as_a_refusal() {
        let peer = PeerName(0x0200_0000_0009);
        let (v6, shown) = ipam_refusal(peer, &format!("{IPAM_CONFLICT} a and b: uses 10.40.0.0/16")).expect("an IPAM refusal");
        assert!(!v6);
        assert_eq!(shown, "refused by 02:00:00:00:00:09: IPAM conflict between peers a and b: uses 10.40.0.0/16");
        let (v6, _) = ipam_refusal(peer, &format!("{IPAM6_CONFLICT} a and b: rings differ")).expect("an IPv6 refusal");
        assert!(v6);
        // Other goodbyes are not; a peer's text is one bounded line.
        assert_eq!(ipam_refusal(peer, "router stopping"), None);
        assert_eq!(ipam_refusal(peer, &format!("x {IPAM_CONFLICT}")), None);
        let (_, shown) = ipam_refusal(peer, &format!("{IPAM_CONFLICT}\n\x1b[2J{}", "y".repeat(100_000))).unwrap();
        assert!(!shown.chars().any(char::is_control) && shown.len() < 500, "{}", shown.len());
    }
}
