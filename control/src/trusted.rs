//! Trusted subnets (`--trusted-subnets`): the records peers exchange, the
//! per-connection decision, and the task that keeps the kernel VXLAN device's
//! forwarding entries in step with who is trusted and which MACs they own.
//!
//! Owns: this router's signed [`SignedTrustedSubnets`] (sent once on every
//! connection to a peer with `CAP_TRUSTED`), the verified records of direct
//! peers (keyed by connection), the [`DataMode`] of each connection, and the
//! set of MACs installed on the VXLAN device ([`sync_loop`]). Never touches the
//! forwarding threads: it reads [`meshnet_router::mac_owners::MacOwners`], which
//! they fill. Its locks are never held together with the mesh lock.
//!
//! The control plane is always encrypted; only data frames between two peers
//! that trust each other's underlay address go unencrypted, and only unicast to
//! MACs learned behind such a peer: broadcast, multicast and unknown unicast
//! stay on the encrypted userspace path.
//!
//! Where trust is mutual but the kernel path is unavailable (IPv6 underlay, no
//! device on either side) and the peer advertised `CAP_TRUSTED_USERSPACE`, the
//! connection is `trusted (userspace)`: [`Trusted::unsealed_to`] gives the
//! peer's underlay address, and the connection tells the data plane
//! ([`meshnet_router::dataplane::DataPlane::set_unsealed`]) to send units for
//! that peer itself unsealed and to take unsealed datagrams from that address
//! only. Broadcasts and units relayed through the peer stay sealed.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshnet_proto::trusted::{self, DataMode, SignedTrustedSubnets, Sides, Subnet, TrustedSubnets, Why};
use meshnet_proto::{Mac, PeerName};
use meshnet_router::vxlan;
use serde::{Deserialize, Serialize};

use crate::mesh::Mesh;

/// How often the forwarding entries are compared with what should be.
const SYNC_EVERY: Duration = Duration::from_millis(250);
/// Entries are re-applied from scratch this often (repairs a hand-deleted one).
const RESYNC_EVERY: Duration = Duration::from_secs(30);

/// The kernel device, when it could be made.
#[derive(Clone, Debug)]
pub struct Device {
    pub name: String,
    pub index: u32,
    pub port: u16,
    /// The bridge it is on (names the filter's table, [`filter_table`]).
    pub bridge: String,
}

/// meshnet's nftables table that guards the VXLAN port of the router on
/// `bridge`: the kernel device takes a frame from anyone who can send to its
/// port, so only the underlay addresses of peers trusted both ways may.
pub fn filter_table(bridge: &str) -> String {
    format!("meshnet-trusted-{bridge}")
}

const INPUT: &str = "input";
/// The comment of the rule that drops (and counts) datagrams to the VXLAN
/// port from anyone else.
const FOREIGN: &str = "VXLAN only from peers trusted both ways";

/// The filter table for `port` letting only `peers` through (none: nobody):
/// `udp dport PORT ip saddr != { PEERS } counter drop` in an input chain,
/// the table replaced whole in one transaction.
pub fn filter_ruleset(bridge: &str, port: u16, peers: &[Ipv4Addr]) -> nftables::schema::Nftables<'static> {
    use crate::nft;
    use nftables::schema::NfListObject;
    use nftables::stmt::{Counter, Operator, Statement};
    use nftables::types::{NfChainType, NfHook};
    let table = filter_table(bridge);
    let mut batch = nft::declare_and_delete(&table);
    batch.add(NfListObject::Table(nft::our_table(&table)));
    batch.add(NfListObject::Chain(nft::base_chain(&table, INPUT, NfChainType::Filter, NfHook::Input, nft::PRIO_FILTER)));
    let mut addrs: Vec<String> = peers.iter().map(|a| a.to_string()).collect();
    addrs.sort();
    addrs.dedup();
    let mut expr = vec![nft::matches(nft::field("udp", "dport"), Operator::EQ, nftables::expr::Expression::Number(u32::from(port)))];
    if !addrs.is_empty() {
        expr.push(nft::matches(nft::field("ip", "saddr"), Operator::NEQ, nft::set_of(addrs)));
    }
    expr.push(Statement::Counter(Counter::Anonymous(None)));
    expr.push(Statement::Drop(None));
    batch.add(NfListObject::Rule(nft::rule(&table, INPUT, expr, FOREIGN.to_string())));
    batch.to_nftables()
}

/// Writes the filter for `port` on `bridge` letting only `peers` through.
pub fn apply_filter(bridge: &str, port: u16, peers: &[Ipv4Addr]) -> anyhow::Result<()> {
    crate::nft::apply(&filter_ruleset(bridge, port, peers))
}

/// Deletes the filter table of the router on `bridge`, if it is there.
pub fn remove_filter(bridge: &str) {
    if let Err(e) = crate::nft::delete_table(&filter_table(bridge)) {
        log::warn!("removing nftables table ip {}: {e:#}", filter_table(bridge));
    }
}

/// One direct connection as far as trust goes.
#[derive(Clone, Debug)]
struct PeerSide {
    peer: PeerName,
    local: IpAddr,
    remote: IpAddr,
    signing_key: [u8; 32],
    theirs: Option<TrustedSubnets>,
    /// The peer advertised `CAP_TRUSTED_USERSPACE`.
    userspace: bool,
}

/// See the module docs.
pub struct Trusted {
    pub subnets: Vec<Subnet>,
    /// The device, or why there is none (None: no trusted subnets, none wanted).
    pub device: Result<Option<Device>, String>,
    record: SignedTrustedSubnets,
    conns: Mutex<HashMap<u64, PeerSide>>,
    /// MAC → peer address installed on the device.
    installed: Mutex<HashMap<Mac, Ipv4Addr>>,
    /// Records refused (bad signature, wrong name, malformed).
    pub rejected: std::sync::atomic::AtomicU64,
}

/// `status --json`: `trusted`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrustedStatus {
    pub subnets: Vec<String>,
    /// The kernel VXLAN device, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Why there is no device although subnets are trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    /// MACs the bridge sends through the device.
    pub fdb_entries: usize,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub records_rejected: u64,
    /// Datagrams to the VXLAN port from addresses that are not peers trusted
    /// both ways, dropped by meshnet's nftables filter (None: not readable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreign_dropped: Option<u64>,
}

impl Trusted {
    /// `me`'s state; `device` is what launching the kernel device gave.
    pub fn new(
        subnets: Vec<Subnet>,
        device: Result<Option<Device>, String>,
        me: PeerName,
        uid: u64,
        signer: &meshnet_proto::trust::Signer,
    ) -> Trusted {
        let kernel = matches!(device, Ok(Some(_)));
        let record = SignedTrustedSubnets::sign(TrustedSubnets { name: me, uid, subnets: subnets.clone(), kernel }, signer);
        Trusted {
            subnets,
            device,
            record,
            conns: Mutex::default(),
            installed: Mutex::default(),
            rejected: Default::default(),
        }
    }

    /// What to send a newly established peer that has `CAP_TRUSTED`.
    pub fn record(&self) -> SignedTrustedSubnets {
        self.record.clone()
    }

    /// The kernel's VXLAN device, if there is one and it works.
    pub fn device_ok(&self) -> Option<&Device> {
        self.device.as_ref().ok().and_then(|d| d.as_ref())
    }

    /// Connection `id` to `peer` is established: `local` and `remote` are the
    /// TCP connection's two addresses, `signing_key` the peer's (from the
    /// binding its handshake proved), `userspace` whether it advertised
    /// `CAP_TRUSTED_USERSPACE`.
    pub fn connected(&self, id: u64, peer: PeerName, local: IpAddr, remote: IpAddr, signing_key: [u8; 32], userspace: bool) {
        let mut c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let side = PeerSide { peer, local: trusted::unmapped(local), remote: trusted::unmapped(remote), signing_key, theirs: None, userspace };
        c.insert(id, side);
    }

    /// The peer's underlay address when data on connection `id` goes unsealed
    /// over the userspace path (`trusted (userspace)`); None otherwise.
    pub fn unsealed_to(&self, id: u64) -> Option<IpAddr> {
        let c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        c.get(&id).filter(|s| self.decide(s).unsealed()).map(|s| s.remote)
    }

    /// A record arrived on connection `id`: kept if it verifies, else counted
    /// and ignored (data to that peer stays encrypted).
    pub fn on_record(&self, id: u64, rec: &SignedTrustedSubnets) -> Result<(), trusted::RecordError> {
        let mut c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let Some(side) = c.get_mut(&id) else { return Ok(()) };
        match rec.verify(side.peer, &side.signing_key) {
            Ok(r) => {
                side.theirs = Some(r.clone());
                Ok(())
            }
            Err(e) => {
                self.rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(e)
            }
        }
    }

    pub fn disconnected(&self, id: u64) {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    fn decide(&self, side: &PeerSide) -> DataMode {
        trusted::decide(Sides {
            ours: &self.subnets,
            our_kernel: self.device_ok().is_some(),
            local: side.local,
            remote: side.remote,
            theirs: side.theirs.as_ref(),
            their_userspace: side.userspace,
        })
    }

    /// How data on connection `id` travels (None: not established here).
    pub fn mode(&self, id: u64) -> Option<DataMode> {
        let c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        c.get(&id).map(|s| self.decide(s))
    }

    /// `encrypted`, `encrypted (why)`, `trusted (kernel)` or `trusted
    /// (userspace)` with why the kernel path is not used, for `status connections`.
    pub fn describe(&self, id: u64) -> (String, Option<String>) {
        let why = |w: Why| match (w, &self.device) {
            (Why::NoLocalDevice, Err(e)) => format!("{}: {e}", w.text()),
            _ => w.text().to_string(),
        };
        match self.mode(id) {
            Some(DataMode::TrustedKernel) => ("trusted (kernel)".into(), None),
            Some(DataMode::TrustedUserspace(w)) => ("trusted (userspace)".into(), Some(why(w))),
            Some(DataMode::Encrypted(Why::NoTrustedSubnets)) | None => ("encrypted".into(), None),
            Some(DataMode::Encrypted(w)) => ("encrypted".into(), Some(why(w))),
        }
    }

    /// The connections in `ok` whose data goes through the kernel.
    pub fn kernel_connections(&self, ok: &HashSet<u64>) -> HashSet<u64> {
        let c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        c.iter().filter(|(id, s)| ok.contains(id) && self.decide(s) == DataMode::TrustedKernel).map(|(id, _)| *id).collect()
    }

    /// Peers on connections in `ok` (established, UDP working) whose data goes
    /// through the kernel, with their underlay addresses.
    fn kernel_peers(&self, ok: &HashSet<u64>) -> HashMap<PeerName, Ipv4Addr> {
        let c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        c.iter()
            .filter(|(id, _)| ok.contains(id))
            .filter(|(_, s)| self.decide(s) == DataMode::TrustedKernel)
            .filter_map(|(_, s)| match s.remote {
                IpAddr::V4(v4) => Some((s.peer, v4)),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    pub fn status(&self) -> TrustedStatus {
        let dev = self.device_ok();
        let counters = dev.and_then(|d| vxlan::counters(&d.name)).unwrap_or_default();
        TrustedStatus {
            subnets: self.subnets.iter().map(|s| s.to_string()).collect(),
            device: dev.map(|d| d.name.clone()),
            port: dev.map(|d| d.port),
            unavailable: self.device.as_ref().err().cloned(),
            fdb_entries: self.installed.lock().unwrap_or_else(|p| p.into_inner()).len(),
            rx_packets: counters[0],
            rx_bytes: counters[1],
            tx_packets: counters[2],
            tx_bytes: counters[3],
            records_rejected: self.rejected.load(std::sync::atomic::Ordering::Relaxed),
            foreign_dropped: dev.and_then(|d| crate::nft::counted(&filter_table(&d.bridge), FOREIGN).ok()),
        }
    }
}

/// What the device's entries should be: every MAC owned by a kernel-trusted peer.
fn wanted(owners: &[(Mac, PeerName)], peers: &HashMap<PeerName, Ipv4Addr>) -> HashMap<Mac, Ipv4Addr> {
    owners.iter().filter_map(|(mac, p)| peers.get(p).map(|ip| (*mac, *ip))).collect()
}

/// Keeps the VXLAN device's entries equal to [`wanted`]: adds and moves
/// entries for MACs of kernel-trusted peers, removes those of peers no longer
/// trusted or gone and of MACs that moved elsewhere. Runs until the router stops.
pub async fn sync_loop(mesh: Arc<Mesh>) {
    let Some(dev) = mesh.trusted.device_ok().cloned() else { return };
    let mut last: Option<(u64, HashMap<PeerName, Ipv4Addr>)> = None;
    // The addresses the filter lets through (it starts with none, see the daemon).
    let mut allowed: Option<Vec<Ipv4Addr>> = Some(Vec::new());
    let mut last_full = std::time::Instant::now();
    let mut failing = false;
    loop {
        tokio::time::sleep(SYNC_EVERY).await;
        let ok: HashSet<u64> = {
            let g = mesh.lock();
            g.conns.iter().filter(|(_, c)| c.established && c.udp_ok).map(|(id, _)| *id).collect()
        };
        let peers = mesh.trusted.kernel_peers(&ok);
        let generation = mesh.dataplane.mac_owners.generation();
        let full = last_full.elapsed() >= RESYNC_EVERY;
        if !full && last.as_ref().is_some_and(|(g, p)| *g == generation && *p == peers) {
            continue;
        }
        let mut addrs: Vec<Ipv4Addr> = peers.values().copied().collect();
        addrs.sort();
        addrs.dedup();
        if full || allowed.as_ref() != Some(&addrs) {
            let (bridge, port, a) = (dev.bridge.clone(), dev.port, addrs.clone());
            match tokio::task::spawn_blocking(move || apply_filter(&bridge, port, &a)).await {
                Ok(Ok(())) => allowed = Some(addrs),
                Ok(Err(e)) => {
                    log::warn!("trusted: the filter of UDP {} failed (retrying): {e:#}", dev.port);
                    allowed = None;
                }
                Err(_) => allowed = None,
            }
        }
        let want = wanted(&mesh.dataplane.mac_owners.of_peers(), &peers);
        let have = mesh.trusted.installed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let add: Vec<(Mac, Ipv4Addr)> =
            want.iter().filter(|(m, ip)| full || have.get(*m) != Some(ip)).map(|(m, ip)| (*m, *ip)).collect();
        let del: Vec<Mac> = have.keys().filter(|m| !want.contains_key(*m)).copied().collect();
        let index = dev.index;
        let result = tokio::task::spawn_blocking(move || {
            let mut errors = Vec::new();
            let mut done_add = Vec::new();
            let mut done_del = Vec::new();
            for m in del {
                match vxlan::del_fdb(index, m) {
                    Ok(()) => done_del.push(m),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            for (m, ip) in add {
                match vxlan::add_fdb(index, m, ip) {
                    Ok(()) => done_add.push((m, ip)),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (done_add, done_del, errors)
        })
        .await;
        let Ok((done_add, done_del, errors)) = result else { continue };
        {
            let mut inst = mesh.trusted.installed.lock().unwrap_or_else(|p| p.into_inner());
            for m in &done_del {
                inst.remove(m);
            }
            for (m, ip) in &done_add {
                if inst.insert(*m, *ip) != Some(*ip) {
                    log::debug!("trusted: {} via {} on {}", fmt_mac(m), ip, dev.name);
                }
            }
        }
        if errors.is_empty() {
            if failing {
                log::info!("trusted: {} entries in step again", dev.name);
            }
            failing = false;
            last = Some((generation, peers));
            if full {
                last_full = std::time::Instant::now();
            }
        } else {
            if !failing {
                log::warn!("trusted: programming {} failed (retrying): {}", dev.name, errors.join("; "));
            }
            failing = true;
            last = None;
        }
    }
}

fn fmt_mac(m: &Mac) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshnet_proto::identity::Identity;
    use meshnet_proto::trust::Signer;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_filter_lets_only_trusted_peers_reach_the_vxlan_port() {
        let rule = |peers: &[Ipv4Addr]| {
            let v = serde_json::to_value(filter_ruleset("br0", 6784, peers)).unwrap();
            let objs = v["nftables"].as_array().unwrap().clone();
            // Declared, deleted, defined again: the table is replaced whole.
            assert_eq!(objs[0]["add"]["table"]["name"], "meshnet-trusted-br0");
            assert_eq!(objs[1]["delete"]["table"]["name"], "meshnet-trusted-br0");
            assert_eq!(objs[3]["add"]["chain"]["hook"], "input");
            objs[4]["add"]["rule"]["expr"].clone()
        };
        let none = rule(&[]);
        assert_eq!(none[0]["match"]["right"], 6784);
        assert_eq!(none[0]["match"]["left"]["payload"]["field"], "dport");
        assert!(none[1].get("counter").is_some() && none[2].get("drop").is_some(), "{none}");
        let two = rule(&["10.0.0.9".parse().unwrap(), "10.0.0.2".parse().unwrap(), "10.0.0.9".parse().unwrap()]);
        assert_eq!(two[1]["match"]["op"], "!=");
        assert_eq!(two[1]["match"]["right"]["set"], serde_json::json!(["10.0.0.2", "10.0.0.9"]));
        assert!(two[3].get("drop").is_some(), "{two}");
    }

    #[test]
    fn records_decide_per_connection_and_forged_ones_are_ignored() {
        let subnets = trusted::parse_list("10.250.0.0/16").unwrap();
        let me = Signer::from_identity(&Identity::generate());
        let dev = Device { name: "vxm-t".into(), index: 7, port: 6784, bridge: "t".into() };
        let t = Trusted::new(subnets.clone(), Ok(Some(dev)), PeerName(1), 1, &me);
        let peer = Signer::from_identity(&Identity::generate());
        t.connected(5, PeerName(2), ip("10.250.0.1"), ip("10.250.0.2"), peer.public(), true);
        assert_eq!(t.mode(5), Some(DataMode::Encrypted(Why::PeerSaidNothing)));
        // Signed by someone else: refused, counted, still encrypted.
        let forged = SignedTrustedSubnets::sign(TrustedSubnets { name: PeerName(2), uid: 1, subnets: subnets.clone(), kernel: true }, &me);
        assert!(t.on_record(5, &forged).is_err());
        assert_eq!(t.rejected.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(t.mode(5), Some(DataMode::Encrypted(Why::PeerSaidNothing)));
        let good = SignedTrustedSubnets::sign(TrustedSubnets { name: PeerName(2), uid: 1, subnets, kernel: true }, &peer);
        t.on_record(5, &good).unwrap();
        assert_eq!(t.mode(5), Some(DataMode::TrustedKernel));
        let ok: HashSet<u64> = [5].into();
        let peers = t.kernel_peers(&ok);
        assert_eq!(peers.get(&PeerName(2)), Some(&Ipv4Addr::new(10, 250, 0, 2)));
        assert!(t.kernel_peers(&HashSet::new()).is_empty(), "UDP not working: not through the kernel");
        let owners = vec![([2, 0, 0, 0, 0, 1], PeerName(2)), ([2, 0, 0, 0, 0, 2], PeerName(3))];
        let w = wanted(&owners, &peers);
        assert_eq!(w.len(), 1);
        assert_eq!(w.get(&[2, 0, 0, 0, 0, 1]), Some(&Ipv4Addr::new(10, 250, 0, 2)));
        assert_eq!(t.unsealed_to(5), None, "through the kernel, not unsealed");
        t.disconnected(5);
        assert_eq!(t.mode(5), None);
    }

    #[test]
    fn mutual_trust_without_a_device_is_unsealed_only_to_peers_that_take_it() {
        let subnets = trusted::parse_list("10.250.0.0/16").unwrap();
        let me = Signer::from_identity(&Identity::generate());
        let t = Trusted::new(subnets.clone(), Err("no VXLAN here".into()), PeerName(1), 1, &me);
        let peer = Signer::from_identity(&Identity::generate());
        let good = SignedTrustedSubnets::sign(TrustedSubnets { name: PeerName(2), uid: 1, subnets: subnets.clone(), kernel: true }, &peer);
        t.connected(5, PeerName(2), ip("10.250.0.1"), ip("::ffff:10.250.0.2"), peer.public(), true);
        assert_eq!(t.unsealed_to(5), None, "no record yet");
        t.on_record(5, &good).unwrap();
        assert_eq!(t.mode(5), Some(DataMode::TrustedUserspace(Why::NoLocalDevice)));
        assert_eq!(t.unsealed_to(5), Some(ip("10.250.0.2")));
        let (label, why) = t.describe(5);
        assert_eq!(label, "trusted (userspace)");
        assert!(why.unwrap().ends_with("no VXLAN here"));
        // The same peer of an older build: encrypted.
        t.connected(6, PeerName(2), ip("10.250.0.1"), ip("10.250.0.2"), peer.public(), false);
        t.on_record(6, &good).unwrap();
        assert_eq!(t.mode(6), Some(DataMode::Encrypted(Why::NoLocalDevice)));
        assert_eq!(t.unsealed_to(6), None);
        // A peer that does not trust us: encrypted.
        let other = SignedTrustedSubnets::sign(TrustedSubnets { name: PeerName(2), uid: 1, subnets: vec![], kernel: false }, &peer);
        t.connected(7, PeerName(2), ip("10.250.0.1"), ip("10.250.0.2"), peer.public(), true);
        t.on_record(7, &other).unwrap();
        assert_eq!(t.describe(7).0, "encrypted");
        assert_eq!(t.unsealed_to(7), None);
    }
}
