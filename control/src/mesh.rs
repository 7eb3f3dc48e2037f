//! Shared router state: topology, connections, connect targets, and gossip.
//!
//! Tasks hold the lock only for short, non-async sections. Messages to a
//! connection go through its queue; the connection's own task encrypts and writes.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meshnet_proto::topology::{ConnInfo, PeerInfo, Topology};
use meshnet_proto::wire::control::ControlMsg;
use meshnet_proto::PeerName;
use meshnet_router::dataplane::{DataPlane, PeerLink, Routes};
use tokio::sync::{mpsc, Notify};

use crate::api::{ConnectionStatus, PeerStatus};
use crate::ipam::IpamHost;
use meshnet_proto::ipam::{Dest, Event};
use crate::peeraddr::PeerAddr;
use crate::state::StateDir;

/// First retry delay of the connection maker; grows ×1.5 with jitter up to the cap.
pub const BACKOFF_START: Duration = Duration::from_secs(2);
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// A connection whose UDP worked and then stopped for this long is closed (and
/// dialled again by whoever holds the target): the peer may have moved.
pub const UDP_LOST_CLOSE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

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
    pub queue: mpsc::UnboundedSender<ControlMsg>,
    pub since: Instant,
}

/// What the connection maker knows about one address it dials.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub failures: u32,
    pub next_try: Instant,
    pub last_error: String,
    /// The live connection made by dialling it, if any.
    pub conn: Option<u64>,
}

impl Attempt {
    fn new() -> Self {
        Attempt { failures: 0, next_try: Instant::now(), last_error: String::new(), conn: None }
    }
}

pub struct Inner {
    pub topology: Topology,
    pub conns: HashMap<u64, Conn>,
    next_conn: u64,
    /// Persisted connect targets, normalised `host:port`.
    pub targets: BTreeSet<String>,
    /// Dial state per target string, and per discovered address (as `ip:port`).
    pub attempts: HashMap<String, Attempt>,
    pub ipam: IpamHost,
    /// Names pinned to keys: every signed record (IPAM here) is checked against it.
    pub keys: meshnet_proto::trust::KeyBook,
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
}

pub struct Mesh {
    pub settings: Settings,
    pub state: StateDir,
    pub dataplane: DataPlane,
    inner: Mutex<Inner>,
    /// Wakes the connection maker (new targets, lost connections).
    pub maker: Notify,
    /// Fired once to stop the router.
    pub shutdown: tokio::sync::watch::Sender<Option<Shutdown>>,
}

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
        Arc::new(Mesh {
            settings,
            state,
            dataplane,
            inner: Mutex::new(Inner {
                topology: Topology::new(me),
                conns: HashMap::new(),
                next_conn: 1,
                targets: targets.into_iter().collect(),
                attempts: HashMap::new(),
                ipam,
                keys: meshnet_proto::trust::KeyBook::new(),
            }),
            maker: Notify::new(),
            shutdown,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Registers a connection that is starting its handshake. None when over the limit.
    pub fn register(
        &self,
        direction: Direction,
        remote: SocketAddr,
        queue: mpsc::UnboundedSender<ControlMsg>,
        recv_index: u32,
    ) -> Option<u64> {
        let mut g = self.lock();
        if g.conns.len() >= self.settings.conn_limit {
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
                queue,
                since: Instant::now(),
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
            if i != 0 && !g.conns.values().any(|c| c.recv_index == i) {
                return i;
            }
        }
    }

    /// Marks a connection established. Returns Err(reason) if it must be closed
    /// (a connection to ourselves, or the losing side of a duplicate).
    pub fn establish(
        &self,
        id: u64,
        peer: PeerName,
        nickname: String,
        listen: SocketAddr,
        link: PeerLink,
    ) -> Result<(), String> {
        let mut g = self.lock();
        if peer == self.settings.me {
            return Err(crate::conn::SELF_CONNECTION.into());
        }
        let Some(this) = g.conns.get(&id) else {
            return Err("connection vanished".into());
        };
        let this_dir = this.direction;
        // One connection per pair of peers: keep the one dialled by the smaller name.
        let preferred_dir = if self.settings.me < peer { Direction::Outbound } else { Direction::Inbound };
        let existing: Vec<(u64, Direction)> = g
            .conns
            .iter()
            .filter(|(cid, c)| **cid != id && c.established && c.peer == Some(peer))
            .map(|(cid, c)| (*cid, c.direction))
            .collect();
        for (cid, dir) in existing {
            if dir == this_dir || this_dir == preferred_dir {
                // Same direction: the old one is stale (the peer restarted). Or ours is preferred.
                if let Some(old) = g.conns.get(&cid) {
                    let _ = old.queue.send(ControlMsg::Goodbye(crate::conn::REPLACED.into()));
                }
                self.drop_conn_locked(&mut g, cid);
            } else {
                return Err(format!("{} {peer}", crate::conn::ALREADY_CONNECTED));
            }
        }
        let c = g.conns.get_mut(&id).expect("checked above");
        c.established = true;
        c.peer = Some(peer);
        c.nickname = nickname;
        c.listen = Some(listen);
        c.since = Instant::now();
        self.dataplane.add_peer(link);
        log::info!(
            "connection to {peer} ({}) established, {}; waiting for UDP heartbeats both ways",
            c.remote,
            c.direction.as_str()
        );
        let full = g.topology.gossip_all();
        if let Some(c) = g.conns.get(&id) {
            let _ = c.queue.send(ControlMsg::Gossip(full));
        }
        self.local_connections_changed(&mut g);
        self.reachability_changed(&mut g);
        Ok(())
    }

    /// Forgets a connection (closed, failed or refused).
    pub fn unregister(&self, id: u64, why: &str) {
        let mut g = self.lock();
        if let Some(c) = g.conns.get(&id) {
            if c.established {
                log::info!(
                    "connection to {} ({}) closed: {why}",
                    c.peer.map(|p| p.to_string()).unwrap_or_default(),
                    c.remote
                );
            }
        }
        self.drop_conn_locked(&mut g, id);
        drop(g);
        self.maker.notify_one();
    }

    fn drop_conn_locked(&self, g: &mut Inner, id: u64) {
        let Some(c) = g.conns.remove(&id) else { return };
        for a in g.attempts.values_mut() {
            if a.conn == Some(id) {
                a.conn = None;
            }
        }
        if c.established {
            if let Some(peer) = c.peer {
                self.dataplane.remove_peer(peer, c.recv_index);
            }
            self.local_connections_changed(g);
            let removed = g.topology.garbage_collect();
            if !removed.is_empty() {
                log::info!("forgot unreachable peers: {}", names(&removed));
            }
            self.reachability_changed(g);
        }
    }

    /// Recomputes our own entry from the established connections and gossips it.
    fn local_connections_changed(&self, g: &mut Inner) {
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
            let update = g.topology.gossip_about(&[self.settings.me]);
            broadcast(g, None, &ControlMsg::Gossip(update));
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
                let _ = c.queue.send(ControlMsg::Goodbye(why));
            }
            self.drop_conn_locked(&mut g, id);
            changed = false; // dropping recomputed everything
        }
        if changed {
            self.local_connections_changed(&mut g);
            self.reachability_changed(&mut g);
        }
    }

    /// Merges gossip received on connection `from` and passes on what was new.
    pub fn on_gossip(&self, from: u64, infos: Vec<PeerInfo>) -> Result<(), String> {
        let mut g = self.lock();
        let changed = g.topology.merge(infos).map_err(|e| format!("bad gossip: {e}"))?;
        if !changed.is_empty() {
            // A peer's news may cut others off (a partition): forget who is no
            // longer reachable, or stale entries would keep coming back.
            let removed = g.topology.garbage_collect();
            if !removed.is_empty() {
                log::info!("forgot unreachable peers: {}", names(&removed));
            }
            let update = g.topology.gossip_about(&changed);
            broadcast(&mut g, Some(from), &ControlMsg::Gossip(update));
            self.reachability_changed(&mut g);
            drop(g);
            self.maker.notify_one();
        }
        Ok(())
    }

    /// Recomputes routes and broadcast trees for the data plane, and tells IPAM
    /// which peers are reachable now.
    fn reachability_changed(&self, g: &mut Inner) {
        let next_hop = g.topology.routes();
        let live: Vec<PeerName> = next_hop.keys().copied().collect();
        let mtu = g
            .topology
            .peers()
            .filter(|p| p.mtu != 0 && p.mtu < self.settings.mtu && next_hop.contains_key(&p.name))
            .map(|p| (p.name, p.mtu))
            .collect();
        self.dataplane.set_routes(Routes { next_hop, children: g.topology.broadcast_children(), mtu });
        g.ipam.ipam.peers_changed(&live);
        self.ipam_flush(g);
    }

    /// Persists IPAM's state, sends what it wants sent, logs its events.
    fn ipam_flush(&self, g: &mut Inner) {
        let (out, events) = g.ipam.flush();
        if !out.is_empty() {
            let routes = g.topology.routes();
            for (dest, bytes) in out {
                match dest {
                    Dest::Neighbours => broadcast(g, None, &ControlMsg::Ipam(bytes)),
                    Dest::Peer(p) => {
                        let hop = routes.get(&p).copied().unwrap_or(p);
                        if let Some(c) = g.conns.values().find(|c| c.established && c.peer == Some(hop)) {
                            let _ = c.queue.send(ControlMsg::Ipam(bytes));
                        }
                    }
                }
            }
        }
        for e in events {
            match e {
                Event::Allocated { target, .. } if target == crate::ipam::PRIME_KEY => {
                    g.ipam.ipam.free_target(&target);
                    let _ = g.ipam.flush();
                    log::info!("IPAM: primed");
                }
                Event::Allocated { target, ip, prefix } => log::info!("IPAM: {ip}/{prefix} allocated to {target}"),
                Event::Failed { target, error, .. } => log::warn!("IPAM: allocation for {target} failed: {error}"),
                Event::Agreed { seeds } => {
                    log::info!("IPAM: ring agreed, initial owners {}", names(&seeds));
                    g.ipam.claim_deferred();
                    let _ = g.ipam.flush();
                }
                other => log::info!("IPAM: {other:?}"),
            }
        }
    }

    /// An IPAM message from the peer on connection `from`. Err: a conflict
    /// (different ranges or rings) that must close the connection.
    pub fn on_ipam(&self, from: PeerName, bytes: &[u8]) -> Result<(), String> {
        let mut g = self.lock();
        let now = g.ipam.now_ms();
        let inner = &mut *g;
        let result = inner.ipam.ipam.handle_message(from, bytes, now, &mut inner.keys);
        self.ipam_flush(&mut g);
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.is_conflict() => Err(format!("IPAM conflict between peers {} and {from}: {e}", self.settings.me)),
            Err(e) => {
                // Counted in `status ipam` (drops); logged at most once every 10 s.
                if g.ipam.log_drop_due() {
                    match e {
                        meshnet_proto::ipam::IpamError::UnsupportedVersion(v) => log::warn!(
                            "IPAM message from {from} dropped: it speaks IPAM protocol version {v}, this router {}                              (upgrade both ends to the same release)",
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
        if g.ipam.timer_due() {
            let now = g.ipam.now_ms();
            g.ipam.ipam.handle_timeout(now);
            self.ipam_flush(&mut g);
        }
    }

    /// Runs `f` on IPAM, then persists and sends what it changed.
    pub fn with_ipam<T>(&self, f: impl FnOnce(&mut IpamHost) -> T) -> T {
        let mut g = self.lock();
        let out = f(&mut g.ipam);
        self.ipam_flush(&mut g);
        out
    }

    /// Sends our full view to every neighbour (anti-entropy).
    pub fn gossip_everything(&self) {
        let mut g = self.lock();
        let all = g.topology.gossip_all();
        broadcast(&mut g, None, &ControlMsg::Gossip(all));
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
        let routes = g.topology.routes();
        let nick = |p: PeerName| g.topology.get(p).map(|i| i.nickname.clone()).unwrap_or_default();
        let mut v: Vec<ConnectionStatus> = g
            .conns
            .values()
            .map(|c| {
                let link = c.peer.and_then(|p| links.get(&p));
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
                    info.push("encrypted".to_string());
                    info.push(match via {
                        Some(h) => format!("relayed via {h}({})", nick(h)),
                        None => route.to_string(),
                    });
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
                }
            })
            .collect();
        let now = Instant::now();
        for (addr, a) in &g.attempts {
            if a.conn.is_some() || a.last_error.is_empty() {
                continue;
            }
            let wait = a.next_try.saturating_duration_since(now).as_secs();
            v.push(ConnectionStatus {
                peer: None,
                nickname: String::new(),
                address: addr.clone(),
                direction: "outbound".into(),
                // A dial under way holds its target far in the future.
                state: if wait > BACKOFF_CAP.as_secs() {
                    "connecting"
                } else if a.failures > 0 {
                    "retrying"
                } else {
                    "failed"
                }
                .into(),
                info: if wait > BACKOFF_CAP.as_secs() {
                    format!("dialling; last attempt: {}", a.last_error)
                } else {
                    format!("{}; retry in {wait}s", a.last_error)
                },
                ..Default::default()
            });
        }
        v.sort_by(|a, b| a.address.cmp(&b.address));
        v
    }

    /// Replaces or extends the connect targets and persists them.
    pub fn set_targets(&self, add: &[PeerAddr], replace: bool) -> anyhow::Result<Vec<String>> {
        let mut g = self.lock();
        let mut next = if replace { BTreeSet::new() } else { g.targets.clone() };
        next.extend(add.iter().map(|p| p.to_string()));
        let list: Vec<String> = next.iter().cloned().collect();
        self.state.save_targets(&list)?;
        g.targets = next;
        g.attempts.retain(|k, a| a.conn.is_some() || list.contains(k) || k.parse::<SocketAddr>().is_ok());
        for t in add {
            if let Some(a) = g.attempts.get_mut(&t.to_string()) {
                a.next_try = Instant::now();
            }
        }
        drop(g);
        self.maker.notify_one();
        Ok(list)
    }

    pub fn forget_targets(&self, gone: &[PeerAddr]) -> anyhow::Result<Vec<String>> {
        let mut g = self.lock();
        let unknown: Vec<String> =
            gone.iter().map(|p| p.to_string()).filter(|p| !g.targets.contains(p)).collect();
        if !unknown.is_empty() {
            anyhow::bail!(
                "not a connect target: {} (targets: {})",
                unknown.join(", "),
                g.targets.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        let mut next = g.targets.clone();
        for p in gone {
            next.remove(&p.to_string());
        }
        let list: Vec<String> = next.iter().cloned().collect();
        self.state.save_targets(&list)?;
        g.targets = next;
        for p in gone {
            g.attempts.remove(&p.to_string());
        }
        Ok(list)
    }

    pub fn targets(&self) -> Vec<String> {
        self.lock().targets.iter().cloned().collect()
    }

    /// What the connection maker should dial now: (key, address-or-host, is_target).
    pub fn due_dials(&self) -> Vec<String> {
        let mut g = self.lock();
        let now = Instant::now();
        let connected: Vec<PeerName> = g.conns.values().filter_map(|c| c.peer).collect();
        let listening: Vec<SocketAddr> = g.conns.values().filter_map(|c| c.listen).collect();
        let mut keys: Vec<String> = g.targets.iter().cloned().collect();
        if self.settings.discovery {
            for (peer, addr) in g.topology.discovery_candidates() {
                if peer != self.settings.me && !connected.contains(&peer) {
                    keys.push(addr.to_string());
                }
            }
        }
        // Forget dial state for addresses that are neither targets nor candidates
        // any more (a discovered peer that went away).
        g.attempts.retain(|k, a| a.conn.is_some() || keys.contains(k));
        if g.conns.len() >= self.settings.conn_limit {
            return Vec::new();
        }
        let mut due = Vec::new();
        for key in keys {
            // A target we are already connected to (e.g. it dialled us first) needs no dial.
            if let Ok(sa) = key.parse::<SocketAddr>() {
                if listening.contains(&sa) {
                    continue;
                }
            }
            let a = g.attempts.entry(key.clone()).or_insert_with(Attempt::new);
            if a.conn.is_none() && a.next_try <= now {
                // Hold it while the dial is under way.
                a.next_try = now + Duration::from_secs(3600);
                due.push(key);
            }
        }
        due
    }

    /// Records the outcome of dialling `key`.
    pub fn dial_result(&self, key: &str, result: Result<u64, String>) {
        let mut g = self.lock();
        let a = g.attempts.entry(key.to_string()).or_insert_with(Attempt::new);
        match result {
            Ok(id) => {
                a.conn = Some(id);
                a.failures = 0;
                a.last_error.clear();
            }
            Err(e) => {
                a.conn = None;
                a.failures += 1;
                a.last_error = e;
                a.next_try = Instant::now() + backoff(a.failures);
            }
        }
    }

    /// Dialling `key` reached a peer we are already connected to (or ourselves):
    /// nothing failed, and there is nothing to show; look again much later.
    pub fn dial_satisfied(&self, key: &str) {
        let mut g = self.lock();
        if let Some(a) = g.attempts.get_mut(key) {
            a.conn = None;
            a.failures = 0;
            a.last_error.clear();
            a.next_try = Instant::now() + BACKOFF_CAP;
        }
    }

    /// After an established connection made by dialling `key` ends, retry soon.
    pub fn dial_closed(&self, key: &str, why: &str, lasted: Duration) {
        let mut g = self.lock();
        if let Some(a) = g.attempts.get_mut(key) {
            a.conn = None;
            if lasted > Duration::from_secs(30) {
                a.failures = 0;
            }
            a.failures += 1;
            a.last_error = why.to_string();
            a.next_try = Instant::now() + backoff(a.failures);
        }
    }
}

fn broadcast(g: &mut Inner, except: Option<u64>, msg: &ControlMsg) {
    for (id, c) in g.conns.iter() {
        if Some(*id) != except && c.established {
            let _ = c.queue.send(msg.clone());
        }
    }
}

/// Delay before attempt number `failures + 1`: 2 s × 1.5^(n-1), ±25 % jitter, capped.
pub fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_START.as_secs_f64() * 1.5f64.powi(failures.saturating_sub(1).min(30) as i32);
    let capped = base.min(BACKOFF_CAP.as_secs_f64());
    let jitter = 0.75 + (random_u32() as f64 / u32::MAX as f64) * 0.5;
    Duration::from_secs_f64(capped * jitter)
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

fn names(v: &[PeerName]) -> String {
    v.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let first = backoff(1);
        assert!(first >= Duration::from_millis(1500) && first <= Duration::from_millis(2500));
        let third = backoff(3);
        assert!(third >= Duration::from_secs_f64(4.5 * 0.75) && third <= Duration::from_secs_f64(4.5 * 1.25));
        for n in [20, 100, u32::MAX] {
            assert!(backoff(n) <= BACKOFF_CAP.mul_f64(1.25));
        }
    }
}
