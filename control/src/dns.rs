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
//! tables (A from the IPv4 one, AAAA from the IPv6 one, PTR of `in-addr.arpa`
//! and `ip6.arpa` names; other types, the family a name lacks, or a class
//! other than IN, an empty NOERROR for a name that exists; NXDOMAIN for one that does not). Other names, and reverse lookups of
//! addresses not in the table, go to the nameservers of the host's
//! `/etc/resolv.conf` (our own listen address left out); no answer within
//! [`FORWARD_TIMEOUT`] per nameserver, or an error, is answered SERVFAIL.
//! Garbage packets are dropped and counted. At most [`MAX_FORWARDS`] forwarded
//! queries and [`MAX_TCP`] TCP connections at once; beyond that SERVFAIL /
//! refused, counted.
//!
//! # IPv6
//! Our IPv6 records are a second signed set with versions of its own
//! (`meshnet_proto::dns::Table6`), gossiped as `ControlMsg::Dns6` only to peers
//! with `CAP_DNS6`; the IPv4 set and `ControlMsg::Dns` are as before, so peers
//! of the previous build see no change.
//!
//! Lock order: the mesh's lock, then the table's. The server takes only the
//! table's, for the length of one lookup.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use hickory_proto::op::Message;
use meshnet_proto::dns::{self as table, Answer, DnsMsg, Family, QueryType, Record, Record6, RecordSet, SignedSet, Table, Table6};
use meshnet_proto::dns_server::{self as server, encode, max_udp, servfail, Handled};
use meshnet_proto::handshake::{CAP_DNS, CAP_DNS6};
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

/// Our records as persisted in `dns.json`: the versions they were signed
/// under. The IPv6 fields are absent from files of older builds (and ignored
/// by them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnRecords {
    pub version: u64,
    pub records: Vec<Record>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version6: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records6: Vec<Record6>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Both families' tables, under one lock.
#[derive(Debug)]
pub struct Tables {
    pub v4: Table,
    pub v6: Table6,
}

impl Tables {
    /// `rmpeer`: drops `owner`'s sets of both families (see `Table::remove_owner`).
    pub fn remove_owner(&mut self, owner: PeerName, floor: u64) -> bool {
        let a = self.v4.remove_owner(owner, floor);
        let b = self.v6.remove_owner(owner, floor);
        a || b
    }

    pub fn disconnected(&mut self, from: u64) {
        self.v4.disconnected(from);
        self.v6.disconnected(from);
    }

    /// Every address of `name` (fully qualified): IPv4 ones first, each family sorted.
    pub fn lookup(&self, name: &str) -> Vec<IpAddr> {
        let v4 = self.v4.lookup(name).iter().map(|a| IpAddr::V4(*a));
        v4.chain(self.v6.lookup(name).iter().map(|a| IpAddr::V6(*a))).collect()
    }

    pub fn resolve(&self, name: &str, qtype: QueryType, turn: usize) -> Answer {
        table::resolve(&self.v4, &self.v6, name, qtype, turn)
    }

    /// Whether we registered a record of either family for `target`.
    pub fn own_target(&self, target: &str) -> bool {
        self.v4.own().iter().any(|r| r.target == target) || self.v6.own().iter().any(|r| r.target == target)
    }

    /// Records of both families, our own records, owners with a set of either.
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut owners: Vec<PeerName> = self.v4.versions().into_iter().chain(self.v6.versions()).map(|(o, _)| o).collect();
        owners.sort_unstable();
        owners.dedup();
        (self.v4.len() + self.v6.len(), self.v4.own().len() + self.v6.own().len(), owners.len())
    }
}

/// A family as gossip carries it: which capability a peer needs for it, and
/// which control message wraps it.
pub trait Gossiped: Family {
    const CAP: u32;
    fn wrap(m: DnsMsg<Self>) -> ControlMsg;
    fn of(t: &mut Tables) -> &mut Table<Self>;
}

impl Gossiped for Ipv4Addr {
    const CAP: u32 = CAP_DNS;
    fn wrap(m: DnsMsg<Self>) -> ControlMsg {
        ControlMsg::Dns(m)
    }
    fn of(t: &mut Tables) -> &mut Table<Self> {
        &mut t.v4
    }
}

impl Gossiped for Ipv6Addr {
    const CAP: u32 = CAP_DNS6;
    fn wrap(m: DnsMsg<Self>) -> ControlMsg {
        ControlMsg::Dns6(m)
    }
    fn of(t: &mut Tables) -> &mut Table<Self> {
        &mut t.v6
    }
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
    /// Why it does not listen where it should (`cannot listen on ADDR: ...`),
    /// retried every second; absent while listening or with nowhere to listen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_error: Option<String>,
    pub records: Vec<RecordStatus>,
    pub own_version: u64,
    /// Our IPv6 set's version (0 before the first; absent from older routers' status).
    #[serde(default)]
    pub own_version6: u64,
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
    table: Mutex<Tables>,
    /// Held for a whole change of our records (the file is written under it).
    io: Mutex<()>,
    state: StateDir,
    signer: Arc<Signer>,
    pub stats: DnsStats,
    listening: Mutex<Option<SocketAddr>>,
    /// The last failure to listen where the server should, while it lasts.
    listen_error: Mutex<Option<String>>,
    turn: AtomicUsize,
}

/// How `status dns`, `report` and `dns-args` say that the server does not
/// listen, given [`DnsStatus::listen_error`].
pub fn not_listening(listen_error: Option<&str>) -> String {
    match listen_error {
        Some(e) => format!("not listening: {e} (trying again every second)"),
        None => "not listening (no address exposed on the bridge)".to_string(),
    }
}

impl Dns {
    /// Loads our records (a corrupt file stops the launch: silently dropping
    /// them would also drop them on every other router) and signs them again
    /// under their persisted version.
    pub fn open(state: &StateDir, config: DnsConfig, me: PeerName, signer: Arc<Signer>) -> Result<Dns> {
        let mut t = Table::new(&config.domain, me);
        let mut t6 = Table6::new(&config.domain, me);
        let own = state.load_dns()?;
        let corrupt = || {
            format!(
                "{} is corrupt (it holds this router's DNS records: move it away to launch without them, then `meshnet dns-add` them again)",
                state.dns_path().display()
            )
        };
        restore(&mut t, own.records, own.version, &config.domain, &signer).with_context(corrupt)?;
        restore(&mut t6, own.records6, own.version6, &config.domain, &signer).with_context(corrupt)?;
        Ok(Dns {
            config,
            table: Mutex::new(Tables { v4: t, v6: t6 }),
            io: Mutex::new(()),
            state: state.clone(),
            signer,
            stats: DnsStats::default(),
            listening: Mutex::new(None),
            listen_error: Mutex::new(None),
            turn: AtomicUsize::new(0),
        })
    }

    pub fn table(&self) -> MutexGuard<'_, Tables> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn listening(&self) -> Option<SocketAddr> {
        *self.listening.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_listening(&self, a: Option<SocketAddr>) {
        *self.listening.lock().unwrap_or_else(|p| p.into_inner()) = a;
    }

    fn set_listen_error(&self, e: Option<String>) {
        *self.listen_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
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
            listen_error: self.listen_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            records: t
                .v4
                .records()
                .map(|(o, r)| record_status(o, r))
                .chain(t.v6.records().map(|(o, r)| record_status(o, r)))
                .collect(),
            own_version: t.v4.own_version(),
            own_version6: t.v6.own_version(),
            counters: serde_json::json!({
                "queries": load(&s.queries),
                "answered": load(&s.answered),
                "nxdomain": load(&s.nxdomain),
                "forwarded": load(&s.forwarded),
                "forward_failed": load(&s.forward_failed),
                "dropped_garbage": load(&s.dropped_garbage),
                "refused_busy": load(&s.refused_busy),
                "sets_merged": t.v4.stats.sets_merged,
                "sets_stale": t.v4.stats.sets_stale,
                "sets_rejected": t.v4.stats.sets_rejected,
                "sets6_merged": t.v6.stats.sets_merged,
                "sets6_stale": t.v6.stats.sets_stale,
                "sets6_rejected": t.v6.stats.sets_rejected,
            }),
        }
    }
}

fn record_status<A: Family>(owner: PeerName, r: &Record<A>) -> RecordStatus {
    RecordStatus { name: r.name.clone(), address: r.addr.to_string(), target: r.target.clone(), owner: owner.to_string() }
}

/// Our persisted records of one family, signed again under their version.
fn restore<A: Family>(t: &mut Table<A>, records: Vec<Record<A>>, version: u64, domain: &str, signer: &Signer) -> Result<()> {
    if records.is_empty() && version == 0 {
        return Ok(());
    }
    // Records of another domain (a relaunch with a new --dns-domain) are dropped.
    let (keep, gone): (Vec<Record<A>>, Vec<Record<A>>) = records.into_iter().partition(|r| table::in_domain(&r.name, domain));
    for r in &gone {
        log::warn!("DNS: dropping record {} -> {}: outside the domain {domain}", r.name, r.addr);
    }
    let version = if gone.is_empty() { version } else { t.next_version(unix_ms()).max(version + 1) };
    t.set_own(keep, version, signer)?;
    Ok(())
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Registers `name` for `target` with `addrs` (this router's records, of
/// either family): the one call `dns-add`, `attach` of a Docker container and
/// the Docker plugin use. Persisted, then signed and gossiped. Err (and
/// nothing changed) for a bad name, target or address. Returns the records
/// added as (name, address) (none if all were there).
pub fn register(mesh: &Mesh, target: &str, name: &str, addrs: &[IpAddr]) -> Result<Vec<(String, IpAddr)>> {
    let dns = &mesh.dns;
    let name = table::normalize_name(name, &dns.config.domain)?;
    table::check_target(target)?;
    if addrs.is_empty() {
        bail!("no address to register for {name}");
    }
    for a in addrs {
        let bad = match a {
            IpAddr::V4(v) => v.is_unspecified() || v.is_broadcast() || v.is_multicast(),
            IpAddr::V6(v) => v.is_unspecified() || v.is_multicast(),
        };
        if bad {
            bail!("{a} cannot be registered: not a unicast address");
        }
    }
    let (v4, v6) = split_families(addrs);
    let rec = |a| Record { name: name.clone(), addr: a, target: target.to_string() };
    let new4: Vec<Record> = v4.into_iter().map(rec).collect();
    let new6: Vec<Record6> = v6.into_iter().map(|a| Record { name: name.clone(), addr: a, target: target.to_string() }).collect();
    let added = change_own(mesh, |own4, own6| {
        let mut added = add_new(own4, &new4);
        added.extend(add_new(own6, &new6));
        added
    })?;
    for (n, a) in &added {
        log::info!("DNS: registered {n} -> {a} for {target}");
    }
    Ok(added)
}

fn add_new<A: Family>(own: &mut Vec<Record<A>>, new: &[Record<A>]) -> Vec<(String, IpAddr)> {
    let mut added = Vec::new();
    for r in new {
        if !own.contains(r) {
            own.push(r.clone());
            added.push((r.name.clone(), r.addr.ip()));
        }
    }
    added
}

/// The addresses of each family.
pub fn split_families(addrs: &[IpAddr]) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for a in addrs {
        match a {
            IpAddr::V4(v) => v4.push(*v),
            IpAddr::V6(v) => v6.push(*v),
        }
    }
    (v4, v6)
}

/// Removes this router's records of `target`, of both families (only those of
/// `name`, and of `addrs`, when given). Returns the records removed.
pub fn unregister(mesh: &Mesh, target: &str, name: Option<&str>, addrs: &[IpAddr]) -> Result<Vec<(String, IpAddr)>> {
    let name = name.map(|n| table::normalize_name(n, &mesh.dns.config.domain)).transpose()?;
    let removed = change_own(mesh, |own4, own6| {
        let mut gone = drop_matching(own4, target, name.as_deref(), addrs);
        gone.extend(drop_matching(own6, target, name.as_deref(), addrs));
        gone
    })?;
    for (n, a) in &removed {
        log::info!("DNS: removed {n} -> {a} of {target}");
    }
    Ok(removed)
}

/// Removes all of this router's records, of both families, and tells the
/// neighbours (`reset`: its targets go, and their addresses go back to IPAM).
pub fn unregister_all(mesh: &Mesh) -> Result<Vec<(String, IpAddr)>> {
    change_own(mesh, |own4, own6| {
        let mut gone: Vec<(String, IpAddr)> = own4.drain(..).map(|r| (r.name, r.addr.ip())).collect();
        gone.extend(own6.drain(..).map(|r| (r.name, r.addr.ip())));
        gone
    })
}

fn drop_matching<A: Family>(own: &mut Vec<Record<A>>, target: &str, name: Option<&str>, addrs: &[IpAddr]) -> Vec<(String, IpAddr)> {
    let (gone, keep): (Vec<Record<A>>, Vec<Record<A>>) = own.drain(..).partition(|r| {
        r.target == target && name.map_or(true, |n| r.name == n) && (addrs.is_empty() || addrs.contains(&r.addr.ip()))
    });
    *own = keep;
    gone.into_iter().map(|r| (r.name, r.addr.ip())).collect()
}

/// Changes our records: each family's set that changed is checked, both are
/// written to `dns.json`, then each changed one is published (signed under a
/// higher version of its own) and sent to every neighbour that takes it.
fn change_own<T>(mesh: &Mesh, f: impl FnOnce(&mut Vec<Record>, &mut Vec<Record6>) -> Vec<T>) -> Result<Vec<T>> {
    let dns = &mesh.dns;
    let _io = dns.io.lock().unwrap_or_else(|p| p.into_inner());
    let me = mesh.settings.me;
    let (old4, old6, mut version, mut version6, next4, next6) = {
        let t = dns.table();
        let now = unix_ms();
        (t.v4.own().to_vec(), t.v6.own().to_vec(), t.v4.own_version(), t.v6.own_version(), t.v4.next_version(now), t.v6.next_version(now))
    };
    let (mut records, mut records6) = (old4.clone(), old6.clone());
    let out = f(&mut records, &mut records6);
    if out.is_empty() {
        return Ok(out);
    }
    records.sort();
    records.dedup();
    records6.sort();
    records6.dedup();
    let (changed4, changed6) = (records != old4, records6 != old6);
    if changed4 {
        version = next4;
        RecordSet { owner: me, version, records: records.clone() }.check(&dns.config.domain)?;
    }
    if changed6 {
        version6 = next6;
        RecordSet { owner: me, version: version6, records: records6.clone() }.check(&dns.config.domain)?;
    }
    dns.state.save_dns(&OwnRecords { version, records: records.clone(), version6, records6: records6.clone() })?;
    let signed4 = changed4.then(|| dns.table().v4.set_own(records, version, &dns.signer)).transpose()?;
    let signed6 = changed6.then(|| dns.table().v6.set_own(records6, version6, &dns.signer)).transpose()?;
    let g = mesh.lock();
    if let Some(s) = signed4 {
        send_to_all(&g, None, split(vec![s]));
    }
    if let Some(s) = signed6 {
        send_to_all(&g, None, split(vec![s]));
    }
    Ok(out)
}

fn split<A>(sets: Vec<SignedSet<A>>) -> Vec<DnsMsg<A>> {
    table::split_sets(sets, table::SETS_CHUNK_BYTES)
}

/// Queues DNS messages for every established neighbour that speaks DNS gossip
/// of the family (`CAP_DNS`, `CAP_DNS6`), but `except`.
fn send_to_all<A: Gossiped>(g: &Inner, except: Option<u64>, msgs: Vec<DnsMsg<A>>) {
    if msgs.is_empty() {
        return;
    }
    for (id, c) in g.conns.iter() {
        if Some(*id) != except && c.established && c.capabilities & A::CAP != 0 {
            for m in &msgs {
                c.queue.offer(A::wrap(m.clone()));
            }
        }
    }
}

/// Queues DNS messages for one neighbour, if it takes the family.
fn send_to<A: Gossiped>(g: &Inner, to: u64, msgs: Vec<DnsMsg<A>>) {
    if let Some(c) = g.conns.get(&to) {
        if c.capabilities & A::CAP == 0 {
            return;
        }
        for m in msgs {
            c.queue.offer(A::wrap(m));
        }
    }
}

/// A connection was established (called under the mesh lock): it gets the
/// whole table of each family it takes.
pub fn connected(dns: &Dns, g: &Inner, id: u64) {
    let (v4, v6) = {
        let t = dns.table();
        (t.v4.all_signed(), t.v6.all_signed())
    };
    send_to(g, id, split(v4));
    send_to(g, id, split(v6));
}

/// Says (at most once a minute) that a peer's records are for another domain:
/// a misconfiguration that otherwise shows only as a count in `status dns`.
fn warn_other_domain(owner: meshnet_proto::PeerName, ours: &str) {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
    if last != 0 && now < last + 60 {
        return;
    }
    LAST.store(now, std::sync::atomic::Ordering::Relaxed);
    log::warn!(
        "DNS: the records of peer {owner} are for another domain than ours ({ours}): every router of a mesh must be launched with the same --dns-domain; its records are not served here (status dns: rejected other_domain)"
    );
}

/// A DNS gossip message of either family from connection `from`
/// (`ControlMsg::Dns`, `ControlMsg::Dns6`).
pub fn on_message<A: Gossiped>(mesh: &Mesh, from: u64, msg: DnsMsg<A>, now_ms: u64) {
    let g = mesh.lock();
    let dns = &mesh.dns;
    match msg {
        DnsMsg::Sets(sets) => {
            let report = A::of(&mut dns.table()).merge(sets, &g.keys);
            if !report.rejected.is_empty() {
                let (owner, why) = report.rejected[report.rejected.len() - 1];
                log::debug!("DNS: {} sets dropped (latest of {owner}: {})", report.rejected.len(), why.label());
            }
            if let Some((owner, _)) = report.rejected.iter().find(|(_, why)| *why == meshnet_proto::dns::Reject::OtherDomain) {
                warn_other_domain(*owner, dns.table().v4.domain());
            }
            if !report.changed.is_empty() {
                // Relay what was news: a router that has it already finds it
                // stale, so the flood stops after one round.
                let sets = A::of(&mut dns.table()).signed_of(&report.changed);
                send_to_all(&g, Some(from), split(sets));
            }
        }
        DnsMsg::Digest(d) => {
            if let Some(m) = A::of(&mut dns.table()).on_digest(from, d, now_ms) {
                send_to(&g, from, vec![m]);
            }
        }
        DnsMsg::Summary { versions, answer } => {
            let out = A::of(&mut dns.table()).on_summary(from, &versions, answer, now_ms);
            send_to(&g, from, out);
        }
    }
}

/// Anti-entropy: our digest to every neighbour every `DIGEST_EVERY_MS`.
pub async fn digest_loop(mesh: Arc<Mesh>) {
    loop {
        tokio::time::sleep(Duration::from_millis(table::DIGEST_EVERY_MS)).await;
        let g = mesh.lock();
        let (d4, d6) = {
            let t = mesh.dns.table();
            (t.v4.digest(), t.v6.digest())
        };
        // To about 2·log₂ n random neighbours each round, as topology digests
        // go: in a full mesh of 100 a digest to every neighbour every 2 s cost
        // each router ~180 KB a minute; a new connection gets the whole table
        // anyway, so a partition that heals does not wait for a digest.
        let peers = g.topology.peers().count();
        let ids = |cap: u32| -> Vec<u64> {
            g.conns.iter().filter(|(_, c)| c.established && c.capabilities & cap != 0).map(|(id, _)| *id).collect()
        };
        let ids4 = ids(CAP_DNS);
        for i in meshnet_proto::topology::full_gossip_targets(ids4.len(), peers, crate::mesh::random_u64()) {
            send_to(&g, ids4[i], vec![DnsMsg::<Ipv4Addr>::Digest(d4)]);
        }
        let ids6 = ids(CAP_DNS6);
        for i in meshnet_proto::topology::full_gossip_targets(ids6.len(), peers, crate::mesh::random_u64()) {
            send_to(&g, ids6[i], vec![DnsMsg::<Ipv6Addr>::Digest(d6)]);
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
            dns.set_listen_error(None);
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
                        dns.set_listen_error(Some(format!("cannot listen on {addr}: {e:#}")));
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

impl Dns {
    /// What the query in `bytes` gets (`meshnet_proto::dns_server` decides),
    /// counted.
    fn handle(&self, bytes: &[u8]) -> Handled {
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let handled = {
            let t = self.table();
            server::handle(bytes, &t.v4, &t.v6, self.config.ttl, turn)
        };
        match &handled {
            Handled::Drop => {
                self.stats.dropped_garbage.fetch_add(1, Ordering::Relaxed);
            }
            Handled::Answer { nxdomain, .. } => {
                self.stats.answered.fetch_add(1, Ordering::Relaxed);
                if *nxdomain {
                    self.stats.nxdomain.fetch_add(1, Ordering::Relaxed);
                }
            }
            Handled::Forward(_) | Handled::Error(_) => {}
        }
        handled
    }
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
            Handled::Answer { reply: resp, .. } | Handled::Error(resp) => {
                // The request parsed, so its payload size is known; replies are small.
                let max = Message::from_vec(&buf[..n]).map(|r| max_udp(&r)).unwrap_or(512);
                if let Some(bytes) = encode(&resp, Some(max)) {
                    // A reply the client cannot take (gone, unreachable) is its
                    // loss: it asks again. So below.
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
            // Err: the client went away or broke the framing; nobody to tell.
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
            Handled::Answer { reply: resp, .. } | Handled::Error(resp) => match encode(&resp, None) {
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
    use hickory_proto::op::Query;
    use meshnet_proto::identity::Identity;

    fn temp_state(tag: &str) -> StateDir {
        let dir = std::env::temp_dir().join(format!("meshnet-dns-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        StateDir::new(dir)
    }

    fn test_dns(tag: &str) -> Dns {
        let config = DnsConfig { enabled: true, listen: None, domain: table::DEFAULT_DOMAIN.into(), ttl: 7 };
        let signer = Arc::new(Signer::from_identity(&Identity::generate()));
        Dns::open(&temp_state(tag), config, PeerName(1), signer).unwrap()
    }

    /// Every query is counted; what the tables answer too (NXDOMAIN apart as
    /// well), garbage as dropped; what `meshnet_proto::dns_server` answers is
    /// tested there.
    #[test]
    fn queries_are_counted_by_what_they_got() {
        use hickory_proto::rr::{Name, RecordType};
        let dns = test_dns("counted");
        {
            let mut t = dns.table();
            let rec = Record { name: "db.meshnet.local.".into(), addr: "10.0.0.1".parse().unwrap(), target: "t".into() };
            t.v4.set_own(vec![rec], 1, &dns.signer).unwrap();
        }
        let ask = |name: &str| {
            let mut q = Message::query();
            q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            dns.handle(&q.to_vec().unwrap())
        };
        assert!(matches!(ask("db.meshnet.local."), Handled::Answer { nxdomain: false, .. }));
        assert!(matches!(ask("nobody.meshnet.local."), Handled::Answer { nxdomain: true, .. }));
        assert!(matches!(ask("example.org."), Handled::Forward(_)));
        assert!(matches!(dns.handle(b"\x01garbage"), Handled::Drop));
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = &dns.stats;
        assert_eq!(
            (load(&s.queries), load(&s.answered), load(&s.nxdomain), load(&s.dropped_garbage)),
            (4, 2, 1, 1)
        );
        let _ = std::fs::remove_dir_all(&dns.state.root);
    }

    /// `dns.json` of the previous build (no IPv6 fields) loads; ours keeps both
    /// families' records and versions and writes no IPv6 fields while there
    /// are none (so the previous build reads it back unchanged).
    #[test]
    fn own_records_file_is_compatible() {
        let old = r#"{"version":5,"records":[{"name":"db.meshnet.local.","addr":"10.0.0.1","target":"t"}]}"#;
        let own: OwnRecords = serde_json::from_str(old).unwrap();
        assert_eq!((own.version, own.records.len(), own.version6, own.records6.len()), (5, 1, 0, 0));
        assert_eq!(serde_json::to_string(&own).unwrap(), old);
        let mut both = own.clone();
        both.version6 = 9;
        both.records6 = vec![Record6 { name: "db.meshnet.local.".into(), addr: "fd32::1".parse().unwrap(), target: "t".into() }];
        let text = serde_json::to_string(&both).unwrap();
        assert_eq!(serde_json::from_str::<OwnRecords>(&text).unwrap(), both);
        // Reopened from the file: both sets signed again under their versions.
        let state = temp_state("reopen");
        state.save_dns(&both).unwrap();
        let config = DnsConfig { enabled: true, listen: None, domain: table::DEFAULT_DOMAIN.into(), ttl: 1 };
        let signer = Arc::new(Signer::from_identity(&Identity::generate()));
        let dns = Dns::open(&state, config, PeerName(1), signer).unwrap();
        let t = dns.table();
        assert_eq!((t.v4.own_version(), t.v6.own_version()), (5, 9));
        assert_eq!(t.lookup("db.meshnet.local."), ["10.0.0.1".parse::<IpAddr>().unwrap(), "fd32::1".parse().unwrap()]);
        drop(t);
        let _ = std::fs::remove_dir_all(&state.root);
    }

    #[test]
    fn upstreams_come_from_resolv_conf_without_ourselves() {
        let conf = "# comment\nsearch example\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\nnameserver 10.32.0.1\nnameserver ::1\noptions ndots:1\nnameserver 1.1.1.1\n";
        let ours: SocketAddr = "10.32.0.1:53".parse().unwrap();
        let got = upstreams(conf, Some(ours));
        assert_eq!(got, ["10.0.0.53:53".parse().unwrap(), "[::1]:53".parse().unwrap(), "1.1.1.1:53".parse().unwrap()]);
    }
}
