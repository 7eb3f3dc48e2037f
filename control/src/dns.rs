//! meshnet DNS on a router: this router's own records (persisted in `dns.json`),
//! the gossip of the table (`ControlMsg::Dns`), and the DNS server on port 53.
//!
//! Owns: [`Dns`] (the table of `meshnet_proto::dns`, our records' file, the
//! server's counters), [`register`] / [`unregister`] (the one way records of a
//! target change: `dns-add`, `dns-remove`, `attach` and `detach` of Docker
//! containers, the death of a container), the gossip driver ([`connected`],
//! [`on_message`], [`digest_loop`]) and the server ([`serve`]).
//!
//! Never does: decide what a query gets or whether a set is believed
//! (`meshnet_proto::dns` does), or encode DNS messages by hand (hickory-proto).
//!
//! # The server
//! UDP and TCP on `--dns-listen-address`, or else on port 53 of the first
//! address `meshnet expose` gave the bridge: it starts listening when an
//! address is exposed, moves when that address changes and stops when it is
//! hidden (checked every second). Names in `--dns-domain` are answered from the
//! table (A, PTR; other types an empty NOERROR for a name that exists;
//! NXDOMAIN for one that does not). Other names, and reverse lookups of
//! addresses not in the table, go to the nameservers of the host's
//! `/etc/resolv.conf` (our own listen address left out); no answer within
//! [`FORWARD_TIMEOUT`] per nameserver, or an error, is answered SERVFAIL.
//! Garbage packets are dropped and counted. At most [`MAX_FORWARDS`] forwarded
//! queries and [`MAX_TCP`] TCP connections at once; beyond that SERVFAIL /
//! refused, counted.
//!
//! Lock order: the mesh's lock, then the table's. The server takes only the
//! table's, for the length of one lookup.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use hickory_proto::op::{Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{Name, RData, Record as DnsRecord, RecordType};
use meshnet_proto::dns::{self as table, Answer, DnsMsg, QueryType, Record, RecordSet, SignedSet, Table};
use meshnet_proto::handshake::CAP_DNS;
use meshnet_proto::trust::Signer;
use meshnet_proto::wire::control::ControlMsg;
use meshnet_proto::PeerName;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::mesh::{Inner, Mesh};
use crate::state::StateDir;

/// DNS's port.
pub const PORT: u16 = 53;
/// How long one upstream nameserver gets to answer a forwarded query.
pub const FORWARD_TIMEOUT: Duration = Duration::from_millis(1500);
/// Most upstream nameservers tried for one query.
pub const MAX_UPSTREAMS: usize = 3;
/// Forwarded queries in flight at once.
pub const MAX_FORWARDS: usize = 256;
/// TCP connections at once, and how long one may sit idle.
pub const MAX_TCP: usize = 64;
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// `--no-dns`, `--dns-listen-address`, `--dns-domain`, `--dns-ttl`.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub enabled: bool,
    pub listen: Option<SocketAddr>,
    /// Normalised: lowercase, final dot.
    pub domain: String,
    pub ttl: u32,
}

/// Our records as persisted in `dns.json`: the version they were signed under.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnRecords {
    pub version: u64,
    pub records: Vec<Record>,
}

/// Server counters (`status dns`).
#[derive(Debug, Default)]
pub struct DnsStats {
    pub queries: AtomicU64,
    pub answered: AtomicU64,
    pub nxdomain: AtomicU64,
    pub forwarded: AtomicU64,
    pub forward_failed: AtomicU64,
    pub dropped_garbage: AtomicU64,
    pub refused_busy: AtomicU64,
}

/// What `status dns` shows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DnsStatus {
    pub enabled: bool,
    pub domain: String,
    pub ttl: u32,
    /// Where the server listens now (`ip:port`), if anywhere.
    pub listen: Option<String>,
    pub records: Vec<RecordStatus>,
    pub own_version: u64,
    pub counters: serde_json::Value,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordStatus {
    pub name: String,
    pub address: String,
    pub target: String,
    pub owner: String,
}

/// A router's DNS: the table, our records' file, the server's state.
pub struct Dns {
    pub config: DnsConfig,
    table: Mutex<Table>,
    /// Held for a whole change of our records (the file is written under it).
    io: Mutex<()>,
    state: StateDir,
    signer: Arc<Signer>,
    pub stats: DnsStats,
    listening: Mutex<Option<SocketAddr>>,
    turn: AtomicUsize,
}

impl Dns {
    /// Loads our records (a corrupt file stops the launch: silently dropping
    /// them would also drop them on every other router) and signs them again
    /// under their persisted version.
    pub fn open(state: &StateDir, config: DnsConfig, me: PeerName, signer: Arc<Signer>) -> Result<Dns> {
        let mut t = Table::new(&config.domain, me);
        let own = state.load_dns()?;
        if !own.records.is_empty() || own.version > 0 {
            // Records of another domain (a relaunch with a new --dns-domain) are dropped.
            let (keep, gone): (Vec<Record>, Vec<Record>) =
                own.records.into_iter().partition(|r| table::in_domain(&r.name, &config.domain));
            for r in &gone {
                log::warn!("DNS: dropping record {} -> {}: outside the domain {}", r.name, r.addr, config.domain);
            }
            let version = if gone.is_empty() { own.version } else { t.next_version(unix_ms()).max(own.version + 1) };
            t.set_own(keep, version, &signer).with_context(|| format!("{} is corrupt", state.dns_path().display()))?;
        }
        Ok(Dns {
            config,
            table: Mutex::new(t),
            io: Mutex::new(()),
            state: state.clone(),
            signer,
            stats: DnsStats::default(),
            listening: Mutex::new(None),
            turn: AtomicUsize::new(0),
        })
    }

    pub fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn listening(&self) -> Option<SocketAddr> {
        *self.listening.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_listening(&self, a: Option<SocketAddr>) {
        *self.listening.lock().unwrap_or_else(|p| p.into_inner()) = a;
    }

    pub fn status(&self) -> DnsStatus {
        let t = self.table();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = &self.stats;
        DnsStatus {
            enabled: self.config.enabled,
            domain: self.config.domain.clone(),
            ttl: self.config.ttl,
            listen: self.listening().map(|a| a.to_string()),
            records: t
                .records()
                .map(|(o, r)| RecordStatus {
                    name: r.name.clone(),
                    address: r.addr.to_string(),
                    target: r.target.clone(),
                    owner: o.to_string(),
                })
                .collect(),
            own_version: t.own_version(),
            counters: serde_json::json!({
                "queries": load(&s.queries),
                "answered": load(&s.answered),
                "nxdomain": load(&s.nxdomain),
                "forwarded": load(&s.forwarded),
                "forward_failed": load(&s.forward_failed),
                "dropped_garbage": load(&s.dropped_garbage),
                "refused_busy": load(&s.refused_busy),
                "sets_merged": t.stats.sets_merged,
                "sets_stale": t.stats.sets_stale,
                "sets_rejected": t.stats.sets_rejected,
            }),
        }
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Registers `name` for `target` with `addrs` (this router's records): the one
/// call `dns-add`, `attach` of a Docker container and the Docker plugin use.
/// Persisted, then signed and gossiped. Err (and nothing changed) for a bad
/// name, target or address. Returns the records added (none if all were there).
pub fn register(mesh: &Mesh, target: &str, name: &str, addrs: &[Ipv4Addr]) -> Result<Vec<Record>> {
    let dns = &mesh.dns;
    let name = table::normalize_name(name, &dns.config.domain)?;
    table::check_target(target)?;
    if addrs.is_empty() {
        bail!("no address to register for {name}");
    }
    for a in addrs {
        if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
            bail!("{a} cannot be registered: not a unicast address");
        }
    }
    let new: Vec<Record> =
        addrs.iter().map(|a| Record { name: name.clone(), addr: *a, target: target.to_string() }).collect();
    let added = change_own(mesh, |own| {
        let mut added = Vec::new();
        for r in &new {
            if !own.contains(r) {
                own.push(r.clone());
                added.push(r.clone());
            }
        }
        added
    })?;
    for r in &added {
        log::info!("DNS: registered {} -> {} for {}", r.name, r.addr, r.target);
    }
    Ok(added)
}

/// Removes this router's records of `target` (only those of `name`, and of
/// `addrs`, when given). Returns the records removed.
pub fn unregister(mesh: &Mesh, target: &str, name: Option<&str>, addrs: &[Ipv4Addr]) -> Result<Vec<Record>> {
    let name = name.map(|n| table::normalize_name(n, &mesh.dns.config.domain)).transpose()?;
    let removed = change_own(mesh, |own| {
        let (gone, keep): (Vec<Record>, Vec<Record>) = own.drain(..).partition(|r| {
            r.target == target
                && name.as_ref().map_or(true, |n| &r.name == n)
                && (addrs.is_empty() || addrs.contains(&r.addr))
        });
        *own = keep;
        gone
    })?;
    for r in &removed {
        log::info!("DNS: removed {} -> {} of {}", r.name, r.addr, r.target);
    }
    Ok(removed)
}

/// Changes our records: the new set is checked, written to `dns.json`, then
/// published (signed under a higher version) and sent to every neighbour.
fn change_own<T>(mesh: &Mesh, f: impl FnOnce(&mut Vec<Record>) -> Vec<T>) -> Result<Vec<T>> {
    let dns = &mesh.dns;
    let _io = dns.io.lock().unwrap_or_else(|p| p.into_inner());
    let (mut records, version, me) = {
        let t = dns.table();
        (t.own().to_vec(), t.next_version(unix_ms()), mesh.settings.me)
    };
    let out = f(&mut records);
    if out.is_empty() {
        return Ok(out);
    }
    records.sort();
    records.dedup();
    RecordSet { owner: me, version, records: records.clone() }.check(&dns.config.domain)?;
    dns.state.save_dns(&OwnRecords { version, records: records.clone() })?;
    let signed = dns.table().set_own(records, version, &dns.signer)?;
    let g = mesh.lock();
    send_to_all(&g, None, split(vec![signed]));
    Ok(out)
}

fn split(sets: Vec<SignedSet>) -> Vec<DnsMsg> {
    table::split_sets(sets, table::SETS_CHUNK_BYTES)
}

/// Queues DNS messages for every established neighbour that speaks DNS gossip, but `except`.
fn send_to_all(g: &Inner, except: Option<u64>, msgs: Vec<DnsMsg>) {
    if msgs.is_empty() {
        return;
    }
    for (id, c) in g.conns.iter() {
        if Some(*id) != except && c.established && c.capabilities & CAP_DNS != 0 {
            for m in &msgs {
                let _ = c.queue.send(ControlMsg::Dns(m.clone()));
            }
        }
    }
}

fn send_to(g: &Inner, to: u64, msgs: Vec<DnsMsg>) {
    if let Some(c) = g.conns.get(&to) {
        for m in msgs {
            let _ = c.queue.send(ControlMsg::Dns(m));
        }
    }
}

/// A connection was established (called under the mesh lock): it gets the whole table.
pub fn connected(dns: &Dns, g: &Inner, id: u64) {
    let Some(c) = g.conns.get(&id) else { return };
    if c.capabilities & CAP_DNS == 0 {
        return;
    }
    send_to(g, id, split(dns.table().all_signed()));
}

/// A DNS gossip message from connection `from`.
pub fn on_message(mesh: &Mesh, from: u64, msg: DnsMsg, now_ms: u64) {
    let g = mesh.lock();
    let dns = &mesh.dns;
    match msg {
        DnsMsg::Sets(sets) => {
            let report = dns.table().merge(sets, &g.keys);
            if !report.rejected.is_empty() {
                let (owner, why) = report.rejected[report.rejected.len() - 1];
                log::debug!("DNS: {} sets dropped (latest of {owner}: {})", report.rejected.len(), why.label());
            }
            if !report.changed.is_empty() {
                // Relay what was news: a router that has it already finds it
                // stale, so the flood stops after one round.
                let sets = dns.table().signed_of(&report.changed);
                send_to_all(&g, Some(from), split(sets));
            }
        }
        DnsMsg::Digest(d) => {
            if let Some(m) = dns.table().on_digest(from, d, now_ms) {
                send_to(&g, from, vec![m]);
            }
        }
        DnsMsg::Summary { versions, answer } => {
            let out = dns.table().on_summary(from, &versions, answer, now_ms);
            send_to(&g, from, out);
        }
    }
}

/// Anti-entropy: our digest to every neighbour every `DIGEST_EVERY_MS`.
pub async fn digest_loop(mesh: Arc<Mesh>) {
    loop {
        tokio::time::sleep(Duration::from_millis(table::DIGEST_EVERY_MS)).await;
        let g = mesh.lock();
        let d = mesh.dns.table().digest();
        // To about 2·log₂ n random neighbours each round, as topology digests
        // go: in a full mesh of 100 a digest to every neighbour every 2 s cost
        // each router ~180 KB a minute; a new connection gets the whole table
        // anyway, so a partition that heals does not wait for a digest.
        let ids: Vec<u64> = g
            .conns
            .iter()
            .filter(|(_, c)| c.established && c.capabilities & CAP_DNS != 0)
            .map(|(id, _)| *id)
            .collect();
        let peers = g.topology.peers().count();
        for i in meshnet_proto::topology::full_gossip_targets(ids.len(), peers, crate::mesh::random_u64()) {
            send_to(&g, ids[i], vec![DnsMsg::Digest(d)]);
        }
    }
}

/// Serves DNS until the task is aborted. `exposed` says the bridge's first
/// exposed address (where to listen without `--dns-listen-address`).
pub async fn serve(dns: Arc<Dns>, exposed: impl Fn() -> Option<IpAddr> + Send + 'static) {
    let mut bound: Option<SocketAddr> = None;
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut failed: Option<SocketAddr> = None;
    loop {
        let want = dns.config.listen.or_else(|| exposed().map(|ip| SocketAddr::new(ip, PORT)));
        if want != bound {
            for t in tasks.drain(..) {
                t.abort();
            }
            dns.set_listening(None);
            bound = None;
            match want {
                None => log::info!("DNS: no address exposed on the bridge: not listening (meshnet expose, or --dns-listen-address)"),
                Some(addr) => match bind(addr).await {
                    Ok((udp, tcp)) => {
                        log::info!("DNS: serving {} on {addr} (UDP and TCP)", dns.config.domain);
                        let udp = Arc::new(udp);
                        tasks.push(tokio::spawn(udp_loop(dns.clone(), udp)));
                        tasks.push(tokio::spawn(tcp_loop(dns.clone(), tcp)));
                        dns.set_listening(Some(addr));
                        bound = Some(addr);
                        failed = None;
                    }
                    Err(e) => {
                        if failed != Some(addr) {
                            log::warn!("DNS: cannot listen on {addr}: {e:#} (trying again every second)");
                            failed = Some(addr);
                        }
                    }
                },
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn bind(addr: SocketAddr) -> Result<(UdpSocket, TcpListener)> {
    let udp = UdpSocket::bind(addr).await.with_context(|| format!("bind UDP {addr}"))?;
    let tcp = TcpListener::bind(addr).await.with_context(|| format!("bind TCP {addr}"))?;
    Ok((udp, tcp))
}

/// What a query gets.
enum Handled {
    Reply(Message),
    Forward(Message),
    Drop,
}

impl Dns {
    /// Answers `bytes` from the table, or says to forward it.
    fn handle(&self, bytes: &[u8]) -> Handled {
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        let Ok(req) = Message::from_vec(bytes) else {
            self.stats.dropped_garbage.fetch_add(1, Ordering::Relaxed);
            return Handled::Drop;
        };
        if req.metadata.message_type != MessageType::Query {
            self.stats.dropped_garbage.fetch_add(1, Ordering::Relaxed);
            return Handled::Drop;
        }
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata = Metadata::response_from_request(&req.metadata);
        resp.metadata.recursion_available = true;
        if req.metadata.op_code != OpCode::Query {
            resp.metadata.response_code = ResponseCode::NotImp;
            return Handled::Reply(resp);
        }
        let [q] = req.queries.as_slice() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            return Handled::Reply(resp);
        };
        resp.add_query(q.clone());
        let qname = q.name().to_lowercase().to_ascii();
        let qtype = match q.query_type() {
            RecordType::A => QueryType::A,
            RecordType::PTR => QueryType::Ptr,
            _ => QueryType::Other,
        };
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let answer = self.table().resolve(&qname, qtype, turn);
        let ttl = self.config.ttl;
        match answer {
            Answer::Forward => return Handled::Forward(req),
            Answer::Addresses(v) => {
                for a in v {
                    resp.add_answer(DnsRecord::from_rdata(q.name().clone(), ttl, RData::A(A(a))));
                }
            }
            Answer::Names(v) => {
                for n in v {
                    let Ok(name) = Name::from_ascii(&n) else { continue };
                    resp.add_answer(DnsRecord::from_rdata(q.name().clone(), ttl, RData::PTR(PTR(name))));
                }
            }
            Answer::NoData => {}
            Answer::NxDomain => {
                self.stats.nxdomain.fetch_add(1, Ordering::Relaxed);
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
        }
        resp.metadata.authoritative = true;
        self.stats.answered.fetch_add(1, Ordering::Relaxed);
        Handled::Reply(resp)
    }
}

/// Encodes a reply; over UDP one larger than the client takes is truncated (TC set).
fn encode(resp: &Message, max_udp: Option<usize>) -> Option<Vec<u8>> {
    let bytes = resp.to_vec().ok()?;
    match max_udp {
        Some(max) if bytes.len() > max => resp.truncate().to_vec().ok(),
        _ => Some(bytes),
    }
}

fn servfail(req: &Message) -> Message {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata = Metadata::response_from_request(&req.metadata);
    resp.metadata.recursion_available = true;
    resp.metadata.response_code = ResponseCode::ServFail;
    for q in &req.queries {
        resp.add_query(q.clone());
    }
    resp
}

fn max_udp(req: &Message) -> usize {
    (req.max_payload() as usize).max(512)
}

async fn udp_loop(dns: Arc<Dns>, sock: Arc<UdpSocket>) {
    let forwards = Arc::new(Semaphore::new(MAX_FORWARDS));
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        match dns.handle(&buf[..n]) {
            Handled::Drop => {}
            Handled::Reply(resp) => {
                // The request parsed, so its payload size is known; replies are small.
                let max = Message::from_vec(&buf[..n]).map(|r| max_udp(&r)).unwrap_or(512);
                if let Some(bytes) = encode(&resp, Some(max)) {
                    let _ = sock.send_to(&bytes, src).await;
                }
            }
            Handled::Forward(req) => {
                let query = buf[..n].to_vec();
                match forwards.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (dns, sock) = (dns.clone(), sock.clone());
                        tokio::spawn(async move {
                            let reply = forward(&dns, &req, &query, false).await;
                            let _ = sock.send_to(&reply, src).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        dns.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
                        if let Some(bytes) = encode(&servfail(&req), Some(512)) {
                            let _ = sock.send_to(&bytes, src).await;
                        }
                    }
                }
            }
        }
    }
}

async fn tcp_loop(dns: Arc<Dns>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_TCP));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            dns.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let dns = dns.clone();
        tokio::spawn(async move {
            let _ = tcp_conn(&dns, stream).await;
            drop(permit);
        });
    }
}

/// One TCP client: length-prefixed queries until it closes or idles.
async fn tcp_conn(dns: &Dns, mut stream: TcpStream) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await.map_err(std::io::Error::other)??;
        let reply = match dns.handle(&query) {
            Handled::Drop => return Ok(()),
            Handled::Reply(resp) => match encode(&resp, None) {
                Some(b) => b,
                None => return Ok(()),
            },
            Handled::Forward(req) => forward(dns, &req, &query, true).await,
        };
        let mut out = Vec::with_capacity(2 + reply.len());
        out.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        out.extend_from_slice(&reply);
        stream.write_all(&out).await?;
    }
}

/// The nameservers of the host's `/etc/resolv.conf`, ours left out.
pub fn upstreams(resolv_conf: &str, ours: Option<SocketAddr>) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "nameserver").then_some(())?;
            // A scoped IPv6 address (fe80::1%eth0) is not parsed: it is skipped.
            w.next()?.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, PORT))
        .filter(|a| Some(*a) != ours)
        .take(MAX_UPSTREAMS)
        .collect()
}

/// Forwards `query` to the host's nameservers in turn; their answer, or SERVFAIL.
async fn forward(dns: &Dns, req: &Message, query: &[u8], tcp: bool) -> Vec<u8> {
    dns.stats.forwarded.fetch_add(1, Ordering::Relaxed);
    let conf = tokio::fs::read_to_string("/etc/resolv.conf").await.unwrap_or_default();
    for up in upstreams(&conf, dns.listening()) {
        let got = if tcp {
            tokio::time::timeout(FORWARD_TIMEOUT, forward_tcp(up, query)).await
        } else {
            tokio::time::timeout(FORWARD_TIMEOUT, forward_udp(up, req.metadata.id, query)).await
        };
        if let Ok(Ok(reply)) = got {
            return reply;
        }
    }
    dns.stats.forward_failed.fetch_add(1, Ordering::Relaxed);
    encode(&servfail(req), if tcp { None } else { Some(512) }).unwrap_or_default()
}

async fn forward_udp(up: SocketAddr, id: u16, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if up.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(up).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65536];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Only a reply with the query's id (a connected socket takes only the upstream's datagrams).
        if n >= 12 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn forward_tcp(up: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(up).await?;
    let mut out = Vec::with_capacity(2 + query.len());
    out.extend_from_slice(&(query.len() as u16).to_be_bytes());
    out.extend_from_slice(query);
    s.write_all(&out).await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut reply).await?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_come_from_resolv_conf_without_ourselves() {
        let conf = "# comment\nsearch example\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\nnameserver 10.32.0.1\nnameserver ::1\noptions ndots:1\nnameserver 1.1.1.1\n";
        let ours: SocketAddr = "10.32.0.1:53".parse().unwrap();
        let got = upstreams(conf, Some(ours));
        assert_eq!(got, ["10.0.0.53:53".parse().unwrap(), "[::1]:53".parse().unwrap(), "1.1.1.1:53".parse().unwrap()]);
    }
}
