//! The daemon's side of IPAM: persistence, message routing and timers around the
//! sans-I/O [`meshnet_proto::ipam::Ipam`], and the attach-time address requests.
//!
//! The contract (see `proto/src/ipam/mod.rs`): after every message, API call or
//! timer, persist the snapshot if it changed (fsync'd, before anything is sent),
//! then send what it wants sent, then log its events. [`IpamHost::flush`] does
//! that; the mesh calls it with its lock held, so IPAM steps never interleave.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use meshnet_proto::identity::Identity;
use meshnet_proto::ipam::{Allocation, Cidr, Config, Dest, Event, InitMode, Ipam, IpamError, RingState};
use meshnet_proto::PeerName;
use serde_json::json;

use crate::state::{write_atomic, StateDir};

/// How long `attach` waits for an address (consensus, donation) before giving up.
pub const ALLOCATE_TIMEOUT_SECS: u64 = 30;

/// Most peers `--ipalloc-init consensus=N` may wait for (the ring's limit).
const MAX_CONSENSUS: usize = meshnet_proto::ipam::paxos::MAX_PARTICIPANTS;

/// `--ipalloc-init`.
pub fn parse_init(s: &str, named_peers: usize) -> Result<InitMode> {
    if s == "observer" {
        return Ok(InitMode::Observer);
    }
    if s == "consensus" {
        return Ok(InitMode::Consensus(1 + named_peers as u32));
    }
    if let Some(n) = s.strip_prefix("consensus=") {
        let n: u32 = n
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .with_context(|| format!("--ipalloc-init {s}: consensus=N needs a whole number N ≥ 1"))?;
        if n as usize > MAX_CONSENSUS {
            bail!("--ipalloc-init {s}: consensus=N takes at most {MAX_CONSENSUS} peers");
        }
        return Ok(InitMode::Consensus(n));
    }
    if let Some(list) = s.strip_prefix("seed=") {
        let peers = list
            .split(',')
            .map(|p| p.trim().parse::<PeerName>().map_err(|e| anyhow::anyhow!("--ipalloc-init {s}: {e}")))
            .collect::<Result<Vec<_>>>()?;
        if peers.is_empty() {
            bail!("--ipalloc-init {s}: name at least one peer");
        }
        if peers.len() > meshnet_proto::ipam::ring::MAX_SEEDS {
            bail!("--ipalloc-init seed=...: at most {} peers ({} given)", meshnet_proto::ipam::ring::MAX_SEEDS, peers.len());
        }
        return Ok(InitMode::Seed(peers));
    }
    bail!("--ipalloc-init {s:?}: expected consensus, consensus=N, seed=PEER,... or observer")
}

/// Refuses the *default* range when it overlaps a route of this host (Weave does
/// the same): the user must pick another with `--ipalloc-range`. Routes on
/// `bridge`, meshnet's own (those of addresses `meshnet expose` put there, which
/// stay across `stop` and `kill -9`), are the range itself and do not count.
pub fn check_default_range(range: &Cidr, bridge: &str) -> Result<()> {
    check_routes(range, bridge, &std::fs::read_to_string("/proc/net/route").unwrap_or_default())
}

/// [`check_default_range`] over the text of `/proc/net/route`.
fn check_routes(range: &Cidr, bridge: &str, routes: &str) -> Result<()> {
    for line in routes.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[0] == bridge {
            continue;
        }
        let (Ok(dst), Ok(mask)) = (u32::from_str_radix(f[1], 16), u32::from_str_radix(f[7], 16)) else { continue };
        if mask == 0 {
            continue; // the default route overlaps everything
        }
        // /proc/net/route prints addresses in host byte order of a little-endian u32.
        let dst = Ipv4Addr::from(u32::from_be(dst));
        let prefix = u32::from_be(mask).leading_ones() as u8;
        let Ok(route) = Cidr::containing(dst, prefix) else { continue };
        if route.contains(range.network()) || range.contains(route.network()) {
            bail!(
                "the default IP allocation range {range} overlaps route {route} on {} of this host: \
                 choose another with --ipalloc-range",
                f[0]
            );
        }
    }
    Ok(())
}

/// Logs what IPAM reports (an event [`IpamHost::flush`] returned).
pub fn log_event(e: &Event) {
    match e {
        // (Released again by the flush.)
        Event::Allocated { target, .. } if target == PRIME_KEY => log::info!("IPAM: primed"),
        Event::Allocated { target, ip, prefix } => log::info!("IPAM: {ip}/{prefix} allocated to {target}"),
        Event::Failed { target, error, .. } => log::warn!("IPAM: allocation for {target} failed: {error}"),
        Event::Conflict(c) => log::warn!(
            "IPAM: the claim of {}/{} for {} failed: {}; it keeps the address, so two targets use it until one \
             lets it go (meshnet detach): `meshnet status ipam` lists it, and the claim is retried every {} s",
            c.ip,
            c.prefix,
            c.target,
            c.error,
            meshnet_proto::ipam::CONFLICT_RETRY_MS / 1000
        ),
        // (The deferred addresses were claimed by the flush.)
        Event::Agreed { seeds } => log::info!(
            "IPAM: ring agreed, initial owners {}",
            seeds.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
        ),
        other => log::info!("IPAM: {other:?}"),
    }
}

/// IPAM plus what the daemon needs around it.
pub struct IpamHost {
    pub ipam: Ipam,
    pub default_subnet: Cidr,
    /// Addresses attached by a bare CIDR before any ring was agreed: claimed in
    /// the ring once one is (claiming earlier would start consensus, and a peer
    /// that has not met the mesh yet would agree on a ring of its own).
    pub deferred: Vec<(String, IpAddr, u8)>,
    clock: Instant,
    /// Where the snapshot lives (`ipam.bin`, or `ipam6.bin` for the IPv6 ring).
    path: PathBuf,
    /// Failed writes of the state so far, and the last one's message (cleared by
    /// a successful write).
    pub save_failures: u64,
    pub save_error: Option<String>,
    last_save_log: Option<Instant>,
    last_drop_log: Option<Instant>,
    /// Peers whose IPAM conflicted with ours (another range, another ring), so
    /// that their connection was closed: the latest per peer, newest last.
    peer_conflicts: VecDeque<(PeerName, String, Instant)>,
    /// Messages taken from IPAM whose state could not be saved after taking
    /// them: sent after the next successful write.
    held_back: Vec<(Dest, Vec<u8>)>,
}

/// Most peers remembered in [`IpamHost::peer_conflicts`].
const MAX_PEER_CONFLICTS: usize = 8;
/// How long a peer's conflict is shown after it last happened (a peer still in
/// conflict is refused again at each redial, well within this).
const PEER_CONFLICT_SHOWN: std::time::Duration = std::time::Duration::from_secs(3600);

/// Most rounds of save, drain and follow-up in one [`IpamHost::flush`].
const FLUSH_ROUNDS: usize = 4;

/// Least time between two log lines about failed saves, or about dropped messages.
const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl IpamHost {
    /// Restores the persisted IPAM state, or starts afresh (the IPv6 ring's
    /// state is kept apart from the IPv4 ring's, in `ipam6.bin`).
    pub fn open(
        state: &StateDir,
        me: PeerName,
        range: Cidr,
        default_subnet: Cidr,
        init: InitMode,
        identity: &Identity,
    ) -> Result<IpamHost> {
        if !range.contains_net(&default_subnet) {
            bail!("--ipalloc-default-subnet {default_subnet} is not inside --ipalloc-range {range}");
        }
        let config = Config { rng_seed: crate::mesh::random_u64() | 1, ..Config::default() };
        let path = if range.is_v6() { state.ipam6() } else { state.ipam() };
        let fresh = |init, config| Ipam::with_config(me, range, init, config, identity).map_err(|e| anyhow::anyhow!("IPAM: {e}"));
        let ipam = match std::fs::read(&path) {
            Ok(bytes) => match Ipam::restore(me, range, init.clone(), config.clone(), &bytes, identity) {
                Ok(ipam) => ipam,
                // Launched with another --ipalloc-range or --name than the state
                // was made for: as Weave, start afresh (the old state is kept aside).
                Err(e @ (IpamError::SnapshotRange { .. } | IpamError::SnapshotPeer { .. })) => {
                    let old = path.with_extension("bin.old");
                    std::fs::rename(&path, &old)
                        .with_context(|| format!("IPAM state in {}: {e}; move it aside", path.display()))?;
                    log::warn!("IPAM: {e}: starting afresh; the old state is kept in {}", old.display());
                    fresh(init, config)?
                }
                Err(e) => return Err(anyhow::anyhow!(
                    "IPAM state in {}: {e} (it holds this router's part of the address ring: restore it from a backup, or `meshnet reset --force` to start this host over, then `meshnet rmpeer` its old name on another peer)",
                    path.display()
                )),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fresh(init, config)?,
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        Ok(IpamHost {
            ipam,
            default_subnet,
            deferred: Vec::new(),
            clock: Instant::now(),
            path,
            save_failures: 0,
            save_error: None,
            last_save_log: None,
            last_drop_log: None,
            peer_conflicts: VecDeque::new(),
            held_back: Vec::new(),
        })
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Persists (if changed), then returns what to send and what happened.
    ///
    /// The state stays dirty until a write succeeds: after a failed write
    /// nothing more is sent and no more events are reported (messages stay
    /// queued in IPAM, or held here, and go out after the next successful
    /// write), so no peer ever hears of state this router could lose in a
    /// crash. Taking the messages can change the state too (a digest first
    /// publishes this peer's exact free counts): that is saved as well before
    /// they go, so the state is clean after a flush that succeeds (an `attach`
    /// checks that its address is on disk).
    ///
    /// What an event asks of this router is done here, and what that produces
    /// is saved and returned too: the priming request is released once granted,
    /// and the addresses deferred until a ring was agreed are claimed when it
    /// is. (Done by the caller with the output of a second flush thrown away,
    /// the claims sent to other owners and the conflicts they met were lost.)
    pub fn flush(&mut self) -> (Vec<(Dest, Vec<u8>)>, Vec<Event>) {
        let mut out = Vec::new();
        let mut events = Vec::new();
        // Each round's follow-ups are few and bounded (one release, one set
        // of claims): a handful of rounds always drains them.
        for _ in 0..FLUSH_ROUNDS {
            if !self.save_if_needed() {
                break;
            }
            let mut sent = std::mem::take(&mut self.held_back);
            while let Some(t) = self.ipam.poll_transmit() {
                sent.push(t);
            }
            if !self.save_if_needed() {
                self.held_back = sent;
                break;
            }
            out.append(&mut sent);
            let first = events.len();
            while let Some(e) = self.ipam.poll_event() {
                events.push(e);
            }
            let mut more = false;
            for e in &events[first..] {
                match e {
                    Event::Allocated { target, .. } if target == PRIME_KEY => {
                        self.ipam.free_target(PRIME_KEY);
                        more = true;
                    }
                    Event::Agreed { .. } => {
                        self.claim_deferred();
                        more = true;
                    }
                    _ => {}
                }
            }
            if !more {
                break;
            }
        }
        (out, events)
    }

    /// Writes the snapshot if the state changed since the last write; false if
    /// that failed (counted, logged at most every [`LOG_EVERY`], shown in status).
    fn save_if_needed(&mut self) -> bool {
        if !self.ipam.needs_save() {
            return true;
        }
        let snapshot = self.ipam.snapshot();
        match write_atomic(&self.path, &snapshot, 0o600) {
            Ok(()) => {
                self.ipam.saved();
                if self.save_error.take().is_some() {
                    log::info!("IPAM state saved again to {}; sending held-back IPAM updates", self.path.display());
                }
                true
            }
            Err(e) => {
                // Sending now could hand out space we could not record: hold it back.
                self.save_failures += 1;
                let msg = format!("{e:#}");
                if self.last_save_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    self.last_save_log = Some(Instant::now());
                    log::error!(
                        "persisting IPAM state failed ({} failures so far): {msg}; IPAM updates are held back until it can be saved",
                        self.save_failures
                    );
                }
                self.save_error = Some(msg);
                false
            }
        }
    }

    /// Why the current state is not on disk, if it is not (the last write failed).
    pub fn unsaved_error(&self) -> Option<String> {
        if !self.ipam.needs_save() {
            return None;
        }
        Some(match &self.save_error {
            Some(e) => format!("the IPAM state could not be saved ({e})"),
            None => format!("the IPAM state is not saved yet to {}", self.path.display()),
        })
    }

    /// Whether a dropped IPAM message may be logged now (at most once every 10 s;
    /// every drop is counted in the status).
    pub fn log_drop_due(&mut self) -> bool {
        if self.last_drop_log.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return false;
        }
        self.last_drop_log = Some(Instant::now());
        true
    }

    /// Claims the deferred addresses, now that a ring is agreed.
    pub fn claim_deferred(&mut self) {
        for (key, ip, prefix) in std::mem::take(&mut self.deferred) {
            if !self.ipam.universe().contains(ip) {
                continue;
            }
            match self.claim_in_use(&key, ip, prefix) {
                Ok(Allocation::Ready { .. }) => log::info!("IPAM: claimed {ip}/{prefix} for {key}"),
                Ok(Allocation::Pending(why)) => log::info!("IPAM: claim of {ip}/{prefix} for {key} continues in the background: {why}"),
                // Another target here took it meanwhile: a listed conflict, retried.
                Err(e @ IpamError::AddressInUse { .. }) => {
                    let now = self.now_ms();
                    if let Err(e) = self.ipam.note_conflict(&key, ip, prefix, e, now) {
                        log::warn!("IPAM: {ip}/{prefix} of {key}: {e}");
                    }
                }
                Err(e) => log::warn!("IPAM: {ip}/{prefix} of {key} conflicts with the ring: {e}"),
            }
        }
    }

    /// Claims `ip` for `key`, which uses it already whatever the answer: a
    /// claim still waiting is noted, so that its failure is listed as a conflict
    /// (and retried) rather than forgotten.
    pub fn claim_in_use(&mut self, key: &str, ip: IpAddr, prefix: u8) -> Result<Allocation, IpamError> {
        let now = self.now_ms();
        let answer = self.ipam.allocate(key, meshnet_proto::ipam::Request::Exact { ip, prefix }, now)?;
        if let Allocation::Pending(_) = answer {
            self.ipam.note_in_use(key, ip, prefix, now)?;
        }
        Ok(answer)
    }

    /// Records that `peer`'s IPAM conflicts with ours (`why`), for `status ipam`.
    pub fn peer_conflict(&mut self, peer: PeerName, why: String) {
        self.peer_conflicts.retain(|(p, _, at)| *p != peer && at.elapsed() < PEER_CONFLICT_SHOWN);
        if self.peer_conflicts.len() >= MAX_PEER_CONFLICTS {
            self.peer_conflicts.pop_front();
        }
        self.peer_conflicts.push_back((peer, why, Instant::now()));
    }

    /// Whether the IPAM timer is due.
    pub fn timer_due(&self) -> bool {
        self.ipam.poll_timeout().is_some_and(|t| t <= self.now_ms())
    }

    pub fn status_json(&self) -> serde_json::Value {
        let s = self.ipam.status();
        let state = match &s.state {
            RingState::Agreed { seeds } => json!({"agreed": true, "seeds": seeds.iter().map(|p| p.to_string()).collect::<Vec<_>>()}),
            RingState::AwaitingConsensus { known, quorum } if known < quorum => {
                json!({"agreed": false, "waiting": format!("consensus: {known} of {quorum} peers present")})
            }
            // Enough peers (not `3 of 2 peers present`, which read as waiting for them).
            RingState::AwaitingConsensus { known, quorum } => json!({"agreed": false, "waiting": format!(
                "consensus of the {known} peers present ({quorum} needed), started by the first request for an address (attach, expose, prime)"
            )}),
            RingState::AwaitingRing => json!({"agreed": false, "waiting": "the ring from a peer"}),
        };
        json!({
            "range": s.universe.to_string(),
            "default_subnet": self.default_subnet.to_string(),
            "state": state,
            "allocated_here": s.allocated,
            "pending": s.pending,
            "unreachable_space": count(s.unreachable_space),
            "ring_entries": s.ring_entries,
            "drops": s.drops,
            "save_failures": self.save_failures,
            "save_error": self.save_error,
            "unsaved": self.ipam.needs_save(),
            "owners": s.owners.iter().map(|o| json!({
                "peer": o.peer.to_string(),
                "reachable": o.reachable,
                "size": count(o.size),
                "free": count(o.free),
                "ranges": o.ranges.iter().map(|(a, b)| format!("{a}-{b}")).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "allocations": self.ipam.allocations().map(|(ip, t)| json!({"ip": ip.to_string(), "target": t})).collect::<Vec<_>>(),
            "peer_conflicts": self.peer_conflicts.iter().filter(|(_, _, at)| at.elapsed() < PEER_CONFLICT_SHOWN).map(|(p, why, at)| json!({
                "peer": p.to_string(),
                "error": why,
                "seconds_ago": at.elapsed().as_secs(),
            })).collect::<Vec<_>>(),
            "conflicts": s.conflicts.iter().map(|c| json!({
                "ip": c.ip.to_string(),
                "prefix": c.prefix,
                "target": c.target,
                "error": c.error.to_string(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// An address count in JSON: a number up to 2^64 - 1, beyond (IPv6 ranges of
/// /64 or shorter) its decimal digits as a string.
pub fn count(n: u128) -> serde_json::Value {
    match u64::try_from(n) {
        Ok(v) => json!(v),
        Err(_) => json!(n.to_string()),
    }
}

/// The IPAM key `meshnet prime` allocates under to start consensus; whatever it
/// gets is released at once.
pub const PRIME_KEY: &str = "meshnet:prime";

/// The name IPAM knows a target by: stable for as long as the target lives.
pub fn key(kind: &str, name: &str, container_id: Option<&str>) -> String {
    match container_id {
        Some(id) => format!("docker:{id}"),
        None => format!("{kind}:{name}"),
    }
}

/// One address an `attach` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddrSpec {
    /// This exact address; claimed in the ring when inside the range.
    Exact { ip: IpAddr, prefix: u8, strict: bool },
    /// Any free address of this subnet (`None`: the default subnet).
    Any(Option<Cidr>),
}

/// Parses `ip:CIDR`, a bare CIDR, `net:CIDR` or `net:default`.
pub fn parse_addr(s: &str) -> Result<AddrSpec> {
    if let Some(rest) = s.strip_prefix("ip:") {
        let (ip, prefix) = crate::attach::parse_cidr(rest)?;
        crate::attach::check_new_address(rest, ip, prefix)?;
        return Ok(AddrSpec::Exact { ip, prefix, strict: true });
    }
    if let Some(rest) = s.strip_prefix("net:") {
        if rest == "default" {
            return Ok(AddrSpec::Any(None));
        }
        let c: Cidr = rest.parse().map_err(|e| anyhow::anyhow!("invalid subnet {s:?}: {e}"))?;
        return Ok(AddrSpec::Any(Some(c)));
    }
    let (ip, prefix) = crate::attach::parse_cidr(s)?;
    crate::attach::check_new_address(s, ip, prefix)?;
    Ok(AddrSpec::Exact { ip, prefix, strict: false })
}

/// What to ask IPAM for, or None when the address is not IPAM's to manage (a
/// bare CIDR outside the range of its family, or of a family without a range:
/// used as given, as Weave does). `host6` is the IPv6 ring, if configured.
pub fn request_for(spec: &AddrSpec, host: &IpamHost, host6: Option<&IpamHost>) -> Result<Option<meshnet_proto::ipam::Request>> {
    use meshnet_proto::ipam::Request;
    match spec {
        AddrSpec::Any(None) => Ok(Some(Request::Any(host.default_subnet))),
        AddrSpec::Any(Some(c)) => match (c.is_v6(), host6) {
            (false, _) => Ok(Some(Request::Any(*c))),
            (true, Some(_)) => Ok(Some(Request::Any(*c))),
            (true, None) => bail!("subnet {c}: no IPv6 --ipalloc-range was given at launch"),
        },
        AddrSpec::Exact { ip, prefix, strict } => {
            let h = match (ip, host6) {
                (IpAddr::V4(_), _) => host,
                (IpAddr::V6(_), Some(h6)) => h6,
                (IpAddr::V6(_), None) if *strict => bail!("address {ip}/{prefix}: no IPv6 --ipalloc-range was given at launch"),
                (IpAddr::V6(_), None) => return Ok(None),
            };
            let universe = h.ipam.universe();
            if universe.contains(*ip) {
                // The ring never grants the range's own first or last address:
                // refuse it now, not after it was used while no ring is agreed.
                if let Some(end) = range_end(*ip, universe.prefix()) {
                    bail!("address {ip}/{prefix} is the {end} address of the IP allocation range {universe}");
                }
                Ok(Some(Request::Exact { ip: *ip, prefix: *prefix }))
            } else if *strict {
                bail!("address {ip}/{prefix} is outside the IP allocation range {universe}")
            } else {
                Ok(None)
            }
        }
    }
}

/// "network" or "broadcast" when `ip` is the first or last address of its
/// `/prefix` (IPAM reserves both in either family, for prefixes with room).
fn range_end(ip: IpAddr, prefix: u8) -> Option<&'static str> {
    let (v, width) = match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32u8),
        IpAddr::V6(a) => (u128::from(a), 128u8),
    };
    if prefix + 2 > width {
        return None;
    }
    let host = u128::MAX >> (128 - (width - prefix) as u32);
    match v & host {
        0 => Some("network"),
        h if h == host => Some("broadcast"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_range_ignores_routes_on_our_bridge() {
        let range: Cidr = "10.32.0.0/12".parse().unwrap();
        // /proc/net/route: 10.32.0.0/12 on the bridge (an exposed address), 10.231.0.0/24 on eth0.
        let head = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n";
        let ours = "meshnet\t0000200A\t00000000\t0001\t0\t0\t0\t0000F0FF\t0\t0\t0\n";
        let eth0 = "eth0\t00E7E70A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let table = format!("{head}{ours}{eth0}");
        assert!(check_routes(&range, "meshnet", &table).is_ok(), "our own bridge's route refused the range");
        let e = check_routes(&range, "other", &table).unwrap_err().to_string();
        assert!(e.contains("10.32.0.0/12 on meshnet"), "{e}");
        let clash = format!("{head}{}", ours.replace("meshnet", "eth1"));
        assert!(check_routes(&range, "meshnet", &clash).is_err(), "a route of another interface is not refused");
    }

    #[test]
    fn a_flush_leaves_nothing_unsaved_when_a_digest_publishes_free_counts() {
        // An allocation moves the exact free count too little to publish it at
        // once; the periodic digest then publishes it while the flush takes the
        // messages, after the write. That change must reach the disk in the same
        // flush: `attach` refuses an address whose state is not saved yet
        // ("was not allocated: the IPAM state is not saved yet"), and did so
        // whenever a digest fell due under it.
        let dir = std::env::temp_dir().join(format!("meshnet-ipam-digest-flush-{}", std::process::id()));
        let state = StateDir::new(dir.clone());
        state.ensure().unwrap();
        let range: Cidr = "10.40.0.0/16".parse().unwrap();
        let me = PeerName(0x0200_0000_0001);
        let mut host = IpamHost::open(&state, me, range, range, InitMode::Seed(vec![me]), &Identity::generate()).unwrap();
        let _ = host.flush();
        let now = host.now_ms();
        let got = host.ipam.allocate("netns:c1", meshnet_proto::ipam::Request::Any(range), now).unwrap();
        assert!(matches!(got, Allocation::Ready { .. }), "{got:?}");
        let _ = host.flush();
        assert!(!host.ipam.needs_save(), "unsaved right after an allocation's flush");
        host.ipam.handle_timeout(now + 1);
        let (out, _) = host.flush();
        assert!(!out.is_empty(), "the digest's flush sent nothing");
        assert!(!host.ipam.needs_save(), "the digest's flush left the state unsaved");
        assert_eq!(host.unsaved_error(), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn init_modes_parse() {
        assert_eq!(parse_init("consensus", 2).unwrap(), InitMode::Consensus(3));
        assert_eq!(parse_init("consensus=5", 0).unwrap(), InitMode::Consensus(5));
        assert_eq!(parse_init("observer", 0).unwrap(), InitMode::Observer);
        assert!(matches!(parse_init("seed=02:00:00:00:00:01,02:00:00:00:00:02", 0).unwrap(), InitMode::Seed(v) if v.len() == 2));
        for bad in ["consensus=0", "consensus=x", "seed=", "seed=nope", "paxos"] {
            assert!(parse_init(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn peer_conflicts_are_one_per_peer_and_bounded() {
        let dir = std::env::temp_dir().join(format!("meshnet-ipam-peer-conflicts-{}", std::process::id()));
        let state = StateDir::new(dir.clone());
        state.ensure().unwrap();
        let range: Cidr = "10.40.0.0/16".parse().unwrap();
        let mut host = IpamHost::open(&state, PeerName(0x0200_0000_0001), range, range, InitMode::Consensus(1), &Identity::generate()).unwrap();
        assert_eq!(host.status_json()["peer_conflicts"], json!([]));
        host.peer_conflict(PeerName(7), "uses range 10.41.0.0/16".into());
        host.peer_conflict(PeerName(7), "rings differ".into());
        let v = host.status_json();
        assert_eq!(v["peer_conflicts"].as_array().unwrap().len(), 1, "{v:#}");
        assert_eq!(v["peer_conflicts"][0]["error"], "rings differ");
        assert_eq!(v["peer_conflicts"][0]["peer"], PeerName(7).to_string());
        for p in 10..30 {
            host.peer_conflict(PeerName(p), format!("conflict {p}"));
        }
        let v = host.status_json();
        let peers: Vec<&str> = v["peer_conflicts"].as_array().unwrap().iter().map(|c| c["error"].as_str().unwrap()).collect();
        assert_eq!(peers.len(), MAX_PEER_CONFLICTS);
        assert_eq!(peers.last(), Some(&"conflict 29"), "newest last: {peers:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// What the ring's agreement asks for (claiming the deferred addresses,
    /// releasing the priming request) is done by the flush, and what that
    /// produces comes back from the same flush: a conflict met by a deferred
    /// claim is reported (it was drained by a second flush whose output the
    /// mesh threw away, so the log never said it).
    #[test]
    fn flush_claims_deferred_addresses_and_reports_their_conflicts() {
        let dir = std::env::temp_dir().join(format!("meshnet-ipam-flush-deferred-{}", std::process::id()));
        let state = StateDir::new(dir.clone());
        state.ensure().unwrap();
        let range: Cidr = "10.40.0.0/16".parse().unwrap();
        let mut host = IpamHost::open(&state, PeerName(0x0200_0000_0001), range, range, InitMode::Consensus(1), &Identity::generate()).unwrap();
        host.ipam.peers_changed(&[]);
        // Two targets attached 10.40.0.9 before any ring (across a partition, say).
        let ip: IpAddr = "10.40.0.9".parse().unwrap();
        for key in ["ns:a", "ns:b"] {
            host.deferred.push((key.to_string(), ip, 16));
            let now = host.now_ms();
            host.ipam.note_in_use(key, ip, 16, now).unwrap();
        }
        let now = host.now_ms();
        let first = host.ipam.allocate(PRIME_KEY, meshnet_proto::ipam::Request::Any(range), now).unwrap();
        assert!(matches!(first, Allocation::Pending(_)), "{first:?}");
        let mut events = Vec::new();
        for _ in 0..50 {
            let now = host.now_ms();
            host.ipam.handle_timeout(now);
            events.extend(host.flush().1);
            if host.ipam.is_agreed() && events.iter().any(|e| matches!(e, Event::Conflict(_))) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(events.iter().any(|e| matches!(e, Event::Agreed { .. })), "{events:?}");
        let conflicts: Vec<&str> =
            events.iter().filter_map(|e| if let Event::Conflict(c) = e { Some(c.target.as_str()) } else { None }).collect();
        assert_eq!(conflicts.len(), 1, "one of the two deferred claims conflicts: {events:?}");
        let holder = if conflicts[0] == "ns:a" { "ns:b" } else { "ns:a" };
        assert_eq!(host.ipam.addresses_of(holder), vec![ip], "the other deferred claim holds the address");
        assert!(host.deferred.is_empty(), "{:?}", host.deferred);
        // The priming request does not keep an address, and all of it is saved.
        assert!(host.ipam.addresses_of(PRIME_KEY).is_empty(), "{events:?}");
        assert!(!host.ipam.needs_save());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn waiting_for_consensus_says_for_what() {
        let dir = std::env::temp_dir().join(format!("meshnet-ipam-waiting-{}", std::process::id()));
        let state = StateDir::new(dir.clone());
        state.ensure().unwrap();
        let range: Cidr = "10.40.0.0/16".parse().unwrap();
        let id = Identity::generate();
        // Consensus of one, nothing asked yet: the peers are there, no request is.
        let host = IpamHost::open(&state, PeerName(0x0200_0000_0001), range, range, InitMode::Consensus(1), &id).unwrap();
        let waiting = host.status_json()["state"]["waiting"].as_str().unwrap().to_string();
        assert!(!waiting.contains("1 of 1 peers present") && waiting.contains("first request for an address"), "{waiting}");
        drop(host);
        let _ = std::fs::remove_dir_all(&dir);
        state.ensure().unwrap();
        // Consensus of three with one peer present: waiting for the others.
        let host = IpamHost::open(&state, PeerName(0x0200_0000_0001), range, range, InitMode::Consensus(3), &id).unwrap();
        let waiting = host.status_json()["state"]["waiting"].as_str().unwrap().to_string();
        assert_eq!(waiting, "consensus: 1 of 3 peers present");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn init_modes_the_ring_cannot_take_are_refused_here() {
        // The router would refuse these only once started, blaming its state file.
        let e = parse_init("consensus=100000", 0).unwrap_err().to_string();
        assert!(e.contains("--ipalloc-init consensus=100000") && e.contains("10000"), "{e}");
        assert!(parse_init("consensus=10000", 0).is_ok());
        let many = (1..=10_001u64).map(|i| PeerName(i).to_string()).collect::<Vec<_>>().join(",");
        let e = parse_init(&format!("seed={many}"), 0).unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(parse_addr("net:default").unwrap(), AddrSpec::Any(None));
        assert!(matches!(parse_addr("net:10.32.1.0/24").unwrap(), AddrSpec::Any(Some(_))));
        assert!(matches!(parse_addr("ip:10.32.0.5/12").unwrap(), AddrSpec::Exact { strict: true, .. }));
        assert!(matches!(parse_addr("10.32.0.5/12").unwrap(), AddrSpec::Exact { strict: false, .. }));
        for bad in ["net:10.32.1.0", "net:x", "ip:10.32.0.5", "ip:", "10.32.0.999/12"] {
            assert!(parse_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_no_interface_can_hold_are_refused() {
        for (bad, why) in [
            ("10.40.0.5/0", "prefix"),
            ("fd40::9/0", "prefix"),
            ("ip:10.40.0.5/0", "prefix"),
            ("255.255.255.255/32", "broadcast"),
            ("10.40.255.255/16", "broadcast address of 10.40.0.0/16"),
            ("10.50.1.0/24", "network address of 10.50.1.0/24"),
            ("ip:10.32.1.255/24", "broadcast address of 10.32.1.0/24"),
            ("fe80::5/64", "link-local"),
        ] {
            let e = parse_addr(bad).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // Point-to-point and host addresses have no network or broadcast address.
        for good in ["10.40.0.7/31", "10.40.0.6/31", "10.50.0.8/32", "10.50.0.0/32", "fd40::/128", "fd40::ffff/64"] {
            assert!(parse_addr(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn a_claim_the_ring_will_refuse_is_refused_before_it_is_used() {
        // A bare CIDR is used at once when no ring is agreed yet; one IPAM can
        // never grant (the range's own first or last address) must not be.
        let dir = std::env::temp_dir().join(format!("meshnet-ipam-reserved-{}", std::process::id()));
        let state = StateDir::new(dir.clone());
        state.ensure().unwrap();
        let id = Identity::generate();
        let range: Cidr = "10.40.0.0/16".parse().unwrap();
        let host = IpamHost::open(&state, PeerName(0x0200_0000_0001), range, range, InitMode::Consensus(2), &id).unwrap();
        for (bad, why) in [("10.40.0.0/8", "network address of the IP allocation range"), ("10.40.255.255/8", "broadcast address of the IP allocation range")] {
            let spec = parse_addr(bad).unwrap();
            let e = request_for(&spec, &host, None).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(request_for(&parse_addr("10.40.3.4/16").unwrap(), &host, None).unwrap().is_some());
        let _ = std::fs::remove_dir_all(dir);
    }
}
